//! Namespace policies: retention, TTL bounds and the dedupe window of each channel.

use std::collections::BTreeMap;

use crate::error::InvalidInput;
use crate::names::ChannelName;

/// The dedupe window is never shorter than this, whatever the configuration says.
pub const DEDUPE_WINDOW_MS_MIN: u64 = 2 * 60 * 1000;

/// How long and how much history a channel keeps. All three bounds apply; the tightest wins.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Retention {
    pub max_age_ms: u64,
    pub messages_max: u64,
    pub bytes_max: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age_ms: 24 * 60 * 60 * 1000,
            messages_max: 1_000_000,
            bytes_max: 1024 * 1024 * 1024,
        }
    }
}

/// The policy of one namespace.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NamespacePolicy {
    pub retention: Retention,
    pub ttl_min_ms: u64,
    pub ttl_max_ms: u64,
    /// Configured dedupe window; see [`NamespacePolicy::dedupe_window_ms`] for the effective one.
    pub dedupe_window_ms: u64,
}

impl Default for NamespacePolicy {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            ttl_min_ms: 1000,
            ttl_max_ms: 72 * 60 * 60 * 1000,
            dedupe_window_ms: DEDUPE_WINDOW_MS_MIN,
        }
    }
}

impl NamespacePolicy {
    /// The window in which a repeated id is recognised: at least 2 minutes and at least the
    /// retention age, so a retry of any retained message is always recognised.
    pub fn dedupe_window_ms(&self) -> u64 {
        self.dedupe_window_ms
            .max(DEDUPE_WINDOW_MS_MIN)
            .max(self.retention.max_age_ms)
    }

    pub fn check_ttl(&self, ttl_ms: u64) -> Result<(), InvalidInput> {
        if ttl_ms < self.ttl_min_ms || ttl_ms > self.ttl_max_ms {
            return Err(InvalidInput::ttl(format!(
                "ttl {ttl_ms} ms is outside this namespace's bounds {}..={} ms",
                self.ttl_min_ms, self.ttl_max_ms
            )));
        }
        Ok(())
    }

    /// Checks that the policy is coherent; returns a description of the first problem.
    pub fn check(&self) -> Result<(), String> {
        if self.ttl_min_ms == 0 || self.ttl_min_ms > self.ttl_max_ms {
            return Err("ttl_min must be positive and at most ttl_max".into());
        }
        if self.retention.max_age_ms == 0
            || self.retention.messages_max == 0
            || self.retention.bytes_max == 0
        {
            return Err("retention bounds must be positive".into());
        }
        if self.dedupe_window_ms < DEDUPE_WINDOW_MS_MIN {
            return Err("dedupe_window must be at least 2 minutes".into());
        }
        Ok(())
    }
}

/// The policies of all namespaces, with a default for bare names and unknown namespaces.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Policies {
    pub default: NamespacePolicy,
    pub namespaces: BTreeMap<String, NamespacePolicy>,
}

impl Policies {
    pub fn for_channel(&self, channel: &ChannelName) -> &NamespacePolicy {
        channel
            .namespace()
            .and_then(|namespace| self.namespaces.get(namespace))
            .unwrap_or(&self.default)
    }
}
