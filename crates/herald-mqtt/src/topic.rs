//! MQTT topic names and filters, and the mapping between topics and Herald channels.
//!
//! # The mapping
//! A topic's first level is the namespace and its remaining levels, joined with `.`, are the
//! rest of the channel name:
//!
//! | topic            | channel          |
//! |------------------|------------------|
//! | `chat/room-42`   | `chat:room-42`   |
//! | `chat/eu/orders` | `chat:eu.orders` |
//! | `status`         | `status` (bare, namespace `default`) |
//! | `chat/a//b`      | `chat:a..b`      |
//!
//! The inverse replaces the first `:` with `/` and every `.` after it with `/`. It is a
//! bijection between every valid [`ChannelName`] and every topic that [`topic_to_channel`]
//! accepts. To keep it one, topics are refused (never escaped) when:
//! - the first level contains `:` (it would move the namespace boundary);
//! - a level after the first contains `.` (it is the level separator inside the channel);
//! - the first level is empty (`/a`), or there is more than one level and all after the first
//!   are one empty level (`a/`), because `:a` and `a:` are not channel names;
//! - the result is not a channel name: longer than 255 bytes, whitespace or control
//!   characters, or one of `* > ?` (`#`, `+` and `/` are MQTT's own).
//!
//! Refusing rather than escaping keeps the names people see on both sides identical; a
//! refused topic name gets the reason code *Topic Name invalid* (0x90) in v5.
//!
//! # `$` topics
//! Topics starting with `$` are reserved for the server: an MQTT client may not publish to
//! them ([`TopicError::Reserved`]), and a filter starting with `+` or `#` never matches them
//! (MQTT-4.7.2-1). A filter naming a `$` topic explicitly matches it.
//!
//! # Invariants
//! - `topic_to_channel(&channel_to_topic(c)) == Ok(c)` for every channel `c`, and
//!   `channel_to_topic(&topic_to_channel(t)?) == t` for every accepted topic `t` (property
//!   tests below).
//! - [`TopicFilter::matches_channel`] is MQTT topic matching on `channel_to_topic(channel)`.

use std::fmt;

use herald_core::ChannelName;

/// Prefix of a shared subscription filter (`$share/group/filter`, MQTT 5 section 4.8.2).
pub const SHARED_SUBSCRIPTION_PREFIX: &str = "$share/";

/// A `$share/{name}/{filter}` subscription: `Ok(None)` for a filter that is not shared,
/// `Ok(Some((name, filter)))` for a valid one. The name is non-empty, without `/`, `+` or
/// `#` (MQTT-4.8.2-1/2); the filter is checked like any other.
pub fn parse_shared(text: &str) -> Result<Option<(String, TopicFilter)>, TopicError> {
    let Some(rest) = text.strip_prefix(SHARED_SUBSCRIPTION_PREFIX) else {
        return Ok(None);
    };
    let Some((name, filter)) = rest.split_once('/') else {
        return Err(TopicError::Empty);
    };
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.contains(['+', '#']) {
        return Err(TopicError::BadWildcard);
    }
    Ok(Some((name.to_owned(), TopicFilter::parse(filter)?)))
}

/// Why a topic name or filter was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    /// A topic name contains `+` or `#`.
    WildcardInName,
    /// `+` or `#` not alone in its level, or `#` not last.
    BadWildcard,
    /// A `$` topic: reserved for the server.
    Reserved,
    /// A valid MQTT topic with no channel equivalent (see the module docs).
    Unmappable(String),
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty => f.write_str("the topic is empty"),
            TopicError::WildcardInName => f.write_str("a topic name may not contain + or #"),
            TopicError::BadWildcard => {
                f.write_str("+ and # must fill a whole level, and # must be the last level")
            }
            TopicError::Reserved => f.write_str("topics starting with $ are reserved"),
            TopicError::Unmappable(why) => write!(f, "the topic has no channel equivalent: {why}"),
        }
    }
}

/// Checks the characters of one literal level, wherever it is.
fn check_level_chars(level: &str) -> Result<(), TopicError> {
    if let Some(bad) = level
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || matches!(c, '*' | '>' | '?'))
    {
        return Err(TopicError::Unmappable(format!(
            "it contains {bad:?}, which channel names may not"
        )));
    }
    Ok(())
}

/// Checks a literal level at `index` (0 = the namespace level).
fn check_literal_level(index: usize, level: &str) -> Result<(), TopicError> {
    check_level_chars(level)?;
    if index == 0 && level.contains(':') {
        return Err(TopicError::Unmappable(
            "its first level contains ':' (the namespace separator)".into(),
        ));
    }
    if index > 0 && level.contains('.') {
        return Err(TopicError::Unmappable(
            "a level after the first contains '.' (the channel's level separator)".into(),
        ));
    }
    Ok(())
}

/// The channel a topic name maps to, without the `$` publish restriction (subscribers may name
/// `$` channels explicitly). Use [`publish_channel`] for PUBLISH.
pub fn topic_to_channel(topic: &str) -> Result<ChannelName, TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    let mut levels = topic.split('/');
    let first = levels.next().expect("split yields at least one level");
    check_literal_level(0, first)?;
    let mut channel = String::with_capacity(topic.len());
    channel.push_str(first);
    for (index, level) in levels.enumerate() {
        check_literal_level(index + 1, level)?;
        channel.push(if index == 0 { ':' } else { '.' });
        channel.push_str(level);
    }
    ChannelName::parse(&channel).map_err(|error| TopicError::Unmappable(error.to_string()))
}

/// The channel of a PUBLISH topic: [`topic_to_channel`], and `$` topics are refused.
pub fn publish_channel(topic: &str) -> Result<ChannelName, TopicError> {
    if topic.starts_with('$') {
        return Err(TopicError::Reserved);
    }
    topic_to_channel(topic)
}

/// The topic of a channel: the inverse of [`topic_to_channel`].
pub fn channel_to_topic(channel: &ChannelName) -> String {
    match channel.as_str().split_once(':') {
        None => channel.as_str().to_owned(),
        Some((namespace, rest)) => {
            let mut topic = String::with_capacity(channel.as_str().len());
            topic.push_str(namespace);
            topic.push('/');
            topic.extend(rest.chars().map(|c| if c == '.' { '/' } else { c }));
            topic
        }
    }
}

/// A validated topic filter whose literal levels can all occur in channel names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicFilter {
    text: String,
    /// The channel when the filter has no wildcard: matching is then one comparison.
    exact: Option<ChannelName>,
}

impl TopicFilter {
    /// Validates a SUBSCRIBE/UNSUBSCRIBE filter (the filter part of a shared subscription:
    /// see [`parse_shared`]).
    pub fn parse(filter: &str) -> Result<TopicFilter, TopicError> {
        if filter.is_empty() {
            return Err(TopicError::Empty);
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let mut wildcard = false;
        for (index, level) in levels.iter().enumerate() {
            match *level {
                "#" if index + 1 == levels.len() => wildcard = true,
                "+" => wildcard = true,
                _ if level.contains(['+', '#']) => return Err(TopicError::BadWildcard),
                _ => check_literal_level(index, level)?,
            }
        }
        let exact = if wildcard {
            None
        } else {
            Some(topic_to_channel(filter)?)
        };
        Ok(TopicFilter {
            text: filter.to_owned(),
            exact,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The channel of a filter without wildcards.
    pub fn exact_channel(&self) -> Option<&ChannelName> {
        self.exact.as_ref()
    }

    /// The namespace every match lies in, when the filter fixes it: a literal first level
    /// followed by more levels. `chat/#` also matches the bare channel `chat` (namespace
    /// `default`), so it has none; neither have filters starting with a wildcard.
    pub fn namespace(&self) -> Option<&str> {
        let (first, rest) = self.text.split_once('/')?;
        if first == "+" || rest == "#" {
            return None;
        }
        Some(first)
    }

    /// Whether a message on `channel` matches this filter (MQTT 4.7 on its topic).
    pub fn matches_channel(&self, channel: &ChannelName) -> bool {
        if let Some(exact) = &self.exact {
            return exact == channel;
        }
        matches_topic(&self.text, &channel_to_topic(channel))
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// MQTT topic matching of a valid filter against a topic name.
pub fn matches_topic(filter: &str, topic: &str) -> bool {
    // MQTT-4.7.2-1: wildcards at the first level never match `$` topics.
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for filter_level in filter.split('/') {
        match filter_level {
            // `#` also matches the parent level: `a/#` matches `a`.
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn channel(name: &str) -> ChannelName {
        ChannelName::parse(name).unwrap()
    }

    #[test]
    fn shared_subscriptions_parse_their_name_and_filter() {
        assert_eq!(parse_shared("a/b").unwrap(), None);
        let (name, filter) = parse_shared("$share/workers/jobs/+").unwrap().unwrap();
        assert_eq!((name.as_str(), filter.as_str()), ("workers", "jobs/+"));
        for bad in [
            "$share/",
            "$share/x",
            "$share//a",
            "$share/a+/b",
            "$share/#/b",
            "$share/g/a/#/b",
        ] {
            assert!(parse_shared(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_documented_examples_map_both_ways() {
        for (topic, name) in [
            ("chat/room-42", "chat:room-42"),
            ("chat/eu/orders", "chat:eu.orders"),
            ("status", "status"),
            ("chat/a//b", "chat:a..b"),
            ("chat/a:b", "chat:a:b"),
            ("a.b/c", "a.b:c"),
            ("$sys/x", "$sys:x"),
        ] {
            assert_eq!(topic_to_channel(topic), Ok(channel(name)), "{topic}");
            assert_eq!(channel_to_topic(&channel(name)), topic, "{name}");
        }
    }

    #[test]
    fn topics_without_a_channel_are_refused_not_escaped() {
        for topic in [
            "/a", "a/", "a:b/c", "a:b", "chat/x.y", "chat/a b", "chat/a*", "chat/a?", "chat/>",
        ] {
            assert!(
                matches!(topic_to_channel(topic), Err(TopicError::Unmappable(_))),
                "{topic}"
            );
        }
        assert_eq!(topic_to_channel(""), Err(TopicError::Empty));
        assert_eq!(topic_to_channel("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(topic_to_channel("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(publish_channel("$SYS/x"), Err(TopicError::Reserved));
        assert!(topic_to_channel(&"a".repeat(256)).is_err());
    }

    #[test]
    fn filters_are_validated() {
        for good in ["#", "+", "a/#", "a/+/b", "+/+", "a", "$SYS/#", "a//+"] {
            assert!(TopicFilter::parse(good).is_ok(), "{good}");
        }
        for bad in ["a#", "a/#/b", "a+/b", "#/a", "a/b+", ""] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
        // Literal levels follow the channel rules too: they could never match anything.
        assert!(TopicFilter::parse("chat/x.y/+").is_err());
        assert!(TopicFilter::parse("a:b/#").is_err());
    }

    #[test]
    fn wildcards_match_channels_as_mqtt_matches_topics() {
        let single = TopicFilter::parse("chat/+").unwrap();
        assert!(single.matches_channel(&channel("chat:x")));
        assert!(!single.matches_channel(&channel("chat:x.y")));
        assert!(!single.matches_channel(&channel("chat")));
        let multi = TopicFilter::parse("chat/#").unwrap();
        assert!(multi.matches_channel(&channel("chat:x")));
        assert!(multi.matches_channel(&channel("chat:x.y.z")));
        assert!(multi.matches_channel(&channel("chat")));
        assert!(!multi.matches_channel(&channel("chatter:x")));
        let middle = TopicFilter::parse("chat/+/orders").unwrap();
        assert!(middle.matches_channel(&channel("chat:eu.orders")));
        assert!(!middle.matches_channel(&channel("chat:eu.orders.x")));
        let exact = TopicFilter::parse("chat/room").unwrap();
        assert!(exact.matches_channel(&channel("chat:room")));
        assert_eq!(exact.exact_channel(), Some(&channel("chat:room")));
    }

    #[test]
    fn wildcards_at_the_start_never_match_dollar_topics() {
        let dollar = channel("$sys:load");
        assert!(!TopicFilter::parse("#").unwrap().matches_channel(&dollar));
        assert!(
            !TopicFilter::parse("+/load")
                .unwrap()
                .matches_channel(&dollar)
        );
        assert!(
            TopicFilter::parse("$sys/#")
                .unwrap()
                .matches_channel(&dollar)
        );
        assert!(
            TopicFilter::parse("$sys/load")
                .unwrap()
                .matches_channel(&dollar)
        );
        assert!(
            TopicFilter::parse("#")
                .unwrap()
                .matches_channel(&channel("a:b"))
        );
    }

    #[test]
    fn namespace_of_a_filter() {
        assert_eq!(
            TopicFilter::parse("chat/+").unwrap().namespace(),
            Some("chat")
        );
        assert_eq!(
            TopicFilter::parse("chat/a/#").unwrap().namespace(),
            Some("chat")
        );
        assert_eq!(TopicFilter::parse("chat/#").unwrap().namespace(), None);
        assert_eq!(TopicFilter::parse("+/a").unwrap().namespace(), None);
        assert_eq!(TopicFilter::parse("#").unwrap().namespace(), None);
        assert_eq!(TopicFilter::parse("status").unwrap().namespace(), None);
    }

    fn channel_strategy() -> impl Strategy<Value = ChannelName> {
        // Printable characters including the separators and the reserved ones, so that
        // invalid candidates are generated too and filtered out by the parser.
        "[a-z0-9:.$_\\-é/+#* ]{1,40}"
            .prop_filter_map("valid channel", |name| ChannelName::parse(&name).ok())
    }

    proptest! {
        #[test]
        fn every_channel_round_trips(channel in channel_strategy()) {
            let topic = channel_to_topic(&channel);
            prop_assert_eq!(topic_to_channel(&topic), Ok(channel));
        }

        #[test]
        fn every_accepted_topic_round_trips(topic in "[a-z0-9:.$/é ]{1,40}") {
            if let Ok(channel) = topic_to_channel(&topic) {
                prop_assert_eq!(channel_to_topic(&channel), topic);
            }
        }

        #[test]
        fn an_exact_filter_matches_exactly_its_channel(
            a in channel_strategy(), b in channel_strategy()
        ) {
            let filter = TopicFilter::parse(&channel_to_topic(&a)).unwrap();
            prop_assert!(filter.matches_channel(&a));
            prop_assert_eq!(filter.matches_channel(&b), a == b);
            prop_assert_eq!(matches_topic(filter.as_str(), &channel_to_topic(&b)), a == b);
        }

        #[test]
        fn hash_matches_every_non_dollar_channel(a in channel_strategy()) {
            let all = TopicFilter::parse("#").unwrap();
            prop_assert_eq!(all.matches_channel(&a), !a.as_str().starts_with('$'));
        }
    }
}
