//! # herald-log
//!
//! Durable per-channel message logs behind one trait, [`LogStore`].
//!
//! # Layout
//! - [`store`]: the trait and its result types.
//! - [`table`]: the channel table both stores share (sequencing, indexes, retention, recovery
//!   steps), built on `herald_core::ChannelStream`.
//! - [`subscribers`]: the durable subscriber snapshots both stores keep (newest per
//!   (channel, id)).
//! - [`states`]: the durable state records both stores keep (an opaque value per string key,
//!   newest per key; e.g. MQTT persistent sessions).
//! - [`memory`]: the in-memory store (tests, `backend = "memory"`).
//! - [`clock`]: injectable time.
//! - [`embedded`]: the embedded segmented log (the default store), on a [`fs::Filesystem`].
//! - [`fs`]: the filesystem the embedded log uses: real files or a simulated, crashable one.
//!
//! # Invariants
//! - Nothing is acknowledged before it is durable; a failed write or fsync poisons the store.
//! - Readers see only durable messages, durable subscriber snapshots and durable state records.

pub mod clock;
pub mod embedded;
pub mod fs;
pub mod memory;
pub mod states;
pub mod store;
pub mod subscribers;
pub mod table;

pub use clock::{Clock, ManualClock, SystemClock};
pub use embedded::{EmbeddedLog, EmbeddedOptions, EmbeddedStats};
pub use fs::{Filesystem, SimFs, StdFs};
pub use memory::MemoryStore;
pub use states::{
    STATE_KEY_BYTES_MAX, STATE_RECORD_OVERHEAD_BYTES_MAX, STATE_VALUE_BYTES_MAX, StateChange,
    StateTable, check_state_key, check_state_value,
};
pub use store::{
    AppendError, AppendTicket, Appended, DurableListener, LogStore, ReadError, ReadPage, ReadQuery,
    SaveTicket, StoreError, StoreHealth, StoreStats,
};
pub use subscribers::{SubscriberChange, SubscriberTable};
