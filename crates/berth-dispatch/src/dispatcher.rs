//! The dispatch loop: one task that owns every tracked container. It hears
//! of changed containers through the controller's change feed
//! ([`crate::feed`]) and keeps the latest record of each container it may
//! act on, its *cached records*. Two timers drive its periodic work:
//!
//! - a *poll*, once per poll interval, takes a snapshot of the batch
//!   system, which has no way to report its changes, and lets each tracked
//!   container decide on it with its cached record;
//! - a *resynchronisation*, once per resynchronisation interval, lists the
//!   queue from the controller, replaces the cached records with the list,
//!   and then does what a poll does. It is the feed's safety net.
//!
//! While the loop has no feed cursor (`watch: false`, or after a failed
//! read or a rejected cursor), each poll is a resynchronisation, so no
//! decision rests on records that the feed may have failed to update.
//!
//! A *pass*, poll or resynchronisation, in order:
//!
//! 1. A resynchronisation lists the containers Locked or Running by this
//!    dispatcher's token and the Queued ones with priority > 0, and fetches
//!    any tracked container that neither list returned. A poll fetches
//!    only the tracked containers it has no record of, which normally
//!    means none.
//! 2. It takes one snapshot of the batch system ([`Backend::status`]).
//! 3. It takes over the containers that its cached records show locked by
//!    this token and that it does not track yet. The first pass, always a
//!    resynchronisation, also cancels orphaned jobs and removes leftover
//!    credentials files. An orphaned job is named after a container of this
//!    cluster that is not Locked or Running by this token.
//! 4. It lets each tracked container decide ([`Tracked::observe`]) and
//!    carries out its actions, which include showing users why a job is
//!    pending in its container's `runtime_status.schedulingStatus`.
//! 5. It locks each Queued container with priority > 0 among its cached
//!    records, highest priority first, writes its credentials file and
//!    submits its job.
//!
//! If the listing or the snapshot fails, the pass ends before step 3: a
//! failed query is never taken for an empty queue. When the loop has no
//! feed cursor, a resynchronisation takes one before it lists, so that a
//! change made between the list and the feed's first read is not missed.
//!
//! Between passes the loop keeps one long-poll read of the feed open. It
//! applies each page of changed containers at once
//! ([`Dispatcher::apply_changes`]) with the latest snapshot instead of a new
//! one. A tracked container decides on its new record, so the job of a
//! container whose priority dropped to 0 is cancelled at once. A Queued
//! container with priority > 0 is locked and submitted unless that snapshot
//! lists a job named after it. These observations reuse the snapshot, and
//! count towards no rule that needs several snapshots in a row.
//!
//! The cached records change with each page, and with the controller's
//! response to each of the loop's own calls (a listing, a lock, an update).
//! The loop drops a feed response that may have been made before such a
//! call and reads again from the same cursor. Such a response could carry a
//! record older than the call's result, and a container still Queued after
//! the loop's own lock would look like a lost lock.
//!
//! A failed read, or a 422 for the cursor, drops the cursor. The loop then
//! resynchronises at once, which takes a new cursor, and waits longer
//! before each further attempt while the feed keeps failing
//! ([`ChangeFeed::retry_delay`]), but never longer than the poll interval.
//!
//! Every error is logged once, where it is handled. A failure that repeats
//! with the same message is logged at debug level until it changes or
//! stops, and as a warning again every [`REPEAT_WARN_EVERY`] repeats. Feed
//! failures share one key, so a feed that keeps failing warns once.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_client::ClientError;
use berth_core::{ClusterId, Container, ContainerState, ObjectType, Uuid};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::{list_all, ControllerApi};
use crate::backend::{Backend, BackendError, BatchJob, JobId, JobRequest, JobState, Submission};
use crate::config::{Config, SubmitRetryConfig};
use crate::credentials::CredentialsStore;
use crate::feed::{self, ChangeFeed, CHANGE_FEED_WAIT, RETRY_FIRST};
use crate::limiter::{format_delay, CallLimiter};
use crate::metrics::{FailureClass, Metrics};
use crate::tracker::{
    resolve_vanished, Action, CancelLedger, Observation, RetryNotice, Tracked,
    SCHEDULING_STATUS_KEY, UNRUNNABLE_ERROR,
};

/// Time a container is left alone after the dispatcher gave up on it
/// (unlocked it after failed submissions, or failed to lock it) before it
/// is locked again.
pub const RELOCK_HOLD: Duration = Duration::from_secs(60);

/// Number of UUIDs per `uuid in [...]` list call.
const FETCH_BATCH: usize = 100;

/// First and longest delay between attempts to reach the controller at
/// start-up.
const STARTUP_RETRY_FIRST: Duration = Duration::from_secs(1);
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(30);

/// A repeated failure is logged at warning level again after this many
/// repeats.
const REPEAT_WARN_EVERY: u64 = 100;

/// How often the loop polls and resynchronises, and whether it follows the
/// change feed.
#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    /// Time between two snapshots of the batch system
    /// (`dispatch.poll_interval`).
    pub poll_interval: Duration,
    /// Time between two listings of the queue while the feed works
    /// (`dispatch.resync_interval`).
    pub resync_interval: Duration,
    /// Whether to follow the controller's change feed (`dispatch.watch`).
    pub watch: bool,
    /// Maximum time the controller may keep one feed read open.
    pub feed_wait: Duration,
}

impl LoopOptions {
    /// Takes the options from the `dispatch` section.
    pub fn from_config(config: &Config) -> LoopOptions {
        LoopOptions {
            poll_interval: config.poll_interval,
            resync_interval: config.resync_interval,
            watch: config.watch,
            feed_wait: CHANGE_FEED_WAIT,
        }
    }
}

/// Failure that ended a pass early.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("failed to list {subject}: {source}")]
    List {
        subject: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("failed to query the batch system: {0}")]
    Status(#[source] BackendError),
}

/// Failure to start the dispatch loop.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to learn the dispatcher's token from GET api_client_authorizations/current (is the system token right?)")]
    Token(#[source] ClientError),
    #[error("the controller gave {token_uuid:?} as the uuid of the dispatcher's token, which is not an api_client_authorization UUID")]
    TokenUuid {
        token_uuid: String,
        #[source]
        source: berth_core::uuid::UuidError,
    },
    /// The token belongs to another cluster than the configured one, so
    /// the orphan scan would look for jobs of the wrong cluster.
    #[error("the dispatcher's token {token_uuid} belongs to cluster {token_cluster}, but the configuration key cluster_id is {cluster_id}: set cluster_id to {token_cluster}, or give the dispatcher the system token of cluster {cluster_id}")]
    ClusterMismatch {
        token_uuid: String,
        token_cluster: String,
        cluster_id: ClusterId,
    },
}

/// Remembers the last message of each failing operation, so that a
/// failure repeated every pass is not logged at warning level every pass.
#[derive(Debug, Default)]
struct Repeats {
    last: HashMap<String, (String, u64)>,
}

impl Repeats {
    /// Counts a failure of `key`. Returns true when it should be logged as
    /// a warning: the first time, with a new message, or every
    /// [`REPEAT_WARN_EVERY`] repeats.
    fn failed(&mut self, key: &str, message: &str) -> bool {
        match self.last.get_mut(key) {
            Some((last, count)) if last == message => {
                *count += 1;
                *count % REPEAT_WARN_EVERY == 0
            }
            _ => {
                self.last.insert(key.to_string(), (message.to_string(), 1));
                true
            }
        }
    }

    /// Clears `key`; returns how many failures in a row it had.
    fn succeeded(&mut self, key: &str) -> u64 {
        self.last.remove(key).map(|(_, count)| count).unwrap_or(0)
    }
}

/// Logs a handled error: as a warning the first time, at debug level while
/// it repeats.
macro_rules! report {
    ($repeats:expr, $key:expr, $error:expr, $($message:tt)+) => {{
        let text = $error.to_string();
        if $repeats.failed(&$key, &text) {
            tracing::warn!(error = %text, $($message)+);
        } else {
            tracing::debug!(error = %text, $($message)+);
        }
    }};
}

/// The reason the loop leaves a container it gave up on alone for a while.
#[derive(Debug, Clone, Copy)]
struct RelockHold {
    /// No lock before this time.
    until: Instant,
    /// The generation of the latest snapshot when the hold began. A change
    /// reported by the feed locks the container only with a later snapshot,
    /// which would list a job submitted just before the release.
    generation: u64,
}

/// The kind of pass the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassKind {
    Poll,
    Resync,
}

/// The dispatch loop's state.
pub struct Dispatcher<B> {
    api: Arc<dyn ControllerApi>,
    backend: B,
    cluster_id: ClusterId,
    store: CredentialsStore,
    token_uuid: String,
    tracked: BTreeMap<String, Tracked>,
    /// The latest known record of each tracked container, each Queued
    /// container with priority > 0 and each container Locked or Running by
    /// this token, by UUID.
    records: HashMap<String, Container>,
    /// Number of calls to the controller outside the change feed. A feed
    /// response that may have been made before one of them is dropped.
    calls: u64,
    /// Containers not to lock again yet, after the dispatcher gave up on
    /// them.
    relock_holds: HashMap<String, RelockHold>,
    cancels: CancelLedger,
    /// Number of successful snapshots so far.
    generation: u64,
    /// The latest snapshot's jobs, by name.
    latest_jobs: HashMap<String, Vec<BatchJob>>,
    /// Whether the first successful pass (with its orphan scan) has run.
    reconciled: bool,
    repeats: Repeats,
    /// The limit on calls to the batch system, shared with the backend's
    /// command runner. The loop neither locks nor submits while it backs
    /// off.
    limiter: Arc<CallLimiter>,
    metrics: Arc<Metrics>,
    retry: SubmitRetryConfig,
}

impl<B> std::fmt::Debug for Dispatcher<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("cluster_id", &self.cluster_id)
            .field("token_uuid", &self.token_uuid)
            .field("tracked", &self.tracked.len())
            .field("records", &self.records.len())
            .field("generation", &self.generation)
            .finish()
    }
}

impl<B: Backend> Dispatcher<B> {
    /// Learns this dispatcher's token UUID from the controller, retrying
    /// while the controller cannot be reached, and checks that the token
    /// belongs to `cluster_id`. Returns `None` if `shutdown` fires first.
    pub async fn start(
        api: Box<dyn ControllerApi>,
        backend: B,
        cluster_id: ClusterId,
        store: CredentialsStore,
        shutdown: &CancellationToken,
    ) -> Result<Option<Dispatcher<B>>, StartError> {
        let mut delay = STARTUP_RETRY_FIRST;
        let mut attempts = 0u32;
        let token_uuid = loop {
            match api.token_uuid().await {
                Ok(uuid) => break uuid,
                Err(err) if err.is_transient() => {
                    attempts += 1;
                    if attempts == 1 {
                        tracing::warn!(error = %err, "failed to reach the controller; retrying");
                    } else {
                        tracing::debug!(error = %err, attempts, "failed to reach the controller; retrying");
                    }
                    // A busy controller's Retry-After is waited in full.
                    let wait = delay.max(err.retry_after().unwrap_or_default());
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    delay = (delay * 2).min(STARTUP_RETRY_MAX);
                }
                Err(err) => return Err(StartError::Token(err)),
            }
        };
        check_token_cluster(&token_uuid, &cluster_id)?;
        tracing::info!(
            backend = backend.name(),
            token = %token_uuid,
            credentials_dir = %store.dir().display(),
            "dispatcher started"
        );
        Ok(Some(Dispatcher::new(
            api, backend, cluster_id, store, token_uuid,
        )))
    }

    /// Creates a dispatcher whose token UUID is already known.
    pub fn new(
        api: Box<dyn ControllerApi>,
        backend: B,
        cluster_id: ClusterId,
        store: CredentialsStore,
        token_uuid: String,
    ) -> Dispatcher<B> {
        Dispatcher {
            api: Arc::from(api),
            backend,
            cluster_id,
            store,
            token_uuid,
            tracked: BTreeMap::new(),
            records: HashMap::new(),
            calls: 0,
            relock_holds: HashMap::new(),
            cancels: CancelLedger::default(),
            generation: 0,
            latest_jobs: HashMap::new(),
            reconciled: false,
            repeats: Repeats::default(),
            limiter: CallLimiter::unlimited(),
            metrics: Metrics::new(),
            retry: SubmitRetryConfig::default(),
        }
    }

    /// Sets the limiter of calls to the batch system (the one the
    /// backend's command runner uses), the metrics to update and the
    /// backoff of failed submissions. Without it, calls are not limited
    /// and the retries follow the defaults.
    pub fn with_limits(
        mut self,
        limiter: Arc<CallLimiter>,
        metrics: Arc<Metrics>,
        retry: SubmitRetryConfig,
    ) -> Dispatcher<B> {
        self.limiter = limiter;
        self.metrics = metrics;
        self.retry = retry;
        self
    }

    /// Returns the controller for a call outside the change feed, and
    /// counts the call.
    fn controller(&mut self) -> &dyn ControllerApi {
        self.calls += 1;
        self.api.as_ref()
    }

    /// Runs until `shutdown` fires: a resynchronisation at once and then
    /// every `options.resync_interval`, a poll every
    /// `options.poll_interval` after the latest pass (or as soon as a
    /// backoff of calls to the batch system ends, if sooner), and with
    /// `options.watch` the changes the feed reports, as they come.
    /// Shutdown drops the feed read in flight. Jobs keep running after the
    /// loop ends: they belong to the batch system, and a restarted
    /// dispatcher takes them over.
    pub async fn run(&mut self, options: LoopOptions, shutdown: &CancellationToken) {
        let mut feed = options
            .watch
            .then(|| ChangeFeed::new(Arc::clone(&self.api), options.feed_wait));
        let mut next_resync = tokio::time::Instant::now();
        let mut next_poll = next_resync + options.poll_interval;
        loop {
            let calls = self.calls;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_resync) => {
                    let delay = self.resynchronise(feed.as_mut(), options, shutdown).await;
                    let now = tokio::time::Instant::now();
                    next_resync = now + options.resync_interval;
                    next_poll = now + delay;
                }
                _ = tokio::time::sleep_until(next_poll) => {
                    let following = feed.as_ref().is_some_and(ChangeFeed::has_cursor);
                    let delay = if following {
                        self.run_pass(PassKind::Poll, shutdown).await;
                        options.poll_interval
                    } else {
                        let delay = self.resynchronise(feed.as_mut(), options, shutdown).await;
                        next_resync = tokio::time::Instant::now() + options.resync_interval;
                        delay
                    };
                    next_poll = tokio::time::Instant::now() + delay;
                }
                page = feed::next_page(feed.as_mut()) => match page {
                    Ok(page) => {
                        let failures = self.repeats.succeeded("feed");
                        if failures > 0 {
                            tracing::info!(failures, "reading the change feed again");
                        }
                        self.apply_changes(&page.items, clock_now(), shutdown).await;
                    }
                    Err(err) => {
                        self.report_feed_error(&err);
                        let delay = feed
                            .as_ref()
                            .map(|feed| feed.retry_delay(options.poll_interval))
                            .unwrap_or_default();
                        next_poll = next_poll.min(tokio::time::Instant::now() + delay);
                    }
                },
            }
            if let Some(remaining) = self.limiter.backoff_remaining() {
                // The pass after the backoff probes the batch system and
                // submits what the backoff held back, without waiting for
                // the rest of the poll interval.
                next_poll = next_poll.min(tokio::time::Instant::now() + remaining);
            }
            if let Some(feed) = feed.as_mut() {
                // The response to a read still in flight may have been made
                // before these calls, so it is read again. An idle poll
                // makes no call and leaves the read open.
                if self.calls != calls {
                    feed.pause();
                }
                feed.resume();
            }
        }
        tracing::info!(
            tracked = self.tracked.len(),
            "dispatcher stopped; its batch jobs keep running"
        );
    }

    /// Resynchronises, after taking a feed cursor when the feed has none.
    /// Returns the time until the next poll: the poll interval, or less
    /// while the feed cannot be read.
    async fn resynchronise(
        &mut self,
        feed: Option<&mut ChangeFeed>,
        options: LoopOptions,
        shutdown: &CancellationToken,
    ) -> Duration {
        let interval = options.poll_interval;
        let mut delay = interval;
        if let Some(feed) = feed {
            if !feed.has_cursor() {
                if let Err(err) = feed.take_cursor().await {
                    report!(
                        self.repeats,
                        "feed",
                        err,
                        "failed to start reading the controller's change feed; listing the queue at each poll until it works"
                    );
                    // This pass runs now, so the next one waits at least
                    // the first retry delay.
                    delay = feed.retry_delay(interval).max(RETRY_FIRST).min(interval);
                }
            }
        }
        self.run_pass(PassKind::Resync, shutdown).await;
        delay
    }

    /// Runs a poll or a resynchronisation as of now and logs its failure.
    async fn run_pass(&mut self, kind: PassKind, shutdown: &CancellationToken) {
        let now = clock_now();
        let result = match kind {
            PassKind::Poll => self.poll(now, shutdown).await,
            PassKind::Resync => self.resync(now, shutdown).await,
        };
        match result {
            Ok(()) => {
                let failures = self.repeats.succeeded("pass");
                if failures > 0 {
                    tracing::info!(failures, "the dispatcher's pass succeeded again");
                }
            }
            Err(err) => match kind {
                PassKind::Poll => report!(self.repeats, "pass", err, "the poll failed"),
                PassKind::Resync => {
                    report!(self.repeats, "pass", err, "the resynchronisation failed")
                }
            },
        }
    }

    fn report_feed_error(&mut self, err: &ClientError) {
        if status_code(err) == Some(422) {
            report!(
                self.repeats,
                "feed",
                err,
                "the controller rejected the change feed's cursor; resynchronising"
            );
        } else {
            report!(
                self.repeats,
                "feed",
                err,
                "failed to read the controller's change feed; resynchronising"
            );
        }
    }

    /// Returns the tracked containers, by UUID.
    pub fn tracked(&self) -> &BTreeMap<String, Tracked> {
        &self.tracked
    }

    /// Resynchronises as of `now`: lists the queue, replaces the cached
    /// records with the list, and runs a pass. Stops between two
    /// containers when `shutdown` fires.
    pub async fn resync(
        &mut self,
        now: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), PassError> {
        // Final containers may keep their locked_by_uuid. Tracked ones are
        // fetched by UUID below, so the list need not grow with them.
        let mine_filter = [
            json!(["locked_by_uuid", "=", self.token_uuid]),
            json!(["state", "in", ["Locked", "Running"]]),
        ];
        let mine = list_all(self.controller(), &mine_filter)
            .await
            .map_err(|source| PassError::List {
                subject: "the containers locked by this dispatcher",
                source,
            })?;
        let queued_filter = [json!(["state", "=", "Queued"]), json!(["priority", ">", 0])];
        let queued = list_all(self.controller(), &queued_filter)
            .await
            .map_err(|source| PassError::List {
                subject: "the queued containers",
                source,
            })?;
        let mut records: HashMap<String, Container> = HashMap::new();
        for container in mine.into_iter().chain(queued) {
            records.insert(container.uuid.clone(), container);
        }
        let unlisted: Vec<String> = self
            .tracked
            .keys()
            .filter(|uuid| !records.contains_key(*uuid))
            .cloned()
            .collect();
        records.extend(self.fetch(&unlisted).await?);
        self.records = records;
        self.pass(now, shutdown).await
    }

    /// Polls as of `now`: runs a pass with the cached records, after
    /// fetching the tracked containers that have none. Before the first
    /// successful pass it resynchronises instead, because the orphan scan
    /// needs a listing. Stops between two containers when `shutdown` fires.
    pub async fn poll(
        &mut self,
        now: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), PassError> {
        if !self.reconciled {
            return self.resync(now, shutdown).await;
        }
        let uncached: Vec<String> = self
            .tracked
            .keys()
            .filter(|uuid| !self.records.contains_key(*uuid))
            .cloned()
            .collect();
        let fetched = self.fetch(&uncached).await?;
        self.records.extend(fetched);
        self.pass(now, shutdown).await
    }

    /// Fetches containers by UUID, [`FETCH_BATCH`] per call. A container
    /// the controller does not return is missing from the result.
    async fn fetch(&mut self, uuids: &[String]) -> Result<Vec<(String, Container)>, PassError> {
        let mut fetched = Vec::new();
        for batch in uuids.chunks(FETCH_BATCH) {
            let filter = [json!(["uuid", "in", batch])];
            let containers = list_all(self.controller(), &filter)
                .await
                .map_err(|source| PassError::List {
                    subject: "the tracked containers",
                    source,
                })?;
            fetched.extend(containers.into_iter().map(|c| (c.uuid.clone(), c)));
        }
        Ok(fetched)
    }

    /// Takes a snapshot and acts on it with the cached records: steps 2 to
    /// 5 of a pass.
    async fn pass(&mut self, now: Instant, shutdown: &CancellationToken) -> Result<(), PassError> {
        let jobs = self.backend.status().await.map_err(PassError::Status)?;
        self.generation += 1;
        self.cancels.retain_listed(&jobs);
        let mut by_name: HashMap<String, Vec<BatchJob>> = HashMap::new();
        for job in &jobs {
            by_name
                .entry(job.name.clone())
                .or_default()
                .push(job.clone());
        }
        self.latest_jobs = by_name;

        self.adopt();
        if !self.reconciled {
            self.reconciled = true;
            self.cancel_orphans(&jobs, now).await;
            self.remove_stale_credentials();
        }

        let uuids: Vec<String> = self.tracked.keys().cloned().collect();
        for uuid in uuids {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let record = self.records.get(&uuid).cloned();
            let jobs = self.latest_jobs.get(&uuid).cloned().unwrap_or_default();
            let span = tracing::info_span!("container", container = %uuid);
            self.step(&uuid, record, &jobs, now, true)
                .instrument(span)
                .await;
        }
        self.reprioritise().await;

        self.relock_holds.retain(|_, hold| hold.until > now);
        let mut candidates: Vec<Container> = self
            .records
            .values()
            .filter(|c| c.state == ContainerState::Queued && c.priority > 0)
            .filter(|c| {
                !self.tracked.contains_key(&c.uuid) && !self.relock_holds.contains_key(&c.uuid)
            })
            .cloned()
            .collect();
        candidates.sort_by(lock_order);
        self.lock_and_submit_all(candidates, now, shutdown).await;
        self.prune_records();
        self.update_metrics(now);
        Ok(())
    }

    /// Hands the backend the pending jobs of tracked containers with their
    /// priorities, so that the batch system starts them in Berth's order. A
    /// failure is logged once while it repeats; the next poll tries again
    /// with a fresh snapshot, and nothing is cancelled because of it.
    async fn reprioritise(&mut self) {
        let pending: Vec<(JobId, i64)> = self
            .tracked
            .iter()
            .filter_map(|(uuid, tracked)| {
                let priority = self.records.get(uuid)?.priority;
                let id = tracked.job()?;
                let job = self
                    .latest_jobs
                    .get(uuid)?
                    .iter()
                    .find(|job| &job.id == id && job.state == JobState::Pending)?;
                // Slurm releases a held job when its nice value changes, so
                // a job someone holds (reason JobHeldUser or JobHeldAdmin)
                // keeps its place until it is released.
                let held = job.reason.starts_with("JobHeld");
                (priority > 0 && !held).then(|| (job.id.clone(), priority))
            })
            .collect();
        match self.backend.reprioritise(&pending).await {
            Ok(()) => {
                self.repeats.succeeded("reprioritise");
            }
            Err(err) => report!(
                self.repeats,
                "reprioritise",
                err,
                "failed to reorder the pending jobs; trying again at the next poll"
            ),
        }
    }

    /// Applies the containers that the change feed reported, with the
    /// latest snapshot. Each tracked container decides on its new record.
    /// Then the Queued ones with priority > 0 that are neither tracked nor
    /// on hold are locked and submitted, highest priority first. Does nothing
    /// before the first successful pass, which takes the first snapshot and
    /// cancels orphaned jobs. Stops between two containers when `shutdown`
    /// fires.
    pub async fn apply_changes(
        &mut self,
        changed: &[Container],
        now: Instant,
        shutdown: &CancellationToken,
    ) {
        if !self.reconciled {
            return;
        }
        for container in changed {
            self.records
                .insert(container.uuid.clone(), container.clone());
        }
        let mut candidates: Vec<&Container> = Vec::new();
        for container in changed {
            if shutdown.is_cancelled() {
                return;
            }
            let uuid = container.uuid.as_str();
            if self.tracked.contains_key(uuid) {
                let jobs = self.latest_jobs.get(uuid).cloned().unwrap_or_default();
                let span = tracing::info_span!("container", container = %uuid);
                self.step(uuid, Some(container.clone()), &jobs, now, false)
                    .instrument(span)
                    .await;
            } else if self.may_lock_on_change(container, now) {
                candidates.push(container);
            }
        }
        candidates.sort_by(|a, b| lock_order(a, b));
        let candidates = candidates.into_iter().cloned().collect();
        self.lock_and_submit_all(candidates, now, shutdown).await;
        self.prune_records();
        self.update_metrics(now);
    }

    /// Stores a container's record from the controller's response to one
    /// of the loop's calls.
    fn remember(&mut self, container: Container) {
        self.records.insert(container.uuid.clone(), container);
    }

    /// Drops the cached records the loop can no longer act on: neither
    /// tracked, nor Queued with priority > 0, nor locked by this token.
    fn prune_records(&mut self) {
        let tracked = &self.tracked;
        let token_uuid = self.token_uuid.as_str();
        self.records.retain(|uuid, container| {
            tracked.contains_key(uuid)
                || (container.state == ContainerState::Queued && container.priority > 0)
                || is_locked_by(container, token_uuid)
        });
    }

    /// True for a Queued container with priority > 0 that this dispatcher
    /// neither tracks nor keeps on hold, and that it released, if at all,
    /// before the latest snapshot.
    fn may_lock_on_change(&self, container: &Container, now: Instant) -> bool {
        let free = self
            .relock_holds
            .get(&container.uuid)
            .is_none_or(|hold| hold.until <= now && hold.generation < self.generation);
        container.state == ContainerState::Queued
            && container.priority > 0
            && !self.tracked.contains_key(&container.uuid)
            && free
    }

    /// Keeps the dispatcher from locking `uuid` again for [`RELOCK_HOLD`].
    fn hold(&mut self, uuid: &str, now: Instant) {
        let hold = RelockHold {
            until: now + RELOCK_HOLD,
            generation: self.generation,
        };
        self.relock_holds.insert(uuid.to_string(), hold);
    }

    /// Starts tracking the containers whose cached records show them locked
    /// by this token, and that are not tracked yet.
    fn adopt(&mut self) {
        let found: Vec<&Container> = self
            .records
            .values()
            .filter(|c| is_locked_by(c, &self.token_uuid) && !self.tracked.contains_key(&c.uuid))
            .collect();
        let mut adopted = Vec::new();
        for container in found {
            tracing::info!(
                container = %container.uuid,
                state = %container.state.as_str(),
                job_id = container.scheduler_job_id.as_deref().unwrap_or(""),
                "taking over a container locked by this dispatcher's token"
            );
            adopted.push(container.uuid.clone());
        }
        for uuid in adopted {
            self.tracked.insert(uuid, Tracked::adopted(self.generation));
        }
    }

    /// True for a job named after a container of this cluster.
    fn is_container_job(&self, job: &BatchJob) -> bool {
        berth_core::uuid::is_uuid(&job.name)
            && job.name.starts_with(&format!(
                "{}-{}-",
                self.cluster_id,
                ObjectType::Container.code()
            ))
    }

    /// Cancels jobs named after a container of this cluster that no tracked
    /// container claims: left by an earlier dispatcher for a container that
    /// is no longer Locked or Running by this token.
    async fn cancel_orphans(&mut self, jobs: &[BatchJob], now: Instant) {
        let orphans: Vec<BatchJob> = jobs
            .iter()
            .filter(|job| self.is_container_job(job) && !self.tracked.contains_key(&job.name))
            .cloned()
            .collect();
        for job in orphans {
            let span = tracing::info_span!("container", container = %job.name);
            async {
                tracing::warn!(job_id = %job.id, "cancelling an orphaned job: its container is not Locked or Running by this dispatcher");
                self.cancel_job(&job, now).await;
            }
            .instrument(span)
            .await;
        }
    }

    /// Removes credentials files of containers this dispatcher does not
    /// track, and temporary files of interrupted writes.
    fn remove_stale_credentials(&mut self) {
        let (uuids, temporary) = match self.store.list() {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, "failed to look for stale credentials files");
                return;
            }
        };
        for uuid in uuids
            .iter()
            .filter(|uuid| !self.tracked.contains_key(*uuid))
        {
            match self.store.remove(uuid) {
                Ok(()) => {
                    tracing::info!(container = %uuid, "removed the credentials file of a container this dispatcher does not hold")
                }
                Err(err) => {
                    tracing::warn!(container = %uuid, error = %err, "failed to remove a stale credentials file")
                }
            }
        }
        for path in temporary {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %err, "failed to remove a temporary credentials file");
            }
        }
    }

    async fn cancel_leftovers(&mut self, jobs: &[BatchJob], now: Instant) {
        for job in jobs {
            if self.cancels.should_send(job, now) {
                tracing::warn!(job_id = %job.id, "a job of this queued container is still listed; cancelling it before locking the container");
            }
            self.cancel_job(job, now).await;
        }
    }

    /// Lets one tracked container decide, and carries out its actions.
    /// `new_snapshot` is true only for the pass that took the snapshot
    /// `jobs` come from.
    async fn step(
        &mut self,
        uuid: &str,
        record: Option<Container>,
        jobs: &[BatchJob],
        now: Instant,
        new_snapshot: bool,
    ) {
        let actions = self.observe(uuid, record.as_ref(), jobs, now, new_snapshot);
        self.execute(uuid, record, actions, now).await;
    }

    /// Lets one tracked container decide; returns its actions.
    fn observe(
        &mut self,
        uuid: &str,
        record: Option<&Container>,
        jobs: &[BatchJob],
        now: Instant,
        new_snapshot: bool,
    ) -> Vec<Action> {
        let credentials_age = self.store.age(uuid);
        let Some(tracked) = self.tracked.get_mut(uuid) else {
            return Vec::new();
        };
        tracked.observe(Observation {
            record,
            jobs,
            generation: self.generation,
            new_snapshot,
            now,
            token_uuid: &self.token_uuid,
            credentials_age,
            cancel_reasons: self.backend.cancel_pending_reasons(),
        })
    }

    /// Carries out actions in order; some produce further actions.
    async fn execute(
        &mut self,
        uuid: &str,
        mut record: Option<Container>,
        actions: Vec<Action>,
        now: Instant,
    ) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            if !self.tracked.contains_key(uuid) {
                return;
            }
            match action {
                Action::Submit => {
                    if let Some(container) = &record {
                        queue.extend(self.submit(container, now).await);
                    }
                }
                Action::RecordJobId(job_id) => self.record_job_id(uuid, job_id.as_str()).await,
                Action::Cancel(job) => self.cancel_job(&job, now).await,
                Action::Unlock { reason } => self.unlock(uuid, &reason, now).await,
                Action::CancelContainer { error, detail } => {
                    self.cancel_container(uuid, record.as_ref(), &error, &detail)
                        .await
                }
                Action::ShowPending(job) => self.show_pending(uuid, record.as_ref(), &job).await,
                Action::ShowRetry(notice) => self.show_retry(uuid, record.as_ref(), &notice).await,
                Action::ClearSchedulingStatus => {
                    self.clear_scheduling_status(uuid, record.as_ref()).await
                }
                Action::CancelUnrunnable(job) => {
                    let detail = self.pending_text(&job);
                    tracing::warn!(
                        job_id = %job.id,
                        reason = %job.reason,
                        "the job is pending for a reason listed in dispatch.slurm.cancel_pending_reasons"
                    );
                    self.cancel_container(uuid, record.as_ref(), UNRUNNABLE_ERROR, &detail)
                        .await
                }
                Action::Resolve => {
                    let (job, last_seen) = self
                        .tracked
                        .get(uuid)
                        .map(|t| (t.job().cloned(), t.last_seen().cloned()))
                        .unwrap_or_default();
                    let fetched = match self.controller().get_container(uuid).await {
                        Ok(container) => Some(container),
                        Err(err) if status_code(&err) == Some(404) => None,
                        Err(err) => {
                            report!(
                                self.repeats,
                                format!("{uuid} get"),
                                err,
                                "failed to fetch the container"
                            );
                            continue;
                        }
                    };
                    self.repeats.succeeded(&format!("{uuid} get"));
                    match &fetched {
                        Some(container) => self.remember(container.clone()),
                        None => {
                            self.records.remove(uuid);
                        }
                    }
                    tracing::warn!(
                        state = fetched
                            .as_ref()
                            .map(|c| c.state.as_str())
                            .unwrap_or("not found"),
                        job_id = job.as_ref().map(|id| id.to_string()).unwrap_or_default(),
                        "the container's job has left the batch system"
                    );
                    let resolved = resolve_vanished(
                        fetched.as_ref(),
                        &self.token_uuid,
                        self.backend.name(),
                        job.as_ref(),
                        last_seen.as_ref(),
                    );
                    for action in resolved {
                        queue.push_back(match (action, &job) {
                            (Action::CancelContainer { error, detail }, Some(id)) => {
                                let detail = self.end_reason(id).await.unwrap_or(detail);
                                Action::CancelContainer { error, detail }
                            }
                            (action, _) => action,
                        });
                    }
                    record = fetched;
                }
                Action::RemoveCredentials => {
                    if let Err(err) = self.store.remove(uuid) {
                        tracing::warn!(error = %err, "failed to remove the credentials file");
                    }
                }
                Action::Forget => {
                    self.tracked.remove(uuid);
                    tracing::debug!("stopped tracking the container");
                }
            }
        }
    }

    /// Submits a container's job; returns the follow-up actions. While
    /// calls to the batch system back off, submits nothing and counts no
    /// attempt: the container stays due and is submitted at a later pass.
    async fn submit(&mut self, container: &Container, now: Instant) -> Vec<Action> {
        if self.limiter.backoff_remaining().is_some() {
            tracing::debug!("not submitting while calls to the batch system back off");
            return Vec::new();
        }
        let request = match self.job_request(container, now) {
            Ok(request) => request,
            Err(actions) => return actions,
        };
        let result = self.backend.submit(&request).await;
        self.submitted(&container.uuid, result, now)
    }

    /// Returns the job request of a locked container, or the actions to
    /// take when it cannot have one: unlock it when its credentials file is
    /// missing, cancel it when its record requests what no job can have.
    fn job_request(
        &mut self,
        container: &Container,
        now: Instant,
    ) -> Result<JobRequest, Vec<Action>> {
        let uuid = container.uuid.as_str();
        let credentials_file = self.store.path(uuid);
        if !credentials_file.is_file() {
            return Err(vec![Action::Unlock {
                reason: format!(
                    "its credentials file {} is missing",
                    credentials_file.display()
                ),
            }]);
        }
        JobRequest::for_container(container, credentials_file)
            .map_err(|err| self.submitted(uuid, Err(err), now))
    }

    /// Notes the result of a submission and returns the follow-up actions.
    fn submitted(
        &mut self,
        uuid: &str,
        result: Result<Submission, BackendError>,
        now: Instant,
    ) -> Vec<Action> {
        if let Err(err) = &result {
            if err.is_backing_off() {
                // The limiter stopped the call: no attempt was made.
                tracing::debug!(error = %err, "the submission waits for the backoff to end");
                return Vec::new();
            }
        }
        let generation = self.generation;
        let Some(tracked) = self.tracked.get_mut(uuid) else {
            return Vec::new();
        };
        match result {
            Ok(submission) => {
                self.metrics.submitted();
                tracing::info!(job_id = %submission.job_id, "submitted the job");
                tracing::debug!(
                    job_id = %submission.job_id,
                    command = %submission.command,
                    script = submission.script.as_deref().unwrap_or(""),
                    stdout = %submission.stdout.trim(),
                    stderr = %submission.stderr.trim(),
                    "submission details"
                );
                let job_id = submission.job_id.clone();
                tracked.submitted(submission, generation);
                vec![Action::RecordJobId(job_id)]
            }
            Err(err) => {
                let permanent = err.is_permanent();
                let actions = tracked.submit_failed(permanent, &err.to_string(), now, &self.retry);
                if permanent {
                    self.metrics.submit_failed(FailureClass::Permanent);
                    tracing::warn!(error = %err, "the batch system rejected the job; cancelling the container");
                } else {
                    self.metrics.submit_failed(FailureClass::Transient);
                    match actions.first() {
                        Some(Action::ShowRetry(notice)) => tracing::warn!(
                            error = %err,
                            attempt = notice.attempt,
                            max_attempts = notice.max_attempts,
                            "failed to submit the job; backing off for {}",
                            format_delay(notice.delay)
                        ),
                        _ => {
                            tracing::warn!(error = %err, "failed to submit the job; giving up on this lock")
                        }
                    }
                }
                actions
            }
        }
    }

    async fn record_job_id(&mut self, uuid: &str, job_id: &str) {
        let result = self
            .controller()
            .update_container(uuid, &json!({"scheduler_job_id": job_id}))
            .await;
        self.job_id_written(uuid, job_id, result);
    }

    /// Handles the controller's response to recording a job id.
    fn job_id_written(&mut self, uuid: &str, job_id: &str, result: Result<Container, ClientError>) {
        let key = format!("{uuid} record");
        match result {
            Ok(updated) => {
                self.remember(updated);
                self.repeats.succeeded(&key);
                if let Some(tracked) = self.tracked.get_mut(uuid) {
                    tracked.job_id_recorded();
                }
            }
            Err(err) => report!(
                self.repeats,
                key,
                err,
                job_id,
                "failed to record the job id on the container"
            ),
        }
    }

    /// Asks the backend why a job that left the queue ended. A failure
    /// only loses the reason, because the container is cancelled all the same.
    async fn end_reason(&mut self, job: &JobId) -> Option<String> {
        match self.backend.end_reason(job).await {
            Ok(reason) => reason,
            Err(err) => {
                tracing::warn!(job_id = %job, error = %err, "failed to ask the batch system why the job ended");
                None
            }
        }
    }

    async fn cancel_job(&mut self, job: &BatchJob, now: Instant) {
        if !self.cancels.should_send(job, now) {
            return;
        }
        self.cancels.record(job, now);
        match self.backend.cancel(job).await {
            Ok(()) => tracing::info!(job_id = %job.id, job_state = %job.state, "cancelled the job"),
            Err(err) => tracing::warn!(job_id = %job.id, error = %err, "failed to cancel the job"),
        }
    }

    async fn unlock(&mut self, uuid: &str, reason: &str, now: Instant) {
        match self.controller().unlock_container(uuid).await {
            Ok(unlocked) => {
                self.remember(unlocked);
                tracing::info!(reason, "unlocked the container");
                self.release(uuid);
                self.hold(uuid, now);
            }
            Err(err) if status_code(&err) == Some(422) => {
                // It changed meanwhile, for example because its supervisor
                // started it. The feed reports the new state.
                tracing::info!(error = %err, "the container could not be unlocked");
            }
            Err(err) => report!(
                self.repeats,
                format!("{uuid} unlock"),
                err,
                "failed to unlock the container"
            ),
        }
    }

    async fn cancel_container(
        &mut self,
        uuid: &str,
        record: Option<&Container>,
        error: &str,
        detail: &str,
    ) {
        let mut runtime_status = record.map(|c| c.runtime_status.clone()).unwrap_or_default();
        runtime_status.remove(SCHEDULING_STATUS_KEY);
        runtime_status.insert("error".into(), Value::from(error));
        runtime_status.insert("errorDetail".into(), Value::from(detail));
        let attributes = json!({"state": "Cancelled", "runtime_status": runtime_status});
        match self.controller().update_container(uuid, &attributes).await {
            Ok(cancelled) => {
                self.remember(cancelled);
                tracing::warn!(error, detail, "cancelled the container");
                if let Err(err) = self.store.remove(uuid) {
                    tracing::warn!(error = %err, "failed to remove the credentials file");
                }
            }
            Err(err) => report!(
                self.repeats,
                format!("{uuid} cancel"),
                err,
                "failed to cancel the container"
            ),
        }
    }

    /// Describes why `job` is pending, for users.
    fn pending_text(&self, job: &BatchJob) -> String {
        let mut text = format!(
            "{} job {} is pending: {}",
            self.backend.name(),
            job.id,
            job.reason
        );
        if let Some(explanation) = self.backend.explain_reason(&job.reason) {
            text.push_str(&format!(" ({explanation})"));
        }
        text
    }

    /// Records why the container's job is pending in its runtime_status,
    /// unless the record already shows the same text.
    async fn show_pending(&mut self, uuid: &str, record: Option<&Container>, job: &BatchJob) {
        let text = self.pending_text(job);
        if self.set_scheduling_status(uuid, record, &text).await {
            tracing::info!(job_id = %job.id, status = %text, "recorded why the job is pending");
            if let Some(tracked) = self.tracked.get_mut(uuid) {
                tracked.pending_shown(Some(job));
            }
        }
    }

    /// Records in the container's runtime_status that a submission failed
    /// and when the next attempt is.
    async fn show_retry(&mut self, uuid: &str, record: Option<&Container>, notice: &RetryNotice) {
        let retry_at = std::time::SystemTime::now() + notice.delay;
        let retry_at = humantime_serde::re::humantime::format_rfc3339_seconds(retry_at);
        let text = notice.status_text(&retry_at.to_string());
        if self.set_scheduling_status(uuid, record, &text).await {
            tracing::debug!(status = %text, "recorded the failed submission");
            if let Some(tracked) = self.tracked.get_mut(uuid) {
                tracked.retry_shown();
            }
        }
    }

    /// Sets the container's scheduling status to `text`, unless the record
    /// already shows it. Returns false when the record is unknown or the
    /// update failed (which is logged).
    async fn set_scheduling_status(
        &mut self,
        uuid: &str,
        record: Option<&Container>,
        text: &str,
    ) -> bool {
        let Some(container) = record else {
            return false;
        };
        let shown = container
            .runtime_status
            .get(SCHEDULING_STATUS_KEY)
            .and_then(Value::as_str);
        if shown == Some(text) {
            return true;
        }
        let mut runtime_status = container.runtime_status.clone();
        runtime_status.insert(SCHEDULING_STATUS_KEY.into(), Value::from(text));
        let key = format!("{uuid} status");
        let attributes = json!({ "runtime_status": runtime_status });
        match self.controller().update_container(uuid, &attributes).await {
            Ok(updated) => {
                self.remember(updated);
                self.repeats.succeeded(&key);
                true
            }
            Err(err) => {
                report!(
                    self.repeats,
                    key,
                    err,
                    "failed to record the scheduling status"
                );
                false
            }
        }
    }

    /// Updates the gauges that describe the dispatcher's view: containers
    /// by state, jobs by state, and containers waiting out their backoff.
    fn update_metrics(&self, now: Instant) {
        let (mut queued, mut locked, mut running) = (0, 0, 0);
        for container in self.records.values() {
            match container.state {
                ContainerState::Queued if container.priority > 0 => queued += 1,
                ContainerState::Locked if is_locked_by(container, &self.token_uuid) => locked += 1,
                ContainerState::Running if is_locked_by(container, &self.token_uuid) => {
                    running += 1
                }
                _ => {}
            }
        }
        self.metrics.set_containers(queued, locked, running);
        let mut jobs: BTreeMap<String, u64> = BTreeMap::new();
        for job in self.latest_jobs.values().flatten() {
            if self.is_container_job(job) {
                *jobs.entry(job.state.to_string()).or_default() += 1;
            }
        }
        self.metrics.set_jobs(jobs);
        let waiting = self
            .tracked
            .values()
            .filter(|tracked| tracked.retry_at().is_some_and(|at| at > now))
            .count();
        self.metrics.set_submit_backoffs(waiting as u64);
    }

    /// Removes the scheduling status of a container whose job has started.
    // NOTE: the update replaces runtime_status with the cached copy minus
    // the key, so a key written in between would be lost. The supervisor
    // writes runtime_status only together with a final state, after which
    // the controller rejects this update.
    async fn clear_scheduling_status(&mut self, uuid: &str, record: Option<&Container>) {
        let Some(container) = record else {
            return;
        };
        let mut runtime_status = container.runtime_status.clone();
        if runtime_status.remove(SCHEDULING_STATUS_KEY).is_none() {
            return;
        }
        let key = format!("{uuid} status");
        let attributes = json!({ "runtime_status": runtime_status });
        match self.controller().update_container(uuid, &attributes).await {
            Ok(updated) => {
                self.remember(updated);
                self.repeats.succeeded(&key);
                tracing::debug!("removed the scheduling status: the job has started");
                if let Some(tracked) = self.tracked.get_mut(uuid) {
                    tracked.pending_shown(None);
                }
            }
            Err(err) => report!(
                self.repeats,
                key,
                err,
                "failed to remove the scheduling status"
            ),
        }
    }

    /// Removes a container's credentials file and stops tracking it.
    fn release(&mut self, uuid: &str) {
        if let Err(err) = self.store.remove(uuid) {
            tracing::warn!(error = %err, "failed to remove the credentials file");
        }
        self.tracked.remove(uuid);
    }

    #[cfg(test)]
    pub(crate) fn is_tracked(&self, uuid: &str) -> bool {
        self.tracked.contains_key(uuid)
    }
}

/// Orders containers to lock: highest priority first, then oldest.
fn lock_order(a: &Container, b: &Container) -> Ordering {
    b.priority
        .cmp(&a.priority)
        .then(a.created_at.cmp(&b.created_at))
        .then(a.uuid.cmp(&b.uuid))
}

/// True for a container Locked or Running by the token `token_uuid`.
fn is_locked_by(container: &Container, token_uuid: &str) -> bool {
    container.state.is_locked() && container.locked_by_uuid.as_deref() == Some(token_uuid)
}

/// Returns the loop's clock: tokio's, so that tests with a paused clock
/// drive it.
fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Checks that the token UUID has the configured cluster's prefix.
fn check_token_cluster(token_uuid: &str, cluster_id: &ClusterId) -> Result<(), StartError> {
    let uuid =
        Uuid::parse_as(token_uuid, ObjectType::ApiClientAuthorization).map_err(|source| {
            StartError::TokenUuid {
                token_uuid: token_uuid.to_string(),
                source,
            }
        })?;
    if uuid.cluster_id() != cluster_id.as_str() {
        return Err(StartError::ClusterMismatch {
            token_uuid: token_uuid.to_string(),
            token_cluster: uuid.cluster_id().to_string(),
            cluster_id: cluster_id.clone(),
        });
    }
    Ok(())
}

/// Returns the HTTP status of a controller error, as a number.
fn status_code(err: &ClientError) -> Option<u16> {
    err.status().map(|status| status.as_u16())
}

#[path = "dispatcher_burst.rs"]
mod burst;

#[cfg(test)]
#[path = "dispatcher_tests.rs"]
mod tests;
