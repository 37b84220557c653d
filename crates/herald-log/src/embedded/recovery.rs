//! Recovery on open: scan every segment in order and rebuild the channel table.
//!
//! # The torn-tail rule
//! The end of the log is the first all-zero frame header. A damaged record (bad length or CRC)
//! or a batch whose last record is missing is a torn tail, and is truncated (zeroed and
//! synced), only if all of this holds:
//! - it is in the last segment (a segment is sealed only after its last group was synced);
//! - every byte from `damage + window` to the end of the segment is zero, where `window` is the
//!   largest group write (`group_bytes_max`): only the last, unacknowledged group write can be
//!   torn, and it started at or before the damage.
//!
//! Anything else refuses to open with [`StoreError::Corrupt`] naming the file and offset: a CRC
//! mismatch or garbage after the end in a sealed segment, a record whose CRC holds but whose
//! body is invalid or of an unknown kind, broken batch framing, or a message that does not
//! continue its channel's stream (serial, epoch or chain).
//!
//! Subscriber records rebuild the [`SubscriberTable`]: in log order, the newest snapshot of a
//! (channel, id) wins and a tombstone drops it. State records rebuild the [`StateTable`] the
//! same way, per key.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use herald_core::{ChannelName, Message};

use super::committer::ActiveSegment;
use super::record::{self, DecodeError, FRAME_HEADER_BYTES, Record};
use super::segment::{
    SEGMENT_HEADER_BYTES, SegmentHeader, SegmentName, create_segment, parse_segment_name,
    segment_path,
};
use super::{EmbeddedOptions, RecordLocator};
use crate::fs::{Filesystem, FsFile};
use crate::states::StateTable;
use crate::store::StoreError;
use crate::subscribers::{SubscriberChange, SubscriberTable};
use crate::table::ChannelTable;

pub(crate) struct Recovered {
    pub(crate) table: ChannelTable<RecordLocator>,
    pub(crate) subscribers: SubscriberTable<u64>,
    pub(crate) states: StateTable<u64>,
    pub(crate) segments: BTreeMap<u64, Arc<dyn FsFile>>,
    pub(crate) active: ActiveSegment,
    pub(crate) tip_segments: HashMap<ChannelName, u64>,
}

fn io_error(path: &Path, what: &str, error: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        detail: format!("{what}: {error}"),
    }
}

fn corrupt(path: &Path, offset: u64, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        offset,
        detail: detail.into(),
    }
}

pub(crate) fn recover(
    fs: &dyn Filesystem,
    segments_dir: &Path,
    options: &EmbeddedOptions,
) -> Result<Recovered, StoreError> {
    fs.create_dir_all(segments_dir)
        .map_err(|error| io_error(segments_dir, "creating the segments directory", error))?;
    let names = fs
        .list_dir(segments_dir)
        .map_err(|error| io_error(segments_dir, "listing segments", error))?;
    let mut numbers = Vec::new();
    let mut removed_temporary = false;
    for name in names {
        let path = segments_dir.join(&name);
        match parse_segment_name(&name) {
            SegmentName::Segment(number) => numbers.push(number),
            SegmentName::Temporary => {
                tracing::warn!(path = %path.display(), "removing an unfinished segment");
                fs.remove_file(&path)
                    .map_err(|error| io_error(&path, "removing an unfinished segment", error))?;
                removed_temporary = true;
            }
            SegmentName::Other => {
                tracing::warn!(path = %path.display(), "ignoring a file that is not a segment");
            }
        }
    }
    if removed_temporary {
        fs.sync_dir(segments_dir)
            .map_err(|error| io_error(segments_dir, "syncing the segments directory", error))?;
    }
    numbers.sort_unstable();
    for pair in numbers.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(corrupt(
                segments_dir,
                0,
                format!(
                    "segment {} is missing (found {} then {})",
                    pair[0] + 1,
                    pair[0],
                    pair[1]
                ),
            ));
        }
    }

    let mut scan = Scan {
        table: ChannelTable::default(),
        subscribers: SubscriberTable::default(),
        states: StateTable::default(),
        tip_segments: HashMap::new(),
        messages: 0,
    };
    let mut segments = BTreeMap::new();
    let mut active = None;
    for (index, &number) in numbers.iter().enumerate() {
        let is_last = index + 1 == numbers.len();
        let path = segment_path(segments_dir, number);
        let file = fs
            .open(&path)
            .map_err(|error| io_error(&path, "opening a segment", error))?;
        let (header, write_offset) =
            scan.segment(&path, file.as_ref(), number, is_last, options)?;
        segments.insert(number, file.clone());
        if is_last {
            active = Some(ActiveSegment {
                number,
                file,
                capacity_bytes: header.capacity_bytes,
                write_offset,
            });
        }
    }
    let active = match active {
        Some(active) => active,
        None => {
            let header = SegmentHeader {
                number: 1,
                capacity_bytes: options.segment_bytes,
                group_bytes_max: options.group_bytes_max as u64,
            };
            let file = create_segment(fs, segments_dir, header)
                .map_err(|error| io_error(segments_dir, "creating the first segment", error))?;
            segments.insert(header.number, file.clone());
            ActiveSegment {
                number: header.number,
                file,
                capacity_bytes: header.capacity_bytes,
                write_offset: SEGMENT_HEADER_BYTES,
            }
        }
    };
    tracing::info!(
        segments = segments.len(),
        messages = scan.messages,
        subscribers = scan.subscribers.len(),
        states = scan.states.len(),
        dir = %segments_dir.display(),
        "log recovered"
    );
    Ok(Recovered {
        table: scan.table,
        subscribers: scan.subscribers,
        states: scan.states,
        segments,
        active,
        tip_segments: scan.tip_segments,
    })
}

/// Skips the damaged record at `damaged` (when its length field is plausible) and reads the
/// valid records that follow it; returns the first one's offset and the largest
/// `synced_through` among them. `None` when the length is unusable or nothing valid follows.
fn later_sync_proof(bytes: &[u8], damaged: usize) -> Option<(usize, u64)> {
    let mut offset = damaged;
    let mut first_valid = None;
    let mut synced_through_max = 0;
    let mut skipped_damage = false;
    while let Some(header) = bytes.get(offset..offset + FRAME_HEADER_BYTES) {
        let header: &[u8; FRAME_HEADER_BYTES] = header.try_into().expect("header bytes");
        let Some(body_len) = record::frame_body_len(header) else {
            break;
        };
        let end = offset + FRAME_HEADER_BYTES + body_len;
        if body_len == 0 || end > bytes.len() {
            break;
        }
        match record::decode_frame(&bytes[offset..end]) {
            Ok(decoded) => {
                first_valid.get_or_insert(offset);
                synced_through_max = synced_through_max.max(decoded.synced_through());
            }
            Err(_) if !skipped_damage => skipped_damage = true,
            Err(_) => break,
        }
        offset = end;
    }
    first_valid.map(|offset| (offset, synced_through_max))
}

struct Scan {
    table: ChannelTable<RecordLocator>,
    subscribers: SubscriberTable<u64>,
    states: StateTable<u64>,
    tip_segments: HashMap<ChannelName, u64>,
    messages: u64,
}

/// How the records of one segment ended.
enum Ending {
    /// An all-zero frame header, or no room left for one.
    Clean,
    /// A record whose frame does not hold together.
    Damaged { offset: u64, detail: String },
}

impl Scan {
    /// Replays one segment; returns its header and where its log ends (the next write offset).
    fn segment(
        &mut self,
        path: &Path,
        file: &dyn FsFile,
        number: u64,
        is_last: bool,
        options: &EmbeddedOptions,
    ) -> Result<(SegmentHeader, u64), StoreError> {
        let len = file
            .len()
            .map_err(|error| io_error(path, "reading the segment length", error))?;
        let mut bytes = vec![0u8; usize::try_from(len).expect("segment fits in memory")];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|error| io_error(path, "reading the segment", error))?;
        let header = SegmentHeader::decode(&bytes).map_err(|detail| corrupt(path, 0, detail))?;
        if header.number != number {
            return Err(corrupt(
                path,
                0,
                format!(
                    "header says segment {}, the name says {number}",
                    header.number
                ),
            ));
        }
        if header.capacity_bytes != len {
            return Err(corrupt(
                path,
                0,
                format!(
                    "file is {len} bytes, its header says {}",
                    header.capacity_bytes
                ),
            ));
        }

        let mut offset = SEGMENT_HEADER_BYTES as usize;
        // Records of the batch being read, and how many more the last one announced.
        let mut batch: Vec<(Message, RecordLocator)> = Vec::new();
        let mut batch_start = offset;
        let mut following: u32 = 0;
        let ending = loop {
            if offset + FRAME_HEADER_BYTES > bytes.len() {
                break Ending::Clean;
            }
            let frame_header: &[u8; FRAME_HEADER_BYTES] = bytes
                [offset..offset + FRAME_HEADER_BYTES]
                .try_into()
                .expect("header bytes");
            let Some(body_len) = record::frame_body_len(frame_header) else {
                break Ending::Clean;
            };
            let end = offset + FRAME_HEADER_BYTES + body_len;
            if body_len == 0 || end > bytes.len() {
                break Ending::Damaged {
                    offset: offset as u64,
                    detail: format!("record length {body_len} runs past the segment"),
                };
            }
            let decoded = match record::decode_frame(&bytes[offset..end]) {
                Ok(decoded) => decoded,
                Err(DecodeError::Torn(detail)) => {
                    break Ending::Damaged {
                        offset: offset as u64,
                        detail,
                    };
                }
                Err(DecodeError::Invalid(detail)) => {
                    return Err(corrupt(path, offset as u64, detail));
                }
            };
            let locator = RecordLocator {
                segment: number,
                offset: offset as u64,
                len: u32::try_from(end - offset).expect("record fits u32"),
            };
            match decoded {
                Record::Message {
                    message,
                    batch_following,
                    ..
                } => {
                    if batch.is_empty() {
                        batch_start = offset;
                    } else if batch_following + 1 != following
                        || message.channel != batch[0].0.channel
                    {
                        return Err(corrupt(
                            path,
                            offset as u64,
                            format!(
                                "batch framing broken: expected {} more record(s) of {}",
                                following, batch[0].0.channel
                            ),
                        ));
                    }
                    following = batch_following;
                    batch.push((message, locator));
                    if following == 0 {
                        for (message, locator) in batch.drain(..) {
                            self.table
                                .recover_message(&message, locator)
                                .map_err(|detail| corrupt(path, locator.offset, detail))?;
                            self.messages += 1;
                        }
                    }
                }
                Record::Tip { tip, .. } => {
                    if !batch.is_empty() {
                        return Err(corrupt(path, offset as u64, "tip record inside a batch"));
                    }
                    self.table
                        .recover_tip(&tip)
                        .map_err(|detail| corrupt(path, offset as u64, detail))?;
                    self.tip_segments.insert(tip.channel.clone(), number);
                }
                Record::Subscriber { change, .. } => {
                    if !batch.is_empty() {
                        return Err(corrupt(
                            path,
                            offset as u64,
                            "subscriber record inside a batch",
                        ));
                    }
                    match change {
                        SubscriberChange::Save(state) => {
                            self.subscribers.recover_snapshot(state, number)
                        }
                        SubscriberChange::Remove { channel, id } => {
                            self.subscribers.recover_removal(channel, id)
                        }
                    }
                }
                Record::State { change, .. } => {
                    if !batch.is_empty() {
                        return Err(corrupt(path, offset as u64, "state record inside a batch"));
                    }
                    // In log order: a later value replaces, a tombstone drops.
                    self.states.apply(change, number);
                }
            }
            offset = end;
        };

        // Where the intact log ends: an incomplete batch is dropped along with the damage.
        let (log_end, damage) = match (&ending, batch.is_empty()) {
            (Ending::Clean, true) => (offset, None),
            (Ending::Clean, false) => (
                batch_start,
                Some(format!(
                    "batch of {} is missing its last {following} record(s)",
                    batch[0].0.channel
                )),
            ),
            (Ending::Damaged { offset, detail }, _) => {
                let start = if batch.is_empty() {
                    *offset as usize
                } else {
                    batch_start
                };
                (start, Some(format!("{detail} at offset {offset}")))
            }
        };
        let last_nonzero = bytes[log_end..]
            .iter()
            .rposition(|&byte| byte != 0)
            .map(|index| log_end + index);
        let Some(last_nonzero) = last_nonzero else {
            return Ok((header, log_end as u64));
        };
        let detail = damage.unwrap_or_else(|| "data after the end of the log".into());
        if !is_last {
            return Err(corrupt(
                path,
                log_end as u64,
                format!("{detail} in a sealed segment"),
            ));
        }
        // A torn write only reaches bytes that were never synced. A valid record after the
        // damage whose `synced_through` lies beyond the cut proves the cut bytes had been synced
        // (and acknowledged) before it was written: that is damage, not a torn tail.
        if let Ending::Damaged { offset, .. } = &ending
            && let Some((later, synced_through)) = later_sync_proof(&bytes, *offset as usize)
            && synced_through > log_end as u64
        {
            return Err(corrupt(
                path,
                *offset,
                format!(
                    "{detail}; the record at offset {later} was written after everything up to \
                     offset {synced_through} was synced, so this is damage to acknowledged data, \
                     not a torn write"
                ),
            ));
        }
        let window = header.group_bytes_max.max(options.group_bytes_max as u64) as usize;
        if last_nonzero >= log_end + window {
            return Err(corrupt(
                path,
                log_end as u64,
                format!(
                    "{detail}, and non-zero bytes follow at offset {last_nonzero}, beyond the \
                     {window}-byte window a torn write could reach"
                ),
            ));
        }
        let zeros = vec![0u8; last_nonzero + 1 - log_end];
        file.write_all_at(&zeros, log_end as u64)
            .and_then(|()| file.sync_data())
            .map_err(|error| io_error(path, "truncating the torn tail", error))?;
        tracing::warn!(
            path = %path.display(),
            offset = log_end,
            bytes = zeros.len(),
            reason = %detail,
            "truncated a torn tail that was never acknowledged"
        );
        Ok((header, log_end as u64))
    }
}
