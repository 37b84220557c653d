//! A TCP fault proxy for tests: accepts on 127.0.0.1:0 and forwards every connection to a
//! target. On command it cuts every current connection (both directions closed at once, as a
//! dropped network would), refuses new connections, delays forwarding, or blackholes traffic (connections stay open
//! and nothing gets through, so only a heartbeat timeout can notice).
//!
//! Bounded: one task per direction per connection, 16 KiB buffers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct Faults {
    blackhole: AtomicBool,
    refuse: AtomicBool,
    delay_ms: AtomicU64,
    accepted: AtomicU64,
}

pub struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    /// Bumped by `cut`: every connection opened before watches it and closes.
    cuts: watch::Sender<u64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let faults = Arc::new(Faults::default());
        let (cuts, _) = watch::channel(0u64);
        let accepting = tokio::spawn(accept_loop(listener, target, faults.clone(), cuts.clone()));
        Proxy {
            addr,
            faults,
            cuts,
            accepting,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection open now; new ones are accepted as usual.
    pub fn cut(&self) {
        self.cuts.send_modify(|generation| *generation += 1);
    }

    /// While on, bytes are read and thrown away in both directions.
    pub fn blackhole(&self, on: bool) {
        self.faults.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, new connections are closed as soon as they are accepted.
    pub fn refuse(&self, on: bool) {
        self.faults.refuse.store(on, Ordering::SeqCst);
    }

    /// Delays every forwarded chunk.
    pub fn delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.faults.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.faults.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    faults: Arc<Faults>,
    cuts: watch::Sender<u64>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        faults.accepted.fetch_add(1, Ordering::SeqCst);
        if faults.refuse.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let faults = faults.clone();
        let mut cut = cuts.subscribe();
        cut.mark_unchanged();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return; // the server is down: the client sees the connection close
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            let forward = async {
                tokio::join!(
                    pipe(in_read, out_write, &faults),
                    pipe(out_read, in_write, &faults)
                )
            };
            tokio::select! {
                _ = forward => {}
                _ = cut.changed() => {} // dropping both halves closes both sockets
            }
        });
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: &Faults,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
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
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
