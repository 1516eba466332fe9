//! In-memory stand-ins for the controller and the batch system, for the
//! unit tests of the dispatch loop's decisions. Both record the calls they
//! receive. The real Slurm adapter and the real controller are tested
//! elsewhere: the adapter in `tests/slurm.rs`, the whole system in the
//! `berth` crate's end-to-end tests.
//!
//! The controller numbers its changes like the real one. Every write to a
//! container takes the next *change sequence* number, and the cursor of
//! its change feed is the number of the last change it returned. A waiting
//! feed read wakes on the next write.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use berth_client::{ClientError, ContainerChanges, ListPage, ListParams, Locked};
use berth_core::records::ContainerCredentials;
use berth_core::{Container, ContainerState};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::Notify;

use crate::api::ControllerApi;
use crate::backend::{Backend, BackendError, BatchJob, JobId, JobRequest, JobState, Submission};
use crate::command::CommandError;

pub const TOKEN_UUID: &str = "zzzzz-gj3su-000000000000000";

/// Most containers one change feed page returns, like the controller's
/// default limit.
const CHANGE_PAGE_LIMIT: usize = 1000;

fn api_error(status: StatusCode, message: String) -> ClientError {
    ClientError::Api {
        method: Method::POST,
        url: "http://fake/".into(),
        status,
        message,
        retry_after: None,
    }
}

/// Builds a container in the Queued state, as the controller creates it.
pub fn queued_container(uuid: &str, priority: i64) -> Container {
    let mut container: Container = serde_json::from_value(serde_json::json!({
        "uuid": uuid,
        "owner_uuid": "zzzzz-tpzed-000000000000001",
        "created_at": "2024-01-01T00:00:00Z",
        "modified_at": "2024-01-01T00:00:00Z",
        "modified_by_user_uuid": null,
        "state": "Queued",
        "log": null, "cwd": "/", "output_path": "/out", "output": null,
        "container_image": "busybox", "progress": null, "exit_code": null,
        "auth_uuid": null, "locked_by_uuid": null, "runtime_user_uuid": null,
        "gateway_address": null,
        "command": ["true"],
        "runtime_constraints": {"ram": 268435456, "vcpus": 1},
    }))
    .expect("a valid container record");
    container.priority = priority;
    container
}

/// The controller, reduced to containers.
#[derive(Debug, Clone, Default)]
pub struct FakeController {
    inner: Arc<Mutex<ControllerState>>,
    /// Wakes waiting change feed reads after each write.
    changed: Arc<Notify>,
    /// Wakes held change feed responses.
    released: Arc<Notify>,
}

#[derive(Debug, Default)]
struct ControllerState {
    containers: BTreeMap<String, Container>,
    calls: Vec<String>,
    failing_lists: u32,
    lock_conflicts: HashSet<String>,
    locks: u64,
    /// The token UUID the controller returns, when not [`TOKEN_UUID`].
    token_uuid: Option<String>,
    /// Number of the latest change.
    change_seq: u64,
    /// Number of each container's latest change.
    change_seqs: BTreeMap<String, u64>,
    failing_feed_reads: u32,
    /// Page size of the change feed, when not [`CHANGE_PAGE_LIMIT`].
    change_page_limit: Option<usize>,
    holding_feed_responses: bool,
}

impl ControllerState {
    /// Gives the container's latest write the next change number.
    fn record_change(&mut self, uuid: &str) {
        self.change_seq += 1;
        self.change_seqs.insert(uuid.to_string(), self.change_seq);
    }

    /// Returns the page of changes after `after`, or `None` when there
    /// are none yet.
    fn changes_after(&self, after: u64) -> Option<ContainerChanges> {
        let limit = self.change_page_limit.unwrap_or(CHANGE_PAGE_LIMIT);
        let mut changed: Vec<(u64, &String)> = self
            .change_seqs
            .iter()
            .filter(|(_, seq)| **seq > after)
            .map(|(uuid, seq)| (*seq, uuid))
            .collect();
        if changed.is_empty() {
            return None;
        }
        changed.sort();
        let more = changed.len() > limit;
        changed.truncate(limit);
        let cursor = changed.last().map(|(seq, _)| *seq).unwrap_or(after);
        Some(ContainerChanges {
            cursor: cursor.to_string(),
            items: changed
                .iter()
                .map(|(_, uuid)| self.containers[*uuid].clone())
                .collect(),
            more,
        })
    }
}

impl FakeController {
    fn state(&self) -> MutexGuard<'_, ControllerState> {
        self.inner.lock().expect("fake controller lock")
    }

    pub fn add(&self, container: Container) {
        let uuid = container.uuid.clone();
        let mut state = self.state();
        state.containers.insert(uuid.clone(), container);
        self.written(state, &uuid);
    }

    pub fn container(&self, uuid: &str) -> Container {
        self.state().containers[uuid].clone()
    }

    /// Changes a container as its supervisor or a user would.
    pub fn change(&self, uuid: &str, change: impl FnOnce(&mut Container)) {
        let mut state = self.state();
        let container = state.containers.get_mut(uuid).expect("known container");
        change(container);
        if container.state.is_final() {
            container.locked_by_uuid = None;
        }
        self.written(state, uuid);
    }

    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Calls whose text starts with `prefix`, such as `lock`.
    pub fn count(&self, prefix: &str) -> usize {
        self.state()
            .calls
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    /// Makes the next `n` list calls fail with 503.
    pub fn fail_lists(&self, n: u32) {
        self.state().failing_lists = n;
    }

    /// Makes `api_client_authorizations/current` return `uuid`.
    pub fn set_token_uuid(&self, uuid: &str) {
        self.state().token_uuid = Some(uuid.to_string());
    }

    /// Makes every lock of `uuid` fail with 422, as when another
    /// dispatcher got there first.
    pub fn conflict_on_lock(&self, uuid: &str) {
        self.state().lock_conflicts.insert(uuid.to_string());
    }

    /// Makes the next `n` change feed reads fail with 503, and wakes a
    /// waiting read so that it fails at once.
    pub fn fail_feed_reads(&self, n: u32) {
        self.state().failing_feed_reads = n;
        self.changed.notify_waiters();
    }

    /// Restarts the change numbering, as a controller whose database was
    /// replaced by an older copy does: every cursor issued before is ahead
    /// of the new numbering, which the feed rejects with 422. Wakes a
    /// waiting read.
    pub fn replace_database(&self) {
        let mut state = self.state();
        state.change_seq = 0;
        state.change_seqs.clear();
        drop(state);
        self.changed.notify_waiters();
    }

    /// Sets the most containers one change feed page returns.
    pub fn set_change_page_limit(&self, limit: usize) {
        self.state().change_page_limit = Some(limit);
    }

    /// Reads the changes after `cursor` at once, as a test's own view of
    /// the feed; records no call.
    pub fn changes_after(&self, cursor: u64) -> Vec<Container> {
        self.state()
            .changes_after(cursor)
            .map(|page| page.items)
            .unwrap_or_default()
    }

    /// Returns the number of the latest change.
    pub fn change_seq(&self) -> u64 {
        self.state().change_seq
    }

    /// Makes change feed reads that found changes wait before they return,
    /// until [`FakeController::release_feed_responses`]. The page they return
    /// is the one they found, however the containers change meanwhile, like
    /// a response still on its way from a real controller.
    pub fn hold_feed_responses(&self) {
        self.state().holding_feed_responses = true;
    }

    /// Lets the held change feed responses return.
    pub fn release_feed_responses(&self) {
        self.state().holding_feed_responses = false;
        self.released.notify_waiters();
    }

    /// Serves a change feed read, as `GET containers/changes` does.
    async fn read_changes(
        &self,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<ContainerChanges, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        let page = loop {
            // Registered before the state is read, so that a write between
            // the read and the wait still wakes this one.
            let woken = self.changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut state = self.state();
                if state.failing_feed_reads > 0 {
                    state.failing_feed_reads -= 1;
                    return Err(api_error(StatusCode::SERVICE_UNAVAILABLE, "busy".into()));
                }
                let Some(after) = after else {
                    return Ok(ContainerChanges {
                        cursor: state.change_seq.to_string(),
                        items: Vec::new(),
                        more: false,
                    });
                };
                let cursor = after.parse::<u64>().ok().filter(|c| *c <= state.change_seq);
                let Some(cursor) = cursor else {
                    return Err(api_error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("invalid cursor {after:?}: it is not one this server issued, or it is ahead of the database; take a new cursor by calling without after"),
                    ));
                };
                if let Some(page) = state.changes_after(cursor) {
                    break page;
                }
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Ok(ContainerChanges {
                    cursor: after.unwrap_or_default().to_string(),
                    items: Vec::new(),
                    more: false,
                });
            }
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.state().holding_feed_responses {
                return Ok(page);
            }
            released.await;
        }
    }

    /// Records a write to `uuid` and wakes waiting feed reads.
    fn written(&self, mut state: MutexGuard<'_, ControllerState>, uuid: &str) {
        state.record_change(uuid);
        drop(state);
        self.changed.notify_waiters();
    }
}

fn matches_filter(container: &Container, filter: &Value) -> bool {
    let (Some(attribute), Some(operator), Some(operand)) = (
        filter.get(0).and_then(Value::as_str),
        filter.get(1).and_then(Value::as_str),
        filter.get(2),
    ) else {
        panic!("unexpected filter {filter}");
    };
    let value = match attribute {
        "uuid" => Value::from(container.uuid.clone()),
        "state" => Value::from(container.state.as_str()),
        "priority" => Value::from(container.priority),
        "locked_by_uuid" => container
            .locked_by_uuid
            .clone()
            .map(Value::from)
            .unwrap_or(Value::Null),
        other => panic!("unexpected filter attribute {other}"),
    };
    match operator {
        "=" => &value == operand,
        ">" => match (value.as_i64(), operand.as_i64()) {
            (Some(a), Some(b)) => a > b,
            _ => value.as_str().unwrap_or_default() > operand.as_str().unwrap_or_default(),
        },
        "in" => operand.as_array().is_some_and(|list| list.contains(&value)),
        other => panic!("unexpected filter operator {other}"),
    }
}

#[async_trait]
impl ControllerApi for FakeController {
    async fn token_uuid(&self) -> Result<String, ClientError> {
        Ok(self
            .state()
            .token_uuid
            .clone()
            .unwrap_or_else(|| TOKEN_UUID.to_string()))
    }

    async fn list_containers(
        &self,
        params: &ListParams,
    ) -> Result<ListPage<Container>, ClientError> {
        let mut state = self.state();
        let filters = params.filters.clone().unwrap_or(Value::Array(vec![]));
        state.calls.push(format!("list {filters}"));
        if state.failing_lists > 0 {
            state.failing_lists -= 1;
            return Err(api_error(StatusCode::SERVICE_UNAVAILABLE, "busy".into()));
        }
        assert_eq!(params.order.as_deref(), Some(&["uuid asc".to_string()][..]));
        let limit = params.limit.unwrap_or(100);
        let filters = filters.as_array().cloned().unwrap_or_default();
        let items: Vec<Container> = state
            .containers
            .values()
            .filter(|c| filters.iter().all(|f| matches_filter(c, f)))
            .take(limit as usize)
            .cloned()
            .collect();
        Ok(ListPage {
            items,
            items_available: None,
            offset: 0,
            limit,
        })
    }

    async fn get_container(&self, uuid: &str) -> Result<Container, ClientError> {
        let mut state = self.state();
        state.calls.push(format!("get {uuid}"));
        state
            .containers
            .get(uuid)
            .cloned()
            .ok_or_else(|| api_error(StatusCode::NOT_FOUND, format!("{uuid} not found")))
    }

    async fn lock_container(&self, uuid: &str) -> Result<Locked, ClientError> {
        let mut state = self.state();
        state.calls.push(format!("lock {uuid}"));
        if state.lock_conflicts.contains(uuid) {
            return Err(api_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "already locked".into(),
            ));
        }
        state.locks += 1;
        let n = state.locks;
        let container = state.containers.get_mut(uuid).expect("known container");
        if container.state != ContainerState::Queued || container.priority <= 0 {
            return Err(api_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "cannot lock a container in state {}",
                    container.state.as_str()
                ),
            ));
        }
        container.state = ContainerState::Locked;
        container.locked_by_uuid = Some(TOKEN_UUID.into());
        container.auth_uuid = Some(format!("zzzzz-gj3su-lock{n:011}"));
        container.lock_count += 1;
        let locked = Locked {
            container: container.clone(),
            credentials: ContainerCredentials {
                api_token: format!("v2/zzzzz-gj3su-lock{n:011}/secret{n}/{uuid}"),
                gateway_secret: format!("gateway{n}"),
            },
        };
        self.written(state, uuid);
        Ok(locked)
    }

    async fn unlock_container(&self, uuid: &str) -> Result<Container, ClientError> {
        let mut state = self.state();
        state.calls.push(format!("unlock {uuid}"));
        let container = state.containers.get_mut(uuid).expect("known container");
        if container.state != ContainerState::Locked
            || container.locked_by_uuid.as_deref() != Some(TOKEN_UUID)
        {
            return Err(api_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "cannot unlock a container in state {}",
                    container.state.as_str()
                ),
            ));
        }
        container.state = ContainerState::Queued;
        container.locked_by_uuid = None;
        container.auth_uuid = None;
        container.runtime_status.clear();
        let unlocked = container.clone();
        self.written(state, uuid);
        Ok(unlocked)
    }

    async fn update_container(
        &self,
        uuid: &str,
        attributes: &Value,
    ) -> Result<Container, ClientError> {
        let mut state = self.state();
        state.calls.push(format!("update {uuid} {attributes}"));
        let container = state.containers.get_mut(uuid).expect("known container");
        let mut updated = container.clone();
        for (key, value) in attributes.as_object().expect("an object") {
            match key.as_str() {
                "state" => {
                    let to: ContainerState =
                        serde_json::from_value(value.clone()).expect("a state");
                    updated.state.check_transition(to).map_err(|err| {
                        api_error(StatusCode::UNPROCESSABLE_ENTITY, err.to_string())
                    })?;
                    updated.state = to;
                }
                "scheduler_job_id" => updated.scheduler_job_id = value.as_str().map(str::to_string),
                "runtime_status" => {
                    updated.runtime_status = value.as_object().cloned().unwrap_or_default()
                }
                other => panic!("unexpected attribute {other}"),
            }
        }
        if updated.state.is_final() {
            updated.locked_by_uuid = None;
        }
        *container = updated.clone();
        self.written(state, uuid);
        Ok(updated)
    }

    async fn container_changes(
        &self,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<ContainerChanges, ClientError> {
        self.state()
            .calls
            .push(format!("changes {}", after.unwrap_or("(none)")));
        // Served by a task of its own, like a server that responds while
        // the caller is busy with something else.
        let controller = self.clone();
        let after = after.map(str::to_string);
        tokio::spawn(async move { controller.read_changes(after.as_deref(), wait).await })
            .await
            .expect("the change feed read panicked")
    }
}

/// Kind of failure of the next submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitFailure {
    /// Like an `sbatch` that timed out.
    Transient,
    /// Like an `sbatch` rejecting an impossible memory request.
    Rejected,
}

/// The batch system: a list of jobs that tests change directly.
#[derive(Debug, Clone, Default)]
pub struct FakeBackend {
    inner: Arc<Mutex<BackendState>>,
    /// Pending reasons that mean a job never starts; each clone keeps its
    /// own copy, so set them before handing a clone to a dispatcher.
    cancel_reasons: Vec<String>,
}

#[derive(Debug, Default)]
struct BackendState {
    jobs: Vec<BatchJob>,
    next_id: u64,
    submits: Vec<JobRequest>,
    cancels: Vec<BatchJob>,
    status_calls: u64,
    failing_statuses: u32,
    /// Status queries still to return an empty list, as a batch
    /// system that lost its job table for a moment would.
    empty_statuses: u32,
    submit_failures: VecDeque<SubmitFailure>,
    /// The jobs of each reprioritise call, sorted by job id.
    reprioritised: Vec<Vec<(JobId, i64)>>,
    failing_reprioritises: u32,
    /// Results of [`Backend::end_reason`] by job id: a sentence, or `None`
    /// for a query that fails.
    end_reasons: HashMap<JobId, Option<String>>,
}

impl FakeBackend {
    fn state(&self) -> MutexGuard<'_, BackendState> {
        self.inner.lock().expect("fake backend lock")
    }

    pub fn submits(&self) -> Vec<JobRequest> {
        self.state().submits.clone()
    }

    pub fn cancels(&self) -> Vec<BatchJob> {
        self.state().cancels.clone()
    }

    pub fn jobs(&self) -> Vec<BatchJob> {
        self.state().jobs.clone()
    }

    pub fn status_calls(&self) -> u64 {
        self.state().status_calls
    }

    /// Adds a job as if someone had submitted it.
    pub fn add_job(&self, id: &str, name: &str, state: JobState) {
        self.state().jobs.push(BatchJob {
            id: JobId::new(id),
            name: name.to_string(),
            state,
            reason: String::new(),
        });
    }

    /// Sets the pending reason of every job named `name`.
    pub fn set_reason(&self, name: &str, reason: &str) {
        for job in self.state().jobs.iter_mut().filter(|job| job.name == name) {
            job.reason = reason.to_string();
        }
    }

    /// Sets the pending reasons that mean a job never starts.
    pub fn set_cancel_reasons(&mut self, reasons: &[&str]) {
        self.cancel_reasons = reasons.iter().map(|r| r.to_string()).collect();
    }

    pub fn set_state(&self, name: &str, job_state: JobState) {
        for job in self.state().jobs.iter_mut().filter(|job| job.name == name) {
            job.state = job_state.clone();
        }
    }

    /// Removes every job named `name`, as when it ends.
    pub fn end(&self, name: &str) {
        self.state().jobs.retain(|job| job.name != name);
    }

    /// Makes the next `n` status queries fail.
    pub fn fail_statuses(&self, n: u32) {
        self.state().failing_statuses = n;
    }

    /// Makes the next `n` status queries succeed with no jobs listed,
    /// while the jobs go on.
    pub fn empty_statuses(&self, n: u32) {
        self.state().empty_statuses = n;
    }

    /// Returns the jobs and priorities of each reprioritise call, sorted by job id.
    pub fn reprioritised(&self) -> Vec<Vec<(JobId, i64)>> {
        self.state().reprioritised.clone()
    }

    /// Makes the next `n` reprioritise calls fail.
    pub fn fail_reprioritises(&self, n: u32) {
        self.state().failing_reprioritises = n;
    }

    /// Sets the reason why job `id` ended: `Some` sentence, or `None`
    /// for a failing query. A job without one is unknown.
    pub fn set_end_reason(&self, id: &str, reason: Option<&str>) {
        self.state()
            .end_reasons
            .insert(JobId::new(id), reason.map(str::to_string));
    }

    pub fn fail_next_submit(&self, failure: SubmitFailure) {
        self.state().submit_failures.push_back(failure);
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn submit(&mut self, request: &JobRequest) -> Result<Submission, BackendError> {
        let mut state = self.state();
        state.submits.push(request.clone());
        match state.submit_failures.pop_front() {
            Some(SubmitFailure::Transient) => {
                return Err(BackendError::Command(CommandError::TimedOut {
                    command: "sbatch".into(),
                    timeout: std::time::Duration::from_secs(60),
                }))
            }
            Some(SubmitFailure::Rejected) => {
                return Err(BackendError::Rejected {
                    container: request.container_uuid.clone(),
                    source: CommandError::Failed {
                        command: "sbatch".into(),
                        status: "exit status: 1".into(),
                        stdout: String::new(),
                        stderr: "sbatch: error: Memory specification can not be satisfied".into(),
                    },
                })
            }
            None => {}
        }
        state.next_id += 1;
        let id = JobId::new((100 + state.next_id).to_string());
        state.jobs.push(BatchJob {
            id: id.clone(),
            name: request.container_uuid.clone(),
            state: JobState::Pending,
            reason: "Priority".into(),
        });
        Ok(Submission {
            job_id: id.clone(),
            command: "sbatch".into(),
            script: Some("#!/bin/sh\n".into()),
            stdout: format!("{id}\n"),
            stderr: String::new(),
        })
    }

    async fn status(&mut self) -> Result<Vec<BatchJob>, BackendError> {
        let mut state = self.state();
        state.status_calls += 1;
        if state.failing_statuses > 0 {
            state.failing_statuses -= 1;
            return Err(BackendError::Command(CommandError::Failed {
                command: "squeue".into(),
                status: "exit status: 1".into(),
                stdout: String::new(),
                stderr: "slurm_load_jobs error: Socket timed out on send/recv operation".into(),
            }));
        }
        if state.empty_statuses > 0 {
            state.empty_statuses -= 1;
            return Ok(Vec::new());
        }
        Ok(state.jobs.clone())
    }

    async fn cancel(&mut self, job: &BatchJob) -> Result<(), BackendError> {
        self.state().cancels.push(job.clone());
        Ok(())
    }

    async fn reprioritise(&mut self, jobs: &[(JobId, i64)]) -> Result<(), BackendError> {
        let mut state = self.state();
        let mut jobs = jobs.to_vec();
        jobs.sort();
        state.reprioritised.push(jobs);
        if state.failing_reprioritises > 0 {
            state.failing_reprioritises -= 1;
            return Err(BackendError::Command(CommandError::Failed {
                command: "scontrol update JobId=101 Nice=10".into(),
                status: "exit status: 1".into(),
                stdout: String::new(),
                stderr: "slurm_update error: Socket timed out on send/recv operation".into(),
            }));
        }
        Ok(())
    }

    async fn end_reason(&mut self, job: &JobId) -> Result<Option<String>, BackendError> {
        match self.state().end_reasons.get(job) {
            None => Ok(None),
            Some(Some(reason)) => Ok(Some(reason.clone())),
            Some(None) => Err(BackendError::Command(CommandError::TimedOut {
                command: format!("scontrol show job -o {job}"),
                timeout: std::time::Duration::from_secs(60),
            })),
        }
    }

    fn explain_reason(&self, reason: &str) -> Option<&'static str> {
        (reason == "PartitionConfig").then_some("no node of the partition is big enough")
    }

    fn cancel_pending_reasons(&self) -> &[String] {
        &self.cancel_reasons
    }
}
