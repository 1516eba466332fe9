//! The container's mounts: planning them from the record, then creating
//! their host side.
//!
//! Supported kinds: `tmp` (an empty host directory, bound read-write),
//! `json` and `text` (the mount's `content` written to a host file, bound
//! read-only), `collection` (a collection, or a directory or file of it,
//! bound read-only) and `file` (one file of a collection, bound
//! read-only). Collections come from the node's collection cache, which
//! [`crate::staging`] fills before [`MountPlan::prepare_with`] runs. A
//! collection or file mount at or below `output_path` is copied into the
//! output directory instead, so the container may change it and its
//! files become part of the output.
//!
//! Planning ([`plan_mounts_for_output`]) is pure and checks every entry
//! first, so a bad mount fails the run before anything is created.
//! [`MountPlan::prepare_with`] then creates the host side under one
//! private directory per run, which [`PreparedMounts`] deletes when
//! dropped.

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
    #[error("mount {path} has kind {kind:?}, which this supervisor does not support; supported kinds: tmp, collection, json, text, file")]
    UnsupportedKind { path: String, kind: String },
    #[error("mount {path} is a writable collection mount outside output_path; only the output directory and mounts below it may be writable, so remove `writable: true` or mount the collection below output_path")]
    WritableCollection { path: String },
    #[error(
        "mount {path} of kind {kind} names no collection: give its portable_data_hash or uuid"
    )]
    NoCollection { path: String, kind: String },
    #[error("mount {path} has an invalid collection path {collection_path:?}: expected a relative path inside the collection without empty, `.` or `..` components")]
    CollectionPath {
        path: String,
        collection_path: String,
    },
    #[error("mount {path} of kind file needs the path of a file in its collection")]
    FilePath { path: String },
    #[error("mount {path} is below output_path {output_path}, which is not a directory the supervisor creates; make output_path a tmp mount")]
    NoOutputDir { path: String, output_path: String },
    #[error("collection mount {path} was not staged before the mounts were prepared")]
    NotStaged { path: String },
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
    /// A collection, or a directory or file of it, from the node's cache.
    Collection {
        container_path: String,
        collection: CollectionRef,
        placement: Placement,
    },
}

impl PlannedMount {
    pub fn container_path(&self) -> &str {
        match self {
            PlannedMount::TempDir { container_path }
            | PlannedMount::File { container_path, .. }
            | PlannedMount::Collection { container_path, .. } => container_path,
        }
    }
}

/// The part of a collection that a mount shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionRef {
    /// The portable data hash or the collection's UUID, as the mount
    /// gives it.
    pub id: String,
    /// A directory or file of the collection, relative to its root, or
    /// `None` for the whole collection.
    pub path: Option<String>,
    /// Whether `path` must name a file (a `file` mount).
    pub file: bool,
}

/// The place a collection mount's content goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Bound read-only from the node's cache.
    ReadOnly,
    /// Copied into a new read-write directory that is the output
    /// directory.
    OutputDir,
    /// Copied into the output directory at this path relative to it.
    IntoOutput { relative: String },
}

/// The checked mounts of one container, in mount point order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountPlan {
    pub mounts: Vec<PlannedMount>,
}

/// Checks a record's mounts and plans their host side, for a container
/// without an output directory.
pub fn plan_mounts(mounts: &BTreeMap<String, Mount>) -> Result<MountPlan, MountError> {
    plan_mounts_for_output(mounts, "")
}

/// Checks a record's mounts and plans their host side. `output_path` is
/// the container's output directory, or empty for none.
pub fn plan_mounts_for_output(
    mounts: &BTreeMap<String, Mount>,
    output_path: &str,
) -> Result<MountPlan, MountError> {
    let mut planned = Vec::with_capacity(mounts.len());
    for (path, mount) in mounts {
        check_mount_point(path)?;
        let container_path = path.clone();
        let entry = match mount.kind.as_str() {
            "collection" | "file" => plan_collection(path, mount, output_path)?,
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

/// Plans a `collection` or `file` mount.
fn plan_collection(
    path: &str,
    mount: &Mount,
    output_path: &str,
) -> Result<PlannedMount, MountError> {
    let container_path = path.to_string();
    let file = mount.kind == "file";
    let non_empty = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
    let id = non_empty(&mount.portable_data_hash).or_else(|| non_empty(&mount.uuid));
    let at_output = !output_path.is_empty() && path == output_path;
    let Some(id) = id else {
        // A writable collection mount without a collection is a new,
        // empty collection: at output_path that is an empty output
        // directory.
        if !file && at_output {
            return Ok(PlannedMount::TempDir { container_path });
        }
        return Err(MountError::NoCollection {
            path: container_path,
            kind: mount.kind.clone(),
        });
    };
    let collection_path = collection_path(path, mount.path.as_deref().unwrap_or_default())?;
    if file && collection_path.is_none() {
        return Err(MountError::FilePath {
            path: container_path,
        });
    }
    let relative = below(output_path, path);
    let placement = if at_output && !file {
        Placement::OutputDir
    } else if let Some(relative) = relative {
        Placement::IntoOutput { relative }
    } else if mount.writable {
        return Err(MountError::WritableCollection {
            path: container_path,
        });
    } else {
        Placement::ReadOnly
    };
    Ok(PlannedMount::Collection {
        container_path,
        collection: CollectionRef {
            id,
            path: collection_path,
            file,
        },
        placement,
    })
}

/// Returns a mount's `path` in its collection without leading or trailing
/// slashes, or `None` for the root (`""`, `/` or `.`).
fn collection_path(mount_path: &str, path: &str) -> Result<Option<String>, MountError> {
    let trimmed = path.trim_start_matches("./").trim_matches('/');
    if trimmed.is_empty() || trimmed == "." {
        return Ok(None);
    }
    let valid = !trimmed.contains('\0')
        && trimmed
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if !valid {
        return Err(MountError::CollectionPath {
            path: mount_path.to_string(),
            collection_path: path.to_string(),
        });
    }
    Ok(Some(trimmed.to_string()))
}

/// Returns `path` relative to `dir` when it lies strictly below it.
fn below(dir: &str, path: &str) -> Option<String> {
    if dir.is_empty() {
        return None;
    }
    let rest = if dir == "/" {
        path.strip_prefix('/')?
    } else {
        path.strip_prefix(dir)?.strip_prefix('/')?
    };
    let rest = rest.trim_end_matches('/');
    (!rest.is_empty()).then(|| rest.to_string())
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
    /// A plan with collection mounts needs [`MountPlan::prepare_with`].
    pub fn prepare(&self, base: &Path, container_uuid: &str) -> Result<PreparedMounts, MountError> {
        self.prepare_with(base, container_uuid, &BTreeMap::new(), "")
    }

    /// Returns whether the plan has collection or file mounts, which need
    /// staging first.
    pub fn has_collections(&self) -> bool {
        self.mounts
            .iter()
            .any(|mount| matches!(mount, PlannedMount::Collection { .. }))
    }

    /// Creates each mount's host side, like [`MountPlan::prepare`].
    /// `staged` maps the mount point of each collection mount to its
    /// staged host path (the collection's directory or file in the node's
    /// cache), and `output_path` is the container's output directory.
    /// Blocking: call it from a blocking task.
    pub fn prepare_with(
        &self,
        base: &Path,
        container_uuid: &str,
        staged: &BTreeMap<String, PathBuf>,
        output_path: &str,
    ) -> Result<PreparedMounts, MountError> {
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
        let mut binds: Vec<BindMount> = Vec::with_capacity(self.mounts.len());
        // Mount points come in path order, so the output directory is
        // created before the mounts below it are copied in.
        for (index, mount) in self.mounts.iter().enumerate() {
            let container_path = mount.container_path().to_string();
            let prepare_error = |host_path: &Path| {
                let path = container_path.clone();
                let host_path = host_path.to_path_buf();
                move |source| MountError::Prepare {
                    path,
                    host_path,
                    source,
                }
            };
            let (host_path, read_only) = match mount {
                PlannedMount::Collection { placement, .. } => {
                    let source =
                        staged
                            .get(&container_path)
                            .ok_or_else(|| MountError::NotStaged {
                                path: container_path.clone(),
                            })?;
                    match placement {
                        Placement::ReadOnly => (source.clone(), true),
                        Placement::OutputDir => {
                            let host_path = root_path.join(format!("tmp{index}"));
                            create_dir(&host_path).map_err(prepare_error(&host_path))?;
                            copy_into(source, &host_path).map_err(prepare_error(&host_path))?;
                            (host_path, false)
                        }
                        Placement::IntoOutput { relative } => {
                            let output_dir = binds
                                .iter()
                                .find(|bind| bind.container_path == output_path && !bind.read_only)
                                .map(|bind| bind.host_path.clone())
                                .ok_or_else(|| MountError::NoOutputDir {
                                    path: container_path.clone(),
                                    output_path: output_path.to_string(),
                                })?;
                            let target = output_dir.join(relative);
                            copy_into(source, &target).map_err(prepare_error(&target))?;
                            continue;
                        }
                    }
                }
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

/// Copies a staged collection directory or file to `target`, creating
/// missing parent directories. Directories get mode 0777 and files 0666,
/// so that any user in the container may change the copy, as in a
/// scratch directory. Symbolic links are not followed, and the node's
/// cache contains none.
fn copy_into(source: &Path, target: &Path) -> io::Result<()> {
    if let Some(parent) = target.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent)?;
            set_mode(parent, 0o777)?;
        }
    }
    let metadata = std::fs::symlink_metadata(source)?;
    if metadata.is_file() {
        std::fs::copy(source, target)?;
        return set_mode(target, 0o666);
    }
    if !metadata.is_dir() {
        return Err(io::Error::other(format!(
            "{} is neither a file nor a directory",
            source.display()
        )));
    }
    if !target.is_dir() {
        std::fs::create_dir(target)?;
    }
    set_mode(target, 0o777)?;
    for entry in std::fs::read_dir(source)? {
        let entry = entry?;
        copy_into(&entry.path(), &target.join(entry.file_name()))?;
    }
    Ok(())
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
            ("/keep", mount("keep", None)),
        ]))
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("/keep"), "{message}");
        assert!(message.contains("\"keep\""), "{message}");
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

    fn collection_mount(pdh: &str, path: Option<&str>, writable: bool) -> Mount {
        Mount {
            kind: "collection".to_string(),
            portable_data_hash: Some(pdh.to_string()),
            path: path.map(str::to_string),
            writable,
            ..Default::default()
        }
    }

    const PDH: &str = "d41d8cd98f00b204e9800998ecf8427e+0";

    #[test]
    fn collection_mounts_are_placed_by_output_path() {
        let plan = plan_mounts_for_output(
            &mounts(vec![
                ("/in", collection_mount(PDH, Some("/dir/"), false)),
                ("/out", mount("tmp", None)),
                ("/out/ref", collection_mount(PDH, None, true)),
            ]),
            "/out",
        )
        .unwrap();
        let placements: Vec<_> = plan
            .mounts
            .iter()
            .filter_map(|mount| match mount {
                PlannedMount::Collection {
                    collection,
                    placement,
                    ..
                } => Some((collection.path.clone(), placement.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            placements,
            vec![
                (Some("dir".to_string()), Placement::ReadOnly),
                (
                    None,
                    Placement::IntoOutput {
                        relative: "ref".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn writable_collection_outside_output_is_rejected() {
        let err = plan_mounts_for_output(
            &mounts(vec![("/data", collection_mount(PDH, None, true))]),
            "/out",
        )
        .unwrap_err();
        assert!(
            matches!(err, MountError::WritableCollection { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/data"), "{err}");
    }

    #[test]
    fn collection_mount_without_source_or_clean_path() {
        let none = Mount {
            kind: "collection".into(),
            ..Default::default()
        };
        let err = plan_mounts_for_output(&mounts(vec![("/in", none)]), "/out").unwrap_err();
        assert!(
            err.to_string().contains("portable_data_hash or uuid"),
            "{err}"
        );
        let err = plan_mounts_for_output(
            &mounts(vec![("/in", collection_mount(PDH, Some("a/../b"), false))]),
            "/out",
        )
        .unwrap_err();
        assert!(matches!(err, MountError::CollectionPath { .. }), "{err}");
        let file = Mount {
            kind: "file".into(),
            portable_data_hash: Some(PDH.into()),
            ..Default::default()
        };
        let err = plan_mounts_for_output(&mounts(vec![("/in.txt", file)]), "/out").unwrap_err();
        assert!(matches!(err, MountError::FilePath { .. }), "{err}");
    }

    #[test]
    fn prepare_binds_and_copies_staged_collections() {
        let base = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::create_dir(cache.path().join("sub")).unwrap();
        std::fs::write(cache.path().join("sub/x.txt"), b"x").unwrap();
        let plan = plan_mounts_for_output(
            &mounts(vec![
                ("/in", collection_mount(PDH, None, false)),
                ("/out", mount("tmp", None)),
                ("/out/copy", collection_mount(PDH, None, false)),
            ]),
            "/out",
        )
        .unwrap();
        let staged: BTreeMap<String, PathBuf> = [
            ("/in".to_string(), cache.path().to_path_buf()),
            ("/out/copy".to_string(), cache.path().to_path_buf()),
        ]
        .into();

        let prepared = plan
            .prepare_with(base.path(), "zzzzz-dz642-000000000000001", &staged, "/out")
            .unwrap();
        assert_eq!(prepared.binds.len(), 2, "the copy below /out has no bind");
        assert_eq!(prepared.binds[0].host_path, cache.path());
        assert!(prepared.binds[0].read_only);

        let output = &prepared.binds[1].host_path;
        assert_eq!(std::fs::read(output.join("copy/sub/x.txt")).unwrap(), b"x");
        let mode = std::fs::metadata(output.join("copy/sub/x.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o666);
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
