//! The simulated server: herald-core's [`SubscriptionMachine`] (the real decision logic of
//! every subscription) and herald-log's [`MemoryStore`] (with its fault injection), behind a
//! connection handler that speaks the real WebSocket frames, as JSON text.
//!
//! It plays the part of `herald-server`'s `ws.rs` (connect, subscribe validation, publish ->
//! append -> ack/nack), `hub.rs` (a bounded live ring per subscription that drops its oldest
//! message when full) and `live.rs` (the driver of the machine), with the same bounds: a
//! connection's outbound queue holds `outbound_frames`; a pump waiting on a full queue
//! (exactly-once) holds the one frame it could not send; at-most-once never waits.
//!
//! # Invariants
//! - Everything runs on the caller's thread and in the caller's order; the only source of
//!   choice is the [`rand::Rng`] the caller passes in.
//! - A subscription registers its ring before it reads anything from the store (L2).
//! - A publish is acknowledged only after `append` returned it; a crash forgets appends not
//!   yet made (never acknowledged) and every connection.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use herald_core::engine::{Action, Outbound, Page, Start, SubscriptionMachine};
use herald_core::{
    ChannelName, ErrorCode, Guarantee, Message, MessageId, NewMessage, Policies, Position, ReadFrom,
};
use herald_log::{
    AppendError, DurableListener, LogStore, ManualClock, MemoryStore, ReadError, ReadQuery,
    StoreHealth,
};
use herald_protocol::MessageBody;
use herald_protocol::ws::{
    Ack, AckTag, ClientFrame, Connected, ConnectedTag, ConnectionLimits, ErrorFrame, ErrorTag,
    Nack, NackTag, Pong, PongTag, ServerFrame, Subscribe, SubscribeEcho, Unsubscribed,
    UnsubscribedTag, delivery_json, subscription_frame,
};
use herald_server::error::ApiError;
use herald_server::filter::Filter;
use rand::Rng;

/// Sizes of the server's bounded buffers (kept small so that overflow happens often).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Live ring per subscription (the hub's broadcast ring).
    pub ring_messages: usize,
    /// A connection's outbound queue (`realtime.outbound_queue_frames`).
    pub outbound_frames: usize,
    /// Log page of a replay or catch-up (`realtime.catch_up_page_messages`).
    pub page_messages: usize,
    /// Longest delay between receiving a publish and appending it.
    pub append_delay_ms_max: u64,
}

/// A bug planted on purpose, to prove that the checker catches what it claims to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedBug {
    /// The `nth` exactly-once delivery the machine asks for (counting from 1) is silently not
    /// sent: a wrapper around the machine that loses one message.
    DropDelivery { nth: u64 },
    /// The `nth` `gap` notice (at-most-once) is silently not sent, as if it had been: a
    /// server that drops messages without saying so.
    DropGapNotice { nth: u64 },
}

/// Collects what the store made durable, for the live rings.
#[derive(Default)]
struct Tap(Mutex<Vec<Message>>);

impl DurableListener for Tap {
    fn on_durable(&self, messages: &[Message]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(messages);
    }
}

struct PendingAppend {
    due_ms: u64,
    connection: u64,
    req: u64,
    channel: ChannelName,
    message: NewMessage,
}

/// One subscription: its machine, its live ring and the frame it waits to send.
struct Pump {
    machine: SubscriptionMachine<Arc<Message>>,
    channel: ChannelName,
    req: Option<u64>,
    guarantee: Guarantee,
    filter_source: Option<String>,
    ring: VecDeque<Arc<Message>>,
    /// A frame that found the outbound queue full (exactly-once and notices wait).
    blocked: Option<String>,
    feed_idle_due: bool,
    ended: bool,
}

#[derive(Default)]
struct Connection {
    /// Replies of request handling (acks, errors): they wait for room like any sender.
    replies: VecDeque<String>,
    outbound: VecDeque<String>,
    subscriptions: BTreeMap<ChannelName, Pump>,
}

/// Counters of what the server did, for the run's summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    pub appends: u64,
    pub append_failures: u64,
    pub restarts: u64,
    pub wipes: u64,
    pub deliveries: u64,
    pub gaps: u64,
    pub continuity_lost: u64,
    pub skips: u64,
    pub catch_up_reads: u64,
}

pub struct Server {
    policies: Policies,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    tap: Arc<Tap>,
    options: ServerOptions,
    bug: Option<InjectedBug>,
    exactly_once_deliveries: u64,
    gap_notices: u64,
    connections: BTreeMap<u64, Connection>,
    pending_appends: VecDeque<PendingAppend>,
    generated_ids: u64,
    pub stats: ServerStats,
}

impl Server {
    pub fn new(
        policies: Policies,
        clock: Arc<ManualClock>,
        options: ServerOptions,
        bug: Option<InjectedBug>,
    ) -> Server {
        let store = Arc::new(MemoryStore::new(policies.clone(), clock.clone()));
        let tap = Arc::new(Tap::default());
        store.set_durable_listener(tap.clone());
        Server {
            policies,
            clock,
            store,
            tap,
            options,
            bug,
            exactly_once_deliveries: 0,
            gap_notices: 0,
            connections: BTreeMap::new(),
            pending_appends: VecDeque::new(),
            generated_ids: 0,
            stats: ServerStats::default(),
        }
    }

    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    pub fn open(&mut self, connection: u64) {
        self.connections.insert(connection, Connection::default());
    }

    /// The connection is gone (cut, or closed by the client): its pumps stop.
    pub fn close(&mut self, connection: u64) {
        self.connections.remove(&connection);
    }

    /// Crash and restart: the store is rebuilt from what was durable, every connection and
    /// every append not yet made is lost. Returns the connections that were open.
    pub fn crash_and_restart(&mut self) -> Vec<u64> {
        let recovered = self
            .store
            .crash_and_recover()
            .expect("the memory store's image always recovers");
        self.store = Arc::new(recovered);
        self.tap = Arc::new(Tap::default());
        self.store.set_durable_listener(self.tap.clone());
        self.pending_appends.clear();
        self.stats.restarts += 1;
        let open = self.connections.keys().copied().collect();
        self.connections.clear();
        open
    }

    /// The data is lost (a wiped data directory) and the server restarts empty: every
    /// channel starts a new epoch. Returns the connections that were open.
    pub fn wipe_and_restart(&mut self) -> Vec<u64> {
        self.store = Arc::new(MemoryStore::new(self.policies.clone(), self.clock.clone()));
        self.tap = Arc::new(Tap::default());
        self.store.set_durable_listener(self.tap.clone());
        self.pending_appends.clear();
        self.stats.wipes += 1;
        let open = self.connections.keys().copied().collect();
        self.connections.clear();
        open
    }

    /// The next append fails as a failed fsync would; the store refuses appends until a
    /// restart.
    pub fn fail_next_append(&self) {
        self.store.fail_next_append("injected fsync failure");
    }

    pub fn is_poisoned(&self) -> bool {
        matches!(self.store.health(), StoreHealth::Poisoned(_))
    }

    /// Handles one frame from a client.
    pub fn receive(&mut self, connection: u64, text: &str, now_ms: u64, rng: &mut impl Rng) {
        let Some(frame) = ClientFrame::from_json(text).ok() else {
            panic!("the simulated clients send only valid frames: {text}");
        };
        let reply = match frame {
            ClientFrame::Connect(_) => Some(ServerFrame::Connected(Connected {
                kind: ConnectedTag::Tag,
                protocol: 1,
                connection: format!("sim-{connection}"),
                heartbeat_ms: 15_000,
                limits: ConnectionLimits {
                    frame_bytes: 65_536,
                    subscriptions: 16,
                },
            })),
            ClientFrame::Subscribe(subscribe) => self.subscribe(connection, subscribe),
            ClientFrame::Ack(_) => {
                panic!("the simulated clients do not use at-least-once subscriptions: {text}")
            }
            ClientFrame::Unsubscribe(unsubscribe) => {
                let removed = ChannelName::parse(&unsubscribe.channel)
                    .ok()
                    .and_then(|name| {
                        self.connections
                            .get_mut(&connection)?
                            .subscriptions
                            .remove(&name)
                    });
                Some(match removed {
                    Some(_) => ServerFrame::Unsubscribed(Unsubscribed {
                        kind: UnsubscribedTag::Tag,
                        req: unsubscribe.req,
                        channel: unsubscribe.channel,
                    }),
                    None => error_frame(
                        unsubscribe.req,
                        Some(unsubscribe.channel.clone()),
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {:?}", unsubscribe.channel),
                        false,
                    ),
                })
            }
            ClientFrame::Publish(publish) => {
                let req = publish.req;
                let (channel, message) = publish.into_message();
                self.generated_ids += 1;
                let generated = self.generated_ids;
                let accepted = ChannelName::parse(&channel).and_then(|channel| {
                    let message = message.into_new_message(|| {
                        MessageId::parse(&format!("server-{generated}")).expect("valid id")
                    })?;
                    Ok((channel, message))
                });
                match accepted {
                    Ok((channel, message)) => {
                        let delay_ms = rng.random_range(0..=self.options.append_delay_ms_max);
                        self.pending_appends.push_back(PendingAppend {
                            due_ms: now_ms + delay_ms,
                            connection,
                            req,
                            channel,
                            message,
                        });
                        None
                    }
                    Err(invalid) => Some(nack(req, &ApiError::from(invalid))),
                }
            }
            ClientFrame::Ping(ping) => Some(ServerFrame::Pong(Pong {
                kind: PongTag::Tag,
                req: ping.req,
            })),
        };
        if let Some(reply) = reply
            && let Some(open) = self.connections.get_mut(&connection)
        {
            open.replies.push_back(reply.to_json());
        }
    }

    fn subscribe(&mut self, connection: u64, subscribe: Subscribe) -> Option<ServerFrame> {
        let req = subscribe.req;
        let channel_text = subscribe.channel.clone();
        let refuse = |code: ErrorCode, message: String| {
            Some(error_frame(
                req,
                Some(channel_text.clone()),
                code,
                message,
                false,
            ))
        };
        let channel = match ChannelName::parse(&subscribe.channel) {
            Ok(channel) => channel,
            Err(invalid) => return refuse(invalid.code, invalid.message),
        };
        let open = self.connections.get_mut(&connection)?;
        // A pump that ended no longer holds its channel.
        open.subscriptions.retain(|_, pump| !pump.ended);
        if open.subscriptions.contains_key(&channel) {
            return refuse(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel}"),
            );
        }
        let guarantee = match subscribe.guarantee.as_deref().map(Guarantee::parse) {
            None => Guarantee::ExactlyOnce,
            Some(Ok(guarantee)) => guarantee,
            Some(Err(invalid)) => return refuse(invalid.code, invalid.message),
        };
        let start = match (&subscribe.from, subscribe.rewind) {
            (Some(from), None) => match Position::parse(from) {
                Ok(position) => Start::After(position),
                Err(invalid) => return refuse(invalid.code, invalid.message),
            },
            (None, Some(count)) => Start::Rewind(count),
            (None, None) => Start::Live,
            (Some(_), Some(_)) => {
                return refuse(ErrorCode::InvalidRequest, "from and rewind".into());
            }
        };
        if guarantee == Guarantee::AtMostOnce && start != Start::Live {
            return refuse(
                ErrorCode::InvalidRequest,
                "at-most-once is live only".into(),
            );
        }
        let filter = match subscribe
            .filter
            .as_deref()
            .map(|text| Filter::compile(text, 4096))
        {
            None => None,
            Some(Ok(filter)) => Some(filter),
            Some(Err(invalid)) => return refuse(invalid.code, invalid.message),
        };
        let machine_filter = filter.clone().map(|filter| {
            Box::new(move |message: &Message| {
                filter.matches(message.name.as_deref(), &message.headers)
            }) as herald_core::engine::Filter
        });
        open.subscriptions.insert(
            channel.clone(),
            Pump {
                machine: SubscriptionMachine::new(
                    guarantee,
                    start,
                    self.options.page_messages,
                    machine_filter,
                ),
                channel,
                req,
                guarantee,
                filter_source: filter.map(|filter| filter.source().to_owned()),
                ring: VecDeque::new(),
                blocked: None,
                feed_idle_due: false,
                ended: false,
            },
        );
        None
    }

    /// One scheduling round: due appends, then every connection's replies and pumps, each
    /// pump getting a random budget of actions.
    pub fn step(&mut self, now_ms: u64, rng: &mut impl Rng) {
        while self
            .pending_appends
            .front()
            .is_some_and(|append| append.due_ms <= now_ms)
        {
            let append = self.pending_appends.pop_front().expect("checked");
            self.append(append);
        }
        let capacity = self.options.outbound_frames;
        for open in self.connections.values_mut() {
            while open.outbound.len() < capacity
                && let Some(reply) = open.replies.pop_front()
            {
                open.outbound.push_back(reply);
            }
            for pump in open.subscriptions.values_mut() {
                let budget = rng.random_range(1..=8);
                step_pump(
                    pump,
                    &mut open.outbound,
                    capacity,
                    self.store.as_ref(),
                    budget,
                    &mut Counting {
                        bug: self.bug,
                        exactly_once_deliveries: &mut self.exactly_once_deliveries,
                        gap_notices: &mut self.gap_notices,
                        stats: &mut self.stats,
                    },
                );
            }
        }
    }

    fn append(&mut self, append: PendingAppend) {
        let result = self
            .store
            .append(append.channel.clone(), vec![append.message])
            .wait();
        let reply = match result {
            Ok(appended) => {
                self.stats.appends += 1;
                let appended = appended.into_iter().next().expect("one reply per message");
                ServerFrame::Ack(Ack {
                    kind: AckTag::Tag,
                    req: append.req,
                    id: appended.id.to_string(),
                    serial: appended.position.serial.0,
                    epoch: appended.position.epoch.to_string(),
                    position: appended.position.to_string(),
                    duplicate: appended.duplicate,
                })
            }
            Err(error) => {
                self.stats.append_failures += 1;
                if !matches!(error, AppendError::Poisoned(_)) {
                    panic!("the simulation only publishes valid messages: {error}");
                }
                nack(append.req, &ApiError::from(error))
            }
        };
        if let Some(open) = self.connections.get_mut(&append.connection) {
            open.replies.push_back(reply.to_json());
        }
        let durable =
            std::mem::take(&mut *self.tap.0.lock().unwrap_or_else(PoisonError::into_inner));
        for message in durable {
            let message = Arc::new(message);
            for open in self.connections.values_mut() {
                if let Some(pump) = open.subscriptions.get_mut(&message.channel)
                    && !pump.ended
                {
                    if pump.ring.len() == self.options.ring_messages {
                        // The ring overflowed: the receiver lags and sees the jump.
                        pump.ring.pop_front();
                    }
                    pump.ring.push_back(message.clone());
                }
            }
        }
    }

    /// Up to `frames_max` frames of the connection's outbound queue, for the network.
    pub fn take_outbound(&mut self, connection: u64, frames_max: usize) -> Vec<String> {
        let Some(open) = self.connections.get_mut(&connection) else {
            return Vec::new();
        };
        let count = frames_max.min(open.outbound.len());
        open.outbound.drain(..count).collect()
    }

    /// Nothing left to do: no append pending, every queue empty, every pump idle.
    pub fn is_quiet(&self) -> bool {
        self.pending_appends.is_empty()
            && self.connections.values().all(|open| {
                open.replies.is_empty()
                    && open.outbound.is_empty()
                    && open.subscriptions.values().all(|pump| {
                        pump.blocked.is_none()
                            && (pump.ended
                                || (pump.machine.is_idle()
                                    && pump.ring.is_empty()
                                    && !pump.machine.wants_room()
                                    && !pump.feed_idle_due))
                    })
            })
    }
}

struct Counting<'a> {
    bug: Option<InjectedBug>,
    exactly_once_deliveries: &'a mut u64,
    gap_notices: &'a mut u64,
    stats: &'a mut ServerStats,
}

/// Runs up to `budget` of a pump's actions: the sans-IO machine's driver, as `live.rs` is.
fn step_pump(
    pump: &mut Pump,
    outbound: &mut VecDeque<String>,
    capacity: usize,
    store: &MemoryStore,
    budget: usize,
    counting: &mut Counting<'_>,
) {
    for _ in 0..budget {
        if let Some(frame) = pump.blocked.take() {
            if outbound.len() >= capacity {
                pump.blocked = Some(frame);
                return;
            }
            outbound.push_back(frame);
        }
        if pump.ended {
            return;
        }
        let Some(action) = pump.machine.poll_action() else {
            if pump.machine.wants_room() {
                if outbound.len() >= capacity {
                    return;
                }
                pump.machine.handle_room();
                continue;
            }
            if !pump.machine.is_idle() {
                return;
            }
            if let Some(live) = pump.ring.pop_front() {
                pump.machine.handle_live(live);
                pump.feed_idle_due = true;
                continue;
            }
            if pump.feed_idle_due {
                pump.feed_idle_due = false;
                pump.machine.handle_feed_idle();
                continue;
            }
            return;
        };
        match action {
            Action::ReadStatus => {
                let status = store
                    .channel_status(&pump.channel)
                    .expect("the memory store's status never fails");
                pump.machine.handle_status(status);
            }
            Action::Read { after, limit } => {
                counting.stats.catch_up_reads += 1;
                let query = ReadQuery::Forward {
                    from: ReadFrom::After(after),
                    limit,
                };
                match store.read(&pump.channel, &query) {
                    Ok(page) => pump.machine.handle_page(Ok(Page {
                        messages: page.messages.into_iter().map(Arc::new).collect(),
                        skipped: page.skipped,
                        more: page.more,
                    })),
                    Err(ReadError::ContinuityLost(lost)) => pump.machine.handle_page(Err(lost)),
                    Err(ReadError::Store(error)) => {
                        end(pump, error.to_string());
                    }
                }
            }
            Action::Send(item) => {
                if matches!(item, Outbound::Delivery(_)) && pump.guarantee == Guarantee::ExactlyOnce
                {
                    *counting.exactly_once_deliveries += 1;
                    if let Some(InjectedBug::DropDelivery { nth }) = counting.bug
                        && *counting.exactly_once_deliveries == nth
                    {
                        continue;
                    }
                }
                count(counting.stats, &item);
                let frame = encode(pump, item);
                if outbound.len() < capacity {
                    outbound.push_back(frame);
                } else {
                    pump.blocked = Some(frame);
                }
            }
            Action::TrySend(item) => {
                let room = outbound.len() < capacity;
                if room && matches!(item, Outbound::Gap { .. }) {
                    *counting.gap_notices += 1;
                    if let Some(InjectedBug::DropGapNotice { nth }) = counting.bug
                        && *counting.gap_notices == nth
                    {
                        pump.machine.handle_try_send(true);
                        continue;
                    }
                }
                if room {
                    count(counting.stats, &item);
                    outbound.push_back(encode(pump, item));
                }
                pump.machine.handle_try_send(room);
            }
            Action::Fail(reason) => end(pump, reason),
        }
    }
}

/// Ends a subscription with a retryable `storage_failed` error, as `live.rs` does.
fn end(pump: &mut Pump, message: String) {
    pump.ended = true;
    let frame = error_frame(
        None,
        Some(pump.channel.to_string()),
        ErrorCode::StorageFailed,
        message,
        true,
    );
    pump.blocked = Some(frame.to_json());
}

fn count(stats: &mut ServerStats, item: &Outbound<Arc<Message>>) {
    match item {
        Outbound::Delivery(_) => stats.deliveries += 1,
        Outbound::Gap { .. } => stats.gaps += 1,
        Outbound::ContinuityLost { .. } => stats.continuity_lost += 1,
        Outbound::Skip { .. } => stats.skips += 1,
        Outbound::Subscribed { .. } => {}
    }
}

/// The wire frame of what the machine sends (the same mapping `live.rs` uses).
fn encode(pump: &Pump, item: Outbound<Arc<Message>>) -> String {
    let echo = SubscribeEcho {
        req: pump.req,
        guarantee: pump.guarantee.as_str().to_owned(),
        hints: false,
        filter: pump.filter_source.clone(),
    };
    match subscription_frame(pump.channel.as_str(), item, &echo) {
        Ok(frame) => frame.to_json(),
        Err(message) => delivery_json(&MessageBody::from_message(&message)),
    }
}

fn error_frame(
    req: Option<u64>,
    channel: Option<String>,
    code: ErrorCode,
    message: String,
    retryable: bool,
) -> ServerFrame {
    ServerFrame::Error(ErrorFrame {
        kind: ErrorTag::Tag,
        req,
        channel,
        code: code.as_str().to_owned(),
        message,
        retryable,
    })
}

fn nack(req: u64, error: &ApiError) -> ServerFrame {
    let detail = &error.0.error;
    ServerFrame::Nack(Nack {
        kind: NackTag::Tag,
        req,
        code: detail.code.clone(),
        message: detail.message.clone(),
        retryable: detail.retryable,
    })
}
