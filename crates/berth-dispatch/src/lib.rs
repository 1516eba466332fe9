//! The dispatcher: locks queued containers and runs each as one batch job.

use std::path::PathBuf;

use berth_client::Client;
use berth_core::ClusterId;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The `dispatch` section of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `slurm` or `local`.
    pub backend: String,
    /// The controller's URL, as the dispatcher and the compute nodes reach it.
    pub api_url: String,
    /// Accept a controller certificate that does not verify.
    #[serde(default)]
    pub insecure: bool,
}

/// How jobs start the supervisor: the program and the arguments that come
/// before `supervise`'s own.
#[derive(Debug, Clone)]
pub struct SupervisorCommand {
    /// The `berth` executable, as the compute nodes see it.
    pub program: PathBuf,
    /// The configuration file passed to `berth supervise --config`, if any.
    pub config_file: Option<PathBuf>,
}

/// Runs the dispatch loop until `shutdown` is cancelled.
pub async fn run(
    _cluster_id: ClusterId,
    _client: Client,
    _config: Config,
    _supervisor: SupervisorCommand,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
