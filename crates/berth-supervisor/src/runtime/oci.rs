//! The OCI runtime: crun or runc running a bundle unpacked from a
//! `docker save` archive, for nodes without a container daemon.
//!
//! [`OciRuntime::ensure_image`] unpacks the archive's image once per node
//! into the image cache (`supervisor.image_cache_dir`, under `rootfs/`),
//! keyed by image ID (see [`super::cache`] and [`super::rootfs`]). Each
//! container then gets its own bundle directory under the temporary
//! directory: `config.json` (see [`super::bundle`]), an overlay mount
//! whose lower layer is the cached root filesystem, so the cache stays
//! unmodified, and the runtime's state directory (`--root`), so the
//! supervisor's containers are apart from Podman's. Without permission to
//! mount an overlay, the cached root filesystem is used read-only with
//! tmpfs on `/tmp`, `/var/tmp` and `/run`.
//!
//! The steps map to the runtime's commands: `create` to `crun create`,
//! whose stdout and stderr become the container's, `start` to
//! `crun start`, `stop` to `crun kill` with SIGTERM and then SIGKILL, and
//! `remove` to `crun delete --force`. `crun create` exits once the
//! container's first process is waiting to start, so that process is
//! orphaned. The supervisor makes itself a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`) so that it inherits the process and can
//! read its exit status with `waitpid`.
//!
//! The container's cgroup is `/berth/<container name>` under the cgroup
//! root. Right after the container exits, and before `crun delete`
//! removes the cgroup, the OOM kill counter of its memory controller is
//! read, and [`OciRuntime::oom_killed`] reports it.
//!
//! GPUs are passed as the host's device files (see [`super::devices`]).
//!
//! NOTE: only crun 1.8 was run in the tests. runc takes the same commands
//! and options, but its handling of the passed stdout and stderr is
//! untested here.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::io::ReaderStream;

use super::bundle::{bundle_config, resolve_user, BundleLayout, RootMode};
use super::cache::{ensure_entry, remove_any, CacheError};
use super::devices::gpu_device_files;
use super::rootfs::{unpack_image, ImageConfig, UnpackError, ROOTFS_DIR};
use super::{
    ContainerId, ContainerSpec, ImageSource, OutputChunk, OutputStream, Runtime, RuntimeError,
    StdStream,
};
use crate::archive::ImageArchive;
use crate::gpu::GpuStack;

/// The cgroup, relative to the cgroup root, under which each container
/// gets its own.
// NOTE: this is outside the batch job's cgroup, so the batch system's
// own limits and accounting do not cover the container.
pub const CGROUP_PARENT: &str = "/berth";

/// The subdirectory of `supervisor.image_cache_dir` that contains
/// unpacked images.
pub const ROOTFS_CACHE_SUBDIR: &str = "rootfs";

/// How long `remove` waits for a killed container to exit.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Maximum bytes of the runtime's error output kept for an error message.
const MAX_ERROR_OUTPUT: u64 = 64 * 1024;

/// An OCI runtime program (crun or runc) and the node's image cache.
#[derive(Debug)]
pub struct OciRuntime {
    program: PathBuf,
    description: String,
    cache_dir: PathBuf,
    work_dir: PathBuf,
    containers: Mutex<HashMap<String, Arc<OciContainer>>>,
}

/// The exit of a container's first process: its exit status, or why it
/// could not be read.
type Exit = Option<Result<i64, String>>;

/// One container's bundle and state.
#[derive(Debug)]
struct OciContainer {
    name: String,
    bundle: PathBuf,
    state_root: PathBuf,
    /// The overlay mount point, while the overlay is mounted.
    overlay: Mutex<Option<PathBuf>>,
    cgroup: PathBuf,
    pid: i32,
    output: Mutex<Option<(OwnedFd, OwnedFd)>>,
    exit: watch::Sender<Exit>,
    waiter_started: AtomicBool,
    oom_killed: AtomicBool,
}

impl OciRuntime {
    /// Finds `program` (a name on `PATH` or an absolute path), reads its
    /// version, and makes this process a child subreaper. Bundles go under
    /// `work_dir`, unpacked images under `image_cache_dir/rootfs`.
    pub async fn new(
        program: &Path,
        image_cache_dir: &Path,
        work_dir: &Path,
    ) -> Result<OciRuntime, RuntimeError> {
        let resolved =
            super::find_program(program).ok_or_else(|| RuntimeError::ProgramNotFound {
                program: program.display().to_string(),
                key: "oci_runtime",
            })?;
        let output = run(
            &resolved,
            ["--version"],
            "read the version of",
            "the OCI runtime",
        )
        .await?;
        let version = String::from_utf8_lossy(&output)
            .lines()
            .next()
            .unwrap_or("unknown version")
            .to_string();
        nix::sys::prctl::set_child_subreaper(true).map_err(|error| RuntimeError::Request {
            action: "become the child subreaper for",
            target: "the OCI runtime's containers".to_string(),
            source: Box::new(io::Error::from(error)),
        })?;
        Ok(OciRuntime {
            description: format!("OCI runtime {} ({version})", resolved.display()),
            program: resolved,
            cache_dir: image_cache_dir.join(ROOTFS_CACHE_SUBDIR),
            work_dir: work_dir.to_path_buf(),
            containers: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the PID, in the host's PID namespace, of the container's
    /// first process, or `None` for an unknown container.
    pub fn pid(&self, id: &ContainerId) -> Option<u32> {
        self.container(id)
            .and_then(|container| u32::try_from(container.pid).ok())
    }

    /// Returns the directory of the container's memory cgroup.
    pub fn cgroup_path(&self, id: &ContainerId) -> Option<PathBuf> {
        self.container(id).map(|container| container.cgroup.clone())
    }

    /// Returns whether the kernel's OOM killer killed a process of the
    /// container. Known once [`Runtime::wait`] has returned.
    pub fn oom_killed(&self, id: &ContainerId) -> bool {
        self.container(id)
            .map(|container| container.oom_killed.load(Ordering::SeqCst))
            .unwrap_or(false)
    }

    /// Returns the bundle directory of the container `name`.
    pub fn bundle_dir(&self, name: &str) -> PathBuf {
        self.work_dir.join("berth-oci").join(name)
    }

    /// Returns what `crun exec` needs for a known container: the runtime
    /// program, the bundle directory, the state directory and the name.
    pub(super) fn exec_target(
        &self,
        id: &ContainerId,
    ) -> Result<(PathBuf, PathBuf, PathBuf, String), RuntimeError> {
        let container = self.known(id)?;
        Ok((
            self.program.clone(),
            container.bundle.clone(),
            container.state_root.clone(),
            container.name.clone(),
        ))
    }

    fn container(&self, id: &ContainerId) -> Option<Arc<OciContainer>> {
        self.containers
            .lock()
            .ok()
            .and_then(|containers| containers.get(&id.0).cloned())
    }

    fn known(&self, id: &ContainerId) -> Result<Arc<OciContainer>, RuntimeError> {
        self.container(id).ok_or_else(|| RuntimeError::Request {
            action: "find container",
            target: id.0.clone(),
            source: "the OCI runtime did not create it".into(),
        })
    }

    /// Runs the OCI runtime with the container's state directory.
    async fn runtime_command(
        &self,
        container: &OciContainer,
        args: &[&str],
        action: &'static str,
    ) -> Result<Vec<u8>, RuntimeError> {
        let mut full = vec![
            "--root".to_string(),
            container.state_root.display().to_string(),
        ];
        full.extend(args.iter().map(|arg| arg.to_string()));
        run(&self.program, full, action, &container.name).await
    }

    /// Removes a bundle left by an earlier run of the same container.
    async fn remove_leftover(&self, name: &str) -> Result<(), RuntimeError> {
        let bundle = self.bundle_dir(name);
        if !bundle.exists() {
            return Ok(());
        }
        tracing::warn!(bundle = %bundle.display(), "removing the leftover bundle of an earlier run");
        let state_root = bundle.join("state");
        let _ = run(
            &self.program,
            [
                "--root".to_string(),
                state_root.display().to_string(),
                "delete".to_string(),
                "--force".to_string(),
                name.to_string(),
            ],
            "delete container",
            name,
        )
        .await;
        let merged = bundle.join(ROOTFS_DIR);
        unmount(&merged).await;
        remove_bundle(&bundle).await
    }

    async fn unpack(&self, archive: &ImageArchive) -> Result<String, RuntimeError> {
        let id = archive.image().id.clone();
        let key = id
            .strip_prefix("sha256:")
            .unwrap_or(&id)
            .to_ascii_lowercase();
        let cache_dir = self.cache_dir.clone();
        let archive = archive.clone();
        let path = archive.path().to_path_buf();
        let unpacked = tokio::task::spawn_blocking(move || {
            ensure_entry(&cache_dir, &key, "", |dest| -> Result<_, UnpackError> {
                let mut file = archive.reopen().map_err(UnpackError::Read)?;
                let summary = unpack_image(&mut file, dest)?;
                tracing::info!(
                    layers = summary.layers,
                    skipped_devices = summary.skipped_devices,
                    archive = %archive.path().display(),
                    "unpacked the image"
                );
                Ok(())
            })
        })
        .await
        .map_err(|error| RuntimeError::LoadImage {
            path: path.clone(),
            source: Box::new(error),
        })?;
        let entry = unpacked.map_err(|error| match error {
            CacheError::Build(source) => RuntimeError::LoadImage {
                path: path.clone(),
                source: Box::new(source),
            },
            other => RuntimeError::LoadImage {
                path: path.clone(),
                source: Box::new(other),
            },
        })?;
        if entry.built {
            tracing::info!(image = %id, cache = %entry.path.display(), "unpacked the image into the node's cache");
        } else {
            tracing::info!(image = %id, cache = %entry.path.display(), "image already unpacked on this node; not unpacking it again");
        }
        Ok(id)
    }

    /// Returns the cache entry of an unpacked image.
    fn image_entry(&self, image: &str) -> Result<PathBuf, RuntimeError> {
        let key = image.strip_prefix("sha256:").unwrap_or(image);
        let valid = !key.is_empty() && key.bytes().all(|b| b.is_ascii_hexdigit());
        let entry = self.cache_dir.join(key.to_ascii_lowercase());
        if valid && entry.is_dir() {
            Ok(entry)
        } else {
            Err(RuntimeError::Request {
                action: "find the unpacked image",
                target: image.to_string(),
                source: format!("{} does not hold it", self.cache_dir.display()).into(),
            })
        }
    }

    async fn create_bundle(&self, spec: &ContainerSpec) -> Result<OciContainer, RuntimeError> {
        let entry = self.image_entry(&spec.image)?;
        let lower = entry.join(ROOTFS_DIR);
        let bundle = self.bundle_dir(&spec.name);
        let state_root = bundle.join("state");
        let merged = bundle.join(ROOTFS_DIR);
        let upper = bundle.join("upper");
        let work = bundle.join("work");
        for dir in [&state_root, &merged, &upper, &work] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|error| io_error("create the bundle directory", dir, error))?;
        }
        // config.json contains the container's environment.
        tokio::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(|error| io_error("restrict the permissions of", &bundle, error))?;

        let root_mode = match mount_overlay(&lower, &upper, &work, &merged).await {
            Ok(()) => RootMode::Overlay,
            Err(reason) => {
                tracing::warn!(
                    container = %spec.name,
                    "failed to mount an overlay root filesystem ({reason}); using the cached image read-only with tmpfs on {}",
                    super::bundle::READONLY_ROOT_TMPFS.join(", ")
                );
                RootMode::ReadOnly
            }
        };
        let rootfs = match root_mode {
            RootMode::Overlay => merged.clone(),
            RootMode::ReadOnly => lower.clone(),
        };

        let image = ImageConfig::read_cached(&entry).map_err(|error| RuntimeError::Request {
            action: "read the image config of",
            target: spec.image.clone(),
            source: Box::new(error),
        })?;
        let (user, home) =
            resolve_user(&lower, &image.user).map_err(|error| RuntimeError::Request {
                action: "resolve the user of",
                target: spec.image.clone(),
                source: Box::new(error),
            })?;
        let cgroups_path = format!("{CGROUP_PARENT}/{}", spec.name);
        let mut spec = spec.clone();
        let devices = match &spec.gpus {
            Some(gpus) => {
                if gpus.stack == GpuStack::Rocm && !gpus.device_ids.is_empty() {
                    spec.env.push(format!(
                        "ROCR_VISIBLE_DEVICES={}",
                        gpus.device_ids.join(",")
                    ));
                }
                gpu_device_files(gpus, Path::new("/dev")).map_err(|error| {
                    RuntimeError::Request {
                        action: "pass GPUs to",
                        target: spec.name.clone(),
                        source: Box::new(error),
                    }
                })?
            }
            None => Vec::new(),
        };
        let layout = BundleLayout {
            rootfs: &rootfs,
            root_mode,
            cgroups_path: &cgroups_path,
            devices: &devices,
        };
        let config = bundle_config(&spec, &image, user, &home, layout).map_err(|error| {
            RuntimeError::Request {
                action: "write the bundle of",
                target: spec.name.clone(),
                source: Box::new(error),
            }
        })?;
        let config_path = bundle.join("config.json");
        let text = serde_json::to_vec_pretty(&config).map_err(|error| RuntimeError::Request {
            action: "write the bundle of",
            target: spec.name.clone(),
            source: Box::new(error),
        })?;
        tokio::fs::write(&config_path, text)
            .await
            .map_err(|error| io_error("write", &config_path, error))?;

        let (exit, _) = watch::channel(None);
        Ok(OciContainer {
            name: spec.name.clone(),
            bundle,
            state_root,
            overlay: Mutex::new((root_mode == RootMode::Overlay).then_some(merged)),
            cgroup: memory_cgroup_dir(&cgroups_path),
            pid: 0,
            output: Mutex::new(None),
            exit,
            waiter_started: AtomicBool::new(false),
            oom_killed: AtomicBool::new(false),
        })
    }

    /// Runs `create` of the OCI runtime with the container's stdout and
    /// stderr on new pipes, and returns the pipes' read ends. A failure
    /// carries what the runtime wrote to stderr.
    async fn runtime_create(
        &self,
        container: &OciContainer,
    ) -> Result<(OwnedFd, OwnedFd), RuntimeError> {
        let (stdout_read, stdout_write) = super::new_pipe()
            .map_err(|error| io_error("create a pipe for", &container.bundle, error))?;
        let (stderr_read, stderr_write) = super::new_pipe()
            .map_err(|error| io_error("create a pipe for", &container.bundle, error))?;
        let mut command = Command::new(&self.program);
        command
            .arg("--root")
            .arg(&container.state_root)
            .arg("create")
            .arg("--bundle")
            .arg(&container.bundle)
            .arg(&container.name)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout_write))
            .stderr(Stdio::from(stderr_write));
        let status = command.status().await;
        // The write ends must close here, so a failed create's output ends.
        drop(command);
        let status = status.map_err(|error| RuntimeError::Request {
            action: "run",
            target: self.program.display().to_string(),
            source: Box::new(error),
        })?;
        if status.success() {
            return Ok((stdout_read, stderr_read));
        }
        drop(stdout_read);
        let message = tokio::task::spawn_blocking(move || {
            let mut text = Vec::new();
            let _ = std::fs::File::from(stderr_read)
                .take(MAX_ERROR_OUTPUT)
                .read_to_end(&mut text);
            String::from_utf8_lossy(&text).trim().to_string()
        })
        .await
        .unwrap_or_default();
        Err(RuntimeError::Command {
            program: self.program.display().to_string(),
            action: "create container",
            target: container.name.clone(),
            status: status.to_string(),
            message,
        })
    }

    /// Reaps the container's first process in a blocking task and
    /// publishes its exit status. Runs once per container.
    fn start_waiter(&self, container: &Arc<OciContainer>) {
        if container.waiter_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let container = container.clone();
        tokio::task::spawn_blocking(move || {
            let exit = wait_for_exit(container.pid);
            if let Some(killed) = read_oom_kills(&container.cgroup) {
                container.oom_killed.store(killed > 0, Ordering::SeqCst);
            }
            container.exit.send_replace(Some(exit));
        });
    }

    async fn wait_exit(container: &OciContainer, limit: Option<Duration>) -> Exit {
        let mut receiver = container.exit.subscribe();
        let waited = receiver.wait_for(|exit| exit.is_some());
        let result = match limit {
            Some(limit) => match tokio::time::timeout(limit, waited).await {
                Ok(result) => result.map(|exit| exit.clone()).ok().flatten(),
                Err(_) => None,
            },
            None => waited.await.map(|exit| exit.clone()).ok().flatten(),
        };
        result
    }

    fn has_exited(container: &OciContainer) -> bool {
        container.exit.borrow().is_some()
    }
}

#[async_trait]
impl Runtime for OciRuntime {
    async fn pid(&self, id: &ContainerId) -> Result<Option<u32>, RuntimeError> {
        Ok(OciRuntime::pid(self, id))
    }

    /// Read from the container's memory cgroup when it exited.
    async fn exec(
        &self,
        id: &ContainerId,
        spec: &super::exec::ExecSpec,
    ) -> Result<super::exec::ExecProcess, RuntimeError> {
        super::oci_exec::exec_process(self, id, spec).await
    }

    async fn read_file(
        &self,
        id: &ContainerId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, RuntimeError> {
        super::oci_exec::read_container_file(self, id, path, max_bytes).await
    }

    /// The container's main process, as `crun state` reported it at the
    /// container's creation.
    async fn root_pid(&self, id: &ContainerId) -> Result<u32, RuntimeError> {
        // The PID is 0 between creation and start.
        OciRuntime::pid(self, id)
            .filter(|pid| *pid > 0)
            .ok_or_else(|| RuntimeError::NotRunning {
                container: id.0.clone(),
            })
    }

    async fn oom_killed(&self, id: &ContainerId) -> Result<bool, RuntimeError> {
        Ok(OciRuntime::oom_killed(self, id))
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    async fn ensure_image(&self, source: &ImageSource) -> Result<String, RuntimeError> {
        match source {
            ImageSource::Name(name) => Err(RuntimeError::ArchiveRequired {
                runtime: "oci",
                image: name.clone(),
            }),
            ImageSource::Archive(archive) => self.unpack(archive).await,
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        // A container of this name is a leftover: of this runtime, or of an
        // earlier supervisor on the node, whose bundle is still there.
        self.remove(&ContainerId(spec.name.clone())).await?;
        self.remove_leftover(&spec.name).await?;
        let mut container = match self.create_bundle(spec).await {
            Ok(container) => container,
            Err(error) => {
                let bundle = self.bundle_dir(&spec.name);
                unmount(&bundle.join(ROOTFS_DIR)).await;
                if let Err(cleanup) = remove_bundle(&bundle).await {
                    tracing::warn!(container = %spec.name, error = %cleanup, "failed to remove the bundle");
                }
                return Err(error);
            }
        };
        let pipes = match self.runtime_create(&container).await {
            Ok(pipes) => pipes,
            Err(error) => {
                discard_bundle(&container).await;
                return Err(error);
            }
        };
        let state = self
            .runtime_command(
                &container,
                &["state", &container.name],
                "read the state of container",
            )
            .await;
        let pid = state.and_then(|state| {
            serde_json::from_slice::<serde_json::Value>(&state)
                .ok()
                .and_then(|value| value["pid"].as_i64())
                .and_then(|pid| i32::try_from(pid).ok())
                .filter(|pid| *pid > 0)
                .ok_or_else(|| RuntimeError::Request {
                    action: "read the PID of container",
                    target: container.name.clone(),
                    source: "the runtime's state has no pid".into(),
                })
        });
        match pid {
            Ok(pid) => container.pid = pid,
            Err(error) => {
                let _ = self
                    .runtime_command(
                        &container,
                        &["delete", "--force", &container.name],
                        "delete container",
                    )
                    .await;
                discard_bundle(&container).await;
                return Err(error);
            }
        }
        if let Ok(mut output) = container.output.lock() {
            *output = Some(pipes);
        }
        let id = ContainerId(spec.name.clone());
        if let Ok(mut containers) = self.containers.lock() {
            containers.insert(id.0.clone(), Arc::new(container));
        }
        Ok(id)
    }

    async fn attach(&self, id: &ContainerId) -> Result<OutputStream, RuntimeError> {
        let container = self.known(id)?;
        let pipes = container
            .output
            .lock()
            .ok()
            .and_then(|mut output| output.take());
        let Some((stdout, stderr)) = pipes else {
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
        self.start_waiter(&container);
        self.runtime_command(&container, &["start", &container.name], "start container")
            .await
            .map(|_| ())
    }

    async fn wait(&self, id: &ContainerId) -> Result<i64, RuntimeError> {
        let container = self.known(id)?;
        self.start_waiter(&container);
        match Self::wait_exit(&container, None).await {
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
        if Self::has_exited(&container) {
            return Ok(());
        }
        self.start_waiter(&container);
        let signalled = self
            .runtime_command(
                &container,
                &["kill", &container.name, "TERM"],
                "stop container",
            )
            .await;
        if Self::wait_exit(&container, Some(grace)).await.is_some() {
            return Ok(());
        }
        let killed = self
            .runtime_command(
                &container,
                &["kill", &container.name, "KILL"],
                "kill container",
            )
            .await;
        if Self::wait_exit(&container, Some(KILL_WAIT)).await.is_some() {
            return Ok(());
        }
        signalled.and(killed).map(|_| ())
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let Some(container) = self.container(id) else {
            return Ok(());
        };
        if !Self::has_exited(&container) {
            let _ = self
                .runtime_command(
                    &container,
                    &["kill", &container.name, "KILL"],
                    "kill container",
                )
                .await;
            // A container killed before it started must still be reaped.
            self.start_waiter(&container);
            let _ = Self::wait_exit(&container, Some(KILL_WAIT)).await;
        }
        self.runtime_command(
            &container,
            &["delete", "--force", &container.name],
            "delete container",
        )
        .await?;
        discard_bundle(&container).await;
        if let Ok(mut containers) = self.containers.lock() {
            containers.remove(&id.0);
        }
        Ok(())
    }
}

/// Streams a container's output from the read ends of its stdout and
/// stderr pipes. The stream ends when every writer of both has closed.
pub(super) fn pipe_output(
    target: &str,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<OutputStream, RuntimeError> {
    let stream = |fd: OwnedFd, kind: StdStream| -> Result<OutputStream, RuntimeError> {
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map_err(|error| {
            RuntimeError::Request {
                action: "attach to container",
                target: target.to_string(),
                source: Box::new(error),
            }
        })?;
        let target = target.to_string();
        Ok(ReaderStream::new(receiver)
            .map(move |chunk| {
                chunk
                    .map(|data| OutputChunk { stream: kind, data })
                    .map_err(|error| RuntimeError::Request {
                        action: "read the output of container",
                        target: target.clone(),
                        source: Box::new(error),
                    })
            })
            .boxed())
    };
    let stdout = stream(stdout, StdStream::Stdout)?;
    let stderr = stream(stderr, StdStream::Stderr)?;
    Ok(futures::stream::select(stdout, stderr).boxed())
}

/// Unmounts the overlay and removes the bundle directory, logging what
/// fails: the container has already gone at this point.
async fn discard_bundle(container: &OciContainer) {
    let overlay = container
        .overlay
        .lock()
        .ok()
        .and_then(|mut overlay| overlay.take());
    if let Some(merged) = overlay {
        unmount(&merged).await;
    }
    if let Err(error) = remove_bundle(&container.bundle).await {
        tracing::warn!(container = %container.name, error = %error, "failed to remove the bundle");
    }
}

async fn remove_bundle(bundle: &Path) -> Result<(), RuntimeError> {
    let path = bundle.to_path_buf();
    let removed = tokio::task::spawn_blocking(move || remove_any(&path))
        .await
        .map_err(io::Error::other)
        .and_then(|result| result);
    removed.map_err(|error| io_error("remove the bundle", bundle, error))
}

/// Mounts an overlay of `lower` (read-only) and `upper` at `merged`.
/// Returns the reason on failure.
async fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Result<(), String> {
    // The mount options are separated by commas and lower directories by
    // colons, so paths holding either cannot be given.
    for path in [lower, upper, work] {
        let text = path.display().to_string();
        if text.contains(',') || text.contains(':') {
            return Err(format!("the path {text} contains ',' or ':'"));
        }
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let output = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &options])
        .arg(merged)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| format!("failed to run mount: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Unmounts `path`, lazily if it is busy; logs a failure.
async fn unmount(path: &Path) {
    for args in [&[][..], &["-l"][..]] {
        let result = Command::new("umount")
            .args(args)
            .arg(path)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await;
        match result {
            Ok(output) if output.status.success() => return,
            Ok(output) => {
                let message = String::from_utf8_lossy(&output.stderr);
                if message.contains("not mounted") || message.contains("no mount point") {
                    return;
                }
                tracing::warn!(path = %path.display(), "umount failed: {}", message.trim());
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %error, "failed to run umount");
                return;
            }
        }
    }
}

/// Runs a program and returns its stdout; a failure carries its stderr.
pub(super) async fn run<I, S>(
    program: &Path,
    args: I,
    action: &'static str,
    target: &str,
) -> Result<Vec<u8>, RuntimeError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| RuntimeError::Request {
            action: "run",
            target: program.display().to_string(),
            source: Box::new(error),
        })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(RuntimeError::Command {
        program: program.display().to_string(),
        action,
        target: target.to_string(),
        status: output.status.to_string(),
        message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Waits for the process `pid`, a child of this process, and returns its
/// exit status (128 + N for signal N).
pub(super) fn wait_for_exit(pid: i32) -> Result<i64, String> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(i64::from(code)),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i64),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => {
                return Err(format!(
                "failed to wait for process {pid}, which is not a child of the supervisor: {error}"
            ))
            }
        }
    }
}

/// Returns the memory cgroup directory of the cgroup `path`, on a
/// unified (v2) or a legacy (v1) hierarchy.
fn memory_cgroup_dir(path: &str) -> PathBuf {
    let relative = path.trim_start_matches('/');
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Path::new("/sys/fs/cgroup").join(relative)
    } else {
        Path::new("/sys/fs/cgroup/memory").join(relative)
    }
}

/// Reads the OOM kill count of a memory cgroup: `memory.events` on cgroup
/// v2, `memory.oom_control` on v1 (Linux 4.13 and later).
fn read_oom_kills(cgroup: &Path) -> Option<u64> {
    ["memory.events", "memory.oom_control"]
        .iter()
        .find_map(|file| std::fs::read_to_string(cgroup.join(file)).ok())
        .and_then(|text| parse_oom_kills(&text))
}

fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

pub(super) fn io_error(action: &'static str, path: &Path, error: io::Error) -> RuntimeError {
    RuntimeError::Request {
        action,
        target: path.display().to_string(),
        source: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_parse_from_both_cgroup_versions() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(1));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills("under_oom 0\n"), None);
    }
}
