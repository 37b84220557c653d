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
// Lives only in one batch's Vec between plan and push; boxing the message would add an
// allocation per message on the hot path.
#[allow(clippy::large_enum_variant)]
pub enum Sequenced {
    /// A new message with its assigned serial, time and chain, and its content digest (kept
    /// so that [`ChannelStream::push`] need not hash the payload again).
    New(Message, ContentDigest),
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
            let data_digest = blake3::hash(new.data.bytes());
            let content = crate::message::content_digest_with(
                &new.name,
                &new.headers,
                &new.data,
                &data_digest,
                new.ttl_ms,
            );
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
            chain = chain.next_with_digest(next_serial, &new.id, &data_digest);
            in_batch.insert(&new.id, (next_serial, content));
            decisions.push(Sequenced::New(
                Message {
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
                },
                content,
            ));
        }
        Ok(decisions)
    }

    /// Adds a planned message (not yet durable) at the end of the stream.
    ///
    /// # Panics
    /// If the message does not continue the stream: that is a bug in the caller.
    pub fn push(&mut self, message: &Message, content: ContentDigest, locator: L) {
        // `plan` computed the chain value and the content digest; recomputing them here would
        // hash every payload again.
        if let Err(problem) = self.push_checked(message, Some(content), locator, false) {
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
        self.push_checked(message, None, locator, verify_chain)?;
        self.durable_top = self.assigned_top;
        Ok(())
    }

    fn push_checked(
        &mut self,
        message: &Message,
        content: Option<ContentDigest>,
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
            content: content.unwrap_or_else(|| message.content_digest()),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::*;
    use crate::error::ErrorCode;
    use crate::message::Data;
    use crate::policy::{DEDUPE_WINDOW_MS_MIN, Retention};

    /// Locators in these tests are the serial the entry was pushed at, so a plan's locators
    /// can be checked against its serials.
    type Stream = ChannelStream<u64>;

    const T0: Timestamp = Timestamp(1_000_000);

    fn epoch() -> Epoch {
        Epoch::parse("e1").unwrap()
    }

    fn stream() -> Stream {
        ChannelStream::new(ChannelName::parse("room").unwrap(), epoch())
    }

    fn at(serial: u64) -> Position {
        Position::new(epoch(), Serial(serial))
    }

    fn message(id: &str, data: &str) -> NewMessage {
        NewMessage {
            id: MessageId::parse(id).unwrap(),
            name: None,
            headers: BTreeMap::new(),
            data: Data::Json(Bytes::copy_from_slice(data.as_bytes())),
            ttl_ms: None,
        }
    }

    fn with_ttl(mut message: NewMessage, ttl_ms: u64) -> NewMessage {
        message.ttl_ms = Some(ttl_ms);
        message
    }

    fn policy() -> NamespacePolicy {
        NamespacePolicy::default()
    }

    fn retention(messages_max: u64, bytes_max: u64, max_age_ms: u64) -> NamespacePolicy {
        NamespacePolicy {
            retention: Retention {
                max_age_ms,
                messages_max,
                bytes_max,
            },
            ..NamespacePolicy::default()
        }
    }

    /// Plans a batch, pushes the new messages and marks them durable, as a store does.
    fn commit(
        stream: &mut Stream,
        batch: &[NewMessage],
        policy: &NamespacePolicy,
        now: Timestamp,
    ) -> Result<Vec<Sequenced>, PlanRejection> {
        let planned = stream.plan(batch, policy, now)?;
        push_new(stream, &planned);
        stream.mark_durable(stream.tip().0);
        Ok(planned)
    }

    fn push_new(stream: &mut Stream, planned: &[Sequenced]) {
        for decision in planned {
            if let Sequenced::New(message, content) = decision {
                stream.push(message, *content, message.serial.0);
            }
        }
    }

    /// `n` messages `m1..mN` with 10 bytes of data each, committed one per call at `now`.
    fn commit_numbered(stream: &mut Stream, range: std::ops::RangeInclusive<u64>, now: Timestamp) {
        for n in range {
            commit(
                stream,
                &[message(&format!("m{n}"), &format!("{n:010}"))],
                &policy(),
                now,
            )
            .unwrap();
        }
    }

    fn new_serials(planned: &[Sequenced]) -> Vec<u64> {
        planned
            .iter()
            .filter_map(|decision| match decision {
                Sequenced::New(message, _) => Some(message.serial.0),
                Sequenced::Duplicate { .. } => None,
            })
            .collect()
    }

    fn plan_serials(plan: &ReadPlan<u64>) -> Vec<u64> {
        for (serial, locator) in &plan.entries {
            assert_eq!(serial.0, *locator, "a plan's locator belongs to its serial");
        }
        plan.entries.iter().map(|(serial, _)| serial.0).collect()
    }

    fn skip(from: u64, to: u64) -> SkippedRange {
        SkippedRange {
            from: Serial(from),
            to: Serial(to),
            reason: SkipReason::Expired,
        }
    }

    fn forward(stream: &Stream, from: ReadFrom, limit: usize, now: Timestamp) -> ReadPlan<u64> {
        stream
            .plan_read_forward(&from, limit, &policy(), now)
            .unwrap()
    }

    // ----- sequencing ----------------------------------------------------------------------

    #[test]
    fn serials_start_at_one_and_the_chain_starts_at_genesis() {
        let mut stream = stream();
        let batch = [message("a", "1"), message("b", "2"), message("c", "3")];
        let planned = commit(&mut stream, &batch, &policy(), T0).unwrap();
        let mut chain = ChainHash::genesis(&epoch());
        for (index, decision) in planned.iter().enumerate() {
            let Sequenced::New(message, _) = decision else {
                panic!("{decision:?} should be new");
            };
            let serial = Serial(index as u64 + 1);
            chain = chain.next(serial, &batch[index].id, &batch[index].data);
            assert_eq!(message.serial, serial);
            assert_eq!(message.epoch, epoch());
            assert_eq!(message.time, T0);
            assert_eq!(message.chain, chain);
        }
        assert_eq!(stream.tip(), (Serial(3), chain, T0));
        assert_eq!(stream.durable_top(), Serial(3));
    }

    #[test]
    fn time_never_decreases_even_when_the_clock_goes_back() {
        let mut stream = stream();
        commit(&mut stream, &[message("a", "1")], &policy(), T0).unwrap();
        let planned = commit(&mut stream, &[message("b", "2")], &policy(), Timestamp(5)).unwrap();
        let Sequenced::New(second, _) = &planned[0] else {
            panic!("new message expected");
        };
        assert_eq!(second.time, T0, "time stays at the latest time seen");
        let later = T0.plus_ms(10);
        let planned = commit(&mut stream, &[message("c", "3")], &policy(), later).unwrap();
        let Sequenced::New(third, _) = &planned[0] else {
            panic!("new message expected");
        };
        assert_eq!(third.time, later);
    }

    #[test]
    fn duplicates_inside_a_batch_and_against_earlier_batches_get_the_original_serial() {
        let mut stream = stream();
        let planned = commit(
            &mut stream,
            &[message("a", "1"), message("a", "1"), message("b", "2")],
            &policy(),
            T0,
        )
        .unwrap();
        assert_eq!(new_serials(&planned), vec![1, 2]);
        assert_eq!(
            planned[1],
            Sequenced::Duplicate {
                id: MessageId::parse("a").unwrap(),
                serial: Serial(1)
            }
        );
        let planned = commit(
            &mut stream,
            &[message("c", "3"), message("b", "2")],
            &policy(),
            T0,
        )
        .unwrap();
        assert_eq!(new_serials(&planned), vec![3]);
        assert_eq!(
            planned[1],
            Sequenced::Duplicate {
                id: MessageId::parse("b").unwrap(),
                serial: Serial(2)
            }
        );
        // A batch of only retries assigns nothing.
        let planned = commit(&mut stream, &[message("a", "1")], &policy(), T0).unwrap();
        assert!(new_serials(&planned).is_empty());
        assert_eq!(stream.tip().0, Serial(3));
    }

    #[test]
    fn an_id_conflict_rejects_the_whole_batch_and_changes_nothing() {
        let mut stream = stream();
        commit(&mut stream, &[message("a", "1")], &policy(), T0).unwrap();
        let tip = stream.tip();
        let batch = [message("b", "2"), message("a", "changed")];
        assert_eq!(
            stream.plan(&batch, &policy(), T0),
            Err(PlanRejection::IdConflict {
                id: MessageId::parse("a").unwrap(),
                serial: Serial(1)
            })
        );
        // Reusing an id with another TTL is a conflict too: TTL is part of the content.
        assert!(matches!(
            stream.plan(&[with_ttl(message("a", "1"), 5_000)], &policy(), T0),
            Err(PlanRejection::IdConflict { .. })
        ));
        // Inside one batch.
        assert!(matches!(
            stream.plan(&[message("c", "3"), message("c", "4")], &policy(), T0),
            Err(PlanRejection::IdConflict { ref id, .. }) if id.as_str() == "c"
        ));
        // A TTL outside the namespace bounds.
        match stream.plan(
            &[message("d", "4"), with_ttl(message("e", "5"), 10)],
            &policy(),
            T0,
        ) {
            Err(PlanRejection::Invalid(invalid)) => assert_eq!(invalid.code, ErrorCode::InvalidTtl),
            other => panic!("expected invalid ttl, got {other:?}"),
        }
        assert_eq!(stream.tip(), tip);
        assert_eq!(stream.entry_count(), 1);
        assert_eq!(stream.serial_of(&MessageId::parse("b").unwrap()), None);
        let planned = commit(&mut stream, &[message("b", "2")], &policy(), T0).unwrap();
        assert_eq!(new_serials(&planned), vec![2], "no serial was burnt");
    }

    // ----- durability ----------------------------------------------------------------------

    #[test]
    fn readers_only_see_durable_entries() {
        let mut stream = stream();
        commit(&mut stream, &[message("a", "1")], &policy(), T0).unwrap();
        let planned = stream.plan(&[message("b", "2")], &policy(), T0).unwrap();
        push_new(&mut stream, &planned);
        assert_eq!(stream.tip().0, Serial(2));
        assert_eq!(stream.durable_top(), Serial(1));

        let plan = forward(&stream, ReadFrom::Oldest, 10, T0);
        assert_eq!(plan_serials(&plan), vec![1]);
        assert_eq!(plan.top, Some(at(1)));
        assert!(!plan.more);
        let backward = stream
            .plan_read_backward(&at(2), 10, &policy(), T0)
            .unwrap();
        assert_eq!(plan_serials(&backward), vec![1]);
        let lost = stream
            .plan_read_forward(&ReadFrom::After(at(2)), 10, &policy(), T0)
            .unwrap_err();
        assert_eq!(lost.reason, ContinuityReason::AheadOfTop);
        let b = MessageId::parse("b").unwrap();
        assert_eq!(stream.find_by_id(&b, &policy(), T0), None);
        assert_eq!(stream.status(&policy(), T0).messages, 1);
        // A retry while the first attempt is still being written is still a duplicate.
        assert_eq!(stream.serial_of(&b), Some(Serial(2)));
        let retry = stream.plan(&[message("b", "2")], &policy(), T0).unwrap();
        assert_eq!(
            retry,
            vec![Sequenced::Duplicate {
                id: b.clone(),
                serial: Serial(2)
            }]
        );

        stream.mark_durable(Serial(2));
        assert_eq!(
            plan_serials(&forward(&stream, ReadFrom::Oldest, 10, T0)),
            vec![1, 2]
        );
        assert_eq!(stream.find_by_id(&b, &policy(), T0), Some((Serial(2), 2)));
    }

    #[test]
    fn a_new_stream_reads_as_empty() {
        let stream = stream();
        let plan = forward(&stream, ReadFrom::Oldest, 10, T0);
        assert!(plan.entries.is_empty() && !plan.more);
        assert_eq!(plan.top, None);
        let lost = stream
            .plan_read_forward(&ReadFrom::After(at(1)), 10, &policy(), T0)
            .unwrap_err();
        assert_eq!(lost.reason, ContinuityReason::AheadOfTop);
        assert_eq!((lost.first_available, lost.top), (None, None));
    }

    // ----- retention -----------------------------------------------------------------------

    #[test]
    fn retention_by_count() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=8, T0);
        let policy = retention(3, u64::MAX, u64::MAX);
        assert_eq!(stream.first_retained(&policy, T0), Serial(6));
        let plan = stream
            .plan_read_forward(&ReadFrom::Oldest, 10, &policy, T0)
            .unwrap();
        assert_eq!(plan_serials(&plan), vec![6, 7, 8]);
        let status = stream.status(&policy, T0);
        assert_eq!(
            (status.first, status.messages, status.bytes),
            (Some(at(6)), 3, 30)
        );
    }

    #[test]
    fn retention_by_bytes_keeps_the_longest_suffix_that_fits() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=5, T0);
        // 10 bytes each: 25 bytes hold two messages, 30 hold three.
        assert_eq!(
            stream.first_retained(&retention(100, 25, u64::MAX), T0),
            Serial(4)
        );
        assert_eq!(
            stream.first_retained(&retention(100, 30, u64::MAX), T0),
            Serial(3)
        );
        assert_eq!(
            stream.first_retained(&retention(100, 9, u64::MAX), T0),
            Serial(6)
        );
        // After the front was reclaimed the bound is still a suffix of what is left.
        stream.drop_front_while(|serial, _| serial.0 <= 2);
        assert_eq!(
            stream.first_retained(&retention(100, 25, u64::MAX), T0),
            Serial(4)
        );
        assert_eq!(
            stream.first_retained(&retention(100, 1000, u64::MAX), T0),
            Serial(3)
        );
    }

    #[test]
    fn retention_by_age() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=2, T0);
        commit_numbered(&mut stream, 3..=4, T0.plus_ms(5_000));
        let policy = retention(100, u64::MAX, 10_000);
        assert_eq!(stream.first_retained(&policy, T0.plus_ms(9_999)), Serial(1));
        assert_eq!(
            stream.first_retained(&policy, T0.plus_ms(10_000)),
            Serial(3)
        );
        assert_eq!(
            stream.first_retained(&policy, T0.plus_ms(15_000)),
            Serial(5)
        );
        let status = stream.status(&policy, T0.plus_ms(15_000));
        assert_eq!(
            (status.first, status.top, status.messages),
            (None, at(4), 0)
        );
    }

    #[test]
    fn the_tightest_retention_bound_wins() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=2, T0);
        commit_numbered(&mut stream, 3..=6, T0.plus_ms(5_000));
        let now = T0.plus_ms(10_000);
        assert_eq!(
            stream.first_retained(&retention(5, 45, 10_000), now),
            Serial(3)
        );
        assert_eq!(
            stream.first_retained(&retention(2, 45, 10_000), now),
            Serial(5)
        );
        assert_eq!(
            stream.first_retained(&retention(5, 15, 10_000), now),
            Serial(6)
        );
    }

    // ----- TTL -----------------------------------------------------------------------------

    /// Serials 1..=7 where 2, 3 and 6 have a 2 s TTL (expired from `T0 + 2 s`).
    fn stream_with_expiring_messages() -> Stream {
        let mut stream = stream();
        let batch: Vec<NewMessage> = (1..=7)
            .map(|n| {
                let message = message(&format!("m{n}"), "0");
                if [2, 3, 6].contains(&n) {
                    with_ttl(message, 2_000)
                } else {
                    message
                }
            })
            .collect();
        commit(&mut stream, &batch, &policy(), T0).unwrap();
        stream
    }

    #[test]
    fn expired_messages_are_skipped_forward_with_their_ranges() {
        let stream = stream_with_expiring_messages();
        let before_expiry = forward(&stream, ReadFrom::Oldest, 10, T0.plus_ms(1_999));
        assert_eq!(plan_serials(&before_expiry), (1..=7).collect::<Vec<_>>());
        assert!(before_expiry.skipped.is_empty());

        let now = T0.plus_ms(2_000);
        let plan = forward(&stream, ReadFrom::Oldest, 10, now);
        assert_eq!(plan_serials(&plan), vec![1, 4, 5, 7]);
        assert_eq!(plan.skipped, vec![skip(2, 3), skip(6, 6)]);
        assert_eq!((plan.next, plan.more), (Some(at(7)), false));

        // A page that fills up stops right after its last message.
        let plan = forward(&stream, ReadFrom::After(at(1)), 1, now);
        assert_eq!(plan_serials(&plan), vec![4]);
        assert_eq!(plan.skipped, vec![skip(2, 3)]);
        assert_eq!((plan.next, plan.more), (Some(at(4)), true));
        let plan = forward(&stream, ReadFrom::After(at(5)), 5, now);
        assert_eq!(plan_serials(&plan), vec![7]);
        assert_eq!(plan.skipped, vec![skip(6, 6)]);

        let status = stream.status(&policy(), now);
        assert_eq!((status.first, status.messages), (Some(at(1)), 4));
    }

    #[test]
    fn expired_messages_are_skipped_backward_newest_first() {
        let stream = stream_with_expiring_messages();
        let now = T0.plus_ms(2_000);
        let plan = stream
            .plan_read_backward(&at(8), 10, &policy(), now)
            .unwrap();
        assert_eq!(plan_serials(&plan), vec![7, 5, 4, 1]);
        assert_eq!(plan.skipped, vec![skip(6, 6), skip(2, 3)]);
        // `next` is the `before=` of the following page: the oldest serial this one covered.
        assert_eq!((plan.next, plan.more), (Some(at(1)), false));
        let plan = stream
            .plan_read_backward(&at(4), 1, &policy(), now)
            .unwrap();
        assert_eq!(plan_serials(&plan), vec![1]);
        assert_eq!(plan.skipped, vec![skip(2, 3)]);
    }

    #[test]
    fn first_available_skips_expired_messages_at_the_front() {
        let mut stream = stream();
        let batch = [
            with_ttl(message("a", "1"), 1_000),
            with_ttl(message("b", "2"), 1_000),
            message("c", "3"),
        ];
        commit(&mut stream, &batch, &policy(), T0).unwrap();
        let status = stream.status(&policy(), T0.plus_ms(1_000));
        assert_eq!(status.first, Some(at(3)));
        let lost = stream
            .plan_read_forward(&ReadFrom::After(at(9)), 10, &policy(), T0.plus_ms(1_000))
            .unwrap_err();
        assert_eq!(lost.first_available, Some(at(3)));
    }

    // ----- continuity ----------------------------------------------------------------------

    #[test]
    fn positions_that_cannot_be_continued_are_refused_with_the_reason() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=6, T0);
        let policy = retention(3, u64::MAX, u64::MAX);
        let read = |position: Position| {
            stream.plan_read_forward(&ReadFrom::After(position), 10, &policy, T0)
        };

        let other = Position::new(Epoch::parse("e2").unwrap(), Serial(2));
        let lost = read(other.clone()).unwrap_err();
        assert_eq!(
            lost,
            ContinuityLost {
                reason: ContinuityReason::EpochChanged,
                requested: other.clone(),
                first_available: Some(at(4)),
                top: Some(at(6)),
            }
        );
        let lost = stream
            .plan_read_backward(&other, 10, &policy, T0)
            .unwrap_err();
        assert_eq!(lost.reason, ContinuityReason::EpochChanged);

        let lost = read(at(2)).unwrap_err();
        assert_eq!(lost.reason, ContinuityReason::Retention);
        assert_eq!(lost.first_available, Some(at(4)));
        assert_eq!(lost.requested, at(2));
        // The position just before the first retained message continues without a gap.
        assert_eq!(plan_serials(&read(at(3)).unwrap()), vec![4, 5, 6]);

        let lost = read(at(7)).unwrap_err();
        assert_eq!(lost.reason, ContinuityReason::AheadOfTop);
        let lost = stream
            .plan_read_backward(&at(8), 10, &policy, T0)
            .unwrap_err();
        assert_eq!(lost.reason, ContinuityReason::AheadOfTop);
        // The top itself is a fine place to wait for more.
        let plan = read(at(6)).unwrap();
        assert!(plan.entries.is_empty());
        assert_eq!((plan.next, plan.more), (Some(at(6)), false));
    }

    // ----- paging --------------------------------------------------------------------------

    #[test]
    fn forward_pages_resume_from_next_until_more_is_false() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=7, T0);
        let mut seen = Vec::new();
        let mut from = ReadFrom::Oldest;
        let mut pages = 0;
        loop {
            let plan = forward(&stream, from.clone(), 3, T0);
            pages += 1;
            seen.extend(plan_serials(&plan));
            assert_eq!(plan.next, Some(at(*seen.last().unwrap())));
            assert_eq!(plan.top, Some(at(7)));
            if !plan.more {
                break;
            }
            from = ReadFrom::After(plan.next.unwrap());
        }
        assert_eq!(seen, (1..=7).collect::<Vec<_>>());
        assert_eq!(pages, 3);
    }

    #[test]
    fn backward_pages_resume_from_next_until_more_is_false() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=7, T0);
        let policy = retention(6, u64::MAX, u64::MAX);
        let mut seen = Vec::new();
        let mut before = at(8);
        loop {
            let plan = stream.plan_read_backward(&before, 4, &policy, T0).unwrap();
            seen.extend(plan_serials(&plan));
            before = plan.next.unwrap();
            assert_eq!(before, at(*seen.last().unwrap()));
            if !plan.more {
                break;
            }
        }
        assert_eq!(
            seen,
            vec![7, 6, 5, 4, 3, 2],
            "stops at the first retained message"
        );
        let plan = stream.plan_read_backward(&at(2), 4, &policy, T0).unwrap();
        assert!(plan.entries.is_empty() && !plan.more);
    }

    // ----- lookups -------------------------------------------------------------------------

    #[test]
    fn find_by_id_respects_retention_and_expiry() {
        let mut stream = stream();
        let batch = [
            message("old", "1"),
            with_ttl(message("short", "2"), 1_000),
            message("kept", "3"),
        ];
        commit(&mut stream, &batch, &policy(), T0).unwrap();
        let id = |text: &str| MessageId::parse(text).unwrap();
        assert_eq!(
            stream.find_by_id(&id("old"), &policy(), T0),
            Some((Serial(1), 1))
        );
        let keep_two = retention(2, u64::MAX, u64::MAX);
        assert_eq!(stream.find_by_id(&id("old"), &keep_two, T0), None);
        assert_eq!(
            stream.find_by_id(&id("short"), &policy(), T0.plus_ms(1_000)),
            None
        );
        assert_eq!(
            stream.find_by_id(&id("kept"), &policy(), T0.plus_ms(1_000)),
            Some((Serial(3), 3))
        );
        assert_eq!(stream.find_by_id(&id("never"), &policy(), T0), None);
    }

    // ----- reclaim -------------------------------------------------------------------------

    #[test]
    fn drop_front_while_forgets_ids_but_keeps_the_tip() {
        let mut stream = stream();
        commit_numbered(&mut stream, 1..=4, T0);
        let tip = stream.tip();
        assert_eq!(stream.drop_front_while(|serial, _| serial.0 <= 2), 2);
        assert_eq!(
            stream.first_entry().map(|(serial, _)| serial),
            Some(Serial(3))
        );
        assert_eq!(stream.tip(), tip);
        assert_eq!(stream.serial_of(&MessageId::parse("m1").unwrap()), None);
        assert_eq!(
            plan_serials(&forward(&stream, ReadFrom::Oldest, 10, T0)),
            vec![3, 4]
        );
        let lost = stream
            .plan_read_forward(&ReadFrom::After(at(1)), 10, &policy(), T0)
            .unwrap_err();
        assert_eq!(
            (lost.reason, lost.first_available),
            (ContinuityReason::Retention, Some(at(3)))
        );

        // Never drops entries that are not durable yet.
        let planned = stream.plan(&[message("m5", "5")], &policy(), T0).unwrap();
        push_new(&mut stream, &planned);
        assert_eq!(stream.drop_front_while(|_, _| true), 2);
        assert_eq!(stream.entry_count(), 1);
        assert_eq!(
            stream.first_entry().map(|(serial, _)| serial),
            Some(Serial(5))
        );

        // Dropping everything keeps serial, chain and time going.
        stream.mark_durable(Serial(5));
        let tip = stream.tip();
        assert_eq!(stream.drop_front_while(|_, _| true), 1);
        assert_eq!(stream.entry_count(), 0);
        assert_eq!(stream.tip(), tip);
        let planned = stream
            .plan(&[message("m6", "6")], &policy(), Timestamp(0))
            .unwrap();
        let Sequenced::New(next, _) = &planned[0] else {
            panic!("new message expected");
        };
        assert_eq!(next.serial, Serial(6));
        assert_eq!(next.chain, tip.1.next(Serial(6), &next.id, &next.data));
        assert_eq!(next.time, tip.2);
    }

    #[test]
    fn entries_are_reclaimable_only_when_gone_and_past_the_dedupe_window() {
        let mut stream = stream();
        let batch = [
            message("a", "1"),
            with_ttl(message("b", "2"), 1_000),
            message("c", "3"),
        ];
        commit(&mut stream, &batch, &policy(), T0).unwrap();
        // The age bound is short, so the 2-minute minimum is the dedupe window.
        let keep_one = retention(1, u64::MAX, 60_000);
        let reclaimable = |serial: u64, policy: &NamespacePolicy, now: Timestamp| {
            let entry = stream.entry(Serial(serial)).unwrap();
            stream.is_reclaimable(Serial(serial), entry, policy, now)
        };
        let inside_window = T0.plus_ms(DEDUPE_WINDOW_MS_MIN - 1);
        let past_window = T0.plus_ms(DEDUPE_WINDOW_MS_MIN);
        // Out of retention (serial 1) or expired (serial 2), but their ids must stay known.
        assert!(!reclaimable(1, &keep_one, inside_window));
        assert!(!reclaimable(2, &policy(), inside_window));
        assert!(reclaimable(1, &keep_one, past_window));
        // The window covers the retention age (24 h by default), so an expired message's id
        // is kept that long too.
        assert!(!reclaimable(2, &policy(), past_window));
        let day_later = T0.plus_ms(policy().retention.max_age_ms);
        assert!(reclaimable(2, &policy(), day_later));
        // Retained and unexpired: never.
        assert!(!reclaimable(1, &policy(), past_window));
        // A configured window longer than the minimum is honoured.
        let long_window = NamespacePolicy {
            dedupe_window_ms: DEDUPE_WINDOW_MS_MIN * 2,
            ..keep_one.clone()
        };
        assert!(!reclaimable(1, &long_window, past_window));
        // A window never shorter than the retention age.
        let long_age = retention(1, u64::MAX, DEDUPE_WINDOW_MS_MIN * 3);
        assert!(!reclaimable(
            2,
            &long_age,
            T0.plus_ms(DEDUPE_WINDOW_MS_MIN * 2)
        ));
    }

    // ----- recovery ------------------------------------------------------------------------

    #[test]
    fn push_recovered_refuses_messages_that_do_not_continue_the_stream() {
        let mut source = stream();
        let planned = commit(
            &mut source,
            &[message("a", "1"), message("b", "2"), message("c", "3")],
            &policy(),
            T0,
        )
        .unwrap();
        let messages: Vec<Message> = planned
            .into_iter()
            .map(|decision| match decision {
                Sequenced::New(message, _) => message,
                Sequenced::Duplicate { .. } => panic!("no duplicates here"),
            })
            .collect();

        let mut rebuilt = stream();
        rebuilt.push_recovered(&messages[0], 1, true).unwrap();
        assert!(
            rebuilt.push_recovered(&messages[2], 3, true).is_err(),
            "gap"
        );
        let mut tampered = messages[1].clone();
        tampered.data = Data::Json(Bytes::from_static(b"9"));
        assert!(rebuilt.push_recovered(&tampered, 2, true).is_err(), "chain");
        let mut reused = messages[1].clone();
        reused.id = messages[0].id.clone();
        assert!(
            rebuilt.push_recovered(&reused, 2, false).is_err(),
            "duplicate id"
        );
        let mut foreign = messages[1].clone();
        foreign.epoch = Epoch::parse("e2").unwrap();
        assert!(rebuilt.push_recovered(&foreign, 2, true).is_err(), "epoch");
        rebuilt.push_recovered(&messages[1], 2, true).unwrap();
        rebuilt.push_recovered(&messages[2], 3, true).unwrap();
        assert_eq!(rebuilt.tip(), source.tip());
        assert_eq!(rebuilt.durable_top(), Serial(3));

        // Starting after reclaimed history: the first record's chain is taken as stored.
        let mut resumed = ChannelStream::starting_after(
            ChannelName::parse("room").unwrap(),
            epoch(),
            Serial(1),
            ChainHash([0; 32]),
            T0,
        );
        resumed.push_recovered(&messages[1], 2, false).unwrap();
        resumed.push_recovered(&messages[2], 3, true).unwrap();
        assert_eq!(resumed.tip(), source.tip());
    }
}
