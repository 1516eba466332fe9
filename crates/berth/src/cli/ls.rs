//! `berth ls`.

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct LsArgs {}

pub async fn execute(_args: LsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
