//! The supervisor's SSH gateway with the real controller: the published
//! host key gets its fingerprint, and the first session sets the
//! container's `interactive_session_started` with the container's token.
//!
//! The test plays the supervisor's part itself (lock, publish, Running,
//! the gateway on a loopback listener in the place of the tunnel), so the
//! dispatcher is stopped first. The session runs in a Podman container
//! through the real OpenSSH client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use berth_core::ssh::PublicKey;
use berth_supervisor::gateway::{
    publish_host_key, Gateway, GatewaySettings, GatewayTarget, HostKey, SessionFlag,
};
use berth_supervisor::logs::SupervisorLog;
use berth_supervisor::runtime::{container_name, ContainerSpec, Network, CONTAINER_UUID_LABEL};
use berth_supervisor::{DockerRuntime, Runtime};
use common::{skip, test_image, wait_until, TestCluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn first_session_sets_interactive_session_started() {
    if skip() {
        return;
    }
    let mut cluster = TestCluster::start("local");
    cluster.kill_dispatcher();
    let token = cluster.create_user("gwen");
    let gwen = common::client(&cluster.api_url, &token);
    let request = gwen
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
    let uuid = request.container_uuid.clone().expect("container uuid");

    let locked = cluster.system_client().lock_container(&uuid).await.unwrap();
    let container_client = common::client(&cluster.api_url, &locked.credentials.api_token);
    let host_key = HostKey::generate().unwrap();
    publish_host_key(&container_client, &uuid, &host_key)
        .await
        .unwrap();
    container_client
        .update_container(&uuid, &json!({"state": "Running"}))
        .await
        .unwrap();
    let record = gwen.get_container(&uuid).await.unwrap();
    let line = host_key.public_line();
    assert_eq!(record.gateway_host_key.as_deref(), Some(line.as_str()));
    let fingerprint = PublicKey::parse(&line).unwrap().fingerprint();
    assert_eq!(
        record.gateway_host_key_fingerprint.as_deref(),
        Some(fingerprint.as_str())
    );
    assert!(!record.interactive_session_started);

    let docker_host = std::env::var("DOCKER_HOST").expect("DOCKER_HOST names the Podman socket");
    let runtime = Arc::new(DockerRuntime::connect(&docker_host).await.unwrap());
    let spec = ContainerSpec {
        name: container_name(&uuid),
        labels: BTreeMap::from([(CONTAINER_UUID_LABEL.to_string(), uuid.clone())]),
        image: test_image(),
        command: vec!["sleep".into(), "600".into()],
        env: Vec::new(),
        working_dir: None,
        memory_bytes: None,
        nano_cpus: None,
        network: Network::None,
        binds: Vec::new(),
        gpus: None,
    };
    let id = runtime.create(&spec).await.unwrap();
    runtime.start(&id).await.unwrap();

    let mut known_hosts = tempfile::NamedTempFile::new().unwrap();
    writeln!(known_hosts, "{uuid} {line}").unwrap();
    known_hosts.flush().unwrap();
    let flag = SessionFlag {
        client: container_client.clone(),
        uuid: uuid.clone(),
    };
    let target = GatewayTarget {
        runtime: runtime.clone(),
        container: id.clone(),
        env: Vec::new(),
        working_dir: None,
        sftp_server: None,
    };
    let gateway = Gateway::new(
        host_key,
        target,
        GatewaySettings::default(),
        SupervisorLog::new(),
        Some(flag),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let gateway = gateway.clone();
            tokio::spawn(async move {
                let _ = gateway.serve_connection(stream).await;
            });
        }
    });

    let ssh = tokio::process::Command::new("ssh")
        .args(["-F", "/dev/null", "-p", &port.to_string()])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            known_hosts.path().display()
        ))
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("HostKeyAlias={uuid}"))
        .args(["-o", "BatchMode=yes", "root@127.0.0.1", "--", "exit 9"])
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), ssh)
        .await
        .expect("ssh did not finish within 60 s")
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    wait_until(
        &cluster,
        Duration::from_secs(30),
        "interactive_session_started",
        || async {
            let container = gwen.get_container(&uuid).await.ok()?;
            container.interactive_session_started.then_some(())
        },
    )
    .await;

    server.abort();
    runtime.remove(&id).await.unwrap();
}
