//! Latency samples and their summaries: percentiles, medians, phase results.

use super::*;

/// Latency percentiles and throughput of one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseResult {
    /// Operations (messages or raw records) completed in the measured window.
    pub operations: u64,
    /// Length of the measured window.
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl PhaseResult {
    pub(crate) fn from_samples(
        operations: u64,
        seconds: f64,
        mut latencies_us: Vec<u64>,
    ) -> PhaseResult {
        latencies_us.sort_unstable();
        PhaseResult {
            operations,
            seconds,
            per_second: if seconds > 0.0 {
                operations as f64 / seconds
            } else {
                0.0
            },
            p50_us: percentile(&latencies_us, 50.0).unwrap_or(0),
            p99_us: percentile(&latencies_us, 99.0).unwrap_or(0),
            max_us: latencies_us.last().copied().unwrap_or(0),
        }
    }

    /// The median of each figure over several runs of the same phase, taken figure by figure.
    pub(crate) fn median(runs: &[PhaseResult]) -> PhaseResult {
        let median_of = |figure: fn(&PhaseResult) -> f64| {
            median(&runs.iter().map(figure).collect::<Vec<f64>>()).unwrap_or(0.0)
        };
        PhaseResult {
            operations: median_of(|run| run.operations as f64).round() as u64,
            seconds: median_of(|run| run.seconds),
            per_second: median_of(|run| run.per_second),
            p50_us: median_of(|run| run.p50_us as f64).round() as u64,
            p99_us: median_of(|run| run.p99_us as f64).round() as u64,
            max_us: median_of(|run| run.max_us as f64).round() as u64,
        }
    }

    pub(crate) fn summary(&self, unit: &str) -> String {
        format!(
            "{:>10.0} {unit}/s  p50 {:>8}  p99 {:>8}  max {:>8}  ({} in {:.1}s)",
            self.per_second,
            format_us(self.p50_us),
            format_us(self.p99_us),
            format_us(self.max_us),
            self.operations,
            self.seconds
        )
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "operations": self.operations,
            "seconds": self.seconds,
            "per_second": self.per_second,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        })
    }
}

/// Nearest-rank percentile of an ascending slice: the smallest sample such that at least
/// `percent`% of the samples are at or below it. `None` for an empty slice.
pub fn percentile(sorted: &[u64], percent: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    debug_assert!(sorted.is_sorted(), "percentile needs ascending samples");
    let rank = (percent.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median of unsorted values; the mean of the two middle ones for an even count.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

pub(crate) fn format_us(micros: u64) -> String {
    format!("{:.3}ms", micros as f64 / 1000.0)
}

pub(crate) fn elapsed_us(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// `count` per second over a window of `seconds` (0 for an empty window).
pub(crate) fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// CPU time over wall time: 1.0 is one core busy for the whole window.
pub(crate) fn cores(cpu_us: Option<u64>, seconds: f64) -> Option<f64> {
    let cpu_us = cpu_us?;
    (seconds > 0.0).then(|| cpu_us as f64 / 1e6 / seconds)
}

/// CPU time per delivered message, in microseconds.
pub(crate) fn cpu_us_per(cpu_us: Option<u64>, delivered: u64) -> Option<f64> {
    let cpu_us = cpu_us?;
    (delivered > 0).then(|| cpu_us as f64 / delivered as f64)
}
