//! The invariants of `docs/delivery.md` that a simulated run can check, as a [`Checker`] fed
//! with every acknowledgement and every event the SDK sessions hand their application.
//!
//! Positions are `(epoch, serial)`: a wiped store starts a new epoch, and what was
//! acknowledged in the old one is owed to exactly-once subscribers only as a
//! `continuity_lost` notice.
//!
//! Checked as each event arrives (so a violation names the step it happened in):
//! - **C1** no session ever reports [`Event::Broken`] (a `prev` or chain mismatch, a hole, a
//!   foreign epoch without notice): the server never skips silently, never alters a message;
//! - **E1** an exactly-once subscriber never gets a position twice, and serials only go up
//!   within an epoch (across reconnects and server restarts); it never gets a `gap`;
//! - **A1** an at-most-once subscriber's serials only go up within an epoch;
//! - **P3** a channel's epoch changes only when its store was wiped, and `epoch_changed`
//!   notices only come after a wipe;
//! - **W3** an id is acknowledged with one position only, and a position carries one id;
//! - a delivered message is the one that was acknowledged at its position;
//! - no subscription is ended by the server (`error`) or closed by the SDK.
//!
//! Checked once the run has drained ([`Checker::finish`]):
//! - **E1/E2** every acknowledged position after the subscription's start (`after` of its
//!   first `subscribed`) reached every exactly-once subscriber exactly once, or is covered by
//!   a `skip` (filtered, expired) or a `continuity_lost` range, never both; a `retention`
//!   range only claims serials retention really removed. One exception, which no protocol
//!   can close: messages of a store incarnation that was wiped before the subscriber heard of
//!   it at all (it never held a position there, and the wipe erased the evidence);
//! - **F1** a filtered skip covers only messages the filter rejects;
//! - **W3** the store holds each id once.

use std::collections::{BTreeMap, BTreeSet};

use herald_client::Event;
use herald_core::{ChannelName, Guarantee, Position, ReadFrom, Serial};
use herald_log::{LogStore, ReadError, ReadQuery};
use herald_protocol::ws::Ack;

/// `(epoch, serial)` as text and number, ordered for maps.
type Key = (String, u64);

fn key(position: &Position) -> Key {
    (position.epoch.to_string(), position.serial.0)
}

/// What a subscriber saw, for the final accounting.
#[derive(Debug)]
struct Seen {
    guarantee: Guarantee,
    channel: String,
    /// Rejects messages whose header `kind` is this.
    rejects_kind: Option<String>,
    last: Option<Position>,
    /// `after` of the first `subscribed` (`None` inside: the channel was empty), and how
    /// many wipes had happened then.
    start: Option<(Option<Position>, u64)>,
    delivered: BTreeMap<Key, String>,
    /// Epochs this subscriber heard of (in a reply, a message or a notice).
    epochs: BTreeSet<String>,
    /// Ranges covered by a notice: epoch, first and last serial, reason.
    covered: Vec<(String, u64, u64, String)>,
}

#[derive(Debug, Default)]
pub struct Checker {
    /// Per channel: `(epoch, id)` -> position acknowledged.
    ids: BTreeMap<String, BTreeMap<(String, String), Position>>,
    /// Per channel: position acknowledged -> id, and how many wipes had happened then (a
    /// wipe cuts every connection, so an ack always arrives in the incarnation it was made).
    acked: BTreeMap<String, BTreeMap<Key, (String, u64)>>,
    /// Per channel: the epochs seen, oldest first.
    epochs: BTreeMap<String, Vec<String>>,
    subscribers: BTreeMap<usize, Seen>,
    wipes: u64,
    pub violations: Vec<String>,
    pub messages_checked: u64,
    pub notices_checked: u64,
}

impl Checker {
    /// Declares a subscriber before anything of it is seen.
    pub fn subscriber(
        &mut self,
        client: usize,
        channel: &str,
        guarantee: Guarantee,
        rejects_kind: Option<&str>,
    ) {
        self.subscribers.insert(
            client,
            Seen {
                guarantee,
                channel: channel.to_owned(),
                rejects_kind: rejects_kind.map(str::to_owned),
                last: None,
                start: None,
                delivered: BTreeMap::new(),
                epochs: BTreeSet::new(),
                covered: Vec::new(),
            },
        );
    }

    /// The store was wiped: every channel may start a new epoch.
    pub fn on_wipe(&mut self) {
        self.wipes += 1;
    }

    fn violation(&mut self, step: u64, what: String) {
        self.violations.push(format!("step {step}: {what}"));
    }

    /// Records the epoch of a position seen on `channel`; a new one needs a wipe.
    fn epoch_seen(&mut self, step: u64, channel: &str, position: &Position) {
        let epoch = position.epoch.to_string();
        let known = self.epochs.entry(channel.to_owned()).or_default();
        if known.contains(&epoch) {
            return;
        }
        known.push(epoch.clone());
        let count = known.len() as u64;
        if count > self.wipes + 1 {
            self.violation(
                step,
                format!("P3: {channel} has a new epoch {epoch} without a wipe of its store"),
            );
        }
    }

    pub fn on_ack(&mut self, step: u64, client: usize, channel: &str, ack: &Ack) {
        let Ok(position) = Position::parse(&ack.position) else {
            self.violation(step, format!("client {client}: malformed ack {ack:?}"));
            return;
        };
        self.epoch_seen(step, channel, &position);
        let by_id = self.ids.entry(channel.to_owned()).or_default();
        let id_key = (position.epoch.to_string(), ack.id.clone());
        if let Some(earlier) = by_id.insert(id_key, position.clone())
            && earlier != position
        {
            self.violation(
                step,
                format!(
                    "W3: id {} on {channel} acknowledged at {earlier} and at {position}",
                    ack.id
                ),
            );
        }
        let by_position = self.acked.entry(channel.to_owned()).or_default();
        if let Some((earlier, _)) = by_position.insert(key(&position), (ack.id.clone(), self.wipes))
            && earlier != ack.id
        {
            self.violation(
                step,
                format!(
                    "W3: {position} on {channel} acknowledged for {earlier} and {}",
                    ack.id
                ),
            );
        }
    }

    pub fn on_event(&mut self, step: u64, client: usize, channel: &str, event: &Event) {
        let Some(seen) = self.subscribers.get(&client) else {
            return;
        };
        let guarantee = seen.guarantee;
        let last = seen.last.clone();
        let who = format!("client {client} ({guarantee}) on {channel}");
        let heard: Vec<String> = match event {
            Event::Subscribed { after, .. } => after.iter().map(|p| p.epoch.to_string()).collect(),
            Event::Message(message) => vec![message.position.epoch.to_string()],
            Event::Skip { from, to, .. }
            | Event::Gap { from, to, .. }
            | Event::ContinuityLost {
                from, to: Some(to), ..
            } => vec![from.epoch.to_string(), to.epoch.to_string()],
            Event::ContinuityLost { from, .. } => vec![from.epoch.to_string()],
            _ => Vec::new(),
        };
        if let Some(seen) = self.subscribers.get_mut(&client) {
            seen.epochs.extend(heard);
        }
        // The last serial accounted for in `epoch` (0: nothing yet in that epoch).
        let last_in = |epoch: &herald_core::Epoch| {
            last.as_ref()
                .filter(|last| last.epoch == *epoch)
                .map_or(0, |last| last.serial.0)
        };
        match event {
            Event::Subscribed { after, .. } => {
                if let Some(after) = after {
                    self.epoch_seen(step, channel, after);
                }
                let seen = self.subscribers.get_mut(&client).expect("checked");
                if seen.start.is_none() {
                    seen.start = Some((after.clone(), self.wipes));
                }
            }
            Event::Message(message) => {
                self.messages_checked += 1;
                let serial = message.serial().0;
                self.epoch_seen(step, channel, &message.position);
                let before = last_in(&message.position.epoch);
                if serial <= before {
                    self.violation(
                        step,
                        format!(
                            "E1/A1: {who} got {} after serial {before} (repeat or reorder)",
                            message.position
                        ),
                    );
                }
                let position = key(&message.position);
                if let Some((acked, _)) = self.acked.get(channel).and_then(|map| map.get(&position))
                    && *acked != message.id
                {
                    self.violation(
                        step,
                        format!(
                            "{who} got id {} at {}, acknowledged for {acked}",
                            message.id, message.position
                        ),
                    );
                }
                let seen = self.subscribers.get_mut(&client).expect("checked");
                let rejected = seen
                    .rejects_kind
                    .as_ref()
                    .is_some_and(|kind| message.headers.get("kind") == Some(kind));
                let repeated = seen
                    .delivered
                    .insert(position, message.id.clone())
                    .is_some();
                seen.last = Some(message.position.clone());
                if rejected {
                    self.violation(
                        step,
                        format!(
                            "F1: {who} got {}, which its filter rejects",
                            message.position
                        ),
                    );
                }
                if repeated {
                    self.violation(step, format!("E1: {who} got {} twice", message.position));
                }
            }
            Event::Skip { from, to, reason }
            | Event::ContinuityLost {
                from,
                to: Some(to),
                reason,
            } => {
                self.notices_checked += 1;
                self.epoch_seen(step, channel, to);
                if reason == "epoch_changed" && self.wipes == 0 {
                    self.violation(
                        step,
                        format!("P3: {who} was told the epoch changed, but no store was wiped"),
                    );
                }
                let seen = self.subscribers.get_mut(&client).expect("checked");
                if from.epoch == to.epoch {
                    seen.covered.push((
                        to.epoch.to_string(),
                        from.serial.0,
                        to.serial.0,
                        reason.clone(),
                    ));
                } else {
                    // Everything after `from` in the old epoch, and up to `to` in the new one.
                    seen.covered.push((
                        from.epoch.to_string(),
                        from.serial.0,
                        u64::MAX,
                        reason.clone(),
                    ));
                    seen.covered
                        .push((to.epoch.to_string(), 1, to.serial.0, reason.clone()));
                }
                if to.serial.0 > last_in(&to.epoch) {
                    seen.last = Some(to.clone());
                }
            }
            Event::ContinuityLost {
                from,
                to: None,
                reason,
            } => {
                // The channel has no message at all: everything after `from` in its epoch is
                // gone, and delivery starts with the first message of the next one.
                self.notices_checked += 1;
                if self.wipes == 0 {
                    self.violation(
                        step,
                        format!(
                            "P3: {who} was told {from}.. is gone ({reason}), but no store was wiped"
                        ),
                    );
                }
                let seen = self.subscribers.get_mut(&client).expect("checked");
                seen.covered.push((
                    from.epoch.to_string(),
                    from.serial.0,
                    u64::MAX,
                    reason.clone(),
                ));
                seen.last = None;
            }
            Event::Gap { to, .. } => {
                self.notices_checked += 1;
                if guarantee == Guarantee::ExactlyOnce {
                    self.violation(step, format!("E1: {who} got a gap: {event:?}"));
                }
                let seen = self.subscribers.get_mut(&client).expect("checked");
                if to.serial.0 > last_in(&to.epoch) {
                    seen.last = Some(to.clone());
                }
            }
            Event::Broken(broken) => self.violation(
                step,
                format!("C1: {who}: the session saw a break: {broken:?}"),
            ),
            Event::Error { .. } | Event::Closed { .. } => {
                self.violation(step, format!("{who}: subscription ended: {event:?}"))
            }
            _ => {}
        }
    }

    /// The final accounting, once everything drained. `store` is the server's store.
    pub fn finish(&mut self, store: &dyn LogStore) {
        let step = u64::MAX;
        let subscribers = std::mem::take(&mut self.subscribers);
        for (client, seen) in &subscribers {
            self.account(step, *client, seen, store);
        }
        self.subscribers = subscribers;
        for channel in self.acked.keys().cloned().collect::<Vec<_>>() {
            let name = ChannelName::parse(&channel).expect("valid");
            let mut ids = BTreeSet::new();
            let mut from = ReadFrom::Oldest;
            loop {
                let query = ReadQuery::Forward {
                    from: from.clone(),
                    limit: 1000,
                };
                let page = match store.read(&name, &query) {
                    Ok(page) => page,
                    Err(ReadError::ContinuityLost(_)) => break,
                    Err(error) => panic!("the memory store read failed: {error}"),
                };
                for message in &page.messages {
                    if !ids.insert(message.id.to_string()) {
                        self.violation(
                            step,
                            format!("W3: id {} stored twice on {channel}", message.id),
                        );
                    }
                }
                match (page.more, page.next) {
                    (true, Some(next)) => from = ReadFrom::After(next),
                    _ => break,
                }
            }
        }
    }

    fn account(&mut self, step: u64, client: usize, seen: &Seen, store: &dyn LogStore) {
        let channel = ChannelName::parse(&seen.channel).expect("valid");
        let who = format!("client {client} ({}) on {}", seen.guarantee, seen.channel);
        let acked = self.acked.get(&seen.channel).cloned().unwrap_or_default();
        for (position, id) in &seen.delivered {
            if let Some((expected, _)) = acked.get(position)
                && expected != id
            {
                self.violation(
                    step,
                    format!("{who} got id {id} at {position:?}, acknowledged for {expected}"),
                );
            }
        }
        if seen.guarantee != Guarantee::ExactlyOnce {
            return;
        }
        let Some(start) = &seen.start else {
            self.violation(step, format!("{who} was never subscribed"));
            return;
        };
        // What the subscription owes: positions after its start (later incarnations of the
        // store owe everything).
        let (start_after, start_wipes) = start;
        let owed = |(epoch, serial): &Key, wipes: u64| match start_after {
            _ if wipes > *start_wipes => true,
            _ if wipes < *start_wipes => false,
            None => true,
            Some(after) => epoch != after.epoch.as_str() || *serial > after.serial.0,
        };
        let current = store.channel_status(&channel).expect("status");
        let current_epoch = current.as_ref().map(|status| status.epoch.to_string());
        // A wiped incarnation the subscriber never heard of (it held no position in it) left
        // nothing anyone could report: the wipe erased the evidence, and the subscriber had
        // nothing to resume from. That loss is out of reach of any notice.
        let reportable =
            |epoch: &str| Some(epoch) == current_epoch.as_deref() || seen.epochs.contains(epoch);
        let first_retained = |epoch: &str| match &current {
            Some(status) if status.epoch.as_str() == epoch => Some(
                status
                    .first
                    .as_ref()
                    .map_or(status.top.serial.0 + 1, |first| first.serial.0),
            ),
            _ => None,
        };
        let owed_positions = acked
            .iter()
            .filter(|(position, (_, wipes))| owed(position, *wipes) && reportable(&position.0))
            .map(|(position, _)| position);
        for position in owed_positions {
            let (epoch, serial) = position;
            let covered = seen
                .covered
                .iter()
                .find(|(covered_epoch, from, to, _)| {
                    covered_epoch == epoch && (*from..=*to).contains(serial)
                })
                .map(|(_, _, _, reason)| reason.clone());
            match (seen.delivered.contains_key(position), covered) {
                (true, Some(reason)) => self.violation(
                    step,
                    format!("E1: {who} got {epoch}:{serial} and also a {reason} notice for it"),
                ),
                (false, None) => self.violation(
                    step,
                    format!("E1: {who} never got acknowledged {epoch}:{serial}, nor a notice"),
                ),
                (false, Some(reason))
                    if reason == "retention"
                        && first_retained(epoch).is_some_and(|first| *serial >= first) =>
                {
                    self.violation(
                        step,
                        format!(
                            "E2: {who} was told {epoch}:{serial} was lost to retention, \
                             but the log still holds it"
                        ),
                    );
                }
                (false, Some(reason)) if reason == "filtered" => {
                    if let Some(kind) = kind_at(store, &channel, epoch, *serial)
                        && Some(&kind) != seen.rejects_kind.as_ref()
                    {
                        self.violation(
                            step,
                            format!("F1: {who} was told {epoch}:{serial} ({kind}) was filtered"),
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

/// The `kind` header of the message at `epoch:serial`, if the log still holds it.
fn kind_at(
    store: &dyn LogStore,
    channel: &ChannelName,
    epoch: &str,
    serial: u64,
) -> Option<String> {
    let status = store.channel_status(channel).ok()??;
    if status.epoch.as_str() != epoch {
        return None;
    }
    let query = ReadQuery::Forward {
        from: ReadFrom::After(Position::new(status.epoch, Serial(serial - 1))),
        limit: 1,
    };
    let page = store.read(channel, &query).ok()?;
    let message = page.messages.into_iter().next()?;
    (message.serial.0 == serial)
        .then(|| message.headers.get("kind").cloned())
        .flatten()
}
