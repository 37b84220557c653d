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

use herald_faults::{FaultProxy, ProxyOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::faults::*;
use super::history::{Record, Recorder};
use super::publisher::*;
use super::spawn::SpawnedServer;
use super::subscriber::*;
use super::{VerifyArgs, check, report, sse};

pub(super) const EXIT_USAGE: u8 = 2;
/// The server refused verify's key (as the other client commands: "rejected").
pub(super) const EXIT_REJECTED: u8 = 3;
pub(super) const EXIT_UNREACHABLE: u8 = 4;
/// How long subscribers get to be subscribed to every channel before publishing starts.
pub(super) const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);
/// One publish attempt's wait for its ack.
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per message before a publisher gives up on it.
pub(super) const ATTEMPTS_MAX: u32 = 200;
/// Pause between two publishes of one publisher: bounds the load (about 200/s each).
pub(super) const PUBLISH_INTERVAL: Duration = Duration::from_millis(5);
/// Socket buffers between a subscriber's proxy and the server.
pub(super) const SUBSCRIBER_SOCKET_BUFFER_BYTES: u32 = 8 * 1024;
/// Bounds of the counts a user can ask for.
pub(super) const PUBLISHERS_MAX: u32 = 64;
pub(super) const SUBSCRIBERS_PER_GUARANTEE_MAX: u32 = 32;
pub(super) const CHANNELS_MAX: u32 = 64;

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
    pub(super) acked: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) faults: AtomicU64,
    pub(super) kills: AtomicU64,
    pub(super) subscribed: AtomicU64,
}

/// The last serial each subscriber accounted for on each channel, for the drain.
pub(super) type Positions = Arc<Mutex<BTreeMap<(String, String), u64>>>;

pub(super) fn usage(message: impl std::fmt::Display) -> u8 {
    eprintln!("herald verify: {message}");
    EXIT_USAGE
}

/// What every part of a run shares.
pub(super) struct Run {
    pub(super) seed: u64,
    pub(super) run_id: String,
    pub(super) channels: Vec<String>,
    pub(super) key: Option<String>,
    /// The server's base URL (`http://HOST:PORT`), reached directly.
    pub(super) base_url: reqwest::Url,
    /// Where the proxies forward to.
    pub(super) server_addr: SocketAddr,
    /// For the seed publishes and the drain's status reads (direct, no proxy).
    pub(super) http: reqwest::Client,
    pub(super) recorder: Recorder,
    pub(super) progress: Arc<Progress>,
    pub(super) positions: Positions,
}

/// The subscriber tasks and their proxies.
pub(super) struct Subscribers {
    pub(super) names: Vec<String>,
    pub(super) tasks: Vec<JoinHandle<()>>,
    pub(super) proxies: Vec<(String, Arc<FaultProxy>, bool)>,
}

pub async fn run(args: VerifyArgs) -> u8 {
    match run_checked(args).await {
        Ok(code) | Err(code) => code,
    }
}

/// The run; `Err` is an early exit code (its reason already printed).
pub(super) async fn run_checked(args: VerifyArgs) -> Result<u8, u8> {
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

pub(super) fn validate(args: &VerifyArgs) -> Result<(), u8> {
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

pub(super) async fn start_proxy(
    target: SocketAddr,
    options: ProxyOptions,
) -> Result<Arc<FaultProxy>, u8> {
    match FaultProxy::start_with(target, options).await {
        Ok(proxy) => Ok(Arc::new(proxy)),
        Err(error) => {
            eprintln!("herald verify: cannot start a proxy: {error}");
            Err(1)
        }
    }
}

/// `base` with the proxy's address instead of the server's.
pub(super) fn proxy_url(base: &reqwest::Url, proxy: &FaultProxy) -> reqwest::Url {
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

pub(super) async fn health(http: &reqwest::Client, base: &reqwest::Url) -> Result<(), String> {
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

/// The channel's top, read directly from the server (retrying until `deadline`).
pub(super) async fn channel_top(
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

/// One progress line per second on stderr.
pub(super) async fn report_progress(progress: Arc<Progress>, started: Instant, mut stop: Stop) {
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
pub(super) fn fxhash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
