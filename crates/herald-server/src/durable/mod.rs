//! At-least-once (durable) subscribers on the server: the tokio side of herald-core's
//! [`DurableMachine`](herald_core::engine::DurableMachine).
//!
//! - [`registry`]: who holds each subscriber, and the fence that makes a takeover wait for
//!   the previous holder's last snapshot.
//! - [`pump`]: one task per held subscriber; performs the machine's actions (log reads,
//!   snapshots riding the group commit, dead-letter publishes) and hands frames to a
//!   [`DurableSink`]: a WebSocket connection (`ws_durable`) or a webhook worker.
//! - [`sweeper`]: removes subscribers idle past their expiry.
//! - [`admin`]: `GET`/`DELETE /v1/channels/{channel}/subscribers/{id}`.
//!
//! Lifecycle events a backend may want (a subscriber's continuity lost, a subscriber expired)
//! go to the [`LifecycleListener`] installed by the webhooks, if any.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use herald_core::{
    ChannelName, ContinuityReason, Position, SubscriberId, SubscriberOptions, SubscriberState,
    Timestamp,
};
use herald_log::LogStore;

use crate::config::DurableConfig;
use crate::hub::Hub;

pub mod admin;
pub mod pump;
pub mod registry;
pub mod sweeper;

pub use pump::{Control, DurableRequest, DurableSink, Gone, PumpEnd};
pub use registry::{Eviction, Registry};

/// Counters for `/metrics`, shared by every durable pump of a server.
#[derive(Debug, Default)]
pub struct DurableCounters {
    /// Pumps running (held subscribers with a connection or a webhook worker).
    pub subscriptions: Arc<AtomicU64>,
    /// Delivery frames handed out, first and repeated.
    pub deliveries: AtomicU64,
    /// Of those, repeated deliveries (delivery count above 1).
    pub redeliveries: AtomicU64,
    pub acks: AtomicU64,
    pub acks_rejected: AtomicU64,
    /// Snapshots written (each rides a group commit).
    pub persists: AtomicU64,
    pub dead_letters: AtomicU64,
    pub expired_notices: AtomicU64,
    pub continuity_lost: AtomicU64,
    pub takeovers: AtomicU64,
    /// Subscribers removed by idle expiry.
    pub subscribers_expired: AtomicU64,
    pub subscribers_deleted: AtomicU64,
}

impl DurableCounters {
    pub fn add(counter: &AtomicU64, count: u64) {
        counter.fetch_add(count, Ordering::Relaxed);
    }
}

/// Something a backend may want to hear about a durable subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// The subscriber's position could not be continued: `from..=to` is lost for it.
    ContinuityLost {
        channel: ChannelName,
        subscriber: SubscriberId,
        from: Position,
        to: Option<Position>,
        reason: ContinuityReason,
    },
    /// The subscriber was idle past its expiry and was removed.
    SubscriberExpired {
        channel: ChannelName,
        subscriber: SubscriberId,
        /// `None`: it never got a message (its channel had none).
        acked: Option<Position>,
        last_active: Timestamp,
    },
}

impl LifecycleEvent {
    /// The event's name in webhook rules and payloads.
    pub fn name(&self) -> &'static str {
        match self {
            LifecycleEvent::ContinuityLost { .. } => "subscriber.continuity_lost",
            LifecycleEvent::SubscriberExpired { .. } => "subscriber.expired",
        }
    }

    pub fn channel(&self) -> &ChannelName {
        match self {
            LifecycleEvent::ContinuityLost { channel, .. }
            | LifecycleEvent::SubscriberExpired { channel, .. } => channel,
        }
    }
}

/// Hears lifecycle events. Called from pumps and the sweeper: must not block.
pub trait LifecycleListener: Send + Sync + 'static {
    fn on_event(&self, event: LifecycleEvent);
}

/// What every durable pump, the sweeper and the admin endpoints of a server share.
pub struct DurableContext {
    pub store: Arc<dyn LogStore>,
    pub hub: Arc<Hub>,
    pub page_messages: usize,
    pub config: DurableConfig,
    pub registry: Arc<Registry>,
    pub counters: Arc<DurableCounters>,
    lifecycle: OnceLock<Arc<dyn LifecycleListener>>,
}

impl DurableContext {
    pub fn new(
        store: Arc<dyn LogStore>,
        hub: Arc<Hub>,
        page_messages: usize,
        config: DurableConfig,
    ) -> Arc<DurableContext> {
        Arc::new(DurableContext {
            store,
            hub,
            page_messages,
            config,
            registry: Arc::new(Registry::default()),
            counters: Arc::new(DurableCounters::default()),
            lifecycle: OnceLock::new(),
        })
    }

    /// Installs the lifecycle listener (once; later calls are ignored).
    pub fn set_lifecycle_listener(&self, listener: Arc<dyn LifecycleListener>) {
        let _ = self.lifecycle.set(listener);
    }

    pub fn lifecycle(&self, event: LifecycleEvent) {
        if let Some(listener) = self.lifecycle.get() {
            listener.on_event(event);
        }
    }

    /// The options of a new subscriber: each one the request leaves out takes the configured
    /// default; a request outside the bounds is refused.
    pub fn options(
        &self,
        requested: &herald_protocol::ws::DurableOptions,
    ) -> Result<SubscriberOptions, herald_core::InvalidInput> {
        let config = &self.config;
        let invalid = |message: String| herald_core::InvalidInput::request(message);
        let options = SubscriberOptions {
            inflight_max: requested.inflight_max.unwrap_or(config.inflight_max),
            ack_wait_ms: requested
                .ack_wait_ms
                .unwrap_or(millis(config.ack_wait.as_millis())),
            max_deliveries: requested.max_deliveries.unwrap_or(config.max_deliveries),
            expires_after_ms: requested
                .expires_after_ms
                .unwrap_or(millis(config.expires_after.as_millis())),
        };
        if options.inflight_max == 0 || options.inflight_max > config.inflight_max_limit {
            return Err(invalid(format!(
                "options.inflight_max must be between 1 and {}",
                config.inflight_max_limit
            )));
        }
        if options.max_deliveries == 0 {
            return Err(invalid("options.max_deliveries must be at least 1".into()));
        }
        if options.ack_wait_ms < 10 {
            return Err(invalid("options.ack_wait_ms must be at least 10".into()));
        }
        Ok(options)
    }
}

fn millis(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// Wall-clock time as the engine counts it.
pub fn now() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(millis(since.as_millis()))
}

/// The stored state's word on a subscriber, for introspection: `(pending, lag)` against the
/// channel's top. `lag` counts the serials after the acked position; `pending` those of them
/// not yet done (acked individually, dead-lettered or expired). A top in another epoch counts
/// all of that epoch (the subscriber will be told its continuity is lost, then get them), as
/// does any top for a subscriber not placed yet (it gets the channel from its first message).
pub fn backlog(state: &SubscriberState, top: Option<&Position>) -> (u64, u64) {
    let Some(top) = top else {
        return (0, 0);
    };
    if state.epoch.as_ref() != Some(&top.epoch) {
        return (top.serial.0, top.serial.0);
    }
    let lag = top.serial.0.saturating_sub(state.acked_through.0);
    let done_above = state
        .acked_above
        .iter()
        .filter(|serial| **serial <= top.serial)
        .count() as u64;
    (lag.saturating_sub(done_above), lag)
}
