//! End to end with the local backend: the dispatcher runs `berth
//! supervise` as a child process instead of a batch job.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_core::{ContainerState, RequestState};
use common::{podman_containers_for, skip, test_image, wait_until, TestCluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn local_backend_runs_container_to_completion() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("henry");

    let output = cluster.berth(
        &token,
        &["run", &test_image(), "--", "sh", "-c", "echo local; exit 7"],
    );
    assert_eq!(
        output.status.code(),
        Some(7),
        "exit status of berth run; stderr: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    assert_eq!(output.stdout, b"local\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("berth: output d41d8cd98f00b204e9800998ecf8427e+0"),
        "berth run names the (empty) output collection: {stderr}"
    );
    assert!(stderr.contains("berth: log "), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_backend_cancel_stops_the_container() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("iris");
    let iris = common::client(&cluster.api_url, &token);

    let request = iris
        .create_container_request(&json!({
            "state": "Committed",
            "priority": 1,
            "container_image": test_image(),
            "command": ["sleep", "600"],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
        }))
        .await
        .expect("create request");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to run",
        || async {
            let container = iris.get_container(&container_uuid).await.ok()?;
            (container.state == ContainerState::Running).then_some(())
        },
    )
    .await;

    iris.update_container_request(&request.uuid, &json!({"priority": 0}))
        .await
        .expect("set priority 0");
    wait_until(
        &cluster,
        Duration::from_secs(15),
        "the container to be Cancelled",
        || async {
            let container = iris.get_container(&container_uuid).await.ok()?;
            (container.state == ContainerState::Cancelled).then_some(())
        },
    )
    .await;
    assert!(
        podman_containers_for(&container_uuid).is_empty(),
        "container left in Podman"
    );
    let request = iris
        .get_container_request(&request.uuid)
        .await
        .expect("get request");
    assert_eq!(request.state, RequestState::Final);
}
