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
use std::fmt;

use crate::engine::subscription::{Continuity, Deliverable, Page, Start, last_missed};
use crate::error::{ErrorCode, InvalidInput};
use crate::message::Timestamp;
use crate::names::{ChannelName, Epoch, MessageId};
use crate::position::{Position, Serial};
use crate::stream::{ContinuityLost, ContinuityReason, SkippedRange, StreamStatus};
use crate::subscriber::{SubscriberId, SubscriberOptions, SubscriberState};

/// What a durable subscriber is sent, transport-neutral.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurableOutbound<M> {
    /// The reply to the subscribe request; always first. Sent once the subscriber's state is
    /// durable, so "subscribed" means the server holds the position.
    Subscribed {
        continuity: Continuity,
        /// The acknowledged position delivery starts after (`None`: the channel has no
        /// messages yet).
        after: Option<Position>,
        top: Option<Position>,
    },
    /// A message, with how many times it has been delivered (1 the first time).
    Delivery { message: M, delivery_count: u32 },
    /// `from..=to` is lost for this subscriber (its position could not be continued: retention,
    /// a new epoch, a position ahead of the top); the position moved to `to`.
    ContinuityLost {
        from: Position,
        to: Option<Position>,
        reason: ContinuityReason,
    },
    /// The TTL of `from..=to` ran out before they were acked: they are done, nothing follows.
    Expired { from: Position, to: Position },
}

/// Why a message goes to the dead-letter channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Delivered `max_deliveries` times without an ack.
    MaxDeliveries,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MaxDeliveries => "max_deliveries",
        }
    }
}

/// Names a point in the machine's sequence of state changes: an ack is durable once the
/// machine reported a ticket at least as high ([`DurableAction::AcksDurable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AckTicket(pub u64);

/// An effect the driver performs for the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurableAction<M> {
    /// Read the channel's status; answer with [`DurableMachine::handle_status`].
    ReadStatus,
    /// Read up to `limit` messages after `after`; answer with [`DurableMachine::handle_page`].
    Read { after: Position, limit: usize },
    /// Make this snapshot durable; answer (later) with [`DurableMachine::handle_persisted`].
    Persist(SubscriberState),
    /// Send, waiting for room in the outbound queue.
    Send(DurableOutbound<M>),
    /// Publish the message to the dead-letter channel, durably; answer with
    /// [`DurableMachine::handle_dead_lettered`]. Use an id derived from (subscriber, epoch,
    /// serial) so that a repeat after a crash is deduplicated.
    DeadLetter {
        message: M,
        deliveries: u32,
        reason: DeadLetterReason,
    },
    /// Every ack whose ticket is at most this one is durable.
    AcksDurable(AckTicket),
    /// The machine caught an inconsistency or its state could not be persisted: end the
    /// subscription with an error. The machine is finished.
    Fail(String),
}

/// Why an ack was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckRejected {
    /// The acked position is in another epoch than the subscriber's.
    WrongEpoch { acked: Position, epoch: Epoch },
    /// The serial was never delivered to this subscriber (or lies beyond what was delivered).
    NotDelivered {
        serial: Serial,
        delivered_through: Serial,
    },
    /// The subscriber has no position yet (the channel has no messages).
    NothingDelivered,
}

impl AckRejected {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidPosition
    }
}

impl fmt::Display for AckRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckRejected::WrongEpoch { acked, epoch } => write!(
                f,
                "ack of {acked}: the subscriber's position is in epoch {epoch}"
            ),
            AckRejected::NotDelivered {
                serial,
                delivered_through,
            } => write!(
                f,
                "ack of serial {serial}, which was not delivered (delivered through {delivered_through})"
            ),
            AckRejected::NothingDelivered => f.write_str("ack before anything was delivered"),
        }
    }
}

/// When a subscriber not connected since `state.last_active` is removed (idle expiry), if
/// ever. Only for subscribers without a connection: a connected one is never idle.
pub fn idle_deadline(state: &SubscriberState) -> Option<Timestamp> {
    (state.options.expires_after_ms > 0)
        .then(|| state.last_active.plus_ms(state.options.expires_after_ms))
}

/// The default dead-letter channel of `channel`: `<channel>.dead`, in the same namespace (so
/// its policy and permissions apply). Fails when the name would be too long.
pub fn dead_letter_channel(channel: &ChannelName) -> Result<ChannelName, InvalidInput> {
    ChannelName::parse(&format!("{channel}.dead"))
}

/// The message id of the dead letter of `position` for `subscriber`: the same on every
/// attempt, so a dead letter published again after a crash (before its serial was recorded
/// as done) is deduplicated by the dead-letter channel.
pub fn dead_letter_id(subscriber: &SubscriberId, position: &Position) -> MessageId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"herald:dead-letter:v1:");
    hasher.update(&(subscriber.as_str().len() as u64).to_le_bytes());
    hasher.update(subscriber.as_str().as_bytes());
    hasher.update(&(position.epoch.as_str().len() as u64).to_le_bytes());
    hasher.update(position.epoch.as_str().as_bytes());
    hasher.update(&position.serial.0.to_le_bytes());
    let hex = hasher.finalize().to_hex();
    MessageId::parse(&format!("dl-{}", &hex[..32])).expect("hex is a valid message id")
}

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
                after: Position::new(state.epoch.clone(), self.frontier),
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
                    Some(state) => (
                        Continuity::Lost,
                        Some(DurableOutbound::ContinuityLost {
                            from: Position::new(state.epoch.clone(), state.acked_through.next()),
                            to: None,
                            reason: ContinuityReason::EpochChanged,
                        }),
                    ),
                    None => (Continuity::New, None),
                };
                self.push_send(DurableOutbound::Subscribed {
                    continuity,
                    after: None,
                    top: None,
                });
                if let Some(notice) = notice {
                    self.push_send(notice);
                }
                self.phase = Phase::WaitingForChannel;
            }
            (Phase::Starting, Some(status)) => {
                if self.start.is_none()
                    && let Some(state) = &self.state
                    && state.epoch != status.epoch
                {
                    // The channel's history was reset since the subscriber's last ack.
                    let lost = ContinuityLost {
                        reason: ContinuityReason::EpochChanged,
                        requested: state.acked_position(),
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
                let first = Position::new(status.epoch, Serial::BEFORE_FIRST);
                match &mut self.state {
                    Some(state) => reset(state, &first),
                    None => {
                        self.start = None;
                        self.state = Some(SubscriberState::new(
                            self.channel.clone(),
                            self.id.clone(),
                            first,
                            self.options,
                            self.now,
                        ))
                    }
                }
                self.frontier = Serial::BEFORE_FIRST;
                self.caught_up = false;
                self.changed();
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
                    .is_some_and(|state| state.epoch != top.epoch);
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

    /// The epoch check shared by both acks; returns the highest serial delivered so far.
    fn check_ack(&self, acked: &Position) -> Result<Serial, AckRejected> {
        let Some(state) = &self.state else {
            return Err(AckRejected::NothingDelivered);
        };
        // (While starting, a resumed state takes acks of what earlier connections delivered.)
        if self.phase == Phase::WaitingForChannel {
            return Err(AckRejected::NothingDelivered);
        }
        if acked.epoch != state.epoch {
            return Err(AckRejected::WrongEpoch {
                acked: acked.clone(),
                epoch: state.epoch.clone(),
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
        let after = self.state.as_ref().map(SubscriberState::acked_position);
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
        let epoch = state.epoch.clone();
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
        if state.epoch != epoch {
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
            let epoch = state.epoch.clone();
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
            from: Position::new(state.epoch.clone(), state.acked_through.next()),
            to: last_missed(lost),
            reason: lost.reason,
        };
        self.inflight.clear();
        match last_missed(lost) {
            Some(resume) => {
                if resume.epoch == state.epoch && resume.serial >= state.acked_through {
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
    state.epoch = position.epoch.clone();
    state.acked_through = position.serial;
    state.acked_above.clear();
    state.attempts.clear();
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use bytes::Bytes;

    use super::*;
    use crate::chain::ChainHash;
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
        assert_eq!(placed.acked_position(), position("E1", 3));
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
        assert_eq!(other.unwrap_err().code(), ErrorCode::InvalidPosition);
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
        assert_eq!(durable.epoch, epoch("E2"));
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
        assert!(harness.durable.is_none());
        harness.publish(2);
        assert_eq!(harness.take_deliveries(), vec![(1, 1), (2, 1)]);
        assert_eq!(harness.durable.unwrap().epoch, epoch("E1"));
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
        assert!(
            matches!(action, Some(DurableAction::Fail(reason)) if reason.contains("disk full"))
        );
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
                            observer.accepted(
                                observer.held.range(..=through).copied().collect::<Vec<_>>(),
                            );
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
}
