//! Retained messages: the newest retained PUBLISH per channel (= topic).
//!
//! A retained PUBLISH is stored in its channel's log like any other message, with the header
//! `mqtt-retain: 1`; an empty one is stored too and clears the topic. This index only says
//! which stored message is a channel's retained one, and keeps a copy for new subscriptions.
//!
//! # Invariants and limits
//! - An entry only moves forward: a retained message replaces the entry only when it comes
//!   later in the channel's stream (a newer epoch, or a higher serial), so two publishers
//!   racing on one topic leave the later one retained, whatever order their appends complete.
//! - The retained message is a message of the log: when the channel's retention drops it,
//!   it stays retained until the next restart, which rebuilds the index from what the log
//!   still holds (the newest [`REBUILD_SCAN_MESSAGES`] messages of each channel). Configure
//!   the namespace's retention to keep retained values as long as they matter.
//! - Memory: one message per retained topic.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use herald_core::{ChannelName, Message, Position};
use herald_log::{LogStore, ReadQuery};
use herald_mqtt::{HEADER_RETAIN, TopicFilter};

/// Messages read per channel, newest first, when the index is rebuilt at start.
pub const REBUILD_SCAN_MESSAGES: usize = 1000;
const REBUILD_PAGE_MESSAGES: usize = 100;

struct Entry {
    position: Position,
    /// `None`: cleared by an empty retained publish.
    message: Option<Message>,
}

/// Channel -> its retained message.
#[derive(Default)]
pub struct RetainedIndex {
    entries: RwLock<BTreeMap<ChannelName, Entry>>,
}

fn is_later(candidate: &Position, current: &Position) -> bool {
    candidate.epoch != current.epoch || candidate.serial > current.serial
}

impl RetainedIndex {
    /// Takes a durable message: retained ones (header [`HEADER_RETAIN`]) update the index.
    pub fn offer(&self, message: &Message) {
        if !message.headers.contains_key(HEADER_RETAIN) {
            return;
        }
        let position = message.position();
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = entries.get(&message.channel)
            && !is_later(&position, &current.position)
        {
            return;
        }
        let kept = (!message.data.bytes().is_empty()).then(|| message.clone());
        entries.insert(
            message.channel.clone(),
            Entry {
                position,
                message: kept,
            },
        );
    }

    /// The retained messages of the channels `filter` matches, in channel order.
    pub fn matching(&self, filter: &TopicFilter) -> Vec<Message> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = filter.exact_channel() {
            return entries
                .get(channel)
                .and_then(|entry| entry.message.clone())
                .into_iter()
                .collect();
        }
        entries
            .iter()
            .filter(|(channel, _)| filter.matches_channel(channel))
            .filter_map(|(_, entry)| entry.message.clone())
            .collect()
    }

    /// Topics with a retained message (for tests and metrics).
    pub fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|entry| entry.message.is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rebuilds from the log: per channel, the newest retained message among its newest
    /// [`REBUILD_SCAN_MESSAGES`]. Blocking (reads the store).
    pub fn rebuild(&self, store: &dyn LogStore) {
        for channel in store.channels() {
            let mut query = ReadQuery::Newest {
                limit: REBUILD_PAGE_MESSAGES,
            };
            let mut scanned = 0;
            while scanned < REBUILD_SCAN_MESSAGES {
                let Ok(page) = store.read(&channel, &query) else {
                    break;
                };
                scanned += page.messages.len();
                if let Some(retained) = page
                    .messages
                    .iter()
                    .find(|message| message.headers.contains_key(HEADER_RETAIN))
                {
                    self.offer(retained);
                    break;
                }
                match (page.more, page.next) {
                    (true, Some(before)) => {
                        query = ReadQuery::Backward {
                            before,
                            limit: REBUILD_PAGE_MESSAGES,
                        }
                    }
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use herald_core::{ChainHash, Data, Epoch, MessageId, Serial, Timestamp};

    use super::*;

    fn message(channel: &str, serial: u64, payload: &'static [u8], retained: bool) -> Message {
        let epoch = Epoch::parse("E1").unwrap();
        let mut headers = BTreeMap::new();
        if retained {
            headers.insert(HEADER_RETAIN.to_owned(), "1".to_owned());
        }
        Message {
            channel: ChannelName::parse(channel).unwrap(),
            epoch: epoch.clone(),
            serial: Serial(serial),
            id: MessageId::parse(&format!("m{serial}")).unwrap(),
            time: Timestamp(1),
            name: None,
            headers,
            data: Data::Binary(Bytes::from_static(payload)),
            ttl_ms: None,
            chain: ChainHash::genesis(&epoch),
        }
    }

    fn payloads(index: &RetainedIndex, filter: &str) -> Vec<Bytes> {
        index
            .matching(&TopicFilter::parse(filter).unwrap())
            .iter()
            .map(|message| message.data.bytes().clone())
            .collect()
    }

    #[test]
    fn the_later_retained_message_wins_in_any_completion_order() {
        let index = RetainedIndex::default();
        index.offer(&message("a:x", 2, b"new", true));
        index.offer(&message("a:x", 1, b"old", true));
        index.offer(&message("a:x", 3, b"plain", false));
        index.offer(&message("a:y", 1, b"y", true));
        assert_eq!(payloads(&index, "a/+"), ["new", "y"]);
        assert_eq!(payloads(&index, "a/x"), ["new"]);
        assert!(payloads(&index, "b/#").is_empty());
        // An empty retained message clears, and an older one cannot come back after it.
        index.offer(&message("a:x", 4, b"", true));
        index.offer(&message("a:x", 2, b"new", true));
        assert_eq!(payloads(&index, "a/+"), ["y"]);
        assert_eq!(index.len(), 1);
    }
}
