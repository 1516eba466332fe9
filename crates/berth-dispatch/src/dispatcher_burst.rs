//! Locking and submitting many queued containers at once, for the
//! dispatch loop ([`super::Dispatcher`]): a pipeline in which one group's
//! submissions overlap the next group's lock calls and the previous
//! group's job id updates.

use std::sync::Arc;
use std::time::Instant;

use berth_client::{ClientError, Locked};
use berth_core::Container;
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{status_code, Dispatcher};
use crate::api::ControllerApi;
use crate::backend::{Backend, BackendError, JobId, JobRequest, Submission};
use crate::credentials::CredentialsStore;
use crate::limiter::format_delay;
use crate::tracker::{Action, Tracked};

/// Maximum number of queued containers locked before their jobs are
/// submitted. A burst is locked and submitted in groups of this size, so a
/// dispatcher stopped in the middle leaves few containers locked without a
/// job (a restarted one submits them).
const LOCK_GROUP: usize = 100;

impl<B: Backend> Dispatcher<B> {
    /// Locks and submits Queued containers, in the given order, except
    /// those whose job the latest snapshot lists. Such a job is left from
    /// an earlier lock and must leave before the container gets another,
    /// so it is cancelled instead.
    ///
    /// The containers go in groups of [`LOCK_GROUP`], through a pipeline:
    /// while one group's jobs are submitted ([`Backend::submit_many`]),
    /// the next group is locked and the previous group's job ids are
    /// recorded. Each step has as many calls in flight as the limiter
    /// allows calls to the batch system. No group is locked while calls to
    /// the batch system back off, nor after `shutdown` fires.
    pub(super) async fn lock_and_submit_all(
        &mut self,
        candidates: Vec<Container>,
        now: Instant,
        shutdown: &CancellationToken,
    ) {
        let mut free = Vec::with_capacity(candidates.len());
        for container in candidates {
            let leftover = self
                .latest_jobs
                .get(&container.uuid)
                .cloned()
                .unwrap_or_default();
            if leftover.is_empty() {
                free.push(container);
            } else {
                let span = tracing::info_span!("container", container = %container.uuid);
                self.cancel_leftovers(&leftover, now).instrument(span).await;
            }
        }

        let groups: Vec<&[Container]> = free.chunks(LOCK_GROUP).collect();
        let api = Arc::clone(&self.api);
        let concurrency = self.limiter.max_concurrent();
        let mut locked = Vec::new();
        if let Some(first) = groups
            .first()
            .filter(|_| self.may_lock_group(shutdown, free.len()))
        {
            self.calls += first.len() as u64;
            locked = lock_calls(Arc::clone(&api), &self.store, first, concurrency).await;
        }

        let mut unrecorded = Vec::new();
        for index in 0..groups.len() {
            if locked.is_empty() {
                break;
            }
            let ready = self.after_locks(std::mem::take(&mut locked), now).await;
            let batch = self.prepare_submissions(ready, now).await;
            let next: &[Container] = match groups.get(index + 1) {
                Some(next) if self.may_lock_group(shutdown, free.len()) => next,
                _ => &[],
            };

            self.calls += (next.len() + unrecorded.len()) as u64;
            let requests: Vec<JobRequest> =
                batch.iter().map(|(_, request)| request.clone()).collect();
            let (results, next_locked, written) = tokio::join!(
                self.backend.submit_many(&requests),
                lock_calls(Arc::clone(&api), &self.store, next, concurrency),
                job_id_calls(
                    Arc::clone(&api),
                    std::mem::take(&mut unrecorded),
                    concurrency
                ),
            );
            self.job_ids_written(written);
            unrecorded = self.finish_submissions(batch, results, now).await;
            locked = next_locked;
        }

        self.calls += unrecorded.len() as u64;
        let written = job_id_calls(api, unrecorded, concurrency).await;
        self.job_ids_written(written);
    }

    /// True unless `shutdown` has fired or calls to the batch system back
    /// off, which is logged with the number of containers left `queued`.
    fn may_lock_group(&self, shutdown: &CancellationToken, queued: usize) -> bool {
        if shutdown.is_cancelled() {
            return false;
        }
        match self.limiter.backoff_remaining() {
            Some(remaining) => {
                tracing::debug!(
                    queued,
                    "not locking queued containers while calls to the batch system back off for {}",
                    format_delay(remaining)
                );
                false
            }
            None => true,
        }
    }

    /// Handles the results of a group's lock calls; returns the records of
    /// the containers now locked and tracked.
    async fn after_locks(&mut self, locked: Vec<LockOutcome>, now: Instant) -> Vec<Container> {
        let mut ready = Vec::with_capacity(locked.len());
        for outcome in locked {
            let span = tracing::info_span!("container", container = %outcome.container.uuid);
            if let Some(record) = self
                .after_lock(&outcome.container, outcome.lock, outcome.written, now)
                .instrument(span)
                .await
            {
                ready.push(record);
            }
        }
        ready
    }

    /// Handles the result of a lock call and of writing the container's
    /// credentials file (`written`, made after a successful lock): on
    /// success, clears the job id of an earlier lock, starts tracking the
    /// container and returns its record for submission. A failed write
    /// unlocks the container.
    async fn after_lock(
        &mut self,
        container: &Container,
        result: Result<Locked, ClientError>,
        written: Result<(), String>,
        now: Instant,
    ) -> Option<Container> {
        let uuid = container.uuid.as_str();
        let locked = match result {
            Ok(locked) => locked,
            Err(err) if matches!(status_code(&err), Some(404 | 422)) => {
                // Another dispatcher locked it, or it changed since the list.
                tracing::debug!(error = %err, "the container could not be locked; skipping it");
                return None;
            }
            Err(err) => {
                report!(self.repeats, "lock", err, "failed to lock the container");
                self.hold(uuid, now);
                return None;
            }
        };
        self.repeats.succeeded("lock");
        self.remember(locked.container.clone());
        tracing::info!(
            lock_count = locked.container.lock_count,
            "locked the container"
        );

        if let Err(err) = written {
            let unlock = self.controller().unlock_container(uuid).await;
            self.hold(uuid, now);
            match unlock {
                Ok(unlocked) => {
                    self.remember(unlocked);
                    tracing::error!(error = %err, "failed to write the credentials file; unlocked the container")
                }
                Err(unlock_err) => tracing::error!(
                    error = %err,
                    unlock_error = %unlock_err,
                    "failed to write the credentials file, and then to unlock the container"
                ),
            }
            return None;
        }
        let mut record = locked.container;
        if record.scheduler_job_id.is_some() {
            // The id of a job from an earlier lock would make a restarted
            // dispatcher believe this lock's job was submitted.
            match self
                .controller()
                .update_container(uuid, &json!({"scheduler_job_id": null}))
                .await
            {
                Ok(updated) => {
                    self.remember(updated.clone());
                    record = updated;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "failed to clear the job id of an earlier lock")
                }
            }
        }
        self.tracked
            .insert(uuid.to_string(), Tracked::locked(self.generation));
        Some(record)
    }

    /// Lets each just-locked container decide, and returns those that
    /// want their job submitted, with their job requests. Every other
    /// action is carried out here, one container at a time.
    async fn prepare_submissions(
        &mut self,
        records: Vec<Container>,
        now: Instant,
    ) -> Vec<(Container, JobRequest)> {
        let mut batch = Vec::new();
        for record in records {
            let uuid = record.uuid.clone();
            let span = tracing::info_span!("container", container = %uuid);
            let actions = self.observe(&uuid, Some(&record), &[], now, false);
            if actions != [Action::Submit] || self.limiter.backoff_remaining().is_some() {
                self.execute(&uuid, Some(record), actions, now)
                    .instrument(span)
                    .await;
                continue;
            }
            match self.job_request(&record, now) {
                Ok(request) => batch.push((record, request)),
                Err(actions) => {
                    self.execute(&uuid, Some(record), actions, now)
                        .instrument(span)
                        .await
                }
            }
        }
        batch
    }

    /// Notes the results of [`Backend::submit_many`] and carries out the
    /// follow-up actions, except recording the job ids: those it returns,
    /// for the caller to send with concurrent calls ([`job_id_calls`]).
    async fn finish_submissions(
        &mut self,
        batch: Vec<(Container, JobRequest)>,
        results: Vec<Result<Submission, BackendError>>,
        now: Instant,
    ) -> Vec<(String, JobId)> {
        let mut job_ids = Vec::new();
        for ((record, _), result) in batch.into_iter().zip(results) {
            let uuid = record.uuid.clone();
            let span = tracing::info_span!("container", container = %uuid);
            let actions = span.in_scope(|| self.submitted(&uuid, result, now));
            let mut rest = Vec::new();
            for action in actions {
                match action {
                    Action::RecordJobId(job_id) => job_ids.push((uuid.clone(), job_id)),
                    other => rest.push(other),
                }
            }
            if !rest.is_empty() {
                self.execute(&uuid, Some(record), rest, now)
                    .instrument(span)
                    .await;
            }
        }
        job_ids
    }

    /// Handles the controller's responses to recording job ids.
    fn job_ids_written(&mut self, written: Vec<(String, JobId, Result<Container, ClientError>)>) {
        for (uuid, job_id, result) in written {
            let span = tracing::info_span!("container", container = %uuid);
            span.in_scope(|| self.job_id_written(&uuid, job_id.as_str(), result));
        }
    }
}

/// One container's lock call and the writing of its credentials file.
struct LockOutcome {
    container: Container,
    lock: Result<Locked, ClientError>,
    /// The result of writing the credentials file; `Ok` when the lock
    /// failed, since nothing was written.
    written: Result<(), String>,
}

/// Sends the lock calls of a group of containers, `concurrency` at a time,
/// and writes the credentials file of each container locked, on tokio's
/// blocking threads because each write ends with an fsync. Returns the
/// outcomes in the group's order.
async fn lock_calls(
    api: Arc<dyn ControllerApi>,
    store: &CredentialsStore,
    group: &[Container],
    concurrency: usize,
) -> Vec<LockOutcome> {
    futures::stream::iter(group.iter().cloned())
        .map(|container| {
            let api = Arc::clone(&api);
            let store = store.clone();
            async move {
                let lock = api.lock_container(&container.uuid).await;
                let written = match &lock {
                    Ok(locked) => {
                        let uuid = container.uuid.clone();
                        let credentials = locked.credentials.clone();
                        let write = move || store.write(&uuid, &credentials).map(|_| ());
                        match tokio::task::spawn_blocking(write).await {
                            Ok(result) => result.map_err(|err| err.to_string()),
                            Err(err) => Err(format!("the write task failed: {err}")),
                        }
                    }
                    Err(_) => Ok(()),
                };
                LockOutcome {
                    container,
                    lock,
                    written,
                }
            }
        })
        .buffered(concurrency)
        .collect()
        .await
}

/// Records job ids on their containers, `concurrency` calls at a time, and
/// returns each with the controller's response.
async fn job_id_calls(
    api: Arc<dyn ControllerApi>,
    job_ids: Vec<(String, JobId)>,
    concurrency: usize,
) -> Vec<(String, JobId, Result<Container, ClientError>)> {
    futures::stream::iter(job_ids)
        .map(|(uuid, job_id)| {
            let api = Arc::clone(&api);
            async move {
                let attributes = json!({"scheduler_job_id": job_id.as_str()});
                let result = api.update_container(&uuid, &attributes).await;
                (uuid, job_id, result)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}
