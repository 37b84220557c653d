//! Tests of the topic aliases on the server's PUBLISH packets (`session/aliases.rs`, used by
//! `session/outbound.rs`): which packets carry an alias, the maxima, the packet size.

use std::num::NonZeroU32;

use super::*;

/// A v5 session past CONNACK whose client accepts `client_alias_maximum` aliases, subscribed
/// to `#` at QoS 1.
fn aliasing_session(client_alias_maximum: u16, max_packet_size: Option<u32>) -> Session {
    let (mut session, _) = v5_connect(v5::Connect {
        clean_start: true,
        client_id: "dev-1".into(),
        receive_max: NonZeroU16::new(100),
        topic_alias_max: client_alias_maximum,
        max_packet_size: max_packet_size.and_then(NonZeroU32::new),
        ..v5::Connect::default()
    });
    subscribe(&mut session, 1, &[("#", QoS::AtLeastOnce)]);
    session
}

/// Delivers one message of each channel in turn; returns (topic, alias) of each PUBLISH sent.
fn deliver(session: &mut Session, channels: &[&str]) -> Vec<(String, Option<u16>)> {
    for (serial, channel) in (1..).zip(channels) {
        session.handle_delivery(&message(channel, serial, None, &format!("m{serial}")));
    }
    sent_publishes(&drain(session))
        .into_iter()
        .map(|publish| {
            let alias = publish
                .properties
                .as_ref()
                .and_then(|properties| properties.topic_alias)
                .map(NonZeroU16::get);
            (publish.topic.to_string(), alias)
        })
        .collect()
}

fn aliased(topic: &str, alias: u16) -> (String, Option<u16>) {
    (topic.to_owned(), Some(alias))
}

fn full(topic: &str) -> (String, Option<u16>) {
    (topic.to_owned(), None)
}

#[test]
fn the_first_publish_of_a_topic_sets_its_alias_and_later_ones_use_it() {
    let mut session = aliasing_session(10, None);
    assert_eq!(
        deliver(&mut session, &["a:x", "a:x", "b:y", "a:x", "b:y"]),
        vec![
            aliased("a/x", 1),
            aliased("", 1),
            aliased("b/y", 2),
            aliased("", 1),
            aliased("", 2),
        ]
    );
}

#[test]
fn a_client_maximum_of_zero_or_a_v3_client_never_gets_an_alias() {
    let mut session = aliasing_session(0, None);
    assert_eq!(
        deliver(&mut session, &["a:x", "a:x"]),
        vec![full("a/x"), full("a/x")]
    );
    let mut v3 = v3_session();
    subscribe(&mut v3, 1, &[("#", QoS::AtLeastOnce)]);
    let actions = {
        v3.handle_delivery(&message("a:x", 1, None, "m1"));
        v3.handle_delivery(&message("a:x", 2, None, "m2"));
        drain(&mut v3)
    };
    let publishes = sent_publishes(&actions);
    assert_eq!(publishes.len(), 2);
    for publish in publishes {
        assert_eq!(publish.topic, "a/x");
        assert_eq!(publish.properties, None);
    }
}

#[test]
fn once_the_client_s_aliases_are_used_up_new_topics_go_in_full() {
    let mut session = aliasing_session(2, None);
    assert_eq!(
        deliver(&mut session, &["a:1", "a:2", "a:3", "a:3", "a:1"]),
        vec![
            aliased("a/1", 1),
            aliased("a/2", 2),
            full("a/3"),
            full("a/3"),
            aliased("", 1),
        ]
    );
    // The server's own cap (3 in the test config) bounds a generous client.
    let mut session = aliasing_session(1000, None);
    assert_eq!(
        deliver(&mut session, &["a:1", "a:2", "a:3", "a:4"])[3],
        full("a/4")
    );
}

#[test]
fn aliases_start_empty_on_every_connection() {
    let mut first = aliasing_session(10, None);
    assert_eq!(deliver(&mut first, &["a:x"]), vec![aliased("a/x", 1)]);
    let mut second = aliasing_session(10, None);
    assert_eq!(deliver(&mut second, &["a:x"]), vec![aliased("a/x", 1)]);
}

#[test]
fn subscription_identifiers_go_along_with_the_alias() {
    let mut session = aliasing_session(10, None);
    let Packet::V5(v5::Packet::Subscribe(mut subscribe)) =
        v5_subscribe_packet(2, &[("a/+", v5_options(QoS::AtLeastOnce))])
    else {
        unreachable!()
    };
    subscribe.id = NonZeroU32::new(300);
    session.handle_packet(Packet::V5(v5::Packet::Subscribe(subscribe)));
    drain(&mut session);
    session.handle_subscribe_authorized(id(2), vec![true], 0);
    drain(&mut session);
    session.handle_delivery(&message("a:x", 1, None, "m1"));
    session.handle_delivery(&message("a:x", 2, None, "m2"));
    let actions = drain(&mut session);
    let properties: Vec<_> = sent_publishes(&actions)
        .into_iter()
        .map(|publish| {
            (
                publish.topic.to_string(),
                publish.properties.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(properties.len(), 2);
    for (index, (topic, properties)) in properties.iter().enumerate() {
        assert_eq!(topic, if index == 0 { "a/x" } else { "" });
        assert_eq!(properties.topic_alias, NonZeroU16::new(1));
        assert_eq!(
            properties.subscription_ids,
            vec![NonZeroU32::new(300).unwrap()]
        );
    }
}

/// The encoded size of the packets `session` sent, by the codec itself.
fn encoded_sizes(actions: &[Action]) -> Vec<usize> {
    sent(actions)
        .into_iter()
        .map(|packet| match packet {
            Packet::V5(packet) => super::super::reasons::encoded_bytes(packet),
            Packet::V3(_) => unreachable!("v5 only"),
        })
        .collect()
}

#[test]
fn the_maximum_packet_size_is_checked_on_the_packet_as_sent() {
    // Sizes without a limit: the first PUBLISH of "a/x" carries topic and alias, the second
    // only the alias.
    let mut unlimited = aliasing_session(10, None);
    unlimited.handle_delivery(&message("a:x", 1, None, "m1"));
    unlimited.handle_delivery(&message("a:x", 2, None, "m2"));
    let sizes = encoded_sizes(&drain(&mut unlimited));
    let [first, second] = sizes[..] else {
        panic!("{sizes:?}")
    };
    // Topic "a/x" (3 bytes) for a 3-byte alias property: the aliased form is smaller.
    assert_eq!(first - second, 3);
    let plain_size = first - 3;

    // Room for the plain packet but not for topic + alias: sent in full, no alias yet.
    let mut tight = aliasing_session(10, u32::try_from(plain_size).ok());
    assert_eq!(
        deliver(&mut tight, &["a:x", "a:x"]),
        vec![full("a/x"), full("a/x")]
    );
    assert_eq!(tight.deliveries_dropped(), 0);
    // Exactly the aliased size: it fits.
    let mut exact = aliasing_session(10, u32::try_from(first).ok());
    assert_eq!(
        deliver(&mut exact, &["a:x", "a:x"]),
        vec![aliased("a/x", 1), aliased("", 1)]
    );
    // One byte under the plain packet: dropped and counted, whatever the form.
    let mut small = aliasing_session(10, u32::try_from(plain_size - 1).ok());
    assert!(deliver(&mut small, &["a:x", "a:x"]).is_empty());
    assert_eq!(small.deliveries_dropped(), 2);
}
