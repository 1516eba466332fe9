//! One run of one container, from `Locked` to its final state.
//!
//! The steps, in order:
//! 1. fetch the record and check that it is `Locked`;
//! 2. plan the mounts, open the image archive if the record names one,
//!    connect to the runtime and make the image available;
//! 3. create the mounts' host side and the runtime container, and attach
//!    to its output;
//! 4. start the container, set `Running` and wait for its exit.
//!
//! Then, on every path, the cleanup runs: it stops the container if it
//! still runs, drains and flushes its output, removes it and deletes the
//! mounts. Last comes the final state: `Complete` with the exit code when
//! the container exited, else `Cancelled` with `runtime_status.error`
//! saying why. It is written to the journal first (with the output and
//! log files themselves when the controller could not be reached to save
//! them) and delivered from there, retrying for `final_update_timeout`.
//!
//! A stop request (SIGTERM, SIGINT, or the cancellation watch seeing the
//! controller cancel the container) ends whichever step is under way; a
//! request that arrives before the start prevents it. The container's
//! token may change `Locked` to `Cancelled`, so failures before `Running`
//! end in `Cancelled` as well.
//!
//! [`Run`] owns everything the run created. Its cleanup path runs
//! whatever the steps returned, and a `Drop` guard also removes the
//! runtime container should the run itself be dropped half-way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_client::{Client, ClientError};
use berth_core::{Container, ContainerState, Mount};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::archive::ArchiveError;
use crate::cache::CollectionCache;
use crate::config::Config;
use crate::gateway::{Gateway, GatewaySettings, GatewayTarget, HostKey, SessionFlag};
use crate::gpu::assign_gpus;
use crate::journal::{DeliverySettings, Entry, Part, Staging, OUTPUT_DIR};
use crate::kernel_log::KernelLog;
use crate::log_collection::{node_info, LogCollection, SUPERVISOR_LOG_FILE};
use crate::logs::{
    ApiLogSink, LogCopy, LogSettings, LogSink, LogSummary, LogWriter, SupervisorLog,
};
use crate::mounts::{plan_mounts_for_output, MountError, PreparedMounts};
use crate::output::{copy_output, save_output, Globs, OutputError, OutputSettings};
use crate::retry::{retry, API_BACKOFF};
use crate::runtime::select::{connect_runtime, ConnectedRuntime};
use crate::runtime::{
    ContainerId, ContainerSpec, ImageSource, OutputStream, Runtime, RuntimeError, StdStream,
};
use crate::spec::{container_spec, SpecError};
use crate::staging::{StagedCollections, Stager, StagingError};
use crate::stats::{OutOfMemory, RunStats, STATS_FILE, STATS_STREAM};
use crate::stop::StopHandle;
use crate::tunnel::{spawn_tunnel, TunnelSettings};
use crate::watch::spawn_cancel_watch;

mod final_state;

use final_state::{
    commit_entry, deliver_final_state, deliver_own_entry, keep_logs, log_save_is_transient,
    open_journal, set_outcome, AbortOnDrop,
};

/// Exit status of `berth supervise` when a final state was recorded.
pub const EXIT_RECORDED: i32 = 0;

/// Exit status of `berth supervise` when no final state was recorded:
/// the container was not `Locked`, or the final update failed.
pub const EXIT_NOT_RECORDED: i32 = 1;

/// Extra time allowed, after the stop grace period, for the runtime to
/// report that a stopped container has exited.
const STOP_MARGIN: Duration = Duration::from_secs(30);

/// Attempts at removing the runtime container before giving up.
const REMOVE_ATTEMPTS: u32 = 3;

/// The reason the steps ended before the container exited.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// A stop was requested; the text is its reason.
    #[error("{0}")]
    Stopped(String),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("failed to open the image archive: {0}")]
    ArchiveTask(#[source] JoinError),
    #[error("failed to connect to the container runtime: {0}")]
    ConnectTask(#[source] JoinError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("failed to set the container Running: {0}")]
    SetRunning(#[source] ClientError),
    #[error("failed to prepare the mounts: {0}")]
    Task(#[from] JoinError),
    #[error("failed to fetch the container's secret mounts: {0}")]
    SecretMounts(#[source] ClientError),
    #[error("secret mount {0} has the target of a mount")]
    SecretMountTarget(String),
    #[error("failed to save the output: {0}")]
    Output(#[from] OutputError),
}

impl RunError {
    /// Returns the message for `runtime_status.error`. It differs from
    /// `Display`, which the supervisor log gets, only for an image archive
    /// that is invalid or that the runtime failed to load. There it leaves
    /// out the problem, because a parser's message may quote the file.
    fn status_message(&self) -> String {
        match self {
            RunError::Archive(error) => error.status_message(),
            RunError::Staging(error) => error.status_message(),
            RunError::Runtime(RuntimeError::LoadImage { path, .. }) => format!(
                "failed to load image archive {}; the supervisor log has the container runtime's message",
                path.display()
            ),
            other => other.to_string(),
        }
    }
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The container ran and exited with this status, and its output was
    /// saved as the collection of this portable data hash, if it has an
    /// output directory.
    Exited(i64, Option<String>),
    /// The run ended without an exit status, for this reason.
    Cancelled(String),
}

impl Outcome {
    fn state(&self) -> ContainerState {
        match self {
            Outcome::Exited(..) => ContainerState::Complete,
            Outcome::Cancelled(_) => ContainerState::Cancelled,
        }
    }
}

/// Runs the container the credentials belong to until its final state is
/// recorded or `stop` ends it. Returns [`EXIT_RECORDED`] or
/// [`EXIT_NOT_RECORDED`]; an error means the run could not begin.
pub async fn supervise_until(
    config: Config,
    credentials: berth_client::JobCredentials,
    stop: StopHandle,
) -> anyhow::Result<i32> {
    supervise_job(config, credentials, None, stop).await
}

/// Like [`supervise_until`], and names `credentials_file` in the journal
/// entry, so that another process can deliver the entry with it.
pub async fn supervise_job(
    config: Config,
    credentials: berth_client::JobCredentials,
    credentials_file: Option<PathBuf>,
    stop: StopHandle,
) -> anyhow::Result<i32> {
    let uuid = credentials.container_uuid.clone();
    let tunnel = (!credentials.gateway_secret.is_empty()).then(|| TunnelSettings {
        api_url: credentials.api_url.clone(),
        gateway_secret: berth_core::Secret::new(credentials.gateway_secret.clone()),
        insecure: credentials.insecure,
    });
    let client = Client::new(credentials.settings())
        .with_context(|| format!("failed to build the API client for container {uuid}"))?;
    let span = tracing::info_span!("supervise", container = %uuid);
    Ok(supervise_container(
        &config,
        client,
        uuid,
        credentials_file.as_deref(),
        tunnel,
        stop,
    )
    .instrument(span)
    .await)
}

async fn supervise_container(
    config: &Config,
    client: Client,
    uuid: String,
    credentials_file: Option<&Path>,
    tunnel: Option<TunnelSettings>,
    stop: StopHandle,
) -> i32 {
    let journal = open_journal(config);
    // Entries that other supervisors on this node left are delivered in
    // the background while this one runs.
    let _background = journal.clone().map(|journal| {
        let settings = DeliverySettings::from_config(config);
        let own = uuid.clone();
        AbortOnDrop(tokio::spawn(
            async move {
                crate::journal::deliver_pending(&journal, settings, Some(&own)).await;
            }
            .in_current_span(),
        ))
    });
    if let Some(journal) = journal.as_ref().filter(|journal| journal.contains(&uuid)) {
        return deliver_own_entry(config, journal, &client, &uuid).await;
    }

    // The connection to the runtime opens while the container is fetched
    // and the logs are set up.
    let runtime_config = config.clone();
    let connecting = tokio::spawn(async move { connect_runtime(&runtime_config).await });
    let Some(container) = fetch_locked_container(config, &client, &uuid).await else {
        connecting.abort();
        return EXIT_NOT_RECORDED;
    };
    let staging = journal.as_ref().and_then(|journal| match journal.stage(&uuid) {
        Ok(staging) => Some(staging),
        Err(error) => {
            tracing::error!(error = %error, "failed to create the journal entry's staging directory; the final state will live in memory only");
            None
        }
    });

    let sink: Arc<dyn LogSink> = Arc::new(ApiLogSink::new(client.clone(), uuid.clone()));
    let log_settings = LogSettings::from_config(config);
    let log = SupervisorLog::new();
    let (logs, copies, logs_error) = match create_log_collection(config, &uuid) {
        Ok((logs, copies)) => (Some(logs), Some(copies), None),
        Err(error) => (None, None, Some(error)),
    };
    let supervisor_writer = match &copies {
        Some(copies) => LogWriter::spawn_copied(
            sink.clone(),
            "supervisor",
            log_settings,
            None,
            copies.supervisor.clone(),
        ),
        None => LogWriter::spawn(sink.clone(), "supervisor", log_settings),
    };
    let forward = log.attach(&supervisor_writer);
    log.info(format!(
        "berth {} supervising container {uuid} on {}",
        env!("CARGO_PKG_VERSION"),
        hostname()
    ));
    let mut early_warnings = Vec::new();
    if let Some(error) = logs_error {
        let warning = format!("the log collection is off: {error}");
        log.warn(&warning);
        early_warnings.push(warning);
    }
    let logs = logs.map(|logs| Arc::new(tokio::sync::Mutex::new(logs)));
    let watch = (!config.cancel_check_interval.is_zero()).then(|| {
        AbortOnDrop(spawn_cancel_watch(
            client.clone(),
            uuid.clone(),
            config.cancel_check_interval,
            stop.clone(),
            log.clone(),
        ))
    });
    let checkpoints = logs.as_ref().map(|logs| {
        spawn_log_checkpoints(
            logs.clone(),
            client.clone(),
            uuid.clone(),
            config.log_checkpoint_interval,
            log.clone(),
        )
    });

    let mut run = Run {
        config,
        connecting: Some(connecting),
        client: &client,
        uuid: &uuid,
        stop: &stop,
        log: &log,
        sink,
        log_settings,
        runtime: None,
        container: None,
        started: false,
        exited: false,
        mounts: None,
        staged: StagedCollections::default(),
        output: None,
        copies,
        globs: Globs::default(),
        warnings: early_warnings,
        stats: None,
        out_of_memory: None,
        cleaned_up: false,
        staging,
        output_pending: false,
        host_key: None,
        gateway: None,
        tunnel_settings: tunnel,
        tunnel: None,
    };
    let outcome = match run.execute_and_save(&container).await {
        Ok((code, output)) => Outcome::Exited(code, output),
        Err(RunError::Stopped(reason)) => {
            log.warn(format!("stopping: {reason}"));
            Outcome::Cancelled(reason)
        }
        Err(error) => {
            log.error(error.to_string());
            Outcome::Cancelled(error.status_message())
        }
    };
    run.cleanup().await;
    drop(watch);
    let mut warnings = std::mem::take(&mut run.warnings);
    let out_of_memory = run.out_of_memory.take();
    let staging = run.staging.take();
    let output_pending = run.output_pending;
    drop(run);

    // The final state goes to the journal before the logs are flushed and
    // saved, which may take minutes while the controller is down, so a
    // supervisor killed meanwhile still leaves it. The log joins later.
    let mut entry = Entry::new(&uuid, credentials_file.map(Path::to_path_buf), Value::Null);
    set_outcome(
        &mut entry,
        &outcome,
        &warnings,
        out_of_memory.as_ref(),
        output_pending,
    );
    let locked = commit_entry(staging, &entry);

    // The supervisor stream is flushed before the final state, because
    // the controller revokes the container's token once it is recorded.
    log.info(format!("setting the final state {}", outcome.state()));
    log.detach();
    let _ = forward.await;
    warnings.extend(stream_warning(&supervisor_writer.close().await));

    if let Some(checkpoints) = checkpoints {
        checkpoints.abort();
        let _ = checkpoints.await;
    }
    let mut log_part = None;
    if let Some(logs) = logs {
        let mut logs = logs.lock().await;
        match logs.save(&client).await {
            Ok(pdh) => {
                tracing::info!(log = %pdh, "saved the log collection");
                log_part = Some(Part::Saved {
                    portable_data_hash: pdh,
                });
            }
            Err(error) => {
                tracing::error!(error = %error, "failed to save the final log collection");
                if log_save_is_transient(&error) {
                    log_part = keep_logs(locked.as_ref(), logs.dir());
                }
                if log_part.is_none() {
                    warnings.push(error.to_string());
                }
            }
        }
    }

    set_outcome(
        &mut entry,
        &outcome,
        &warnings,
        out_of_memory.as_ref(),
        output_pending,
    );
    entry.log = log_part;
    if let Some(locked) = &locked {
        if let Err(error) = locked.update(&entry) {
            tracing::error!(error = %error, "failed to add the log collection and the last warnings to the journal entry");
        }
    }
    deliver_final_state(config, &client, locked, entry).await
}

/// The local copies the log writers append to.
struct LogCopies {
    supervisor: LogCopy,
    stdout: LogCopy,
    stderr: LogCopy,
    stats: LogCopy,
}

/// Creates the log collection's local files, `node-info.txt` among them.
fn create_log_collection(
    config: &Config,
    uuid: &str,
) -> std::io::Result<(LogCollection, LogCopies)> {
    let temp_dir = config.resolve_temp_dir();
    let mut logs =
        LogCollection::create(&temp_dir, uuid, config.block_size, config.api_retry_timeout)?;
    logs.add_file("node-info.txt", node_info(&temp_dir).as_bytes())?;
    let copies = LogCopies {
        supervisor: logs.add_stream(SUPERVISOR_LOG_FILE)?,
        stdout: logs.add_stream("stdout.txt")?,
        stderr: logs.add_stream("stderr.txt")?,
        stats: logs.add_stream(STATS_FILE)?,
    };
    Ok((logs, copies))
}

/// Saves the log collection every `interval` and sets the container's
/// `log` to it. A failed save is logged and tried again at the next tick.
fn spawn_log_checkpoints(
    logs: Arc<tokio::sync::Mutex<LogCollection>>,
    client: Client,
    uuid: String,
    interval: Duration,
    log: SupervisorLog,
) -> JoinHandle<()> {
    tokio::spawn(
        async move {
            let mut last_pdh: Option<String> = None;
            loop {
                tokio::time::sleep(interval).await;
                let saved = logs.lock().await.save(&client).await;
                let pdh = match saved {
                    Ok(pdh) => pdh,
                    Err(error) => {
                        log.warn(format!("log checkpoint: {error}"));
                        continue;
                    }
                };
                if last_pdh.as_deref() == Some(pdh.as_str()) {
                    continue;
                }
                match client.update_container(&uuid, &json!({ "log": pdh })).await {
                    Ok(_) => {
                        tracing::info!(log = %pdh, "saved a log checkpoint");
                        last_pdh = Some(pdh);
                    }
                    Err(error) => log.warn(format!(
                        "log checkpoint: failed to set the container's log to {pdh}: {error}"
                    )),
                }
            }
        }
        .in_current_span(),
    )
}

/// Fetches the container and checks that it is `Locked`. Logs why and
/// returns `None` otherwise, leaving the record as it is.
async fn fetch_locked_container(config: &Config, client: &Client, uuid: &str) -> Option<Container> {
    let fetched = retry(
        "fetching the container",
        config.api_retry_timeout,
        API_BACKOFF,
        ClientError::is_transient,
        || client.get_container(uuid),
    )
    .await;
    let container = match fetched {
        Ok(container) => container,
        Err(error) => {
            tracing::error!(error = %error, "failed to fetch the container; its state is left unchanged");
            return None;
        }
    };
    if container.uuid != uuid {
        tracing::error!(returned = %container.uuid, "the API returned another container; its state is left unchanged");
        return None;
    }
    if container.state != ContainerState::Locked {
        tracing::error!(
            state = %container.state,
            "the container is {}, not Locked, so it is not this supervisor's to run; its state is left unchanged",
            container.state
        );
        return None;
    }
    Some(container)
}

/// The resources one run created, and the steps that create them.
struct Run<'a> {
    config: &'a Config,
    /// The connection to the container runtime, started with the run.
    connecting: Option<JoinHandle<Result<ConnectedRuntime, RuntimeError>>>,
    client: &'a Client,
    uuid: &'a str,
    stop: &'a StopHandle,
    log: &'a SupervisorLog,
    sink: Arc<dyn LogSink>,
    log_settings: LogSettings,
    runtime: Option<Arc<dyn Runtime>>,
    /// The runtime container, until it is removed.
    container: Option<ContainerId>,
    started: bool,
    /// Whether the runtime reported the container's exit.
    exited: bool,
    mounts: Option<PreparedMounts>,
    /// The collections staged in the node's cache for this run, held
    /// until the runtime container is removed.
    staged: StagedCollections,
    output: Option<Output>,
    /// The log collection's copies of stdout and stderr, if it is on.
    copies: Option<LogCopies>,
    /// The parsed `output_glob`.
    globs: Globs,
    /// Problems that did not change the outcome; recorded in
    /// `runtime_status.warning`.
    warnings: Vec<String>,
    /// The resource statistics, from the container's start until
    /// [`Run::finish_stats`] or the cleanup.
    stats: Option<RunStats>,
    /// Set when the container exited because it ran out of memory.
    out_of_memory: Option<OutOfMemory>,
    /// Whether [`Run::cleanup`] has run.
    cleaned_up: bool,
    /// The journal entry in preparation, when the journal is on.
    staging: Option<Staging>,
    /// Whether the output is kept in `staging`, to upload with the final
    /// state, because the controller could not be reached to save it.
    output_pending: bool,
    /// The gateway's host key, made when the run begins; `None` when the
    /// random source failed.
    host_key: Option<HostKey>,
    /// The SSH gateway into the running container, until the cleanup.
    gateway: Option<Gateway>,
    /// What the gateway's tunnel dials with; `None` without a gateway
    /// secret.
    tunnel_settings: Option<TunnelSettings>,
    /// The task that keeps the gateway's tunnel up, until the cleanup.
    tunnel: Option<AbortOnDrop>,
}

/// The container's output on its way to the log streams.
struct Output {
    /// Copies the runtime's output stream into the two writers; ends with
    /// the container's output.
    pump: JoinHandle<Result<(), RuntimeError>>,
    stdout: LogWriter,
    stderr: LogWriter,
    /// Lets the held writers send: cancelled once the container is
    /// `Running`, or when the writers are closed.
    release: CancellationToken,
}

impl Run<'_> {
    /// Returns the container's mounts with its secret mounts, which only
    /// its own token may fetch. A controller without the route has none.
    async fn all_mounts(&self, container: &Container) -> Result<BTreeMap<String, Mount>, RunError> {
        let fetched = retry(
            "fetching the secret mounts",
            self.config.api_retry_timeout,
            API_BACKOFF,
            ClientError::is_transient,
            || self.client.container_secret_mounts(self.uuid),
        )
        .await;
        let secret = match fetched {
            Ok(secret) => secret,
            Err(error) if error.status().map(|status| status.as_u16()) == Some(404) => {
                BTreeMap::new()
            }
            Err(error) => return Err(RunError::SecretMounts(error)),
        };
        let mut mounts = container.mounts.clone();
        for (target, mount) in secret {
            if mounts.contains_key(&target) {
                return Err(RunError::SecretMountTarget(target));
            }
            mounts.insert(target, mount);
        }
        Ok(mounts)
    }

    /// Runs the container, then saves its output. Returns the exit status
    /// and the output's portable data hash.
    async fn execute_and_save(
        &mut self,
        container: &Container,
    ) -> Result<(i64, Option<String>), RunError> {
        let code = self.execute(container).await?;
        match self.until_stopped(self.save_output(container)).await? {
            Ok(output) => Ok((code, output)),
            Err(RunError::Output(OutputError::Upload(error) | OutputError::Create(error)))
                if error.is_transient() =>
            {
                self.keep_output(container, error).await?;
                Ok((code, None))
            }
            Err(error) => Err(error),
        }
    }

    /// Copies the output into the journal entry after the controller could
    /// not be reached to save it, so that it is uploaded with the final
    /// state. Without a journal, the save's `error` fails the run.
    async fn keep_output(
        &mut self,
        container: &Container,
        error: ClientError,
    ) -> Result<(), RunError> {
        let (Some(staging), Some(host_dir)) = (&self.staging, self.output_host_dir(container)?)
        else {
            return Err(OutputError::Upload(error).into());
        };
        let dest = match staging.part_dir(OUTPUT_DIR) {
            Ok(dest) => dest,
            Err(journal_error) => {
                self.log.error(format!(
                    "failed to keep the output in the journal: {journal_error}"
                ));
                return Err(OutputError::Upload(error).into());
            }
        };
        self.log.warn(format!(
            "the controller could not be reached to save the output ({error}); keeping it in the journal to upload with the final state"
        ));
        let globs = self.globs.clone();
        let max_bytes = self.config.max_output_bytes;
        let log = self.log.clone();
        let copied = tokio::task::spawn_blocking(move || {
            copy_output(&host_dir, &globs, max_bytes, &dest, &log)
        })
        .await??;
        self.log.info(format!(
            "kept the output in the journal: {} files, {} bytes",
            copied.0, copied.1
        ));
        self.output_pending = true;
        Ok(())
    }

    /// Returns the host directory of the `tmp` mount at `output_path`, or
    /// `None` when the container has no `output_path`.
    fn output_host_dir(&self, container: &Container) -> Result<Option<PathBuf>, RunError> {
        let output_path = container.output_path.as_str();
        if output_path.is_empty() {
            return Ok(None);
        }
        let not_tmp = || OutputError::NotTmp {
            path: output_path.to_string(),
        };
        match container.mounts.get(output_path) {
            Some(mount) if mount.kind == "tmp" || mount.kind == "collection" => {}
            _ => return Err(not_tmp().into()),
        }
        let host_dir = self
            .mounts
            .as_ref()
            .and_then(|mounts| {
                mounts
                    .binds
                    .iter()
                    .find(|bind| bind.container_path == output_path && !bind.read_only)
            })
            .map(|bind| bind.host_path.clone())
            .ok_or_else(not_tmp)?;
        Ok(Some(host_dir))
    }

    /// Saves the host directory of the `tmp` mount at `output_path`.
    /// Returns `None` when the container has no `output_path`.
    async fn save_output(&self, container: &Container) -> Result<Option<String>, RunError> {
        let Some(host_dir) = self.output_host_dir(container)? else {
            return Ok(None);
        };
        let settings = OutputSettings {
            block_size: self.config.block_size,
            max_bytes: self.config.max_output_bytes,
            retry_timeout: self.config.api_retry_timeout,
            backoff: API_BACKOFF,
        };
        // NOTE: mounts below output_path (a json file in the output
        // directory, say) are separate binds and are not saved.
        let pdh = save_output(
            self.client,
            self.log,
            &host_dir,
            self.globs.clone(),
            settings,
            self.uuid,
        )
        .await?;
        Ok(Some(pdh))
    }

    /// Runs the steps up to the container's exit and returns its exit
    /// status. Leaves cleaning up to [`Run::cleanup`].
    async fn execute(&mut self, container: &Container) -> Result<i64, RunError> {
        self.check_stop()?;
        // A bad pattern fails the run before the container starts.
        self.globs = Globs::parse(&container.output_glob).map_err(OutputError::from)?;
        let plan =
            plan_mounts_for_output(&self.all_mounts(container).await?, &container.output_path)?;
        let stager = Stager {
            client: self.client,
            cache: CollectionCache::new(self.config.cache_dir.clone(), self.config.cache_max_bytes),
            retry_timeout: self.config.api_retry_timeout,
            log: self.log,
        };
        let mut staged = StagedCollections::default();
        let staging = stager.stage_image(&container.container_image, &mut staged);
        let image_archive = self.until_stopped(staging).await;
        self.staged = staged;
        let source = match image_archive?? {
            Some(archive) => ImageSource::Archive(archive),
            None => {
                let image = container.container_image.clone();
                let archive_dirs = self.config.image_archive_dirs.clone();
                let opening = tokio::task::spawn_blocking(move || {
                    ImageSource::from_container_image(&image, &archive_dirs)
                });
                self.until_stopped(opening)
                    .await?
                    .map_err(RunError::ArchiveTask)??
            }
        };
        if plan.has_collections() {
            let mut staged = std::mem::take(&mut self.staged);
            let staging = stager.stage_mounts(&plan, &mut staged);
            let result = self.until_stopped(staging).await;
            self.staged = staged;
            result??;
        }

        let connected = match self.connecting.take() {
            Some(connecting) => self
                .until_stopped(connecting)
                .await?
                .map_err(RunError::ConnectTask)??,
            None => self.until_stopped(connect_runtime(self.config)).await??,
        };
        if let Some(server) = connected.docker.clone() {
            let server_log = self.log.clone();
            tokio::spawn(async move {
                match server.server_version().await {
                    Ok(version) => server_log.info(format!("container runtime server: {version}")),
                    Err(error) => server_log.warn(format!(
                        "failed to read the container runtime's version: {error}"
                    )),
                }
            });
        }
        let runtime = connected.runtime;
        self.runtime = Some(runtime.clone());
        self.log
            .info(format!("container runtime: {}", runtime.description()));

        self.log.info(format!("preparing {source}"));
        let image = self.until_stopped(runtime.ensure_image(&source)).await??;
        self.log.info(format!("using image {image}"));

        let base = self.config.resolve_temp_dir();
        let uuid = self.uuid.to_string();
        let sources = self.staged.mount_sources.clone();
        let output_path = container.output_path.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            plan.prepare_with(&base, &uuid, &sources, &output_path)
        })
        .await??;
        let binds = prepared.binds.clone();
        self.mounts = Some(prepared);
        for bind in &binds {
            let mode = if bind.read_only {
                "read-only"
            } else {
                "read-write"
            };
            self.log
                .info(format!("mount {} ({mode})", bind.container_path));
        }

        let mut spec =
            container_spec(container, image, binds, self.config.network_mode.as_deref())?;
        spec.gpus = assign_gpus(
            &container.runtime_constraints.gpu,
            self.config.gpu_devices,
            |name| std::env::var(name).ok(),
        )
        .map_err(SpecError::from)?;
        if let Some(gpus) = &spec.gpus {
            let devices = if gpus.device_ids.is_empty() {
                "not named by the batch system".to_string()
            } else {
                gpus.device_ids.join(",")
            };
            self.log.info(format!(
                "{} {} GPUs, devices {devices}, requested in the form {}",
                gpus.count,
                gpus.stack.name(),
                gpus.devices.key()
            ));
        }
        self.check_stop()?;
        let id = runtime.create(&spec).await?;
        self.container = Some(id.clone());
        self.log
            .info(format!("created runtime container {} ({id})", spec.name));

        let output = runtime.attach(&id).await?;
        self.start_output(output);
        self.check_stop()?;
        // Opened before the start, so that a kill in the container's first
        // moments is on record.
        let kernel_log = self.open_kernel_log();
        runtime.start(&id).await?;
        self.started = true;
        self.log.info("started the container");
        self.start_stats(runtime.clone(), &id, spec.memory_bytes, kernel_log);

        self.publish_host_key().await;
        self.check_stop()?;
        self.until_stopped(self.set_running()).await??;
        self.log.info("state Running");
        self.start_gateway(runtime.clone(), &id, &spec);
        if let Some(output) = &self.output {
            output.release.cancel();
        }

        let code = self.until_stopped(runtime.wait(&id)).await??;
        self.exited = true;
        self.log.info(format!(
            "the container exited with status {}",
            describe_exit(code)
        ));
        self.finish_stats(runtime.as_ref(), &id, code).await;
        Ok(code)
    }

    /// Opens the kernel log for the out-of-memory kills of the container
    /// about to start, unless statistics are off. Without access to it
    /// the other signs of an out-of-memory kill remain.
    fn open_kernel_log(&self) -> Option<KernelLog> {
        if self.config.stats_interval.is_zero() {
            return None;
        }
        match KernelLog::open() {
            Ok(kernel_log) => Some(kernel_log),
            Err(error) => {
                self.log.info(format!(
                    "out-of-memory kills are not read from the kernel log /dev/kmsg: {error} (reading it needs CAP_SYSLOG where kernel.dmesg_restrict is 1)"
                ));
                None
            }
        }
    }

    /// Starts the resource statistics of the started container, unless
    /// `stats_interval` is 0. Their stream is held until `Running`, as the
    /// container's output is.
    fn start_stats(
        &mut self,
        runtime: Arc<dyn Runtime>,
        id: &ContainerId,
        ram: Option<i64>,
        kernel_log: Option<KernelLog>,
    ) {
        if self.config.stats_interval.is_zero() {
            self.log
                .info("resource statistics are off (stats_interval is 0)");
            return;
        }
        let release = self.output.as_ref().map(|output| output.release.clone());
        let copy = self.copies.as_ref().map(|copies| copies.stats.clone());
        let (sink, settings) = (self.sink.clone(), self.log_settings);
        let writer = match (copy, release) {
            (Some(copy), release) => {
                LogWriter::spawn_copied(sink, STATS_STREAM, settings, release, copy)
            }
            (None, Some(release)) => LogWriter::spawn_held(sink, STATS_STREAM, settings, release),
            (None, None) => LogWriter::spawn(sink, STATS_STREAM, settings),
        };
        let ram = ram.and_then(|bytes| u64::try_from(bytes).ok());
        self.stats = Some(RunStats::start(
            runtime,
            id.clone(),
            writer,
            self.log.clone(),
            self.config.stats_interval,
            ram,
            kernel_log,
        ));
    }

    /// Ends the statistics of the exited container and records whether it
    /// ran out of memory.
    async fn finish_stats(&mut self, runtime: &dyn Runtime, id: &ContainerId, code: i64) {
        let Some(stats) = self.stats.take() else {
            return;
        };
        let (found, warnings, stream) = stats.finish_exited(runtime, id, code).await;
        for warning in warnings.into_iter().chain(stream_warning(&stream)) {
            self.warn(warning);
        }
        self.out_of_memory = found;
    }

    fn check_stop(&self) -> Result<(), RunError> {
        if self.stop.is_stopped() {
            Err(self.stopped())
        } else {
            Ok(())
        }
    }

    fn stopped(&self) -> RunError {
        RunError::Stopped(
            self.stop
                .reason()
                .unwrap_or("cancelled by a stop request")
                .to_string(),
        )
    }

    /// Runs `step` unless a stop is requested first.
    async fn until_stopped<T>(
        &self,
        step: impl std::future::Future<Output = T>,
    ) -> Result<T, RunError> {
        tokio::select! {
            value = step => Ok(value),
            () = self.stop.stopped() => Err(self.stopped()),
        }
    }

    /// Makes the gateway's host key and publishes it on the container
    /// record, so that clients can check it strictly. A failure is a
    /// warning: the container runs without shell access.
    async fn publish_host_key(&mut self) {
        let host_key = match HostKey::generate() {
            Ok(host_key) => host_key,
            Err(error) => {
                self.warn(format!("the SSH gateway is off: {error}"));
                return;
            }
        };
        match crate::gateway::publish_host_key(self.client, self.uuid, &host_key).await {
            Ok(()) => self.host_key = Some(host_key),
            Err(error) => self.warn(format!(
                "the SSH gateway is off: failed to publish its host key on the container record: {error}"
            )),
        }
    }

    /// Starts the SSH gateway into the running container when its host
    /// key was published.
    fn start_gateway(&mut self, runtime: Arc<dyn Runtime>, id: &ContainerId, spec: &ContainerSpec) {
        let Some(host_key) = self.host_key.take() else {
            return;
        };
        let target = GatewayTarget {
            runtime,
            container: id.clone(),
            env: spec.env.clone(),
            working_dir: spec.working_dir.clone(),
            sftp_server: self.config.gateway_sftp_server.clone(),
        };
        let flag = SessionFlag {
            client: self.client.clone(),
            uuid: self.uuid.to_string(),
        };
        let gateway = Gateway::new(
            host_key,
            target,
            GatewaySettings::from_config(self.config),
            self.log.clone(),
            Some(flag),
        );
        self.log.info("the SSH gateway is ready");
        if let Some(settings) = &self.tunnel_settings {
            match spawn_tunnel(settings, self.uuid, gateway.clone(), self.log.clone()) {
                Ok(task) => self.tunnel = Some(AbortOnDrop(task)),
                Err(error) => self.warn(format!("the gateway tunnel is off: {error}")),
            }
        }
        self.gateway = Some(gateway);
    }

    async fn set_running(&self) -> Result<(), RunError> {
        let attributes = json!({ "state": ContainerState::Running.as_str() });
        retry(
            "setting the container Running",
            self.config.api_retry_timeout,
            API_BACKOFF,
            ClientError::is_transient,
            || self.client.update_container(self.uuid, &attributes),
        )
        .await
        .map(drop)
        .map_err(RunError::SetRunning)
    }

    fn start_output(&mut self, mut output: OutputStream) {
        let release = CancellationToken::new();
        let held = |stream: StdStream| {
            let copy = self.copies.as_ref().map(|copies| match stream {
                StdStream::Stdout => copies.stdout.clone(),
                StdStream::Stderr => copies.stderr.clone(),
            });
            match copy {
                Some(copy) => LogWriter::spawn_copied(
                    self.sink.clone(),
                    stream.as_str(),
                    self.log_settings,
                    Some(release.clone()),
                    copy,
                ),
                None => LogWriter::spawn_held(
                    self.sink.clone(),
                    stream.as_str(),
                    self.log_settings,
                    release.clone(),
                ),
            }
        };
        let (stdout, stderr) = (held(StdStream::Stdout), held(StdStream::Stderr));
        let (to_stdout, to_stderr) = (stdout.input(), stderr.input());
        let pump = tokio::spawn(
            async move {
                while let Some(chunk) = output.next().await {
                    let chunk = chunk?;
                    match chunk.stream {
                        StdStream::Stdout => to_stdout.send(chunk.data).await,
                        StdStream::Stderr => to_stderr.send(chunk.data).await,
                    }
                }
                Ok(())
            }
            .in_current_span(),
        );
        self.output = Some(Output {
            pump,
            stdout,
            stderr,
            release,
        });
    }

    /// Stops the container if it still runs, flushes its output, removes
    /// it and deletes the mounts. Runs after every outcome; problems
    /// become warnings.
    async fn cleanup(&mut self) {
        // No new session starts once the container is stopping.
        self.gateway.take();
        self.tunnel.take();
        if let (Some(runtime), Some(id)) = (self.runtime.clone(), self.container.clone()) {
            if self.started && !self.exited {
                self.stop_container(runtime.as_ref(), &id).await;
            }
        }
        if let Some(stats) = self.stats.take() {
            if let Some(warning) = stream_warning(&stats.close().await) {
                self.warn(warning);
            }
        }
        self.flush_output().await;
        if let (Some(runtime), Some(id)) = (self.runtime.clone(), self.container.clone()) {
            self.remove_container(runtime.as_ref(), &id).await;
        }
        if let Some(mounts) = self.mounts.take() {
            let root = mounts.root().map(|path| path.display().to_string());
            let removed = match tokio::task::spawn_blocking(move || mounts.remove()).await {
                Ok(result) => result,
                Err(error) => Err(std::io::Error::other(error)),
            };
            if let (Err(error), Some(root)) = (removed, root) {
                self.warn(format!(
                    "failed to delete the mount directory {root}: {error}"
                ));
            }
        }
        // Releases the cache entries, which eviction may then remove.
        self.staged = StagedCollections::default();
        self.cleaned_up = true;
    }

    async fn stop_container(&mut self, runtime: &dyn Runtime, id: &ContainerId) {
        let grace = self.config.stop_timeout;
        self.log.info(format!(
            "stopping the container: its stop signal, then SIGKILL after {}s",
            grace.as_secs_f64()
        ));
        if let Err(error) = runtime.stop(id, grace).await {
            self.warn(format!("failed to stop the container: {error}"));
            return;
        }
        match tokio::time::timeout(grace + STOP_MARGIN, runtime.wait(id)).await {
            Ok(Ok(code)) => {
                self.exited = true;
                self.log.info(format!(
                    "the stopped container exited with status {}",
                    describe_exit(code)
                ));
            }
            Ok(Err(error)) => {
                self.warn(format!("failed to wait for the stopped container: {error}"))
            }
            Err(_) => self.warn(format!(
                "the container did not exit within {}s of being stopped",
                (grace + STOP_MARGIN).as_secs()
            )),
        }
    }

    /// Waits for the output to end (it ends with the container's), then
    /// closes the log writers, which send what they hold.
    async fn flush_output(&mut self) {
        let Some(Output {
            mut pump,
            stdout,
            stderr,
            release: _,
        }) = self.output.take()
        else {
            return;
        };
        if self.exited {
            let drain = self.config.output_drain_timeout;
            match tokio::time::timeout(drain, &mut pump).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => self.warn(format!(
                    "the container's output ended with an error: {error}"
                )),
                Ok(Err(error)) => self.warn(format!("the output task failed: {error}")),
                Err(_) => {
                    pump.abort();
                    self.warn(format!(
                        "the container's output did not end within {}s of its exit; the stdout and stderr logs may be incomplete",
                        drain.as_secs()
                    ));
                }
            }
        } else {
            // The container never ran or never exited: whatever arrived has
            // been forwarded, and the rest will not come.
            pump.abort();
        }
        for summary in [stdout.close().await, stderr.close().await] {
            if let Some(warning) = stream_warning(&summary) {
                self.warn(warning);
            }
        }
    }

    async fn remove_container(&mut self, runtime: &dyn Runtime, id: &ContainerId) {
        let mut last_error = None;
        for attempt in 0..REMOVE_ATTEMPTS {
            match runtime.remove(id).await {
                Ok(()) => {
                    self.container = None;
                    self.log.info("removed the runtime container");
                    return;
                }
                Err(error) => {
                    tracing::warn!(attempt = attempt + 1, error = %error, "failed to remove the runtime container");
                    last_error = Some(error);
                    tokio::time::sleep(API_BACKOFF.delay(attempt)).await;
                }
            }
        }
        if let Some(error) = last_error {
            self.warn(format!(
                "failed to remove the runtime container {id}: {error}"
            ));
        }
    }

    fn warn(&mut self, warning: String) {
        self.log.warn(&warning);
        self.warnings.push(warning);
    }
}

impl Drop for Run<'_> {
    /// Removes the runtime container if the run ended without its cleanup
    /// (a panic, or the run's future dropped). Best effort: the removal
    /// runs on the Tokio runtime if one is still there.
    fn drop(&mut self) {
        if self.cleaned_up {
            return;
        }
        let (Some(runtime), Some(id)) = (self.runtime.take(), self.container.take()) else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            tracing::warn!(container_id = %id, "the run ended without its cleanup; removing the runtime container");
            handle.spawn(async move {
                if let Err(error) = runtime.remove(&id).await {
                    tracing::error!(container_id = %id, error = %error, "failed to remove the runtime container");
                }
            });
        }
    }
}

/// Builds the one update that records the final state.
/// A container that ran out of memory is still `Complete` with its exit
/// code, and `runtime_status.error` gives the reason it ended.
fn final_attributes(
    outcome: &Outcome,
    log_pdh: Option<&str>,
    warnings: &[String],
    out_of_memory: Option<&OutOfMemory>,
) -> Value {
    let mut attributes = Map::new();
    let mut status = Map::new();
    match outcome {
        Outcome::Exited(code, output) => {
            attributes.insert("state".into(), json!(ContainerState::Complete.as_str()));
            let code = i32::try_from(*code).unwrap_or(if *code < 0 { i32::MIN } else { i32::MAX });
            attributes.insert("exit_code".into(), json!(code));
            if let Some(output) = output {
                attributes.insert("output".into(), json!(output));
            }
            if let Some(found) = out_of_memory {
                status.insert("error".into(), json!(OutOfMemory::ERROR));
                status.insert("errorDetail".into(), json!(found.detail()));
            }
        }
        Outcome::Cancelled(reason) => {
            attributes.insert("state".into(), json!(ContainerState::Cancelled.as_str()));
            status.insert("error".into(), json!(reason));
        }
    }
    if let Some(log_pdh) = log_pdh {
        attributes.insert("log".into(), json!(log_pdh));
    }
    if let Some(first) = warnings.first() {
        status.insert("warning".into(), json!(first));
        if warnings.len() > 1 {
            status.insert("warningDetail".into(), json!(warnings.join("\n")));
        }
    }
    if !status.is_empty() {
        attributes.insert("runtime_status".into(), Value::Object(status));
    }
    Value::Object(attributes)
}

/// Returns a warning for a log stream that lost bytes.
fn stream_warning(summary: &LogSummary) -> Option<String> {
    if summary.bytes_dropped == 0 {
        return None;
    }
    Some(format!(
        "the {} log is incomplete: {} bytes could not be sent ({})",
        summary.stream,
        summary.bytes_dropped,
        summary.error.as_deref().unwrap_or("unknown error")
    ))
}

/// Describes an exit status, naming the signal for 128 + N.
fn describe_exit(code: i64) -> String {
    let signal = match code - 128 {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return code.to_string(),
    };
    format!("{code} (signal {}, {signal})", code - 128)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "an unknown host".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_carries_the_exit_code_only() {
        let attributes = final_attributes(&Outcome::Exited(3, None), None, &[], None);
        assert_eq!(attributes, json!({"state": "Complete", "exit_code": 3}));
    }

    #[test]
    fn complete_carries_output_and_log() {
        let output = "d41d8cd98f00b204e9800998ecf8427e+0";
        let log = "0123456789abcdef0123456789abcdef+52";
        let attributes = final_attributes(
            &Outcome::Exited(0, Some(output.to_string())),
            Some(log),
            &[],
            None,
        );
        assert_eq!(
            attributes,
            json!({"state": "Complete", "exit_code": 0, "output": output, "log": log})
        );
    }

    #[test]
    fn cancelled_carries_the_reason_as_error() {
        let attributes = final_attributes(
            &Outcome::Cancelled("cancelled by signal SIGTERM".into()),
            None,
            &[],
            None,
        );
        assert_eq!(
            attributes,
            json!({"state": "Cancelled", "runtime_status": {"error": "cancelled by signal SIGTERM"}})
        );
    }

    #[test]
    fn out_of_memory_is_complete_with_error() {
        let found = OutOfMemory {
            sign: crate::stats::OomSign::CgroupCounter(1),
            peak_memory: Some(32 << 20),
            limit: Some(32 << 20),
        };
        let warnings = vec!["a warning".to_string()];
        let attributes =
            final_attributes(&Outcome::Exited(137, None), None, &warnings, Some(&found));
        assert_eq!(attributes["state"], "Complete");
        assert_eq!(attributes["exit_code"], 137);
        let status = &attributes["runtime_status"];
        assert_eq!(status["error"], "container ran out of memory");
        assert_eq!(status["errorDetail"], found.detail());
        assert_eq!(status["warning"], "a warning");
    }

    #[test]
    fn warnings_go_to_runtime_status() {
        let warnings = vec!["first".to_string(), "second".to_string()];
        let attributes = final_attributes(&Outcome::Exited(0, None), None, &warnings, None);
        assert_eq!(attributes["runtime_status"]["warning"], "first");
        assert_eq!(
            attributes["runtime_status"]["warningDetail"],
            "first\nsecond"
        );
        assert_eq!(attributes["exit_code"], 0);
    }

    #[test]
    fn archive_load_failure_status_leaves_out_the_runtime_message() {
        let error = RunError::Runtime(RuntimeError::LoadImage {
            path: "/var/lib/berth/images/broken.tar".into(),
            source: "invalid character 'r' looking for beginning of value".into(),
        });
        let status = error.status_message();
        assert_eq!(
            status,
            "failed to load image archive /var/lib/berth/images/broken.tar; the supervisor log has the container runtime's message"
        );
        assert!(error.to_string().contains("invalid character 'r'"));
    }

    #[test]
    fn exit_status_names_the_signal() {
        assert_eq!(describe_exit(0), "0");
        assert_eq!(describe_exit(3), "3");
        assert_eq!(describe_exit(137), "137 (signal 9, SIGKILL)");
        assert_eq!(describe_exit(143), "143 (signal 15, SIGTERM)");
    }

    #[test]
    fn lost_log_bytes_become_a_warning() {
        let summary = LogSummary {
            stream: "stdout",
            bytes_sent: 10,
            bytes_dropped: 5,
            error: Some("403 Forbidden".into()),
        };
        let warning = stream_warning(&summary).unwrap();
        assert!(
            warning.contains("stdout log is incomplete: 5 bytes"),
            "{warning}"
        );
        assert!(stream_warning(&LogSummary {
            bytes_dropped: 0,
            ..summary
        })
        .is_none());
    }
}
