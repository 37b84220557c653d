//! The reason codes of refusals in each protocol version: pure mappings from the session's
//! own verdicts ([`AuthRefusal`], [`AppendOutcome`], a SUBSCRIBE [`Refusal`]) to the v3 return
//! codes and v5 reason codes on the wire.
//!
//! # Invariants
//! - Every refusal maps to a failure code (v3 SUBACK 0x80; v5 codes >= 0x80); only a granted
//!   verdict maps to a success code.
//! - v3 has no negative PUBACK: a refused publish is classified with the v5 DISCONNECT code
//!   closest to its PUBACK reason, for logs and counters.

use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};

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
        Err(Refusal::SharedNotSupported) => v5::SubscribeAckReason::SharedSubscriptionNotSupported,
        Err(Refusal::QuotaExceeded) => v5::SubscribeAckReason::QuotaExceeded,
    }
}
