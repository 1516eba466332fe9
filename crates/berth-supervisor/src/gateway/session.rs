//! One session: a process started in the container for a channel's
//! `shell` or `exec` request, with its input, output and exit status
//! carried over the channel.
//!
//! The session task starts the exec, then copies the exec's output to the
//! channel (stderr as extended data, chunks that are ready at once joined
//! into one message) while an input task writes the client's data to the
//! exec's stdin, closes it on the client's EOF and resizes the terminal.
//! When the output ends, the exit status goes to the client
//! (`exit-status`, or `exit-signal`), then EOF and close. A failure to
//! start is written to the channel's stderr with status 255, the status
//! OpenSSH's client reports for its own errors.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures::stream::Peekable;
use futures::{FutureExt, StreamExt};
use russh::server::Handle;
use russh::{ChannelId, Sig};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::user::{find_user, LoginUser};
use super::Gateway;
use crate::runtime::exec::{ExecControl, ExecExit, ExecSpec, TerminalSize};
use crate::runtime::{OutputChunk, OutputStream, StdStream};

/// The extended data type of stderr (RFC 4254, section 5.2).
const SSH_EXTENDED_DATA_STDERR: u32 = 1;

/// Largest `/etc/passwd` the gateway reads.
const MAX_PASSWD_BYTES: u64 = 4 << 20;

/// The exit status sent when the session could not start.
const START_FAILED_STATUS: u32 = 255;

/// Max output bytes joined into one message to the SSH session. The
/// session splits a message into packets of at most the client's maximum
/// packet size (32 KiB for OpenSSH).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Input from the client to a running session.
#[derive(Debug)]
pub(super) enum ChannelInput {
    Data(Bytes),
    Eof,
    Resize(TerminalSize),
}

/// A channel's `shell` or `exec` request.
#[derive(Debug)]
pub(super) struct SessionRequest {
    pub channel: ChannelId,
    pub user: String,
    /// The `exec` request's command, or `None` for a shell.
    pub command: Option<String>,
    /// The terminal type and size of the channel's `pty-req`.
    pub terminal: Option<(String, TerminalSize)>,
    /// The channel's place under the connection's channel limit.
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Runs the request's session to its end and closes the channel.
pub(super) async fn run_session(
    gateway: Gateway,
    handle: Handle,
    request: SessionRequest,
    input: mpsc::Receiver<ChannelInput>,
) {
    let channel = request.channel;
    // Only the program's name and the command's length are logged: the
    // arguments may hold a secret the user typed.
    let description = match &request.command {
        Some(command) => format!(
            "command {:?} ({} bytes)",
            command.split_whitespace().next().unwrap_or(""),
            command.len()
        ),
        None => "a shell".to_string(),
    };
    let log = gateway.inner.log.clone();
    let terminal = if request.terminal.is_some() {
        " with a terminal"
    } else {
        ""
    };
    log.info(format!(
        "SSH session started for user {:?}: {description}{terminal}",
        request.user
    ));

    let exit = match start_and_copy(&gateway, &handle, &request, input).await {
        Ok(Some(exit)) => exit,
        Ok(None) => {
            log.info(format!(
                "SSH session for user {:?} ended: the client disconnected while it ran: {description}",
                request.user
            ));
            drop(request.permit);
            return;
        }
        Err(message) => {
            let text = format!("berth gateway: {message}\r\n");
            let _ = handle
                .extended_data(channel, SSH_EXTENDED_DATA_STDERR, Bytes::from(text))
                .await;
            log.warn(format!(
                "SSH session for user {:?} failed to start: {message}",
                request.user
            ));
            ExecExit::Status(START_FAILED_STATUS)
        }
    };
    match &exit {
        ExecExit::Status(status) => {
            log.info(format!(
                "SSH session for user {:?} ended with exit status {status}: {description}",
                request.user
            ));
            let _ = handle.exit_status_request(channel, *status).await;
        }
        ExecExit::Signal(signal) => {
            log.info(format!(
                "SSH session for user {:?} ended by signal {signal}: {description}",
                request.user
            ));
            let _ = handle
                .exit_signal_request(
                    channel,
                    Sig::Custom(signal.clone()),
                    false,
                    String::new(),
                    String::new(),
                )
                .await;
        }
    }
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
    drop(request.permit);
}

/// Starts the exec and copies its streams until its output ends. Returns
/// how it ended, `None` when the client disconnected first, or the
/// message for the client when it could not start.
async fn start_and_copy(
    gateway: &Gateway,
    handle: &Handle,
    request: &SessionRequest,
    mut input: mpsc::Receiver<ChannelInput>,
) -> Result<Option<ExecExit>, String> {
    let target = &gateway.inner.target;
    let passwd = target
        .runtime
        .read_file(&target.container, "/etc/passwd", MAX_PASSWD_BYTES)
        .await
        .map_err(|error| error.to_string())?;
    let passwd = passwd.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let user = find_user(passwd.as_deref(), &request.user).map_err(|error| error.to_string())?;
    let spec = exec_spec(gateway, request, &user);
    let process = target
        .runtime
        .exec(&target.container, &spec)
        .await
        .map_err(|error| error.to_string())?;

    let control = process.control.clone();
    let mut stdin = Some(process.stdin);
    let input_control = control.clone();
    // The task ends when the channel does: the client closed it or went
    // away.
    let mut input_task = tokio::spawn(async move {
        while let Some(message) = input.recv().await {
            match message {
                ChannelInput::Data(data) => {
                    // Data after the client's EOF has nowhere to go.
                    let Some(writer) = stdin.as_mut() else {
                        continue;
                    };
                    if writer.write_all(&data).await.is_err() {
                        // The process closed its stdin; later data has
                        // nowhere to go.
                        stdin = None;
                        continue;
                    }
                    let _ = writer.flush().await;
                }
                ChannelInput::Eof => {
                    // Shutting down half-closes a socket (Docker's exec),
                    // but a pipe (crun's exec) closes only when dropped.
                    if let Some(mut writer) = stdin.take() {
                        let _ = writer.shutdown().await;
                    }
                }
                ChannelInput::Resize(size) => resize(input_control.as_ref(), size).await,
            }
        }
    });

    let channel = request.channel;
    let mut output = process.output.peekable();
    let mut client_gone = false;
    loop {
        let next = tokio::select! {
            next = output.next() => next,
            _ = &mut input_task => {
                client_gone = true;
                break;
            }
        };
        let Some(chunk) = next else {
            break;
        };
        let chunk = match chunk {
            Ok(chunk) => join_ready(chunk, &mut output),
            Err(error) => {
                gateway.inner.log.warn(format!(
                    "failed to read the output of an SSH session: {error}"
                ));
                break;
            }
        };
        let sent = match chunk.stream {
            StdStream::Stdout => handle.data(channel, chunk.data).await,
            StdStream::Stderr => {
                handle
                    .extended_data(channel, SSH_EXTENDED_DATA_STDERR, chunk.data)
                    .await
            }
        };
        if sent.is_err() {
            client_gone = true;
            break;
        }
    }
    if client_gone {
        // NOTE: the Engine API cannot signal an exec's process, so there a
        // process whose client went away runs on until it ends.
        control.hang_up().await;
    }
    drop(output);
    input_task.abort();
    if client_gone {
        return Ok(None);
    }
    control
        .wait()
        .await
        .map(Some)
        .map_err(|error| error.to_string())
}

/// Appends to `chunk` the chunks of the same stream that `output` has
/// ready now, up to [`MAX_MESSAGE_BYTES`] in all. Fewer, larger messages
/// to the SSH session mean fewer, larger SSH packets and tunnel writes
/// when the runtime delivers small reads (8 KiB frames from Podman's exec
/// API, 4 KiB terminal reads). It never waits for more output.
fn join_ready(chunk: OutputChunk, output: &mut Peekable<OutputStream>) -> OutputChunk {
    let stream = chunk.stream;
    let mut joined: Option<BytesMut> = None;
    let mut length = chunk.data.len();
    loop {
        let next = Pin::new(&mut *output)
            .next_if(|item| {
                matches!(item, Ok(next) if next.stream == stream
                    && length + next.data.len() <= MAX_MESSAGE_BYTES)
            })
            .now_or_never();
        let Some(Some(Ok(next))) = next else {
            break;
        };
        length += next.data.len();
        joined
            .get_or_insert_with(|| {
                let mut buffer = BytesMut::with_capacity(MAX_MESSAGE_BYTES);
                buffer.extend_from_slice(&chunk.data);
                buffer
            })
            .extend_from_slice(&next.data);
    }
    match joined {
        Some(buffer) => OutputChunk {
            stream,
            data: buffer.freeze(),
        },
        None => chunk,
    }
}

async fn resize(control: &dyn ExecControl, size: TerminalSize) {
    if let Err(error) = control.resize(size).await {
        tracing::warn!(error = %error, "failed to resize an SSH session's terminal");
    }
}

/// Builds the exec of a request: `exec` runs the command through
/// `/bin/sh -c`, as OpenSSH's sshd runs it through a shell, and `shell`
/// runs the user's shell from `/etc/passwd`. The environment is the
/// container record's, then `HOME`, `USER` and `LOGNAME` of the login
/// user as sshd sets them, then `TERM` for a terminal. The supervisor's
/// own environment never reaches it.
fn exec_spec(gateway: &Gateway, request: &SessionRequest, user: &LoginUser) -> ExecSpec {
    let target = &gateway.inner.target;
    let argv = match &request.command {
        Some(command) => vec!["/bin/sh".to_string(), "-c".to_string(), command.clone()],
        None => vec![user.shell.clone()],
    };
    let mut env = target.env.clone();
    let login_name = user
        .exec
        .name
        .clone()
        .unwrap_or_else(|| user.exec.uid.to_string());
    env.push(format!("HOME={}", user.home));
    env.push(format!("USER={login_name}"));
    env.push(format!("LOGNAME={login_name}"));
    if let Some((term, _)) = &request.terminal {
        env.push(format!("TERM={term}"));
    }
    ExecSpec {
        argv,
        user: user.exec.clone(),
        env,
        working_dir: target.working_dir.clone(),
        terminal: request.terminal.as_ref().map(|(_, size)| *size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeError;

    fn chunk(stream: StdStream, data: &[u8]) -> Result<OutputChunk, RuntimeError> {
        Ok(OutputChunk {
            stream,
            data: Bytes::copy_from_slice(data),
        })
    }

    /// Runs `join_ready` over `items` until the stream ends and returns
    /// the chunks it produced.
    fn join_all(items: Vec<Result<OutputChunk, RuntimeError>>) -> Vec<OutputChunk> {
        let mut output = futures::stream::iter(items).boxed().peekable();
        let mut joined = Vec::new();
        while let Some(Some(item)) = output.next().now_or_never() {
            joined.push(join_ready(item.unwrap(), &mut output));
        }
        joined
    }

    #[test]
    fn join_ready_keeps_streams_apart_and_in_order() {
        let joined = join_all(vec![
            chunk(StdStream::Stdout, b"a"),
            chunk(StdStream::Stdout, b"b"),
            chunk(StdStream::Stderr, b"c"),
            chunk(StdStream::Stdout, b"d"),
            chunk(StdStream::Stdout, b"e"),
        ]);
        let expected = vec![
            (StdStream::Stdout, &b"ab"[..]),
            (StdStream::Stderr, &b"c"[..]),
            (StdStream::Stdout, &b"de"[..]),
        ];
        let joined: Vec<_> = joined
            .iter()
            .map(|chunk| (chunk.stream, &chunk.data[..]))
            .collect();
        assert_eq!(joined, expected);
    }

    #[test]
    fn join_ready_stops_at_the_message_limit() {
        let part = vec![7u8; MAX_MESSAGE_BYTES / 2 + 1];
        let joined = join_all(vec![
            chunk(StdStream::Stdout, &part),
            chunk(StdStream::Stdout, &part),
            chunk(StdStream::Stdout, b"x"),
        ]);
        let lengths: Vec<usize> = joined.iter().map(|chunk| chunk.data.len()).collect();
        assert_eq!(lengths, vec![part.len(), part.len() + 1]);
    }

    #[test]
    fn join_ready_leaves_errors_unread() {
        let mut output = futures::stream::iter(vec![
            chunk(StdStream::Stdout, b"a"),
            chunk(StdStream::Stdout, b"b"),
            Err(RuntimeError::NotRunning {
                container: "c".to_string(),
            }),
        ])
        .boxed()
        .peekable();
        let first = output.next().now_or_never().flatten().unwrap().unwrap();
        let joined = join_ready(first, &mut output);
        assert_eq!(&joined.data[..], b"ab");
        let next = output.next().now_or_never().flatten();
        assert!(
            matches!(next, Some(Err(RuntimeError::NotRunning { .. }))),
            "{next:?}"
        );
    }

    #[test]
    fn join_ready_never_waits_for_more_output() {
        let pending = futures::stream::pending::<Result<OutputChunk, RuntimeError>>();
        let mut output = pending.boxed().peekable();
        let first = OutputChunk {
            stream: StdStream::Stdout,
            data: Bytes::from_static(b"only"),
        };
        let joined = join_ready(first, &mut output);
        assert_eq!(&joined.data[..], b"only");
    }
}
