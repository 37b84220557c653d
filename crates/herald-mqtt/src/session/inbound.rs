//! The client's PUBLISH at QoS 0, 1 and 2: the topic check, the [`Action::Append`] request,
//! the acknowledgement once the driver answered ([`Session::handle_appended`]), and PUBREL.
//!
//! # Invariants
//! - PUBACK (QoS 1) and PUBREC (QoS 2) are sent only after [`AppendOutcome::Durable`]; a
//!   refusal is a v5 negative acknowledgement or, in v3 (which has none), a close.
//! - `inbound` holds a packet id from its PUBLISH until its acknowledgement (QoS 1) or PUBREL
//!   (QoS 2): a PUBLISH re-sent meanwhile is not appended again (MQTT-4.3.3).
//! - In v5, `inbound` never holds more than `receive_maximum` packet ids (0x93 otherwise).
//! - PUBACK/PUBREC (positive or negative) go out in the order their PUBLISH packets came
//!   (MQTT-4.6.0-2/3), although appends complete in any order: an answered acknowledgement
//!   waits in `acks` for the ones before it. Clients rely on it (rumqttc frees packet ids in
//!   order, and loses QoS 2 messages otherwise).
//! - Each PUBLISH gets the next sequence, so message ids `mqtt-<connection id>-<sequence>`
//!   never repeat within the connection.

use std::num::NonZeroU16;

use herald_core::{Data, Headers, MessageId, NewMessage};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};

use super::{
    Action, AppendOutcome, AppendToken, HEADER_QOS, HEADER_RETAIN, Packet, Session, Version,
    reasons,
};
use crate::topic::{self, TopicError};

/// An inbound QoS 1/2 publish, by packet id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Inbound {
    /// The append is pending; the acknowledgement follows its answer.
    Appending { qos: QoS, sequence: u64 },
    /// QoS 2: durable, PUBREC sent, waiting for PUBREL.
    Received,
}

/// A QoS 1/2 PUBLISH awaiting its acknowledgement, in arrival order.
#[derive(Clone, Debug)]
pub(super) struct PendingAck {
    /// The append's sequence (`None`: refused before any append).
    sequence: Option<u64>,
    packet_id: NonZeroU16,
    qos: QoS,
    /// `None` while the append is pending; then the refusal, if any.
    answer: Option<Option<(v5::PublishAckReason, String)>>,
}

impl Session {
    /// Queues the acknowledgement of a QoS 1/2 PUBLISH; `answer` when it is known already.
    fn queue_ack(
        &mut self,
        sequence: Option<u64>,
        packet_id: NonZeroU16,
        qos: QoS,
        answer: Option<Option<(v5::PublishAckReason, String)>>,
    ) {
        self.acks.push_back(PendingAck {
            sequence,
            packet_id,
            qos,
            answer,
        });
        self.flush_acks();
    }

    /// Sends the answered acknowledgements at the front, in order.
    fn flush_acks(&mut self) {
        while self.acks.front().is_some_and(|ack| ack.answer.is_some()) {
            let ack = self.acks.pop_front().expect("checked");
            let refusal = ack.answer.expect("checked");
            if ack.sequence.is_some() {
                if refusal.is_none() && ack.qos == QoS::ExactlyOnce {
                    self.inbound.insert(ack.packet_id, Inbound::Received);
                    self.mark_dirty();
                } else {
                    self.inbound.remove(&ack.packet_id);
                    self.forget_inbound_id(ack.packet_id);
                }
            }
            self.acknowledge_publish(ack.packet_id, ack.qos, refusal);
            if self.is_closed() {
                return;
            }
        }
    }

    /// The answer to [`Action::Append`].
    pub fn handle_appended(&mut self, token: AppendToken, outcome: AppendOutcome) {
        if self.is_closed() {
            return;
        }
        let Some(packet_id) = token.packet_id else {
            // QoS 0 has no acknowledgement; only a refusal is worth ending the connection
            // for, so that the publisher learns it. Other failures are the driver's to count.
            if outcome == AppendOutcome::NotAuthorized {
                self.close(
                    DisconnectReasonCode::NotAuthorized,
                    "not authorized to publish to this topic",
                );
            }
            return;
        };
        let Some(Inbound::Appending { sequence, .. }) = self.inbound.get(&packet_id).copied()
        else {
            panic!("an append answer for packet {packet_id} that is not being appended");
        };
        assert_eq!(sequence, token.sequence, "one append per inbound packet id");
        let pending = self
            .acks
            .iter_mut()
            .find(|ack| ack.sequence == Some(sequence))
            .expect("every pending append has its place in the acknowledgement order");
        pending.answer = Some(reasons::append_refusal(outcome));
        self.flush_acks();
    }

    pub(super) fn on_publish(&mut self, mut publish: Publish) {
        if self.version == Version::V5
            && let Some(alias) = publish.properties.as_ref().and_then(|p| p.topic_alias)
        {
            if alias.get() > self.config.topic_alias_maximum {
                return self.close(
                    DisconnectReasonCode::TopicAliasInvalid,
                    &format!(
                        "topic alias {alias} is over the Topic Alias Maximum {}",
                        self.config.topic_alias_maximum
                    ),
                );
            }
            if publish.topic.is_empty() {
                // MQTT-3.3.2-12: an alias alone names the topic it was last set to.
                match self.topic_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone().into(),
                    None => {
                        return self.protocol_error(&format!("topic alias {alias} was never set"));
                    }
                }
            } else {
                self.topic_aliases.insert(alias, publish.topic.to_string());
            }
        }
        let channel = match topic::publish_channel(&publish.topic) {
            Ok(channel) => channel,
            Err(TopicError::Empty | TopicError::WildcardInName) => {
                return self.close(
                    DisconnectReasonCode::TopicNameInvalid,
                    "a PUBLISH topic must be non-empty and without wildcards",
                );
            }
            Err(error) => {
                // A valid MQTT topic we cannot take: v5 QoS 1/2 get a negative
                // acknowledgement and keep the connection; everything else closes it.
                if self.version == Version::V5
                    && let Some(packet_id) = publish.packet_id
                    && publish.qos != QoS::AtMostOnce
                    && !self.inbound.contains_key(&packet_id)
                {
                    let refusal = (v5::PublishAckReason::TopicNameInvalid, error.to_string());
                    return self.queue_ack(None, packet_id, publish.qos, Some(Some(refusal)));
                }
                return self.close(
                    DisconnectReasonCode::TopicNameInvalid,
                    &format!("topic {:?} refused: {error}", &*publish.topic),
                );
            }
        };
        let packet_id = match publish.qos {
            QoS::AtMostOnce => None,
            _ => match publish.packet_id {
                Some(packet_id) => Some(packet_id),
                None => return self.protocol_error("a QoS 1/2 PUBLISH without a packet id"),
            },
        };
        if let Some(packet_id) = packet_id {
            match self.inbound.get(&packet_id).copied() {
                Some(Inbound::Appending { qos, .. }) => {
                    if qos != publish.qos {
                        return self.protocol_error("a packet id reused with another QoS");
                    }
                    // A re-send while the first append is pending: its answer acknowledges both.
                    return;
                }
                Some(Inbound::Received) => {
                    if publish.qos != QoS::ExactlyOnce {
                        return self.protocol_error("a packet id reused before PUBREL");
                    }
                    // MQTT-4.3.3: until PUBREL, the same packet id is acknowledged, not stored.
                    // At once, not in order: queued, it could go out after the PUBREL that
                    // frees the id, and acknowledge the client's next use of it.
                    return self.acknowledge_publish(packet_id, QoS::ExactlyOnce, None);
                }
                None => {}
            }
            if self.version == Version::V5
                && self.inbound.len() >= usize::from(self.config.receive_maximum)
            {
                return self.close(
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                    "more unacknowledged QoS 1/2 publishes than Receive Maximum",
                );
            }
        }
        self.publish_sequence += 1;
        let sequence = self.publish_sequence;
        if let Some(packet_id) = packet_id {
            self.inbound.insert(
                packet_id,
                Inbound::Appending {
                    qos: publish.qos,
                    sequence,
                },
            );
            self.acks.push_back(PendingAck {
                sequence: Some(sequence),
                packet_id,
                qos: publish.qos,
                answer: None,
            });
        }
        let stored_id = self.persistent_inbound_id(packet_id, publish.qos, sequence);
        let message = self.new_message(sequence, stored_id, publish);
        self.actions.push_back(Action::Append {
            token: AppendToken {
                sequence,
                packet_id,
            },
            channel,
            message,
        });
    }

    /// A persistent session's QoS 2 PUBLISH: the id its message is stored under, saved before
    /// the append is asked for (the store commits in queue order, so a durable message always
    /// has its id recorded). A PUBLISH re-sent after a resume reuses the recorded id.
    fn persistent_inbound_id(
        &mut self,
        packet_id: Option<NonZeroU16>,
        qos: QoS,
        sequence: u64,
    ) -> Option<MessageId> {
        let packet_id = packet_id.filter(|_| qos == QoS::ExactlyOnce)?;
        let id_prefix = self.id_prefix.clone();
        let persistence = self.persistence.as_mut()?;
        let id = persistence
            .inbound_ids
            .entry(packet_id)
            .or_insert_with(|| {
                MessageId::parse(&format!("{id_prefix}{sequence}"))
                    .expect("printable ASCII of bounded length")
            })
            .clone();
        self.mark_dirty();
        self.save_now();
        Some(id)
    }

    fn forget_inbound_id(&mut self, packet_id: NonZeroU16) {
        if let Some(persistence) = self.persistence.as_mut()
            && persistence.inbound_ids.remove(&packet_id).is_some()
        {
            self.mark_dirty();
        }
    }

    /// The message to append for the connection's `sequence`-th PUBLISH (under `stored_id`
    /// when a persistent session recorded one).
    fn new_message(
        &self,
        sequence: u64,
        stored_id: Option<MessageId>,
        publish: Publish,
    ) -> NewMessage {
        let id = stored_id.unwrap_or_else(|| {
            MessageId::parse(&format!("{}{sequence}", self.id_prefix))
                .expect("printable ASCII of bounded length")
        });
        let mut headers = Headers::new();
        headers.insert(HEADER_QOS.to_owned(), publish.qos.value().to_string());
        if publish.retain {
            headers.insert(HEADER_RETAIN.to_owned(), "1".to_owned());
        }
        let ttl_ms = publish
            .properties
            .as_ref()
            .and_then(|properties| properties.message_expiry_interval)
            .map(|secs| u64::from(secs.get()) * 1000);
        NewMessage {
            id,
            name: None,
            headers,
            data: Data::Binary(publish.payload),
            ttl_ms,
        }
    }

    /// Answers a QoS 1 (PUBACK) or QoS 2 (PUBREC) publish: success, or the refusal with its
    /// reason. MQTT 3.1.1 has no negative acknowledgement: a v3 refusal closes the connection
    /// unacknowledged.
    fn acknowledge_publish(
        &mut self,
        packet_id: NonZeroU16,
        qos: QoS,
        refusal: Option<(v5::PublishAckReason, String)>,
    ) {
        match (self.version, refusal) {
            (Version::V3, None) => self.send(Packet::V3(if qos == QoS::ExactlyOnce {
                v3::Packet::PublishReceived { packet_id }
            } else {
                v3::Packet::PublishAck { packet_id }
            })),
            (Version::V3, Some((reason, why))) => self.close(
                reasons::disconnect_for_publish_refusal(reason),
                &format!("publish refused: {why}"),
            ),
            (Version::V5, refusal) => {
                let (reason_code, reason_string) = match refusal {
                    None => (v5::PublishAckReason::Success, None),
                    Some((code, why)) => (code, Some(why.into())),
                };
                let ack = v5::PublishAck {
                    packet_id,
                    reason_code,
                    properties: Vec::new(),
                    reason_string,
                };
                self.send(Packet::V5(if qos == QoS::ExactlyOnce {
                    v5::Packet::PublishReceived(ack)
                } else {
                    v5::Packet::PublishAck(ack)
                }));
            }
        }
    }

    pub(super) fn on_pubrel(&mut self, packet_id: NonZeroU16) {
        match self.inbound.get(&packet_id) {
            Some(Inbound::Received) => {
                self.inbound.remove(&packet_id);
                // A persistent session's PUBCOMP waits until the release is saved: the client
                // may reuse the id only once the server has forgotten it.
                self.forget_inbound_id(packet_id);
                self.send_pubcomp(packet_id, v5::PublishAck2Reason::Success);
            }
            Some(Inbound::Appending { .. }) => self.protocol_error("PUBREL before PUBREC"),
            // A PUBREL re-sent after our PUBCOMP was lost is answered again (MQTT-4.3.3).
            None => self.send_pubcomp(packet_id, v5::PublishAck2Reason::PacketIdNotFound),
        }
    }

    /// PUBCOMP; `reason` is for v5 (a v3 PUBCOMP has no reason code).
    fn send_pubcomp(&mut self, packet_id: NonZeroU16, reason: v5::PublishAck2Reason) {
        self.send(match self.version {
            Version::V3 => Packet::V3(v3::Packet::PublishComplete { packet_id }),
            Version::V5 => Packet::V5(v5::Packet::PublishComplete(v5::PublishAck2 {
                packet_id,
                reason_code: reason,
                ..v5::PublishAck2::default()
            })),
        });
    }
}
