//! The `sftp` subsystem: a channel served by Berth's own SFTP server
//! process ([`crate::sftp_server`]), so `sftp` and `scp` work in any
//! image, with or without an `sftp-server` of its own.
//!
//! For each request the gateway starts the server program with the PID
//! that [`Runtime::root_pid`](crate::runtime::Runtime::root_pid) returns,
//! whose `/proc/PID/root` is the container's root, and the login user,
//! with an empty environment. It accepts the request only
//! once the server has confined itself and written its ready line on
//! stderr, so a server that cannot start (no root, an unknown user) fails
//! the request and the supervisor's log gets the reason. Then the channel's data
//! goes to the server's stdin and its stdout back to the channel. The
//! server's later stderr lines go to the supervisor's log, never to the
//! client.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use russh::server::Handle;
use russh::ChannelId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::session::ChannelInput;
use super::Gateway;
use crate::logs::SupervisorLog;
use crate::sftp_server::READY_LINE;

/// How long the server may take to confine itself.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of the server's stdout read at once: a few SFTP data packets,
/// so one channel message carries several.
const OUTPUT_BUFFER_BYTES: usize = 256 * 1024;

/// Lines of the server's stderr written to the supervisor's log per
/// session; later lines are counted only.
const MAX_LOGGED_STDERR_LINES: usize = 100;

/// The program and leading arguments that start the SFTP server; the
/// gateway appends `--pid PID --user NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpServerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl SftpServerCommand {
    /// Returns the `berth sftp-server` command of the running `berth`
    /// binary.
    pub fn current_berth() -> std::io::Result<SftpServerCommand> {
        Ok(SftpServerCommand {
            program: std::env::current_exe()?,
            args: vec![OsString::from("sftp-server")],
        })
    }
}

/// A channel's `sftp` subsystem request.
#[derive(Debug)]
pub(super) struct SftpRequest {
    pub channel: ChannelId,
    pub user: String,
    /// The channel's place under the connection's channel limit.
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Starts the server, replies to the subsystem request, and copies the
/// channel's data until the server exits. Then sends its exit status and
/// closes the channel.
pub(super) async fn run_sftp(
    gateway: Gateway,
    handle: Handle,
    request: SftpRequest,
    input: mpsc::Receiver<ChannelInput>,
) {
    let log = gateway.inner.log.clone();
    let channel = request.channel;
    let (mut child, stderr) = match start_server(&gateway, &request.user).await {
        Ok(started) => started,
        Err(message) => {
            log.warn(format!(
                "rejected the sftp subsystem for user {:?}: {message}",
                request.user
            ));
            let _ = handle.channel_failure(channel).await;
            return;
        }
    };
    if handle.channel_success(channel).await.is_err() {
        return;
    }
    gateway.note_session_started();
    log.info(format!("SFTP session started for user {:?}", request.user));
    let stderr_task = tokio::spawn(log_stderr(stderr, log.clone()));

    let copied = copy_streams(&mut child, &handle, channel, input).await;
    let ended = match copied {
        Ok(()) => child.wait().await.ok(),
        Err(()) => {
            // The client is gone; the server's input is closed and it is
            // killed, as sshd ends its sftp-server with the connection.
            let _ = child.kill().await;
            log.info(format!(
                "SFTP session for user {:?} ended: the client disconnected",
                request.user
            ));
            let _ = stderr_task.await;
            return;
        }
    };
    let _ = stderr_task.await;
    let status = ended.and_then(|status| status.code()).unwrap_or(255);
    log.info(format!(
        "SFTP session for user {:?} ended with exit status {status}",
        request.user
    ));
    let _ = handle
        .exit_status_request(channel, u32::try_from(status).unwrap_or(255))
        .await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
    drop(request.permit);
}

/// Starts the server and waits for its ready line. Returns the message
/// for the log when it cannot.
async fn start_server(
    gateway: &Gateway,
    user: &str,
) -> Result<(Child, BufReader<ChildStderr>), String> {
    let Some(command) = gateway.inner.target.sftp_server.as_ref() else {
        return Err(
            "the gateway has no SFTP server program, which only `berth supervise` sets".to_string(),
        );
    };
    // NOTE: the server confines itself with chroot and setuid, which need
    // root; a supervisor that runs as another user cannot serve SFTP.
    let uid = nix::unistd::geteuid();
    if !uid.is_root() {
        return Err(format!(
            "the supervisor runs as UID {uid}, but serving SFTP needs root to chroot into the container"
        ));
    }

    let target = &gateway.inner.target;
    let pid = target
        .runtime
        .root_pid(&target.container)
        .await
        .map_err(|error| error.to_string())?;
    let mut child = Command::new(&command.program)
        .args(&command.args)
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--user")
        .arg(user)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| {
            format!(
                "failed to start the SFTP server {}: {error}",
                command.program.display()
            )
        })?;
    let Some(stderr) = child.stderr.take() else {
        return Err("the SFTP server's stderr is not piped".to_string());
    };

    let (ready, stderr, messages) = wait_until_ready(stderr).await;
    match ready {
        Some(true) => {
            for message in messages {
                gateway.inner.log.warn(message);
            }
            Ok((child, stderr))
        }
        Some(false) => {
            let status = child.wait().await.map(|status| status.to_string());
            Err(format!(
                "the SFTP server exited ({}): {}",
                status.unwrap_or_else(|error| error.to_string()),
                messages.join("; ")
            ))
        }
        None => Err(format!(
            "the SFTP server was not ready within {} s: {}",
            START_TIMEOUT.as_secs(),
            messages.join("; ")
        )),
    }
}

/// Reads the server's stderr until its ready line. Returns whether the
/// line came (`None` after [`START_TIMEOUT`]), the reader, and the lines
/// before it.
async fn wait_until_ready(
    stderr: ChildStderr,
) -> (Option<bool>, BufReader<ChildStderr>, Vec<String>) {
    let mut stderr = BufReader::new(stderr);
    let mut messages = Vec::new();
    let waiting = async {
        let mut line = String::new();
        loop {
            line.clear();
            match stderr.read_line(&mut line).await {
                Ok(0) | Err(_) => return false,
                Ok(_) if line.trim_end() == READY_LINE => return true,
                Ok(_) => messages.push(line.trim_end().to_string()),
            }
        }
    };
    let ready = tokio::time::timeout(START_TIMEOUT, waiting).await.ok();
    (ready, stderr, messages)
}

/// Copies the channel's input to the server's stdin and its stdout to the
/// channel until stdout ends. Returns `Err` when the client went away.
async fn copy_streams(
    child: &mut Child,
    handle: &Handle,
    channel: ChannelId,
    mut input: mpsc::Receiver<ChannelInput>,
) -> Result<(), ()> {
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(());
    };
    let input_task = tokio::spawn(async move {
        while let Some(message) = input.recv().await {
            match message {
                ChannelInput::Data(data) => {
                    if stdin.write_all(&data).await.is_err() {
                        break;
                    }
                }
                ChannelInput::Eof => break,
                ChannelInput::Resize(_) => {}
            }
        }
        // Dropping stdin closes it: the server ends at its input's end.
    });

    let mut buffer = BytesMut::with_capacity(OUTPUT_BUFFER_BYTES);
    let mut result = Ok(());
    loop {
        buffer.reserve(OUTPUT_BUFFER_BYTES);
        match stdout.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let data = buffer.split().freeze();
        if handle.data(channel, data).await.is_err() {
            result = Err(());
            break;
        }
    }
    input_task.abort();
    result
}

/// Writes the server's stderr lines to the supervisor's log, up to
/// [`MAX_LOGGED_STDERR_LINES`], and counts the rest.
async fn log_stderr(stderr: BufReader<ChildStderr>, log: SupervisorLog) {
    let mut lines = stderr.lines();
    let mut count = 0usize;
    while let Ok(Some(line)) = lines.next_line().await {
        count += 1;
        if count <= MAX_LOGGED_STDERR_LINES {
            log.warn(line);
        }
    }
    if count > MAX_LOGGED_STDERR_LINES {
        log.warn(format!(
            "the SFTP server wrote {} more lines to stderr, not logged",
            count - MAX_LOGGED_STDERR_LINES
        ));
    }
}
