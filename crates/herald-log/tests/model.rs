//! Model-based test of the log stores: random sequences of appends, reads, id lookups, status
//! queries, durable subscriber saves and removals, state record saves and removals, clock
//! moves, restarts and reclaims, run against a store and against a plain reference model (a
//! `BTreeMap` of accepted messages per channel, an id map, the live subscriber versions, the
//! live state values and a clock). After every operation the store's `subscribers()` and
//! `states(..)` must equal the model's.
//! Every observable output is compared: acks and their duplicate flags, conflicts, invalid
//! TTLs, pages (messages, skipped ranges, cursors, `more`), continuity errors, lookups, status
//! and reclaim counts. Chains are checked for every message read.
//!
//! A failure prints the minimal operation sequence and the seed; proptest stores it in
//! `tests/model.proptest-regressions` (commit that file). `PROPTEST_CASES=N` runs more cases.

mod common;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use common::*;
use herald_core::{
    ChainHash, ContinuityReason, Data, Epoch, ErrorCode, Message, NewMessage, Policies, Position,
    ReadFrom, Serial, SkipReason, Timestamp,
};
use herald_log::{AppendError, Clock, LogStore, ManualClock, ReadError, ReadPage, StoreHealth};
use proptest::prelude::*;
use proptest::test_runner::Config;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

/// The channels operations pick from: one per retention bound, plus the default policy.
const CHANNELS: [&str; 4] = ["room", "few:room", "small:room", "young:room"];
/// The id pool: small, so retries and conflicts are frequent.
const ID_POOL: usize = 10;
/// Durable subscriber ids per channel: few, so saves replace and removals hit.
const SUBSCRIBER_POOL: usize = 3;
/// State record keys: few, so saves replace and removals hit; two share the `s/a` prefix.
const STATE_KEYS: [&str; 4] = ["s/a", "s/a0", "s/b", "t/x"];
/// TTL choices; the last is below the default minimum of 1 s, so it is refused.
const TTLS: [Option<u64>; 4] = [None, Some(1_000), Some(5_000), Some(999)];
/// Clock steps: around TTL and age boundaries, past the 2-minute dedupe window and past the
/// 24 h default retention (so that reclaim has work, including whole embedded segments).
const CLOCK_STEPS_MS: [u64; 8] = [1, 999, 1_000, 4_000, 11_000, 130_000, 130_000, 86_400_000];

/// The id a slot of the pool stands for: `id-3`, then `id-3.g1`, ... once the earlier use of
/// the slot has left the dedupe window (see [`ModelChannel::generations`]).
fn id_text(slot: usize, generation: u32) -> String {
    match generation {
        0 => format!("id-{slot}"),
        _ => format!("id-{slot}.g{generation}"),
    }
}

/// Content variants of a message: different data sizes, binary data larger than the `small`
/// namespace's byte retention, and a variant that differs from 0 only by its name (so a retry
/// must match the name too).
fn content(variant: u8) -> (Option<String>, Data) {
    match variant {
        0 => (None, Data::Json(Bytes::from_static(b"\"aaaaaaaa\""))),
        1 => (
            None,
            Data::Json(Bytes::from_static(b"[1,2,3,4,5,6,7,8,9,10]  ")),
        ),
        2 => (None, Data::Binary(Bytes::from(vec![7u8; 300]))),
        _ => (
            Some("n".to_owned()),
            Data::Json(Bytes::from_static(b"\"aaaaaaaa\"")),
        ),
    }
}

fn content_size(variant: u8) -> u64 {
    let (name, data) = content(variant);
    (name.map_or(0, |name| name.len()) + data.bytes().len()) as u64
}

fn new_message(id: &str, variant: u8, ttl_ms: Option<u64>) -> NewMessage {
    let (name, data) = content(variant);
    NewMessage {
        id: herald_core::MessageId::parse(id).unwrap(),
        name,
        headers: BTreeMap::new(),
        data,
        ttl_ms,
    }
}

// ----- operations ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cursor {
    /// Forward: the oldest message. Backward: after the top.
    Edge,
    /// This serial in the channel's epoch.
    At(u64),
    /// This serial in an epoch the channel never had.
    Foreign(u64),
}

#[derive(Clone, Debug)]
struct Draft {
    /// A slot of the id pool.
    id: usize,
    variant: u8,
    ttl_ms: Option<u64>,
}

#[derive(Clone, Debug)]
enum Operation {
    Append {
        channel: usize,
        batch: Vec<Draft>,
    },
    ReadForward {
        channel: usize,
        after: Cursor,
        limit: usize,
    },
    ReadBackward {
        channel: usize,
        before: Cursor,
        limit: usize,
    },
    ById {
        channel: usize,
        id: usize,
    },
    Status {
        channel: usize,
    },
    AdvanceClock {
        ms: u64,
    },
    SaveSubscriber {
        channel: usize,
        slot: usize,
        version: u64,
    },
    RemoveSubscriber {
        channel: usize,
        slot: usize,
    },
    SaveState {
        key: usize,
        version: u64,
    },
    RemoveState {
        key: usize,
    },
    Restart,
    Reclaim,
}

// ----- the reference model -------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ModelMessage {
    id: String,
    variant: u8,
    ttl_ms: Option<u64>,
    time: u64,
    size_bytes: u64,
}

impl ModelMessage {
    fn expired(&self, now: u64) -> bool {
        self.ttl_ms.is_some_and(|ttl| self.time + ttl <= now)
    }
}

#[derive(Clone, Debug, Default)]
struct ModelChannel {
    /// Indexed messages (not yet reclaimed), by serial.
    messages: BTreeMap<u64, ModelMessage>,
    /// The highest serial ever assigned.
    top: u64,
    /// The current id of each used slot: its serial and acceptance time. Kept through
    /// reclaim: the model knows when the store may forget an id, not whether it did.
    ids: BTreeMap<usize, (u64, u64)>,
    /// How often each slot moved on to a fresh id. A store may forget an id once it has left
    /// the dedupe window (the embedded log does so at segment granularity), so reusing it would
    /// have no single right answer; the slot gets a fresh id instead.
    generations: BTreeMap<usize, u32>,
    last_time: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ExpectedAppend {
    Accepted(Vec<(String, u64, bool)>),
    /// `stored` is the serial of the earlier message when it is in the store (not in the batch).
    Conflict {
        id: String,
        stored: Option<u64>,
    },
    InvalidTtl,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ExpectedPage {
    serials: Vec<u64>,
    skipped: Vec<(u64, u64)>,
    next: Option<u64>,
    top: Option<u64>,
    more: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ExpectedLost {
    reason: ContinuityReason,
    first_available: Option<u64>,
    top: Option<u64>,
}

/// The policies of every run (`test_policies`), kept out of the model so failure output
/// shows only the operations and the model's own state.
static POLICIES: LazyLock<Policies> = LazyLock::new(test_policies);

#[derive(Clone, Debug)]
struct Model {
    now: u64,
    channels: BTreeMap<usize, ModelChannel>,
    /// The last append's ids (slots resolved) and its expected answer.
    last_append: Option<(Vec<String>, ExpectedAppend)>,
    /// Messages reclaimed so far, and by the last reclaim.
    reclaimed_total: usize,
    last_reclaim: usize,
    /// Live durable subscribers: (channel, slot) -> the version last saved.
    subscribers: BTreeMap<(usize, usize), u64>,
    /// Live state records: key -> the version last saved.
    states: BTreeMap<&'static str, u64>,
}

/// The value a model state version stands for: up to ~1.5 KiB, so records of several sizes
/// share segments.
fn model_state_value(version: u64) -> Bytes {
    Bytes::from(format!("v{version};").repeat((version % 200) as usize + 1))
}

/// The snapshot a model subscriber stands for.
fn model_subscriber(channel: usize, slot: usize, version: u64) -> herald_core::SubscriberState {
    subscriber_state(CHANNELS[channel], &format!("sub-{slot}"), version)
}

impl Model {
    fn new() -> Self {
        Self {
            now: START.0,
            channels: BTreeMap::new(),
            last_append: None,
            reclaimed_total: 0,
            last_reclaim: 0,
            subscribers: BTreeMap::new(),
            states: BTreeMap::new(),
        }
    }

    fn policy(&self, channel: usize) -> &herald_core::NamespacePolicy {
        POLICIES.for_channel(&common::channel(CHANNELS[channel]))
    }

    /// The first serial within retention: the tightest of the count, byte and age bounds,
    /// never before the first indexed message.
    fn first_retained(&self, channel: usize) -> u64 {
        let retention = &self.policy(channel).retention;
        let state = &self.channels[&channel];
        let after_top = state.top + 1;
        let first_indexed = state.messages.keys().next().copied().unwrap_or(after_top);
        let by_count = after_top.saturating_sub(retention.messages_max);
        let mut suffix_bytes = 0;
        let mut by_bytes = after_top;
        for (serial, message) in state.messages.iter().rev() {
            suffix_bytes += message.size_bytes;
            if suffix_bytes > retention.bytes_max {
                break;
            }
            by_bytes = *serial;
        }
        let by_age = state
            .messages
            .iter()
            .find(|(_, message)| message.time + retention.max_age_ms > self.now)
            .map_or(after_top, |(serial, _)| *serial);
        first_indexed
            .max(by_count)
            .max(by_bytes)
            .max(by_age)
            .min(after_top)
    }

    fn first_available(&self, channel: usize) -> Option<u64> {
        let state = &self.channels[&channel];
        state
            .messages
            .range(self.first_retained(channel)..)
            .find(|(_, message)| !message.expired(self.now))
            .map(|(serial, _)| *serial)
    }

    fn lost(&self, channel: usize, reason: ContinuityReason) -> ExpectedLost {
        match self.channels.get(&channel) {
            Some(state) => ExpectedLost {
                reason,
                first_available: self.first_available(channel),
                top: Some(state.top),
            },
            None => ExpectedLost {
                reason,
                first_available: None,
                top: None,
            },
        }
    }

    fn id_of(&self, channel: usize, slot: usize) -> String {
        let generation = self
            .channels
            .get(&channel)
            .and_then(|state| state.generations.get(&slot))
            .copied()
            .unwrap_or(0);
        id_text(slot, generation)
    }

    /// Moves the batch's slots whose id left the dedupe window on to fresh ids, and returns
    /// the batch's ids.
    fn assign_ids(&mut self, channel: usize, batch: &[Draft]) -> Vec<String> {
        let window = self.policy(channel).dedupe_window_ms();
        let now = self.now;
        if let Some(state) = self.channels.get_mut(&channel) {
            for draft in batch {
                if let Some(&(_, time)) = state.ids.get(&draft.id)
                    && time + window <= now
                {
                    state.ids.remove(&draft.id);
                    *state.generations.entry(draft.id).or_default() += 1;
                }
            }
        }
        batch
            .iter()
            .map(|draft| self.id_of(channel, draft.id))
            .collect()
    }

    fn append(&mut self, channel: usize, batch: &[Draft], ids: &[String]) -> ExpectedAppend {
        let policy = self.policy(channel).clone();
        let now = self.now;
        let state = self.channels.get(&channel).cloned().unwrap_or_default();
        let mut in_batch: BTreeMap<usize, (u64, u8, Option<u64>)> = BTreeMap::new();
        let mut replies = Vec::new();
        let mut next_serial = state.top;
        let mut accepted = Vec::new();
        for (draft, id) in batch.iter().zip(ids) {
            if let Some(ttl) = draft.ttl_ms
                && (ttl < policy.ttl_min_ms || ttl > policy.ttl_max_ms)
            {
                return ExpectedAppend::InvalidTtl;
            }
            let earlier = in_batch
                .get(&draft.id)
                .map(|&(serial, variant, ttl)| (serial, variant, ttl, false))
                .or_else(|| {
                    state.ids.get(&draft.id).map(|(serial, _)| {
                        let message = &state.messages[serial];
                        (*serial, message.variant, message.ttl_ms, true)
                    })
                });
            if let Some((serial, variant, ttl, stored)) = earlier {
                if (variant, ttl) != (draft.variant, draft.ttl_ms) {
                    return ExpectedAppend::Conflict {
                        id: id.clone(),
                        stored: stored.then_some(serial),
                    };
                }
                replies.push((id.clone(), serial, true));
                continue;
            }
            next_serial += 1;
            in_batch.insert(draft.id, (next_serial, draft.variant, draft.ttl_ms));
            replies.push((id.clone(), next_serial, false));
            accepted.push((next_serial, draft, id));
        }
        let state = self.channels.entry(channel).or_default();
        let time = now.max(state.last_time);
        for (serial, draft, id) in accepted {
            state.messages.insert(
                serial,
                ModelMessage {
                    id: id.clone(),
                    variant: draft.variant,
                    ttl_ms: draft.ttl_ms,
                    time,
                    size_bytes: content_size(draft.variant),
                },
            );
            state.ids.insert(draft.id, (serial, time));
            state.top = serial;
            state.last_time = time;
        }
        ExpectedAppend::Accepted(replies)
    }

    fn read_forward(
        &self,
        channel: usize,
        after: Cursor,
        limit: usize,
    ) -> Result<ExpectedPage, ExpectedLost> {
        let Some(state) = self.channels.get(&channel) else {
            return match after {
                Cursor::Edge => Ok(ExpectedPage {
                    serials: Vec::new(),
                    skipped: Vec::new(),
                    next: None,
                    top: None,
                    more: false,
                }),
                _ => Err(self.lost(channel, ContinuityReason::EpochChanged)),
            };
        };
        let first = self.first_retained(channel);
        let start = match after {
            Cursor::Edge => first,
            Cursor::Foreign(_) => return Err(self.lost(channel, ContinuityReason::EpochChanged)),
            Cursor::At(serial) if serial > state.top => {
                return Err(self.lost(channel, ContinuityReason::AheadOfTop));
            }
            Cursor::At(serial) if serial + 1 < first => {
                return Err(self.lost(channel, ContinuityReason::Retention));
            }
            Cursor::At(serial) => (serial + 1).max(first),
        };
        let mut page = ExpectedPage {
            serials: Vec::new(),
            skipped: Vec::new(),
            next: None,
            top: Some(state.top),
            more: false,
        };
        let mut serial = start;
        while serial <= state.top && page.serials.len() < limit {
            if state.messages[&serial].expired(self.now) {
                match page.skipped.last_mut() {
                    Some(range) if range.1 + 1 == serial => range.1 = serial,
                    _ => page.skipped.push((serial, serial)),
                }
            } else {
                page.serials.push(serial);
            }
            serial += 1;
        }
        let last_scanned = serial - 1;
        page.next = Some(match after {
            Cursor::At(after) => last_scanned.max(after),
            _ => last_scanned,
        });
        page.more = serial <= state.top;
        Ok(page)
    }

    fn read_backward(
        &self,
        channel: usize,
        before: Cursor,
        limit: usize,
    ) -> Result<ExpectedPage, ExpectedLost> {
        let Some(state) = self.channels.get(&channel) else {
            return Err(self.lost(channel, ContinuityReason::EpochChanged));
        };
        let before = match before {
            Cursor::Edge => state.top + 1,
            Cursor::Foreign(_) => return Err(self.lost(channel, ContinuityReason::EpochChanged)),
            Cursor::At(serial) if serial > state.top + 1 => {
                return Err(self.lost(channel, ContinuityReason::AheadOfTop));
            }
            Cursor::At(serial) => serial,
        };
        let first = self.first_retained(channel);
        let mut page = ExpectedPage {
            serials: Vec::new(),
            skipped: Vec::new(),
            next: None,
            top: Some(state.top),
            more: false,
        };
        let mut serial = before;
        while serial > first && page.serials.len() < limit {
            serial -= 1;
            if state.messages[&serial].expired(self.now) {
                match page.skipped.last_mut() {
                    Some(range) if serial + 1 == range.0 => range.0 = serial,
                    _ => page.skipped.push((serial, serial)),
                }
            } else {
                page.serials.push(serial);
            }
        }
        page.more = serial > first;
        page.next = Some(serial);
        Ok(page)
    }

    fn by_id(&self, channel: usize, slot: usize) -> Option<u64> {
        let state = self.channels.get(&channel)?;
        let (serial, _) = *state.ids.get(&slot)?;
        let message = state.messages.get(&serial)?;
        (serial >= self.first_retained(channel) && !message.expired(self.now)).then_some(serial)
    }

    /// `(first_available, top, messages, bytes)`.
    fn status(&self, channel: usize) -> Option<(Option<u64>, u64, u64, u64)> {
        let state = self.channels.get(&channel)?;
        let live: Vec<&ModelMessage> = state
            .messages
            .range(self.first_retained(channel)..)
            .map(|(_, message)| message)
            .filter(|message| !message.expired(self.now))
            .collect();
        Some((
            self.first_available(channel),
            state.top,
            live.len() as u64,
            live.iter().map(|message| message.size_bytes).sum(),
        ))
    }

    /// Drops, per channel, the longest run of oldest messages that are out of retention or
    /// expired, and past the dedupe window.
    fn reclaim(&mut self) -> usize {
        let mut dropped = 0;
        let channels: Vec<usize> = self.channels.keys().copied().collect();
        for channel in channels {
            let first = self.first_retained(channel);
            let window = self.policy(channel).dedupe_window_ms();
            let now = self.now;
            let state = self.channels.get_mut(&channel).unwrap();
            let dead: Vec<u64> = state
                .messages
                .iter()
                .take_while(|(serial, message)| {
                    message.time + window <= now && (**serial < first || message.expired(now))
                })
                .map(|(serial, _)| *serial)
                .collect();
            for serial in dead {
                state.messages.remove(&serial);
                dropped += 1;
            }
        }
        dropped
    }
}

fn cursor_strategy(top: u64) -> BoxedStrategy<Cursor> {
    prop_oneof![
        2 => Just(Cursor::Edge),
        6 => (0..=top + 2).prop_map(Cursor::At),
        1 => (0..=top + 1).prop_map(Cursor::Foreign),
    ]
    .boxed()
}

struct LogModel;

impl ReferenceStateMachine for LogModel {
    type State = Model;
    type Transition = Operation;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::new()).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Operation> {
        let tops: Vec<u64> = (0..CHANNELS.len())
            .map(|channel| state.channels.get(&channel).map_or(0, |state| state.top))
            .collect();
        let draft = (0..ID_POOL, 0u8..4, prop::sample::select(TTLS.to_vec())).prop_map(
            |(id, variant, ttl_ms)| Draft {
                id,
                variant,
                ttl_ms,
            },
        );
        let channel = 0..CHANNELS.len();
        let read_forward = channel.clone().prop_flat_map(move |channel| {
            (cursor_strategy(tops[channel]), 1usize..=5).prop_map(move |(after, limit)| {
                Operation::ReadForward {
                    channel,
                    after,
                    limit,
                }
            })
        });
        let tops: Vec<u64> = (0..CHANNELS.len())
            .map(|channel| state.channels.get(&channel).map_or(0, |state| state.top))
            .collect();
        let read_backward = channel.clone().prop_flat_map(move |channel| {
            (cursor_strategy(tops[channel]), 1usize..=5).prop_map(move |(before, limit)| {
                Operation::ReadBackward {
                    channel,
                    before,
                    limit,
                }
            })
        });
        prop_oneof![
            8 => (channel.clone(), prop::collection::vec(draft, 1..=4))
                .prop_map(|(channel, batch)| Operation::Append { channel, batch }),
            4 => read_forward,
            2 => read_backward,
            2 => (channel.clone(), 0..ID_POOL)
                .prop_map(|(channel, id)| Operation::ById { channel, id }),
            1 => channel.clone().prop_map(|channel| Operation::Status { channel }),
            3 => prop::sample::select(CLOCK_STEPS_MS.to_vec())
                .prop_map(|ms| Operation::AdvanceClock { ms }),
            2 => (channel.clone(), 0..SUBSCRIBER_POOL, 0u64..1_000).prop_map(
                |(channel, slot, version)| Operation::SaveSubscriber { channel, slot, version }
            ),
            1 => (channel, 0..SUBSCRIBER_POOL)
                .prop_map(|(channel, slot)| Operation::RemoveSubscriber { channel, slot }),
            2 => (0..STATE_KEYS.len(), 0u64..1_000)
                .prop_map(|(key, version)| Operation::SaveState { key, version }),
            1 => (0..STATE_KEYS.len()).prop_map(|key| Operation::RemoveState { key }),
            2 => Just(Operation::Restart),
            2 => Just(Operation::Reclaim),
        ]
        .boxed()
    }

    fn apply(mut state: Model, operation: &Operation) -> Model {
        state.last_append = None;
        match operation {
            Operation::Append { channel, batch } => {
                let ids = state.assign_ids(*channel, batch);
                let expected = state.append(*channel, batch, &ids);
                state.last_append = Some((ids, expected));
            }
            Operation::AdvanceClock { ms } => state.now += ms,
            Operation::Reclaim => {
                state.last_reclaim = state.reclaim();
                state.reclaimed_total += state.last_reclaim;
            }
            Operation::SaveSubscriber {
                channel,
                slot,
                version,
            } => {
                state.subscribers.insert((*channel, *slot), *version);
            }
            Operation::RemoveSubscriber { channel, slot } => {
                state.subscribers.remove(&(*channel, *slot));
            }
            Operation::SaveState { key, version } => {
                state.states.insert(STATE_KEYS[*key], *version);
            }
            Operation::RemoveState { key } => {
                state.states.remove(STATE_KEYS[*key]);
            }
            Operation::ReadForward { .. }
            | Operation::ReadBackward { .. }
            | Operation::ById { .. }
            | Operation::Status { .. }
            | Operation::Restart => {}
        }
        state
    }
}

// ----- the system under test -----------------------------------------------------------------

struct Sut<H: Harness> {
    harness: H,
    clock: Arc<ManualClock>,
    /// Each channel's epoch, learned from its first ack.
    epochs: BTreeMap<usize, Epoch>,
    /// Every chain value seen, so a message reads back with the same chain every time.
    chains: BTreeMap<(usize, u64), ChainHash>,
    reclaimed_total: usize,
}

impl<H: Harness> Sut<H> {
    fn store(&self) -> &H::Store {
        self.harness.store()
    }

    fn position(&self, channel: usize, cursor: Cursor) -> Option<Position> {
        let epoch = self
            .epochs
            .get(&channel)
            .cloned()
            .unwrap_or_else(|| Epoch::parse("never-assigned").unwrap());
        match cursor {
            Cursor::Edge => None,
            Cursor::At(serial) => Some(Position::new(epoch, Serial(serial))),
            Cursor::Foreign(serial) => Some(Position::new(
                Epoch::parse("foreign-epoch").unwrap(),
                Serial(serial),
            )),
        }
    }

    fn check_lost(&self, channel: usize, actual: &ReadError, expected: &ExpectedLost) {
        let ReadError::ContinuityLost(lost) = actual else {
            panic!("expected continuity_lost, got {actual:?}");
        };
        let at = |serial: Option<u64>| {
            serial.map(|serial| Position::new(self.epochs[&channel].clone(), Serial(serial)))
        };
        assert_eq!(lost.reason, expected.reason, "{lost:?}");
        assert_eq!(
            lost.first_available,
            at(expected.first_available),
            "{lost:?}"
        );
        assert_eq!(lost.top, at(expected.top), "{lost:?}");
    }

    /// Compares a message read from the store with the model, and checks its chain.
    fn check_message(&mut self, channel: usize, model: &Model, message: &Message) {
        let expected = &model.channels[&channel].messages[&message.serial.0];
        let (name, data) = content(expected.variant);
        assert_eq!(message.channel.as_str(), CHANNELS[channel]);
        assert_eq!(&message.epoch, &self.epochs[&channel]);
        assert_eq!(message.id.as_str(), expected.id);
        assert_eq!(message.name, name);
        assert_eq!(message.data, data);
        assert_eq!(message.ttl_ms, expected.ttl_ms);
        assert_eq!(message.time, Timestamp(expected.time));
        assert!(message.headers.is_empty());
        if message.serial.0 == 1 {
            let genesis = ChainHash::genesis(&message.epoch);
            assert_eq!(
                message.chain,
                genesis.next(message.serial, &message.id, &message.data)
            );
        }
        if let Some(previous) = self.chains.get(&(channel, message.serial.0 - 1)) {
            assert_eq!(
                message.chain,
                previous.next(message.serial, &message.id, &message.data),
                "chain link into serial {}",
                message.serial
            );
        }
        let seen = self
            .chains
            .entry((channel, message.serial.0))
            .or_insert(message.chain);
        assert_eq!(
            *seen, message.chain,
            "serial {} changed its chain",
            message.serial
        );
    }

    fn check_page(
        &mut self,
        channel: usize,
        model: &Model,
        actual: Result<ReadPage, ReadError>,
        expected: Result<ExpectedPage, ExpectedLost>,
    ) {
        let page = match (actual, expected) {
            (Err(actual), Err(expected)) => return self.check_lost(channel, &actual, &expected),
            (Ok(page), Ok(expected)) => {
                let at = |serial: Option<u64>| {
                    serial
                        .map(|serial| Position::new(self.epochs[&channel].clone(), Serial(serial)))
                };
                let actual_serials: Vec<u64> = page.messages.iter().map(|m| m.serial.0).collect();
                assert_eq!(actual_serials, expected.serials, "page messages");
                let skipped: Vec<(u64, u64)> = page
                    .skipped
                    .iter()
                    .map(|range| {
                        assert_eq!(range.reason, SkipReason::Expired);
                        (range.from.0, range.to.0)
                    })
                    .collect();
                assert_eq!(skipped, expected.skipped, "skipped ranges");
                assert_eq!(page.next, at(expected.next), "next cursor");
                assert_eq!(page.top, at(expected.top), "top");
                assert_eq!(page.more, expected.more, "more");
                page
            }
            (actual, expected) => panic!("store answered {actual:?}, model expects {expected:?}"),
        };
        for message in &page.messages {
            self.check_message(channel, model, message);
        }
    }
}

struct ModelTest<H>(PhantomData<H>);

impl<H: Harness> StateMachineTest for ModelTest<H> {
    type SystemUnderTest = Sut<H>;
    type Reference = LogModel;

    fn init_test(model: &Model) -> Sut<H> {
        let clock = Arc::new(ManualClock::new(Timestamp(model.now)));
        Sut {
            harness: H::open(POLICIES.clone(), clock.clone()),
            clock,
            epochs: BTreeMap::new(),
            chains: BTreeMap::new(),
            reclaimed_total: 0,
        }
    }

    fn apply(mut sut: Sut<H>, model: &Model, operation: Operation) -> Sut<H> {
        match operation {
            Operation::Append { channel, batch } => {
                let (ids, expected) = model
                    .last_append
                    .clone()
                    .expect("append has an expectation");
                let messages = batch
                    .iter()
                    .zip(&ids)
                    .map(|(draft, id)| new_message(id, draft.variant, draft.ttl_ms))
                    .collect();
                let actual = append(sut.store(), &common::channel(CHANNELS[channel]), messages);
                match (actual, expected) {
                    (Ok(acks), ExpectedAppend::Accepted(replies)) => {
                        let epoch = sut
                            .epochs
                            .entry(channel)
                            .or_insert_with(|| acks[0].position.epoch.clone())
                            .clone();
                        let actual: Vec<(String, Position, bool)> = acks
                            .into_iter()
                            .map(|ack| (ack.id.to_string(), ack.position, ack.duplicate))
                            .collect();
                        let expected: Vec<(String, Position, bool)> = replies
                            .into_iter()
                            .map(|(id, serial, duplicate)| {
                                (id, Position::new(epoch.clone(), Serial(serial)), duplicate)
                            })
                            .collect();
                        assert_eq!(actual, expected, "acks");
                    }
                    (
                        Err(AppendError::IdConflict { id, position }),
                        ExpectedAppend::Conflict {
                            id: expected_id,
                            stored,
                        },
                    ) => {
                        assert_eq!(id.as_str(), expected_id);
                        if let Some(serial) = stored {
                            assert_eq!(
                                position,
                                Position::new(sut.epochs[&channel].clone(), Serial(serial))
                            );
                        }
                    }
                    (Err(AppendError::Invalid(invalid)), ExpectedAppend::InvalidTtl) => {
                        assert_eq!(invalid.code, ErrorCode::InvalidTtl);
                    }
                    (actual, expected) => {
                        panic!("store answered {actual:?}, model expects {expected:?}")
                    }
                }
            }
            Operation::ReadForward {
                channel,
                after,
                limit,
            } => {
                let from = match sut.position(channel, after) {
                    None => ReadFrom::Oldest,
                    Some(position) => ReadFrom::After(position),
                };
                let actual = forward(
                    sut.store(),
                    &common::channel(CHANNELS[channel]),
                    from,
                    limit,
                );
                let expected = model.read_forward(channel, after, limit);
                sut.check_page(channel, model, actual, expected);
            }
            Operation::ReadBackward {
                channel,
                before,
                limit,
            } => {
                let position = sut.position(channel, before).unwrap_or_else(|| {
                    let top = model.channels.get(&channel).map_or(0, |state| state.top);
                    sut.position(channel, Cursor::At(top + 1)).unwrap()
                });
                let actual = backward(
                    sut.store(),
                    &common::channel(CHANNELS[channel]),
                    position,
                    limit,
                );
                let expected = model.read_backward(channel, before, limit);
                sut.check_page(channel, model, actual, expected);
            }
            Operation::ById { channel, id } => {
                let found = sut
                    .store()
                    .message_by_id(
                        &common::channel(CHANNELS[channel]),
                        &herald_core::MessageId::parse(&model.id_of(channel, id)).unwrap(),
                    )
                    .expect("lookup works");
                let expected = model.by_id(channel, id);
                assert_eq!(
                    found.as_ref().map(|message| message.serial.0),
                    expected,
                    "by id"
                );
                if let Some(message) = found {
                    sut.check_message(channel, model, &message);
                }
            }
            Operation::Status { channel } => {
                let status = sut
                    .store()
                    .channel_status(&common::channel(CHANNELS[channel]))
                    .expect("status works");
                let expected = model.status(channel);
                match (status, expected) {
                    (None, None) => {}
                    (Some(status), Some((first, top, messages, bytes))) => {
                        let epoch = &sut.epochs[&channel];
                        assert_eq!(&status.epoch, epoch);
                        assert_eq!(
                            status.first,
                            first.map(|serial| Position::new(epoch.clone(), Serial(serial)))
                        );
                        assert_eq!(status.top, Position::new(epoch.clone(), Serial(top)));
                        assert_eq!((status.messages, status.bytes), (messages, bytes));
                    }
                    (status, expected) => panic!("status {status:?}, model expects {expected:?}"),
                }
            }
            Operation::AdvanceClock { ms } => sut.clock.advance_ms(ms),
            Operation::SaveSubscriber {
                channel,
                slot,
                version,
            } => sut
                .store()
                .save_subscriber(model_subscriber(channel, slot, version))
                .wait()
                .expect("save acknowledged"),
            Operation::RemoveSubscriber { channel, slot } => sut
                .store()
                .remove_subscriber(
                    &common::channel(CHANNELS[channel]),
                    &subscriber_id(&format!("sub-{slot}")),
                )
                .wait()
                .expect("removal acknowledged"),
            Operation::SaveState { key, version } => sut
                .store()
                .save_state(STATE_KEYS[key], model_state_value(version))
                .wait()
                .expect("state save acknowledged"),
            Operation::RemoveState { key } => sut
                .store()
                .remove_state(STATE_KEYS[key])
                .wait()
                .expect("state removal acknowledged"),
            Operation::Restart => sut.harness.restart(),
            Operation::Reclaim => {
                let dropped = sut.store().reclaim().expect("reclaim works");
                sut.reclaimed_total += dropped;
                if H::reclaim_is_exact() {
                    assert_eq!(dropped, model.last_reclaim, "reclaimed messages");
                } else {
                    // Whole segments only, possibly later than the model: never more in total
                    // than what was reclaimable.
                    assert!(
                        sut.reclaimed_total <= model.reclaimed_total,
                        "reclaimed {} messages in all, at most {} were reclaimable",
                        sut.reclaimed_total,
                        model.reclaimed_total
                    );
                }
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut<H>, model: &Model) {
        assert_eq!(sut.clock.now(), Timestamp(model.now));
        assert_eq!(sut.store().health(), StoreHealth::Ok);
        let mut expected: Vec<herald_core::SubscriberState> = model
            .subscribers
            .iter()
            .map(|(&(channel, slot), &version)| model_subscriber(channel, slot, version))
            .collect();
        expected.sort_by(|a, b| (&a.channel, &a.id).cmp(&(&b.channel, &b.id)));
        assert_eq!(sut.store().subscribers(), expected, "durable subscribers");
        let expected_states = |prefix: &str| -> Vec<(String, Bytes)> {
            model
                .states
                .iter()
                .filter(|(key, _)| key.starts_with(prefix))
                .map(|(key, &version)| (key.to_string(), model_state_value(version)))
                .collect()
        };
        assert_eq!(sut.store().states(""), expected_states(""), "state records");
        assert_eq!(
            sut.store().states("s/a"),
            expected_states("s/a"),
            "prefix s/a"
        );
    }
}

/// Case count: `PROPTEST_CASES` when set, else `default`.
fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        ..Config::default()
    }
}

prop_state_machine! {
    #![proptest_config(config(512))]

    #[test]
    fn memory_store_matches_model(sequential 1..100 => ModelTest<MemoryHarness>);
}

prop_state_machine! {
    // Real files and a real fsync per append: fewer cases.
    #![proptest_config(config(64))]

    #[test]
    fn embedded_log_matches_model(sequential 1..100 => ModelTest<EmbeddedHarness>);
}
