//! The reconnect delay schedule: exponential from `min` to `max`, with "equal jitter" (half
//! the delay fixed, half random) so that many clients cut at once do not reconnect in step,
//! while none retries much sooner than the schedule says. Pure: the randomness comes in.

use std::time::Duration;

/// The delay before reconnect attempt `failures` (0 after a connection that was up a while).
/// `jitter` is uniform in `[0, 1)`.
pub fn reconnect_delay(failures: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exponential = min
        .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let half = exponential / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_max_and_jitters_within_half() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        assert_eq!(reconnect_delay(0, min, max, 0.0), Duration::from_millis(50));
        assert_eq!(
            reconnect_delay(0, min, max, 1.0),
            Duration::from_millis(100)
        );
        assert_eq!(
            reconnect_delay(3, min, max, 1.0),
            Duration::from_millis(800)
        );
        assert_eq!(reconnect_delay(30, min, max, 1.0), max);
        assert_eq!(
            reconnect_delay(u32::MAX, min, max, 0.5),
            Duration::from_millis(7500)
        );
    }
}
