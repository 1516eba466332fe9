//! `berth put PATH...`: upload files and directories as a new collection
//! and print its UUID and portable data hash.
//!
//! Each PATH becomes an entry of the collection named after its last
//! component: a file at the root, or a directory with everything below
//! it. Files are read in blocks of `--block-size` bytes (64 MiB, the
//! block size of Arvados Keep, by default), and each block is written to
//! the controller, which returns its signed locator. The next block is
//! read while the previous one uploads, so at most two are in memory.
//! Empty directories are kept. Symbolic links below a named directory,
//! sockets, FIFOs and device files are rejected before anything is
//! uploaded, so a collection never silently misses a file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use berth_client::ClientError;
use berth_core::locator::Locator;
use berth_core::manifest::{ManifestBuilder, Segment};
use bytes::{Bytes, BytesMut};
use clap::Args;
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::api::Api;

/// Largest block: Arvados Keep's block size, which the controller accepts
/// by default.
pub const MAX_BLOCK_SIZE: usize = 64 << 20;

/// Attempts at one block write that fails with a transient error.
const BLOCK_ATTEMPTS: u32 = 3;

/// Delay before the second attempt at a block write; it doubles after.
const BLOCK_RETRY_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct PutArgs {
    /// Files and directories to upload.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Name of the new collection. Default: "Uploaded by berth put" and the
    /// time.
    #[arg(long)]
    name: Option<String>,
    /// Size, in bytes, of the blocks files are split into: 1 to 67108864
    /// (64 MiB, the default).
    #[arg(long, default_value_t = MAX_BLOCK_SIZE, value_parser = parse_block_size)]
    block_size: usize,
}

fn parse_block_size(text: &str) -> Result<usize, String> {
    let size: usize = text
        .parse()
        .map_err(|_| format!("invalid block size {text:?}: expected a number of bytes"))?;
    if size == 0 || size > MAX_BLOCK_SIZE {
        return Err(format!(
            "invalid block size {size}: it must be between 1 and {MAX_BLOCK_SIZE} bytes"
        ));
    }
    Ok(size)
}

/// One file or empty directory to upload, with its path in the
/// collection.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File { source: PathBuf, path: String },
    EmptyDirectory { path: String },
}

/// Returns a path component as UTF-8, which manifests require.
fn component_name(path: &Path) -> anyhow::Result<String> {
    let name = path.file_name().ok_or_else(|| {
        anyhow!(
            "{} has no file name to put in the collection",
            path.display()
        )
    })?;
    name.to_str().map(str::to_string).ok_or_else(|| {
        anyhow!(
            "the name of {} is not valid UTF-8, which collections need: rename it",
            path.display()
        )
    })
}

/// Lists the files and empty directories below `source`, which the
/// collection names `path`, in sorted order.
fn walk(source: &Path, path: &str, entries: &mut Vec<Entry>) -> anyhow::Result<()> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(source)
        .with_context(|| format!("failed to read the directory {}", source.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("failed to read the directory {}", source.display()))?;
    children.sort();
    if children.is_empty() {
        entries.push(Entry::EmptyDirectory {
            path: path.to_string(),
        });
    }
    for child in children {
        let name = component_name(&child)?;
        let child_path = format!("{path}/{name}");
        let kind = std::fs::symlink_metadata(&child)
            .with_context(|| format!("failed to read the metadata of {}", child.display()))?
            .file_type();
        if kind.is_dir() {
            walk(&child, &child_path, entries)?;
        } else if kind.is_file() {
            entries.push(Entry::File {
                source: child,
                path: child_path,
            });
        } else {
            bail!(
                "{} is a symbolic link or a special file, which berth put does not upload: remove it, or name its target instead",
                child.display()
            );
        }
    }
    Ok(())
}

/// Collects what the command line names, following a link only when the
/// command line names it.
fn collect(paths: &[PathBuf]) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for source in paths {
        let metadata = std::fs::metadata(source)
            .with_context(|| format!("failed to read {}", source.display()))?;
        // `.` and `..` have no name of their own: use the directory's.
        let named = match source.file_name() {
            Some(_) => source.clone(),
            None => std::fs::canonicalize(source)
                .with_context(|| format!("failed to resolve {}", source.display()))?,
        };
        let name = component_name(&named)?;
        if !names.insert(name.clone()) {
            bail!("two paths are named {name:?}: the collection would hold both at one name; rename one");
        }
        if metadata.is_dir() {
            walk(source, &name, &mut entries)?;
        } else if metadata.is_file() {
            entries.push(Entry::File {
                source: source.clone(),
                path: name,
            });
        } else {
            bail!("{} is not a regular file or directory", source.display());
        }
    }
    Ok(entries)
}

/// Writes a block, trying again after transient failures.
async fn put_block(api: &Api, data: Bytes) -> anyhow::Result<Locator> {
    let mut delay = BLOCK_RETRY_DELAY;
    let mut attempt = 1;
    loop {
        match api.client.put_block(data.clone()).await {
            Ok(text) => {
                return Locator::parse(&text).with_context(|| {
                    format!("the controller returned an invalid locator {text:?}")
                })
            }
            Err(err) if err.is_transient() && attempt < BLOCK_ATTEMPTS => {
                eprintln!("berth put: writing a block failed ({err}); trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(err) => return Err(explain(api, err)),
        }
    }
}

fn explain(api: &Api, err: ClientError) -> anyhow::Error {
    api.explain(err).context("failed to write a block")
}

/// Reads up to `block_size` bytes; fewer only at the end of the file.
async fn read_block(
    file: &mut tokio::fs::File,
    source: &Path,
    block_size: usize,
) -> anyhow::Result<Bytes> {
    let mut buffer = BytesMut::with_capacity(block_size);
    while buffer.len() < block_size {
        let read = (&mut *file)
            .take((block_size - buffer.len()) as u64)
            .read_buf(&mut buffer)
            .await
            .with_context(|| format!("failed to read {}", source.display()))?;
        if read == 0 {
            break;
        }
    }
    Ok(buffer.freeze())
}

/// A block upload in flight and the length of its block.
type Upload = (tokio::task::JoinHandle<anyhow::Result<Locator>>, u64);

/// Waits for an upload and returns its segment.
async fn finish_upload((handle, length): Upload) -> anyhow::Result<Segment> {
    let locator = handle
        .await
        .map_err(|err| anyhow!("a block upload task failed: {err}"))??;
    Ok(Segment {
        locator,
        offset: 0,
        length,
    })
}

/// Uploads one file block by block and returns its segments. The next
/// block is read, and its upload started, while the previous one is still
/// uploading, so at most two blocks are in memory.
async fn upload_file(api: &Api, source: &Path, block_size: usize) -> anyhow::Result<Vec<Segment>> {
    let mut file = tokio::fs::File::open(source)
        .await
        .with_context(|| format!("failed to open {}", source.display()))?;
    let mut segments = Vec::new();
    let mut previous: Option<Upload> = None;
    loop {
        let data = read_block(&mut file, source, block_size).await?;
        let length = data.len() as u64;
        let current = if data.is_empty() {
            None
        } else {
            let api = api.clone();
            Some((
                tokio::spawn(async move { put_block(&api, data).await }),
                length,
            ))
        };
        if let Some(upload) = previous.take() {
            segments.push(finish_upload(upload).await?);
        }
        match current {
            Some(upload) if length == block_size as u64 => previous = Some(upload),
            Some(upload) => {
                segments.push(finish_upload(upload).await?);
                return Ok(segments);
            }
            None => return Ok(segments),
        }
    }
}

pub async fn execute(args: PutArgs) -> anyhow::Result<ExitCode> {
    let entries = collect(&args.paths)?;
    let api = Api::from_env()?;
    let mut builder = ManifestBuilder::new();
    for entry in &entries {
        match entry {
            Entry::File { source, path } => {
                let segments = upload_file(&api, source, args.block_size).await?;
                builder
                    .add_file(path, segments)
                    .with_context(|| format!("failed to add {}", source.display()))?;
            }
            Entry::EmptyDirectory { path } => builder
                .add_directory(path)
                .with_context(|| format!("failed to add the directory {path}"))?,
        }
    }
    let manifest = builder.finish()?;
    let name = args.name.unwrap_or_else(|| {
        format!(
            "Uploaded by berth put at {}",
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        )
    });
    let collection = api
        .client
        .create_collection(&json!({"name": name, "manifest_text": manifest.to_text()}))
        .await
        .map_err(|err| api.explain(err).context("failed to create the collection"))?;
    println!("{} {}", collection.uuid, collection.portable_data_hash);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_lists_files_and_empty_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("sub/empty")).unwrap();
        std::fs::write(root.join("b.txt"), "b").unwrap();
        std::fs::write(root.join("sub/a.txt"), "a").unwrap();
        let entries = collect(std::slice::from_ref(&root)).unwrap();
        assert_eq!(
            entries,
            vec![
                Entry::File {
                    source: root.join("b.txt"),
                    path: "tree/b.txt".into()
                },
                Entry::File {
                    source: root.join("sub/a.txt"),
                    path: "tree/sub/a.txt".into()
                },
                Entry::EmptyDirectory {
                    path: "tree/sub/empty".into()
                },
            ]
        );
    }

    #[test]
    fn link_inside_a_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        let err = collect(&[root]).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/x")).unwrap();
        std::fs::create_dir_all(dir.path().join("b/x")).unwrap();
        let err = collect(&[dir.path().join("a/x"), dir.path().join("b/x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("two paths are named \"x\""), "{err}");
    }

    #[test]
    fn block_size_is_bounded() {
        assert_eq!(parse_block_size("1024"), Ok(1024));
        assert!(parse_block_size("0").is_err());
        assert!(parse_block_size("67108865").is_err());
        assert!(parse_block_size("lots").is_err());
    }
}
