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
//! # Invariants
//! - Each subscriber's counters are written by its own task only and read by the controller and
//!   the publishers, so they are plain relaxed atomics.
//! - Latency samples per subscriber are capped ([`Sampling::per_subscriber_max`]); the task
//!   count is the subscriber count; every wait (connect, handshake, close) has a timeout.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use futures_util::{SinkExt, StreamExt};
use herald_core::Guarantee;
use herald_protocol::ws::{
    self, ClientFrame, Connect, ConnectTag, ServerFrame, Subscribe, SubscribeTag,
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
}

impl GroupTotals {
    pub(crate) fn since(self, earlier: GroupTotals) -> GroupTotals {
        GroupTotals {
            delivered: self.delivered - earlier.delivered,
            new_serials: self.new_serials - earlier.new_serials,
            violations: self.violations - earlier.violations,
            gap_notices: self.gap_notices - earlier.gap_notices,
            unexpected_frames: self.unexpected_frames - earlier.unexpected_frames,
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
    pub(crate) async fn open(
        endpoint: &Arc<Endpoint>,
        channel: &str,
        guarantee: Guarantee,
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
                    tokio::time::timeout(CONNECT_TIMEOUT, open_one(&endpoint, &channel, guarantee))
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("no answer within {CONNECT_TIMEOUT:?}")))
                };
                match opened {
                    Ok((socket, after)) => {
                        let _ = ready_sender.send(Ok(after)).await;
                        // Released now, so the opener sees the channel close if a task dies.
                        drop(ready_sender);
                        read_deliveries(socket, &state, &sampling, guarantee, after, stop).await;
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

/// TCP connect, WebSocket upgrade, `connect` -> `connected`, `subscribe` -> `subscribed`.
/// Returns the socket and the serial deliveries start after.
async fn open_one(
    endpoint: &Endpoint,
    channel: &str,
    guarantee: Guarantee,
) -> anyhow::Result<(Socket, u64)> {
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
    let subscribe = ClientFrame::Subscribe(Subscribe {
        kind: SubscribeTag::Tag,
        req: Some(SUBSCRIBE_REQ),
        channel: channel.to_owned(),
        guarantee: Some(guarantee.as_str().to_owned()),
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

/// The subscriber's loop: count and check every delivery until told to stop or the
/// connection ends.
async fn read_deliveries(
    mut socket: Socket,
    state: &SubscriberState,
    sampling: &Sampling,
    guarantee: Guarantee,
    after: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut expected = after + 1;
    let mut last_serial = after;
    state.last_serial.store(after, Ordering::Relaxed);
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed() => break,
            next = socket.next() => next,
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
        if let Some(serial) = text
            .strip_prefix(MESSAGE_PREFIX)
            .and_then(|body| scan_number(body, SERIAL_KEY))
        {
            state.delivered.fetch_add(1, Ordering::Relaxed);
            let in_contract = match guarantee {
                Guarantee::ExactlyOnce => serial == expected,
                Guarantee::AtMostOnce => serial >= expected,
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
            continue;
        }
        match ServerFrame::from_json(text) {
            Ok(ServerFrame::Heartbeat(_) | ServerFrame::Pong(_)) => {}
            Ok(ServerFrame::Gap(_)) => {
                state.gap_notices.fetch_add(1, Ordering::Relaxed);
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
