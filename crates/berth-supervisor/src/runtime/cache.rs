//! The node's image cache: files made from an image once and shared by
//! every later container of that image on the node.
//!
//! An entry is a file or directory named by a key, the image ID's hex
//! digits, inside one cache directory. [`ensure_entry`] takes an exclusive
//! lock on `<key>.lock`, so concurrent supervisors on the node make an
//! entry once, and the others wait and then reuse it. The entry is built
//! under a temporary name and renamed into place, so a crash half-way
//! leaves no entry that looks complete. Leftovers of such a crash are
//! removed by the next build of the same key.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A cache entry that [`ensure_entry`] made or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub path: PathBuf,
    /// Whether this call built the entry, rather than finding it.
    pub built: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError<E: std::error::Error + 'static> {
    #[error("invalid image cache key {key:?}: expected lowercase hex digits")]
    InvalidKey { key: String },
    #[error("failed to {action} {path} in the image cache (supervisor.image_cache_dir): {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Build(E),
}

/// Returns the cache entry `key` in `dir`, building it with `build` at a
/// temporary path first if it does not exist yet. `build` gets the path to
/// create (as a file or a directory) and must leave nothing else behind.
/// Blocking: call it from a blocking task.
pub fn ensure_entry<E: std::error::Error + 'static>(
    dir: &Path,
    key: &str,
    suffix: &str,
    build: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<CacheEntry, CacheError<E>> {
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(CacheError::InvalidKey {
            key: key.to_string(),
        });
    }
    let io_error = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CacheError::Io {
            action,
            path,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io_error("create the directory", dir))?;
    // An image may be one that only its owner can read, so only the
    // supervisor's user may read the cache.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("restrict the permissions of", dir))?;
    let lock_path = dir.join(format!("{key}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error("open the lock file", &lock_path))?;
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_error("lock", &lock_path)(io::Error::from(errno)))?;

    let path = dir.join(format!("{key}{suffix}"));
    match std::fs::symlink_metadata(&path) {
        Ok(_) => return Ok(CacheEntry { path, built: false }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error("inspect", &path)(error)),
    }

    // The lock is held, so any temporary entry of this key is a leftover
    // of a build that did not finish.
    let temp_prefix = format!(".tmp-{key}{suffix}-");
    remove_leftovers(dir, &temp_prefix).map_err(io_error("remove leftovers in", dir))?;
    let temp = dir.join(format!("{temp_prefix}{}", std::process::id()));
    if let Err(error) = build(&temp) {
        let _ = remove_any(&temp);
        return Err(CacheError::Build(error));
    }
    if let Err(error) = std::fs::rename(&temp, &path) {
        let _ = remove_any(&temp);
        return Err(io_error("rename the new entry to", &path)(error));
    }
    drop(lock);
    Ok(CacheEntry { path, built: true })
}

fn remove_leftovers(dir: &Path, prefix: &str) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes a file, a symlink or a directory tree, without following
/// symlinks. A missing path counts as removed.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("build failed")]
    struct BuildFailed;

    #[test]
    fn second_call_reuses_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_entry(dir.path(), "ab12", ".sif", |path| {
            std::fs::write(path, b"one").map_err(|_| BuildFailed)
        })
        .unwrap();
        assert!(first.built);
        assert_eq!(first.path, dir.path().join("ab12.sif"));
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let second = ensure_entry(dir.path(), "ab12", ".sif", |_| -> Result<(), BuildFailed> {
            panic!("the entry must not be built twice")
        })
        .unwrap();
        assert!(!second.built);
        assert_eq!(std::fs::read(&second.path).unwrap(), b"one");
    }

    #[test]
    fn failed_build_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let result = ensure_entry(dir.path(), "ab12", "", |path| {
            std::fs::create_dir(path).unwrap();
            std::fs::write(path.join("partial"), b"x").unwrap();
            Err(BuildFailed)
        });
        assert!(matches!(result, Err(CacheError::Build(BuildFailed))));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["ab12.lock".to_string()]);
    }

    #[test]
    fn leftover_of_a_crash_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join(".tmp-ab12-999999");
        std::fs::create_dir(&leftover).unwrap();
        ensure_entry(dir.path(), "ab12", "", |path| {
            std::fs::create_dir(path).map_err(|_| BuildFailed)
        })
        .unwrap();
        assert!(!leftover.exists());
    }

    #[test]
    fn concurrent_callers_build_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Barrier};

        let dir = tempfile::tempdir().unwrap();
        let builds = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.path().to_path_buf();
                let builds = builds.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    ensure_entry(&dir, "cafe", "", |path| {
                        builds.fetch_add(1, Ordering::SeqCst);
                        std::fs::create_dir(path).map_err(|_| BuildFailed)?;
                        std::fs::write(path.join("content"), b"x").map_err(|_| BuildFailed)
                    })
                    .unwrap()
                })
            })
            .collect();
        let entries: Vec<CacheEntry> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert_eq!(entries.iter().filter(|entry| entry.built).count(), 1);
        for entry in &entries {
            assert_eq!(std::fs::read(entry.path.join("content")).unwrap(), b"x");
        }
    }

    #[test]
    fn key_must_be_hex() {
        let dir = tempfile::tempdir().unwrap();
        for key in ["", "../x", "AB", "sha256:ab"] {
            let result = ensure_entry(dir.path(), key, "", |_| Ok::<(), BuildFailed>(()));
            assert!(
                matches!(result, Err(CacheError::InvalidKey { .. })),
                "{key}"
            );
        }
    }
}
