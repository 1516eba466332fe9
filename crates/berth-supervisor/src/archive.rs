//! Opening the `docker save` archive a container record names by path.
//!
//! The supervisor runs as the dispatcher's user, often root, while the
//! path comes from the container's owner. So an archive is opened only
//! when, with symlinks resolved, it is a regular file inside one of the
//! directories that `supervisor.image_archive_dirs` lists. Every other
//! path, whether it is missing, unreadable, a directory or outside those
//! directories, gets the same [`ArchiveError::NotAllowed`], so the message
//! does not tell the owner whether a file exists.
//!
//! The checks and the reads use one open file: the path is resolved and
//! checked, the file opened without following a symlink, and its device
//! and inode compared with those of the checked path. A file swapped in
//! after the check is therefore rejected and never read.
//!
//! A file that passes these checks but is not a valid archive gets
//! [`ArchiveError::Invalid`]. Its [`ArchiveError::status_message`] names
//! only the path, for `runtime_status`, while its `Display` adds the kind of
//! problem, for the supervisor log. Neither quotes the file.

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::image::{read_archive_image, ArchiveImage, ArchiveProblem};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The path is not a readable regular file inside an allowed
    /// directory. Carries no source on purpose: the cause would tell
    /// whether the file exists.
    #[error("image archive {path} was not loaded: archives are loaded only from regular files inside the directories that supervisor.image_archive_dirs lists ({dirs}); put the archive there, or load the image into the container runtime on the node and use its name")]
    NotAllowed { path: PathBuf, dirs: String },
    #[error("image archive {path} is not a valid `docker save` archive: {problem}")]
    Invalid {
        path: PathBuf,
        #[source]
        problem: ArchiveProblem,
    },
}

impl ArchiveError {
    /// Returns the message for the container's `runtime_status`: the same
    /// as `Display`, but without the kind of problem of an invalid archive.
    pub fn status_message(&self) -> String {
        match self {
            ArchiveError::NotAllowed { .. } => self.to_string(),
            ArchiveError::Invalid { path, .. } => format!(
                "image archive {} is not a valid `docker save` archive",
                path.display()
            ),
        }
    }
}

/// A `docker save` archive that passed the directory check, opened, with
/// the image it holds.
#[derive(Clone)]
pub struct ImageArchive {
    /// The path as the container record gives it.
    path: PathBuf,
    file: Arc<File>,
    image: ArchiveImage,
}

impl fmt::Debug for ImageArchive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageArchive")
            .field("path", &self.path)
            .field("image", &self.image)
            .finish()
    }
}

impl PartialEq for ImageArchive {
    fn eq(&self, other: &ImageArchive) -> bool {
        self.path == other.path && self.image == other.image
    }
}

impl Eq for ImageArchive {}

impl ImageArchive {
    /// Opens the archive at `path` if it is a regular file inside one of
    /// `allowed_dirs`, and reads which image it holds. Blocking: call it
    /// from a blocking task.
    pub fn open(path: &Path, allowed_dirs: &[PathBuf]) -> Result<ImageArchive, ArchiveError> {
        let file = open_inside(path, allowed_dirs).ok_or_else(|| ArchiveError::NotAllowed {
            path: path.to_path_buf(),
            dirs: describe_dirs(allowed_dirs),
        })?;
        let image = read_archive_image(&file).map_err(|problem| ArchiveError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(ImageArchive {
            path: path.to_path_buf(),
            file: Arc::new(file),
            image,
        })
    }

    /// Returns the path as the container record gives it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the image the archive contains.
    pub fn image(&self) -> &ArchiveImage {
        &self.image
    }

    /// Returns a new handle on the opened file, positioned at its start.
    /// All handles share one position, so read through one at a time.
    pub fn reopen(&self) -> std::io::Result<File> {
        use std::io::Seek;

        let mut file = self.file.try_clone()?;
        file.rewind()?;
        Ok(file)
    }
}

/// Opens `path` if, with symlinks resolved, it is a regular file inside
/// one of `allowed_dirs`. Returns `None` for every other path, whatever the
/// reason.
fn open_inside(path: &Path, allowed_dirs: &[PathBuf]) -> Option<File> {
    if !path.is_absolute() {
        return None;
    }
    let resolved = std::fs::canonicalize(path).ok()?;
    let inside = allowed_dirs
        .iter()
        .filter_map(|dir| std::fs::canonicalize(dir).ok())
        .any(|dir| resolved.starts_with(dir));
    if !inside {
        return None;
    }
    let checked = std::fs::metadata(&resolved).ok()?;
    if !checked.is_file() {
        return None;
    }

    // O_NOFOLLOW rejects a final component swapped for a symlink since the
    // check, and O_NONBLOCK keeps a FIFO swapped in from blocking the open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&resolved)
        .ok()?;
    let opened = file.metadata().ok()?;
    (opened.is_file() && same_file(&checked, &opened)).then_some(file)
}

fn same_file(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

fn describe_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "none: the list is empty".to_string();
    }
    dirs.iter()
        .map(|dir| dir.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use sha2::{Digest, Sha256};

    /// A file's contents that must never appear in a message.
    const SECRET: &[u8] = b"root:$6$berth-secret-marker$hash:20228:0:99999:7:::\n";

    fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    }

    /// Writes a minimal `docker save` archive and returns its image ID.
    fn write_archive(path: &Path) -> String {
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let digest = hex::encode(Sha256::digest(config));
        let manifest =
            format!(r#"[{{"Config":"{digest}.json","RepoTags":["localhost/t:1"],"Layers":[]}}]"#);
        let mut builder = tar::Builder::new(Vec::new());
        append(&mut builder, &format!("{digest}.json"), config);
        append(&mut builder, "manifest.json", manifest.as_bytes());
        std::fs::write(path, builder.into_inner().unwrap()).unwrap();
        format!("sha256:{digest}")
    }

    /// An allowed directory and, beside it, a directory that is not.
    struct Layout {
        _root: tempfile::TempDir,
        allowed: PathBuf,
        outside: PathBuf,
    }

    fn layout() -> Layout {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("images");
        let outside = root.path().join("private");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
        Layout {
            _root: root,
            allowed,
            outside,
        }
    }

    /// Returns the message with the path it opens with replaced, to
    /// compare the messages of different paths.
    fn template(error: &ArchiveError, path: &Path) -> String {
        error
            .status_message()
            .replacen(&path.display().to_string(), "PATH", 1)
    }

    #[test]
    fn archive_inside_an_allowed_dir_opens() {
        let layout = layout();
        let path = layout.allowed.join("image.tar");
        let id = write_archive(&path);
        let archive = ImageArchive::open(&path, std::slice::from_ref(&layout.allowed)).unwrap();
        assert_eq!(archive.path(), path);
        assert_eq!(archive.image().id, id);
        assert_eq!(archive.image().repo_tags, vec!["localhost/t:1".to_string()]);
    }

    #[test]
    fn symlink_within_the_allowed_dir_opens() {
        let layout = layout();
        let target = layout.allowed.join("v1.tar");
        let id = write_archive(&target);
        let link = layout.allowed.join("current.tar");
        symlink(&target, &link).unwrap();
        let archive = ImageArchive::open(&link, std::slice::from_ref(&layout.allowed)).unwrap();
        assert_eq!(archive.image().id, id);
    }

    #[test]
    fn reopened_file_reads_from_the_start() {
        use std::io::Read;

        let layout = layout();
        let path = layout.allowed.join("image.tar");
        write_archive(&path);
        let archive = ImageArchive::open(&path, std::slice::from_ref(&layout.allowed)).unwrap();
        for _ in 0..2 {
            let mut bytes = Vec::new();
            archive.reopen().unwrap().read_to_end(&mut bytes).unwrap();
            assert_eq!(bytes, std::fs::read(&path).unwrap());
        }
    }

    #[test]
    fn paths_outside_the_allowed_dirs_get_one_message() {
        let layout = layout();
        let allowed = [layout.allowed.clone()];
        std::fs::create_dir(layout.allowed.join("subdir")).unwrap();
        std::fs::write(layout.allowed.join("notes.txt"), SECRET).unwrap();
        symlink(
            layout.outside.join("secret.txt"),
            layout.allowed.join("escape.tar"),
        )
        .unwrap();
        write_archive(&layout.outside.join("image.tar"));

        let rejected = [
            layout.outside.join("secret.txt"),
            layout.outside.join("image.tar"),
            layout.allowed.join("escape.tar"),
            layout.allowed.join("../private/secret.txt"),
            layout.allowed.join("subdir"),
            layout.allowed.clone(),
            layout.allowed.join("missing.tar"),
            layout.allowed.join("notes.txt/inner.tar"),
            PathBuf::from("/etc/shadow"),
            PathBuf::from("relative/image.tar"),
        ];
        let mut templates = Vec::new();
        for path in &rejected {
            let err = ImageArchive::open(path, &allowed).unwrap_err();
            assert!(
                matches!(err, ArchiveError::NotAllowed { .. }),
                "{path:?}: {err}"
            );
            let message = err.status_message();
            assert_eq!(message, err.to_string());
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(
                message.contains("supervisor.image_archive_dirs"),
                "{message}"
            );
            assert!(
                message.contains(&layout.allowed.display().to_string()),
                "{message}"
            );
            assert!(!message.contains("secret-marker"), "{message}");
            assert!(!message.contains("root:"), "{message}");
            templates.push(template(&err, path));
        }
        assert!(
            templates.iter().all(|t| *t == templates[0]),
            "the messages differ: {templates:#?}"
        );
    }

    #[test]
    fn unreadable_file_matches_missing_file() {
        let layout = layout();
        let allowed = [layout.allowed.clone()];
        let unreadable = layout.allowed.join("locked.tar");
        write_archive(&unreadable);
        std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();
        if File::open(&unreadable).is_ok() {
            // Root reads files whatever their mode, so this case cannot
            // happen for it.
            println!("unreadable_file_matches_missing_file: skipped (running as root)");
            return;
        }
        let missing = layout.allowed.join("absent.tar");
        let unreadable_err = ImageArchive::open(&unreadable, &allowed).unwrap_err();
        let missing_err = ImageArchive::open(&missing, &allowed).unwrap_err();
        assert_eq!(
            template(&unreadable_err, &unreadable),
            template(&missing_err, &missing)
        );
    }

    #[test]
    fn allowed_dir_is_matched_by_whole_components() {
        let layout = layout();
        let sibling = PathBuf::from(format!("{}-other", layout.allowed.display()));
        std::fs::create_dir(&sibling).unwrap();
        let path = sibling.join("image.tar");
        write_archive(&path);
        let err = ImageArchive::open(&path, std::slice::from_ref(&layout.allowed)).unwrap_err();
        assert!(matches!(err, ArchiveError::NotAllowed { .. }), "{err}");
    }

    #[test]
    fn empty_dir_list_allows_no_archive() {
        let layout = layout();
        let path = layout.allowed.join("image.tar");
        write_archive(&path);
        let err = ImageArchive::open(&path, &[]).unwrap_err();
        assert!(matches!(err, ArchiveError::NotAllowed { .. }), "{err}");
        assert!(err.to_string().contains("the list is empty"), "{err}");
    }

    #[test]
    fn invalid_archive_status_names_only_the_path() {
        let layout = layout();
        let path = layout.allowed.join("notes.tar");
        std::fs::write(&path, SECRET.repeat(30)).unwrap();
        let err = ImageArchive::open(&path, std::slice::from_ref(&layout.allowed)).unwrap_err();
        assert!(matches!(err, ArchiveError::Invalid { .. }), "{err}");
        assert_eq!(
            err.status_message(),
            format!(
                "image archive {} is not a valid `docker save` archive",
                path.display()
            )
        );
        let detail = err.to_string();
        assert!(detail.contains("tar file"), "{detail}");
        assert!(!detail.contains("secret-marker"), "{detail}");
        assert!(!detail.contains("root:"), "{detail}");
    }
}
