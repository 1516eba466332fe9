//! The Docker Engine API runtime, through bollard; Docker and Podman
//! (`podman system service`) both serve this API.
//!
//! Every request uses API version 1.41 ([`API_VERSION`]), which Docker
//! Engine 20.10 and later and Podman 3 and later serve. Some calls last as long as the container or the image
//! transfer: attach, wait, stop with its grace period, image load and
//! pull. They use a client without bollard's per-request timeout, and
//! every other call keeps it.
//!
//! An image name that the store does not hold is pulled only when
//! [`DockerRuntime::with_image_pulls`] enabled pulls, because a pull makes
//! the daemon contact whatever registry the name gives.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::{
    AttachContainerOptions, Config as CreateConfig, CreateContainerOptions,
    InspectContainerOptions, LogOutput, RemoveContainerOptions, StartContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use bollard::errors::Error as DockerError;
use bollard::image::{CreateImageOptions, ImportImageOptions};
use bollard::models::{ContainerState, DeviceMapping, DeviceRequest, HostConfig};
use bollard::{ClientVersion, Docker};
use futures::{StreamExt, TryStreamExt};
use tokio_util::io::ReaderStream;

use super::podman_exec::{PodmanCli, PodmanRoute};
use super::{
    find_program, BindMount, ContainerId, ContainerSpec, ImageSource, Network, OutputChunk,
    OutputStream, Runtime, RuntimeError, StdStream,
};
use crate::archive::ImageArchive;
use crate::gpu::{GpuAssignment, GpuDevices, GpuStack};
use crate::image::ArchiveImage;

/// The Docker Engine API version of every request: 1.41, served by Docker
/// Engine 20.10 and later and by Podman 3 and later. A fixed version saves
/// the negotiation's `/version` call, which takes Podman about 0.35 s.
pub const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Time allowed for ordinary Docker API calls (inspect, create, start,
/// remove).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Attempts of an image inspect that the engine fails with a 5xx.
const IMAGE_INSPECT_ATTEMPTS: u32 = 3;

/// Pause between those attempts.
const IMAGE_INSPECT_PAUSE: Duration = Duration::from_millis(500);

/// Time between two inspections of a container while [`Runtime::wait`]
/// waits for its exit: the longest the wait takes to see an exit that
/// the engine's own wait missed.
const EXIT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Inspections that must show a negative exit code before the
/// wait takes it: the engine's own wait normally reports the real code
/// first.
const UNKNOWN_EXIT_CHECKS: u32 = 10;

/// Time allowed for calls that last as long as the container or the image
/// transfer: no practical limit, because the caller bounds them itself.
const UNBOUNDED_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A Docker Engine API endpoint.
#[derive(Clone)]
pub struct DockerRuntime {
    endpoint: String,
    docker: Docker,
    /// The same connection without a request timeout.
    unbounded: Docker,
    description: String,
    /// Whether a missing named image is pulled; off unless
    /// [`DockerRuntime::with_image_pulls`] turns it on.
    pull_images: bool,
    /// The Podman command line that finds the route of execs, if
    /// [`DockerRuntime::with_podman_command`] named one. The first exec
    /// finds out whether the engine is Podman.
    podman_command: Option<PathBuf>,
    /// Whether execs may run through Podman's OCI runtime directly; on
    /// unless [`DockerRuntime::with_podman_runtime_exec`] turns it off.
    podman_runtime_exec: bool,
    podman_cli: Arc<tokio::sync::OnceCell<Option<PodmanCli>>>,
}

/// The route of the execs in a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecRoute {
    /// Through the engine's exec API.
    EngineApi,
    /// Without a terminal through `podman exec`, with one through the API.
    PodmanCommand,
    /// Through Podman's OCI runtime, run by the supervisor.
    OciRuntime,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("endpoint", &self.endpoint)
            .field("description", &self.description)
            .field("pull_images", &self.pull_images)
            .field("podman_command", &self.podman_command)
            .field("podman_runtime_exec", &self.podman_runtime_exec)
            .finish()
    }
}

impl DockerRuntime {
    /// Connects to `endpoint` (`unix:///path`, a bare socket path,
    /// `tcp://host:port` or `http://host:port`) and checks that it replies
    /// to `/_ping`. Requests use API version [`API_VERSION`].
    pub async fn connect(endpoint: &str) -> Result<DockerRuntime, RuntimeError> {
        let unreachable = |source: DockerError| RuntimeError::Unreachable {
            endpoint: endpoint.to_string(),
            source: Box::new(source),
        };
        let timeout = REQUEST_TIMEOUT.as_secs();
        let docker = if endpoint.starts_with("unix://") || endpoint.starts_with('/') {
            Docker::connect_with_unix(endpoint, timeout, &API_VERSION)
        } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
            Docker::connect_with_http(endpoint, timeout, &API_VERSION)
        } else {
            return Err(RuntimeError::InvalidEndpoint {
                endpoint: endpoint.to_string(),
            });
        }
        .map_err(unreachable)?;
        docker.ping().await.map_err(unreachable)?;
        let description = format!(
            "Docker Engine API {}.{} at {endpoint}",
            API_VERSION.major_version, API_VERSION.minor_version
        );
        let unbounded = docker.clone().with_timeout(UNBOUNDED_TIMEOUT);
        Ok(DockerRuntime {
            endpoint: endpoint.to_string(),
            docker,
            unbounded,
            description,
            pull_images: false,
            podman_command: None,
            podman_runtime_exec: true,
            podman_cli: Arc::default(),
        })
    }

    /// Returns the server's name and version, such as `Podman Engine
    /// 4.3.1`, from `/version`. Podman takes about 0.35 s to reply, so the
    /// supervisor requests it while the container starts, only for its log.
    pub async fn server_version(&self) -> Result<String, RuntimeError> {
        let version = self
            .docker
            .version()
            .await
            .map_err(|source| RuntimeError::Unreachable {
                endpoint: self.endpoint.clone(),
                source: Box::new(source),
            })?;
        let server = version
            .components
            .as_ref()
            .and_then(|components| components.first())
            .map(|component| format!("{} {}", component.name, component.version))
            .or_else(|| {
                version
                    .version
                    .as_ref()
                    .map(|v| format!("Docker Engine {v}"))
            })
            .unwrap_or_else(|| "an unknown server".to_string());
        let api = version.api_version.unwrap_or_default();
        Ok(format!("{server}, API {api}"))
    }

    /// Sets whether an image name that the store does not hold is pulled
    /// from its registry. Off by default.
    pub fn with_image_pulls(mut self, enabled: bool) -> DockerRuntime {
        self.pull_images = enabled;
        self
    }

    /// Sets the Podman command line (`supervisor.podman_command`) that,
    /// when the engine is Podman on this node, finds a faster route than
    /// Podman's exec API for each container's execs: Podman's OCI runtime
    /// or `podman exec`. `None` keeps every exec on the API.
    pub fn with_podman_command(mut self, program: Option<PathBuf>) -> DockerRuntime {
        self.podman_command = program;
        self.podman_cli = Arc::default();
        self
    }

    /// Sets whether execs in Podman's containers may run through its OCI
    /// runtime directly (`supervisor.podman_runtime_exec`); on by default.
    pub fn with_podman_runtime_exec(mut self, enabled: bool) -> DockerRuntime {
        self.podman_runtime_exec = enabled;
        self.podman_cli = Arc::default();
        self
    }

    /// Returns the Podman command line and the route of the execs in the
    /// container `id`, when the engine is Podman on this node.
    pub(super) async fn podman_route(&self, id: &ContainerId) -> Option<(&PodmanCli, PodmanRoute)> {
        let cli = self
            .podman_cli
            .get_or_init(|| self.detect_podman_cli())
            .await
            .as_ref()?;
        Some((cli, cli.route_for(id).await))
    }

    /// Returns how the execs in the container `id` start.
    pub async fn exec_route(&self, id: &ContainerId) -> ExecRoute {
        match self.podman_route(id).await {
            Some((_, PodmanRoute::Runtime(_))) => ExecRoute::OciRuntime,
            Some((_, PodmanRoute::Command)) => ExecRoute::PodmanCommand,
            Some((_, PodmanRoute::Api)) | None => ExecRoute::EngineApi,
        }
    }

    async fn detect_podman_cli(&self) -> Option<PodmanCli> {
        let program = self.podman_command.as_deref()?;
        let local = self.endpoint.starts_with("unix://") || self.endpoint.starts_with('/');
        if !local {
            return None;
        }
        let podman = match self.docker.version().await {
            Ok(version) => version
                .components
                .iter()
                .flatten()
                .any(|component| component.name == "Podman Engine"),
            Err(error) => {
                tracing::warn!(error = %error, "failed to ask the engine its name; execs use the API");
                return None;
            }
        };
        if !podman {
            return None;
        }
        let Some(found) = find_program(program) else {
            tracing::info!(
                program = %program.display(),
                "the engine is Podman, but its command line was not found; execs use Podman's slower exec API"
            );
            return None;
        };
        let cli = PodmanCli::new(found, self.podman_runtime_exec);
        tracing::info!(
            program = %cli.program().display(),
            "the engine is Podman: execs go around its exec API where they can"
        );
        Some(cli)
    }

    /// Returns the underlying bollard client, for inspecting containers and
    /// images in tests and tools.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Returns the client without a request timeout, for calls that last
    /// as long as a session.
    pub(super) fn unbounded(&self) -> &Docker {
        &self.unbounded
    }

    /// Inspects a container and returns its `State`.
    async fn container_state(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ContainerState>, RuntimeError> {
        let options = InspectContainerOptions { size: false };
        self.docker
            .inspect_container(&id.0, Some(options))
            .await
            .map(|inspected| inspected.state)
            .map_err(|error| request_error("inspect container", &id.0, error))
    }

    /// Returns the ID of the image `reference` names, or `None` if the
    /// store does not hold it. A 5xx is tried again a few times: Podman 4.3
    /// was seen failing the inspect of an image with "image not known",
    /// naming another image that was being removed at the same time.
    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        let mut attempt = 1;
        loop {
            match self.docker.inspect_image(reference).await {
                Ok(image) => return Ok(Some(image.id.unwrap_or_default())),
                Err(error) if is_not_found(&error) => return Ok(None),
                Err(error) if is_server_error(&error) && attempt < IMAGE_INSPECT_ATTEMPTS => {
                    tracing::warn!(image = reference, attempt, error = %daemon_message(&error), "failed to inspect the image; trying again");
                    tokio::time::sleep(IMAGE_INSPECT_PAUSE).await;
                    attempt += 1;
                }
                Err(error) => return Err(request_error("inspect image", reference, error)),
            }
        }
    }

    async fn ensure_named_image(&self, name: &str) -> Result<String, RuntimeError> {
        if self.image_id(name).await?.is_some() {
            return Ok(name.to_string());
        }
        if !self.pull_images {
            return Err(RuntimeError::ImageNotFound {
                image: name.to_string(),
            });
        }
        tracing::info!(image = name, "image not in the store; pulling it");
        let options = CreateImageOptions {
            from_image: name,
            ..Default::default()
        };
        let pulled: Result<Vec<_>, DockerError> = self
            .unbounded
            .create_image(Some(options), None, None)
            .try_collect()
            .await;
        let pull_failed = |message: String| RuntimeError::PullFailed {
            image: name.to_string(),
            message,
        };
        pulled.map_err(|error| pull_failed(daemon_message(&error)))?;
        match self.image_id(name).await? {
            Some(_) => Ok(name.to_string()),
            None => Err(pull_failed(
                "the pull ended without the image in the store".to_string(),
            )),
        }
    }

    async fn ensure_archive_image(&self, archive: &ImageArchive) -> Result<String, RuntimeError> {
        let path = archive.path();
        if let Some(reference) = self.present_reference(archive.image()).await? {
            tracing::info!(image = %reference, archive = %path.display(), "image already loaded");
            return Ok(reference);
        }
        self.load_archive(archive).await?;
        self.present_reference(archive.image())
            .await?
            .ok_or_else(|| RuntimeError::LoadImage {
                path: path.to_path_buf(),
                source: format!(
                    "the runtime loaded the archive but does not hold image {}",
                    archive.image().id
                )
                .into(),
            })
    }

    /// Returns a reference to the archive's image if the store contains
    /// it: a tag that points at the image, else the image ID.
    async fn present_reference(
        &self,
        image: &ArchiveImage,
    ) -> Result<Option<String>, RuntimeError> {
        for tag in &image.repo_tags {
            if let Some(id) = self.image_id(tag).await? {
                if same_image_id(&id, &image.id) {
                    return Ok(Some(tag.clone()));
                }
            }
        }
        match self.image_id(&image.id).await? {
            Some(id) if same_image_id(&id, &image.id) => Ok(Some(image.id.clone())),
            _ => Ok(None),
        }
    }

    /// Uploads the archive from the file [`ImageArchive::open`] checked,
    /// never from its path again.
    async fn load_archive(&self, archive: &ImageArchive) -> Result<(), RuntimeError> {
        let path = archive.path();
        let load_error = |source: BoxedSource| RuntimeError::LoadImage {
            path: path.to_path_buf(),
            source,
        };
        let file = archive
            .reopen()
            .map(tokio::fs::File::from_std)
            .map_err(|error| load_error(Box::new(error)))?;

        // bollard's upload stream carries bytes, not results: a read error
        // ends the upload early (the server then rejects a truncated
        // archive) and is reported from here.
        let read_failure: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
        let failure = read_failure.clone();
        let body = ReaderStream::new(file).scan((), move |_, chunk| {
            let next = match chunk {
                Ok(bytes) => Some(bytes),
                Err(error) => {
                    if let Ok(mut slot) = failure.lock() {
                        *slot = Some(error);
                    }
                    None
                }
            };
            futures::future::ready(next)
        });

        let loaded: Result<Vec<_>, DockerError> = self
            .unbounded
            .import_image_stream(ImportImageOptions { quiet: true }, body, None)
            .try_collect()
            .await;
        if let Some(error) = read_failure.lock().ok().and_then(|mut slot| slot.take()) {
            return Err(load_error(Box::new(error)));
        }
        loaded.map_err(|error| load_error(Box::new(error)))?;
        tracing::info!(archive = %path.display(), "loaded image archive");
        Ok(())
    }
}

type BoxedSource = super::BoxError;

#[async_trait]
impl Runtime for DockerRuntime {
    fn description(&self) -> String {
        self.description.clone()
    }

    async fn ensure_image(&self, source: &ImageSource) -> Result<String, RuntimeError> {
        match source {
            ImageSource::Name(name) => self.ensure_named_image(name).await,
            ImageSource::Archive(archive) => self.ensure_archive_image(archive).await,
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        // A container of this name is a leftover of an earlier attempt on
        // this node; it must go before the name can be reused.
        self.remove(&ContainerId(spec.name.clone())).await?;
        let options = CreateContainerOptions {
            name: spec.name.clone(),
            platform: None,
        };
        let created = self
            .docker
            .create_container(Some(options), create_config(spec))
            .await
            .map_err(|error| request_error("create container", &spec.name, error))?;
        for warning in &created.warnings {
            tracing::warn!(container = %spec.name, "runtime warning: {warning}");
        }
        Ok(ContainerId(created.id))
    }

    async fn attach(&self, id: &ContainerId) -> Result<OutputStream, RuntimeError> {
        let options = AttachContainerOptions::<String> {
            stdout: Some(true),
            stderr: Some(true),
            stream: Some(true),
            logs: Some(false),
            ..Default::default()
        };
        let attached = self
            .unbounded
            .attach_container(&id.0, Some(options))
            .await
            .map_err(|error| request_error("attach to container", &id.0, error))?;
        let target = id.0.clone();
        let output = attached
            .output
            .filter_map(move |item| {
                futures::future::ready(output_chunk(item, |error| {
                    request_error("read the output of container", &target, error)
                }))
            })
            .boxed();
        Ok(output)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        self.docker
            .start_container(&id.0, None::<StartContainerOptions<String>>)
            .await
            .map_err(|error| request_error("start container", &id.0, error))
    }

    /// Waits with the `next-exit` condition, which Podman 4 serves from its
    /// event stream. For `not-running`, Podman 4.3's compatible API checks
    /// the container's state in a loop with a 1 ns pause, and its service
    /// then used about one CPU for as long as the container ran.
    /// The engine may register the wait only after the container has
    /// exited, so the container is also inspected every
    /// [`EXIT_CHECK_INTERVAL`] until one of the two reports the exit.
    async fn wait(&self, id: &ContainerId) -> Result<i64, RuntimeError> {
        let options = WaitContainerOptions {
            condition: "next-exit",
        };
        let mut next_exit = self.unbounded.wait_container(&id.0, Some(options));
        let mut checks = tokio::time::interval(EXIT_CHECK_INTERVAL);
        let mut check_failed = false;
        let mut unknown_codes = 0;
        loop {
            tokio::select! {
                response = next_exit.next() => return wait_response(response, id),
                _ = checks.tick() => match self.container_state(id).await {
                    Ok(state) => match state.as_ref().and_then(exit_code) {
                        // A test run saw Podman show an exited container
                        // with exit code -1, probably before it had read
                        // conmon's exit file, so a negative code must stay.
                        Some(code) if code < 0 && unknown_codes < UNKNOWN_EXIT_CHECKS => {
                            unknown_codes += 1;
                        }
                        Some(code) => return Ok(code),
                        None => {}
                    },
                    // The engine's wait still reports the exit, so a
                    // failed check only delays a missed one.
                    Err(error) if !check_failed => {
                        check_failed = true;
                        tracing::warn!(container = %id.0, error = %error,
                            "failed to inspect a container while waiting for its exit; \
                             the engine's wait still reports it");
                    }
                    Err(_) => {}
                },
            }
        }
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        // The API takes whole seconds; round up so the grace is never cut.
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let options = StopContainerOptions {
            t: i64::try_from(seconds).unwrap_or(i64::MAX),
        };
        match self.unbounded.stop_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(request_error("stop container", &id.0, error)),
        }
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(request_error("remove container", &id.0, error)),
        }
    }

    async fn pid(&self, id: &ContainerId) -> Result<Option<u32>, RuntimeError> {
        let state = self.container_state(id).await?;
        // A container that is not running reports PID 0.
        let pid = state
            .filter(|state| state.running == Some(true))
            .and_then(|state| state.pid)
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|pid| *pid > 0);
        Ok(pid)
    }

    /// The container's main process, `State.Pid` of the inspect reply.
    async fn root_pid(&self, id: &ContainerId) -> Result<u32, RuntimeError> {
        Runtime::pid(self, id)
            .await?
            .ok_or_else(|| RuntimeError::NotRunning {
                container: id.0.clone(),
            })
    }

    async fn oom_killed(&self, id: &ContainerId) -> Result<bool, RuntimeError> {
        let state = self.container_state(id).await?;
        Ok(state.and_then(|state| state.oom_killed).unwrap_or(false))
    }

    async fn exec(
        &self,
        id: &ContainerId,
        spec: &super::exec::ExecSpec,
    ) -> Result<super::exec::ExecProcess, RuntimeError> {
        self.exec_process(id, spec).await
    }

    async fn read_file(
        &self,
        id: &ContainerId,
        path: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, RuntimeError> {
        self.read_container_file(id, path, max_bytes).await
    }
}

fn create_config(spec: &ContainerSpec) -> CreateConfig<String> {
    let network_mode = match &spec.network {
        Network::None => Some("none".to_string()),
        Network::Enabled { mode } => mode.clone(),
    };
    let mut env = spec.env.clone();
    let mut host_config = HostConfig {
        binds: Some(spec.binds.iter().map(bind_string).collect()),
        memory: spec.memory_bytes,
        memory_swap: spec.memory_bytes,
        nano_cpus: spec.nano_cpus,
        network_mode,
        auto_remove: Some(false),
        ..Default::default()
    };
    if let Some(gpus) = &spec.gpus {
        add_gpus(&mut host_config, &mut env, gpus);
    }
    CreateConfig {
        image: Some(spec.image.clone()),
        cmd: Some(spec.command.clone()),
        env: Some(env),
        working_dir: spec.working_dir.clone(),
        labels: Some(
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        ),
        attach_stdin: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// Adds the container's GPUs to the create request, in the form
/// [`GpuDevices`] names (the module [`crate::gpu`] describes each).
fn add_gpus(host_config: &mut HostConfig, env: &mut Vec<String>, gpus: &GpuAssignment) {
    let ids = (!gpus.device_ids.is_empty()).then(|| gpus.device_ids.clone());
    match (gpus.devices, gpus.stack) {
        (GpuDevices::Docker, GpuStack::Cuda) => {
            host_config.device_requests = Some(vec![DeviceRequest {
                driver: Some("nvidia".to_string()),
                // Docker's `--gpus N` sends a count, `--gpus device=0,1` ids.
                count: ids
                    .is_none()
                    .then(|| i64::try_from(gpus.count).unwrap_or(i64::MAX)),
                device_ids: ids,
                capabilities: Some(vec![vec!["gpu".to_string()]]),
                options: None,
            }]);
        }
        (GpuDevices::Docker, GpuStack::Rocm) => {
            host_config.devices = Some(
                ["/dev/kfd", "/dev/dri"]
                    .into_iter()
                    .map(|path| DeviceMapping {
                        path_on_host: Some(path.to_string()),
                        path_in_container: Some(path.to_string()),
                        cgroup_permissions: Some("rwm".to_string()),
                    })
                    .collect(),
            );
            if let Some(ids) = ids {
                env.push(format!("ROCR_VISIBLE_DEVICES={}", ids.join(",")));
            }
        }
        (GpuDevices::Cdi, _) => {
            host_config.device_requests = Some(vec![DeviceRequest {
                driver: Some("cdi".to_string()),
                device_ids: Some(gpus.cdi_names()),
                ..Default::default()
            }]);
        }
        (GpuDevices::PodmanCdi, _) => {
            host_config.devices = Some(
                gpus.cdi_names()
                    .into_iter()
                    .map(|name| DeviceMapping {
                        path_on_host: Some(name),
                        ..Default::default()
                    })
                    .collect(),
            );
        }
    }
}

/// Formats a bind as the API's `host:container[:ro]`.
fn bind_string(bind: &BindMount) -> String {
    let mode = if bind.read_only { ":ro" } else { "" };
    format!("{}:{}{mode}", bind.host_path.display(), bind.container_path)
}

/// Turns one item of an attach or exec output stream into an
/// [`OutputChunk`]; echoed stdin is dropped, and `error` wraps a failure.
pub(super) fn output_chunk(
    item: Result<LogOutput, DockerError>,
    error: impl FnOnce(DockerError) -> RuntimeError,
) -> Option<Result<OutputChunk, RuntimeError>> {
    match item {
        Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
            Some(Ok(OutputChunk {
                stream: StdStream::Stdout,
                data: message,
            }))
        }
        Ok(LogOutput::StdErr { message }) => Some(Ok(OutputChunk {
            stream: StdStream::Stderr,
            data: message,
        })),
        Ok(LogOutput::StdIn { .. }) => None,
        Err(failure) => Some(Err(error(failure))),
    }
}

/// Returns the exit code of a wait response, or the error of a wait that
/// ended without one.
fn wait_response(
    response: Option<Result<bollard::models::ContainerWaitResponse, DockerError>>,
    id: &ContainerId,
) -> Result<i64, RuntimeError> {
    match response {
        Some(Ok(response)) => Ok(response.status_code),
        // bollard reports a non-zero exit status as an error.
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(error)) => Err(request_error("wait for container", &id.0, error)),
        None => Err(RuntimeError::Request {
            action: "wait for container",
            target: id.0.clone(),
            source: "the runtime ended the wait without an exit status".into(),
        }),
    }
}

/// Returns the exit code of a container that has run and exited, or
/// `None` while it runs. A container that is created but not started yet
/// has not exited either.
fn exit_code(state: &ContainerState) -> Option<i64> {
    use bollard::models::ContainerStateStatusEnum as Status;

    let ended = matches!(
        state.status,
        Some(Status::EXITED | Status::DEAD | Status::REMOVING)
    );
    if !ended || state.running == Some(true) {
        return None;
    }
    Some(state.exit_code.unwrap_or(0))
}

/// True for a 5xx response of the engine.
fn is_server_error(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError { status_code, .. } if *status_code >= 500
    )
}

pub(super) fn is_not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Returns the daemon's own message for a failed request.
pub(super) fn daemon_message(error: &DockerError) -> String {
    match error {
        DockerError::DockerStreamError { error } => error.clone(),
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => format!("{message} (HTTP status {status_code})"),
        other => other.to_string(),
    }
}

fn same_image_id(a: &str, b: &str) -> bool {
    let strip = |id: &str| {
        id.strip_prefix("sha256:")
            .unwrap_or(id)
            .to_ascii_lowercase()
    };
    !a.is_empty() && strip(a) == strip(b)
}

fn request_error(action: &'static str, target: &str, error: DockerError) -> RuntimeError {
    RuntimeError::Request {
        action,
        target: target.to_string(),
        source: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    #[test]
    fn server_errors_are_only_5xx() {
        let response = |status_code| DockerError::DockerResponseServerError {
            status_code,
            message: "image not known".into(),
        };
        assert!(is_server_error(&response(500)));
        assert!(is_server_error(&response(503)));
        assert!(!is_server_error(&response(404)));
        assert!(!is_server_error(&response(409)));
    }

    #[test]
    fn exit_code_only_of_an_ended_container() {
        use bollard::models::ContainerStateStatusEnum as Status;

        let state = |status, running, exit_code| ContainerState {
            status: Some(status),
            running: Some(running),
            exit_code,
            ..Default::default()
        };
        assert_eq!(
            exit_code(&state(Status::EXITED, false, Some(137))),
            Some(137)
        );
        assert_eq!(exit_code(&state(Status::DEAD, false, Some(1))), Some(1));
        assert_eq!(exit_code(&state(Status::EXITED, false, None)), Some(0));
        assert_eq!(exit_code(&state(Status::RUNNING, true, Some(0))), None);
        assert_eq!(exit_code(&state(Status::PAUSED, true, Some(0))), None);
        assert_eq!(exit_code(&state(Status::CREATED, false, Some(0))), None);
        assert_eq!(exit_code(&ContainerState::default()), None);
    }

    fn spec(network: Network) -> ContainerSpec {
        ContainerSpec {
            name: "berth-zzzzz-dz642-0123456789abcde".into(),
            labels: BTreeMap::from([(
                "org.berth.container-uuid".into(),
                "zzzzz-dz642-0123456789abcde".into(),
            )]),
            image: "localhost/busybox:latest".into(),
            command: vec!["echo".into(), "hi there".into()],
            env: vec!["A=1".into()],
            working_dir: None,
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(500_000_000),
            network,
            binds: vec![
                BindMount {
                    host_path: PathBuf::from("/tmp/x/mountdata0"),
                    container_path: "/etc/p.json".into(),
                    read_only: true,
                },
                BindMount {
                    host_path: PathBuf::from("/tmp/x/tmp1"),
                    container_path: "/tmp".into(),
                    read_only: false,
                },
            ],
            gpus: None,
        }
    }

    fn with_gpus(stack: GpuStack, devices: GpuDevices, ids: &[&str]) -> CreateConfig<String> {
        let mut spec = spec(Network::None);
        spec.gpus = Some(GpuAssignment {
            stack,
            count: 2,
            device_ids: ids.iter().map(|id| id.to_string()).collect(),
            devices,
        });
        create_config(&spec)
    }

    /// Serialises the create request's `HostConfig` as the Docker Engine
    /// API receives it.
    fn host_json(config: &CreateConfig<String>) -> serde_json::Value {
        serde_json::to_value(config.host_config.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn cuda_gpus_become_an_nvidia_device_request() {
        let config = with_gpus(GpuStack::Cuda, GpuDevices::Docker, &[]);
        assert_eq!(
            host_json(&config)["DeviceRequests"],
            serde_json::json!([{"Driver": "nvidia", "Count": 2, "Capabilities": [["gpu"]]}])
        );
        let config = with_gpus(GpuStack::Cuda, GpuDevices::Docker, &["1", "3"]);
        assert_eq!(
            host_json(&config)["DeviceRequests"],
            serde_json::json!([{"Driver": "nvidia", "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]]}])
        );
        assert_eq!(config.env, Some(vec!["A=1".to_string()]));
    }

    #[test]
    fn rocm_gpus_become_amd_device_files() {
        let config = with_gpus(GpuStack::Rocm, GpuDevices::Docker, &["0", "1"]);
        let host = host_json(&config);
        assert_eq!(
            host["Devices"],
            serde_json::json!([
                {"PathOnHost": "/dev/kfd", "PathInContainer": "/dev/kfd", "CgroupPermissions": "rwm"},
                {"PathOnHost": "/dev/dri", "PathInContainer": "/dev/dri", "CgroupPermissions": "rwm"},
            ])
        );
        assert!(host.get("DeviceRequests").is_none(), "{host}");
        assert_eq!(
            config.env,
            Some(vec![
                "A=1".to_string(),
                "ROCR_VISIBLE_DEVICES=0,1".to_string()
            ])
        );
    }

    #[test]
    fn cdi_gpus_become_named_devices() {
        let config = with_gpus(GpuStack::Cuda, GpuDevices::Cdi, &["0", "1"]);
        assert_eq!(
            host_json(&config)["DeviceRequests"],
            serde_json::json!([{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]}])
        );
        let config = with_gpus(GpuStack::Rocm, GpuDevices::PodmanCdi, &[]);
        let host = host_json(&config);
        assert_eq!(
            host["Devices"],
            serde_json::json!([{"PathOnHost": "amd.com/gpu=all"}])
        );
        assert!(host.get("DeviceRequests").is_none(), "{host}");
    }

    #[test]
    fn no_gpus_no_devices() {
        let host = host_json(&create_config(&spec(Network::None)));
        assert!(host.get("DeviceRequests").is_none(), "{host}");
        assert!(host.get("Devices").is_none(), "{host}");
    }

    #[test]
    fn create_config_maps_the_spec() {
        let config = create_config(&spec(Network::None));
        assert_eq!(
            config.cmd,
            Some(vec!["echo".to_string(), "hi there".to_string()])
        );
        assert_eq!(config.env, Some(vec!["A=1".to_string()]));
        assert_eq!(config.working_dir, None);
        assert_eq!(config.tty, Some(false));
        let host = config.host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.auto_remove, Some(false));
        assert_eq!(
            host.binds,
            Some(vec![
                "/tmp/x/mountdata0:/etc/p.json:ro".to_string(),
                "/tmp/x/tmp1:/tmp".to_string()
            ])
        );
    }

    #[test]
    fn enabled_network_uses_the_configured_mode() {
        let host = create_config(&spec(Network::Enabled {
            mode: Some("host".into()),
        }))
        .host_config
        .unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        let host = create_config(&spec(Network::Enabled { mode: None }))
            .host_config
            .unwrap();
        assert_eq!(host.network_mode, None);
    }

    #[test]
    fn image_ids_compare_without_prefix_or_case() {
        assert!(same_image_id("sha256:ABC", "abc"));
        assert!(!same_image_id("", ""));
        assert!(!same_image_id("sha256:abc", "sha256:abd"));
    }

    #[test]
    fn daemon_message_is_the_daemon_text() {
        let stream = DockerError::DockerStreamError {
            error: "initializing source docker://localhost:1/x:latest: connection refused".into(),
        };
        assert_eq!(
            daemon_message(&stream),
            "initializing source docker://localhost:1/x:latest: connection refused"
        );
        let response = DockerError::DockerResponseServerError {
            status_code: 500,
            message: "manifest unknown".into(),
        };
        assert_eq!(
            daemon_message(&response),
            "manifest unknown (HTTP status 500)"
        );
    }

    #[tokio::test]
    async fn missing_socket_is_named_in_the_error() {
        let err = DockerRuntime::connect("unix:///nonexistent/docker.sock")
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("unix:///nonexistent/docker.sock"),
            "{message}"
        );
        assert!(message.contains("DOCKER_HOST"), "{message}");
    }

    #[tokio::test]
    async fn unknown_scheme_is_rejected() {
        let err = DockerRuntime::connect("ssh://node").await.unwrap_err();
        assert!(matches!(err, RuntimeError::InvalidEndpoint { .. }), "{err}");
    }
}
