//! Tests of the v5 Reason Strings the session sends (`session/reasons.rs`): left out when
//! they would exceed the client's Maximum Packet Size or it asked for no problem information.

use std::num::NonZeroU32;

use super::*;

/// A v5 CONNECT with the client's Maximum Packet Size and Request Problem Information.
fn connect(max_packet_size: Option<u32>, request_problem_info: bool) -> v5::Connect {
    v5::Connect {
        clean_start: true,
        client_id: "dev-1".into(),
        max_packet_size: max_packet_size.and_then(NonZeroU32::new),
        request_problem_info,
        ..v5::Connect::default()
    }
}

/// The reason code and Reason String of the DISCONNECT a shutdown sends.
fn shutdown_disconnect(connect: v5::Connect) -> (DisconnectReasonCode, Option<String>) {
    let (mut session, _) = v5_connect(connect);
    session.handle_shutdown();
    let actions = drain(&mut session);
    let [Packet::V5(v5::Packet::Disconnect(disconnect))] = sent(&actions)[..] else {
        panic!("{actions:?}")
    };
    (
        disconnect.reason_code,
        disconnect.reason_string.as_ref().map(ToString::to_string),
    )
}

#[test]
fn a_disconnect_leaves_out_a_reason_string_the_client_has_no_room_for() {
    let shutting_down = DisconnectReasonCode::ServerShuttingDown;
    let (code, reason) = shutdown_disconnect(connect(None, true));
    assert_eq!(code, shutting_down);
    let reason = reason.expect("a reason string when there is room");
    // Fixed header (2), reason code, property length, then 0x1F and the length-prefixed string.
    let full_bytes = 4 + 3 + reason.len();
    let fits = shutdown_disconnect(connect(u32::try_from(full_bytes).ok(), true));
    assert_eq!(fits, (shutting_down, Some(reason)));
    let one_byte_short = shutdown_disconnect(connect(u32::try_from(full_bytes - 1).ok(), true));
    assert_eq!(
        one_byte_short,
        (shutting_down, None),
        "the code still goes out"
    );
    // Request Problem Information = 0 still allows it on DISCONNECT (MQTT-3.1.2-29).
    assert!(shutdown_disconnect(connect(None, false)).1.is_some());
}

#[test]
fn a_connack_refusal_leaves_out_a_reason_string_the_client_has_no_room_for() {
    let refused = |max_packet_size| {
        let mut session = v5_connecting(v5::Connect {
            auth_method: Some("SCRAM-SHA-1".into()),
            ..connect(max_packet_size, false)
        });
        let actions = drain(&mut session);
        let [Packet::V5(v5::Packet::ConnectAck(connack))] = sent(&actions)[..] else {
            panic!("{actions:?}")
        };
        assert_eq!(
            connack.reason_code,
            v5::ConnectAckReason::BadAuthenticationMethod
        );
        connack.reason_string.is_some()
    };
    assert!(
        refused(None),
        "CONNACK may carry it without problem information"
    );
    assert!(!refused(Some(16)));
}

/// Publishes at QoS 1 and has the append refused; returns the PUBACK's Reason String.
fn refused_puback_reason(connect: v5::Connect) -> Option<String> {
    let (mut session, _) = v5_connect(connect);
    client_publishes(
        &mut session,
        publish("a/b", QoS::AtLeastOnce, Some(1), false),
    );
    let Some(Action::Append { token, .. }) = session.poll_action() else {
        panic!("an append")
    };
    session.handle_appended(token, AppendOutcome::NotAuthorized);
    let actions = drain(&mut session);
    let [Packet::V5(v5::Packet::PublishAck(ack))] = sent(&actions)[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(ack.reason_code, v5::PublishAckReason::NotAuthorized);
    ack.reason_string.as_ref().map(ToString::to_string)
}

#[test]
fn a_puback_reason_string_needs_room_and_problem_information() {
    assert!(refused_puback_reason(connect(None, true)).is_some());
    assert_eq!(refused_puback_reason(connect(Some(20), true)), None);
    assert_eq!(
        refused_puback_reason(connect(None, false)),
        None,
        "MQTT-3.1.2-29: not on PUBACK when the client asked for no problem information"
    );
}
