//! The `berth` command: every Berth process and every user command is a
//! subcommand of this one binary.

mod cli;
mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc instead of glibc's malloc. With 10,000 tunnels open, a
/// controller's median API latency rose from 0.44 to 0.68 ms with glibc's
/// malloc and from 0.42 to 0.47 ms with jemalloc, and each tunnel took 22
/// KiB instead of 26 (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Upload files and directories as a new collection; print its UUID and
    /// portable data hash.
    Put(cli::put::PutArgs),
    /// Download a collection, or one file or directory of it.
    Get(cli::get::GetArgs),
    /// Open a shell in a running container, or run a command in it,
    /// through the system ssh.
    Shell(cli::shell::ShellArgs),
    /// Connect stdin and stdout to a container's SSH gateway; the
    /// ProxyCommand of `berth shell` and `berth ssh-config`.
    SshProxy(cli::shell::SshProxyArgs),
    /// Print an OpenSSH configuration snippet for `ssh UUID.berth`, scp,
    /// sftp and port forwarding.
    SshConfig(cli::shell::SshConfigArgs),
    /// Administrative commands.
    #[command(subcommand)]
    Admin(cli::admin::AdminCommand),
    /// Serve SFTP on stdin and stdout inside a container, as a user; the
    /// SSH gateway runs it for the `sftp` subsystem.
    #[command(hide = true)]
    SftpServer {
        /// The host PID of a process in the container, whose root
        /// directory (`/proc/PID/root`) the server chroots into.
        #[arg(long)]
        pid: u32,
        /// The login user, a name or UID in the container's /etc/passwd.
        #[arg(long)]
        user: String,
    },
}

/// How long the end of a command waits for blocking tasks, such as a read
/// of stdin, before the process exits without them.
const RUNTIME_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let args = Args::parse();
    // The SFTP server changes its root and user, which must happen
    // before any thread of the async runtime exists.
    if let Command::SftpServer { pid, user } = args.command {
        return berth_supervisor::sftp_server::run(&berth_supervisor::sftp_server::Options {
            pid,
            user,
        });
    }
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
    let code = match runtime.block_on(cli::execute(args.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("berth: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    };
    // A read of stdin (as `ssh-proxy` does) runs on a blocking thread that
    // nothing can cancel, and dropping the runtime would wait for it until
    // stdin ends.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    code
}

/// Formats an error with its causes, `outer: cause: root cause`, printing
/// each text once. Library errors often repeat their source in their own
/// message, and a context often repeats the error it wraps, so `{:#}`
/// would print such text twice.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.is_empty() || text.contains(message.as_str()) {
            message = text;
        } else if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to read {path}: {source}")]
    struct ReadError {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn error_chain_prints_repeated_cause_once() {
        let inner = ReadError {
            path: "/nonexistent".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        let err = anyhow::Error::new(inner).context("failed to load the credentials");
        assert_eq!(
            error_chain(&err),
            "failed to load the credentials: failed to read /nonexistent: no such file"
        );
    }

    #[test]
    fn error_chain_drops_context_the_cause_repeats() {
        let err = anyhow::anyhow!("failed to create user \"mallory\": it already exists")
            .context("failed to create user \"mallory\"");
        assert_eq!(
            error_chain(&err),
            "failed to create user \"mallory\": it already exists"
        );
    }

    #[test]
    fn error_chain_keeps_distinct_causes() {
        let err = anyhow::anyhow!("root cause")
            .context("middle")
            .context("outer");
        assert_eq!(error_chain(&err), "outer: middle: root cause");
    }
}
