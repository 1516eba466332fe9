//! The container's mounts: planning them from the record, then creating
//! their host side.
//!
//! Supported kinds: `tmp` (an empty host directory, bound read-write),
//! `json` and `text` (the mount's `content` written to a host file, bound
//! read-only). Planning ([`plan_mounts`]) is pure and checks every entry
//! first, so a bad mount fails the run before anything is created.
//! [`MountPlan::prepare`] then creates the host side under one private
//! directory per run, which [`PreparedMounts`] deletes when dropped.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use berth_core::Mount;
use serde_json::Value;

use crate::runtime::BindMount;

/// The mount kinds this supervisor can set up.
pub const SUPPORTED_KINDS: &[&str] = berth_core::validate::RUNNABLE_MOUNT_KINDS;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    // NOTE: collection, file and keep mounts need Keep access, which the
    // supervisor does not have yet.
    #[error("mount {path} has kind {kind:?}, which this supervisor does not support; supported kinds: tmp, json, text")]
    UnsupportedKind { path: String, kind: String },
    #[error(
        "mount {path} is invalid: the mount point must be an absolute path without `..` components"
    )]
    InvalidPath { path: String },
    #[error("mount {path} of kind text needs a string content, found {found}")]
    TextContent { path: String, found: &'static str },
    #[error("failed to encode the content of json mount {path}: {source}")]
    JsonContent {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to prepare mount {path} at {host_path}: {source}")]
    Prepare {
        path: String,
        host_path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to create the mount directory under {dir}: {source}; set supervisor.temp_dir or TMPDIR to a writable directory")]
    TempDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The host side that one mount point needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedMount {
    /// An empty directory, bound read-write.
    TempDir { container_path: String },
    /// A file with these bytes, bound read-only.
    File {
        container_path: String,
        content: Vec<u8>,
    },
}

impl PlannedMount {
    pub fn container_path(&self) -> &str {
        match self {
            PlannedMount::TempDir { container_path }
            | PlannedMount::File { container_path, .. } => container_path,
        }
    }
}

/// The checked mounts of one container, in mount point order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountPlan {
    pub mounts: Vec<PlannedMount>,
}

/// Checks a record's mounts and plans their host side.
pub fn plan_mounts(mounts: &BTreeMap<String, Mount>) -> Result<MountPlan, MountError> {
    let mut planned = Vec::with_capacity(mounts.len());
    for (path, mount) in mounts {
        check_mount_point(path)?;
        let container_path = path.clone();
        let entry = match mount.kind.as_str() {
            // NOTE: a tmp mount's `capacity` is not enforced: the directory
            // lives on the host file system under supervisor.temp_dir.
            "tmp" => PlannedMount::TempDir { container_path },
            "json" => {
                let content = mount.content.as_ref().unwrap_or(&Value::Null);
                let content =
                    serde_json::to_vec(content).map_err(|source| MountError::JsonContent {
                        path: path.clone(),
                        source,
                    })?;
                PlannedMount::File {
                    container_path,
                    content,
                }
            }
            "text" => match &mount.content {
                Some(Value::String(text)) => PlannedMount::File {
                    container_path,
                    content: text.clone().into_bytes(),
                },
                other => {
                    return Err(MountError::TextContent {
                        path: path.clone(),
                        found: json_type(other.as_ref()),
                    })
                }
            },
            kind => {
                return Err(MountError::UnsupportedKind {
                    path: path.clone(),
                    kind: kind.to_string(),
                })
            }
        };
        planned.push(entry);
    }
    Ok(MountPlan { mounts: planned })
}

fn check_mount_point(path: &str) -> Result<(), MountError> {
    let valid = path.starts_with('/')
        && !path.contains('\0')
        && !path.contains(':')
        && Path::new(path)
            .components()
            .all(|component| component != std::path::Component::ParentDir);
    if valid {
        Ok(())
    } else {
        Err(MountError::InvalidPath {
            path: path.to_string(),
        })
    }
}

fn json_type(value: Option<&Value>) -> &'static str {
    match value {
        None | Some(Value::Null) => "nothing",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(_)) => "a number",
        Some(Value::String(_)) => "a string",
        Some(Value::Array(_)) => "a list",
        Some(Value::Object(_)) => "an object",
    }
}

/// The host side of a run's mounts. Dropping it deletes the directory
/// that contains them.
#[derive(Debug)]
pub struct PreparedMounts {
    pub binds: Vec<BindMount>,
    root: Option<tempfile::TempDir>,
}

impl PreparedMounts {
    /// Returns the directory that contains every mount's host side, if any
    /// mount needed one.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_ref().map(|dir| dir.path())
    }

    /// Deletes the host side now, returning the error a drop would hide.
    pub fn remove(mut self) -> io::Result<()> {
        match self.root.take() {
            Some(dir) => dir.close(),
            None => Ok(()),
        }
    }
}

impl MountPlan {
    /// Creates each mount's host side in a new directory under `base`
    /// named after the container. Blocking: call it from a blocking task.
    pub fn prepare(&self, base: &Path, container_uuid: &str) -> Result<PreparedMounts, MountError> {
        if self.mounts.is_empty() {
            return Ok(PreparedMounts {
                binds: Vec::new(),
                root: None,
            });
        }
        let root = tempfile::Builder::new()
            .prefix(&format!("berth-{container_uuid}-"))
            .tempdir_in(base)
            .map_err(|source| MountError::TempDir {
                dir: base.to_path_buf(),
                source,
            })?;
        // The directory is private (0700): a bind mount is reached inside
        // the container without walking its host parents, and other users
        // of the node must not read the mounts' content, secrets included.
        // The temporary directory is created with the umask's mode, so
        // set it.
        let root_path = root.path().to_path_buf();
        set_mode(&root_path, 0o700).map_err(|source| MountError::TempDir {
            dir: base.to_path_buf(),
            source,
        })?;
        let mut binds = Vec::with_capacity(self.mounts.len());
        for (index, mount) in self.mounts.iter().enumerate() {
            let container_path = mount.container_path().to_string();
            let (host_path, read_only) = match mount {
                PlannedMount::TempDir { .. } => {
                    let host_path = root_path.join(format!("tmp{index}"));
                    create_dir(&host_path).map_err(|source| MountError::Prepare {
                        path: container_path.clone(),
                        host_path: host_path.clone(),
                        source,
                    })?;
                    (host_path, false)
                }
                PlannedMount::File { content, .. } => {
                    let host_path = root_path.join(format!("mountdata{index}"));
                    write_read_only(&host_path, content).map_err(|source| MountError::Prepare {
                        path: container_path.clone(),
                        host_path: host_path.clone(),
                        source,
                    })?;
                    (host_path, true)
                }
            };
            binds.push(BindMount {
                host_path,
                container_path,
                read_only,
            });
        }
        Ok(PreparedMounts {
            binds,
            root: Some(root),
        })
    }
}

/// Creates a directory that any user in the container may write, as a
/// scratch directory is expected to be.
fn create_dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir(path)?;
    set_mode(path, 0o1777)
}

fn write_read_only(path: &Path, content: &[u8]) -> io::Result<()> {
    std::fs::write(path, content)?;
    set_mode(path, 0o444)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mount(kind: &str, content: Option<Value>) -> Mount {
        Mount {
            kind: kind.to_string(),
            content,
            ..Default::default()
        }
    }

    fn mounts(entries: Vec<(&str, Mount)>) -> BTreeMap<String, Mount> {
        entries
            .into_iter()
            .map(|(path, m)| (path.to_string(), m))
            .collect()
    }

    #[test]
    fn supported_kinds_are_planned_in_path_order() {
        let plan = plan_mounts(&mounts(vec![
            ("/tmp", mount("tmp", None)),
            (
                "/etc/params.json",
                mount("json", Some(json!({"n": 12345678901234567890u64}))),
            ),
            ("/etc/note.txt", mount("text", Some(json!("hello\n")))),
        ]))
        .unwrap();
        assert_eq!(
            plan.mounts,
            vec![
                PlannedMount::File {
                    container_path: "/etc/note.txt".into(),
                    content: b"hello\n".to_vec()
                },
                PlannedMount::File {
                    container_path: "/etc/params.json".into(),
                    content: br#"{"n":12345678901234567890}"#.to_vec()
                },
                PlannedMount::TempDir {
                    container_path: "/tmp".into()
                },
            ]
        );
    }

    #[test]
    fn unsupported_kind_names_mount_and_kind() {
        let err = plan_mounts(&mounts(vec![
            ("/tmp", mount("tmp", None)),
            ("/keep", mount("collection", None)),
        ]))
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("/keep"), "{message}");
        assert!(message.contains("\"collection\""), "{message}");
    }

    #[test]
    fn text_mount_needs_string_content() {
        let err = plan_mounts(&mounts(vec![("/note", mount("text", Some(json!(3))))])).unwrap_err();
        assert!(err.to_string().contains("/note"), "{err}");
        assert!(err.to_string().contains("a number"), "{err}");
        let err = plan_mounts(&mounts(vec![("/note", mount("text", None))])).unwrap_err();
        assert!(err.to_string().contains("nothing"), "{err}");
    }

    #[test]
    fn json_mount_without_content_holds_null() {
        let plan = plan_mounts(&mounts(vec![("/p.json", mount("json", None))])).unwrap();
        assert_eq!(
            plan.mounts,
            vec![PlannedMount::File {
                container_path: "/p.json".into(),
                content: b"null".to_vec()
            }]
        );
    }

    #[test]
    fn relative_or_escaping_mount_points_are_rejected() {
        for bad in ["tmp", "/a/../etc", "", "/a:b"] {
            let err = plan_mounts(&mounts(vec![(bad, mount("tmp", None))])).unwrap_err();
            assert!(
                matches!(err, MountError::InvalidPath { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn prepare_creates_host_side_and_drop_removes_it() {
        let base = tempfile::tempdir().unwrap();
        let plan = plan_mounts(&mounts(vec![
            ("/scratch", mount("tmp", None)),
            ("/etc/note.txt", mount("text", Some(json!("hi")))),
        ]))
        .unwrap();
        let prepared = plan
            .prepare(base.path(), "zzzzz-dz642-000000000000001")
            .unwrap();
        let root = prepared.root().unwrap().to_path_buf();
        assert!(root.starts_with(base.path()));
        assert_eq!(prepared.binds.len(), 2);
        // Other users of the node cannot reach the mounts' content.
        let root_mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
        assert_eq!(root_mode, 0o700);

        let note = &prepared.binds[0];
        assert_eq!(note.container_path, "/etc/note.txt");
        assert!(note.read_only);
        assert_eq!(std::fs::read(&note.host_path).unwrap(), b"hi");
        let mode = std::fs::metadata(&note.host_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o444);

        let scratch = &prepared.binds[1];
        assert_eq!(scratch.container_path, "/scratch");
        assert!(!scratch.read_only);
        assert!(scratch.host_path.is_dir());
        let mode = std::fs::metadata(&scratch.host_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o1777);

        drop(prepared);
        assert!(!root.exists());
    }

    #[test]
    fn no_mounts_need_no_directory() {
        let base = tempfile::tempdir().unwrap();
        let prepared = MountPlan::default()
            .prepare(base.path(), "zzzzz-dz642-000000000000001")
            .unwrap();
        assert!(prepared.root().is_none());
        assert!(prepared.binds.is_empty());
        assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0);
    }
}
