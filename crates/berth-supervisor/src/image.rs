//! Reading the image ID and tags of a `docker save` archive without
//! loading it.
//!
//! A `docker save` archive is a tar file with a `manifest.json` at its
//! root: a JSON list with one entry per image, each naming the image's
//! config file (`Config`), its tags (`RepoTags`, possibly null) and its
//! layers. The image ID is `sha256:` followed by the SHA-256 of the config
//! file. Docker and Podman name that file after the digest: `<hex>.json`,
//! or `blobs/sha256/<hex>` in the OCI layout of newer Docker releases. A
//! config file with any other name is hashed.
//!
//! Knowing the ID and tags lets the supervisor skip loading an archive
//! whose image the runtime already holds.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The largest `manifest.json` read; real ones are a few hundred bytes
/// per image.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("failed to read image archive {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image archive {path} is not a `docker save` archive: it has no manifest.json")]
    NoManifest { path: PathBuf },
    #[error("image archive {path} has an invalid manifest.json: {source}")]
    InvalidManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image archive {path} holds {count} images; expected exactly one")]
    ImageCount { path: PathBuf, count: usize },
    #[error("image archive {path} lacks the image config {config} that its manifest.json names")]
    MissingConfig { path: PathBuf, config: String },
}

/// The image a `docker save` archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveImage {
    /// The image ID, `sha256:<64 hex digits>`.
    pub id: String,
    /// The tags the archive gives the image, such as
    /// `localhost/busybox:latest`; possibly none.
    pub repo_tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
}

/// Reads the image ID and tags of the one image in a `docker save`
/// archive. Blocking: call it from a blocking task.
pub fn read_archive_image(path: &Path) -> Result<ArchiveImage, ArchiveError> {
    let manifest = read_entry(path, "manifest.json", |reader| {
        let mut text = Vec::new();
        reader.take(MAX_MANIFEST_BYTES).read_to_end(&mut text)?;
        Ok(text)
    })?
    .ok_or_else(|| ArchiveError::NoManifest {
        path: path.to_path_buf(),
    })?;
    let entries: Vec<ManifestEntry> =
        serde_json::from_slice(&manifest).map_err(|source| ArchiveError::InvalidManifest {
            path: path.to_path_buf(),
            source,
        })?;
    let entry = match <[ManifestEntry; 1]>::try_from(entries) {
        Ok([entry]) => entry,
        Err(entries) => {
            return Err(ArchiveError::ImageCount {
                path: path.to_path_buf(),
                count: entries.len(),
            })
        }
    };
    let digest = match digest_from_config_name(&entry.config) {
        Some(digest) => digest,
        None => read_entry(path, &entry.config, |reader| {
            let mut hasher = Sha256::new();
            io::copy(reader, &mut hasher)?;
            Ok(hex::encode(hasher.finalize()))
        })?
        .ok_or_else(|| ArchiveError::MissingConfig {
            path: path.to_path_buf(),
            config: entry.config.clone(),
        })?,
    };
    Ok(ArchiveImage {
        id: format!("sha256:{digest}"),
        repo_tags: entry.repo_tags.unwrap_or_default(),
    })
}

/// Finds the entry `name` in the tar file at `path` and passes its
/// contents to `consume`. Returns `None` when there is no such entry.
fn read_entry<T>(
    path: &Path,
    name: &str,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> Result<Option<T>, ArchiveError> {
    let read_error = |source| ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    };
    let expected_name = normalize_entry_name(name);
    let file = File::open(path).map_err(read_error)?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        let entry_path = entry.path().map_err(read_error)?;
        if normalize_entry_name(&entry_path.to_string_lossy()) == expected_name {
            return consume(&mut entry).map(Some).map_err(read_error);
        }
    }
    Ok(None)
}

fn normalize_entry_name(name: &str) -> &str {
    let mut name = name;
    while let Some(rest) = name.strip_prefix("./") {
        name = rest;
    }
    name.trim_start_matches('/')
}

/// Returns the digest a config file's name carries: `<hex>.json` (the
/// classic layout) or `blobs/sha256/<hex>` (the OCI layout).
fn digest_from_config_name(name: &str) -> Option<String> {
    let name = normalize_entry_name(name);
    let hex = name
        .strip_suffix(".json")
        .or_else(|| name.strip_prefix("blobs/sha256/"))?;
    let is_digest = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    is_digest.then(|| hex.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    }

    /// Writes an archive with a config, one layer and a manifest, in the
    /// order `docker save` writes them, and returns the config's digest.
    fn write_archive(
        dir: &Path,
        config_name: impl Fn(&str) -> String,
        manifest_extra: &str,
    ) -> (PathBuf, String) {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let digest = hex::encode(Sha256::digest(config));
        let config_name = config_name(&digest);
        let mut builder = tar::Builder::new(Vec::new());
        append(&mut builder, &config_name, config);
        append(&mut builder, "layer/layer.tar", b"not a real layer");
        let manifest = format!(
            r#"[{{"Config":"{config_name}","RepoTags":["localhost/test:latest"],"Layers":["layer/layer.tar"]}}{manifest_extra}]"#
        );
        append(&mut builder, "manifest.json", manifest.as_bytes());
        let path = dir.join("image.tar");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        (path, digest)
    }

    #[test]
    fn classic_archive_gives_id_and_tags() {
        let dir = tempfile::tempdir().unwrap();
        let (path, digest) = write_archive(dir.path(), |d| format!("{d}.json"), "");
        let image = read_archive_image(&path).unwrap();
        assert_eq!(image.id, format!("sha256:{digest}"));
        assert_eq!(image.repo_tags, vec!["localhost/test:latest".to_string()]);
    }

    #[test]
    fn oci_layout_config_name_gives_id() {
        let dir = tempfile::tempdir().unwrap();
        let (path, digest) = write_archive(dir.path(), |d| format!("blobs/sha256/{d}"), "");
        assert_eq!(
            read_archive_image(&path).unwrap().id,
            format!("sha256:{digest}")
        );
    }

    #[test]
    fn config_with_other_name_is_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, digest) = write_archive(dir.path(), |_| "./config.json".to_string(), "");
        assert_eq!(
            read_archive_image(&path).unwrap().id,
            format!("sha256:{digest}")
        );
    }

    #[test]
    fn missing_repo_tags_means_no_tags() {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let digest = "a".repeat(64);
        let manifest = format!(r#"[{{"Config":"{digest}.json","RepoTags":null,"Layers":[]}}]"#);
        append(&mut builder, "./manifest.json", manifest.as_bytes());
        let path = dir.path().join("untagged.tar");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        let image = read_archive_image(&path).unwrap();
        assert_eq!(image.id, format!("sha256:{digest}"));
        assert!(image.repo_tags.is_empty());
    }

    #[test]
    fn archive_without_manifest_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        append(&mut builder, "hello.txt", b"hello");
        let path = dir.path().join("plain.tar");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        let err = read_archive_image(&path).unwrap_err();
        assert!(matches!(err, ArchiveError::NoManifest { .. }), "{err}");
        assert!(err.to_string().contains("plain.tar"), "{err}");
    }

    #[test]
    fn archive_with_two_images_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let other = format!(
            r#",{{"Config":"{}.json","RepoTags":[],"Layers":[]}}"#,
            "b".repeat(64)
        );
        let (path, _) = write_archive(dir.path(), |d| format!("{d}.json"), &other);
        let err = read_archive_image(&path).unwrap_err();
        assert!(
            matches!(err, ArchiveError::ImageCount { count: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_config_entry_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        append(
            &mut builder,
            "manifest.json",
            br#"[{"Config":"config.json","RepoTags":[],"Layers":[]}]"#,
        );
        let path = dir.path().join("broken.tar");
        std::fs::write(&path, builder.into_inner().unwrap()).unwrap();
        let err = read_archive_image(&path).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = read_archive_image(Path::new("/nonexistent/image.tar")).unwrap_err();
        assert!(matches!(err, ArchiveError::Read { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/image.tar"), "{err}");
    }
}
