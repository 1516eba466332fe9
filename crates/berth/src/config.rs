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

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use berth_core::{ClusterId, Secret};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Five lowercase letters or digits that start every UUID of this
    /// cluster.
    pub cluster_id: ClusterId,
    /// The system token, given inline. Prefer `system_token_file`, which
    /// keeps the secret out of a file that compute nodes may read.
    #[serde(default)]
    pub system_token: Option<Secret>,
    /// A file that contains the system token (surrounding whitespace is ignored).
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
    pub fn system_token(&self) -> anyhow::Result<Secret> {
        match (&self.system_token, &self.system_token_file) {
            (Some(_), Some(_)) => {
                bail!("system_token and system_token_file are both set: keep one")
            }
            (Some(token), None) => Ok(token.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("failed to read system_token_file {}", path.display())
                })?;
                let token = text.trim();
                if token.is_empty() {
                    bail!("system_token_file {} is empty", path.display());
                }
                Ok(Secret::new(token))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
