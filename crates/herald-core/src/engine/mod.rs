//! The sans-IO engine: state machines that decide what Herald does, driven by a runtime that
//! does the I/O they ask for.
//!
//! Each machine takes inputs through `handle_*` methods and hands out effect requests and
//! outputs through `poll_*` methods; it never reads a clock, a socket, a file or a random
//! source. The tokio server (`herald-server`) and the deterministic simulation (`herald-sim`)
//! drive the very same machines, so what the simulation checks is what production runs.
//!
//! # Layout
//! - [`subscription`]: [`SubscriptionMachine`], the delivery decisions of one subscription
//!   (start position, replay, catch-up, at-most-once drops and gaps, skip runs, lost
//!   continuity).
//! - [`durable`]: [`DurableMachine`], the at-least-once decisions of one connected durable
//!   subscriber (window, delivery counts, acks, redelivery, dead letters, expiry), persisting
//!   its `SubscriberState` through the driver.

pub mod durable;
pub mod subscription;

pub use durable::{
    AckRejected, AckTicket, DeadLetterReason, DurableAction, DurableMachine, DurableOutbound,
    dead_letter_channel, dead_letter_id, idle_deadline,
};

pub use subscription::{
    Action, Continuity, Deliverable, Filter, Outbound, Page, SkipCause, Start, SubscriptionMachine,
    last_missed,
};
