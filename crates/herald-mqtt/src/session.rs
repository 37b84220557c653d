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
//!    [`Session::handle_appended`] (in any order, each exactly once).
//! 4. Messages of subscribed channels go in through [`Session::handle_delivery`] (the driver
//!    feeds each durable message of a matching channel once; the session picks the QoS).
//!    [`Action::SendRetained`] asks for the retained messages of a new subscription's filter:
//!    the driver hands each to [`Session::handle_retained`].
//! 5. After [`Action::Close`] the driver closes the socket; later inputs are ignored.
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
//!   window (the client's Receive
//!   Maximum in v5, capped by `outbound_inflight_max`), then `outbound_pending_max`
//!   deliveries wait; more are dropped and counted ([`Session::deliveries_dropped`]).
//! - Bad input never panics: protocol violations end with [`Action::Close`] and, on a v5
//!   connection past CONNACK, a DISCONNECT with the reason code first.
//!
//! # Limits of this slice
//! Sessions are always clean: a persistent-session request (v3 `clean_session = 0`, v5
//! `clean_start = 0` or a Session Expiry Interval) is served as a clean one with
//! `session_present = 0` (v5 CONNACK also says Session Expiry Interval 0). Will messages are
//! refused at CONNECT rather than silently never published. No topic aliases (Topic Alias
//! Maximum 0), no subscription identifiers, no shared subscriptions (each advertised as
//! unavailable in CONNACK).

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU16;

use bytes::Bytes;
use herald_core::{ChannelName, Data, Headers, Message, MessageId, NewMessage};
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode, ToReasonCode as _};

use crate::topic::{self, SHARED_SUBSCRIPTION_PREFIX, TopicError, TopicFilter};

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
    /// Hand every retained message whose channel matches `filter` (and that the connection may
    /// read) to [`Session::handle_retained`] with this filter.
    SendRetained {
        filter: TopicFilter,
    },
    /// Close the network connection.
    Close(CloseReason),
}

#[derive(Clone, Debug)]
struct Subscription {
    filter: TopicFilter,
    qos: QoS,
    options: Options,
}

/// The v5 subscription options the session acts on (v3: all false, retained sent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Options {
    no_local: bool,
    retain_as_published: bool,
    /// v5 Retain Handling: 0 send retained at subscribe, 1 only for a new subscription, 2
    /// never.
    retain_handling: u8,
}

/// An inbound QoS 1/2 publish, by packet id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inbound {
    /// The append is pending; the acknowledgement follows its answer.
    Appending { qos: QoS, sequence: u64 },
    /// QoS 2: durable, PUBREC sent, waiting for PUBREL.
    Received,
}

/// An outbound QoS 1/2 delivery, by packet id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Awaiting {
    Puback,
    Pubrec,
    Pubcomp,
}

#[derive(Clone, Debug)]
struct Delivery {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
}

#[derive(Clone, Debug)]
struct PendingSubscribe {
    /// Per filter of the packet: a verdict already, or the requested options awaiting
    /// authorization.
    entries: Vec<SubscribeEntry>,
}

#[derive(Clone, Debug)]
enum SubscribeEntry {
    Refused(Refusal),
    Authorizing {
        filter: TopicFilter,
        qos: QoS,
        options: Options,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    NotAuthorized,
    TopicFilterInvalid,
    SharedNotSupported,
    QuotaExceeded,
}

#[derive(Clone, Debug)]
struct Connecting {
    version: Version,
    client_id: String,
    assigned_client_id: bool,
    keep_alive_secs: u16,
    server_keep_alive: bool,
    session_expiry_requested: bool,
    client_receive_maximum: u16,
    peer_max_packet_bytes: Option<u32>,
}

#[derive(Clone, Debug)]
enum Phase {
    AwaitingConnect,
    Authenticating {
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
    phase: Phase,
    version: Version,
    client_id: String,
    keep_alive_secs: u16,
    outbound_window: u16,
    peer_max_packet_bytes: Option<u32>,
    subscriptions: BTreeMap<String, Subscription>,
    pending_subscribes: BTreeMap<NonZeroU16, PendingSubscribe>,
    inbound: BTreeMap<NonZeroU16, Inbound>,
    outbound: BTreeMap<NonZeroU16, Awaiting>,
    pending_deliveries: VecDeque<Delivery>,
    next_packet_id: u16,
    publish_sequence: u64,
    deliveries_dropped: u64,
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
            connection_id: connection_id.to_owned(),
            config,
            phase: Phase::AwaitingConnect,
            version: Version::V3,
            client_id: String::new(),
            keep_alive_secs: 0,
            outbound_window: 1,
            peer_max_packet_bytes: None,
            subscriptions: BTreeMap::new(),
            pending_subscribes: BTreeMap::new(),
            inbound: BTreeMap::new(),
            outbound: BTreeMap::new(),
            pending_deliveries: VecDeque::new(),
            next_packet_id: 1,
            publish_sequence: 0,
            deliveries_dropped: 0,
            actions: VecDeque::new(),
        }
    }

    /// The next action, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
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
            Phase::Connected | Phase::Authenticating { .. } if self.keep_alive_secs > 0 => {
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
            Phase::Authenticating { early, .. } => {
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

    /// The answer to [`Action::Authenticate`].
    pub fn handle_authenticated(&mut self, result: Result<(), AuthRefusal>) {
        if self.is_closed() {
            return;
        }
        let Phase::Authenticating { connecting, early } =
            std::mem::replace(&mut self.phase, Phase::Connected)
        else {
            self.phase = Phase::Closed;
            panic!("handle_authenticated without a pending Action::Authenticate");
        };
        if let Err(refusal) = result {
            let (v3_code, v5_code, detail) = match refusal {
                AuthRefusal::BadCredentials => (
                    v3::ConnectAckReason::BadUserNameOrPassword,
                    v5::ConnectAckReason::BadUserNameOrPassword,
                    "bad or missing API key (send it as the password)",
                ),
                AuthRefusal::NotAuthorized => (
                    v3::ConnectAckReason::NotAuthorized,
                    v5::ConnectAckReason::NotAuthorized,
                    "not authorized",
                ),
            };
            self.version = connecting.version;
            self.refuse_connect(v3_code, v5_code, detail);
            return;
        }
        self.version = connecting.version;
        self.client_id = connecting.client_id.clone();
        self.keep_alive_secs = connecting.keep_alive_secs;
        self.peer_max_packet_bytes = connecting.peer_max_packet_bytes;
        self.outbound_window = match connecting.version {
            Version::V3 => self.config.outbound_inflight_max,
            Version::V5 => connecting
                .client_receive_maximum
                .min(self.config.outbound_inflight_max),
        };
        let connack = match connecting.version {
            Version::V3 => Packet::V3(v3::Packet::ConnectAck(v3::ConnectAck {
                return_code: v3::ConnectAckReason::ConnectionAccepted,
                session_present: false,
            })),
            Version::V5 => Packet::V5(v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
                session_present: false,
                reason_code: v5::ConnectAckReason::Success,
                // Sessions end with the connection in this version of Herald: say so.
                session_expiry_interval_secs: connecting.session_expiry_requested.then_some(0),
                receive_max: NonZeroU16::new(self.config.receive_maximum).expect("checked in new"),
                max_qos: QoS::ExactlyOnce,
                max_packet_size: Some(self.config.max_packet_bytes),
                assigned_client_id: connecting
                    .assigned_client_id
                    .then(|| connecting.client_id.clone().into()),
                topic_alias_max: 0,
                retain_available: true,
                wildcard_subscription_available: true,
                subscription_identifiers_available: false,
                shared_subscription_available: false,
                server_keepalive_sec: connecting
                    .server_keep_alive
                    .then_some(connecting.keep_alive_secs),
                ..v5::ConnectAck::default()
            }))),
        };
        self.actions.push_back(Action::Send(connack));
        for packet in early {
            if self.is_closed() {
                break;
            }
            self.on_packet(packet);
        }
    }

    /// The answer to [`Action::AuthorizeSubscribe`]: one verdict per filter, in order.
    pub fn handle_subscribe_authorized(&mut self, packet_id: NonZeroU16, allowed: Vec<bool>) {
        if self.is_closed() {
            return;
        }
        let pending = self
            .pending_subscribes
            .remove(&packet_id)
            .expect("an answer to a pending Action::AuthorizeSubscribe");
        let mut verdicts = allowed.into_iter();
        let mut results = Vec::with_capacity(pending.entries.len());
        let mut retained = Vec::new();
        for entry in pending.entries {
            let result = match entry {
                SubscribeEntry::Refused(refusal) => Err(refusal),
                SubscribeEntry::Authorizing {
                    filter,
                    qos,
                    options,
                } => {
                    let allowed = verdicts.next().expect("one verdict per filter");
                    let existed = self.subscriptions.contains_key(filter.as_str());
                    if !allowed {
                        Err(Refusal::NotAuthorized)
                    } else if !existed && self.subscriptions.len() >= self.config.subscriptions_max
                    {
                        Err(Refusal::QuotaExceeded)
                    } else {
                        let send_retained = match options.retain_handling {
                            0 => true,
                            1 => !existed,
                            _ => false,
                        };
                        if send_retained {
                            retained.push(filter.clone());
                        }
                        self.subscriptions.insert(
                            filter.as_str().to_owned(),
                            Subscription {
                                filter: filter.clone(),
                                qos,
                                options,
                            },
                        );
                        self.actions.push_back(Action::Subscribe { filter, qos });
                        Ok(qos)
                    }
                }
            };
            results.push(result);
        }
        let suback = match self.version {
            Version::V3 => Packet::V3(v3::Packet::SubscribeAck {
                packet_id,
                status: results
                    .iter()
                    .map(|result| match result {
                        Ok(qos) => v3::SubscribeReturnCode::Success(*qos),
                        Err(_) => v3::SubscribeReturnCode::Failure,
                    })
                    .collect(),
            }),
            Version::V5 => Packet::V5(v5::Packet::SubscribeAck(v5::SubscribeAck {
                packet_id,
                properties: Vec::new(),
                reason_string: None,
                status: results
                    .iter()
                    .map(|result| match result {
                        Ok(QoS::AtMostOnce) => v5::SubscribeAckReason::GrantedQos0,
                        Ok(QoS::AtLeastOnce) => v5::SubscribeAckReason::GrantedQos1,
                        Ok(QoS::ExactlyOnce) => v5::SubscribeAckReason::GrantedQos2,
                        Err(Refusal::NotAuthorized) => v5::SubscribeAckReason::NotAuthorized,
                        Err(Refusal::TopicFilterInvalid) => {
                            v5::SubscribeAckReason::TopicFilterInvalid
                        }
                        Err(Refusal::SharedNotSupported) => {
                            v5::SubscribeAckReason::SharedSubscriptionNotSupported
                        }
                        Err(Refusal::QuotaExceeded) => v5::SubscribeAckReason::QuotaExceeded,
                    })
                    .collect(),
            })),
        };
        self.actions.push_back(Action::Send(suback));
        // After the SUBACK (MQTT-3.8.4: retained messages follow the subscription).
        for filter in retained {
            self.actions.push_back(Action::SendRetained { filter });
        }
    }

    /// A retained message for the subscription `filter` (the answer to
    /// [`Action::SendRetained`]): sent with RETAIN = 1 at min(stored QoS, subscription QoS).
    /// Ignored when the filter is no longer subscribed or does not match.
    pub fn handle_retained(&mut self, filter: &TopicFilter, message: &Message) {
        if !self.is_connected() {
            return;
        }
        let Some(subscription) = self.subscriptions.get(filter.as_str()) else {
            return;
        };
        if !subscription.filter.matches_channel(&message.channel) {
            return;
        }
        let qos = subscription.qos;
        self.queue_delivery(message, qos, true);
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
        let Some(Inbound::Appending { qos, sequence }) = self.inbound.get(&packet_id).copied()
        else {
            panic!("an append answer for packet {packet_id} that is not being appended");
        };
        assert_eq!(sequence, token.sequence, "one append per inbound packet id");
        let reason = match outcome {
            AppendOutcome::Durable => None,
            AppendOutcome::NotAuthorized => Some((
                v5::PublishAckReason::NotAuthorized,
                "not authorized to publish to this topic".to_owned(),
            )),
            AppendOutcome::Invalid(why) => {
                Some((v5::PublishAckReason::ImplementationSpecificError, why))
            }
            AppendOutcome::Overloaded => Some((
                v5::PublishAckReason::QuotaExceeded,
                "the server is overloaded, retry later".to_owned(),
            )),
            AppendOutcome::Failed(why) => Some((v5::PublishAckReason::UnspecifiedError, why)),
        };
        if reason.is_none() && qos == QoS::ExactlyOnce {
            self.inbound.insert(packet_id, Inbound::Received);
        } else {
            self.inbound.remove(&packet_id);
        }
        match (self.version, reason) {
            (Version::V3, None) => self.send(if qos == QoS::ExactlyOnce {
                Packet::V3(v3::Packet::PublishReceived { packet_id })
            } else {
                Packet::V3(v3::Packet::PublishAck { packet_id })
            }),
            // MQTT 3.1.1 has no negative acknowledgement: the connection ends unacknowledged.
            (Version::V3, Some((reason, why))) => self.close(
                DisconnectReasonCode::from_publish_ack(reason),
                &format!("publish refused: {why}"),
            ),
            (Version::V5, reason) => {
                let (reason_code, reason_string) = match reason {
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

    /// A durable message of a channel the driver feeds. Ignored unless one of the session's
    /// filters matches (a feed may lag behind an UNSUBSCRIBE).
    pub fn handle_delivery(&mut self, message: &Message) {
        if !self.is_connected() {
            return;
        }
        let own = message.id.as_str().starts_with(&self.id_prefix);
        let mut matched = self
            .subscriptions
            .values()
            .filter(|subscription| !(own && subscription.options.no_local))
            .filter(|subscription| subscription.filter.matches_channel(&message.channel))
            .peekable();
        if matched.peek().is_none() {
            return;
        }
        let (subscription_qos, retain_as_published) =
            matched.fold((QoS::AtMostOnce, false), |(qos, keep), subscription| {
                (
                    qos.max(subscription.qos),
                    keep || subscription.options.retain_as_published,
                )
            });
        let retain = retain_as_published && message.headers.contains_key(HEADER_RETAIN);
        self.queue_delivery(message, subscription_qos, retain);
    }

    /// Sends a delivery now, or queues it behind the window, or drops and counts it.
    fn queue_delivery(&mut self, message: &Message, subscription_qos: QoS, retain: bool) {
        let published_qos = match message.headers.get(HEADER_QOS).map(String::as_str) {
            Some("0") => QoS::AtMostOnce,
            Some("1") => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let delivery = Delivery {
            topic: topic::channel_to_topic(&message.channel),
            payload: message.data.bytes().clone(),
            qos: published_qos.min(subscription_qos),
            retain,
        };
        if let Some(max) = self.peer_max_packet_bytes
            && publish_size_bytes(&delivery) > max as usize
        {
            // MQTT-3.1.2-25: a packet over the client's maximum is discarded as if delivered.
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

    // ----- packets -----

    fn on_first_packet(&mut self, packet: Packet) {
        match packet {
            Packet::V3(v3::Packet::Connect(connect)) => {
                self.version = Version::V3;
                if connect.last_will.is_some() {
                    return self.refuse_connect(
                        v3::ConnectAckReason::ServiceUnavailable,
                        v5::ConnectAckReason::ImplementationSpecificError,
                        "will messages are not supported yet",
                    );
                }
                let requested = connect.client_id.to_string();
                if requested.is_empty() && !connect.clean_session {
                    // MQTT-3.1.3-8: an empty id needs a clean session in 3.1.1.
                    return self.refuse_connect(
                        v3::ConnectAckReason::IdentifierRejected,
                        v5::ConnectAckReason::ClientIdentifierNotValid,
                        "an empty client id requires clean_session = 1",
                    );
                }
                let (keep_alive_secs, _) = self.grant_keep_alive(connect.keep_alive);
                self.start_authentication(
                    Connecting {
                        version: Version::V3,
                        client_id: requested,
                        assigned_client_id: false,
                        keep_alive_secs,
                        server_keep_alive: false,
                        session_expiry_requested: false,
                        client_receive_maximum: u16::MAX,
                        peer_max_packet_bytes: None,
                    },
                    connect.username.map(|name| name.to_string()),
                    connect.password,
                );
            }
            Packet::V5(v5::Packet::Connect(connect)) => {
                self.version = Version::V5;
                if connect.last_will.is_some() {
                    return self.refuse_connect(
                        v3::ConnectAckReason::ServiceUnavailable,
                        v5::ConnectAckReason::ImplementationSpecificError,
                        "will messages are not supported yet",
                    );
                }
                if connect.auth_method.is_some() {
                    return self.refuse_connect(
                        v3::ConnectAckReason::NotAuthorized,
                        v5::ConnectAckReason::BadAuthenticationMethod,
                        "enhanced authentication is not supported; send the API key as password",
                    );
                }
                let (keep_alive_secs, changed) = self.grant_keep_alive(connect.keep_alive);
                self.start_authentication(
                    Connecting {
                        version: Version::V5,
                        client_id: connect.client_id.to_string(),
                        assigned_client_id: false,
                        keep_alive_secs,
                        server_keep_alive: changed,
                        session_expiry_requested: connect.session_expiry_interval_secs > 0,
                        client_receive_maximum: connect
                            .receive_max
                            .map_or(u16::MAX, |max| max.get()),
                        peer_max_packet_bytes: connect.max_packet_size.map(|max| max.get()),
                    },
                    connect.username.map(|name| name.to_string()),
                    connect.password,
                );
            }
            // MQTT-3.1.0-1: the first packet must be CONNECT; close without a CONNACK.
            _ => self.close(
                DisconnectReasonCode::ProtocolError,
                "the first packet must be CONNECT",
            ),
        }
    }

    fn start_authentication(
        &mut self,
        mut connecting: Connecting,
        username: Option<String>,
        password: Option<Bytes>,
    ) {
        if connecting.client_id.len() > CLIENT_ID_BYTES_MAX {
            return self.refuse_connect(
                v3::ConnectAckReason::IdentifierRejected,
                v5::ConnectAckReason::ClientIdentifierNotValid,
                "the client id is longer than 256 bytes",
            );
        }
        if connecting.client_id.is_empty() {
            connecting.client_id = format!("herald-{}", self.connection_id);
            connecting.assigned_client_id = true;
        }
        self.actions.push_back(Action::Authenticate {
            client_id: connecting.client_id.clone(),
            username,
            password,
        });
        self.keep_alive_secs = connecting.keep_alive_secs;
        self.phase = Phase::Authenticating {
            connecting: Box::new(connecting),
            early: VecDeque::new(),
        };
    }

    /// The keep alive to enforce, and whether it differs from what the client asked.
    fn grant_keep_alive(&self, requested_secs: u16) -> (u16, bool) {
        let max = self.config.keep_alive_max_secs;
        if max > 0 && (requested_secs == 0 || requested_secs > max) {
            (max, true)
        } else {
            (requested_secs, false)
        }
    }

    fn refuse_connect(
        &mut self,
        v3_code: v3::ConnectAckReason,
        v5_code: v5::ConnectAckReason,
        detail: &str,
    ) {
        let connack = match self.version {
            Version::V3 => Packet::V3(v3::Packet::ConnectAck(v3::ConnectAck {
                return_code: v3_code,
                session_present: false,
            })),
            Version::V5 => Packet::V5(v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
                reason_code: v5_code,
                reason_string: Some(detail.to_owned().into()),
                ..v5::ConnectAck::default()
            }))),
        };
        self.actions.push_back(Action::Send(connack));
        self.actions.push_back(Action::Close(CloseReason {
            code: DisconnectReasonCode::NotAuthorized,
            detail: format!("CONNECT refused: {detail}"),
        }));
        self.phase = Phase::Closed;
    }

    fn on_packet(&mut self, packet: Packet) {
        match packet {
            Packet::V3(packet) => {
                if self.version != Version::V3 {
                    return self.protocol_error("a packet of another protocol version");
                }
                self.on_v3(packet);
            }
            Packet::V5(packet) => {
                if self.version != Version::V5 {
                    return self.protocol_error("a packet of another protocol version");
                }
                self.on_v5(packet);
            }
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
            } => {
                let requests = topic_filters
                    .into_iter()
                    .map(|(filter, qos)| (filter.to_string(), qos, Options::default()))
                    .collect();
                self.on_subscribe(packet_id, requests);
            }
            v3::Packet::Unsubscribe {
                packet_id,
                topic_filters,
            } => {
                let filters = topic_filters.iter().map(|f| f.to_string()).collect();
                self.on_unsubscribe(packet_id, filters);
            }
            v3::Packet::PingRequest => self.send(Packet::V3(v3::Packet::PingResponse)),
            v3::Packet::Disconnect => self.client_disconnected(),
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
                let success = (u8::from(ack.reason_code)) < 0x80;
                self.on_pubrec(ack.packet_id, success);
            }
            v5::Packet::PublishRelease(ack) => self.on_pubrel(ack.packet_id),
            v5::Packet::PublishComplete(ack) => self.on_pubcomp(ack.packet_id),
            v5::Packet::Subscribe(subscribe) => {
                if subscribe.id.is_some() {
                    return self.close(
                        DisconnectReasonCode::SubscriptionIdentifiersNotSupported,
                        "subscription identifiers are not supported (CONNACK said so)",
                    );
                }
                let requests = subscribe
                    .topic_filters
                    .into_iter()
                    .map(|(filter, options)| {
                        (
                            filter.to_string(),
                            options.qos,
                            Options {
                                no_local: options.no_local,
                                retain_as_published: options.retain_as_published,
                                retain_handling: options.retain_handling.into(),
                            },
                        )
                    })
                    .collect();
                self.on_subscribe(subscribe.packet_id, requests);
            }
            v5::Packet::Unsubscribe(unsubscribe) => {
                let filters = unsubscribe
                    .topic_filters
                    .iter()
                    .map(|f| f.to_string())
                    .collect();
                self.on_unsubscribe(unsubscribe.packet_id, filters);
            }
            v5::Packet::PingRequest => self.send(Packet::V5(v5::Packet::PingResponse)),
            v5::Packet::Disconnect(_) => self.client_disconnected(),
            v5::Packet::Connect(_) => self.protocol_error("a second CONNECT"),
            v5::Packet::Auth(_) => self.protocol_error("AUTH without an authentication method"),
            v5::Packet::ConnectAck(_)
            | v5::Packet::SubscribeAck(_)
            | v5::Packet::UnsubscribeAck(_)
            | v5::Packet::PingResponse => self.protocol_error("a packet only servers send"),
        }
    }

    fn on_publish(&mut self, publish: Publish) {
        if self.version == Version::V5 {
            let properties = publish.properties.as_ref();
            if properties.is_some_and(|p| p.topic_alias.is_some()) {
                return self.close(
                    DisconnectReasonCode::TopicAliasInvalid,
                    "topic aliases are not supported (Topic Alias Maximum is 0)",
                );
            }
        }
        let channel = match topic::publish_channel(&publish.topic) {
            Ok(channel) => Some(channel),
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
                    let ack = v5::PublishAck {
                        packet_id,
                        reason_code: v5::PublishAckReason::TopicNameInvalid,
                        properties: Vec::new(),
                        reason_string: Some(error.to_string().into()),
                    };
                    self.send(Packet::V5(if publish.qos == QoS::ExactlyOnce {
                        v5::Packet::PublishReceived(ack)
                    } else {
                        v5::Packet::PublishAck(ack)
                    }));
                    return;
                }
                return self.close(
                    DisconnectReasonCode::TopicNameInvalid,
                    &format!("topic {:?} refused: {error}", &*publish.topic),
                );
            }
        };
        let channel = channel.expect("set above");
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
                    return self.send(match self.version {
                        Version::V3 => Packet::V3(v3::Packet::PublishReceived { packet_id }),
                        Version::V5 => Packet::V5(v5::Packet::PublishReceived(v5::PublishAck {
                            packet_id,
                            ..v5::PublishAck::default()
                        })),
                    });
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
        }
        let id = MessageId::parse(&format!("{}{sequence}", self.id_prefix))
            .expect("printable ASCII of bounded length");
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
        let message = NewMessage {
            id,
            name: None,
            headers,
            data: Data::Binary(publish.payload),
            ttl_ms,
        };
        self.actions.push_back(Action::Append {
            token: AppendToken {
                sequence,
                packet_id,
            },
            channel,
            message,
        });
    }

    fn on_pubrel(&mut self, packet_id: NonZeroU16) {
        match self.inbound.get(&packet_id) {
            Some(Inbound::Received) => {
                self.inbound.remove(&packet_id);
                self.send(match self.version {
                    Version::V3 => Packet::V3(v3::Packet::PublishComplete { packet_id }),
                    Version::V5 => Packet::V5(v5::Packet::PublishComplete(v5::PublishAck2 {
                        packet_id,
                        ..v5::PublishAck2::default()
                    })),
                });
            }
            Some(Inbound::Appending { .. }) => self.protocol_error("PUBREL before PUBREC"),
            // A PUBREL re-sent after our PUBCOMP was lost is answered again (MQTT-4.3.3).
            None => self.send(match self.version {
                Version::V3 => Packet::V3(v3::Packet::PublishComplete { packet_id }),
                Version::V5 => Packet::V5(v5::Packet::PublishComplete(v5::PublishAck2 {
                    packet_id,
                    reason_code: v5::PublishAck2Reason::PacketIdNotFound,
                    ..v5::PublishAck2::default()
                })),
            }),
        }
    }

    fn on_puback(&mut self, packet_id: NonZeroU16) {
        if self.outbound.get(&packet_id) != Some(&Awaiting::Puback) {
            return self.protocol_error("PUBACK for a packet id not awaiting one");
        }
        self.outbound.remove(&packet_id);
        self.drain_pending_deliveries();
    }

    fn on_pubrec(&mut self, packet_id: NonZeroU16, success: bool) {
        match self.outbound.get(&packet_id) {
            Some(Awaiting::Pubrec) | Some(Awaiting::Pubcomp) => {}
            _ => return self.protocol_error("PUBREC for a packet id not awaiting one"),
        }
        if !success {
            // A v5 PUBREC with an error code ends the exchange.
            self.outbound.remove(&packet_id);
            return self.drain_pending_deliveries();
        }
        self.outbound.insert(packet_id, Awaiting::Pubcomp);
        self.send(match self.version {
            Version::V3 => Packet::V3(v3::Packet::PublishRelease { packet_id }),
            Version::V5 => Packet::V5(v5::Packet::PublishRelease(v5::PublishAck2 {
                packet_id,
                ..v5::PublishAck2::default()
            })),
        });
    }

    fn on_pubcomp(&mut self, packet_id: NonZeroU16) {
        if self.outbound.get(&packet_id) != Some(&Awaiting::Pubcomp) {
            return self.protocol_error("PUBCOMP for a packet id not awaiting one");
        }
        self.outbound.remove(&packet_id);
        self.drain_pending_deliveries();
    }

    fn on_subscribe(&mut self, packet_id: NonZeroU16, requests: Vec<(String, QoS, Options)>) {
        if self.pending_subscribes.contains_key(&packet_id) {
            return self.protocol_error("a SUBSCRIBE packet id still in use");
        }
        if self.pending_subscribes.len() >= PENDING_SUBSCRIBES_MAX {
            return self.close(
                DisconnectReasonCode::QuotaExceeded,
                "too many SUBSCRIBE packets awaiting an answer",
            );
        }
        let mut to_authorize = Vec::new();
        let entries = requests
            .into_iter()
            .map(|(text, qos, options)| {
                if text.starts_with(SHARED_SUBSCRIPTION_PREFIX) {
                    return SubscribeEntry::Refused(Refusal::SharedNotSupported);
                }
                match TopicFilter::parse(&text) {
                    Ok(filter) => {
                        to_authorize.push(filter.clone());
                        SubscribeEntry::Authorizing {
                            filter,
                            qos,
                            options,
                        }
                    }
                    Err(_) => SubscribeEntry::Refused(Refusal::TopicFilterInvalid),
                }
            })
            .collect();
        self.pending_subscribes
            .insert(packet_id, PendingSubscribe { entries });
        self.actions.push_back(Action::AuthorizeSubscribe {
            packet_id,
            filters: to_authorize,
        });
    }

    fn on_unsubscribe(&mut self, packet_id: NonZeroU16, filters: Vec<String>) {
        let mut statuses = Vec::with_capacity(filters.len());
        for text in filters {
            match self.subscriptions.remove(&text) {
                Some(subscription) => {
                    self.actions.push_back(Action::Unsubscribe {
                        filter: subscription.filter,
                    });
                    statuses.push(v5::UnsubscribeAckReason::Success);
                }
                None => statuses.push(v5::UnsubscribeAckReason::NoSubscriptionExisted),
            }
        }
        self.send(match self.version {
            Version::V3 => Packet::V3(v3::Packet::UnsubscribeAck { packet_id }),
            Version::V5 => Packet::V5(v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                packet_id,
                properties: Vec::new(),
                reason_string: None,
                status: statuses,
            })),
        });
    }

    // ----- outbound deliveries -----

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

    fn send_delivery(&mut self, delivery: Delivery) {
        let packet_id = match delivery.qos {
            QoS::AtMostOnce => None,
            qos => {
                let packet_id = self.allocate_packet_id();
                self.outbound.insert(
                    packet_id,
                    if qos == QoS::AtLeastOnce {
                        Awaiting::Puback
                    } else {
                        Awaiting::Pubrec
                    },
                );
                Some(packet_id)
            }
        };
        let publish = Publish {
            dup: false,
            retain: delivery.retain,
            qos: delivery.qos,
            topic: delivery.topic.into(),
            packet_id,
            payload: delivery.payload,
            properties: None,
        };
        self.send(match self.version {
            Version::V3 => Packet::V3(v3::Packet::Publish(Box::new(publish))),
            Version::V5 => Packet::V5(v5::Packet::Publish(Box::new(publish))),
        });
    }

    /// A packet id not in flight; the window (at most 65535) guarantees one exists.
    fn allocate_packet_id(&mut self) -> NonZeroU16 {
        loop {
            let candidate = NonZeroU16::new(self.next_packet_id).expect("never 0");
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.outbound.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    // ----- endings -----

    fn send(&mut self, packet: Packet) {
        self.actions.push_back(Action::Send(packet));
    }

    fn client_disconnected(&mut self) {
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
        if self.is_connected() && self.version == Version::V5 {
            self.send(Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
                reason_code: code,
                reason_string: Some(detail.to_owned().into()),
                ..v5::Disconnect::default()
            })));
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

/// An upper bound of a delivery's PUBLISH size in bytes (fixed header, topic, packet id, an
/// empty property block, payload).
fn publish_size_bytes(delivery: &Delivery) -> usize {
    5 + 2 + delivery.topic.len() + 2 + 1 + delivery.payload.len()
}

trait FromPublishAck {
    fn from_publish_ack(reason: v5::PublishAckReason) -> Self;
}

impl FromPublishAck for DisconnectReasonCode {
    fn from_publish_ack(reason: v5::PublishAckReason) -> Self {
        match reason {
            v5::PublishAckReason::NotAuthorized => DisconnectReasonCode::NotAuthorized,
            v5::PublishAckReason::QuotaExceeded => DisconnectReasonCode::QuotaExceeded,
            v5::PublishAckReason::TopicNameInvalid => DisconnectReasonCode::TopicNameInvalid,
            v5::PublishAckReason::ImplementationSpecificError => {
                DisconnectReasonCode::ImplementationSpecificError
            }
            _ => DisconnectReasonCode::UnspecifiedError,
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
