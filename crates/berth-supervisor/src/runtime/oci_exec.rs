//! Processes inside a running OCI container through `crun exec` (or
//! `runc exec`), and files read from its root filesystem. The `oci`
//! runtime's containers use it, and so do Podman's when the supervisor
//! can reach Podman's OCI runtime (see `podman_exec`).
//!
//! The exec's process is the container's own `process` from the bundle's
//! `config.json` (so it keeps the container's capabilities and limits),
//! with the argv, user, working directory and terminal of the
//! [`ExecSpec`], and the container's environment overridden by the spec's.
//! It is written to a file of mode 0600 in the bundle directory, which
//! only the supervisor's user can write, and passed with `--process`, so
//! the environment never reaches an argv.
//!
//! Without a terminal the runtime's stdin, stdout and stderr are pipes.
//! With one, the runtime makes the container's terminal and sends its
//! master side over a Unix socket (`--console-socket`). The supervisor
//! then reads, writes and resizes that terminal itself, and the kernel
//! sends SIGWINCH to the session's processes on a resize.
//! NOTE: only crun 1.8 ran these execs in the tests, not runc.

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::termios::Winsize;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio_util::io::ReaderStream;

use super::exec::{ExecControl, ExecExit, ExecProcess, ExecSpec, TerminalSize};
use super::oci::OciRuntime;
use super::{ContainerId, OutputChunk, OutputStream, RuntimeError, StdStream};

/// How long the runtime may take to send an exec's terminal.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes read at once from an exec's stdout or stderr pipe: a pipe's default
/// capacity is 64 KiB, so this empties a full one in one read.
const PIPE_READ_BYTES: usize = 64 * 1024;

/// The status crun exits with when it fails to start an exec's program.
const RUNTIME_FAILURE: i32 = 255;

/// Maximum bytes of the runtime's error output kept for an error message.
const MAX_ERROR_OUTPUT: u64 = 64 * 1024;

/// The container and runtime of an exec through an OCI runtime.
#[derive(Debug, Clone)]
pub(super) struct RuntimeTarget {
    /// The runtime's program, such as `/usr/bin/crun`.
    pub program: PathBuf,
    /// The runtime's state directory (`--root`).
    pub state_root: PathBuf,
    /// The container's name in that state directory.
    pub name: String,
    /// The bundle directory, which contains the container's `config.json`,
    /// and which only the supervisor's user can write: the exec's process
    /// file goes there.
    pub bundle: PathBuf,
    /// A directory that only the supervisor's user can write, with a path
    /// short enough for the console socket (a Unix socket's path has at
    /// most 107 bytes).
    pub console_dir: PathBuf,
    /// The path of the container's root filesystem in the supervisor's
    /// mount namespace, such as `/proc/PID/root`, or `None` for `root.path`
    /// of `config.json`.
    pub root: Option<PathBuf>,
}

pub(super) async fn exec_process(
    runtime: &OciRuntime,
    id: &ContainerId,
    spec: &ExecSpec,
) -> Result<ExecProcess, RuntimeError> {
    let (program, bundle, state_root, name) = runtime.exec_target(id)?;
    let target = RuntimeTarget {
        program,
        state_root,
        name,
        console_dir: bundle.clone(),
        bundle,
        root: None,
    };
    exec_in(&target, spec).await
}

/// Starts the exec `spec` through the OCI runtime of `target`.
pub(super) async fn exec_in(
    target: &RuntimeTarget,
    spec: &ExecSpec,
) -> Result<ExecProcess, RuntimeError> {
    let RuntimeTarget {
        program,
        state_root,
        name,
        bundle,
        console_dir,
        root,
    } = target;
    let config = read_config(bundle).await?;
    let groups = match &spec.user.name {
        Some(user) => {
            let root = match root {
                Some(root) => root.clone(),
                None => root_dir(&config, bundle)?,
            };
            supplementary_groups(root, user, spec.user.gid).await
        }
        None => Vec::new(),
    };
    let process = exec_process_json(&config, spec, &groups);
    let process_file = write_process_file(bundle, &process).await?;

    let mut command = Command::new(program);
    command
        .arg("--root")
        .arg(state_root)
        .arg("exec")
        .arg("--process")
        .arg(process_file.path())
        .env_clear()
        .kill_on_drop(false);
    let spawn_error = |error: io::Error| RuntimeError::Request {
        action: "run",
        target: format!("{} exec in container {name}", program.display()),
        source: Box::new(error),
    };

    match spec.terminal {
        None => {
            command
                .arg(name)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let child = command.spawn().map_err(spawn_error)?;
            piped_exec(child, process_file, name.clone()).map_err(spawn_error)
        }
        Some(size) => {
            let terminal_error = |action: &'static str, error: io::Error| RuntimeError::Request {
                action,
                target: format!("an exec in container {name}"),
                source: Box::new(error),
            };
            // The runtime sends the master side of the container's new
            // terminal over this socket (`--console-socket`).
            let socket_dir = tempfile::Builder::new()
                .prefix("console-")
                .tempdir_in(console_dir)
                .map_err(|error| terminal_error("create the console socket of", error))?;
            let socket_path = socket_dir.path().join("socket");
            let listener = tokio::net::UnixListener::bind(&socket_path)
                .map_err(|error| terminal_error("create the console socket of", error))?;
            command
                .arg("--console-socket")
                .arg(&socket_path)
                .arg(name)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = command.spawn().map_err(spawn_error)?;
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(CONSOLE_TIMEOUT, listener.accept()) => accepted,
                _ = child.wait() => {
                    return Err(exec_failed(program, name, &mut child).await);
                }
            };
            let stream = match accepted {
                Ok(Ok((stream, _))) => stream,
                Ok(Err(error)) => return Err(terminal_error("accept the console of", error)),
                Err(_) => {
                    return Err(terminal_error(
                        "receive the console of",
                        io::Error::other(format!(
                            "the runtime sent none within {} s",
                            CONSOLE_TIMEOUT.as_secs()
                        )),
                    ))
                }
            };
            let master = receive_terminal(&stream)
                .await
                .map_err(|error| terminal_error("receive the console of", error))?;
            drop(socket_dir);
            rustix::termios::tcsetwinsize(&master, winsize(size))
                .map_err(|error| terminal_error("size the terminal of", error.into()))?;
            let master = console::Console::new(master)
                .map_err(|error| terminal_error("watch the terminal of", error))?;
            let stdout = ReaderStream::new(master.reader()).map(|chunk| (StdStream::Stdout, chunk));
            Ok(ExecProcess {
                stdin: Box::new(master.writer()),
                output: output_stream(stdout, name),
                control: std::sync::Arc::new(OciExec::new(
                    child,
                    Some(master),
                    process_file,
                    name.clone(),
                )),
            })
        }
    }
}

/// Makes the exec of a `child` started with piped stdin, stdout and
/// stderr. Its `file` is removed once the process has exited.
pub(super) fn piped_exec(
    mut child: Child,
    file: tempfile::NamedTempFile,
    name: String,
) -> io::Result<ExecProcess> {
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(io::Error::other("the exec's stdio pipes were not created"));
    };
    let stdout = ReaderStream::with_capacity(stdout, PIPE_READ_BYTES)
        .map(|chunk| (StdStream::Stdout, chunk));
    let start_failure = std::sync::Arc::new(std::sync::OnceLock::new());
    let first_error = start_failure.clone();
    let stderr = ReaderStream::with_capacity(stderr, PIPE_READ_BYTES).map(move |chunk| {
        if let Ok(data) = &chunk {
            first_error.get_or_init(|| start_failure_status(data));
        }
        (StdStream::Stderr, chunk)
    });
    let output = output_stream(futures::stream::select(stdout, stderr), &name);
    let mut exec = OciExec::new(child, None, file, name);
    exec.start_failure = Some(start_failure);
    Ok(ExecProcess {
        stdin: Box::new(stdin),
        output,
        control: std::sync::Arc::new(exec),
    })
}

/// Returns the exit status a shell gives for a failure to start the
/// program, which crun reports as `message` (the first bytes of the
/// exec's stderr) and its own status 255. That is 127 for a program not
/// found and 126 for one that cannot be run, and `None` for any other
/// output.
fn start_failure_status(message: &[u8]) -> Option<u32> {
    if message.starts_with(b"executable file `")
        && message.windows(9).any(|part| part == b"not found")
    {
        Some(127)
    } else if message.starts_with(b"open executable: ") {
        Some(126)
    } else {
        None
    }
}

/// Returns the error of a runtime that exited before it sent the
/// terminal, with what it wrote to stderr.
async fn exec_failed(program: &Path, name: &str, child: &mut Child) -> RuntimeError {
    use tokio::io::AsyncReadExt;

    let mut message = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        let _ = stderr
            .take(MAX_ERROR_OUTPUT)
            .read_to_end(&mut message)
            .await;
    }
    let status = match child.wait().await {
        Ok(status) => status.to_string(),
        Err(error) => error.to_string(),
    };
    RuntimeError::Command {
        program: program.display().to_string(),
        action: "start an exec in container",
        target: name.to_string(),
        status,
        message: String::from_utf8_lossy(&message).trim().to_string(),
    }
}

/// Receives the file descriptor that the runtime sends with `SCM_RIGHTS`
/// over the console socket.
async fn receive_terminal(stream: &tokio::net::UnixStream) -> io::Result<OwnedFd> {
    use std::mem::MaybeUninit;

    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

    let receive = || -> io::Result<Option<OwnedFd>> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        // The runtime sends the terminal's name as the message's data.
        let mut data = [0u8; 256];
        let mut iov = [io::IoSliceMut::new(&mut data)];
        rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = message {
                if let Some(fd) = fds.next() {
                    return Ok(Some(fd));
                }
            }
        }
        Ok(None)
    };
    loop {
        stream.readable().await?;
        match stream.try_io(tokio::io::Interest::READABLE, receive) {
            Ok(Some(fd)) => return Ok(fd),
            Ok(None) => {
                return Err(io::Error::other(
                    "the runtime's message on the console socket carried no file descriptor",
                ))
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Turns `(stream, read result)` pairs into output chunks. A read error
/// of `EIO` on a terminal's master side means the other side closed, so
/// it ends the stream like end of file.
fn output_stream<S>(chunks: S, name: &str) -> OutputStream
where
    S: futures::Stream<Item = (StdStream, io::Result<Bytes>)> + Send + 'static,
{
    let target = name.to_string();
    chunks
        .take_while(|(_, chunk)| {
            let ended = matches!(chunk, Err(error) if error.raw_os_error() == Some(libc::EIO));
            futures::future::ready(!ended)
        })
        .map(move |(stream, chunk)| {
            chunk
                .map(|data| OutputChunk { stream, data })
                .map_err(|error| RuntimeError::Request {
                    action: "read the output of an exec in container",
                    target: target.clone(),
                    source: Box::new(error),
                })
        })
        .boxed()
}

fn winsize(size: TerminalSize) -> Winsize {
    Winsize {
        ws_row: size.rows,
        ws_col: size.columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

async fn read_config(bundle: &Path) -> Result<Value, RuntimeError> {
    let path = bundle.join("config.json");
    let text = tokio::fs::read(&path)
        .await
        .map_err(|error| super::oci::io_error("read", &path, error))?;
    serde_json::from_slice(&text).map_err(|error| RuntimeError::Request {
        action: "read",
        target: path.display().to_string(),
        source: Box::new(error),
    })
}

/// Bytes of `/etc/group` read at most.
const MAX_GROUP_FILE_BYTES: u64 = 1024 * 1024;

/// Supplementary groups given at most: the kernel's `NGROUPS_MAX`, above
/// which `setgroups` fails.
const MAX_SUPPLEMENTARY_GROUPS: usize = 65536;

/// Returns the GIDs of the groups of `/etc/group` under the container's
/// `root` that list `user` as a member, apart from its primary `gid`, as
/// the Docker Engine and Podman give an exec run as a named user. A file
/// that cannot be read gives none, with a warning.
async fn supplementary_groups(root: PathBuf, user: &str, gid: u32) -> Vec<u32> {
    let root_path = root.display().to_string();
    let read =
        tokio::task::spawn_blocking(move || read_in_root(&root, "etc/group", MAX_GROUP_FILE_BYTES))
            .await
            .map_err(io::Error::other)
            .and_then(|result| result);
    match read {
        Ok(Some(text)) => member_gids(&String::from_utf8_lossy(&text), user, gid),
        Ok(None) => Vec::new(),
        Err(error) => {
            tracing::warn!(root = %root_path, user, %error, "failed to read the container's /etc/group; the exec gets no supplementary groups");
            Vec::new()
        }
    }
}

/// Returns the GIDs of the groups in the text of an `/etc/group` file
/// (`name:password:gid:member,member`) whose members include `user`,
/// apart from `primary`, in the file's order and without repeats.
fn member_gids(group: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut gids = Vec::new();
    for line in group.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split(':').collect();
        let [_, _, gid, members, ..] = fields.as_slice() else {
            continue;
        };
        let Ok(gid) = gid.parse::<u32>() else {
            continue;
        };
        let member = members.split(',').any(|member| member.trim() == user);
        if member && gid != primary && !gids.contains(&gid) {
            if gids.len() == MAX_SUPPLEMENTARY_GROUPS {
                tracing::warn!(user, limit = MAX_SUPPLEMENTARY_GROUPS, "the container's /etc/group lists the user in more groups than the kernel allows; the exec gets the first ones");
                break;
            }
            gids.push(gid);
        }
    }
    gids
}

/// Returns the container's root filesystem: `root.path` of its
/// `config.json`, relative to the bundle unless absolute.
fn root_dir(config: &Value, bundle: &Path) -> Result<PathBuf, RuntimeError> {
    config
        .pointer("/root/path")
        .and_then(Value::as_str)
        .map(|root| bundle.join(root))
        .ok_or_else(|| RuntimeError::Request {
            action: "find the root filesystem of",
            target: bundle.display().to_string(),
            source: "config.json has no root.path".into(),
        })
}

/// Returns the container's `process` object changed for the exec, with
/// the supplementary `groups` of its user.
fn exec_process_json(config: &Value, spec: &ExecSpec, groups: &[u32]) -> Value {
    let mut process = config.get("process").cloned().unwrap_or_else(|| json!({}));
    let container_env: Vec<String> = process
        .get("env")
        .and_then(Value::as_array)
        .map(|entries| {
            entries
                .iter()
                .filter_map(|entry| entry.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let cwd = spec
        .working_dir
        .clone()
        .or_else(|| {
            process
                .get("cwd")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "/".to_string());
    process["args"] = json!(spec.argv);
    process["env"] = json!(merge_env(&container_env, &spec.env));
    process["cwd"] = json!(cwd);
    let umask = process.pointer("/user/umask").cloned();
    process["user"] = json!({"uid": spec.user.uid, "gid": spec.user.gid});
    if !groups.is_empty() {
        process["user"]["additionalGids"] = json!(groups);
    }
    // The container's umask (Podman sets one), so that files the session
    // makes get the modes they would get in the container.
    if let Some(umask) = umask {
        process["user"]["umask"] = umask;
    }
    process["terminal"] = json!(spec.terminal.is_some());
    if let Some(size) = spec.terminal {
        process["consoleSize"] = json!({"height": size.rows, "width": size.columns});
    } else if let Some(object) = process.as_object_mut() {
        object.remove("consoleSize");
    }
    process
}

/// Returns `base` with every variable that `overrides` sets replaced, in
/// the order of `base`, then the new variables of `overrides`.
fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let variable = |entry: &str| entry.split('=').next().unwrap_or("").to_string();
    let overridden: HashSet<String> = overrides.iter().map(|entry| variable(entry)).collect();
    let mut merged: Vec<String> = base
        .iter()
        .filter(|entry| !overridden.contains(&variable(entry)))
        .cloned()
        .collect();
    // A later entry of the same variable wins, as in a shell.
    let mut seen = HashSet::new();
    let mut last: Vec<String> = overrides
        .iter()
        .rev()
        .filter(|entry| seen.insert(variable(entry)))
        .cloned()
        .collect();
    last.reverse();
    merged.extend(last);
    merged
}

async fn write_process_file(
    dir: &Path,
    process: &Value,
) -> Result<tempfile::NamedTempFile, RuntimeError> {
    let text = serde_json::to_vec(process).map_err(|error| RuntimeError::Request {
        action: "write the exec process in",
        target: dir.display().to_string(),
        source: Box::new(error),
    })?;
    let dir = dir.to_path_buf();
    let dir_path = dir.clone();
    let written = tokio::task::spawn_blocking(move || -> io::Result<tempfile::NamedTempFile> {
        let mut file = tempfile::Builder::new()
            .prefix("exec-")
            .suffix(".json")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&dir)?;
        file.write_all(&text)?;
        file.flush()?;
        Ok(file)
    })
    .await
    .map_err(io::Error::other)
    .and_then(|result| result);
    written.map_err(|error| super::oci::io_error("write an exec process file in", &dir_path, error))
}

pub(super) async fn read_container_file(
    runtime: &OciRuntime,
    id: &ContainerId,
    path: &str,
    max_bytes: u64,
) -> Result<Option<Vec<u8>>, RuntimeError> {
    let (_, bundle, _, name) = runtime.exec_target(id)?;
    let config = read_config(&bundle).await?;
    let root = root_dir(&config, &bundle)?;
    let relative = path.trim_start_matches('/').to_string();
    let target = format!("{path} in container {name}");
    tokio::task::spawn_blocking(move || read_in_root(&root, &relative, max_bytes))
        .await
        .map_err(io::Error::other)
        .and_then(|result| result)
        .map_err(|error| RuntimeError::Request {
            action: "read",
            target,
            source: Box::new(error),
        })
}

/// Reads `relative` inside `root`, resolving every symbolic link as if
/// `root` were `/` (`RESOLVE_IN_ROOT`), so the container cannot point the
/// read at a host file. A missing file, or one that is not a regular
/// file, reads as `None`. The file is found with `O_PATH` and opened for
/// reading only once it is known to be a regular file, because opening a
/// device node that the container placed there could act on the device.
fn read_in_root(root: &Path, relative: &str, max_bytes: u64) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;

    let root_dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let found = rustix::fs::openat2(
        &root_dir,
        relative,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    );
    let path_fd = match found {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let stat = rustix::fs::fstat(&path_fd)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Ok(None);
    }
    // Reopens the very file found above, through its descriptor.
    let fd = rustix::fs::open(
        format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&path_fd)
        ),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = std::fs::File::from(fd);
    let mut contents = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut contents)?;
    if contents.len() as u64 > max_bytes {
        return Err(io::Error::other(format!(
            "the file is larger than {max_bytes} bytes"
        )));
    }
    Ok(Some(contents))
}

/// One `crun exec` (or `podman exec`) process.
#[derive(Debug)]
struct OciExec {
    child: tokio::sync::Mutex<Child>,
    /// The terminal's master side, for resizing; `None` without one.
    terminal: Option<console::Console>,
    /// The file of the process (or of its environment), removed when the
    /// process has exited or the exec is dropped.
    process_file: Mutex<Option<tempfile::NamedTempFile>>,
    name: String,
    /// The shell's status for a failure to start the program, read from
    /// the start of the exec's stderr. `None` with a terminal, which
    /// receives that message instead.
    start_failure: Option<std::sync::Arc<std::sync::OnceLock<Option<u32>>>>,
}

impl OciExec {
    fn new(
        child: Child,
        terminal: Option<console::Console>,
        process_file: tempfile::NamedTempFile,
        name: String,
    ) -> OciExec {
        OciExec {
            child: tokio::sync::Mutex::new(child),
            terminal,
            process_file: Mutex::new(Some(process_file)),
            name,
            start_failure: None,
        }
    }
}

#[async_trait]
impl ExecControl for OciExec {
    async fn resize(&self, size: TerminalSize) -> Result<(), RuntimeError> {
        let Some(terminal) = &self.terminal else {
            return Ok(());
        };
        let error = |error: io::Error| RuntimeError::Request {
            action: "resize the terminal of an exec in container",
            target: self.name.clone(),
            source: Box::new(error),
        };
        rustix::termios::tcsetwinsize(terminal.fd(), winsize(size)).map_err(|e| error(e.into()))
    }

    async fn hang_up(&self) {
        // crun exec and runc exec pass the signals they get to the process.
        let Some(pid) = self.child.lock().await.id() else {
            return;
        };
        let Ok(pid) = i32::try_from(pid) else {
            return;
        };
        if let Err(error) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        ) {
            tracing::debug!(name = %self.name, %error, "failed to send SIGHUP to an exec");
        }
    }

    async fn wait(&self) -> Result<ExecExit, RuntimeError> {
        use std::os::unix::process::ExitStatusExt;

        let status =
            self.child
                .lock()
                .await
                .wait()
                .await
                .map_err(|error| RuntimeError::Request {
                    action: "wait for an exec in container",
                    target: self.name.clone(),
                    source: Box::new(error),
                })?;
        if let Ok(mut file) = self.process_file.lock() {
            file.take();
        }
        if let Some(code) = status.code() {
            let failed_to_start = (code == RUNTIME_FAILURE)
                .then(|| self.start_failure.as_ref()?.get().copied().flatten())
                .flatten();
            return Ok(ExecExit::Status(
                failed_to_start.unwrap_or_else(|| u32::try_from(code).unwrap_or(255)),
            ));
        }
        let signal = status
            .signal()
            .and_then(|number| nix::sys::signal::Signal::try_from(number).ok())
            .map(|signal| signal.as_str().trim_start_matches("SIG").to_string())
            .unwrap_or_else(|| "KILL".to_string());
        Ok(ExecExit::Signal(signal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::exec::ExecUser;

    #[test]
    fn start_failures_read_as_a_shell_would() {
        let status = |text: &str| start_failure_status(text.as_bytes());
        assert_eq!(
            status("executable file `nosuch` not found in $PATH: No such file or directory\n"),
            Some(127)
        );
        assert_eq!(status("open executable: Permission denied\n"), Some(126));
        assert_eq!(
            status("open executable: Operation not permitted\n"),
            Some(126)
        );
        assert_eq!(status("cat: nosuch: No such file or directory\n"), None);
        assert_eq!(status("executable file `x` was found\n"), None);
    }

    #[test]
    fn spec_env_overrides_the_container_env() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let overrides = vec![
            "A=2".to_string(),
            "TERM=xterm".to_string(),
            "A=3".to_string(),
        ];
        assert_eq!(
            merge_env(&base, &overrides),
            vec!["PATH=/bin", "TERM=xterm", "A=3"]
        );
    }

    #[test]
    fn process_json_takes_the_exec_fields() {
        let config = json!({"process": {
            "args": ["sleep", "1"], "env": ["PATH=/bin"], "cwd": "/work",
            "user": {"uid": 5, "gid": 5}, "capabilities": {"bounding": ["CAP_KILL"]},
        }});
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into()],
            user: ExecUser {
                name: Some("root".into()),
                uid: 0,
                gid: 0,
            },
            env: vec!["TERM=vt100".into()],
            working_dir: None,
            terminal: Some(TerminalSize {
                columns: 80,
                rows: 24,
            }),
        };
        let process = exec_process_json(&config, &spec, &[]);
        assert_eq!(process["args"], json!(["/bin/sh"]));
        assert_eq!(process["env"], json!(["PATH=/bin", "TERM=vt100"]));
        assert_eq!(process["cwd"], "/work");
        assert_eq!(process["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(process["terminal"], true);
        assert_eq!(process["consoleSize"], json!({"height": 24, "width": 80}));
        assert_eq!(process["capabilities"]["bounding"], json!(["CAP_KILL"]));
    }

    #[test]
    fn member_gids_lists_the_user_groups() {
        let group = "root:x:0:\n\
                     # a comment:x:9:alice\n\
                     wheel:x:10:root,alice\n\
                     alice:x:1000:alice\n\
                     audio:x:29: bob , alice\n\
                     broken:x:notanumber:alice\n\
                     short:x:11\n\
                     again:x:10:alice\n";
        assert_eq!(member_gids(group, "alice", 1000), vec![10, 29]);
        assert_eq!(member_gids(group, "root", 0), vec![10]);
        assert!(member_gids(group, "nobody", 65534).is_empty());
        assert!(member_gids("", "alice", 1000).is_empty());
    }

    #[test]
    fn groups_reach_the_process_user() {
        let config = json!({"process": {"user": {"uid": 5, "gid": 5, "umask": 18}}});
        let spec = ExecSpec {
            argv: vec!["id".into()],
            user: ExecUser {
                name: Some("alice".into()),
                uid: 1000,
                gid: 1000,
            },
            env: Vec::new(),
            working_dir: None,
            terminal: None,
        };
        let process = exec_process_json(&config, &spec, &[10, 29]);
        assert_eq!(
            process["user"],
            json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 29], "umask": 18})
        );
    }

    #[test]
    fn read_in_root_keeps_symlinks_inside() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), "host secret").unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc/passwd")).unwrap();
        // The absolute link resolves inside the root, where it is missing.
        assert_eq!(read_in_root(root.path(), "etc/passwd", 1024).unwrap(), None);
        std::fs::write(root.path().join("etc/group"), "root:x:0:").unwrap();
        assert_eq!(
            read_in_root(root.path(), "etc/group", 1024).unwrap(),
            Some(b"root:x:0:".to_vec())
        );
        assert!(read_in_root(root.path(), "etc/group", 4).is_err());
    }

    #[test]
    fn read_in_root_skips_non_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/group")).unwrap();
        assert_eq!(read_in_root(root.path(), "etc/group", 1024).unwrap(), None);
        // A FIFO with no writer: opening it to read would not block with
        // O_NONBLOCK, but it is never opened at all.
        let fifo = root.path().join("etc/passwd");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(read_in_root(root.path(), "etc/passwd", 1024).unwrap(), None);
    }
}

/// The master side of an exec's terminal, read and written without
/// blocking a thread, so a session that never ends holds no thread.
mod console {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{ready, Context, Poll};

    use rustix::fs::OFlags;
    use tokio::io::unix::AsyncFd;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    #[derive(Debug, Clone)]
    pub(super) struct Console {
        fd: Arc<AsyncFd<OwnedFd>>,
    }

    impl Console {
        /// Sets the terminal non-blocking and registers it with Tokio.
        pub(super) fn new(fd: OwnedFd) -> io::Result<Console> {
            let flags = rustix::fs::fcntl_getfl(&fd)?;
            rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
            // Tokio deprecates `new` because a type could change its
            // descriptor while registered, which an `OwnedFd` cannot. The
            // replacement, `register`, is unsafe, and this crate forbids
            // unsafe code.
            #[allow(deprecated)]
            let registered = AsyncFd::new(fd)?;
            Ok(Console {
                fd: Arc::new(registered),
            })
        }

        pub(super) fn fd(&self) -> &OwnedFd {
            self.fd.get_ref()
        }

        pub(super) fn reader(&self) -> Console {
            self.clone()
        }

        pub(super) fn writer(&self) -> Console {
            self.clone()
        }
    }

    impl AsyncRead for Console {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            loop {
                let mut guard = ready!(self.fd.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                let read = guard.try_io(|fd| {
                    rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(io::Error::from)
                });
                match read {
                    Ok(Ok(count)) => {
                        buf.advance(count);
                        return Poll::Ready(Ok(()));
                    }
                    // EIO: every process with the other side open has
                    // exited, which is the terminal's end of file.
                    Ok(Err(error)) if error.raw_os_error() == Some(libc::EIO) => {
                        return Poll::Ready(Ok(()))
                    }
                    Ok(Err(error)) => return Poll::Ready(Err(error)),
                    Err(_would_block) => continue,
                }
            }
        }
    }

    impl AsyncWrite for Console {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            loop {
                let mut guard = ready!(self.fd.poll_write_ready(cx))?;
                let written = guard
                    .try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(io::Error::from));
                match written {
                    Ok(result) => return Poll::Ready(result),
                    Err(_would_block) => continue,
                }
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        /// Does nothing, because a terminal has no half-close. A client
        /// ends a terminal session's input by typing the EOF character.
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
}
