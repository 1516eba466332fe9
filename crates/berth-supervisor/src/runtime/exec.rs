//! A process started inside a running container: the `exec` capability
//! of a [`Runtime`](super::Runtime), which the SSH gateway's sessions use.
//!
//! An [`ExecSpec`] names the argv, the user, the environment and the
//! working directory, and whether the process gets a terminal. The
//! runtime returns an [`ExecProcess`], which has a writer for the
//! process's stdin and a stream of its output. Without a terminal, stdout
//! and stderr arrive apart, and with one, everything arrives as stdout.
//! Its [`ExecControl`] resizes the terminal and returns the exit status
//! once the output has ended.

use std::fmt;

use async_trait::async_trait;
use tokio::io::AsyncWrite;

use super::{OutputStream, RuntimeError};

/// The numeric identity an exec runs as, and the name it was found by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    /// The login name from the container's `/etc/passwd`, or `None` for a
    /// numeric user without an entry there.
    pub name: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

impl ExecUser {
    /// Returns the user as the Docker Engine API takes it: the name when
    /// there is one, so the engine adds its supplementary groups, else
    /// `UID:GID`.
    pub fn engine_user(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => format!("{}:{}", self.uid, self.gid),
        }
    }
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub columns: u16,
    pub rows: u16,
}

impl TerminalSize {
    /// Converts the sizes of an SSH `pty-req` or `window-change` request,
    /// which are 32-bit, clamping each to the range of a `u16` and zero
    /// to 1, because a terminal of zero columns is rejected by some
    /// runtimes.
    pub fn from_ssh(columns: u32, rows: u32) -> TerminalSize {
        let clamp = |value: u32| u16::try_from(value.max(1)).unwrap_or(u16::MAX);
        TerminalSize {
            columns: clamp(columns),
            rows: clamp(rows),
        }
    }
}

/// A process to start inside a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// The program and its arguments, run without a shell.
    pub argv: Vec<String>,
    pub user: ExecUser,
    /// `NAME=value` entries: the whole environment of the process.
    pub env: Vec<String>,
    /// The working directory, or `None` for the container's.
    pub working_dir: Option<String>,
    /// The terminal's initial size when the process gets a terminal, or
    /// `None` for plain pipes.
    pub terminal: Option<TerminalSize>,
}

/// The end of an exec: its exit status or the signal that ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecExit {
    /// The process exited with this status.
    Status(u32),
    /// The process was ended by this signal, named without `SIG` (`KILL`).
    Signal(String),
}

/// The control side of a started exec.
#[async_trait]
pub trait ExecControl: Send + Sync + fmt::Debug {
    /// Resizes the exec's terminal. An exec without a terminal ignores it.
    async fn resize(&self, size: TerminalSize) -> Result<(), RuntimeError>;

    /// Waits for the process to end and returns how it ended. Called after
    /// the output stream has ended.
    async fn wait(&self) -> Result<ExecExit, RuntimeError>;

    /// Sends the process SIGHUP because its client went away, as sshd's
    /// closing of a terminal does. The Engine API cannot signal an exec,
    /// so there this does nothing and the process runs on.
    async fn hang_up(&self) {}
}

/// A started exec.
pub struct ExecProcess {
    /// The process's stdin. Shutting it down closes the process's stdin.
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    /// The process's output; it ends when the process's output ends.
    pub output: OutputStream,
    pub control: std::sync::Arc<dyn ExecControl>,
}

impl fmt::Debug for ExecProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecProcess")
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}
