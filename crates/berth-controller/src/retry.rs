//! Retries: when a container is Cancelled, the requests that still want it
//! get a new container, up to each request's `container_count_max`.
//!
//! A request is retried when it is Committed, still wants its container to
//! run (priority > 0) and has had fewer containers than its
//! `container_count_max`. A user who cancels sets priority 0, so only
//! containers cancelled by something else (a lost node, a job the batch
//! system killed, too many failed dispatch attempts) are replaced. A
//! Complete container is never retried, whatever its exit code.
//!
//! All retried requests share one new container, a copy of the cancelled
//! one's specification with the same secrets (secret mounts and runtime
//! token). Their scheduling parameters are merged: partitions
//! are the union (or any partition when one request allows any),
//! `preemptible` only if every request allows it, `supervisor` if any
//! request sets it, and `max_run_time` the longest (or no limit when one
//! request has none). Each retried request then points at the new
//! container, counts one more container, and adds the cancelled
//! container's cost to its `cumulative_cost`. Requests that are not
//! retried become Final with the cancelled container.

use berth_core::priority::request_contribution;
use berth_core::state::{ContainerState, RequestState};
use berth_core::time::Timestamp;
use berth_core::{ClusterId, Container, ContainerRequest, ObjectType, SchedulingParameters, Uuid};
use serde_json::Map;

use crate::lifecycle::DEFAULT_CONTAINER_COUNT_MAX;
use crate::store::{Secrets, Versioned};

/// The retry of a cancelled container: a new container with its secrets,
/// and the requests moved onto it, each with the version it was read at.
#[derive(Debug, Clone)]
pub struct RetryPlan {
    pub new_container: Container,
    pub secrets: Secrets,
    pub requests: Vec<Versioned<ContainerRequest>>,
}

/// True when the request gets another container after `cancelled`.
fn is_retryable(request: &ContainerRequest, cancelled: &Container) -> bool {
    request.state == RequestState::Committed
        && request.container_uuid.as_deref() == Some(cancelled.uuid.as_str())
        && request.priority > 0
        && request.container_count
            < request
                .container_count_max
                .unwrap_or(DEFAULT_CONTAINER_COUNT_MAX)
}

/// Merges the scheduling parameters of the requests a new container serves.
pub fn merge_scheduling<'a>(
    parameters: impl IntoIterator<Item = &'a SchedulingParameters>,
) -> SchedulingParameters {
    let mut merged = SchedulingParameters {
        preemptible: true,
        ..SchedulingParameters::default()
    };
    let mut any_partition = false;
    let mut unlimited = false;
    let mut count = 0;
    for each in parameters {
        count += 1;
        if each.partitions.is_empty() {
            any_partition = true;
        }
        for partition in &each.partitions {
            if !merged.partitions.contains(partition) {
                merged.partitions.push(partition.clone());
            }
        }
        merged.preemptible &= each.preemptible;
        merged.supervisor |= each.supervisor;
        if each.max_run_time == 0 {
            unlimited = true;
        }
        merged.max_run_time = merged.max_run_time.max(each.max_run_time);
    }
    if count == 0 {
        return SchedulingParameters::default();
    }
    if any_partition {
        merged.partitions.clear();
    }
    merged.partitions.sort();
    if unlimited {
        merged.max_run_time = 0;
    }
    merged
}

/// Plans the retry of a container that is being Cancelled, given its
/// secrets and the Committed requests that point at it. `None` when no
/// request is retried: they all become Final with the container.
pub fn plan_retry(
    cluster: &ClusterId,
    cancelled: &Container,
    secrets: &Secrets,
    requests: &[Versioned<ContainerRequest>],
    now: Timestamp,
) -> Option<RetryPlan> {
    let retried: Vec<&Versioned<ContainerRequest>> = requests
        .iter()
        .filter(|stored| is_retryable(&stored.record, cancelled))
        .collect();
    if retried.is_empty() {
        return None;
    }
    let uuid = Uuid::generate(cluster, ObjectType::Container).to_string();
    let new_container = Container {
        uuid: uuid.clone(),
        created_at: now,
        modified_at: now,
        modified_by_user_uuid: cancelled.modified_by_user_uuid.clone(),
        state: ContainerState::Queued,
        started_at: None,
        finished_at: None,
        log: None,
        runtime_status: Map::new(),
        scheduling_parameters: merge_scheduling(
            retried
                .iter()
                .map(|stored| &stored.record.scheduling_parameters),
        ),
        output: None,
        progress: None,
        priority: retried
            .iter()
            .map(|stored| request_contribution(stored.record.priority, &stored.record.created_at))
            .max()
            .unwrap_or(0),
        exit_code: None,
        auth_uuid: None,
        locked_by_uuid: None,
        lock_count: 0,
        gateway_address: None,
        gateway_host_key: None,
        gateway_host_key_fingerprint: None,
        interactive_session_started: false,
        cost: 0.0,
        subrequests_cost: 0.0,
        scheduler_job_id: None,
        ..cancelled.clone()
    };
    let requests = retried
        .into_iter()
        .map(|stored| {
            let mut record = stored.record.clone();
            record.container_uuid = Some(uuid.clone());
            record.container_count += 1;
            record.cumulative_cost += cancelled.cost;
            record.modified_at = now;
            Versioned {
                record,
                version: stored.version,
            }
        })
        .collect();
    Some(RetryPlan {
        new_container,
        secrets: secrets.clone(),
        requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster() -> ClusterId {
        "zzzzz".parse().unwrap()
    }

    fn cancelled() -> Container {
        serde_json::from_value(json!({
            "uuid": "zzzzz-dz642-aaaaaaaaaaaaaaa",
            "owner_uuid": "zzzzz-tpzed-000000000000000",
            "created_at": "2024-01-01T00:00:00Z",
            "modified_at": "2024-01-01T00:00:00Z",
            "started_at": "2024-01-01T00:01:00Z",
            "finished_at": "2024-01-01T00:02:00Z",
            "state": "Cancelled",
            "cwd": "/",
            "output_path": "/out",
            "container_image": "busybox",
            "command": ["sleep", "60"],
            "lock_count": 4,
            "cost": 1.5,
            "runtime_status": {"error": "node failure"},
            "runtime_user_uuid": "zzzzz-tpzed-0123456789abcde",
            "scheduler_job_id": "17",
        }))
        .unwrap()
    }

    fn request(
        uuid: &str,
        priority: i64,
        count: i64,
        max: Option<i64>,
    ) -> Versioned<ContainerRequest> {
        Versioned {
            record: serde_json::from_value(json!({
                "uuid": uuid,
                "owner_uuid": "zzzzz-tpzed-0123456789abcde",
                "created_at": "2024-01-01T00:00:00Z",
                "modified_at": "2024-01-01T00:00:00Z",
                "state": "Committed",
                "container_uuid": "zzzzz-dz642-aaaaaaaaaaaaaaa",
                "container_count": count,
                "container_count_max": max,
                "priority": priority,
                "cumulative_cost": 0.5,
            }))
            .unwrap(),
            version: 7,
        }
    }

    #[test]
    fn retryable_requests_move_to_one_fresh_container() {
        let now = chrono::Utc::now();
        let requests = [
            request("zzzzz-xvhdp-aaaaaaaaaaaaaaa", 500, 1, Some(3)),
            request("zzzzz-xvhdp-bbbbbbbbbbbbbbb", 1, 2, None),
        ];
        let plan = plan_retry(
            &cluster(),
            &cancelled(),
            &Secrets::default(),
            &requests,
            now,
        )
        .unwrap();
        let fresh = &plan.new_container;
        assert_ne!(fresh.uuid, cancelled().uuid);
        assert_eq!(fresh.state, ContainerState::Queued);
        assert_eq!(fresh.command, cancelled().command);
        assert_eq!(fresh.lock_count, 0);
        assert!(fresh.started_at.is_none());
        assert!(fresh.finished_at.is_none());
        assert!(fresh.runtime_status.is_empty());
        assert!(fresh.scheduler_job_id.is_none());
        assert_eq!(fresh.cost, 0.0);
        assert_eq!(
            fresh.priority,
            request_contribution(500, &requests[0].record.created_at)
        );
        assert_eq!(plan.requests.len(), 2);
        for moved in &plan.requests {
            assert_eq!(
                moved.record.container_uuid.as_deref(),
                Some(fresh.uuid.as_str())
            );
            assert_eq!(moved.record.cumulative_cost, 2.0);
            assert_eq!(moved.version, 7);
        }
        assert_eq!(plan.requests[0].record.container_count, 2);
        assert_eq!(plan.requests[1].record.container_count, 3);
    }

    #[test]
    fn retry_container_keeps_the_secrets() {
        let secrets = Secrets {
            secret_mounts: serde_json::from_value(
                json!({"/etc/secret": {"kind": "text", "content": "hunter2"}}),
            )
            .unwrap(),
            runtime_token: Some(berth_core::Secret::new(
                "v2/zzzzz-gj3su-0123456789abcde/abc",
            )),
        };
        let requests = [request("zzzzz-xvhdp-aaaaaaaaaaaaaaa", 500, 1, Some(3))];
        let plan = plan_retry(
            &cluster(),
            &cancelled(),
            &secrets,
            &requests,
            chrono::Utc::now(),
        )
        .unwrap();
        assert_eq!(plan.secrets.secret_mounts, secrets.secret_mounts);
        assert!(plan
            .secrets
            .runtime_token
            .is_some_and(|token| token.matches("v2/zzzzz-gj3su-0123456789abcde/abc")));
        assert_eq!(
            plan.new_container.runtime_user_uuid,
            cancelled().runtime_user_uuid
        );
    }

    #[test]
    fn no_retry_at_count_max_or_priority_zero() {
        let now = chrono::Utc::now();
        let requests = [
            request("zzzzz-xvhdp-aaaaaaaaaaaaaaa", 500, 3, Some(3)),
            request("zzzzz-xvhdp-bbbbbbbbbbbbbbb", 0, 1, Some(3)),
            request("zzzzz-xvhdp-ccccccccccccccc", 500, 1, Some(1)),
            request("zzzzz-xvhdp-ddddddddddddddd", 500, 3, None),
        ];
        assert!(plan_retry(
            &cluster(),
            &cancelled(),
            &Secrets::default(),
            &requests,
            now
        )
        .is_none());
        let plan = plan_retry(
            &cluster(),
            &cancelled(),
            &Secrets::default(),
            &[
                requests[0].clone(),
                request("zzzzz-xvhdp-eeeeeeeeeeeeeee", 2, 2, Some(3)),
            ],
            now,
        )
        .unwrap();
        assert_eq!(plan.requests.len(), 1);
        assert_eq!(plan.requests[0].record.uuid, "zzzzz-xvhdp-eeeeeeeeeeeeeee");
    }

    #[test]
    fn scheduling_parameters_merge_as_documented() {
        let a = SchedulingParameters {
            partitions: vec!["b".into(), "a".into()],
            preemptible: true,
            max_run_time: 60,
            supervisor: false,
        };
        let b = SchedulingParameters {
            partitions: vec!["c".into(), "a".into()],
            preemptible: false,
            max_run_time: 600,
            supervisor: true,
        };
        let merged = merge_scheduling([&a, &b]);
        assert_eq!(merged.partitions, vec!["a", "b", "c"]);
        assert!(!merged.preemptible);
        assert!(merged.supervisor);
        assert_eq!(merged.max_run_time, 600);

        let anywhere = SchedulingParameters::default();
        let merged = merge_scheduling([&a, &anywhere]);
        assert!(merged.partitions.is_empty());
        assert_eq!(merged.max_run_time, 0);
        assert!(!merged.preemptible);

        assert!(merge_scheduling([&a, &a]).preemptible);
    }
}
