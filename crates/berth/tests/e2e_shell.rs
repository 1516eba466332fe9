//! `berth shell` end to end on one host. The dispatcher's local backend
//! runs the supervisor, whose gateway dials its tunnel to the controller.
//! `berth shell` runs the real OpenSSH client with `berth ssh-proxy` as
//! its ProxyCommand, and the command runs in the Podman container. Plain
//! `scp` with the `berth ssh-config` snippet copies a file in and out.
//!
//! NOTE: this test runs on loopback; the test with the compute node in a
//! network namespace that the controller cannot reach is not written yet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{skip, test_image, TestCluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn shell_runs_a_command_in_the_container() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("shelly");
    let shelly = common::client(&cluster.api_url, &token);
    let request = shelly
        .create_container_request(&json!({
            "state": "Committed",
            "priority": 1,
            "container_image": test_image(),
            "command": ["sleep", "600"],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
            "use_existing": false,
        }))
        .await
        .expect("create request");
    let uuid = request.container_uuid.clone().expect("container uuid");
    common::wait_for_host_key(&cluster, &shelly, &uuid).await;

    // The tunnel dials once the gateway is ready, so the first shell may
    // find it not yet connected (503): try for a while.
    let mut last = None;
    for _ in 0..60 {
        let output = cluster
            .berth_command(
                &token,
                &[
                    "shell",
                    &uuid,
                    "--",
                    "cat /etc/os-release 2>/dev/null || echo no-os-release; exit 7",
                ],
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if output.status.code() == Some(7) {
            last = Some(output);
            break;
        }
        last = Some(output);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let output = last.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "stderr: {stderr}");

    // The test image has no /etc/os-release, while the host has one.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.trim(), "no-os-release", "stderr: {stderr}");
    assert!(std::path::Path::new("/etc/os-release").exists());

    check_scp_through_ssh_config(&cluster, &token, &uuid);

    let other = cluster.create_user("mallory");
    let refused = cluster
        .berth_command(&other, &["shell", &uuid, "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(refused.status.code(), Some(0));
    let refused_stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        refused_stderr.contains("not found") || refused_stderr.contains("404"),
        "{refused_stderr}"
    );

    shelly
        .update_container_request(&request.uuid, &json!({"priority": 0}))
        .await
        .unwrap();
}

/// Copies a random file into the container with plain `scp` and the
/// `berth ssh-config` snippet (the SFTP protocol, served by the
/// supervisor's `berth sftp-server`), checks it inside the container, and
/// copies it back out byte for byte.
fn check_scp_through_ssh_config(cluster: &TestCluster, token: &str, uuid: &str) {
    let dir = cluster.dir.path().join("scp");
    std::fs::create_dir_all(&dir).unwrap();
    let known_hosts = dir.join("known_hosts");
    let snippet = cluster
        .berth_command(
            token,
            &["ssh-config", "--known-hosts", known_hosts.to_str().unwrap()],
        )
        .output()
        .unwrap();
    assert!(
        snippet.status.success(),
        "{}",
        String::from_utf8_lossy(&snippet.stderr)
    );
    let config = dir.join("ssh_config");
    std::fs::write(&config, &snippet.stdout).unwrap();

    let mut data = vec![0u8; 1 << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    let upload = dir.join("upload.bin");
    std::fs::write(&upload, &data).unwrap();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    let scp = |source: &str, destination: &str| {
        std::process::Command::new("scp")
            .args(["-s", "-F", config.to_str().unwrap(), "-o", "BatchMode=yes"])
            .args([source, destination])
            .env("BERTH_API_HOST", &cluster.api_url)
            .env("BERTH_API_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    let remote = format!("{uuid}.berth:/tmp/upload.bin");
    let output = scp(upload.to_str().unwrap(), &remote);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = cluster
        .berth_command(token, &["shell", uuid, "--", "sha256sum /tmp/upload.bin"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.split_whitespace().next(),
        Some(digest.as_str()),
        "{stdout}"
    );

    let download = dir.join("download.bin");
    let output = scp(&remote, download.to_str().unwrap());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        std::fs::read(&download).unwrap() == data,
        "the copied-back file differs"
    );
}
