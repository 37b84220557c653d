//! # herald-client
//!
//! The Rust SDK for Herald's WebSocket protocol: publish with idempotent retries until ACK,
//! subscribe with a delivery guarantee, and resume after a drop or in a new process without
//! losing or repeating a message.
//!
//! ```no_run
//! use herald_client::{Client, ClientOptions, Event, SubscribeOptions};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Inside a tokio runtime: `connect` starts the connection task.
//! let client = Client::connect(ClientOptions::new("ws://127.0.0.1:8080/v1/ws"))?;
//! let ack = client.publish_json("chat:room-1", &serde_json::json!({"text": "hi"})).await?;
//! println!("stored at {}", ack.position);
//!
//! let mut subscription = client
//!     .subscribe("chat:room-1", SubscribeOptions::from_oldest())
//!     .await?;
//! while let Some(event) = subscription.next().await {
//!     match event {
//!         Event::Message(message) => println!("{} {:?}", message.position, message.data),
//!         Event::ContinuityLost { from, to, reason } => eprintln!("lost {from}..{to:?}: {reason}"),
//!         Event::Broken(broken) => eprintln!("stream break: {broken:?}"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! At-least-once: the server holds the position of a named (durable) subscriber, and delivers
//! every message until it is acked, across disconnects and restarts.
//!
//! ```no_run
//! use herald_client::{AckMode, AtLeastOnce, Client, ClientOptions, Event};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = Client::connect(ClientOptions::new("ws://127.0.0.1:8080/v1/ws"))?;
//! let worker = AtLeastOnce::new("mailer").ack_mode(AckMode::Manual).ack_wait_ms(60_000);
//! let mut subscription = client.subscribe("jobs:mail", worker.into()).await?;
//! while let Some(event) = subscription.next().await {
//!     match event {
//!         Event::Delivery(delivery) => {
//!             println!("{} (delivery {})", delivery.message.position, delivery.delivery);
//!             // ... do the work, then:
//!             delivery.ack()?;
//!         }
//!         Event::Expired { from, to } => eprintln!("expired unacked: {from}..={to}"),
//!         Event::TakenOver => eprintln!("another consumer took this subscriber over"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`session`]: the pure client session (no tokio, no sockets): subscriptions with their held
//!   position and chain, resume frames after a reconnect, dedupe by serial, `prev` and chain
//!   checks, notices, heartbeats, publish acks and retries.
//!   At-least-once subscriptions and their acks are in `session/durable`.
//! - [`client`]: [`Client`] handles, options, errors, [`Publication`].
//! - `driver`: the connection task over tokio-tungstenite: reconnect with exponential backoff
//!   and jitter, routing of the session's outputs, acks from the mailbox.
//! - [`subscription`]: [`Subscription`], the events of one channel (and auto acks).
//! - [`ack`]: [`AckHandle`] and the mailbox that carries acks to the connection task.
//! - [`event`]: [`Event`], [`Message`] and [`Delivery`], what a subscription yields.
//! - [`recovery`]: [`RecoveryKey`] (a position per channel) and the [`PositionStore`] trait.
//! - [`backoff`]: the reconnect delay schedule.
//!
//! # Invariants
//! - A break in a channel's stream (a missing serial, a chain that does not verify, an epoch
//!   change without notice) is reported as [`Event::Broken`], never delivered past.
//! - Every serial reaches an exactly-once or at-most-once subscriber at most once per process;
//!   an exactly-once subscription resumes from its held position after every reconnect, so it
//!   also gets every serial at least once, unless an explicit [`Event::ContinuityLost`] says
//!   otherwise.
//! - An at-least-once subscription hands over every delivery the server sends, repeats
//!   included (with their count), and re-subscribes with its `subscriber_id` after every
//!   reconnect. Its acks are re-sent until the server answers them; after a takeover (close
//!   code 4004) the client stops rather than take the subscriber back.
//! - A publish keeps its id across every re-send: it is stored at most once.
//! - Every queue is bounded: commands, per-subscription events, publishes in flight, ack
//!   frames in flight (the ack mailbox is bounded by what was delivered).

pub mod ack;
pub mod backoff;
pub mod client;
mod driver;
pub mod event;
pub mod recovery;
pub mod session;
pub mod subscription;

pub use ack::{AckError, AckHandle};
pub use client::{Client, ClientError, ClientOptions, ConnectionState, Publication};
pub use event::{BreakKind, Broken, Delivery, Event, Message};
pub use herald_core::{Data, Guarantee, Position, Serial};
pub use herald_protocol::ws::{Ack, Continuity};
pub use recovery::{
    InvalidRecoveryKey, MemoryPositionStore, PositionStore, RecoveryKey, StoreError,
};
pub use session::{AckMode, AtLeastOnce, PublishError, SessionConfig, SubscribeOptions};
pub use subscription::Subscription;
