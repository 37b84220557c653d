//! The SQLite example end to end, with a real server and a real SQLite file: a consumer dies
//! between receiving a message and committing it, a new one starts from the position stored in
//! SQLite, and every message's effect is applied exactly once.

mod common;

#[allow(dead_code)]
#[path = "../examples/sqlite_exactly_once.rs"]
mod example;

use common::{TestServer, WAIT, options};
use example::{Ledger, Step, consume};
use herald_client::{Client, Publication};

const CHANNEL: &str = "payments:demo";

async fn publish_payments(client: &Client, amounts: std::ops::RangeInclusive<i64>) {
    for amount in amounts {
        let publication = Publication::json(&serde_json::json!({ "amount": amount })).unwrap();
        tokio::time::timeout(WAIT, client.publish(CHANNEL, publication))
            .await
            .expect("publish in time")
            .expect("publish acked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_stream_resumes_from_sqlite_and_applies_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start(&dir.path().join("herald"), "127.0.0.1:0".parse().unwrap()).await;
    let database = dir.path().join("ledger.db");
    let publisher = Client::connect(options(server.url())).unwrap();
    publish_payments(&publisher, 1..=120).await;

    // The first consumer dies at serial 80: received, never committed.
    let ledger = Ledger::open(&database).unwrap();
    let applied = tokio::time::timeout(
        WAIT,
        consume(options(server.url()), CHANNEL, &ledger, |message| {
            if message.serial().0 == 80 {
                Step::StopBefore
            } else {
                Step::Apply
            }
        }),
    )
    .await
    .expect("first consumer in time")
    .expect("first consumer runs");
    assert_eq!(applied, 79);
    drop(ledger);

    // More payments arrive while a new process starts from the SQLite file.
    let more = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publish_payments(&publisher, 121..=200).await })
    };
    let ledger = Ledger::open(&database).unwrap();
    let applied = tokio::time::timeout(
        WAIT,
        consume(options(server.url()), CHANNEL, &ledger, |message| {
            if message.serial().0 == 200 {
                Step::ApplyThenStop
            } else {
                Step::Apply
            }
        }),
    )
    .await
    .expect("second consumer in time")
    .expect("second consumer runs");
    more.await.unwrap();
    assert_eq!(applied, 121, "serials 80..=200");

    let counts = ledger.applied(CHANNEL).unwrap();
    let expected: Vec<(u64, u64)> = (1..=200).map(|serial| (serial, 1)).collect();
    assert_eq!(counts, expected, "every serial applied exactly once");
    assert_eq!(ledger.balance().unwrap(), (1..=200).sum::<i64>());
    server.stop().await;
}
