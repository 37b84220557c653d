//! `GET` and `DELETE /v1/channels/{channel}/subscribers/{id}`: a durable subscriber's stored
//! state, and its removal. Both need the history (or admin) capability on the channel.
//!
//! `GET` reports the durable snapshot (a connected subscriber's newest acks may be a group
//! commit ahead of it). `DELETE` evicts a connected holder first (its connection is closed
//! with 4004 after its last snapshot), then removes the subscriber durably.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_core::{ChannelName, ErrorCode, SubscriberId, SubscriberState};
use serde::Serialize;

use super::{DurableCounters, Eviction, backlog};
use crate::auth::Operation;
use crate::error::ApiError;
use crate::http::{AppState, authorize, blocking};

/// The JSON of `GET /v1/channels/{channel}/subscribers/{id}`.
#[derive(Debug, Serialize)]
pub struct SubscriberBody {
    pub channel: String,
    pub subscriber_id: String,
    /// Every serial up to this position is done (acked, dead-lettered or expired). Absent
    /// while the channel has had no message since the subscriber was created.
    pub acked: Option<String>,
    /// Serials past `acked` acked individually.
    pub acked_above: Vec<u64>,
    /// Retained serials after `acked` not yet done.
    pub pending: u64,
    /// Serials between `acked` and the channel's top.
    pub lag: u64,
    /// Messages delivered at least once and not yet done, with their delivery counts.
    pub inflight: Vec<InflightBody>,
    /// The channel's newest position (absent: no messages).
    pub top: Option<String>,
    /// Whether a connection (or webhook worker) holds the subscriber now.
    pub connected: bool,
    pub options: OptionsBody,
    pub created: u64,
    pub last_active: u64,
    /// When idle expiry removes it if nothing connects (ms since the Unix epoch).
    pub expires_at: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct InflightBody {
    pub serial: u64,
    pub deliveries: u32,
}

#[derive(Debug, Serialize)]
pub struct OptionsBody {
    pub inflight_max: u32,
    pub ack_wait_ms: u64,
    pub max_deliveries: u32,
    pub expires_after_ms: u64,
}

pub async fn show(
    State(state): State<AppState>,
    Path((channel, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (channel, id) = target(&state, &headers, &channel, &id)?;
    let store = state.store.clone();
    let (found_channel, found_id) = (channel.clone(), id.clone());
    let (stored, status) = blocking(move || {
        (
            store.subscriber(&found_channel, &found_id),
            store.channel_status(&found_channel),
        )
    })
    .await?;
    let Some(stored) = stored else {
        return Err(not_found(&channel, &id));
    };
    let top = status?.map(|status| status.top);
    let connected = state.durable.registry.is_held(&channel, &id);
    Ok(axum::Json(body(&stored, top.as_ref(), connected)).into_response())
}

pub async fn remove(
    State(state): State<AppState>,
    Path((channel, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (channel, id) = target(&state, &headers, &channel, &id)?;
    // A webhook rule's worker would stop until the next restart: remove the rule instead.
    crate::webhook::refuse_reserved(&id)?;
    let durable = &state.durable;
    let claim = durable
        .registry
        .claim(
            &channel,
            &id,
            Eviction::Deleted,
            durable.config.takeover_timeout,
        )
        .await;
    let store = state.store.clone();
    let (found_channel, found_id) = (channel.clone(), id.clone());
    let existed = blocking(move || store.subscriber(&found_channel, &found_id).is_some()).await?;
    if !existed {
        return Err(not_found(&channel, &id));
    }
    state.store.remove_subscriber(&channel, &id).await?;
    drop(claim);
    DurableCounters::add(&durable.counters.subscribers_deleted, 1);
    tracing::info!(%channel, subscriber = %id, "durable subscriber deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Authenticates, checks the history capability on the channel, parses the id.
fn target(
    state: &AppState,
    headers: &HeaderMap,
    channel: &str,
    id: &str,
) -> Result<(ChannelName, SubscriberId), ApiError> {
    let channel = authorize(state, headers, channel, Operation::History)?;
    let id = SubscriberId::parse(id)?;
    Ok((channel, id))
}

fn not_found(channel: &ChannelName, id: &SubscriberId) -> ApiError {
    ApiError::new(
        ErrorCode::SubscriberNotFound,
        format!("no durable subscriber {id:?} on {channel}"),
    )
}

pub fn body(
    state: &SubscriberState,
    top: Option<&herald_core::Position>,
    connected: bool,
) -> SubscriberBody {
    let (pending, lag) = backlog(state, top);
    SubscriberBody {
        channel: state.channel.to_string(),
        subscriber_id: state.id.to_string(),
        acked: state.acked_position().map(|acked| acked.to_string()),
        acked_above: state.acked_above.iter().map(|serial| serial.0).collect(),
        pending,
        lag,
        inflight: state
            .attempts
            .iter()
            .map(|(serial, deliveries)| InflightBody {
                serial: serial.0,
                deliveries: *deliveries,
            })
            .collect(),
        top: top.map(ToString::to_string),
        connected,
        options: OptionsBody {
            inflight_max: state.options.inflight_max,
            ack_wait_ms: state.options.ack_wait_ms,
            max_deliveries: state.options.max_deliveries,
            expires_after_ms: state.options.expires_after_ms,
        },
        created: state.created.0,
        last_active: state.last_active.0,
        expires_at: if connected {
            None
        } else {
            herald_core::engine::idle_deadline(state).map(|deadline| deadline.0)
        },
    }
}
