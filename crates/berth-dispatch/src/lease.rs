//! The leader lease: one active dispatcher per lease name, the others
//! waiting as standbys.
//!
//! [`run_with_lease`] wraps the dispatch loop from outside. At start it
//! tries to acquire the lease from the controller. While another
//! dispatcher holds it, it logs `waiting for the dispatch lease` once and
//! tries again every renew interval. Once it holds the lease it logs `took
//! the dispatch lease` and runs the loop with a [`CancellationToken`] of
//! its own, and renews the lease every renew interval meanwhile.
//!
//! Self-fencing: each successful renewal sets a *deadline*, the lease's
//! expiry minus a margin (a fifth of the TTL), counted from the moment the
//! renewal was sent, so that it is never later than the controller's
//! expiry. When the lease is taken by another holder, or no renewal has
//! succeeded by the deadline, the loop's token is cancelled: the old leader
//! stops acting before a standby can take the lease. It then waits as a
//! standby itself.
//!
//! Fencing at the controller: the loop's lock calls carry the lease's name
//! and epoch ([`FencedApi`]), so the controller rejects them once another
//! dispatcher took the lease, even if this one has not noticed yet.
//!
//! On shutdown the lease is released, so a standby takes over at its next
//! attempt instead of waiting for the expiry. The new leader's loop adopts
//! the containers locked by the same token, finds their jobs by name in the
//! batch system, and submits nothing twice.
//!
//! NOTE: a batch system call in flight when the token is cancelled (an
//! `sbatch` that is already running) completes, and may outlast the
//! deadline's margin. The new leader's first passes then see its job by
//! name, or cancel it as a stray when its container was given another job.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use berth_client::{Client, ClientError, ContainerChanges, DispatchLease, LeaseFence, ListPage};
use berth_client::{ListParams, Locked};
use berth_core::Container;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::ControllerApi;
use crate::config::{BackendKind, Config, LeaseMode};

/// Maximum wait for the release call at shutdown. An unreleased lease
/// expires anyway.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the lease, from the `dispatch` section.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    /// The random id of this dispatcher process.
    pub holder: String,
    pub ttl: Duration,
    pub renew_interval: Duration,
    /// Time before the expiry at which a leader that could not renew stops.
    pub fence_margin: Duration,
    /// True when the lease is required (`lease: true`); false when it is
    /// used only if the controller serves it (`lease: auto`).
    pub required: bool,
}

impl LeaseSettings {
    /// Returns the lease settings, or `None` when the dispatcher runs
    /// without a lease (`lease: false`, or the local backend).
    pub fn from_config(config: &Config) -> Option<LeaseSettings> {
        if config.lease == LeaseMode::Off || config.backend == BackendKind::Local {
            return None;
        }
        Some(LeaseSettings {
            name: config.lease_name(),
            holder: new_holder_id(),
            ttl: config.lease_ttl,
            renew_interval: config.lease_renew_interval,
            fence_margin: config.lease_fence_margin(),
            required: config.lease == LeaseMode::On,
        })
    }
}

/// Returns a holder id unique to this process: the host name, the process
/// id and a random number.
fn new_holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        })
        .unwrap_or_else(|| "host".to_string());
    format!(
        "{host}:{}:{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// The controller's lease routes, behind a trait so that the lease logic
/// can be tested against a scripted controller.
#[async_trait]
pub trait LeaseApi: Send + Sync {
    async fn acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<DispatchLease, ClientError>;
    async fn renew(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
        ttl: Duration,
    ) -> Result<DispatchLease, ClientError>;
    async fn release(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
    ) -> Result<DispatchLease, ClientError>;
}

#[async_trait]
impl LeaseApi for Client {
    async fn acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<DispatchLease, ClientError> {
        self.acquire_dispatch_lease(name, holder, ttl).await
    }

    async fn renew(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
        ttl: Duration,
    ) -> Result<DispatchLease, ClientError> {
        self.renew_dispatch_lease(name, holder, epoch, ttl).await
    }

    async fn release(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
    ) -> Result<DispatchLease, ClientError> {
        self.release_dispatch_lease(name, holder, epoch).await
    }
}

/// The lease while this dispatcher holds it.
#[derive(Debug, Clone, Copy)]
struct Tenure {
    epoch: i64,
    /// The moment the loop must have stopped unless a renewal succeeds.
    deadline: Instant,
}

impl Tenure {
    /// Builds the tenure from a successful call sent at `sent_at`.
    fn new(lease: &DispatchLease, sent_at: Instant, settings: &LeaseSettings) -> Tenure {
        let expires_in = Duration::try_from_secs_f64(lease.expires_in).unwrap_or_default();
        Tenure {
            epoch: lease.epoch,
            deadline: sent_at + expires_in.saturating_sub(settings.fence_margin),
        }
    }
}

/// The result of waiting for the lease.
enum Wait {
    Acquired(Tenure),
    /// The controller does not serve the lease routes (404).
    Unsupported,
    Shutdown,
}

/// Runs `active` (the dispatch loop) whenever this dispatcher holds the
/// lease, until `shutdown` is cancelled.
///
/// `active` gets a token that is cancelled on shutdown or when the lease
/// is lost, and the lease's fence for its lock calls (`None` when it runs
/// without a lease). Returns the error of `active`, or of a required lease
/// that the controller does not serve.
pub async fn run_with_lease<F, Fut>(
    api: &dyn LeaseApi,
    settings: &LeaseSettings,
    shutdown: &CancellationToken,
    mut active: F,
) -> anyhow::Result<()>
where
    F: FnMut(CancellationToken, Option<LeaseFence>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut never_held = true;
    loop {
        let tenure = match wait_for_lease(api, settings, shutdown, never_held).await {
            Wait::Acquired(tenure) => tenure,
            Wait::Shutdown => return Ok(()),
            Wait::Unsupported if settings.required => anyhow::bail!(
                "the controller does not serve dispatch leases (POST dispatch_leases/{}/acquire returned 404), but dispatch.lease is true: upgrade the controller, or set dispatch.lease to auto or false",
                settings.name
            ),
            Wait::Unsupported => {
                tracing::warn!(
                    lease = %settings.name,
                    "the controller does not serve dispatch leases; running without one, so a second dispatcher would not be kept out"
                );
                return active(shutdown.child_token(), None).await;
            }
        };
        never_held = false;
        tracing::info!(lease = %settings.name, holder = %settings.holder, epoch = tenure.epoch, "took the dispatch lease");

        let token = shutdown.child_token();
        let fence = LeaseFence {
            name: settings.name.clone(),
            epoch: tenure.epoch,
        };
        let run = active(token.clone(), Some(fence));
        tokio::pin!(run);
        let keep = keep_lease(api, settings, tenure);
        tokio::pin!(keep);
        tokio::select! {
            result = &mut run => {
                // The loop ended: a shutdown, or an error.
                release(api, settings, tenure.epoch).await;
                return result;
            }
            lost = &mut keep => {
                tracing::warn!(lease = %settings.name, epoch = tenure.epoch, reason = %lost, "lost the dispatch lease; stopping the dispatch loop");
                token.cancel();
                run.await?;
                tracing::info!(lease = %settings.name, "stopped dispatching; waiting as a standby");
            }
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// Tries to acquire the lease every renew interval until it is held. A
/// 404 before this process ever held the lease means that the controller
/// does not serve the lease routes.
async fn wait_for_lease(
    api: &dyn LeaseApi,
    settings: &LeaseSettings,
    shutdown: &CancellationToken,
    never_held: bool,
) -> Wait {
    let mut waiting_logged = false;
    let mut failures = 0u64;
    loop {
        let sent_at = Instant::now();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Wait::Shutdown,
            attempt = tokio::time::timeout(
                settings.ttl,
                api.acquire(&settings.name, &settings.holder, settings.ttl),
            ) => attempt,
        };
        match attempt {
            Ok(Ok(lease)) if lease.held => {
                return Wait::Acquired(Tenure::new(&lease, sent_at, settings));
            }
            Ok(Ok(lease)) => {
                if !waiting_logged {
                    tracing::info!(
                        lease = %settings.name,
                        holder = lease.holder.as_deref().unwrap_or(""),
                        epoch = lease.epoch,
                        "waiting for the dispatch lease"
                    );
                    waiting_logged = true;
                }
                failures = 0;
            }
            Ok(Err(err))
                if never_held && err.status().map(|status| status.as_u16()) == Some(404) =>
            {
                return Wait::Unsupported;
            }
            Ok(Err(err)) => {
                failures += 1;
                log_failure(
                    failures,
                    "failed to acquire the dispatch lease; retrying",
                    &err,
                );
            }
            Err(_) => {
                failures += 1;
                log_failure(
                    failures,
                    "failed to acquire the dispatch lease; retrying",
                    &format!("no response within {:?}", settings.ttl),
                );
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Wait::Shutdown,
            _ = tokio::time::sleep(settings.renew_interval) => {}
        }
    }
}

/// Logs a failed lease call as a warning the first time and every 100th
/// time in a row, at debug level otherwise.
fn log_failure(failures: u64, message: &str, error: &dyn std::fmt::Display) {
    if failures == 1 || failures.is_multiple_of(100) {
        tracing::warn!(error = %error, failures, "{message}");
    } else {
        tracing::debug!(error = %error, failures, "{message}");
    }
}

/// Renews the lease every renew interval. Returns why it was lost: taken
/// by another holder, or not renewed before the deadline.
async fn keep_lease(api: &dyn LeaseApi, settings: &LeaseSettings, mut tenure: Tenure) -> String {
    let mut next_renewal = Instant::now() + settings.renew_interval;
    let mut failures = 0u64;
    loop {
        tokio::time::sleep_until(next_renewal.min(tenure.deadline)).await;
        let sent_at = Instant::now();
        if sent_at >= tenure.deadline {
            return "no renewal succeeded before the lease's fencing deadline".to_string();
        }
        let call = api.renew(&settings.name, &settings.holder, tenure.epoch, settings.ttl);
        match tokio::time::timeout_at(tenure.deadline, call).await {
            Ok(Ok(lease)) if lease.held => {
                if failures > 0 {
                    tracing::info!(lease = %settings.name, failures, "renewed the dispatch lease again");
                }
                failures = 0;
                tenure = Tenure::new(&lease, sent_at, settings);
            }
            Ok(Ok(lease)) => {
                return format!(
                    "the lease is held by {} at epoch {}",
                    lease.holder.as_deref().unwrap_or("nobody"),
                    lease.epoch
                );
            }
            Ok(Err(err)) => {
                failures += 1;
                log_failure(
                    failures,
                    "failed to renew the dispatch lease; retrying",
                    &err,
                );
            }
            Err(_) => {
                return "no renewal succeeded before the lease's fencing deadline".to_string();
            }
        }
        next_renewal = sent_at + settings.renew_interval;
    }
}

/// Releases the lease at shutdown, so a standby takes over at once.
async fn release(api: &dyn LeaseApi, settings: &LeaseSettings, epoch: i64) {
    let call = api.release(&settings.name, &settings.holder, epoch);
    match tokio::time::timeout(RELEASE_TIMEOUT, call).await {
        Ok(Ok(_)) => {
            tracing::info!(lease = %settings.name, epoch, "released the dispatch lease")
        }
        Ok(Err(err)) => tracing::warn!(
            lease = %settings.name,
            error = %err,
            "failed to release the dispatch lease; a standby takes over when it expires"
        ),
        Err(_) => tracing::warn!(
            lease = %settings.name,
            "failed to release the dispatch lease in time; a standby takes over when it expires"
        ),
    }
}

/// The controller as the dispatch loop uses it, with every lock call
/// carrying the lease's fence.
#[derive(Debug)]
pub struct FencedApi {
    client: Client,
    fence: Option<LeaseFence>,
}

impl FencedApi {
    pub fn new(client: Client, fence: Option<LeaseFence>) -> FencedApi {
        FencedApi { client, fence }
    }
}

#[async_trait]
impl ControllerApi for FencedApi {
    async fn token_uuid(&self) -> Result<String, ClientError> {
        ControllerApi::token_uuid(&self.client).await
    }

    async fn list_containers(
        &self,
        params: &ListParams,
    ) -> Result<ListPage<Container>, ClientError> {
        self.client.list_containers(params).await
    }

    async fn get_container(&self, uuid: &str) -> Result<Container, ClientError> {
        self.client.get_container(uuid).await
    }

    async fn lock_container(&self, uuid: &str) -> Result<Locked, ClientError> {
        self.client
            .lock_container_fenced(uuid, self.fence.as_ref())
            .await
    }

    async fn unlock_container(&self, uuid: &str) -> Result<Container, ClientError> {
        self.client.unlock_container(uuid).await
    }

    async fn update_container(
        &self,
        uuid: &str,
        attributes: &Value,
    ) -> Result<Container, ClientError> {
        self.client.update_container(uuid, attributes).await
    }

    async fn container_changes(
        &self,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<ContainerChanges, ClientError> {
        self.client.container_changes(after, wait).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use reqwest::StatusCode;

    use super::*;

    /// A scripted controller: each call takes the next answer of its
    /// verb's queue (an empty queue answers "held"), and every call is
    /// recorded.
    #[derive(Default)]
    struct ScriptedLeases {
        acquire: Mutex<VecDeque<Result<DispatchLease, ClientError>>>,
        renew: Mutex<VecDeque<Result<DispatchLease, ClientError>>>,
        calls: Mutex<Vec<String>>,
    }

    fn lease(holder: &str, epoch: i64, held: bool) -> DispatchLease {
        DispatchLease {
            name: "slurm".to_string(),
            holder: Some(holder.to_string()),
            epoch,
            held,
            expires_in: 10.0,
        }
    }

    fn api_error(status: StatusCode) -> ClientError {
        ClientError::Api {
            method: reqwest::Method::POST,
            url: "http://controller/arvados/v1/dispatch_leases/slurm/acquire".to_string(),
            status,
            message: "scripted".to_string(),
            retry_after: None,
        }
    }

    impl ScriptedLeases {
        fn next(
            &self,
            queue: &Mutex<VecDeque<Result<DispatchLease, ClientError>>>,
            epoch: i64,
        ) -> Result<DispatchLease, ClientError> {
            queue
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| Ok(lease("me", epoch, true)))
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl LeaseApi for ScriptedLeases {
        async fn acquire(
            &self,
            _name: &str,
            _holder: &str,
            _ttl: Duration,
        ) -> Result<DispatchLease, ClientError> {
            self.calls.lock().unwrap().push("acquire".to_string());
            self.next(&self.acquire, 1)
        }

        async fn renew(
            &self,
            _name: &str,
            _holder: &str,
            epoch: i64,
            _ttl: Duration,
        ) -> Result<DispatchLease, ClientError> {
            self.calls.lock().unwrap().push(format!("renew {epoch}"));
            self.next(&self.renew, epoch)
        }

        async fn release(
            &self,
            _name: &str,
            _holder: &str,
            epoch: i64,
        ) -> Result<DispatchLease, ClientError> {
            self.calls.lock().unwrap().push(format!("release {epoch}"));
            Ok(lease("me", epoch, false))
        }
    }

    fn settings(required: bool) -> LeaseSettings {
        LeaseSettings {
            name: "slurm".to_string(),
            holder: "me".to_string(),
            ttl: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
            fence_margin: Duration::from_secs(2),
            required,
        }
    }

    /// Records each run of the loop: its start time, its fence, and when
    /// its token was cancelled.
    #[derive(Default, Clone)]
    struct Runs {
        events: Arc<Mutex<Vec<(Duration, String)>>>,
    }

    impl Runs {
        fn push(&self, start: Instant, event: String) {
            self.events.lock().unwrap().push((start.elapsed(), event));
        }

        fn events(&self) -> Vec<(Duration, String)> {
            self.events.lock().unwrap().clone()
        }
    }

    /// Returns a loop that runs until its token is cancelled.
    fn recording_loop(
        runs: &Runs,
        start: Instant,
    ) -> impl FnMut(
        CancellationToken,
        Option<LeaseFence>,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> {
        let runs = runs.clone();
        move |token, fence| {
            let runs = runs.clone();
            Box::pin(async move {
                let epoch = fence.map(|fence| fence.epoch);
                runs.push(start, format!("start {epoch:?}"));
                token.cancelled().await;
                runs.push(start, format!("stop {epoch:?}"));
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn standby_waits_then_takes_lease() {
        let api = ScriptedLeases::default();
        {
            let mut acquire = api.acquire.lock().unwrap();
            acquire.push_back(Ok(lease("other", 1, false)));
            acquire.push_back(Ok(lease("other", 1, false)));
            acquire.push_back(Ok(lease("me", 2, true)));
        }
        let shutdown = CancellationToken::new();
        let runs = Runs::default();
        let start = Instant::now();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(9)).await;
            stopper.cancel();
        });
        run_with_lease(
            &api,
            &settings(true),
            &shutdown,
            recording_loop(&runs, start),
        )
        .await
        .unwrap();

        let events = runs.events();
        assert_eq!(events[0].1, "start Some(2)");
        // Two refused attempts, 2 s apart, then the third one takes it.
        assert_eq!(events[0].0, Duration::from_secs(4));
        assert_eq!(events[1].1, "stop Some(2)");
        let calls = api.calls();
        assert_eq!(&calls[..3], ["acquire", "acquire", "acquire"]);
        assert!(calls.contains(&"renew 2".to_string()), "{calls:?}");
        assert_eq!(calls.last().unwrap(), "release 2");
    }

    #[tokio::test(start_paused = true)]
    async fn lost_lease_stops_loop_before_expiry() {
        let api = ScriptedLeases::default();
        {
            // Every renewal fails: the controller cannot be reached.
            let mut renew = api.renew.lock().unwrap();
            for _ in 0..10 {
                renew.push_back(Err(api_error(StatusCode::SERVICE_UNAVAILABLE)));
            }
        }
        let shutdown = CancellationToken::new();
        let runs = Runs::default();
        let start = Instant::now();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            stopper.cancel();
        });
        run_with_lease(
            &api,
            &settings(true),
            &shutdown,
            recording_loop(&runs, start),
        )
        .await
        .unwrap();

        let events = runs.events();
        assert_eq!(events[0], (Duration::ZERO, "start Some(1)".to_string()));
        // Acquired for 10 s with a 2 s margin: the loop stops at 8 s,
        // before the lease could pass to a standby.
        assert_eq!(
            events[1],
            (Duration::from_secs(8), "stop Some(1)".to_string())
        );
        // Then it waits as a standby, and takes the lease again once the
        // scripted failures are used up.
        assert!(events.len() >= 3, "{events:?}");
        assert_eq!(events[2].1, "start Some(1)");
    }

    #[tokio::test(start_paused = true)]
    async fn lease_taken_by_another_stops_loop() {
        let api = ScriptedLeases::default();
        api.renew
            .lock()
            .unwrap()
            .push_back(Ok(lease("other", 2, false)));
        {
            // After the loss, the other holder keeps the lease.
            let mut acquire = api.acquire.lock().unwrap();
            acquire.push_back(Ok(lease("me", 1, true)));
            for _ in 0..5 {
                acquire.push_back(Ok(lease("other", 2, false)));
            }
        }
        let shutdown = CancellationToken::new();
        let runs = Runs::default();
        let start = Instant::now();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stopper.cancel();
        });
        run_with_lease(
            &api,
            &settings(true),
            &shutdown,
            recording_loop(&runs, start),
        )
        .await
        .unwrap();

        let events = runs.events();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            events[1],
            (Duration::from_secs(2), "stop Some(1)".to_string())
        );
        let calls = api.calls();
        assert!(
            !calls.iter().any(|call| call.starts_with("release")),
            "a lost lease is not released: {calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn missing_lease_route_runs_without_lease_when_auto() {
        let api = ScriptedLeases::default();
        api.acquire
            .lock()
            .unwrap()
            .push_back(Err(api_error(StatusCode::NOT_FOUND)));
        let shutdown = CancellationToken::new();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stopper.cancel();
        });
        let runs = Runs::default();
        run_with_lease(
            &api,
            &settings(false),
            &shutdown,
            recording_loop(&runs, Instant::now()),
        )
        .await
        .unwrap();
        assert_eq!(runs.events()[0].1, "start None");

        // A controller that was unreachable at first, then answers 404.
        let api = ScriptedLeases::default();
        api.acquire.lock().unwrap().extend([
            Err(api_error(StatusCode::SERVICE_UNAVAILABLE)),
            Err(api_error(StatusCode::NOT_FOUND)),
        ]);
        let shutdown = CancellationToken::new();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stopper.cancel();
        });
        let runs = Runs::default();
        run_with_lease(
            &api,
            &settings(false),
            &shutdown,
            recording_loop(&runs, Instant::now()),
        )
        .await
        .unwrap();
        assert_eq!(
            runs.events()[0],
            (Duration::from_secs(2), "start None".to_string())
        );

        let api = ScriptedLeases::default();
        api.acquire
            .lock()
            .unwrap()
            .push_back(Err(api_error(StatusCode::NOT_FOUND)));
        let err = run_with_lease(
            &api,
            &settings(true),
            &CancellationToken::new(),
            recording_loop(&runs, Instant::now()),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("dispatch.lease is true"), "{err}");
    }

    #[test]
    fn holder_ids_differ_per_call() {
        let first = new_holder_id();
        let second = new_holder_id();
        assert_ne!(first, second);
        assert!(
            first.contains(&format!(":{}:", std::process::id())),
            "{first}"
        );
    }
}
