//! The channel table both stores share: one [`ChannelStream`] per channel, plus the glue from
//! stream plans to store results.

use std::collections::HashMap;

use herald_core::{
    ChannelName, ChannelStream, ContinuityLost, ContinuityReason, Epoch, Message, MessageId,
    NewMessage, PlanRejection, Policies, Position, ReadFrom, ReadPlan, Sequenced, StreamStatus,
    Timestamp,
};
use rand::Rng;

use crate::store::{AppendError, Appended, ReadError, ReadPage, ReadQuery, StoreError};

/// A fresh random epoch: 12 characters of `[A-Za-z0-9]` (~71 bits).
pub fn new_epoch() -> Epoch {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let text: String = (0..12)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    Epoch::parse(&text).expect("generated epoch is valid")
}

/// All channel streams of a store.
#[derive(Debug)]
pub struct ChannelTable<L> {
    streams: HashMap<ChannelName, ChannelStream<L>>,
}

impl<L> Default for ChannelTable<L> {
    fn default() -> Self {
        Self {
            streams: HashMap::new(),
        }
    }
}

/// A batch after sequencing: the replies to send once durable, and the messages to write.
#[derive(Debug)]
pub struct SequencedBatch {
    pub replies: Vec<Appended>,
    pub new_messages: Vec<Message>,
}

impl<L: Clone> ChannelTable<L> {
    pub fn get(&self, channel: &ChannelName) -> Option<&ChannelStream<L>> {
        self.streams.get(channel)
    }

    pub fn get_mut(&mut self, channel: &ChannelName) -> Option<&mut ChannelStream<L>> {
        self.streams.get_mut(channel)
    }

    pub fn insert(&mut self, stream: ChannelStream<L>) {
        self.streams.insert(stream.channel().clone(), stream);
    }

    pub fn streams(&self) -> impl Iterator<Item = &ChannelStream<L>> {
        self.streams.values()
    }

    pub fn streams_mut(&mut self) -> impl Iterator<Item = &mut ChannelStream<L>> {
        self.streams.values_mut()
    }

    /// Sequences a batch on a channel (creating the channel with a new epoch if needed) and
    /// pushes the new messages with the locators `locate` gives them. Nothing changes when the
    /// batch is rejected. The caller marks the messages durable after its fsync.
    pub fn sequence(
        &mut self,
        channel: &ChannelName,
        batch: &[NewMessage],
        policies: &Policies,
        now: Timestamp,
        mut locate: impl FnMut(&Message) -> L,
    ) -> Result<SequencedBatch, AppendError> {
        if batch.is_empty() {
            return Err(AppendError::Invalid(herald_core::InvalidInput::message(
                "a batch needs at least one message",
            )));
        }
        let policy = policies.for_channel(channel);
        let created = (!self.streams.contains_key(channel))
            .then(|| ChannelStream::<L>::new(channel.clone(), new_epoch()));
        let (planned, epoch) = {
            let stream = created
                .as_ref()
                .or_else(|| self.streams.get(channel))
                .expect("stream exists or was just created");
            let epoch = stream.epoch().clone();
            let planned = stream
                .plan(batch, policy, now)
                .map_err(|rejection| match rejection {
                    PlanRejection::IdConflict { id, serial } => AppendError::IdConflict {
                        id,
                        position: Position::new(epoch.clone(), serial),
                    },
                    PlanRejection::Invalid(invalid) => AppendError::Invalid(invalid),
                })?;
            (planned, epoch)
        };
        if let Some(created) = created {
            self.streams.insert(channel.clone(), created);
        }
        let stream = self.streams.get_mut(channel).expect("stream exists");
        let mut replies = Vec::with_capacity(planned.len());
        let mut new_messages = Vec::new();
        for decision in planned {
            match decision {
                Sequenced::New(message, content) => {
                    stream.push(&message, content, locate(&message));
                    replies.push(Appended {
                        id: message.id.clone(),
                        position: message.position(),
                        duplicate: false,
                    });
                    new_messages.push(message);
                }
                Sequenced::Duplicate { id, serial } => replies.push(Appended {
                    id,
                    position: Position::new(epoch.clone(), serial),
                    duplicate: true,
                }),
            }
        }
        Ok(SequencedBatch {
            replies,
            new_messages,
        })
    }

    /// Plans a read. An unknown channel reads as empty, and any position on it is from
    /// another epoch.
    pub fn plan_read(
        &self,
        channel: &ChannelName,
        query: &ReadQuery,
        policies: &Policies,
        now: Timestamp,
    ) -> Result<Option<ReadPlan<L>>, ContinuityLost> {
        let policy = policies.for_channel(channel);
        let Some(stream) = self.streams.get(channel) else {
            return match query {
                ReadQuery::Forward {
                    from: ReadFrom::Oldest,
                    ..
                }
                | ReadQuery::Newest { .. } => Ok(None),
                ReadQuery::Forward {
                    from: ReadFrom::After(position),
                    ..
                }
                | ReadQuery::Backward {
                    before: position, ..
                } => Err(ContinuityLost {
                    reason: ContinuityReason::EpochChanged,
                    requested: position.clone(),
                    first_available: None,
                    top: None,
                }),
            };
        };
        match query {
            ReadQuery::Forward { from, limit } => stream
                .plan_read_forward(from, *limit, policy, now)
                .map(Some),
            ReadQuery::Backward { before, limit } => stream
                .plan_read_backward(before, *limit, policy, now)
                .map(Some),
            ReadQuery::Newest { limit } => {
                let past_top = Position::new(stream.epoch().clone(), stream.durable_top().next());
                stream
                    .plan_read_backward(&past_top, *limit, policy, now)
                    .map(Some)
            }
        }
    }

    pub fn find_by_id(
        &self,
        channel: &ChannelName,
        id: &MessageId,
        policies: &Policies,
        now: Timestamp,
    ) -> Option<L> {
        self.streams
            .get(channel)?
            .find_by_id(id, policies.for_channel(channel), now)
            .map(|(_, locator)| locator)
    }

    pub fn status(
        &self,
        channel: &ChannelName,
        policies: &Policies,
        now: Timestamp,
    ) -> Option<StreamStatus> {
        let stream = self.streams.get(channel)?;
        (stream.durable_top().0 > 0).then(|| stream.status(policies.for_channel(channel), now))
    }
}

/// Turns a read plan into a page, fetching each message with `fetch`.
pub fn fetch_page<L>(
    plan: Option<ReadPlan<L>>,
    mut fetch: impl FnMut(&L) -> Result<Message, StoreError>,
) -> Result<ReadPage, ReadError> {
    let Some(plan) = plan else {
        return Ok(ReadPage::empty());
    };
    let messages = plan
        .entries
        .iter()
        .map(|(serial, locator)| {
            let message = fetch(locator)?;
            assert_eq!(
                message.serial, *serial,
                "locator points at the wrong message"
            );
            Ok(message)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(ReadPage {
        messages,
        skipped: plan.skipped,
        next: plan.next,
        top: plan.top,
        more: plan.more,
    })
}

/// A channel's tip, preserved when all of its stored messages are reclaimed so that serials,
/// epoch and chain continue across restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelTip {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub serial: herald_core::Serial,
    pub chain: herald_core::ChainHash,
    pub time: Timestamp,
}

impl ChannelTip {
    /// The tip of a stream as it stands: what must survive when its messages are reclaimed.
    pub fn of<L: Clone>(stream: &ChannelStream<L>) -> ChannelTip {
        let (serial, chain, time) = stream.tip();
        ChannelTip {
            channel: stream.channel().clone(),
            epoch: stream.epoch().clone(),
            serial,
            chain,
            time,
        }
    }
}

impl<L: Clone> ChannelTable<L> {
    /// Rebuild step: a message read back from storage, in storage order.
    pub fn recover_message(&mut self, message: &Message, locator: L) -> Result<(), String> {
        match self.streams.get_mut(&message.channel) {
            // A stream known only from a tip, followed by a later message of the same epoch:
            // the messages in between were appended after the tip was written and reclaimed
            // since, so the stream restarts right before this message (handled below).
            Some(stream)
                if !(stream.entry_count() == 0
                    && stream.epoch() == &message.epoch
                    && message.serial > stream.tip().0.next()) =>
            {
                stream.push_recovered(message, locator, true)
            }
            _ => {
                // History before this message was reclaimed (or this is serial 1): start the
                // stream right before it and take its chain value as stored.
                let previous = message.serial.prev().expect("stored serials start at 1");
                let mut stream = if previous.0 == 0 {
                    ChannelStream::new(message.channel.clone(), message.epoch.clone())
                } else {
                    ChannelStream::starting_after(
                        message.channel.clone(),
                        message.epoch.clone(),
                        previous,
                        herald_core::ChainHash([0; 32]),
                        message.time,
                    )
                };
                stream.push_recovered(message, locator, previous.0 == 0)?;
                self.streams.insert(message.channel.clone(), stream);
                Ok(())
            }
        }
    }

    /// Rebuild step: a tip record. A tip at or below what is indexed is a leftover of an
    /// interrupted reclaim and changes nothing.
    pub fn recover_tip(&mut self, tip: &ChannelTip) -> Result<(), String> {
        if let Some(stream) = self.streams.get(&tip.channel) {
            if stream.epoch() != &tip.epoch {
                return Err(format!(
                    "tip of {} has epoch {} but the stream has {}",
                    tip.channel,
                    tip.epoch,
                    stream.epoch()
                ));
            }
            let (serial, chain, _) = stream.tip();
            if tip.serial < serial {
                return Ok(());
            }
            if tip.serial == serial {
                return if tip.chain == chain {
                    Ok(())
                } else {
                    Err(format!("tip of {} disagrees with its chain", tip.channel))
                };
            }
            if stream.entry_count() > 0 {
                return Err(format!(
                    "tip of {} at {} is ahead of indexed messages",
                    tip.channel, tip.serial
                ));
            }
        }
        self.streams.insert(
            tip.channel.clone(),
            ChannelStream::starting_after(
                tip.channel.clone(),
                tip.epoch.clone(),
                tip.serial,
                tip.chain,
                tip.time,
            ),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use herald_core::{ChainHash, Data, ErrorCode, Serial};

    use super::*;

    const T0: Timestamp = Timestamp(1_000_000);

    fn room() -> ChannelName {
        ChannelName::parse("room").unwrap()
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

    /// Sequences and marks durable, returning the stored messages.
    fn commit(table: &mut ChannelTable<u64>, batch: &[NewMessage]) -> Vec<Message> {
        let sequenced = table
            .sequence(&room(), batch, &Policies::default(), T0, |message| {
                message.serial.0
            })
            .unwrap();
        if let Some(last) = sequenced.new_messages.last() {
            table.get_mut(&room()).unwrap().mark_durable(last.serial);
        }
        sequenced.new_messages
    }

    fn tip_of(message: &Message) -> ChannelTip {
        ChannelTip {
            channel: message.channel.clone(),
            epoch: message.epoch.clone(),
            serial: message.serial,
            chain: message.chain,
            time: message.time,
        }
    }

    #[test]
    fn a_rejected_first_batch_creates_no_channel() {
        let mut table = ChannelTable::<u64>::default();
        let policies = Policies::default();
        let empty = table.sequence(&room(), &[], &policies, T0, |_| 0);
        match empty {
            Err(AppendError::Invalid(invalid)) => {
                assert_eq!(invalid.code, ErrorCode::InvalidMessage)
            }
            other => panic!("expected an invalid batch, got {other:?}"),
        }
        let conflict = table.sequence(
            &room(),
            &[message("a", "1"), message("a", "2")],
            &policies,
            T0,
            |_| 0,
        );
        assert!(matches!(conflict, Err(AppendError::IdConflict { .. })));
        assert!(table.get(&room()).is_none());
        assert_eq!(table.status(&room(), &policies, T0), None);
    }

    #[test]
    fn duplicates_are_answered_with_the_channel_epoch() {
        let mut table = ChannelTable::<u64>::default();
        let stored = commit(&mut table, &[message("a", "1")]);
        let sequenced = table
            .sequence(
                &room(),
                &[message("a", "1"), message("b", "2")],
                &Policies::default(),
                T0,
                |message| message.serial.0,
            )
            .unwrap();
        assert_eq!(
            sequenced.replies[0],
            Appended {
                id: MessageId::parse("a").unwrap(),
                position: stored[0].position(),
                duplicate: true
            }
        );
        assert_eq!(sequenced.new_messages.len(), 1);
        assert_eq!(sequenced.replies[1].position.epoch, stored[0].epoch);
    }

    #[test]
    fn recovery_rebuilds_the_same_stream() {
        let mut table = ChannelTable::<u64>::default();
        let stored = commit(&mut table, &[message("a", "1"), message("b", "2")]);
        let mut rebuilt = ChannelTable::<u64>::default();
        for message in &stored {
            rebuilt.recover_message(message, message.serial.0).unwrap();
        }
        let original = table.get(&room()).unwrap();
        let recovered = rebuilt.get(&room()).unwrap();
        assert_eq!(recovered.tip(), original.tip());
        assert_eq!(recovered.epoch(), original.epoch());
        assert_eq!(recovered.durable_top(), Serial(2));
        // A record out of order is corruption.
        let mut out_of_order = ChannelTable::<u64>::default();
        out_of_order.recover_message(&stored[0], 1).unwrap();
        assert!(out_of_order.recover_message(&stored[0], 1).is_err());
    }

    #[test]
    fn recovery_after_reclaimed_history_continues_from_the_tip() {
        let mut table = ChannelTable::<u64>::default();
        let stored = commit(
            &mut table,
            &[message("a", "1"), message("b", "2"), message("c", "3")],
        );
        let mut next = commit(&mut table, &[message("d", "4")]);

        // Only a tip is left: the stream continues after it.
        let mut rebuilt = ChannelTable::<u64>::default();
        rebuilt.recover_tip(&tip_of(&stored[2])).unwrap();
        assert_eq!(rebuilt.get(&room()).unwrap().tip().0, Serial(3));
        rebuilt.recover_message(&next[0], 4).unwrap();
        assert_eq!(
            rebuilt.get(&room()).unwrap().tip(),
            table.get(&room()).unwrap().tip()
        );

        // A tip, then messages whose predecessors were reclaimed after the tip was written.
        let mut rebuilt = ChannelTable::<u64>::default();
        rebuilt.recover_tip(&tip_of(&stored[0])).unwrap();
        rebuilt.recover_message(&stored[2], 3).unwrap();
        rebuilt.recover_message(&next[0], 4).unwrap();
        let stream = rebuilt.get(&room()).unwrap();
        assert_eq!(
            stream.first_entry().map(|(serial, _)| serial),
            Some(Serial(3))
        );
        assert_eq!(stream.tip(), table.get(&room()).unwrap().tip());

        // A stale tip (an interrupted reclaim) changes nothing.
        rebuilt.recover_tip(&tip_of(&stored[1])).unwrap();
        assert_eq!(
            rebuilt.get(&room()).unwrap().tip(),
            table.get(&room()).unwrap().tip()
        );

        // A tip that disagrees with what is indexed, or from another epoch, is corruption.
        let mut wrong_chain = tip_of(&next[0]);
        wrong_chain.chain = ChainHash([7; 32]);
        assert!(rebuilt.recover_tip(&wrong_chain).is_err());
        let mut foreign = tip_of(&next[0]);
        foreign.epoch = Epoch::parse("elsewhere").unwrap();
        assert!(rebuilt.recover_tip(&foreign).is_err());
        next[0].epoch = Epoch::parse("elsewhere").unwrap();
        let mut tip_only = ChannelTable::<u64>::default();
        tip_only.recover_tip(&tip_of(&stored[0])).unwrap();
        assert!(
            tip_only.recover_message(&next[0], 4).is_err(),
            "epoch changed under a tip"
        );
    }

    #[test]
    fn unknown_channels_read_as_empty_and_refuse_positions() {
        let table = ChannelTable::<u64>::default();
        let policies = Policies::default();
        let oldest = ReadQuery::Forward {
            from: ReadFrom::Oldest,
            limit: 10,
        };
        assert!(
            table
                .plan_read(&room(), &oldest, &policies, T0)
                .unwrap()
                .is_none()
        );
        let position = Position::new(Epoch::parse("e1").unwrap(), Serial(3));
        for query in [
            ReadQuery::Forward {
                from: ReadFrom::After(position.clone()),
                limit: 10,
            },
            ReadQuery::Backward {
                before: position.clone(),
                limit: 10,
            },
        ] {
            let lost = table.plan_read(&room(), &query, &policies, T0).unwrap_err();
            assert_eq!(lost.reason, ContinuityReason::EpochChanged);
            assert_eq!((lost.first_available, lost.top), (None, None));
        }
        let page = fetch_page::<u64>(None, |_| unreachable!("nothing to fetch")).unwrap();
        assert_eq!(page, ReadPage::empty());
    }
}
