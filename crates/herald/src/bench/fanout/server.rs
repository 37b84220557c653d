//! The server under test: a `herald serve --dev` child that the bench starts on a free loopback
//! port with a fresh data directory, and what `/proc` says about a process (CPU time, RSS).
//!
//! # Invariants
//! - The child is stopped and its temporary directory removed on every exit path (see
//!   `bench::process`).
//! - The child's stdout is drained for its whole life, so it can never block on a full pipe;
//!   its stderr (the log) goes to a file that is shown when the start fails.

use tokio::io::{AsyncBufReadExt, BufReader};

use super::*;
use crate::bench::process::BenchProcess;

/// How long the child may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `herald serve --dev` child process.
pub(crate) struct ChildServer {
    /// The process; its directory holds `data/` (the server's data directory) and
    /// `server.log`.
    process: BenchProcess,
    pub(crate) pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub(crate) url: String,
}

impl ChildServer {
    /// Starts this same executable as `herald serve --dev --no-mqtt --http 127.0.0.1:0` (MQTT
    /// off: the bench does not use it, and 127.0.0.1:1883 may be taken) and waits for
    /// its `herald: listening on http://ADDR` line. `HERALD_*` variables in the environment
    /// (for example `HERALD_STORAGE__BACKEND=memory`) configure it as usual.
    pub(crate) async fn start(tag: &str) -> anyhow::Result<ChildServer> {
        let exe = std::env::current_exe().context("finding the herald executable")?;
        let dir =
            std::env::temp_dir().join(format!("herald-bench-fanout-{}-{tag}", std::process::id()));
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut command = tokio::process::Command::new(&exe);
        command
            .args([
                "serve",
                "--dev",
                "--no-mqtt",
                "--http",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(&data_dir);
        let mut process = BenchProcess::spawn(command, dir, "server.log")?;
        let stdout = process.child.stdout.take().expect("stdout is piped");
        let mut server = ChildServer {
            pid: process.pid,
            process,
            url: String::new(),
        };
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(STARTUP_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("herald: listening on ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await;
        match listening {
            Ok(Some(url)) => server.url = url,
            Ok(None) => bail!(
                "the server exited before listening; its log:\n{}",
                server.log_tail()
            ),
            Err(_) => bail!(
                "the server did not listen within {STARTUP_TIMEOUT:?}; its log:\n{}",
                server.log_tail()
            ),
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(server)
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

/// Which process `/proc` figures are read for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Process {
    This,
    Pid(u32),
}

impl Process {
    fn proc_path(self, file: &str) -> PathBuf {
        match self {
            Process::This => PathBuf::from(format!("/proc/self/{file}")),
            Process::Pid(pid) => PathBuf::from(format!("/proc/{pid}/{file}")),
        }
    }

    /// User plus system CPU time of all the process's threads, in microseconds (with the
    /// kernel's clock-tick resolution, usually 10 ms).
    pub(crate) fn cpu_time_us(self) -> anyhow::Result<u64> {
        let path = self.proc_path("stat");
        let stat = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ticks = parse_stat_cpu_ticks(&stat)
            .ok_or_else(|| anyhow!("{} has no CPU times", path.display()))?;
        Ok(ticks * 1_000_000 / clock_ticks_per_second())
    }

    /// Resident set size in KiB (`VmRSS`).
    pub(crate) fn rss_kib(self) -> anyhow::Result<u64> {
        let path = self.proc_path("status");
        let status = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        parse_status_rss_kib(&status).ok_or_else(|| anyhow!("{} has no VmRSS", path.display()))
    }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces, so fields are counted after the last `)`.
pub(crate) fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name come field 3 (state) onwards: utime is field 14, the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The `VmRSS:  1234 kB` line of `/proc/PID/status`.
pub(crate) fn parse_status_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

/// Raises this process's soft open-file limit to at least `needed` (children inherit it), up
/// to the hard limit. Returns the soft limit now in force.
pub(crate) fn raise_open_files_limit(needed: u64) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    if limit.rlim_cur >= needed {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: needed.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we pass, which lives for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
    }
    Ok(raised.rlim_cur)
}
