//! End to end: output and log collections, with the controller, the
//! dispatcher and `berth supervise` running containers in Podman. Blocks
//! are 1 KiB here, so small files already span several blocks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use berth_client::Client;
use berth_core::manifest::Manifest;
use berth_core::ContainerState;
use common::{test_image, wait_until, ClusterOptions, TestCluster};
use serde_json::json;

const BLOCK_SIZE: usize = 1024;

fn options() -> ClusterOptions {
    ClusterOptions {
        supervisor: vec![
            format!("block_size: {BLOCK_SIZE}"),
            "log_checkpoint_interval: 1s".to_string(),
        ],
        ..ClusterOptions::default()
    }
}

/// Reads every file under `root` into a map from its relative path.
fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_str().unwrap();
                files.insert(relative.to_string(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Downloads a whole collection with `berth get` into a new directory.
fn berth_get(
    cluster: &TestCluster,
    token: &str,
    pdh: &str,
    dest: &Path,
) -> BTreeMap<String, Vec<u8>> {
    let output = cluster.berth(token, &["get", pdh, dest.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "berth get {pdh} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    read_tree(dest)
}

/// Reads a container's whole live log stream through the API.
async fn live_log(client: &Client, uuid: &str, stream: &str) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let chunk = client
            .read_log(uuid, stream, data.len() as u64, None)
            .await
            .unwrap();
        if chunk.data.is_empty() {
            return data;
        }
        data.extend_from_slice(&chunk.data);
    }
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

fn request(command: &str, output_glob: serde_json::Value) -> serde_json::Value {
    json!({
        "state": "Committed",
        "priority": 1,
        "container_image": test_image(),
        "command": ["sh", "-c", command],
        "output_path": "/out",
        "output_glob": output_glob,
        "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
    })
}

/// Returns what `seq 1 2000` prints: 8893 bytes, nine 1 KiB blocks.
fn numbers() -> Vec<u8> {
    (1..=2000)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn output_and_log_collections_are_byte_exact() {
    if common::skip() {
        return;
    }
    let cluster = TestCluster::start_with("local", &options());
    let token = cluster.create_user("olga");
    let olga = common::client(&cluster.api_url, &token);

    // The sleep lets at least one log checkpoint happen while it runs.
    let script = "mkdir -p /out/sub /out/empty \
        && echo hello > /out/a.txt \
        && printf nested > /out/sub/b.txt \
        && seq 1 2000 > /out/numbers.txt \
        && ln -s a.txt /out/alias \
        && ln -s /etc/passwd /out/passwd \
        && ln -s ../../../../../../../../etc/passwd /out/sub/up \
        && for i in 1 2 3; do echo line $i; done \
        && echo to-stderr >&2 \
        && sleep 3 \
        && echo done";
    let request = olga
        .create_container_request(&request(script, json!([])))
        .await
        .unwrap();
    let uuid = request.container_uuid.clone().unwrap();
    let checkpoint = wait_until(
        &cluster,
        Duration::from_secs(90),
        "a log checkpoint while the container runs",
        || async {
            let container = olga.get_container(&uuid).await.ok()?;
            if container.state.is_final() {
                panic!("the container ended before a log checkpoint: {container:?}");
            }
            (container.state == ContainerState::Running)
                .then_some(container.log)
                .flatten()
        },
    )
    .await;
    let container = wait_until(
        &cluster,
        Duration::from_secs(60),
        "the container to end",
        || async {
            let container = olga.get_container(&uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await;
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{container:?}\n{}",
        cluster.logs()
    );
    assert_eq!(container.exit_code, Some(0));

    let output_pdh = container.output.clone().expect("the output is set");
    let dest = tempfile::tempdir().unwrap();
    let files = berth_get(&cluster, &token, &output_pdh, &dest.path().join("out"));
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["a.txt", "alias", "numbers.txt", "sub/b.txt"],
        "the output collection's files; the links to /etc/passwd must be left out"
    );
    assert_eq!(files["a.txt"], b"hello\n");
    assert_eq!(
        files["alias"], b"hello\n",
        "a link inside is stored as its target"
    );
    assert!(files["numbers.txt"] == numbers(), "numbers.txt differs");
    assert_eq!(files["sub/b.txt"], b"nested");
    assert!(
        dest.path().join("out/empty").is_dir(),
        "the empty directory is kept"
    );

    let collection = olga.get_collection(&output_pdh).await.unwrap();
    let manifest = Manifest::parse(&collection.manifest_text).unwrap();
    let numbers_file = manifest
        .file("numbers.txt")
        .expect("numbers.txt in the manifest");
    assert!(
        numbers_file.segments.len() >= numbers().len() / BLOCK_SIZE,
        "numbers.txt spans blocks: {:?}",
        numbers_file.segments
    );
    assert!(manifest
        .locators()
        .all(|locator| locator.size() <= BLOCK_SIZE as u64));

    let supervisor_log = String::from_utf8(live_log(&olga, &uuid, "supervisor").await).unwrap();
    assert!(
        supervisor_log.contains("skipped symbolic link passwd")
            && supervisor_log.contains("skipped symbolic link sub/up"),
        "the supervisor log names the skipped links:\n{supervisor_log}"
    );

    let log_pdh = container.log.clone().expect("the log is set");
    assert_ne!(
        Some(log_pdh.clone()),
        checkpoint.into(),
        "the final log differs from the checkpoint"
    );
    let logs = berth_get(&cluster, &token, &log_pdh, &dest.path().join("log"));
    let names: Vec<&str> = logs.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "crunch-run.txt",
            "crunchstat.txt",
            "node-info.txt",
            "stderr.txt",
            "stdout.txt"
        ]
    );
    let live_stdout = live_log(&olga, &uuid, "stdout").await;
    assert_eq!(live_stdout, b"line 1\nline 2\nline 3\ndone\n");
    assert_eq!(
        logs["stdout.txt"], live_stdout,
        "stdout.txt matches the live log"
    );
    assert_eq!(logs["stderr.txt"], live_log(&olga, &uuid, "stderr").await);
    assert_eq!(logs["crunch-run.txt"], supervisor_log.as_bytes());
    let node_info = String::from_utf8_lossy(&logs["node-info.txt"]);
    assert!(node_info.contains("MemTotal"), "{node_info}");
}

#[tokio::test(flavor = "multi_thread")]
async fn output_glob_keeps_matching_files_on_slurm() {
    if common::skip() {
        return;
    }
    let cluster = TestCluster::start_with("slurm", &options());
    let token = cluster.create_user("gwen");
    let gwen = common::client(&cluster.api_url, &token);

    let script = "mkdir -p /out/keep/deep /out/other \
        && echo a > /out/a.txt \
        && echo b > /out/b.dat \
        && echo x > /out/keep/x.bin \
        && seq 1 2000 > /out/keep/deep/numbers \
        && echo z > /out/other/z.txt";
    let container = run_to_end(
        &cluster,
        &gwen,
        request(script, json!(["*.txt", "keep/**"])),
    )
    .await;
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{container:?}\n{}",
        cluster.logs()
    );
    let output_pdh = container.output.clone().expect("the output is set");
    let dest = tempfile::tempdir().unwrap();
    let files = berth_get(&cluster, &token, &output_pdh, &dest.path().join("out"));
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(names, ["a.txt", "keep/deep/numbers", "keep/x.bin"]);
    assert!(
        files["keep/deep/numbers"] == numbers(),
        "keep/deep/numbers differs"
    );
}
