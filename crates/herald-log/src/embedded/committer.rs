//! The committer: the log's only writer, on its own thread.
//!
//! It blocks for the first command, then takes whatever else is already queued (bounded by
//! `group_bytes_max` and by the room left in the active segment): publish batches, subscriber
//! snapshots and state records alike. It sequences every batch through the channel table, encodes all
//! records into one buffer, and makes them durable with one write and one `fdatasync`. Only
//! then does it mark the channels durable, apply the subscriber and state changes and answer. There is
//! no artificial delay: the group is whatever queued while the previous sync ran.
//!
//! It also keeps the next segment prepared on a helper thread (zero-filled and synced under a
//! temporary name) so that a rollover is a rename, and runs reclaim.
//!
//! # Invariants
//! - Nothing is acknowledged before the sync that covers it returned `Ok`.
//! - A failed write, sync or segment creation poisons the store; the failed group and every
//!   later append are refused with `AppendError::Poisoned`. A sync is never retried.
//! - Reclaim deletes only sealed segments, oldest first, after writing and syncing a tip for
//!   every channel whose last record lives in them and a fresh copy of every live subscriber
//!   snapshot and state record that lives in them. A live state record too large for the
//!   current `group_bytes_max` (saved before it was lowered) cannot be copied: its segment, and
//!   so every later one, is kept instead.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::thread::JoinHandle;

use herald_core::{ChannelName, Message, Serial};
use tokio::sync::oneshot;

use super::record::{
    self, encode_message, encode_state_change, encode_subscriber_change, encode_tip,
    seal_message_record, seal_standalone_record,
};
use super::segment::{
    SEGMENT_HEADER_BYTES, SegmentHeader, create_segment, discard_prepared, install_segment,
    prepare_segment,
};
use super::{Command, EmbeddedOptions, KeyedChange, RecordLocator, Shared};
use crate::fs::{Filesystem, FsFile};
use crate::states::StateChange;
use crate::store::{AppendError, Appended, StoreError};
use crate::subscribers::SubscriberChange;
use crate::table::ChannelTip;

/// The segment records are appended to.
pub(crate) struct ActiveSegment {
    pub(crate) number: u64,
    pub(crate) file: Arc<dyn FsFile>,
    pub(crate) capacity_bytes: u64,
    /// Where the next record goes; everything before it is durable.
    pub(crate) write_offset: u64,
}

/// The next segment, prepared (zero-filled and synced) on a helper thread while the active one
/// fills up, so that a rollover only renames it into place instead of stalling a group.
struct Spare {
    number: u64,
    preparing: JoinHandle<std::io::Result<Arc<dyn FsFile>>>,
}

type Reply = oneshot::Sender<Result<Vec<Appended>, AppendError>>;
type SaveReply = oneshot::Sender<Result<(), AppendError>>;

/// One write of a group: a publish batch, or a keyed change (subscriber or state record)
/// encoded by its caller.
enum Pending {
    Append {
        channel: ChannelName,
        batch: Vec<herald_core::NewMessage>,
        reply: Reply,
    },
    Save {
        change: Box<KeyedChange>,
        frame: Vec<u8>,
        reply: SaveReply,
    },
}

impl Pending {
    /// Takes a queued write out of a command (`Err` gives back any other command), with the
    /// bytes it counted against the queue.
    fn from_command(command: Command) -> Result<(Pending, usize), Command> {
        match command {
            Command::Append {
                channel,
                batch,
                bound_bytes,
                reply,
            } => Ok((
                Pending::Append {
                    channel,
                    batch,
                    reply,
                },
                bound_bytes,
            )),
            Command::Save {
                change,
                frame,
                reply,
            } => {
                let bound_bytes = frame.len();
                Ok((
                    Pending::Save {
                        change,
                        frame,
                        reply,
                    },
                    bound_bytes,
                ))
            }
            other => Err(other),
        }
    }

    fn into_command(self, bound_bytes: usize) -> Command {
        match self {
            Pending::Append {
                channel,
                batch,
                reply,
            } => Command::Append {
                channel,
                batch,
                bound_bytes,
                reply,
            },
            Pending::Save {
                change,
                frame,
                reply,
            } => Command::Save {
                change,
                frame,
                reply,
            },
        }
    }

    fn refuse(self, error: AppendError) {
        match self {
            Pending::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Pending::Save { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// How one write of a group is answered once the group's sync is done.
enum Outcome {
    Append(Reply, Result<Vec<Appended>, AppendError>),
    Save(SaveReply, Box<KeyedChange>),
}

pub(crate) struct Committer {
    shared: Arc<Shared>,
    fs: Arc<dyn Filesystem>,
    options: EmbeddedOptions,
    receiver: Receiver<Command>,
    active: ActiveSegment,
    /// For channels whose state may live only in a tip record: the segment holding it.
    tip_segments: HashMap<ChannelName, u64>,
    /// A command taken from the queue that did not fit the group being built.
    carried: Option<Command>,
    buffer: Vec<u8>,
    spare: Option<Spare>,
}

impl Committer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        fs: Arc<dyn Filesystem>,
        options: EmbeddedOptions,
        receiver: Receiver<Command>,
        active: ActiveSegment,
        tip_segments: HashMap<ChannelName, u64>,
    ) -> Self {
        Self {
            shared,
            fs,
            options,
            receiver,
            active,
            tip_segments,
            carried: None,
            buffer: Vec::new(),
            spare: None,
        }
    }

    fn segments_dir(&self) -> &Path {
        &self.shared.segments_dir
    }

    pub(crate) fn run(mut self) {
        /// A committer that dies of a bug must not leave a store that looks healthy.
        struct PoisonOnPanic(Arc<Shared>);
        impl Drop for PoisonOnPanic {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    let _ = self.0.poisoned.set("the log committer panicked".into());
                }
            }
        }
        let _guard = PoisonOnPanic(self.shared.clone());
        self.serve();
        // Never leave a helper writing into the directory after the store is gone.
        if let Some(spare) = self.spare.take() {
            let _ = spare.preparing.join();
        }
    }

    fn serve(&mut self) {
        loop {
            let command = match self.carried.take() {
                Some(command) => command,
                None => match self.receiver.recv() {
                    Ok(command) => command,
                    // Every handle is gone: nothing can be queued any more.
                    Err(_) => return,
                },
            };
            match Pending::from_command(command) {
                Ok((first, bound_bytes)) => {
                    self.dequeued(bound_bytes);
                    let group = self.collect_group(first, bound_bytes);
                    self.commit_group(group);
                }
                Err(Command::Shutdown) => {
                    self.refuse_queued();
                    return;
                }
                Err(Command::Reclaim { reply }) => {
                    let _ = reply.send(self.reclaim());
                }
                Err(Command::Append { .. } | Command::Save { .. }) => {
                    unreachable!("writes are taken by Pending::from_command")
                }
            }
        }
    }

    /// An append left the commit queue: its bytes no longer count against the queue bound.
    fn dequeued(&self, bound_bytes: usize) {
        self.shared
            .queued_bytes
            .fetch_sub(bound_bytes, Ordering::AcqRel);
    }

    /// Answers everything still queued after a shutdown with `Closed`.
    fn refuse_queued(&mut self) {
        while let Ok(command) = self.receiver.try_recv() {
            match command {
                Command::Append { reply, .. } => {
                    let _ = reply.send(Err(AppendError::Closed));
                }
                Command::Save { reply, .. } => {
                    let _ = reply.send(Err(AppendError::Closed));
                }
                Command::Reclaim { reply } => {
                    let _ = reply.send(Err(StoreError::Io {
                        path: self.segments_dir().display().to_string(),
                        detail: "the store is closed".into(),
                    }));
                }
                Command::Shutdown => {}
            }
        }
    }

    /// Builds a group from `first` plus whatever is already queued and fits.
    fn collect_group(&mut self, first: Pending, first_bound: usize) -> Vec<Pending> {
        let poisoned = self.shared.poisoned.get().is_some();
        if !poisoned
            && self.active.write_offset + first_bound as u64 > self.active.capacity_bytes
            && let Err(reason) = self.roll_over()
        {
            self.poison(reason);
        }
        let room = (self.active.capacity_bytes
            - self.active.write_offset.min(self.active.capacity_bytes))
        .min(self.options.group_bytes_max as u64);
        let mut group_bytes = first_bound as u64;
        let mut group = vec![first];
        loop {
            let command = match self.receiver.try_recv() {
                Ok(command) => command,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            };
            match Pending::from_command(command) {
                Ok((pending, bound_bytes)) if group_bytes + bound_bytes as u64 <= room => {
                    self.dequeued(bound_bytes);
                    group_bytes += bound_bytes as u64;
                    group.push(pending);
                }
                Ok((pending, bound_bytes)) => {
                    // Put back as it was: it counts against the queue until it is taken.
                    self.carried = Some(pending.into_command(bound_bytes));
                    break;
                }
                Err(other) => {
                    self.carried = Some(other);
                    break;
                }
            }
        }
        group
    }

    /// Sequences, writes, syncs and answers one group.
    fn commit_group(&mut self, group: Vec<Pending>) {
        if let Some(reason) = self.shared.poisoned.get().cloned() {
            for pending in group {
                pending.refuse(AppendError::Poisoned(reason.clone()));
            }
            return;
        }
        let now = self.shared.clock.now();
        let base_offset = self.active.write_offset;
        let segment = self.active.number;
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut tops: Vec<(ChannelName, Serial)> = Vec::new();
        let mut message_count = 0u64;
        let listener = self
            .shared
            .listener
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut made_durable: Vec<Message> = Vec::new();
        let mut subscriber_changes = 0u64;
        let mut state_changes = 0u64;
        for pending in group {
            let (channel, batch, reply) = match pending {
                Pending::Append {
                    channel,
                    batch,
                    reply,
                } => (channel, batch, reply),
                Pending::Save {
                    change,
                    frame,
                    reply,
                } => {
                    let start = buffer.len();
                    buffer.extend_from_slice(&frame);
                    seal_standalone_record(&mut buffer[start..], base_offset);
                    match *change {
                        KeyedChange::Subscriber(_) => subscriber_changes += 1,
                        KeyedChange::State(_) => state_changes += 1,
                    }
                    outcomes.push(Outcome::Save(reply, change));
                    continue;
                }
            };
            let mut frames: Vec<(usize, usize)> = Vec::new();
            // Locked per batch, not per group, so readers wait for one batch at most.
            let mut result = {
                let mut state = self.shared.write_state();
                state
                    .table
                    .sequence(&channel, &batch, &self.shared.policies, now, |message| {
                        let start = buffer.len();
                        let len = encode_message(&mut buffer, message);
                        frames.push((start, len));
                        RecordLocator {
                            segment,
                            offset: base_offset + start as u64,
                            len: u32::try_from(len).expect("record fits u32"),
                        }
                    })
            };
            if let Ok(sequenced) = &result
                && let Some(last) = sequenced.new_messages.last()
            {
                message_count += sequenced.new_messages.len() as u64;
                let count = frames.len();
                for (index, (start, len)) in frames.iter().enumerate() {
                    let following = u32::try_from(count - 1 - index).expect("batch fits u32");
                    // Everything before this group's offset was synced before this write.
                    seal_message_record(&mut buffer[*start..*start + *len], following, base_offset);
                }
                tops.push((channel.clone(), last.serial));
            }
            if listener.is_some()
                && let Ok(sequenced) = &mut result
            {
                // Moved, not cloned: the reply needs only `replies`.
                made_durable.append(&mut sequenced.new_messages);
            }
            outcomes.push(Outcome::Append(
                reply,
                result.map(|sequenced| sequenced.replies),
            ));
        }
        assert!(
            base_offset + buffer.len() as u64 <= self.active.capacity_bytes,
            "group of {} bytes overflows segment {} at {base_offset}",
            buffer.len(),
            segment
        );
        let written = if buffer.is_empty() {
            Ok(())
        } else {
            self.write_and_sync(&buffer, base_offset)
        };
        let group_len = buffer.len() as u64;
        self.buffer = buffer;
        match written {
            Ok(()) => {
                self.active.write_offset += group_len;
                self.start_spare_if_due();
                let counters = &self.shared.counters;
                if group_len > 0 {
                    counters.groups.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(group_len, Ordering::Relaxed);
                }
                let accepted = outcomes
                    .iter()
                    .filter(|outcome| matches!(outcome, Outcome::Append(_, Ok(_))))
                    .count();
                counters
                    .appends
                    .fetch_add(accepted as u64, Ordering::Relaxed);
                counters
                    .messages
                    .fetch_add(message_count, Ordering::Relaxed);
                counters
                    .subscriber_saves
                    .fetch_add(subscriber_changes, Ordering::Relaxed);
                counters
                    .state_saves
                    .fetch_add(state_changes, Ordering::Relaxed);
                let mut append_replies = Vec::with_capacity(outcomes.len());
                let mut save_replies = Vec::new();
                {
                    let mut state = self.shared.write_state();
                    for (channel, top) in &tops {
                        state
                            .table
                            .get_mut(channel)
                            .expect("sequenced channel exists")
                            .mark_durable(*top);
                    }
                    // In queue order, so the last change queued for a key wins, as it does on
                    // recovery.
                    for outcome in outcomes {
                        match outcome {
                            Outcome::Append(reply, result) => append_replies.push((reply, result)),
                            Outcome::Save(reply, change) => {
                                match *change {
                                    KeyedChange::Subscriber(change) => {
                                        state.subscribers.apply(change, segment)
                                    }
                                    KeyedChange::State(change) => {
                                        state.states.apply(change, segment)
                                    }
                                }
                                save_replies.push(reply);
                            }
                        }
                    }
                }
                for (reply, result) in append_replies {
                    let _ = reply.send(result);
                }
                for reply in save_replies {
                    let _ = reply.send(Ok(()));
                }
                if let Some(listener) = listener
                    && !made_durable.is_empty()
                {
                    listener.on_durable(&made_durable);
                }
            }
            Err(reason) => {
                self.poison(reason.clone());
                for outcome in outcomes {
                    match outcome {
                        Outcome::Append(reply, result) => {
                            // A refusal (conflict, invalid) stays what it was: nothing was stored.
                            let answer = result.and(Err(AppendError::Poisoned(reason.clone())));
                            let _ = reply.send(answer);
                        }
                        Outcome::Save(reply, _) => {
                            let _ = reply.send(Err(AppendError::Poisoned(reason.clone())));
                        }
                    }
                }
            }
        }
    }

    fn write_and_sync(&self, bytes: &[u8], offset: u64) -> Result<(), String> {
        let path = super::segment::segment_path(self.segments_dir(), self.active.number);
        self.active
            .file
            .write_all_at(bytes, offset)
            .map_err(|error| format!("write to {} failed: {error}", path.display()))?;
        self.active
            .file
            .sync_data()
            .map_err(|error| format!("fdatasync of {} failed: {error}", path.display()))
    }

    fn poison(&self, reason: String) {
        if self.shared.poisoned.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "log store poisoned: appends are refused until restart");
        }
    }

    /// Starts preparing the segment after the active one once the active one is half full
    /// (not earlier: a spare per idle store would double its disk use for nothing).
    fn start_spare_if_due(&mut self) {
        let half_full = self.active.write_offset >= self.active.capacity_bytes / 2;
        if !half_full || self.spare.is_some() || self.shared.poisoned.get().is_some() {
            return;
        }
        let header = self.next_header();
        let fs = self.fs.clone();
        let segments_dir = self.segments_dir().to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("herald-segment-prep".into())
            .spawn(move || prepare_segment(fs.as_ref(), &segments_dir, header));
        match spawned {
            Ok(preparing) => {
                self.spare = Some(Spare {
                    number: header.number,
                    preparing,
                })
            }
            // Rollover then creates the segment itself.
            Err(error) => tracing::warn!(%error, "cannot start the segment preparation thread"),
        }
    }

    fn next_header(&self) -> SegmentHeader {
        SegmentHeader {
            number: self.active.number + 1,
            capacity_bytes: self.options.segment_bytes,
            group_bytes_max: self.options.group_bytes_max as u64,
        }
    }

    /// Seals the active segment and continues in the next, preallocated one.
    fn roll_over(&mut self) -> Result<(), String> {
        let header = self.next_header();
        let segments_dir = self.segments_dir().to_path_buf();
        let failed = |error: std::io::Error| {
            format!(
                "creating segment {} in {} failed: {error}",
                header.number,
                segments_dir.display()
            )
        };
        let prepared = match self.spare.take() {
            Some(spare) => match spare.preparing.join() {
                Ok(Ok(file)) if spare.number == header.number => Some(file),
                // A failed write or sync is a disk error like any other: poison, don't retry.
                Ok(Err(error)) => return Err(failed(error)),
                _ => {
                    discard_prepared(self.fs.as_ref(), self.segments_dir(), spare.number);
                    None
                }
            },
            None => None,
        };
        let file = match prepared {
            Some(file) => {
                install_segment(self.fs.as_ref(), self.segments_dir(), header.number)
                    .map_err(failed)?;
                file
            }
            None => {
                create_segment(self.fs.as_ref(), self.segments_dir(), header).map_err(failed)?
            }
        };
        self.shared
            .write_state()
            .segments
            .insert(header.number, file.clone());
        tracing::debug!(segment = header.number, "rolled over to a new segment");
        self.shared
            .counters
            .rollovers
            .fetch_add(1, Ordering::Relaxed);
        self.active = ActiveSegment {
            number: header.number,
            file,
            capacity_bytes: header.capacity_bytes,
            write_offset: SEGMENT_HEADER_BYTES,
        };
        Ok(())
    }

    /// Deletes sealed segments in which every message is reclaimable. Returns how many
    /// messages left the index.
    fn reclaim(&mut self) -> Result<usize, StoreError> {
        if let Some(reason) = self.shared.poisoned.get().cloned() {
            return Err(StoreError::Poisoned(reason));
        }
        let now = self.shared.clock.now();
        let group_bytes_max = self.options.group_bytes_max;
        let (keep_from, tips, live) = {
            let state = self.shared.read_state();
            let Some(oldest) = state.segments.keys().next().copied() else {
                return Ok(0);
            };
            // The oldest segment holding a message that must stay; never the active one.
            let mut keep_from = self.active.number;
            for stream in state.table.streams() {
                let policy = self.shared.policies.for_channel(stream.channel());
                let mut next = stream.first_entry().map(|(serial, _)| serial);
                while let Some(serial) = next {
                    let Some(entry) = stream.entry(serial) else {
                        break;
                    };
                    if entry.locator.segment >= keep_from {
                        break;
                    }
                    if !stream.is_reclaimable(serial, entry, policy, now) {
                        keep_from = entry.locator.segment;
                        break;
                    }
                    next = Some(serial.next());
                }
            }
            // A live state record that no longer fits one group (saved before group_bytes_max
            // was lowered) cannot be copied forward: its segment has to stay.
            for (key, stored) in state.states.iter() {
                let bytes = record::state_value_record_bytes(key, &stored.value);
                if stored.locator < keep_from && bytes > group_bytes_max {
                    tracing::warn!(
                        key = %key,
                        bytes,
                        group_bytes_max,
                        segment = stored.locator,
                        "a state record is larger than one commit; its segment is not reclaimed"
                    );
                    keep_from = stored.locator;
                }
            }
            if keep_from <= oldest {
                return Ok(0);
            }
            let mut tips = Vec::new();
            for stream in state.table.streams() {
                let state_segment = match stream.last_entry() {
                    Some((_, entry)) => Some(entry.locator.segment),
                    None => self.tip_segments.get(stream.channel()).copied(),
                };
                if state_segment.is_none_or(|segment| segment < keep_from) {
                    tips.push(ChannelTip::of(stream));
                }
            }
            // Deterministic record order regardless of the table's hashing.
            tips.sort_by(|a, b| a.channel.cmp(&b.channel));
            // Live snapshots and state records in doomed segments are written again before
            // those go (tombstones never need to be: whatever they removed is older, so it is
            // doomed too). Values are cheap `Bytes` handles; copies are encoded one group at a
            // time.
            let snapshots = state
                .subscribers
                .iter()
                .filter(|stored| stored.locator < keep_from)
                .map(|stored| {
                    KeyedChange::Subscriber(SubscriberChange::Save(stored.state.clone()))
                });
            let values = state
                .states
                .iter()
                .filter(|(_, stored)| stored.locator < keep_from)
                .map(|(key, stored)| {
                    KeyedChange::State(StateChange::Save {
                        key: key.clone(),
                        value: stored.value.clone(),
                    })
                });
            let live: Vec<KeyedChange> = snapshots.chain(values).collect();
            (keep_from, tips, live)
        };
        let rewritten_snapshots = live
            .iter()
            .filter(|change| matches!(change, KeyedChange::Subscriber(_)))
            .count();
        let rewritten_states = live.len() - rewritten_snapshots;
        let written = self
            .write_tips(&tips)
            .and_then(|()| self.rewrite_live(live));
        if let Err(reason) = written {
            self.poison(reason.clone());
            return Err(StoreError::Poisoned(reason));
        }
        let (dropped, doomed) = {
            let mut state = self.shared.write_state();
            let mut dropped = 0;
            for stream in state.table.streams_mut() {
                dropped += stream.drop_front_while(|_, entry| entry.locator.segment < keep_from);
            }
            let doomed: Vec<u64> = state.segments.range(..keep_from).map(|(n, _)| *n).collect();
            for number in &doomed {
                state.segments.remove(number);
            }
            (dropped, doomed)
        };
        for number in &doomed {
            let path = super::segment::segment_path(self.segments_dir(), *number);
            let io_error = |error: std::io::Error| StoreError::Io {
                path: path.display().to_string(),
                detail: format!("removing a reclaimed segment failed: {error}"),
            };
            // Oldest first and one directory sync each: a crash part-way leaves a contiguous
            // run of segments, which recovery can tell from a hole.
            self.fs.remove_file(&path).map_err(io_error)?;
            self.fs.sync_dir(self.segments_dir()).map_err(io_error)?;
        }
        tracing::info!(
            segments = doomed.len(),
            messages = dropped,
            tips = tips.len(),
            subscriber_snapshots = rewritten_snapshots,
            state_records = rewritten_states,
            "reclaimed log segments"
        );
        Ok(dropped)
    }

    /// Writes fresh copies of live subscriber snapshots and state records (reclaim is about
    /// to delete the segments holding them) in as many groups as they need, and points the
    /// tables at them. Encodes one group at a time, so memory stays within one group.
    fn rewrite_live(&mut self, live: Vec<KeyedChange>) -> Result<(), String> {
        let group_bytes_max = self.options.group_bytes_max;
        let mut buffer = Vec::new();
        let mut starts = Vec::new();
        let mut changes = Vec::new();
        for change in live {
            let start = buffer.len();
            let len = match &change {
                KeyedChange::Subscriber(change) => encode_subscriber_change(&mut buffer, change),
                KeyedChange::State(change) => encode_state_change(&mut buffer, change),
            };
            assert!(
                len <= group_bytes_max,
                "a live record fits a group (checked when it was saved, and for state records \
                 by reclaim before it copies them)"
            );
            if buffer.len() > group_bytes_max {
                // This record opens the next group.
                let next = buffer.split_off(start);
                self.write_rewritten(&mut buffer, &starts, std::mem::take(&mut changes))?;
                buffer = next;
                starts.clear();
                starts.push(0);
            } else {
                starts.push(start);
            }
            changes.push(change);
        }
        if !changes.is_empty() {
            self.write_rewritten(&mut buffer, &starts, changes)?;
        }
        Ok(())
    }

    /// Seals, writes and syncs one group of rewritten keyed records (frames at `starts` of
    /// `buffer`), then relocates them in their tables.
    fn write_rewritten(
        &mut self,
        buffer: &mut [u8],
        starts: &[usize],
        changes: Vec<KeyedChange>,
    ) -> Result<(), String> {
        if self.active.write_offset + buffer.len() as u64 > self.active.capacity_bytes {
            self.roll_over()?;
        }
        let synced_through = self.active.write_offset;
        for (index, start) in starts.iter().enumerate() {
            let end = starts.get(index + 1).copied().unwrap_or(buffer.len());
            seal_standalone_record(&mut buffer[*start..end], synced_through);
        }
        self.write_and_sync(buffer, self.active.write_offset)?;
        self.active.write_offset += buffer.len() as u64;
        self.start_spare_if_due();
        let segment = self.active.number;
        let mut state = self.shared.write_state();
        for change in changes {
            match change {
                KeyedChange::Subscriber(change) => {
                    let (channel, id) = change.key();
                    state.subscribers.relocate(channel, id, segment);
                }
                KeyedChange::State(change) => state.states.relocate(change.key(), segment),
            }
        }
        Ok(())
    }

    /// Appends and syncs tip records, in as many groups as they need.
    fn write_tips(&mut self, tips: &[ChannelTip]) -> Result<(), String> {
        let mut remaining = tips;
        while !remaining.is_empty() {
            let mut count = 0;
            let mut bytes = 0;
            for tip in remaining {
                let size = record::tip_record_bytes(tip);
                if bytes + size > self.options.group_bytes_max {
                    break;
                }
                bytes += size;
                count += 1;
            }
            assert!(count > 0, "a tip record is far smaller than a group");
            if self.active.write_offset + bytes as u64 > self.active.capacity_bytes {
                self.roll_over()?;
            }
            let mut buffer = Vec::with_capacity(bytes);
            let synced_through = self.active.write_offset;
            for tip in &remaining[..count] {
                encode_tip(&mut buffer, tip, synced_through);
            }
            self.write_and_sync(&buffer, self.active.write_offset)?;
            self.active.write_offset += buffer.len() as u64;
            self.start_spare_if_due();
            for tip in &remaining[..count] {
                self.tip_segments
                    .insert(tip.channel.clone(), self.active.number);
            }
            remaining = &remaining[count..];
        }
        Ok(())
    }
}
