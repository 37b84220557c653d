//! The native WebSocket protocol, version 1: JSON text frames, each an object with a `type`.
//!
//! docs/protocol.md is the reference for users; this module is the one definition both the
//! server and the SDK compile against.
//!
//! # Decoding
//! Frames are decoded in two steps: the `type` is read first, then the rest of the object is
//! decoded as that frame's struct with unknown fields rejected. (serde's internally tagged
//! enums cannot carry the raw JSON `data` through their buffering, and would accept unknown
//! fields.) [`ClientFrame::from_json`] and [`ServerFrame::from_json`] tell a malformed frame
//! ([`FrameError::Invalid`]) from an unknown type ([`FrameError::UnknownType`]).
//!
//! # Positions and ranges
//! Positions are `EPOCH:SERIAL` strings. Notice ranges are inclusive: `from` is the first
//! serial concerned and `to` the last, both as positions.

use std::collections::BTreeMap;

use herald_core::Position;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::message::MessageBody;
use crate::publish::{Encoding, PublishMessage, Ttl};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The WebSocket subprotocol name a client may offer (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "herald.v1";

/// Close codes the server uses (docs/protocol.md lists them with what a client should do).
pub mod close {
    /// The server is shutting down; reconnect (to another node) with backoff.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame was over the frame size limit.
    pub const FRAME_TOO_LARGE: u16 = 1009;
    /// Too many malformed frames in a row; the client is not speaking this protocol.
    pub const PROTOCOL_ERROR: u16 = 4000;
    /// `connect` carried no valid credentials, or a frame came before `connect`.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No `connect` frame arrived within the handshake timeout.
    pub const HANDSHAKE_TIMEOUT: u16 = 4002;
    /// `connect` asked for a protocol version the server does not speak.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4003;
    /// Another connection subscribed with the same `subscriber_id` (at-least-once) and took the
    /// subscriber over, or the subscriber was deleted. Reconnecting is the client's choice: it
    /// would take the subscriber back.
    pub const TAKEN_OVER: u16 = 4004;
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON, not an object, no `type`, or a field is wrong, missing or unknown.
    Invalid(String),
    /// A `type` this protocol version does not know.
    UnknownType(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Invalid(detail) => write!(f, "invalid frame: {detail}"),
            FrameError::UnknownType(kind) => write!(f, "unknown frame type {kind:?}"),
        }
    }
}

impl std::error::Error for FrameError {}

#[derive(Deserialize)]
struct TypeTag {
    #[serde(rename = "type")]
    kind: String,
}

/// Reads the `type`, then decodes the whole object as `T` (with the `type` field skipped by
/// `T`'s own `kind` field).
fn decode<T: DeserializeOwned>(text: &str) -> Result<T, FrameError> {
    serde_json::from_str(text).map_err(|error| FrameError::Invalid(error.to_string()))
}

fn type_of(text: &str) -> Result<String, FrameError> {
    serde_json::from_str::<TypeTag>(text)
        .map(|tag| tag.kind)
        .map_err(|error| {
            FrameError::Invalid(format!(
                "a frame is a JSON object with a string \"type\": {error}"
            ))
        })
}

// ---------------------------------------------------------------------------------------------
// Client to server
// ---------------------------------------------------------------------------------------------

/// Credentials in `connect`. Exactly one of `key` (an API key) or `token` (a JWT, issue #7)
/// is expected; a connection whose upgrade request already carried `Authorization: Bearer`
/// may omit `auth`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The first frame of every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connect {
    #[serde(rename = "type")]
    pub kind: ConnectTag,
    /// The protocol version the client speaks (1).
    pub protocol: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    /// Free text naming the client software, for logs (`herald-client/0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// Subscribe to one channel. A connection holds at most one subscription per channel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    #[serde(rename = "type")]
    pub kind: SubscribeTag,
    /// Client request id, echoed in the reply (`subscribed` or `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    pub channel: String,
    /// `"at-most-once"`, `"exactly-once"` (default) or `"at-least-once"` (needs
    /// `subscriber_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guarantee: Option<String>,
    /// At-least-once: the durable subscriber's name, unique per channel. The server keeps its
    /// acknowledged position; a later subscribe with the same id continues from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_id: Option<String>,
    /// At-least-once: how the subscriber is served. Taken when the subscriber is created;
    /// an existing subscriber keeps its stored options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<DurableOptions>,
    /// Resume after this position (exactly-once only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Start with the last N messages (exactly-once only; not with `from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewind: Option<u64>,
    /// Deliver `hint` frames (`{channel, serial, epoch, position}`) instead of messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<bool>,
    /// A CEL expression over `name` (string, `""` when absent) and `headers` (map of strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    #[serde(rename = "type")]
    pub kind: UnsubscribeTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    pub channel: String,
}

/// Publish one message; answered by `ack` or `nack` with the same `req`. The message fields
/// repeat [`PublishMessage`]'s rather than flatten it: serde cannot reject unknown fields
/// through `flatten`, and a typo must be an error here as on the HTTP API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    #[serde(rename = "type")]
    pub kind: PublishTag,
    pub req: u64,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    pub data: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Ttl>,
}

impl Publish {
    /// The message part, in the form the HTTP API uses.
    pub fn into_message(self) -> (String, PublishMessage) {
        (
            self.channel,
            PublishMessage {
                id: self.id,
                name: self.name,
                headers: self.headers,
                data: self.data,
                encoding: self.encoding,
                ttl: self.ttl,
            },
        )
    }
}

/// Options of a new at-least-once subscriber; each one absent takes the server's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DurableOptions {
    /// Messages delivered and not yet acked, at most (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inflight_max: Option<u32>,
    /// A delivery not acked within this time is delivered again (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_wait_ms: Option<u64>,
    /// Deliveries of one message before it goes to the dead-letter channel (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliveries: Option<u32>,
    /// The subscriber is removed after this long without a connection (default 7 days;
    /// 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after_ms: Option<u64>,
}

/// At-least-once: acknowledges deliveries of a durable subscription. Exactly one of `through`
/// (cumulative: every serial up to this position) and `position` (this one serial).
/// Answered by `acked` once the ack is durable when `req` is given; an ack that cannot apply
/// gets an `error` (`invalid_ack`) either way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckDeliveries {
    #[serde(rename = "type")]
    pub kind: AckDeliveriesTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

/// Application-level ping; answered by `pong` with the same `req`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    #[serde(rename = "type")]
    pub kind: PingTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
}

/// Every frame a client may send.
#[derive(Clone, Debug)]
pub enum ClientFrame {
    Connect(Connect),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Publish(Publish),
    Ping(Ping),
    Ack(AckDeliveries),
}

impl ClientFrame {
    pub fn from_json(text: &str) -> Result<ClientFrame, FrameError> {
        match type_of(text)?.as_str() {
            "connect" => decode(text).map(ClientFrame::Connect),
            "subscribe" => decode(text).map(ClientFrame::Subscribe),
            "unsubscribe" => decode(text).map(ClientFrame::Unsubscribe),
            "publish" => decode(text).map(ClientFrame::Publish),
            "ping" => decode(text).map(ClientFrame::Ping),
            "ack" => decode(text).map(ClientFrame::Ack),
            other => Err(FrameError::UnknownType(other.to_owned())),
        }
    }

    pub fn to_json(&self) -> String {
        let result = match self {
            ClientFrame::Connect(frame) => serde_json::to_string(frame),
            ClientFrame::Subscribe(frame) => serde_json::to_string(frame),
            ClientFrame::Unsubscribe(frame) => serde_json::to_string(frame),
            ClientFrame::Publish(frame) => serde_json::to_string(frame),
            ClientFrame::Ping(frame) => serde_json::to_string(frame),
            ClientFrame::Ack(frame) => serde_json::to_string(frame),
        };
        result.expect("client frames serialise")
    }

    /// The client request id, when the frame has one.
    pub fn req(&self) -> Option<u64> {
        match self {
            ClientFrame::Connect(_) => None,
            ClientFrame::Subscribe(frame) => frame.req,
            ClientFrame::Unsubscribe(frame) => frame.req,
            ClientFrame::Publish(frame) => Some(frame.req),
            ClientFrame::Ping(frame) => frame.req,
            ClientFrame::Ack(frame) => frame.req,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server to client
// ---------------------------------------------------------------------------------------------

/// The answer to `connect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connected {
    #[serde(rename = "type")]
    pub kind: ConnectedTag,
    pub protocol: u32,
    /// A server-chosen id for this connection, for logs and support.
    pub connection: String,
    /// How often the server sends `heartbeat`; a client that hears nothing for about twice
    /// this long should assume the connection is dead and reconnect.
    pub heartbeat_ms: u64,
    pub limits: ConnectionLimits,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    pub frame_bytes: usize,
    pub subscriptions: usize,
}

/// How a subscription starts relative to what the subscriber asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Continuity {
    /// No `from` was given: delivery starts live (or with the `rewind` messages).
    New,
    /// `from` was honoured: everything after it follows, with no gap.
    Held,
    /// `from` could not be honoured: a `continuity_lost` notice with the missed range follows
    /// before any message.
    Lost,
}

/// The answer to `subscribe`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribed {
    #[serde(rename = "type")]
    pub kind: SubscribedTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    pub channel: String,
    /// The granted guarantee.
    pub guarantee: String,
    pub hints: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub continuity: Continuity,
    /// Deliveries start right after this position (`EPOCH:0` for the start of a stream).
    /// Absent for a channel that has no messages yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// The channel's newest position when the subscription started (absent: no messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribed {
    #[serde(rename = "type")]
    pub kind: UnsubscribedTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    pub channel: String,
}

/// A publish was durably stored (or was a duplicate of a stored one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    #[serde(rename = "type")]
    pub kind: AckTag,
    pub req: u64,
    pub id: String,
    pub serial: u64,
    pub epoch: String,
    pub position: String,
    pub duplicate: bool,
}

/// A publish was refused; nothing was stored (for `timeout` and `storage_failed`: maybe, so
/// retry with the same id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nack {
    #[serde(rename = "type")]
    pub kind: NackTag,
    pub req: u64,
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// One message delivered to a subscription: the same JSON as the HTTP API's message plus
/// `"type": "message"` (see [`delivery_json`]).
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: MessageBody,
    /// At-least-once only: how many times this message has been delivered to this subscriber
    /// (1 the first time). Absent for the other guarantees.
    pub delivery: Option<u32>,
}

/// At-least-once: the acks of the `ack` frame with this `req` are durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acked {
    #[serde(rename = "type")]
    pub kind: AckedTag,
    pub req: u64,
    pub channel: String,
}

/// At-least-once: the TTL of the messages `from..=to` ran out before they were acked. They
/// count as done: they will not be delivered again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpiredNotice {
    #[serde(rename = "type")]
    pub kind: ExpiredTag,
    pub channel: String,
    pub from: String,
    pub to: String,
}

/// A hint: a message exists at this position; fetch it through the sync API if needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hint {
    #[serde(rename = "type")]
    pub kind: HintTag,
    pub channel: String,
    pub serial: u64,
    pub epoch: String,
    pub position: String,
}

/// Sent every `heartbeat_ms`: each subscribed channel's newest durable position (null for a
/// channel with no messages). A subscriber whose own position stays behind a `top` it saw in
/// an earlier heartbeat is missing messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(rename = "type")]
    pub kind: HeartbeatTag,
    /// Server time, milliseconds since the Unix epoch.
    pub time: u64,
    pub channels: BTreeMap<String, Option<String>>,
}

/// The subscription's position could not be honoured; serials `from..=to` are missed (`from`
/// may be in an older epoch than `to`). Delivery continues right after `to`. `to` is absent
/// when the channel has no messages at all: delivery starts with its first message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContinuityLostNotice {
    #[serde(rename = "type")]
    pub kind: ContinuityLostTag,
    pub channel: String,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `retention`, `epoch_changed` or `ahead_of_top`.
    pub reason: String,
}

/// At-most-once: serials `from..=to` were dropped because the subscriber could not keep up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapNotice {
    #[serde(rename = "type")]
    pub kind: GapTag,
    pub channel: String,
    pub from: String,
    pub to: String,
    /// `slow_consumer`.
    pub reason: String,
}

/// Serials `from..=to` exist but are not for this subscription: `filtered` (the filter
/// rejected them) or `expired` (their TTL ran out before they could be delivered). Nothing
/// was lost; the subscription's position moves to `to`. `chain` is the chain hash at `to`
/// when known, so a receiver can keep checking the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipNotice {
    #[serde(rename = "type")]
    pub kind: SkipTag,
    pub channel: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
}

/// Something went wrong with a frame (not a publish: those get `nack`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorFrame {
    #[serde(rename = "type")]
    pub kind: ErrorTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    /// The channel concerned, for errors about a subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pong {
    #[serde(rename = "type")]
    pub kind: PongTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
}

/// Every frame a server may send.
#[derive(Clone, Debug)]
pub enum ServerFrame {
    Connected(Connected),
    Subscribed(Subscribed),
    Unsubscribed(Unsubscribed),
    Ack(Ack),
    Nack(Nack),
    Message(Box<Delivery>),
    Hint(Hint),
    Heartbeat(Heartbeat),
    ContinuityLost(ContinuityLostNotice),
    Gap(GapNotice),
    Skip(SkipNotice),
    Error(ErrorFrame),
    Pong(Pong),
    Acked(Acked),
    Expired(ExpiredNotice),
}

impl ServerFrame {
    pub fn from_json(text: &str) -> Result<ServerFrame, FrameError> {
        match type_of(text)?.as_str() {
            "connected" => decode(text).map(ServerFrame::Connected),
            "subscribed" => decode(text).map(ServerFrame::Subscribed),
            "unsubscribed" => decode(text).map(ServerFrame::Unsubscribed),
            "ack" => decode(text).map(ServerFrame::Ack),
            "nack" => decode(text).map(ServerFrame::Nack),
            // `flatten` cannot carry RawValue either: decode the body, then tag it.
            "message" => {
                #[derive(Deserialize)]
                struct DeliveryCount {
                    delivery: Option<u32>,
                }
                let message = decode::<MessageBody>(text)?;
                let DeliveryCount { delivery } = decode(text)?;
                Ok(ServerFrame::Message(Box::new(Delivery {
                    message,
                    delivery,
                })))
            }
            "hint" => decode(text).map(ServerFrame::Hint),
            "heartbeat" => decode(text).map(ServerFrame::Heartbeat),
            "continuity_lost" => decode(text).map(ServerFrame::ContinuityLost),
            "gap" => decode(text).map(ServerFrame::Gap),
            "skip" => decode(text).map(ServerFrame::Skip),
            "error" => decode(text).map(ServerFrame::Error),
            "pong" => decode(text).map(ServerFrame::Pong),
            "acked" => decode(text).map(ServerFrame::Acked),
            "expired" => decode(text).map(ServerFrame::Expired),
            other => Err(FrameError::UnknownType(other.to_owned())),
        }
    }

    pub fn to_json(&self) -> String {
        let result = match self {
            ServerFrame::Connected(frame) => serde_json::to_string(frame),
            ServerFrame::Subscribed(frame) => serde_json::to_string(frame),
            ServerFrame::Unsubscribed(frame) => serde_json::to_string(frame),
            ServerFrame::Ack(frame) => serde_json::to_string(frame),
            ServerFrame::Nack(frame) => serde_json::to_string(frame),
            ServerFrame::Message(frame) => {
                let json = delivery_json(&frame.message);
                return match frame.delivery {
                    Some(count) => with_delivery_count(&json, count),
                    None => json,
                };
            }
            ServerFrame::Hint(frame) => serde_json::to_string(frame),
            ServerFrame::Heartbeat(frame) => serde_json::to_string(frame),
            ServerFrame::ContinuityLost(frame) => serde_json::to_string(frame),
            ServerFrame::Gap(frame) => serde_json::to_string(frame),
            ServerFrame::Skip(frame) => serde_json::to_string(frame),
            ServerFrame::Error(frame) => serde_json::to_string(frame),
            ServerFrame::Pong(frame) => serde_json::to_string(frame),
            ServerFrame::Acked(frame) => serde_json::to_string(frame),
            ServerFrame::Expired(frame) => serde_json::to_string(frame),
        };
        result.expect("server frames serialise")
    }
}

/// The `message` frame for a stored message: `{"type":"message", ...MessageBody}`. The server
/// encodes this once per message and sends the same bytes to every subscriber.
pub fn delivery_json(message: &MessageBody) -> String {
    let body = serde_json::to_string(message).expect("a message body serialises");
    // `{"id":...}` becomes `{"type":"message","id":...}`: no second pass over the data.
    let mut text = String::with_capacity(body.len() + 17);
    text.push_str(MESSAGE_PREFIX);
    text.push_str(&body[1..]);
    text
}

const MESSAGE_PREFIX: &str = "{\"type\":\"message\",";

/// An at-least-once delivery: the shared `message` frame of [`delivery_json`] with
/// `"delivery":N` spliced in after the type (one copy, no re-encoding of the message).
pub fn with_delivery_count(message_json: &str, count: u32) -> String {
    let body = message_json
        .strip_prefix(MESSAGE_PREFIX)
        .expect("a frame made by delivery_json");
    let mut text = String::with_capacity(message_json.len() + 16);
    text.push_str(MESSAGE_PREFIX);
    text.push_str("\"delivery\":");
    text.push_str(&count.to_string());
    text.push(',');
    text.push_str(body);
    text
}

/// What a `subscribed` reply echoes of the request.
#[derive(Clone, Debug)]
pub struct SubscribeEcho {
    pub req: Option<u64>,
    pub guarantee: String,
    pub hints: bool,
    pub filter: Option<String>,
}

/// The frame for what a subscription machine sends, except deliveries, which each transport
/// encodes its own way (shared bytes, hints): those come back as `Err(message)`.
pub fn subscription_frame<M>(
    channel: &str,
    outbound: herald_core::engine::Outbound<M>,
    echo: &SubscribeEcho,
) -> Result<ServerFrame, M> {
    use herald_core::engine::Outbound;
    let channel = channel.to_owned();
    Ok(match outbound {
        Outbound::Delivery(message) => return Err(message),
        Outbound::Subscribed {
            continuity,
            after,
            top,
        } => subscribed_frame(channel, echo, continuity, after, top),
        Outbound::ContinuityLost { from, to, reason } => {
            continuity_lost_frame(channel, &from, to.as_ref(), reason)
        }
        Outbound::Gap { from, to } => ServerFrame::Gap(GapNotice {
            kind: GapTag::Tag,
            channel,
            from: from.to_string(),
            to: to.to_string(),
            reason: "slow_consumer".to_owned(),
        }),
        Outbound::Skip {
            from,
            to,
            cause,
            chain,
        } => ServerFrame::Skip(SkipNotice {
            kind: SkipTag::Tag,
            channel,
            from: from.to_string(),
            to: to.to_string(),
            reason: cause.as_str().to_owned(),
            chain: chain.map(|chain| chain.to_hex()),
        }),
    })
}

/// The frame for what a durable (at-least-once) machine sends, except deliveries (the
/// transport adds the count to the shared bytes): those come back as `Err((message, count))`.
pub fn durable_frame<M>(
    channel: &str,
    outbound: herald_core::engine::DurableOutbound<M>,
    echo: &SubscribeEcho,
) -> Result<ServerFrame, (M, u32)> {
    use herald_core::engine::DurableOutbound;
    let channel = channel.to_owned();
    Ok(match outbound {
        DurableOutbound::Delivery {
            message,
            delivery_count,
        } => return Err((message, delivery_count)),
        DurableOutbound::Subscribed {
            continuity,
            after,
            top,
        } => subscribed_frame(channel, echo, continuity, after, top),
        DurableOutbound::ContinuityLost { from, to, reason } => {
            continuity_lost_frame(channel, &from, to.as_ref(), reason)
        }
        DurableOutbound::Expired { from, to } => ServerFrame::Expired(ExpiredNotice {
            kind: ExpiredTag::Tag,
            channel,
            from: from.to_string(),
            to: to.to_string(),
        }),
    })
}

fn subscribed_frame(
    channel: String,
    echo: &SubscribeEcho,
    continuity: herald_core::engine::Continuity,
    after: Option<Position>,
    top: Option<Position>,
) -> ServerFrame {
    use herald_core::engine::Continuity as MachineContinuity;
    ServerFrame::Subscribed(Subscribed {
        kind: SubscribedTag::Tag,
        req: echo.req,
        channel,
        guarantee: echo.guarantee.clone(),
        hints: echo.hints,
        filter: echo.filter.clone(),
        continuity: match continuity {
            MachineContinuity::New => Continuity::New,
            MachineContinuity::Held => Continuity::Held,
            MachineContinuity::Lost => Continuity::Lost,
        },
        after: after.map(|position| position.to_string()),
        top: top.map(|position| position.to_string()),
    })
}

fn continuity_lost_frame(
    channel: String,
    from: &Position,
    to: Option<&Position>,
    reason: herald_core::ContinuityReason,
) -> ServerFrame {
    ServerFrame::ContinuityLost(ContinuityLostNotice {
        kind: ContinuityLostTag::Tag,
        channel,
        from: from.to_string(),
        to: to.map(ToString::to_string),
        reason: reason.as_str().to_owned(),
    })
}

// One unit enum per frame type: `"type"` must be exactly that string, and serialising writes it.
macro_rules! frame_tags {
    ($($tag:ident => $name:literal),* $(,)?) => {
        $(
            #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
            pub enum $tag {
                #[default]
                #[serde(rename = $name)]
                Tag,
            }
        )*
    };
}

frame_tags! {
    ConnectTag => "connect",
    SubscribeTag => "subscribe",
    UnsubscribeTag => "unsubscribe",
    PublishTag => "publish",
    PingTag => "ping",
    ConnectedTag => "connected",
    SubscribedTag => "subscribed",
    UnsubscribedTag => "unsubscribed",
    AckTag => "ack",
    NackTag => "nack",
    HintTag => "hint",
    HeartbeatTag => "heartbeat",
    ContinuityLostTag => "continuity_lost",
    GapTag => "gap",
    SkipTag => "skip",
    ErrorTag => "error",
    PongTag => "pong",
    AckDeliveriesTag => "ack",
    AckedTag => "acked",
    ExpiredTag => "expired",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_round_trip_and_keep_raw_data() {
        let text = r#"{"type":"publish","req":7,"channel":"chat:a","data":{"n":1.50}}"#;
        let ClientFrame::Publish(publish) = ClientFrame::from_json(text).unwrap() else {
            panic!("not a publish");
        };
        assert_eq!(publish.req, 7);
        assert_eq!(publish.data.get(), r#"{"n":1.50}"#);
        let again = ClientFrame::Publish(publish).to_json();
        assert_eq!(again, text);
    }

    #[test]
    fn unknown_fields_and_types_are_told_apart() {
        let unknown_field = r#"{"type":"subscribe","channel":"a","form":"x"}"#;
        assert!(matches!(
            ClientFrame::from_json(unknown_field),
            Err(FrameError::Invalid(_))
        ));
        assert_eq!(
            ClientFrame::from_json(r#"{"type":"dance"}"#).unwrap_err(),
            FrameError::UnknownType("dance".into())
        );
        assert!(matches!(
            ClientFrame::from_json("[1,2]"),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            ClientFrame::from_json(r#"{"type":"subscribe"}"#),
            Err(FrameError::Invalid(_))
        ));
    }

    #[test]
    fn a_delivery_is_tagged_and_decodes_back() {
        let body: MessageBody = serde_json::from_str(
            r#"{"id":"m1","channel":"c","serial":3,"epoch":"E","position":"E:3","prev":2,"chain":"ab","time":5,"data":[1, 2]}"#,
        )
        .unwrap();
        let text = delivery_json(&body);
        assert!(text.starts_with(r#"{"type":"message","id":"m1""#), "{text}");
        let ServerFrame::Message(delivery) = ServerFrame::from_json(&text).unwrap() else {
            panic!("not a message");
        };
        assert_eq!(delivery.message.serial, 3);
        assert_eq!(delivery.message.data.get(), "[1, 2]");
    }

    #[test]
    fn an_at_least_once_delivery_carries_its_count() {
        let body: MessageBody = serde_json::from_str(
            r#"{"id":"m1","channel":"c","serial":3,"epoch":"E","position":"E:3","prev":2,"chain":"ab","time":5,"data":{"k":1}}"#,
        )
        .unwrap();
        let text = with_delivery_count(&delivery_json(&body), 4);
        assert!(
            text.starts_with(r#"{"type":"message","delivery":4,"id":"m1""#),
            "{text}"
        );
        let ServerFrame::Message(delivery) = ServerFrame::from_json(&text).unwrap() else {
            panic!("not a message");
        };
        assert_eq!(delivery.delivery, Some(4));
        assert_eq!(delivery.message.data.get(), r#"{"k":1}"#);
        assert_eq!(ServerFrame::Message(delivery).to_json(), text);
        let plain = ServerFrame::from_json(&delivery_json(&body)).unwrap();
        assert!(matches!(plain, ServerFrame::Message(d) if d.delivery.is_none()));
    }

    #[test]
    fn ack_frames_decode_with_either_form() {
        let text = r#"{"type":"ack","req":9,"channel":"c","through":"E:4"}"#;
        let ClientFrame::Ack(ack) = ClientFrame::from_json(text).unwrap() else {
            panic!("not an ack");
        };
        assert_eq!(ack.through.as_deref(), Some("E:4"));
        assert_eq!(ClientFrame::Ack(ack).to_json(), text);
        assert!(matches!(
            ClientFrame::from_json(r#"{"type":"ack","channel":"c","serial":4}"#),
            Err(FrameError::Invalid(_))
        ));
    }

    #[test]
    fn tags_must_match_the_frame() {
        let frame = ServerFrame::Pong(Pong {
            kind: PongTag::Tag,
            req: Some(1),
        });
        assert_eq!(frame.to_json(), r#"{"type":"pong","req":1}"#);
        assert!(serde_json::from_str::<Pong>(r#"{"type":"ping","req":1}"#).is_err());
    }
}
