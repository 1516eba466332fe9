//! The supervisor: runs one container from `Locked` to its final state.
//!
//! `berth supervise UUID` runs inside the container's batch job, with the
//! container's own API token from the credentials file. It checks that
//! the container is `Locked` and runs it through a container [`Runtime`].
//! While the container runs, its stdout and stderr stream to the
//! controller. At the end the supervisor records `Complete` with the exit
//! code, or `Cancelled` with the reason when the container was stopped or
//! could not run.
//!
//! Modules, in the order a run uses them:
//! - [`config`]: the `supervisor` section of the configuration file;
//! - [`stop`]: the stop request that SIGTERM and SIGINT make;
//! - [`mounts`]: the container's mounts, planned and created on the host;
//! - [`cache`]: the node's collection cache, keyed by portable data hash;
//! - [`staging`]: collection mounts and image collections fetched through
//!   that cache;
//! - [`archive`]: which `docker save` archives may be opened, and opening
//!   them;
//! - [`image`]: what a `docker save` archive holds;
//! - [`spec`]: the container record turned into a runtime spec;
//! - [`gateway`]: the SSH server whose sessions run in the container;
//! - [`runtime`]: the runtime contract, its Docker, OCI and Singularity
//!   implementations, and the choice between them;
//! - [`logs`]: log streams sent to the controller at byte offsets;
//! - [`cgroup`] and [`stats`]: the container's resource use, read from
//!   its cgroup into the `crunchstat` log, and out-of-memory kills;
//! - [`retry`]: backoff for transient failures;
//! - [`watch`]: the cancellation watch on the container's own record;
//! - [`journal`]: the final state kept on disk until it is delivered;
//! - `run`: the steps of one run, its cleanup and its final state.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod archive;
pub mod cache;
pub mod cgroup;
pub mod config;
pub mod gateway;
pub mod gpu;
pub mod image;
pub mod journal;
pub mod kernel_log;
pub mod log_collection;
pub mod logs;
pub mod mounts;
pub mod output;
pub mod retry;
mod run;
pub mod runtime;
pub mod sftp_server;
pub mod spec;
pub mod staging;
pub mod stats;
pub mod stop;
pub mod tunnel;
pub mod watch;

use std::path::PathBuf;

use anyhow::Context;
use berth_client::JobCredentials;

pub use config::Config;
pub use run::{supervise_job, supervise_until, EXIT_NOT_RECORDED, EXIT_RECORDED};
pub use runtime::docker::DockerRuntime;
pub use runtime::Runtime;
pub use stop::{stop_on_signals, StopHandle};

/// Runs the container the credentials belong to, stopping it on SIGTERM
/// or SIGINT. `credentials_file` is the credentials' file, which a journal
/// entry names so that another process can deliver it. Returns the exit
/// status `berth supervise` should end with: [`EXIT_RECORDED`] when a
/// final state was recorded, otherwise [`EXIT_NOT_RECORDED`].
pub async fn supervise(
    config: Config,
    credentials: JobCredentials,
    credentials_file: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let stop = StopHandle::new();
    let signals = stop_on_signals(stop.clone())
        .context("failed to install the SIGTERM and SIGINT handlers")?;
    let status = supervise_job(config, credentials, credentials_file, stop).await;
    signals.abort();
    status
}

/// Delivers, once each, the entries of the final-state journal, with the
/// tokens of their credentials files (`berth supervise --deliver-journal`).
/// Returns the number of entries that stay in the journal.
pub async fn deliver_journal(config: &Config) -> anyhow::Result<usize> {
    let Some(dir) = &config.journal_dir else {
        anyhow::bail!(
            "the journal is off (supervisor.journal_dir is null), so there is nothing to deliver"
        );
    };
    let journal = journal::Journal::open(dir)?;
    let settings = journal::DeliverySettings::from_config(config);
    let summary = journal::deliver_pending(&journal, settings, None).await;
    tracing::info!(
        recorded = summary.recorded,
        ended = summary.ended,
        remaining = summary.remaining,
        "delivered the journal in {}",
        dir.display()
    );
    Ok(summary.remaining)
}
