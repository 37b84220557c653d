//! Random packet sequences and answer orders against the contracts a driver and a client rely
//! on (proptest; its regressions are in `proptest-regressions/session/tests/model.txt`).

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
            let version = if v5 { Version::V5 } else { Version::V3 };
            publish_packet(
                version,
                publish(
                    TOPICS[topic],
                    qos(level),
                    (level > 0).then_some(packet_id),
                    dup,
                ),
            )
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
        ) => v5_subscribe_packet(packet_id, &[(FILTERS[filter], v5_options(qos(level)))]),
        (false, Op::Unsubscribe(filter)) => Packet::V3(v3::Packet::Unsubscribe {
            packet_id: id(1),
            topic_filters: vec![FILTERS[filter].into()],
        }),
        (true, Op::Unsubscribe(filter)) => Packet::V5(v5::Packet::Unsubscribe(v5::Unsubscribe {
            packet_id: id(1),
            user_properties: Vec::new(),
            topic_filters: vec![FILTERS[filter].into()],
        })),
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
                    session.handle_subscribe_authorized(packet_id, vec![allow; filters.len()], 0);
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
