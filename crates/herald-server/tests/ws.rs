//! The WebSocket protocol on a real socket with a real client (tokio-tungstenite): publish and
//! ack, exactly-once resume (history merged with live), continuity, at-most-once gaps, slow
//! subscribers, filters, hints, heartbeats and the bad-frame policy.

mod common;

use std::time::Duration;

use common::{TestServer, WsClient, serials};
use herald_server::config::NamespaceConfig;
use serde_json::{Value, json};

#[tokio::test]
async fn publish_is_acked_and_delivered_with_its_sequence_fields() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    let reply = subscriber.subscribe(json!({"channel": "chat:a"})).await;
    assert_eq!(reply["guarantee"], "exactly-once");
    assert_eq!(reply["continuity"], "new");

    let mut publisher = WsClient::connect(&server.ws_url()).await;
    for n in 1..=3 {
        publisher
            .send(json!({"type": "publish", "req": n, "channel": "chat:a", "id": format!("m{n}"), "data": {"n": n}}))
            .await;
        let ack = publisher.recv_skipping_heartbeats().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["req"], n);
        assert_eq!(ack["serial"], n);
        assert_eq!(ack["duplicate"], false);
    }
    // The same id again is a duplicate with the original position, and is not delivered again.
    publisher
        .send(
            json!({"type": "publish", "req": 9, "channel": "chat:a", "id": "m2", "data": {"n": 2}}),
        )
        .await;
    let ack = publisher.recv_skipping_heartbeats().await;
    assert_eq!(
        (ack["serial"].as_u64(), ack["duplicate"].as_bool()),
        (Some(2), Some(true))
    );

    let frames = subscriber.read_messages(3).await;
    assert_eq!(serials(&frames), vec![1, 2, 3]);
    let first = &frames[0];
    assert_eq!(first["prev"], 0);
    assert_eq!(first["id"], "m1");
    assert_eq!(first["data"], json!({"n": 1}));
    assert_eq!(frames[2]["prev"], 2);
    assert_eq!(frames[1]["chain"].as_str().unwrap().len(), 64);
    server.stop().await;
}

#[tokio::test]
async fn resume_from_a_position_merges_history_and_live_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        // Small pages and a small ring, so replay, catch-up and live all take turns.
        config.realtime.catch_up_page_messages = 7;
        config.realtime.live_buffer_messages = 8;
    })
    .await;
    let acks = server.publish_numbers("chat:burst", 1, 300).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();

    // Publishing goes on while the subscriber replays from serial 100.
    let publisher = {
        let server_http = server.http.clone();
        let url = server.url("/v1/channels/chat:burst/messages");
        tokio::spawn(async move {
            for n in 301..=600u64 {
                let response = server_http
                    .post(&url)
                    .json(&json!({"data": {"n": n}}))
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success());
            }
        })
    };
    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    let reply = subscriber
        .subscribe(json!({"channel": "chat:burst", "from": format!("{epoch}:100")}))
        .await;
    assert_eq!(reply["continuity"], "held");
    assert_eq!(reply["after"], format!("{epoch}:100"));
    let frames = subscriber.read_messages(500).await;
    publisher.await.unwrap();
    assert_eq!(serials(&frames), (101..=600).collect::<Vec<_>>());
    // Data matches what was published at each serial.
    for frame in frames.iter().filter(|frame| frame["type"] == "message") {
        assert_eq!(frame["data"]["n"], frame["serial"]);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_position_older_than_retention_gets_continuity_lost_with_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.namespaces.insert(
            "small".into(),
            NamespaceConfig {
                retention_messages_max: Some(5),
                ..NamespaceConfig::default()
            },
        );
    })
    .await;
    let acks = server.publish_numbers("small:x", 1, 20).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    let reply = subscriber
        .subscribe(json!({"channel": "small:x", "from": format!("{epoch}:3")}))
        .await;
    assert_eq!(reply["continuity"], "lost");
    let notice = subscriber.recv_skipping_heartbeats().await;
    assert_eq!(notice["type"], "continuity_lost", "{notice}");
    assert_eq!(notice["reason"], "retention");
    // 16..=20 are retained: 4..=15 are missed, and delivery goes on from 16.
    assert_eq!(notice["from"], format!("{epoch}:4"));
    assert_eq!(notice["to"], format!("{epoch}:15"));
    let frames = subscriber.read_messages(5).await;
    assert_eq!(serials(&frames), (16..=20).collect::<Vec<_>>());

    // A position from another epoch is never honoured silently either.
    let mut other = WsClient::connect(&server.ws_url()).await;
    let reply = other
        .subscribe(json!({"channel": "small:x", "from": "OtherEpoch:7"}))
        .await;
    assert_eq!(reply["continuity"], "lost");
    let notice = other.recv_skipping_heartbeats().await;
    assert_eq!(notice["reason"], "epoch_changed", "{notice}");
    assert_eq!(notice["from"], "OtherEpoch:8");
    assert_eq!(notice["to"], format!("{epoch}:15"));
    assert_eq!(
        serials(&other.read_messages(5).await),
        (16..=20).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_carry_each_subscribed_channels_top() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.realtime.heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    let acks = server.publish_numbers("chat:quiet", 1, 4).await;
    let mut subscriber = WsClient::connect(&server.ws_url()).await;
    subscriber.subscribe(json!({"channel": "chat:quiet"})).await;
    subscriber.subscribe(json!({"channel": "chat:empty"})).await;
    let heartbeat: Value = loop {
        let frame = subscriber.recv().await;
        if frame["type"] == "heartbeat" {
            break frame;
        }
    };
    assert_eq!(heartbeat["channels"]["chat:quiet"], acks[3]["position"]);
    assert_eq!(heartbeat["channels"]["chat:empty"], Value::Null);
    server.stop().await;
}
