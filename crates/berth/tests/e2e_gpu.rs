//! End to end on real Slurm: a request for GPUs is accepted and reaches
//! `sbatch`. This machine's Slurm has no GPU, so Slurm rejects the job and
//! the container is cancelled with Slurm's message, instead of waiting for
//! a GPU that never comes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_core::{ContainerState, RequestState};
use common::{skip, slurm_jobs_named, wait_until, TestCluster};

/// Takes under a second.
#[tokio::test(flavor = "multi_thread")]
async fn gpu_request_without_cluster_gpus_cancelled() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("slurm");
    let token = cluster.create_user("gina");
    let gina = common::client(&cluster.api_url, &token);

    // The deprecated `cuda` form, which the controller turns into `gpu`.
    let mut body = common::request_body(&["true"], 500);
    body["runtime_constraints"]["cuda"] =
        serde_json::json!({"device_count": 1, "driver_version": "12.0"});
    body["container_count_max"] = serde_json::json!(1);
    let request = gina
        .create_container_request(&body)
        .await
        .expect("a committed GPU request is accepted");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    let container = wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to be cancelled",
        || async {
            let container = gina.get_container(&container_uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await;
    assert_eq!(container.runtime_constraints.gpu.device_count, 1);
    assert_eq!(container.runtime_constraints.gpu.stack, "cuda");
    assert_eq!(container.state, ContainerState::Cancelled);
    let status = serde_json::to_string(&container.runtime_status).unwrap();
    assert!(
        status.contains("Invalid generic resource (gres) specification"),
        "{status}\n{}",
        cluster.logs()
    );
    assert!(status.contains("--gres=gpu:1"), "{status}");
    assert!(slurm_jobs_named(&container_uuid).is_empty());
    let request = gina.get_container_request(&request.uuid).await.unwrap();
    assert_eq!(request.state, RequestState::Final);
}
