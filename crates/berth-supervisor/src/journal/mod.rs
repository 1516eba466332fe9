//! The final-state journal: what a supervisor still has to deliver to the
//! controller, kept on the node's disk so that neither a controller outage
//! nor the supervisor's own death loses a container's final state.
//!
//! The journal is one directory (`supervisor.journal_dir`, mode 0700).
//! Each entry is a directory named after its container:
//!
//! ```text
//! <journal_dir>/<container uuid>/entry.json   the entry (mode 0600)
//! <journal_dir>/<container uuid>/lock         flock(2) of its deliverer
//! <journal_dir>/<container uuid>/output/      output files not yet uploaded
//! <journal_dir>/<container uuid>/log/         log files not yet uploaded
//! ```
//!
//! A supervisor prepares its entry in a staging directory,
//! `.staging-<uuid>-<pid>-<random>`, which it locks as soon as it exists.
//! Writing `entry.json` (temporary file, fsync, rename, fsync of the
//! directory) and renaming the staging directory to the container's uuid
//! (then an fsync of the journal directory) commit the entry. A process
//! delivers an entry only while it has the entry's lock, so the
//! supervisor, a later supervisor on the node and `berth supervise
//! --deliver-journal` never deliver the same entry at once. The entry is removed only after the controller
//! recorded the final state, or responded that it never will.
//!
//! An entry stores the path of the container's credentials file, never
//! its token. The file is the dispatcher's, mode 0600, and the dispatcher
//! removes it once the container is final or unlocked.
//!
//! NOTE: the dispatcher cancels a container whose batch job ended without
//! a final state, so the entry of a killed supervisor is delivered only
//! when a delivery comes before the dispatcher notices the job's end.

mod deliver;

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use deliver::{
    deliver_once, deliver_pending, deliver_until, log_attempt, Attempt, DeliverySettings,
    PendingSummary,
};

/// The entry's file in its directory.
const ENTRY_FILE: &str = "entry.json";

/// The lock file in an entry's directory.
const LOCK_FILE: &str = "lock";

/// The subdirectory of output files that still have to be uploaded.
pub const OUTPUT_DIR: &str = "output";

/// The subdirectory of log files that still have to be uploaded.
pub const LOG_DIR: &str = "log";

/// The prefix of staging directories.
const STAGING_PREFIX: &str = ".staging-";

/// Age after which an unlocked staging directory is left over from a
/// supervisor that died before it committed its entry, and is removed.
const STALE_STAGING_AGE: Duration = Duration::from_secs(3600);

/// The version of the entry format that this code writes and reads.
const ENTRY_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("failed to create the journal directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the journal directory {path} has mode {mode:o}, so other users may read it: make it mode 0700 (chmod 700 {path})")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the journal path {path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("journal entry {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("journal entry {path} has version {found}; this berth reads version {ENTRY_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("a journal entry for container {uuid} already exists in {path}")]
    Exists { uuid: String, path: PathBuf },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io {
        action,
        path,
        source,
    }
}

/// One container's final state, and how to deliver its output and log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub version: u32,
    pub container_uuid: String,
    /// Absolute path of the container's credentials file, whose token
    /// delivers the entry. `None` when the supervisor was not given a
    /// file; then only a supervisor of the same container, which brings
    /// its own credentials, delivers the entry.
    pub credentials_file: Option<PathBuf>,
    /// The container update that records the final state (`state`,
    /// `exit_code`, `runtime_status`), without `output` and `log`.
    pub attributes: Value,
    /// The output, when the container has an output directory.
    pub output: Option<Part>,
    /// The log collection, when it is on.
    pub log: Option<Part>,
    /// When the entry was first written, in RFC 3339.
    pub written_at: String,
}

/// The output or the log collection of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    /// Saved as the collection with this portable data hash.
    Saved { portable_data_hash: String },
    /// Kept in the entry's subdirectory of this part ([`OUTPUT_DIR`] or
    /// [`LOG_DIR`]) until it is uploaded.
    Pending,
}

impl Entry {
    pub fn new(
        container_uuid: &str,
        credentials_file: Option<PathBuf>,
        attributes: Value,
    ) -> Entry {
        Entry {
            version: ENTRY_VERSION,
            container_uuid: container_uuid.to_string(),
            credentials_file,
            attributes,
            output: None,
            log: None,
            written_at: chrono::Utc::now().to_rfc3339(),
        }
    }

    /// Returns the whole update: the final state with `output` and `log`
    /// set to the collections that are saved.
    pub fn final_update(&self) -> Value {
        let mut attributes = self.attributes.clone();
        if let Value::Object(map) = &mut attributes {
            for (key, part) in [("output", &self.output), ("log", &self.log)] {
                if let Some(Part::Saved { portable_data_hash }) = part {
                    map.insert(key.into(), Value::String(portable_data_hash.clone()));
                }
            }
        }
        attributes
    }
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens the directory, creating it (and its parents) when missing,
    /// with mode 0700. An existing directory that other users may enter is
    /// rejected.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        let create_error = |source| JournalError::Create {
            path: dir.to_path_buf(),
            source,
        };
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::AlreadyExists => {}
            Err(error) => return Err(create_error(error)),
        }
        let metadata = std::fs::metadata(dir).map_err(create_error)?;
        if !metadata.is_dir() {
            return Err(JournalError::NotDirectory {
                path: dir.to_path_buf(),
            });
        }
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(JournalError::Permissions {
                path: dir.to_path_buf(),
                mode,
            });
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates and locks a staging directory for the entry of `uuid`.
    pub fn stage(&self, uuid: &str) -> Result<Staging, JournalError> {
        let suffix: u32 = rand::thread_rng().gen();
        let name = format!("{STAGING_PREFIX}{uuid}-{}-{suffix:08x}", std::process::id());
        let path = self.dir.join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_error("create the staging directory", &path))?;
        let lock = match lock_file(&path.join(LOCK_FILE), true) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                let _ = std::fs::remove_dir_all(&path);
                return Err(JournalError::Lock {
                    path: path.join(LOCK_FILE),
                    source: Errno::EWOULDBLOCK,
                });
            }
            Err(error) => {
                let _ = std::fs::remove_dir_all(&path);
                return Err(error);
            }
        };
        Ok(Staging {
            journal_dir: self.dir.clone(),
            path,
            uuid: uuid.to_string(),
            lock: Some(lock),
        })
    }

    /// Returns whether an entry for `uuid` exists.
    pub fn contains(&self, uuid: &str) -> bool {
        self.dir.join(uuid).join(ENTRY_FILE).exists()
    }

    /// Locks the entry of `uuid`. Returns `None` when there is none, or
    /// when another process holds its lock.
    pub fn lock(&self, uuid: &str) -> Result<Option<LockedEntry>, JournalError> {
        let path = self.dir.join(uuid);
        let Some(lock) = lock_file(&path.join(LOCK_FILE), false)? else {
            return Ok(None);
        };
        // The entry may have been delivered and removed between the open
        // and the lock.
        if !path.join(ENTRY_FILE).exists() {
            return Ok(None);
        }
        Ok(Some(LockedEntry {
            journal_dir: self.dir.clone(),
            path,
            _lock: lock,
        }))
    }

    /// Lists the containers that have an entry, in name order.
    pub fn list(&self) -> Result<Vec<String>, JournalError> {
        let mut uuids = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))? {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            if entry.path().join(ENTRY_FILE).exists() {
                uuids.push(name);
            }
        }
        uuids.sort();
        Ok(uuids)
    }

    /// Removes the staging directories that no process has locked and that
    /// are older than an hour: those of supervisors that died before they
    /// committed an entry. Returns the removed paths.
    pub fn remove_stale_staging(&self) -> Result<Vec<PathBuf>, JournalError> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))? {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            let is_staging = entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(STAGING_PREFIX));
            if !is_staging {
                continue;
            }
            let path = entry.path();
            let age = entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|modified| SystemTime::now().duration_since(modified).ok());
            if age.is_none_or(|age| age < STALE_STAGING_AGE) {
                continue;
            }
            // Held by a live supervisor, or already gone: leave it.
            let Some(lock) = lock_file(&path.join(LOCK_FILE), false)? else {
                continue;
            };
            std::fs::remove_dir_all(&path).map_err(io_error("remove", &path))?;
            drop(lock);
            removed.push(path);
        }
        Ok(removed)
    }
}

/// A staging directory, locked, where an entry is prepared. Dropped
/// without [`Staging::commit`], it is removed.
#[derive(Debug)]
pub struct Staging {
    journal_dir: PathBuf,
    path: PathBuf,
    uuid: String,
    lock: Option<Flock<File>>,
}

impl Staging {
    /// Returns the directory of a part's files ([`OUTPUT_DIR`] or
    /// [`LOG_DIR`]), creating it with mode 0700.
    pub fn part_dir(&self, part: &str) -> Result<PathBuf, JournalError> {
        create_part_dir(&self.path, part)
    }

    /// Writes the entry and renames the staging directory to the
    /// container's uuid, both durably. The lock stays held.
    pub fn commit(mut self, entry: &Entry) -> Result<LockedEntry, JournalError> {
        write_entry(&self.path, entry)?;
        let target = self.journal_dir.join(&self.uuid);
        if target.exists() {
            return Err(JournalError::Exists {
                uuid: self.uuid.clone(),
                path: target,
            });
        }
        std::fs::rename(&self.path, &target).map_err(io_error("rename", &self.path))?;
        sync_dir(&self.journal_dir)?;
        let lock = self.lock.take();
        self.path = target.clone();
        match lock {
            Some(lock) => Ok(LockedEntry {
                journal_dir: self.journal_dir.clone(),
                path: target,
                _lock: lock,
            }),
            None => Err(JournalError::Lock {
                path: target.join(LOCK_FILE),
                source: Errno::ENOLCK,
            }),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.lock.is_some() {
            if let Err(error) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %error, "failed to remove a journal staging directory");
            }
        }
    }
}

/// A committed entry whose lock this process holds.
#[derive(Debug)]
pub struct LockedEntry {
    journal_dir: PathBuf,
    path: PathBuf,
    _lock: Flock<File>,
}

impl LockedEntry {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the entry.
    pub fn read(&self) -> Result<Entry, JournalError> {
        let path = self.path.join(ENTRY_FILE);
        let text = std::fs::read(&path).map_err(io_error("read", &path))?;
        let entry: Entry = serde_json::from_slice(&text).map_err(|source| JournalError::Parse {
            path: path.clone(),
            source,
        })?;
        if entry.version != ENTRY_VERSION {
            return Err(JournalError::Version {
                path,
                found: entry.version,
            });
        }
        Ok(entry)
    }

    /// Returns the directory of a part's files ([`OUTPUT_DIR`] or
    /// [`LOG_DIR`]), creating it with mode 0700. Set the part to
    /// [`Part::Pending`] with [`LockedEntry::update`] once the files are
    /// there.
    pub fn part_dir(&self, part: &str) -> Result<PathBuf, JournalError> {
        create_part_dir(&self.path, part)
    }

    /// Replaces the entry durably.
    pub fn update(&self, entry: &Entry) -> Result<(), JournalError> {
        write_entry(&self.path, entry)
    }

    /// Removes a part's files once they are uploaded and the entry names
    /// their collection.
    pub fn remove_part(&self, part: &str) -> Result<(), JournalError> {
        let path = self.path.join(part);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("remove", &path)(error)),
        }
    }

    /// Removes the entry: its file first, durably, so that a crash half-way
    /// leaves no entry to deliver again, then its directory. The lock is
    /// released when `self` is dropped.
    pub fn remove(&self) -> Result<(), JournalError> {
        let file = self.path.join(ENTRY_FILE);
        std::fs::remove_file(&file).map_err(io_error("remove", &file))?;
        sync_dir(&self.path)?;
        std::fs::remove_dir_all(&self.path).map_err(io_error("remove", &self.path))?;
        sync_dir(&self.journal_dir)
    }
}

fn create_part_dir(entry_dir: &Path, part: &str) -> Result<PathBuf, JournalError> {
    let path = entry_dir.join(part);
    match std::fs::DirBuilder::new().mode(0o700).create(&path) {
        Ok(()) => Ok(path),
        Err(error) if error.kind() == ErrorKind::AlreadyExists => Ok(path),
        Err(error) => Err(io_error("create", &path)(error)),
    }
}

/// Opens `path` and takes its exclusive lock without waiting. Returns
/// `None` when the file does not exist (and `create` is false) or another
/// process holds the lock.
fn lock_file(path: &Path, create: bool) -> Result<Option<Flock<File>>, JournalError> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(error) if !create && error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error("open", path)(error)),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(JournalError::Lock {
            path: path.to_path_buf(),
            source: errno,
        }),
    }
}

/// Writes `entry.json` in `dir` through a temporary file, fsync and
/// rename, then fsyncs `dir`.
fn write_entry(dir: &Path, entry: &Entry) -> Result<(), JournalError> {
    let text = serde_json::to_vec_pretty(entry).map_err(|source| JournalError::Parse {
        path: dir.join(ENTRY_FILE),
        source,
    })?;
    let temporary = dir.join(format!(".{ENTRY_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io_error("create", &temporary))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &temporary))?;
    let target = dir.join(ENTRY_FILE);
    std::fs::rename(&temporary, &target).map_err(io_error("rename", &temporary))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(io_error("sync", dir))
}

/// Returns whether `path` belongs to the user running this process; the
/// journal never delivers another user's entry with this user's rights.
fn owned_by_current_user(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|metadata| metadata.uid() == nix::unistd::geteuid().as_raw())
        .unwrap_or(false)
}

/// Copies the files of `source` (one level, regular files only) into
/// `dest`. Blocking.
pub fn copy_flat_files(source: &Path, dest: &Path) -> Result<u64, JournalError> {
    let mut count = 0;
    for entry in std::fs::read_dir(source).map_err(io_error("list", source))? {
        let entry = entry.map_err(io_error("list", source))?;
        let file_type = entry.file_type().map_err(io_error("read", &entry.path()))?;
        if !file_type.is_file() {
            continue;
        }
        let target = dest.join(entry.file_name());
        std::fs::copy(entry.path(), &target).map_err(io_error("copy", &entry.path()))?;
        File::open(&target)
            .and_then(|file| file.sync_all())
            .map_err(io_error("sync", &target))?;
        count += 1;
    }
    sync_dir(dest)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UUID: &str = "zzzzz-dz642-000000000000001";

    fn journal() -> (tempfile::TempDir, Journal) {
        let base = tempfile::tempdir().unwrap();
        let journal = Journal::open(&base.path().join("journal")).unwrap();
        (base, journal)
    }

    #[test]
    fn open_creates_a_private_directory() {
        let (base, journal) = journal();
        let mode = std::fs::metadata(journal.dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        drop(base);
    }

    #[test]
    fn open_rejects_a_directory_others_may_enter() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("open");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = Journal::open(&dir).unwrap_err().to_string();
        assert!(error.contains("mode 755"), "{error}");
        assert!(error.contains("chmod 700"), "{error}");
    }

    #[test]
    fn committed_entry_is_listed_locked_and_removed() {
        let (_base, journal) = journal();
        let staging = journal.stage(UUID).unwrap();
        let output = staging.part_dir(OUTPUT_DIR).unwrap();
        std::fs::write(output.join("a.txt"), "hello").unwrap();
        let mut entry = Entry::new(UUID, None, json!({"state": "Complete", "exit_code": 3}));
        entry.output = Some(Part::Pending);
        assert!(
            journal.list().unwrap().is_empty(),
            "staging is not an entry"
        );

        let locked = staging.commit(&entry).unwrap();
        assert_eq!(journal.list().unwrap(), vec![UUID.to_string()]);
        assert!(journal.contains(UUID));
        assert_eq!(locked.read().unwrap(), entry);
        assert!(locked.path().join(OUTPUT_DIR).join("a.txt").exists());
        let mode = std::fs::metadata(locked.path().join(ENTRY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // flock(2) locks belong to the open file description, so a second
        // open in the same process finds the file locked, as another
        // process would.
        assert!(journal.lock(UUID).unwrap().is_none());

        locked.remove().unwrap();
        assert!(journal.list().unwrap().is_empty());
        assert!(!journal.dir().join(UUID).exists());
        assert!(journal.lock(UUID).unwrap().is_none());
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let (_base, journal) = journal();
        let staging = journal.stage(UUID).unwrap();
        staging.part_dir(LOG_DIR).unwrap();
        drop(staging);
        assert_eq!(std::fs::read_dir(journal.dir()).unwrap().count(), 0);
    }

    #[test]
    fn unlocked_entry_can_be_taken_over() {
        let (_base, journal) = journal();
        let entry = Entry::new(UUID, None, json!({"state": "Cancelled"}));
        drop(journal.stage(UUID).unwrap().commit(&entry).unwrap());
        let locked = journal.lock(UUID).unwrap().expect("the entry is free");
        let mut updated = locked.read().unwrap();
        updated.log = Some(Part::Saved {
            portable_data_hash: "d41d8cd98f00b204e9800998ecf8427e+0".into(),
        });
        locked.update(&updated).unwrap();
        assert_eq!(locked.read().unwrap(), updated);
    }

    #[test]
    fn only_old_unlocked_staging_is_removed() {
        let (_base, journal) = journal();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        let make = |name: &str| {
            let path = journal.dir().join(name);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join(LOCK_FILE), "").unwrap();
            path
        };
        let dead = make(".staging-dead");
        let fresh = make(".staging-fresh");
        let live = journal.stage(UUID).unwrap();
        for path in [&dead, &live.path] {
            File::open(path)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }

        let removed = journal.remove_stale_staging().unwrap();
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(fresh.exists(), "a recent staging directory may be new");
        assert!(live.path.exists(), "a locked staging directory is in use");
    }

    #[test]
    fn final_update_adds_saved_parts_only() {
        let mut entry = Entry::new(UUID, None, json!({"state": "Complete", "exit_code": 0}));
        entry.output = Some(Part::Saved {
            portable_data_hash: "d41d8cd98f00b204e9800998ecf8427e+0".into(),
        });
        entry.log = Some(Part::Pending);
        assert_eq!(
            entry.final_update(),
            json!({"state": "Complete", "exit_code": 0, "output": "d41d8cd98f00b204e9800998ecf8427e+0"})
        );
    }

    #[test]
    fn invalid_entry_names_the_file() {
        let (_base, journal) = journal();
        let entry = Entry::new(UUID, None, json!({"state": "Cancelled"}));
        let locked = journal.stage(UUID).unwrap().commit(&entry).unwrap();
        std::fs::write(locked.path().join(ENTRY_FILE), "{").unwrap();
        let error = locked.read().unwrap_err().to_string();
        assert!(error.contains("entry.json"), "{error}");
        assert!(error.contains("not valid"), "{error}");
    }
}
