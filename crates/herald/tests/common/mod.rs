//! Shared by the tests that drive the real `herald` binary and SIGKILL it: the spawned server
//! and a seeded generator for kill points.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long `herald serve` may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// `herald serve --dev` on 127.0.0.1 port 0; killed and reaped on drop so a failing test
/// never leaks it.
pub struct SpawnedServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The MQTT listener's address, when started with [`SpawnedServer::start_with_mqtt`].
    pub mqtt_addr: Option<std::net::SocketAddr>,
}

impl SpawnedServer {
    /// Starts the server on `data_dir`, its stderr appended to `log_path`, and waits for its
    /// listening line.
    pub fn start(data_dir: &Path, log_path: &Path) -> SpawnedServer {
        Self::spawn(data_dir, log_path, None)
    }

    /// [`SpawnedServer::start`] with the MQTT listener on `mqtt` (a fixed address, so that
    /// clients find it again after a restart).
    pub fn start_with_mqtt(
        data_dir: &Path,
        log_path: &Path,
        mqtt: std::net::SocketAddr,
    ) -> SpawnedServer {
        Self::spawn(data_dir, log_path, Some(mqtt))
    }

    fn spawn(
        data_dir: &Path,
        log_path: &Path,
        mqtt: Option<std::net::SocketAddr>,
    ) -> SpawnedServer {
        let mqtt_args = match mqtt {
            Some(addr) => vec!["--mqtt".to_owned(), addr.to_string()],
            None => vec!["--no-mqtt".to_owned()],
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .expect("open the server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .arg("--data")
            .arg(data_dir)
            .args(["--http", "127.0.0.1:0", "--dev"])
            .args(&mqtt_args)
            .env_remove("HERALD_URL")
            .env_remove("HERALD_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn herald serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines_sender, lines) = mpsc::channel();
        // Drains stdout for the life of the process so the server never blocks on a full pipe;
        // the thread ends when the process dies and the pipe closes.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_sender.send(line);
            }
        });
        let mut server = SpawnedServer {
            child,
            base_url: String::new(),
            mqtt_addr: None,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(address) = line.strip_prefix("herald: listening on ") {
                        server.base_url = address.trim().trim_end_matches('/').to_owned();
                    } else if let Some(address) =
                        line.strip_prefix("herald: mqtt listening on mqtt://")
                    {
                        server.mqtt_addr = address.trim().parse().ok();
                    }
                    if !server.base_url.is_empty() && (mqtt.is_none() || server.mqtt_addr.is_some())
                    {
                        return server;
                    }
                }
                Err(_) => {
                    let log = std::fs::read_to_string(log_path).unwrap_or_default();
                    panic!(
                        "herald serve printed no listening line within {STARTUP_TIMEOUT:?} \
                         (status {:?}); its stderr:\n{log}",
                        server.child.try_wait()
                    );
                }
            }
        }
    }

    pub fn ws_url(&self) -> String {
        format!("{}/v1/ws", self.base_url.replacen("http://", "ws://", 1))
    }

    /// SIGKILL (what `Child::kill` sends on unix), and proof that the process died of it
    /// rather than having exited on its own before.
    pub fn kill9(mut self) {
        assert!(
            self.child.try_wait().expect("poll server").is_none(),
            "the server exited before the kill"
        );
        self.child.kill().expect("SIGKILL the server");
        let status = self.child.wait().expect("reap the server");
        assert_eq!(
            status.signal(),
            Some(9),
            "server status after kill: {status:?}"
        );
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seed in the environment variable `variable`, or one from the clock (print it, so a
/// failing run can be replayed).
pub fn seed(variable: &str) -> u64 {
    match std::env::var(variable) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{variable} must be a u64")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// splitmix64: a tiny seeded generator, enough to spread kill moments.
pub fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
