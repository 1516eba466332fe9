use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use berth_core::manifest::{ManifestBuilder, Segment};

use super::*;

/// Blocks kept in memory, counting reads. `corrupt` blocks come back
/// with their last byte flipped.
#[derive(Default)]
struct MemoryBlocks {
    blocks: Mutex<HashMap<String, Bytes>>,
    reads: AtomicUsize,
    corrupt: bool,
    delay: Duration,
}

impl MemoryBlocks {
    fn put(&self, data: &[u8]) -> Locator {
        let locator = Locator::new(&hex_md5(data), data.len() as u64).unwrap();
        self.blocks
            .lock()
            .unwrap()
            .insert(locator.hash().to_string(), Bytes::copy_from_slice(data));
        locator
    }
}

#[async_trait]
impl BlockSource for MemoryBlocks {
    async fn read_block(&self, locator: &Locator) -> Result<Bytes, String> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let data = self
            .blocks
            .lock()
            .unwrap()
            .get(locator.hash())
            .cloned()
            .ok_or_else(|| format!("block {} not found", locator.bare()))?;
        if self.corrupt {
            let mut damaged = data.to_vec();
            if let Some(last) = damaged.last_mut() {
                *last ^= 0xff;
            }
            return Ok(Bytes::from(damaged));
        }
        Ok(data)
    }
}

/// Stores `files` in `blocks`, each cut into blocks of `block_size`
/// bytes, and returns their manifest and its portable data hash.
fn collection(
    blocks: &MemoryBlocks,
    files: &[(&str, &[u8])],
    block_size: usize,
) -> (Manifest, String) {
    let mut builder = ManifestBuilder::new();
    for (path, data) in files {
        let segments = data
            .chunks(block_size)
            .map(|chunk| Segment {
                locator: blocks.put(chunk),
                offset: 0,
                length: chunk.len() as u64,
            })
            .collect();
        builder.add_file(path, segments).unwrap();
    }
    let manifest = builder.finish().unwrap();
    let pdh = manifest.portable_data_hash();
    (manifest, pdh)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn stage_writes_files_byte_exact() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().join("cache"), 1 << 20);
    let blocks = MemoryBlocks::default();
    let long: Vec<u8> = (0..1000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (manifest, pdh) = collection(
        &blocks,
        &[("a.txt", b"hello\n"), ("sub/long.bin", &long)],
        1024,
    );

    let (entry, report) = cache.stage(&pdh, &manifest, &blocks).await.unwrap();
    assert!(entry.fetched());
    assert_eq!(report, StageReport::default());
    assert_eq!(entry.path(), cache.collections_dir().join(&pdh));
    assert_eq!(
        std::fs::read(entry.path().join("a.txt")).unwrap(),
        b"hello\n"
    );
    assert!(std::fs::read(entry.path().join("sub/long.bin")).unwrap() == long);
    assert_eq!(mode(&entry.path().join("a.txt")), 0o444);
    assert_eq!(mode(root.path().join("cache").as_path()), 0o700);
    // a.txt is one block and long.bin four.
    assert_eq!(blocks.reads.load(Ordering::SeqCst), 5);

    let (again, _) = cache.stage(&pdh, &manifest, &blocks).await.unwrap();
    assert!(!again.fetched());
    assert_eq!(again.path(), entry.path());
    assert_eq!(
        blocks.reads.load(Ordering::SeqCst),
        5,
        "a cached entry is not fetched again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stages_fetch_once() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().to_path_buf(), 1 << 20);
    let blocks = Arc::new(MemoryBlocks {
        delay: Duration::from_millis(100),
        ..MemoryBlocks::default()
    });
    let data = vec![7u8; 3000];
    let (manifest, pdh) = collection(&blocks, &[("data", &data)], 1000);

    let stages: Vec<_> = (0..4)
        .map(|_| {
            let (cache, blocks, manifest, pdh) =
                (cache.clone(), blocks.clone(), manifest.clone(), pdh.clone());
            tokio::spawn(async move {
                let (entry, _) = cache.stage(&pdh, &manifest, blocks.as_ref()).await.unwrap();
                let content = std::fs::read(entry.path().join("data")).unwrap();
                (entry.fetched(), content)
            })
        })
        .collect();
    let mut fetched = 0;
    for stage in stages {
        let (did_fetch, content) = stage.await.unwrap();
        assert!(content == data, "every stage sees the whole file");
        fetched += usize::from(did_fetch);
    }
    assert_eq!(fetched, 1, "exactly one stage fetches");
    // Three 1000-byte blocks, all with the same content: the last block
    // read is reused, so one read.
    assert_eq!(blocks.reads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn corrupt_block_is_rejected_and_leaves_no_entry() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().to_path_buf(), 1 << 20);
    let bad = MemoryBlocks {
        corrupt: true,
        ..MemoryBlocks::default()
    };
    let (manifest, pdh) = collection(&bad, &[("f", b"payload")], 1024);

    let error = cache.stage(&pdh, &manifest, &bad).await.unwrap_err();
    assert!(matches!(error, CacheError::Corrupt { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&pdh), "{message}");
    assert!(message.contains("arrived damaged"), "{message}");
    assert!(!cache.collections_dir().join(&pdh).exists());

    // A later stage with a good source succeeds.
    let good = MemoryBlocks::default();
    collection(&good, &[("f", b"payload")], 1024);
    let (entry, _) = cache.stage(&pdh, &manifest, &good).await.unwrap();
    assert_eq!(std::fs::read(entry.path().join("f")).unwrap(), b"payload");
}

#[tokio::test]
async fn missing_block_names_the_locator() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().to_path_buf(), 1 << 20);
    let source = MemoryBlocks::default();
    let (manifest, pdh) = collection(&source, &[("f", b"abc")], 1024);
    let empty = MemoryBlocks::default();
    let error = cache.stage(&pdh, &manifest, &empty).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!("{}+3", hex_md5(b"abc"))),
        "{message}"
    );
}

/// Sets an entry's last use, for least-recently-used order.
fn set_last_use(cache: &CollectionCache, pdh: &str, seconds_ago: u64) {
    let lock = File::options()
        .write(true)
        .open(cache.root.join("locks").join(pdh))
        .unwrap();
    lock.set_modified(SystemTime::now() - Duration::from_secs(seconds_ago))
        .unwrap();
}

#[tokio::test]
async fn eviction_removes_least_recently_used_first() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().to_path_buf(), 10);
    let blocks = MemoryBlocks::default();
    let (a, a_pdh) = collection(&blocks, &[("a", b"aaaa")], 1024);
    let (b, b_pdh) = collection(&blocks, &[("b", b"bbbb")], 1024);
    let (c, c_pdh) = collection(&blocks, &[("c", b"cccc")], 1024);

    drop(cache.stage(&a_pdh, &a, &blocks).await.unwrap());
    drop(cache.stage(&b_pdh, &b, &blocks).await.unwrap());
    set_last_use(&cache, &a_pdh, 10);
    set_last_use(&cache, &b_pdh, 100);

    let (_, report) = cache.stage(&c_pdh, &c, &blocks).await.unwrap();
    assert_eq!(report.evicted, vec![b_pdh.clone()]);
    assert_eq!(report.over_limit, None);
    assert!(!cache.collections_dir().join(&b_pdh).exists());
    assert!(!cache.root.join("locks").join(&b_pdh).exists());
    assert!(cache.collections_dir().join(&a_pdh).is_dir());
    assert!(cache.collections_dir().join(&c_pdh).is_dir());
}

#[tokio::test]
async fn entry_in_use_is_not_evicted() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().to_path_buf(), 10);
    let blocks = MemoryBlocks::default();
    let (a, a_pdh) = collection(&blocks, &[("a", b"aaaaaa")], 1024);
    let (b, b_pdh) = collection(&blocks, &[("b", b"bbbbbb")], 1024);

    let (in_use, _) = cache.stage(&a_pdh, &a, &blocks).await.unwrap();
    let (_, report) = cache.stage(&b_pdh, &b, &blocks).await.unwrap();
    assert!(report.evicted.is_empty());
    assert_eq!(report.over_limit, Some(12));
    assert_eq!(std::fs::read(in_use.path().join("a")).unwrap(), b"aaaaaa");

    // Once released, the entry goes at the next stage that needs room.
    drop(in_use);
    let (d, d_pdh) = collection(&blocks, &[("d", b"dd")], 1024);
    let (_, report) = cache.stage(&d_pdh, &d, &blocks).await.unwrap();
    assert_eq!(report.evicted, vec![a_pdh]);
}

#[tokio::test]
async fn collection_larger_than_maximum_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().to_path_buf(), 4);
    let blocks = MemoryBlocks::default();
    let (manifest, pdh) = collection(&blocks, &[("big", b"12345")], 1024);
    let error = cache.stage(&pdh, &manifest, &blocks).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("5 bytes"), "{message}");
    assert!(
        message.contains("supervisor.cache_max_bytes (4)"),
        "{message}"
    );
    assert_eq!(blocks.reads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn cache_directory_writable_by_others_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cache = CollectionCache::new(dir.clone(), 1 << 20);
    let blocks = MemoryBlocks::default();
    let (manifest, pdh) = collection(&blocks, &[("f", b"x")], 1024);

    let error = cache.stage(&pdh, &manifest, &blocks).await.unwrap_err();
    assert!(
        matches!(error, CacheError::UnsafeDirectory { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains(&dir.display().to_string()),
        "{error}"
    );
    assert_eq!(blocks.reads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn failed_stage_leaves_no_staging_directory() {
    let root = tempfile::tempdir().unwrap();
    let cache = CollectionCache::new(root.path().to_path_buf(), 1 << 20);
    let source = MemoryBlocks::default();
    let (manifest, pdh) = collection(&source, &[("f", b"abc")], 1024);

    let empty = MemoryBlocks::default();
    cache.stage(&pdh, &manifest, &empty).await.unwrap_err();
    let staging: Vec<_> = std::fs::read_dir(root.path().join("staging"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
}
