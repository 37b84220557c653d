//! Idle expiry: a durable subscriber that no connection has held for its `expires_after_ms`
//! is removed (durably), logged, counted and reported as a `subscriber.expired` lifecycle
//! event. A held subscriber is never idle. The sweep claims each candidate before removing
//! it, so it cannot race a connection taking the subscriber at the same moment: whoever
//! claims first wins, and a subscribe after the removal creates a new subscriber.

use std::sync::Arc;
use std::time::Duration;

use herald_core::engine::idle_deadline;
use tokio::sync::watch;

use super::{DurableContext, DurableCounters, Eviction, LifecycleEvent, now};

/// Sweeps every `durable.sweep_interval` until `stopping` turns true.
pub fn spawn(
    context: Arc<DurableContext>,
    mut stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let interval = context.config.sweep_interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stopping.wait_for(|stopping| *stopping) => return,
            }
            let removed = sweep(&context).await;
            if removed > 0 {
                tracing::info!(removed, "idle durable subscribers removed");
            }
        }
    })
}

/// One pass: removes every unheld subscriber past its idle deadline. Returns how many.
pub async fn sweep(context: &Arc<DurableContext>) -> usize {
    let store = context.store.clone();
    let Ok(states) = tokio::task::spawn_blocking(move || store.subscribers()).await else {
        return 0;
    };
    let mut removed = 0;
    for state in states {
        let idle = |state: &herald_core::SubscriberState| {
            idle_deadline(state).is_some_and(|deadline| deadline <= now())
        };
        if !idle(&state) || context.registry.is_held(&state.channel, &state.id) {
            continue;
        }
        let claim = context
            .registry
            .claim(
                &state.channel,
                &state.id,
                Eviction::Expired,
                Duration::from_secs(1),
            )
            .await;
        // The state may have changed between the listing and the claim.
        let current = context.store.subscriber(&state.channel, &state.id);
        let Some(current) = current.filter(|current| idle(current)) else {
            continue;
        };
        if let Err(error) = context
            .store
            .remove_subscriber(&current.channel, &current.id)
            .await
        {
            tracing::warn!(channel = %current.channel, subscriber = %current.id, %error, "idle subscriber not removed");
            continue;
        }
        drop(claim);
        removed += 1;
        DurableCounters::add(&context.counters.subscribers_expired, 1);
        tracing::info!(
            channel = %current.channel,
            subscriber = %current.id,
            acked = ?current.acked_position().map(|acked| acked.to_string()),
            last_active_ms = current.last_active.0,
            expires_after_ms = current.options.expires_after_ms,
            "durable subscriber expired after being idle"
        );
        context.lifecycle(LifecycleEvent::SubscriberExpired {
            channel: current.channel.clone(),
            subscriber: current.id.clone(),
            acked: current.acked_position(),
            last_active: current.last_active,
        });
    }
    removed
}
