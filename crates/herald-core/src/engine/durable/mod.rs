//! [`DurableMachine`]: every delivery decision of one connected at-least-once (durable)
//! subscriber of one channel, without any I/O.
//!
//! The server holds the subscriber's position ([`SubscriberState`]): the machine starts from
//! the stored state (or places a new subscriber by a [`Start`] rule), reads the log after the
//! acknowledged position, delivers in serial order within an inflight window, counts
//! deliveries, takes cumulative and individual acks, redelivers what stays unacked past
//! `ack_wait_ms`, hands messages past `max_deliveries` to the dead-letter channel, reports
//! messages whose TTL ran out before they were acked (`expired`), and reports a position the
//! channel can no longer continue (`continuity_lost`), moving the position on. Each change of
//! the state becomes a [`DurableAction::Persist`] of the whole snapshot; the driver makes it
//! durable (riding the log's group commit) and answers with
//! [`DurableMachine::handle_persisted`].
//!
//! # Design
//! - **The log is the source of truth.** Messages are always delivered from log pages
//!   ([`DurableAction::Read`]); the live feed is only a wakeup
//!   ([`DurableMachine::handle_published`]). A delivered, unacked message is kept in memory
//!   (bounded by the window) so that a redelivery after `ack_wait_ms` needs no read.
//! - **The window is a span of serials**: only serials up to `acked_through + inflight_max`
//!   are delivered. It bounds the unacked deliveries, and it bounds the snapshot too (every
//!   individually acked or counted serial lies in the span), so a client that acks all but one
//!   message cannot grow the state without bound: the window waits for that message (until it
//!   is acked, expires or is dead-lettered).
//! - **A delivery count is durable before the delivery goes out.** Every delivery (first or
//!   repeated) records an attempt, and the frame is released only once a snapshot holding the
//!   attempt is durable. A crash therefore never resets a count, a message is never delivered
//!   more than `max_deliveries` times, and a message is never delivered again once a snapshot
//!   holding its ack is durable. The price: an attempt a crash kept from going out still
//!   counts (with `max_deliveries: 1` such a message goes to the dead letters unseen). Snapshots are coalesced: at most one [`DurableAction::Persist`]
//!   is in flight, changes made meanwhile go into the next one (one per page, not one per
//!   message).
//! - **An ack is accepted** for a serial that was delivered at least once (in this or an
//!   earlier connection: the state counts its attempts) or is already done; anything else is
//!   rejected with [`AckRejected`]. Each accepted ack returns an [`AckTicket`]; once the
//!   snapshot holding it is durable the machine emits [`DurableAction::AcksDurable`], so the
//!   driver can confirm acks that asked for it.
//! - **Reconnect** is a new machine from the last persisted snapshot: it reads after the
//!   acknowledged position, so every unacked message is delivered again with its count + 1,
//!   and individually acked ones are passed over.
//! - **Done** means acked, dead-lettered (after the driver's [`DurableAction::DeadLetter`] was
//!   published) or expired (once the `expired` notice is handed out, not when it is decided,
//!   so a crash in between repeats the notice rather than losing it); done serials count as
//!   acked in the state.
//!
//! # Call order
//! 1. [`DurableMachine::resume`] (stored state) or [`DurableMachine::create`] (new
//!    subscriber). Register for the channel's wakeups before the first action, so nothing
//!    published after the first read goes unnoticed.
//! 2. Loop on [`DurableMachine::poll_action`] until `None`, performing each action in order:
//!    - [`DurableAction::ReadStatus`] → [`DurableMachine::handle_status`];
//!    - [`DurableAction::Read`] → [`DurableMachine::handle_page`];
//!    - [`DurableAction::DeadLetter`]: publish it durably to the dead-letter channel →
//!      [`DurableMachine::handle_dead_lettered`];
//!
//!    (those three must be answered before the next `poll_action`), and without an answer
//!    before the next poll:
//!    - [`DurableAction::Persist`]: make the snapshot durable; later
//!      [`DurableMachine::handle_persisted`] or [`DurableMachine::handle_persist_failed`];
//!    - [`DurableAction::Send`]: send the frame (waiting for room);
//!    - [`DurableAction::AcksDurable`]: confirm acks whose ticket is at most the given one
//!      (an ack of something already durable is: check [`DurableMachine::is_durable`] on its
//!      ticket first);
//!    - [`DurableAction::Fail`]: end the subscription with an error; the machine is finished.
//! 3. Then wait for any of: the persist completing, a client ack
//!    ([`DurableMachine::handle_ack_through`], [`DurableMachine::handle_ack_one`]), a channel
//!    wakeup ([`DurableMachine::handle_published`]), or [`DurableMachine::next_deadline`]
//!    ([`DurableMachine::handle_tick`]); and go back to 2.
//! 4. On disconnect or takeover: [`DurableMachine::handle_close`], then keep performing
//!    [`DurableAction::Persist`] until [`DurableMachine::is_closed`] (the last snapshot carries
//!    `last_active`). A new machine for the same subscriber must start only after the old one's
//!    persists completed, or an old snapshot could overwrite a newer one.
//!
//! # Invariants
//! - Frames come out in order: `subscribed` first; first deliveries and notices of serials
//!   read from the log in serial order; repeated deliveries only of serials delivered before
//!   and not acked.
//! - At most one persist in flight; a delivery frame leaves only after its attempt is durable.
//! - Bounded: the window holds at most `inflight_max` serials; the queue holds at most one
//!   frame per serial of the window plus a few notices.

use std::collections::{BTreeMap, VecDeque};

use crate::engine::subscription::{Continuity, Deliverable, Page, Start, last_missed};
use crate::message::Timestamp;
use crate::names::{ChannelName, Epoch};
use crate::position::{Position, Serial};
use crate::stream::{ContinuityLost, ContinuityReason, SkippedRange, StreamStatus};
use crate::subscriber::{SubscriberId, SubscriberOptions, SubscriberState};

mod actions;

pub use actions::*;

/// One connected durable subscriber's state machine. See the module docs for the call order.
pub struct DurableMachine<M> {
    channel: ChannelName,
    id: SubscriberId,
    options: SubscriberOptions,
    /// Placement rule of a new subscriber, until its state exists.
    start: Option<Start>,
    /// `None` until a new subscriber is placed (a channel without messages has no epoch).
    state: Option<SubscriberState>,
    page_messages: usize,
    phase: Phase,
    /// The last serial read from the log (delivered or passed over) in this connection.
    frontier: Serial,
    /// The last page said nothing more follows, and no wakeup came since.
    caught_up: bool,
    inflight: BTreeMap<Serial, Inflight<M>>,
    queue: VecDeque<Queued<M>>,
    awaiting: Option<Awaiting>,
    failure: Option<String>,
    /// Counts state changes; a snapshot carries the version it was taken at.
    version: u64,
    persisted_version: u64,
    persist_in_flight: Option<u64>,
    ack_ticket_issued: u64,
    ack_ticket_reported: u64,
    acks_durable_due: Option<AckTicket>,
    status_requested: bool,
    /// The latest time any input carried.
    now: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    /// The first read after the acknowledged position says whether it still holds.
    Verifying {
        continuity: Continuity,
        top: Option<Position>,
    },
    Running,
    /// The channel has no messages (no epoch to hold a position in); a wakeup re-reads the
    /// status.
    WaitingForChannel,
    Closing,
    Ended,
}

struct Inflight<M> {
    message: M,
    stage: Stage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Its delivery frame waits in the queue (for the persist of its attempt).
    Queued,
    Sent {
        deadline: Timestamp,
    },
    /// Handed to the driver for the dead-letter channel.
    DeadLettering,
}

enum Queued<M> {
    ReadStatus,
    /// Goes out once the snapshot of version `gate` is durable.
    Send {
        gate: u64,
        outbound: DurableOutbound<M>,
    },
    DeadLetter {
        serial: Serial,
        deliveries: u32,
    },
    /// An `expired` notice for the serials of the range not done when it goes out.
    Expired {
        epoch: Epoch,
        from: Serial,
        to: Serial,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum Awaiting {
    Status,
    Page,
    DeadLetter(Serial),
}

impl<M: Deliverable + Clone> DurableMachine<M> {
    /// A subscriber that connects again: starts from its stored state.
    pub fn resume(state: SubscriberState, page_messages: usize, now: Timestamp) -> Self {
        let mut machine = Self::empty(
            state.channel.clone(),
            state.id.clone(),
            state.options,
            None,
            page_messages,
            now,
        );
        machine.frontier = state.acked_through;
        machine.state = Some(state);
        machine
    }

    /// A new subscriber, placed by `start` once the channel's status is known (and persisted
    /// before `subscribed` goes out).
    pub fn create(
        channel: ChannelName,
        id: SubscriberId,
        options: SubscriberOptions,
        start: Start,
        page_messages: usize,
        now: Timestamp,
    ) -> Self {
        Self::empty(channel, id, options, Some(start), page_messages, now)
    }

    fn empty(
        channel: ChannelName,
        id: SubscriberId,
        options: SubscriberOptions,
        start: Option<Start>,
        page_messages: usize,
        now: Timestamp,
    ) -> Self {
        assert!(page_messages > 0, "a page holds at least one message");
        assert!(
            options.inflight_max > 0 && options.max_deliveries > 0,
            "subscriber options are validated before a machine starts: {options:?}"
        );
        let mut queue = VecDeque::new();
        queue.push_back(Queued::ReadStatus);
        DurableMachine {
            channel,
            id,
            options,
            start,
            state: None,
            page_messages,
            phase: Phase::Starting,
            frontier: Serial::BEFORE_FIRST,
            caught_up: false,
            inflight: BTreeMap::new(),
            queue,
            awaiting: None,
            failure: None,
            version: 0,
            persisted_version: 0,
            persist_in_flight: None,
            ack_ticket_issued: 0,
            ack_ticket_reported: 0,
            acks_durable_due: None,
            status_requested: true,
            now,
        }
    }

    /// The in-memory state (ahead of the durable one by the changes not yet persisted).
    pub fn state(&self) -> Option<&SubscriberState> {
        self.state.as_ref()
    }

    /// Messages delivered (or about to be) and not yet done.
    pub fn pending(&self) -> usize {
        self.inflight.len()
    }

    /// When the next unacked delivery is due for redelivery: call
    /// [`DurableMachine::handle_tick`] then.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        if self.phase != Phase::Running {
            return None;
        }
        self.inflight
            .values()
            .filter_map(|entry| match entry.stage {
                Stage::Sent { deadline } => Some(deadline),
                Stage::Queued | Stage::DeadLettering => None,
            })
            .min()
    }

    /// Whether an ack with this ticket is durable.
    pub fn is_durable(&self, ticket: AckTicket) -> bool {
        ticket.0 <= self.persisted_version
    }

    /// After [`DurableMachine::handle_close`]: the last snapshot is durable.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closing
            && self.persist_in_flight.is_none()
            && self.persisted_version == self.version
    }

    /// The machine failed ([`DurableAction::Fail`]) and takes no more input.
    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The next effect to perform, in order; `None` when the machine waits for input.
    pub fn poll_action(&mut self) -> Option<DurableAction<M>> {
        assert!(
            self.awaiting.is_none(),
            "answer the previous action before polling again ({:?})",
            self.awaiting
        );
        if let Some(reason) = self.failure.take() {
            self.phase = Phase::Ended;
            self.queue.clear();
            self.inflight.clear();
            return Some(DurableAction::Fail(reason));
        }
        if self.phase == Phase::Ended {
            return None;
        }
        if self.persist_in_flight.is_none()
            && self.version > self.persisted_version
            && let Some(state) = &mut self.state
        {
            state.last_active = state.last_active.max(self.now);
            self.persist_in_flight = Some(self.version);
            return Some(DurableAction::Persist(state.clone()));
        }
        if let Some(ticket) = self.acks_durable_due.take() {
            return Some(DurableAction::AcksDurable(ticket));
        }
        while let Some(head) = self.queue.front() {
            if let Queued::Send { gate, .. } = head
                && *gate > self.persisted_version
            {
                break;
            }
            match self.queue.pop_front().expect("front was present") {
                Queued::ReadStatus => {
                    self.awaiting = Some(Awaiting::Status);
                    return Some(DurableAction::ReadStatus);
                }
                Queued::Send { outbound, .. } => {
                    if let Some(action) = self.release(outbound) {
                        return Some(action);
                    }
                }
                Queued::Expired { epoch, from, to } => {
                    if let Some(action) = self.release_expired(epoch, from, to) {
                        return Some(action);
                    }
                }
                Queued::DeadLetter { serial, deliveries } => {
                    let Some(entry) = self.inflight.get(&serial) else {
                        continue; // acked meanwhile
                    };
                    self.awaiting = Some(Awaiting::DeadLetter(serial));
                    return Some(DurableAction::DeadLetter {
                        message: entry.message.clone(),
                        deliveries,
                        reason: DeadLetterReason::MaxDeliveries,
                    });
                }
            }
        }
        if let Some(limit) = self.read_limit() {
            let state = self.state.as_ref().expect("reads need a state");
            self.awaiting = Some(Awaiting::Page);
            return Some(DurableAction::Read {
                after: Position::new(placed_epoch(state).clone(), self.frontier),
                limit,
            });
        }
        None
    }

    /// The answer to [`DurableAction::ReadStatus`]: `None` when the channel has never had a
    /// message.
    pub fn handle_status(&mut self, status: Option<StreamStatus>) {
        assert_eq!(
            self.awaiting.take(),
            Some(Awaiting::Status),
            "no status was asked for"
        );
        self.status_requested = false;
        match (self.phase.clone(), status) {
            (Phase::Starting, None) => {
                let (continuity, notice) = match &self.state {
                    // The channel lost every message the position referred to.
                    Some(SubscriberState {
                        epoch: Some(epoch),
                        acked_through,
                        ..
                    }) => (
                        Continuity::Lost,
                        Some(DurableOutbound::ContinuityLost {
                            from: Position::new(epoch.clone(), acked_through.next()),
                            to: None,
                            reason: ContinuityReason::EpochChanged,
                        }),
                    ),
                    // Still waiting for the channel's first message.
                    Some(_) => (Continuity::Held, None),
                    None => {
                        // Persisted (before `subscribed` goes out) as starting with the
                        // channel's first message: a subscriber that leaves before it comes
                        // still gets it.
                        self.start = None;
                        self.state = Some(SubscriberState::unplaced(
                            self.channel.clone(),
                            self.id.clone(),
                            self.options,
                            self.now,
                        ));
                        self.changed();
                        (Continuity::New, None)
                    }
                };
                // Gated: a new subscriber's reply waits for its first snapshot.
                self.queue.push_back(Queued::Send {
                    gate: self.version,
                    outbound: DurableOutbound::Subscribed {
                        continuity,
                        after: None,
                        top: None,
                    },
                });
                if let Some(notice) = notice {
                    self.push_send(notice);
                }
                self.phase = Phase::WaitingForChannel;
            }
            (Phase::Starting, Some(status))
                if self
                    .state
                    .as_ref()
                    .is_some_and(|state| state.epoch.is_none()) =>
            {
                // Created while the channel had no messages: everything it got since is owed.
                self.place_at_first(&status);
                self.phase = Phase::Verifying {
                    continuity: Continuity::Held,
                    top: Some(status.top),
                };
            }
            (Phase::Starting, Some(status)) => {
                if self.start.is_none()
                    && let Some(state) = &self.state
                    && let Some(requested) = state.acked_position()
                    && requested.epoch != status.epoch
                {
                    // The channel's history was reset since the subscriber's last ack.
                    let lost = ContinuityLost {
                        reason: ContinuityReason::EpochChanged,
                        requested,
                        first_available: status.first.clone(),
                        top: Some(status.top.clone()),
                    };
                    self.phase = Phase::Running;
                    let notice = self.lose(&lost);
                    self.queue_subscribed(Continuity::Lost, Some(status.top));
                    self.push_send(notice);
                    return;
                }
                let continuity = match self.start.take() {
                    Some(start) => {
                        let after = placement(&start, &status);
                        self.state = Some(SubscriberState::new(
                            self.channel.clone(),
                            self.id.clone(),
                            after.clone(),
                            self.options,
                            self.now,
                        ));
                        self.frontier = after.serial;
                        self.changed();
                        Continuity::New
                    }
                    None => Continuity::Held,
                };
                self.phase = Phase::Verifying {
                    continuity,
                    top: Some(status.top),
                };
            }
            (Phase::WaitingForChannel, None) => {}
            (Phase::WaitingForChannel, Some(status)) => {
                // Everything the channel got since the subscriber came is owed to it.
                self.place_at_first(&status);
                self.phase = Phase::Running;
            }
            (phase, _) => unreachable!("a status is only asked for while starting ({phase:?})"),
        }
    }

    /// The answer to [`DurableAction::Read`]: a page, or the store's word that the position
    /// can no longer be continued. (A store *failure* is the driver's to report.)
    pub fn handle_page(&mut self, result: Result<Page<M>, ContinuityLost>) {
        assert_eq!(
            self.awaiting.take(),
            Some(Awaiting::Page),
            "no page was asked for"
        );
        match std::mem::replace(&mut self.phase, Phase::Running) {
            Phase::Verifying { continuity, top } => match result {
                Ok(page) => {
                    self.queue_subscribed(continuity, top);
                    self.apply_page(page);
                }
                Err(lost) => {
                    let notice = self.lose(&lost);
                    self.queue_subscribed(Continuity::Lost, top);
                    self.push_send(notice);
                }
            },
            Phase::Running => match result {
                Ok(page) => self.apply_page(page),
                Err(lost) => {
                    let notice = self.lose(&lost);
                    self.push_send(notice);
                }
            },
            phase => unreachable!("a page is only asked for while reading ({phase:?})"),
        }
    }

    /// The snapshot of the last [`DurableAction::Persist`] is durable.
    pub fn handle_persisted(&mut self, now: Timestamp) {
        self.advance_time(now);
        let version = self
            .persist_in_flight
            .take()
            .expect("a persist was in flight");
        self.persisted_version = version;
        if self.ack_ticket_issued > self.ack_ticket_reported {
            self.ack_ticket_reported = self.ack_ticket_issued.min(version);
            self.acks_durable_due = Some(AckTicket(version));
        }
    }

    /// The snapshot could not be persisted: the subscription ends (the store is poisoned;
    /// nothing is acknowledged on top of a failed write).
    pub fn handle_persist_failed(&mut self, reason: String) {
        self.persist_in_flight = None;
        self.failure = Some(format!(
            "the subscriber's state was not persisted: {reason}"
        ));
    }

    /// The answer to [`DurableAction::DeadLetter`]: the message is durably in the dead-letter
    /// channel, so the serial is done.
    pub fn handle_dead_lettered(&mut self) {
        let Some(Awaiting::DeadLetter(serial)) = self.awaiting.take() else {
            panic!("no dead letter was asked for");
        };
        self.inflight.remove(&serial);
        if let Some(state) = &mut self.state
            && state.ack_one(serial)
        {
            self.changed();
        }
    }

    /// The channel has messages up to `top` (the live feed's wakeup; its content is not used:
    /// deliveries come from the log).
    pub fn handle_published(&mut self, top: &Position) {
        match self.phase {
            Phase::WaitingForChannel if !self.status_requested => {
                self.status_requested = true;
                self.queue.push_back(Queued::ReadStatus);
            }
            Phase::Running | Phase::Verifying { .. } => {
                let epoch_differs = self
                    .state
                    .as_ref()
                    .is_some_and(|state| state.epoch.as_ref() != Some(&top.epoch));
                if epoch_differs || top.serial > self.frontier {
                    self.caught_up = false;
                }
            }
            _ => {}
        }
    }

    /// Time passed: deliveries unacked past `ack_wait_ms` are delivered again (or expire, or
    /// go to the dead-letter channel).
    pub fn handle_tick(&mut self, now: Timestamp) {
        self.advance_time(now);
        if self.phase != Phase::Running {
            return;
        }
        let due: Vec<Serial> = self
            .inflight
            .iter()
            .filter(|(_, entry)| matches!(entry.stage, Stage::Sent { deadline } if deadline <= now))
            .map(|(serial, _)| *serial)
            .collect();
        for serial in due {
            self.redeliver(serial);
        }
    }

    /// The subscriber refused or failed a delivery (a webhook receiver's error): deliver it
    /// again at `retry_at` instead of after `ack_wait_ms` (exponential backoff is the
    /// driver's). False when the serial is not an unacked delivery of this connection.
    pub fn handle_retry_at(&mut self, position: &Position, retry_at: Timestamp) -> bool {
        let same_epoch = self
            .state
            .as_ref()
            .is_some_and(|state| state.epoch.as_ref() == Some(&position.epoch));
        match self.inflight.get_mut(&position.serial) {
            Some(entry) if same_epoch && matches!(entry.stage, Stage::Sent { .. }) => {
                entry.stage = Stage::Sent { deadline: retry_at };
                true
            }
            _ => false,
        }
    }

    /// Cumulative ack: every serial up to `through` is done.
    pub fn handle_ack_through(
        &mut self,
        through: &Position,
        now: Timestamp,
    ) -> Result<AckTicket, AckRejected> {
        self.advance_time(now);
        let delivered_through = self.check_ack(through)?;
        if through.serial > delivered_through {
            return Err(AckRejected::NotDelivered {
                serial: through.serial,
                delivered_through,
            });
        }
        let state = self.state.as_mut().expect("checked");
        if state.ack_through(through.serial) {
            self.inflight = self.inflight.split_off(&through.serial.next());
            self.changed();
        }
        Ok(self.ticket())
    }

    /// Individual ack of one serial.
    pub fn handle_ack_one(
        &mut self,
        acked: &Position,
        now: Timestamp,
    ) -> Result<AckTicket, AckRejected> {
        self.advance_time(now);
        let delivered_through = self.check_ack(acked)?;
        let state = self.state.as_mut().expect("checked");
        let serial = acked.serial;
        if !state.is_acked(serial) {
            // Attempts are recorded before any delivery, so a serial without one was never
            // delivered, in this connection or an earlier one.
            if state.attempts_of(serial) == 0 {
                return Err(AckRejected::NotDelivered {
                    serial,
                    delivered_through,
                });
            }
            state.ack_one(serial);
            self.inflight.remove(&serial);
            self.changed();
        }
        Ok(self.ticket())
    }

    /// The connection is going (disconnect or takeover): nothing more is delivered; the last
    /// snapshot records `now` as the last activity.
    pub fn handle_close(&mut self, now: Timestamp) {
        assert!(self.awaiting.is_none(), "answer the last action first");
        self.advance_time(now);
        if self.phase == Phase::Ended {
            return;
        }
        self.phase = Phase::Closing;
        self.queue.clear();
        self.inflight.clear();
        if self.state.is_some() {
            self.changed();
        }
    }

    /// Places the subscriber before the channel's first message.
    fn place_at_first(&mut self, status: &StreamStatus) {
        let first = Position::new(status.epoch.clone(), Serial::BEFORE_FIRST);
        let state = self
            .state
            .as_mut()
            .expect("a subscriber waiting for its channel has a state");
        reset(state, &first);
        self.frontier = Serial::BEFORE_FIRST;
        self.caught_up = false;
        self.changed();
    }

    /// The epoch check shared by both acks; returns the highest serial delivered so far.
    fn check_ack(&self, acked: &Position) -> Result<Serial, AckRejected> {
        let Some(state) = &self.state else {
            return Err(AckRejected::NothingDelivered);
        };
        // (While starting, a resumed state takes acks of what earlier connections delivered.)
        if self.phase == Phase::WaitingForChannel {
            return Err(AckRejected::NothingDelivered);
        }
        let Some(epoch) = &state.epoch else {
            return Err(AckRejected::NothingDelivered);
        };
        if acked.epoch != *epoch {
            return Err(AckRejected::WrongEpoch {
                acked: acked.clone(),
                epoch: epoch.clone(),
            });
        }
        let counted = state.attempts.last().map(|(serial, _)| *serial);
        let acked_above = state.acked_above.last().copied();
        Ok(state
            .acked_through
            .max(counted.unwrap_or_default())
            .max(acked_above.unwrap_or_default()))
    }

    fn ticket(&mut self) -> AckTicket {
        self.ack_ticket_issued = self.version;
        AckTicket(self.version)
    }

    fn advance_time(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
    }

    fn changed(&mut self) {
        self.version += 1;
    }

    fn push_send(&mut self, outbound: DurableOutbound<M>) {
        self.queue.push_back(Queued::Send { gate: 0, outbound });
    }

    /// `subscribed` waits for the snapshot that placed (or moved) the subscriber.
    fn queue_subscribed(&mut self, continuity: Continuity, top: Option<Position>) {
        let after = self
            .state
            .as_ref()
            .and_then(SubscriberState::acked_position);
        self.queue.push_back(Queued::Send {
            gate: self.version,
            outbound: DurableOutbound::Subscribed {
                continuity,
                after,
                top,
            },
        });
    }

    /// How many messages to read next, if a read is due: the window has room and the log may
    /// hold more.
    fn read_limit(&self) -> Option<usize> {
        let reading = match self.phase {
            Phase::Verifying { .. } => true,
            Phase::Running => !self.caught_up,
            _ => false,
        };
        if !reading {
            return None;
        }
        let state = self.state.as_ref()?;
        let room = self.window_end(state).0.saturating_sub(self.frontier.0);
        (room > 0).then(|| (room as usize).min(self.page_messages))
    }

    fn window_end(&self, state: &SubscriberState) -> Serial {
        Serial(state.acked_through.0 + u64::from(self.options.inflight_max))
    }

    /// Hands a queued frame out; a delivery that is done by now is dropped.
    fn release(&mut self, outbound: DurableOutbound<M>) -> Option<DurableAction<M>> {
        if let DurableOutbound::Delivery { message, .. } = &outbound {
            let serial = message.message().serial;
            let deadline = self.now.plus_ms(self.options.ack_wait_ms);
            match self.inflight.get_mut(&serial) {
                Some(entry) if entry.stage == Stage::Queued => {
                    entry.stage = Stage::Sent { deadline };
                }
                _ => return None,
            }
        }
        Some(DurableAction::Send(outbound))
    }

    /// Delivers (or passes over) one page, in serial order, within the window.
    fn apply_page(&mut self, page: Page<M>) {
        let state = self.state.as_ref().expect("pages are read with a state");
        let epoch = placed_epoch(state).clone();
        let window_end = self.window_end(state);
        let mut clipped = false;
        let mut skipped = page.skipped.into_iter().peekable();
        for message in page.messages {
            let serial = message.message().serial;
            while let Some(range) = skipped.next_if(|range| range.to < serial) {
                clipped |= self.expire_range(&epoch, &range, window_end);
            }
            if clipped || serial > window_end {
                clipped = true;
                break;
            }
            if message.message().epoch != epoch || serial != self.frontier.next() {
                self.failure = Some(format!(
                    "the log returned {} after {epoch}:{} (out of order)",
                    message.message().position(),
                    self.frontier
                ));
                return;
            }
            self.frontier = serial;
            self.offer(serial, message);
        }
        if !clipped {
            for range in skipped {
                clipped |= self.expire_range(&epoch, &range, window_end);
            }
        }
        if !page.more && !clipped {
            self.caught_up = true;
        }
    }

    /// A serial read from the log: delivered (again), or dead-lettered when its deliveries
    /// are used up (an earlier connection delivered it `max_deliveries` times).
    fn offer(&mut self, serial: Serial, message: M) {
        let state = self.state.as_mut().expect("offers need a state");
        if state.is_acked(serial) {
            return;
        }
        if state.attempts_of(serial) >= self.options.max_deliveries {
            self.queue.push_back(Queued::DeadLetter {
                serial,
                deliveries: state.attempts_of(serial),
            });
            self.inflight.insert(
                serial,
                Inflight {
                    message,
                    stage: Stage::DeadLettering,
                },
            );
            return;
        }
        let delivery_count = state.record_attempt(serial);
        self.changed();
        self.queue.push_back(Queued::Send {
            gate: self.version,
            outbound: DurableOutbound::Delivery {
                message: message.clone(),
                delivery_count,
            },
        });
        self.inflight.insert(
            serial,
            Inflight {
                message,
                stage: Stage::Queued,
            },
        );
    }

    /// Expired serials of a page (within the window): reported as `expired`, and done once
    /// the notice goes out. Returns whether the range went past the window.
    fn expire_range(&mut self, epoch: &Epoch, range: &SkippedRange, window_end: Serial) -> bool {
        if range.from > self.frontier.next() {
            self.failure = Some(format!(
                "the log skipped {epoch}:{}..={} after {} (out of order)",
                range.from, range.to, self.frontier
            ));
            return true;
        }
        let from = range.from.max(self.frontier.next());
        let to = range.to.min(window_end);
        if from <= to {
            self.frontier = to;
            self.queue.push_back(Queued::Expired {
                epoch: epoch.clone(),
                from,
                to,
            });
        }
        range.to > window_end
    }

    /// Hands out an `expired` notice for the serials of `from..=to` not done yet (in runs),
    /// and only now counts them as done: were they done at the decision, a crash before the
    /// notice went out would lose it, while a notice repeated after a crash is harmless.
    fn release_expired(
        &mut self,
        epoch: Epoch,
        from: Serial,
        to: Serial,
    ) -> Option<DurableAction<M>> {
        let state = self.state.as_mut()?;
        if state.epoch.as_ref() != Some(&epoch) {
            return None; // a continuity_lost notice covers it
        }
        let mut runs: Vec<(Serial, Serial)> = Vec::new();
        let mut serial = from;
        while serial <= to {
            if !state.is_acked(serial) {
                match runs.last_mut() {
                    Some((_, last)) if last.next() == serial => *last = serial,
                    _ => runs.push((serial, serial)),
                }
            }
            serial = serial.next();
        }
        if runs.is_empty() {
            return None;
        }
        for (first, last) in &runs {
            let mut serial = *first;
            while serial <= *last {
                state.ack_one(serial);
                serial = serial.next();
            }
        }
        self.changed();
        let mut notices = runs
            .into_iter()
            .map(|(first, last)| DurableOutbound::Expired {
                from: Position::new(epoch.clone(), first),
                to: Position::new(epoch.clone(), last),
            });
        let first = notices.next().expect("runs is not empty");
        // The other runs go out right after, before anything else.
        for notice in notices.rev() {
            self.queue.push_front(Queued::Send {
                gate: 0,
                outbound: notice,
            });
        }
        Some(DurableAction::Send(first))
    }

    /// An unacked delivery whose ack wait ran out.
    fn redeliver(&mut self, serial: Serial) {
        let entry = self
            .inflight
            .get_mut(&serial)
            .expect("due serials are inflight");
        let state = self.state.as_mut().expect("deliveries need a state");
        let now = self.now;
        if entry
            .message
            .message()
            .expires_at()
            .is_some_and(|at| at <= now)
        {
            let epoch = placed_epoch(state).clone();
            self.inflight.remove(&serial);
            self.queue.push_back(Queued::Expired {
                epoch,
                from: serial,
                to: serial,
            });
            return;
        }
        let deliveries = state.attempts_of(serial);
        if deliveries >= self.options.max_deliveries {
            entry.stage = Stage::DeadLettering;
            self.queue
                .push_back(Queued::DeadLetter { serial, deliveries });
            return;
        }
        let delivery_count = state.record_attempt(serial);
        entry.stage = Stage::Queued;
        let message = entry.message.clone();
        self.changed();
        self.queue.push_back(Queued::Send {
            gate: self.version,
            outbound: DurableOutbound::Delivery {
                message,
                delivery_count,
            },
        });
    }

    /// The position cannot be continued: report what is lost from the acknowledged position
    /// on, and move the position past it (in-memory deliveries of the lost range are dropped).
    fn lose(&mut self, lost: &ContinuityLost) -> DurableOutbound<M> {
        let state = self.state.as_mut().expect("reads need a state");
        let notice = DurableOutbound::ContinuityLost {
            from: Position::new(placed_epoch(state).clone(), state.acked_through.next()),
            to: last_missed(lost),
            reason: lost.reason,
        };
        self.inflight.clear();
        match last_missed(lost) {
            Some(resume) => {
                if state.epoch.as_ref() == Some(&resume.epoch)
                    && resume.serial >= state.acked_through
                {
                    // Retention: deliveries counted beyond the lost range keep their counts.
                    state.ack_through(resume.serial);
                } else {
                    reset(state, &resume);
                }
                self.frontier = resume.serial;
                self.caught_up = false;
                self.changed();
            }
            // The channel has no messages left: wait for its first one.
            None => self.phase = Phase::WaitingForChannel,
        }
        notice
    }
}

/// The epoch of a subscriber that reads, delivers or acks: it is placed by then.
fn placed_epoch(state: &SubscriberState) -> &Epoch {
    state
        .epoch
        .as_ref()
        .expect("a subscriber is placed before anything is read for it")
}

/// Where a new subscriber starts (exclusive), by the same rules as an exactly-once
/// subscription.
fn placement(start: &Start, status: &StreamStatus) -> Position {
    let serial = match start {
        Start::Live => status.top.serial,
        Start::FromStart => Serial::BEFORE_FIRST,
        Start::Rewind(count) => {
            let first_kept = status
                .first
                .as_ref()
                .map_or(status.top.serial.0, |first| first.serial.0 - 1);
            Serial(status.top.serial.0.saturating_sub(*count).max(first_kept))
        }
        Start::After(position) => return position.clone(),
    };
    Position::new(status.epoch.clone(), serial)
}

/// Moves a state to `position` in a new stream (another epoch, or back to a lower top):
/// nothing it held applies any more.
fn reset(state: &mut SubscriberState, position: &Position) {
    state.epoch = Some(position.epoch.clone());
    state.acked_through = position.serial;
    state.acked_above.clear();
    state.attempts.clear();
}

#[cfg(test)]
mod tests;
