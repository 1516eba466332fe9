//! Processes inside a running container through the Docker Engine API's
//! exec calls, and files read through its archive call.
//!
//! An exec is created with stdin, stdout and stderr attached, and started
//! attached on the connection without a request timeout, because it lasts
//! as long as the session. The engine multiplexes stdout and stderr
//! without a terminal, and sends one raw stream with one. Once the output
//! has ended, the exit code comes from inspecting the exec. The engine
//! reports a process ended by signal N as exit code 128 + N, as a shell
//! does, so an exec never ends with [`ExecExit::Signal`] here. On a
//! Podman engine on this node, execs go through Podman's OCI runtime or
//! its command line instead where they can ([`super::podman_exec`]).

use std::io::Read;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::DownloadFromContainerOptions;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use futures::StreamExt;

use super::docker::{output_chunk, DockerRuntime};
use super::exec::{ExecControl, ExecExit, ExecProcess, ExecSpec, TerminalSize};
use super::podman_exec::PodmanRoute;
use super::{ContainerId, RuntimeError};

/// How long the exit code is polled for after the output ended, because
/// the engine may still report the exec as running for a moment.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(10);

/// The pause between two inspections of an exec that still runs.
const EXIT_CODE_POLL: Duration = Duration::from_millis(50);

/// Bytes a tar archive adds around one file: its header block and the
/// end-of-archive blocks, with room for a long-name header.
const TAR_OVERHEAD_BYTES: u64 = 8 * 1024;

impl DockerRuntime {
    pub(super) async fn exec_process(
        &self,
        id: &ContainerId,
        spec: &ExecSpec,
    ) -> Result<ExecProcess, RuntimeError> {
        let tty = spec.terminal.is_some();
        match self.podman_route(id).await {
            Some((_, PodmanRoute::Runtime(target))) => {
                match super::oci_exec::exec_in(&target, spec).await {
                    Ok(process) => return Ok(process),
                    Err(error) => {
                        tracing::warn!(container = %id.0, %error, "failed to start an exec through Podman's OCI runtime; this exec goes through Podman's exec API");
                    }
                }
            }
            Some((cli, PodmanRoute::Command)) if !tty => {
                if let Some(process) = cli.exec(id, spec).await? {
                    return Ok(process);
                }
            }
            _ => {}
        }
        let options = CreateExecOptions {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(tty),
            env: Some(spec.env.clone()),
            cmd: Some(spec.argv.clone()),
            user: Some(spec.user.engine_user()),
            working_dir: spec.working_dir.clone(),
            ..Default::default()
        };
        let created = self
            .docker()
            .create_exec(&id.0, options)
            .await
            .map_err(|error| exec_error("create an exec in container", &id.0, error))?;
        let start = StartExecOptions {
            detach: false,
            tty,
            output_capacity: None,
        };
        let started = self
            .unbounded()
            .start_exec(&created.id, Some(start))
            .await
            .map_err(|error| exec_error("start an exec in container", &id.0, error))?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(RuntimeError::Request {
                action: "start an exec in container",
                target: id.0.clone(),
                source: "the engine started the exec detached".into(),
            });
        };

        let control = DockerExec {
            docker: self.docker().clone(),
            exec_id: created.id,
            container: id.0.clone(),
        };
        if let Some(size) = spec.terminal {
            // The engine sizes the terminal only once the exec runs.
            if let Err(error) = control.resize(size).await {
                tracing::warn!(error = %error, "failed to set the size of the exec's terminal");
            }
        }
        let target = id.0.clone();
        let output = output
            .filter_map(move |item| {
                futures::future::ready(output_chunk(item, |error| {
                    exec_error("read the output of an exec in container", &target, error)
                }))
            })
            .boxed();
        Ok(ExecProcess {
            stdin: Box::new(input),
            output,
            control: std::sync::Arc::new(control),
        })
    }

    pub(super) async fn read_container_file(
        &self,
        id: &ContainerId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, RuntimeError> {
        let options = DownloadFromContainerOptions { path };
        let mut chunks = self.docker().download_from_container(&id.0, Some(options));
        let mut archive = Vec::new();
        let limit = max_bytes.saturating_add(TAR_OVERHEAD_BYTES);
        let target = format!("{path} in container {}", id.0);
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) if super::docker::is_not_found(&error) => return Ok(None),
                Err(error) => return Err(exec_error("read", &target, error)),
            };
            archive.extend_from_slice(&chunk);
            if archive.len() as u64 > limit {
                return Err(too_large(&target, max_bytes));
            }
        }

        let mut entries = tar::Archive::new(archive.as_slice());
        let mut entries = entries.entries().map_err(|error| RuntimeError::Request {
            action: "read the archive of",
            target: target.clone(),
            source: Box::new(error),
        })?;
        let Some(entry) = entries.next() else {
            return Ok(None);
        };
        let mut entry = entry.map_err(|error| RuntimeError::Request {
            action: "read the archive of",
            target: target.clone(),
            source: Box::new(error),
        })?;

        // The engine archives a symbolic link itself, never its target.
        if !entry.header().entry_type().is_file() {
            return Ok(None);
        }
        let mut contents = Vec::new();
        (&mut entry)
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut contents)
            .map_err(|error| RuntimeError::Request {
                action: "read the archive of",
                target: target.clone(),
                source: Box::new(error),
            })?;
        if contents.len() as u64 > max_bytes {
            return Err(too_large(&target, max_bytes));
        }
        Ok(Some(contents))
    }
}

fn too_large(target: &str, max_bytes: u64) -> RuntimeError {
    RuntimeError::Request {
        action: "read",
        target: target.to_string(),
        source: format!("the file is larger than {max_bytes} bytes").into(),
    }
}

/// Reports the engine's own message, which names the problem (an unknown
/// user, a missing program), as the error's source.
fn exec_error(action: &'static str, target: &str, error: bollard::errors::Error) -> RuntimeError {
    RuntimeError::Request {
        action,
        target: target.to_string(),
        source: super::docker::daemon_message(&error).into(),
    }
}

/// One exec of the Docker Engine API.
#[derive(Debug)]
struct DockerExec {
    docker: Docker,
    exec_id: String,
    container: String,
}

#[async_trait]
impl ExecControl for DockerExec {
    async fn resize(&self, size: TerminalSize) -> Result<(), RuntimeError> {
        let options = ResizeExecOptions {
            height: size.rows,
            width: size.columns,
        };
        self.docker
            .resize_exec(&self.exec_id, options)
            .await
            .map_err(|error| {
                exec_error("resize the terminal of an exec in", &self.container, error)
            })
    }

    async fn wait(&self) -> Result<ExecExit, RuntimeError> {
        let deadline = tokio::time::Instant::now() + EXIT_CODE_WAIT;
        loop {
            let inspected = self
                .docker
                .inspect_exec(&self.exec_id)
                .await
                .map_err(|error| {
                    exec_error("inspect an exec in container", &self.container, error)
                })?;
            let running = inspected.running.unwrap_or(false);
            if let (false, Some(code)) = (running, inspected.exit_code) {
                // Exit codes are 0 to 255; anything else is the engine's
                // own failure, which -1 (as 255) reports.
                let status = u32::try_from(code).unwrap_or(255);
                return Ok(ExecExit::Status(status));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Request {
                    action: "read the exit code of an exec in container",
                    target: self.container.clone(),
                    source: format!(
                        "the engine still reported it running {} s after its output ended",
                        EXIT_CODE_WAIT.as_secs()
                    )
                    .into(),
                });
            }
            tokio::time::sleep(EXIT_CODE_POLL).await;
        }
    }
}
