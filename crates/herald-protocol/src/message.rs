//! Messages as JSON, read pages and channel status.

use std::collections::BTreeMap;

use base64::Engine as _;
use herald_core::{Data, Message, SkippedRange, StreamStatus};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::publish::{BASE64, Encoding};

/// A stored message: `{id, channel, serial, epoch, position, prev, chain, time, name?,
/// headers?, data, encoding?, expires_at?}`. Times are milliseconds since the Unix epoch;
/// `prev` is the serial before this one (0 for the first message), so a reader can detect a
/// gap by itself; `chain` is the running BLAKE3 hash in hex.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MessageBody {
    pub id: String,
    pub channel: String,
    pub serial: u64,
    pub epoch: String,
    pub position: String,
    pub prev: u64,
    pub chain: String,
    pub time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    pub data: Box<RawValue>,
    /// `"base64"` when `data` is a base64 string of binary payload; absent for JSON data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl MessageBody {
    pub fn from_message(message: &Message) -> Self {
        let (data, encoding) = match &message.data {
            Data::Json(bytes) => match std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| RawValue::from_string(text.to_owned()).ok())
            {
                Some(raw) => (raw, None),
                // Stored JSON data is valid by construction; should it ever not be, it is
                // shown as binary rather than as broken JSON.
                None => (base64_raw(bytes), Some(Encoding::Base64)),
            },
            Data::Binary(bytes) => (base64_raw(bytes), Some(Encoding::Base64)),
        };
        Self {
            id: message.id.to_string(),
            channel: message.channel.to_string(),
            serial: message.serial.0,
            epoch: message.epoch.to_string(),
            position: message.position().to_string(),
            prev: message.prev().0,
            chain: message.chain.to_hex(),
            time: message.time.0,
            name: message.name.clone(),
            headers: (!message.headers.is_empty()).then(|| message.headers.clone()),
            data,
            encoding,
            expires_at: message.expires_at().map(|at| at.0),
        }
    }
}

fn base64_raw(bytes: &[u8]) -> Box<RawValue> {
    let text = serde_json::to_string(&BASE64.encode(bytes)).expect("a string serialises");
    RawValue::from_string(text).expect("a JSON string is valid JSON")
}

/// A range of serials a read passed over, and why (`expired`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedBody {
    pub from: u64,
    pub to: u64,
    pub reason: String,
}

impl From<&SkippedRange> for SkippedBody {
    fn from(range: &SkippedRange) -> Self {
        Self {
            from: range.from.0,
            to: range.to.0,
            reason: range.reason.as_str().to_owned(),
        }
    }
}

/// One page of a read. `next` is the cursor for the following page in the same direction
/// (pass it as `after=` for forward pages, `before=` for backward ones); `top` is the
/// channel's newest position; `more` says whether more messages may follow in that direction.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PageBody {
    pub messages: Vec<MessageBody>,
    pub next: Option<String>,
    pub top: Option<String>,
    pub more: bool,
    pub skipped: Vec<SkippedBody>,
}

/// `GET /v1/channels/{channel}`. A channel that never had a message has no status: the server
/// answers `404 channel_not_found` instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatusBody {
    pub channel: String,
    pub epoch: String,
    /// First readable position (null when no message is readable: all expired or reclaimed).
    pub first: Option<String>,
    /// The newest position ever accepted, readable or not.
    pub top: String,
    /// Retained messages whose TTL has not run out, and their size in bytes.
    pub messages: u64,
    pub bytes: u64,
}

impl ChannelStatusBody {
    pub fn new(channel: &str, status: &StreamStatus) -> Self {
        Self {
            channel: channel.to_owned(),
            epoch: status.epoch.to_string(),
            first: status.first.as_ref().map(ToString::to_string),
            top: status.top.to_string(),
            messages: status.messages,
            bytes: status.bytes,
        }
    }
}
