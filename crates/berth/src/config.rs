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
    /// A file holding the system token (surrounding whitespace ignored).
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

    /// The system token, from `system_token` or `system_token_file`.
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
            (None, None) => bail!("system_token_file is not set: give the file that holds the system token"),
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
