//! `[[webhooks]]` rules: their keys, defaults and validation.
//!
//! # Invariants (after [`validate_rules`])
//! - Names are unique, 1..=64 characters of `[a-z0-9_-]`, so `webhook.<name>` is a valid
//!   subscriber id and a stable metric/log label.
//! - The namespace is a valid namespace name; the url is `http://` with a host (https needs a
//!   TLS backend this build does not have, and is refused with a message saying so).
//! - `events` is non-empty without repeats; `max_attempts >= 1`;
//!   `10ms <= backoff_initial <= backoff_max`; `timeout >= 10ms`; the secret has at least
//!   [`SECRET_CHARS_MIN`] characters.

use std::fmt;
use std::time::Duration;

use herald_core::ChannelName;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Shortest accepted signing secret.
pub const SECRET_CHARS_MIN: usize = 16;
/// Longest rule name.
pub const RULE_NAME_CHARS_MAX: usize = 64;

/// What a rule delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WebhookEvent {
    /// Every message published on a channel of the rule's namespace.
    #[serde(rename = "message")]
    Message,
    /// A durable subscriber of the namespace lost continuity (messages it will never get).
    #[serde(rename = "subscriber.continuity_lost")]
    ContinuityLost,
    /// A durable subscriber of the namespace was removed after being idle past its expiry.
    #[serde(rename = "subscriber.expired")]
    SubscriberExpired,
}

impl WebhookEvent {
    /// The name in rules, in the `event` field and the `Herald-Event` header.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Message => "message",
            WebhookEvent::ContinuityLost => "subscriber.continuity_lost",
            WebhookEvent::SubscriberExpired => "subscriber.expired",
        }
    }

    pub fn parse(name: &str) -> Option<WebhookEvent> {
        [
            WebhookEvent::Message,
            WebhookEvent::ContinuityLost,
            WebhookEvent::SubscriberExpired,
        ]
        .into_iter()
        .find(|event| event.as_str() == name)
    }

    pub fn is_lifecycle(self) -> bool {
        self != WebhookEvent::Message
    }
}

/// One `[[webhooks]]` entry: deliver the rule's events of one namespace to `url` by HTTP POST,
/// at least once, signed with `secret`, retrying with exponential backoff and jitter.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRule {
    /// Unique; the rule's durable subscriber id is `webhook.<name>`.
    pub name: String,
    /// `default` covers bare channel names.
    pub namespace: String,
    pub url: String,
    #[serde(default = "default_events")]
    pub events: Vec<WebhookEvent>,
    /// Key of the `Herald-Signature` HMAC-SHA256.
    pub secret: String,
    /// Deliveries of one event before it goes to the dead-letter channel `<channel>.dead`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the second attempt; each later one doubles it, up to `backoff_max`.
    #[serde(
        default = "default_backoff_initial",
        with = "crate::config::human_duration"
    )]
    pub backoff_initial: Duration,
    #[serde(
        default = "default_backoff_max",
        with = "crate::config::human_duration"
    )]
    pub backoff_max: Duration,
    /// An attempt without a response within this time failed.
    #[serde(default = "default_timeout", with = "crate::config::human_duration")]
    pub timeout: Duration,
}

fn default_events() -> Vec<WebhookEvent> {
    vec![WebhookEvent::Message]
}

fn default_max_attempts() -> u32 {
    8
}

fn default_backoff_initial() -> Duration {
    Duration::from_millis(500)
}

fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl WebhookRule {
    /// A rule with the defaults for everything but the required keys.
    pub fn new(name: &str, namespace: &str, url: &str, secret: &str) -> WebhookRule {
        WebhookRule {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            url: url.to_owned(),
            events: default_events(),
            secret: secret.to_owned(),
            max_attempts: default_max_attempts(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            timeout: default_timeout(),
        }
    }

    pub fn wants(&self, event: WebhookEvent) -> bool {
        self.events.contains(&event)
    }

    pub fn wants_lifecycle(&self) -> bool {
        self.events.iter().any(|event| event.is_lifecycle())
    }
}

/// The secret stays out of logs and debug output.
impl fmt::Debug for WebhookRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookRule")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .field("max_attempts", &self.max_attempts)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Checks every rule; errors name the key (`webhooks[1].url`).
pub fn validate_rules(rules: &[WebhookRule]) -> Result<(), ConfigError> {
    let mut names = std::collections::BTreeSet::new();
    for (index, rule) in rules.iter().enumerate() {
        let key = |field: &str| format!("webhooks[{index}].{field}");
        let name_ok = !rule.name.is_empty()
            && rule.name.chars().count() <= RULE_NAME_CHARS_MAX
            && rule
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(ConfigError::invalid(
                key("name"),
                format!("must be 1 to {RULE_NAME_CHARS_MAX} characters of a-z, 0-9, '_' and '-'"),
            ));
        }
        if !names.insert(rule.name.as_str()) {
            return Err(ConfigError::invalid(
                key("name"),
                format!("{:?} is used by another rule", rule.name),
            ));
        }
        let namespace_ok = ChannelName::parse(&format!("{}:x", rule.namespace))
            .ok()
            .and_then(|channel| channel.namespace().map(|ns| ns == rule.namespace))
            == Some(true);
        if !namespace_ok {
            return Err(ConfigError::invalid(
                key("namespace"),
                "not a valid namespace name (no ':', whitespace, or any of * > # + / ?)",
            ));
        }
        check_url(&rule.url).map_err(|message| ConfigError::invalid(key("url"), message))?;
        if rule.events.is_empty() {
            return Err(ConfigError::invalid(key("events"), "is empty"));
        }
        let mut events = rule.events.clone();
        events.sort();
        events.dedup();
        if events.len() != rule.events.len() {
            return Err(ConfigError::invalid(key("events"), "lists an event twice"));
        }
        if rule.secret.chars().count() < SECRET_CHARS_MIN {
            return Err(ConfigError::invalid(
                key("secret"),
                format!("must be at least {SECRET_CHARS_MIN} characters"),
            ));
        }
        if rule.max_attempts == 0 {
            return Err(ConfigError::invalid(
                key("max_attempts"),
                "must be at least 1",
            ));
        }
        let floor = Duration::from_millis(10);
        if rule.backoff_initial < floor {
            return Err(ConfigError::invalid(
                key("backoff_initial"),
                "must be at least 10ms",
            ));
        }
        if rule.backoff_max < rule.backoff_initial {
            return Err(ConfigError::invalid(
                key("backoff_max"),
                "must be at least backoff_initial",
            ));
        }
        if rule.timeout < floor {
            return Err(ConfigError::invalid(
                key("timeout"),
                "must be at least 10ms",
            ));
        }
    }
    Ok(())
}

fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|error| format!("{url:?} is not a URL: {error}"))?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(
                "https webhooks need a TLS backend, which this build of Herald does not include; \
                 use http (for example to a local TLS-terminating proxy)"
                    .into(),
            );
        }
        other => return Err(format!("scheme {other:?} is not http")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(parsed)
}

/// The parsed url of a validated rule.
pub(crate) fn rule_url(rule: &WebhookRule) -> Result<reqwest::Url, String> {
    check_url(&rule.url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> WebhookRule {
        WebhookRule::new(
            "orders",
            "shop",
            "http://127.0.0.1:9/hook",
            "0123456789abcdef",
        )
    }

    #[test]
    fn a_valid_rule_passes_and_each_bad_key_is_named() {
        validate_rules(&[valid()]).unwrap();
        type Change = Box<dyn Fn(&mut WebhookRule)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|r| r.name = "Orders".into()), "webhooks[0].name"),
            (
                Box::new(|r| r.namespace = "a:b".into()),
                "webhooks[0].namespace",
            ),
            (Box::new(|r| r.url = "ftp://x/".into()), "webhooks[0].url"),
            (Box::new(|r| r.url = "https://x/".into()), "webhooks[0].url"),
            (Box::new(|r| r.events.clear()), "webhooks[0].events"),
            (
                Box::new(|r| r.events.push(WebhookEvent::Message)),
                "webhooks[0].events",
            ),
            (
                Box::new(|r| r.secret = "short".into()),
                "webhooks[0].secret",
            ),
            (Box::new(|r| r.max_attempts = 0), "webhooks[0].max_attempts"),
            (
                Box::new(|r| r.backoff_max = Duration::from_millis(100)),
                "webhooks[0].backoff_max",
            ),
            (
                Box::new(|r| r.timeout = Duration::ZERO),
                "webhooks[0].timeout",
            ),
        ];
        for (change, expected_key) in cases {
            let mut rule = valid();
            change(&mut rule);
            match validate_rules(&[rule]) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, expected_key),
                other => panic!("expected an error on {expected_key}, got {other:?}"),
            }
        }
        match validate_rules(&[valid(), valid()]) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "webhooks[1].name"),
            other => panic!("duplicate names must be refused, got {other:?}"),
        }
    }

    #[test]
    fn a_toml_rule_takes_the_documented_defaults_and_unknown_events_are_refused() {
        let config = crate::config::parse_str(
            "[[webhooks]]\nname = \"orders\"\nnamespace = \"shop\"\n\
             url = \"http://127.0.0.1:9/hook\"\nsecret = \"0123456789abcdef\"\n\
             backoff_max = \"5s\"\n",
        )
        .unwrap();
        let mut expected = valid();
        expected.backoff_max = Duration::from_secs(5);
        assert_eq!(config.webhooks, vec![expected]);
        let rule = &config.webhooks[0];
        assert_eq!(rule.events, vec![WebhookEvent::Message]);
        assert_eq!(rule.max_attempts, 8);
        assert_eq!(rule.backoff_initial, Duration::from_millis(500));
        assert_eq!(rule.timeout, Duration::from_secs(10));
        let refused = crate::config::parse_str(
            "[[webhooks]]\nname = \"o\"\nnamespace = \"shop\"\nurl = \"http://h/\"\n\
             secret = \"0123456789abcdef\"\nevents = [\"subscriber.renamed\"]\n",
        );
        assert!(
            matches!(&refused, Err(ConfigError::Invalid { key, .. }) if key.starts_with("webhooks")),
            "{refused:?}"
        );
    }

    #[test]
    fn the_secret_is_not_in_debug_output() {
        assert!(!format!("{:?}", valid()).contains("0123456789abcdef"));
    }
}
