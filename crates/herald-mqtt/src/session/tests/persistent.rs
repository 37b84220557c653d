//! Persistent sessions: opening and resuming, write-ahead saves, deliveries served from the
//! log, QoS 2 publishes recorded before they are appended, the session's end.

use super::*;
use crate::session::{ChannelRead, ReadStart, SessionEnd, StoredSession};

fn connect_v5(clean_start: bool, expiry_secs: u32) -> Session {
    v5_connecting(v5::Connect {
        clean_start,
        session_expiry_interval_secs: expiry_secs,
        keep_alive: 30,
        client_id: "dev-1".into(),
        receive_max: NonZeroU16::new(2),
        ..v5::Connect::default()
    })
}

/// Authenticates and answers [`Action::OpenSession`] with `stored`; returns what followed.
fn open(session: &mut Session, stored: Option<StoredSession>) -> Vec<Action> {
    assert!(matches!(drain(session)[..], [Action::Authenticate { .. }]));
    session.handle_authenticated(Ok(()));
    let opening = drain(session);
    assert!(
        matches!(opening[..], [Action::OpenSession { .. }]),
        "{opening:?}"
    );
    session.handle_session_opened(Ok(stored));
    drain(session)
}

/// The one save among `actions`: its generation and state.
fn save_of(actions: &[Action]) -> (u64, StoredSession) {
    let saves: Vec<_> = actions
        .iter()
        .filter_map(|action| match action {
            Action::SaveSession { generation, state } => Some((*generation, state.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(saves.len(), 1, "{actions:?}");
    saves.into_iter().next().unwrap()
}

/// Completes the one save among `actions`; returns what followed.
fn saved(session: &mut Session, actions: &[Action]) -> Vec<Action> {
    let (generation, _) = save_of(actions);
    session.handle_session_saved(generation, Ok(()));
    drain(session)
}

/// A new persistent v5 session past its (saved) CONNACK, subscribed to `a/+` at `qos`.
fn subscribed(qos: QoS) -> Session {
    let mut session = connect_v5(true, 3600);
    let actions = open(&mut session, None);
    saved(&mut session, &actions);
    let actions = subscribe(&mut session, 1, &[("a/+", qos)]);
    let after = saved(&mut session, &actions);
    assert!(matches!(
        sent(&after)[..],
        [Packet::V5(v5::Packet::SubscribeAck(_))]
    ));
    session
}

fn page(messages: Vec<Message>, more: bool) -> ChannelRead {
    let through = messages.last().map(Message::position);
    ChannelRead::Page {
        messages,
        through,
        more,
    }
}

fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

fn position(serial: u64) -> Position {
    Position::new(Epoch::parse("E1").unwrap(), Serial(serial))
}

#[test]
fn a_new_persistent_session_is_saved_before_its_connack() {
    let mut session = connect_v5(true, 3600);
    let actions = open(&mut session, None);
    assert!(sent(&actions).is_empty(), "the CONNACK waits: {actions:?}");
    let (_, state) = save_of(&actions);
    assert_eq!(state.client_id, "dev-1");
    assert_eq!(state.expiry_secs, 3600);
    let after = saved(&mut session, &actions);
    let [Packet::V5(v5::Packet::ConnectAck(connack))] = sent(&after)[..] else {
        panic!("{after:?}")
    };
    assert!(!connack.session_present);
    assert_eq!(
        connack.session_expiry_interval_secs, None,
        "granted as asked"
    );
    assert!(session.is_persistent());
}

#[test]
fn the_expiry_is_capped_and_the_client_told() {
    let mut session = connect_v5(true, u32::MAX);
    let actions = open(&mut session, None);
    let after = saved(&mut session, &actions);
    let [Packet::V5(v5::Packet::ConnectAck(connack))] = sent(&after)[..] else {
        panic!("{after:?}")
    };
    assert_eq!(connack.session_expiry_interval_secs, Some(3600));
}

#[test]
fn v3_clean_session_0_is_persistent_and_clean_start_asks_to_discard() {
    let mut session = v3_connecting(v3::Connect {
        clean_session: false,
        keep_alive: 30,
        client_id: "dev-1".into(),
        ..v3::Connect::default()
    });
    session.poll_action();
    session.handle_authenticated(Ok(()));
    assert!(matches!(
        &drain(&mut session)[..],
        [Action::OpenSession { clean: false, .. }]
    ));
    let mut clean = connect_v5(true, 0);
    clean.poll_action();
    clean.handle_authenticated(Ok(()));
    assert!(matches!(
        &drain(&mut clean)[..],
        [Action::OpenSession { clean: true, .. }]
    ));
    clean.handle_session_opened(Ok(None));
    assert!(!clean.is_persistent());
    assert_eq!(clean.session_end(), SessionEnd::Nothing);
}

#[test]
fn a_suback_waits_for_the_subscription_to_be_saved() {
    let mut session = connect_v5(true, 3600);
    let actions = open(&mut session, None);
    saved(&mut session, &actions);
    let actions = subscribe(&mut session, 1, &[("a/+", QoS::AtLeastOnce)]);
    assert!(sent(&actions).is_empty(), "{actions:?}");
    let (_, state) = save_of(&actions);
    assert_eq!(state.subscriptions.len(), 1);
    assert_eq!(state.subscriptions[0].filter, "a/+");
    assert_eq!(state.subscriptions[0].qos, 1);
}

#[test]
fn a_live_delivery_is_recorded_before_it_is_sent_and_forgotten_once_acknowledged() {
    let mut session = subscribed(QoS::AtLeastOnce);
    session.handle_delivery(&message("a:b", 1, None, "m1"));
    let actions = drain(&mut session);
    assert!(sent_publishes(&actions).is_empty(), "held until saved");
    let (_, state) = save_of(&actions);
    assert_eq!(state.cursors["a:b"], "E1:1");
    assert_eq!(state.outbound.len(), 1);
    assert_eq!(state.outbound[0].position, "E1:1");
    let after = saved(&mut session, &actions);
    let publishes = sent_publishes(&after);
    assert_eq!(publishes.len(), 1);
    assert_eq!(
        publishes[0].packet_id.map(|id| id.get()),
        Some(state.outbound[0].packet_id)
    );
    session.handle_packet(Packet::V5(v5::Packet::PublishAck(v5::PublishAck {
        packet_id: publishes[0].packet_id.unwrap(),
        ..v5::PublishAck::default()
    })));
    drain(&mut session);
    let SessionEnd::Keep(end) = session.session_end() else {
        panic!("kept")
    };
    assert!(end.outbound.is_empty());
    assert_eq!(end.cursors["a:b"], "E1:1");
}

#[test]
fn deliveries_beyond_the_window_are_read_from_the_log_later_not_queued() {
    let mut session = subscribed(QoS::AtLeastOnce);
    // Window 2 (the client's Receive Maximum): the third waits in the log.
    for serial in 1..=3 {
        session.handle_delivery(&message("a:b", serial, None, &format!("m{serial}")));
    }
    let actions = drain(&mut session);
    let after = saved(&mut session, &actions);
    let publishes = sent_publishes(&after);
    assert_eq!(publishes.len(), 2);
    let first = publishes[0].packet_id.unwrap();
    session.handle_packet(Packet::V5(v5::Packet::PublishAck(v5::PublishAck {
        packet_id: first,
        ..v5::PublishAck::default()
    })));
    let actions = drain(&mut session);
    let read = actions
        .iter()
        .find_map(|action| match action {
            Action::ReadChannel {
                channel,
                from,
                limit,
            } => Some((channel.clone(), from.clone(), *limit)),
            _ => None,
        })
        .expect("a read of what is owed");
    assert_eq!(read, (channel("a:b"), ReadStart::After(position(2)), 1));
    session.handle_channel_read(
        &channel("a:b"),
        page(vec![message("a:b", 3, None, "m3")], false),
    );
    let actions = drain(&mut session);
    let after = saved(&mut session, &actions);
    let publishes = sent_publishes(&after);
    assert_eq!(publishes.len(), 1);
    assert_eq!(&publishes[0].topic[..], "a/b");
    assert_eq!(session.deliveries_dropped(), 0);
}

#[test]
fn a_gap_in_the_feed_is_filled_from_the_log() {
    let mut session = subscribed(QoS::AtMostOnce);
    session.handle_delivery(&message("a:b", 1, None, "m1"));
    let actions = drain(&mut session);
    saved(&mut session, &actions);
    // Serials 2 and 3 never came through the feed.
    session.handle_delivery(&message("a:b", 4, None, "m4"));
    let actions = drain(&mut session);
    assert!(
        actions.iter().any(|action| matches!(
            action,
            Action::ReadChannel { from: ReadStart::After(after), .. } if *after == position(1)
        )),
        "{actions:?}"
    );
    let messages = (2..=4)
        .map(|serial| message("a:b", serial, None, "m"))
        .collect();
    session.handle_channel_read(&channel("a:b"), page(messages, false));
    let actions = drain(&mut session);
    let after = saved(&mut session, &actions);
    assert_eq!(sent_publishes(&after).len(), 3);
}

fn stored_session() -> StoredSession {
    StoredSession {
        format: crate::session::STORED_SESSION_FORMAT,
        client_id: "dev-1".into(),
        owner: None,
        expiry_secs: 3600,
        disconnected_ms: Some(1),
        subscriptions: vec![crate::session::StoredSubscription {
            filter: "a/+".into(),
            qos: 2,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
            since_ms: 500,
        }],
        cursors: BTreeMap::from([("a:b".into(), "E1:9".into())]),
        outbound: vec![
            crate::session::StoredOutbound {
                packet_id: 7,
                channel: "a:b".into(),
                position: "E1:8".into(),
                qos: 1,
                retain: false,
                subscription_ids: Vec::new(),
                released: false,
            },
            crate::session::StoredOutbound {
                packet_id: 8,
                channel: "a:b".into(),
                position: "E1:9".into(),
                qos: 2,
                retain: false,
                subscription_ids: Vec::new(),
                released: true,
            },
        ],
        inbound: vec![crate::session::StoredInbound {
            packet_id: 3,
            message_id: "mqtt-old-5".into(),
            received: false,
        }],
        next_packet_id: 9,
    }
}

#[test]
fn a_resumed_session_sends_again_what_was_unacknowledged_then_catches_up() {
    let mut session = connect_v5(false, 3600);
    let actions = open(&mut session, Some(stored_session()));
    let packets = sent(&actions);
    let Packet::V5(v5::Packet::ConnectAck(connack)) = packets[0] else {
        panic!("{actions:?}")
    };
    assert!(connack.session_present);
    assert!(matches!(
        packets[1],
        Packet::V5(v5::Packet::PublishRelease(release)) if release.packet_id.get() == 8
    ));
    assert!(actions.iter().any(
        |action| matches!(action, Action::Subscribe { filter, .. } if filter.as_str() == "a/+")
    ));
    let resend = actions.iter().find_map(|action| match action {
        Action::ReadForResend {
            packet_id,
            position,
            ..
        } => Some((*packet_id, position.clone())),
        _ => None,
    });
    assert_eq!(resend, Some((id(7), position(8))));
    session.handle_resend_read(id(7), Some(message("a:b", 8, Some("1"), "m8")));
    let after = drain(&mut session);
    let publishes = sent_publishes(&after);
    assert_eq!(publishes.len(), 1);
    assert!(publishes[0].dup, "a re-send has DUP");
    assert_eq!(publishes[0].packet_id, Some(id(7)), "with its packet id");
    assert_eq!(publishes[0].qos, QoS::AtLeastOnce);
    // The catch-up waits for room in the window (2: packets 7 and 8 hold it).
    session.handle_channels_listed(vec![channel("a:b"), channel("a:c"), channel("z:z")]);
    let actions = drain(&mut session);
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, Action::ReadChannel { .. })),
        "{actions:?}"
    );
    session.handle_packet(Packet::V5(v5::Packet::PublishAck(v5::PublishAck {
        packet_id: id(7),
        ..v5::PublishAck::default()
    })));
    // A channel with a cursor is read after it, one read at a time, as much as fits.
    let actions = drain(&mut session);
    let reads: Vec<_> = actions
        .iter()
        .filter_map(|action| match action {
            Action::ReadChannel {
                channel,
                from,
                limit,
            } => Some((channel.to_string(), from.clone(), *limit)),
            _ => None,
        })
        .collect();
    assert_eq!(
        reads,
        [("a:b".to_owned(), ReadStart::After(position(9)), 1)]
    );
    session.handle_channel_read(&channel("a:b"), page(Vec::new(), false));
    // A channel without a cursor owes what was stored since the subscription.
    let actions = drain(&mut session);
    assert!(
        actions.iter().any(|action| matches!(
            action,
            Action::ReadChannel { channel, from: ReadStart::Since(500), .. }
                if channel.as_str() == "a:c"
        )),
        "{actions:?}"
    );
}

#[test]
fn a_resend_whose_message_is_gone_frees_its_packet_id() {
    let mut session = connect_v5(false, 3600);
    open(&mut session, Some(stored_session()));
    session.handle_resend_read(id(7), None);
    drain(&mut session);
    let SessionEnd::Keep(end) = session.session_end() else {
        panic!("kept")
    };
    assert_eq!(end.outbound.len(), 1, "only the released one is left");
    assert_eq!(end.outbound[0].packet_id, 8);
}

#[test]
fn a_qos2_publish_is_recorded_before_its_append_and_a_resumed_one_keeps_its_id() {
    let mut session = connect_v5(false, 3600);
    open(&mut session, Some(stored_session()));
    drain(&mut session);
    // The PUBLISH of packet 3 again, after the resume: stored under its recorded id.
    client_publishes(
        &mut session,
        publish("a/b", QoS::ExactlyOnce, Some(3), true),
    );
    let actions = drain(&mut session);
    let Some(Action::Append { message, token, .. }) =
        actions.iter().find(|a| matches!(a, Action::Append { .. }))
    else {
        panic!("{actions:?}")
    };
    assert_eq!(message.id.as_str(), "mqtt-old-5", "the recorded id");
    // A new QoS 2 PUBLISH: its save is asked for before its append.
    client_publishes(
        &mut session,
        publish("a/b", QoS::ExactlyOnce, Some(4), false),
    );
    let actions = drain(&mut session);
    let save = actions
        .iter()
        .position(|a| matches!(a, Action::SaveSession { .. }));
    let append = actions
        .iter()
        .position(|a| matches!(a, Action::Append { .. }));
    assert!(save.unwrap() < append.unwrap(), "{actions:?}");
    let (generation, state) = save_of(&actions);
    assert!(
        state
            .inbound
            .iter()
            .any(|inbound| inbound.packet_id == 4 && !inbound.received)
    );
    session.handle_session_saved(generation, Ok(()));
    let token = *token;
    session.handle_appended(token, AppendOutcome::Durable);
    let actions = drain(&mut session);
    let after = saved(&mut session, &actions);
    assert!(
        sent(&after).iter().any(|packet| matches!(
            packet,
            Packet::V5(v5::Packet::PublishReceived(ack)) if ack.packet_id == id(3)
        )),
        "{after:?}"
    );
}

#[test]
fn continuity_lost_tells_a_v5_client_and_moves_the_cursor_on() {
    let mut session = subscribed(QoS::AtLeastOnce);
    session.handle_delivery(&message("a:b", 5, None, "m5"));
    drain(&mut session);
    session.handle_delivery(&message("a:b", 9, None, "m9"));
    drain(&mut session);
    session.handle_channel_read(
        &channel("a:b"),
        ChannelRead::ContinuityLost {
            resume_after: position(7),
        },
    );
    let actions = drain(&mut session);
    assert!(
        actions
            .iter()
            .any(|action| matches!(action, Action::ContinuityLost { .. }))
    );
    assert_eq!(
        v5_disconnect_code(&actions),
        Some(DisconnectReasonCode::ImplementationSpecificError)
    );
    let SessionEnd::Keep(end) = session.session_end() else {
        panic!("kept")
    };
    assert_eq!(end.cursors["a:b"], "E1:7");
}

#[test]
fn a_takeover_ends_the_connection_with_0x8e_and_expiry_0_removes_the_session() {
    let mut session = connect_v5(false, 0);
    open(&mut session, Some(stored_session()));
    assert_eq!(
        session.session_end(),
        SessionEnd::Remove,
        "resumed with expiry 0"
    );
    session.handle_taken_over();
    let actions = drain(&mut session);
    assert_eq!(
        v5_disconnect_code(&actions),
        Some(DisconnectReasonCode::SessionTakenOver)
    );
    assert!(session.is_closed());
}

#[test]
fn a_disconnect_may_shorten_the_expiry_but_not_add_one() {
    let mut session = subscribed(QoS::AtLeastOnce);
    session.handle_packet(Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
        session_expiry_interval_secs: Some(60),
        ..v5::Disconnect::default()
    })));
    drain(&mut session);
    let SessionEnd::Keep(end) = session.session_end() else {
        panic!("kept")
    };
    assert_eq!(end.expiry_secs, 60);

    let (mut clean, _) = v5_connect(v5::Connect {
        clean_start: true,
        client_id: "x".into(),
        ..v5::Connect::default()
    });
    clean.handle_packet(Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
        session_expiry_interval_secs: Some(60),
        ..v5::Disconnect::default()
    })));
    assert_eq!(
        v5_disconnect_code(&drain(&mut clean)),
        Some(DisconnectReasonCode::ProtocolError)
    );
}

#[test]
fn a_will_waits_for_min_of_its_delay_and_the_session_expiry() {
    let will = |delay: u32| v5::LastWill {
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "status/dev-1".into(),
        message: Bytes::from_static(b"offline"),
        will_delay_interval_sec: Some(delay),
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: Vec::new(),
        is_utf8_payload: None,
        response_topic: None,
    };
    for (expiry_secs, delay_secs, expected) in [(3600, 30, 30), (10, 30, 10), (0, 30, 0)] {
        let mut session = v5_connecting(v5::Connect {
            clean_start: true,
            session_expiry_interval_secs: expiry_secs,
            keep_alive: 30,
            client_id: "dev-1".into(),
            last_will: Some(will(delay_secs)),
            ..v5::Connect::default()
        });
        let actions = open(&mut session, None);
        if expiry_secs > 0 {
            saved(&mut session, &actions);
        }
        session.handle_connection_lost();
        let published = drain(&mut session)
            .into_iter()
            .find_map(|action| match action {
                Action::PublishWill(will) => Some(will),
                _ => None,
            })
            .expect("the will");
        assert_eq!(published.delay_secs, expected, "expiry {expiry_secs}");
    }
}

#[test]
fn channels_behind_are_read_in_turn() {
    let mut session = subscribed(QoS::AtMostOnce);
    let reads = |actions: &[Action]| -> Vec<String> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::ReadChannel { channel, .. } => Some(channel.to_string()),
                _ => None,
            })
            .collect()
    };
    let mut seen = Vec::new();
    // Both channels lose messages in the feed: both fall behind; a:x is read first.
    for name in ["a:x", "a:y"] {
        session.handle_delivery(&message(name, 1, None, "m1"));
        let actions = drain(&mut session);
        seen.extend(reads(&actions));
        seen.extend(reads(&saved(&mut session, &actions)));
        session.handle_delivery(&message(name, 5, None, "m5"));
        seen.extend(reads(&drain(&mut session)));
    }
    assert_eq!(seen, ["a:x"], "one read at a time");
    // a:x has more to read, but a:y goes next.
    session.handle_channel_read(
        &channel("a:x"),
        page(vec![message("a:x", 2, None, "m2")], true),
    );
    let actions = drain(&mut session);
    let mut next = reads(&actions);
    next.extend(reads(&saved(&mut session, &actions)));
    assert_eq!(next, ["a:y"]);
}

#[test]
fn caught_up_deliveries_acknowledged_before_disconnect_are_not_kept() {
    let mut stored = stored_session();
    stored.outbound.clear();
    stored.inbound.clear();
    stored.subscriptions[0].qos = 1;
    let mut session = connect_v5(false, 3600);
    let actions = open(&mut session, Some(stored));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ListChannels { .. }))
    );
    session.handle_channels_listed(vec![channel("a:c")]);
    let actions = drain(&mut session);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ReadChannel { .. })),
        "{actions:?}"
    );
    session.handle_channel_read(
        &channel("a:c"),
        page(
            vec![message("a:c", 1, None, "m1"), message("a:c", 2, None, "m2")],
            false,
        ),
    );
    let actions = drain(&mut session);
    let after = saved(&mut session, &actions);
    let publishes = sent_publishes(&after);
    assert_eq!(publishes.len(), 2, "{after:?}");
    let ids: Vec<NonZeroU16> = publishes.iter().map(|p| p.packet_id.unwrap()).collect();
    for packet_id in ids {
        session.handle_packet(Packet::V5(v5::Packet::PublishAck(v5::PublishAck {
            packet_id,
            ..v5::PublishAck::default()
        })));
    }
    session.handle_packet(Packet::V5(
        v5::Packet::Disconnect(v5::Disconnect::default()),
    ));
    drain(&mut session);
    let SessionEnd::Keep(end) = session.session_end() else {
        panic!("kept")
    };
    assert!(end.outbound.is_empty(), "{:?}", end.outbound);
    assert_eq!(end.cursors["a:c"], "E1:2");
}
