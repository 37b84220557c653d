//! Tests of retained messages: the requests after a SUBACK (`session/subscriptions.rs`,
//! v5 Retain Handling) and the RETAIN flag of deliveries (`session/outbound.rs`).

use super::*;

fn retained_message(channel: &str, qos: &str) -> Message {
    let mut message = message(channel, 1, Some(qos), "r1");
    message
        .headers
        .insert(HEADER_RETAIN.to_owned(), "1".to_owned());
    message
}

/// The PUBLISH packets sent: RETAIN flag, QoS.
fn publishes(actions: &[Action]) -> Vec<(bool, QoS)> {
    sent_publishes(actions)
        .into_iter()
        .map(|publish| (publish.retain, publish.qos))
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

#[test]
fn no_local_also_skips_the_connection_s_own_retained_messages() {
    let mut session = v5_session(10);
    let no_local = v5::SubscriptionOptions {
        no_local: true,
        ..v5_options(QoS::AtLeastOnce)
    };
    let actions = v5_subscribe_with(&mut session, 1, no_local);
    let Some(Action::SendRetained { filter }) = actions
        .iter()
        .find(|action| matches!(action, Action::SendRetained { .. }))
    else {
        panic!("{actions:?}")
    };
    let own = {
        let mut message = retained_message("a:x", "1");
        message.id = MessageId::parse("mqtt-c1-1").unwrap();
        message
    };
    session.handle_retained(filter, &own);
    assert!(
        drain(&mut session).is_empty(),
        "published by this connection"
    );
    session.handle_retained(filter, &retained_message("a:y", "1"));
    assert_eq!(
        publishes(&drain(&mut session)),
        vec![(true, QoS::AtLeastOnce)]
    );
}
