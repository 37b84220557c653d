//! Bytes to packets for one connection: the protocol level of the CONNECT decides the codec
//! (3.1.1 or 5.0), then every packet is decoded with it. Shared by the server's listener and
//! the fuzz target, so both exercise the same path.
//!
//! # Invariants
//! - Cancel-safe and incremental: bytes that do not form a whole packet yet stay in the
//!   buffer; `Ok(None)` asks for more.
//! - A packet over `max_packet_bytes` is an error, decided from its header, before its body
//!   is buffered.

use bytes::BytesMut;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
use rmqtt_codec::{v3, v5};
use tokio_util::codec::Decoder as _;

use crate::session::Packet;

enum State {
    /// Before CONNECT: the protocol level decides the codec.
    Sniffing,
    V3(v3::Codec),
    V5(v5::Codec),
}

/// The packet decoder of one connection.
pub struct PacketDecoder {
    state: State,
    max_packet_bytes: u32,
}

impl PacketDecoder {
    pub fn new(max_packet_bytes: u32) -> PacketDecoder {
        PacketDecoder {
            state: State::Sniffing,
            max_packet_bytes,
        }
    }

    /// The next whole packet in `buffer` (consumed from it), `None` when more bytes are needed.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        loop {
            match &mut self.state {
                State::Sniffing => match VersionCodec.decode(buffer)? {
                    None => return Ok(None),
                    Some(ProtocolVersion::MQTT3) => {
                        self.state = State::V3(v3::Codec::new(self.max_packet_bytes));
                    }
                    Some(ProtocolVersion::MQTT5) => {
                        self.state = State::V5(v5::Codec::new(self.max_packet_bytes, 0));
                    }
                },
                State::V3(codec) => {
                    return Ok(codec.decode(buffer)?.map(|(packet, _)| Packet::V3(packet)));
                }
                State::V5(codec) => {
                    return Ok(codec.decode(buffer)?.map(|(packet, _)| Packet::V5(packet)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_split_anywhere_decodes_once_whole() {
        let connect = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x1e\x00\x03raw\xc0\x00";
        for split in 1..connect.len() {
            let mut decoder = PacketDecoder::new(1024);
            let mut buffer = BytesMut::from(&connect[..split]);
            let early = decoder.decode(&mut buffer).unwrap();
            if split < 17 {
                assert!(early.is_none(), "split {split}");
                buffer.extend_from_slice(&connect[split..]);
                assert!(matches!(
                    decoder.decode(&mut buffer),
                    Ok(Some(Packet::V3(_)))
                ));
            } else {
                assert!(matches!(early, Some(Packet::V3(_))), "split {split}");
                buffer.extend_from_slice(&connect[split..]);
            }
            // The PINGREQ after it.
            assert!(matches!(
                decoder.decode(&mut buffer),
                Ok(Some(Packet::V3(_)))
            ));
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn a_packet_over_the_limit_is_refused() {
        let mut decoder = PacketDecoder::new(16);
        let mut buffer = BytesMut::from(&b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x1e\x00\x03raw"[..]);
        assert!(matches!(decoder.decode(&mut buffer), Ok(Some(_))));
        let mut big = BytesMut::from(&b"\x30\x7f"[..]);
        assert!(decoder.decode(&mut big).is_err());
    }
}
