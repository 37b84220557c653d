//! The [`LogStore`] trait: what the server needs from a durable channel log.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use herald_core::{
    ChannelName, ContinuityLost, InvalidInput, Message, MessageId, NewMessage, Policies, Position,
    ReadFrom, SkippedRange, StreamStatus, SubscriberId, SubscriberState,
};
use tokio::sync::oneshot;

/// The outcome for one message of an accepted batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub id: MessageId,
    pub position: Position,
    /// True when the id was accepted before with the same content: `position` is the original.
    pub duplicate: bool,
}

/// Why an append was refused. Nothing of the batch was acknowledged; for every variant except
/// `Poisoned` nothing of it was stored. `Poisoned` from the group whose write or fsync failed
/// means the outcome is unknown (the disk may have kept the whole batch, never part of it):
/// a retry with the same ids after recovery settles it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    #[error(
        "message id {id} was already used on this channel with different content (at {position})"
    )]
    IdConflict { id: MessageId, position: Position },
    #[error("{0}")]
    Invalid(InvalidInput),
    /// A write or fsync failed earlier; the store refuses every append until restarted.
    #[error("storage failed: {0}; no writes are accepted until the server restarts")]
    Poisoned(String),
    #[error("the store is closed")]
    Closed,
    /// The store's bounded commit queue is full; nothing was queued.
    #[error("the store's commit queue is full")]
    Overloaded,
}

/// A pending append; resolves once the batch is durable (or refused).
pub struct AppendTicket(oneshot::Receiver<Result<Vec<Appended>, AppendError>>);

impl AppendTicket {
    /// A ticket and the sender that completes it.
    pub fn channel() -> (
        oneshot::Sender<Result<Vec<Appended>, AppendError>>,
        AppendTicket,
    ) {
        let (sender, receiver) = oneshot::channel();
        (sender, AppendTicket(receiver))
    }

    /// A ticket that is already complete.
    pub fn ready(result: Result<Vec<Appended>, AppendError>) -> AppendTicket {
        let (sender, ticket) = Self::channel();
        let _ = sender.send(result);
        ticket
    }

    /// Blocks the current thread until the append completes (for tests and tools without a runtime).
    pub fn wait(self) -> Result<Vec<Appended>, AppendError> {
        self.0.blocking_recv().unwrap_or(Err(AppendError::Closed))
    }
}

impl Future for AppendTicket {
    type Output = Result<Vec<Appended>, AppendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.unwrap_or(Err(AppendError::Closed)))
    }
}

/// A pending subscriber or state-record save or removal; resolves once the change is durable
/// (or refused, for the same reasons as an append: poisoned, closed, overloaded, too large).
pub struct SaveTicket(oneshot::Receiver<Result<(), AppendError>>);

impl SaveTicket {
    /// A ticket and the sender that completes it.
    pub fn channel() -> (oneshot::Sender<Result<(), AppendError>>, SaveTicket) {
        let (sender, receiver) = oneshot::channel();
        (sender, SaveTicket(receiver))
    }

    /// A ticket that is already complete.
    pub fn ready(result: Result<(), AppendError>) -> SaveTicket {
        let (sender, ticket) = Self::channel();
        let _ = sender.send(result);
        ticket
    }

    /// Blocks the current thread until the save completes (for tests and tools without a runtime).
    pub fn wait(self) -> Result<(), AppendError> {
        self.0.blocking_recv().unwrap_or(Err(AppendError::Closed))
    }
}

impl Future for SaveTicket {
    type Output = Result<(), AppendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.unwrap_or(Err(AppendError::Closed)))
    }
}

/// A read of one page of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadQuery {
    /// Oldest first, starting after a position (or at the oldest retained message).
    Forward { from: ReadFrom, limit: usize },
    /// Newest first, strictly before a position.
    Backward { before: Position, limit: usize },
    /// Newest first, starting at the channel's top (history screens): the same page as
    /// `Backward` from just past the top, without having to know the top first.
    Newest { limit: usize },
}

/// One page of messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPage {
    pub messages: Vec<Message>,
    /// Serial ranges passed over because the messages' TTL ran out.
    pub skipped: Vec<SkippedRange>,
    /// Cursor for the next page in the same direction (`None` for a channel with no messages).
    pub next: Option<Position>,
    pub top: Option<Position>,
    pub more: bool,
}

impl ReadPage {
    pub fn empty() -> Self {
        Self {
            messages: Vec::new(),
            skipped: Vec::new(),
            next: None,
            top: None,
            more: false,
        }
    }
}

/// Storage problems: I/O errors and detected corruption.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("I/O error on {path}: {detail}")]
    Io { path: String, detail: String },
    #[error("corrupt log: {path} at offset {offset}: {detail}")]
    Corrupt {
        path: String,
        offset: u64,
        detail: String,
    },
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("storage failed: {0}")]
    Poisoned(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("continuity lost ({})", .0.reason.as_str())]
    ContinuityLost(ContinuityLost),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counters a store keeps since it was opened, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Group writes made durable: one write plus one `fdatasync` each (0 for the memory store).
    pub groups: u64,
    /// Append commands answered from those groups (accepted batches, duplicates included).
    pub appends: u64,
    /// Message records written.
    pub messages: u64,
    /// Bytes of records written.
    pub bytes: u64,
    /// Segments created after open (rollovers).
    pub rollovers: u64,
    /// Subscriber snapshots and removals made durable (each rides a group counted in `groups`).
    pub subscriber_saves: u64,
    /// State record saves and removals made durable (each rides a group counted in `groups`).
    pub state_saves: u64,
}

/// Receives every message once it is durable, for live delivery to subscribers.
///
/// Called in commit order, so per channel in serial order, with no message missing or
/// repeated while the store runs. Called on the store's commit path (the committer thread, or
/// inside the memory store's write lock): it must return quickly, never block and never call
/// back into the store.
pub trait DurableListener: Send + Sync + 'static {
    fn on_durable(&self, messages: &[Message]);
}

/// Health of a store as reported by readiness checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Appends are refused until restart; reads of durable data still work.
    Poisoned(String),
}

/// A durable, per-channel ordered log. All methods are cheap to call concurrently.
///
/// # Contract (checked by `tests/conformance.rs` against every store)
/// - `append` resolves `Ok` only once every new message of the batch is durable; a batch is
///   all-or-nothing; ids are deduplicated per channel (same content: the original position
///   with `duplicate: true`; different content: `IdConflict`).
/// - reads return only durable messages, within retention, whose TTL has not run out.
/// - `save_subscriber` / `remove_subscriber` resolve `Ok` only once the change is durable,
///   sharing the group commit of appends (no second sync path); `subscriber` and
///   `subscribers` see only durable changes, the newest snapshot per (channel, id), and the
///   same after a restart; reclaim never loses a live snapshot.
/// - `save_state` / `remove_state` follow the same rules for state records (newest value per
///   key, tombstones, same group commit, survive restart and reclaim); `state` and `states`
///   see only durable changes. Bad keys and oversized values are refused with `Invalid` and
///   nothing is stored.
pub trait LogStore: Send + Sync + 'static {
    fn append(&self, channel: ChannelName, batch: Vec<NewMessage>) -> AppendTicket;
    fn read(&self, channel: &ChannelName, query: &ReadQuery) -> Result<ReadPage, ReadError>;
    fn message_by_id(
        &self,
        channel: &ChannelName,
        id: &MessageId,
    ) -> Result<Option<Message>, StoreError>;
    /// `None` when the channel has never had a message.
    fn channel_status(&self, channel: &ChannelName) -> Result<Option<StreamStatus>, StoreError>;
    fn health(&self) -> StoreHealth;
    fn policies(&self) -> &Policies;
    /// Frees storage of messages that are out of retention (or expired) and past the dedupe
    /// window. Blocking; returns how many messages were dropped.
    fn reclaim(&self) -> Result<usize, StoreError>;
    /// Counters since the store was opened.
    fn stats(&self) -> StoreStats;
    /// Installs the listener that sees every message made durable from now on (one per store;
    /// a second call replaces the first).
    fn set_durable_listener(&self, listener: std::sync::Arc<dyn DurableListener>);

    /// Persists a durable subscriber's snapshot, replacing the previous one of the same
    /// (channel, id); resolves once durable. It rides the same queue and group commit as
    /// appends (one write and one `fdatasync` for everything queued together) and is refused
    /// like an append when the store is poisoned, closed or overloaded.
    fn save_subscriber(&self, state: SubscriberState) -> SaveTicket;
    /// Removes a subscriber durably (a tombstone). Removing an unknown subscriber is not an
    /// error.
    fn remove_subscriber(&self, channel: &ChannelName, id: &SubscriberId) -> SaveTicket;
    /// The newest durable snapshot of a subscriber, if it exists.
    fn subscriber(&self, channel: &ChannelName, id: &SubscriberId) -> Option<SubscriberState>;
    /// Every stored subscriber, in (channel, id) order (bounded by what is stored; for expiry
    /// sweeps and introspection).
    fn subscribers(&self) -> Vec<SubscriberState>;

    /// Persists a state record (an opaque value under a key, e.g. an MQTT session), replacing
    /// the previous value of the key; resolves once durable. Rides the same queue and group
    /// commit as appends and subscriber saves; refused like an append when the store is
    /// poisoned, closed or overloaded, and with `AppendError::Invalid` (code invalid_request)
    /// for a bad key or a value over `STATE_VALUE_BYTES_MAX`.
    fn save_state(&self, key: &str, value: bytes::Bytes) -> SaveTicket;
    /// Removes a state record durably (a tombstone); removing an unknown key is not an error.
    fn remove_state(&self, key: &str) -> SaveTicket;
    /// The newest durable value of a key.
    fn state(&self, key: &str) -> Option<bytes::Bytes>;
    /// Every durable record whose key starts with `prefix`, in key order.
    fn states(&self, prefix: &str) -> Vec<(String, bytes::Bytes)>;
    /// Every channel the store holds a stream for (messages retained or not), in no particular
    /// order. For start-up scans such as finding the channels a webhook rule covers; the
    /// default (for stores that cannot list) is empty.
    fn channels(&self) -> Vec<ChannelName> {
        Vec::new()
    }
}
