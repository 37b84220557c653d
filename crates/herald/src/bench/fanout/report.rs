//! The fan-out report: per-phase figures, the delivery checks, issue #3's targets, the
//! at-least-once acks and the server's fsyncs and snapshots, as a table or as JSON.

use super::*;

/// 1 -> 100 fan-out must deliver at least this many messages/s (issue #3).
pub(crate) const FANOUT_100_TARGET_PER_SECOND: f64 = 200_000.0;
/// RSS per idle connection must stay under this (issue #3, at 1,000 connections).
pub(crate) const IDLE_RSS_TARGET_KIB: f64 = 16.0;

/// What changed over a measured window.
#[derive(Clone, Debug)]
pub(crate) struct Window {
    pub(crate) seconds: f64,
    /// Messages acked.
    pub(crate) published: u64,
    /// Messages received, summed over the subscribers.
    pub(crate) delivered: u64,
    pub(crate) server_cpu_us: Option<u64>,
    pub(crate) bench_cpu_us: Option<u64>,
    /// At-least-once, summed over the subscribers: deliveries with a count above 1, `ack`
    /// frames sent, serials they newly covered, `acked` replies received.
    pub(crate) redeliveries: u64,
    pub(crate) ack_frames: u64,
    pub(crate) serials_acked: u64,
    pub(crate) acks_confirmed: u64,
    /// What the server's `/metrics` counted over the window (`None`: not readable).
    pub(crate) server: Option<ServerCounters>,
}

impl Window {
    pub(crate) fn between(start: &Snapshot, end: &Snapshot) -> Window {
        let difference = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
        let totals = end.totals.since(start.totals);
        Window {
            seconds: end.at.duration_since(start.at).as_secs_f64(),
            published: end.acked - start.acked,
            delivered: totals.delivered,
            server_cpu_us: difference(start.server_cpu_us, end.server_cpu_us),
            bench_cpu_us: difference(start.bench_cpu_us, end.bench_cpu_us),
            redeliveries: totals.redeliveries,
            ack_frames: totals.ack_frames,
            serials_acked: totals.serials_acked,
            acks_confirmed: totals.acks_confirmed,
            server: match (start.server, end.server) {
                (Some(start), Some(end)) => Some(end.since(start)),
                _ => None,
            },
        }
    }

    fn per_second(&self, count: u64) -> f64 {
        crate::bench::stats::per_second(count, self.seconds)
    }

    pub(crate) fn published_per_second(&self) -> f64 {
        self.per_second(self.published)
    }

    pub(crate) fn delivered_per_second(&self) -> f64 {
        self.per_second(self.delivered)
    }

    /// Server CPU time per delivered message, in microseconds.
    pub(crate) fn server_cpu_us_per_delivery(&self) -> Option<f64> {
        crate::bench::stats::cpu_us_per(self.server_cpu_us, self.delivered)
    }

    /// CPU time over wall time: 1.0 is one core busy for the whole window.
    fn cores(&self, cpu_us: Option<u64>) -> Option<f64> {
        crate::bench::stats::cores(cpu_us, self.seconds)
    }

    pub(crate) fn server_cpu_cores(&self) -> Option<f64> {
        self.cores(self.server_cpu_us)
    }

    pub(crate) fn bench_cpu_cores(&self) -> Option<f64> {
        self.cores(self.bench_cpu_us)
    }

    /// Group commits (one fsync each) per second.
    pub(crate) fn fsyncs_per_second(&self) -> Option<f64> {
        Some(self.per_second(self.server?.group_commits))
    }

    /// Subscriber snapshots written per second (each rides a group commit).
    pub(crate) fn snapshots_per_second(&self) -> Option<f64> {
        Some(self.per_second(self.server?.subscriber_saves))
    }

    /// Snapshots per group commit: above 1 when acks share fsyncs.
    pub(crate) fn snapshots_per_fsync(&self) -> Option<f64> {
        let server = self.server?;
        (server.group_commits > 0)
            .then(|| server.subscriber_saves as f64 / server.group_commits as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "published": self.published,
            "delivered": self.delivered,
            "published_per_second": self.published_per_second(),
            "delivered_per_second": self.delivered_per_second(),
            "server_cpu_us_per_delivery": self.server_cpu_us_per_delivery(),
            "server_cpu_cores": self.server_cpu_cores(),
            "bench_cpu_cores": self.bench_cpu_cores(),
            "redeliveries": self.redeliveries,
            "ack_frames": self.ack_frames,
            "ack_frames_per_second": self.per_second(self.ack_frames),
            "serials_acked": self.serials_acked,
            "serials_acked_per_second": self.per_second(self.serials_acked),
            "acks_confirmed": self.acks_confirmed,
            "acks_confirmed_per_second": self.per_second(self.acks_confirmed),
            "fsyncs_per_second": self.fsyncs_per_second(),
            "snapshots_per_second": self.snapshots_per_second(),
            "snapshots_per_fsync": self.snapshots_per_fsync(),
            "server": self.server.map(|server| json!({
                "group_commits": server.group_commits,
                "subscriber_saves": server.subscriber_saves,
                "durable_acks": server.durable_acks,
                "durable_snapshots": server.durable_snapshots,
                "durable_redeliveries": server.durable_redeliveries,
            })),
        })
    }
}

/// Counters of the server's `/metrics` that the at-least-once figures need (a difference
/// between two readings, or one reading).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServerCounters {
    /// `herald_store_group_commits_total`: one write plus one fdatasync each.
    pub(crate) group_commits: u64,
    /// `herald_store_subscriber_saves_total`: snapshots written in those group commits.
    pub(crate) subscriber_saves: u64,
    /// `herald_durable_acks_total`: acks the server accepted.
    pub(crate) durable_acks: u64,
    /// `herald_durable_snapshots_total`: snapshots the pumps asked for.
    pub(crate) durable_snapshots: u64,
    /// `herald_durable_redeliveries_total`.
    pub(crate) durable_redeliveries: u64,
}

impl ServerCounters {
    /// Reads the counters from the Prometheus text format; a missing one stays 0.
    pub(crate) fn parse(text: &str) -> ServerCounters {
        let mut counters = ServerCounters::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let mut fields = line.split_whitespace();
            let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let slot = match name {
                "herald_store_group_commits_total" => &mut counters.group_commits,
                "herald_store_subscriber_saves_total" => &mut counters.subscriber_saves,
                "herald_durable_acks_total" => &mut counters.durable_acks,
                "herald_durable_snapshots_total" => &mut counters.durable_snapshots,
                "herald_durable_redeliveries_total" => &mut counters.durable_redeliveries,
                _ => continue,
            };
            *slot = value as u64;
        }
        counters
    }

    pub(crate) fn since(self, earlier: ServerCounters) -> ServerCounters {
        ServerCounters {
            group_commits: self.group_commits.saturating_sub(earlier.group_commits),
            subscriber_saves: self
                .subscriber_saves
                .saturating_sub(earlier.subscriber_saves),
            durable_acks: self.durable_acks.saturating_sub(earlier.durable_acks),
            durable_snapshots: self
                .durable_snapshots
                .saturating_sub(earlier.durable_snapshots),
            durable_redeliveries: self
                .durable_redeliveries
                .saturating_sub(earlier.durable_redeliveries),
        }
    }
}

/// Whether a phase's messages all arrived, once each and in order.
#[derive(Clone, Debug)]
pub(crate) struct DeliveryCheck {
    /// Messages the phase published (its serial range).
    pub(crate) messages: u64,
    /// `messages` times the subscribers.
    pub(crate) expected_deliveries: u64,
    /// Expected deliveries whose serial never reached its subscriber by the end of the drain.
    pub(crate) not_delivered: u64,
    /// Deliveries out of the guarantee's contract (see `SubscriberState::violations`).
    pub(crate) violations: u64,
    /// At-least-once: deliveries with a count above 1 (allowed; none expected here).
    pub(crate) redeliveries: u64,
    pub(crate) gap_notices: u64,
    pub(crate) unexpected_frames: u64,
    /// How long the subscribers took to receive everything after publishing stopped.
    pub(crate) drain: Duration,
    /// False when the drain timed out.
    pub(crate) drained: bool,
    pub(crate) publish_errors: BTreeMap<String, u64>,
}

impl DeliveryCheck {
    /// What breaks the guarantee or the measurement, as sentences.
    fn problems(&self, guarantee: Guarantee) -> Vec<String> {
        let mut problems = Vec::new();
        if guarantee != Guarantee::AtMostOnce && self.not_delivered > 0 {
            problems.push(format!(
                "{} of {} {guarantee} deliveries missing after {:.1}s",
                self.not_delivered,
                self.expected_deliveries,
                self.drain.as_secs_f64()
            ));
        }
        if self.violations > 0 {
            problems.push(format!(
                "{} deliveries out of {guarantee} order ({})",
                self.violations,
                match guarantee {
                    Guarantee::ExactlyOnce => "duplicated, reordered or after a gap",
                    Guarantee::AtMostOnce => "duplicated or reordered",
                    Guarantee::AtLeastOnce =>
                        "after a gap, or repeated without a delivery count above 1",
                }
            ));
        }
        if self.unexpected_frames > 0 {
            problems.push(format!("{} unexpected frames", self.unexpected_frames));
        }
        if !self.publish_errors.is_empty() {
            problems.push(format!(
                "publish errors:{}",
                format_errors(&self.publish_errors)
            ));
        }
        problems
    }

    fn summary(&self) -> String {
        format!(
            "{} msgs, not delivered {}, out of order {}, gap notices {}, redeliveries {}, \
             drained in {:.2}s{}{}",
            self.messages,
            self.not_delivered,
            self.violations,
            self.gap_notices,
            self.redeliveries,
            self.drain.as_secs_f64(),
            if self.drained { "" } else { " (timed out)" },
            format_errors(&self.publish_errors)
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "messages": self.messages,
            "expected_deliveries": self.expected_deliveries,
            "not_delivered": self.not_delivered,
            "out_of_order": self.violations,
            "redeliveries": self.redeliveries,
            "gap_notices": self.gap_notices,
            "unexpected_frames": self.unexpected_frames,
            "drain_seconds": self.drain.as_secs_f64(),
            "drained": self.drained,
            "publish_errors": self.publish_errors,
        })
    }
}

pub(crate) struct ThroughputResult {
    pub(crate) window: Window,
    pub(crate) check: DeliveryCheck,
}

impl ThroughputResult {
    pub(crate) fn summary(&self) -> String {
        format!(
            "published {}/s, delivered {}/s, server {} per delivery, {}",
            thousands(self.window.published_per_second()),
            thousands(self.window.delivered_per_second()),
            self.window
                .server_cpu_us_per_delivery()
                .map(|us| format!("{us:.2}us"))
                .unwrap_or_else(|| "-".to_owned()),
            self.check.summary()
        )
    }
}

pub(crate) struct LatencyResult {
    pub(crate) rate: u64,
    pub(crate) window: Window,
    /// Publish-to-deliver; `operations` and `per_second` are deliveries in the window.
    pub(crate) latency: PhaseResult,
    pub(crate) samples: usize,
    /// Only serials that are a multiple of this were sampled.
    pub(crate) sample_every: u64,
    pub(crate) check: DeliveryCheck,
}

impl LatencyResult {
    pub(crate) fn summary(&self) -> String {
        format!(
            "published {}/s, delivered {}/s, p50 {} p99 {} max {} ({} samples), {}",
            thousands(self.window.published_per_second()),
            thousands(self.window.delivered_per_second()),
            format_us(self.latency.p50_us),
            format_us(self.latency.p99_us),
            format_us(self.latency.max_us),
            self.samples,
            self.check.summary()
        )
    }
}

pub(crate) struct FanoutRow {
    pub(crate) guarantee: Guarantee,
    pub(crate) subscribers: usize,
    pub(crate) throughput: ThroughputResult,
    pub(crate) latency: LatencyResult,
    /// Subscribers whose connection failed or that got an unexpected frame.
    pub(crate) failed_subscribers: usize,
    /// The first few reasons.
    pub(crate) failures: Vec<String>,
}

pub(crate) struct IdleResult {
    pub(crate) connections: usize,
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_after_kib: u64,
}

impl IdleResult {
    pub(crate) fn per_connection_kib(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.connections.max(1) as f64
    }
}

pub(crate) struct FanoutReport {
    pub(crate) url: String,
    /// Whether the server's CPU and RSS were read.
    pub(crate) server_measured: bool,
    pub(crate) own_server: bool,
    pub(crate) duration: Duration,
    pub(crate) batch_size: usize,
    pub(crate) publishers: usize,
    pub(crate) lag_max: u64,
    pub(crate) rate: u64,
    pub(crate) message_bytes: usize,
    /// At-least-once: cumulative ack after this many deliveries (and at each burst's end).
    pub(crate) ack_every: u64,
    pub(crate) inflight_max: u64,
    pub(crate) rows: Vec<FanoutRow>,
    pub(crate) idle: Option<IdleResult>,
}

/// One of issue #3's targets, when it was measured.
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) value: f64,
    pub(crate) goal: String,
    pub(crate) met: bool,
}

impl FanoutReport {
    pub(crate) fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        // Issue #3's fan-out target is for live subscriptions; issue #5 sets none for durable
        // ones, whose figures are reported beside them.
        for row in self
            .rows
            .iter()
            .filter(|row| row.subscribers == 100 && row.guarantee != Guarantee::AtLeastOnce)
        {
            let value = row.throughput.window.delivered_per_second();
            targets.push(Target {
                name: format!("fanout_100_{}", row.guarantee.as_str().replace('-', "_")),
                description: format!("1 -> 100 fan-out, {}: delivered msgs/s", row.guarantee),
                value,
                goal: format!(">= {}", thousands(FANOUT_100_TARGET_PER_SECOND)),
                met: value >= FANOUT_100_TARGET_PER_SECOND,
            });
        }
        if let Some(idle) = &self.idle {
            let value = idle.per_connection_kib();
            targets.push(Target {
                name: "idle_rss".to_owned(),
                description: format!(
                    "server RSS per idle connection at {} connections, KiB",
                    idle.connections
                ),
                value,
                goal: format!("< {IDLE_RSS_TARGET_KIB} KiB"),
                met: value < IDLE_RSS_TARGET_KIB,
            });
        }
        targets
    }

    /// Everything that makes the run a failure: lost or disordered exactly-once deliveries,
    /// duplicates, publish errors, broken subscribers.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for row in &self.rows {
            let label = format!("{} x{}", row.guarantee, row.subscribers);
            for (phase, check) in [
                ("throughput", &row.throughput.check),
                ("latency", &row.latency.check),
            ] {
                for problem in check.problems(row.guarantee) {
                    problems.push(format!("{label} {phase}: {problem}"));
                }
            }
            if row.failed_subscribers > 0 {
                problems.push(format!(
                    "{label}: {} subscribers failed: {}",
                    row.failed_subscribers,
                    row.failures.join("; ")
                ));
            }
        }
        problems
    }

    pub(crate) fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "\nserver {} ({})\n",
            self.url,
            match (self.own_server, self.server_measured) {
                (true, _) => "started by the bench; CPU and RSS read from /proc",
                (false, true) => "CPU and RSS read from /proc for --server-pid",
                (false, false) =>
                    "--url: server CPU and RSS not measured (give --server-pid to measure them)",
            }
        ));
        out.push_str(&format!(
            "\nthroughput: {} concurrent publishes of {} messages ({} B data), at most {} \
             messages ahead of the slowest subscriber; {:.1}s measured\n",
            self.publishers,
            self.batch_size,
            self.message_bytes,
            self.lag_max,
            self.duration.as_secs_f64()
        ));
        out.push_str(&format!(
            "{:<13} {:>5} {:>12} {:>12} {:>10} {:>7} {:>7} {:>9} {:>9} {:>7} {:>7}\n",
            "guarantee",
            "subs",
            "published/s",
            "delivered/s",
            "cpu/deliv",
            "server",
            "bench",
            "fsyncs/s",
            "not deliv",
            "gaps",
            "drain"
        ));
        for row in &self.rows {
            let window = &row.throughput.window;
            let check = &row.throughput.check;
            out.push_str(&format!(
                "{:<13} {:>5} {:>12} {:>12} {:>10} {:>7} {:>7} {:>9} {:>9} {:>7} {:>6.1}s\n",
                row.guarantee.as_str(),
                row.subscribers,
                thousands(window.published_per_second()),
                thousands(window.delivered_per_second()),
                window
                    .server_cpu_us_per_delivery()
                    .map(|us| format!("{us:.2}us"))
                    .unwrap_or_else(|| "-".to_owned()),
                format_cores(window.server_cpu_cores()),
                format_cores(window.bench_cpu_cores()),
                format_rate(window.fsyncs_per_second()),
                check.not_delivered,
                check.gap_notices,
                check.drain.as_secs_f64()
            ));
        }
        out.push_str(
            "(published/s: messages acked; delivered/s: messages received, summed over the \
             subscribers;\n cpu/deliv: server CPU time / deliveries; server, bench: CPU in \
             cores; fsyncs/s: the server's\n group commits; not deliv: expected deliveries \
             that never arrived; gaps: gap notices)\n",
        );
        out.push_str(&format!(
            "\nlatency: {} messages/s, one per request, fixed schedule; publish-to-deliver at \
             every subscriber\n",
            self.rate
        ));
        out.push_str(&format!(
            "{:<13} {:>5} {:>12} {:>12} {:>11} {:>11} {:>11} {:>9} {:>10} {:>9} {:>9}\n",
            "guarantee",
            "subs",
            "published/s",
            "delivered/s",
            "p50",
            "p99",
            "max",
            "samples",
            "cpu/deliv",
            "fsyncs/s",
            "not deliv"
        ));
        for row in &self.rows {
            let latency = &row.latency;
            out.push_str(&format!(
                "{:<13} {:>5} {:>12} {:>12} {:>11} {:>11} {:>11} {:>9} {:>10} {:>9} {:>9}\n",
                row.guarantee.as_str(),
                row.subscribers,
                thousands(latency.window.published_per_second()),
                thousands(latency.window.delivered_per_second()),
                format_us(latency.latency.p50_us),
                format_us(latency.latency.p99_us),
                format_us(latency.latency.max_us),
                latency.samples,
                latency
                    .window
                    .server_cpu_us_per_delivery()
                    .map(|us| format!("{us:.2}us"))
                    .unwrap_or_else(|| "-".to_owned()),
                format_rate(latency.window.fsyncs_per_second()),
                latency.check.not_delivered
            ));
        }
        self.acks_table(&mut out);
        match &self.idle {
            Some(idle) => out.push_str(&format!(
                "\nidle: {} connections, each subscribed (exactly-once): server RSS {} KiB -> {} \
                 KiB = {:.1} KiB per connection\n",
                idle.connections,
                thousands(idle.rss_before_kib as f64),
                thousands(idle.rss_after_kib as f64),
                idle.per_connection_kib()
            )),
            None => out.push_str(
                "\nidle: not measured (--idle-connections 0, or no server pid to read RSS from)\n",
            ),
        }
        out.push('\n');
        for target in self.targets() {
            out.push_str(&format!(
                "target {}: {} = {} (target {}) {}\n",
                target.name,
                target.description,
                if target.name == "idle_rss" {
                    format!("{:.1}", target.value)
                } else {
                    thousands(target.value)
                },
                target.goal,
                if target.met { "MET" } else { "NOT MET" }
            ));
        }
        for problem in self.problems() {
            out.push_str(&format!("problem: {problem}\n"));
        }
        out
    }

    /// The at-least-once rows: acks, redeliveries, and what the server made durable.
    fn acks_table(&self, out: &mut String) {
        let rows: Vec<&FanoutRow> = self
            .rows
            .iter()
            .filter(|row| row.guarantee == Guarantee::AtLeastOnce)
            .collect();
        if rows.is_empty() {
            return;
        }
        out.push_str(&format!(
            "\nat-least-once acks: each subscriber acks cumulatively (with a req) after {} \
             deliveries and at the end of\n every read burst, window {}; server figures from \
             /metrics over the same windows\n",
            self.ack_every, self.inflight_max
        ));
        out.push_str(&format!(
            "{:<5} {:<10} {:>12} {:>11} {:>10} {:>11} {:>8} {:>9} {:>11} {:>10} {:>10}\n",
            "subs",
            "phase",
            "delivered/s",
            "ack frms/s",
            "acked/s",
            "confirmd/s",
            "redeliv",
            "fsyncs/s",
            "snapshots/s",
            "snap/fsync",
            "cpu/deliv"
        ));
        for row in rows {
            for (phase, window) in [
                ("throughput", &row.throughput.window),
                ("latency", &row.latency.window),
            ] {
                out.push_str(&format!(
                    "{:<5} {:<10} {:>12} {:>11} {:>10} {:>11} {:>8} {:>9} {:>11} {:>10} {:>10}\n",
                    row.subscribers,
                    phase,
                    thousands(window.delivered_per_second()),
                    thousands(window.per_second(window.ack_frames)),
                    thousands(window.per_second(window.serials_acked)),
                    thousands(window.per_second(window.acks_confirmed)),
                    window.redeliveries,
                    format_rate(window.fsyncs_per_second()),
                    format_rate(window.snapshots_per_second()),
                    window
                        .snapshots_per_fsync()
                        .map(|ratio| format!("{ratio:.1}"))
                        .unwrap_or_else(|| "-".to_owned()),
                    window
                        .server_cpu_us_per_delivery()
                        .map(|us| format!("{us:.2}us"))
                        .unwrap_or_else(|| "-".to_owned()),
                ));
            }
        }
        out.push_str(
            "(ack frms/s: ack frames sent; acked/s: serials those acks covered; confirmd/s: \
             acked replies (durable);\n redeliv: deliveries with a count above 1; fsyncs/s: \
             group commits; snapshots/s: subscriber snapshots\n written, each in a group \
             commit; snap/fsync: snapshots per group commit)\n",
        );
    }

    pub(crate) fn to_json(&self) -> Value {
        let throughput: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let mut value = row.throughput.window.to_json();
                value["guarantee"] = json!(row.guarantee.as_str());
                value["subscribers"] = json!(row.subscribers);
                value["check"] = row.throughput.check.to_json();
                value
            })
            .collect();
        let latency: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let latency = &row.latency;
                let mut value = latency.window.to_json();
                value["guarantee"] = json!(row.guarantee.as_str());
                value["subscribers"] = json!(row.subscribers);
                value["rate"] = json!(latency.rate);
                value["p50_us"] = json!(latency.latency.p50_us);
                value["p99_us"] = json!(latency.latency.p99_us);
                value["max_us"] = json!(latency.latency.max_us);
                value["samples"] = json!(latency.samples);
                value["sample_every"] = json!(latency.sample_every);
                value["check"] = latency.check.to_json();
                value
            })
            .collect();
        let targets: serde_json::Map<String, Value> = self
            .targets()
            .into_iter()
            .map(|target| {
                (
                    target.name,
                    json!({
                        "description": target.description,
                        "value": target.value,
                        "goal": target.goal,
                        "met": target.met,
                    }),
                )
            })
            .collect();
        json!({
            "server": {
                "url": self.url,
                "started_by_bench": self.own_server,
                "cpu_and_rss_measured": self.server_measured,
            },
            "settings": {
                "duration_seconds": self.duration.as_secs_f64(),
                "batch_size": self.batch_size,
                "publishers": self.publishers,
                "lag_max": self.lag_max,
                "rate": self.rate,
                "message_bytes": self.message_bytes,
                "ack_every": self.ack_every,
                "inflight_max": self.inflight_max,
            },
            "throughput": throughput,
            "latency": latency,
            "idle": self.idle.as_ref().map(|idle| json!({
                "connections": idle.connections,
                "rss_before_kib": idle.rss_before_kib,
                "rss_after_kib": idle.rss_after_kib,
                "rss_per_connection_kib": idle.per_connection_kib(),
            })),
            "targets": targets,
            "problems": self.problems(),
        })
    }
}

fn format_rate(rate: Option<f64>) -> String {
    rate.map(thousands).unwrap_or_else(|| "-".to_owned())
}

fn format_cores(cores: Option<f64>) -> String {
    cores
        .map(|cores| format!("{cores:.2}"))
        .unwrap_or_else(|| "-".to_owned())
}

/// A whole number with `,` between thousands: `1234567.8` -> `1,234,568`.
pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(guarantee_ok: bool) -> DeliveryCheck {
        DeliveryCheck {
            messages: 10,
            expected_deliveries: 1000,
            not_delivered: if guarantee_ok { 0 } else { 5 },
            violations: 0,
            redeliveries: 0,
            gap_notices: if guarantee_ok { 0 } else { 1 },
            unexpected_frames: 0,
            drain: Duration::from_millis(20),
            drained: true,
            publish_errors: BTreeMap::new(),
        }
    }

    fn window(delivered_per_second: u64) -> Window {
        Window {
            seconds: 1.0,
            published: delivered_per_second / 100,
            delivered: delivered_per_second,
            server_cpu_us: Some(800_000),
            bench_cpu_us: Some(900_000),
            redeliveries: 0,
            ack_frames: 0,
            serials_acked: 0,
            acks_confirmed: 0,
            server: None,
        }
    }

    fn row(guarantee: Guarantee, delivered_per_second: u64, complete: bool) -> FanoutRow {
        FanoutRow {
            guarantee,
            subscribers: 100,
            throughput: ThroughputResult {
                window: window(delivered_per_second),
                check: check(complete),
            },
            latency: LatencyResult {
                rate: 1000,
                window: window(100_000),
                latency: PhaseResult::from_samples(100_000, 1.0, vec![900, 1000, 5000]),
                samples: 3,
                sample_every: 1,
                check: check(true),
            },
            failed_subscribers: 0,
            failures: Vec::new(),
        }
    }

    #[test]
    fn targets_and_problems_follow_the_figures() {
        let report = FanoutReport {
            url: "http://127.0.0.1:1".to_owned(),
            server_measured: true,
            own_server: true,
            duration: Duration::from_secs(1),
            batch_size: 100,
            publishers: 4,
            lag_max: 2000,
            rate: 1000,
            message_bytes: 128,
            ack_every: 16,
            inflight_max: 100,
            rows: vec![
                row(Guarantee::AtMostOnce, 250_000, false),
                row(Guarantee::ExactlyOnce, 150_000, false),
            ],
            idle: Some(IdleResult {
                connections: 1000,
                rss_before_kib: 10_000,
                rss_after_kib: 22_000,
            }),
        };
        let targets = report.targets();
        assert_eq!(targets.len(), 3);
        assert!(targets[0].met && targets[0].name == "fanout_100_at_most_once");
        assert!(!targets[1].met);
        assert!((targets[2].value - 12.0).abs() < 1e-9 && targets[2].met);
        // At-most-once may miss messages; exactly-once may not.
        let problems = report.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("exactly-once x100 throughput: 5 of 1000"));
        let table = report.to_table();
        assert!(
            table.contains("250,000") && table.contains("NOT MET"),
            "{table}"
        );
        assert!(
            table.contains("3.20us"),
            "800 ms CPU / 250,000 deliveries: {table}"
        );
        let json = report.to_json();
        assert_eq!(json["targets"]["idle_rss"]["met"], true);
        assert_eq!(json["throughput"][1]["check"]["not_delivered"], 5);
    }

    #[test]
    fn at_least_once_rows_report_acks_and_fsyncs() {
        let metrics = |commits: u64, saves: u64| {
            ServerCounters::parse(&format!(
                "# HELP herald_store_group_commits_total Group writes.\n\
                 # TYPE herald_store_group_commits_total counter\n\
                 herald_store_group_commits_total {commits}\n\
                 herald_store_subscriber_saves_total {saves}\n\
                 herald_durable_acks_total 7\n\
                 herald_live_deliveries_total{{guarantee=\"exactly-once\"}} 99\n"
            ))
        };
        let start = metrics(1_000, 10_000);
        assert_eq!(
            (
                start.group_commits,
                start.subscriber_saves,
                start.durable_acks
            ),
            (1_000, 10_000, 7)
        );
        let mut durable = row(Guarantee::AtLeastOnce, 50_000, true);
        durable.throughput.window.ack_frames = 3_125;
        durable.throughput.window.serials_acked = 50_000;
        durable.throughput.window.acks_confirmed = 3_100;
        durable.throughput.window.server = Some(metrics(1_500, 40_000).since(start));
        // Missing the exactly-once messages is a problem for at-least-once too.
        let mut lossy = row(Guarantee::AtLeastOnce, 50_000, false);
        lossy.subscribers = 1;
        let report = FanoutReport {
            url: "http://127.0.0.1:1".to_owned(),
            server_measured: true,
            own_server: true,
            duration: Duration::from_secs(1),
            batch_size: 100,
            publishers: 4,
            lag_max: 1000,
            rate: 1000,
            message_bytes: 128,
            ack_every: 16,
            inflight_max: 100,
            rows: vec![durable, lossy],
            idle: None,
        };
        assert!(
            report.targets().is_empty(),
            "no issue #3 target for durable rows"
        );
        let problems = report.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("at-least-once x1 throughput: 5 of 1000 at-least-once"),
            "{problems:?}"
        );
        let window = &report.rows[0].throughput.window;
        assert_eq!(window.fsyncs_per_second(), Some(500.0));
        assert_eq!(window.snapshots_per_fsync(), Some(60.0));
        let table = report.to_table();
        assert!(table.contains("at-least-once acks:"), "{table}");
        // 100 subs, throughput: 3,125 ack frames/s, 50,000 serials acked/s, 500 fsyncs/s,
        // 30,000 snapshots/s, 60 per fsync.
        let line = table
            .lines()
            .find(|line| line.starts_with("100") && line.contains("throughput"))
            .expect("a throughput row for 100 subscribers");
        for figure in ["3,125", "50,000", "3,100", "500", "30,000", "60.0"] {
            assert!(line.contains(figure), "{figure} in {line}");
        }
        let json = report.to_json();
        assert_eq!(json["throughput"][0]["ack_frames"], 3_125);
        assert_eq!(json["throughput"][0]["snapshots_per_fsync"], 60.0);
        assert_eq!(json["throughput"][1]["fsyncs_per_second"], Value::Null);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}
