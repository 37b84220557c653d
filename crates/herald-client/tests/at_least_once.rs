//! At-least-once through the SDK against the real server: what an application meets when it
//! acks (or does not), loses its connection, restarts, or has its subscriber taken over.
//!
//! A new subscriber starts at the channel's top, so every test subscribes before publishing.

mod common;

use std::time::Duration;

use common::{TestServer, WAIT, next_event, options, ws_url};
use herald_client::{
    AckError, AckMode, AtLeastOnce, Client, ClientError, Delivery, Event, Publication, Subscription,
};
use herald_faults::FaultProxy;

async fn publish(client: &Client, channel: &str, count: u64) {
    for n in 1..=count {
        let publication = Publication::json(&serde_json::json!({ "n": n })).unwrap();
        tokio::time::timeout(WAIT, client.publish(channel, publication))
            .await
            .expect("publish in time")
            .expect("publish acked");
    }
}

/// Waits for `subscribed`, skipping nothing else.
async fn subscribed(subscription: &mut Subscription) {
    let event = next_event(subscription).await;
    assert!(
        matches!(event, Event::Subscribed { ref guarantee, .. } if guarantee == "at-least-once"),
        "expected subscribed, got {event:?}"
    );
}

/// The next `count` deliveries; `subscribed` and heartbeat notices in between are skipped, any
/// other event fails the test.
async fn deliveries(subscription: &mut Subscription, count: usize) -> Vec<Delivery> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        match next_event(subscription).await {
            Event::Delivery(delivery) => got.push(*delivery),
            Event::Subscribed { .. } => {}
            other => panic!("unexpected event after {} deliveries: {other:?}", got.len()),
        }
    }
    got
}

/// `(serial, delivery count)` of each.
fn counts(deliveries: &[Delivery]) -> Vec<(u64, u32)> {
    deliveries
        .iter()
        .map(|delivery| (delivery.message.serial().0, delivery.delivery))
        .collect()
}

/// Nothing but `subscribed` arrives for `quiet`.
async fn assert_quiet(subscription: &mut Subscription, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(event) = tokio::time::timeout_at(deadline, subscription.next()).await {
        match event {
            Some(Event::Subscribed { .. }) => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_dropped_connection_exactly_the_unacked_messages_come_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let proxy = FaultProxy::start(server.addr).await.unwrap();
    let client = Client::connect(options(ws_url(proxy.addr()))).unwrap();
    let publisher = Client::connect(options(server.url())).unwrap();
    // ack_wait far beyond the test: only the reconnect causes redeliveries.
    let worker = AtLeastOnce::new("worker-1").ack_wait_ms(60_000);
    let mut subscription = client.subscribe("jobs:a", worker.into()).await.unwrap();
    subscribed(&mut subscription).await;
    publish(&publisher, "jobs:a", 5).await;
    let first = deliveries(&mut subscription, 5).await;
    assert_eq!(counts(&first), vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
    // 1 and 2 cumulatively, 4 individually; 3 and 5 stay unacked.
    first[1].ack.ack_through_durable().await.unwrap();
    first[3].ack.ack_durable().await.unwrap();

    proxy.cut();
    client.wait_connected(2).await.unwrap();
    let again = deliveries(&mut subscription, 2).await;
    assert_eq!(counts(&again), vec![(3, 2), (5, 2)]);
    assert_eq!(again[0].message.id, first[2].message.id);
    assert!(again.iter().all(Delivery::is_redelivery));
    assert_quiet(&mut subscription, Duration::from_millis(500)).await;

    // A handle from before the reconnect still acks: 3 is not delivered again.
    first[2].ack.ack_durable().await.unwrap();
    proxy.cut();
    client.wait_connected(3).await.unwrap();
    assert_eq!(
        counts(&deliveries(&mut subscription, 1).await),
        vec![(5, 3)]
    );
    assert_quiet(&mut subscription, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_acks_what_the_application_took_and_manual_acks_only_what_it_acked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let publisher = Client::connect(options(server.url())).unwrap();
    let start = |id: &'static str, ack_mode: AckMode| {
        let url = server.url();
        async move {
            let client = Client::connect(options(url)).unwrap();
            let worker = AtLeastOnce::new(id).ack_mode(ack_mode).ack_wait_ms(60_000);
            let mut subscription = client.subscribe("jobs:b", worker.into()).await.unwrap();
            subscribed(&mut subscription).await;
            (client, subscription)
        }
    };
    let (auto_client, mut auto) = start("auto", AckMode::Auto).await;
    let (manual_client, mut manual) = start("manual", AckMode::Manual).await;
    publish(&publisher, "jobs:b", 3).await;
    assert_eq!(
        counts(&deliveries(&mut auto, 3).await),
        vec![(1, 1), (2, 1), (3, 1)]
    );
    // Asking for the next event acks the third delivery (the first two were acked the same way).
    assert_quiet(&mut auto, Duration::from_millis(300)).await;
    let taken = deliveries(&mut manual, 3).await;
    taken[0].ack().unwrap();
    taken[0].ack.ack_durable().await.unwrap();
    auto_client.close().await;
    manual_client.close().await;
    drop((auto, manual));

    // The same subscribers in new clients (new processes, as far as the server can tell).
    let (_auto_client, mut auto) = start("auto", AckMode::Auto).await;
    let (_manual_client, mut manual) = start("manual", AckMode::Manual).await;
    assert_eq!(
        counts(&deliveries(&mut manual, 2).await),
        vec![(2, 2), (3, 2)]
    );
    publish(&publisher, "jobs:b", 1).await;
    assert_eq!(
        counts(&deliveries(&mut auto, 1).await),
        vec![(4, 1)],
        "everything the auto subscriber took was acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_deliveries_come_again_after_ack_wait_behind_later_serials() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let client = Client::connect(options(server.url())).unwrap();
    let worker = AtLeastOnce::new("slow").ack_wait_ms(400);
    let mut subscription = client.subscribe("jobs:c", worker.into()).await.unwrap();
    subscribed(&mut subscription).await;
    publish(&client, "jobs:c", 2).await;
    let first = deliveries(&mut subscription, 2).await;
    first[1].ack().unwrap();
    publish(&client, "jobs:c", 1).await;
    // 1 was not acked: it comes again, not treated as a break or a duplicate to drop. Each
    // delivery is acked as it arrives (well within ack_wait), so nothing else comes again.
    let mut later = Vec::new();
    for _ in 0..2 {
        let delivery = deliveries(&mut subscription, 1).await.remove(0);
        delivery.ack.ack_durable().await.unwrap();
        later.push(delivery);
    }
    later.sort_by_key(|delivery| delivery.message.serial());
    assert_eq!(counts(&later), vec![(1, 2), (3, 1)]);
    assert_quiet(&mut subscription, Duration::from_millis(900)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_stops_the_first_client_which_does_not_take_the_subscriber_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let first = Client::connect(options(server.url())).unwrap();
    let mut first_subscription = first
        .subscribe("jobs:d", AtLeastOnce::new("one").into())
        .await
        .unwrap();
    subscribed(&mut first_subscription).await;
    publish(&first, "jobs:d", 1).await;
    let delivered = deliveries(&mut first_subscription, 1).await;

    let second = Client::connect(options(server.url())).unwrap();
    let mut second_subscription = second
        .subscribe("jobs:d", AtLeastOnce::new("one").into())
        .await
        .unwrap();
    assert_eq!(next_event(&mut first_subscription).await, Event::TakenOver);
    assert!(matches!(
        next_event(&mut first_subscription).await,
        Event::Closed { reason } if reason.contains("4004")
    ));
    assert!(
        tokio::time::timeout(WAIT, first_subscription.next())
            .await
            .unwrap()
            .is_none()
    );
    assert!(first.connection_state().stopped);
    assert!(matches!(
        first.publish_json("jobs:d", &1).await,
        Err(ClientError::TakenOver)
    ));
    assert_eq!(delivered[0].ack(), Err(AckError::TakenOver));

    // The second holds the subscriber for good: it gets the unacked message again, then new
    // ones, and is not closed by a reconnecting first client.
    subscribed(&mut second_subscription).await;
    assert_eq!(
        counts(&deliveries(&mut second_subscription, 1).await),
        vec![(1, 2)]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(&second, "jobs:d", 1).await;
    assert_eq!(
        counts(&deliveries(&mut second_subscription, 1).await),
        vec![(2, 1)]
    );
    assert!(!second.connection_state().stopped);
    assert_eq!(second.connection_state().connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_ttl_runs_out_unacked_is_an_expired_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let client = Client::connect(options(server.url())).unwrap();
    let worker = AtLeastOnce::new("ttl")
        .ack_wait_ms(1_500)
        .max_deliveries(10);
    let mut subscription = client.subscribe("jobs:e", worker.into()).await.unwrap();
    subscribed(&mut subscription).await;
    let publication = Publication::json(&1).unwrap().ttl(Duration::from_secs(1));
    let ack = client.publish("jobs:e", publication).await.unwrap();
    deliveries(&mut subscription, 1).await;
    let event = next_event(&mut subscription).await;
    let Event::Expired { from, to } = event else {
        panic!("expected expired, got {event:?}");
    };
    assert_eq!(
        (from.to_string(), to.to_string()),
        (ack.position.clone(), ack.position)
    );
    assert_quiet(&mut subscription, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn at_least_once_options_are_checked_before_anything_is_sent() {
    let client = Client::connect(options("ws://127.0.0.1:9/v1/ws".to_owned())).unwrap();
    for (options, expected) in [
        (
            herald_client::SubscribeOptions::at_least_once("has space"),
            "subscriber_id",
        ),
        (
            herald_client::SubscribeOptions {
                rewind: Some(3),
                ..herald_client::SubscribeOptions::at_least_once("w")
            },
            "rewind",
        ),
    ] {
        let Err(ClientError::InvalidInput(message)) = client.subscribe("jobs:f", options).await
        else {
            panic!("expected InvalidInput");
        };
        assert!(message.contains(expected), "{message}");
    }
}
