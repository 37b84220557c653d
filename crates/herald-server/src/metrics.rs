//! `GET /metrics`: Herald's counters in the Prometheus text format (version 0.0.4).
//!
//! Counters live in one [`Metrics`] per server (not in a process-wide registry), so several
//! servers in one test process never mix their figures. Labels are bounded: routes are the
//! router's templates (never raw paths or channel names), error codes are the fixed
//! `ErrorCode` set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::ErrorCode;
use herald_log::{StoreHealth, StoreStats};

/// Upper bounds of the publish ack latency histogram, in seconds.
const ACK_BUCKETS_SECONDS: [f64; 12] = [
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// Per-server counters. Cheap to update from any handler.
#[derive(Default)]
pub struct Metrics {
    /// (route template, method, status) -> requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// Error code -> responses carrying it.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    messages_stored: AtomicU64,
    messages_duplicate: AtomicU64,
    ack_buckets: [AtomicU64; ACK_BUCKETS_SECONDS.len()],
    ack_count: AtomicU64,
    ack_sum_micros: AtomicU64,
    /// The MQTT listener's counters (rendered by `/metrics` whether or not it runs).
    pub mqtt: crate::mqtt::MqttCounters,
}

impl Metrics {
    pub fn record_request(&self, route: &str, method: &str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *requests
            .entry((route.to_owned(), method.to_owned(), status))
            .or_default() += 1;
    }

    pub fn record_error(&self, code: ErrorCode) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(code.as_str()).or_default() += 1;
    }

    /// One publish request made durable: its messages and how long the store took to ack.
    pub fn record_publish(&self, stored: u64, duplicates: u64, ack: Duration) {
        self.messages_stored.fetch_add(stored, Ordering::Relaxed);
        self.messages_duplicate
            .fetch_add(duplicates, Ordering::Relaxed);
        let seconds = ack.as_secs_f64();
        for (bound, bucket) in ACK_BUCKETS_SECONDS.iter().zip(&self.ack_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ack_count.fetch_add(1, Ordering::Relaxed);
        self.ack_sum_micros.fetch_add(
            u64::try_from(ack.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The whole exposition.
    pub fn render(&self, store: &StoreStats, health: &StoreHealth) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "herald_http_requests_total",
            "counter",
            "HTTP requests by route template, method and status.",
        );
        for ((route, method, status), count) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "herald_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {count}",
                escape(route),
                escape(method)
            );
        }
        header(
            &mut out,
            "herald_errors_total",
            "counter",
            "Error responses by stable error code (docs/errors.md).",
        );
        for (code, count) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "herald_errors_total{{code=\"{code}\"}} {count}");
        }
        header(
            &mut out,
            "herald_published_messages_total",
            "counter",
            "Messages acknowledged to publishers, new or recognised as duplicates.",
        );
        let _ = writeln!(
            out,
            "herald_published_messages_total{{result=\"stored\"}} {}",
            self.messages_stored.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "herald_published_messages_total{{result=\"duplicate\"}} {}",
            self.messages_duplicate.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "herald_publish_ack_seconds",
            "histogram",
            "Time from handing a publish to the store until it was durable and acknowledged.",
        );
        for (bound, bucket) in ACK_BUCKETS_SECONDS.iter().zip(&self.ack_buckets) {
            let _ = writeln!(
                out,
                "herald_publish_ack_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.ack_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "herald_publish_ack_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "herald_publish_ack_seconds_sum {}",
            self.ack_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "herald_publish_ack_seconds_count {count}");
        for (name, help, value) in [
            (
                "herald_store_group_commits_total",
                "Group writes made durable (one write plus one fdatasync each).",
                store.groups,
            ),
            (
                "herald_store_appends_total",
                "Append commands answered by the store.",
                store.appends,
            ),
            (
                "herald_store_messages_written_total",
                "Message records written to the log.",
                store.messages,
            ),
            (
                "herald_store_bytes_written_total",
                "Bytes of records written to the log.",
                store.bytes,
            ),
            (
                "herald_store_subscriber_saves_total",
                "Durable subscriber snapshots and removals written (in the same group commits).",
                store.subscriber_saves,
            ),
            (
                "herald_store_state_saves_total",
                "Durable state records (MQTT sessions) and removals written (in the same group commits).",
                store.state_saves,
            ),
            (
                "herald_store_segment_rollovers_total",
                "Log segments started after open.",
                store.rollovers,
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "herald_store_poisoned",
            "gauge",
            "1 when a write or fsync failed and the store refuses writes until restart.",
        );
        let poisoned = u8::from(matches!(health, StoreHealth::Poisoned(_)));
        let _ = writeln!(out, "herald_store_poisoned {poisoned}");
        out
    }
}

/// The realtime part of the exposition: connections, subscriptions, deliveries, drops, gaps,
/// lost continuity and log catch-up.
pub fn render_live(out: &mut String, realtime: &crate::realtime::Realtime) {
    let counters = &realtime.live.counters;
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    for (name, kind, help, value) in [
        (
            "herald_connections",
            "gauge",
            "Open WebSocket and SSE connections.",
            load(&realtime.connections),
        ),
        (
            "herald_connections_total",
            "counter",
            "WebSocket and SSE connections opened.",
            load(&realtime.connections_total),
        ),
        (
            "herald_subscriptions",
            "gauge",
            "Active subscriptions (WebSocket and SSE).",
            load(&counters.subscriptions),
        ),
        (
            "herald_live_channels",
            "gauge",
            "Channels with a live ring (channels that have subscribers).",
            realtime.live.hub.channels() as u64,
        ),
        (
            "herald_live_dropped_total",
            "counter",
            "At-most-once messages dropped because a subscriber's outbound queue was full.",
            load(&counters.dropped),
        ),
        (
            "herald_live_gap_notices_total",
            "counter",
            "Gap notices sent to at-most-once subscribers.",
            load(&counters.gap_notices),
        ),
        (
            "herald_live_catch_up_reads_total",
            "counter",
            "Log reads made to replay history or catch up a subscriber that fell behind.",
            load(&counters.catch_up_reads),
        ),
    ] {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        out,
        "herald_live_deliveries_total",
        "counter",
        "Messages handed to subscribers' outbound queues, by guarantee.",
    );
    for (guarantee, counter) in [
        ("exactly-once", &counters.delivered_exactly_once),
        ("at-most-once", &counters.delivered_at_most_once),
    ] {
        let _ = writeln!(
            out,
            "herald_live_deliveries_total{{guarantee=\"{guarantee}\"}} {}",
            load(counter)
        );
    }
    header(
        out,
        "herald_continuity_lost_total",
        "counter",
        "continuity_lost notices sent to subscribers, by reason.",
    );
    for (reason, counter) in [
        ("retention", &counters.continuity_lost_retention),
        ("epoch_changed", &counters.continuity_lost_epoch_changed),
        ("ahead_of_top", &counters.continuity_lost_ahead_of_top),
    ] {
        let _ = writeln!(
            out,
            "herald_continuity_lost_total{{reason=\"{reason}\"}} {}",
            load(counter)
        );
    }
}

/// The at-least-once part: durable subscriptions, deliveries and redeliveries, acks,
/// snapshots, dead letters, expiry, takeovers and removals.
pub fn render_durable(out: &mut String, durable: &crate::durable::DurableContext) {
    let counters = &durable.counters;
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    for (name, kind, help, value) in [
        (
            "herald_durable_subscriptions",
            "gauge",
            "At-least-once subscribers held by a connection or a webhook worker.",
            load(&counters.subscriptions),
        ),
        (
            "herald_durable_deliveries_total",
            "counter",
            "At-least-once deliveries handed out, first and repeated.",
            load(&counters.deliveries),
        ),
        (
            "herald_durable_redeliveries_total",
            "counter",
            "At-least-once deliveries of a message delivered before (after ack_wait, a reconnect or a retry).",
            load(&counters.redeliveries),
        ),
        (
            "herald_durable_acks_total",
            "counter",
            "At-least-once acks accepted (cumulative and individual).",
            load(&counters.acks),
        ),
        (
            "herald_durable_acks_rejected_total",
            "counter",
            "At-least-once acks refused with invalid_ack.",
            load(&counters.acks_rejected),
        ),
        (
            "herald_durable_snapshots_total",
            "counter",
            "Subscriber snapshots written (each rides a group commit of the log).",
            load(&counters.persists),
        ),
        (
            "herald_durable_dead_letters_total",
            "counter",
            "Messages moved to a dead-letter channel after max_deliveries.",
            load(&counters.dead_letters),
        ),
        (
            "herald_durable_expired_notices_total",
            "counter",
            "expired notices: messages whose TTL ran out before they were acked.",
            load(&counters.expired_notices),
        ),
        (
            "herald_durable_continuity_lost_total",
            "counter",
            "continuity_lost notices sent to at-least-once subscribers.",
            load(&counters.continuity_lost),
        ),
        (
            "herald_durable_takeovers_total",
            "counter",
            "Subscribers taken over by a second connection (the first closed with 4004).",
            load(&counters.takeovers),
        ),
        (
            "herald_durable_subscribers_expired_total",
            "counter",
            "Subscribers removed after being idle past their expiry.",
            load(&counters.subscribers_expired),
        ),
        (
            "herald_durable_subscribers_deleted_total",
            "counter",
            "Subscribers removed with DELETE.",
            load(&counters.subscribers_deleted),
        ),
    ] {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline), per the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counts_add_up() {
        let metrics = Metrics::default();
        metrics.record_publish(2, 0, Duration::from_micros(300));
        metrics.record_publish(0, 1, Duration::from_millis(30));
        metrics.record_error(ErrorCode::IdConflict);
        metrics.record_request("/health", "GET", 200);
        let text = metrics.render(&StoreStats::default(), &StoreHealth::Ok);
        assert!(text.contains("herald_publish_ack_seconds_bucket{le=\"0.0002\"} 0\n"));
        assert!(text.contains("herald_publish_ack_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("herald_publish_ack_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("herald_publish_ack_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("herald_publish_ack_seconds_count 2\n"));
        assert!(text.contains("herald_published_messages_total{result=\"stored\"} 2\n"));
        assert!(text.contains("herald_published_messages_total{result=\"duplicate\"} 1\n"));
        assert!(text.contains("herald_errors_total{code=\"id_conflict\"} 1\n"));
        assert!(text.contains(
            "herald_http_requests_total{route=\"/health\",method=\"GET\",status=\"200\"} 1\n"
        ));
        assert!(text.contains("herald_store_poisoned 0\n"));
    }
}
