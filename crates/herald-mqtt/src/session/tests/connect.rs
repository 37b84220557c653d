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
fn an_empty_client_id_is_assigned_in_v5() {
    let (session, connack) = v5_connect(v5::Connect {
        clean_start: true,
        keep_alive: 0,
        ..v5::Connect::default()
    });
    assert_eq!(session.client_id(), "herald-c1");
    assert_eq!(connack.assigned_client_id.as_deref(), Some("herald-c1"));
    assert!(!connack.session_present);
    assert!(
        !session.is_persistent(),
        "no Session Expiry Interval: a clean session"
    );
    assert_eq!(connack.session_expiry_interval_secs, None);
    // Keep alive 0 (none) is not granted: the server's maximum is.
    assert_eq!(connack.server_keepalive_sec, Some(60));
    assert_eq!(session.keep_alive_timeout_ms(), Some(90_000));
    assert_eq!(connack.receive_max.get(), 2);
    assert!(connack.retain_available && connack.shared_subscription_available);
    assert_eq!(
        connack.topic_alias_max, 2,
        "the configured Topic Alias Maximum"
    );
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

fn v3_with_will(topic: &str) -> Session {
    v3_connecting(v3::Connect {
        clean_session: true,
        keep_alive: 30,
        client_id: "x".into(),
        last_will: Some(v3::LastWill {
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: topic.into(),
            message: Bytes::from_static(b"gone"),
        }),
        ..v3::Connect::default()
    })
}

fn v5_will(topic: &str, message: &'static [u8]) -> v5::LastWill {
    v5::LastWill {
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        message: Bytes::from_static(message),
        will_delay_interval_sec: None,
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: Vec::new(),
        is_utf8_payload: None,
        response_topic: None,
    }
}

fn wills(actions: &[Action]) -> Vec<&Will> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::PublishWill(will) => Some(will),
            _ => None,
        })
        .collect()
}

#[test]
fn a_will_is_published_when_the_connection_ends_without_disconnect() {
    for end in ["lost", "keep alive", "protocol error", "shutdown"] {
        let mut session = v3_with_will("devices/d1/status");
        authenticate(&mut session);
        match end {
            "lost" => session.handle_connection_lost(),
            "keep alive" => session.handle_keep_alive_timeout(),
            "protocol error" => session.handle_packet(Packet::V3(v3::Packet::PingResponse)),
            _ => session.handle_shutdown(),
        }
        let actions = drain(&mut session);
        let published = wills(&actions);
        assert_eq!(published.len(), 1, "{end}: {actions:?}");
        let will = published[0];
        assert_eq!(will.channel.as_str(), "devices:d1.status");
        assert_eq!(will.message.data, Data::Binary(Bytes::from_static(b"gone")));
        assert_eq!(
            will.message.headers.get(HEADER_QOS).map(String::as_str),
            Some("1")
        );
        assert_eq!(
            will.message.headers.get(HEADER_RETAIN).map(String::as_str),
            Some("1")
        );
        assert_eq!(will.message.id.as_str(), "mqtt-c1-will");
        session.handle_connection_lost();
        assert!(
            wills(&drain(&mut session)).is_empty(),
            "{end}: published once"
        );
    }
}

#[test]
fn a_clean_disconnect_discards_the_will_unless_v5_asks_for_it() {
    let mut session = v3_with_will("devices/d1/status");
    authenticate(&mut session);
    session.handle_packet(Packet::V3(v3::Packet::Disconnect));
    session.handle_connection_lost();
    assert!(wills(&drain(&mut session)).is_empty());

    for (reason, published) in [
        (DisconnectReasonCode::NormalDisconnection, 0),
        (DisconnectReasonCode::DisconnectWithWillMessage, 1),
    ] {
        let mut session = v5_connecting(v5::Connect {
            clean_start: true,
            client_id: "x".into(),
            last_will: Some(v5::LastWill {
                message_expiry_interval: std::num::NonZeroU32::new(60),
                ..v5_will("devices/d2", b"bye")
            }),
            ..v5::Connect::default()
        });
        authenticate(&mut session);
        session.handle_packet(Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
            reason_code: reason,
            ..v5::Disconnect::default()
        })));
        let actions = drain(&mut session);
        let sent_wills = wills(&actions);
        assert_eq!(sent_wills.len(), published, "{reason:?}");
        if let Some(will) = sent_wills.first() {
            assert_eq!(
                will.message.ttl_ms,
                Some(60_000),
                "Message Expiry is the TTL"
            );
        }
    }
}

#[test]
fn a_refused_connect_or_an_invalid_will_topic_publishes_nothing() {
    let mut session = v3_with_will("devices/d1");
    assert!(matches!(
        drain(&mut session)[..],
        [Action::Authenticate { .. }]
    ));
    session.handle_authenticated(Err(AuthRefusal::BadCredentials));
    session.handle_connection_lost();
    assert!(wills(&drain(&mut session)).is_empty());

    let mut session = v3_with_will("$SYS/x");
    let actions = drain(&mut session);
    assert!(closed_with(&actions).is_some(), "{actions:?}");
    assert!(
        sent(&actions).is_empty(),
        "3.1.1 has no CONNACK code for it"
    );

    let mut session = v5_connecting(v5::Connect {
        clean_start: true,
        client_id: "x".into(),
        last_will: Some(v5_will("a/b.c", b"")),
        ..v5::Connect::default()
    });
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V5(v5::Packet::ConnectAck(connack))]
            if connack.reason_code == v5::ConnectAckReason::TopicNameInvalid
    ));
    assert!(wills(&actions).is_empty());
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
