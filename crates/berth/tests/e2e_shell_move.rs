//! `berth shell` with two controllers sharing PostgreSQL, end to end: the
//! client talks to controller 1 while the container's tunnel is held by
//! controller 2, and controller 2's graceful shutdown moves the tunnel to
//! controller 1. The supervisor dials through a TCP load balancer that
//! tries controller 2 first, as a cluster's load balancer in front of its
//! controllers would pick one. The dispatcher's local backend runs the
//! supervisor and the container runs in Podman; `berth shell` runs the
//! real OpenSSH client.
//!
//! NOTE: every process runs on loopback; the compute node is not in a
//! network namespace of its own here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::controllers::{postgres_url, SharedDatabaseCluster};
use common::{berth_command_at, podman_containers_for, skip, wait_until, ClusterOptions};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The shutdown grace period of the controllers, in seconds: shell
/// sessions open at a shutdown get this long to end.
const GRACE_SECONDS: u64 = 5;

/// Maximum time from SIGTERM to the moved tunnel's new lease.
const MOVE_LIMIT: Duration = Duration::from_secs(5);

/// Removes the test's Podman containers even when the test fails.
struct ContainerCleanup(String);

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        for name in podman_containers_for(&self.0) {
            let _ = std::process::Command::new("podman")
                .args(["rm", "--force", "--time", "0", &name])
                .output();
        }
    }
}

/// Runs `berth shell UUID -- SCRIPT` against `api_url` to its end. ssh
/// sends the command as one line, which the container's shell runs.
async fn shell(api_url: &str, token: &str, uuid: &str, script: &str) -> Output {
    tokio::process::Command::from(berth_command_at(
        api_url,
        token,
        &["shell", uuid, "--", script],
    ))
    .stdin(Stdio::null())
    .output()
    .await
    .expect("failed to run berth shell")
}

/// Runs [`shell`] until it exits with `code`, for up to 10 seconds: the
/// tunnel's lease is claimed just before its HTTP/2 handshake, so a shell
/// right after the claim may still get 503.
async fn shell_expecting(
    api_url: &str,
    token: &str,
    uuid: &str,
    script: &str,
    code: i32,
) -> Output {
    let mut output = shell(api_url, token, uuid, script).await;
    for _ in 0..20 {
        if output.status.code() == Some(code) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        output = shell(api_url, token, uuid, script).await;
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    output
}

/// A `berth shell` that runs while the test goes on, in a process group
/// of its own, which is killed if the test ends before the session.
struct OpenSession {
    child: tokio::process::Child,
    stdout: BufReader<tokio::process::ChildStdout>,
}

impl OpenSession {
    /// Starts `berth shell UUID -- SCRIPT` and waits until the
    /// script prints its first line, `started`.
    async fn start(api_url: &str, token: &str, uuid: &str, script: &str) -> OpenSession {
        let mut child = tokio::process::Command::from(berth_command_at(
            api_url,
            token,
            &["shell", uuid, "--", script],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("failed to start berth shell");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut first))
            .await
            .expect("timed out waiting for the session's first line")
            .unwrap();
        assert_eq!(first.trim(), "started", "the session printed {first:?}");
        OpenSession { child, stdout }
    }

    /// Waits for the end; returns the exit code, the rest of stdout and
    /// stderr.
    async fn finish(mut self) -> (Option<i32>, String, String) {
        let mut rest = String::new();
        let mut stderr = String::new();
        let mut stderr_pipe = self.child.stderr.take().unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(60), async {
            use tokio::io::AsyncReadExt;
            let (_, _) = tokio::join!(
                self.stdout.read_to_string(&mut rest),
                stderr_pipe.read_to_string(&mut stderr)
            );
            self.child.wait().await.unwrap()
        })
        .await
        .expect("timed out waiting for the session to end");
        (ended.code(), rest, stderr)
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        // `id` is `None` once the process has been reaped.
        if let Some(pid) = self.child.id() {
            let group = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_survives_controller_shutdown() {
    if skip() {
        return;
    }
    let Some(database_url) = postgres_url() else {
        return;
    };
    let options = ClusterOptions {
        controller: vec![
            format!("shutdown_grace_period_seconds: {GRACE_SECONDS}"),
            "tunnel_heartbeat_seconds: 1".to_string(),
        ],
        ..ClusterOptions::default()
    };
    // The load balancer tries controller 2 first, then controller 1.
    let mut cluster =
        SharedDatabaseCluster::start(&database_url, 2, &[1, 0], "local", &options).await;
    let first_url = cluster.controllers[0].url.clone();
    let second_url = cluster.controllers[1].url.clone();
    let store = cluster.store().await;

    let token = cluster.create_user("shelly");
    let shelly = common::client(&first_url, &token);
    let mut body = common::request_body(&["sleep", "600"], 1);
    body["use_existing"] = json!(false);
    let request = shelly
        .create_container_request(&body)
        .await
        .expect("create request");
    let uuid = request.container_uuid.clone().expect("container uuid");
    let _cleanup = ContainerCleanup(uuid.clone());
    common::wait_for_host_key(&cluster, &shelly, &uuid).await;
    wait_until(
        &cluster,
        Duration::from_secs(60),
        "the tunnel's lease to name controller 2",
        || async {
            let lease = store.get_tunnel(&uuid).await.unwrap()?;
            (lease.controller_url == second_url).then_some(())
        },
    )
    .await;
    let tunnel_epoch = store.get_tunnel(&uuid).await.unwrap().unwrap().epoch;

    // The client on controller 1 reaches the tunnel on controller 2.
    let output = shell_expecting(&first_url, &token, &uuid, "echo forwarded; exit 7", 7).await;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "forwarded");
    let metrics = fetch_metrics(&first_url, &cluster.system_token).await;
    assert!(
        metric(&metrics, "berth_gateway_forwards_total") >= 1,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "berth_gateway_tunnels"), 0);

    // Two sessions open across the shutdown: one ends within the grace
    // period, the other outlives it.
    let short = OpenSession::start(
        &first_url,
        &token,
        &uuid,
        "echo started; sleep 2; echo done",
    )
    .await;
    let long = OpenSession::start(
        &first_url,
        &token,
        &uuid,
        "echo started; sleep 60; echo late",
    )
    .await;

    let terminated = Instant::now();
    cluster.controllers[1].terminate();
    wait_until(
        &cluster,
        Duration::from_secs(30),
        "the tunnel's lease to name controller 1",
        || async {
            let lease = store.get_tunnel(&uuid).await.unwrap()?;
            (lease.controller_url == first_url).then_some(lease)
        },
    )
    .await;
    let moved_after = terminated.elapsed();
    assert!(
        moved_after <= MOVE_LIMIT,
        "the tunnel moved {moved_after:?} after SIGTERM\n{}",
        common::ClusterLogs::logs(&cluster)
    );
    let lease = store.get_tunnel(&uuid).await.unwrap().unwrap();
    assert!(lease.epoch > tunnel_epoch, "{lease:?}");
    eprintln!("the tunnel moved {moved_after:?} after SIGTERM");

    // A new shell works through controller 1, the tunnel's new end.
    let output = shell_expecting(&first_url, &token, &uuid, "echo moved; exit 3", 3).await;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "moved");

    // The short session finished with its output within the grace period.
    let (code, stdout, stderr) = short.finish().await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout.trim(), "done", "stderr: {stderr}");
    assert!(!stderr.contains("ssh-proxy"), "{stderr}");

    // The long session was cut at the end of the grace period, with a
    // message that gives the cause and what to do.
    let (code, stdout, stderr) = long.finish().await;
    assert_ne!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains("late"), "{stdout}");
    assert!(
        stderr.contains(
            "the controller that holds the container's tunnel shut down or lost the tunnel"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("Run the command again"), "{stderr}");

    let status = cluster.controllers[1]
        .wait_exit(Duration::from_secs(30))
        .expect("controller 2 did not exit after its grace period");
    assert!(status.success(), "controller 2 exited with {status}");
    let second_log = cluster.controllers[1].log();
    assert!(
        second_log.contains("draining the gateway: asking tunnels to move"),
        "{second_log}"
    );
    assert!(second_log.contains("tunnels=1"), "{second_log}");

    // Controller 1 took the moved tunnel as a new one.
    let metrics = fetch_metrics(&first_url, &cluster.system_token).await;
    assert_eq!(metric(&metrics, "berth_gateway_tunnels"), 1, "{metrics}");
    assert_eq!(
        metric(&metrics, "berth_gateway_tunnels_accepted_total"),
        1,
        "{metrics}"
    );
    assert!(
        cluster
            .balancer
            .forwarded_to(cluster.controllers[0].address)
            > 0
    );

    shelly
        .update_container_request(&request.uuid, &json!({"priority": 0}))
        .await
        .unwrap();
}

async fn fetch_metrics(api_url: &str, system_token: &str) -> String {
    reqwest::Client::new()
        .get(format!("{}metrics", api_url))
        .bearer_auth(system_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}
