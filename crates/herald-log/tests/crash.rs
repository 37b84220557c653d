//! Crash tests: the embedded log on [`SimFs`] loses power at a random moment under concurrent
//! publish load, restarts, and must keep every promise it made. The same load and checks run
//! against the memory store, whose "disk" is its record image and whose restart rebuilds every
//! index from it.
//!
//! Per seed: several cycles of (open + recover, check, load with a power cut after a random
//! number of filesystem operations, crash). The crash drops everything unsynced and may tear
//! the last write. After each recovery:
//! - every acknowledged message is present, at the position it was acknowledged with;
//! - no id appears twice on a channel, serials are contiguous from 1 and the chain verifies
//!   from genesis to the top;
//! - every batch is either wholly present, with consecutive serials, or wholly absent;
//! - every stored message is one a client sent, with its content;
//! - each client's durable subscriber (saved and sometimes removed between publishes, riding
//!   the same group commits) is in the state of its last acknowledged save or removal, or of
//!   one issued after it whose outcome is unknown: never older, never torn; and so is its
//!   session state record (saved or removed after each acknowledged subscriber change).
//!
//! `HERALD_CRASH_SEEDS=N` runs N seeds (default 64); `HERALD_CRASH_SEED=S` runs only seed S.
//! A seed fixes the power-cut point and what the crash keeps; thread interleaving is up to
//! the OS, so a failing seed is a strong hint rather than an exact replay.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use herald_core::{
    ChainHash, ChannelName, Data, Epoch, Headers, Message, MessageId, NewMessage, Policies,
    Position, ReadFrom, Serial, SubscriberId, SubscriberOptions, SubscriberState, Timestamp,
};
use herald_log::{
    AppendError, Clock, EmbeddedLog, EmbeddedOptions, LogStore, ManualClock, MemoryStore,
    ReadQuery, SimFs,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHANNELS: [&str; 3] = ["chat:a", "chat:b", "chat:c"];
const CLIENTS: usize = 4;
const BATCHES_PER_CLIENT: usize = 25;
const CYCLES: u64 = 3;
/// The power cut lands within this many filesystem operations of the load starting.
const POWER_CUT_OPERATIONS_MAX: u64 = 300;

fn options() -> EmbeddedOptions {
    // Tiny segments so that crashes also land inside rollovers.
    EmbeddedOptions {
        segment_bytes: 16 * 1024,
        group_bytes_max: 4096,
        queue_depth: 256,
    }
}

/// One publish batch as a client built it; retries resend exactly this.
#[derive(Clone, Debug)]
struct Batch {
    channel: ChannelName,
    messages: Vec<NewMessage>,
}

/// What the clients were told and what they tried, across all cycles of one seed.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<(ChannelName, MessageId), Position>,
    sent: BTreeMap<(ChannelName, MessageId), Data>,
    batches: Vec<Batch>,
    /// Batches whose outcome is unknown (refused because the store died): retried later.
    unresolved: Vec<Batch>,
    /// Batches acknowledged before; re-sending one must answer "duplicate".
    resolved: Vec<Batch>,
}

/// Per client: its durable subscriber's history.
type Subscribers = Mutex<BTreeMap<usize, SubscriberLedger>>;

/// One client's subscriber: the state after each save or removal it issued (`None`: removed),
/// and the index of the last one acknowledged; and the same for its session state record.
#[derive(Default)]
struct SubscriberLedger {
    outcomes: Vec<Option<SubscriberState>>,
    acked: Option<usize>,
    session: SessionLedger,
}

/// One client's state record (`session_key`): the value after each save or removal issued
/// (`None`: removed), and the index of the last one acknowledged.
#[derive(Default)]
struct SessionLedger {
    outcomes: Vec<Option<Bytes>>,
    acked: Option<usize>,
}

fn session_key(client: usize) -> String {
    format!("session/client-{client}")
}

/// A distinct value per version, spanning a few sectors so that a crash can tear it.
fn session_version(client: usize, version: usize) -> Bytes {
    Bytes::from(format!("client {client} version {version};").repeat(40))
}

fn subscriber_key(client: usize) -> (ChannelName, SubscriberId) {
    (
        ChannelName::parse(CHANNELS[client % CHANNELS.len()]).unwrap(),
        SubscriberId::parse(&format!("worker-{client}")).unwrap(),
    )
}

/// A distinct state for each version, with individually acked serials and attempts.
fn subscriber_version(client: usize, version: u64) -> SubscriberState {
    let (channel, id) = subscriber_key(client);
    let mut state = SubscriberState::new(
        channel,
        id,
        Position::new(Epoch::parse("E1").unwrap(), Serial(version * 3)),
        SubscriberOptions::default(),
        Timestamp(1_700_000_000_000),
    );
    state.ack_one(Serial(version * 3 + 2));
    state.record_attempt(Serial(version * 3 + 1));
    state.last_active = Timestamp(1_700_000_000_000 + version);
    state
}

fn new_batch(rng: &mut StdRng, tag: &str) -> Batch {
    let channel = ChannelName::parse(CHANNELS[rng.random_range(0..CHANNELS.len())]).unwrap();
    let size = rng.random_range(1..=4);
    let messages = (0..size)
        .map(|index| NewMessage {
            id: MessageId::parse(&format!("{tag}-{index}")).unwrap(),
            name: None,
            headers: Headers::new(),
            data: Data::Json(Bytes::from(format!(
                "\"{tag}-{index}-{}\"",
                rng.random::<u32>()
            ))),
            ttl_ms: None,
        })
        .collect();
    Batch { channel, messages }
}

fn read_all(store: &dyn LogStore, channel: &ChannelName) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut from = ReadFrom::Oldest;
    loop {
        let page = store
            .read(channel, &ReadQuery::Forward { from, limit: 1000 })
            .unwrap();
        messages.extend(page.messages);
        match page.next {
            Some(next) if page.more => from = ReadFrom::After(next),
            _ => return messages,
        }
    }
}

fn verify(store: &dyn LogStore, ledger: &Ledger) {
    let mut serial_of: BTreeMap<(ChannelName, MessageId), Serial> = BTreeMap::new();
    for name in CHANNELS {
        let channel = ChannelName::parse(name).unwrap();
        let messages = read_all(store, &channel);
        let mut ids = HashSet::new();
        let mut chain = messages
            .first()
            .map(|first| ChainHash::genesis(&first.epoch));
        for (index, message) in messages.iter().enumerate() {
            assert_eq!(
                message.serial,
                Serial(index as u64 + 1),
                "contiguous serials"
            );
            assert_eq!(message.epoch, messages[0].epoch, "one epoch");
            assert!(
                ids.insert(message.id.clone()),
                "duplicate id {}",
                message.id
            );
            let next =
                chain
                    .expect("chain started")
                    .next(message.serial, &message.id, &message.data);
            assert_eq!(next, message.chain, "chain breaks at {}", message.serial);
            chain = Some(next);
            let key = (channel.clone(), message.id.clone());
            let sent = ledger
                .sent
                .get(&key)
                .unwrap_or_else(|| panic!("{} was never sent", message.id));
            assert_eq!(&message.data, sent, "content of {}", message.id);
            serial_of.insert(key, message.serial);
        }
    }
    for ((channel, id), position) in &ledger.acked {
        let found = serial_of.get(&(channel.clone(), id.clone()));
        assert_eq!(
            found,
            Some(&position.serial),
            "acknowledged {id} on {channel} lost or moved"
        );
        let by_id = store.message_by_id(channel, id).unwrap().expect("by id");
        assert_eq!(&by_id.position(), position);
    }
    for batch in &ledger.batches {
        let serials: Vec<Option<&Serial>> = batch
            .messages
            .iter()
            .map(|new| serial_of.get(&(batch.channel.clone(), new.id.clone())))
            .collect();
        let present = serials.iter().filter(|serial| serial.is_some()).count();
        assert!(
            present == 0 || present == serials.len(),
            "partial batch visible on {}: {serials:?}",
            batch.channel
        );
        if present > 0 {
            for pair in serials.windows(2) {
                assert_eq!(
                    pair[1].unwrap().0,
                    pair[0].unwrap().0 + 1,
                    "batch not contiguous"
                );
            }
        }
    }
}

/// Each client's subscriber is in the state of its last acknowledged change or of a later one
/// whose outcome is unknown, whole; no other subscriber exists.
fn verify_subscribers(store: &dyn LogStore, subscribers: &BTreeMap<usize, SubscriberLedger>) {
    let mut live = 0;
    for (client, history) in subscribers {
        let (channel, id) = subscriber_key(*client);
        let found = store.subscriber(&channel, &id);
        let allowed = match history.acked {
            Some(acked) => &history.outcomes[acked..],
            None => &history.outcomes[..],
        };
        assert!(
            allowed.contains(&found) || (history.acked.is_none() && found.is_none()),
            "subscriber of client {client} recovered as {found:?}, acknowledged {:?}",
            history.acked.map(|acked| &history.outcomes[acked])
        );
        live += usize::from(found.is_some());
    }
    assert_eq!(store.subscribers().len(), live, "no stray subscribers");
    let mut live = 0;
    for (client, history) in subscribers {
        let history = &history.session;
        let found = store.state(&session_key(*client));
        let allowed = match history.acked {
            Some(acked) => &history.outcomes[acked..],
            None => &history.outcomes[..],
        };
        assert!(
            allowed.contains(&found) || (history.acked.is_none() && found.is_none()),
            "session of client {client} recovered as {found:?}, acknowledged {:?}",
            history.acked.map(|acked| &history.outcomes[acked])
        );
        live += usize::from(found.is_some());
    }
    assert_eq!(store.states("session/").len(), live, "no stray sessions");
}

/// One client's load: fresh batches, retries of unresolved ones, and re-sends of acknowledged
/// ones (which must come back as duplicates at the same positions).
fn client(
    store: &dyn LogStore,
    ledger: &Mutex<Ledger>,
    subscribers: &Subscribers,
    seed: u64,
    cycle: u64,
    client: usize,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (cycle << 32) ^ (client as u64) << 48);
    for round in 0..BATCHES_PER_CLIENT {
        let mut resend = false;
        let batch = {
            let mut ledger = ledger.lock().unwrap();
            let choice = rng.random_range(0..10);
            if choice == 0 && !ledger.unresolved.is_empty() {
                let index = rng.random_range(0..ledger.unresolved.len());
                ledger.unresolved.swap_remove(index)
            } else if choice == 1 && !ledger.resolved.is_empty() {
                let index = rng.random_range(0..ledger.resolved.len());
                resend = true;
                ledger.resolved[index].clone()
            } else {
                let batch = new_batch(&mut rng, &format!("s{seed}c{cycle}k{client}r{round}"));
                for new in &batch.messages {
                    ledger
                        .sent
                        .insert((batch.channel.clone(), new.id.clone()), new.data.clone());
                }
                ledger.batches.push(batch.clone());
                batch
            }
        };
        let result = store
            .append(batch.channel.clone(), batch.messages.clone())
            .wait();
        let mut ledger = ledger.lock().unwrap();
        match result {
            Ok(replies) => {
                assert_eq!(replies.len(), batch.messages.len());
                for (reply, new) in replies.iter().zip(&batch.messages) {
                    assert_eq!(reply.id, new.id);
                    let key = (batch.channel.clone(), new.id.clone());
                    assert!(
                        !resend || reply.duplicate,
                        "re-sent {} not a duplicate",
                        new.id
                    );
                    if let Some(earlier) = ledger.acked.get(&key) {
                        assert_eq!(earlier, &reply.position, "duplicate moved {}", new.id);
                    }
                    ledger.acked.insert(key, reply.position.clone());
                }
                if !resend {
                    ledger.resolved.push(batch);
                }
            }
            Err(AppendError::Poisoned(_) | AppendError::Closed) => {
                // The outcome is unknown; a later cycle retries it with the same ids.
                ledger.unresolved.push(batch);
                return;
            }
            Err(other) => panic!("unexpected refusal: {other}"),
        }
        drop(ledger);
        if rng.random_range(0..2) == 0 && !subscriber_step(store, subscribers, &mut rng, client) {
            return;
        }
    }
}

/// Saves (or now and then removes) the client's subscriber; `false` when the store refused
/// because it died (the outcome is unknown).
fn subscriber_step(
    store: &dyn LogStore,
    subscribers: &Subscribers,
    rng: &mut StdRng,
    client: usize,
) -> bool {
    let (channel, id) = subscriber_key(client);
    let (index, outcome) = {
        let mut subscribers = subscribers.lock().unwrap();
        let history = subscribers.entry(client).or_default();
        let outcome = if rng.random_range(0..5) == 0 {
            None
        } else {
            Some(subscriber_version(client, history.outcomes.len() as u64))
        };
        history.outcomes.push(outcome.clone());
        (history.outcomes.len() - 1, outcome)
    };
    let ticket = match outcome {
        Some(state) => store.save_subscriber(state),
        None => store.remove_subscriber(&channel, &id),
    };
    match ticket.wait() {
        Ok(()) => {
            let mut subscribers = subscribers.lock().unwrap();
            let history = subscribers.get_mut(&client).expect("history exists");
            history.acked = Some(index);
        }
        Err(AppendError::Poisoned(_) | AppendError::Closed) => return false,
        Err(other) => panic!("unexpected refusal of a subscriber save: {other}"),
    }
    session_step(store, subscribers, rng, client)
}

/// Saves (or now and then removes) the client's session state record; `false` when the store
/// refused because it died (the outcome is unknown).
fn session_step(
    store: &dyn LogStore,
    subscribers: &Subscribers,
    rng: &mut StdRng,
    client: usize,
) -> bool {
    let (index, outcome) = {
        let mut subscribers = subscribers.lock().unwrap();
        let history = &mut subscribers.entry(client).or_default().session;
        let outcome = if rng.random_range(0..5) == 0 {
            None
        } else {
            Some(session_version(client, history.outcomes.len()))
        };
        history.outcomes.push(outcome.clone());
        (history.outcomes.len() - 1, outcome)
    };
    let ticket = match outcome {
        Some(value) => store.save_state(&session_key(client), value),
        None => store.remove_state(&session_key(client)),
    };
    match ticket.wait() {
        Ok(()) => {
            let mut subscribers = subscribers.lock().unwrap();
            let history = &mut subscribers
                .get_mut(&client)
                .expect("history exists")
                .session;
            history.acked = Some(index);
            true
        }
        Err(AppendError::Poisoned(_) | AppendError::Closed) => false,
        Err(other) => panic!("unexpected refusal of a state save: {other}"),
    }
}

fn open(fs: &SimFs, clock: &Arc<ManualClock>) -> EmbeddedLog {
    EmbeddedLog::open_with_fs(
        Arc::new(fs.clone()),
        Path::new("/herald"),
        options(),
        Policies::default(),
        clock.clone() as Arc<dyn Clock>,
    )
    .unwrap_or_else(|error| panic!("recovery refused to open: {error}"))
}

/// Runs one seed; returns how many messages were acknowledged.
fn run_seed(seed: u64) -> usize {
    struct ReportSeed(u64);
    impl Drop for ReportSeed {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "crash test failed for seed {0}; rerun: HERALD_CRASH_SEED={0}",
                    self.0
                );
            }
        }
    }
    let _report = ReportSeed(seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
    let ledger = Mutex::new(Ledger::default());
    let subscribers = Subscribers::default();
    let mut fs = SimFs::new();
    for cycle in 0..CYCLES {
        let store = open(&fs, &clock);
        verify(&store, &ledger.lock().unwrap());
        verify_subscribers(&store, &subscribers.lock().unwrap());
        fs.lose_power_after(rng.random_range(1..=POWER_CUT_OPERATIONS_MAX));
        std::thread::scope(|scope| {
            for index in 0..CLIENTS {
                let (store, ledger, subscribers) = (&store, &ledger, &subscribers);
                scope.spawn(move || client(store, ledger, subscribers, seed, cycle, index));
            }
        });
        clock.advance_ms(1000);
        let crashed = fs.crash(rng.random());
        drop(store);
        fs = crashed;
    }
    let store = open(&fs, &clock);
    let ledger = ledger.into_inner().unwrap();
    verify(&store, &ledger);
    verify_subscribers(&store, &subscribers.into_inner().unwrap());
    ledger.acked.len()
}

/// The same load, crashes and checks on the memory store: power is "lost" after a random
/// number of appends (every later append is refused), then the store restarts from its image.
fn run_seed_memory(seed: u64) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
    let ledger = Mutex::new(Ledger::default());
    let subscribers = Subscribers::default();
    let mut store = MemoryStore::new(Policies::default(), clock.clone() as Arc<dyn Clock>);
    for cycle in 0..CYCLES {
        verify(&store, &ledger.lock().unwrap());
        verify_subscribers(&store, &subscribers.lock().unwrap());
        store.fail_after_appends(rng.random_range(1..=POWER_CUT_APPENDS_MAX), "power lost");
        std::thread::scope(|scope| {
            for index in 0..CLIENTS {
                let (store, ledger, subscribers) = (&store, &ledger, &subscribers);
                scope.spawn(move || client(store, ledger, subscribers, seed, cycle, index));
            }
        });
        clock.advance_ms(1000);
        store = store
            .crash_and_recover()
            .unwrap_or_else(|error| panic!("seed {seed}: recovery refused: {error}"));
    }
    let ledger = ledger.into_inner().unwrap();
    verify(&store, &ledger);
    verify_subscribers(&store, &subscribers.into_inner().unwrap());
    ledger.acked.len()
}

/// The memory store's power cut lands within this many appends of the load starting.
const POWER_CUT_APPENDS_MAX: u64 = 80;

#[test]
fn memory_store_keeps_acknowledged_messages_across_crashes() {
    if let Ok(seed) = std::env::var("HERALD_CRASH_SEED") {
        run_seed_memory(seed.parse().expect("HERALD_CRASH_SEED is a number"));
        return;
    }
    let seeds: u64 = std::env::var("HERALD_CRASH_SEEDS")
        .map(|count| count.parse().expect("HERALD_CRASH_SEEDS is a number"))
        .unwrap_or(64);
    let acked: usize = (0..seeds).map(run_seed_memory).sum();
    eprintln!("memory store: {seeds} seeds, {acked} acknowledged messages checked across crashes");
    assert!(
        acked as u64 > seeds * 10,
        "too few acknowledgements: {acked}"
    );
}

// ----- power loss while reclaim deletes segments ---------------------------------------------

/// Channels in a namespace with short retention, so reclaim deletes segments under the load.
const YOUNG_CHANNELS: [&str; 2] = ["young:a", "young:b"];
const YOUNG_AGE_MS: u64 = 90_000;
/// How far the test clock jumps before each reclaim.
const RECLAIM_STEP_MS: u64 = 30_000;
const RECLAIMS_PER_CYCLE: usize = 12;

fn young_policies() -> Policies {
    let mut policies = Policies::default();
    policies.namespaces.insert(
        "young".into(),
        herald_core::NamespacePolicy {
            retention: herald_core::Retention {
                max_age_ms: YOUNG_AGE_MS,
                ..herald_core::Retention::default()
            },
            ..herald_core::NamespacePolicy::default()
        },
    );
    policies
}

/// What the clients of the reclaim test were told.
#[derive(Default)]
struct YoungLedger {
    /// Acknowledged position and the clock before the append was sent (a lower bound on the
    /// message's time).
    acked: BTreeMap<(ChannelName, MessageId), (Position, Timestamp)>,
    sent: BTreeMap<(ChannelName, MessageId), Data>,
}

fn verify_young(store: &dyn LogStore, ledger: &YoungLedger, now: Timestamp) {
    for name in YOUNG_CHANNELS {
        let channel = ChannelName::parse(name).unwrap();
        let acked: Vec<&(Position, Timestamp)> = ledger
            .acked
            .iter()
            .filter(|((acked_channel, _), _)| acked_channel == &channel)
            .map(|(_, value)| value)
            .collect();
        let Some(highest) = acked.iter().map(|(position, _)| position.serial).max() else {
            continue;
        };
        // Reclaimed or not, the stream keeps its epoch and never goes back.
        let status = store
            .channel_status(&channel)
            .unwrap()
            .expect("a channel with acknowledged messages exists");
        for (position, _) in &acked {
            assert_eq!(position.epoch, status.epoch, "epoch of {name} changed");
        }
        assert!(
            status.top.serial >= highest,
            "{name} went back below {highest}"
        );
        let messages = read_all(store, &channel);
        for pair in messages.windows(2) {
            assert_eq!(pair[1].serial, pair[0].serial.next(), "contiguous serials");
            let expected = pair[0]
                .chain
                .next(pair[1].serial, &pair[1].id, &pair[1].data);
            assert_eq!(
                expected, pair[1].chain,
                "chain breaks at {}",
                pair[1].serial
            );
        }
        let visible: BTreeMap<&MessageId, &Message> = messages
            .iter()
            .map(|message| (&message.id, message))
            .collect();
        for message in &messages {
            let sent = &ledger.sent[&(channel.clone(), message.id.clone())];
            assert_eq!(&message.data, sent, "content of {}", message.id);
        }
        // Whatever is certainly still within retention must be there, where it was acked.
        for ((acked_channel, id), (position, sent_at)) in &ledger.acked {
            if acked_channel == &channel && sent_at.plus_ms(YOUNG_AGE_MS) > now {
                let message = visible
                    .get(id)
                    .unwrap_or_else(|| panic!("retained {id} on {name} lost"));
                assert_eq!(&message.position(), position, "{id} moved");
            }
        }
    }
}

fn young_client(
    store: &EmbeddedLog,
    ledger: &Mutex<YoungLedger>,
    subscribers: &Subscribers,
    clock: &ManualClock,
    tag: &str,
    seed: u64,
    client: usize,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..BATCHES_PER_CLIENT {
        let channel = ChannelName::parse(YOUNG_CHANNELS[rng.random_range(0..2)]).unwrap();
        let mut batch = new_batch(&mut rng, &format!("{tag}r{round}"));
        batch.channel = channel.clone();
        {
            let mut ledger = ledger.lock().unwrap();
            for new in &batch.messages {
                ledger
                    .sent
                    .insert((channel.clone(), new.id.clone()), new.data.clone());
            }
        }
        let sent_at = clock.now();
        match store.append(channel.clone(), batch.messages.clone()).wait() {
            Ok(replies) => {
                let mut ledger = ledger.lock().unwrap();
                for (reply, new) in replies.iter().zip(&batch.messages) {
                    ledger.acked.insert(
                        (channel.clone(), new.id.clone()),
                        (reply.position.clone(), sent_at),
                    );
                }
            }
            Err(AppendError::Poisoned(_) | AppendError::Closed) => return,
            Err(other) => panic!("unexpected refusal: {other}"),
        }
        // Snapshots land in the segments reclaim deletes: it must rewrite the live ones.
        if rng.random_range(0..2) == 0 && !subscriber_step(store, subscribers, &mut rng, client) {
            return;
        }
    }
}

fn run_reclaim_seed(seed: u64) -> usize {
    struct ReportSeed(u64);
    impl Drop for ReportSeed {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "reclaim crash test failed for seed {0}; rerun: HERALD_CRASH_SEED={0}",
                    self.0
                );
            }
        }
    }
    let _report = ReportSeed(seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
    let ledger = Mutex::new(YoungLedger::default());
    let subscribers = Subscribers::default();
    let mut fs = SimFs::new();
    let open = |fs: &SimFs| {
        EmbeddedLog::open_with_fs(
            Arc::new(fs.clone()),
            Path::new("/herald"),
            options(),
            young_policies(),
            clock.clone() as Arc<dyn Clock>,
        )
        .unwrap_or_else(|error| panic!("recovery refused to open: {error}"))
    };
    let mut reclaimed = 0;
    for cycle in 0..CYCLES {
        let store = open(&fs);
        verify_young(&store, &ledger.lock().unwrap(), clock.now());
        verify_subscribers(&store, &subscribers.lock().unwrap());
        fs.lose_power_after(rng.random_range(1..=POWER_CUT_OPERATIONS_MAX));
        std::thread::scope(|scope| {
            for index in 0..CLIENTS {
                let (store, ledger, clock, subscribers) = (&store, &ledger, &*clock, &subscribers);
                let tag = format!("s{seed}c{cycle}k{index}");
                let client_seed = seed ^ (cycle << 32) ^ ((index as u64) << 48);
                scope.spawn(move || {
                    young_client(store, ledger, subscribers, clock, &tag, client_seed, index)
                });
            }
            for _ in 0..RECLAIMS_PER_CYCLE {
                std::thread::sleep(std::time::Duration::from_micros(500));
                clock.advance_ms(RECLAIM_STEP_MS);
                match store.reclaim() {
                    Ok(dropped) => reclaimed += dropped,
                    Err(_) => break,
                }
            }
        });
        let crashed = fs.crash(rng.random());
        drop(store);
        fs = crashed;
    }
    let store = open(&fs);
    verify_young(&store, &ledger.lock().unwrap(), clock.now());
    verify_subscribers(&store, &subscribers.lock().unwrap());
    reclaimed
}

#[test]
fn reclaim_survives_power_loss() {
    if let Ok(seed) = std::env::var("HERALD_CRASH_SEED") {
        run_reclaim_seed(seed.parse().expect("HERALD_CRASH_SEED is a number"));
        return;
    }
    let seeds: u64 = std::env::var("HERALD_CRASH_SEEDS")
        .map(|count| count.parse().expect("HERALD_CRASH_SEEDS is a number"))
        .unwrap_or(64);
    let reclaimed: usize = (0..seeds).map(run_reclaim_seed).sum();
    eprintln!("{seeds} seeds, {reclaimed} messages reclaimed between crashes");
    // Without segments actually being deleted this test would check nothing about reclaim.
    assert!(reclaimed > 0, "no segment was ever reclaimed");
}

#[test]
fn acknowledged_messages_survive_power_loss() {
    if let Ok(seed) = std::env::var("HERALD_CRASH_SEED") {
        let acked = run_seed(seed.parse().expect("HERALD_CRASH_SEED is a number"));
        eprintln!("{acked} acknowledged messages checked across crashes");
        return;
    }
    let seeds: u64 = std::env::var("HERALD_CRASH_SEEDS")
        .map(|count| count.parse().expect("HERALD_CRASH_SEEDS is a number"))
        .unwrap_or(64);
    let acked: usize = (0..seeds).map(run_seed).sum();
    eprintln!("{seeds} seeds, {acked} acknowledged messages checked across crashes");
    // A load that never gets anything acknowledged would make every check above vacuous.
    assert!(
        acked as u64 > seeds * 10,
        "too few acknowledgements: {acked}"
    );
}
