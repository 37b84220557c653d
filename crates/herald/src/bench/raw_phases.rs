//! The raw disk phases: write + fdatasync of 256-byte records in batches, into a
//! preallocated, zero-filled file.

use super::*;

pub(crate) struct RawConfig {
    pub(crate) dir: PathBuf,
    pub(crate) batch_records: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) batches_max: u64,
}

/// Removes the raw file however the phase ends.
pub(crate) struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn measure_raw(config: &RawConfig) -> anyhow::Result<PhaseResult> {
    let path = config.dir.join(format!(
        ".herald-bench-raw-{}-{}.tmp",
        std::process::id(),
        config.batch_records
    ));
    let _remove = RemoveOnDrop(path.clone());
    let file = preallocate(&path)?;

    let batch_bytes = config.batch_records * RAW_RECORD_BYTES;
    let batch: Vec<u8> = (0..batch_bytes).map(|index| (index % 251) as u8).collect();
    let slots = RAW_FILE_BYTES / batch_bytes as u64;
    assert!(slots > 0, "a raw batch must fit in the raw file");

    let started = Instant::now();
    let measured_from = started + config.warmup;
    let deadline = measured_from + config.duration;
    let mut latencies_us = Vec::new();
    let mut last_sync: Option<Instant> = None;
    for batch_index in 0..config.batches_max {
        let sent = Instant::now();
        if sent >= deadline {
            break;
        }
        // Wrap around inside the preallocated extent so fdatasync never has to persist a size
        // change, like a preallocated log segment.
        let offset = (batch_index % slots) * batch_bytes as u64;
        file.write_all_at(&batch, offset)
            .with_context(|| format!("writing {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("fdatasync of {}", path.display()))?;
        if sent >= measured_from {
            latencies_us.push(elapsed_us(sent));
            last_sync = Some(Instant::now());
        }
    }
    let seconds = last_sync
        .map(|last| last.saturating_duration_since(measured_from).as_secs_f64())
        .unwrap_or(0.0);
    let records = latencies_us.len() as u64 * config.batch_records as u64;
    Ok(PhaseResult::from_samples(records, seconds, latencies_us))
}

/// Creates the raw file zero-filled to its full size and synced, so later writes only overwrite
/// allocated blocks.
pub(crate) fn preallocate(path: &Path) -> anyhow::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating raw bench file {}", path.display()))?;
    let zeros = vec![0u8; 1024 * 1024];
    let mut written = 0u64;
    while written < RAW_FILE_BYTES {
        file.write_all(&zeros)
            .with_context(|| format!("preallocating {}", path.display()))?;
        written += zeros.len() as u64;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(file)
}
