//! # herald-faults
//!
//! A small TCP fault proxy. [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every
//! connection it accepts to a target address; on command it injects the faults a real network
//! produces, so clients (the SDK's tests, `herald verify`) can be shown to survive them:
//!
//! - [`FaultProxy::cut`]: close every current connection at once, both directions, as a dropped
//!   network or a crashed middlebox would;
//! - [`FaultProxy::refuse`] / [`FaultProxy::refuse_for`]: close new connections as soon as they
//!   are accepted;
//! - [`FaultProxy::blackhole`]: keep every socket open but forward nothing (bytes are read and
//!   thrown away), so only a heartbeat timeout can notice;
//! - [`FaultProxy::pause`]: stop reading in both directions, keeping the bytes; the peers'
//!   buffers fill and the server sees a slow consumer; resuming delivers everything;
//! - [`FaultProxy::delay`]: hold every forwarded chunk for a while.
//!
//! [`ProxyOptions`] can shrink the socket buffers towards the target, so that a pause pushes
//! back on the target sooner. [`FaultProxy::heal`] clears every fault at once.
//!
//! # Invariants
//! - Bounded: one task per connection with one 16 KiB buffer per direction; nothing is queued
//!   beyond that buffer, whatever the fault.
//! - A cut closes exactly the connections open when it was asked for; later ones are unaffected.
//! - Dropping the proxy stops accepting and cuts every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// Bytes read at once per direction of a connection.
const BUFFER_BYTES: usize = 16 * 1024;

#[derive(Default)]
struct Faults {
    blackhole: AtomicBool,
    refuse: AtomicBool,
    /// Refuse new connections until this many ms after `started` (0: not set).
    refuse_until_ms: AtomicU64,
    delay_ms: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    cuts: AtomicU64,
}

/// How a proxy is set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyOptions {
    /// Receive and send buffer sizes of the proxy's sockets to the target. Small buffers make a
    /// paused connection push back on the target within a few KiB instead of the megabytes the
    /// kernel would otherwise absorb, so the target sees a slow consumer quickly.
    pub target_socket_buffer_bytes: Option<u32>,
}

/// A running proxy; see the crate docs.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    started: Instant,
    faults: Arc<Faults>,
    /// Bumped by `cut`: every connection opened before watches it and closes.
    cut_generation: watch::Sender<u64>,
    /// `true` while paused.
    paused: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `target` (call it inside a tokio runtime).
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        Self::start_with(target, ProxyOptions::default()).await
    }

    /// [`FaultProxy::start`] with options.
    pub async fn start_with(
        target: SocketAddr,
        options: ProxyOptions,
    ) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let (cut_generation, _) = watch::channel(0u64);
        let (paused, _) = watch::channel(false);
        let started = Instant::now();
        let accepting = tokio::spawn(accept_loop(
            listener,
            target,
            options,
            started,
            faults.clone(),
            cut_generation.clone(),
            paused.clone(),
        ));
        Ok(FaultProxy {
            addr,
            target,
            started,
            faults,
            cut_generation,
            paused,
            accepting,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Closes every connection open now; new ones are accepted as usual.
    pub fn cut(&self) {
        self.faults.cuts.fetch_add(1, Ordering::SeqCst);
        self.cut_generation
            .send_modify(|generation| *generation += 1);
    }

    /// While on, bytes are read and thrown away in both directions.
    pub fn blackhole(&self, on: bool) {
        self.faults.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, new connections are closed as soon as they are accepted.
    pub fn refuse(&self, on: bool) {
        self.faults.refuse.store(on, Ordering::SeqCst);
    }

    /// Refuses new connections for `duration` from now (on top of [`FaultProxy::refuse`]).
    pub fn refuse_for(&self, duration: Duration) {
        let until = self.started.elapsed() + duration;
        let until_ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX).max(1);
        self.faults
            .refuse_until_ms
            .store(until_ms, Ordering::SeqCst);
    }

    /// While on, nothing is read from either side of any connection (bytes wait in the
    /// sockets' buffers); turning it off forwards everything that waited.
    pub fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }

    /// Delays every forwarded chunk by `delay` (zero: no delay).
    pub fn delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.faults.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Clears every fault: no blackhole, pause, refusal or delay (connections stay).
    pub fn heal(&self) {
        self.blackhole(false);
        self.refuse(false);
        self.faults.refuse_until_ms.store(0, Ordering::SeqCst);
        self.pause(false);
        self.delay(Duration::ZERO);
    }

    /// Connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.faults.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed on arrival because of a refusal.
    pub fn refused(&self) -> u64 {
        self.faults.refused.load(Ordering::SeqCst)
    }

    /// Calls to [`FaultProxy::cut`] so far.
    pub fn cuts(&self) -> u64 {
        self.faults.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

impl Faults {
    fn refusing(&self, started: Instant) -> bool {
        if self.refuse.load(Ordering::SeqCst) {
            return true;
        }
        let until_ms = self.refuse_until_ms.load(Ordering::SeqCst);
        until_ms > 0 && started.elapsed().as_millis() < u128::from(until_ms)
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    options: ProxyOptions,
    started: Instant,
    faults: Arc<Faults>,
    cut_generation: watch::Sender<u64>,
    paused: watch::Sender<bool>,
) {
    loop {
        let inbound = match listener.accept().await {
            Ok((inbound, _)) => inbound,
            Err(_) => {
                // Out of file descriptors, say: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        faults.accepted.fetch_add(1, Ordering::SeqCst);
        if faults.refusing(started) {
            faults.refused.fetch_add(1, Ordering::SeqCst);
            drop(inbound);
            continue;
        }
        let faults = faults.clone();
        let mut cut = cut_generation.subscribe();
        cut.mark_unchanged();
        let paused = paused.subscribe();
        tokio::spawn(async move {
            let outbound = tokio::select! {
                connected = connect(target, options) => match connected {
                    Ok(outbound) => outbound,
                    // The target is down: the client sees its connection close.
                    Err(_) => return,
                },
                _ = cut.changed() => return,
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            let forward = async {
                tokio::join!(
                    pipe(in_read, out_write, &faults, paused.clone()),
                    pipe(out_read, in_write, &faults, paused.clone())
                )
            };
            tokio::select! {
                _ = forward => {}
                // Dropping both halves of both sockets closes them.
                _ = cut.changed() => {}
            }
        });
    }
}

async fn connect(target: SocketAddr, options: ProxyOptions) -> std::io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(bytes) = options.target_socket_buffer_bytes {
        socket.set_recv_buffer_size(bytes)?;
        socket.set_send_buffer_size(bytes)?;
    }
    socket.connect(target).await
}

async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    faults: &Faults,
    mut paused: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        if paused.wait_for(|paused| !*paused).await.is_err() {
            break; // the proxy is gone
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let delay_ms = faults.delay_ms.load(Ordering::SeqCst);
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if faults.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        // A chunk read just before a pause is held until the pause ends.
        if paused.wait_for(|paused| !*paused).await.is_err() {
            break;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.1:0.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    const WAIT: Duration = Duration::from_secs(5);

    async fn round_trip(socket: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        socket.write_all(text).await?;
        let mut answer = vec![0u8; text.len()];
        socket.read_exact(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn forwards_then_cut_closes_only_the_connections_open_at_the_time() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut first, b"hello").await.unwrap(), b"hello");
        proxy.cut();
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(WAIT, first.read(&mut byte))
            .await
            .unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        let mut second = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut second, b"again").await.unwrap(), b"again");
        assert_eq!(proxy.accepted(), 2);
        assert_eq!(proxy.cuts(), 1);
    }

    #[tokio::test]
    async fn refuse_for_closes_new_connections_until_it_runs_out() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        proxy.refuse_for(Duration::from_millis(300));
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        let outcome = tokio::time::timeout(WAIT, round_trip(&mut refused, b"x"))
            .await
            .unwrap();
        assert!(outcome.is_err(), "a refused connection gets no answer");
        tokio::time::sleep(Duration::from_millis(350)).await;
        let mut accepted = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut accepted, b"ok").await.unwrap(), b"ok");
        assert_eq!(proxy.refused(), 1);
    }

    #[tokio::test]
    async fn blackhole_swallows_bytes_and_keeps_the_socket_open() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut socket, b"a").await.unwrap(), b"a");
        proxy.blackhole(true);
        socket.write_all(b"lost").await.unwrap();
        let mut byte = [0u8; 1];
        let silent = tokio::time::timeout(Duration::from_millis(300), socket.read(&mut byte)).await;
        assert!(silent.is_err(), "nothing comes back and nothing closes");
        proxy.blackhole(false);
        assert_eq!(round_trip(&mut socket, b"b").await.unwrap(), b"b");
    }

    #[tokio::test]
    async fn pause_holds_bytes_and_resume_delivers_them() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut socket, b"a").await.unwrap(), b"a");
        proxy.pause(true);
        socket.write_all(b"kept").await.unwrap();
        let mut answer = [0u8; 4];
        let held =
            tokio::time::timeout(Duration::from_millis(300), socket.read_exact(&mut answer)).await;
        assert!(held.is_err(), "nothing is forwarded while paused");
        proxy.pause(false);
        tokio::time::timeout(WAIT, socket.read_exact(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&answer, b"kept");
    }

    #[tokio::test]
    async fn delay_holds_each_chunk() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.delay(Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(round_trip(&mut socket, b"slow").await.unwrap(), b"slow");
        // Once on the way there, once on the way back.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        proxy.heal();
        let started = Instant::now();
        assert_eq!(round_trip(&mut socket, b"fast").await.unwrap(), b"fast");
        assert!(started.elapsed() < Duration::from_millis(150));
    }
}
