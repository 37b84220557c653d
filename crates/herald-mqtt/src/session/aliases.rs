//! Topic aliases the server puts on its own PUBLISH packets to a v5 client (MQTT 5.0
//! section 3.3.2.3.4): the first PUBLISH of a topic carries the topic and a new alias, later
//! ones an empty topic and that alias.
//!
//! # Invariants
//! - Aliases are `1..=maximum`, where `maximum` is min(the client's Topic Alias Maximum from
//!   its CONNECT, `outbound_topic_alias_maximum`); 0 (a v3 client, or a v5 client that gave no
//!   maximum) means no alias is ever used.
//! - Each alias stands for one topic and each topic has at most one alias; an alias is never
//!   re-mapped (no LRU): once all are in use, other topics go out in full without an alias.
//!   So the table holds at most `maximum` topics.
//! - The table belongs to one network connection and starts empty: aliases are decided when a
//!   PUBLISH is built (`Session::send_delivery`) and never stored with a delivery, so a PUBLISH
//!   re-sent on a later connection is built afresh with that connection's aliases.
//! - An alias is recorded only when the PUBLISH that sets it is sent ([`OutboundAliases::assign`]
//!   after [`OutboundAliases::plan`]), so the client knows every alias it is later sent.

use std::collections::HashMap;
use std::num::NonZeroU16;

/// How a PUBLISH names its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TopicForm {
    /// The topic, no alias.
    Full,
    /// The topic and a new alias, which the client records (the first use of the topic).
    Assign(NonZeroU16),
    /// An empty topic and the alias the client already knows.
    Reuse(NonZeroU16),
}

impl TopicForm {
    pub(super) fn alias(self) -> Option<NonZeroU16> {
        match self {
            TopicForm::Full => None,
            TopicForm::Assign(alias) | TopicForm::Reuse(alias) => Some(alias),
        }
    }

    /// Whether the topic name itself goes in the packet.
    pub(super) fn carries_topic(self) -> bool {
        !matches!(self, TopicForm::Reuse(_))
    }
}

/// One connection's server-to-client alias table.
#[derive(Clone, Debug, Default)]
pub(super) struct OutboundAliases {
    maximum: u16,
    by_topic: HashMap<String, NonZeroU16>,
}

impl OutboundAliases {
    /// A table allowing aliases `1..=maximum` (0: none).
    pub(super) fn new(maximum: u16) -> OutboundAliases {
        OutboundAliases {
            maximum,
            by_topic: HashMap::new(),
        }
    }

    /// How the next PUBLISH of `topic` should name it; changes nothing until
    /// [`OutboundAliases::assign`].
    pub(super) fn plan(&self, topic: &str) -> TopicForm {
        if let Some(alias) = self.by_topic.get(topic) {
            return TopicForm::Reuse(*alias);
        }
        // Aliases are handed out in order and never freed: the next one is len + 1.
        match u16::try_from(self.by_topic.len() + 1) {
            Ok(next) if next <= self.maximum => {
                TopicForm::Assign(NonZeroU16::new(next).expect("len + 1 > 0"))
            }
            _ => TopicForm::Full,
        }
    }

    /// Records that a PUBLISH of `topic` planned as [`TopicForm::Assign`] was sent.
    pub(super) fn assign(&mut self, topic: String, alias: NonZeroU16) {
        debug_assert_eq!(self.plan(&topic), TopicForm::Assign(alias));
        self.by_topic.insert(topic, alias);
    }
}
