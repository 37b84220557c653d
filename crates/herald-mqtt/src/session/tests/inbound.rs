//! Tests of the inbound PUBLISH flows (`session/inbound.rs`): acknowledgements only after
//! durability, QoS 2 once per packet id, refusals, Receive Maximum, refused topics.

use super::*;

#[test]
fn qos1_is_acknowledged_only_after_the_append_is_durable() {
    let mut session = v3_session();
    client_publishes(
        &mut session,
        publish("chat/eu/orders", QoS::AtLeastOnce, Some(3), false),
    );
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
fn acknowledgements_go_out_in_the_order_the_publishes_came() {
    let mut session = v3_session();
    let mut tokens = Vec::new();
    for (packet_id, qos) in [
        (1, QoS::AtLeastOnce),
        (2, QoS::ExactlyOnce),
        (3, QoS::AtLeastOnce),
    ] {
        client_publishes(&mut session, publish("a/b", qos, Some(packet_id), false));
        let actions = drain(&mut session);
        let [Action::Append { token, .. }] = &actions[..] else {
            panic!("{actions:?}")
        };
        tokens.push(*token);
    }
    // The appends complete last first: nothing may be acknowledged before publish 1.
    session.handle_appended(tokens[2], AppendOutcome::Durable);
    session.handle_appended(tokens[1], AppendOutcome::Durable);
    assert!(sent(&drain(&mut session)).is_empty());
    session.handle_appended(tokens[0], AppendOutcome::Durable);
    assert_eq!(
        sent(&drain(&mut session)),
        vec![
            &Packet::V3(v3::Packet::PublishAck { packet_id: id(1) }),
            &Packet::V3(v3::Packet::PublishReceived { packet_id: id(2) }),
            &Packet::V3(v3::Packet::PublishAck { packet_id: id(3) }),
        ]
    );
}

#[test]
fn qos2_is_appended_once_per_packet_id_until_pubrel() {
    let mut session = v3_session();
    let packet = |dup| publish_packet(Version::V3, publish("a/b", QoS::ExactlyOnce, Some(5), dup));
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

/// Publishes at QoS 1, answers the append NotAuthorized; returns what followed.
fn denied_publish(session: &mut Session) -> Vec<Action> {
    client_publishes(session, publish("a/b", QoS::AtLeastOnce, Some(1), false));
    let Some(Action::Append { token, .. }) = session.poll_action() else {
        panic!()
    };
    session.handle_appended(token, AppendOutcome::NotAuthorized);
    drain(session)
}

#[test]
fn a_denied_publish_gets_puback_0x87_in_v5_and_a_disconnect_in_v3() {
    let mut session = v5_session(10);
    let actions = denied_publish(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V5(v5::Packet::PublishAck(ack))]
            if ack.reason_code == v5::PublishAckReason::NotAuthorized
    ));
    assert!(session.is_connected());

    let mut session = v3_session();
    let actions = denied_publish(&mut session);
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
        client_publishes(
            &mut session,
            publish("a/b", QoS::AtLeastOnce, Some(packet_id), false),
        );
    }
    assert_eq!(drain(&mut session).len(), 2);
    client_publishes(
        &mut session,
        publish("a/b", QoS::AtLeastOnce, Some(3), false),
    );
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
        client_publishes(
            &mut session,
            publish("a/b", QoS::AtLeastOnce, Some(packet_id), false),
        );
    }
    let actions = drain(&mut session);
    assert_eq!(actions.len(), 5, "five appends, no close: {actions:?}");
    assert!(session.is_connected());
}

#[test]
fn dollar_and_unmappable_topics_are_refused() {
    let mut session = v5_session(10);
    client_publishes(
        &mut session,
        publish("$SYS/x", QoS::AtLeastOnce, Some(1), false),
    );
    let actions = drain(&mut session);
    assert!(matches!(
        sent(&actions)[..],
        [Packet::V5(v5::Packet::PublishAck(ack))]
            if ack.reason_code == v5::PublishAckReason::TopicNameInvalid
    ));
    // QoS 0 has no acknowledgement to carry the refusal: the connection ends.
    client_publishes(
        &mut session,
        publish("chat/a.b", QoS::AtMostOnce, None, false),
    );
    let actions = drain(&mut session);
    assert_eq!(
        v5_disconnect_code(&actions),
        Some(DisconnectReasonCode::TopicNameInvalid)
    );
}

fn aliased(topic: &str, alias: u16) -> Publish {
    let mut aliased = publish(topic, QoS::AtMostOnce, None, false);
    aliased.properties = Some(v5::PublishProperties {
        topic_alias: NonZeroU16::new(alias),
        ..v5::PublishProperties::default()
    });
    aliased
}

fn appended_channels(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Append { channel, .. } => Some(channel.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_topic_alias_set_by_the_client_names_its_topic_afterwards() {
    let mut session = v5_session(10);
    client_publishes(&mut session, aliased("a/b", 1));
    client_publishes(&mut session, aliased("", 1));
    client_publishes(&mut session, aliased("c/d", 1));
    client_publishes(&mut session, aliased("", 1));
    client_publishes(&mut session, aliased("e/f", 2));
    assert_eq!(
        appended_channels(&drain(&mut session)),
        vec!["a:b", "a:b", "c:d", "c:d", "e:f"]
    );
}

#[test]
fn an_unknown_or_out_of_range_topic_alias_closes_the_connection() {
    let mut session = v5_session(10);
    client_publishes(&mut session, aliased("", 1));
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::ProtocolError),
        "an alias never set"
    );
    let mut session = v5_session(10);
    client_publishes(&mut session, aliased("a/b", 3));
    assert_eq!(
        v5_disconnect_code(&drain(&mut session)),
        Some(DisconnectReasonCode::TopicAliasInvalid),
        "over the Topic Alias Maximum (2 in the test config)"
    );
}

#[test]
fn the_retain_flag_is_kept_in_a_header() {
    let mut session = v3_session();
    let mut retained = publish("a/b", QoS::AtMostOnce, None, false);
    retained.retain = true;
    client_publishes(&mut session, retained);
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
