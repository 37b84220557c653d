//! A simulated client: the SDK's pure [`Session`] (the same code the tokio client runs) with
//! a role, and the timers its driver would keep (reconnect backoff, retry backoff, a pause
//! that models an application that stops reading).

use std::collections::BTreeMap;

use herald_client::session::Session;
use herald_client::{SessionConfig, SubscribeOptions};
use herald_core::Guarantee;
use herald_protocol::PublishMessage;
use herald_protocol::publish::Ttl;
use herald_protocol::ws::{ClientFrame, Connect, ConnectTag};
use serde_json::value::RawValue;

#[derive(Clone, Debug)]
pub enum Role {
    /// Publishes numbered messages with its own ids, retrying through the session.
    Publisher { channel: String },
    /// Subscribes from the start of the channel (exactly-once) or live (at-most-once);
    /// `rejects_kind` is a filter on the `kind` header.
    Subscriber {
        channel: String,
        guarantee: Guarantee,
        rejects_kind: Option<String>,
    },
}

pub struct SimClient {
    pub role: Role,
    pub session: Session,
    pub connection: Option<u64>,
    pub reconnect_at_ms: u64,
    pub retry_at_ms: Option<u64>,
    pub paused_until_ms: u64,
    pub published: u64,
    /// Publish request id -> channel, to attribute acks.
    pub requests: BTreeMap<u64, String>,
}

impl SimClient {
    pub fn new(role: Role) -> SimClient {
        let mut session = Session::new(SessionConfig {
            // Retryable refusals (a poisoned store until its restart) are waited out.
            publish_nacks_max: 1_000,
        });
        if let Role::Subscriber {
            channel,
            guarantee,
            rejects_kind,
        } = &role
        {
            let mut options = match guarantee {
                Guarantee::ExactlyOnce => SubscribeOptions::from_oldest(),
                Guarantee::AtMostOnce => SubscribeOptions {
                    guarantee: Guarantee::AtMostOnce,
                    ..SubscribeOptions::default()
                },
            };
            options.filter = filter_of(rejects_kind.as_deref());
            let frames = session.subscribe(channel, options);
            assert!(frames.is_empty(), "not connected yet");
        }
        SimClient {
            role,
            session,
            connection: None,
            reconnect_at_ms: 0,
            retry_at_ms: None,
            paused_until_ms: 0,
            published: 0,
            requests: BTreeMap::new(),
        }
    }

    /// The application ends its subscription and starts it again (exactly-once: from the
    /// position it holds; not before it holds one, since a fresh start is not a resume).
    pub fn resubscribe(&mut self) -> Vec<ClientFrame> {
        let Role::Subscriber {
            channel,
            guarantee,
            rejects_kind,
        } = &self.role
        else {
            return Vec::new();
        };
        let position = self.session.position(channel).cloned();
        if *guarantee == Guarantee::ExactlyOnce && position.is_none() {
            return Vec::new();
        }
        let options = SubscribeOptions {
            guarantee: *guarantee,
            from: position.filter(|_| *guarantee == Guarantee::ExactlyOnce),
            filter: filter_of(rejects_kind.as_deref()),
            ..SubscribeOptions::default()
        };
        let channel = channel.clone();
        let mut frames = self.session.unsubscribe(&channel);
        frames.extend(self.session.subscribe(&channel, options));
        frames
    }

    /// The first frame on a new connection.
    pub fn connect_frame() -> ClientFrame {
        ClientFrame::Connect(Connect {
            kind: ConnectTag::Tag,
            protocol: 1,
            auth: None,
            client: Some("herald-sim".to_owned()),
        })
    }

    /// Publishes the next message: `kind` is `noise` or `data`, and some messages carry a
    /// short TTL.
    pub fn publish(&mut self, client: usize, noise: bool, ttl_s: Option<u64>) -> Vec<ClientFrame> {
        let Role::Publisher { channel } = &self.role else {
            return Vec::new();
        };
        let channel = channel.clone();
        self.published += 1;
        let data = RawValue::from_string(self.published.to_string()).expect("a number is JSON");
        let mut message = PublishMessage::json(data);
        message.id = Some(format!("c{client}-m{}", self.published));
        let kind = if noise { "noise" } else { "data" };
        message.headers = Some(BTreeMap::from([("kind".to_owned(), kind.to_owned())]));
        message.ttl = ttl_s.map(|seconds| Ttl::Seconds(seconds.into()));
        let (req, frames) = self.session.publish(&channel, message);
        self.requests.insert(req, channel);
        frames
    }
}

/// The CEL filter that rejects messages whose `kind` header is `kind`.
fn filter_of(rejects_kind: Option<&str>) -> Option<String> {
    rejects_kind.map(|kind| format!("headers.kind != \"{kind}\""))
}
