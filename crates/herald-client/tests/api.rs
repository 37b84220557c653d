//! The client API against a real server: binary and JSON data come back byte for byte with
//! their chain verified, a dropped subscription can be replaced, a second subscription to the
//! same channel is refused, and a closed client says so.

mod common;

use common::{TestServer, WAIT, collect_messages, options, subscribed};
use herald_client::{Client, ClientError, Data, Event, Publication, SubscribeOptions};

const CHANNEL: &str = "files:a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_json_data_round_trip_with_their_chain_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let client = Client::connect(options(server.url())).unwrap();
    let bytes: Vec<u8> = (0..=255).collect();
    client
        .publish(CHANNEL, Publication::binary(&bytes).name("blob"))
        .await
        .unwrap();
    // Whitespace is not significant and is removed by the server; key order and number
    // spelling are kept.
    let json = Publication::json_text("{ \"b\": 1.50, \"a\": [1e3] }")
        .unwrap()
        .header("kind", "doc")
        .id("doc-1");
    let ack = client.publish(CHANNEL, json.clone()).await.unwrap();
    assert_eq!((ack.serial, ack.duplicate), (2, false));
    let again = client.publish(CHANNEL, json).await.unwrap();
    assert_eq!(
        (again.serial, again.duplicate),
        (2, true),
        "same id, same serial"
    );

    let mut subscription = client
        .subscribe(CHANNEL, SubscribeOptions::from_oldest())
        .await
        .unwrap();
    subscribed(&mut subscription).await;
    // Both arrive without a `Broken` event: the chain verified from genesis, over the
    // decoded binary bytes and over the JSON text as stored.
    let messages = collect_messages(&mut subscription, 2).await;
    assert_eq!(messages[0].data, Data::Binary(bytes.into()));
    assert_eq!(messages[0].name.as_deref(), Some("blob"));
    assert_eq!(
        messages[1].data,
        Data::Json("{\"b\":1.50,\"a\":[1e3]}".as_bytes().to_vec().into())
    );
    assert_eq!(messages[1].headers["kind"], "doc");
    assert_eq!(messages[1].id, "doc-1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_per_channel_and_dropping_it_frees_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let client = Client::connect(options(server.url())).unwrap();
    let mut first = client
        .subscribe(CHANNEL, SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut first).await;
    let second = client.subscribe(CHANNEL, SubscribeOptions::default()).await;
    assert!(matches!(second, Err(ClientError::AlreadySubscribed(_))));

    drop(first);
    let mut replacement = client
        .subscribe(CHANNEL, SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut replacement).await;
    client.publish_json(CHANNEL, &1).await.unwrap();
    let messages = collect_messages(&mut replacement, 1).await;
    assert_eq!(messages[0].json::<i64>().unwrap(), 1);

    client.close().await;
    let closed = tokio::time::timeout(WAIT, replacement.next())
        .await
        .unwrap();
    assert!(
        matches!(closed, Some(Event::Closed { .. }) | None),
        "{closed:?}"
    );
    let refused = client.publish_json(CHANNEL, &2).await;
    assert!(matches!(refused, Err(ClientError::Closed)), "{refused:?}");
    server.stop().await;
}

/// A rough figure, not a gate: `cargo test -p herald-client --release --test api -- --ignored
/// --nocapture`. Publishes through one client (256 in flight) while another client receives
/// exactly-once, and checks every message arrived once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --release"]
async fn throughput_of_one_publisher_and_one_subscriber() {
    const COUNT: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let subscriber = Client::connect(options(server.url())).unwrap();
    let publisher = Client::connect(options(server.url())).unwrap();
    let mut subscription = subscriber
        .subscribe("bench:a", SubscribeOptions::default())
        .await
        .unwrap();
    subscribed(&mut subscription).await;
    let started = std::time::Instant::now();
    let publishing = tokio::spawn(async move {
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..COUNT {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let publisher = publisher.clone();
            tasks.spawn(async move {
                publisher.publish_json("bench:a", &n).await.unwrap();
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
        started.elapsed()
    });
    let mut next = 1;
    while next <= COUNT {
        match tokio::time::timeout(WAIT, subscription.next())
            .await
            .unwrap()
        {
            Some(Event::Message(message)) => {
                assert_eq!(message.serial().0, next);
                next += 1;
            }
            Some(Event::Stalled { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    let delivered = started.elapsed();
    let published = publishing.await.unwrap();
    eprintln!(
        "{COUNT} messages: published (acked) in {published:?} = {:.0}/s, delivered in {delivered:?} = {:.0}/s",
        COUNT as f64 / published.as_secs_f64(),
        COUNT as f64 / delivered.as_secs_f64()
    );
    server.stop().await;
}
