//! The fan-out report: per-phase figures, the delivery checks, issue #3's targets, as a table
//! or as JSON.

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
}

impl Window {
    pub(crate) fn between(start: &Snapshot, end: &Snapshot) -> Window {
        let difference = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
        Window {
            seconds: end.at.duration_since(start.at).as_secs_f64(),
            published: end.acked - start.acked,
            delivered: end.delivered - start.delivered,
            server_cpu_us: difference(start.server_cpu_us, end.server_cpu_us),
            bench_cpu_us: difference(start.bench_cpu_us, end.bench_cpu_us),
        }
    }

    fn per_second(&self, count: u64) -> f64 {
        if self.seconds > 0.0 {
            count as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub(crate) fn published_per_second(&self) -> f64 {
        self.per_second(self.published)
    }

    pub(crate) fn delivered_per_second(&self) -> f64 {
        self.per_second(self.delivered)
    }

    /// Server CPU time per delivered message, in microseconds.
    pub(crate) fn server_cpu_us_per_delivery(&self) -> Option<f64> {
        let cpu_us = self.server_cpu_us?;
        (self.delivered > 0).then(|| cpu_us as f64 / self.delivered as f64)
    }

    /// CPU time over wall time: 1.0 is one core busy for the whole window.
    fn cores(&self, cpu_us: Option<u64>) -> Option<f64> {
        let cpu_us = cpu_us?;
        (self.seconds > 0.0).then(|| cpu_us as f64 / 1e6 / self.seconds)
    }

    pub(crate) fn server_cpu_cores(&self) -> Option<f64> {
        self.cores(self.server_cpu_us)
    }

    pub(crate) fn bench_cpu_cores(&self) -> Option<f64> {
        self.cores(self.bench_cpu_us)
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
        })
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
        if guarantee == Guarantee::ExactlyOnce && self.not_delivered > 0 {
            problems.push(format!(
                "{} of {} exactly-once deliveries missing after {:.1}s",
                self.not_delivered,
                self.expected_deliveries,
                self.drain.as_secs_f64()
            ));
        }
        if self.violations > 0 {
            problems.push(format!(
                "{} deliveries out of {guarantee} order (duplicated, reordered{})",
                self.violations,
                if guarantee == Guarantee::ExactlyOnce {
                    " or after a gap"
                } else {
                    ""
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
            "{} msgs, not delivered {}, out of order {}, gap notices {}, drained in {:.2}s{}{}",
            self.messages,
            self.not_delivered,
            self.violations,
            self.gap_notices,
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
        for row in self.rows.iter().filter(|row| row.subscribers == 100) {
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
            "{:<13} {:>5} {:>12} {:>12} {:>10} {:>7} {:>7} {:>9} {:>7} {:>7}\n",
            "guarantee",
            "subs",
            "published/s",
            "delivered/s",
            "cpu/deliv",
            "server",
            "bench",
            "not deliv",
            "gaps",
            "drain"
        ));
        for row in &self.rows {
            let window = &row.throughput.window;
            let check = &row.throughput.check;
            out.push_str(&format!(
                "{:<13} {:>5} {:>12} {:>12} {:>10} {:>7} {:>7} {:>9} {:>7} {:>6.1}s\n",
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
                check.not_delivered,
                check.gap_notices,
                check.drain.as_secs_f64()
            ));
        }
        out.push_str(
            "(published/s: messages acked; delivered/s: messages received, summed over the \
             subscribers;\n cpu/deliv: server CPU time / deliveries; server, bench: CPU in \
             cores; not deliv: expected\n deliveries that never arrived; gaps: gap notices)\n",
        );
        out.push_str(&format!(
            "\nlatency: {} messages/s, one per request, fixed schedule; publish-to-deliver at \
             every subscriber\n",
            self.rate
        ));
        out.push_str(&format!(
            "{:<13} {:>5} {:>12} {:>12} {:>11} {:>11} {:>11} {:>9} {:>9}\n",
            "guarantee",
            "subs",
            "published/s",
            "delivered/s",
            "p50",
            "p99",
            "max",
            "samples",
            "not deliv"
        ));
        for row in &self.rows {
            let latency = &row.latency;
            out.push_str(&format!(
                "{:<13} {:>5} {:>12} {:>12} {:>11} {:>11} {:>11} {:>9} {:>9}\n",
                row.guarantee.as_str(),
                row.subscribers,
                thousands(latency.window.published_per_second()),
                thousands(latency.window.delivered_per_second()),
                format_us(latency.latency.p50_us),
                format_us(latency.latency.p99_us),
                format_us(latency.latency.max_us),
                latency.samples,
                latency.check.not_delivered
            ));
        }
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
    fn thousands_are_separated() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}
