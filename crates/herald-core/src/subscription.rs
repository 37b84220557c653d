//! The delivery cursor of one subscription: the sans-IO decision of what a subscriber gets next.
//!
//! A subscription's live feed hands messages to its [`Cursor`] in serial order, but the feed
//! may skip (a bounded live buffer overflowed, the subscriber was slow) and may repeat what a
//! history read already delivered. The cursor turns each offered message into a [`Step`]:
//!
//! - **exactly-once**: a skip becomes [`Step::CatchUp`] (read the missing serials from the log,
//!   then offer the message again), a repeat becomes [`Step::Duplicate`]. Every serial is
//!   therefore handed out exactly once, in order, whatever the feed does.
//! - **at-most-once**: a skip becomes [`Step::Gap`] (the range is reported, never silent) and
//!   the message is delivered; nothing is ever read back.
//!
//! Serials a subscriber does not receive as messages (filtered out, expired by TTL) are still
//! accounted for: [`SkipRun`] gathers consecutive ones into one `skip` notice, so a receiver
//! can tell every serial apart as delivered, skipped, dropped (gap) or lost (continuity).
//!
//! # Invariants
//! - `next` only moves forward; after [`Step::Deliver`] or [`Step::Gap`] it is `serial + 1`.
//! - An exactly-once cursor never produces [`Step::Gap`].
//! - A message from another epoch never advances the cursor ([`Step::EpochChanged`]).

use std::fmt;

use crate::chain::ChainHash;
use crate::error::InvalidInput;
use crate::names::Epoch;
use crate::position::{Position, Serial};

/// What a subscription asks for (DESIGN.md section 3). At-least-once (durable subscribers)
/// arrives with issue #5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Guarantee {
    AtMostOnce,
    ExactlyOnce,
}

impl Guarantee {
    pub fn as_str(self) -> &'static str {
        match self {
            Guarantee::AtMostOnce => "at-most-once",
            Guarantee::ExactlyOnce => "exactly-once",
        }
    }

    pub fn parse(text: &str) -> Result<Guarantee, InvalidInput> {
        match text {
            "at-most-once" => Ok(Guarantee::AtMostOnce),
            "exactly-once" => Ok(Guarantee::ExactlyOnce),
            "at-least-once" => Err(InvalidInput::request(
                "guarantee \"at-least-once\" is a durable subscriber: subscribe over WebSocket with a subscriber_id",
            )),
            other => Err(InvalidInput::request(format!(
                "unknown guarantee {other:?}; expected \"at-most-once\" or \"exactly-once\""
            ))),
        }
    }
}

impl fmt::Display for Guarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with one offered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Hand the message to the subscriber; the cursor moved past it.
    Deliver,
    /// The subscriber already has this serial; drop it.
    Duplicate,
    /// Exactly-once only: serials `from..=to` are missing before this message. Read them from
    /// the log (offering each to the cursor), then offer this message again.
    CatchUp { from: Serial, to: Serial },
    /// At-most-once only: serials `from..=to` were dropped. Report them, then deliver this
    /// message (the cursor already moved past it).
    Gap { from: Serial, to: Serial },
    /// The message belongs to another epoch than the cursor: the channel's history was reset.
    /// The cursor did not move; the caller reports continuity lost and starts a new cursor.
    EpochChanged,
}

/// Where one subscription stands in its channel's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    guarantee: Guarantee,
    epoch: Epoch,
    next: Serial,
}

impl Cursor {
    /// A cursor that hands out serials after `after` (exclusive) in `epoch`.
    pub fn new(guarantee: Guarantee, epoch: Epoch, after: Serial) -> Cursor {
        Cursor {
            guarantee,
            epoch,
            next: after.next(),
        }
    }

    pub fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The next serial this cursor expects.
    pub fn next(&self) -> Serial {
        self.next
    }

    /// The position of the last serial handed out (or passed over).
    pub fn position(&self) -> Position {
        Position::new(self.epoch.clone(), Serial(self.next.0 - 1))
    }

    /// Decides what happens to the message `(epoch, serial)`.
    pub fn offer(&mut self, epoch: &Epoch, serial: Serial) -> Step {
        if *epoch != self.epoch {
            return Step::EpochChanged;
        }
        if serial < self.next {
            return Step::Duplicate;
        }
        if serial == self.next {
            self.next = serial.next();
            return Step::Deliver;
        }
        let (from, to) = (self.next, Serial(serial.0 - 1));
        match self.guarantee {
            Guarantee::ExactlyOnce => Step::CatchUp { from, to },
            Guarantee::AtMostOnce => {
                self.next = serial.next();
                Step::Gap { from, to }
            }
        }
    }

    /// Moves past serials the subscriber will never receive as messages (their TTL ran out
    /// before they could be read). Returns whether the cursor moved.
    pub fn pass_over(&mut self, through: Serial) -> bool {
        if through < self.next {
            return false;
        }
        self.next = through.next();
        true
    }
}

/// Consecutive serials passed over for one reason (a filter rejected them), gathered into one
/// notice instead of one per message. `chain` is the chain hash at `to` when known, so a
/// receiver can keep checking the chain across the run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkipRun {
    run: Option<SkippedRun>,
}

/// A finished run of skipped serials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedRun {
    pub from: Serial,
    pub to: Serial,
    pub chain: Option<ChainHash>,
}

impl SkipRun {
    /// Adds one skipped serial. A serial that does not extend the run closes it: the closed
    /// run is returned so it can be reported before the new one starts.
    pub fn add(&mut self, serial: Serial, chain: Option<ChainHash>) -> Option<SkippedRun> {
        match &mut self.run {
            Some(run) if run.to.next() == serial => {
                run.to = serial;
                run.chain = chain;
                None
            }
            _ => self.run.replace(SkippedRun {
                from: serial,
                to: serial,
                chain,
            }),
        }
    }

    /// Ends the run (before a delivery, a notice or a heartbeat) and returns it, if any.
    pub fn take(&mut self) -> Option<SkippedRun> {
        self.run.take()
    }

    pub fn is_empty(&self) -> bool {
        self.run.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch() -> Epoch {
        Epoch::parse("E1").unwrap()
    }

    #[test]
    fn exactly_once_asks_to_catch_up_on_a_skip_and_drops_repeats() {
        let mut cursor = Cursor::new(Guarantee::ExactlyOnce, epoch(), Serial(3));
        assert_eq!(cursor.offer(&epoch(), Serial(2)), Step::Duplicate);
        assert_eq!(cursor.offer(&epoch(), Serial(4)), Step::Deliver);
        assert_eq!(
            cursor.offer(&epoch(), Serial(9)),
            Step::CatchUp {
                from: Serial(5),
                to: Serial(8)
            }
        );
        // Nothing moved: the caller reads 5..=8 and offers them first.
        assert_eq!(cursor.next(), Serial(5));
        for serial in 5..=9 {
            assert_eq!(cursor.offer(&epoch(), Serial(serial)), Step::Deliver);
        }
        assert_eq!(cursor.position().to_string(), "E1:9");
    }

    #[test]
    fn at_most_once_reports_the_dropped_range_and_moves_on() {
        let mut cursor = Cursor::new(Guarantee::AtMostOnce, epoch(), Serial(0));
        assert_eq!(cursor.offer(&epoch(), Serial(1)), Step::Deliver);
        assert_eq!(
            cursor.offer(&epoch(), Serial(7)),
            Step::Gap {
                from: Serial(2),
                to: Serial(6)
            }
        );
        assert_eq!(cursor.next(), Serial(8));
        assert_eq!(cursor.offer(&epoch(), Serial(7)), Step::Duplicate);
    }

    #[test]
    fn another_epoch_never_moves_the_cursor() {
        let mut cursor = Cursor::new(Guarantee::ExactlyOnce, epoch(), Serial(5));
        let other = Epoch::parse("E2").unwrap();
        assert_eq!(cursor.offer(&other, Serial(6)), Step::EpochChanged);
        assert_eq!(cursor.next(), Serial(6));
    }

    #[test]
    fn pass_over_only_moves_forward() {
        let mut cursor = Cursor::new(Guarantee::ExactlyOnce, epoch(), Serial(5));
        assert!(!cursor.pass_over(Serial(4)));
        assert!(cursor.pass_over(Serial(8)));
        assert_eq!(cursor.offer(&epoch(), Serial(9)), Step::Deliver);
    }

    #[test]
    fn skip_runs_gather_consecutive_serials() {
        let mut run = SkipRun::default();
        assert_eq!(run.add(Serial(3), None), None);
        assert_eq!(run.add(Serial(4), None), None);
        let closed = run.add(Serial(7), None).unwrap();
        assert_eq!((closed.from, closed.to), (Serial(3), Serial(4)));
        let last = run.take().unwrap();
        assert_eq!((last.from, last.to), (Serial(7), Serial(7)));
        assert!(run.is_empty());
    }

    /// Whatever the live feed does (skips, repeats, reorders within what was already seen),
    /// an exactly-once cursor that catches up from the log hands out 1..=n exactly once.
    #[test]
    fn exactly_once_hands_out_every_serial_once_under_any_feed() {
        // A small deterministic generator: no randomness source in core.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next_random = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for _round in 0..200 {
            let top = 1 + next_random(200);
            let mut cursor = Cursor::new(Guarantee::ExactlyOnce, epoch(), Serial(0));
            let mut handed = Vec::new();
            let mut feed = 1u64;
            while feed <= top {
                // The feed jumps ahead, repeats old serials, or goes on in order.
                let offered = match next_random(4) {
                    0 => (feed + next_random(10)).min(top),
                    1 => feed.saturating_sub(next_random(5)).max(1),
                    _ => feed,
                };
                feed = feed.max(offered + 1);
                let mut pending = vec![offered];
                while let Some(serial) = pending.pop() {
                    match cursor.offer(&epoch(), Serial(serial)) {
                        Step::Deliver => handed.push(serial),
                        Step::Duplicate => {}
                        Step::CatchUp { from, to } => {
                            // The log has every durable serial: offer the message again after them.
                            pending.push(serial);
                            pending.extend((from.0..=to.0).rev());
                        }
                        other => panic!("unexpected step {other:?}"),
                    }
                }
            }
            assert_eq!(handed, (1..=top).collect::<Vec<_>>());
        }
    }
}
