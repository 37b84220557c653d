//! The history `herald verify` records: one JSON object per line (JSONL), in the order things
//! happened as seen by the verifier. It is the only input of the checker ([`super::check`]), so
//! a run can be re-checked offline (`herald verify --check FILE`).
//!
//! Every line is `{"t_ms": <ms since the run started>, "kind": "...", ...}`. Positions are
//! written `EPOCH:SERIAL` as everywhere in Herald. Subscriber and publisher names are unique
//! within a run; a subscriber is declared by a `subscriber` line before its first event.
//!
//! # Invariants
//! - Lines are appended in the order the verifier observed the events; per subscriber and
//!   channel that is the order the subscription delivered them.
//! - The history is bounded: the recorder refuses lines past [`Recorder::LINES_MAX`].

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// Milliseconds since the run started.
    pub t_ms: u64,
    #[serde(flatten)]
    pub record: Record,
}

/// What a line says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The run: where it ran and with which seed.
    Run {
        url: String,
        seed: u64,
        channels: Vec<String>,
    },
    /// A subscriber, declared before its first event.
    Subscriber {
        subscriber: String,
        /// `exactly-once` or `at-most-once`.
        guarantee: String,
        /// `ws` or `sse`.
        surface: String,
    },
    /// A publish sent (first send or retry; `attempt` counts from 1).
    Publish {
        publisher: String,
        /// `ws` (SDK) or `http`.
        surface: String,
        channel: String,
        id: String,
        attempt: u32,
    },
    /// A publish acknowledged: the id is durable at `epoch:serial`.
    Ack {
        publisher: String,
        channel: String,
        id: String,
        epoch: String,
        serial: u64,
        duplicate: bool,
    },
    /// A publish attempt failed; its outcome is unknown (it may have been stored).
    PublishFailed {
        publisher: String,
        channel: String,
        id: String,
        error: String,
    },
    /// The server (re)started a subscription: `continuity` is `new`, `held` or `lost`.
    Subscribed {
        subscriber: String,
        channel: String,
        continuity: String,
        after: Option<String>,
        top: Option<String>,
    },
    /// A message delivered to a subscriber.
    Delivery {
        subscriber: String,
        channel: String,
        id: String,
        epoch: String,
        serial: u64,
    },
    /// A notice accounting for serials `from..=to`: `continuity_lost`, `gap` or `skip`.
    Notice {
        subscriber: String,
        channel: String,
        notice: String,
        from: String,
        to: Option<String>,
        reason: String,
    },
    /// A subscriber's connection dropped and it connects again (resuming when exactly-once).
    Reconnect { subscriber: String },
    /// The SDK saw something that does not follow what it holds (it withholds the frame).
    Broken {
        subscriber: String,
        channel: String,
        /// `prev`, `hole`, `epoch`, `chain` or `malformed`.
        #[serde(rename = "break")]
        break_kind: String,
        detail: String,
    },
    /// The server reported an error about a subscription, or ended it.
    SubscriptionError {
        subscriber: String,
        channel: String,
        code: String,
        message: String,
    },
    /// A fault the verifier injected on one of its connections (`cut`, `pause`, `resume`).
    Fault { target: String, fault: String },
    /// The spawned server was killed with SIGKILL.
    Kill { pid: u32 },
    /// The spawned server is listening again.
    Restart { pid: u32 },
    /// Publishing stopped and the final drain ended; `tops` per channel, `complete` when every
    /// subscriber had accounted for every top before the drain timeout.
    Drain {
        tops: std::collections::BTreeMap<String, Option<String>>,
        complete: bool,
    },
}

/// Shared, bounded, in-memory recorder of a running verification.
#[derive(Clone)]
pub struct Recorder {
    started: Instant,
    lines: Arc<Mutex<Vec<Line>>>,
}

impl Recorder {
    /// Most lines one run may record (about 1 GiB of history at worst).
    pub const LINES_MAX: usize = 5_000_000;

    pub fn new() -> Recorder {
        Recorder {
            started: Instant::now(),
            lines: Arc::default(),
        }
    }

    /// Appends a line; returns `false` (and records nothing) past [`Recorder::LINES_MAX`].
    pub fn record(&self, record: Record) -> bool {
        let t_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut lines = self.lines.lock().expect("history lock");
        if lines.len() >= Self::LINES_MAX {
            return false;
        }
        lines.push(Line { t_ms, record });
        true
    }

    /// A copy of every line so far.
    pub fn snapshot(&self) -> Vec<Line> {
        self.lines.lock().expect("history lock").clone()
    }
}

/// Writes lines as JSONL.
pub fn write(lines: &[Line], out: impl Write) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    for line in lines {
        serde_json::to_writer(&mut out, line)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads JSONL lines; an unreadable line is an error naming its number (1-based).
pub fn read(input: impl BufRead) -> Result<Vec<Line>, String> {
    let mut lines = Vec::new();
    for (index, text) in input.lines().enumerate() {
        let text = text.map_err(|error| format!("line {}: {error}", index + 1))?;
        if text.trim().is_empty() {
            continue;
        }
        let line: Line =
            serde_json::from_str(&text).map_err(|error| format!("line {}: {error}", index + 1))?;
        lines.push(line);
        if lines.len() > Recorder::LINES_MAX {
            return Err(format!("more than {} lines", Recorder::LINES_MAX));
        }
    }
    Ok(lines)
}
