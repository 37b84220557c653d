//! The live feed: every durable message, per channel, to the subscriptions of that channel.
//!
//! The store calls [`Hub::on_durable`] with each group of messages right after its fsync, in
//! commit order. The hub keeps, for each channel that has subscribers, a bounded broadcast
//! ring of the newest [`LiveMessage`]s. Subscriptions read the ring at their own pace; one
//! that falls further behind than the ring holds is told so (`Lagged`) and catches up from the
//! log (exactly-once) or reports a gap (at-most-once): see `live.rs`.
//!
//! # Invariants
//! - Per channel, the ring receives messages in serial order, each once (the store's listener
//!   contract). A subscription that registers *before* it reads the channel's state from the
//!   store therefore misses nothing: older messages are in the store, newer ones in the ring.
//! - A message is serialised at most once per wire form ([`LiveMessage::frame`],
//!   [`LiveMessage::hint_frame`]) and every subscriber sends the same bytes.
//! - Channels without subscribers cost nothing: their ring is removed with the last receiver.
//! - Pattern feeds ([`Hub::subscribe_matching`], MQTT wildcard filters) get every durable
//!   message whose channel their predicate accepts, in commit order, through a bounded queue;
//!   a message that finds the queue full is dropped and counted in [`PatternReceiver::dropped`],
//!   never silently. The predicate runs on the commit path, once per message and feed whose
//!   [`FeedScope`] may hold the message's channel: feeds are indexed by exact channel and by
//!   first topic level, so a message is tested only against the feeds that can want it, not
//!   against every connection. A feed's scope always covers every channel its predicate
//!   accepts (a feed narrows it with [`PatternReceiver::set_scope`] before its predicate
//!   accepts less, and widens it before its predicate accepts more).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use axum::extract::ws::Utf8Bytes;
use herald_core::{ChannelName, Message};
use herald_log::DurableListener;
use herald_protocol::MessageBody;
use herald_protocol::ws::{Hint, HintTag, delivery_json};
use tokio::sync::{broadcast, mpsc};

/// A durable message on its way to subscribers, with its wire forms encoded on first use.
#[derive(Debug)]
pub struct LiveMessage {
    pub message: Message,
    frame: OnceLock<Utf8Bytes>,
    hint_frame: OnceLock<Utf8Bytes>,
}

impl LiveMessage {
    pub fn new(message: Message) -> LiveMessage {
        LiveMessage {
            message,
            frame: OnceLock::new(),
            hint_frame: OnceLock::new(),
        }
    }

    /// The `message` frame (WebSocket text, and the `data:` of an SSE event).
    pub fn frame(&self) -> &Utf8Bytes {
        self.frame.get_or_init(|| {
            Utf8Bytes::from(delivery_json(&MessageBody::from_message(&self.message)))
        })
    }

    /// The `hint` frame.
    pub fn hint_frame(&self) -> &Utf8Bytes {
        self.hint_frame.get_or_init(|| {
            let message = &self.message;
            let hint = Hint {
                kind: HintTag::Tag,
                channel: message.channel.to_string(),
                serial: message.serial.0,
                epoch: message.epoch.to_string(),
                position: message.position().to_string(),
            };
            Utf8Bytes::from(serde_json::to_string(&hint).expect("a hint serialises"))
        })
    }
}

pub type LiveReceiver = broadcast::Receiver<Arc<LiveMessage>>;

/// Sees every durable message batch before the rings do (the webhooks use it to find the
/// channels of their namespaces). Called on the store's commit path: it must return quickly,
/// never block and never call back into the store.
pub trait ChannelObserver: Send + Sync + 'static {
    fn on_durable(&self, messages: &[Message]);
}

/// Decides which channels a pattern feed receives. Runs on the store's commit path: it must
/// be quick and must not block (a short `std::sync::RwLock` read is fine).
pub type ChannelMatcher = Arc<dyn Fn(&ChannelName) -> bool + Send + Sync>;

/// The channels a pattern feed may receive: a superset of what its predicate accepts, used
/// to find the feeds a message must be tested against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedScope {
    /// Channels named exactly.
    pub channels: BTreeSet<ChannelName>,
    /// First topic levels: every channel whose name up to the first `:` (or whole name, for
    /// a bare channel) is one of these.
    pub first_levels: BTreeSet<String>,
    /// Any channel at all (a filter starting with a wildcard).
    pub everything: bool,
}

impl FeedScope {
    /// Every channel: what a feed's scope is until it is narrowed.
    pub fn everything() -> FeedScope {
        FeedScope {
            everything: true,
            ..FeedScope::default()
        }
    }
}

/// The first topic level of a channel: its namespace, or the whole name of a bare channel
/// (`chat/#` matches both `chat:a` and the bare `chat`).
pub fn first_level(channel: &ChannelName) -> &str {
    let name = channel.as_str();
    name.split_once(':').map_or(name, |(first, _)| first)
}

struct PatternFeed {
    matcher: ChannelMatcher,
    sender: mpsc::Sender<Arc<LiveMessage>>,
    dropped: Arc<AtomicU64>,
}

/// A feed as the index holds it.
type Indexed = (u64, Arc<PatternFeed>);

/// The pattern feeds, with their scopes, and their index by scope.
#[derive(Default)]
struct Patterns {
    feeds: HashMap<u64, (Arc<PatternFeed>, FeedScope)>,
    by_channel: HashMap<ChannelName, Vec<Indexed>>,
    by_first_level: HashMap<String, Vec<Indexed>>,
    everywhere: Vec<Indexed>,
}

impl Patterns {
    fn index(&mut self, id: u64, feed: &Arc<PatternFeed>, scope: &FeedScope) {
        for channel in &scope.channels {
            self.by_channel
                .entry(channel.clone())
                .or_default()
                .push((id, feed.clone()));
        }
        for level in &scope.first_levels {
            self.by_first_level
                .entry(level.clone())
                .or_default()
                .push((id, feed.clone()));
        }
        if scope.everything {
            self.everywhere.push((id, feed.clone()));
        }
    }

    fn unindex(&mut self, id: u64, scope: &FeedScope) {
        fn remove<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<Indexed>>, key: &K, id: u64) {
            if let Some(feeds) = map.get_mut(key) {
                feeds.retain(|(other, _)| *other != id);
                if feeds.is_empty() {
                    map.remove(key);
                }
            }
        }
        for channel in &scope.channels {
            remove(&mut self.by_channel, channel, id);
        }
        for level in &scope.first_levels {
            remove(&mut self.by_first_level, level, id);
        }
        if scope.everything {
            self.everywhere.retain(|(other, _)| *other != id);
        }
    }

    /// The feeds whose scope holds `channel`, each once, into `candidates`.
    fn candidates<'a>(
        &'a self,
        channel: &ChannelName,
        candidates: &mut Vec<(u64, &'a PatternFeed)>,
    ) {
        candidates.clear();
        let by_channel = self.by_channel.get(channel).map(Vec::as_slice);
        let by_level = self
            .by_first_level
            .get(first_level(channel))
            .map(Vec::as_slice);
        for indexed in [by_channel, by_level, Some(self.everywhere.as_slice())]
            .into_iter()
            .flatten()
        {
            candidates.extend(indexed.iter().map(|(id, feed)| (*id, feed.as_ref())));
        }
        // A feed in several parts of the index (`chat:a` and `chat/#`) gets the message once.
        candidates.sort_unstable_by_key(|(id, _)| *id);
        candidates.dedup_by_key(|(id, _)| *id);
    }
}

/// The per-channel live rings.
pub struct Hub {
    feeds: RwLock<HashMap<ChannelName, broadcast::Sender<Arc<LiveMessage>>>>,
    ring_messages: usize,
    observer: OnceLock<Arc<dyn ChannelObserver>>,
    patterns: RwLock<Patterns>,
    next_pattern_id: AtomicU64,
}

impl Hub {
    /// `ring_messages`: how many of the newest messages each subscribed channel keeps.
    pub fn new(ring_messages: usize) -> Hub {
        Hub {
            feeds: RwLock::new(HashMap::new()),
            ring_messages: ring_messages.max(1),
            observer: OnceLock::new(),
            patterns: RwLock::new(Patterns::default()),
            next_pattern_id: AtomicU64::new(0),
        }
    }

    /// Registers a feed of every message made durable from now on whose channel `matcher`
    /// accepts, through a queue of `capacity` messages (full: dropped and counted). The feed
    /// is removed when the receiver is dropped. Its scope is every channel until
    /// [`PatternReceiver::set_scope`] narrows it.
    pub fn subscribe_matching(
        self: &Arc<Self>,
        matcher: ChannelMatcher,
        capacity: usize,
    ) -> PatternReceiver {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let id = self.next_pattern_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        let feed = Arc::new(PatternFeed {
            matcher,
            sender,
            dropped: dropped.clone(),
        });
        let scope = FeedScope::everything();
        let mut patterns = self
            .patterns
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        patterns.index(id, &feed, &scope);
        patterns.feeds.insert(id, (feed, scope));
        drop(patterns);
        PatternReceiver {
            hub: self.clone(),
            id,
            receiver,
            dropped,
        }
    }

    /// Pattern feeds currently registered (for metrics and tests).
    pub fn pattern_feeds(&self) -> usize {
        self.patterns
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .feeds
            .len()
    }

    /// Installs the observer of every durable batch (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn ChannelObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Registers a receiver for `channel`: it gets every message made durable from now on.
    pub fn subscribe(&self, channel: &ChannelName) -> LiveReceiver {
        let mut feeds = self.feeds.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = feeds.get(channel) {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(self.ring_messages);
        feeds.insert(channel.clone(), sender);
        receiver
    }

    /// Drops the channel's ring once its last receiver is gone. Call after dropping a receiver.
    pub fn release(&self, channel: &ChannelName) {
        let mut feeds = self.feeds.write().unwrap_or_else(PoisonError::into_inner);
        if feeds
            .get(channel)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            feeds.remove(channel);
        }
    }

    /// Channels that currently have a ring (for metrics and tests).
    pub fn channels(&self) -> usize {
        self.feeds
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One pump's hold on a channel's ring, counted in a gauge of running pumps; both are released
/// on drop (also when the pump's task is aborted).
pub struct Registration {
    hub: Arc<Hub>,
    channel: ChannelName,
    receiver: Option<LiveReceiver>,
    gauge: Arc<AtomicU64>,
}

impl Registration {
    /// Registers with the hub first: everything made durable from now on reaches the ring.
    pub fn new(hub: Arc<Hub>, channel: &ChannelName, gauge: Arc<AtomicU64>) -> Registration {
        let receiver = hub.subscribe(channel);
        gauge.fetch_add(1, Ordering::Relaxed);
        Registration {
            hub,
            channel: channel.clone(),
            receiver: Some(receiver),
            gauge,
        }
    }

    pub fn receiver(&mut self) -> &mut LiveReceiver {
        self.receiver.as_mut().expect("present until drop")
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        drop(self.receiver.take());
        self.hub.release(&self.channel);
        self.gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pattern feed's receiving end; dropping it unregisters the feed.
pub struct PatternReceiver {
    hub: Arc<Hub>,
    id: u64,
    receiver: mpsc::Receiver<Arc<LiveMessage>>,
    dropped: Arc<AtomicU64>,
}

impl PatternReceiver {
    pub fn receiver(&mut self) -> &mut mpsc::Receiver<Arc<LiveMessage>> {
        &mut self.receiver
    }

    /// Messages dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Replaces the feed's scope: only messages of channels in it are offered to its
    /// predicate from now on. It must cover every channel the predicate accepts.
    pub fn set_scope(&self, scope: FeedScope) {
        let mut patterns = self
            .hub
            .patterns
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((feed, old)) = patterns.feeds.get(&self.id).cloned() else {
            return;
        };
        if old == scope {
            return;
        }
        patterns.unindex(self.id, &old);
        patterns.index(self.id, &feed, &scope);
        patterns.feeds.insert(self.id, (feed, scope));
    }
}

impl Drop for PatternReceiver {
    fn drop(&mut self) {
        let mut patterns = self
            .hub
            .patterns
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, scope)) = patterns.feeds.remove(&self.id) {
            patterns.unindex(self.id, &scope);
        }
    }
}

impl DurableListener for Hub {
    fn on_durable(&self, messages: &[Message]) {
        if let Some(observer) = self.observer.get() {
            observer.on_durable(messages);
        }
        let feeds = self.feeds.read().unwrap_or_else(PoisonError::into_inner);
        let patterns = self.patterns.read().unwrap_or_else(PoisonError::into_inner);
        if feeds.is_empty() && patterns.feeds.is_empty() {
            return;
        }
        let mut candidates = Vec::new();
        for message in messages {
            let mut live = None;
            if let Some(sender) = feeds.get(&message.channel) {
                let shared = Arc::new(LiveMessage::new(message.clone()));
                // An error means every receiver is gone; `release` removes the ring.
                let _ = sender.send(shared.clone());
                live = Some(shared);
            }
            patterns.candidates(&message.channel, &mut candidates);
            for (_, feed) in &candidates {
                if !(feed.matcher)(&message.channel) {
                    continue;
                }
                let shared = live
                    .get_or_insert_with(|| Arc::new(LiveMessage::new(message.clone())))
                    .clone();
                if let Err(mpsc::error::TrySendError::Full(_)) = feed.sender.try_send(shared) {
                    feed.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::body::Bytes;
    use herald_core::{ChainHash, Data, Epoch, MessageId, Serial, Timestamp};

    use super::*;

    fn message(channel: &ChannelName, serial: u64) -> Message {
        let epoch = Epoch::parse("E1").unwrap();
        Message {
            channel: channel.clone(),
            epoch: epoch.clone(),
            serial: Serial(serial),
            id: MessageId::parse(&format!("m{serial}")).unwrap(),
            time: Timestamp(1),
            name: None,
            headers: BTreeMap::new(),
            data: Data::Json(Bytes::from_static(b"{\"n\":1}")),
            ttl_ms: None,
            chain: ChainHash::genesis(&epoch),
        }
    }

    /// Encode once, fan out the same bytes: every subscriber of a channel receives the same
    /// `Arc<LiveMessage>`, whose frame is serialised on first use and then shared.
    #[test]
    fn every_subscriber_gets_the_same_encoded_bytes() {
        let hub = Hub::new(8);
        let channel = ChannelName::parse("chat:a").unwrap();
        let mut first = hub.subscribe(&channel);
        let mut second = hub.subscribe(&channel);
        hub.on_durable(&[message(&channel, 1)]);
        let (a, b) = (first.try_recv().unwrap(), second.try_recv().unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.frame().as_str().as_ptr(), b.frame().as_str().as_ptr());
        assert!(
            a.frame()
                .as_str()
                .starts_with(r#"{"type":"message","id":"m1""#)
        );
    }

    /// A pattern feed gets the matching channels' messages in order, counts what its full
    /// queue could not take, and is gone once its receiver is dropped.
    #[test]
    fn pattern_feeds_match_bound_and_count_drops() {
        let hub = Arc::new(Hub::new(8));
        let matcher: ChannelMatcher =
            Arc::new(|channel: &ChannelName| channel.namespace() == Some("chat"));
        let mut feed = hub.subscribe_matching(matcher, 2);
        let chat_a = ChannelName::parse("chat:a").unwrap();
        let chat_b = ChannelName::parse("chat:b").unwrap();
        let other = ChannelName::parse("news:a").unwrap();
        hub.on_durable(&[message(&chat_a, 1), message(&other, 1), message(&chat_b, 1)]);
        hub.on_durable(&[message(&chat_a, 2)]);
        let first = feed.receiver().try_recv().unwrap();
        let second = feed.receiver().try_recv().unwrap();
        assert_eq!(first.message.channel, chat_a);
        assert_eq!(second.message.channel, chat_b);
        assert!(feed.receiver().try_recv().is_err());
        assert_eq!(feed.dropped(), 1);
        assert_eq!(hub.pattern_feeds(), 1);
        drop(feed);
        assert_eq!(hub.pattern_feeds(), 0);
    }

    /// A feed narrowed to a scope is offered only its scope's messages (exact channels, first
    /// levels, bare channels of a level), each once even when several parts of the scope hold
    /// its channel; feeds in no part of the index are not tested at all.
    #[test]
    fn pattern_feeds_are_offered_only_what_their_scope_holds() {
        let hub = Arc::new(Hub::new(8));
        let tested = Arc::new(AtomicU64::new(0));
        let counting = |tested: &Arc<AtomicU64>| -> ChannelMatcher {
            let tested = tested.clone();
            Arc::new(move |_: &ChannelName| {
                tested.fetch_add(1, Ordering::Relaxed);
                true
            })
        };
        let chat_a = ChannelName::parse("chat:a").unwrap();
        let chat_bare = ChannelName::parse("chat").unwrap();
        let news_a = ChannelName::parse("news:a").unwrap();
        let mut both = hub.subscribe_matching(counting(&tested), 16);
        both.set_scope(FeedScope {
            channels: BTreeSet::from([chat_a.clone()]),
            first_levels: BTreeSet::from(["chat".to_owned()]),
            everything: false,
        });
        let mut exact = hub.subscribe_matching(counting(&tested), 16);
        exact.set_scope(FeedScope {
            channels: BTreeSet::from([news_a.clone()]),
            ..FeedScope::default()
        });
        hub.on_durable(&[
            message(&chat_a, 1),
            message(&chat_bare, 1),
            message(&news_a, 1),
        ]);
        let received = |feed: &mut PatternReceiver| {
            let mut channels = Vec::new();
            while let Ok(live) = feed.receiver().try_recv() {
                channels.push(live.message.channel.to_string());
            }
            channels
        };
        assert_eq!(received(&mut both), ["chat:a", "chat"]);
        assert_eq!(received(&mut exact), ["news:a"]);
        // Three offers: each message to the one feed whose scope holds it.
        assert_eq!(tested.load(Ordering::Relaxed), 3);
        // Widened to everything, the exact feed sees every channel again.
        exact.set_scope(FeedScope::everything());
        hub.on_durable(&[message(&chat_a, 2)]);
        assert_eq!(received(&mut exact), ["chat:a"]);
        drop(both);
        drop(exact);
        assert_eq!(hub.pattern_feeds(), 0);
        let patterns = hub.patterns.read().unwrap();
        assert!(patterns.by_channel.is_empty() && patterns.by_first_level.is_empty());
        assert!(patterns.everywhere.is_empty());
    }

    #[test]
    fn rings_exist_only_while_a_channel_has_subscribers() {
        let hub = Hub::new(8);
        let channel = ChannelName::parse("chat:a").unwrap();
        // No subscriber: nothing is kept.
        hub.on_durable(&[message(&channel, 1)]);
        assert_eq!(hub.channels(), 0);
        let receiver = hub.subscribe(&channel);
        assert_eq!(hub.channels(), 1);
        drop(receiver);
        hub.release(&channel);
        assert_eq!(hub.channels(), 0);
    }
}
