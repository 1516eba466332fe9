//! Secret mounts end to end with the local backend: the supervisor fetches
//! them with the container's own token and the container reads them, while
//! no record, list or supervisor log shows them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_core::ContainerState;
use common::{skip, test_image, wait_until, TestCluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn secret_mount_reaches_the_container_only() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("lena");
    let lena = common::client(&cluster.api_url, &token);
    let marker = "marker-6f1c2a9e-secret";

    let request = lena
        .create_container_request(&json!({
            "state": "Committed",
            "priority": 1,
            "container_image": test_image(),
            "command": ["cat", "/etc/berth/secret.txt"],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "secret_mounts": {"/etc/berth/secret.txt": {"kind": "text", "content": marker}},
            "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
            "use_existing": false,
        }))
        .await
        .expect("create request");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    let container = wait_until(
        &cluster,
        Duration::from_secs(120),
        "the container to finish",
        || async {
            let container = lena.get_container(&container_uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await;
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{:?}\n{}",
        container.runtime_status,
        cluster.logs()
    );
    assert_eq!(container.exit_code, Some(0));

    let stdout = lena
        .read_log(&container_uuid, "stdout", 0, None)
        .await
        .expect("read stdout");
    assert_eq!(stdout.data.as_ref(), marker.as_bytes());
    let supervisor_log = lena
        .read_log(&container_uuid, "supervisor", 0, None)
        .await
        .expect("read the supervisor log");
    let supervisor_log = String::from_utf8_lossy(&supervisor_log.data);
    assert!(!supervisor_log.contains(marker), "{supervisor_log}");

    let stored = lena.get_container_request(&request.uuid).await.unwrap();
    let stored_json = serde_json::to_string(&stored).unwrap();
    assert!(!stored_json.contains(marker), "{stored_json}");
    assert!(!cluster.logs().contains(marker));
}
