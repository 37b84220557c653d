//! What a subscription hands the application: [`Event`]s, and the [`Message`] inside a
//! delivery.
//!
//! Every serial of a subscribed channel reaches the application as exactly one of: a
//! [`Event::Message`] (or [`Event::Hint`]), or part of the range of a [`Event::Skip`],
//! [`Event::Gap`] or [`Event::ContinuityLost`]. Anything the session cannot account for that
//! way is an [`Event::Broken`]: the SDK reports it and never smooths it over.
//!
//! At-least-once subscriptions get [`Event::Delivery`] instead of [`Event::Message`]: each
//! message at least once until acked (a redelivery may come after later serials), with its
//! delivery count and an [`AckHandle`]; and [`Event::Expired`] for messages whose TTL ran out
//! before they were acked.

use std::collections::BTreeMap;

use herald_core::{ChainHash, Data, Epoch, Position, Serial};
use herald_protocol::ws::Continuity;
use serde::de::DeserializeOwned;

use crate::ack::{AckError, AckHandle};

/// One message as delivered, with its place in the channel's stream checked: its `prev` was
/// the position held before it, and its `chain` was recomputed when the chain was known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub channel: String,
    pub id: String,
    pub position: Position,
    /// Server time of acceptance, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub name: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// JSON text exactly as stored, or the binary payload (decoded from base64).
    pub data: Data,
    pub chain: ChainHash,
    pub expires_at_ms: Option<u64>,
}

impl Message {
    pub fn serial(&self) -> Serial {
        self.position.serial
    }

    /// Decodes JSON data; binary data is an error.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.data {
            Data::Json(bytes) => serde_json::from_slice(bytes),
            Data::Binary(_) => Err(serde::de::Error::custom(
                "the message carries binary data, not JSON",
            )),
        }
    }
}

/// At-least-once: one delivery of a message, to be acked through [`Delivery::ack`] (or the
/// [`AckHandle`], which can be cloned and moved to another task).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub message: Message,
    /// How many times the server has delivered this message to this subscriber, across
    /// connections and restarts: 1 the first time.
    pub delivery: u32,
    pub ack: AckHandle,
}

impl Delivery {
    /// Acks this delivery; see [`AckHandle::ack`].
    pub fn ack(&self) -> Result<(), AckError> {
        self.ack.ack()
    }

    /// Acks every delivery up to and including this one; see [`AckHandle::ack_through`].
    pub fn ack_through(&self) -> Result<(), AckError> {
        self.ack.ack_through()
    }

    /// Whether the server delivered this message before (it was not acked in time, or the
    /// connection dropped before the ack arrived).
    pub fn is_redelivery(&self) -> bool {
        self.delivery > 1
    }
}

/// What happened on a subscribed channel, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The server accepted the subscription (again, after every reconnect). `after` is where
    /// deliveries start (absent: the channel has no message yet).
    Subscribed {
        guarantee: String,
        continuity: Continuity,
        after: Option<Position>,
        top: Option<Position>,
    },
    Message(Box<Message>),
    /// At-least-once: a message, with its delivery count and ack handle.
    Delivery(Box<Delivery>),
    /// At-least-once: the TTL of the messages `from..=to` ran out before they were acked.
    /// They count as done and are not delivered again.
    Expired {
        from: Position,
        to: Position,
    },
    /// At-least-once: another connection subscribed with the same `subscriber_id` and took the
    /// subscriber over (close code 4004), or the subscriber was deleted. The client stops and
    /// does not take it back (two consumers would take it from each other in turn); a
    /// [`Event::Closed`] follows.
    TakenOver,
    /// Hints mode: a message exists at `position`; fetch it through the HTTP API if needed.
    Hint {
        position: Position,
    },
    /// The requested position could not be honoured: serials `from..=to` are missed (`from`
    /// may be in an older epoch). Delivery continues right after `to`; without `to` the
    /// channel has no message at all and delivery starts with its first one.
    ContinuityLost {
        from: Position,
        to: Option<Position>,
        reason: String,
    },
    /// At-most-once: serials `from..=to` were dropped (`slow_consumer` from the server, or
    /// `disconnected` when the SDK saw the channel move on while it was reconnecting).
    Gap {
        from: Position,
        to: Position,
        reason: String,
    },
    /// Serials `from..=to` exist but are not for this subscription (`filtered`, `expired`);
    /// nothing was lost.
    Skip {
        from: Position,
        to: Position,
        reason: String,
    },
    /// What arrived does not follow what the session holds. The offending frame was not
    /// delivered and the held position did not move; an exactly-once subscription re-subscribes
    /// from its held position (at most a few times in a row, then it is closed).
    Broken(Broken),
    /// The subscription's position stayed behind a `top` the server announced one heartbeat
    /// earlier: messages are late (a slow catch-up) or missing.
    Stalled {
        position: Option<Position>,
        top: Position,
    },
    /// The server reported an error about this subscription.
    Error {
        code: String,
        message: String,
        retryable: bool,
    },
    /// The subscription ended; no event follows.
    Closed {
        reason: String,
    },
}

/// A break in a channel's stream as the session saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub kind: BreakKind,
    /// The position the session held (and still holds).
    pub held: Option<Position>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakKind {
    /// A message's `prev` is not the held serial: serials in between were never accounted for.
    Prev { serial: Serial, prev: Serial },
    /// The recomputed chain differs from the one the server sent: the stream was altered.
    Chain {
        serial: Serial,
        expected: ChainHash,
        received: String,
    },
    /// A frame from another epoch arrived without a `continuity_lost` notice first.
    Epoch { serial: Serial, received: Epoch },
    /// A notice starts after the serial following the held one.
    Hole { from: Serial, to: Serial },
    /// A frame's fields are inconsistent or malformed.
    Malformed { detail: String },
}
