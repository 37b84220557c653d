//! Server configuration: one typed tree with defaults, read from a TOML file, then `HERALD_`
//! environment overrides, then command-line flags (each layer wins over the one before).
//!
//! # Environment overrides
//! `HERALD_<KEY>` with nested keys joined by `__`, e.g. `HERALD_DATA_DIR`,
//! `HERALD_HTTP_ADDR`, `HERALD_LIMITS__MESSAGE_BYTES_MAX=131072`,
//! `HERALD_NAMESPACES__CHAT__RETENTION_MAX_AGE=1h`. A value is read as a TOML value when it is
//! one (`true`, `42`, `["a"]`, `[{ name = "x" }]`) and as a string otherwise (`24h`,
//! `127.0.0.1:7600`); `data_dir` and `http_addr` are always strings. Variables whose first key
//! is not a config key (such as the CLI's `HERALD_URL` and `HERALD_KEY`) are ignored.
//!
//! # Why not the `config` crate
//! Its environment source has documented separator and list-parsing traps, and its errors do
//! not name the offending key reliably. Merging the environment into a `toml::Table` and
//! deserialising through `serde_path_to_error` is a few dozen lines and every error names the
//! key (`limits.message_bytes_max: ...`).
//!
//! # Invariants
//! - A [`Config`] returned by [`load`] has passed [`Config::validate`]: limits and every
//!   namespace policy are coherent, the dedupe window is at least 2 minutes, API keys are
//!   well-formed and unique.
//! - Unknown keys are errors, so typos are caught.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_core::{ChannelName, Limits, NamespacePolicy, Policies, Retention};
use serde::{Deserialize, Serialize};

use crate::auth::Operation;

/// The commented default configuration printed by `herald config init`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

/// Name of the namespace that bare channel names (no `:`) belong to; its policy is also the
/// fallback for namespaces that are not configured.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the log and the generated admin key live.
    pub data_dir: PathBuf,
    /// Address of the HTTP API. Port 0 picks a free port (the real one is printed).
    pub http_addr: SocketAddr,
    /// Anonymous access with every capability; refused unless `http_addr` is loopback.
    pub dev: bool,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub realtime: RealtimeConfig,
    pub durable: DurableConfig,
    /// `[mqtt]`: the MQTT 3.1.1/5.0 listener (see `crate::mqtt`).
    pub mqtt: crate::mqtt::MqttConfig,
    /// Namespace policies by name. `default` applies to bare channel names and to every
    /// namespace not listed; a listed namespace takes unset keys from `default`.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    pub api_keys: Vec<ApiKeyConfig>,
    /// `[[webhooks]]`: per-namespace HTTP POST delivery rules (see `crate::webhook`).
    pub webhooks: Vec<crate::webhook::WebhookRule>,
}

impl Default for Config {
    fn default() -> Self {
        let builtin = NamespacePolicy::default();
        let default_namespace = NamespaceConfig {
            retention_max_age: Some(Duration::from_millis(builtin.retention.max_age_ms)),
            retention_messages_max: Some(builtin.retention.messages_max),
            retention_bytes_max: Some(builtin.retention.bytes_max),
            ttl_min: Some(Duration::from_millis(builtin.ttl_min_ms)),
            ttl_max: Some(Duration::from_millis(builtin.ttl_max_ms)),
            dedupe_window: Some(Duration::from_millis(builtin.dedupe_window_ms)),
        };
        Self {
            data_dir: PathBuf::from("./herald-data"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7600)),
            dev: false,
            http: HttpConfig::default(),
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            realtime: RealtimeConfig::default(),
            durable: DurableConfig::default(),
            mqtt: crate::mqtt::MqttConfig::default(),
            namespaces: BTreeMap::from([(DEFAULT_NAMESPACE.to_owned(), default_namespace)]),
            api_keys: Vec::new(),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request that takes longer gets `503 timeout` (a publish may or may not have been
    /// stored: retry it with the same id).
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight requests before giving up on them.
    #[serde(with = "human_duration")]
    pub shutdown_grace: Duration,
    /// Browser origins (`https://app.example.com`) allowed to read SSE streams and the HTTP
    /// API cross-origin. Empty: no cross-origin access.
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            cors_origins: Vec::new(),
        }
    }
}

/// WebSocket and SSE subscriptions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeConfig {
    /// How often connections get a heartbeat with each subscribed channel's top position.
    #[serde(with = "human_duration")]
    pub heartbeat_interval: Duration,
    /// A WebSocket that sends no `connect` frame within this time is closed (4002).
    #[serde(with = "human_duration")]
    pub handshake_timeout: Duration,
    /// Newest messages kept in memory per subscribed channel for live delivery. A subscriber
    /// further behind reads from the log (exactly-once) or gets a gap notice (at-most-once).
    pub live_buffer_messages: usize,
    /// Frames waiting to be written per connection. When full, at-most-once subscriptions
    /// drop (with a gap notice) and exactly-once ones pause and later catch up from the log.
    pub outbound_queue_frames: usize,
    pub subscriptions_per_connection: usize,
    /// Largest WebSocket frame (or message) a client may send, in bytes; larger closes 1009.
    pub frame_bytes: usize,
    /// Consecutive malformed frames after which a WebSocket is closed (4000).
    pub bad_frames_max: u32,
    /// Read buffer per WebSocket, in bytes: the main part of an idle connection's memory.
    /// Frames larger than this are read in several steps.
    pub read_buffer_bytes: usize,
    /// Publishes one WebSocket may have waiting for their ack.
    pub publishes_in_flight_max: usize,
    /// Most bytes of a subscription filter expression.
    pub filter_bytes_max: usize,
    /// Messages read from the log per page when a subscriber replays or catches up.
    pub catch_up_page_messages: usize,
    /// How often an idle SSE stream gets a keep-alive comment.
    #[serde(with = "human_duration")]
    pub sse_keepalive_interval: Duration,
    /// The `retry:` an SSE stream announces: how long a browser waits before reconnecting.
    #[serde(with = "human_duration")]
    pub sse_retry: Duration,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            live_buffer_messages: 1024,
            outbound_queue_frames: 1024,
            subscriptions_per_connection: 100,
            frame_bytes: 256 * 1024,
            bad_frames_max: 10,
            read_buffer_bytes: 1024,
            publishes_in_flight_max: 256,
            filter_bytes_max: 1024,
            catch_up_page_messages: 100,
            sse_keepalive_interval: Duration::from_secs(15),
            sse_retry: Duration::from_secs(2),
        }
    }
}

/// At-least-once (durable) subscribers: the defaults a new subscriber gets when its subscribe
/// request leaves an option out, the bounds a request must stay within, and idle expiry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DurableConfig {
    /// Messages delivered and not yet acked per subscriber, by default.
    pub inflight_max: u32,
    /// The most a subscribe request may ask for `inflight_max`.
    pub inflight_max_limit: u32,
    /// A delivery not acked within this time is delivered again, by default.
    #[serde(with = "human_duration")]
    pub ack_wait: Duration,
    /// Deliveries of a message before it goes to `<channel>.dead`, by default.
    pub max_deliveries: u32,
    /// A subscriber without a connection for this long is removed, by default ("0s": never).
    #[serde(with = "human_duration")]
    pub expires_after: Duration,
    /// How often idle subscribers are looked for.
    #[serde(with = "human_duration")]
    pub sweep_interval: Duration,
    /// How long a takeover (or a delete) waits for the previous connection of the subscriber
    /// to persist its last state before going ahead anyway.
    #[serde(with = "human_duration")]
    pub takeover_timeout: Duration,
}

impl Default for DurableConfig {
    fn default() -> Self {
        let options = herald_core::SubscriberOptions::default();
        Self {
            inflight_max: options.inflight_max,
            inflight_max_limit: 10_000,
            ack_wait: Duration::from_millis(options.ack_wait_ms),
            max_deliveries: options.max_deliveries,
            expires_after: Duration::from_millis(options.expires_after_ms),
            sweep_interval: Duration::from_secs(60),
            takeover_timeout: Duration::from_secs(10),
        }
    }
}

impl DurableConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.inflight_max == 0 || self.inflight_max > self.inflight_max_limit {
            return Err(ConfigError::invalid(
                "durable.inflight_max",
                "must be between 1 and durable.inflight_max_limit",
            ));
        }
        if self.max_deliveries == 0 {
            return Err(ConfigError::invalid(
                "durable.max_deliveries",
                "must be at least 1",
            ));
        }
        if self.ack_wait < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "durable.ack_wait",
                "must be at least 10ms",
            ));
        }
        if self.sweep_interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "durable.sweep_interval",
                "must be at least 10ms",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The durable segmented log under `<data_dir>/log`.
    Embedded,
    /// Nothing survives a restart; for tests and experiments.
    Memory,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// Size of each preallocated segment file.
    pub segment_bytes: u64,
    /// Most bytes one group commit writes before its fsync.
    pub group_bytes_max: usize,
    /// How often expired and out-of-retention messages are reclaimed.
    #[serde(with = "human_duration")]
    pub reclaim_interval: Duration,
}

impl StorageConfig {
    pub fn embedded_options(&self) -> herald_log::embedded::EmbeddedOptions {
        herald_log::embedded::EmbeddedOptions {
            segment_bytes: self.segment_bytes,
            group_bytes_max: self.group_bytes_max,
            ..herald_log::embedded::EmbeddedOptions::default()
        }
    }
}

/// Upper bound on the log bytes one message takes beyond its counted size (record framing,
/// channel name, id, epoch, header lengths, chain).
const RECORD_OVERHEAD_BYTES_MAX: usize = 1024;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Embedded,
            segment_bytes: 64 * 1024 * 1024,
            group_bytes_max: 8 * 1024 * 1024,
            reclaim_interval: Duration::from_secs(30),
        }
    }
}

/// `herald_core::Limits` as configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub message_bytes_max: usize,
    pub batch_messages_max: usize,
    pub batch_bytes_max: usize,
    pub name_bytes_max: usize,
    pub headers_max: usize,
    pub read_limit_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            message_bytes_max: limits.message_bytes_max,
            batch_messages_max: limits.batch_messages_max,
            batch_bytes_max: limits.batch_bytes_max,
            name_bytes_max: limits.name_bytes_max,
            headers_max: limits.headers_max,
            read_limit_max: limits.read_limit_max,
        }
    }
}

impl LimitsConfig {
    pub fn to_limits(&self) -> Limits {
        Limits {
            message_bytes_max: self.message_bytes_max,
            batch_messages_max: self.batch_messages_max,
            batch_bytes_max: self.batch_bytes_max,
            name_bytes_max: self.name_bytes_max,
            headers_max: self.headers_max,
            read_limit_max: self.read_limit_max,
        }
    }
}

/// One namespace's policy; unset keys come from the `default` namespace, then built-ins.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    #[serde(
        with = "human_duration_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention_max_age: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_messages_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_bytes_max: Option<u64>,
    #[serde(
        with = "human_duration_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl_min: Option<Duration>,
    #[serde(
        with = "human_duration_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl_max: Option<Duration>,
    /// At least 2 minutes; the effective window also covers the retention age.
    #[serde(
        with = "human_duration_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub dedupe_window: Option<Duration>,
}

impl NamespaceConfig {
    fn resolve(&self, fallback: &NamespacePolicy) -> NamespacePolicy {
        let ms = |duration: Option<Duration>, default: u64| {
            duration.map_or(default, |duration| {
                u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
            })
        };
        NamespacePolicy {
            retention: Retention {
                max_age_ms: ms(self.retention_max_age, fallback.retention.max_age_ms),
                messages_max: self
                    .retention_messages_max
                    .unwrap_or(fallback.retention.messages_max),
                bytes_max: self
                    .retention_bytes_max
                    .unwrap_or(fallback.retention.bytes_max),
            },
            ttl_min_ms: ms(self.ttl_min, fallback.ttl_min_ms),
            ttl_max_ms: ms(self.ttl_max, fallback.ttl_max_ms),
            dedupe_window_ms: ms(self.dedupe_window, fallback.dedupe_window_ms),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Shown in logs; never the key itself.
    pub name: String,
    /// The secret, sent as `Authorization: Bearer KEY`. At least 16 printable ASCII characters.
    pub key: String,
    pub capabilities: Vec<CapabilityConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityConfig {
    /// Namespace names, or `"*"` for all. Bare channel names belong to `default`.
    pub namespaces: Vec<String>,
    /// `publish`, `history`, `admin` (admin implies the others).
    pub operations: Vec<Operation>,
}

/// Minimum length of a configured API key.
pub const API_KEY_CHARS_MIN: usize = 16;

/// A configuration problem, naming the key or file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("environment variable {variable}: {message}")]
    Environment { variable: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Settings given on the command line; they win over file and environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http_addr: Option<SocketAddr>,
    pub dev: bool,
    /// Enables the MQTT listener on this address.
    pub mqtt_listen: Option<SocketAddr>,
    /// Disables the MQTT listener (wins over `mqtt_listen` and the file).
    pub no_mqtt: bool,
}

/// Loads the configuration: defaults, then `file` (if any), then `HERALD_` variables from
/// `env`, then `overrides`; then validates it.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            parse_table(&text).map_err(|message| ConfigError::Syntax {
                path: path.to_owned(),
                message,
            })?
        }
        None => toml::Table::new(),
    };
    apply_env(&mut table, env)?;
    let mut config = from_table(table)?;
    if let Some(data_dir) = &overrides.data_dir {
        config.data_dir = data_dir.clone();
    }
    if let Some(http_addr) = overrides.http_addr {
        config.http_addr = http_addr;
    }
    config.dev |= overrides.dev;
    if let Some(listen) = overrides.mqtt_listen {
        config.mqtt.enabled = true;
        config.mqtt.listen = listen;
    }
    if overrides.no_mqtt {
        config.mqtt.enabled = false;
    }
    config.validate()?;
    Ok(config)
}

/// Parses and validates config text (no environment, no overrides): `herald config check`.
pub fn parse_str(text: &str) -> Result<Config, ConfigError> {
    let table = parse_table(text).map_err(|message| ConfigError::Syntax {
        path: PathBuf::from("<text>"),
        message,
    })?;
    let config = from_table(table)?;
    config.validate()?;
    Ok(config)
}

fn parse_table(text: &str) -> Result<toml::Table, String> {
    text.parse::<toml::Table>()
        .map_err(|error| error.to_string().trim_end().to_owned())
}

fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
        let key = error.path().to_string();
        let key = if key == "." { "config".to_owned() } else { key };
        ConfigError::invalid(key, error.into_inner().to_string())
    })
}

const ENV_PREFIX: &str = "HERALD_";
/// The top-level keys of [`Config`]; other `HERALD_` variables belong to someone else.
const TOP_LEVEL_KEYS: &[&str] = &[
    "data_dir",
    "http_addr",
    "dev",
    "http",
    "storage",
    "limits",
    "realtime",
    "durable",
    "mqtt",
    "namespaces",
    "api_keys",
    "webhooks",
];
/// Top-level keys whose environment values are never read as TOML literals.
const STRING_KEYS: &[&str] = &["data_dir", "http_addr"];

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    // Sorted, so that the outcome does not depend on the environment's order.
    let variables: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    for (variable, value) in variables {
        let path: Vec<String> = variable[ENV_PREFIX.len()..]
            .to_ascii_lowercase()
            .split("__")
            .map(str::to_owned)
            .collect();
        if !TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
            continue;
        }
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Environment {
                variable,
                message: "empty key segment (use a double underscore only between keys)".into(),
            });
        }
        let parsed = if path.len() == 1 && STRING_KEYS.contains(&path[0].as_str()) {
            toml::Value::String(value)
        } else {
            toml_literal(&value).unwrap_or(toml::Value::String(value))
        };
        let (last, parents) = path.split_last().expect("at least one segment");
        let mut current = &mut *table;
        for (depth, key) in parents.iter().enumerate() {
            let entry = current
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = match entry {
                toml::Value::Table(inner) => inner,
                _ => {
                    return Err(ConfigError::Environment {
                        variable,
                        message: format!("{} is not a table", path[..=depth].join(".")),
                    });
                }
            };
        }
        current.insert(last.clone(), parsed);
    }
    Ok(())
}

fn toml_literal(text: &str) -> Option<toml::Value> {
    let table = format!("value = {text}").parse::<toml::Table>().ok()?;
    table.get("value").cloned()
}

impl RealtimeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("realtime.live_buffer_messages", self.live_buffer_messages),
            ("realtime.outbound_queue_frames", self.outbound_queue_frames),
            (
                "realtime.subscriptions_per_connection",
                self.subscriptions_per_connection,
            ),
            (
                "realtime.publishes_in_flight_max",
                self.publishes_in_flight_max,
            ),
            ("realtime.filter_bytes_max", self.filter_bytes_max),
            ("realtime.read_buffer_bytes", self.read_buffer_bytes),
            (
                "realtime.catch_up_page_messages",
                self.catch_up_page_messages,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.frame_bytes < 1024 {
            return Err(ConfigError::invalid(
                "realtime.frame_bytes",
                "must be at least 1024",
            ));
        }
        for (key, value) in [
            ("realtime.heartbeat_interval", self.heartbeat_interval),
            ("realtime.handshake_timeout", self.handshake_timeout),
            (
                "realtime.sse_keepalive_interval",
                self.sse_keepalive_interval,
            ),
        ] {
            if value < Duration::from_millis(10) {
                return Err(ConfigError::invalid(key, "must be at least 10ms"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Checks everything that types alone cannot; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits
            .to_limits()
            .check()
            .map_err(|message| ConfigError::invalid("limits", message))?;
        if self.http.request_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "http.request_timeout",
                "must be positive",
            ));
        }
        let group_needed = self.limits.batch_bytes_max
            + self.limits.batch_messages_max * RECORD_OVERHEAD_BYTES_MAX;
        if self.storage.group_bytes_max < group_needed {
            return Err(ConfigError::invalid(
                "storage.group_bytes_max",
                format!(
                    "is {}, it must be at least {group_needed} so that a full batch \
                     (limits.batch_bytes_max plus record overhead) fits in one commit",
                    self.storage.group_bytes_max
                ),
            ));
        }
        self.storage
            .embedded_options()
            .check()
            .map_err(|error| ConfigError::invalid("storage", error.to_string()))?;
        self.realtime.validate()?;
        self.durable.validate()?;
        self.mqtt.validate()?;
        if self.storage.reclaim_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "storage.reclaim_interval",
                "must be at least 1s",
            ));
        }
        for name in self.namespaces.keys() {
            if ChannelName::parse(&format!("{name}:x"))
                .ok()
                .and_then(|channel| channel.namespace().map(|ns| ns == name))
                != Some(true)
            {
                return Err(ConfigError::invalid(
                    format!("namespaces.{name}"),
                    "not a valid namespace name (no ':', whitespace, or any of * > # + / ?)",
                ));
            }
        }
        let policies = self.policies();
        let checked = std::iter::once((DEFAULT_NAMESPACE, &policies.default)).chain(
            policies
                .namespaces
                .iter()
                .map(|(name, policy)| (name.as_str(), policy)),
        );
        for (name, policy) in checked {
            policy
                .check()
                .map_err(|message| ConfigError::invalid(format!("namespaces.{name}"), message))?;
        }
        crate::webhook::validate_rules(&self.webhooks)?;
        self.validate_api_keys()
    }

    fn validate_api_keys(&self) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        let mut secrets = BTreeSet::new();
        for (index, api_key) in self.api_keys.iter().enumerate() {
            let key = format!("api_keys[{index}]");
            if api_key.name.trim().is_empty() {
                return Err(ConfigError::invalid(format!("{key}.name"), "is empty"));
            }
            if !names.insert(api_key.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("{:?} is used by another key", api_key.name),
                ));
            }
            if api_key.key.len() < API_KEY_CHARS_MIN
                || !api_key.key.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::invalid(
                    format!("{key}.key"),
                    format!(
                        "must be at least {API_KEY_CHARS_MIN} printable ASCII characters without spaces"
                    ),
                ));
            }
            if !secrets.insert(api_key.key.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.key"),
                    "is the same secret as another key",
                ));
            }
            if api_key.capabilities.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.capabilities"),
                    "is empty: the key could do nothing",
                ));
            }
            for (cap_index, capability) in api_key.capabilities.iter().enumerate() {
                let cap_key = format!("{key}.capabilities[{cap_index}]");
                if capability.namespaces.is_empty() || capability.operations.is_empty() {
                    return Err(ConfigError::invalid(
                        cap_key,
                        "needs at least one namespace and one operation",
                    ));
                }
                for pattern in &capability.namespaces {
                    let valid = pattern == "*"
                        || ChannelName::parse(&format!("{pattern}:x"))
                            .ok()
                            .and_then(|channel| channel.namespace().map(|ns| ns == pattern))
                            == Some(true);
                    if !valid {
                        return Err(ConfigError::invalid(
                            format!("{cap_key}.namespaces"),
                            format!("{pattern:?} is neither a namespace name nor \"*\""),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        self.limits.to_limits()
    }

    /// The namespace policies, with unset keys filled from `default`, then built-ins.
    pub fn policies(&self) -> Policies {
        let builtin = NamespacePolicy::default();
        let default = match self.namespaces.get(DEFAULT_NAMESPACE) {
            Some(config) => config.resolve(&builtin),
            None => builtin,
        };
        let namespaces = self
            .namespaces
            .iter()
            .filter(|(name, _)| name.as_str() != DEFAULT_NAMESPACE)
            .map(|(name, config)| (name.clone(), config.resolve(&default)))
            .collect();
        Policies {
            default,
            namespaces,
        }
    }
}

/// `Duration` as a humantime string ("30s", "24h").
pub(crate) mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*duration).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration like \"30s\" or \"24h\": {error}"
            ))
        })
    }
}

mod human_duration_option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => super::human_duration::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::human_duration::deserialize(deserializer).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn every_top_level_key_can_be_set_from_the_environment() {
        let serialised = toml::Table::try_from(Config::default()).unwrap();
        for key in serialised.keys() {
            assert!(
                TOP_LEVEL_KEYS.contains(&key.as_str()),
                "HERALD_{} would be ignored",
                key.to_uppercase()
            );
        }
        let config = load(
            None,
            env(&[
                ("HERALD_REALTIME__BAD_FRAMES_MAX", "3"),
                ("HERALD_DURABLE__ACK_WAIT", "2s"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.realtime.bad_frames_max, 3);
        assert_eq!(config.durable.ack_wait, Duration::from_secs(2));
    }

    #[test]
    fn default_config_file_parses_to_the_defaults() {
        let parsed = parse_str(DEFAULT_CONFIG_TOML).expect("the default config is valid");
        assert_eq!(parsed, Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn environment_overrides_file_and_flags_override_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\n[limits]\nmessage_bytes_max = 1000\n",
        )
        .unwrap();
        let config = load(
            Some(&file),
            env(&[
                ("HERALD_DATA_DIR", "/from/env"),
                ("HERALD_LIMITS__MESSAGE_BYTES_MAX", "2000"),
                ("HERALD_NAMESPACES__CHAT__RETENTION_MAX_AGE", "1h"),
                ("HERALD_URL", "http://ignored"),
                ("HERALD_KEY", "ignored"),
                ("PATH", "/bin"),
            ]),
            &Overrides {
                http_addr: Some("127.0.0.1:9999".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/env"));
        assert_eq!(config.limits.message_bytes_max, 2000);
        assert_eq!(config.http_addr.port(), 9999);
        let policies = config.policies();
        assert_eq!(policies.namespaces["chat"].retention.max_age_ms, 3_600_000);
        // Unset keys of a namespace come from the default namespace.
        assert_eq!(
            policies.namespaces["chat"].ttl_max_ms,
            policies.default.ttl_max_ms
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[limits]\nmessage_bytes_max = \"big\"\n",
                "limits.message_bytes_max",
            ),
            ("[limits]\nmesage_bytes_max = 5\n", "limits"),
            (
                "[namespaces.chat]\ndedupe_window = \"30s\"\n",
                "namespaces.chat",
            ),
            (
                "[namespaces.chat]\nttl_min = \"soon\"\n",
                "namespaces.chat.ttl_min",
            ),
            ("[limits]\nmessage_bytes_max = 0\n", "limits"),
            ("[storage]\nbackend = \"s3\"\n", "storage.backend"),
            (
                "[[api_keys]]\nname = \"a\"\nkey = \"short\"\ncapabilities = []\n",
                "api_keys[0].key",
            ),
            (
                "[[api_keys]]\nname = \"a\"\nkey = \"0123456789abcdef\"\n[[api_keys.capabilities]]\nnamespaces = [\"chat\"]\noperations = [\"fly\"]\n",
                "api_keys",
            ),
        ];
        for (text, key) in cases {
            let error = parse_str(text).expect_err(text).to_string();
            assert!(
                error.contains(key),
                "{text:?} gave {error:?}, expected {key}"
            );
        }
        let error = load(
            None,
            env(&[("HERALD_LIMITS__BATCH_BYTES_MAX", "10")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("batch_bytes_max"), "{error}");
    }

    #[test]
    fn api_keys_from_environment_as_toml() {
        let config = load(
            None,
            env(&[(
                "HERALD_API_KEYS",
                r#"[{ name = "svc", key = "0123456789abcdef", capabilities = [{ namespaces = ["*"], operations = ["publish"] }] }]"#,
            )]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.api_keys[0].name, "svc");
        assert_eq!(
            config.api_keys[0].capabilities[0].operations,
            vec![Operation::Publish]
        );
    }

    #[test]
    fn mqtt_listens_on_loopback_1883_by_default_and_every_layer_can_turn_it_off() {
        let config = load(None, env(&[]), &Overrides::default()).unwrap();
        assert!(config.mqtt.enabled, "MQTT is on without any setting");
        assert_eq!(config.mqtt.listen, SocketAddr::from(([127, 0, 0, 1], 1883)));
        assert_eq!(config.mqtt, Config::default().mqtt);

        let off_in_file = parse_str("[mqtt]\nenabled = false\n").unwrap();
        assert!(!off_in_file.mqtt.enabled);
        let off_in_env = load(
            None,
            env(&[("HERALD_MQTT__ENABLED", "false")]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(!off_in_env.mqtt.enabled);
        let no_mqtt = Overrides {
            no_mqtt: true,
            ..Overrides::default()
        };
        assert!(!load(None, env(&[]), &no_mqtt).unwrap().mqtt.enabled);

        // `--mqtt ADDR` moves the listener and turns it back on over the environment.
        let moved = load(
            None,
            env(&[("HERALD_MQTT__ENABLED", "false")]),
            &Overrides {
                mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert!(moved.mqtt.enabled);
        assert_eq!(moved.mqtt.listen.port(), 0);
    }
}
