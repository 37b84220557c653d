//! # herald-mqtt
//!
//! MQTT 3.1.1 and 5.0 for Herald, sans-IO: no runtime, no sockets, no clock, no randomness.
//! The server's listener (herald-server `mqtt`) decodes bytes with [`codec`] (rmqtt-codec,
//! re-exported so both sides use the same version), feeds packets to a [`Session`] and carries
//! out the [`Action`]s it returns.
//!
//! # Layout
//! - [`decoder`]: bytes to packets (the CONNECT's protocol level picks the codec).
//! - [`topic`]: topic name and filter validation, the topic <-> channel mapping, matching.
//! - [`session`]: one connection's protocol state machine (CONNECT, QoS 0/1/2 flows,
//!   SUBSCRIBE/UNSUBSCRIBE, the outbound window, protocol violations, persistent sessions
//!   and their stored record).
//!
//! # Invariants
//! - A PUBLISH is acknowledged (PUBACK/PUBREC) only after its append was answered durable.
//! - QoS 2: one append per packet id until PUBREL, within a connection, and across
//!   connections and crashes for a persistent session (its message id is recorded first).
//! - A persistent session's state is durable before any packet that depends on it leaves.
//! - Nothing panics on client input: every violation becomes a close with a reason code.

pub mod decoder;
pub mod session;
pub mod topic;

pub use decoder::PacketDecoder;
pub use rmqtt_codec as codec;
pub use session::{
    Action, AppendOutcome, AppendToken, AuthRefusal, CloseReason, HEADER_QOS, HEADER_RETAIN,
    Packet, Session, SessionConfig, Version, Will,
};
pub use topic::{TopicError, TopicFilter, channel_to_topic, publish_channel, topic_to_channel};
