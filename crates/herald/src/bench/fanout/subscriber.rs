//! WebSocket subscribers: raw tokio-tungstenite clients that connect, subscribe to one channel
//! and count what arrives, checking serial order as they go.
//!
//! A subscriber reads `message` frames with a scanner ([`scan_number`]) rather than a JSON
//! parser: the bench shares two cores with the server, and every microsecond the client spends
//! per delivery is one the server does not get. The scanner is exact for the frames this bench
//! causes: in JSON text an unescaped `"` always delimits a string, so `"serial":` can only be the
//! key `serial`, and the only objects in a delivery with that key are the top-level message
//! (the bench's data carries `sent_us` and `pad`, and it sends no headers). Every other frame
//! (notices, heartbeats, errors) is decoded with herald-protocol's own types.
//!
//! At-least-once subscribers ack as they read (see the `fanout` module docs): a cumulative ack
//! through the last serial received after every `ack_every` deliveries, and whenever the
//! socket has nothing more buffered, so the ack cadence follows the read bursts.
//!
//! # Invariants
//! - Each subscriber's counters are written by its own task only and read by the controller and
//!   the publishers, so they are plain relaxed atomics.
//! - Latency samples per subscriber are capped ([`Sampling::per_subscriber_max`]); the task
//!   count is the subscriber count; every wait (connect, handshake, close) has a timeout.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use futures_util::{FutureExt, SinkExt, StreamExt};
use herald_protocol::ws::{
    self, ClientFrame, Connect, ConnectTag, DurableOptions, ServerFrame, Subscribe, SubscribeTag,
};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::*;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Handshakes (TCP + upgrade + connect + subscribe) in flight at once, so that opening a
/// thousand subscribers does not overrun the server's accept backlog.
const CONNECTS_IN_FLIGHT_MAX: usize = 64;
/// One subscriber's whole handshake, from TCP connect to the `subscribed` reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the subscribers get to close cleanly before their tasks are aborted.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Client read buffer: deliveries are small, and a thousand connections at tungstenite's
/// default (128 KiB, allocated eagerly) would cost the client memory for nothing.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// The request id of the one `subscribe` each subscriber sends.
const SUBSCRIBE_REQ: u64 = 1;
/// The key of the publish time the bench puts in each message's data.
pub(crate) const SENT_US_KEY: &str = "\"sent_us\":";
pub(crate) const SERIAL_KEY: &str = "\"serial\":";
/// Every `message` frame starts so (herald-protocol's `delivery_json`).
pub(crate) const MESSAGE_PREFIX: &str = "{\"type\":\"message\",";
/// An at-least-once delivery continues so (`with_delivery_count` splices the count in first).
pub(crate) const DELIVERY_KEY: &str = "\"delivery\":";
pub(crate) const EPOCH_KEY: &str = "\"epoch\":\"";

/// Where the server is and how to authenticate.
pub(crate) struct Endpoint {
    /// `http://host:port`, no trailing slash.
    pub(crate) http_url: String,
    /// `ws://host:port/v1/ws`.
    pub(crate) ws_url: String,
    pub(crate) key: Option<String>,
}

impl Endpoint {
    pub(crate) fn new(http_url: &str, key: Option<String>) -> anyhow::Result<Endpoint> {
        let http_url = http_url.trim_end_matches('/').to_owned();
        let Some(rest) = http_url.strip_prefix("http://") else {
            bail!("the URL {http_url:?} must start with http:// (this bench speaks plain ws://)");
        };
        Ok(Endpoint {
            ws_url: format!("ws://{rest}/v1/ws"),
            http_url,
            key,
        })
    }

    pub(crate) fn messages_url(&self, channel: &str) -> String {
        format!("{}/v1/channels/{channel}/messages", self.http_url)
    }
}

/// Which deliveries record a publish-to-deliver latency. Shared by all subscribers and set by
/// the controller between phases.
pub(crate) struct Sampling {
    /// Record only messages published at or after this time (µs since the Unix epoch);
    /// `u64::MAX` records nothing.
    pub(crate) from_us: AtomicU64,
    /// Record serials that are a multiple of this (0: record nothing), so the sample count stays
    /// bounded and every subscriber samples the same messages.
    pub(crate) every: AtomicU64,
    pub(crate) per_subscriber_max: AtomicUsize,
}

impl Sampling {
    pub(crate) fn off() -> Sampling {
        Sampling {
            from_us: AtomicU64::new(u64::MAX),
            every: AtomicU64::new(0),
            per_subscriber_max: AtomicUsize::new(0),
        }
    }
}

/// What one subscriber saw. Written by its task only.
#[derive(Default)]
pub(crate) struct SubscriberState {
    /// `message` frames received.
    pub(crate) delivered: AtomicU64,
    /// The highest serial received (or skipped over by a `skip` notice).
    pub(crate) last_serial: AtomicU64,
    /// Serials accounted for: each delivery of a serial above every one received before, and
    /// each serial a `skip` notice passes over. Each serial counts once, so the serials of a
    /// range minus this tells what never arrived.
    pub(crate) new_serials: AtomicU64,
    /// Deliveries out of contract: for exactly-once any serial that is not the next one; for
    /// at-most-once a serial at or below one already received (a duplicate or a reordering).
    pub(crate) violations: AtomicU64,
    pub(crate) gap_notices: AtomicU64,
    /// Frames this bench does not expect (`continuity_lost`, `error`, undecodable ones).
    pub(crate) unexpected_frames: AtomicU64,
    /// At-least-once: deliveries with a count above 1.
    pub(crate) redeliveries: AtomicU64,
    /// At-least-once: `ack` frames sent.
    pub(crate) ack_frames: AtomicU64,
    /// At-least-once: serials those acks newly covered.
    pub(crate) serials_acked: AtomicU64,
    /// At-least-once: `acked` replies (the ack of that request is durable).
    pub(crate) acks_confirmed: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    /// The first thing that went wrong: an unexpected frame, or why the connection ended.
    failure: Mutex<Option<String>>,
}

impl SubscriberState {
    fn fail(&self, reason: String) {
        let mut failure = self.failure.lock().expect("failure lock");
        if failure.is_none() {
            *failure = Some(reason);
        }
    }
}

/// Sums over a group, taken at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupTotals {
    pub(crate) delivered: u64,
    pub(crate) new_serials: u64,
    pub(crate) violations: u64,
    pub(crate) gap_notices: u64,
    pub(crate) unexpected_frames: u64,
    pub(crate) redeliveries: u64,
    pub(crate) ack_frames: u64,
    pub(crate) serials_acked: u64,
    pub(crate) acks_confirmed: u64,
}

impl GroupTotals {
    pub(crate) fn since(self, earlier: GroupTotals) -> GroupTotals {
        GroupTotals {
            delivered: self.delivered - earlier.delivered,
            new_serials: self.new_serials - earlier.new_serials,
            violations: self.violations - earlier.violations,
            gap_notices: self.gap_notices - earlier.gap_notices,
            unexpected_frames: self.unexpected_frames - earlier.unexpected_frames,
            redeliveries: self.redeliveries - earlier.redeliveries,
            ack_frames: self.ack_frames - earlier.ack_frames,
            serials_acked: self.serials_acked - earlier.serials_acked,
            acks_confirmed: self.acks_confirmed - earlier.acks_confirmed,
        }
    }
}

/// N subscribers on one channel, each a task reading its own connection.
pub(crate) struct SubscriberGroup {
    pub(crate) states: Arc<Vec<Arc<SubscriberState>>>,
    /// The channel's newest serial when the subscribers joined (0 for a new channel): the
    /// first delivery each expects is the one after it.
    pub(crate) base_serial: u64,
    tasks: tokio::task::JoinSet<()>,
    stop: watch::Sender<bool>,
}

impl SubscriberGroup {
    /// Opens `count` subscribers on `channel`, at most [`CONNECTS_IN_FLIGHT_MAX`] handshakes at
    /// a time. Fails (closing those already open) if any cannot connect or subscribe.
    /// At-least-once subscriber i is `bench-<i>`, subscribed and acking by `acking`.
    pub(crate) async fn open(
        endpoint: &Arc<Endpoint>,
        channel: &str,
        guarantee: Guarantee,
        acking: Acking,
        count: usize,
        sampling: &Arc<Sampling>,
    ) -> anyhow::Result<SubscriberGroup> {
        let (stop, stop_receiver) = watch::channel(false);
        let handshakes = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT_MAX));
        // Each task reports once, so `count` slots never block a sender.
        let (ready_sender, mut ready) = mpsc::channel::<Result<u64, String>>(count.max(1));
        let mut states = Vec::with_capacity(count);
        let mut tasks = tokio::task::JoinSet::new();
        let channel: Arc<str> = Arc::from(channel);
        for index in 0..count {
            let state = Arc::new(SubscriberState::default());
            states.push(Arc::clone(&state));
            let endpoint = Arc::clone(endpoint);
            let channel = Arc::clone(&channel);
            let handshakes = Arc::clone(&handshakes);
            let ready_sender = ready_sender.clone();
            let sampling = Arc::clone(sampling);
            let stop = stop_receiver.clone();
            tasks.spawn(async move {
                let opened = {
                    let Ok(_permit) = handshakes.acquire().await else {
                        return;
                    };
                    let subscriber = Subscriber {
                        channel: &channel,
                        guarantee,
                        acking,
                        index,
                    };
                    tokio::time::timeout(CONNECT_TIMEOUT, open_one(&endpoint, &subscriber))
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("no answer within {CONNECT_TIMEOUT:?}")))
                };
                match opened {
                    Ok((socket, after)) => {
                        let _ = ready_sender.send(Ok(after)).await;
                        // Released now, so the opener sees the channel close if a task dies.
                        drop(ready_sender);
                        let subscriber = Subscriber {
                            channel: &channel,
                            guarantee,
                            acking,
                            index,
                        };
                        read_deliveries(socket, &state, &sampling, &subscriber, after, stop).await;
                    }
                    Err(error) => {
                        let _ = ready_sender
                            .send(Err(format!("subscriber {index}: {error:#}")))
                            .await;
                    }
                }
            });
        }
        drop(ready_sender);
        let mut group = SubscriberGroup {
            states: Arc::new(states),
            base_serial: 0,
            tasks,
            stop,
        };
        let mut afters = BTreeMap::<u64, usize>::new();
        for _ in 0..count {
            match ready.recv().await {
                Some(Ok(after)) => *afters.entry(after).or_default() += 1,
                Some(Err(error)) => {
                    group.close().await;
                    bail!("opening {count} subscribers on {channel}: {error}");
                }
                None => {
                    group.close().await;
                    bail!("opening {count} subscribers on {channel}: a subscriber task ended");
                }
            }
        }
        // Nothing is published while the group opens, so every subscriber starts at the same
        // serial; if not, the larger one is the conservative base for the lag bound.
        group.base_serial = afters.keys().next_back().copied().unwrap_or(0);
        Ok(group)
    }

    pub(crate) fn totals(&self) -> GroupTotals {
        let mut totals = GroupTotals::default();
        for state in self.states.iter() {
            totals.delivered += state.delivered.load(Ordering::Relaxed);
            totals.new_serials += state.new_serials.load(Ordering::Relaxed);
            totals.violations += state.violations.load(Ordering::Relaxed);
            totals.gap_notices += state.gap_notices.load(Ordering::Relaxed);
            totals.unexpected_frames += state.unexpected_frames.load(Ordering::Relaxed);
            totals.redeliveries += state.redeliveries.load(Ordering::Relaxed);
            totals.ack_frames += state.ack_frames.load(Ordering::Relaxed);
            totals.serials_acked += state.serials_acked.load(Ordering::Relaxed);
            totals.acks_confirmed += state.acks_confirmed.load(Ordering::Relaxed);
        }
        totals
    }

    /// Whether every subscriber has received `serial` or a later one.
    pub(crate) fn all_reached(&self, serial: u64) -> bool {
        min_last_serial(&self.states) >= serial
    }

    /// Every subscriber's latency samples, emptied.
    pub(crate) fn take_latencies(&self) -> Vec<u64> {
        let mut all = Vec::new();
        for state in self.states.iter() {
            all.append(&mut state.latencies_us.lock().expect("latency lock"));
        }
        all
    }

    /// The first failures of the group (at most `max`), with how many subscribers failed.
    pub(crate) fn failures(&self, max: usize) -> (usize, Vec<String>) {
        let failures: Vec<String> = self
            .states
            .iter()
            .filter_map(|state| state.failure.lock().expect("failure lock").clone())
            .collect();
        let failed = failures.len();
        (failed, failures.into_iter().take(max).collect())
    }

    /// Asks every subscriber to close its connection, waits for them (bounded), aborts the rest.
    pub(crate) async fn close(&mut self) {
        let _ = self.stop.send(true);
        let joined = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            self.tasks.shutdown().await;
        }
    }
}

/// The smallest serial every subscriber has reached.
pub(crate) fn min_last_serial(states: &[Arc<SubscriberState>]) -> u64 {
    states
        .iter()
        .map(|state| state.last_serial.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0)
}

/// Who one subscriber is.
struct Subscriber<'a> {
    channel: &'a str,
    guarantee: Guarantee,
    acking: Acking,
    /// Its place in the group: at-least-once subscriber `bench-<index>`.
    index: usize,
}

/// TCP connect, WebSocket upgrade, `connect` -> `connected`, `subscribe` -> `subscribed`.
/// Returns the socket and the serial deliveries start after.
async fn open_one(
    endpoint: &Endpoint,
    subscriber: &Subscriber<'_>,
) -> anyhow::Result<(Socket, u64)> {
    let Subscriber {
        channel, guarantee, ..
    } = *subscriber;
    let mut request = endpoint.ws_url.as_str().into_client_request()?;
    if let Some(key) = &endpoint.key {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}"))
                .context("the API key is not a valid header value")?,
        );
    }
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .with_context(|| format!("WebSocket upgrade at {}", endpoint.ws_url))?;
    let connect = ClientFrame::Connect(Connect {
        kind: ConnectTag::Tag,
        protocol: ws::PROTOCOL_VERSION,
        // The key already went in the upgrade request.
        auth: None,
        client: Some(format!("herald-bench/{}", env!("CARGO_PKG_VERSION"))),
    });
    socket.send(Message::text(connect.to_json())).await?;
    next_control_frame(&mut socket, |frame| match frame {
        ServerFrame::Connected(_) => Some(()),
        _ => None,
    })
    .await
    .context("waiting for `connected`")?;
    let durable = guarantee == Guarantee::AtLeastOnce;
    let subscribe = ClientFrame::Subscribe(Subscribe {
        kind: SubscribeTag::Tag,
        req: Some(SUBSCRIBE_REQ),
        channel: channel.to_owned(),
        guarantee: Some(guarantee.as_str().to_owned()),
        subscriber_id: durable.then(|| format!("bench-{}", subscriber.index)),
        options: durable.then(|| DurableOptions {
            inflight_max: Some(u32::try_from(subscriber.acking.inflight_max).unwrap_or(u32::MAX)),
            ..DurableOptions::default()
        }),
        ..Subscribe::default()
    });
    socket.send(Message::text(subscribe.to_json())).await?;
    let subscribed = next_control_frame(&mut socket, |frame| match frame {
        ServerFrame::Subscribed(subscribed) if subscribed.req == Some(SUBSCRIBE_REQ) => {
            Some(subscribed)
        }
        _ => None,
    })
    .await
    .context("waiting for `subscribed`")?;
    if subscribed.guarantee != guarantee.as_str() {
        bail!(
            "asked for {guarantee}, the server granted {}",
            subscribed.guarantee
        );
    }
    let after = match subscribed.after.as_deref().or(subscribed.top.as_deref()) {
        Some(position) => position_serial(position)
            .ok_or_else(|| anyhow!("`subscribed` carries a bad position {position:?}"))?,
        None => 0,
    };
    Ok((socket, after))
}

/// Reads frames until `wanted` picks one; heartbeats and pongs pass, an `error` frame, a close
/// or anything else fails.
async fn next_control_frame<T>(
    socket: &mut Socket,
    wanted: impl Fn(ServerFrame) -> Option<T>,
) -> anyhow::Result<T> {
    loop {
        let text = match socket.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                bail!("the server closed: {}", describe_close(frame))
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(error.into()),
            None => bail!("the connection ended"),
        };
        let frame = ServerFrame::from_json(text.as_str())
            .with_context(|| format!("undecodable frame {}", clip(text.as_str())))?;
        match frame {
            ServerFrame::Heartbeat(_) | ServerFrame::Pong(_) => continue,
            ServerFrame::Error(error) => bail!("error {}: {}", error.code, error.message),
            other => match wanted(other) {
                Some(value) => return Ok(value),
                None => bail!("unexpected frame {}", clip(text.as_str())),
            },
        }
    }
}

/// The subscriber's loop: count and check every delivery (at-least-once: and ack it) until
/// told to stop or the connection ends.
async fn read_deliveries(
    mut socket: Socket,
    state: &SubscriberState,
    sampling: &Sampling,
    subscriber: &Subscriber<'_>,
    after: u64,
    mut stop: watch::Receiver<bool>,
) {
    let guarantee = subscriber.guarantee;
    let mut expected = after + 1;
    let mut last_serial = after;
    state.last_serial.store(after, Ordering::Relaxed);
    let mut acker = (guarantee == Guarantee::AtLeastOnce)
        .then(|| Acker::new(subscriber.channel, subscriber.acking.ack_every, after));
    loop {
        let next = match &mut acker {
            None => tokio::select! {
                biased;
                _ = stop.changed() => break,
                next = socket.next() => next,
            },
            // A frame already buffered is read without waiting (and without looking at `stop`:
            // the group is only stopped once publishing has, so a burst ends soon). When none
            // is, the read burst ended: ack what arrived before waiting for more.
            Some(acker) => match socket.next().now_or_never() {
                Some(next) => next,
                None => {
                    if let Err(error) = acker.send(&mut socket, state).await {
                        state.fail(format!("sending an ack: {error}"));
                        return;
                    }
                    tokio::select! {
                        biased;
                        _ = stop.changed() => break,
                        next = socket.next() => next,
                    }
                }
            },
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                state.fail(format!("the server closed: {}", describe_close(frame)));
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                state.fail(format!("connection error: {error}"));
                return;
            }
            None => {
                state.fail("the connection ended".to_owned());
                return;
            }
        };
        let text = text.as_str();
        if let Some(body) = text.strip_prefix(MESSAGE_PREFIX)
            && let Some(serial) = scan_number(body, SERIAL_KEY)
        {
            state.delivered.fetch_add(1, Ordering::Relaxed);
            let in_contract = match guarantee {
                Guarantee::ExactlyOnce => serial == expected,
                Guarantee::AtMostOnce => serial >= expected,
                // In order; a serial seen before only as a counted redelivery.
                Guarantee::AtLeastOnce => {
                    let count = if body.starts_with(DELIVERY_KEY) {
                        scan_number(body, DELIVERY_KEY).unwrap_or(0)
                    } else {
                        0
                    };
                    if count > 1 {
                        state.redeliveries.fetch_add(1, Ordering::Relaxed);
                    }
                    serial == expected || (count > 1 && serial < expected)
                }
            };
            if !in_contract {
                state.violations.fetch_add(1, Ordering::Relaxed);
            }
            if serial >= expected {
                state.new_serials.fetch_add(1, Ordering::Relaxed);
            }
            expected = expected.max(serial + 1);
            if serial > last_serial {
                last_serial = serial;
                state.last_serial.store(serial, Ordering::Relaxed);
            }
            record_latency(state, sampling, serial, text);
            if let Some(acker) = &mut acker
                && acker.received(serial, body)
                && let Err(error) = acker.send(&mut socket, state).await
            {
                state.fail(format!("sending an ack: {error}"));
                return;
            }
            continue;
        }
        match ServerFrame::from_json(text) {
            Ok(ServerFrame::Heartbeat(_) | ServerFrame::Pong(_)) => {}
            Ok(ServerFrame::Gap(_)) => {
                state.gap_notices.fetch_add(1, Ordering::Relaxed);
            }
            Ok(ServerFrame::Acked(_)) if acker.is_some() => {
                state.acks_confirmed.fetch_add(1, Ordering::Relaxed);
            }
            // Nothing was lost: the serials up to `to` are accounted for.
            Ok(ServerFrame::Skip(notice)) => {
                if let Some(to) = position_serial(&notice.to) {
                    if to >= expected {
                        state
                            .new_serials
                            .fetch_add(to - expected + 1, Ordering::Relaxed);
                    }
                    expected = expected.max(to + 1);
                    if to > last_serial {
                        last_serial = to;
                        state.last_serial.store(to, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                state.unexpected_frames.fetch_add(1, Ordering::Relaxed);
                state.fail(format!("unexpected frame {}", clip(text)));
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
}

/// An at-least-once subscriber's acks: cumulative, through the last serial received.
struct Acker {
    /// `{"type":"ack","channel":"C","req":` : the fixed start of every ack frame (a bench
    /// channel name needs no JSON escaping).
    prefix: String,
    ack_every: u64,
    /// The channel's epoch, read from the first delivery.
    epoch: Option<String>,
    /// The highest serial received, and the highest acked.
    received_through: u64,
    acked_through: u64,
    /// Deliveries since the last ack.
    unacked: u64,
    req: u64,
}

impl Acker {
    fn new(channel: &str, ack_every: u64, after: u64) -> Acker {
        Acker {
            prefix: format!("{{\"type\":\"ack\",\"channel\":\"{channel}\",\"req\":"),
            ack_every,
            epoch: None,
            received_through: after,
            acked_through: after,
            unacked: 0,
            req: SUBSCRIBE_REQ,
        }
    }

    /// Notes a delivery (`body`: the frame after [`MESSAGE_PREFIX`]); true when an ack is due.
    fn received(&mut self, serial: u64, body: &str) -> bool {
        if self.epoch.is_none() {
            self.epoch = body.find(EPOCH_KEY).and_then(|start| {
                let rest = &body[start + EPOCH_KEY.len()..];
                rest.find('"').map(|end| rest[..end].to_owned())
            });
        }
        self.received_through = self.received_through.max(serial);
        self.unacked += 1;
        self.unacked >= self.ack_every
    }

    /// Acks through the last serial received, if it is not acked yet.
    async fn send(
        &mut self,
        socket: &mut Socket,
        state: &SubscriberState,
    ) -> Result<(), tungstenite::Error> {
        self.unacked = 0;
        let Some(epoch) = &self.epoch else {
            return Ok(());
        };
        if self.received_through <= self.acked_through {
            return Ok(());
        }
        self.req += 1;
        let frame = format!(
            "{}{},\"through\":\"{epoch}:{}\"}}",
            self.prefix, self.req, self.received_through
        );
        socket.send(Message::text(frame)).await?;
        state.ack_frames.fetch_add(1, Ordering::Relaxed);
        state.serials_acked.fetch_add(
            self.received_through - self.acked_through,
            Ordering::Relaxed,
        );
        self.acked_through = self.received_through;
        Ok(())
    }
}

fn record_latency(state: &SubscriberState, sampling: &Sampling, serial: u64, text: &str) {
    let every = sampling.every.load(Ordering::Relaxed);
    if every == 0 || !serial.is_multiple_of(every) {
        return;
    }
    let Some(sent_us) = scan_number(text, SENT_US_KEY) else {
        return;
    };
    if sent_us < sampling.from_us.load(Ordering::Relaxed) {
        return;
    }
    let latency_us = unix_now_us().saturating_sub(sent_us);
    let mut samples = state.latencies_us.lock().expect("latency lock");
    if samples.len() < sampling.per_subscriber_max.load(Ordering::Relaxed) {
        samples.push(latency_us);
    }
}

/// The unsigned integer right after the first occurrence of `key` (which includes its quotes
/// and colon) in compact JSON text.
pub(crate) fn scan_number(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let rest = &text.as_bytes()[start..];
    let digits = rest.iter().take_while(|byte| byte.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The serial of an `EPOCH:SERIAL` position.
pub(crate) fn position_serial(position: &str) -> Option<u64> {
    position.rsplit_once(':')?.1.parse().ok()
}

pub(crate) fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn describe_close(frame: Option<tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(frame) => format!("code {} {:?}", u16::from(frame.code), frame.reason.as_str()),
        None => "no close code".to_owned(),
    }
}

/// At most 200 characters of a frame, for error messages.
fn clip(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}
