//! Who holds each durable subscriber right now, and the fence that keeps two holders from
//! overwriting each other's state.
//!
//! Every party that reads or writes a subscriber's stored state (a connection's pump, a
//! webhook worker, `DELETE`, the idle sweeper) first takes a [`Claim`] on its
//! (channel, subscriber id). Taking a claim evicts the current holder (it is told why, and a
//! connection is closed with 4004) and then waits until that holder has released its claim:
//! a pump releases only after its last snapshot is durable. So the new holder always reads the
//! newest state, and an old snapshot can never land on top of a newer one.
//!
//! # Invariants
//! - At most one live claim per key; the registry entry is the newest claimant's.
//! - A claim is released when dropped (also when its task is aborted).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use herald_core::{ChannelName, SubscriberId};
use tokio::sync::{oneshot, watch};

/// Why a holder loses its subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Another connection subscribed with the same id.
    TakenOver,
    /// `DELETE /v1/channels/{channel}/subscribers/{id}`.
    Deleted,
    /// The idle sweeper is removing it.
    Expired,
}

impl Eviction {
    pub fn describe(self) -> &'static str {
        match self {
            Eviction::TakenOver => "another connection took this subscriber over",
            Eviction::Deleted => "the subscriber was deleted",
            Eviction::Expired => "the subscriber expired",
        }
    }
}

/// A durable subscriber's key: its channel and id.
pub type SubscriberKey = (ChannelName, SubscriberId);

struct Slot {
    generation: u64,
    evict: Option<oneshot::Sender<Eviction>>,
    released: watch::Receiver<bool>,
}

/// The holders of every durable subscriber of a server (and, keyed by client id, of every MQTT
/// session: the same claim, eviction and fence).
pub struct Registry<K = SubscriberKey> {
    slots: Mutex<HashMap<K, Slot>>,
    generations: AtomicU64,
}

impl<K> Default for Registry<K> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
        }
    }
}

/// Exclusive hold of one key; released on drop.
pub struct Claim<K: Eq + Hash + Clone = SubscriberKey> {
    registry: Arc<Registry<K>>,
    key: K,
    generation: u64,
    released: watch::Sender<bool>,
    evicted: Option<oneshot::Receiver<Eviction>>,
    /// Whether there was a holder to evict.
    pub took_over: bool,
    /// Whether the previous holder released in time (false: the wait timed out).
    pub fenced: bool,
}

impl<K: Eq + Hash + Clone> Claim<K> {
    /// Resolves when a later claimant evicts this one (taken once).
    pub fn take_evicted(&mut self) -> oneshot::Receiver<Eviction> {
        self.evicted.take().expect("taken once")
    }
}

impl Registry<SubscriberKey> {
    /// Takes the subscriber, evicting the current holder with `reason` and waiting (at most
    /// `timeout`) for it to release.
    pub async fn claim(
        self: &Arc<Self>,
        channel: &ChannelName,
        id: &SubscriberId,
        reason: Eviction,
        timeout: Duration,
    ) -> Claim {
        self.claim_key((channel.clone(), id.clone()), reason, timeout)
            .await
    }

    /// Whether someone holds the subscriber (a connected subscriber is never idle).
    pub fn is_held(&self, channel: &ChannelName, id: &SubscriberId) -> bool {
        self.is_key_held(&(channel.clone(), id.clone()))
    }
}

impl<K: Eq + Hash + Clone> Registry<K> {
    /// Takes `key`, evicting the current holder with `reason` and waiting (at most `timeout`)
    /// for it to release.
    pub async fn claim_key(
        self: &Arc<Self>,
        key: K,
        reason: Eviction,
        timeout: Duration,
    ) -> Claim<K> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let (evict, evicted) = oneshot::channel();
        let (released, released_receiver) = watch::channel(false);
        let previous = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let previous = slots.insert(
                key.clone(),
                Slot {
                    generation,
                    evict: Some(evict),
                    released: released_receiver,
                },
            );
            previous.map(|mut slot| {
                if let Some(evict) = slot.evict.take() {
                    let _ = evict.send(reason);
                }
                slot.released
            })
        };
        let took_over = previous.is_some();
        let fenced = match previous {
            None => true,
            Some(mut previous) => tokio::time::timeout(timeout, async {
                // An error means the sender is gone: released as well.
                let _ = previous.wait_for(|released| *released).await;
            })
            .await
            .is_ok(),
        };
        Claim {
            registry: self.clone(),
            key,
            generation,
            released,
            evicted: Some(evicted),
            took_over,
            fenced,
        }
    }

    /// Whether someone holds `key`.
    pub fn is_key_held(&self, key: &K) -> bool {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.contains_key(key)
    }

    /// Keys held right now.
    pub fn held(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl<K: Eq + Hash + Clone> Drop for Claim<K> {
    fn drop(&mut self) {
        let _ = self.released.send(true);
        let mut slots = self
            .registry
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slots
            .get(&self.key)
            .is_some_and(|slot| slot.generation == self.generation)
        {
            slots.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (ChannelName, SubscriberId) {
        (
            ChannelName::parse("chat:a").unwrap(),
            SubscriberId::parse("worker").unwrap(),
        )
    }

    #[tokio::test]
    async fn a_second_claim_evicts_the_first_and_waits_for_its_release() {
        let registry = Arc::new(Registry::default());
        let (channel, id) = key();
        let mut first = registry
            .claim(&channel, &id, Eviction::TakenOver, Duration::from_secs(5))
            .await;
        assert!(registry.is_held(&channel, &id));
        let second = {
            let registry = registry.clone();
            let (channel, id) = (channel.clone(), id.clone());
            tokio::spawn(async move {
                registry
                    .claim(&channel, &id, Eviction::TakenOver, Duration::from_secs(5))
                    .await
            })
        };
        let reason = first.take_evicted().await.unwrap();
        assert_eq!(reason, Eviction::TakenOver);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished(), "the second waits for the first");
        drop(first);
        let second = second.await.unwrap();
        assert!(second.fenced);
        assert!(
            registry.is_held(&channel, &id),
            "the first's drop kept the second's slot"
        );
        drop(second);
        assert!(!registry.is_held(&channel, &id));
    }

    #[tokio::test]
    async fn a_stuck_holder_is_passed_after_the_timeout() {
        let registry = Arc::new(Registry::default());
        let (channel, id) = key();
        let _stuck = registry
            .claim(&channel, &id, Eviction::TakenOver, Duration::from_secs(5))
            .await;
        let second = registry
            .claim(&channel, &id, Eviction::Deleted, Duration::from_millis(30))
            .await;
        assert!(!second.fenced);
    }
}
