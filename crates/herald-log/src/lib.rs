//! # herald-log
//!
//! Durable per-channel message logs behind one trait, [`LogStore`].
//!
//! # Layout
//! - [`store`]: the trait and its result types.
//! - [`table`]: the channel table both stores share (sequencing, indexes, retention, recovery
//!   steps), built on `herald_core::ChannelStream`.
//! - [`memory`]: the in-memory store (tests, `backend = "memory"`).
//! - [`clock`]: injectable time.
//!
//! # Invariants
//! - Nothing is acknowledged before it is durable; a failed write or fsync poisons the store.
//! - Readers see only durable messages.

pub mod clock;
pub mod memory;
pub mod store;
pub mod table;

pub use clock::{Clock, ManualClock, SystemClock};
pub use memory::MemoryStore;
pub use store::{
    AppendError, AppendTicket, Appended, LogStore, ReadError, ReadPage, ReadQuery, StoreError,
    StoreHealth,
};
