//! What a [`DurableMachine`](super::DurableMachine) hands its driver: actions, frames, ack
//! tickets and rejections, and the dead-letter and idle-expiry rules a driver applies.

use std::fmt;

use crate::engine::subscription::Continuity;
use crate::error::{ErrorCode, InvalidInput};
use crate::message::Timestamp;
use crate::names::{ChannelName, Epoch, MessageId};
use crate::position::{Position, Serial};
use crate::stream::ContinuityReason;
use crate::subscriber::{SubscriberId, SubscriberState};

/// What a durable subscriber is sent, transport-neutral.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurableOutbound<M> {
    /// The reply to the subscribe request; always first. Sent once the subscriber's state is
    /// durable, so "subscribed" means the server holds the position.
    Subscribed {
        continuity: Continuity,
        /// The acknowledged position delivery starts after (`None`: the channel has no
        /// messages yet).
        after: Option<Position>,
        top: Option<Position>,
    },
    /// A message, with how many times it has been delivered (1 the first time).
    Delivery { message: M, delivery_count: u32 },
    /// `from..=to` is lost for this subscriber (its position could not be continued: retention,
    /// a new epoch, a position ahead of the top); the position moved to `to`.
    ContinuityLost {
        from: Position,
        to: Option<Position>,
        reason: ContinuityReason,
    },
    /// The TTL of `from..=to` ran out before they were acked: they are done, nothing follows.
    Expired { from: Position, to: Position },
}

/// Why a message goes to the dead-letter channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Delivered `max_deliveries` times without an ack.
    MaxDeliveries,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MaxDeliveries => "max_deliveries",
        }
    }
}

/// Names a point in the machine's sequence of state changes: an ack is durable once the
/// machine reported a ticket at least as high ([`DurableAction::AcksDurable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AckTicket(pub u64);

/// An effect the driver performs for the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurableAction<M> {
    /// Read the channel's status; answer with [`DurableMachine::handle_status`].
    ReadStatus,
    /// Read up to `limit` messages after `after`; answer with [`DurableMachine::handle_page`].
    Read { after: Position, limit: usize },
    /// Make this snapshot durable; answer (later) with [`DurableMachine::handle_persisted`].
    Persist(SubscriberState),
    /// Send, waiting for room in the outbound queue.
    Send(DurableOutbound<M>),
    /// Publish the message to the dead-letter channel, durably; answer with
    /// [`DurableMachine::handle_dead_lettered`]. Use an id derived from (subscriber, epoch,
    /// serial) so that a repeat after a crash is deduplicated.
    DeadLetter {
        message: M,
        deliveries: u32,
        reason: DeadLetterReason,
    },
    /// Every ack whose ticket is at most this one is durable.
    AcksDurable(AckTicket),
    /// The machine caught an inconsistency or its state could not be persisted: end the
    /// subscription with an error. The machine is finished.
    Fail(String),
}

/// Why an ack was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckRejected {
    /// The acked position is in another epoch than the subscriber's.
    WrongEpoch { acked: Position, epoch: Epoch },
    /// The serial was never delivered to this subscriber (or lies beyond what was delivered).
    NotDelivered {
        serial: Serial,
        delivered_through: Serial,
    },
    /// The subscriber has no position yet (the channel has no messages).
    NothingDelivered,
}

impl AckRejected {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidAck
    }
}

impl fmt::Display for AckRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckRejected::WrongEpoch { acked, epoch } => write!(
                f,
                "ack of {acked}: the subscriber's position is in epoch {epoch}"
            ),
            AckRejected::NotDelivered {
                serial,
                delivered_through,
            } => write!(
                f,
                "ack of serial {serial}, which was not delivered (delivered through {delivered_through})"
            ),
            AckRejected::NothingDelivered => f.write_str("ack before anything was delivered"),
        }
    }
}

/// When a subscriber not connected since `state.last_active` is removed (idle expiry), if
/// ever. Only for subscribers without a connection: a connected one is never idle.
pub fn idle_deadline(state: &SubscriberState) -> Option<Timestamp> {
    (state.options.expires_after_ms > 0)
        .then(|| state.last_active.plus_ms(state.options.expires_after_ms))
}

/// The default dead-letter channel of `channel`: `<channel>.dead`, in the same namespace (so
/// its policy and permissions apply). Fails when the name would be too long.
pub fn dead_letter_channel(channel: &ChannelName) -> Result<ChannelName, InvalidInput> {
    ChannelName::parse(&format!("{channel}.dead"))
}

/// The message id of the dead letter of `position` for `subscriber`: the same on every
/// attempt, so a dead letter published again after a crash (before its serial was recorded
/// as done) is deduplicated by the dead-letter channel.
pub fn dead_letter_id(subscriber: &SubscriberId, position: &Position) -> MessageId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"herald:dead-letter:v1:");
    hasher.update(&(subscriber.as_str().len() as u64).to_le_bytes());
    hasher.update(subscriber.as_str().as_bytes());
    hasher.update(&(position.epoch.as_str().len() as u64).to_le_bytes());
    hasher.update(position.epoch.as_str().as_bytes());
    hasher.update(&position.serial.0.to_le_bytes());
    let hex = hasher.finalize().to_hex();
    MessageId::parse(&format!("dl-{}", &hex[..32])).expect("hex is a valid message id")
}
