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
//!
//! An [`ArchiveProblem`] describes why a file is not such an archive by
//! its kind only. It never carries the tar or JSON parser's own text,
//! because that text quotes the file's bytes, and the file may be one the
//! container's owner must not read.

use std::io::{self, Read, Seek};

use serde::Deserialize;
use serde_json::error::Category;
use sha2::{Digest, Sha256};

/// The largest `manifest.json` read; real ones are a few hundred bytes
/// per image.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// The reason a file is not a usable `docker save` archive. The messages
/// name the kind of problem and never quote the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveProblem {
    #[error("reading it as a tar file failed ({0})")]
    Tar(io::ErrorKind),
    #[error("it has no manifest.json")]
    NoManifest,
    #[error("its manifest.json is {0}")]
    InvalidManifest(ManifestFault),
    #[error("it holds {0} images; expected exactly one")]
    ImageCount(usize),
    #[error("it lacks the image config file that its manifest.json names")]
    MissingConfig,
}

/// The fault in a `manifest.json`, by the JSON parser's error category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFault {
    /// Not JSON, or cut short.
    Syntax,
    /// JSON, but not the list of entries that `docker save` writes.
    Layout,
    /// Reading it failed.
    Read(io::ErrorKind),
}

impl std::fmt::Display for ManifestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestFault::Syntax => f.write_str("not valid JSON"),
            ManifestFault::Layout => {
                f.write_str("valid JSON but not the list of images that `docker save` writes")
            }
            ManifestFault::Read(kind) => write!(f, "unreadable ({kind})"),
        }
    }
}

impl From<&serde_json::Error> for ManifestFault {
    fn from(error: &serde_json::Error) -> ManifestFault {
        match error.classify() {
            Category::Io => {
                ManifestFault::Read(error.io_error_kind().unwrap_or(io::ErrorKind::Other))
            }
            Category::Syntax | Category::Eof => ManifestFault::Syntax,
            Category::Data => ManifestFault::Layout,
        }
    }
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
/// archive. Reads `archive` from its start, once or twice. Blocking: call
/// it from a blocking task.
pub fn read_archive_image<R: Read + Seek>(mut archive: R) -> Result<ArchiveImage, ArchiveProblem> {
    let manifest = read_entry(&mut archive, "manifest.json", |reader| {
        let mut text = Vec::new();
        reader.take(MAX_MANIFEST_BYTES).read_to_end(&mut text)?;
        Ok(text)
    })?
    .ok_or(ArchiveProblem::NoManifest)?;
    let entries: Vec<ManifestEntry> = serde_json::from_slice(&manifest)
        .map_err(|error| ArchiveProblem::InvalidManifest(ManifestFault::from(&error)))?;
    let entry = match <[ManifestEntry; 1]>::try_from(entries) {
        Ok([entry]) => entry,
        Err(entries) => return Err(ArchiveProblem::ImageCount(entries.len())),
    };
    let digest = match digest_from_config_name(&entry.config) {
        Some(digest) => digest,
        None => read_entry(&mut archive, &entry.config, |reader| {
            let mut hasher = Sha256::new();
            io::copy(reader, &mut hasher)?;
            Ok(hex::encode(hasher.finalize()))
        })?
        .ok_or(ArchiveProblem::MissingConfig)?,
    };
    Ok(ArchiveImage {
        id: format!("sha256:{digest}"),
        repo_tags: entry.repo_tags.unwrap_or_default(),
    })
}

/// Finds the entry `name` in the tar file `archive`, read from its start,
/// and passes its contents to `consume`. Returns `None` when there is no
/// such entry.
fn read_entry<R: Read + Seek, T>(
    archive: &mut R,
    name: &str,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> Result<Option<T>, ArchiveProblem> {
    let tar_error = |error: io::Error| ArchiveProblem::Tar(error.kind());
    archive.rewind().map_err(tar_error)?;
    let expected_name = normalize_entry_name(name);
    let mut tar = tar::Archive::new(io::BufReader::new(archive));
    for entry in tar.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        let entry_path = entry.path().map_err(tar_error)?;
        if normalize_entry_name(&entry_path.to_string_lossy()) == expected_name {
            return consume(&mut entry).map(Some).map_err(tar_error);
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
    use std::io::Cursor;

    fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Cursor<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            append(&mut builder, name, data);
        }
        Cursor::new(builder.into_inner().unwrap())
    }

    /// Builds an archive with a config, one layer and a manifest, in the
    /// order `docker save` writes them, and returns it with the config's
    /// digest.
    fn archive(
        config_name: impl Fn(&str) -> String,
        manifest_extra: &str,
    ) -> (Cursor<Vec<u8>>, String) {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let digest = hex::encode(Sha256::digest(config));
        let config_name = config_name(&digest);
        let manifest = format!(
            r#"[{{"Config":"{config_name}","RepoTags":["localhost/test:latest"],"Layers":["layer/layer.tar"]}}{manifest_extra}]"#
        );
        let tar = tar_of(&[
            (&config_name, config),
            ("layer/layer.tar", b"not a real layer"),
            ("manifest.json", manifest.as_bytes()),
        ]);
        (tar, digest)
    }

    #[test]
    fn classic_archive_gives_id_and_tags() {
        let (tar, digest) = archive(|d| format!("{d}.json"), "");
        let image = read_archive_image(tar).unwrap();
        assert_eq!(image.id, format!("sha256:{digest}"));
        assert_eq!(image.repo_tags, vec!["localhost/test:latest".to_string()]);
    }

    #[test]
    fn oci_layout_config_name_gives_id() {
        let (tar, digest) = archive(|d| format!("blobs/sha256/{d}"), "");
        assert_eq!(
            read_archive_image(tar).unwrap().id,
            format!("sha256:{digest}")
        );
    }

    #[test]
    fn config_with_other_name_is_hashed() {
        let (tar, digest) = archive(|_| "./config.json".to_string(), "");
        assert_eq!(
            read_archive_image(tar).unwrap().id,
            format!("sha256:{digest}")
        );
    }

    #[test]
    fn archive_is_read_from_its_start() {
        let (mut tar, digest) = archive(|_| "./config.json".to_string(), "");
        tar.set_position(700);
        assert_eq!(
            read_archive_image(&mut tar).unwrap().id,
            format!("sha256:{digest}")
        );
    }

    #[test]
    fn missing_repo_tags_means_no_tags() {
        let digest = "a".repeat(64);
        let manifest = format!(r#"[{{"Config":"{digest}.json","RepoTags":null,"Layers":[]}}]"#);
        let image =
            read_archive_image(tar_of(&[("./manifest.json", manifest.as_bytes())])).unwrap();
        assert_eq!(image.id, format!("sha256:{digest}"));
        assert!(image.repo_tags.is_empty());
    }

    #[test]
    fn archive_without_manifest_is_rejected() {
        let err = read_archive_image(tar_of(&[("hello.txt", b"hello")])).unwrap_err();
        assert_eq!(err, ArchiveProblem::NoManifest);
    }

    #[test]
    fn archive_with_two_images_is_rejected() {
        let other = format!(
            r#",{{"Config":"{}.json","RepoTags":[],"Layers":[]}}"#,
            "b".repeat(64)
        );
        let (tar, _) = archive(|d| format!("{d}.json"), &other);
        assert_eq!(
            read_archive_image(tar).unwrap_err(),
            ArchiveProblem::ImageCount(2)
        );
    }

    #[test]
    fn missing_config_entry_is_rejected() {
        let tar = tar_of(&[(
            "manifest.json",
            br#"[{"Config":"config.json","RepoTags":[],"Layers":[]}]"#,
        )]);
        assert_eq!(
            read_archive_image(tar).unwrap_err(),
            ArchiveProblem::MissingConfig
        );
    }

    #[test]
    fn problems_never_quote_the_file() {
        // A password-file line: the tar parser's own error would quote it.
        let secret = b"root:$6$saltsalt$hashhashhash:20228:0:99999:7:::\n".repeat(20);
        let not_tar = read_archive_image(Cursor::new(secret)).unwrap_err();
        assert!(matches!(not_tar, ArchiveProblem::Tar(_)), "{not_tar:?}");
        let message = not_tar.to_string();
        assert!(!message.contains("root"), "{message}");
        assert!(!message.contains("20228"), "{message}");

        let bad_json =
            read_archive_image(tar_of(&[("manifest.json", b"[secret-value")])).unwrap_err();
        assert_eq!(
            bad_json,
            ArchiveProblem::InvalidManifest(ManifestFault::Syntax)
        );
        let wrong_shape =
            read_archive_image(tar_of(&[("manifest.json", br#"{"secret-value": 1}"#)]))
                .unwrap_err();
        assert_eq!(
            wrong_shape,
            ArchiveProblem::InvalidManifest(ManifestFault::Layout)
        );
        for problem in [bad_json, wrong_shape] {
            let message = problem.to_string();
            assert!(!message.contains("secret"), "{message}");
        }
    }
}
