//! End to end with the LSF backend: the controller, the `berth dispatch`
//! binary, real `berth supervise` processes and real Podman, with stand-ins
//! for LSF's commands.
//!
//! LSF is proprietary and cannot be installed here, so `bsub`, `bjobs`,
//! `bkill` and `bmod` are stand-in shell scripts (see
//! `berth-dispatch/tests/lsf-stand-ins`), not LSF. They print LSF's output
//! formats and keep the jobs' state in files. The stand-in scheduler
//! `lsf-run-pending`, which these tests call every 200 ms, starts pending
//! jobs: each runs its job script, so the real supervisor runs the
//! container. `bsub` logs every submission, which is how the tests count
//! the jobs of each container.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_client::Client;
use berth_core::{Container, ContainerState, RequestState};
use common::{skip, wait_until, TestCluster};
use rand::Rng;

/// Priority of the tests' requests.
const PRIORITY: i64 = 500;

/// Runs the stand-in scheduler every 200 ms, with at most `slots` jobs
/// running, until dropped.
struct Scheduler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scheduler {
    fn start(cluster: &TestCluster, slots: usize) -> Scheduler {
        let program = cluster.dir.path().join("lsf/bin/lsf-run-pending");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let status = Command::new(&program)
                    .arg(slots.to_string())
                    .status()
                    .expect("failed to run lsf-run-pending");
                assert!(status.success(), "lsf-run-pending failed: {status}");
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Scheduler {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Returns the stand-ins' state directory.
fn state_dir(cluster: &TestCluster) -> PathBuf {
    cluster.dir.path().join("lsf/state")
}

/// Returns the job name of every `bsub` call, one per submitted job.
fn submitted_names(state: &Path) -> Vec<String> {
    std::fs::read_to_string(state.join("bsub.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(1).map(str::to_string))
        .collect()
}

/// Creates `count` requests at once, each with a container of its own, and
/// returns their containers' UUIDs.
async fn create_requests(client: &Client, count: usize, command: &[&str]) -> Vec<String> {
    create_requests_at(client, count, command, PRIORITY).await
}

/// Creates `count` requests at `priority` like [`create_requests`].
async fn create_requests_at(
    client: &Client,
    count: usize,
    command: &[&str],
    priority: i64,
) -> Vec<String> {
    let mut body = common::request_body(command, priority);
    body["use_existing"] = serde_json::json!(false);
    let creations = (0..count).map(|_| client.create_container_request(&body));
    futures::future::join_all(creations)
        .await
        .into_iter()
        .map(|result| {
            let request = result.expect("create request");
            request.container_uuid.expect("container uuid")
        })
        .collect()
}

/// Waits until every container is final and returns them.
async fn wait_all_final(
    cluster: &TestCluster,
    client: &Client,
    uuids: &[String],
    timeout: Duration,
) -> Vec<Container> {
    wait_until(cluster, timeout, "every container to be final", || async {
        let mut containers = Vec::new();
        for uuid in uuids {
            let container = client.get_container(uuid).await.ok()?;
            if !container.state.is_final() {
                return None;
            }
            containers.push(container);
        }
        Some(containers)
    })
    .await
}

/// Asserts that every container completed with exit code 0 and that the
/// stand-in `bsub` saw exactly one job per container and no other.
fn assert_completed_once(cluster: &TestCluster, containers: &[Container]) {
    let names = submitted_names(&state_dir(cluster));
    for container in containers {
        assert_eq!(
            container.state,
            ContainerState::Complete,
            "container {} ended {:?}: {:?}\n{}",
            container.uuid,
            container.state,
            container.runtime_status,
            cluster.logs()
        );
        assert_eq!(container.exit_code, Some(0), "{}", container.uuid);
        let jobs = names.iter().filter(|name| **name == container.uuid).count();
        assert_eq!(
            jobs,
            1,
            "bsub calls for container {}; the logs about it:\n{}",
            container.uuid,
            logs_about(cluster, &container.uuid)
        );
    }
    assert_eq!(names.len(), containers.len(), "bsub calls: {names:?}");
}

/// Returns the user priority (`-sp`) the stand-ins hold for each job name.
fn user_priorities(state: &Path) -> std::collections::HashMap<String, u32> {
    let log = std::fs::read_to_string(state.join("bsub.log")).unwrap_or_default();
    log.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (id, name) = (fields.next()?, fields.next()?);
            let priority = std::fs::read_to_string(state.join(format!("{id}.sp"))).ok()?;
            Some((name.to_string(), priority.trim().parse().ok()?))
        })
        .collect()
}

/// Returns the lines of the dispatchers' log and of the stand-in `bsub`'s
/// log that name `uuid`, for a failure message.
fn logs_about(cluster: &TestCluster, uuid: &str) -> String {
    let mut text = String::new();
    // The dispatchers' start lines show when each one started.
    for (path, also) in [
        (
            cluster.dir.path().join("dispatch.log"),
            Some("dispatcher started"),
        ),
        (state_dir(cluster).join("bsub.log"), None),
    ] {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&format!("--- {} ---\n", path.display()));
        for line in log.lines() {
            if line.contains(uuid) || also.is_some_and(|also| line.contains(also)) {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

/// Counts the containers that are Locked or Running.
async fn count_in_states(client: &Client, uuids: &[String]) -> (usize, usize) {
    let mut locked = 0;
    let mut running = 0;
    for uuid in uuids {
        match client.get_container(uuid).await.map(|c| c.state) {
            Ok(ContainerState::Locked) => locked += 1,
            Ok(ContainerState::Running) => running += 1,
            _ => {}
        }
    }
    (locked, running)
}

/// Takes about 40 s on 2 cores: 24 containers through 4 job slots.
#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_dispatcher_submits_each_container_once() {
    if skip() {
        return;
    }
    let mut cluster = TestCluster::start("lsf");
    let token = cluster.create_user("lena");
    let lena = common::client(&cluster.api_url, &token);
    let _scheduler = Scheduler::start(&cluster, 4);
    // Each bsub waits 50 ms before it prints the job id, so that some kills
    // land after LSF queued a job but before the dispatcher learnt its id.
    std::fs::write(state_dir(&cluster).join("bsub-delay"), "0.05").unwrap();

    // NOTE: each kill takes the dispatcher's whole process group, as a
    // service manager does when the dispatcher dies, so a bsub in flight
    // dies with it. A bsub that outlives its dispatcher makes a second job
    // if it ends after the new dispatcher's first two polls, because an
    // adopted container without a job is resubmitted after two polls.
    // The stand-in's bsub-pre-delay file reproduces that.
    let burst = create_requests(&lena, 24, &["echo", "done"]);
    let kills = async {
        for _ in 0..6 {
            let (before, down) = {
                let mut rng = rand::thread_rng();
                (rng.gen_range(50..600), rng.gen_range(0..200))
            };
            tokio::time::sleep(Duration::from_millis(before)).await;
            cluster.kill_dispatcher_group();
            tokio::time::sleep(Duration::from_millis(down)).await;
            cluster.start_dispatcher();
        }
    };
    let (uuids, ()) = tokio::join!(burst, kills);

    let containers = wait_all_final(&cluster, &lena, &uuids, Duration::from_secs(240)).await;
    assert_completed_once(&cluster, &containers);
}

/// Takes about 25 s: LSF is down for 6 s while containers wait and run.
#[tokio::test(flavor = "multi_thread")]
async fn lsf_down_cancels_and_resubmits_nothing() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("lsf");
    let token = cluster.create_user("mike");
    let mike = common::client(&cluster.api_url, &token);
    let state = state_dir(&cluster);
    let scheduler = Scheduler::start(&cluster, 2);

    let mut uuids = create_requests(&mike, 4, &["sleep", "4"]).await;
    wait_until(
        &cluster,
        Duration::from_secs(60),
        "two containers running and two waiting in LSF",
        || async {
            let (locked, running) = count_in_states(&mike, &uuids).await;
            let submitted = submitted_names(&state).len();
            (running == 2 && locked == 2 && submitted == 4).then_some(())
        },
    )
    .await;

    // mbatchd is unreachable: bsub, bjobs and bkill fail, nothing starts,
    // and the running jobs go on.
    std::fs::write(state.join("down"), "").unwrap();
    uuids.extend(create_requests(&mike, 2, &["sleep", "1"]).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < deadline {
        for uuid in &uuids {
            let container = mike.get_container(uuid).await.unwrap();
            assert_ne!(
                container.state,
                ContainerState::Cancelled,
                "container {uuid} was cancelled while LSF was down: {:?}\n{}",
                container.runtime_status,
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(submitted_names(&state).len(), 4, "no bsub got through");
    assert!(
        cluster.dispatcher_log().contains("backing off for "),
        "the dispatcher did not log its backoff while LSF was down\n{}",
        cluster.logs()
    );
    std::fs::remove_file(state.join("down")).unwrap();

    let containers = wait_all_final(&cluster, &mike, &uuids, Duration::from_secs(120)).await;
    drop(scheduler);
    assert_completed_once(&cluster, &containers);
    let bkills = std::fs::read_to_string(state.join("bkill.log")).unwrap_or_default();
    assert!(bkills.is_empty(), "bkill calls: {bkills}");
}

/// Takes about 15 s.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_bjobs_answers_cancel_nothing() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("lsf");
    let token = cluster.create_user("nina");
    let nina = common::client(&cluster.api_url, &token);
    let state = state_dir(&cluster);
    let _scheduler = Scheduler::start(&cluster, 2);

    let uuids = create_requests(&nina, 3, &["sleep", "5"]).await;
    wait_until(
        &cluster,
        Duration::from_secs(60),
        "two containers running and one waiting in LSF",
        || async {
            let (locked, running) = count_in_states(&nina, &uuids).await;
            let submitted = submitted_names(&state).len();
            (running == 2 && locked == 1 && submitted == 3).then_some(())
        },
    )
    .await;

    // One wrong bjobs output at a time, while every job still exists:
    // LSF's empty-queue message, empty output, and a failure.
    for answer in ["none", "empty", "fail"] {
        std::fs::write(state.join("bjobs-once"), answer).unwrap();
        wait_until(
            &cluster,
            Duration::from_secs(10),
            "bjobs to give the wrong answer",
            || async { (!state.join("bjobs-once").exists()).then_some(()) },
        )
        .await;
    }
    let answered = std::fs::read_to_string(state.join("bjobs-once.log")).unwrap();
    assert_eq!(answered.lines().count(), 3, "{answered}");

    let containers = wait_all_final(&cluster, &nina, &uuids, Duration::from_secs(60)).await;
    assert_completed_once(&cluster, &containers);
    let bkills = std::fs::read_to_string(state.join("bkill.log")).unwrap_or_default();
    assert!(bkills.is_empty(), "bkill calls: {bkills}");
}

/// Takes about 15 s.
#[tokio::test(flavor = "multi_thread")]
async fn user_priorities_follow_container_priorities() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("lsf");
    let token = cluster.create_user("pia");
    let pia = common::client(&cluster.api_url, &token);
    let state = state_dir(&cluster);

    // No job runs yet: three low-priority jobs wait, then a high one comes.
    let mut uuids = create_requests_at(&pia, 3, &["true"], 100).await;
    wait_until(
        &cluster,
        Duration::from_secs(30),
        "three bsub calls",
        || async { (submitted_names(&state).len() == 3).then_some(()) },
    )
    .await;
    let urgent = create_requests_at(&pia, 1, &["true"], 900).await.remove(0);
    uuids.push(urgent.clone());

    // bsub gives the new job -sp below the others, so it waits behind them
    // until a poll moves it first with bmod.
    let priorities = wait_until(
        &cluster,
        Duration::from_secs(30),
        "the urgent job to get the highest user priority",
        || async {
            let priorities = user_priorities(&state);
            let top = priorities.get(&urgent)?;
            let first = uuids
                .iter()
                .filter(|uuid| **uuid != urgent)
                .all(|uuid| priorities.get(uuid).is_some_and(|other| other < top));
            first.then_some(priorities)
        },
    )
    .await;
    assert_eq!(priorities.len(), 4, "{priorities:?}");
    let bmods = std::fs::read_to_string(state.join("bmod.log")).unwrap_or_default();
    assert!(!bmods.is_empty(), "no bmod call");

    // With one slot, the stand-in scheduler starts the highest -sp first.
    let scheduler = Scheduler::start(&cluster, 1);
    let first = wait_until(
        &cluster,
        Duration::from_secs(60),
        "a container to start",
        || async {
            for uuid in &uuids {
                let container = pia.get_container(uuid).await.ok()?;
                if container.started_at.is_some() {
                    return Some(uuid.clone());
                }
            }
            None
        },
    )
    .await;
    assert_eq!(
        first, urgent,
        "user priorities: {priorities:?}\nbmod calls:\n{bmods}"
    );
    let containers = wait_all_final(&cluster, &pia, &uuids, Duration::from_secs(60)).await;
    drop(scheduler);
    assert_completed_once(&cluster, &containers);
}

/// Takes about 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_queue_cancels_with_lsfs_message() {
    if skip() {
        return;
    }
    let cluster = TestCluster::start("lsf");
    let token = cluster.create_user("olga");
    let olga = common::client(&cluster.api_url, &token);

    let mut body = common::request_body(&["true"], PRIORITY);
    body["scheduling_parameters"] = serde_json::json!({"partitions": ["nope"]});
    body["container_count_max"] = serde_json::json!(1);
    let request = olga
        .create_container_request(&body)
        .await
        .expect("create request");
    let container_uuid = request.container_uuid.clone().expect("container uuid");
    let containers = wait_all_final(
        &cluster,
        &olga,
        std::slice::from_ref(&container_uuid),
        Duration::from_secs(60),
    )
    .await;
    let container = &containers[0];
    assert_eq!(container.state, ContainerState::Cancelled);
    let status = serde_json::to_string(&container.runtime_status).unwrap();
    assert!(
        status.contains("nope: No such queue. Job not submitted."),
        "{status}\n{}",
        cluster.logs()
    );
    assert!(submitted_names(&state_dir(&cluster)).is_empty());
    let request = olga.get_container_request(&request.uuid).await.unwrap();
    assert_eq!(request.state, RequestState::Final);
}
