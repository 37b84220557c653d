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
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            guarantee: Guarantee::ExactlyOnce,
            from: None,
            rewind: None,
            hints: false,
            filter: None,
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
        if self.subscriptions.remove(channel).is_none() || !self.connected {
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
            ServerFrame::Subscribed(reply) => self.on_subscribed(reply),
            ServerFrame::Ack(ack) => self.on_ack(ack),
            ServerFrame::Nack(nack) => self.on_nack(nack),
            ServerFrame::Message(delivery) => self.on_message(delivery.message),
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
                    self.subscriptions.remove(&channel);
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
            self.subscriptions.remove(&channel);
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

    fn on_message(&mut self, body: MessageBody) -> Vec<Output> {
        let channel = body.channel.clone();
        let Some(subscription) = self.subscriptions.get(&channel) else {
            return Vec::new();
        };
        if !subscription.takes_frames() {
            return Vec::new();
        }
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
            if !subscription.takes_frames() {
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
            self.subscriptions.remove(channel);
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
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    const CHANNEL: &str = "chat:a";

    /// The server side of one channel: messages with true serials and chain hashes.
    struct Server {
        epoch: Epoch,
        chain: ChainHash,
        serial: u64,
        sent: Vec<MessageBody>,
    }

    impl Server {
        fn new(epoch: &str) -> Self {
            let epoch = Epoch::parse(epoch).unwrap();
            Self {
                chain: ChainHash::genesis(&epoch),
                epoch,
                serial: 0,
                sent: Vec::new(),
            }
        }

        /// Appends a message with JSON `data` and returns its delivery.
        fn append(&mut self, data: &str) -> ServerFrame {
            self.serial += 1;
            let id = format!("m{}", self.serial);
            let data_bytes = Data::Json(Bytes::copy_from_slice(data.as_bytes()));
            self.chain = self.chain.next(
                Serial(self.serial),
                &MessageId::parse(&id).unwrap(),
                &data_bytes,
            );
            let body = MessageBody {
                id,
                channel: CHANNEL.to_owned(),
                serial: self.serial,
                epoch: self.epoch.to_string(),
                position: format!("{}:{}", self.epoch, self.serial),
                prev: self.serial - 1,
                chain: self.chain.to_hex(),
                time: 1_000 + self.serial,
                name: None,
                headers: None,
                data: RawValue::from_string(data.to_owned()).unwrap(),
                encoding: None,
                expires_at: None,
            };
            self.sent.push(body.clone());
            deliver(body)
        }

        /// The delivery of an already appended serial (a replay).
        fn replay(&self, serial: u64) -> ServerFrame {
            deliver(self.sent[usize::try_from(serial - 1).unwrap()].clone())
        }

        fn position(&self, serial: u64) -> String {
            format!("{}:{serial}", self.epoch)
        }
    }

    fn deliver(message: MessageBody) -> ServerFrame {
        ServerFrame::Message(Box::new(ws::Delivery { message }))
    }

    fn subscribed(req: Option<u64>, continuity: Continuity, after: Option<&str>) -> ServerFrame {
        ServerFrame::Subscribed(Subscribed {
            kind: ws::SubscribedTag::Tag,
            req,
            channel: CHANNEL.to_owned(),
            guarantee: "exactly-once".to_owned(),
            hints: false,
            filter: None,
            continuity,
            after: after.map(str::to_owned),
            top: after.map(str::to_owned),
        })
    }

    fn subscribe_req(frames: &[ClientFrame]) -> u64 {
        frames
            .iter()
            .find_map(|frame| match frame {
                ClientFrame::Subscribe(subscribe) => subscribe.req,
                _ => None,
            })
            .expect("a subscribe frame")
    }

    /// A connected session with an exactly-once subscription started on an empty channel.
    fn started(options: SubscribeOptions) -> (Session, Server) {
        let mut session = Session::default();
        session.subscribe(CHANNEL, options);
        let frames = session.on_connected();
        let req = subscribe_req(&frames);
        let server = Server::new("E1");
        let outputs = session.handle(subscribed(Some(req), Continuity::New, Some("E1:0")));
        assert!(matches!(
            events(outputs).as_slice(),
            [Event::Subscribed { .. }]
        ));
        (session, server)
    }

    fn events(outputs: Vec<Output>) -> Vec<Event> {
        outputs
            .into_iter()
            .filter_map(|output| match output {
                Output::Event { event, .. } => Some(event),
                _ => None,
            })
            .collect()
    }

    fn delivered_serials(outputs: Vec<Output>) -> Vec<u64> {
        events(outputs)
            .into_iter()
            .map(|event| match event {
                Event::Message(message) => message.position.serial.0,
                other => panic!("expected only messages, got {other:?}"),
            })
            .collect()
    }

    fn sent(outputs: &[Output]) -> Vec<&ClientFrame> {
        outputs
            .iter()
            .filter_map(|output| match output {
                Output::Send(frame) => Some(frame),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn delivers_in_order_and_drops_the_overlap_after_a_reconnect() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        let mut got = Vec::new();
        for n in 1..=3 {
            got.extend(delivered_serials(
                session.handle(server.append(&n.to_string())),
            ));
        }
        session.on_disconnected();
        let frames = session.on_connected();
        let [ClientFrame::Subscribe(resubscribe)] = frames.as_slice() else {
            panic!("expected one subscribe, got {frames:?}");
        };
        assert_eq!(resubscribe.from.as_deref(), Some("E1:3"));
        assert_eq!(resubscribe.rewind, None);
        let req = resubscribe.req;
        session.handle(subscribed(req, Continuity::Held, Some("E1:3")));
        // The server (or a racing live path) repeats 2 and 3, then goes on.
        got.extend(delivered_serials(session.handle(server.replay(2))));
        got.extend(delivered_serials(session.handle(server.replay(3))));
        got.extend(delivered_serials(session.handle(server.append("4"))));
        assert_eq!(got, vec![1, 2, 3, 4]);
        assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:4");
    }

    #[test]
    fn a_missing_serial_is_reported_and_the_subscription_resumes_from_the_held_position() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        let lost = server.append("2");
        drop(lost);
        let outputs = session.handle(server.append("3"));
        let frames = sent(&outputs);
        assert!(matches!(frames[0], ClientFrame::Unsubscribe(_)));
        let ClientFrame::Subscribe(resubscribe) = frames[1] else {
            panic!("expected a re-subscribe");
        };
        assert_eq!(resubscribe.from.as_deref(), Some("E1:1"));
        let req = resubscribe.req;
        let reported = events(outputs);
        assert_eq!(
            reported,
            vec![Event::Broken(Broken {
                kind: BreakKind::Prev {
                    serial: Serial(3),
                    prev: Serial(2)
                },
                held: Some(Position::parse("E1:1").unwrap()),
            })]
        );
        assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:1");
        // Frames of the old subscription still in flight are dropped, not reported again.
        assert!(session.handle(server.append("4")).is_empty());
        session.handle(subscribed(req, Continuity::Held, Some("E1:1")));
        let mut got = Vec::new();
        for serial in 2..=4 {
            got.extend(delivered_serials(session.handle(server.replay(serial))));
        }
        assert_eq!(got, vec![2, 3, 4]);
    }

    #[test]
    fn a_forged_chain_is_reported_and_never_delivered() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        assert_eq!(
            delivered_serials(session.handle(server.append("1"))),
            vec![1]
        );
        let ServerFrame::Message(mut forged) = server.append("2") else {
            unreachable!()
        };
        // Same serial, prev and chain, altered data: only the chain can tell.
        forged.message.data = RawValue::from_string("666".to_owned()).unwrap();
        let outputs = session.handle(ServerFrame::Message(forged));
        let reported = events(outputs);
        assert!(
            matches!(
                reported.as_slice(),
                [Event::Broken(Broken {
                    kind: BreakKind::Chain {
                        serial: Serial(2),
                        ..
                    },
                    ..
                })]
            ),
            "{reported:?}"
        );
        assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:1");
    }

    #[test]
    fn the_chain_is_checked_from_genesis_and_across_binary_data() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("{\"a\":1}"));
        // A binary message: the chain covers the decoded bytes, not the base64 text.
        server.serial += 1;
        let bytes = b"\x00\x01binary";
        let id = "bin";
        server.chain = server.chain.next(
            Serial(server.serial),
            &MessageId::parse(id).unwrap(),
            &Data::Binary(Bytes::from_static(bytes)),
        );
        let text = format!(
            "\"{}\"",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        let body = MessageBody {
            id: id.to_owned(),
            channel: CHANNEL.to_owned(),
            serial: 2,
            epoch: "E1".to_owned(),
            position: "E1:2".to_owned(),
            prev: 1,
            chain: server.chain.to_hex(),
            time: 5,
            name: None,
            headers: None,
            data: RawValue::from_string(text).unwrap(),
            encoding: Some(Encoding::Base64),
            expires_at: None,
        };
        let got = events(session.handle(deliver(body)));
        let [Event::Message(message)] = got.as_slice() else {
            panic!("{got:?}");
        };
        assert_eq!(message.data, Data::Binary(Bytes::from_static(bytes)));
        assert_eq!(
            delivered_serials(session.handle(server.append("3"))),
            vec![3]
        );
    }

    #[test]
    fn breaking_again_and_again_closes_the_subscription() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        server.append("2");
        let gapped = server.append("3");
        let mut closed = false;
        for _attempt in 0..=RESYNC_IN_A_ROW_MAX {
            let outputs = session.handle(gapped.clone());
            let req = sent(&outputs).iter().find_map(|frame| match frame {
                ClientFrame::Subscribe(subscribe) => subscribe.req,
                _ => None,
            });
            closed = events(outputs)
                .iter()
                .any(|event| matches!(event, Event::Closed { .. }));
            if let Some(req) = req {
                session.handle(subscribed(Some(req), Continuity::Held, Some("E1:1")));
            }
        }
        assert!(
            closed,
            "the subscription should close after repeated breaks"
        );
        assert!(!session.is_subscribed(CHANNEL));
    }

    #[test]
    fn continuity_lost_is_reported_and_delivery_goes_on_after_its_range() {
        let mut session = Session::default();
        let options = SubscribeOptions {
            from: Some(Position::parse("E0:7").unwrap()),
            ..SubscribeOptions::default()
        };
        session.subscribe(CHANNEL, options);
        let frames = session.on_connected();
        let ClientFrame::Subscribe(subscribe) = &frames[0] else {
            panic!()
        };
        assert_eq!(subscribe.from.as_deref(), Some("E0:7"));
        let mut server = Server::new("E1");
        for n in 1..=3 {
            server.append(&n.to_string());
        }
        session.handle(subscribed(subscribe.req, Continuity::Lost, Some("E1:2")));
        let notice = ServerFrame::ContinuityLost(ws::ContinuityLostNotice {
            kind: ws::ContinuityLostTag::Tag,
            channel: CHANNEL.to_owned(),
            from: "E0:8".to_owned(),
            to: Some(server.position(2)),
            reason: "epoch_changed".to_owned(),
        });
        let reported = events(session.handle(notice));
        assert_eq!(
            reported,
            vec![Event::ContinuityLost {
                from: Position::parse("E0:8").unwrap(),
                to: Some(Position::parse("E1:2").unwrap()),
                reason: "epoch_changed".to_owned(),
            }]
        );
        // The chain is unknown at E1:2: serial 3 becomes the base, serial 4 is checked.
        assert_eq!(delivered_serials(session.handle(server.replay(3))), vec![3]);
        assert_eq!(
            delivered_serials(session.handle(server.append("4"))),
            vec![4]
        );
    }

    #[test]
    fn another_epoch_without_notice_is_a_break() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        let mut other = Server::new("E9");
        other.append("\"x\"");
        let reported = events(session.handle(other.append("\"y\"")));
        assert!(
            matches!(
                reported.as_slice(),
                [Event::Broken(Broken {
                    kind: BreakKind::Epoch { .. },
                    ..
                })]
            ),
            "{reported:?}"
        );
    }

    #[test]
    fn skips_and_gaps_move_the_position_and_holes_are_reported() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        server.append("2");
        server.append("3");
        let skip = |from: u64, to: u64, chain: Option<String>| {
            ServerFrame::Skip(ws::SkipNotice {
                kind: ws::SkipTag::Tag,
                channel: CHANNEL.to_owned(),
                from: format!("E1:{from}"),
                to: format!("E1:{to}"),
                reason: "filtered".to_owned(),
                chain,
            })
        };
        let reported = events(session.handle(skip(2, 3, Some(server.chain.to_hex()))));
        assert!(matches!(reported.as_slice(), [Event::Skip { .. }]));
        assert_eq!(session.position(CHANNEL).unwrap().to_string(), "E1:3");
        // The chain from the notice lets serial 4 be verified: a forged one is caught.
        let ServerFrame::Message(mut forged) = server.append("4") else {
            unreachable!()
        };
        forged.message.chain = ChainHash([7; 32]).to_hex();
        assert!(matches!(
            events(session.handle(ServerFrame::Message(forged))).as_slice(),
            [Event::Broken(_)]
        ));
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        server.append("2");
        server.append("3");
        server.append("4");
        // A skip that starts past the next serial leaves a hole: reported.
        let reported = events(session.handle(skip(3, 3, None)));
        assert!(
            matches!(
                reported.as_slice(),
                [Event::Broken(Broken {
                    kind: BreakKind::Hole {
                        from: Serial(2),
                        to: Serial(2)
                    },
                    ..
                })]
            ),
            "{reported:?}"
        );
    }

    #[test]
    fn at_most_once_reports_gaps_including_while_reconnecting() {
        let mut session = Session::default();
        let options = SubscribeOptions {
            guarantee: Guarantee::AtMostOnce,
            ..SubscribeOptions::default()
        };
        session.subscribe(CHANNEL, options);
        let req = subscribe_req(&session.on_connected());
        let mut server = Server::new("E1");
        session.handle(subscribed(Some(req), Continuity::New, Some("E1:0")));
        session.handle(server.append("1"));
        let gap = ServerFrame::Gap(ws::GapNotice {
            kind: ws::GapTag::Tag,
            channel: CHANNEL.to_owned(),
            from: "E1:2".to_owned(),
            to: "E1:3".to_owned(),
            reason: "slow_consumer".to_owned(),
        });
        server.append("2");
        server.append("3");
        assert!(matches!(
            events(session.handle(gap)).as_slice(),
            [Event::Gap { .. }]
        ));
        assert_eq!(
            delivered_serials(session.handle(server.append("4"))),
            vec![4]
        );
        // Reconnect: at-most-once is live only, so it never asks `from`...
        session.on_disconnected();
        let frames = session.on_connected();
        let ClientFrame::Subscribe(resubscribe) = &frames[0] else {
            panic!()
        };
        assert_eq!(
            (resubscribe.from.as_ref(), resubscribe.rewind),
            (None, None)
        );
        // ...and says what it missed while away.
        let reported =
            events(session.handle(subscribed(resubscribe.req, Continuity::New, Some("E1:9"))));
        assert!(matches!(reported[0], Event::Subscribed { .. }));
        assert_eq!(
            reported[1],
            Event::Gap {
                from: Position::parse("E1:5").unwrap(),
                to: Position::parse("E1:9").unwrap(),
                reason: "disconnected".to_owned(),
            }
        );
        // A prev break at-most-once is reported, then the stream goes on from that message.
        let mut later = Server::new("E1");
        for n in 1..=11 {
            later.append(&n.to_string());
        }
        let outputs = session.handle(later.replay(11));
        let reported = events(outputs);
        assert!(matches!(reported[0], Event::Broken(_)), "{reported:?}");
        assert!(matches!(reported[1], Event::Message(_)), "{reported:?}");
    }

    /// A server that lost its data answers a reconnecting at-most-once subscriber with an
    /// empty channel: the session reports the reset, and the new epoch's first message is
    /// delivered, not reported as a break.
    #[test]
    fn at_most_once_reports_a_reset_channel_and_follows_its_new_epoch() {
        let mut session = Session::default();
        let options = SubscribeOptions {
            guarantee: Guarantee::AtMostOnce,
            ..SubscribeOptions::default()
        };
        session.subscribe(CHANNEL, options);
        let req = subscribe_req(&session.on_connected());
        let mut old = Server::new("E1");
        session.handle(subscribed(Some(req), Continuity::New, Some("E1:0")));
        assert_eq!(delivered_serials(session.handle(old.append("1"))), vec![1]);
        session.on_disconnected();
        let req = subscribe_req(&session.on_connected());
        let reported = events(session.handle(subscribed(Some(req), Continuity::New, None)));
        assert_eq!(
            reported[1..],
            [Event::ContinuityLost {
                from: Position::parse("E1:2").unwrap(),
                to: None,
                reason: "epoch_changed".to_owned(),
            }]
        );
        let mut new = Server::new("E2");
        assert_eq!(delivered_serials(session.handle(new.append("1"))), vec![1]);
        assert_eq!(
            session.position(CHANNEL),
            Some(&Position::parse("E2:1").unwrap())
        );
    }

    #[test]
    fn resubscribe_frames_use_from_rewind_once_and_rewind_everything_for_empty_channels() {
        let mut session = Session::default();
        let rewind = SubscribeOptions {
            rewind: Some(5),
            ..SubscribeOptions::default()
        };
        session.subscribe("a", rewind);
        session.subscribe("b", SubscribeOptions::default());
        let frames = session.on_connected();
        let subscribes: Vec<&Subscribe> = frames
            .iter()
            .map(|frame| match frame {
                ClientFrame::Subscribe(subscribe) => subscribe,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(subscribes[0].rewind, Some(5));
        assert_eq!(subscribes[1].rewind, None);
        let reply = |channel: &str, req, after: Option<&str>| {
            ServerFrame::Subscribed(Subscribed {
                kind: ws::SubscribedTag::Tag,
                req,
                channel: channel.to_owned(),
                guarantee: "exactly-once".to_owned(),
                hints: false,
                filter: None,
                continuity: Continuity::New,
                after: after.map(str::to_owned),
                top: None,
            })
        };
        session.handle(reply("a", subscribes[0].req, Some("E:10")));
        session.handle(reply("b", subscribes[1].req, None));
        session.on_disconnected();
        let frames = session.on_connected();
        let ClientFrame::Subscribe(a) = &frames[0] else {
            panic!()
        };
        let ClientFrame::Subscribe(b) = &frames[1] else {
            panic!()
        };
        assert_eq!((a.from.as_deref(), a.rewind), (Some("E:10"), None));
        assert_eq!(
            (b.from.as_deref(), b.rewind),
            (None, Some(REWIND_EVERYTHING))
        );
        assert_eq!(session.recovery_key().to_string(), r#"{"a":"E:10"}"#);
    }

    fn publication(id: &str) -> PublishMessage {
        PublishMessage {
            id: Some(id.to_owned()),
            ..PublishMessage::json(RawValue::from_string("{\"n\":1}".to_owned()).unwrap())
        }
    }

    fn ack(req: u64, duplicate: bool) -> ServerFrame {
        ServerFrame::Ack(Ack {
            kind: ws::AckTag::Tag,
            req,
            id: "p1".to_owned(),
            serial: 1,
            epoch: "E1".to_owned(),
            position: "E1:1".to_owned(),
            duplicate,
        })
    }

    #[test]
    fn publishes_are_resent_with_the_same_id_and_complete_once() {
        let mut session = Session::default();
        let (req, frames) = session.publish(CHANNEL, publication("p1"));
        assert!(frames.is_empty(), "not connected yet");
        let ids = |frames: &[ClientFrame]| -> Vec<(u64, String)> {
            frames
                .iter()
                .filter_map(|frame| match frame {
                    ClientFrame::Publish(publish) => {
                        Some((publish.req, publish.id.clone().unwrap()))
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(ids(&session.on_connected()), vec![(req, "p1".to_owned())]);
        session.on_disconnected();
        assert_eq!(ids(&session.on_connected()), vec![(req, "p1".to_owned())]);
        let outputs = session.handle(ack(req, true));
        assert!(matches!(
            outputs.as_slice(),
            [Output::Acked { req: acked, ack }] if *acked == req && ack.duplicate
        ));
        assert!(
            session.handle(ack(req, false)).is_empty(),
            "acked once only"
        );
        assert_eq!(session.publishes_pending(), 0);
        session.on_disconnected();
        assert!(ids(&session.on_connected()).is_empty());
    }

    #[test]
    fn retryable_nacks_retry_with_the_same_id_and_final_ones_fail() {
        let mut session = Session::new(SessionConfig {
            publish_nacks_max: 2,
        });
        session.on_connected();
        let (req, _) = session.publish(CHANNEL, publication("p1"));
        let nack = |retryable| {
            ServerFrame::Nack(Nack {
                kind: ws::NackTag::Tag,
                req,
                code: if retryable { "timeout" } else { "id_conflict" }.to_owned(),
                message: "no".to_owned(),
                retryable,
            })
        };
        for _ in 0..2 {
            assert!(matches!(
                session.handle(nack(true)).as_slice(),
                [Output::RetryLater]
            ));
            let frames = session.retry_waiting();
            let [ClientFrame::Publish(again)] = frames.as_slice() else {
                panic!("{frames:?}")
            };
            assert_eq!(again.id.as_deref(), Some("p1"));
        }
        // The third retryable refusal is over the bound: the publish fails.
        assert!(matches!(
            session.handle(nack(true)).as_slice(),
            [Output::PublishFailed { .. }]
        ));
        let (req, _) = session.publish(CHANNEL, publication("p2"));
        let final_nack = ServerFrame::Nack(Nack {
            kind: ws::NackTag::Tag,
            req,
            code: "id_conflict".to_owned(),
            message: "no".to_owned(),
            retryable: false,
        });
        assert!(matches!(
            session.handle(final_nack).as_slice(),
            [Output::PublishFailed { error, .. }] if error.code == "id_conflict"
        ));
    }

    #[test]
    fn a_position_behind_the_previous_heartbeat_top_is_reported() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        let heartbeat = |top: &str| {
            let mut channels = BTreeMap::new();
            channels.insert(CHANNEL.to_owned(), Some(top.to_owned()));
            ServerFrame::Heartbeat(Heartbeat {
                kind: ws::HeartbeatTag::Tag,
                time: 0,
                channels,
            })
        };
        // The first heartbeat only announces a top; messages may still be on their way.
        assert!(session.handle(heartbeat("E1:2")).is_empty());
        server.append("2");
        // One heartbeat later the subscriber still holds 1: stalled.
        let reported = events(session.handle(heartbeat("E1:2")));
        assert_eq!(
            reported,
            vec![Event::Stalled {
                position: Some(Position::parse("E1:1").unwrap()),
                top: Position::parse("E1:2").unwrap(),
            }]
        );
        session.handle(server.replay(2));
        assert!(session.handle(heartbeat("E1:2")).is_empty());
    }

    #[test]
    fn hints_advance_the_position_one_serial_at_a_time() {
        let (mut session, _server) = started(SubscribeOptions {
            hints: true,
            ..SubscribeOptions::default()
        });
        let hint = |serial: u64| {
            ServerFrame::Hint(ws::Hint {
                kind: ws::HintTag::Tag,
                channel: CHANNEL.to_owned(),
                serial,
                epoch: "E1".to_owned(),
                position: format!("E1:{serial}"),
            })
        };
        assert!(matches!(
            events(session.handle(hint(1))).as_slice(),
            [Event::Hint { .. }]
        ));
        assert!(session.handle(hint(1)).is_empty(), "a repeat is dropped");
        assert!(matches!(
            events(session.handle(hint(3))).as_slice(),
            [Event::Broken(_)]
        ));
    }

    #[test]
    fn subscribe_errors_close_or_retry() {
        let mut session = Session::default();
        session.subscribe(CHANNEL, SubscribeOptions::default());
        let req = subscribe_req(&session.on_connected());
        let error = |req, retryable| {
            ServerFrame::Error(ErrorFrame {
                kind: ws::ErrorTag::Tag,
                req: Some(req),
                channel: Some(CHANNEL.to_owned()),
                code: "unavailable".to_owned(),
                message: "busy".to_owned(),
                retryable,
            })
        };
        let outputs = session.handle(error(req, true));
        assert!(matches!(outputs.last(), Some(Output::RetryLater)));
        let req = subscribe_req(&session.retry_waiting());
        let reported = events(session.handle(error(req, false)));
        assert!(matches!(reported.last(), Some(Event::Closed { .. })));
        assert!(!session.is_subscribed(CHANNEL));
    }

    #[test]
    fn a_subscription_the_server_ended_is_resumed_from_the_held_position_after_a_backoff() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        let ended = ServerFrame::Error(ErrorFrame {
            kind: ws::ErrorTag::Tag,
            req: None,
            channel: Some(CHANNEL.to_owned()),
            code: "storage_failed".to_owned(),
            message: "disk".to_owned(),
            retryable: true,
        });
        let outputs = session.handle(ended);
        assert!(matches!(sent(&outputs)[..], [ClientFrame::Unsubscribe(_)]));
        assert!(matches!(outputs.last(), Some(Output::RetryLater)));
        // Frames of the ended subscription still in flight are not taken.
        assert!(session.handle(server.append("2")).is_empty());
        let frames = session.retry_waiting();
        let [ClientFrame::Subscribe(again)] = frames.as_slice() else {
            panic!("{frames:?}")
        };
        assert_eq!(again.from.as_deref(), Some("E1:1"));
        session.handle(subscribed(again.req, Continuity::Held, Some("E1:1")));
        assert_eq!(delivered_serials(session.handle(server.replay(2))), vec![2]);
    }

    #[test]
    fn frames_left_over_from_a_replaced_subscription_are_dropped() {
        let (mut session, mut server) = started(SubscribeOptions::default());
        session.handle(server.append("1"));
        // The application drops the subscription and subscribes again at once: frames of the
        // old one still in flight arrive before the new `subscribed`.
        session.unsubscribe(CHANNEL);
        let frames = session.subscribe(CHANNEL, SubscribeOptions::default());
        let req = subscribe_req(&frames);
        assert!(session.handle(server.append("2")).is_empty());
        let reported = events(session.handle(subscribed(Some(req), Continuity::New, Some("E1:2"))));
        assert!(matches!(reported.as_slice(), [Event::Subscribed { .. }]));
        assert_eq!(
            delivered_serials(session.handle(server.append("3"))),
            vec![3]
        );
    }

    #[test]
    fn a_channel_empty_at_subscribe_time_reports_what_it_could_not_replay() {
        for guarantee in [Guarantee::ExactlyOnce, Guarantee::AtMostOnce] {
            let mut session = Session::default();
            let options = SubscribeOptions {
                guarantee,
                ..SubscribeOptions::default()
            };
            session.subscribe(CHANNEL, options);
            let req = subscribe_req(&session.on_connected());
            session.handle(subscribed(Some(req), Continuity::New, None));
            session.on_disconnected();
            let frames = session.on_connected();
            let ClientFrame::Subscribe(again) = &frames[0] else {
                panic!()
            };
            // Exactly-once asks for everything since the start; at-most-once is live only.
            let expected_rewind = match guarantee {
                Guarantee::ExactlyOnce => Some(REWIND_EVERYTHING),
                Guarantee::AtMostOnce => None,
            };
            assert_eq!(again.rewind, expected_rewind);
            // The server no longer has serials 1..=4 (or at-most-once never replays them).
            let reported =
                events(session.handle(subscribed(again.req, Continuity::New, Some("E1:4"))));
            let (from, to) = match &reported[1] {
                Event::ContinuityLost { from, to, .. } => (from.clone(), to.clone().unwrap()),
                Event::Gap { from, to, .. } => (from.clone(), to.clone()),
                other => panic!("{guarantee}: {other:?}"),
            };
            assert_eq!(
                (from.to_string(), to.to_string()),
                ("E1:1".into(), "E1:4".into())
            );
        }
    }
}
