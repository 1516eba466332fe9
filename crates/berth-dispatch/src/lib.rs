//! The dispatcher: locks queued containers and runs each as one batch job.
//!
//! One task, the dispatch loop ([`dispatcher`]), owns all state. It hears
//! of changed containers through the controller's change feed ([`feed`]).
//! Once per poll interval it takes one snapshot of the batch system, and
//! once per resynchronisation interval it also reads the whole container
//! queue again. Each container's pure state ([`tracker`]) decides. The loop then carries out the decisions: lock,
//! write the credentials file ([`credentials`]), submit, record the job id,
//! cancel a job whose container's priority dropped to 0, and cancel or
//! unlock a container whose job vanished. Batch systems sit behind the
//! [`Backend`] trait with
//! three verbs (submit, status, cancel): [`slurm`] builds and parses Slurm's
//! commands, run through a [`command::CommandRunner`], and [`lsf`] LSF's;
//! [`local`] runs each
//! supervisor as a child process.
//!
//! One dispatcher per lease name is active: [`lease`] wraps the loop,
//! holds a leader lease in the controller's database, and stops the loop
//! when the lease is lost, while other dispatchers wait as standbys.
//!
//! A job runs `berth supervise [--config FILE] --credentials FILE UUID`
//! ([`SupervisorCommand`]). It is named after its container, so a restarted
//! dispatcher finds its jobs again in the batch queue and submits nothing
//! twice. Secrets travel only in the credentials file, never in a job's
//! arguments, script or environment.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod arguments;
pub mod backend;
pub mod command;
pub mod config;
pub mod credentials;
pub mod dispatcher;
pub mod feed;
pub mod lease;
pub mod limiter;
pub mod local;
pub mod lsf;
pub mod metrics;
pub mod script;
pub mod slurm;
pub mod template;
pub mod tracker;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod limits_tests;
#[cfg(test)]
mod lsf_loop_tests;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use berth_client::Client;
use berth_core::ClusterId;
use tokio_util::sync::CancellationToken;

pub use backend::{
    Backend, BackendError, BatchJob, GpuRequest, JobId, JobRequest, JobState, Submission,
};
pub use config::{BackendKind, Config, ConfigError, LocalConfig, LsfConfig, SlurmConfig};
pub use credentials::CredentialsStore;
pub use dispatcher::{Dispatcher, LoopOptions, StartError};
pub use limiter::{CallLimiter, LimitedRunner};
pub use local::LocalBackend;
pub use lsf::LsfBackend;
pub use metrics::Metrics;
pub use slurm::SlurmBackend;

/// How jobs start the supervisor: the program and the arguments that come
/// before `supervise`'s own.
#[derive(Debug, Clone)]
pub struct SupervisorCommand {
    /// The `berth` executable, as the compute nodes see it.
    pub program: PathBuf,
    /// The configuration file passed to `berth supervise --config`, if any:
    /// an absolute path, because jobs start in `/`.
    pub config_file: Option<PathBuf>,
}

/// Runs the dispatch loop until `shutdown` is cancelled.
///
/// Checks the configuration first (each error names its key), opens the
/// credentials directory and learns the client's token UUID, retrying while
/// the controller cannot be reached. Returns `Ok(())` after a shutdown;
/// the batch jobs keep running.
pub async fn run(
    cluster_id: ClusterId,
    client: Client,
    config: Config,
    supervisor: SupervisorCommand,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    supervisor.check()?;
    if let Some(file) = supervisor.config_file.as_ref().filter(|f| f.is_relative()) {
        anyhow::bail!(
            "the configuration file {} for berth supervise is not an absolute path: jobs start in /, so give its absolute path",
            file.display()
        );
    }
    let store = CredentialsStore::open(
        &config.credentials_dir,
        client.base_url().clone(),
        config.insecure,
    )
    .context("invalid configuration key dispatch.credentials_dir")?;
    let metrics = Metrics::new();
    let limiter = CallLimiter::new(
        config.scheduler_calls.limiter_settings(),
        Arc::clone(&metrics),
    );
    let server_shutdown = shutdown.child_token();
    let server = start_metrics(&config, Arc::clone(&metrics), &server_shutdown).await?;
    let limits = Limits {
        limiter: Arc::clone(&limiter),
        metrics,
    };
    let result = match config.backend {
        BackendKind::Slurm => {
            slurm::check_programs(&config.slurm)?;
            let new_backend = || {
                let runner = command::ProcessRunner::new(config.slurm.command_timeout);
                let runner = LimitedRunner::new(runner, Arc::clone(&limiter));
                Ok(SlurmBackend::new(
                    config.slurm.clone(),
                    supervisor.clone(),
                    runner,
                ))
            };
            dispatch(
                new_backend,
                &client,
                cluster_id,
                store,
                &config,
                limits,
                shutdown,
            )
            .await
        }
        BackendKind::Lsf => {
            lsf::check_programs(&config.lsf)?;
            let user = match &config.lsf.user {
                Some(user) => user.clone(),
                None => lsf::current_user()?,
            };
            let new_backend = || {
                let runner = command::ProcessRunner::new(config.lsf.command_timeout);
                let runner = LimitedRunner::new(runner, Arc::clone(&limiter));
                Ok(LsfBackend::new(
                    config.lsf.clone(),
                    supervisor.clone(),
                    runner,
                    user.clone(),
                ))
            };
            dispatch(
                new_backend,
                &client,
                cluster_id,
                store,
                &config,
                limits,
                shutdown,
            )
            .await
        }
        BackendKind::Local => {
            // The local backend runs no batch system commands, so its calls
            // are not limited.
            let limits = Limits {
                limiter: CallLimiter::unlimited(),
                ..limits
            };
            let new_backend = || {
                LocalBackend::new(
                    supervisor.clone(),
                    &config.credentials_dir,
                    config.local_log_dir(),
                )
                .context("failed to start the local backend")
            };
            dispatch(
                new_backend,
                &client,
                cluster_id,
                store,
                &config,
                limits,
                shutdown,
            )
            .await
        }
    };
    if let Some(server) = server {
        server_shutdown.cancel();
        if let Err(err) = server.await {
            tracing::warn!(error = %err, "the metrics server task failed");
        }
    }
    result
}

/// The limiter of calls to the batch system and the metrics, shared by
/// the dispatch loop and the backend.
#[derive(Debug, Clone)]
struct Limits {
    limiter: Arc<CallLimiter>,
    metrics: Arc<Metrics>,
}

/// Starts the metrics server when `metrics_listen` is set.
async fn start_metrics(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    let token = match &config.metrics_token_file {
        Some(path) => Some(metrics::read_token_file(path)?),
        None => None,
    };
    let (_, task) = metrics::serve(addr, metrics, token, shutdown.clone()).await?;
    Ok(Some(task))
}

/// Runs the dispatch loop, under the leader lease unless the
/// configuration turns it off ([`lease::run_with_lease`]). Each time this
/// dispatcher takes the lease, the loop starts afresh with a new backend
/// from `new_backend`, and adopts what the previous leader left.
async fn dispatch<B: Backend>(
    new_backend: impl Fn() -> anyhow::Result<B>,
    client: &Client,
    cluster_id: ClusterId,
    store: CredentialsStore,
    config: &Config,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(settings) = lease::LeaseSettings::from_config(config) else {
        let api = Box::new(client.clone());
        return drive(
            api,
            new_backend()?,
            cluster_id,
            store,
            config,
            limits,
            shutdown,
        )
        .await;
    };
    lease::run_with_lease(client, &settings, &shutdown, |token, fence| {
        let api = Box::new(lease::FencedApi::new(client.clone(), fence));
        let backend = new_backend();
        let cluster_id = cluster_id.clone();
        let store = store.clone();
        let limits = limits.clone();
        async move { drive(api, backend?, cluster_id, store, config, limits, token).await }
    })
    .await
}

async fn drive<B: Backend>(
    api: Box<dyn api::ControllerApi>,
    backend: B,
    cluster_id: ClusterId,
    store: CredentialsStore,
    config: &Config,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let started = Dispatcher::start(api, backend, cluster_id, store, &shutdown).await?;
    let Some(dispatcher) = started else {
        return Ok(());
    };
    let mut dispatcher =
        dispatcher.with_limits(limits.limiter, limits.metrics, config.submit_retry.clone());
    dispatcher
        .run(LoopOptions::from_config(config), &shutdown)
        .await;
    Ok(())
}
