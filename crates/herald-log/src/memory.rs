//! [`MemoryStore`]: the in-memory log store, for tests and `storage.backend = "memory"`.
//!
//! Appends are "durable" as soon as they are in the store's record image. The image is what
//! survives [`MemoryStore::crash_and_recover`], which rebuilds every index from it through
//! the same recovery steps as the embedded log. Subscriber snapshots are durable once saved
//! and kept, newest per (channel, id), in a [`SubscriberTable`] that is part of the image;
//! state records likewise, newest per key, in a [`StateTable`].
//! Faults can be injected with [`MemoryStore::fail_next_append`] and
//! [`MemoryStore::fail_after_appends`]; they count subscriber and state saves and removals as
//! writes too.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use herald_core::{
    ChannelName, Message, MessageId, NewMessage, Policies, StreamStatus, SubscriberId,
    SubscriberState,
};

use crate::clock::Clock;
use crate::states::{StateChange, StateTable};
use crate::store::{
    AppendError, AppendTicket, LogStore, ReadError, ReadPage, ReadQuery, SaveTicket, StoreError,
    StoreHealth,
};
use crate::subscribers::{SubscriberChange, SubscriberTable};
use crate::table::{ChannelTable, ChannelTip, fetch_page};

/// What the memory store keeps as its "disk".
#[derive(Clone, Debug)]
pub enum MemoryRecord {
    Message(Arc<Message>),
    Tip(ChannelTip),
}

pub struct MemoryStore {
    state: RwLock<State>,
    policies: Policies,
    clock: Arc<dyn Clock>,
}

struct State {
    table: ChannelTable<Arc<Message>>,
    image: Vec<MemoryRecord>,
    /// Durable subscriber snapshots: both the index and part of the image (a save replaces
    /// the previous snapshot in place, so the image holds one per live subscriber).
    subscribers: SubscriberTable<()>,
    /// Durable state records, like `subscribers`: the index and part of the image.
    states: StateTable<()>,
    poisoned: Option<String>,
    /// Appends still accepted before an injected failure, and the failure's reason.
    fail_after: Option<(u64, String)>,
    /// Counters since this store was created (not carried across `crash_and_recover`).
    stats: crate::store::StoreStats,
    listener: Option<Arc<dyn crate::store::DurableListener>>,
}

impl MemoryStore {
    pub fn new(policies: Policies, clock: Arc<dyn Clock>) -> Self {
        Self::from_image(
            Vec::new(),
            SubscriberTable::default(),
            StateTable::default(),
            policies,
            clock,
        )
        .expect("an empty image is valid")
    }

    fn from_image(
        image: Vec<MemoryRecord>,
        subscribers: SubscriberTable<()>,
        states: StateTable<()>,
        policies: Policies,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let mut table = ChannelTable::default();
        for (index, record) in image.iter().enumerate() {
            let result = match record {
                MemoryRecord::Message(message) => table.recover_message(message, message.clone()),
                MemoryRecord::Tip(tip) => table.recover_tip(tip),
            };
            result.map_err(|detail| StoreError::Corrupt {
                path: "memory".into(),
                offset: index as u64,
                detail,
            })?;
        }
        Ok(Self {
            state: RwLock::new(State {
                table,
                image,
                subscribers,
                states,
                poisoned: None,
                fail_after: None,
                stats: crate::store::StoreStats::default(),
                listener: None,
            }),
            policies,
            clock,
        })
    }

    /// Simulates a crash and restart: a new store rebuilt from what was durable.
    pub fn crash_and_recover(&self) -> Result<MemoryStore, StoreError> {
        let (image, subscribers, states) = {
            let state = self.read_state();
            (
                state.image.clone(),
                state.subscribers.clone(),
                state.states.clone(),
            )
        };
        Self::from_image(
            image,
            subscribers,
            states,
            self.policies.clone(),
            self.clock.clone(),
        )
    }

    /// Makes the next append fail as a failed fsync would: the store is poisoned.
    pub fn fail_next_append(&self, reason: &str) {
        self.fail_after_appends(0, reason);
    }

    /// Accepts `appends` more writes (appends, subscriber and state saves and removals), then
    /// fails every
    /// later one as a lost disk would: the store is poisoned and only
    /// [`MemoryStore::crash_and_recover`] brings it back.
    pub fn fail_after_appends(&self, appends: u64, reason: &str) {
        self.write_state().fail_after = Some((appends, reason.to_owned()));
    }

    /// Drops messages that are out of retention (or expired) and past the dedupe window,
    /// preserving each emptied channel's tip. Returns how many messages were dropped.
    fn reclaim_now(&self) -> usize {
        let now = self.clock.now();
        let mut state = self.write_state();
        let state = &mut *state;
        let mut dropped = 0;
        let mut tips = Vec::new();
        for stream in state.table.streams_mut() {
            let policy = self.policies.for_channel(stream.channel()).clone();
            let reclaimable: Vec<bool> = {
                let mut flags = Vec::new();
                let mut serial = stream.first_entry().map(|(serial, _)| serial);
                while let Some(current) = serial {
                    match stream.entry(current) {
                        Some(entry) => {
                            flags.push(stream.is_reclaimable(current, entry, &policy, now));
                            serial = Some(current.next());
                        }
                        None => serial = None,
                    }
                }
                flags
            };
            let mut flags = reclaimable.into_iter();
            let count = stream.drop_front_while(|_, _| flags.next().unwrap_or(false));
            if count > 0 {
                dropped += count;
                if stream.entry_count() == 0 {
                    tips.push(ChannelTip::of(stream));
                }
            }
        }
        if dropped > 0 {
            let table = &state.table;
            state.image.retain(|record| match record {
                MemoryRecord::Message(message) => table
                    .get(&message.channel)
                    .and_then(|stream| stream.entry(message.serial))
                    .is_some(),
                // A newer tip of the same channel replaces this one, so the image stays
                // bounded by one tip per channel however often a channel empties.
                MemoryRecord::Tip(old) => !tips.iter().any(|tip| tip.channel == old.channel),
            });
            state.image.extend(tips.into_iter().map(MemoryRecord::Tip));
        }
        dropped
    }

    /// Applies a subscriber change as one write (fault injection counts it like an append).
    fn change_subscriber(&self, change: SubscriberChange) -> SaveTicket {
        let mut state = self.write_state();
        if let Err(error) = state.take_write() {
            return SaveTicket::ready(Err(error));
        }
        state.subscribers.apply(change, ());
        state.stats.subscriber_saves += 1;
        SaveTicket::ready(Ok(()))
    }

    /// Applies a state-record change as one write (fault injection counts it like an append).
    /// A bad key or value is refused before it counts as a write: nothing is stored.
    fn change_state(&self, change: StateChange) -> SaveTicket {
        if let Err(invalid) = change.check() {
            return SaveTicket::ready(Err(AppendError::Invalid(invalid)));
        }
        let mut state = self.write_state();
        if let Err(error) = state.take_write() {
            return SaveTicket::ready(Err(error));
        }
        state.states.apply(change, ());
        state.stats.state_saves += 1;
        SaveTicket::ready(Ok(()))
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl State {
    /// Counts one write against an injected failure; refuses it once the store is poisoned.
    fn take_write(&mut self) -> Result<(), AppendError> {
        match self.fail_after.take() {
            Some((0, reason)) => self.poisoned = Some(reason),
            Some((remaining, reason)) => self.fail_after = Some((remaining - 1, reason)),
            None => {}
        }
        match &self.poisoned {
            Some(reason) => Err(AppendError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }
}

impl LogStore for MemoryStore {
    fn append(&self, channel: ChannelName, batch: Vec<NewMessage>) -> AppendTicket {
        let now = self.clock.now();
        let mut state = self.write_state();
        if let Err(error) = state.take_write() {
            return AppendTicket::ready(Err(error));
        }
        let sequenced = state
            .table
            .sequence(&channel, &batch, &self.policies, now, |message| {
                Arc::new(message.clone())
            });
        let sequenced = match sequenced {
            Ok(sequenced) => sequenced,
            Err(error) => return AppendTicket::ready(Err(error)),
        };
        let mut top = None;
        for message in &sequenced.new_messages {
            let stored = state
                .table
                .get(&channel)
                .and_then(|stream| stream.entry(message.serial))
                .expect("just pushed")
                .locator
                .clone();
            state.image.push(MemoryRecord::Message(stored));
            state.stats.messages += 1;
            state.stats.bytes += message.size_bytes() as u64;
            top = Some(message.serial);
        }
        state.stats.appends += 1;
        if let Some(top) = top {
            state
                .table
                .get_mut(&channel)
                .expect("stream exists")
                .mark_durable(top);
        }
        // Still under the write lock: listeners hear appends in serial order.
        if let Some(listener) = &state.listener
            && !sequenced.new_messages.is_empty()
        {
            listener.on_durable(&sequenced.new_messages);
        }
        AppendTicket::ready(Ok(sequenced.replies))
    }

    fn read(&self, channel: &ChannelName, query: &ReadQuery) -> Result<ReadPage, ReadError> {
        let now = self.clock.now();
        let state = self.read_state();
        let plan = state
            .table
            .plan_read(channel, query, &self.policies, now)
            .map_err(ReadError::ContinuityLost)?;
        fetch_page(plan, |message| Ok(Message::clone(message)))
    }

    fn message_by_id(
        &self,
        channel: &ChannelName,
        id: &MessageId,
    ) -> Result<Option<Message>, StoreError> {
        let now = self.clock.now();
        let state = self.read_state();
        Ok(state
            .table
            .find_by_id(channel, id, &self.policies, now)
            .map(|message| Message::clone(&message)))
    }

    fn channel_status(&self, channel: &ChannelName) -> Result<Option<StreamStatus>, StoreError> {
        let now = self.clock.now();
        Ok(self.read_state().table.status(channel, &self.policies, now))
    }

    fn health(&self) -> StoreHealth {
        match &self.read_state().poisoned {
            Some(reason) => StoreHealth::Poisoned(reason.clone()),
            None => StoreHealth::Ok,
        }
    }

    fn policies(&self) -> &Policies {
        &self.policies
    }

    fn reclaim(&self) -> Result<usize, StoreError> {
        Ok(self.reclaim_now())
    }

    fn stats(&self) -> crate::store::StoreStats {
        self.read_state().stats
    }

    fn set_durable_listener(&self, listener: Arc<dyn crate::store::DurableListener>) {
        self.write_state().listener = Some(listener);
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
        self.read_state()
            .subscribers
            .get(channel, id)
            .map(|stored| stored.state.clone())
    }

    fn subscribers(&self) -> Vec<SubscriberState> {
        self.read_state().subscribers.states()
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
        self.read_state()
            .states
            .get(key)
            .map(|stored| stored.value.clone())
    }

    fn states(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.read_state().states.with_prefix(prefix)
    }

    fn channels(&self) -> Vec<ChannelName> {
        self.read_state()
            .table
            .streams()
            .map(|stream| stream.channel().clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use herald_core::{
        ChannelName, Data, MessageId, NewMessage, Policies, Position, ReadFrom, Serial, Timestamp,
    };

    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{LogStore, ReadQuery};

    fn message(id: &str) -> NewMessage {
        NewMessage {
            id: MessageId::parse(id).unwrap(),
            name: None,
            headers: BTreeMap::new(),
            data: Data::Json(Bytes::from_static(b"1")),
            ttl_ms: None,
        }
    }

    /// A channel that keeps emptying and refilling leaves one tip in the image, not one per
    /// reclaim, and still recovers to the right top.
    #[test]
    fn repeated_reclaims_keep_one_tip_per_channel() {
        let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
        let mut policies = Policies::default();
        policies.default.retention.max_age_ms = 1_000;
        let store = MemoryStore::new(policies, clock.clone());
        let room = ChannelName::parse("room").unwrap();
        for round in 0..5 {
            store
                .append(room.clone(), vec![message(&format!("m{round}"))])
                .wait()
                .unwrap();
            clock.advance_ms(store.policies().default.dedupe_window_ms() + 1);
            assert_eq!(store.reclaim().unwrap(), 1);
        }
        let image = store.read_state().image.clone();
        assert_eq!(image.len(), 1, "{image:?}");
        let recovered = store.crash_and_recover().unwrap();
        let ack = recovered
            .append(room.clone(), vec![message("next")])
            .wait()
            .unwrap();
        assert_eq!(ack[0].position.serial, Serial(6));
        let page = recovered
            .read(
                &room,
                &ReadQuery::Forward {
                    from: ReadFrom::After(Position::new(ack[0].position.epoch.clone(), Serial(5))),
                    limit: 10,
                },
            )
            .unwrap();
        assert_eq!(page.messages.len(), 1);
    }
}
