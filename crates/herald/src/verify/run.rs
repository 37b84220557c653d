//! One verification run: subscribers first, then publishers, faults and server kills for
//! `--duration`, then the final drain, then the check.
//!
//! # Invariants
//! - Every task ends on one of two stop signals: `load` (publishers, faults, kills) at the end
//!   of `--duration`, `subscribers` after the drain. A publish in flight at the end is retried
//!   until acknowledged or until the drain deadline.
//! - Every connection verify makes goes through its own fault proxy, except the seed
//!   publishes and the drain's status reads (direct, so faults never hide the truth).
//! - Faults are chosen with a PRNG seeded by `--seed`; the instants still depend on timing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_client::{
    BreakKind, Client, ClientError, ClientOptions, Event, Guarantee, Publication, SubscribeOptions,
};
use herald_faults::{FaultProxy, ProxyOptions};
use herald_protocol::PublishAck;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::history::{Record, Recorder};
use super::spawn::SpawnedServer;
use super::{VerifyArgs, check, report, sse};

const EXIT_USAGE: u8 = 2;
/// The server refused verify's key (as the other client commands: "rejected").
const EXIT_REJECTED: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;
/// How long subscribers get to be subscribed to every channel before publishing starts.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);
/// One publish attempt's wait for its ack.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per message before a publisher gives up on it.
const ATTEMPTS_MAX: u32 = 200;
/// Pause between two publishes of one publisher: bounds the load (about 200/s each).
const PUBLISH_INTERVAL: Duration = Duration::from_millis(5);
/// Socket buffers between a subscriber's proxy and the server.
const SUBSCRIBER_SOCKET_BUFFER_BYTES: u32 = 8 * 1024;
/// Bounds of the counts a user can ask for.
const PUBLISHERS_MAX: u32 = 64;
const SUBSCRIBERS_PER_GUARANTEE_MAX: u32 = 32;
const CHANNELS_MAX: u32 = 64;

/// A stop signal: cheap to clone, waits without polling.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    pub fn stopped(&self) -> bool {
        *self.0.borrow()
    }

    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

/// Counters for the progress line.
#[derive(Default)]
pub struct Progress {
    acked: AtomicU64,
    delivered: AtomicU64,
    faults: AtomicU64,
    kills: AtomicU64,
    subscribed: AtomicU64,
}

/// The last serial each subscriber accounted for on each channel, for the drain.
type Positions = Arc<Mutex<BTreeMap<(String, String), u64>>>;

/// What a subscriber task needs.
pub struct SubscriberContext {
    pub name: String,
    /// `exactly-once` or `at-most-once`.
    pub guarantee: String,
    pub channels: Vec<String>,
    /// `http://PROXY` for this subscriber.
    pub base_url: reqwest::Url,
    pub key: Option<String>,
    /// SSE `from=` of the first connection (every channel from its start).
    pub sse_from: Option<String>,
    /// An SSE connection silent this long is dropped.
    pub silence_max: Duration,
    recorder: Recorder,
    positions: Positions,
    progress: Arc<Progress>,
}

impl SubscriberContext {
    pub fn exactly_once(&self) -> bool {
        self.guarantee == "exactly-once"
    }

    pub fn record(&self, record: Record) {
        self.recorder.record(record);
    }

    pub fn delivered(&self, channel: &str, serial: u64) {
        self.progress.delivered.fetch_add(1, Ordering::Relaxed);
        self.advance(channel, serial);
    }

    /// A notice or `subscribed` accounted for everything up to `to`.
    pub fn accounted(&self, channel: &str, to: Option<&str>) {
        if let Some(serial) = to
            .and_then(|to| to.rsplit_once(':'))
            .and_then(|(_, serial)| serial.parse().ok())
        {
            self.advance(channel, serial);
        }
    }

    fn advance(&self, channel: &str, serial: u64) {
        let mut positions = self.positions.lock().expect("positions lock");
        let held = positions
            .entry((self.name.clone(), channel.to_owned()))
            .or_default();
        *held = (*held).max(serial);
    }

    /// A subscription to one channel started for the first time.
    pub fn first_subscribed(&self) {
        self.progress.subscribed.fetch_add(1, Ordering::Relaxed);
    }
}

/// What publisher tasks share.
#[derive(Clone)]
struct PublisherContext {
    run_id: String,
    channels: Vec<String>,
    key: Option<String>,
    recorder: Recorder,
    progress: Arc<Progress>,
    /// A message in flight is given up after this.
    give_up_at: Instant,
    seed: u64,
}

fn usage(message: impl std::fmt::Display) -> u8 {
    eprintln!("herald verify: {message}");
    EXIT_USAGE
}

/// What every part of a run shares.
struct Run {
    seed: u64,
    run_id: String,
    channels: Vec<String>,
    key: Option<String>,
    /// The server's base URL (`http://HOST:PORT`), reached directly.
    base_url: reqwest::Url,
    /// Where the proxies forward to.
    server_addr: SocketAddr,
    /// For the seed publishes and the drain's status reads (direct, no proxy).
    http: reqwest::Client,
    recorder: Recorder,
    progress: Arc<Progress>,
    positions: Positions,
}

/// The subscriber tasks and their proxies.
struct Subscribers {
    names: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
    proxies: Vec<(String, Arc<FaultProxy>, bool)>,
}

pub async fn run(args: VerifyArgs) -> u8 {
    match run_checked(args).await {
        Ok(code) | Err(code) => code,
    }
}

/// The run; `Err` is an early exit code (its reason already printed).
async fn run_checked(args: VerifyArgs) -> Result<u8, u8> {
    validate(&args)?;
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1)
    });
    let spawned = if args.spawn {
        let server = SpawnedServer::start(args.data_dir.as_deref())
            .await
            .map_err(|error| {
                eprintln!("herald verify: cannot start a server: {error:#}");
                1
            })?;
        eprintln!(
            "herald verify: spawned herald serve (pid {}) at {}",
            server.pid,
            server.url()
        );
        Some(server)
    } else {
        None
    };
    let url = spawned
        .as_ref()
        .map_or_else(|| args.url.clone(), SpawnedServer::url);
    let run = Run::connect(&url, seed, args.key.clone(), args.channels).await?;
    eprintln!("herald verify: seed {seed} (replay the fault schedule with --seed {seed})");
    let epochs = run.seed_channels().await?;

    let (subscribers_stop_tx, subscribers_stop) = watch::channel(false);
    let subscribers_stop = Stop(subscribers_stop);
    let silence_max = if spawned.is_some() {
        super::spawn::HEARTBEAT * 4
    } else {
        Duration::from_secs(40)
    };
    let sse_from = epochs
        .iter()
        .map(|epoch| format!("{epoch}:0"))
        .collect::<Vec<_>>()
        .join(",");
    let subscribers = run
        .start_subscribers(
            args.subscribers_per_guarantee,
            &sse_from,
            silence_max,
            &subscribers_stop,
        )
        .await;
    let subscribers = match subscribers {
        Ok(subscribers) => subscribers,
        Err(code) => {
            let _ = subscribers_stop_tx.send(true);
            return Err(code);
        }
    };

    // The load: publishers, faults and kills, for --duration.
    let (load_stop_tx, load_stop) = watch::channel(false);
    let load_stop = Stop(load_stop);
    let started = Instant::now();
    let publisher_context = PublisherContext {
        run_id: run.run_id.clone(),
        channels: run.channels.clone(),
        key: run.key.clone(),
        recorder: run.recorder.clone(),
        progress: run.progress.clone(),
        give_up_at: started + args.duration + args.drain_timeout,
        seed,
    };
    let mut proxies = subscribers.proxies.clone();
    let mut publisher_tasks = Vec::new();
    for index in 0..args.publishers {
        let proxy = start_proxy(run.server_addr, ProxyOptions::default()).await?;
        let name = format!("ws-pub-{index}");
        let url = format!("ws://{}/v1/ws", proxy.addr());
        publisher_tasks.push(tokio::spawn(sdk_publisher(
            name.clone(),
            url,
            publisher_context.clone(),
            load_stop.clone(),
        )));
        proxies.push((name, proxy, false));
    }
    let http_proxy = start_proxy(run.server_addr, ProxyOptions::default()).await?;
    publisher_tasks.push(tokio::spawn(http_publisher(
        http_proxy.clone(),
        proxy_url(&run.base_url, &http_proxy),
        publisher_context,
        load_stop.clone(),
    )));
    let faults_task = tokio::spawn(inject_faults(
        proxies.clone(),
        args.faults,
        seed,
        run.recorder.clone(),
        run.progress.clone(),
        load_stop.clone(),
    ));
    let killer = match (spawned, args.kill_every) {
        (Some(server), Some(interval)) => Killer::Running(tokio::spawn(kill_loop(
            server,
            interval,
            seed,
            run.recorder.clone(),
            run.progress.clone(),
            load_stop.clone(),
        ))),
        (server, _) => Killer::Idle(server.map(Box::new)),
    };
    let progress_task = tokio::spawn(report_progress(
        run.progress.clone(),
        started,
        subscribers_stop.clone(),
    ));
    tokio::time::sleep(args.duration).await;

    // Stop the load, heal every connection, let in-flight publishes finish, then drain.
    let _ = load_stop_tx.send(true);
    let drain_deadline = Instant::now() + args.drain_timeout;
    let _ = faults_task.await;
    let (server, kill_error) = match killer {
        Killer::Running(task) => match task.await {
            Ok((server, error)) => (Some(server), error),
            Err(error) => (
                None,
                Some(anyhow::anyhow!("the kill loop panicked: {error}")),
            ),
        },
        Killer::Idle(server) => (server.map(|server| *server), None),
    };
    for (_, proxy, _) in &proxies {
        proxy.heal();
    }
    http_proxy.heal();
    for task in publisher_tasks {
        let _ = tokio::time::timeout_at(drain_deadline, task).await;
    }
    run.drain(&subscribers.names, drain_deadline).await;
    let _ = subscribers_stop_tx.send(true);
    for task in subscribers.tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let _ = progress_task.await;
    if let Some(server) = server {
        server.stop().await;
    }
    drop(proxies);
    if let Some(error) = &kill_error {
        eprintln!("herald verify: the kill loop failed: {error:#}");
    }
    Ok(run.finish(&args, kill_error.is_none()))
}

fn validate(args: &VerifyArgs) -> Result<(), u8> {
    if args.publishers == 0 || args.publishers > PUBLISHERS_MAX {
        return Err(usage(format!("--publishers must be 1..={PUBLISHERS_MAX}")));
    }
    if args.subscribers_per_guarantee == 0
        || args.subscribers_per_guarantee > SUBSCRIBERS_PER_GUARANTEE_MAX
    {
        return Err(usage(format!(
            "--subscribers-per-guarantee must be 1..={SUBSCRIBERS_PER_GUARANTEE_MAX}"
        )));
    }
    if args.channels == 0 || args.channels > CHANNELS_MAX {
        return Err(usage(format!("--channels must be 1..={CHANNELS_MAX}")));
    }
    if args.duration.is_zero() {
        return Err(usage("--duration must be positive"));
    }
    Ok(())
}

async fn start_proxy(target: SocketAddr, options: ProxyOptions) -> Result<Arc<FaultProxy>, u8> {
    match FaultProxy::start_with(target, options).await {
        Ok(proxy) => Ok(Arc::new(proxy)),
        Err(error) => {
            eprintln!("herald verify: cannot start a proxy: {error}");
            Err(1)
        }
    }
}

/// `base` with the proxy's address instead of the server's.
fn proxy_url(base: &reqwest::Url, proxy: &FaultProxy) -> reqwest::Url {
    let mut url = base.clone();
    let _ = url.set_ip_host(proxy.addr().ip());
    let _ = url.set_port(Some(proxy.addr().port()));
    url
}

impl Run {
    /// Resolves and checks the server, and names this run's channels.
    async fn connect(url: &str, seed: u64, key: Option<String>, channels: u32) -> Result<Run, u8> {
        let base_url = match reqwest::Url::parse(url) {
            Ok(base) if base.scheme() == "http" && base.host_str().is_some() => base,
            Ok(_) => return Err(usage(format!("--url {url:?} must be http://HOST:PORT"))),
            Err(error) => return Err(usage(format!("--url {url:?}: {error}"))),
        };
        let host = base_url.host_str().expect("checked").to_owned();
        let port = base_url.port_or_known_default().unwrap_or(80);
        let resolved = tokio::net::lookup_host((host.as_str(), port)).await;
        let Some(server_addr) = resolved.ok().and_then(|mut addrs| addrs.next()) else {
            eprintln!("herald verify: cannot resolve {host}");
            return Err(EXIT_UNREACHABLE);
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .expect("a reqwest client builds");
        if let Err(error) = health(&http, &base_url).await {
            eprintln!("herald verify: the server at {base_url} is not reachable: {error}");
            return Err(EXIT_UNREACHABLE);
        }
        // Fresh channels per run, so nothing else publishes on them.
        let run_id = format!("{:x}", seed ^ u64::from(rand::random::<u32>()));
        let channels: Vec<String> = (0..channels)
            .map(|index| format!("verify:{run_id}-c{index}"))
            .collect();
        let recorder = Recorder::new();
        recorder.record(Record::Run {
            url: base_url.to_string(),
            seed,
            channels: channels.clone(),
        });
        Ok(Run {
            seed,
            run_id,
            channels,
            key,
            base_url,
            server_addr,
            http,
            recorder,
            progress: Arc::default(),
            positions: Arc::default(),
        })
    }

    /// Publishes one message per channel, so every channel has an epoch and every subscriber
    /// can start from a position (SSE has no `rewind`). Returns the epochs.
    async fn seed_channels(&self) -> Result<Vec<String>, u8> {
        let mut epochs = Vec::new();
        for (index, channel) in self.channels.iter().enumerate() {
            let id = format!("{}-seed-{index}", self.run_id);
            self.recorder.record(Record::Publish {
                publisher: "http-seed".into(),
                surface: "http".into(),
                channel: channel.clone(),
                id: id.clone(),
                attempt: 1,
            });
            let data = serde_json::json!({"seed": index});
            let key = self.key.as_deref();
            match http_publish(
                &self.http,
                &self.base_url,
                key,
                channel,
                &id,
                data,
                ATTEMPT_TIMEOUT,
            )
            .await
            {
                Ok(ack) => {
                    self.recorder.record(ack_record("http-seed", channel, &ack));
                    epochs.push(ack.epoch);
                }
                Err(error) => {
                    eprintln!("herald verify: cannot publish to {channel}: {error}");
                    return Err(match error {
                        HttpFailure::Refused {
                            status: 401 | 403, ..
                        } => EXIT_REJECTED,
                        _ => EXIT_UNREACHABLE,
                    });
                }
            }
        }
        Ok(epochs)
    }

    /// Starts every subscriber behind its own proxy and waits until each is subscribed to
    /// every channel.
    async fn start_subscribers(
        &self,
        per_guarantee: u32,
        sse_from: &str,
        silence_max: Duration,
        stop: &Stop,
    ) -> Result<Subscribers, u8> {
        let mut subscribers = Subscribers {
            names: Vec::new(),
            tasks: Vec::new(),
            proxies: Vec::new(),
        };
        for guarantee in ["exactly-once", "at-most-once"] {
            for surface in ["ws", "sse"] {
                for index in 0..per_guarantee {
                    let short = if guarantee == "exactly-once" {
                        "eo"
                    } else {
                        "amo"
                    };
                    let name = format!("{surface}-{short}-{index}");
                    // Small socket buffers: a paused subscriber pushes back on the server
                    // sooner. (The server's own send buffer still absorbs a few hundred KiB
                    // on loopback.)
                    let options = ProxyOptions {
                        target_socket_buffer_bytes: Some(SUBSCRIBER_SOCKET_BUFFER_BYTES),
                    };
                    let proxy = start_proxy(self.server_addr, options).await?;
                    self.recorder.record(Record::Subscriber {
                        subscriber: name.clone(),
                        guarantee: guarantee.into(),
                        surface: surface.into(),
                    });
                    let context = SubscriberContext {
                        name: name.clone(),
                        guarantee: guarantee.into(),
                        channels: self.channels.clone(),
                        base_url: proxy_url(&self.base_url, &proxy),
                        key: self.key.clone(),
                        sse_from: Some(sse_from.to_owned()),
                        silence_max,
                        recorder: self.recorder.clone(),
                        positions: self.positions.clone(),
                        progress: self.progress.clone(),
                    };
                    subscribers.tasks.push(if surface == "ws" {
                        tokio::spawn(ws_subscriber(Arc::new(context), stop.clone()))
                    } else {
                        tokio::spawn(sse::run(context, stop.clone()))
                    });
                    subscribers.names.push(name.clone());
                    subscribers.proxies.push((name, proxy, true));
                }
            }
        }
        let subscriptions = subscribers.names.len() as u64 * self.channels.len() as u64;
        let deadline = Instant::now() + SUBSCRIBE_TIMEOUT;
        while self.progress.subscribed.load(Ordering::Relaxed) < subscriptions {
            if Instant::now() > deadline {
                eprintln!(
                    "herald verify: only {} of {subscriptions} subscriptions started within {SUBSCRIBE_TIMEOUT:?}",
                    self.progress.subscribed.load(Ordering::Relaxed)
                );
                return Err(EXIT_UNREACHABLE);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(subscribers)
    }

    /// The final drain: waits until every subscriber has accounted for every channel's top
    /// (read directly from the server), or the deadline; records the outcome.
    async fn drain(&self, subscribers: &[String], deadline: Instant) {
        let mut tops = BTreeMap::new();
        for channel in &self.channels {
            let key = self.key.as_deref();
            let top = channel_top(&self.http, &self.base_url, key, channel, deadline).await;
            tops.insert(channel.clone(), top);
        }
        let complete = loop {
            let caught_up = {
                let positions = self.positions.lock().expect("positions lock");
                subscribers.iter().all(|subscriber| {
                    tops.iter().all(|(channel, top)| {
                        let top = top.as_ref().map_or(0, |(_, serial)| *serial);
                        positions
                            .get(&(subscriber.clone(), channel.clone()))
                            .is_some_and(|held| *held >= top)
                    })
                })
            };
            if caught_up {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let tops = tops
            .into_iter()
            .map(|(channel, top)| {
                let top = top.map(|(epoch, serial)| format!("{epoch}:{serial}"));
                (channel, top)
            })
            .collect();
        self.recorder.record(Record::Drain { tops, complete });
    }

    /// Checks the history, writes it if asked, prints the report; returns the exit code.
    fn finish(&self, args: &VerifyArgs, kills_ok: bool) -> u8 {
        let lines = self.recorder.snapshot();
        if lines.len() >= Recorder::LINES_MAX {
            eprintln!(
                "herald verify: the history reached {} lines and was cut short",
                Recorder::LINES_MAX
            );
        }
        let report = check::check(&lines);
        if let Some(path) = &args.history {
            let written =
                std::fs::File::create(path).and_then(|file| super::history::write(&lines, file));
            if let Err(error) = written {
                eprintln!("herald verify: cannot write {}: {error}", path.display());
            }
        }
        let output = report::Output {
            ok: report::passed(&report) && kills_ok,
            seed: Some(self.seed),
            url: Some(self.base_url.as_str()),
            history: args.history.as_ref().map(|path| path.display().to_string()),
            history_lines: lines.len(),
            violations_total: report.violation_count(),
            report: &report,
        };
        report::print(&output, args.json)
    }
}

enum Killer {
    Running(JoinHandle<(SpawnedServer, Option<anyhow::Error>)>),
    Idle(Option<Box<SpawnedServer>>),
}

async fn health(http: &reqwest::Client, base: &reqwest::Url) -> Result<(), String> {
    let url = base.join("/health").map_err(|error| error.to_string())?;
    let response = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|error| error.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("/health answered {}", response.status()))
    }
}

fn messages_url(base: &reqwest::Url, channel: &str) -> reqwest::Url {
    let mut url = base.clone();
    url.path_segments_mut()
        .expect("an http URL is a base")
        .clear()
        .extend(["v1", "channels", channel, "messages"]);
    url
}

/// Why an HTTP publish got no ack.
#[derive(Debug)]
enum HttpFailure {
    /// The server answered with an error status.
    Refused { status: u16, body: String },
    /// No answer (connection, timeout) or an answer that is not an ack.
    Transport(String),
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpFailure::Refused { status, body } => write!(f, "{status}: {body}"),
            HttpFailure::Transport(error) => f.write_str(error),
        }
    }
}

/// One HTTP publish with an explicit id.
async fn http_publish(
    http: &reqwest::Client,
    base: &reqwest::Url,
    key: Option<&str>,
    channel: &str,
    id: &str,
    data: serde_json::Value,
    timeout: Duration,
) -> Result<PublishAck, HttpFailure> {
    let transport = |error: reqwest::Error| HttpFailure::Transport(error.to_string());
    let mut request = http
        .post(messages_url(base, channel))
        .timeout(timeout)
        .json(&serde_json::json!({"id": id, "data": data}));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(transport)?;
    let status = response.status();
    let body = response.bytes().await.map_err(transport)?;
    if !status.is_success() {
        return Err(HttpFailure::Refused {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).chars().take(300).collect(),
        });
    }
    serde_json::from_slice(&body)
        .map_err(|error| HttpFailure::Transport(format!("unexpected answer: {error}")))
}

fn ack_record(publisher: &str, channel: &str, ack: &PublishAck) -> Record {
    Record::Ack {
        publisher: publisher.to_owned(),
        channel: channel.to_owned(),
        id: ack.id.clone(),
        epoch: ack.epoch.clone(),
        serial: ack.serial,
        duplicate: ack.duplicate,
    }
}

/// The channel's top, read directly from the server (retrying until `deadline`).
async fn channel_top(
    http: &reqwest::Client,
    base: &reqwest::Url,
    key: Option<&str>,
    channel: &str,
    deadline: Instant,
) -> Option<(String, u64)> {
    let mut url = base.clone();
    url.path_segments_mut()
        .expect("an http URL is a base")
        .clear()
        .extend(["v1", "channels", channel]);
    loop {
        let mut request = http.get(url.clone()).timeout(Duration::from_secs(5));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Ok(response) = request.send().await
            && response.status().is_success()
            && let Ok(status) = response
                .json::<herald_protocol::message::ChannelStatusBody>()
                .await
        {
            let (epoch, serial) = status.top.rsplit_once(':')?;
            return Some((epoch.to_owned(), serial.parse().ok()?));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One WebSocket subscriber (the SDK), subscribed to every channel.
async fn ws_subscriber(context: Arc<SubscriberContext>, stop: Stop) {
    let mut options = ClientOptions::new(format!(
        "ws://{}/v1/ws",
        context
            .base_url
            .host_str()
            .zip(context.base_url.port())
            .map_or_else(String::new, |(host, port)| format!("{host}:{port}"))
    ));
    options.key = context.key.clone();
    options.reconnect_delay_min = Duration::from_millis(20);
    options.reconnect_delay_max = Duration::from_secs(1);
    options.handshake_timeout = Duration::from_secs(5);
    let client = match Client::connect(options) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("herald verify: {}: {error}", context.name);
            return;
        }
    };
    let connections = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for channel in &context.channels {
        let options = if context.exactly_once() {
            SubscribeOptions::from_oldest()
        } else {
            SubscribeOptions {
                guarantee: Guarantee::AtMostOnce,
                ..SubscribeOptions::default()
            }
        };
        let subscription = match client.subscribe(channel, options).await {
            Ok(subscription) => subscription,
            Err(error) => {
                context.record(Record::SubscriptionError {
                    subscriber: context.name.clone(),
                    channel: channel.clone(),
                    code: "subscribe_failed".into(),
                    message: error.to_string(),
                });
                continue;
            }
        };
        tasks.push(tokio::spawn(ws_subscription(
            context.clone(),
            client.clone(),
            connections.clone(),
            channel.clone(),
            subscription,
            stop.clone(),
        )));
    }
    for task in tasks {
        let _ = task.await;
    }
    client.close().await;
}

async fn ws_subscription(
    context: Arc<SubscriberContext>,
    client: Client,
    connections: Arc<AtomicU64>,
    channel: String,
    mut subscription: herald_client::Subscription,
    mut stop: Stop,
) {
    let subscriber = context.name.clone();
    let mut subscribed_before = false;
    loop {
        let event = tokio::select! {
            event = subscription.next() => event,
            () = stop.wait() => return,
        };
        let Some(event) = event else { return };
        match event {
            Event::Subscribed {
                continuity,
                after,
                top,
                ..
            } => {
                if subscribed_before {
                    let now = client.connection_state().connections;
                    if connections.fetch_max(now, Ordering::Relaxed) < now {
                        context.record(Record::Reconnect {
                            subscriber: subscriber.clone(),
                        });
                    }
                } else {
                    subscribed_before = true;
                    context.first_subscribed();
                }
                let after = after.map(|after| after.to_string());
                context.accounted(&channel, after.as_deref());
                context.record(Record::Subscribed {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    continuity: sse::continuity_name(continuity),
                    after,
                    top: top.map(|top| top.to_string()),
                });
            }
            Event::Message(message) => {
                context.delivered(&channel, message.position.serial.0);
                context.record(Record::Delivery {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    id: message.id.clone(),
                    epoch: message.position.epoch.to_string(),
                    serial: message.position.serial.0,
                });
            }
            Event::ContinuityLost { from, to, reason } => {
                let to = to.map(|to| to.to_string());
                context.accounted(&channel, to.as_deref());
                context.record(Record::Notice {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    notice: "continuity_lost".into(),
                    from: from.to_string(),
                    to,
                    reason,
                });
            }
            Event::Gap { from, to, reason } => {
                notice(
                    &context,
                    &channel,
                    "gap",
                    from.to_string(),
                    to.to_string(),
                    reason,
                );
            }
            Event::Skip { from, to, reason } => {
                notice(
                    &context,
                    &channel,
                    "skip",
                    from.to_string(),
                    to.to_string(),
                    reason,
                );
            }
            Event::Broken(broken) => {
                let kind = match &broken.kind {
                    BreakKind::Prev { .. } => "prev",
                    BreakKind::Hole { .. } => "hole",
                    BreakKind::Epoch { .. } => "epoch",
                    BreakKind::Chain { .. } => "chain",
                    BreakKind::Malformed { .. } => "malformed",
                    _ => "other",
                };
                context.record(Record::Broken {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    break_kind: kind.into(),
                    detail: format!("{broken:?}"),
                });
            }
            Event::Error { code, message, .. } => context.record(Record::SubscriptionError {
                subscriber: subscriber.clone(),
                channel: channel.clone(),
                code,
                message,
            }),
            Event::Closed { reason } => {
                context.record(Record::SubscriptionError {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    code: "closed".into(),
                    message: reason,
                });
                return;
            }
            _ => {} // hints (not asked for), stalled (the drain checks tops itself)
        }
    }
}

/// Records a `gap` or `skip` notice.
fn notice(
    context: &SubscriberContext,
    channel: &str,
    kind: &str,
    from: String,
    to: String,
    reason: String,
) {
    context.accounted(channel, Some(&to));
    context.record(Record::Notice {
        subscriber: context.name.clone(),
        channel: channel.to_owned(),
        notice: kind.to_owned(),
        from,
        to: Some(to),
        reason,
    });
}

/// An SDK publisher: publishes until `stop`, each message retried with its id until acked.
async fn sdk_publisher(name: String, url: String, context: PublisherContext, stop: Stop) {
    let mut options = ClientOptions::new(url);
    options.key = context.key.clone();
    options.reconnect_delay_min = Duration::from_millis(20);
    options.reconnect_delay_max = Duration::from_secs(1);
    options.handshake_timeout = Duration::from_secs(5);
    let client = match Client::connect(options) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("herald verify: {name}: {error}");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(context.seed ^ fxhash(&name));
    let mut sequence = 0u64;
    while !stop.stopped() {
        let channel = &context.channels[rng.random_range(0..context.channels.len())];
        let id = format!("{}-{name}-{sequence}", context.run_id);
        let publication = match Publication::json(&serde_json::json!({"n": sequence})) {
            Ok(publication) => publication.id(id.clone()),
            Err(_) => return,
        };
        for attempt in 1..=ATTEMPTS_MAX {
            if Instant::now() >= context.give_up_at {
                break;
            }
            context.recorder.record(Record::Publish {
                publisher: name.clone(),
                surface: "ws".into(),
                channel: channel.clone(),
                id: id.clone(),
                attempt,
            });
            let outcome = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                client.publish(channel, publication.clone()),
            )
            .await;
            let fatal = matches!(
                &outcome,
                Ok(Err(ClientError::Rejected(_) | ClientError::InvalidInput(_)))
            );
            let error = match outcome {
                Ok(Ok(ack)) => {
                    context.progress.acked.fetch_add(1, Ordering::Relaxed);
                    context.recorder.record(Record::Ack {
                        publisher: name.clone(),
                        channel: channel.clone(),
                        id: ack.id,
                        epoch: ack.epoch,
                        serial: ack.serial,
                        duplicate: ack.duplicate,
                    });
                    break;
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no ack within {ATTEMPT_TIMEOUT:?}"),
            };
            context.recorder.record(Record::PublishFailed {
                publisher: name.clone(),
                channel: channel.clone(),
                id: id.clone(),
                error: error.clone(),
            });
            if fatal {
                eprintln!("herald verify: {name}: {error}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sequence += 1;
        tokio::time::sleep(PUBLISH_INTERVAL).await;
    }
    client.close().await;
}

/// The HTTP publisher: explicit ids; every third publish is forced to fail (its proxy delays
/// it past the request timeout, so it may or may not be stored) and retried with the same id,
/// and every acked publish is sent once more, which must come back at the same position.
async fn http_publisher(
    proxy: Arc<FaultProxy>,
    base: reqwest::Url,
    context: PublisherContext,
    stop: Stop,
) {
    const NAME: &str = "http-pub";
    const FORCED_DELAY: Duration = Duration::from_millis(400);
    const FORCED_TIMEOUT: Duration = Duration::from_millis(150);
    let http = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a reqwest client builds");
    let key = context.key.as_deref();
    let mut sequence = 0u64;
    while !stop.stopped() {
        let channel = &context.channels[(sequence as usize) % context.channels.len()];
        let id = format!("{}-{NAME}-{sequence}", context.run_id);
        let data = serde_json::json!({"h": sequence});
        let publish = |attempt: u32| Record::Publish {
            publisher: NAME.into(),
            surface: "http".into(),
            channel: channel.clone(),
            id: id.clone(),
            attempt,
        };
        let failed = |error: String| Record::PublishFailed {
            publisher: NAME.into(),
            channel: channel.clone(),
            id: id.clone(),
            error,
        };
        let mut attempt = 1;
        let mut acked = false;
        if sequence.is_multiple_of(3) {
            proxy.delay(FORCED_DELAY);
            context.progress.faults.fetch_add(1, Ordering::Relaxed);
            context.recorder.record(Record::Fault {
                target: NAME.into(),
                fault: "delay".into(),
            });
            context.recorder.record(publish(attempt));
            let outcome = http_publish(
                &http,
                &base,
                key,
                channel,
                &id,
                data.clone(),
                FORCED_TIMEOUT,
            )
            .await;
            proxy.delay(Duration::ZERO);
            match outcome {
                Ok(ack) => {
                    context.recorder.record(ack_record(NAME, channel, &ack));
                    acked = true;
                }
                Err(error) => {
                    context.recorder.record(failed(format!("forced: {error}")));
                }
            }
            attempt += 1;
        }
        while !acked && attempt <= ATTEMPTS_MAX && Instant::now() < context.give_up_at {
            context.recorder.record(publish(attempt));
            match http_publish(
                &http,
                &base,
                key,
                channel,
                &id,
                data.clone(),
                ATTEMPT_TIMEOUT,
            )
            .await
            {
                Ok(ack) => {
                    context.progress.acked.fetch_add(1, Ordering::Relaxed);
                    context.recorder.record(ack_record(NAME, channel, &ack));
                    acked = true;
                }
                Err(error) => {
                    context.recorder.record(failed(error.to_string()));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            attempt += 1;
        }
        if acked {
            // The same id again: it must come back at the same position, `duplicate: true`.
            context.recorder.record(publish(attempt));
            match http_publish(&http, &base, key, channel, &id, data, ATTEMPT_TIMEOUT).await {
                Ok(ack) => {
                    context.recorder.record(ack_record(NAME, channel, &ack));
                }
                Err(error) => {
                    context.recorder.record(failed(error.to_string()));
                }
            }
        }
        sequence += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cuts and pauses verify's own connections at random until `stop`.
async fn inject_faults(
    proxies: Vec<(String, Arc<FaultProxy>, bool)>,
    mode: super::FaultMode,
    seed: u64,
    recorder: Recorder,
    progress: Arc<Progress>,
    mut stop: Stop,
) {
    if !mode.drops() && !mode.pauses() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let subscribers: Vec<&(String, Arc<FaultProxy>, bool)> = proxies
        .iter()
        .filter(|(_, _, subscriber)| *subscriber)
        .collect();
    loop {
        let wait = Duration::from_millis(rng.random_range(200..1200));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.wait() => return,
        }
        let cut = mode.drops() && (!mode.pauses() || rng.random_bool(0.5));
        progress.faults.fetch_add(1, Ordering::Relaxed);
        if cut {
            let (name, proxy, _) = &proxies[rng.random_range(0..proxies.len())];
            proxy.cut();
            recorder.record(Record::Fault {
                target: name.clone(),
                fault: "cut".into(),
            });
        } else {
            let (name, proxy, _) = subscribers[rng.random_range(0..subscribers.len())];
            let pause = Duration::from_millis(rng.random_range(100..2000));
            proxy.pause(true);
            recorder.record(Record::Fault {
                target: name.clone(),
                fault: "pause".into(),
            });
            let (name, proxy, recorder) = (name.clone(), proxy.clone(), recorder.clone());
            tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                proxy.pause(false);
                recorder.record(Record::Fault {
                    target: name,
                    fault: "resume".into(),
                });
            });
        }
    }
}

/// SIGKILLs and restarts the spawned server at random instants until `stop`. Returns the
/// server (running) and the error that stopped the loop early, if any.
async fn kill_loop(
    mut server: SpawnedServer,
    (min, max): (Duration, Duration),
    seed: u64,
    recorder: Recorder,
    progress: Arc<Progress>,
    mut stop: Stop,
) -> (SpawnedServer, Option<anyhow::Error>) {
    let mut rng = StdRng::seed_from_u64(seed.rotate_left(17));
    loop {
        let wait = if max > min {
            rng.random_range(min..=max)
        } else {
            min
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.wait() => return (server, None),
        }
        let pid = server.pid;
        if let Err(error) = server.kill9().await {
            return (server, Some(error));
        }
        progress.kills.fetch_add(1, Ordering::Relaxed);
        recorder.record(Record::Kill { pid });
        if let Err(error) = server.restart().await {
            return (server, Some(error));
        }
        recorder.record(Record::Restart { pid: server.pid });
    }
}

/// One progress line per second on stderr.
async fn report_progress(progress: Arc<Progress>, started: Instant, mut stop: Stop) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.wait() => return,
        }
        eprintln!(
            "verify: {:>4}s published {} delivered {} faults {} kills {}",
            started.elapsed().as_secs(),
            progress.acked.load(Ordering::Relaxed),
            progress.delivered.load(Ordering::Relaxed),
            progress.faults.load(Ordering::Relaxed),
            progress.kills.load(Ordering::Relaxed),
        );
    }
}

/// A stable 64-bit hash of a name (FNV-1a), to derive per-task seeds.
fn fxhash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
