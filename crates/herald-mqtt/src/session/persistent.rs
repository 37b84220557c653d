//! Persistent sessions (v3 `clean_session = 0`, v5 Session Expiry Interval > 0): opening and
//! resuming a stored session, write-ahead saves, and deliveries served from the channel logs.
//!
//! # How deliveries work in a persistent session
//! The session keeps a cursor per channel: the last message handed to the client. A live
//! message (from the driver's feed) whose serial follows the cursor goes out at once when the
//! window has room. Anything else — a gap, a full window, a resumed session, a feed that
//! dropped messages — marks the channel *behind*, and the session reads what it owes from the
//! log ([`Action::ReadChannel`]) as the window frees up. Nothing waits in memory, so nothing
//! is dropped: a slow or absent client only leaves its cursor behind. Channels without a
//! cursor owe the messages stored since the subscription was granted.
//!
//! # Write-ahead
//! Every change to the stored state (cursors, packet ids, QoS 2 stages, subscriptions) is made
//! durable before any packet that depends on it leaves: while changes are unsaved, outgoing
//! packets wait in `held`, one [`Action::SaveSession`] covers all changes made so far, and
//! its answer releases the packets it covers, in order. So a crash never makes the server
//! forget what the client was told: a QoS 2 delivery is never sent twice as new, a released
//! one is never sent again, and a SUBACK is never undone. A QoS 2 PUBLISH from the client is
//! saved (with its message id) before it is appended: the store commits in queue order, so a
//! durable message always has its id recorded, and a re-sent PUBLISH after a crash reuses the
//! id and is deduplicated by the store.
//!
//! # Invariants
//! - At most one [`Action::ReadChannel`] is outstanding; a read asks for no more QoS 1/2
//!   deliveries than the window has room for.
//! - A channel is in `behind` while the log may hold messages for it past its cursor that
//!   were not handed out; it leaves only when a read reached the newest message seen.
//! - `held` is bounded: no live delivery or read is started while it holds
//!   [`HELD_PACKETS_MAX`] packets.

use std::collections::{BTreeMap, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};

use herald_core::{ChannelName, Message, MessageId, Position};
use rmqtt_codec::types::QoS;
use rmqtt_codec::v5::DisconnectReasonCode;

use super::outbound::{Awaiting, Outbound, Source};
use super::stored::{
    STORED_SESSION_FORMAT, StoredInbound, StoredOutbound, StoredSession, StoredSubscription,
};
use super::subscriptions::{Options, Subscription};
use super::{Action, Packet, Session};
use crate::topic::TopicFilter;

/// Packets waiting for a save, at most, before deliveries pause.
pub const HELD_PACKETS_MAX: usize = 1024;
/// Messages asked for by one read when only QoS 0 deliveries are possible.
pub const READ_PAGE_MAX: usize = 256;

/// Where a read of a channel starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadStart {
    /// Just after this position.
    After(Position),
    /// At the first message stored at or after this time (ms since the Unix epoch).
    Since(u64),
}

/// The answer to [`Action::ReadChannel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelRead {
    /// Messages in serial order (at most the limit asked for). `through`: the last position
    /// the read examined (past expired messages it skipped, or the channel's newest message
    /// when a `Since` read found nothing owed); `None` for an empty channel. `more`: the log
    /// holds more after `through`.
    Page {
        messages: Vec<Message>,
        through: Option<Position>,
        more: bool,
    },
    /// The cursor is no longer retained (or the channel was reset); the session continues
    /// after `resume_after`, and the messages in between are lost to it.
    ContinuityLost { resume_after: Position },
    /// The store failed.
    Failed(String),
}

/// A resumed session's packets to send again: PUBREL ids, then PUBLISH ids with their
/// messages' places.
pub(super) type Resume = (Vec<NonZeroU16>, Vec<(NonZeroU16, ChannelName, Position)>);

/// What the driver must do with the stored session when the connection has ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Not persistent: nothing is stored.
    Nothing,
    /// Save this state (with `disconnected_ms` set) so it outlives the connection.
    Keep(StoredSession),
    /// Remove the stored session (it was resumed with a Session Expiry Interval of 0).
    Remove,
}

#[derive(Clone, Debug, Default)]
struct Behind {
    /// The newest message seen live while behind: reads go on until they reach it.
    seen_top: Option<Position>,
}

/// The state of a persistent session that is not in [`Session`] already.
#[derive(Debug)]
pub(super) struct Persistence {
    pub(super) expiry_secs: u32,
    cursors: BTreeMap<ChannelName, Position>,
    behind: BTreeMap<ChannelName, Behind>,
    /// QoS 2 publishes of the client until PUBREL, with the message id they are stored under.
    pub(super) inbound_ids: BTreeMap<NonZeroU16, MessageId>,
    /// The channel being read.
    reading: Option<ChannelName>,
    /// The channel read last (reads take the channels behind in turn).
    last_read: Option<ChannelName>,
    /// False until the channels owed after a resume or a feed gap are known.
    synced: bool,
    /// Re-sent PUBLISH packets waiting for their message.
    resends_pending: usize,
    generation: u64,
    requested: u64,
    durable: u64,
    held: VecDeque<(u64, Packet)>,
    /// Order of assignment of outbound packet ids (stored order of `outbound`).
    pub(super) next_order: u64,
    /// Deliveries lost to the session: re-sends whose message was gone, positions out of
    /// retention (counted by the driver through [`Action::ContinuityLost`] as well).
    pub(super) lost: u64,
}

impl Persistence {
    pub(super) fn new(expiry_secs: u32) -> Persistence {
        Persistence {
            expiry_secs,
            cursors: BTreeMap::new(),
            behind: BTreeMap::new(),
            inbound_ids: BTreeMap::new(),
            reading: None,
            last_read: None,
            synced: true,
            resends_pending: 0,
            generation: 0,
            requested: 0,
            durable: 0,
            held: VecDeque::new(),
            next_order: 0,
            lost: 0,
        }
    }
}

impl Session {
    /// Whether this connection serves a stored session.
    pub fn is_persistent(&self) -> bool {
        self.persistence.is_some()
    }

    /// What to do with the stored session once the connection has ended (call after
    /// [`Action::Close`]).
    pub fn session_end(&self) -> SessionEnd {
        match &self.persistence {
            None => SessionEnd::Nothing,
            Some(persistence) if persistence.expiry_secs == 0 => SessionEnd::Remove,
            Some(_) => SessionEnd::Keep(self.stored_state()),
        }
    }

    /// Another connection claimed this client id: v5 DISCONNECT 0x8E, then close.
    pub fn handle_taken_over(&mut self) {
        self.close(
            DisconnectReasonCode::SessionTakenOver,
            "another connection took this client id over",
        );
    }

    /// The answer to [`Action::SaveSession`].
    pub fn handle_session_saved(&mut self, generation: u64, result: Result<(), String>) {
        if self.is_closed() {
            return;
        }
        if let Err(error) = result {
            return self.close(
                DisconnectReasonCode::UnspecifiedError,
                &format!("the session could not be saved: {error}"),
            );
        }
        let Some(persistence) = self.persistence.as_mut() else {
            return;
        };
        persistence.durable = persistence.durable.max(generation);
        let mut released = Vec::new();
        while persistence
            .held
            .front()
            .is_some_and(|(needed, _)| *needed <= persistence.durable)
        {
            released.push(persistence.held.pop_front().expect("checked").1);
        }
        for packet in released {
            self.actions.push_back(Action::Send(packet));
        }
        self.pump_reads();
    }

    /// The answer to [`Action::ListChannels`]: every stored channel matching the filters.
    pub fn handle_channels_listed(&mut self, channels: Vec<ChannelName>) {
        if self.is_closed() {
            return;
        }
        let matching: Vec<ChannelName> = channels
            .into_iter()
            .filter(|channel| self.matching_subscriptions(channel).next().is_some())
            .collect();
        let Some(persistence) = self.persistence.as_mut() else {
            return;
        };
        for channel in matching {
            persistence.behind.entry(channel).or_default();
        }
        persistence.synced = true;
        self.pump_reads();
    }

    /// The driver's feed dropped messages: which channels lost some is unknown, so every
    /// matching channel is checked against the log.
    pub fn handle_feed_gap(&mut self) {
        if let Some(persistence) = self.persistence.as_mut()
            && persistence.synced
        {
            persistence.synced = false;
            let filters = self.cursor_filters();
            self.actions.push_back(Action::ListChannels { filters });
        }
    }

    /// The answer to [`Action::ReadForResend`]: the message of an unacknowledged delivery of
    /// the stored session (`None`: it is gone, expired or out of retention).
    pub fn handle_resend_read(&mut self, packet_id: NonZeroU16, message: Option<Message>) {
        if self.is_closed() {
            return;
        }
        let Some(persistence) = self.persistence.as_mut() else {
            return;
        };
        persistence.resends_pending = persistence.resends_pending.saturating_sub(1);
        let Some(entry) = self.outbound.get(&packet_id) else {
            return;
        };
        let Some(source) = entry.source.clone() else {
            return;
        };
        match message {
            Some(message) => {
                let delivery = self.delivery_of(
                    &message,
                    source.qos,
                    source.retain,
                    source.subscription_ids.clone(),
                );
                self.send_publish(delivery, Some(packet_id), true);
            }
            None => {
                self.outbound.remove(&packet_id);
                if let Some(persistence) = self.persistence.as_mut() {
                    persistence.lost += 1;
                }
                self.mark_dirty();
            }
        }
        self.pump_reads();
    }

    /// The answer to [`Action::ReadChannel`].
    pub fn handle_channel_read(&mut self, channel: &ChannelName, read: ChannelRead) {
        if self.is_closed() {
            return;
        }
        let Some(persistence) = self.persistence.as_mut() else {
            return;
        };
        if persistence.reading.as_ref() == Some(channel) {
            persistence.reading = None;
        }
        match read {
            ChannelRead::Failed(error) => {
                return self.close(
                    DisconnectReasonCode::ImplementationSpecificError,
                    &format!("reading {channel} for the session failed: {error}"),
                );
            }
            ChannelRead::ContinuityLost { resume_after } => {
                persistence.lost += 1;
                let from = persistence
                    .cursors
                    .insert(channel.clone(), resume_after.clone());
                self.mark_dirty();
                self.actions.push_back(Action::ContinuityLost {
                    channel: channel.clone(),
                    after: from,
                    resume_after: resume_after.clone(),
                });
                if self.version == super::Version::V5 {
                    // The one way to tell a v5 client; the cursor moved on, so the next
                    // connection continues after the gap instead of meeting it again.
                    return self.close(
                        DisconnectReasonCode::ImplementationSpecificError,
                        &format!(
                            "messages of {} before {resume_after} are no longer retained; \
                             the session continues after them",
                            crate::topic::channel_to_topic(channel)
                        ),
                    );
                }
            }
            ChannelRead::Page {
                messages,
                through,
                more,
            } => {
                let mut complete = true;
                for message in &messages {
                    if !self.hand_out(message) {
                        complete = false;
                        break;
                    }
                }
                let persistence = self.persistence.as_mut().expect("checked");
                if complete {
                    if let Some(through) = through {
                        let cursor = persistence.cursors.get(channel);
                        if cursor.is_none_or(|cursor| before(cursor, &through)) {
                            persistence.cursors.insert(channel.clone(), through);
                            self.mark_dirty();
                        }
                    }
                    let persistence = self.persistence.as_mut().expect("checked");
                    let caught_up = !more
                        && persistence.behind.get(channel).is_none_or(|behind| {
                            behind.seen_top.as_ref().is_none_or(|top| {
                                persistence
                                    .cursors
                                    .get(channel)
                                    .is_some_and(|cursor| !before(cursor, top))
                            })
                        });
                    if caught_up {
                        persistence.behind.remove(channel);
                    }
                }
            }
        }
        self.pump_reads();
    }

    // ----- internals shared with the other flows -----

    /// A live message of a persistent session: sent at once when it follows the channel's
    /// cursor and there is room, otherwise left to the log.
    pub(super) fn deliver_live_persistent(&mut self, message: &Message) {
        let position = message.position();
        let persistence = self.persistence.as_mut().expect("persistent");
        let follows = match persistence.cursors.get(&message.channel) {
            Some(cursor) => {
                cursor.epoch == message.epoch && cursor.serial.0 + 1 == message.serial.0
            }
            // The first message of a channel since the subscriptions matching it were made
            // (channels existing at resume all got a cursor or a place in `behind`).
            None => true,
        };
        let behind = persistence.behind.contains_key(&message.channel);
        if persistence.synced
            && !behind
            && follows
            && self.has_room_for(message)
            && self.hand_out(message)
        {
            return;
        }
        let persistence = self.persistence.as_mut().expect("persistent");
        let entry = persistence
            .behind
            .entry(message.channel.clone())
            .or_default();
        if entry
            .seen_top
            .as_ref()
            .is_none_or(|top| before(top, &position) || top.epoch != position.epoch)
        {
            entry.seen_top = Some(position);
        }
        self.pump_reads();
    }

    /// Hands one message of a read or of the feed to the client (or skips it when no
    /// subscription wants it). False when it could not go out for lack of room: the cursor
    /// stays before it.
    fn hand_out(&mut self, message: &Message) -> bool {
        if !self.is_connected() {
            return false;
        }
        let plan = self.plan_delivery(message);
        let Some((qos, retain, ids)) = plan else {
            self.advance_cursor(message);
            return true;
        };
        if !self.has_room(qos) {
            return false;
        }
        self.advance_cursor(message);
        let delivery = self.delivery_of(message, qos, retain, ids.clone());
        if !self.fits_peer(&delivery) {
            // MQTT-3.1.2-25: discarded as if delivered.
            self.deliveries_dropped += 1;
            return true;
        }
        let packet_id = (qos != QoS::AtMostOnce).then(|| {
            let packet_id = self.allocate_packet_id();
            let persistence = self.persistence.as_mut().expect("persistent");
            persistence.next_order += 1;
            self.outbound.insert(
                packet_id,
                Outbound {
                    stage: if qos == QoS::AtLeastOnce {
                        Awaiting::Puback
                    } else {
                        Awaiting::Pubrec
                    },
                    source: Some(Source {
                        channel: message.channel.clone(),
                        position: message.position(),
                        qos,
                        retain,
                        subscription_ids: ids,
                        order: persistence.next_order,
                    }),
                },
            );
            packet_id
        });
        self.send_publish(delivery, packet_id, false);
        true
    }

    fn advance_cursor(&mut self, message: &Message) {
        let persistence = self.persistence.as_mut().expect("persistent");
        persistence
            .cursors
            .insert(message.channel.clone(), message.position());
        self.mark_dirty();
    }

    fn has_room(&self, qos: QoS) -> bool {
        let persistence = self.persistence.as_ref().expect("persistent");
        persistence.held.len() < HELD_PACKETS_MAX
            && (qos == QoS::AtMostOnce || self.outbound.len() < usize::from(self.outbound_window))
    }

    fn has_room_for(&self, message: &Message) -> bool {
        match self.plan_delivery(message) {
            Some((qos, _, _)) => self.has_room(qos),
            None => true,
        }
    }

    /// Starts the next read of a channel that is behind, when nothing else is being read,
    /// resends are answered and there is room.
    pub(super) fn pump_reads(&mut self) {
        if !self.is_connected() {
            return;
        }
        let Some(persistence) = self.persistence.as_ref() else {
            return;
        };
        if persistence.reading.is_some()
            || !persistence.synced
            || persistence.resends_pending > 0
            || persistence.held.len() >= HELD_PACKETS_MAX
        {
            return;
        }
        let window_room = usize::from(self.outbound_window).saturating_sub(self.outbound.len());
        // In turn, starting after the channel read last: a busy channel does not starve the
        // others.
        let after_last = persistence.last_read.as_ref().map_or_else(
            || persistence.behind.range::<ChannelName, _>(..),
            |last| {
                persistence.behind.range::<ChannelName, _>((
                    std::ops::Bound::Excluded(last),
                    std::ops::Bound::Unbounded,
                ))
            },
        );
        let wrapped = persistence.behind.range::<ChannelName, _>(..);
        let next = after_last
            .chain(wrapped)
            .map(|(channel, _)| channel)
            .find_map(|channel| {
                let max_qos = self
                    .matching_subscriptions(channel)
                    .map(|subscription| subscription.qos)
                    .max()?;
                let limit = if max_qos == QoS::AtMostOnce {
                    READ_PAGE_MAX
                } else {
                    window_room.min(READ_PAGE_MAX)
                };
                (limit > 0).then(|| (channel.clone(), limit))
            });
        // Channels no subscription matches any more are forgotten.
        let unmatched: Vec<ChannelName> = persistence
            .behind
            .keys()
            .filter(|channel| self.matching_subscriptions(channel).next().is_none())
            .cloned()
            .collect();
        let since = next.as_ref().and_then(|(channel, _)| {
            self.matching_subscriptions(channel)
                .map(|subscription| subscription.since_ms)
                .min()
        });
        let persistence = self.persistence.as_mut().expect("checked");
        for channel in unmatched {
            persistence.behind.remove(&channel);
        }
        let Some((channel, limit)) = next else {
            return;
        };
        let from = match persistence.cursors.get(&channel) {
            Some(cursor) => ReadStart::After(cursor.clone()),
            None => ReadStart::Since(since.unwrap_or(0)),
        };
        persistence.reading = Some(channel.clone());
        persistence.last_read = Some(channel.clone());
        self.actions.push_back(Action::ReadChannel {
            channel,
            from,
            limit,
        });
    }

    pub(super) fn matching_subscriptions<'a>(
        &'a self,
        channel: &'a ChannelName,
    ) -> impl Iterator<Item = &'a Subscription> + 'a {
        // Shared subscriptions are served by their group, not by the session's cursors.
        self.subscriptions
            .values()
            .filter(|subscription| subscription.share.is_none())
            .filter(move |subscription| subscription.filter.matches_channel(channel))
    }

    /// Records a change of the stored state: packets sent from now on wait for a save.
    pub(super) fn mark_dirty(&mut self) {
        if let Some(persistence) = self.persistence.as_mut() {
            persistence.generation += 1;
        }
    }

    /// Asks for a save of every change so far, now (before the next action).
    pub(super) fn save_now(&mut self) {
        let Some(persistence) = self.persistence.as_ref() else {
            return;
        };
        if persistence.generation > persistence.requested {
            let generation = persistence.generation;
            let state = self.stored_state();
            let persistence = self.persistence.as_mut().expect("checked");
            persistence.requested = generation;
            self.actions
                .push_back(Action::SaveSession { generation, state });
        }
    }

    /// A packet of a persistent session: held while changes before it are not durable.
    /// Returns the packet back when it may go out now.
    pub(super) fn hold_if_unsaved(&mut self, packet: Packet) -> Option<Packet> {
        let Some(persistence) = self.persistence.as_mut() else {
            return Some(packet);
        };
        if persistence.held.is_empty() && persistence.generation <= persistence.durable {
            return Some(packet);
        }
        persistence.held.push_back((persistence.generation, packet));
        None
    }

    /// Called when the action queue is empty: a save for held packets, if none covers them.
    pub(super) fn save_for_held(&mut self) {
        if self.is_closed() {
            return;
        }
        if self
            .persistence
            .as_ref()
            .is_some_and(|persistence| !persistence.held.is_empty())
        {
            self.save_now();
        }
    }

    /// Opens the persistent side of the session: a new one (`stored` is `None`: saved before
    /// the CONNACK) or a resumed one.
    pub(super) fn open_persistence(&mut self, expiry_secs: u32, stored: Option<StoredSession>) {
        self.persistence = Some(Persistence::new(expiry_secs));
        let Some(stored) = stored else {
            self.mark_dirty();
            return;
        };
        for subscription in stored.subscriptions {
            let parsed = match crate::topic::parse_shared(&subscription.filter) {
                Ok(Some((share, filter))) => Some((Some(share), filter)),
                Ok(None) => TopicFilter::parse(&subscription.filter)
                    .ok()
                    .map(|filter| (None, filter)),
                Err(_) => None,
            };
            let Some((share, filter)) = parsed else {
                continue;
            };
            let qos = QoS::try_from(subscription.qos).unwrap_or(QoS::AtMostOnce);
            self.actions.push_back(match &share {
                None => Action::Subscribe {
                    filter: filter.clone(),
                    qos,
                },
                Some(share) => Action::SubscribeShared {
                    key: subscription.filter.clone(),
                    share: share.clone(),
                    filter: filter.clone(),
                },
            });
            self.subscriptions.insert(
                subscription.filter,
                Subscription {
                    filter,
                    share,
                    qos,
                    options: Options {
                        no_local: subscription.no_local,
                        retain_as_published: subscription.retain_as_published,
                        subscription_id: subscription.subscription_id.and_then(NonZeroU32::new),
                        ..Options::default()
                    },
                    since_ms: subscription.since_ms,
                },
            );
        }
        let persistence = self.persistence.as_mut().expect("just set");
        for (channel, position) in stored.cursors {
            if let (Ok(channel), Ok(position)) =
                (ChannelName::parse(&channel), Position::parse(&position))
            {
                persistence.cursors.insert(channel, position);
            }
        }
        for inbound in stored.inbound {
            let (Some(packet_id), Ok(message_id)) = (
                NonZeroU16::new(inbound.packet_id),
                MessageId::parse(&inbound.message_id),
            ) else {
                continue;
            };
            persistence.inbound_ids.insert(packet_id, message_id);
            if inbound.received {
                self.inbound
                    .insert(packet_id, super::inbound::Inbound::Received);
            }
        }
        self.next_packet_id = stored.next_packet_id.max(1);
        let mut resends = Vec::new();
        let mut releases = Vec::new();
        for entry in stored.outbound {
            let (Some(packet_id), Ok(channel), Ok(position), Ok(qos)) = (
                NonZeroU16::new(entry.packet_id),
                ChannelName::parse(&entry.channel),
                Position::parse(&entry.position),
                QoS::try_from(entry.qos),
            ) else {
                continue;
            };
            let persistence = self.persistence.as_mut().expect("just set");
            persistence.next_order += 1;
            let stage = match (qos, entry.released) {
                (_, true) => Awaiting::Pubcomp,
                (QoS::ExactlyOnce, false) => Awaiting::Pubrec,
                _ => Awaiting::Puback,
            };
            self.outbound.insert(
                packet_id,
                Outbound {
                    stage,
                    source: Some(Source {
                        channel: channel.clone(),
                        position: position.clone(),
                        qos,
                        retain: entry.retain,
                        subscription_ids: entry
                            .subscription_ids
                            .into_iter()
                            .filter_map(NonZeroU32::new)
                            .collect(),
                        order: persistence.next_order,
                    }),
                },
            );
            if entry.released {
                releases.push(packet_id);
            } else {
                resends.push((packet_id, channel, position));
            }
        }
        let persistence = self.persistence.as_mut().expect("just set");
        persistence.resends_pending = resends.len();
        persistence.synced = false;
        self.pending_resume = Some((releases, resends));
    }

    /// After the CONNACK of a resumed session: PUBREL and PUBLISH packets again (MQTT-4.4.0-1),
    /// then the catch-up of what was published meanwhile.
    pub(super) fn resume_deliveries(&mut self) {
        let Some((releases, resends)) = self.pending_resume.take() else {
            return;
        };
        for packet_id in releases {
            self.send_pubrel(packet_id);
        }
        for (packet_id, channel, position) in resends {
            self.actions.push_back(Action::ReadForResend {
                packet_id,
                channel,
                position,
            });
        }
        let filters = self.cursor_filters();
        self.actions.push_back(Action::ListChannels { filters });
    }

    /// The filters served by the session's cursors (not the shared ones).
    fn cursor_filters(&self) -> Vec<TopicFilter> {
        self.subscriptions
            .values()
            .filter(|subscription| subscription.share.is_none())
            .map(|subscription| subscription.filter.clone())
            .collect()
    }

    /// The state to store, as of now.
    pub(super) fn stored_state(&self) -> StoredSession {
        let persistence = self.persistence.as_ref().expect("persistent");
        let mut outbound: Vec<(u64, StoredOutbound)> = self
            .outbound
            .iter()
            .filter_map(|(packet_id, entry)| {
                let source = entry.source.as_ref()?;
                Some((
                    source.order,
                    StoredOutbound {
                        packet_id: packet_id.get(),
                        channel: source.channel.to_string(),
                        position: source.position.to_string(),
                        qos: source.qos.value(),
                        retain: source.retain,
                        subscription_ids: source
                            .subscription_ids
                            .iter()
                            .map(|id| id.get())
                            .collect(),
                        released: entry.stage == Awaiting::Pubcomp,
                    },
                ))
            })
            .collect();
        outbound.sort_by_key(|(order, _)| *order);
        StoredSession {
            format: STORED_SESSION_FORMAT,
            client_id: self.client_id.clone(),
            owner: None,
            expiry_secs: persistence.expiry_secs,
            disconnected_ms: None,
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(key, subscription)| StoredSubscription {
                    filter: key.clone(),
                    qos: subscription.qos.value(),
                    no_local: subscription.options.no_local,
                    retain_as_published: subscription.options.retain_as_published,
                    subscription_id: subscription.options.subscription_id.map(NonZeroU32::get),
                    since_ms: subscription.since_ms,
                })
                .collect(),
            cursors: persistence
                .cursors
                .iter()
                .map(|(channel, position)| (channel.to_string(), position.to_string()))
                .collect(),
            outbound: outbound.into_iter().map(|(_, entry)| entry).collect(),
            inbound: persistence
                .inbound_ids
                .iter()
                .map(|(packet_id, message_id)| StoredInbound {
                    packet_id: packet_id.get(),
                    message_id: message_id.as_str().to_owned(),
                    received: self.inbound.get(packet_id)
                        == Some(&super::inbound::Inbound::Received),
                })
                .collect(),
            next_packet_id: self.next_packet_id,
        }
    }
}

/// Whether `a` comes strictly before `b` in one epoch (positions of different epochs are
/// not ordered: a reset channel is read from the log).
fn before(a: &Position, b: &Position) -> bool {
    a.epoch == b.epoch && a.serial < b.serial
}
