//! kill -9 while an at-least-once subscriber is mid-stream (issue #5): after each restart the
//! subscriber resumes under the same `subscriber_id`, and over the whole run every published
//! message is delivered at least once, a message is delivered again only if no confirmed ack
//! covered it, order is kept, and delivery counts only grow.
//!
//! The test drives the real `herald` binary (`herald serve --dev`, temporary data dir, a fresh
//! loopback port per start). One publisher sends [`MESSAGES`] messages over HTTP in batches
//! with fixed ids at a steady pace; one raw WebSocket client subscribes at-least-once and acks
//! cumulatively every [`ACK_EVERY`] deliveries (and whenever the stream pauses), each ack with
//! a `req` so the server's `acked` reply marks it durable. The server is SIGKILLed [`KILLS`]
//! times, each when the subscriber's progress passes a random threshold (plus a random few
//! milliseconds), then restarted on the same data dir. A publish cut by a kill is retried with
//! the same ids after the restart (deduplicated if it had been stored). After the last message
//! is acked and confirmed, the server is killed once more and restarted: the subscriber's
//! position must have survived, with nothing left to deliver.
//!
//! # What is checked, from the recorded events
//!
//! - every published message (by its acknowledged serial) was delivered at least once, and
//!   each delivery carries the id published at that serial;
//! - no delivery of a serial at or below the highest *confirmed* cumulative ack made before it
//!   (a duplicate is only ever of an unacked message);
//! - within each connection, deliveries are consecutive serials (no ack_wait redelivery can
//!   happen: it is set far beyond the run), starting just above the confirmed ack position and
//!   at most one above the last ack sent; so the first deliveries of all serials, over the
//!   whole run, come in ascending order without holes;
//! - each serial's delivery counts strictly increase across deliveries, and never exceed the
//!   number of connections so far (one attempt per connection; a kill may eat one).
//!
//! The seed of the kill points is printed; `HERALD_ALO_KILL9_SEED=<n>` replays it. Every loop
//! is bounded in count and time, and the server is killed when the test ends, however it ends.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{SpawnedServer, next_random, seed};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHANNEL: &str = "alo:kill9";
const SUBSCRIBER_ID: &str = "kill9-worker";
/// Messages published over the whole run.
const MESSAGES: u64 = 2_000;
/// Messages per publish request (each with its own id).
const BATCH: u64 = 10;
/// Pause between publish requests: about 1,000 messages/s, so the stream lasts a few seconds
/// and the kills land while messages are still coming.
const PUBLISH_PAUSE: Duration = Duration::from_millis(10);
/// The subscriber acks cumulatively after this many deliveries...
const ACK_EVERY: u64 = 16;
/// ...or when nothing arrived for this long and something is unacked.
const ACK_IDLE: Duration = Duration::from_millis(20);
/// Server kills while the subscriber is mid-stream (a last one follows the final ack).
const KILLS: usize = 3;
/// Each kill lands once the subscriber has received this many distinct serials, drawn at
/// random within its own slice of `KILL_PROGRESS_MIN..KILL_PROGRESS_MAX`...
const KILL_PROGRESS_MIN: u64 = 100;
const KILL_PROGRESS_MAX: u64 = MESSAGES - 200;
/// ...plus up to this many milliseconds.
const KILL_JITTER_MS_MAX: u64 = 25;
/// Subscriber options: a window larger than the ack cadence, no redelivery by timeout within
/// the run, and no dead letters however often a kill repeats a delivery.
const INFLIGHT_MAX: u64 = 64;
const ACK_WAIT_MS: u64 = 600_000;
const MAX_DELIVERIES: u64 = 1_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const FRAME_TIMEOUT: Duration = Duration::from_secs(15);
/// One cycle (start, stream, kill) may not take longer than this.
const CYCLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The final cycle: everything published, delivered and acked.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// After the last restart: how long the resumed subscriber must stay silent.
const QUIET: Duration = Duration::from_millis(500);
/// Frames one connection may read (a bound on the read loop).
const FRAMES_PER_CONNECTION_MAX: u64 = 100_000;

/// What the subscriber saw and did, in the order it happened on its connection.
#[derive(Clone, Debug)]
enum Event {
    Delivery { serial: u64, count: u64, id: String },
    AckSent { req: u64, through: u64 },
    AckConfirmed { req: u64 },
}

/// One connection's `subscribed.after` serial and its events.
#[derive(Debug, Default)]
struct Connection {
    after: u64,
    events: Vec<Event>,
}

/// Shared by the publisher, the subscriber and the controller.
struct Run {
    epoch: Mutex<Option<String>>,
    /// Published message index -> acknowledged serial.
    published: Mutex<BTreeMap<u64, u64>>,
    /// The next batch to publish (its first message index).
    next_index: AtomicU64,
    /// Distinct serials the subscriber has received (the kill trigger).
    progress: AtomicU64,
    connections: Mutex<Vec<Connection>>,
}

impl Run {
    fn record(&self, event: Event) {
        let mut connections = self.connections.lock().expect("connections lock");
        connections
            .last_mut()
            .expect("a connection is open")
            .events
            .push(event);
    }

    fn publishing_done(&self) -> bool {
        self.next_index.load(Ordering::Relaxed) >= MESSAGES
    }

    fn top_serial(&self) -> u64 {
        let published = self.published.lock().expect("published lock");
        published.values().copied().max().unwrap_or(0)
    }
}

fn serial_of(position: &str) -> u64 {
    position
        .rsplit_once(':')
        .and_then(|(_, serial)| serial.parse().ok())
        .unwrap_or_else(|| panic!("not a position: {position:?}"))
}

/// Publishes batches from `run.next_index` until all are acknowledged, `stop` is set, or a
/// request fails (the server is gone: the batch is retried with the same ids next cycle).
async fn publish(client: reqwest::Client, base_url: String, run: Arc<Run>, stop: Arc<AtomicBool>) {
    let url = format!("{base_url}/v1/channels/{CHANNEL}/messages");
    while !stop.load(Ordering::Relaxed) {
        let first = run.next_index.load(Ordering::Relaxed);
        if first >= MESSAGES {
            return;
        }
        let indexes: Vec<u64> = (first..(first + BATCH).min(MESSAGES)).collect();
        let messages: Vec<Value> = indexes
            .iter()
            .map(|index| json!({"id": format!("m{index}"), "data": {"index": index}}))
            .collect();
        let response = match client
            .post(&url)
            .json(&json!({ "messages": messages }))
            .send()
            .await
        {
            Ok(response) => response,
            Err(_) => return,
        };
        let status = response.status();
        let Ok(body) = response.text().await else {
            return;
        };
        assert!(status.is_success(), "publish answered {status}: {body}");
        let ack: Value = serde_json::from_str(&body).expect("publish ack JSON");
        let results = ack["results"].as_array().expect("results");
        assert_eq!(results.len(), indexes.len(), "{ack}");
        {
            let mut published = run.published.lock().expect("published lock");
            let mut epoch = run.epoch.lock().expect("epoch lock");
            for (index, result) in indexes.iter().zip(results) {
                assert_eq!(result["id"], format!("m{index}"), "{ack}");
                let serial = result["serial"].as_u64().expect("serial");
                let result_epoch = result["epoch"].as_str().expect("epoch").to_owned();
                match epoch.as_ref() {
                    Some(known) => assert_eq!(*known, result_epoch, "the epoch changed"),
                    None => *epoch = Some(result_epoch),
                }
                if let Some(before) = published.insert(*index, serial) {
                    assert_eq!(before, serial, "m{index} acked at two serials");
                }
            }
        }
        run.next_index.store(first + BATCH, Ordering::Relaxed);
        tokio::time::sleep(PUBLISH_PAUSE).await;
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame as JSON, skipping heartbeats; `None` when the connection ended.
async fn next_frame(socket: &mut Socket, wait: Duration) -> Result<Option<Value>, ()> {
    loop {
        let next = match tokio::time::timeout(wait, socket.next()).await {
            Ok(next) => next,
            Err(_) => return Err(()),
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                if frame["type"] != "heartbeat" {
                    return Ok(Some(frame));
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ok(None),
            Some(Ok(_)) => {}
        }
    }
}

/// Connects and subscribes at-least-once as [`SUBSCRIBER_ID`]; records a new connection.
async fn subscribe(ws_url: &str, run: &Run) -> Socket {
    let (mut socket, _) =
        tokio::time::timeout(FRAME_TIMEOUT, tokio_tungstenite::connect_async(ws_url))
            .await
            .expect("WebSocket upgrade in time")
            .expect("WebSocket upgrade");
    let connect = json!({"type": "connect", "protocol": 1});
    socket
        .send(Message::text(connect.to_string()))
        .await
        .expect("send connect");
    let connected = next_frame(&mut socket, FRAME_TIMEOUT).await;
    assert!(
        matches!(&connected, Ok(Some(frame)) if frame["type"] == "connected"),
        "{connected:?}"
    );
    let subscribe = json!({
        "type": "subscribe",
        "req": 1,
        "channel": CHANNEL,
        "guarantee": "at-least-once",
        "subscriber_id": SUBSCRIBER_ID,
        "options": {
            "inflight_max": INFLIGHT_MAX,
            "ack_wait_ms": ACK_WAIT_MS,
            "max_deliveries": MAX_DELIVERIES,
        },
    });
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .expect("send subscribe");
    let subscribed = next_frame(&mut socket, FRAME_TIMEOUT)
        .await
        .expect("subscribed in time")
        .expect("the connection stays open");
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["guarantee"], "at-least-once", "{subscribed}");
    let after = subscribed["after"].as_str().map(serial_of).unwrap_or(0);
    run.connections
        .lock()
        .expect("connections lock")
        .push(Connection {
            after,
            events: Vec::new(),
        });
    socket
}

/// Reads deliveries and acks them until the connection ends, or (with `finish`) until every
/// published message is acked and confirmed.
async fn consume(mut socket: Socket, run: Arc<Run>, finish: bool) {
    let mut req = 1;
    let mut last_serial = 0;
    let mut sent_through = 0;
    let mut confirmed_through = 0;
    let mut unacked = 0;
    let mut pending_reqs = BTreeMap::<u64, u64>::new();
    let mut highest_seen = 0;
    for _ in 0..FRAMES_PER_CONNECTION_MAX {
        if finish
            && run.publishing_done()
            && confirmed_through >= run.top_serial()
            && run.top_serial() > 0
        {
            let _ = socket.close(None).await;
            return;
        }
        let frame = match next_frame(&mut socket, ACK_IDLE).await {
            Ok(Some(frame)) => Some(frame),
            Ok(None) => return,
            Err(()) => None,
        };
        if let Some(frame) = frame {
            match frame["type"].as_str() {
                Some("message") => {
                    assert_eq!(frame["channel"], CHANNEL, "{frame}");
                    let serial = frame["serial"].as_u64().expect("serial");
                    let count = frame["delivery"].as_u64().expect("a delivery count");
                    let id = frame["id"].as_str().expect("id").to_owned();
                    run.record(Event::Delivery { serial, count, id });
                    if serial > highest_seen {
                        highest_seen = serial;
                        run.progress.fetch_max(serial, Ordering::Relaxed);
                    }
                    last_serial = serial;
                    unacked += 1;
                    if unacked < ACK_EVERY {
                        continue;
                    }
                }
                Some("acked") => {
                    let acked = frame["req"].as_u64().expect("req");
                    let through = pending_reqs
                        .remove(&acked)
                        .unwrap_or_else(|| panic!("acked for an unknown req: {frame}"));
                    confirmed_through = confirmed_through.max(through);
                    run.record(Event::AckConfirmed { req: acked });
                    continue;
                }
                _ => panic!("unexpected frame on an at-least-once subscription: {frame}"),
            }
        }
        // A full ack batch, or the stream paused with something unacked.
        if last_serial > sent_through {
            req += 1;
            let epoch = run.epoch.lock().expect("epoch lock").clone();
            let epoch = epoch.expect("deliveries come after a publish ack");
            let ack = json!({
                "type": "ack",
                "req": req,
                "channel": CHANNEL,
                "through": format!("{epoch}:{last_serial}"),
            });
            // Recorded before it is sent: the server may apply it even if the send fails.
            run.record(Event::AckSent {
                req,
                through: last_serial,
            });
            pending_reqs.insert(req, last_serial);
            sent_through = last_serial;
            unacked = 0;
            if socket.send(Message::text(ack.to_string())).await.is_err() {
                return;
            }
        }
    }
    panic!("a connection read {FRAMES_PER_CONNECTION_MAX} frames");
}

/// Checks the recorded events against the contract; returns the number of redeliveries.
fn check(run: &Run) -> u64 {
    let published = run.published.lock().expect("published lock");
    let connections = run.connections.lock().expect("connections lock");
    assert_eq!(
        published.len() as u64,
        MESSAGES,
        "every message acknowledged"
    );
    let by_serial: BTreeMap<u64, u64> = published
        .iter()
        .map(|(index, serial)| (*serial, *index))
        .collect();
    assert_eq!(by_serial.len(), published.len(), "one serial per message");
    let first_serial = *by_serial.keys().next().expect("messages");
    let top = *by_serial.keys().next_back().expect("messages");
    assert_eq!(
        top - first_serial + 1,
        MESSAGES,
        "the channel holds exactly the published messages"
    );

    // The highest cumulative ack confirmed so far, over the run in event order.
    let mut confirmed_through = 0;
    let mut sent_through = 0;
    let mut counts = BTreeMap::<u64, u64>::new();
    let mut first_deliveries = Vec::new();
    let mut redeliveries = 0;
    for (number, connection) in connections.iter().enumerate() {
        let label = format!("connection {number} (after {})", connection.after);
        assert!(
            connection.after >= confirmed_through && connection.after <= sent_through,
            "{label}: the server resumed outside [confirmed {confirmed_through}, sent \
             {sent_through}]"
        );
        let mut sent = BTreeMap::new();
        let mut previous: Option<u64> = None;
        for event in &connection.events {
            match event {
                Event::Delivery { serial, count, id } => {
                    let serial = *serial;
                    let index = by_serial.get(&serial).unwrap_or_else(|| {
                        panic!("{label}: delivery of serial {serial}, never published")
                    });
                    assert_eq!(*id, format!("m{index}"), "{label}: serial {serial}");
                    assert!(
                        serial > confirmed_through,
                        "{label}: serial {serial} delivered again (count {count}) after an \
                         ack through {confirmed_through} was confirmed"
                    );
                    match previous {
                        None => assert_eq!(
                            serial,
                            connection.after + 1,
                            "{label}: the first delivery is not the one after the held position"
                        ),
                        Some(previous) => assert_eq!(
                            serial,
                            previous + 1,
                            "{label}: delivery of {serial} after {previous}"
                        ),
                    }
                    previous = Some(serial);
                    assert!(
                        *count >= 1 && *count <= number as u64 + 1,
                        "{label}: serial {serial} with delivery count {count}"
                    );
                    match counts.insert(serial, *count) {
                        Some(before) => {
                            redeliveries += 1;
                            assert!(
                                *count > before,
                                "{label}: serial {serial} delivered with count {count} after \
                                 {before}"
                            );
                        }
                        None => first_deliveries.push(serial),
                    }
                }
                Event::AckSent { req, through } => {
                    sent.insert(*req, *through);
                    sent_through = sent_through.max(*through);
                }
                Event::AckConfirmed { req } => {
                    let through = sent[req];
                    confirmed_through = confirmed_through.max(through);
                }
            }
        }
    }
    // Order kept: first deliveries, over the whole run, are the serials in order, all of them.
    let expected: Vec<u64> = (first_serial..=top).collect();
    assert!(
        first_deliveries == expected,
        "first deliveries are not {first_serial}..={top} in order: {} of them, first \
         differences at {:?}",
        first_deliveries.len(),
        first_deliveries
            .iter()
            .zip(&expected)
            .position(|(got, wanted)| got != wanted)
    );
    assert_eq!(confirmed_through, top, "the last ack was confirmed");
    redeliveries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_stream_loses_nothing_and_repeats_only_unacked_messages() {
    let seed = seed("HERALD_ALO_KILL9_SEED");
    eprintln!("at-least-once kill -9 seed {seed} (HERALD_ALO_KILL9_SEED={seed} replays it)");
    let mut random = seed;
    let slice = (KILL_PROGRESS_MAX - KILL_PROGRESS_MIN) / KILLS as u64;
    let kill_points: Vec<(u64, u64)> = (0..KILLS as u64)
        .map(|kill| {
            let progress = KILL_PROGRESS_MIN + kill * slice + next_random(&mut random) % slice;
            (
                progress,
                next_random(&mut random) % (KILL_JITTER_MS_MAX + 1),
            )
        })
        .collect();
    eprintln!("kills at (progress, extra ms): {kill_points:?}");

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let log_path = dir.path().join("server.log");
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .unwrap();
    let run = Arc::new(Run {
        epoch: Mutex::new(None),
        published: Mutex::new(BTreeMap::new()),
        next_index: AtomicU64::new(0),
        progress: AtomicU64::new(0),
        connections: Mutex::new(Vec::new()),
    });
    let started = Instant::now();

    for (cycle, (progress, jitter_ms)) in kill_points.iter().copied().enumerate() {
        let server = SpawnedServer::start(&data_dir, &log_path);
        let socket = subscribe(&server.ws_url(), &run).await;
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = tokio::spawn(publish(
            client.clone(),
            server.base_url.clone(),
            Arc::clone(&run),
            Arc::clone(&stop),
        ));
        let subscriber = tokio::spawn(consume(socket, Arc::clone(&run), false));
        let deadline = Instant::now() + CYCLE_TIMEOUT;
        while run.progress.load(Ordering::Relaxed) < progress {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the subscriber reached {} of {progress} within {CYCLE_TIMEOUT:?}",
                run.progress.load(Ordering::Relaxed)
            );
            if subscriber.is_finished() {
                subscriber.await.expect("subscriber task");
                panic!("cycle {cycle}: the connection ended before the kill");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(jitter_ms)).await;
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        publisher.await.expect("publisher task");
        tokio::time::timeout(FRAME_TIMEOUT, subscriber)
            .await
            .expect("the subscriber sees the connection end")
            .expect("subscriber task");
        eprintln!(
            "kill {} at progress {} ({} messages acknowledged so far, {:?})",
            cycle + 1,
            run.progress.load(Ordering::Relaxed),
            run.published.lock().unwrap().len(),
            started.elapsed()
        );
    }

    // The last cycle: publish what is left, deliver and ack everything.
    let server = SpawnedServer::start(&data_dir, &log_path);
    let socket = subscribe(&server.ws_url(), &run).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish(
        client.clone(),
        server.base_url.clone(),
        Arc::clone(&run),
        Arc::clone(&stop),
    ));
    tokio::time::timeout(FINISH_TIMEOUT, consume(socket, Arc::clone(&run), true))
        .await
        .expect("everything delivered and acked in time");
    publisher.await.expect("publisher task");
    let redeliveries = check(&run);

    // The confirmed acks survive a kill too: nothing is owed after one more restart.
    server.kill9();
    let server = SpawnedServer::start(&data_dir, &log_path);
    let mut socket = subscribe(&server.ws_url(), &run).await;
    let top = run.top_serial();
    assert_eq!(
        run.connections.lock().unwrap().last().unwrap().after,
        top,
        "the resumed subscriber's position"
    );
    match next_frame(&mut socket, QUIET).await {
        Err(()) => {}
        Ok(frame) => panic!("a fully acked subscriber got {frame:?}"),
    }
    let connections = run.connections.lock().unwrap().len();
    eprintln!(
        "{MESSAGES} messages, {KILLS} kills mid-stream, {connections} connections, \
         {redeliveries} redeliveries, {:?}",
        started.elapsed()
    );
    assert!(connections == KILLS + 2);
}
