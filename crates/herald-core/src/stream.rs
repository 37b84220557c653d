//! [`ChannelStream`]: the in-memory state of one channel's stream, shared by every log store.
//!
//! It sequences publishes (serial, chain, time, dedupe), indexes stored messages by serial and
//! id, applies retention and TTL at read time and plans reads. It holds no message bodies:
//! each entry carries a store-specific locator `L` (a file offset, an in-memory record, ...).
//!
//! # Call order
//! A single writer calls [`ChannelStream::plan`], then [`ChannelStream::push`] for each new
//! message of the plan (in order), then [`ChannelStream::mark_durable`] once the store made
//! them durable. Readers only ever see durable entries.
//!
//! # Invariants
//! - entries cover serials `first_entry_serial ..= assigned_top`, contiguous.
//! - `durable_top <= assigned_top`; time never decreases along the entries.
//! - every id in `ids` maps to a serial whose entry is present.

use std::collections::{HashMap, VecDeque};

use crate::chain::ChainHash;
use crate::error::InvalidInput;
use crate::message::{ContentDigest, Message, NewMessage, Timestamp};
use crate::names::{ChannelName, Epoch, MessageId};
use crate::policy::NamespacePolicy;
use crate::position::{Position, Serial};

/// One stored message in the index.
#[derive(Clone, Debug)]
pub struct StreamEntry<L> {
    pub locator: L,
    pub id: MessageId,
    pub content: ContentDigest,
    pub time: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub size_bytes: u32,
    /// Sum of `size_bytes` over this entry and all earlier entries still indexed.
    pub cumulative_bytes: u64,
}

/// What the sequencer decided for one message of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sequenced {
    /// A new message with its assigned serial, time and chain.
    New(Message),
    /// A retry of an already accepted message: the original position comes back.
    Duplicate { id: MessageId, serial: Serial },
}

/// Why a batch was refused. Nothing of the batch was accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanRejection {
    /// The id was accepted before with different content.
    IdConflict {
        id: MessageId,
        serial: Serial,
    },
    Invalid(InvalidInput),
}

/// A range of serials a read passed over without returning messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedRange {
    pub from: Serial,
    pub to: Serial,
    pub reason: SkipReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The messages' own TTL ran out.
    Expired,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Expired => "expired",
        }
    }
}

/// Why a position can no longer be continued from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContinuityReason {
    /// Messages after the position were removed by retention.
    Retention,
    /// The position belongs to another incarnation of the channel (or the channel is new).
    EpochChanged,
    /// The position is beyond the channel's top.
    AheadOfTop,
}

impl ContinuityReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ContinuityReason::Retention => "retention",
            ContinuityReason::EpochChanged => "epoch_changed",
            ContinuityReason::AheadOfTop => "ahead_of_top",
        }
    }
}

/// The answer to a position that cannot be continued: what was asked, what is lost and
/// where the stream can be picked up again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContinuityLost {
    pub reason: ContinuityReason,
    /// The position the reader asked to continue from.
    pub requested: Position,
    /// The first message a reader can still get, if any is retained.
    pub first_available: Option<Position>,
    /// The channel's top, if the channel has messages.
    pub top: Option<Position>,
}

/// Where a forward read starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    /// The oldest retained message.
    Oldest,
    /// Just after this position (exclusive).
    After(Position),
}

/// Entries to fetch for one read page, plus what the page tells the reader.
#[derive(Clone, Debug)]
pub struct ReadPlan<L> {
    /// Serial and locator of each message to return, in the page's order.
    pub entries: Vec<(Serial, L)>,
    pub skipped: Vec<SkippedRange>,
    /// Cursor for the next page: `after=` for forward pages, `before=` for backward ones.
    pub next: Option<Position>,
    pub top: Option<Position>,
    /// Whether more messages may follow in the page's direction.
    pub more: bool,
}

/// A summary of a channel for status endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStatus {
    pub epoch: Epoch,
    pub first: Option<Position>,
    pub top: Position,
    /// Retained messages whose TTL has not run out.
    pub messages: u64,
    pub bytes: u64,
}

/// Upper bound on entries one read inspects, so a channel full of expired messages cannot
/// make a single request scan without bound.
pub const READ_SCAN_MAX: usize = 10_000;

#[derive(Clone, Debug)]
pub struct ChannelStream<L> {
    channel: ChannelName,
    epoch: Epoch,
    first_entry_serial: Serial,
    entries: VecDeque<StreamEntry<L>>,
    assigned_top: Serial,
    assigned_chain: ChainHash,
    assigned_time: Timestamp,
    durable_top: Serial,
    ids: HashMap<MessageId, Serial>,
}

impl<L: Clone> ChannelStream<L> {
    /// A brand-new stream: the next message gets serial 1.
    pub fn new(channel: ChannelName, epoch: Epoch) -> Self {
        let genesis = ChainHash::genesis(&epoch);
        Self::starting_after(channel, epoch, Serial(0), genesis, Timestamp(0))
    }

    /// A stream whose history up to `serial` is gone (or was never indexed): the next message
    /// gets `serial + 1` and continues the chain from `chain`.
    pub fn starting_after(
        channel: ChannelName,
        epoch: Epoch,
        serial: Serial,
        chain: ChainHash,
        time: Timestamp,
    ) -> Self {
        Self {
            channel,
            epoch,
            first_entry_serial: serial.next(),
            entries: VecDeque::new(),
            assigned_top: serial,
            assigned_chain: chain,
            assigned_time: time,
            durable_top: serial,
            ids: HashMap::new(),
        }
    }

    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The highest durable serial (0 when nothing was ever stored).
    pub fn durable_top(&self) -> Serial {
        self.durable_top
    }

    /// The highest assigned serial, its chain value and time (the tip a checkpoint preserves).
    pub fn tip(&self) -> (Serial, ChainHash, Timestamp) {
        (self.assigned_top, self.assigned_chain, self.assigned_time)
    }

    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    pub fn entry(&self, serial: Serial) -> Option<&StreamEntry<L>> {
        let index = serial.0.checked_sub(self.first_entry_serial.0)?;
        self.entries.get(usize::try_from(index).ok()?)
    }

    pub fn first_entry(&self) -> Option<(Serial, &StreamEntry<L>)> {
        self.entries
            .front()
            .map(|entry| (self.first_entry_serial, entry))
    }

    pub fn last_entry(&self) -> Option<(Serial, &StreamEntry<L>)> {
        self.entries.back().map(|entry| (self.assigned_top, entry))
    }

    fn position(&self, serial: Serial) -> Position {
        Position::new(self.epoch.clone(), serial)
    }

    // ----- writing -------------------------------------------------------------------------

    /// Sequences a batch atomically: either every message gets a decision, or the batch is
    /// rejected and nothing changes. Does not modify the stream; call [`Self::push`] for each
    /// `Sequenced::New` afterwards.
    pub fn plan(
        &self,
        batch: &[NewMessage],
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> Result<Vec<Sequenced>, PlanRejection> {
        let mut decisions = Vec::with_capacity(batch.len());
        let mut in_batch: HashMap<&MessageId, (Serial, ContentDigest)> = HashMap::new();
        let mut next_serial = self.assigned_top;
        let mut chain = self.assigned_chain;
        let time = now.max(self.assigned_time);
        for new in batch {
            if let Some(ttl) = new.ttl_ms {
                policy.check_ttl(ttl).map_err(PlanRejection::Invalid)?;
            }
            let content = new.content_digest();
            let earlier = in_batch.get(&new.id).copied().or_else(|| {
                self.ids.get(&new.id).map(|serial| {
                    let entry = self.entry(*serial).expect("indexed id has an entry");
                    (*serial, entry.content)
                })
            });
            if let Some((serial, earlier_content)) = earlier {
                if earlier_content != content {
                    return Err(PlanRejection::IdConflict {
                        id: new.id.clone(),
                        serial,
                    });
                }
                decisions.push(Sequenced::Duplicate {
                    id: new.id.clone(),
                    serial,
                });
                continue;
            }
            next_serial = next_serial.next();
            chain = chain.next(next_serial, &new.id, &new.data);
            in_batch.insert(&new.id, (next_serial, content));
            decisions.push(Sequenced::New(Message {
                channel: self.channel.clone(),
                epoch: self.epoch.clone(),
                serial: next_serial,
                id: new.id.clone(),
                time,
                name: new.name.clone(),
                headers: new.headers.clone(),
                data: new.data.clone(),
                ttl_ms: new.ttl_ms,
                chain,
            }));
        }
        Ok(decisions)
    }

    /// Adds a planned message (not yet durable) at the end of the stream.
    ///
    /// # Panics
    /// If the message does not continue the stream: that is a bug in the caller.
    pub fn push(&mut self, message: &Message, locator: L) {
        if let Err(problem) = self.push_checked(message, locator, true) {
            panic!("sequencing bug on {}: {problem}", self.channel);
        }
    }

    /// Adds a message read back from storage and marks it durable. Returns a description of
    /// the problem if it does not continue the stream (corruption). With `verify_chain` false
    /// the chain is taken as stored (used for the first record after reclaimed history).
    pub fn push_recovered(
        &mut self,
        message: &Message,
        locator: L,
        verify_chain: bool,
    ) -> Result<(), String> {
        self.push_checked(message, locator, verify_chain)?;
        self.durable_top = self.assigned_top;
        Ok(())
    }

    fn push_checked(
        &mut self,
        message: &Message,
        locator: L,
        verify_chain: bool,
    ) -> Result<(), String> {
        if message.epoch != self.epoch {
            return Err(format!(
                "message {} has epoch {} but the stream has epoch {}",
                message.serial, message.epoch, self.epoch
            ));
        }
        if message.serial != self.assigned_top.next() {
            return Err(format!(
                "serial {} does not follow {}",
                message.serial, self.assigned_top
            ));
        }
        if verify_chain {
            let expected = self
                .assigned_chain
                .next(message.serial, &message.id, &message.data);
            if expected != message.chain {
                return Err(format!("chain mismatch at serial {}", message.serial));
            }
        }
        if self.ids.contains_key(&message.id) {
            return Err(format!(
                "id {} appears twice (serial {})",
                message.id, message.serial
            ));
        }
        let size_bytes = u32::try_from(message.size_bytes()).expect("message size fits u32");
        let cumulative_bytes = self
            .entries
            .back()
            .map_or(0, |entry| entry.cumulative_bytes)
            + u64::from(size_bytes);
        self.entries.push_back(StreamEntry {
            locator,
            id: message.id.clone(),
            content: message.content_digest(),
            time: message.time,
            expires_at: message.expires_at(),
            size_bytes,
            cumulative_bytes,
        });
        self.ids.insert(message.id.clone(), message.serial);
        self.assigned_top = message.serial;
        self.assigned_chain = message.chain;
        self.assigned_time = self.assigned_time.max(message.time);
        Ok(())
    }

    /// Makes messages up to `serial` visible to readers.
    pub fn mark_durable(&mut self, serial: Serial) {
        assert!(
            serial <= self.assigned_top,
            "durable beyond assigned on {}",
            self.channel
        );
        self.durable_top = self.durable_top.max(serial);
    }

    /// Drops indexed entries from the front while `dead` says so (their storage is being
    /// reclaimed). Returns how many were dropped. The tip is kept.
    pub fn drop_front_while(
        &mut self,
        mut dead: impl FnMut(Serial, &StreamEntry<L>) -> bool,
    ) -> usize {
        let mut dropped = 0;
        while let Some(entry) = self.entries.front() {
            let serial = self.first_entry_serial;
            if serial > self.durable_top || !dead(serial, entry) {
                break;
            }
            let entry = self.entries.pop_front().expect("front exists");
            self.ids.remove(&entry.id);
            self.first_entry_serial = serial.next();
            dropped += 1;
        }
        dropped
    }

    // ----- retention and reads -------------------------------------------------------------

    /// The first serial still within retention (`durable_top + 1` when none is).
    pub fn first_retained(&self, policy: &NamespacePolicy, now: Timestamp) -> Serial {
        let top = self.durable_top;
        let durable_len = usize::try_from(top.0 + 1 - self.first_entry_serial.0).unwrap_or(0);
        let durable_len = durable_len.min(self.entries.len());
        let mut first = self.first_entry_serial;
        // Count bound.
        let by_count = Serial((top.0 + 1).saturating_sub(policy.retention.messages_max));
        first = first.max(by_count);
        // Byte bound: keep the longest suffix whose sizes sum to at most bytes_max.
        if let Some(last) = self.entries.get(durable_len.wrapping_sub(1)) {
            let total = last.cumulative_bytes;
            let index = partition_point(&self.entries, durable_len, |entry| {
                total - (entry.cumulative_bytes - u64::from(entry.size_bytes))
                    > policy.retention.bytes_max
            });
            first = first.max(Serial(self.first_entry_serial.0 + index as u64));
        }
        // Age bound (time never decreases along the stream).
        let index = partition_point(&self.entries, durable_len, |entry| {
            entry.time.plus_ms(policy.retention.max_age_ms) <= now
        });
        first = first.max(Serial(self.first_entry_serial.0 + index as u64));
        first.min(top.next())
    }

    fn is_expired(entry: &StreamEntry<L>, now: Timestamp) -> bool {
        entry.expires_at.is_some_and(|at| at <= now)
    }

    /// The first retained message whose TTL has not run out, looking at most `READ_SCAN_MAX`
    /// entries ahead.
    fn first_available(&self, policy: &NamespacePolicy, now: Timestamp) -> Option<Position> {
        let first = self.first_retained(policy, now);
        let mut serial = first;
        for _ in 0..READ_SCAN_MAX {
            if serial > self.durable_top {
                return None;
            }
            let entry = self.entry(serial)?;
            if !Self::is_expired(entry, now) {
                return Some(self.position(serial));
            }
            serial = serial.next();
        }
        Some(self.position(serial))
    }

    fn top_position(&self) -> Option<Position> {
        (self.durable_top.0 > 0).then(|| self.position(self.durable_top))
    }

    fn continuity_lost(
        &self,
        reason: ContinuityReason,
        requested: &Position,
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> ContinuityLost {
        ContinuityLost {
            reason,
            requested: requested.clone(),
            first_available: self.first_available(policy, now),
            top: self.top_position(),
        }
    }

    /// Checks that `position` can be continued from on this stream.
    fn check_continuity(
        &self,
        position: &Position,
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> Result<(), ContinuityLost> {
        if position.epoch != self.epoch {
            return Err(self.continuity_lost(
                ContinuityReason::EpochChanged,
                position,
                policy,
                now,
            ));
        }
        if position.serial > self.durable_top {
            return Err(self.continuity_lost(ContinuityReason::AheadOfTop, position, policy, now));
        }
        if position.serial.next() < self.first_retained(policy, now) {
            return Err(self.continuity_lost(ContinuityReason::Retention, position, policy, now));
        }
        Ok(())
    }

    /// Plans a forward page: messages after `from`, oldest first, at most `limit`.
    pub fn plan_read_forward(
        &self,
        from: &ReadFrom,
        limit: usize,
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> Result<ReadPlan<L>, ContinuityLost> {
        let first = self.first_retained(policy, now);
        let start = match from {
            ReadFrom::Oldest => first,
            ReadFrom::After(position) => {
                self.check_continuity(position, policy, now)?;
                position.serial.next().max(first)
            }
        };
        let mut plan = ReadPlan {
            entries: Vec::new(),
            skipped: Vec::new(),
            next: None,
            top: self.top_position(),
            more: false,
        };
        let mut serial = start;
        let mut scanned = 0;
        while serial <= self.durable_top && plan.entries.len() < limit && scanned < READ_SCAN_MAX {
            let entry = self.entry(serial).expect("retained serial is indexed");
            if Self::is_expired(entry, now) {
                push_skip(&mut plan.skipped, serial);
            } else {
                plan.entries.push((serial, entry.locator.clone()));
            }
            serial = serial.next();
            scanned += 1;
        }
        let last_scanned = serial.prev().expect("serial >= 1");
        plan.next = Some(self.position(match from {
            ReadFrom::After(position) => last_scanned.max(position.serial),
            ReadFrom::Oldest => last_scanned,
        }));
        plan.more = serial <= self.durable_top;
        Ok(plan)
    }

    /// Plans a backward page: messages before `before`, newest first, at most `limit`.
    pub fn plan_read_backward(
        &self,
        before: &Position,
        limit: usize,
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> Result<ReadPlan<L>, ContinuityLost> {
        if before.epoch != self.epoch {
            return Err(self.continuity_lost(ContinuityReason::EpochChanged, before, policy, now));
        }
        if before.serial > self.durable_top.next() {
            return Err(self.continuity_lost(ContinuityReason::AheadOfTop, before, policy, now));
        }
        let first = self.first_retained(policy, now);
        let mut plan = ReadPlan {
            entries: Vec::new(),
            skipped: Vec::new(),
            next: None,
            top: self.top_position(),
            more: false,
        };
        let mut serial = before.serial;
        let mut scanned = 0;
        while serial > first && plan.entries.len() < limit && scanned < READ_SCAN_MAX {
            serial = Serial(serial.0 - 1);
            let entry = self.entry(serial).expect("retained serial is indexed");
            if Self::is_expired(entry, now) {
                push_skip_backward(&mut plan.skipped, serial);
            } else {
                plan.entries.push((serial, entry.locator.clone()));
            }
            scanned += 1;
        }
        plan.more = serial > first;
        plan.next = Some(self.position(serial));
        Ok(plan)
    }

    /// The locator of a retained, unexpired, durable message by id.
    pub fn find_by_id(
        &self,
        id: &MessageId,
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> Option<(Serial, L)> {
        let serial = *self.ids.get(id)?;
        if serial > self.durable_top || serial < self.first_retained(policy, now) {
            return None;
        }
        let entry = self.entry(serial)?;
        (!Self::is_expired(entry, now)).then(|| (serial, entry.locator.clone()))
    }

    /// The position of an accepted id, durable or not (used to answer duplicates).
    pub fn serial_of(&self, id: &MessageId) -> Option<Serial> {
        self.ids.get(id).copied()
    }

    pub fn status(&self, policy: &NamespacePolicy, now: Timestamp) -> StreamStatus {
        let first = self.first_retained(policy, now);
        let mut messages = 0;
        let mut bytes = 0;
        let mut serial = first;
        while serial <= self.durable_top {
            let entry = self.entry(serial).expect("retained serial is indexed");
            if !Self::is_expired(entry, now) {
                messages += 1;
                bytes += u64::from(entry.size_bytes);
            }
            serial = serial.next();
        }
        StreamStatus {
            epoch: self.epoch.clone(),
            first: self.first_available(policy, now),
            top: self.position(self.durable_top),
            messages,
            bytes,
        }
    }

    /// Whether an entry's storage may be reclaimed: out of retention or expired, and past the
    /// dedupe window (ids must stay known that long, across restarts).
    pub fn is_reclaimable(
        &self,
        serial: Serial,
        entry: &StreamEntry<L>,
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> bool {
        let past_dedupe = entry.time.plus_ms(policy.dedupe_window_ms()) <= now;
        let gone = serial < self.first_retained(policy, now) || Self::is_expired(entry, now);
        serial <= self.durable_top && past_dedupe && gone
    }
}

fn push_skip(skipped: &mut Vec<SkippedRange>, serial: Serial) {
    if let Some(last) = skipped.last_mut()
        && last.to.next() == serial
    {
        last.to = serial;
        return;
    }
    skipped.push(SkippedRange {
        from: serial,
        to: serial,
        reason: SkipReason::Expired,
    });
}

fn push_skip_backward(skipped: &mut Vec<SkippedRange>, serial: Serial) {
    if let Some(last) = skipped.last_mut()
        && serial.next() == last.from
    {
        last.from = serial;
        return;
    }
    skipped.push(SkippedRange {
        from: serial,
        to: serial,
        reason: SkipReason::Expired,
    });
}

/// Index of the first of the first `len` items for which `before` is false (items satisfying
/// it come first).
fn partition_point<T>(
    items: &VecDeque<T>,
    len: usize,
    mut before: impl FnMut(&T) -> bool,
) -> usize {
    let (front, back) = items.as_slices();
    let front = &front[..len.min(front.len())];
    let back = &back[..len - front.len()];
    let in_front = front.partition_point(&mut before);
    if in_front < front.len() {
        in_front
    } else {
        front.len() + back.partition_point(before)
    }
}
