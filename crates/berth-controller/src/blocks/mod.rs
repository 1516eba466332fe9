//! The block store: content-addressed blocks of collection data, named by
//! the MD5 of their bytes, behind one trait, [`BlockStore`].
//!
//! A block is at most `blocks.max_block_bytes` (64 MiB by default, as in
//! Arvados Keep). Collections refer to blocks by locator (`<md5>+<size>`);
//! the store itself keeps only hashes and bytes. Writing a block that is
//! already stored intact succeeds without writing, so clients may write
//! the same block twice, and a damaged copy is replaced. Every
//! implementation checks the MD5 of what it writes and of what it reads
//! back, so a corrupt block is an error, never data.
//!
//! [`DirectoryBlockStore`] keeps each block in a file of a local
//! directory. Another backend, such as an S3-compatible object store,
//! implements the same three calls: `put` stores the bytes under their
//! hash (an object key such as `<first 3 hex>/<hash>`, written with a
//! single PUT so it appears whole or not at all), `get` reads them back
//! and checks their MD5, and `exists` asks whether the key exists. A
//! backend keeps nothing else: collections live in the database.
//!
//! [`signing`] makes and checks the permission signatures that let a
//! caller read and write blocks.

mod directory;
pub mod signing;

use async_trait::async_trait;
use bytes::Bytes;

pub use directory::DirectoryBlockStore;

/// A failure of the block store.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The bytes given for a block do not have the block's hash.
    #[error("the block's MD5 is {actual}, not the expected {expected}")]
    HashMismatch { expected: String, actual: String },
    /// A stored block no longer has its hash: its file was damaged.
    #[error("stored block {hash} is corrupt: its content has MD5 {actual}")]
    Corrupt { hash: String, actual: String },
    #[error("failed to {operation} block {hash} at {path}: {source}")]
    Io {
        operation: &'static str,
        hash: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking I/O task ended without a result.
    #[error("failed to {operation} block {hash}: the I/O task did not finish: {reason}")]
    Task {
        operation: &'static str,
        hash: String,
        reason: String,
    },
}

/// A store of blocks. Hashes given to these calls are 32 lowercase hex
/// digits, which callers check before they call.
#[async_trait]
pub trait BlockStore: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `hash`, after checking that `hash` is its MD5.
    /// Storing a block that exists intact succeeds without writing.
    async fn put(&self, hash: &str, data: Bytes) -> Result<(), BlockError>;

    /// Reads a block, checking its MD5; `None` when it is not stored.
    async fn get(&self, hash: &str) -> Result<Option<Bytes>, BlockError>;

    /// Returns true when a block is stored.
    async fn exists(&self, hash: &str) -> Result<bool, BlockError>;
}
