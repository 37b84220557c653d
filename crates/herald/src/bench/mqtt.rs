//! `herald bench mqtt`: the same MQTT load generator against Herald and against Mosquitto in
//! one run (issue #6): 1 publisher -> N subscribers on one topic, at QoS 0, 1 and 2.
//!
//! # What it measures
//!
//! The bench starts each broker itself on a free loopback port: Herald is this executable
//! (`serve --dev --mqtt 127.0.0.1:0`, fresh data directory), Mosquitto the `mosquitto` binary
//! (`--mosquitto PATH`, else `/usr/sbin/mosquitto` or `PATH`) with a generated config:
//! anonymous access and `persistence false`, so Mosquitto keeps QoS >= 1 messages in memory
//! while Herald appends every PUBLISH to its log and acknowledges QoS >= 1 only after the
//! fsync. When Mosquitto is not installed the bench says so and measures Herald alone. Both
//! run for the whole bench; the cases take turns on them, so the two rows of one case are
//! measured close together in time.
//!
//! For each QoS (`--qos`, default 0,1,2), subscriber count N (`--subscribers`, default
//! 1,100) and broker: N subscribers subscribe at that QoS to a fresh topic, one publisher
//! publishes to it at that QoS, and two phases run:
//!
//! - **Throughput**: the publisher at full speed, with at most `--inflight` unacknowledged
//!   QoS 1/2 publishes (rumqttc's window) and never more than `--lag-max` messages ahead of
//!   the slowest subscriber (so the rate measured is one the subscribers kept up with, and no
//!   broker is pushed into dropping from a full queue). Over the measured window: messages
//!   published/s (PUBACK or PUBCOMP received; QoS 0: written), new messages delivered/s summed
//!   over the subscribers, the broker's CPU (from `/proc`) and, for Herald, its group commits
//!   (fsyncs) from `/metrics`.
//! - **Latency**: `--rate` messages/s on a fixed schedule, each stamped when handed to the
//!   client; each subscriber records send-to-receipt for the messages of the measured window:
//!   p50, p99, max (and delivered/s, which falls short of the rate if the broker held the
//!   publisher back).
//!
//! `--sessions clean,persistent` runs every case a second time with subscribers on a
//! persistent session (`clean_session = 0`): Herald saves such a session's state to its log
//! before each batch of deliveries it sends, so the row shows what those saves cost; Mosquitto
//! keeps sessions in memory. The publisher's session is always clean.
//!
//! After each phase the bench waits (at most `--drain-timeout`) for the publisher's acks and
//! for every subscriber to reach the phase's last message, then counts expected deliveries
//! that never arrived and messages received twice or out of order.
//!
//! # Layout
//!
//! - this file: the arguments, the run loop and the phases;
//! - [`clients`]: the rumqttc publisher and subscribers; [`broker`]: the broker processes and
//!   Herald's `/metrics`; [`report`]: the table, the comparison, the JSON.
//!
//! # Invariants
//!
//! - Every phase is bounded in time (warm-up + duration + drain timeout) and in messages
//!   (`--max-messages`); latency samples are bounded by [`LATENCY_SAMPLES_MAX`].
//! - Client failures, QoS >= 1 messages not acknowledged or not delivered, and QoS 2
//!   duplicates make the command fail after the report is printed. QoS 0 losses are counted.
//! - Traffic goes only to the brokers the bench started on 127.0.0.1; they are stopped on
//!   every path.

mod broker;
mod clients;
mod report;

use self::broker::{Broker, BrokerProcess, HeraldCounters};
use self::clients::{Endpoint, Publisher, PublisherEvents, Sampling, SessionKind, SubscriberGroup};
use self::clients::{clock_us, qos_of};
use self::report::{BrokerInfo, DeliveryCheck, LatencyRow, MqttReport, Settings};
use self::report::{ThroughputRow, Window};
use super::fanout::server::{Process, raise_open_files_limit};
use super::*;

/// Upper bound on one subscriber count (each subscriber is a connection).
const SUBSCRIBERS_MAX: usize = 1000;
/// Total latency samples kept per phase, over all subscribers.
const LATENCY_SAMPLES_MAX: usize = 2_000_000;
/// File descriptors beyond the connections: the runtime, the HTTP client, stdio.
const OPEN_FILES_HEADROOM: u64 = 256;
/// How long the full-speed publisher waits before looking at the subscribers' progress again.
const LAG_POLL: Duration = Duration::from_millis(1);
/// A QoS 0 drain ends when nothing arrives for this long (dropped messages never will).
const QUIET_PERIOD: Duration = Duration::from_secs(1);
/// How often a drain looks at the subscribers.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// Failure reasons kept per phase.
const FAILURES_SHOWN: usize = 3;

/// Arguments of `herald bench mqtt`.
#[derive(clap::Args, Debug)]
pub struct MqttArgs {
    /// Brokers to measure (comma separated): herald, mosquitto. Mosquitto is skipped, with a
    /// notice, when it is not installed.
    #[arg(long, value_delimiter = ',', default_value = "herald,mosquitto", value_parser = Broker::parse)]
    pub(crate) brokers: Vec<Broker>,

    /// The Mosquitto broker binary (default: /usr/sbin/mosquitto, else `mosquitto` on PATH).
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,

    /// QoS levels to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2", value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: Vec<u8>,

    /// Subscriber counts, one case each (comma separated); every case has one publisher.
    #[arg(long, value_delimiter = ',', default_value = "1,100", value_parser = parse_subscribers)]
    pub subscribers: Vec<usize>,

    /// The subscribers' sessions, one run of every case each (comma separated): clean,
    /// persistent (`clean_session = 0`; Herald saves the session before each delivery batch).
    #[arg(long, value_delimiter = ',', default_value = "clean", value_parser = SessionKind::parse)]
    pub(crate) sessions: Vec<SessionKind>,

    /// Measured time of each phase (after the warm-up), e.g. `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Unmeasured warm-up at the start of each phase.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Messages per second of the latency phase (fixed schedule).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,

    /// The publisher's window: QoS 1/2 publishes sent and not yet acknowledged, at most. Also
    /// Mosquitto's max_inflight_messages (Herald's limits default to 64).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,

    /// Throughput phase: the most messages the publisher may be ahead of the slowest
    /// subscriber. The default stays under both brokers' per-client queues (Mosquitto's
    /// max_queued_messages and Herald's mqtt.outbound_queue_messages, 1000 and 1024).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub lag_max: u64,

    /// Maximum messages published per phase (warm-up included).
    #[arg(long, default_value_t = 5_000_000)]
    pub max_messages: u64,

    /// Size of each PUBLISH payload in bytes (16 of them are the sequence number and the
    /// send time).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub message_bytes: u64,

    /// After each phase, how long to wait for the acks and for the subscribers to receive
    /// everything published.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_subscribers(text: &str) -> Result<usize, String> {
    parse_count(text, SUBSCRIBERS_MAX)
}

/// Runs `herald bench mqtt`: progress on stderr, the report on stdout. Fails after the report
/// if a client failed or a QoS >= 1 message was lost or duplicated.
pub async fn run(args: MqttArgs) -> anyhow::Result<()> {
    let mut brokers_asked = args.brokers.clone();
    brokers_asked.sort();
    brokers_asked.dedup();
    let connections_max = args.subscribers.iter().copied().max().unwrap_or(0) as u64 + 1;
    let needed_files = 2 * connections_max + OPEN_FILES_HEADROOM;
    let open_files = raise_open_files_limit(needed_files)?;
    if open_files < needed_files {
        bail!(
            "{connections_max} connections need about {needed_files} open files, but the hard \
             limit is {open_files}: raise it (ulimit -Hn) or use fewer subscribers"
        );
    }

    let tag = invocation_tag();
    let mut skipped = Vec::new();
    let mut brokers = Vec::new();
    for broker in brokers_asked {
        let started = match broker {
            Broker::Herald => BrokerProcess::start_herald(&tag).await,
            Broker::Mosquitto => match broker::find_mosquitto(args.mosquitto.as_deref()) {
                Some(binary) => BrokerProcess::start_mosquitto(&binary, &tag, args.inflight).await,
                None => {
                    let reason = format!(
                        "mosquitto: not installed (no {}); install it with `apt-get install \
                         mosquitto` to compare; measuring Herald alone",
                        args.mosquitto
                            .as_deref()
                            .unwrap_or(Path::new(broker::MOSQUITTO_DEFAULT_PATH))
                            .display()
                    );
                    eprintln!("herald bench mqtt: {reason}");
                    skipped.push(reason);
                    continue;
                }
            },
        };
        match started {
            Ok(process) => {
                eprintln!(
                    "started {} on mqtt://127.0.0.1:{} (pid {}) for this bench",
                    process.version, process.mqtt_port, process.pid
                );
                brokers.push(process);
            }
            // Dropping the started ones stops them.
            Err(error) => return Err(error.context(format!("starting {}", broker.as_str()))),
        }
    }
    if brokers.is_empty() {
        bail!("no broker to measure");
    }

    // Ctrl-C ends the run here, so that the brokers are still stopped and removed.
    let result = tokio::select! {
        result = run_cases(&args, &brokers, &tag) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let infos: Vec<BrokerInfo> = brokers
        .iter()
        .map(|process| BrokerInfo {
            broker: process.broker,
            version: process.version.clone(),
            pid: process.pid,
        })
        .collect();
    for process in brokers {
        let name = process.broker.as_str();
        if !process.stop().await {
            eprintln!("herald: the bench's {name} did not stop cleanly");
        }
    }
    let (throughput, latency, case_errors) = result?;
    let report = MqttReport {
        brokers: infos,
        skipped,
        settings: Settings {
            message_bytes: args.message_bytes as usize,
            inflight: args.inflight,
            lag_max: args.lag_max,
            rate: args.rate,
            duration: args.duration,
            warmup: args.warmup,
        },
        throughput,
        latency,
        case_errors,
    };
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

type CaseRows = (Vec<ThroughputRow>, Vec<LatencyRow>, Vec<String>);

/// Every case on every broker, the brokers taking turns case by case.
async fn run_cases(
    args: &MqttArgs,
    brokers: &[BrokerProcess],
    tag: &str,
) -> anyhow::Result<CaseRows> {
    let metrics_client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    let mut case_errors = Vec::new();
    let mut sessions = args.sessions.clone();
    sessions.sort();
    sessions.dedup();
    for &qos in &args.qos {
        for &subscribers in &args.subscribers {
            for &session in &sessions {
                for process in brokers {
                    let case = Case {
                        args,
                        process,
                        qos,
                        subscribers,
                        session,
                        metrics_client: &metrics_client,
                    };
                    match case.run(tag).await {
                        Ok((throughput_row, latency_row)) => {
                            throughput.push(throughput_row);
                            latency.push(latency_row);
                        }
                        Err(error) => {
                            let message = format!("{}: {error:#}", case.label());
                            eprintln!("{message}");
                            case_errors.push(message);
                        }
                    }
                }
            }
        }
    }
    Ok((throughput, latency, case_errors))
}

/// One broker, QoS, subscriber count and subscriber session.
struct Case<'a> {
    args: &'a MqttArgs,
    process: &'a BrokerProcess,
    qos: u8,
    subscribers: usize,
    session: SessionKind,
    metrics_client: &'a reqwest::Client,
}

impl Case<'_> {
    fn label(&self) -> String {
        let session = self.session.label_suffix();
        format!(
            "{:<9} qos {} 1->{:<4}{session}",
            self.process.broker.as_str(),
            self.qos,
            self.subscribers
        )
    }

    async fn run(&self, tag: &str) -> anyhow::Result<(ThroughputRow, LatencyRow)> {
        let endpoint = Endpoint {
            port: self.process.mqtt_port,
            password: None,
            message_bytes: self.args.message_bytes as usize,
            inflight: self.args.inflight,
            subscriber_session: self.session,
        };
        let name = format!(
            "{tag}-{}-q{}-n{}-{}",
            self.process.broker.as_str(),
            self.qos,
            self.subscribers,
            self.session.as_str()
        );
        let topic = format!("bench/mqtt-{name}");
        let qos = qos_of(self.qos);
        let sampling = Arc::new(Sampling::off());
        let group = SubscriberGroup::open(
            &endpoint,
            &format!("bench-{name}"),
            &topic,
            qos,
            self.subscribers,
            &sampling,
        )
        .await?;
        let publisher =
            match Publisher::open(&endpoint, &format!("bench-{name}-p"), &topic, qos).await {
                Ok(publisher) => publisher,
                Err(error) => {
                    group.close().await;
                    return Err(error);
                }
            };
        let mut phases = Phases {
            case: self,
            group,
            publisher,
            sampling,
        };
        let throughput = phases.throughput().await;
        eprintln!(
            "{}  throughput: {:>10.0} published/s {:>11.0} delivered/s  broker {:.2} cores  \
             not delivered {}",
            self.label(),
            throughput.window.published_per_second(),
            throughput.window.delivered_per_second(),
            throughput.window.broker_cpu_cores().unwrap_or(0.0),
            throughput.check.not_delivered
        );
        let latency = phases.latency().await;
        eprintln!(
            "{}  latency at {}/s: p50 {} p99 {} max {} ({} samples)  not delivered {}",
            self.label(),
            self.args.rate,
            format_us(latency.latency.p50_us),
            format_us(latency.latency.p99_us),
            format_us(latency.latency.max_us),
            latency.samples,
            latency.check.not_delivered
        );
        phases.publisher.close().await;
        phases.group.close().await;
        Ok((throughput, latency))
    }
}

/// The two phases of one case, on one subscriber group and publisher.
struct Phases<'a> {
    case: &'a Case<'a>,
    group: SubscriberGroup,
    publisher: Publisher,
    sampling: Arc<Sampling>,
}

impl Phases<'_> {
    async fn throughput(&mut self) -> ThroughputRow {
        let args = self.case.args;
        let measured_from = Instant::now() + args.warmup;
        let deadline = measured_from + args.duration;
        let first_seq = self.publisher.issued();
        let before = self.group.totals();
        let events = self.publisher.events();
        let (published, window) = tokio::join!(
            flood(
                &mut self.publisher,
                &self.group,
                deadline,
                args.max_messages,
                args.lag_max
            ),
            measure_window(self.case, &self.group, &events, measured_from, deadline),
        );
        let check = self.drain_and_check(first_seq, before, published).await;
        ThroughputRow {
            broker: self.case.process.broker,
            qos: self.case.qos,
            subscribers: self.group.len(),
            session: self.case.session,
            window,
            check,
        }
    }

    async fn latency(&mut self) -> LatencyRow {
        let args = self.case.args;
        let start = Instant::now();
        let measured_from = start + args.warmup;
        let deadline = measured_from + args.duration;
        let per_subscriber_max = (LATENCY_SAMPLES_MAX / self.group.len().max(1)).max(1);
        self.sampling
            .per_subscriber_max
            .store(per_subscriber_max, Ordering::Relaxed);
        self.sampling
            .from_us
            .store(clock_us(measured_from), Ordering::Relaxed);
        let first_seq = self.publisher.issued();
        let before = self.group.totals();
        let events = self.publisher.events();
        let (published, window) = tokio::join!(
            paced(
                &mut self.publisher,
                args.rate,
                start,
                deadline,
                args.max_messages
            ),
            measure_window(self.case, &self.group, &events, measured_from, deadline),
        );
        let check = self.drain_and_check(first_seq, before, published).await;
        self.sampling.from_us.store(u64::MAX, Ordering::Relaxed);
        let latencies_us = self.group.take_latencies();
        let samples = latencies_us.len();
        LatencyRow {
            broker: self.case.process.broker,
            qos: self.case.qos,
            subscribers: self.group.len(),
            session: self.case.session,
            rate: args.rate,
            latency: PhaseResult::from_samples(window.delivered, window.seconds, latencies_us),
            window,
            samples,
            check,
        }
    }

    /// Waits until the publisher's messages are all done and every subscriber reached the
    /// last one (QoS 0: or nothing arrived for [`QUIET_PERIOD`]), bounded by
    /// `--drain-timeout`; then counts what the phase published and what did not arrive.
    async fn drain_and_check(
        &mut self,
        first_seq: u64,
        before: clients::GroupTotals,
        published: anyhow::Result<()>,
    ) -> DeliveryCheck {
        let issued = self.publisher.issued();
        let started = Instant::now();
        let drain_deadline = started + self.case.args.drain_timeout;
        let mut last_progress = (self.group.totals(), self.publisher.done(), started);
        let drained = loop {
            let (failed, _) = self.group.failures(0);
            if failed > 0 || self.publisher.failure().is_some() {
                break false;
            }
            if self.publisher.done() >= issued && self.group.min_next_seq() >= issued {
                break true;
            }
            let now = Instant::now();
            if now >= drain_deadline {
                break false;
            }
            let progress = (self.group.totals(), self.publisher.done());
            if progress != (last_progress.0, last_progress.1) {
                last_progress = (progress.0, progress.1, now);
            } else if self.case.qos == 0 && now.duration_since(last_progress.2) >= QUIET_PERIOD {
                break true;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        };
        let totals = self.group.totals().since(before);
        let messages = issued - first_seq;
        let expected = messages * self.group.len() as u64;
        let publisher_failure = match published {
            Err(error) => Some(format!("{error:#}")),
            Ok(()) => self
                .publisher
                .failure()
                .map(|failure| format!("publisher: {failure}")),
        };
        let (failed_subscribers, subscriber_failures) = self.group.failures(FAILURES_SHOWN);
        let failed_clients = failed_subscribers + usize::from(publisher_failure.is_some());
        let failures: Vec<String> = publisher_failure
            .into_iter()
            .chain(subscriber_failures)
            .collect();
        DeliveryCheck {
            messages,
            expected_deliveries: expected,
            not_delivered: expected.saturating_sub(totals.delivered),
            late: totals.late,
            malformed: totals.malformed,
            unacknowledged: issued.saturating_sub(self.publisher.done()),
            drained,
            drain: started.elapsed(),
            failed_clients,
            failures,
        }
    }
}

/// The publisher at full speed until `deadline` (at most `messages_max` messages), never more
/// than `lag_max` messages ahead of the slowest subscriber.
async fn flood(
    publisher: &mut Publisher,
    group: &SubscriberGroup,
    deadline: Instant,
    messages_max: u64,
    lag_max: u64,
) -> anyhow::Result<()> {
    let first_seq = publisher.issued();
    // Messages that may still go before the subscribers' progress is looked at again.
    let mut room: u64 = 0;
    while Instant::now() < deadline && publisher.issued() - first_seq < messages_max {
        if room == 0 {
            let lag = publisher.issued().saturating_sub(group.min_next_seq());
            room = lag_max.saturating_sub(lag);
            if room == 0 {
                tokio::time::sleep(LAG_POLL).await;
                continue;
            }
        }
        publisher.send(clock_us(Instant::now())).await?;
        room -= 1;
    }
    Ok(())
}

/// `rate` messages/s from `start` until `deadline` (at most `messages_max`). The schedule is
/// fixed: a late message does not push the later ones back. Each message is stamped when it is
/// handed to the client rather than with its scheduled time, so that the runtime's timer
/// granularity (about 1 ms) is not counted as broker latency; a broker that holds the
/// publisher back (a full window) shows as a lower delivered/s instead.
async fn paced(
    publisher: &mut Publisher,
    rate: u64,
    start: Instant,
    deadline: Instant,
    messages_max: u64,
) -> anyhow::Result<()> {
    let first_seq = publisher.issued();
    let scheduled = |n: u64| start + Duration::from_secs_f64(n as f64 / rate as f64);
    loop {
        let now = Instant::now();
        let sent = publisher.issued() - first_seq;
        if now >= deadline || sent >= messages_max {
            return Ok(());
        }
        let due = ((now - start).as_secs_f64() * rate as f64) as u64 + 1;
        for _ in sent..due.min(messages_max) {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            publisher.send(clock_us(now)).await?;
        }
        let next = scheduled(publisher.issued() - first_seq);
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Counters at the start and at the end of the measured window.
async fn measure_window(
    case: &Case<'_>,
    group: &SubscriberGroup,
    publisher: &PublisherEvents,
    measured_from: Instant,
    deadline: Instant,
) -> Window {
    tokio::time::sleep_until(measured_from.into()).await;
    let start = Snapshot::take(case, group, publisher).await;
    tokio::time::sleep_until(deadline.into()).await;
    let end = Snapshot::take(case, group, publisher).await;
    Window::between(&start, &end)
}

/// Counters read at one moment.
pub(crate) struct Snapshot {
    pub(crate) at: Instant,
    pub(crate) published: u64,
    pub(crate) acks_out_of_order: u64,
    pub(crate) delivered: u64,
    pub(crate) broker_cpu_us: Option<u64>,
    pub(crate) bench_cpu_us: Option<u64>,
    pub(crate) herald: Option<HeraldCounters>,
}

impl Snapshot {
    async fn take(
        case: &Case<'_>,
        group: &SubscriberGroup,
        publisher: &PublisherEvents,
    ) -> Snapshot {
        // `/metrics` first: its request is the slow part, and the counters taken after it line
        // up with the instant the window starts or ends.
        let herald = match &case.process.http_url {
            Some(url) => broker::read_metrics(case.metrics_client, url).await,
            None => None,
        };
        Snapshot {
            at: Instant::now(),
            published: publisher.done.load(Ordering::Relaxed),
            acks_out_of_order: publisher.acks_out_of_order.load(Ordering::Relaxed),
            delivered: group.totals().delivered,
            broker_cpu_us: Process::Pid(case.process.pid).cpu_time_us().ok(),
            bench_cpu_us: Process::This.cpu_time_us().ok(),
            herald,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::broker::mosquitto_config;
    use super::clients::{PAYLOAD_HEADER_BYTES, decode_payload, encode_payload};
    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mqtt: MqttArgs,
    }

    fn parse(args: &[&str]) -> Result<MqttArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("mqtt").chain(args.iter().copied())).map(|cli| cli.mqtt)
    }

    #[test]
    fn defaults_are_the_issue_s_cases() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.brokers, vec![Broker::Herald, Broker::Mosquitto]);
        assert_eq!(args.qos, vec![0, 1, 2]);
        assert_eq!(args.subscribers, vec![1, 100]);
        assert_eq!(args.rate, 1000);
        assert_eq!(args.inflight, 64);
        assert!(parse(&["--qos", "3"]).is_err());
        assert!(parse(&["--brokers", "emqx"]).is_err());
        assert!(parse(&["--subscribers", "0"]).is_err());
        assert!(
            parse(&["--message-bytes", "8"]).is_err(),
            "shorter than the header"
        );
        assert_eq!(
            parse(&["--brokers", "mosquitto"]).unwrap().brokers,
            vec![Broker::Mosquitto]
        );
    }

    #[test]
    fn payload_carries_sequence_and_send_time() {
        let payload = encode_payload(42, 1_234_567, 64);
        assert_eq!(payload.len(), 64);
        assert_eq!(decode_payload(&payload), Some((42, 1_234_567)));
        // Never shorter than the header, whatever the size asked.
        assert_eq!(encode_payload(1, 2, 3).len(), PAYLOAD_HEADER_BYTES);
        assert_eq!(decode_payload(b"short"), None);
    }

    #[test]
    fn mosquitto_config_is_loopback_anonymous_and_in_memory() {
        let config = mosquitto_config(18830, 64);
        let lines: Vec<&str> = config.lines().collect();
        assert!(lines.contains(&"listener 18830 127.0.0.1"), "{config}");
        assert!(lines.contains(&"allow_anonymous true"), "{config}");
        assert!(lines.contains(&"persistence false"), "{config}");
        assert!(lines.contains(&"max_inflight_messages 64"), "{config}");
    }

    #[test]
    fn herald_metrics_parse() {
        let text = "# TYPE herald_store_group_commits_total counter\n\
                    herald_store_group_commits_total 120\n\
                    herald_mqtt_publishes_durable_total 5000\n\
                    herald_mqtt_deliveries_dropped_total 3\n\
                    herald_store_state_saves_total 40\n\
                    herald_other 9\n";
        let counters = HeraldCounters::parse(text);
        assert_eq!(
            counters,
            HeraldCounters {
                group_commits: 120,
                publishes_durable: 5000,
                deliveries_dropped: 3,
                state_saves: 40,
            }
        );
        let before = HeraldCounters {
            group_commits: 20,
            publishes_durable: 1000,
            deliveries_dropped: 3,
            state_saves: 10,
        };
        assert_eq!(counters.since(before).group_commits, 100);
        assert_eq!(counters.since(before).state_saves, 30);
        assert_eq!(HeraldCounters::parse(""), HeraldCounters::default());
    }

    fn throughput_row(
        broker: Broker,
        qos: u8,
        delivered: u64,
        check: DeliveryCheck,
    ) -> ThroughputRow {
        ThroughputRow {
            broker,
            qos,
            subscribers: 100,
            session: SessionKind::Clean,
            window: Window {
                seconds: 2.0,
                published: delivered / 100,
                delivered,
                broker_cpu_us: Some(1_000_000),
                ..Window::default()
            },
            check,
        }
    }

    fn report(throughput: Vec<ThroughputRow>) -> MqttReport {
        MqttReport {
            brokers: Vec::new(),
            skipped: Vec::new(),
            settings: Settings {
                message_bytes: 64,
                inflight: 64,
                lag_max: 1000,
                rate: 1000,
                duration: Duration::from_secs(2),
                warmup: Duration::from_secs(1),
            },
            throughput,
            latency: Vec::new(),
            case_errors: Vec::new(),
        }
    }

    #[test]
    fn comparison_is_herald_over_mosquitto_per_case() {
        let report = report(vec![
            throughput_row(Broker::Herald, 1, 300_000, DeliveryCheck::default()),
            throughput_row(Broker::Mosquitto, 1, 200_000, DeliveryCheck::default()),
            throughput_row(Broker::Herald, 2, 100_000, DeliveryCheck::default()),
            throughput_row(Broker::Mosquitto, 2, 200_000, DeliveryCheck::default()),
        ]);
        let comparisons = report.comparisons();
        assert_eq!(comparisons.len(), 2);
        assert!((comparisons[0].ratio - 1.5).abs() < 1e-9 && comparisons[0].met);
        assert!((comparisons[1].ratio - 0.5).abs() < 1e-9 && !comparisons[1].met);
        let table = report.to_table();
        assert!(table.contains("150,000"), "{table}");
        assert!(table.contains(" 150.0%  met"), "{table}");
        assert!(table.contains(" 50.0%  MISSED"), "{table}");
        let json = report.to_json();
        assert_eq!(json["comparison"][1]["met"], false);
        assert_eq!(json["throughput"][0]["delivered_per_second"], 150_000.0);
        assert!(report.problems().is_empty());
    }

    /// A persistent-session row is compared with Mosquitto's persistent-session row of the
    /// same case, never with the clean one.
    #[test]
    fn sessions_are_compared_separately() {
        let persistent = |broker, delivered| ThroughputRow {
            session: SessionKind::Persistent,
            ..throughput_row(broker, 1, delivered, DeliveryCheck::default())
        };
        let report = report(vec![
            throughput_row(Broker::Herald, 1, 300_000, DeliveryCheck::default()),
            throughput_row(Broker::Mosquitto, 1, 200_000, DeliveryCheck::default()),
            persistent(Broker::Herald, 100_000),
            persistent(Broker::Mosquitto, 400_000),
        ]);
        let comparisons = report.comparisons();
        assert_eq!(comparisons.len(), 2);
        assert_eq!(comparisons[0].session, SessionKind::Clean);
        assert!((comparisons[0].ratio - 1.5).abs() < 1e-9);
        assert_eq!(comparisons[1].session, SessionKind::Persistent);
        assert!((comparisons[1].ratio - 0.25).abs() < 1e-9);
        let table = report.to_table();
        assert!(table.contains("qos 1 1->100  persistent"), "{table}");
        assert_eq!(report.to_json()["throughput"][2]["session"], "persistent");
        assert_eq!(
            SessionKind::parse("persistent"),
            Ok(SessionKind::Persistent)
        );
        assert!(SessionKind::parse("dirty").is_err());
    }

    #[test]
    fn losses_are_problems_from_qos_1_and_duplicates_at_qos_2() {
        let lossy = DeliveryCheck {
            not_delivered: 7,
            expected_deliveries: 100,
            ..DeliveryCheck::default()
        };
        let duplicated = DeliveryCheck {
            late: 2,
            ..DeliveryCheck::default()
        };
        let report = report(vec![
            throughput_row(Broker::Herald, 0, 1, lossy.clone()),
            throughput_row(Broker::Herald, 1, 1, duplicated.clone()),
            throughput_row(Broker::Mosquitto, 1, 1, lossy),
            throughput_row(Broker::Herald, 2, 1, duplicated),
        ]);
        let problems = report.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("mosquitto qos 1 1->100 throughput: 7 of 100"));
        assert!(problems[1].contains("received twice or out of order"));
    }
}
