//! Deliveries to the client: the QoS of each ([`Session::handle_delivery`],
//! [`Session::handle_retained`]), outbound packet ids, the inflight window and its bounded
//! queue, and the client's PUBACK / PUBREC / PUBCOMP.
//!
//! # Invariants
//! - A delivery goes out at min(publisher QoS, subscription QoS); a message without
//!   [`HEADER_QOS`] (published over HTTP or WebSocket) counts as QoS 2.
//! - Each message is delivered at most once per connection, at the highest QoS of the
//!   matching subscriptions.
//! - `outbound` never holds more than `outbound_window` packet ids, each unique while in
//!   flight; deliveries beyond the window wait in `pending_deliveries` (at most
//!   `outbound_pending_max`, in order, QoS 0 included) and more are dropped and counted.
//! - A delivery larger than the client's Maximum Packet Size is dropped and counted
//!   (MQTT-3.1.2-25), measured exactly as the packet goes out (topic alias included).
//! - Topic aliases (v5) are chosen only when the PUBLISH is built (`send_delivery`); a
//!   [`Delivery`] always holds the full topic, so it can be re-sent on any connection.
//! - v5 No Local skips the connection's own messages, live and retained alike.
//! - An acknowledgement for a packet id not awaiting that acknowledgement is a protocol error.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::Bytes;
use herald_core::{ChannelName, Message, Position};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v3;
use rmqtt_codec::v5;

use super::aliases::TopicForm;
use super::{HEADER_QOS, HEADER_RETAIN, Packet, Session, Version};
use crate::topic::{self, TopicFilter};

/// The acknowledgement an outbound QoS 1/2 delivery waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Awaiting {
    Puback,
    Pubrec,
    Pubcomp,
}

/// An outbound QoS 1/2 delivery, by packet id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Outbound {
    pub(super) stage: Awaiting,
    /// Where the message is in the log (persistent sessions: stored, to send it again on
    /// the next connection).
    pub(super) source: Option<Source>,
}

/// The message of a persistent session's delivery, and how it was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Source {
    pub(super) channel: ChannelName,
    pub(super) position: Position,
    /// The QoS it was sent at.
    pub(super) qos: QoS,
    pub(super) retain: bool,
    pub(super) subscription_ids: Vec<NonZeroU32>,
    /// Assignment order (packet ids wrap around; the stored list keeps this order).
    pub(super) order: u64,
}

/// A PUBLISH to send, once the window has room.
#[derive(Clone, Debug)]
pub(super) struct Delivery {
    /// Always the full topic: an alias is chosen only as the PUBLISH is built.
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    /// v5: the identifiers of the subscriptions it matched.
    subscription_ids: Vec<NonZeroU32>,
}

impl Session {
    /// A retained message for the subscription `filter` (the answer to
    /// [`Action::SendRetained`](super::Action::SendRetained)): sent with RETAIN = 1 at
    /// min(stored QoS, subscription QoS). Ignored when the filter is no longer subscribed or
    /// does not match.
    pub fn handle_retained(&mut self, filter: &TopicFilter, message: &Message) {
        if !self.is_connected() {
            return;
        }
        let Some(subscription) = self.subscriptions.get(filter.as_str()) else {
            return;
        };
        if !subscription.filter.matches_channel(&message.channel)
            || (subscription.options.no_local && self.is_own_message(message))
        {
            return;
        }
        let qos = published_qos(message).min(subscription.qos);
        let ids = subscription.options.subscription_id.into_iter().collect();
        // In a persistent session too: retained messages are not part of its cursors, and
        // are not stored for sending again.
        let delivery = self.delivery_of(message, qos, true, ids);
        self.queue_delivery(delivery);
    }

    /// A durable message of a channel the driver feeds. Ignored unless one of the session's
    /// filters matches (a feed may lag behind an UNSUBSCRIBE).
    pub fn handle_delivery(&mut self, message: &Message) {
        if !self.is_connected() {
            return;
        }
        if self.is_persistent() {
            return self.deliver_live_persistent(message);
        }
        if let Some((qos, retain, ids)) = self.plan_delivery(message) {
            let delivery = self.delivery_of(message, qos, retain, ids);
            self.queue_delivery(delivery);
        }
    }

    /// A message its shared subscription group picked this connection for (the answer to
    /// [`Action::SubscribeShared`](super::Action::SubscribeShared)); `key` is the
    /// subscription's full text. Ignored when it is no longer subscribed or does not match.
    /// Not part of a persistent session's cursors (the group owns the position).
    pub fn handle_shared_delivery(&mut self, key: &str, message: &Message) {
        if !self.is_connected() {
            return;
        }
        let Some(subscription) = self.subscriptions.get(key) else {
            return;
        };
        if subscription.share.is_none() || !subscription.filter.matches_channel(&message.channel) {
            return;
        }
        let qos = published_qos(message).min(subscription.qos);
        let retain =
            subscription.options.retain_as_published && message.headers.contains_key(HEADER_RETAIN);
        let ids = subscription.options.subscription_id.into_iter().collect();
        let delivery = self.delivery_of(message, qos, retain, ids);
        self.queue_delivery(delivery);
    }

    /// Whether and how `message` goes to this client: the QoS (min of the publisher's and
    /// the highest matching subscription's), the RETAIN flag and the subscription ids.
    /// `None` when no subscription wants it (none matches, or No Local).
    pub(super) fn plan_delivery(&self, message: &Message) -> Option<(QoS, bool, Vec<NonZeroU32>)> {
        let own = self.is_own_message(message);
        let mut matched = self
            .subscriptions
            .values()
            .filter(|subscription| subscription.share.is_none())
            .filter(|subscription| !(own && subscription.options.no_local))
            .filter(|subscription| subscription.filter.matches_channel(&message.channel))
            .peekable();
        matched.peek()?;
        let mut subscription_qos = QoS::AtMostOnce;
        let mut retain_as_published = false;
        let mut ids = Vec::new();
        for subscription in matched {
            subscription_qos = subscription_qos.max(subscription.qos);
            retain_as_published |= subscription.options.retain_as_published;
            ids.extend(subscription.options.subscription_id);
        }
        let retain = retain_as_published && message.headers.contains_key(HEADER_RETAIN);
        Some((published_qos(message).min(subscription_qos), retain, ids))
    }

    /// The PUBLISH content of `message` at `qos` (already the delivered QoS).
    pub(super) fn delivery_of(
        &self,
        message: &Message,
        qos: QoS,
        retain: bool,
        subscription_ids: Vec<NonZeroU32>,
    ) -> Delivery {
        Delivery {
            topic: topic::channel_to_topic(&message.channel),
            payload: message.data.bytes().clone(),
            qos,
            retain,
            subscription_ids,
        }
    }

    /// Whether the delivery fits the client's Maximum Packet Size (MQTT-3.1.2-25: one that
    /// does not is discarded as if delivered).
    pub(super) fn fits_peer(&self, delivery: &Delivery) -> bool {
        self.peer_max_packet_bytes
            .is_none_or(|max| delivery.size_bytes(self.version, TopicForm::Full) <= max as usize)
    }

    /// Whether this connection published `message` (for v5 No Local). Own messages are
    /// `<prefix><sequence>`: digits only after the prefix, so connection `c1` never takes a
    /// message of connection `c1-x` for its own.
    fn is_own_message(&self, message: &Message) -> bool {
        message
            .id
            .as_str()
            .strip_prefix(self.id_prefix.as_str())
            .is_some_and(|sequence| {
                !sequence.is_empty() && sequence.bytes().all(|byte| byte.is_ascii_digit())
            })
    }

    /// Sends a delivery now, or queues it behind the window, or drops and counts it.
    fn queue_delivery(&mut self, delivery: Delivery) {
        // Checked again as sent (`send_publish`); here so that it takes no room in the queue.
        if !self.fits_peer(&delivery) {
            self.deliveries_dropped += 1;
            return;
        }
        if self.pending_deliveries.is_empty() && self.can_send(&delivery) {
            self.send_delivery(delivery);
        } else if self.pending_deliveries.len() < self.config.outbound_pending_max {
            self.pending_deliveries.push_back(delivery);
        } else {
            self.deliveries_dropped += 1;
        }
    }

    fn can_send(&self, delivery: &Delivery) -> bool {
        delivery.qos == QoS::AtMostOnce || self.outbound.len() < usize::from(self.outbound_window)
    }

    fn drain_pending_deliveries(&mut self) {
        while let Some(delivery) = self.pending_deliveries.front() {
            if !self.can_send(delivery) {
                break;
            }
            let delivery = self.pending_deliveries.pop_front().expect("front exists");
            self.send_delivery(delivery);
        }
    }

    /// Sends a delivery with a new packet id (QoS 1/2) that is not part of a persistent
    /// session's stored state.
    fn send_delivery(&mut self, delivery: Delivery) {
        let packet_id = match delivery.qos {
            QoS::AtMostOnce => None,
            qos => {
                let packet_id = self.allocate_packet_id();
                self.outbound.insert(
                    packet_id,
                    Outbound {
                        stage: if qos == QoS::AtLeastOnce {
                            Awaiting::Puback
                        } else {
                            Awaiting::Pubrec
                        },
                        source: None,
                    },
                );
                Some(packet_id)
            }
        };
        self.send_publish(delivery, packet_id, false);
    }

    /// Builds and sends the PUBLISH of a delivery (`dup`: a stored session's delivery sent
    /// again): the only place a topic alias is chosen. The caller checked that the delivery
    /// fits the client's Maximum Packet Size with its full topic.
    pub(super) fn send_publish(
        &mut self,
        delivery: Delivery,
        packet_id: Option<NonZeroU16>,
        dup: bool,
    ) {
        let mut form = self.outbound_aliases.plan(&delivery.topic);
        if let Some(max) = self.peer_max_packet_bytes.map(|max| max as usize) {
            // An alias can make a packet a few bytes larger (a short topic, or the first use):
            // then the topic goes in full, and the alias waits for a later packet.
            if form != TopicForm::Full && delivery.size_bytes(self.version, form) > max {
                form = TopicForm::Full;
            }
        }
        if let TopicForm::Assign(alias) = form {
            self.outbound_aliases.assign(delivery.topic.clone(), alias);
        }
        let topic_alias = form.alias();
        let properties = (self.version == Version::V5
            && (topic_alias.is_some() || !delivery.subscription_ids.is_empty()))
        .then(|| v5::PublishProperties {
            topic_alias,
            subscription_ids: delivery.subscription_ids,
            ..v5::PublishProperties::default()
        });
        let publish = Box::new(Publish {
            dup,
            retain: delivery.retain,
            qos: delivery.qos,
            topic: if form.carries_topic() {
                delivery.topic.into()
            } else {
                "".into()
            },
            packet_id,
            payload: delivery.payload,
            properties,
        });
        self.send(match self.version {
            Version::V3 => Packet::V3(v3::Packet::Publish(publish)),
            Version::V5 => Packet::V5(v5::Packet::Publish(publish)),
        });
    }

    /// A packet id not in flight; the window (at most 65535) guarantees one exists.
    pub(super) fn allocate_packet_id(&mut self) -> NonZeroU16 {
        loop {
            let candidate = NonZeroU16::new(self.next_packet_id).expect("never 0");
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.outbound.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    // ----- the client's acknowledgements -----

    pub(super) fn on_puback(&mut self, packet_id: NonZeroU16) {
        self.complete_outbound(packet_id, Awaiting::Puback, "PUBACK");
    }

    /// `success`: false for a v5 PUBREC with an error code, which ends the exchange.
    pub(super) fn on_pubrec(&mut self, packet_id: NonZeroU16, success: bool) {
        let Some(entry) = self.outbound.get_mut(&packet_id) else {
            return self.protocol_error("PUBREC for a packet id not awaiting one");
        };
        if entry.stage == Awaiting::Puback {
            return self.protocol_error("PUBREC for a packet id not awaiting one");
        }
        let tracked = entry.source.is_some();
        if !success {
            self.outbound.remove(&packet_id);
            if tracked {
                self.mark_dirty();
            }
            return self.after_outbound_freed();
        }
        // A stored session's PUBREL waits until the released stage is saved: after a crash
        // the server must send PUBREL again, never the PUBLISH.
        if entry.stage != Awaiting::Pubcomp {
            entry.stage = Awaiting::Pubcomp;
            if tracked {
                self.mark_dirty();
            }
        }
        self.send_pubrel(packet_id);
    }

    pub(super) fn send_pubrel(&mut self, packet_id: NonZeroU16) {
        self.send(match self.version {
            Version::V3 => Packet::V3(v3::Packet::PublishRelease { packet_id }),
            Version::V5 => Packet::V5(v5::Packet::PublishRelease(v5::PublishAck2 {
                packet_id,
                ..v5::PublishAck2::default()
            })),
        });
    }

    pub(super) fn on_pubcomp(&mut self, packet_id: NonZeroU16) {
        self.complete_outbound(packet_id, Awaiting::Pubcomp, "PUBCOMP");
    }

    /// The last acknowledgement of a delivery (`packet` names it): frees the packet id and
    /// its slot in the window.
    fn complete_outbound(&mut self, packet_id: NonZeroU16, expected: Awaiting, packet: &str) {
        if self.outbound.get(&packet_id).map(|entry| entry.stage) != Some(expected) {
            return self.protocol_error(&format!("{packet} for a packet id not awaiting one"));
        }
        let entry = self.outbound.remove(&packet_id).expect("checked");
        if entry.source.is_some() {
            self.mark_dirty();
        }
        self.after_outbound_freed();
    }

    /// A window slot is free: the next queued delivery, or a persistent session's next read.
    fn after_outbound_freed(&mut self) {
        self.drain_pending_deliveries();
        self.pump_reads();
    }
}

/// The QoS the publisher used: the [`HEADER_QOS`] of a message published over MQTT; QoS 2
/// for one published over HTTP or WebSocket (delivered at the subscription's QoS).
fn published_qos(message: &Message) -> QoS {
    match message.headers.get(HEADER_QOS).map(String::as_str) {
        Some("0") => QoS::AtMostOnce,
        Some("1") => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Delivery {
    /// The size of this delivery's PUBLISH on a `version` connection with the topic in `form`.
    fn size_bytes(&self, version: Version, form: TopicForm) -> usize {
        publish_size_bytes(
            version,
            if form.carries_topic() {
                self.topic.len()
            } else {
                0
            },
            self.qos,
            self.payload.len(),
            &self.subscription_ids,
            form.alias().is_some(),
        )
    }
}

/// The exact size in bytes of a PUBLISH as rmqtt-codec encodes it: the fixed header (type
/// byte and Remaining Length), the topic with its length prefix, the packet id when QoS > 0,
/// in v5 the property block (its length, then the Topic Alias and each Subscription
/// Identifier, the only properties the server sets), and the payload.
pub(super) fn publish_size_bytes(
    version: Version,
    topic_bytes: usize,
    qos: QoS,
    payload_bytes: usize,
    subscription_ids: &[NonZeroU32],
    topic_alias: bool,
) -> usize {
    let packet_id_bytes = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let properties_bytes = match version {
        Version::V3 => 0,
        Version::V5 => {
            // Topic Alias: identifier byte and two-byte integer; Subscription Identifier:
            // identifier byte and a variable byte integer.
            let length = usize::from(topic_alias) * 3
                + subscription_ids
                    .iter()
                    .map(|id| 1 + variable_byte_integer_bytes(id.get() as usize))
                    .sum::<usize>();
            variable_byte_integer_bytes(length) + length
        }
    };
    let remaining = 2 + topic_bytes + packet_id_bytes + properties_bytes + payload_bytes;
    1 + variable_byte_integer_bytes(remaining) + remaining
}

/// The bytes of `value` as an MQTT Variable Byte Integer (7 bits per byte).
fn variable_byte_integer_bytes(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}
