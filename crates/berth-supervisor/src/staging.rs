//! Collections a run needs on the node: the collections of `collection`
//! and `file` mounts, and the collection that contains the image when
//! `container_image` names one. Each is read with the container's own
//! token and staged through the node's [`CollectionCache`].
//!
//! The collection record is always read through the API, even when the
//! node's cache already holds its portable data hash: the read proves that
//! the container's owner may see the collection, because the cache is
//! shared by every user's containers on the node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use berth_client::{Client, ClientError};
use berth_core::locator::Locator;
use berth_core::manifest::{is_portable_data_hash, Manifest};
use berth_core::{ObjectType, Uuid};
use bytes::Bytes;

use crate::archive::{ArchiveError, ImageArchive};
use crate::cache::{BlockSource, CacheEntry, CacheError, CollectionCache, StageReport};
use crate::logs::SupervisorLog;
use crate::mounts::{MountPlan, PlannedMount};
use crate::retry::{retry, API_BACKOFF};

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("collection {id} of {user} was not found, or the container's owner may not read it; check its portable data hash or uuid")]
    NotFound { id: String, user: String },
    #[error("failed to read collection {id} of {user}: {message}")]
    Read {
        id: String,
        user: String,
        message: String,
    },
    #[error("collection {id} of {user} has an invalid manifest: {source}")]
    Manifest {
        id: String,
        user: String,
        #[source]
        source: berth_core::manifest::ManifestError,
    },
    #[error("collection {id} of {user}: the controller returned the collection {found}, whose manifest has the portable data hash {computed}")]
    HashMismatch {
        id: String,
        user: String,
        found: String,
        computed: String,
    },
    #[error("{user}: {path:?} is not a file of collection {pdh}")]
    NotAFile {
        user: String,
        path: String,
        pdh: String,
    },
    #[error("{user}: {path:?} is neither a file nor a directory of collection {pdh}")]
    PathNotFound {
        user: String,
        path: String,
        pdh: String,
    },
    #[error("image collection {pdh} contains no .tar file: container_image must name a collection that contains exactly one `docker save` archive (*.tar) at its top level")]
    NoImageArchive { pdh: String },
    #[error("image collection {pdh} contains {count} .tar files ({names}), so the image is ambiguous: container_image must name a collection that contains exactly one `docker save` archive (*.tar) at its top level")]
    SeveralImageArchives {
        pdh: String,
        count: usize,
        names: String,
    },
    #[error("{user}: {source}")]
    Cache {
        user: String,
        #[source]
        source: CacheError,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("failed to open the image archive: {0}")]
    ArchiveTask(#[source] tokio::task::JoinError),
}

impl StagingError {
    /// Returns the message for `runtime_status.error`: the archive's own
    /// status message for an archive, else the same as `Display`.
    pub fn status_message(&self) -> String {
        match self {
            StagingError::Archive(error) => error.status_message(),
            other => other.to_string(),
        }
    }
}

/// Reads blocks through the controller's block API with the container's
/// token, retrying transient failures.
#[derive(Debug)]
pub struct ApiBlocks<'a> {
    pub client: &'a Client,
    pub retry_timeout: Duration,
}

#[async_trait]
impl BlockSource for ApiBlocks<'_> {
    async fn read_block(&self, locator: &Locator) -> Result<Bytes, String> {
        let text = locator.to_string();
        retry(
            "reading a block",
            self.retry_timeout,
            API_BACKOFF,
            ClientError::is_transient,
            || self.client.get_block(&text),
        )
        .await
        // The error's text may quote the URL, whose signed locator is a
        // read permission, so only its status goes into the message.
        .map_err(|error| match error.status() {
            Some(status) => format!("the controller returned {status}"),
            None => "the request failed before the controller answered".to_string(),
        })
    }
}

/// The collections staged for one run. Dropping it releases their cache
/// entries, which eviction may then remove.
#[derive(Debug, Default)]
pub struct StagedCollections {
    entries: Vec<CacheEntry>,
    /// Host paths of the collection mounts, by mount point.
    pub mount_sources: BTreeMap<String, PathBuf>,
}

impl StagedCollections {
    pub fn hold(&mut self, entry: CacheEntry) {
        self.entries.push(entry);
    }
}

/// The client, cache and log that the staging steps use.
#[derive(Debug)]
pub struct Stager<'a> {
    pub client: &'a Client,
    pub cache: CollectionCache,
    pub retry_timeout: Duration,
    pub log: &'a SupervisorLog,
}

impl Stager<'_> {
    /// Stages the collection of every collection and file mount of `plan`
    /// and records each mount's host path in `staged`.
    pub async fn stage_mounts(
        &self,
        plan: &MountPlan,
        staged: &mut StagedCollections,
    ) -> Result<(), StagingError> {
        for mount in &plan.mounts {
            let PlannedMount::Collection {
                container_path,
                collection,
                ..
            } = mount
            else {
                continue;
            };
            let user = format!("mount {container_path}");
            let (pdh, manifest) = self.resolve(&collection.id, &user).await?;
            if let Some(path) = &collection.path {
                check_path(&manifest, path, collection.file, &user, &pdh)?;
            }
            let entry = self.stage(&pdh, &manifest, &user).await?;
            let host_path = match &collection.path {
                Some(path) => entry.path().join(path),
                None => entry.path().to_path_buf(),
            };
            staged
                .mount_sources
                .insert(container_path.clone(), host_path);
            staged.hold(entry);
        }
        Ok(())
    }

    /// Stages the image collection when `container_image` is a portable
    /// data hash or a collection UUID, and opens its archive. Returns
    /// `None` for any other `container_image`.
    pub async fn stage_image(
        &self,
        container_image: &str,
        staged: &mut StagedCollections,
    ) -> Result<Option<ImageArchive>, StagingError> {
        if !names_collection(container_image) {
            return Ok(None);
        }
        let user = "container_image".to_string();
        let (pdh, manifest) = self.resolve(container_image, &user).await?;
        let name = image_archive_name(&manifest, &pdh)?;
        let entry = self.stage(&pdh, &manifest, &user).await?;
        let archive_path = entry.path().join(&name);
        // The cache entry counts as an allowed directory for this archive
        // only: image_archive_dirs does not apply to it.
        let allowed = vec![entry.path().to_path_buf()];
        staged.hold(entry);
        let archive =
            tokio::task::spawn_blocking(move || ImageArchive::open(&archive_path, &allowed))
                .await
                .map_err(StagingError::ArchiveTask)??;
        Ok(Some(archive))
    }

    /// Reads a collection by portable data hash or UUID and returns its
    /// portable data hash and parsed manifest, checked against each other.
    async fn resolve(&self, id: &str, user: &str) -> Result<(String, Manifest), StagingError> {
        let fetched = retry(
            "reading a collection",
            self.retry_timeout,
            API_BACKOFF,
            ClientError::is_transient,
            || self.client.get_collection(id),
        )
        .await;
        let collection = match fetched {
            Ok(collection) => collection,
            Err(error) if matches!(error.status().map(|s| s.as_u16()), Some(403 | 404)) => {
                return Err(StagingError::NotFound {
                    id: id.to_string(),
                    user: user.to_string(),
                })
            }
            Err(error) => {
                return Err(StagingError::Read {
                    id: id.to_string(),
                    user: user.to_string(),
                    message: error.to_string(),
                })
            }
        };
        let manifest = Manifest::parse(&collection.manifest_text).map_err(|source| {
            StagingError::Manifest {
                id: id.to_string(),
                user: user.to_string(),
                source,
            }
        })?;
        let computed = manifest.portable_data_hash();
        let requested_hash = is_portable_data_hash(id).then_some(id);
        if computed != collection.portable_data_hash
            || requested_hash.is_some_and(|hash| hash != computed)
        {
            return Err(StagingError::HashMismatch {
                id: id.to_string(),
                user: user.to_string(),
                found: collection.portable_data_hash,
                computed,
            });
        }
        if !is_portable_data_hash(id) {
            self.log
                .info(format!("{user}: collection {id} is {computed}"));
        }
        Ok((computed, manifest))
    }

    async fn stage(
        &self,
        pdh: &str,
        manifest: &Manifest,
        user: &str,
    ) -> Result<CacheEntry, StagingError> {
        let blocks = ApiBlocks {
            client: self.client,
            retry_timeout: self.retry_timeout,
        };
        let (entry, report) = self
            .cache
            .stage(pdh, manifest, &blocks)
            .await
            .map_err(|source| StagingError::Cache {
                user: user.to_string(),
                source,
            })?;
        self.log_report(&report);
        if entry.fetched() {
            self.log.info(format!(
                "{user}: fetched collection {pdh} into the node's cache"
            ));
        } else {
            self.log.info(format!(
                "{user}: collection {pdh} is in the node's cache already; not fetching it"
            ));
        }
        Ok(entry)
    }

    fn log_report(&self, report: &StageReport) {
        for pdh in &report.evicted {
            self.log.info(format!(
                "removed collection {pdh} from the node's cache to make room"
            ));
        }
        if let Some(total) = report.over_limit {
            self.log.warn(format!(
                "the node's collection cache holds {total} bytes, more than supervisor.cache_max_bytes, because containers use the other entries"
            ));
        }
    }
}

/// Returns whether `container_image` names a collection: a portable data
/// hash or a collection UUID.
pub fn names_collection(container_image: &str) -> bool {
    is_portable_data_hash(container_image)
        || container_image
            .parse::<Uuid>()
            .is_ok_and(|uuid| uuid.object_type() == Some(ObjectType::Collection))
}

/// Returns the name of the one `*.tar` file at the top of an image
/// collection.
fn image_archive_name(manifest: &Manifest, pdh: &str) -> Result<String, StagingError> {
    let tars: Vec<&str> = manifest
        .files()
        .iter()
        .map(|file| file.path.as_str())
        .filter(|path| !path.contains('/') && path.ends_with(".tar"))
        .collect();
    match tars.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(StagingError::NoImageArchive {
            pdh: pdh.to_string(),
        }),
        several => Err(StagingError::SeveralImageArchives {
            pdh: pdh.to_string(),
            count: several.len(),
            names: several.join(", "),
        }),
    }
}

/// Checks that `path` names a file of the manifest, or for a collection
/// mount a file or directory.
fn check_path(
    manifest: &Manifest,
    path: &str,
    file: bool,
    user: &str,
    pdh: &str,
) -> Result<(), StagingError> {
    if manifest.file(path).is_some() {
        return Ok(());
    }
    if file {
        return Err(StagingError::NotAFile {
            user: user.to_string(),
            path: path.to_string(),
            pdh: pdh.to_string(),
        });
    }
    let prefix = format!("{path}/");
    let is_directory = manifest.directories().contains(path)
        || manifest
            .directories()
            .iter()
            .any(|dir| dir.starts_with(&prefix))
        || manifest
            .files()
            .iter()
            .any(|entry| entry.path.starts_with(&prefix));
    if is_directory {
        Ok(())
    } else {
        Err(StagingError::PathNotFound {
            user: user.to_string(),
            path: path.to_string(),
            pdh: pdh.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::manifest::{ManifestBuilder, Segment};

    fn manifest(paths: &[&str]) -> Manifest {
        let mut builder = ManifestBuilder::new();
        for path in paths {
            builder
                .add_file(
                    path,
                    vec![Segment {
                        locator: Locator::new("d41d8cd98f00b204e9800998ecf8427e", 0).unwrap(),
                        offset: 0,
                        length: 0,
                    }],
                )
                .unwrap();
        }
        builder.finish().unwrap()
    }

    #[test]
    fn image_collection_needs_exactly_one_tar() {
        let pdh = "d41d8cd98f00b204e9800998ecf8427e+0";
        assert_eq!(
            image_archive_name(&manifest(&["busybox.tar", "README"]), pdh).unwrap(),
            "busybox.tar"
        );
        let none = image_archive_name(&manifest(&["README", "sub/x.tar"]), pdh).unwrap_err();
        assert!(
            matches!(none, StagingError::NoImageArchive { .. }),
            "{none}"
        );
        assert!(none.to_string().contains(pdh), "{none}");
        let several = image_archive_name(&manifest(&["a.tar", "b.tar"]), pdh).unwrap_err();
        assert!(
            several.to_string().contains("2 .tar files (a.tar, b.tar)"),
            "{several}"
        );
    }

    #[test]
    fn collection_names_are_recognised() {
        assert!(names_collection("d41d8cd98f00b204e9800998ecf8427e+0"));
        assert!(names_collection("zzzzz-4zz18-0123456789abcde"));
        assert!(!names_collection("zzzzz-dz642-0123456789abcde"));
        assert!(!names_collection("busybox:latest"));
        assert!(!names_collection("/var/lib/berth/images/busybox.tar"));
    }

    #[test]
    fn mount_paths_are_checked_against_the_manifest() {
        let pdh = "d41d8cd98f00b204e9800998ecf8427e+0";
        let manifest = manifest(&["a.txt", "dir/b.txt"]);
        assert!(check_path(&manifest, "a.txt", true, "mount /in", pdh).is_ok());
        assert!(check_path(&manifest, "dir", false, "mount /in", pdh).is_ok());
        let error = check_path(&manifest, "dir", true, "mount /in", pdh).unwrap_err();
        assert!(error.to_string().contains("is not a file"), "{error}");
        let error = check_path(&manifest, "missing", false, "mount /in", pdh).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("\"missing\" is neither a file nor a directory"),
            "{error}"
        );
    }
}
