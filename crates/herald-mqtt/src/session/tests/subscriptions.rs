//! Tests of SUBSCRIBE / UNSUBSCRIBE (`session/subscriptions.rs`): one verdict per filter,
//! v3 and v5 SUBACK codes, the subscription quota.

use super::*;

#[test]
fn subscribe_reports_a_verdict_per_filter() {
    let mut session = v5_session(10);
    let filters = ["chat/+", "news/#", "$share/g/a", "$share//a", "a/#/b"]
        .map(|filter| (filter, v5_options(QoS::ExactlyOnce)));
    session.handle_packet(v5_subscribe_packet(4, &filters));
    let actions = drain(&mut session);
    let [Action::AuthorizeSubscribe { filters, .. }] = &actions[..] else {
        panic!("{actions:?}")
    };
    let asked: Vec<&str> = filters.iter().map(TopicFilter::as_str).collect();
    assert_eq!(
        asked,
        ["chat/+", "news/#", "a"],
        "a shared one by its filter part"
    );
    session.handle_subscribe_authorized(id(4), vec![true, false, true], 0);
    let actions = drain(&mut session);
    assert!(matches!(
        &actions[0],
        Action::Subscribe { filter, qos: QoS::ExactlyOnce } if filter.as_str() == "chat/+"
    ));
    assert!(matches!(
        &actions[1],
        Action::SubscribeShared { key, share, filter }
            if key == "$share/g/a" && share == "g" && filter.as_str() == "a"
    ));
    let Action::Send(Packet::V5(v5::Packet::SubscribeAck(suback))) = &actions[2] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        suback.status,
        vec![
            v5::SubscribeAckReason::GrantedQos2,
            v5::SubscribeAckReason::NotAuthorized,
            v5::SubscribeAckReason::GrantedQos2,
            v5::SubscribeAckReason::TopicFilterInvalid,
            v5::SubscribeAckReason::TopicFilterInvalid,
        ]
    );
    assert!(
        !actions.iter().any(
            |action| matches!(action, Action::SendRetained { filter } if filter.as_str() == "a")
        ),
        "shared subscriptions get no retained messages: {actions:?}"
    );
}

#[test]
fn a_shared_subscription_gets_its_group_s_messages_and_not_the_feed_s() {
    let mut session = v5_session(10);
    subscribe(&mut session, 1, &[("$share/g/a/+", QoS::AtLeastOnce)]);
    session.handle_delivery(&message("a:b", 1, None, "m1"));
    assert!(
        sent_publishes(&drain(&mut session)).is_empty(),
        "not from the feed"
    );
    session.handle_shared_delivery("$share/g/a/+", &message("a:b", 2, Some("2"), "m2"));
    let actions = drain(&mut session);
    let publishes = sent_publishes(&actions);
    assert_eq!(publishes.len(), 1);
    assert_eq!(
        (&publishes[0].topic[..], publishes[0].qos),
        ("a/b", QoS::AtLeastOnce)
    );
    // Unsubscribing leaves the group.
    session.handle_packet(Packet::V5(v5::Packet::Unsubscribe(v5::Unsubscribe {
        packet_id: id(2),
        user_properties: Vec::new(),
        topic_filters: vec!["$share/g/a/+".into()],
    })));
    let actions = drain(&mut session);
    assert!(actions.iter().any(|action| matches!(
        action,
        Action::UnsubscribeShared { key } if key == "$share/g/a/+"
    )));
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut session = v5_session(10);
    let options = v5::SubscriptionOptions {
        no_local: true,
        ..v5_options(QoS::AtLeastOnce)
    };
    session.handle_packet(v5_subscribe_packet(1, &[("$share/g/a", options)]));
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::ProtocolError)
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
