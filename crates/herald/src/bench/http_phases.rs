//! The HTTP phases: closed-loop publishers and the `GET /health` round trip.

use super::*;

pub(crate) struct PublishConfig {
    pub(crate) url: String,
    pub(crate) run_tag: String,
    pub(crate) publishers: usize,
    /// Messages per request; 1 sends the single-message form.
    pub(crate) batch_size: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) messages_max: u64,
    pub(crate) channels: usize,
    pub(crate) channel_prefix: String,
    /// The compact JSON text of every message's data, serialised once per phase.
    pub(crate) payload_json: String,
}

pub(crate) struct PublishOutcome {
    pub(crate) result: PhaseResult,
    /// Failed publishes by error code (server codes, `http_<status>`, `transport`, ...).
    pub(crate) errors: BTreeMap<String, u64>,
}

/// What one publisher task measured.
#[derive(Default)]
pub(crate) struct PublisherTally {
    pub(crate) latencies_us: Vec<u64>,
    /// When the last measured ack arrived, to close the measured window.
    pub(crate) last_ack: Option<Instant>,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Errors in a row; a task gives up after `CONSECUTIVE_ERRORS_MAX`.
    pub(crate) consecutive_errors: u32,
}

impl PublisherTally {
    /// Waits for every task and merges their tallies; a task that panicked counts as one error
    /// with `panic_code`.
    pub(crate) async fn join_all(
        tasks: &mut tokio::task::JoinSet<PublisherTally>,
        panic_code: &str,
    ) -> PublisherTally {
        let mut total = PublisherTally::default();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(tally) => {
                    total.latencies_us.extend(tally.latencies_us);
                    total.last_ack = total.last_ack.max(tally.last_ack);
                    for (code, count) in tally.errors {
                        *total.errors.entry(code).or_default() += count;
                    }
                }
                Err(_) => *total.errors.entry(panic_code.to_owned()).or_default() += 1,
            }
        }
        total
    }

    /// Records one operation sent at `sent`; only successes after `measured_from` count
    /// towards latency and the measured window. Returns true when the task should stop.
    pub(crate) fn record(
        &mut self,
        outcome: Result<(), String>,
        sent: Instant,
        measured_from: Instant,
    ) -> bool {
        match outcome {
            Ok(()) => {
                self.consecutive_errors = 0;
                if sent >= measured_from {
                    self.latencies_us.push(elapsed_us(sent));
                    self.last_ack = Some(Instant::now());
                }
                false
            }
            Err(code) => {
                *self.errors.entry(code).or_default() += 1;
                self.consecutive_errors += 1;
                self.consecutive_errors >= CONSECUTIVE_ERRORS_MAX
            }
        }
    }
}

pub(crate) async fn measure_publish(
    client: &reqwest::Client,
    config: PublishConfig,
) -> PublishOutcome {
    let config = Arc::new(config);
    let started = Instant::now();
    let measured_from = started + config.warmup;
    let deadline = measured_from + config.duration;
    // Shared so that the count bound holds for the whole phase, not per publisher.
    let issued = Arc::new(AtomicU64::new(0));

    let mut tasks = tokio::task::JoinSet::new();
    for publisher in 0..config.publishers {
        let client = client.clone();
        let config = Arc::clone(&config);
        let issued = Arc::clone(&issued);
        tasks.spawn(async move {
            run_publisher(
                &client,
                &config,
                publisher,
                measured_from,
                deadline,
                &issued,
            )
            .await
        });
    }

    let PublisherTally {
        latencies_us,
        last_ack,
        errors,
        ..
    } = PublisherTally::join_all(&mut tasks, "publisher_panicked").await;
    let seconds = last_ack
        .map(|last| last.saturating_duration_since(measured_from).as_secs_f64())
        .unwrap_or(0.0);
    // One latency per acked request, and every acked request carried a full batch.
    let messages = latencies_us.len() as u64 * config.batch_size as u64;
    PublishOutcome {
        result: PhaseResult::from_samples(messages, seconds, latencies_us),
        errors,
    }
}

pub(crate) async fn run_publisher(
    client: &reqwest::Client,
    config: &PublishConfig,
    publisher: usize,
    measured_from: Instant,
    deadline: Instant,
    issued: &AtomicU64,
) -> PublisherTally {
    let base = config.url.trim_end_matches('/');
    let mut tally = PublisherTally::default();
    let batch_size = config.batch_size as u64;
    for sequence in 0u64.. {
        if Instant::now() >= deadline
            || issued.fetch_add(batch_size, Ordering::Relaxed) >= config.messages_max
        {
            break;
        }
        let channel_index = (publisher as u64 + sequence) % config.channels as u64;
        let url = format!(
            "{base}/v1/channels/{}:{channel_index}/messages",
            config.channel_prefix
        );
        let body = publish_body(
            &config.run_tag,
            publisher,
            sequence,
            config.batch_size,
            &config.payload_json,
        );
        let sent = Instant::now();
        if tally.record(
            publish_once(client, &url, body, config.batch_size).await,
            sent,
            measured_from,
        ) {
            break;
        }
    }
    tally
}

/// The JSON body of one publish, built as text: the id is plain ASCII and the payload is already
/// JSON, and this keeps the client's CPU (which shares the machine with the server) off the
/// measurement.
pub(crate) fn message_body(
    run_tag: &str,
    publisher: usize,
    sequence: u64,
    payload_json: &str,
) -> String {
    format!(r#"{{"id":"bench-{run_tag}-{publisher}-{sequence}","data":{payload_json}}}"#)
}

/// The JSON body of the `request`-th publish of a publisher: the single-message form for a batch
/// size of 1 (ids `bench-<run>-<publisher>-<request>`), else `{"messages":[...]}` whose message
/// `k` is numbered `request * batch_size + k`, so ids stay unique per message.
pub(crate) fn publish_body(
    run_tag: &str,
    publisher: usize,
    request: u64,
    batch_size: usize,
    payload_json: &str,
) -> String {
    if batch_size == 1 {
        return message_body(run_tag, publisher, request, payload_json);
    }
    let first = request * batch_size as u64;
    let mut body = String::with_capacity(16 + batch_size * (payload_json.len() + 64));
    body.push_str(r#"{"messages":["#);
    for sequence in first..first + batch_size as u64 {
        if sequence > first {
            body.push(',');
        }
        body.push_str(&message_body(run_tag, publisher, sequence, payload_json));
    }
    body.push_str("]}");
    body
}

/// Closed-loop `GET /health` from one client for `duration` (after `warmup`), at most
/// `requests_max` requests: what HTTP alone costs, to read the publish latency against.
pub(crate) async fn measure_round_trip(
    client: &reqwest::Client,
    url: &str,
    warmup: Duration,
    duration: Duration,
    requests_max: u64,
) -> PublishOutcome {
    let health = format!("{}/health", url.trim_end_matches('/'));
    let measured_from = Instant::now() + warmup;
    let deadline = measured_from + duration;
    let mut tally = PublisherTally::default();
    for _ in 0..requests_max {
        let sent = Instant::now();
        if sent >= deadline {
            break;
        }
        let outcome = match client.get(&health).send().await {
            Ok(response) if response.status().is_success() => response
                .bytes()
                .await
                .map(drop)
                .map_err(|_| "transport".to_owned()),
            Ok(response) => Err(format!("http_{}", response.status().as_u16())),
            Err(_) => Err("transport".to_owned()),
        };
        if tally.record(outcome, sent, measured_from) {
            break;
        }
    }
    let seconds = tally
        .last_ack
        .map(|last| last.saturating_duration_since(measured_from).as_secs_f64())
        .unwrap_or(0.0);
    let requests = tally.latencies_us.len() as u64;
    PublishOutcome {
        result: PhaseResult::from_samples(requests, seconds, tally.latencies_us),
        errors: tally.errors,
    }
}

/// One publish of `batch_size` messages; `Err` carries the error code to count.
pub(crate) async fn publish_once(
    client: &reqwest::Client,
    url: &str,
    body: String,
    batch_size: usize,
) -> Result<(), String> {
    let ack = post_json(client, url, body).await?;
    check_ack(&ack, batch_size)
}

/// POSTs a JSON body and returns the parsed 2xx answer, or the error code to count
/// (`timeout`, `transport`, `bad_ack` or the server's error code).
pub(crate) async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: String,
) -> Result<Value, String> {
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|error| {
            if error.is_timeout() {
                "timeout".to_owned()
            } else {
                "transport".to_owned()
            }
        })?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|_| "transport".to_owned())?;
    if !status.is_success() {
        return Err(error_code(status.as_u16(), &bytes));
    }
    serde_json::from_slice(&bytes).map_err(|_| "bad_ack".to_owned())
}

/// Checks the ack of a publish of `batch_size` messages: one ack per message (a batch is answered
/// `{"results":[...]}`), none of them a duplicate. Ids are unique per invocation, so a duplicate
/// would mean no new durable append was measured.
pub(crate) fn check_ack(ack: &Value, batch_size: usize) -> Result<(), String> {
    let acks: Vec<&Value> = if batch_size == 1 {
        vec![ack]
    } else {
        match ack.get("results").and_then(Value::as_array) {
            Some(results) if results.len() == batch_size => results.iter().collect(),
            _ => return Err("bad_ack".to_owned()),
        }
    };
    for ack in acks {
        match ack.get("duplicate").and_then(Value::as_bool) {
            Some(false) => {}
            Some(true) => return Err("unexpected_duplicate".to_owned()),
            None => return Err("bad_ack".to_owned()),
        }
    }
    Ok(())
}

/// The stable code of a Herald error body, or `http_<status>` when the body is not one.
pub(crate) fn error_code(status: u16, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("http_{status}"))
}
