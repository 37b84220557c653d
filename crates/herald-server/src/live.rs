//! One subscription's delivery task (the "pump"): replay, catch-up and live delivery for
//! WebSocket and SSE alike.
//!
//! A pump registers with the [`Hub`] *before* it reads anything from the store, so every
//! message is either in the store when it reads or in its live ring afterwards. The decision
//! per message is herald-core's [`Cursor`]; this module only does the I/O around it:
//!
//! - **exactly-once**: replays the log after the start position page by page, then follows the
//!   ring. A skip in the ring (the ring overflowed because the subscriber was slow, or the
//!   replay took long) becomes a read of the missing serials from the log. The pump waits for
//!   room in the connection's outbound queue, so a slow subscriber holds at most one log page
//!   and its queue, never an unbounded backlog.
//! - **at-most-once**: follows the ring only, never waits: when the outbound queue is full the
//!   message is dropped and the dropped range is reported as a `gap` before the next delivery.
//!
//! Serials not delivered as messages are reported as `skip` notices (filtered, expired), runs
//! gathered, so every serial is accounted for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_core::{
    ChannelName, ContinuityLost, ContinuityReason, Cursor, Guarantee, Position, ReadFrom, Serial,
    SkipRun, SkippedRange, Step,
};
use herald_log::{LogStore, ReadError, ReadPage, ReadQuery};
use herald_protocol::ws::{
    Continuity, ContinuityLostNotice, ContinuityLostTag, ErrorFrame, ErrorTag, GapNotice, GapTag,
    ServerFrame, SkipNotice, SkipTag, Subscribed, SubscribedTag,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::filter::Filter;
use crate::hub::{Hub, LiveMessage, LiveReceiver};

/// What a pump hands to its connection's writer, in order.
#[derive(Debug)]
pub enum Outgoing {
    Message(Arc<LiveMessage>),
    Hint(Arc<LiveMessage>),
    /// Replies and notices.
    Frame(ServerFrame),
    /// Close the connection with this code (the writer stops after it).
    Close {
        code: u16,
        reason: String,
    },
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
}

/// A validated subscribe request.
pub struct SubscriptionRequest {
    pub req: Option<u64>,
    pub channel: ChannelName,
    pub guarantee: Guarantee,
    pub start: Start,
    pub hints: bool,
    pub filter: Option<Filter>,
}

/// Counters for `/metrics`, shared by all pumps of a server.
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub delivered_exactly_once: AtomicU64,
    pub delivered_at_most_once: AtomicU64,
    /// At-most-once messages dropped because the outbound queue was full.
    pub dropped: AtomicU64,
    pub gap_notices: AtomicU64,
    pub continuity_lost_retention: AtomicU64,
    pub continuity_lost_epoch_changed: AtomicU64,
    pub continuity_lost_ahead_of_top: AtomicU64,
    /// Log reads made to replay or catch up a subscription.
    pub catch_up_reads: AtomicU64,
    pub subscriptions: AtomicU64,
}

/// What every pump of a server shares.
#[derive(Clone)]
pub struct LiveContext {
    pub store: Arc<dyn LogStore>,
    pub hub: Arc<Hub>,
    pub page_messages: usize,
    pub counters: Arc<LiveCounters>,
}

/// Starts a subscription's pump. It sends `subscribed` (or an `error`) first; it ends when the
/// returned task is aborted or the connection's queue closes.
pub fn spawn(
    context: LiveContext,
    request: SubscriptionRequest,
    out: mpsc::Sender<Outgoing>,
) -> tokio::task::JoinHandle<()> {
    let registration = Registration::new(context.clone(), request.channel.clone());
    tokio::spawn(async move {
        let mut pump = Pump {
            context,
            channel: request.channel.clone(),
            guarantee: request.guarantee,
            hints: request.hints,
            filter: request.filter.clone(),
            cursor: None,
            skips: SkipRun::default(),
            dropped: None,
            out,
        };
        let mut registration = registration;
        if let Err(End::Failed(message)) = pump.run(request, &mut registration).await {
            let _ = pump
                .out
                .send(Outgoing::Frame(ServerFrame::Error(ErrorFrame {
                    kind: ErrorTag::Tag,
                    req: None,
                    channel: Some(pump.channel.to_string()),
                    code: herald_core::ErrorCode::StorageFailed.as_str().to_owned(),
                    // Resubscribing `from` the last position held recovers exactly.
                    message,
                    retryable: true,
                })))
                .await;
        }
    })
}

/// The hub receiver of one subscription; releases the channel's ring when dropped (also when
/// the pump task is aborted).
struct Registration {
    context: LiveContext,
    channel: ChannelName,
    receiver: Option<LiveReceiver>,
}

impl Registration {
    fn new(context: LiveContext, channel: ChannelName) -> Registration {
        let receiver = context.hub.subscribe(&channel);
        context
            .counters
            .subscriptions
            .fetch_add(1, Ordering::Relaxed);
        Registration {
            context,
            channel,
            receiver: Some(receiver),
        }
    }

    fn receiver(&mut self) -> &mut LiveReceiver {
        self.receiver.as_mut().expect("present until drop")
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        drop(self.receiver.take());
        self.context.hub.release(&self.channel);
        self.context
            .counters
            .subscriptions
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a pump stops.
enum End {
    /// The connection is gone.
    Closed,
    /// The store failed; the subscriber is told and the subscription ends.
    Failed(String),
}

struct Pump {
    context: LiveContext,
    channel: ChannelName,
    guarantee: Guarantee,
    hints: bool,
    filter: Option<Filter>,
    /// `None` until the channel has a message (a subscription to an empty channel).
    cursor: Option<Cursor>,
    skips: SkipRun,
    /// At-most-once: serials dropped and not yet reported.
    dropped: Option<(Serial, Serial)>,
    out: mpsc::Sender<Outgoing>,
}

impl Pump {
    async fn run(
        &mut self,
        request: SubscriptionRequest,
        registration: &mut Registration,
    ) -> Result<(), End> {
        self.start(request).await?;
        if self.guarantee == Guarantee::ExactlyOnce {
            self.replay().await?;
        }
        self.follow(registration.receiver()).await
    }

    /// Places the cursor, answers `subscribed`, and reports lost continuity.
    async fn start(&mut self, request: SubscriptionRequest) -> Result<(), End> {
        let status = {
            let store = self.context.store.clone();
            let channel = self.channel.clone();
            blocking(move || store.channel_status(&channel)).await?
        }
        .map_err(|error| End::Failed(error.to_string()))?;
        let mut continuity = Continuity::New;
        let mut notice = None;
        match (&request.start, &status) {
            (_, None) => {
                if let Start::After(requested) = &request.start {
                    continuity = Continuity::Lost;
                    notice = Some(self.lost_notice(&ContinuityLost {
                        reason: ContinuityReason::EpochChanged,
                        requested: requested.clone(),
                        first_available: None,
                        top: None,
                    }));
                }
            }
            (Start::Live, Some(status)) => {
                self.cursor = Some(Cursor::new(
                    self.guarantee,
                    status.epoch.clone(),
                    status.top.serial,
                ));
            }
            (Start::Rewind(count), Some(status)) => {
                let first_kept = status
                    .first
                    .as_ref()
                    .map_or(status.top.serial.0, |first| first.serial.0 - 1);
                let after = status.top.serial.0.saturating_sub(*count).max(first_kept);
                self.cursor = Some(Cursor::new(
                    self.guarantee,
                    status.epoch.clone(),
                    Serial(after),
                ));
            }
            (Start::After(requested), Some(status)) => {
                match self.read_after(requested.clone(), 1).await? {
                    Ok(_) => {
                        continuity = Continuity::Held;
                        self.cursor = Some(Cursor::new(
                            self.guarantee,
                            requested.epoch.clone(),
                            requested.serial,
                        ));
                    }
                    Err(lost) => {
                        continuity = Continuity::Lost;
                        notice = Some(self.lost_notice(&lost));
                        let resume = last_missed(&lost)
                            .filter(|position| position.epoch == status.epoch)
                            .map_or(status.top.serial, |position| position.serial);
                        self.cursor =
                            Some(Cursor::new(self.guarantee, status.epoch.clone(), resume));
                    }
                }
            }
        }
        let reply = Subscribed {
            kind: SubscribedTag::Tag,
            req: request.req,
            channel: self.channel.to_string(),
            guarantee: self.guarantee.as_str().to_owned(),
            hints: self.hints,
            filter: self
                .filter
                .as_ref()
                .map(|filter| filter.source().to_owned()),
            continuity,
            after: self
                .cursor
                .as_ref()
                .map(|cursor| cursor.position().to_string()),
            top: status.as_ref().map(|status| status.top.to_string()),
        };
        self.send(Outgoing::Frame(ServerFrame::Subscribed(reply)))
            .await?;
        if let Some(notice) = notice {
            self.send(Outgoing::Frame(notice)).await?;
        }
        Ok(())
    }

    /// Exactly-once: delivers everything the log holds after the cursor.
    async fn replay(&mut self) -> Result<(), End> {
        self.catch_up(None).await
    }

    /// Reads forward from the cursor until the log has no more, or (with `through`) until the
    /// cursor is past `through`.
    async fn catch_up(&mut self, through: Option<Serial>) -> Result<(), End> {
        loop {
            let Some(cursor) = &self.cursor else {
                return Ok(());
            };
            if through.is_some_and(|through| cursor.next() > through) {
                return Ok(());
            }
            let after = cursor.position();
            match self
                .read_after(after.clone(), self.context.page_messages)
                .await?
            {
                Ok(page) => {
                    let more = page.more;
                    let progressed = self.apply_page(page).await?;
                    if !more || !progressed {
                        self.flush_skips().await?;
                        return Ok(());
                    }
                }
                Err(lost) => {
                    // Retention overtook a slow subscriber (or the channel was reset): say so,
                    // with the range, and go on from what is still there.
                    let notice = self.lost_notice(&lost);
                    self.flush_skips().await?;
                    self.send(Outgoing::Frame(notice)).await?;
                    self.cursor = last_missed(&lost)
                        .map(|resume| Cursor::new(self.guarantee, resume.epoch, resume.serial));
                    if self.cursor.is_none() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Delivers one page through the cursor. Returns whether the cursor moved.
    async fn apply_page(&mut self, page: ReadPage) -> Result<bool, End> {
        let before = self.cursor.as_ref().map(Cursor::next);
        let mut skipped = page.skipped.into_iter().peekable();
        for message in page.messages {
            while let Some(range) = skipped.next_if(|range| range.to < message.serial) {
                self.pass_over(&range).await?;
            }
            self.offer(Arc::new(LiveMessage::new(message))).await?;
        }
        for range in skipped {
            self.pass_over(&range).await?;
        }
        Ok(self.cursor.as_ref().map(Cursor::next) != before)
    }

    /// Expired serials: reported as a `skip` (nothing was lost: their TTL ran out).
    async fn pass_over(&mut self, range: &SkippedRange) -> Result<(), End> {
        let Some(cursor) = &mut self.cursor else {
            return Ok(());
        };
        let from = cursor.next().max(range.from);
        if !cursor.pass_over(range.to) {
            return Ok(());
        }
        let epoch = cursor.epoch().clone();
        self.flush_skips().await?;
        self.send(Outgoing::Frame(ServerFrame::Skip(SkipNotice {
            kind: SkipTag::Tag,
            channel: self.channel.to_string(),
            from: Position::new(epoch.clone(), from).to_string(),
            to: Position::new(epoch, range.to).to_string(),
            reason: range.reason.as_str().to_owned(),
            chain: None,
        })))
        .await
    }

    /// Follows the live ring until the connection goes away.
    async fn follow(&mut self, receiver: &mut LiveReceiver) -> Result<(), End> {
        loop {
            let received = if self.dropped.is_some() {
                // At-most-once with drops not yet reported: report them as soon as there is
                // room, even if the channel goes quiet.
                let out = self.out.clone();
                tokio::select! {
                    biased;
                    received = receiver.recv() => received,
                    permit = out.reserve() => {
                        let permit = permit.map_err(|_| End::Closed)?;
                        if let Some(gap) = self.take_gap() {
                            permit.send(gap);
                        }
                        continue;
                    }
                }
            } else {
                receiver.recv().await
            };
            match received {
                Ok(live) => {
                    self.offer(live).await?;
                    if receiver.is_empty() {
                        self.flush_skips().await?;
                    }
                }
                // The next message received shows the jump; the cursor turns it into a
                // catch-up (exactly-once) or a gap (at-most-once).
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(End::Closed),
            }
        }
    }

    /// Decides and delivers one message (from the log or the ring).
    async fn offer(&mut self, live: Arc<LiveMessage>) -> Result<(), End> {
        let (epoch, serial) = (live.message.epoch.clone(), live.message.serial);
        let cursor = self.cursor.get_or_insert_with(|| {
            // The channel was empty when the subscription started: everything from serial 1
            // is new to this subscriber (a jump past it is a catch-up or a reported gap).
            Cursor::new(self.guarantee, epoch.clone(), Serial(0))
        });
        match cursor.offer(&epoch, serial) {
            Step::Deliver => self.deliver(live).await,
            Step::Duplicate => Ok(()),
            Step::CatchUp { to, .. } => {
                Box::pin(self.catch_up(Some(to))).await?;
                // Everything before a live message is durable, so the log has reached it
                // (or continuity was reported lost). Anything else is a server bug: end the
                // subscription with an error rather than skip a serial.
                match self
                    .cursor
                    .as_mut()
                    .map(|cursor| cursor.offer(&epoch, serial))
                {
                    Some(Step::Deliver) => self.deliver(live).await,
                    Some(Step::Duplicate) => Ok(()),
                    other => Err(End::Failed(format!(
                        "the log did not reach serial {serial} while catching up ({other:?})"
                    ))),
                }
            }
            Step::Gap { from, to } => {
                self.record_drop(from, to);
                self.deliver(live).await
            }
            Step::EpochChanged => {
                let lost = ContinuityLost {
                    reason: ContinuityReason::EpochChanged,
                    requested: cursor.position(),
                    first_available: None,
                    top: None,
                };
                let mut notice = self.lost_notice(&lost);
                if let ServerFrame::ContinuityLost(frame) = &mut notice {
                    frame.to = Some(Position::new(epoch.clone(), Serial(serial.0 - 1)).to_string());
                }
                self.flush_skips().await?;
                self.send(Outgoing::Frame(notice)).await?;
                self.cursor = Some(Cursor::new(self.guarantee, epoch, Serial(serial.0 - 1)));
                Box::pin(self.offer(live)).await
            }
        }
    }

    /// The cursor accepted `live`: filter, then send.
    async fn deliver(&mut self, live: Arc<LiveMessage>) -> Result<(), End> {
        let message = &live.message;
        if let Some(filter) = &self.filter
            && !filter.matches(message.name.as_deref(), &message.headers)
        {
            if let Some(closed) = self.skips.add(message.serial, Some(message.chain)) {
                self.send_skip(closed).await?;
            }
            return Ok(());
        }
        self.flush_skips().await?;
        let item = if self.hints {
            Outgoing::Hint(live)
        } else {
            Outgoing::Message(live)
        };
        match self.guarantee {
            Guarantee::ExactlyOnce => {
                self.send(item).await?;
                self.context
                    .counters
                    .delivered_exactly_once
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Guarantee::AtMostOnce => self.send_or_drop(item).await,
        }
    }

    /// At-most-once: never waits. A full queue drops the message; the dropped range goes out
    /// as one `gap` as soon as there is room, before the next delivery.
    async fn send_or_drop(&mut self, item: Outgoing) -> Result<(), End> {
        let serial = match &item {
            Outgoing::Message(live) | Outgoing::Hint(live) => live.message.serial,
            Outgoing::Frame(_) | Outgoing::Close { .. } => {
                unreachable!("only deliveries are dropped")
            }
        };
        if !self.try_flush_gap()? {
            self.record_drop(serial, serial);
            return Ok(());
        }
        match self.out.try_send(item) {
            Ok(()) => {
                self.context
                    .counters
                    .delivered_at_most_once
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                self.record_drop(serial, serial);
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(End::Closed),
        }
    }

    /// At-most-once: sends the pending gap notice if there is room. False when the queue is
    /// full (the gap stays pending, and whatever comes next must be folded into it).
    fn try_flush_gap(&mut self) -> Result<bool, End> {
        let Some(gap) = self.take_gap() else {
            return Ok(true);
        };
        match self.out.try_send(gap) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(Outgoing::Frame(ServerFrame::Gap(gap)))) => {
                // Put it back: the range is still unreported.
                let from = Position::parse(&gap.from).expect("we wrote it").serial;
                let to = Position::parse(&gap.to).expect("we wrote it").serial;
                self.dropped = Some((from, to));
                self.context
                    .counters
                    .gap_notices
                    .fetch_sub(1, Ordering::Relaxed);
                Ok(false)
            }
            Err(TrySendError::Full(_)) => unreachable!("a gap was sent"),
            Err(TrySendError::Closed(_)) => Err(End::Closed),
        }
    }

    /// The pending gap notice, counted; `None` when nothing was dropped.
    fn take_gap(&mut self) -> Option<Outgoing> {
        let (from, to) = self.dropped.take()?;
        let epoch = self.cursor.as_ref()?.epoch().clone();
        self.context
            .counters
            .gap_notices
            .fetch_add(1, Ordering::Relaxed);
        Some(Outgoing::Frame(ServerFrame::Gap(GapNotice {
            kind: GapTag::Tag,
            channel: self.channel.to_string(),
            from: Position::new(epoch.clone(), from).to_string(),
            to: Position::new(epoch, to).to_string(),
            reason: "slow_consumer".to_owned(),
        })))
    }

    /// Extends the unreported range with serials that were not dropped as messages (a skip
    /// notice that found no room): the subscriber learns them as part of the gap.
    fn fold_into_gap(&mut self, from: Serial, to: Serial) {
        self.dropped = Some(match self.dropped {
            Some((first, _)) => (first, to),
            None => (from, to),
        });
    }

    fn record_drop(&mut self, from: Serial, to: Serial) {
        self.context
            .counters
            .dropped
            .fetch_add(to.0 - from.0 + 1, Ordering::Relaxed);
        self.dropped = Some(match self.dropped {
            Some((first, _)) => (first, to),
            None => (from, to),
        });
    }

    async fn flush_skips(&mut self) -> Result<(), End> {
        match self.skips.take() {
            Some(run) => self.send_skip(run).await,
            None => Ok(()),
        }
    }

    async fn send_skip(&mut self, run: herald_core::SkippedRun) -> Result<(), End> {
        let Some(cursor) = &self.cursor else {
            return Ok(());
        };
        let epoch = cursor.epoch().clone();
        let frame = Outgoing::Frame(ServerFrame::Skip(SkipNotice {
            kind: SkipTag::Tag,
            channel: self.channel.to_string(),
            from: Position::new(epoch.clone(), run.from).to_string(),
            to: Position::new(epoch, run.to).to_string(),
            reason: "filtered".to_owned(),
            chain: run.chain.map(|chain| chain.to_hex()),
        }));
        match self.guarantee {
            Guarantee::ExactlyOnce => self.send(frame).await,
            // At-most-once never waits: a skip that finds no room (or a gap still pending
            // before it) becomes part of the gap, so the order of notices holds and every
            // serial is still accounted for.
            Guarantee::AtMostOnce => {
                if !self.try_flush_gap()? {
                    self.fold_into_gap(run.from, run.to);
                    return Ok(());
                }
                match self.out.try_send(frame) {
                    Ok(()) => Ok(()),
                    Err(TrySendError::Full(_)) => {
                        self.fold_into_gap(run.from, run.to);
                        Ok(())
                    }
                    Err(TrySendError::Closed(_)) => Err(End::Closed),
                }
            }
        }
    }

    /// The `continuity_lost` notice for `lost`, counted.
    fn lost_notice(&self, lost: &ContinuityLost) -> ServerFrame {
        let counter = match lost.reason {
            ContinuityReason::Retention => &self.context.counters.continuity_lost_retention,
            ContinuityReason::EpochChanged => &self.context.counters.continuity_lost_epoch_changed,
            ContinuityReason::AheadOfTop => &self.context.counters.continuity_lost_ahead_of_top,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let requested = &lost.requested;
        let to = last_missed(lost);
        ServerFrame::ContinuityLost(ContinuityLostNotice {
            kind: ContinuityLostTag::Tag,
            channel: self.channel.to_string(),
            from: Position::new(requested.epoch.clone(), requested.serial.next()).to_string(),
            to: to.map(|to| to.to_string()),
            reason: lost.reason.as_str().to_owned(),
        })
    }

    /// Reads a page after `after`; the outer error is a store failure, the inner one lost
    /// continuity.
    async fn read_after(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Result<ReadPage, ContinuityLost>, End> {
        self.context
            .counters
            .catch_up_reads
            .fetch_add(1, Ordering::Relaxed);
        let store = self.context.store.clone();
        let channel = self.channel.clone();
        let query = ReadQuery::Forward {
            from: ReadFrom::After(after),
            limit,
        };
        match blocking(move || store.read(&channel, &query)).await? {
            Ok(page) => Ok(Ok(page)),
            Err(ReadError::ContinuityLost(lost)) => Ok(Err(lost)),
            Err(ReadError::Store(error)) => Err(End::Failed(error.to_string())),
        }
    }

    /// Waits for room in the outbound queue (exactly-once deliveries, replies, notices).
    async fn send(&self, item: Outgoing) -> Result<(), End> {
        self.out.send(item).await.map_err(|_| End::Closed)
    }
}

/// The last serial a subscriber misses when continuity is lost: delivery resumes right after
/// it. Before the first retained message; at the top when nothing is retained or when the
/// subscriber claimed to be ahead of the top; `None` for a channel without messages.
fn last_missed(lost: &ContinuityLost) -> Option<Position> {
    match (lost.reason, &lost.first_available, &lost.top) {
        (ContinuityReason::AheadOfTop, _, Some(top)) | (_, None, Some(top)) => Some(top.clone()),
        (_, Some(first), _) => Some(Position::new(
            first.epoch.clone(),
            Serial(first.serial.0 - 1),
        )),
        (_, None, None) => None,
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, End> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| End::Failed(format!("store task failed: {error}")))
}
