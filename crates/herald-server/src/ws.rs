//! `GET /v1/ws`: the native WebSocket protocol (docs/protocol.md, frames in
//! `herald_protocol::ws`).
//!
//! Each connection is two tasks: this one reads frames, runs the control logic (connect,
//! subscribe, publish, heartbeats) and owns the subscriptions' pumps; a writer task drains the
//! connection's bounded outbound queue into the socket, flushing once per burst. Pumps and
//! publish completions put frames in the same queue, so a reply is never overtaken by later
//! deliveries of the same subscription.
//!
//! # Connection policy
//! - The first frame must be `connect` within `realtime.handshake_timeout` (else close 4002);
//!   any other first frame or bad credentials close 4001; an unknown protocol version 4003.
//! - A malformed frame gets an `error` frame (`invalid_frame` / `unknown_frame`) and the
//!   connection stays; `realtime.bad_frames_max` consecutive ones close it with 4000.
//! - A frame over `realtime.frame_bytes` closes the connection with 1009.
//! - Shutdown closes every connection with 1001.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt as _, StreamExt as _};
use herald_core::{ChannelName, ErrorCode, Guarantee, InvalidInput, Position};
use herald_protocol::ws::{
    Ack, AckDeliveries, AckTag, ClientFrame, Connect, Connected, ConnectedTag, ConnectionLimits,
    ErrorFrame, ErrorTag, FrameError, Nack, NackTag, PROTOCOL_VERSION, Pong, PongTag, Publish,
    SUBPROTOCOL, ServerFrame, Subscribe, Unsubscribed, UnsubscribedTag, close, with_delivery_count,
};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::auth::{Operation, Principal};
use crate::error::ApiError;
use crate::filter::Filter;
use crate::http::{AppState, validate_message};
use crate::live::{self, Outgoing, Start, SubscriptionRequest};
use crate::ws_durable::{self, DurableSubscription};

/// A validated subscribe request.
enum Requested {
    Live(SubscriptionRequest),
    Durable(crate::durable::DurableRequest),
}

/// Upgrades to the protocol. An `Authorization` header, when present, is checked before the
/// upgrade (a bad key is a plain `401`), and stands in for `connect.auth`.
pub async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let pre_authenticated = match headers.get(header::AUTHORIZATION) {
        Some(value) => match state.auth.authenticate(Some(value.as_bytes())) {
            Ok(principal) => Some(principal),
            Err(denied) => return ApiError::from(denied).into_response(),
        },
        None => None,
    };
    let frame_bytes = state.realtime.config.frame_bytes;
    upgrade
        // The default read buffer (128 KiB, zero-filled on first read) would dominate the
        // memory of an idle connection; client frames are small, bigger ones take more reads.
        .read_buffer_size(state.realtime.config.read_buffer_bytes)
        .max_message_size(frame_bytes)
        .max_frame_size(frame_bytes)
        .protocols([SUBPROTOCOL])
        .on_upgrade(move |socket| connection(socket, state, pre_authenticated))
}

async fn connection(socket: WebSocket, state: AppState, pre_authenticated: Option<Principal>) {
    let config = state.realtime.config.clone();
    let (sink, mut stream) = socket.split();
    let (out, outgoing) = mpsc::channel(config.outbound_queue_frames);
    let writer = tokio::spawn(write_frames(sink, outgoing));
    state.realtime.connections_opened();
    let mut connection = Connection {
        state: state.clone(),
        out,
        principal: Principal::Anonymous,
        subscriptions: HashMap::new(),
        publish_slots: Arc::new(Semaphore::new(config.publishes_in_flight_max)),
        bad_frames: 0,
    };
    if connection.handshake(&mut stream, pre_authenticated).await {
        connection.serve(&mut stream).await;
    }
    let mut closing = Vec::new();
    for (_, subscription) in connection.subscriptions.drain() {
        match subscription {
            Subscription::Live(pump) => pump.abort(),
            // A durable pump persists its last snapshot before it stops.
            Subscription::Durable(durable) => closing.push(durable.close()),
        }
    }
    drop(connection);
    for pump in closing {
        let abort = pump.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), pump)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    // The writer ends once every sender (pumps, publish tasks) is gone and the queue drained;
    // a peer that stopped reading must not keep it forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    state.realtime.connections_closed();
}

/// Drains the queue into the socket; one flush per burst of ready frames.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    while let Some(first) = outgoing.recv().await {
        let mut closing = false;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let message = encode(item);
            closing |= matches!(message, Message::Close(_));
            if sink.feed(message).await.is_err() {
                return;
            }
            if closing {
                break;
            }
            next = outgoing.try_recv().ok();
        }
        if sink.flush().await.is_err() || closing {
            return;
        }
    }
    let _ = sink.close().await;
}

fn encode(item: Outgoing) -> Message {
    match item {
        Outgoing::Message(live) => Message::Text(live.frame().clone()),
        Outgoing::Hint(live) => Message::Text(live.hint_frame().clone()),
        Outgoing::Counted { live, delivery } => Message::Text(Utf8Bytes::from(
            with_delivery_count(live.frame().as_str(), delivery),
        )),
        Outgoing::Frame(frame) => Message::Text(Utf8Bytes::from(frame.to_json())),
        Outgoing::Close { code, reason } => Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        })),
    }
}

struct Connection {
    state: AppState,
    out: mpsc::Sender<Outgoing>,
    principal: Principal,
    /// Channel -> its pump.
    subscriptions: HashMap<ChannelName, Subscription>,
    publish_slots: Arc<Semaphore>,
    bad_frames: u32,
}

type FrameStream = futures_util::stream::SplitStream<WebSocket>;

enum Subscription {
    /// Exactly-once or at-most-once.
    Live(JoinHandle<()>),
    Durable(DurableSubscription),
}

impl Subscription {
    fn is_finished(&self) -> bool {
        match self {
            Subscription::Live(pump) => pump.is_finished(),
            Subscription::Durable(durable) => durable.task.is_finished(),
        }
    }

    /// Stops the subscription; resolves once it sends nothing more.
    async fn stop(self) {
        match self {
            Subscription::Live(pump) => {
                pump.abort();
                let _ = pump.await;
            }
            Subscription::Durable(durable) => {
                let _ = durable.close().await;
            }
        }
    }
}

/// Why the read loop ends.
enum Exit {
    Done,
}

impl Connection {
    /// Waits for `connect`, authenticates, answers `connected`. False when the connection ends.
    async fn handshake(
        &mut self,
        stream: &mut FrameStream,
        pre_authenticated: Option<Principal>,
    ) -> bool {
        let config = &self.state.realtime.config;
        let first = match tokio::time::timeout(config.handshake_timeout, stream.next()).await {
            Err(_) => {
                let reason = format!(
                    "no connect frame within {:?}",
                    self.state.realtime.config.handshake_timeout
                );
                self.close(close::HANDSHAKE_TIMEOUT, reason).await;
                return false;
            }
            Ok(None) => return false,
            Ok(Some(Err(error))) => {
                self.close_after_read_error(&error).await;
                return false;
            }
            Ok(Some(Ok(message))) => message,
        };
        let connect = match first {
            Message::Text(text) => match ClientFrame::from_json(text.as_str()) {
                Ok(ClientFrame::Connect(connect)) => connect,
                Ok(_) => {
                    self.refuse(
                        close::UNAUTHORIZED,
                        ErrorCode::Unauthorized,
                        "the first frame must be connect",
                    )
                    .await;
                    return false;
                }
                Err(error) => {
                    self.refuse(
                        close::UNAUTHORIZED,
                        ErrorCode::InvalidFrame,
                        &format!("the first frame must be a valid connect frame: {error}"),
                    )
                    .await;
                    return false;
                }
            },
            Message::Close(_) => return false,
            _ => {
                self.refuse(
                    close::UNAUTHORIZED,
                    ErrorCode::InvalidFrame,
                    "the first frame must be a text connect frame",
                )
                .await;
                return false;
            }
        };
        if connect.protocol != PROTOCOL_VERSION {
            self.refuse(
                close::UNSUPPORTED_PROTOCOL,
                ErrorCode::UnsupportedProtocol,
                &format!(
                    "protocol {} is not supported; this server speaks {PROTOCOL_VERSION}",
                    connect.protocol
                ),
            )
            .await;
            return false;
        }
        match self.authenticate(&connect, pre_authenticated) {
            Ok(principal) => self.principal = principal,
            Err(error) => {
                let message = error.0.error.message.clone();
                self.refuse(close::UNAUTHORIZED, ErrorCode::Unauthorized, &message)
                    .await;
                return false;
            }
        }
        let connected = Connected {
            kind: ConnectedTag::Tag,
            protocol: PROTOCOL_VERSION,
            connection: crate::auth::random_base62(12),
            heartbeat_ms: u64::try_from(config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX),
            limits: ConnectionLimits {
                frame_bytes: config.frame_bytes,
                subscriptions: config.subscriptions_per_connection,
            },
        };
        self.send(ServerFrame::Connected(connected)).await
    }

    fn authenticate(
        &self,
        connect: &Connect,
        pre_authenticated: Option<Principal>,
    ) -> Result<Principal, ApiError> {
        let auth = &self.state.auth;
        match &connect.auth {
            Some(credentials) if credentials.token.is_some() => Err(ApiError::new(
                ErrorCode::Unauthorized,
                "token authentication (JWT) is not available on this server yet; use an API key",
            )),
            Some(credentials) => {
                Ok(auth.authenticate_key_or_anonymous(credentials.key.as_deref())?)
            }
            None => match pre_authenticated {
                Some(principal) => Ok(principal),
                None => Ok(auth.authenticate_key_or_anonymous(None)?),
            },
        }
    }

    /// The read loop after `connect`.
    async fn serve(&mut self, stream: &mut FrameStream) {
        let config = self.state.realtime.config.clone();
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + config.heartbeat_interval,
            config.heartbeat_interval,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = self.state.realtime.stopping.clone();
        // `wait_for` borrows the value; only completion matters here.
        let stop = async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                frame = stream.next() => match frame {
                    None | Some(Ok(Message::Close(_))) => return,
                    Some(Err(error)) => {
                        self.close_after_read_error(&error).await;
                        return;
                    }
                    Some(Ok(Message::Text(text))) => {
                        let Exit::Done = match self.handle_text(text.as_str()).await {
                            Some(exit) => exit,
                            None => continue,
                        };
                        return;
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let failed = FrameError::Invalid(
                            "binary frames are not part of the protocol; send JSON text".into(),
                        );
                        if self.bad_frame(None, &failed).await.is_some() {
                            return;
                        }
                    }
                    // Pings are answered by the WebSocket layer itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                },
                _ = heartbeat.tick() => {
                    if !self.heartbeat().await {
                        return;
                    }
                }
                () = &mut stop => {
                    self.close(close::GOING_AWAY, "server shutting down".into()).await;
                    return;
                }
                () = self.out.closed() => return,
            }
        }
    }

    /// Handles one text frame; `Some` ends the connection.
    async fn handle_text(&mut self, text: &str) -> Option<Exit> {
        let frame = match ClientFrame::from_json(text) {
            Ok(frame) => frame,
            Err(error) => return self.bad_frame(request_id(text), &error).await,
        };
        self.bad_frames = 0;
        let delivered = match frame {
            ClientFrame::Connect(_) => {
                self.error(
                    None,
                    None,
                    ErrorCode::InvalidFrame,
                    "this connection is already connected".into(),
                )
                .await
            }
            ClientFrame::Subscribe(subscribe) => self.subscribe(subscribe).await,
            ClientFrame::Unsubscribe(unsubscribe) => {
                let channel = unsubscribe.channel.clone();
                match ChannelName::parse(&channel)
                    .ok()
                    .and_then(|name| self.subscriptions.remove(&name))
                {
                    Some(subscription) => {
                        // Wait until it has stopped, so no frame of it follows the reply.
                        subscription.stop().await;
                        self.send(ServerFrame::Unsubscribed(Unsubscribed {
                            kind: UnsubscribedTag::Tag,
                            req: unsubscribe.req,
                            channel,
                        }))
                        .await
                    }
                    None => {
                        self.error(
                            unsubscribe.req,
                            Some(channel.clone()),
                            ErrorCode::NotSubscribed,
                            format!("not subscribed to {channel:?}"),
                        )
                        .await
                    }
                }
            }
            ClientFrame::Publish(publish) => self.publish(publish).await,
            ClientFrame::Ack(ack) => self.ack(ack).await,
            ClientFrame::Ping(ping) => {
                self.send(ServerFrame::Pong(Pong {
                    kind: PongTag::Tag,
                    req: ping.req,
                }))
                .await
            }
        };
        (!delivered).then_some(Exit::Done)
    }

    async fn bad_frame(&mut self, req: Option<u64>, error: &FrameError) -> Option<Exit> {
        self.bad_frames += 1;
        let code = match error {
            FrameError::Invalid(_) => ErrorCode::InvalidFrame,
            FrameError::UnknownType(_) => ErrorCode::UnknownFrame,
        };
        if !self.error(req, None, code, error.to_string()).await {
            return Some(Exit::Done);
        }
        if self.bad_frames >= self.state.realtime.config.bad_frames_max {
            let reason = format!("{} malformed frames in a row", self.bad_frames);
            self.close(close::PROTOCOL_ERROR, reason).await;
            return Some(Exit::Done);
        }
        None
    }

    async fn subscribe(&mut self, subscribe: Subscribe) -> bool {
        let req = subscribe.req;
        let channel_text = subscribe.channel.clone();
        let request = match self.validate_subscribe(subscribe) {
            Ok(request) => request,
            Err(error) => {
                let detail = &error.0.error;
                let code = ErrorCode::ALL
                    .iter()
                    .copied()
                    .find(|code| code.as_str() == detail.code)
                    .unwrap_or(ErrorCode::InvalidRequest);
                return self
                    .error(req, Some(channel_text), code, detail.message.clone())
                    .await;
            }
        };
        let (channel, subscription) = match request {
            Requested::Live(request) => (
                request.channel.clone(),
                Subscription::Live(live::spawn(
                    self.state.realtime.live.clone(),
                    request,
                    self.out.clone(),
                )),
            ),
            Requested::Durable(request) => (
                request.channel.clone(),
                Subscription::Durable(ws_durable::spawn(
                    self.state.durable.clone(),
                    req,
                    request,
                    self.out.clone(),
                )),
            ),
        };
        self.subscriptions.insert(channel, subscription);
        true
    }

    fn validate_subscribe(&mut self, subscribe: Subscribe) -> Result<Requested, ApiError> {
        let config = &self.state.realtime.config;
        let channel = ChannelName::parse(&subscribe.channel)?;
        self.state
            .auth
            .authorize(self.principal, &channel, Operation::Subscribe)?;
        // A pump that ended (its store read failed) no longer holds its channel.
        self.subscriptions
            .retain(|_, subscription| !subscription.is_finished());
        if self.subscriptions.contains_key(&channel) {
            return Err(ApiError::new(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel}; unsubscribe first"),
            ));
        }
        if self.subscriptions.len() >= config.subscriptions_per_connection {
            return Err(ApiError::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "this connection has {} subscriptions, the limit",
                    self.subscriptions.len()
                ),
            ));
        }
        if subscribe.guarantee.as_deref() == Some(ws_durable::AT_LEAST_ONCE) {
            let request = ws_durable::request(&self.state.durable, channel, &subscribe)?;
            return Ok(Requested::Durable(request));
        }
        if subscribe.subscriber_id.is_some() || subscribe.options.is_some() {
            return Err(InvalidInput::request(
                "subscriber_id and options are for guarantee \"at-least-once\"",
            )
            .into());
        }
        let guarantee = match subscribe.guarantee.as_deref() {
            None => Guarantee::ExactlyOnce,
            Some(text) => Guarantee::parse(text)?,
        };
        let start = match (subscribe.from, subscribe.rewind) {
            (Some(_), Some(_)) => {
                return Err(InvalidInput::request("give either from or rewind, not both").into());
            }
            (Some(from), None) => Start::After(Position::parse(&from)?),
            (None, Some(count)) => Start::Rewind(count),
            (None, None) => Start::Live,
        };
        if guarantee == Guarantee::AtMostOnce && start != Start::Live {
            return Err(InvalidInput::request(
                "at-most-once subscriptions are live only: from and rewind need exactly-once",
            )
            .into());
        }
        let filter = subscribe
            .filter
            .as_deref()
            .map(|expression| Filter::compile(expression, config.filter_bytes_max))
            .transpose()?;
        Ok(Requested::Live(SubscriptionRequest {
            req: subscribe.req,
            channel,
            guarantee,
            start,
            hints: subscribe.hints.unwrap_or(false),
            filter,
        }))
    }

    async fn publish(&mut self, publish: Publish) -> bool {
        let req = publish.req;
        let (channel, message) = publish.into_message();
        let accepted = ChannelName::parse(&channel)
            .map_err(ApiError::from)
            .and_then(|channel| {
                self.state
                    .auth
                    .authorize(self.principal, &channel, Operation::Publish)?;
                let message = validate_message(&self.state, &channel, message)?;
                Ok((channel, message))
            });
        let (channel, message) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => return self.send(nack(req, &error)).await,
        };
        // Bounded: past `publishes_in_flight_max` the reader waits, which stops reading frames.
        let Ok(slot) = self.publish_slots.clone().acquire_owned().await else {
            return false;
        };
        let ticket = self.state.store.append(channel, vec![message]);
        let out = self.out.clone();
        let metrics = self.state.metrics.clone();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let frame = match ticket.await {
                Ok(appended) => {
                    let appended = appended.into_iter().next().expect("one reply per message");
                    metrics.record_publish(
                        u64::from(!appended.duplicate),
                        u64::from(appended.duplicate),
                        started.elapsed(),
                    );
                    ServerFrame::Ack(Ack {
                        kind: AckTag::Tag,
                        req,
                        id: appended.id.to_string(),
                        serial: appended.position.serial.0,
                        epoch: appended.position.epoch.to_string(),
                        position: appended.position.to_string(),
                        duplicate: appended.duplicate,
                    })
                }
                Err(error) => nack(req, &ApiError::from(error)),
            };
            let _ = out.send(Outgoing::Frame(frame)).await;
            drop(slot);
        });
        true
    }

    /// Routes an `ack` to its durable subscription's pump, which answers it.
    async fn ack(&mut self, ack: AckDeliveries) -> bool {
        let durable = ChannelName::parse(&ack.channel).ok().and_then(|channel| {
            match self.subscriptions.get(&channel) {
                Some(Subscription::Durable(durable)) => Some(durable),
                _ => None,
            }
        });
        let refused = match durable {
            Some(durable) => match durable.ack(&ack).await {
                Ok(()) => return true,
                Err(refused) => refused,
            },
            None => (
                ErrorCode::NotSubscribed,
                format!("no at-least-once subscription on {:?}", ack.channel),
            ),
        };
        let (code, message) = refused;
        self.error(ack.req, Some(ack.channel.clone()), code, message)
            .await
    }

    /// Sends each subscribed channel's top. False when the connection is gone.
    async fn heartbeat(&mut self) -> bool {
        let frame = self.state.realtime.heartbeat(self.subscriptions.keys());
        self.send(frame).await
    }

    async fn error(
        &self,
        req: Option<u64>,
        channel: Option<String>,
        code: ErrorCode,
        message: String,
    ) -> bool {
        self.send(ServerFrame::Error(ErrorFrame {
            kind: ErrorTag::Tag,
            req,
            channel,
            code: code.as_str().to_owned(),
            message,
            retryable: code.retryable(),
        }))
        .await
    }

    /// Sends an `error` frame, then closes with `close_code`.
    async fn refuse(&self, close_code: u16, code: ErrorCode, message: &str) {
        self.error(None, None, code, message.to_owned()).await;
        self.close(close_code, message.to_owned()).await;
    }

    async fn close(&self, code: u16, reason: String) {
        // Close reasons are limited to 123 bytes by the WebSocket protocol.
        let mut reason = reason;
        if reason.len() > 120 {
            let mut end = 120;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        let _ = self.out.send(Outgoing::Close { code, reason }).await;
    }

    async fn close_after_read_error(&self, error: &axum::Error) {
        let text = error.to_string();
        if text.contains("too long") || text.contains("Space limit") || text.contains("size") {
            let reason = format!(
                "frame over the {} byte limit",
                self.state.realtime.config.frame_bytes
            );
            self.close(close::FRAME_TOO_LARGE, reason).await;
        }
    }

    async fn send(&self, frame: ServerFrame) -> bool {
        self.out.send(Outgoing::Frame(frame)).await.is_ok()
    }
}

fn nack(req: u64, error: &ApiError) -> ServerFrame {
    let detail = &error.0.error;
    ServerFrame::Nack(Nack {
        kind: NackTag::Tag,
        req,
        code: detail.code.clone(),
        message: detail.message.clone(),
        retryable: detail.retryable,
    })
}

/// The `req` of a frame that failed to decode, when it has a readable one, so the error can
/// be matched to the request.
fn request_id(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct OnlyReq {
        req: Option<u64>,
    }
    serde_json::from_str::<OnlyReq>(text)
        .ok()
        .and_then(|only| only.req)
}
