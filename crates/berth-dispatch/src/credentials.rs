//! The credentials directory: one file per locked container, containing
//! the secrets its supervisor needs.
//!
//! The dispatcher writes `<dir>/<container uuid>.json` (a
//! [`JobCredentials`], mode 0600) right after it locks the container, and
//! removes it when the container is final or unlocked. The directory is
//! mode 0700. A restarted dispatcher uses the file's presence to tell
//! whether it can still submit a container it had locked. The lock's
//! secrets are shown only once, so without the file only an unlock and a
//! new lock can produce them again.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use berth_client::{CredentialsError, JobCredentials};
use berth_core::records::ContainerCredentials;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to create the credentials directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the credentials directory {path} has mode {mode:o}, so other users may read it: make it mode 0700 (chmod 700 {path})")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error(transparent)]
    Write(#[from] CredentialsError),
    #[error("failed to remove credentials file {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to list the credentials directory {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The credentials directory, and what goes into each file besides the
/// container's own secrets.
#[derive(Debug, Clone)]
pub struct CredentialsStore {
    dir: PathBuf,
    api_url: Url,
    insecure: bool,
}

impl CredentialsStore {
    /// Opens the directory, creating it with mode 0700 when missing. An
    /// existing directory that others may enter is an error, not silently
    /// tightened: it may be shared with something else.
    pub fn open(dir: &Path, api_url: Url, insecure: bool) -> Result<CredentialsStore, StoreError> {
        match std::fs::metadata(dir) {
            Ok(metadata) => {
                if !metadata.is_dir() {
                    return Err(StoreError::NotDirectory {
                        path: dir.to_path_buf(),
                    });
                }
                let mode = metadata.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(StoreError::Permissions {
                        path: dir.to_path_buf(),
                        mode,
                    });
                }
            }
            Err(err) if err.kind() == ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| StoreError::Create {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                // The mode given to mkdir is masked by the umask.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                    |source| StoreError::Create {
                        path: dir.to_path_buf(),
                        source,
                    },
                )?;
            }
            Err(source) => {
                return Err(StoreError::Create {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
        Ok(CredentialsStore {
            dir: dir.to_path_buf(),
            api_url,
            insecure,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the credentials file of one container.
    pub fn path(&self, container_uuid: &str) -> PathBuf {
        self.dir.join(format!("{container_uuid}.json"))
    }

    pub fn exists(&self, container_uuid: &str) -> bool {
        self.path(container_uuid).is_file()
    }

    /// Returns how long ago a container's file was last written, or `None`
    /// when it does not exist. A modification time in the future counts
    /// as just written.
    pub fn age(&self, container_uuid: &str) -> Option<Duration> {
        let metadata = std::fs::metadata(self.path(container_uuid)).ok()?;
        if !metadata.is_file() {
            return None;
        }
        let modified = metadata.modified().ok()?;
        Some(
            SystemTime::now()
                .duration_since(modified)
                .unwrap_or(Duration::ZERO),
        )
    }

    /// Writes a container's file (mode 0600, atomically) and returns its
    /// path.
    pub fn write(
        &self,
        container_uuid: &str,
        credentials: &ContainerCredentials,
    ) -> Result<PathBuf, StoreError> {
        let path = self.path(container_uuid);
        let file = JobCredentials {
            container_uuid: container_uuid.to_string(),
            api_url: self.api_url.clone(),
            insecure: self.insecure,
            api_token: credentials.api_token.clone(),
            gateway_secret: credentials.gateway_secret.clone(),
        };
        file.write(&path)?;
        Ok(path)
    }

    /// Removes a container's file; a file that is already gone is fine.
    pub fn remove(&self, container_uuid: &str) -> Result<(), StoreError> {
        let path = self.path(container_uuid);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Remove { path, source }),
        }
    }

    /// Lists the containers that have a file, and leftover temporary files
    /// from an interrupted write (`<uuid>.tmp`).
    pub fn list(&self) -> Result<(Vec<String>, Vec<PathBuf>), StoreError> {
        let list_error = |source| StoreError::List {
            path: self.dir.clone(),
            source,
        };
        let mut uuids = Vec::new();
        let mut temporary = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(list_error)? {
            let path = entry.map_err(list_error)?.path();
            let (Some(stem), Some(extension)) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            if !berth_core::uuid::is_uuid(stem) {
                continue;
            }
            match extension {
                "json" => uuids.push(stem.to_string()),
                "tmp" => temporary.push(path.clone()),
                _ => {}
            }
        }
        uuids.sort();
        Ok((uuids, temporary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "zzzzz-dz642-000000000000001";

    fn secrets() -> ContainerCredentials {
        ContainerCredentials {
            api_token: format!("v2/zzzzz-gj3su-000000000000002/secret/{UUID}"),
            gateway_secret: "gateway-secret".into(),
        }
    }

    fn url() -> Url {
        Url::parse("http://127.0.0.1:8000/").unwrap()
    }

    #[test]
    fn missing_directory_is_created_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("a/credentials");
        CredentialsStore::open(&dir, url(), false).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn open_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = CredentialsStore::open(dir.path(), url(), false).unwrap_err();
        assert!(err.to_string().contains("mode 755"), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn written_file_is_readable_by_the_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let store = CredentialsStore::open(dir.path(), url(), true).unwrap();
        let path = store.write(UUID, &secrets()).unwrap();
        assert_eq!(path, dir.path().join(format!("{UUID}.json")));
        assert!(store.exists(UUID));
        let read = JobCredentials::read(&path).unwrap();
        assert_eq!(read.container_uuid, UUID);
        assert_eq!(read.api_url, url());
        assert!(read.insecure);
        assert_eq!(read.api_token, secrets().api_token);
        assert_eq!(read.gateway_secret, "gateway-secret");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn remove_is_idempotent_and_list_finds_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let store = CredentialsStore::open(dir.path(), url(), false).unwrap();
        store.write(UUID, &secrets()).unwrap();
        std::fs::write(dir.path().join("zzzzz-dz642-000000000000009.tmp"), "x").unwrap();
        std::fs::write(dir.path().join("notes.json"), "x").unwrap();
        let (uuids, temporary) = store.list().unwrap();
        assert_eq!(uuids, [UUID]);
        assert_eq!(temporary.len(), 1);
        store.remove(UUID).unwrap();
        store.remove(UUID).unwrap();
        assert!(!store.exists(UUID));
    }
}
