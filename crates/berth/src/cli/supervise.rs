//! `berth supervise`: run one container inside its batch job.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use berth_client::JobCredentials;
use clap::Args;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// Configuration file; only its `supervisor` section is used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The container's credentials file (mode 0600), written by the dispatcher.
    #[arg(long)]
    credentials: PathBuf,
    /// The container to run.
    uuid: String,
}

pub async fn execute(args: SuperviseArgs) -> anyhow::Result<ExitCode> {
    super::daemon::init_logging();
    let supervisor_config = match &args.config {
        Some(path) => Config::load(path)?.supervisor,
        None => berth_supervisor::Config::default(),
    };
    let credentials = JobCredentials::read(&args.credentials)?;
    if credentials.container_uuid != args.uuid {
        bail!(
            "credentials file {} belongs to container {}, not {}",
            args.credentials.display(),
            credentials.container_uuid,
            args.uuid
        );
    }
    let code = berth_supervisor::supervise(supervisor_config, credentials)
        .await
        .with_context(|| format!("failed to supervise container {}", args.uuid))?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
