//! Unit tests of [`Session`]: every flow, driven by hand as the server's driver would.

use std::collections::BTreeMap;
use std::num::NonZeroU16;

use bytes::Bytes;
use herald_core::{ChainHash, ChannelName, Data, Epoch, Message, MessageId, Serial, Timestamp};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};

use super::*;

fn id(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

fn drain(session: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| session.poll_action()).collect()
}

fn config() -> SessionConfig {
    SessionConfig {
        receive_maximum: 2,
        outbound_inflight_max: 64,
        outbound_pending_max: 2,
        keep_alive_max_secs: 60,
        max_packet_bytes: 4096,
        subscriptions_max: 3,
    }
}

/// A v3 session past CONNACK.
fn v3_session() -> Session {
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V3(v3::Packet::Connect(Box::new(v3::Connect {
        clean_session: true,
        keep_alive: 30,
        client_id: "dev-1".into(),
        ..v3::Connect::default()
    }))));
    assert!(matches!(
        drain(&mut session)[..],
        [Action::Authenticate { .. }]
    ));
    session.handle_authenticated(Ok(()));
    assert!(matches!(
        &drain(&mut session)[..],
        [Action::Send(Packet::V3(v3::Packet::ConnectAck(
            v3::ConnectAck {
                return_code: v3::ConnectAckReason::ConnectionAccepted,
                session_present: false,
            }
        )))]
    ));
    session
}

fn v5_connect(connect: v5::Connect) -> (Session, Box<v5::ConnectAck>) {
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V5(v5::Packet::Connect(Box::new(connect))));
    assert!(matches!(
        drain(&mut session)[..],
        [Action::Authenticate { .. }]
    ));
    session.handle_authenticated(Ok(()));
    let mut actions = drain(&mut session);
    assert_eq!(actions.len(), 1);
    let Action::Send(Packet::V5(v5::Packet::ConnectAck(connack))) = actions.remove(0) else {
        panic!("a CONNACK")
    };
    (session, connack)
}

fn v5_session(client_receive_maximum: u16) -> Session {
    v5_connect(v5::Connect {
        clean_start: true,
        keep_alive: 30,
        client_id: "dev-1".into(),
        receive_max: NonZeroU16::new(client_receive_maximum),
        ..v5::Connect::default()
    })
    .0
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, dup: bool) -> Publish {
    Publish {
        dup,
        retain: false,
        qos,
        topic: topic.to_owned().into(),
        packet_id: packet_id.map(id),
        payload: Bytes::from_static(b"payload"),
        properties: None,
    }
}

fn message(channel: &str, serial: u64, qos_header: Option<&str>, id: &str) -> Message {
    let epoch = Epoch::parse("E1").unwrap();
    let mut headers = BTreeMap::new();
    if let Some(qos) = qos_header {
        headers.insert(HEADER_QOS.to_owned(), qos.to_owned());
    }
    Message {
        channel: ChannelName::parse(channel).unwrap(),
        epoch: epoch.clone(),
        serial: Serial(serial),
        id: MessageId::parse(id).unwrap(),
        time: Timestamp(1),
        name: None,
        headers,
        data: Data::Binary(Bytes::from_static(b"hi")),
        ttl_ms: None,
        chain: ChainHash::genesis(&epoch),
    }
}

/// Subscribes (v3 or v5 by the session's version) and grants every filter.
fn subscribe(session: &mut Session, packet_id: u16, filters: &[(&str, QoS)]) -> Vec<Action> {
    let packet = match session.version() {
        Version::V3 => Packet::V3(v3::Packet::Subscribe {
            packet_id: id(packet_id),
            topic_filters: filters
                .iter()
                .map(|(filter, qos)| ((*filter).to_owned().into(), *qos))
                .collect(),
        }),
        Version::V5 => Packet::V5(v5::Packet::Subscribe(v5::Subscribe {
            packet_id: id(packet_id),
            id: None,
            user_properties: Vec::new(),
            topic_filters: filters
                .iter()
                .map(|(filter, qos)| {
                    (
                        (*filter).to_owned().into(),
                        v5::SubscriptionOptions {
                            qos: *qos,
                            ..v5::SubscriptionOptions::default()
                        },
                    )
                })
                .collect(),
        })),
    };
    session.handle_packet(packet);
    let actions = drain(session);
    let [Action::AuthorizeSubscribe { filters, .. }] = &actions[..] else {
        panic!("an authorization request: {actions:?}")
    };
    let count = filters.len();
    session.handle_subscribe_authorized(id(packet_id), vec![true; count]);
    drain(session)
}

fn sent(actions: &[Action]) -> Vec<&Packet> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send(packet) => Some(packet),
            _ => None,
        })
        .collect()
}

fn closed_with(actions: &[Action]) -> Option<DisconnectReasonCode> {
    actions.iter().find_map(|action| match action {
        Action::Close(reason) => Some(reason.code),
        _ => None,
    })
}

fn v5_disconnect_code(actions: &[Action]) -> Option<DisconnectReasonCode> {
    actions.iter().find_map(|action| match action {
        Action::Send(Packet::V5(v5::Packet::Disconnect(disconnect))) => {
            Some(disconnect.reason_code)
        }
        _ => None,
    })
}

// ----- CONNECT -----

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
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V3(v3::Packet::Connect(Box::new(v3::Connect {
        clean_session: false,
        ..v3::Connect::default()
    }))));
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
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V5(v5::Packet::Connect(Box::new(v5::Connect {
        client_id: "x".into(),
        password: Some(Bytes::from_static(b"wrong")),
        ..v5::Connect::default()
    }))));
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
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V3(v3::Packet::Connect(Box::new(v3::Connect {
        clean_session: true,
        client_id: "x".into(),
        last_will: Some(v3::LastWill {
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "a/b".into(),
            message: Bytes::new(),
        }),
        ..v3::Connect::default()
    }))));
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
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V3(v3::Packet::Connect(Box::new(v3::Connect {
        clean_session: true,
        client_id: "x".into(),
        ..v3::Connect::default()
    }))));
    session.handle_packet(Packet::V3(v3::Packet::PingRequest));
    assert!(matches!(
        drain(&mut session)[..],
        [Action::Authenticate { .. }]
    ));
    session.handle_authenticated(Ok(()));
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [
            Packet::V3(v3::Packet::ConnectAck(_)),
            Packet::V3(v3::Packet::PingResponse)
        ]
    ));
}

// ----- inbound PUBLISH -----

#[test]
fn qos1_is_acknowledged_only_after_the_append_is_durable() {
    let mut session = v3_session();
    session.handle_packet(Packet::V3(v3::Packet::Publish(Box::new(publish(
        "chat/eu/orders",
        QoS::AtLeastOnce,
        Some(3),
        false,
    )))));
    let actions = drain(&mut session);
    let [
        Action::Append {
            token,
            channel,
            message,
        },
    ] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(channel.as_str(), "chat:eu.orders");
    assert_eq!(message.id.as_str(), "mqtt-c1-1");
    assert_eq!(
        message.headers.get(HEADER_QOS).map(String::as_str),
        Some("1")
    );
    assert_eq!(message.data, Data::Binary(Bytes::from_static(b"payload")));
    // Not yet durable: no PUBACK.
    session.handle_packet(Packet::V3(v3::Packet::PingRequest));
    assert!(matches!(
        sent(&drain(&mut session))[..],
        [Packet::V3(v3::Packet::PingResponse)]
    ));
    session.handle_appended(*token, AppendOutcome::Durable);
    assert_eq!(
        sent(&drain(&mut session)),
        vec![&Packet::V3(v3::Packet::PublishAck { packet_id: id(3) })]
    );
}

#[test]
fn qos2_is_appended_once_per_packet_id_until_pubrel() {
    let mut session = v3_session();
    let packet = |dup| {
        Packet::V3(v3::Packet::Publish(Box::new(publish(
            "a/b",
            QoS::ExactlyOnce,
            Some(5),
            dup,
        ))))
    };
    session.handle_packet(packet(false));
    let actions = drain(&mut session);
    let [Action::Append { token, message, .. }] = &actions[..] else {
        panic!("{actions:?}")
    };
    let first_id = message.id.clone();
    // Re-sent while the append is pending: nothing new.
    session.handle_packet(packet(true));
    assert!(drain(&mut session).is_empty());
    session.handle_appended(*token, AppendOutcome::Durable);
    let pubrec = Packet::V3(v3::Packet::PublishReceived { packet_id: id(5) });
    assert_eq!(sent(&drain(&mut session)), vec![&pubrec]);
    // Re-sent after PUBREC: PUBREC again, no append.
    session.handle_packet(packet(true));
    assert_eq!(sent(&drain(&mut session)), vec![&pubrec]);
    session.handle_packet(Packet::V3(v3::Packet::PublishRelease { packet_id: id(5) }));
    assert_eq!(
        sent(&drain(&mut session)),
        vec![&Packet::V3(v3::Packet::PublishComplete {
            packet_id: id(5)
        })]
    );
    // After PUBREL the packet id is free: a new message with a new id.
    session.handle_packet(packet(false));
    let actions = drain(&mut session);
    let [Action::Append { message, .. }] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_ne!(message.id, first_id);
}

#[test]
fn a_pubrel_for_an_unknown_packet_id_is_answered_not_found_in_v5() {
    let mut session = v5_session(10);
    session.handle_packet(Packet::V5(v5::Packet::PublishRelease(v5::PublishAck2 {
        packet_id: id(9),
        ..v5::PublishAck2::default()
    })));
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V5(v5::Packet::PublishComplete(ack))]
            if ack.reason_code == v5::PublishAck2Reason::PacketIdNotFound
    ));
}

#[test]
fn a_denied_publish_gets_puback_0x87_in_v5_and_a_disconnect_in_v3() {
    let mut session = v5_session(10);
    session.handle_packet(Packet::V5(v5::Packet::Publish(Box::new(publish(
        "a/b",
        QoS::AtLeastOnce,
        Some(1),
        false,
    )))));
    let Some(Action::Append { token, .. }) = session.poll_action() else {
        panic!()
    };
    session.handle_appended(token, AppendOutcome::NotAuthorized);
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V5(v5::Packet::PublishAck(ack))]
            if ack.reason_code == v5::PublishAckReason::NotAuthorized
    ));
    assert!(session.is_connected());

    let mut session = v3_session();
    session.handle_packet(Packet::V3(v3::Packet::Publish(Box::new(publish(
        "a/b",
        QoS::AtLeastOnce,
        Some(1),
        false,
    )))));
    let Some(Action::Append { token, .. }) = session.poll_action() else {
        panic!()
    };
    session.handle_appended(token, AppendOutcome::NotAuthorized);
    let actions = drain(&mut session);
    assert!(sent(&actions).is_empty(), "no PUBACK");
    assert_eq!(
        closed_with(&actions),
        Some(DisconnectReasonCode::NotAuthorized)
    );
}

#[test]
fn exceeding_receive_maximum_disconnects_with_0x93() {
    let mut session = v5_session(10);
    for packet_id in 1..=2 {
        session.handle_packet(Packet::V5(v5::Packet::Publish(Box::new(publish(
            "a/b",
            QoS::AtLeastOnce,
            Some(packet_id),
            false,
        )))));
    }
    assert_eq!(drain(&mut session).len(), 2);
    session.handle_packet(Packet::V5(v5::Packet::Publish(Box::new(publish(
        "a/b",
        QoS::AtLeastOnce,
        Some(3),
        false,
    )))));
    let actions = drain(&mut session);
    assert_eq!(
        v5_disconnect_code(&actions),
        Some(DisconnectReasonCode::ReceiveMaximumExceeded)
    );
    assert!(closed_with(&actions).is_some());
}

#[test]
fn v3_clients_are_not_held_to_an_unadvertised_receive_maximum() {
    let mut session = v3_session();
    for packet_id in 1..=5 {
        session.handle_packet(Packet::V3(v3::Packet::Publish(Box::new(publish(
            "a/b",
            QoS::AtLeastOnce,
            Some(packet_id),
            false,
        )))));
    }
    let actions = drain(&mut session);
    assert_eq!(actions.len(), 5, "five appends, no close: {actions:?}");
    assert!(session.is_connected());
}

#[test]
fn dollar_and_unmappable_topics_are_refused() {
    let mut session = v5_session(10);
    session.handle_packet(Packet::V5(v5::Packet::Publish(Box::new(publish(
        "$SYS/x",
        QoS::AtLeastOnce,
        Some(1),
        false,
    )))));
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V5(v5::Packet::PublishAck(ack))]
            if ack.reason_code == v5::PublishAckReason::TopicNameInvalid
    ));
    // QoS 0 has no acknowledgement to carry the refusal: the connection ends.
    session.handle_packet(Packet::V5(v5::Packet::Publish(Box::new(publish(
        "chat/a.b",
        QoS::AtMostOnce,
        None,
        false,
    )))));
    let actions = drain(&mut session);
    assert_eq!(
        v5_disconnect_code(&actions),
        Some(DisconnectReasonCode::TopicNameInvalid)
    );
}

#[test]
fn topic_aliases_are_refused_in_v5() {
    let mut session = v5_session(10);
    let mut aliased = publish("a/b", QoS::AtMostOnce, None, false);
    aliased.properties = Some(v5::PublishProperties {
        topic_alias: NonZeroU16::new(1),
        ..v5::PublishProperties::default()
    });
    session.handle_packet(Packet::V5(v5::Packet::Publish(Box::new(aliased))));
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::TopicAliasInvalid)
    );
}

#[test]
fn the_retain_flag_is_kept_in_a_header() {
    let mut session = v3_session();
    let mut retained = publish("a/b", QoS::AtMostOnce, None, false);
    retained.retain = true;
    session.handle_packet(Packet::V3(v3::Packet::Publish(Box::new(retained))));
    let Some(Action::Append { message, .. }) = session.poll_action() else {
        panic!()
    };
    assert_eq!(
        message.headers.get(HEADER_RETAIN).map(String::as_str),
        Some("1")
    );
    assert_eq!(
        message.headers.get(HEADER_QOS).map(String::as_str),
        Some("0")
    );
}

// ----- SUBSCRIBE / UNSUBSCRIBE -----

#[test]
fn subscribe_reports_a_verdict_per_filter() {
    let mut session = v5_session(10);
    session.handle_packet(Packet::V5(v5::Packet::Subscribe(v5::Subscribe {
        packet_id: id(4),
        id: None,
        user_properties: Vec::new(),
        topic_filters: ["chat/+", "news/#", "$share/g/a", "a/#/b"]
            .iter()
            .map(|filter| {
                (
                    (*filter).to_owned().into(),
                    v5::SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        ..v5::SubscriptionOptions::default()
                    },
                )
            })
            .collect(),
    })));
    let actions = drain(&mut session);
    let [Action::AuthorizeSubscribe { filters, .. }] = &actions[..] else {
        panic!("{actions:?}")
    };
    let asked: Vec<&str> = filters.iter().map(TopicFilter::as_str).collect();
    assert_eq!(asked, ["chat/+", "news/#"]);
    session.handle_subscribe_authorized(id(4), vec![true, false]);
    let actions = drain(&mut session);
    assert!(matches!(
        &actions[0],
        Action::Subscribe { filter, qos: QoS::ExactlyOnce } if filter.as_str() == "chat/+"
    ));
    let Action::Send(Packet::V5(v5::Packet::SubscribeAck(suback))) = &actions[1] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        suback.status,
        vec![
            v5::SubscribeAckReason::GrantedQos2,
            v5::SubscribeAckReason::NotAuthorized,
            v5::SubscribeAckReason::SharedSubscriptionNotSupported,
            v5::SubscribeAckReason::TopicFilterInvalid,
        ]
    );
}

#[test]
fn v3_suback_failure_is_0x80_and_the_subscription_quota_holds() {
    let mut session = v3_session();
    let actions = subscribe(
        &mut session,
        1,
        &[
            ("a", QoS::AtMostOnce),
            ("b", QoS::AtMostOnce),
            ("c", QoS::AtMostOnce),
            ("d", QoS::AtMostOnce),
            ("x y", QoS::AtMostOnce),
        ],
    );
    let suback = sent(&actions);
    assert_eq!(
        suback,
        vec![&Packet::V3(v3::Packet::SubscribeAck {
            packet_id: id(1),
            status: vec![
                v3::SubscribeReturnCode::Success(QoS::AtMostOnce),
                v3::SubscribeReturnCode::Success(QoS::AtMostOnce),
                v3::SubscribeReturnCode::Success(QoS::AtMostOnce),
                v3::SubscribeReturnCode::Failure,
                v3::SubscribeReturnCode::Failure,
            ],
        })]
    );
}

#[test]
fn unsubscribe_stops_deliveries() {
    let mut session = v5_session(10);
    subscribe(&mut session, 1, &[("a/+", QoS::AtMostOnce)]);
    session.handle_packet(Packet::V5(v5::Packet::Unsubscribe(v5::Unsubscribe {
        packet_id: id(2),
        user_properties: Vec::new(),
        topic_filters: vec!["a/+".into(), "never".into()],
    })));
    let actions = drain(&mut session);
    assert!(matches!(&actions[0], Action::Unsubscribe { filter } if filter.as_str() == "a/+"));
    let Action::Send(Packet::V5(v5::Packet::UnsubscribeAck(unsuback))) = &actions[1] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        unsuback.status,
        vec![
            v5::UnsubscribeAckReason::Success,
            v5::UnsubscribeAckReason::NoSubscriptionExisted
        ]
    );
    // A message the feed had already queued is not delivered.
    session.handle_delivery(&message("a:x", 1, None, "m1"));
    assert!(drain(&mut session).is_empty());
}

// ----- deliveries -----

fn delivered(actions: &[Action]) -> Vec<(String, QoS, Option<u16>)> {
    sent(actions)
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::V3(v3::Packet::Publish(publish)) | Packet::V5(v5::Packet::Publish(publish)) => {
                Some((
                    publish.topic.to_string(),
                    publish.qos,
                    publish.packet_id.map(NonZeroU16::get),
                ))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn overlapping_filters_deliver_once_at_the_highest_qos_capped_by_the_publisher() {
    let mut session = v3_session();
    subscribe(
        &mut session,
        1,
        &[("a/+", QoS::AtLeastOnce), ("a/#", QoS::ExactlyOnce)],
    );
    session.handle_delivery(&message("a:x", 1, Some("2"), "m1"));
    session.handle_delivery(&message("a:y", 1, Some("0"), "m2"));
    session.handle_delivery(&message("a:z", 1, None, "m3"));
    session.handle_delivery(&message("b:z", 1, None, "m4"));
    assert_eq!(
        delivered(&drain(&mut session)),
        vec![
            ("a/x".to_owned(), QoS::ExactlyOnce, Some(1)),
            ("a/y".to_owned(), QoS::AtMostOnce, None),
            ("a/z".to_owned(), QoS::ExactlyOnce, Some(2)),
        ]
    );
}

#[test]
fn the_outbound_window_is_the_client_receive_maximum_then_a_bounded_queue() {
    let mut session = v5_session(1);
    subscribe(&mut session, 1, &[("a/+", QoS::AtLeastOnce)]);
    for serial in 1..=4 {
        session.handle_delivery(&message("a:x", serial, None, &format!("m{serial}")));
    }
    // Window 1: one in flight, two queued (outbound_pending_max), one dropped and counted.
    assert_eq!(
        delivered(&drain(&mut session)),
        vec![("a/x".to_owned(), QoS::AtLeastOnce, Some(1))]
    );
    assert_eq!(session.deliveries_dropped(), 1);
    session.handle_packet(Packet::V5(v5::Packet::PublishAck(v5::PublishAck {
        packet_id: id(1),
        ..v5::PublishAck::default()
    })));
    assert_eq!(
        delivered(&drain(&mut session)),
        vec![("a/x".to_owned(), QoS::AtLeastOnce, Some(2))]
    );
    assert_eq!(session.outbound_inflight(), 1);
}

#[test]
fn outbound_qos2_runs_pubrec_pubrel_pubcomp() {
    let mut session = v3_session();
    subscribe(&mut session, 1, &[("a/+", QoS::ExactlyOnce)]);
    session.handle_delivery(&message("a:x", 1, None, "m1"));
    assert_eq!(delivered(&drain(&mut session)).len(), 1);
    session.handle_packet(Packet::V3(v3::Packet::PublishReceived { packet_id: id(1) }));
    assert_eq!(
        sent(&drain(&mut session)),
        vec![&Packet::V3(v3::Packet::PublishRelease { packet_id: id(1) })]
    );
    // A PUBACK is the wrong answer for a QoS 2 delivery.
    let mut wrong = v3_session();
    subscribe(&mut wrong, 1, &[("a/+", QoS::ExactlyOnce)]);
    wrong.handle_delivery(&message("a:x", 1, None, "m1"));
    drain(&mut wrong);
    wrong.handle_packet(Packet::V3(v3::Packet::PublishAck { packet_id: id(1) }));
    assert!(closed_with(&drain(&mut wrong)).is_some());

    session.handle_packet(Packet::V3(v3::Packet::PublishComplete { packet_id: id(1) }));
    assert!(drain(&mut session).is_empty());
    assert_eq!(session.outbound_inflight(), 0);
}

#[test]
fn acknowledging_a_packet_id_not_in_flight_is_a_protocol_error() {
    let mut session = v5_session(10);
    session.handle_packet(Packet::V5(v5::Packet::PublishAck(v5::PublishAck {
        packet_id: id(7),
        ..v5::PublishAck::default()
    })));
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::ProtocolError)
    );
}

#[test]
fn no_local_skips_the_connection_s_own_messages() {
    let mut session = v5_session(10);
    session.handle_packet(Packet::V5(v5::Packet::Subscribe(v5::Subscribe {
        packet_id: id(1),
        id: None,
        user_properties: Vec::new(),
        topic_filters: vec![(
            "a/+".into(),
            v5::SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local: true,
                ..v5::SubscriptionOptions::default()
            },
        )],
    })));
    drain(&mut session);
    session.handle_subscribe_authorized(id(1), vec![true]);
    drain(&mut session);
    session.handle_delivery(&message("a:x", 1, None, "mqtt-c1-1"));
    session.handle_delivery(&message("a:x", 2, None, "mqtt-other-1"));
    assert_eq!(
        delivered(&drain(&mut session)),
        vec![("a/x".to_owned(), QoS::AtMostOnce, None)]
    );
}

#[test]
fn a_delivery_over_the_client_maximum_packet_size_is_dropped_and_counted() {
    let (mut session, _) = v5_connect(v5::Connect {
        clean_start: true,
        client_id: "x".into(),
        max_packet_size: std::num::NonZeroU32::new(16),
        ..v5::Connect::default()
    });
    subscribe(&mut session, 1, &[("#", QoS::AtMostOnce)]);
    session.handle_delivery(&message("a-long-channel-name:x", 1, None, "m1"));
    assert!(delivered(&drain(&mut session)).is_empty());
    assert_eq!(session.deliveries_dropped(), 1);
}

#[test]
fn decode_errors_keep_alive_and_shutdown_close_with_their_reason() {
    let mut session = v5_session(10);
    session.handle_decode_error(&DecodeError::MaxSizeExceeded { size: 10, max: 5 });
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::PacketTooLarge)
    );
    let mut session = v5_session(10);
    session.handle_keep_alive_timeout();
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::KeepAliveTimeout)
    );
    let mut session = v5_session(10);
    session.handle_shutdown();
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::ServerShuttingDown)
    );
}

// ----- random sequences -----

mod model {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// Two valid topics, then refused ones (generated as rare client mistakes).
    const TOPICS: [&str; 5] = ["a/b", "a", "$x/y", "a/b.c", "a/+"];
    const FILTERS: [&str; 5] = ["a/+", "#", "a/b", "$share/g/a", "a/#/b"];
    const CHANNELS: [&str; 3] = ["a:b", "a", "$x:y"];

    #[derive(Clone, Debug)]
    enum Op {
        Publish {
            qos: u8,
            packet_id: u16,
            topic: usize,
            dup: bool,
        },
        PubRel(u16),
        PubAck(u16),
        PubRec(u16),
        PubComp(u16),
        Subscribe {
            packet_id: u16,
            filter: usize,
            qos: u8,
            allow: bool,
        },
        Unsubscribe(usize),
        /// The client acknowledges the outbound delivery at this index (modulo) correctly.
        ClientAck(usize),
        /// The client releases the inbound QoS 2 packet at this index (modulo).
        Release(usize),
        Ping,
        Connect,
        /// Answers the pending append at this index (modulo), durable or refused.
        Answer {
            index: usize,
            durable: bool,
        },
        Deliver {
            channel: usize,
            qos: Option<u8>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let packet_id = 1u16..4;
        prop_oneof![
            // QoS 1 uses packet ids 1..=3 and QoS 2 uses 4..=6: reusing one across QoS levels
            // is a client mistake, generated below.
            8 => (0u8..3, 1u16..4, 0..2usize, any::<bool>()).prop_map(
                |(qos, packet_id, topic, dup)| Op::Publish {
                    qos,
                    packet_id: if qos == 2 { packet_id + 3 } else { packet_id },
                    topic,
                    dup,
                }
            ),
            4 => any::<usize>().prop_map(Op::ClientAck),
            4 => any::<usize>().prop_map(Op::Release),
            // Client mistakes: each ends the connection (mostly), so they are rare.
            1 => prop_oneof![
                (0u8..3, packet_id.clone(), 0..TOPICS.len()).prop_map(
                    |(qos, packet_id, topic)| Op::Publish {
                        qos,
                        packet_id,
                        topic,
                        dup: true,
                    }
                ),
                packet_id.clone().prop_map(Op::PubRel),
                packet_id.clone().prop_map(Op::PubAck),
                packet_id.clone().prop_map(Op::PubRec),
                packet_id.clone().prop_map(Op::PubComp),
                Just(Op::Connect),
            ],
            3 => (packet_id, 0..FILTERS.len(), 0u8..3, prop::bool::weighted(0.8)).prop_map(
                |(packet_id, filter, qos, allow)| Op::Subscribe { packet_id, filter, qos, allow }
            ),
            1 => (0..FILTERS.len()).prop_map(Op::Unsubscribe),
            1 => Just(Op::Ping),
            4 => (any::<usize>(), prop::bool::weighted(0.95))
                .prop_map(|(index, durable)| Op::Answer { index, durable }),
            3 => (0..CHANNELS.len(), prop::option::of(0u8..3))
                .prop_map(|(channel, qos)| Op::Deliver { channel, qos }),
        ]
    }

    fn qos(value: u8) -> QoS {
        QoS::try_from(value).unwrap()
    }

    fn packet(v5: bool, op: &Op) -> Option<Packet> {
        let ack = |packet_id: u16| v5::PublishAck {
            packet_id: id(packet_id),
            ..v5::PublishAck::default()
        };
        let ack2 = |packet_id: u16| v5::PublishAck2 {
            packet_id: id(packet_id),
            ..v5::PublishAck2::default()
        };
        Some(match (v5, op.clone()) {
            (
                _,
                Op::Publish {
                    qos: level,
                    packet_id,
                    topic,
                    dup,
                },
            ) => {
                let publish = Box::new(publish(
                    TOPICS[topic],
                    qos(level),
                    (level > 0).then_some(packet_id),
                    dup,
                ));
                if v5 {
                    Packet::V5(v5::Packet::Publish(publish))
                } else {
                    Packet::V3(v3::Packet::Publish(publish))
                }
            }
            (false, Op::PubRel(p)) => Packet::V3(v3::Packet::PublishRelease { packet_id: id(p) }),
            (true, Op::PubRel(p)) => Packet::V5(v5::Packet::PublishRelease(ack2(p))),
            (false, Op::PubAck(p)) => Packet::V3(v3::Packet::PublishAck { packet_id: id(p) }),
            (true, Op::PubAck(p)) => Packet::V5(v5::Packet::PublishAck(ack(p))),
            (false, Op::PubRec(p)) => Packet::V3(v3::Packet::PublishReceived { packet_id: id(p) }),
            (true, Op::PubRec(p)) => Packet::V5(v5::Packet::PublishReceived(ack(p))),
            (false, Op::PubComp(p)) => Packet::V3(v3::Packet::PublishComplete { packet_id: id(p) }),
            (true, Op::PubComp(p)) => Packet::V5(v5::Packet::PublishComplete(ack2(p))),
            (
                false,
                Op::Subscribe {
                    packet_id,
                    filter,
                    qos: level,
                    ..
                },
            ) => Packet::V3(v3::Packet::Subscribe {
                packet_id: id(packet_id),
                topic_filters: vec![(FILTERS[filter].into(), qos(level))],
            }),
            (
                true,
                Op::Subscribe {
                    packet_id,
                    filter,
                    qos: level,
                    ..
                },
            ) => Packet::V5(v5::Packet::Subscribe(v5::Subscribe {
                packet_id: id(packet_id),
                id: None,
                user_properties: Vec::new(),
                topic_filters: vec![(
                    FILTERS[filter].into(),
                    v5::SubscriptionOptions {
                        qos: qos(level),
                        ..v5::SubscriptionOptions::default()
                    },
                )],
            })),
            (false, Op::Unsubscribe(filter)) => Packet::V3(v3::Packet::Unsubscribe {
                packet_id: id(1),
                topic_filters: vec![FILTERS[filter].into()],
            }),
            (true, Op::Unsubscribe(filter)) => {
                Packet::V5(v5::Packet::Unsubscribe(v5::Unsubscribe {
                    packet_id: id(1),
                    user_properties: Vec::new(),
                    topic_filters: vec![FILTERS[filter].into()],
                }))
            }
            (false, Op::Ping) => Packet::V3(v3::Packet::PingRequest),
            (true, Op::Ping) => Packet::V5(v5::Packet::PingRequest),
            (false, Op::Connect) => Packet::V3(v3::Packet::Connect(Box::default())),
            (true, Op::Connect) => Packet::V5(v5::Packet::Connect(Box::default())),
            (_, Op::Answer { .. } | Op::Deliver { .. } | Op::ClientAck(_) | Op::Release(_)) => {
                return None;
            }
        })
    }

    /// The contracts a driver and a client rely on, checked on every action.
    #[derive(Default)]
    struct Checker {
        /// Inbound packet ids answered durable and not acknowledged yet.
        durable: BTreeSet<u16>,
        /// QoS 2 packet ids appended and not completed (PUBREL/PUBCOMP or a refusal).
        qos2_open: BTreeSet<u16>,
        /// QoS 2 packet ids whose PUBREC was sent, until PUBCOMP.
        received: BTreeSet<u16>,
        /// Appends not answered yet: token, packet id, QoS 2.
        pending: Vec<(AppendToken, Option<u16>, bool)>,
        /// Outbound packet ids and the acknowledgement they await (1 PUBACK, 2 PUBREC,
        /// 3 PUBCOMP).
        outbound: BTreeMap<u16, u8>,
        /// PUBLISH packets the session sent.
        delivered: usize,
    }

    impl Checker {
        fn observe(&mut self, actions: Vec<Action>, session: &mut Session, allow: bool) {
            for action in actions {
                match action {
                    Action::Append { token, message, .. } => {
                        let qos2 = message.headers.get(HEADER_QOS).map(String::as_str) == Some("2");
                        let packet_id = token.packet_id.map(NonZeroU16::get);
                        if let (true, Some(p)) = (qos2, packet_id) {
                            assert!(self.qos2_open.insert(p), "QoS 2 packet {p} appended twice");
                        }
                        self.pending.push((token, packet_id, qos2));
                    }
                    Action::AuthorizeSubscribe { packet_id, filters } => {
                        session.handle_subscribe_authorized(packet_id, vec![allow; filters.len()]);
                        let more = drain(session);
                        self.observe(more, session, allow);
                    }
                    Action::Send(Packet::V3(v3::Packet::PublishAck { packet_id })) => {
                        assert!(
                            self.durable.remove(&packet_id.get()),
                            "PUBACK before durable"
                        );
                    }
                    Action::Send(Packet::V3(v3::Packet::PublishReceived { packet_id })) => {
                        self.pubrec(packet_id.get());
                    }
                    Action::Send(Packet::V5(v5::Packet::PublishAck(ack)))
                        if ack.reason_code == v5::PublishAckReason::Success =>
                    {
                        assert!(
                            self.durable.remove(&ack.packet_id.get()),
                            "PUBACK before durable"
                        );
                    }
                    Action::Send(Packet::V5(v5::Packet::PublishReceived(ack))) => {
                        if ack.reason_code == v5::PublishAckReason::Success {
                            self.pubrec(ack.packet_id.get());
                        } else {
                            self.qos2_open.remove(&ack.packet_id.get());
                        }
                    }
                    Action::Send(Packet::V3(v3::Packet::PublishComplete { packet_id })) => {
                        self.complete(packet_id.get());
                    }
                    Action::Send(
                        Packet::V3(v3::Packet::Publish(publish))
                        | Packet::V5(v5::Packet::Publish(publish)),
                    ) => {
                        self.delivered += 1;
                        if let Some(packet_id) = publish.packet_id {
                            let awaiting = if publish.qos == QoS::AtLeastOnce {
                                1
                            } else {
                                2
                            };
                            assert!(
                                self.outbound.insert(packet_id.get(), awaiting).is_none(),
                                "an outbound packet id reused while in flight"
                            );
                        }
                    }
                    Action::Send(Packet::V3(v3::Packet::PublishRelease { packet_id })) => {
                        self.outbound.insert(packet_id.get(), 3);
                    }
                    Action::Send(Packet::V5(v5::Packet::PublishRelease(ack))) => {
                        self.outbound.insert(ack.packet_id.get(), 3);
                    }
                    Action::Send(Packet::V5(v5::Packet::PublishComplete(ack))) => {
                        self.complete(ack.packet_id.get());
                    }
                    _ => {}
                }
            }
        }

        fn pubrec(&mut self, packet_id: u16) {
            // The first PUBREC needs a durable append; repeats (re-sent PUBLISH) do not.
            if !self.received.contains(&packet_id) {
                assert!(self.durable.remove(&packet_id), "PUBREC before durable");
                self.received.insert(packet_id);
            }
        }

        fn complete(&mut self, packet_id: u16) {
            self.received.remove(&packet_id);
            self.qos2_open.remove(&packet_id);
        }
    }

    /// Runs the ops; returns how many were handled while the session was connected.
    fn run(v5: bool, ops: Vec<Op>) -> usize {
        let mut session = Session::new(
            SessionConfig {
                receive_maximum: 8,
                ..config()
            },
            "c1",
        );
        let connect = if v5 {
            Packet::V5(v5::Packet::Connect(Box::new(v5::Connect {
                client_id: "x".into(),
                receive_max: NonZeroU16::new(2),
                ..v5::Connect::default()
            })))
        } else {
            Packet::V3(v3::Packet::Connect(Box::new(v3::Connect {
                clean_session: true,
                client_id: "x".into(),
                ..v3::Connect::default()
            })))
        };
        session.handle_packet(connect);
        drain(&mut session);
        session.handle_authenticated(Ok(()));
        drain(&mut session);
        let mut checker = Checker::default();
        let mut serial = 0;
        let mut connected_ops = 0;
        for op in ops {
            if session.is_closed() {
                break;
            }
            connected_ops += 1;
            let allow = matches!(op, Op::Subscribe { allow: true, .. });
            match &op {
                Op::Answer { index, durable } => {
                    if checker.pending.is_empty() {
                        continue;
                    }
                    let (token, packet_id, qos2) =
                        checker.pending.remove(index % checker.pending.len());
                    if let Some(p) = packet_id {
                        if *durable {
                            checker.durable.insert(p);
                        } else if qos2 && !v5 {
                            checker.qos2_open.remove(&p);
                        }
                    }
                    session.handle_appended(
                        token,
                        if *durable {
                            AppendOutcome::Durable
                        } else {
                            AppendOutcome::NotAuthorized
                        },
                    );
                }
                Op::Deliver { channel, qos } => {
                    serial += 1;
                    let header = qos.map(|q| q.to_string());
                    session.handle_delivery(&message(
                        CHANNELS[*channel],
                        serial,
                        header.as_deref(),
                        &format!("m{serial}"),
                    ));
                }
                Op::ClientAck(index) => {
                    let Some((&p, &awaiting)) = checker
                        .outbound
                        .iter()
                        .nth(index % checker.outbound.len().max(1))
                    else {
                        continue;
                    };
                    if awaiting != 2 {
                        checker.outbound.remove(&p);
                    }
                    let op = match awaiting {
                        1 => Op::PubAck(p),
                        2 => Op::PubRec(p),
                        _ => Op::PubComp(p),
                    };
                    session.handle_packet(packet(v5, &op).expect("a packet op"));
                }
                Op::Release(index) => {
                    let Some(&p) = checker
                        .received
                        .iter()
                        .nth(index % checker.received.len().max(1))
                    else {
                        continue;
                    };
                    session.handle_packet(packet(v5, &Op::PubRel(p)).expect("a packet op"));
                }
                _ => session.handle_packet(packet(v5, &op).expect("a packet op")),
            }
            let actions = drain(&mut session);
            checker.observe(actions, &mut session, allow);
            assert!(session.outbound_inflight() <= if v5 { 2 } else { 64 });
        }
        connected_ops
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any packet sequence and any answer order: no panic, acknowledgements only after
        /// durability, QoS 2 appended at most once per packet id until released.
        #[test]
        fn random_sequences_keep_the_contracts(
            v5 in any::<bool>(),
            ops in prop::collection::vec(op(), 1..60),
        ) {
            run(v5, ops);
        }
    }

    /// The generator reaches deep states: long-lived sessions that append, acknowledge and
    /// deliver (a weak generator would let the contracts above pass vacuously).
    #[test]
    fn the_generator_reaches_long_sessions() {
        use proptest::strategy::ValueTree as _;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let strategy = prop::collection::vec(op(), 60);
        let mut long_runs = 0;
        for _ in 0..100 {
            let ops = strategy.new_tree(&mut runner).unwrap().current();
            if run(true, ops.clone()) >= 30 && run(false, ops) >= 30 {
                long_runs += 1;
            }
        }
        assert!(long_runs >= 20, "only {long_runs} of 100 runs lived 30 ops");
    }
}

// ----- retained messages -----

fn retained_message(channel: &str, qos: &str) -> Message {
    let mut message = message(channel, 1, Some(qos), "r1");
    message
        .headers
        .insert(HEADER_RETAIN.to_owned(), "1".to_owned());
    message
}

fn publishes(actions: &[Action]) -> Vec<(bool, QoS)> {
    sent(actions)
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::V3(v3::Packet::Publish(publish)) | Packet::V5(v5::Packet::Publish(publish)) => {
                Some((publish.retain, publish.qos))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_subscription_asks_for_retained_messages_after_its_suback() {
    let mut session = v3_session();
    let actions = subscribe(&mut session, 1, &[("a/+", QoS::AtLeastOnce)]);
    assert!(matches!(actions[0], Action::Subscribe { .. }));
    assert!(matches!(
        actions[1],
        Action::Send(Packet::V3(v3::Packet::SubscribeAck { .. }))
    ));
    let Action::SendRetained { filter } = &actions[2] else {
        panic!("{actions:?}")
    };
    assert_eq!(filter.as_str(), "a/+");
    // Sent with RETAIN = 1 at min(stored QoS 2, subscription QoS 1).
    session.handle_retained(filter, &retained_message("a:x", "2"));
    assert_eq!(
        publishes(&drain(&mut session)),
        vec![(true, QoS::AtLeastOnce)]
    );
    // Not for a channel the filter does not match.
    session.handle_retained(filter, &retained_message("b:x", "2"));
    assert!(drain(&mut session).is_empty());
    // Live deliveries of a retained publish go out with RETAIN = 0.
    session.handle_delivery(&retained_message("a:x", "0"));
    assert_eq!(
        publishes(&drain(&mut session)),
        vec![(false, QoS::AtMostOnce)]
    );
}

fn v5_subscribe_with(
    session: &mut Session,
    packet_id: u16,
    options: v5::SubscriptionOptions,
) -> Vec<Action> {
    session.handle_packet(Packet::V5(v5::Packet::Subscribe(v5::Subscribe {
        packet_id: id(packet_id),
        id: None,
        user_properties: Vec::new(),
        topic_filters: vec![("a/+".into(), options)],
    })));
    drain(session);
    session.handle_subscribe_authorized(id(packet_id), vec![true]);
    drain(session)
}

#[test]
fn v5_retain_handling_and_retain_as_published_are_honoured() {
    let asks = |actions: &[Action]| {
        actions
            .iter()
            .any(|action| matches!(action, Action::SendRetained { .. }))
    };
    let mut session = v5_session(10);
    let never = v5::SubscriptionOptions {
        retain_handling: v5::RetainHandling::NoAtSubscribe,
        ..v5::SubscriptionOptions::default()
    };
    assert!(!asks(&v5_subscribe_with(&mut session, 1, never)));
    let new_only = v5::SubscriptionOptions {
        retain_handling: v5::RetainHandling::AtSubscribeNew,
        ..v5::SubscriptionOptions::default()
    };
    // The filter exists already (from the first SUBSCRIBE): not new.
    assert!(!asks(&v5_subscribe_with(&mut session, 2, new_only)));
    let mut fresh = v5_session(10);
    assert!(asks(&v5_subscribe_with(&mut fresh, 1, new_only)));

    let mut session = v5_session(10);
    let as_published = v5::SubscriptionOptions {
        retain_as_published: true,
        ..v5::SubscriptionOptions::default()
    };
    v5_subscribe_with(&mut session, 1, as_published);
    session.handle_delivery(&retained_message("a:x", "0"));
    session.handle_delivery(&message("a:y", 1, Some("0"), "plain"));
    assert_eq!(
        publishes(&drain(&mut session)),
        vec![(true, QoS::AtMostOnce), (false, QoS::AtMostOnce)]
    );
}
