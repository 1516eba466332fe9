//! The container runtime contract, and its implementations.
//!
//! A [`Runtime`] runs one container described by a [`ContainerSpec`]. It
//! makes the image available, creates the container, streams its stdout
//! and stderr, starts it and waits for its exit code. It stops the
//! container politely (the stop signal, a grace period, then SIGKILL) and
//! removes it. The supervisor calls these steps in that order and owns the
//! decisions between them, and a runtime only carries them out.
//!
//! [`docker::DockerRuntime`] speaks the Docker Engine API, which Docker and
//! Podman both serve. [`oci::OciRuntime`] runs crun or runc on a bundle
//! unpacked from a `docker save` archive, and
//! [`singularity::SingularityRuntime`] runs Singularity or Apptainer on a
//! SIF file built from such an archive. [`select::connect_runtime`] picks
//! one by the `supervisor.runtime` key.

pub mod bundle;
pub mod cache;
pub mod devices;
pub mod docker;
mod docker_exec;
pub mod exec;
pub mod oci;
mod oci_exec;
mod podman_exec;
pub mod rootfs;
pub mod select;
pub mod singularity;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::archive::{ArchiveError, ImageArchive};
use crate::gpu::GpuAssignment;

/// A boxed error from the runtime's own client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Label that carries the Berth container UUID on every runtime container
/// the supervisor creates, so leftovers can be found.
pub const CONTAINER_UUID_LABEL: &str = "org.berth.container-uuid";

/// Returns the runtime container name for a Berth container.
pub fn container_name(uuid: &str) -> String {
    format!("berth-{uuid}")
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("failed to reach the container runtime at {endpoint}: {source}; check that the Docker daemon or `podman system service` is running and that supervisor.docker_host or DOCKER_HOST names its socket")]
    Unreachable {
        endpoint: String,
        #[source]
        source: BoxError,
    },
    #[error("invalid Docker host {endpoint:?}: expected unix:///path/to.sock, tcp://host:port or http://host:port")]
    InvalidEndpoint { endpoint: String },
    #[error("image {image} is not in the container runtime's image store on this node, and supervisor.pull_images is off; load it on the node first (`podman load -i FILE` or `docker load -i FILE`), set container_image to the absolute path of a `docker save` archive inside a directory that supervisor.image_archive_dirs lists, or ask the administrator to set supervisor.pull_images to true")]
    ImageNotFound { image: String },
    /// The runtime's message is carried as text: bollard's own error for a
    /// failure reported mid-stream says only "Docker stream error".
    #[error("image {image} is not in the container runtime's image store on this node, and pulling it failed: {message}; check the image name and its registry, or load the image on the node first (`podman load -i FILE` or `docker load -i FILE`)")]
    PullFailed { image: String, message: String },
    #[error("failed to load image archive {path}: {source}")]
    LoadImage {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("the container runtime program {program} was not found on PATH; install it or set supervisor.{key} to its absolute path")]
    ProgramNotFound { program: String, key: &'static str },
    #[error("no container runtime is available: {reasons}; start the Docker daemon or `podman system service`, or install crun, runc, Singularity or Apptainer")]
    NoneAvailable { reasons: String },
    #[error("the {runtime} runtime runs images only from `docker save` archives, and {image} is an image name; set container_image to the absolute path of an archive inside a directory that supervisor.image_archive_dirs lists, or ask the administrator to set supervisor.runtime to docker")]
    ArchiveRequired {
        runtime: &'static str,
        image: String,
    },
    #[error("failed to {action} {target}: {program} exited with {status}: {message}")]
    Command {
        program: String,
        action: &'static str,
        target: String,
        status: String,
        message: String,
    },
    #[error("{runtime} cannot start processes inside a running container, so the container's SSH gateway is not available; run the container with the docker or oci runtime (supervisor.runtime) to get shell access")]
    ExecNotSupported { runtime: String },
    #[error("{runtime} does not report a host process inside the container's root filesystem, so files cannot be copied with sftp or scp; run the container with the docker or oci runtime (supervisor.runtime) for that")]
    RootNotSupported { runtime: String },
    #[error("container {container} has no running process; it may have exited")]
    NotRunning { container: String },
    #[error("failed to {action} {target}: {source}")]
    Request {
        action: &'static str,
        target: String,
        #[source]
        source: BoxError,
    },
}

/// Creates a pipe whose two ends are closed on exec. Returns the read end
/// and the write end.
pub(crate) fn new_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Returns the path of `program`: itself if it contains a `/`, else the
/// first executable file of that name in a directory of `PATH`.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;

    let executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.components().count() > 1 || program.is_absolute() {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate))
}

/// The source of a container's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An image name or ID that the runtime's image store should hold.
    Name(String),
    /// A `docker save` archive on this node, opened from an allowed
    /// directory.
    Archive(ImageArchive),
}

impl ImageSource {
    /// Reads a record's `container_image`: an absolute path names a
    /// `docker save` archive, which is opened if it lies inside one of
    /// `allowed_dirs`, and anything else names an image in the store.
    /// Blocking for a path: call it from a blocking task.
    pub fn from_container_image(
        image: &str,
        allowed_dirs: &[PathBuf],
    ) -> Result<ImageSource, ArchiveError> {
        if image.starts_with('/') {
            ImageArchive::open(Path::new(image), allowed_dirs).map(ImageSource::Archive)
        } else {
            Ok(ImageSource::Name(image.to_string()))
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Name(name) => write!(f, "image {name}"),
            ImageSource::Archive(archive) => {
                write!(f, "image archive {}", archive.path().display())
            }
        }
    }
}

/// A host path bound into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// The network a container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A loopback interface only.
    None,
    /// The runtime's default network, or the named network mode.
    Enabled { mode: Option<String> },
}

/// Everything a runtime needs to create one container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// The runtime container's name, `berth-<uuid>`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The image reference that [`Runtime::ensure_image`] returned.
    pub image: String,
    /// The command and its arguments, run without a shell.
    pub command: Vec<String>,
    /// `NAME=value` entries: the container record's environment only.
    pub env: Vec<String>,
    /// The working directory, or `None` for the image's default.
    pub working_dir: Option<String>,
    /// Memory limit in bytes, swap included (so no swap is used).
    pub memory_bytes: Option<i64>,
    /// CPU limit in billionths of a CPU.
    pub nano_cpus: Option<i64>,
    pub network: Network,
    pub binds: Vec<BindMount>,
    /// The container's GPUs, or `None` for a container without GPUs.
    pub gpus: Option<GpuAssignment>,
}

/// The output stream a chunk came from. The names are the log stream
/// names of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdStream {
    Stdout,
    Stderr,
}

impl StdStream {
    pub fn as_str(self) -> &'static str {
        match self {
            StdStream::Stdout => "stdout",
            StdStream::Stderr => "stderr",
        }
    }
}

/// Bytes a container wrote to one of its output streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: StdStream,
    pub data: Bytes,
}

/// A container's stdout and stderr, in the order the runtime delivered
/// them; the stream ends when the container's output ends.
pub type OutputStream = BoxStream<'static, Result<OutputChunk, RuntimeError>>;

/// The runtime's handle of a created container.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerId(pub String);

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The executor contract: the steps that run one container.
#[async_trait]
pub trait Runtime: Send + Sync + fmt::Debug {
    /// Returns the runtime's name and version, for the supervisor log.
    fn description(&self) -> String;

    /// Makes the image available and returns the reference to create the
    /// container from. An archive is loaded only when the store does not
    /// already hold the image it contains.
    async fn ensure_image(&self, source: &ImageSource) -> Result<String, RuntimeError>;

    /// Creates the container, replacing a leftover container of the same
    /// name. The container is not started.
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError>;

    /// Streams the container's stdout and stderr. Called before
    /// [`Runtime::start`], so no output is lost.
    async fn attach(&self, id: &ContainerId) -> Result<OutputStream, RuntimeError>;

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError>;

    /// Waits until the container has exited and returns its exit code
    /// (128 + N for a process ended by signal N).
    async fn wait(&self, id: &ContainerId) -> Result<i64, RuntimeError>;

    /// Sends the container's stop signal, waits up to `grace`, then kills
    /// it. A container that has already exited or is gone counts as
    /// stopped.
    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError>;

    /// Removes the container, killing it if it still runs. A container
    /// that is already gone counts as removed.
    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError>;

    /// Returns the host process ID of the container's main process while
    /// it runs, so its cgroup can be found for resource statistics.
    /// Returns `None` when the container is not running or the runtime
    /// does not report the process; the default reports none.
    async fn pid(&self, _id: &ContainerId) -> Result<Option<u32>, RuntimeError> {
        Ok(None)
    }

    /// Returns the host PID of a process in the container's own mount
    /// namespace and root directory, so that `/proc/PID/root` is the
    /// container's filesystem as its processes see it, bind mounts
    /// included. The default, for a runtime whose processes do not run
    /// under a root directory of their own (Singularity's process is the
    /// host's `singularity` command), returns
    /// [`RuntimeError::RootNotSupported`].
    async fn root_pid(&self, _id: &ContainerId) -> Result<u32, RuntimeError> {
        Err(RuntimeError::RootNotSupported {
            runtime: self.description(),
        })
    }

    /// Returns whether the runtime recorded that the kernel killed the
    /// container for memory. Called after [`Runtime::wait`] and before
    /// [`Runtime::remove`]. The default, for a runtime that keeps no such
    /// record, is false.
    async fn oom_killed(&self, _id: &ContainerId) -> Result<bool, RuntimeError> {
        Ok(false)
    }

    /// Starts a process inside the running container. The default, for a
    /// runtime that cannot, returns [`RuntimeError::ExecNotSupported`].
    async fn exec(
        &self,
        _id: &ContainerId,
        _spec: &exec::ExecSpec,
    ) -> Result<exec::ExecProcess, RuntimeError> {
        Err(RuntimeError::ExecNotSupported {
            runtime: self.description(),
        })
    }

    /// Reads a regular file of the container's filesystem, up to
    /// `max_bytes`, for facts such as its `/etc/passwd`. Returns `None`
    /// for a missing file. A symbolic link is not followed out of the
    /// container. The default returns [`RuntimeError::ExecNotSupported`].
    async fn read_file(
        &self,
        _id: &ContainerId,
        _path: &str,
        _max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, RuntimeError> {
        Err(RuntimeError::ExecNotSupported {
            runtime: self.description(),
        })
    }
}
