//! The `berth` command: every Berth process and every user command is a
//! subcommand of this one binary.

mod cli;
mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "berth", version, about = "Run containers on HPC clusters")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API.
    Controller {
        /// Configuration file (YAML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the dispatch loop: lock queued containers and submit their jobs.
    Dispatch {
        /// Configuration file (YAML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one container from Locked to its final state (inside a batch job).
    Supervise(cli::supervise::SuperviseArgs),
    /// Run a controller and a dispatcher in one process, for one host.
    Dev(cli::dev::DevArgs),
    /// Submit a container, follow its logs, and exit with its exit code.
    Run(cli::run::RunArgs),
    /// List your container requests.
    Ls(cli::ls::LsArgs),
    /// Print a container's logs.
    Logs(cli::logs::LogsArgs),
    /// Cancel a container request.
    Cancel(cli::cancel::CancelArgs),
    /// Administrative commands.
    #[command(subcommand)]
    Admin(cli::admin::AdminCommand),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("berth: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::execute(args.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("berth: {err:#}");
            ExitCode::FAILURE
        }
    }
}
