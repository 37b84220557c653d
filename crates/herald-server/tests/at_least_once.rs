//! At-least-once (durable) subscribers over a real WebSocket, as a user meets them: the server
//! holds the acked position across connections and restarts, delivers in order within the
//! window, redelivers what stays unacked (with counts), takes cumulative and individual acks,
//! dead-letters past `max_deliveries`, tells about expired messages, hands the subscriber to a
//! second connection (closing the first with 4004), reports and deletes subscribers over
//! HTTP, and removes idle ones.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, WsClient};
use serde_json::{Value, json};

const QUIET: Duration = Duration::from_millis(300);

/// Subscribes at-least-once as `id` with `options`; returns the `subscribed` reply.
async fn subscribe(client: &mut WsClient, channel: &str, id: &str, options: Value) -> Value {
    client
        .subscribe(json!({
            "channel": channel,
            "guarantee": "at-least-once",
            "subscriber_id": id,
            "options": options,
        }))
        .await
}

/// The next `count` deliveries as (serial, delivery count); other frames are returned apart.
async fn deliveries(client: &mut WsClient, count: usize) -> (Vec<(u64, u64)>, Vec<Value>) {
    let mut delivered = Vec::new();
    let mut others = Vec::new();
    while delivered.len() < count {
        let frame = client.recv_skipping_heartbeats().await;
        if frame["type"] == "message" {
            delivered.push((
                frame["serial"].as_u64().unwrap(),
                frame["delivery"].as_u64().expect("a delivery count"),
            ));
        } else {
            others.push(frame);
        }
    }
    (delivered, others)
}

/// Frames (no heartbeats) until the connection stays quiet for [`QUIET`].
async fn drain(client: &mut WsClient) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(QUIET, client.recv_skipping_heartbeats()).await {
            Ok(frame) => frames.push(frame),
            Err(_) => return frames,
        }
    }
}

async fn ack(client: &mut WsClient, channel: &str, kind: &str, position: &str) -> Value {
    let req = client.req();
    client
        .send(json!({"type": "ack", "req": req, "channel": channel, kind: position}))
        .await;
    let reply = client.recv_skipping_heartbeats().await;
    assert_eq!(reply["req"], req, "{reply}");
    reply
}

fn position(epoch: &str, serial: u64) -> String {
    format!("{epoch}:{serial}")
}

#[tokio::test]
async fn the_server_holds_the_acked_position_across_connections_and_redelivers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    let reply = subscribe(&mut client, "jobs:a", "worker-1", json!({})).await;
    assert_eq!(reply["guarantee"], "at-least-once");
    assert_eq!(reply["continuity"], "new");
    let acks = server.publish_numbers("jobs:a", 1, 5).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let (delivered, _) = deliveries(&mut client, 5).await;
    assert_eq!(delivered, vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
    let reply = ack(&mut client, "jobs:a", "through", &position(&epoch, 3)).await;
    assert_eq!(reply["type"], "acked", "{reply}");
    drop(client);

    let mut again = WsClient::connect(&server.ws_url()).await;
    let reply = subscribe(&mut again, "jobs:a", "worker-1", json!({})).await;
    assert_eq!(reply["continuity"], "held", "{reply}");
    assert_eq!(reply["after"], json!(position(&epoch, 3)));
    let (delivered, _) = deliveries(&mut again, 2).await;
    assert_eq!(delivered, vec![(4, 2), (5, 2)], "only the unacked, counted");
    server.stop().await;
}

#[tokio::test]
async fn unacked_deliveries_come_again_after_ack_wait_and_individual_acks_hold() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    subscribe(&mut client, "jobs:b", "w", json!({"ack_wait_ms": 300})).await;
    let acks = server.publish_numbers("jobs:b", 1, 3).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let (delivered, _) = deliveries(&mut client, 3).await;
    assert_eq!(delivered, vec![(1, 1), (2, 1), (3, 1)]);
    let reply = ack(&mut client, "jobs:b", "position", &position(&epoch, 2)).await;
    assert_eq!(reply["type"], "acked", "{reply}");
    let started = Instant::now();
    let (delivered, _) = deliveries(&mut client, 2).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(delivered, vec![(1, 2), (3, 2)], "serial 2 was acked");
    ack(&mut client, "jobs:b", "through", &position(&epoch, 3)).await;
    assert!(
        drain(&mut client)
            .await
            .iter()
            .all(|frame| frame["type"] != "message"),
        "nothing more once everything is acked"
    );
    server.stop().await;
}
