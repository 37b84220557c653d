//! At-least-once subscriptions over the WebSocket protocol: the validation of a durable
//! `subscribe`, the [`DurableSink`] that turns a pump's output into frames on the
//! connection's queue, and the routing of `ack` frames to the pump.
//!
//! A durable subscription is one pump task (see `durable::pump`) plus a bounded control
//! queue the connection's reader puts acks into. When the connection ends, the control queue
//! closes and the pump persists its last snapshot before it lets go of the subscriber.

use std::sync::Arc;

use herald_core::engine::{AckRejected, DurableOutbound, Start};
use herald_core::{ChannelName, ErrorCode, InvalidInput, Position, SubscriberId};
use herald_protocol::ws::{
    AckDeliveries, Acked, AckedTag, ErrorFrame, ErrorTag, ServerFrame, Subscribe, SubscribeEcho,
    close, durable_frame,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::durable::{Control, DurableContext, DurableRequest, DurableSink, Gone, PumpEnd};
use crate::hub::LiveMessage;
use crate::live::Outgoing;

/// The wire name of the guarantee.
pub const AT_LEAST_ONCE: &str = "at-least-once";

/// Acks a connection may have queued for one subscription before its reader waits.
const CONTROL_QUEUE: usize = 256;

/// A running durable subscription of a connection.
pub struct DurableSubscription {
    pub task: JoinHandle<()>,
    control: mpsc::Sender<Control>,
}

impl DurableSubscription {
    /// Hands an `ack` frame to the pump. `Err` carries the error to answer with.
    pub async fn ack(&self, ack: &AckDeliveries) -> Result<(), (ErrorCode, String)> {
        let (through, text) = match (&ack.through, &ack.position) {
            (Some(through), None) => (true, through),
            (None, Some(position)) => (false, position),
            _ => {
                return Err((
                    ErrorCode::InvalidFrame,
                    "an ack has exactly one of through (cumulative) and position (one serial)"
                        .into(),
                ));
            }
        };
        let position =
            Position::parse(text).map_err(|error| (error.code, error.message.clone()))?;
        self.control
            .send(Control::Ack {
                req: ack.req,
                through,
                position,
            })
            .await
            .map_err(|_| {
                (
                    ErrorCode::NotSubscribed,
                    format!("the subscription on {:?} has ended", ack.channel),
                )
            })
    }

    /// Ends the subscription: the pump persists its last snapshot, then stops.
    pub fn close(self) -> JoinHandle<()> {
        drop(self.control);
        self.task
    }
}

/// Validates a durable `subscribe` (guarantee `at-least-once`).
pub fn request(
    context: &DurableContext,
    channel: ChannelName,
    subscribe: &Subscribe,
) -> Result<DurableRequest, InvalidInput> {
    let Some(id) = subscribe.subscriber_id.as_deref() else {
        return Err(InvalidInput::request(
            "at-least-once needs a subscriber_id: the name the server keeps the position under",
        ));
    };
    let id = SubscriberId::parse(id)?;
    crate::webhook::refuse_reserved(&id)?;
    if subscribe.from.is_some() || subscribe.rewind.is_some() {
        return Err(InvalidInput::request(
            "at-least-once subscriptions start from the position the server holds: from and rewind are for exactly-once",
        ));
    }
    if subscribe.hints == Some(true) || subscribe.filter.is_some() {
        return Err(InvalidInput::request(
            "at-least-once subscriptions take neither hints nor a filter",
        ));
    }
    let options = context.options(&subscribe.options.clone().unwrap_or_default())?;
    Ok(DurableRequest {
        channel,
        id,
        options,
        // A new subscriber gets what is published from now on.
        start: Start::Live,
    })
}

/// Starts the pump of a validated durable subscription on a connection.
pub fn spawn(
    context: Arc<DurableContext>,
    req: Option<u64>,
    request: DurableRequest,
    out: mpsc::Sender<Outgoing>,
) -> DurableSubscription {
    let (control, inputs) = mpsc::channel(CONTROL_QUEUE);
    let sink = WsSink {
        channel: request.channel.to_string(),
        req,
        out,
    };
    let task = tokio::spawn(crate::durable::pump::run(context, request, sink, inputs));
    DurableSubscription { task, control }
}

struct WsSink {
    channel: String,
    /// The subscribe request's id, echoed in `subscribed`.
    req: Option<u64>,
    out: mpsc::Sender<Outgoing>,
}

impl WsSink {
    async fn frame(&self, frame: ServerFrame) -> Result<(), Gone> {
        self.out
            .send(Outgoing::Frame(frame))
            .await
            .map_err(|_| Gone)
    }

    fn error(&self, req: Option<u64>, code: ErrorCode, message: String) -> ServerFrame {
        ServerFrame::Error(ErrorFrame {
            kind: ErrorTag::Tag,
            req,
            channel: Some(self.channel.clone()),
            code: code.as_str().to_owned(),
            message,
            retryable: code.retryable(),
        })
    }
}

impl DurableSink for WsSink {
    async fn deliver(&mut self, outbound: DurableOutbound<Arc<LiveMessage>>) -> Result<(), Gone> {
        let echo = SubscribeEcho {
            req: self.req,
            guarantee: AT_LEAST_ONCE.to_owned(),
            hints: false,
            filter: None,
        };
        match durable_frame(&self.channel, outbound, &echo) {
            Ok(frame) => self.frame(frame).await,
            Err((live, delivery)) => self
                .out
                .send(Outgoing::Counted { live, delivery })
                .await
                .map_err(|_| Gone),
        }
    }

    async fn acked(&mut self, req: u64) -> Result<(), Gone> {
        let frame = ServerFrame::Acked(Acked {
            kind: AckedTag::Tag,
            req,
            channel: self.channel.clone(),
        });
        self.frame(frame).await
    }

    async fn ack_refused(&mut self, req: Option<u64>, rejected: AckRejected) -> Result<(), Gone> {
        let frame = self.error(req, rejected.code(), rejected.to_string());
        self.frame(frame).await
    }

    async fn ended(&mut self, end: PumpEnd) {
        match end {
            PumpEnd::Gone => {}
            PumpEnd::Evicted(eviction) => {
                let reason = eviction.describe().to_owned();
                let _ = self
                    .out
                    .send(Outgoing::Close {
                        code: close::TAKEN_OVER,
                        reason,
                    })
                    .await;
            }
            PumpEnd::Failed(message) => {
                // Subscribing again continues from the last durable state.
                let frame = self.error(None, ErrorCode::StorageFailed, message);
                let _ = self.frame(frame).await;
            }
        }
    }
}
