//! Tests of the dispatch loop's decisions against the in-memory controller
//! and batch system of [`crate::fake`].

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use berth_client::JobCredentials;
use berth_core::ContainerState;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::*;
use crate::backend::JobState;
use crate::fake::{queued_container, FakeBackend, FakeController, SubmitFailure, TOKEN_UUID};
use crate::tracker::{REJECTED_ERROR, SCHEDULING_STATUS_KEY, UNRUNNABLE_ERROR, VANISHED_ERROR};

const A: &str = "zzzzz-dz642-00000000000000a";
const B: &str = "zzzzz-dz642-00000000000000b";
const TICK: Duration = Duration::from_secs(2);

struct Harness {
    controller: FakeController,
    backend: FakeBackend,
    dir: tempfile::TempDir,
    dispatcher: Dispatcher<FakeBackend>,
    now: Instant,
    shutdown: CancellationToken,
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
        }
    }

    /// Replaces the dispatcher with a new one, as after a restart; the
    /// controller, the batch system and the credentials directory stay.
    fn restart(&mut self) {
        self.dispatcher = dispatcher(&self.controller, &self.backend, self.dir.path());
    }

    async fn tick(&mut self) {
        self.now += TICK;
        self.dispatcher
            .tick(self.now, &self.shutdown)
            .await
            .unwrap();
    }

    async fn tick_error(&mut self) -> TickError {
        self.now += TICK;
        self.dispatcher
            .tick(self.now, &self.shutdown)
            .await
            .unwrap_err()
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
        self.tick().await;
        self.controller
            .change(uuid, |c| c.state = ContainerState::Running);
        self.backend.set_state(uuid, JobState::Running);
        self.tick().await;
    }
}

#[tokio::test]
async fn queued_container_is_locked_submitted_and_recorded() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.tick().await;

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
        h.tick().await;
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
    assert_eq!(h.backend.status_calls(), 6, "one status query per tick");
}

#[tokio::test]
async fn higher_priority_is_locked_first() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.controller.add(queued_container(B, 9));
    h.tick().await;
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
    h.tick().await;
    h.tick().await;
    assert!(h.backend.submits().is_empty());
    assert!(!h.dispatcher.is_tracked(A));
    assert_eq!(
        h.controller.count("lock"),
        2,
        "tried again on the next tick"
    );
    assert!(!h.credentials_file(A).exists());
}

#[tokio::test]
async fn priority_zero_cancels_the_job_once() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.controller.change(A, |c| c.priority = 0);
    h.tick().await;
    h.tick().await;
    let cancels = h.backend.cancels();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0].id.as_str(), "101");
    assert_eq!(cancels[0].state, JobState::Running);

    // Sent again only when the job is still listed much later.
    h.now += crate::tracker::CANCEL_RESEND_AFTER;
    h.tick().await;
    assert_eq!(h.backend.cancels().len(), 2);

    // The supervisor stops the container and reports; the job leaves.
    h.controller
        .change(A, |c| c.state = ContainerState::Cancelled);
    h.backend.end(A);
    h.tick().await;
    h.tick().await;
    h.tick().await;
    assert!(!h.dispatcher.is_tracked(A));
    assert!(!h.credentials_file(A).exists());
}

#[tokio::test]
async fn priority_zero_pending_job_unlocks() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.tick().await;
    h.controller.change(A, |c| c.priority = 0);
    h.tick().await;
    assert_eq!(h.backend.cancels()[0].state, JobState::Pending);
    h.backend.end(A);
    h.tick().await;
    assert_eq!(
        h.state(A),
        ContainerState::Locked,
        "one snapshot without the job is not enough"
    );
    h.tick().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert!(!h.credentials_file(A).exists());
    assert!(!h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn vanished_running_container_is_cancelled_with_a_reason() {
    let mut h = Harness::new();
    h.start_running(A).await;
    h.backend.end(A);
    h.tick().await;
    assert_eq!(h.state(A), ContainerState::Running);
    h.tick().await;

    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], VANISHED_ERROR);
    let detail = container.runtime_status["errorDetail"].as_str().unwrap();
    assert!(
        detail.contains("fake job 101 was last seen running"),
        "{detail}"
    );
    assert!(!h.credentials_file(A).exists());
    h.tick().await;
    h.tick().await;
    assert!(!h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn vanished_locked_relocked_after_hold() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.tick().await;
    h.backend.end(A);
    h.tick().await;
    h.tick().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert!(!h.credentials_file(A).exists());

    h.tick().await;
    assert_eq!(h.controller.count("lock"), 1, "held after the unlock");
    h.now += RELOCK_HOLD;
    h.tick().await;
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
        let err = h.tick_error().await;
        assert!(matches!(err, TickError::Status(_)), "{err}");
    }
    assert_eq!(h.state(A), ContainerState::Running);
    h.tick().await;
    assert_eq!(
        h.state(A),
        ContainerState::Running,
        "one good snapshot is not enough"
    );
    h.tick().await;
    assert_eq!(h.state(A), ContainerState::Cancelled);
}

#[tokio::test]
async fn failed_listing_skips_the_tick() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.controller.fail_lists(1);
    let err = h.tick_error().await;
    assert!(err.to_string().contains("failed to list"), "{err}");
    assert_eq!(h.backend.status_calls(), 0);
    assert_eq!(h.controller.count("lock"), 0);
    h.tick().await;
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
        h.tick().await;
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
    h.tick().await;
    let container = h.controller.container(A);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], REJECTED_ERROR);
    let detail = container.runtime_status["errorDetail"].as_str().unwrap();
    assert!(
        detail.contains("Memory specification can not be satisfied"),
        "{detail}"
    );
    assert!(!h.credentials_file(A).exists());
    h.tick().await;
    assert!(!h.dispatcher.is_tracked(A));
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn failed_submissions_are_retried_then_unlocked() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    for _ in 0..crate::tracker::MAX_SUBMIT_ATTEMPTS {
        h.backend.fail_next_submit(SubmitFailure::Transient);
    }
    h.tick().await;
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.state(A), ContainerState::Locked);
    // Retries wait 2 s, 4 s, 8 s and 16 s.
    for _ in 0..20 {
        h.tick().await;
    }
    assert_eq!(
        h.backend.submits().len() as u32,
        crate::tracker::MAX_SUBMIT_ATTEMPTS
    );
    assert_eq!(h.state(A), ContainerState::Queued);
    assert!(!h.credentials_file(A).exists());
    assert!(!h.dispatcher.is_tracked(A));
}

#[tokio::test]
async fn timed_out_submission_job_adopted() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.tick().await;
    // sbatch timed out, but Slurm had queued the job.
    h.backend.add_job("555", A, JobState::Pending);
    for _ in 0..4 {
        h.tick().await;
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
        h.tick().await;
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
    h.tick().await;
    assert_eq!(h.backend.cancels().len(), 1);
}

#[tokio::test]
async fn restart_submits_unsubmitted_lock() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.tick().await;
    assert_eq!(h.backend.submits().len(), 1);
    h.restart();
    h.tick().await;
    assert_eq!(
        h.backend.submits().len(),
        1,
        "waits for a second snapshot without a job"
    );
    h.tick().await;
    assert_eq!(h.backend.submits().len(), 2);
    assert_eq!(
        h.controller.container(A).scheduler_job_id.as_deref(),
        Some("101")
    );
    h.tick().await;
    assert_eq!(h.backend.submits().len(), 2);
}

#[tokio::test]
async fn restart_unlocks_lock_without_credentials() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.backend.fail_next_submit(SubmitFailure::Transient);
    h.tick().await;
    std::fs::remove_file(h.credentials_file(A)).unwrap();
    h.restart();
    h.tick().await;
    h.tick().await;
    assert_eq!(h.state(A), ContainerState::Queued);
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn restart_unlocks_ended_recorded_job() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.tick().await;
    h.backend.end(A);
    h.restart();
    h.tick().await;
    h.tick().await;
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
    h.tick().await;
    assert_eq!(h.state(A), ContainerState::Running);
    h.tick().await;
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
    h.tick().await;
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
    h.tick().await;
    assert_eq!(h.backend.submits().len(), 1);
}

#[tokio::test]
async fn stale_credentials_are_removed_on_start() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.tick().await;
    let stale = h.credentials_file(B);
    std::fs::write(&stale, "{}").unwrap();
    let temporary = h.dir.path().join(format!("{B}.tmp"));
    std::fs::write(&temporary, "{}").unwrap();
    h.restart();
    h.tick().await;
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
    h.tick().await;
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
    h.tick().await;
    assert!(h.backend.submits().is_empty());
    assert!(h.backend.cancels().is_empty());
}

#[tokio::test]
async fn run_ends_on_shutdown_and_leaves_jobs_running() {
    let h = Harness::new();
    h.controller.add(queued_container(A, 1));
    let mut dispatcher = dispatcher(&h.controller, &h.backend, h.dir.path());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let backend = h.backend.clone();
    let run = tokio::spawn(async move {
        dispatcher.run(Duration::from_millis(10), &shutdown).await;
    });
    // The first tick runs at once; wait for its submission.
    for _ in 0..500 {
        if !backend.submits().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    run.await.unwrap();
    assert_eq!(h.backend.submits().len(), 1);
    assert!(h.backend.cancels().is_empty());
    assert_eq!(h.backend.jobs().len(), 1);
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
    h.tick().await;
    let submits = h.backend.submits();
    assert_eq!(submits.len(), 1);
    assert_eq!(submits[0].max_run_time, 1);
}

#[tokio::test]
async fn pending_reason_recorded_once_per_change() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.tick().await;
    assert_eq!(h.scheduling_status(A), None, "not listed yet");
    for _ in 0..3 {
        h.tick().await;
    }
    assert_eq!(
        h.scheduling_status(A).as_deref(),
        Some("fake job 101 is pending: Priority")
    );
    assert_eq!(h.status_updates(A), 1);

    h.backend.set_reason(A, "PartitionConfig");
    for _ in 0..3 {
        h.tick().await;
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
        h.tick().await;
    }
    assert_eq!(h.scheduling_status(A), None);
    assert_eq!(h.status_updates(A), 3);
    assert_eq!(h.state(A), ContainerState::Locked);
}

#[tokio::test]
async fn restart_keeps_the_recorded_reason_without_updates() {
    let mut h = Harness::new();
    h.controller.add(queued_container(A, 1));
    h.tick().await;
    h.tick().await;
    assert_eq!(h.status_updates(A), 1);
    h.restart();
    for _ in 0..3 {
        h.tick().await;
    }
    assert_eq!(h.status_updates(A), 1, "{:?}", h.controller.calls());
}

#[tokio::test]
async fn listed_pending_reason_cancels_job_and_container() {
    let mut backend = FakeBackend::default();
    backend.set_cancel_reasons(&["PartitionConfig"]);
    let mut h = Harness::with_backend(backend);
    h.controller.add(queued_container(A, 1));
    h.tick().await;
    h.backend.set_reason(A, "PartitionConfig");
    h.tick().await;
    assert_eq!(
        h.state(A),
        ContainerState::Locked,
        "one snapshot is not enough"
    );
    assert!(h.backend.cancels().is_empty());
    h.tick().await;

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
        h.tick().await;
    }
    assert!(!h.dispatcher.is_tracked(A));
    assert_eq!(h.backend.submits().len(), 1);
    assert_eq!(h.controller.count("lock"), 1);
}
