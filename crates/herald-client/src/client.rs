//! The tokio driver: one task owns the [`Session`] and the WebSocket, reached by [`Client`]
//! handles through a bounded command channel (replies on `oneshot`s).
//!
//! The task connects, sends `connect`, waits for `connected`, sends what
//! [`Session::on_connected`] returns, then feeds every frame to [`Session::handle`] and routes
//! the outputs: events to each [`Subscription`]'s bounded queue, acks to the waiting
//! [`Client::publish`] calls. When the connection drops (error, close, or no frame for about
//! two heartbeats) it reconnects with exponential backoff and jitter, serving commands
//! meanwhile (publishes wait for the next connection).
//!
//! # Backpressure
//! A subscription's queue holds `subscription_events_max` events. When it is full the task
//! waits for room and stops reading the socket meanwhile: the server then sees a slow
//! subscriber (exactly-once: it catches up from its log later; at-most-once: it drops with a
//! `gap` notice). So a consumer must not await a publish *ack* in the loop that drains a
//! subscription while its queue can fill; spawn the publish instead.
//!
//! # Invariants
//! - Publishes in flight are bounded by `publishes_in_flight_max` (a semaphore permit lives
//!   with each until its ack or failure).
//! - A fatal refusal (bad credentials, unsupported protocol) stops the client: it is reported
//!   to every subscription as [`Event::Closed`] and to every caller as [`ClientError::Rejected`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_core::{ChannelName, MessageId};
use herald_protocol::ws::{self, Ack, ClientFrame, Connected, ServerFrame};
use herald_protocol::{Encoding, PublishMessage, Ttl};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::backoff::reconnect_delay;
use crate::event::Event;
use crate::recovery::{PositionStore, RecoveryKey, StoreError};
use crate::session::{Output, PublishError, Session, SessionConfig, SubscribeOptions};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How to reach the server and the bounds of the client.
#[derive(Clone)]
pub struct ClientOptions {
    /// `ws://HOST:PORT/v1/ws`.
    pub url: String,
    /// API key, sent in the `connect` frame.
    pub key: Option<String>,
    pub reconnect_delay_min: Duration,
    pub reconnect_delay_max: Duration,
    /// Time to open the socket and get `connected`.
    pub handshake_timeout: Duration,
    /// Events queued per subscription before the client stops reading the socket.
    pub subscription_events_max: usize,
    /// Publishes sent and not yet acknowledged; `publish` waits for room beyond it.
    pub publishes_in_flight_max: usize,
    /// Commands queued to the connection task.
    pub commands_max: usize,
    /// Loaded when a subscription starts without `from`.
    pub position_store: Option<Arc<dyn PositionStore>>,
    pub session: SessionConfig,
}

impl ClientOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key: None,
            reconnect_delay_min: Duration::from_millis(100),
            reconnect_delay_max: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            subscription_events_max: 1024,
            publishes_in_flight_max: 1024,
            commands_max: 256,
            position_store: None,
            session: SessionConfig::default(),
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("url", &self.url)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("reconnect_delay_min", &self.reconnect_delay_min)
            .field("reconnect_delay_max", &self.reconnect_delay_max)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("the client is closed")]
    Closed,
    #[error("the server refused this client: {0}")]
    Rejected(String),
    #[error("invalid URL {0:?}: expected ws://HOST:PORT/v1/ws")]
    InvalidUrl(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("already subscribed to {0:?} on this client")]
    AlreadySubscribed(String),
    #[error("publish failed: {} ({}): {}", .0.code, if .0.retryable { "retryable" } else { "final" }, .0.message)]
    Publish(PublishError),
    #[error("position store: {0}")]
    Store(StoreError),
}

/// A message to publish. `id` is generated when absent; it is the idempotency key every
/// re-send carries.
#[derive(Clone, Debug)]
pub struct Publication {
    pub id: Option<String>,
    pub name: Option<String>,
    pub headers: BTreeMap<String, String>,
    data: Box<RawValue>,
    encoding: Option<Encoding>,
    pub ttl: Option<Duration>,
}

impl Publication {
    pub fn json(value: &impl Serialize) -> Result<Self, ClientError> {
        let data = serde_json::value::to_raw_value(value)
            .map_err(|error| ClientError::InvalidInput(format!("data: {error}")))?;
        Ok(Self::with_data(data, None))
    }

    /// JSON text as is (it must be one valid JSON value).
    pub fn json_text(text: &str) -> Result<Self, ClientError> {
        let data = RawValue::from_string(text.to_owned())
            .map_err(|error| ClientError::InvalidInput(format!("data: {error}")))?;
        Ok(Self::with_data(data, None))
    }

    pub fn binary(bytes: &[u8]) -> Self {
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        let data = serde_json::value::to_raw_value(&text).expect("a string serialises");
        Self::with_data(data, Some(Encoding::Base64))
    }

    fn with_data(data: Box<RawValue>, encoding: Option<Encoding>) -> Self {
        Self {
            id: None,
            name: None,
            headers: BTreeMap::new(),
            data,
            encoding,
            ttl: None,
        }
    }

    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    fn into_message(self) -> Result<PublishMessage, ClientError> {
        let id = match self.id {
            Some(id) => MessageId::parse(&id)
                .map_err(|error| ClientError::InvalidInput(error.to_string()))?
                .to_string(),
            // 128 random bits: unique without coordination, so a retry is always recognised.
            None => format!("hc-{:032x}", rand::random::<u128>()),
        };
        let ttl = self
            .ttl
            .map(|ttl| Ttl::Text(format!("{}ms", ttl.as_millis())));
        Ok(PublishMessage {
            id: Some(id),
            name: self.name,
            headers: (!self.headers.is_empty()).then_some(self.headers),
            data: self.data,
            encoding: self.encoding,
            ttl,
        })
    }
}

/// Whether the client is connected, and how many connections it has made so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionState {
    pub connected: bool,
    pub connections: u64,
    /// The client stopped for good (closed, or refused by the server).
    pub stopped: bool,
}

type PublishReply = oneshot::Sender<Result<Ack, ClientError>>;

enum Command {
    Publish {
        channel: String,
        message: PublishMessage,
        reply: PublishReply,
        permit: OwnedSemaphorePermit,
    },
    Subscribe {
        channel: String,
        options: SubscribeOptions,
        subscriber: u64,
        events: mpsc::Sender<Event>,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Unsubscribe {
        channel: String,
        subscriber: u64,
    },
    RecoveryKey {
        reply: oneshot::Sender<RecoveryKey>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// A handle to one connection task. Cheap to clone; the task ends when every handle and every
/// [`Subscription`] is dropped, or on [`Client::close`].
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    publish_permits: Arc<Semaphore>,
    position_store: Option<Arc<dyn PositionStore>>,
    events_max: usize,
    state: watch::Receiver<ConnectionState>,
    next_subscriber: Arc<std::sync::atomic::AtomicU64>,
    rejection: Arc<std::sync::Mutex<Option<String>>>,
}

impl Client {
    /// Starts the connection task (call it inside a tokio runtime); it connects (and
    /// reconnects) in the background, and publishes and subscriptions made before the first
    /// connection wait for it. Calls have no deadline of their own: wrap them in
    /// `tokio::time::timeout` where the application needs one.
    pub fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        if !(options.url.starts_with("ws://") || options.url.starts_with("wss://")) {
            return Err(ClientError::InvalidUrl(options.url));
        }
        assert!(
            options.subscription_events_max > 0
                && options.publishes_in_flight_max > 0
                && options.commands_max > 0,
            "queue bounds must be positive"
        );
        let (commands_tx, commands_rx) = mpsc::channel(options.commands_max);
        let (state_tx, state_rx) = watch::channel(ConnectionState::default());
        let rejection = Arc::new(std::sync::Mutex::new(None));
        let client = Client {
            commands: commands_tx,
            publish_permits: Arc::new(Semaphore::new(options.publishes_in_flight_max)),
            position_store: options.position_store.clone(),
            events_max: options.subscription_events_max,
            state: state_rx,
            next_subscriber: Arc::default(),
            rejection: rejection.clone(),
        };
        let driver = Driver {
            session: Session::new(options.session.clone()),
            options,
            commands: commands_rx,
            subscribers: BTreeMap::new(),
            waiters: HashMap::new(),
            state: state_tx,
            retry_at: None,
            retry_rounds: 0,
            rejection,
        };
        tokio::spawn(driver.run());
        Ok(client)
    }

    fn closed_error(&self) -> ClientError {
        match self.rejection.lock().expect("rejection lock").clone() {
            Some(reason) => ClientError::Rejected(reason),
            None => ClientError::Closed,
        }
    }

    /// Publishes one message and waits for its ACK, re-sending it with the same id across
    /// reconnects and retryable refusals. `duplicate: true` in the ack means an earlier send
    /// of this id was stored; the position is that one.
    pub async fn publish(
        &self,
        channel: &str,
        publication: Publication,
    ) -> Result<Ack, ClientError> {
        ChannelName::parse(channel)
            .map_err(|error| ClientError::InvalidInput(error.to_string()))?;
        let message = publication.into_message()?;
        let permit = self
            .publish_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.closed_error())?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Publish {
            channel: channel.to_owned(),
            message,
            reply,
            permit,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| self.closed_error())?;
        answer.await.map_err(|_| self.closed_error())?
    }

    /// [`Client::publish`] of a JSON value with a generated id.
    pub async fn publish_json(
        &self,
        channel: &str,
        value: &impl Serialize,
    ) -> Result<Ack, ClientError> {
        self.publish(channel, Publication::json(value)?).await
    }

    /// Subscribes to a channel. Without `from`, an exactly-once subscription starts from the
    /// position store's position for the channel, if a store is set and has one.
    pub async fn subscribe(
        &self,
        channel: &str,
        mut options: SubscribeOptions,
    ) -> Result<Subscription, ClientError> {
        ChannelName::parse(channel)
            .map_err(|error| ClientError::InvalidInput(error.to_string()))?;
        if options.from.is_none()
            && options.guarantee == herald_core::Guarantee::ExactlyOnce
            && let Some(store) = &self.position_store
        {
            options.from = store.load(channel).map_err(ClientError::Store)?;
        }
        let subscriber = self
            .next_subscriber
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (events_tx, events_rx) = mpsc::channel(self.events_max);
        let (reply, answer) = oneshot::channel();
        let command = Command::Subscribe {
            channel: channel.to_owned(),
            options,
            subscriber,
            events: events_tx,
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| self.closed_error())?;
        answer.await.map_err(|_| self.closed_error())??;
        Ok(Subscription {
            channel: channel.to_owned(),
            subscriber,
            events: events_rx,
            commands: self.commands.clone(),
        })
    }

    /// The position held for every subscribed channel.
    pub async fn recovery_key(&self) -> Result<RecoveryKey, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::RecoveryKey { reply })
            .await
            .map_err(|_| self.closed_error())?;
        answer.await.map_err(|_| self.closed_error())
    }

    pub fn connection_state(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// Waits until the client has made at least `connections` connections and is connected.
    pub async fn wait_connected(&self, connections: u64) -> Result<(), ClientError> {
        let mut state = self.state.clone();
        state
            .wait_for(|state| {
                state.stopped || (state.connected && state.connections >= connections)
            })
            .await
            .map_err(|_| self.closed_error())?;
        if self.connection_state().stopped {
            return Err(self.closed_error());
        }
        Ok(())
    }

    /// Closes the connection; pending publishes fail with [`ClientError::Closed`] and every
    /// subscription gets [`Event::Closed`].
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }
}

/// The events of one subscribed channel. Dropping it unsubscribes.
pub struct Subscription {
    channel: String,
    subscriber: u64,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event; `None` once the subscription or the client is closed.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Best effort: when the queue is full the task notices the dropped receiver itself
        // on its next delivery to it.
        let _ = self.commands.try_send(Command::Unsubscribe {
            channel: std::mem::take(&mut self.channel),
            subscriber: self.subscriber,
        });
    }
}

struct Subscriber {
    id: u64,
    events: mpsc::Sender<Event>,
}

/// Why a connection ended.
enum Ended {
    /// Reconnect.
    Dropped,
    /// Stop the task.
    Stop,
}

/// Whether the task goes on after a command.
enum Flow {
    Continue,
    Stop,
}

/// Why opening a connection failed.
enum OpenError {
    Retry(String),
    Fatal(String),
}

struct Driver {
    options: ClientOptions,
    session: Session,
    commands: mpsc::Receiver<Command>,
    subscribers: BTreeMap<String, Subscriber>,
    waiters: HashMap<u64, (PublishReply, OwnedSemaphorePermit)>,
    state: watch::Sender<ConnectionState>,
    /// When to call `Session::retry_waiting`.
    retry_at: Option<Instant>,
    retry_rounds: u32,
    rejection: Arc<std::sync::Mutex<Option<String>>>,
}

impl Driver {
    async fn run(mut self) {
        let mut failures = 0u32;
        'outer: loop {
            // The options are cloned so that the opening future does not borrow the driver,
            // which keeps serving commands meanwhile.
            let options = self.options.clone();
            let opening = open(&options);
            tokio::pin!(opening);
            let opened = loop {
                tokio::select! {
                    opened = &mut opening => break opened,
                    command = self.commands.recv() => {
                        if let Flow::Stop = self.on_command(command, None).await {
                            break 'outer;
                        }
                    }
                }
            };
            match opened {
                Ok((socket, connected)) => {
                    let started = Instant::now();
                    self.state.send_modify(|state| {
                        state.connected = true;
                        state.connections += 1;
                    });
                    let ended = self.serve(socket, &connected).await;
                    self.session.on_disconnected();
                    self.retry_at = None;
                    self.state.send_modify(|state| state.connected = false);
                    if let Ended::Stop = ended {
                        break 'outer;
                    }
                    // A connection that lived a while resets the schedule; one that dies
                    // right after opening must not make the client reconnect in a tight loop.
                    if started.elapsed() >= self.options.reconnect_delay_max {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                    // The first reconnect after a long-lived connection is quick.
                    let delay = self.delay(failures.saturating_sub(1));
                    if let Ended::Stop = self.pause(delay).await {
                        break 'outer;
                    }
                }
                Err(OpenError::Fatal(reason)) => {
                    tracing::error!(%reason, "herald-client: the server refused the connection");
                    *self.rejection.lock().expect("rejection lock") = Some(reason.clone());
                    self.shutdown(&reason);
                    break 'outer;
                }
                Err(OpenError::Retry(reason)) => {
                    tracing::debug!(%reason, failures, "herald-client: connect failed");
                    let delay = self.delay(failures);
                    failures = failures.saturating_add(1);
                    if let Ended::Stop = self.pause(delay).await {
                        break 'outer;
                    }
                }
            }
        }
        self.state.send_modify(|state| {
            state.connected = false;
            state.stopped = true;
        });
    }

    fn delay(&self, failures: u32) -> Duration {
        reconnect_delay(
            failures,
            self.options.reconnect_delay_min,
            self.options.reconnect_delay_max,
            rand::random::<f64>(),
        )
    }

    /// Waits `delay` while serving commands.
    async fn pause(&mut self, delay: Duration) -> Ended {
        let wake = sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                () = &mut wake => return Ended::Dropped,
                command = self.commands.recv() => {
                    if let Flow::Stop = self.on_command(command, None).await {
                        return Ended::Stop;
                    }
                }
            }
        }
    }

    /// Runs one connection until it drops or the client stops.
    async fn serve(&mut self, mut socket: Socket, connected: &Connected) -> Ended {
        // The server promises a heartbeat every `heartbeat_ms`; silence for about two of them
        // means the connection is dead even if TCP has not noticed.
        let silence_max = Duration::from_millis(connected.heartbeat_ms.saturating_mul(2))
            .max(Duration::from_millis(500))
            + Duration::from_millis(500);
        let frames = self.session.on_connected();
        if send_all(&mut socket, frames).await.is_err() {
            return Ended::Dropped;
        }
        let mut silent_until = Instant::now() + silence_max;
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                received = socket.next() => {
                    let text = match received {
                        Some(Ok(WsMessage::Text(text))) => text,
                        Some(Ok(WsMessage::Close(close))) => {
                            tracing::debug!(?close, "herald-client: server closed the connection");
                            if let Some(reason) = fatal_close(close.as_ref().map(|close| close.code)) {
                                *self.rejection.lock().expect("rejection lock") = Some(reason.clone());
                                self.shutdown(&reason);
                                return Ended::Stop;
                            }
                            return Ended::Dropped;
                        }
                        Some(Ok(_)) => {
                            // Pings (answered by tungstenite), pongs, binary: alive, nothing to do.
                            silent_until = Instant::now() + silence_max;
                            continue;
                        }
                        Some(Err(error)) => {
                            tracing::debug!(%error, "herald-client: connection error");
                            return Ended::Dropped;
                        }
                        None => return Ended::Dropped,
                    };
                    silent_until = Instant::now() + silence_max;
                    let frame = match ServerFrame::from_json(text.as_str()) {
                        Ok(frame) => frame,
                        Err(error) => {
                            tracing::warn!(%error, "herald-client: undecodable frame from the server");
                            continue;
                        }
                    };
                    let outputs = self.session.handle(frame);
                    if let Err(Ended::Dropped) = self.route(outputs, &mut socket).await {
                        return Ended::Dropped;
                    }
                    // Time spent waiting for room in a subscriber's queue is not the server's
                    // silence.
                    silent_until = Instant::now() + silence_max;
                }
                command = self.commands.recv() => {
                    if let Flow::Stop = self.on_command(command, Some(&mut socket)).await {
                        let _ = socket.close(None).await;
                        return Ended::Stop;
                    }
                }
                () = sleep_until(silent_until) => {
                    tracing::debug!("herald-client: no frame for {silence_max:?}, reconnecting");
                    return Ended::Dropped;
                }
                () = sleep_until(retry_at.unwrap_or_else(far_future)), if retry_at.is_some() => {
                    self.retry_at = None;
                    let frames = self.session.retry_waiting();
                    if send_all(&mut socket, frames).await.is_err() {
                        return Ended::Dropped;
                    }
                }
            }
        }
    }

    /// Acts on the session's outputs. Only a failed send ends the connection.
    async fn route(&mut self, outputs: Vec<Output>, socket: &mut Socket) -> Result<(), Ended> {
        for output in outputs {
            match output {
                Output::Event { channel, event } => {
                    let closes = matches!(event, Event::Closed { .. });
                    let Some(subscriber) = self.subscribers.get(&channel) else {
                        continue;
                    };
                    if subscriber.events.send(event).await.is_err() {
                        // The application dropped the subscription.
                        self.subscribers.remove(&channel);
                        let frames = self.session.unsubscribe(&channel);
                        send_all(socket, frames).await.map_err(|_| Ended::Dropped)?;
                    } else if closes {
                        self.subscribers.remove(&channel);
                    }
                }
                Output::Acked { req, ack } => {
                    self.retry_rounds = 0;
                    if let Some((reply, _permit)) = self.waiters.remove(&req) {
                        let _ = reply.send(Ok(ack));
                    }
                }
                Output::PublishFailed { req, error } => {
                    if let Some((reply, _permit)) = self.waiters.remove(&req) {
                        let _ = reply.send(Err(ClientError::Publish(error)));
                    }
                }
                Output::Send(frame) => {
                    send_all(socket, vec![frame])
                        .await
                        .map_err(|_| Ended::Dropped)?;
                }
                Output::RetryLater => {
                    if self.retry_at.is_none() {
                        let delay = self.delay(self.retry_rounds.min(16));
                        self.retry_rounds = self.retry_rounds.saturating_add(1);
                        self.retry_at = Some(Instant::now() + delay);
                    }
                }
                Output::ConnectionError(error) => {
                    tracing::warn!(code = %error.code, message = %error.message, "herald-client: server error");
                }
            }
        }
        Ok(())
    }

    /// Applies one command; `socket` is the live connection, if any. A failed send is left
    /// for the read side to notice (the frame stays pending in the session).
    async fn on_command(&mut self, command: Option<Command>, socket: Option<&mut Socket>) -> Flow {
        let Some(command) = command else {
            // Every handle is gone.
            self.shutdown("the client was dropped");
            return Flow::Stop;
        };
        let frames = match command {
            Command::Publish {
                channel,
                message,
                reply,
                permit,
            } => {
                if reply.is_closed() {
                    return Flow::Continue;
                }
                let (req, frames) = self.session.publish(&channel, message);
                self.waiters.insert(req, (reply, permit));
                frames
            }
            Command::Subscribe {
                channel,
                options,
                subscriber,
                events,
                reply,
            } => {
                if self.session.is_subscribed(&channel) {
                    let _ = reply.send(Err(ClientError::AlreadySubscribed(channel)));
                    return Flow::Continue;
                }
                let frames = self.session.subscribe(&channel, options);
                self.subscribers.insert(
                    channel,
                    Subscriber {
                        id: subscriber,
                        events,
                    },
                );
                let _ = reply.send(Ok(()));
                frames
            }
            Command::Unsubscribe {
                channel,
                subscriber,
            } => {
                let current = self.subscribers.get(&channel).map(|current| current.id);
                if current != Some(subscriber) {
                    return Flow::Continue;
                }
                self.subscribers.remove(&channel);
                self.session.unsubscribe(&channel)
            }
            Command::RecoveryKey { reply } => {
                let _ = reply.send(self.session.recovery_key());
                Vec::new()
            }
            Command::Close { reply } => {
                self.shutdown("the client was closed");
                let _ = reply.send(());
                return Flow::Stop;
            }
        };
        if let Some(socket) = socket {
            let _ = send_all(socket, frames).await;
        }
        Flow::Continue
    }

    /// Ends every subscription and pending publish.
    fn shutdown(&mut self, reason: &str) {
        // Stopped before anyone hears about it, so a caller that got an error sees it.
        self.state.send_modify(|state| {
            state.connected = false;
            state.stopped = true;
        });
        for (_, subscriber) in std::mem::take(&mut self.subscribers) {
            let _ = subscriber.events.try_send(Event::Closed {
                reason: reason.to_owned(),
            });
        }
        let rejected = self.rejection.lock().expect("rejection lock").clone();
        for (_, (reply, _permit)) in self.waiters.drain() {
            let error = match &rejected {
                Some(reason) => ClientError::Rejected(reason.clone()),
                None => ClientError::Closed,
            };
            let _ = reply.send(Err(error));
        }
        self.commands.close();
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

async fn send_all(
    socket: &mut Socket,
    frames: Vec<ClientFrame>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    if frames.is_empty() {
        return Ok(());
    }
    for frame in frames {
        socket.feed(WsMessage::text(frame.to_json())).await?;
    }
    socket.flush().await
}

/// Close codes after which reconnecting cannot help.
fn fatal_close(code: Option<CloseCode>) -> Option<String> {
    match code.map(u16::from) {
        Some(ws::close::UNAUTHORIZED) => Some("unauthorized (close code 4001)".to_owned()),
        Some(ws::close::UNSUPPORTED_PROTOCOL) => {
            Some("unsupported protocol (close code 4003)".to_owned())
        }
        _ => None,
    }
}

/// Opens the socket and completes the `connect` / `connected` handshake.
async fn open(options: &ClientOptions) -> Result<(Socket, Connected), OpenError> {
    let handshake = async {
        let (mut socket, _response) = connect_async(options.url.as_str())
            .await
            .map_err(|error| OpenError::Retry(error.to_string()))?;
        let connect = ClientFrame::Connect(ws::Connect {
            kind: ws::ConnectTag::Tag,
            protocol: ws::PROTOCOL_VERSION,
            auth: options.key.as_ref().map(|key| ws::Auth {
                key: Some(key.clone()),
                token: None,
            }),
            client: Some(concat!("herald-client/", env!("CARGO_PKG_VERSION")).to_owned()),
        });
        socket
            .send(WsMessage::text(connect.to_json()))
            .await
            .map_err(|error| OpenError::Retry(error.to_string()))?;
        loop {
            let message = match socket.next().await {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(OpenError::Retry(error.to_string())),
                None => return Err(OpenError::Retry("closed during the handshake".into())),
            };
            match message {
                WsMessage::Text(text) => match ServerFrame::from_json(text.as_str()) {
                    Ok(ServerFrame::Connected(connected)) => return Ok((socket, connected)),
                    Ok(ServerFrame::Error(error)) => {
                        let reason = format!("{}: {}", error.code, error.message);
                        let fatal = matches!(
                            error.code.as_str(),
                            "unauthorized" | "forbidden" | "unsupported_protocol"
                        );
                        return Err(if fatal {
                            OpenError::Fatal(reason)
                        } else {
                            OpenError::Retry(reason)
                        });
                    }
                    Ok(_) | Err(_) => {
                        return Err(OpenError::Retry(format!(
                            "expected `connected`, got {}",
                            text.as_str()
                        )));
                    }
                },
                WsMessage::Close(close) => {
                    let code = close.as_ref().map(|close| close.code);
                    return Err(match fatal_close(code) {
                        Some(reason) => OpenError::Fatal(reason),
                        None => OpenError::Retry(format!("closed during the handshake: {close:?}")),
                    });
                }
                _ => {}
            }
        }
    };
    timeout(options.handshake_timeout, handshake)
        .await
        .unwrap_or_else(|_| Err(OpenError::Retry("handshake timed out".into())))
}
