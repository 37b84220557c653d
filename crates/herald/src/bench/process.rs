//! A process a bench starts and owns (a `herald serve` under test, a Mosquitto to compare
//! with): its temporary directory, its log, and its end.
//!
//! # Invariants
//! - Stopped on every exit path: [`BenchProcess::stop`] (SIGTERM, then SIGKILL after
//!   [`STOP_TIMEOUT`]) on the normal one, `Drop` (SIGKILL) otherwise; its directory is removed
//!   either way.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

/// How long a child gets to shut down gracefully.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a child's log shown when it fails.
const LOG_TAIL_LINES: usize = 20;

pub(crate) struct BenchProcess {
    pub(crate) child: tokio::process::Child,
    pub(crate) pid: u32,
    /// Holds what the child needs (data directory, config) and its log.
    dir: PathBuf,
    /// The log's file name in `dir`.
    log_name: &'static str,
}

impl BenchProcess {
    /// Spawns `command` with stdout piped and stderr to `dir/log_name`; from here on the
    /// returned guard owns the child and `dir` (also when spawning fails: `dir` is removed).
    pub(crate) fn spawn(
        mut command: tokio::process::Command,
        dir: PathBuf,
        log_name: &'static str,
    ) -> anyhow::Result<BenchProcess> {
        let log_path = dir.join(log_name);
        let log = match std::fs::File::create(&log_path) {
            Ok(log) => log,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error).with_context(|| format!("creating {}", log_path.display()));
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe. It makes the kernel send the child SIGTERM if the bench
        // dies without stopping it (SIGKILL, a panic that aborts), so no child outlives it. The
        // signal follows the *thread* that spawned the child: `herald bench` runs this on the
        // runtime's `block_on` thread, the main thread, which lives as long as the process.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                let program = command
                    .as_std()
                    .get_program()
                    .to_string_lossy()
                    .into_owned();
                return Err(error).with_context(|| format!("starting {program}"));
            }
        };
        Ok(BenchProcess {
            pid: child.id().unwrap_or(0),
            child,
            dir,
            log_name,
        })
    }

    /// The last lines of its log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join(self.log_name)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`]. Returns whether it
    /// exited gracefully with success.
    pub(crate) async fn stop(mut self) -> bool {
        if let Ok(pid) = libc::pid_t::try_from(self.pid)
            && pid > 0
        {
            // SAFETY: kill(2) with a pid this process spawned and has not yet reaped, so the
            // pid cannot have been reused by another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = self.child.kill().await;
                false
            }
        }
    }
}

impl Drop for BenchProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
