use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::*;
use crate::message::{Data, Timestamp};
use crate::names::{ChannelName, MessageId};

fn epoch(name: &str) -> Epoch {
    Epoch::parse(name).unwrap()
}

fn message(epoch_name: &str, serial: u64) -> Message {
    Message {
        channel: ChannelName::parse("room").unwrap(),
        epoch: epoch(epoch_name),
        serial: Serial(serial),
        id: MessageId::parse(&format!("m{serial}")).unwrap(),
        time: Timestamp(serial),
        name: None,
        headers: BTreeMap::new(),
        data: Data::Json(Bytes::from_static(b"1")),
        ttl_ms: None,
        chain: ChainHash([serial as u8; 32]),
    }
}

fn position(epoch_name: &str, serial: u64) -> Position {
    Position::new(epoch(epoch_name), Serial(serial))
}

/// A channel as the store sees it, for answering the machine's reads.
struct Log {
    epoch: &'static str,
    /// Serials `1..=top` were published.
    top: u64,
    /// The first serial retention keeps (`top + 1`: none).
    first: u64,
    /// Serials whose TTL ran out: reads report them as skipped.
    expired: BTreeSet<u64>,
}

impl Log {
    fn new(epoch: &'static str, top: u64) -> Log {
        Log {
            epoch,
            top,
            first: 1,
            expired: BTreeSet::new(),
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

    fn read(&self, after: &Position, limit: usize) -> Result<Page<Message>, ContinuityLost> {
        let top = (self.top > 0).then(|| position(self.epoch, self.top));
        let first_available = (self.first <= self.top).then(|| position(self.epoch, self.first));
        let lost = |reason| ContinuityLost {
            reason,
            requested: after.clone(),
            first_available: first_available.clone(),
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
        let mut serial = after.serial.0 + 1;
        while serial <= self.top {
            if page.messages.len() == limit {
                page.more = true;
                break;
            }
            if self.expired.contains(&serial) {
                match page.skipped.last_mut() {
                    Some(range) if range.to.0 + 1 == serial => range.to = Serial(serial),
                    _ => page.skipped.push(SkippedRange {
                        from: Serial(serial),
                        to: Serial(serial),
                        reason: crate::stream::SkipReason::Expired,
                    }),
                }
            } else {
                page.messages.push(message(self.epoch, serial));
            }
            serial += 1;
        }
        Ok(page)
    }
}

/// Performs the machine's actions against `log`, with an outbound queue of
/// `queue_capacity` frames that the subscriber drains into `received` when a `Send` has
/// to wait. Returns the failure, if the machine failed.
fn drive(
    machine: &mut SubscriptionMachine<Message>,
    log: &Log,
    queue: &mut VecDeque<Outbound<Message>>,
    queue_capacity: usize,
    received: &mut Vec<Outbound<Message>>,
) -> Option<String> {
    while let Some(action) = machine.poll_action() {
        match action {
            Action::ReadStatus => machine.handle_status(log.status()),
            Action::Read { after, limit } => machine.handle_page(log.read(&after, limit)),
            Action::Send(outbound) => {
                while queue.len() >= queue_capacity {
                    received.push(queue.pop_front().unwrap());
                }
                queue.push_back(outbound);
            }
            Action::TrySend(outbound) => {
                let room = queue.len() < queue_capacity;
                if room {
                    queue.push_back(outbound);
                }
                machine.handle_try_send(room);
            }
            Action::Fail(reason) => return Some(reason),
        }
    }
    None
}

/// Drives with a queue that always has room; returns what was sent.
fn run(machine: &mut SubscriptionMachine<Message>, log: &Log) -> Vec<Outbound<Message>> {
    let mut queue = VecDeque::new();
    let mut received = Vec::new();
    assert_eq!(
        drive(machine, log, &mut queue, usize::MAX, &mut received),
        None
    );
    received.extend(queue);
    received
}

fn serials(frames: &[Outbound<Message>]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|frame| match frame {
            Outbound::Delivery(message) => Some(message.serial.0),
            _ => None,
        })
        .collect()
}

#[test]
fn a_held_position_replays_the_log_page_by_page_then_goes_live() {
    let log = Log::new("E1", 7);
    let mut machine = SubscriptionMachine::new(
        Guarantee::ExactlyOnce,
        Start::After(position("E1", 2)),
        2,
        None,
    );
    let frames = run(&mut machine, &log);
    assert_eq!(
        frames[0],
        Outbound::Subscribed {
            continuity: Continuity::Held,
            after: Some(position("E1", 2)),
            top: Some(position("E1", 7)),
        }
    );
    assert_eq!(serials(&frames), vec![3, 4, 5, 6, 7]);
    assert!(machine.is_idle());
    // The live ring repeats what the replay gave: dropped; the next one is delivered.
    machine.handle_live(message("E1", 7));
    machine.handle_live_checked(message("E1", 8), &log);
    assert_eq!(machine.position(), Some(position("E1", 8)));
}

impl SubscriptionMachine<Message> {
    /// `handle_live`, then every action, returning the deliveries.
    fn handle_live_checked(&mut self, live: Message, log: &Log) -> Vec<Outbound<Message>> {
        if !self.is_idle() {
            assert!(run(self, log).is_empty());
        }
        self.handle_live(live);
        run(self, log)
    }
}

#[test]
fn a_position_older_than_retention_gets_the_range_and_resumes_after_it() {
    let mut log = Log::new("E1", 10);
    log.first = 6;
    let mut machine = SubscriptionMachine::new(
        Guarantee::ExactlyOnce,
        Start::After(position("E1", 2)),
        100,
        None,
    );
    let frames = run(&mut machine, &log);
    assert_eq!(
        frames[..2],
        [
            Outbound::Subscribed {
                continuity: Continuity::Lost,
                after: Some(position("E1", 5)),
                top: Some(position("E1", 10)),
            },
            Outbound::ContinuityLost {
                from: position("E1", 3),
                to: Some(position("E1", 5)),
                reason: ContinuityReason::Retention,
            },
        ]
    );
    assert_eq!(serials(&frames), vec![6, 7, 8, 9, 10]);
}

#[test]
fn a_position_on_an_empty_channel_is_lost_without_a_range() {
    let log = Log::new("E1", 0);
    let mut machine = SubscriptionMachine::new(
        Guarantee::ExactlyOnce,
        Start::After(position("E0", 4)),
        100,
        None,
    );
    let frames = run(&mut machine, &log);
    assert_eq!(
        frames,
        vec![
            Outbound::Subscribed {
                continuity: Continuity::Lost,
                after: None,
                top: None,
            },
            Outbound::ContinuityLost {
                from: position("E0", 5),
                to: None,
                reason: ContinuityReason::EpochChanged,
            },
        ]
    );
    // The channel's first message starts a cursor from serial 1.
    let log = Log::new("E1", 1);
    assert_eq!(
        serials(&machine.handle_live_checked(message("E1", 1), &log)),
        vec![1]
    );
}

#[test]
fn rewind_starts_n_before_the_top_but_not_before_the_oldest_kept() {
    let mut log = Log::new("E1", 10);
    let mut machine = SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Rewind(3), 100, None);
    assert_eq!(serials(&run(&mut machine, &log)), vec![8, 9, 10]);
    log.first = 9;
    let mut machine = SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Rewind(5), 100, None);
    assert_eq!(serials(&run(&mut machine, &log)), vec![9, 10]);
}

#[test]
fn exactly_once_turns_a_jump_in_the_live_feed_into_log_reads() {
    let mut log = Log::new("E1", 2);
    let mut machine = SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Live, 2, None);
    run(&mut machine, &log);
    log.top = 9;
    let frames = machine.handle_live_checked(message("E1", 9), &log);
    assert_eq!(serials(&frames), vec![3, 4, 5, 6, 7, 8, 9]);
    assert!(machine.is_idle());
}

#[test]
fn a_catch_up_that_does_not_reach_the_live_message_fails_instead_of_skipping() {
    // The log says 5 is the top, yet the feed carries 9: a server bug.
    let log = Log::new("E1", 5);
    let mut machine = SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Live, 2, None);
    run(&mut machine, &log);
    machine.handle_live(message("E1", 9));
    let (mut queue, mut received) = (VecDeque::new(), Vec::new());
    let failure = drive(&mut machine, &log, &mut queue, usize::MAX, &mut received);
    assert!(failure.unwrap().contains("did not reach serial 9"));
    assert!(machine.is_ended());
    assert_eq!(machine.poll_action(), None);
}

#[test]
fn at_most_once_drops_on_a_full_queue_and_reports_the_range_before_the_next_delivery() {
    let log = Log::new("E1", 1);
    let mut machine = SubscriptionMachine::new(Guarantee::AtMostOnce, Start::Live, 8, None);
    let (mut queue, mut received) = (VecDeque::new(), Vec::new());
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    received.extend(queue.drain(..));
    // The queue holds one frame: 2 goes in, 3 and 4 are dropped.
    for serial in 2..=4 {
        machine.handle_live(message("E1", serial));
        drive(&mut machine, &log, &mut queue, 1, &mut received);
    }
    assert_eq!(machine.poll_dropped(), 2);
    assert!(machine.wants_room());
    received.extend(queue.drain(..));
    // 5 arrives with room for one frame: the gap takes it, 5 is dropped too.
    machine.handle_live(message("E1", 5));
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    received.extend(queue.drain(..));
    // Room again on a quiet channel: the pending gap goes out by itself.
    assert!(machine.wants_room());
    machine.handle_room();
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    received.extend(queue.drain(..));
    assert!(!machine.wants_room());
    assert_eq!(
        received[1..],
        [
            Outbound::Delivery(message("E1", 2)),
            Outbound::Gap {
                from: position("E1", 3),
                to: position("E1", 4),
            },
            Outbound::Gap {
                from: position("E1", 5),
                to: position("E1", 5),
            },
        ]
    );
    assert_eq!(machine.poll_dropped(), 1);
}

#[test]
fn filtered_runs_become_one_skip_with_the_chain_at_its_end() {
    let log = Log::new("E1", 1);
    let filter: Filter = Box::new(|message: &Message| message.serial.0.is_multiple_of(4));
    let mut machine =
        SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Live, 8, Some(filter));
    run(&mut machine, &log);
    let mut frames = Vec::new();
    for serial in 2..=5 {
        frames.extend(machine.handle_live_checked(message("E1", serial), &log));
    }
    machine.handle_feed_idle();
    frames.extend(run(&mut machine, &log));
    assert_eq!(
        frames,
        vec![
            Outbound::Skip {
                from: position("E1", 2),
                to: position("E1", 3),
                cause: SkipCause::Filtered,
                chain: Some(ChainHash([3; 32])),
            },
            Outbound::Delivery(message("E1", 4)),
            Outbound::Skip {
                from: position("E1", 5),
                to: position("E1", 5),
                cause: SkipCause::Filtered,
                chain: Some(ChainHash([5; 32])),
            },
        ]
    );
}

#[test]
fn expired_serials_in_the_log_are_skipped_with_their_range() {
    let mut log = Log::new("E1", 6);
    log.expired.extend([2, 3, 6]);
    let mut machine = SubscriptionMachine::new(
        Guarantee::ExactlyOnce,
        Start::After(position("E1", 0)),
        100,
        None,
    );
    let frames = run(&mut machine, &log);
    assert_eq!(
        frames[1..],
        [
            Outbound::Delivery(message("E1", 1)),
            Outbound::Skip {
                from: position("E1", 2),
                to: position("E1", 3),
                cause: SkipCause::Expired,
                chain: None,
            },
            Outbound::Delivery(message("E1", 4)),
            Outbound::Delivery(message("E1", 5)),
            Outbound::Skip {
                from: position("E1", 6),
                to: position("E1", 6),
                cause: SkipCause::Expired,
                chain: None,
            },
        ]
    );
}

#[test]
fn a_new_epoch_mid_stream_is_reported_as_lost_continuity() {
    let log = Log::new("E1", 3);
    let mut machine = SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Live, 8, None);
    run(&mut machine, &log);
    let frames = machine.handle_live_checked(message("E2", 1), &log);
    assert_eq!(
        frames,
        vec![
            Outbound::ContinuityLost {
                from: position("E1", 4),
                to: Some(position("E2", 0)),
                reason: ContinuityReason::EpochChanged,
            },
            Outbound::Delivery(message("E2", 1)),
        ]
    );
}

/// A filtered run still open when the live feed jumps (at-most-once) is reported before
/// the dropped range, so notices stay in serial order.
#[test]
fn a_skip_run_before_a_dropped_range_is_reported_first() {
    let log = Log::new("E1", 1);
    let filter: Filter = Box::new(|message: &Message| message.serial.0 != 2);
    let mut machine = SubscriptionMachine::new(Guarantee::AtMostOnce, Start::Live, 8, Some(filter));
    run(&mut machine, &log);
    let mut frames = machine.handle_live_checked(message("E1", 2), &log);
    frames.extend(machine.handle_live_checked(message("E1", 6), &log));
    assert_eq!(
        frames,
        vec![
            Outbound::Skip {
                from: position("E1", 2),
                to: position("E1", 2),
                cause: SkipCause::Filtered,
                chain: Some(ChainHash([2; 32])),
            },
            Outbound::Gap {
                from: position("E1", 3),
                to: position("E1", 5),
            },
            Outbound::Delivery(message("E1", 6)),
        ]
    );
    assert_eq!(machine.poll_dropped(), 3);
}

/// A notice that must go out (here: a new epoch) never overtakes a pending gap: the gap
/// goes first, waiting for room like the notice does, so the old epoch's drops are not
/// reported after the new epoch began.
#[test]
fn a_pending_gap_goes_out_before_a_new_epochs_notice() {
    let log = Log::new("E1", 1);
    let mut machine = SubscriptionMachine::new(Guarantee::AtMostOnce, Start::Live, 8, None);
    let (mut queue, mut received) = (VecDeque::new(), Vec::new());
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    received.extend(queue.drain(..));
    machine.handle_live(message("E1", 2));
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    // The queue is full: 3 is dropped, its gap waits.
    machine.handle_live(message("E1", 3));
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    assert!(machine.wants_room());
    machine.handle_live(message("E2", 1));
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    received.extend(queue.drain(..));
    // E2:1 found the notice in the one-frame queue: dropped, and reported on room.
    assert!(machine.wants_room());
    machine.handle_room();
    drive(&mut machine, &log, &mut queue, 1, &mut received);
    received.extend(queue.drain(..));
    assert_eq!(
        received[1..],
        [
            Outbound::Delivery(message("E1", 2)),
            Outbound::Gap {
                from: position("E1", 3),
                to: position("E1", 3),
            },
            Outbound::ContinuityLost {
                from: position("E1", 4),
                to: Some(position("E2", 0)),
                reason: ContinuityReason::EpochChanged,
            },
            Outbound::Gap {
                from: position("E2", 1),
                to: position("E2", 1),
            },
        ]
    );
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

/// Whatever the schedule (publishes, a live ring that overflows, a subscriber that reads
/// slowly, retention that overtakes it, expired and filtered messages, any start), every
/// serial from the start to the top reaches the subscriber as exactly one of a delivery,
/// a skip, a gap (at-most-once only) or a lost-continuity range, in serial order, and
/// every notice tells the truth.
#[test]
fn every_serial_is_accounted_for_once_in_order_under_any_schedule() {
    let mut random = Generator(0x2545_f491_4f6c_dd1d);
    for round in 0..400 {
        let guarantee = if random.chance(50) {
            Guarantee::ExactlyOnce
        } else {
            Guarantee::AtMostOnce
        };
        let mut log = Log::new("E1", random.below(12));
        let start = match random.below(4) {
            0 => Start::Live,
            1 => Start::Rewind(random.below(15)),
            _ => Start::After(position("E1", random.below(log.top + 3))),
        };
        let rejected_modulus = random.below(4) + 2;
        let filtered = random.chance(40);
        let filter: Option<Filter> = filtered.then(|| {
            Box::new(move |message: &Message| !message.serial.0.is_multiple_of(rejected_modulus))
                as Filter
        });
        let page = 1 + random.below(4) as usize;
        let ring_capacity = 1 + random.below(4) as usize;
        let queue_capacity = 1 + random.below(4) as usize;
        let mut machine = SubscriptionMachine::new(guarantee, start.clone(), page, filter);
        let mut ring: VecDeque<Message> = VecDeque::new();
        let mut queue = VecDeque::new();
        let mut received = Vec::new();
        let context = format!("round {round}: {guarantee:?} {start:?} page {page}");

        let drive_all = |machine: &mut SubscriptionMachine<Message>,
                         log: &Log,
                         queue: &mut VecDeque<Outbound<Message>>,
                         received: &mut Vec<Outbound<Message>>| {
            let failure = drive(machine, log, queue, queue_capacity, received);
            assert_eq!(failure, None, "{context}");
        };
        drive_all(&mut machine, &log, &mut queue, &mut received);
        for _step in 0..60 {
            match random.below(6) {
                0 | 1 => {
                    log.top += 1;
                    if random.chance(10) {
                        log.expired.insert(log.top);
                    }
                    if ring.len() == ring_capacity {
                        ring.pop_front();
                    }
                    ring.push_back(message("E1", log.top));
                }
                2 => {
                    for _ in 0..random.below(3) {
                        if let Some(frame) = queue.pop_front() {
                            received.push(frame);
                        }
                    }
                }
                3 if random.chance(20) => {
                    log.first = (log.first + random.below(4)).min(log.top + 1);
                }
                _ => {
                    if machine.wants_room() && queue.len() < queue_capacity {
                        machine.handle_room();
                    } else if machine.is_idle()
                        && let Some(live) = ring.pop_front()
                    {
                        machine.handle_live(live);
                        drive_all(&mut machine, &log, &mut queue, &mut received);
                        if ring.is_empty() {
                            machine.handle_feed_idle();
                        }
                    }
                    drive_all(&mut machine, &log, &mut queue, &mut received);
                }
            }
        }
        // Drain: no more publishes; the subscriber reads everything.
        for _ in 0..1_000 {
            received.extend(queue.drain(..));
            if let Some(live) = ring.pop_front() {
                machine.handle_live(live);
                drive_all(&mut machine, &log, &mut queue, &mut received);
                if ring.is_empty() {
                    machine.handle_feed_idle();
                }
            } else if machine.wants_room() {
                machine.handle_room();
            } else {
                machine.handle_feed_idle();
            }
            drive_all(&mut machine, &log, &mut queue, &mut received);
            if ring.is_empty() && !machine.wants_room() && queue.is_empty() {
                break;
            }
        }
        received.extend(queue.drain(..));
        assert!(machine.is_idle(), "{context}");
        check_accounting(
            &received,
            &log,
            guarantee,
            rejected_modulus,
            filtered,
            &context,
        );
    }
}

fn check_accounting(
    received: &[Outbound<Message>],
    log: &Log,
    guarantee: Guarantee,
    rejected_modulus: u64,
    filtered: bool,
    context: &str,
) {
    let Some(Outbound::Subscribed { after, .. }) = received.first() else {
        panic!("{context}: subscribed comes first: {received:?}");
    };
    let mut next = after.as_ref().map_or(1, |after| after.serial.0 + 1);
    for frame in &received[1..] {
        match frame {
            Outbound::Delivery(message) => {
                assert_eq!(message.serial.0, next, "{context}: {received:?}");
                assert!(
                    !filtered || !message.serial.0.is_multiple_of(rejected_modulus),
                    "{context}: a rejected message was delivered"
                );
                next += 1;
            }
            Outbound::Skip {
                from, to, cause, ..
            } => {
                assert_eq!(from.serial.0, next, "{context}: {received:?}");
                for serial in from.serial.0..=to.serial.0 {
                    match cause {
                        SkipCause::Expired => {
                            assert!(log.expired.contains(&serial), "{context}")
                        }
                        SkipCause::Filtered => assert!(
                            filtered && serial.is_multiple_of(rejected_modulus),
                            "{context}: {serial} was skipped but passes the filter"
                        ),
                    }
                }
                next = to.serial.0 + 1;
            }
            Outbound::Gap { from, to } => {
                assert_eq!(guarantee, Guarantee::AtMostOnce, "{context}");
                assert_eq!(from.serial.0, next, "{context}: {received:?}");
                next = to.serial.0 + 1;
            }
            Outbound::ContinuityLost { from, to, reason } => {
                let Some(to) = to else {
                    // A position on a channel without messages: delivery starts with its
                    // first message.
                    assert_eq!(next, 1, "{context}: {received:?}");
                    continue;
                };
                if *reason == ContinuityReason::Retention {
                    assert_eq!(from.serial.0, next, "{context}: {received:?}");
                    // Only serials retention really removed are claimed lost.
                    assert!(to.serial.0 < log.first, "{context}: {received:?}");
                }
                next = to.serial.0 + 1;
            }
            Outbound::Subscribed { .. } => panic!("{context}: subscribed twice"),
        }
    }
    assert_eq!(next, log.top + 1, "{context}: {received:?}");
}
