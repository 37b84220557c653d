//! The in-process log phases: appenders on a fresh `EmbeddedLog`, no HTTP.

use super::*;

pub(crate) struct LogConfig {
    /// The log directory is created inside this one (the raw phase's directory: same disk).
    pub(crate) parent_dir: PathBuf,
    pub(crate) run_tag: String,
    pub(crate) appenders: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) appends_max: u64,
    pub(crate) channels: usize,
    pub(crate) channel_prefix: String,
    /// The compact JSON text of every message's data.
    pub(crate) data_json: Bytes,
}

/// A log phase's figures: appends (one message each) and the group commit they got.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LogResult {
    pub(crate) result: PhaseResult,
    /// Messages per group write (write + fdatasync) in the measured window; `None` when no group
    /// was written in it.
    pub(crate) mean_group_messages: Option<f64>,
}

impl LogResult {
    pub(crate) fn median(runs: &[LogResult]) -> LogResult {
        let results: Vec<PhaseResult> = runs.iter().map(|run| run.result.clone()).collect();
        let groups: Vec<f64> = runs
            .iter()
            .filter_map(|run| run.mean_group_messages)
            .collect();
        LogResult {
            result: PhaseResult::median(&results),
            mean_group_messages: median(&groups),
        }
    }
}

pub(crate) struct LogOutcome {
    pub(crate) result: LogResult,
    /// Refused appends by code.
    pub(crate) errors: BTreeMap<String, u64>,
}

/// Removes the log directory however the phase ends.
pub(crate) struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mean messages per group between two snapshots of the committer's counters.
pub(crate) fn mean_group_messages(before: EmbeddedStats, after: EmbeddedStats) -> Option<f64> {
    let groups = after.groups.saturating_sub(before.groups);
    let messages = after.messages.saturating_sub(before.messages);
    (groups > 0).then(|| messages as f64 / groups as f64)
}

/// Opens a fresh [`EmbeddedLog`] in a temporary directory under `parent_dir`, runs
/// `appenders` closed-loop appenders against it, closes it and removes the directory.
pub(crate) async fn measure_log(config: LogConfig) -> anyhow::Result<LogOutcome> {
    let dir = config.parent_dir.join(format!(
        ".herald-bench-log-{}-{}",
        std::process::id(),
        config.run_tag
    ));
    std::fs::create_dir(&dir)
        .with_context(|| format!("creating log bench directory {}", dir.display()))?;
    // Declared before the log so that it drops after it: the log is closed before the removal.
    let _remove = RemoveDirOnDrop(dir.clone());
    let channels: Vec<ChannelName> = (0..config.channels)
        .map(|index| ChannelName::parse(&format!("{}:{index}", config.channel_prefix)))
        .collect::<Result<_, _>>()
        .map_err(|error| anyhow!("bad --channel-prefix: {}", error.message))?;
    let open_dir = dir.clone();
    let log = tokio::task::spawn_blocking(move || {
        EmbeddedLog::open(
            &open_dir,
            EmbeddedOptions::default(),
            Policies::default(),
            Arc::new(SystemClock),
        )
    })
    .await
    .context("opening the bench log panicked")?
    .with_context(|| format!("opening a log in {}", dir.display()))?;
    let log = Arc::new(log);

    let config = Arc::new(config);
    let channels = Arc::new(channels);
    let started = tokio::time::Instant::now();
    let measured_from = started + config.warmup;
    let deadline = measured_from + config.duration;
    // Shared so that the count bound holds for the whole phase, not per appender.
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for appender in 0..config.appenders {
        let log = Arc::clone(&log);
        let config = Arc::clone(&config);
        let channels = Arc::clone(&channels);
        let issued = Arc::clone(&issued);
        tasks.spawn(async move {
            run_appender(
                &log,
                &config,
                &channels,
                appender,
                measured_from.into_std(),
                deadline.into_std(),
                &issued,
            )
            .await
        });
    }
    // The committer's counters at the start of the measured window (at the end of the phase if
    // it ended sooner, which leaves no group to average).
    tokio::time::sleep_until(measured_from).await;
    let stats_before = log.stats();

    let PublisherTally {
        latencies_us,
        last_ack,
        errors,
        ..
    } = PublisherTally::join_all(&mut tasks, "appender_panicked").await;
    let stats_after = log.stats();
    // Closing joins the committer thread: keep it off the async workers.
    let closing = Arc::clone(&log);
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("closing the bench log panicked")?;
    drop(log);

    let seconds = last_ack
        .map(|last| {
            last.saturating_duration_since(measured_from.into_std())
                .as_secs_f64()
        })
        .unwrap_or(0.0);
    Ok(LogOutcome {
        result: LogResult {
            result: PhaseResult::from_samples(latencies_us.len() as u64, seconds, latencies_us),
            mean_group_messages: mean_group_messages(stats_before, stats_after),
        },
        errors,
    })
}

pub(crate) async fn run_appender(
    log: &EmbeddedLog,
    config: &LogConfig,
    channels: &[ChannelName],
    appender: usize,
    measured_from: Instant,
    deadline: Instant,
    issued: &AtomicU64,
) -> PublisherTally {
    let mut tally = PublisherTally::default();
    for sequence in 0u64.. {
        if Instant::now() >= deadline
            || issued.fetch_add(1, Ordering::Relaxed) >= config.appends_max
        {
            break;
        }
        let channel = channels[(appender as u64 + sequence) as usize % channels.len()].clone();
        let id = match MessageId::parse(&format!("bench-{}-{appender}-{sequence}", config.run_tag))
        {
            Ok(id) => id,
            Err(_) => {
                *tally.errors.entry("invalid_id".to_owned()).or_default() += 1;
                break;
            }
        };
        let message = NewMessage {
            id,
            name: None,
            headers: Headers::new(),
            data: Data::Json(config.data_json.clone()),
            ttl_ms: None,
        };
        let sent = Instant::now();
        let outcome = match log.append(channel, vec![message]).await {
            Ok(appended) if appended.iter().all(|ack| !ack.duplicate) => Ok(()),
            Ok(_) => Err("unexpected_duplicate".to_owned()),
            Err(error) => Err(append_error_code(&error).to_owned()),
        };
        if tally.record(outcome, sent, measured_from) {
            break;
        }
    }
    tally
}

pub(crate) fn append_error_code(error: &AppendError) -> &'static str {
    match error {
        AppendError::IdConflict { .. } => "id_conflict",
        AppendError::Invalid(input) => input.code.as_str(),
        AppendError::Poisoned(_) => "poisoned",
        AppendError::Closed => "closed",
        AppendError::Overloaded => "overloaded",
        _ => "append_failed",
    }
}
