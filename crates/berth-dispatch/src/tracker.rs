//! The dispatch loop's view of one container, and its decisions, free of
//! I/O.
//!
//! A [`Tracked`] container is one this dispatcher has locked, or found
//! locked by its token after a restart. The loop hands it an
//! [`Observation`] in each pass (poll or resynchronisation) and each time
//! the change feed reports the container. An observation is the container's latest record and the
//! jobs named after it in the batch system's latest snapshot, and the
//! tracked container returns the [`Action`]s to carry out.
//! Results of those actions come back through [`Tracked::submitted`] and
//! [`Tracked::submit_failed`].
//!
//! Words used here:
//!
//! - *snapshot*: the job list of one successful status query, numbered by a
//!   *generation* that grows by one per snapshot.
//! - *new* or *reused* snapshot: an observation made right after its
//!   snapshot was taken is the snapshot's one observation that counts
//!   ([`Observation::new_snapshot`]). Observations made later with the same
//!   snapshot, on a change reported by the feed, reuse it: they act on the
//!   new record, but never count towards a rule that needs several
//!   snapshots in a row (vanished, unrunnable).
//! - *vanished*: the container's job is missing from [`VANISH_SNAPSHOTS`]
//!   consecutive snapshots taken after its submission. Only then does the
//!   loop act on its absence, so one odd snapshot never ends a container.
//! - *adopted*: tracked because the controller lists the container as
//!   Locked or Running by this dispatcher's token, although this process did
//!   not lock it (after a restart, or when a lock's response was lost).
//! - *stray*: a job named after the container that is not its job, such as
//!   a second submission; it is cancelled.
//! - *scheduling status*: why the container's job is pending, in the batch
//!   system's words, kept in the container's
//!   `runtime_status.`[`SCHEDULING_STATUS_KEY`] while the job waits so that
//!   users see why their container does not start. It is written when the
//!   job or its reason changes, and removed once the job has left the
//!   pending state.
//! - *unrunnable*: pending with a reason the backend lists as permanent
//!   ([`crate::Backend::cancel_pending_reasons`]) in
//!   [`UNRUNNABLE_SNAPSHOTS`] consecutive snapshots. The job is cancelled
//!   and its container set Cancelled.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth_core::{Container, ContainerState};

use crate::backend::{BatchJob, JobId, JobState, Submission};
use crate::config::SubmitRetryConfig;

/// Consecutive snapshots without a job before the loop acts on its absence.
pub const VANISH_SNAPSHOTS: u32 = 2;

/// Time after which a cancel is sent again to a job still listed in the
/// same state.
pub const CANCEL_RESEND_AFTER: Duration = Duration::from_secs(30);

/// Time a job may stay listed after its container became final before it
/// is cancelled: the supervisor reports the final state, then exits.
pub const FINAL_JOB_GRACE: Duration = Duration::from_secs(30);

/// Minimum age of an adopted container's credentials file before the
/// container is submitted again without a job in sight. It is the default
/// `command_timeout` of `sbatch` and `bsub`, because no submit call of a
/// killed dispatcher is expected to create a job after that.
pub const ORPHAN_SUBMIT_GRACE: Duration = Duration::from_secs(60);

/// Message of `runtime_status.error` when a Running container's job left
/// the batch system.
///
/// NOTE: when the supervisor was killed outright (SIGKILL), its runtime
/// container and mount directory stay on the node: Podman's containers
/// live outside the job, and nothing on the node removes them yet.
pub const VANISHED_ERROR: &str =
    "the batch job ended without the supervisor reporting a final state";

/// Message of `runtime_status.error` when the batch system rejected the
/// container's job.
pub const REJECTED_ERROR: &str = "the batch system rejected the container's job";

/// Message of `runtime_status.error` when the container's job was pending
/// for a reason that means it will never start.
pub const UNRUNNABLE_ERROR: &str = "the batch system will never start the container's job";

pub use berth_core::records::SCHEDULING_STATUS_KEY;

/// Consecutive snapshots that must list a job pending for a reason in the
/// backend's cancel list before the job and its container are cancelled.
pub const UNRUNNABLE_SNAPSHOTS: u64 = 2;

/// The reason a container is tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// This process locked the container.
    Locked,
    /// The controller listed it as locked by this dispatcher's token.
    Adopted,
}

/// A step the loop carries out for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Submit the container's job.
    Submit,
    /// Record the job id as the container's `scheduler_job_id`.
    RecordJobId(JobId),
    /// Cancel this job (the loop skips a cancel sent recently).
    Cancel(BatchJob),
    /// Unlock the container, remove its credentials and stop tracking it.
    Unlock { reason: String },
    /// Set the container Cancelled with `runtime_status.error`.
    CancelContainer { error: String, detail: String },
    /// Record in the container's runtime_status that a submission failed
    /// and when the next attempt is due.
    ShowRetry(RetryNotice),
    /// Record in the container's runtime_status why this job is pending
    /// ([`SCHEDULING_STATUS_KEY`]), then report back with
    /// [`Tracked::pending_shown`].
    ShowPending(BatchJob),
    /// Remove [`SCHEDULING_STATUS_KEY`] from the container's runtime_status:
    /// its job is no longer pending.
    ClearSchedulingStatus,
    /// Set the container Cancelled with [`UNRUNNABLE_ERROR`], because this
    /// job is pending for a reason that means it will never start.
    CancelUnrunnable(BatchJob),
    /// The job vanished: fetch the container again and decide with
    /// [`resolve_vanished`].
    Resolve,
    /// Remove the container's credentials file.
    RemoveCredentials,
    /// Stop tracking the container.
    Forget,
}

/// A failed submission that will be tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryNotice {
    /// Number of the failed attempt, from 1.
    pub attempt: u32,
    /// Failed attempts after which the container is unlocked.
    pub max_attempts: u32,
    /// Time until the next attempt, jitter included.
    pub delay: Duration,
    /// The failure's message.
    pub error: String,
}

impl RetryNotice {
    /// Describes the failure for the container's scheduling status, with
    /// the time of the next attempt (`retry_at`, already formatted).
    pub fn status_text(&self, retry_at: &str) -> String {
        format!(
            "submission attempt {} of {} failed; the next attempt is at {retry_at}: {}",
            self.attempt, self.max_attempts, self.error
        )
    }
}

/// Returns the delay before the attempt after `failures` failed ones:
/// `first_delay` doubled for each failure after the first, at most
/// `max_delay`, before jitter.
pub fn retry_delay(retry: &SubmitRetryConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    retry
        .first_delay
        .saturating_mul(1u32 << doublings)
        .min(retry.max_delay)
}

/// One view of a container: its record and the latest snapshot's jobs.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The container's latest record; `None` if the controller no longer
    /// returns it.
    pub record: Option<&'a Container>,
    /// The snapshot's jobs named after the container.
    pub jobs: &'a [BatchJob],
    /// The snapshot's generation.
    pub generation: u64,
    /// True for the one observation made right after the snapshot was
    /// taken; false when a change reported by the feed reuses it. Only a
    /// new snapshot counts towards the vanished and unrunnable rules.
    pub new_snapshot: bool,
    pub now: Instant,
    /// This dispatcher's token UUID.
    pub token_uuid: &'a str,
    /// How long ago the container's credentials file was written; `None`
    /// when it does not exist.
    pub credentials_age: Option<Duration>,
    /// Pending reasons that mean a job will never start.
    pub cancel_reasons: &'a [String],
}

/// One container this dispatcher is responsible for.
#[derive(Debug)]
pub struct Tracked {
    origin: Origin,
    /// The job's id, once submitted or found.
    job: Option<JobId>,
    /// The job as the latest snapshot that listed it saw it.
    last_seen: Option<BatchJob>,
    job_id_recorded: bool,
    /// Absence counts only in snapshots of a later generation.
    watch_from: u64,
    missing: u32,
    submit_attempts: u32,
    next_submit_at: Option<Instant>,
    /// Whether the scheduling status shows a failed submission.
    retry_shown: bool,
    /// The batch system's reason for rejecting the job, once it has.
    rejected: Option<String>,
    /// The job and reason that the container's scheduling status shows.
    shown: Option<(JobId, String)>,
    /// Generation of the first snapshot, of those in a row, that listed the
    /// job pending for a reason in the cancel list.
    unrunnable_since: Option<u64>,
    /// The pending job that made the dispatcher give up on the container.
    unrunnable: Option<BatchJob>,
    final_since: Option<Instant>,
    credentials_removed: bool,
    /// The submitted command and script, and the batch system's output.
    submission: Option<Submission>,
}

impl Tracked {
    /// Starts tracking a container this process has just locked.
    pub fn locked(generation: u64) -> Tracked {
        Tracked::new(Origin::Locked, generation)
    }

    /// Starts tracking a container found locked by this dispatcher's token.
    /// The snapshot of `generation` already counts towards its job's absence.
    pub fn adopted(generation: u64) -> Tracked {
        Tracked::new(Origin::Adopted, generation.saturating_sub(1))
    }

    fn new(origin: Origin, watch_from: u64) -> Tracked {
        Tracked {
            origin,
            job: None,
            last_seen: None,
            job_id_recorded: false,
            watch_from,
            missing: 0,
            submit_attempts: 0,
            next_submit_at: None,
            retry_shown: false,
            rejected: None,
            shown: None,
            unrunnable_since: None,
            unrunnable: None,
            final_since: None,
            credentials_removed: false,
            submission: None,
        }
    }

    pub fn job(&self) -> Option<&JobId> {
        self.job.as_ref()
    }

    pub fn last_seen(&self) -> Option<&BatchJob> {
        self.last_seen.as_ref()
    }

    pub fn submission(&self) -> Option<&Submission> {
        self.submission.as_ref()
    }

    pub fn is_adopted(&self) -> bool {
        self.origin == Origin::Adopted
    }

    /// Returns the time of the next submission attempt while the container
    /// waits out its backoff after a failed one.
    pub fn retry_at(&self) -> Option<Instant> {
        self.next_submit_at.filter(|_| self.job.is_none())
    }

    /// Notes that the scheduling status shows a failed submission.
    pub fn retry_shown(&mut self) {
        self.retry_shown = true;
    }

    /// Notes that the job id is on the container record.
    pub fn job_id_recorded(&mut self) {
        self.job_id_recorded = true;
    }

    /// Notes that the container's scheduling status shows why `job` is
    /// pending, or, with `None`, that it shows nothing.
    pub fn pending_shown(&mut self, job: Option<&BatchJob>) {
        self.shown = job.map(|job| (job.id.clone(), job.reason.clone()));
        self.retry_shown = false;
    }

    /// Notes a successful submission, made after the snapshot of
    /// `generation`.
    pub fn submitted(&mut self, submission: Submission, generation: u64) {
        self.origin = Origin::Locked;
        self.job = Some(submission.job_id.clone());
        self.submission = Some(submission);
        self.last_seen = None;
        self.job_id_recorded = false;
        self.watch_from = generation;
        self.missing = 0;
        self.next_submit_at = None;
        self.unrunnable_since = None;
    }

    /// Notes a failed submission and returns what to do about it: cancel
    /// the container when the batch system rejected the job, unlock it when
    /// `retry.max_attempts` attempts have failed, else show the failure
    /// and wait out a delay that doubles with each failure
    /// ([`retry_delay`]), less up to a fifth at random.
    pub fn submit_failed(
        &mut self,
        permanent: bool,
        message: &str,
        now: Instant,
        retry: &SubmitRetryConfig,
    ) -> Vec<Action> {
        if permanent {
            self.rejected = Some(message.to_string());
            return vec![self.reject_action()];
        }
        self.submit_attempts += 1;
        if self.submit_attempts >= retry.max_attempts {
            return vec![Action::Unlock {
                reason: format!("{} submission attempts failed", self.submit_attempts),
            }];
        }
        let delay = crate::limiter::jitter(retry_delay(retry, self.submit_attempts));
        self.next_submit_at = Some(now + delay);
        vec![Action::ShowRetry(RetryNotice {
            attempt: self.submit_attempts,
            max_attempts: retry.max_attempts,
            delay,
            error: message.to_string(),
        })]
    }

    fn reject_action(&self) -> Action {
        Action::CancelContainer {
            error: REJECTED_ERROR.to_string(),
            detail: self.rejected.clone().unwrap_or_default(),
        }
    }

    /// Decides what to do after one observation.
    pub fn observe(&mut self, observation: Observation<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        let (own, strays) = self.match_jobs(observation.jobs, observation.record);
        actions.extend(strays.into_iter().cloned().map(Action::Cancel));

        match own {
            Some(job) => {
                if self.job.as_ref() != Some(&job.id) {
                    self.job = Some(job.id.clone());
                    self.job_id_recorded = false;
                }
                self.last_seen = Some(job.clone());
                self.missing = 0;
            }
            None if observation.new_snapshot && observation.generation > self.watch_from => {
                self.missing += 1
            }
            None => {}
        }
        let vanished = own.is_none() && self.missing >= VANISH_SNAPSHOTS;

        let record = observation
            .record
            .filter(|c| c.state.is_locked())
            .filter(|c| c.locked_by_uuid.as_deref() == Some(observation.token_uuid));
        let Some(container) = record else {
            self.observe_released(observation, own, vanished, &mut actions);
            return actions;
        };

        if self.rejected.is_some() {
            actions.push(self.reject_action());
            return actions;
        }
        if let Some(pending) = &self.unrunnable {
            // Repeated until the container is Cancelled.
            actions.extend(own.cloned().map(Action::Cancel));
            actions.push(Action::CancelUnrunnable(pending.clone()));
            return actions;
        }
        if let Some(job) = own {
            if container.scheduler_job_id.as_deref() == Some(job.id.as_str()) {
                self.job_id_recorded = true;
            } else if !self.job_id_recorded {
                actions.push(Action::RecordJobId(job.id.clone()));
            }
        }

        if container.priority <= 0 {
            let unlisted = self.unlisted_job(container, observation.generation);
            match own {
                Some(job) => actions.push(Action::Cancel(job_as_recorded(job, container))),
                None if vanished => actions.push(Action::Resolve),
                // Submitted after the latest snapshot: cancelled by its id,
                // without waiting for a snapshot that lists it.
                None if unlisted.is_some() => actions.extend(unlisted.map(Action::Cancel)),
                // Nothing was submitted (or a submission is being retried):
                // no job can be running, so the lock is simply released.
                None if self.job.is_none()
                    && self.origin == Origin::Locked
                    && container.state == ContainerState::Locked =>
                {
                    actions.push(Action::Unlock {
                        reason: "its priority is 0 and no job was submitted".to_string(),
                    })
                }
                None => {}
            }
            return actions;
        }

        if let Some(job) = own {
            self.observe_scheduling(container, job, observation, &mut actions);
            return actions;
        }
        if self.job.is_none()
            && self.origin == Origin::Locked
            && container.state == ContainerState::Locked
        {
            let due = self.next_submit_at.is_none_or(|at| observation.now >= at);
            if due {
                actions.push(Action::Submit);
            }
            return actions;
        }
        if !vanished {
            return actions;
        }
        if self.job.is_none() && container.state == ContainerState::Locked {
            // Adopted, and no job was found in two snapshots.
            if container.scheduler_job_id.is_some() {
                // A job was submitted and recorded; it has ended without
                // starting the container.
                actions.push(Action::Resolve);
            } else if let Some(age) = observation.credentials_age {
                // The previous dispatcher stopped between lock and submit.
                // It writes the credentials file just before its submit
                // call, and a dispatcher killed during that call leaves the
                // call running: its job may still appear. So the container
                // is retried like a fresh lock only once the file is older
                // than any submit call lasts.
                if age >= ORPHAN_SUBMIT_GRACE {
                    self.origin = Origin::Locked;
                    actions.push(Action::Submit);
                }
            } else {
                actions.push(Action::Unlock {
                    reason: "no job was found and its credentials file is gone".to_string(),
                });
            }
        } else {
            actions.push(Action::Resolve);
        }
        actions
    }

    /// Decides what the container's scheduling status shows about its
    /// listed job, and whether the job will never start.
    fn observe_scheduling(
        &mut self,
        container: &Container,
        job: &BatchJob,
        observation: Observation<'_>,
        actions: &mut Vec<Action>,
    ) {
        let waiting = job.state == JobState::Pending && container.state == ContainerState::Locked;
        if self.retry_shown && (!waiting || job.reason.is_empty()) {
            // The job exists, so the failed submission the status shows is
            // history. A pending reason would replace it anyway.
            self.retry_shown = false;
            if container.runtime_status.contains_key(SCHEDULING_STATUS_KEY) {
                actions.push(Action::ClearSchedulingStatus);
            }
        } else if !waiting {
            if job.state != JobState::Pending
                && container.runtime_status.contains_key(SCHEDULING_STATUS_KEY)
            {
                actions.push(Action::ClearSchedulingStatus);
            }
        } else if !job.reason.is_empty()
            && self.shown.as_ref() != Some(&(job.id.clone(), job.reason.clone()))
        {
            // Slurm lists no reason until its scheduler has looked at the
            // job; the status keeps the last reason until a new one comes.
            actions.push(Action::ShowPending(job.clone()));
        }
        if observation.new_snapshot {
            self.count_unrunnable(waiting, job, observation, actions);
        }
    }

    /// Counts the snapshots in a row that list the job pending for a reason
    /// in the cancel list, and gives up on the container at
    /// [`UNRUNNABLE_SNAPSHOTS`].
    fn count_unrunnable(
        &mut self,
        waiting: bool,
        job: &BatchJob,
        observation: Observation<'_>,
        actions: &mut Vec<Action>,
    ) {
        let listed =
            waiting && !job.reason.is_empty() && observation.cancel_reasons.contains(&job.reason);
        if !listed {
            self.unrunnable_since = None;
            return;
        }
        let since = *self.unrunnable_since.get_or_insert(observation.generation);
        if observation.generation.saturating_sub(since) + 1 >= UNRUNNABLE_SNAPSHOTS {
            self.unrunnable = Some(job.clone());
            actions.push(Action::Cancel(job.clone()));
            actions.push(Action::CancelUnrunnable(job.clone()));
        }
    }

    /// Decides for a container that is no longer Locked or Running by this
    /// dispatcher: final, unlocked, locked by another, or gone.
    fn observe_released(
        &mut self,
        observation: Observation<'_>,
        own: Option<&BatchJob>,
        vanished: bool,
        actions: &mut Vec<Action>,
    ) {
        let is_final = observation.record.is_some_and(|c| c.state.is_final());
        if is_final && self.final_since.is_none() {
            self.final_since = Some(observation.now);
        }
        if !self.credentials_removed {
            self.credentials_removed = true;
            actions.push(Action::RemoveCredentials);
        }
        match own {
            Some(job) => {
                // A pending job has no supervisor that may still be
                // reporting, so it gets no grace.
                let in_grace = job.state != JobState::Pending
                    && self.final_since.is_some_and(|since| {
                        is_final && observation.now.duration_since(since) < FINAL_JOB_GRACE
                    });
                if !in_grace {
                    actions.push(Action::Cancel(job.clone()));
                }
            }
            None if self.job.is_none() || vanished => actions.push(Action::Forget),
            None => {}
        }
    }

    /// Returns the job this dispatcher submitted after the snapshot of
    /// `generation` was taken, so that no snapshot has listed it yet, with
    /// the state its container's record implies.
    fn unlisted_job(&self, container: &Container, generation: u64) -> Option<BatchJob> {
        let id = self.job.as_ref()?;
        if self.last_seen.is_some() || generation > self.watch_from {
            return None;
        }
        let job = BatchJob {
            id: id.clone(),
            name: container.uuid.clone(),
            state: JobState::Pending,
            reason: String::new(),
        };
        Some(job_as_recorded(&job, container))
    }

    /// Splits the jobs named after the container into its own job and
    /// strays.
    fn match_jobs<'j>(
        &self,
        jobs: &'j [BatchJob],
        record: Option<&Container>,
    ) -> (Option<&'j BatchJob>, Vec<&'j BatchJob>) {
        let own = match &self.job {
            Some(id) => jobs.iter().find(|job| &job.id == id),
            None => {
                let recorded = record.and_then(|c| c.scheduler_job_id.as_deref());
                jobs.iter()
                    .find(|job| Some(job.id.as_str()) == recorded)
                    .or_else(|| jobs.iter().min_by_key(|job| job_order(&job.id)))
            }
        };
        let strays = jobs
            .iter()
            .filter(|job| own.is_none_or(|own| own.id != job.id))
            .collect();
        (own, strays)
    }
}

/// Returns the job with the state its container's record implies when the
/// snapshot is older: the job of a Running container has started, even if
/// the snapshot still lists it pending. A cancel then stops the supervisor
/// politely instead of aiming at a pending job.
fn job_as_recorded(job: &BatchJob, container: &Container) -> BatchJob {
    let mut job = job.clone();
    let not_started = matches!(job.state, JobState::Pending | JobState::Configuring);
    if container.state == ContainerState::Running && not_started {
        job.state = JobState::Running;
    }
    job
}

/// Orders job ids by submission: numeric ids by value, others after them.
fn job_order(id: &JobId) -> (usize, &str) {
    (id.as_str().len(), id.as_str())
}

/// Decides what to do once a job has vanished, from the container's record
/// fetched afterwards (`None` when the controller no longer returns it).
/// `job` is the job's id, and `last_seen` the job as the last snapshot that
/// listed it saw it, when known.
pub fn resolve_vanished(
    record: Option<&Container>,
    token_uuid: &str,
    backend: &str,
    job: Option<&JobId>,
    last_seen: Option<&BatchJob>,
) -> Vec<Action> {
    let ours = record
        .filter(|c| c.locked_by_uuid.as_deref() == Some(token_uuid))
        .map(|c| c.state);
    match ours {
        Some(ContainerState::Running) => {
            // The loop replaces this detail with the batch system's own
            // account of the job's end when it has one.
            let detail = match (last_seen, job) {
                (Some(seen), _) => {
                    let reason = if seen.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", seen.reason)
                    };
                    format!(
                        "{backend} job {} was last seen {}{reason} and has left the queue",
                        seen.id, seen.state
                    )
                }
                (None, Some(id)) => {
                    format!("{backend} job {id} left the queue before a status query listed it")
                }
                (None, None) => format!("no {backend} job named after the container was found"),
            };
            vec![Action::CancelContainer {
                error: VANISHED_ERROR.to_string(),
                detail,
            }]
        }
        Some(ContainerState::Locked) => vec![Action::Unlock {
            reason: "its job ended before the container started".to_string(),
        }],
        _ => vec![Action::RemoveCredentials, Action::Forget],
    }
}

/// The cancels sent to jobs still listed, so that a cancel is not repeated
/// every poll.
#[derive(Debug, Default)]
pub struct CancelLedger {
    sent: HashMap<JobId, (Instant, JobState)>,
}

impl CancelLedger {
    /// True unless the same cancel went to this job, in this state, less
    /// than [`CANCEL_RESEND_AFTER`] ago. A job that changed state (pending,
    /// then running) needs the other kind of cancel at once.
    pub fn should_send(&self, job: &BatchJob, now: Instant) -> bool {
        match self.sent.get(&job.id) {
            None => true,
            Some((at, state)) => {
                *state != job.state || now.duration_since(*at) >= CANCEL_RESEND_AFTER
            }
        }
    }

    pub fn record(&mut self, job: &BatchJob, now: Instant) {
        self.sent.insert(job.id.clone(), (now, job.state.clone()));
    }

    /// Forgets jobs that the latest snapshot no longer lists.
    pub fn retain_listed(&mut self, jobs: &[BatchJob]) {
        self.sent
            .retain(|id, _| jobs.iter().any(|job| &job.id == id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "zzzzz-gj3su-000000000000000";
    const UUID: &str = "zzzzz-dz642-000000000000001";

    fn container(state: ContainerState, priority: i64, locked_by: Option<&str>) -> Container {
        let mut container: Container = serde_json::from_value(serde_json::json!({
            "uuid": UUID,
            "owner_uuid": "zzzzz-tpzed-000000000000001",
            "created_at": "2024-01-01T00:00:00Z",
            "modified_at": "2024-01-01T00:00:00Z",
            "modified_by_user_uuid": null,
            "state": "Queued",
            "log": null, "cwd": "/", "output_path": "/out", "output": null,
            "container_image": "busybox", "progress": null, "exit_code": null,
            "auth_uuid": null, "locked_by_uuid": null, "runtime_user_uuid": null,
            "gateway_address": null,
            "runtime_constraints": {"ram": 1048576, "vcpus": 1},
        }))
        .unwrap();
        container.state = state;
        container.priority = priority;
        container.locked_by_uuid = locked_by.map(str::to_string);
        container
    }

    fn ours(state: ContainerState, priority: i64) -> Container {
        container(state, priority, Some(TOKEN))
    }

    fn job(id: &str, state: JobState) -> BatchJob {
        BatchJob {
            id: JobId::new(id),
            name: UUID.into(),
            state,
            reason: String::new(),
        }
    }

    fn submission(id: &str) -> Submission {
        Submission {
            job_id: JobId::new(id),
            command: "sbatch".into(),
            script: None,
            stdout: format!("{id}\n"),
            stderr: String::new(),
        }
    }

    struct Step<'a> {
        record: Option<&'a Container>,
        jobs: &'a [BatchJob],
        generation: u64,
        new_snapshot: bool,
        now: Instant,
        credentials_age: Option<Duration>,
        cancel_reasons: &'a [String],
    }

    impl<'a> Step<'a> {
        fn new(record: Option<&'a Container>, jobs: &'a [BatchJob], generation: u64) -> Step<'a> {
            Step {
                record,
                jobs,
                generation,
                new_snapshot: true,
                now: Instant::now(),
                credentials_age: Some(ORPHAN_SUBMIT_GRACE),
                cancel_reasons: &[],
            }
        }

        /// Makes a step that reuses the snapshot of `generation`, as on a
        /// change reported by the feed.
        fn reused(
            record: Option<&'a Container>,
            jobs: &'a [BatchJob],
            generation: u64,
        ) -> Step<'a> {
            Step {
                new_snapshot: false,
                ..Step::new(record, jobs, generation)
            }
        }

        fn run(&self, tracked: &mut Tracked) -> Vec<Action> {
            tracked.observe(Observation {
                record: self.record,
                jobs: self.jobs,
                generation: self.generation,
                new_snapshot: self.new_snapshot,
                now: self.now,
                token_uuid: TOKEN,
                credentials_age: self.credentials_age,
                cancel_reasons: self.cancel_reasons,
            })
        }
    }

    #[test]
    fn fresh_lock_is_submitted() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        assert_eq!(
            Step::new(Some(&record), &[], 1).run(&mut tracked),
            [Action::Submit]
        );
    }

    #[test]
    fn listed_job_gets_its_id_recorded_once() {
        let mut record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        let jobs = [job("42", JobState::Pending)];
        assert_eq!(
            Step::new(Some(&record), &jobs, 2).run(&mut tracked),
            [Action::RecordJobId(JobId::new("42"))]
        );
        tracked.job_id_recorded();
        assert_eq!(Step::new(Some(&record), &jobs, 3).run(&mut tracked), []);
        // A record that already carries the id needs no call.
        let mut fresh = Tracked::locked(1);
        fresh.submitted(submission("42"), 1);
        record.scheduler_job_id = Some("42".into());
        assert_eq!(Step::new(Some(&record), &jobs, 2).run(&mut fresh), []);
    }

    #[test]
    fn job_missing_once_is_not_acted_on() {
        let record = ours(ContainerState::Running, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        assert_eq!(Step::new(Some(&record), &[], 2).run(&mut tracked), []);
        assert_eq!(
            Step::new(Some(&record), &[], 3).run(&mut tracked),
            [Action::Resolve]
        );
    }

    #[test]
    fn absence_counts_after_submission_consecutively() {
        let record = ours(ContainerState::Running, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 4);
        tracked.job_id_recorded();
        // A snapshot taken before the submission does not count.
        assert_eq!(Step::new(Some(&record), &[], 4).run(&mut tracked), []);
        assert_eq!(Step::new(Some(&record), &[], 5).run(&mut tracked), []);
        let jobs = [job("42", JobState::Running)];
        assert_eq!(Step::new(Some(&record), &jobs, 6).run(&mut tracked), []);
        assert_eq!(Step::new(Some(&record), &[], 7).run(&mut tracked), []);
        assert_eq!(
            Step::new(Some(&record), &[], 8).run(&mut tracked),
            [Action::Resolve]
        );
    }

    #[test]
    fn priority_zero_cancels_the_listed_job() {
        let record = ours(ContainerState::Running, 0);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let jobs = [job("42", JobState::Running)];
        assert_eq!(
            Step::new(Some(&record), &jobs, 2).run(&mut tracked),
            [Action::Cancel(jobs[0].clone())]
        );
    }

    #[test]
    fn reused_snapshot_never_counts_towards_vanishing() {
        let record = ours(ContainerState::Running, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        assert_eq!(Step::new(Some(&record), &[], 2).run(&mut tracked), []);
        for _ in 0..5 {
            assert_eq!(
                Step::reused(Some(&record), &[], 2).run(&mut tracked),
                [],
                "a change reported by the feed is no second snapshot"
            );
        }
        assert_eq!(
            Step::new(Some(&record), &[], 3).run(&mut tracked),
            [Action::Resolve]
        );
    }

    #[test]
    fn reused_snapshot_of_submission_counts_nothing() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(4);
        tracked.submitted(submission("42"), 4);
        tracked.job_id_recorded();
        for _ in 0..3 {
            assert_eq!(Step::reused(Some(&record), &[], 4).run(&mut tracked), []);
        }
        assert_eq!(Step::new(Some(&record), &[], 5).run(&mut tracked), []);
        assert_eq!(
            Step::new(Some(&record), &[], 6).run(&mut tracked),
            [Action::Resolve]
        );
    }

    #[test]
    fn priority_zero_cancels_job_submitted_after_snapshot() {
        let mut record = ours(ContainerState::Locked, 0);
        let mut tracked = Tracked::locked(3);
        tracked.submitted(submission("42"), 3);
        tracked.job_id_recorded();
        let expected = BatchJob {
            id: JobId::new("42"),
            name: UUID.into(),
            state: JobState::Pending,
            reason: String::new(),
        };
        assert_eq!(
            Step::reused(Some(&record), &[], 3).run(&mut tracked),
            [Action::Cancel(expected.clone())]
        );
        record.state = ContainerState::Running;
        assert_eq!(
            Step::reused(Some(&record), &[], 3).run(&mut tracked),
            [Action::Cancel(BatchJob {
                state: JobState::Running,
                ..expected
            })],
            "the supervisor has started: the job runs"
        );
        // Once a later snapshot has missed it, only the vanished rule acts.
        assert_eq!(Step::new(Some(&record), &[], 4).run(&mut tracked), []);
    }

    #[test]
    fn priority_zero_cancel_follows_the_running_record() {
        let record = ours(ContainerState::Running, 0);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let jobs = [job("42", JobState::Pending)];
        assert_eq!(
            Step::reused(Some(&record), &jobs, 2).run(&mut tracked),
            [Action::Cancel(job("42", JobState::Running))]
        );
    }

    #[test]
    fn priority_zero_before_submission_unlocks() {
        let record = ours(ContainerState::Locked, 0);
        let mut tracked = Tracked::locked(1);
        assert_eq!(
            Step::new(Some(&record), &[], 1).run(&mut tracked),
            [Action::Unlock {
                reason: "its priority is 0 and no job was submitted".into()
            }]
        );
    }

    fn retry() -> SubmitRetryConfig {
        SubmitRetryConfig {
            first_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(20),
            max_attempts: 6,
        }
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let delays: Vec<u64> = (1..=6)
            .map(|failures| retry_delay(&retry(), failures).as_secs())
            .collect();
        assert_eq!(delays, [2, 4, 8, 16, 20, 20]);
        assert_eq!(
            retry_delay(&retry(), u32::MAX),
            Duration::from_secs(20),
            "no overflow"
        );
    }

    #[test]
    fn failed_submissions_back_off_then_unlock() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        let start = Instant::now();
        let actions = tracked.submit_failed(false, "timed out", start, &retry());
        let [Action::ShowRetry(notice)] = actions.as_slice() else {
            panic!("expected a retry notice: {actions:?}");
        };
        assert_eq!(notice.attempt, 1);
        assert_eq!(notice.max_attempts, 6);
        assert_eq!(notice.error, "timed out");
        assert!(notice.delay <= Duration::from_secs(2), "{:?}", notice.delay);
        assert!(
            notice.delay >= Duration::from_millis(1600),
            "{:?}",
            notice.delay
        );
        assert_eq!(tracked.retry_at(), Some(start + notice.delay));

        let mut step = Step::new(Some(&record), &[], 2);
        step.now = start + Duration::from_secs(1);
        assert_eq!(step.run(&mut tracked), [], "before the retry delay");
        step.now = start + notice.delay;
        assert_eq!(step.run(&mut tracked), [Action::Submit]);

        let mut last = notice.delay;
        for attempt in 2..6 {
            let actions = tracked.submit_failed(false, "timed out", start, &retry());
            let [Action::ShowRetry(notice)] = actions.as_slice() else {
                panic!("expected a retry notice: {actions:?}");
            };
            assert_eq!(notice.attempt, attempt);
            assert!(notice.delay > last, "attempt {attempt}: {:?}", notice.delay);
            assert!(notice.delay <= retry_delay(&retry(), attempt));
            last = notice.delay;
        }
        assert_eq!(
            tracked.submit_failed(false, "timed out", start, &retry()),
            [Action::Unlock {
                reason: "6 submission attempts failed".into()
            }]
        );
    }

    #[test]
    fn retry_status_cleared_once_job_listed() {
        let mut record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submit_failed(false, "timed out", Instant::now(), &retry());
        tracked.retry_shown();
        record.runtime_status.insert(
            SCHEDULING_STATUS_KEY.into(),
            "submission attempt 1 failed".into(),
        );
        tracked.submitted(submission("12"), 1);
        let jobs = [job("12", JobState::Pending)];
        assert_eq!(
            Step::new(Some(&record), &jobs, 2).run(&mut tracked),
            [
                Action::RecordJobId(JobId::new("12")),
                Action::ClearSchedulingStatus
            ]
        );
        assert_eq!(tracked.retry_at(), None);
    }

    #[test]
    fn job_found_after_a_failed_submission_is_taken() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submit_failed(false, "timed out", Instant::now(), &retry());
        let jobs = [job("77", JobState::Pending)];
        assert_eq!(
            Step::new(Some(&record), &jobs, 2).run(&mut tracked),
            [Action::RecordJobId(JobId::new("77"))]
        );
        assert_eq!(tracked.job(), Some(&JobId::new("77")));
    }

    #[test]
    fn rejected_submission_cancels_container() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        let expected = Action::CancelContainer {
            error: REJECTED_ERROR.into(),
            detail: "Invalid partition".into(),
        };
        let actions = tracked.submit_failed(true, "Invalid partition", Instant::now(), &retry());
        assert_eq!(actions, std::slice::from_ref(&expected));
        assert_eq!(
            Step::new(Some(&record), &[], 2).run(&mut tracked),
            [expected]
        );
        let cancelled = ours(ContainerState::Cancelled, 5);
        assert_eq!(
            Step::new(Some(&cancelled), &[], 3).run(&mut tracked),
            [Action::RemoveCredentials, Action::Forget]
        );
    }

    #[test]
    fn final_container_job_cancelled_after_grace() {
        let record = ours(ContainerState::Complete, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        let jobs = [job("42", JobState::Running)];
        let mut step = Step::new(Some(&record), &jobs, 2);
        assert_eq!(step.run(&mut tracked), [Action::RemoveCredentials]);
        step.generation = 3;
        step.now += FINAL_JOB_GRACE;
        assert_eq!(step.run(&mut tracked), [Action::Cancel(jobs[0].clone())]);
        // Forgotten once the job has left two snapshots.
        assert_eq!(Step::new(Some(&record), &[], 4).run(&mut tracked), []);
        assert_eq!(
            Step::new(Some(&record), &[], 5).run(&mut tracked),
            [Action::Forget]
        );
    }

    #[test]
    fn final_container_pending_job_cancelled_at_once() {
        let record = ours(ContainerState::Cancelled, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        let jobs = [job("42", JobState::Pending)];
        assert_eq!(
            Step::reused(Some(&record), &jobs, 2).run(&mut tracked),
            [Action::RemoveCredentials, Action::Cancel(jobs[0].clone())]
        );
    }

    #[test]
    fn unlocked_by_another_cancels_job() {
        let record = container(ContainerState::Queued, 5, None);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        let jobs = [job("42", JobState::Pending)];
        assert_eq!(
            Step::new(Some(&record), &jobs, 2).run(&mut tracked),
            [Action::RemoveCredentials, Action::Cancel(jobs[0].clone())]
        );
    }

    #[test]
    fn container_gone_from_the_controller_is_forgotten() {
        let mut tracked = Tracked::locked(1);
        assert_eq!(
            Step::new(None, &[], 2).run(&mut tracked),
            [Action::RemoveCredentials, Action::Forget]
        );
    }

    #[test]
    fn same_name_second_job_is_stray() {
        let record = ours(ContainerState::Running, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let jobs = [job("41", JobState::Pending), job("42", JobState::Running)];
        assert_eq!(
            Step::new(Some(&record), &jobs, 2).run(&mut tracked),
            [Action::Cancel(jobs[0].clone())]
        );
    }

    #[test]
    fn adopted_job_prefers_the_recorded_id() {
        let mut record = ours(ContainerState::Running, 5);
        record.scheduler_job_id = Some("42".into());
        let mut tracked = Tracked::adopted(1);
        let jobs = [job("41", JobState::Pending), job("42", JobState::Running)];
        assert_eq!(
            Step::new(Some(&record), &jobs, 1).run(&mut tracked),
            [Action::Cancel(jobs[0].clone())]
        );
        assert_eq!(tracked.job(), Some(&JobId::new("42")));
    }

    #[test]
    fn adopted_running_without_job_resolved() {
        let record = ours(ContainerState::Running, 5);
        let mut tracked = Tracked::adopted(1);
        assert_eq!(Step::new(Some(&record), &[], 1).run(&mut tracked), []);
        assert_eq!(
            Step::new(Some(&record), &[], 2).run(&mut tracked),
            [Action::Resolve]
        );
    }

    #[test]
    fn adopted_locked_resubmits_with_credentials() {
        let record = ours(ContainerState::Locked, 5);
        let mut with = Tracked::adopted(1);
        assert_eq!(Step::new(Some(&record), &[], 1).run(&mut with), []);
        assert_eq!(
            Step::new(Some(&record), &[], 2).run(&mut with),
            [Action::Submit]
        );

        let mut without = Tracked::adopted(1);
        let mut step = Step::new(Some(&record), &[], 1);
        step.credentials_age = None;
        assert_eq!(step.run(&mut without), []);
        step.generation = 2;
        assert!(matches!(
            step.run(&mut without)[..],
            [Action::Unlock { .. }]
        ));
    }

    #[test]
    fn adopted_locked_waits_for_a_recent_submit() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::adopted(1);
        let mut step = Step::new(Some(&record), &[], 1);
        step.credentials_age = Some(Duration::from_secs(5));
        assert_eq!(step.run(&mut tracked), []);
        step.generation = 2;
        assert_eq!(step.run(&mut tracked), []);

        step.generation = 3;
        step.credentials_age = Some(ORPHAN_SUBMIT_GRACE);
        assert_eq!(step.run(&mut tracked), [Action::Submit]);
    }

    #[test]
    fn adopted_recorded_job_never_resubmitted() {
        let mut record = ours(ContainerState::Locked, 5);
        record.scheduler_job_id = Some("42".into());
        let mut tracked = Tracked::adopted(1);
        assert_eq!(Step::new(Some(&record), &[], 1).run(&mut tracked), []);
        assert_eq!(
            Step::new(Some(&record), &[], 2).run(&mut tracked),
            [Action::Resolve]
        );
    }

    #[test]
    fn adopted_with_its_job_is_just_tracked() {
        let mut record = ours(ContainerState::Running, 5);
        record.scheduler_job_id = Some("42".into());
        let mut tracked = Tracked::adopted(1);
        let jobs = [job("42", JobState::Running)];
        for generation in 1..5 {
            assert_eq!(
                Step::new(Some(&record), &jobs, generation).run(&mut tracked),
                []
            );
        }
    }

    #[test]
    fn vanished_running_container_is_cancelled_with_the_reason() {
        let record = ours(ContainerState::Running, 5);
        let last = BatchJob {
            reason: "NodeFail".into(),
            ..job("42", JobState::Running)
        };
        let actions = resolve_vanished(Some(&record), TOKEN, "slurm", Some(&last.id), Some(&last));
        assert_eq!(
            actions,
            [Action::CancelContainer {
                error: VANISHED_ERROR.into(),
                detail: "slurm job 42 was last seen running (NodeFail) and has left the queue"
                    .into(),
            }]
        );
    }

    #[test]
    fn vanished_job_never_listed_is_named() {
        let record = ours(ContainerState::Running, 5);
        let id = JobId::new("42");
        let actions = resolve_vanished(Some(&record), TOKEN, "local", Some(&id), None);
        assert_eq!(
            actions,
            [Action::CancelContainer {
                error: VANISHED_ERROR.into(),
                detail: "local job 42 left the queue before a status query listed it".into(),
            }]
        );
        let actions = resolve_vanished(Some(&record), TOKEN, "slurm", None, None);
        assert!(
            matches!(&actions[..], [Action::CancelContainer { detail, .. }] if detail == "no slurm job named after the container was found"),
            "{actions:?}"
        );
    }

    #[test]
    fn vanished_locked_container_is_unlocked_and_others_forgotten() {
        let locked = ours(ContainerState::Locked, 5);
        assert!(matches!(
            resolve_vanished(Some(&locked), TOKEN, "slurm", None, None)[..],
            [Action::Unlock { .. }]
        ));
        let complete = ours(ContainerState::Complete, 5);
        assert_eq!(
            resolve_vanished(Some(&complete), TOKEN, "slurm", None, None),
            [Action::RemoveCredentials, Action::Forget]
        );
        let other = container(
            ContainerState::Running,
            5,
            Some("zzzzz-gj3su-111111111111111"),
        );
        assert_eq!(
            resolve_vanished(Some(&other), TOKEN, "slurm", None, None),
            [Action::RemoveCredentials, Action::Forget]
        );
        assert_eq!(
            resolve_vanished(None, TOKEN, "slurm", None, None),
            [Action::RemoveCredentials, Action::Forget]
        );
    }

    fn pending(id: &str, reason: &str) -> BatchJob {
        BatchJob {
            reason: reason.into(),
            ..job(id, JobState::Pending)
        }
    }

    #[test]
    fn pending_reason_shown_once_per_change() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let priority = [pending("42", "Priority")];
        assert_eq!(
            Step::new(Some(&record), &priority, 2).run(&mut tracked),
            [Action::ShowPending(priority[0].clone())]
        );
        tracked.pending_shown(Some(&priority[0]));
        assert_eq!(Step::new(Some(&record), &priority, 3).run(&mut tracked), []);

        let resources = [pending("42", "Resources")];
        assert_eq!(
            Step::new(Some(&record), &resources, 4).run(&mut tracked),
            [Action::ShowPending(resources[0].clone())]
        );
    }

    #[test]
    fn pending_without_reason_shows_nothing() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let jobs = [job("42", JobState::Pending)];
        assert_eq!(Step::new(Some(&record), &jobs, 2).run(&mut tracked), []);
    }

    #[test]
    fn scheduling_status_cleared_once_job_starts() {
        let mut record = ours(ContainerState::Locked, 5);
        record.runtime_status.insert(
            SCHEDULING_STATUS_KEY.into(),
            "slurm job 42 is pending: Priority".into(),
        );
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let running = [job("42", JobState::Running)];
        assert_eq!(
            Step::new(Some(&record), &running, 2).run(&mut tracked),
            [Action::ClearSchedulingStatus]
        );
        record.state = ContainerState::Running;
        assert_eq!(
            Step::new(Some(&record), &running, 3).run(&mut tracked),
            [Action::ClearSchedulingStatus],
            "also once the supervisor has set it Running"
        );
        record.runtime_status.clear();
        assert_eq!(Step::new(Some(&record), &running, 4).run(&mut tracked), []);
    }

    #[test]
    fn listed_reason_cancels_after_two_snapshots() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let reasons = ["PartitionConfig".to_string()];
        let jobs = [pending("42", "PartitionConfig")];
        let mut step = Step::new(Some(&record), &jobs, 2);
        step.cancel_reasons = &reasons;
        assert_eq!(
            step.run(&mut tracked),
            [Action::ShowPending(jobs[0].clone())]
        );
        tracked.pending_shown(Some(&jobs[0]));
        step.generation = 3;
        assert_eq!(
            step.run(&mut tracked),
            [
                Action::Cancel(jobs[0].clone()),
                Action::CancelUnrunnable(jobs[0].clone())
            ]
        );
        // Repeated until the container is Cancelled, without the job once
        // it has left.
        let mut gone = Step::new(Some(&record), &[], 4);
        gone.cancel_reasons = &reasons;
        assert_eq!(
            gone.run(&mut tracked),
            [Action::CancelUnrunnable(jobs[0].clone())]
        );
        let cancelled = ours(ContainerState::Cancelled, 5);
        assert_eq!(
            Step::new(Some(&cancelled), &[], 5).run(&mut tracked),
            [Action::RemoveCredentials, Action::Forget]
        );
    }

    #[test]
    fn reused_snapshot_never_counts_as_unrunnable() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let reasons = ["PartitionConfig".to_string()];
        let jobs = [pending("42", "PartitionConfig")];
        let mut step = Step::new(Some(&record), &jobs, 2);
        step.cancel_reasons = &reasons;
        assert_eq!(
            step.run(&mut tracked),
            [Action::ShowPending(jobs[0].clone())]
        );
        tracked.pending_shown(Some(&jobs[0]));
        step.new_snapshot = false;
        for _ in 0..5 {
            assert_eq!(step.run(&mut tracked), [], "the same snapshot again");
        }
        step.generation = 3;
        step.new_snapshot = true;
        assert_eq!(
            step.run(&mut tracked),
            [
                Action::Cancel(jobs[0].clone()),
                Action::CancelUnrunnable(jobs[0].clone())
            ]
        );
    }

    #[test]
    fn unlisted_or_interrupted_reason_never_cancels() {
        let record = ours(ContainerState::Locked, 5);
        let mut tracked = Tracked::locked(1);
        tracked.submitted(submission("42"), 1);
        tracked.job_id_recorded();
        let reasons = ["PartitionConfig".to_string()];
        let config = [pending("42", "PartitionConfig")];
        let resources = [pending("42", "Resources")];
        for (generation, jobs) in [(2, &config), (3, &resources), (4, &config), (5, &resources)] {
            let mut step = Step::new(Some(&record), jobs, generation);
            step.cancel_reasons = &reasons;
            let actions = step.run(&mut tracked);
            assert!(
                actions
                    .iter()
                    .all(|action| matches!(action, Action::ShowPending(_))),
                "generation {generation}: {actions:?}"
            );
            tracked.pending_shown(Some(&jobs[0]));
        }
        // Without a cancel list the reason only shows.
        let mut other = Tracked::locked(1);
        other.submitted(submission("42"), 1);
        other.job_id_recorded();
        for generation in 2..6 {
            let actions = Step::new(Some(&record), &config, generation).run(&mut other);
            assert!(
                !actions
                    .iter()
                    .any(|action| matches!(action, Action::CancelUnrunnable(_))),
                "{actions:?}"
            );
        }
    }

    #[test]
    fn cancel_ledger_waits_unless_the_state_changed() {
        let mut ledger = CancelLedger::default();
        let now = Instant::now();
        let pending = job("42", JobState::Pending);
        assert!(ledger.should_send(&pending, now));
        ledger.record(&pending, now);
        assert!(!ledger.should_send(&pending, now + Duration::from_secs(1)));
        assert!(ledger.should_send(&pending, now + CANCEL_RESEND_AFTER));
        let running = job("42", JobState::Running);
        assert!(ledger.should_send(&running, now + Duration::from_secs(1)));
        ledger.retain_listed(&[]);
        assert!(ledger.should_send(&pending, now));
    }
}
