//! End to end: resource statistics and out-of-memory kills, with the
//! controller, the dispatcher and `berth supervise` running containers in
//! Podman, whose cgroups the supervisor reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use berth_client::Client;
use berth_core::{Container, ContainerState};
use common::{test_image, wait_until, ClusterOptions, TestCluster};
use serde_json::json;

const RAM: u64 = 64 << 20;

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

/// Runs `script` under `sh -c` with a RAM constraint of [`RAM`] and
/// returns the container once it is final.
async fn run_script(cluster: &TestCluster, client: &Client, script: &str) -> Container {
    let request = client
        .create_container_request(&json!({
            "state": "Committed",
            "priority": 1,
            "container_image": test_image(),
            "command": ["sh", "-c", script],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "runtime_constraints": {"ram": RAM, "vcpus": 1},
        }))
        .await
        .unwrap();
    let uuid = request.container_uuid.clone().unwrap();
    wait_until(
        cluster,
        Duration::from_secs(120),
        "the container to end",
        || async {
            let container = client.get_container(&uuid).await.ok()?;
            container.state.is_final().then_some(container)
        },
    )
    .await
}

/// Parses a crunchstat line into its kind (`sample` or `final`) and its
/// numeric fields, checking that the time and every value parse.
fn parse_line(line: &str) -> (String, BTreeMap<String, f64>) {
    let mut words = line.split(' ');
    let time = words.next().unwrap();
    berth_core::time::parse(time).unwrap_or_else(|error| panic!("bad time in {line:?}: {error}"));
    let kind = words.next().unwrap().to_string();
    let fields = words
        .map(|field| {
            let (key, value) = field
                .split_once('=')
                .unwrap_or_else(|| panic!("field {field:?} of {line:?} is not key=value"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value of {key} in {line:?} is not a number"));
            (key.to_string(), value)
        })
        .collect();
    (kind, fields)
}

#[tokio::test(flavor = "multi_thread")]
async fn running_container_has_crunchstat_lines() {
    if common::skip() {
        return;
    }
    let options = ClusterOptions {
        supervisor: vec![
            "stats_interval: 500ms".to_string(),
            "log_checkpoint_interval: 1s".to_string(),
        ],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start_with("local", &options);
    let token = cluster.create_user("stella");
    let stella = common::client(&cluster.api_url, &token);

    // Some CPU time, 8 MiB written, then a pause for a few lines.
    let script = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; \
        dd if=/dev/zero of=/tmp/data bs=1M count=8 2>/dev/null; sync; sleep 3; echo done";
    let container = run_script(&cluster, &stella, script).await;
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{container:?}\n{}",
        cluster.logs()
    );
    assert_eq!(container.exit_code, Some(0));
    assert!(
        !container.runtime_status.contains_key("error"),
        "{:?}",
        container.runtime_status
    );

    let live = live_log(&stella, &container.uuid, "crunchstat").await;
    let text = String::from_utf8(live.clone()).unwrap();
    let lines: Vec<(String, BTreeMap<String, f64>)> = text.lines().map(parse_line).collect();
    let samples = lines.iter().filter(|(kind, _)| kind == "sample").count();
    assert!(samples >= 3, "at least 3 sample lines in 3 s:\n{text}");
    let (last_kind, last) = lines.last().unwrap();
    assert_eq!(
        last_kind, "final",
        "the last line is the final one:\n{text}"
    );
    assert_eq!(
        lines.iter().filter(|(kind, _)| kind == "final").count(),
        1,
        "{text}"
    );

    for (_, fields) in &lines {
        for key in [
            "cpu_seconds",
            "cpu_interval_seconds",
            "memory_bytes",
            "memory_peak_bytes",
            "memory_limit_bytes",
            "io_read_bytes",
            "io_write_bytes",
        ] {
            assert!(fields.contains_key(key), "{key} is missing:\n{text}");
        }
        assert_eq!(fields["memory_limit_bytes"], RAM as f64, "{text}");
        assert!(fields["memory_bytes"] > 0.0, "{text}");
        assert!(
            fields["memory_peak_bytes"] >= fields["memory_bytes"],
            "{text}"
        );
    }
    assert!(last["cpu_seconds"] > 0.0, "the busy loop used CPU:\n{text}");
    let cpu_total: f64 = lines
        .iter()
        .map(|(_, fields)| fields["cpu_interval_seconds"])
        .sum();
    assert!(
        (cpu_total - last["cpu_seconds"]).abs() < 0.001,
        "the intervals add up to the total ({cpu_total} and {}):\n{text}",
        last["cpu_seconds"]
    );

    let supervisor =
        String::from_utf8(live_log(&stella, &container.uuid, "supervisor").await).unwrap();
    assert!(
        supervisor.contains("reading resource statistics every 0.5s from cgroup"),
        "{supervisor}"
    );
    assert!(supervisor.contains("resource use: CPU"), "{supervisor}");

    let log_pdh = container.log.clone().expect("the log is set");
    let dest = tempfile::tempdir().unwrap();
    let output = cluster.berth(
        &token,
        &[
            "get",
            &log_pdh,
            "crunchstat.txt",
            dest.path().to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "berth get failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let saved = std::fs::read(dest.path().join("crunchstat.txt")).unwrap();
    assert!(
        saved == live,
        "crunchstat.txt differs from the live log:\n{}\n---\n{text}",
        String::from_utf8_lossy(&saved)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn container_over_its_ram_runs_out_of_memory() {
    if common::skip() {
        return;
    }
    let cluster = TestCluster::start("local");
    let token = cluster.create_user("olaf");
    let olaf = common::client(&cluster.api_url, &token);

    // tail keeps the last line, and /dev/zero has no newline, so its
    // resident memory grows until the kernel kills it at the limit.
    let container = run_script(&cluster, &olaf, "head -c 300m /dev/zero | tail").await;
    assert_eq!(
        container.state,
        ContainerState::Complete,
        "{container:?}\n{}",
        cluster.logs()
    );
    assert_eq!(container.exit_code, Some(137), "{container:?}");
    let status = &container.runtime_status;
    assert_eq!(
        status.get("error"),
        Some(&json!("container ran out of memory")),
        "{status:?}\n{}",
        cluster.logs()
    );
    let detail = status["errorDetail"].as_str().unwrap();
    let peak: f64 = detail
        .strip_prefix("peak memory ")
        .and_then(|rest| rest.split_once(" MiB"))
        .and_then(|(peak, _)| peak.parse().ok())
        .unwrap_or_else(|| panic!("the detail starts with the peak: {detail}"));
    assert!(peak >= 60.0, "the peak is near the 64 MiB limit: {detail}");
    assert!(detail.contains(", limit 64.0 MiB;"), "{detail}");
    assert!(detail.contains("detected by: "), "{detail}");

    let supervisor =
        String::from_utf8(live_log(&olaf, &container.uuid, "supervisor").await).unwrap();
    assert!(
        supervisor.contains("ERROR container ran out of memory: peak memory"),
        "{supervisor}"
    );
}
