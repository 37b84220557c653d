//! Messages: what a publisher sends ([`NewMessage`]) and what the stream stores ([`Message`]).

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::chain::ChainHash;
use crate::error::InvalidInput;
use crate::limits::Limits;
use crate::names::{ChannelName, Epoch, MessageId};
use crate::position::{Position, Serial};

/// Milliseconds since the Unix epoch. The core never reads a clock: time is always passed in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}

/// Opaque payload. JSON data is kept as its serialised text; binary data travels base64 on
/// JSON wires.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Data {
    /// UTF-8 JSON text of one JSON value, as the publisher sent it (re-serialised compactly).
    Json(Bytes),
    Binary(Bytes),
}

impl Data {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Data::Json(bytes) | Data::Binary(bytes) => bytes,
        }
    }

    pub fn kind_tag(&self) -> u8 {
        match self {
            Data::Json(_) => 0,
            Data::Binary(_) => 1,
        }
    }
}

/// String headers. A `BTreeMap` so that encoding and digests are deterministic.
pub type Headers = BTreeMap<String, String>;

/// A message as a publisher submits it to the store, after validation. The id is always
/// present here: transports generate one when the publisher did not.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewMessage {
    pub id: MessageId,
    pub name: Option<String>,
    pub headers: Headers,
    pub data: Data,
    /// Time to live in milliseconds, already checked against the namespace bounds.
    pub ttl_ms: Option<u64>,
}

impl NewMessage {
    /// Bytes that count against the message size limit: data, name, header keys and values.
    pub fn size_bytes(&self) -> usize {
        self.data.bytes().len()
            + self.name.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(key, value)| key.len() + value.len())
                .sum::<usize>()
    }

    /// Checks name, headers and size against the limits.
    pub fn validate(&self, limits: &Limits) -> Result<(), InvalidInput> {
        if let Some(name) = &self.name {
            if name.is_empty() || name.len() > limits.name_bytes_max {
                return Err(InvalidInput::message(format!(
                    "name must be 1..={} bytes",
                    limits.name_bytes_max
                )));
            }
            if name.chars().any(char::is_control) {
                return Err(InvalidInput::message(
                    "name must not contain control characters",
                ));
            }
        }
        if self.headers.len() > limits.headers_max {
            return Err(InvalidInput::message(format!(
                "{} headers, the limit is {}",
                self.headers.len(),
                limits.headers_max
            )));
        }
        if self.headers.keys().any(|key| key.is_empty()) {
            return Err(InvalidInput::message("header names must not be empty"));
        }
        let size = self.size_bytes();
        if size > limits.message_bytes_max {
            return Err(InvalidInput::new(
                crate::error::ErrorCode::MessageTooLarge,
                format!(
                    "message is {size} bytes, the limit is {} (data + name + headers)",
                    limits.message_bytes_max
                ),
            ));
        }
        Ok(())
    }

    /// Digest of everything the publisher chose, used to tell a retry (same content) from a
    /// conflicting reuse of the id (different content).
    pub fn content_digest(&self) -> ContentDigest {
        content_digest(&self.name, &self.headers, &self.data, self.ttl_ms)
    }
}

/// BLAKE3 over a message's publisher-chosen content; see [`NewMessage::content_digest`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ContentDigest(pub [u8; 32]);

pub fn content_digest(
    name: &Option<String>,
    headers: &Headers,
    data: &Data,
    ttl_ms: Option<u64>,
) -> ContentDigest {
    content_digest_with(name, headers, data, &blake3::hash(data.bytes()), ttl_ms)
}

/// [`content_digest`] with the BLAKE3 digest of the data already computed (the chain needs the
/// same digest, so the sequencer hashes each payload once).
pub fn content_digest_with(
    name: &Option<String>,
    headers: &Headers,
    data: &Data,
    data_digest: &blake3::Hash,
    ttl_ms: Option<u64>,
) -> ContentDigest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"herald:content:v1");
    match name {
        Some(name) => {
            hasher.update(&[1]);
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
        }
        None => {
            hasher.update(&[0]);
        }
    }
    hasher.update(&(headers.len() as u64).to_le_bytes());
    for (key, value) in headers {
        hasher.update(&(key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    }
    hasher.update(&[data.kind_tag()]);
    hasher.update(data_digest.as_bytes());
    match ttl_ms {
        Some(ttl) => hasher.update(&[1]).update(&ttl.to_le_bytes()),
        None => hasher.update(&[0]),
    };
    ContentDigest(*hasher.finalize().as_bytes())
}

/// A stored message: a position in its channel's stream plus what the publisher sent.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Message {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub serial: Serial,
    pub id: MessageId,
    /// Server time of acceptance; never decreases within a channel.
    pub time: Timestamp,
    pub name: Option<String>,
    pub headers: Headers,
    pub data: Data,
    pub ttl_ms: Option<u64>,
    /// Running hash over the stream up to and including this message.
    pub chain: ChainHash,
}

impl Message {
    pub fn position(&self) -> Position {
        Position::new(self.epoch.clone(), self.serial)
    }

    /// The serial before this one; with `serial` it lets a receiver detect gaps by itself.
    pub fn prev(&self) -> Serial {
        Serial(self.serial.0 - 1)
    }

    /// When the message's own TTL runs out, if it has one.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.ttl_ms.map(|ttl| self.time.plus_ms(ttl))
    }

    pub fn content_digest(&self) -> ContentDigest {
        content_digest(&self.name, &self.headers, &self.data, self.ttl_ms)
    }

    /// Bytes that count against retention and limits (same measure as [`NewMessage::size_bytes`]).
    pub fn size_bytes(&self) -> usize {
        self.data.bytes().len()
            + self.name.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(key, value)| key.len() + value.len())
                .sum::<usize>()
    }
}
