//! The application's side of the SDK: [`Client`] handles (cheap to clone) reaching one
//! connection task (`driver.rs`) through a bounded command channel, with replies on
//! `oneshot`s; the options, the errors and what a publish carries.
//!
//! # Invariants
//! - Publishes in flight are bounded by `publishes_in_flight_max` (a semaphore permit lives
//!   with each until its ack or failure).
//! - A fatal refusal (bad credentials, unsupported protocol) stops the client: it is reported
//!   to every subscription as [`Event::Closed`] and to every caller as [`ClientError::Rejected`].
//! - A takeover of an at-least-once subscriber (close code 4004) stops the client too
//!   ([`Event::TakenOver`], [`ClientError::TakenOver`]): reconnecting would take the subscriber
//!   back from the consumer that just took it, and the two would alternate.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::{ChannelName, MessageId, SubscriberId};
use herald_protocol::ws::Ack;
use herald_protocol::{Encoding, PublishMessage, Ttl};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::ack::AckMailbox;
use crate::driver::{Driver, Stop};
use crate::event::Event;
use crate::recovery::{PositionStore, RecoveryKey, StoreError};
use crate::session::{AckMode, PublishError, Session, SessionConfig, SubscribeOptions};
use crate::subscription::Subscription;

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
    /// At-least-once ack frames sent and not yet answered; more acks wait (coalescing) in
    /// the client until answers come.
    pub acks_in_flight_max: usize,
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
            acks_in_flight_max: 256,
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
    /// Another connection subscribed with the same at-least-once `subscriber_id` (close code
    /// 4004); this client stopped and does not take the subscriber back.
    #[error("an at-least-once subscriber was taken over by another connection (close code 4004)")]
    TakenOver,
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

pub(crate) type PublishReply = oneshot::Sender<Result<Ack, ClientError>>;

pub(crate) enum Command {
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
    stop: Arc<Mutex<Option<Stop>>>,
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
                && options.commands_max > 0
                && options.acks_in_flight_max > 0,
            "queue bounds must be positive"
        );
        let (commands_tx, commands_rx) = mpsc::channel(options.commands_max);
        let (state_tx, state_rx) = watch::channel(ConnectionState::default());
        let stop = Arc::new(Mutex::new(None));
        let acks = Arc::new(AckMailbox::default());
        let client = Client {
            commands: commands_tx,
            publish_permits: Arc::new(Semaphore::new(options.publishes_in_flight_max)),
            position_store: options.position_store.clone(),
            events_max: options.subscription_events_max,
            state: state_rx,
            next_subscriber: Arc::default(),
            stop: stop.clone(),
        };
        let driver = Driver {
            session: Session::new(options.session.clone()),
            options,
            commands: commands_rx,
            subscribers: BTreeMap::new(),
            waiters: HashMap::new(),
            ack_waiters: HashMap::new(),
            acks,
            state: state_tx,
            retry_at: None,
            retry_rounds: 0,
            stop,
        };
        tokio::spawn(driver.run());
        Ok(client)
    }

    fn closed_error(&self) -> ClientError {
        match self.stop.lock().expect("stop lock").clone() {
            Some(stop) => stop.error(),
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
    ///
    /// At-least-once ([`SubscribeOptions::at_least_once`]): deliveries come as
    /// [`Event::Delivery`] with an ack handle; after a reconnect the subscription continues
    /// from the subscriber's acknowledged position, held by the server.
    pub async fn subscribe(
        &self,
        channel: &str,
        mut options: SubscribeOptions,
    ) -> Result<Subscription, ClientError> {
        ChannelName::parse(channel)
            .map_err(|error| ClientError::InvalidInput(error.to_string()))?;
        let auto_ack = match &options.at_least_once {
            Some(at_least_once) => {
                check_at_least_once(&options)?;
                at_least_once.ack_mode == AckMode::Auto
            }
            None => false,
        };
        if options.from.is_none()
            && options.at_least_once.is_none()
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
        Ok(Subscription::new(
            channel.to_owned(),
            subscriber,
            events_rx,
            self.commands.clone(),
            auto_ack,
        ))
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

/// At-least-once: the server holds the position and serves whole messages, so the options of
/// the other guarantees have no place here.
fn check_at_least_once(options: &SubscribeOptions) -> Result<(), ClientError> {
    let at_least_once = options
        .at_least_once
        .as_ref()
        .expect("called for at-least-once");
    SubscriberId::parse(&at_least_once.subscriber_id)
        .map_err(|error| ClientError::InvalidInput(error.to_string()))?;
    let conflicts: Vec<&str> = [
        (
            options.guarantee != herald_core::Guarantee::ExactlyOnce,
            "guarantee",
        ),
        (options.from.is_some(), "from"),
        (options.rewind.is_some(), "rewind"),
        (options.hints, "hints"),
        (options.filter.is_some(), "filter"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if !conflicts.is_empty() {
        return Err(ClientError::InvalidInput(format!(
            "an at-least-once subscription takes no {} (the server holds its position)",
            conflicts.join(", ")
        )));
    }
    Ok(())
}
