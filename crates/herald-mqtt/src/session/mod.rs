//! One MQTT connection's protocol state, sans-IO: decoded packets and driver answers in,
//! [`Action`]s out.
//!
//! # Call order
//! 1. [`Session::new`] with the connection's unique id (from the driver: no randomness here).
//! 2. For every decoded packet, [`Session::handle_packet`]; for a decode error,
//!    [`Session::handle_decode_error`]; when the keep-alive timer ([`Session::keep_alive_timeout_ms`])
//!    runs out, [`Session::handle_keep_alive_timeout`]; on server shutdown,
//!    [`Session::handle_shutdown`].
//! 3. After each input, drain [`Session::poll_action`] until `None` and carry the actions out
//!    in order. Requests come back as answers: [`Action::Authenticate`] ->
//!    [`Session::handle_authenticated`], [`Action::AuthorizeSubscribe`] ->
//!    [`Session::handle_subscribe_authorized`], [`Action::Append`] ->
//!    [`Session::handle_appended`] (in any order, each exactly once),
//!    [`Action::OpenSession`] -> [`Session::handle_session_opened`], [`Action::SaveSession`]
//!    -> [`Session::handle_session_saved`] (any order), [`Action::ListChannels`] ->
//!    [`Session::handle_channels_listed`], [`Action::ReadChannel`] ->
//!    [`Session::handle_channel_read`], [`Action::ReadForResend`] ->
//!    [`Session::handle_resend_read`].
//! 4. Messages of subscribed channels go in through [`Session::handle_delivery`] (the driver
//!    feeds each durable message of a matching channel once; the session picks the QoS).
//!    [`Action::SendRetained`] asks for the retained messages of a new subscription's filter:
//!    the driver hands each to [`Session::handle_retained`].
//! 5. After [`Action::Close`] the driver closes the socket; later inputs are ignored. Then
//!    [`Session::session_end`] says what becomes of a stored session.
//!
//! # Contracts
//! - PUBACK (QoS 1) and PUBREC (QoS 2) are sent only after the append was answered
//!   [`AppendOutcome::Durable`].
//! - QoS 2 is exactly once per packet id within the connection: a PUBLISH with a packet id
//!   that is being appended or awaits PUBREL is not appended again (it gets the PUBREC).
//! - Message ids are deterministic: `mqtt-<connection id>-<sequence>`, the sequence counting
//!   the connection's PUBLISH packets; a re-sent packet id keeps its first id, so even a
//!   repeated append would be deduplicated by the store.
//! - The publisher's QoS is stored in the header [`HEADER_QOS`] and the retain flag in
//!   [`HEADER_RETAIN`]; a delivery is sent at min(stored QoS, subscription QoS), where a
//!   message without the header (published over HTTP or WebSocket) counts as QoS 2.
//! - Retained messages: a retained PUBLISH is stored like any other (with [`HEADER_RETAIN`];
//!   an empty one clears the topic's retained message); which message is retained per topic is
//!   the driver's index. A new subscription gets the retained messages of its filter with
//!   RETAIN = 1 (v5 Retain Handling 1 and 2 respected); live deliveries have RETAIN = 0 unless
//!   the v5 subscription asked for Retain As Published.
//! - Each message is delivered once per connection, at the highest QoS of the matching
//!   subscriptions (MQTT-3.3.4-2 allows it; overlapping filters do not duplicate).
//! - Every queue is bounded: inbound QoS 1/2 publishes by `receive_maximum` in v5 (exceeding
//!   it is a protocol violation, reason 0x93) and by the packet id space in v3 (which has no
//!   way to tell the client a limit: the driver pauses reading instead), outbound ones by the
//!   window (the client's Receive Maximum in v5, capped by `outbound_inflight_max`), then
//!   `outbound_pending_max` deliveries wait; more are dropped and counted
//!   ([`Session::deliveries_dropped`]). A persistent session queues nothing: what does not fit
//!   the window stays in the log; the packets held for its next save are bounded by
//!   [`HELD_PACKETS_MAX`].
//! - Bad input never panics: protocol violations end with [`Action::Close`] and, on a v5
//!   connection past CONNACK, a DISCONNECT with the reason code first.
//! - Persistent sessions (see `persistent`): nothing that depends on a change of the stored
//!   state leaves before that change is durable, and what the session owes is read from the
//!   log, never queued (so never dropped).
//!
//! # Layout
//! This file owns the public types, the [`Session`] state, the dispatch of packets by phase
//! and version, and the endings (every close goes through one place). The flows live in
//! `impl Session` blocks of their own files, each with its private state types:
//! - `connect`: CONNECT, authentication, CONNACK, packets sent before CONNACK.
//! - `inbound`: the client's PUBLISH at QoS 0/1/2, PUBREL, append answers.
//! - `subscriptions`: SUBSCRIBE (authorization, quota, retained requests), UNSUBSCRIBE.
//! - `outbound`: deliveries, packet ids, the inflight window and its bounded queue.
//! - `aliases`: the topic aliases the server uses on its PUBLISH packets (v5).
//! - `reasons`: the v3/v5 reason codes of refusals (pure mappings), and which v5 Reason
//!   Strings the client may get.
//! - `will`: will messages, published when the connection ends without a clean DISCONNECT.
//! - `persistent`: stored sessions: resume, write-ahead saves, deliveries from the log.
//! - `stored`: the stored record and its encoding.
//!
//! # Limits
//! A shared subscription's deliveries are not part of a persistent session's stored state:
//! one in flight when the connection ends is not sent again.

mod aliases;
mod connect;
mod inbound;
mod outbound;
mod persistent;
mod reasons;
mod stored;
mod subscriptions;
mod will;

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU16;

use bytes::Bytes;
use herald_core::{ChannelName, NewMessage, Position};
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode, ToReasonCode as _};

use crate::topic::TopicFilter;

use aliases::OutboundAliases;
use connect::Connecting;
pub use connect::SessionOpenError;
use inbound::Inbound;
use outbound::{Delivery, Outbound};
use persistent::Persistence;
pub use persistent::{ChannelRead, HELD_PACKETS_MAX, ReadStart, SessionEnd};
pub use stored::{
    SESSION_KEY_PREFIX, STORED_SESSION_FORMAT, StoredInbound, StoredOutbound, StoredSession,
    StoredSessionError, StoredSubscription, session_key,
};
use subscriptions::{PendingSubscribe, Subscription};
pub use will::Will;

/// Header holding the publisher's QoS (`0`, `1` or `2`) of a message published over MQTT.
pub const HEADER_QOS: &str = "mqtt-qos";
/// Header present (`1`) when the publisher set the retain flag.
pub const HEADER_RETAIN: &str = "mqtt-retain";
/// Longest client id accepted, in bytes (the spec requires servers to take 23).
pub const CLIENT_ID_BYTES_MAX: usize = 256;
/// Packets a client may send after CONNECT before the CONNACK; more close the connection.
pub const EARLY_PACKETS_MAX: usize = 32;
/// SUBSCRIBE packets awaiting their authorization at once.
pub const PENDING_SUBSCRIBES_MAX: usize = 16;

/// Per-connection limits, set by the server's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// QoS 1/2 PUBLISH packets a v5 client may have unacknowledged (its Receive Maximum). v3
    /// clients cannot be told a limit; their driver applies backpressure instead.
    pub receive_maximum: u16,
    /// Outbound QoS 1/2 deliveries awaiting the client's acknowledgement, at most (v3, and the
    /// cap on a v5 client's Receive Maximum).
    pub outbound_inflight_max: u16,
    /// Deliveries waiting for a free slot in the outbound window; beyond it they are dropped
    /// and counted.
    pub outbound_pending_max: usize,
    /// Longest keep alive granted, in seconds. v5 clients asking for more (or for 0) are told
    /// this value as Server Keep Alive; v3 clients are held to it without being told.
    pub keep_alive_max_secs: u16,
    /// Largest packet accepted (advertised to v5 clients as Maximum Packet Size; the driver's
    /// decoder enforces it).
    pub max_packet_bytes: u32,
    /// Subscriptions per connection.
    pub subscriptions_max: usize,
    /// Topic aliases a v5 client may set for its PUBLISH packets (Topic Alias Maximum; 0: none).
    pub topic_alias_maximum: u16,
    /// Longest a persistent session outlives its connection, in seconds: caps a v5 Session
    /// Expiry Interval, and is what a v3 `clean_session = 0` session gets. 0: every session
    /// is clean.
    pub session_expiry_max_secs: u32,
    /// Topic aliases the server uses on its PUBLISH packets to a v5 client, at most (also
    /// capped by the client's Topic Alias Maximum; 0: never).
    pub outbound_topic_alias_maximum: u16,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            receive_maximum: 64,
            outbound_inflight_max: 64,
            outbound_pending_max: 1024,
            keep_alive_max_secs: 300,
            max_packet_bytes: 1024 * 1024,
            subscriptions_max: 100,
            topic_alias_maximum: 32,
            session_expiry_max_secs: 7 * 24 * 3600,
            outbound_topic_alias_maximum: 32,
        }
    }
}

/// A decoded packet of either protocol version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    V3(v3::Packet),
    V5(v5::Packet),
}

/// The protocol version a connection speaks, fixed by its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V3,
    V5,
}

/// Identifies one [`Action::Append`] in its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AppendToken {
    sequence: u64,
    packet_id: Option<NonZeroU16>,
}

/// How an append ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Durable in the log (or a duplicate of a durable message).
    Durable,
    /// The credentials may not publish to the channel.
    NotAuthorized,
    /// The message breaks a limit (size, TTL bounds).
    Invalid(String),
    /// The store is overloaded; nothing was stored.
    Overloaded,
    /// The store failed or is closed; the outcome may be unknown.
    Failed(String),
}

/// Why a CONNECT's credentials were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthRefusal {
    /// Unknown key, or a key was required and none was given.
    BadCredentials,
    NotAuthorized,
}

/// Why the connection ends, for logs and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    /// The v5 reason code (sent to v5 clients past CONNACK; also used to classify v3 closes).
    pub code: DisconnectReasonCode,
    pub detail: String,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send(Packet),
    /// Check the credentials, answer with [`Session::handle_authenticated`]. The username is
    /// informational; the password is the API key.
    Authenticate {
        client_id: String,
        username: Option<String>,
        password: Option<Bytes>,
    },
    /// Check that the connection may subscribe to each filter, answer with
    /// [`Session::handle_subscribe_authorized`] (one `bool` per filter, same order).
    AuthorizeSubscribe {
        packet_id: NonZeroU16,
        filters: Vec<TopicFilter>,
    },
    /// Authorize (publish) and append the message, answer with [`Session::handle_appended`].
    Append {
        token: AppendToken,
        channel: ChannelName,
        message: NewMessage,
    },
    /// Start feeding messages of channels matching `filter` (replaces an equal filter).
    Subscribe {
        filter: TopicFilter,
        qos: QoS,
    },
    /// Stop feeding messages for `filter`.
    Unsubscribe {
        filter: TopicFilter,
    },
    /// Join the shared subscription group (`share`, `filter`): the group's messages are
    /// spread over its members, and this connection's share comes to
    /// [`Session::handle_shared_delivery`] under `key` (the subscription's full text).
    /// Replaces an equal subscription.
    SubscribeShared {
        key: String,
        share: String,
        filter: TopicFilter,
    },
    /// Leave the shared subscription group of `key`.
    UnsubscribeShared {
        key: String,
    },
    /// Hand every retained message whose channel matches `filter` (and that the connection may
    /// read) to [`Session::handle_retained`] with this filter.
    SendRetained {
        filter: TopicFilter,
    },
    /// Publish the connection's will (authorized and appended like a PUBLISH of the
    /// connection, even though the connection is ending); no answer.
    PublishWill(Will),
    /// Claim the client id (a connection holding it is taken over: it ends and saves its
    /// session first), then load its stored session; answer with
    /// [`Session::handle_session_opened`]. `clean`: discard the stored session (answer
    /// `None`).
    OpenSession {
        client_id: String,
        clean: bool,
    },
    /// Persist the session's state; answer with [`Session::handle_session_saved`].
    SaveSession {
        generation: u64,
        state: StoredSession,
    },
    /// List the stored channels matching any of `filters`; answer with
    /// [`Session::handle_channels_listed`].
    ListChannels {
        filters: Vec<TopicFilter>,
    },
    /// Read at most `limit` messages of `channel` (of those the connection may read); answer
    /// with [`Session::handle_channel_read`].
    ReadChannel {
        channel: ChannelName,
        from: ReadStart,
        limit: usize,
    },
    /// Read the message at `position` to send it again; answer with
    /// [`Session::handle_resend_read`].
    ReadForResend {
        packet_id: NonZeroU16,
        channel: ChannelName,
        position: Position,
    },
    /// The session's position on `channel` (`after`) is no longer retained: it continues
    /// after `resume_after`. For logs and counters; no answer.
    ContinuityLost {
        channel: ChannelName,
        after: Option<Position>,
        resume_after: Position,
    },
    /// Close the network connection.
    Close(CloseReason),
}

#[derive(Clone, Debug)]
enum Phase {
    AwaitingConnect,
    Authenticating {
        connecting: Box<Connecting>,
        early: VecDeque<Packet>,
    },
    /// Authenticated; waiting for [`Session::handle_session_opened`].
    Opening {
        connecting: Box<Connecting>,
        early: VecDeque<Packet>,
    },
    Connected,
    Closed,
}

/// The state machine of one MQTT connection. See the module docs for the call order.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    connection_id: String,
    /// Message ids of this connection start with it (used for v5 No Local).
    id_prefix: String,
    /// The will of the CONNECT, until the connection ends.
    will: Option<Will>,
    phase: Phase,
    version: Version,
    client_id: String,
    keep_alive_secs: u16,
    outbound_window: u16,
    /// The client's Maximum Packet Size (v5), known from its CONNECT.
    peer_max_packet_bytes: Option<u32>,
    /// v5 Request Problem Information (default true): when false, Reason Strings go only on
    /// CONNACK and DISCONNECT (MQTT-3.1.2-29).
    peer_wants_problem_info: bool,
    /// The aliases of the server's PUBLISH packets on this connection (v5).
    outbound_aliases: OutboundAliases,
    subscriptions: BTreeMap<String, Subscription>,
    pending_subscribes: BTreeMap<NonZeroU16, PendingSubscribe>,
    inbound: BTreeMap<NonZeroU16, Inbound>,
    /// The client's topic aliases (v5), at most `topic_alias_maximum`.
    topic_aliases: BTreeMap<NonZeroU16, String>,
    /// QoS 1/2 acknowledgements in the order their PUBLISH packets came (MQTT-4.6.0-2/3):
    /// one whose append is answered waits for the ones before it.
    acks: VecDeque<inbound::PendingAck>,
    outbound: BTreeMap<NonZeroU16, Outbound>,
    pending_deliveries: VecDeque<Delivery>,
    next_packet_id: u16,
    publish_sequence: u64,
    deliveries_dropped: u64,
    /// The stored side of a persistent session.
    persistence: Option<Persistence>,
    /// A resumed session's PUBREL and PUBLISH packets to send again after the CONNACK.
    pending_resume: Option<persistent::Resume>,
    /// Whether the CONNECT asked for a Session Expiry Interval (v5: a DISCONNECT may only
    /// change it then).
    session_expiry_requested: bool,
    actions: VecDeque<Action>,
}

impl Session {
    /// `connection_id`: unique among all connections the store has ever seen, because it
    /// prefixes the message ids of the connection's publishes; 1..=64 printable ASCII
    /// characters (the driver draws it at random).
    pub fn new(config: SessionConfig, connection_id: &str) -> Session {
        assert!(
            !connection_id.is_empty()
                && connection_id.len() <= 64
                && connection_id.bytes().all(|b| b.is_ascii_graphic()),
            "connection ids are 1..=64 printable ASCII characters"
        );
        assert!(config.receive_maximum > 0 && config.outbound_inflight_max > 0);
        Session {
            id_prefix: format!("mqtt-{connection_id}-"),
            will: None,
            connection_id: connection_id.to_owned(),
            config,
            phase: Phase::AwaitingConnect,
            version: Version::V3,
            client_id: String::new(),
            keep_alive_secs: 0,
            outbound_window: 1,
            peer_max_packet_bytes: None,
            peer_wants_problem_info: true,
            outbound_aliases: OutboundAliases::default(),
            subscriptions: BTreeMap::new(),
            pending_subscribes: BTreeMap::new(),
            inbound: BTreeMap::new(),
            topic_aliases: BTreeMap::new(),
            acks: VecDeque::new(),
            outbound: BTreeMap::new(),
            pending_deliveries: VecDeque::new(),
            next_packet_id: 1,
            publish_sequence: 0,
            deliveries_dropped: 0,
            persistence: None,
            pending_resume: None,
            session_expiry_requested: false,
            actions: VecDeque::new(),
        }
    }

    /// The next action, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            // The input is handled: one save covers what it changed.
            self.save_for_held();
        }
        self.actions.pop_front()
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Connected)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The protocol version (meaningful once CONNECT was handled).
    pub fn version(&self) -> Version {
        self.version
    }

    /// The client id, assigned by the server when the client sent an empty one.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// How long the connection may stay silent before [`Session::handle_keep_alive_timeout`]:
    /// one and a half times the keep alive (MQTT-3.1.2-22), `None` before CONNECT.
    pub fn keep_alive_timeout_ms(&self) -> Option<u64> {
        match self.phase {
            Phase::Connected | Phase::Authenticating { .. } | Phase::Opening { .. }
                if self.keep_alive_secs > 0 =>
            {
                Some(u64::from(self.keep_alive_secs) * 1500)
            }
            _ => None,
        }
    }

    /// Deliveries dropped because the outbound window and its queue were full, or because a
    /// packet exceeded the client's Maximum Packet Size.
    pub fn deliveries_dropped(&self) -> u64 {
        self.deliveries_dropped
    }

    /// Outbound QoS 1/2 deliveries awaiting the client.
    pub fn outbound_inflight(&self) -> usize {
        self.outbound.len()
    }

    // ----- inputs -----

    pub fn handle_packet(&mut self, packet: Packet) {
        match &mut self.phase {
            Phase::Closed => {}
            Phase::AwaitingConnect => self.on_first_packet(packet),
            Phase::Authenticating { early, .. } | Phase::Opening { early, .. } => {
                if is_connect(&packet) {
                    self.protocol_error("a second CONNECT");
                } else if early.len() >= EARLY_PACKETS_MAX {
                    self.close(
                        DisconnectReasonCode::QuotaExceeded,
                        "too many packets before CONNACK",
                    );
                } else {
                    early.push_back(packet);
                }
            }
            Phase::Connected => self.on_packet(packet),
        }
    }

    /// The decoder refused the input: close with the reason code of the error.
    pub fn handle_decode_error(&mut self, error: &DecodeError) {
        self.close(error.to_reason_code(), &format!("bad packet: {error}"));
    }

    pub fn handle_keep_alive_timeout(&mut self) {
        self.close(
            DisconnectReasonCode::KeepAliveTimeout,
            "nothing received within 1.5 times the keep alive",
        );
    }

    pub fn handle_shutdown(&mut self) {
        self.close(
            DisconnectReasonCode::ServerShuttingDown,
            "the server is shutting down",
        );
    }

    // ----- dispatch of a connected session's packets -----

    fn on_packet(&mut self, packet: Packet) {
        match (self.version, packet) {
            (Version::V3, Packet::V3(packet)) => self.on_v3(packet),
            (Version::V5, Packet::V5(packet)) => self.on_v5(packet),
            _ => self.protocol_error("a packet of another protocol version"),
        }
    }

    fn on_v3(&mut self, packet: v3::Packet) {
        match packet {
            v3::Packet::Publish(publish) => self.on_publish(*publish),
            v3::Packet::PublishAck { packet_id } => self.on_puback(packet_id),
            v3::Packet::PublishReceived { packet_id } => self.on_pubrec(packet_id, true),
            v3::Packet::PublishRelease { packet_id } => self.on_pubrel(packet_id),
            v3::Packet::PublishComplete { packet_id } => self.on_pubcomp(packet_id),
            v3::Packet::Subscribe {
                packet_id,
                topic_filters,
            } => self.on_subscribe(packet_id, subscriptions::v3_requests(topic_filters)),
            v3::Packet::Unsubscribe {
                packet_id,
                topic_filters,
            } => self.on_unsubscribe(packet_id, &topic_filters),
            v3::Packet::PingRequest => self.send(Packet::V3(v3::Packet::PingResponse)),
            v3::Packet::Disconnect => self.client_disconnected(false),
            v3::Packet::Connect(_) => self.protocol_error("a second CONNECT"),
            v3::Packet::ConnectAck(_)
            | v3::Packet::SubscribeAck { .. }
            | v3::Packet::UnsubscribeAck { .. }
            | v3::Packet::PingResponse => self.protocol_error("a packet only servers send"),
        }
    }

    fn on_v5(&mut self, packet: v5::Packet) {
        match packet {
            v5::Packet::Publish(publish) => self.on_publish(*publish),
            v5::Packet::PublishAck(ack) => self.on_puback(ack.packet_id),
            v5::Packet::PublishReceived(ack) => {
                self.on_pubrec(ack.packet_id, reasons::is_success(ack.reason_code));
            }
            v5::Packet::PublishRelease(ack) => self.on_pubrel(ack.packet_id),
            v5::Packet::PublishComplete(ack) => self.on_pubcomp(ack.packet_id),
            v5::Packet::Subscribe(subscribe) => {
                let requests = subscriptions::v5_requests(subscribe.topic_filters, subscribe.id);
                self.on_subscribe(subscribe.packet_id, requests);
            }
            v5::Packet::Unsubscribe(unsubscribe) => {
                self.on_unsubscribe(unsubscribe.packet_id, &unsubscribe.topic_filters);
            }
            v5::Packet::PingRequest => self.send(Packet::V5(v5::Packet::PingResponse)),
            v5::Packet::Disconnect(disconnect) => {
                if let Some(expiry_secs) = disconnect.session_expiry_interval_secs {
                    // MQTT-3.14.2-2: a session that was to end with the connection cannot be
                    // given an expiry at its end.
                    if !self.session_expiry_requested && expiry_secs > 0 {
                        return self.protocol_error(
                            "a Session Expiry Interval in DISCONNECT after none in CONNECT",
                        );
                    }
                    let granted = self.grant_session_expiry(expiry_secs);
                    if let Some(persistence) = self.persistence.as_mut() {
                        persistence.expiry_secs = granted;
                    }
                }
                self.client_disconnected(
                    disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                );
            }
            v5::Packet::Connect(_) => self.protocol_error("a second CONNECT"),
            v5::Packet::Auth(_) => self.protocol_error("AUTH without an authentication method"),
            v5::Packet::ConnectAck(_)
            | v5::Packet::SubscribeAck(_)
            | v5::Packet::UnsubscribeAck(_)
            | v5::Packet::PingResponse => self.protocol_error("a packet only servers send"),
        }
    }

    // ----- endings -----

    /// Every packet to the client goes through here: a v5 Reason String the client must not
    /// get (too large for its Maximum Packet Size, or not requested) is left out, and a
    /// persistent session holds the packet until the state it follows from is saved.
    fn send(&mut self, packet: Packet) {
        let packet = self.without_unwanted_reason_string(packet);
        if let Some(packet) = self.hold_if_unsaved(packet) {
            self.actions.push_back(Action::Send(packet));
        }
    }

    fn without_unwanted_reason_string(&self, mut packet: Packet) -> Packet {
        if let Packet::V5(packet) = &mut packet {
            reasons::omit_unwanted_reason_string(
                packet,
                self.peer_max_packet_bytes,
                self.peer_wants_problem_info,
            );
        }
        packet
    }

    /// A DISCONNECT: the will is discarded, unless the client asked for it (v5 0x04).
    fn client_disconnected(&mut self, with_will: bool) {
        if with_will {
            self.publish_will();
        }
        self.will = None;
        self.actions.push_back(Action::Close(CloseReason {
            code: DisconnectReasonCode::NormalDisconnection,
            detail: "the client disconnected".into(),
        }));
        self.phase = Phase::Closed;
    }

    fn protocol_error(&mut self, detail: &str) {
        self.close(
            DisconnectReasonCode::ProtocolError,
            &format!("protocol error: {detail}"),
        );
    }

    /// Ends the connection: a v5 DISCONNECT with the reason first when CONNACK was sent.
    fn close(&mut self, code: DisconnectReasonCode, detail: &str) {
        if self.is_closed() {
            return;
        }
        self.publish_will();
        if self.is_connected() && self.version == Version::V5 {
            // Not held behind a save: packets still held are never sent, and the final
            // state saved at the end covers them.
            let disconnect = self.without_unwanted_reason_string(Packet::V5(
                v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: code,
                    reason_string: Some(detail.to_owned().into()),
                    ..v5::Disconnect::default()
                }),
            ));
            self.actions.push_back(Action::Send(disconnect));
        }
        self.actions.push_back(Action::Close(CloseReason {
            code,
            detail: detail.to_owned(),
        }));
        self.phase = Phase::Closed;
    }
}

fn is_connect(packet: &Packet) -> bool {
    matches!(
        packet,
        Packet::V3(v3::Packet::Connect(_)) | Packet::V5(v5::Packet::Connect(_))
    )
}

#[cfg(test)]
mod tests;
