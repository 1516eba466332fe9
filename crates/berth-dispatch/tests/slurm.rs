//! The Slurm adapter against the real Slurm of this machine: submit,
//! status, cancel, a rejected submission, the job's time limit and working
//! directory, a job Slurm keeps pending because it can never run, and the
//! nice values that order pending jobs after their containers' priorities,
//! the reason Slurm gives for a job cancelled with `scancel`, the scratch
//! space (`--tmp`) of `tmp` mounts, and GPUs on a cluster without them.
//!
//! The job runs a stand-in for `berth` (a shell script that records its
//! arguments and sleeps), installed under a directory whose name contains a
//! quote and a space, so the quoting of the job script is tested by a real
//! shell. Runs only with `BERTH_INTEGRATION=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_core::{ClusterId, ObjectType, Uuid};
use berth_dispatch::command::ProcessRunner;
use berth_dispatch::{
    Backend, BatchJob, GpuRequest, JobId, JobRequest, JobState, SlurmBackend, SlurmConfig,
    SupervisorCommand,
};

/// How long a job may take to appear, start or leave the queue.
const WAIT: Duration = Duration::from_secs(60);

fn enabled() -> bool {
    if std::env::var("BERTH_INTEGRATION").as_deref() == Ok("1") {
        return true;
    }
    println!("skipped: set BERTH_INTEGRATION=1 to run the tests against the real Slurm");
    false
}

/// Cancels a job when a test ends early, so that nothing is left queued.
struct JobGuard(Option<JobId>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            let _ = std::process::Command::new("scancel")
                .arg(id.as_str())
                .status();
        }
    }
}

/// Writes the stand-in for `berth` under `dir/it's here/`.
fn fake_berth(dir: &Path) -> SupervisorCommand {
    let bin = dir.join("it's here");
    std::fs::create_dir(&bin).unwrap();
    let program = bin.join("fake-berth");
    std::fs::write(
        &program,
        "#!/bin/sh\npwd > \"$(dirname \"$0\")/cwd.txt\"\nprintf '%s\\n' \"$@\" > \"$(dirname \"$0\")/args.txt\"\nexec sleep 300\n",
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    SupervisorCommand {
        program,
        config_file: None,
    }
}

fn backend(dir: &Path, extra: &[&str]) -> SlurmBackend<ProcessRunner> {
    let config = SlurmConfig {
        output: dir.join("slurm-%j.out").to_str().unwrap().to_string(),
        sbatch_args: extra.iter().map(|s| s.to_string()).collect(),
        ..SlurmConfig::default()
    };
    SlurmBackend::new(
        config,
        fake_berth(dir),
        ProcessRunner::new(Duration::from_secs(30)),
    )
}

fn request(dir: &Path) -> JobRequest {
    let cluster: ClusterId = "zzzzz".parse().unwrap();
    let uuid = Uuid::generate(&cluster, ObjectType::Container).to_string();
    JobRequest {
        credentials_file: dir.join(format!("{uuid}.json")),
        container_uuid: uuid,
        ram: 64 << 20,
        vcpus: 1,
        partitions: Vec::new(),
        max_run_time: 600,
        tmp: 0,
        gpu: GpuRequest::default(),
        priority: 1,
    }
}

/// Polls the status query until `done` holds for the job named `name`
/// (`None` when it is not listed).
async fn wait_for(
    backend: &mut SlurmBackend<ProcessRunner>,
    name: &str,
    what: &str,
    done: impl Fn(Option<&BatchJob>) -> bool,
) -> Option<BatchJob> {
    let deadline = Instant::now() + WAIT;
    loop {
        let jobs = backend.status().await.unwrap();
        let job = jobs.iter().find(|job| job.name == name);
        if done(job) {
            return job.cloned();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last status: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn running_job_listed_then_cancelled() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backend = backend(dir.path(), &[]);
    let request = request(dir.path());
    let name = request.container_uuid.clone();

    let submission = backend.submit(&request).await.unwrap();
    let mut guard = JobGuard(Some(submission.job_id.clone()));
    assert!(submission
        .script
        .as_deref()
        .unwrap()
        .contains("it'\\''s here/fake-berth"));

    let job = wait_for(&mut backend, &name, "the job runs", |job| {
        job.is_some_and(|job| job.state == JobState::Running)
    })
    .await
    .unwrap();
    assert_eq!(job.id, submission.job_id);

    // The stand-in got the supervisor's arguments through the real shell.
    let args_file = dir.path().join("it's here/args.txt");
    let deadline = Instant::now() + WAIT;
    while !args_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the job script never ran the program"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let args = std::fs::read_to_string(&args_file).unwrap();
    let credentials = request.credentials_file.to_str().unwrap().to_string();
    let expected: Vec<&str> = vec![
        "supervise",
        "--credentials",
        credentials.as_str(),
        name.as_str(),
    ];
    assert_eq!(args.lines().collect::<Vec<_>>(), expected);
    let cwd = std::fs::read_to_string(dir.path().join("it's here/cwd.txt")).unwrap();
    assert_eq!(
        cwd, "/\n",
        "the job starts in /, not in the test's directory"
    );

    backend.cancel(&job).await.unwrap();
    wait_for(&mut backend, &name, "the job leaves the queue", |job| {
        job.is_none()
    })
    .await;
    guard.0 = None;
    // Cancelling a job that has ended succeeds.
    backend.cancel(&job).await.unwrap();
}

#[tokio::test]
async fn pending_job_cancelled_before_start() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backend = backend(dir.path(), &["--hold"]);
    let mut request = request(dir.path());
    request.max_run_time = 61;
    let name = request.container_uuid.clone();

    let submission = backend.submit(&request).await.unwrap();
    let mut guard = JobGuard(Some(submission.job_id.clone()));
    let job = wait_for(&mut backend, &name, "the held job is listed", |job| {
        job.is_some()
    })
    .await
    .unwrap();
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.reason, "JobHeldUser");
    assert_eq!(
        backend.explain_reason(&job.reason),
        Some("it is held by its user")
    );

    // Slurm got max_run_time, rounded up to whole minutes, and `/` as the
    // working directory.
    let (time_limit, work_dir) = squeue_fields(&job.id, "%l|%Z");
    assert_eq!(time_limit, "2:00");
    assert_eq!(work_dir, "/");

    backend.cancel(&job).await.unwrap();
    wait_for(&mut backend, &name, "the job leaves the queue", |job| {
        job.is_none()
    })
    .await;
    guard.0 = None;
    assert!(
        !dir.path().join("it's here/args.txt").exists(),
        "the job never ran"
    );
}

/// Asks squeue for two `|`-separated fields of one job.
fn squeue_fields(id: &JobId, format: &str) -> (String, String) {
    let output = std::process::Command::new("squeue")
        .args(["--noheader", "--jobs", id.as_str(), "--format", format])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let (first, second) = text.trim().split_once('|').unwrap();
    (first.to_string(), second.to_string())
}

#[tokio::test]
async fn too_many_cpus_pend_with_partition_config() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backend = backend(dir.path(), &[]);
    let mut request = request(dir.path());
    // More CPUs than any node has: with EnforcePartLimits=NO, as on this
    // machine, Slurm queues the job and leaves it pending.
    request.vcpus = 64;
    let name = request.container_uuid.clone();

    let submission = backend.submit(&request).await.unwrap();
    let mut guard = JobGuard(Some(submission.job_id.clone()));
    let job = wait_for(&mut backend, &name, "the job lists a reason", |job| {
        job.is_some_and(|job| !job.reason.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.reason, "PartitionConfig");
    assert!(backend
        .explain_reason(&job.reason)
        .unwrap()
        .contains("more CPUs or memory"));

    backend.cancel(&job).await.unwrap();
    wait_for(&mut backend, &name, "the job leaves the queue", |job| {
        job.is_none()
    })
    .await;
    guard.0 = None;
}

#[tokio::test]
async fn unknown_container_partition_is_permanent() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backend = backend(dir.path(), &[]);
    let mut request = request(dir.path());
    request.partitions = vec!["no-such-partition".to_string()];
    let err = backend.submit(&request).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    let text = err.to_string();
    assert!(text.contains("Invalid partition name specified"), "{text}");
    assert!(text.contains("--partition=no-such-partition"), "{text}");
}

#[tokio::test]
async fn gpus_on_a_cluster_without_gpus_are_permanent() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backend = backend(dir.path(), &[]);
    let mut request = request(dir.path());
    request.gpu = GpuRequest {
        stack: "cuda".into(),
        count: 1,
        ..GpuRequest::default()
    };
    let err = backend.submit(&request).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("Invalid generic resource (gres) specification"),
        "{text}"
    );
    assert!(text.contains("--gres=gpu:1"), "{text}");
}

/// Returns the largest `TmpDisk` of the nodes, in MiB.
fn node_tmp_disk_mib() -> u64 {
    let output = std::process::Command::new("scontrol")
        .args(["show", "node", "-o"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .filter_map(|field| field.strip_prefix("TmpDisk="))
        .map(|mib| mib.parse::<u64>().unwrap())
        .max()
        .expect("scontrol show node lists no TmpDisk")
}

#[tokio::test]
async fn tmp_mounts_request_node_scratch_space() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    // More scratch space than the node's TmpDisk (the free space of
    // Slurm's TmpFS): sbatch rejects the job. A held job would be queued
    // instead, so this one is not held.
    let mut huge = request(dir.path());
    huge.tmp = (node_tmp_disk_mib() + 1024) << 20;
    let result = backend(dir.path(), &[]).submit(&huge).await;
    let _huge_guard = JobGuard(result.as_ref().ok().map(|s| s.job_id.clone()));
    let err = result.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string()
            .contains("Temporary disk specification can not be satisfied"),
        "{err}"
    );

    // 1 GiB fits; the job is held, so it never runs, and is cancelled.
    let held_dir = tempfile::tempdir().unwrap();
    let mut small = request(held_dir.path());
    small.tmp = 1 << 30;
    let submission = backend(held_dir.path(), &["--hold"])
        .submit(&small)
        .await
        .unwrap();
    let _guard = JobGuard(Some(submission.job_id.clone()));
    assert!(
        submission.command.contains("--tmp=1024"),
        "{}",
        submission.command
    );
    let output = std::process::Command::new("scontrol")
        .args(["show", "job", "-o", submission.job_id.as_str()])
        .output()
        .unwrap();
    let fields = String::from_utf8_lossy(&output.stdout);
    assert!(fields.contains("MinTmpDiskNode=1G"), "{fields}");
}

/// Submits `count` jobs that stay pending (`extra` keeps them back) and
/// waits until the status query lists them all.
async fn pending_jobs(
    backend: &mut SlurmBackend<ProcessRunner>,
    dir: &Path,
    count: usize,
) -> (Vec<JobId>, Vec<JobGuard>) {
    let mut ids = Vec::new();
    let mut guards = Vec::new();
    for _ in 0..count {
        let submission = backend.submit(&request(dir)).await.unwrap();
        guards.push(JobGuard(Some(submission.job_id.clone())));
        ids.push(submission.job_id);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let jobs = backend.status().await.unwrap();
        let listed = ids.iter().all(|id| {
            jobs.iter()
                .any(|job| &job.id == id && job.state == JobState::Pending)
        });
        if listed {
            return (ids, guards);
        }
        assert!(Instant::now() < deadline, "jobs not listed: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Returns each job's nice value and Slurm priority, as squeue lists them.
fn nice_and_priority(ids: &[JobId]) -> Vec<(i64, u64)> {
    ids.iter()
        .map(|id| {
            let (nice, priority) = squeue_fields(id, "%y|%Q");
            (
                nice.trim().parse().unwrap(),
                priority.trim().parse().unwrap(),
            )
        })
        .collect()
}

/// Checks that for each pair `(a, b)` Slurm ranks job `a` above job `b`.
/// Slurm's basic priority plugin gives each new job a priority just below
/// the lowest one it holds, and never less than 1. On this node new jobs
/// got 1 after the outage test's slurmctld restarts (`InitPrio=1` in
/// slurmctld's log). Their nice values then no longer ordered them, so the
/// order is checked only when the jobs are well above that floor.
fn assert_slurm_order(seen: &[(i64, u64)], pairs: &[(usize, usize)]) {
    if seen.iter().any(|(_, priority)| *priority <= 1000) {
        eprintln!("Slurm gives new jobs its floor priority: {seen:?}; not checking its order");
        return;
    }
    for &(above, below) in pairs {
        assert!(seen[above].1 > seen[below].1, "{seen:?}");
    }
}

#[tokio::test]
async fn pending_jobs_follow_container_priorities() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A begin time an hour ahead keeps the jobs pending with a real Slurm
    // priority (a held job's is 0).
    let mut backend = backend(dir.path(), &["--begin=now+3600"]);
    let (ids, _guards) = pending_jobs(&mut backend, dir.path(), 4).await;

    // Container priorities: the third job first, the first and fourth tied,
    // the second last.
    let priorities = [20, 10, 30, 20];
    let jobs: Vec<(JobId, i64)> = ids.iter().cloned().zip(priorities).collect();
    backend.reprioritise(&jobs).await.unwrap();
    let seen = nice_and_priority(&ids);
    let nices: Vec<i64> = seen.iter().map(|(nice, _)| *nice).collect();
    assert_eq!(nices, [10, 20, 0, 10], "{seen:?}");
    // Slurm's own order follows: higher container priority, higher Slurm
    // priority.
    assert_slurm_order(&seen, &[(2, 0), (2, 3), (0, 1), (3, 1)]);

    // The next poll, same order: nothing changes.
    backend.status().await.unwrap();
    backend.reprioritise(&jobs).await.unwrap();
    assert_eq!(nice_and_priority(&ids), seen);

    // The second job becomes the most important. Its value is still close
    // enough to the base to keep; the jobs after it move above it.
    let priorities = [20, 40, 30, 20];
    let jobs: Vec<(JobId, i64)> = ids.iter().cloned().zip(priorities).collect();
    backend.status().await.unwrap();
    backend.reprioritise(&jobs).await.unwrap();
    let seen = nice_and_priority(&ids);
    let nices: Vec<i64> = seen.iter().map(|(nice, _)| *nice).collect();
    assert_eq!(nices, [40, 20, 30, 40], "{seen:?}");
    assert_slurm_order(&seen, &[(1, 2), (2, 0)]);

    // A new job waits behind the listed ones until a poll places it.
    let submission = backend.submit(&request(dir.path())).await.unwrap();
    let _guard = JobGuard(Some(submission.job_id.clone()));
    let (nice, _) = nice_and_priority(&[submission.job_id])[0];
    assert!(nice >= 50, "new job's nice {nice}");
}

#[tokio::test]
async fn ended_job_leaves_others_reniced() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backend = backend(dir.path(), &["--hold"]);
    let (ids, _guards) = pending_jobs(&mut backend, dir.path(), 3).await;
    // The last job ends between the status query and the renice, which
    // names it in the same call as the second job (the two tie).
    let status = std::process::Command::new("scancel")
        .arg(ids[2].as_str())
        .status()
        .unwrap();
    assert!(status.success());
    let jobs: Vec<(JobId, i64)> = ids.iter().cloned().zip([3, 1, 1]).collect();
    backend.reprioritise(&jobs).await.unwrap();
    let seen = nice_and_priority(&ids[..2]);
    assert_eq!(
        seen.iter().map(|(nice, _)| *nice).collect::<Vec<_>>(),
        [0, 10]
    );
}

#[tokio::test]
async fn scancelled_job_end_reason_names_the_cancel() {
    if !enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backend = backend(dir.path(), &[]);
    let request = request(dir.path());
    let name = request.container_uuid.clone();
    let submission = backend.submit(&request).await.unwrap();
    let mut guard = JobGuard(Some(submission.job_id.clone()));
    wait_for(&mut backend, &name, "the job runs", |job| {
        job.is_some_and(|job| job.state == JobState::Running)
    })
    .await;

    // Cancelled from outside, as an administrator would.
    let status = std::process::Command::new("scancel")
        .arg(submission.job_id.as_str())
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(&mut backend, &name, "the job leaves the queue", |job| {
        job.is_none()
    })
    .await;
    guard.0 = None;

    let reason = backend.end_reason(&submission.job_id).await.unwrap();
    let expected = format!("slurm job {} ended CANCELLED", submission.job_id);
    let reason = reason.expect("Slurm keeps an ended job for MinJobAge");
    assert!(reason.starts_with(&expected), "{reason}");
    assert!(reason.contains("exit code "), "{reason}");

    // A job Slurm never had keeps no reason; without accounting, sacct
    // finds none either.
    assert_eq!(
        backend.end_reason(&JobId::new("999999999")).await.unwrap(),
        None
    );
}
