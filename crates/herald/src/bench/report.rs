//! The report: the medians table, the target ratios and the JSON form.

use super::*;

pub(crate) struct Report {
    /// By publisher count; operations are messages, latencies are per request.
    pub(crate) publish: BTreeMap<usize, PhaseResult>,
    /// Messages per publish request.
    pub(crate) batch_size: usize,
    /// In-process log appends by appender count.
    pub(crate) log: BTreeMap<usize, LogResult>,
    pub(crate) raw: BTreeMap<usize, PhaseResult>,
    /// `GET /health` from one client: the HTTP floor under every ack, with no storage in it.
    pub(crate) round_trip: Option<PhaseResult>,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) runs: u32,
}

/// One target ratio of issue #2, when both of its sides were measured.
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) description: String,
    pub(crate) value: f64,
    pub(crate) met: bool,
}

/// A ratio reported for insight, with no target: where the log stands against the disk.
pub(crate) struct Ratio {
    pub(crate) name: &'static str,
    pub(crate) description: String,
    pub(crate) value: f64,
    /// Shown as a percentage (a throughput share) rather than a factor (a latency multiple).
    pub(crate) percent: bool,
}

impl Report {
    pub(crate) fn ratios(&self) -> Vec<Ratio> {
        let mut ratios = Vec::new();
        if let (Some((&appenders, log)), Some((&batch, raw))) =
            (self.log.last_key_value(), self.raw.last_key_value())
            && raw.per_second > 0.0
        {
            ratios.push(Ratio {
                name: "log_throughput",
                description: format!(
                    "log appends/s at {appenders} appenders / raw records/s at batch {batch}"
                ),
                value: log.result.per_second / raw.per_second,
                percent: true,
            });
        }
        if let (Some(log), Some(raw)) = (self.log.get(&1), self.raw.get(&1))
            && raw.p50_us > 0
        {
            ratios.push(Ratio {
                name: "log_latency",
                description: "log ack p50 at 1 appender / raw write+fdatasync p50 at batch 1"
                    .to_owned(),
                value: log.result.p50_us as f64 / raw.p50_us as f64,
                percent: false,
            });
        }
        ratios
    }

    /// Rows of the table, top to bottom from the HTTP publish down to the bare disk: label,
    /// figures, and a note (requests/s of batched publishes, mean group size of the log).
    pub(crate) fn rows(&self) -> Vec<(String, &PhaseResult, String)> {
        let mut rows = Vec::new();
        for (&publishers, result) in &self.publish {
            let note = if self.batch_size == 1 {
                String::new()
            } else {
                format!("{:.0} reqs/s", result.per_second / self.batch_size as f64)
            };
            rows.push((publish_label(publishers, self.batch_size), result, note));
        }
        for (&appenders, log) in &self.log {
            rows.push((
                format!("log appenders {appenders}"),
                &log.result,
                format!("group {}", format_group(log.mean_group_messages)),
            ));
        }
        if let Some(result) = &self.round_trip {
            rows.push(("http round trip".to_owned(), result, String::new()));
        }
        for (&batch, result) in &self.raw {
            rows.push((format!("raw batch {batch}"), result, String::new()));
        }
        rows
    }

    pub(crate) fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        if let (Some((&publishers, publish)), Some((&batch, raw))) =
            (self.publish.last_key_value(), self.raw.last_key_value())
            && raw.per_second > 0.0
        {
            let value = publish.per_second / raw.per_second;
            targets.push(Target {
                name: "throughput",
                description: format!(
                    "publish/s at {publishers} publishers / raw records/s at batch {batch}"
                ),
                value,
                met: value >= 0.30,
            });
        }
        if let (Some(publish), Some(raw)) = (self.publish.get(&1), self.raw.get(&1))
            && raw.p50_us > 0
        {
            let value = publish.p50_us as f64 / raw.p50_us as f64;
            targets.push(Target {
                name: "latency",
                description: "ack p50 at 1 publisher / raw write+fdatasync p50 at batch 1"
                    .to_owned(),
                value,
                met: value <= 1.5,
            });
        }
        targets
    }

    pub(crate) fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "\nmedians of {} run(s)\n{:<24} {:>12} {:>11} {:>11} {:>11}\n",
            self.runs, "phase", "per second", "p50", "p99", "max"
        ));
        for (label, result, note) in self.rows() {
            let line = format!(
                "{label:<24} {:>12.0} {:>11} {:>11} {:>11}  {note}",
                result.per_second,
                format_us(result.p50_us),
                format_us(result.p99_us),
                format_us(result.max_us)
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push_str(
            "(publish: messages/s, latency of one request's ack; log: in-process EmbeddedLog appends of \
             one\n message each, no HTTP, group = messages per write+fdatasync; http round trip: \
             GET /health from one\n client, no storage; raw: records/s, latency of one \
             write+fdatasync of a batch)\n",
        );
        for target in self.targets() {
            let (value, goal) = match target.name {
                "throughput" => (format!("{:.1}%", target.value * 100.0), ">= 30%"),
                _ => (format!("{:.2}x", target.value), "<= 1.5x"),
            };
            out.push_str(&format!(
                "target {}: {} = {value} (target {goal}) {}\n",
                target.name,
                target.description,
                if target.met { "MET" } else { "NOT MET" }
            ));
        }
        for ratio in self.ratios() {
            let value = if ratio.percent {
                format!("{:.1}%", ratio.value * 100.0)
            } else {
                format!("{:.2}x", ratio.value)
            };
            out.push_str(&format!(
                "ratio {}: {} = {value}\n",
                ratio.name, ratio.description
            ));
        }
        if !self.errors.is_empty() {
            out.push_str(&format!("errors:{}\n", format_errors(&self.errors)));
        }
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        let phases = |results: &BTreeMap<usize, PhaseResult>| -> Value {
            results
                .iter()
                .map(|(n, result)| (n.to_string(), result.to_json()))
                .collect::<serde_json::Map<String, Value>>()
                .into()
        };
        let targets: serde_json::Map<String, Value> = self
            .targets()
            .into_iter()
            .map(|target| {
                (
                    target.name.to_owned(),
                    json!({
                        "description": target.description,
                        "value": target.value,
                        "met": target.met,
                    }),
                )
            })
            .collect();
        let publish: serde_json::Map<String, Value> = self
            .publish
            .iter()
            .map(|(n, result)| {
                let mut phase = result.to_json();
                phase["requests_per_second"] = json!(result.per_second / self.batch_size as f64);
                (n.to_string(), phase)
            })
            .collect();
        let log: serde_json::Map<String, Value> = self
            .log
            .iter()
            .map(|(n, log)| {
                let mut phase = log.result.to_json();
                phase["mean_group_messages"] = json!(log.mean_group_messages);
                (n.to_string(), phase)
            })
            .collect();
        let ratios: serde_json::Map<String, Value> = self
            .ratios()
            .into_iter()
            .map(|ratio| {
                (
                    ratio.name.to_owned(),
                    json!({ "description": ratio.description, "value": ratio.value }),
                )
            })
            .collect();
        json!({
            "runs": self.runs,
            "batch_size": self.batch_size,
            "publish": publish,
            "log": log,
            "raw": phases(&self.raw),
            "http_round_trip": self.round_trip.as_ref().map(PhaseResult::to_json),
            "targets": targets,
            "ratios": ratios,
            "errors": self.errors,
        })
    }
}
