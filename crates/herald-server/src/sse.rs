//! `GET /v1/sse?channels=a,b`: the same deliveries as the WebSocket, as Server-Sent Events, so
//! a browser `EventSource` can subscribe with nothing but a URL.
//!
//! # The event id
//! Every event that moves a channel's position carries `id:`, the stream's resume id: the
//! positions of all its channels, comma-separated in the order of `channels=`, `-` for a
//! channel without a position yet. For one channel it is exactly `EPOCH:SERIAL`. A browser
//! sends the last id back as `Last-Event-ID` when it reconnects, and every channel resumes
//! exactly-once from its own position; `from=` takes the same format on a first connect. A `-`
//! in a resume id means the channel had no message when the stream started: it resumes from
//! its first message (reporting with `continuity_lost` what retention already removed).
//!
//! # Events
//! Deliveries have no `event:` line (so `EventSource.onmessage` fires) and the WebSocket
//! `message` frame as `data:`. Notices and replies are named events with the WebSocket frame
//! as data: `subscribed`, `continuity_lost`, `gap`, `skip`, `heartbeat`, `server_error` (not
//! `error`, which `EventSource` reserves for connection failures). The stream
//! starts with `retry:` and gets a `: keep-alive` comment when idle.

use std::fmt::Write as _;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::{ChannelName, ErrorCode, Guarantee, InvalidInput, Position};
use herald_protocol::ws::ServerFrame;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::auth::Operation;
use crate::error::ApiError;
use crate::http::AppState;
use crate::live::{self, Outgoing, Start, SubscriptionRequest};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SseParams {
    channels: Option<String>,
    from: Option<String>,
    guarantee: Option<String>,
    /// An API key, for clients that cannot set headers (`EventSource`). The header is better:
    /// URLs end up in logs.
    key: Option<String>,
}

pub async fn subscribe(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<SseParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let cors = allowed_origin(&state, &headers);
    let mut response = match open(&state, &headers, params) {
        Ok(stream) => stream,
        Err(error) => error.into_response(),
    };
    if let Some(origin) = cors {
        response
            .headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        response
            .headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// The request's `Origin` when it is in `http.cors_origins`.
fn allowed_origin(state: &AppState, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    state
        .realtime
        .cors_origins
        .iter()
        .any(|allowed| allowed == text)
        .then(|| origin.clone())
}

fn open(
    state: &AppState,
    headers: &HeaderMap,
    params: Result<Query<SseParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params
        .map_err(|rejection| ApiError::new(ErrorCode::InvalidRequest, rejection.body_text()))?;
    let principal = match (&params.key, headers.get(header::AUTHORIZATION)) {
        (Some(key), _) => state.auth.authenticate_key_or_anonymous(Some(key))?,
        (None, header) => state.auth.authenticate(header.map(HeaderValue::as_bytes))?,
    };
    let config = &state.realtime.config;
    let names = params
        .channels
        .as_deref()
        .filter(|names| !names.is_empty())
        .ok_or_else(|| InvalidInput::request("channels=a,b is required"))?;
    let mut channels: Vec<ChannelName> = Vec::new();
    for name in names.split(',') {
        let channel = ChannelName::parse(name)?;
        state
            .auth
            .authorize(principal, &channel, Operation::Subscribe)?;
        if channels.contains(&channel) {
            return Err(InvalidInput::request(format!("channel {channel} is listed twice")).into());
        }
        channels.push(channel);
    }
    if channels.len() > config.subscriptions_per_connection {
        return Err(ApiError::new(
            ErrorCode::TooManySubscriptions,
            format!(
                "{} channels, the limit is {}",
                channels.len(),
                config.subscriptions_per_connection
            ),
        ));
    }
    let guarantee = match params.guarantee.as_deref() {
        None => Guarantee::ExactlyOnce,
        Some(text) => Guarantee::parse(text)?,
    };
    // A reconnecting browser's Last-Event-ID wins over the `from` of the URL it reuses.
    let resume = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .filter(|text| !text.trim().is_empty())
        .map(str::to_owned)
        .or(params.from);
    let resuming = resume.is_some();
    let positions = match resume {
        Some(id) => parse_resume_id(&id, channels.len())?,
        None => vec![None; channels.len()],
    };
    if guarantee == Guarantee::AtMostOnce && resuming {
        return Err(InvalidInput::request(
            "at-most-once streams are live only: a resume position needs exactly-once",
        )
        .into());
    }

    let (out, outgoing) = mpsc::channel(config.outbound_queue_frames);
    let mut pumps = Vec::with_capacity(channels.len());
    for (channel, position) in channels.iter().zip(&positions) {
        let request = SubscriptionRequest {
            req: None,
            channel: channel.clone(),
            guarantee,
            // In a resume id, `-` is a channel that had no message when the stream started:
            // everything it got since is owed, so it starts from its first message.
            start: match (position, resuming) {
                (Some(position), _) => Start::After(position.clone()),
                (None, true) => Start::FromStart,
                (None, false) => Start::Live,
            },
            hints: false,
            filter: None,
        };
        pumps.push(live::spawn(
            state.realtime.live.clone(),
            request,
            out.clone(),
        ));
    }
    drop(out);
    let (chunks, body) = mpsc::channel::<Bytes>(16);
    let writer = EventWriter {
        state: state.clone(),
        channels,
        positions,
        pumps,
    };
    tokio::spawn(writer.run(outgoing, chunks));
    let body = Body::from_stream(futures_util::stream::unfold(body, |mut body| async move {
        body.recv()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), body))
    }));
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) must not buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// `EPOCH:SERIAL,-,EPOCH:SERIAL`: one entry per channel.
fn parse_resume_id(id: &str, channels: usize) -> Result<Vec<Option<Position>>, InvalidInput> {
    let parts: Vec<&str> = id.split(',').map(str::trim).collect();
    if parts.len() != channels {
        return Err(InvalidInput::position(format!(
            "resume id {id:?} has {} positions for {channels} channels",
            parts.len()
        )));
    }
    parts
        .into_iter()
        .map(|part| match part {
            "-" => Ok(None),
            text => Position::parse(text).map(Some),
        })
        .collect()
}

/// Formats the pumps' output as SSE and keeps the resume id up to date.
struct EventWriter {
    state: AppState,
    channels: Vec<ChannelName>,
    positions: Vec<Option<Position>>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

impl EventWriter {
    async fn run(mut self, mut outgoing: mpsc::Receiver<Outgoing>, chunks: mpsc::Sender<Bytes>) {
        let config = self.state.realtime.config.clone();
        self.state.realtime.connections_opened();
        let retry = format!("retry: {}\n\n", config.sse_retry.as_millis());
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + config.heartbeat_interval,
            config.heartbeat_interval,
        );
        let mut keep_alive = tokio::time::interval_at(
            tokio::time::Instant::now() + config.sse_keepalive_interval,
            config.sse_keepalive_interval,
        );
        let mut stopping = self.state.realtime.stopping.clone();
        let stop = async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        };
        tokio::pin!(stop);
        let mut open = chunks.send(Bytes::from(retry)).await.is_ok();
        while open {
            let chunk = tokio::select! {
                item = outgoing.recv() => match item {
                    Some(item) => {
                        let mut text = String::new();
                        self.format(item, &mut text);
                        // Everything else ready goes in the same chunk.
                        while text.len() < 64 * 1024 {
                            match outgoing.try_recv() {
                                Ok(item) => self.format(item, &mut text),
                                Err(_) => break,
                            }
                        }
                        keep_alive.reset();
                        text
                    }
                    None => break,
                },
                _ = heartbeat.tick() => self.heartbeat(),
                _ = keep_alive.tick() => ": keep-alive\n\n".to_owned(),
                () = &mut stop => break,
                () = chunks.closed() => break,
            };
            if !chunk.is_empty() {
                open = chunks.send(Bytes::from(chunk)).await.is_ok();
            }
        }
        for pump in &self.pumps {
            pump.abort();
        }
        self.state.realtime.connections_closed();
    }

    fn format(&mut self, item: Outgoing, text: &mut String) {
        match item {
            // (`Counted` is WebSocket-only: SSE has no at-least-once subscriptions.)
            Outgoing::Message(live) | Outgoing::Hint(live) | Outgoing::Counted { live, .. } => {
                let message = &live.message;
                self.advance(&message.channel, message.position());
                self.write_id(text);
                text.push_str("data: ");
                text.push_str(live.frame().as_str());
                text.push_str("\n\n");
            }
            Outgoing::Frame(frame) => {
                let (event, moved_to) = match &frame {
                    // The start position goes into the id too (`-` for a channel without
                    // messages), so a stream that drops before its first delivery still
                    // resumes where it started.
                    ServerFrame::Subscribed(reply) => {
                        if let Some(after) = &reply.after
                            && let (Ok(channel), Ok(after)) =
                                (ChannelName::parse(&reply.channel), Position::parse(after))
                        {
                            self.advance(&channel, after);
                        }
                        ("subscribed", None)
                    }
                    ServerFrame::ContinuityLost(notice) => (
                        "continuity_lost",
                        notice.to.as_deref().map(|to| (notice.channel.as_str(), to)),
                    ),
                    ServerFrame::Gap(notice) => {
                        ("gap", Some((notice.channel.as_str(), notice.to.as_str())))
                    }
                    ServerFrame::Skip(notice) => {
                        ("skip", Some((notice.channel.as_str(), notice.to.as_str())))
                    }
                    // Not `error`: EventSource delivers that name to `onerror`, the handler
                    // for connection failures.
                    ServerFrame::Error(_) => ("server_error", None),
                    ServerFrame::Heartbeat(_) => ("heartbeat", None),
                    _ => ("notice", None),
                };
                let _ = writeln!(text, "event: {event}");
                if matches!(frame, ServerFrame::Subscribed(_)) {
                    self.write_id(text);
                }
                if let Some((channel, to)) = moved_to
                    && let (Ok(channel), Ok(to)) =
                        (ChannelName::parse(channel), Position::parse(to))
                {
                    self.advance(&channel, to);
                    self.write_id(text);
                }
                text.push_str("data: ");
                text.push_str(&frame.to_json());
                text.push_str("\n\n");
            }
            Outgoing::Close { .. } => {}
        }
    }

    fn advance(&mut self, channel: &ChannelName, position: Position) {
        if let Some(index) = self.channels.iter().position(|known| known == channel) {
            self.positions[index] = Some(position);
        }
    }

    fn write_id(&self, text: &mut String) {
        text.push_str("id: ");
        for (index, position) in self.positions.iter().enumerate() {
            if index > 0 {
                text.push(',');
            }
            match position {
                Some(position) => {
                    let _ = write!(text, "{position}");
                }
                None => text.push('-'),
            }
        }
        text.push('\n');
    }

    fn heartbeat(&self) -> String {
        let frame = self.state.realtime.heartbeat(self.channels.iter());
        format!("event: heartbeat\ndata: {}\n\n", frame.to_json())
    }
}
