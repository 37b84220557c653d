//! One held durable subscriber's task: the driver of a
//! [`DurableMachine`](herald_core::engine::DurableMachine).
//!
//! The machine decides everything (placement, window, counts, redelivery, dead letters,
//! expiry, continuity); the pump only does the I/O it asks for, in order:
//! - log status and page reads on the blocking pool;
//! - snapshots with [`LogStore::save_subscriber`](herald_log::LogStore::save_subscriber),
//!   one in flight, answered when the group commit that carries it is durable;
//! - dead letters appended to `<channel>.dead` with a stable id (a repeat after a crash is
//!   deduplicated);
//! - frames handed to the [`DurableSink`] (a WebSocket connection or a webhook worker).
//!
//! It waits on: the snapshot in flight, the sink's [`Control`] inputs (acks, retry times), the
//! channel's live feed (only a wakeup: deliveries are always read from the log), the next
//! redelivery deadline, and eviction by a later claimant. Whatever ends it (the sink gone,
//! eviction, a failure), it closes the machine and waits for the last snapshot before the
//! claim is released, so a takeover always starts from the newest durable state.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use herald_core::engine::{
    AckRejected, AckTicket, DeadLetterReason, DurableAction, DurableMachine, DurableOutbound, Page,
    Start, dead_letter_channel, dead_letter_id,
};
use herald_core::{ChannelName, NewMessage, Position, SubscriberId, SubscriberOptions, Timestamp};
use herald_log::SaveTicket;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};

use super::registry::Eviction;
use super::{DurableContext, DurableCounters, LifecycleEvent, now};
use crate::hub::{LiveMessage, LiveReceiver, Registration};

/// The subscriber's side went away (connection closed, worker stopped).
#[derive(Debug)]
pub struct Gone;

/// Where a pump's frames go. Each method may wait (for room in a queue).
pub trait DurableSink: Send + 'static {
    fn deliver(
        &mut self,
        outbound: DurableOutbound<Arc<LiveMessage>>,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
    /// The acks of the request `req` are durable.
    fn acked(&mut self, req: u64) -> impl Future<Output = Result<(), Gone>> + Send;
    /// An ack was refused; nothing changed.
    fn ack_refused(
        &mut self,
        req: Option<u64>,
        rejected: AckRejected,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
    /// The pump ended for `end` (its last snapshot is durable, unless the store failed).
    fn ended(&mut self, end: PumpEnd) -> impl Future<Output = ()> + Send;
}

/// Inputs from the subscriber's side.
#[derive(Clone, Debug)]
pub enum Control {
    /// `through`: cumulative; otherwise this one serial.
    Ack {
        req: Option<u64>,
        through: bool,
        position: Position,
    },
    /// Deliver this unacked message again at `at` (a webhook's backoff).
    RetryAt { position: Position, at: Timestamp },
}

/// Why a pump stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PumpEnd {
    /// The sink is gone or its control channel closed.
    Gone,
    Evicted(Eviction),
    /// The store failed or the machine caught an inconsistency; the subscriber's last durable
    /// state stands.
    Failed(String),
}

/// What to hold and how a new subscriber is created.
#[derive(Clone, Debug)]
pub struct DurableRequest {
    pub channel: ChannelName,
    pub id: SubscriberId,
    /// For a new subscriber only; a stored one keeps its options.
    pub options: SubscriberOptions,
    /// Where a new subscriber starts.
    pub start: Start,
}

/// Claims the subscriber (evicting its current holder), then serves it until the sink goes,
/// it is evicted, or something fails. Spawn it: it runs as long as the subscription.
pub async fn run<S: DurableSink>(
    context: Arc<DurableContext>,
    request: DurableRequest,
    mut sink: S,
    mut control: mpsc::Receiver<Control>,
) {
    let mut claim = context
        .registry
        .claim(
            &request.channel,
            &request.id,
            Eviction::TakenOver,
            context.config.takeover_timeout,
        )
        .await;
    if claim.took_over {
        DurableCounters::add(&context.counters.takeovers, 1);
    }
    if !claim.fenced {
        tracing::warn!(
            channel = %request.channel,
            subscriber = %request.id,
            "the previous holder did not persist its last state within the takeover timeout; going ahead"
        );
    }
    let mut registration = Registration::new(
        context.hub.clone(),
        &request.channel,
        context.counters.subscriptions.clone(),
    );
    let store = context.store.clone();
    let (channel, id) = (request.channel.clone(), request.id.clone());
    let stored = tokio::task::spawn_blocking(move || store.subscriber(&channel, &id)).await;
    let machine = match stored {
        Ok(Some(state)) => DurableMachine::resume(state, context.page_messages, now()),
        Ok(None) => DurableMachine::create(
            request.channel.clone(),
            request.id.clone(),
            request.options,
            request.start.clone(),
            context.page_messages,
            now(),
        ),
        Err(error) => {
            sink.ended(PumpEnd::Failed(format!("store task failed: {error}")))
                .await;
            return;
        }
    };
    let recent = RecentFeed::new(context.page_messages * 2);
    let mut pump = Pump {
        recent,
        context,
        channel: request.channel,
        id: request.id,
        machine,
        sink,
        persist: None,
        confirmations: VecDeque::new(),
        evicted: claim.take_evicted(),
    };
    let end = match pump.serve(&mut control, registration.receiver()).await {
        Ok(()) => PumpEnd::Gone,
        Err(end) => end,
    };
    match &end {
        PumpEnd::Gone | PumpEnd::Evicted(_) => pump.close().await,
        // The machine may be waiting for the answer that failed; the last durable state
        // stands and the next holder starts from it.
        PumpEnd::Failed(reason) => {
            tracing::warn!(channel = %pump.channel, subscriber = %pump.id, %reason, "durable subscription failed");
            if let Some(ticket) = pump.persist.take() {
                let _ = ticket.await;
            }
        }
    }
    pump.sink.ended(end).await;
    drop(registration);
    // Released only now, after the last snapshot: a takeover waits for it.
    drop(claim);
}

struct Pump<S> {
    /// The newest live messages, to answer a caught-up pump's reads from memory.
    recent: RecentFeed,
    context: Arc<DurableContext>,
    channel: ChannelName,
    id: SubscriberId,
    machine: DurableMachine<Arc<LiveMessage>>,
    sink: S,
    /// The snapshot being made durable.
    persist: Option<SaveTicket>,
    /// Acks that asked for a confirmation, by ticket, oldest first.
    confirmations: VecDeque<(AckTicket, u64)>,
    evicted: oneshot::Receiver<Eviction>,
}

impl<S: DurableSink> Pump<S> {
    async fn serve(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        live: &mut LiveReceiver,
    ) -> Result<(), PumpEnd> {
        loop {
            self.drive().await?;
            let deadline = self.machine.next_deadline().map(|deadline| {
                let wait_ms = deadline.0.saturating_sub(now().0);
                tokio::time::Instant::now() + Duration::from_millis(wait_ms)
            });
            tokio::select! {
                biased;
                reason = &mut self.evicted => {
                    return Err(PumpEnd::Evicted(reason.unwrap_or(Eviction::TakenOver)));
                }
                result = async { self.persist.as_mut().expect("guarded").await },
                    if self.persist.is_some() =>
                {
                    self.persist = None;
                    match result {
                        Ok(()) => self.machine.handle_persisted(now()),
                        Err(error) => self.machine.handle_persist_failed(error.to_string()),
                    }
                }
                input = control.recv() => match input {
                    None => return Ok(()),
                    Some(input) => self.apply(input).await?,
                },
                received = live.recv() => match received {
                    Ok(message) => {
                        let position = message.message.position();
                        self.recent.push(message);
                        self.machine.handle_published(&position);
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.recent.clear();
                        self.woken_without_position();
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.machine.handle_tick(now());
                }
            }
        }
    }

    /// The live feed overflowed: the channel's top from the store's index stands in.
    fn woken_without_position(&mut self) {
        if let Ok(Some(status)) = self.context.store.channel_status(&self.channel) {
            self.machine.handle_published(&status.top);
        }
    }

    async fn apply(&mut self, input: Control) -> Result<(), PumpEnd> {
        match input {
            Control::Ack {
                req,
                through,
                position,
            } => {
                let result = if through {
                    self.machine.handle_ack_through(&position, now())
                } else {
                    self.machine.handle_ack_one(&position, now())
                };
                let counters = &self.context.counters;
                match result {
                    Ok(ticket) => {
                        DurableCounters::add(&counters.acks, 1);
                        if let Some(req) = req {
                            if self.machine.is_durable(ticket) {
                                self.sink.acked(req).await.map_err(|Gone| PumpEnd::Gone)?;
                            } else {
                                self.confirmations.push_back((ticket, req));
                            }
                        }
                    }
                    Err(rejected) => {
                        DurableCounters::add(&counters.acks_rejected, 1);
                        self.sink
                            .ack_refused(req, rejected)
                            .await
                            .map_err(|Gone| PumpEnd::Gone)?;
                    }
                }
            }
            Control::RetryAt { position, at } => {
                self.machine.handle_retry_at(&position, at);
            }
        }
        Ok(())
    }

    /// Performs the machine's actions until it waits for input.
    async fn drive(&mut self) -> Result<(), PumpEnd> {
        while let Some(action) = self.machine.poll_action() {
            match action {
                DurableAction::ReadStatus => {
                    let store = self.context.store.clone();
                    let channel = self.channel.clone();
                    let status = blocking(move || store.channel_status(&channel))
                        .await?
                        .map_err(|error| PumpEnd::Failed(error.to_string()))?;
                    self.machine.handle_status(status);
                }
                DurableAction::Read { after, limit } => {
                    let page = self.read(after, limit).await?;
                    self.machine.handle_page(page);
                }
                DurableAction::Persist(state) => {
                    debug_assert!(self.persist.is_none(), "one snapshot in flight");
                    DurableCounters::add(&self.context.counters.persists, 1);
                    self.persist = Some(self.context.store.save_subscriber(state));
                }
                DurableAction::Send(outbound) => self.send(outbound).await?,
                DurableAction::DeadLetter {
                    message,
                    deliveries,
                    reason,
                } => {
                    self.dead_letter(&message, deliveries, reason).await?;
                    self.machine.handle_dead_lettered();
                }
                DurableAction::AcksDurable(ticket) => {
                    while let Some((_, req)) = self
                        .confirmations
                        .front()
                        .filter(|(waiting, _)| *waiting <= ticket)
                        .copied()
                    {
                        self.confirmations.pop_front();
                        self.sink.acked(req).await.map_err(|Gone| PumpEnd::Gone)?;
                    }
                }
                DurableAction::Fail(reason) => return Err(PumpEnd::Failed(reason)),
            }
        }
        Ok(())
    }

    async fn read(
        &mut self,
        after: Position,
        limit: usize,
    ) -> Result<Result<Page<Arc<LiveMessage>>, herald_core::ContinuityLost>, PumpEnd> {
        if let Some(page) = self.recent.page(&after, limit, now()) {
            return Ok(Ok(page));
        }
        crate::live::read_page(&self.context.store, &self.channel, after, limit)
            .await
            .map_err(PumpEnd::Failed)
    }

    async fn send(&mut self, outbound: DurableOutbound<Arc<LiveMessage>>) -> Result<(), PumpEnd> {
        let counters = &self.context.counters;
        match &outbound {
            DurableOutbound::Delivery { delivery_count, .. } => {
                DurableCounters::add(&counters.deliveries, 1);
                if *delivery_count > 1 {
                    DurableCounters::add(&counters.redeliveries, 1);
                }
            }
            DurableOutbound::Expired { .. } => {
                DurableCounters::add(&counters.expired_notices, 1);
            }
            DurableOutbound::ContinuityLost { from, to, reason } => {
                DurableCounters::add(&counters.continuity_lost, 1);
                self.context.lifecycle(LifecycleEvent::ContinuityLost {
                    channel: self.channel.clone(),
                    subscriber: self.id.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    reason: *reason,
                });
            }
            DurableOutbound::Subscribed { .. } => {}
        }
        // A peer that stops reading must not keep an evicted subscriber from moving on.
        tokio::select! {
            biased;
            reason = &mut self.evicted => {
                Err(PumpEnd::Evicted(reason.unwrap_or(Eviction::TakenOver)))
            }
            sent = self.sink.deliver(outbound) => sent.map_err(|Gone| PumpEnd::Gone),
        }
    }

    /// Publishes the message to `<channel>.dead`, durably, with where it came from.
    async fn dead_letter(
        &mut self,
        message: &LiveMessage,
        deliveries: u32,
        reason: DeadLetterReason,
    ) -> Result<(), PumpEnd> {
        let message = &message.message;
        let dead_channel = dead_letter_channel(&self.channel).map_err(|error| {
            PumpEnd::Failed(format!(
                "no dead-letter channel for {}: {error}",
                self.channel
            ))
        })?;
        let position = message.position();
        let mut headers = message.headers.clone();
        for (key, value) in [
            ("herald-dead-letter-reason", reason.as_str().to_owned()),
            ("herald-original-channel", self.channel.to_string()),
            ("herald-original-position", position.to_string()),
            ("herald-original-id", message.id.to_string()),
            ("herald-subscriber-id", self.id.to_string()),
            ("herald-deliveries", deliveries.to_string()),
        ] {
            headers.insert(key.to_owned(), value);
        }
        let dead_letter = NewMessage {
            id: dead_letter_id(&self.id, &position),
            name: message.name.clone(),
            headers,
            data: message.data.clone(),
            ttl_ms: None,
        };
        self.context
            .store
            .append(dead_channel.clone(), vec![dead_letter])
            .await
            .map_err(|error| {
                PumpEnd::Failed(format!("dead letter to {dead_channel} failed: {error}"))
            })?;
        DurableCounters::add(&self.context.counters.dead_letters, 1);
        tracing::info!(
            channel = %self.channel,
            subscriber = %self.id,
            %position,
            deliveries,
            dead_letter_channel = %dead_channel,
            "message dead-lettered after max_deliveries"
        );
        Ok(())
    }

    /// Stops delivering and makes the last snapshot (with `last_active`) durable.
    async fn close(&mut self) {
        if self.machine.is_ended() {
            return;
        }
        if let Some(ticket) = self.persist.take() {
            match ticket.await {
                Ok(()) => self.machine.handle_persisted(now()),
                Err(error) => {
                    self.machine.handle_persist_failed(error.to_string());
                    return;
                }
            }
        }
        self.machine.handle_close(now());
        loop {
            while let Some(action) = self.machine.poll_action() {
                match action {
                    DurableAction::Persist(state) => {
                        DurableCounters::add(&self.context.counters.persists, 1);
                        self.persist = Some(self.context.store.save_subscriber(state));
                    }
                    DurableAction::Fail(_) => return,
                    // Nothing else is performed once closing: the connection is gone.
                    _ => {}
                }
            }
            if self.machine.is_closed() || self.machine.is_ended() {
                return;
            }
            let Some(ticket) = self.persist.take() else {
                return;
            };
            match ticket.await {
                Ok(()) => self.machine.handle_persisted(now()),
                Err(error) => {
                    self.machine.handle_persist_failed(error.to_string());
                    return;
                }
            }
        }
    }
}

/// The newest messages of the channel's live feed, consecutive serials of one epoch (a hole
/// or another epoch starts it over). A caught-up pump's next read is exactly what the feed
/// just brought, so it is answered from here: no log read, and the same `Arc` (whose frame
/// bytes are encoded once for every subscriber). Whatever is not here (a lagged feed, a
/// redelivery after a reconnect, a slow subscriber) is read from the log, which stays the
/// source of truth: these are the same durable messages.
struct RecentFeed {
    messages: VecDeque<Arc<LiveMessage>>,
    capacity: usize,
}

impl RecentFeed {
    fn new(capacity: usize) -> RecentFeed {
        RecentFeed {
            messages: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn push(&mut self, live: Arc<LiveMessage>) {
        let follows = self.messages.back().is_none_or(|last| {
            last.message.epoch == live.message.epoch
                && last.message.serial.next() == live.message.serial
        });
        if !follows {
            self.messages.clear();
        }
        self.messages.push_back(live);
        if self.messages.len() > self.capacity {
            self.messages.pop_front();
        }
    }

    fn clear(&mut self) {
        self.messages.clear();
    }

    /// Up to `limit` messages right after `after`, when the feed holds the next one; it stops
    /// before a message whose TTL ran out (the log read reports those).
    fn page(
        &self,
        after: &Position,
        limit: usize,
        now: Timestamp,
    ) -> Option<Page<Arc<LiveMessage>>> {
        let first = self.messages.front()?;
        if first.message.epoch != after.epoch || first.message.serial > after.serial.next() {
            return None;
        }
        let skip = usize::try_from(after.serial.0 - (first.message.serial.0 - 1)).ok()?;
        let live = |message: &&Arc<LiveMessage>| {
            message
                .message
                .expires_at()
                .is_none_or(|expires_at| expires_at > now)
        };
        let messages: Vec<_> = self
            .messages
            .iter()
            .skip(skip)
            .take(limit)
            .take_while(live)
            .cloned()
            .collect();
        if messages.is_empty() {
            return None;
        }
        let more = skip + messages.len() < self.messages.len();
        Some(Page {
            messages,
            skipped: Vec::new(),
            more,
        })
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PumpEnd> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| PumpEnd::Failed(format!("store task failed: {error}")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::body::Bytes;
    use herald_core::{ChainHash, Data, Epoch, Message, MessageId, Serial};

    use super::*;

    fn live(epoch: &str, serial: u64, ttl_ms: Option<u64>) -> Arc<LiveMessage> {
        let epoch = Epoch::parse(epoch).unwrap();
        Arc::new(LiveMessage::new(Message {
            channel: ChannelName::parse("jobs:a").unwrap(),
            epoch: epoch.clone(),
            serial: Serial(serial),
            id: MessageId::parse(&format!("m{serial}")).unwrap(),
            time: Timestamp(1_000),
            name: None,
            headers: BTreeMap::new(),
            data: Data::Json(Bytes::from_static(b"1")),
            ttl_ms,
            chain: ChainHash::genesis(&epoch),
        }))
    }

    fn serials(page: &Page<Arc<LiveMessage>>) -> Vec<u64> {
        page.messages.iter().map(|m| m.message.serial.0).collect()
    }

    fn after(epoch: &str, serial: u64) -> Position {
        Position::new(Epoch::parse(epoch).unwrap(), Serial(serial))
    }

    #[test]
    fn the_recent_feed_answers_only_reads_it_holds_from_the_next_serial() {
        let mut feed = RecentFeed::new(4);
        for serial in 3..=7 {
            feed.push(live("E1", serial, None));
        }
        // Capacity 4: 4..=7 are kept.
        assert!(
            feed.page(&after("E1", 2), 10, Timestamp(0)).is_none(),
            "3 is gone"
        );
        let page = feed.page(&after("E1", 3), 2, Timestamp(0)).unwrap();
        assert_eq!((serials(&page), page.more), (vec![4, 5], true));
        let page = feed.page(&after("E1", 5), 10, Timestamp(0)).unwrap();
        assert_eq!((serials(&page), page.more), (vec![6, 7], false));
        assert!(
            feed.page(&after("E1", 7), 10, Timestamp(0)).is_none(),
            "nothing after 7"
        );
        assert!(
            feed.page(&after("E2", 3), 10, Timestamp(0)).is_none(),
            "another epoch"
        );
        // A hole starts the feed over.
        feed.push(live("E1", 9, None));
        assert!(feed.page(&after("E1", 5), 10, Timestamp(0)).is_none());
        let page = feed.page(&after("E1", 8), 10, Timestamp(0)).unwrap();
        assert_eq!(serials(&page), vec![9]);
    }

    #[test]
    fn the_recent_feed_leaves_expired_messages_to_the_log() {
        let mut feed = RecentFeed::new(8);
        feed.push(live("E1", 1, None));
        feed.push(live("E1", 2, Some(1_000)));
        feed.push(live("E1", 3, None));
        let page = feed.page(&after("E1", 0), 10, Timestamp(2_500)).unwrap();
        assert_eq!((serials(&page), page.more), (vec![1], true));
        assert!(feed.page(&after("E1", 1), 10, Timestamp(2_500)).is_none());
        let page = feed.page(&after("E1", 0), 10, Timestamp(1_500)).unwrap();
        assert_eq!(serials(&page), vec![1, 2, 3]);
    }
}
