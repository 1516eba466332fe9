//! The dispatch loop with the LSF backend, against the stand-in `bsub`,
//! `bjobs` and `bkill` of `tests/lsf-stand-ins` and the in-memory
//! controller of [`crate::fake`].
//!
//! LSF cannot be installed here: the stand-ins are shell scripts that print
//! LSF's output formats and keep each job's state in a temporary
//! directory. The test plays LSF's scheduler by writing a job's state.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_core::ContainerState;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::command::ProcessRunner;
use crate::fake::{queued_container, FakeController, TOKEN_UUID};
use crate::tracker::{REJECTED_ERROR, SCHEDULING_STATUS_KEY};
use crate::{CredentialsStore, Dispatcher, LsfBackend, LsfConfig, SupervisorCommand};

const A: &str = "zzzzz-dz642-00000000000000a";
const B: &str = "zzzzz-dz642-00000000000000b";
/// Time between two passes.
const PASS: Duration = Duration::from_secs(2);

const STAND_INS: &[(&str, &str)] = &[
    ("bsub", include_str!("../tests/lsf-stand-ins/bsub")),
    ("bjobs", include_str!("../tests/lsf-stand-ins/bjobs")),
    ("bkill", include_str!("../tests/lsf-stand-ins/bkill")),
];

/// Writes the stand-ins into `dir/bin` and returns the configuration that
/// names them by path, and the state directory.
fn install_stand_ins(dir: &Path) -> (LsfConfig, PathBuf) {
    let bin = dir.join("bin");
    let state = dir.join("state");
    std::fs::create_dir(&bin).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("next"), "101\n").unwrap();
    for (name, text) in STAND_INS {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = LsfConfig {
        bsub: bin.join("bsub"),
        bjobs: bin.join("bjobs"),
        bkill: bin.join("bkill"),
        ..LsfConfig::default()
    };
    (config, state)
}

fn set_job_state(state: &Path, id: &str, stat: &str, name: &str) {
    std::fs::write(state.join(format!("{id}.job")), format!("{stat} {name}\n")).unwrap();
}

fn bkill_calls(state: &Path) -> String {
    std::fs::read_to_string(state.join("bkill.log")).unwrap_or_default()
}

#[tokio::test]
async fn lsf_loop_submits_tracks_cancels_and_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let (config, state) = install_stand_ins(dir.path());
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o700)).unwrap();
    let store = CredentialsStore::open(
        &credentials,
        Url::parse("http://127.0.0.1:8000/").unwrap(),
        false,
    )
    .unwrap();
    let supervisor = SupervisorCommand {
        program: "/usr/local/bin/berth".into(),
        config_file: None,
    };
    let runner = ProcessRunner::new(Duration::from_secs(10));
    let backend = LsfBackend::new(config, supervisor, runner, "berth".into());
    let controller = FakeController::default();
    let mut dispatcher = Dispatcher::new(
        Box::new(controller.clone()),
        backend,
        "zzzzz".parse().unwrap(),
        store,
        TOKEN_UUID.to_string(),
    );
    let shutdown = CancellationToken::new();
    let mut now = Instant::now();

    // Submitted through bsub, with LSF's job id recorded.
    controller.add(queued_container(A, 1));
    now += PASS;
    dispatcher.resync(now, &shutdown).await.unwrap();
    let container = controller.container(A);
    assert_eq!(container.state, ContainerState::Locked);
    assert_eq!(container.scheduler_job_id.as_deref(), Some("101"));

    // Pending: LSF's reason reaches the container.
    for _ in 0..2 {
        now += PASS;
        dispatcher.poll(now, &shutdown).await.unwrap();
    }
    let status = controller.container(A).runtime_status;
    let scheduling = status
        .get(SCHEDULING_STATUS_KEY)
        .and_then(|value| value.as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        scheduling.contains("New job is waiting for scheduling"),
        "{status:?}"
    );

    // A failing bjobs while the job exists: nothing is cancelled.
    std::fs::write(state.join("down"), "").unwrap();
    for _ in 0..3 {
        now += PASS;
        assert!(dispatcher.poll(now, &shutdown).await.is_err());
    }
    std::fs::remove_file(state.join("down")).unwrap();
    assert_eq!(bkill_calls(&state), "");
    assert_eq!(controller.container(A).state, ContainerState::Locked);

    // Running, then cancelled by priority 0: TERM to the running job.
    set_job_state(&state, "101", "RUN", A);
    controller.change(A, |c| c.state = ContainerState::Running);
    now += PASS;
    dispatcher.poll(now, &shutdown).await.unwrap();
    assert_eq!(bkill_calls(&state), "");
    controller.change(A, |c| c.priority = 0);
    now += PASS;
    dispatcher.resync(now, &shutdown).await.unwrap();
    assert_eq!(bkill_calls(&state), "-s TERM 101\n");

    // A queue LSF does not have: the container is cancelled with bsub's
    // message.
    let mut rejected = queued_container(B, 1);
    rejected.scheduling_parameters.partitions = vec!["nosuch".into()];
    controller.add(rejected);
    now += PASS;
    dispatcher.resync(now, &shutdown).await.unwrap();
    let container = controller.container(B);
    assert_eq!(container.state, ContainerState::Cancelled);
    assert_eq!(container.runtime_status["error"], REJECTED_ERROR);
    let detail = container.runtime_status["errorDetail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains("nosuch: No such queue"), "{detail}");
}
