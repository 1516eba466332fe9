//! `berth admin`: administrative commands that act on the store directly.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {}

pub async fn execute(command: AdminCommand) -> anyhow::Result<ExitCode> {
    match command {}
}
