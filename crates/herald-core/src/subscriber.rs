//! Durable (at-least-once) subscribers: the state the server holds for a named subscriber of a
//! channel, so that a device or service offline for hours still gets every message, in order,
//! once it comes back (DESIGN.md section 3, "subscribeWithBuffer").
//!
//! [`SubscriberState`] is the whole durable state of one subscriber. Stores persist it as one
//! small snapshot record per change (riding the same group commit as messages: no second fsync
//! path); the newest snapshot wins on recovery, and a removal is a tombstone.
//!
//! # Invariants
//! - `acked_through` only moves forward; `acked_above` holds only serials greater than
//!   `acked_through + 1` (a contiguous prefix is folded into `acked_through`), sorted, unique.
//! - `attempts` holds only serials greater than `acked_through` that are not in `acked_above`.
//! - Both lists are bounded by `options.inflight_max`, so a snapshot stays small.

use std::fmt;
use std::sync::Arc;

use crate::error::{ErrorCode, InvalidInput};
use crate::message::Timestamp;
use crate::names::{ChannelName, Epoch};
use crate::position::{Position, Serial};

/// Longest subscriber id, in bytes.
pub const SUBSCRIBER_ID_BYTES_MAX: usize = 128;

/// A client-chosen name for a durable subscriber, unique per channel: printable ASCII, no
/// spaces, at most 128 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SubscriberId(Arc<str>);

impl SubscriberId {
    pub fn parse(id: &str) -> Result<Self, InvalidInput> {
        let invalid = |message: String| InvalidInput::new(ErrorCode::InvalidRequest, message);
        if id.is_empty() {
            return Err(invalid("subscriber_id is empty".into()));
        }
        if id.len() > SUBSCRIBER_ID_BYTES_MAX {
            return Err(invalid(format!(
                "subscriber_id is {} bytes, the limit is {SUBSCRIBER_ID_BYTES_MAX}",
                id.len()
            )));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "subscriber_id must be printable ASCII without spaces".into(),
            ));
        }
        Ok(Self(Arc::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubscriberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a durable subscriber is served; chosen at first subscribe, kept with its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// A delivery not acked within this time is delivered again.
    pub ack_wait_ms: u64,
    /// Deliveries of one message before it goes to the dead-letter channel.
    pub max_deliveries: u32,
    /// Messages delivered and not yet acked, at most.
    pub inflight_max: u32,
    /// A subscriber not connected for this long is removed (0: never).
    pub expires_after_ms: u64,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        Self {
            ack_wait_ms: 30_000,
            max_deliveries: 5,
            inflight_max: 100,
            expires_after_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// The durable state of one subscriber of one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberState {
    pub channel: ChannelName,
    pub id: SubscriberId,
    /// The channel epoch `acked_through` belongs to. `None`: the subscriber was created while
    /// the channel had no messages, and starts with the channel's first message (there is
    /// no epoch to hold a position in yet); `acked_through` is then 0 and both lists empty.
    pub epoch: Option<Epoch>,
    /// Every serial up to and including this one is acknowledged (or dead-lettered).
    pub acked_through: Serial,
    /// Serials above `acked_through + 1` acknowledged individually, ascending.
    pub acked_above: Vec<Serial>,
    /// Delivery attempts so far of unacknowledged serials, ascending by serial.
    pub attempts: Vec<(Serial, u32)>,
    pub options: SubscriberOptions,
    pub created: Timestamp,
    /// Last time a connection held this subscriber (for idle expiry).
    pub last_active: Timestamp,
}

impl SubscriberState {
    /// A new subscriber that starts after `after` (exclusive).
    pub fn new(
        channel: ChannelName,
        id: SubscriberId,
        after: Position,
        options: SubscriberOptions,
        now: Timestamp,
    ) -> Self {
        Self {
            channel,
            id,
            epoch: Some(after.epoch),
            acked_through: after.serial,
            acked_above: Vec::new(),
            attempts: Vec::new(),
            options,
            created: now,
            last_active: now,
        }
    }

    /// A new subscriber of a channel without messages: it starts with the channel's first
    /// message, whatever epoch that gets.
    pub fn unplaced(
        channel: ChannelName,
        id: SubscriberId,
        options: SubscriberOptions,
        now: Timestamp,
    ) -> Self {
        Self {
            channel,
            id,
            epoch: None,
            acked_through: Serial::BEFORE_FIRST,
            acked_above: Vec::new(),
            attempts: Vec::new(),
            options,
            created: now,
            last_active: now,
        }
    }

    /// The acknowledged position (everything up to it is done); `None` before the channel's
    /// first message.
    pub fn acked_position(&self) -> Option<Position> {
        self.epoch
            .as_ref()
            .map(|epoch| Position::new(epoch.clone(), self.acked_through))
    }

    pub fn is_acked(&self, serial: Serial) -> bool {
        serial <= self.acked_through || self.acked_above.binary_search(&serial).is_ok()
    }

    /// Acknowledges every serial up to `through`. Returns whether anything changed.
    pub fn ack_through(&mut self, through: Serial) -> bool {
        if through <= self.acked_through {
            return false;
        }
        self.acked_through = through;
        self.normalise();
        true
    }

    /// Acknowledges one serial. Returns whether anything changed.
    pub fn ack_one(&mut self, serial: Serial) -> bool {
        if self.is_acked(serial) {
            return false;
        }
        if serial == self.acked_through.next() {
            self.acked_through = serial;
        } else if let Err(at) = self.acked_above.binary_search(&serial) {
            self.acked_above.insert(at, serial);
        }
        self.normalise();
        true
    }

    /// Delivery attempts of `serial` so far.
    pub fn attempts_of(&self, serial: Serial) -> u32 {
        self.attempts
            .binary_search_by_key(&serial, |(known, _)| *known)
            .map_or(0, |at| self.attempts[at].1)
    }

    /// Counts one more delivery of `serial`; returns the new count. An acknowledged serial is
    /// done and has no attempts: nothing is recorded and 0 is returned.
    pub fn record_attempt(&mut self, serial: Serial) -> u32 {
        if self.is_acked(serial) {
            return 0;
        }
        match self
            .attempts
            .binary_search_by_key(&serial, |(known, _)| *known)
        {
            Ok(at) => {
                self.attempts[at].1 += 1;
                self.attempts[at].1
            }
            Err(at) => {
                self.attempts.insert(at, (serial, 1));
                1
            }
        }
    }

    /// Folds the contiguous prefix of `acked_above` into `acked_through` and forgets attempts
    /// of acknowledged serials.
    fn normalise(&mut self) {
        let through = self.acked_through;
        self.acked_above.retain(|serial| *serial > through);
        while self.acked_above.first() == Some(&self.acked_through.next()) {
            self.acked_through = self.acked_above.remove(0);
        }
        let (through, above) = (self.acked_through, &self.acked_above);
        self.attempts
            .retain(|(serial, _)| *serial > through && above.binary_search(serial).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SubscriberState {
        SubscriberState::new(
            ChannelName::parse("jobs:a").unwrap(),
            SubscriberId::parse("worker-1").unwrap(),
            Position::new(Epoch::parse("E1").unwrap(), Serial(10)),
            SubscriberOptions::default(),
            Timestamp(0),
        )
    }

    #[test]
    fn individual_acks_fold_into_the_cumulative_position() {
        let mut state = state();
        assert!(state.ack_one(Serial(13)));
        assert!(state.ack_one(Serial(12)));
        assert_eq!(state.acked_through, Serial(10));
        assert_eq!(state.acked_above, vec![Serial(12), Serial(13)]);
        assert!(state.ack_one(Serial(11)));
        assert_eq!(state.acked_through, Serial(13));
        assert!(state.acked_above.is_empty());
        assert!(!state.ack_one(Serial(12)), "already acked");
    }

    #[test]
    fn cumulative_acks_move_forward_only_and_drop_attempts() {
        let mut state = state();
        assert_eq!(state.record_attempt(Serial(11)), 1);
        assert_eq!(state.record_attempt(Serial(11)), 2);
        assert_eq!(state.record_attempt(Serial(15)), 1);
        assert!(state.ack_one(Serial(16)));
        assert!(state.ack_through(Serial(14)));
        assert!(!state.ack_through(Serial(12)));
        assert_eq!(state.attempts, vec![(Serial(15), 1)]);
        assert_eq!(state.attempts_of(Serial(11)), 0);
        assert!(state.is_acked(Serial(16)) && !state.is_acked(Serial(15)));
        assert_eq!(
            state.record_attempt(Serial(12)),
            0,
            "acked: nothing to count"
        );
        assert_eq!(state.attempts, vec![(Serial(15), 1)]);
        assert!(state.ack_one(Serial(15)));
        assert_eq!(state.acked_through, Serial(16));
        assert!(state.attempts.is_empty());
    }

    #[test]
    fn subscriber_ids_are_validated() {
        assert!(SubscriberId::parse("").is_err());
        assert!(SubscriberId::parse("has space").is_err());
        assert!(SubscriberId::parse(&"x".repeat(129)).is_err());
        assert_eq!(SubscriberId::parse("dev-7").unwrap().as_str(), "dev-7");
    }
}
