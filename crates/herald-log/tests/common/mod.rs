//! Shared helpers for the store test suites (`conformance.rs`, `model.rs`): a [`Harness`] per
//! store so a test written once runs against every [`LogStore`], test policies with small
//! retention bounds, and message/page helpers.
//!
//! # Invariants
//! - A harness's `restart` keeps exactly what the store made durable: for the memory store
//!   `crash_and_recover`, for the embedded log drop + reopen on the same directory.
//! - Every store shares the test's [`ManualClock`], so tests move time explicitly.

#![allow(dead_code)] // each test crate uses a different subset of these helpers

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use herald_core::{
    ChainHash, ChannelName, Data, Epoch, Message, MessageId, NamespacePolicy, NewMessage, Policies,
    Position, ReadFrom, Retention, Serial, SubscriberId, SubscriberOptions, SubscriberState,
    Timestamp,
};
use herald_log::embedded::GROUP_BYTES_MIN;
use herald_log::embedded::segment::SEGMENT_HEADER_BYTES;
use herald_log::fs::FsFile;
use herald_log::{
    AppendError, Appended, Clock, EmbeddedLog, EmbeddedOptions, Filesystem, LogStore, ManualClock,
    MemoryStore, ReadError, ReadPage, ReadQuery, StdFs,
};

/// Where every test clock starts (2023-11-14T22:13:20Z).
pub const START: Timestamp = Timestamp(1_700_000_000_000);

/// Namespace `few`: at most [`FEW_MESSAGES_MAX`] messages.
pub const FEW_MESSAGES_MAX: u64 = 5;
/// Namespace `small`: at most [`SMALL_BYTES_MAX`] bytes.
pub const SMALL_BYTES_MAX: u64 = 100;
/// Namespace `young`: messages older than [`YOUNG_AGE_MS`] leave retention.
pub const YOUNG_AGE_MS: u64 = 10_000;

/// Default policy for bare names, plus one namespace per retention bound, each small enough
/// that a test crosses it with a handful of messages.
pub fn test_policies() -> Policies {
    let with_retention = |retention: Retention| NamespacePolicy {
        retention,
        ..NamespacePolicy::default()
    };
    let mut namespaces = BTreeMap::new();
    namespaces.insert(
        "few".to_owned(),
        with_retention(Retention {
            messages_max: FEW_MESSAGES_MAX,
            ..Retention::default()
        }),
    );
    namespaces.insert(
        "small".to_owned(),
        with_retention(Retention {
            bytes_max: SMALL_BYTES_MAX,
            ..Retention::default()
        }),
    );
    namespaces.insert(
        "young".to_owned(),
        with_retention(Retention {
            max_age_ms: YOUNG_AGE_MS,
            ..Retention::default()
        }),
    );
    Policies {
        default: NamespacePolicy::default(),
        namespaces,
    }
}

/// A store under test, with a way to restart it on what it made durable.
pub trait Harness: Sized {
    type Store: LogStore;
    fn open(policies: Policies, clock: Arc<ManualClock>) -> Self;
    fn store(&self) -> &Self::Store;
    /// The store as a handle for tasks (the harness replaces it on restart).
    fn shared_store(&self) -> Arc<Self::Store>;
    /// Crash (or close) and recover from what was durable.
    fn restart(&mut self);
    /// Makes the next append fail the way a failed fsync does. `false` when this store has
    /// no way to inject that fault (then the poisoning case is left to the store's own tests).
    fn fail_next_append(&self, reason: &str) -> bool;
    /// Whether `reclaim` drops every reclaimable message (the memory store) rather than only
    /// whole dead segments (the embedded log).
    fn reclaim_is_exact() -> bool;
}

pub struct MemoryHarness {
    store: Arc<MemoryStore>,
}

impl Harness for MemoryHarness {
    type Store = MemoryStore;

    fn open(policies: Policies, clock: Arc<ManualClock>) -> Self {
        let clock: Arc<dyn Clock> = clock;
        Self {
            store: Arc::new(MemoryStore::new(policies, clock)),
        }
    }

    fn store(&self) -> &MemoryStore {
        &self.store
    }

    fn shared_store(&self) -> Arc<MemoryStore> {
        self.store.clone()
    }

    fn restart(&mut self) {
        let recovered = self
            .store
            .crash_and_recover()
            .expect("the memory image recovers");
        self.store = Arc::new(recovered);
    }

    fn fail_next_append(&self, reason: &str) -> bool {
        self.store.fail_next_append(reason);
        true
    }

    fn reclaim_is_exact() -> bool {
        true
    }
}

/// The embedded log on real files in a temporary directory, with the smallest segments.
/// Restart is close + reopen on the same files.
pub struct EmbeddedHarness {
    dir: tempfile::TempDir,
    fs: FaultSwitchFs,
    policies: Policies,
    clock: Arc<ManualClock>,
    store: Arc<EmbeddedLog>,
}

impl EmbeddedHarness {
    pub fn options() -> EmbeddedOptions {
        // The smallest segments the log accepts, so that a few dozen messages roll over.
        EmbeddedOptions {
            segment_bytes: SEGMENT_HEADER_BYTES + GROUP_BYTES_MIN as u64,
            group_bytes_max: GROUP_BYTES_MIN,
            queue_depth: 1024,
        }
    }

    fn open_store(
        dir: &Path,
        fs: &FaultSwitchFs,
        policies: &Policies,
        clock: &Arc<ManualClock>,
    ) -> Arc<EmbeddedLog> {
        let clock: Arc<dyn Clock> = clock.clone();
        let store = EmbeddedLog::open_with_fs(
            Arc::new(fs.clone()),
            dir,
            Self::options(),
            policies.clone(),
            clock,
        )
        .expect("the embedded log opens");
        Arc::new(store)
    }
}

impl Harness for EmbeddedHarness {
    type Store = EmbeddedLog;

    fn open(policies: Policies, clock: Arc<ManualClock>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let fs = FaultSwitchFs::default();
        let store = Self::open_store(dir.path(), &fs, &policies, &clock);
        Self {
            dir,
            fs,
            policies,
            clock,
            store,
        }
    }

    fn store(&self) -> &EmbeddedLog {
        &self.store
    }

    fn shared_store(&self) -> Arc<EmbeddedLog> {
        self.store.clone()
    }

    fn restart(&mut self) {
        // Close first: other clones of the Arc (finished test tasks) must not keep the
        // committer writing while the new instance recovers the same files.
        self.store.close();
        self.store = Self::open_store(self.dir.path(), &self.fs, &self.policies, &self.clock);
    }

    fn fail_next_append(&self, reason: &str) -> bool {
        *self.fs.fail_next_sync.lock().unwrap() = Some(reason.to_owned());
        true
    }

    fn reclaim_is_exact() -> bool {
        false
    }
}

/// Real files ([`StdFs`]) with one switch: make the next `fdatasync` fail, as a disk error
/// would. Everything else goes straight to the real filesystem.
#[derive(Clone, Default)]
pub struct FaultSwitchFs {
    fail_next_sync: Arc<Mutex<Option<String>>>,
}

#[derive(Debug)]
struct FaultSwitchFile {
    file: Arc<dyn FsFile>,
    fail_next_sync: Arc<Mutex<Option<String>>>,
}

impl FsFile for FaultSwitchFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if let Some(reason) = self.fail_next_sync.lock().unwrap().take() {
            return Err(io::Error::other(reason));
        }
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
}

impl FaultSwitchFs {
    fn wrap(&self, file: Arc<dyn FsFile>) -> Arc<dyn FsFile> {
        Arc::new(FaultSwitchFile {
            file,
            fail_next_sync: self.fail_next_sync.clone(),
        })
    }
}

impl Filesystem for FaultSwitchFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        StdFs.create_dir_all(path)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        StdFs.open(path).map(|file| self.wrap(file))
    }
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        StdFs.create_new(path).map(|file| self.wrap(file))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        StdFs.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        StdFs.sync_dir(path)
    }
}

// ----- building messages ---------------------------------------------------------------------

pub fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).expect("valid channel name")
}

pub fn id(text: &str) -> MessageId {
    MessageId::parse(text).expect("valid message id")
}

/// A message with JSON data and nothing else.
pub fn json(message_id: &str, data: &str) -> NewMessage {
    NewMessage {
        id: id(message_id),
        name: None,
        headers: BTreeMap::new(),
        data: Data::Json(Bytes::copy_from_slice(data.as_bytes())),
        ttl_ms: None,
    }
}

pub fn with_ttl(mut message: NewMessage, ttl_ms: u64) -> NewMessage {
    message.ttl_ms = Some(ttl_ms);
    message
}

pub fn subscriber_id(text: &str) -> SubscriberId {
    SubscriberId::parse(text).expect("valid subscriber id")
}

/// A subscriber of `channel` acknowledged through `acked_through`, with a few individually
/// acked serials and delivery attempts above it so every field of a snapshot is exercised.
pub fn subscriber_state(channel_name: &str, id: &str, acked_through: u64) -> SubscriberState {
    let mut state = SubscriberState::new(
        channel(channel_name),
        subscriber_id(id),
        Position::new(Epoch::parse("E1").unwrap(), Serial(acked_through)),
        SubscriberOptions {
            ack_wait_ms: 1_000 + acked_through,
            ..SubscriberOptions::default()
        },
        START,
    );
    state.ack_one(Serial(acked_through + 3));
    state.record_attempt(Serial(acked_through + 1));
    state.record_attempt(Serial(acked_through + 1));
    state.record_attempt(Serial(acked_through + 2));
    state.last_active = START.plus_ms(acked_through);
    state
}

// ----- driving a store -----------------------------------------------------------------------

pub fn append<S: LogStore>(
    store: &S,
    channel: &ChannelName,
    batch: Vec<NewMessage>,
) -> Result<Vec<Appended>, AppendError> {
    store.append(channel.clone(), batch).wait()
}

pub fn append_ok<S: LogStore>(
    store: &S,
    channel: &ChannelName,
    batch: Vec<NewMessage>,
) -> Vec<Appended> {
    append(store, channel, batch).expect("append accepted")
}

pub fn forward<S: LogStore>(
    store: &S,
    channel: &ChannelName,
    from: ReadFrom,
    limit: usize,
) -> Result<ReadPage, ReadError> {
    store.read(channel, &ReadQuery::Forward { from, limit })
}

pub fn backward<S: LogStore>(
    store: &S,
    channel: &ChannelName,
    before: Position,
    limit: usize,
) -> Result<ReadPage, ReadError> {
    store.read(channel, &ReadQuery::Backward { before, limit })
}

/// Every readable message of a channel, oldest first, read in pages of `page_size`.
pub fn read_all<S: LogStore>(store: &S, channel: &ChannelName, page_size: usize) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut from = ReadFrom::Oldest;
    // Bounded: each page advances the cursor by at least one serial or ends the loop.
    for _ in 0..100_000 {
        let page = forward(store, channel, from.clone(), page_size).expect("forward read");
        messages.extend(page.messages);
        if !page.more {
            return messages;
        }
        from = ReadFrom::After(page.next.expect("a page with more has a cursor"));
    }
    panic!("paging did not terminate on {channel}");
}

/// Checks that `messages` are serials 1..=n of one epoch and that each chain value follows
/// from the previous one, starting at the epoch's genesis.
pub fn verify_chain_from_genesis(messages: &[Message]) {
    let Some(first) = messages.first() else {
        return;
    };
    let mut chain = ChainHash::genesis(&first.epoch);
    for (index, message) in messages.iter().enumerate() {
        assert_eq!(
            message.serial.0,
            index as u64 + 1,
            "serials are contiguous from 1"
        );
        assert_eq!(message.epoch, first.epoch, "one epoch per stream");
        assert_eq!(message.prev().0, message.serial.0 - 1);
        chain = chain.next(message.serial, &message.id, &message.data);
        assert_eq!(
            message.chain, chain,
            "chain breaks at serial {}",
            message.serial
        );
    }
}

/// Checks that `messages` are contiguous and each chain value follows from the previous one
/// (for a suffix of the stream whose start is no longer readable).
pub fn verify_chain_links(messages: &[Message]) {
    for pair in messages.windows(2) {
        assert_eq!(
            pair[1].serial,
            pair[0].serial.next(),
            "serials are contiguous"
        );
        assert_eq!(pair[1].epoch, pair[0].epoch);
        let expected = pair[0]
            .chain
            .next(pair[1].serial, &pair[1].id, &pair[1].data);
        assert_eq!(
            pair[1].chain, expected,
            "chain breaks at serial {}",
            pair[1].serial
        );
    }
}

pub fn new_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(START))
}
