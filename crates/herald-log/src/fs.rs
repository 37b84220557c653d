//! The narrow filesystem the embedded log runs on: [`StdFs`] (real files) and [`SimFs`] (an
//! in-memory filesystem that can lose power).
//!
//! The log only needs positional reads and writes, `fdatasync`, whole-file create/rename/remove
//! and directory listing and sync. Keeping the surface this small is what lets [`SimFs`] model a
//! power loss honestly.
//!
//! # SimFs durability model
//! - File contents: a `sync_data` makes every earlier write to that file durable. At a crash,
//!   each unsynced write is lost, fully persisted, torn to a byte prefix, or reduced to a random
//!   subset of its 512-byte sectors (chosen from the crash seed). The log never has more than
//!   one unsynced write in flight, so this covers "the last write may be torn".
//! - Directory entries (create, rename, remove): a `sync_dir` makes every earlier entry change in
//!   that directory durable. At a crash, a random *prefix* of the unsynced entry changes persists
//!   (metadata journals commit in order). Directories themselves are durable once created: the
//!   log creates its one directory at open and syncs its parent right away, so modelling lost
//!   `mkdir`s would test nothing extra.
//! - A file removed from its directory stays readable through handles that were already open,
//!   as on Unix; the log relies on this so reclaim cannot pull a segment away from a reader.
//!
//! # Invariants
//! - After [`SimFs::crash`] the old instance is dead: every operation on it, or on a handle from
//!   it, fails with an I/O error, the way a process sees a machine that lost power.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// An open file, read and written at explicit offsets.
// `len` is fallible, so an `is_empty` beside it would only add noise.
#[allow(clippy::len_without_is_empty)]
pub trait FsFile: Send + Sync + fmt::Debug {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes every earlier write to this file durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
}

/// The operations the log performs on a filesystem.
pub trait Filesystem: Send + Sync + 'static {
    /// Creates a directory and its parents, durably.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Creates a new, empty file; fails if the name exists. Durable only after `sync_dir`.
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Renames within one directory, replacing any file at `to`. Durable only after `sync_dir`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file's name. Durable only after `sync_dir`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// The names of the files in a directory, sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Makes every earlier entry change in the directory durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

// ----- StdFs --------------------------------------------------------------------------------

/// Real files through `std::fs`; `sync_data` is `fdatasync`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile(std::fs::File);

impl FsFile for StdFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Filesystem for StdFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let created: Vec<&Path> = path
            .ancestors()
            .filter(|ancestor| !ancestor.as_os_str().is_empty())
            .take_while(|ancestor| !ancestor.is_dir())
            .collect();
        if created.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(path)?;
        // Each new directory's entry lives in its parent: sync those parents, or a power loss
        // could take the whole data directory (with acknowledged data in it) away.
        for directory in created.iter().rev() {
            let parent = match directory.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            self.sync_dir(parent)?;
        }
        Ok(())
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Arc::new(StdFile(file)))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(StdFile(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
}

// ----- SimFs --------------------------------------------------------------------------------

/// Sector size used when tearing writes.
pub const SIM_SECTOR_BYTES: usize = 512;

/// An in-memory filesystem with power loss and fault injection, for crash tests.
///
/// Cheap to clone; clones share the same state.
#[derive(Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SimFs")
    }
}

#[derive(Default)]
struct SimState {
    /// Set once power is lost: every operation fails from then on.
    dead: bool,
    operations: u64,
    power_loss_after_operations: Option<u64>,
    fail_next_sync: Option<String>,
    fail_next_write: Option<String>,
    dirs: BTreeMap<PathBuf, SimDir>,
    inodes: BTreeMap<u64, SimInode>,
    next_inode: u64,
}

#[derive(Clone, Default)]
struct SimDir {
    durable: BTreeMap<String, u64>,
    current: BTreeMap<String, u64>,
    /// Entry changes since the last `sync_dir`, oldest first.
    pending: Vec<DirOp>,
}

#[derive(Clone)]
enum DirOp {
    Link { name: String, inode: u64 },
    Unlink { name: String },
}

impl DirOp {
    fn apply(&self, entries: &mut BTreeMap<String, u64>) {
        match self {
            DirOp::Link { name, inode } => {
                entries.insert(name.clone(), *inode);
            }
            DirOp::Unlink { name } => {
                entries.remove(name);
            }
        }
    }
}

#[derive(Clone, Default)]
struct SimInode {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Writes since the last `sync_data`, oldest first.
    pending: Vec<(u64, Vec<u8>)>,
}

fn write_into(content: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).expect("offset fits usize");
    let end = start + data.len();
    if content.len() < end {
        content.resize(end, 0);
    }
    content[start..end].copy_from_slice(data);
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let parent = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok((parent.to_path_buf(), name.to_string_lossy().into_owned()))
}

impl SimState {
    /// Counts an operation and fails it if the power is (or just went) out.
    fn begin(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(power_lost());
        }
        self.operations += 1;
        if self
            .power_loss_after_operations
            .is_some_and(|limit| self.operations > limit)
        {
            self.dead = true;
            return Err(power_lost());
        }
        Ok(())
    }

    fn dir_mut(&mut self, path: &Path) -> io::Result<&mut SimDir> {
        self.dirs.get_mut(path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory {}", path.display()),
            )
        })
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let (parent, name) = split(path)?;
        self.dirs
            .get(&parent)
            .and_then(|dir| dir.current.get(&name).copied())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no file {}", path.display()),
                )
            })
    }
}

impl SimFs {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Makes the next `sync_data` on any file fail with `reason` (whichever thread syncs next:
    /// the log's committer, or its helper preparing the next segment).
    pub fn fail_next_sync(&self, reason: &str) {
        self.lock().fail_next_sync = Some(reason.to_owned());
    }

    /// Makes the next `write_all_at` on any file fail with `reason` (nothing is written).
    pub fn fail_next_write(&self, reason: &str) {
        self.lock().fail_next_write = Some(reason.to_owned());
    }

    /// The power goes out after `operations` more operations: the next one and all later ones
    /// fail. Call [`SimFs::crash`] afterwards to get the disk as it was left.
    pub fn lose_power_after(&self, operations: u64) {
        let mut state = self.lock();
        let limit = state.operations + operations;
        state.power_loss_after_operations = Some(limit);
    }

    /// Operations performed so far (create, write, sync, ...).
    pub fn operations(&self) -> u64 {
        self.lock().operations
    }

    /// Whether the power is out.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Cuts the power now (if it is still on) and returns the disk as a restarted machine sees
    /// it: a fresh filesystem holding what was durable plus whatever of the unsynced changes
    /// `seed` lets survive (see the module docs). This instance stays dead.
    pub fn crash(&self, seed: u64) -> SimFs {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut state = self.lock();
        state.dead = true;
        let mut survivor = SimState {
            next_inode: state.next_inode,
            ..SimState::default()
        };
        for (path, dir) in &state.dirs {
            let mut entries = dir.durable.clone();
            let kept = rng.random_range(0..=dir.pending.len());
            for op in &dir.pending[..kept] {
                op.apply(&mut entries);
            }
            survivor.dirs.insert(
                path.clone(),
                SimDir {
                    durable: entries.clone(),
                    current: entries,
                    pending: Vec::new(),
                },
            );
        }
        let live: std::collections::BTreeSet<u64> = survivor
            .dirs
            .values()
            .flat_map(|dir| dir.durable.values().copied())
            .collect();
        for inode in live {
            let old = &state.inodes[&inode];
            let mut content = old.durable.clone();
            for (offset, data) in &old.pending {
                tear_write(&mut rng, &mut content, *offset, data);
            }
            survivor.inodes.insert(
                inode,
                SimInode {
                    durable: content.clone(),
                    current: content,
                    pending: Vec::new(),
                },
            );
        }
        SimFs {
            state: Arc::new(Mutex::new(survivor)),
        }
    }

    /// A file's current content (test inspection and corruption).
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let inode = state.lookup(path)?;
        Ok(state.inodes[&inode].current.clone())
    }

    /// Overwrites bytes of a file durably, bypassing the write path (to simulate bit rot).
    pub fn corrupt(&self, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        let inode = state.lookup(path)?;
        let file = state.inodes.get_mut(&inode).expect("linked inode exists");
        write_into(&mut file.current, offset, bytes);
        write_into(&mut file.durable, offset, bytes);
        Ok(())
    }
}

/// Applies what survives of one unsynced write: nothing, all of it, a byte prefix, or a random
/// subset of its sectors.
fn tear_write(rng: &mut StdRng, content: &mut Vec<u8>, offset: u64, data: &[u8]) {
    match rng.random_range(0..4) {
        0 => {}
        1 => write_into(content, offset, data),
        2 => {
            let kept = rng.random_range(0..=data.len());
            write_into(content, offset, &data[..kept]);
        }
        _ => {
            let sector = SIM_SECTOR_BYTES as u64;
            let mut start = 0usize;
            while start < data.len() {
                // Sectors are aligned on the device, not on the write.
                let absolute = offset + start as u64;
                let sector_end = ((absolute / sector) + 1) * sector;
                let end = (start + (sector_end - absolute) as usize).min(data.len());
                if rng.random_bool(0.5) {
                    write_into(content, absolute, &data[start..end]);
                }
                start = end;
            }
        }
    }
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    inode: u64,
}

impl FsFile for SimFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.begin()?;
        if let Some(reason) = state.fail_next_write.take() {
            return Err(io::Error::other(reason));
        }
        let file = state
            .inodes
            .get_mut(&self.inode)
            .expect("open inode exists");
        write_into(&mut file.current, offset, buf);
        file.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.begin()?;
        let file = &state.inodes[&self.inode];
        let start = usize::try_from(offset).expect("offset fits usize");
        let end = start + buf.len();
        if end > file.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        buf.copy_from_slice(&file.current[start..end]);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.fs.lock();
        state.begin()?;
        if let Some(reason) = state.fail_next_sync.take() {
            // Like Linux after a writeback error: what was pending may or may not be on disk.
            return Err(io::Error::other(reason));
        }
        let file = state
            .inodes
            .get_mut(&self.inode)
            .expect("open inode exists");
        file.durable = file.current.clone();
        file.pending.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut state = self.fs.lock();
        state.begin()?;
        Ok(state.inodes[&self.inode].current.len() as u64)
    }
}

impl fmt::Debug for SimState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimState")
            .field("dead", &self.dead)
            .field("operations", &self.operations)
            .finish_non_exhaustive()
    }
}

impl Filesystem for SimFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin()?;
        for ancestor in path.ancestors() {
            if ancestor.as_os_str().is_empty() {
                continue;
            }
            state.dirs.entry(ancestor.to_path_buf()).or_default();
        }
        Ok(())
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let mut state = self.lock();
        state.begin()?;
        let inode = state.lookup(path)?;
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            inode,
        }))
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let mut state = self.lock();
        state.begin()?;
        let (parent, name) = split(path)?;
        let inode = state.next_inode;
        let dir = state.dir_mut(&parent)?;
        if dir.current.contains_key(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        let op = DirOp::Link { name, inode };
        op.apply(&mut dir.current);
        dir.pending.push(op);
        state.next_inode += 1;
        state.inodes.insert(inode, SimInode::default());
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            inode,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin()?;
        let inode = state.lookup(from)?;
        let (from_parent, from_name) = split(from)?;
        let (to_parent, to_name) = split(to)?;
        if from_parent != to_parent {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "SimFs renames only within one directory",
            ));
        }
        let dir = state.dir_mut(&from_parent)?;
        // One journal transaction in a real filesystem; two ops here, but a crash keeps a
        // prefix, so it can only ever show both names or the new one, never neither.
        let ops = [
            DirOp::Link {
                name: to_name,
                inode,
            },
            DirOp::Unlink { name: from_name },
        ];
        for op in ops {
            op.apply(&mut dir.current);
            dir.pending.push(op);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin()?;
        state.lookup(path)?;
        let (parent, name) = split(path)?;
        let dir = state.dir_mut(&parent)?;
        let op = DirOp::Unlink { name };
        op.apply(&mut dir.current);
        dir.pending.push(op);
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut state = self.lock();
        state.begin()?;
        Ok(state.dir_mut(path)?.current.keys().cloned().collect())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.begin()?;
        let dir = state.dir_mut(path)?;
        dir.durable = dir.current.clone();
        dir.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_a_crash_and_unsynced_data_may_not() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let file = fs.create_new(&dir.join("a")).unwrap();
        file.write_all_at(b"durable", 0).unwrap();
        file.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        file.write_all_at(&[7u8; 4096], 7).unwrap();
        let mut torn = 0;
        for seed in 0..64 {
            let after = fs.crash(seed);
            let content = after.read_file(&dir.join("a")).unwrap();
            assert_eq!(&content[..7], b"durable", "seed {seed}");
            if content.len() < 7 + 4096 || content[7..].iter().any(|&byte| byte != 7) {
                torn += 1;
            }
        }
        assert!(torn > 0, "some seed must lose part of the unsynced write");
        assert!(file.write_all_at(b"x", 0).is_err(), "old instance is dead");
    }

    #[test]
    fn unsynced_creation_can_vanish_and_removed_files_stay_readable() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let file = fs.create_new(&dir.join("a")).unwrap();
        file.write_all_at(b"abc", 0).unwrap();
        file.sync_data().unwrap();
        let vanished = (0..32).any(|seed| {
            fs.clone_state_for_test()
                .crash(seed)
                .list_dir(dir)
                .unwrap()
                .is_empty()
        });
        assert!(vanished, "an unsynced create must be able to vanish");
        fs.sync_dir(dir).unwrap();
        fs.remove_file(&dir.join("a")).unwrap();
        let mut buf = [0u8; 3];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc");
        assert!(fs.list_dir(dir).unwrap().is_empty());
    }

    #[test]
    fn std_fs_round_trip_with_nested_directories() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("data").join("segments");
        StdFs.create_dir_all(&dir).unwrap();
        StdFs.create_dir_all(&dir).unwrap();
        let file = StdFs.create_new(&dir.join("a.tmp")).unwrap();
        file.write_all_at(b"hello", 3).unwrap();
        file.sync_data().unwrap();
        StdFs.rename(&dir.join("a.tmp"), &dir.join("a")).unwrap();
        StdFs.sync_dir(&dir).unwrap();
        assert_eq!(StdFs.list_dir(&dir).unwrap(), vec!["a".to_string()]);
        let reopened = StdFs.open(&dir.join("a")).unwrap();
        assert_eq!(reopened.len().unwrap(), 8);
        let mut buf = [0u8; 5];
        reopened.read_exact_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"hello");
        StdFs.remove_file(&dir.join("a")).unwrap();
        assert!(StdFs.list_dir(&dir).unwrap().is_empty());
    }

    #[test]
    fn injected_sync_failure_is_reported_once() {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        let file = fs.create_new(Path::new("/d/a")).unwrap();
        fs.fail_next_sync("disk on fire");
        assert!(file.sync_data().is_err());
        assert!(file.sync_data().is_ok());
    }

    impl SimFs {
        /// A deep copy, so one state can be crashed with several seeds.
        fn clone_state_for_test(&self) -> SimFs {
            let state = self.lock();
            SimFs {
                state: Arc::new(Mutex::new(SimState {
                    dead: state.dead,
                    operations: state.operations,
                    power_loss_after_operations: None,
                    fail_next_sync: None,
                    fail_next_write: None,
                    dirs: state.dirs.clone(),
                    inodes: state.inodes.clone(),
                    next_inode: state.next_inode,
                })),
            }
        }
    }
}
