//! [`SubscriptionMachine`]: every delivery decision of one subscription, without any I/O.
//!
//! The machine decides where a subscription starts (from the channel's status and the
//! requested `from` / `rewind`), whether a resume position still holds, what a
//! `continuity_lost` notice says and where delivery resumes after it, how the log is replayed
//! page by page, when a jump in the live feed becomes a catch-up read (exactly-once) or a
//! dropped range (at-most-once), which serials are gathered into `skip` runs, and in what
//! order the subscriber hears all of it. Its driver does the I/O: store reads, the live feed,
//! the outbound queue, counters, encoding frames for a wire.
//!
//! # Call order
//! 1. [`SubscriptionMachine::new`]; then loop on [`SubscriptionMachine::poll_action`] until
//!    it returns `None`, performing each [`Action`] in order:
//!    - [`Action::ReadStatus`]: read the channel's status, answer with
//!      [`SubscriptionMachine::handle_status`];
//!    - [`Action::Read`]: read a forward page, answer with
//!      [`SubscriptionMachine::handle_page`];
//!    - [`Action::Send`]: send the frame, waiting for room in the outbound queue;
//!    - [`Action::TrySend`] (at-most-once only): send only if there is room right now, and
//!      say whether it went with [`SubscriptionMachine::handle_try_send`];
//!    - [`Action::Fail`]: end the subscription with an error (a server bug was caught).
//!
//!    An action that asks for an answer must be answered before the next `poll_action`.
//! 2. Once [`SubscriptionMachine::is_idle`]: offer the next message of the live feed with
//!    [`SubscriptionMachine::handle_live`] and go back to 1. When the feed has nothing more
//!    for now, call [`SubscriptionMachine::handle_feed_idle`] (ends a pending skip run).
//! 3. At-most-once: while [`SubscriptionMachine::wants_room`], the machine holds a dropped
//!    range it could not report yet; when the outbound queue has room, call
//!    [`SubscriptionMachine::handle_room`] and go back to 1.
//! 4. [`SubscriptionMachine::poll_dropped`] returns the messages dropped since the last call
//!    (for counters).
//!
//! # Invariants
//! - Frames come out in the order the subscriber must see them: `subscribed` first, then, per
//!   serial, exactly one of a delivery, a `skip`, a `gap` (at-most-once) or a
//!   `continuity_lost` range, in serial order.
//! - Exactly-once never drops: every action it emits is a [`Action::Send`] (it waits).
//! - At-most-once never waits for a delivery or skip ([`Action::TrySend`]). One that does not
//!   fit becomes part of the pending `gap`, which goes out before anything else is sent.
//! - The machine holds at most one log page of deliveries plus a few notices: it reads the
//!   next page only after the previous one was handed out, and takes a live message only
//!   when idle.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::chain::ChainHash;
use crate::message::Message;
use crate::names::Epoch;
use crate::position::{Position, Serial};
use crate::stream::{ContinuityLost, ContinuityReason, SkippedRange, StreamStatus};
use crate::subscription::{Cursor, Guarantee, SkipRun, SkippedRun, Step};

/// Access to the stored message behind whatever handle a driver delivers (a plain
/// [`Message`], or a shared one that caches its encoded frames).
pub trait Deliverable {
    fn message(&self) -> &Message;
}

impl Deliverable for Message {
    fn message(&self) -> &Message {
        self
    }
}

impl<T: Deliverable + ?Sized> Deliverable for Arc<T> {
    fn message(&self) -> &Message {
        (**self).message()
    }
}

/// Where a subscription starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// With the next message published.
    Live,
    /// Right after this position (exactly-once resume).
    After(Position),
    /// With the last N messages.
    Rewind(u64),
    /// With the channel's first message: the subscriber held no position because the channel
    /// had no message when it subscribed, so everything the channel got since is owed to it.
    /// Messages retention already removed are reported with `continuity_lost`.
    FromStart,
}

/// Whether the requested start position was honoured (the `continuity` of `subscribed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continuity {
    /// No position was given.
    New,
    /// Everything after the position follows with no gap.
    Held,
    /// The position could not be honoured; a `continuity_lost` notice follows.
    Lost,
}

/// Why serials are reported as a `skip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipCause {
    /// The subscription's filter rejected them.
    Filtered,
    /// Their TTL ran out before they were read.
    Expired,
}

impl SkipCause {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipCause::Filtered => "filtered",
            SkipCause::Expired => "expired",
        }
    }
}

/// What the subscriber is sent, transport-neutral: the driver turns it into a wire frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound<M> {
    /// The reply to the subscribe request; always first.
    Subscribed {
        continuity: Continuity,
        /// Deliveries start right after this position (`None`: the channel has no messages).
        after: Option<Position>,
        /// The channel's top when the subscription started.
        top: Option<Position>,
    },
    /// A message (or its hint, as the subscription asked).
    Delivery(M),
    /// `from..=to` is lost for this subscriber; delivery continues after `to`.
    ContinuityLost {
        from: Position,
        to: Option<Position>,
        reason: ContinuityReason,
    },
    /// At-most-once: `from..=to` were dropped (slow consumer).
    Gap { from: Position, to: Position },
    /// `from..=to` exist but are not delivered; nothing was lost.
    Skip {
        from: Position,
        to: Position,
        cause: SkipCause,
        /// The chain at `to`, when known.
        chain: Option<ChainHash>,
    },
}

/// An effect the driver performs for the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<M> {
    /// Read the channel's status; answer with [`SubscriptionMachine::handle_status`].
    ReadStatus,
    /// Read up to `limit` messages after `after`; answer with
    /// [`SubscriptionMachine::handle_page`].
    Read { after: Position, limit: usize },
    /// Send, waiting for room in the outbound queue.
    Send(Outbound<M>),
    /// Send only if the outbound queue has room now; answer with
    /// [`SubscriptionMachine::handle_try_send`].
    TrySend(Outbound<M>),
    /// The machine caught an inconsistency (a server bug): end the subscription with an
    /// error rather than skip a serial. The machine is finished.
    Fail(String),
}

/// A forward page of the log, as the machine needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<M> {
    pub messages: Vec<M>,
    /// Ranges whose TTL ran out.
    pub skipped: Vec<SkippedRange>,
    /// Whether more messages may follow.
    pub more: bool,
}

/// Decides, for a message the subscription may deliver, whether its filter accepts it.
pub type Filter = Box<dyn FnMut(&Message) -> bool + Send>;

/// One subscription's delivery state machine. See the module docs for the call order.
pub struct SubscriptionMachine<M> {
    guarantee: Guarantee,
    page_messages: usize,
    start: Start,
    filter: Option<Filter>,
    phase: Phase<M>,
    /// `None` until the channel has a message (a subscription to an empty channel).
    cursor: Option<Cursor>,
    skips: SkipRun,
    /// At-most-once: serials dropped (or skipped without room) and not yet reported.
    gap: Option<GapRange>,
    /// Decided but not yet handed to the driver, in order.
    queue: VecDeque<Queued<M>>,
    awaiting: Option<Awaiting>,
    dropped_unreported: u64,
}

enum Phase<M> {
    Starting,
    /// Checking that the requested position can be continued.
    Verifying {
        requested: Position,
        status: StreamStatus,
    },
    /// Reading the log after the cursor; with `through`, until the cursor is past it, then
    /// `live` is offered again.
    CatchingUp {
        through: Option<Serial>,
        live: Option<M>,
    },
    Live,
    Ended,
}

enum Queued<M> {
    ReadStatus,
    Read {
        after: Position,
        limit: usize,
    },
    Send(Outbound<M>),
    /// At-most-once delivery or skip: try, and fold into the gap when there is no room.
    Attempt(Outbound<M>),
    /// At-most-once: these serials were dropped (a jump in the live feed).
    Drop {
        epoch: Epoch,
        from: Serial,
        to: Serial,
    },
    /// At-most-once: report the pending gap if there is room.
    FlushGap,
    Fail(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct GapRange {
    epoch: Epoch,
    from: Serial,
    to: Serial,
}

#[derive(Debug, PartialEq, Eq)]
enum Awaiting {
    Status,
    Page,
    /// A `TrySend` of the pending gap with nothing behind it.
    GapAlone,
    /// A `TrySend` of the pending gap ahead of the queued attempt.
    GapBeforeAttempt,
    /// A `TrySend` of a delivery (`counted`) or skip covering `from..=to`.
    Attempt {
        epoch: Epoch,
        from: Serial,
        to: Serial,
        counted: bool,
    },
}

impl<M: Deliverable> SubscriptionMachine<M> {
    /// A subscription of `guarantee` starting at `start`; log pages hold at most
    /// `page_messages` messages. Its first action is [`Action::ReadStatus`].
    pub fn new(
        guarantee: Guarantee,
        start: Start,
        page_messages: usize,
        filter: Option<Filter>,
    ) -> Self {
        assert!(page_messages > 0, "a page holds at least one message");
        let mut queue = VecDeque::new();
        queue.push_back(Queued::ReadStatus);
        SubscriptionMachine {
            guarantee,
            page_messages,
            start,
            filter,
            phase: Phase::Starting,
            cursor: None,
            skips: SkipRun::default(),
            gap: None,
            queue,
            awaiting: None,
            dropped_unreported: 0,
        }
    }

    pub fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    /// The last position handed out or passed over (`None` before the channel has messages).
    pub fn position(&self) -> Option<Position> {
        self.cursor.as_ref().map(Cursor::position)
    }

    /// True when the machine waits for the next live message: nothing queued, no answer
    /// awaited, not starting or catching up.
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Live) && self.queue.is_empty() && self.awaiting.is_none()
    }

    /// At-most-once: idle with a dropped range still unreported; call
    /// [`SubscriptionMachine::handle_room`] once the outbound queue has room.
    pub fn wants_room(&self) -> bool {
        self.is_idle() && self.gap.is_some()
    }

    /// The machine failed ([`Action::Fail`]) and takes no more input.
    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    /// Messages dropped (at-most-once) since the last call.
    pub fn poll_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped_unreported)
    }

    /// The next effect to perform, in order; `None` when the machine waits for input.
    pub fn poll_action(&mut self) -> Option<Action<M>> {
        assert!(
            self.awaiting.is_none(),
            "answer the previous action before polling again ({:?})",
            self.awaiting
        );
        loop {
            match self.queue.pop_front()? {
                Queued::ReadStatus => {
                    self.awaiting = Some(Awaiting::Status);
                    return Some(Action::ReadStatus);
                }
                Queued::Read { after, limit } => {
                    self.awaiting = Some(Awaiting::Page);
                    return Some(Action::Read { after, limit });
                }
                Queued::Send(outbound) => {
                    // Nothing overtakes a pending gap: a notice that must go out waits for
                    // room, so the gap goes first, waiting too.
                    if let Some(gap) = self.gap.take() {
                        self.queue.push_front(Queued::Send(outbound));
                        return Some(Action::Send(gap_frame(gap)));
                    }
                    return Some(Action::Send(outbound));
                }
                Queued::Attempt(outbound) => {
                    if let Some(gap) = &self.gap {
                        let frame = gap_frame(gap.clone());
                        self.queue.push_front(Queued::Attempt(outbound));
                        self.awaiting = Some(Awaiting::GapBeforeAttempt);
                        return Some(Action::TrySend(frame));
                    }
                    self.awaiting = Some(attempt_of(&outbound));
                    return Some(Action::TrySend(outbound));
                }
                Queued::Drop { epoch, from, to } => {
                    self.dropped_unreported += to.0 - from.0 + 1;
                    self.extend_gap(epoch, from, to);
                }
                Queued::FlushGap => {
                    if let Some(gap) = &self.gap {
                        self.awaiting = Some(Awaiting::GapAlone);
                        return Some(Action::TrySend(gap_frame(gap.clone())));
                    }
                }
                Queued::Fail(reason) => {
                    self.phase = Phase::Ended;
                    self.queue.clear();
                    return Some(Action::Fail(reason));
                }
            }
        }
    }

    /// The answer to [`Action::ReadStatus`]: `None` when the channel has never had a message.
    pub fn handle_status(&mut self, status: Option<StreamStatus>) {
        assert_eq!(
            self.awaiting.take(),
            Some(Awaiting::Status),
            "no status was asked for"
        );
        let start = self.start.clone();
        let Some(status) = status else {
            let (continuity, notice) = match start {
                // A position on a channel without messages: whatever it refers to is gone.
                Start::After(requested) => (
                    Continuity::Lost,
                    Some(lost_notice(&ContinuityLost {
                        reason: ContinuityReason::EpochChanged,
                        requested,
                        first_available: None,
                        top: None,
                    })),
                ),
                // Still nothing: the subscriber has missed nothing.
                Start::FromStart => (Continuity::Held, None),
                Start::Live | Start::Rewind(_) => (Continuity::New, None),
            };
            self.started(continuity, notice, None);
            return;
        };
        if start == Start::FromStart {
            let requested = Position::new(status.epoch.clone(), Serial(0));
            let lost = ContinuityLost {
                reason: ContinuityReason::Retention,
                requested,
                first_available: status.first.clone(),
                top: Some(status.top.clone()),
            };
            let resume = match &status.first {
                Some(first) => Serial(first.serial.0 - 1),
                None => status.top.serial,
            };
            self.cursor = Some(Cursor::new(self.guarantee, status.epoch.clone(), resume));
            if resume == Serial(0) {
                self.started(Continuity::Held, None, Some(status.top));
            } else {
                self.started(Continuity::Lost, Some(lost_notice(&lost)), Some(status.top));
            }
            return;
        }
        let after = match start {
            Start::Live => status.top.serial,
            Start::FromStart => unreachable!("handled above"),
            Start::Rewind(count) => {
                let first_kept = status
                    .first
                    .as_ref()
                    .map_or(status.top.serial.0, |first| first.serial.0 - 1);
                Serial(status.top.serial.0.saturating_sub(count).max(first_kept))
            }
            Start::After(requested) => {
                // Read one message after the position: the store says whether it holds.
                self.queue.push_back(Queued::Read {
                    after: requested.clone(),
                    limit: 1,
                });
                self.phase = Phase::Verifying { requested, status };
                return;
            }
        };
        self.cursor = Some(Cursor::new(self.guarantee, status.epoch.clone(), after));
        self.started(Continuity::New, None, Some(status.top));
    }

    /// The answer to [`Action::Read`]: a page, or the store's word that the position can no
    /// longer be continued. (A store *failure* is the driver's to report: the subscription
    /// ends.)
    pub fn handle_page(&mut self, result: Result<Page<M>, ContinuityLost>) {
        assert_eq!(
            self.awaiting.take(),
            Some(Awaiting::Page),
            "no page was asked for"
        );
        match std::mem::replace(&mut self.phase, Phase::Ended) {
            Phase::Verifying { requested, status } => {
                let top = Some(status.top.clone());
                match result {
                    Ok(_) => {
                        self.cursor = Some(Cursor::new(
                            self.guarantee,
                            requested.epoch.clone(),
                            requested.serial,
                        ));
                        self.started(Continuity::Held, None, top);
                    }
                    Err(lost) => {
                        let resume = last_missed(&lost)
                            .filter(|position| position.epoch == status.epoch)
                            .map_or(status.top.serial, |position| position.serial);
                        self.cursor =
                            Some(Cursor::new(self.guarantee, status.epoch.clone(), resume));
                        self.started(Continuity::Lost, Some(lost_notice(&lost)), top);
                    }
                }
            }
            Phase::CatchingUp { through, live } => {
                self.phase = Phase::CatchingUp { through, live };
                match result {
                    Ok(page) => {
                        let more = page.more;
                        let before = self.cursor.as_ref().map(Cursor::next);
                        if !self.apply_page(page) {
                            return;
                        }
                        let progressed = self.cursor.as_ref().map(Cursor::next) != before;
                        if !more || !progressed {
                            self.flush_skips();
                            self.finish_catch_up();
                        } else {
                            self.continue_catch_up();
                        }
                    }
                    Err(lost) => {
                        // Retention overtook a slow subscriber (or the channel was reset): say
                        // so, with the range, and go on from what is still there.
                        let notice = lost_notice(&lost);
                        self.flush_skips();
                        self.queue.push_back(Queued::Send(notice));
                        self.cursor = last_missed(&lost)
                            .map(|resume| Cursor::new(self.guarantee, resume.epoch, resume.serial));
                        if self.cursor.is_none() {
                            self.finish_catch_up();
                        } else {
                            self.continue_catch_up();
                        }
                    }
                }
            }
            Phase::Starting | Phase::Live | Phase::Ended => {
                unreachable!("a page is only asked for while verifying or catching up")
            }
        }
    }

    /// The answer to [`Action::TrySend`]: whether the frame went into the outbound queue.
    pub fn handle_try_send(&mut self, sent: bool) {
        match self.awaiting.take() {
            Some(Awaiting::GapAlone) => {
                if sent {
                    self.gap = None;
                }
            }
            Some(Awaiting::GapBeforeAttempt) => {
                if sent {
                    self.gap = None;
                } else {
                    // No room for the gap, so none for what follows it either: it joins the
                    // gap.
                    let Some(Queued::Attempt(outbound)) = self.queue.pop_front() else {
                        unreachable!("the attempt stays queued behind its gap")
                    };
                    if let Awaiting::Attempt {
                        epoch,
                        from,
                        to,
                        counted,
                    } = attempt_of(&outbound)
                    {
                        self.missed(epoch, from, to, counted);
                    }
                }
            }
            Some(Awaiting::Attempt {
                epoch,
                from,
                to,
                counted,
            }) => {
                if !sent {
                    self.missed(epoch, from, to, counted);
                }
            }
            other => panic!("no try-send was asked for (awaiting {other:?})"),
        }
    }

    /// The next message of the live feed, in serial order (the feed may skip, when it
    /// overflowed, and repeat what the log already gave). Only when [`Self::is_idle`].
    pub fn handle_live(&mut self, live: M) {
        assert!(
            self.is_idle(),
            "a live message is offered only to an idle machine"
        );
        self.offer_live(live);
    }

    /// The live feed has nothing more for now: a pending skip run goes out.
    pub fn handle_feed_idle(&mut self) {
        assert!(self.is_idle(), "only an idle machine waits on its feed");
        self.flush_skips();
    }

    /// The outbound queue has room: a pending gap goes out (at-most-once).
    pub fn handle_room(&mut self) {
        assert!(self.is_idle(), "only an idle machine waits for room");
        self.queue.push_back(Queued::FlushGap);
    }

    /// Queues `subscribed` (and the notice), then the replay (exactly-once) or goes live.
    fn started(
        &mut self,
        continuity: Continuity,
        notice: Option<Outbound<M>>,
        top: Option<Position>,
    ) {
        self.queue.push_back(Queued::Send(Outbound::Subscribed {
            continuity,
            after: self.cursor.as_ref().map(Cursor::position),
            top,
        }));
        if let Some(notice) = notice {
            self.queue.push_back(Queued::Send(notice));
        }
        match self.guarantee {
            Guarantee::ExactlyOnce => {
                self.phase = Phase::CatchingUp {
                    through: None,
                    live: None,
                };
                self.continue_catch_up();
            }
            Guarantee::AtMostOnce => self.phase = Phase::Live,
        }
    }

    /// Asks for the next page, or ends the catch-up when the cursor is past its target.
    fn continue_catch_up(&mut self) {
        let Phase::CatchingUp { through, .. } = &self.phase else {
            unreachable!("only while catching up")
        };
        let Some(cursor) = &self.cursor else {
            self.finish_catch_up();
            return;
        };
        if through.is_some_and(|through| cursor.next() > through) {
            self.finish_catch_up();
            return;
        }
        self.queue.push_back(Queued::Read {
            after: cursor.position(),
            limit: self.page_messages,
        });
    }

    /// Back to live; the live message that caused the catch-up is offered again.
    fn finish_catch_up(&mut self) {
        let Phase::CatchingUp { live, .. } = std::mem::replace(&mut self.phase, Phase::Live) else {
            unreachable!("only while catching up")
        };
        let Some(live) = live else {
            return;
        };
        let (epoch, serial) = {
            let message = live.message();
            (message.epoch.clone(), message.serial)
        };
        // Everything before a live message is durable, so the log has reached it (or
        // continuity was reported lost). Anything else is a server bug: fail rather than skip
        // a serial.
        match self
            .cursor
            .as_mut()
            .map(|cursor| cursor.offer(&epoch, serial))
        {
            Some(Step::Deliver) => self.deliver(live),
            Some(Step::Duplicate) => {}
            other => self.fail(format!(
                "the log did not reach serial {serial} while catching up ({other:?})"
            )),
        }
    }

    /// Hands out one page through the cursor. False when the machine failed.
    fn apply_page(&mut self, page: Page<M>) -> bool {
        let mut skipped = page.skipped.into_iter().peekable();
        for message in page.messages {
            let serial = message.message().serial;
            while let Some(range) = skipped.next_if(|range| range.to < serial) {
                self.pass_over(&range);
            }
            let epoch = message.message().epoch.clone();
            let step = self
                .cursor
                .as_mut()
                .expect("pages are read after a cursor")
                .offer(&epoch, serial);
            match step {
                Step::Deliver => self.deliver(message),
                Step::Duplicate => {}
                // A forward page after the cursor is contiguous in its epoch (expired serials
                // come as skipped ranges): anything else is a store bug.
                other => {
                    self.fail(format!(
                        "the log returned serial {serial} out of order ({other:?})"
                    ));
                    return false;
                }
            }
        }
        for range in skipped {
            self.pass_over(&range);
        }
        true
    }

    /// Expired serials: reported as a `skip` (nothing was lost: their TTL ran out).
    fn pass_over(&mut self, range: &SkippedRange) {
        let Some(cursor) = &mut self.cursor else {
            return;
        };
        let from = cursor.next().max(range.from);
        if !cursor.pass_over(range.to) {
            return;
        }
        let epoch = cursor.epoch().clone();
        self.flush_skips();
        self.queue_notice(Outbound::Skip {
            from: Position::new(epoch.clone(), from),
            to: Position::new(epoch, range.to),
            cause: SkipCause::Expired,
            chain: None,
        });
    }

    /// Decides one live message.
    fn offer_live(&mut self, live: M) {
        let (epoch, serial) = {
            let message = live.message();
            (message.epoch.clone(), message.serial)
        };
        let guarantee = self.guarantee;
        let cursor = self.cursor.get_or_insert_with(|| {
            // The channel was empty when the subscription started: everything from serial 1
            // is new to this subscriber (a jump past it is a catch-up or a reported gap).
            Cursor::new(guarantee, epoch.clone(), Serial::BEFORE_FIRST)
        });
        match cursor.offer(&epoch, serial) {
            Step::Deliver => self.deliver(live),
            Step::Duplicate => {}
            Step::CatchUp { to, .. } => {
                self.phase = Phase::CatchingUp {
                    through: Some(to),
                    live: Some(live),
                };
                self.continue_catch_up();
            }
            Step::Gap { from, to } => {
                // A skip run before the dropped range is reported before it.
                self.flush_skips();
                self.queue.push_back(Queued::Drop {
                    epoch: epoch.clone(),
                    from,
                    to,
                });
                self.deliver(live);
            }
            Step::EpochChanged => {
                let requested = cursor.position();
                let resume_after = Serial(serial.0 - 1);
                let notice = Outbound::ContinuityLost {
                    from: Position::new(requested.epoch.clone(), requested.serial.next()),
                    to: Some(Position::new(epoch.clone(), resume_after)),
                    reason: ContinuityReason::EpochChanged,
                };
                self.flush_skips();
                self.queue.push_back(Queued::Send(notice));
                self.cursor = Some(Cursor::new(self.guarantee, epoch, resume_after));
                self.offer_live(live);
            }
        }
    }

    /// The cursor accepted `message`: filter, then queue it.
    fn deliver(&mut self, message: M) {
        let accepted = match &mut self.filter {
            Some(filter) => filter(message.message()),
            None => true,
        };
        if !accepted {
            let stored = message.message();
            if let Some(closed) = self.skips.add(stored.serial, Some(stored.chain)) {
                self.queue_skip_run(closed);
            }
            return;
        }
        self.flush_skips();
        let outbound = Outbound::Delivery(message);
        match self.guarantee {
            Guarantee::ExactlyOnce => self.queue.push_back(Queued::Send(outbound)),
            Guarantee::AtMostOnce => self.queue.push_back(Queued::Attempt(outbound)),
        }
    }

    fn flush_skips(&mut self) {
        if let Some(run) = self.skips.take() {
            self.queue_skip_run(run);
        }
    }

    fn queue_skip_run(&mut self, run: SkippedRun) {
        let Some(cursor) = &self.cursor else {
            return;
        };
        let epoch = cursor.epoch().clone();
        self.queue_notice(Outbound::Skip {
            from: Position::new(epoch.clone(), run.from),
            to: Position::new(epoch, run.to),
            cause: SkipCause::Filtered,
            chain: run.chain,
        });
    }

    /// A skip notice: waits (exactly-once) or never waits and folds into the gap when there
    /// is no room (at-most-once), so the order of notices holds and every serial is still
    /// accounted for.
    fn queue_notice(&mut self, notice: Outbound<M>) {
        match self.guarantee {
            Guarantee::ExactlyOnce => self.queue.push_back(Queued::Send(notice)),
            Guarantee::AtMostOnce => self.queue.push_back(Queued::Attempt(notice)),
        }
    }

    /// An attempt found no room: its serials join the pending gap (`counted`: they were
    /// messages, not skip notices).
    fn missed(&mut self, epoch: Epoch, from: Serial, to: Serial, counted: bool) {
        if counted {
            self.dropped_unreported += to.0 - from.0 + 1;
        }
        self.extend_gap(epoch, from, to);
    }

    fn extend_gap(&mut self, epoch: Epoch, from: Serial, to: Serial) {
        match &mut self.gap {
            Some(gap) => {
                assert_eq!(
                    gap.epoch, epoch,
                    "a gap is reported before a new epoch's notice"
                );
                assert!(to > gap.to, "dropped ranges come in serial order");
                gap.to = to;
            }
            None => self.gap = Some(GapRange { epoch, from, to }),
        }
    }

    fn fail(&mut self, reason: String) {
        self.queue.push_back(Queued::Fail(reason));
    }
}

fn gap_frame<M>(gap: GapRange) -> Outbound<M> {
    Outbound::Gap {
        from: Position::new(gap.epoch.clone(), gap.from),
        to: Position::new(gap.epoch, gap.to),
    }
}

fn attempt_of<M: Deliverable>(outbound: &Outbound<M>) -> Awaiting {
    match outbound {
        Outbound::Delivery(message) => {
            let message = message.message();
            Awaiting::Attempt {
                epoch: message.epoch.clone(),
                from: message.serial,
                to: message.serial,
                counted: true,
            }
        }
        Outbound::Skip { from, to, .. } => Awaiting::Attempt {
            epoch: to.epoch.clone(),
            from: from.serial,
            to: to.serial,
            counted: false,
        },
        Outbound::Subscribed { .. } | Outbound::ContinuityLost { .. } | Outbound::Gap { .. } => {
            unreachable!("only deliveries and skips are attempted")
        }
    }
}

/// The `continuity_lost` notice for `lost`.
fn lost_notice<M>(lost: &ContinuityLost) -> Outbound<M> {
    let requested = &lost.requested;
    Outbound::ContinuityLost {
        from: Position::new(requested.epoch.clone(), requested.serial.next()),
        to: last_missed(lost),
        reason: lost.reason,
    }
}

/// The last serial a subscriber misses when continuity is lost: delivery resumes right after
/// it. Before the first retained message; at the top when nothing is retained or when the
/// subscriber claimed to be ahead of the top; `None` for a channel without messages.
pub fn last_missed(lost: &ContinuityLost) -> Option<Position> {
    match (lost.reason, &lost.first_available, &lost.top) {
        (ContinuityReason::AheadOfTop, _, Some(top)) | (_, None, Some(top)) => Some(top.clone()),
        (_, Some(first), _) => Some(Position::new(
            first.epoch.clone(),
            Serial(first.serial.0 - 1),
        )),
        (_, None, None) => None,
    }
}

#[cfg(test)]
mod tests {
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
            let first_available =
                (self.first <= self.top).then(|| position(self.epoch, self.first));
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
        let mut machine =
            SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Rewind(3), 100, None);
        assert_eq!(serials(&run(&mut machine, &log)), vec![8, 9, 10]);
        log.first = 9;
        let mut machine =
            SubscriptionMachine::new(Guarantee::ExactlyOnce, Start::Rewind(5), 100, None);
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
        let mut machine =
            SubscriptionMachine::new(Guarantee::AtMostOnce, Start::Live, 8, Some(filter));
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
                Box::new(move |message: &Message| {
                    !message.serial.0.is_multiple_of(rejected_modulus)
                }) as Filter
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
}
