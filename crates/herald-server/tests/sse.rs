//! Server-Sent Events on a real socket with a real HTTP client (reqwest, streaming body):
//! resume ids, `Last-Event-ID`, `from=`, continuity, keep-alive, CORS and bad requests.

mod common;

use std::time::Duration;

use common::{TestServer, WAIT};
use herald_server::config::NamespaceConfig;
use serde_json::{Value, json};

/// One parsed SSE event (comments are kept as `comment`).
#[derive(Debug, Default, Clone)]
struct Event {
    event: Option<String>,
    id: Option<String>,
    data: String,
    retry: Option<String>,
    comment: Option<String>,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// Reads an SSE response block by block.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(server: &TestServer, query: &str, last_event_id: Option<&str>) -> SseReader {
        let mut request = server.http.get(server.url(&format!("/v1/sse?{query}")));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "sse open");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> Event {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event::default();
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        event.comment = Some(comment.trim().to_owned());
                    } else if let Some((field, value)) = line.split_once(": ") {
                        match field {
                            "event" => event.event = Some(value.to_owned()),
                            "id" => event.id = Some(value.to_owned()),
                            "data" => event.data.push_str(value),
                            "retry" => event.retry = Some(value.to_owned()),
                            other => panic!("unknown SSE field {other}"),
                        }
                    }
                }
                return event;
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .expect("an SSE chunk arrives in time")
                .expect("stream readable")
                .expect("stream still open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next `count` deliveries (unnamed events), with every event read on the way.
    async fn messages(&mut self, count: usize) -> (Vec<Event>, Vec<Event>) {
        let mut messages = Vec::new();
        let mut all = Vec::new();
        while messages.len() < count {
            let event = self.next().await;
            if event.event.is_none() && event.comment.is_none() && event.retry.is_none() {
                messages.push(event.clone());
            }
            all.push(event);
        }
        (messages, all)
    }
}

fn serials(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .map(|event| event.json()["serial"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn last_event_id_resumes_exactly_where_the_browser_left_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let acks = server.publish_numbers("feed", 1, 10).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();

    let mut stream = SseReader::open(&server, &format!("channels=feed&from={epoch}:0"), None).await;
    let first = stream.next().await;
    assert_eq!(first.retry.as_deref(), Some("2000"));
    let (messages, _) = stream.messages(4).await;
    assert_eq!(serials(&messages), vec![1, 2, 3, 4]);
    // The id is the position; the data is the WebSocket message frame.
    assert_eq!(
        messages[3].id.as_deref(),
        Some(format!("{epoch}:4").as_str())
    );
    assert_eq!(messages[3].json()["type"], "message");
    assert_eq!(messages[3].json()["data"], json!({"n": 4}));
    drop(stream);

    // Reconnect the way EventSource does: same URL (with its old `from`), Last-Event-ID wins.
    server.publish_numbers("feed", 11, 5).await;
    let mut stream = SseReader::open(
        &server,
        &format!("channels=feed&from={epoch}:0"),
        Some(&format!("{epoch}:4")),
    )
    .await;
    let (messages, _) = stream.messages(11).await;
    assert_eq!(serials(&messages), (5..=15).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn several_channels_share_one_resume_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |_| {}).await;
    let a = server.publish_numbers("chat:a", 1, 3).await;
    let epoch_a = a[0]["epoch"].as_str().unwrap().to_owned();
    let mut stream = SseReader::open(
        &server,
        &format!("channels=chat:a,chat:b&from={epoch_a}:1,-"),
        None,
    )
    .await;
    let (messages, _) = stream.messages(2).await;
    assert_eq!(serials(&messages), vec![2, 3]);
    assert_eq!(
        messages[1].id.as_deref(),
        Some(format!("{epoch_a}:3,-").as_str())
    );
    let b = server.publish_numbers("chat:b", 1, 1).await;
    let (messages, _) = stream.messages(1).await;
    let epoch_b = b[0]["epoch"].as_str().unwrap();
    assert_eq!(
        messages[0].id.as_deref(),
        Some(format!("{epoch_a}:3,{epoch_b}:1").as_str())
    );
    server.stop().await;
}

#[tokio::test]
async fn continuity_lost_is_an_event_with_the_missed_range_and_moves_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.namespaces.insert(
            "small".into(),
            NamespaceConfig {
                retention_messages_max: Some(3),
                ..NamespaceConfig::default()
            },
        );
    })
    .await;
    let acks = server.publish_numbers("small:s", 1, 10).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let mut stream =
        SseReader::open(&server, &format!("channels=small:s&from={epoch}:2"), None).await;
    let (messages, all) = stream.messages(3).await;
    let lost = all
        .iter()
        .find(|event| event.event.as_deref() == Some("continuity_lost"))
        .expect("a continuity_lost event");
    assert_eq!(lost.json()["from"], format!("{epoch}:3"));
    assert_eq!(lost.json()["to"], format!("{epoch}:7"));
    assert_eq!(lost.id.as_deref(), Some(format!("{epoch}:7").as_str()));
    assert_eq!(serials(&messages), vec![8, 9, 10]);
    server.stop().await;
}

#[tokio::test]
async fn idle_streams_get_keep_alives_and_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.realtime.sse_keepalive_interval = Duration::from_millis(100);
        config.realtime.heartbeat_interval = Duration::from_millis(250);
    })
    .await;
    server.publish_numbers("quiet", 1, 2).await;
    let mut stream = SseReader::open(&server, "channels=quiet", None).await;
    let (mut keep_alive, mut heartbeat) = (false, None);
    for _ in 0..50 {
        let event = stream.next().await;
        keep_alive |= event.comment.as_deref() == Some("keep-alive");
        if event.event.as_deref() == Some("heartbeat") {
            heartbeat = Some(event.json());
        }
        if keep_alive && heartbeat.is_some() {
            break;
        }
    }
    assert!(keep_alive, "no keep-alive comment");
    let heartbeat = heartbeat.expect("a heartbeat event");
    assert!(
        heartbeat["channels"]["quiet"]
            .as_str()
            .unwrap()
            .ends_with(":2")
    );
    server.stop().await;
}

#[tokio::test]
async fn cors_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.http.cors_origins = vec!["http://127.0.0.1:9".into()];
    })
    .await;
    let response = server
        .http
        .get(server.url("/v1/sse?channels=x"))
        .header("Origin", "http://127.0.0.1:9")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://127.0.0.1:9"
    );
    drop(response);
    let response = server
        .http
        .get(server.url("/v1/sse?channels=x"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    drop(response);

    for (query, code) in [
        ("", "invalid_request"),
        ("channels=bad%20name", "invalid_channel"),
        ("channels=a,a", "invalid_request"),
        ("channels=a&from=nope", "invalid_position"),
        ("channels=a,b&from=E:1", "invalid_position"),
        ("channels=a&guarantee=sometimes", "invalid_request"),
        (
            "channels=a&guarantee=at-most-once&from=E:1",
            "invalid_request",
        ),
        ("channels=a&unknown=1", "invalid_request"),
    ] {
        let response = server
            .http
            .get(server.url(&format!("/v1/sse?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
    server.stop().await;
}

/// A stream that started on a channel with no message holds `-` for it; resuming with that id
/// owes the subscriber everything the channel got since, and what retention already removed is
/// reported, not skipped.
#[tokio::test]
async fn a_channel_empty_at_start_resumes_from_its_first_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), |config| {
        config.namespaces.insert(
            "small".into(),
            NamespaceConfig {
                retention_messages_max: Some(3),
                ..NamespaceConfig::default()
            },
        );
    })
    .await;
    let mut stream = SseReader::open(&server, "channels=small:e,fresh", None).await;
    let mut subscribed_id = None;
    let mut subscribed = 0;
    while subscribed < 2 {
        let event = stream.next().await;
        if event.event.as_deref() == Some("subscribed") {
            subscribed += 1;
            subscribed_id = event.id.clone();
        }
    }
    assert_eq!(subscribed_id.as_deref(), Some("-,-"));
    drop(stream);

    let acks = server.publish_numbers("small:e", 1, 10).await;
    let fresh = server.publish_numbers("fresh", 1, 2).await;
    let epoch = acks[0]["epoch"].as_str().unwrap().to_owned();
    let mut stream = SseReader::open(&server, "channels=small:e,fresh", Some("-,-")).await;
    let (messages, all) = stream.messages(5).await;
    let lost = all
        .iter()
        .find(|event| event.event.as_deref() == Some("continuity_lost"))
        .expect("retention removed serials 1..=7 the subscriber was owed");
    assert_eq!(lost.json()["from"], format!("{epoch}:1"));
    assert_eq!(lost.json()["to"], format!("{epoch}:7"));
    let mut by_channel: Vec<(String, u64)> = messages
        .iter()
        .map(|event| {
            let json = event.json();
            (
                json["channel"].as_str().unwrap().to_owned(),
                json["serial"].as_u64().unwrap(),
            )
        })
        .collect();
    by_channel.sort();
    assert_eq!(
        by_channel,
        vec![
            ("fresh".to_owned(), 1),
            ("fresh".to_owned(), 2),
            ("small:e".to_owned(), 8),
            ("small:e".to_owned(), 9),
            ("small:e".to_owned(), 10),
        ]
    );
    assert_eq!(fresh.len(), 2);
    server.stop().await;
}
