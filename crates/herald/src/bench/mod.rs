//! `herald bench publish`: durable publish throughput and ack latency against a running server,
//! measured beside the raw group-commit limit of the same disk.
//!
//! # What it measures
//!
//! - **Publish phases**, one per `--publishers N`: N closed-loop publishers (tokio tasks sharing
//!   one keep-alive connection pool), each sending one request and waiting for its ack before the
//!   next. A request carries one message, or `--batch-size B` messages as one batch
//!   (`{"messages":[...]}`); throughput counts messages, latency is per request. Every id is
//!   unique (`bench-<run>-<publisher>-<n>`), so each ack is a fresh durable append. The first
//!   `--warmup` of a phase is not measured.
//! - **Log phases**, one per `--publishers N` (unless `--no-log` or `--raw-only`): N tokio tasks
//!   in this process appending one message at a time, closed loop, to a fresh
//!   [`EmbeddedLog`] in a temporary directory under `--raw-dir`. This is the durable-append rate
//!   of the log with no HTTP in the way; with the publish and raw rows it shows which layer sets
//!   the limit. The mean group size (messages per write+fdatasync) comes from
//!   [`EmbeddedLog::stats`].
//! - **Raw phases**, one per `--raw-batches B`: `B` 256-byte records written with one positioned
//!   write and one `fdatasync` per batch into a preallocated, zero-filled, synced file under
//!   `--raw-dir`. This is the best a single committer doing group commit can do on that disk, so
//!   the two target ratios of issue #2 compare the server against it:
//!   (a) publish/s at the largest N over raw records/s at the largest batch (target >= 30%),
//!   (b) ack p50 at 1 publisher over raw p50 at batch 1 (target <= 1.5x).
//! - **HTTP round trip**: closed-loop `GET /health` from one client, the floor under every ack
//!   that no storage work can lower; it tells how much of (b) is HTTP rather than the log.
//!
//! Raw phases run first in each run, then the log phases, then the round trip, then the publish
//! phases, so each run measures disk, log and server close together in time; `--runs K` reports
//! per-figure medians. Two more ratios are reported beside the targets, without a goal: log
//! appends/s at the largest N over raw records/s at the largest batch, and log ack p50 at 1
//! appender over raw p50 at batch 1.
//!
//! # Layout
//!
//! - this file: the arguments, the run loop and small helpers;
//! - [`http_phases`]: publishers and the HTTP round trip; [`log_phases`]: the in-process log;
//!   [`raw_phases`]: the disk; [`stats`]: percentiles and phase results; [`report`]: the table,
//!   the target ratios and the JSON form.
//!
//! # Invariants
//!
//! - Every phase is bounded by its duration and by a maximum operation count, so the latency
//!   vectors (the only per-operation state) are bounded too.
//! - Any publish error (transport or HTTP) is counted by code and makes the command fail after
//!   the report is printed; a benchmark that hid errors would overstate throughput.
//! - The raw file and the log directory are removed on every exit path (guards with `Drop`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use herald_core::{ChannelName, Data, Headers, MessageId, NewMessage, Policies};
use herald_log::{AppendError, EmbeddedLog, EmbeddedOptions, EmbeddedStats, LogStore, SystemClock};
use serde_json::{Value, json};

/// Size of one raw record, the size of a small message record in the embedded log.
const RAW_RECORD_BYTES: usize = 256;
/// Size of the preallocated raw file; writes wrap around inside it so it never grows.
const RAW_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// A publisher gives up after this many errors in a row: the server is gone or refusing.
const CONSECUTIVE_ERRORS_MAX: u32 = 100;
/// No single publish may take longer than this; a hung request is an error, not a stall.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on the publishers of one phase (each one is a connection to the server).
const PUBLISHERS_MAX: usize = 4096;
/// Upper bound on the raw batch size (records per write+fdatasync).
const RAW_BATCH_MAX: usize = 4096;
/// Upper bound on the messages of one publish request: the server's default
/// `limits.batch_messages_max`.
const BATCH_SIZE_MAX: usize = 100;

/// Arguments of `herald bench publish`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Base URL of a running Herald server.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7600")]
    pub url: String,

    /// API key with publish capability on the bench channels. When absent, `<raw-dir>/admin.key`
    /// is used if it exists (so pointing --raw-dir at the server's data dir is enough); a server
    /// started with --dev needs none.
    #[arg(long, env = "HERALD_KEY", hide_env_values = true)]
    pub key: Option<String>,

    /// Concurrent publisher counts, one phase each (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256", value_parser = parse_publishers)]
    pub publishers: Vec<usize>,

    /// Measured time of each publish phase (after the warm-up), e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Unmeasured warm-up at the start of each phase.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Maximum messages per publish phase (warm-up included); the phase ends at whichever of
    /// this and --duration comes first.
    #[arg(long, default_value_t = 500_000)]
    pub max_messages: u64,

    /// Approximate size of each message's JSON `data`, in bytes.
    #[arg(long, default_value_t = 256)]
    pub message_bytes: usize,

    /// Number of channels the messages are spread over.
    #[arg(long, default_value_t = 64)]
    pub channels: usize,

    /// Channels are named `<channel-prefix>:<index>`.
    #[arg(long, default_value = "bench")]
    pub channel_prefix: String,

    /// Directory for the raw write+fdatasync file. Use the server's data directory so both
    /// measure the same disk; defaults to the current directory.
    #[arg(long)]
    pub raw_dir: Option<PathBuf>,

    /// Raw batch sizes (records per write+fdatasync), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256", value_parser = parse_raw_batch)]
    pub raw_batches: Vec<usize>,

    /// Measured time of each raw phase (after the warm-up).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub raw_duration: Duration,

    /// Maximum write+fdatasync batches per raw phase.
    #[arg(long, default_value_t = 200_000)]
    pub raw_max_batches: u64,

    /// Messages per publish request (1 sends a single message; more send a batch).
    #[arg(long, default_value_t = 1, value_parser = parse_batch_size)]
    pub batch_size: usize,

    /// Maximum appends per in-process log phase (warm-up included); the phase ends at whichever
    /// of this and --raw-duration comes first.
    #[arg(long, default_value_t = 2_000_000)]
    pub log_max_appends: u64,

    /// Skip the in-process log phases.
    #[arg(long)]
    pub no_log: bool,

    /// Only measure the disk, not the server (nor the log).
    #[arg(long, conflicts_with = "no_raw")]
    pub raw_only: bool,

    /// Only measure the server, not the disk.
    #[arg(long)]
    pub no_raw: bool,

    /// Repeat every measurement this many times and report medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,

    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_publishers(text: &str) -> Result<usize, String> {
    parse_count(text, PUBLISHERS_MAX)
}

fn parse_raw_batch(text: &str) -> Result<usize, String> {
    parse_count(text, RAW_BATCH_MAX)
}

fn parse_batch_size(text: &str) -> Result<usize, String> {
    parse_count(text, BATCH_SIZE_MAX)
}

/// One element of a comma-separated count list: an integer in `1..=max`.
fn parse_count(text: &str, max: usize) -> Result<usize, String> {
    let value: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if value == 0 || value > max {
        return Err(format!("{value} is out of range 1..={max}"));
    }
    Ok(value)
}

/// Runs `herald bench publish`: prints progress to stderr and the report to stdout. Fails if any
/// publish failed or the disk could not be measured.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.channels == 0 {
        bail!("--channels must be at least 1");
    }
    let raw_dir = args.raw_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let key = match &args.key {
        Some(key) => Some(key.clone()),
        None => read_key_file(&raw_dir.join(herald_server::auth::ADMIN_KEY_FILE))?,
    };
    let invocation = invocation_tag();
    let measure_server = !args.raw_only;
    let measure_disk = !args.no_raw;
    let measure_the_log = !args.raw_only && !args.no_log;

    let client = if measure_server {
        let client = build_client(&args, key.as_deref())?;
        check_server(&client, &args.url).await?;
        Some(client)
    } else {
        None
    };

    let mut publish_runs: BTreeMap<usize, Vec<PhaseResult>> = BTreeMap::new();
    let mut raw_runs: BTreeMap<usize, Vec<PhaseResult>> = BTreeMap::new();
    let mut log_runs: BTreeMap<usize, Vec<LogResult>> = BTreeMap::new();
    let mut round_trip_runs: Vec<PhaseResult> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();

    for run_index in 0..args.runs {
        if measure_disk {
            for &batch_records in &args.raw_batches {
                let config = RawConfig {
                    dir: raw_dir.clone(),
                    batch_records,
                    warmup: args.warmup,
                    duration: args.raw_duration,
                    batches_max: args.raw_max_batches,
                };
                let result = tokio::task::spawn_blocking(move || measure_raw(&config))
                    .await
                    .context("raw disk phase panicked")??;
                eprintln!(
                    "run {}/{}  raw batch {batch_records:>4}: {}",
                    run_index + 1,
                    args.runs,
                    result.summary("records")
                );
                raw_runs.entry(batch_records).or_default().push(result);
            }
        }
        if measure_the_log {
            for &appenders in &args.publishers {
                let config = LogConfig {
                    parent_dir: raw_dir.clone(),
                    run_tag: format!("{invocation}r{run_index}n{appenders}"),
                    appenders,
                    warmup: args.warmup,
                    duration: args.raw_duration,
                    appends_max: args.log_max_appends,
                    channels: args.channels,
                    channel_prefix: args.channel_prefix.clone(),
                    data_json: Bytes::from(payload(args.message_bytes).to_string()),
                };
                let outcome = measure_log(config).await?;
                for (code, count) in &outcome.errors {
                    *errors.entry(format!("log_{code}")).or_default() += count;
                }
                eprintln!(
                    "run {}/{}  log appenders {appenders:>4}: {}  group {}{}",
                    run_index + 1,
                    args.runs,
                    outcome.result.result.summary("appends"),
                    format_group(outcome.result.mean_group_messages),
                    format_errors(&outcome.errors)
                );
                log_runs.entry(appenders).or_default().push(outcome.result);
            }
        }
        if let Some(client) = &client {
            let round_trip = measure_round_trip(
                client,
                &args.url,
                args.warmup,
                args.raw_duration,
                args.max_messages,
            )
            .await;
            for (code, count) in &round_trip.errors {
                *errors.entry(format!("health_{code}")).or_default() += count;
            }
            eprintln!(
                "run {}/{}  http round trip: {}{}",
                run_index + 1,
                args.runs,
                round_trip.result.summary("reqs"),
                format_errors(&round_trip.errors)
            );
            round_trip_runs.push(round_trip.result);
            for &publishers in &args.publishers {
                let config = PublishConfig {
                    url: args.url.clone(),
                    run_tag: format!("{invocation}r{run_index}n{publishers}"),
                    publishers,
                    batch_size: args.batch_size,
                    warmup: args.warmup,
                    duration: args.duration,
                    messages_max: args.max_messages,
                    channels: args.channels,
                    channel_prefix: args.channel_prefix.clone(),
                    payload_json: payload(args.message_bytes).to_string(),
                };
                let outcome = measure_publish(client, config).await;
                for (code, count) in &outcome.errors {
                    *errors.entry(code.clone()).or_default() += count;
                }
                eprintln!(
                    "run {}/{}  {}: {}  {:.0} reqs/s{}",
                    run_index + 1,
                    args.runs,
                    publish_label(publishers, args.batch_size),
                    outcome.result.summary("msgs"),
                    outcome.result.per_second / args.batch_size as f64,
                    format_errors(&outcome.errors)
                );
                publish_runs
                    .entry(publishers)
                    .or_default()
                    .push(outcome.result);
            }
        }
    }

    let report = Report {
        publish: publish_runs
            .iter()
            .map(|(&n, runs)| (n, PhaseResult::median(runs)))
            .collect(),
        batch_size: args.batch_size,
        log: log_runs
            .iter()
            .map(|(&n, runs)| (n, LogResult::median(runs)))
            .collect(),
        raw: raw_runs
            .iter()
            .map(|(&n, runs)| (n, PhaseResult::median(runs)))
            .collect(),
        round_trip: (!round_trip_runs.is_empty()).then(|| PhaseResult::median(&round_trip_runs)),
        errors,
        runs: args.runs,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_table());
    }
    if !report.errors.is_empty() {
        let total: u64 = report.errors.values().sum();
        bail!(
            "{total} operations failed:{}",
            format_errors(&report.errors)
        );
    }
    Ok(())
}

/// A tag unique to this invocation so that repeated benches against the same server never reuse
/// an id (a reused id would be acked as a duplicate, without a new durable append).
fn invocation_tag() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis())
        .unwrap_or_default();
    format!("{millis:x}")
}

fn read_key_file(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|key| !key.is_empty())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

fn build_client(args: &BenchArgs, key: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = key {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let publishers_max = args.publishers.iter().copied().max().unwrap_or(1);
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(publishers_max)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")
}

/// Fails early with a clear message when nothing answers at `url`.
async fn check_server(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let health = format!("{}/health", url.trim_end_matches('/'));
    let response = client
        .get(&health)
        .send()
        .await
        .with_context(|| format!("no Herald server answers at {url}"))?;
    if !response.status().is_success() {
        bail!("{health} answered {}", response.status());
    }
    Ok(())
}

/// JSON data of about `bytes` bytes once serialised compactly.
fn payload(bytes: usize) -> Value {
    // `{"pad":""}` is 10 bytes of framing around the padding.
    let pad_bytes = bytes.saturating_sub(10);
    json!({ "pad": "x".repeat(pad_bytes) })
}

/// The label of a publish phase's row: the batch size shows only when requests carry a batch.
fn publish_label(publishers: usize, batch_size: usize) -> String {
    if batch_size == 1 {
        format!("publishers {publishers}")
    } else {
        format!("publishers {publishers} batch {batch_size}")
    }
}

fn format_group(mean_group_messages: Option<f64>) -> String {
    mean_group_messages
        .map(|messages| format!("{messages:.1} msgs"))
        .unwrap_or_else(|| "-".to_owned())
}

fn format_errors(errors: &BTreeMap<String, u64>) -> String {
    errors
        .iter()
        .map(|(code, count)| format!(" {code}={count}"))
        .collect()
}

pub mod fanout;
mod http_phases;
mod log_phases;
pub mod mqtt;
mod process;
mod raw_phases;
mod report;
mod stats;

use http_phases::*;
use log_phases::*;
use raw_phases::*;
use report::*;
use stats::*;

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .map(|cli| cli.bench)
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 100.0), Some(100));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        // Two samples: the median is the lower one, p99 the higher one.
        assert_eq!(percentile(&[3, 9], 50.0), Some(3));
        assert_eq!(percentile(&[3, 9], 99.0), Some(9));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn phase_result_from_samples() {
        let result = PhaseResult::from_samples(400, 2.0, vec![30, 10, 20, 40]);
        assert_eq!(result.per_second, 200.0);
        assert_eq!((result.p50_us, result.p99_us, result.max_us), (20, 40, 40));
        let empty = PhaseResult::from_samples(0, 0.0, Vec::new());
        assert_eq!((empty.per_second, empty.p50_us), (0.0, 0));
    }

    #[test]
    fn phase_median_is_taken_per_figure() {
        let run = |per_second: f64, p50_us: u64| PhaseResult {
            operations: 10,
            seconds: 1.0,
            per_second,
            p50_us,
            p99_us: p50_us * 2,
            max_us: p50_us * 3,
        };
        let median = PhaseResult::median(&[run(100.0, 9), run(300.0, 1), run(200.0, 5)]);
        assert_eq!(median.per_second, 200.0);
        assert_eq!((median.p50_us, median.p99_us, median.max_us), (5, 10, 15));
    }

    #[test]
    fn publisher_list_parses_and_rejects_bad_counts() {
        let args = parse(&["--publishers", "1, 16,256"]).unwrap();
        assert_eq!(args.publishers, vec![1, 16, 256]);
        assert_eq!(parse(&[]).unwrap().publishers, vec![1, 16, 256]);
        assert!(parse(&["--publishers", "1,0"]).is_err());
        assert!(parse(&["--publishers", "1,x"]).is_err());
        assert!(parse(&["--publishers", "100000"]).is_err());
        assert!(parse(&["--raw-batches", "0"]).is_err());
    }

    #[test]
    fn durations_and_exclusive_modes_parse() {
        let args = parse(&["--duration", "2s", "--warmup", "250ms", "--runs", "5"]).unwrap();
        assert_eq!(args.duration, Duration::from_secs(2));
        assert_eq!(args.warmup, Duration::from_millis(250));
        assert_eq!(args.runs, 5);
        assert!(parse(&["--runs", "0"]).is_err());
        assert!(parse(&["--raw-only", "--no-raw"]).is_err());
    }

    #[test]
    fn payload_has_the_requested_size() {
        let data = serde_json::to_vec(&payload(256)).unwrap();
        assert_eq!(data.len(), 256);
    }

    #[test]
    fn message_body_is_the_json_the_server_expects() {
        let payload_json = payload(64).to_string();
        let body: Value = serde_json::from_str(&message_body("19af0r2n16", 7, 42, &payload_json))
            .expect("valid JSON");
        assert_eq!(body["id"], "bench-19af0r2n16-7-42");
        assert_eq!(body["data"], payload(64));
    }

    #[test]
    fn batch_body_carries_batch_size_messages_with_unique_ids() {
        let payload_json = payload(64).to_string();
        let single = publish_body("t", 3, 5, 1, &payload_json);
        assert_eq!(single, message_body("t", 3, 5, &payload_json));

        let bodies: Vec<Value> = (0..2)
            .map(|request| {
                serde_json::from_str(&publish_body("t", 3, request, 10, &payload_json))
                    .expect("valid JSON")
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        for body in &bodies {
            let messages = body["messages"].as_array().expect("a batch");
            assert_eq!(messages.len(), 10);
            for message in messages {
                assert_eq!(message["data"], payload(64));
                ids.insert(message["id"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(
            ids.len(),
            20,
            "every message of every request has its own id"
        );
        assert_eq!(bodies[1]["messages"][0]["id"], "bench-t-3-10");
        assert_eq!(bodies[1]["messages"][9]["id"], "bench-t-3-19");
    }

    #[test]
    fn batch_body_is_accepted_by_the_protocol() {
        let body = publish_body("t", 0, 0, 3, &payload(32).to_string());
        let request = herald_protocol::publish::PublishRequest::from_json(body.as_bytes())
            .expect("the server's publish body type parses it");
        assert!(matches!(
            request,
            herald_protocol::publish::PublishRequest::Batch(messages) if messages.len() == 3
        ));
    }

    #[test]
    fn acks_are_checked_per_message() {
        let ack = |duplicate: bool| json!({"id": "a", "serial": 1, "duplicate": duplicate});
        assert_eq!(check_ack(&ack(false), 1), Ok(()));
        assert_eq!(
            check_ack(&ack(true), 1),
            Err("unexpected_duplicate".to_owned())
        );
        let batch = json!({"results": [ack(false), ack(false)]});
        assert_eq!(check_ack(&batch, 2), Ok(()));
        assert_eq!(check_ack(&batch, 3), Err("bad_ack".to_owned()));
        let one_duplicate = json!({"results": [ack(false), ack(true)]});
        assert_eq!(
            check_ack(&one_duplicate, 2),
            Err("unexpected_duplicate".to_owned())
        );
        assert_eq!(check_ack(&ack(false), 2), Err("bad_ack".to_owned()));
    }

    #[test]
    fn batch_size_parses_within_the_server_limit() {
        assert_eq!(parse(&[]).unwrap().batch_size, 1);
        assert_eq!(parse(&["--batch-size", "100"]).unwrap().batch_size, 100);
        assert!(parse(&["--batch-size", "0"]).is_err());
        assert!(parse(&["--batch-size", "101"]).is_err());
        let args = parse(&["--no-log"]).unwrap();
        assert!(args.no_log);
    }

    #[test]
    fn rows_are_labelled_with_the_batch_size_and_group_size() {
        assert_eq!(publish_label(256, 1), "publishers 256");
        assert_eq!(publish_label(256, 10), "publishers 256 batch 10");
        let result = |per_second: f64, p50_us: u64| PhaseResult {
            operations: 1,
            seconds: 1.0,
            per_second,
            p50_us,
            p99_us: p50_us,
            max_us: p50_us,
        };
        let report = Report {
            publish: BTreeMap::from([(256, result(50_000.0, 9000))]),
            batch_size: 10,
            log: BTreeMap::from([
                (
                    1,
                    LogResult {
                        result: result(4000.0, 250),
                        mean_group_messages: Some(1.0),
                    },
                ),
                (
                    256,
                    LogResult {
                        result: result(500_000.0, 500),
                        mean_group_messages: Some(120.5),
                    },
                ),
            ]),
            raw: BTreeMap::from([(1, result(5000.0, 200)), (256, result(1_000_000.0, 250))]),
            round_trip: None,
            errors: BTreeMap::new(),
            runs: 1,
        };
        let labels: Vec<String> = report.rows().into_iter().map(|row| row.0).collect();
        assert_eq!(
            labels,
            [
                "publishers 256 batch 10",
                "log appenders 1",
                "log appenders 256",
                "raw batch 1",
                "raw batch 256"
            ]
        );
        let table = report.to_table();
        assert!(table.contains("5000 reqs/s"), "{table}");
        assert!(table.contains("group 120.5 msgs"), "{table}");
        let ratios = report.ratios();
        assert_eq!(ratios.len(), 2);
        assert!((ratios[0].value - 0.5).abs() < 1e-9, "log/raw throughput");
        assert!((ratios[1].value - 1.25).abs() < 1e-9, "log/raw p50");
        assert!(table.contains("ratio log_throughput") && table.contains("= 50.0%"));
        assert!(table.contains("ratio log_latency") && table.contains("= 1.25x"));
        let json = report.to_json();
        assert_eq!(json["batch_size"], 10);
        assert_eq!(json["publish"]["256"]["requests_per_second"], 5000.0);
        assert_eq!(json["log"]["256"]["mean_group_messages"], 120.5);
        assert_eq!(json["ratios"]["log_latency"]["value"], 1.25);
    }

    #[test]
    fn mean_group_size_is_taken_between_snapshots() {
        let stats = |groups: u64, messages: u64| EmbeddedStats {
            groups,
            messages,
            ..EmbeddedStats::default()
        };
        assert_eq!(
            mean_group_messages(stats(10, 10), stats(30, 410)),
            Some(20.0)
        );
        assert_eq!(mean_group_messages(stats(5, 7), stats(5, 7)), None);
    }

    #[tokio::test]
    async fn log_phase_appends_durably_and_removes_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = measure_log(LogConfig {
            parent_dir: dir.path().to_owned(),
            run_tag: "test".to_owned(),
            appenders: 4,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(10),
            appends_max: 40,
            channels: 3,
            channel_prefix: "bench".to_owned(),
            data_json: Bytes::from(payload(256).to_string()),
        })
        .await
        .unwrap();
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        assert_eq!(outcome.result.result.operations, 40);
        assert!(outcome.result.result.p50_us > 0);
        let group = outcome
            .result
            .mean_group_messages
            .expect("groups were written");
        assert!(
            (1.0..=4.0).contains(&group),
            "at most one append per appender per group"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn error_code_reads_herald_errors() {
        let body = br#"{"error":{"code":"rate_limited","message":"slow down","retryable":true}}"#;
        assert_eq!(error_code(429, body), "rate_limited");
        assert_eq!(error_code(502, b"<html>"), "http_502");
    }

    #[test]
    fn targets_compare_against_the_disk() {
        let result = |per_second: f64, p50_us: u64| PhaseResult {
            operations: 1,
            seconds: 1.0,
            per_second,
            p50_us,
            p99_us: p50_us,
            max_us: p50_us,
        };
        let report = Report {
            publish: BTreeMap::from([(1, result(500.0, 1200)), (256, result(40_000.0, 6000))]),
            batch_size: 1,
            log: BTreeMap::new(),
            raw: BTreeMap::from([(1, result(1000.0, 1000)), (256, result(100_000.0, 2000))]),
            round_trip: Some(result(9000.0, 100)),
            errors: BTreeMap::new(),
            runs: 1,
        };
        let targets = report.targets();
        assert_eq!(targets.len(), 2);
        assert!((targets[0].value - 0.4).abs() < 1e-9 && targets[0].met);
        assert!((targets[1].value - 1.2).abs() < 1e-9 && targets[1].met);
        let table = report.to_table();
        assert!(table.contains("publishers 256") && table.contains("raw batch 256"));
        assert!(table.contains("http round trip"));
        assert_eq!(report.to_json()["targets"]["throughput"]["met"], true);
    }

    #[test]
    fn raw_phase_measures_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = RawConfig {
            dir: dir.path().to_owned(),
            batch_records: 16,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(5),
            batches_max: 20,
        };
        let result = measure_raw(&config).unwrap();
        assert_eq!(result.operations, 20 * 16);
        assert!(result.p50_us > 0 && result.p50_us <= result.max_us);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
