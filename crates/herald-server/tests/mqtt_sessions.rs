//! Persistent MQTT sessions against rumqttc (3.1.1 and 5) and mosquitto_sub: what a
//! subscriber with a stored session missed while offline — across a client reconnect and
//! across a server restart — arrives when it comes back, in order per topic, with nothing
//! lost and nothing twice; unacknowledged deliveries come again with their packet id; a
//! second connection takes a client id over; sessions expire.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use common::WAIT;
use common::mqtt::{MqttServer, mosquitto_available};

mod v3 {
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

    use super::*;

    /// A client of a stored session (`clean_session = 0`); returns it with its CONNACK's
    /// `session_present`.
    pub async fn persistent(
        server: &MqttServer,
        id: &str,
        manual_acks: bool,
    ) -> (AsyncClient, EventLoop, bool) {
        let mut options = MqttOptions::new(id, "127.0.0.1", server.mqtt_addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(false);
        options.set_manual_acks(manual_acks);
        let (client, mut events) = AsyncClient::new(options, 64);
        let Packet::ConnAck(connack) =
            next_packet(&mut events, |packet| matches!(packet, Packet::ConnAck(_))).await
        else {
            unreachable!()
        };
        (client, events, connack.session_present)
    }

    pub use crate::common::mqtt::v3_next_packet as next_packet;

    /// The next `count` PUBLISH packets, acknowledged by rumqttc; returns once the QoS 2 ones
    /// are complete too (PUBCOMP sent), so that a disconnect leaves no exchange half done.
    pub async fn publishes(events: &mut EventLoop, count: usize) -> Vec<rumqttc::Publish> {
        let mut received = Vec::new();
        let mut releasing = std::collections::BTreeSet::new();
        tokio::time::timeout(WAIT, async {
            while received.len() < count || !releasing.is_empty() {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if publish.qos == QoS::ExactlyOnce {
                            releasing.insert(publish.pkid);
                        }
                        received.push(publish);
                    }
                    Ok(Event::Outgoing(Outgoing::PubComp(pkid))) => {
                        releasing.remove(&pkid);
                    }
                    Ok(_) => {}
                    Err(error) => panic!("MQTT connection failed: {error}"),
                }
            }
        })
        .await
        .expect("the deliveries arrive in time");
        received
    }

    /// A clean DISCONNECT, after everything queued before it (acknowledgements) was sent.
    pub async fn disconnect(client: AsyncClient, mut events: EventLoop) {
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(WAIT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    pub const QOS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
}

mod v5 {
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

    use super::*;

    /// A v5 client with clean start 0 and the given Session Expiry Interval.
    pub async fn persistent(
        server: &MqttServer,
        id: &str,
        clean_start: bool,
        expiry_secs: u32,
        manual_acks: bool,
    ) -> (AsyncClient, EventLoop, bool) {
        let mut options = MqttOptions::new(id, "127.0.0.1", server.mqtt_addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(clean_start);
        options.set_session_expiry_interval(Some(expiry_secs));
        options.set_manual_acks(manual_acks);
        let (client, mut events) = AsyncClient::new(options, 64);
        let Packet::ConnAck(connack) =
            next_packet(&mut events, |packet| matches!(packet, Packet::ConnAck(_))).await
        else {
            unreachable!()
        };
        (client, events, connack.session_present)
    }

    pub use crate::common::mqtt::v5_next_packet as next_packet;

    /// As `v3::publishes`: returns once the QoS 2 exchanges are complete too.
    pub async fn publishes(
        events: &mut EventLoop,
        count: usize,
    ) -> Vec<rumqttc::v5::mqttbytes::v5::Publish> {
        let mut received = Vec::new();
        let mut releasing = std::collections::BTreeSet::new();
        tokio::time::timeout(WAIT, async {
            while received.len() < count || !releasing.is_empty() {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if publish.qos == rumqttc::v5::mqttbytes::QoS::ExactlyOnce {
                            releasing.insert(publish.pkid);
                        }
                        received.push(publish);
                    }
                    Ok(Event::Outgoing(Outgoing::PubComp(pkid))) => {
                        releasing.remove(&pkid);
                    }
                    Ok(_) => {}
                    Err(error) => panic!("MQTT connection failed: {error}"),
                }
            }
        })
        .await
        .expect("the deliveries arrive in time");
        received
    }

    pub async fn disconnect(client: AsyncClient, mut events: EventLoop) {
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(WAIT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Publishes `first..=last` over HTTP to each channel, as JSON numbers.
async fn publish_range(server: &MqttServer, channels: &[&str], first: u64, last: u64) {
    for n in first..=last {
        for channel in channels {
            server.publish_http(channel, json!(n)).await;
        }
    }
}

/// (topic, payload) pairs grouped per topic, in arrival order.
fn per_topic(received: impl IntoIterator<Item = (String, Vec<u8>)>) -> BTreeMap<String, Vec<u64>> {
    let mut topics: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (topic, payload) in received {
        let n = String::from_utf8(payload).unwrap().parse().unwrap();
        topics.entry(topic).or_default().push(n);
    }
    topics
}

fn expected(topics: &[&str], first: u64, last: u64) -> BTreeMap<String, Vec<u64>> {
    topics
        .iter()
        .map(|topic| (topic.to_string(), (first..=last).collect()))
        .collect()
}

/// v3 `clean_session = 0` at QoS 0, 1 and 2: messages published while the client is away —
/// before and after a server restart, on a channel that existed and on one created meanwhile
/// — all arrive when it reconnects, in order per topic, each exactly once.
#[tokio::test]
async fn v3_persistent_sessions_get_what_they_missed_across_a_reconnect_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = MqttServer::start_at(dir.path(), |_| {}).await;
    for qos in v3::QOS {
        let id = format!("fleet-v3-{}", qos as u8);
        let filter = format!("q{}/#", qos as u8);
        let (a, b) = (format!("q{}:a", qos as u8), format!("q{}:b", qos as u8));
        let (topic_a, topic_b) = (format!("q{}/a", qos as u8), format!("q{}/b", qos as u8));
        let (client, mut events, present) = v3::persistent(&server, &id, false).await;
        assert!(!present, "a new session");
        client.subscribe(&filter, qos).await.unwrap();
        v3::next_packet(&mut events, |p| matches!(p, rumqttc::Packet::SubAck(_))).await;
        server.publish_http(&a, json!(0)).await;
        let live = v3::publishes(&mut events, 1).await;
        assert_eq!(&live[0].payload[..], b"0");
        v3::disconnect(client, events).await;

        // Away: a reconnect's worth, then a restart's worth, on `a` and on the new `b`.
        publish_range(&server, &[&a, &b], 1, 20).await;
        let (client, mut events, present) = v3::persistent(&server, &id, false).await;
        assert!(present, "the stored session is resumed");
        let received = v3::publishes(&mut events, 40).await;
        assert!(received.iter().all(|publish| publish.qos == qos));
        let received = received
            .into_iter()
            .map(|publish| (publish.topic, publish.payload.to_vec()));
        assert_eq!(per_topic(received), expected(&[&topic_a, &topic_b], 1, 20));
        v3::disconnect(client, events).await;

        publish_range(&server, &[&a, &b], 21, 30).await;
        server.stop().await;
        server = MqttServer::start_at(dir.path(), |_| {}).await;
        publish_range(&server, &[&a, &b], 31, 40).await;
        let (client, mut events, present) = v3::persistent(&server, &id, false).await;
        assert!(present, "the session survived the restart");
        let received = v3::publishes(&mut events, 40).await;
        let received = received
            .into_iter()
            .map(|publish| (publish.topic, publish.payload.to_vec()));
        assert_eq!(per_topic(received), expected(&[&topic_a, &topic_b], 21, 40));
        // Nothing more: no duplicates behind them.
        server.publish_http(&a, json!(41)).await;
        let next = v3::publishes(&mut events, 1).await;
        assert_eq!(
            &next[0].payload[..],
            b"41",
            "the next delivery is the next message"
        );
        v3::disconnect(client, events).await;
    }
    server.stop().await;
}

/// v5 Session Expiry Interval at QoS 0, 1 and 2, the same journey; a clean start afterwards
/// discards the session.
#[tokio::test]
async fn v5_persistent_sessions_get_what_they_missed_and_clean_start_discards_them() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let dir = tempfile::tempdir().unwrap();
    let mut server = MqttServer::start_at(dir.path(), |_| {}).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let id = format!("fleet-v5-{}", qos as u8);
        let (a, b) = (format!("r{}:a", qos as u8), format!("r{}:b", qos as u8));
        let (topic_a, topic_b) = (format!("r{}/a", qos as u8), format!("r{}/b", qos as u8));
        let (client, mut events, present) = v5::persistent(&server, &id, true, 3600, false).await;
        assert!(!present);
        client
            .subscribe(format!("r{}/+", qos as u8), qos)
            .await
            .unwrap();
        v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
        v5::disconnect(client, events).await;

        publish_range(&server, &[&a, &b], 1, 15).await;
        server.stop().await;
        server = MqttServer::start_at(dir.path(), |_| {}).await;
        publish_range(&server, &[&a, &b], 16, 30).await;
        let (client, mut events, present) = v5::persistent(&server, &id, false, 3600, false).await;
        assert!(present, "the session survived the restart");
        let received = v5::publishes(&mut events, 60).await;
        assert!(received.iter().all(|publish| publish.qos == qos));
        let received = received.into_iter().map(|publish| {
            (
                String::from_utf8(publish.topic.to_vec()).unwrap(),
                publish.payload.to_vec(),
            )
        });
        assert_eq!(per_topic(received), expected(&[&topic_a, &topic_b], 1, 30));
        v5::disconnect(client, events).await;

        // A clean start discards it: no session, no subscription.
        let (client, mut events, present) = v5::persistent(&server, &id, true, 3600, false).await;
        assert!(!present, "clean start discards the stored session");
        server.publish_http(&a, json!(99)).await;
        client.subscribe("control/x", qos).await.unwrap();
        v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
        server.publish_http("control:x", json!(1)).await;
        let next = v5::publishes(&mut events, 1).await;
        assert_eq!(
            &next[0].topic[..],
            b"control/x",
            "the discarded subscription delivered nothing"
        );
        v5::disconnect(client, events).await;
    }
    server.stop().await;
}

/// A delivery the client never acknowledged is sent again after a restart, with DUP and
/// its packet id; once acknowledged it is not sent again.
#[tokio::test]
async fn unacknowledged_deliveries_are_sent_again_with_their_packet_id() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let dir = tempfile::tempdir().unwrap();
    let mut server = MqttServer::start_at(dir.path(), |_| {}).await;
    let (client, mut events, _) = v5::persistent(&server, "acker", true, 3600, true).await;
    client.subscribe("jobs/+", QoS::AtLeastOnce).await.unwrap();
    v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
    server.publish_http("jobs:a", json!(1)).await;
    let first = v5::publishes(&mut events, 1).await.remove(0);
    assert!(!first.dup);
    drop(client);
    drop(events);
    server.stop().await;
    server = MqttServer::start_at(dir.path(), |_| {}).await;

    let (client, mut events, present) = v5::persistent(&server, "acker", false, 3600, true).await;
    assert!(present);
    let again = v5::publishes(&mut events, 1).await.remove(0);
    assert!(again.dup, "a re-sent PUBLISH has DUP set");
    assert_eq!(again.pkid, first.pkid, "with its original packet id");
    assert_eq!(again.payload, first.payload);
    client.ack(&again).await.unwrap();
    server.publish_http("jobs:a", json!(2)).await;
    let next = v5::publishes(&mut events, 1).await.remove(0);
    assert_eq!(&next.payload[..], b"2");
    client.ack(&next).await.unwrap();
    v5::disconnect(client, events).await;

    let (client, mut events, present) = v5::persistent(&server, "acker", false, 3600, true).await;
    assert!(present);
    server.publish_http("jobs:a", json!(3)).await;
    let next = v5::publishes(&mut events, 1).await.remove(0);
    assert_eq!(
        &next.payload[..],
        b"3",
        "acknowledged deliveries are not sent again"
    );
    assert!(!next.dup);
    client.ack(&next).await.unwrap();
    v5::disconnect(client, events).await;
    server.stop().await;
}

/// A second connection with the same client id takes the session over: the first gets
/// DISCONNECT 0x8E, the second resumes the session.
#[tokio::test]
async fn a_second_connection_takes_the_client_id_over() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let server = MqttServer::start().await;
    let (first, mut first_events, _) = v5::persistent(&server, "twin", true, 3600, false).await;
    first.subscribe("twin/x", QoS::AtLeastOnce).await.unwrap();
    v5::next_packet(&mut first_events, |p| matches!(p, Packet::SubAck(_))).await;
    let second = tokio::spawn({
        let port = server.mqtt_addr.port();
        async move {
            let mut options = rumqttc::v5::MqttOptions::new("twin", "127.0.0.1", port);
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(3600));
            let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 64);
            let Packet::ConnAck(connack) =
                v5::next_packet(&mut events, |p| matches!(p, Packet::ConnAck(_))).await
            else {
                unreachable!()
            };
            (client, events, connack.session_present)
        }
    });
    // rumqttc reports the server's DISCONNECT as the end of the connection, with its reason.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(error) = first_events.poll().await {
                return error.to_string();
            }
        }
    })
    .await
    .expect("the first connection ends");
    assert!(ended.contains("SessionTakenOver"), "{ended}");
    let (_client, mut events, present) = second.await.unwrap();
    assert!(present, "the second connection resumed the session");
    server.publish_http("twin:x", json!(1)).await;
    let delivered = v5::publishes(&mut events, 1).await;
    assert_eq!(&delivered[0].payload[..], b"1");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("herald_mqtt_sessions_taken_over_total 1"),
        "{metrics}"
    );
    server.stop().await;
}

/// A session whose expiry interval passed is removed: the next connection finds none.
#[tokio::test]
async fn sessions_expire_after_their_interval() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let server = MqttServer::start_with(|config| {
        config.mqtt.session_sweep_interval = Duration::from_millis(100);
    })
    .await;
    let (client, mut events, _) = v5::persistent(&server, "brief", true, 1, false).await;
    client.subscribe("brief/x", QoS::AtLeastOnce).await.unwrap();
    v5::next_packet(&mut events, |p| matches!(p, Packet::SubAck(_))).await;
    v5::disconnect(client, events).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("herald_mqtt_sessions_expired_total 1"),
        "{metrics}"
    );
    let (_client, _events, present) = v5::persistent(&server, "brief", false, 1, false).await;
    assert!(!present, "the expired session is gone");
    server.stop().await;
}

/// mosquitto_sub with `-c` (a persistent session): what is published while it is away
/// arrives on its next run.
#[tokio::test]
async fn mosquitto_sub_persistent_sessions_get_what_they_missed() {
    if !mosquitto_available() {
        return;
    }
    let server = MqttServer::start().await;
    let port = server.mqtt_addr.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let id = format!("mosq-{version}");
        let sub = |count: &str| {
            let mut command = std::process::Command::new("mosquitto_sub");
            command.args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-c",
                "-i",
                &id,
                "-q",
                "1",
                "-t",
                "away/#",
                "-C",
                count,
                "-W",
                "10",
            ]);
            if version == "mqttv5" {
                command.args(["-x", "3600"]);
            }
            command
        };
        // The first run creates the session and its subscription, then leaves.
        let first = tokio::task::spawn_blocking({
            let mut command = sub("1");
            move || command.output().unwrap()
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.publish_http("away:first", json!(version)).await;
        let output = first.await.unwrap();
        assert!(output.status.success(), "{output:?}");
        publish_range(&server, &["away:a"], 1, 5).await;
        let mut command = sub("5");
        let output = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let lines: Vec<String> = String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(lines, ["1", "2", "3", "4", "5"], "{version}");
    }
    server.stop().await;
}

/// v5 Will Delay: a vanished client's will waits out its delay; resuming the session within
/// it drops the will, staying away past it publishes the will.
#[tokio::test]
async fn a_delayed_will_waits_and_a_resumed_session_cancels_it() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, Packet};
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let server = MqttServer::start().await;
    let port = server.mqtt_addr.port();
    let connect = |id: &str, topic: &str, clean_start: bool| {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_clean_start(clean_start);
        options.set_session_expiry_interval(Some(3600));
        let properties = LastWillProperties {
            delay_interval: Some(1),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        options.set_last_will(LastWill::new(
            topic,
            "offline",
            QoS::AtLeastOnce,
            false,
            Some(properties),
        ));
        AsyncClient::new(options, 16)
    };
    // Vanishes, then comes back within the delay: no will.
    let (_client, mut events) = connect("blinking", "status/blinking", true);
    v5::next_packet(&mut events, |p| matches!(p, Packet::ConnAck(_))).await;
    drop(events);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_client, mut events) = connect("blinking", "status/blinking", false);
    let Packet::ConnAck(connack) =
        v5::next_packet(&mut events, |p| matches!(p, Packet::ConnAck(_))).await
    else {
        unreachable!()
    };
    assert!(connack.session_present);
    // Vanishes for good: the will comes after its delay, not before.
    let (_gone, mut gone_events) = connect("gone", "status/gone", true);
    v5::next_packet(&mut gone_events, |p| matches!(p, Packet::ConnAck(_))).await;
    drop(gone_events);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server.history("status:gone", None).await.is_empty(),
        "the will waits out its delay"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let history = server.history("status:gone", None).await;
    assert_eq!(history.len(), 1, "published after the delay: {history:?}");
    assert!(
        server.history("status:blinking", None).await.is_empty(),
        "the resumed session's will was dropped"
    );
    drop(events);
    server.stop().await;
}

/// A stored session stays with the key that created it: another key connecting with the same
/// client id is refused (CONNACK 0x87), and neither takes the session over nor discards it.
#[tokio::test]
async fn a_session_belongs_to_the_key_that_created_it() {
    use herald_server::config::{ApiKeyConfig, CapabilityConfig};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let key = |name: &str| ApiKeyConfig {
        name: name.into(),
        key: format!("{name}-key-0123456789"),
        capabilities: vec![CapabilityConfig {
            namespaces: vec!["fleet".into()],
            operations: serde_json::from_value(json!(["publish", "subscribe", "history"])).unwrap(),
        }],
    };
    let server = MqttServer::start_with(|config| {
        config.dev = false;
        config.api_keys = vec![key("owner"), key("other")];
    })
    .await;
    let connect = |key_name: &str, clean_start: bool| {
        let mut options = MqttOptions::new("shared-id", "127.0.0.1", server.mqtt_addr.port());
        options.set_clean_start(clean_start);
        options.set_session_expiry_interval(Some(3600));
        options.set_credentials("any", format!("{key_name}-key-0123456789"));
        AsyncClient::new(options, 16)
    };
    let (owner, mut owner_events) = connect("owner", true);
    v5::next_packet(&mut owner_events, |p| matches!(p, Packet::ConnAck(_))).await;
    owner.subscribe("fleet/+", QoS::AtLeastOnce).await.unwrap();
    v5::next_packet(&mut owner_events, |p| matches!(p, Packet::SubAck(_))).await;
    v5::disconnect(owner, owner_events).await;

    for clean_start in [false, true] {
        let (_other, mut events) = connect("other", clean_start);
        let refused = tokio::time::timeout(WAIT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(connack))) => return Some(connack.code),
                    Ok(_) => {}
                    Err(error) => {
                        let text = error.to_string();
                        assert!(text.contains("NotAuthorized"), "{text}");
                        return None;
                    }
                }
            }
        })
        .await
        .expect("an answer in time");
        assert!(
            refused.is_none_or(|code| code == ConnectReturnCode::NotAuthorized),
            "{refused:?}"
        );
    }
    let published = server
        .http
        .post(format!(
            "http://{}/v1/channels/fleet:a/messages",
            server.http_addr
        ))
        .bearer_auth("owner-key-0123456789")
        .json(&json!({ "data": 1 }))
        .send()
        .await
        .unwrap();
    assert!(published.status().is_success());
    let (_owner, mut owner_events) = connect("owner", false);
    let Packet::ConnAck(connack) =
        v5::next_packet(&mut owner_events, |p| matches!(p, Packet::ConnAck(_))).await
    else {
        unreachable!()
    };
    assert!(
        connack.session_present,
        "the other key neither took nor discarded it"
    );
    let delivered = v5::publishes(&mut owner_events, 1).await;
    assert_eq!(&delivered[0].payload[..], b"1");
    server.stop().await;
}
