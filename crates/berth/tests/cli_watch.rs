//! The user commands hear of changes through the controller's change feed:
//! `berth logs -f` and `berth run` stop when the request they follow is
//! cancelled while its container waits in the queue. The dispatcher is
//! stopped, so the container stays Queued.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use berth_core::ContainerState;
use common::{skip, test_image, ClusterOptions, TestCluster};
use serde_json::json;

/// The route of the change feed, as the controller's request log names it.
const FEED_ROUTE: &str = "/arvados/v1/containers/changes";

/// Maximum time a command may take to notice the cancel: more than the CLI's
/// feed wait (10 s), far less than a test timeout.
const NOTICE_LIMIT: Duration = Duration::from_secs(20);

/// Waits for a child to exit, or kills it and panics after `limit`.
fn wait_for_exit(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child
        .try_wait()
        .expect("failed to poll the child")
        .is_none()
    {
        if Instant::now() > deadline {
            child.kill().ok();
            let output = child.wait_with_output().expect("failed to reap the child");
            panic!(
                "{what} did not exit within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("failed to reap the child")
}

fn committed() -> serde_json::Value {
    json!({
        "state": "Committed",
        "priority": 1,
        "container_image": test_image(),
        "command": ["true"],
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
        "use_existing": false,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_stops_when_queued_request_is_finalized() {
    if skip() {
        return;
    }
    let mut cluster = TestCluster::start("local");
    cluster.kill_dispatcher();
    let token = cluster.create_user("jules");
    let jules = common::client(&cluster.api_url, &token);
    let request = jules
        .create_container_request(&committed())
        .await
        .expect("create request");
    let container = jules
        .get_container(request.container_uuid.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(container.state, ContainerState::Queued);

    let follower = cluster
        .berth_command(&token, &["logs", "-f", &request.uuid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start berth logs -f");
    // Give the follower time to start its reads; the request stays
    // Committed meanwhile, so it must keep following.
    tokio::time::sleep(Duration::from_secs(2)).await;
    jules
        .update_container_request(&request.uuid, &json!({"state": "Final"}))
        .await
        .expect("finalize the request");

    let output = wait_for_exit(follower, NOTICE_LIMIT, "berth logs -f");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("is Final"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_stops_when_cancelled_from_another_shell() {
    if skip() {
        return;
    }
    let mut cluster = TestCluster::start("local");
    cluster.kill_dispatcher();
    let token = cluster.create_user("kim");
    let kim = common::client(&cluster.api_url, &token);

    let run = cluster
        .berth_command(&token, &["run", &test_image(), "--", "true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start berth run");
    let request = common::wait_until(&cluster, Duration::from_secs(30), "the request", || {
        let kim = &kim;
        async move {
            let page = kim
                .list_container_requests(&Default::default())
                .await
                .ok()?;
            page.items.into_iter().next()
        }
    })
    .await;
    let cancel = cluster.berth(&token, &["cancel", &request.uuid]);
    assert!(
        cancel.status.success(),
        "berth cancel: {}",
        String::from_utf8_lossy(&cancel.stderr)
    );

    let output = wait_for_exit(run, NOTICE_LIMIT, "berth run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cancel"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_goes_on_into_a_retried_container() {
    if skip() {
        return;
    }
    let mut cluster = TestCluster::start_with(
        "local",
        &ClusterOptions {
            log_requests: true,
            ..ClusterOptions::default()
        },
    );
    cluster.kill_dispatcher();
    let token = cluster.create_user("mona");
    let mona = common::client(&cluster.api_url, &token);
    let mut attributes = committed();
    attributes["container_count_max"] = json!(2);
    let request = mona
        .create_container_request(&attributes)
        .await
        .expect("create request");
    let first = request.container_uuid.clone().unwrap();

    let follower = cluster
        .berth_command(&token, &["logs", "-f", &request.uuid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start berth logs -f");
    // The follower has found the request's container once it takes a
    // cursor of the change feed.
    common::wait_until(
        &cluster,
        Duration::from_secs(20),
        "the follower to start",
        || {
            let calls = cluster.count_requests("GET", FEED_ROUTE);
            async move { (calls > 0).then_some(()) }
        },
    )
    .await;

    // The system cancels the container: the request gets a second one,
    // its last, which the system cancels too.
    let system = cluster.system_client();
    system
        .update_container(&first, &json!({"state": "Cancelled"}))
        .await
        .expect("cancel the first container");
    let retried = mona.get_container_request(&request.uuid).await.unwrap();
    let second = retried.container_uuid.clone().unwrap();
    assert_ne!(second, first);
    system
        .update_container(&second, &json!({"state": "Cancelled"}))
        .await
        .expect("cancel the second container");

    let output = wait_for_exit(follower, NOTICE_LIMIT, "berth logs -f");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("runs it again as container {second}")),
        "{stderr}"
    );
}
