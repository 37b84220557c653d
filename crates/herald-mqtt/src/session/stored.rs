//! [`StoredSession`]: what a persistent MQTT session keeps in the store between connections,
//! and its encoding (JSON, small, versioned by `format`).
//!
//! The record holds positions, never message contents: the messages stay in the channel logs,
//! and a resumed session reads them back (re-sent PUBLISH packets and the catch-up of what was
//! published while it was away). So an offline session costs one small record, however much
//! it has to catch up on.
//!
//! # Invariants
//! - `cursors[channel]` is the last message of the channel handed to the client: sent, or
//!   assigned a packet id and waiting behind the save that records it. Everything after it
//!   is still owed.
//! - Every `outbound` entry's position is at or before its channel's cursor; packet ids are
//!   unique across `outbound`, and across `inbound`.
//! - A subscription's `since_ms` is when it was first granted: on a channel the session has
//!   no cursor for, the messages stored at or after it are owed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `format` this version writes and reads.
pub const STORED_SESSION_FORMAT: u32 = 1;

/// The durable state of a persistent session. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub format: u32,
    pub client_id: String,
    /// Who may resume or discard it: the name of the credentials that created it (set by the
    /// driver, which knows them). Another key using the same client id is refused.
    #[serde(default)]
    pub owner: Option<String>,
    /// How long the session outlives its connection, in seconds (`u32::MAX`: forever).
    pub expiry_secs: u32,
    /// When the last connection ended, in ms since the Unix epoch (`None` while connected).
    /// Set by the driver, which owns the clock.
    #[serde(default)]
    pub disconnected_ms: Option<u64>,
    pub subscriptions: Vec<StoredSubscription>,
    /// Channel name -> position (`EPOCH:SERIAL`) of the last message handed to the client.
    pub cursors: BTreeMap<String, String>,
    /// Deliveries awaiting the client's acknowledgement, in the order they were sent.
    pub outbound: Vec<StoredOutbound>,
    /// The client's QoS 2 publishes between PUBLISH and PUBREL.
    pub inbound: Vec<StoredInbound>,
    pub next_packet_id: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub filter: String,
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    #[serde(default)]
    pub subscription_id: Option<u32>,
    pub since_ms: u64,
}

/// A delivery the client has not completed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredOutbound {
    pub packet_id: u16,
    pub channel: String,
    /// `EPOCH:SERIAL` of the message.
    pub position: String,
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    #[serde(default)]
    pub subscription_ids: Vec<u32>,
    /// QoS 2: the client's PUBREC came and PUBREL was sent; on resume PUBREL is sent again,
    /// never the PUBLISH.
    #[serde(default)]
    pub released: bool,
}

/// A client's QoS 2 PUBLISH not yet released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInbound {
    pub packet_id: u16,
    /// The id the message is (or is being) stored under: a re-sent PUBLISH reuses it, so the
    /// store's deduplication keeps it once even across a crash.
    pub message_id: String,
    /// PUBREC was sent (the message is durable); waiting for PUBREL.
    pub received: bool,
}

/// Why a stored record could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stored MQTT session cannot be read: {0}")]
pub struct StoredSessionError(String);

impl StoredSession {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<StoredSession, StoredSessionError> {
        let session: StoredSession =
            serde_json::from_slice(bytes).map_err(|error| StoredSessionError(error.to_string()))?;
        if session.format != STORED_SESSION_FORMAT {
            return Err(StoredSessionError(format!(
                "format {} (this version reads {STORED_SESSION_FORMAT})",
                session.format
            )));
        }
        Ok(session)
    }

    /// Whether the session has expired at `now_ms` (never while connected).
    pub fn expired_at(&self, now_ms: u64) -> bool {
        match self.disconnected_ms {
            None => false,
            Some(_) if self.expiry_secs == u32::MAX => false,
            Some(ended_ms) => now_ms.saturating_sub(ended_ms) >= u64::from(self.expiry_secs) * 1000,
        }
    }
}

/// The store key of a client id's session: `mqtt-session/<client id>` for ids of printable
/// ASCII without `/` (up to 200 bytes), otherwise `mqtt-session/~<hash>` (a BLAKE3 hash of
/// the id; the record holds the id itself).
pub fn session_key(client_id: &str) -> String {
    let plain = !client_id.is_empty()
        && client_id.len() <= 200
        && !client_id.starts_with('~')
        && client_id
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'/');
    if plain {
        format!("{SESSION_KEY_PREFIX}{client_id}")
    } else {
        let hash = blake3::hash(client_id.as_bytes());
        format!("{SESSION_KEY_PREFIX}~{}", hash.to_hex())
    }
}

/// Every session key starts with it.
pub const SESSION_KEY_PREFIX: &str = "mqtt-session/";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_round_trips_and_other_formats_are_refused() {
        let mut session = StoredSession {
            format: STORED_SESSION_FORMAT,
            client_id: "sensor-1".into(),
            owner: Some("devices".into()),
            expiry_secs: 3600,
            disconnected_ms: Some(5),
            subscriptions: vec![StoredSubscription {
                filter: "a/+".into(),
                qos: 2,
                no_local: true,
                retain_as_published: false,
                subscription_id: Some(7),
                since_ms: 42,
            }],
            cursors: BTreeMap::from([("a:b".into(), "e1:3".into())]),
            outbound: vec![StoredOutbound {
                packet_id: 9,
                channel: "a:b".into(),
                position: "e1:3".into(),
                qos: 2,
                retain: false,
                subscription_ids: vec![7],
                released: true,
            }],
            inbound: vec![StoredInbound {
                packet_id: 4,
                message_id: "mqtt-x-1".into(),
                received: false,
            }],
            next_packet_id: 10,
        };
        assert_eq!(StoredSession::decode(&session.encode()).unwrap(), session);
        session.format = 99;
        assert!(StoredSession::decode(&session.encode()).is_err());
        assert!(StoredSession::decode(b"{").is_err());
    }

    #[test]
    fn expiry_counts_from_the_disconnect() {
        let mut session = StoredSession {
            expiry_secs: 10,
            ..StoredSession::default()
        };
        assert!(
            !session.expired_at(u64::MAX),
            "connected sessions never expire"
        );
        session.disconnected_ms = Some(1_000);
        assert!(!session.expired_at(10_999));
        assert!(session.expired_at(11_000));
        session.expiry_secs = u32::MAX;
        assert!(!session.expired_at(u64::MAX));
    }

    #[test]
    fn keys_are_printable_and_distinct() {
        assert_eq!(session_key("dev-1"), "mqtt-session/dev-1");
        let odd = session_key("a b/ü");
        assert!(odd.starts_with("mqtt-session/~") && odd.is_ascii());
        assert_ne!(session_key("~x"), "mqtt-session/~x");
        assert!(session_key(&"x".repeat(256)).len() <= 256);
    }
}
