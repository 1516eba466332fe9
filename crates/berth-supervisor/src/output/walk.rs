//! Listing the files of the output directory.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::glob::Globs;
use super::OutputError;

/// One regular file to save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The host path to read: the file itself, or the final target of a
    /// symbolic link, with no symbolic link left in it.
    pub source: PathBuf,
    /// The path in the collection, relative and `/`-separated.
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Default)]
pub struct WalkResult {
    /// Kept files in path order.
    pub files: Vec<OutputFile>,
    /// Kept directories that contain nothing.
    pub empty_directories: Vec<String>,
    /// One message per entry left out, for the supervisor log.
    pub skipped: Vec<String>,
}

/// Walks `root`, the host side of the output directory, keeping what
/// `globs` keeps. Blocking.
pub fn walk_output(root: &Path, globs: &Globs) -> Result<WalkResult, OutputError> {
    let walk_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OutputError::Walk { path, source }
    };
    let root = root.canonicalize().map_err(walk_error(root))?;
    let mut walker = Walker {
        root: root.clone(),
        globs,
        result: WalkResult::default(),
        active: HashSet::new(),
    };
    walker.visit(&root, "")?;
    Ok(walker.result)
}

struct Walker<'a> {
    /// The canonical output directory.
    root: PathBuf,
    globs: &'a Globs,
    result: WalkResult,
    /// Canonical directories being walked, so a link back up is a loop.
    active: HashSet<PathBuf>,
}

impl Walker<'_> {
    fn visit(&mut self, dir: &Path, relative: &str) -> Result<(), OutputError> {
        let canonical = dir.canonicalize().map_err(|source| OutputError::Walk {
            path: dir.to_path_buf(),
            source,
        })?;
        self.active.insert(canonical.clone());
        let mut entries = Vec::new();
        let listing = fs::read_dir(dir).map_err(|source| OutputError::Walk {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in listing {
            let entry = entry.map_err(|source| OutputError::Walk {
                path: dir.to_path_buf(),
                source,
            })?;
            entries.push(entry.file_name());
        }
        entries.sort();
        if entries.is_empty() && !relative.is_empty() && self.globs.keeps_file(relative) {
            self.result.empty_directories.push(relative.to_string());
        }
        for name in entries {
            let host_path = dir.join(&name);
            let Some(name) = name.to_str() else {
                self.result.skipped.push(format!(
                    "skipped {}: the name is not valid UTF-8",
                    host_path.display()
                ));
                continue;
            };
            let path = if relative.is_empty() {
                name.to_string()
            } else {
                format!("{relative}/{name}")
            };
            self.visit_entry(&host_path, &path)?;
        }
        self.active.remove(&canonical);
        Ok(())
    }

    fn visit_entry(&mut self, host_path: &Path, path: &str) -> Result<(), OutputError> {
        let metadata = fs::symlink_metadata(host_path).map_err(|source| OutputError::Walk {
            path: host_path.to_path_buf(),
            source,
        })?;
        let file_type = metadata.file_type();
        if file_type.is_symlink() {
            return self.visit_link(host_path, path);
        }
        if file_type.is_dir() {
            if self.globs.may_keep_below(path) {
                self.visit(host_path, path)?;
            }
            return Ok(());
        }
        if file_type.is_file() {
            if self.globs.keeps_file(path) {
                self.result.files.push(OutputFile {
                    source: host_path.to_path_buf(),
                    path: path.to_string(),
                    size: metadata.len(),
                });
            }
            return Ok(());
        }
        self.result.skipped.push(format!(
            "skipped {path}: it is {}, not a regular file or directory",
            describe_special(&file_type)
        ));
        Ok(())
    }

    fn visit_link(&mut self, host_path: &Path, path: &str) -> Result<(), OutputError> {
        let target = match self.resolve_link(host_path) {
            Ok(target) => target,
            Err(reason) => {
                self.result
                    .skipped
                    .push(format!("skipped symbolic link {path}: {reason}"));
                return Ok(());
            }
        };
        let metadata = fs::metadata(&target).map_err(|source| OutputError::Walk {
            path: target.clone(),
            source,
        })?;
        if metadata.is_dir() {
            if self.active.contains(&target) {
                self.result.skipped.push(format!(
                    "skipped symbolic link {path}: it points to a directory that contains it, a loop"
                ));
            } else if self.globs.may_keep_below(path) {
                // NOTE: only links back to an ancestor count as loops, so
                // links that fan out to the same directories list their
                // files once per path; supervisor.max_output_bytes bounds
                // the bytes read, when it is set.
                self.visit(&target, path)?;
            }
        } else if metadata.is_file() {
            if self.globs.keeps_file(path) {
                self.result.files.push(OutputFile {
                    source: target,
                    path: path.to_string(),
                    size: metadata.len(),
                });
            }
        } else {
            self.result.skipped.push(format!(
                "skipped symbolic link {path}: it points to {}",
                describe_special(&metadata.file_type())
            ));
        }
        Ok(())
    }

    /// Resolves a link to its final canonical target, which must be inside
    /// the output directory. Every hop is resolved on the host, so an
    /// absolute target names a host path.
    fn resolve_link(&self, link: &Path) -> Result<PathBuf, String> {
        let resolved = match link.canonicalize() {
            Ok(resolved) => resolved,
            Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
                return Err("it is part of a loop of symbolic links".to_string())
            }
            Err(error) => return Err(format!("its target does not exist ({error})")),
        };
        if !resolved.starts_with(&self.root) {
            return Err(format!(
                "its target {} is outside the output directory; not followed",
                resolved.display()
            ));
        }
        Ok(resolved)
    }
}

fn describe_special(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_socket() {
        "a socket"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "of an unknown type"
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn names(result: &WalkResult) -> Vec<&str> {
        result.files.iter().map(|file| file.path.as_str()).collect()
    }

    #[test]
    fn walk_lists_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sub/empty")).unwrap();
        fs::write(dir.path().join("b.txt"), "bb").unwrap();
        fs::write(dir.path().join("sub/a.txt"), "a").unwrap();
        let result = walk_output(dir.path(), &Globs::default()).unwrap();
        assert_eq!(names(&result), vec!["b.txt", "sub/a.txt"]);
        assert_eq!(result.files[0].size, 2);
        assert_eq!(result.empty_directories, vec!["sub/empty"]);
        assert!(result.skipped.is_empty());
    }

    #[test]
    fn link_outside_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
        symlink("../../../../../../etc/passwd", dir.path().join("relative")).unwrap();
        let result = walk_output(dir.path(), &Globs::default()).unwrap();
        assert!(result.files.is_empty(), "{:?}", result.files);
        assert_eq!(result.skipped.len(), 2, "{:?}", result.skipped);
        assert!(result.skipped[0].contains("outside the output directory"));
    }

    #[test]
    fn link_through_inside_link_to_outside_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        symlink("/etc", dir.path().join("etc")).unwrap();
        symlink("etc/passwd", dir.path().join("hop")).unwrap();
        let result = walk_output(dir.path(), &Globs::default()).unwrap();
        assert!(result.files.is_empty(), "{:?}", result.files);
        assert_eq!(result.skipped.len(), 2, "{:?}", result.skipped);
    }

    #[test]
    fn link_inside_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("data")).unwrap();
        fs::write(dir.path().join("data/x"), "xyz").unwrap();
        symlink("data/x", dir.path().join("alias")).unwrap();
        symlink("data", dir.path().join("dirlink")).unwrap();
        let result = walk_output(dir.path(), &Globs::default()).unwrap();
        assert_eq!(names(&result), vec!["alias", "data/x", "dirlink/x"]);
        assert_eq!(
            result.files[0].source,
            dir.path().canonicalize().unwrap().join("data/x")
        );
    }

    #[test]
    fn link_loop_and_dangling_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        symlink("..", dir.path().join("d/up")).unwrap();
        symlink("missing", dir.path().join("dangling")).unwrap();
        symlink("self", dir.path().join("self")).unwrap();
        let result = walk_output(dir.path(), &Globs::default()).unwrap();
        assert!(result.files.is_empty());
        assert_eq!(result.skipped.len(), 3, "{:?}", result.skipped);
    }

    #[test]
    fn socket_is_skipped_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let result = walk_output(dir.path(), &Globs::default()).unwrap();
        assert!(result.files.is_empty());
        assert!(
            result.skipped[0].contains("a socket"),
            "{:?}",
            result.skipped
        );
    }

    #[test]
    fn globs_filter_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("keep/deep")).unwrap();
        fs::create_dir_all(dir.path().join("drop")).unwrap();
        fs::write(dir.path().join("keep/a.txt"), "a").unwrap();
        fs::write(dir.path().join("keep/deep/b.txt"), "b").unwrap();
        fs::write(dir.path().join("keep/c.dat"), "c").unwrap();
        fs::write(dir.path().join("drop/a.txt"), "a").unwrap();
        let globs = Globs::parse(&["keep/**/*.txt".to_string()]).unwrap();
        let result = walk_output(dir.path(), &globs).unwrap();
        assert_eq!(names(&result), vec!["keep/a.txt", "keep/deep/b.txt"]);
    }
}
