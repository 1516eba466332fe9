//! `berth cancel`.

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct CancelArgs {}

pub async fn execute(_args: CancelArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
