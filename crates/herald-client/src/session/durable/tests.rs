//! At-least-once in the pure session: frames in, outputs out, against the wire protocol of
//! docs/protocol.md (the server side is not involved).

use herald_protocol::ws::{Acked, AckedTag, ErrorTag, ExpiredTag, HeartbeatTag};

use super::super::tests::{CHANNEL, Server, events, sent, subscribe_req};
use super::*;
use crate::event::{Broken, Event};
use crate::session::{SubscribeOptions, Subscribed};
use herald_protocol::ws::{Continuity, ServerFrame};

fn position(text: &str) -> Position {
    Position::parse(text).unwrap()
}

/// `frame` (a delivery from [`Server`]) as the server sends it the `count`th time.
fn counted(frame: ServerFrame, count: u32) -> ServerFrame {
    let ServerFrame::Message(mut delivery) = frame else {
        panic!("not a delivery");
    };
    delivery.delivery = Some(count);
    ServerFrame::Message(delivery)
}

fn durable_subscribed(req: u64, after: Option<&str>) -> ServerFrame {
    ServerFrame::Subscribed(Subscribed {
        kind: ws::SubscribedTag::Tag,
        req: Some(req),
        channel: CHANNEL.to_owned(),
        guarantee: "at-least-once".to_owned(),
        hints: false,
        filter: None,
        continuity: Continuity::Held,
        after: after.map(str::to_owned),
        top: after.map(str::to_owned),
    })
}

fn options() -> SubscribeOptions {
    AtLeastOnce::new("worker-1")
        .inflight_max(10)
        .ack_wait_ms(2_000)
        .into()
}

/// A connected session with the subscription `subscribed` after `after`.
fn started(after: Option<&str>) -> (Session, Server) {
    let mut session = Session::default();
    session.subscribe(CHANNEL, options());
    let frames = session.on_connected();
    let req = subscribe_req(&frames);
    let outputs = session.handle(durable_subscribed(req, after));
    assert!(matches!(
        events(outputs).as_slice(),
        [Event::Subscribed { .. }]
    ));
    (session, Server::new("E1"))
}

/// `(serial, delivery count)` of each delivery.
fn deliveries(outputs: &[Output]) -> Vec<(u64, u32)> {
    outputs
        .iter()
        .map(|output| match output {
            Output::Delivery {
                message, delivery, ..
            } => (message.position.serial.0, *delivery),
            other => panic!("expected only deliveries, got {other:?}"),
        })
        .collect()
}

/// `(req, through, position)` of each ack frame.
fn ack_frames(frames: &[ClientFrame]) -> Vec<(u64, Option<String>, Option<String>)> {
    frames
        .iter()
        .map(|frame| match frame {
            ClientFrame::Ack(ack) => (
                ack.req.expect("acks carry a req"),
                ack.through.clone(),
                ack.position.clone(),
            ),
            other => panic!("expected an ack frame, got {other:?}"),
        })
        .collect()
}

fn sent_frames(outputs: &[Output]) -> Vec<ClientFrame> {
    sent(outputs).into_iter().cloned().collect()
}

#[test]
fn subscribes_with_the_subscriber_id_and_options_and_again_without_a_position() {
    let mut session = Session::default();
    session.subscribe(CHANNEL, options());
    for _ in 0..2 {
        let frames = session.on_connected();
        let [ClientFrame::Subscribe(subscribe)] = frames.as_slice() else {
            panic!("expected one subscribe, got {frames:?}");
        };
        assert_eq!(subscribe.guarantee.as_deref(), Some("at-least-once"));
        assert_eq!(subscribe.subscriber_id.as_deref(), Some("worker-1"));
        let wire = subscribe.options.as_ref().expect("options sent");
        assert_eq!(wire.inflight_max, Some(10));
        assert_eq!(wire.ack_wait_ms, Some(2_000));
        assert_eq!(wire.max_deliveries, None);
        assert_eq!(
            (
                &subscribe.from,
                subscribe.rewind,
                subscribe.hints,
                &subscribe.filter
            ),
            (&None, None, None, &None),
            "the server holds the position"
        );
        session.handle(durable_subscribed(subscribe.req.unwrap(), Some("E1:5")));
        session.on_disconnected();
    }
    assert_eq!(session.position(CHANNEL), None);
    assert!(session.recovery_key().positions().is_empty());
    let bare = SubscribeOptions::at_least_once("w");
    let mut session = Session::default();
    session.subscribe(CHANNEL, bare);
    let frames = session.on_connected();
    let [ClientFrame::Subscribe(subscribe)] = frames.as_slice() else {
        panic!("expected one subscribe");
    };
    assert_eq!(
        subscribe.options, None,
        "server defaults: no options object"
    );
}

#[test]
fn redeliveries_and_out_of_order_serials_are_delivered_not_deduped_or_broken() {
    let (mut session, mut server) = started(Some("E1:0"));
    let mut got = Vec::new();
    for n in 1..=3 {
        let frame = counted(server.append(&n.to_string()), 1);
        got.extend(deliveries(&session.handle(frame)));
    }
    // Serial 2 was not acked in time: it comes again after 3, then 4 follows.
    got.extend(deliveries(&session.handle(counted(server.replay(2), 2))));
    got.extend(deliveries(&session.handle(counted(server.append("4"), 1))));
    assert_eq!(got, vec![(1, 1), (2, 1), (3, 1), (2, 2), (4, 1)]);
    // After a reconnect the server delivers every unacked message again.
    session.on_disconnected();
    let req = subscribe_req(&session.on_connected());
    session.handle(durable_subscribed(req, Some("E1:0")));
    let again = deliveries(&session.handle(counted(server.replay(1), 2)));
    assert_eq!(again, vec![(1, 2)]);
}

#[test]
fn a_delivery_without_its_count_is_reported_not_delivered() {
    let (mut session, mut server) = started(Some("E1:0"));
    let outputs = session.handle(server.append("1"));
    let reported = events(outputs);
    assert!(
        matches!(
            reported.as_slice(),
            [Event::Broken(Broken {
                kind: BreakKind::Malformed { .. },
                ..
            })]
        ),
        "{reported:?}"
    );
}

#[test]
fn in_order_acks_fold_into_one_cumulative_frame_and_others_go_alone() {
    let (mut session, mut server) = started(Some("E1:0"));
    for n in 1..=5 {
        session.handle(counted(server.append(&n.to_string()), 1));
    }
    let queued = session
        .ack(
            CHANNEL,
            &[],
            &[position("E1:2"), position("E1:1"), position("E1:4")],
        )
        .unwrap();
    assert_eq!(
        ack_frames(&queued.frames),
        vec![
            (queued.reqs[0], Some("E1:2".into()), None),
            (queued.reqs[1], None, Some("E1:4".into())),
        ],
        "1 and 2 extend the acked position (E1:0); 4 leaves 3 open"
    );
    // 3 closes the hole: the prefix jumps over the individually acked 4.
    let queued = session.ack(CHANNEL, &[], &[position("E1:3")]).unwrap();
    assert_eq!(
        ack_frames(&queued.frames),
        vec![(queued.reqs[0], Some("E1:4".into()), None)]
    );
    // An explicit cumulative ack goes as is.
    let queued = session.ack(CHANNEL, &[position("E1:5")], &[]).unwrap();
    assert_eq!(
        ack_frames(&queued.frames),
        vec![(queued.reqs[0], Some("E1:5".into()), None)]
    );
    assert_eq!(session.acks_pending(), 4);
}

#[test]
fn acks_wait_for_subscribed_and_are_resent_after_a_reconnect_until_answered() {
    let (mut session, mut server) = started(Some("E1:0"));
    session.handle(counted(server.append("1"), 1));
    let first = session.ack(CHANNEL, &[], &[position("E1:1")]).unwrap();
    assert_eq!(first.frames.len(), 1);
    // The connection drops before the answer.
    session.on_disconnected();
    let queued = session.ack(CHANNEL, &[], &[position("E1:1")]).unwrap();
    assert!(queued.frames.is_empty(), "not connected: kept for later");
    let frames = session.on_connected();
    assert!(
        frames
            .iter()
            .all(|frame| matches!(frame, ClientFrame::Subscribe(_))),
        "acks wait for the subscription to be back: {frames:?}"
    );
    let outputs = session.handle(durable_subscribed(subscribe_req(&frames), Some("E1:0")));
    let resent = ack_frames(&sent_frames(&outputs));
    assert_eq!(
        resent.iter().map(|(req, ..)| *req).collect::<Vec<_>>(),
        vec![first.reqs[0], queued.reqs[0]],
        "every unanswered ack, with its request id"
    );
    let confirmed = session.handle(ServerFrame::Acked(Acked {
        kind: AckedTag::Tag,
        req: first.reqs[0],
        channel: CHANNEL.to_owned(),
    }));
    assert!(matches!(
        confirmed.as_slice(),
        [Output::AckConfirmed { req }] if *req == first.reqs[0]
    ));
    assert_eq!(session.acks_pending(), 1);
}

#[test]
fn a_refused_ack_fails_alone_and_the_subscription_goes_on() {
    let (mut session, mut server) = started(Some("E1:0"));
    session.handle(counted(server.append("1"), 1));
    let queued = session.ack(CHANNEL, &[], &[position("E9:1")]).unwrap();
    let outputs = session.handle(ServerFrame::Error(ws::ErrorFrame {
        kind: ErrorTag::Tag,
        req: Some(queued.reqs[0]),
        channel: Some(CHANNEL.to_owned()),
        code: "invalid_ack".to_owned(),
        message: "epoch E9 is not the subscriber's".to_owned(),
        retryable: false,
    }));
    let [Output::AckFailed { req, error, .. }] = outputs.as_slice() else {
        panic!("expected only the failed ack, got {outputs:?}");
    };
    assert_eq!((*req, error.code.as_str()), (queued.reqs[0], "invalid_ack"));
    assert_eq!(session.acks_pending(), 0);
    assert!(session.is_subscribed(CHANNEL));
    assert_eq!(
        deliveries(&session.handle(counted(server.append("2"), 1))),
        vec![(2, 1)]
    );
}

#[test]
fn expired_ranges_are_reported_and_count_as_acked() {
    let (mut session, mut server) = started(Some("E1:0"));
    for n in 1..=3 {
        session.handle(counted(server.append(&n.to_string()), 1));
    }
    let outputs = session.handle(ServerFrame::Expired(ExpiredNotice {
        kind: ExpiredTag::Tag,
        channel: CHANNEL.to_owned(),
        from: "E1:1".to_owned(),
        to: "E1:2".to_owned(),
    }));
    assert_eq!(
        events(outputs),
        vec![Event::Expired {
            from: position("E1:1"),
            to: position("E1:2"),
        }]
    );
    let queued = session.ack(CHANNEL, &[], &[position("E1:3")]).unwrap();
    assert_eq!(
        ack_frames(&queued.frames),
        vec![(queued.reqs[0], Some("E1:3".into()), None)]
    );
}

#[test]
fn continuity_lost_moves_the_acked_position_to_the_new_epoch() {
    let (mut session, _server) = started(Some("E1:4"));
    let outputs = session.handle(ServerFrame::ContinuityLost(ws::ContinuityLostNotice {
        kind: ws::ContinuityLostTag::Tag,
        channel: CHANNEL.to_owned(),
        from: "E1:5".to_owned(),
        to: Some("E2:0".to_owned()),
        reason: "epoch_changed".to_owned(),
    }));
    assert!(matches!(
        events(outputs).as_slice(),
        [Event::ContinuityLost { reason, .. }] if reason == "epoch_changed"
    ));
    let queued = session.ack(CHANNEL, &[], &[position("E2:1")]).unwrap();
    assert_eq!(
        ack_frames(&queued.frames),
        vec![(queued.reqs[0], Some("E2:1".into()), None)]
    );
}

#[test]
fn a_slow_consumer_is_not_reported_stalled_and_other_guarantees_have_no_acks() {
    let (mut session, _server) = started(Some("E1:0"));
    for top in ["E1:5", "E1:9"] {
        let outputs = session.handle(ServerFrame::Heartbeat(ws::Heartbeat {
            kind: HeartbeatTag::Tag,
            time: 1,
            channels: [(CHANNEL.to_owned(), Some(top.to_owned()))].into(),
        }));
        assert!(outputs.is_empty(), "{outputs:?}");
    }
    let mut exactly_once = Session::default();
    exactly_once.subscribe(CHANNEL, SubscribeOptions::default());
    assert_eq!(
        exactly_once
            .ack(CHANNEL, &[], &[position("E1:1")])
            .unwrap_err(),
        AckRefused::NotAtLeastOnce(CHANNEL.to_owned())
    );
    assert_eq!(
        session.ack("other", &[], &[position("E1:1")]).unwrap_err(),
        AckRefused::NotSubscribed("other".to_owned())
    );
}

#[test]
fn unsubscribing_forgets_the_pending_acks() {
    let (mut session, mut server) = started(Some("E1:0"));
    session.handle(counted(server.append("1"), 1));
    session.ack(CHANNEL, &[], &[position("E1:1")]).unwrap();
    assert_eq!(session.acks_pending(), 1);
    session.unsubscribe(CHANNEL);
    assert_eq!(session.acks_pending(), 0);
}

#[test]
fn individual_serials_fold_into_the_prefix_once_contiguous() {
    let epoch = Epoch::parse("E").unwrap();
    let mut span = AckedSpan::new(&Position::new(epoch, Serial(10)));
    assert!(!span.done_one(Serial(12)));
    assert!(!span.done_one(Serial(13)));
    assert!(!span.done_one(Serial(9)), "below the prefix: nothing moves");
    assert!(span.done_one(Serial(11)));
    assert_eq!(span.through, Serial(13));
    assert!(span.above.is_empty());
    assert!(span.done_through(Serial(20)));
    assert!(!span.done_through(Serial(15)));
    assert_eq!(span.through, Serial(20));
}

#[test]
fn on_a_channel_empty_at_subscribe_time_acks_fold_from_its_first_serial() {
    let (mut session, mut server) = started(None);
    for n in 1..=2 {
        session.handle(counted(server.append(&n.to_string()), 1));
    }
    let queued = session
        .ack(CHANNEL, &[], &[position("E1:1"), position("E1:2")])
        .unwrap();
    assert_eq!(
        ack_frames(&queued.frames),
        vec![(queued.reqs[0], Some("E1:2".into()), None)]
    );
}
