//! # herald-server
//!
//! The tokio side of Herald: configuration, authentication, the HTTP API, the store behind it,
//! periodic reclaim and graceful shutdown.
//!
//! # Layout
//! - [`config`]: the typed configuration tree (defaults, TOML file, `HERALD_` environment,
//!   flags) and its validation; `default-config.toml` is what `herald config init` prints.
//! - [`auth`]: API keys, capabilities, the generated admin key, `--dev`.
//! - [`http`]: the axum router and handlers.
//! - [`error`]: the mapping of every failure onto the JSON error body.
//! - [`mqtt`]: the MQTT 3.1.1/5.0 listener (a driver of `herald_mqtt::Session`).
//!
//! # Start-up contract
//! [`run`] prints to stdout, in this order: `herald: generated admin key KEY, saved to PATH`
//! (only on the start that creates the key), then exactly one line
//! `herald: listening on http://ADDR` with the real bound address, once the store is open and
//! the socket accepts connections; then, when the MQTT listener is enabled (the default),
//! `herald: mqtt listening on mqtt://ADDR`. Logs go to stderr through `tracing`.
//!
//! # Invariants
//! - Anonymous access exists only in dev mode, and dev mode only on a loopback bind.
//! - Without configured API keys (and outside dev mode) the generated admin key is the only
//!   credential; Herald is never open by accident. With configured keys, `admin.key` is
//!   ignored.
//! - On shutdown the store is closed after the HTTP server stopped, so every acknowledged
//!   publish was durable and nothing is acknowledged afterwards.

pub mod auth;
pub mod config;
pub mod durable;
pub mod error;
pub mod filter;
pub mod http;
pub mod hub;
pub mod live;
pub mod metrics;
pub mod mqtt;
pub mod realtime;
pub mod sse;
pub mod webhook;
pub mod ws;
pub mod ws_durable;

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use herald_log::{LogStore, MemoryStore, StoreError, SystemClock};

pub use auth::AdminKey;
pub use config::{Config, ConfigError, Overrides};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    DevNotLoopback(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The MQTT listener (on by default at 127.0.0.1:1883) cannot bind: most often another
    /// MQTT broker holds the port. The message says how to move it or turn it off.
    #[error(
        "MQTT listener cannot bind {addr}: {}; pick another address with --mqtt ADDR \
         ([mqtt] listen) or turn MQTT off with --no-mqtt ([mqtt] enabled = false)",
        mqtt_bind_reason(error)
    )]
    MqttBind {
        addr: SocketAddr,
        /// Not a `source`: the message already says it in words.
        error: std::io::Error,
    },
    #[error("cannot open the message log: {0}")]
    Store(#[from] StoreError),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("webhooks: {0}")]
    Webhooks(String),
    #[error(
        "the data directory {0} is in use by another herald process (its lock file is held); \
         stop that process or use another --data directory"
    )]
    DataDirInUse(PathBuf),
}

/// Why the MQTT listener cannot bind, in words a user can act on.
fn mqtt_bind_reason(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            "address already in use (another MQTT broker or herald server?)".to_owned()
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need privileges)".to_owned()
        }
        std::io::ErrorKind::AddrNotAvailable => "no such address on this machine".to_owned(),
        _ => error.to_string(),
    }
}

/// Name of the lock file that keeps two servers from writing one data directory.
pub const DATA_DIR_LOCK_FILE: &str = "herald.lock";

/// Takes an exclusive advisory lock on the data directory. The lock lives as long as the
/// returned file and is released by the kernel even on `kill -9`.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, ServerError> {
    let path = data_dir.join(DATA_DIR_LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServerError::Io {
            what: "cannot open the lock file",
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(ServerError::DataDirInUse(data_dir.to_path_buf()))
        }
        Err(std::fs::TryLockError::Error(source)) => Err(ServerError::Io {
            what: "cannot lock",
            path,
            source,
        }),
    }
}

/// The store and how to close it.
struct StoreHandle {
    store: Arc<dyn LogStore>,
    close: Box<dyn FnOnce() + Send>,
}

/// A server that is bound and has its store open, not yet serving.
pub struct Server {
    config: Config,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    /// The MQTT listener and its bound address, when enabled.
    mqtt: Option<(tokio::net::TcpListener, SocketAddr)>,
    store: StoreHandle,
    auth: Arc<auth::Authenticator>,
    admin_key: Option<AdminKey>,
    /// Held for the server's lifetime; see [`lock_data_dir`].
    _data_dir_lock: std::fs::File,
}

impl Server {
    /// Validates the config, prepares credentials, opens the store and binds the socket.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        auth::check_dev_bind(config.dev, config.http_addr).map_err(ServerError::DevNotLoopback)?;
        if config.mqtt.enabled {
            // Anonymous MQTT is as open as anonymous HTTP: loopback only too.
            auth::check_dev_bind(config.dev, config.mqtt.listen).map_err(|message| {
                ServerError::DevNotLoopback(message.replace("http_addr", "mqtt.listen"))
            })?;
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::Io {
            what: "cannot create the data directory",
            path: config.data_dir.clone(),
            source,
        })?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let mut api_keys = config.api_keys.clone();
        let mut admin_key = None;
        let admin_key_path = config.data_dir.join(auth::ADMIN_KEY_FILE);
        if api_keys.is_empty() {
            // Outside dev mode the admin key is created if needed; in dev mode an existing one
            // keeps working, so the CLI (which sends it when it finds it) is not refused.
            if !config.dev || admin_key_path.exists() {
                let key =
                    auth::ensure_admin_key(&config.data_dir).map_err(|source| ServerError::Io {
                        what: "cannot create or read the admin key in",
                        path: config.data_dir.clone(),
                        source,
                    })?;
                api_keys.push(auth::admin_api_key(&key.key));
                admin_key = Some(key);
            }
        } else if admin_key_path.exists() {
            tracing::warn!(
                "api_keys are configured, so {} is not accepted",
                admin_key_path.display()
            );
        }
        let auth = Arc::new(auth::Authenticator::new(&api_keys, config.dev));
        let store = open_store(&config)?;
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.http_addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.http_addr,
            source,
        })?;
        let mqtt = if config.mqtt.enabled {
            let addr = config.mqtt.listen;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|error| ServerError::MqttBind { addr, error })?;
            let local = listener
                .local_addr()
                .map_err(|error| ServerError::MqttBind { addr, error })?;
            Some((listener, local))
        } else {
            None
        };
        Ok(Server {
            config,
            listener,
            local_addr,
            mqtt,
            store,
            auth,
            admin_key,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// The address the server accepts connections on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the MQTT listener accepts connections on, when it is enabled.
    pub fn mqtt_local_addr(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().map(|(_, addr)| *addr)
    }

    /// The admin key from the data dir, when no API keys are configured.
    pub fn admin_key(&self) -> Option<&AdminKey> {
        self.admin_key.as_ref()
    }

    /// The store behind the API (for tests and tools in the same process).
    pub fn store(&self) -> Arc<dyn LogStore> {
        self.store.store.clone()
    }

    /// Serves until `shutdown` completes, then drains in-flight requests for at most
    /// `http.shutdown_grace` and closes the store.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let (stopping, stopping_seen) = tokio::sync::watch::channel(false);
        let realtime = realtime::Realtime::new(
            self.store.store.clone(),
            self.config.realtime.clone(),
            self.config.http.cors_origins.clone(),
            stopping_seen.clone(),
        );
        let durable = durable::DurableContext::new(
            self.store.store.clone(),
            realtime.live.hub.clone(),
            self.config.realtime.catch_up_page_messages,
            self.config.durable.clone(),
        );
        let webhooks = webhook::Webhooks::start(durable.clone(), &self.config.webhooks)
            .map_err(ServerError::Webhooks)?;
        let sweeper = durable::sweeper::spawn(durable.clone(), stopping_seen.clone());
        // MQTT over WebSocket waits for the listener's context (dropped unused without MQTT).
        let (mqtt_ready, mqtt_seen) = tokio::sync::watch::channel(None);
        let state = http::AppState {
            store: self.store.store.clone(),
            auth: self.auth,
            limits: self.config.limits(),
            request_timeout: self.config.http.request_timeout,
            metrics: Arc::default(),
            realtime,
            durable,
            webhooks: webhooks.as_ref().map(webhook::Webhooks::counters),
            mqtt: mqtt_seen,
        };
        let mqtt = self.mqtt.map(|(listener, _)| {
            tokio::spawn(mqtt::serve(
                listener,
                state.clone(),
                self.config.mqtt.clone(),
                stopping_seen.clone(),
                mqtt_ready,
            ))
        });
        let router = http::router(state).layer(tower_http::trace::TraceLayer::new_for_http());
        let reclaim = tokio::spawn(reclaim_loop(
            self.store.store.clone(),
            self.config.storage.reclaim_interval,
        ));
        let mut stopping_seen = stopping_seen;
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stopping.send(true);
        };
        let grace = self.config.http.shutdown_grace;
        let grace_expired = async move {
            let _ = stopping_seen.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(grace).await;
        };
        // Deliveries are small frames written as they come: without TCP_NODELAY, Nagle's
        // algorithm and delayed ACKs add tens of milliseconds to their tail latency.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, router).with_graceful_shutdown(signal);
        let result = tokio::select! {
            result = served => result.map_err(ServerError::Serve),
            () = grace_expired => {
                tracing::warn!(?grace, "in-flight requests did not finish in time; stopping anyway");
                Ok(())
            }
        };
        if let Some(mqtt) = mqtt {
            // It stops on the same signal (within about 2 s); its connections' appends finish
            // before the store closes below, or fail as closed, unacknowledged. The bound
            // covers an HTTP failure, after which the signal never comes.
            let abort = mqtt.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(5), mqtt)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        reclaim.abort();
        sweeper.abort();
        if let Some(webhooks) = webhooks {
            // Their workers persist their last state into the store: before it closes.
            webhooks.stop().await;
        }
        let close = self.store.close;
        // Closing joins the committer thread, which may wait for its last fsync.
        let _ = tokio::task::spawn_blocking(close).await;
        tracing::info!("stopped");
        result
    }
}

/// Binds, prints the start-up lines to stdout and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let server = Server::bind(config).await?;
    let mut stdout = std::io::stdout().lock();
    if let Some(key) = server.admin_key().filter(|key| key.generated) {
        let _ = writeln!(
            stdout,
            "herald: generated admin key {}, saved to {}",
            key.key,
            key.path.display()
        );
    } else if let Some(key) = server.admin_key() {
        tracing::info!(path = %key.path.display(), "using the admin key from the data directory");
    }
    let _ = writeln!(
        stdout,
        "herald: listening on http://{}",
        server.local_addr()
    );
    if let Some(addr) = server.mqtt_local_addr() {
        let _ = writeln!(stdout, "herald: mqtt listening on mqtt://{addr}");
    }
    let _ = stdout.flush();
    drop(stdout);
    server.serve(shutdown).await
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is called,
/// not when the future is first polled: a supervisor that sends SIGTERM right after the
/// listening lines (which `run` prints before it polls this) gets a graceful stop, not the
/// default action. Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let wait = |listener: std::io::Result<tokio::signal::unix::Signal>,
                        name: &'static str| async move {
                match listener {
                    Ok(mut listener) => {
                        listener.recv().await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot listen for {name}");
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                () = wait(interrupt, "SIGINT") => {}
                () = wait(terminate, "SIGTERM") => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn open_store(config: &Config) -> Result<StoreHandle, ServerError> {
    let policies = config.policies();
    let clock = Arc::new(SystemClock);
    match config.storage.backend {
        config::StorageBackend::Memory => Ok(StoreHandle {
            store: Arc::new(MemoryStore::new(policies, clock)),
            close: Box::new(|| {}),
        }),
        config::StorageBackend::Embedded => {
            let options = config.storage.embedded_options();
            let log = Arc::new(herald_log::embedded::EmbeddedLog::open(
                &config.data_dir.join("log"),
                options,
                policies,
                clock,
            )?);
            let closing = log.clone();
            Ok(StoreHandle {
                store: log,
                close: Box::new(move || closing.close()),
            })
        }
    }
}

/// Reclaims storage every `interval` on the blocking pool, one pass at a time.
async fn reclaim_loop(store: Arc<dyn LogStore>, interval: std::time::Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.reclaim()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(dropped)) => tracing::debug!(dropped, "reclaimed messages"),
            Ok(Err(error)) => tracing::warn!(%error, "reclaim failed"),
            Err(error) => tracing::error!(%error, "reclaim task failed"),
        }
    }
}
