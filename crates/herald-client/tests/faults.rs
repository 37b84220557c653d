//! Faults the client must notice by itself: a silent (blackholed) connection, an outage
//! during which an at-most-once subscription misses messages, and a server that refuses the
//! client's credentials.

mod common;

use std::time::Duration;

use common::{TestServer, WAIT, collect_messages, next_event, options, subscribed, ws_url};
use herald_client::{
    Client, ClientError, Event, Guarantee, Position, Publication, SubscribeOptions,
};
use herald_faults::FaultProxy;
use herald_server::auth::Operation;
use herald_server::config::{ApiKeyConfig, CapabilityConfig};

const CHANNEL: &str = "sensors:a";

async fn publish(client: &Client, count: u64) {
    for n in 0..count {
        let publication = Publication::json(&serde_json::json!({ "n": n })).unwrap();
        tokio::time::timeout(WAIT, client.publish(CHANNEL, publication))
            .await
            .expect("publish in time")
            .expect("publish acked");
    }
}

/// Waits (bounded) until `condition` holds for the client's connection state.
async fn wait_state(client: &Client, what: &str, condition: impl Fn(bool, u64) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = client.connection_state();
        if condition(state.connected, state.connections) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_dropped_after_missed_heartbeats_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let mut subscriber_options = options(ws_url(proxy.addr()));
    subscriber_options.handshake_timeout = Duration::from_millis(500);
    let subscriber = Client::connect(subscriber_options).unwrap();
    let publisher = Client::connect(options(server.url())).unwrap();
    let mut subscription = subscriber
        .subscribe(CHANNEL, SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut subscription).await;
    publish(&publisher, 5).await;
    let mut messages = collect_messages(&mut subscription, 5).await;

    // Nothing gets through any more, but no socket closes: only the heartbeat (200 ms here)
    // going missing can tell.
    proxy.blackhole(true);
    let silent_since = tokio::time::Instant::now();
    publish(&publisher, 5).await;
    wait_state(
        &subscriber,
        "the silent connection to be dropped",
        |connected, _| !connected,
    )
    .await;
    let noticed_after = silent_since.elapsed();
    assert!(
        noticed_after < Duration::from_secs(3),
        "noticed after {noticed_after:?}"
    );
    proxy.blackhole(false);
    subscriber.wait_connected(2).await.unwrap();
    messages.extend(collect_messages(&mut subscription, 5).await);
    let serials: Vec<u64> = messages.iter().map(|message| message.serial().0).collect();
    assert_eq!(serials, (1..=10).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_reports_what_it_missed_while_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let subscriber = Client::connect(options(ws_url(proxy.addr()))).unwrap();
    let publisher = Client::connect(options(server.url())).unwrap();
    let live_only = SubscribeOptions {
        guarantee: Guarantee::AtMostOnce,
        ..SubscribeOptions::default()
    };
    let mut subscription = subscriber.subscribe(CHANNEL, live_only).await.unwrap();
    subscribed(&mut subscription).await;
    publish(&publisher, 3).await;
    collect_messages(&mut subscription, 3).await;

    proxy.refuse(true);
    proxy.cut();
    wait_state(&subscriber, "the cut to be seen", |connected, _| !connected).await;
    publish(&publisher, 4).await; // serials 4..=7, while the subscriber is away
    proxy.refuse(false);
    subscriber.wait_connected(2).await.unwrap();

    let mut gap = None;
    loop {
        match next_event(&mut subscription).await {
            Event::Gap { from, to, reason } => gap = Some((from, to, reason)),
            Event::Subscribed { .. } | Event::Stalled { .. } => {}
            Event::Message(message) => {
                assert_eq!(message.serial().0, 8, "live again after the gap");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
        if gap.is_some() {
            publish(&publisher, 1).await;
        }
    }
    let (from, to, reason) = gap.expect("a gap was reported before the next message");
    let epoch = from.epoch.clone();
    assert_eq!(from, Position::new(epoch.clone(), herald_client::Serial(4)));
    assert_eq!(to, Position::new(epoch, herald_client::Serial(7)));
    assert_eq!(reason, "disconnected");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_stop_the_client_with_a_clear_error() {
    const KEY: &str = "test-client-key-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), "127.0.0.1:0".parse().unwrap(), |config| {
        config.dev = false;
        config.api_keys = vec![ApiKeyConfig {
            name: "client".into(),
            key: KEY.into(),
            capabilities: vec![CapabilityConfig {
                namespaces: vec!["sensors".into()],
                operations: vec![Operation::Publish, Operation::Subscribe],
            }],
        }];
    })
    .await;

    let mut wrong = options(server.url());
    wrong.key = Some("not-the-key-0123456789abc".into());
    let client = Client::connect(wrong).unwrap();
    let publication = Publication::json(&1).unwrap();
    let refused = tokio::time::timeout(WAIT, client.publish(CHANNEL, publication))
        .await
        .expect("refused in time");
    assert!(
        matches!(refused, Err(ClientError::Rejected(_))),
        "{refused:?}"
    );
    assert!(client.connection_state().stopped);

    let mut right = options(server.url());
    right.key = Some(KEY.into());
    let client = Client::connect(right).unwrap();
    let ack = client
        .publish(CHANNEL, Publication::json(&1).unwrap())
        .await
        .unwrap();
    assert_eq!(ack.serial, 1);
    // A channel outside the key's namespaces: this subscription ends, the client goes on.
    let mut forbidden = client
        .subscribe("other:x", SubscribeOptions::default())
        .await
        .unwrap();
    let first = next_event(&mut forbidden).await;
    assert!(
        matches!(&first, Event::Error { code, retryable: false, .. } if code == "forbidden"),
        "{first:?}"
    );
    assert!(matches!(
        next_event(&mut forbidden).await,
        Event::Closed { .. }
    ));
    assert!(forbidden.next().await.is_none());
    server.stop().await;
}
