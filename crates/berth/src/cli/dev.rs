//! `berth dev`.

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct DevArgs {}

pub async fn execute(_args: DevArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
