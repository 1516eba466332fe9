//! `berth supervise`: run one container inside its batch job, or deliver
//! the final-state journal (`--deliver-journal`).

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
    #[arg(long, required_unless_present = "deliver_journal")]
    credentials: Option<PathBuf>,
    /// Deliver the final states in the journal (`supervisor.journal_dir`),
    /// each with its container's credentials file, then exit: 0 when the
    /// journal is empty afterwards, 1 when entries remain. For an
    /// administrator, or a cron job or systemd timer on each node.
    #[arg(long, conflicts_with_all = ["credentials", "uuid"])]
    deliver_journal: bool,
    /// The container to run.
    #[arg(required_unless_present = "deliver_journal")]
    uuid: Option<String>,
}

pub async fn execute(args: SuperviseArgs) -> anyhow::Result<ExitCode> {
    super::daemon::init_logging();
    let mut supervisor_config = match &args.config {
        Some(path) => Config::load(path)?.supervisor,
        None => berth_supervisor::Config::default(),
    };
    if args.deliver_journal {
        let remaining = berth_supervisor::deliver_journal(&supervisor_config).await?;
        return Ok(if remaining == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let (Some(credentials_file), Some(uuid)) = (args.credentials, args.uuid) else {
        bail!("give --credentials FILE and the container's UUID, or --deliver-journal");
    };
    let credentials = JobCredentials::read(&credentials_file)?;
    if credentials.container_uuid != uuid {
        bail!(
            "credentials file {} belongs to container {}, not {}",
            credentials_file.display(),
            credentials.container_uuid,
            uuid
        );
    }
    // The journal entry names the file by its absolute path, so a
    // delivery started from another directory finds it.
    let credentials_file = std::path::absolute(&credentials_file).with_context(|| {
        format!(
            "failed to make the credentials file path {} absolute",
            credentials_file.display()
        )
    })?;
    // The gateway's `sftp` subsystem runs this binary's `sftp-server`.
    match berth_supervisor::gateway::SftpServerCommand::current_berth() {
        Ok(command) => supervisor_config.gateway_sftp_server = Some(command),
        Err(error) => tracing::warn!(
            error = %error,
            "the gateway's sftp subsystem is off: failed to find the berth binary's path"
        ),
    }
    let code = berth_supervisor::supervise(supervisor_config, credentials, Some(credentials_file))
        .await
        .with_context(|| format!("failed to supervise container {uuid}"))?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
