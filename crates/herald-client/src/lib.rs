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
//! # Layout
//! - [`session`]: the pure client session (no tokio, no sockets): subscriptions with their held
//!   position and chain, resume frames after a reconnect, dedupe by serial, `prev` and chain
//!   checks, notices, heartbeats, publish acks and retries.
//! - [`client`]: the tokio driver over tokio-tungstenite: [`Client`], [`Subscription`],
//!   reconnect with exponential backoff and jitter.
//! - [`event`]: [`Event`] and [`Message`], what a subscription yields.
//! - [`recovery`]: [`RecoveryKey`] (a position per channel) and the [`PositionStore`] trait.
//! - [`backoff`]: the reconnect delay schedule.
//!
//! # Invariants
//! - A break in a channel's stream (a missing serial, a chain that does not verify, an epoch
//!   change without notice) is reported as [`Event::Broken`], never delivered past.
//! - Every serial reaches a subscriber at most once per process; an exactly-once subscription
//!   resumes from its held position after every reconnect, so it also gets every serial at
//!   least once, unless an explicit [`Event::ContinuityLost`] says otherwise.
//! - A publish keeps its id across every re-send: it is stored at most once.
//! - Every queue is bounded: commands, per-subscription events, publishes in flight.

pub mod backoff;
pub mod client;
pub mod event;
pub mod recovery;
pub mod session;

pub use client::{Client, ClientError, ClientOptions, ConnectionState, Publication, Subscription};
pub use event::{BreakKind, Broken, Event, Message};
pub use herald_core::{Data, Guarantee, Position, Serial};
pub use herald_protocol::ws::{Ack, Continuity};
pub use recovery::{
    InvalidRecoveryKey, MemoryPositionStore, PositionStore, RecoveryKey, StoreError,
};
pub use session::{PublishError, SessionConfig, SubscribeOptions};
