//! Subscriber tasks of a verification run: WebSocket subscriptions through the SDK (each
//! through its own fault proxy), recording every delivery and notice into the history.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_client::{BreakKind, Client, ClientOptions, Event, Guarantee, SubscribeOptions};

use super::history::{Record, Recorder};
use super::sse;

use super::run::*;

/// What a subscriber task needs.
pub struct SubscriberContext {
    pub name: String,
    /// `exactly-once` or `at-most-once`.
    pub guarantee: String,
    pub channels: Vec<String>,
    /// `http://PROXY` for this subscriber.
    pub base_url: reqwest::Url,
    pub key: Option<String>,
    /// SSE `from=` of the first connection (every channel from its start).
    pub sse_from: Option<String>,
    /// An SSE connection silent this long is dropped.
    pub silence_max: Duration,
    pub(super) recorder: Recorder,
    pub(super) positions: Positions,
    pub(super) progress: Arc<Progress>,
}

impl SubscriberContext {
    pub fn exactly_once(&self) -> bool {
        self.guarantee == "exactly-once"
    }

    pub fn record(&self, record: Record) {
        self.recorder.record(record);
    }

    pub fn delivered(&self, channel: &str, serial: u64) {
        self.progress.delivered.fetch_add(1, Ordering::Relaxed);
        self.advance(channel, serial);
    }

    /// A notice or `subscribed` accounted for everything up to `to`.
    pub fn accounted(&self, channel: &str, to: Option<&str>) {
        if let Some(serial) = to
            .and_then(|to| to.rsplit_once(':'))
            .and_then(|(_, serial)| serial.parse().ok())
        {
            self.advance(channel, serial);
        }
    }

    fn advance(&self, channel: &str, serial: u64) {
        let mut positions = self.positions.lock().expect("positions lock");
        let held = positions
            .entry((self.name.clone(), channel.to_owned()))
            .or_default();
        *held = (*held).max(serial);
    }

    /// A subscription to one channel started for the first time.
    pub fn first_subscribed(&self) {
        self.progress.subscribed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One WebSocket subscriber (the SDK), subscribed to every channel.
pub(super) async fn ws_subscriber(context: Arc<SubscriberContext>, stop: Stop) {
    let mut options = ClientOptions::new(format!(
        "ws://{}/v1/ws",
        context
            .base_url
            .host_str()
            .zip(context.base_url.port())
            .map_or_else(String::new, |(host, port)| format!("{host}:{port}"))
    ));
    options.key = context.key.clone();
    options.reconnect_delay_min = Duration::from_millis(20);
    options.reconnect_delay_max = Duration::from_secs(1);
    options.handshake_timeout = Duration::from_secs(5);
    let client = match Client::connect(options) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("herald verify: {}: {error}", context.name);
            return;
        }
    };
    let connections = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for channel in &context.channels {
        let options = if context.exactly_once() {
            SubscribeOptions::from_oldest()
        } else {
            SubscribeOptions {
                guarantee: Guarantee::AtMostOnce,
                ..SubscribeOptions::default()
            }
        };
        let subscription = match client.subscribe(channel, options).await {
            Ok(subscription) => subscription,
            Err(error) => {
                context.record(Record::SubscriptionError {
                    subscriber: context.name.clone(),
                    channel: channel.clone(),
                    code: "subscribe_failed".into(),
                    message: error.to_string(),
                });
                continue;
            }
        };
        tasks.push(tokio::spawn(ws_subscription(
            context.clone(),
            client.clone(),
            connections.clone(),
            channel.clone(),
            subscription,
            stop.clone(),
        )));
    }
    for task in tasks {
        let _ = task.await;
    }
    client.close().await;
}

pub(super) async fn ws_subscription(
    context: Arc<SubscriberContext>,
    client: Client,
    connections: Arc<AtomicU64>,
    channel: String,
    mut subscription: herald_client::Subscription,
    mut stop: Stop,
) {
    let subscriber = context.name.clone();
    let mut subscribed_before = false;
    loop {
        let event = tokio::select! {
            event = subscription.next() => event,
            () = stop.wait() => return,
        };
        let Some(event) = event else { return };
        match event {
            Event::Subscribed {
                continuity,
                after,
                top,
                ..
            } => {
                if subscribed_before {
                    let now = client.connection_state().connections;
                    if connections.fetch_max(now, Ordering::Relaxed) < now {
                        context.record(Record::Reconnect {
                            subscriber: subscriber.clone(),
                        });
                    }
                } else {
                    subscribed_before = true;
                    context.first_subscribed();
                }
                let after = after.map(|after| after.to_string());
                context.accounted(&channel, after.as_deref());
                context.record(Record::Subscribed {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    continuity: sse::continuity_name(continuity),
                    after,
                    top: top.map(|top| top.to_string()),
                });
            }
            Event::Message(message) => {
                context.delivered(&channel, message.position.serial.0);
                context.record(Record::Delivery {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    id: message.id.clone(),
                    epoch: message.position.epoch.to_string(),
                    serial: message.position.serial.0,
                });
            }
            Event::ContinuityLost { from, to, reason } => {
                let to = to.map(|to| to.to_string());
                context.accounted(&channel, to.as_deref());
                context.record(Record::Notice {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    notice: "continuity_lost".into(),
                    from: from.to_string(),
                    to,
                    reason,
                });
            }
            Event::Gap { from, to, reason } => {
                notice(
                    &context,
                    &channel,
                    "gap",
                    from.to_string(),
                    to.to_string(),
                    reason,
                );
            }
            Event::Skip { from, to, reason } => {
                notice(
                    &context,
                    &channel,
                    "skip",
                    from.to_string(),
                    to.to_string(),
                    reason,
                );
            }
            Event::Broken(broken) => {
                let kind = match &broken.kind {
                    BreakKind::Prev { .. } => "prev",
                    BreakKind::Hole { .. } => "hole",
                    BreakKind::Epoch { .. } => "epoch",
                    BreakKind::Chain { .. } => "chain",
                    BreakKind::Malformed { .. } => "malformed",
                    _ => "other",
                };
                context.record(Record::Broken {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    break_kind: kind.into(),
                    detail: format!("{broken:?}"),
                });
            }
            Event::Error { code, message, .. } => context.record(Record::SubscriptionError {
                subscriber: subscriber.clone(),
                channel: channel.clone(),
                code,
                message,
            }),
            Event::Closed { reason } => {
                context.record(Record::SubscriptionError {
                    subscriber: subscriber.clone(),
                    channel: channel.clone(),
                    code: "closed".into(),
                    message: reason,
                });
                return;
            }
            _ => {} // hints (not asked for), stalled (the drain checks tops itself)
        }
    }
}

/// Records a `gap` or `skip` notice.
pub(super) fn notice(
    context: &SubscriberContext,
    channel: &str,
    kind: &str,
    from: String,
    to: String,
    reason: String,
) {
    context.accounted(channel, Some(&to));
    context.record(Record::Notice {
        subscriber: context.name.clone(),
        channel: channel.to_owned(),
        notice: kind.to_owned(),
        from,
        to: Some(to),
        reason,
    });
}
