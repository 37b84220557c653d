//! Will messages: the message a client leaves at CONNECT for the server to publish if the
//! connection ends without a clean DISCONNECT.
//!
//! # Rules
//! - Published ([`Action::PublishWill`]) when the connection ends any other way: the network
//!   connection is lost, keep alive runs out, a protocol error, the server shuts down, or a v5
//!   DISCONNECT with reason 0x04 (*Disconnect with Will Message*).
//! - Discarded on a v3 DISCONNECT or a v5 DISCONNECT with any other reason, and when the
//!   CONNECT is refused.
//! - Will Delay (v5): the will goes out after min(Will Delay Interval, Session Expiry
//!   Interval) (MQTT-3.1.3-9: the delay ends when the session does), so a clean session's will
//!   goes out at once. The driver waits out the delay ([`Will::delay_secs`]) and drops the will
//!   when a new connection resumes the session in time; a clean start ends the session and
//!   sends it at once.
//! - It is published like a PUBLISH of the connection (the same permission check, `mqtt-qos`
//!   and `mqtt-retain` headers, Message Expiry as TTL), with the id `<prefix>will`.

use bytes::Bytes;
use herald_core::{ChannelName, Data, Headers, MessageId, NewMessage};
use rmqtt_codec::types::QoS;
use rmqtt_codec::{v3, v5};

use super::{Action, HEADER_QOS, HEADER_RETAIN, Session};
use crate::topic::{TopicError, publish_channel};

/// A will, checked at CONNECT, kept until the connection ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub channel: ChannelName,
    pub message: NewMessage,
    /// Seconds to wait before publishing: min(Will Delay Interval, Session Expiry Interval),
    /// set when the connection ends (0 until then).
    pub delay_secs: u32,
    /// The Will Delay Interval the client asked for (v5; 0 in v3).
    requested_delay_secs: u32,
}

/// What a CONNECT's will says, whatever the version.
pub(super) struct WillRequest {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub expiry_secs: Option<u32>,
    pub delay_secs: u32,
}

impl WillRequest {
    pub fn from_v3(will: v3::LastWill) -> WillRequest {
        WillRequest {
            topic: will.topic.to_string(),
            payload: will.message,
            qos: will.qos,
            retain: will.retain,
            expiry_secs: None,
            delay_secs: 0,
        }
    }

    pub fn from_v5(will: v5::LastWill) -> WillRequest {
        WillRequest {
            topic: will.topic.to_string(),
            payload: will.message,
            qos: will.qos,
            retain: will.retain,
            expiry_secs: will.message_expiry_interval.map(|secs| secs.get()),
            delay_secs: will.will_delay_interval_sec.unwrap_or(0),
        }
    }
}

impl Session {
    /// The will of a CONNECT, or why its topic cannot be published to.
    pub(super) fn will_of(&self, request: WillRequest) -> Result<Will, TopicError> {
        let channel = publish_channel(&request.topic)?;
        let mut headers = Headers::new();
        headers.insert(HEADER_QOS.to_owned(), request.qos.value().to_string());
        if request.retain {
            headers.insert(HEADER_RETAIN.to_owned(), "1".to_owned());
        }
        let id = MessageId::parse(&format!("{}will", self.id_prefix))
            .expect("printable ASCII of bounded length");
        Ok(Will {
            channel,
            message: NewMessage {
                id,
                name: None,
                headers,
                data: Data::Binary(request.payload),
                ttl_ms: request.expiry_secs.map(|secs| u64::from(secs) * 1000),
            },
            delay_secs: 0,
            requested_delay_secs: request.delay_secs,
        })
    }

    /// The connection ends without a clean DISCONNECT: its will, if any, goes out (once).
    pub(super) fn publish_will(&mut self) {
        if let Some(mut will) = self.will.take() {
            let session_expiry_secs = self
                .persistence
                .as_ref()
                .map_or(0, |persistence| persistence.expiry_secs);
            will.delay_secs = will.requested_delay_secs.min(session_expiry_secs);
            self.actions.push_back(Action::PublishWill(will));
        }
    }

    /// The network connection is gone (read error or end of stream) without a DISCONNECT:
    /// publishes the will. Nothing more is sent.
    pub fn handle_connection_lost(&mut self) {
        if self.is_closed() {
            return;
        }
        self.publish_will();
        self.phase = super::Phase::Closed;
    }
}
