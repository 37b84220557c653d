//! The realtime side of a server: the live hub wired to the store, the shared pump context,
//! connection counters and the shutdown signal WebSocket and SSE connections watch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_core::ChannelName;
use herald_log::LogStore;
use herald_protocol::ws::{Heartbeat, HeartbeatTag, ServerFrame};
use tokio::sync::watch;

use crate::config::RealtimeConfig;
use crate::hub::Hub;
use crate::live::{LiveContext, LiveCounters};

pub struct Realtime {
    pub config: RealtimeConfig,
    pub live: LiveContext,
    /// Turns true when the server starts shutting down; long-lived connections close then.
    pub stopping: watch::Receiver<bool>,
    /// Open WebSocket and SSE connections.
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    /// `http.cors_origins`: browser origins allowed to read SSE streams.
    pub cors_origins: Vec<String>,
}

impl Realtime {
    /// Installs a new hub as the store's durable listener.
    pub fn new(
        store: Arc<dyn LogStore>,
        config: RealtimeConfig,
        cors_origins: Vec<String>,
        stopping: watch::Receiver<bool>,
    ) -> Arc<Realtime> {
        let hub = Arc::new(Hub::new(config.live_buffer_messages));
        store.set_durable_listener(hub.clone());
        Arc::new(Realtime {
            live: LiveContext {
                store,
                hub,
                page_messages: config.catch_up_page_messages,
                counters: Arc::new(LiveCounters::default()),
            },
            config,
            stopping,
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            cors_origins,
        })
    }

    pub fn connections_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connections_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// The `heartbeat` frame for these channels: each one's newest durable position (null for
    /// a channel without messages), read from the store's in-memory index.
    pub fn heartbeat<'a>(&self, channels: impl Iterator<Item = &'a ChannelName>) -> ServerFrame {
        let store = &self.live.store;
        let channels = channels
            .map(|channel| {
                let top = store
                    .channel_status(channel)
                    .ok()
                    .flatten()
                    .map(|status| status.top.to_string());
                (channel.to_string(), top)
            })
            .collect();
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        ServerFrame::Heartbeat(Heartbeat {
            kind: HeartbeatTag::Tag,
            time,
            channels,
        })
    }
}
