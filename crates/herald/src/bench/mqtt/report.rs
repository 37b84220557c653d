//! The MQTT bench report: per-case throughput and latency rows for each broker, the delivery
//! checks, Herald against Mosquitto (issue #6's target), as a table or as JSON.

use super::broker::{Broker, HeraldCounters};
use super::clients::SessionKind;
use super::*;

/// What changed over a measured window.
#[derive(Clone, Debug, Default)]
pub(crate) struct Window {
    pub(crate) seconds: f64,
    /// Messages the publisher completed: acknowledged (QoS 1/2) or written (QoS 0).
    pub(crate) published: u64,
    /// PUBACKs/PUBRECs that did not answer the oldest outstanding publish.
    pub(crate) acks_out_of_order: u64,
    /// New messages received, summed over the subscribers.
    pub(crate) delivered: u64,
    pub(crate) broker_cpu_us: Option<u64>,
    pub(crate) bench_cpu_us: Option<u64>,
    /// Herald's `/metrics` over the window (`None` for Mosquitto, or when unreadable).
    pub(crate) herald: Option<HeraldCounters>,
}

impl Window {
    pub(crate) fn between(start: &Snapshot, end: &Snapshot) -> Window {
        let difference = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
        Window {
            seconds: end.at.duration_since(start.at).as_secs_f64(),
            published: end.published.saturating_sub(start.published),
            acks_out_of_order: end
                .acks_out_of_order
                .saturating_sub(start.acks_out_of_order),
            delivered: end.delivered.saturating_sub(start.delivered),
            broker_cpu_us: difference(start.broker_cpu_us, end.broker_cpu_us),
            bench_cpu_us: difference(start.bench_cpu_us, end.bench_cpu_us),
            herald: match (start.herald, end.herald) {
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

    /// Broker CPU time per delivered message, in microseconds.
    pub(crate) fn broker_cpu_us_per_delivery(&self) -> Option<f64> {
        crate::bench::stats::cpu_us_per(self.broker_cpu_us, self.delivered)
    }

    /// CPU time over wall time: 1.0 is one core busy for the whole window.
    fn cores(&self, cpu_us: Option<u64>) -> Option<f64> {
        crate::bench::stats::cores(cpu_us, self.seconds)
    }

    pub(crate) fn broker_cpu_cores(&self) -> Option<f64> {
        self.cores(self.broker_cpu_us)
    }

    pub(crate) fn bench_cpu_cores(&self) -> Option<f64> {
        self.cores(self.bench_cpu_us)
    }

    /// Herald's group commits (one fsync each) per second.
    pub(crate) fn fsyncs_per_second(&self) -> Option<f64> {
        Some(self.per_second(self.herald?.group_commits))
    }

    /// Herald's state records saved per second (persistent MQTT sessions, among others).
    pub(crate) fn state_saves_per_second(&self) -> Option<f64> {
        Some(self.per_second(self.herald?.state_saves))
    }

    fn to_json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "published": self.published,
            "delivered": self.delivered,
            "acks_out_of_order": self.acks_out_of_order,
            "published_per_second": self.published_per_second(),
            "delivered_per_second": self.delivered_per_second(),
            "broker_cpu_cores": self.broker_cpu_cores(),
            "broker_cpu_us_per_delivery": self.broker_cpu_us_per_delivery(),
            "bench_cpu_cores": self.bench_cpu_cores(),
            "fsyncs_per_second": self.fsyncs_per_second(),
            "state_saves_per_second": self.state_saves_per_second(),
            "herald_deliveries_dropped": self.herald.map(|counters| counters.deliveries_dropped),
        })
    }
}

/// What a phase published and what its subscribers did not receive, after the drain.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeliveryCheck {
    /// Messages the phase handed to the publisher.
    pub(crate) messages: u64,
    /// `messages` x subscribers.
    pub(crate) expected_deliveries: u64,
    /// Expected deliveries that never arrived (as a new, in-order message).
    pub(crate) not_delivered: u64,
    /// Messages received again or out of order.
    pub(crate) late: u64,
    /// Payloads that were not the bench's.
    pub(crate) malformed: u64,
    /// QoS 1/2 publishes never acknowledged (QoS 0: never written).
    pub(crate) unacknowledged: u64,
    /// Whether everything arrived before `--drain-timeout`.
    pub(crate) drained: bool,
    pub(crate) drain: Duration,
    /// Subscribers whose connection failed, and the first reasons (the publisher's too).
    pub(crate) failed_clients: usize,
    pub(crate) failures: Vec<String>,
}

impl DeliveryCheck {
    fn to_json(&self) -> Value {
        json!({
            "messages": self.messages,
            "expected_deliveries": self.expected_deliveries,
            "not_delivered": self.not_delivered,
            "duplicate_or_reordered": self.late,
            "malformed": self.malformed,
            "unacknowledged": self.unacknowledged,
            "drained": self.drained,
            "drain_seconds": self.drain.as_secs_f64(),
            "failed_clients": self.failed_clients,
            "failures": self.failures,
        })
    }
}

/// One broker, QoS, subscriber count and session: the throughput phase.
#[derive(Clone, Debug)]
pub(crate) struct ThroughputRow {
    pub(crate) broker: Broker,
    pub(crate) qos: u8,
    pub(crate) subscribers: usize,
    pub(crate) session: SessionKind,
    pub(crate) window: Window,
    pub(crate) check: DeliveryCheck,
}

/// One broker, QoS, subscriber count and session: the fixed-rate latency phase.
#[derive(Clone, Debug)]
pub(crate) struct LatencyRow {
    pub(crate) broker: Broker,
    pub(crate) qos: u8,
    pub(crate) subscribers: usize,
    pub(crate) session: SessionKind,
    pub(crate) rate: u64,
    pub(crate) window: Window,
    /// Publish-to-deliver latency over the measured window's messages.
    pub(crate) latency: PhaseResult,
    pub(crate) samples: usize,
    pub(crate) check: DeliveryCheck,
}

/// A broker that ran.
#[derive(Clone, Debug)]
pub(crate) struct BrokerInfo {
    pub(crate) broker: Broker,
    pub(crate) version: String,
    pub(crate) pid: u32,
}

impl BrokerInfo {
    /// How the broker treats QoS >= 1 messages: the difference the comparison must state.
    fn durability(&self) -> &'static str {
        match self.broker {
            Broker::Herald => {
                "every PUBLISH is appended to the log; PUBACK/PUBREC only after the fsync"
            }
            Broker::Mosquitto => "persistence off: QoS>=1 messages are kept in memory only",
        }
    }
}

/// The settings the report states.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) message_bytes: usize,
    pub(crate) inflight: u16,
    pub(crate) lag_max: u64,
    pub(crate) rate: u64,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
}

/// Herald against Mosquitto for one QoS, subscriber count and session.
#[derive(Clone, Debug)]
pub(crate) struct Comparison {
    pub(crate) qos: u8,
    pub(crate) subscribers: usize,
    pub(crate) session: SessionKind,
    pub(crate) herald_per_second: f64,
    pub(crate) mosquitto_per_second: f64,
    /// Herald's delivered/s over Mosquitto's.
    pub(crate) ratio: f64,
    /// Issue #6: Herald at least matches Mosquitto's throughput.
    pub(crate) met: bool,
    pub(crate) herald_p99_us: Option<u64>,
    pub(crate) mosquitto_p99_us: Option<u64>,
}

/// The whole run.
#[derive(Clone, Debug)]
pub(crate) struct MqttReport {
    pub(crate) brokers: Vec<BrokerInfo>,
    /// Brokers asked for and not run, with the reason.
    pub(crate) skipped: Vec<String>,
    pub(crate) settings: Settings,
    pub(crate) throughput: Vec<ThroughputRow>,
    pub(crate) latency: Vec<LatencyRow>,
    /// Cases that could not run (connect or subscribe failures).
    pub(crate) case_errors: Vec<String>,
}

impl MqttReport {
    pub(crate) fn comparisons(&self) -> Vec<Comparison> {
        let mut comparisons = Vec::new();
        for herald in self
            .throughput
            .iter()
            .filter(|row| row.broker == Broker::Herald)
        {
            let Some(mosquitto) = self.throughput.iter().find(|row| {
                row.broker == Broker::Mosquitto
                    && row.qos == herald.qos
                    && row.subscribers == herald.subscribers
                    && row.session == herald.session
            }) else {
                continue;
            };
            let p99 = |broker: Broker| {
                self.latency
                    .iter()
                    .find(|row| {
                        row.broker == broker
                            && row.qos == herald.qos
                            && row.subscribers == herald.subscribers
                            && row.session == herald.session
                    })
                    .map(|row| row.latency.p99_us)
            };
            let herald_per_second = herald.window.delivered_per_second();
            let mosquitto_per_second = mosquitto.window.delivered_per_second();
            let ratio = if mosquitto_per_second > 0.0 {
                herald_per_second / mosquitto_per_second
            } else {
                0.0
            };
            comparisons.push(Comparison {
                qos: herald.qos,
                subscribers: herald.subscribers,
                session: herald.session,
                herald_per_second,
                mosquitto_per_second,
                ratio,
                met: mosquitto_per_second > 0.0 && ratio >= 1.0,
                herald_p99_us: p99(Broker::Herald),
                mosquitto_p99_us: p99(Broker::Mosquitto),
            });
        }
        comparisons
    }

    /// What makes the run a failure: clients that failed, QoS >= 1 messages not acknowledged
    /// or not delivered, QoS 2 duplicates, foreign payloads, cases that could not run. Slower
    /// than the target is reported, not a failure.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = self.case_errors.clone();
        let checks = self
            .throughput
            .iter()
            .map(|row| {
                (
                    row.broker,
                    row.qos,
                    row.subscribers,
                    row.session,
                    "throughput",
                    &row.check,
                )
            })
            .chain(self.latency.iter().map(|row| {
                (
                    row.broker,
                    row.qos,
                    row.subscribers,
                    row.session,
                    "latency",
                    &row.check,
                )
            }));
        for (broker, qos, subscribers, session, phase, check) in checks {
            let case = format!(
                "{} qos {qos} 1->{subscribers}{} {phase}",
                broker.as_str(),
                session.label_suffix()
            );
            if check.failed_clients > 0 {
                problems.push(format!(
                    "{case}: {} clients failed ({})",
                    check.failed_clients,
                    check.failures.join("; ")
                ));
            }
            if qos >= 1 && check.not_delivered > 0 {
                problems.push(format!(
                    "{case}: {} of {} QoS {qos} deliveries missing",
                    check.not_delivered, check.expected_deliveries
                ));
            }
            if qos >= 1 && check.unacknowledged > 0 {
                problems.push(format!(
                    "{case}: {} publishes never acknowledged",
                    check.unacknowledged
                ));
            }
            if qos == 2 && check.late > 0 {
                problems.push(format!(
                    "{case}: {} QoS 2 messages received twice or out of order",
                    check.late
                ));
            }
            if check.malformed > 0 {
                problems.push(format!(
                    "{case}: {} deliveries were not the bench's payload",
                    check.malformed
                ));
            }
        }
        problems
    }

    pub(crate) fn to_table(&self) -> String {
        let settings = &self.settings;
        let mut out = String::new();
        out.push_str(&format!(
            "\nMQTT 3.1.1, 1 publisher -> N subscribers on one topic, the same rumqttc clients for \
             every broker; {} B payloads\n",
            settings.message_bytes
        ));
        for info in &self.brokers {
            out.push_str(&format!(
                "  {:<10} {} (pid {}): {}\n",
                info.broker.as_str(),
                info.version,
                info.pid,
                info.durability()
            ));
        }
        for skipped in &self.skipped {
            out.push_str(&format!("  not measured: {skipped}\n"));
        }
        out.push_str(&format!(
            "\nthroughput: the publisher at full speed, at most {} QoS 1/2 publishes in flight \
             and {} messages ahead of the slowest subscriber; {:.1}s measured after {:.1}s\n",
            settings.inflight,
            settings.lag_max,
            settings.duration.as_secs_f64(),
            settings.warmup.as_secs_f64()
        ));
        out.push_str(&format!(
            "{:<10} {:>3} {:>5} {:<10} {:>12} {:>12} {:>7} {:>10} {:>6} {:>9} {:>9} {:>9} {:>7} {:>8}\n",
            "broker",
            "qos",
            "subs",
            "session",
            "published/s",
            "delivered/s",
            "broker",
            "cpu/deliv",
            "bench",
            "fsyncs/s",
            "saves/s",
            "not deliv",
            "dup/ooo",
            "ack ooo"
        ));
        for row in &self.throughput {
            let window = &row.window;
            out.push_str(&format!(
                "{:<10} {:>3} {:>5} {:<10} {:>12} {:>12} {:>7} {:>10} {:>6} {:>9} {:>9} {:>9} {:>7} {:>8}\n",
                row.broker.as_str(),
                row.qos,
                row.subscribers,
                row.session.as_str(),
                thousands(window.published_per_second()),
                thousands(window.delivered_per_second()),
                format_cores(window.broker_cpu_cores()),
                window
                    .broker_cpu_us_per_delivery()
                    .map(|us| format!("{us:.2}us"))
                    .unwrap_or_else(|| "-".to_owned()),
                format_cores(window.bench_cpu_cores()),
                window
                    .fsyncs_per_second()
                    .map(thousands)
                    .unwrap_or_else(|| "-".to_owned()),
                window
                    .state_saves_per_second()
                    .map(thousands)
                    .unwrap_or_else(|| "-".to_owned()),
                row.check.not_delivered,
                row.check.late,
                window.acks_out_of_order
            ));
        }
        out.push_str(
            "(published/s: PUBACKs (QoS 1) or PUBCOMPs (QoS 2) received, QoS 0 messages written; \
             delivered/s: new\n messages received, summed over the subscribers; broker, bench: \
             CPU in cores (this machine has\n its cores shared by both); cpu/deliv: broker CPU \
             time / deliveries; fsyncs/s: Herald's group commits;\n saves/s: Herald's state \
             records saved (persistent sessions); session: the subscribers'; not deliv: expected\n \
             deliveries that never arrived; dup/ooo: received again or out of order;\n ack ooo: \
             PUBACKs/PUBRECs that did not answer the publisher's oldest outstanding PUBLISH)\n",
        );

        out.push_str(&format!(
            "\nlatency: {} messages/s on a fixed schedule, from the publisher handing a message \
             to its client to a subscriber receiving it\n",
            settings.rate
        ));
        out.push_str(&format!(
            "{:<10} {:>3} {:>5} {:<10} {:>12} {:>9} {:>9} {:>9} {:>8} {:>7} {:>9}\n",
            "broker",
            "qos",
            "subs",
            "session",
            "delivered/s",
            "p50",
            "p99",
            "max",
            "samples",
            "broker",
            "not deliv"
        ));
        for row in &self.latency {
            out.push_str(&format!(
                "{:<10} {:>3} {:>5} {:<10} {:>12} {:>9} {:>9} {:>9} {:>8} {:>7} {:>9}\n",
                row.broker.as_str(),
                row.qos,
                row.subscribers,
                row.session.as_str(),
                thousands(row.window.delivered_per_second()),
                format_us(row.latency.p50_us),
                format_us(row.latency.p99_us),
                format_us(row.latency.max_us),
                row.samples,
                format_cores(row.window.broker_cpu_cores()),
                row.check.not_delivered
            ));
        }

        let comparisons = self.comparisons();
        if !comparisons.is_empty() {
            out.push_str(
                "\ntarget (issue #6): Herald's delivered/s >= Mosquitto's at every QoS, with \
                 QoS>=1 durable before the ack\n",
            );
            for comparison in &comparisons {
                out.push_str(&format!(
                    "  qos {} 1->{:<4} {:<10} herald {:>10}/s  mosquitto {:>10}/s  = {:>6.1}%  {}   \
                     p99 at {}/s: herald {} mosquitto {}\n",
                    comparison.qos,
                    comparison.subscribers,
                    comparison.session.as_str(),
                    thousands(comparison.herald_per_second),
                    thousands(comparison.mosquitto_per_second),
                    comparison.ratio * 100.0,
                    if comparison.met { "met" } else { "MISSED" },
                    settings.rate,
                    comparison
                        .herald_p99_us
                        .map(format_us)
                        .unwrap_or_else(|| "-".to_owned()),
                    comparison
                        .mosquitto_p99_us
                        .map(format_us)
                        .unwrap_or_else(|| "-".to_owned()),
                ));
            }
        }
        let problems = self.problems();
        if !problems.is_empty() {
            out.push_str("\nproblems:\n");
            for problem in &problems {
                out.push_str(&format!("  {problem}\n"));
            }
        }
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        let settings = &self.settings;
        json!({
            "protocol": "MQTT 3.1.1 (rumqttc)",
            "brokers": self.brokers.iter().map(|info| json!({
                "broker": info.broker.as_str(),
                "version": info.version,
                "pid": info.pid,
                "durability": info.durability(),
            })).collect::<Vec<Value>>(),
            "skipped": self.skipped,
            "settings": {
                "message_bytes": settings.message_bytes,
                "inflight": settings.inflight,
                "lag_max": settings.lag_max,
                "rate": settings.rate,
                "duration_seconds": settings.duration.as_secs_f64(),
                "warmup_seconds": settings.warmup.as_secs_f64(),
            },
            "throughput": self.throughput.iter().map(|row| {
                let mut value = row.window.to_json();
                value["broker"] = json!(row.broker.as_str());
                value["qos"] = json!(row.qos);
                value["subscribers"] = json!(row.subscribers);
                value["session"] = json!(row.session.as_str());
                value["check"] = row.check.to_json();
                value
            }).collect::<Vec<Value>>(),
            "latency": self.latency.iter().map(|row| {
                let mut value = row.window.to_json();
                value["broker"] = json!(row.broker.as_str());
                value["qos"] = json!(row.qos);
                value["subscribers"] = json!(row.subscribers);
                value["session"] = json!(row.session.as_str());
                value["rate"] = json!(row.rate);
                value["p50_us"] = json!(row.latency.p50_us);
                value["p99_us"] = json!(row.latency.p99_us);
                value["max_us"] = json!(row.latency.max_us);
                value["samples"] = json!(row.samples);
                value["check"] = row.check.to_json();
                value
            }).collect::<Vec<Value>>(),
            "comparison": self.comparisons().iter().map(|comparison| json!({
                "qos": comparison.qos,
                "subscribers": comparison.subscribers,
                "session": comparison.session.as_str(),
                "herald_delivered_per_second": comparison.herald_per_second,
                "mosquitto_delivered_per_second": comparison.mosquitto_per_second,
                "ratio": comparison.ratio,
                "met": comparison.met,
                "herald_p99_us": comparison.herald_p99_us,
                "mosquitto_p99_us": comparison.mosquitto_p99_us,
            })).collect::<Vec<Value>>(),
            "problems": self.problems(),
        })
    }
}

/// A rate rounded to a whole number with thousands separators: `1,234,567`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn format_cores(cores: Option<f64>) -> String {
    cores
        .map(|cores| format!("{cores:.2}"))
        .unwrap_or_else(|| "-".to_owned())
}
