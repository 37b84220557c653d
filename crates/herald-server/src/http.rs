//! The HTTP API (axum): a thin adapter from requests to the [`LogStore`] and back.
//!
//! # Routes
//! - `POST /v1/channels/{channel}/messages`: publish one message or an atomic batch. The reply
//!   is sent only after the store made the batch durable: `201 Created` when at least one
//!   message is new, `200 OK` when every message was a duplicate of an earlier publish.
//! - `GET /v1/channels/{channel}/messages?after=POS|before=POS&limit=N`: sync (oldest first,
//!   after a position or from the oldest retained message) or history (`before`, newest first;
//!   `order=newest` without a position starts at the top).
//! - `GET /v1/channels/{channel}/messages/by-id/{id}`
//! - `GET /v1/channels/{channel}`: status; a channel never published to is
//!   `404 channel_not_found` (reads of it simply return an empty page).
//! - `GET /health` (the process is up), `GET /ready` (503 `storage_failed` when the store is
//!   poisoned).
//!
//! # Invariants
//! - Every non-2xx response, including axum's own rejections (unknown route, wrong method,
//!   oversized body, bad query), carries the JSON error body with a stable code.
//! - A publish is fully validated (ids, sizes, batch limits, TTL bounds) before it reaches the
//!   store, so a rejected request stores nothing.
//! - Blocking store calls (reads, reclaim) run on tokio's blocking pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_core::{ChannelName, ErrorCode, Limits, MessageId, NewMessage, Position, ReadFrom};
use herald_log::{LogStore, ReadQuery, StoreHealth};
use herald_protocol::{
    ChannelStatusBody, MessageBody, PageBody, PublishAck, PublishBatchAck, PublishRequest,
    SkippedBody,
};
use serde::Deserialize;

use crate::auth::{Authenticator, Operation};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Messages a read returns when the request gives no `limit`.
pub const READ_LIMIT_DEFAULT: usize = 100;

/// Length of server-generated message ids (base62, ~131 bits).
pub const GENERATED_ID_CHARS: usize = 22;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn LogStore>,
    pub auth: Arc<Authenticator>,
    pub limits: Limits,
    pub request_timeout: Duration,
    pub metrics: Arc<Metrics>,
    pub realtime: Arc<crate::realtime::Realtime>,
    pub durable: Arc<crate::durable::DurableContext>,
    /// The MQTT listener's shared state once it runs, for MQTT over WebSocket (the sender is
    /// gone when MQTT is off).
    pub mqtt: tokio::sync::watch::Receiver<Option<std::sync::Weak<crate::mqtt::MqttContext>>>,
    /// The webhook counters, when rules are configured.
    pub webhooks: Option<Arc<crate::webhook::WebhookCounters>>,
}

/// The HTTP body limit: a full batch plus room for JSON syntax, escaping and base64 (which
/// inflates binary data by 4/3). Messages over their own limits still get their precise
/// codes (`message_too_large`, `batch_too_large`); this only stops absurd bodies early.
pub fn body_bytes_max(limits: &Limits) -> usize {
    limits.batch_bytes_max * 2 + 64 * 1024
}

pub fn router(state: AppState) -> Router {
    let body_limit = body_bytes_max(&state.limits);
    Router::new()
        .route(
            "/v1/channels/{channel}/messages",
            get(read_messages).post(publish),
        )
        .route(
            "/v1/channels/{channel}/messages/by-id/{id}",
            get(message_by_id),
        )
        .route("/v1/channels/{channel}", get(channel_status))
        .route(
            "/v1/channels/{channel}/subscribers/{id}",
            get(crate::durable::admin::show).delete(crate::durable::admin::remove),
        )
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/v1/sse", get(crate::sse::subscribe))
        .route("/mqtt", get(crate::mqtt::websocket::upgrade))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count_request))
        .with_state(state)
}

/// Counts every response by route template, method and status, and error responses by code
/// (`ApiError` leaves its code in the response's extensions).
async fn count_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    // Clients can send any method token; only standard ones become label values.
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let response = next.run(request).await;
    state
        .metrics
        .record_request(&route, method, response.status().as_u16());
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        state.metrics.record_error(*code);
    }
    response
}

async fn request_timeout(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(state.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            ErrorCode::Timeout,
            format!(
                "the request did not complete within {:?}; a publish may or may not have been \
                 stored: retry it with the same id",
                state.request_timeout
            ),
        )
        .into_response(),
    }
}

async fn not_found(request: Request) -> ApiError {
    let path = request.uri().path();
    // The router cannot match an empty `{channel}` segment; say what is wrong with it.
    if path == "/v1/channels/" || path.starts_with("/v1/channels//") {
        return ApiError::new(ErrorCode::InvalidChannel, "channel name is empty");
    }
    ApiError::new(ErrorCode::NotFound, format!("no route for {path}"))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "method {} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

pub(crate) fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    channel: &str,
    operation: Operation,
) -> Result<ChannelName, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    // Authenticate before looking at the request, so strangers learn nothing from validation.
    let principal = state.auth.authenticate(authorization)?;
    let channel = ChannelName::parse(channel)?;
    state.auth.authorize(principal, &channel, operation)?;
    Ok(channel)
}

async fn publish(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let channel = authorize(&state, &headers, &channel, Operation::Publish)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::RequestTooLarge,
                format!(
                    "request body is over {} bytes",
                    body_bytes_max(&state.limits)
                ),
            )
        } else {
            ApiError::new(ErrorCode::InvalidRequest, rejection.body_text())
        }
    })?;
    // Parsed whatever the Content-Type says, so `curl -d` works without extra headers.
    let request = PublishRequest::from_json(&body)
        .map_err(|error| ApiError::new(ErrorCode::InvalidJson, error.to_string()))?;
    let is_batch = request.is_batch();
    let batch = validate_batch(&state, &channel, request)?;
    let handed_over = std::time::Instant::now();
    let appended = state.store.append(channel, batch).await?;
    let duplicates = appended
        .iter()
        .filter(|appended| appended.duplicate)
        .count() as u64;
    state.metrics.record_publish(
        appended.len() as u64 - duplicates,
        duplicates,
        handed_over.elapsed(),
    );
    let acks: Vec<PublishAck> = appended
        .iter()
        .map(|appended| PublishAck::new(&appended.id, &appended.position, appended.duplicate))
        .collect();
    let status = if appended.iter().all(|appended| appended.duplicate) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(if is_batch {
        (status, axum::Json(PublishBatchAck { results: acks })).into_response()
    } else {
        let ack = acks.into_iter().next().expect("one reply per message");
        (status, axum::Json(ack)).into_response()
    })
}

/// Turns a request into store input, checking every limit. Errors in a batch name the index.
fn validate_batch(
    state: &AppState,
    channel: &ChannelName,
    request: PublishRequest,
) -> Result<Vec<NewMessage>, ApiError> {
    let limits = &state.limits;
    let is_batch = request.is_batch();
    let messages = request.into_messages();
    if messages.is_empty() {
        // docs/errors.md files an empty batch under batch_too_large (outside its bounds).
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            "a batch needs at least one message",
        ));
    }
    if messages.len() > limits.batch_messages_max {
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "batch has {} messages, the limit is {}",
                messages.len(),
                limits.batch_messages_max
            ),
        ));
    }
    let mut batch = Vec::with_capacity(messages.len());
    let mut batch_bytes = 0usize;
    for (index, message) in messages.into_iter().enumerate() {
        let message = validate_message(state, channel, message).map_err(|error| {
            if is_batch {
                ApiError::new(error.code, format!("messages[{index}]: {}", error.message))
            } else {
                ApiError::from(error)
            }
        })?;
        batch_bytes += message.size_bytes();
        batch.push(message);
    }
    if batch_bytes > limits.batch_bytes_max {
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "batch is {batch_bytes} bytes, the limit is {}",
                limits.batch_bytes_max
            ),
        ));
    }
    Ok(batch)
}

/// Turns one message as sent into store input, checking its limits and its namespace's TTL
/// bounds (shared by the HTTP and WebSocket publish paths).
pub(crate) fn validate_message(
    state: &AppState,
    channel: &ChannelName,
    message: herald_protocol::PublishMessage,
) -> Result<NewMessage, herald_core::InvalidInput> {
    let message = message.into_new_message(generate_id)?;
    message.validate(&state.limits)?;
    if let Some(ttl_ms) = message.ttl_ms {
        state
            .store
            .policies()
            .for_channel(channel)
            .check_ttl(ttl_ms)?;
    }
    Ok(message)
}

/// A fresh random message id.
pub fn generate_id() -> MessageId {
    MessageId::parse(&crate::auth::random_base62(GENERATED_ID_CHARS)).expect("base62 is a valid id")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    after: Option<String>,
    before: Option<String>,
    limit: Option<String>,
    /// `oldest` (default: oldest first) or `newest` (newest first, from the top).
    order: Option<String>,
}

async fn read_messages(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let channel = authorize(&state, &headers, &channel, Operation::History)?;
    let Query(params) = params.map_err(|rejection| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "{}; the parameters are after, before, order and limit",
                rejection.body_text()
            ),
        )
    })?;
    let read_limit_max = state.limits.read_limit_max;
    let limit = match params.limit.as_deref() {
        None => READ_LIMIT_DEFAULT.min(read_limit_max),
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=read_limit_max).contains(&limit) => limit,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("limit {text:?} must be a whole number from 1 to {read_limit_max}"),
                ));
            }
        },
    };
    let newest_first = match params.order.as_deref() {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("order {other:?} must be \"oldest\" or \"newest\""),
            ));
        }
    };
    let query = match (params.after.as_deref(), params.before.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "give after (oldest first) or before (newest first), not both",
            ));
        }
        (Some(_), None) if newest_first => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "after reads oldest first; use before (or no position) with order=newest",
            ));
        }
        (Some(after), None) => ReadQuery::Forward {
            from: ReadFrom::After(Position::parse(after)?),
            limit,
        },
        (None, Some(before)) => ReadQuery::Backward {
            before: Position::parse(before)?,
            limit,
        },
        (None, None) if newest_first => ReadQuery::Newest { limit },
        (None, None) => ReadQuery::Forward {
            from: ReadFrom::Oldest,
            limit,
        },
    };
    let store = state.store.clone();
    let page = blocking(move || store.read(&channel, &query)).await??;
    Ok(axum::Json(PageBody {
        messages: page
            .messages
            .iter()
            .map(MessageBody::from_message)
            .collect(),
        next: page.next.as_ref().map(ToString::to_string),
        top: page.top.as_ref().map(ToString::to_string),
        more: page.more,
        skipped: page.skipped.iter().map(SkippedBody::from).collect(),
    })
    .into_response())
}

async fn message_by_id(
    State(state): State<AppState>,
    Path(params): Path<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let channel = params.get("channel").map_or("", String::as_str);
    let channel = authorize(&state, &headers, channel, Operation::History)?;
    let id = MessageId::parse(params.get("id").map_or("", String::as_str))?;
    let store = state.store.clone();
    let found = {
        let id = id.clone();
        blocking(move || store.message_by_id(&channel, &id)).await??
    };
    match found {
        Some(message) => Ok(axum::Json(MessageBody::from_message(&message)).into_response()),
        None => Err(ApiError::new(
            ErrorCode::MessageNotFound,
            format!("no retained message with id {id} on this channel"),
        )),
    }
}

async fn channel_status(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let channel = authorize(&state, &headers, &channel, Operation::History)?;
    let store = state.store.clone();
    let name = channel.to_string();
    match blocking(move || store.channel_status(&channel)).await?? {
        Some(status) => Ok(axum::Json(ChannelStatusBody::new(&name, &status)).into_response()),
        None => Err(ApiError::new(
            ErrorCode::ChannelNotFound,
            format!("channel {name} has never had a message"),
        )),
    }
}

async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Prometheus text format; aggregate figures only (no channel names), so no key is needed.
async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state
        .metrics
        .render(&state.store.stats(), &state.store.health());
    crate::metrics::render_live(&mut text, &state.realtime);
    crate::metrics::render_durable(&mut text, &state.durable);
    text.push_str(&state.metrics.mqtt.render());
    if let Some(webhooks) = &state.webhooks {
        webhooks.render(&mut text);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn ready(State(state): State<AppState>) -> Result<Response, ApiError> {
    match state.store.health() {
        StoreHealth::Ok => Ok(axum::Json(serde_json::json!({ "status": "ready" })).into_response()),
        StoreHealth::Poisoned(reason) => Err(ApiError::new(
            ErrorCode::StorageFailed,
            format!("storage failed ({reason}); restart the server to recover"),
        )),
    }
}

/// Runs a blocking store call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError::new(ErrorCode::Internal, format!("store task failed: {error}")))
}
