//! The per-channel hash chain: `chain_n = BLAKE3(chain_{n-1} || serial || id || BLAKE3(data))`.
//!
//! The chain starts from a genesis value derived from the epoch, so two incarnations of a
//! channel never share chain values. A receiver that recomputes the chain over what it got
//! knows it holds a gapless, unaltered prefix of the stream.

use std::fmt;

use crate::message::Data;
use crate::names::{Epoch, MessageId};
use crate::position::Serial;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The chain value "before serial 1" of an epoch.
    pub fn genesis(epoch: &Epoch) -> ChainHash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"herald:chain:v1:");
        hasher.update(epoch.as_str().as_bytes());
        ChainHash(*hasher.finalize().as_bytes())
    }

    /// The chain value after appending a message.
    pub fn next(&self, serial: Serial, id: &MessageId, data: &Data) -> ChainHash {
        self.next_with_digest(serial, id, &blake3::hash(data.bytes()))
    }

    /// [`ChainHash::next`] with the BLAKE3 digest of the data already computed.
    pub fn next_with_digest(
        &self,
        serial: Serial,
        id: &MessageId,
        data_digest: &blake3::Hash,
    ) -> ChainHash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.0);
        hasher.update(&serial.0.to_le_bytes());
        hasher.update(&(id.as_str().len() as u64).to_le_bytes());
        hasher.update(id.as_str().as_bytes());
        hasher.update(data_digest.as_bytes());
        ChainHash(*hasher.finalize().as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut text = String::with_capacity(64);
        for byte in self.0 {
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        text
    }

    pub fn from_hex(text: &str) -> Option<ChainHash> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (index, pair) in bytes.chunks(2).enumerate() {
            let high = hex_value(pair[0])?;
            let low = hex_value(pair[1])?;
            out[index] = (high << 4) | low;
        }
        Some(ChainHash(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn hex_round_trip_and_sensitivity() {
        let epoch = Epoch::parse("e1").unwrap();
        let id = MessageId::parse("a").unwrap();
        let data = Data::Json(Bytes::from_static(b"1"));
        let genesis = ChainHash::genesis(&epoch);
        let first = genesis.next(Serial(1), &id, &data);
        assert_eq!(ChainHash::from_hex(&first.to_hex()), Some(first));
        assert_ne!(first, genesis.next(Serial(2), &id, &data));
        assert_ne!(
            first,
            genesis.next(Serial(1), &id, &Data::Json(Bytes::from_static(b"2")))
        );
        assert_ne!(genesis, ChainHash::genesis(&Epoch::parse("e2").unwrap()));
        assert_eq!(ChainHash::from_hex("zz"), None);
    }
}
