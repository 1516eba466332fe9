//! The subcommands. Each module holds one subcommand's arguments and its
//! body; `execute` routes to them.

// Unit tests may panic on a failed step.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod api;
pub mod cancel;
pub mod daemon;
pub mod data_dir;
pub mod dev;
pub mod follow;
pub mod get;
pub mod logs;
pub mod ls;
pub mod put;
pub mod run;
pub mod shell;
pub mod supervise;
pub mod watch;

use std::process::ExitCode;

use crate::Command;

pub async fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Controller { config } => daemon::controller(&config).await,
        Command::Dispatch { config } => daemon::dispatch(&config).await,
        Command::Supervise(args) => supervise::execute(args).await,
        Command::Dev(args) => dev::execute(args).await,
        Command::Run(args) => run::execute(args).await,
        Command::Ls(args) => ls::execute(args).await,
        Command::Logs(args) => logs::execute(args).await,
        Command::Cancel(args) => cancel::execute(args).await,
        Command::Put(args) => put::execute(args).await,
        Command::Get(args) => get::execute(args).await,
        Command::Shell(args) => shell::execute_shell(args).await,
        Command::SshProxy(args) => shell::execute_proxy(args).await,
        Command::SshConfig(args) => shell::execute_config(args),
        Command::Admin(command) => admin::execute(command).await,
        Command::SftpServer { .. } => {
            anyhow::bail!("berth sftp-server must run before the async runtime starts")
        }
    }
}
