//! End to end: the final state survives a controller outage and a killed
//! supervisor through the journal, and the cancellation watch stops a
//! container whose batch-system signal never comes. Real Podman, a real
//! controller, and `berth supervise` as its own process: in a Slurm job
//! for the outage, and started by the test where no dispatcher may
//! interfere.
//!
//! The supervisors here give up on ordinary calls after 2 s, so an
//! outage of a few seconds already sends the output and log files into
//! the journal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_client::{Client, JobCredentials};
use berth_core::manifest::Manifest;
use berth_core::{Container, ContainerState};
use common::{test_image, wait_until, ClusterOptions, TestCluster};
use serde_json::json;

fn options() -> ClusterOptions {
    ClusterOptions {
        supervisor: vec![
            "block_size: 1024".to_string(),
            "api_retry_timeout: 2s".to_string(),
            "log_retry_timeout: 2s".to_string(),
            "final_retry_max_delay: 1s".to_string(),
            "log_checkpoint_interval: 1s".to_string(),
            "cancel_check_interval: 1s".to_string(),
            "stop_timeout: 2s".to_string(),
        ],
        ..ClusterOptions::default()
    }
}

/// Sleeps, then writes output and both logs, and exits 3.
const SCRIPT: &str = "sleep 4 \
    && echo out-line \
    && echo err-line >&2 \
    && echo result > /out/result.txt \
    && seq 1 500 > /out/numbers.txt \
    && exit 3";

fn request(command: &str) -> serde_json::Value {
    json!({
        "state": "Committed",
        "priority": 1,
        "container_image": test_image(),
        "command": ["sh", "-c", command],
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
    })
}

/// Reads a whole collection's files through the API.
async fn collection_files(client: &Client, pdh: &str) -> BTreeMap<String, Vec<u8>> {
    let collection = client.get_collection(pdh).await.unwrap();
    let manifest = Manifest::parse(&collection.manifest_text).unwrap();
    let mut files = BTreeMap::new();
    for file in manifest.files() {
        let mut data = Vec::new();
        for segment in &file.segments {
            let block = client
                .get_block(&segment.locator.to_string())
                .await
                .unwrap();
            let start = segment.offset as usize;
            data.extend_from_slice(&block[start..start + segment.length as usize]);
        }
        files.insert(file.path.clone(), data);
    }
    files
}

/// Waits for the container's final state.
async fn wait_final(
    cluster: &TestCluster,
    client: &Client,
    uuid: &str,
    limit: Duration,
) -> Container {
    wait_until(cluster, limit, "the container's final state", || async {
        let container = client.get_container(uuid).await.ok()?;
        container.state.is_final().then_some(container)
    })
    .await
}

async fn wait_running(cluster: &TestCluster, client: &Client, uuid: &str) {
    wait_until(
        cluster,
        Duration::from_secs(90),
        "the container to run",
        || async {
            let container = client.get_container(uuid).await.ok()?;
            (container.state == ContainerState::Running).then_some(())
        },
    )
    .await;
}

/// Waits for the journal entry of `uuid` to contain everything: the
/// supervisor writes it first with the final state and output, and adds
/// the log files once saving them failed.
async fn wait_for_entry(cluster: &TestCluster, uuid: &str) -> PathBuf {
    let entry = cluster.journal_dir().join(uuid);
    let file = entry.join("entry.json");
    wait_until(
        cluster,
        Duration::from_secs(90),
        "the journal entry with its log",
        || async {
            let text = std::fs::read(&file).ok()?;
            let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
            (value["log"]["kind"] == "pending").then_some(())
        },
    )
    .await;
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(value["output"]["kind"], "pending", "{value}");
    assert_eq!(value["attributes"]["exit_code"], 3, "{value}");
    entry
}

/// Checks the final state, output and log collection of a run of
/// [`SCRIPT`].
async fn check_delivered(client: &Client, container: &Container) {
    assert_eq!(container.state, ContainerState::Complete, "{container:?}");
    assert_eq!(container.exit_code, Some(3));

    let output_pdh = container.output.as_deref().expect("an output collection");
    let output = collection_files(client, output_pdh).await;
    let numbers: String = (1..=500).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        output.keys().collect::<Vec<_>>(),
        ["numbers.txt", "result.txt"]
    );
    assert_eq!(output["result.txt"], b"result\n");
    assert_eq!(output["numbers.txt"], numbers.as_bytes());

    let log_pdh = container.log.as_deref().expect("a log collection");
    let log = collection_files(client, log_pdh).await;
    assert_eq!(log["stdout.txt"], b"out-line\n");
    assert_eq!(log["stderr.txt"], b"err-line\n");
    let supervisor_log = String::from_utf8_lossy(&log["crunch-run.txt"]);
    assert!(
        supervisor_log.contains("exited with status 3"),
        "{supervisor_log}"
    );
    assert!(log.contains_key("node-info.txt"), "{:?}", log.keys());
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_outage_loses_nothing() {
    if common::skip() {
        return;
    }
    let mut cluster = TestCluster::start_with("slurm", &options());
    let token = cluster.create_user("olga");
    let olga = common::client(&cluster.api_url, &token);
    let request = olga
        .create_container_request(&request(SCRIPT))
        .await
        .unwrap();
    let uuid = request.container_uuid.clone().unwrap();
    wait_running(&cluster, &olga, &uuid).await;

    cluster.stop_controller();
    // The container exits while the controller is down, and the
    // supervisor keeps the output and logs it could not upload.
    let entry = wait_for_entry(&cluster, &uuid).await;
    assert_eq!(
        std::fs::read(entry.join("output/result.txt")).unwrap(),
        b"result\n"
    );
    assert!(entry.join("log/stdout.txt").exists());
    cluster.restart_controller();

    let container = wait_final(&cluster, &olga, &uuid, Duration::from_secs(60)).await;
    check_delivered(&olga, &container).await;
    wait_until(
        &cluster,
        Duration::from_secs(10),
        "the entry's removal",
        || async { (!entry.exists()).then_some(()) },
    )
    .await;
}

/// Starts a cluster and stops its dispatcher, so that supervisors run
/// only when a test starts them and no batch-system signal reaches them.
/// Returns the cluster and a user's client.
fn cluster_without_dispatcher() -> (TestCluster, Client) {
    let mut cluster = TestCluster::start_with("local", &options());
    cluster.kill_dispatcher();
    let token = cluster.create_user("olga");
    let olga = common::client(&cluster.api_url, &token);
    (cluster, olga)
}

/// Runs `berth supervise --deliver-journal` on the cluster's configuration.
fn deliver_journal(cluster: &TestCluster) -> std::process::Output {
    Command::new(common::berth_bin())
        .args(["supervise", "--deliver-journal", "--config"])
        .arg(&cluster.config)
        .output()
        .unwrap()
}

/// A container locked with the system token, and its credentials file,
/// for a supervisor started without the dispatcher.
struct Locked {
    uuid: String,
    credentials: PathBuf,
}

/// Creates a request for `command` and locks its container as the
/// dispatcher would, writing the credentials file.
async fn create_and_lock(cluster: &TestCluster, owner: &Client, command: &str) -> Locked {
    let request = owner
        .create_container_request(&request(command))
        .await
        .unwrap();
    let uuid = request.container_uuid.clone().unwrap();
    let locked = cluster.system_client().lock_container(&uuid).await.unwrap();
    let credentials = JobCredentials {
        container_uuid: uuid.clone(),
        api_url: berth_client::parse_api_host(&cluster.api_url).unwrap(),
        insecure: false,
        api_token: locked.credentials.api_token.clone(),
        gateway_secret: locked.credentials.gateway_secret.clone(),
    };
    let dir = cluster.dir.path().join("test-credentials");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{uuid}.json"));
    credentials.write(&path).unwrap();
    Locked {
        uuid,
        credentials: path,
    }
}

/// Starts `berth supervise` for a locked container, logging to
/// `supervise-<name>.log` in the cluster's directory.
fn spawn_supervisor(cluster: &TestCluster, locked: &Locked, name: &str) -> Child {
    Command::new(common::berth_bin())
        .args(["supervise", "--config"])
        .arg(&cluster.config)
        .arg("--credentials")
        .arg(&locked.credentials)
        .arg(&locked.uuid)
        .stdout(Stdio::null())
        .stderr(log_file(cluster.dir.path(), name))
        .spawn()
        .expect("failed to start berth supervise")
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("supervise-{name}.log"))).unwrap())
}

fn read_log(cluster: &TestCluster, name: &str) -> String {
    std::fs::read_to_string(cluster.dir.path().join(format!("supervise-{name}.log")))
        .unwrap_or_default()
}

/// Runs [`SCRIPT`] under a supervisor without a dispatcher, stops the
/// controller until the journal entry is written, kills the supervisor,
/// and starts the controller again. Returns the locked container.
async fn entry_of_a_killed_supervisor(cluster: &mut TestCluster, owner: &Client) -> Locked {
    let locked = create_and_lock(cluster, owner, SCRIPT).await;
    let mut supervisor = spawn_supervisor(cluster, &locked, "first");
    wait_running(cluster, owner, &locked.uuid).await;
    cluster.stop_controller();
    wait_for_entry(cluster, &locked.uuid).await;
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    cluster.restart_controller();
    let container = owner.get_container(&locked.uuid).await.unwrap();
    assert_eq!(
        container.state,
        ContainerState::Running,
        "nothing delivered the entry yet"
    );
    locked
}

#[tokio::test(flavor = "multi_thread")]
async fn deliver_journal_delivers_a_killed_supervisors_entry() {
    if common::skip() {
        return;
    }
    let (mut cluster, olga) = cluster_without_dispatcher();
    let locked = entry_of_a_killed_supervisor(&mut cluster, &olga).await;

    let output = deliver_journal(&cluster);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "berth supervise --deliver-journal failed: {stderr}"
    );

    let container = olga.get_container(&locked.uuid).await.unwrap();
    check_delivered(&olga, &container).await;
    assert!(!cluster.journal_dir().join(&locked.uuid).exists());

    // A second run finds nothing left and succeeds.
    let again = deliver_journal(&cluster);
    assert!(again.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_supervisor_delivers_its_own_entry() {
    if common::skip() {
        return;
    }
    let (mut cluster, olga) = cluster_without_dispatcher();
    let locked = entry_of_a_killed_supervisor(&mut cluster, &olga).await;

    let status = spawn_supervisor(&cluster, &locked, "second")
        .wait()
        .unwrap();
    let log = read_log(&cluster, "second");
    assert!(status.success(), "the second supervisor failed: {log}");
    assert!(
        log.contains("delivering it instead of running the container"),
        "{log}"
    );
    assert!(
        common::podman_containers_for(&locked.uuid).is_empty(),
        "the container ran again"
    );
    let container = olga.get_container(&locked.uuid).await.unwrap();
    check_delivered(&olga, &container).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn next_supervisor_on_node_delivers_entry() {
    if common::skip() {
        return;
    }
    let (mut cluster, olga) = cluster_without_dispatcher();
    let locked = entry_of_a_killed_supervisor(&mut cluster, &olga).await;

    // Another container's supervisor delivers the entry in the background
    // while its own container runs.
    let other = create_and_lock(&cluster, &olga, "sleep 5").await;
    let mut supervisor = spawn_supervisor(&cluster, &other, "other");
    let container = wait_until(
        &cluster,
        Duration::from_secs(60),
        "the entry's delivery",
        || async {
            let container = olga.get_container(&locked.uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await;
    check_delivered(&olga, &container).await;
    assert!(!cluster.journal_dir().join(&locked.uuid).exists());

    let status = supervisor.wait().unwrap();
    let log = read_log(&cluster, "other");
    assert!(status.success(), "{log}");
    let own = olga.get_container(&other.uuid).await.unwrap();
    assert_eq!(own.state, ContainerState::Complete);
    assert_eq!(own.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn entry_of_a_final_container_is_ended() {
    if common::skip() {
        return;
    }
    let (mut cluster, olga) = cluster_without_dispatcher();
    let locked = entry_of_a_killed_supervisor(&mut cluster, &olga).await;
    // The container is cancelled meanwhile, as the dispatcher does when a
    // job ends without a final state. That revokes the container's token.
    cluster
        .system_client()
        .update_container(&locked.uuid, &json!({"state": "Cancelled"}))
        .await
        .unwrap();

    let output = deliver_journal(&cluster);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("ended the journal entry without recording its final state"),
        "{stderr}"
    );
    assert!(!cluster.journal_dir().join(&locked.uuid).exists());
    let container = olga.get_container(&locked.uuid).await.unwrap();
    assert_eq!(container.state, ContainerState::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_zero_stops_a_container_without_a_signal() {
    if common::skip() {
        return;
    }
    // No dispatcher, so no batch-system signal reaches the supervisor.
    let (cluster, olga) = cluster_without_dispatcher();
    let locked = create_and_lock(&cluster, &olga, "sleep 300").await;
    let mut supervisor = spawn_supervisor(&cluster, &locked, "watch");
    wait_running(&cluster, &olga, &locked.uuid).await;
    let request = olga
        .list_container_requests(&berth_client::ListParams::with_filters(json!([[
            "container_uuid",
            "=",
            locked.uuid
        ]])))
        .await
        .unwrap()
        .items
        .remove(0);

    olga.update_container_request(&request.uuid, &json!({"priority": 0}))
        .await
        .unwrap();
    let container = wait_final(&cluster, &olga, &locked.uuid, Duration::from_secs(30)).await;

    let log = read_log(&cluster, "watch");
    assert_eq!(container.state, ContainerState::Cancelled, "{log}");
    let error = container
        .runtime_status
        .get("error")
        .and_then(|error| error.as_str())
        .unwrap_or_default();
    assert!(
        error.contains("priority is 0"),
        "runtime_status: {:?}",
        container.runtime_status
    );
    let status = supervisor.wait().unwrap();
    assert!(status.success(), "{log}");
    assert!(common::podman_containers_for(&locked.uuid).is_empty());
}
