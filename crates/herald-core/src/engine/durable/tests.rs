use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::*;
use crate::chain::ChainHash;
use crate::error::ErrorCode;
use crate::message::{Data, Message};
use crate::names::MessageId;
use crate::stream::SkipReason;

fn epoch(name: &str) -> Epoch {
    Epoch::parse(name).unwrap()
}

fn position(epoch_name: &str, serial: u64) -> Position {
    Position::new(epoch(epoch_name), Serial(serial))
}

fn channel() -> ChannelName {
    ChannelName::parse("jobs:a").unwrap()
}

fn subscriber() -> SubscriberId {
    SubscriberId::parse("worker-1").unwrap()
}

fn options(inflight_max: u32, max_deliveries: u32) -> SubscriberOptions {
    SubscriberOptions {
        ack_wait_ms: 1_000,
        max_deliveries,
        inflight_max,
        expires_after_ms: 0,
    }
}

/// A channel as the store sees it.
struct Log {
    epoch: &'static str,
    top: u64,
    /// The first serial retention keeps.
    first: u64,
    /// When a serial's TTL runs out (ms), if it has one.
    expires_at: BTreeMap<u64, u64>,
}

impl Log {
    fn new(top: u64) -> Log {
        Log {
            epoch: "E1",
            top,
            first: 1,
            expires_at: BTreeMap::new(),
        }
    }

    fn message(&self, serial: u64) -> Message {
        Message {
            channel: channel(),
            epoch: epoch(self.epoch),
            serial: Serial(serial),
            id: MessageId::parse(&format!("m{serial}")).unwrap(),
            time: Timestamp(0),
            name: None,
            headers: BTreeMap::new(),
            data: Data::Json(Bytes::from_static(b"1")),
            ttl_ms: self.expires_at.get(&serial).copied(),
            chain: ChainHash([serial as u8; 32]),
        }
    }

    fn status(&self) -> Option<StreamStatus> {
        (self.top > 0).then(|| StreamStatus {
            epoch: epoch(self.epoch),
            first: (self.first <= self.top).then(|| position(self.epoch, self.first)),
            top: position(self.epoch, self.top),
            messages: self.top + 1 - self.first,
            bytes: 0,
        })
    }

    fn read(
        &self,
        after: &Position,
        limit: usize,
        now: Timestamp,
    ) -> Result<Page<Message>, ContinuityLost> {
        let top = (self.top > 0).then(|| position(self.epoch, self.top));
        let lost = |reason| ContinuityLost {
            reason,
            requested: after.clone(),
            first_available: (self.first <= self.top).then(|| position(self.epoch, self.first)),
            top: top.clone(),
        };
        if after.epoch != epoch(self.epoch) || self.top == 0 {
            return Err(lost(ContinuityReason::EpochChanged));
        }
        if after.serial.0 > self.top {
            return Err(lost(ContinuityReason::AheadOfTop));
        }
        if after.serial.0 + 1 < self.first {
            return Err(lost(ContinuityReason::Retention));
        }
        let mut page = Page {
            messages: Vec::new(),
            skipped: Vec::new(),
            more: false,
        };
        for serial in after.serial.0 + 1..=self.top {
            if page.messages.len() == limit {
                page.more = true;
                break;
            }
            if self.expires_at.get(&serial).is_some_and(|at| *at <= now.0) {
                match page.skipped.last_mut() {
                    Some(range) if range.to.0 + 1 == serial => range.to = Serial(serial),
                    _ => page.skipped.push(SkippedRange {
                        from: Serial(serial),
                        to: Serial(serial),
                        reason: SkipReason::Expired,
                    }),
                }
            } else {
                page.messages.push(self.message(serial));
            }
        }
        Ok(page)
    }
}

struct SentContext {
    now: u64,
    attempts: Option<u32>,
    done: bool,
}

/// Drives one machine against a [`Log`], with a store that persists snapshots when told.
struct Harness {
    log: Log,
    machine: DurableMachine<Message>,
    now: Timestamp,
    /// The last snapshot made durable.
    durable: Option<SubscriberState>,
    /// The snapshot being persisted.
    persisting: Option<SubscriberState>,
    /// Persists complete as soon as they are asked for.
    instant_persist: bool,
    sent: Vec<DurableOutbound<Message>>,
    /// For each frame of `sent`: when it went, and the durable snapshot's word on its
    /// serial then (delivery count, done).
    sent_context: Vec<SentContext>,
    dead_letters: Vec<(u64, u32)>,
    acks_durable: Option<AckTicket>,
}

impl Harness {
    fn create(log: Log, options: SubscriberOptions, start: Start) -> Harness {
        let machine =
            DurableMachine::create(channel(), subscriber(), options, start, 4, Timestamp(0));
        Harness::with(log, machine, None)
    }

    fn with(
        log: Log,
        machine: DurableMachine<Message>,
        durable: Option<SubscriberState>,
    ) -> Harness {
        let mut harness = Harness::unstarted(log, machine, durable);
        harness.drive();
        harness
    }

    /// A harness whose machine has not been driven yet.
    fn unstarted(
        log: Log,
        machine: DurableMachine<Message>,
        durable: Option<SubscriberState>,
    ) -> Harness {
        Harness {
            log,
            machine,
            now: Timestamp(0),
            durable,
            persisting: None,
            instant_persist: true,
            sent: Vec::new(),
            sent_context: Vec::new(),
            dead_letters: Vec::new(),
            acks_durable: None,
        }
    }

    /// A new connection from the last durable snapshot.
    fn reconnect(self) -> Harness {
        let state = self.durable.clone().expect("a snapshot was persisted");
        let machine = DurableMachine::resume(state, 4, self.now);
        let mut next = Harness::with(self.log, machine, self.durable);
        next.now = self.now;
        next
    }

    fn drive(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                DurableAction::ReadStatus => self.machine.handle_status(self.log.status()),
                DurableAction::Read { after, limit } => self
                    .machine
                    .handle_page(self.log.read(&after, limit, self.now)),
                DurableAction::Persist(state) => {
                    assert!(self.persisting.is_none(), "one persist in flight");
                    self.persisting = Some(state);
                    if self.instant_persist {
                        self.complete_persist();
                    }
                }
                DurableAction::Send(outbound) => {
                    let serial = match &outbound {
                        DurableOutbound::Delivery { message, .. } => Some(message.serial),
                        _ => None,
                    };
                    let durable = self.durable.as_ref();
                    self.sent_context.push(SentContext {
                        now: self.now.0,
                        attempts: serial
                            .and_then(|serial| durable.map(|state| state.attempts_of(serial))),
                        done: serial.is_some_and(|serial| {
                            durable.is_some_and(|state| state.is_acked(serial))
                        }),
                    });
                    self.sent.push(outbound);
                }
                DurableAction::DeadLetter {
                    message,
                    deliveries,
                    reason,
                } => {
                    assert_eq!(reason, DeadLetterReason::MaxDeliveries);
                    self.dead_letters.push((message.serial.0, deliveries));
                    self.machine.handle_dead_lettered();
                }
                DurableAction::AcksDurable(ticket) => self.acks_durable = Some(ticket),
                DurableAction::Fail(reason) => panic!("the machine failed: {reason}"),
            }
        }
    }

    fn complete_persist(&mut self) {
        self.durable = self.persisting.take();
        self.machine.handle_persisted(self.now);
    }

    fn publish(&mut self, count: u64) {
        self.log.top += count;
        self.machine
            .handle_published(&position(self.log.epoch, self.log.top));
        self.drive();
    }

    fn tick(&mut self, advance_ms: u64) {
        self.now = self.now.plus_ms(advance_ms);
        self.machine.handle_tick(self.now);
        self.drive();
    }

    fn ack_through(&mut self, serial: u64) -> Result<AckTicket, AckRejected> {
        let result = self
            .machine
            .handle_ack_through(&position(self.log.epoch, serial), self.now);
        self.drive();
        result
    }

    fn ack_one(&mut self, serial: u64) -> Result<AckTicket, AckRejected> {
        let result = self
            .machine
            .handle_ack_one(&position(self.log.epoch, serial), self.now);
        self.drive();
        result
    }

    /// What was sent since the last call, as `(serial, delivery_count)` for deliveries.
    fn take_deliveries(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.sent)
            .into_iter()
            .filter_map(|frame| match frame {
                DurableOutbound::Delivery {
                    message,
                    delivery_count,
                } => Some((message.serial.0, delivery_count)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_new_subscriber_is_persisted_before_subscribed_and_gets_what_follows_in_order() {
    let machine = DurableMachine::create(
        channel(),
        subscriber(),
        options(10, 5),
        Start::Live,
        4,
        Timestamp(0),
    );
    let mut harness = Harness::unstarted(Log::new(3), machine, None);
    harness.instant_persist = false;
    harness.drive();
    assert!(
        harness.sent.is_empty(),
        "subscribed waits for the placement to be durable"
    );
    let placed = harness.persisting.clone().unwrap();
    assert_eq!(placed.acked_position(), Some(position("E1", 3)));
    harness.complete_persist();
    harness.drive();
    assert_eq!(
        harness.sent,
        vec![DurableOutbound::Subscribed {
            continuity: Continuity::New,
            after: Some(position("E1", 3)),
            top: Some(position("E1", 3)),
        }]
    );
    harness.sent.clear();
    harness.publish(3);
    // The attempts are persisted before anything is delivered.
    assert!(harness.sent.is_empty());
    assert_eq!(
        harness.persisting.as_ref().unwrap().attempts,
        vec![(Serial(4), 1), (Serial(5), 1), (Serial(6), 1)]
    );
    harness.complete_persist();
    harness.drive();
    assert_eq!(harness.take_deliveries(), vec![(4, 1), (5, 1), (6, 1)]);
}

#[test]
fn the_window_holds_at_most_inflight_max_serials_after_the_acked_position() {
    let mut harness = Harness::create(Log::new(0), options(3, 5), Start::FromStart);
    harness.publish(8);
    assert_eq!(harness.take_deliveries(), vec![(1, 1), (2, 1), (3, 1)]);
    assert_eq!(harness.machine.pending(), 3);
    // Acking 2 and 3 individually does not open the window: 1 holds it.
    harness.ack_one(2).unwrap();
    harness.ack_one(3).unwrap();
    assert!(harness.take_deliveries().is_empty());
    harness.ack_one(1).unwrap();
    assert_eq!(harness.take_deliveries(), vec![(4, 1), (5, 1), (6, 1)]);
    harness.ack_through(5).unwrap();
    assert_eq!(harness.take_deliveries(), vec![(7, 1), (8, 1)]);
    assert_eq!(harness.durable.as_ref().unwrap().acked_through, Serial(5));
}

#[test]
fn persists_are_coalesced_one_at_a_time() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::FromStart);
    harness.sent.clear();
    harness.instant_persist = false;
    harness.publish(2);
    // The placement's snapshot is in flight; 1 and 2 were read and counted meanwhile.
    let placement = harness.persisting.clone().unwrap();
    assert!(placement.attempts.is_empty());
    harness.publish(2);
    assert!(
        harness.sent.is_empty(),
        "deliveries wait for their attempts to be durable"
    );
    harness.complete_persist();
    harness.drive();
    assert!(harness.sent.is_empty());
    // One snapshot carries every attempt counted while the first was in flight.
    assert_eq!(harness.persisting.as_ref().unwrap().attempts.len(), 4);
    harness.complete_persist();
    harness.drive();
    assert_eq!(
        harness.take_deliveries(),
        vec![(1, 1), (2, 1), (3, 1), (4, 1)]
    );
    assert!(harness.persisting.is_none());
}

#[test]
fn acks_of_undelivered_serials_or_another_epoch_are_rejected() {
    let mut harness = Harness::create(Log::new(0), options(2, 5), Start::FromStart);
    assert_eq!(harness.ack_through(1), Err(AckRejected::NothingDelivered));
    harness.publish(5);
    assert_eq!(harness.take_deliveries(), vec![(1, 1), (2, 1)]);
    assert_eq!(
        harness.ack_one(3),
        Err(AckRejected::NotDelivered {
            serial: Serial(3),
            delivered_through: Serial(2)
        })
    );
    assert!(matches!(
        harness.ack_through(4),
        Err(AckRejected::NotDelivered { .. })
    ));
    let other = harness
        .machine
        .handle_ack_one(&position("E9", 1), harness.now);
    assert!(matches!(other, Err(AckRejected::WrongEpoch { .. })));
    assert_eq!(other.unwrap_err().code(), ErrorCode::InvalidAck);
    // Nothing changed: the durable position is still before 1.
    assert_eq!(harness.durable.as_ref().unwrap().acked_through, Serial(0));
    // Acking again what is acked is fine (and durable at once).
    let ticket = harness.ack_one(1).unwrap();
    let again = harness.ack_one(1).unwrap();
    assert!(harness.machine.is_durable(ticket) && harness.machine.is_durable(again));
}

#[test]
fn an_ack_is_reported_durable_once_its_snapshot_is() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::FromStart);
    harness.publish(3);
    harness.take_deliveries();
    harness.instant_persist = false;
    let ticket = harness.ack_one(2).unwrap();
    assert!(!harness.machine.is_durable(ticket));
    assert_eq!(
        harness.persisting.as_ref().unwrap().acked_above,
        vec![Serial(2)]
    );
    harness.acks_durable = None;
    harness.complete_persist();
    harness.drive();
    assert!(harness.machine.is_durable(ticket));
    assert!(
        harness
            .acks_durable
            .is_some_and(|reported| reported >= ticket)
    );
}

#[test]
fn a_retry_time_replaces_ack_wait_for_that_delivery_only() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::FromStart);
    harness.publish(2);
    assert_eq!(harness.take_deliveries(), vec![(1, 1), (2, 1)]);
    let epoch = harness.log.epoch;
    assert!(
        harness
            .machine
            .handle_retry_at(&position(epoch, 1), Timestamp(250))
    );
    assert!(
        !harness
            .machine
            .handle_retry_at(&position(epoch, 7), Timestamp(250)),
        "serial 7 was never delivered"
    );
    assert!(
        !harness
            .machine
            .handle_retry_at(&position("other", 2), Timestamp(250)),
        "another epoch"
    );
    assert_eq!(harness.machine.next_deadline(), Some(Timestamp(250)));
    harness.tick(250);
    assert_eq!(harness.take_deliveries(), vec![(1, 2)]);
    harness.tick(750);
    assert_eq!(harness.take_deliveries(), vec![(2, 2)]);
}

#[test]
fn unacked_deliveries_come_again_after_ack_wait_with_their_count() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::FromStart);
    harness.publish(3);
    assert_eq!(harness.take_deliveries(), vec![(1, 1), (2, 1), (3, 1)]);
    assert_eq!(harness.machine.next_deadline(), Some(Timestamp(1_000)));
    harness.ack_one(2).unwrap();
    harness.tick(999);
    assert!(harness.take_deliveries().is_empty(), "not due yet");
    harness.tick(1);
    assert_eq!(harness.take_deliveries(), vec![(1, 2), (3, 2)]);
    assert_eq!(
        harness.durable.as_ref().unwrap().attempts,
        vec![(Serial(1), 2), (Serial(3), 2)]
    );
    assert_eq!(harness.machine.next_deadline(), Some(Timestamp(2_000)));
    harness.ack_through(3).unwrap();
    harness.tick(5_000);
    assert!(
        harness.take_deliveries().is_empty(),
        "acked messages are not redelivered"
    );
    assert_eq!(harness.machine.next_deadline(), None);
}

#[test]
fn a_reconnect_redelivers_every_unacked_message_from_the_persisted_state() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::FromStart);
    harness.publish(5);
    harness.take_deliveries();
    harness.ack_one(1).unwrap();
    harness.ack_one(3).unwrap();
    // This ack never becomes durable: the connection (or the server) goes first.
    harness.instant_persist = false;
    harness.ack_one(4).unwrap();
    let mut harness = harness.reconnect();
    assert_eq!(
        harness.sent[0],
        DurableOutbound::Subscribed {
            continuity: Continuity::Held,
            after: Some(position("E1", 1)),
            top: Some(position("E1", 5)),
        }
    );
    assert_eq!(harness.take_deliveries(), vec![(2, 2), (4, 2), (5, 2)]);
}

#[test]
fn a_message_goes_to_dead_letters_after_max_deliveries_and_counts_as_done() {
    let mut harness = Harness::create(Log::new(0), options(10, 3), Start::FromStart);
    harness.publish(2);
    harness.ack_one(2).unwrap();
    harness.tick(1_000);
    harness.tick(1_000);
    assert_eq!(
        harness.take_deliveries(),
        vec![(1, 1), (2, 1), (1, 2), (1, 3)]
    );
    assert!(harness.dead_letters.is_empty());
    harness.tick(1_000);
    assert_eq!(harness.dead_letters, vec![(1, 3)]);
    assert!(harness.take_deliveries().is_empty());
    let durable = harness.durable.clone().unwrap();
    assert_eq!(durable.acked_through, Serial(2));
    assert!(durable.attempts.is_empty());
    assert_eq!(harness.machine.pending(), 0);
}

#[test]
fn a_reconnect_dead_letters_a_message_whose_deliveries_are_used_up() {
    let mut harness = Harness::create(Log::new(0), options(10, 2), Start::FromStart);
    harness.publish(2);
    harness.tick(1_000);
    assert_eq!(
        harness.take_deliveries(),
        vec![(1, 1), (2, 1), (1, 2), (2, 2)]
    );
    let mut harness = harness.reconnect();
    assert_eq!(harness.dead_letters, vec![(1, 2), (2, 2)]);
    assert!(harness.take_deliveries().is_empty());
    assert_eq!(harness.durable.as_ref().unwrap().acked_through, Serial(2));
}

#[test]
fn messages_whose_ttl_ran_out_unacked_are_reported_expired_and_done() {
    let mut log = Log::new(0);
    log.expires_at.extend([(2, 50), (3, 50), (5, 1_500)]);
    let mut harness = Harness::create(log, options(10, 5), Start::FromStart);
    harness.sent.clear();
    harness.now = Timestamp(100);
    harness.publish(5);
    assert_eq!(
        harness.sent[..3],
        [
            DurableOutbound::Delivery {
                message: harness.log.message(1),
                delivery_count: 1
            },
            DurableOutbound::Expired {
                from: position("E1", 2),
                to: position("E1", 3)
            },
            DurableOutbound::Delivery {
                message: harness.log.message(4),
                delivery_count: 1
            },
        ]
    );
    assert_eq!(harness.take_deliveries(), vec![(1, 1), (4, 1), (5, 1)]);
    harness.ack_through(1).unwrap();
    assert_eq!(harness.durable.as_ref().unwrap().acked_through, Serial(3));
    // 5 expires while delivered and unacked: at its redelivery it is reported instead.
    harness.tick(2_000);
    assert_eq!(
        harness.sent,
        vec![
            DurableOutbound::Delivery {
                message: harness.log.message(4),
                delivery_count: 2
            },
            DurableOutbound::Expired {
                from: position("E1", 5),
                to: position("E1", 5)
            },
        ]
    );
    assert!(harness.durable.as_ref().unwrap().is_acked(Serial(5)));
}

#[test]
fn a_state_from_another_epoch_gets_continuity_lost_and_moves_on_persisted() {
    let mut log = Log::new(4);
    log.epoch = "E2";
    let mut stored = SubscriberState::new(
        channel(),
        subscriber(),
        position("E1", 7),
        options(10, 5),
        Timestamp(0),
    );
    stored.record_attempt(Serial(8));
    let machine = DurableMachine::resume(stored, 4, Timestamp(0));
    let mut harness = Harness::with(log, machine, None);
    assert_eq!(
        harness.sent[..2],
        [
            DurableOutbound::Subscribed {
                continuity: Continuity::Lost,
                after: Some(position("E2", 0)),
                top: Some(position("E2", 4)),
            },
            DurableOutbound::ContinuityLost {
                from: position("E1", 8),
                to: Some(position("E2", 0)),
                reason: ContinuityReason::EpochChanged,
            },
        ]
    );
    assert_eq!(
        harness.take_deliveries(),
        vec![(1, 1), (2, 1), (3, 1), (4, 1)]
    );
    let durable = harness.durable.unwrap();
    assert_eq!(durable.epoch, Some(epoch("E2")));
    assert_eq!(durable.attempts.len(), 4, "the old epoch's counts are gone");
}

#[test]
fn a_position_older_than_retention_reports_the_range_and_keeps_later_counts() {
    let mut log = Log::new(10);
    log.first = 6;
    let mut stored = SubscriberState::new(
        channel(),
        subscriber(),
        position("E1", 2),
        options(10, 5),
        Timestamp(0),
    );
    stored.record_attempt(Serial(7));
    let machine = DurableMachine::resume(stored, 4, Timestamp(0));
    let mut harness = Harness::with(log, machine, None);
    assert_eq!(
        harness.sent[1],
        DurableOutbound::ContinuityLost {
            from: position("E1", 3),
            to: Some(position("E1", 5)),
            reason: ContinuityReason::Retention,
        }
    );
    assert_eq!(
        harness.take_deliveries(),
        vec![(6, 1), (7, 2), (8, 1), (9, 1), (10, 1)]
    );
    assert_eq!(harness.durable.unwrap().acked_through, Serial(5));
}

#[test]
fn a_new_subscriber_of_an_empty_channel_gets_its_first_message() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::Live);
    assert_eq!(
        harness.sent,
        vec![DurableOutbound::Subscribed {
            continuity: Continuity::New,
            after: None,
            top: None,
        }]
    );
    let unplaced = harness
        .durable
        .as_ref()
        .expect("persisted before subscribed");
    assert_eq!(unplaced.epoch, None, "no epoch to hold a position in yet");
    assert_eq!(unplaced.acked_position(), None);
    harness.publish(2);
    assert_eq!(harness.take_deliveries(), vec![(1, 1), (2, 1)]);
    assert_eq!(harness.durable.unwrap().epoch, Some(epoch("E1")));
}

#[test]
fn a_subscriber_that_left_before_its_channels_first_message_still_gets_it() {
    let unstarted = Harness::unstarted(
        Log::new(0),
        DurableMachine::create(
            channel(),
            subscriber(),
            options(10, 5),
            Start::Live,
            4,
            Timestamp(0),
        ),
        None,
    );
    let mut harness = unstarted;
    harness.instant_persist = false;
    harness.drive();
    assert!(harness.sent.is_empty(), "subscribed waits for the snapshot");
    harness.complete_persist();
    harness.drive();
    assert!(matches!(
        harness.sent.as_slice(),
        [DurableOutbound::Subscribed { after: None, .. }]
    ));
    // Gone before anything was published; the channel gets 3 messages meanwhile.
    harness.machine.handle_close(harness.now);
    harness.drive();
    assert!(harness.machine.is_closed() || harness.persisting.is_some());
    if harness.persisting.is_some() {
        harness.complete_persist();
    }
    harness.log.top = 3;
    let mut back = harness.reconnect();
    assert_eq!(
        back.sent.first(),
        Some(&DurableOutbound::Subscribed {
            continuity: Continuity::Held,
            after: Some(position("E1", 0)),
            top: Some(position("E1", 3)),
        })
    );
    assert_eq!(back.take_deliveries(), vec![(1, 1), (2, 1), (3, 1)]);
}

#[test]
fn dead_letters_have_a_channel_beside_the_source_and_a_stable_id() {
    assert_eq!(
        dead_letter_channel(&channel()).unwrap().as_str(),
        "jobs:a.dead"
    );
    let long = ChannelName::parse(&format!("jobs:{}", "x".repeat(250))).unwrap();
    assert!(dead_letter_channel(&long).is_err());
    let id = dead_letter_id(&subscriber(), &position("E1", 7));
    assert_eq!(id, dead_letter_id(&subscriber(), &position("E1", 7)));
    assert_ne!(id, dead_letter_id(&subscriber(), &position("E1", 8)));
    assert_ne!(
        id,
        dead_letter_id(
            &SubscriberId::parse("worker-2").unwrap(),
            &position("E1", 7)
        )
    );
}

#[test]
fn an_ack_from_the_previous_connection_is_accepted_and_the_message_not_redelivered() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::FromStart);
    harness.publish(3);
    harness.take_deliveries();
    let machine = DurableMachine::resume(harness.durable.clone().unwrap(), 4, harness.now);
    let mut harness = Harness::unstarted(harness.log, machine, harness.durable);
    // The client acks 2 (delivered on the old connection) before anything is read again.
    harness
        .machine
        .handle_ack_one(&position("E1", 2), harness.now)
        .unwrap();
    harness.drive();
    assert_eq!(harness.take_deliveries(), vec![(1, 2), (3, 2)]);
}

#[test]
fn a_failed_persist_ends_the_subscription_without_delivering() {
    let mut harness = Harness::create(Log::new(0), options(10, 5), Start::FromStart);
    harness.instant_persist = false;
    harness.publish(1);
    harness.complete_persist();
    harness.drive();
    harness.machine.handle_persist_failed("disk full".into());
    let action = harness.machine.poll_action();
    assert!(matches!(action, Some(DurableAction::Fail(reason)) if reason.contains("disk full")));
    assert!(harness.machine.is_ended());
    assert_eq!(harness.machine.poll_action(), None);
    assert!(harness.take_deliveries().is_empty());
}

#[test]
fn closing_persists_the_last_activity() {
    let mut harness = Harness::create(Log::new(2), options(10, 5), Start::Live);
    harness.now = Timestamp(7_000);
    harness.instant_persist = false;
    harness.machine.handle_close(harness.now);
    harness.drive();
    assert!(!harness.machine.is_closed());
    assert_eq!(
        harness.persisting.as_ref().unwrap().last_active,
        Timestamp(7_000)
    );
    harness.complete_persist();
    assert!(harness.machine.is_closed());
    let mut state = harness.durable.unwrap();
    state.options.expires_after_ms = 500;
    assert_eq!(idle_deadline(&state), Some(Timestamp(7_500)));
}

/// xorshift64: a deterministic generator (core has no randomness source).
struct Generator(u64);

impl Generator {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the subscriber saw, across connections, checked as it arrives.
#[derive(Default)]
struct Observer {
    /// Delivery counts of each serial, in the order they arrived (all connections).
    counts: BTreeMap<u64, Vec<u32>>,
    /// This connection: when each serial was last delivered.
    sent_at: BTreeMap<u64, u64>,
    /// This connection: the highest serial delivered for the first time.
    highest_new: u64,
    /// This connection: acks the machine accepted.
    acked: BTreeSet<u64>,
    /// Every ack the machine accepted, any connection.
    acked_ever: BTreeSet<u64>,
    expired: BTreeSet<u64>,
    dead: BTreeSet<u64>,
    /// Delivered and not acked by the client yet (it may ack them on a later connection).
    held: BTreeSet<u64>,
}

impl Observer {
    fn new_connection(&mut self) {
        self.sent_at.clear();
        self.highest_new = 0;
        self.acked.clear();
    }

    /// Checks what the machine sent since the last call against the contract.
    fn check(&mut self, harness: &mut Harness, options: &SubscriberOptions, context: &str) {
        let frames = std::mem::take(&mut harness.sent);
        let sent_context = std::mem::take(&mut harness.sent_context);
        assert_eq!(frames.len(), sent_context.len());
        for (frame, sent) in frames.into_iter().zip(sent_context) {
            match frame {
                DurableOutbound::Delivery {
                    message,
                    delivery_count,
                } => {
                    let serial = message.serial.0;
                    assert!(
                        !sent.done,
                        "{context}: {serial} redelivered after its ack was durable"
                    );
                    assert!(
                        !self.acked.contains(&serial),
                        "{context}: {serial} redelivered after its ack"
                    );
                    assert_eq!(
                        sent.attempts,
                        Some(delivery_count),
                        "{context}: the count of {serial} is durable before it goes out"
                    );
                    assert!(delivery_count <= options.max_deliveries, "{context}");
                    let counts = self.counts.entry(serial).or_default();
                    assert!(
                        counts.last().is_none_or(|last| *last < delivery_count),
                        "{context}: counts of {serial} go up: {counts:?} then {delivery_count}"
                    );
                    counts.push(delivery_count);
                    match self.sent_at.insert(serial, sent.now) {
                        Some(before) => assert!(
                            sent.now >= before + options.ack_wait_ms,
                            "{context}: {serial} redelivered before its ack wait"
                        ),
                        None => {
                            assert!(
                                serial > self.highest_new,
                                "{context}: {serial} out of order"
                            );
                            self.highest_new = serial;
                        }
                    }
                    self.held.insert(serial);
                }
                DurableOutbound::Expired { from, to } => {
                    for serial in from.serial.0..=to.serial.0 {
                        let expires_at = harness.log.expires_at.get(&serial);
                        assert!(
                            expires_at.is_some_and(|at| *at <= sent.now),
                            "{context}: {serial} reported expired too early"
                        );
                        // (Its own expiry may already be in the snapshot: notices do not wait.)
                        assert!(
                            !self.acked.contains(&serial),
                            "{context}: {serial} expired after its ack"
                        );
                        self.expired.insert(serial);
                        self.held.remove(&serial);
                    }
                }
                DurableOutbound::Subscribed { .. } => {}
                DurableOutbound::ContinuityLost { .. } => {
                    panic!("{context}: nothing is lost without retention or a reset")
                }
            }
        }
        for (serial, deliveries) in harness.dead_letters.drain(..) {
            assert_eq!(
                deliveries, options.max_deliveries,
                "{context}: dead letter of {serial}"
            );
            self.dead.insert(serial);
            self.held.remove(&serial);
        }
    }

    fn accepted(&mut self, serials: impl IntoIterator<Item = u64>) {
        for serial in serials {
            self.acked.insert(serial);
            self.acked_ever.insert(serial);
            self.held.remove(&serial);
        }
    }
}

/// Whatever the schedule (publishes, expiring messages, cumulative and individual acks,
/// late acks from an earlier connection, bogus acks, slow persists, ack timeouts,
/// reconnects from the last durable snapshot, crashes that lose a snapshot in flight),
/// every message is delivered at least once in order, or expires, or goes to the dead
/// letters exactly after `max_deliveries`; repeats are only of unacked messages, counts
/// only go up, and nothing acked durably comes again.
#[test]
fn every_message_is_delivered_at_least_once_in_order_under_any_schedule() {
    let mut random = Generator(0x9e37_79b9_7f4a_7c15);
    // What the schedules reached, so the test cannot pass by not exercising a rule.
    let (mut reconnects, mut redeliveries, mut dead, mut expired) = (0, 0, 0, 0);
    for round in 0..300 {
        let options = SubscriberOptions {
            ack_wait_ms: 1_000,
            max_deliveries: 1 + random.below(4) as u32,
            inflight_max: 1 + random.below(6) as u32,
            expires_after_ms: 0,
        };
        let context = format!("round {round}: {options:?}");
        // Messages the client never acks: they end in the dead letters (or expire).
        let poison_modulus = 3 + random.below(8);
        let machine = DurableMachine::create(
            channel(),
            subscriber(),
            options,
            Start::FromStart,
            3,
            Timestamp(0),
        );
        let mut harness = Harness::unstarted(Log::new(0), machine, None);
        harness.instant_persist = false;
        harness.drive();
        let mut observer = Observer::default();
        for _step in 0..120 {
            match random.below(10) {
                0 | 1 => {
                    let count = 1 + random.below(3);
                    for serial in harness.log.top + 1..=harness.log.top + count {
                        if random.chance(15) {
                            let at = harness.now.0 + random.below(3_000);
                            harness.log.expires_at.insert(serial, at);
                        }
                    }
                    harness.publish(count);
                }
                2 | 3 => {
                    if harness.persisting.is_some() {
                        harness.complete_persist();
                        harness.drive();
                    }
                }
                4 => {
                    let held: Vec<u64> = observer
                        .held
                        .iter()
                        .copied()
                        .filter(|serial| serial % poison_modulus != 0)
                        .collect();
                    if !held.is_empty() {
                        let serial = held[random.below(held.len() as u64) as usize];
                        let result = harness.ack_one(serial);
                        assert!(
                            result.is_ok(),
                            "{context}: ack of delivered {serial}: {result:?}"
                        );
                        observer.accepted([serial]);
                    }
                }
                5 => {
                    // Cumulative: everything held below the first poison message.
                    let through = observer
                        .held
                        .iter()
                        .copied()
                        .take_while(|serial| serial % poison_modulus != 0)
                        .last();
                    // Only over serials the client knows about (held or seen done).
                    let below_unheld = through.is_some_and(|through| {
                        (1..=through).all(|serial| {
                            observer.held.contains(&serial)
                                || observer.acked_ever.contains(&serial)
                                || observer.expired.contains(&serial)
                                || observer.dead.contains(&serial)
                        })
                    });
                    if let Some(through) = through.filter(|_| below_unheld) {
                        let result = harness.ack_through(through);
                        assert!(
                            result.is_ok(),
                            "{context}: ack through {through}: {result:?}"
                        );
                        observer
                            .accepted(observer.held.range(..=through).copied().collect::<Vec<_>>());
                    }
                }
                6 => harness.tick(random.below(1_500)),
                7 if random.chance(30) => {
                    // Reconnect; half the time the server crashed and the snapshot in
                    // flight is lost.
                    if harness.persisting.is_some() && random.chance(50) {
                        harness.complete_persist();
                    }
                    harness.persisting = None;
                    observer.check(&mut harness, &options, &context);
                    observer.new_connection();
                    reconnects += 1;
                    let machine = match harness.durable.clone() {
                        Some(state) => DurableMachine::resume(state, 3, harness.now),
                        None => DurableMachine::create(
                            channel(),
                            subscriber(),
                            options,
                            Start::FromStart,
                            3,
                            harness.now,
                        ),
                    };
                    let (log, durable, now) = (harness.log, harness.durable, harness.now);
                    harness = Harness::unstarted(log, machine, durable);
                    harness.now = now;
                    harness.instant_persist = false;
                    harness.drive();
                }
                8 => {
                    let bogus = harness.log.top + 1 + random.below(3);
                    assert!(
                        harness.ack_one(bogus).is_err(),
                        "{context}: ack of unpublished {bogus}"
                    );
                    assert!(harness.ack_through(bogus).is_err(), "{context}");
                }
                _ => harness.drive(),
            }
            observer.check(&mut harness, &options, &context);
        }
        // Drain: nothing new; the client acks everything but poison; time runs on.
        harness.instant_persist = true;
        if harness.persisting.is_some() {
            harness.complete_persist();
        }
        harness.drive();
        for _ in 0..200 {
            observer.check(&mut harness, &options, &context);
            let all_done = harness.durable.as_ref().is_some_and(|state| {
                (1..=harness.log.top).all(|serial| state.is_acked(Serial(serial)))
            });
            if all_done || harness.log.top == 0 {
                break;
            }
            let ackable: Vec<u64> = observer
                .held
                .iter()
                .copied()
                .filter(|serial| serial % poison_modulus != 0)
                .collect();
            for serial in ackable {
                if !observer.held.contains(&serial) {
                    continue; // expired or dead-lettered meanwhile
                }
                assert!(harness.ack_one(serial).is_ok(), "{context}");
                observer.accepted([serial]);
                observer.check(&mut harness, &options, &context);
            }
            harness.tick(1_000);
        }
        observer.check(&mut harness, &options, &context);
        for serial in 1..=harness.log.top {
            let done = harness
                .durable
                .as_ref()
                .is_some_and(|state| state.is_acked(Serial(serial)));
            assert!(
                done,
                "{context}: {serial} is not done: {:?}",
                harness.durable
            );
            let delivered = observer.counts.contains_key(&serial);
            let acked = observer.acked_ever.contains(&serial);
            let expired = observer.expired.contains(&serial);
            let dead = observer.dead.contains(&serial);
            assert!(acked || expired || dead, "{context}: {serial} was lost");
            // A dead letter may follow attempts a crash kept from going out (an attempt
            // counts once durable, before its frame leaves).
            assert!(
                delivered || expired || dead,
                "{context}: {serial} done without a delivery"
            );
            if acked {
                assert!(delivered, "{context}: {serial} acked before delivery");
            }
            if serial % poison_modulus == 0 {
                assert!(!acked && (expired || dead), "{context}: poison {serial}");
            }
        }
        redeliveries += observer
            .counts
            .values()
            .filter(|counts| counts.len() > 1)
            .count();
        dead += observer.dead.len();
        expired += observer.expired.len();
    }
    assert!(
        reconnects > 100 && redeliveries > 100 && dead > 100 && expired > 100,
        "{reconnects} reconnects, {redeliveries} redelivered, {dead} dead, {expired} expired"
    );
}
