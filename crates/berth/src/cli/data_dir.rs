//! The data directory of `berth dev` and its private files.
//!
//! [`DataDir`] names each file the directory contains; the table in the
//! `dev` module describes each one. Secrets (the system token and
//! the dev user's token) are made here from the kernel's random source and
//! written with mode 0600, whole or not at all.
//!
//! One process at a time owns a data directory: [`DataDir::open`] takes an
//! exclusive `flock` on its `.lock` file before it changes anything there,
//! and the lock lasts as long as the [`DataDir`]. The kernel releases it
//! when the process ends, however it ends, so a lock file left behind
//! blocks no later start.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use berth_core::{ClusterId, Secret};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Length of a generated system token, in characters.
const SYSTEM_TOKEN_LEN: usize = 50;

// The controller and the dispatcher reject shorter system tokens.
const _: () = assert!(SYSTEM_TOKEN_LEN >= crate::config::MIN_SYSTEM_TOKEN_LEN);

/// Name of the file in the data directory that the running `berth dev`
/// holds a lock on.
const LOCK_FILE_NAME: &str = ".lock";

/// The names the self-signed certificate is made for.
const TLS_NAMES: [&str; 3] = ["127.0.0.1", "::1", "localhost"];

/// The subject of the self-signed certificate.
const TLS_COMMON_NAME: &str = "berth dev";

/// Characters of generated tokens and cluster ids.
const ALPHANUMERIC: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// The data directory, locked for this process, and the paths of its
/// files.
#[derive(Debug)]
pub(super) struct DataDir {
    /// Absolute path, because jobs and the database URL need one.
    pub(super) root: PathBuf,
    /// The lock on `.lock`, released when the `DataDir` is dropped.
    _lock: Flock<File>,
}

impl DataDir {
    /// Creates the directory (mode 0700) if missing, locks it, and creates
    /// its `credentials` and `logs` subdirectories. Fails when another
    /// process holds the lock.
    pub(super) fn open(path: &Path) -> anyhow::Result<DataDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("failed to create the data directory {}", path.display()))?;
        let root = std::fs::canonicalize(path)
            .with_context(|| format!("failed to resolve the data directory {}", path.display()))?;
        let mode = std::fs::metadata(&root)
            .with_context(|| format!("failed to read the data directory {}", root.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                data_dir = %root.display(),
                mode = format!("{:04o}", mode & 0o777),
                "the data directory is open to other users; `chmod 700` it to keep them out"
            );
        }
        let lock = lock_data_dir(&root)?;
        let dir = DataDir { root, _lock: lock };
        for subdir in [dir.credentials_dir(), dir.logs_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&subdir)
                .with_context(|| format!("failed to create {}", subdir.display()))?;
        }
        Ok(dir)
    }

    pub(super) fn system_token_file(&self) -> PathBuf {
        self.root.join("system-token")
    }

    pub(super) fn user_token_file(&self) -> PathBuf {
        self.root.join("user-token")
    }

    pub(super) fn database_file(&self) -> PathBuf {
        self.root.join("berth.db")
    }

    pub(super) fn config_file(&self) -> PathBuf {
        self.root.join("config.yml")
    }

    pub(super) fn credentials_dir(&self) -> PathBuf {
        self.root.join("credentials")
    }

    pub(super) fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub(super) fn env_file(&self) -> PathBuf {
        self.root.join("env")
    }

    pub(super) fn tls_certificate_file(&self) -> PathBuf {
        self.root.join("tls-certificate.pem")
    }

    pub(super) fn tls_key_file(&self) -> PathBuf {
        self.root.join("tls-key.pem")
    }

    /// Returns the paths of the API's self-signed certificate and key,
    /// made on the first run (or when either file is missing) for
    /// 127.0.0.1, ::1 and localhost, both with mode 0600.
    pub(super) fn tls_pair(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let certificate = self.tls_certificate_file();
        let key = self.tls_key_file();
        let exists = |path: &Path| {
            path.try_exists()
                .with_context(|| format!("failed to read {}", path.display()))
        };
        if !(exists(&certificate)? && exists(&key)?) {
            let pair = berth_controller::tls::self_signed(&TLS_NAMES, TLS_COMMON_NAME)?;
            // The key first: a certificate without its key is never left.
            write_private_file(&key, pair.key_pem.as_bytes())?;
            write_private_file(&certificate, pair.certificate_pem.as_bytes())?;
            tracing::info!(
                certificate = %certificate.display(),
                names = ?TLS_NAMES,
                "made a self-signed certificate for the API"
            );
        }
        Ok((certificate, key))
    }

    /// Returns the database URL, with the characters that URLs reserve in a path
    /// (`%`, `?`, `#`) percent-encoded.
    pub(super) fn database_url(&self) -> anyhow::Result<String> {
        let path = utf8(&self.database_file())?.to_string();
        let encoded = path
            .replace('%', "%25")
            .replace('?', "%3F")
            .replace('#', "%23");
        Ok(format!("sqlite://{encoded}"))
    }

    /// Reads the system token, or makes it on the first run.
    pub(super) fn system_token(&self) -> anyhow::Result<Secret> {
        let path = self.system_token_file();
        if let Some(token) = read_token_file(&path)? {
            return Ok(Secret::new(token));
        }
        let token = random_string(SYSTEM_TOKEN_LEN)?;
        write_private_file(&path, format!("{token}\n").as_bytes())?;
        Ok(Secret::new(token))
    }

    /// Reads the cluster id of an earlier run from `config.yml`, or makes a
    /// new one.
    pub(super) fn cluster_id(&self) -> anyhow::Result<ClusterId> {
        let path = self.config_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return new_cluster_id(),
            Err(err) => {
                return Err(err).with_context(|| format!("failed to read {}", path.display()))
            }
        };
        let value: serde_yaml::Value = serde_yaml::from_str(&text)
            .with_context(|| format!("invalid configuration file {}", path.display()))?;
        let id = value
            .get("cluster_id")
            .and_then(serde_yaml::Value::as_str)
            .with_context(|| {
                format!(
                    "{} has no cluster_id; remove the file to get a new cluster id",
                    path.display()
                )
            })?;
        id.parse()
            .with_context(|| format!("invalid cluster_id in {}", path.display()))
    }
}

/// Takes the exclusive lock on a data directory's `.lock` file, without
/// waiting. When another process holds it, the error names the directory
/// and the API address from that process's `env` file, if it has one.
fn lock_data_dir(root: &Path) -> anyhow::Result<Flock<File>> {
    let path = root.join(LOCK_FILE_NAME);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("failed to open the lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => {
            let serving = match api_host_in_env_file(&root.join("env")) {
                Some(url) => format!(", which serves the API at {url}"),
                None => String::new(),
            };
            bail!(
                "the data directory {} is in use by another `berth dev`{serving}: \
                 stop that one first, or give this one another --data-dir",
                root.display()
            )
        }
        Err((_, errno)) => Err(anyhow::Error::new(errno))
            .with_context(|| format!("failed to lock {}", path.display())),
    }
}

/// Reads the value of `BERTH_API_HOST` from an `env` file that `berth dev`
/// wrote, if the file exists and has that line.
fn api_host_in_env_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix("export BERTH_API_HOST="))?;
    // The file quotes only values with characters special to the shell,
    // which an address does not have. Strip simple quotes all the same.
    let value = value
        .strip_prefix('\'')
        .and_then(|rest| rest.strip_suffix('\''))
        .unwrap_or(value);
    Some(value.to_string())
}

/// Writes a file readable only by its owner (mode 0600), under a temporary
/// name first and then renamed, so that a reader never sees half of it.
pub(super) fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);

    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        // The mode given to open() applies only to a new file.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    };
    write().with_context(|| format!("failed to write {}", path.display()))
}

/// Reads a token file, if it exists. A file that other users may read is an
/// error, as is an empty one.
pub(super) fn read_token_file(path: &Path) -> anyhow::Result<Option<String>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("failed to read {}", path.display())),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} is open to other users (mode {mode:04o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!(
            "{} is empty: remove it and start again to get a new token",
            path.display()
        );
    }
    Ok(Some(token.to_string()))
}

pub(super) fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("failed to remove {}", path.display())),
    }
}

pub(super) fn utf8(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| {
        format!(
            "path {} is not valid UTF-8: choose another --data-dir",
            path.display()
        )
    })
}

/// Makes a new cluster id: a letter, then four letters or digits, so that
/// it never reads as a number.
fn new_cluster_id() -> anyhow::Result<ClusterId> {
    let letters = &ALPHANUMERIC[10..];
    let first = random_from(letters, 1)?;
    let rest = random_from(ALPHANUMERIC, 4)?;
    Ok(format!("{first}{rest}").parse()?)
}

fn random_string(len: usize) -> anyhow::Result<String> {
    random_from(ALPHANUMERIC, len)
}

/// `len` characters drawn uniformly from `alphabet`, from the kernel's
/// random source. Bytes that would bias the draw are skipped.
fn random_from(alphabet: &[u8], len: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let limit = 256 - 256 % alphabet.len();
    let mut source = std::fs::File::open("/dev/urandom").context("failed to open /dev/urandom")?;
    let mut text = String::with_capacity(len);
    let mut buffer = [0u8; 64];
    while text.len() < len {
        source
            .read_exact(&mut buffer)
            .context("failed to read /dev/urandom")?;
        for byte in buffer {
            if text.len() < len && usize::from(byte) < limit {
                text.push(char::from(alphabet[usize::from(byte) % alphabet.len()]));
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_token_is_made_once_and_kept() {
        let parent = tempfile::tempdir().unwrap();
        let dir = DataDir::open(&parent.path().join("data")).unwrap();
        let mode = std::fs::metadata(&dir.root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let first = dir.system_token().unwrap();
        assert_eq!(first.expose().len(), SYSTEM_TOKEN_LEN);
        let second = dir.system_token().unwrap();
        assert_eq!(first.expose(), second.expose());
        let mode = std::fs::metadata(dir.system_token_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn tls_pair_is_made_once_and_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = DataDir::open(&parent.path().join("data")).unwrap();
        let (certificate, key) = dir.tls_pair().unwrap();
        for path in [&certificate, &key] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let first = std::fs::read_to_string(&certificate).unwrap();
        assert!(first.starts_with("-----BEGIN CERTIFICATE-----"), "{first}");
        berth_controller::tls::load_server_config(&certificate, &key).unwrap();

        assert_eq!(dir.tls_pair().unwrap(), (certificate.clone(), key.clone()));
        assert_eq!(
            std::fs::read_to_string(&certificate).unwrap(),
            first,
            "kept"
        );

        std::fs::remove_file(&key).unwrap();
        dir.tls_pair().unwrap();
        assert_ne!(
            std::fs::read_to_string(&certificate).unwrap(),
            first,
            "a pair missing its key is made again"
        );
        berth_controller::tls::load_server_config(&certificate, &key).unwrap();
    }

    #[test]
    fn token_file_open_to_others_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user-token");
        std::fs::write(&path, "token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains("mode 0644"), "{err}");
    }

    #[test]
    fn database_url_encodes_reserved_characters() {
        let parent = tempfile::tempdir().unwrap();
        let dir = DataDir::open(&parent.path().join("50%?#")).unwrap();
        let parent = std::fs::canonicalize(parent.path()).unwrap();
        assert_eq!(
            dir.database_url().unwrap(),
            format!("sqlite://{}/50%25%3F%23/berth.db", parent.display())
        );
    }

    #[test]
    fn second_open_of_a_locked_dir_fails() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("data");
        let first = DataDir::open(&path).unwrap();

        let err = format!("{:#}", DataDir::open(&path).unwrap_err());
        assert!(err.contains(&first.root.display().to_string()), "{err}");
        assert!(err.contains("in use by another `berth dev`"), "{err}");
        assert!(!err.contains("serves the API"), "no env file yet: {err}");

        std::fs::write(
            first.env_file(),
            "export BERTH_API_HOST=http://127.0.0.1:41234\nexport BERTH_API_TOKEN=t\n",
        )
        .unwrap();
        let err = format!("{:#}", DataDir::open(&path).unwrap_err());
        assert!(
            err.contains("serves the API at http://127.0.0.1:41234"),
            "{err}"
        );

        drop(first);
        let again = DataDir::open(&path).unwrap();
        let mode = std::fs::metadata(again.root.join(LOCK_FILE_NAME))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn locked_dir_is_left_untouched() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("data");
        let first = DataDir::open(&path).unwrap();
        std::fs::remove_dir(first.logs_dir()).unwrap();

        DataDir::open(&path).unwrap_err();
        assert!(
            !first.logs_dir().exists(),
            "the second open made no subdirectory"
        );
    }

    #[test]
    fn quoted_api_host_is_unquoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        std::fs::write(&path, "export BERTH_API_HOST='http://[::1]:8000'\n").unwrap();
        assert_eq!(
            api_host_in_env_file(&path).as_deref(),
            Some("http://[::1]:8000")
        );
        assert_eq!(api_host_in_env_file(&dir.path().join("missing")), None);
    }

    #[test]
    fn new_cluster_id_starts_with_letter() {
        for _ in 0..50 {
            let id = new_cluster_id().unwrap();
            assert!(
                id.as_str().starts_with(|c: char| c.is_ascii_lowercase()),
                "{id}"
            );
        }
    }
}
