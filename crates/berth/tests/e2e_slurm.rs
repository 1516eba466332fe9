//! End to end on real Slurm and real Podman: `berth run` and the API
//! through the controller, the dispatcher, an sbatch job and
//! `berth supervise`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_core::{ContainerState, RequestState};
use common::{podman_containers_for, skip, slurm_jobs_named, test_image, wait_until, TestCluster};

/// Priority of the tests' requests.
const PRIORITY: i64 = 500;

/// Builds a committed request for `command`, with small resources.
fn request_body(command: &[&str]) -> serde_json::Value {
    common::request_body(command, PRIORITY)
}

#[tokio::test(flavor = "multi_thread")]
async fn known_text_log_is_byte_exact() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("slurm");
    let token = cluster.create_user("alice");

    // Two lines, a line without newline at the end, and a byte that is
    // not UTF-8: the log must hold exactly these bytes.
    let output = cluster.berth(
        &token,
        &[
            "run",
            "--ram",
            "64M",
            &test_image(),
            "--",
            "printf",
            "hello\\nworld\\n\\377tail",
        ],
    );
    let expected: &[u8] = b"hello\nworld\n\xfftail";
    assert_eq!(
        output.stdout,
        expected,
        "stdout of berth run; stderr: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    assert_eq!(output.status.code(), Some(0), "exit status of berth run");

    let alice = common::client(&cluster.api_url, &token);
    let requests = alice
        .list_container_requests(&Default::default())
        .await
        .expect("list requests");
    assert_eq!(requests.items.len(), 1);
    let request = &requests.items[0];
    assert_eq!(request.state, RequestState::Final);
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    let container = alice
        .get_container(&container_uuid)
        .await
        .expect("get container");
    assert_eq!(container.state, ContainerState::Complete);
    assert_eq!(container.exit_code, Some(0));

    let log = alice
        .read_log(&container_uuid, "stdout", 0, None)
        .await
        .expect("read stdout log");
    assert_eq!(&log.data[..], expected, "stdout log in the controller");
    assert_eq!(log.size, expected.len() as u64);
    assert_eq!(
        slurm_jobs_named(&container_uuid).len(),
        1,
        "Slurm jobs for the container"
    );
    assert!(
        podman_containers_for(&container_uuid).is_empty(),
        "container left in Podman"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_code_three_completes_and_run_exits_three() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("slurm");
    let token = cluster.create_user("bob");

    let output = cluster.berth(
        &token,
        &[
            "run",
            &test_image(),
            "--",
            "sh",
            "-c",
            "echo to-stderr >&2; exit 3",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(3),
        "exit status of berth run; stderr: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("to-stderr"),
        "container stderr reached berth run's stderr: {stderr}"
    );

    let bob = common::client(&cluster.api_url, &token);
    let requests = bob
        .list_container_requests(&Default::default())
        .await
        .expect("list requests");
    let container_uuid = requests.items[0]
        .container_uuid
        .clone()
        .expect("container uuid");
    let container = bob
        .get_container(&container_uuid)
        .await
        .expect("get container");
    assert_eq!(container.state, ContainerState::Complete);
    assert_eq!(container.exit_code, Some(3));
    assert_eq!(requests.items[0].state, RequestState::Final);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_running_sleep_ends_job_and_container() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("slurm");
    let token = cluster.create_user("carol");
    let carol = common::client(&cluster.api_url, &token);

    let request = carol
        .create_container_request(&request_body(&["sleep", "600"]))
        .await
        .expect("create request");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to run",
        || async {
            let container = carol.get_container(&container_uuid).await.ok()?;
            (container.state == ContainerState::Running).then_some(())
        },
    )
    .await;
    assert_eq!(
        podman_containers_for(&container_uuid).len(),
        1,
        "one container in Podman"
    );

    let output = cluster.berth(&token, &["cancel", &request.uuid]);
    assert!(
        output.status.success(),
        "berth cancel failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cancelled_at = std::time::Instant::now();
    wait_until(
        &cluster,
        Duration::from_secs(15),
        "the container to be Cancelled",
        || async {
            let container = carol.get_container(&container_uuid).await.ok()?;
            (container.state == ContainerState::Cancelled).then_some(())
        },
    )
    .await;
    assert!(cancelled_at.elapsed() < Duration::from_secs(15));

    wait_until(
        &cluster,
        Duration::from_secs(15),
        "the Slurm job to end",
        || async {
            let output = std::process::Command::new("squeue")
                .args(["--noheader", "--format=%T", "--name", &container_uuid])
                .output()
                .ok()?;
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(
        podman_containers_for(&container_uuid).is_empty(),
        "Podman still holds a container for {container_uuid}"
    );
    let request = carol
        .get_container_request(&request.uuid)
        .await
        .expect("get request");
    assert_eq!(request.state, RequestState::Final);
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatcher_restart_submits_nothing_twice() {
    if skip() {
        return;
    }
    let mut cluster = TestCluster::start("slurm");
    let token = cluster.create_user("dave");
    let dave = common::client(&cluster.api_url, &token);

    let request = dave
        .create_container_request(&request_body(&["sh", "-c", "sleep 6; echo finished"]))
        .await
        .expect("create request");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to run",
        || async {
            let container = dave.get_container(&container_uuid).await.ok()?;
            (container.state == ContainerState::Running).then_some(())
        },
    )
    .await;

    cluster.kill_dispatcher();
    cluster.start_dispatcher();

    let container = wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to complete",
        || async {
            let container = dave.get_container(&container_uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await;
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{}",
        cluster.logs()
    );
    assert_eq!(container.exit_code, Some(0));
    let log = dave
        .read_log(&container_uuid, "stdout", 0, None)
        .await
        .expect("read stdout log");
    assert_eq!(&log.data[..], b"finished\n");
    assert_eq!(
        slurm_jobs_named(&container_uuid).len(),
        1,
        "Slurm must have seen exactly one job for the container"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn locked_container_survives_dispatcher_restart() {
    if skip() {
        return;
    }
    let mut cluster = TestCluster::start("slurm");
    let token = cluster.create_user("erin");
    let erin = common::client(&cluster.api_url, &token);

    // Restart the dispatcher as soon as the container is locked, before
    // (or while) its job starts: the new dispatcher must find the job by
    // name rather than submit another.
    let request = erin
        .create_container_request(&request_body(&["sh", "-c", "sleep 3; echo ok"]))
        .await
        .expect("create request");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to be locked",
        || async {
            let container = erin.get_container(&container_uuid).await.ok()?;
            (container.state != ContainerState::Queued).then_some(())
        },
    )
    .await;
    wait_until(
        &cluster,
        Duration::from_secs(30),
        "the job to reach Slurm",
        || async { (!slurm_jobs_named(&container_uuid).is_empty()).then_some(()) },
    )
    .await;
    cluster.kill_dispatcher();
    cluster.start_dispatcher();

    let container = wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to complete",
        || async {
            let container = erin.get_container(&container_uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await;
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{}",
        cluster.logs()
    );
    assert_eq!(slurm_jobs_named(&container_uuid).len(), 1, "one Slurm job");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_partition_cancels_with_slurms_message() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("slurm");
    let token = cluster.create_user("nora");
    let nora = common::client(&cluster.api_url, &token);

    let mut body = request_body(&["true"]);
    body["scheduling_parameters"] = serde_json::json!({"partitions": ["no-such-partition"]});
    body["container_count_max"] = serde_json::json!(1);
    let request = nora
        .create_container_request(&body)
        .await
        .expect("create request");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    let container = wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to be cancelled",
        || async {
            let container = nora.get_container(&container_uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await;
    assert_eq!(container.state, ContainerState::Cancelled);
    let status = serde_json::to_string(&container.runtime_status).unwrap();
    assert!(
        status.contains("Invalid partition name specified"),
        "{status}\n{}",
        cluster.logs()
    );
    assert!(slurm_jobs_named(&container_uuid).is_empty());
    let request = nora.get_container_request(&request.uuid).await.unwrap();
    assert_eq!(request.state, RequestState::Final);
}
