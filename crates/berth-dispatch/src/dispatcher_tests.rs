//! Tests of the dispatch loop's decisions against the in-memory controller
//! and batch system of [`crate::fake`].
//!
//! Most tests drive the loop's steps by hand: [`Harness::resync`] runs a
//! resynchronisation, [`Harness::poll`] a poll, and
//! [`Harness::apply_changes`] applies what the controller's change feed
//! would report, each at a time the test sets. The tests of
//! [`Dispatcher::run`] run on tokio's paused clock: [`settle`] lets the loop
//! work without moving the clock, and only `tokio::time::advance` moves it,
//! so "at once" means "before any timer fired".

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use berth_client::JobCredentials;
use berth_core::ContainerState;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::*;
use crate::backend::JobState;
use crate::fake::{queued_container, FakeBackend, FakeController, SubmitFailure, TOKEN_UUID};
use crate::feed::CHANGE_FEED_WAIT;
use crate::tracker::{
    ORPHAN_SUBMIT_GRACE, REJECTED_ERROR, SCHEDULING_STATUS_KEY, UNRUNNABLE_ERROR, VANISHED_ERROR,
};

const A: &str = "zzzzz-dz642-00000000000000a";
const B: &str = "zzzzz-dz642-00000000000000b";
/// Time between two passes of the harness.
const PASS: Duration = Duration::from_secs(2);

struct Harness {
    controller: FakeController,
    backend: FakeBackend,
    dir: tempfile::TempDir,
    dispatcher: Dispatcher<FakeBackend>,
    now: Instant,
    shutdown: CancellationToken,
    /// The controller's change number up to which [`Harness::apply_changes`]
    /// has applied the changes.
    cursor: u64,
}

fn dispatcher(
    controller: &FakeController,
    backend: &FakeBackend,
    dir: &std::path::Path,
) -> Dispatcher<FakeBackend> {
    let store =
        CredentialsStore::open(dir, Url::parse("http://127.0.0.1:8000/").unwrap(), false).unwrap();
    Dispatcher::new(
        Box::new(controller.clone()),
        backend.clone(),
        "zzzzz".parse().unwrap(),
        store,
        TOKEN_UUID.to_string(),
    )
}

impl Harness {
    fn new() -> Harness {
        Harness::with_backend(FakeBackend::default())
    }

    fn with_backend(backend: FakeBackend) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let controller = FakeController::default();
        let dispatcher = dispatcher(&controller, &backend, dir.path());
        Harness {
            controller,
            backend,
            dir,
            dispatcher,
            now: Instant::now(),
            shutdown: CancellationToken::new(),
            cursor: 0,
        }
    }

    /// Gives the dispatcher a call limiter, metrics and submission
    /// retries; call before the first pass.
    fn set_limits(
        &mut self,
        limiter: Arc<CallLimiter>,
        metrics: Arc<Metrics>,
        retry: SubmitRetryConfig,
    ) {
        self.dispatcher = dispatcher(&self.controller, &self.backend, self.dir.path())
            .with_limits(limiter, metrics, retry);
    }

    /// Replaces the dispatcher with a new one, as after a restart; the
    /// controller, the batch system and the credentials directory stay.
    fn restart(&mut self) {
        self.dispatcher = dispatcher(&self.controller, &self.backend, self.dir.path());
    }

    async fn resync(&mut self) {
        self.now += PASS;
        self.dispatcher
            .resync(self.now, &self.shutdown)
            .await
            .unwrap();
    }

    async fn resync_error(&mut self) -> PassError {
        self.now += PASS;
        self.dispatcher
            .resync(self.now, &self.shutdown)
            .await
            .unwrap_err()
    }

    async fn poll(&mut self) {
        self.now += PASS;
        self.dispatcher
            .poll(self.now, &self.shutdown)
            .await
            .unwrap();
    }

    /// Returns the ids of the jobs the dispatcher cancelled, in order.
    fn cancelled_job_ids(&self) -> Vec<String> {
        self.backend
            .cancels()
            .iter()
            .map(|job| job.id.to_string())
            .collect()
    }

    /// Counts the container list calls the dispatcher made.
    fn lists(&self) -> usize {
        self.controller.count("list")
    }

    /// Applies the containers changed since the last call, as the loop
    /// does with a page of the change feed, without moving the time.
    async fn apply_changes(&mut self) {
        let changed = self.controller.changes_after(self.cursor);
        self.cursor = self.controller.change_seq();
        self.dispatcher
            .apply_changes(&changed, self.now, &self.shutdown)
            .await;
    }

    fn credentials_file(&self, uuid: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{uuid}.json"))
    }

    fn state(&self, uuid: &str) -> ContainerState {
        self.controller.container(uuid).state
    }

    fn scheduling_status(&self, uuid: &str) -> Option<String> {
        self.controller
            .container(uuid)
            .runtime_status
            .get(SCHEDULING_STATUS_KEY)
            .and_then(|value| value.as_str())
            .map(str::to_string)
    }

    /// Counts the updates of `uuid` that set its runtime_status.
    fn status_updates(&self, uuid: &str) -> usize {
        self.controller
            .calls()
            .iter()
            .filter(|call| call.starts_with(&format!("update {uuid} {{\"runtime_status\"")))
            .count()
    }

    /// Locks and submits `uuid` and lets the supervisor start it.
    async fn start_running(&mut self, uuid: &str) {
        self.controller.add(queued_container(uuid, 1));
        self.resync().await;
        self.controller
            .change(uuid, |c| c.state = ContainerState::Running);
        self.backend.set_state(uuid, JobState::Running);
        self.resync().await;
    }
}

#[tokio::test]
async fn queued_container_is_locked_submitted_and_recorded() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;

    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Locked);
    assert_eq!(container.locked_by_uuid.as_deref(), Some(TOKEN_UUID));
    let submits = h.backend.submits();
    assert_eq!(submits.len(), 1);
    assert_eq!(submits[0].container_uuid, A);
    assert_eq!(submits[0].ram, 268435456);
    assert_eq!(submits[0].credentials_file, h.credentials_file(A));
    assert_eq!(container.scheduler_job_id.as_deref(), Some("101"));

    let credentials = JobCredentials::read(&h.credentials_file(A)).unwrap();
    assert_eq!(credentials.container_uuid, A);
    assert_eq!(credentials.api_url.as_str(), "http://127.0.0.1:8000/");
    assert!(credentials.api_token.starts_with("v2/zzzzz-gj3su-lock"));
    assert_eq!(credentials.gateway_secret, "gateway1");
    assert!(h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn listed_job_is_never_submitted_twice() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    for _ in 0..6 {
        h.resync().await;
    }
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.controller.count("lock"), 1);
    // One update records the job id, one the job's pending reason.
    assert_eq!(
        h.controller.count(&format!("update {A}")),
        2,
        "{:?}",
        h.controller.calls()
    );
    assert_eq!(h.status_updates(A), 1);
    assert_eq!(h.backend.status_calls(), 6, "one status query per pass");
}

#[tokio::test]
async fn higher_priority_is_locked_first() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.controller.add(queued_container(B, 9));
    h.resync().await;
    let order: Vec<String> = h
        .backend
        .submits()
        .into_iter()
        .map(|r| r.container_uuid)
        .collect();
    assert_eq!(order, [B, A]);
}

#[tokio::test]
async fn lock_conflict_is_skipped_quietly() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.controller.conflict_on_lock(A);
    h.resync().await;
    h.resync().await;
    assert!(h.backend.submits().is_empty());
    assert!(!h.dispatcher.is_tracked(A));
    assert_eq!(
        h.controller.count("lock"),
        2,
        "tried again on the next pass"
    );
    assert!(!h.credentials_file(A).exists());
}

#[tokio::test]
async fn priority_zero_cancels_the_job_once() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.controller.change(A, |c| c.priority = 0);
    h.resync().await;
    h.resync().await;
    let cancels = h.backend.cancels();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0].id.as_str(), "101");
    assert_eq!(cancels[0].state, JobState::Running);

    // Sent again only when the job is still listed much later.
    h.now += crate::tracker::CANCEL_RESEND_AFTER;
    h.resync().await;
    assert_eq!(h.backend.cancels().len(), 2);

    // The supervisor stops the container and reports; the job leaves.
    h.controller
        .change(A, |c| c.state = ContainerState::Cancelled);
    h.backend.end(A);
    h.resync().await;
    h.resync().await;
    h.resync().await;
    assert!(!h.dispatcher.is_tracked(A));
    assert!(!h.credentials_file(A).exists());
}

#[tokio::test]
async fn priority_zero_pending_job_unlocks() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.controller.change(A, |c| c.priority = 0);
    h.resync().await;
    assert_eq!(h.backend.cancels()[0].state, JobState::Pending);
    h.backend.end(A);
    h.resync().await;
    assert_eq!(
        h.state(A),
        ContainerState::Locked,
        "one snapshot without the job is not enough"
    );
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert!(!h.credentials_file(A).exists());
    assert!(!h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn vanished_job_end_reason_becomes_the_error_detail() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend
        .set_end_reason("101", Some("slurm job 101 ended OUT_OF_MEMORY"));
    h.backend.end(A);
    h.resync().await;
    h.resync().await;

    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], VANISHED_ERROR);
    assert_eq!(
        container.runtime_status["errorDetail"],
        "slurm job 101 ended OUT_OF_MEMORY"
    );
}

#[tokio::test]
async fn failed_end_reason_query_still_cancels_the_container() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend.set_end_reason("101", None);
    h.backend.end(A);
    h.resync().await;
    h.resync().await;

    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], VANISHED_ERROR);
    let detail = container.runtime_status["errorDetail"].as_str().unwrap();
    assert!(
        detail.contains("fake job 101 was last seen running"),
        "{detail}"
    );
}

#[tokio::test]
async fn vanished_running_container_is_cancelled_with_a_reason() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend.end(A);
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Running);
    h.resync().await;

    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], VANISHED_ERROR);
    let detail = container.runtime_status["errorDetail"].as_str().unwrap();
    assert!(
        detail.contains("fake job 101 was last seen running"),
        "{detail}"
    );
    assert!(!h.credentials_file(A).exists());
    h.resync().await;
    h.resync().await;
    assert!(!h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn vanished_locked_relocked_after_hold() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.backend.end(A);
    h.resync().await;
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert!(!h.credentials_file(A).exists());

    h.resync().await;
    assert_eq!(h.controller.count("lock"), 1, "held after the unlock");
    h.now += RELOCK_HOLD;
    h.resync().await;
    assert_eq!(h.controller.count("lock"), 2);
    assert_eq!(h.backend.submits().len(), 2);
    assert_eq!(
        h.controller.container(A).scheduler_job_id.as_deref(),
        Some("102")
    );
}

#[tokio::test]
async fn failed_status_query_is_never_an_empty_queue() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend.end(A);
    h.backend.fail_statuses(5);
    for _ in 0..5 {
        let err = h.resync_error().await;
        assert!(matches!(err, PassError::Status(_)), "{err}");
    }
    assert_eq!(h.state(A), ContainerState::Running);
    h.resync().await;
    assert_eq!(
        h.state(A),
        ContainerState::Running,
        "one good snapshot is not enough"
    );
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Cancelled);
}

#[tokio::test]
async fn one_empty_status_answer_cancels_nothing() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.controller.add(queued_container(B, 1));
    h.resync().await;
    assert_eq!(h.state(B), ContainerState::Locked);
    let submits = h.backend.submits().len();

    // The batch system returns no jobs at all once, then lists them
    // again: nothing is cancelled, unlocked or submitted again.
    h.backend.empty_statuses(1);
    h.resync().await;
    h.resync().await;
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Running);
    assert_eq!(h.state(B), ContainerState::Locked);
    assert!(h.backend.cancels().is_empty());
    assert_eq!(h.backend.submits().len(), submits);
    assert_eq!(h.controller.count("unlock"), 0);
}

#[tokio::test]
async fn failed_listing_skips_the_resync() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.controller.fail_lists(1);
    let err = h.resync_error().await;
    assert!(err.to_string().contains("failed to list"), "{err}");
    assert_eq!(h.backend.status_calls(), 0);
    assert_eq!(h.controller.count("lock"), 0);
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn complete_container_is_forgotten_without_updates() {
    let mut h = Harness::new();
    h.start_running(A).await;
    let updates = h.controller.count("update");
    h.controller.change(A, |c| {
        c.state = ContainerState::Complete;
        c.exit_code = Some(0);
    });
    h.backend.end(A);
    for _ in 0..3 {
        h.resync().await;
    }
    assert!(!h.dispatcher.is_tracked(A));
    assert!(!h.credentials_file(A).exists());
    assert_eq!(h.controller.count("update"), updates);
    assert!(h.backend.cancels().is_empty());
    assert_eq!(h.state(A), ContainerState::Complete);
}

#[tokio::test]
async fn rejected_job_cancels_the_container_with_the_reason() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Rejected);
    h.resync().await;
    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], REJECTED_ERROR);
    let detail = container.runtime_status["errorDetail"].as_str().unwrap();
    assert!(
        detail.contains("Memory specification can not be satisfied"),
        "{detail}"
    );
    assert!(!h.credentials_file(A).exists());
    h.resync().await;
    assert!(!h.dispatcher.is_tracked(A));
    assert_eq!(h.backend.submits().len(), 1);
}

/// Retries 2 s, 4 s and then 8 s apart, and unlocks after 5 failures.
fn short_retry() -> SubmitRetryConfig {
    SubmitRetryConfig {
        first_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(8),
        max_attempts: 5,
    }
}

#[tokio::test]
async fn failed_submissions_are_retried_then_unlocked() {
    let mut h = Harness::new();
    h.set_limits(CallLimiter::unlimited(), Metrics::new(), short_retry());
    h.controller.add(queued_container(A, 1));
    for _ in 0..5 {
        h.backend.fail_next_submit(SubmitFailure::Transient);
    }
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.state(A), ContainerState::Locked);
    let status = h.scheduling_status(A).unwrap();
    assert!(
        status.starts_with("submission attempt 1 of 5 failed; the next attempt is at 20"),
        "{status}"
    );
    assert!(status.contains("timed out"), "{status}");
    // Retries wait at most 2 s, 4 s, 8 s and 8 s; passes are 2 s apart.
    for _ in 0..11 {
        h.resync().await;
    }
    assert_eq!(h.backend.submits().len(), 5);
    assert_eq!(h.state(A), ContainerState::Queued);
    assert!(!h.credentials_file(A).exists());
    assert!(!h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn retried_submission_clears_its_status() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.resync().await;
    assert!(h.scheduling_status(A).is_some());
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 2, "retried after 2 s");
    // The fake lists new jobs pending for reason Priority, which replaces
    // the retry status.
    h.resync().await;
    let status = h.scheduling_status(A).unwrap();
    assert!(status.contains("is pending: Priority"), "{status}");
}

#[tokio::test]
async fn timed_out_submission_job_adopted() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.resync().await;
    // sbatch timed out, but Slurm had queued the job.
    h.backend.add_job("555", A, JobState::Pending);
    for _ in 0..4 {
        h.resync().await;
    }
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(
        h.controller.container(A).scheduler_job_id.as_deref(),
        Some("555")
    );
}

#[tokio::test]
async fn restart_tracks_running_job() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.restart();
    for _ in 0..4 {
        h.resync().await;
    }
    assert!(h.dispatcher.is_tracked(A));
    assert_eq!(h.backend.submits().len(), 1);
    assert!(h.backend.cancels().is_empty());
    assert_eq!(h.state(A), ContainerState::Running);
    assert!(
        h.credentials_file(A).exists(),
        "kept while the container runs"
    );

    // It still acts on the container afterwards.
    h.controller.change(A, |c| c.priority = 0);
    h.resync().await;
    assert_eq!(h.backend.cancels().len(), 1);
}

#[tokio::test]
async fn restart_submits_unsubmitted_lock() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 1);
    h.restart();
    h.resync().await;
    assert_eq!(
        h.backend.submits().len(),
        1,
        "waits for a second snapshot without a job"
    );
    h.resync().await;
    assert_eq!(
        h.backend.submits().len(),
        1,
        "waits while a killed dispatcher's submit call may still run"
    );
    let file = std::fs::File::options()
        .write(true)
        .open(h.credentials_file(A))
        .unwrap();
    file.set_modified(std::time::SystemTime::now() - ORPHAN_SUBMIT_GRACE)
        .unwrap();
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 2);
    assert_eq!(
        h.controller.container(A).scheduler_job_id.as_deref(),
        Some("101")
    );
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 2);
}

#[tokio::test]
async fn restart_unlocks_lock_without_credentials() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.resync().await;
    std::fs::remove_file(h.credentials_file(A)).unwrap();
    h.restart();
    h.resync().await;
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn restart_unlocks_ended_recorded_job() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.backend.end(A);
    h.restart();
    h.resync().await;
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert_eq!(
        h.backend.submits().len(),
        1,
        "a recorded job is never submitted again"
    );
}

#[tokio::test]
async fn restart_cancels_running_without_job() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend.end(A);
    h.restart();
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Running);
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Cancelled);
}

#[tokio::test]
async fn orphaned_jobs_are_cancelled_on_start() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.add_job("7", A, JobState::Running);
    h.backend
        .add_job("8", "yyyyy-dz642-000000000000001", JobState::Running);
    h.backend.add_job("9", "my own job", JobState::Pending);
    h.resync().await;
    let cancelled: Vec<String> = h
        .backend
        .cancels()
        .iter()
        .map(|j| j.id.to_string())
        .collect();
    assert_eq!(cancelled, ["7"]);
    assert_eq!(
        h.controller.count("lock"),
        0,
        "not locked while its old job is listed"
    );
    h.backend.end(A);
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn stale_credentials_are_removed_on_start() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    let stale = h.credentials_file(B);
    std::fs::write(&stale, "{}").unwrap();
    let temporary = h.dir.path().join(format!("{B}.tmp"));
    std::fs::write(&temporary, "{}").unwrap();
    h.restart();
    h.resync().await;
    assert!(!stale.exists());
    assert!(!temporary.exists());
    assert!(
        h.credentials_file(A).exists(),
        "the file of a tracked lock stays"
    );
}

#[tokio::test]
async fn stray_job_of_a_tracked_container_is_cancelled() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend.add_job("999", A, JobState::Pending);
    h.resync().await;
    let cancelled: Vec<String> = h
        .backend
        .cancels()
        .iter()
        .map(|j| j.id.to_string())
        .collect();
    assert_eq!(cancelled, ["999"]);
    assert_eq!(h.state(A), ContainerState::Running);
}

#[tokio::test]
async fn shutdown_stops_between_containers() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.controller.add(queued_container(B, 1));
    h.shutdown.cancel();
    h.resync().await;
    assert!(h.backend.submits().is_empty());
    assert!(h.backend.cancels().is_empty());
}

#[tokio::test]
async fn start_learns_the_token_uuid() {
    let h = Harness::new();
    let store = CredentialsStore::open(
        h.dir.path(),
        Url::parse("http://127.0.0.1:8000/").unwrap(),
        false,
    )
    .unwrap();
    let started = Dispatcher::start(
        Box::new(h.controller.clone()),
        h.backend.clone(),
        "zzzzz".parse().unwrap(),
        store,
        &CancellationToken::new(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(started.token_uuid, TOKEN_UUID);
}

#[tokio::test]
async fn start_rejects_token_of_another_cluster() {
    let h = Harness::new();
    h.controller.set_token_uuid("yyyyy-gj3su-000000000000000");
    let store = CredentialsStore::open(
        h.dir.path(),
        Url::parse("http://127.0.0.1:8000/").unwrap(),
        false,
    )
    .unwrap();
    let err = Dispatcher::start(
        Box::new(h.controller.clone()),
        h.backend.clone(),
        "zzzzz".parse().unwrap(),
        store,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StartError::ClusterMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("yyyyy-gj3su-000000000000000"), "{text}");
    assert!(text.contains("cluster yyyyy"), "{text}");
    assert!(text.contains("cluster_id is zzzzz"), "{text}");
    assert_eq!(h.controller.count("list"), 0, "nothing dispatched");
}

#[tokio::test]
async fn start_rejects_malformed_token_uuid() {
    let h = Harness::new();
    h.controller.set_token_uuid("zzzzz-tpzed-000000000000000");
    let store = CredentialsStore::open(
        h.dir.path(),
        Url::parse("http://127.0.0.1:8000/").unwrap(),
        false,
    )
    .unwrap();
    let err = Dispatcher::start(
        Box::new(h.controller.clone()),
        h.backend.clone(),
        "zzzzz".parse().unwrap(),
        store,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StartError::TokenUuid { .. }), "{err}");
    assert!(
        err.to_string().contains("zzzzz-tpzed-000000000000000"),
        "{err}"
    );
}

#[tokio::test]
async fn max_run_time_reaches_the_backend() {
    let mut h = Harness::new();
    let mut container = queued_container(A, 1);
    container.scheduling_parameters.max_run_time = 1;
    h.controller.add(container);
    h.resync().await;
    let submits = h.backend.submits();
    assert_eq!(submits.len(), 1);
    assert_eq!(submits[0].max_run_time, 1);
}

#[tokio::test]
async fn pending_reason_recorded_once_per_change() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    assert_eq!(h.scheduling_status(A), None, "not listed yet");
    for _ in 0..3 {
        h.resync().await;
    }
    assert_eq!(
        h.scheduling_status(A).as_deref(),
        Some("fake job 101 is pending: Priority")
    );
    assert_eq!(h.status_updates(A), 1);

    h.backend.set_reason(A, "PartitionConfig");
    for _ in 0..3 {
        h.resync().await;
    }
    assert_eq!(
        h.scheduling_status(A).as_deref(),
        Some("fake job 101 is pending: PartitionConfig (no node of the partition is big enough)")
    );
    assert_eq!(h.status_updates(A), 2);
    assert_eq!(h.state(A), ContainerState::Locked, "waits: no cancel list");

    // Once the job runs, the status goes, once.
    h.backend.set_state(A, JobState::Running);
    h.backend.set_reason(A, "");
    for _ in 0..3 {
        h.resync().await;
    }
    assert_eq!(h.scheduling_status(A), None);
    assert_eq!(h.status_updates(A), 3);
    assert_eq!(h.state(A), ContainerState::Locked);
}

#[tokio::test]
async fn restart_keeps_the_recorded_reason_without_updates() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.resync().await;
    assert_eq!(h.status_updates(A), 1);
    h.restart();
    for _ in 0..3 {
        h.resync().await;
    }
    assert_eq!(h.status_updates(A), 1, "{:?}", h.controller.calls());
}

#[tokio::test]
async fn listed_pending_reason_cancels_job_and_container() {
    let mut backend = FakeBackend::default();
    backend.set_cancel_reasons(&["PartitionConfig"]);
    let mut h = Harness::with_backend(backend);
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.backend.set_reason(A, "PartitionConfig");
    h.resync().await;
    assert_eq!(
        h.state(A),
        ContainerState::Locked,
        "one snapshot is not enough"
    );
    assert!(h.backend.cancels().is_empty());
    h.resync().await;

    let cancels = h.backend.cancels();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0].state, JobState::Pending);
    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], UNRUNNABLE_ERROR);
    assert_eq!(
        container.runtime_status["errorDetail"],
        "fake job 101 is pending: PartitionConfig (no node of the partition is big enough)"
    );
    assert!(
        !container.runtime_status.contains_key(SCHEDULING_STATUS_KEY),
        "{:?}",
        container.runtime_status
    );
    assert!(!h.credentials_file(A).exists());

    h.backend.end(A);
    for _ in 0..3 {
        h.resync().await;
    }
    assert!(!h.dispatcher.is_tracked(A));
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.controller.count("lock"), 1);
}

#[tokio::test]
async fn queued_container_is_submitted_on_its_change() {
    let mut h = Harness::new();
    h.resync().await;
    let lists = h.controller.count("list");
    h.controller.add(queued_container(A, 1));
    h.apply_changes().await;

    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Locked);
    assert_eq!(container.scheduler_job_id.as_deref(), Some("101"));
    assert_eq!(h.backend.submits().len(), 1);
    assert!(h.credentials_file(A).exists());
    assert_eq!(h.backend.status_calls(), 1, "no new snapshot");
    assert_eq!(h.controller.count("list"), lists, "no new list");

    // The feed then reports the dispatcher's own writes, which change
    // nothing.
    h.apply_changes().await;
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.controller.count("lock"), 1);
}

#[tokio::test]
async fn change_before_the_first_pass_waits_for_it() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.apply_changes().await;
    assert_eq!(h.controller.count("lock"), 0, "no snapshot yet");
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn priority_zero_cancels_running_job_on_its_change() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.apply_changes().await;
    let snapshots = h.backend.status_calls();
    h.controller.change(A, |c| c.priority = 0);
    h.apply_changes().await;

    let cancels = h.backend.cancels();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0].id.as_str(), "101");
    assert_eq!(cancels[0].state, JobState::Running);
    assert_eq!(h.backend.status_calls(), snapshots, "no new snapshot");
}

#[tokio::test]
async fn priority_zero_cancels_job_submitted_since_the_snapshot() {
    let mut h = Harness::new();
    h.resync().await;
    h.controller.add(queued_container(A, 1));
    h.apply_changes().await;
    h.controller.change(A, |c| c.priority = 0);
    h.apply_changes().await;

    let cancels = h.backend.cancels();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0].id.as_str(), "101");
    assert_eq!(cancels[0].state, JobState::Pending);

    // Two snapshots without the job release the lock.
    h.backend.end(A);
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Locked);
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert!(!h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn cancelled_container_pending_job_cancelled_on_its_change() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.resync().await;
    h.controller
        .change(A, |c| c.state = ContainerState::Cancelled);
    h.apply_changes().await;

    let cancels = h.backend.cancels();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0].state, JobState::Pending);
    assert!(!h.credentials_file(A).exists());
}

#[tokio::test]
async fn reused_snapshot_never_advances_vanishing() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend.end(A);
    h.resync().await;
    for priority in 2..6 {
        h.controller.change(A, |c| c.priority = priority);
        h.apply_changes().await;
    }
    assert_eq!(h.state(A), ContainerState::Running);
    assert_eq!(h.controller.count("get"), 0, "nothing resolved yet");

    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Cancelled);
}

#[tokio::test]
async fn released_container_waits_for_a_new_snapshot() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.backend.end(A);
    h.resync().await;
    h.resync().await;
    assert_eq!(h.state(A), ContainerState::Queued);

    // A job submitted just before the release could be missing from the
    // snapshot the loop has, so a change alone never locks it again.
    h.now += RELOCK_HOLD;
    h.controller.change(A, |c| c.priority = 2);
    h.apply_changes().await;
    assert_eq!(h.controller.count("lock"), 1);
    h.resync().await;
    assert_eq!(h.controller.count("lock"), 2);
    assert_eq!(h.backend.submits().len(), 2);
}

#[tokio::test]
async fn leftover_job_blocks_the_lock_on_a_change() {
    let mut h = Harness::new();
    h.resync().await;
    h.backend.add_job("7", A, JobState::Running);
    h.resync().await;
    h.controller.add(queued_container(A, 1));
    h.apply_changes().await;
    let cancelled: Vec<String> = h
        .backend
        .cancels()
        .iter()
        .map(|j| j.id.to_string())
        .collect();
    assert_eq!(cancelled, ["7"]);
    assert_eq!(h.controller.count("lock"), 0);

    h.backend.end(A);
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn poll_takes_a_snapshot_without_listing() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    let lists = h.lists();
    assert_eq!(lists, 2, "the containers of this token, then the queue");
    for _ in 0..3 {
        h.poll().await;
    }
    assert_eq!(h.backend.status_calls(), 4);
    assert_eq!(h.lists(), lists, "no list call in a poll");
    assert_eq!(
        h.scheduling_status(A).as_deref(),
        Some("fake job 101 is pending: Priority"),
        "a poll shows the pending reason"
    );
}

#[tokio::test]
async fn poll_before_the_first_resync_resynchronises() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.add_job("7", B, JobState::Running);
    h.poll().await;
    assert_eq!(h.lists(), 2, "the orphan scan needs a listing");
    assert_eq!(h.cancelled_job_ids(), ["7"]);
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn poll_notices_vanished_job_without_listing() {
    let mut h = Harness::new();
    h.resync().await;
    h.controller.add(queued_container(A, 1));
    h.apply_changes().await;
    h.controller
        .change(A, |c| c.state = ContainerState::Running);
    h.apply_changes().await;
    let lists = h.lists();

    h.backend.end(A);
    h.poll().await;
    assert_eq!(
        h.state(A),
        ContainerState::Running,
        "one snapshot without the job"
    );
    h.poll().await;
    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], VANISHED_ERROR);
    assert_eq!(h.lists(), lists, "no list call in a poll");
    assert_eq!(
        h.controller.count(&format!("get {A}")),
        1,
        "fetched once to resolve"
    );
}

#[tokio::test]
async fn poll_retries_failed_submission() {
    let mut h = Harness::new();
    h.resync().await;
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.controller.add(queued_container(A, 1));
    h.apply_changes().await;
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.controller.container(A).scheduler_job_id, None);

    h.poll().await;
    assert_eq!(h.backend.submits().len(), 2, "tried again at the poll");
    assert_eq!(
        h.controller.container(A).scheduler_job_id.as_deref(),
        Some("101")
    );
    assert_eq!(h.lists(), 2, "only the resynchronisation listed");
}

#[tokio::test]
async fn poll_locks_released_container_after_its_hold() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.backend.end(A);
    h.poll().await;
    h.poll().await;
    assert_eq!(h.state(A), ContainerState::Queued);

    h.poll().await;
    assert_eq!(h.controller.count("lock"), 1, "held after the unlock");
    h.now += RELOCK_HOLD;
    h.poll().await;
    assert_eq!(h.controller.count("lock"), 2);
    assert_eq!(h.backend.submits().len(), 2);
    assert_eq!(h.lists(), 2, "only the resynchronisation listed");
}

#[tokio::test]
async fn poll_adopts_lock_reported_by_the_feed() {
    let mut h = Harness::new();
    h.resync().await;
    // The lock succeeded, but its response never reached the dispatcher.
    h.controller.add(queued_container(A, 1));
    h.controller.change(A, |c| {
        c.state = ContainerState::Locked;
        c.locked_by_uuid = Some(TOKEN_UUID.into());
    });
    h.apply_changes().await;
    assert!(!h.dispatcher.is_tracked(A), "adopted only with a snapshot");

    h.poll().await;
    assert!(h.dispatcher.is_tracked(A));
    h.poll().await;
    assert_eq!(
        h.state(A),
        ContainerState::Queued,
        "no job and no credentials file: unlocked"
    );
    assert!(h.backend.submits().is_empty());
    assert_eq!(h.lists(), 2, "only the resynchronisation listed");
}

#[tokio::test]
async fn poll_fetches_tracked_container_without_a_record() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.resync().await;
    h.dispatcher.records.remove(A);
    h.poll().await;
    let fetches: Vec<String> = h
        .controller
        .calls()
        .into_iter()
        .filter(|call| call.starts_with("list") && call.contains("\"uuid\",\"in\""))
        .collect();
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    assert!(fetches[0].contains(A), "{fetches:?}");
    assert!(h.dispatcher.is_tracked(A));
    assert!(h.credentials_file(A).exists(), "still held");
    assert!(h.backend.cancels().is_empty());
}

#[tokio::test]
async fn cached_records_are_pruned() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.controller.add(queued_container(B, 0));
    h.resync().await;
    h.apply_changes().await;
    assert!(h.dispatcher.records.contains_key(A), "tracked");
    assert!(!h.dispatcher.records.contains_key(B), "priority 0");

    h.controller.change(B, |c| c.priority = 3);
    h.controller.conflict_on_lock(B);
    h.apply_changes().await;
    assert!(h.dispatcher.records.contains_key(B), "a lock candidate");

    h.controller.change(A, |c| {
        c.state = ContainerState::Complete;
        c.exit_code = Some(0);
    });
    h.backend.end(A);
    h.apply_changes().await;
    h.poll().await;
    h.poll().await;
    assert!(!h.dispatcher.is_tracked(A));
    assert!(!h.dispatcher.records.contains_key(A), "forgotten");
}

/// A dispatch loop running in a task on the harness's controller, batch
/// system and credentials directory.
struct Loop {
    shutdown: CancellationToken,
    task: JoinHandle<Dispatcher<FakeBackend>>,
}

impl Loop {
    fn spawn(h: &Harness, options: LoopOptions) -> Loop {
        let mut dispatcher = dispatcher(&h.controller, &h.backend, h.dir.path());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            dispatcher.run(options, &stop).await;
            dispatcher
        });
        Loop { shutdown, task }
    }

    /// Stops the loop and returns its dispatcher.
    async fn stop(self) -> Dispatcher<FakeBackend> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// Loop options with the default intervals: a poll every 10 s, a
/// resynchronisation every 5 min.
fn options(watch: bool) -> LoopOptions {
    LoopOptions {
        poll_interval: Duration::from_secs(10),
        resync_interval: Duration::from_secs(300),
        watch,
        feed_wait: CHANGE_FEED_WAIT,
    }
}

/// Lets the other tasks run, without moving the paused clock, until `done`
/// holds. The loop never waits on a timer, so the paused clock stays put;
/// a short real sleep now and then lets work on tokio's blocking threads
/// (the credentials files) finish on a busy machine. Gives up after 10 s
/// of real time.
async fn settle(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut turns: u64 = 0;
    while std::time::Instant::now() < deadline {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
        turns += 1;
        if turns.is_multiple_of(100) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    panic!("{what} did not happen within 10 s without a timer firing");
}

/// Lets the other tasks run for a while without moving the paused clock.
async fn idle() {
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
}

/// True once the loop's feed read from `cursor` is in flight.
fn reading(h: &Harness, cursor: u64, times: usize) -> bool {
    h.controller.count(&format!("changes {cursor}")) >= times
}

#[tokio::test(start_paused = true)]
async fn run_submits_queued_container_at_once() {
    let h = Harness::new();
    let start = tokio::time::Instant::now();
    let running = Loop::spawn(&h, options(true));
    settle("the first pass and feed read", || {
        h.backend.status_calls() == 1 && reading(&h, 0, 1)
    })
    .await;

    h.controller.add(queued_container(A, 1));
    settle("the submission", || {
        h.controller.container(A).scheduler_job_id.is_some()
    })
    .await;
    assert_eq!(tokio::time::Instant::now(), start, "no timer fired");
    assert_eq!(h.backend.status_calls(), 1, "no second pass");
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.state(A), ContainerState::Locked);

    // The supervisor starts it; then the user cancels it.
    h.controller
        .change(A, |c| c.state = ContainerState::Running);
    h.controller.change(A, |c| c.priority = 0);
    settle("the cancel", || !h.backend.cancels().is_empty()).await;
    let cancels = h.backend.cancels();
    assert_eq!(cancels[0].id.as_str(), "101");
    assert_eq!(
        cancels[0].state,
        JobState::Running,
        "a TERM for the supervisor, although no snapshot listed the job"
    );
    assert_eq!(tokio::time::Instant::now(), start);
    assert_eq!(h.backend.status_calls(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_reads_the_next_page_at_once() {
    let h = Harness::new();
    h.controller.set_change_page_limit(1);
    let running = Loop::spawn(&h, options(true));
    settle("the first pass and feed read", || reading(&h, 0, 1)).await;
    h.controller.add(queued_container(A, 1));
    h.controller.add(queued_container(B, 1));
    settle("both submissions", || h.backend.submits().len() == 2).await;
    assert_eq!(h.backend.status_calls(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_polls_without_listing_while_following_the_feed() {
    let h = Harness::new();
    let mut options = options(true);
    options.feed_wait = Duration::from_secs(3600);
    let running = Loop::spawn(&h, options);
    settle("the first pass and feed read", || {
        h.backend.status_calls() == 1 && reading(&h, 0, 1)
    })
    .await;
    assert_eq!(h.lists(), 2);

    for polls in 1..30 {
        tokio::time::advance(Duration::from_secs(10)).await;
        settle("the next poll", || h.backend.status_calls() == 1 + polls).await;
    }
    idle().await;
    assert_eq!(h.lists(), 2, "29 polls without a list call");
    assert_eq!(
        h.controller.count("changes"),
        2,
        "a cursor and one read, which the polls left open"
    );

    tokio::time::advance(Duration::from_secs(10)).await;
    settle("the resynchronisation", || h.lists() == 4).await;
    assert_eq!(h.backend.status_calls(), 31, "one snapshot, not two");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_notices_vanished_job_at_the_polls() {
    let h = Harness::new();
    h.controller.add(queued_container(A, 1));
    let running = Loop::spawn(&h, options(true));
    let cursor = || h.controller.change_seq();
    settle("the submission and the feed read", || {
        h.backend.submits().len() == 1 && reading(&h, cursor(), 1)
    })
    .await;
    h.controller
        .change(A, |c| c.state = ContainerState::Running);
    h.backend.set_state(A, JobState::Running);
    let cursor = h.controller.change_seq();
    settle("the feed read past the change", || reading(&h, cursor, 1)).await;

    h.backend.end(A);
    tokio::time::advance(Duration::from_secs(10)).await;
    settle("the first poll", || h.backend.status_calls() == 2).await;
    idle().await;
    assert_eq!(h.state(A), ContainerState::Running);
    tokio::time::advance(Duration::from_secs(10)).await;
    settle("the cancel", || h.state(A) == ContainerState::Cancelled).await;
    assert_eq!(
        h.controller.container(A).runtime_status["error"],
        VANISHED_ERROR
    );
    assert_eq!(h.lists(), 2, "only the first pass listed");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_retries_submission_and_shows_reason_at_polls() {
    let h = Harness::new();
    h.backend.fail_next_submit(SubmitFailure::Transient);
    let running = Loop::spawn(&h, options(true));
    settle("the first pass and feed read", || reading(&h, 0, 1)).await;
    h.controller.add(queued_container(A, 1));
    settle("the failed submission", || h.backend.submits().len() == 1).await;

    tokio::time::advance(Duration::from_secs(10)).await;
    settle("the second attempt", || h.backend.submits().len() == 2).await;
    settle("the job id", || {
        h.controller.container(A).scheduler_job_id.is_some()
    })
    .await;
    let status = h.scheduling_status(A).unwrap_or_default();
    assert!(
        status.starts_with("submission attempt 1 of 10 failed"),
        "no snapshot lists the job yet, so the failure shows: {status}"
    );

    tokio::time::advance(Duration::from_secs(10)).await;
    settle("the pending reason", || {
        h.scheduling_status(A)
            .is_some_and(|status| status.contains("pending"))
    })
    .await;
    assert_eq!(
        h.scheduling_status(A).as_deref(),
        Some("fake job 101 is pending: Priority")
    );
    assert_eq!(h.lists(), 2, "only the first pass listed");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_resynchronises_after_a_failed_read() {
    let h = Harness::new();
    let start = tokio::time::Instant::now();
    let running = Loop::spawn(&h, options(true));
    settle("the first pass and feed read", || reading(&h, 0, 1)).await;

    h.controller.fail_feed_reads(1);
    settle("a pass after the failure", || h.backend.status_calls() == 2).await;
    assert_eq!(h.controller.count("changes (none)"), 2, "a new cursor");
    assert_eq!(h.lists(), 4, "the pass listed the queue");
    settle("the next feed read", || reading(&h, 0, 2)).await;

    h.controller.add(queued_container(A, 1));
    settle("the submission", || h.backend.submits().len() == 1).await;
    assert_eq!(h.backend.status_calls(), 2, "the feed works again");
    assert_eq!(tokio::time::Instant::now(), start, "no timer fired");

    tokio::time::advance(Duration::from_secs(10)).await;
    settle("the next poll", || h.backend.status_calls() == 3).await;
    assert_eq!(h.lists(), 4, "a poll without a list call");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_lists_at_polls_while_feed_fails() {
    let h = Harness::new();
    let running = Loop::spawn(&h, options(true));
    settle("the first pass and feed read", || reading(&h, 0, 1)).await;

    // The read fails, and so does each new cursor: passes come at once,
    // then after 1, 2, 4 and 8 s, then every poll interval, and each lists
    // the queue.
    h.controller.fail_feed_reads(u32::MAX);
    settle("a pass at once", || h.backend.status_calls() == 2).await;
    for (delay, snapshots) in [(1, 3), (2, 4), (4, 5), (8, 6), (10, 7), (10, 8)] {
        tokio::time::advance(Duration::from_secs(delay) - Duration::from_millis(1)).await;
        idle().await;
        assert_eq!(
            h.backend.status_calls(),
            snapshots - 1,
            "before the {delay} s delay"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        settle("the next pass", || h.backend.status_calls() == snapshots).await;
        assert_eq!(h.lists(), 2 * snapshots as usize, "each pass lists");
    }

    // The loop keeps dispatching meanwhile.
    h.controller.add(queued_container(A, 1));
    tokio::time::advance(Duration::from_secs(10)).await;
    settle("a submission by a pass", || h.backend.submits().len() == 1).await;

    let dispatcher = running.stop().await;
    let (_, failures) = &dispatcher.repeats.last["feed"];
    assert_eq!(
        *failures, 9,
        "one read and eight cursors, logged as repeats"
    );
}

#[tokio::test(start_paused = true)]
async fn run_resynchronises_on_a_rejected_cursor() {
    let h = Harness::new();
    let running = Loop::spawn(&h, options(true));
    settle("the first pass and feed read", || reading(&h, 0, 1)).await;
    h.controller.add(queued_container(A, 1));
    settle("the submission", || {
        h.controller.container(A).scheduler_job_id.is_some()
    })
    .await;
    let cursor = h.controller.change_seq();
    settle("the feed read past the dispatcher's writes", || {
        reading(&h, cursor, 1)
    })
    .await;

    // The controller's database is replaced by an older copy: the cursor
    // is ahead of it.
    h.controller.replace_database();
    settle("a pass after the rejection", || {
        h.backend.status_calls() == 2
    })
    .await;
    assert_eq!(h.controller.count("changes (none)"), 2, "a new cursor");

    h.controller.add(queued_container(B, 1));
    settle("the submission", || h.backend.submits().len() == 2).await;
    assert_eq!(h.backend.status_calls(), 2);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_drops_feed_response_made_before_a_resync() {
    let h = Harness::new();
    let mut options = options(true);
    options.poll_interval = Duration::from_secs(30);
    options.resync_interval = Duration::from_secs(30);
    let running = Loop::spawn(&h, options);
    settle("the first pass and feed read", || reading(&h, 0, 1)).await;

    // The feed finds A Queued, but its response arrives only after the
    // next resynchronisation has locked A and submitted its job.
    h.controller.hold_feed_responses();
    h.controller.add(queued_container(A, 1));
    idle().await;
    tokio::time::advance(Duration::from_secs(30)).await;
    settle("the resynchronisation's submission", || {
        h.backend.submits().len() == 1
    })
    .await;
    assert_eq!(h.lists(), 4);
    h.controller.release_feed_responses();
    let cursor = h.controller.change_seq();
    settle("a read past the submission", || reading(&h, cursor, 1)).await;
    idle().await;

    assert!(
        h.credentials_file(A).exists(),
        "the old record must not look like a lost lock"
    );
    assert!(h.backend.cancels().is_empty());
    assert_eq!(h.state(A), ContainerState::Locked);
    let dispatcher = running.stop().await;
    assert!(dispatcher.is_tracked(A));
}

#[tokio::test(start_paused = true)]
async fn run_without_watch_lists_at_each_poll() {
    let h = Harness::new();
    let running = Loop::spawn(&h, options(false));
    settle("the first pass", || h.backend.status_calls() == 1).await;
    h.controller.add(queued_container(A, 1));
    idle().await;
    assert!(h.backend.submits().is_empty());

    tokio::time::advance(Duration::from_secs(10)).await;
    settle("the submission", || h.backend.submits().len() == 1).await;
    assert_eq!(h.backend.status_calls(), 2);
    assert_eq!(h.lists(), 4, "the poll listed the queue");
    assert_eq!(h.controller.count("changes"), 0, "the feed is off");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn run_stops_during_a_feed_read() {
    let h = Harness::new();
    h.controller.add(queued_container(A, 1));
    let start = tokio::time::Instant::now();
    let running = Loop::spawn(&h, options(true));
    let cursor = || h.controller.change_seq();
    settle("the submission and the feed read", || {
        h.backend.submits().len() == 1 && reading(&h, cursor(), 1)
    })
    .await;

    running.shutdown.cancel();
    settle("the end of the loop", || running.task.is_finished()).await;
    assert_eq!(tokio::time::Instant::now(), start, "no wait for the read");
    let dispatcher = running.task.await.unwrap();
    assert!(dispatcher.is_tracked(A));
    assert!(h.backend.cancels().is_empty());
    assert_eq!(h.backend.jobs().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn run_after_restart_adopts_and_follows_changes() {
    let mut h = Harness::new();
    h.start_running(A).await;
    let snapshots = h.backend.status_calls();
    let running = Loop::spawn(&h, options(true));
    settle("the first pass", || {
        h.backend.status_calls() == snapshots + 1 && h.controller.count("changes") >= 2
    })
    .await;

    h.controller.change(A, |c| c.priority = 0);
    settle("the cancel", || !h.backend.cancels().is_empty()).await;
    assert_eq!(h.backend.cancels()[0].state, JobState::Running);
    assert_eq!(h.backend.status_calls(), snapshots + 1);
    let dispatcher = running.stop().await;
    assert!(dispatcher.is_tracked(A));
    assert_eq!(
        h.backend.submits().len(),
        1,
        "adopted, never submitted again"
    );
}

#[tokio::test]
async fn poll_reprioritises_pending_tracked_jobs() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 5));
    h.controller.add(queued_container(B, 9));
    h.backend.add_job("7", "someone-else", JobState::Pending);
    h.resync().await;
    assert_eq!(h.backend.submits().len(), 2);

    h.poll().await;
    // B, with the higher priority, was locked and submitted first.
    let expected = vec![(JobId::new("101"), 9), (JobId::new("102"), 5)];
    assert_eq!(h.backend.reprioritised().last(), Some(&expected));

    // A running job has no place in the order; a new priority shows.
    h.controller
        .change(A, |c| c.state = ContainerState::Running);
    h.backend.set_state(A, JobState::Running);
    h.controller.change(B, |c| c.priority = 3);
    h.resync().await;
    h.poll().await;
    assert_eq!(
        h.backend.reprioritised().last(),
        Some(&vec![(JobId::new("101"), 3)])
    );
}

#[tokio::test]
async fn held_job_left_out_of_the_order() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 5));
    h.controller.add(queued_container(B, 9));
    h.resync().await;
    h.backend.set_reason(A, "JobHeldUser");
    h.poll().await;
    assert_eq!(
        h.backend.reprioritised().last(),
        Some(&vec![(JobId::new("101"), 9)])
    );
}

#[tokio::test]
async fn failed_reprioritise_cancels_nothing() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 5));
    h.resync().await;
    h.backend.fail_reprioritises(2);
    h.poll().await;
    h.poll().await;
    h.poll().await;
    let calls = h.backend.reprioritised();
    let expected = vec![(JobId::new("101"), 5)];
    assert_eq!(
        calls[calls.len() - 3..],
        [expected.clone(), expected.clone(), expected]
    );
    assert!(h.backend.cancels().is_empty());
    assert_eq!(h.state(A), ContainerState::Locked);
    assert_eq!(h.backend.submits().len(), 1);
}
