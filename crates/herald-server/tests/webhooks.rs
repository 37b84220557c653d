//! Webhooks end to end: a real server (tests/common) POSTs to a real HTTP receiver (hyper on
//! 127.0.0.1) that fails on purpose (error statuses, hangs, dropped connections, a closed
//! port), and every message still arrives, in order per channel,
//! signed, with its id as the Idempotency-Key; restarts lose nothing; a message the receiver
//! always refuses ends in `<channel>.dead`; lifecycle events are delivered too.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use common::{TestServer, WsClient};
use herald_server::config::Config;
use herald_server::webhook::{WebhookEvent, WebhookRule, verify_signature};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-0123456789";
/// Every wait for the receiver to see something is bounded by this.
const RECEIVE_WAIT: Duration = Duration::from_secs(20);

/// What the receiver does with an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ok,
    Status(u16),
    /// Sleeps past the rule's timeout, then answers 200 (too late to count).
    Hang,
    /// Closes the connection without an answer.
    Drop,
}

/// The service error that makes hyper close the connection without a response.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

/// Decides the answer from (message payload, attempt number as the receiver counts it).
type Policy = dyn Fn(&Value, u32) -> Answer + Send + Sync;

/// One POST as received.
#[derive(Clone, Debug)]
struct Received {
    key: String,
    event: String,
    delivery: u32,
    payload: Value,
    answer: Answer,
}

struct ReceiverState {
    policy: Box<Policy>,
    hang: Duration,
    /// Report a POST of serial n+1 before n got a 2xx (not for tests that dead-letter).
    strict_order: bool,
    attempts: Mutex<HashMap<String, u32>>,
    log: Mutex<Vec<Received>>,
    /// Problems seen at receive time (bad signature, out-of-order POST): the test fails on any.
    problems: Mutex<Vec<String>>,
    /// Per channel, the highest serial answered 2xx (to check nothing is POSTed early).
    delivered_through: Mutex<HashMap<String, u64>>,
}

struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// A receiver on a free port answering each message's first attempt with `first` and
    /// every later one with 200 (`first: None`: 200 always).
    async fn failing_first(first: Option<Answer>) -> Receiver {
        Receiver::start(
            "127.0.0.1:0".parse().unwrap(),
            Duration::from_millis(600),
            Box::new(move |_, attempt| match first {
                Some(answer) if attempt == 1 => answer,
                _ => Answer::Ok,
            }),
        )
        .await
    }

    async fn start(addr: SocketAddr, hang: Duration, policy: Box<Policy>) -> Receiver {
        Self::start_with(addr, hang, true, policy).await
    }

    async fn start_with(
        addr: SocketAddr,
        hang: Duration,
        strict_order: bool,
        policy: Box<Policy>,
    ) -> Receiver {
        let state = Arc::new(ReceiverState {
            policy,
            hang,
            strict_order,
            attempts: Mutex::default(),
            log: Mutex::default(),
            problems: Mutex::default(),
            delivered_through: Mutex::default(),
        });
        Self::serve(addr, state).await
    }

    async fn serve(addr: SocketAddr, state: Arc<ReceiverState>) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| receive(state.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn log(&self) -> Vec<Received> {
        self.state.log.lock().unwrap().clone()
    }

    fn successes(&self) -> Vec<Received> {
        self.log()
            .into_iter()
            .filter(|received| received.answer == Answer::Ok)
            .collect()
    }

    fn assert_no_problems(&self) {
        let problems = self.state.problems.lock().unwrap();
        assert!(problems.is_empty(), "receiver saw: {problems:#?}");
    }

    /// Waits until `done` holds for the log of successful receipts.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) {
        let deadline = Instant::now() + RECEIVE_WAIT;
        loop {
            if done(&self.successes()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "receiver: {what} not within {RECEIVE_WAIT:?}; got {} successes of {} attempts",
                self.successes().len(),
                self.log().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(
    state: Arc<ReceiverState>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Dropped> {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut problems = Vec::new();
    if let Err(error) = verify_signature(
        SECRET,
        &header("herald-signature"),
        &body,
        Duration::from_secs(60),
    ) {
        problems.push(format!("signature: {error}"));
    }
    if header("content-type") != "application/json" {
        problems.push(format!("content-type {:?}", header("content-type")));
    }
    let payload: Value = serde_json::from_slice(&body).expect("the body is JSON");
    let key = header("idempotency-key");
    let event = header("herald-event");
    let delivery: u32 = header("herald-delivery").parse().unwrap_or(0);
    if payload["event"] != json!(event) || payload["delivery"] != json!(delivery) {
        problems.push(format!("headers disagree with the payload: {payload}"));
    }
    if event == "message" {
        let message = &payload["message"];
        if message["id"] != json!(key) {
            problems.push(format!(
                "Idempotency-Key {key:?} is not the message id: {payload}"
            ));
        }
        let channel = message["channel"].as_str().unwrap_or_default().to_owned();
        let serial = message["serial"].as_u64().unwrap_or(0);
        let through = state
            .delivered_through
            .lock()
            .unwrap()
            .get(&channel)
            .copied()
            .unwrap_or(0);
        if state.strict_order && serial > through + 1 {
            problems.push(format!(
                "{channel} serial {serial} POSTed before serial {} was delivered",
                through + 1
            ));
        }
    } else if payload["id"] != json!(key) {
        problems.push(format!(
            "Idempotency-Key {key:?} is not the event id: {payload}"
        ));
    }
    let attempt = {
        let mut attempts = state.attempts.lock().unwrap();
        let count = attempts.entry(key.clone()).or_default();
        *count += 1;
        *count
    };
    let answer = (state.policy)(&payload, attempt);
    if answer == Answer::Ok && event == "message" {
        let message = &payload["message"];
        let channel = message["channel"].as_str().unwrap_or_default().to_owned();
        let serial = message["serial"].as_u64().unwrap_or(0);
        let mut through = state.delivered_through.lock().unwrap();
        let entry = through.entry(channel).or_default();
        *entry = (*entry).max(serial);
    }
    state.problems.lock().unwrap().extend(problems);
    state.log.lock().unwrap().push(Received {
        key,
        event,
        delivery,
        payload,
        answer,
    });
    let status = match answer {
        Answer::Ok => StatusCode::OK,
        Answer::Status(status) => StatusCode::from_u16(status).unwrap(),
        Answer::Hang => {
            tokio::time::sleep(state.hang).await;
            StatusCode::OK
        }
        Answer::Drop => return Err(Dropped),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

/// A rule with short timings so retries take milliseconds.
fn rule(name: &str, namespace: &str, url: &str) -> WebhookRule {
    let mut rule = WebhookRule::new(name, namespace, url, SECRET);
    rule.max_attempts = 10;
    rule.backoff_initial = Duration::from_millis(20);
    rule.backoff_max = Duration::from_millis(200);
    rule.timeout = Duration::from_millis(300);
    rule
}

fn with_rule(rule: WebhookRule) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| config.webhooks.push(rule)
}

/// Per channel, the serials of the first successful receipt of each message, in arrival
/// order.
fn first_receipts(successes: &[Received]) -> BTreeMap<String, Vec<u64>> {
    let mut seen = std::collections::HashSet::new();
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for received in successes {
        if received.event != "message" || !seen.insert(received.key.clone()) {
            continue;
        }
        let message = &received.payload["message"];
        order
            .entry(message["channel"].as_str().unwrap().to_owned())
            .or_default()
            .push(message["serial"].as_u64().unwrap());
    }
    order
}

fn ids(acks: &[Value]) -> Vec<String> {
    acks.iter()
        .map(|ack| ack["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The receiver is not listening at first (connection refused), then fails the first two
/// attempts of every message it sees (a 500, then a 429, a dropped connection or a hang past
/// the timeout): every message still arrives, each channel in serial order, every POST
/// signed.
#[tokio::test]
async fn a_failing_receiver_still_gets_every_message_in_order_and_signed() {
    // Reserve a port, then leave it closed while the first messages are published.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_addr = probe.local_addr().unwrap();
    drop(probe);
    let url = format!("http://{receiver_addr}/hook");
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), with_rule(rule("shop", "shop", &url))).await;
    let first = server.publish_numbers("shop:a", 0, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let receiver = Receiver::start(
        receiver_addr,
        Duration::from_millis(600),
        Box::new(|payload, attempt| {
            let n = payload["message"]["data"]["n"].as_u64().unwrap();
            match attempt {
                1 => Answer::Status(500),
                2 if n % 4 == 0 => Answer::Hang,
                2 if n % 4 == 1 => Answer::Drop,
                2 => Answer::Status(429),
                _ => Answer::Ok,
            }
        }),
    )
    .await;
    let mut expected = ids(&first);
    expected.extend(ids(&server.publish_numbers("shop:a", 3, 12).await));
    expected.extend(ids(&server.publish_numbers("shop:b", 0, 15).await));
    // Another namespace and the dead-letter channel are not the rule's.
    server.publish_numbers("other:a", 0, 2).await;
    receiver
        .wait_for("30 messages", |successes| {
            let keys: std::collections::HashSet<&str> =
                successes.iter().map(|r| r.key.as_str()).collect();
            expected.iter().all(|id| keys.contains(id.as_str()))
        })
        .await;
    receiver.assert_no_problems();
    let successes = receiver.successes();
    let order = first_receipts(&successes);
    assert_eq!(order.keys().collect::<Vec<_>>(), ["shop:a", "shop:b"]);
    for (channel, serials) in &order {
        assert_eq!(*serials, (1..=15).collect::<Vec<u64>>(), "{channel}");
    }
    let attempts = receiver.state.attempts.lock().unwrap().clone();
    for success in &successes {
        // The receiver refused the first two it saw; refused connections count too.
        assert!(attempts[&success.key] >= 3, "{success:?}");
        assert!(success.delivery >= attempts[&success.key], "{success:?}");
        assert_eq!(success.payload["rule"], "shop");
        assert_eq!(
            success.payload["channel"],
            success.payload["message"]["channel"]
        );
    }
    let log = receiver.log();
    assert!(log.iter().any(|r| r.answer == Answer::Hang));
    assert!(log.iter().any(|r| r.answer == Answer::Drop));
    server.stop().await;
    receiver.task.abort();
}

/// The server stops mid-stream and starts again on the same data directory: every message
/// is delivered, each channel's first receipts in serial order.
#[tokio::test]
async fn webhook_deliveries_survive_a_restart() {
    let receiver = Receiver::failing_first(Some(Answer::Status(503))).await;
    let dir = tempfile::tempdir().unwrap();
    let hook = rule("restart", "jobs", &receiver.url());
    let server = TestServer::start(dir.path(), with_rule(hook.clone())).await;
    let mut expected = ids(&server.publish_numbers("jobs:r", 0, 40).await);
    receiver
        .wait_for("a few deliveries", |successes| successes.len() >= 5)
        .await;
    server.stop().await;
    let before_restart = receiver.successes().len();
    assert!(before_restart < 40, "the stop was not mid-stream");
    let server = TestServer::start(dir.path(), with_rule(hook)).await;
    expected.extend(ids(&server.publish_numbers("jobs:r", 40, 10).await));
    receiver
        .wait_for("50 messages", |successes| {
            let keys: std::collections::HashSet<&str> =
                successes.iter().map(|r| r.key.as_str()).collect();
            expected.iter().all(|id| keys.contains(id.as_str()))
        })
        .await;
    receiver.assert_no_problems();
    let successes = receiver.successes();
    let order = first_receipts(&successes);
    assert_eq!(order["jobs:r"], (1..=50).collect::<Vec<u64>>());
    // Acks are persisted before the stop completes: only an attempt cut short by the stop
    // (at most one: one in flight per channel) may be delivered again.
    let duplicates = successes.len() - 50;
    assert!(duplicates <= 1, "{duplicates} messages delivered twice");
    server.stop().await;
    receiver.task.abort();
}

/// A message the receiver always refuses goes to `<channel>.dead` after `max_attempts`, with
/// the reason; the messages after it are delivered.
#[tokio::test]
async fn a_message_refused_every_time_goes_to_the_dead_letters_and_the_rest_follow() {
    let receiver = Receiver::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_millis(600),
        false,
        Box::new(|payload, _| {
            if payload["message"]["data"]["poison"] == json!(true) {
                Answer::Status(422)
            } else {
                Answer::Ok
            }
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut hook = rule("dl", "jobs", &receiver.url());
    hook.max_attempts = 3;
    let server = TestServer::start(dir.path(), with_rule(hook)).await;
    let acks = server
        .publish(
            "jobs:d",
            json!({"messages": [
                {"data": {"n": 1}},
                {"data": {"n": 2, "poison": true}},
                {"data": {"n": 3}},
            ]}),
        )
        .await;
    let acks = acks["results"].as_array().unwrap().clone();
    let poison_id = acks[1]["id"].as_str().unwrap().to_owned();
    receiver
        .wait_for("the messages around the poison one", |successes| {
            successes.len() >= 2
        })
        .await;
    receiver.assert_no_problems();
    let order = first_receipts(&receiver.successes());
    assert_eq!(order["jobs:d"], vec![1, 3]);
    let poison_attempts: Vec<u32> = receiver
        .log()
        .iter()
        .filter(|r| r.key == poison_id)
        .map(|r| r.delivery)
        .collect();
    assert_eq!(poison_attempts, vec![1, 2, 3]);
    let dead: Value = server
        .http
        .get(server.url("/v1/channels/jobs:d.dead/messages"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let letters = dead["messages"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dead}");
    let headers = &letters[0]["headers"];
    assert_eq!(letters[0]["data"], json!({"n": 2, "poison": true}));
    assert_eq!(headers["herald-dead-letter-reason"], "max_deliveries");
    assert_eq!(headers["herald-original-id"], json!(poison_id));
    assert_eq!(headers["herald-subscriber-id"], "webhook.dl");
    assert_eq!(headers["herald-deliveries"], "3");
    // The dead-letter channel is not webhooked itself.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        receiver
            .log()
            .iter()
            .all(|r| r.payload["message"]["channel"] == "jobs:d"),
        "only jobs:d is delivered"
    );
    server.stop().await;
    receiver.task.abort();
}

/// A durable WebSocket subscriber idle past its expiry is removed; the rule that wants
/// `subscriber.expired` gets the event, signed, with the event id as the Idempotency-Key.
#[tokio::test]
async fn a_rule_with_lifecycle_events_gets_subscriber_expired() {
    let receiver = Receiver::failing_first(Some(Answer::Status(500))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut hook = rule("life", "chat", &receiver.url());
    hook.events = vec![WebhookEvent::SubscriberExpired];
    let server = TestServer::start(dir.path(), move |config| {
        config.durable.sweep_interval = Duration::from_millis(50);
        config.webhooks.push(hook);
    })
    .await;
    server.publish_numbers("chat:room", 0, 1).await;
    let mut phone = WsClient::connect(&server.ws_url()).await;
    phone
        .subscribe(json!({
            "channel": "chat:room",
            "guarantee": "at-least-once",
            "subscriber_id": "phone",
            "options": {"expires_after_ms": 200},
        }))
        .await;
    drop(phone);
    receiver
        .wait_for("subscriber.expired", |successes| {
            successes.iter().any(|r| r.event == "subscriber.expired")
        })
        .await;
    receiver.assert_no_problems();
    let successes = receiver.successes();
    // The rule wants only lifecycle events: no message was POSTed.
    assert!(successes.iter().all(|r| r.event == "subscriber.expired"));
    let event = &successes[0].payload;
    assert_eq!(event["channel"], "chat:room");
    assert_eq!(event["subscriber"], "phone");
    assert_eq!(event["rule"], "life");
    assert_eq!(successes[0].delivery, 2);
    server.stop().await;
    receiver.task.abort();
}

/// A durable WebSocket subscriber comes back after retention dropped messages it had not
/// acked: the rule that wants `subscriber.continuity_lost` gets the event with the lost range.
#[tokio::test]
async fn a_rule_with_lifecycle_events_gets_subscriber_continuity_lost() {
    let receiver = Receiver::failing_first(None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut hook = rule("gaps", "chat", &receiver.url());
    hook.events = vec![WebhookEvent::ContinuityLost];
    let server = TestServer::start(dir.path(), move |config| {
        config.namespaces.insert(
            "chat".into(),
            herald_server::config::NamespaceConfig {
                retention_messages_max: Some(2),
                ..Default::default()
            },
        );
        config.webhooks.push(hook);
    })
    .await;
    server.publish_numbers("chat:lost", 0, 1).await;
    let durable = json!({
        "channel": "chat:lost",
        "guarantee": "at-least-once",
        "subscriber_id": "tablet",
    });
    let mut tablet = WsClient::connect(&server.ws_url()).await;
    tablet.subscribe(durable.clone()).await;
    drop(tablet);
    // Serials 2..=6; retention keeps 5 and 6, so 2..=4 are lost for the tablet.
    server.publish_numbers("chat:lost", 1, 5).await;
    let mut tablet = WsClient::connect(&server.ws_url()).await;
    let reply = tablet.subscribe(durable).await;
    assert_eq!(reply["continuity"], "lost", "{reply}");
    receiver
        .wait_for("subscriber.continuity_lost", |successes| {
            !successes.is_empty()
        })
        .await;
    receiver.assert_no_problems();
    let successes = receiver.successes();
    assert_eq!(successes.len(), 1, "{successes:?}");
    let event = &successes[0].payload;
    assert_eq!(successes[0].event, "subscriber.continuity_lost");
    assert_eq!(event["channel"], "chat:lost");
    assert_eq!(event["subscriber"], "tablet");
    assert_eq!(event["reason"], "retention");
    let serial = |field: &str| {
        event[field]
            .as_str()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!((serial("from"), serial("to")), (2, 4), "{event}");
    drop(tablet);
    server.stop().await;
    receiver.task.abort();
}

/// A rule added to the config of a server that already has messages delivers the retained
/// messages of the namespace's existing channels after the restart, though no new message
/// arrives on them (the start-up scan of the store's channels).
#[tokio::test]
async fn a_rule_added_later_delivers_the_retained_messages_of_existing_channels() {
    let receiver = Receiver::failing_first(None).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let expected = ids(&server.publish_numbers("feed:old", 0, 5).await);
    server.stop().await;
    let server =
        TestServer::start(dir.path(), with_rule(rule("late", "feed", &receiver.url()))).await;
    receiver
        .wait_for("the 5 retained messages", |successes| successes.len() >= 5)
        .await;
    receiver.assert_no_problems();
    let successes = receiver.successes();
    assert_eq!(
        successes.iter().map(|r| r.key.clone()).collect::<Vec<_>>(),
        expected
    );
    server.stop().await;
    receiver.task.abort();
}

/// Not a correctness test: how fast a rule delivers to a receiver that always answers 200,
/// on one channel (strictly one POST at a time) and on ten. Run with
/// `cargo test -p herald-server --release --test webhooks -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints deliveries per second"]
async fn webhook_delivery_rate() {
    let receiver = Receiver::failing_first(None).await;
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start(dir.path(), with_rule(rule("rate", "rate", &receiver.url()))).await;
    for channels in [1u64, 10] {
        let per_channel = 1000 / channels;
        let before = receiver.successes().len();
        let started = Instant::now();
        for channel in 0..channels {
            server
                .publish_numbers(&format!("rate:c{channels}-{channel}"), 0, per_channel)
                .await;
        }
        let total = (channels * per_channel) as usize;
        receiver
            .wait_for("every message", |successes| {
                successes.len() >= before + total
            })
            .await;
        let elapsed = started.elapsed();
        println!(
            "{channels} channel(s): {total} webhook deliveries in {elapsed:?} = {:.0}/s",
            total as f64 / elapsed.as_secs_f64()
        );
    }
    receiver.assert_no_problems();
    server.stop().await;
    receiver.task.abort();
}
