//! End to end with `supervisor.runtime: oci`: the controller, the local
//! backend and `berth supervise` running containers with crun on a bundle
//! unpacked from the test image's `docker save` archive.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_client::Client;
use berth_core::ContainerState;
use common::{wait_until, ClusterOptions, TestCluster};
use serde_json::json;

fn test_image_archive() -> PathBuf {
    std::env::var_os("BERTH_TEST_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/berth/test-image/busybox.tar"))
}

/// Runs a request to its end and returns the container.
async fn run_to_end(
    cluster: &TestCluster,
    client: &Client,
    request: serde_json::Value,
) -> berth_core::Container {
    let request = client.create_container_request(&request).await.unwrap();
    let uuid = request.container_uuid.clone().unwrap();
    wait_until(
        cluster,
        Duration::from_secs(90),
        "the container to end",
        || async {
            let container = client.get_container(&uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await
}

async fn live_log(client: &Client, uuid: &str, stream: &str) -> String {
    let mut data = Vec::new();
    loop {
        let chunk = client
            .read_log(uuid, stream, data.len() as u64, None)
            .await
            .unwrap();
        if chunk.data.is_empty() {
            return String::from_utf8_lossy(&data).into_owned();
        }
        data.extend_from_slice(&chunk.data);
    }
}

fn request(archive: &Path, command: &str) -> serde_json::Value {
    json!({
        "state": "Committed",
        "priority": 1,
        "container_image": archive.display().to_string(),
        "command": ["sh", "-c", command],
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_runtime_runs_archive_containers() {
    if common::skip() {
        return;
    }
    let archive = test_image_archive();
    let archive_dir = archive.parent().unwrap().to_path_buf();
    let cache = tempfile::tempdir().unwrap();
    let options = ClusterOptions {
        supervisor: vec![
            "runtime: oci".to_string(),
            format!("image_cache_dir: {}", cache.path().display()),
            format!("image_archive_dirs: [{}]", archive_dir.display()),
        ],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start_with("local", &options);
    let token = cluster.create_user("oskar");
    let oskar = common::client(&cluster.api_url, &token);

    let first = run_to_end(
        &cluster,
        &oskar,
        request(
            &archive,
            "echo from-crun > /out/result.txt; echo done; exit 3",
        ),
    )
    .await;
    assert_eq!(
        first.state,
        ContainerState::Complete,
        "{first:?}\n{}",
        cluster.logs()
    );
    assert_eq!(first.exit_code, Some(3));
    assert_eq!(live_log(&oskar, &first.uuid, "stdout").await, "done\n");
    let supervisor_log = live_log(&oskar, &first.uuid, "supervisor").await;
    assert!(
        supervisor_log.contains("container runtime: OCI runtime"),
        "{supervisor_log}"
    );
    let output = first.output.clone().expect("the output is set");
    let dest = tempfile::tempdir().unwrap();
    let got = cluster.berth(
        &token,
        &["get", &output, dest.path().join("out").to_str().unwrap()],
    );
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(
        std::fs::read(dest.path().join("out/result.txt")).unwrap(),
        b"from-crun\n"
    );

    // The second container on the node reuses the unpacked image.
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.path().join("rootfs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let inode = std::fs::metadata(&entries[0]).unwrap().ino();
    let second = run_to_end(
        &cluster,
        &oskar,
        request(&archive, "cat /out/result.txt 2>&1; true"),
    )
    .await;
    assert_eq!(second.state, ContainerState::Complete, "{second:?}");
    assert_eq!(second.exit_code, Some(0));
    assert_eq!(std::fs::metadata(&entries[0]).unwrap().ino(), inode);

    // An image by name cannot run on the OCI runtime.
    let mut by_name = request(&archive, "true");
    by_name["container_image"] = json!("localhost/busybox:latest");
    let refused = run_to_end(&cluster, &oskar, by_name).await;
    assert_eq!(refused.state, ContainerState::Cancelled);
    let error = refused.runtime_status["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("docker save"), "{error}");
}
