//! [`EmbeddedLog`]: the default [`LogStore`], a segmented log on local disk with group commit.
//!
//! # Layout
//! - [`record`]: record framing (`len | crc32c | body`) and the record kinds.
//! - [`segment`]: segment files, their header and preallocation.
//! - [`committer`]: the single writer thread: group commit, rollover, poisoning, reclaim.
//! - [`recovery`]: rebuilding the channel table from the segments on open.
//!
//! The on-disk format and the durability rules are described in `docs/log-format.md`.
//!
//! # Threads and state
//! One committer thread owns the active segment and is the only writer of records; a helper
//! thread it starts prepares the next segment file ahead of each rollover. Everything readers
//! need (the [`ChannelTable`] index, the [`SubscriberTable`] of durable subscriber snapshots,
//! the [`StateTable`] of durable state records, the open segment files) sits behind one
//! `RwLock`; the committer takes the write lock only to sequence a group, to mark it durable
//! and to drop reclaimed entries, never across I/O. Readers plan under the read lock, clone
//! the handles of the segments they need, release the lock and then `pread`.
//!
//! # Invariants
//! - An append is acknowledged only after the `fdatasync` covering all of its records.
//! - Readers only see durable records (`ChannelStream::mark_durable` after the sync).
//! - After a failed write or sync the store is poisoned: no later append is acknowledged.
//! - A batch's records are written together in one group write, in one segment.
//! - Subscriber snapshots and state records ride the same queue and group writes as appends
//!   (no second sync path), and become visible only after the sync covering them.

pub mod committer;
pub mod record;
pub mod recovery;
pub mod segment;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use herald_core::{
    ChannelName, ErrorCode, InvalidInput, Message, MessageId, NewMessage, Policies, StreamStatus,
    SubscriberId, SubscriberState,
};
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::fs::{Filesystem, FsFile, StdFs};
use crate::states::{StateChange, StateTable};
use crate::store::{
    AppendError, AppendTicket, Appended, LogStore, ReadError, ReadPage, ReadQuery, SaveTicket,
    StoreError, StoreHealth,
};
use crate::subscribers::{SubscriberChange, SubscriberTable};
use crate::table::{ChannelTable, fetch_page};

use record::{DecodeError, Record};
use segment::SEGMENT_HEADER_BYTES;

/// Smallest accepted `group_bytes_max`: a group must hold at least one ordinary message.
pub const GROUP_BYTES_MIN: usize = 4096;
/// The commit queue holds at most this many groups' worth of record bytes
/// (`QUEUE_GROUPS_MAX * group_bytes_max`, 64 MiB by default); beyond it appends are refused
/// with `Overloaded` rather than buffered.
pub const QUEUE_GROUPS_MAX: usize = 8;

/// Largest accepted `queue_depth`.
pub const QUEUE_DEPTH_MAX: usize = 1 << 24;

/// Tuning of the embedded log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Size of each preallocated segment file, header included.
    pub segment_bytes: u64,
    /// Upper bound on the bytes of one group write (one `write` + one `fdatasync`). A batch
    /// whose records could exceed it is refused with `batch_too_large`.
    pub group_bytes_max: usize,
    /// Commands (appends, reclaims) that may wait for the committer. When full, `append`
    /// blocks its caller until the committer takes work: backpressure, not loss.
    pub queue_depth: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            group_bytes_max: 8 * 1024 * 1024,
            queue_depth: 65_536,
        }
    }
}

impl EmbeddedOptions {
    /// Checks that the options work together.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.group_bytes_max < GROUP_BYTES_MIN {
            return Err(StoreError::Config(format!(
                "group_bytes_max is {} bytes, it must be at least {GROUP_BYTES_MIN}",
                self.group_bytes_max
            )));
        }
        if self.group_bytes_max > u32::MAX as usize {
            return Err(StoreError::Config(
                "group_bytes_max must be below 4 GiB".into(),
            ));
        }
        if self.segment_bytes < SEGMENT_HEADER_BYTES + self.group_bytes_max as u64 {
            return Err(StoreError::Config(format!(
                "segment_bytes ({}) must hold the {SEGMENT_HEADER_BYTES}-byte segment header plus \
                 one full group of group_bytes_max ({}) bytes",
                self.segment_bytes, self.group_bytes_max
            )));
        }
        if self.queue_depth == 0 || self.queue_depth > QUEUE_DEPTH_MAX {
            return Err(StoreError::Config(format!(
                "queue_depth is {}, it must be between 1 and {QUEUE_DEPTH_MAX}",
                self.queue_depth
            )));
        }
        Ok(())
    }
}

/// Where a message record lives: segment number, byte offset of its frame, frame length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocator {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

/// Counters of the committer's work since open (for metrics and benchmarks).
pub type EmbeddedStats = crate::store::StoreStats;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) groups: AtomicU64,
    pub(crate) appends: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) rollovers: AtomicU64,
    pub(crate) subscriber_saves: AtomicU64,
    pub(crate) state_saves: AtomicU64,
}

/// What readers and the committer share.
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    /// Why the store refuses appends, once a write or sync failed. Set once, read lock-free
    /// on every append.
    pub(crate) poisoned: OnceLock<String>,
    /// Record bytes (upper bounds) of the appends waiting in the commit queue; the queue is
    /// bounded by this as well as by its depth.
    pub(crate) queued_bytes: AtomicUsize,
    /// Who hears about messages once durable (live delivery); read by the committer per group.
    pub(crate) listener: RwLock<Option<Arc<dyn crate::store::DurableListener>>>,
    state: RwLock<State>,
    policies: Policies,
    clock: Arc<dyn Clock>,
    segments_dir: PathBuf,
}

pub(crate) struct State {
    pub(crate) table: ChannelTable<RecordLocator>,
    /// The newest durable snapshot of each subscriber, with the number of the segment holding
    /// its record (reclaim rewrites snapshots that live in segments it deletes).
    pub(crate) subscribers: SubscriberTable<u64>,
    /// The newest durable value of each state record, with the number of the segment holding
    /// its record (reclaim rewrites records that live in segments it deletes).
    pub(crate) states: StateTable<u64>,
    /// Every segment file still on disk, by number; readers clone handles out of it.
    pub(crate) segments: BTreeMap<u64, Arc<dyn FsFile>>,
}

impl Shared {
    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(crate) fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn segment_path(&self, number: u64) -> String {
        segment::segment_path(&self.segments_dir, number)
            .display()
            .to_string()
    }
}

/// A message to the committer thread.
pub(crate) enum Command {
    Append {
        channel: ChannelName,
        batch: Vec<NewMessage>,
        /// Upper bound on the bytes the batch's records take.
        bound_bytes: usize,
        reply: oneshot::Sender<Result<Vec<Appended>, AppendError>>,
    },
    /// A subscriber snapshot, a state record or a tombstone of either, already encoded by the
    /// caller (the committer only sets `synced_through` and the CRC). Boxed: the queue
    /// preallocates `queue_depth` slots of the largest variant.
    Save {
        change: Box<KeyedChange>,
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    Reclaim {
        reply: SyncSender<Result<usize, StoreError>>,
    },
    /// Finish what was queued before, refuse what was queued after, and exit.
    Shutdown,
}

/// A change to a keyed record (one standalone record, never part of a batch): what a
/// [`Command::Save`] carries and the committer applies once it is durable.
pub(crate) enum KeyedChange {
    Subscriber(SubscriberChange),
    State(StateChange),
}

/// The embedded segmented log. See the module docs.
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    sender: SyncSender<Command>,
    committer: Mutex<Option<JoinHandle<()>>>,
    group_bytes_max: usize,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("segments_dir", &self.shared.segments_dir)
            .finish_non_exhaustive()
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir` on real files, recovering what is there.
    pub fn open(
        dir: &Path,
        options: EmbeddedOptions,
        policies: Policies,
        clock: Arc<dyn Clock>,
    ) -> Result<EmbeddedLog, StoreError> {
        Self::open_with_fs(Arc::new(StdFs), dir, options, policies, clock)
    }

    /// Opens (or creates) the log in `dir` on the given filesystem.
    pub fn open_with_fs(
        fs: Arc<dyn Filesystem>,
        dir: &Path,
        options: EmbeddedOptions,
        policies: Policies,
        clock: Arc<dyn Clock>,
    ) -> Result<EmbeddedLog, StoreError> {
        options.check()?;
        let segments_dir = segment::segments_dir(dir);
        let recovered = recovery::recover(fs.as_ref(), &segments_dir, &options)?;
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            poisoned: OnceLock::new(),
            queued_bytes: AtomicUsize::new(0),
            listener: RwLock::new(None),
            state: RwLock::new(State {
                table: recovered.table,
                subscribers: recovered.subscribers,
                states: recovered.states,
                segments: recovered.segments,
            }),
            policies,
            clock,
            segments_dir,
        });
        let (sender, receiver) = mpsc::sync_channel(options.queue_depth);
        let group_bytes_max = options.group_bytes_max;
        let committer = committer::Committer::new(
            shared.clone(),
            fs,
            options,
            receiver,
            recovered.active,
            recovered.tip_segments,
        );
        let handle = std::thread::Builder::new()
            .name("herald-committer".into())
            .spawn(move || committer.run())
            .map_err(|error| StoreError::Io {
                path: dir.display().to_string(),
                detail: format!("cannot start the committer thread: {error}"),
            })?;
        Ok(EmbeddedLog {
            shared,
            sender,
            committer: Mutex::new(Some(handle)),
            group_bytes_max,
        })
    }

    /// Stops the committer after it has answered everything queued. Later appends get
    /// `AppendError::Closed`; reads keep working. Idempotent.
    pub fn close(&self) {
        let handle = self
            .committer
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(handle) = handle {
            // Fails only if the committer is already gone.
            let _ = self.sender.send(Command::Shutdown);
            if handle.join().is_err() {
                tracing::error!("the log committer thread panicked");
            }
        }
    }

    /// What the committer has done since open.
    pub fn stats(&self) -> EmbeddedStats {
        let counters = &self.shared.counters;
        EmbeddedStats {
            groups: counters.groups.load(Ordering::Relaxed),
            appends: counters.appends.load(Ordering::Relaxed),
            messages: counters.messages.load(Ordering::Relaxed),
            bytes: counters.bytes.load(Ordering::Relaxed),
            rollovers: counters.rollovers.load(Ordering::Relaxed),
            subscriber_saves: counters.subscriber_saves.load(Ordering::Relaxed),
            state_saves: counters.state_saves.load(Ordering::Relaxed),
        }
    }

    /// Reads and decodes the message record at `locator`, checking its CRC.
    fn fetch(
        &self,
        files: &BTreeMap<u64, Arc<dyn FsFile>>,
        locator: &RecordLocator,
    ) -> Result<Message, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            path: self.shared.segment_path(locator.segment),
            offset: locator.offset,
            detail,
        };
        let file = files
            .get(&locator.segment)
            .ok_or_else(|| corrupt("segment of an indexed record is not open".into()))?;
        let mut frame = vec![0u8; locator.len as usize];
        file.read_exact_at(&mut frame, locator.offset)
            .map_err(|error| StoreError::Io {
                path: self.shared.segment_path(locator.segment),
                detail: format!("read at offset {}: {error}", locator.offset),
            })?;
        match record::decode_frame(&frame) {
            Ok(Record::Message { message, .. }) => Ok(message),
            Ok(Record::Tip { .. } | Record::Subscriber { .. } | Record::State { .. }) => Err(
                corrupt("index points at a record that is not a message".into()),
            ),
            Err(DecodeError::Torn(detail) | DecodeError::Invalid(detail)) => Err(corrupt(detail)),
        }
    }

    /// Queues a command whose records take at most `bound_bytes`, or refuses it at once:
    /// poisoned, or the queue is full by count or by bytes (never blocks the caller).
    fn enqueue(&self, command: Command, bound_bytes: usize) -> Result<(), AppendError> {
        if let Some(reason) = self.shared.poisoned.get() {
            return Err(AppendError::Poisoned(reason.clone()));
        }
        // Bound the queue by bytes too: depth alone would let it hold queue_depth full batches.
        let queue_bytes_max = self.group_bytes_max.saturating_mul(QUEUE_GROUPS_MAX);
        let queued = self
            .shared
            .queued_bytes
            .fetch_add(bound_bytes, Ordering::AcqRel);
        if queued + bound_bytes > queue_bytes_max {
            self.shared
                .queued_bytes
                .fetch_sub(bound_bytes, Ordering::AcqRel);
            return Err(AppendError::Overloaded);
        }
        // Never block the caller (an async worker thread): a full queue is an explicit,
        // retryable refusal.
        let refused = match self.sender.try_send(command) {
            Ok(()) => return Ok(()),
            Err(mpsc::TrySendError::Full(_)) => AppendError::Overloaded,
            Err(mpsc::TrySendError::Disconnected(_)) => AppendError::Closed,
        };
        self.shared
            .queued_bytes
            .fetch_sub(bound_bytes, Ordering::AcqRel);
        Err(refused)
    }

    /// Encodes a subscriber change here, on the caller's thread, and queues it for the next
    /// group commit.
    fn change_subscriber(&self, change: SubscriberChange) -> SaveTicket {
        let mut frame = Vec::new();
        let bound_bytes = record::encode_subscriber_change(&mut frame, &change);
        if bound_bytes > self.group_bytes_max {
            let (channel, id) = change.key();
            return SaveTicket::ready(Err(AppendError::Invalid(InvalidInput::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "the state of subscriber {id} on {channel} needs {bound_bytes} bytes of log, \
                     one commit holds at most {}",
                    self.group_bytes_max
                ),
            ))));
        }
        self.enqueue_save(KeyedChange::Subscriber(change), frame)
    }

    /// Checks a state-record change, encodes it here, on the caller's thread, and queues it
    /// for the next group commit.
    fn change_state(&self, change: StateChange) -> SaveTicket {
        if let Err(invalid) = change.check() {
            return SaveTicket::ready(Err(AppendError::Invalid(invalid)));
        }
        let bound_bytes = record::state_record_bytes(&change);
        if bound_bytes > self.group_bytes_max {
            return SaveTicket::ready(Err(AppendError::Invalid(InvalidInput::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "the state record {} needs {bound_bytes} bytes of log, one commit holds at \
                     most {} (storage.group_bytes_max)",
                    change.key(),
                    self.group_bytes_max
                ),
            ))));
        }
        let mut frame = Vec::with_capacity(bound_bytes);
        record::encode_state_change(&mut frame, &change);
        self.enqueue_save(KeyedChange::State(change), frame)
    }

    /// Queues an encoded keyed change (its frame fits a group: checked by the caller).
    fn enqueue_save(&self, change: KeyedChange, frame: Vec<u8>) -> SaveTicket {
        let bound_bytes = frame.len();
        let (reply, ticket) = SaveTicket::channel();
        let command = Command::Save {
            change: Box::new(change),
            frame,
            reply,
        };
        match self.enqueue(command, bound_bytes) {
            Ok(()) => ticket,
            Err(error) => SaveTicket::ready(Err(error)),
        }
    }

    /// Handles of the segments a set of locators needs, taken under the read lock.
    fn files_for<'a>(
        state: &State,
        locators: impl Iterator<Item = &'a RecordLocator>,
    ) -> BTreeMap<u64, Arc<dyn FsFile>> {
        let mut files = BTreeMap::new();
        for locator in locators {
            if let Some(file) = state.segments.get(&locator.segment) {
                files.entry(locator.segment).or_insert_with(|| file.clone());
            }
        }
        files
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl LogStore for EmbeddedLog {
    fn append(&self, channel: ChannelName, batch: Vec<NewMessage>) -> AppendTicket {
        let bound_bytes: usize = batch
            .iter()
            .map(|new| record::message_record_bound(&channel, new))
            .sum();
        if bound_bytes > self.group_bytes_max {
            return AppendTicket::ready(Err(AppendError::Invalid(InvalidInput::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "the batch needs up to {bound_bytes} bytes of log, one commit holds at most {}",
                    self.group_bytes_max
                ),
            ))));
        }
        let (reply, ticket) = AppendTicket::channel();
        let command = Command::Append {
            channel,
            batch,
            bound_bytes,
            reply,
        };
        match self.enqueue(command, bound_bytes) {
            Ok(()) => ticket,
            Err(error) => AppendTicket::ready(Err(error)),
        }
    }

    fn save_subscriber(&self, state: SubscriberState) -> SaveTicket {
        self.change_subscriber(SubscriberChange::Save(state))
    }

    fn remove_subscriber(&self, channel: &ChannelName, id: &SubscriberId) -> SaveTicket {
        self.change_subscriber(SubscriberChange::Remove {
            channel: channel.clone(),
            id: id.clone(),
        })
    }

    fn subscriber(&self, channel: &ChannelName, id: &SubscriberId) -> Option<SubscriberState> {
        self.shared
            .read_state()
            .subscribers
            .get(channel, id)
            .map(|stored| stored.state.clone())
    }

    fn subscribers(&self) -> Vec<SubscriberState> {
        self.shared.read_state().subscribers.states()
    }

    fn save_state(&self, key: &str, value: Bytes) -> SaveTicket {
        self.change_state(StateChange::Save {
            key: key.to_owned(),
            value,
        })
    }

    fn remove_state(&self, key: &str) -> SaveTicket {
        self.change_state(StateChange::Remove {
            key: key.to_owned(),
        })
    }

    fn state(&self, key: &str) -> Option<Bytes> {
        self.shared
            .read_state()
            .states
            .get(key)
            .map(|stored| stored.value.clone())
    }

    fn states(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.shared.read_state().states.with_prefix(prefix)
    }

    fn channels(&self) -> Vec<ChannelName> {
        self.shared
            .read_state()
            .table
            .streams()
            .map(|stream| stream.channel().clone())
            .collect()
    }

    fn stats(&self) -> crate::store::StoreStats {
        EmbeddedLog::stats(self)
    }

    fn set_durable_listener(&self, listener: Arc<dyn crate::store::DurableListener>) {
        *self
            .shared
            .listener
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(listener);
    }

    fn read(&self, channel: &ChannelName, query: &ReadQuery) -> Result<ReadPage, ReadError> {
        let now = self.shared.clock.now();
        let (plan, files) = {
            let state = self.shared.read_state();
            let plan = state
                .table
                .plan_read(channel, query, &self.shared.policies, now)
                .map_err(ReadError::ContinuityLost)?;
            let files = match &plan {
                Some(plan) => {
                    Self::files_for(&state, plan.entries.iter().map(|(_, locator)| locator))
                }
                None => BTreeMap::new(),
            };
            (plan, files)
        };
        fetch_page(plan, |locator| self.fetch(&files, locator))
    }

    fn message_by_id(
        &self,
        channel: &ChannelName,
        id: &MessageId,
    ) -> Result<Option<Message>, StoreError> {
        let now = self.shared.clock.now();
        let (locator, files) = {
            let state = self.shared.read_state();
            let Some(locator) = state
                .table
                .find_by_id(channel, id, &self.shared.policies, now)
            else {
                return Ok(None);
            };
            let files = Self::files_for(&state, std::iter::once(&locator));
            (locator, files)
        };
        let message = self.fetch(&files, &locator)?;
        assert_eq!(&message.id, id, "id index points at another message");
        Ok(Some(message))
    }

    fn channel_status(&self, channel: &ChannelName) -> Result<Option<StreamStatus>, StoreError> {
        let now = self.shared.clock.now();
        Ok(self
            .shared
            .read_state()
            .table
            .status(channel, &self.shared.policies, now))
    }

    fn health(&self) -> StoreHealth {
        match self.shared.poisoned.get() {
            Some(reason) => StoreHealth::Poisoned(reason.clone()),
            None => StoreHealth::Ok,
        }
    }

    fn policies(&self) -> &Policies {
        &self.shared.policies
    }

    fn reclaim(&self) -> Result<usize, StoreError> {
        let (reply, result) = mpsc::sync_channel(1);
        let closed = || StoreError::Io {
            path: self.shared.segments_dir.display().to_string(),
            detail: "the store is closed".into(),
        };
        self.sender
            .send(Command::Reclaim { reply })
            .map_err(|_| closed())?;
        result.recv().map_err(|_| closed())?
    }
}
