//! The Singularity/Apptainer runtime, through its command line.
//!
//! [`SingularityRuntime::ensure_image`] converts a `docker save` archive
//! to a SIF file once per node with
//! `singularity build DEST docker-archive://PATH`, and keeps the file in
//! the image cache (`supervisor.image_cache_dir`, under `sif/`) under the
//! image ID. Singularity rejects a `:` in a `docker-archive://` path, so
//! PATH is a symlink in a new temporary directory. The symlink points at
//! `/proc/<supervisor PID>/fd/<N>`, the archive file that was checked
//! when it was opened, so the path the owner gave is never opened again.
//!
//! A container runs as
//! `singularity exec --containall --cleanenv [--pwd DIR] [--net --network=none]
//! [--memory B --memory-swap B] [--cpus N] [--nv | --rocm] [--bind HOST:CTR[:ro]]... SIF COMMAND...`.
//! The process gets a cleared environment with only `PATH`, the
//! container's variables as `SINGULARITYENV_NAME` (`APPTAINERENV_NAME`
//! for Apptainer), and `SINGULARITY_NO_EVAL=1` so that Singularity 3.10
//! and later pass values without shell evaluation. The container thus
//! gets neither the supervisor's environment nor its token, and only the
//! mounts the container record asks for: `--containall` keeps the host's
//! home directory, `/tmp` and the other default binds out.
//!
//! Stopping sends SIGTERM to the `singularity` process, which forwards it
//! to the container, then SIGKILL after the grace period.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use super::cache::{ensure_entry, CacheError};
use super::oci::{pipe_output, run};
use super::{
    ContainerId, ContainerSpec, ImageSource, Network, OutputStream, Runtime, RuntimeError,
};
use crate::archive::ImageArchive;
use crate::gpu::GpuStack;

/// The subdirectory of `supervisor.image_cache_dir` that contains SIF files.
pub const SIF_CACHE_SUBDIR: &str = "sif";

/// How long `remove` waits for a killed container to exit.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A program of the Singularity family. Both take the same arguments but
/// name their environment variables differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Singularity,
    Apptainer,
}

impl Flavor {
    fn env_prefix(self) -> &'static str {
        match self {
            Flavor::Singularity => "SINGULARITYENV_",
            Flavor::Apptainer => "APPTAINERENV_",
        }
    }

    fn variable(self, name: &str) -> String {
        match self {
            Flavor::Singularity => format!("SINGULARITY_{name}"),
            Flavor::Apptainer => format!("APPTAINER_{name}"),
        }
    }
}

/// The Singularity or Apptainer command line and the node's SIF cache.
#[derive(Debug)]
pub struct SingularityRuntime {
    program: PathBuf,
    flavor: Flavor,
    description: String,
    cache_dir: PathBuf,
    work_dir: PathBuf,
    containers: Mutex<HashMap<String, Arc<SifContainer>>>,
}

/// The exit of a container: its exit status, or why it could not be read.
type Exit = Option<Result<i64, String>>;

#[derive(Debug)]
struct SifContainer {
    name: String,
    /// The `exec` arguments, SIF file and command included.
    args: Vec<String>,
    /// The environment of the `singularity` process.
    env: Vec<(String, String)>,
    /// The write ends of the stdout and stderr pipes, until start, and
    /// their read ends, until attach.
    writers: Mutex<Option<(OwnedFd, OwnedFd)>>,
    readers: Mutex<Option<(OwnedFd, OwnedFd)>>,
    pid: Mutex<Option<u32>>,
    exit: watch::Sender<Exit>,
}

impl SingularityRuntime {
    /// Finds the program (`program`, else `singularity` and then
    /// `apptainer` on `PATH`) and reads its version. SIF files go under
    /// `image_cache_dir/sif`, conversion scratch space under `work_dir`.
    pub async fn new(
        program: Option<&Path>,
        image_cache_dir: &Path,
        work_dir: &Path,
    ) -> Result<SingularityRuntime, RuntimeError> {
        let resolved = match program {
            Some(program) => {
                super::find_program(program).ok_or_else(|| RuntimeError::ProgramNotFound {
                    program: program.display().to_string(),
                    key: "singularity",
                })?
            }
            None => super::find_program(Path::new("singularity"))
                .or_else(|| super::find_program(Path::new("apptainer")))
                .ok_or_else(|| RuntimeError::ProgramNotFound {
                    program: "singularity or apptainer".to_string(),
                    key: "singularity",
                })?,
        };
        let output = run(
            &resolved,
            ["--version"],
            "read the version of",
            "Singularity",
        )
        .await?;
        let version = String::from_utf8_lossy(&output).trim().to_string();
        let flavor = if version.to_ascii_lowercase().starts_with("apptainer") {
            Flavor::Apptainer
        } else {
            Flavor::Singularity
        };
        Ok(SingularityRuntime {
            description: format!("{} ({version})", resolved.display()),
            program: resolved,
            flavor,
            cache_dir: image_cache_dir.join(SIF_CACHE_SUBDIR),
            work_dir: work_dir.to_path_buf(),
            containers: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the PID of the `singularity` process of a started
    /// container.
    pub fn pid(&self, id: &ContainerId) -> Option<u32> {
        self.container(id)
            .and_then(|container| container.pid.lock().ok().and_then(|pid| *pid))
    }

    fn container(&self, id: &ContainerId) -> Option<Arc<SifContainer>> {
        self.containers
            .lock()
            .ok()
            .and_then(|containers| containers.get(&id.0).cloned())
    }

    fn known(&self, id: &ContainerId) -> Result<Arc<SifContainer>, RuntimeError> {
        self.container(id).ok_or_else(|| RuntimeError::Request {
            action: "find container",
            target: id.0.clone(),
            source: "the Singularity runtime did not create it".into(),
        })
    }

    async fn convert(&self, archive: &ImageArchive) -> Result<String, RuntimeError> {
        let id = archive.image().id.clone();
        let key = id
            .strip_prefix("sha256:")
            .unwrap_or(&id)
            .to_ascii_lowercase();
        let path = archive.path().to_path_buf();
        let load_error = |source: super::BoxError| RuntimeError::LoadImage {
            path: path.clone(),
            source,
        };
        let scratch = tempfile::Builder::new()
            .prefix("berth-sif-")
            .tempdir_in(&self.work_dir)
            .map_err(|error| load_error(Box::new(error)))?;
        if scratch.path().to_string_lossy().contains(':') {
            return Err(load_error(
                format!(
                    "the temporary directory {} contains ':', which `docker-archive://` paths cannot hold; set supervisor.temp_dir to a path without ':'",
                    scratch.path().display()
                )
                .into(),
            ));
        }
        let file = archive
            .reopen()
            .map_err(|error| load_error(Box::new(error)))?;
        let link = scratch.path().join("image.tar");
        std::os::unix::fs::symlink(
            format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()),
            &link,
        )
        .map_err(|error| load_error(Box::new(error)))?;
        let cache_dir = self.cache_dir.clone();
        let program = self.program.clone();
        let flavor = self.flavor;
        let scratch_dir = scratch.path().to_path_buf();
        let built = tokio::task::spawn_blocking(move || {
            let entry = ensure_entry(&cache_dir, &key, ".sif", |dest| {
                build_sif(&program, flavor, &link, dest, &scratch_dir)
            });
            drop(file);
            entry
        })
        .await
        .map_err(|error| load_error(Box::new(error)))?;
        let entry = built.map_err(|error| match error {
            CacheError::Build(source) => load_error(Box::new(source)),
            other => load_error(Box::new(other)),
        })?;
        if entry.built {
            tracing::info!(image = %id, sif = %entry.path.display(), "converted the image to SIF");
        } else {
            tracing::info!(image = %id, sif = %entry.path.display(), "SIF file already on this node; not converting the image again");
        }
        Ok(entry.path.display().to_string())
    }

    /// Returns the `exec` arguments and the process environment for `spec`.
    pub fn exec_command(&self, spec: &ContainerSpec) -> (Vec<String>, Vec<(String, String)>) {
        exec_command(self.flavor, spec)
    }
}

/// A failed `singularity build`, with its output.
#[derive(Debug, thiserror::Error)]
#[error("`{program} build` exited with {status}: {output}")]
pub struct BuildError {
    program: String,
    status: String,
    output: String,
}

fn build_sif(
    program: &Path,
    flavor: Flavor,
    archive_link: &Path,
    dest: &Path,
    scratch: &Path,
) -> Result<(), BuildError> {
    let build_error = |status: String, output: String| BuildError {
        program: program.display().to_string(),
        status,
        output,
    };
    let cache = scratch.join("cache");
    let tmp = scratch.join("tmp");
    for dir in [&cache, &tmp] {
        std::fs::create_dir_all(dir)
            .map_err(|error| build_error("no status".into(), error.to_string()))?;
    }
    let output = std::process::Command::new(program)
        .arg("build")
        .arg(dest)
        .arg(format!("docker-archive://{}", archive_link.display()))
        .env_clear()
        .env("PATH", host_path())
        .env(flavor.variable("CACHEDIR"), &cache)
        .env(flavor.variable("TMPDIR"), &tmp)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| build_error("no status".into(), format!("failed to run it: {error}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(build_error(
            output.status.to_string(),
            text.trim().to_string(),
        ));
    }
    tracing::info!(dest = %dest.display(), "singularity build: {}", text.trim());
    Ok(())
}

/// Returns the `PATH` of the `singularity` process: the supervisor's own,
/// so it finds its helpers, else the usual system directories.
fn host_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_string())
}

/// Builds the `exec` arguments and the process environment.
pub fn exec_command(flavor: Flavor, spec: &ContainerSpec) -> (Vec<String>, Vec<(String, String)>) {
    let mut args: Vec<String> = ["exec", "--containall", "--cleanenv"]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
    if let Some(dir) = spec.working_dir.as_ref().filter(|dir| !dir.is_empty()) {
        args.push("--pwd".into());
        args.push(dir.clone());
    }
    if spec.network == Network::None {
        args.push("--net".into());
        args.push("--network=none".into());
    }
    if let Some(bytes) = spec.memory_bytes {
        args.extend(["--memory".into(), bytes.to_string()]);
        args.extend(["--memory-swap".into(), bytes.to_string()]);
    }
    if let Some(nano_cpus) = spec.nano_cpus {
        args.extend(["--cpus".into(), format_cpus(nano_cpus)]);
    }
    let mut env = vec![
        ("PATH".to_string(), host_path()),
        (flavor.variable("NO_EVAL"), "1".to_string()),
    ];
    let prefix = flavor.env_prefix();
    for entry in &spec.env {
        let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        env.push((format!("{prefix}{name}"), value.to_string()));
    }
    if let Some(gpus) = &spec.gpus {
        let (flag, variable) = match gpus.stack {
            GpuStack::Cuda => ("--nv", "CUDA_VISIBLE_DEVICES"),
            GpuStack::Rocm => ("--rocm", "ROCR_VISIBLE_DEVICES"),
        };
        args.push(flag.into());
        // Singularity exposes every GPU of the node unless this variable names
        // the job's devices.
        if !gpus.device_ids.is_empty() {
            env.push((format!("{prefix}{variable}"), gpus.device_ids.join(",")));
        }
    }
    for bind in &spec.binds {
        let mode = if bind.read_only { ":ro" } else { "" };
        args.push("--bind".into());
        args.push(format!(
            "{}:{}{mode}",
            bind.host_path.display(),
            bind.container_path
        ));
    }
    args.push(spec.image.clone());
    args.extend(spec.command.iter().cloned());
    (args, env)
}

/// Formats a CPU limit in billionths of a CPU as Singularity's `--cpus`
/// decimal.
fn format_cpus(nano_cpus: i64) -> String {
    let whole = nano_cpus / 1_000_000_000;
    let millis = (nano_cpus % 1_000_000_000) / 1_000_000;
    if millis == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{millis:03}")
            .trim_end_matches('0')
            .to_string()
    }
}

#[async_trait]
impl Runtime for SingularityRuntime {
    /// The `singularity` process, which runs the container's command.
    // NOTE: with `--memory` or `--cpus`, Singularity creates a cgroup for
    // the container; untested here (the stand-in makes none), so the
    // statistics may read another cgroup than the container's.
    async fn pid(&self, id: &ContainerId) -> Result<Option<u32>, RuntimeError> {
        Ok(SingularityRuntime::pid(self, id))
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    async fn ensure_image(&self, source: &ImageSource) -> Result<String, RuntimeError> {
        match source {
            ImageSource::Name(name) => Err(RuntimeError::ArchiveRequired {
                runtime: "singularity",
                image: name.clone(),
            }),
            ImageSource::Archive(archive) => self.convert(archive).await,
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        // A container of this name is a leftover of this process only:
        // a `singularity exec` ends with the supervisor that ran it.
        self.remove(&ContainerId(spec.name.clone())).await?;
        for bind in &spec.binds {
            if bind.host_path.to_string_lossy().contains(':') || bind.container_path.contains(':') {
                return Err(RuntimeError::Request {
                    action: "bind",
                    target: bind.host_path.display().to_string(),
                    source: "Singularity's --bind cannot give a path containing ':'".into(),
                });
            }
        }
        let (args, env) = self.exec_command(spec);
        let pipe_error = |error: io::Error| RuntimeError::Request {
            action: "create pipes for container",
            target: spec.name.clone(),
            source: Box::new(error),
        };
        let (stdout_read, stdout_write) = super::new_pipe().map_err(pipe_error)?;
        let (stderr_read, stderr_write) = super::new_pipe().map_err(pipe_error)?;
        let (exit, _) = watch::channel(None);
        let container = SifContainer {
            name: spec.name.clone(),
            args,
            env,
            writers: Mutex::new(Some((stdout_write, stderr_write))),
            readers: Mutex::new(Some((stdout_read, stderr_read))),
            pid: Mutex::new(None),
            exit,
        };
        if let Ok(mut containers) = self.containers.lock() {
            containers.insert(spec.name.clone(), Arc::new(container));
        }
        Ok(ContainerId(spec.name.clone()))
    }

    async fn attach(&self, id: &ContainerId) -> Result<OutputStream, RuntimeError> {
        let container = self.known(id)?;
        let readers = container
            .readers
            .lock()
            .ok()
            .and_then(|mut readers| readers.take());
        let Some((stdout, stderr)) = readers else {
            return Err(RuntimeError::Request {
                action: "attach to container",
                target: id.0.clone(),
                source: "its output is already attached".into(),
            });
        };
        pipe_output(&id.0, stdout, stderr)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let container = self.known(id)?;
        let writers = container
            .writers
            .lock()
            .ok()
            .and_then(|mut writers| writers.take());
        let Some((stdout, stderr)) = writers else {
            return Err(RuntimeError::Request {
                action: "start container",
                target: id.0.clone(),
                source: "it was already started".into(),
            });
        };
        let mut command = Command::new(&self.program);
        command
            .args(&container.args)
            .env_clear()
            .envs(container.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let spawned = command.spawn();
        // The write ends must close here, so the output ends with the
        // container.
        drop(command);
        let mut child = spawned.map_err(|error| RuntimeError::Request {
            action: "start container",
            target: id.0.clone(),
            source: Box::new(error),
        })?;
        if let Ok(mut pid) = container.pid.lock() {
            *pid = child.id();
        }
        let waiting = container.clone();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => Ok(i64::from(code)),
                    (None, Some(signal)) => Ok(128 + i64::from(signal)),
                    (None, None) => Err(format!("unknown exit status {status}")),
                },
                Err(error) => Err(format!("failed to wait for the process: {error}")),
            };
            waiting.exit.send_replace(Some(exit));
        });
        Ok(())
    }

    async fn wait(&self, id: &ContainerId) -> Result<i64, RuntimeError> {
        let container = self.known(id)?;
        let mut receiver = container.exit.subscribe();
        let exit = receiver
            .wait_for(|exit| exit.is_some())
            .await
            .map(|exit| exit.clone())
            .ok()
            .flatten();
        match exit {
            Some(Ok(code)) => Ok(code),
            Some(Err(message)) => Err(RuntimeError::Request {
                action: "wait for container",
                target: id.0.clone(),
                source: message.into(),
            }),
            None => Err(RuntimeError::Request {
                action: "wait for container",
                target: id.0.clone(),
                source: "the exit status was never reported".into(),
            }),
        }
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let Some(container) = self.container(id) else {
            return Ok(());
        };
        for (signal, limit) in [(Signal::SIGTERM, grace), (Signal::SIGKILL, KILL_WAIT)] {
            if container.exit.borrow().is_some() {
                return Ok(());
            }
            let Some(pid) = container.pid.lock().ok().and_then(|pid| *pid) else {
                return Ok(());
            };
            let pid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            if let Err(error) = kill(pid, signal) {
                if error != nix::errno::Errno::ESRCH {
                    return Err(RuntimeError::Request {
                        action: "signal container",
                        target: container.name.clone(),
                        source: Box::new(io::Error::from(error)),
                    });
                }
            }
            let mut receiver = container.exit.subscribe();
            let _ = tokio::time::timeout(limit, receiver.wait_for(|exit| exit.is_some())).await;
        }
        Ok(())
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        if self.container(id).is_none() {
            return Ok(());
        }
        self.stop(id, Duration::ZERO).await?;
        if let Ok(mut containers) = self.containers.lock() {
            containers.remove(&id.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuAssignment, GpuDevices};
    use crate::runtime::BindMount;
    use std::collections::BTreeMap;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "berth-x".into(),
            labels: BTreeMap::new(),
            image: "/cache/sif/abc.sif".into(),
            command: vec!["echo".into(), "hi".into()],
            env: vec!["A=1".into(), "B=x y".into()],
            working_dir: Some("/work".into()),
            memory_bytes: Some(1 << 30),
            nano_cpus: Some(1_500_000_000),
            network: Network::None,
            binds: vec![
                BindMount {
                    host_path: PathBuf::from("/host/in"),
                    container_path: "/in".into(),
                    read_only: true,
                },
                BindMount {
                    host_path: PathBuf::from("/host/out"),
                    container_path: "/out".into(),
                    read_only: false,
                },
            ],
            gpus: None,
        }
    }

    #[test]
    fn exec_arguments_follow_the_spec() {
        let (args, env) = exec_command(Flavor::Singularity, &spec());
        assert_eq!(
            args,
            [
                "exec",
                "--containall",
                "--cleanenv",
                "--pwd",
                "/work",
                "--net",
                "--network=none",
                "--memory",
                "1073741824",
                "--memory-swap",
                "1073741824",
                "--cpus",
                "1.5",
                "--bind",
                "/host/in:/in:ro",
                "--bind",
                "/host/out:/out",
                "/cache/sif/abc.sif",
                "echo",
                "hi"
            ]
        );
        let names: Vec<&str> = env.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "PATH",
                "SINGULARITY_NO_EVAL",
                "SINGULARITYENV_A",
                "SINGULARITYENV_B"
            ]
        );
        assert_eq!(env[3].1, "x y");
    }

    #[test]
    fn apptainer_gets_its_own_prefix() {
        let (_, env) = exec_command(Flavor::Apptainer, &spec());
        assert!(env.iter().any(|(name, _)| name == "APPTAINERENV_A"));
        assert!(env.iter().any(|(name, _)| name == "APPTAINER_NO_EVAL"));
    }

    #[test]
    fn network_and_limits_are_optional() {
        let mut open = spec();
        open.network = Network::Enabled { mode: None };
        open.memory_bytes = None;
        open.nano_cpus = None;
        open.working_dir = None;
        let (args, _) = exec_command(Flavor::Singularity, &open);
        for absent in ["--net", "--network=none", "--memory", "--cpus", "--pwd"] {
            assert!(!args.iter().any(|arg| arg == absent), "{absent}: {args:?}");
        }
    }

    #[test]
    fn gpus_add_the_flag_and_devices() {
        let mut with_gpus = spec();
        with_gpus.gpus = Some(GpuAssignment {
            stack: GpuStack::Cuda,
            count: 2,
            device_ids: vec!["0".into(), "2".into()],
            devices: GpuDevices::Docker,
        });
        let (args, env) = exec_command(Flavor::Singularity, &with_gpus);
        assert!(args.iter().any(|arg| arg == "--nv"));
        assert!(env.contains(&(
            "SINGULARITYENV_CUDA_VISIBLE_DEVICES".to_string(),
            "0,2".to_string()
        )));
        with_gpus.gpus.as_mut().unwrap().stack = GpuStack::Rocm;
        let (args, _) = exec_command(Flavor::Singularity, &with_gpus);
        assert!(args.iter().any(|arg| arg == "--rocm"));
    }

    #[test]
    fn cpus_format_as_decimals() {
        assert_eq!(format_cpus(2_000_000_000), "2");
        assert_eq!(format_cpus(1_500_000_000), "1.5");
        assert_eq!(format_cpus(250_000_000), "0.25");
    }
}
