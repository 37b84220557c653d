//! Ack handles of at-least-once deliveries, and the mailbox that carries acks from the
//! application to the connection task.
//!
//! [`AckHandle::ack`] never waits: it records the ack in a mailbox shared with the connection
//! task (a `std::sync::Mutex` held only to insert or take, never across an `.await`) and wakes
//! the task, which takes everything recorded at once and hands it to the session (where
//! in-order acks fold into one cumulative frame). So the application never blocks on acks, and
//! a burst of acks costs a few frames.
//!
//! # Invariants
//! - The mailbox is bounded by what was delivered: it holds at most one cumulative position
//!   per channel and epoch, and a set of individual positions (acking a serial twice records
//!   it once); every entry comes from the handle of a delivery.
//! - An ack recorded while the connection is down stays in the mailbox, and an ack sent but
//!   not answered stays pending in the session: both go out after the reconnect's
//!   `subscribed`. Acks are lost only when the client stops (then [`AckError::Closed`] or
//!   [`AckError::TakenOver`]): the message is delivered again to the next consumer.
//! - Every [`AckHandle::ack_durable`] gets exactly one answer: durable, refused, or the client
//!   stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use herald_core::{Epoch, Position, Serial};
use tokio::sync::{Notify, oneshot};

/// Why an ack did not (or may not have) become durable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The client stopped before the ack was confirmed; the message will be delivered again.
    #[error("the client is closed; the ack may not have been recorded")]
    Closed,
    /// Another connection took the subscriber over (close code 4004).
    #[error("the subscriber was taken over by another connection (close code 4004)")]
    TakenOver,
    /// The subscription ended (unsubscribed or closed) before the ack was confirmed.
    #[error("the subscription to {0:?} ended before the ack was confirmed")]
    Unsubscribed(String),
    /// The server refused the ack (`invalid_ack`: never delivered, or another epoch).
    #[error("the server refused the ack: {code}: {message}")]
    Rejected { code: String, message: String },
}

/// Acknowledges one at-least-once delivery. Cheap to clone, `Send + Sync`; usable from any
/// task, and still valid after a reconnect (the server counts deliveries across connections,
/// so an ack of a message delivered by an earlier connection is accepted).
#[derive(Clone)]
pub struct AckHandle {
    mailbox: Arc<AckMailbox>,
    channel: Arc<str>,
    position: Position,
}

impl AckHandle {
    pub(crate) fn new(mailbox: Arc<AckMailbox>, channel: Arc<str>, position: Position) -> Self {
        Self {
            mailbox,
            channel,
            position,
        }
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The position of the delivery this handle acks.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// Acks this delivery (this serial only). Returns at once; the ack is sent in the
    /// background (and re-sent after a reconnect until the server confirms it). An error
    /// means the client stopped: the ack cannot be sent.
    pub fn ack(&self) -> Result<(), AckError> {
        self.mailbox
            .record(&self.channel, Kind::One, &self.position, None)
    }

    /// Acks every delivery of the channel up to and including this one (cumulative).
    pub fn ack_through(&self) -> Result<(), AckError> {
        self.mailbox
            .record(&self.channel, Kind::Through, &self.position, None)
    }

    /// [`AckHandle::ack`], then waits until the server says the ack is durable.
    pub async fn ack_durable(&self) -> Result<(), AckError> {
        self.durable(Kind::One).await
    }

    /// [`AckHandle::ack_through`], then waits until the server says the ack is durable.
    pub async fn ack_through_durable(&self) -> Result<(), AckError> {
        self.durable(Kind::Through).await
    }

    async fn durable(&self, kind: Kind) -> Result<(), AckError> {
        let (reply, answer) = oneshot::channel();
        self.mailbox
            .record(&self.channel, kind, &self.position, Some(reply))?;
        answer.await.unwrap_or(Err(AckError::Closed))
    }
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("channel", &self.channel)
            .field("position", &self.position.to_string())
            .finish()
    }
}

/// Two handles are equal when they ack the same delivery position of the same channel.
impl PartialEq for AckHandle {
    fn eq(&self, other: &Self) -> bool {
        self.channel == other.channel && self.position == other.position
    }
}

impl Eq for AckHandle {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Through,
    One,
}

pub(crate) type AckReply = oneshot::Sender<Result<(), AckError>>;

/// An ack someone waits on: sent on its own frame so its answer is its own.
pub(crate) struct AwaitedAck {
    pub kind: Kind,
    pub position: Position,
    pub reply: AckReply,
}

/// What the mailbox holds for one channel.
#[derive(Default)]
pub(crate) struct ChannelAcks {
    /// The highest cumulative ack per epoch.
    pub through: BTreeMap<Epoch, Serial>,
    pub positions: BTreeSet<(Epoch, Serial)>,
    pub awaited: Vec<AwaitedAck>,
}

impl ChannelAcks {
    pub fn through_positions(&self) -> Vec<Position> {
        self.through
            .iter()
            .map(|(epoch, serial)| Position::new(epoch.clone(), *serial))
            .collect()
    }

    /// The individual positions not covered by a cumulative ack of the same batch.
    pub fn single_positions(&self) -> Vec<Position> {
        self.positions
            .iter()
            .filter(|(epoch, serial)| {
                self.through
                    .get(epoch)
                    .is_none_or(|through| serial > through)
            })
            .map(|(epoch, serial)| Position::new(epoch.clone(), *serial))
            .collect()
    }
}

#[derive(Default)]
struct Inbox {
    stopped: Option<AckError>,
    channels: BTreeMap<String, ChannelAcks>,
}

/// Shared by every [`AckHandle`] of one client and its connection task.
#[derive(Default)]
pub(crate) struct AckMailbox {
    inbox: Mutex<Inbox>,
    /// Wakes the connection task; a wake with nobody waiting is kept for the next wait.
    wake: Notify,
}

impl AckMailbox {
    fn record(
        &self,
        channel: &str,
        kind: Kind,
        position: &Position,
        reply: Option<AckReply>,
    ) -> Result<(), AckError> {
        {
            let mut inbox = self.inbox.lock().expect("ack mailbox lock");
            if let Some(stopped) = &inbox.stopped {
                return Err(stopped.clone());
            }
            let acks = inbox.channels.entry(channel.to_owned()).or_default();
            match (reply, kind) {
                (Some(reply), kind) => acks.awaited.push(AwaitedAck {
                    kind,
                    position: position.clone(),
                    reply,
                }),
                (None, Kind::Through) => {
                    let through = acks
                        .through
                        .entry(position.epoch.clone())
                        .or_insert(position.serial);
                    *through = (*through).max(position.serial);
                }
                (None, Kind::One) => {
                    acks.positions
                        .insert((position.epoch.clone(), position.serial));
                }
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Waits until an ack is recorded (or was since the last wait).
    pub async fn recorded(&self) {
        self.wake.notified().await;
    }

    /// Takes everything recorded.
    pub fn take(&self) -> BTreeMap<String, ChannelAcks> {
        let mut inbox = self.inbox.lock().expect("ack mailbox lock");
        std::mem::take(&mut inbox.channels)
    }

    /// Puts taken acks back (merged with anything recorded since).
    pub fn restore(&self, channel: String, taken: ChannelAcks) {
        let mut inbox = self.inbox.lock().expect("ack mailbox lock");
        let acks = inbox.channels.entry(channel).or_default();
        for (epoch, serial) in taken.through {
            let through = acks.through.entry(epoch).or_insert(serial);
            *through = (*through).max(serial);
        }
        acks.positions.extend(taken.positions);
        acks.awaited.extend(taken.awaited);
    }

    /// Whether anything is recorded.
    pub fn is_empty(&self) -> bool {
        self.inbox
            .lock()
            .expect("ack mailbox lock")
            .channels
            .is_empty()
    }

    /// Wakes the connection task again (something is left to send).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The client stopped: later acks fail with `reason`, and waiting ones are answered.
    pub fn stop(&self, reason: AckError) {
        let channels = {
            let mut inbox = self.inbox.lock().expect("ack mailbox lock");
            inbox.stopped = Some(reason.clone());
            std::mem::take(&mut inbox.channels)
        };
        for acks in channels.into_values() {
            for awaited in acks.awaited {
                let _ = awaited.reply.send(Err(reason.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(mailbox: &Arc<AckMailbox>, serial: u64) -> AckHandle {
        AckHandle::new(
            mailbox.clone(),
            Arc::from("jobs"),
            Position::new(Epoch::parse("E").unwrap(), Serial(serial)),
        )
    }

    #[test]
    fn handles_and_deliveries_move_between_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<AckHandle>();
        send_sync::<crate::Delivery>();
        send_sync::<crate::Event>();
    }

    #[test]
    fn acks_coalesce_in_the_mailbox_and_fail_once_stopped() {
        let mailbox = Arc::new(AckMailbox::default());
        for serial in [3, 1, 3, 2] {
            handle(&mailbox, serial).ack().unwrap();
        }
        handle(&mailbox, 2).ack_through().unwrap();
        handle(&mailbox, 1).ack_through().unwrap();
        let taken = mailbox.take();
        let acks = &taken["jobs"];
        assert_eq!(acks.through_positions().len(), 1);
        assert_eq!(acks.through_positions()[0].to_string(), "E:2");
        let singles: Vec<String> = acks
            .single_positions()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            singles,
            ["E:3"],
            "1 and 2 are covered by the cumulative ack"
        );
        assert!(mailbox.is_empty());
        mailbox.stop(AckError::TakenOver);
        assert_eq!(handle(&mailbox, 4).ack(), Err(AckError::TakenOver));
    }
}
