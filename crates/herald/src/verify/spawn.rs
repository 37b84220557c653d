//! `herald verify --spawn`: a local `herald serve --dev` (this same executable) that verify can
//! SIGKILL and restart on the same port and data directory.
//!
//! # Invariants
//! - At most one server process at a time; it is killed when [`SpawnedServer`] is dropped, and
//!   also when verify itself dies (`PR_SET_PDEATHSIG`), so none outlives a run.
//! - Its stdout is drained for its whole life; its stderr (the log) is appended to `server.log`
//!   next to the data directory, shown when a start fails.
//! - Restarts reuse the first start's port, retrying for at most [`RESTART_TIMEOUT`] while the
//!   old socket is released.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a start may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restart may keep trying (the old socket may take a moment to be released).
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// Heartbeats and SSE keep-alives of the spawned server: short, so silent connections are
/// noticed quickly.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

pub struct SpawnedServer {
    child: Option<tokio::process::Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// The temporary directory, when verify made one (removed on drop).
    _temp: Option<tempfile::TempDir>,
}

impl SpawnedServer {
    /// Starts a server on a free loopback port, in `data_dir` or a temporary directory.
    pub async fn start(data_dir: Option<&Path>) -> anyhow::Result<SpawnedServer> {
        let (temp, data_dir, log_path) = match data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let log = dir.with_extension("server.log");
                (None, dir.to_owned(), log)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("herald-verify-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                let data_dir = temp.path().join("data");
                let log = temp.path().join("server.log");
                (Some(temp), data_dir, log)
            }
        };
        let (child, pid, addr) = launch(
            &data_dir,
            &log_path,
            "127.0.0.1:0".parse()?,
            STARTUP_TIMEOUT,
        )
        .await?;
        Ok(SpawnedServer {
            child: Some(child),
            pid,
            addr,
            data_dir,
            log_path,
            _temp: temp,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, and proof that the process died of it.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("no server is running");
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "the server had exited by itself ({status}); its log:\n{}",
                log_tail(&self.log_path)
            );
        }
        child.start_kill().context("SIGKILL the server")?;
        let status = child.wait().await.context("reap the server")?;
        if status.signal() != Some(libc::SIGKILL) {
            bail!("the server ended with {status}, not SIGKILL");
        }
        Ok(())
    }

    /// Starts the server again on the same port and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + RESTART_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match launch(&self.data_dir, &self.log_path, self.addr, remaining).await {
                Ok((child, pid, _)) => {
                    self.child = Some(child);
                    self.pid = pid;
                    return Ok(());
                }
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    return Err(error.context(format!("no restart within {RESTART_TIMEOUT:?}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// SIGTERM and a bounded wait; SIGKILL if that is not enough.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: kill(2) on a child this process spawned and has not reaped yet, so the
            // pid cannot belong to another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

/// Starts `herald serve --dev --no-mqtt` on `addr` and waits (at most `startup_timeout`) for
/// its listening line. MQTT is off: verify does not use it, and its default address
/// 127.0.0.1:1883 may be taken.
async fn launch(
    data_dir: &Path,
    log_path: &Path,
    addr: SocketAddr,
    startup_timeout: Duration,
) -> anyhow::Result<(tokio::process::Child, u32, SocketAddr)> {
    let exe = std::env::current_exe().context("finding the herald executable")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let heartbeat = format!("{}ms", HEARTBEAT.as_millis());
    let mut command = tokio::process::Command::new(&exe);
    command
        .args([
            "serve",
            "--dev",
            "--no-mqtt",
            "--http",
            &addr.to_string(),
            "--data",
        ])
        .arg(data_dir)
        .env("HERALD_REALTIME__HEARTBEAT_INTERVAL", &heartbeat)
        .env("HERALD_REALTIME__SSE_KEEPALIVE_INTERVAL", &heartbeat)
        .env("HERALD_REALTIME__SSE_RETRY", "200ms")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe. The kernel then SIGKILLs the server if the thread that spawned it
    // dies, so a verify killed itself leaves no server behind. Verify spawns from a runtime
    // thread (the `block_on` thread or a worker), and those live as long as the runtime.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {} serve", exe.display()))?;
    let pid = child.id().unwrap_or(0);
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(startup_timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("herald: listening on http://") {
                return url.trim().parse::<SocketAddr>().ok();
            }
        }
        None
    })
    .await;
    match listening {
        Ok(Some(addr)) => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok((child, pid, addr))
        }
        Ok(None) => {
            let _ = child.wait().await;
            bail!(
                "the server exited before listening on {addr}; its log:\n{}",
                log_tail(log_path)
            )
        }
        Err(_) => bail!(
            "the server did not listen within {startup_timeout:?}; its log:\n{}",
            log_tail(log_path)
        ),
    }
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
