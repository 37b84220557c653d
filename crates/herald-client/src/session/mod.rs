//! The client session: a pure state machine over the WebSocket frames (no tokio, no sockets,
//! no clock, no randomness). The driver in `client.rs` feeds it what arrives and sends what it
//! returns; the tests here drive it with frames directly.
//!
//! # Call order
//! 1. [`Session::subscribe`] / [`Session::publish`] at any time; they return frames to send
//!    when connected, and are otherwise remembered for the next connection.
//! 2. After every `connected` frame: [`Session::on_connected`], and send its frames first.
//! 3. Every server frame: [`Session::handle`]; act on each [`Output`] in order.
//! 4. When the connection drops: [`Session::on_disconnected`].
//! 5. After [`Output::RetryLater`], wait a backoff, then [`Session::retry_waiting`].
//! 6. At-least-once acks: [`Session::ack`] at any time, and send the frames it returns; the
//!    others go out as [`Output::Send`] after the subscription's next `subscribed`. Keep
//!    [`Session::acks_pending`] bounded (the answers, [`Output::AckConfirmed`] and
//!    [`Output::AckFailed`], make room).
//!
//! # Invariants
//! - A subscription's held position only moves forward within an epoch, and only over serials
//!   accounted for: delivered (message or hint) or covered by a notice. A frame at or below the
//!   held serial is a repeat (reconnect overlap) and is dropped silently.
//! - Anything that does not follow the held position (`prev` mismatch, chain mismatch, another
//!   epoch without notice, a notice that leaves a hole) is reported as [`Event::Broken`], never
//!   delivered. Exactly-once subscriptions then re-subscribe from the held position, at most
//!   [`RESYNC_IN_A_ROW_MAX`] times without a good delivery in between, then close.
//! - A publish keeps its message id for its whole life: every re-send (reconnect, retryable
//!   nack) carries the same id, so the server stores it at most once.
//! - Exactly-once subscriptions are re-subscribed `from` their held position after every
//!   reconnect.
//! - Frames for a channel whose `subscribed` reply is still awaited are left over from an
//!   earlier subscription (the server answers `subscribed` before anything else of a
//!   subscription) and are dropped.
//! - At-least-once subscriptions (`durable/`) hold no position: the server does. Their
//!   deliveries are neither deduplicated nor checked against `prev` or the chain (redeliveries
//!   come again, possibly after later serials); they re-subscribe with the same
//!   `subscriber_id` after every reconnect, and their acks stay pending until answered.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use herald_core::{ChainHash, Data, Epoch, Guarantee, MessageId, Position, Serial};
use herald_protocol::ws::{
    self, Ack, ClientFrame, Continuity, ErrorFrame, Heartbeat, Nack, Publish, ServerFrame,
    Subscribe, Subscribed, Unsubscribe,
};
use herald_protocol::{Encoding, MessageBody, PublishMessage};

use crate::event::{BreakKind, Broken, Event, Message};
use crate::recovery::RecoveryKey;

mod durable;

pub use durable::{AckMode, AckRefused, AcksQueued, AtLeastOnce, FOLDED_ABOVE_MAX};
use durable::{AckedSpan, PendingAck};

/// Consecutive re-subscriptions after a break before an exactly-once subscription is closed.
pub const RESYNC_IN_A_ROW_MAX: u32 = 3;

/// `rewind` used to re-subscribe an exactly-once subscription whose channel was empty when it
/// started: everything the channel got since is after "the start", and there is no position to
/// resume from (an empty channel has no epoch yet).
pub const REWIND_EVERYTHING: u64 = u64::MAX;

/// How a subscription is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeOptions {
    pub guarantee: Guarantee,
    /// Resume after this position (exactly-once).
    pub from: Option<Position>,
    /// Start with the last N messages (exactly-once, without `from`).
    pub rewind: Option<u64>,
    /// Receive hints instead of messages.
    pub hints: bool,
    /// A CEL expression over `name` and `headers`, evaluated by the server.
    pub filter: Option<String>,
    /// At-least-once: the server holds the position of this durable subscriber. With it,
    /// `guarantee`, `from`, `rewind`, `hints` and `filter` keep their defaults (the client
    /// refuses anything else).
    pub at_least_once: Option<AtLeastOnce>,
}

impl SubscribeOptions {
    /// Exactly-once from the oldest retained message (when no `from` is given or loaded): what
    /// a consumer with no stored position usually wants.
    pub fn from_oldest() -> Self {
        Self {
            rewind: Some(REWIND_EVERYTHING),
            ..Self::default()
        }
    }

    /// At-least-once for the durable subscriber `subscriber_id`, manual acks and the server's
    /// defaults; see [`AtLeastOnce`] for the rest.
    pub fn at_least_once(subscriber_id: impl Into<String>) -> Self {
        AtLeastOnce::new(subscriber_id).into()
    }
}

impl From<AtLeastOnce> for SubscribeOptions {
    fn from(at_least_once: AtLeastOnce) -> Self {
        Self {
            at_least_once: Some(at_least_once),
            ..Self::default()
        }
    }
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            guarantee: Guarantee::ExactlyOnce,
            from: None,
            rewind: None,
            hints: false,
            filter: None,
            at_least_once: None,
        }
    }
}

/// Why a publish failed for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// Tunables of the session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Retryable nacks tolerated for one publish before it fails (reconnect re-sends do not
    /// count: they are not refusals).
    pub publish_nacks_max: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            publish_nacks_max: 10,
        }
    }
}

/// What the driver must do after [`Session::handle`].
#[derive(Debug)]
pub enum Output {
    /// Hand this event to the channel's subscriber.
    Event { channel: String, event: Event },
    /// The publish with this request id is durable.
    Acked { req: u64, ack: Ack },
    /// The publish with this request id failed for good.
    PublishFailed { req: u64, error: PublishError },
    /// Send this frame now.
    Send(ClientFrame),
    /// Something waits for a retry: call [`Session::retry_waiting`] after a backoff.
    RetryLater,
    /// An error about the connection itself (no channel, no request).
    ConnectionError(ErrorFrame),
    /// At-least-once: hand this delivery to the channel's subscriber, with an ack handle.
    Delivery {
        channel: String,
        message: Box<Message>,
        /// How many times the server has delivered this message to the subscriber (1 first).
        delivery: u32,
    },
    /// At-least-once: the ack frame with this request id is durable.
    AckConfirmed { req: u64 },
    /// At-least-once: the server refused the ack frame with this request id (`invalid_ack`:
    /// a serial never delivered, another epoch); nothing changed.
    AckFailed {
        req: u64,
        channel: String,
        error: ErrorFrame,
    },
}

#[derive(Debug)]
struct SubscriptionState {
    options: SubscribeOptions,
    position: Option<Position>,
    /// The chain hash at `position`, when known.
    chain: Option<ChainHash>,
    /// Request id of the `subscribe` awaiting its reply.
    awaiting: Option<u64>,
    /// A re-subscription after a break is in flight: frames of the old one are dropped.
    resyncing: bool,
    resyncs_in_a_row: u32,
    /// A retryable error refused the subscription; re-send on [`Session::retry_waiting`].
    waiting_retry: bool,
    /// Whether a `subscribed` reply was ever received (`rewind` is then used up).
    started: bool,
    /// The `top` of the previous heartbeat.
    heartbeat_top: Option<Position>,
    /// At-least-once: what this session knows to be acked, for folding acks.
    acked: Option<AckedSpan>,
}

impl SubscriptionState {
    /// Whether message, hint and notice frames for the channel belong to this subscription.
    /// The server answers `subscribed` before any other frame of a subscription, so whatever
    /// arrives while a reply is awaited (or while a re-subscription waits for its backoff) is
    /// left over from a subscription this session already replaced.
    fn takes_frames(&self) -> bool {
        !self.resyncing && self.awaiting.is_none()
    }
}

#[derive(Debug)]
struct PendingPublish {
    frame: Publish,
    in_flight: bool,
    nacks: u32,
}

/// The client session. See the module docs for the call order.
#[derive(Debug, Default)]
pub struct Session {
    config: SessionConfig,
    connected: bool,
    next_req: u64,
    subscriptions: BTreeMap<String, SubscriptionState>,
    publishes: BTreeMap<u64, PendingPublish>,
    /// At-least-once acks by request id.
    acks: BTreeMap<u64, PendingAck>,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.subscriptions.contains_key(channel)
    }

    /// Publishes not yet acknowledged.
    pub fn publishes_pending(&self) -> usize {
        self.publishes.len()
    }

    /// The position held for a channel.
    pub fn position(&self, channel: &str) -> Option<&Position> {
        self.subscriptions
            .get(channel)
            .and_then(|subscription| subscription.position.as_ref())
    }

    /// A position per subscribed channel that has one.
    pub fn recovery_key(&self) -> RecoveryKey {
        RecoveryKey::new(
            self.subscriptions
                .iter()
                .filter_map(|(channel, subscription)| {
                    Some((channel.clone(), subscription.position.clone()?))
                })
                .collect(),
        )
    }

    fn next_req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// Adds a subscription (replacing nothing: the caller checks [`Session::is_subscribed`]).
    pub fn subscribe(&mut self, channel: &str, options: SubscribeOptions) -> Vec<ClientFrame> {
        let position = match options.guarantee {
            // At-least-once: the server holds the position.
            _ if options.at_least_once.is_some() => None,
            Guarantee::ExactlyOnce => options.from.clone(),
            Guarantee::AtMostOnce => None,
        };
        let mut subscription = SubscriptionState {
            options,
            position,
            chain: None,
            awaiting: None,
            resyncing: false,
            resyncs_in_a_row: 0,
            waiting_retry: false,
            started: false,
            heartbeat_top: None,
            acked: None,
        };
        let mut frames = Vec::new();
        if self.connected {
            let req = self.next_req();
            frames.push(subscribe_frame(channel, &mut subscription, req));
        }
        self.subscriptions.insert(channel.to_owned(), subscription);
        frames
    }

    /// Removes a subscription; later frames for the channel are ignored.
    pub fn unsubscribe(&mut self, channel: &str) -> Vec<ClientFrame> {
        if self.remove_subscription(channel).is_none() || !self.connected {
            return Vec::new();
        }
        let req = self.next_req();
        vec![unsubscribe_frame(channel, req)]
    }

    /// Queues a publish. `message.id` must be set: the id is what makes re-sends idempotent.
    /// Returns the request id that [`Output::Acked`] / [`Output::PublishFailed`] will carry.
    pub fn publish(&mut self, channel: &str, message: PublishMessage) -> (u64, Vec<ClientFrame>) {
        assert!(
            message.id.is_some(),
            "a publish needs an id so that re-sends are idempotent"
        );
        let req = self.next_req();
        let frame = Publish {
            kind: ws::PublishTag::Tag,
            req,
            channel: channel.to_owned(),
            id: message.id,
            name: message.name,
            headers: message.headers,
            data: message.data,
            encoding: message.encoding,
            ttl: message.ttl,
        };
        let mut frames = Vec::new();
        if self.connected {
            frames.push(ClientFrame::Publish(frame.clone()));
        }
        self.publishes.insert(
            req,
            PendingPublish {
                frame,
                in_flight: self.connected,
                nacks: 0,
            },
        );
        (req, frames)
    }

    /// The frames to send after a (re)connect: every subscription (exactly-once ones from their
    /// held position), then every unacknowledged publish with its original id.
    pub fn on_connected(&mut self) -> Vec<ClientFrame> {
        self.connected = true;
        let mut frames = Vec::new();
        let channels: Vec<String> = self.subscriptions.keys().cloned().collect();
        for channel in channels {
            let req = self.next_req();
            let subscription = self.subscriptions.get_mut(&channel).expect("listed above");
            subscription.resyncing = false;
            subscription.waiting_retry = false;
            subscription.heartbeat_top = None;
            frames.push(subscribe_frame(&channel, subscription, req));
        }
        for pending in self.publishes.values_mut() {
            pending.in_flight = true;
            frames.push(ClientFrame::Publish(pending.frame.clone()));
        }
        frames
    }

    pub fn on_disconnected(&mut self) {
        self.connected = false;
        for subscription in self.subscriptions.values_mut() {
            subscription.awaiting = None;
        }
        for pending in self.publishes.values_mut() {
            pending.in_flight = false;
        }
        for pending in self.acks.values_mut() {
            pending.in_flight = false;
        }
    }

    /// Re-sends what a retryable refusal put on hold.
    pub fn retry_waiting(&mut self) -> Vec<ClientFrame> {
        if !self.connected {
            // on_connected re-sends everything anyway.
            return Vec::new();
        }
        let mut frames = Vec::new();
        let waiting: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|(_, subscription)| subscription.waiting_retry)
            .map(|(channel, _)| channel.clone())
            .collect();
        for channel in waiting {
            let req = self.next_req();
            let subscription = self.subscriptions.get_mut(&channel).expect("listed above");
            subscription.waiting_retry = false;
            frames.push(subscribe_frame(&channel, subscription, req));
        }
        for pending in self.publishes.values_mut() {
            if !pending.in_flight {
                pending.in_flight = true;
                frames.push(ClientFrame::Publish(pending.frame.clone()));
            }
        }
        frames
    }

    /// Takes one frame from the server.
    pub fn handle(&mut self, frame: ServerFrame) -> Vec<Output> {
        match frame {
            ServerFrame::Connected(_) | ServerFrame::Pong(_) | ServerFrame::Unsubscribed(_) => {
                Vec::new()
            }
            ServerFrame::Acked(acked) => self.on_acked(acked),
            ServerFrame::Expired(notice) => self.on_expired(notice),
            ServerFrame::Subscribed(reply) => self.on_subscribed(reply),
            ServerFrame::Ack(ack) => self.on_ack(ack),
            ServerFrame::Nack(nack) => self.on_nack(nack),
            ServerFrame::Message(delivery) => self.on_message(*delivery),
            ServerFrame::Hint(hint) => self.on_hint(hint),
            ServerFrame::Heartbeat(heartbeat) => self.on_heartbeat(heartbeat),
            ServerFrame::ContinuityLost(notice) => self.on_continuity_lost(notice),
            ServerFrame::Gap(notice) => self.on_range_notice(
                notice.channel,
                &notice.from,
                &notice.to,
                None,
                |from, to| Event::Gap {
                    from,
                    to,
                    reason: notice.reason,
                },
            ),
            ServerFrame::Skip(notice) => {
                let chain = notice.chain.as_deref().map(ChainHash::from_hex);
                self.on_range_notice(
                    notice.channel,
                    &notice.from,
                    &notice.to,
                    Some(chain.flatten()),
                    |from, to| Event::Skip {
                        from,
                        to,
                        reason: notice.reason,
                    },
                )
            }
            ServerFrame::Error(error) => self.on_error(error),
        }
    }

    fn on_subscribed(&mut self, reply: Subscribed) -> Vec<Output> {
        let Some(subscription) = self.subscriptions.get_mut(&reply.channel) else {
            return Vec::new();
        };
        if reply.req.is_some() && reply.req != subscription.awaiting {
            // The reply to a subscribe this session already replaced.
            return Vec::new();
        }
        let after = match parse_optional(reply.after.as_deref()) {
            Ok(after) => after,
            Err(detail) => {
                return self
                    .broken(&reply.channel, BreakKind::Malformed { detail }, false)
                    .0;
            }
        };
        let top = match parse_optional(reply.top.as_deref()) {
            Ok(top) => top,
            Err(detail) => {
                return self
                    .broken(&reply.channel, BreakKind::Malformed { detail }, false)
                    .0;
            }
        };
        let subscription = self
            .subscriptions
            .get_mut(&reply.channel)
            .expect("checked above");
        subscription.awaiting = None;
        subscription.resyncing = false;
        let mut outputs = vec![Output::Event {
            channel: reply.channel.clone(),
            event: Event::Subscribed {
                guarantee: reply.guarantee.clone(),
                continuity: reply.continuity,
                after: after.clone(),
                top: top.clone(),
            },
        }];
        if subscription.is_at_least_once() {
            subscription.started = true;
            outputs.extend(self.on_durable_subscribed(&reply.channel, after));
            return outputs;
        }
        match reply.continuity {
            // `from` honoured: the held position stays, and so does the chain.
            Continuity::Held => {}
            // `continuity_lost` follows and moves the position.
            Continuity::Lost => {}
            Continuity::New => {
                let held = subscription.position.clone();
                if subscription.options.guarantee == Guarantee::AtMostOnce
                    && let (Some(held), Some(after)) = (&held, &after)
                {
                    // Live only: what the channel got while this client was away is dropped,
                    // and the session says so rather than staying quiet.
                    if held.epoch == after.epoch && after.serial > held.serial {
                        outputs.push(Output::Event {
                            channel: reply.channel.clone(),
                            event: Event::Gap {
                                from: Position::new(held.epoch.clone(), held.serial.next()),
                                to: after.clone(),
                                reason: "disconnected".to_owned(),
                            },
                        });
                    } else if held.epoch != after.epoch {
                        outputs.push(Output::Event {
                            channel: reply.channel.clone(),
                            event: Event::ContinuityLost {
                                from: Position::new(held.epoch.clone(), held.serial.next()),
                                to: Some(after.clone()),
                                reason: "epoch_changed".to_owned(),
                            },
                        });
                    }
                }
                if subscription.options.guarantee == Guarantee::AtMostOnce
                    && after.is_none()
                    && let Some(held) = &held
                {
                    // The channel had messages and now has none: its history was reset (a
                    // wiped server), and its next message starts a new epoch. Say so, rather
                    // than report that message as a break.
                    outputs.push(Output::Event {
                        channel: reply.channel.clone(),
                        event: Event::ContinuityLost {
                            from: Position::new(held.epoch.clone(), held.serial.next()),
                            to: None,
                            reason: "epoch_changed".to_owned(),
                        },
                    });
                }
                if subscription.started
                    && held.is_none()
                    && let Some(after) = after.as_ref().filter(|after| after.serial.0 > 0)
                {
                    // The channel was empty when this subscription started and has messages
                    // now that it is re-subscribed: up to `after` they were not delivered
                    // (at-most-once: sent while away; exactly-once: the rewind to the start
                    // found them gone already).
                    let from = Position::new(after.epoch.clone(), Serial(1));
                    let event = match subscription.options.guarantee {
                        Guarantee::AtMostOnce => Event::Gap {
                            from,
                            to: after.clone(),
                            reason: "disconnected".to_owned(),
                        },
                        Guarantee::ExactlyOnce => Event::ContinuityLost {
                            from,
                            to: Some(after.clone()),
                            reason: "retention".to_owned(),
                        },
                    };
                    outputs.push(Output::Event {
                        channel: reply.channel.clone(),
                        event,
                    });
                }
                let moves = match (&held, &after) {
                    (Some(held), Some(after)) => {
                        held.epoch != after.epoch || after.serial > held.serial
                    }
                    (None, _) => true,
                    // Only after a reset (reported above): exactly-once never gets here
                    // holding a position, it subscribes `from` it.
                    (Some(_), None) => subscription.options.guarantee == Guarantee::AtMostOnce,
                };
                if moves {
                    subscription.chain = after
                        .as_ref()
                        .filter(|after| after.serial == Serial::BEFORE_FIRST)
                        .map(|after| ChainHash::genesis(&after.epoch));
                    subscription.position = after.clone();
                }
            }
        }
        subscription.started = true;
        outputs
    }

    fn on_ack(&mut self, ack: Ack) -> Vec<Output> {
        match self.publishes.remove(&ack.req) {
            Some(_) => vec![Output::Acked { req: ack.req, ack }],
            None => Vec::new(),
        }
    }

    fn on_nack(&mut self, nack: Nack) -> Vec<Output> {
        self.refuse_publish(nack.req, nack.code, nack.message, nack.retryable)
    }

    fn refuse_publish(
        &mut self,
        req: u64,
        code: String,
        message: String,
        retryable: bool,
    ) -> Vec<Output> {
        let Some(pending) = self.publishes.get_mut(&req) else {
            return Vec::new();
        };
        pending.nacks += 1;
        if retryable && pending.nacks <= self.config.publish_nacks_max {
            pending.in_flight = false;
            return vec![Output::RetryLater];
        }
        self.publishes.remove(&req);
        vec![Output::PublishFailed {
            req,
            error: PublishError {
                code,
                message,
                retryable,
            },
        }]
    }

    fn on_error(&mut self, error: ErrorFrame) -> Vec<Output> {
        if let Some(req) = error.req {
            if self.acks.contains_key(&req) {
                return self.on_ack_error(error);
            }
            if self.publishes.contains_key(&req) {
                return self.refuse_publish(req, error.code, error.message, error.retryable);
            }
            let refused = self
                .subscriptions
                .iter()
                .find(|(_, subscription)| subscription.awaiting == Some(req))
                .map(|(channel, _)| channel.clone());
            if let Some(channel) = refused {
                let mut outputs = vec![Output::Event {
                    channel: channel.clone(),
                    event: Event::Error {
                        code: error.code.clone(),
                        message: error.message.clone(),
                        retryable: error.retryable,
                    },
                }];
                if error.retryable {
                    let subscription = self.subscriptions.get_mut(&channel).expect("found");
                    subscription.awaiting = None;
                    subscription.waiting_retry = true;
                    outputs.push(Output::RetryLater);
                } else {
                    self.remove_subscription(&channel);
                    outputs.push(Output::Event {
                        channel,
                        event: Event::Closed {
                            reason: format!("{}: {}", error.code, error.message),
                        },
                    });
                }
                return outputs;
            }
        }
        let Some(channel) = error
            .channel
            .clone()
            .filter(|channel| self.subscriptions.contains_key(channel))
        else {
            return vec![Output::ConnectionError(error)];
        };
        // The server ended this subscription (a storage failure, say). Retryable: unsubscribe
        // now and subscribe again after a backoff, from the held position; frames of the old
        // subscription still in flight are dropped meanwhile.
        let mut outputs = vec![Output::Event {
            channel: channel.clone(),
            event: Event::Error {
                code: error.code.clone(),
                message: error.message.clone(),
                retryable: error.retryable,
            },
        }];
        let req = self.next_req();
        if error.retryable {
            let subscription = self.subscriptions.get_mut(&channel).expect("checked above");
            subscription.resyncing = true;
            subscription.waiting_retry = true;
            subscription.awaiting = None;
            outputs.push(Output::Send(unsubscribe_frame(&channel, req)));
            outputs.push(Output::RetryLater);
        } else {
            self.remove_subscription(&channel);
            outputs.push(Output::Send(unsubscribe_frame(&channel, req)));
            outputs.push(Output::Event {
                channel,
                event: Event::Closed {
                    reason: format!("{}: {}", error.code, error.message),
                },
            });
        }
        outputs
    }

    fn on_message(&mut self, delivery: ws::Delivery) -> Vec<Output> {
        let channel = delivery.message.channel.clone();
        let Some(subscription) = self.subscriptions.get(&channel) else {
            return Vec::new();
        };
        if !subscription.takes_frames() {
            return Vec::new();
        }
        if subscription.is_at_least_once() {
            return self.on_durable_message(channel, delivery);
        }
        let body = delivery.message;
        let (prev, message) = match decode_message(body) {
            Ok(decoded) => decoded,
            Err(detail) => {
                return self
                    .broken(&channel, BreakKind::Malformed { detail }, false)
                    .0;
            }
        };
        let serial = message.position.serial;
        let epoch = message.position.epoch.clone();
        let Some(check) = sequence_check(subscription.position.as_ref(), &epoch, serial, prev)
        else {
            return Vec::new();
        };
        let check = check.and_then(|()| {
            let base = subscription
                .chain
                .or_else(|| (prev == Serial::BEFORE_FIRST).then(|| ChainHash::genesis(&epoch)));
            let Some(base) = base else {
                // Resumed from a bare position: this message's chain becomes the base.
                return Ok(());
            };
            let id = MessageId::parse(&message.id).expect("checked by decode_message");
            let expected = base.next(serial, &id, &message.data);
            if expected == message.chain {
                Ok(())
            } else {
                Err(BreakKind::Chain {
                    serial,
                    expected,
                    received: message.chain.to_hex(),
                })
            }
        });
        let mut outputs = Vec::new();
        if let Err(kind) = check {
            let (reported, accept) = self.broken(&channel, kind, true);
            outputs = reported;
            if !accept {
                return outputs;
            }
        }
        let subscription = self.subscriptions.get_mut(&channel).expect("checked above");
        subscription.position = Some(message.position.clone());
        subscription.chain = Some(message.chain);
        subscription.resyncs_in_a_row = 0;
        outputs.push(Output::Event {
            channel,
            event: Event::Message(Box::new(message)),
        });
        outputs
    }

    fn on_hint(&mut self, hint: ws::Hint) -> Vec<Output> {
        let channel = hint.channel;
        let Some(subscription) = self.subscriptions.get(&channel) else {
            return Vec::new();
        };
        if !subscription.takes_frames() {
            return Vec::new();
        }
        let epoch = match Epoch::parse(&hint.epoch) {
            Ok(epoch) if hint.serial > 0 => epoch,
            _ => {
                let detail = format!("hint {}:{}", hint.epoch, hint.serial);
                return self
                    .broken(&channel, BreakKind::Malformed { detail }, false)
                    .0;
            }
        };
        let serial = Serial(hint.serial);
        // A hint carries no `prev`: hints, like messages, come one serial after another
        // unless a notice accounts for the ones in between.
        let implied_prev = Serial(serial.0 - 1);
        let Some(check) =
            sequence_check(subscription.position.as_ref(), &epoch, serial, implied_prev)
        else {
            return Vec::new();
        };
        let mut outputs = Vec::new();
        if let Err(kind) = check {
            let (reported, accept) = self.broken(&channel, kind, true);
            outputs = reported;
            if !accept {
                return outputs;
            }
        }
        let position = Position::new(epoch, serial);
        let subscription = self.subscriptions.get_mut(&channel).expect("checked above");
        subscription.position = Some(position.clone());
        // No data, so no way to follow the chain past a hint.
        subscription.chain = None;
        subscription.resyncs_in_a_row = 0;
        outputs.push(Output::Event {
            channel,
            event: Event::Hint { position },
        });
        outputs
    }

    fn on_heartbeat(&mut self, heartbeat: Heartbeat) -> Vec<Output> {
        let mut outputs = Vec::new();
        for (channel, top) in heartbeat.channels {
            let Some(subscription) = self.subscriptions.get_mut(&channel) else {
                continue;
            };
            // At-least-once: the server holds the position, and a consumer slower than the
            // channel is the normal case, not a sign of loss.
            if !subscription.takes_frames() || subscription.is_at_least_once() {
                continue;
            }
            let Ok(top) = parse_optional(top.as_deref()) else {
                continue;
            };
            if let Some(previous_top) = &subscription.heartbeat_top {
                let behind = match &subscription.position {
                    None => true,
                    Some(held) => {
                        held.epoch != previous_top.epoch || held.serial < previous_top.serial
                    }
                };
                if behind {
                    outputs.push(Output::Event {
                        channel: channel.clone(),
                        event: Event::Stalled {
                            position: subscription.position.clone(),
                            top: previous_top.clone(),
                        },
                    });
                }
            }
            subscription.heartbeat_top = top;
        }
        outputs
    }

    fn on_continuity_lost(&mut self, notice: ws::ContinuityLostNotice) -> Vec<Output> {
        let channel = notice.channel;
        let Some(subscription) = self.subscriptions.get(&channel) else {
            return Vec::new();
        };
        if !subscription.takes_frames() {
            return Vec::new();
        }
        if subscription.is_at_least_once() {
            return self.on_durable_continuity_lost(channel, notice.from, notice.to, notice.reason);
        }
        let parsed = (
            Position::parse(&notice.from),
            parse_optional(notice.to.as_deref()),
        );
        let (Ok(from), Ok(to)) = parsed else {
            let detail = format!("continuity_lost {}..{:?}", notice.from, notice.to);
            return self
                .broken(&channel, BreakKind::Malformed { detail }, false)
                .0;
        };
        if let (Some(held), Some(to)) = (&subscription.position, &to)
            && held.epoch == to.epoch
            && to.serial <= held.serial
        {
            return Vec::new();
        }
        let subscription = self.subscriptions.get_mut(&channel).expect("checked above");
        // No `to`: the channel has no message at all and delivery starts with its first one,
        // which then checks against the genesis of its epoch.
        subscription.chain = to
            .as_ref()
            .filter(|to| to.serial == Serial::BEFORE_FIRST)
            .map(|to| ChainHash::genesis(&to.epoch));
        subscription.position = to.clone();
        subscription.resyncs_in_a_row = 0;
        vec![Output::Event {
            channel,
            event: Event::ContinuityLost {
                from,
                to,
                reason: notice.reason,
            },
        }]
    }

    /// `gap` and `skip`: serials `from..=to` of the held epoch are accounted for. `chain` is
    /// `Some` for a skip (with the chain at `to` when the server knew it).
    fn on_range_notice(
        &mut self,
        channel: String,
        from: &str,
        to: &str,
        chain: Option<Option<ChainHash>>,
        event: impl FnOnce(Position, Position) -> Event,
    ) -> Vec<Output> {
        let Some(subscription) = self.subscriptions.get(&channel) else {
            return Vec::new();
        };
        if !subscription.takes_frames() {
            return Vec::new();
        }
        let (from, to) = match (Position::parse(from), Position::parse(to)) {
            (Ok(from), Ok(to)) if from.epoch == to.epoch && from.serial <= to.serial => (from, to),
            _ => {
                let detail = format!("notice range {from}..{to}");
                return self
                    .broken(&channel, BreakKind::Malformed { detail }, false)
                    .0;
            }
        };
        if subscription.is_at_least_once() {
            // Not expected (no filters, and expiry has its own notice); the server holds the
            // position, so there is nothing to check it against: pass it on.
            return vec![Output::Event {
                channel,
                event: event(from, to),
            }];
        }
        let check = match &subscription.position {
            Some(held) if held.epoch != to.epoch => Err(BreakKind::Epoch {
                serial: from.serial,
                received: to.epoch.clone(),
            }),
            Some(held) if to.serial <= held.serial => return Vec::new(),
            held => {
                let held_serial = held
                    .as_ref()
                    .map_or(Serial::BEFORE_FIRST, |held| held.serial);
                // A notice may overlap what is held (reconnect), but must not leave a hole.
                if from.serial <= held_serial.next() {
                    Ok(())
                } else {
                    Err(BreakKind::Hole {
                        from: held_serial.next(),
                        to: Serial(from.serial.0 - 1),
                    })
                }
            }
        };
        let mut outputs = Vec::new();
        if let Err(kind) = check {
            let (reported, accept) = self.broken(&channel, kind, true);
            outputs = reported;
            if !accept {
                return outputs;
            }
        }
        let subscription = self.subscriptions.get_mut(&channel).expect("checked above");
        subscription.chain = chain.flatten();
        subscription.position = Some(to.clone());
        outputs.push(Output::Event {
            channel,
            event: event(from, to),
        });
        outputs
    }

    /// Reports a break on `channel` and returns whether the frame that broke the stream is
    /// to be taken anyway.
    ///
    /// Exactly-once: never; the subscription re-subscribes from its held position (the server
    /// replays from its log), or closes after too many breaks in a row. At-most-once: nothing
    /// can be replayed, so a `followable` frame (one whose position is known) becomes the new
    /// base, after the break was reported.
    fn broken(&mut self, channel: &str, kind: BreakKind, followable: bool) -> (Vec<Output>, bool) {
        let connected = self.connected;
        let Some(subscription) = self.subscriptions.get_mut(channel) else {
            return (Vec::new(), false);
        };
        let mut outputs = vec![Output::Event {
            channel: channel.to_owned(),
            event: Event::Broken(Broken {
                kind,
                held: subscription.position.clone(),
            }),
        }];
        if subscription.options.guarantee == Guarantee::AtMostOnce {
            return (outputs, followable);
        }
        subscription.resyncs_in_a_row += 1;
        if subscription.resyncs_in_a_row > RESYNC_IN_A_ROW_MAX {
            self.remove_subscription(channel);
            outputs.push(Output::Event {
                channel: channel.to_owned(),
                event: Event::Closed {
                    reason: format!(
                        "the stream broke {} times in a row, re-subscribing in between",
                        RESYNC_IN_A_ROW_MAX + 1
                    ),
                },
            });
            if connected {
                let req = self.next_req();
                outputs.push(Output::Send(unsubscribe_frame(channel, req)));
            }
        } else if connected {
            let unsubscribe_req = self.next_req();
            let subscribe_req = self.next_req();
            let subscription = self.subscriptions.get_mut(channel).expect("checked above");
            subscription.resyncing = true;
            outputs.push(Output::Send(unsubscribe_frame(channel, unsubscribe_req)));
            outputs.push(Output::Send(subscribe_frame(
                channel,
                subscription,
                subscribe_req,
            )));
        }
        (outputs, false)
    }
}

fn subscribe_frame(channel: &str, subscription: &mut SubscriptionState, req: u64) -> ClientFrame {
    subscription.awaiting = Some(req);
    let options = &subscription.options;
    if let Some(at_least_once) = &options.at_least_once {
        // The server holds the position: no `from`, `rewind`, `hints` or `filter`.
        return ClientFrame::Subscribe(Subscribe {
            kind: ws::SubscribeTag::Tag,
            req: Some(req),
            channel: channel.to_owned(),
            guarantee: Some("at-least-once".to_owned()),
            subscriber_id: Some(at_least_once.subscriber_id.clone()),
            options: at_least_once.wire_options(),
            from: None,
            rewind: None,
            hints: None,
            filter: None,
        });
    }
    let (from, rewind) = match options.guarantee {
        Guarantee::AtMostOnce => (None, None),
        Guarantee::ExactlyOnce => match (&subscription.position, subscription.started) {
            (Some(position), _) => (Some(position.to_string()), None),
            (None, false) => (None, options.rewind),
            (None, true) => (None, Some(REWIND_EVERYTHING)),
        },
    };
    ClientFrame::Subscribe(Subscribe {
        kind: ws::SubscribeTag::Tag,
        req: Some(req),
        channel: channel.to_owned(),
        guarantee: Some(options.guarantee.as_str().to_owned()),
        subscriber_id: None,
        options: None,
        from,
        rewind,
        hints: options.hints.then_some(true),
        filter: options.filter.clone(),
    })
}

fn unsubscribe_frame(channel: &str, req: u64) -> ClientFrame {
    ClientFrame::Unsubscribe(Unsubscribe {
        kind: ws::UnsubscribeTag::Tag,
        req: Some(req),
        channel: channel.to_owned(),
    })
}

fn parse_optional(text: Option<&str>) -> Result<Option<Position>, String> {
    text.map(Position::parse)
        .transpose()
        .map_err(|error| error.to_string())
}

/// Standard base64, padding optional (what the server writes and accepts).
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Checks a delivery's fields against each other and decodes it; returns its `prev` too.
fn decode_message(body: MessageBody) -> Result<(Serial, Message), String> {
    let epoch = Epoch::parse(&body.epoch).map_err(|error| format!("epoch: {error}"))?;
    MessageId::parse(&body.id).map_err(|error| format!("id: {error}"))?;
    let serial = Serial(body.serial);
    let position = Position::new(epoch, serial);
    if body.position != position.to_string() {
        return Err(format!(
            "position {} does not match epoch {} and serial {}",
            body.position, body.epoch, body.serial
        ));
    }
    if serial == Serial::BEFORE_FIRST || body.prev != serial.0 - 1 {
        return Err(format!("serial {} with prev {}", body.serial, body.prev));
    }
    let chain =
        ChainHash::from_hex(&body.chain).ok_or_else(|| format!("chain {:?}", body.chain))?;
    let data = match body.encoding.unwrap_or_default() {
        // The server sends the compact JSON text it stored, byte for byte: that is what the
        // chain was computed over.
        Encoding::Json => Data::Json(Bytes::copy_from_slice(body.data.get().as_bytes())),
        Encoding::Base64 => {
            let text: String = serde_json::from_str(body.data.get())
                .map_err(|_| "base64 data is not a JSON string".to_owned())?;
            let bytes = BASE64
                .decode(text.as_bytes())
                .map_err(|error| format!("base64 data: {error}"))?;
            Data::Binary(Bytes::from(bytes))
        }
    };
    Ok((
        Serial(body.prev),
        Message {
            channel: body.channel,
            id: body.id,
            position,
            time_ms: body.time,
            name: body.name,
            headers: body.headers.unwrap_or_default(),
            data,
            chain,
            expires_at_ms: body.expires_at,
        },
    ))
}

/// Where a delivery stands against the held position: `None` for a repeat (dropped silently:
/// the overlap of a resume), `Some(Err)` for a break (another epoch, or `prev` is not the
/// held serial), `Some(Ok)` when it follows on.
fn sequence_check(
    held: Option<&Position>,
    epoch: &Epoch,
    serial: Serial,
    prev: Serial,
) -> Option<Result<(), BreakKind>> {
    match held {
        Some(held) if held.epoch != *epoch => Some(Err(BreakKind::Epoch {
            serial,
            received: epoch.clone(),
        })),
        Some(held) if serial <= held.serial => None,
        held => {
            let held_serial = held.map_or(Serial::BEFORE_FIRST, |held| held.serial);
            Some(if prev == held_serial {
                Ok(())
            } else {
                Err(BreakKind::Prev { serial, prev })
            })
        }
    }
}

#[cfg(test)]
mod tests;
