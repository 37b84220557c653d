//! CONNECT and authentication: the first packet, the checks made before asking the driver
//! ([`Action::Authenticate`]), the answer ([`Session::handle_authenticated`]) with its CONNACK,
//! and the packets a client sent before that CONNACK.
//!
//! # Invariants
//! - The first packet is CONNECT or the connection closes without a CONNACK (MQTT-3.1.0-1).
//! - A refused CONNECT gets a CONNACK with the version's reason code, then [`Action::Close`];
//!   nothing else is sent.
//! - Packets received while authenticating wait (at most `EARLY_PACKETS_MAX`) and are handled
//!   in order right after the CONNACK; on a refusal they are dropped.
//! - The granted keep alive never exceeds `keep_alive_max_secs` (when that is non-zero); a v5
//!   client is told when it differs from its request.
//! - After authentication the driver claims the client id and loads its stored session
//!   ([`Action::OpenSession`]); CONNACK says `session_present = 1` only when a stored
//!   session was resumed (never on a clean start).
//! - The granted Session Expiry Interval never exceeds `session_expiry_max_secs`; a v5
//!   client is told when it differs from its request.

use std::collections::VecDeque;
use std::num::NonZeroU16;

use bytes::Bytes;
use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};

use super::aliases::OutboundAliases;
use super::reasons;
use super::will::{Will, WillRequest};
use super::{
    Action, AuthRefusal, CLIENT_ID_BYTES_MAX, CloseReason, Packet, Phase, Session, StoredSession,
    Version,
};

/// Why [`Action::OpenSession`] failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionOpenError {
    /// The store failed (CONNACK: Server Unavailable).
    Unavailable(String),
    /// The client id's stored session belongs to other credentials: neither resumed nor
    /// discarded (CONNACK: Not Authorized).
    OwnedByAnotherKey,
}

/// A CONNECT accepted so far, awaiting the driver's [`Action::Authenticate`] answer.
#[derive(Clone, Debug)]
pub(super) struct Connecting {
    version: Version,
    client_id: String,
    assigned_client_id: bool,
    keep_alive_secs: u16,
    server_keep_alive: bool,
    session_expiry_requested: bool,
    /// v3 `clean_session`, v5 Clean Start.
    clean_start: bool,
    /// The Session Expiry Interval granted (0: the session ends with the connection).
    session_expiry_secs: u32,
    /// Whether the grant differs from the request (v5 CONNACK says so).
    session_expiry_changed: bool,
    client_receive_maximum: u16,
    /// The client's Topic Alias Maximum (v5; 0 for v3): aliases it accepts from the server.
    client_topic_alias_maximum: u16,
    will: Option<Will>,
}

impl Session {
    /// The answer to [`Action::Authenticate`].
    pub fn handle_authenticated(&mut self, result: Result<(), AuthRefusal>) {
        if self.is_closed() {
            return;
        }
        let Phase::Authenticating { connecting, early } =
            std::mem::replace(&mut self.phase, Phase::Closed)
        else {
            panic!("handle_authenticated without a pending Action::Authenticate");
        };
        self.version = connecting.version;
        if let Err(refusal) = result {
            let (v3_code, v5_code, detail) = reasons::auth_refusal(refusal);
            self.refuse_connect(v3_code, v5_code, detail);
            return;
        }
        self.actions.push_back(Action::OpenSession {
            client_id: connecting.client_id.clone(),
            // A session that may not outlive the connection is not resumed either.
            clean: connecting.clean_start || self.config.session_expiry_max_secs == 0,
        });
        self.phase = Phase::Opening { connecting, early };
    }

    /// The answer to [`Action::OpenSession`]: the client id's stored session (`None`: there
    /// is none, or it was discarded), or why it could not be opened (the CONNACK refuses).
    pub fn handle_session_opened(
        &mut self,
        stored: Result<Option<StoredSession>, SessionOpenError>,
    ) {
        if self.is_closed() {
            return;
        }
        let Phase::Opening { connecting, early } =
            std::mem::replace(&mut self.phase, Phase::Connected)
        else {
            self.phase = Phase::Closed;
            panic!("handle_session_opened without a pending Action::OpenSession");
        };
        let stored = match stored {
            Ok(stored) => stored.filter(|_| !connecting.clean_start),
            Err(SessionOpenError::Unavailable(error)) => {
                self.phase = Phase::Closed;
                return self.refuse_connect(
                    v3::ConnectAckReason::ServiceUnavailable,
                    v5::ConnectAckReason::ServerUnavailable,
                    &format!("the session cannot be opened: {error}"),
                );
            }
            Err(SessionOpenError::OwnedByAnotherKey) => {
                self.phase = Phase::Closed;
                return self.refuse_connect(
                    v3::ConnectAckReason::NotAuthorized,
                    v5::ConnectAckReason::NotAuthorized,
                    "this client id has a session that other credentials created",
                );
            }
        };
        self.client_id = connecting.client_id.clone();
        self.will = connecting.will.clone();
        self.keep_alive_secs = connecting.keep_alive_secs;
        // Aliases start empty on every connection (MQTT-3.3.2-7: they do not outlive it).
        self.outbound_aliases = OutboundAliases::new(
            connecting
                .client_topic_alias_maximum
                .min(self.config.outbound_topic_alias_maximum),
        );
        self.outbound_window = match connecting.version {
            Version::V3 => self.config.outbound_inflight_max,
            Version::V5 => connecting
                .client_receive_maximum
                .min(self.config.outbound_inflight_max),
        };
        self.session_expiry_requested = connecting.session_expiry_requested;
        let session_present = stored.is_some();
        if connecting.session_expiry_secs > 0 || session_present {
            self.open_persistence(connecting.session_expiry_secs, stored);
        }
        let connack = self.connack(&connecting, session_present);
        self.send(connack);
        self.resume_deliveries();
        for packet in early {
            if self.is_closed() {
                break;
            }
            self.on_packet(packet);
        }
    }

    /// The CONNACK accepting `connecting`.
    fn connack(&self, connecting: &Connecting, session_present: bool) -> Packet {
        match connecting.version {
            Version::V3 => Packet::V3(v3::Packet::ConnectAck(v3::ConnectAck {
                return_code: v3::ConnectAckReason::ConnectionAccepted,
                session_present,
            })),
            Version::V5 => Packet::V5(v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
                session_present,
                reason_code: v5::ConnectAckReason::Success,
                session_expiry_interval_secs: connecting
                    .session_expiry_changed
                    .then_some(connecting.session_expiry_secs),
                receive_max: NonZeroU16::new(self.config.receive_maximum).expect("checked in new"),
                max_qos: QoS::ExactlyOnce,
                max_packet_size: Some(self.config.max_packet_bytes),
                assigned_client_id: connecting
                    .assigned_client_id
                    .then(|| connecting.client_id.clone().into()),
                topic_alias_max: self.config.topic_alias_maximum,
                retain_available: true,
                wildcard_subscription_available: true,
                subscription_identifiers_available: true,
                shared_subscription_available: true,
                server_keepalive_sec: connecting
                    .server_keep_alive
                    .then_some(connecting.keep_alive_secs),
                ..v5::ConnectAck::default()
            }))),
        }
    }

    pub(super) fn on_first_packet(&mut self, packet: Packet) {
        match packet {
            Packet::V3(v3::Packet::Connect(connect)) => self.on_v3_connect(*connect),
            Packet::V5(v5::Packet::Connect(connect)) => self.on_v5_connect(*connect),
            // MQTT-3.1.0-1: the first packet must be CONNECT; close without a CONNACK.
            _ => self.close(
                DisconnectReasonCode::ProtocolError,
                "the first packet must be CONNECT",
            ),
        }
    }

    fn on_v3_connect(&mut self, connect: v3::Connect) {
        self.version = Version::V3;
        let will = match connect
            .last_will
            .map(|will| self.will_of(WillRequest::from_v3(will)))
        {
            None => None,
            Some(Ok(will)) => Some(will),
            // 3.1.1 has no CONNACK code for it: a malformed CONNECT.
            Some(Err(error)) => {
                return self.close(
                    DisconnectReasonCode::ProtocolError,
                    &format!("invalid will topic: {error}"),
                );
            }
        };
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
                clean_start: connect.clean_session,
                // 3.1.1 sessions have no expiry of their own: the server's longest.
                session_expiry_secs: if connect.clean_session {
                    0
                } else {
                    self.config.session_expiry_max_secs
                },
                session_expiry_changed: false,
                client_receive_maximum: u16::MAX,
                client_topic_alias_maximum: 0,
                will,
            },
            connect.username.map(|name| name.to_string()),
            connect.password,
        );
    }

    fn on_v5_connect(&mut self, connect: v5::Connect) {
        self.version = Version::V5;
        // Known before anything is answered: a refusal's CONNACK must respect them too.
        self.peer_max_packet_bytes = connect.max_packet_size.map(|max| max.get());
        self.peer_wants_problem_info = connect.request_problem_info;
        let will = match connect
            .last_will
            .map(|will| self.will_of(WillRequest::from_v5(will)))
        {
            None => None,
            Some(Ok(will)) => Some(will),
            Some(Err(error)) => {
                return self.refuse_connect(
                    v3::ConnectAckReason::ServiceUnavailable,
                    v5::ConnectAckReason::TopicNameInvalid,
                    &format!("invalid will topic: {error}"),
                );
            }
        };
        if connect.auth_method.is_some() {
            return self.refuse_connect(
                v3::ConnectAckReason::NotAuthorized,
                v5::ConnectAckReason::BadAuthenticationMethod,
                "enhanced authentication is not supported; send the API key as password",
            );
        }
        let (keep_alive_secs, changed) = self.grant_keep_alive(connect.keep_alive);
        let requested_expiry = connect.session_expiry_interval_secs;
        let session_expiry_secs = self.grant_session_expiry(requested_expiry);
        self.start_authentication(
            Connecting {
                version: Version::V5,
                client_id: connect.client_id.to_string(),
                assigned_client_id: false,
                keep_alive_secs,
                server_keep_alive: changed,
                session_expiry_requested: requested_expiry > 0,
                clean_start: connect.clean_start,
                session_expiry_secs,
                session_expiry_changed: session_expiry_secs != requested_expiry,
                client_receive_maximum: connect.receive_max.map_or(u16::MAX, |max| max.get()),
                client_topic_alias_maximum: connect.topic_alias_max,
                will,
            },
            connect.username.map(|name| name.to_string()),
            connect.password,
        );
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

    /// The Session Expiry Interval granted for a request: at most `session_expiry_max_secs`.
    pub(super) fn grant_session_expiry(&self, requested_secs: u32) -> u32 {
        requested_secs.min(self.config.session_expiry_max_secs)
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

    /// Answers the CONNECT with a refusal in the connection's version, then closes.
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
        self.send(connack);
        // Every refusal is counted as NotAuthorized, whatever its CONNACK code says.
        self.actions.push_back(Action::Close(CloseReason {
            code: DisconnectReasonCode::NotAuthorized,
            detail: format!("CONNECT refused: {detail}"),
        }));
        self.phase = Phase::Closed;
    }
}
