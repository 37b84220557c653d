//! # herald-sim
//!
//! A deterministic simulation of Herald. One seeded PRNG drives everything: publishers and
//! subscribers built on the SDK's pure [`Session`](herald_client::session::Session), a
//! network that delays frames and cuts connections (frames of one connection stay in order,
//! frames of different connections are reordered), the in-memory store with its faults
//! (delayed appends, a failed fsync that poisons the store, a crash and restart that keeps
//! only what was durable), and the server's subscription logic, which is herald-core's real
//! [`SubscriptionMachine`](herald_core::engine::SubscriptionMachine). Time is virtual (a
//! [`ManualClock`]); retention and TTL run on it.
//!
//! After every step the invariants of `docs/delivery.md` that apply are checked
//! ([`check`]); after the run drains, the final accounting is.
//!
//! # Running
//! - `cargo test -p herald-sim` runs the fixed CI seeds (0..64).
//! - `HERALD_SIM_SEED=N cargo test -p herald-sim` replays seed `N` exactly. A failing run
//!   prints its seed and this command.
//! - `HERALD_SIM_SEEDS=N` runs seeds `0..N`; with `HERALD_SIM_SEEDS_FROM=M`, seeds `M..M+N`.
//! - `HERALD_SIM_TRACE=C` prints every frame client `C` sends and receives (with a single
//!   seed), which is how a failure is read.
//! - **Long soak**: `HERALD_SIM_SEEDS=200000 HERALD_SIM_SEEDS_FROM=$((RANDOM * 1000)) cargo
//!   test --release -p herald-sim --test seeds every_seed -- --nocapture`. Release mode runs
//!   about 8,000 seeds a minute per profile on this two-core machine (5,000 seeds of each
//!   profile took 75 s); note any failing seed and replay it with `HERALD_SIM_SEED`.
//!
//! # Layout
//! - [`net`]: links (per-connection FIFO with delays).
//! - [`server`]: the simulated server around the real machine and store.
//! - [`client`]: simulated clients around the real SDK session.
//! - [`check`]: the invariants.
//!
//! # Invariants
//! - A run is a pure function of its seed and [`SimOptions`]: no clock, no thread, no
//!   `HashMap` iteration decides anything. (The store picks a channel's epoch text at random;
//!   nothing branches on that text.)
//! - Every loop is bounded: the active phase by `active_ms`, the drain by `drain_ms_max`.

pub mod check;
pub mod client;
pub mod net;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Arc;

use herald_client::session::Output;
use herald_core::{ChannelName, Guarantee, Policies, Timestamp};
use herald_log::{LogStore, ManualClock};
use herald_protocol::ws::{ClientFrame, ServerFrame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use check::Checker;
pub use client::{Role, SimClient};
pub use net::Link;
pub use server::{InjectedBug, Server, ServerOptions, ServerStats};

/// The channel with default retention.
pub const CHANNEL_KEPT: &str = "sim:main";
/// The channel whose retention keeps only a few messages, so slow exactly-once subscribers
/// are overtaken and get `continuity_lost`.
pub const CHANNEL_SHORT: &str = "short:feed";
/// How many messages `short:` keeps.
pub const SHORT_RETENTION_MESSAGES: u64 = 12;

/// Probabilities are per step (one step is 1 to 4 virtual milliseconds).
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub active_ms: u64,
    pub drain_ms_max: u64,
    pub messages_per_publisher: u64,
    pub server: ServerOptions,
    pub bug: Option<InjectedBug>,
    pub publish_chance: f64,
    pub cut_chance: f64,
    pub pause_chance: f64,
    /// A subscriber's application unsubscribes and subscribes again.
    pub resubscribe_chance: f64,
    pub crash_chance: f64,
    pub append_failure_chance: f64,
    /// The data directory is lost: the server restarts empty, in new epochs.
    pub wipe_chance: f64,
    /// How long an injected fsync failure keeps the store poisoned before the restart.
    pub poisoned_ms_max: u64,
    /// Frames in flight per link direction (socket buffers).
    pub link_window_frames: usize,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            active_ms: 4_000,
            drain_ms_max: 60_000,
            messages_per_publisher: 40,
            server: ServerOptions {
                ring_messages: 4,
                outbound_frames: 4,
                page_messages: 3,
                append_delay_ms_max: 20,
            },
            bug: None,
            publish_chance: 0.05,
            cut_chance: 0.004,
            pause_chance: 0.004,
            resubscribe_chance: 0.001,
            crash_chance: 0.0006,
            append_failure_chance: 0.0006,
            wipe_chance: 0.0001,
            poisoned_ms_max: 300,
            link_window_frames: 6,
        }
    }
}

/// What a run did, for the test output.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub steps: u64,
    pub acked: u64,
    pub messages_checked: u64,
    pub notices_checked: u64,
    pub cuts: u64,
    pub pauses: u64,
    pub resubscribes: u64,
    pub server: ServerStats,
}

/// A run that broke an invariant.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub violations: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "herald-sim seed {} failed; replay with: HERALD_SIM_SEED={} cargo test -p herald-sim",
            self.seed, self.seed
        )?;
        for violation in self.violations.iter().take(20) {
            writeln!(f, "  {violation}")?;
        }
        if self.violations.len() > 20 {
            writeln!(f, "  ... and {} more", self.violations.len() - 20)?;
        }
        Ok(())
    }
}

/// The seeds to run: `HERALD_SIM_SEED=N` alone, else `HERALD_SIM_SEEDS` (default
/// `default_count`) seeds from `HERALD_SIM_SEEDS_FROM` (default 0).
pub fn seeds_from_env(default_count: u64) -> Vec<u64> {
    let read = |name: &str| {
        std::env::var(name).ok().map(|text| {
            text.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} must be a number, not {text:?}"))
        })
    };
    if let Some(seed) = read("HERALD_SIM_SEED") {
        return vec![seed];
    }
    let count = read("HERALD_SIM_SEEDS").unwrap_or(default_count);
    let from = read("HERALD_SIM_SEEDS_FROM").unwrap_or(0);
    (from..from.saturating_add(count)).collect()
}

struct Wire {
    client: usize,
    up: Link,
    down: Link,
    base_delay_ms: u64,
}

struct Sim {
    rng: StdRng,
    now_ms: u64,
    step: u64,
    clock: Arc<ManualClock>,
    options: SimOptions,
    server: Server,
    clients: Vec<SimClient>,
    wires: BTreeMap<u64, Wire>,
    next_connection: u64,
    restart_at_ms: Option<u64>,
    checker: Checker,
    summary: Summary,
    /// `HERALD_SIM_TRACE=N`: print every frame client N sends and receives.
    trace_client: Option<usize>,
}

/// Runs one seed: an active phase with publishes and faults, then a drain without either,
/// then the final accounting.
pub fn run(seed: u64, options: &SimOptions) -> Result<Summary, Failure> {
    let mut sim = Sim::new(seed, options.clone());
    let active_until_ms = sim.options.active_ms;
    while sim.now_ms < active_until_ms {
        sim.tick(true);
        if !sim.checker.violations.is_empty() {
            return Err(sim.failure());
        }
    }
    let drain_until_ms = sim.now_ms + sim.options.drain_ms_max;
    for client in &mut sim.clients {
        client.paused_until_ms = 0;
    }
    while !sim.drained() {
        if sim.now_ms >= drain_until_ms {
            let stuck = sim.describe_stuck();
            sim.checker.violations.push(format!(
                "the run did not drain within {} ms: {stuck}",
                sim.options.drain_ms_max
            ));
            return Err(sim.failure());
        }
        sim.tick(false);
        if !sim.checker.violations.is_empty() {
            return Err(sim.failure());
        }
    }
    sim.checker.finish(sim.server.store() as &dyn LogStore);
    if !sim.checker.violations.is_empty() {
        return Err(sim.failure());
    }
    sim.summary.steps = sim.step;
    sim.summary.messages_checked = sim.checker.messages_checked;
    sim.summary.notices_checked = sim.checker.notices_checked;
    sim.summary.server = sim.server.stats;
    Ok(sim.summary)
}

impl Sim {
    fn new(seed: u64, options: SimOptions) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
        let mut policies = Policies::default();
        let mut short = policies.default.clone();
        short.retention.messages_max = SHORT_RETENTION_MESSAGES;
        policies.namespaces.insert("short".to_owned(), short);
        let server = Server::new(policies, clock.clone(), options.server.clone(), options.bug);
        let mut checker = Checker::default();
        let mut clients = Vec::new();
        for channel in [CHANNEL_KEPT, CHANNEL_SHORT] {
            for _ in 0..2 {
                clients.push(SimClient::new(Role::Publisher {
                    channel: channel.to_owned(),
                }));
            }
            let subscribers = [
                (Guarantee::ExactlyOnce, None),
                (Guarantee::ExactlyOnce, None),
                (Guarantee::ExactlyOnce, Some("noise")),
                (Guarantee::AtMostOnce, None),
                (Guarantee::AtMostOnce, Some("noise")),
            ];
            for (guarantee, rejects_kind) in subscribers {
                checker.subscriber(clients.len(), channel, guarantee, rejects_kind);
                clients.push(SimClient::new(Role::Subscriber {
                    channel: channel.to_owned(),
                    guarantee,
                    rejects_kind: rejects_kind.map(str::to_owned),
                }));
            }
        }
        // Clients come up at different times, some before the first publish.
        for client in &mut clients {
            client.reconnect_at_ms = rng.random_range(0..200);
        }
        Sim {
            rng,
            now_ms: 0,
            step: 0,
            clock,
            options,
            server,
            clients,
            wires: BTreeMap::new(),
            next_connection: 1,
            restart_at_ms: None,
            checker,
            summary: Summary {
                seed,
                ..Summary::default()
            },
            trace_client: std::env::var("HERALD_SIM_TRACE")
                .ok()
                .and_then(|text| text.parse().ok()),
        }
    }

    fn failure(&self) -> Failure {
        Failure {
            seed: self.summary.seed,
            violations: self.checker.violations.clone(),
        }
    }

    fn tick(&mut self, active: bool) {
        self.step += 1;
        let elapsed_ms = self.rng.random_range(1..=4);
        self.now_ms += elapsed_ms;
        self.clock.advance_ms(elapsed_ms);
        if active {
            self.inject_faults();
        }
        if self.server.is_poisoned() && self.restart_at_ms.is_none() {
            let after_ms = if active {
                self.rng.random_range(10..=self.options.poisoned_ms_max)
            } else {
                0
            };
            self.restart_at_ms = Some(self.now_ms + after_ms);
        }
        if self.restart_at_ms.is_some_and(|at| at <= self.now_ms) {
            self.restart_at_ms = None;
            self.crash();
        }
        for index in 0..self.clients.len() {
            self.run_client(index, active);
        }
        // Client -> server: every frame that has arrived.
        let connections: Vec<u64> = self.wires.keys().copied().collect();
        for connection in &connections {
            while let Some(wire) = self.wires.get_mut(connection)
                && let Some(frame) = wire.up.pop_due(self.now_ms)
            {
                self.server
                    .receive(*connection, &frame, self.now_ms, &mut self.rng);
            }
        }
        self.server.step(self.now_ms, &mut self.rng);
        // Server -> client: as much as the socket buffers take.
        for connection in &connections {
            let Some(wire) = self.wires.get_mut(connection) else {
                continue;
            };
            let room = self
                .options
                .link_window_frames
                .saturating_sub(wire.down.len());
            for frame in self.server.take_outbound(*connection, room) {
                let delay_ms = wire.base_delay_ms + self.rng.random_range(0..=10);
                wire.down.push(self.now_ms, delay_ms, frame);
            }
        }
    }

    fn inject_faults(&mut self) {
        if self.rng.random_bool(self.options.cut_chance) && !self.wires.is_empty() {
            let index = self.rng.random_range(0..self.wires.len());
            let connection = *self.wires.keys().nth(index).expect("in range");
            self.cut(connection);
            self.summary.cuts += 1;
        }
        if self.rng.random_bool(self.options.pause_chance) {
            let index = self.rng.random_range(0..self.clients.len());
            let pause_ms = self.rng.random_range(20..=600);
            self.clients[index].paused_until_ms = self.now_ms + pause_ms;
            self.summary.pauses += 1;
        }
        if self.rng.random_bool(self.options.crash_chance) {
            self.crash();
        }
        if self.rng.random_bool(self.options.wipe_chance) {
            self.checker.on_wipe();
            for connection in self.server.wipe_and_restart() {
                self.cut(connection);
            }
            for connection in self.wires.keys().copied().collect::<Vec<_>>() {
                self.cut(connection);
            }
        }
        if self.rng.random_bool(self.options.append_failure_chance) && !self.server.is_poisoned() {
            self.server.fail_next_append();
        }
    }

    /// The server dies and comes back: every connection is cut.
    fn crash(&mut self) {
        for connection in self.server.crash_and_restart() {
            self.cut(connection);
        }
        // Wires the server had not seen yet (a connect still in flight) are gone too.
        for connection in self.wires.keys().copied().collect::<Vec<_>>() {
            self.cut(connection);
        }
    }

    fn cut(&mut self, connection: u64) {
        let Some(wire) = self.wires.remove(&connection) else {
            return;
        };
        if self.trace_client == Some(wire.client) {
            eprintln!("{:>6} ms  -- connection {connection} cut", self.now_ms);
        }
        self.server.close(connection);
        let client = &mut self.clients[wire.client];
        client.connection = None;
        client.session.on_disconnected();
        client.reconnect_at_ms = self.now_ms + self.rng.random_range(5..=200);
    }

    fn run_client(&mut self, index: usize, active: bool) {
        let now_ms = self.now_ms;
        if self.clients[index].connection.is_none() {
            if now_ms < self.clients[index].reconnect_at_ms {
                return;
            }
            let connection = self.next_connection;
            self.next_connection += 1;
            self.server.open(connection);
            let base_delay_ms = self.rng.random_range(1..=30);
            self.wires.insert(
                connection,
                Wire {
                    client: index,
                    up: Link::default(),
                    down: Link::default(),
                    base_delay_ms,
                },
            );
            self.clients[index].connection = Some(connection);
            self.send(index, vec![SimClient::connect_frame()]);
        }
        if now_ms >= self.clients[index].paused_until_ms {
            for _ in 0..16 {
                let Some(connection) = self.clients[index].connection else {
                    break;
                };
                let Some(text) = self
                    .wires
                    .get_mut(&connection)
                    .and_then(|wire| wire.down.pop_due(now_ms))
                else {
                    break;
                };
                if self.trace_client == Some(index) {
                    eprintln!("{:>6} ms  <- {text}", self.now_ms);
                }
                let frame = ServerFrame::from_json(&text)
                    .unwrap_or_else(|error| panic!("the server sent a bad frame {text}: {error}"));
                if let ServerFrame::Connected(_) = frame {
                    let frames = self.clients[index].session.on_connected();
                    self.send(index, frames);
                    continue;
                }
                let outputs = self.clients[index].session.handle(frame);
                self.outputs(index, outputs);
            }
        }
        if self.clients[index]
            .retry_at_ms
            .is_some_and(|at| at <= now_ms)
        {
            self.clients[index].retry_at_ms = None;
            let frames = self.clients[index].session.retry_waiting();
            self.send(index, frames);
        }
        if active && self.rng.random_bool(self.options.resubscribe_chance) {
            let frames = self.clients[index].resubscribe();
            if !frames.is_empty() {
                self.summary.resubscribes += 1;
            }
            self.send(index, frames);
        }
        if active
            && self.rng.random_bool(self.options.publish_chance)
            && self.clients[index].published < self.options.messages_per_publisher
            && self.clients[index].session.publishes_pending() < 8
        {
            let noise = self.rng.random_bool(0.3);
            let ttl_s = self.rng.random_bool(0.1).then_some(1);
            let frames = self.clients[index].publish(index, noise, ttl_s);
            self.send(index, frames);
        }
    }

    fn outputs(&mut self, index: usize, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Event { channel, event } => {
                    self.checker.on_event(self.step, index, &channel, &event);
                }
                Output::Acked { req, ack } => {
                    let channel = self.clients[index]
                        .requests
                        .remove(&req)
                        .expect("every publish is recorded");
                    if !ack.duplicate {
                        self.summary.acked += 1;
                    }
                    self.checker.on_ack(self.step, index, &channel, &ack);
                }
                Output::PublishFailed { req, error } => {
                    self.checker.violations.push(format!(
                        "step {}: client {index}: publish {req} failed for good: {error:?}",
                        self.step
                    ));
                }
                Output::Send(frame) => self.send(index, vec![frame]),
                Output::RetryLater => {
                    let at = self.now_ms + self.rng.random_range(20..=100);
                    let client = &mut self.clients[index];
                    client.retry_at_ms = Some(client.retry_at_ms.map_or(at, |old| old.min(at)));
                }
                Output::ConnectionError(error) => {
                    self.checker.violations.push(format!(
                        "step {}: client {index}: connection error {error:?}",
                        self.step
                    ));
                }
                // The simulation has no at-least-once subscribers (yet).
                Output::Delivery { .. }
                | Output::AckConfirmed { .. }
                | Output::AckFailed { .. } => {
                    self.checker.violations.push(format!(
                        "step {}: client {index}: an at-least-once output without an at-least-once subscriber",
                        self.step
                    ));
                }
            }
        }
    }

    fn send(&mut self, index: usize, frames: Vec<ClientFrame>) {
        let Some(connection) = self.clients[index].connection else {
            return;
        };
        let Some(wire) = self.wires.get_mut(&connection) else {
            return;
        };
        for frame in frames {
            if self.trace_client == Some(index) {
                eprintln!("{:>6} ms  -> {}", self.now_ms, frame.to_json());
            }
            let delay_ms = wire.base_delay_ms + self.rng.random_range(0..=10);
            wire.up.push(self.now_ms, delay_ms, frame.to_json());
        }
    }

    /// Everything settled: every client connected with nothing pending, every frame
    /// delivered, the server idle, every exactly-once subscriber at its channel's top.
    fn drained(&self) -> bool {
        self.restart_at_ms.is_none()
            && self.server.is_quiet()
            && self
                .wires
                .values()
                .all(|wire| wire.up.is_empty() && wire.down.is_empty())
            && self
                .clients
                .iter()
                .all(|client| self.client_settled(client))
    }

    fn client_settled(&self, client: &SimClient) -> bool {
        if client.connection.is_none()
            || !client.session.is_connected()
            || client.session.publishes_pending() > 0
            || client.retry_at_ms.is_some()
        {
            return false;
        }
        let Role::Subscriber {
            channel, guarantee, ..
        } = &client.role
        else {
            return true;
        };
        if *guarantee != Guarantee::ExactlyOnce {
            return true;
        }
        let name = ChannelName::parse(channel).expect("valid");
        match self.server.store().channel_status(&name).expect("status") {
            None => true,
            Some(status) => client.session.position(channel) == Some(&status.top),
        }
    }

    fn describe_stuck(&self) -> String {
        let clients: Vec<String> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, client)| !self.client_settled(client))
            .map(|(index, client)| {
                format!(
                    "client {index} {:?}: connected {}, pending publishes {}, position {:?}",
                    client.role,
                    client.session.is_connected(),
                    client.session.publishes_pending(),
                    match &client.role {
                        Role::Subscriber { channel, .. } =>
                            client.session.position(channel).cloned(),
                        Role::Publisher { .. } => None,
                    }
                )
            })
            .collect();
        format!(
            "server quiet: {}; unsettled clients: {clients:?}",
            self.server.is_quiet()
        )
    }
}
