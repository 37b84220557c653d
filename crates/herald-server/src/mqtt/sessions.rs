//! Persistent MQTT sessions in the store: opening (resume, clean start, expiry on open), the
//! reads a resumed or lagging session makes from the channel logs, and the expiry sweep.
//!
//! A session is one state record (`herald_log::LogStore::save_state`) under
//! `herald_mqtt::session::session_key(client_id)`, riding the log's group commit. The
//! connection that serves a client id holds a claim on it in [`SessionRegistry`]: a second
//! connection with the same id evicts the first (v5 DISCONNECT 0x8E) and waits until the
//! first has saved its final state, so two connections never write one session.
//!
//! # Invariants
//! - A record is removed only under a claim of its client id (clean start, expiry).
//! - A session is expired when its last connection ended more than its expiry interval ago;
//!   an expired record is never resumed, even before the sweep removed it.

use std::sync::Arc;
use std::time::Duration;

use herald_core::{ChannelName, Message, Position, ReadFrom};
use herald_log::{LogStore, ReadError, ReadQuery};
use herald_mqtt::session::{ChannelRead, ReadStart, SessionOpenError, StoredSession, session_key};
use herald_mqtt::topic::TopicFilter;
use tokio::sync::watch;

use super::MqttContext;
use crate::durable::{Eviction, Registry};

/// Who holds each client id right now (a claim per connection past CONNECT).
pub type SessionRegistry = Registry<String>;

/// How long a new connection waits for the previous holder of its client id to save.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Pages walked back at most when looking for where a `Since` read starts.
const SINCE_WALK_PAGES_MAX: usize = 1000;
const SINCE_WALK_PAGE: usize = 256;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    crate::durable::now().0
}

/// Whether `client_id` has a stored, unexpired session that credentials other than `owner`
/// created (such a session is neither resumed nor discarded by them).
pub fn owned_by_another(context: &MqttContext, client_id: &str, owner: &str) -> bool {
    context
        .state
        .store
        .state(&session_key(client_id))
        .and_then(|bytes| StoredSession::decode(&bytes).ok())
        .filter(|stored| stored.client_id == client_id && !stored.expired_at(now_ms()))
        .and_then(|stored| stored.owner)
        .is_some_and(|stored_owner| stored_owner != owner)
}

/// The stored session of `client_id`, for a connection of `owner` that holds its claim. A
/// clean start removes it (and returns `None`); so does an expired or unreadable record. One
/// that other credentials created is refused.
pub async fn open(
    context: &MqttContext,
    client_id: &str,
    clean_start: bool,
    owner: &str,
) -> Result<Option<StoredSession>, SessionOpenError> {
    // Checked again under the claim: the record may have changed since the first look.
    if owned_by_another(context, client_id, owner) {
        return Err(SessionOpenError::OwnedByAnotherKey);
    }
    let store = &context.state.store;
    let key = session_key(client_id);
    let Some(bytes) = store.state(&key) else {
        return Ok(None);
    };
    let counters = &context.state.metrics.mqtt;
    let stored = match StoredSession::decode(&bytes) {
        Ok(stored) if stored.client_id == client_id => Some(stored),
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(client_id, %error, "stored MQTT session unreadable; starting a new one");
            None
        }
    };
    let expired = stored
        .as_ref()
        .is_some_and(|stored| stored.expired_at(now_ms()));
    if clean_start || expired || stored.is_none() {
        store.remove_state(&key).await.map_err(|error| {
            SessionOpenError::Unavailable(format!("cannot remove the stored session: {error}"))
        })?;
        if expired {
            counters
                .sessions_expired_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(client_id, "MQTT session expired; starting a new one");
        }
        return Ok(None);
    }
    counters
        .sessions_resumed_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(stored)
}

/// Every stored channel matching one of `filters` (no order).
pub async fn list_channels(
    store: &Arc<dyn LogStore>,
    filters: Vec<TopicFilter>,
) -> Vec<ChannelName> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        store
            .channels()
            .into_iter()
            .filter(|channel| filters.iter().any(|filter| filter.matches_channel(channel)))
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The message at `position`, if it is still retained and not expired.
pub async fn read_message(
    store: &Arc<dyn LogStore>,
    channel: &ChannelName,
    position: &Position,
) -> Option<Message> {
    let store = store.clone();
    let channel = channel.clone();
    let position = position.clone();
    tokio::task::spawn_blocking(move || {
        let after = Position::new(
            position.epoch.clone(),
            herald_core::Serial(position.serial.0.checked_sub(1)?),
        );
        let query = ReadQuery::Forward {
            from: ReadFrom::After(after),
            limit: 1,
        };
        let page = store.read(&channel, &query).ok()?;
        page.messages
            .into_iter()
            .next()
            .filter(|message| message.position() == position)
    })
    .await
    .ok()
    .flatten()
}

/// A read for a session (see `herald_mqtt::session::ChannelRead`).
pub async fn read_channel(
    store: &Arc<dyn LogStore>,
    channel: &ChannelName,
    from: ReadStart,
    limit: usize,
) -> ChannelRead {
    let store = store.clone();
    let channel = channel.clone();
    tokio::task::spawn_blocking(move || match from {
        ReadStart::After(after) => {
            read_after(store.as_ref(), &channel, ReadFrom::After(after), limit, 0)
        }
        ReadStart::Since(since_ms) => read_since(store.as_ref(), &channel, since_ms, limit),
    })
    .await
    .unwrap_or_else(|error| ChannelRead::Failed(format!("store task failed: {error}")))
}

/// A forward page; messages stored before `since_ms` are passed over (counted as examined).
fn read_after(
    store: &dyn LogStore,
    channel: &ChannelName,
    from: ReadFrom,
    limit: usize,
    since_ms: u64,
) -> ChannelRead {
    let query = ReadQuery::Forward { from, limit };
    match store.read(channel, &query) {
        Ok(page) => ChannelRead::Page {
            messages: page
                .messages
                .into_iter()
                .filter(|message| message.time.0 >= since_ms)
                .collect(),
            through: page.next,
            more: page.more,
        },
        Err(ReadError::ContinuityLost(lost)) => {
            // Continue just before the oldest message still retained (or after the top).
            let resume_after = match (lost.first_available, lost.top) {
                (Some(first), _) => Position::new(
                    first.epoch,
                    herald_core::Serial(first.serial.0.saturating_sub(1)),
                ),
                (None, Some(top)) => top,
                (None, None) => lost.requested,
            };
            ChannelRead::ContinuityLost { resume_after }
        }
        Err(ReadError::Store(error)) => ChannelRead::Failed(error.to_string()),
    }
}

/// The first page of messages stored at or after `since_ms`: the channel's timestamps never
/// decrease, so the start is found walking back from the newest message.
fn read_since(
    store: &dyn LogStore,
    channel: &ChannelName,
    since_ms: u64,
    limit: usize,
) -> ChannelRead {
    let newest = match store.read(channel, &ReadQuery::Newest { limit: 1 }) {
        Ok(page) => page.messages.into_iter().next(),
        Err(ReadError::ContinuityLost(_)) => None,
        Err(ReadError::Store(error)) => return ChannelRead::Failed(error.to_string()),
    };
    let Some(newest) = newest else {
        return ChannelRead::Page {
            messages: Vec::new(),
            through: None,
            more: false,
        };
    };
    if newest.time.0 < since_ms {
        // Nothing owed: the newest message becomes the cursor.
        return ChannelRead::Page {
            messages: Vec::new(),
            through: Some(newest.position()),
            more: false,
        };
    }
    let mut before = newest.position();
    let mut start = ReadFrom::Oldest;
    for _ in 0..SINCE_WALK_PAGES_MAX {
        let query = ReadQuery::Backward {
            before: before.clone(),
            limit: SINCE_WALK_PAGE,
        };
        let page = match store.read(channel, &query) {
            Ok(page) => page,
            Err(ReadError::ContinuityLost(_)) => break,
            Err(ReadError::Store(error)) => return ChannelRead::Failed(error.to_string()),
        };
        if let Some(older) = page
            .messages
            .iter()
            .find(|message| message.time.0 < since_ms)
        {
            start = ReadFrom::After(older.position());
            break;
        }
        match page.messages.last() {
            Some(oldest) if page.more => before = oldest.position(),
            _ => break,
        }
    }
    read_after(store, channel, start, limit, since_ms)
}

/// Removes expired sessions every `interval` until `stopping` turns true.
pub fn spawn_sweeper(
    context: Arc<MqttContext>,
    interval: Duration,
    mut stopping: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    // Records left by connections that never saved their end (a crash) count from now.
    let started_ms = now_ms();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stopping.wait_for(|stopping| *stopping) => return,
            }
            let removed = sweep(&context, started_ms).await;
            if removed > 0 {
                tracing::info!(removed, "expired MQTT sessions removed");
            }
        }
    })
}

/// Whether an unheld record has expired; one without an end (its connection never saved it:
/// a crash) counts as ended at `started_ms`.
fn unheld_expired(stored: &StoredSession, started_ms: u64) -> bool {
    let mut ended = stored.clone();
    ended.disconnected_ms = Some(stored.disconnected_ms.unwrap_or(started_ms));
    ended.expired_at(now_ms())
}

/// One pass: removes every stored session that expired and that no connection holds.
pub async fn sweep(context: &Arc<MqttContext>, started_ms: u64) -> usize {
    let store = context.state.store.clone();
    let prefix = herald_mqtt::session::SESSION_KEY_PREFIX;
    let Ok(records) = tokio::task::spawn_blocking(move || store.states(prefix)).await else {
        return 0;
    };
    let mut removed = 0;
    for (key, bytes) in records {
        let Ok(stored) = StoredSession::decode(&bytes) else {
            continue;
        };
        if !unheld_expired(&stored, started_ms) || context.sessions.is_key_held(&stored.client_id) {
            continue;
        }
        let claim = context
            .sessions
            .claim_key(
                stored.client_id.clone(),
                Eviction::Expired,
                Duration::from_secs(1),
            )
            .await;
        // A connection may have resumed it between the listing and the claim.
        let current = context
            .state
            .store
            .state(&key)
            .and_then(|bytes| StoredSession::decode(&bytes).ok());
        if !current.is_some_and(|current| unheld_expired(&current, started_ms)) {
            continue;
        }
        if let Err(error) = context.state.store.remove_state(&key).await {
            tracing::warn!(client_id = stored.client_id, %error, "expired MQTT session not removed");
            continue;
        }
        drop(claim);
        removed += 1;
        context
            .state
            .metrics
            .mqtt
            .sessions_expired_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            client_id = stored.client_id,
            expiry_secs = stored.expiry_secs,
            "MQTT session expired"
        );
    }
    removed
}
