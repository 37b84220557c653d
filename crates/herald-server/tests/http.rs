//! The HTTP API on a real socket (127.0.0.1, port 0) with a real client (reqwest): publish,
//! sync, paging, idempotency, continuity, auth and every kind of bad input.

use std::sync::Arc;
use std::time::Duration;

use herald_log::{LogStore, MemoryStore, SystemClock};
use herald_server::auth::{Authenticator, Operation};
use herald_server::config::{
    ApiKeyConfig, CapabilityConfig, Config, NamespaceConfig, StorageBackend,
};
use herald_server::{Server, ServerError};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const ADMIN: &str = "test-admin-key-0123456789";
const CHAT_PUBLISHER: &str = "test-chat-publisher-0123";
const READER: &str = "test-reader-key-01234567";
const PLAIN: &str = "test-plain-key-012345678";

fn api_key(name: &str, key: &str, namespaces: &[&str], operations: &[Operation]) -> ApiKeyConfig {
    ApiKeyConfig {
        name: name.into(),
        key: key.into(),
        capabilities: vec![CapabilityConfig {
            namespaces: namespaces.iter().map(|ns| ns.to_string()).collect(),
            operations: operations.to_vec(),
        }],
    }
}

struct TestServer {
    base: String,
    http: reqwest::Client,
    key: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    admin_key: Option<herald_server::AdminKey>,
}

impl TestServer {
    async fn start(dir: &std::path::Path, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            data_dir: dir.to_owned(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        // The default MQTT address 127.0.0.1:1883 is shared by every test: off here.
        config.mqtt.enabled = false;
        config.storage.backend = StorageBackend::Memory;
        config.api_keys = vec![
            api_key("admin", ADMIN, &["*"], &[Operation::Admin]),
            api_key("chat", CHAT_PUBLISHER, &["chat"], &[Operation::Publish]),
            api_key("reader", READER, &["*"], &[Operation::History]),
            api_key(
                "plain",
                PLAIN,
                &["default"],
                &[Operation::Publish, Operation::History],
            ),
        ];
        config.namespaces.insert(
            "small".into(),
            NamespaceConfig {
                retention_messages_max: Some(2),
                ..NamespaceConfig::default()
            },
        );
        adjust(&mut config);
        let server = Server::bind(config).await.expect("server starts");
        let base = format!("http://{}", server.local_addr());
        let admin_key = server.admin_key().cloned();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        TestServer {
            base,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            key: Some(ADMIN.into()),
            shutdown: Some(shutdown),
            task: Some(task),
            admin_key,
        }
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder, key: Option<&str>) -> (u16, Value) {
        let request = match key.or(self.key.as_deref()) {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request.send().await.expect("request goes through");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
        (status, body)
    }

    async fn post_raw(&self, channel_path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let request = self
            .http
            .post(self.url(&format!("/v1/channels/{channel_path}/messages")))
            .body(body);
        self.send(request, None).await
    }

    async fn publish(&self, channel: &str, body: Value) -> (u16, Value) {
        self.post_raw(channel, body.to_string()).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path)), None).await
    }

    async fn get_as(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let request = self.http.get(self.url(path));
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn read(&self, channel: &str, query: &str) -> (u16, Value) {
        self.get(&format!("/v1/channels/{channel}/messages{query}"))
            .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

fn serials(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["serial"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn publish_single_and_batch_then_read_back_from_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.storage.backend = StorageBackend::Embedded;
    })
    .await;
    let (status, ack) = server
        .publish(
            "chat:room-1",
            json!({"id": "m-1", "name": "greeting", "headers": {"lang": "en"},
                   "data": {"text": "hi", "n": 1.50}, "ttl": "1h"}),
        )
        .await;
    assert_eq!(status, 201, "{ack}");
    assert_eq!(ack["id"], "m-1");
    assert_eq!(ack["serial"], 1);
    assert_eq!(ack["duplicate"], false);
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    assert_eq!(ack["position"], format!("{epoch}:1"));

    let (status, acks) = server
        .publish(
            "chat:room-1",
            json!({"messages": [
                {"data": "two"},
                {"id": "m-3", "data": null},
                {"data": "aGVsbG8=", "encoding": "base64", "ttl": 60},
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{acks}");
    let results = acks["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["serial"], index as u64 + 2);
        assert_eq!(result["epoch"], epoch.as_str());
    }
    // A generated id is returned and is what the message is stored under.
    let generated = results[0]["id"].as_str().unwrap();
    assert_eq!(generated.len(), 22);

    let (status, page) = server.read("chat:room-1", "").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(serials(&page), vec![1, 2, 3, 4]);
    assert_eq!(page["top"], format!("{epoch}:4"));
    assert_eq!(page["next"], format!("{epoch}:4"));
    assert_eq!(page["more"], false);
    let messages = page["messages"].as_array().unwrap();
    let first = &messages[0];
    assert_eq!(first["channel"], "chat:room-1");
    assert_eq!(first["prev"], 0);
    assert_eq!(first["name"], "greeting");
    assert_eq!(first["headers"], json!({"lang": "en"}));
    assert_eq!(first["data"], json!({"text": "hi", "n": 1.50}));
    assert_eq!(first["chain"].as_str().unwrap().len(), 64);
    assert!(first["expires_at"].as_u64().unwrap() > first["time"].as_u64().unwrap());
    assert_eq!(messages[1]["id"], generated);
    assert_eq!(messages[1]["data"], "two");
    assert_eq!(messages[2]["data"], Value::Null);
    assert_eq!(messages[3]["data"], "aGVsbG8=");
    assert_eq!(messages[3]["encoding"], "base64");
    assert_eq!(messages[3]["prev"], 3);

    // The sync cursor continues where the page ended.
    let (_, rest) = server
        .read("chat:room-1", &format!("?after={epoch}:2&limit=1"))
        .await;
    assert_eq!(serials(&rest), vec![3]);
    assert_eq!(rest["next"], format!("{epoch}:3"));
    assert_eq!(rest["more"], true);
    server.stop().await;
}

#[tokio::test]
async fn retries_are_idempotent_and_reused_ids_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let body = json!({"id": "order-7", "data": {"total": 12}});
    let (status, first) = server.publish("orders", body.clone()).await;
    assert_eq!(status, 201);
    let (status, again) = server.publish("orders", body.clone()).await;
    assert_eq!(status, 200, "an all-duplicate publish answers 200");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["position"], first["position"]);

    // Whitespace differences are not content differences.
    let (status, spaced) = server
        .post_raw(
            "orders",
            r#"{ "id" : "order-7", "data" : { "total" : 12 } }"#,
        )
        .await;
    assert_eq!((status, spaced["duplicate"].clone()), (200, json!(true)));

    // A batch mixing a retry and a new message: 201, the retry flagged.
    let (status, batch) = server
        .publish(
            "orders",
            json!({"messages": [body.clone(), {"id": "order-8", "data": 1}]}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(batch["results"][0]["duplicate"], true);
    assert_eq!(batch["results"][0]["serial"], 1);
    assert_eq!(batch["results"][1]["duplicate"], false);
    assert_eq!(batch["results"][1]["serial"], 2);

    let (status, conflict) = server
        .publish("orders", json!({"id": "order-7", "data": {"total": 13}}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(error_code(&conflict), "id_conflict");
    assert_eq!(conflict["error"]["id"], "order-7");
    assert_eq!(conflict["error"]["position"], first["position"]);
    assert_eq!(conflict["error"]["retryable"], false);

    // A batch with a conflict stores none of its other messages.
    let (status, conflict) = server
        .publish(
            "orders",
            json!({"messages": [{"id": "order-9", "data": 1}, {"id": "order-7", "data": 0}]}),
        )
        .await;
    assert_eq!((status, error_code(&conflict)), (409, "id_conflict"));

    let (_, page) = server.read("orders", "").await;
    assert_eq!(serials(&page), vec![1, 2]);
    let (status, _) = server
        .get("/v1/channels/orders/messages/by-id/order-9")
        .await;
    assert_eq!(status, 404);

    // /metrics counts what happened above: 2 stored, 3 recognised retries, 2 conflicts.
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let metrics = response.text().await.unwrap();
    for expected in [
        "herald_published_messages_total{result=\"stored\"} 2\n",
        "herald_published_messages_total{result=\"duplicate\"} 3\n",
        "herald_errors_total{code=\"id_conflict\"} 2\n",
        "herald_errors_total{code=\"message_not_found\"} 1\n",
        "herald_http_requests_total{route=\"/v1/channels/{channel}/messages\",method=\"POST\",status=\"409\"} 2\n",
        "herald_store_messages_written_total 2\n",
        "herald_publish_ack_seconds_count 4\n",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_stable_code_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let channel = "chat:bad";
    let big = "x".repeat(64 * 1024 + 1);
    let id_129 = "i".repeat(129);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed JSON", r#"{"data": "#.into(), 400, "invalid_json"),
        ("not an object", "[1, 2]".into(), 400, "invalid_json"),
        ("empty body", String::new(), 400, "invalid_json"),
        ("missing data", r#"{"id": "a"}"#.into(), 400, "invalid_json"),
        (
            "name not a string",
            r#"{"data": 1, "name": 5}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "header not a string",
            r#"{"data": 1, "headers": {"a": 1}}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "unknown field",
            r#"{"data": 1, "ttl_ms": 5}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "unknown encoding",
            r#"{"data": "x", "encoding": "hex"}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "messages not a list",
            r#"{"messages": {}}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "batch with single fields",
            r#"{"messages": [{"data": 1}], "data": 2}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "batch message missing data",
            r#"{"messages": [{"data": 1}, {"id": "b"}]}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "ttl wrong type",
            r#"{"data": 1, "ttl": true}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "empty batch",
            r#"{"messages": []}"#.into(),
            413,
            "batch_too_large",
        ),
        (
            "message over 64 KiB",
            json!({"data": big}).to_string(),
            413,
            "message_too_large",
        ),
        (
            "batch over message count",
            json!({"messages": vec![json!({"data": 1}); 101]}).to_string(),
            413,
            "batch_too_large",
        ),
        (
            "batch over bytes",
            json!({"messages": vec![json!({"data": "y".repeat(64_000)}); 17]}).to_string(),
            413,
            "batch_too_large",
        ),
        (
            "ttl below minimum",
            r#"{"data": 1, "ttl": 0.5}"#.into(),
            400,
            "invalid_ttl",
        ),
        (
            "ttl above maximum",
            r#"{"data": 1, "ttl": "73h"}"#.into(),
            400,
            "invalid_ttl",
        ),
        (
            "ttl zero",
            r#"{"data": 1, "ttl": 0}"#.into(),
            400,
            "invalid_ttl",
        ),
        (
            "ttl negative",
            r#"{"data": 1, "ttl": -5}"#.into(),
            400,
            "invalid_ttl",
        ),
        (
            "ttl not a duration",
            r#"{"data": 1, "ttl": "soon"}"#.into(),
            400,
            "invalid_ttl",
        ),
        (
            "id too long",
            json!({"id": id_129, "data": 1}).to_string(),
            400,
            "invalid_message_id",
        ),
        (
            "id with a space",
            r#"{"id": "a b", "data": 1}"#.into(),
            400,
            "invalid_message_id",
        ),
        (
            "id not ASCII",
            r#"{"id": "é", "data": 1}"#.into(),
            400,
            "invalid_message_id",
        ),
        (
            "id with a control",
            r#"{"id": "a\u0001", "data": 1}"#.into(),
            400,
            "invalid_message_id",
        ),
        (
            "empty id",
            r#"{"id": "", "data": 1}"#.into(),
            400,
            "invalid_message_id",
        ),
        (
            "bad id late in a batch",
            r#"{"messages": [{"data": 1}, {"id": "a b", "data": 2}]}"#.into(),
            400,
            "invalid_message_id",
        ),
        (
            "bad base64",
            r#"{"data": "!!", "encoding": "base64"}"#.into(),
            400,
            "invalid_message",
        ),
        (
            "base64 not a string",
            r#"{"data": 5, "encoding": "base64"}"#.into(),
            400,
            "invalid_message",
        ),
        (
            "empty name",
            r#"{"data": 1, "name": ""}"#.into(),
            400,
            "invalid_message",
        ),
        (
            "empty header name",
            r#"{"data": 1, "headers": {"": "v"}}"#.into(),
            400,
            "invalid_message",
        ),
    ];
    for (what, body, status, code) in cases {
        let (got_status, got) = server.post_raw(channel, body).await;
        assert_eq!(
            (got_status, error_code(&got)),
            (status, code),
            "{what}: {got}"
        );
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert_eq!(got["error"]["retryable"], false, "{what}");
    }

    // The HTTP body limit answers with JSON too.
    let (status, got) = server.post_raw(channel, "x".repeat(3 * 1024 * 1024)).await;
    assert_eq!((status, error_code(&got)), (413, "request_too_large"));

    let long_channel = "c".repeat(256);
    for (path, code) in [
        ("", "invalid_channel"),
        (long_channel.as_str(), "invalid_channel"),
        ("a%20b", "invalid_channel"),
        ("a*b", "invalid_channel"),
        ("chat:", "invalid_channel"),
        (":x", "invalid_channel"),
    ] {
        let (status, got) = server.post_raw(path, r#"{"data": 1}"#).await;
        assert_eq!(
            (status, error_code(&got)),
            (400, code),
            "channel {path:?}: {got}"
        );
        if !path.is_empty() {
            let (status, got) = server.read(path, "").await;
            assert_eq!((status, error_code(&got)), (400, code), "read {path:?}");
        }
    }

    for (query, code) in [
        ("?after=nope", "invalid_position"),
        ("?after=e:-1", "invalid_position"),
        ("?after=e:1.5", "invalid_position"),
        ("?after=a%20b:1", "invalid_position"),
        ("?before=e:", "invalid_position"),
        ("?after=e:1&before=e:2", "invalid_request"),
        ("?limit=0", "invalid_request"),
        ("?limit=1001", "invalid_request"),
        ("?limit=ten", "invalid_request"),
        ("?afterr=e:1", "invalid_request"),
    ] {
        let (status, got) = server.read(channel, query).await;
        assert_eq!((status, error_code(&got)), (400, code), "{query}: {got}");
    }
    let (status, got) = server
        .get(&format!(
            "/v1/channels/{channel}/messages/by-id/{}",
            "i".repeat(129)
        ))
        .await;
    assert_eq!((status, error_code(&got)), (400, "invalid_message_id"));

    // Nothing of the above was stored anywhere.
    let (status, page) = server.read(channel, "").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["top"], Value::Null);
    let (status, channel_status) = server.get(&format!("/v1/channels/{channel}")).await;
    assert_eq!(
        (status, error_code(&channel_status)),
        (404, "channel_not_found")
    );
    for other in ["c", "a", "x"] {
        let (_, page) = server.read(other, "").await;
        assert_eq!(page["messages"], json!([]));
    }

    // And the channel still works.
    let (status, _) = server.publish(channel, json!({"data": 1, "ttl": 1})).await;
    assert_eq!(status, 201);
    server.stop().await;
}

#[tokio::test]
async fn router_rejections_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let (status, body) = server.get("/v2/nothing").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = server
        .send(
            server.http.delete(server.url("/v1/channels/x/messages")),
            None,
        )
        .await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
    let (status, body) = server
        .send(server.http.post(server.url("/v1/channels/x")), None)
        .await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
    let (status, body) = server.get_as("/health", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, _) = server.get_as("/ready", None).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn continuity_lost_for_another_epoch_retention_and_ahead_of_top() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    // An unknown channel: any position is from another epoch.
    let (status, body) = server.read("small:fresh", "?after=abc:3").await;
    assert_eq!((status, error_code(&body)), (410, "continuity_lost"));
    assert_eq!(body["error"]["reason"], "epoch_changed");
    assert_eq!(body["error"]["requested"], "abc:3");

    let mut epoch = String::new();
    for n in 1..=5 {
        let (_, ack) = server.publish("small:feed", json!({"data": n})).await;
        epoch = ack["epoch"].as_str().unwrap().to_owned();
    }
    // retention_messages_max = 2: only serials 4 and 5 are readable.
    let (status, page) = server.read("small:feed", "").await;
    assert_eq!(status, 200);
    assert_eq!(serials(&page), vec![4, 5]);

    let (status, body) = server
        .read("small:feed", &format!("?after={epoch}:1"))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (410, "continuity_lost"),
        "{body}"
    );
    assert_eq!(body["error"]["reason"], "retention");
    assert_eq!(body["error"]["requested"], format!("{epoch}:1"));
    assert_eq!(body["error"]["first_available"], format!("{epoch}:4"));
    assert_eq!(body["error"]["top"], format!("{epoch}:5"));

    // Right before the first retained message is still continuous.
    let (status, page) = server
        .read("small:feed", &format!("?after={epoch}:3"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(serials(&page), vec![4, 5]);

    let (status, body) = server.read("small:feed", "?after=OtherEpoch:4").await;
    assert_eq!((status, error_code(&body)), (410, "continuity_lost"));
    assert_eq!(body["error"]["reason"], "epoch_changed");
    assert_eq!(body["error"]["first_available"], format!("{epoch}:4"));

    let (status, body) = server
        .read("small:feed", &format!("?after={epoch}:9"))
        .await;
    assert_eq!(
        (status, body["error"]["reason"].as_str()),
        (410, Some("ahead_of_top"))
    );
    server.stop().await;
}

#[tokio::test]
async fn before_pages_newest_first_and_by_id_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let (status, body) = server.get("/v1/channels/chat:log").await;
    assert_eq!((status, error_code(&body)), (404, "channel_not_found"));
    let mut epoch = String::new();
    for n in 1..=5 {
        let (_, ack) = server
            .publish("chat:log", json!({"id": format!("m{n}"), "data": n}))
            .await;
        epoch = ack["epoch"].as_str().unwrap().to_owned();
    }
    let mut cursor = format!("{epoch}:6");
    let mut pages = Vec::new();
    loop {
        let (status, page) = server
            .read("chat:log", &format!("?before={cursor}&limit=2"))
            .await;
        assert_eq!(status, 200, "{page}");
        pages.push(serials(&page));
        cursor = page["next"].as_str().unwrap().to_owned();
        if page["more"] == false {
            break;
        }
        assert!(pages.len() < 10);
    }
    assert_eq!(pages, vec![vec![5, 4], vec![3, 2], vec![1]]);

    // order=newest starts at the top without knowing it; its cursor continues with before=.
    let (status, page) = server.read("chat:log", "?order=newest&limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(serials(&page), vec![5, 4]);
    assert_eq!(page["next"], format!("{epoch}:4"));
    assert_eq!(page["more"], true);
    for bad in ["?order=sideways", &format!("?order=newest&after={epoch}:1")] {
        let (status, body) = server.read("chat:log", bad).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_request"),
            "{bad}"
        );
    }

    let (status, message) = server.get("/v1/channels/chat:log/messages/by-id/m3").await;
    assert_eq!(status, 200);
    assert_eq!(
        (message["serial"].as_u64(), message["data"].as_u64()),
        (Some(3), Some(3))
    );
    let (status, body) = server.get("/v1/channels/chat:log/messages/by-id/m9").await;
    assert_eq!((status, error_code(&body)), (404, "message_not_found"));

    let (status, body) = server.get("/v1/channels/chat:log").await;
    assert_eq!(status, 200);
    assert_eq!(body["epoch"], epoch.as_str());
    assert_eq!(body["first"], format!("{epoch}:1"));
    assert_eq!(body["top"], format!("{epoch}:5"));
    assert_eq!(body["messages"], 5);
    assert_eq!(body["bytes"], 5);
    server.stop().await;
}

#[tokio::test]
async fn api_keys_and_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), |_| {}).await;
    server.key = None;
    let publish = |channel: &'static str, key: Option<&'static str>| {
        let request = server
            .http
            .post(server.url(&format!("/v1/channels/{channel}/messages")))
            .body(r#"{"data": 1}"#);
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body["error"]["code"].as_str().map(str::to_owned))
        }
    };
    assert_eq!(
        publish("chat:a", None).await,
        (401, Some("unauthorized".into()))
    );
    assert_eq!(
        publish("chat:a", Some("not-a-key-at-all-xxxxx")).await,
        (401, Some("unauthorized".into()))
    );
    assert_eq!(publish("chat:a", Some(CHAT_PUBLISHER)).await, (201, None));
    assert_eq!(
        publish("orders:a", Some(CHAT_PUBLISHER)).await,
        (403, Some("forbidden".into()))
    );
    assert_eq!(
        publish("chat:a", Some(READER)).await,
        (403, Some("forbidden".into()))
    );
    // Bare names belong to the namespace "default".
    assert_eq!(publish("plain", Some(PLAIN)).await, (201, None));
    assert_eq!(
        publish("chat:a", Some(PLAIN)).await,
        (403, Some("forbidden".into()))
    );
    assert_eq!(publish("anything:x", Some(ADMIN)).await, (201, None));
    // Unauthenticated requests learn nothing about validation.
    assert_eq!(
        publish("bad*name", None).await,
        (401, Some("unauthorized".into()))
    );

    let (status, _) = server
        .get_as("/v1/channels/chat:a/messages", Some(READER))
        .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .get_as("/v1/channels/chat:a/messages", Some(CHAT_PUBLISHER))
        .await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    let (status, body) = server.get_as("/v1/channels/chat:a", None).await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    let (status, body) = server
        .get_as("/v1/channels/chat:a/messages/by-id/x", Some(CHAT_PUBLISHER))
        .await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    let (status, _) = server.get_as("/health", None).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn dev_mode_is_anonymous_on_loopback_and_refused_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), |config| {
        config.dev = true;
        config.api_keys.clear();
    })
    .await;
    server.key = None;
    let (status, _) = server.publish("dev:x", json!({"data": 1})).await;
    assert_eq!(status, 201);
    assert!(server.admin_key.is_none());
    assert!(!dir.path().join("admin.key").exists());
    server.stop().await;

    // 192.0.2.1 is TEST-NET-1: never an address of this machine, so nothing can be bound even
    // if the check were missing; the error must be the dev check, not a bind failure.
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        http_addr: "192.0.2.1:0".parse().unwrap(),
        dev: true,
        ..Config::default()
    };
    config.mqtt.enabled = false;
    match Server::bind(config).await {
        Err(ServerError::DevNotLoopback(message)) => assert!(message.contains("loopback")),
        Err(other) => panic!("expected the dev check to refuse, got {other}"),
        Ok(_) => panic!("dev mode on a non-loopback address must not start"),
    }
}

#[tokio::test]
async fn generated_admin_key_is_reused_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let no_keys = |config: &mut Config| {
        config.api_keys.clear();
        config.storage.backend = StorageBackend::Embedded;
    };
    let mut server = TestServer::start(dir.path(), no_keys).await;
    let admin = server.admin_key.clone().expect("an admin key is generated");
    assert!(admin.generated);
    assert_eq!(admin.path, dir.path().join("admin.key"));
    server.key = Some(admin.key.clone());
    let (status, ack) = server
        .publish("keep:me", json!({"id": "k1", "data": 1}))
        .await;
    assert_eq!(status, 201);
    server.key = None;
    let (status, body) = server.publish("keep:me", json!({"data": 2})).await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    server.stop().await;

    let mut server = TestServer::start(dir.path(), no_keys).await;
    let again = server.admin_key.clone().unwrap();
    assert!(!again.generated);
    assert_eq!(again.key, admin.key);
    server.key = Some(again.key);
    // The embedded log kept the message across the restart.
    let (status, page) = server.read("keep:me", "").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["position"], ack["position"]);
    let (status, retry) = server
        .publish("keep:me", json!({"id": "k1", "data": 1}))
        .await;
    assert_eq!((status, retry["duplicate"].as_bool()), (200, Some(true)));
    server.stop().await;
}

#[tokio::test]
async fn a_poisoned_store_fails_readiness_and_publishes() {
    let store = Arc::new(MemoryStore::new(
        Config::default().policies(),
        Arc::new(SystemClock),
    ));
    let (base, serving) =
        serve_dev_router(store.clone() as Arc<dyn LogStore>, Duration::from_secs(5)).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let ready = http.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    store.fail_next_append("simulated fsync failure");
    for _ in 0..2 {
        let response = http
            .post(format!("{base}/v1/channels/x/messages"))
            .body(r#"{"data": 1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 503);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "storage_failed");
        assert_eq!(body["error"]["retryable"], true);
    }
    let ready = http.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_failed");
    // Operators see it in /metrics too: the gauge and every refusal by its code.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("herald_store_poisoned 1\n"), "{metrics}");
    assert!(
        metrics.contains("herald_errors_total{code=\"storage_failed\"} 3\n"),
        "{metrics}"
    );
    serving.abort();
}

/// A store whose appends never complete, as when a disk hangs.
struct HangingStore {
    inner: MemoryStore,
    held: std::sync::Mutex<Vec<Box<dyn Send>>>,
}

impl LogStore for HangingStore {
    fn append(
        &self,
        _channel: herald_core::ChannelName,
        _batch: Vec<herald_core::NewMessage>,
    ) -> herald_log::AppendTicket {
        let (sender, ticket) = herald_log::AppendTicket::channel();
        // Kept alive so the ticket stays pending instead of resolving to `Closed`.
        self.held.lock().unwrap().push(Box::new(sender));
        ticket
    }
    fn read(
        &self,
        channel: &herald_core::ChannelName,
        query: &herald_log::ReadQuery,
    ) -> Result<herald_log::ReadPage, herald_log::ReadError> {
        self.inner.read(channel, query)
    }
    fn message_by_id(
        &self,
        channel: &herald_core::ChannelName,
        id: &herald_core::MessageId,
    ) -> Result<Option<herald_core::Message>, herald_log::StoreError> {
        self.inner.message_by_id(channel, id)
    }
    fn channel_status(
        &self,
        channel: &herald_core::ChannelName,
    ) -> Result<Option<herald_core::StreamStatus>, herald_log::StoreError> {
        self.inner.channel_status(channel)
    }
    fn health(&self) -> herald_log::StoreHealth {
        self.inner.health()
    }
    fn policies(&self) -> &herald_core::Policies {
        self.inner.policies()
    }
    fn reclaim(&self) -> Result<usize, herald_log::StoreError> {
        self.inner.reclaim()
    }
    fn stats(&self) -> herald_log::StoreStats {
        self.inner.stats()
    }
    fn set_durable_listener(&self, listener: Arc<dyn herald_log::DurableListener>) {
        self.inner.set_durable_listener(listener)
    }
    fn save_subscriber(&self, state: herald_core::SubscriberState) -> herald_log::SaveTicket {
        self.inner.save_subscriber(state)
    }
    fn remove_subscriber(
        &self,
        channel: &herald_core::ChannelName,
        id: &herald_core::SubscriberId,
    ) -> herald_log::SaveTicket {
        self.inner.remove_subscriber(channel, id)
    }
    fn subscriber(
        &self,
        channel: &herald_core::ChannelName,
        id: &herald_core::SubscriberId,
    ) -> Option<herald_core::SubscriberState> {
        self.inner.subscriber(channel, id)
    }
    fn subscribers(&self) -> Vec<herald_core::SubscriberState> {
        self.inner.subscribers()
    }
    fn save_state(&self, key: &str, value: bytes::Bytes) -> herald_log::SaveTicket {
        self.inner.save_state(key, value)
    }
    fn remove_state(&self, key: &str) -> herald_log::SaveTicket {
        self.inner.remove_state(key)
    }
    fn state(&self, key: &str) -> Option<bytes::Bytes> {
        self.inner.state(key)
    }
    fn states(&self, prefix: &str) -> Vec<(String, bytes::Bytes)> {
        self.inner.states(prefix)
    }
}

#[tokio::test]
async fn a_publish_that_outlasts_the_request_timeout_gets_a_retryable_timeout() {
    let store = Arc::new(HangingStore {
        inner: MemoryStore::new(Config::default().policies(), Arc::new(SystemClock)),
        held: std::sync::Mutex::new(Vec::new()),
    });
    let (base, serving) = serve_dev_router(store, Duration::from_millis(200)).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = std::time::Instant::now();
    let response = http
        .post(format!("{base}/v1/channels/x/messages"))
        .body(r#"{"id": "slow", "data": 1}"#)
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    assert_eq!(body["error"]["retryable"], true);
    serving.abort();
}

/// Serves the router alone (no config, no key: anonymous dev access) over `store`, on a
/// loopback port; returns the base URL and the serving task.
async fn serve_dev_router(
    store: Arc<dyn LogStore>,
    request_timeout: Duration,
) -> (String, tokio::task::JoinHandle<()>) {
    // No WebSocket in these tests: the shutdown signal may as well be already closed.
    let (_, stopping) = tokio::sync::watch::channel(false);
    let realtime = herald_server::realtime::Realtime::new(
        store.clone(),
        Default::default(),
        Vec::new(),
        stopping,
    );
    let durable = herald_server::durable::DurableContext::new(
        store.clone(),
        realtime.live.hub.clone(),
        100,
        Default::default(),
    );
    let state = herald_server::http::AppState {
        realtime,
        durable,
        webhooks: None,
        mqtt: tokio::sync::watch::channel(None).1,
        store,
        auth: Arc::new(Authenticator::new(&[], true)),
        limits: Config::default().limits(),
        request_timeout,
        metrics: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(async move {
        axum::serve(listener, herald_server::http::router(state))
            .await
            .unwrap();
    });
    (base, serving)
}
