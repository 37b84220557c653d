//! kill -9 under an MQTT persistent session (issue #6): a rumqttc 3.1.1 subscriber with
//! `clean_session = 0` at QoS 1 receives a stream published over HTTP while the real `herald`
//! binary is SIGKILLed [`KILLS`] times at random points and restarted on the same data dir.
//! After each restart the subscriber connects again (same client id, a new rumqttc client):
//! its session must resume (`session_present`), and over the whole run every published message
//! must arrive, first deliveries in publish order, and a message may come again only while it
//! was unacknowledged (so at most a window's worth per connection). The subscriber acks each
//! message only once it has recorded it (manual acks).
//!
//! The publisher sends [`MESSAGES`] messages in batches with fixed ids; a batch cut by a kill is
//! sent again with the same ids after the restart (the log deduplicates it). The MQTT listener
//! keeps one loopback port over the restarts so the client finds it again. The seed of the kill
//! points is printed; `HERALD_MQTT_KILL9_SEED=<n>` replays it. Every loop is bounded in count
//! and time, and the server is killed when the test ends, however it ends.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{SpawnedServer, next_random, seed};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

const CHANNEL: &str = "fleet:kill9";
const TOPIC_FILTER: &str = "fleet/#";
const CLIENT_ID: &str = "kill9-device";
const MESSAGES: u64 = 1_500;
const BATCH: u64 = 10;
/// About 1,000 messages/s: the stream lasts long enough for the kills to land mid-stream.
const PUBLISH_PAUSE: Duration = Duration::from_millis(10);
const KILLS: usize = 3;
/// rumqttc's inflight window and Herald's outbound window bound the repeats per connection.
const REPEATS_PER_CONNECTION_MAX: usize = 64;
/// The whole run, at most.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// A loopback port free right now (for the listener's fixed address across restarts).
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

/// Publishes every message not yet acknowledged, from `next`, until all are or the server
/// goes away (then the caller starts it again after the restart).
async fn publish(client: reqwest::Client, base_url: String, next: Arc<AtomicU64>) {
    let url = format!("{base_url}/v1/channels/{CHANNEL}/messages");
    loop {
        let first = next.load(Ordering::Relaxed);
        if first >= MESSAGES {
            return;
        }
        let messages: Vec<_> = (first..(first + BATCH).min(MESSAGES))
            .map(|index| json!({"id": format!("m{index}"), "data": index}))
            .collect();
        let count = messages.len() as u64;
        let sent = client
            .post(&url)
            .json(&json!({ "messages": messages }))
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                next.store(first + count, Ordering::Relaxed);
            }
            // The server is gone (killed): this batch goes again, same ids, after the restart.
            _ => return,
        }
        tokio::time::sleep(PUBLISH_PAUSE).await;
    }
}

/// One connection's deliveries (message indexes, in arrival order), until the connection
/// fails (the server was killed) or `enough` is reached, or the run's deadline.
async fn receive(
    mqtt: SocketAddr,
    received: &mut Vec<Vec<u64>>,
    enough: impl Fn(&[Vec<u64>]) -> bool,
    deadline: Instant,
) -> Option<(AsyncClient, rumqttc::EventLoop)> {
    let mut options = MqttOptions::new(CLIENT_ID, mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    // Acknowledged once recorded, never before: rumqttc's automatic acks would confirm
    // messages it read from the socket but this loop never saw (when it stops polling).
    options.set_manual_acks(true);
    let (client, mut events) = AsyncClient::new(options, 64);
    received.push(Vec::new());
    loop {
        if Instant::now() > deadline {
            panic!("the run took longer than {RUN_LIMIT:?}");
        }
        let polled = tokio::time::timeout(Duration::from_secs(5), events.poll()).await;
        match polled {
            Ok(Ok(Event::Incoming(Packet::ConnAck(connack)))) => {
                assert!(
                    connack.session_present,
                    "the stored session is resumed after every restart"
                );
            }
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                let index: u64 = std::str::from_utf8(&publish.payload)
                    .expect("utf-8")
                    .parse()
                    .expect("a number");
                received.last_mut().expect("pushed").push(index);
                client.ack(&publish).await.expect("queue the PUBACK");
                if enough(received) {
                    return Some((client, events));
                }
            }
            Ok(Ok(_)) => {}
            // The server is gone.
            Ok(Err(_)) => return None,
            // Quiet for 5 s: nothing more is coming on this connection.
            Err(_) => return Some((client, events)),
        }
    }
}

/// Creates the session and its subscription before anything is published (a message published
/// before the subscription is not owed to it), then leaves with DISCONNECT.
async fn subscribe_once(mqtt: SocketAddr) {
    let mut options = MqttOptions::new(CLIENT_ID, mqtt.ip().to_string(), mqtt.port());
    options.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .subscribe(TOPIC_FILTER, QoS::AtLeastOnce)
        .await
        .expect("queue the SUBSCRIBE");
    let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return,
                Ok(_) => {}
                Err(error) => panic!("MQTT connection failed: {error}"),
            }
        }
    })
    .await;
    subscribed.expect("SUBACK in time");
    client.disconnect().await.expect("queue the DISCONNECT");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

fn distinct(received: &[Vec<u64>]) -> usize {
    received.iter().flatten().collect::<BTreeSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_qos1_session_loses_nothing_when_the_server_is_killed() {
    let seed = seed("HERALD_MQTT_KILL9_SEED");
    println!("HERALD_MQTT_KILL9_SEED={seed}");
    let mut random = seed;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mqtt = free_port();
    let deadline = Instant::now() + RUN_LIMIT;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let mut received: Vec<Vec<u64>> = Vec::new();

    let mut server = SpawnedServer::start_with_mqtt(&data, &log, mqtt);
    // Kill points: after this many distinct messages, spread over the stream.
    let mut thresholds: Vec<usize> = (0..KILLS)
        .map(|kill| {
            let span = MESSAGES as usize / (KILLS + 1);
            span * (kill + 1) - span / 2 + (next_random(&mut random) as usize % (span / 2))
        })
        .collect();
    thresholds.sort_unstable();
    subscribe_once(mqtt).await;
    for threshold in thresholds {
        let publisher = tokio::spawn(publish(http.clone(), server.base_url.clone(), next.clone()));
        let connection = receive(
            mqtt,
            &mut received,
            |received| distinct(received) >= threshold,
            deadline,
        )
        .await;
        // A few more milliseconds of traffic, then the kill, mid-stream.
        tokio::time::sleep(Duration::from_millis(next_random(&mut random) % 20)).await;
        server.kill9();
        drop(connection);
        let _ = publisher.await;
        server = SpawnedServer::start_with_mqtt(&data, &log, mqtt);
    }
    // The rest of the stream, then everything must have arrived.
    let publisher = tokio::spawn(publish(http.clone(), server.base_url.clone(), next.clone()));
    let connection = receive(
        mqtt,
        &mut received,
        |received| distinct(received) as u64 >= MESSAGES,
        deadline,
    )
    .await;
    publisher.await.unwrap();
    assert_eq!(
        next.load(Ordering::Relaxed),
        MESSAGES,
        "everything was published"
    );
    drop(connection);

    // Every message arrived.
    let all: BTreeSet<u64> = received.iter().flatten().copied().collect();
    let missing: Vec<u64> = (0..MESSAGES).filter(|index| !all.contains(index)).collect();
    if !missing.is_empty() {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let warnings: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
        panic!(
            "lost: {missing:?} (seed {seed}); connections: {:?}; server warnings:\n{}",
            received
                .iter()
                .map(|deliveries| (deliveries.first(), deliveries.last(), deliveries.len()))
                .collect::<Vec<_>>(),
            warnings.join("\n")
        );
    }
    // First deliveries in publish order, over the whole run.
    let mut seen = BTreeSet::new();
    let firsts: Vec<u64> = received
        .iter()
        .flatten()
        .copied()
        .filter(|index| seen.insert(*index))
        .collect();
    assert!(
        firsts.windows(2).all(|pair| pair[0] < pair[1]),
        "first deliveries out of order (seed {seed})"
    );
    // Repeats: only of what was unacknowledged when a connection ended.
    let mut before = BTreeSet::new();
    for (connection, deliveries) in received.iter().enumerate() {
        let repeats = deliveries
            .iter()
            .filter(|index| before.contains(*index))
            .count();
        assert!(
            repeats <= REPEATS_PER_CONNECTION_MAX,
            "connection {connection} got {repeats} repeats (seed {seed})"
        );
        before.extend(deliveries.iter().copied());
    }
    println!(
        "{} connections, {} deliveries for {MESSAGES} messages",
        received.len(),
        received.iter().map(Vec::len).sum::<usize>()
    );
    server.kill9();
}
