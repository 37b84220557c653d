//! Publisher tasks of a verification run: SDK publishers (idempotent ids, retried until
//! acknowledged) and an HTTP publisher whose requests are deliberately cut and retried with
//! the same id, recording every attempt and acknowledgement.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_client::{Client, ClientError, ClientOptions, Publication};
use herald_faults::FaultProxy;
use herald_protocol::PublishAck;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::history::{Record, Recorder};

use super::run::*;

/// What publisher tasks share.
#[derive(Clone)]
pub(super) struct PublisherContext {
    pub(super) run_id: String,
    pub(super) channels: Vec<String>,
    pub(super) key: Option<String>,
    pub(super) recorder: Recorder,
    pub(super) progress: Arc<Progress>,
    /// A message in flight is given up after this.
    pub(super) give_up_at: Instant,
    pub(super) seed: u64,
}

pub(super) fn messages_url(base: &reqwest::Url, channel: &str) -> reqwest::Url {
    let mut url = base.clone();
    url.path_segments_mut()
        .expect("an http URL is a base")
        .clear()
        .extend(["v1", "channels", channel, "messages"]);
    url
}

/// Why an HTTP publish got no ack.
#[derive(Debug)]
pub(super) enum HttpFailure {
    /// The server answered with an error status.
    Refused { status: u16, body: String },
    /// No answer (connection, timeout) or an answer that is not an ack.
    Transport(String),
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpFailure::Refused { status, body } => write!(f, "{status}: {body}"),
            HttpFailure::Transport(error) => f.write_str(error),
        }
    }
}

/// One HTTP publish with an explicit id.
pub(super) async fn http_publish(
    http: &reqwest::Client,
    base: &reqwest::Url,
    key: Option<&str>,
    channel: &str,
    id: &str,
    data: serde_json::Value,
    timeout: Duration,
) -> Result<PublishAck, HttpFailure> {
    let transport = |error: reqwest::Error| HttpFailure::Transport(error.to_string());
    let mut request = http
        .post(messages_url(base, channel))
        .timeout(timeout)
        .json(&serde_json::json!({"id": id, "data": data}));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(transport)?;
    let status = response.status();
    let body = response.bytes().await.map_err(transport)?;
    if !status.is_success() {
        return Err(HttpFailure::Refused {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).chars().take(300).collect(),
        });
    }
    serde_json::from_slice(&body)
        .map_err(|error| HttpFailure::Transport(format!("unexpected answer: {error}")))
}

pub(super) fn ack_record(publisher: &str, channel: &str, ack: &PublishAck) -> Record {
    Record::Ack {
        publisher: publisher.to_owned(),
        channel: channel.to_owned(),
        id: ack.id.clone(),
        epoch: ack.epoch.clone(),
        serial: ack.serial,
        duplicate: ack.duplicate,
    }
}

/// An SDK publisher: publishes until `stop`, each message retried with its id until acked.
pub(super) async fn sdk_publisher(
    name: String,
    url: String,
    context: PublisherContext,
    stop: Stop,
) {
    let mut options = ClientOptions::new(url);
    options.key = context.key.clone();
    options.reconnect_delay_min = Duration::from_millis(20);
    options.reconnect_delay_max = Duration::from_secs(1);
    options.handshake_timeout = Duration::from_secs(5);
    let client = match Client::connect(options) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("herald verify: {name}: {error}");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(context.seed ^ fxhash(&name));
    let mut sequence = 0u64;
    while !stop.stopped() {
        let channel = &context.channels[rng.random_range(0..context.channels.len())];
        let id = format!("{}-{name}-{sequence}", context.run_id);
        let publication = match Publication::json(&serde_json::json!({"n": sequence})) {
            Ok(publication) => publication.id(id.clone()),
            Err(_) => return,
        };
        for attempt in 1..=ATTEMPTS_MAX {
            if Instant::now() >= context.give_up_at {
                break;
            }
            context.recorder.record(Record::Publish {
                publisher: name.clone(),
                surface: "ws".into(),
                channel: channel.clone(),
                id: id.clone(),
                attempt,
            });
            let outcome = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                client.publish(channel, publication.clone()),
            )
            .await;
            let fatal = matches!(
                &outcome,
                Ok(Err(ClientError::Rejected(_) | ClientError::InvalidInput(_)))
            );
            let error = match outcome {
                Ok(Ok(ack)) => {
                    context.progress.acked.fetch_add(1, Ordering::Relaxed);
                    context.recorder.record(Record::Ack {
                        publisher: name.clone(),
                        channel: channel.clone(),
                        id: ack.id,
                        epoch: ack.epoch,
                        serial: ack.serial,
                        duplicate: ack.duplicate,
                    });
                    break;
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no ack within {ATTEMPT_TIMEOUT:?}"),
            };
            context.recorder.record(Record::PublishFailed {
                publisher: name.clone(),
                channel: channel.clone(),
                id: id.clone(),
                error: error.clone(),
            });
            if fatal {
                eprintln!("herald verify: {name}: {error}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sequence += 1;
        tokio::time::sleep(PUBLISH_INTERVAL).await;
    }
    client.close().await;
}

/// The HTTP publisher: explicit ids; every third publish is forced to fail (its proxy delays
/// it past the request timeout, so it may or may not be stored) and retried with the same id,
/// and every acked publish is sent once more, which must come back at the same position.
pub(super) async fn http_publisher(
    proxy: Arc<FaultProxy>,
    base: reqwest::Url,
    context: PublisherContext,
    stop: Stop,
) {
    const NAME: &str = "http-pub";
    const FORCED_DELAY: Duration = Duration::from_millis(400);
    const FORCED_TIMEOUT: Duration = Duration::from_millis(150);
    let http = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a reqwest client builds");
    let key = context.key.as_deref();
    let mut sequence = 0u64;
    while !stop.stopped() {
        let channel = &context.channels[(sequence as usize) % context.channels.len()];
        let id = format!("{}-{NAME}-{sequence}", context.run_id);
        let data = serde_json::json!({"h": sequence});
        let publish = |attempt: u32| Record::Publish {
            publisher: NAME.into(),
            surface: "http".into(),
            channel: channel.clone(),
            id: id.clone(),
            attempt,
        };
        let failed = |error: String| Record::PublishFailed {
            publisher: NAME.into(),
            channel: channel.clone(),
            id: id.clone(),
            error,
        };
        let mut attempt = 1;
        let mut acked = false;
        if sequence.is_multiple_of(3) {
            proxy.delay(FORCED_DELAY);
            context.progress.faults.fetch_add(1, Ordering::Relaxed);
            context.recorder.record(Record::Fault {
                target: NAME.into(),
                fault: "delay".into(),
            });
            context.recorder.record(publish(attempt));
            let outcome = http_publish(
                &http,
                &base,
                key,
                channel,
                &id,
                data.clone(),
                FORCED_TIMEOUT,
            )
            .await;
            proxy.delay(Duration::ZERO);
            match outcome {
                Ok(ack) => {
                    context.recorder.record(ack_record(NAME, channel, &ack));
                    acked = true;
                }
                Err(error) => {
                    context.recorder.record(failed(format!("forced: {error}")));
                }
            }
            attempt += 1;
        }
        while !acked && attempt <= ATTEMPTS_MAX && Instant::now() < context.give_up_at {
            context.recorder.record(publish(attempt));
            match http_publish(
                &http,
                &base,
                key,
                channel,
                &id,
                data.clone(),
                ATTEMPT_TIMEOUT,
            )
            .await
            {
                Ok(ack) => {
                    context.progress.acked.fetch_add(1, Ordering::Relaxed);
                    context.recorder.record(ack_record(NAME, channel, &ack));
                    acked = true;
                }
                Err(error) => {
                    context.recorder.record(failed(error.to_string()));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            attempt += 1;
        }
        if acked {
            // The same id again: it must come back at the same position, `duplicate: true`.
            context.recorder.record(publish(attempt));
            match http_publish(&http, &base, key, channel, &id, data, ATTEMPT_TIMEOUT).await {
                Ok(ack) => {
                    context.recorder.record(ack_record(NAME, channel, &ack));
                }
                Err(error) => {
                    context.recorder.record(failed(error.to_string()));
                }
            }
        }
        sequence += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
