//! Tests of deliveries (`session/outbound.rs`): QoS capping, overlapping filters, the window
//! and its bounded queue, outbound QoS 2, No Local, Maximum Packet Size.

use super::*;

/// The PUBLISH packets sent: topic, QoS, packet id.
fn delivered(actions: &[Action]) -> Vec<(String, QoS, Option<u16>)> {
    sent_publishes(actions)
        .into_iter()
        .map(|publish| {
            let packet_id = publish.packet_id.map(NonZeroU16::get);
            (publish.topic.to_string(), publish.qos, packet_id)
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
    let no_local = v5::SubscriptionOptions {
        no_local: true,
        ..v5_options(QoS::AtMostOnce)
    };
    v5_subscribe_with(&mut session, 1, no_local);
    session.handle_delivery(&message("a:x", 1, None, "mqtt-c1-1"));
    session.handle_delivery(&message("a:x", 2, None, "mqtt-other-1"));
    // Connection `c1-x`'s messages share the prefix `mqtt-c1-` but are not c1's own.
    session.handle_delivery(&message("a:x", 3, None, "mqtt-c1-x-1"));
    assert_eq!(
        delivered(&drain(&mut session)),
        vec![
            ("a/x".to_owned(), QoS::AtMostOnce, None),
            ("a/x".to_owned(), QoS::AtMostOnce, None)
        ]
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
fn deliveries_carry_the_identifiers_of_the_subscriptions_they_match() {
    let mut session = v5_session(10);
    for (packet_id, filter, subscription_id) in [(1, "a/+", 7), (2, "a/x", 9), (3, "b/#", 0)] {
        let Packet::V5(v5::Packet::Subscribe(mut subscribe)) =
            v5_subscribe_packet(packet_id, &[(filter, v5_options(QoS::AtMostOnce))])
        else {
            unreachable!()
        };
        subscribe.id = std::num::NonZeroU32::new(subscription_id);
        session.handle_packet(Packet::V5(v5::Packet::Subscribe(subscribe)));
        drain(&mut session);
        session.handle_subscribe_authorized(id(packet_id), vec![true], 0);
        drain(&mut session);
    }
    let ids_of = |session: &mut Session, channel: &str| {
        session.handle_delivery(&message(channel, 1, None, "m1"));
        let actions = drain(session);
        let publishes = sent_publishes(&actions);
        assert_eq!(publishes.len(), 1, "delivered once");
        publishes[0]
            .properties
            .as_ref()
            .map(|properties| {
                properties
                    .subscription_ids
                    .iter()
                    .map(|id| id.get())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        ids_of(&mut session, "a:x"),
        vec![7, 9],
        "both filters match"
    );
    assert_eq!(ids_of(&mut session, "a:y"), vec![7]);
    assert!(
        ids_of(&mut session, "b:z").is_empty(),
        "no identifier given"
    );
}

/// `publish_size_bytes` against the codec's encoder: v3/v5, QoS 0/1, with and without
/// subscription identifiers (1 to 4 bytes each) and a topic alias, with payloads putting the
/// Remaining Length on each side of its 1/2, 2/3 and 3/4 byte boundaries.
#[test]
fn the_publish_size_is_exactly_what_the_codec_encodes() {
    use tokio_util::codec::Encoder as _;

    use crate::session::outbound::publish_size_bytes;

    let encoded_bytes = |version: Version, publish: Publish| {
        let mut buffer = bytes::BytesMut::new();
        match version {
            Version::V3 => v3::Codec::new(0)
                .encode(v3::Packet::Publish(Box::new(publish)), &mut buffer)
                .unwrap(),
            Version::V5 => v5::Codec::new(0, 0)
                .encode(v5::Packet::Publish(Box::new(publish)), &mut buffer)
                .unwrap(),
        }
        buffer.len()
    };
    let ids = |ids: &[u32]| -> Vec<std::num::NonZeroU32> {
        ids.iter()
            .map(|id| std::num::NonZeroU32::new(*id).unwrap())
            .collect()
    };
    // One buffer, sliced: no copy per payload.
    let payloads = Bytes::from(vec![7u8; 2_097_200]);
    let long_topic = "t/".repeat(100);
    let mut checked = 0;
    for version in [Version::V3, Version::V5] {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            for subscription_ids in [ids(&[]), ids(&[1]), ids(&[127, 128, 16_384, 268_435_455])] {
                for topic_alias in [false, true] {
                    for topic in ["", "a/x", long_topic.as_str()] {
                        let size_of = |payload_bytes| {
                            publish_size_bytes(
                                version,
                                topic.len(),
                                qos,
                                payload_bytes,
                                &subscription_ids,
                                topic_alias,
                            )
                        };
                        // Remaining Length without payload (a 1-byte length prefix then).
                        let overhead = size_of(0) - 2;
                        let mut payload_sizes = vec![0, 5];
                        // (The long topic alone is past the first boundary.)
                        for boundary in [127_usize, 16_383, 2_097_151] {
                            if let Some(at) = boundary.checked_sub(overhead) {
                                payload_sizes.extend([at, at + 1]);
                            }
                        }
                        for payload_bytes in payload_sizes {
                            let properties =
                                (version == Version::V5).then(|| v5::PublishProperties {
                                    topic_alias: topic_alias.then(|| id(9)),
                                    subscription_ids: subscription_ids.clone(),
                                    ..v5::PublishProperties::default()
                                });
                            let publish = Publish {
                                dup: false,
                                retain: false,
                                qos,
                                topic: topic.into(),
                                packet_id: (qos != QoS::AtMostOnce).then(|| id(1)),
                                payload: payloads.slice(..payload_bytes),
                                properties,
                            };
                            assert_eq!(
                                size_of(payload_bytes),
                                encoded_bytes(version, publish),
                                "{version:?} {qos:?} ids {subscription_ids:?} alias \
                                 {topic_alias} topic {} payload {payload_bytes}",
                                topic.len()
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    // 72 shapes, each with 6 or 8 payload sizes.
    assert!(checked > 72 * 6, "{checked}");
}
