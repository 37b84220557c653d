//! The brokers under test, each a child process the bench starts on a free loopback port and
//! stops at the end: Herald (this executable, `serve --dev --mqtt 127.0.0.1:0`, fresh data
//! directory) and Mosquitto (from the `mosquitto` package, with a generated minimal config:
//! anonymous access, persistence off).
//!
//! # Invariants
//! - A child is stopped and its temporary directory removed on every exit path (see
//!   `bench::process`), and `PR_SET_PDEATHSIG` stops it if the bench itself is killed. One gap: a
//!   Mosquitto started as root drops to the `mosquitto` user, which clears the parent-death
//!   signal, so only that broker can outlive a bench killed with SIGKILL.
//! - A child's stdout is drained for its whole life, so it never blocks on a full pipe; its
//!   stderr (the log) goes to a file whose tail is shown when the start fails.

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::*;
use crate::bench::process::BenchProcess;

/// How long a broker may take to listen.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the bench tries to connect to a starting Mosquitto.
const STARTUP_POLL: Duration = Duration::from_millis(20);
/// Where Debian's `mosquitto` package puts the broker.
pub(crate) const MOSQUITTO_DEFAULT_PATH: &str = "/usr/sbin/mosquitto";

/// A broker the bench can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Broker {
    Herald,
    Mosquitto,
}

impl Broker {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Broker::Herald => "herald",
            Broker::Mosquitto => "mosquitto",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Broker, String> {
        match text.trim() {
            "herald" => Ok(Broker::Herald),
            "mosquitto" => Ok(Broker::Mosquitto),
            other => Err(format!(
                "unknown broker {other:?}; expected herald or mosquitto"
            )),
        }
    }
}

/// A running broker.
pub(crate) struct BrokerProcess {
    pub(crate) broker: Broker,
    /// Its directory holds the data directory or config file, and `broker.log`.
    process: BenchProcess,
    pub(crate) pid: u32,
    pub(crate) mqtt_port: u16,
    /// Herald's `http://ADDR`, for `/metrics`.
    pub(crate) http_url: Option<String>,
    /// `herald 0.1.0`, `mosquitto version 2.0.11`.
    pub(crate) version: String,
}

impl BrokerProcess {
    /// Starts this executable as `herald serve --dev --http 127.0.0.1:0 --mqtt 127.0.0.1:0`
    /// and waits for its two listening lines. `HERALD_*` variables configure it as usual.
    pub(crate) async fn start_herald(tag: &str) -> anyhow::Result<BrokerProcess> {
        let exe = std::env::current_exe().context("finding the herald executable")?;
        let dir = bench_dir(Broker::Herald, tag)?;
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut command = tokio::process::Command::new(&exe);
        command
            .args([
                "serve",
                "--dev",
                "--http",
                "127.0.0.1:0",
                "--mqtt",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(&data_dir);
        let mut process = spawn(Broker::Herald, command, dir)?;
        process.version = format!("herald {}", env!("CARGO_PKG_VERSION"));
        let stdout = process
            .process
            .child
            .stdout
            .take()
            .expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(STARTUP_TIMEOUT, async {
            let mut http_url = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("herald: listening on ") {
                    http_url = Some(url.trim().to_owned());
                } else if let Some(addr) = line.strip_prefix("herald: mqtt listening on mqtt://") {
                    let addr: SocketAddr = addr.trim().parse().ok()?;
                    return Some((http_url?, addr.port()));
                }
            }
            None
        })
        .await;
        match listening {
            Ok(Some((http_url, port))) => {
                process.http_url = Some(http_url);
                process.mqtt_port = port;
            }
            Ok(None) => bail!(
                "herald exited before listening on MQTT; its log:\n{}",
                process.log_tail()
            ),
            Err(_) => bail!(
                "herald did not listen within {STARTUP_TIMEOUT:?}; its log:\n{}",
                process.log_tail()
            ),
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(process)
    }

    /// Starts `binary -c CONFIG` ([`mosquitto_config`]) on a free loopback port and waits until
    /// it accepts a connection. The config keeps everything in memory (`persistence false`).
    pub(crate) async fn start_mosquitto(
        binary: &Path,
        tag: &str,
        inflight: u16,
    ) -> anyhow::Result<BrokerProcess> {
        let version = mosquitto_version(binary).await;
        let dir = bench_dir(Broker::Mosquitto, tag)?;
        let port = match free_port() {
            Ok(port) => port,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        let config_path = dir.join("mosquitto.conf");
        if let Err(error) = std::fs::write(&config_path, mosquitto_config(port, inflight)) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error).with_context(|| format!("writing {}", config_path.display()));
        }
        let mut command = tokio::process::Command::new(binary);
        command.arg("-c").arg(&config_path);
        let mut process = spawn(Broker::Mosquitto, command, dir)?;
        process.version = version;
        process.mqtt_port = port;
        let stdout = process
            .process
            .child
            .stdout
            .take()
            .expect("stdout is piped");
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(_)) = lines.next_line().await {}
        });
        let give_up = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(process);
            }
            if let Ok(Some(status)) = process.process.child.try_wait() {
                bail!(
                    "mosquitto exited ({status}) before listening; its log:\n{}",
                    process.log_tail()
                );
            }
            if Instant::now() >= give_up {
                bail!(
                    "mosquitto did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT:?}; \
                     its log:\n{}",
                    process.log_tail()
                );
            }
            tokio::time::sleep(STARTUP_POLL).await;
        }
    }

    fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// SIGTERM, then SIGKILL if it has not exited in time. Returns whether it exited
    /// gracefully with success.
    pub(crate) async fn stop(self) -> bool {
        self.process.stop().await
    }
}

/// A fresh temporary directory for one broker of this invocation.
fn bench_dir(broker: Broker, tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "herald-bench-mqtt-{}-{}-{tag}",
        broker.as_str(),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Spawns `command` (see [`BenchProcess::spawn`]) as `broker`.
fn spawn(
    broker: Broker,
    command: tokio::process::Command,
    dir: PathBuf,
) -> anyhow::Result<BrokerProcess> {
    let process = BenchProcess::spawn(command, dir, "broker.log")
        .with_context(|| format!("starting {}", broker.as_str()))?;
    Ok(BrokerProcess {
        broker,
        pid: process.pid,
        process,
        mqtt_port: 0,
        http_url: None,
        version: String::new(),
    })
}

/// The generated Mosquitto configuration: one loopback listener, anonymous clients, nothing
/// written to disk, errors and warnings logged to stderr, and `inflight` QoS 1/2 messages in
/// flight per client each way. The last one matters: Mosquitto's default (20) also bounds a
/// v3.1.1 client's unreleased incoming QoS 2 publishes, and over it Mosquitto sends PUBREC
/// and discards the message, so a publisher with a wider window would lose messages. Herald's
/// own limits (`mqtt.receive_maximum`, `mqtt.outbound_inflight_max`) default to 64.
pub(crate) fn mosquitto_config(port: u16, inflight: u16) -> String {
    format!(
        "# Generated by herald bench mqtt.\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         max_inflight_messages {inflight}\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

/// A loopback port that was free a moment ago (Mosquitto cannot be told to pick one and
/// report it, unlike Herald).
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// `mosquitto version X.Y.Z`, the first line of `mosquitto -h`, or `mosquitto` if unknown.
async fn mosquitto_version(binary: &Path) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(binary)
            .arg("-h")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    output
        .ok()
        .and_then(Result::ok)
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .find(|line| line.starts_with("mosquitto version"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "mosquitto".to_owned())
}

/// The Mosquitto binary to run: `explicit` if given (and present), else the Debian path, else
/// `mosquitto` on `PATH`. `None` when there is none.
pub(crate) fn find_mosquitto(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.is_file().then(|| path.to_owned());
    }
    let debian = PathBuf::from(MOSQUITTO_DEFAULT_PATH);
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("mosquitto"))
            .find(|candidate| candidate.is_file())
    })
}

/// Herald's `/metrics` counters that the report shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HeraldCounters {
    /// Group commits: one write + fsync each.
    pub(crate) group_commits: u64,
    /// MQTT PUBLISH packets made durable.
    pub(crate) publishes_durable: u64,
    /// MQTT deliveries dropped (full feed or window).
    pub(crate) deliveries_dropped: u64,
    /// State records saved (MQTT persistent sessions save theirs before each delivery batch).
    pub(crate) state_saves: u64,
}

impl HeraldCounters {
    /// Reads the counters from the Prometheus text format; a missing one stays 0.
    pub(crate) fn parse(text: &str) -> HeraldCounters {
        let mut counters = HeraldCounters::default();
        for line in text.lines() {
            let Some((name, value)) = line.split_once(' ') else {
                continue;
            };
            let slot = match name {
                "herald_store_group_commits_total" => &mut counters.group_commits,
                "herald_mqtt_publishes_durable_total" => &mut counters.publishes_durable,
                "herald_mqtt_deliveries_dropped_total" => &mut counters.deliveries_dropped,
                "herald_store_state_saves_total" => &mut counters.state_saves,
                _ => continue,
            };
            if let Ok(value) = value.trim().parse::<f64>() {
                *slot = value as u64;
            }
        }
        counters
    }

    pub(crate) fn since(self, before: HeraldCounters) -> HeraldCounters {
        HeraldCounters {
            group_commits: self.group_commits.saturating_sub(before.group_commits),
            publishes_durable: self
                .publishes_durable
                .saturating_sub(before.publishes_durable),
            deliveries_dropped: self
                .deliveries_dropped
                .saturating_sub(before.deliveries_dropped),
            state_saves: self.state_saves.saturating_sub(before.state_saves),
        }
    }
}

/// Reads Herald's `/metrics`; `None` when it cannot (the window then shows no server figures).
pub(crate) async fn read_metrics(
    client: &reqwest::Client,
    http_url: &str,
) -> Option<HeraldCounters> {
    let response = client
        .get(format!("{}/metrics", http_url.trim_end_matches('/')))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    Some(HeraldCounters::parse(&response.text().await.ok()?))
}
