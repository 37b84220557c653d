//! One subscription's delivery task (the "pump"): the tokio driver of herald-core's
//! [`SubscriptionMachine`], for WebSocket and SSE alike.
//!
//! Every decision (where the subscription starts, lost continuity, replay paging, catch-up
//! on a jump in the live feed, at-most-once drops and gaps, skip runs, epoch changes) is the
//! machine's; this module only does the I/O it asks for:
//!
//! - store reads on the blocking pool ([`Action::ReadStatus`], [`Action::Read`]);
//! - the channel's live ring from the [`Hub`], offered to the machine one message at a time
//!   when it is idle. A pump registers with the hub *before* it reads anything from the
//!   store, so every message is either in the store when it reads or in its ring afterwards;
//! - the connection's bounded outbound queue: [`Action::Send`] waits for room (exactly-once
//!   deliveries, replies, notices: a slow subscriber holds at most one log page and its
//!   queue), [`Action::TrySend`] never waits (at-most-once);
//! - the wire frames and the `/metrics` counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_core::engine::{Action, Deliverable, Outbound, Page, SubscriptionMachine};
use herald_core::{ChannelName, ContinuityReason, Guarantee, Message};
use herald_log::{ReadError, ReadQuery};
use herald_protocol::ws::{ErrorFrame, ErrorTag, ServerFrame, SubscribeEcho, subscription_frame};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::filter::Filter;
use crate::hub::{Hub, LiveMessage, LiveReceiver, Registration};

pub use herald_core::engine::Start;

/// What a pump hands to its connection's writer, in order.
#[derive(Debug)]
pub enum Outgoing {
    Message(Arc<LiveMessage>),
    Hint(Arc<LiveMessage>),
    /// An at-least-once delivery: the shared message bytes with its delivery count.
    Counted {
        live: Arc<LiveMessage>,
        delivery: u32,
    },
    /// Replies and notices.
    Frame(ServerFrame),
    /// Close the connection with this code (the writer stops after it).
    Close {
        code: u16,
        reason: String,
    },
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
    pub subscriptions: Arc<AtomicU64>,
}

/// What every pump of a server shares.
#[derive(Clone)]
pub struct LiveContext {
    pub store: Arc<dyn herald_log::LogStore>,
    pub hub: Arc<Hub>,
    pub page_messages: usize,
    pub counters: Arc<LiveCounters>,
}

impl Deliverable for LiveMessage {
    fn message(&self) -> &Message {
        &self.message
    }
}

/// Starts a subscription's pump. It sends `subscribed` (or an `error`) first; it ends when the
/// returned task is aborted or the connection's queue closes.
pub fn spawn(
    context: LiveContext,
    request: SubscriptionRequest,
    out: mpsc::Sender<Outgoing>,
) -> tokio::task::JoinHandle<()> {
    let registration = Registration::new(
        context.hub.clone(),
        &request.channel,
        context.counters.subscriptions.clone(),
    );
    tokio::spawn(async move {
        let machine_filter = request.filter.clone().map(|filter| {
            Box::new(move |message: &Message| {
                filter.matches(message.name.as_deref(), &message.headers)
            }) as herald_core::engine::Filter
        });
        let mut pump = Pump {
            machine: SubscriptionMachine::new(
                request.guarantee,
                request.start.clone(),
                context.page_messages,
                machine_filter,
            ),
            context,
            req: request.req,
            channel: request.channel,
            guarantee: request.guarantee,
            hints: request.hints,
            filter_source: request.filter.map(|filter| filter.source().to_owned()),
            out,
        };
        let mut registration = registration;
        if let Err(End::Failed(message)) = pump.run(registration.receiver()).await {
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

/// Why a pump stops.
enum End {
    /// The connection is gone.
    Closed,
    /// The store failed (or the machine caught a bug); the subscriber is told and the
    /// subscription ends.
    Failed(String),
}

struct Pump {
    context: LiveContext,
    machine: SubscriptionMachine<Arc<LiveMessage>>,
    req: Option<u64>,
    channel: ChannelName,
    guarantee: Guarantee,
    hints: bool,
    filter_source: Option<String>,
    out: mpsc::Sender<Outgoing>,
}

impl Pump {
    /// Performs the machine's actions, then follows the live ring until the connection goes
    /// away.
    async fn run(&mut self, receiver: &mut LiveReceiver) -> Result<(), End> {
        loop {
            self.drive().await?;
            let received = if self.machine.wants_room() {
                // At-most-once with drops not yet reported: report them as soon as there is
                // room, even if the channel goes quiet.
                let out = self.out.clone();
                tokio::select! {
                    biased;
                    received = receiver.recv() => received,
                    permit = out.reserve() => {
                        drop(permit.map_err(|_| End::Closed)?);
                        self.machine.handle_room();
                        continue;
                    }
                }
            } else {
                receiver.recv().await
            };
            match received {
                Ok(live) => {
                    self.machine.handle_live(live);
                    self.drive().await?;
                    if receiver.is_empty() {
                        self.machine.handle_feed_idle();
                    }
                }
                // The next message received shows the jump; the machine turns it into a
                // catch-up (exactly-once) or a gap (at-most-once).
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(End::Closed),
            }
        }
    }

    /// Performs every action the machine has, in order, until it waits for input.
    async fn drive(&mut self) -> Result<(), End> {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::ReadStatus => {
                    let store = self.context.store.clone();
                    let channel = self.channel.clone();
                    let status = blocking(move || store.channel_status(&channel))
                        .await?
                        .map_err(|error| End::Failed(error.to_string()))?;
                    self.machine.handle_status(status);
                }
                Action::Read { after, limit } => {
                    self.context
                        .counters
                        .catch_up_reads
                        .fetch_add(1, Ordering::Relaxed);
                    let result = read_page(&self.context.store, &self.channel, after, limit)
                        .await
                        .map_err(End::Failed)?;
                    self.machine.handle_page(result);
                }
                Action::Send(outbound) => {
                    let sent = Sent::of(&outbound);
                    self.out
                        .send(self.encode(outbound))
                        .await
                        .map_err(|_| End::Closed)?;
                    self.count(sent);
                }
                Action::TrySend(outbound) => {
                    let sent = Sent::of(&outbound);
                    match self.out.try_send(self.encode(outbound)) {
                        Ok(()) => {
                            self.count(sent);
                            self.machine.handle_try_send(true);
                        }
                        Err(TrySendError::Full(_)) => self.machine.handle_try_send(false),
                        Err(TrySendError::Closed(_)) => return Err(End::Closed),
                    }
                }
                Action::Fail(reason) => return Err(End::Failed(reason)),
            }
            let dropped = self.machine.poll_dropped();
            if dropped > 0 {
                self.context
                    .counters
                    .dropped
                    .fetch_add(dropped, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Counts what reached the outbound queue.
    fn count(&self, sent: Sent) {
        let counters = &self.context.counters;
        let counter = match sent {
            Sent::Delivery => match self.guarantee {
                Guarantee::ExactlyOnce => &counters.delivered_exactly_once,
                Guarantee::AtMostOnce => &counters.delivered_at_most_once,
            },
            Sent::Gap => &counters.gap_notices,
            Sent::ContinuityLost(ContinuityReason::Retention) => {
                &counters.continuity_lost_retention
            }
            Sent::ContinuityLost(ContinuityReason::EpochChanged) => {
                &counters.continuity_lost_epoch_changed
            }
            Sent::ContinuityLost(ContinuityReason::AheadOfTop) => {
                &counters.continuity_lost_ahead_of_top
            }
            Sent::Other => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The wire form of what the machine sends: deliveries as the shared live bytes (or a
    /// hint), everything else as its frame.
    fn encode(&self, outbound: Outbound<Arc<LiveMessage>>) -> Outgoing {
        let echo = SubscribeEcho {
            req: self.req,
            guarantee: self.guarantee.as_str().to_owned(),
            hints: self.hints,
            filter: self.filter_source.clone(),
        };
        match subscription_frame(self.channel.as_str(), outbound, &echo) {
            Ok(frame) => Outgoing::Frame(frame),
            Err(live) if self.hints => Outgoing::Hint(live),
            Err(live) => Outgoing::Message(live),
        }
    }
}

/// What a sent frame counts as.
#[derive(Clone, Copy)]
enum Sent {
    Delivery,
    Gap,
    ContinuityLost(ContinuityReason),
    Other,
}

impl Sent {
    fn of(outbound: &Outbound<Arc<LiveMessage>>) -> Sent {
        match outbound {
            Outbound::Delivery(_) => Sent::Delivery,
            Outbound::Gap { .. } => Sent::Gap,
            Outbound::ContinuityLost { reason, .. } => Sent::ContinuityLost(*reason),
            Outbound::Subscribed { .. } | Outbound::Skip { .. } => Sent::Other,
        }
    }
}

/// A page of the log after `after` (on the blocking pool), as live messages for a machine;
/// `Err` when the store failed or its task died.
pub(crate) async fn read_page(
    store: &Arc<dyn herald_log::LogStore>,
    channel: &ChannelName,
    after: herald_core::Position,
    limit: usize,
) -> Result<Result<Page<Arc<LiveMessage>>, herald_core::ContinuityLost>, String> {
    let store = store.clone();
    let channel = channel.clone();
    let query = ReadQuery::Forward {
        from: herald_core::ReadFrom::After(after),
        limit,
    };
    let read = tokio::task::spawn_blocking(move || store.read(&channel, &query))
        .await
        .map_err(|error| format!("store task failed: {error}"))?;
    match read {
        Ok(page) => Ok(Ok(Page {
            messages: page
                .messages
                .into_iter()
                .map(|message| Arc::new(LiveMessage::new(message)))
                .collect(),
            skipped: page.skipped,
            more: page.more,
        })),
        Err(ReadError::ContinuityLost(lost)) => Ok(Err(lost)),
        Err(ReadError::Store(error)) => Err(error.to_string()),
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, End> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| End::Failed(format!("store task failed: {error}")))
}
