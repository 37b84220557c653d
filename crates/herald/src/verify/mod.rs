//! `herald verify`: checks Herald's delivery guarantees against a running deployment (or a
//! server it spawns and kills itself), so users need not take them on trust.
//!
//! It runs publishers (SDK over WebSocket, retrying with idempotent ids, and HTTP publishes
//! retried after a forced failure) and subscribers of every guarantee over every surface
//! (exactly-once and at-most-once, over WebSocket with the SDK and over SSE with a small client
//! of its own), each through its own fault proxy (`herald-faults`) so it can cut connections and
//! pause readers at random. With `--spawn` it starts `herald serve` itself and, with
//! `--kill-every`, SIGKILLs and restarts it on the same port and data directory.
//!
//! # Layout
//! - [`history`]: the JSONL history every run records (the checker's only input).
//! - [`check`]: the pure checker (the contracts of issue #4, as code).
//! - `run`: the load, faults and final drain.
//! - `sse`: the SSE subscriber (reconnects with `Last-Event-ID`).
//! - `spawn`: the spawned server (start, SIGKILL, restart).
//! - `report`: the table and the JSON output.
//!
//! # Invariants
//! - Every loop is bounded by `--duration` plus `--drain-timeout` (and a fixed startup bound).
//! - Exit codes: 0 no violation, 1 a violation (or nothing could be checked), 2 usage,
//!   3 the server refused verify's key, 4 unreachable.

pub mod check;
mod faults;
pub mod history;
mod publisher;
mod report;
mod run;
mod spawn;
mod sse;
mod subscriber;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Exit code when a contract was violated.
pub const EXIT_VIOLATION: u8 = 1;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Base URL of the deployment to check (http:// only: verify proxies its own connections).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7600")]
    pub url: String,
    /// API key with publish and subscribe on the `verify` namespace.
    #[arg(long, env = "HERALD_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// How long to publish and inject faults (the final drain comes after).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Concurrent SDK publishers (one more publishes over HTTP with forced retries).
    #[arg(long, default_value_t = 2)]
    pub publishers: u32,
    /// Subscribers per guarantee and per surface (WebSocket, SSE).
    #[arg(long, default_value_t = 1)]
    pub subscribers_per_guarantee: u32,
    /// Channels, each read by every subscriber.
    #[arg(long, default_value_t = 2)]
    pub channels: u32,
    /// Faults injected on verify's own connections.
    #[arg(long, value_enum, default_value_t = FaultMode::All)]
    pub faults: FaultMode,
    /// Seed of the fault schedule (printed; default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the recorded history here (JSONL).
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Start a local `herald serve --dev` (this binary) instead of using --url.
    #[arg(long)]
    pub spawn: bool,
    /// Data directory of the spawned server (default: a temporary one, removed afterwards).
    #[arg(long = "data", value_name = "DIR", requires = "spawn")]
    pub data_dir: Option<PathBuf>,
    /// SIGKILL the spawned server at random instants this far apart, e.g. `2s..5s` or `3s`,
    /// and restart it on the same port and data directory.
    #[arg(long, value_name = "MIN..MAX", requires = "spawn", value_parser = parse_interval)]
    pub kill_every: Option<(Duration, Duration)>,
    /// Longest wait, after publishing stops, for every subscriber to catch up.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Re-check a recorded history offline instead of running.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["spawn", "history"])]
    pub check: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultMode {
    None,
    /// Cut connections at random.
    Drops,
    /// Pause subscribers' connections at random.
    Pauses,
    All,
}

impl FaultMode {
    pub fn drops(self) -> bool {
        matches!(self, FaultMode::Drops | FaultMode::All)
    }

    pub fn pauses(self) -> bool {
        matches!(self, FaultMode::Pauses | FaultMode::All)
    }
}

/// `2s..5s` or `3s`.
fn parse_interval(text: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = match text.split_once("..") {
        Some((min, max)) => (min, max),
        None => (text, text),
    };
    let min = humantime::parse_duration(min.trim()).map_err(|error| format!("{min}: {error}"))?;
    let max = humantime::parse_duration(max.trim()).map_err(|error| format!("{max}: {error}"))?;
    if min.is_zero() || max < min {
        return Err(format!("{text:?}: expected MIN..MAX with 0 < MIN <= MAX"));
    }
    Ok((min, max))
}

/// Runs `herald verify`; the exit code is the outcome.
pub async fn main(args: VerifyArgs) -> u8 {
    if let Some(path) = &args.check {
        return report::recheck(path, args.json);
    }
    run::run(args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse() {
        assert_eq!(
            parse_interval("2s..5s").unwrap(),
            (Duration::from_secs(2), Duration::from_secs(5))
        );
        assert_eq!(
            parse_interval("500ms").unwrap(),
            (Duration::from_millis(500), Duration::from_millis(500))
        );
        assert!(parse_interval("5s..2s").is_err());
        assert!(parse_interval("0s").is_err());
    }
}
