//! Resume with a real server and real sockets: a connection cut in the middle of a burst, a
//! server restart, recovery in a new client, and publishes in flight during a cut.
//!
//! The subscriber connects through the fault proxy; publishers connect directly unless the
//! test is about them. Every wait is bounded (common::WAIT).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, WAIT, collect_messages, next_event, options, subscribed, ws_url};
use herald_client::{Ack, Client, Continuity, Event, Message, Publication, SubscribeOptions};
use herald_faults::FaultProxy;
use tokio::task::JoinSet;

const CHANNEL: &str = "orders:eu";

/// Publishes `count` messages `{"n": i}` with up to `concurrency` in flight; returns the acks
/// by message id.
async fn publish_burst(
    client: &Client,
    first: u64,
    count: u64,
    concurrency: usize,
) -> BTreeMap<String, Ack> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for n in first..first + count {
        let client = client.clone();
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let publication = Publication::json(&serde_json::json!({ "n": n })).unwrap();
            let ack = tokio::time::timeout(WAIT, client.publish(CHANNEL, publication))
                .await
                .expect("publish acked in time")
                .expect("publish succeeds");
            drop(permit);
            ack
        });
    }
    let mut acks = BTreeMap::new();
    while let Some(ack) = tasks.join_next().await {
        let ack = ack.expect("publish task");
        acks.insert(ack.id.clone(), ack);
    }
    acks
}

/// Every acked message arrived exactly once, in serial order, with the serial of its ack.
fn assert_exactly_once_in_order(messages: &[Message], acks: &BTreeMap<String, Ack>, first: u64) {
    let serials: Vec<u64> = messages.iter().map(|message| message.serial().0).collect();
    let expected: Vec<u64> = (first..first + acks.len() as u64).collect();
    assert_eq!(
        serials, expected,
        "serials delivered in order, none lost or repeated"
    );
    for message in messages {
        let ack = acks
            .get(&message.id)
            .unwrap_or_else(|| panic!("message {} was never published", message.id));
        assert_eq!(
            ack.serial,
            message.serial().0,
            "delivered at its acked serial"
        );
        assert!(!ack.duplicate);
    }
    let ids: BTreeSet<&str> = messages.iter().map(|message| message.id.as_str()).collect();
    assert_eq!(ids.len(), acks.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_in_the_middle_of_a_burst_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let subscriber = Client::connect(options(ws_url(proxy.addr()))).unwrap();
    let publisher = Client::connect(options(server.url())).unwrap();
    let mut subscription = subscriber
        .subscribe(CHANNEL, SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut subscription).await;

    const COUNT: u64 = 600;
    let burst = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publish_burst(&publisher, 1, COUNT, 32).await })
    };
    let mut messages = Vec::new();
    let mut cuts = 0;
    while messages.len() < COUNT as usize {
        match next_event(&mut subscription).await {
            Event::Message(message) => messages.push(*message),
            Event::Subscribed { continuity, .. } => {
                assert_eq!(continuity, Continuity::Held, "resumed from its position");
            }
            Event::Stalled { .. } => {}
            other => panic!(
                "unexpected event after {} messages: {other:?}",
                messages.len()
            ),
        }
        // Two cuts while the burst is flowing.
        if (messages.len() == 150 && cuts == 0) || (messages.len() == 400 && cuts == 1) {
            proxy.cut();
            cuts += 1;
        }
    }
    let acks = tokio::time::timeout(WAIT, burst).await.unwrap().unwrap();
    assert_exactly_once_in_order(&messages, &acks, 1);
    assert!(
        subscriber.connection_state().connections >= 3,
        "the subscriber reconnected after each cut: {:?}",
        subscriber.connection_state()
    );
    // Nothing more arrives: no late duplicate.
    let extra = tokio::time::timeout(Duration::from_millis(600), subscription.next()).await;
    assert!(
        matches!(extra, Err(_) | Ok(Some(Event::Stalled { .. }))),
        "nothing after the burst: {extra:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_resume_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let subscriber = Client::connect(options(server.url())).unwrap();
    let publisher = Client::connect(options(server.url())).unwrap();
    let mut subscription = subscriber
        .subscribe(CHANNEL, SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut subscription).await;
    let before = publish_burst(&publisher, 1, 100, 16).await;
    let mut messages = collect_messages(&mut subscription, 100).await;

    server.stop().await;
    // While the server is down, publishes wait (and are re-sent on reconnect).
    let pending = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publish_burst(&publisher, 101, 100, 16).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = TestServer::start(dir.path(), addr).await;

    let after = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    messages.extend(collect_messages(&mut subscription, 100).await);
    let mut acks = before;
    acks.extend(after);
    assert_exactly_once_in_order(&messages, &acks, 1);
    assert!(subscriber.connection_state().connections >= 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_resumes_from_the_recovery_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let publisher = Client::connect(options(server.url())).unwrap();
    let first = Client::connect(options(server.url())).unwrap();
    let mut subscription = first
        .subscribe(CHANNEL, SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut subscription).await;
    let acks = publish_burst(&publisher, 1, 50, 8).await;
    let mut messages = collect_messages(&mut subscription, 50).await;
    let key = first.recovery_key().await.unwrap().to_string();
    drop(subscription);
    first.close().await;

    // Published while nobody listens.
    let later = publish_burst(&publisher, 51, 50, 8).await;
    let key = herald_client::RecoveryKey::parse(&key).unwrap();
    let second = Client::connect(options(server.url())).unwrap();
    let resume = SubscribeOptions {
        from: key.position(CHANNEL).cloned(),
        ..SubscribeOptions::default()
    };
    let mut subscription = second.subscribe(CHANNEL, resume).await.unwrap();
    let Event::Subscribed { continuity, .. } = subscribed(&mut subscription).await else {
        unreachable!()
    };
    assert_eq!(continuity, Continuity::Held);
    messages.extend(collect_messages(&mut subscription, 50).await);
    let mut all = acks;
    all.extend(later);
    assert_exactly_once_in_order(&messages, &all, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_flight_during_a_cut_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let publisher = Client::connect(options(ws_url(proxy.addr()))).unwrap();
    publisher.wait_connected(1).await.unwrap();

    const COUNT: u64 = 300;
    let burst = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publish_burst(&publisher, 1, COUNT, 64).await })
    };
    // Cut a few times while publishes are in flight (acks lost on the way back, frames lost
    // on the way in): the client re-sends each with its id until it gets an ack.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(15)).await;
        proxy.cut();
    }
    let acks = tokio::time::timeout(WAIT, burst).await.unwrap().unwrap();
    assert_eq!(acks.len(), COUNT as usize, "every publish got an ack");
    let serials: BTreeSet<u64> = acks.values().map(|ack| ack.serial).collect();
    assert_eq!(serials.len(), COUNT as usize, "one serial per message id");

    // The log holds each message exactly once: 1..=COUNT, each id once.
    let reader = Client::connect(options(server.url())).unwrap();
    let mut subscription = reader
        .subscribe(
            CHANNEL,
            SubscribeOptions {
                rewind: Some(COUNT * 2),
                ..SubscribeOptions::default()
            },
        )
        .await
        .unwrap();
    let Event::Subscribed { top, after, .. } = subscribed(&mut subscription).await else {
        unreachable!()
    };
    assert_eq!(
        top.map(|top| top.serial.0),
        Some(COUNT),
        "no extra serial was stored"
    );
    assert_eq!(after.map(|after| after.serial.0), Some(0));
    let messages = collect_messages(&mut subscription, COUNT as usize).await;
    for message in &messages {
        let ack = &acks[&message.id];
        assert_eq!(ack.serial, message.serial().0);
    }
    let duplicates = acks.values().filter(|ack| ack.duplicate).count();
    eprintln!(
        "{} connections through the proxy; {duplicates} acks were duplicate: true (re-sent after a cut)",
        proxy.accepted()
    );
    assert!(proxy.accepted() >= 2, "the cuts forced reconnects");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_with_small_queues_gets_everything_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // Small queues on both sides: the client stops reading when its queue is full, the server
    // stops pushing live and catches the subscriber up from the log.
    let server = TestServer::start_with(dir.path(), "127.0.0.1:0".parse().unwrap(), |config| {
        config.realtime.outbound_queue_frames = 16;
        config.realtime.live_buffer_messages = 32;
    })
    .await;
    let mut slow = options(server.url());
    slow.subscription_events_max = 4;
    let subscriber = Client::connect(slow).unwrap();
    let publisher = Client::connect(options(server.url())).unwrap();
    let mut subscription = subscriber
        .subscribe(CHANNEL, SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut subscription).await;

    const COUNT: u64 = 1000;
    let burst = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publish_burst(&publisher, 1, COUNT, 64).await })
    };
    let mut messages = Vec::new();
    while messages.len() < COUNT as usize {
        match next_event(&mut subscription).await {
            Event::Message(message) => messages.push(*message),
            Event::Stalled { .. } => {}
            other => panic!(
                "unexpected event after {} messages: {other:?}",
                messages.len()
            ),
        }
        if messages.len() < 200 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if messages.len() == 300 {
            // Longer than the client's silence limit (about 2 heartbeats of 200 ms): the
            // client waits for room in the queue, which must not count as a dead connection.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    let acks = tokio::time::timeout(WAIT, burst).await.unwrap().unwrap();
    assert_exactly_once_in_order(&messages, &acks, 1);
    assert_eq!(
        subscriber.connection_state().connections,
        1,
        "a slow application is not a dead connection"
    );
    server.stop().await;
}
