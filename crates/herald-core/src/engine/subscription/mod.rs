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
mod tests;
