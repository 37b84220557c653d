//! At-least-once (durable) subscriptions in the session: the options, the acks the
//! application makes, and the notices only these subscriptions get (`acked`, `expired`).
//!
//! The server holds the position of an at-least-once subscriber, so the session holds none: it
//! does not dedupe, does not check `prev` or the chain, and does not treat a redelivery (an
//! older serial after a newer one) as a break. It re-subscribes with the same `subscriber_id`
//! after every reconnect, and the server delivers every unacked message again.
//!
//! # Acks
//! [`Session::ack`] turns acks into `ack` frames, each with a request id: the server answers
//! `acked` once the ack is durable ([`Output::AckConfirmed`]) or `error` `invalid_ack`
//! ([`Output::AckFailed`]). Until then the ack stays pending; it is sent only while the
//! subscription is subscribed, and re-sent after the `subscribed` of every re-subscription
//! (a reconnect loses nothing an application acked; acking twice is harmless: an ack of a done
//! serial is accepted).
//!
//! Individual acks are folded into cumulative ones when they can be: the session knows the
//! subscriber's acknowledged position from `subscribed.after`, and every serial above it that
//! this client acked or that expired ([`AckedSpan`]); an ack that extends that contiguous
//! prefix goes out as `through` (one frame for a run of in-order acks), the others as
//! `position`.
//!
//! # Invariants
//! - An ack frame covers only serials the application acked, serials the server reported
//!   acked (`after`) or done (`expired`, `continuity_lost`): folding never acks a message the
//!   application did not.
//! - Pending acks are bounded by the caller ([`Session::acks_pending`]); the folding set is
//!   bounded by [`FOLDED_ABOVE_MAX`].

use std::collections::BTreeSet;

use herald_core::{Epoch, Position, Serial};
use herald_protocol::ws::{self, AckDeliveries, ClientFrame, DurableOptions, ExpiredNotice};

use super::{Output, Session, SubscriptionState, parse_optional};
use crate::event::{BreakKind, Event};

/// Serials above the contiguous acked prefix remembered for folding. Beyond it acks still go
/// out (individually); only the folding into `through` is lost until the prefix catches up.
pub const FOLDED_ABOVE_MAX: usize = 4096;

/// How an at-least-once subscription's deliveries are acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckMode {
    /// The application acks each delivery with its [`crate::AckHandle`] once it is done with
    /// it. A delivery not acked within `ack_wait_ms` (or before a reconnect) comes again.
    #[default]
    Manual,
    /// The SDK acks a delivery when the application asks for the next event
    /// ([`crate::Subscription::next`]), i.e. once the application has had it and came back
    /// for more. The last delivery taken before the subscription is dropped is not acked: it
    /// comes again to the next consumer with this `subscriber_id` unless acked by its handle.
    Auto,
}

/// An at-least-once subscription: the server keeps the acknowledged position of the durable
/// subscriber `subscriber_id` (unique per channel) across disconnects and restarts, and
/// delivers every message until it is acked.
///
/// The `None` options take the server's defaults when the subscriber is created; an existing
/// subscriber keeps the options it was created with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtLeastOnce {
    /// Printable ASCII without spaces, at most 128 bytes.
    pub subscriber_id: String,
    pub ack_mode: AckMode,
    /// Deliveries not yet acked, at most (server default 100).
    pub inflight_max: Option<u32>,
    /// A delivery not acked within this time is delivered again (server default 30 s).
    pub ack_wait_ms: Option<u64>,
    /// Deliveries of one message before it goes to the dead-letter channel `<channel>.dead`
    /// (server default 5).
    pub max_deliveries: Option<u32>,
    /// The subscriber is removed after this long without a connection (server default 7
    /// days; 0: never).
    pub expires_after_ms: Option<u64>,
}

impl AtLeastOnce {
    /// Manual acks, server defaults for everything else.
    pub fn new(subscriber_id: impl Into<String>) -> Self {
        Self {
            subscriber_id: subscriber_id.into(),
            ack_mode: AckMode::Manual,
            inflight_max: None,
            ack_wait_ms: None,
            max_deliveries: None,
            expires_after_ms: None,
        }
    }

    pub fn ack_mode(mut self, ack_mode: AckMode) -> Self {
        self.ack_mode = ack_mode;
        self
    }

    pub fn inflight_max(mut self, inflight_max: u32) -> Self {
        self.inflight_max = Some(inflight_max);
        self
    }

    pub fn ack_wait_ms(mut self, ack_wait_ms: u64) -> Self {
        self.ack_wait_ms = Some(ack_wait_ms);
        self
    }

    pub fn max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = Some(max_deliveries);
        self
    }

    pub fn expires_after_ms(mut self, expires_after_ms: u64) -> Self {
        self.expires_after_ms = Some(expires_after_ms);
        self
    }

    pub(super) fn wire_options(&self) -> Option<DurableOptions> {
        let options = DurableOptions {
            inflight_max: self.inflight_max,
            ack_wait_ms: self.ack_wait_ms,
            max_deliveries: self.max_deliveries,
            expires_after_ms: self.expires_after_ms,
        };
        (options != DurableOptions::default()).then_some(options)
    }
}

/// The serials of an at-least-once subscription this session knows to be done: every serial
/// up to `through`, and the ones in `above`, all in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AckedSpan {
    epoch: Epoch,
    through: Serial,
    above: BTreeSet<Serial>,
}

impl AckedSpan {
    fn new(position: &Position) -> Self {
        Self {
            epoch: position.epoch.clone(),
            through: position.serial,
            above: BTreeSet::new(),
        }
    }

    fn position(&self) -> Position {
        Position::new(self.epoch.clone(), self.through)
    }

    /// Everything up to `through` is done. Returns whether the prefix moved.
    fn done_through(&mut self, through: Serial) -> bool {
        if through <= self.through {
            return false;
        }
        self.through = through;
        self.fold();
        true
    }

    /// One serial is done. Returns whether the contiguous prefix moved.
    fn done_one(&mut self, serial: Serial) -> bool {
        if serial <= self.through {
            return false;
        }
        if serial == self.through.next() {
            self.through = serial;
            self.fold();
            return true;
        }
        if self.above.len() < FOLDED_ABOVE_MAX {
            self.above.insert(serial);
        }
        false
    }

    fn fold(&mut self) {
        self.above = self.above.split_off(&self.through.next());
        while self.above.first() == Some(&self.through.next()) {
            self.through = self.above.pop_first().expect("checked");
        }
    }
}

/// An ack frame not yet answered.
#[derive(Debug)]
pub(super) struct PendingAck {
    pub(super) frame: AckDeliveries,
    pub(super) in_flight: bool,
}

/// What [`Session::ack`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckRefused {
    #[error("not subscribed to {0:?}")]
    NotSubscribed(String),
    #[error("the subscription to {0:?} is not at-least-once: it has nothing to ack")]
    NotAtLeastOnce(String),
}

/// The frames of one [`Session::ack`]: the request id of each `ack` frame, in order, and the
/// frames to send now (none while the subscription waits for its `subscribed`).
#[derive(Debug, Default)]
pub struct AcksQueued {
    pub reqs: Vec<u64>,
    pub frames: Vec<ClientFrame>,
}

impl SubscriptionState {
    pub(super) fn is_at_least_once(&self) -> bool {
        self.options.at_least_once.is_some()
    }

    /// Whether ack frames for this subscription may go out now.
    fn takes_acks(&self) -> bool {
        self.takes_frames() && !self.waiting_retry
    }
}

impl Session {
    /// Acks pending: queued or sent, not yet answered.
    pub fn acks_pending(&self) -> usize {
        self.acks.len()
    }

    /// Acknowledges deliveries of an at-least-once subscription: every serial up to each of
    /// `through` (cumulative), and each of `positions` (just that serial). Positions that
    /// extend the contiguous acked prefix are folded into one cumulative frame.
    pub fn ack(
        &mut self,
        channel: &str,
        through: &[Position],
        positions: &[Position],
    ) -> Result<AcksQueued, AckRefused> {
        let connected = self.connected;
        let Some(subscription) = self.subscriptions.get_mut(channel) else {
            return Err(AckRefused::NotSubscribed(channel.to_owned()));
        };
        if !subscription.is_at_least_once() {
            return Err(AckRefused::NotAtLeastOnce(channel.to_owned()));
        }
        let mut cumulative: Vec<Position> = Vec::new();
        let mut singles: Vec<Position> = Vec::new();
        for position in through {
            if let Some(span) = subscription
                .acked
                .as_mut()
                .filter(|span| span.epoch == position.epoch)
            {
                span.done_through(position.serial);
            }
            cumulative.push(position.clone());
        }
        let mut sorted: Vec<&Position> = positions.iter().collect();
        sorted.sort_by(|a, b| (&a.epoch, a.serial).cmp(&(&b.epoch, b.serial)));
        let mut folded = false;
        for position in sorted {
            match subscription
                .acked
                .as_mut()
                .filter(|span| span.epoch == position.epoch)
            {
                // Already done: a cumulative frame at the prefix confirms it as well.
                Some(span) if position.serial <= span.through => folded = true,
                Some(span) => {
                    if span.done_one(position.serial) {
                        folded = true;
                    } else {
                        singles.push(position.clone());
                    }
                }
                None => singles.push(position.clone()),
            }
        }
        if folded && let Some(span) = &subscription.acked {
            let prefix = span.position();
            // One cumulative frame per epoch: the folded prefix covers an explicit `through`
            // of the same epoch at or below it.
            cumulative.retain(|position| {
                position.epoch != prefix.epoch || position.serial > prefix.serial
            });
            cumulative.push(prefix);
        }
        let sendable = connected && subscription.takes_acks();
        let mut queued = AcksQueued::default();
        let frames = cumulative
            .into_iter()
            .map(|position| (Some(position), None))
            .chain(singles.into_iter().map(|position| (None, Some(position))));
        for (through, position) in frames {
            self.next_req += 1;
            let req = self.next_req;
            let frame = AckDeliveries {
                kind: ws::AckDeliveriesTag::Tag,
                req: Some(req),
                channel: channel.to_owned(),
                through: through.map(|position| position.to_string()),
                position: position.map(|position| position.to_string()),
            };
            if sendable {
                queued.frames.push(ClientFrame::Ack(frame.clone()));
            }
            self.acks.insert(
                req,
                PendingAck {
                    frame,
                    in_flight: sendable,
                },
            );
            queued.reqs.push(req);
        }
        Ok(queued)
    }

    /// The ack frames of `channel` waiting to be (re-)sent, marked in flight.
    pub(super) fn resend_acks(&mut self, channel: &str) -> Vec<Output> {
        self.acks
            .values_mut()
            .filter(|pending| !pending.in_flight && pending.frame.channel == channel)
            .map(|pending| {
                pending.in_flight = true;
                Output::Send(ClientFrame::Ack(pending.frame.clone()))
            })
            .collect()
    }

    /// Forgets a subscription and the acks waiting for it.
    pub(super) fn remove_subscription(&mut self, channel: &str) -> Option<SubscriptionState> {
        self.acks
            .retain(|_, pending| pending.frame.channel != channel);
        self.subscriptions.remove(channel)
    }

    /// `subscribed` of an at-least-once subscription: `after` is the subscriber's acknowledged
    /// position.
    pub(super) fn on_durable_subscribed(
        &mut self,
        channel: &str,
        after: Option<Position>,
    ) -> Vec<Output> {
        let subscription = self.subscriptions.get_mut(channel).expect("checked");
        match (&mut subscription.acked, &after) {
            (Some(span), Some(after)) if span.epoch == after.epoch => {
                span.done_through(after.serial);
            }
            (span, Some(after)) => *span = Some(AckedSpan::new(after)),
            // A channel without messages: nothing to fold yet.
            (span, None) => *span = None,
        }
        self.resend_acks(channel)
    }

    pub(super) fn on_durable_message(
        &mut self,
        channel: String,
        delivery: ws::Delivery,
    ) -> Vec<Output> {
        let Some(count) = delivery.delivery.filter(|count| *count > 0) else {
            let detail = format!(
                "an at-least-once delivery of serial {} without a delivery count",
                delivery.message.serial
            );
            return self
                .broken(&channel, BreakKind::Malformed { detail }, false)
                .0;
        };
        let message = match super::decode_message(delivery.message) {
            Ok((_prev, message)) => message,
            Err(detail) => {
                return self
                    .broken(&channel, BreakKind::Malformed { detail }, false)
                    .0;
            }
        };
        let subscription = self.subscriptions.get_mut(&channel).expect("checked");
        subscription.resyncs_in_a_row = 0;
        if subscription.acked.is_none() && message.position.serial == Serial(1) {
            // Subscribed while the channel had no messages (no `after`): nothing comes before
            // serial 1 of its epoch, so acks can fold from there.
            let start = Position::new(message.position.epoch.clone(), Serial::BEFORE_FIRST);
            subscription.acked = Some(AckedSpan::new(&start));
        }
        vec![Output::Delivery {
            channel,
            message: Box::new(message),
            delivery: count,
        }]
    }

    pub(super) fn on_acked(&mut self, acked: ws::Acked) -> Vec<Output> {
        match self.acks.remove(&acked.req) {
            Some(_) => vec![Output::AckConfirmed { req: acked.req }],
            None => Vec::new(),
        }
    }

    /// `error` answering an ack frame: the ack changed nothing. Final, whatever `retryable`
    /// says: a storage failure ends the connection, and the reconnect re-sends nothing of a
    /// failed ack (the message is delivered again instead).
    pub(super) fn on_ack_error(&mut self, error: ws::ErrorFrame) -> Vec<Output> {
        let req = error.req.expect("called for an ack's req");
        let pending = self.acks.remove(&req).expect("called for a pending ack");
        vec![Output::AckFailed {
            req,
            channel: pending.frame.channel,
            error,
        }]
    }

    pub(super) fn on_expired(&mut self, notice: ExpiredNotice) -> Vec<Output> {
        let channel = notice.channel;
        let Some(subscription) = self.subscriptions.get_mut(&channel) else {
            return Vec::new();
        };
        if !subscription.takes_frames() {
            return Vec::new();
        }
        let (from, to) = match (Position::parse(&notice.from), Position::parse(&notice.to)) {
            (Ok(from), Ok(to)) if from.epoch == to.epoch && from.serial <= to.serial => (from, to),
            _ => {
                let detail = format!("expired {}..{}", notice.from, notice.to);
                return self
                    .broken(&channel, BreakKind::Malformed { detail }, false)
                    .0;
            }
        };
        if let Some(span) = subscription
            .acked
            .as_mut()
            .filter(|span| span.epoch == to.epoch && from.serial <= span.through.next())
        {
            span.done_through(to.serial);
        }
        vec![Output::Event {
            channel,
            event: Event::Expired { from, to },
        }]
    }

    /// `continuity_lost` of an at-least-once subscription: the server moved the subscriber's
    /// position on to `to`.
    pub(super) fn on_durable_continuity_lost(
        &mut self,
        channel: String,
        from: String,
        to: Option<String>,
        reason: String,
    ) -> Vec<Output> {
        let (Ok(from), Ok(to)) = (Position::parse(&from), parse_optional(to.as_deref())) else {
            let detail = format!("continuity_lost {from}..{to:?}");
            return self
                .broken(&channel, BreakKind::Malformed { detail }, false)
                .0;
        };
        let subscription = self.subscriptions.get_mut(&channel).expect("checked");
        subscription.acked = to.as_ref().map(AckedSpan::new);
        vec![Output::Event {
            channel,
            event: Event::ContinuityLost { from, to, reason },
        }]
    }
}

#[cfg(test)]
mod tests;
