//! Publishing on behalf of an MQTT connection outside its PUBLISH flow: the checks every
//! publish passes ([`refusal`]), will messages (at once, or after their Will Delay Interval
//! unless the session is resumed first), and the retained index update after a retained
//! publish is durable.
//!
//! # Delayed wills
//! A will with a delay waits in [`PendingWills`] under its client id. A new connection that
//! resumes the session cancels it (MQTT-3.1.3-9); one that starts clean ends the session, so
//! the will goes out at once. A delayed will lives in memory only: a restart forgets it (the
//! session itself survives), which is logged when the server stops with wills pending.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use herald_core::{ChannelName, MessageId, NewMessage};
use herald_mqtt::session::AppendOutcome;

use super::MqttContext;
use crate::auth::{Operation, Principal};

/// How long a will's append may take before it is reported as unconfirmed.
const WILL_APPEND_TIMEOUT: Duration = Duration::from_secs(30);

/// A will waiting out its delay.
struct PendingWill {
    /// Tells the timer whether this is still the will it was started for.
    token: u64,
    principal: Option<Principal>,
    will: herald_mqtt::Will,
}

/// Wills waiting out their delay, by client id.
#[derive(Default)]
pub struct PendingWills {
    wills: Mutex<HashMap<String, PendingWill>>,
    tokens: AtomicU64,
}

impl PendingWills {
    /// Wills waiting right now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingWill>> {
        self.wills.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(
        &self,
        client_id: String,
        principal: Option<Principal>,
        will: herald_mqtt::Will,
    ) -> u64 {
        let token = self.tokens.fetch_add(1, Ordering::Relaxed) + 1;
        let pending = PendingWill {
            token,
            principal,
            will,
        };
        self.lock().insert(client_id, pending);
        token
    }

    /// Takes the pending will of `client_id` if it is still `token`'s.
    fn take_if(&self, client_id: &str, token: u64) -> Option<PendingWill> {
        let mut wills = self.lock();
        if wills
            .get(client_id)
            .is_some_and(|pending| pending.token == token)
        {
            wills.remove(client_id)
        } else {
            None
        }
    }
}

/// Why a connection with `principal` may not publish `message` to `channel` (permission,
/// limits, TTL bounds), if it may not.
pub fn refusal(
    context: &MqttContext,
    principal: Option<Principal>,
    channel: &ChannelName,
    message: &NewMessage,
) -> Option<AppendOutcome> {
    let state = &context.state;
    match principal {
        None => Some(AppendOutcome::NotAuthorized),
        Some(principal) => state
            .auth
            .authorize(principal, channel, Operation::Publish)
            .err()
            .map(|_| AppendOutcome::NotAuthorized),
    }
    .or_else(|| {
        let checked = message
            .validate(&state.limits)
            .and_then(|()| match message.ttl_ms {
                Some(ttl_ms) => state
                    .store
                    .policies()
                    .for_channel(channel)
                    .check_ttl(ttl_ms),
                None => Ok(()),
            });
        checked
            .err()
            .map(|error| AppendOutcome::Invalid(error.to_string()))
    })
}

/// Publishes a will now: checked like a PUBLISH of its connection, awaited (bounded) so it is
/// durable, or logged as lost.
pub async fn publish_will(
    context: &Arc<MqttContext>,
    principal: Option<Principal>,
    client_id: &str,
    will: herald_mqtt::Will,
) {
    let counters = &context.state.metrics.mqtt;
    if let Some(refused) = refusal(context, principal, &will.channel, &will.message) {
        counters
            .publishes_refused_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client_id, channel = %will.channel, ?refused, "MQTT will not published");
        return;
    }
    let retained = will
        .message
        .headers
        .contains_key(herald_mqtt::HEADER_RETAIN)
        .then(|| (will.channel.clone(), will.message.id.clone()));
    let ticket = context
        .state
        .store
        .append(will.channel.clone(), vec![will.message]);
    match tokio::time::timeout(WILL_APPEND_TIMEOUT, ticket).await {
        Ok(Ok(_)) => {
            if let Some((channel, id)) = retained {
                index_retained(context, channel, id).await;
            }
            counters
                .publishes_durable_total
                .fetch_add(1, Ordering::Relaxed);
            counters
                .wills_published_total
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client_id, channel = %will.channel, "MQTT will published");
        }
        Ok(Err(error)) => {
            counters
                .publishes_refused_total
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client_id, channel = %will.channel, %error, "MQTT will not stored");
        }
        Err(_) => {
            tracing::warn!(client_id, channel = %will.channel, "MQTT will not confirmed in time");
        }
    }
}

/// Publishes a will after its delay, unless [`session_reopened`] takes it first.
pub fn delay_will(
    context: &Arc<MqttContext>,
    principal: Option<Principal>,
    client_id: String,
    will: herald_mqtt::Will,
) {
    let delay = Duration::from_secs(u64::from(will.delay_secs));
    tracing::debug!(client_id, delay_secs = will.delay_secs, "MQTT will delayed");
    let token = context
        .pending_wills
        .insert(client_id.clone(), principal, will);
    let context = context.clone();
    let mut stopping = context.stopping.clone();
    tokio::spawn(async move {
        let stopped = tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = super::stopped(&mut stopping) => true,
        };
        let Some(pending) = context.pending_wills.take_if(&client_id, token) else {
            return;
        };
        if stopped {
            tracing::warn!(client_id, channel = %pending.will.channel, "the server stopped while this MQTT will waited out its delay; it is not published");
            return;
        }
        publish_will(&context, pending.principal, &client_id, pending.will).await;
    });
}

/// A connection opened `client_id`'s session: a will waiting out its delay is dropped when
/// the session is resumed (`clean` false: MQTT-3.1.3-9), and published at once when the
/// session starts clean (the old one ended).
pub async fn session_reopened(context: &Arc<MqttContext>, client_id: &str, clean: bool) {
    let pending = context.pending_wills.lock().remove(client_id);
    let Some(pending) = pending else {
        return;
    };
    if clean {
        publish_will(context, pending.principal, client_id, pending.will).await;
    } else {
        tracing::debug!(
            client_id,
            "MQTT session resumed within its will delay: will dropped"
        );
    }
}

/// Reads the stored retained message back (its position and time are the store's) and offers
/// it to the index.
pub async fn index_retained(context: &Arc<MqttContext>, channel: ChannelName, id: MessageId) {
    let store = context.state.store.clone();
    let read = tokio::task::spawn_blocking(move || store.message_by_id(&channel, &id)).await;
    match read {
        Ok(Ok(Some(message))) => context.retained.offer(&message),
        Ok(Ok(None)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot read a retained message back"),
        Err(error) => tracing::warn!(%error, "cannot read a retained message back"),
    }
}
