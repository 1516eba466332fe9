//! The SFTP server of the gateway's `sftp` subsystem: a process of its
//! own (`berth sftp-server`) that serves SFTP version 3 on stdin and
//! stdout, confined to one container and one user.
//!
//! The gateway starts it for each `sftp` subsystem request, with the host
//! PID of a process in the container and the SSH login user. The process
//! first confines itself (see [`confine`]). It `chroot`s into
//! `/proc/PID/root`, which resolves through the container's mount
//! namespace. It takes the user's supplementary groups, GID and UID from
//! the container's own `/etc/passwd` and `/etc/group`, keeps no more
//! capabilities than the container's bounding set, and enters the user's
//! home. Only
//! after that does it write [`READY_LINE`] to stderr, and the gateway
//! accepts the request only when that line arrives. Every later line on stderr is a
//! message for the supervisor's log. The gateway clears the environment,
//! so nothing of the supervisor's reaches this process.
//!
//! The protocol loop is `russh_sftp::server`, one request at a time; the
//! file operations are in [`handler`].

mod confine;
mod handler;
mod listing;

use std::ffi::OsString;
use std::io;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The line the server writes to stderr once it is confined, before it
/// reads any request.
pub const READY_LINE: &str = "berth-sftp-server: ready";

/// Largest SFTP packet a client may send: a 255 KiB write and its header
/// fit. OpenSSH's `sftp` writes at most 32 KiB per request by default.
const MAX_CLIENT_PACKET_BYTES: u32 = 256 * 1024 + 1024;

/// The server's command-line options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The host PID of a process in the container: its root directory
    /// (`/proc/PID/root`) becomes the server's, and its capability
    /// bounding set bounds the server's capabilities.
    pub pid: u32,
    /// The login user, a name or a numeric UID, looked up in the
    /// container's `/etc/passwd`.
    pub user: String,
}

impl Options {
    /// Parses `--pid PID --user NAME`, the arguments that follow the
    /// program's name.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Options, String> {
        let mut pid = None;
        let mut user = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let slot = match arg.to_str() {
                Some("--pid") => &mut pid,
                Some("--user") => &mut user,
                _ => {
                    return Err(format!(
                        "unknown argument {arg:?}; expected --pid PID --user NAME"
                    ))
                }
            };
            let Some(value) = args.next() else {
                return Err(format!("{arg:?} needs a value"));
            };
            *slot = Some(value);
        }
        let pid = pid.ok_or("missing --pid PID")?;
        let pid = pid
            .to_str()
            .and_then(|pid| pid.parse::<u32>().ok())
            .filter(|pid| *pid > 0)
            .ok_or_else(|| format!("invalid --pid {pid:?}: expected a positive process ID"))?;
        let user = user
            .ok_or("missing --user NAME")?
            .into_string()
            .map_err(|user| format!("invalid --user {user:?}: not UTF-8"))?;
        Ok(Options { pid, user })
    }
}

/// Runs the server: confines the process, then serves SFTP on stdin and
/// stdout until the client closes stdin. Call it before any other thread
/// starts, because `chroot` and the UID change apply to the calling
/// process as it is.
pub fn run(options: &Options) -> ExitCode {
    let confined = match confine::confine(options) {
        Ok(confined) => confined,
        Err(error) => {
            eprintln!("berth sftp-server: {error}");
            return ExitCode::FAILURE;
        }
    };
    for warning in &confined.warnings {
        eprintln!("berth sftp-server: {warning}");
    }
    eprintln!("{READY_LINE}");

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("berth sftp-server: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let handler = handler::FileSystem::new(confined.names);
    runtime.block_on(serve(handler));
    ExitCode::SUCCESS
}

/// Serves SFTP on stdin and stdout until the protocol loop ends.
async fn serve(handler: handler::FileSystem) {
    let (ended, loop_ended) = oneshot::channel();
    let stream = Stdio {
        input: tokio::io::stdin(),
        output: tokio::io::stdout(),
        _ended: ended,
    };
    let config = russh_sftp::server::Config {
        max_client_packet_len: MAX_CLIENT_PACKET_BYTES,
    };
    russh_sftp::server::run_with_config(stream, handler, config).await;
    // The loop runs in a task that drops the stream when it ends, at the
    // client's EOF. Nothing sends on the channel, so only that drop
    // completes the receiver.
    let _ = loop_ended.await;
}

/// Stdin and stdout as one stream. Dropping it drops `_ended`, which
/// wakes [`serve`]: the protocol loop is over.
struct Stdio {
    input: tokio::io::Stdin,
    output: tokio::io::Stdout,
    _ended: oneshot::Sender<()>,
}

impl AsyncRead for Stdio {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.input).poll_read(context, buffer)
    }
}

impl AsyncWrite for Stdio {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.output).poll_write(context, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.output).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.output).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn options_are_parsed() {
        let options = parse(&["--pid", "42", "--user", "nobody"]).unwrap();
        assert_eq!(options.pid, 42);
        assert_eq!(options.user, "nobody");
    }

    #[test]
    fn missing_user_is_an_error() {
        let error = parse(&["--pid", "42"]).unwrap_err();
        assert!(error.contains("--user"), "{error}");
    }

    #[test]
    fn unknown_argument_is_named() {
        let error = parse(&["--pid", "42", "--shell", "sh"]).unwrap_err();
        assert!(error.contains("--shell"), "{error}");
    }

    #[test]
    fn invalid_pid_is_named() {
        for pid in ["0", "-1", "self"] {
            let error = parse(&["--pid", pid, "--user", "root"]).unwrap_err();
            assert!(error.contains(&format!("{pid:?}")), "{error}");
        }
    }

    #[test]
    fn option_without_value_is_an_error() {
        let error = parse(&["--user"]).unwrap_err();
        assert!(error.contains("needs a value"), "{error}");
    }
}
