//! The load generator: rumqttc (MQTT 3.1.1) clients, the very same code for every broker.
//!
//! Every PUBLISH payload is `[seq: u64 BE][sent_us: u64 BE][padding]`: `seq` numbers the
//! group's messages from 0 in publish order, `sent_us` is the time the message was (meant to
//! be) handed to the client, in microseconds on this process's monotonic clock
//! ([`clock_us`]). Publisher and subscribers live in the same process, so the difference is a
//! publish-to-deliver latency with no clock skew.
//!
//! # Invariants
//! - Each subscriber's state is written by its own receive task only; the run loop reads it
//!   through atomics (and takes the latency samples once the phase is over).
//! - Latency samples are bounded per subscriber (`Sampling::per_subscriber_max`).
//! - Every wait on a broker (CONNACK, SUBACK, a publish slot, the close) has a timeout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Mutex, OnceLock};

use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet};
use rumqttc::{QoS, SubscribeReasonCode};

use super::*;

/// Bytes of the payload header: the sequence number and the send time.
pub(crate) const PAYLOAD_HEADER_BYTES: usize = 16;
/// CONNACK and SUBACK must arrive within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handing one PUBLISH to the client may wait this long for a slot in the in-flight window.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// A closing client's event loop gets this long to send DISCONNECT.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests queued between a client handle and its event loop.
const REQUEST_CHANNEL_CAPACITY: usize = 64;
/// Keep alive asked of the broker (long: a busy bench must not look idle).
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Subscribers connecting at once.
const CONNECTS_IN_FLIGHT_MAX: usize = 64;
/// rumqttc's `inflight` for subscribers, which publish nothing (its default).
const SUBSCRIBER_PACKET_IDS: u16 = 100;
/// rumqttc's `inflight` for the publisher: the whole packet id space (see [`Publisher`]).
const PUBLISHER_PACKET_IDS: u16 = u16::MAX;

/// The monotonic clock the payload timestamps use: microseconds since its first use.
pub(crate) fn clock_us(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(base).as_micros()).unwrap_or(u64::MAX)
}

/// The payload of message `seq`, `total_bytes` long (at least the header).
pub(crate) fn encode_payload(seq: u64, sent_us: u64, total_bytes: usize) -> Bytes {
    let mut payload = Vec::with_capacity(total_bytes.max(PAYLOAD_HEADER_BYTES));
    payload.extend_from_slice(&seq.to_be_bytes());
    payload.extend_from_slice(&sent_us.to_be_bytes());
    payload.resize(total_bytes.max(PAYLOAD_HEADER_BYTES), b'x');
    Bytes::from(payload)
}

/// `(seq, sent_us)` of a payload, or `None` if it is too short to be one of ours.
pub(crate) fn decode_payload(payload: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let sent_us = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((seq, sent_us))
}

/// The MQTT QoS of a level 0..=2.
pub(crate) fn qos_of(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The subscribers' MQTT session: clean, or persistent (`clean_session = 0`), which Herald
/// saves to its log before each batch of deliveries it sends (Mosquitto, with persistence off,
/// keeps it in memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SessionKind {
    Clean,
    Persistent,
}

impl SessionKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SessionKind::Clean => "clean",
            SessionKind::Persistent => "persistent",
        }
    }

    /// What a case's label adds: nothing for the usual clean session.
    pub(crate) fn label_suffix(self) -> &'static str {
        match self {
            SessionKind::Clean => "",
            SessionKind::Persistent => " persistent",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<SessionKind, String> {
        match text.trim() {
            "clean" => Ok(SessionKind::Clean),
            "persistent" => Ok(SessionKind::Persistent),
            other => Err(format!(
                "unknown session kind {other:?}; expected clean or persistent"
            )),
        }
    }
}

/// Where and how the clients connect.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) port: u16,
    /// MQTT password (Herald: an API key); `None` connects anonymously.
    pub(crate) password: Option<String>,
    /// Size of every PUBLISH payload.
    pub(crate) message_bytes: usize,
    /// The publisher's window of unacknowledged QoS 1/2 publishes.
    pub(crate) inflight: u16,
    /// The subscribers' session (the publisher's is always clean).
    pub(crate) subscriber_session: SessionKind,
}

impl Endpoint {
    /// `packet_ids`: rumqttc's `inflight`, which is also the range its packet ids cycle
    /// through (see [`Publisher`]).
    fn options(&self, client_id: &str, packet_ids: u16, clean_session: bool) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", self.port);
        options.set_keep_alive(KEEP_ALIVE);
        options.set_clean_session(clean_session);
        options.set_inflight(packet_ids);
        let packet_bytes = self.message_bytes + 1024;
        options.set_max_packet_size(packet_bytes, packet_bytes);
        if let Some(password) = &self.password {
            options.set_credentials("bench", password.as_str());
        }
        options
    }

    /// Connects and waits for a successful CONNACK.
    async fn connect(
        &self,
        client_id: &str,
        packet_ids: u16,
        clean_session: bool,
    ) -> anyhow::Result<(AsyncClient, EventLoop)> {
        let (client, mut events) = AsyncClient::new(
            self.options(client_id, packet_ids, clean_session),
            REQUEST_CHANNEL_CAPACITY,
        );
        let connack = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(connack))) => return Ok(connack),
                    Ok(_) => {}
                    Err(error) => return Err(anyhow!("{client_id}: connecting: {error}")),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("{client_id}: no CONNACK within {HANDSHAKE_TIMEOUT:?}"))??;
        if connack.code != ConnectReturnCode::Success {
            bail!("{client_id}: connection refused: {:?}", connack.code);
        }
        Ok((client, events))
    }
}

/// Which deliveries the subscribers keep a latency sample of.
pub(crate) struct Sampling {
    /// Messages sent at or after this [`clock_us`] instant are sampled (`u64::MAX`: none).
    pub(crate) from_us: AtomicU64,
    /// Samples kept per subscriber, at most.
    pub(crate) per_subscriber_max: AtomicUsize,
}

impl Sampling {
    pub(crate) fn off() -> Sampling {
        Sampling {
            from_us: AtomicU64::new(u64::MAX),
            per_subscriber_max: AtomicUsize::new(0),
        }
    }
}

/// What one subscriber received.
#[derive(Default)]
pub(crate) struct SubscriberState {
    /// One past the highest sequence number received.
    next_seq: AtomicU64,
    /// Messages received with a sequence number at or past `next_seq`: new ones.
    delivered: AtomicU64,
    /// Messages received below `next_seq`: a duplicate or one out of order.
    late: AtomicU64,
    /// PUBLISH packets whose payload is not ours.
    malformed: AtomicU64,
    /// Set before the client disconnects on purpose, so the end of its loop is no failure.
    closing: AtomicBool,
    failure: Mutex<Option<String>>,
    latencies_us: Mutex<Vec<u64>>,
}

impl SubscriberState {
    fn record(&self, payload: &[u8], sampling: &Sampling) {
        let received_us = clock_us(Instant::now());
        let Some((seq, sent_us)) = decode_payload(payload) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Only this subscriber's task writes `next_seq`, so load-then-store is race free.
        if seq >= self.next_seq.load(Ordering::Relaxed) {
            self.next_seq.store(seq + 1, Ordering::Relaxed);
            self.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
        if sent_us >= sampling.from_us.load(Ordering::Relaxed) {
            let max = sampling.per_subscriber_max.load(Ordering::Relaxed);
            let mut samples = self.latencies_us.lock().expect("samples lock");
            if samples.len() < max {
                samples.push(received_us.saturating_sub(sent_us));
            }
        }
    }

    fn fail(&self, reason: String) {
        let mut failure = self.failure.lock().expect("failure lock");
        failure.get_or_insert(reason);
    }
}

/// Counters summed over a group's subscribers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupTotals {
    pub(crate) delivered: u64,
    pub(crate) late: u64,
    pub(crate) malformed: u64,
}

impl GroupTotals {
    pub(crate) fn since(self, before: GroupTotals) -> GroupTotals {
        GroupTotals {
            delivered: self.delivered - before.delivered,
            late: self.late - before.late,
            malformed: self.malformed - before.malformed,
        }
    }
}

/// N subscribers of one topic, each a connection with its own receive task.
pub(crate) struct SubscriberGroup {
    states: Vec<Arc<SubscriberState>>,
    clients: Vec<AsyncClient>,
    tasks: tokio::task::JoinSet<()>,
}

impl SubscriberGroup {
    /// Connects `count` subscribers (client ids `<id_prefix>-s<i>`), subscribes each to
    /// `topic` at `qos` and starts receiving. Fails if any connect or SUBACK fails, or if the
    /// broker grants a QoS other than the one asked (the figures would not be the case's).
    pub(crate) async fn open(
        endpoint: &Endpoint,
        id_prefix: &str,
        topic: &str,
        qos: QoS,
        count: usize,
        sampling: &Arc<Sampling>,
    ) -> anyhow::Result<SubscriberGroup> {
        let mut group = SubscriberGroup {
            states: Vec::with_capacity(count),
            clients: Vec::with_capacity(count),
            tasks: tokio::task::JoinSet::new(),
        };
        let mut connecting = tokio::task::JoinSet::new();
        let mut next_index = 0;
        let mut first_error = None;
        while next_index < count || !connecting.is_empty() {
            while next_index < count
                && connecting.len() < CONNECTS_IN_FLIGHT_MAX
                && first_error.is_none()
            {
                let endpoint = endpoint.clone();
                let client_id = format!("{id_prefix}-s{next_index}");
                let topic = topic.to_owned();
                connecting
                    .spawn(async move { subscribe(&endpoint, &client_id, &topic, qos).await });
                next_index += 1;
            }
            if first_error.is_some() {
                next_index = count;
            }
            let Some(joined) = connecting.join_next().await else {
                break;
            };
            match joined.map_err(|error| anyhow!("subscriber task: {error}")) {
                Ok(Ok((client, events))) => {
                    let state = Arc::new(SubscriberState::default());
                    group
                        .tasks
                        .spawn(receive(events, Arc::clone(&state), Arc::clone(sampling)));
                    group.states.push(state);
                    group.clients.push(client);
                }
                Ok(Err(error)) | Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            group.close().await;
            return Err(error);
        }
        Ok(group)
    }

    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    /// The lowest "one past the highest sequence number received" over the subscribers.
    pub(crate) fn min_next_seq(&self) -> u64 {
        self.states
            .iter()
            .map(|state| state.next_seq.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    pub(crate) fn totals(&self) -> GroupTotals {
        let mut totals = GroupTotals::default();
        for state in &self.states {
            totals.delivered += state.delivered.load(Ordering::Relaxed);
            totals.late += state.late.load(Ordering::Relaxed);
            totals.malformed += state.malformed.load(Ordering::Relaxed);
        }
        totals
    }

    /// How many subscribers failed, and the first `shown` reasons.
    pub(crate) fn failures(&self, shown: usize) -> (usize, Vec<String>) {
        let reasons: Vec<String> = self
            .states
            .iter()
            .filter_map(|state| state.failure.lock().expect("failure lock").clone())
            .collect();
        let failed = reasons.len();
        (failed, reasons.into_iter().take(shown).collect())
    }

    /// Moves every subscriber's latency samples out.
    pub(crate) fn take_latencies(&self) -> Vec<u64> {
        let mut all = Vec::new();
        for state in &self.states {
            all.append(&mut state.latencies_us.lock().expect("samples lock"));
        }
        all
    }

    /// Disconnects every subscriber and ends the receive tasks (bounded by [`CLOSE_TIMEOUT`]).
    pub(crate) async fn close(mut self) {
        for state in &self.states {
            state.closing.store(true, Ordering::Relaxed);
        }
        for client in &self.clients {
            let _ = client.try_disconnect();
        }
        let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.shutdown().await;
        }
    }
}

/// One subscriber: connected, subscribed at `qos`, SUBACK checked.
async fn subscribe(
    endpoint: &Endpoint,
    client_id: &str,
    topic: &str,
    qos: QoS,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let clean_session = endpoint.subscriber_session == SessionKind::Clean;
    let (client, mut events) = endpoint
        .connect(client_id, SUBSCRIBER_PACKET_IDS, clean_session)
        .await?;
    client
        .subscribe(topic, qos)
        .await
        .map_err(|error| anyhow!("{client_id}: subscribing: {error}"))?;
    let suback = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(suback))) => return Ok(suback),
                Ok(_) => {}
                Err(error) => return Err(anyhow!("{client_id}: subscribing: {error}")),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("{client_id}: no SUBACK within {HANDSHAKE_TIMEOUT:?}"))??;
    match suback.return_codes.as_slice() {
        [SubscribeReasonCode::Success(granted)] if *granted == qos => Ok((client, events)),
        codes => bail!("{client_id}: subscribing to {topic} at {qos:?} was answered {codes:?}"),
    }
}

/// A subscriber's receive loop: every PUBLISH is recorded (rumqttc sends PUBACK, or PUBREC
/// and PUBCOMP, by itself). Ends when the connection does (after a DISCONNECT: when the
/// broker closes it).
async fn receive(mut events: EventLoop, state: Arc<SubscriberState>, sampling: Arc<Sampling>) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                state.record(&publish.payload, &sampling);
            }
            Ok(_) => {}
            Err(error) => {
                if !state.closing.load(Ordering::Relaxed) {
                    state.fail(format!("connection lost: {error}"));
                }
                return;
            }
        }
    }
}

/// The publisher: one connection publishing the group's messages in sequence.
///
/// Its window of unacknowledged QoS 1/2 publishes (`Endpoint::inflight`) is enforced here, not
/// by rumqttc: rumqttc (0.25) frees a QoS 2 packet id at PUBREC, not at PUBCOMP, and hands out
/// ids cyclically within its `inflight`, so with a broker that acknowledges out of order it
/// reuses an id whose PUBREL is still outstanding; the broker then rightly takes the new
/// PUBLISH for a re-send (MQTT-4.3.3) and the message is lost. Giving rumqttc the whole id
/// space ([`PUBLISHER_PACKET_IDS`]) while this window holds at most `inflight` publishes means
/// an id comes round again only after 65,535 later publishes, long after its flow completed.
pub(crate) struct Publisher {
    client: AsyncClient,
    topic: String,
    qos: QoS,
    message_bytes: usize,
    /// The next sequence number: messages handed to the client so far.
    next_seq: u64,
    /// QoS 1/2: one permit per publish that may still be sent before an acknowledgement.
    window: Option<Arc<tokio::sync::Semaphore>>,
    events: Arc<PublisherEvents>,
    task: tokio::task::JoinHandle<()>,
}

/// What the publisher's event loop saw.
#[derive(Default)]
pub(crate) struct PublisherEvents {
    /// Messages done: PUBACK received (QoS 1), PUBCOMP received (QoS 2), written (QoS 0).
    pub(crate) done: AtomicU64,
    /// PUBACKs (QoS 1) or PUBRECs (QoS 2) for a publish other than the oldest outstanding one.
    pub(crate) acks_out_of_order: AtomicU64,
    closing: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Publisher {
    pub(crate) async fn open(
        endpoint: &Endpoint,
        client_id: &str,
        topic: &str,
        qos: QoS,
    ) -> anyhow::Result<Publisher> {
        let (client, events_loop) = endpoint
            .connect(client_id, PUBLISHER_PACKET_IDS, true)
            .await?;
        let window = (qos != QoS::AtMostOnce)
            .then(|| Arc::new(tokio::sync::Semaphore::new(usize::from(endpoint.inflight))));
        let events = Arc::new(PublisherEvents::default());
        let task = tokio::spawn(publisher_events(
            events_loop,
            qos,
            usize::from(endpoint.inflight),
            window.clone(),
            Arc::clone(&events),
        ));
        Ok(Publisher {
            client,
            topic: topic.to_owned(),
            qos,
            message_bytes: endpoint.message_bytes,
            next_seq: 0,
            window,
            events,
            task,
        })
    }

    /// Hands the next message, stamped `sent_us`, to the client; waits while the window (and
    /// then the request queue) is full.
    pub(crate) async fn send(&mut self, sent_us: u64) -> anyhow::Result<()> {
        if let Some(failure) = self.failure() {
            bail!("publisher: {failure}");
        }
        let payload = encode_payload(self.next_seq, sent_us, self.message_bytes);
        tokio::time::timeout(SEND_TIMEOUT, async {
            if let Some(window) = &self.window {
                // The permit comes back with the acknowledgement, from the event loop.
                window.acquire().await?.forget();
            }
            self.client
                .publish_bytes(self.topic.as_str(), self.qos, false, payload)
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        .map_err(|_| anyhow!("publisher: no room to publish for {SEND_TIMEOUT:?}"))?
        .map_err(|error| anyhow!("publisher: {error}"))?;
        self.next_seq += 1;
        Ok(())
    }

    /// Messages handed to the client so far (the next sequence number).
    pub(crate) fn issued(&self) -> u64 {
        self.next_seq
    }

    /// Messages done: acknowledged by the broker (QoS 1/2) or written (QoS 0).
    pub(crate) fn done(&self) -> u64 {
        self.events.done.load(Ordering::Relaxed)
    }

    /// The event loop's counters, to read while the publisher is busy.
    pub(crate) fn events(&self) -> Arc<PublisherEvents> {
        Arc::clone(&self.events)
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.events.failure.lock().expect("failure lock").clone()
    }

    pub(crate) async fn close(self) {
        self.events.closing.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
        let mut task = self.task;
        if tokio::time::timeout(CLOSE_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// The publisher's event loop: counts completed publishes (returning their window permits)
/// and acknowledgements out of order, until the connection ends.
async fn publisher_events(
    mut events_loop: EventLoop,
    qos: QoS,
    inflight: usize,
    window: Option<Arc<tokio::sync::Semaphore>>,
    events: Arc<PublisherEvents>,
) {
    // Packet ids sent and not yet acknowledged (PUBACK/PUBREC), oldest first; at most the
    // window's size.
    let mut outstanding: VecDeque<u16> = VecDeque::with_capacity(inflight);
    loop {
        let completed = match events_loop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(packet_id))) => {
                if qos != QoS::AtMostOnce && outstanding.len() < inflight {
                    outstanding.push_back(packet_id);
                }
                qos == QoS::AtMostOnce
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                acknowledged(&mut outstanding, ack.pkid, &events);
                qos == QoS::AtLeastOnce
            }
            Ok(Event::Incoming(Packet::PubRec(ack))) => {
                acknowledged(&mut outstanding, ack.pkid, &events);
                false
            }
            Ok(Event::Incoming(Packet::PubComp(_))) => qos == QoS::ExactlyOnce,
            Ok(_) => false,
            Err(error) => {
                if !events.closing.load(Ordering::Relaxed) {
                    events
                        .failure
                        .lock()
                        .expect("failure lock")
                        .get_or_insert(format!("connection lost: {error}"));
                }
                return;
            }
        };
        if completed {
            events.done.fetch_add(1, Ordering::Relaxed);
            if let Some(window) = &window {
                window.add_permits(1);
            }
        }
    }
}

/// Removes `packet_id` from the outstanding ids, counting it if it was not the oldest.
fn acknowledged(outstanding: &mut VecDeque<u16>, packet_id: u16, events: &PublisherEvents) {
    match outstanding.iter().position(|&id| id == packet_id) {
        Some(0) => {
            outstanding.pop_front();
        }
        Some(index) => {
            outstanding.remove(index);
            events.acks_out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        None => {}
    }
}
