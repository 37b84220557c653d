//! The WebSocket endpoint's promises on a real socket, each as a user would check them:
//! at-most-once overflow is reported as `gap`s, a slow exactly-once subscriber loses nothing
//! (the server falls back to the log), filters and hints account for every serial, rewind,
//! resume across a server restart on the embedded store, unsubscribe, shutdown (1001), and the
//! documented outcome of every kind of bad input (error codes and close codes).
//!
//! "Accounts for every serial" is checked by [`account`]: walking the delivery frames in
//! order, each `message`/`hint` must be exactly the next serial and each `gap`/`skip` range
//! must start right at it, so a silent jump, an overlap or a duplicate fails the test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{TestServer, WsClient};
use futures_util::{SinkExt as _, StreamExt as _};
use herald_server::auth::Operation;
use herald_server::config::{ApiKeyConfig, CapabilityConfig, Config, StorageBackend};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Padding per "large" message: half the default 64 KiB message limit.
const PAD_BYTES: usize = 32 * 1024;
/// Receive buffer of a client that stops reading: small, so the server feels it at once
/// instead of after megabytes of loopback buffering.
const SLOW_RECEIVE_BUFFER_BYTES: u32 = 16 * 1024;
/// Most frames any read loop here takes before it fails (every loop is bounded).
const FRAMES_MAX: usize = 20_000;
/// How long a connection must stay silent to count as "nothing more is coming".
const QUIET: Duration = Duration::from_millis(300);

const PUBLISHER_KEY: &str = "contract-publisher-key-0123";
const SUBSCRIBER_KEY: &str = "contract-subscriber-key-012";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The serial of an `EPOCH:SERIAL` position.
fn serial_of(position: &Value) -> u64 {
    let text = position
        .as_str()
        .unwrap_or_else(|| panic!("a position string: {position}"));
    let (_, serial) = text.rsplit_once(':').expect("EPOCH:SERIAL");
    serial.parse().expect("a numeric serial")
}

/// The epoch of an `EPOCH:SERIAL` position.
fn epoch_of(position: &Value) -> String {
    let text = position.as_str().expect("a position string");
    text.rsplit_once(':').expect("EPOCH:SERIAL").0.to_owned()
}

/// A frame short enough for a failure message: a message's data becomes its `n`.
fn brief(frame: &Value) -> Value {
    let mut brief = frame.clone();
    if let Some(object) = brief.as_object_mut() {
        object.remove("chain");
        if let Some(data) = object.get_mut("data")
            && data.get("pad").is_some()
        {
            *data = json!({"n": data["n"], "pad": "..."});
        }
    }
    brief
}

/// Several frames, briefly.
fn briefs(frames: &[Value]) -> Vec<Value> {
    frames.iter().map(brief).collect()
}

/// What a run of delivery frames accounted for.
#[derive(Debug, Default)]
struct Accounting {
    /// The serial right after the last one accounted for.
    next: u64,
    delivered: Vec<u64>,
    gaps: Vec<(u64, u64)>,
    skips: Vec<(u64, u64)>,
}

/// Walks the frames in order: a `message` or `hint` must be exactly the next serial, a `gap` or
/// `skip` range must start right at it. Panics on a jump, overlap, duplicate or
/// `continuity_lost`; other frames (replies, pongs) are ignored.
fn account(frames: &[Value], first: u64) -> Accounting {
    let mut accounting = Accounting {
        next: first,
        ..Accounting::default()
    };
    for frame in frames {
        match frame["type"].as_str() {
            Some("message" | "hint") => {
                let serial = frame["serial"].as_u64().expect("a serial");
                assert_eq!(
                    serial,
                    accounting.next,
                    "a delivery out of order, duplicated or after a silent jump: {}",
                    brief(frame)
                );
                accounting.delivered.push(serial);
                accounting.next = serial + 1;
            }
            Some(kind @ ("gap" | "skip")) => {
                let (from, to) = (serial_of(&frame["from"]), serial_of(&frame["to"]));
                assert_eq!(
                    from,
                    accounting.next,
                    "a {kind} that does not start right after what came before: {}",
                    brief(frame)
                );
                assert!(to >= from, "an empty range: {frame}");
                if kind == "gap" {
                    accounting.gaps.push((from, to));
                } else {
                    accounting.skips.push((from, to));
                }
                accounting.next = to + 1;
            }
            Some("continuity_lost") => panic!("continuity was not expected to break: {frame}"),
            _ => {}
        }
    }
    accounting
}

/// The highest serial a delivery frame accounts for.
fn accounts_through(frame: &Value) -> Option<u64> {
    match frame["type"].as_str()? {
        "message" | "hint" => frame["serial"].as_u64(),
        "gap" | "skip" => Some(serial_of(&frame["to"])),
        _ => None,
    }
}

/// Reads frames (heartbeats dropped) until the delivery frames account for serial `last`.
async fn read_through(client: &mut WsClient, last: u64) -> Vec<Value> {
    let mut frames = Vec::new();
    for _ in 0..FRAMES_MAX {
        let frame = client.recv_skipping_heartbeats().await;
        let through = accounts_through(&frame);
        frames.push(frame);
        if through.is_some_and(|through| through >= last) {
            return frames;
        }
    }
    panic!("{FRAMES_MAX} frames without reaching serial {last}");
}

/// Every frame (heartbeats dropped) that arrives until the connection has been silent for
/// `quiet`. Panics if the connection closes.
async fn read_until_quiet(client: &mut WsClient, quiet: Duration) -> Vec<Value> {
    let mut frames = Vec::new();
    for _ in 0..FRAMES_MAX {
        match tokio::time::timeout(quiet, client.socket.next()).await {
            Err(_) => return frames,
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).expect("frames are JSON");
                if frame["type"] != "heartbeat" {
                    frames.push(frame);
                }
            }
            Ok(Some(Ok(Message::Close(close)))) => panic!("connection closed: {close:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => panic!("connection failed: {error}"),
            Ok(None) => panic!("connection ended"),
        }
    }
    panic!("{FRAMES_MAX} frames and still not quiet");
}

/// Reads until the server closes: the frames before the close, and the close code (`None`
/// when the connection ended without a close frame).
async fn read_until_close(client: &mut WsClient) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    for _ in 0..FRAMES_MAX {
        match client.recv_message().await {
            Ok(frame) => frames.push(frame),
            Err(close) => return (frames, close.map(|(code, _)| code)),
        }
    }
    panic!("{FRAMES_MAX} frames and no close");
}

/// Sends `frame` with a fresh `req`; returns the next frame (heartbeats dropped), which must
/// carry that `req`.
async fn request(client: &mut WsClient, mut frame: Value) -> Value {
    let req = client.req();
    frame["req"] = json!(req);
    client.send(frame).await;
    let reply = client.recv_skipping_heartbeats().await;
    assert_eq!(reply["req"], req, "the reply to request {req}: {reply}");
    reply
}

/// Sends `frame`; the reply must be an `error` with `code`.
async fn expect_error(client: &mut WsClient, frame: Value, code: &str) -> Value {
    let reply = request(client, frame).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(
        !reply["message"].as_str().unwrap_or("").is_empty(),
        "{reply}"
    );
    reply
}

/// Sends a publish frame; the reply must be a `nack` with `code`.
async fn expect_nack(client: &mut WsClient, frame: Value, code: &str) {
    let reply = request(client, frame).await;
    assert_eq!(reply["type"], "nack", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert_eq!(reply["retryable"], false, "{reply}");
}

/// The connection still answers: a ping gets its pong.
async fn assert_usable(client: &mut WsClient) {
    let pong = request(client, json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

/// `herald_live_*` samples from `/metrics`, summed per metric name (labels folded).
async fn live_metrics(server: &TestServer) -> BTreeMap<String, f64> {
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut metrics = BTreeMap::new();
    for line in text.lines().filter(|line| line.starts_with("herald_live_")) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("a sample value: {line}"));
        *metrics.entry(line[..name_end].to_owned()).or_insert(0.0) += value;
    }
    metrics
}

/// GET `/v1/channels/{channel}/messages?{query}`: status and body.
async fn read_http(server: &TestServer, channel: &str, query: &str) -> (u16, Value) {
    let response = server
        .http
        .get(server.url(&format!("/v1/channels/{channel}/messages?{query}")))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Publishes `count` messages `{"n": i, "pad": "xx.."}` (i from `first`) of about
/// [`PAD_BYTES`] each, in batches of 10.
async fn publish_large(server: &TestServer, channel: &str, first: u64, count: u64) {
    let pad = "x".repeat(PAD_BYTES);
    let mut next = first;
    while next < first + count {
        let end = (next + 10).min(first + count);
        let batch: Vec<Value> = (next..end)
            .map(|n| json!({"data": {"n": n, "pad": pad}}))
            .collect();
        server.publish(channel, json!({"messages": batch})).await;
        next = end;
    }
}

/// A tiny outbound queue and live ring, in memory: a subscriber that stops reading overflows
/// both after a handful of messages.
fn tiny_buffers(config: &mut Config) {
    config.storage.backend = StorageBackend::Memory;
    config.realtime.outbound_queue_frames = 2;
    config.realtime.live_buffer_messages = 4;
    config.realtime.catch_up_page_messages = 16;
}

fn api_key(name: &str, key: &str, namespaces: &[&str], operations: &[Operation]) -> ApiKeyConfig {
    ApiKeyConfig {
        name: name.into(),
        key: key.into(),
        capabilities: vec![CapabilityConfig {
            namespaces: namespaces.iter().map(|ns| (*ns).to_owned()).collect(),
            operations: operations.to_vec(),
        }],
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery under pressure
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn at_most_once_overflow_is_reported_as_gaps_that_account_for_every_serial() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), tiny_buffers).await;
    // The channel has a message before the subscription starts (see the next test for an
    // empty channel).
    server
        .publish("chat:flood", json!({"data": {"n": 1}}))
        .await;
    let mut subscriber =
        WsClient::connect_with_receive_buffer(&server.ws_url(), SLOW_RECEIVE_BUFFER_BYTES).await;
    let reply = subscriber
        .subscribe(json!({"channel": "chat:flood", "guarantee": "at-most-once"}))
        .await;
    assert_eq!(reply["guarantee"], "at-most-once");
    assert_eq!(serial_of(&reply["after"]), 1);

    // The subscriber reads nothing while 200 x 32 KiB are published (serials 2..=201).
    publish_large(&server, "chat:flood", 2, N).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut frames = read_until_quiet(&mut subscriber, QUIET).await;
    let before_more = account(&frames, 2);
    // A drop is reported before the next delivery; one more message makes sure a burst that
    // ended with drops gets its last gap reported too.
    server
        .publish("chat:flood", json!({"data": {"n": N + 2}}))
        .await;
    frames.extend(read_through(&mut subscriber, N + 2).await);

    let accounting = account(&frames, 2);
    assert_eq!(accounting.next, N + 3, "every serial accounted for");
    assert!(
        !accounting.gaps.is_empty(),
        "a subscriber that did not read through 6 MiB must have been dropped from"
    );
    assert_eq!(accounting.delivered.last(), Some(&(N + 2)));
    for gap in frames.iter().filter(|frame| frame["type"] == "gap") {
        assert_eq!(gap["reason"], "slow_consumer", "{gap}");
        assert_eq!(gap["channel"], "chat:flood", "{gap}");
    }
    for message in frames.iter().filter(|frame| frame["type"] == "message") {
        assert_eq!(message["data"]["n"], message["serial"]);
    }
    let dropped: u64 = accounting.gaps.iter().map(|(from, to)| to - from + 1).sum();
    eprintln!(
        "at-most-once: {} delivered, {} dropped in {} gaps; before the extra message, \
         serials 2..{} were accounted for",
        accounting.delivered.len(),
        dropped,
        accounting.gaps.len(),
        before_more.next
    );
    // The counters agree with what the subscriber saw.
    let metrics = live_metrics(&server).await;
    assert_eq!(
        metrics["herald_live_dropped_total"], dropped as f64,
        "{metrics:?}"
    );
    assert_eq!(
        metrics["herald_live_gap_notices_total"],
        accounting.gaps.len() as f64,
        "{metrics:?}"
    );
    assert_eq!(
        metrics["herald_live_deliveries_total"],
        accounting.delivered.len() as f64,
        "{metrics:?}"
    );
    server.stop().await;
}

/// A subscription made while the channel has no message yet: the first burst overflows the
/// live ring before the pump reads it, and what it missed must still be reported.
#[tokio::test]
async fn at_most_once_on_an_empty_channel_reports_the_first_drops_too() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), tiny_buffers).await;
    let mut subscriber =
        WsClient::connect_with_receive_buffer(&server.ws_url(), SLOW_RECEIVE_BUFFER_BYTES).await;
    subscriber
        .subscribe(json!({"channel": "chat:fresh", "guarantee": "at-most-once"}))
        .await;
    publish_large(&server, "chat:fresh", 1, N).await;
    server
        .publish("chat:fresh", json!({"data": {"n": N + 1}}))
        .await;
    let frames = read_through(&mut subscriber, N + 1).await;
    let accounting = account(&frames, 1);
    assert_eq!(accounting.next, N + 2);
    server.stop().await;
}

/// The module docs of live.rs promise the dropped range "as soon as there is room": a burst
/// that ends with drops must be reported without waiting for another message.
#[tokio::test]
async fn at_most_once_drops_at_the_end_of_a_burst_are_reported_without_another_message() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), tiny_buffers).await;
    server.publish("chat:tail", json!({"data": {"n": 1}})).await;
    let mut subscriber =
        WsClient::connect_with_receive_buffer(&server.ws_url(), SLOW_RECEIVE_BUFFER_BYTES).await;
    subscriber
        .subscribe(json!({"channel": "chat:tail", "guarantee": "at-most-once"}))
        .await;
    publish_large(&server, "chat:tail", 2, N).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frames = read_until_quiet(&mut subscriber, Duration::from_secs(1)).await;
    let accounting = account(&frames, 2);
    assert_eq!(
        accounting.next,
        N + 2,
        "serials {}..={} were neither delivered nor reported as a gap; last frames: {}",
        accounting.next,
        N + 1,
        Value::Array(briefs(&frames[frames.len().saturating_sub(3)..]))
    );
    server.stop().await;
}

/// At-most-once with a filter: serials the filter rejected must still be accounted for (by a
/// `skip`, or inside a `gap`) when the subscriber is slow, or a receiver sees a silent jump.
#[tokio::test]
async fn a_slow_filtered_at_most_once_subscriber_still_accounts_for_every_serial() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), tiny_buffers).await;
    server
        .publish("chat:mixed", json!({"data": {"n": 1}}))
        .await;
    let mut subscriber =
        WsClient::connect_with_receive_buffer(&server.ws_url(), SLOW_RECEIVE_BUFFER_BYTES).await;
    subscriber
        .subscribe(json!({
            "channel": "chat:mixed",
            "guarantee": "at-most-once",
            "filter": r#"headers.kind == "a""#,
        }))
        .await;
    // Runs of three: two filtered out, one wanted.
    let pad = "x".repeat(PAD_BYTES);
    let mut next = 2;
    while next < 2 + N {
        let end = (next + 10).min(2 + N);
        let batch: Vec<Value> = (next..end)
            .map(|n| {
                let kind = if n % 3 == 0 { "a" } else { "b" };
                json!({"headers": {"kind": kind}, "data": {"n": n, "pad": pad}})
            })
            .collect();
        server
            .publish("chat:mixed", json!({"messages": batch}))
            .await;
        next = end;
    }
    server
        .publish(
            "chat:mixed",
            json!({"headers": {"kind": "a"}, "data": {"n": N + 2}}),
        )
        .await;
    let frames = read_through(&mut subscriber, N + 2).await;
    let accounting = account(&frames, 2);
    assert_eq!(accounting.next, N + 3);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_exactly_once_subscriber_gets_every_message_from_the_log() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), tiny_buffers).await;
    let mut subscriber =
        WsClient::connect_with_receive_buffer(&server.ws_url(), SLOW_RECEIVE_BUFFER_BYTES).await;
    let reply = subscriber.subscribe(json!({"channel": "chat:slow"})).await;
    assert_eq!(reply["guarantee"], "exactly-once");

    // Publishing is not held up by the subscriber that reads nothing.
    let started = Instant::now();
    publish_large(&server, "chat:slow", 1, N).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frames = read_through(&mut subscriber, N).await;
    let accounting = account(&frames, 1);
    assert_eq!(accounting.delivered, (1..=N).collect::<Vec<_>>());
    assert!(accounting.gaps.is_empty() && accounting.skips.is_empty());
    for message in frames.iter().filter(|frame| frame["type"] == "message") {
        assert_eq!(message["data"]["n"], message["serial"]);
        assert_eq!(
            message["data"]["pad"].as_str().map(str::len),
            Some(PAD_BYTES)
        );
    }
    // Nothing more (no duplicate) afterwards.
    let after = read_until_quiet(&mut subscriber, QUIET).await;
    assert!(
        after.is_empty(),
        "frames after the last serial: {:?}",
        briefs(&after)
    );

    // The ring holds 4 messages and the queue 2 frames: the rest came from the log.
    let metrics = live_metrics(&server).await;
    let reads = metrics["herald_live_catch_up_reads_total"];
    assert!(reads >= 1.0, "no log read: {metrics:?}");
    assert_eq!(
        metrics["herald_live_deliveries_total"], N as f64,
        "{metrics:?}"
    );
    eprintln!("exactly-once slow subscriber: {reads} catch-up reads from the log");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Filters, hints, rewind
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_filter_delivers_matching_messages_and_skips_account_for_the_rest() {
    const N: u64 = 30;
    const FILTER: &str = r#"headers.kind == "a""#;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    let reply = subscriber
        .subscribe(json!({"channel": "chat:kinds", "filter": FILTER}))
        .await;
    assert_eq!(reply["filter"], FILTER);

    // Every third message is kind a; the others are kind b or have no headers at all.
    let batch: Vec<Value> = (1..=N)
        .map(|n| match n % 3 {
            0 => json!({"name": "x", "headers": {"kind": "a"}, "data": {"n": n}}),
            1 => json!({"name": "x", "headers": {"kind": "b"}, "data": {"n": n}}),
            _ => json!({"data": {"n": n}}),
        })
        .collect();
    let acks = server
        .publish("chat:kinds", json!({"messages": batch}))
        .await;
    let epoch = epoch_of(&acks["results"][0]["position"]);
    let wanted: Vec<u64> = (1..=N).filter(|n| n % 3 == 0).collect();

    let frames = read_through(&mut subscriber, N).await;
    let accounting = account(&frames, 1);
    assert_eq!(accounting.next, N + 1, "delivered and skipped cover 1..=N");
    assert_eq!(accounting.delivered, wanted);
    assert!(accounting.gaps.is_empty());
    // Each skip carries the chain hash at its `to`, so a receiver can keep checking the chain.
    let (_, stored) = read_http(&server, "chat:kinds", &format!("after={epoch}:0&limit=100")).await;
    let chains: BTreeMap<u64, Value> = stored["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| {
            (
                message["serial"].as_u64().unwrap(),
                message["chain"].clone(),
            )
        })
        .collect();
    for skip in frames.iter().filter(|frame| frame["type"] == "skip") {
        assert_eq!(skip["reason"], "filtered", "{skip}");
        assert_eq!(skip["channel"], "chat:kinds", "{skip}");
        assert_eq!(skip["chain"], chains[&serial_of(&skip["to"])], "{skip}");
    }

    // A resume with the same filter replays from the log and accounts the same way.
    let mut resumed = WsClient::connect(&server.ws_url()).await;
    let reply = resumed
        .subscribe(json!({"channel": "chat:kinds", "filter": FILTER, "from": format!("{epoch}:4")}))
        .await;
    assert_eq!(reply["continuity"], "held");
    let frames = read_through(&mut resumed, N).await;
    let accounting = account(&frames, 5);
    assert_eq!(accounting.next, N + 1);
    assert_eq!(
        accounting.delivered,
        wanted
            .iter()
            .copied()
            .filter(|n| *n > 4)
            .collect::<Vec<_>>()
    );

    // Invalid filters are refused with a stable code; the connection stays usable and no
    // half-made subscription is left behind.
    for bad in [r#"headers.kind =="#, "data.n > 1", r#""just a string""#, ""] {
        let error = expect_error(
            &mut subscriber,
            json!({"type": "subscribe", "channel": "chat:other", "filter": bad}),
            "invalid_filter",
        )
        .await;
        assert_eq!(error["channel"], "chat:other", "{error}");
    }
    assert_usable(&mut subscriber).await;
    subscriber
        .subscribe(json!({"channel": "chat:other", "filter": r#"name == "x""#}))
        .await;
    server.stop().await;
}

#[tokio::test]
async fn hints_carry_only_the_position_and_the_message_is_fetched_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    let reply = subscriber
        .subscribe(json!({"channel": "chat:hinted", "hints": true}))
        .await;
    assert_eq!(reply["hints"], true);
    for n in 1..=3u64 {
        server
            .publish(
                "chat:hinted",
                json!({"id": format!("h{n}"), "data": {"n": n}}),
            )
            .await;
    }
    let frames = read_through(&mut subscriber, 3).await;
    assert_eq!(account(&frames, 1).delivered, vec![1, 2, 3]);
    for hint in &frames {
        assert_eq!(hint["type"], "hint", "{hint}");
        let keys: BTreeSet<&str> = hint
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["type", "channel", "serial", "epoch", "position"]),
            "a hint carries no message content: {hint}"
        );
        let serial = hint["serial"].as_u64().unwrap();
        let epoch = hint["epoch"].as_str().unwrap();
        assert_eq!(hint["channel"], "chat:hinted");
        assert_eq!(hint["position"], format!("{epoch}:{serial}"));
        let (status, page) = read_http(
            &server,
            "chat:hinted",
            &format!("after={epoch}:{}&limit=1", serial - 1),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        let message = &page["messages"][0];
        assert_eq!(message["serial"], serial, "{page}");
        assert_eq!(message["id"], format!("h{serial}"));
        assert_eq!(message["data"], json!({"n": serial}));
    }
    server.stop().await;
}

#[tokio::test]
async fn rewind_delivers_the_last_messages_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let acks = server.publish_numbers("chat:rewind", 1, 10).await;
    let epoch = epoch_of(&acks[0]["position"]);

    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    let reply = subscriber
        .subscribe(json!({"channel": "chat:rewind", "rewind": 3}))
        .await;
    assert_eq!(reply["continuity"], "new");
    assert_eq!(reply["after"], format!("{epoch}:7"));
    let frames = read_through(&mut subscriber, 10).await;
    assert_eq!(account(&frames, 8).delivered, vec![8, 9, 10]);
    server.publish_numbers("chat:rewind", 11, 1).await;
    let frames = read_through(&mut subscriber, 11).await;
    assert_eq!(account(&frames, 11).delivered, vec![11]);
    assert_eq!(frames.last().unwrap()["data"], json!({"n": 11}));

    // Asking for more than the channel holds starts at its first message.
    let mut everything = WsClient::connect(&server.ws_url()).await;
    everything
        .subscribe(json!({"channel": "chat:rewind", "rewind": 50}))
        .await;
    let frames = read_through(&mut everything, 11).await;
    assert_eq!(account(&frames, 1).delivered, (1..=11).collect::<Vec<_>>());
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_and_unknown_frames_get_an_error_and_the_connection_stays() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;

    client.send_text("{not json").await;
    let error = client.recv_skipping_heartbeats().await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("invalid_frame")),
        "{error}"
    );
    assert_usable(&mut client).await;

    // The `req` of a frame that failed to decode is echoed when readable.
    client.send_text(r#"{"type":"dance","req":41}"#).await;
    let error = client.recv_skipping_heartbeats().await;
    assert_eq!(error["code"], "unknown_frame", "{error}");
    assert_eq!(error["req"], 41);
    assert_usable(&mut client).await;

    // A misspelt field is not silently ignored.
    client
        .send_text(r#"{"type":"subscribe","req":42,"channel":"chat:a","form":"x"}"#)
        .await;
    let error = client.recv_skipping_heartbeats().await;
    assert_eq!(error["code"], "invalid_frame", "{error}");
    assert_eq!(error["req"], 42);

    // Binary frames are not part of the protocol.
    client
        .socket
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let error = client.recv_skipping_heartbeats().await;
    assert_eq!(error["code"], "invalid_frame", "{error}");

    // A second connect is refused, not obeyed.
    client.send(json!({"type": "connect", "protocol": 1})).await;
    let error = client.recv_skipping_heartbeats().await;
    assert_eq!(error["code"], "invalid_frame", "{error}");
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn consecutive_bad_frames_close_the_connection_with_4000() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.realtime.bad_frames_max = 3;
    })
    .await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    // A good frame in between resets the count.
    client.send_text("nope").await;
    client.send_text("nope").await;
    client.send(json!({"type": "ping", "req": 7})).await;
    for _ in 0..3 {
        client.send_text("nope").await;
    }
    let (frames, close) = read_until_close(&mut client).await;
    let kinds: Vec<&str> = frames
        .iter()
        .filter(|frame| frame["type"] != "heartbeat")
        .map(|frame| frame["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec!["error", "error", "pong", "error", "error", "error"],
        "{frames:?}"
    );
    assert_eq!(close, Some(4000));
    server.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_with_1009() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.realtime.frame_bytes = 4096;
    })
    .await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    // Just under the limit is read and answered (here: refused for its unknown field).
    let fits = json!({"type": "ping", "req": 1, "pad": "x".repeat(3000)}).to_string();
    client.send_text(&fits).await;
    let reply = client.recv_skipping_heartbeats().await;
    assert_eq!(reply["code"], "invalid_frame", "an unknown field: {reply}");
    client.send_text(&"x".repeat(8192)).await;
    let (frames, close) = read_until_close(&mut client).await;
    assert_eq!(close, Some(1009), "frames before the close: {frames:?}");
    server.stop().await;
}

#[tokio::test]
async fn the_handshake_is_enforced_with_documented_close_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.realtime.handshake_timeout = Duration::from_millis(200);
    })
    .await;

    // Silence: 4002 after the handshake timeout.
    let mut silent = WsClient::open(&server.ws_url()).await;
    let started = Instant::now();
    let (_, close) = read_until_close(&mut silent).await;
    assert_eq!(close, Some(4002));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );

    // Anything but connect first: an error, then 4001.
    for first in [
        json!({"type": "ping", "req": 1}).to_string(),
        json!({"type": "subscribe", "channel": "chat:a"}).to_string(),
        "garbage".to_owned(),
    ] {
        let mut client = WsClient::open(&server.ws_url()).await;
        client.send_text(&first).await;
        let (frames, close) = read_until_close(&mut client).await;
        assert_eq!(close, Some(4001), "after {first}: {frames:?}");
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["type"], "error", "{frames:?}");
    }

    // A protocol version the server does not speak: 4003.
    let mut future = WsClient::open(&server.ws_url()).await;
    future.send(json!({"type": "connect", "protocol": 2})).await;
    let (frames, close) = read_until_close(&mut future).await;
    assert_eq!(close, Some(4003), "{frames:?}");
    assert_eq!(frames[0]["code"], "unsupported_protocol", "{frames:?}");
    server.stop().await;
}

#[tokio::test]
async fn api_keys_are_checked_at_connect_and_capabilities_at_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.dev = false;
        config.storage.backend = StorageBackend::Memory;
        config.api_keys = vec![
            api_key(
                "publisher",
                PUBLISHER_KEY,
                &["*"],
                &[Operation::Publish, Operation::History],
            ),
            api_key(
                "subscriber",
                SUBSCRIBER_KEY,
                &["chat"],
                &[Operation::Subscribe],
            ),
        ];
    })
    .await;
    let connect = |key: Option<&str>| match key {
        Some(key) => json!({"type": "connect", "protocol": 1, "auth": {"key": key}}),
        None => json!({"type": "connect", "protocol": 1}),
    };

    // No key, or a wrong one: an `unauthorized` error, then 4001.
    for key in [None, Some("not-a-configured-key-000")] {
        let mut client = WsClient::open(&server.ws_url()).await;
        client.send(connect(key)).await;
        let (frames, close) = read_until_close(&mut client).await;
        assert_eq!(close, Some(4001), "key {key:?}: {frames:?}");
        assert_eq!(frames[0]["code"], "unauthorized", "{frames:?}");
    }
    // A wrong key on the upgrade request is a plain 401 before any WebSocket.
    let mut upgrade = server.ws_url().into_client_request().unwrap();
    upgrade.headers_mut().insert(
        "authorization",
        "Bearer not-a-configured-key-000".parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(upgrade).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401);
        }
        other => panic!(
            "expected a 401, got {:?}",
            other.map(|(_, response)| response)
        ),
    }

    // A key without `subscribe`: `forbidden` for the subscription, the connection goes on.
    let mut publisher = WsClient::open(&server.ws_url()).await;
    publisher.send(connect(Some(PUBLISHER_KEY))).await;
    assert_eq!(publisher.recv().await["type"], "connected");
    let error = expect_error(
        &mut publisher,
        json!({"type": "subscribe", "channel": "chat:secure"}),
        "forbidden",
    )
    .await;
    assert_eq!(error["channel"], "chat:secure");
    let ack = request(
        &mut publisher,
        json!({"type": "publish", "channel": "chat:secure", "data": 1}),
    )
    .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    // A key with `subscribe` on `chat` only; sent as a bearer header on the upgrade.
    let mut upgrade = server.ws_url().into_client_request().unwrap();
    upgrade.headers_mut().insert(
        "authorization",
        format!("Bearer {SUBSCRIBER_KEY}").parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::connect_async(upgrade).await.unwrap();
    let mut subscriber = WsClient::from_socket(socket);
    subscriber.send(connect(None)).await;
    assert_eq!(subscriber.recv().await["type"], "connected");
    let reply = subscriber
        .subscribe(json!({"channel": "chat:secure", "rewind": 1}))
        .await;
    assert_eq!(reply["guarantee"], "exactly-once");
    let frames = read_through(&mut subscriber, 1).await;
    assert_eq!(account(&frames, 1).delivered, vec![1]);
    expect_error(
        &mut subscriber,
        json!({"type": "subscribe", "channel": "other:secure"}),
        "forbidden",
    )
    .await;
    // ... and no `publish` either.
    expect_nack(
        &mut subscriber,
        json!({"type": "publish", "channel": "chat:secure", "data": 2}),
        "forbidden",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn bad_subscription_requests_get_stable_codes_and_the_subscription_survives() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let acks = server.publish_numbers("chat:req", 1, 2).await;
    let epoch = epoch_of(&acks[0]["position"]);
    let mut client = WsClient::connect(&server.ws_url()).await;
    client.subscribe(json!({"channel": "chat:req"})).await;

    let cases = [
        (
            json!({"channel": "chat:req"}),
            "already_subscribed",
            "subscribe",
        ),
        (
            json!({"channel": "chat:nope"}),
            "not_subscribed",
            "unsubscribe",
        ),
        (
            json!({"channel": "chat:x", "from": format!("{epoch}:1"), "rewind": 1}),
            "invalid_request",
            "subscribe",
        ),
        (
            json!({"channel": "chat:x", "guarantee": "at-most-once", "from": format!("{epoch}:1")}),
            "invalid_request",
            "subscribe",
        ),
        (
            json!({"channel": "chat:x", "guarantee": "at-most-once", "rewind": 2}),
            "invalid_request",
            "subscribe",
        ),
        (
            json!({"channel": "chat:x", "guarantee": "twice"}),
            "invalid_request",
            "subscribe",
        ),
        (
            json!({"channel": "chat:x", "from": "not a position"}),
            "invalid_position",
            "subscribe",
        ),
        (
            json!({"channel": "chat:x", "from": format!("{epoch}:x")}),
            "invalid_position",
            "subscribe",
        ),
        (
            json!({"channel": "no spaces allowed"}),
            "invalid_channel",
            "subscribe",
        ),
    ];
    for (mut frame, code, kind) in cases {
        frame["type"] = json!(kind);
        expect_error(&mut client, frame, code).await;
    }
    assert_usable(&mut client).await;
    // The first subscription still delivers.
    server.publish_numbers("chat:req", 3, 1).await;
    let frames = read_through(&mut client, 3).await;
    assert_eq!(account(&frames, 3).delivered, vec![3]);
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_publish_is_nacked_with_its_code_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    let publish = |fields: Value| {
        let mut frame = json!({"type": "publish", "channel": "chat:nack", "data": {"ok": true}});
        for (key, value) in fields.as_object().unwrap() {
            frame[key] = value.clone();
        }
        frame
    };
    let headers: serde_json::Map<String, Value> = (0..40)
        .map(|index| (format!("h{index}"), json!("v")))
        .collect();
    let cases = [
        (
            publish(json!({"data": "x".repeat(70 * 1024)})),
            "message_too_large",
        ),
        (
            publish(json!({"id": "spaces are not allowed"})),
            "invalid_message_id",
        ),
        (publish(json!({"ttl": "soon"})), "invalid_ttl"),
        (publish(json!({"headers": headers})), "invalid_message"),
        (
            publish(json!({"channel": "no spaces allowed"})),
            "invalid_channel",
        ),
    ];
    for (frame, code) in cases {
        expect_nack(&mut client, frame, code).await;
    }
    // A publish without data does not decode as a publish: an `error`, not a `nack`.
    expect_error(
        &mut client,
        json!({"type": "publish", "channel": "chat:nack"}),
        "invalid_frame",
    )
    .await;

    // Nothing was stored: the channel has no message, and the next valid publish is serial 1.
    let (status, body) = read_http(&server, "chat:nack", "").await;
    let stored = body["messages"].as_array().map_or(0, Vec::len);
    assert!(
        (status == 404 && body["error"]["code"] == "channel_not_found")
            || (status == 200 && stored == 0),
        "{status} {body}"
    );
    let ack = request(&mut client, publish(json!({}))).await;
    assert_eq!(
        (ack["type"].as_str(), ack["serial"].as_u64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn resume_after_a_server_restart_delivers_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // The default backend: the embedded log in real files.
    let server = TestServer::start(dir.path(), |_| {}).await;
    let addr = server.addr;
    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    subscriber
        .subscribe(json!({"channel": "chat:durable"}))
        .await;
    server.publish_numbers("chat:durable", 1, 20).await;
    let frames = subscriber.read_messages(10).await;
    let last = frames.last().unwrap()["position"].clone();
    assert_eq!(serial_of(&last), 10);

    server.stop().await;
    let server = TestServer::start_on(dir.path(), addr, |_| {}).await;
    let mut resumed = WsClient::connect(&server.ws_url()).await;
    let reply = resumed
        .subscribe(json!({"channel": "chat:durable", "from": last}))
        .await;
    assert_eq!(reply["continuity"], "held", "{reply}");
    assert_eq!(reply["top"], format!("{}:20", epoch_of(&last)));
    server.publish_numbers("chat:durable", 21, 10).await;
    let frames = read_through(&mut resumed, 30).await;
    let accounting = account(&frames, 11);
    assert_eq!(accounting.delivered, (11..=30).collect::<Vec<_>>());
    assert!(accounting.gaps.is_empty() && accounting.skips.is_empty());
    for message in frames.iter().filter(|frame| frame["type"] == "message") {
        assert_eq!(message["data"]["n"], message["serial"]);
    }
    let after = read_until_quiet(&mut resumed, QUIET).await;
    assert!(after.is_empty(), "nothing after serial 30: {after:?}");
    server.stop().await;
}

#[tokio::test]
async fn unsubscribe_stops_deliveries_for_that_channel_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    client.subscribe(json!({"channel": "chat:left"})).await;
    client.subscribe(json!({"channel": "chat:kept"})).await;
    server.publish_numbers("chat:left", 1, 1).await;
    assert_eq!(
        account(&read_through(&mut client, 1).await, 1).delivered,
        vec![1]
    );

    let reply = request(
        &mut client,
        json!({"type": "unsubscribe", "channel": "chat:left"}),
    )
    .await;
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
    assert_eq!(reply["channel"], "chat:left");
    server.publish_numbers("chat:left", 2, 5).await;
    server.publish_numbers("chat:kept", 1, 1).await;
    let frames = read_until_quiet(&mut client, QUIET).await;
    assert_eq!(
        frames.len(),
        1,
        "only the kept channel's message: {frames:?}"
    );
    assert_eq!(frames[0]["channel"], "chat:kept");
    // The channel can be subscribed again; unsubscribing twice is `not_subscribed`.
    client.subscribe(json!({"channel": "chat:left"})).await;
    let reply = request(
        &mut client,
        json!({"type": "unsubscribe", "channel": "chat:left"}),
    )
    .await;
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
    expect_error(
        &mut client,
        json!({"type": "unsubscribe", "channel": "chat:left"}),
        "not_subscribed",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_open_websockets_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut idle = WsClient::connect(&server.ws_url()).await;
    let mut subscribed = WsClient::connect(&server.ws_url()).await;
    subscribed.subscribe(json!({"channel": "chat:bye"})).await;
    let stopping = tokio::spawn(server.stop());
    for client in [&mut idle, &mut subscribed] {
        let (frames, close) = read_until_close(client).await;
        assert_eq!(close, Some(1001), "{frames:?}");
    }
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the server stops in time")
        .unwrap();
}

/// A slow exactly-once subscriber that retention overtakes while it catches up is told so with
/// `continuity_lost` (reason `retention`) and the exact range; every other serial still
/// arrives once, in order: no silent jump.
#[tokio::test]
async fn retention_overtaking_a_slow_exactly_once_subscriber_is_reported_with_the_range() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        tiny_buffers(config);
        config.namespaces.insert(
            "short".into(),
            herald_server::config::NamespaceConfig {
                retention_messages_max: Some(20),
                ..Default::default()
            },
        );
    })
    .await;
    let mut subscriber =
        WsClient::connect_with_receive_buffer(&server.ws_url(), SLOW_RECEIVE_BUFFER_BYTES).await;
    subscriber.subscribe(json!({"channel": "short:slow"})).await;
    publish_large(&server, "short:slow", 1, N).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut next = 1u64;
    let mut lost_ranges = Vec::new();
    for _ in 0..FRAMES_MAX {
        let frame = subscriber.recv_skipping_heartbeats().await;
        match frame["type"].as_str() {
            Some("message") => {
                let serial = frame["serial"].as_u64().unwrap();
                assert_eq!(serial, next, "silent jump or repeat at {}", brief(&frame));
                next = serial + 1;
            }
            Some("continuity_lost") => {
                assert_eq!(frame["reason"], "retention", "{frame}");
                let (from, to) = (serial_of(&frame["from"]), serial_of(&frame["to"]));
                assert_eq!(
                    from, next,
                    "the lost range starts right after the last delivery"
                );
                assert!(to >= from, "{frame}");
                lost_ranges.push((from, to));
                next = to + 1;
            }
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
        if next > N {
            break;
        }
    }
    assert_eq!(next, N + 1, "everything accounted for through {N}");
    assert!(
        !lost_ranges.is_empty(),
        "retention (20 messages) must overtake the subscriber"
    );
    // Only what retention removed is missing: the last 20 serials are all delivered.
    assert!(
        lost_ranges.iter().all(|(_, to)| *to <= N - 20),
        "{lost_ranges:?}"
    );
    let metrics = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = format!(
        "herald_continuity_lost_total{{reason=\"retention\"}} {}",
        lost_ranges.len()
    );
    assert!(metrics.contains(&counted), "{counted} not in /metrics");
    server.stop().await;
}
