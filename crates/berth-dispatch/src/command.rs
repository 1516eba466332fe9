//! Running the batch system's commands: the one side effect of the Slurm
//! adapter.
//!
//! A [`CommandSpec`] is a program, its arguments and optional bytes for its
//! stdin. A [`CommandRunner`] runs it
//! and returns the [`CommandOutput`] whatever the exit status, so that the
//! adapter decides what a non-zero exit means (`scancel` of a job that has
//! already ended is not a failure). [`ProcessRunner`] is the real runner,
//! which also removes [`SECRET_ENV_VARS`] from each command's environment.
//! The unit tests use a recording double.

use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

/// Environment variables that may hold an API token. They are removed from
/// the environment of every command and job the dispatcher starts, because
/// `sbatch` passes its environment on to the job.
pub const SECRET_ENV_VARS: &[&str] = &["BERTH_API_TOKEN", "ARVADOS_API_TOKEN"];

/// One command to run.
#[derive(Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Bytes written to the command's stdin; `None` gives it no stdin.
    pub stdin: Option<Vec<u8>>,
}

impl CommandSpec {
    pub fn new(program: impl Into<PathBuf>, args: Vec<String>) -> CommandSpec {
        CommandSpec {
            program: program.into(),
            args,
            stdin: None,
        }
    }

    pub fn with_stdin(mut self, stdin: Vec<u8>) -> CommandSpec {
        self.stdin = Some(stdin);
        self
    }

    /// Formats the command as one line: the program and its arguments.
    pub fn command_line(&self) -> String {
        let mut line = self.program.display().to_string();
        for arg in &self.args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }
}

impl fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSpec")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .finish()
    }
}

/// Output and exit status of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The exit code; `None` when a signal ended the command.
    pub code: Option<i32>,
    /// A description of how the command ended, such as `exit status: 1`.
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Builds an output with exit code 0, as a test double returns it.
    pub fn ok(stdout: &str) -> CommandOutput {
        CommandOutput::exited(0, stdout, "")
    }

    /// Builds an output with the given exit code.
    pub fn exited(code: i32, stdout: &str, stderr: &str) -> CommandOutput {
        CommandOutput {
            code: Some(code),
            status: format!("exit status: {code}"),
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
        }
    }

    fn from_process(status: ExitStatus, stdout: Vec<u8>, stderr: Vec<u8>) -> CommandOutput {
        CommandOutput {
            code: status.code(),
            status: status.to_string(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// Turns a non-zero exit into [`CommandError::Failed`].
    pub fn check(self, spec: &CommandSpec) -> Result<CommandOutput, CommandError> {
        if self.success() {
            Ok(self)
        } else {
            Err(CommandError::Failed {
                command: spec.command_line(),
                status: self.status,
                stdout: self.stdout,
                stderr: self.stderr,
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("failed to run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} timed out after {timeout:?} and was killed")]
    TimedOut { command: String, timeout: Duration },
    /// The command was not run, because calls to the batch system are
    /// backing off after failed or slow calls
    /// ([`crate::limiter::CallLimiter`]). The message leaves out the time
    /// left, so that a pass that fails this way at every poll repeats one
    /// message, which the loop logs as a warning once.
    #[error("{command} was not run: calls to the batch system are backing off")]
    BackingOff {
        command: String,
        /// Time left of the backoff.
        remaining: Duration,
    },
    #[error("{command} failed with {status}; stderr: {stderr:?}; stdout: {stdout:?}", stderr = .stderr.trim(), stdout = .stdout.trim())]
    Failed {
        command: String,
        status: String,
        stdout: String,
        stderr: String,
    },
}

impl CommandError {
    /// Returns the command's stderr, when it ran to the end.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            CommandError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Runs commands.
#[async_trait]
pub trait CommandRunner: Send + Sync {
    /// Runs `spec` to its end. A non-zero exit is an `Ok` output; only a
    /// command that could not start or did not end in time is an error.
    async fn run(&self, spec: &CommandSpec) -> Result<CommandOutput, CommandError>;
}

/// Runs commands as child processes, killing any that outlives its
/// timeout.
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    timeout: Duration,
}

impl ProcessRunner {
    pub fn new(timeout: Duration) -> ProcessRunner {
        ProcessRunner { timeout }
    }
}

#[async_trait]
impl CommandRunner for ProcessRunner {
    async fn run(&self, spec: &CommandSpec) -> Result<CommandOutput, CommandError> {
        let spawn_error = |source| CommandError::Spawn {
            program: spec.program.display().to_string(),
            source,
        };
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in SECRET_ENV_VARS {
            command.env_remove(name);
        }
        let mut child = command.spawn().map_err(spawn_error)?;
        let stdin = child.stdin.take();
        let input = spec.stdin.clone();
        let finish = async move {
            if let (Some(mut pipe), Some(bytes)) = (stdin, input) {
                // A command that exits without reading its stdin closes the
                // pipe, and its exit status is more useful than the broken pipe.
                if let Err(err) = pipe.write_all(&bytes).await {
                    tracing::debug!(error = %err, "failed to write a command's stdin");
                }
                drop(pipe);
            }
            child.wait_with_output().await
        };
        match tokio::time::timeout(self.timeout, finish).await {
            Ok(Ok(output)) => Ok(CommandOutput::from_process(
                output.status,
                output.stdout,
                output.stderr,
            )),
            Ok(Err(source)) => Err(spawn_error(source)),
            Err(_) => Err(CommandError::TimedOut {
                command: spec.command_line(),
                timeout: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod recording {
    //! A [`CommandRunner`] double that records each command and returns
    //! outputs queued by the test.

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    type Answer = Result<CommandOutput, String>;

    #[derive(Debug, Clone, Default)]
    pub struct RecordingRunner {
        inner: Arc<Mutex<Inner>>,
    }

    #[derive(Debug, Default)]
    struct Inner {
        calls: Vec<CommandSpec>,
        answers: VecDeque<Answer>,
    }

    impl RecordingRunner {
        pub fn new() -> RecordingRunner {
            RecordingRunner::default()
        }

        /// Queues the output of the next command.
        pub fn answer(&self, output: CommandOutput) -> &Self {
            self.inner.lock().unwrap().answers.push_back(Ok(output));
            self
        }

        /// Queues a failure to start the next command.
        pub fn fail_to_start(&self, message: &str) -> &Self {
            self.inner
                .lock()
                .unwrap()
                .answers
                .push_back(Err(message.to_string()));
            self
        }

        pub fn calls(&self) -> Vec<CommandSpec> {
            self.inner.lock().unwrap().calls.clone()
        }
    }

    #[async_trait]
    impl CommandRunner for RecordingRunner {
        async fn run(&self, spec: &CommandSpec) -> Result<CommandOutput, CommandError> {
            let mut inner = self.inner.lock().unwrap();
            inner.calls.push(spec.clone());
            match inner.answers.pop_front() {
                Some(Ok(output)) => Ok(output),
                Some(Err(message)) => Err(CommandError::Spawn {
                    program: spec.program.display().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, message),
                }),
                None => panic!("no output queued for {}", spec.command_line()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner() -> ProcessRunner {
        ProcessRunner::new(Duration::from_secs(10))
    }

    #[tokio::test]
    async fn process_runner_passes_stdin_and_collects_output() {
        let spec = CommandSpec::new("/bin/sh", vec!["-c".into(), "cat; echo oops >&2".into()])
            .with_stdin(b"hello\n".to_vec());
        let output = runner().run(&spec).await.unwrap();
        assert!(output.success());
        assert_eq!(output.stdout, "hello\n");
        assert_eq!(output.stderr, "oops\n");
    }

    #[tokio::test]
    async fn non_zero_exit_checked_as_error() {
        let spec = CommandSpec::new(
            "/bin/sh",
            vec!["-c".into(), "echo out; echo err >&2; exit 3".into()],
        );
        let output = runner().run(&spec).await.unwrap();
        assert_eq!(output.code, Some(3));
        let err = output.check(&spec).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/bin/sh -c"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("\"err\""), "{text}");
        assert!(text.contains("\"out\""), "{text}");
        assert_eq!(err.stderr(), Some("err\n"));
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let spec = CommandSpec::new("/nonexistent/sbatch", vec![]);
        let err = runner().run(&spec).await.unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/sbatch"), "{err}");
    }

    #[tokio::test]
    async fn slow_command_times_out() {
        let runner = ProcessRunner::new(Duration::from_millis(200));
        let spec = CommandSpec::new("/bin/sleep", vec!["10".into()]);
        let err = runner.run(&spec).await.unwrap_err();
        assert!(matches!(err, CommandError::TimedOut { .. }), "{err}");
    }

    #[tokio::test]
    async fn secret_variables_are_not_passed_on() {
        std::env::set_var("BERTH_API_TOKEN", "do-not-leak");
        let spec = CommandSpec::new("/usr/bin/env", vec![]);
        let output = runner().run(&spec).await.unwrap();
        assert!(!output.stdout.contains("do-not-leak"));
        assert!(!output.stdout.contains("BERTH_API_TOKEN"));
    }
}
