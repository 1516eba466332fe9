//! End to end on real Slurm and real Podman: two `berth dispatch`
//! processes share one controller's dispatch lease. The standby takes over
//! when the leader is killed with SIGKILL, adopts its jobs, and submits
//! nothing twice. Takes about 60 s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use berth_core::ContainerState;
use common::{skip, slurm_jobs_named, wait_until, ClusterOptions, DispatchSettings, TestCluster};

/// The takeover bound with the default lease settings (lease_ttl 10 s,
/// lease_renew_interval 2 s): the lease expires at most 10 s after the
/// leader's last renewal, and the standby tries every 2 s.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

/// Containers queued before and after the leader's death.
const BEFORE_KILL: usize = 3;
const AFTER_KILL: usize = 3;

/// Builds a request for `command` with a container of its own (no reuse).
fn own_container_request(command: &[&str]) -> serde_json::Value {
    let mut body = common::request_body(command, 500);
    body["use_existing"] = serde_json::json!(false);
    body
}

async fn wait_for_log_line(cluster: &TestCluster, log: &dyn Fn() -> String, line: &str) {
    wait_until(cluster, Duration::from_secs(60), line, || async {
        log().contains(line).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn standby_takes_over_killed_leader() {
    if skip() {
        return;
    }
    let options = ClusterOptions {
        dispatch: DispatchSettings {
            lease: None,
            ..DispatchSettings::default()
        },
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start_with("slurm", &options);
    let token = cluster.create_user("lease");
    let user = common::client(&cluster.api_url, &token);

    wait_for_log_line(
        &cluster,
        &|| cluster.dispatcher_log(),
        "took the dispatch lease",
    )
    .await;
    let mut standby = cluster.spawn_dispatcher("standby.log");
    wait_for_log_line(
        &cluster,
        &|| standby.log_text(),
        "waiting for the dispatch lease",
    )
    .await;

    // Containers running under the leader when it dies.
    let mut containers = Vec::new();
    for _ in 0..BEFORE_KILL {
        let body = own_container_request(&["sh", "-c", "sleep 8; echo done"]);
        let request = user.create_container_request(&body).await.unwrap();
        containers.push(request.container_uuid.unwrap());
    }
    for uuid in &containers {
        wait_until(
            &cluster,
            Duration::from_secs(60),
            "the leader's jobs to reach Slurm",
            || async { (!slurm_jobs_named(uuid).is_empty()).then_some(()) },
        )
        .await;
    }

    let distinct: std::collections::HashSet<&String> = containers.iter().collect();
    assert_eq!(distinct.len(), BEFORE_KILL, "requests shared containers");

    cluster.kill_dispatcher();
    let killed_at = Instant::now();
    for _ in 0..AFTER_KILL {
        let body = own_container_request(&["sh", "-c", "echo after"]);
        let request = user.create_container_request(&body).await.unwrap();
        containers.push(request.container_uuid.unwrap());
    }
    let distinct: std::collections::HashSet<&String> = containers.iter().collect();
    assert_eq!(
        distinct.len(),
        BEFORE_KILL + AFTER_KILL,
        "requests shared containers"
    );
    wait_for_log_line(&cluster, &|| standby.log_text(), "took the dispatch lease").await;
    let takeover = killed_at.elapsed();
    eprintln!("the standby took the lease {takeover:?} after the leader's SIGKILL");
    assert!(
        takeover < TAKEOVER_BOUND,
        "the standby took the lease {takeover:?} after the leader died"
    );

    for uuid in &containers {
        let container = wait_until(
            &cluster,
            Duration::from_secs(120),
            "every container to finish",
            || async {
                let container = user.get_container(uuid).await.ok()?;
                container.state.is_final().then_some(container)
            },
        )
        .await;
        assert_eq!(
            container.state,
            ContainerState::Complete,
            "{uuid}\n{}",
            standby.log_text()
        );
        assert_eq!(container.exit_code, Some(0), "{uuid}");
        assert_eq!(
            slurm_jobs_named(uuid).len(),
            1,
            "Slurm jobs of container {uuid}"
        );
    }

    // A leader that shuts down releases the lease: a new standby takes it
    // at its next attempt instead of waiting for the expiry.
    let mut third = cluster.spawn_dispatcher("third.log");
    wait_for_log_line(
        &cluster,
        &|| third.log_text(),
        "waiting for the dispatch lease",
    )
    .await;
    standby.terminate();
    let stopped_at = Instant::now();
    assert!(
        standby.log_text().contains("released the dispatch lease"),
        "{}",
        standby.log_text()
    );
    wait_for_log_line(&cluster, &|| third.log_text(), "took the dispatch lease").await;
    let handover = stopped_at.elapsed();
    eprintln!("a new standby took the released lease after {handover:?}");
    assert!(
        handover < Duration::from_secs(5),
        "the third dispatcher took the released lease after {handover:?}"
    );
    third.kill();
}
