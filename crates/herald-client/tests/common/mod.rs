//! The test kit of herald-client's integration tests: a real in-process server (embedded store
//! in a temporary directory, real socket on 127.0.0.1). The TCP fault proxy is `herald-faults`.
//!
//! Every wait is bounded by [`WAIT`]; a test that hangs fails instead.

#![allow(dead_code)] // each test binary uses its own part of the kit

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herald_client::{ClientOptions, Event, Message, Subscription};
use herald_server::config::Config;
use herald_server::{Server, ServerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// Starts a dev-mode server on `dir`, on `addr` (port 0 for a fresh one).
    pub async fn start(dir: &Path, addr: SocketAddr) -> TestServer {
        Self::start_with(dir, addr, |_| {}).await
    }

    /// [`TestServer::start`] with the config adjusted first.
    pub async fn start_with(
        dir: &Path,
        addr: SocketAddr,
        adjust: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = Config {
            data_dir: dir.to_owned(),
            http_addr: addr,
            dev: true,
            ..Config::default()
        };
        // The default MQTT address 127.0.0.1:1883 is shared by every test: off here.
        config.mqtt.enabled = false;
        config.realtime.heartbeat_interval = Duration::from_millis(200);
        config.http.shutdown_grace = Duration::from_millis(500);
        adjust(&mut config);
        // Re-binding the port of a server that just stopped can race the old listener's close.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let server = loop {
            match Server::bind(config.clone()).await {
                Ok(server) => break server,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    eprintln!("bind {addr}: {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("server does not start: {error}"),
            }
        };
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            stop: Some(stop),
            serving: Some(serving),
        }
    }

    pub fn url(&self) -> String {
        ws_url(self.addr)
    }

    /// Stops the server and waits until its store is closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            tokio::time::timeout(WAIT, serving)
                .await
                .expect("the server stops in time")
                .expect("the server task does not panic")
                .expect("the server stops cleanly");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/v1/ws")
}

/// Client options for tests: quick reconnects.
pub fn options(url: String) -> ClientOptions {
    let mut options = ClientOptions::new(url);
    options.reconnect_delay_min = Duration::from_millis(20);
    options.reconnect_delay_max = Duration::from_millis(500);
    options.handshake_timeout = Duration::from_secs(5);
    options
}

/// The next event, or a panic after [`WAIT`].
pub async fn next_event(subscription: &mut Subscription) -> Event {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("no event on {} within {WAIT:?}", subscription.channel()))
        .unwrap_or_else(|| panic!("subscription {} closed", subscription.channel()))
}

/// The next event, which must be `subscribed`.
pub async fn subscribed(subscription: &mut Subscription) -> Event {
    let event = next_event(subscription).await;
    assert!(
        matches!(event, Event::Subscribed { .. }),
        "expected subscribed first, got {event:?}"
    );
    event
}

/// Collects messages until `count` arrived. Any `Broken`, `ContinuityLost` or `Gap` fails the
/// test: these tests are about paths where nothing may be lost.
pub async fn collect_messages(subscription: &mut Subscription, count: usize) -> Vec<Message> {
    let mut messages = Vec::with_capacity(count);
    while messages.len() < count {
        match next_event(subscription).await {
            Event::Message(message) => messages.push(*message),
            Event::Subscribed { .. } | Event::Stalled { .. } => {}
            other => panic!(
                "unexpected event after {} messages: {other:?}",
                messages.len()
            ),
        }
    }
    messages
}
