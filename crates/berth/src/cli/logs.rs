//! `berth logs`.

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct LogsArgs {}

pub async fn execute(_args: LogsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
