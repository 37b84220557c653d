//! The MQTT 3.1.1/5.0 listener over TCP, and over WebSocket (`GET /mqtt`, subprotocol
//! `mqtt`): a thin driver of `herald_mqtt::Session`.
//!
//! Bytes are decoded by rmqtt-codec (the protocol level is read from the CONNECT first), each
//! packet goes to the connection's sans-IO session, and its actions are carried out here:
//! packets to the writer task, credentials to [`crate::auth::Authenticator`] (the password is
//! an API key; dev mode allows no password), appends to the store, subscriptions to one
//! pattern feed of the hub per connection.
//!
//! # Contracts
//! - A PUBLISH is acknowledged only after `store.append` resolved: PUBACK/PUBREC mean durable.
//! - ACL: publishing needs `publish` on the mapped channel's namespace; a filter needs
//!   `subscribe` on its channel (exact filters) or its namespace (`ns/+`, `ns/a/#`), and every
//!   delivery of a wildcard filter is checked against `subscribe` on its own channel, so a
//!   filter like `#` only ever carries channels the key may read. Client ids and usernames play
//!   no part in authorization.
//! - Retained messages ([`retained`]): a retained PUBLISH is stored in the log like any
//!   other (header `mqtt-retain: 1`) and, once durable and before its PUBACK, becomes the
//!   topic's retained message; an empty one clears it. New subscriptions get the retained
//!   messages of their filter (each checked against `subscribe` on its channel). The index is
//!   rebuilt from the log at start.
//! - Clean sessions get live deliveries: a connection receives the messages made durable
//!   while its subscription exists. Each connection has one bounded feed
//!   (`outbound_queue_messages`); a full feed drops and counts (`mqtt_deliveries_dropped_total`
//!   and a warning when the connection ends).
//! - Persistent sessions ([`sessions`]: v3 `clean_session = 0`, v5 Session Expiry Interval)
//!   are one state record each in the store, and are served from the log: what a session
//!   owes (while offline, behind a full window or a full feed) is read back from the channel
//!   logs, never queued in memory and never dropped. One connection at a time serves a client
//!   id; a new one takes the session over.
//!
//! # Layout
//! - [`MqttConfig`]: the `[mqtt]` section.
//! - `connection`: one connection: reader loop, writer task, action execution.
//! - [`retained`]: the retained message of each topic, rebuilt from the log at start.
//! - [`sessions`]: persistent sessions in the store, their reads and their expiry.
//! - [`publish`]: the checks of every publish, wills (delayed or not), the retained index
//!   update.
//! - [`shared`]: shared subscription groups (`$share/name/filter`).
//! - [`websocket`]: MQTT over WebSocket: the binary messages are the same byte stream.

mod connection;
pub mod publish;
pub mod retained;
pub mod sessions;
pub mod shared;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::ConfigError;
use crate::http::AppState;

/// The `[mqtt]` configuration section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Whether the MQTT listener runs: on by default (`herald serve --no-mqtt` or
    /// `enabled = false` turns it off; `--mqtt ADDR` turns it on at ADDR).
    pub enabled: bool,
    /// TCP address of the listener; port 0 picks a free port (the real one is printed).
    pub listen: SocketAddr,
    /// QoS 1/2 publishes a client may have unacknowledged (v5 Receive Maximum); a v5 client
    /// exceeding it is disconnected with 0x93.
    pub receive_maximum: u16,
    /// Outbound QoS 1/2 deliveries awaiting the client's acknowledgement, at most (a v5
    /// client's smaller Receive Maximum wins).
    pub outbound_inflight_max: u16,
    /// Deliveries waiting for a slot in that window, then messages queued from the log's live
    /// feed, per connection. Beyond either, deliveries are dropped and counted.
    pub outbound_queue_messages: usize,
    /// Largest packet accepted, in bytes (v5 Maximum Packet Size); bigger ones close the
    /// connection (v5 reason 0x95).
    pub max_packet_bytes: u32,
    /// Longest keep alive granted; clients asking for more, or for none, get this one.
    #[serde(with = "crate::config::human_duration")]
    pub keep_alive_max: Duration,
    /// A connection must send CONNECT within this time.
    #[serde(with = "crate::config::human_duration")]
    pub connect_timeout: Duration,
    /// Subscriptions per connection (v5 SUBACK 0x97 beyond).
    pub subscriptions_per_connection: usize,
    /// Appends in flight per connection (QoS 0 included); reading pauses while it is reached.
    pub publishes_in_flight_max: usize,
    /// Topic aliases a v5 client may set for its publishes (Topic Alias Maximum; 0: none).
    pub topic_alias_maximum: u16,
    /// Longest a persistent session outlives its connection: a v5 Session Expiry Interval is
    /// capped to it (and told in CONNACK), a v3 `clean_session = 0` session gets it. 0 turns
    /// persistent sessions off (every session is clean; CONNACK says so).
    #[serde(with = "crate::config::human_duration")]
    pub session_expiry_max: Duration,
    /// How often expired sessions are removed from the store.
    #[serde(with = "crate::config::human_duration")]
    pub session_sweep_interval: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            receive_maximum: 64,
            outbound_inflight_max: 64,
            outbound_queue_messages: 1024,
            max_packet_bytes: 1024 * 1024,
            keep_alive_max: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            subscriptions_per_connection: 100,
            publishes_in_flight_max: 256,
            topic_alias_maximum: 32,
            session_expiry_max: Duration::from_secs(7 * 24 * 3600),
            session_sweep_interval: Duration::from_secs(60),
        }
    }
}

impl MqttConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.receive_maximum == 0 {
            return Err(ConfigError::invalid(
                "mqtt.receive_maximum",
                "must be at least 1",
            ));
        }
        if self.outbound_inflight_max == 0 {
            return Err(ConfigError::invalid(
                "mqtt.outbound_inflight_max",
                "must be at least 1",
            ));
        }
        if self.outbound_queue_messages == 0 || self.publishes_in_flight_max == 0 {
            return Err(ConfigError::invalid(
                "mqtt",
                "outbound_queue_messages and publishes_in_flight_max must be at least 1",
            ));
        }
        if self.max_packet_bytes < 1024 || self.max_packet_bytes > 268_435_455 {
            return Err(ConfigError::invalid(
                "mqtt.max_packet_bytes",
                "must be between 1024 and 268435455 (MQTT's largest packet)",
            ));
        }
        let keep_alive_secs = self.keep_alive_max.as_secs();
        if keep_alive_secs == 0 || keep_alive_secs > u64::from(u16::MAX) {
            return Err(ConfigError::invalid(
                "mqtt.keep_alive_max",
                "must be between 1s and 65535s",
            ));
        }
        if self.session_expiry_max.as_secs() > u64::from(u32::MAX) {
            return Err(ConfigError::invalid(
                "mqtt.session_expiry_max",
                "must be at most 4294967295s (MQTT's largest Session Expiry Interval)",
            ));
        }
        if self.session_sweep_interval.is_zero() {
            return Err(ConfigError::invalid(
                "mqtt.session_sweep_interval",
                "must be positive",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "mqtt.connect_timeout",
                "must be positive",
            ));
        }
        Ok(())
    }

    fn session_config(&self) -> herald_mqtt::SessionConfig {
        herald_mqtt::SessionConfig {
            receive_maximum: self.receive_maximum,
            outbound_inflight_max: self.outbound_inflight_max,
            outbound_pending_max: self.outbound_queue_messages,
            keep_alive_max_secs: u16::try_from(self.keep_alive_max.as_secs()).unwrap_or(u16::MAX),
            max_packet_bytes: self.max_packet_bytes,
            subscriptions_max: self.subscriptions_per_connection,
            topic_alias_maximum: self.topic_alias_maximum,
            session_expiry_max_secs: u32::try_from(self.session_expiry_max.as_secs())
                .unwrap_or(u32::MAX),
            ..herald_mqtt::SessionConfig::default()
        }
    }
}

/// MQTT counters, for `/metrics` and logs.
#[derive(Debug, Default)]
pub struct MqttCounters {
    /// Open connections.
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    /// PUBLISH packets made durable.
    pub publishes_durable_total: AtomicU64,
    /// PUBLISH packets not stored: refused (ACL, limits) or failed (store overloaded or down).
    /// QoS 1/2 publishers were told (v5 reason code, v3 disconnect); QoS 0 ones only when
    /// refused by the ACL.
    pub publishes_refused_total: AtomicU64,
    /// Deliveries dropped: full feed or window queue, or over the client's packet size.
    pub deliveries_dropped_total: AtomicU64,
    /// Connections closed for a protocol violation or a malformed packet.
    pub protocol_errors_total: AtomicU64,
    /// Will messages published (connections that ended without a clean DISCONNECT).
    pub wills_published_total: AtomicU64,
    /// Persistent sessions resumed by a new connection.
    pub sessions_resumed_total: AtomicU64,
    /// Persistent sessions removed because they expired.
    pub sessions_expired_total: AtomicU64,
    /// Connections closed because a new connection took their client id over.
    pub sessions_taken_over_total: AtomicU64,
    /// Times a persistent session's position on a channel was no longer retained: the
    /// messages in between were lost to it (logged with the range; v5 clients are told).
    pub sessions_continuity_lost_total: AtomicU64,
}

impl MqttCounters {
    /// Prometheus text lines.
    pub fn render(&self) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            "# TYPE herald_mqtt_connections gauge\nherald_mqtt_connections {}\n\
             # TYPE herald_mqtt_connections_total counter\nherald_mqtt_connections_total {}\n\
             # TYPE herald_mqtt_publishes_durable_total counter\nherald_mqtt_publishes_durable_total {}\n\
             # TYPE herald_mqtt_publishes_refused_total counter\nherald_mqtt_publishes_refused_total {}\n\
             # TYPE herald_mqtt_deliveries_dropped_total counter\nherald_mqtt_deliveries_dropped_total {}\n\
             # TYPE herald_mqtt_protocol_errors_total counter\nherald_mqtt_protocol_errors_total {}\n\
             # TYPE herald_mqtt_wills_published_total counter\nherald_mqtt_wills_published_total {}\n\
             # TYPE herald_mqtt_sessions_resumed_total counter\nherald_mqtt_sessions_resumed_total {}\n\
             # TYPE herald_mqtt_sessions_expired_total counter\nherald_mqtt_sessions_expired_total {}\n\
             # TYPE herald_mqtt_sessions_taken_over_total counter\nherald_mqtt_sessions_taken_over_total {}\n\
             # TYPE herald_mqtt_sessions_continuity_lost_total counter\nherald_mqtt_sessions_continuity_lost_total {}\n",
            load(&self.connections),
            load(&self.connections_total),
            load(&self.publishes_durable_total),
            load(&self.publishes_refused_total),
            load(&self.deliveries_dropped_total),
            load(&self.protocol_errors_total),
            load(&self.wills_published_total),
            load(&self.sessions_resumed_total),
            load(&self.sessions_expired_total),
            load(&self.sessions_taken_over_total),
            load(&self.sessions_continuity_lost_total),
        )
    }
}

/// What every connection shares.
pub struct MqttContext {
    pub state: AppState,
    pub config: MqttConfig,
    pub session_config: herald_mqtt::SessionConfig,
    pub retained: retained::RetainedIndex,
    /// The connection holding each client id.
    pub sessions: Arc<sessions::SessionRegistry>,
    /// Wills waiting out their Will Delay Interval.
    pub pending_wills: publish::PendingWills,
    /// Shared subscription groups.
    pub shared: Arc<shared::SharedGroups>,
    pub stopping: watch::Receiver<bool>,
}

/// Completes once the server is stopping (the guard of `wait_for` is not `Send`: drop it here).
pub(crate) async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

/// Accepts connections until `stopping` turns true, then gives open connections a moment to
/// send their DISCONNECT (v5 0x8B) and aborts what is left.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    config: MqttConfig,
    mut stopping: watch::Receiver<bool>,
    ready: watch::Sender<Option<std::sync::Weak<MqttContext>>>,
) {
    let index = retained::RetainedIndex::default();
    let store = state.store.clone();
    // Before the first connection: a subscriber must see what was retained before a restart.
    let index = tokio::task::spawn_blocking(move || {
        index.rebuild(store.as_ref());
        index
    })
    .await
    .unwrap_or_default();
    if !index.is_empty() {
        tracing::info!(topics = index.len(), "MQTT retained messages loaded");
    }
    let context = Arc::new(MqttContext {
        session_config: config.session_config(),
        retained: index,
        sessions: Arc::default(),
        pending_wills: publish::PendingWills::default(),
        shared: Arc::new(shared::SharedGroups::new(
            state.realtime.live.hub.clone(),
            state.auth.clone(),
            config.outbound_queue_messages,
        )),
        state,
        config,
        stopping: stopping.clone(),
    });
    let sweeper = sessions::spawn_sweeper(
        context.clone(),
        context.config.session_sweep_interval,
        stopping.clone(),
    );
    // MQTT over WebSocket (`GET /mqtt`) serves connections with the same context; weak, so
    // that the context (which holds the state) does not keep itself alive.
    let _ = ready.send(Some(Arc::downgrade(&context)));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "cannot set TCP_NODELAY");
                    }
                    connections.spawn(connection::run(stream, peer.to_string(), context.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopped(&mut stopping) => break,
        }
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drained)
        .await
        .is_err()
    {
        connections.abort_all();
    }
    sweeper.abort();
}
