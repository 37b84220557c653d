//! The reason codes of refusals in each protocol version: pure mappings from the session's
//! own verdicts ([`AuthRefusal`], [`AppendOutcome`], a SUBSCRIBE [`Refusal`]) to the v3 return
//! codes and v5 reason codes on the wire; and the rule for v5 Reason Strings, applied to
//! every packet the session sends.
//!
//! # Invariants
//! - Every refusal maps to a failure code (v3 SUBACK 0x80; v5 codes >= 0x80); only a granted
//!   verdict maps to a success code.
//! - v3 has no negative PUBACK: a refused publish is classified with the v5 DISCONNECT code
//!   closest to its PUBACK reason, for logs and counters.
//! - A v5 Reason String is only a diagnostic: it is left out of a packet rather than make the
//!   packet larger than the client's Maximum Packet Size, and left out of everything but
//!   CONNACK and DISCONNECT when the client set Request Problem Information to 0.

use bytes::BytesMut;
use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};
use tokio_util::codec::Encoder as _;

use super::subscriptions::Refusal;
use super::{AppendOutcome, AuthRefusal};

/// The CONNACK codes (v3, v5) and the detail of refused credentials.
pub(super) fn auth_refusal(
    refusal: AuthRefusal,
) -> (v3::ConnectAckReason, v5::ConnectAckReason, &'static str) {
    match refusal {
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
    }
}

/// The PUBACK/PUBREC reason and its detail when an append was not durable; `None` when it was.
pub(super) fn append_refusal(outcome: AppendOutcome) -> Option<(v5::PublishAckReason, String)> {
    match outcome {
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
    }
}

/// The close code of a publish refused on a v3 connection (which has no negative PUBACK).
pub(super) fn disconnect_for_publish_refusal(reason: v5::PublishAckReason) -> DisconnectReasonCode {
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

/// Whether a client's v5 PUBREC accepted the message (reason codes below 0x80 are successes).
pub(super) fn is_success(reason: v5::PublishAckReason) -> bool {
    u8::from(reason) < 0x80
}

/// A v3 SUBACK return code: the granted QoS, or 0x80 for any refusal.
pub(super) fn v3_suback(result: &Result<QoS, Refusal>) -> v3::SubscribeReturnCode {
    match result {
        Ok(qos) => v3::SubscribeReturnCode::Success(*qos),
        Err(_) => v3::SubscribeReturnCode::Failure,
    }
}

/// A v5 SUBACK reason code: the granted QoS, or why the filter was refused.
pub(super) fn v5_suback(result: &Result<QoS, Refusal>) -> v5::SubscribeAckReason {
    match result {
        Ok(QoS::AtMostOnce) => v5::SubscribeAckReason::GrantedQos0,
        Ok(QoS::AtLeastOnce) => v5::SubscribeAckReason::GrantedQos1,
        Ok(QoS::ExactlyOnce) => v5::SubscribeAckReason::GrantedQos2,
        Err(Refusal::NotAuthorized) => v5::SubscribeAckReason::NotAuthorized,
        Err(Refusal::TopicFilterInvalid) => v5::SubscribeAckReason::TopicFilterInvalid,
        Err(Refusal::QuotaExceeded) => v5::SubscribeAckReason::QuotaExceeded,
    }
}

/// Removes the Reason String of `packet` when the client must not get it: when it would make
/// the packet larger than `peer_max_packet_bytes` (MQTT-3.14.2-3 for DISCONNECT, and the same
/// rule for every packet with a Reason String), or, for packets other than CONNACK and
/// DISCONNECT, when the client did not request problem information (MQTT-3.1.2-29). The
/// session never sets User Properties, so they need no such care.
pub(super) fn omit_unwanted_reason_string(
    packet: &mut v5::Packet,
    peer_max_packet_bytes: Option<u32>,
    peer_wants_problem_info: bool,
) {
    if !reason_string_mut(packet).is_some_and(|reason| reason.is_some()) {
        return;
    }
    let allowed = peer_wants_problem_info
        || matches!(
            packet,
            v5::Packet::ConnectAck(_) | v5::Packet::Disconnect(_)
        );
    // Only refusals and closes carry a Reason String: measuring them with the codec itself
    // is exact and rare enough to be cheap.
    let fits = || peer_max_packet_bytes.is_none_or(|max| encoded_bytes(packet) <= max as usize);
    if !(allowed && fits())
        && let Some(reason) = reason_string_mut(packet)
    {
        *reason = None;
    }
}

/// The Reason String field of the packets that have one.
fn reason_string_mut(packet: &mut v5::Packet) -> Option<&mut Option<impl AsRef<str>>> {
    match packet {
        v5::Packet::ConnectAck(ack) => Some(&mut ack.reason_string),
        v5::Packet::Disconnect(disconnect) => Some(&mut disconnect.reason_string),
        v5::Packet::PublishAck(ack) | v5::Packet::PublishReceived(ack) => {
            Some(&mut ack.reason_string)
        }
        v5::Packet::PublishRelease(ack) | v5::Packet::PublishComplete(ack) => {
            Some(&mut ack.reason_string)
        }
        v5::Packet::SubscribeAck(ack) => Some(&mut ack.reason_string),
        v5::Packet::UnsubscribeAck(ack) => Some(&mut ack.reason_string),
        v5::Packet::Auth(auth) => Some(&mut auth.reason_string),
        _ => None,
    }
}

/// The size of `packet` as rmqtt-codec encodes it (with no size limit, as the driver does);
/// `usize::MAX` if it cannot be encoded at all.
pub(super) fn encoded_bytes(packet: &v5::Packet) -> usize {
    let mut buffer = BytesMut::new();
    match v5::Codec::new(0, 0).encode(packet.clone(), &mut buffer) {
        Ok(()) => buffer.len(),
        Err(_) => usize::MAX,
    }
}
