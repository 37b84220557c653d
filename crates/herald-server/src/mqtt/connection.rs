//! One MQTT connection: this task reads and decodes packets, runs the session and carries out
//! its actions; a writer task encodes packets from a bounded queue into the socket, one write
//! per burst. Append and session-save completions, the hub feed and a takeover of the client
//! id come back into the same `select!`, so the session is only ever touched by this task.
//!
//! Appends in flight are polled by this task itself ([`Connection::appends`], at most
//! `publishes_in_flight_max`): no task per PUBLISH, and one group commit's answers are
//! handled as one burst (one wake-up, one write of their PUBACKs). Only a retained publish
//! leaves through a task, which indexes it before its answer comes back through
//! `completions`. Appends still in flight when the connection ends are settled (counted,
//! retained ones indexed) by a task of their own.
//!
//! Past CONNECT the connection holds the claim on its client id (see [`super::sessions`]);
//! when it ends, a persistent session's final state is saved before the claim is released,
//! so the next connection of the client id resumes exactly where this one stopped.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use herald_core::{ChannelName, MessageId};
use herald_log::{AppendError, AppendTicket, Appended};
use herald_mqtt::PacketDecoder;
use herald_mqtt::codec::error::DecodeError;
use herald_mqtt::codec::{v3, v5};
use herald_mqtt::session::{
    Action, AppendOutcome, AppendToken, AuthRefusal, ChannelRead, Packet, Session, SessionEnd,
    SessionOpenError, session_key,
};
use herald_mqtt::topic::TopicFilter;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::codec::Encoder as _;

use super::shared::{Membership, SharedDelivery};
use super::{MqttContext, publish, sessions};
use crate::auth::{Operation, Principal};
use crate::durable::Eviction;
use crate::durable::registry::Claim;
use crate::hub::{ChannelMatcher, FeedScope, PatternReceiver};

/// Packets queued for the writer.
const WRITER_QUEUE_PACKETS: usize = 256;
/// Bytes read from the socket at most per read.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Feed messages handed to the session at most before its actions run: a burst goes out as
/// one write, and a persistent session saves once for the burst instead of once per message.
const FEED_BURST_MAX: usize = 64;
/// Acknowledgements from the client handed to the session at most before its actions run.
const ACK_BURST_MAX: usize = 256;
/// A session save refused because the store's commit queue is full is tried again this many
/// times, this far apart, before the connection gives up.
const SAVE_RETRIES_WHEN_OVERLOADED: usize = 50;
const SAVE_RETRY_PAUSE: Duration = Duration::from_millis(20);
/// A client whose writer queue stays full this long has stopped reading: it is closed rather
/// than holding its connection task (and its feed) forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

enum Outgoing {
    Packet(Packet),
    /// Flush and close the socket.
    Close,
}

/// An append's answer, with the slot it held.
type Completion = (AppendToken, AppendOutcome, OwnedSemaphorePermit);

/// One append in flight: its ticket, with what its answer needs once the ticket completes.
struct InFlight {
    ticket: AppendTicket,
    /// Taken when the ticket completes.
    pending: Option<PendingAnswer>,
}

/// What an append's answer needs besides the store's result.
struct PendingAnswer {
    token: AppendToken,
    /// A retained publish: indexed once durable, before it is acknowledged.
    retained: Option<(ChannelName, MessageId)>,
    /// The append's slot of `append_slots`, released once the answer is handled.
    slot: OwnedSemaphorePermit,
}

/// A completed append.
struct Settled {
    answer: PendingAnswer,
    result: Result<Vec<Appended>, AppendError>,
}

impl Future for InFlight {
    type Output = Settled;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Settled> {
        let this = &mut *self;
        Pin::new(&mut this.ticket).poll(cx).map(|result| Settled {
            answer: this.pending.take().expect("an append completes once"),
            result,
        })
    }
}
/// A session save's answer: its generation and outcome.
type Saved = (u64, Result<(), String>);

/// The connection's filters, shared with its feed's matcher on the commit path.
type Filters = Arc<RwLock<BTreeMap<String, TopicFilter>>>;

struct Connection {
    context: Arc<MqttContext>,
    session: Session,
    out: mpsc::Sender<Outgoing>,
    principal: Option<Principal>,
    filters: Filters,
    feed: Option<PatternReceiver>,
    /// Appends in flight, polled by this task (each holds a slot of `append_slots`).
    appends: FuturesUnordered<InFlight>,
    appended: mpsc::Sender<Completion>,
    /// Completed retained appends, once indexed. Each carries its slot of `append_slots`,
    /// released only once the completion is handled: at most `publishes_in_flight_max` are
    /// ever queued, so a completing append never waits for the connection.
    completions: mpsc::Receiver<Completion>,
    append_slots: Arc<Semaphore>,
    /// Session saves in flight report here (at most one per burst of session input).
    saved: mpsc::UnboundedSender<Saved>,
    saves: mpsc::UnboundedReceiver<Saved>,
    /// The claim on the client id, from CONNECT on.
    claim: Option<Claim<String>>,
    evicted: Option<oneshot::Receiver<Eviction>>,
    /// Feed drops already handed to a persistent session as a gap.
    feed_gaps_seen: u64,
    /// The connection's shared subscriptions, by full text; dropping one leaves its group.
    memberships: BTreeMap<String, Membership>,
    /// Where the groups send this connection's share of their messages.
    shared_sender: mpsc::Sender<SharedDelivery>,
    shared_deliveries: mpsc::Receiver<SharedDelivery>,
    closing: bool,
    /// Drops already added to `deliveries_dropped_total`.
    drops_reported: u64,
}

/// Serves one connection over any byte stream: a TCP socket, or the bytes of a WebSocket
/// (MQTT over WebSocket). `peer` names the client in logs.
pub(super) async fn run<S>(stream: S, peer: String, context: Arc<MqttContext>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let counters = &context.state.metrics.mqtt;
    counters.connections.fetch_add(1, Ordering::Relaxed);
    counters.connections_total.fetch_add(1, Ordering::Relaxed);
    let (mut reader, writer) = tokio::io::split(stream);
    let (out, outgoing) = mpsc::channel(WRITER_QUEUE_PACKETS);
    let writer = tokio::spawn(write_packets(writer, outgoing));
    let (appended, completions) = mpsc::channel(context.config.publishes_in_flight_max);
    let connection_id = crate::auth::random_base62(16);
    let (saved, saves) = mpsc::unbounded_channel();
    let (shared_sender, shared_deliveries) = mpsc::channel(context.config.outbound_queue_messages);
    let mut connection = Connection {
        session: Session::new(context.session_config.clone(), &connection_id),
        append_slots: Arc::new(Semaphore::new(context.config.publishes_in_flight_max)),
        context: context.clone(),
        out,
        principal: None,
        filters: Arc::default(),
        feed: None,
        appends: FuturesUnordered::new(),
        appended,
        completions,
        saved,
        saves,
        claim: None,
        evicted: None,
        feed_gaps_seen: 0,
        memberships: BTreeMap::new(),
        shared_sender,
        shared_deliveries,
        closing: false,
        drops_reported: 0,
    };
    let mut stopping = context.stopping.clone();
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut decoder = PacketDecoder::new(context.config.max_packet_bytes);
    let mut deadline = tokio::time::Instant::now() + context.config.connect_timeout;
    while !connection.closing {
        tokio::select! {
            read = read_some(&mut reader, &mut buffer) => {
                match read {
                    Ok(0) | Err(_) => {
                        // Gone without DISCONNECT: its will goes out.
                        connection.session.handle_connection_lost();
                        connection.run_actions().await;
                        break;
                    }
                    Ok(_) => {}
                }
                connection.decode_all(&mut buffer, &mut decoder).await;
                deadline = match connection.session.keep_alive_timeout_ms() {
                    Some(timeout_ms) => tokio::time::Instant::now() + Duration::from_millis(timeout_ms),
                    None if connection.session.is_connected() => far_future(),
                    None => deadline,
                };
            }
            Some(settled) = connection.appends.next(), if !connection.appends.is_empty() => {
                connection.settle(settled);
                // The rest of the same group commit is usually complete too: answered
                // together, their acknowledgements leave in one write.
                while let Some(Some(settled)) = connection.appends.next().now_or_never() {
                    connection.settle(settled);
                }
                connection.run_actions().await;
            }
            Some((token, outcome, slot)) = connection.completions.recv() => {
                drop(slot);
                connection.session.handle_appended(token, outcome);
                connection.run_actions().await;
            }
            Some(live) = recv_feed(&mut connection.feed) => {
                connection.deliver_burst(&live.message).await;
            }
            Some((key, live)) = connection.shared_deliveries.recv() => {
                connection.session.handle_shared_delivery(&key, &live.message);
                connection.run_actions().await;
                connection.report_drops();
            }
            Some((generation, result)) = connection.saves.recv() => {
                connection.session.handle_session_saved(generation, result);
                connection.run_actions().await;
            }
            Ok(_) = recv_eviction(&mut connection.evicted) => {
                connection.evicted = None;
                counters.sessions_taken_over_total.fetch_add(1, Ordering::Relaxed);
                connection.session.handle_taken_over();
                connection.run_actions().await;
            }
            () = tokio::time::sleep_until(deadline) => {
                if connection.session.is_connected() {
                    connection.session.handle_keep_alive_timeout();
                } else {
                    connection.session.handle_decode_error(&DecodeError::Io(
                        "no CONNECT within mqtt.connect_timeout".into(),
                    ));
                }
                connection.run_actions().await;
            }
            () = super::stopped(&mut stopping) => {
                connection.session.handle_shutdown();
                connection.run_actions().await;
                break;
            }
        }
    }
    connection.finish_session().await;
    connection.report_drops();
    settle_abandoned(&context, std::mem::take(&mut connection.appends));
    if connection.drops_reported > 0 {
        tracing::warn!(
            %peer,
            client_id = connection.session.client_id(),
            dropped = connection.drops_reported,
            "MQTT deliveries were dropped on this connection: the client read too slowly"
        );
    }
    let _ = connection
        .out
        .send_timeout(Outgoing::Close, Duration::from_secs(5))
        .await;
    drop(connection);
    // A peer that stopped reading must not keep the writer forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    counters.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Reads what the socket has (cancel-safe: `read_buf` loses nothing when dropped).
async fn read_some(
    reader: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
) -> std::io::Result<usize> {
    buffer.reserve(READ_CHUNK_BYTES);
    reader.read_buf(buffer).await
}

/// The channels `filters` can match, for the hub's index of feeds: exact channels, the
/// literal first levels of wildcard filters, or everything for a filter starting with one.
fn scope_of<'a>(filters: impl Iterator<Item = &'a TopicFilter>) -> FeedScope {
    let mut scope = FeedScope::default();
    for filter in filters {
        if let Some(channel) = filter.exact_channel() {
            scope.channels.insert(channel.clone());
            continue;
        }
        match filter.as_str().split('/').next() {
            Some(level) if level != "+" && level != "#" => {
                scope.first_levels.insert(level.to_owned());
            }
            _ => scope.everything = true,
        }
    }
    scope
}

/// A client's acknowledgement of a delivery: handled in bursts (see `decode_all`).
fn is_delivery_ack(packet: &Packet) -> bool {
    matches!(
        packet,
        Packet::V3(
            v3::Packet::PublishAck { .. }
                | v3::Packet::PublishReceived { .. }
                | v3::Packet::PublishComplete { .. }
        ) | Packet::V5(
            v5::Packet::PublishAck(_)
                | v5::Packet::PublishReceived(_)
                | v5::Packet::PublishComplete(_)
        )
    )
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

async fn recv_eviction(
    evicted: &mut Option<oneshot::Receiver<Eviction>>,
) -> Result<Eviction, oneshot::error::RecvError> {
    match evicted {
        Some(evicted) => evicted.await,
        None => std::future::pending().await,
    }
}

async fn recv_feed(feed: &mut Option<PatternReceiver>) -> Option<Arc<crate::hub::LiveMessage>> {
    match feed {
        Some(feed) => feed.receiver().recv().await,
        None => std::future::pending().await,
    }
}

impl Connection {
    /// Decodes and handles every complete packet in `buffer`. The client's acknowledgements
    /// of deliveries (PUBACK, PUBREC, PUBCOMP) that arrive together are handed to the session
    /// together before their actions run, so a persistent session saves once for the burst
    /// rather than once per acknowledgement. Every other packet's actions run before the
    /// next packet is handled.
    async fn decode_all(&mut self, buffer: &mut BytesMut, decoder: &mut PacketDecoder) {
        let mut acks_pending = 0;
        while !self.closing {
            match decoder.decode(buffer) {
                Ok(None) => break,
                Ok(Some(packet)) => {
                    let ack = is_delivery_ack(&packet);
                    if !ack && acks_pending > 0 {
                        acks_pending = 0;
                        self.run_actions().await;
                        if self.closing {
                            return;
                        }
                    }
                    self.session.handle_packet(packet);
                    if ack && acks_pending + 1 < ACK_BURST_MAX {
                        acks_pending += 1;
                        continue;
                    }
                }
                Err(error) => self.session.handle_decode_error(&error),
            }
            acks_pending = 0;
            self.run_actions().await;
        }
        if acks_pending > 0 {
            self.run_actions().await;
        }
    }

    /// Adds new drops (feed full, window queue full, over the client's packet size) to the
    /// counter as they happen; warns on the first. A persistent session loses nothing to a
    /// full feed (it reads what it missed from the log), so only its other drops count.
    fn report_drops(&mut self) {
        let feed_dropped = self.feed.as_ref().map_or(0, PatternReceiver::dropped);
        let dropped = if self.session.is_persistent() {
            0
        } else {
            feed_dropped
        } + self.session.deliveries_dropped();
        if dropped > self.drops_reported {
            if self.drops_reported == 0 {
                tracing::warn!(
                    client_id = self.session.client_id(),
                    "MQTT deliveries are being dropped: the client reads too slowly"
                );
            }
            self.context
                .state
                .metrics
                .mqtt
                .deliveries_dropped_total
                .fetch_add(dropped - self.drops_reported, Ordering::Relaxed);
            self.drops_reported = dropped;
        }
    }

    /// Hands `first` and what else the feed already holds (at most [`FEED_BURST_MAX`]) to the
    /// session, then runs the actions once for the burst.
    async fn deliver_burst(&mut self, first: &herald_core::Message) {
        self.deliver(first);
        for _ in 1..FEED_BURST_MAX {
            let next = self
                .feed
                .as_mut()
                .and_then(|feed| feed.receiver().try_recv().ok());
            let Some(live) = next else {
                break;
            };
            self.deliver(&live.message);
        }
        self.run_actions().await;
        self.report_drops();
    }

    /// Hands one feed message to the session (see [`Connection::deliver_burst`]).
    fn deliver(&mut self, message: &herald_core::Message) {
        // Wildcard filters were authorized on their namespace at most: each channel is checked.
        let Some(principal) = self.principal else {
            return;
        };
        if self
            .context
            .state
            .auth
            .authorize(principal, &message.channel, Operation::Subscribe)
            .is_err()
        {
            return;
        }
        self.session.handle_delivery(message);
        if self.session.is_persistent() {
            let feed_dropped = self.feed.as_ref().map_or(0, PatternReceiver::dropped);
            if feed_dropped > self.feed_gaps_seen {
                self.feed_gaps_seen = feed_dropped;
                self.session.handle_feed_gap();
            }
        }
    }

    /// The name of the connection's credentials (the owner of its stored session).
    fn owner(&self) -> String {
        self.principal.map_or_else(
            || "anonymous".to_owned(),
            |principal| self.context.state.auth.principal_name(principal),
        )
    }

    /// Whether the connection's key may read `channel` (every delivery is checked).
    fn may_read(&self, channel: &ChannelName) -> bool {
        self.principal.is_some_and(|principal| {
            self.context
                .state
                .auth
                .authorize(principal, channel, Operation::Subscribe)
                .is_ok()
        })
    }

    /// After the last action: a persistent session's final state is saved (or a resumed
    /// session with no expiry removed) before the claim on the client id is released.
    async fn finish_session(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        let store = &self.context.state.store;
        let client_id = self.session.client_id().to_owned();
        let key = session_key(&client_id);
        let ticket = match self.session.session_end() {
            SessionEnd::Nothing => None,
            SessionEnd::Remove => Some(store.remove_state(&key)),
            SessionEnd::Keep(mut state) => {
                state.disconnected_ms = Some(sessions::now_ms());
                state.owner = Some(self.owner());
                Some(store.save_state(&key, state.encode().into()))
            }
        };
        if let Some(ticket) = ticket {
            match tokio::time::timeout(SEND_TIMEOUT, ticket).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(client_id, %error, "MQTT session state not saved at disconnect");
                }
                Err(_) => {
                    tracing::warn!(client_id, "MQTT session save at disconnect timed out");
                }
            }
        }
        drop(claim);
    }

    /// Carries out the session's actions in order; answers to requests are given at once,
    /// except appends, whose completions come back through `appended`.
    async fn run_actions(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Send(packet) => {
                    let queued = self
                        .out
                        .send_timeout(Outgoing::Packet(packet), SEND_TIMEOUT)
                        .await;
                    if queued.is_err() {
                        tracing::debug!("MQTT client stopped reading; closing");
                        self.closing = true;
                        return;
                    }
                }
                Action::Authenticate {
                    client_id,
                    username,
                    password,
                } => {
                    let result = self.authenticate(password.as_deref());
                    tracing::debug!(client_id, ?username, ok = result.is_ok(), "MQTT CONNECT");
                    self.session.handle_authenticated(result);
                }
                Action::AuthorizeSubscribe { packet_id, filters } => {
                    let allowed = filters
                        .iter()
                        .map(|filter| self.may_subscribe(filter))
                        .collect();
                    self.session.handle_subscribe_authorized(
                        packet_id,
                        allowed,
                        sessions::now_ms(),
                    );
                }
                Action::Append {
                    token,
                    channel,
                    message,
                } => self.append(token, channel, message).await,
                Action::Subscribe { filter, qos: _ } => self.subscribe(filter),
                Action::SendRetained { filter } => {
                    let Some(principal) = self.principal else {
                        continue;
                    };
                    for message in self.context.retained.matching(&filter) {
                        let readable = self
                            .context
                            .state
                            .auth
                            .authorize(principal, &message.channel, Operation::Subscribe)
                            .is_ok();
                        if readable {
                            self.session.handle_retained(&filter, &message);
                        }
                    }
                }
                Action::SubscribeShared { key, share, filter } => {
                    if let Some(principal) = self.principal {
                        let membership = self.context.shared.join(
                            &share,
                            filter,
                            key.clone(),
                            principal,
                            self.shared_sender.clone(),
                        );
                        // Replacing an equal subscription leaves the old membership.
                        self.memberships.insert(key, membership);
                    }
                }
                Action::UnsubscribeShared { key } => {
                    self.memberships.remove(&key);
                }
                Action::Unsubscribe { filter } => self.unsubscribe(&filter),
                Action::PublishWill(will) => self.publish_will(will).await,
                Action::OpenSession { client_id, clean } => {
                    // Before the claim: another key must not even take the connection over.
                    if sessions::owned_by_another(&self.context, &client_id, &self.owner()) {
                        tracing::warn!(
                            client_id,
                            "MQTT CONNECT refused: the client id's session belongs to other credentials"
                        );
                        self.session
                            .handle_session_opened(Err(SessionOpenError::OwnedByAnotherKey));
                        continue;
                    }
                    let mut claim = self
                        .context
                        .sessions
                        .claim_key(
                            client_id.clone(),
                            Eviction::TakenOver,
                            sessions::TAKEOVER_WAIT,
                        )
                        .await;
                    if !claim.fenced {
                        tracing::warn!(
                            client_id,
                            "the previous connection of this client id did not save its session in time"
                        );
                    }
                    self.evicted = Some(claim.take_evicted());
                    self.claim = Some(claim);
                    publish::session_reopened(&self.context, &client_id, clean).await;
                    let opened =
                        sessions::open(&self.context, &client_id, clean, &self.owner()).await;
                    if let Err(error) = &opened {
                        tracing::warn!(client_id, ?error, "MQTT session cannot be opened");
                    }
                    self.session.handle_session_opened(opened);
                }
                Action::SaveSession {
                    generation,
                    mut state,
                } => {
                    state.owner = Some(self.owner());
                    let key = session_key(&state.client_id);
                    let value = bytes::Bytes::from(state.encode());
                    // Queued now, in order with the appends that follow it.
                    let ticket = self.context.state.store.save_state(&key, value.clone());
                    let store = self.context.state.store.clone();
                    let saved = self.saved.clone();
                    tokio::spawn(async move {
                        let mut result = ticket.await;
                        // A full commit queue is transient: try again for a while rather
                        // than end the session's connection.
                        for _ in 0..SAVE_RETRIES_WHEN_OVERLOADED {
                            if result != Err(AppendError::Overloaded) {
                                break;
                            }
                            tokio::time::sleep(SAVE_RETRY_PAUSE).await;
                            result = store.save_state(&key, value.clone()).await;
                        }
                        let _ = saved.send((generation, result.map_err(|error| error.to_string())));
                    });
                }
                Action::ListChannels { filters } => {
                    let channels =
                        sessions::list_channels(&self.context.state.store, filters).await;
                    self.session.handle_channels_listed(channels);
                }
                Action::ReadChannel {
                    channel,
                    from,
                    limit,
                } => {
                    let mut read =
                        sessions::read_channel(&self.context.state.store, &channel, from, limit)
                            .await;
                    if !self.may_read(&channel)
                        && let ChannelRead::Page { messages, .. } = &mut read
                    {
                        // Passed over, as the live feed would: the key may not read them.
                        messages.clear();
                    }
                    self.session.handle_channel_read(&channel, read);
                }
                Action::ReadForResend {
                    packet_id,
                    channel,
                    position,
                } => {
                    let message =
                        sessions::read_message(&self.context.state.store, &channel, &position)
                            .await
                            .filter(|_| self.may_read(&channel));
                    if message.is_none() {
                        tracing::warn!(client_id = self.session.client_id(), %channel, %position, "an unacknowledged MQTT delivery is gone from the log and cannot be sent again");
                    }
                    self.session.handle_resend_read(packet_id, message);
                }
                Action::ContinuityLost {
                    channel,
                    after,
                    resume_after,
                } => {
                    self.context
                        .state
                        .metrics
                        .mqtt
                        .sessions_continuity_lost_total
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        client_id = self.session.client_id(),
                        %channel,
                        after = ?after.map(|after| after.to_string()),
                        %resume_after,
                        "MQTT session missed messages that are no longer retained"
                    );
                }
                Action::Close(reason) => {
                    use herald_mqtt::codec::v5::DisconnectReasonCode as Code;
                    if !matches!(
                        reason.code,
                        Code::NormalDisconnection
                            | Code::ServerShuttingDown
                            | Code::KeepAliveTimeout
                            | Code::NotAuthorized
                            | Code::SessionTakenOver
                            | Code::UnspecifiedError
                            | Code::ImplementationSpecificError
                    ) {
                        self.context
                            .state
                            .metrics
                            .mqtt
                            .protocol_errors_total
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(code = ?reason.code, detail = reason.detail, "MQTT connection closes");
                    self.closing = true;
                }
            }
        }
    }

    fn authenticate(&mut self, password: Option<&[u8]>) -> Result<(), AuthRefusal> {
        let key = match password {
            Some(bytes) => {
                Some(std::str::from_utf8(bytes).map_err(|_| AuthRefusal::BadCredentials)?)
            }
            None => None,
        };
        let principal = self
            .context
            .state
            .auth
            .authenticate_key_or_anonymous(key)
            .map_err(|_| AuthRefusal::BadCredentials)?;
        self.principal = Some(principal);
        Ok(())
    }

    fn may_subscribe(&self, filter: &TopicFilter) -> bool {
        let Some(principal) = self.principal else {
            return false;
        };
        let auth = &self.context.state.auth;
        if let Some(channel) = filter.exact_channel() {
            return auth
                .authorize(principal, channel, Operation::Subscribe)
                .is_ok();
        }
        match filter.namespace() {
            // A probe channel of the namespace: capabilities are per namespace.
            Some(namespace) => ChannelName::parse(&format!("{namespace}:x")).is_ok_and(|probe| {
                auth.authorize(principal, &probe, Operation::Subscribe)
                    .is_ok()
            }),
            // Spans namespaces: every delivery is checked on its own channel instead.
            None => true,
        }
    }

    /// Adds `filter` to the connection's feed. The feed's scope is widened before the
    /// matcher accepts the new filter's channels, so no message in between is passed over.
    fn subscribe(&mut self, filter: TopicFilter) {
        if let Some(feed) = &self.feed {
            let filters = self.filters.read().unwrap_or_else(PoisonError::into_inner);
            feed.set_scope(scope_of(filters.values().chain([&filter])));
        }
        let scope = {
            let mut filters = self.filters.write().unwrap_or_else(PoisonError::into_inner);
            filters.insert(filter.as_str().to_owned(), filter);
            scope_of(filters.values())
        };
        if self.feed.is_none() {
            let filters = self.filters.clone();
            let matcher: ChannelMatcher = Arc::new(move |channel: &ChannelName| {
                filters
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .any(|filter| filter.matches_channel(channel))
            });
            let hub = &self.context.state.realtime.live.hub;
            let feed = hub.subscribe_matching(matcher, self.context.config.outbound_queue_messages);
            // Registered with every channel in scope, narrowed once the matcher is in place.
            feed.set_scope(scope);
            self.feed = Some(feed);
        }
    }

    /// Removes `filter` from the connection's feed: the matcher first, then the scope.
    fn unsubscribe(&mut self, filter: &TopicFilter) {
        let scope = {
            let mut filters = self.filters.write().unwrap_or_else(PoisonError::into_inner);
            filters.remove(filter.as_str());
            scope_of(filters.values())
        };
        if let Some(feed) = &self.feed {
            feed.set_scope(scope);
        }
    }

    /// Why this connection may not publish `message` to `channel`, if it may not.
    fn refusal(
        &self,
        channel: &ChannelName,
        message: &herald_core::NewMessage,
    ) -> Option<AppendOutcome> {
        publish::refusal(&self.context, self.principal, channel, message)
    }

    /// The connection's will, as it ends: published now (awaited, bounded), or after its
    /// delay unless the session is resumed first.
    async fn publish_will(&mut self, will: herald_mqtt::Will) {
        let client_id = self.session.client_id().to_owned();
        if will.delay_secs == 0 {
            publish::publish_will(&self.context, self.principal, &client_id, will).await;
        } else {
            publish::delay_will(&self.context, self.principal, client_id, will);
        }
    }

    async fn append(
        &mut self,
        token: AppendToken,
        channel: ChannelName,
        message: herald_core::NewMessage,
    ) {
        let refused = self.refusal(&channel, &message);
        if let Some(outcome) = refused {
            self.context
                .state
                .metrics
                .mqtt
                .publishes_refused_total
                .fetch_add(1, Ordering::Relaxed);
            self.session.handle_appended(token, outcome);
            return;
        }
        // Reading waits here while the connection has its maximum of appends in flight,
        // handling their completions (which free the slots) meanwhile.
        let slot = loop {
            if let Ok(slot) = self.append_slots.clone().try_acquire_owned() {
                break slot;
            }
            // Every slot is held by an append in `appends` or by a retained one being indexed.
            // Their actions join the queue `run_actions` is draining.
            tokio::select! {
                Some(settled) = self.appends.next(), if !self.appends.is_empty() => {
                    self.settle(settled);
                }
                completion = self.completions.recv() => {
                    let Some((token, outcome, slot)) = completion else {
                        return;
                    };
                    drop(slot);
                    self.session.handle_appended(token, outcome);
                }
            }
        };
        if self.session.is_closed() {
            // That answer ended the connection: this message is not stored, nor acknowledged.
            return;
        }
        let retained = message
            .headers
            .contains_key(herald_mqtt::HEADER_RETAIN)
            .then(|| (channel.clone(), message.id.clone()));
        let ticket = self.context.state.store.append(channel, vec![message]);
        self.appends.push(InFlight {
            ticket,
            pending: Some(PendingAnswer {
                token,
                retained,
                slot,
            }),
        });
    }

    /// Answers a completed append; a retained one is indexed first, on a task of its own,
    /// and answered through `completions`.
    fn settle(&mut self, settled: Settled) {
        let Settled { answer, result } = settled;
        let outcome = count_outcome(&self.context, result);
        match answer.retained {
            Some((channel, id)) if outcome == AppendOutcome::Durable => {
                let context = self.context.clone();
                let appended = self.appended.clone();
                tokio::spawn(async move {
                    // Indexed before the acknowledgement: a subscriber that comes after the
                    // PUBACK gets it.
                    publish::index_retained(&context, channel, id).await;
                    // Never waits: the channel holds as many completions as there are slots.
                    let _ = appended.send((answer.token, outcome, answer.slot)).await;
                });
            }
            _ => {
                drop(answer.slot);
                self.session.handle_appended(answer.token, outcome);
            }
        }
    }
}

/// The outcome of an append's result, counted in the MQTT metrics.
fn count_outcome(
    context: &MqttContext,
    result: Result<Vec<Appended>, AppendError>,
) -> AppendOutcome {
    let outcome = match result {
        Ok(_) => AppendOutcome::Durable,
        Err(AppendError::Overloaded) => AppendOutcome::Overloaded,
        Err(AppendError::Invalid(invalid)) => AppendOutcome::Invalid(invalid.to_string()),
        Err(error) => AppendOutcome::Failed(error.to_string()),
    };
    let counters = &context.state.metrics.mqtt;
    if outcome == AppendOutcome::Durable {
        counters
            .publishes_durable_total
            .fetch_add(1, Ordering::Relaxed);
    } else {
        counters
            .publishes_refused_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(?outcome, "MQTT publish not stored");
    }
    outcome
}

/// Appends still in flight when their connection ends (a QoS 0 publisher disconnecting right
/// after its last PUBLISH): they still complete, and are counted, and a retained one indexed.
/// Bounded: at most `publishes_in_flight_max` of them.
fn settle_abandoned(context: &Arc<MqttContext>, mut appends: FuturesUnordered<InFlight>) {
    if appends.is_empty() {
        return;
    }
    let context = context.clone();
    tokio::spawn(async move {
        while let Some(Settled { answer, result }) = appends.next().await {
            let outcome = count_outcome(&context, result);
            if let Some((channel, id)) = answer.retained
                && outcome == AppendOutcome::Durable
            {
                publish::index_retained(&context, channel, id).await;
            }
        }
    });
}

/// Encodes queued packets into the socket; one write per burst of ready packets.
async fn write_packets(
    mut writer: impl AsyncWrite + Unpin,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    let mut v3_codec = v3::Codec::new(0);
    let mut v5_codec = v5::Codec::new(0, 0);
    let mut buffer = BytesMut::with_capacity(4096);
    while let Some(first) = outgoing.recv().await {
        let mut next = Some(first);
        let mut closing = false;
        while let Some(item) = next.take() {
            let encoded = match item {
                Outgoing::Packet(Packet::V3(packet)) => v3_codec.encode(packet, &mut buffer),
                Outgoing::Packet(Packet::V5(packet)) => v5_codec.encode(packet, &mut buffer),
                Outgoing::Close => {
                    closing = true;
                    break;
                }
            };
            if let Err(error) = encoded {
                // Our own packets: a failure here is a bug, but not worth the process.
                tracing::error!(%error, "cannot encode an MQTT packet");
                closing = true;
                break;
            }
            if buffer.len() >= 64 * 1024 {
                break;
            }
            next = outgoing.try_recv().ok();
        }
        if !buffer.is_empty() && writer.write_all(&buffer).await.is_err() {
            return;
        }
        buffer.clear();
        if closing {
            break;
        }
    }
    let _ = writer.shutdown().await;
}
