//! `berth get UUID-or-PDH [PATH] DEST`: download a collection, or one file
//! or directory of it, into DEST.
//!
//! Without PATH the whole collection is written under the directory
//! DEST. A PATH naming a directory of the collection writes what is below
//! it under DEST. A PATH naming a file writes it to DEST, or into DEST
//! when DEST is an existing directory.
//!
//! Safety: the manifest parser rejects names with `.` or `..` components,
//! and every directory on the way to a file is created one component at a
//! time and must not be a symbolic link, so nothing is written outside
//! DEST. Each block's MD5 and size are checked against its locator. Each
//! file is written to a temporary name in its directory and renamed into
//! place when complete. Existing files are rejected, before anything is
//! downloaded, unless `--force` is given.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use berth_core::manifest::{hex_md5, File, Manifest};
use bytes::Bytes;
use clap::Args;

use super::api::Api;

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The collection: its UUID (…-4zz18-…) or portable data hash.
    #[arg(value_name = "UUID-or-PDH")]
    collection: String,
    /// `[PATH] DEST`: an optional file or directory of the collection,
    /// then the local destination.
    #[arg(value_name = "PATH", num_args = 1..=2, required = true)]
    targets: Vec<String>,
    /// Overwrite files that already exist at the destination.
    #[arg(long)]
    force: bool,
}

/// One file to write: the collection's file and its local destination.
#[derive(Debug)]
struct Download<'a> {
    file: &'a File,
    /// Components below the destination root, the last one the file name.
    components: Vec<&'a str>,
}

/// The output of a get: files and empty directories, each as components
/// below `root`.
#[derive(Debug)]
struct Plan<'a> {
    root: PathBuf,
    downloads: Vec<Download<'a>>,
    directories: Vec<Vec<&'a str>>,
}

/// Returns what to download and the directory all of it goes under.
fn plan<'a>(
    manifest: &'a Manifest,
    path: Option<&'a str>,
    dest: &'a Path,
) -> anyhow::Result<Plan<'a>> {
    let selected = path
        .map(|path| path.trim_start_matches("./").trim_matches('/'))
        .filter(|path| !path.is_empty() && *path != ".");
    let Some(selected) = selected else {
        let downloads = manifest
            .files()
            .iter()
            .map(|file| Download {
                file,
                components: file.path.split('/').collect(),
            })
            .collect();
        let directories = manifest
            .directories()
            .iter()
            .map(|directory| directory.split('/').collect())
            .collect();
        return Ok(Plan {
            root: dest.to_path_buf(),
            downloads,
            directories,
        });
    };

    if let Some(file) = manifest.file(selected) {
        let name = selected.rsplit('/').next().unwrap_or(selected);
        let (root, file_name) = if dest.is_dir() {
            (dest.to_path_buf(), name)
        } else {
            let parent = dest
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty());
            let file_name = dest
                .file_name()
                .and_then(|name| name.to_str())
                .ok_or_else(|| {
                    anyhow!(
                        "invalid destination {}: it has no UTF-8 file name",
                        dest.display()
                    )
                })?;
            (parent.unwrap_or(Path::new(".")).to_path_buf(), file_name)
        };
        return Ok(Plan {
            root,
            downloads: vec![Download {
                file,
                components: vec![file_name],
            }],
            directories: Vec::new(),
        });
    }

    let prefix = format!("{selected}/");
    let downloads: Vec<Download<'a>> = manifest
        .files()
        .iter()
        .filter_map(|file| {
            let below = file.path.strip_prefix(&prefix)?;
            Some(Download {
                file,
                components: below.split('/').collect(),
            })
        })
        .collect();
    let directories: Vec<Vec<&str>> = manifest
        .directories()
        .iter()
        .filter_map(|directory| directory.strip_prefix(&prefix))
        .map(|below| below.split('/').collect())
        .collect();
    let marked = manifest.directories().contains(selected);
    if downloads.is_empty() && directories.is_empty() && !marked {
        bail!("{selected:?} is neither a file nor a directory of the collection");
    }
    Ok(Plan {
        root: dest.to_path_buf(),
        downloads,
        directories,
    })
}

/// Creates `root/components...` one directory at a time, rejecting a
/// component that exists as a symbolic link or a non-directory.
fn create_directories(root: &Path, components: &[&str]) -> anyhow::Result<PathBuf> {
    let mut path = root.to_path_buf();
    std::fs::create_dir_all(&path)
        .with_context(|| format!("failed to create the directory {}", path.display()))?;
    for component in components {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.file_type().is_dir() => {}
            Ok(_) => bail!(
                "{} exists and is not a directory (or is a symbolic link): berth get does not write through it",
                path.display()
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&path)
                .with_context(|| format!("failed to create the directory {}", path.display()))?,
            Err(err) => {
                return Err(err).with_context(|| format!("failed to read the metadata of {}", path.display()))
            }
        }
    }
    Ok(path)
}

/// Reads a block and checks it against its locator. The last block read
/// is kept, because consecutive segments often share one.
async fn fetch_block(
    api: &Api,
    cache: &mut Option<(String, Bytes)>,
    locator: &berth_core::locator::Locator,
) -> anyhow::Result<Bytes> {
    if let Some((hash, data)) = cache {
        if hash == locator.hash() {
            return Ok(data.clone());
        }
    }
    let data = api
        .client
        .get_block(&locator.to_string())
        .await
        .map_err(|err| {
            api.explain(err)
                .context(format!("failed to read block {}", locator.bare()))
        })?;
    let actual = hex_md5(&data);
    if actual != locator.hash() || data.len() as u64 != locator.size() {
        bail!(
            "block {} arrived damaged: {} bytes with MD5 {actual}; try again",
            locator.bare(),
            data.len()
        );
    }
    *cache = Some((locator.hash().to_string(), data.clone()));
    Ok(data)
}

/// Writes one file to a temporary name beside `target` and renames it.
async fn download(
    api: &Api,
    cache: &mut Option<(String, Bytes)>,
    file: &File,
    target: &Path,
) -> anyhow::Result<()> {
    let directory = target.parent().unwrap_or(Path::new("."));
    let mut temporary = tempfile::Builder::new()
        .prefix(".berth-get-")
        .tempfile_in(directory)
        .with_context(|| {
            format!(
                "failed to create a temporary file in {}",
                directory.display()
            )
        })?;
    for segment in &file.segments {
        let block = fetch_block(api, cache, &segment.locator).await?;
        let start = usize::try_from(segment.offset).unwrap_or(usize::MAX);
        let end = usize::try_from(segment.offset + segment.length).unwrap_or(usize::MAX);
        let bytes = block.get(start..end).ok_or_else(|| {
            anyhow!(
                "the manifest reads bytes {start}..{end} of block {}, which has {} bytes",
                segment.locator.bare(),
                block.len()
            )
        })?;
        temporary
            .write_all(bytes)
            .with_context(|| format!("failed to write {}", temporary.path().display()))?;
    }
    temporary
        .as_file()
        .sync_all()
        .with_context(|| format!("failed to flush {}", temporary.path().display()))?;
    temporary
        .persist(target)
        .map_err(|err| err.error)
        .with_context(|| format!("failed to rename the download to {}", target.display()))?;
    Ok(())
}

pub async fn execute(args: GetArgs) -> anyhow::Result<ExitCode> {
    let (path, dest) = match args.targets.as_slice() {
        [dest] => (None, PathBuf::from(dest)),
        [path, dest] => (Some(path.as_str()), PathBuf::from(dest)),
        _ => bail!("invalid arguments: give [PATH] DEST after the collection"),
    };
    let api = Api::from_env()?;
    let collection = api
        .client
        .get_collection(&args.collection)
        .await
        .map_err(|err| {
            api.explain(err)
                .context(format!("failed to read collection {}", args.collection))
        })?;
    let manifest = Manifest::parse(&collection.manifest_text)
        .with_context(|| format!("collection {} has an invalid manifest", args.collection))?;
    let Plan {
        root,
        downloads,
        directories,
    } = plan(&manifest, path, &dest)?;

    let targets: Vec<PathBuf> = downloads
        .iter()
        .map(|download| {
            download
                .components
                .iter()
                .fold(root.clone(), |path, part| path.join(part))
        })
        .collect();
    if !args.force {
        if let Some(existing) = targets
            .iter()
            .find(|target| target.symlink_metadata().is_ok())
        {
            bail!(
                "{} already exists: remove it, choose another destination, or pass --force to overwrite",
                existing.display()
            );
        }
    }

    for components in &directories {
        create_directories(&root, components)?;
    }
    let mut cache = None;
    for (item, target) in downloads.iter().zip(&targets) {
        let parents = &item.components[..item.components.len() - 1];
        create_directories(&root, parents)?;
        if target
            .symlink_metadata()
            .is_ok_and(|metadata| metadata.file_type().is_symlink())
        {
            bail!(
                "{} is a symbolic link: berth get does not write through it",
                target.display()
            );
        }
        download(&api, &mut cache, item.file, target).await?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = ". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:foo\n\
        ./dir 37b51d194a7513e45b56f6524f2d51f2+3 0:3:bar 0:3:sub/baz\n\
        ./empty d41d8cd98f00b204e9800998ecf8427e+0 0:0:\\056\n";

    fn paths(downloads: &[Download<'_>]) -> Vec<String> {
        downloads.iter().map(|d| d.components.join("/")).collect()
    }

    #[test]
    fn whole_collection_goes_under_dest() {
        let manifest = Manifest::parse(MANIFEST).unwrap();
        let plan = plan(&manifest, None, Path::new("out")).unwrap();
        assert_eq!(plan.root, Path::new("out"));
        assert_eq!(paths(&plan.downloads), ["foo", "dir/bar", "dir/sub/baz"]);
        assert_eq!(plan.directories, vec![vec!["empty"]]);
    }

    #[test]
    fn directory_path_strips_its_prefix() {
        let manifest = Manifest::parse(MANIFEST).unwrap();
        let plan = plan(&manifest, Some("./dir/"), Path::new("out")).unwrap();
        assert_eq!(paths(&plan.downloads), ["bar", "sub/baz"]);
    }

    #[test]
    fn file_path_writes_to_dest() {
        let manifest = Manifest::parse(MANIFEST).unwrap();
        let plan = plan(&manifest, Some("dir/sub/baz"), Path::new("x/copy")).unwrap();
        assert_eq!(plan.root, Path::new("x"));
        assert_eq!(paths(&plan.downloads), ["copy"]);
    }

    #[test]
    fn unknown_path_is_an_error() {
        let manifest = Manifest::parse(MANIFEST).unwrap();
        let err = plan(&manifest, Some("nope"), Path::new("out")).unwrap_err();
        assert!(
            err.to_string().contains("neither a file nor a directory"),
            "{err}"
        );
    }

    #[test]
    fn link_on_the_way_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("dir")).unwrap();
        let err = create_directories(dir.path(), &["dir", "sub"]).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
