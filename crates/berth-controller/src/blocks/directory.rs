//! A block store in a local directory: each block is the file
//! `<directory>/<first 3 hex digits of the hash>/<hash>`, so no
//! subdirectory holds more than 1/4096 of the blocks.
//!
//! A write goes to a temporary file in the block's subdirectory, is
//! flushed to disk (`fsync`), and is then renamed to the block's name,
//! and the subdirectory is flushed too. A reader therefore sees a whole
//! block or none, even after a crash, and two writers of one block each
//! rename a complete copy.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use berth_core::manifest::hex_md5;
use bytes::Bytes;

use super::{BlockError, BlockStore};

/// Mode of the directories the store creates: the controller's user only.
const DIRECTORY_MODE: u32 = 0o700;

/// Blocks as files under one directory.
#[derive(Debug, Clone)]
pub struct DirectoryBlockStore {
    root: PathBuf,
}

impl DirectoryBlockStore {
    /// Uses `root`, which is created (mode 0700) at the first write when
    /// it does not exist.
    pub fn new(root: impl Into<PathBuf>) -> DirectoryBlockStore {
        DirectoryBlockStore { root: root.into() }
    }

    fn shard(&self, hash: &str) -> PathBuf {
        self.root.join(&hash[..3])
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.shard(hash).join(hash)
    }
}

fn io_error(
    operation: &'static str,
    hash: &str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> BlockError {
    let hash = hash.to_string();
    let path = path.to_path_buf();
    move |source| BlockError::Io {
        operation,
        hash,
        path,
        source,
    }
}

/// Writes a block through a temporary file and a rename (see the module
/// documentation).
fn write_block(shard: &Path, path: &Path, hash: &str, data: &[u8]) -> Result<(), BlockError> {
    // An intact copy stays; a damaged one is replaced by this write.
    match read_block(path, hash) {
        Ok(Some(_)) => return Ok(()),
        Ok(None) => {}
        Err(err) => tracing::warn!(block = hash, error = %err, "replacing a stored block"),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIRECTORY_MODE)
        .create(shard)
        .map_err(io_error("create the directory of", hash, shard))?;
    let mut file = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(shard)
        .map_err(io_error("create a temporary file for", hash, shard))?;
    file.write_all(data)
        .map_err(io_error("write", hash, file.path()))?;
    file.as_file()
        .sync_all()
        .map_err(io_error("flush", hash, file.path()))?;
    file.persist(path)
        .map_err(|err| io_error("rename into place", hash, path)(err.error))?;
    std::fs::File::open(shard)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error("flush the directory of", hash, shard))?;
    Ok(())
}

fn read_block(path: &Path, hash: &str) -> Result<Option<Bytes>, BlockError> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_error("read", hash, path)(err)),
    };
    let actual = hex_md5(&data);
    if actual != hash {
        return Err(BlockError::Corrupt {
            hash: hash.to_string(),
            actual,
        });
    }
    Ok(Some(Bytes::from(data)))
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    operation: &'static str,
    hash: &str,
    work: impl FnOnce() -> Result<T, BlockError> + Send + 'static,
) -> Result<T, BlockError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| BlockError::Task {
            operation,
            hash: hash.to_string(),
            reason: err.to_string(),
        })?
}

#[async_trait]
impl BlockStore for DirectoryBlockStore {
    async fn put(&self, hash: &str, data: Bytes) -> Result<(), BlockError> {
        let shard = self.shard(hash);
        let path = self.path(hash);
        let owned_hash = hash.to_string();
        blocking("write", hash, move || {
            let actual = hex_md5(&data);
            if actual != owned_hash {
                return Err(BlockError::HashMismatch {
                    expected: owned_hash,
                    actual,
                });
            }
            write_block(&shard, &path, &owned_hash, &data)
        })
        .await
    }

    async fn get(&self, hash: &str) -> Result<Option<Bytes>, BlockError> {
        let path = self.path(hash);
        let owned_hash = hash.to_string();
        blocking("read", hash, move || read_block(&path, &owned_hash)).await
    }

    async fn exists(&self, hash: &str) -> Result<bool, BlockError> {
        let path = self.path(hash);
        blocking("look up", hash, move || Ok(path.is_file())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOO_HASH: &str = "acbd18db4cc2f85cedef654fccc4a4d8";

    #[tokio::test]
    async fn put_then_get_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryBlockStore::new(dir.path().join("blocks"));
        assert!(!store.exists(FOO_HASH).await.unwrap());
        store
            .put(FOO_HASH, Bytes::from_static(b"foo"))
            .await
            .unwrap();
        assert!(store.exists(FOO_HASH).await.unwrap());
        let path = dir.path().join("blocks/acb").join(FOO_HASH);
        assert_eq!(std::fs::read(&path).unwrap(), b"foo");
        let data = store.get(FOO_HASH).await.unwrap().unwrap();
        assert_eq!(&data[..], b"foo");
        // A second write of the same block succeeds.
        store
            .put(FOO_HASH, Bytes::from_static(b"foo"))
            .await
            .unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("blocks/acb"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[tokio::test]
    async fn put_rejects_wrong_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryBlockStore::new(dir.path());
        let err = store
            .put(FOO_HASH, Bytes::from_static(b"bar"))
            .await
            .unwrap_err();
        assert!(matches!(err, BlockError::HashMismatch { .. }), "{err}");
        assert!(!store.exists(FOO_HASH).await.unwrap());
    }

    #[tokio::test]
    async fn missing_block_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryBlockStore::new(dir.path());
        assert!(store.get(FOO_HASH).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn put_replaces_corrupt_block() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryBlockStore::new(dir.path());
        store
            .put(FOO_HASH, Bytes::from_static(b"foo"))
            .await
            .unwrap();
        std::fs::write(dir.path().join("acb").join(FOO_HASH), b"fox").unwrap();
        store
            .put(FOO_HASH, Bytes::from_static(b"foo"))
            .await
            .unwrap();
        let data = store.get(FOO_HASH).await.unwrap().unwrap();
        assert_eq!(&data[..], b"foo");
    }

    #[tokio::test]
    async fn corrupt_block_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryBlockStore::new(dir.path());
        store
            .put(FOO_HASH, Bytes::from_static(b"foo"))
            .await
            .unwrap();
        std::fs::write(dir.path().join("acb").join(FOO_HASH), b"fox").unwrap();
        let err = store.get(FOO_HASH).await.unwrap_err();
        assert!(matches!(err, BlockError::Corrupt { .. }), "{err}");
    }
}
