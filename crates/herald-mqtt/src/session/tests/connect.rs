//! Tests of CONNECT and authentication (`session/connect.rs`): refusals with the
//! version's CONNACK code, the assigned client id, the granted keep alive, packets before CONNACK.

use super::*;

#[test]
fn a_packet_before_connect_closes_without_connack() {
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V3(v3::Packet::PingRequest));
    let actions = drain(&mut session);
    assert!(sent(&actions).is_empty());
    assert_eq!(
        closed_with(&actions),
        Some(DisconnectReasonCode::ProtocolError)
    );
    // Everything after is ignored.
    session.handle_packet(Packet::V3(v3::Packet::PingRequest));
    assert!(drain(&mut session).is_empty());
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let mut session = v5_session(10);
    session.handle_packet(Packet::V5(v5::Packet::Connect(Box::default())));
    let actions = drain(&mut session);
    assert_eq!(
        v5_disconnect_code(&actions),
        Some(DisconnectReasonCode::ProtocolError)
    );
    assert!(session.is_closed());
}

#[test]
fn an_empty_client_id_needs_a_clean_session_in_v3() {
    let mut session = v3_connecting(v3::Connect {
        clean_session: false,
        ..v3::Connect::default()
    });
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V3(v3::Packet::ConnectAck(v3::ConnectAck {
            return_code: v3::ConnectAckReason::IdentifierRejected,
            ..
        }))]
    ));
    assert!(session.is_closed());
}

#[test]
fn an_empty_client_id_is_assigned_in_v5_and_sessions_are_clean() {
    let (session, connack) = v5_connect(v5::Connect {
        clean_start: false,
        session_expiry_interval_secs: 3600,
        keep_alive: 0,
        ..v5::Connect::default()
    });
    assert_eq!(session.client_id(), "herald-c1");
    assert_eq!(connack.assigned_client_id.as_deref(), Some("herald-c1"));
    // A persistent session was asked for: served clean, and told so.
    assert!(!connack.session_present);
    assert_eq!(connack.session_expiry_interval_secs, Some(0));
    // Keep alive 0 (none) is not granted: the server's maximum is.
    assert_eq!(connack.server_keepalive_sec, Some(60));
    assert_eq!(session.keep_alive_timeout_ms(), Some(90_000));
    assert_eq!(connack.receive_max.get(), 2);
    assert!(connack.retain_available && !connack.shared_subscription_available);
    assert_eq!(connack.topic_alias_max, 0);
}

#[test]
fn refused_credentials_get_the_version_s_connack_code() {
    let mut session = v5_connecting(v5::Connect {
        client_id: "x".into(),
        password: Some(Bytes::from_static(b"wrong")),
        ..v5::Connect::default()
    });
    let actions = drain(&mut session);
    let [Action::Authenticate { password, .. }] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(password.as_deref(), Some(&b"wrong"[..]));
    session.handle_authenticated(Err(AuthRefusal::BadCredentials));
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V5(v5::Packet::ConnectAck(connack))]
            if connack.reason_code == v5::ConnectAckReason::BadUserNameOrPassword
    ));
    assert!(closed_with(&actions).is_some());
}

#[test]
fn will_messages_are_refused_not_ignored() {
    let mut session = v3_connecting(v3::Connect {
        clean_session: true,
        client_id: "x".into(),
        last_will: Some(v3::LastWill {
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "a/b".into(),
            message: Bytes::new(),
        }),
        ..v3::Connect::default()
    });
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V3(v3::Packet::ConnectAck(v3::ConnectAck {
            return_code: v3::ConnectAckReason::ServiceUnavailable,
            ..
        }))]
    ));
}

#[test]
fn packets_sent_before_connack_are_handled_after_it() {
    let mut session = v3_connecting(v3::Connect {
        clean_session: true,
        client_id: "x".into(),
        ..v3::Connect::default()
    });
    session.handle_packet(Packet::V3(v3::Packet::PingRequest));
    let actions = authenticate(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [
            Packet::V3(v3::Packet::ConnectAck(_)),
            Packet::V3(v3::Packet::PingResponse)
        ]
    ));
}
