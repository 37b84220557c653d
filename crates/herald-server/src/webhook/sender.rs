//! The webhook [`DurableSink`]: turns each delivery of a rule's durable subscriber into a
//! signed HTTP POST and reports the outcome to the pump.
//!
//! `deliver` never waits for the HTTP call: it spawns the attempt and returns, and the attempt
//! answers through the pump's control queue: a 2xx response is an ack of that serial;
//! anything else (another status, a timeout, a connection error) is a retry at
//! `now + backoff(delivery)` ([`backoff`]), or right away after the rule's last attempt, so
//! the machine moves the message to `<channel>.dead` without a useless wait.
//!
//! # Invariants
//! - With the subscriber's `inflight_max: 1` at most one attempt per (rule, channel) is in
//!   flight, and message n+1 is not sent before message n is acked or dead-lettered: that is
//!   what keeps per-channel order.
//! - The sink holds only a weak handle on the control queue: once its worker lets go of the
//!   strong one (shutdown), the pump sees the queue close, persists its last state and ends;
//!   an attempt finishing after that is dropped and its message delivered again next start.

use std::sync::Arc;
use std::time::Duration;

use herald_core::engine::{AckRejected, DurableOutbound};
use herald_core::{ChannelName, Data, Message, Position, Timestamp};
use herald_protocol::MessageBody;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::config::{WebhookEvent, WebhookRule};
use super::signing::{SIGNATURE_HEADER, sign};
use super::{WebhookCounters, now_ms};
use crate::durable::{Control, DurableCounters, DurableSink, Gone, PumpEnd};
use crate::hub::LiveMessage;

/// A validated rule with what its workers need ready-made.
pub struct Rule {
    pub config: WebhookRule,
    pub url: reqwest::Url,
    pub subscriber: herald_core::SubscriberId,
}

/// The wait before attempt `delivery + 1` after attempt `delivery` failed:
/// `min(backoff_max, backoff_initial * 2^(delivery-1))`, of which the upper half is random
/// ("equal jitter": never less than half the nominal wait, so a failing receiver is not
/// hammered, and spread out so retries of many channels do not arrive together).
pub fn backoff(rule: &WebhookRule, delivery: u32, random: impl FnOnce(u64) -> u64) -> Duration {
    let exponent = delivery.saturating_sub(1).min(32);
    let initial_ms = u64::try_from(rule.backoff_initial.as_millis()).unwrap_or(u64::MAX);
    let max_ms = u64::try_from(rule.backoff_max.as_millis()).unwrap_or(u64::MAX);
    let nominal_ms = initial_ms.saturating_mul(1u64 << exponent).min(max_ms);
    let half = nominal_ms / 2;
    Duration::from_millis(nominal_ms - half + random(half))
}

/// Why an attempt failed (the metric label is [`Failure::kind`]).
#[derive(Debug)]
pub enum Failure {
    Status(u16),
    Timeout,
    Connect,
    Other(String),
}

impl Failure {
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Status(_) => "status",
            Failure::Timeout => "timeout",
            Failure::Connect => "connect",
            Failure::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(status) => write!(f, "HTTP status {status}"),
            Failure::Timeout => f.write_str("no response within the timeout"),
            Failure::Connect => f.write_str("cannot connect"),
            Failure::Other(detail) => f.write_str(detail),
        }
    }
}

#[derive(Serialize)]
struct MessagePayload<'a> {
    event: &'static str,
    rule: &'a str,
    channel: &'a str,
    delivery: u32,
    message: MessageBody,
}

/// One POST, ready to send (the signature is made at send time).
struct Request {
    event: &'static str,
    idempotency_key: String,
    delivery: u32,
    body: Vec<u8>,
}

pub struct WebhookSink {
    pub rule: Arc<Rule>,
    pub channel: ChannelName,
    /// The worker delivers from its namespace's lifecycle channel.
    pub lifecycle: bool,
    pub client: reqwest::Client,
    pub control: mpsc::WeakSender<Control>,
    pub counters: Arc<WebhookCounters>,
    pub ended: Option<oneshot::Sender<PumpEnd>>,
}

impl WebhookSink {
    /// The request for a delivery, or `None` when the rule does not want this event (the
    /// message is acked without a POST).
    fn request(&self, message: &Message, delivery: u32) -> Option<Request> {
        let rule = &self.rule.config;
        if !self.lifecycle {
            let payload = MessagePayload {
                event: WebhookEvent::Message.as_str(),
                rule: &rule.name,
                channel: message.channel.as_str(),
                delivery,
                message: MessageBody::from_message(message),
            };
            return Some(Request {
                event: WebhookEvent::Message.as_str(),
                idempotency_key: message.id.to_string(),
                delivery,
                body: serde_json::to_vec(&payload).expect("a payload serialises"),
            });
        }
        let event = message.name.as_deref().and_then(WebhookEvent::parse)?;
        if !event.is_lifecycle() || !rule.wants(event) {
            return None;
        }
        let mut payload = serde_json::Map::new();
        payload.insert("event".into(), event.as_str().into());
        payload.insert("rule".into(), rule.name.clone().into());
        payload.insert("delivery".into(), delivery.into());
        payload.insert("id".into(), message.id.to_string().into());
        payload.insert("time".into(), message.time.0.into());
        if let Data::Json(bytes) = &message.data
            && let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(bytes)
        {
            for (key, value) in fields {
                payload.entry(key).or_insert(value);
            }
        }
        Some(Request {
            event: event.as_str(),
            idempotency_key: message.id.to_string(),
            delivery,
            body: serde_json::to_vec(&payload).expect("a payload serialises"),
        })
    }
}

impl DurableSink for WebhookSink {
    async fn deliver(&mut self, outbound: DurableOutbound<Arc<LiveMessage>>) -> Result<(), Gone> {
        let rule = &self.rule.config;
        match outbound {
            DurableOutbound::Delivery {
                message,
                delivery_count,
            } => {
                let control = self.control.upgrade().ok_or(Gone)?;
                let message = &message.message;
                let position = message.position();
                let Some(request) = self.request(message, delivery_count) else {
                    DurableCounters::add(&self.counters.skipped, 1);
                    // The pump reads this queue only after `deliver` returns: never wait here.
                    let _ = control.try_send(Control::Ack {
                        req: None,
                        through: false,
                        position,
                    });
                    return Ok(());
                };
                drop(control);
                let attempt = Attempt {
                    rule: self.rule.clone(),
                    channel: self.channel.clone(),
                    client: self.client.clone(),
                    counters: self.counters.clone(),
                    position,
                    request,
                };
                tokio::spawn(attempt.run(self.control.clone()));
                Ok(())
            }
            DurableOutbound::Subscribed {
                continuity,
                after,
                top,
            } => {
                tracing::debug!(
                    rule = %rule.name,
                    channel = %self.channel,
                    ?continuity,
                    after = ?after.map(|p| p.to_string()),
                    top = ?top.map(|p| p.to_string()),
                    "webhook worker started"
                );
                Ok(())
            }
            DurableOutbound::ContinuityLost { from, to, reason } => {
                tracing::error!(
                    rule = %rule.name,
                    channel = %self.channel,
                    %from,
                    to = ?to.map(|p| p.to_string()),
                    reason = reason.as_str(),
                    "webhook LOST MESSAGES: they left the log (retention) before they were delivered"
                );
                Ok(())
            }
            DurableOutbound::Expired { from, to } => {
                tracing::warn!(
                    rule = %rule.name,
                    channel = %self.channel,
                    %from,
                    %to,
                    "webhook did not deliver messages whose ttl ran out first"
                );
                Ok(())
            }
        }
    }

    async fn acked(&mut self, _req: u64) -> Result<(), Gone> {
        // Webhook acks never ask for a confirmation.
        Ok(())
    }

    async fn ack_refused(&mut self, _req: Option<u64>, rejected: AckRejected) -> Result<(), Gone> {
        // A 2xx that arrives after the position moved on (for example a late answer to an
        // attempt that was already retried): nothing to do.
        tracing::debug!(rule = %self.rule.config.name, channel = %self.channel, %rejected, "webhook ack refused");
        Ok(())
    }

    async fn ended(&mut self, end: PumpEnd) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(end);
        }
    }
}

/// One POST of one delivery, and its report to the pump.
struct Attempt {
    rule: Arc<Rule>,
    channel: ChannelName,
    client: reqwest::Client,
    counters: Arc<WebhookCounters>,
    position: Position,
    request: Request,
}

impl Attempt {
    /// `control` is weak so that an attempt in flight does not hold its worker up at
    /// shutdown.
    async fn run(self, control: mpsc::WeakSender<Control>) {
        let rule = &self.rule.config;
        DurableCounters::add(&self.counters.attempts, 1);
        let outcome = self.post().await;
        let input = match outcome {
            Ok(()) => {
                DurableCounters::add(&self.counters.delivered, 1);
                Control::Ack {
                    req: None,
                    through: false,
                    position: self.position.clone(),
                }
            }
            Err(failure) => {
                self.counters.failed(&failure);
                let last = self.request.delivery >= rule.max_attempts;
                let wait = if last {
                    DurableCounters::add(&self.counters.exhausted, 1);
                    Duration::ZERO
                } else {
                    DurableCounters::add(&self.counters.retries, 1);
                    backoff(rule, self.request.delivery, |half| {
                        rand::random_range(0..=half)
                    })
                };
                let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                let (attempt, attempts_max) = (self.request.delivery, rule.max_attempts);
                if last {
                    tracing::warn!(
                        rule = %rule.name,
                        channel = %self.channel,
                        position = %self.position,
                        %failure,
                        "webhook attempt {attempt} of {attempts_max} failed; the message goes to the dead letters"
                    );
                } else {
                    tracing::debug!(
                        rule = %rule.name,
                        channel = %self.channel,
                        position = %self.position,
                        %failure,
                        retry_in_ms = wait_ms,
                        "webhook attempt {attempt} of {attempts_max} failed; retrying"
                    );
                }
                Control::RetryAt {
                    position: self.position.clone(),
                    at: Timestamp(now_ms().saturating_add(wait_ms)),
                }
            }
        };
        // A closed queue means the worker stopped: the message is delivered again next time.
        if let Some(control) = control.upgrade() {
            let _ = control.send(input).await;
        }
    }

    async fn post(&self) -> Result<(), Failure> {
        let rule = &self.rule.config;
        let request = &self.request;
        let signature = sign(&rule.secret, now_ms(), &request.body);
        let response = self
            .client
            .post(self.rule.url.clone())
            .timeout(rule.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &request.idempotency_key)
            .header("Herald-Event", request.event)
            .header("Herald-Delivery", request.delivery.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(request.body.clone())
            .send()
            .await
            .map_err(|error| {
                if error.is_timeout() {
                    Failure::Timeout
                } else if error.is_connect() {
                    Failure::Connect
                } else {
                    Failure::Other(error.to_string())
                }
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::Status(status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_max_with_jitter_in_the_upper_half() {
        let mut rule = WebhookRule::new("r", "ns", "http://127.0.0.1:9/", "0123456789abcdef");
        rule.backoff_initial = Duration::from_millis(100);
        rule.backoff_max = Duration::from_millis(1000);
        let low = |delivery| backoff(&rule, delivery, |_| 0).as_millis();
        let high = |delivery| backoff(&rule, delivery, |half| half).as_millis();
        assert_eq!((low(1), high(1)), (50, 100));
        assert_eq!((low(2), high(2)), (100, 200));
        assert_eq!((low(4), high(4)), (400, 800));
        assert_eq!((low(5), high(5)), (500, 1000));
        assert_eq!((low(60), high(60)), (500, 1000));
    }
}
