//! kill -9 under concurrent publish load, then restart: no acknowledged message is lost, none is
//! duplicated, and every channel's chain verifies.
//!
//! The test drives the real `herald` binary (`herald serve --dev` on a temporary data dir, bound
//! to 127.0.0.1 port 0) with concurrent closed-loop publishers over reqwest, SIGKILLs it at a
//! random moment while publishes are in flight, restarts it on the same data dir and reads every
//! channel back through the sync API. Three kill/restart cycles run against the same data dir,
//! so later cycles also recover a log that was itself recovered.
//!
//! # What is checked after each restart
//!
//! - every acknowledged id is present at exactly its acknowledged position, with its data;
//! - no id appears twice, and every stored id is one the test published (nothing invented);
//! - serials are contiguous from 1, `prev = serial - 1`, the epoch never changes, `top` is the
//!   last message, and the BLAKE3 chain recomputed from genesis matches every message's `chain`;
//! - each publish whose outcome is unknown (cut by the kill) is retried with the same id and
//!   content: it comes back `duplicate: true` at the position where the read found it, or it is
//!   stored now if the read had not found it; a second read still has every id once.
//!
//! The kill delay comes from a seed printed at the start; `HERALD_KILL9_SEED=<n>` replays it.
//! Every loop is bounded in count and time, and the server process is killed when the test
//! ends, however it ends.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{SpawnedServer, next_random, seed};
use herald_core::{ChainHash, Data, Epoch, MessageId, Serial};
use serde_json::value::RawValue;
use serde_json::{Value, json};

const CYCLES: u64 = 3;
const PUBLISHERS: u64 = 16;
const CHANNELS: [&str; 4] = ["kill9:alpha", "kill9:beta", "kill9:gamma", "kill9:delta"];
/// Upper bound on what one publisher sends in one cycle, whatever the kill delay.
const MESSAGES_PER_PUBLISHER_MAX: u64 = 5_000;
/// The kill lands this long after the first ack of a cycle, at random within the range.
const KILL_DELAY_MS_MIN: u64 = 100;
const KILL_DELAY_MS_MAX: u64 = 900;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const PAGE_LIMIT: u64 = 1000;
const PAGES_MAX: u64 = 1000;

/// Everything the test published, by id (ids are unique across the whole test).
#[derive(Debug)]
struct Published {
    channel: String,
    data: Value,
    /// The acknowledged position (`EPOCH:SERIAL`), once an ack arrived.
    position: Option<String>,
}

type Ledger = BTreeMap<String, Published>;

/// What a publisher learned in one cycle.
#[derive(Default)]
struct CycleOutcome {
    acks: Vec<(String, String)>,
    /// Ids whose request failed or was cut: stored or not, nobody knows yet.
    unknown: Vec<String>,
    /// When the first failure happened; before the kill it would be a bug, not a crash effect.
    first_failure: Option<Instant>,
}

fn message_data(cycle: u64, publisher: u64, sequence: u64) -> Value {
    // Keys in alphabetical order, so the compact serialisation is the same whether or not
    // serde_json preserves insertion order.
    json!({
        "cycle": cycle,
        "pad": "x".repeat(32 + (sequence % 5) as usize * 24),
        "publisher": publisher,
        "sequence": sequence,
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .build()
        .expect("build reqwest client")
}

fn messages_url(base_url: &str, channel: &str) -> String {
    format!("{base_url}/v1/channels/{channel}/messages")
}

/// Checks an ack against the request and returns its position.
fn parse_ack(ack: &Value, id: &str) -> (String, bool) {
    assert_eq!(ack["id"].as_str(), Some(id), "ack for another id: {ack}");
    let epoch = ack["epoch"].as_str().expect("ack epoch");
    let serial = ack["serial"].as_u64().expect("ack serial");
    let position = ack["position"].as_str().expect("ack position").to_owned();
    assert_eq!(position, format!("{epoch}:{serial}"), "ack: {ack}");
    let duplicate = ack["duplicate"].as_bool().expect("ack duplicate");
    (position, duplicate)
}

async fn publish(
    client: &reqwest::Client,
    base_url: &str,
    channel: &str,
    id: &str,
    data: &Value,
) -> Result<Value, String> {
    let response = client
        .post(messages_url(base_url, channel))
        .json(&json!({ "id": id, "data": data }))
        .send()
        .await
        .map_err(|error| format!("transport: {error}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|error| format!("transport (body): {error}"))?;
    let value: Value = serde_json::from_slice(&body).map_err(|error| {
        format!(
            "status {status}, unparsable body {:?}: {error}",
            String::from_utf8_lossy(&body)
        )
    })?;
    if status.is_success() {
        Ok(value)
    } else {
        // A response is a definite answer; under this load any error answer is a bug.
        panic!("publish of {id} to {channel} answered {status}: {value}");
    }
}

async fn run_publisher(
    client: reqwest::Client,
    base_url: String,
    cycle: u64,
    publisher: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    sent: Arc<Mutex<Vec<(String, String, Value)>>>,
) -> CycleOutcome {
    let mut outcome = CycleOutcome::default();
    for sequence in 0..MESSAGES_PER_PUBLISHER_MAX {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let id = format!("k{cycle}-p{publisher}-n{sequence}");
        let channel = CHANNELS[((publisher + sequence) % CHANNELS.len() as u64) as usize];
        let data = message_data(cycle, publisher, sequence);
        sent.lock()
            .expect("sent lock")
            .push((id.clone(), channel.to_owned(), data.clone()));
        match publish(&client, &base_url, channel, &id, &data).await {
            Ok(ack) => {
                let (position, duplicate) = parse_ack(&ack, &id);
                assert!(!duplicate, "fresh id {id} acked as a duplicate: {ack}");
                outcome.acks.push((id, position));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // The server is gone: this request's outcome is unknown, and the publisher stops.
                outcome.unknown.push(id);
                outcome.first_failure = Some(Instant::now());
                break;
            }
        }
    }
    outcome
}

/// One channel's messages as read back: id -> position.
type Stored = BTreeMap<String, String>;

/// Reads every channel from the oldest message and checks the stream invariants and the ledger.
async fn verify(
    client: &reqwest::Client,
    base_url: &str,
    ledger: &Ledger,
    epochs: &mut BTreeMap<String, String>,
) -> Stored {
    let mut stored = Stored::new();
    for channel in CHANNELS {
        let mut chain: Option<ChainHash> = None;
        let mut last_serial = 0u64;
        let mut last_position: Option<String> = None;
        let mut after: Option<String> = None;
        let mut pages = 0u64;
        loop {
            pages += 1;
            assert!(pages <= PAGES_MAX, "{channel}: more than {PAGES_MAX} pages");
            let mut url = format!("{}?limit={PAGE_LIMIT}", messages_url(base_url, channel));
            if let Some(after) = &after {
                url.push_str(&format!("&after={after}"));
            }
            let response = client.get(&url).send().await.expect("sync read");
            let status = response.status();
            let body = response.text().await.expect("sync page body");
            assert!(status.is_success(), "GET {url}: {status} {body}");
            let page: Value = serde_json::from_str(&body).expect("sync page json");
            let messages = ReadMessage::parse_page(&body);
            for message in &messages {
                let id = message.id.clone();
                let serial = message.serial;
                let epoch_text = message.epoch.clone();
                let position = format!("{epoch_text}:{serial}");
                if let Some(text) = &message.position {
                    assert_eq!(*text, position, "{channel} {id}: position field");
                }
                assert_eq!(
                    serial,
                    last_serial + 1,
                    "{channel}: serials not contiguous at {id}"
                );
                assert_eq!(
                    prev_serial(&message.prev),
                    serial - 1,
                    "{channel} {id}: prev"
                );

                let known_epoch = epochs
                    .entry(channel.to_owned())
                    .or_insert_with(|| epoch_text.clone());
                assert_eq!(*known_epoch, epoch_text, "{channel}: the epoch changed");
                let epoch = Epoch::parse(&epoch_text).expect("valid epoch");
                let previous = chain.unwrap_or_else(|| ChainHash::genesis(&epoch));
                // The chain covers the data bytes exactly as stored, which the read returns
                // verbatim: hash the raw text, not a re-serialisation.
                let data = Data::Json(Bytes::copy_from_slice(message.data.get().as_bytes()));
                let expected = previous.next(
                    Serial(serial),
                    &MessageId::parse(&id).expect("valid id"),
                    &data,
                );
                let claimed = ChainHash::from_hex(&message.chain).expect("chain is 64 hex chars");
                assert_eq!(
                    claimed, expected,
                    "{channel}: chain breaks at serial {serial}"
                );
                chain = Some(expected);

                let published = ledger
                    .get(&id)
                    .unwrap_or_else(|| panic!("{channel}: stored id {id} was never published"));
                assert_eq!(
                    published.channel, channel,
                    "{id} stored on the wrong channel"
                );
                let data_value: Value = serde_json::from_str(message.data.get()).expect("data");
                assert_eq!(data_value, published.data, "{id}: data differs");
                if let Some(acked) = &published.position {
                    assert_eq!(
                        *acked, position,
                        "{id}: stored at another position than acked"
                    );
                }
                let earlier = stored.insert(id.clone(), position.clone());
                assert!(
                    earlier.is_none(),
                    "{id} stored twice: {earlier:?} and {position}"
                );
                last_serial = serial;
                last_position = Some(position);
            }
            if page["more"].as_bool() != Some(true) {
                let top = page["top"].as_str().map(str::to_owned);
                assert_eq!(top, last_position, "{channel}: top is not the last message");
                break;
            }
            let next = page["next"]
                .as_str()
                .expect("next cursor when more")
                .to_owned();
            assert!(!messages.is_empty(), "{channel}: empty page with more=true");
            assert_ne!(
                Some(&next),
                after.as_ref(),
                "{channel}: cursor did not advance"
            );
            after = Some(next);
        }
    }
    for (id, published) in ledger {
        if let Some(position) = &published.position {
            assert_eq!(
                stored.get(id),
                Some(position),
                "acknowledged {id} on {} is lost",
                published.channel
            );
        }
    }
    stored
}

/// One message of a sync page, with `data` kept as the exact text the server sent.
struct ReadMessage {
    id: String,
    serial: u64,
    epoch: String,
    position: Option<String>,
    prev: Value,
    chain: String,
    data: Box<RawValue>,
}

impl ReadMessage {
    fn parse_page(body: &str) -> Vec<ReadMessage> {
        type RawObject = BTreeMap<String, Box<RawValue>>;
        let page: RawObject = serde_json::from_str(body).expect("page is an object");
        let messages: Vec<RawObject> =
            serde_json::from_str(page["messages"].get()).expect("messages array");
        messages
            .into_iter()
            .map(|mut fields| {
                let field = |name: &str| -> Value {
                    fields
                        .get(name)
                        .map(|raw| serde_json::from_str(raw.get()).expect("field json"))
                        .unwrap_or(Value::Null)
                };
                let text = |value: Value, name: &str| -> String {
                    value
                        .as_str()
                        .unwrap_or_else(|| panic!("message {name} is not a string"))
                        .to_owned()
                };
                ReadMessage {
                    id: text(field("id"), "id"),
                    serial: field("serial").as_u64().expect("message serial"),
                    epoch: text(field("epoch"), "epoch"),
                    position: field("position").as_str().map(str::to_owned),
                    prev: field("prev"),
                    chain: text(field("chain"), "chain"),
                    data: fields.remove("data").expect("message data"),
                }
            })
            .collect()
    }
}

/// `prev` as a serial, whether the server sends it as a number, a position string or null.
fn prev_serial(prev: &Value) -> u64 {
    match prev {
        Value::Null => 0,
        Value::Number(number) => number.as_u64().expect("prev is a u64"),
        Value::String(text) => text
            .rsplit(':')
            .next()
            .and_then(|serial| serial.parse().ok())
            .unwrap_or_else(|| panic!("prev {text:?} is not a position")),
        other => panic!("prev has an unexpected form: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_publish_load_loses_and_duplicates_nothing() {
    let test_started = Instant::now();
    let seed = seed("HERALD_KILL9_SEED");
    eprintln!("kill9 seed {seed} (replay with HERALD_KILL9_SEED={seed})");
    let mut random = seed;

    let temp = tempfile::tempdir().expect("tempdir");
    let data_dir = temp.path().join("data");
    let mut ledger = Ledger::new();
    let mut epochs = BTreeMap::new();
    let mut acked_total = 0usize;
    let mut unknown_total = 0usize;
    let mut unknown_stored = 0usize;
    let client = client();

    let mut server = SpawnedServer::start(&data_dir, &temp.path().join("server-0.log"));
    for cycle in 0..CYCLES {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let mut publishers = tokio::task::JoinSet::new();
        for publisher in 0..PUBLISHERS {
            publishers.spawn(run_publisher(
                client.clone(),
                server.base_url.clone(),
                cycle,
                publisher,
                Arc::clone(&stop),
                Arc::clone(&acked),
                Arc::clone(&sent),
            ));
        }

        // Let the load flow, then kill at a random moment with requests in flight.
        let flowing_deadline = Instant::now() + Duration::from_secs(10);
        while acked.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < flowing_deadline,
                "no publish was acked in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let delay_ms =
            KILL_DELAY_MS_MIN + next_random(&mut random) % (KILL_DELAY_MS_MAX - KILL_DELAY_MS_MIN);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let killed_at = Instant::now();
        server.kill9();
        stop.store(true, Ordering::Relaxed);

        let mut cycle_acks = 0usize;
        let mut cycle_unknown = Vec::new();
        let joined = tokio::time::timeout(Duration::from_secs(30), async {
            let mut outcomes = Vec::new();
            while let Some(outcome) = publishers.join_next().await {
                outcomes.push(outcome.expect("publisher panicked"));
            }
            outcomes
        })
        .await
        .expect("publishers did not stop after the kill");
        for (id, channel, data) in sent.lock().expect("sent lock").drain(..) {
            let published = Published {
                channel,
                data,
                position: None,
            };
            assert!(ledger.insert(id, published).is_none(), "an id was reused");
        }
        for outcome in joined {
            if let Some(failed_at) = outcome.first_failure {
                assert!(failed_at >= killed_at, "a publish failed before the kill");
            }
            for (id, position) in outcome.acks {
                ledger.get_mut(&id).expect("acked id was sent").position = Some(position);
                cycle_acks += 1;
            }
            cycle_unknown.extend(outcome.unknown);
        }

        server = SpawnedServer::start(
            &data_dir,
            &temp.path().join(format!("server-{}.log", cycle + 1)),
        );
        let stored = verify(&client, &server.base_url, &ledger, &mut epochs).await;

        // Retry every unknown outcome with the same id and content.
        for id in &cycle_unknown {
            let published = &ledger[id];
            let ack = publish(
                &client,
                &server.base_url,
                &published.channel,
                id,
                &published.data,
            )
            .await
            .unwrap_or_else(|error| panic!("retry of {id} failed: {error}"));
            let (position, duplicate) = parse_ack(&ack, id);
            match stored.get(id) {
                Some(found) => {
                    assert!(
                        duplicate,
                        "{id} was stored at {found} but the retry stored it again"
                    );
                    assert_eq!(*found, position, "{id}: duplicate ack at another position");
                    unknown_stored += 1;
                }
                None => assert!(
                    !duplicate,
                    "{id} was not readable but the retry says duplicate"
                ),
            }
            ledger.get_mut(id).expect("retried id").position = Some(position);
        }
        let stored = verify(&client, &server.base_url, &ledger, &mut epochs).await;
        let acked_so_far = ledger.values().filter(|p| p.position.is_some()).count();
        assert_eq!(
            stored.len(),
            acked_so_far,
            "stored ids beyond the acknowledged ones"
        );

        eprintln!(
            "cycle {cycle}: killed after {delay_ms} ms; {cycle_acks} acked, {} unknown \
             outcome(s) retried; {} messages verified in total",
            cycle_unknown.len(),
            stored.len()
        );
        assert!(
            cycle_acks > 0,
            "cycle {cycle} acknowledged nothing before the kill"
        );
        acked_total += cycle_acks;
        unknown_total += cycle_unknown.len();
    }
    drop(server);
    eprintln!(
        "kill9: {CYCLES} kill/restart cycles, {acked_total} acked publishes verified, \
         {unknown_total} unknown outcomes retried ({unknown_stored} had been stored), {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
}
