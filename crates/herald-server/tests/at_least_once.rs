//! At-least-once (durable) subscribers over a real WebSocket, as a user meets them: the server
//! holds the acked position across connections and restarts, delivers in order within the
//! window, redelivers what stays unacked (with counts), takes cumulative and individual acks,
//! dead-letters past `max_deliveries`, tells about expired messages, hands the subscriber to a
//! second connection (closing the first with 4004), reports and deletes subscribers over
//! HTTP, and removes idle ones.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, WsClient};
use herald_server::auth::Operation;
use herald_server::config::{ApiKeyConfig, CapabilityConfig};
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

#[tokio::test]
async fn a_message_past_max_deliveries_goes_to_the_dead_letter_channel_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    let options = json!({"ack_wait_ms": 100, "max_deliveries": 2});
    subscribe(&mut client, "jobs:dl", "w", options).await;
    let acks = server.publish_numbers("jobs:dl", 1, 2).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let (delivered, _) = deliveries(&mut client, 2).await;
    assert_eq!(delivered, vec![(1, 1), (2, 1)]);
    // Serial 2 is acked; serial 1 never is.
    ack(&mut client, "jobs:dl", "position", &position(&epoch, 2)).await;
    let (delivered, _) = deliveries(&mut client, 1).await;
    assert_eq!(delivered, vec![(1, 2)]);
    let rest = drain(&mut client).await;
    assert!(
        rest.iter().all(|frame| frame["type"] != "message"),
        "no third delivery: {rest:?}"
    );
    let dead = server
        .http
        .get(server.url("/v1/channels/jobs:dl.dead/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(dead.status().as_u16(), 200);
    let dead: Value = dead.json().await.unwrap();
    let messages = dead["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{dead}");
    let letter = &messages[0];
    assert_eq!(letter["data"], json!({"n": 1}));
    let headers = &letter["headers"];
    assert_eq!(headers["herald-dead-letter-reason"], "max_deliveries");
    assert_eq!(
        headers["herald-original-position"],
        json!(position(&epoch, 1))
    );
    assert_eq!(headers["herald-subscriber-id"], "w");
    assert_eq!(headers["herald-deliveries"], "2");
    // The position moved past the dead letter: a new connection gets nothing again.
    drop(client);
    let mut again = WsClient::connect(&server.ws_url()).await;
    let reply = subscribe(&mut again, "jobs:dl", "w", json!({})).await;
    assert_eq!(reply["after"], json!(position(&epoch, 2)), "{reply}");
    server.stop().await;
}

#[tokio::test]
async fn a_message_whose_ttl_runs_out_unacked_is_reported_expired_not_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    subscribe(&mut client, "jobs:ttl", "w", json!({"ack_wait_ms": 1500})).await;
    let ack_body = server
        .publish("jobs:ttl", json!({"data": {"n": 1}, "ttl": "1s"}))
        .await;
    let at = ack_body["position"].as_str().unwrap().to_owned();
    let (delivered, _) = deliveries(&mut client, 1).await;
    assert_eq!(delivered, vec![(1, 1)]);
    let mut expired = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while expired.is_none() && Instant::now() < deadline {
        let frame = client.recv_skipping_heartbeats().await;
        assert_ne!(
            frame["type"], "message",
            "an expired message is not redelivered"
        );
        if frame["type"] == "expired" {
            expired = Some(frame);
        }
    }
    let expired = expired.expect("an expired notice");
    assert_eq!(expired["channel"], "jobs:ttl");
    assert_eq!(expired["from"], json!(at));
    assert_eq!(expired["to"], json!(at));
    server.stop().await;
}

#[tokio::test]
async fn a_second_connection_takes_the_subscriber_over_and_the_first_is_closed_4004() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut first = WsClient::connect(&server.ws_url()).await;
    subscribe(&mut first, "jobs:t", "w", json!({})).await;
    let acks = server.publish_numbers("jobs:t", 1, 4).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    deliveries(&mut first, 4).await;
    ack(&mut first, "jobs:t", "through", &position(&epoch, 2)).await;

    let mut second = WsClient::connect(&server.ws_url()).await;
    let reply = subscribe(&mut second, "jobs:t", "w", json!({})).await;
    assert_eq!(reply["continuity"], "held");
    assert_eq!(reply["after"], json!(position(&epoch, 2)), "{reply}");
    let closed = loop {
        match first.recv_message().await {
            Ok(frame) => assert_ne!(frame["type"], "message", "{frame}"),
            Err(close) => break close,
        }
    };
    assert_eq!(closed.map(|(code, _)| code), Some(4004));
    let (delivered, _) = deliveries(&mut second, 2).await;
    assert_eq!(delivered, vec![(3, 2), (4, 2)]);
    server.publish_numbers("jobs:t", 5, 1).await;
    let (delivered, _) = deliveries(&mut second, 1).await;
    assert_eq!(
        delivered,
        vec![(5, 1)],
        "the new holder follows the channel"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_position_and_counts_survive_a_restart_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let addr = server.addr;
    let mut client = WsClient::connect(&server.ws_url()).await;
    subscribe(&mut client, "jobs:r", "w", json!({})).await;
    let acks = server.publish_numbers("jobs:r", 1, 6).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    deliveries(&mut client, 6).await;
    ack(&mut client, "jobs:r", "through", &position(&epoch, 2)).await;
    ack(&mut client, "jobs:r", "position", &position(&epoch, 5)).await;
    drop(client);
    server.stop().await;

    let server = TestServer::start_on(dir.path(), addr, |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    let reply = subscribe(&mut client, "jobs:r", "w", json!({})).await;
    assert_eq!(reply["after"], json!(position(&epoch, 2)), "{reply}");
    let (delivered, _) = deliveries(&mut client, 3).await;
    assert_eq!(delivered, vec![(3, 2), (4, 2), (6, 2)], "5 was acked");
    server.stop().await;
}

#[tokio::test]
async fn bad_acks_and_bad_durable_subscribes_get_their_codes_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    let refusals = [
        (
            json!({"channel": "jobs:x", "guarantee": "at-least-once"}),
            "invalid_request",
        ),
        (
            json!({"channel": "jobs:x", "guarantee": "at-least-once", "subscriber_id": "has space"}),
            "invalid_request",
        ),
        (
            json!({"channel": "jobs:x", "guarantee": "at-least-once", "subscriber_id": "w", "from": "E:1"}),
            "invalid_request",
        ),
        (
            json!({"channel": "jobs:x", "guarantee": "at-least-once", "subscriber_id": "w", "options": {"inflight_max": 0}}),
            "invalid_request",
        ),
        (
            json!({"channel": "jobs:x", "guarantee": "at-least-once", "subscriber_id": "w", "options": {"bogus": 1}}),
            "invalid_frame",
        ),
        (
            json!({"channel": "jobs:x", "subscriber_id": "w"}),
            "invalid_request",
        ),
        (
            json!({"channel": "jobs:x", "guarantee": "at-least-once", "subscriber_id": "webhook.audit"}),
            "invalid_request",
        ),
    ];
    for (mut frame, code) in refusals {
        let req = client.req();
        frame["type"] = json!("subscribe");
        frame["req"] = json!(req);
        client.send(frame.clone()).await;
        let reply = client.recv_skipping_heartbeats().await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        assert_eq!(reply["code"], code, "{frame}: {reply}");
    }
    // An ack without a durable subscription.
    let reply = ack(&mut client, "jobs:x", "through", "E:1").await;
    assert_eq!(reply["code"], "not_subscribed", "{reply}");

    subscribe(&mut client, "jobs:x", "w", json!({})).await;
    let acks = server.publish_numbers("jobs:x", 1, 2).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    deliveries(&mut client, 2).await;
    for (kind, at, code) in [
        ("through", position(&epoch, 3), "invalid_ack"),
        ("position", position(&epoch, 9), "invalid_ack"),
        ("through", "other:1".to_owned(), "invalid_ack"),
        ("through", "not a position".to_owned(), "invalid_position"),
    ] {
        let reply = ack(&mut client, "jobs:x", kind, &at).await;
        assert_eq!(reply["type"], "error", "{kind} {at}: {reply}");
        assert_eq!(reply["code"], code, "{kind} {at}: {reply}");
    }
    let req = client.req();
    client
        .send(json!({"type": "ack", "req": req, "channel": "jobs:x", "through": position(&epoch, 1), "position": position(&epoch, 2)}))
        .await;
    let reply = client.recv_skipping_heartbeats().await;
    assert_eq!(reply["code"], "invalid_frame", "{reply}");
    // Nothing was acked by any of that.
    drop(client);
    let body: Value = server
        .http
        .get(server.url("/v1/channels/jobs:x/subscribers/w"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["acked"], json!(position(&epoch, 0)), "{body}");
    assert_eq!(body["pending"], 2, "{body}");
    server.stop().await;
}

fn api_key(name: &str, key: &str, operations: &[Operation]) -> ApiKeyConfig {
    ApiKeyConfig {
        name: name.into(),
        key: key.into(),
        capabilities: vec![CapabilityConfig {
            namespaces: vec!["jobs".into()],
            operations: operations.to_vec(),
        }],
    }
}

const READER_KEY: &str = "durable-reader-key-0123456";
const WORKER_KEY: &str = "durable-worker-key-0123456";
const ADMIN_KEY: &str = "durable-admin-key-01234567";

async fn get_subscriber(server: &TestServer, path: &str, key: &str) -> (u16, Value) {
    let response = server
        .http
        .get(server.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn subscribers_are_reported_and_deleted_over_http_with_the_history_capability() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.dev = false;
        config.api_keys = vec![
            api_key("reader", READER_KEY, &[Operation::History]),
            api_key(
                "worker",
                WORKER_KEY,
                &[Operation::Subscribe, Operation::Publish],
            ),
            api_key("admin", ADMIN_KEY, &[Operation::Admin]),
        ];
    })
    .await;
    let mut client = WsClient::open(&server.ws_url()).await;
    client
        .send(json!({"type": "connect", "protocol": 1, "auth": {"key": WORKER_KEY}}))
        .await;
    assert_eq!(client.recv().await["type"], "connected");
    subscribe(&mut client, "jobs:i", "w", json!({"inflight_max": 10})).await;
    let mut epoch = String::new();
    for n in 1..=5 {
        let response = server
            .http
            .post(server.url("/v1/channels/jobs:i/messages"))
            .bearer_auth(WORKER_KEY)
            .json(&json!({"data": {"n": n}}))
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        epoch = body["epoch"].as_str().unwrap().to_owned();
    }
    deliveries(&mut client, 5).await;
    ack(&mut client, "jobs:i", "through", &position(&epoch, 2)).await;
    ack(&mut client, "jobs:i", "position", &position(&epoch, 4)).await;

    let path = "/v1/channels/jobs:i/subscribers/w";
    let (status, body) = get_subscriber(&server, path, READER_KEY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acked"], json!(position(&epoch, 2)));
    assert_eq!(body["acked_above"], json!([4]));
    assert_eq!(body["lag"], 3, "serials 3..=5 after the acked position");
    assert_eq!(body["pending"], 2, "3 and 5 are not done");
    assert_eq!(
        body["inflight"],
        json!([{"serial": 3, "deliveries": 1}, {"serial": 5, "deliveries": 1}])
    );
    assert_eq!(body["top"], json!(position(&epoch, 5)));
    assert_eq!(body["connected"], true);
    assert_eq!(body["options"]["inflight_max"], 10);

    let (status, body) = get_subscriber(&server, path, WORKER_KEY).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    let (status, body) = get_subscriber(
        &server,
        "/v1/channels/jobs:i/subscribers/nobody",
        READER_KEY,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("subscriber_not_found"))
    );
    let (status, body) = get_subscriber(
        &server,
        "/v1/channels/jobs:i/subscribers/bad%20id",
        READER_KEY,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("invalid_request"))
    );

    let delete = |key: &'static str| server.http.delete(server.url(path)).bearer_auth(key).send();
    assert_eq!(delete(WORKER_KEY).await.unwrap().status().as_u16(), 403);
    assert_eq!(delete(ADMIN_KEY).await.unwrap().status().as_u16(), 204);
    let closed = loop {
        match client.recv_message().await {
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert_eq!(
        closed.map(|(code, _)| code),
        Some(4004),
        "the holder is closed"
    );
    let (status, _) = get_subscriber(&server, path, READER_KEY).await;
    assert_eq!(status, 404, "deleted durably");
    assert_eq!(delete(ADMIN_KEY).await.unwrap().status().as_u16(), 404);
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_idle_past_its_expiry_is_removed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.durable.sweep_interval = Duration::from_millis(50);
    })
    .await;
    let mut idle = WsClient::connect(&server.ws_url()).await;
    subscribe(
        &mut idle,
        "jobs:e",
        "gone",
        json!({"expires_after_ms": 300}),
    )
    .await;
    let mut connected = WsClient::connect(&server.ws_url()).await;
    subscribe(
        &mut connected,
        "jobs:e",
        "here",
        json!({"expires_after_ms": 300}),
    )
    .await;
    server.publish_numbers("jobs:e", 1, 1).await;
    deliveries(&mut idle, 1).await;
    deliveries(&mut connected, 1).await;
    drop(idle);
    let path = "/v1/channels/jobs:e/subscribers/gone";
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = server
            .http
            .get(server.url(path))
            .send()
            .await
            .unwrap()
            .status();
        if status.as_u16() == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "still there after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let here = server
        .http
        .get(server.url("/v1/channels/jobs:e/subscribers/here"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        here.status().as_u16(),
        200,
        "a held subscriber is never idle"
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
    assert!(
        metrics.contains("herald_durable_subscribers_expired_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_durable_subscriptions 1\n"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_created_on_an_empty_channel_gets_its_first_messages_after_leaving() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let mut client = WsClient::connect(&server.ws_url()).await;
    let reply = subscribe(&mut client, "jobs:empty", "w", json!({})).await;
    assert_eq!(reply["continuity"], "new");
    assert_eq!(reply.get("after"), None, "{reply}");
    drop(client);
    let acks = server.publish_numbers("jobs:empty", 1, 3).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let (status, body) = {
        let response = server
            .http
            .get(server.url("/v1/channels/jobs:empty/subscribers/w"))
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    assert_eq!(
        status, 200,
        "the subscriber is durable from its subscribe: {body}"
    );
    assert_eq!(body["acked"], Value::Null, "not placed yet: {body}");
    assert_eq!(body["pending"], 3, "{body}");

    let mut again = WsClient::connect(&server.ws_url()).await;
    let reply = subscribe(&mut again, "jobs:empty", "w", json!({})).await;
    assert_eq!(reply["continuity"], "held", "{reply}");
    assert_eq!(reply["after"], json!(position(&epoch, 0)), "{reply}");
    let (delivered, _) = deliveries(&mut again, 3).await;
    assert_eq!(delivered, vec![(1, 1), (2, 1), (3, 1)]);
    server.stop().await;
}
