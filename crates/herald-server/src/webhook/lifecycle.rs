//! Lifecycle events made durable: each `subscriber.continuity_lost` / `subscriber.expired`
//! event is appended as a message to its namespace's lifecycle channel
//! `<namespace>:herald.lifecycle` (named by the namespace of the subscriber's channel; bare
//! channel names belong to `default`, so theirs is `default:herald.lifecycle`). The webhook
//! workers of rules that want lifecycle events deliver from that channel like any other, so
//! the events survive a restart and are retried like messages.
//!
//! # Invariants
//! - The message's `name` is the event name and its `data` a JSON object with the event's
//!   fields; its id is derived from both, so an event reported twice (a pump retried after a
//!   crash) is stored once within the namespace's dedupe window.
//! - Only events some rule wants are recorded: namespaces without such a rule get no
//!   lifecycle channel.
//! - Recording never blocks the caller (pumps, the sweeper): the append runs on its own task.
//!   An event whose append fails is logged and counted, not retried (the gap is reported).

use std::collections::HashSet;
use std::sync::Arc;

use herald_core::{ChannelName, Data, MessageId, NewMessage};
use herald_log::LogStore;
use serde_json::json;

use super::WebhookCounters;
use super::config::WebhookEvent;
use crate::config::DEFAULT_NAMESPACE;
use crate::durable::{DurableCounters, LifecycleEvent, LifecycleListener};

/// The part of a lifecycle channel's name after the namespace.
pub const LIFECYCLE_CHANNEL_SUFFIX: &str = "herald.lifecycle";

/// The namespace a channel belongs to (`default` for bare names).
pub fn namespace_of(channel: &ChannelName) -> &str {
    channel.namespace().unwrap_or(DEFAULT_NAMESPACE)
}

/// `<namespace>:herald.lifecycle`. `None` only for a namespace no channel could have.
pub fn lifecycle_channel(namespace: &str) -> Option<ChannelName> {
    ChannelName::parse(&format!("{namespace}:{LIFECYCLE_CHANNEL_SUFFIX}")).ok()
}

/// Whether `channel` is a lifecycle channel.
pub fn is_lifecycle_channel(channel: &ChannelName) -> bool {
    channel
        .as_str()
        .split_once(':')
        .is_some_and(|(_, rest)| rest == LIFECYCLE_CHANNEL_SUFFIX)
}

fn event_kind(event: &LifecycleEvent) -> WebhookEvent {
    match event {
        LifecycleEvent::ContinuityLost { .. } => WebhookEvent::ContinuityLost,
        LifecycleEvent::SubscriberExpired { .. } => WebhookEvent::SubscriberExpired,
    }
}

/// The stored form of an event.
pub fn event_message(event: &LifecycleEvent) -> NewMessage {
    let data = match event {
        LifecycleEvent::ContinuityLost {
            channel,
            subscriber,
            from,
            to,
            reason,
        } => json!({
            "channel": channel.as_str(),
            "subscriber": subscriber.as_str(),
            "from": from.to_string(),
            "to": to.as_ref().map(ToString::to_string),
            "reason": reason.as_str(),
        }),
        LifecycleEvent::SubscriberExpired {
            channel,
            subscriber,
            acked,
            last_active,
        } => json!({
            "channel": channel.as_str(),
            "subscriber": subscriber.as_str(),
            "acked": acked.as_ref().map(ToString::to_string),
            "last_active": last_active.0,
        }),
    };
    let data = serde_json::to_vec(&data).expect("a JSON value serialises");
    let name = event.name();
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"herald:lifecycle:v1:");
    hasher.update(&(name.len() as u64).to_le_bytes());
    hasher.update(name.as_bytes());
    hasher.update(&data);
    let hex = hasher.finalize().to_hex();
    NewMessage {
        id: MessageId::parse(&format!("lc-{}", &hex[..32])).expect("hex is a valid message id"),
        name: Some(name.to_owned()),
        headers: Default::default(),
        data: Data::Json(data.into()),
        ttl_ms: None,
    }
}

/// The [`LifecycleListener`] installed when some rule wants lifecycle events.
pub struct LifecycleRecorder {
    pub(super) store: Arc<dyn LogStore>,
    /// (namespace, event) pairs some rule wants.
    pub(super) wanted: HashSet<(String, WebhookEvent)>,
    pub(super) counters: Arc<WebhookCounters>,
}

impl LifecycleListener for LifecycleRecorder {
    fn on_event(&self, event: LifecycleEvent) {
        let namespace = namespace_of(event.channel());
        if !self
            .wanted
            .contains(&(namespace.to_owned(), event_kind(&event)))
        {
            return;
        }
        let Some(channel) = lifecycle_channel(namespace) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                event = event.name(),
                "no runtime to record a lifecycle event on"
            );
            return;
        };
        let ticket = self
            .store
            .append(channel.clone(), vec![event_message(&event)]);
        let counters = self.counters.clone();
        runtime.spawn(async move {
            match ticket.await {
                Ok(_) => DurableCounters::add(&counters.lifecycle_recorded, 1),
                Err(error) => {
                    DurableCounters::add(&counters.lifecycle_record_failures, 1);
                    tracing::error!(
                        %channel,
                        event = event.name(),
                        subscriber_channel = %event.channel(),
                        %error,
                        "lifecycle event not recorded: its webhooks will not get it"
                    );
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use herald_core::{Position, SubscriberId, Timestamp};

    use super::*;

    #[test]
    fn lifecycle_channels_are_per_namespace_and_recognised() {
        let bare = ChannelName::parse("updates").unwrap();
        assert_eq!(namespace_of(&bare), "default");
        let channel = lifecycle_channel("chat").unwrap();
        assert_eq!(channel.as_str(), "chat:herald.lifecycle");
        assert!(is_lifecycle_channel(&channel));
        assert!(is_lifecycle_channel(&lifecycle_channel("default").unwrap()));
        assert!(!is_lifecycle_channel(
            &ChannelName::parse("chat:room").unwrap()
        ));
    }

    #[test]
    fn the_same_event_gets_the_same_id_and_another_event_another() {
        let expired = |acked: &str| LifecycleEvent::SubscriberExpired {
            channel: ChannelName::parse("chat:a").unwrap(),
            subscriber: SubscriberId::parse("phone-1").unwrap(),
            acked: Some(Position::parse(acked).unwrap()),
            last_active: Timestamp(42),
        };
        let first = event_message(&expired("E1:5"));
        assert_eq!(first.id, event_message(&expired("E1:5")).id);
        assert_ne!(first.id, event_message(&expired("E1:6")).id);
        assert_eq!(first.name.as_deref(), Some("subscriber.expired"));
        let Data::Json(bytes) = &first.data else {
            panic!("JSON data")
        };
        let data: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(data["subscriber"], "phone-1");
        assert_eq!(data["channel"], "chat:a");
    }
}
