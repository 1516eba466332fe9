//! The configuration file: one YAML document with a section per process.
//!
//! ```yaml
//! cluster_id: zzzzz              # prefix of every UUID this cluster makes
//! system_token_file: /etc/berth/system-token
//! controller: { listen: "127.0.0.1:8000", database_url: "sqlite:///var/lib/berth/berth.db" }
//! dispatch: { backend: slurm }
//! supervisor: { docker_host: "unix:///run/podman/podman.sock" }
//! ```
//!
//! Unknown keys are errors, so a misspelt key is found at start-up.

// Unit tests may panic on a failed step.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use berth_core::{ClusterId, Secret};
use serde::Deserialize;

/// The minimum length of the system token, in characters.
pub const MIN_SYSTEM_TOKEN_LEN: usize = 32;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Five lowercase letters or digits that start every UUID of this
    /// cluster.
    pub cluster_id: ClusterId,
    /// The system token, given inline: at least 32 characters. Prefer
    /// `system_token_file`, which keeps the secret out of a file that
    /// compute nodes may read.
    #[serde(default)]
    pub system_token: Option<Secret>,
    /// A file that contains the system token, at least 32 characters
    /// (surrounding whitespace is ignored). Only its owner may have access
    /// to it (mode 0600 or 0400).
    #[serde(default)]
    pub system_token_file: Option<PathBuf>,
    #[serde(default)]
    pub controller: Option<berth_controller::Config>,
    #[serde(default)]
    pub dispatch: Option<berth_dispatch::Config>,
    #[serde(default)]
    pub supervisor: berth_supervisor::Config,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read configuration file {}", path.display()))?;
        serde_yaml::from_str(&text)
            .with_context(|| format!("invalid configuration file {}", path.display()))
    }

    /// Reads the system token from `system_token` or `system_token_file`.
    /// Rejects a file that users other than its owner may access, and a
    /// token shorter than [`MIN_SYSTEM_TOKEN_LEN`].
    pub fn system_token(&self) -> anyhow::Result<Secret> {
        match (&self.system_token, &self.system_token_file) {
            (Some(_), Some(_)) => {
                bail!("system_token and system_token_file are both set: keep one")
            }
            (Some(token), None) => {
                check_token_length(token.expose(), "the system_token setting")?;
                Ok(token.clone())
            }
            (None, Some(path)) => read_system_token_file(path),
            (None, None) => bail!(
                "system_token_file is missing: set it to the file that holds the system token"
            ),
        }
    }

    pub fn controller(&self) -> anyhow::Result<&berth_controller::Config> {
        self.controller
            .as_ref()
            .context("the configuration has no controller section")
    }

    pub fn dispatch(&self) -> anyhow::Result<&berth_dispatch::Config> {
        self.dispatch
            .as_ref()
            .context("the configuration has no dispatch section")
    }
}

fn read_system_token_file(path: &Path) -> anyhow::Result<Secret> {
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("failed to read system_token_file {}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "system_token_file {path} is open to other users (mode {mode:04o}): \
             run `chmod 600 {path}`",
            path = path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read system_token_file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("system_token_file {} is empty", path.display());
    }
    check_token_length(token, &format!("system_token_file {}", path.display()))?;
    Ok(Secret::new(token))
}

/// Checks that a system token has at least [`MIN_SYSTEM_TOKEN_LEN`]
/// characters. `source` names where the token came from.
fn check_token_length(token: &str, source: &str) -> anyhow::Result<()> {
    let length = token.chars().count();
    if length < MIN_SYSTEM_TOKEN_LEN {
        bail!(
            "the system token in {source} is too short: {length} characters, \
             expected at least {MIN_SYSTEM_TOKEN_LEN}; make a new one with \
             `openssl rand -hex 32`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_TOKEN: &str = "0123456789abcdefghijklmnopqrstuvwxyz";

    /// Writes a token file with the given mode and returns a configuration
    /// that names it.
    fn config_with_token_file(dir: &Path, token: &str, mode: u32) -> (Config, PathBuf) {
        let path = dir.join("system-token");
        std::fs::write(&path, format!("{token}\n")).expect("write token file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("set token file mode");
        let config = serde_yaml::from_str(&format!(
            "cluster_id: zzzzz\nsystem_token_file: {}\n",
            path.display()
        ))
        .expect("parse");
        (config, path)
    }

    #[test]
    fn private_token_file_is_read() {
        let dir = tempfile::tempdir().expect("temporary directory");
        for mode in [0o600, 0o400] {
            let (config, _) = config_with_token_file(dir.path(), GOOD_TOKEN, mode);
            let token = config.system_token().expect("token");
            assert_eq!(token.expose(), GOOD_TOKEN);
        }
    }

    #[test]
    fn token_file_open_to_others_is_rejected() {
        let dir = tempfile::tempdir().expect("temporary directory");
        for (mode, shown) in [(0o644, "0644"), (0o640, "0640"), (0o604, "0604")] {
            let (config, path) = config_with_token_file(dir.path(), GOOD_TOKEN, mode);
            let err = config.system_token().unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(&format!("mode {shown}")), "{err}");
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
        }
    }

    #[test]
    fn short_token_in_file_is_rejected() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (config, path) = config_with_token_file(dir.path(), "abcde", 0o600);
        let err = config.system_token().unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("5 characters"), "{err}");
        assert!(err.contains("at least 32"), "{err}");
        assert!(!err.contains("abcde"), "the token stays secret: {err}");
    }

    #[test]
    fn short_inline_token_is_rejected() {
        let config: Config =
            serde_yaml::from_str("cluster_id: zzzzz\nsystem_token: abcde\n").expect("parse");
        let err = config.system_token().unwrap_err().to_string();
        assert!(err.contains("system_token setting"), "{err}");
        assert!(err.contains("at least 32"), "{err}");

        let config: Config =
            serde_yaml::from_str(&format!("cluster_id: zzzzz\nsystem_token: {GOOD_TOKEN}\n"))
                .expect("parse");
        assert_eq!(config.system_token().expect("token").expose(), GOOD_TOKEN);
    }

    /// Every example configuration shipped in docs/examples parses.
    #[test]
    fn shipped_example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
        let mut parsed = 0;
        for entry in std::fs::read_dir(&dir).expect("docs/examples is missing") {
            let path = entry.expect("unreadable entry in docs/examples").path();
            if path.extension().and_then(|e| e.to_str()) != Some("yml") {
                continue;
            }
            let config = Config::load(&path).unwrap_or_else(|err| panic!("{err:#}"));
            assert!(
                config.controller.is_some(),
                "{}: no controller section",
                path.display()
            );
            assert!(
                config.dispatch.is_some(),
                "{}: no dispatch section",
                path.display()
            );
            parsed += 1;
        }
        assert!(
            parsed > 0,
            "no example configuration found in {}",
            dir.display()
        );
    }

    #[test]
    fn misspelt_key_is_rejected_with_its_name() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("config.yml");
        std::fs::write(&path, "cluster_id: zzzzz\nsystem_tokn: x\n").expect("write config");
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("system_tokn"), "{err}");
    }

    #[test]
    fn both_token_settings_are_rejected() {
        let config: Config = serde_yaml::from_str(
            "cluster_id: zzzzz\nsystem_token: a\nsystem_token_file: /nonexistent\n",
        )
        .expect("parse");
        let err = config.system_token().unwrap_err().to_string();
        assert!(err.contains("both set"), "{err}");
    }
}
