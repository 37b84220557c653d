//! [`SubscriberTable`]: the durable subscriber snapshots a store holds, newest per
//! (channel, subscriber id), shared by every store.
//!
//! A store changes the table only once a change is durable (after the sync that covers its
//! record), so readers never see a snapshot a crash could take back. On open, a store rebuilds
//! the table by replaying its records in log order with [`SubscriberTable::recover_snapshot`]
//! and [`SubscriberTable::recover_removal`]: the newest snapshot wins, a removal drops it.
//!
//! # Invariants
//! - At most one entry per (channel, id): the newest durable snapshot, with where it lives
//!   (`L`: the segment number for the embedded log, `()` for the memory store).
//! - Iteration is in (channel, id) order, never a hash order.

use std::collections::BTreeMap;

use herald_core::{ChannelName, SubscriberId, SubscriberState};

/// A change to one subscriber's durable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriberChange {
    /// The new snapshot, replacing any earlier one of the same (channel, id).
    Save(SubscriberState),
    /// The subscriber is gone (a tombstone).
    Remove {
        channel: ChannelName,
        id: SubscriberId,
    },
}

impl SubscriberChange {
    pub fn key(&self) -> (&ChannelName, &SubscriberId) {
        match self {
            SubscriberChange::Save(state) => (&state.channel, &state.id),
            SubscriberChange::Remove { channel, id } => (channel, id),
        }
    }
}

/// A live snapshot and where it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSubscriber<L> {
    pub state: SubscriberState,
    pub locator: L,
}

/// The newest durable snapshot of every subscriber. See the module docs.
#[derive(Clone, Debug)]
pub struct SubscriberTable<L> {
    entries: BTreeMap<(ChannelName, SubscriberId), StoredSubscriber<L>>,
}

impl<L> Default for SubscriberTable<L> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<L: Clone> SubscriberTable<L> {
    /// Applies a durable change: a save replaces, a removal drops.
    pub fn apply(&mut self, change: SubscriberChange, locator: L) {
        match change {
            SubscriberChange::Save(state) => {
                self.entries.insert(
                    (state.channel.clone(), state.id.clone()),
                    StoredSubscriber { state, locator },
                );
            }
            SubscriberChange::Remove { channel, id } => {
                self.entries.remove(&(channel, id));
            }
        }
    }

    /// Rebuild step: a snapshot record, in log order (a later one replaces an earlier one).
    pub fn recover_snapshot(&mut self, state: SubscriberState, locator: L) {
        self.apply(SubscriberChange::Save(state), locator);
    }

    /// Rebuild step: a tombstone, in log order.
    pub fn recover_removal(&mut self, channel: ChannelName, id: SubscriberId) {
        self.entries.remove(&(channel, id));
    }

    pub fn get(&self, channel: &ChannelName, id: &SubscriberId) -> Option<&StoredSubscriber<L>> {
        // The key is owned; a lookup by borrowed parts would need a custom Borrow impl for a
        // tuple, so clone the two cheap `Arc<str>` handles instead.
        self.entries.get(&(channel.clone(), id.clone()))
    }

    /// Moves a snapshot to a new location (reclaim rewrote it there).
    pub fn relocate(&mut self, channel: &ChannelName, id: &SubscriberId, locator: L) {
        if let Some(entry) = self.entries.get_mut(&(channel.clone(), id.clone())) {
            entry.locator = locator;
        }
    }

    /// Every live snapshot, in (channel, id) order.
    pub fn iter(&self) -> impl Iterator<Item = &StoredSubscriber<L>> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every live state, in (channel, id) order.
    pub fn states(&self) -> Vec<SubscriberState> {
        self.entries
            .values()
            .map(|entry| entry.state.clone())
            .collect()
    }
}
