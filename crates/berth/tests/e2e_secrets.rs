//! Secret mounts end to end with the local backend: the supervisor fetches
//! them with the container's own token and the container reads them, while
//! no record, list, log stream, log collection or process log shows them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use berth_core::ContainerState;
use common::{skip, test_image, wait_until, TestCluster};
use serde_json::json;
use sha2::{Digest, Sha256};

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

/// Returns every file under `root`, by path, for searching.
fn read_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_mount_reaches_no_log_or_answer() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("sven");
    let sven = common::client(&cluster.api_url, &token);
    let text_secret = "text-secret-0b9d4e71c3";
    let json_secret = "json-secret-5a2f80c6e4";

    // The container prints only digests, never the secrets themselves.
    let script = "sha256sum /etc/berth/secret.txt | cut -d' ' -f1 > /out/secret.sha256 \
        && sha256sum /etc/berth/secret.json | cut -d' ' -f1 > /out/secret-json.sha256 \
        && ls -l /etc/berth \
        && echo done >&2";
    let request = sven
        .create_container_request(&json!({
            "state": "Committed",
            "priority": 1,
            "container_image": test_image(),
            "command": ["sh", "-c", script],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "secret_mounts": {
                "/etc/berth/secret.txt": {"kind": "text", "content": text_secret},
                "/etc/berth/secret.json": {"kind": "json", "content": {"password": json_secret}},
            },
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
            let container = sven.get_container(&container_uuid).await.ok()?;
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

    // The container read both secrets: the output contains their digests.
    let work = tempfile::tempdir().unwrap();
    let output_dir = work.path().join("output");
    let fetched = cluster.berth(
        &token,
        &[
            "get",
            container.output.as_deref().unwrap(),
            output_dir.to_str().unwrap(),
        ],
    );
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let text_digest = hex::encode(Sha256::digest(text_secret.as_bytes()));
    assert_eq!(
        std::fs::read_to_string(output_dir.join("secret.sha256")).unwrap(),
        format!("{text_digest}\n")
    );
    let json_content = serde_json::to_vec(&json!({"password": json_secret})).unwrap();
    let json_digest = hex::encode(Sha256::digest(&json_content));
    assert_eq!(
        std::fs::read_to_string(output_dir.join("secret-json.sha256")).unwrap(),
        format!("{json_digest}\n")
    );

    let mut searched: Vec<(String, Vec<u8>)> = Vec::new();
    for stream in ["supervisor", "stdout", "stderr"] {
        let chunk = sven
            .read_log(&container_uuid, stream, 0, None)
            .await
            .expect("read a log stream");
        searched.push((format!("live log {stream}"), chunk.data.to_vec()));
    }
    // The log collection: crunch-run.txt, stdout.txt, stderr.txt and
    // node-info.txt.
    let log_dir = work.path().join("log");
    let fetched = cluster.berth(
        &token,
        &[
            "get",
            container.log.as_deref().expect("the log is set"),
            log_dir.to_str().unwrap(),
        ],
    );
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let log_files = read_tree(&log_dir);
    assert!(
        log_files
            .iter()
            .any(|(path, _)| path.ends_with("crunch-run.txt")),
        "{:?}",
        log_files.iter().map(|(path, _)| path).collect::<Vec<_>>()
    );
    searched.extend(log_files);
    searched.extend(read_tree(&output_dir));
    // The processes' own logs: controller, dispatcher, and the supervisor's
    // stderr, all in the cluster's directory.
    searched.extend(
        read_tree(cluster.dir.path())
            .into_iter()
            .filter(|(path, _)| path.ends_with(".log")),
    );
    // API responses other than the container's own secret_mounts call, as
    // the controller sends them.
    let base = berth_client::parse_api_host(&cluster.api_url).unwrap();
    let http = reqwest::Client::new();
    for path in [
        format!("arvados/v1/containers/{container_uuid}"),
        format!("arvados/v1/container_requests/{}", request.uuid),
        "arvados/v1/containers".to_string(),
        "arvados/v1/container_requests".to_string(),
    ] {
        let response = http
            .get(base.join(&path).unwrap())
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        let body = response.bytes().await.unwrap().to_vec();
        searched.push((format!("GET {path}"), body));
    }
    assert!(searched.len() > 10, "{}", searched.len());
    for (source, data) in &searched {
        for secret in [text_secret, json_secret] {
            assert!(
                !contains(data, secret),
                "{source} contains the secret {secret}"
            );
        }
    }

    // The owner's own token may not read the secret mounts: only the
    // container's token may, and that token is revoked once it is final.
    let denied = sven.container_secret_mounts(&container_uuid).await;
    assert!(denied.is_err(), "{denied:?}");
}
