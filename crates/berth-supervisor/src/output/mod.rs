//! Saving the container's output directory as a collection.
//!
//! After the container exits, the supervisor walks the host directory of
//! the `tmp` mount at `output_path` as its own user and keeps the files
//! that `output_glob` matches ([`glob`]). It packs them into blocks of
//! `block_size` bytes, writes the blocks one at a time through the
//! controller's block API, and describes them in one manifest. Small
//! files share blocks, and a file larger than a block spans several.
//!
//! Symbolic links are resolved on the host and followed only when the
//! final target is inside the output directory. A link to anywhere else
//! (`/etc/passwd`), a dangling link, a link cycle, sockets, FIFOs and
//! device files are skipped, each with a line in the supervisor log.

pub mod glob;
mod pack;
mod walk;

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_client::{Client, ClientError};
use berth_core::manifest::ManifestBuilder;
use serde_json::json;

use crate::logs::SupervisorLog;
use crate::retry::{retry, Backoff};
pub use glob::{GlobError, Globs};
use pack::BlockPacker;
pub use walk::{walk_output, OutputFile, WalkResult};

/// The largest block size: Keep's 64 MiB.
pub const MAX_BLOCK_SIZE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Glob(#[from] GlobError),
    #[error("output_path {path} is neither a tmp mount nor a writable collection mount; make it a tmp mount")]
    NotTmp { path: String },
    #[error("failed to read the output directory entry {path}: {source}")]
    Walk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read output file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "output file {path} changed size while it was read: expected {expected} bytes, read {read}"
    )]
    SizeChanged {
        path: String,
        expected: u64,
        read: u64,
    },
    #[error("the output is too large: {size} bytes, more than supervisor.max_output_bytes ({limit}); write less output or raise the limit")]
    TooLarge { size: u64, limit: u64 },
    #[error("failed to describe the output: {0}")]
    Name(#[from] berth_core::manifest::PathError),
    #[error("failed to write an output block: {0}")]
    Upload(#[source] ClientError),
    #[error("the controller returned an invalid locator {0:?}")]
    Locator(String),
    #[error("failed to create the output collection: {0}")]
    Create(#[source] ClientError),
    #[error("failed to walk the output directory: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Configuration values that output capture uses.
#[derive(Debug, Clone, Copy)]
pub struct OutputSettings {
    pub block_size: usize,
    /// Total bytes the kept files may hold; 0 means no limit.
    pub max_bytes: u64,
    pub retry_timeout: Duration,
    /// The backoff between retries of one call.
    pub backoff: Backoff,
}

/// Saves the files under `host_dir` as the collection `output for
/// <container_uuid>` and returns its portable data hash.
pub async fn save_output(
    client: &Client,
    log: &SupervisorLog,
    host_dir: &Path,
    globs: Globs,
    settings: OutputSettings,
    container_uuid: &str,
) -> Result<String, OutputError> {
    let name = format!("output for {container_uuid}");
    save_directory(client, log, host_dir, globs, settings, &name, "output").await
}

/// Saves the files under `dir` that `globs` keeps as a new collection
/// named `name`, and returns its portable data hash. `what` names the
/// files in log lines ("output", "log").
pub async fn save_directory(
    client: &Client,
    log: &SupervisorLog,
    dir: &Path,
    globs: Globs,
    settings: OutputSettings,
    name: &str,
    what: &str,
) -> Result<String, OutputError> {
    let root = dir.to_path_buf();
    let walked = tokio::task::spawn_blocking(move || walk_output(&root, &globs)).await??;
    for skipped in &walked.skipped {
        log.warn(format!("{what}: {skipped}"));
    }
    let size: u64 = walked.files.iter().map(|file| file.size).sum();
    if settings.max_bytes > 0 && size > settings.max_bytes {
        return Err(OutputError::TooLarge {
            size,
            limit: settings.max_bytes,
        });
    }
    log.info(format!(
        "saving the {what}: {} files, {size} bytes",
        walked.files.len()
    ));

    let mut packer = BlockPacker::new(
        client,
        settings.block_size,
        settings.retry_timeout,
        settings.backoff,
    );
    for file in &walked.files {
        packer.add_file(file).await?;
    }
    let files = packer.finish().await?;

    let mut builder = ManifestBuilder::new();
    for (path, segments) in files {
        builder.add_file(&path, segments)?;
    }
    for directory in &walked.empty_directories {
        builder.add_directory(directory)?;
    }
    let manifest = builder.finish()?;

    let attributes = json!({
        "name": name,
        "manifest_text": manifest.to_text(),
    });
    let collection = retry(
        &format!("creating the {what} collection"),
        settings.retry_timeout,
        settings.backoff,
        ClientError::is_transient,
        || client.create_collection(&attributes),
    )
    .await
    .map_err(OutputError::Create)?;
    log.info(format!(
        "saved the {what} as collection {} ({})",
        collection.uuid, collection.portable_data_hash
    ));
    Ok(collection.portable_data_hash)
}

/// Copies the files under `host_dir` that `globs` keeps into `dest`, with
/// the same relative paths, so they can be saved later from there.
/// Symbolic links are resolved as [`save_output`] resolves them, so the
/// copy contains what the collection would. Returns the number of files and
/// bytes copied. Blocking.
pub fn copy_output(
    host_dir: &Path,
    globs: &Globs,
    max_bytes: u64,
    dest: &Path,
    log: &SupervisorLog,
) -> Result<(usize, u64), OutputError> {
    let walked = walk_output(host_dir, globs)?;
    for skipped in &walked.skipped {
        log.warn(format!("output: {skipped}"));
    }
    let size: u64 = walked.files.iter().map(|file| file.size).sum();
    if max_bytes > 0 && size > max_bytes {
        return Err(OutputError::TooLarge {
            size,
            limit: max_bytes,
        });
    }

    let copy_error = |path: &str| {
        let path = path.to_string();
        move |source| OutputError::Read { path, source }
    };
    for file in &walked.files {
        let target = dest.join(&file.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(copy_error(&file.path))?;
        }
        std::fs::copy(&file.source, &target).map_err(copy_error(&file.path))?;
        std::fs::File::open(&target)
            .and_then(|copied| copied.sync_all())
            .map_err(copy_error(&file.path))?;
    }
    for directory in &walked.empty_directories {
        std::fs::create_dir_all(dest.join(directory)).map_err(copy_error(directory))?;
    }

    // The directories' entries are made durable too, because a journal
    // entry that names these files must not outlive them after a crash.
    let mut directories: std::collections::BTreeSet<PathBuf> = walked
        .files
        .iter()
        .filter_map(|file| dest.join(&file.path).parent().map(Path::to_path_buf))
        .chain(walked.empty_directories.iter().map(|dir| dest.join(dir)))
        .collect();
    directories.insert(dest.to_path_buf());
    for directory in directories {
        let shown = directory.display().to_string();
        std::fs::File::open(&directory)
            .and_then(|opened| opened.sync_all())
            .map_err(copy_error(&shown))?;
    }
    Ok((walked.files.len(), size))
}
