//! The connection task: it owns the [`Session`] and the WebSocket, and is reached by
//! [`crate::Client`] handles through a bounded command channel (replies on `oneshot`s) and by
//! ack handles through the ack mailbox (`ack.rs`).
//!
//! The task connects, sends `connect`, waits for `connected`, sends what
//! [`Session::on_connected`] returns, then feeds every frame to [`Session::handle`] and routes
//! the outputs: events to each [`crate::Subscription`]'s bounded queue, acks to the waiting
//! [`crate::Client::publish`] calls. When the connection drops (error, close, or no frame for
//! about two heartbeats) it reconnects with exponential backoff and jitter, serving commands
//! meanwhile (publishes wait for the next connection).
//!
//! # Backpressure
//! A subscription's queue holds `subscription_events_max` events. When it is full the task
//! waits for room and stops reading the socket meanwhile: the server then sees a slow
//! subscriber (exactly-once: it catches up from its log later; at-most-once: it drops with a
//! `gap` notice; at-least-once: its window fills and it waits for acks). So a consumer must
//! not await a publish *ack* (or an [`crate::AckHandle::ack_durable`]) in the loop that
//! drains a subscription while its queue can fill; spawn it instead.
//!
//! # Acks
//! While connected, the task takes the ack mailbox whenever something is recorded there and
//! fewer than `acks_in_flight_max` ack frames wait for an answer; acks someone awaits
//! ([`crate::AckHandle::ack_durable`]) go in frames of their own so their answer is theirs.
//! Before an unsubscribe or a close it sends what the mailbox holds for the channel, so an ack
//! made just before dropping a subscription is not lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::ws::{self, ClientFrame, Connected, ServerFrame};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::ack::{AckError, AckHandle, AckMailbox, AckReply, ChannelAcks, Kind};
use crate::backoff::reconnect_delay;
use crate::client::{ClientError, ClientOptions, Command, ConnectionState, PublishReply};
use crate::event::{Delivery, Event};
use crate::session::{Output, Session};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why the client stopped for good.
#[derive(Clone, Debug)]
pub(crate) enum Stop {
    /// The server refused the client (credentials, protocol version).
    Rejected(String),
    /// Close code 4004: an at-least-once subscriber was taken over by another connection.
    TakenOver,
}

impl Stop {
    pub(crate) fn error(&self) -> ClientError {
        match self {
            Stop::Rejected(reason) => ClientError::Rejected(reason.clone()),
            Stop::TakenOver => ClientError::TakenOver,
        }
    }

    fn reason(&self) -> String {
        match self {
            Stop::Rejected(reason) => reason.clone(),
            Stop::TakenOver => "taken over by another connection with the same subscriber_id \
                                (close code 4004)"
                .to_owned(),
        }
    }

    fn ack_error(&self) -> AckError {
        match self {
            Stop::Rejected(_) => AckError::Closed,
            Stop::TakenOver => AckError::TakenOver,
        }
    }
}

pub(crate) struct Subscriber {
    id: u64,
    events: mpsc::Sender<Event>,
    /// The channel name shared by the ack handles of its deliveries.
    channel: Arc<str>,
}

/// Why a connection ended.
enum Ended {
    /// Reconnect.
    Dropped,
    /// Stop the task.
    Stop,
}

/// Whether the task goes on after a command.
enum Flow {
    Continue,
    Stop,
}

/// Why opening a connection failed.
enum OpenError {
    Retry(String),
    Fatal(String),
}

pub(crate) struct Driver {
    pub(crate) options: ClientOptions,
    pub(crate) session: Session,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) subscribers: BTreeMap<String, Subscriber>,
    pub(crate) waiters: HashMap<u64, (PublishReply, OwnedSemaphorePermit)>,
    /// Awaited acks by the request id of their frame, with their channel.
    pub(crate) ack_waiters: HashMap<u64, (String, AckReply)>,
    pub(crate) acks: Arc<AckMailbox>,
    pub(crate) state: watch::Sender<ConnectionState>,
    /// When to call `Session::retry_waiting`.
    pub(crate) retry_at: Option<Instant>,
    pub(crate) retry_rounds: u32,
    pub(crate) stop: Arc<Mutex<Option<Stop>>>,
}

impl Driver {
    pub(crate) async fn run(mut self) {
        let mut failures = 0u32;
        'outer: loop {
            // The options are cloned so that the opening future does not borrow the driver,
            // which keeps serving commands meanwhile.
            let options = self.options.clone();
            let opening = open(&options);
            tokio::pin!(opening);
            let opened = loop {
                tokio::select! {
                    opened = &mut opening => break opened,
                    command = self.commands.recv() => {
                        if let Flow::Stop = self.on_command(command, None).await {
                            break 'outer;
                        }
                    }
                }
            };
            match opened {
                Ok((socket, connected)) => {
                    let started = Instant::now();
                    self.state.send_modify(|state| {
                        state.connected = true;
                        state.connections += 1;
                    });
                    let ended = self.serve(socket, &connected).await;
                    self.session.on_disconnected();
                    self.retry_at = None;
                    self.state.send_modify(|state| state.connected = false);
                    if let Ended::Stop = ended {
                        break 'outer;
                    }
                    // A connection that lived a while resets the schedule; one that dies
                    // right after opening must not make the client reconnect in a tight loop.
                    if started.elapsed() >= self.options.reconnect_delay_max {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                    // The first reconnect after a long-lived connection is quick.
                    let delay = self.delay(failures.saturating_sub(1));
                    if let Ended::Stop = self.pause(delay).await {
                        break 'outer;
                    }
                }
                Err(OpenError::Fatal(reason)) => {
                    tracing::error!(%reason, "herald-client: the server refused the connection");
                    self.shutdown(Some(Stop::Rejected(reason)));
                    break 'outer;
                }
                Err(OpenError::Retry(reason)) => {
                    tracing::debug!(%reason, failures, "herald-client: connect failed");
                    let delay = self.delay(failures);
                    failures = failures.saturating_add(1);
                    if let Ended::Stop = self.pause(delay).await {
                        break 'outer;
                    }
                }
            }
        }
        self.state.send_modify(|state| {
            state.connected = false;
            state.stopped = true;
        });
    }

    fn delay(&self, failures: u32) -> Duration {
        reconnect_delay(
            failures,
            self.options.reconnect_delay_min,
            self.options.reconnect_delay_max,
            rand::random::<f64>(),
        )
    }

    /// Waits `delay` while serving commands.
    async fn pause(&mut self, delay: Duration) -> Ended {
        let wake = sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                () = &mut wake => return Ended::Dropped,
                command = self.commands.recv() => {
                    if let Flow::Stop = self.on_command(command, None).await {
                        return Ended::Stop;
                    }
                }
            }
        }
    }

    /// Runs one connection until it drops or the client stops.
    async fn serve(&mut self, mut socket: Socket, connected: &Connected) -> Ended {
        // The server promises a heartbeat every `heartbeat_ms`; silence for about two of them
        // means the connection is dead even if TCP has not noticed.
        let silence_max = Duration::from_millis(connected.heartbeat_ms.saturating_mul(2))
            .max(Duration::from_millis(500))
            + Duration::from_millis(500);
        let frames = self.session.on_connected();
        if send_all(&mut socket, frames).await.is_err() {
            return Ended::Dropped;
        }
        let mut silent_until = Instant::now() + silence_max;
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                received = socket.next() => {
                    let text = match received {
                        Some(Ok(WsMessage::Text(text))) => text,
                        Some(Ok(WsMessage::Close(close))) => {
                            tracing::debug!(?close, "herald-client: server closed the connection");
                            if let Some(stop) = fatal_close(close.as_ref().map(|close| close.code)) {
                                self.shutdown(Some(stop));
                                return Ended::Stop;
                            }
                            return Ended::Dropped;
                        }
                        Some(Ok(_)) => {
                            // Pings (answered by tungstenite), pongs, binary: alive, nothing to do.
                            silent_until = Instant::now() + silence_max;
                            continue;
                        }
                        Some(Err(error)) => {
                            tracing::debug!(%error, "herald-client: connection error");
                            return Ended::Dropped;
                        }
                        None => return Ended::Dropped,
                    };
                    silent_until = Instant::now() + silence_max;
                    let frame = match ServerFrame::from_json(text.as_str()) {
                        Ok(frame) => frame,
                        Err(error) => {
                            tracing::warn!(%error, "herald-client: undecodable frame from the server");
                            continue;
                        }
                    };
                    let outputs = self.session.handle(frame);
                    if let Err(Ended::Dropped) = self.route(outputs, &mut socket).await {
                        return Ended::Dropped;
                    }
                    // Answers make room for acks left in the mailbox.
                    if !self.acks.is_empty() && self.has_ack_room() {
                        self.acks.wake();
                    }
                    // Time spent waiting for room in a subscriber's queue is not the server's
                    // silence.
                    silent_until = Instant::now() + silence_max;
                }
                command = self.commands.recv() => {
                    if let Flow::Stop = self.on_command(command, Some(&mut socket)).await {
                        let _ = socket.close(None).await;
                        return Ended::Stop;
                    }
                }
                () = self.acks.recorded() => {
                    if self.send_acks(&mut socket, None).await.is_err() {
                        return Ended::Dropped;
                    }
                }
                () = sleep_until(silent_until) => {
                    tracing::debug!("herald-client: no frame for {silence_max:?}, reconnecting");
                    return Ended::Dropped;
                }
                () = sleep_until(retry_at.unwrap_or_else(far_future)), if retry_at.is_some() => {
                    self.retry_at = None;
                    let frames = self.session.retry_waiting();
                    if send_all(&mut socket, frames).await.is_err() {
                        return Ended::Dropped;
                    }
                }
            }
        }
    }

    /// Acts on the session's outputs. Only a failed send ends the connection.
    async fn route(&mut self, outputs: Vec<Output>, socket: &mut Socket) -> Result<(), Ended> {
        for output in outputs {
            match output {
                Output::Event { channel, event } => {
                    let closes = matches!(event, Event::Closed { .. });
                    let Some(subscriber) = self.subscribers.get(&channel) else {
                        continue;
                    };
                    if subscriber.events.send(event).await.is_err() {
                        // The application dropped the subscription.
                        self.subscribers.remove(&channel);
                        self.fail_ack_waiters(&channel);
                        let frames = self.session.unsubscribe(&channel);
                        send_all(socket, frames).await.map_err(|_| Ended::Dropped)?;
                    } else if closes {
                        self.subscribers.remove(&channel);
                        self.fail_ack_waiters(&channel);
                    }
                }
                Output::Acked { req, ack } => {
                    self.retry_rounds = 0;
                    if let Some((reply, _permit)) = self.waiters.remove(&req) {
                        let _ = reply.send(Ok(ack));
                    }
                }
                Output::PublishFailed { req, error } => {
                    if let Some((reply, _permit)) = self.waiters.remove(&req) {
                        let _ = reply.send(Err(ClientError::Publish(error)));
                    }
                }
                Output::Send(frame) => {
                    send_all(socket, vec![frame])
                        .await
                        .map_err(|_| Ended::Dropped)?;
                }
                Output::RetryLater => {
                    if self.retry_at.is_none() {
                        let delay = self.delay(self.retry_rounds.min(16));
                        self.retry_rounds = self.retry_rounds.saturating_add(1);
                        self.retry_at = Some(Instant::now() + delay);
                    }
                }
                Output::ConnectionError(error) => {
                    tracing::warn!(code = %error.code, message = %error.message, "herald-client: server error");
                }
                Output::Delivery {
                    channel,
                    message,
                    delivery,
                } => {
                    let Some(subscriber) = self.subscribers.get(&channel) else {
                        continue;
                    };
                    let ack = AckHandle::new(
                        self.acks.clone(),
                        subscriber.channel.clone(),
                        message.position.clone(),
                    );
                    let event = Event::Delivery(Box::new(Delivery {
                        message: *message,
                        delivery,
                        ack,
                    }));
                    if subscriber.events.send(event).await.is_err() {
                        self.subscribers.remove(&channel);
                        self.fail_ack_waiters(&channel);
                        let frames = self.session.unsubscribe(&channel);
                        send_all(socket, frames).await.map_err(|_| Ended::Dropped)?;
                    }
                }
                Output::AckConfirmed { req } => {
                    if let Some((_, reply)) = self.ack_waiters.remove(&req) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Output::AckFailed {
                    req,
                    channel,
                    error,
                } => {
                    let rejected = AckError::Rejected {
                        code: error.code.clone(),
                        message: error.message.clone(),
                    };
                    if let Some((_, reply)) = self.ack_waiters.remove(&req) {
                        let _ = reply.send(Err(rejected));
                    } else if let Some(subscriber) = self.subscribers.get(&channel) {
                        // Nobody awaits this ack: the subscription hears of it, so a refused
                        // ack is never silent.
                        tracing::warn!(%channel, code = %error.code, message = %error.message, "herald-client: ack refused");
                        let event = Event::Error {
                            code: error.code,
                            message: error.message,
                            retryable: false,
                        };
                        let _ = subscriber.events.send(event).await;
                    }
                }
            }
        }
        Ok(())
    }

    fn has_ack_room(&self) -> bool {
        self.session.acks_pending() < self.options.acks_in_flight_max
    }

    /// Takes the ack mailbox (only `only_channel`'s acks when given, regardless of room) and
    /// sends the frames the session makes of it.
    async fn send_acks(
        &mut self,
        socket: &mut Socket,
        only_channel: Option<&str>,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        if only_channel.is_none() && !self.has_ack_room() {
            // Answers wake the mailbox again (see `serve`).
            return Ok(());
        }
        let mut taken = self.acks.take();
        if let Some(only) = only_channel {
            // Put the other channels' acks back for the next round.
            let others: Vec<String> = taken.keys().filter(|c| *c != only).cloned().collect();
            for channel in others {
                let acks = taken.remove(&channel).expect("listed");
                self.acks.restore(channel, acks);
            }
        }
        let mut frames = Vec::new();
        for (channel, acks) in taken {
            frames.extend(self.queue_acks(&channel, acks));
        }
        send_all(socket, frames).await
    }

    /// Hands one channel's acks to the session; returns the frames to send now.
    fn queue_acks(&mut self, channel: &str, acks: ChannelAcks) -> Vec<ClientFrame> {
        let mut frames = Vec::new();
        let through = acks.through_positions();
        let singles = acks.single_positions();
        if !through.is_empty() || !singles.is_empty() {
            match self.session.ack(channel, &through, &singles) {
                Ok(queued) => frames.extend(queued.frames),
                Err(refused) => {
                    tracing::debug!(%refused, "herald-client: acks dropped");
                }
            }
        }
        for awaited in acks.awaited {
            let (through, singles) = match awaited.kind {
                Kind::Through => (vec![awaited.position], Vec::new()),
                Kind::One => (Vec::new(), vec![awaited.position]),
            };
            match self.session.ack(channel, &through, &singles) {
                Ok(queued) => {
                    frames.extend(queued.frames);
                    let req = *queued.reqs.last().expect("one ack makes one frame");
                    self.ack_waiters
                        .insert(req, (channel.to_owned(), awaited.reply));
                }
                Err(_) => {
                    let _ = awaited
                        .reply
                        .send(Err(AckError::Unsubscribed(channel.to_owned())));
                }
            }
        }
        frames
    }

    /// Answers the awaited acks of a subscription that ended.
    fn fail_ack_waiters(&mut self, channel: &str) {
        let ended: Vec<u64> = self
            .ack_waiters
            .iter()
            .filter(|(_, (waiting_channel, _))| waiting_channel == channel)
            .map(|(req, _)| *req)
            .collect();
        for req in ended {
            let (_, reply) = self.ack_waiters.remove(&req).expect("listed");
            let _ = reply.send(Err(AckError::Unsubscribed(channel.to_owned())));
        }
    }

    /// Applies one command; `socket` is the live connection, if any. A failed send is left
    /// for the read side to notice (the frame stays pending in the session).
    async fn on_command(
        &mut self,
        command: Option<Command>,
        mut socket: Option<&mut Socket>,
    ) -> Flow {
        let Some(command) = command else {
            // Every handle is gone.
            self.shutdown(None);
            return Flow::Stop;
        };
        let frames = match command {
            Command::Publish {
                channel,
                message,
                reply,
                permit,
            } => {
                if reply.is_closed() {
                    return Flow::Continue;
                }
                let (req, frames) = self.session.publish(&channel, message);
                self.waiters.insert(req, (reply, permit));
                frames
            }
            Command::Subscribe {
                channel,
                options,
                subscriber,
                events,
                reply,
            } => {
                if self.session.is_subscribed(&channel) {
                    let _ = reply.send(Err(ClientError::AlreadySubscribed(channel)));
                    return Flow::Continue;
                }
                let frames = self.session.subscribe(&channel, options);
                self.subscribers.insert(
                    channel.clone(),
                    Subscriber {
                        id: subscriber,
                        events,
                        channel: Arc::from(channel.as_str()),
                    },
                );
                let _ = reply.send(Ok(()));
                frames
            }
            Command::Unsubscribe {
                channel,
                subscriber,
            } => {
                let current = self.subscribers.get(&channel).map(|current| current.id);
                if current != Some(subscriber) {
                    return Flow::Continue;
                }
                // Acks made just before the drop go out first: the server takes frames in
                // order, so they apply before the unsubscribe.
                if let Some(socket) = socket.as_deref_mut() {
                    let _ = self.send_acks(socket, Some(&channel)).await;
                }
                self.subscribers.remove(&channel);
                self.fail_ack_waiters(&channel);
                self.session.unsubscribe(&channel)
            }
            Command::RecoveryKey { reply } => {
                let _ = reply.send(self.session.recovery_key());
                Vec::new()
            }
            Command::Close { reply } => {
                if let Some(socket) = socket.as_deref_mut() {
                    let channels: Vec<String> = self.subscribers.keys().cloned().collect();
                    for channel in channels {
                        let _ = self.send_acks(socket, Some(&channel)).await;
                    }
                }
                self.shutdown(None);
                let _ = reply.send(());
                return Flow::Stop;
            }
        };
        if let Some(socket) = socket {
            let _ = send_all(socket, frames).await;
        }
        Flow::Continue
    }

    /// Ends every subscription, pending publish and awaited ack; `stop` says why when the
    /// server ended the client (`None`: the application closed or dropped it).
    fn shutdown(&mut self, stop: Option<Stop>) {
        // Recorded before anyone hears about it, so a caller that got an error sees it.
        *self.stop.lock().expect("stop lock") = stop.clone();
        self.state.send_modify(|state| {
            state.connected = false;
            state.stopped = true;
        });
        let reason = stop
            .as_ref()
            .map_or_else(|| "the client was closed".to_owned(), Stop::reason);
        let ack_error = stop.as_ref().map_or(AckError::Closed, Stop::ack_error);
        self.acks.stop(ack_error.clone());
        for (_, (_, reply)) in self.ack_waiters.drain() {
            let _ = reply.send(Err(ack_error.clone()));
        }
        for (_, subscriber) in std::mem::take(&mut self.subscribers) {
            if matches!(stop, Some(Stop::TakenOver)) {
                let _ = subscriber.events.try_send(Event::TakenOver);
            }
            let _ = subscriber.events.try_send(Event::Closed {
                reason: reason.clone(),
            });
        }
        for (_, (reply, _permit)) in self.waiters.drain() {
            let error = stop.as_ref().map_or(ClientError::Closed, Stop::error);
            let _ = reply.send(Err(error));
        }
        self.commands.close();
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

async fn send_all(
    socket: &mut Socket,
    frames: Vec<ClientFrame>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    if frames.is_empty() {
        return Ok(());
    }
    for frame in frames {
        socket.feed(WsMessage::text(frame.to_json())).await?;
    }
    socket.flush().await
}

/// Close codes after which the client stops: reconnecting cannot help (4001, 4003), or would
/// take an at-least-once subscriber back from the connection that just took it over (4004).
fn fatal_close(code: Option<CloseCode>) -> Option<Stop> {
    match code.map(u16::from) {
        Some(ws::close::UNAUTHORIZED) => {
            Some(Stop::Rejected("unauthorized (close code 4001)".to_owned()))
        }
        Some(ws::close::UNSUPPORTED_PROTOCOL) => Some(Stop::Rejected(
            "unsupported protocol (close code 4003)".to_owned(),
        )),
        Some(ws::close::TAKEN_OVER) => Some(Stop::TakenOver),
        _ => None,
    }
}

/// Opens the socket and completes the `connect` / `connected` handshake.
async fn open(options: &ClientOptions) -> Result<(Socket, Connected), OpenError> {
    let handshake = async {
        let (mut socket, _response) = connect_async(options.url.as_str())
            .await
            .map_err(|error| OpenError::Retry(error.to_string()))?;
        let connect = ClientFrame::Connect(ws::Connect {
            kind: ws::ConnectTag::Tag,
            protocol: ws::PROTOCOL_VERSION,
            auth: options.key.as_ref().map(|key| ws::Auth {
                key: Some(key.clone()),
                token: None,
            }),
            client: Some(concat!("herald-client/", env!("CARGO_PKG_VERSION")).to_owned()),
        });
        socket
            .send(WsMessage::text(connect.to_json()))
            .await
            .map_err(|error| OpenError::Retry(error.to_string()))?;
        loop {
            let message = match socket.next().await {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(OpenError::Retry(error.to_string())),
                None => return Err(OpenError::Retry("closed during the handshake".into())),
            };
            match message {
                WsMessage::Text(text) => match ServerFrame::from_json(text.as_str()) {
                    Ok(ServerFrame::Connected(connected)) => return Ok((socket, connected)),
                    Ok(ServerFrame::Error(error)) => {
                        let reason = format!("{}: {}", error.code, error.message);
                        let fatal = matches!(
                            error.code.as_str(),
                            "unauthorized" | "forbidden" | "unsupported_protocol"
                        );
                        return Err(if fatal {
                            OpenError::Fatal(reason)
                        } else {
                            OpenError::Retry(reason)
                        });
                    }
                    Ok(_) | Err(_) => {
                        return Err(OpenError::Retry(format!(
                            "expected `connected`, got {}",
                            text.as_str()
                        )));
                    }
                },
                WsMessage::Close(close) => {
                    let code = close.as_ref().map(|close| close.code);
                    return Err(match fatal_close(code) {
                        Some(stop) => OpenError::Fatal(stop.reason()),
                        None => OpenError::Retry(format!("closed during the handshake: {close:?}")),
                    });
                }
                _ => {}
            }
        }
    };
    timeout(options.handshake_timeout, handshake)
        .await
        .unwrap_or_else(|_| Err(OpenError::Retry("handshake timed out".into())))
}
