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
                Sequenced::New(message) => {
                    stream.push(&message, locate(&message));
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
                } => Ok(None),
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

impl<L: Clone> ChannelTable<L> {
    /// Rebuild step: a message read back from storage, in storage order.
    pub fn recover_message(&mut self, message: &Message, locator: L) -> Result<(), String> {
        match self.streams.get_mut(&message.channel) {
            Some(stream) => stream.push_recovered(message, locator, true),
            None => {
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
