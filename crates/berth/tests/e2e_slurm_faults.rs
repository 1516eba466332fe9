//! Faults on real Slurm, with real `berth dispatch` and `berth supervise`
//! processes and real Podman:
//!
//! - the dispatcher killed with SIGKILL at random moments during a burst
//!   of containers, and restarted each time: every container completes,
//!   and Slurm saw exactly one job per container;
//! - slurmctld stopped for 30 s while containers are queued and running:
//!   nothing is cancelled or submitted twice, and all complete.
//!
//! Slurm's own records count the jobs: `squeue --states=all` (which keeps
//! finished jobs for MinJobAge, 300 s by default) and the job completion
//! log (`JobCompType=jobcomp/filetxt`, one `Name=` field per finished job,
//! as `scripts/setup/slurm.sh` configures it).
//!
//! The slurmctld test stops the Slurm controller that every user of this
//! host's Slurm shares, so it runs only with `BERTH_TEST_STOP_SLURMCTLD=1`.
//!
//! On a 2-core host whose Slurm runs 8 jobs at once (2 cores, each shared
//! by 4 jobs), the burst took about 5 min and the outage about 55 s. The
//! burst's time works out at about 12 s per trivial container's job in
//! each of the 8 slots (an estimate from the total), so the number of job
//! slots sets it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_client::Client;
use berth_core::ContainerState;
use common::{skip, wait_until, ClusterOptions, DispatchSettings, TestCluster};
use rand::Rng;

/// Containers of the SIGKILL burst.
const BURST: usize = 200;

/// Requests created at once while the burst is queued.
const CREATE_CONCURRENCY: usize = 16;

/// Maximum number of SIGKILLs during the burst, the minimum number that
/// must hit it while containers are unfinished, and the range of the
/// dispatcher's run time before each.
const KILLS: usize = 6;
const KILLS_DURING_BURST: usize = 3;
const RUN_BEFORE_KILL_MS: std::ops::Range<u64> = 300..3000;

/// How long slurmctld stays stopped.
const SLURMCTLD_DOWN: Duration = Duration::from_secs(30);

/// Creates `count` committed requests running `command`, several at a
/// time; returns their containers' UUIDs. Reuse is off, so each request
/// gets a container of its own.
async fn create_containers(client: &Client, command: &[&str], count: usize) -> Vec<String> {
    let mut body = common::request_body(command, 500);
    body["use_existing"] = serde_json::json!(false);
    let mut uuids = Vec::with_capacity(count);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..count {
        if tasks.len() >= CREATE_CONCURRENCY {
            uuids.push(tasks.join_next().await.unwrap().unwrap());
        }
        let client = client.clone();
        let mut body = body.clone();
        body["name"] = serde_json::json!(format!("fault-{index}"));
        tasks.spawn(async move {
            let request = client.create_container_request(&body).await.unwrap();
            request.container_uuid.unwrap()
        });
    }
    while let Some(uuid) = tasks.join_next().await {
        uuids.push(uuid.unwrap());
    }
    let distinct: std::collections::HashSet<&String> = uuids.iter().collect();
    assert_eq!(distinct.len(), count, "requests shared containers");
    uuids
}

/// Counts the caller's containers that are not final yet.
async fn unfinished_count(client: &Client) -> u64 {
    let params = berth_client::ListParams {
        filters: Some(serde_json::json!([[
            "state",
            "in",
            ["Queued", "Locked", "Running"]
        ]])),
        limit: Some(0),
        count: Some("exact".to_string()),
        ..Default::default()
    };
    let page = client.list_containers(&params).await.unwrap();
    page.items_available.expect("the list has no count")
}

/// Counts the jobs per job name that `squeue --states=all` lists, for the
/// names starting with `prefix`.
fn squeue_job_counts(prefix: &str) -> HashMap<String, usize> {
    let output = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%j"])
        .output()
        .expect("failed to run squeue");
    assert!(
        output.status.success(),
        "squeue failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut counts = HashMap::new();
    for name in String::from_utf8_lossy(&output.stdout).lines() {
        let name = name.trim();
        if name.starts_with(prefix) {
            *counts.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Returns the job completion log's path (`JobCompLoc`).
fn jobcomp_path() -> String {
    let output = Command::new("scontrol")
        .args(["show", "config"])
        .output()
        .expect("failed to run scontrol show config");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "JobCompLoc").then(|| value.trim().to_string())
        })
        .expect("scontrol show config names no JobCompLoc")
}

/// Counts the finished jobs per job name in the job completion log, for
/// the names starting with `prefix`.
fn jobcomp_job_counts(path: &str, prefix: &str) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        let name = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("Name="));
        if let Some(name) = name.filter(|name| name.starts_with(prefix)) {
            *counts.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until every container is final; returns those that did not
/// complete with exit code 0, with their state.
async fn wait_all_final(
    cluster: &TestCluster,
    client: &Client,
    uuids: &[String],
    timeout: Duration,
) -> Vec<String> {
    let mut failed = Vec::new();
    let mut pending: Vec<&String> = uuids.iter().collect();
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for uuid in pending {
            let container = client.get_container(uuid).await.unwrap();
            if !container.state.is_final() {
                still.push(uuid);
            } else if container.state != ContainerState::Complete || container.exit_code != Some(0)
            {
                failed.push(format!(
                    "{uuid}: {} exit {:?} {}",
                    container.state,
                    container.exit_code,
                    serde_json::to_string(&container.runtime_status).unwrap()
                ));
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} containers are not final after {timeout:?}\n{}",
            pending.len(),
            uuids.len(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    failed
}

/// Asserts that Slurm saw exactly one job for each container, in
/// `squeue --states=all` and in the job completion log.
fn assert_one_job_each(cluster: &TestCluster, uuids: &[String], jobcomp: &str) {
    let prefix = format!("{}-", cluster.cluster_id);
    // The completion log gets its line as the job ends, just after the
    // supervisor reported the final state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut completed = jobcomp_job_counts(jobcomp, &prefix);
    while uuids.iter().any(|uuid| !completed.contains_key(uuid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        completed = jobcomp_job_counts(jobcomp, &prefix);
    }

    let listed = squeue_job_counts(&prefix);
    let twice_listed: Vec<_> = uuids
        .iter()
        .filter(|uuid| listed.get(*uuid).copied().unwrap_or(0) != 1)
        .map(|uuid| format!("{uuid}: {:?}", listed.get(uuid)))
        .collect();
    assert!(
        twice_listed.is_empty(),
        "containers without exactly one job in squeue --states=all: {twice_listed:?}"
    );

    let twice_completed: Vec<_> = uuids
        .iter()
        .filter(|uuid| completed.get(*uuid).copied().unwrap_or(0) != 1)
        .map(|uuid| format!("{uuid}: {:?}", completed.get(uuid)))
        .collect();
    assert!(
        twice_completed.is_empty(),
        "containers without exactly one job in {jobcomp}: {twice_completed:?}"
    );

    let strays: Vec<_> = listed.keys().filter(|name| !uuids.contains(name)).collect();
    assert!(strays.is_empty(), "jobs of no container: {strays:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_dispatcher_burst_one_job_each() {
    if skip() {
        return;
    }
    // A short lease, so that each restarted dispatcher takes over within
    // about 2.5 s of the SIGKILL.
    let options = ClusterOptions {
        dispatch: DispatchSettings {
            lease: Some((Duration::from_secs(2), Duration::from_millis(500))),
            ..DispatchSettings::default()
        },
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start_with("slurm", &options);
    let token = cluster.create_user("burst");
    let client = common::client(&cluster.api_url, &token);
    let jobcomp = jobcomp_path();
    let started = Instant::now();

    let uuids = create_containers(&client, &["true"], BURST).await;
    eprintln!("created {BURST} requests in {:?}", started.elapsed());

    let mut rng = rand::thread_rng();
    let mut kills_during_burst = 0;
    for kill in 0..KILLS {
        // Let the dispatcher take the lease (once per start so far), then
        // kill it at a random moment of its run.
        wait_until(
            &cluster,
            Duration::from_secs(30),
            "the restarted dispatcher to take the lease",
            || async {
                let count = cluster
                    .dispatcher_log()
                    .matches("took the dispatch lease")
                    .count();
                (count > kill).then_some(())
            },
        )
        .await;
        let run_for = Duration::from_millis(rng.gen_range(RUN_BEFORE_KILL_MS));
        tokio::time::sleep(run_for).await;
        let unfinished = unfinished_count(&client).await;
        if unfinished == 0 {
            break;
        }
        cluster.kill_dispatcher();
        kills_during_burst += 1;
        eprintln!(
            "SIGKILL {} at {:?}, after {run_for:?} of dispatching, with {unfinished} containers unfinished",
            kill + 1,
            started.elapsed()
        );
        cluster.start_dispatcher();
    }
    assert!(
        kills_during_burst >= KILLS_DURING_BURST,
        "only {kills_during_burst} SIGKILLs hit the burst"
    );

    let failed = wait_all_final(&cluster, &client, &uuids, Duration::from_secs(600)).await;
    eprintln!(
        "all {BURST} containers final {:?} after the first request",
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "containers that did not complete: {failed:?}\n{}",
        cluster.logs()
    );
    assert_one_job_each(&cluster, &uuids, &jobcomp);
}

/// Stops slurmctld, and starts it again when dropped (even when the test
/// fails) with its own command line without `-c`, which would drop the
/// saved jobs. A detached shell also restarts it after a deadline, in
/// case the test process dies before the drop.
struct SlurmctldOutage {
    command_line: Vec<String>,
    /// The detached shell that restarts slurmctld after a deadline; the
    /// leader of its own process group.
    guard: std::process::Child,
    restarted: bool,
}

impl SlurmctldOutage {
    fn begin(max_outage: Duration) -> SlurmctldOutage {
        let pid_file = Command::new("scontrol")
            .args(["show", "config"])
            .output()
            .ok()
            .and_then(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .find_map(|line| {
                        let (key, value) = line.split_once('=')?;
                        (key.trim() == "SlurmctldPidFile").then(|| value.trim().to_string())
                    })
            })
            .expect("scontrol show config names no SlurmctldPidFile");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("failed to read slurmctld's pid file")
            .trim()
            .parse()
            .expect("slurmctld's pid file holds no pid");
        let command_line: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .expect("failed to read slurmctld's command line")
            .split(|byte| *byte == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .filter(|arg| arg != "-c")
            .collect();
        assert!(
            command_line[0].ends_with("slurmctld"),
            "{pid_file} names pid {pid}, which is not slurmctld: {command_line:?}"
        );

        // The shell guard: restarts slurmctld after the deadline unless it
        // responds, whatever happens to this process.
        let restart = shell_words(&command_line);
        let script = format!(
            "sleep {}; scontrol ping 2>/dev/null | grep -q 'is UP' || {restart}",
            max_outage.as_secs() + 30
        );
        let guard = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start the slurmctld guard");

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("failed to stop slurmctld");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "slurmctld did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
        SlurmctldOutage {
            command_line,
            guard,
            restarted: false,
        }
    }

    /// Starts slurmctld again and waits until it responds.
    fn end(&mut self) {
        if self.restarted {
            return;
        }
        self.restarted = true;
        let status = Command::new(&self.command_line[0])
            .args(&self.command_line[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("failed to start slurmctld");
        assert!(status.success(), "slurmctld exited with {status}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = Command::new("scontrol").arg("ping").output();
            if output.is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("is UP"))
            {
                break;
            }
            assert!(Instant::now() < deadline, "slurmctld does not respond");
            std::thread::sleep(Duration::from_millis(200));
        }
        // The guard is no longer needed once slurmctld responds; on a
        // failure above it stays, and restarts slurmctld if it is down.
        self.stop_guard();
    }

    /// Stops the shell guard (its shell and its `sleep`).
    fn stop_guard(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.guard.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let _ = self.guard.wait();
    }
}

impl Drop for SlurmctldOutage {
    fn drop(&mut self) {
        if !self.restarted {
            self.end();
        }
    }
}

/// Quotes each word for `sh`.
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|word| format!("'{}'", word.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread")]
async fn slurmctld_outage_cancels_nothing() {
    if skip() {
        return;
    }
    if std::env::var("BERTH_TEST_STOP_SLURMCTLD").as_deref() != Ok("1") {
        eprintln!("skipped: stopping slurmctld disturbs every user of this host's Slurm; set BERTH_TEST_STOP_SLURMCTLD=1 to run it");
        return;
    }
    let cluster = TestCluster::start("slurm");
    let token = cluster.create_user("outage");
    let client = common::client(&cluster.api_url, &token);
    let jobcomp = jobcomp_path();

    // Containers that run across the outage.
    let mut uuids = create_containers(&client, &["sh", "-c", "sleep 40; echo ran"], 3).await;
    for uuid in &uuids {
        wait_until(
            &cluster,
            Duration::from_secs(90),
            "the long containers to run",
            || async {
                let container = client.get_container(uuid).await.ok()?;
                (container.state == ContainerState::Running).then_some(())
            },
        )
        .await;
    }

    let mut outage = SlurmctldOutage::begin(SLURMCTLD_DOWN);
    let stopped_at = Instant::now();
    // Containers queued while slurmctld is down.
    uuids.extend(create_containers(&client, &["echo", "queued"], 3).await);
    while stopped_at.elapsed() < SLURMCTLD_DOWN {
        for uuid in &uuids {
            let container = client.get_container(uuid).await.unwrap();
            assert_ne!(
                container.state,
                ContainerState::Cancelled,
                "{uuid} was cancelled while slurmctld was down\n{}",
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    outage.end();
    eprintln!("slurmctld was down for {:?}", stopped_at.elapsed());

    let failed = wait_all_final(&cluster, &client, &uuids, Duration::from_secs(180)).await;
    assert!(
        failed.is_empty(),
        "containers that did not complete: {failed:?}\n{}",
        cluster.logs()
    );
    assert_one_job_each(&cluster, &uuids, &jobcomp);

    let log = cluster.dispatcher_log();
    assert!(
        log.contains("backing off for "),
        "the dispatcher did not log its backoff\n{}",
        cluster.logs()
    );
}
