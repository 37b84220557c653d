//! The publisher side: HTTP batch publishes, either as fast as the server acks (bounded by how
//! far the slowest subscriber lags) or at a fixed rate.
//!
//! Every message's data is `{"sent_us":T,"pad":"x..."}`, with `T` the publish time in
//! microseconds since the Unix epoch, taken just before the request is sent; the subscribers
//! read it back to measure publish-to-deliver latency.
//!
//! # Invariants
//! - Both publishers stop at their deadline and after `messages_max` messages; requests in
//!   flight are bounded (`publishers` for the flood, [`PACED_IN_FLIGHT_MAX`] for the fixed
//!   rate) and each has the client's request timeout.
//! - The flood never runs more than `lag_max` messages ahead of the slowest subscriber, so a
//!   phase leaves a bounded backlog and the rate it reports is one the subscribers kept up with.

use tokio::sync::Semaphore;

use super::subscriber::{SubscriberState, min_last_serial, unix_now_us};
use super::*;

/// Requests in flight at once for the fixed-rate publisher.
const PACED_IN_FLIGHT_MAX: usize = 256;
/// How long the flood waits before looking at the subscribers' progress again.
const LAG_POLL: Duration = Duration::from_millis(1);
/// A publisher gives up after this many errors in a row: the server is gone or refusing.
const CONSECUTIVE_ERRORS_MAX: u32 = 100;

/// What the publishers of one phase achieved. Shared by their tasks.
#[derive(Default)]
pub(crate) struct PublishTally {
    /// Messages acknowledged.
    pub(crate) acked: AtomicU64,
    /// The highest serial acknowledged.
    pub(crate) top_serial: AtomicU64,
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl PublishTally {
    fn record(&self, outcome: Result<(u64, u64), String>) -> bool {
        match outcome {
            Ok((messages, top_serial)) => {
                self.acked.fetch_add(messages, Ordering::Relaxed);
                self.top_serial.fetch_max(top_serial, Ordering::Relaxed);
                true
            }
            Err(code) => {
                *self
                    .errors
                    .lock()
                    .expect("errors lock")
                    .entry(code)
                    .or_default() += 1;
                false
            }
        }
    }

    pub(crate) fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().expect("errors lock").clone()
    }
}

/// The settings both publishers share.
pub(crate) struct PublishTarget {
    pub(crate) client: reqwest::Client,
    pub(crate) messages_url: String,
    /// The padding string of every message's data (plain `x`s, no escaping needed).
    pub(crate) pad: String,
}

/// The batch body `{"messages":[{"data":{"sent_us":T,"pad":"..."}}, ...]}`, built as text so the
/// client's CPU stays off the measurement.
pub(crate) fn batch_body(messages: usize, sent_us: u64, pad: &str) -> String {
    let one = format!(r#"{{"data":{{"sent_us":{sent_us},"pad":"{pad}"}}}}"#);
    let mut body = String::with_capacity(16 + messages * (one.len() + 1));
    body.push_str(r#"{"messages":["#);
    for index in 0..messages {
        if index > 0 {
            body.push(',');
        }
        body.push_str(&one);
    }
    body.push_str("]}");
    body
}

/// One batch publish. `Ok((messages, highest serial))`, or the error code to count. A
/// duplicate ack is an error: the bench sends no ids, so each message must be a new append.
pub(crate) async fn publish_batch(
    target: &PublishTarget,
    messages: usize,
) -> Result<(u64, u64), String> {
    let body = batch_body(messages, unix_now_us(), &target.pad);
    let ack = post_json(&target.client, &target.messages_url, body).await?;
    let results = match ack.get("results").and_then(Value::as_array) {
        Some(results) if results.len() == messages => results,
        _ => return Err("bad_ack".to_owned()),
    };
    let mut top_serial = 0;
    for result in results {
        match (
            result.get("duplicate").and_then(Value::as_bool),
            result.get("serial").and_then(Value::as_u64),
        ) {
            (Some(false), Some(serial)) => top_serial = top_serial.max(serial),
            (Some(true), _) => return Err("unexpected_duplicate".to_owned()),
            _ => return Err("bad_ack".to_owned()),
        }
    }
    Ok((messages as u64, top_serial))
}

/// Settings of the flood.
pub(crate) struct FloodConfig {
    pub(crate) publishers: usize,
    pub(crate) batch_size: usize,
    pub(crate) deadline: Instant,
    pub(crate) messages_max: u64,
    pub(crate) lag_max: u64,
    /// The channel's top serial when the flood starts.
    pub(crate) base_serial: u64,
}

/// `publishers` closed-loop tasks sending batches until the deadline, each waiting while the
/// messages sent so far run more than `lag_max` ahead of the slowest subscriber.
pub(crate) async fn flood(
    target: Arc<PublishTarget>,
    config: FloodConfig,
    subscribers: Arc<Vec<Arc<SubscriberState>>>,
    tally: Arc<PublishTally>,
) {
    let config = Arc::new(config);
    // Messages sent (acked or in flight) by all publishers, for the lag bound and the cap.
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.publishers {
        let target = Arc::clone(&target);
        let config = Arc::clone(&config);
        let subscribers = Arc::clone(&subscribers);
        let tally = Arc::clone(&tally);
        let issued = Arc::clone(&issued);
        tasks.spawn(async move {
            let batch = config.batch_size as u64;
            let mut consecutive_errors = 0;
            while Instant::now() < config.deadline {
                let sent_top = config.base_serial + issued.load(Ordering::Relaxed);
                let lag = sent_top.saturating_sub(min_last_serial(&subscribers));
                // With nothing outstanding a batch always goes, even one larger than the bound.
                if lag > 0 && lag + batch > config.lag_max {
                    tokio::time::sleep(LAG_POLL).await;
                    continue;
                }
                if issued.fetch_add(batch, Ordering::Relaxed) >= config.messages_max {
                    break;
                }
                if tally.record(publish_batch(&target, config.batch_size).await) {
                    consecutive_errors = 0;
                } else {
                    consecutive_errors += 1;
                    if consecutive_errors >= CONSECUTIVE_ERRORS_MAX {
                        break;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One message per request at `rate` messages/s from `start` until `deadline` (at most
/// `messages_max`). The schedule is fixed: a late request does not push the later ones back,
/// so a slow server shows up as latency, not as a lower offered rate.
pub(crate) async fn paced(
    target: Arc<PublishTarget>,
    rate: u64,
    start: Instant,
    deadline: Instant,
    messages_max: u64,
    tally: Arc<PublishTally>,
) {
    let in_flight = Arc::new(Semaphore::new(PACED_IN_FLIGHT_MAX));
    let mut requests = tokio::task::JoinSet::new();
    let mut sent: u64 = 0;
    let mut consecutive_errors = 0;
    loop {
        let now = Instant::now();
        if now >= deadline || sent >= messages_max || consecutive_errors >= CONSECUTIVE_ERRORS_MAX {
            break;
        }
        let due = ((now - start).as_secs_f64() * rate as f64) as u64 + 1;
        while sent < due.min(messages_max) {
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                break;
            };
            let target = Arc::clone(&target);
            requests.spawn(async move {
                let outcome = publish_batch(&target, 1).await;
                drop(permit);
                outcome
            });
            sent += 1;
        }
        while let Some(done) = requests.try_join_next() {
            let outcome = done.unwrap_or_else(|_| Err("publisher_panicked".to_owned()));
            if tally.record(outcome) {
                consecutive_errors = 0;
            } else {
                consecutive_errors += 1;
            }
        }
        let next = start + Duration::from_secs_f64(sent as f64 / rate as f64);
        tokio::time::sleep_until(next.into()).await;
    }
    while let Some(done) = requests.join_next().await {
        tally.record(done.unwrap_or_else(|_| Err("publisher_panicked".to_owned())));
    }
}
