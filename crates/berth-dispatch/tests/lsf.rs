//! The LSF adapter against stand-in `bsub`, `bjobs` and `bkill` programs.
//!
//! LSF is proprietary and cannot be installed here, so these programs are
//! stand-ins, not LSF. They are small shell scripts, placed first on `PATH`.
//! They print LSF's output formats (`Job <ID> is submitted to queue <Q>.`,
//! `bjobs -json` records, `No unfinished job found`, bkill's messages) and
//! keep each job's state in a file of a temporary directory.
//! The test plays the scheduler itself: it starts a job by writing `RUN`
//! into its state file. The adapter runs the stand-ins through the real
//! process runner, so arguments, stdin and exit codes cross a real process
//! boundary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_dispatch::command::ProcessRunner;
use berth_dispatch::lsf::check_programs;
use berth_dispatch::{
    Backend, BatchJob, GpuRequest, JobId, JobRequest, JobState, LsfBackend, LsfConfig,
    SupervisorCommand,
};

const UUID: &str = "zzzzz-dz642-000000000000042";

/// The stand-in `bsub`: accepts the queues `normal` and `short`, saves the
/// job script from stdin, and queues the job as `PEND`.
const BSUB: &str = include_str!("lsf-stand-ins/bsub");

/// The stand-in `bjobs -json -o "jobid job_name stat pend_reason" -u USER`:
/// lists unfinished jobs, or prints `No unfinished job found`; fails as LSF
/// does while the file `down` exists.
const BJOBS: &str = include_str!("lsf-stand-ins/bjobs");

/// The stand-in `bkill [-s SIGNAL] ID`: records the call and ends the job.
const BKILL: &str = include_str!("lsf-stand-ins/bkill");

/// Writes the stand-ins into `dir/bin` and puts that directory first on
/// `PATH`. Returns the state directory.
fn install_stand_ins(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    let state = dir.join("state");
    std::fs::create_dir(&bin).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("next"), "101\n").unwrap();
    for (name, text) in [("bsub", BSUB), ("bjobs", BJOBS), ("bkill", BKILL)] {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin];
    dirs.extend(std::env::split_paths(&path));
    // This file has one test, so no other test reads PATH meanwhile.
    std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());
    state
}

fn request(partitions: &[&str]) -> JobRequest {
    JobRequest {
        container_uuid: UUID.to_string(),
        ram: 1 << 30,
        vcpus: 2,
        partitions: partitions.iter().map(|p| p.to_string()).collect(),
        max_run_time: 3600,
        tmp: 0,
        gpu: GpuRequest::default(),
        priority: 1,
        credentials_file: PathBuf::from(format!("/creds/{UUID}.json")),
    }
}

fn set_state(state: &Path, id: &JobId, stat: &str) {
    std::fs::write(state.join(format!("{id}.job")), format!("{stat} {UUID}\n")).unwrap();
}

#[tokio::test]
async fn lsf_stand_ins_submit_track_cancel_and_reject() {
    let dir = tempfile::tempdir().unwrap();
    let state = install_stand_ins(dir.path());
    let config = LsfConfig::default();
    check_programs(&config).unwrap();
    let supervisor = SupervisorCommand {
        program: "/usr/local/bin/berth".into(),
        config_file: None,
    };
    let runner = ProcessRunner::new(Duration::from_secs(10));
    let mut backend = LsfBackend::new(config, supervisor, runner, "berth".into());

    // Nothing submitted: bjobs's message for no jobs is an empty queue.
    assert_eq!(backend.status().await.unwrap(), vec![]);

    // Submit: the job id comes from bsub's output, the script from stdin.
    let submission = backend.submit(&request(&["short"])).await.unwrap();
    let id = submission.job_id.clone();
    assert_eq!(id, JobId::new("101"));
    let script = std::fs::read_to_string(state.join("101.script")).unwrap();
    assert!(script.contains("'supervise'"), "{script}");
    assert!(script.contains(UUID), "{script}");

    // Pending, with LSF's reason.
    let jobs = backend.status().await.unwrap();
    assert_eq!(
        jobs,
        [BatchJob {
            id: id.clone(),
            name: UUID.to_string(),
            state: JobState::Pending,
            reason: "New job is waiting for scheduling".to_string(),
        }]
    );

    // A failing bjobs is an error, never an empty queue.
    std::fs::write(state.join("down"), "").unwrap();
    let err = backend.status().await.unwrap_err();
    assert!(err.to_string().contains("LSF is down"), "{err}");
    std::fs::remove_file(state.join("down")).unwrap();

    // Running, then cancelled with TERM; the job leaves the list.
    set_state(&state, &id, "RUN");
    let jobs = backend.status().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, JobState::Running);
    assert_eq!(jobs[0].reason, "");
    backend.cancel(&jobs[0]).await.unwrap();
    assert_eq!(backend.status().await.unwrap(), vec![]);

    // Cancelling it again: the job has already finished, which is success.
    backend.cancel(&jobs[0]).await.unwrap();

    // A pending job is removed without a signal.
    let pending = backend.submit(&request(&[])).await.unwrap();
    let jobs = backend.status().await.unwrap();
    assert_eq!(jobs[0].id, pending.job_id);
    backend.cancel(&jobs[0]).await.unwrap();
    let kills = std::fs::read_to_string(state.join("bkill.log")).unwrap();
    assert_eq!(kills, "-s TERM 101\n-s TERM 101\n102\n");

    // A queue LSF does not have, named by the container: permanent.
    let err = backend.submit(&request(&["nosuch"])).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("No such queue"), "{err}");
    assert!(!state.join("103.job").exists());
}
