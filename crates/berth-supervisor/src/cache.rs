//! The node's collection cache: collections staged onto local disk, keyed
//! by portable data hash and shared by every supervisor on the node.
//!
//! Layout under `supervisor.cache_dir`:
//! - `collections/<pdh>/`: a complete copy of the collection's files,
//!   files read-only (0444);
//! - `locks/<pdh>`: the entry's lock file. Its content is the entry's size
//!   in bytes, and its modification time is the entry's last use;
//! - `staging/`: collections being written, renamed into `collections/`
//!   only once complete, so a reader never sees a half-written entry.
//!
//! Locking uses `flock(2)` on the lock file. A supervisor that uses an
//! entry holds a shared lock for as long as its container runs. Staging
//! and eviction take the exclusive lock, so one supervisor fetches a
//! collection while the others wait and then share its copy, and an entry
//! in use is never evicted. Every block read is checked: its MD5 and size
//! must match its locator.
//!
//! Eviction removes the least recently used entries not in use until the
//! entries, with the one about to be staged, fit in
//! `supervisor.cache_max_bytes`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use berth_core::locator::{Locator, EMPTY_BLOCK_HASH};
use berth_core::manifest::{hex_md5, is_portable_data_hash, Manifest};
use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::io::AsyncWriteExt;

/// How often a supervisor waiting for another one's lock tries again.
const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A source of blocks by locator, such as the controller's block API.
#[async_trait]
pub trait BlockSource: Send + Sync {
    /// Reads the block of `locator`. The cache checks its MD5 and size.
    async fn read_block(&self, locator: &Locator) -> Result<Bytes, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid portable data hash {0:?}")]
    InvalidHash(String),
    #[error("collection {pdh} has {size} bytes, more than supervisor.cache_max_bytes ({max}); ask the administrator to raise supervisor.cache_max_bytes")]
    TooLarge { pdh: String, size: u64, max: u64 },
    #[error("failed to read block {locator} of collection {pdh}: {message}")]
    Fetch {
        pdh: String,
        locator: String,
        message: String,
    },
    #[error("block {locator} of collection {pdh} arrived damaged: {size} bytes with MD5 {md5}")]
    Corrupt {
        pdh: String,
        locator: String,
        size: usize,
        md5: String,
    },
    #[error("the manifest of collection {pdh} reads bytes {start}..{end} of block {locator}, which has {size} bytes")]
    SegmentOutOfRange {
        pdh: String,
        locator: String,
        start: u64,
        end: u64,
        size: usize,
    },
    #[error("collection cache directory {dir} is not owned by the supervisor's user (uid {uid}), or other users may write to it; entries there are trusted by name, so give supervisor.cache_dir a directory of its own, with mode 0700")]
    UnsafeDirectory { dir: PathBuf, uid: u32 },
    #[error("collection cache {dir}: failed to {action}: {source}; check supervisor.cache_dir")]
    Io {
        dir: PathBuf,
        action: String,
        #[source]
        source: io::Error,
    },
}

/// The node's collection cache.
#[derive(Debug, Clone)]
pub struct CollectionCache {
    root: PathBuf,
    max_bytes: u64,
}

/// A staged collection in use. Its shared lock keeps eviction away until
/// it is dropped.
#[derive(Debug)]
pub struct CacheEntry {
    path: PathBuf,
    pdh: String,
    /// Whether this call fetched the collection (false: it was cached).
    fetched: bool,
    _lock: Flock<File>,
}

impl CacheEntry {
    /// Returns the directory that contains the collection's files.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pdh(&self) -> &str {
        &self.pdh
    }

    /// Returns true when this stage fetched the collection, false when
    /// the node's cache already held it.
    pub fn fetched(&self) -> bool {
        self.fetched
    }
}

/// The evictions and warnings of one [`CollectionCache::stage`] call.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StageReport {
    /// Entries evicted to make room, by portable data hash.
    pub evicted: Vec<String>,
    /// Set when entries in use keep the cache above its maximum.
    pub over_limit: Option<u64>,
}

impl CollectionCache {
    pub fn new(root: PathBuf, max_bytes: u64) -> CollectionCache {
        CollectionCache { root, max_bytes }
    }

    /// Returns the directory that contains the entries.
    pub fn collections_dir(&self) -> PathBuf {
        self.root.join("collections")
    }

    fn io_error(&self, action: impl Into<String>) -> impl FnOnce(io::Error) -> CacheError + '_ {
        let action = action.into();
        move |source| CacheError::Io {
            dir: self.root.clone(),
            action,
            source,
        }
    }

    /// Returns the entry of `pdh`, fetching the collection from `blocks`
    /// if the node does not hold it yet. `manifest` must be the parsed
    /// manifest of `pdh`, with locators the block source accepts.
    pub async fn stage(
        &self,
        pdh: &str,
        manifest: &Manifest,
        blocks: &dyn BlockSource,
    ) -> Result<(CacheEntry, StageReport), CacheError> {
        if !is_portable_data_hash(pdh) {
            return Err(CacheError::InvalidHash(pdh.to_string()));
        }
        let size: u64 = manifest.files().iter().map(|file| file.size()).sum();
        if size > self.max_bytes {
            return Err(CacheError::TooLarge {
                pdh: pdh.to_string(),
                size,
                max: self.max_bytes,
            });
        }
        self.create_layout()?;
        let entry_dir = self.collections_dir().join(pdh);
        let lock_path = self.root.join("locks").join(pdh);

        loop {
            // A cached entry needs only the shared lock.
            let lock = self.open_lock(&lock_path)?;
            let lock = lock_polling(lock, FlockArg::LockSharedNonblock)
                .await
                .map_err(self.io_error("lock an entry"))?;
            if !still_linked(&lock, &lock_path) {
                continue;
            }
            if entry_dir.is_dir() {
                touch(&lock);
                let entry = CacheEntry {
                    path: entry_dir,
                    pdh: pdh.to_string(),
                    fetched: false,
                    _lock: lock,
                };
                return Ok((entry, StageReport::default()));
            }
            drop(lock);

            let lock = self.open_lock(&lock_path)?;
            let lock = lock_polling(lock, FlockArg::LockExclusiveNonblock)
                .await
                .map_err(self.io_error("lock an entry"))?;
            if !still_linked(&lock, &lock_path) {
                continue;
            }
            let mut report = StageReport::default();
            let fetched = if entry_dir.is_dir() {
                false
            } else {
                report = self.evict(size, pdh)?;
                let fetched = self
                    .fetch_into_place(pdh, manifest, blocks, &entry_dir)
                    .await;
                if let Err(error) = fetched {
                    // The next stage of this hash removes it too, but
                    // that may never come.
                    let staging = self.root.join("staging").join(pdh);
                    let _ = tokio::fs::remove_dir_all(&staging).await;
                    return Err(error);
                }
                write_size(&lock, size).map_err(self.io_error("record an entry's size"))?;
                true
            };
            touch(&lock);
            // Downgrading is not atomic, so an evictor may slip in between:
            // check again that the entry is there.
            relock_polling(&lock, FlockArg::LockSharedNonblock)
                .await
                .map_err(self.io_error("lock an entry"))?;
            if still_linked(&lock, &lock_path) && entry_dir.is_dir() {
                let entry = CacheEntry {
                    path: entry_dir,
                    pdh: pdh.to_string(),
                    fetched,
                    _lock: lock,
                };
                return Ok((entry, report));
            }
        }
    }

    fn create_layout(&self) -> Result<(), CacheError> {
        if let Some(parent) = self.root.parent() {
            std::fs::create_dir_all(parent)
                .map_err(self.io_error(format!("create {}", parent.display())))?;
        }
        for dir in [
            self.root.clone(),
            self.collections_dir(),
            self.root.join("locks"),
            self.root.join("staging"),
        ] {
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    // Collections are private data: other users of the node
                    // must not reach them. Containers reach their entries
                    // through bind mounts, which do not walk these parents.
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                        .map_err(self.io_error(format!("set the mode of {}", dir.display())))?;
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => {
                    return Err(self.io_error(format!("create {}", dir.display()))(error));
                }
            }
            check_private(&dir)?;
        }
        Ok(())
    }

    fn open_lock(&self, path: &Path) -> Result<File, CacheError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(self.io_error(format!("open the lock file {}", path.display())))
    }

    /// Writes the collection into a staging directory, then renames it to
    /// `entry_dir`. The caller holds the entry's exclusive lock.
    async fn fetch_into_place(
        &self,
        pdh: &str,
        manifest: &Manifest,
        blocks: &dyn BlockSource,
        entry_dir: &Path,
    ) -> Result<(), CacheError> {
        // Only the holder of the exclusive lock writes here, so whatever is
        // there was left by a supervisor that stopped half-way.
        let staging = self.root.join("staging").join(pdh);
        if staging.exists() {
            tokio::fs::remove_dir_all(&staging)
                .await
                .map_err(self.io_error(format!("remove {}", staging.display())))?;
        }
        tokio::fs::create_dir(&staging)
            .await
            .map_err(self.io_error(format!("create {}", staging.display())))?;
        set_mode(&staging, 0o755)
            .await
            .map_err(self.io_error("set a directory's mode"))?;

        for directory in manifest.directories() {
            let path = staging.join(directory);
            tokio::fs::create_dir_all(&path)
                .await
                .map_err(self.io_error(format!("create {}", path.display())))?;
        }
        let mut last: Option<(String, Bytes)> = None;
        for file in manifest.files() {
            let path = staging.join(&file.path);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(self.io_error(format!("create {}", parent.display())))?;
            }
            let mut output = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
                .map_err(self.io_error(format!("create {}", path.display())))?;
            for segment in &file.segments {
                let block = read_checked(blocks, pdh, &segment.locator, &mut last).await?;
                let end = segment.offset + segment.length;
                let bytes = usize::try_from(segment.offset)
                    .ok()
                    .zip(usize::try_from(end).ok())
                    .and_then(|(start, end)| block.get(start..end))
                    .ok_or_else(|| CacheError::SegmentOutOfRange {
                        pdh: pdh.to_string(),
                        locator: segment.locator.bare(),
                        start: segment.offset,
                        end,
                        size: block.len(),
                    })?;
                output
                    .write_all(bytes)
                    .await
                    .map_err(self.io_error(format!("write {}", path.display())))?;
            }
            output
                .sync_all()
                .await
                .map_err(self.io_error(format!("flush {}", path.display())))?;
            set_mode(&path, 0o444)
                .await
                .map_err(self.io_error("set a file's mode"))?;
        }
        tokio::fs::rename(&staging, entry_dir)
            .await
            .map_err(self.io_error(format!("rename {} into place", staging.display())))?;
        Ok(())
    }

    /// Removes least recently used entries, except `keep` and entries in
    /// use, until the cache has room for `needed` more bytes.
    fn evict(&self, needed: u64, keep: &str) -> Result<StageReport, CacheError> {
        let locks_dir = self.root.join("locks");
        let listing = std::fs::read_dir(&locks_dir)
            .map_err(self.io_error(format!("list {}", locks_dir.display())))?;
        let mut entries = Vec::new();
        for item in listing.flatten() {
            let Some(name) = item.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name == keep || !is_portable_data_hash(&name) {
                continue;
            }
            let path = item.path();
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            let size = read_size(&path).unwrap_or(0);
            let used = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            entries.push((used, name, size));
        }
        let mut total: u64 = entries.iter().map(|(_, _, size)| *size).sum();
        let mut report = StageReport::default();
        if total.saturating_add(needed) <= self.max_bytes {
            return Ok(report);
        }
        entries.sort();
        for (_, name, size) in entries {
            if total.saturating_add(needed) <= self.max_bytes {
                break;
            }
            if self.try_remove_entry(&name)? {
                total = total.saturating_sub(size);
                report.evicted.push(name);
            }
        }
        if total.saturating_add(needed) > self.max_bytes {
            report.over_limit = Some(total.saturating_add(needed));
        }
        Ok(report)
    }

    /// Removes one entry unless another supervisor holds its lock.
    /// Returns whether it was removed.
    fn try_remove_entry(&self, pdh: &str) -> Result<bool, CacheError> {
        let lock_path = self.root.join("locks").join(pdh);
        let Ok(file) = OpenOptions::new().read(true).write(true).open(&lock_path) else {
            return Ok(false);
        };
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            return Ok(false);
        };
        if !still_linked(&lock, &lock_path) {
            return Ok(false);
        }
        let entry_dir = self.collections_dir().join(pdh);
        if entry_dir.exists() {
            // The entry leaves its place in one rename, so no reader finds
            // it half-deleted.
            let doomed = tempfile::Builder::new()
                .prefix("evicted-")
                .tempdir_in(self.root.join("staging"))
                .map_err(self.io_error("create an eviction directory"))?;
            let moved = doomed.path().join(pdh);
            std::fs::rename(&entry_dir, &moved)
                .map_err(self.io_error(format!("move {} out", entry_dir.display())))?;
            doomed
                .close()
                .map_err(self.io_error(format!("delete the evicted entry {pdh}")))?;
        }
        // Removed while locked: a supervisor that opened the old file
        // notices the unlink (`still_linked`) and opens the new one.
        std::fs::remove_file(&lock_path)
            .map_err(self.io_error(format!("remove {}", lock_path.display())))?;
        Ok(true)
    }
}

/// Checks that a directory of the cache is a directory (not a symbolic
/// link) of the supervisor's user that no other user may write to.
/// Another user who could write there could plant an entry under a
/// portable data hash, which containers would then read as its content.
fn check_private(dir: &Path) -> Result<(), CacheError> {
    let uid = nix::unistd::geteuid().as_raw();
    let metadata = std::fs::symlink_metadata(dir).map_err(|source| CacheError::Io {
        dir: dir.to_path_buf(),
        action: "read the directory's metadata".to_string(),
        source,
    })?;
    let private = metadata.is_dir() && metadata.uid() == uid && metadata.mode() & 0o022 == 0;
    if private {
        Ok(())
    } else {
        Err(CacheError::UnsafeDirectory {
            dir: dir.to_path_buf(),
            uid,
        })
    }
}

/// Reads a block, or reuses the last one read, and checks it against its
/// locator.
async fn read_checked(
    blocks: &dyn BlockSource,
    pdh: &str,
    locator: &Locator,
    last: &mut Option<(String, Bytes)>,
) -> Result<Bytes, CacheError> {
    if locator.hash() == EMPTY_BLOCK_HASH && locator.size() == 0 {
        return Ok(Bytes::new());
    }
    if let Some((hash, data)) = last {
        if hash == locator.hash() {
            return Ok(data.clone());
        }
    }
    let data = blocks
        .read_block(locator)
        .await
        .map_err(|message| CacheError::Fetch {
            pdh: pdh.to_string(),
            locator: locator.bare(),
            message,
        })?;
    let md5 = hex_md5(&data);
    if md5 != locator.hash() || data.len() as u64 != locator.size() {
        return Err(CacheError::Corrupt {
            pdh: pdh.to_string(),
            locator: locator.bare(),
            size: data.len(),
            md5,
        });
    }
    *last = Some((locator.hash().to_string(), data.clone()));
    Ok(data)
}

/// Takes a lock without blocking the thread: `operation` is a
/// non-blocking lock, tried again every [`LOCK_POLL_INTERVAL`] while
/// another process holds a conflicting one.
async fn lock_polling(mut file: File, operation: FlockArg) -> io::Result<Flock<File>> {
    loop {
        match Flock::lock(file, operation) {
            Ok(lock) => return Ok(lock),
            Err((returned, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                file = returned;
                tokio::time::sleep(LOCK_POLL_INTERVAL).await;
            }
            Err((_, errno)) => return Err(io::Error::from(errno)),
        }
    }
}

/// Changes a held lock, polling like [`lock_polling`].
async fn relock_polling(lock: &Flock<File>, operation: FlockArg) -> io::Result<()> {
    loop {
        match lock.relock(operation) {
            Ok(()) => return Ok(()),
            Err(Errno::EWOULDBLOCK | Errno::EINTR) => {
                tokio::time::sleep(LOCK_POLL_INTERVAL).await;
            }
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
}

/// Returns whether `path` still names the locked file. An evictor unlinks
/// a lock file it holds, and a lock on the unlinked file protects nothing.
fn still_linked(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Marks the entry as used now, for least-recently-used eviction. A
/// failure only makes the entry look older.
fn touch(lock: &File) {
    let _ = lock.set_modified(SystemTime::now());
}

fn write_size(lock: &File, size: u64) -> io::Result<()> {
    let mut file = lock;
    file.set_len(0)?;
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(0))?;
    file.write_all(size.to_string().as_bytes())?;
    file.sync_all()
}

fn read_size(path: &Path) -> Option<u64> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

async fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).await
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
