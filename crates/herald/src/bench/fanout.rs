//! `herald bench fanout`: one publisher and N WebSocket subscribers on one channel, per
//! guarantee, measured against the targets of issue #3, and at-least-once (durable)
//! subscribers with acks beside them (issue #5).
//!
//! # What it measures
//!
//! By default the bench starts its own server (this executable, `serve --dev` on a free
//! loopback port, fresh data directory) so that it can read the server's CPU time and RSS from
//! `/proc`; `--url` targets a running server instead, and then only `--server-pid` brings those
//! figures back. Then, in this order:
//!
//! - **Idle connections** (`--idle-connections M`, default 1000): one warm-up subscriber, the
//!   server's `VmRSS`, then M more connections, each connected and subscribed (exactly-once) to
//!   one channel, `VmRSS` again once it settles: (after - before) / M is the RSS per idle
//!   connection. It runs first, on a server that has done nothing else, so memory freed by
//!   earlier phases cannot hide what connections cost.
//! - For each guarantee and each subscriber count N (`--subscribers`, default 1,100,1000; for
//!   at-least-once `--durable-subscribers`, default 1,100), one group of N subscribers on a
//!   fresh channel, and two phases on it:
//!   - **Throughput**: `--publishers` concurrent HTTP batch publishes of `--batch-size`
//!     messages, each sent as soon as the previous one is acked, but never more than
//!     `--lag-max` messages ahead of the slowest subscriber (so what is measured is a rate the
//!     subscribers kept up with, and a phase leaves a bounded backlog). Over the measured window
//!     (`--duration`, after `--warmup`): messages published/s, messages delivered/s summed over
//!     the subscribers, and server CPU time per delivery.
//!   - **Latency**: one message per request at `--rate` messages/s on a fixed schedule; each
//!     message carries its publish time, and each subscriber records publish-to-deliver for
//!     the messages published in the measured window (every k-th serial when that would be more
//!     than [`LATENCY_SAMPLES_MAX`] samples): p50, p99, max.
//!
//!   After each phase the bench waits (at most `--drain-timeout`) until every subscriber has
//!   the phase's last serial, then checks delivery: exactly-once subscribers must have received
//!   every serial once and in order; at-most-once ones may miss serials (counted, with the
//!   `gap` notices) but never duplicate or reorder; at-least-once ones must have received
//!   every serial in order, and may see a serial again only as a counted redelivery
//!   (`"delivery"` above 1; counted apart, none is expected from a subscriber that acks).
//!
//! # At-least-once
//!
//! Subscriber i subscribes with `"guarantee":"at-least-once","subscriber_id":"bench-<i>"` and
//! `options.inflight_max` (`--inflight-max`, default 100, the server's default window) on the
//! group's fresh channel, and acks cumulatively (`{"type":"ack","req":R,"through":"E:S"}`, S
//! the last serial received) after every `--ack-every` deliveries (default 16) and whenever
//! the socket has nothing more to read (the end of a read burst), so the window never stalls
//! and a slow stream is acked message by message. `--ack-every 1` acks every message. Every
//! ack carries a `req`, and the server's `acked` replies (the ack is durable) are counted.
//!
//! Each phase also reads the server's `/metrics` at both ends of the measured window: group
//! commits (one fsync each: `herald_store_group_commits_total`), subscriber snapshots written
//! with them (`herald_store_subscriber_saves_total`) and the `herald_durable_*` counters.
//! Snapshots per fsync above 1 show acks and delivery counts sharing group commits (there is
//! no other fsync path); fsyncs/s beside the exactly-once rows show what durable subscribers
//! add to the disk's work.
//!
//! # Layout
//!
//! - this file: the arguments, the run loop and the phases;
//! - [`subscriber`]: the WebSocket subscribers; [`publisher`]: the two publishers;
//!   [`server`]: the child server and `/proc`; [`report`]: the table, the targets, the JSON.
//!
//! # Invariants
//!
//! - Every phase is bounded in time (warm-up + duration + drain timeout) and in messages
//!   (`--max-messages`); latency samples are bounded by [`LATENCY_SAMPLES_MAX`].
//! - Publish errors, subscriber failures, and exactly-once deliveries that are missing,
//!   duplicated or out of order make the command fail after the report is printed.
//! - Traffic goes only to the server under test; the child server is stopped on every path.

mod publisher;
mod report;
pub(super) mod server;
mod subscriber;

use self::publisher::{FloodConfig, PublishTally, PublishTarget};
use self::report::{DeliveryCheck, FanoutReport, FanoutRow, IdleResult, LatencyResult};
use self::report::{ServerCounters, ThroughputResult, Window};
use self::server::{ChildServer, Process};
use self::subscriber::{Endpoint, GroupTotals, Sampling, SubscriberGroup};
use super::*;

/// Upper bound on one subscriber count (each subscriber is a connection).
const SUBSCRIBERS_MAX: usize = 10_000;
/// Upper bound on the idle connections.
const IDLE_CONNECTIONS_MAX: usize = 10_000;
/// Upper bound on an at-least-once subscriber's window (the server's default limit).
const INFLIGHT_MAX_LIMIT: u64 = 10_000;
/// Upper bound on concurrent publish requests of the throughput phase.
const PUBLISHERS_MAX: usize = 64;
/// Total latency samples kept per phase, over all subscribers.
const LATENCY_SAMPLES_MAX: u64 = 2_000_000;
/// File descriptors beyond the connections: the runtime, the HTTP pool, stdio.
const OPEN_FILES_HEADROOM: u64 = 256;
/// No single publish may take longer than this; a hung request is an error, not a stall.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// An at-most-once drain ends when nothing arrives for this long (dropped serials never will).
const QUIET_PERIOD: Duration = Duration::from_secs(1);
/// How often a drain looks at the subscribers.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// RSS readings: first after this pause, then every step until two agree within the tolerance
/// or the limit passes.
const RSS_SETTLE_FIRST: Duration = Duration::from_millis(500);
const RSS_SETTLE_STEP: Duration = Duration::from_millis(250);
const RSS_SETTLE_MAX: Duration = Duration::from_secs(5);
const RSS_SETTLE_TOLERANCE_KIB: u64 = 64;

/// Arguments of `herald bench fanout`.
#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    /// Base URL of a running server to measure. Without it the bench starts its own
    /// (`herald serve --dev` on a free loopback port, temporary data directory; `HERALD_*`
    /// variables configure it), which is the only way to get its CPU and RSS figures without
    /// --server-pid.
    #[arg(long)]
    pub url: Option<String>,

    /// API key for --url (publish and subscribe capability). Not used with the bench's own
    /// server, which runs in dev mode.
    #[arg(long, env = "HERALD_KEY", hide_env_values = true, requires = "url")]
    pub key: Option<String>,

    /// With --url: the pid of that server, to read its CPU time and RSS from /proc.
    #[arg(long, requires = "url")]
    pub server_pid: Option<u32>,

    /// Subscriber counts, one group each (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000", value_parser = parse_subscribers)]
    pub subscribers: Vec<usize>,

    /// Subscriber counts for at-least-once, one group each (comma separated): each is a
    /// durable subscriber whose acks and delivery counts the server persists.
    #[arg(long, value_delimiter = ',', default_value = "1,100", value_parser = parse_subscribers)]
    pub durable_subscribers: Vec<usize>,

    /// Guarantees to measure (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "at-most-once,exactly-once,at-least-once",
        value_parser = parse_guarantee
    )]
    pub guarantees: Vec<Guarantee>,

    /// At-least-once: ack cumulatively after this many deliveries (and at the end of every
    /// read burst); 1 acks every message.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=INFLIGHT_MAX_LIMIT))]
    pub ack_every: u64,

    /// At-least-once: the subscribers' window (`options.inflight_max`): messages delivered
    /// and not yet acked, at most.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=INFLIGHT_MAX_LIMIT))]
    pub inflight_max: u64,

    /// Measured time of each phase (after the warm-up), e.g. `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Unmeasured warm-up at the start of each phase.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Messages per second of the latency phase (one message per request, fixed schedule).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,

    /// Messages per publish request in the throughput phase.
    #[arg(long, default_value_t = 100, value_parser = parse_batch_size)]
    pub batch_size: usize,

    /// Concurrent publish requests in the throughput phase.
    #[arg(long, default_value_t = 4, value_parser = parse_publishers)]
    pub publishers: usize,

    /// Throughput phase: the most messages the publisher may be ahead of the slowest
    /// subscriber (published or in flight, not yet received). The default stays under the
    /// server's default outbound queue (1024 frames), so a subscriber that keeps up is never
    /// dropped from (at-most-once) or sent to catch-up (exactly-once) by the bound alone.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub lag_max: u64,

    /// Maximum messages published per phase (warm-up included).
    #[arg(long, default_value_t = 2_000_000)]
    pub max_messages: u64,

    /// Approximate size of each message's JSON `data`, in bytes.
    #[arg(long, default_value_t = 128)]
    pub message_bytes: usize,

    /// Idle connections for the RSS figure (0 skips it).
    #[arg(long, default_value_t = 1000, value_parser = parse_idle_connections)]
    pub idle_connections: usize,

    /// After each phase, how long to wait for the subscribers to receive everything published.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_subscribers(text: &str) -> Result<usize, String> {
    parse_count(text, SUBSCRIBERS_MAX)
}

fn parse_publishers(text: &str) -> Result<usize, String> {
    parse_count(text, PUBLISHERS_MAX)
}

fn parse_idle_connections(text: &str) -> Result<usize, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_count(text, IDLE_CONNECTIONS_MAX)
}

fn parse_guarantee(text: &str) -> Result<Guarantee, String> {
    Guarantee::parse(text.trim())
}

/// The guarantees the bench measures: the two of herald-core's `Guarantee` plus at-least-once,
/// which is a durable subscriber (a `subscriber_id`, acks) rather than a cursor mode.
// The variants are the guarantees' own names (as in herald-core), shared suffix included.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Guarantee {
    AtMostOnce,
    ExactlyOnce,
    AtLeastOnce,
}

impl Guarantee {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Guarantee::AtMostOnce => "at-most-once",
            Guarantee::ExactlyOnce => "exactly-once",
            Guarantee::AtLeastOnce => "at-least-once",
        }
    }

    fn parse(text: &str) -> Result<Guarantee, String> {
        match text {
            "at-most-once" => Ok(Guarantee::AtMostOnce),
            "exactly-once" => Ok(Guarantee::ExactlyOnce),
            "at-least-once" => Ok(Guarantee::AtLeastOnce),
            other => Err(format!(
                "unknown guarantee {other:?}; expected at-most-once, exactly-once or \
                 at-least-once"
            )),
        }
    }

    /// Short tag for channel names.
    fn tag(self) -> &'static str {
        match self {
            Guarantee::AtMostOnce => "amo",
            Guarantee::ExactlyOnce => "eo",
            Guarantee::AtLeastOnce => "alo",
        }
    }
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How at-least-once subscribers subscribe and ack.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Acking {
    pub(crate) ack_every: u64,
    pub(crate) inflight_max: u64,
}

/// Runs `herald bench fanout`: progress on stderr, the report on stdout. Fails after the
/// report if anything was lost, refused or broken.
pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    let connections_max = args
        .subscribers
        .iter()
        .chain(&args.durable_subscribers)
        .copied()
        .max()
        .unwrap_or(0)
        .max(args.idle_connections + 1) as u64;
    let needed_files = connections_max + OPEN_FILES_HEADROOM;
    let open_files = server::raise_open_files_limit(needed_files)?;
    if open_files < needed_files {
        bail!(
            "{connections_max} connections need about {needed_files} open files, but the hard \
             limit is {open_files}: raise it (ulimit -Hn) or use fewer subscribers"
        );
    }

    let tag = invocation_tag();
    let (child, url, server_process) = match &args.url {
        Some(url) => (None, url.clone(), args.server_pid.map(Process::Pid)),
        None => {
            let child = ChildServer::start(&tag).await?;
            let url = child.url.clone();
            let pid = child.pid;
            eprintln!("started {url} (pid {pid}) for this bench");
            (Some(child), url, Some(Process::Pid(pid)))
        }
    };
    // Ctrl-C ends the run here, so that the child server is still stopped and removed.
    let result = tokio::select! {
        result = run_against(&args, &url, server_process, &tag) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if let Some(child) = child
        && !child.stop().await
    {
        eprintln!("herald: the bench's server did not stop cleanly");
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_table());
    }
    let problems = report.problems();
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

async fn run_against(
    args: &FanoutArgs,
    url: &str,
    server_process: Option<Process>,
    tag: &str,
) -> anyhow::Result<FanoutReport> {
    let key = if args.url.is_some() {
        args.key.clone()
    } else {
        None
    };
    let endpoint = Arc::new(Endpoint::new(url, key.clone())?);
    let client = build_http_client(key.as_deref(), args.publishers)?;
    check_server(&client, &endpoint.http_url).await?;

    let mut report = FanoutReport {
        url: endpoint.http_url.clone(),
        server_measured: server_process.is_some(),
        own_server: args.url.is_none(),
        duration: args.duration,
        batch_size: args.batch_size,
        publishers: args.publishers,
        lag_max: args.lag_max,
        rate: args.rate,
        message_bytes: args.message_bytes,
        ack_every: args.ack_every,
        inflight_max: args.inflight_max,
        rows: Vec::new(),
        idle: None,
    };

    if args.idle_connections > 0 {
        match server_process {
            Some(process) => {
                let idle = measure_idle(&endpoint, process, args.idle_connections, tag).await?;
                eprintln!(
                    "idle {} connections: RSS {} KiB -> {} KiB, {:.1} KiB per connection",
                    idle.connections,
                    idle.rss_before_kib,
                    idle.rss_after_kib,
                    idle.per_connection_kib()
                );
                report.idle = Some(idle);
            }
            None => eprintln!(
                "idle connections: skipped, the server's RSS cannot be read (--url without \
                 --server-pid)"
            ),
        }
    }

    let pad = "x".repeat(
        args.message_bytes
            .saturating_sub(r#"{"sent_us":1700000000000000,"pad":""}"#.len()),
    );
    let acking = Acking {
        ack_every: args.ack_every,
        inflight_max: args.inflight_max,
    };
    for &guarantee in &args.guarantees {
        let counts = match guarantee {
            Guarantee::AtLeastOnce => &args.durable_subscribers,
            _ => &args.subscribers,
        };
        for &subscribers in counts {
            let channel = format!("bench:fanout-{tag}-{}-{subscribers}", guarantee.tag());
            let target = Arc::new(PublishTarget {
                client: client.clone(),
                messages_url: endpoint.messages_url(&channel),
                pad: pad.clone(),
            });
            let sampling = Arc::new(Sampling::off());
            let mut group = SubscriberGroup::open(
                &endpoint,
                &channel,
                guarantee,
                acking,
                subscribers,
                &sampling,
            )
            .await?;
            let mut phases = Phases {
                args,
                guarantee,
                group: &group,
                target,
                server_process,
                metrics: Metrics {
                    client: client.clone(),
                    url: format!("{}/metrics", endpoint.http_url),
                },
                top_serial: group.base_serial,
            };
            let throughput = phases.throughput().await;
            eprintln!(
                "{guarantee:>12} x{subscribers:<5} throughput: {}",
                throughput.summary()
            );
            let latency = phases.latency(&sampling).await;
            eprintln!(
                "{guarantee:>12} x{subscribers:<5} latency at {}/s: {}",
                args.rate,
                latency.summary()
            );
            let (failed_subscribers, failures) = group.failures(3);
            group.close().await;
            report.rows.push(FanoutRow {
                guarantee,
                subscribers,
                throughput,
                latency,
                failed_subscribers,
                failures,
            });
        }
    }
    Ok(report)
}

/// The two phases of one subscriber group, run one after the other on its channel.
struct Phases<'a> {
    args: &'a FanoutArgs,
    guarantee: Guarantee,
    group: &'a SubscriberGroup,
    target: Arc<PublishTarget>,
    server_process: Option<Process>,
    metrics: Metrics,
    /// The channel's newest serial: where the next phase starts.
    top_serial: u64,
}

impl Phases<'_> {
    async fn throughput(&mut self) -> ThroughputResult {
        let start = Instant::now();
        let measured_from = start + self.args.warmup;
        let deadline = measured_from + self.args.duration;
        let tally = Arc::new(PublishTally::default());
        let before = self.group.totals();
        let first_serial = self.top_serial;
        let flooding = tokio::spawn(publisher::flood(
            Arc::clone(&self.target),
            FloodConfig {
                publishers: self.args.publishers,
                batch_size: self.args.batch_size,
                deadline,
                messages_max: self.args.max_messages,
                lag_max: self.args.lag_max,
                base_serial: first_serial,
            },
            Arc::clone(&self.group.states),
            Arc::clone(&tally),
        ));
        let window = self.measure_window(measured_from, deadline, &tally).await;
        let _ = flooding.await;
        let check = self.drain_and_check(first_serial, before, &tally).await;
        ThroughputResult { window, check }
    }

    async fn latency(&mut self, sampling: &Sampling) -> LatencyResult {
        let rate = self.args.rate;
        let subscribers = self.group.states.len() as u64;
        let expected_samples =
            (rate as f64 * self.args.duration.as_secs_f64()).ceil() as u64 * subscribers;
        let every = expected_samples.div_ceil(LATENCY_SAMPLES_MAX).max(1);
        let per_subscriber_max = (LATENCY_SAMPLES_MAX / subscribers.max(1)).max(1);
        let start = Instant::now();
        let measured_from = start + self.args.warmup;
        let deadline = measured_from + self.args.duration;
        sampling.every.store(every, Ordering::Relaxed);
        sampling.per_subscriber_max.store(
            usize::try_from(per_subscriber_max).unwrap_or(usize::MAX),
            Ordering::Relaxed,
        );
        sampling.from_us.store(
            subscriber::unix_now_us() + u64::try_from(self.args.warmup.as_micros()).unwrap_or(0),
            Ordering::Relaxed,
        );
        let tally = Arc::new(PublishTally::default());
        let before = self.group.totals();
        let first_serial = self.top_serial;
        let publishing = tokio::spawn(publisher::paced(
            Arc::clone(&self.target),
            rate,
            start,
            deadline,
            self.args.max_messages,
            Arc::clone(&tally),
        ));
        let window = self.measure_window(measured_from, deadline, &tally).await;
        let _ = publishing.await;
        let check = self.drain_and_check(first_serial, before, &tally).await;
        sampling.every.store(0, Ordering::Relaxed);
        sampling.from_us.store(u64::MAX, Ordering::Relaxed);
        let latencies_us = self.group.take_latencies();
        let samples = latencies_us.len();
        let latency = PhaseResult::from_samples(window.delivered, window.seconds, latencies_us);
        LatencyResult {
            rate,
            window,
            latency,
            samples,
            sample_every: every,
            check,
        }
    }

    /// Counters at the start and the end of the measured window.
    async fn measure_window(
        &self,
        measured_from: Instant,
        deadline: Instant,
        tally: &PublishTally,
    ) -> Window {
        tokio::time::sleep_until(measured_from.into()).await;
        let start = Snapshot::take(self.group, tally, self.server_process, &self.metrics).await;
        tokio::time::sleep_until(deadline.into()).await;
        let end = Snapshot::take(self.group, tally, self.server_process, &self.metrics).await;
        Window::between(&start, &end)
    }

    /// Waits until every subscriber has the phase's last serial (at-most-once: or until
    /// nothing arrives for [`QUIET_PERIOD`]), bounded by `--drain-timeout`; then counts what
    /// the phase published and what did not arrive.
    async fn drain_and_check(
        &mut self,
        first_serial: u64,
        before: GroupTotals,
        tally: &PublishTally,
    ) -> DeliveryCheck {
        let top_serial = tally.top_serial.load(Ordering::Relaxed).max(first_serial);
        let started = Instant::now();
        let drain_deadline = started + self.args.drain_timeout;
        let mut last_progress = (self.group.totals(), Instant::now());
        let drained = loop {
            if self.group.all_reached(top_serial) {
                break true;
            }
            let now = Instant::now();
            if now >= drain_deadline {
                break false;
            }
            let totals = self.group.totals();
            if totals != last_progress.0 {
                last_progress = (totals, now);
            } else if self.guarantee == Guarantee::AtMostOnce
                && now.duration_since(last_progress.1) >= QUIET_PERIOD
            {
                break true;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        };
        self.top_serial = top_serial;
        let totals = self.group.totals().since(before);
        let messages = top_serial - first_serial;
        let expected = messages * self.group.states.len() as u64;
        DeliveryCheck {
            messages,
            expected_deliveries: expected,
            not_delivered: expected.saturating_sub(totals.new_serials),
            violations: totals.violations,
            redeliveries: totals.redeliveries,
            gap_notices: totals.gap_notices,
            unexpected_frames: totals.unexpected_frames,
            drain: started.elapsed(),
            drained,
            publish_errors: tally.errors(),
        }
    }
}

/// Counters read at one moment.
pub(crate) struct Snapshot {
    pub(crate) at: Instant,
    pub(crate) totals: GroupTotals,
    pub(crate) acked: u64,
    pub(crate) server_cpu_us: Option<u64>,
    pub(crate) bench_cpu_us: Option<u64>,
    /// `None` when `/metrics` could not be read.
    pub(crate) server: Option<ServerCounters>,
}

impl Snapshot {
    async fn take(
        group: &SubscriberGroup,
        tally: &PublishTally,
        server: Option<Process>,
        metrics: &Metrics,
    ) -> Snapshot {
        // `/metrics` first: its request is the slow part, and the counters taken after it line
        // up with the instant the window starts or ends.
        let counters = metrics.read().await;
        Snapshot {
            at: Instant::now(),
            totals: group.totals(),
            acked: tally.acked.load(Ordering::Relaxed),
            server_cpu_us: server.and_then(|process| process.cpu_time_us().ok()),
            bench_cpu_us: Process::This.cpu_time_us().ok(),
            server: counters,
        }
    }
}

/// The server's `/metrics`, read for the counters of [`ServerCounters`].
struct Metrics {
    client: reqwest::Client,
    url: String,
}

impl Metrics {
    /// The counters, or `None` if the request failed (a window then shows no server figures).
    async fn read(&self) -> Option<ServerCounters> {
        let response = self.client.get(&self.url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        Some(ServerCounters::parse(&response.text().await.ok()?))
    }
}

async fn measure_idle(
    endpoint: &Arc<Endpoint>,
    process: Process,
    connections: usize,
    tag: &str,
) -> anyhow::Result<IdleResult> {
    let channel = format!("bench:fanout-{tag}-idle");
    let sampling = Arc::new(Sampling::off());
    // One connection first, so that what the first subscriber of a channel costs (the
    // channel's live state) is in the "before" figure, not spread over the others.
    let acking = Acking {
        ack_every: 1,
        inflight_max: 1,
    };
    let mut warm = SubscriberGroup::open(
        endpoint,
        &channel,
        Guarantee::ExactlyOnce,
        acking,
        1,
        &sampling,
    )
    .await?;
    let before = settled_rss_kib(process).await;
    let opened = SubscriberGroup::open(
        endpoint,
        &channel,
        Guarantee::ExactlyOnce,
        acking,
        connections,
        &sampling,
    )
    .await;
    let mut group = match opened {
        Ok(group) => group,
        Err(error) => {
            warm.close().await;
            return Err(error);
        }
    };
    let after = settled_rss_kib(process).await;
    let (failed, failures) = group.failures(3);
    group.close().await;
    warm.close().await;
    let (before, after) = (before?, after?);
    if failed > 0 {
        bail!("{failed} idle connections failed: {}", failures.join("; "));
    }
    Ok(IdleResult {
        connections,
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

/// The process's RSS once two readings [`RSS_SETTLE_STEP`] apart agree within
/// [`RSS_SETTLE_TOLERANCE_KIB`] (or [`RSS_SETTLE_MAX`] passed).
async fn settled_rss_kib(process: Process) -> anyhow::Result<u64> {
    let give_up = Instant::now() + RSS_SETTLE_MAX;
    tokio::time::sleep(RSS_SETTLE_FIRST).await;
    let mut previous = process.rss_kib()?;
    loop {
        tokio::time::sleep(RSS_SETTLE_STEP).await;
        let current = process.rss_kib()?;
        if current.abs_diff(previous) <= RSS_SETTLE_TOLERANCE_KIB || Instant::now() >= give_up {
            return Ok(current);
        }
        previous = current;
    }
}

fn build_http_client(key: Option<&str>, publishers: usize) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = key {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .pool_max_idle_per_host(publishers.max(16))
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use herald_protocol::MessageBody;

    use super::server::{parse_stat_cpu_ticks, parse_status_rss_kib};
    use super::subscriber::{SENT_US_KEY, position_serial, scan_number};
    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        fanout: FanoutArgs,
    }

    fn parse(args: &[&str]) -> Result<FanoutArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("fanout").chain(args.iter().copied()))
            .map(|cli| cli.fanout)
    }

    #[test]
    fn defaults_are_the_issue_s_settings() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.subscribers, vec![1, 100, 1000]);
        assert_eq!(
            args.guarantees,
            vec![
                Guarantee::AtMostOnce,
                Guarantee::ExactlyOnce,
                Guarantee::AtLeastOnce
            ]
        );
        // Issue #5: at-least-once to 1 and to 100 durable subscribers.
        assert_eq!(args.durable_subscribers, vec![1, 100]);
        assert_eq!((args.ack_every, args.inflight_max), (16, 100));
        assert_eq!(args.rate, 1000);
        assert_eq!(args.idle_connections, 1000);
        assert_eq!(args.duration, Duration::from_secs(5));
        assert!(parse(&["--subscribers", "0"]).is_err());
        assert!(parse(&["--ack-every", "0"]).is_err());
        assert!(parse(&["--guarantees", "at-least-twice"]).is_err());
        assert_eq!(
            parse(&["--guarantees", "at-least-once"])
                .unwrap()
                .guarantees,
            vec![Guarantee::AtLeastOnce]
        );
        assert!(
            parse(&["--server-pid", "1"]).is_err(),
            "--server-pid needs --url"
        );
        assert_eq!(
            parse(&["--idle-connections", "0"])
                .unwrap()
                .idle_connections,
            0
        );
    }

    #[test]
    fn the_scanner_reads_what_the_server_sends() {
        // The frame as herald-protocol encodes it for every subscriber, with the bench's data.
        let body: MessageBody = serde_json::from_str(
            r#"{"id":"a\"serial\":9","channel":"bench:x","serial":41,"epoch":"E1","position":"E1:41",
                "prev":40,"chain":"00ff","time":1700000000000,
                "data":{"sent_us":1700000000123456,"pad":"xx"}}"#,
        )
        .unwrap();
        let frame = herald_protocol::ws::delivery_json(&body);
        let rest = frame
            .strip_prefix(super::subscriber::MESSAGE_PREFIX)
            .unwrap();
        assert_eq!(scan_number(rest, super::subscriber::SERIAL_KEY), Some(41));
        assert_eq!(
            scan_number(&frame, SENT_US_KEY),
            Some(1_700_000_000_123_456)
        );
        assert_eq!(
            scan_number(r#"{"serial":"x"}"#, super::subscriber::SERIAL_KEY),
            None
        );
        assert_eq!(position_serial("E1:41"), Some(41));
        assert_eq!(position_serial("41"), None);
        // An at-least-once delivery: the count comes first, the serial is still found.
        let counted = herald_protocol::ws::with_delivery_count(&frame, 3);
        let rest = counted
            .strip_prefix(super::subscriber::MESSAGE_PREFIX)
            .unwrap();
        assert!(rest.starts_with(super::subscriber::DELIVERY_KEY));
        assert_eq!(scan_number(rest, super::subscriber::DELIVERY_KEY), Some(3));
        assert_eq!(scan_number(rest, super::subscriber::SERIAL_KEY), Some(41));
    }

    #[test]
    fn the_publish_body_carries_the_send_time() {
        let body = publisher::batch_body(3, 1_700_000_000_000_001, "xx");
        let value: Value = serde_json::from_str(&body).unwrap();
        let messages = value["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[2]["data"]["sent_us"], 1_700_000_000_000_001u64);
        assert_eq!(scan_number(&body, SENT_US_KEY), Some(1_700_000_000_000_001));
    }

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (herald serve) S 1 1234 1234 0 -1 4194304 500 0 0 0 \
                    250 70 0 0 20 0 4 0 100 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(320));
        let status = "Name:\therald\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_status_rss_kib(status), Some(12_345));
        assert_eq!(parse_status_rss_kib("Name:\tx\n"), None);
        // Our own process, for real.
        assert!(Process::This.rss_kib().unwrap() > 0);
        Process::This.cpu_time_us().unwrap();
    }
}
