//! The supervisor: runs one container from `Locked` to its final state.

use berth_client::JobCredentials;
use serde::Deserialize;

/// The `supervisor` section of the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Docker Engine API socket, such as `unix:///run/podman/podman.sock`;
    /// `DOCKER_HOST` when unset.
    pub docker_host: Option<String>,
}

/// Runs the container the credentials belong to. Returns the process exit
/// status `berth supervise` should end with.
pub async fn supervise(_config: Config, _credentials: JobCredentials) -> anyhow::Result<i32> {
    anyhow::bail!("not built yet")
}
