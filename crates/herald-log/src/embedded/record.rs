//! Record framing and the encoding of each record kind. Pure: bytes in, bytes out.
//!
//! A record is `len: u32 | crc32c: u32 | body[len]` (little endian), the CRC32C taken over the
//! body. The body starts with `kind: u8`, `batch_following: u32` (how many records of the
//! same publish batch follow this one; 0 for the last record of a batch and for records that
//! are not part of a batch) and `synced_through: u64` (the segment offset up to which every
//! byte was durable when this record was written: the start of its group write). The rest
//! depends on the kind; see docs/log-format.md.
//!
//! `synced_through` is what lets recovery tell a torn tail from damaged acknowledged data: a
//! valid record whose `synced_through` lies beyond a damaged offset proves that the damaged
//! bytes had been synced (and acknowledged) before it was written.
//!
//! # Invariants
//! - A frame header of eight zero bytes never starts a valid record (bodies are never empty),
//!   so it marks the end of the log in a zero-filled segment.
//! - Unknown kinds are an error, never skipped: a newer writer's record that this version
//!   cannot interpret must not be silently dropped from a stream.

use bytes::Bytes;
use herald_core::{
    ChainHash, ChannelName, Data, Epoch, Headers, Message, MessageId, Serial, SubscriberId,
    SubscriberOptions, SubscriberState, Timestamp,
};

use crate::states::{STATE_RECORD_OVERHEAD_BYTES, StateChange, check_state_key, check_state_value};
use crate::subscribers::SubscriberChange;
use crate::table::ChannelTip;

/// Bytes of `len | crc32c` before each body.
pub const FRAME_HEADER_BYTES: usize = 8;

/// Record kinds.
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_TIP: u8 = 2;
/// A durable subscriber's whole state; the newest per (channel, id) wins on recovery.
pub const KIND_SUBSCRIBER: u8 = 3;
/// A durable subscriber was removed.
pub const KIND_SUBSCRIBER_REMOVED: u8 = 4;
/// A state record's value under its key; the newest per key wins on recovery.
pub const KIND_STATE: u8 = 5;
/// A state record was removed.
pub const KIND_STATE_REMOVED: u8 = 6;

/// Largest epoch the encoding reserves room for when bounding a batch before it has one.
const EPOCH_BYTES_BOUND: usize = herald_core::names::EPOCH_BYTES_MAX;

/// A decoded record body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Message {
        message: Message,
        batch_following: u32,
        synced_through: u64,
    },
    Tip {
        tip: ChannelTip,
        synced_through: u64,
    },
    /// A subscriber snapshot (kind 3) or tombstone (kind 4).
    Subscriber {
        change: SubscriberChange,
        synced_through: u64,
    },
    /// A state record's value (kind 5) or tombstone (kind 6).
    State {
        change: StateChange,
        synced_through: u64,
    },
}

impl Record {
    pub fn synced_through(&self) -> u64 {
        match self {
            Record::Message { synced_through, .. }
            | Record::Tip { synced_through, .. }
            | Record::Subscriber { synced_through, .. }
            | Record::State { synced_through, .. } => *synced_through,
        }
    }
}

/// What is wrong with a frame or body. `Torn` problems may be the remains of an interrupted
/// write; `Invalid` ones can only be corruption or a bug, wherever they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The length or checksum does not match: a torn write or bit rot.
    Torn(String),
    /// The checksum matches but the body makes no sense (unknown kind, bad field).
    Invalid(String),
}

impl DecodeError {
    pub fn detail(&self) -> &str {
        match self {
            DecodeError::Torn(detail) | DecodeError::Invalid(detail) => detail,
        }
    }
}

/// Appends a message record to `out`. The `batch_following` count and the CRC are filled in by
/// [`seal_message_record`] once the batch's size is known.
pub fn encode_message(out: &mut Vec<u8>, message: &Message) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    put_channel(out, &message.channel);
    put_short(out, message.epoch.as_str().as_bytes());
    out.extend_from_slice(&message.serial.0.to_le_bytes());
    put_short(out, message.id.as_str().as_bytes());
    out.extend_from_slice(&message.time.0.to_le_bytes());
    match &message.name {
        Some(name) => {
            out.push(1);
            put_long(out, name.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(message.headers.len() as u32).to_le_bytes());
    for (key, value) in &message.headers {
        put_long(out, key.as_bytes());
        put_long(out, value.as_bytes());
    }
    out.push(message.data.kind_tag());
    put_long(out, message.data.bytes());
    match message.ttl_ms {
        Some(ttl) => {
            out.push(1);
            out.extend_from_slice(&ttl.to_le_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&message.chain.0);
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out.len() - start
}

/// Sets the batch count and `synced_through` of an encoded message record at `frame[..]` and
/// computes its CRC.
pub fn seal_message_record(frame: &mut [u8], batch_following: u32, synced_through: u64) {
    frame[FRAME_HEADER_BYTES + 1..FRAME_HEADER_BYTES + 5]
        .copy_from_slice(&batch_following.to_le_bytes());
    frame[FRAME_HEADER_BYTES + 5..FRAME_HEADER_BYTES + 13]
        .copy_from_slice(&synced_through.to_le_bytes());
    seal(frame);
}

/// Appends a complete tip record to `out`; returns its length.
pub fn encode_tip(out: &mut Vec<u8>, tip: &ChannelTip, synced_through: u64) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    out.push(KIND_TIP);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&synced_through.to_le_bytes());
    put_channel(out, &tip.channel);
    put_short(out, tip.epoch.as_str().as_bytes());
    out.extend_from_slice(&tip.serial.0.to_le_bytes());
    out.extend_from_slice(&tip.chain.0);
    out.extend_from_slice(&tip.time.0.to_le_bytes());
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    seal(&mut out[start..]);
    out.len() - start
}

/// Appends a subscriber snapshot or tombstone record to `out`, with `synced_through` 0; the
/// committer sets it and the CRC with [`seal_standalone_record`]. Returns its length.
///
/// Snapshots are encoded by the caller's thread (not the committer's), so the encoding asserts
/// the state's invariants there: a broken state is a bug of the caller.
pub fn encode_subscriber_change(out: &mut Vec<u8>, change: &SubscriberChange) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    match change {
        SubscriberChange::Save(state) => {
            out.push(KIND_SUBSCRIBER);
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
            put_channel(out, &state.channel);
            put_short(out, state.id.as_str().as_bytes());
            // Empty: not placed yet (the channel had no messages when it was created).
            put_short(
                out,
                state
                    .epoch
                    .as_ref()
                    .map_or(&[][..], |epoch| epoch.as_str().as_bytes()),
            );
            out.extend_from_slice(&state.acked_through.0.to_le_bytes());
            out.extend_from_slice(&state.created.0.to_le_bytes());
            out.extend_from_slice(&state.last_active.0.to_le_bytes());
            let options = &state.options;
            out.extend_from_slice(&options.ack_wait_ms.to_le_bytes());
            out.extend_from_slice(&options.max_deliveries.to_le_bytes());
            out.extend_from_slice(&options.inflight_max.to_le_bytes());
            out.extend_from_slice(&options.expires_after_ms.to_le_bytes());
            // Serials as gaps from the previous one (the first from `acked_through`), as
            // LEB128 varints: an inflight window of 100 takes ~100 bytes, not 800.
            put_varint(out, state.acked_above.len() as u64);
            let mut previous = state.acked_through;
            for serial in &state.acked_above {
                assert!(
                    *serial > previous,
                    "acked_above of {}/{} is not ascending above acked_through",
                    state.channel,
                    state.id
                );
                put_varint(out, serial.0 - previous.0);
                previous = *serial;
            }
            // Attempts are gaps from 0, so the record holds whatever the state holds (a stale
            // attempt at or below `acked_through` is the state's business, not the log's).
            put_varint(out, state.attempts.len() as u64);
            let mut previous = Serial(0);
            for (serial, count) in &state.attempts {
                assert!(
                    *serial > previous,
                    "attempts of {}/{} are not ascending",
                    state.channel,
                    state.id
                );
                put_varint(out, serial.0 - previous.0);
                put_varint(out, u64::from(*count));
                previous = *serial;
            }
        }
        SubscriberChange::Remove { channel, id } => {
            out.push(KIND_SUBSCRIBER_REMOVED);
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
            put_channel(out, channel);
            put_short(out, id.as_str().as_bytes());
        }
    }
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out.len() - start
}

/// Appends a state record or tombstone to `out`, with `synced_through` 0; the committer sets it
/// and the CRC with [`seal_standalone_record`]. Returns its length, which is
/// [`state_record_bytes`].
///
/// The caller checked the key and value ([`StateChange::check`]); a bad one here is a bug.
pub fn encode_state_change(out: &mut Vec<u8>, change: &StateChange) -> usize {
    assert!(
        change.check().is_ok(),
        "state change for key {:?} was not checked before encoding",
        change.key()
    );
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    out.push(match change {
        StateChange::Save { .. } => KIND_STATE,
        StateChange::Remove { .. } => KIND_STATE_REMOVED,
    });
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    let key = change.key().as_bytes();
    // Keys reach 256 bytes, one more than a u8 length holds.
    out.extend_from_slice(
        &u16::try_from(key.len())
            .expect("key fits u16")
            .to_le_bytes(),
    );
    out.extend_from_slice(key);
    if let StateChange::Save { value, .. } = change {
        put_long(out, value);
    }
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out.len() - start
}

/// The encoded size of a state record or tombstone (exact).
pub fn state_record_bytes(change: &StateChange) -> usize {
    match change {
        StateChange::Save { key, value } => state_value_record_bytes(key, value),
        // No value length field.
        StateChange::Remove { key } => STATE_RECORD_OVERHEAD_BYTES - 4 + key.len(),
    }
}

/// The encoded size of the record saving `value` under `key` (exact).
pub fn state_value_record_bytes(key: &str, value: &[u8]) -> usize {
    STATE_RECORD_OVERHEAD_BYTES + key.len() + value.len()
}

/// Sets `synced_through` of an encoded record that is not part of a batch and computes its CRC.
pub fn seal_standalone_record(frame: &mut [u8], synced_through: u64) {
    seal_message_record(frame, 0, synced_through);
}

fn seal(frame: &mut [u8]) {
    let crc = crc32c::crc32c(&frame[FRAME_HEADER_BYTES..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// An upper bound on the encoded size of a message record for `new` on `channel`.
pub fn message_record_bound(channel: &ChannelName, new: &herald_core::NewMessage) -> usize {
    FRAME_HEADER_BYTES
        + 1 // kind
        + 4 // batch_following
        + 8 // synced_through
        + 2 + channel.as_str().len()
        + 1 + EPOCH_BYTES_BOUND
        + 8 // serial
        + 1 + new.id.as_str().len()
        + 8 // time
        + 1 + new.name.as_ref().map_or(0, |name| 4 + name.len())
        + 4 + new.headers.iter().map(|(key, value)| 8 + key.len() + value.len()).sum::<usize>()
        + 1 + 4 + new.data.bytes().len()
        + 1 + 8 // ttl
        + 32 // chain
}

/// The encoded size of a tip record (exact).
pub fn tip_record_bytes(tip: &ChannelTip) -> usize {
    FRAME_HEADER_BYTES
        + 1
        + 4
        + 8
        + 2
        + tip.channel.as_str().len()
        + 1
        + tip.epoch.as_str().len()
        + 8
        + 32
        + 8
}

/// Reads a frame header: `Ok(None)` for the all-zero end-of-log marker, else the body length.
pub fn frame_body_len(header: &[u8; FRAME_HEADER_BYTES]) -> Option<usize> {
    if header.iter().all(|&byte| byte == 0) {
        return None;
    }
    Some(u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize)
}

/// Checks a whole frame's length and CRC, then decodes its body.
pub fn decode_frame(frame: &[u8]) -> Result<Record, DecodeError> {
    if frame.len() < FRAME_HEADER_BYTES {
        return Err(DecodeError::Torn("frame shorter than its header".into()));
    }
    let body_len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
    if body_len == 0 || FRAME_HEADER_BYTES + body_len != frame.len() {
        return Err(DecodeError::Torn(format!(
            "record length {body_len} does not match its frame"
        )));
    }
    let stored_crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
    let body = &frame[FRAME_HEADER_BYTES..];
    let actual_crc = crc32c::crc32c(body);
    if stored_crc != actual_crc {
        return Err(DecodeError::Torn(format!(
            "CRC mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x})"
        )));
    }
    decode_body(body).map_err(DecodeError::Invalid)
}

fn decode_body(body: &[u8]) -> Result<Record, String> {
    let mut reader = Reader { bytes: body };
    let kind = reader.u8()?;
    let batch_following = reader.u32()?;
    let synced_through = reader.u64()?;
    let record = match kind {
        KIND_MESSAGE => {
            let channel = reader.channel()?;
            let epoch = reader.epoch()?;
            let serial = Serial(reader.u64()?);
            if serial.0 == 0 {
                return Err("message with serial 0".into());
            }
            let id = MessageId::parse(reader.short_str()?).map_err(|e| e.to_string())?;
            let time = Timestamp(reader.u64()?);
            let name = match reader.u8()? {
                0 => None,
                1 => Some(reader.long_str()?.to_owned()),
                other => return Err(format!("bad name flag {other}")),
            };
            let header_count = reader.u32()?;
            let mut headers = Headers::new();
            for _ in 0..header_count {
                let key = reader.long_str()?.to_owned();
                let value = reader.long_str()?.to_owned();
                headers.insert(key, value);
            }
            let data_kind = reader.u8()?;
            let data_bytes = Bytes::copy_from_slice(reader.long_bytes()?);
            let data = match data_kind {
                0 => Data::Json(data_bytes),
                1 => Data::Binary(data_bytes),
                other => return Err(format!("unknown data kind {other}")),
            };
            let ttl_ms = match reader.u8()? {
                0 => None,
                1 => Some(reader.u64()?),
                other => return Err(format!("bad ttl flag {other}")),
            };
            let chain = ChainHash(reader.array32()?);
            Record::Message {
                message: Message {
                    channel,
                    epoch,
                    serial,
                    id,
                    time,
                    name,
                    headers,
                    data,
                    ttl_ms,
                    chain,
                },
                batch_following,
                synced_through,
            }
        }
        KIND_TIP => {
            if batch_following != 0 {
                return Err("tip record claims batch members".into());
            }
            let channel = reader.channel()?;
            let epoch = reader.epoch()?;
            let serial = Serial(reader.u64()?);
            let chain = ChainHash(reader.array32()?);
            let time = Timestamp(reader.u64()?);
            Record::Tip {
                tip: ChannelTip {
                    channel,
                    epoch,
                    serial,
                    chain,
                    time,
                },
                synced_through,
            }
        }
        KIND_SUBSCRIBER | KIND_SUBSCRIBER_REMOVED => {
            if batch_following != 0 {
                return Err("subscriber record claims batch members".into());
            }
            let channel = reader.channel()?;
            let id = SubscriberId::parse(reader.short_str()?).map_err(|e| e.to_string())?;
            let change = if kind == KIND_SUBSCRIBER_REMOVED {
                SubscriberChange::Remove { channel, id }
            } else {
                let epoch = match reader.short_str()? {
                    "" => None,
                    text => Some(Epoch::parse(text).map_err(|e| e.to_string())?),
                };
                let acked_through = Serial(reader.u64()?);
                let created = Timestamp(reader.u64()?);
                let last_active = Timestamp(reader.u64()?);
                let options = SubscriberOptions {
                    ack_wait_ms: reader.u64()?,
                    max_deliveries: reader.u32()?,
                    inflight_max: reader.u32()?,
                    expires_after_ms: reader.u64()?,
                };
                // Counts are checked against the bytes left by the reads themselves; nothing
                // is preallocated from a count.
                let mut acked_above = Vec::new();
                let mut previous = acked_through;
                for _ in 0..reader.varint()? {
                    previous = reader.serial_after(previous)?;
                    acked_above.push(previous);
                }
                let mut attempts = Vec::new();
                let mut previous = Serial(0);
                for _ in 0..reader.varint()? {
                    previous = reader.serial_after(previous)?;
                    let count = u32::try_from(reader.varint()?)
                        .map_err(|_| "delivery count out of range".to_string())?;
                    attempts.push((previous, count));
                }
                SubscriberChange::Save(SubscriberState {
                    channel,
                    id,
                    epoch,
                    acked_through,
                    acked_above,
                    attempts,
                    options,
                    created,
                    last_active,
                })
            };
            Record::Subscriber {
                change,
                synced_through,
            }
        }
        KIND_STATE | KIND_STATE_REMOVED => {
            if batch_following != 0 {
                return Err("state record claims batch members".into());
            }
            let key_len = usize::from(reader.u16()?);
            let key = std::str::from_utf8(reader.take(key_len)?)
                .map_err(|_| "state key is not UTF-8".to_string())?;
            check_state_key(key).map_err(|invalid| invalid.message)?;
            let key = key.to_owned();
            let change = if kind == KIND_STATE_REMOVED {
                StateChange::Remove { key }
            } else {
                let value = reader.long_bytes()?;
                check_state_value(value).map_err(|invalid| invalid.message)?;
                StateChange::Save {
                    key,
                    value: Bytes::copy_from_slice(value),
                }
            };
            Record::State {
                change,
                synced_through,
            }
        }
        other => return Err(format!("unknown record kind {other}")),
    };
    if !reader.bytes.is_empty() {
        return Err(format!("{} trailing bytes in record", reader.bytes.len()));
    }
    Ok(record)
}

fn put_channel(out: &mut Vec<u8>, channel: &ChannelName) {
    let bytes = channel.as_str().as_bytes();
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A field of at most 255 bytes (epochs and ids are validated far below that).
fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).expect("short field fits 255 bytes"));
    out.extend_from_slice(bytes);
}

/// LEB128: seven bits per byte, low first, high bit set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(
        &u32::try_from(bytes.len())
            .expect("field fits u32")
            .to_le_bytes(),
    );
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < count {
            return Err("record body ends early".into());
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn array32(&mut self) -> Result<[u8; 32], String> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn short_str(&mut self) -> Result<&'a str, String> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?).map_err(|_| "field is not UTF-8".to_string())
    }
    fn long_bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn long_str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.long_bytes()?).map_err(|_| "field is not UTF-8".to_string())
    }
    fn channel(&mut self) -> Result<ChannelName, String> {
        let len = usize::from(self.u16()?);
        let text =
            std::str::from_utf8(self.take(len)?).map_err(|_| "channel is not UTF-8".to_string())?;
        ChannelName::parse(text).map_err(|e| e.to_string())
    }
    fn epoch(&mut self) -> Result<Epoch, String> {
        Epoch::parse(self.short_str()?).map_err(|e| e.to_string())
    }
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("varint overflows u64".into());
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
    /// A serial stored as its (non-zero) gap from `previous`.
    fn serial_after(&mut self, previous: Serial) -> Result<Serial, String> {
        let gap = self.varint()?;
        if gap == 0 {
            return Err("subscriber serials are not ascending".into());
        }
        previous
            .0
            .checked_add(gap)
            .map(Serial)
            .ok_or_else(|| "subscriber serial overflows".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        let epoch = Epoch::parse("E1").unwrap();
        let id = MessageId::parse("m-1").unwrap();
        let data = Data::Binary(Bytes::from_static(b"\x00\x01payload"));
        let mut headers = Headers::new();
        headers.insert("k".into(), "v".into());
        Message {
            channel: ChannelName::parse("chat:room").unwrap(),
            chain: ChainHash::genesis(&epoch).next(Serial(1), &id, &data),
            epoch,
            serial: Serial(1),
            id,
            time: Timestamp(1234),
            name: Some("greeting".into()),
            headers,
            data,
            ttl_ms: Some(5000),
        }
    }

    #[test]
    fn message_round_trip_and_bound() {
        let message = sample();
        let mut out = Vec::new();
        let len = encode_message(&mut out, &message);
        seal_message_record(&mut out, 3, 4096);
        assert_eq!(len, out.len());
        let new = herald_core::NewMessage {
            id: message.id.clone(),
            name: message.name.clone(),
            headers: message.headers.clone(),
            data: message.data.clone(),
            ttl_ms: message.ttl_ms,
        };
        assert!(message_record_bound(&message.channel, &new) >= len);
        assert_eq!(
            decode_frame(&out),
            Ok(Record::Message {
                message,
                batch_following: 3,
                synced_through: 4096,
            })
        );
    }

    #[test]
    fn tip_round_trip_and_size() {
        let message = sample();
        let tip = ChannelTip {
            channel: message.channel,
            epoch: message.epoch,
            serial: Serial(9),
            chain: message.chain,
            time: Timestamp(77),
        };
        let mut out = Vec::new();
        let len = encode_tip(&mut out, &tip, 64);
        assert_eq!(len, tip_record_bytes(&tip));
        assert_eq!(
            decode_frame(&out),
            Ok(Record::Tip {
                tip,
                synced_through: 64
            })
        );
    }

    fn subscriber() -> SubscriberState {
        let mut state = SubscriberState::new(
            ChannelName::parse("jobs:a").unwrap(),
            SubscriberId::parse("worker-1").unwrap(),
            herald_core::Position::new(Epoch::parse("E1").unwrap(), Serial(10)),
            SubscriberOptions::default(),
            Timestamp(1_000),
        );
        state.last_active = Timestamp(2_000);
        state.ack_one(Serial(12));
        state.ack_one(Serial(300));
        state.ack_one(Serial(u64::MAX));
        state.record_attempt(Serial(11));
        state.record_attempt(Serial(11));
        state.record_attempt(Serial(200_000));
        state
    }

    #[test]
    fn subscriber_records_round_trip_compactly() {
        let state = subscriber();
        let mut out = Vec::new();
        let len = encode_subscriber_change(&mut out, &SubscriberChange::Save(state.clone()));
        seal_standalone_record(&mut out, 4096);
        assert_eq!(len, out.len());
        // 21 header + 54 fixed + 6 channel + 8 id + 2 epoch + a few list bytes.
        assert!(len < 150, "snapshot takes {len} bytes");
        assert_eq!(
            decode_frame(&out),
            Ok(Record::Subscriber {
                change: SubscriberChange::Save(state.clone()),
                synced_through: 4096,
            })
        );
        let removal = SubscriberChange::Remove {
            channel: state.channel.clone(),
            id: state.id.clone(),
        };
        let mut out = Vec::new();
        encode_subscriber_change(&mut out, &removal);
        seal_standalone_record(&mut out, 64);
        assert_eq!(
            decode_frame(&out),
            Ok(Record::Subscriber {
                change: removal,
                synced_through: 64
            })
        );
    }

    #[test]
    fn a_subscriber_not_placed_yet_round_trips_without_an_epoch() {
        let state = SubscriberState::unplaced(
            ChannelName::parse("jobs:empty").unwrap(),
            SubscriberId::parse("worker-1").unwrap(),
            SubscriberOptions::default(),
            Timestamp(1_000),
        );
        let mut out = Vec::new();
        encode_subscriber_change(&mut out, &SubscriberChange::Save(state.clone()));
        seal_standalone_record(&mut out, 4096);
        assert_eq!(
            decode_frame(&out),
            Ok(Record::Subscriber {
                change: SubscriberChange::Save(state),
                synced_through: 4096,
            })
        );
    }

    #[test]
    fn a_subscriber_record_with_serials_out_of_order_is_invalid() {
        let mut state = subscriber();
        state.acked_above = vec![Serial(12)];
        state.attempts.clear();
        let mut out = Vec::new();
        encode_subscriber_change(&mut out, &SubscriberChange::Save(state));
        // The last two bytes are the acked_above gap (2) and the attempts count (0): a zero
        // gap would repeat a serial.
        let gap = out.len() - 2;
        assert_eq!(out[gap], 2);
        out[gap] = 0;
        seal_standalone_record(&mut out, 64);
        assert!(
            matches!(decode_frame(&out), Err(DecodeError::Invalid(detail)) if detail.contains("ascending"))
        );
    }

    #[test]
    fn state_records_round_trip_with_their_exact_size() {
        let changes = [
            StateChange::Save {
                key: "mqtt/session:client-1".into(),
                value: Bytes::from_static(b"\x00opaque\xff"),
            },
            StateChange::Save {
                key: "k".repeat(crate::states::STATE_KEY_BYTES_MAX),
                value: Bytes::new(),
            },
            StateChange::Remove {
                key: "mqtt/session:client-1".into(),
            },
        ];
        for change in changes {
            let mut out = Vec::new();
            let len = encode_state_change(&mut out, &change);
            seal_standalone_record(&mut out, 4096);
            assert_eq!(len, out.len());
            assert_eq!(len, state_record_bytes(&change));
            assert_eq!(
                decode_frame(&out),
                Ok(Record::State {
                    change,
                    synced_through: 4096
                })
            );
        }
    }

    #[test]
    fn a_state_record_with_a_bad_key_is_invalid() {
        let mut out = Vec::new();
        encode_state_change(&mut out, &StateChange::Remove { key: "ab".into() });
        // The key's last byte becomes a space: well framed, but not a key.
        let last = out.len() - 1;
        out[last] = b' ';
        seal_standalone_record(&mut out, 64);
        assert!(
            matches!(decode_frame(&out), Err(DecodeError::Invalid(detail)) if detail.contains("state key"))
        );
    }

    #[test]
    fn flipped_bit_is_torn_and_unknown_kind_is_invalid() {
        let mut out = Vec::new();
        encode_message(&mut out, &sample());
        seal_message_record(&mut out, 0, 64);
        let mut flipped = out.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(decode_frame(&flipped), Err(DecodeError::Torn(_))));
        let mut unknown = out;
        unknown[FRAME_HEADER_BYTES] = KIND_STATE_REMOVED + 1;
        seal(&mut unknown);
        assert!(matches!(
            decode_frame(&unknown),
            Err(DecodeError::Invalid(_))
        ));
    }
}
