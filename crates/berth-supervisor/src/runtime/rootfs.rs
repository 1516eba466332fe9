//! Unpacking the image of a `docker save` archive into a root filesystem.
//!
//! The archive's `manifest.json` names the image config file and the
//! layers, bottom layer first. Each layer is a tar file, plain or
//! gzip-compressed, applied on top of the layers before it as Docker
//! applies them:
//! - a file `.wh.NAME` (a whiteout) removes `NAME` of the lower layers;
//! - a file `.wh..wh..opq` (an opaque whiteout) empties its directory of
//!   everything the lower layers put there;
//! - any other entry replaces what the lower layers have at its path,
//!   except that a directory is merged with a directory.
//!
//! The archive comes from the container's owner while the supervisor often
//! runs as root, so nothing in a layer may reach outside the root
//! filesystem. A path with a `..` component is rejected. A symlink is
//! created as it is, pointing anywhere, but it is never followed while
//! unpacking: when a later entry's parent directory is a symlink (or a
//! file), the symlink is replaced by a real directory, and a hard link
//! whose target path passes through a symlink is rejected. Device files
//! are skipped, because the OCI runtime creates the container's devices.
//! Owners are set only when running as root.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::runtime::cache::remove_any;

/// The name, inside an unpacked image's cache entry, of the root
/// filesystem directory.
pub const ROOTFS_DIR: &str = "rootfs";

/// The name, inside an unpacked image's cache entry, of the copy of the
/// image config file.
pub const IMAGE_CONFIG_FILE: &str = "image-config.json";

/// The largest `manifest.json` or image config file read.
const MAX_JSON_BYTES: u64 = 16 << 20;

/// Maximum symlinks followed between entries of the outer archive.
const MAX_ARCHIVE_LINKS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("failed to read the image archive: {0}")]
    Read(#[source] io::Error),
    #[error("the image archive has no {0}")]
    MissingEntry(String),
    #[error("the image archive's {name} is not valid JSON of the expected shape: {source}")]
    Json {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the image archive holds {0} images; expected exactly one")]
    ImageCount(usize),
    #[error("layer {layer} is compressed in a format other than gzip; only plain and gzip-compressed tar layers are supported")]
    UnsupportedCompression { layer: String },
    #[error("failed to read layer {layer}: {source}")]
    Layer {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer} has the entry {entry:?}, whose path leaves the root filesystem")]
    PathEscape { layer: String, entry: String },
    #[error("layer {layer} has a hard link {entry:?} whose target {target:?} is missing or passes through a symlink")]
    BadHardLink {
        layer: String,
        entry: String,
        target: String,
    },
    #[error("failed to write {path} while unpacking layer {layer}: {source}")]
    Write {
        layer: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The parts of an image config that decide how a container runs, with
/// Docker's names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    #[serde(rename = "Env", deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
    #[serde(rename = "WorkingDir", deserialize_with = "null_as_default")]
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty for root.
    #[serde(rename = "User", deserialize_with = "null_as_default")]
    pub user: String,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// The image config file, of which only `config` matters here.
#[derive(Debug, Default, Deserialize)]
struct ImageConfigFile {
    #[serde(default, deserialize_with = "null_as_default")]
    config: ImageConfig,
}

impl ImageConfig {
    /// Parses an image config file, as `docker save` stores it.
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig, serde_json::Error> {
        serde_json::from_slice::<ImageConfigFile>(bytes).map(|file| file.config)
    }

    /// Reads the copy of the image config in an unpacked image's cache
    /// entry.
    pub fn read_cached(entry: &Path) -> Result<ImageConfig, UnpackError> {
        let bytes = std::fs::read(entry.join(IMAGE_CONFIG_FILE)).map_err(UnpackError::Read)?;
        ImageConfig::parse(&bytes).map_err(|source| UnpackError::Json {
            name: IMAGE_CONFIG_FILE.to_string(),
            source,
        })
    }
}

#[derive(Debug, Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// The location of an entry of the outer archive.
#[derive(Debug, Clone)]
enum ArchiveEntry {
    File { offset: u64, size: u64 },
    Symlink(String),
}

/// Counts of what unpacking skipped, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackSummary {
    pub layers: usize,
    pub skipped_devices: usize,
}

/// Unpacks the image of the `docker save` archive `archive` into the new
/// directory `dest`: the root filesystem in `dest/rootfs` and the image
/// config in `dest/image-config.json`. Blocking: call it from a blocking
/// task.
pub fn unpack_image(archive: &mut File, dest: &Path) -> Result<UnpackSummary, UnpackError> {
    let index = index_archive(archive)?;
    let manifest_bytes = read_archive_entry(archive, &index, "manifest.json", MAX_JSON_BYTES)?;
    let entries: Vec<ManifestEntry> =
        serde_json::from_slice(&manifest_bytes).map_err(|source| UnpackError::Json {
            name: "manifest.json".to_string(),
            source,
        })?;
    let manifest = match <[ManifestEntry; 1]>::try_from(entries) {
        Ok([entry]) => entry,
        Err(entries) => return Err(UnpackError::ImageCount(entries.len())),
    };
    let config_bytes = read_archive_entry(archive, &index, &manifest.config, MAX_JSON_BYTES)?;
    ImageConfig::parse(&config_bytes).map_err(|source| UnpackError::Json {
        name: manifest.config.clone(),
        source,
    })?;

    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnpackError::Write {
            layer: "(none: writing the image config)".to_string(),
            path,
            source,
        }
    };
    std::fs::create_dir(dest).map_err(write_error(dest))?;
    let config_path = dest.join(IMAGE_CONFIG_FILE);
    std::fs::write(&config_path, &config_bytes).map_err(write_error(&config_path))?;
    let root = dest.join(ROOTFS_DIR);
    std::fs::create_dir(&root).map_err(write_error(&root))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
        .map_err(write_error(&root))?;

    let mut summary = UnpackSummary::default();
    for layer in &manifest.layers {
        let (offset, size) = locate(&index, layer)?;
        archive
            .seek(SeekFrom::Start(offset))
            .map_err(UnpackError::Read)?;
        let reader = BufReader::new(Read::by_ref(archive).take(size));
        summary.skipped_devices += apply_layer(&root, layer, reader)?;
        summary.layers += 1;
    }
    Ok(summary)
}

/// Lists the outer archive's entries by normalized name.
fn index_archive(archive: &mut File) -> Result<HashMap<String, ArchiveEntry>, UnpackError> {
    archive.rewind().map_err(UnpackError::Read)?;
    let mut index = HashMap::new();
    let mut tar = tar::Archive::new(BufReader::new(Read::by_ref(archive)));
    for entry in tar.entries().map_err(UnpackError::Read)? {
        let entry = entry.map_err(UnpackError::Read)?;
        let name = normalize_name(&entry.path().map_err(UnpackError::Read)?.to_string_lossy());
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            if let Some(target) = entry.link_name().map_err(UnpackError::Read)? {
                let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                let joined = base.join(target);
                index.insert(
                    name,
                    ArchiveEntry::Symlink(normalize_name(&joined.to_string_lossy())),
                );
            }
        } else if kind.is_file() {
            index.insert(
                name,
                ArchiveEntry::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
            );
        }
    }
    Ok(index)
}

/// Returns the offset and size of the file `name` in the outer archive,
/// following symlinks between its entries.
fn locate(index: &HashMap<String, ArchiveEntry>, name: &str) -> Result<(u64, u64), UnpackError> {
    let mut current = normalize_name(name);
    for _ in 0..=MAX_ARCHIVE_LINKS {
        match index.get(&current) {
            Some(ArchiveEntry::File { offset, size }) => return Ok((*offset, *size)),
            Some(ArchiveEntry::Symlink(target)) => current = target.clone(),
            None => break,
        }
    }
    Err(UnpackError::MissingEntry(name.to_string()))
}

fn read_archive_entry(
    archive: &mut File,
    index: &HashMap<String, ArchiveEntry>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, UnpackError> {
    let (offset, size) = locate(index, name)?;
    archive
        .seek(SeekFrom::Start(offset))
        .map_err(UnpackError::Read)?;
    let mut bytes = Vec::new();
    Read::by_ref(archive)
        .take(size.min(limit))
        .read_to_end(&mut bytes)
        .map_err(UnpackError::Read)?;
    Ok(bytes)
}

/// Normalizes a path inside an archive: no leading `/` or `./`, and `..`
/// components resolved lexically.
fn normalize_name(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

/// Returns the relative path of a layer entry, or `None` for the root
/// itself. Rejects a `..` component.
fn entry_path(raw: &Path, layer: &str) -> Result<Option<PathBuf>, UnpackError> {
    let mut relative = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::PathEscape {
                    layer: layer.to_string(),
                    entry: raw.display().to_string(),
                })
            }
        }
    }
    Ok((!relative.as_os_str().is_empty()).then_some(relative))
}

/// Applies one layer to `root`. Returns the number of device files
/// skipped.
fn apply_layer(root: &Path, layer: &str, mut reader: impl BufRead) -> Result<usize, UnpackError> {
    let layer_error = |source| UnpackError::Layer {
        layer: layer.to_string(),
        source,
    };
    let magic = reader.fill_buf().map_err(layer_error)?;
    let compressed = magic.starts_with(&[0x1f, 0x8b]);
    let unsupported = magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) // zstd
        || magic.starts_with(b"BZh")
        || magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']);
    if unsupported {
        return Err(UnpackError::UnsupportedCompression {
            layer: layer.to_string(),
        });
    }
    if compressed {
        apply_tar(root, layer, flate2::bufread::MultiGzDecoder::new(reader))
    } else {
        apply_tar(root, layer, reader)
    }
}

fn apply_tar(root: &Path, layer: &str, reader: impl Read) -> Result<usize, UnpackError> {
    let layer_error = |source| UnpackError::Layer {
        layer: layer.to_string(),
        source,
    };
    let as_root = nix::unistd::geteuid().is_root();
    let mut unpacked: HashSet<PathBuf> = HashSet::new();
    let mut skipped_devices = 0;
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().map_err(layer_error)? {
        let mut entry = entry.map_err(layer_error)?;
        let raw = entry.path().map_err(layer_error)?.into_owned();
        let Some(relative) = entry_path(&raw, layer)? else {
            continue;
        };
        let write_error = |path: &Path| {
            let path = path.to_path_buf();
            let layer = layer.to_string();
            move |source| UnpackError::Write {
                layer,
                path,
                source,
            }
        };
        let name = relative
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = relative.parent().unwrap_or(Path::new("")).to_path_buf();

        if name == ".wh..wh..opq" {
            let dir = make_parents(root, &relative).map_err(write_error(&relative))?;
            let dir = dir.parent().unwrap_or(root).to_path_buf();
            clear_dir(&dir, &parent, &unpacked).map_err(write_error(&dir))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let target = make_parents(root, &relative)
                .map_err(write_error(&relative))?
                .with_file_name(hidden);
            remove_any(&target).map_err(write_error(&target))?;
            continue;
        }

        let target = make_parents(root, &relative).map_err(write_error(&relative))?;
        let header = entry.header();
        let mode = header.mode().map_err(layer_error)? & 0o7777;
        let owner = (
            header.uid().map_err(layer_error)?,
            header.gid().map_err(layer_error)?,
        );
        let kind = header.entry_type();
        let written = if kind.is_dir() {
            match std::fs::symlink_metadata(&target) {
                Ok(metadata) if metadata.is_dir() => Ok(()),
                Ok(_) => remove_any(&target).and_then(|()| std::fs::create_dir(&target)),
                Err(_) => std::fs::create_dir(&target),
            }
            .and_then(|()| set_owner_and_mode(&target, owner, mode, as_root))
        } else if kind.is_file()
            || kind == tar::EntryType::Continuous
            || kind == tar::EntryType::GNUSparse
        {
            remove_any(&target)
                .and_then(|()| {
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&target)?;
                    io::copy(&mut entry, &mut file)?;
                    Ok(())
                })
                .and_then(|()| set_owner_and_mode(&target, owner, mode, as_root))
        } else if kind.is_symlink() {
            let link = entry.link_name().map_err(layer_error)?.unwrap_or_default();
            remove_any(&target)
                .and_then(|()| std::os::unix::fs::symlink(&link, &target))
                .and_then(|()| {
                    if as_root {
                        std::os::unix::fs::lchown(
                            &target,
                            Some(owner.0 as u32),
                            Some(owner.1 as u32),
                        )
                    } else {
                        Ok(())
                    }
                })
        } else if kind.is_hard_link() {
            let link = entry.link_name().map_err(layer_error)?.unwrap_or_default();
            let bad_link = || UnpackError::BadHardLink {
                layer: layer.to_string(),
                entry: raw.display().to_string(),
                target: link.display().to_string(),
            };
            let source = entry_path(&link, layer)?.ok_or_else(bad_link)?;
            if !is_plain_path(root, &source) {
                return Err(bad_link());
            }
            let source = root.join(source);
            if source == target {
                Ok(())
            } else {
                remove_any(&target).and_then(|()| std::fs::hard_link(&source, &target))
            }
        } else if kind.is_fifo() {
            remove_any(&target).and_then(|()| {
                nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(io::Error::from)
            })
        } else if kind.is_character_special() || kind.is_block_special() {
            skipped_devices += 1;
            Ok(())
        } else {
            // PAX and GNU metadata entries are consumed by the tar reader;
            // anything else carries no file.
            Ok(())
        };
        written.map_err(write_error(&target))?;
        unpacked.insert(relative);
    }
    Ok(skipped_devices)
}

/// Creates the parent directories of `relative` under `root` as real
/// directories, replacing a symlink or file in the way, and returns the
/// full path of `relative`.
fn make_parents(root: &Path, relative: &Path) -> io::Result<PathBuf> {
    let mut current = root.to_path_buf();
    if let Some(parent) = relative.parent() {
        for component in parent.components() {
            current.push(component);
            match std::fs::symlink_metadata(&current) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => {
                    std::fs::remove_file(&current)?;
                    std::fs::create_dir(&current)?;
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&current)?;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(root.join(relative))
}

/// Returns whether `relative` exists under `root` with no symlink among
/// its parents, and is not itself a directory.
fn is_plain_path(root: &Path, relative: &Path) -> bool {
    let mut current = root.to_path_buf();
    let mut components = relative.components().peekable();
    while let Some(component) = components.next() {
        current.push(component);
        let Ok(metadata) = std::fs::symlink_metadata(&current) else {
            return false;
        };
        let last = components.peek().is_none();
        if last {
            return !metadata.is_dir();
        }
        if !metadata.is_dir() {
            return false;
        }
    }
    false
}

/// Empties `dir` of what the lower layers put there, keeping the entries
/// this layer has already unpacked.
fn clear_dir(dir: &Path, relative: &Path, unpacked: &HashSet<PathBuf>) -> io::Result<()> {
    for child in std::fs::read_dir(dir)? {
        let child = child?;
        if !unpacked.contains(&relative.join(child.file_name())) {
            remove_any(&child.path())?;
        }
    }
    Ok(())
}

fn set_owner_and_mode(path: &Path, owner: (u64, u64), mode: u32, as_root: bool) -> io::Result<()> {
    // The owner comes first: changing it clears the set-user-ID and
    // set-group-ID bits.
    if as_root {
        let uid = u32::try_from(owner.0).map_err(|_| io::Error::other("uid out of range"))?;
        let gid = u32::try_from(owner.1).map_err(|_| io::Error::other("gid out of range"))?;
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    enum Item<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
    }

    fn layer(items: &[Item]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for item in items {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match item {
                Item::File(path, data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    set_raw_path(&mut header, path);
                    header.set_cksum();
                    builder.append(&header, *data).unwrap();
                }
                Item::Dir(path) => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    set_raw_path(&mut header, path);
                    header.set_cksum();
                    builder.append(&header, io::empty()).unwrap();
                }
                Item::Symlink(path, target) | Item::HardLink(path, target) => {
                    let kind = if matches!(item, Item::Symlink(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    };
                    header.set_entry_type(kind);
                    header.set_size(0);
                    header.set_mode(0o777);
                    set_raw_path(&mut header, path);
                    header.set_link_name(target).unwrap();
                    header.set_cksum();
                    builder.append(&header, io::empty()).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    /// Writes the name bytes unchecked, as a hostile archive would, since
    /// the tar crate's setters reject `..`.
    fn set_raw_path(header: &mut tar::Header, path: &str) {
        let name = &mut header.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Builds a `docker save` archive of the layers and unpacks it.
    fn unpack(layers: &[Vec<u8>]) -> (tempfile::TempDir, Result<UnpackSummary, UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut names = Vec::new();
        let append = |builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        };
        let config = br#"{"config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000:1000"}}"#;
        append(&mut builder, "cfg.json", config);
        for (i, data) in layers.iter().enumerate() {
            let name = format!("l{i}/layer.tar");
            append(&mut builder, &name, data);
            names.push(name);
        }
        let manifest =
            serde_json::json!([{"Config": "cfg.json", "RepoTags": null, "Layers": names}]);
        append(
            &mut builder,
            "manifest.json",
            manifest.to_string().as_bytes(),
        );
        let archive_path = dir.path().join("image.tar");
        std::fs::write(&archive_path, builder.into_inner().unwrap()).unwrap();
        let mut file = File::open(&archive_path).unwrap();
        let result = unpack_image(&mut file, &dir.path().join("out"));
        (dir, result)
    }

    fn rootfs(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("out").join(ROOTFS_DIR)
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let lower = layer(&[
            Item::Dir("etc"),
            Item::File("etc/a", b"lower a"),
            Item::File("etc/b", b"lower b"),
            Item::Dir("data"),
            Item::File("data/old", b"old"),
        ]);
        let upper = gzip(&layer(&[
            Item::File("etc/a", b"upper a"),
            Item::File("etc/.wh.b", b""),
            Item::Dir("data"),
            Item::File("data/new", b"new"),
            Item::File("data/.wh..wh..opq", b""),
        ]));
        let (dir, result) = unpack(&[lower, upper]);
        let summary = result.unwrap();
        assert_eq!(summary.layers, 2);
        let root = rootfs(&dir);
        assert_eq!(std::fs::read(root.join("etc/a")).unwrap(), b"upper a");
        assert!(!root.join("etc/b").exists());
        assert!(!root.join("etc/.wh.b").exists());
        assert_eq!(std::fs::read(root.join("data/new")).unwrap(), b"new");
        assert!(!root.join("data/old").exists());
        assert!(!root.join("data/.wh..wh..opq").exists());
        let config = ImageConfig::read_cached(&dir.path().join("out")).unwrap();
        assert_eq!(config.cmd, vec!["sh".to_string()]);
        assert_eq!(config.working_dir, "/w");
        assert_eq!(config.user, "1000:1000");
    }

    #[test]
    fn dot_dot_entry_is_rejected() {
        let (_dir, result) = unpack(&[layer(&[Item::File("../escaped", b"x")])]);
        assert!(
            matches!(result, Err(UnpackError::PathEscape { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn symlinked_parent_is_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().display().to_string();
        let (dir, result) = unpack(&[
            layer(&[Item::Symlink("escape", &target)]),
            layer(&[Item::File("escape/planted", b"x")]),
        ]);
        result.unwrap();
        assert!(!outside.path().join("planted").exists());
        let root = rootfs(&dir);
        assert!(std::fs::symlink_metadata(root.join("escape"))
            .unwrap()
            .is_dir());
        assert_eq!(std::fs::read(root.join("escape/planted")).unwrap(), b"x");
    }

    #[test]
    fn file_over_a_symlink_replaces_the_link() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let (dir, result) = unpack(&[
            layer(&[Item::Symlink("link", &victim.display().to_string())]),
            layer(&[Item::File("link", b"overwritten")]),
        ]);
        result.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(
            std::fs::read(rootfs(&dir).join("link")).unwrap(),
            b"overwritten"
        );
    }

    #[test]
    fn hard_link_through_a_symlink_is_rejected() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let (_dir, result) = unpack(&[layer(&[
            Item::Symlink("out", &outside.path().display().to_string()),
            Item::HardLink("copy", "out/secret"),
        ])]);
        assert!(
            matches!(result, Err(UnpackError::BadHardLink { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn hard_link_inside_the_layer_works() {
        let (dir, result) = unpack(&[layer(&[Item::File("a", b"same"), Item::HardLink("b", "a")])]);
        result.unwrap();
        assert_eq!(std::fs::read(rootfs(&dir).join("b")).unwrap(), b"same");
    }

    #[test]
    fn zstd_layer_is_rejected_by_name() {
        let (_dir, result) = unpack(&[vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]]);
        let error = result.unwrap_err();
        assert!(error.to_string().contains("l0/layer.tar"), "{error}");
        assert!(error.to_string().contains("gzip"), "{error}");
    }

    #[test]
    fn missing_layer_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let manifest = br#"[{"Config":"c.json","Layers":["nope/layer.tar"]}]"#;
        for (name, data) in [("c.json", &b"{}"[..]), ("manifest.json", &manifest[..])] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        }
        let path = dir.path().join("a.tar");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        let error =
            unpack_image(&mut File::open(&path).unwrap(), &dir.path().join("out")).unwrap_err();
        assert!(error.to_string().contains("nope/layer.tar"), "{error}");
    }
}
