//! An MQTT-enabled server for the MQTT test files, and the mosquitto tool check.

use std::net::SocketAddr;
use std::time::Duration;

use herald_server::config::Config;
use herald_server::{Server, ServerError};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub struct MqttServer {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    _dir: Option<tempfile::TempDir>,
}

impl MqttServer {
    /// A dev-mode server (anonymous access) with MQTT on a free port.
    pub async fn start() -> MqttServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> MqttServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self::start_at(dir.path(), adjust).await;
        server._dir = Some(dir);
        server
    }

    /// A server on an existing data directory (to restart on the same log).
    pub async fn start_at(
        data_dir: &std::path::Path,
        adjust: impl FnOnce(&mut Config),
    ) -> MqttServer {
        let mut config = Config {
            data_dir: data_dir.to_owned(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            dev: true,
            ..Config::default()
        };
        config.mqtt.enabled = true;
        config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
        adjust(&mut config);
        let server = Server::bind(config).await.expect("server starts");
        let http_addr = server.local_addr();
        let mqtt_addr = server.mqtt_local_addr().expect("MQTT is enabled");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        MqttServer {
            http_addr,
            mqtt_addr,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            shutdown: Some(shutdown),
            task: Some(task),
            _dir: None,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task.take().unwrap())
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }

    /// The channel's messages over HTTP, oldest first.
    pub async fn history(&self, channel: &str, key: Option<&str>) -> Vec<Value> {
        let mut request = self.http.get(format!(
            "http://{}/v1/channels/{channel}/messages",
            self.http_addr
        ));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        if response.status() == 404 {
            return Vec::new();
        }
        let body: Value = response.json().await.unwrap();
        body["messages"].as_array().cloned().unwrap_or_default()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.http_addr);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn publish_http(&self, channel: &str, data: Value) {
        let response = self
            .http
            .post(format!(
                "http://{}/v1/channels/{channel}/messages",
                self.http_addr
            ))
            .json(&json!({ "data": data }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
}

/// Whether mosquitto_pub/mosquitto_sub are installed; a loud notice when not, a failure when
/// `HERALD_REQUIRE_MOSQUITTO=1`.
pub fn mosquitto_available() -> bool {
    let found = ["mosquitto_pub", "mosquitto_sub"].iter().all(|tool| {
        std::process::Command::new(tool)
            .arg("--help")
            .output()
            .is_ok()
    });
    if !found {
        let required = std::env::var("HERALD_REQUIRE_MOSQUITTO").is_ok_and(|value| value == "1");
        assert!(
            !required,
            "HERALD_REQUIRE_MOSQUITTO=1 but mosquitto_pub/mosquitto_sub are missing: \
             install the `mosquitto-clients` package"
        );
        eprintln!(
            "\n## SKIPPED mosquitto test: no mosquitto_pub/mosquitto_sub on PATH; install\n\
             ## mosquitto-clients or set HERALD_REQUIRE_MOSQUITTO=1 to make this a failure.\n"
        );
    }
    found
}

/// Polls a 3.1.1 client until a packet matches; panics on a connection error or after
/// [`super::WAIT`].
pub async fn v3_next_packet(
    events: &mut rumqttc::EventLoop,
    wanted: impl Fn(&rumqttc::Packet) -> bool,
) -> rumqttc::Packet {
    tokio::time::timeout(super::WAIT, async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(packet)) if wanted(&packet) => return packet,
                Ok(_) => {}
                Err(error) => panic!("MQTT connection failed: {error}"),
            }
        }
    })
    .await
    .expect("the packet arrives in time")
}

/// [`v3_next_packet`] for a v5 client.
pub async fn v5_next_packet(
    events: &mut rumqttc::v5::EventLoop,
    wanted: impl Fn(&rumqttc::v5::mqttbytes::v5::Packet) -> bool,
) -> rumqttc::v5::mqttbytes::v5::Packet {
    tokio::time::timeout(super::WAIT, async {
        loop {
            match events.poll().await {
                Ok(rumqttc::v5::Event::Incoming(packet)) if wanted(&packet) => return packet,
                Ok(_) => {}
                Err(error) => panic!("MQTT connection failed: {error}"),
            }
        }
    })
    .await
    .expect("the packet arrives in time")
}
