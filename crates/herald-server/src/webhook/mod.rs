//! Webhooks: `[[webhooks]]` rules delivered by signed HTTP POST, at least once.
//!
//! Each rule is a durable subscriber (id `webhook.<rule name>`) of every channel of its
//! namespace: one worker per (rule, channel), a `durable::pump` whose sink
//! ([`sender::WebhookSink`]) POSTs each delivery. Everything a WebSocket durable subscriber
//! gets, a webhook gets too: the position is held durably (riding the group commit), every
//! attempt is counted durably before it goes out, an unanswered POST is retried, and after
//! `max_attempts` the message goes to `<channel>.dead` with the reason headers.
//!
//! - [`config`]: the rule keys and their validation.
//! - [`signing`]: `Herald-Signature` and [`verify_signature`] for receivers.
//! - [`sender`]: the sink, the POST and the backoff.
//! - [`lifecycle`]: lifecycle events stored in `<namespace>:herald.lifecycle`.
//! - this module: [`Webhooks`], which finds channels and runs the workers.
//!
//! # Which channels a rule covers
//! A rule delivers every retained message of every channel of its namespace (a new worker
//! starts at the channel's oldest retained message), except dead-letter channels (`*.dead`)
//! and the lifecycle channel. Channels are found when the first message after start-up is
//! made durable on them (the hub's [`ChannelObserver`]) and, at start-up, from the store's
//! channel list and the stored `webhook.*` subscribers. Rules with lifecycle events also run a
//! worker on their namespace's lifecycle channel, which POSTs the events the rule wants.
//!
//! # Invariants
//! - One worker per (rule, channel) per server; `inflight_max: 1`, so per-channel order
//!   holds: message n+1 is POSTed only after n got a 2xx (or was dead-lettered).
//! - Workers are stopped before the store closes (see [`Webhooks::stop`]); each persists its
//!   last state, and an attempt cut short is delivered again on the next start (at least
//!   once: the receiver deduplicates by `Idempotency-Key`).
//! - A rule's subscriber keeps the options it was created with (`max_attempts`,
//!   `timeout`): changing them in the config affects new channels only (the backoff and the
//!   timeout of each POST follow the config at once).
//! - A worker whose subscriber is taken away (an admin `DELETE` of `webhook.<name>`, or a
//!   WebSocket subscribing with that id) stops until the next start, which begins the channel
//!   again from its oldest retained message.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use herald_core::engine::Start;
use herald_core::{ChannelName, Message, SubscriberId, SubscriberOptions};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::durable::{DurableContext, DurableRequest, PumpEnd};
use crate::hub::ChannelObserver;

pub mod config;
pub mod lifecycle;
pub mod sender;
pub mod signing;

pub use config::{WebhookEvent, WebhookRule, validate_rules};
pub use lifecycle::{LIFECYCLE_CHANNEL_SUFFIX, lifecycle_channel};
pub use signing::{SIGNATURE_HEADER, SignatureError, sign, verify_signature};

use lifecycle::{LifecycleRecorder, is_lifecycle_channel, namespace_of};
use sender::{Rule, WebhookSink};

/// The subscriber id prefix of webhook workers.
pub const SUBSCRIBER_PREFIX: &str = "webhook.";
/// Extra time past a rule's `timeout` before an unanswered attempt is retried by the pump's
/// own `ack_wait` (only when the attempt's report was lost, e.g. its task was cancelled).
const ACK_WAIT_MARGIN: Duration = Duration::from_secs(5);
/// Control inputs a worker may have queued (at most one attempt is in flight).
const CONTROL_QUEUE: usize = 16;
/// How long [`Webhooks::stop`] waits for the workers to persist their last state.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait before a failed worker is started again.
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    crate::durable::now().0
}

/// Webhook counters for `/metrics` (see [`WebhookCounters::render`]).
#[derive(Debug, Default)]
pub struct WebhookCounters {
    /// Workers running, one per (rule, channel).
    pub workers: AtomicU64,
    /// POSTs sent, first and repeated.
    pub attempts: AtomicU64,
    /// POSTs answered with a 2xx.
    pub delivered: AtomicU64,
    pub failures_status: AtomicU64,
    pub failures_timeout: AtomicU64,
    pub failures_connect: AtomicU64,
    pub failures_other: AtomicU64,
    /// Failed attempts that will be retried after a backoff.
    pub retries: AtomicU64,
    /// Failed last attempts: the message goes to the dead-letter channel.
    pub exhausted: AtomicU64,
    /// Lifecycle-channel messages a rule does not want (acked without a POST).
    pub skipped: AtomicU64,
    pub lifecycle_recorded: AtomicU64,
    pub lifecycle_record_failures: AtomicU64,
    /// Worker restarts after a failure (store errors).
    pub restarts: AtomicU64,
}

impl WebhookCounters {
    fn failed(&self, failure: &sender::Failure) {
        let counter = match failure {
            sender::Failure::Status(_) => &self.failures_status,
            sender::Failure::Timeout => &self.failures_timeout,
            sender::Failure::Connect => &self.failures_connect,
            sender::Failure::Other(_) => &self.failures_other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the webhook metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut single = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        single(
            "herald_webhook_workers",
            "gauge",
            "Webhook workers running, one per (rule, channel).",
            get(&self.workers),
        );
        single(
            "herald_webhook_attempts_total",
            "counter",
            "Webhook POSTs sent, first and repeated.",
            get(&self.attempts),
        );
        single(
            "herald_webhook_delivered_total",
            "counter",
            "Webhook POSTs answered with a 2xx status.",
            get(&self.delivered),
        );
        single(
            "herald_webhook_retries_total",
            "counter",
            "Failed webhook attempts scheduled again after a backoff.",
            get(&self.retries),
        );
        single(
            "herald_webhook_exhausted_total",
            "counter",
            "Webhook messages whose last attempt failed (they go to the dead-letter channel).",
            get(&self.exhausted),
        );
        single(
            "herald_webhook_skipped_total",
            "counter",
            "Lifecycle events acked without a POST because the rule does not want them.",
            get(&self.skipped),
        );
        single(
            "herald_webhook_lifecycle_recorded_total",
            "counter",
            "Lifecycle events stored for webhooks.",
            get(&self.lifecycle_recorded),
        );
        single(
            "herald_webhook_lifecycle_record_failures_total",
            "counter",
            "Lifecycle events that could not be stored (their webhooks miss them).",
            get(&self.lifecycle_record_failures),
        );
        single(
            "herald_webhook_worker_restarts_total",
            "counter",
            "Webhook workers started again after a failure.",
            get(&self.restarts),
        );
        let _ = writeln!(
            out,
            "# HELP herald_webhook_failures_total Failed webhook attempts by kind.\n\
             # TYPE herald_webhook_failures_total counter"
        );
        for (kind, counter) in [
            ("status", &self.failures_status),
            ("timeout", &self.failures_timeout),
            ("connect", &self.failures_connect),
            ("other", &self.failures_other),
        ] {
            let _ = writeln!(
                out,
                "herald_webhook_failures_total{{kind=\"{kind}\"}} {}",
                get(counter)
            );
        }
    }
}

/// The running webhooks of a server.
pub struct Webhooks {
    shared: Arc<Shared>,
    manager: JoinHandle<()>,
}

struct Shared {
    context: Arc<DurableContext>,
    rules: Vec<Arc<Rule>>,
    client: reqwest::Client,
    counters: Arc<WebhookCounters>,
    /// Namespaces with a rule that wants messages.
    message_namespaces: HashSet<String>,
    /// Channels already given their workers (or queued for them).
    known: RwLock<HashSet<ChannelName>>,
    /// Channels seen by the observer, waiting for the manager task.
    pending: Mutex<Vec<ChannelName>>,
    wake: Notify,
    stop: watch::Sender<bool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Webhooks {
    /// Starts the workers of `rules` (already validated): installs the channel observer and,
    /// when a rule wants them, the lifecycle recorder; then starts a worker for every channel
    /// the store knows in a rule's namespace. Returns `Ok(None)` without rules.
    pub fn start(
        context: Arc<DurableContext>,
        rules: &[WebhookRule],
    ) -> Result<Option<Webhooks>, String> {
        if rules.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            // A redirect of a POST is not a delivery: it counts as a failed attempt.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| format!("cannot build the webhook HTTP client: {error}"))?;
        let rules: Vec<Arc<Rule>> = rules
            .iter()
            .map(|config| {
                Ok(Arc::new(Rule {
                    url: config::rule_url(config)?,
                    subscriber: SubscriberId::parse(&subscriber_id(config))
                        .map_err(|error| error.to_string())?,
                    config: config.clone(),
                }))
            })
            .collect::<Result<_, String>>()?;
        let message_namespaces = rules
            .iter()
            .filter(|rule| rule.config.wants(WebhookEvent::Message))
            .map(|rule| rule.config.namespace.clone())
            .collect();
        let counters = Arc::new(WebhookCounters::default());
        let wanted: HashSet<(String, WebhookEvent)> = rules
            .iter()
            .flat_map(|rule| {
                rule.config
                    .events
                    .iter()
                    .filter(|event| event.is_lifecycle())
                    .map(|event| (rule.config.namespace.clone(), *event))
            })
            .collect();
        if !wanted.is_empty() {
            context.set_lifecycle_listener(Arc::new(LifecycleRecorder {
                store: context.store.clone(),
                wanted,
                counters: counters.clone(),
            }));
        }
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            context: context.clone(),
            rules,
            client,
            counters,
            message_namespaces,
            known: RwLock::new(HashSet::new()),
            pending: Mutex::new(Vec::new()),
            wake: Notify::new(),
            stop,
            workers: Mutex::new(Vec::new()),
        });
        // Installed before the scan, so a channel whose first message lands meanwhile is not
        // missed (both paths go through `known`, so it is not started twice either).
        context.hub.set_observer(shared.clone());
        shared.start_lifecycle_workers();
        let mut channels = context.store.channels();
        channels.extend(
            context
                .store
                .subscribers()
                .into_iter()
                .filter(|state| state.id.as_str().starts_with(SUBSCRIBER_PREFIX))
                .map(|state| state.channel),
        );
        for channel in channels {
            if shared.claim_channel(&channel) {
                shared.start_channel(&channel);
            }
        }
        let manager = tokio::spawn(shared.clone().manage());
        Ok(Some(Webhooks { shared, manager }))
    }

    pub fn counters(&self) -> Arc<WebhookCounters> {
        self.shared.counters.clone()
    }

    /// Stops every worker and waits (bounded) until each persisted its last state. Call
    /// before the store closes.
    pub async fn stop(self) {
        self.shared.stop.send_replace(true);
        let _ = self.manager.await;
        let workers = std::mem::take(
            &mut *self
                .shared
                .workers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let all = futures_util::future::join_all(workers);
        if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
            tracing::warn!("webhook workers did not stop in time");
        }
    }
}

impl ChannelObserver for Shared {
    fn on_durable(&self, messages: &[Message]) {
        let mut previous: Option<&ChannelName> = None;
        for message in messages {
            let channel = &message.channel;
            // Batches are usually of one channel: look each up once.
            if previous == Some(channel) {
                continue;
            }
            previous = Some(channel);
            if !self.message_namespaces.contains(namespace_of(channel))
                || self
                    .known
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(channel)
            {
                continue;
            }
            if self.claim_channel(channel) {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(channel.clone());
                self.wake.notify_one();
            }
        }
    }
}

impl Shared {
    /// Whether `channel` is one to give message workers to and was not given them yet
    /// (marks it given).
    fn claim_channel(&self, channel: &ChannelName) -> bool {
        if !self.message_namespaces.contains(namespace_of(channel))
            || channel.as_str().ends_with(".dead")
            || is_lifecycle_channel(channel)
        {
            return false;
        }
        self.known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(channel.clone())
    }

    /// Starts the message workers of every rule of the channel's namespace.
    fn start_channel(self: &Arc<Self>, channel: &ChannelName) {
        let namespace = namespace_of(channel);
        for rule in &self.rules {
            if rule.config.namespace == namespace && rule.config.wants(WebhookEvent::Message) {
                self.spawn_worker(rule.clone(), channel.clone(), false);
            }
        }
    }

    fn start_lifecycle_workers(self: &Arc<Self>) {
        for rule in &self.rules {
            if !rule.config.wants_lifecycle() {
                continue;
            }
            match lifecycle_channel(&rule.config.namespace) {
                Some(channel) => self.spawn_worker(rule.clone(), channel, true),
                None => {
                    tracing::error!(rule = %rule.config.name, "no lifecycle channel for the rule's namespace")
                }
            }
        }
    }

    fn spawn_worker(self: &Arc<Self>, rule: Arc<Rule>, channel: ChannelName, lifecycle: bool) {
        let task = tokio::spawn(self.clone().supervise(rule, channel, lifecycle));
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        workers.retain(|worker| !worker.is_finished());
        workers.push(task);
    }

    /// Starts the workers of channels the observer found, until stopped.
    async fn manage(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let found =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
            for channel in found {
                self.start_channel(&channel);
            }
        }
    }

    /// Runs one (rule, channel) worker: its pump, started again after a failure, until the
    /// webhooks stop or the subscriber is taken away (deleted or taken over).
    async fn supervise(self: Arc<Self>, rule: Arc<Rule>, channel: ChannelName, lifecycle: bool) {
        let mut stop = self.stop.subscribe();
        let mut failures: u32 = 0;
        self.counters.workers.fetch_add(1, Ordering::Relaxed);
        loop {
            let (control, inputs) = mpsc::channel(CONTROL_QUEUE);
            let (ended, end) = oneshot::channel();
            let sink = WebhookSink {
                rule: rule.clone(),
                channel: channel.clone(),
                lifecycle,
                client: self.client.clone(),
                control: control.downgrade(),
                counters: self.counters.clone(),
                ended: Some(ended),
            };
            let request = DurableRequest {
                channel: channel.clone(),
                id: rule.subscriber.clone(),
                options: options(&rule.config),
                start: Start::FromStart,
            };
            let mut pump = tokio::spawn(crate::durable::pump::run(
                self.context.clone(),
                request,
                sink,
                inputs,
            ));
            let stopping = tokio::select! {
                _ = &mut pump => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            // With the strong handle gone the pump sees its queue close, persists, and ends.
            drop(control);
            if stopping {
                let _ = pump.await;
                break;
            }
            let end = end.await.unwrap_or_else(|_| {
                PumpEnd::Failed("the worker's pump ended without a word".into())
            });
            match end {
                PumpEnd::Evicted(eviction) => {
                    tracing::warn!(
                        rule = %rule.config.name,
                        %channel,
                        eviction = eviction.describe(),
                        "webhook worker stopped: its subscriber was taken away; it starts over at the next server start"
                    );
                    break;
                }
                PumpEnd::Gone | PumpEnd::Failed(_) => {
                    failures = failures.saturating_add(1);
                    self.counters.restarts.fetch_add(1, Ordering::Relaxed);
                    let delay =
                        Duration::from_millis(250u64 << failures.min(7)).min(RESTART_DELAY_MAX);
                    tracing::warn!(rule = %rule.config.name, %channel, ?end, ?delay, "webhook worker failed; starting it again");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|stop| *stop) => break,
                    }
                }
            }
        }
        self.counters.workers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The options of a rule's new subscriber.
fn options(rule: &WebhookRule) -> SubscriberOptions {
    let ack_wait = rule.timeout + ACK_WAIT_MARGIN;
    SubscriberOptions {
        ack_wait_ms: u64::try_from(ack_wait.as_millis()).unwrap_or(u64::MAX),
        max_deliveries: rule.max_attempts,
        inflight_max: 1,
        expires_after_ms: 0,
    }
}

/// The durable subscriber id of a rule's workers (`webhook.<name>`), for introspection.
/// Refuses a client-chosen subscriber id in the webhooks' range (`webhook.`): clients cannot
/// take over or delete a rule's workers.
pub fn refuse_reserved(id: &herald_core::SubscriberId) -> Result<(), herald_core::InvalidInput> {
    if id.as_str().starts_with(SUBSCRIBER_PREFIX) {
        return Err(herald_core::InvalidInput::request(format!(
            "subscriber ids starting with {SUBSCRIBER_PREFIX:?} belong to webhook rules"
        )));
    }
    Ok(())
}

pub fn subscriber_id(rule: &WebhookRule) -> String {
    format!("{SUBSCRIBER_PREFIX}{}", rule.name)
}
