//! The MQTT listener against independent clients: rumqttc (3.1.1 and 5), mosquitto_pub/sub
//! (from the `mosquitto-clients` package) and raw TCP for what well-behaved clients never send.
//!
//! mosquitto tests print a loud notice and pass when the tools are missing, unless
//! `HERALD_REQUIRE_MOSQUITTO=1` (set by `.ci/run`), which makes that a failure.

mod common;

use std::time::Duration;

use base64::Engine as _;
use herald_server::config::{ApiKeyConfig, CapabilityConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use common::mqtt::{MqttServer, mosquitto_available};
use common::{WAIT, WsClient};

fn decoded(message: &Value) -> Vec<u8> {
    assert_eq!(message["encoding"], "base64", "{message}");
    base64::engine::general_purpose::STANDARD
        .decode(message["data"].as_str().unwrap())
        .unwrap()
}

// ---------- rumqttc 3.1.1 ----------

mod v3 {
    use rumqttc::{AsyncClient, EventLoop, MqttOptions, Packet, QoS};

    use super::*;

    pub async fn client(
        server: &MqttServer,
        id: &str,
        key: Option<&str>,
    ) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", server.mqtt_addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(key) = key {
            options.set_credentials("user", key);
        }
        let (client, mut events) = AsyncClient::new(options, 64);
        // Until the CONNACK.
        next_packet(&mut events, |packet| matches!(packet, Packet::ConnAck(_))).await;
        (client, events)
    }

    pub use crate::common::mqtt::v3_next_packet as next_packet;

    /// Polls until the connection fails; returns the error text.
    pub async fn until_error(events: &mut EventLoop) -> String {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Err(error) = events.poll().await {
                    return error.to_string();
                }
            }
        })
        .await
        .expect("the connection ends in time")
    }

    pub const QOS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
}

mod v5 {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};

    use super::*;

    pub async fn client(
        server: &MqttServer,
        id: &str,
        key: Option<&str>,
    ) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", server.mqtt_addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(key) = key {
            options.set_credentials("user", key);
        }
        let (client, mut events) = AsyncClient::new(options, 64);
        next_packet(&mut events, |packet| matches!(packet, Packet::ConnAck(_))).await;
        (client, events)
    }

    pub use crate::common::mqtt::v5_next_packet as next_packet;
}

/// Every QoS, both versions: a PUBLISH is acknowledged and then readable over HTTP with its
/// QoS in the `mqtt-qos` header.
#[tokio::test]
async fn publishes_at_every_qos_are_durable_and_readable_over_http() {
    let server = MqttServer::start().await;
    {
        use rumqttc::Packet;
        let (client, mut events) = v3::client(&server, "pub-v3", None).await;
        for (n, qos) in v3::QOS.into_iter().enumerate() {
            client
                .publish("sensors/room-1", qos, false, format!("v3-{n}"))
                .await
                .unwrap();
        }
        // QoS 1 is done at PUBACK, QoS 2 at PUBCOMP (after PUBREC, sent once durable).
        v3::next_packet(&mut events, |p| matches!(p, Packet::PubAck(_))).await;
        v3::next_packet(&mut events, |p| matches!(p, Packet::PubComp(_))).await;
    }
    {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::Packet;
        let (client, mut events) = v5::client(&server, "pub-v5", None).await;
        for (n, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .enumerate()
        {
            client
                .publish("sensors/room-1", qos, false, format!("v5-{n}"))
                .await
                .unwrap();
        }
        let ack = v5::next_packet(&mut events, |p| matches!(p, Packet::PubAck(_))).await;
        let Packet::PubAck(ack) = ack else {
            unreachable!()
        };
        assert_eq!(
            ack.reason,
            rumqttc::v5::mqttbytes::v5::PubAckReason::Success
        );
        v5::next_packet(&mut events, |p| matches!(p, Packet::PubComp(_))).await;
    }
    let messages = server.history("sensors:room-1", None).await;
    let seen: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            (
                String::from_utf8(decoded(m)).unwrap(),
                m["headers"]["mqtt-qos"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = ["v3", "v5"]
        .iter()
        .flat_map(|v| (0..3).map(move |n| (format!("{v}-{n}"), n.to_string())))
        .collect();
    assert_eq!(seen, expected);
    server.stop().await;
}

/// HTTP publishes reach MQTT subscribers through exact and wildcard filters, at
/// min(publish QoS, subscription QoS), once per connection even when filters overlap; `#`
/// does not match `$` channels.
#[tokio::test]
async fn http_publishes_reach_mqtt_subscribers_through_filters() {
    use rumqttc::{Packet, QoS};
    let server = MqttServer::start().await;
    let (client, mut events) = v3::client(&server, "sub-v3", None).await;
    for (filter, qos) in [
        ("chat/+", QoS::AtLeastOnce),
        ("chat/a", QoS::AtMostOnce),
        ("#", QoS::ExactlyOnce),
    ] {
        client.subscribe(filter, qos).await.unwrap();
        v3::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
    }
    server.publish_http("$sys:load", json!("hidden")).await;
    server.publish_http("chat:a", json!("one")).await;
    server.publish_http("chat:a.b", json!("two")).await;
    server.publish_http("news", json!("three")).await;
    let mut received = Vec::new();
    while received.len() < 3 {
        let Packet::Publish(publish) =
            v3::next_packet(&mut events, |p| matches!(p, Packet::Publish(_))).await
        else {
            unreachable!()
        };
        received.push((publish.topic.clone(), publish.payload.to_vec(), publish.qos));
    }
    // No header: counts as QoS 2, so the highest matching subscription decides (`#`: 2).
    assert_eq!(
        received,
        vec![
            ("chat/a".to_owned(), b"\"one\"".to_vec(), QoS::ExactlyOnce),
            ("chat/a/b".to_owned(), b"\"two\"".to_vec(), QoS::ExactlyOnce),
            ("news".to_owned(), b"\"three\"".to_vec(), QoS::ExactlyOnce),
        ]
    );
    // Nothing else: neither a duplicate of "one" nor the `$` channel.
    let extra = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) = events.poll().await {
                return publish;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "unexpected delivery: {extra:?}");
    server.stop().await;
}

/// An MQTT publish is delivered to MQTT subscribers at min(publish QoS, subscription QoS) and
/// to a WebSocket subscriber.
#[tokio::test]
async fn mqtt_publishes_reach_mqtt_and_websocket_subscribers() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let server = MqttServer::start().await;
    let mut ws = WsClient::connect(&format!("ws://{}/v1/ws", server.http_addr)).await;
    ws.subscribe(json!({"channel": "chat:ws"})).await;
    let (subscriber, mut sub_events) = v5::client(&server, "sub-v5", None).await;
    subscriber
        .subscribe("chat/ws", QoS::AtLeastOnce)
        .await
        .unwrap();
    v5::next_packet(&mut sub_events, |p| matches!(p, Packet::SubAck(_))).await;
    let (publisher, mut pub_events) = v3::client(&server, "pub", None).await;
    publisher
        .publish("chat/ws", rumqttc::QoS::ExactlyOnce, false, "hello")
        .await
        .unwrap();
    v3::next_packet(&mut pub_events, |p| {
        matches!(p, rumqttc::Packet::PubComp(_))
    })
    .await;
    let Packet::Publish(delivered) =
        v5::next_packet(&mut sub_events, |p| matches!(p, Packet::Publish(_))).await
    else {
        unreachable!()
    };
    assert_eq!(&delivered.topic[..], b"chat/ws");
    assert_eq!(&delivered.payload[..], b"hello");
    assert_eq!(delivered.qos, QoS::AtLeastOnce);
    let frames = ws.read_messages(1).await;
    let message = frames.iter().find(|f| f["type"] == "message").unwrap();
    assert_eq!(decoded(message), b"hello");
    assert_eq!(message["headers"]["mqtt-qos"], "2");
    server.stop().await;
}

fn keys() -> Vec<ApiKeyConfig> {
    let key = |name: &str, namespaces: &[&str], operations: &str| ApiKeyConfig {
        name: name.into(),
        key: format!("{name}-key-0123456789"),
        capabilities: vec![CapabilityConfig {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            operations: serde_json::from_value(json!(operations.split(',').collect::<Vec<_>>()))
                .unwrap(),
        }],
    };
    vec![
        key("reader", &["chat"], "subscribe"),
        key("writer", &["chat"], "publish,subscribe,history"),
        key("admin", &["*"], "admin"),
    ]
}

/// Without a valid key the CONNECT is refused; SUBSCRIBE and PUBLISH outside the key's
/// capabilities get SUBACK failures, a v5 PUBACK 0x87 and a v3 disconnect. The client ids are
/// wildcards on purpose: they widen nothing.
#[tokio::test]
async fn acl_denials() {
    let server = MqttServer::start_with(|config| {
        config.dev = false;
        config.api_keys = keys();
    })
    .await;
    // No key, wrong key: refused.
    {
        use rumqttc::{AsyncClient, MqttOptions};
        for password in [None, Some("wrong")] {
            let mut options = MqttOptions::new("x", "127.0.0.1", server.mqtt_addr.port());
            if let Some(password) = password {
                options.set_credentials("u", password);
            }
            let (_client, mut events) = AsyncClient::new(options, 8);
            let error = v3::until_error(&mut events).await;
            assert!(
                error.contains("BadUserNamePassword") || error.contains("refused"),
                "{error}"
            );
        }
    }
    // v3: SUBACK 0x80 outside the namespace, success inside; a denied publish disconnects.
    {
        use rumqttc::{Packet, QoS, SubscribeReasonCode};
        let (client, mut events) =
            v3::client(&server, "news/#", Some("reader-key-0123456789")).await;
        client
            .subscribe_many([
                rumqttc::SubscribeFilter::new("news/+".into(), QoS::AtLeastOnce),
                rumqttc::SubscribeFilter::new("chat/+".into(), QoS::AtLeastOnce),
                rumqttc::SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
            ])
            .await
            .unwrap();
        let Packet::SubAck(suback) =
            v3::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await
        else {
            unreachable!()
        };
        assert_eq!(
            suback.return_codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
            ]
        );
        // `#` was granted, but carries only channels the key may read.
        server
            .publish_http_as("news:x", "admin-key-0123456789")
            .await;
        server
            .publish_http_as("chat:x", "admin-key-0123456789")
            .await;
        let Packet::Publish(publish) =
            v3::next_packet(&mut events, |p| matches!(p, Packet::Publish(_))).await
        else {
            unreachable!()
        };
        assert_eq!(publish.topic, "chat/x");
        client
            .publish("chat/x", QoS::AtLeastOnce, false, "denied")
            .await
            .unwrap();
        v3::until_error(&mut events).await;
    }
    // v5: SUBACK 0x87 and PUBACK 0x87, and the connection stays.
    {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
        let (client, mut events) = v5::client(&server, "*", Some("reader-key-0123456789")).await;
        client.subscribe("news/a", QoS::AtMostOnce).await.unwrap();
        let Packet::SubAck(suback) =
            v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await
        else {
            unreachable!()
        };
        assert_eq!(
            suback.return_codes,
            vec![SubscribeReasonCode::NotAuthorized]
        );
        client
            .publish("chat/x", QoS::AtLeastOnce, false, "denied")
            .await
            .unwrap();
        let Packet::PubAck(puback) =
            v5::next_packet(&mut events, |p| matches!(p, Packet::PubAck(_))).await
        else {
            unreachable!()
        };
        assert_eq!(puback.reason, PubAckReason::NotAuthorized);
        client.subscribe("chat/a", QoS::AtMostOnce).await.unwrap();
        v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
    }
    let stored = server.history("chat:x", Some("admin-key-0123456789")).await;
    assert_eq!(stored.len(), 1, "only the admin's message: {stored:?}");
    server.stop().await;
}

impl MqttServer {
    async fn publish_http_as(&self, channel: &str, key: &str) {
        let response = self
            .http
            .post(format!(
                "http://{}/v1/channels/{channel}/messages",
                self.http_addr
            ))
            .bearer_auth(key)
            .json(&json!({ "data": channel }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
}

/// Retained messages: a new subscriber gets the topic's last retained message with RETAIN = 1,
/// an empty retained publish clears it, and it survives a restart.
#[tokio::test]
async fn retained_messages_reach_new_subscribers_and_survive_a_restart() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let dir = tempfile::tempdir().unwrap();

    /// Subscribes to `filter` and returns the (topic, payload, retain) of the PUBLISH packets
    /// that arrive: `count` of them (or fewer after WAIT), and any extra within 200 ms.
    async fn retained_for(
        server: &MqttServer,
        filter: &str,
        count: usize,
    ) -> Vec<(String, Vec<u8>, bool)> {
        let (client, mut events) = v5::client(server, "", None).await;
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
        let mut received = Vec::new();
        let mut deadline = tokio::time::Instant::now() + WAIT;
        while let Ok(event) = tokio::time::timeout_at(deadline, events.poll()).await {
            if let Ok(rumqttc::v5::Event::Incoming(Packet::Publish(publish))) = event {
                received.push((
                    String::from_utf8(publish.topic.to_vec()).unwrap(),
                    publish.payload.to_vec(),
                    publish.retain,
                ));
                if received.len() == count {
                    deadline = tokio::time::Instant::now() + Duration::from_millis(200);
                }
            }
        }
        received
    }

    let server = MqttServer::start_at(dir.path(), |_| {}).await;
    let (publisher, mut events) = v3::client(&server, "lights", None).await;
    for (topic, payload) in [
        ("lights/kitchen", "on"),
        ("lights/hall", "off"),
        ("lights/kitchen", "dim"),
    ] {
        publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
        v3::next_packet(&mut events, |p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    }
    // A plain publish does not replace the retained value.
    publisher
        .publish("lights/kitchen", rumqttc::QoS::AtLeastOnce, false, "live")
        .await
        .unwrap();
    v3::next_packet(&mut events, |p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    let expected = vec![
        ("lights/hall".to_owned(), b"off".to_vec(), true),
        ("lights/kitchen".to_owned(), b"dim".to_vec(), true),
    ];
    assert_eq!(retained_for(&server, "lights/+", 2).await, expected);
    assert_eq!(retained_for(&server, "lights/hall", 1).await, expected[..1]);
    server.stop().await;

    let server = MqttServer::start_at(dir.path(), |_| {}).await;
    assert_eq!(retained_for(&server, "lights/#", 2).await, expected);
    // An empty retained publish clears the topic.
    let (publisher, mut events) = v3::client(&server, "lights", None).await;
    publisher
        .publish("lights/hall", rumqttc::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    v3::next_packet(&mut events, |p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    assert_eq!(retained_for(&server, "lights/+", 1).await, expected[1..]);
    server.stop().await;
    let server = MqttServer::start_at(dir.path(), |_| {}).await;
    assert_eq!(retained_for(&server, "lights/+", 1).await, expected[1..]);
    server.stop().await;
}

/// rumqttc 3.1.1 keeps up to 100 QoS 1 publishes in flight, more than the server's
/// `receive_maximum`: a v3 client cannot be told that limit, so it gets backpressure, not a
/// disconnect, and every publish is acknowledged and stored.
#[tokio::test]
async fn a_v3_client_over_the_receive_maximum_is_slowed_not_dropped() {
    use rumqttc::{Packet, QoS};
    let server = MqttServer::start_with(|config| config.mqtt.receive_maximum = 8).await;
    let (client, mut events) = v3::client(&server, "fast", None).await;
    let sender = tokio::spawn(async move {
        for n in 0..300 {
            client
                .publish("fast/lane", QoS::AtLeastOnce, false, n.to_string())
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < 300 {
        v3::next_packet(&mut events, |p| matches!(p, Packet::PubAck(_))).await;
        acked += 1;
    }
    drop(sender.await.unwrap());
    let url = format!("http://{}/v1/channels/fast:lane", server.http_addr);
    let status: Value = server
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["messages"], 300);
    server.stop().await;
}

// ---------- raw TCP ----------

/// A CONNECT (3.1.1, clean session, keep alive 30 s, client id "raw").
const CONNECT_V3: &[u8] = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x1e\x00\x03raw";

async fn raw(server: &MqttServer) -> TcpStream {
    TcpStream::connect(server.mqtt_addr).await.unwrap()
}

/// Reads exactly `n` bytes or panics.
async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buffer = vec![0; n];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buffer))
        .await
        .expect("bytes arrive in time")
        .expect("the connection stays open");
    buffer
}

/// True when the server closes the connection (possibly after sending some bytes).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buffer = [0; 256];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Malformed input and protocol-order violations close the connection; the server lives on.
#[tokio::test]
async fn bad_input_closes_the_connection_and_nothing_else() {
    let server = MqttServer::start().await;
    let cases: [(&str, &[u8]); 5] = [
        ("garbage", b"\xff\xff\xff\xff\xff\x00"),
        ("PINGREQ before CONNECT", b"\xc0\x00"),
        (
            "wrong protocol name",
            b"\x10\x0f\x00\x04MQTX\x04\x02\x00\x1e\x00\x03raw",
        ),
        ("remaining length over 4 bytes", b"\x10\xff\xff\xff\xff\x01"),
        ("PUBLISH before CONNECT", b"\x30\x07\x00\x03a/bxy"),
    ];
    for (name, bytes) in cases {
        let mut stream = raw(&server).await;
        stream.write_all(bytes).await.unwrap();
        assert!(closed_by_server(&mut stream).await, "{name}: still open");
    }
    let after_connect: [(&str, &[u8]); 4] = [
        (
            "SUBSCRIBE with reserved flags 0",
            b"\x80\x06\x00\x01\x00\x01a\x00",
        ),
        ("second CONNECT", CONNECT_V3),
        ("PUBACK for nothing", b"\x40\x02\x00\x09"),
        ("wildcard in a topic name", b"\x30\x05\x00\x03a/#"),
    ];
    for (name, bytes) in after_connect {
        let mut stream = raw(&server).await;
        stream.write_all(CONNECT_V3).await.unwrap();
        assert_eq!(
            read_exact(&mut stream, 4).await,
            b"\x20\x02\x00\x00",
            "{name}: CONNACK"
        );
        stream.write_all(bytes).await.unwrap();
        assert!(closed_by_server(&mut stream).await, "{name}: still open");
    }
    // Still serving.
    let mut stream = raw(&server).await;
    stream.write_all(CONNECT_V3).await.unwrap();
    assert_eq!(read_exact(&mut stream, 4).await, b"\x20\x02\x00\x00");
    stream.write_all(b"\xc0\x00").await.unwrap();
    assert_eq!(read_exact(&mut stream, 2).await, b"\xd0\x00");
    server.stop().await;
}

/// QoS 2: a PUBLISH re-sent with DUP and the same packet id before PUBREL is acknowledged
/// again but stored once.
#[tokio::test]
async fn qos2_duplicate_publish_is_stored_once() {
    let server = MqttServer::start().await;
    let mut stream = raw(&server).await;
    stream.write_all(CONNECT_V3).await.unwrap();
    assert_eq!(read_exact(&mut stream, 4).await, b"\x20\x02\x00\x00");
    // PUBLISH QoS 2, packet id 7, topic "q/two", payload "x".
    let publish: &[u8] = b"\x34\x0a\x00\x05q/two\x00\x07x";
    let duplicate: &[u8] = b"\x3c\x0a\x00\x05q/two\x00\x07x";
    stream.write_all(publish).await.unwrap();
    assert_eq!(
        read_exact(&mut stream, 4).await,
        b"\x50\x02\x00\x07",
        "PUBREC"
    );
    stream.write_all(duplicate).await.unwrap();
    assert_eq!(
        read_exact(&mut stream, 4).await,
        b"\x50\x02\x00\x07",
        "PUBREC again"
    );
    stream.write_all(b"\x62\x02\x00\x07").await.unwrap();
    assert_eq!(
        read_exact(&mut stream, 4).await,
        b"\x70\x02\x00\x07",
        "PUBCOMP"
    );
    let stored = server.history("q:two", None).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(decoded(&stored[0]), b"x");
    server.stop().await;
}

/// A burst far over `publishes_in_flight_max` in one write, then DISCONNECT: every message is
/// stored (reading waits for append slots while their completions are handled; it once
/// deadlocked at twice the limit).
#[tokio::test]
async fn a_burst_of_publishes_is_stored_entirely() {
    let server = MqttServer::start().await;
    let mut stream = raw(&server).await;
    stream.write_all(CONNECT_V3).await.unwrap();
    assert_eq!(read_exact(&mut stream, 4).await, b"\x20\x02\x00\x00");
    let mut burst = Vec::new();
    for n in 0..1000u32 {
        let payload = n.to_string();
        burst.extend_from_slice(&[0x30, (2 + 5 + payload.len()) as u8, 0x00, 0x05]);
        burst.extend_from_slice(b"burst");
        burst.extend_from_slice(payload.as_bytes());
    }
    burst.extend_from_slice(b"\xe0\x00");
    stream.write_all(&burst).await.unwrap();
    assert!(closed_by_server(&mut stream).await);
    let url = format!("http://{}/v1/channels/burst", server.http_addr);
    let stored = tokio::time::timeout(WAIT, async {
        loop {
            let status: Value = server
                .http
                .get(&url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if status["messages"] == 1000 {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(stored.is_ok(), "not every message was stored");
    server.stop().await;
}

/// A CONNECT (5.0, clean start, keep alive 30 s, no properties, client id "raw").
const CONNECT_V5: &[u8] = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x1e\x00\x00\x03raw";

/// Everything the server sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut received))
        .await
        .expect("the server closes in time")
        .expect("a clean close");
    received
}

/// A connection that sends no CONNECT is closed after `mqtt.connect_timeout`; a v5 client is
/// told about a shutdown with DISCONNECT 0x8B (Server shutting down).
#[tokio::test]
async fn silent_connections_time_out_and_shutdown_says_so() {
    let server = MqttServer::start_with(|config| {
        config.mqtt.connect_timeout = Duration::from_millis(200);
    })
    .await;
    let mut silent = raw(&server).await;
    let started = std::time::Instant::now();
    assert_eq!(read_to_close(&mut silent).await, b"");
    assert!(started.elapsed() >= Duration::from_millis(200));

    let mut client = raw(&server).await;
    client.write_all(CONNECT_V5).await.unwrap();
    let mut connack = [0; 2];
    client.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack[0], 0x20, "CONNACK");
    read_exact(&mut client, usize::from(connack[1])).await;
    server.stop().await;
    let rest = read_to_close(&mut client).await;
    assert_eq!(rest.first(), Some(&0xe0), "DISCONNECT: {rest:x?}");
    assert_eq!(
        rest.get(2),
        Some(&0x8b),
        "reason Server shutting down: {rest:x?}"
    );
}

// ---------- mosquitto_pub / mosquitto_sub ----------

/// mosquitto_sub (v5 and 3.1.1) receives what mosquitto_pub publishes (both versions, QoS
/// 0/1/2), through a wildcard filter.
#[tokio::test]
async fn mosquitto_clients_interoperate() {
    use tokio::io::AsyncBufReadExt as _;
    if !mosquitto_available() {
        return;
    }
    let server = MqttServer::start().await;
    let port = server.mqtt_addr.port().to_string();
    let spawn_sub = |version: &str| {
        let mut child = tokio::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "2"])
            .args(["-t", "plant/#", "-W", "30", "-v"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    let mut subscribers = [spawn_sub("mqttv5"), spawn_sub("mqttv311")];
    // SUBACK is not observable from here: publish markers until both subscribers print one.
    for (_, lines) in &mut subscribers {
        tokio::time::timeout(WAIT, async {
            loop {
                server.publish_http("plant:ready", json!("ready")).await;
                if let Ok(Ok(Some(line))) =
                    tokio::time::timeout(Duration::from_millis(100), lines.next_line()).await
                {
                    assert!(line.starts_with("plant/ready"), "{line}");
                    return;
                }
            }
        })
        .await
        .expect("mosquitto_sub subscribes in time");
    }
    for version in ["mqttv311", "mqttv5"] {
        for qos in ["0", "1", "2"] {
            let status = tokio::process::Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", qos])
                .args(["-t", "plant/line-1", "-m", &format!("{version}-q{qos}")])
                .status()
                .await
                .unwrap();
            assert!(status.success(), "mosquitto_pub {version} QoS {qos}");
        }
    }
    let expected: Vec<String> = ["mqttv311", "mqttv5"]
        .iter()
        .flat_map(|v| (0..3).map(move |q| format!("plant/line-1 {v}-q{q}")))
        .collect();
    for (_child, lines) in &mut subscribers {
        let mut received = Vec::new();
        while received.len() < expected.len() {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("a delivery in time")
                .unwrap()
                .expect("mosquitto_sub is running");
            // Markers published while the other subscriber was still subscribing.
            if !line.starts_with("plant/ready") {
                received.push(line);
            }
        }
        assert_eq!(received, expected);
    }
    // And they were stored.
    assert_eq!(server.history("plant:line-1", None).await.len(), 6);
    server.stop().await;
}

// ---------- MQTT over WebSocket ----------

/// Reads binary messages until `done` says the bytes so far are enough (bounded by [`WAIT`]).
async fn ws_read_until(
    socket: &mut common::Socket,
    bytes: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    use futures_util::StreamExt as _;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(bytes) {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("no MQTT reply over WebSocket; got {bytes:02x?}"))
            .expect("the socket stays open")
            .expect("a frame");
        match message {
            tokio_tungstenite::tungstenite::Message::Binary(data) => bytes.extend_from_slice(&data),
            other => panic!("MQTT over WebSocket sends binary messages, got {other:?}"),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test]
async fn mqtt_over_websocket_speaks_the_same_protocol_on_get_mqtt() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let server = MqttServer::start().await;
    let mut request = format!("ws://{}/mqtt", server.http_addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt"
    );
    // A packet may span messages: CONNECT in two halves.
    let (first, second) = CONNECT_V3.split_at(7);
    socket
        .send(WsMessage::binary(first.to_vec()))
        .await
        .unwrap();
    socket
        .send(WsMessage::binary(second.to_vec()))
        .await
        .unwrap();
    let mut bytes = Vec::new();
    ws_read_until(&mut socket, &mut bytes, |b| b.len() >= 4).await;
    assert_eq!(&bytes[..4], b"\x20\x02\x00\x00", "CONNACK, accepted");
    bytes.clear();
    // SUBSCRIBE ws/t at QoS 1 and PUBLISH to it at QoS 1 in one message.
    let subscribe = b"\x82\x09\x00\x01\x00\x04ws/t\x01".to_vec();
    let publish = b"\x32\x0a\x00\x04ws/t\x00\x02hi".to_vec();
    socket.send(WsMessage::binary(subscribe)).await.unwrap();
    ws_read_until(&mut socket, &mut bytes, |b| b.len() >= 5).await;
    assert_eq!(
        &bytes[..5],
        b"\x90\x03\x00\x01\x01",
        "SUBACK, QoS 1 granted"
    );
    bytes.clear();
    socket.send(WsMessage::binary(publish)).await.unwrap();
    ws_read_until(&mut socket, &mut bytes, |b| {
        contains(b, b"\x40\x02\x00\x02") && contains(b, b"ws/t") && contains(b, b"hi")
    })
    .await;
    // The PUBACK came (durable) and so did the delivery of our own message; HTTP sees it.
    let history = server.history("ws:t", None).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(decoded(&history[0]), b"hi");
    server.stop().await;
}

#[tokio::test]
async fn get_mqtt_is_unavailable_while_mqtt_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::TestServer::start(dir.path(), |_| {}).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/mqtt", server.addr))
        .await
        .expect_err("no MQTT, no upgrade");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status().as_u16(), 503);
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
    server.stop().await;
}

// ---------- will messages ----------

/// Polls `channel`'s history until it has `count` messages (bounded by [`WAIT`]).
async fn history_of_len(server: &MqttServer, channel: &str, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let history = server.history(channel, None).await;
        if history.len() >= count || tokio::time::Instant::now() >= deadline {
            return history;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_will_is_published_when_a_client_vanishes_and_not_after_disconnect() {
    use rumqttc::{AsyncClient, LastWill, MqttOptions, Packet, QoS};

    let server = MqttServer::start().await;
    let connect = |id: &str, topic: &str| {
        let mut options = MqttOptions::new(id, "127.0.0.1", server.mqtt_addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_last_will(LastWill::new(topic, "offline", QoS::AtLeastOnce, true));
        AsyncClient::new(options, 16)
    };
    // A client whose TCP connection just goes away: its will is stored, retained.
    let (_vanishing, mut events) = connect("vanishing", "devices/d1/status");
    v3::next_packet(&mut events, |packet| matches!(packet, Packet::ConnAck(_))).await;
    drop(events);
    let history = history_of_len(&server, "devices:d1.status", 1).await;
    assert_eq!(history.len(), 1, "the will is stored: {history:?}");
    assert_eq!(decoded(&history[0]), b"offline");
    assert_eq!(history[0]["headers"]["mqtt-retain"], "1");
    // The will is counted once it is also the topic's retained message (the index is updated
    // just after the append is durable, and a will has no PUBACK to wait for).
    let indexed = tokio::time::timeout(WAIT, async {
        while !server
            .metrics()
            .await
            .contains("herald_mqtt_wills_published_total 1\n")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(indexed.is_ok(), "the will is counted in time");
    // Retained: a later subscriber gets it.
    let (subscriber, mut sub_events) = v3::client(&server, "watcher", None).await;
    subscriber
        .subscribe("devices/+/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    let publish = v3::next_packet(&mut sub_events, |packet| {
        matches!(packet, Packet::Publish(_))
    })
    .await;
    let Packet::Publish(publish) = publish else {
        unreachable!()
    };
    assert_eq!(
        (publish.topic.as_str(), &publish.payload[..]),
        ("devices/d1/status", &b"offline"[..])
    );

    // A client that says DISCONNECT: no will.
    let (leaving, mut events) = connect("leaving", "devices/d2/status");
    v3::next_packet(&mut events, |packet| matches!(packet, Packet::ConnAck(_))).await;
    leaving.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, async { while events.poll().await.is_ok() {} }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        server.history("devices:d2.status", None).await.is_empty(),
        "a clean DISCONNECT discards the will"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("herald_mqtt_wills_published_total 1\n"),
        "{metrics}"
    );
    server.stop().await;
}

/// A rumqttc v5 subscriber that accepts one topic alias gets many messages on two topics:
/// the server sets alias 1 on the first PUBLISH of the first topic and sends later ones with
/// an empty topic and the alias; the second topic, with no alias left, always goes in full.
/// rumqttc 0.25 reports each PUBLISH as received (an aliased one with an empty topic) and
/// checks the alias internally (an unknown one fails the connection), so the test resolves
/// aliases itself and checks each topic's payloads in order.
#[tokio::test]
async fn a_v5_client_accepting_topic_aliases_gets_every_message_with_its_topic() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    const MESSAGES: usize = 60;

    let server = MqttServer::start().await;
    let mut options = MqttOptions::new("aliased", "127.0.0.1", server.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_topic_alias_max(Some(1));
    let (subscriber, mut events) = AsyncClient::new(options, 64);
    v5::next_packet(&mut events, |p| matches!(p, Packet::ConnAck(_))).await;
    subscriber
        .subscribe("sensors/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;

    let (publisher, mut pub_events) = v3::client(&server, "sensor-feed", None).await;
    let sent: Vec<(String, String)> = (0..MESSAGES)
        .map(|n| {
            // Mostly the first topic, so its alias is used many times.
            let topic = if n % 3 == 2 { "sensors/b" } else { "sensors/a" };
            (topic.to_owned(), format!("reading-{n}"))
        })
        .collect();
    for (topic, payload) in &sent {
        publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        // One at a time: the deliveries' order is the publishes' order.
        v3::next_packet(&mut pub_events, |p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    }

    let mut aliases: std::collections::HashMap<u16, String> = std::collections::HashMap::new();
    let mut received = Vec::new();
    let mut aliased_only = 0;
    tokio::time::timeout(WAIT, async {
        while received.len() < MESSAGES {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let topic = String::from_utf8(publish.topic.to_vec()).unwrap();
                    let alias = publish.properties.as_ref().and_then(|p| p.topic_alias);
                    let resolved = match alias {
                        Some(alias) => {
                            assert_eq!(alias, 1, "the client accepts one alias");
                            if topic.is_empty() {
                                aliased_only += 1;
                                aliases.get(&alias).expect("an alias set before").clone()
                            } else {
                                aliases.insert(alias, topic.clone());
                                topic
                            }
                        }
                        None => {
                            assert!(!topic.is_empty(), "no topic and no alias");
                            topic
                        }
                    };
                    let payload = String::from_utf8(publish.payload.to_vec()).unwrap();
                    received.push((resolved, payload));
                }
                Ok(_) => {}
                Err(error) => panic!("MQTT connection failed: {error}"),
            }
        }
    })
    .await
    .expect("every message arrives in time");
    // Each channel's messages come in order (two channels' feeds may interleave).
    let of_topic = |messages: &[(String, String)], topic: &str| -> Vec<String> {
        messages
            .iter()
            .filter(|(of, _)| of == topic)
            .map(|(_, payload)| payload.clone())
            .collect()
    };
    for topic in ["sensors/a", "sensors/b"] {
        assert_eq!(
            of_topic(&received, topic),
            of_topic(&sent, topic),
            "{topic}"
        );
    }
    // The first topic delivered took the only alias: all its later PUBLISH packets used the
    // alias alone, and the other topic always came in full.
    let aliased_topic = aliases.get(&1).expect("alias 1 was set");
    let aliased_topic_count = sent.iter().filter(|(of, _)| of == aliased_topic).count();
    assert_eq!(aliased_only, aliased_topic_count - 1);
    server.stop().await;
}

/// Shared subscriptions: three v5 workers in `$share/workers/jobs/+` split the messages
/// between them (each exactly once, in turn), a plain subscriber gets all of them, a v3
/// member works too, and a member that leaves gets no more.
#[tokio::test]
async fn shared_subscriptions_spread_messages_over_their_members() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let server = MqttServer::start().await;
    let mut workers = Vec::new();
    for n in 0..2 {
        let (client, mut events) = v5::client(&server, &format!("worker-{n}"), None).await;
        client
            .subscribe("$share/workers/jobs/+", QoS::AtLeastOnce)
            .await
            .unwrap();
        let Packet::SubAck(suback) =
            v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await
        else {
            unreachable!()
        };
        assert_eq!(
            suback.return_codes,
            [rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
                QoS::AtLeastOnce
            )]
        );
        workers.push((client, events));
    }
    let (v3_worker, mut v3_events) = v3::client(&server, "worker-v3", None).await;
    v3_worker
        .subscribe("$share/workers/jobs/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    v3::next_packet(&mut v3_events, |p| matches!(p, rumqttc::Packet::SubAck(_))).await;
    let (watcher, mut watcher_events) = v5::client(&server, "watcher", None).await;
    watcher.subscribe("jobs/+", QoS::AtLeastOnce).await.unwrap();
    v5::next_packet(&mut watcher_events, |p| matches!(p, Packet::SubAck(_))).await;

    for n in 0..30 {
        server
            .publish_http(&format!("jobs:q{}", n % 3), json!(n))
            .await;
    }
    let mut taken = Vec::new();
    for (_, events) in &mut workers {
        let got = take_publishes_v5(events, 10).await;
        assert_eq!(got.len(), 10, "round robin: a third each");
        taken.extend(got);
    }
    let got_v3 = take_publishes_v3(&mut v3_events, 10).await;
    assert_eq!(got_v3.len(), 10);
    taken.extend(got_v3);
    taken.sort_unstable();
    assert_eq!(
        taken,
        (0..30).collect::<Vec<u64>>(),
        "each message exactly once"
    );
    assert_eq!(
        take_publishes_v5(&mut watcher_events, 30).await.len(),
        30,
        "a plain subscription gets every message"
    );

    // One member leaves: the other two get everything from now on.
    let (leaving, mut leaving_events) = workers.remove(0);
    leaving.unsubscribe("$share/workers/jobs/+").await.unwrap();
    v5::next_packet(&mut leaving_events, |p| matches!(p, Packet::UnsubAck(_))).await;
    for n in 30..40 {
        server.publish_http("jobs:q0", json!(n)).await;
    }
    let mut rest = take_publishes_v5(&mut workers[0].1, 5).await;
    rest.extend(take_publishes_v3(&mut v3_events, 5).await);
    rest.sort_unstable();
    assert_eq!(rest, (30..40).collect::<Vec<u64>>());
    server.stop().await;
}

/// The next `count` PUBLISH payloads (JSON numbers) of a v5 client.
async fn take_publishes_v5(events: &mut rumqttc::v5::EventLoop, count: usize) -> Vec<u64> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let mut numbers = Vec::new();
    while numbers.len() < count {
        if let Packet::Publish(publish) =
            v5::next_packet(events, |p| matches!(p, Packet::Publish(_))).await
        {
            numbers.push(
                std::str::from_utf8(&publish.payload)
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
        }
    }
    numbers
}

/// The next `count` PUBLISH payloads (JSON numbers) of a v3 client.
async fn take_publishes_v3(events: &mut rumqttc::EventLoop, count: usize) -> Vec<u64> {
    let mut numbers = Vec::new();
    while numbers.len() < count {
        if let rumqttc::Packet::Publish(publish) =
            v3::next_packet(events, |p| matches!(p, rumqttc::Packet::Publish(_))).await
        {
            numbers.push(
                std::str::from_utf8(&publish.payload)
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
        }
    }
    numbers
}
