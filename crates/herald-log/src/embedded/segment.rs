//! Segment files: naming, the header, and creation of preallocated segments.
//!
//! A segment is `<dir>/segments/<number:020>.seg`: a 64-byte header followed by records, the
//! whole file zero-filled to its capacity and synced before the first record goes in.
//!
//! # Invariants
//! - A file under its final name is complete: it is built under `<name>.tmp`, synced, then
//!   renamed and the directory synced. Leftover `.tmp` files are unused and deleted on open.
//! - Segment numbers increase by one; a gap anywhere but before the oldest segment is corruption.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fs::{Filesystem, FsFile};

pub const SEGMENT_MAGIC: &[u8; 8] = b"HRLDSEG\0";
/// Version 2 added `synced_through` to every record.
pub const SEGMENT_FORMAT_VERSION: u32 = 2;
/// Records start right after the header.
pub const SEGMENT_HEADER_BYTES: u64 = 64;
const SEGMENT_SUFFIX: &str = ".seg";
const TEMPORARY_SUFFIX: &str = ".seg.tmp";
/// Zero-fill chunk: big enough for sequential throughput, small enough to stay off the heap's mind.
const ZERO_FILL_CHUNK_BYTES: usize = 1024 * 1024;

/// What a segment header says about its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub number: u64,
    /// The file's length, fixed at creation.
    pub capacity_bytes: u64,
    /// The largest group write its creator made; bounds the torn-tail window at recovery.
    pub group_bytes_max: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES as usize];
        out[..8].copy_from_slice(SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.number.to_le_bytes());
        out[24..32].copy_from_slice(&self.capacity_bytes.to_le_bytes());
        out[32..40].copy_from_slice(&self.group_bytes_max.to_le_bytes());
        let crc = crc32c::crc32c(&out[..40]);
        out[40..44].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, String> {
        if bytes.len() < SEGMENT_HEADER_BYTES as usize {
            return Err("file is shorter than a segment header".into());
        }
        if &bytes[..8] != SEGMENT_MAGIC {
            return Err("not a Herald segment (bad magic)".into());
        }
        let crc = u32::from_le_bytes(bytes[40..44].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&bytes[..40]) {
            return Err("segment header CRC mismatch".into());
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != SEGMENT_FORMAT_VERSION {
            return Err(format!(
                "segment format version {version}, this build reads {SEGMENT_FORMAT_VERSION}"
            ));
        }
        let field = |range: std::ops::Range<usize>| {
            u64::from_le_bytes(bytes[range].try_into().expect("8 bytes"))
        };
        Ok(SegmentHeader {
            number: field(16..24),
            capacity_bytes: field(24..32),
            group_bytes_max: field(32..40),
        })
    }
}

pub fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

pub fn segment_path(segments_dir: &Path, number: u64) -> PathBuf {
    segments_dir.join(format!("{number:020}{SEGMENT_SUFFIX}"))
}

/// What a directory entry in the segments directory is.
#[derive(Debug, PartialEq, Eq)]
pub enum SegmentName {
    Segment(u64),
    /// A segment that was being created; never holds records.
    Temporary,
    Other,
}

pub fn parse_segment_name(name: &str) -> SegmentName {
    if name.ends_with(TEMPORARY_SUFFIX) {
        return SegmentName::Temporary;
    }
    match name.strip_suffix(SEGMENT_SUFFIX) {
        Some(digits) if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) => digits
            .parse()
            .map_or(SegmentName::Other, SegmentName::Segment),
        _ => SegmentName::Other,
    }
}

/// Creates segment `number`: header, zero fill to `capacity_bytes`, fdatasync, rename into
/// place, directory fsync. Returns the open file.
pub fn create_segment(
    fs: &dyn Filesystem,
    segments_dir: &Path,
    header: SegmentHeader,
) -> io::Result<Arc<dyn FsFile>> {
    let file = prepare_segment(fs, segments_dir, header)?;
    install_segment(fs, segments_dir, header.number)?;
    Ok(file)
}

fn temporary_path(segments_dir: &Path, number: u64) -> PathBuf {
    segments_dir.join(format!("{number:020}{TEMPORARY_SUFFIX}"))
}

/// Builds segment `number` under its temporary name: header, zero fill to `capacity_bytes`,
/// fdatasync. Not part of the log until [`install_segment`].
pub fn prepare_segment(
    fs: &dyn Filesystem,
    segments_dir: &Path,
    header: SegmentHeader,
) -> io::Result<Arc<dyn FsFile>> {
    let file = fs.create_new(&temporary_path(segments_dir, header.number))?;
    file.write_all_at(&header.encode(), 0)?;
    let zeros = vec![0u8; ZERO_FILL_CHUNK_BYTES];
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset < header.capacity_bytes {
        let chunk = (header.capacity_bytes - offset).min(ZERO_FILL_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros[..chunk], offset)?;
        offset += chunk as u64;
    }
    file.sync_data()?;
    Ok(file)
}

/// Renames a prepared segment into place and syncs the directory: from here on it is the
/// last segment of the log.
pub fn install_segment(fs: &dyn Filesystem, segments_dir: &Path, number: u64) -> io::Result<()> {
    fs.rename(
        &temporary_path(segments_dir, number),
        &segment_path(segments_dir, number),
    )?;
    fs.sync_dir(segments_dir)
}

/// Removes a prepared segment that will not be used (best effort: recovery removes leftovers).
pub fn discard_prepared(fs: &dyn Filesystem, segments_dir: &Path, number: u64) {
    let _ = fs.remove_file(&temporary_path(segments_dir, number));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_names() {
        let header = SegmentHeader {
            number: 42,
            capacity_bytes: 1 << 20,
            group_bytes_max: 4096,
        };
        assert_eq!(SegmentHeader::decode(&header.encode()), Ok(header));
        let mut bad = header.encode();
        bad[20] ^= 1;
        assert!(SegmentHeader::decode(&bad).is_err());
        let name = segment_path(Path::new("s"), 42);
        let name = name.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_segment_name(name), SegmentName::Segment(42));
        assert_eq!(
            parse_segment_name("00000000000000000042.seg.tmp"),
            SegmentName::Temporary
        );
        assert_eq!(parse_segment_name("notes.txt"), SegmentName::Other);
    }
}
