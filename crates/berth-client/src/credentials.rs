//! The credentials file that carries a container's secrets from the
//! dispatcher to its supervisor.
//!
//! The dispatcher writes it when it locks a container, readable only by
//! the user the batch job runs as (mode 0600), and passes its path, never
//! its contents, on the supervisor's command line. Secrets therefore never
//! reach argv, the job's environment or a log.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::Url;

use crate::{Settings, Token};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("failed to write credentials file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "credentials file {path} is readable by other users (mode {mode:04o}): it must be mode 0600"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("credentials file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What a supervisor needs to act for its container.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobCredentials {
    /// The container these credentials belong to.
    pub container_uuid: String,
    /// Base URL of the controller.
    pub api_url: Url,
    /// Accept a certificate that does not verify.
    #[serde(default)]
    pub insecure: bool,
    /// The container's own API token.
    pub api_token: String,
    /// The secret the gateway presents when it opens its tunnel.
    pub gateway_secret: String,
}

impl fmt::Debug for JobCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobCredentials")
            .field("container_uuid", &self.container_uuid)
            .field("api_url", &self.api_url.as_str())
            .field("insecure", &self.insecure)
            .field("api_token", &"<redacted>")
            .field("gateway_secret", &"<redacted>")
            .finish()
    }
}

impl JobCredentials {
    /// Client settings that act with the container's token.
    pub fn settings(&self) -> Settings {
        Settings {
            base_url: self.api_url.clone(),
            token: Token::new(self.api_token.clone()),
            insecure: self.insecure,
        }
    }

    /// Writes the file with mode 0600. The file is written under a
    /// temporary name and renamed, so a reader never sees half of it.
    pub fn write(&self, path: &Path) -> Result<(), CredentialsError> {
        let write_error = |source| CredentialsError::Write {
            path: path.to_path_buf(),
            source,
        };
        let temporary = path.with_extension("tmp");
        let text = serde_json::to_vec(self).map_err(|err| write_error(err.into()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(write_error)?;
        // The mode given to open() applies only when the file is new.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write_error)?;
        file.write_all(&text).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        std::fs::rename(&temporary, path).map_err(write_error)
    }

    /// Reads the file, refusing one that other users can read.
    pub fn read(path: &Path) -> Result<JobCredentials, CredentialsError> {
        let read_error = |source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read(path).map_err(read_error)?;
        serde_json::from_slice(&text).map_err(|source| CredentialsError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JobCredentials {
        JobCredentials {
            container_uuid: "zzzzz-dz642-0123456789abcde".into(),
            api_url: Url::parse("http://127.0.0.1:1/").unwrap(),
            insecure: false,
            api_token: "v2/zzzzz-gj3su-0123456789abcde/secret/zzzzz-dz642-0123456789abcde".into(),
            gateway_secret: "gateway".into(),
        }
    }

    #[test]
    fn round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        sample().write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(JobCredentials::read(&path).unwrap(), sample());
    }

    #[test]
    fn world_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        sample().write(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = JobCredentials::read(&path).unwrap_err();
        assert!(err.to_string().contains("(mode 0644)"), "{err}");
        assert!(err.to_string().contains("0600"), "{err}");
    }

    #[test]
    fn debug_hides_secrets() {
        let shown = format!("{:?}", sample());
        assert!(!shown.contains("secret/"), "{shown}");
        assert!(!shown.contains("gateway\""), "{shown}");
    }
}
