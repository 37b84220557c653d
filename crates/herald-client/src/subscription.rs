//! [`Subscription`]: the events of one subscribed channel, taken by the application one at a
//! time from a bounded queue the connection task fills.
//!
//! # Invariants
//! - With [`crate::AckMode::Auto`], a delivery is acked exactly when the application asks for
//!   the event after it (never before the application had it, never twice by the SDK).

use tokio::sync::mpsc;

use crate::ack::AckHandle;
use crate::client::Command;
use crate::event::Event;

/// The events of one subscribed channel. Dropping it unsubscribes.
pub struct Subscription {
    channel: String,
    subscriber: u64,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
    auto_ack: bool,
    /// Auto acks: the delivery handed out last, acked on the next call to `next`.
    handed: Option<AckHandle>,
}

impl Subscription {
    pub(crate) fn new(
        channel: String,
        subscriber: u64,
        events: mpsc::Receiver<Event>,
        commands: mpsc::Sender<Command>,
        auto_ack: bool,
    ) -> Self {
        Self {
            channel,
            subscriber,
            events,
            commands,
            auto_ack,
            handed: None,
        }
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event; `None` once the subscription or the client is closed.
    ///
    /// At-least-once with [`crate::AckMode::Auto`]: calling it acks the delivery it returned
    /// last.
    pub async fn next(&mut self) -> Option<Event> {
        if let Some(handed) = self.handed.take() {
            // Fails only when the client stopped: the delivery then comes again to the next
            // consumer, which is what at-least-once promises.
            let _ = handed.ack();
        }
        let event = self.events.recv().await?;
        if self.auto_ack
            && let Event::Delivery(delivery) = &event
        {
            self.handed = Some(delivery.ack.clone());
        }
        Some(event)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Best effort: when the queue is full the task notices the dropped receiver itself
        // on its next delivery to it.
        let _ = self.commands.try_send(Command::Unsubscribe {
            channel: std::mem::take(&mut self.channel),
            subscriber: self.subscriber,
        });
    }
}
