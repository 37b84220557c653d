use serde_json::value::RawValue;

use super::*;

pub(super) const CHANNEL: &str = "chat:a";

/// The server side of one channel: messages with true serials and chain hashes.
pub(super) struct Server {
    epoch: Epoch,
    chain: ChainHash,
    serial: u64,
    sent: Vec<MessageBody>,
}

impl Server {
    pub(super) fn new(epoch: &str) -> Self {
        let epoch = Epoch::parse(epoch).unwrap();
        Self {
            chain: ChainHash::genesis(&epoch),
            epoch,
            serial: 0,
            sent: Vec::new(),
        }
    }

    /// Appends a message with JSON `data` and returns its delivery.
    pub(super) fn append(&mut self, data: &str) -> ServerFrame {
        self.serial += 1;
        let id = format!("m{}", self.serial);
        let data_bytes = Data::Json(Bytes::copy_from_slice(data.as_bytes()));
        self.chain = self.chain.next(
            Serial(self.serial),
            &MessageId::parse(&id).unwrap(),
            &data_bytes,
        );
        let body = MessageBody {
            id,
            channel: CHANNEL.to_owned(),
            serial: self.serial,
            epoch: self.epoch.to_string(),
            position: format!("{}:{}", self.epoch, self.serial),
            prev: self.serial - 1,
            chain: self.chain.to_hex(),
            time: 1_000 + self.serial,
            name: None,
            headers: None,
            data: RawValue::from_string(data.to_owned()).unwrap(),
            encoding: None,
            expires_at: None,
        };
        self.sent.push(body.clone());
        deliver(body)
    }

    /// The delivery of an already appended serial (a replay).
    pub(super) fn replay(&self, serial: u64) -> ServerFrame {
        deliver(self.sent[usize::try_from(serial - 1).unwrap()].clone())
    }

    fn position(&self, serial: u64) -> String {
        format!("{}:{serial}", self.epoch)
    }
}

fn deliver(message: MessageBody) -> ServerFrame {
    ServerFrame::Message(Box::new(ws::Delivery {
        message,
        delivery: None,
    }))
}

fn subscribed(req: Option<u64>, continuity: Continuity, after: Option<&str>) -> ServerFrame {
    ServerFrame::Subscribed(Subscribed {
        kind: ws::SubscribedTag::Tag,
        req,
        channel: CHANNEL.to_owned(),
        guarantee: "exactly-once".to_owned(),
        hints: false,
        filter: None,
        continuity,
        after: after.map(str::to_owned),
        top: after.map(str::to_owned),
    })
}

pub(super) fn subscribe_req(frames: &[ClientFrame]) -> u64 {
    frames
        .iter()
        .find_map(|frame| match frame {
            ClientFrame::Subscribe(subscribe) => subscribe.req,
            _ => None,
        })
        .expect("a subscribe frame")
}

/// A connected session with an exactly-once subscription started on an empty channel.
fn started(options: SubscribeOptions) -> (Session, Server) {
    let mut session = Session::default();
    session.subscribe(CHANNEL, options);
    let frames = session.on_connected();
    let req = subscribe_req(&frames);
    let server = Server::new("E1");
    let outputs = session.handle(subscribed(Some(req), Continuity::New, Some("E1:0")));
    assert!(matches!(
        events(outputs).as_slice(),
        [Event::Subscribed { .. }]
    ));
    (session, server)
}

pub(super) fn events(outputs: Vec<Output>) -> Vec<Event> {
    outputs
        .into_iter()
        .filter_map(|output| match output {
            Output::Event { event, .. } => Some(event),
            _ => None,
        })
        .collect()
}

fn delivered_serials(outputs: Vec<Output>) -> Vec<u64> {
    events(outputs)
        .into_iter()
        .map(|event| match event {
            Event::Message(message) => message.position.serial.0,
            other => panic!("expected only messages, got {other:?}"),
        })
        .collect()
}

pub(super) fn sent(outputs: &[Output]) -> Vec<&ClientFrame> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::Send(frame) => Some(frame),
            _ => None,
        })
        .collect()
}

#[test]
fn delivers_in_order_and_drops_the_overlap_after_a_reconnect() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    let mut got = Vec::new();
    for n in 1..=3 {
        got.extend(delivered_serials(
            session.handle(server.append(&n.to_string())),
        ));
    }
    session.on_disconnected();
    let frames = session.on_connected();
    let [ClientFrame::Subscribe(resubscribe)] = frames.as_slice() else {
        panic!("expected one subscribe, got {frames:?}");
    };
    assert_eq!(resubscribe.from.as_deref(), Some("E1:3"));
    assert_eq!(resubscribe.rewind, None);
    let req = resubscribe.req;
    session.handle(subscribed(req, Continuity::Held, Some("E1:3")));
    // The server (or a racing live path) repeats 2 and 3, then goes on.
    got.extend(delivered_serials(session.handle(server.replay(2))));
    got.extend(delivered_serials(session.handle(server.replay(3))));
    got.extend(delivered_serials(session.handle(server.append("4"))));
    assert_eq!(got, vec![1, 2, 3, 4]);
    assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:4");
}

#[test]
fn a_missing_serial_is_reported_and_the_subscription_resumes_from_the_held_position() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    let lost = server.append("2");
    drop(lost);
    let outputs = session.handle(server.append("3"));
    let frames = sent(&outputs);
    assert!(matches!(frames[0], ClientFrame::Unsubscribe(_)));
    let ClientFrame::Subscribe(resubscribe) = frames[1] else {
        panic!("expected a re-subscribe");
    };
    assert_eq!(resubscribe.from.as_deref(), Some("E1:1"));
    let req = resubscribe.req;
    let reported = events(outputs);
    assert_eq!(
        reported,
        vec![Event::Broken(Broken {
            kind: BreakKind::Prev {
                serial: Serial(3),
                prev: Serial(2)
            },
            held: Some(Position::parse("E1:1").unwrap()),
        })]
    );
    assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:1");
    // Frames of the old subscription still in flight are dropped, not reported again.
    assert!(session.handle(server.append("4")).is_empty());
    session.handle(subscribed(req, Continuity::Held, Some("E1:1")));
    let mut got = Vec::new();
    for serial in 2..=4 {
        got.extend(delivered_serials(session.handle(server.replay(serial))));
    }
    assert_eq!(got, vec![2, 3, 4]);
}

#[test]
fn a_forged_chain_is_reported_and_never_delivered() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    assert_eq!(
        delivered_serials(session.handle(server.append("1"))),
        vec![1]
    );
    let ServerFrame::Message(mut forged) = server.append("2") else {
        unreachable!()
    };
    // Same serial, prev and chain, altered data: only the chain can tell.
    forged.message.data = RawValue::from_string("666".to_owned()).unwrap();
    let outputs = session.handle(ServerFrame::Message(forged));
    let reported = events(outputs);
    assert!(
        matches!(
            reported.as_slice(),
            [Event::Broken(Broken {
                kind: BreakKind::Chain {
                    serial: Serial(2),
                    ..
                },
                ..
            })]
        ),
        "{reported:?}"
    );
    assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:1");
}

#[test]
fn the_chain_is_checked_from_genesis_and_across_binary_data() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("{\"a\":1}"));
    // A binary message: the chain covers the decoded bytes, not the base64 text.
    server.serial += 1;
    let bytes = b"\x00\x01binary";
    let id = "bin";
    server.chain = server.chain.next(
        Serial(server.serial),
        &MessageId::parse(id).unwrap(),
        &Data::Binary(Bytes::from_static(bytes)),
    );
    let text = format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    let body = MessageBody {
        id: id.to_owned(),
        channel: CHANNEL.to_owned(),
        serial: 2,
        epoch: "E1".to_owned(),
        position: "E1:2".to_owned(),
        prev: 1,
        chain: server.chain.to_hex(),
        time: 5,
        name: None,
        headers: None,
        data: RawValue::from_string(text).unwrap(),
        encoding: Some(Encoding::Base64),
        expires_at: None,
    };
    let got = events(session.handle(deliver(body)));
    let [Event::Message(message)] = got.as_slice() else {
        panic!("{got:?}");
    };
    assert_eq!(message.data, Data::Binary(Bytes::from_static(bytes)));
    assert_eq!(
        delivered_serials(session.handle(server.append("3"))),
        vec![3]
    );
}

#[test]
fn breaking_again_and_again_closes_the_subscription() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    server.append("2");
    let gapped = server.append("3");
    let mut closed = false;
    for _attempt in 0..=RESYNC_IN_A_ROW_MAX {
        let outputs = session.handle(gapped.clone());
        let req = sent(&outputs).iter().find_map(|frame| match frame {
            ClientFrame::Subscribe(subscribe) => subscribe.req,
            _ => None,
        });
        closed = events(outputs)
            .iter()
            .any(|event| matches!(event, Event::Closed { .. }));
        if let Some(req) = req {
            session.handle(subscribed(Some(req), Continuity::Held, Some("E1:1")));
        }
    }
    assert!(
        closed,
        "the subscription should close after repeated breaks"
    );
    assert!(!session.is_subscribed(CHANNEL));
}

#[test]
fn continuity_lost_is_reported_and_delivery_goes_on_after_its_range() {
    let mut session = Session::default();
    let options = SubscribeOptions {
        from: Some(Position::parse("E0:7").unwrap()),
        ..SubscribeOptions::default()
    };
    session.subscribe(CHANNEL, options);
    let frames = session.on_connected();
    let ClientFrame::Subscribe(subscribe) = &frames[0] else {
        panic!()
    };
    assert_eq!(subscribe.from.as_deref(), Some("E0:7"));
    let mut server = Server::new("E1");
    for n in 1..=3 {
        server.append(&n.to_string());
    }
    session.handle(subscribed(subscribe.req, Continuity::Lost, Some("E1:2")));
    let notice = ServerFrame::ContinuityLost(ws::ContinuityLostNotice {
        kind: ws::ContinuityLostTag::Tag,
        channel: CHANNEL.to_owned(),
        from: "E0:8".to_owned(),
        to: Some(server.position(2)),
        reason: "epoch_changed".to_owned(),
    });
    let reported = events(session.handle(notice));
    assert_eq!(
        reported,
        vec![Event::ContinuityLost {
            from: Position::parse("E0:8").unwrap(),
            to: Some(Position::parse("E1:2").unwrap()),
            reason: "epoch_changed".to_owned(),
        }]
    );
    // The chain is unknown at E1:2: serial 3 becomes the base, serial 4 is checked.
    assert_eq!(delivered_serials(session.handle(server.replay(3))), vec![3]);
    assert_eq!(
        delivered_serials(session.handle(server.append("4"))),
        vec![4]
    );
}

#[test]
fn another_epoch_without_notice_is_a_break() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    let mut other = Server::new("E9");
    other.append("\"x\"");
    let reported = events(session.handle(other.append("\"y\"")));
    assert!(
        matches!(
            reported.as_slice(),
            [Event::Broken(Broken {
                kind: BreakKind::Epoch { .. },
                ..
            })]
        ),
        "{reported:?}"
    );
}

#[test]
fn skips_and_gaps_move_the_position_and_holes_are_reported() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    server.append("2");
    server.append("3");
    let skip = |from: u64, to: u64, chain: Option<String>| {
        ServerFrame::Skip(ws::SkipNotice {
            kind: ws::SkipTag::Tag,
            channel: CHANNEL.to_owned(),
            from: format!("E1:{from}"),
            to: format!("E1:{to}"),
            reason: "filtered".to_owned(),
            chain,
        })
    };
    let reported = events(session.handle(skip(2, 3, Some(server.chain.to_hex()))));
    assert!(matches!(reported.as_slice(), [Event::Skip { .. }]));
    assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:3");
    // The chain from the notice lets serial 4 be verified: a forged one is caught.
    let ServerFrame::Message(mut forged) = server.append("4") else {
        unreachable!()
    };
    forged.message.chain = ChainHash([7; 32]).to_hex();
    assert!(matches!(
        events(session.handle(ServerFrame::Message(forged))).as_slice(),
        [Event::Broken(_)]
    ));
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    server.append("2");
    server.append("3");
    server.append("4");
    // A skip that starts past the next serial leaves a hole: reported.
    let reported = events(session.handle(skip(3, 3, None)));
    assert!(
        matches!(
            reported.as_slice(),
            [Event::Broken(Broken {
                kind: BreakKind::Hole {
                    from: Serial(2),
                    to: Serial(2)
                },
                ..
            })]
        ),
        "{reported:?}"
    );
}

#[test]
fn at_most_once_reports_gaps_including_while_reconnecting() {
    let mut session = Session::default();
    let options = SubscribeOptions {
        guarantee: Guarantee::AtMostOnce,
        ..SubscribeOptions::default()
    };
    session.subscribe(CHANNEL, options);
    let req = subscribe_req(&session.on_connected());
    let mut server = Server::new("E1");
    session.handle(subscribed(Some(req), Continuity::New, Some("E1:0")));
    session.handle(server.append("1"));
    let gap = ServerFrame::Gap(ws::GapNotice {
        kind: ws::GapTag::Tag,
        channel: CHANNEL.to_owned(),
        from: "E1:2".to_owned(),
        to: "E1:3".to_owned(),
        reason: "slow_consumer".to_owned(),
    });
    server.append("2");
    server.append("3");
    assert!(matches!(
        events(session.handle(gap)).as_slice(),
        [Event::Gap { .. }]
    ));
    assert_eq!(
        delivered_serials(session.handle(server.append("4"))),
        vec![4]
    );
    // Reconnect: at-most-once is live only, so it never asks `from`...
    session.on_disconnected();
    let frames = session.on_connected();
    let ClientFrame::Subscribe(resubscribe) = &frames[0] else {
        panic!()
    };
    assert_eq!(
        (resubscribe.from.as_ref(), resubscribe.rewind),
        (None, None)
    );
    // ...and says what it missed while away.
    let reported =
        events(session.handle(subscribed(resubscribe.req, Continuity::New, Some("E1:9"))));
    assert!(matches!(reported[0], Event::Subscribed { .. }));
    assert_eq!(
        reported[1],
        Event::Gap {
            from: Position::parse("E1:5").unwrap(),
            to: Position::parse("E1:9").unwrap(),
            reason: "disconnected".to_owned(),
        }
    );
    // A prev break at-most-once is reported, then the stream goes on from that message.
    let mut later = Server::new("E1");
    for n in 1..=11 {
        later.append(&n.to_string());
    }
    let outputs = session.handle(later.replay(11));
    let reported = events(outputs);
    assert!(matches!(reported[0], Event::Broken(_)), "{reported:?}");
    assert!(matches!(reported[1], Event::Message(_)), "{reported:?}");
}

/// A server that lost its data answers a reconnecting at-most-once subscriber with an
/// empty channel: the session reports the reset, and the new epoch's first message is
/// delivered, not reported as a break.
#[test]
fn at_most_once_reports_a_reset_channel_and_follows_its_new_epoch() {
    let mut session = Session::default();
    let options = SubscribeOptions {
        guarantee: Guarantee::AtMostOnce,
        ..SubscribeOptions::default()
    };
    session.subscribe(CHANNEL, options);
    let req = subscribe_req(&session.on_connected());
    let mut old = Server::new("E1");
    session.handle(subscribed(Some(req), Continuity::New, Some("E1:0")));
    assert_eq!(delivered_serials(session.handle(old.append("1"))), vec![1]);
    session.on_disconnected();
    let req = subscribe_req(&session.on_connected());
    let reported = events(session.handle(subscribed(Some(req), Continuity::New, None)));
    assert_eq!(
        reported[1..],
        [Event::ContinuityLost {
            from: Position::parse("E1:2").unwrap(),
            to: None,
            reason: "epoch_changed".to_owned(),
        }]
    );
    let mut new = Server::new("E2");
    assert_eq!(delivered_serials(session.handle(new.append("1"))), vec![1]);
    assert_eq!(
        session.position(CHANNEL),
        Some(&Position::parse("E2:1").unwrap())
    );
}

#[test]
fn resubscribe_frames_use_from_rewind_once_and_rewind_everything_for_empty_channels() {
    let mut session = Session::default();
    let rewind = SubscribeOptions {
        rewind: Some(5),
        ..SubscribeOptions::default()
    };
    session.subscribe("a", rewind);
    session.subscribe("b", SubscribeOptions::default());
    let frames = session.on_connected();
    let subscribes: Vec<&Subscribe> = frames
        .iter()
        .map(|frame| match frame {
            ClientFrame::Subscribe(subscribe) => subscribe,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(subscribes[0].rewind, Some(5));
    assert_eq!(subscribes[1].rewind, None);
    let reply = |channel: &str, req, after: Option<&str>| {
        ServerFrame::Subscribed(Subscribed {
            kind: ws::SubscribedTag::Tag,
            req,
            channel: channel.to_owned(),
            guarantee: "exactly-once".to_owned(),
            hints: false,
            filter: None,
            continuity: Continuity::New,
            after: after.map(str::to_owned),
            top: None,
        })
    };
    session.handle(reply("a", subscribes[0].req, Some("E:10")));
    session.handle(reply("b", subscribes[1].req, None));
    session.on_disconnected();
    let frames = session.on_connected();
    let ClientFrame::Subscribe(a) = &frames[0] else {
        panic!()
    };
    let ClientFrame::Subscribe(b) = &frames[1] else {
        panic!()
    };
    assert_eq!((a.from.as_deref(), a.rewind), (Some("E:10"), None));
    assert_eq!(
        (b.from.as_deref(), b.rewind),
        (None, Some(REWIND_EVERYTHING))
    );
    assert_eq!(session.recovery_key().to_string(), r#"{"a":"E:10"}"#);
}

fn publication(id: &str) -> PublishMessage {
    PublishMessage {
        id: Some(id.to_owned()),
        ..PublishMessage::json(RawValue::from_string("{\"n\":1}".to_owned()).unwrap())
    }
}

fn ack(req: u64, duplicate: bool) -> ServerFrame {
    ServerFrame::Ack(Ack {
        kind: ws::AckTag::Tag,
        req,
        id: "p1".to_owned(),
        serial: 1,
        epoch: "E1".to_owned(),
        position: "E1:1".to_owned(),
        duplicate,
    })
}

#[test]
fn publishes_are_resent_with_the_same_id_and_complete_once() {
    let mut session = Session::default();
    let (req, frames) = session.publish(CHANNEL, publication("p1"));
    assert!(frames.is_empty(), "not connected yet");
    let ids = |frames: &[ClientFrame]| -> Vec<(u64, String)> {
        frames
            .iter()
            .filter_map(|frame| match frame {
                ClientFrame::Publish(publish) => Some((publish.req, publish.id.clone().unwrap())),
                _ => None,
            })
            .collect()
    };
    assert_eq!(ids(&session.on_connected()), vec![(req, "p1".to_owned())]);
    session.on_disconnected();
    assert_eq!(ids(&session.on_connected()), vec![(req, "p1".to_owned())]);
    let outputs = session.handle(ack(req, true));
    assert!(matches!(
        outputs.as_slice(),
        [Output::Acked { req: acked, ack }] if *acked == req && ack.duplicate
    ));
    assert!(
        session.handle(ack(req, false)).is_empty(),
        "acked once only"
    );
    assert_eq!(session.publishes_pending(), 0);
    session.on_disconnected();
    assert!(ids(&session.on_connected()).is_empty());
}

#[test]
fn retryable_nacks_retry_with_the_same_id_and_final_ones_fail() {
    let mut session = Session::new(SessionConfig {
        publish_nacks_max: 2,
    });
    session.on_connected();
    let (req, _) = session.publish(CHANNEL, publication("p1"));
    let nack = |retryable| {
        ServerFrame::Nack(Nack {
            kind: ws::NackTag::Tag,
            req,
            code: if retryable { "timeout" } else { "id_conflict" }.to_owned(),
            message: "no".to_owned(),
            retryable,
        })
    };
    for _ in 0..2 {
        assert!(matches!(
            session.handle(nack(true)).as_slice(),
            [Output::RetryLater]
        ));
        let frames = session.retry_waiting();
        let [ClientFrame::Publish(again)] = frames.as_slice() else {
            panic!("{frames:?}")
        };
        assert_eq!(again.id.as_deref(), Some("p1"));
    }
    // The third retryable refusal is over the bound: the publish fails.
    assert!(matches!(
        session.handle(nack(true)).as_slice(),
        [Output::PublishFailed { .. }]
    ));
    let (req, _) = session.publish(CHANNEL, publication("p2"));
    let final_nack = ServerFrame::Nack(Nack {
        kind: ws::NackTag::Tag,
        req,
        code: "id_conflict".to_owned(),
        message: "no".to_owned(),
        retryable: false,
    });
    assert!(matches!(
        session.handle(final_nack).as_slice(),
        [Output::PublishFailed { error, .. }] if error.code == "id_conflict"
    ));
}

#[test]
fn a_position_behind_the_previous_heartbeat_top_is_reported() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    let heartbeat = |top: &str| {
        let mut channels = BTreeMap::new();
        channels.insert(CHANNEL.to_owned(), Some(top.to_owned()));
        ServerFrame::Heartbeat(Heartbeat {
            kind: ws::HeartbeatTag::Tag,
            time: 0,
            channels,
        })
    };
    // The first heartbeat only announces a top; messages may still be on their way.
    assert!(session.handle(heartbeat("E1:2")).is_empty());
    server.append("2");
    // One heartbeat later the subscriber still holds 1: stalled.
    let reported = events(session.handle(heartbeat("E1:2")));
    assert_eq!(
        reported,
        vec![Event::Stalled {
            position: Some(Position::parse("E1:1").unwrap()),
            top: Position::parse("E1:2").unwrap(),
        }]
    );
    session.handle(server.replay(2));
    assert!(session.handle(heartbeat("E1:2")).is_empty());
}

#[test]
fn hints_advance_the_position_one_serial_at_a_time() {
    let (mut session, _server) = started(SubscribeOptions {
        hints: true,
        ..SubscribeOptions::default()
    });
    let hint = |serial: u64| {
        ServerFrame::Hint(ws::Hint {
            kind: ws::HintTag::Tag,
            channel: CHANNEL.to_owned(),
            serial,
            epoch: "E1".to_owned(),
            position: format!("E1:{serial}"),
        })
    };
    assert!(matches!(
        events(session.handle(hint(1))).as_slice(),
        [Event::Hint { .. }]
    ));
    assert!(session.handle(hint(1)).is_empty(), "a repeat is dropped");
    assert!(matches!(
        events(session.handle(hint(3))).as_slice(),
        [Event::Broken(_)]
    ));
}

#[test]
fn subscribe_errors_close_or_retry() {
    let mut session = Session::default();
    session.subscribe(CHANNEL, SubscribeOptions::default());
    let req = subscribe_req(&session.on_connected());
    let error = |req, retryable| {
        ServerFrame::Error(ErrorFrame {
            kind: ws::ErrorTag::Tag,
            req: Some(req),
            channel: Some(CHANNEL.to_owned()),
            code: "unavailable".to_owned(),
            message: "busy".to_owned(),
            retryable,
        })
    };
    let outputs = session.handle(error(req, true));
    assert!(matches!(outputs.last(), Some(Output::RetryLater)));
    let req = subscribe_req(&session.retry_waiting());
    let reported = events(session.handle(error(req, false)));
    assert!(matches!(reported.last(), Some(Event::Closed { .. })));
    assert!(!session.is_subscribed(CHANNEL));
}

#[test]
fn a_subscription_the_server_ended_is_resumed_from_the_held_position_after_a_backoff() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    let ended = ServerFrame::Error(ErrorFrame {
        kind: ws::ErrorTag::Tag,
        req: None,
        channel: Some(CHANNEL.to_owned()),
        code: "storage_failed".to_owned(),
        message: "disk".to_owned(),
        retryable: true,
    });
    let outputs = session.handle(ended);
    assert!(matches!(sent(&outputs)[..], [ClientFrame::Unsubscribe(_)]));
    assert!(matches!(outputs.last(), Some(Output::RetryLater)));
    // Frames of the ended subscription still in flight are not taken.
    assert!(session.handle(server.append("2")).is_empty());
    let frames = session.retry_waiting();
    let [ClientFrame::Subscribe(again)] = frames.as_slice() else {
        panic!("{frames:?}")
    };
    assert_eq!(again.from.as_deref(), Some("E1:1"));
    session.handle(subscribed(again.req, Continuity::Held, Some("E1:1")));
    assert_eq!(delivered_serials(session.handle(server.replay(2))), vec![2]);
}

#[test]
fn frames_left_over_from_a_replaced_subscription_are_dropped() {
    let (mut session, mut server) = started(SubscribeOptions::default());
    session.handle(server.append("1"));
    // The application drops the subscription and subscribes again at once: frames of the
    // old one still in flight arrive before the new `subscribed`.
    session.unsubscribe(CHANNEL);
    let frames = session.subscribe(CHANNEL, SubscribeOptions::default());
    let req = subscribe_req(&frames);
    assert!(session.handle(server.append("2")).is_empty());
    let reported = events(session.handle(subscribed(Some(req), Continuity::New, Some("E1:2"))));
    assert!(matches!(reported.as_slice(), [Event::Subscribed { .. }]));
    assert_eq!(
        delivered_serials(session.handle(server.append("3"))),
        vec![3]
    );
}

#[test]
fn a_channel_empty_at_subscribe_time_reports_what_it_could_not_replay() {
    for guarantee in [Guarantee::ExactlyOnce, Guarantee::AtMostOnce] {
        let mut session = Session::default();
        let options = SubscribeOptions {
            guarantee,
            ..SubscribeOptions::default()
        };
        session.subscribe(CHANNEL, options);
        let req = subscribe_req(&session.on_connected());
        session.handle(subscribed(Some(req), Continuity::New, None));
        session.on_disconnected();
        let frames = session.on_connected();
        let ClientFrame::Subscribe(again) = &frames[0] else {
            panic!()
        };
        // Exactly-once asks for everything since the start; at-most-once is live only.
        let expected_rewind = match guarantee {
            Guarantee::ExactlyOnce => Some(REWIND_EVERYTHING),
            Guarantee::AtMostOnce => None,
        };
        assert_eq!(again.rewind, expected_rewind);
        // The server no longer has serials 1..=4 (or at-most-once never replays them).
        let reported = events(session.handle(subscribed(again.req, Continuity::New, Some("E1:4"))));
        let (from, to) = match &reported[1] {
            Event::ContinuityLost { from, to, .. } => (from.clone(), to.clone().unwrap()),
            Event::Gap { from, to, .. } => (from.clone(), to.clone()),
            other => panic!("{guarantee}: {other:?}"),
        };
        assert_eq!(
            (from.to_string(), to.to_string()),
            ("E1:1".into(), "E1:4".into())
        );
    }
}
