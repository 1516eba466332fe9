//! The dispatch loop with the Slurm backend behind the call limiter:
//! global backoff while slurmctld is down, concurrent submission of a
//! burst, and the metrics endpoint.
//!
//! The batch system is [`ScriptedSlurm`], a command runner that plays
//! `sbatch`, `squeue`, `scancel` and `scontrol` in memory, in their output
//! formats, so that the real Slurm adapter, limiter and loop run on
//! tokio's paused clock. The real commands are tested in `tests/slurm.rs`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_core::ContainerState;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::command::{CommandError, CommandOutput, CommandRunner, CommandSpec};
use crate::config::SubmitRetryConfig;
use crate::fake::{queued_container, FakeController, TOKEN_UUID};
use crate::limiter::{call_name, CallLimiter, LimitedRunner, LimiterSettings};
use crate::metrics::{self, Metrics};
use crate::tracker::SCHEDULING_STATUS_KEY;
use crate::{CredentialsStore, Dispatcher, SlurmBackend, SlurmConfig, SupervisorCommand};

const A: &str = "zzzzz-dz642-00000000000000a";
const B: &str = "zzzzz-dz642-00000000000000b";
const C: &str = "zzzzz-dz642-00000000000000c";

/// What every Slurm command prints while slurmctld is down (slurm-wlm 22.05).
const UNREACHABLE: &str = "error: Unable to contact slurm controller (connect failure)";
/// What sbatch prints when slurmctld does not respond in time.
const SOCKET_TIMEOUT: &str =
    "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation";

#[derive(Debug, Default)]
struct SlurmState {
    /// Job id, name and state of each job in the queue.
    jobs: BTreeMap<u64, (String, String)>,
    next_id: u64,
    /// Whether slurmctld is down: every command fails.
    down: bool,
    /// sbatch calls still to fail with a socket timeout.
    sbatch_timeouts: u32,
    /// Time each sbatch takes.
    sbatch_time: Duration,
    /// Program name of every call, in order.
    calls: Vec<String>,
    in_flight: usize,
    max_in_flight: usize,
}

/// Slurm's commands, played in memory.
#[derive(Debug, Clone, Default)]
struct ScriptedSlurm {
    state: Arc<Mutex<SlurmState>>,
}

impl ScriptedSlurm {
    fn state(&self) -> MutexGuard<'_, SlurmState> {
        self.state.lock().unwrap()
    }

    fn count(&self, program: &str) -> usize {
        self.state().calls.iter().filter(|c| *c == program).count()
    }

    fn set_job_state(&self, name: &str, job_state: &str) {
        for (job_name, state) in self.state().jobs.values_mut() {
            if job_name == name {
                *state = job_state.to_string();
            }
        }
    }

    /// Returns the names of the queued jobs, one per job.
    fn job_names(&self) -> Vec<String> {
        self.state()
            .jobs
            .values()
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn answer(&self, program: &str, spec: &CommandSpec) -> CommandOutput {
        let mut state = self.state();
        if state.down {
            return CommandOutput::exited(1, "", &format!("{program}: {UNREACHABLE}\n"));
        }
        match program {
            "sbatch" => {
                if state.sbatch_timeouts > 0 {
                    state.sbatch_timeouts -= 1;
                    return CommandOutput::exited(1, "", SOCKET_TIMEOUT);
                }
                let name = spec
                    .args
                    .iter()
                    .find_map(|arg| arg.strip_prefix("--job-name="))
                    .unwrap_or_default()
                    .to_string();
                state.next_id += 1;
                let id = state.next_id;
                state.jobs.insert(id, (name, "PENDING".into()));
                CommandOutput::ok(&format!("{id}\n"))
            }
            "squeue" => {
                let lines: String = state
                    .jobs
                    .iter()
                    .map(|(id, (name, job_state))| format!("{id}|{job_state}|0|None|{name}\n"))
                    .collect();
                CommandOutput::ok(&lines)
            }
            "scancel" => {
                if let Some(id) = spec.args.last().and_then(|id| id.parse::<u64>().ok()) {
                    state.jobs.remove(&id);
                }
                CommandOutput::ok("")
            }
            _ => CommandOutput::ok(""),
        }
    }
}

#[async_trait]
impl CommandRunner for ScriptedSlurm {
    async fn run(&self, spec: &CommandSpec) -> Result<CommandOutput, CommandError> {
        let program = call_name(&spec.program);
        let delay = {
            let mut state = self.state();
            state.calls.push(program.clone());
            state.in_flight += 1;
            state.max_in_flight = state.max_in_flight.max(state.in_flight);
            if program == "sbatch" {
                state.sbatch_time
            } else {
                Duration::ZERO
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let output = self.answer(&program, spec);
        self.state().in_flight -= 1;
        Ok(output)
    }
}

fn settings() -> LimiterSettings {
    LimiterSettings {
        max_concurrent: 4,
        max_rate: 100.0,
        burst: 100,
        slow_call: Duration::from_secs(10),
        backoff_first: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
    }
}

struct Setup {
    controller: FakeController,
    slurm: ScriptedSlurm,
    limiter: Arc<CallLimiter>,
    metrics: Arc<Metrics>,
    dispatcher: Dispatcher<SlurmBackend<LimitedRunner<ScriptedSlurm>>>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let store = CredentialsStore::open(
            dir.path(),
            Url::parse("http://127.0.0.1:8000/").unwrap(),
            false,
        )
        .unwrap();

        let controller = FakeController::default();
        let slurm = ScriptedSlurm::default();
        let metrics = Metrics::new();
        let limiter = CallLimiter::new(settings(), Arc::clone(&metrics));
        let supervisor = SupervisorCommand {
            program: "/usr/local/bin/berth".into(),
            config_file: None,
        };

        let runner = LimitedRunner::new(slurm.clone(), Arc::clone(&limiter));
        let backend =
            SlurmBackend::with_user(SlurmConfig::default(), supervisor, runner, "1001".into());
        let dispatcher = Dispatcher::new(
            Box::new(controller.clone()),
            backend,
            "zzzzz".parse().unwrap(),
            store,
            TOKEN_UUID.to_string(),
        )
        .with_limits(
            Arc::clone(&limiter),
            Arc::clone(&metrics),
            SubmitRetryConfig::default(),
        );
        Setup {
            controller,
            slurm,
            limiter,
            metrics,
            dispatcher,
            shutdown: CancellationToken::new(),
            _dir: dir,
        }
    }

    /// Runs a resynchronisation now; returns whether it succeeded.
    async fn resync(&mut self) -> bool {
        self.dispatcher.resync(now(), &self.shutdown).await.is_ok()
    }

    fn job_id(&self, uuid: &str) -> Option<String> {
        self.controller.container(uuid).scheduler_job_id
    }
}

/// Returns the loop's clock: tokio's, paused in these tests.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[tokio::test(start_paused = true)]
async fn slurmctld_outage_backs_off_and_cancels_nothing() {
    let mut s = Setup::new();
    s.controller.add(queued_container(A, 1));
    s.controller.add(queued_container(B, 1));
    assert!(s.resync().await);
    assert_eq!(s.slurm.count("sbatch"), 2);
    s.controller
        .change(A, |c| c.state = ContainerState::Running);
    s.slurm.set_job_state(A, "RUNNING");
    assert!(s.resync().await);

    // slurmctld stops for 30 s while a new container is queued.
    s.slurm.state().down = true;
    s.controller.add(queued_container(C, 1));
    let squeues_before = s.slurm.count("squeue");
    assert!(
        !s.resync().await,
        "a pass succeeded while slurmctld was down"
    );
    assert!(s.limiter.backoff_remaining().is_some());
    // A change reported by the feed locks nothing while calls back off.
    s.dispatcher
        .apply_changes(&[s.controller.container(C)], now(), &s.shutdown)
        .await;
    assert_eq!(s.controller.container(C).state, ContainerState::Queued);
    let mut passes = 1;
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < outage_end {
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            !s.resync().await,
            "a pass succeeded while slurmctld was down"
        );
        passes += 1;
    }
    let squeues = s.slurm.count("squeue") - squeues_before;
    assert!(
        squeues < passes,
        "{squeues} squeue calls in {passes} passes: the backoff skipped none"
    );
    assert!(
        squeues >= 4,
        "{squeues} squeue calls: the backoff never probed"
    );
    assert_eq!(s.slurm.count("scancel"), 0, "a job was cancelled");
    assert_eq!(s.slurm.count("sbatch"), 2, "a job was submitted");
    assert_eq!(s.controller.container(A).state, ContainerState::Running);
    assert_eq!(s.controller.container(B).state, ContainerState::Locked);
    assert_eq!(s.controller.container(C).state, ContainerState::Queued);
    let text = s.metrics.render();
    assert!(
        !text.contains("berth_dispatch_scheduler_backoff_seconds 0\n"),
        "{text}"
    );

    // slurmctld is back: once the delay has run out, the next pass
    // succeeds, submits the new container and leaves the others alone.
    s.slurm.state().down = false;
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(s.resync().await);
    assert_eq!(s.limiter.backoff_remaining(), None);
    assert_eq!(s.slurm.count("scancel"), 0);
    assert_eq!(s.slurm.count("sbatch"), 3);
    let mut names = s.slurm.job_names();
    names.sort();
    assert_eq!(names, [A, B, C], "one job per container");
    assert_eq!(s.controller.container(A).state, ContainerState::Running);
    assert_eq!(s.controller.container(C).state, ContainerState::Locked);
    assert!(s.job_id(C).is_some());
}

#[tokio::test(start_paused = true)]
async fn submit_timeout_backs_off_globally_and_per_container() {
    let mut s = Setup::new();
    s.slurm.state().sbatch_timeouts = 1;
    s.controller.add(queued_container(A, 1));
    assert!(s.resync().await);
    assert_eq!(s.slurm.count("sbatch"), 1);
    let status = s.controller.container(A).runtime_status[SCHEDULING_STATUS_KEY]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        status.starts_with("submission attempt 1 of 10 failed; the next attempt is at"),
        "{status}"
    );
    assert!(status.contains("Socket timed out"), "{status}");
    assert!(s.limiter.backoff_remaining().is_some());

    // During the global backoff no command runs at all.
    let calls = s.slurm.state().calls.len();
    assert!(!s.resync().await);
    assert_eq!(s.slurm.state().calls.len(), calls, "a command ran");

    // The global backoff (at most 1 s) ends before the container's own
    // (at most 2 s): a pass in between probes with squeue but submits
    // nothing yet.
    tokio::time::advance(Duration::from_millis(1000)).await;
    assert!(s.resync().await);
    assert_eq!(s.slurm.count("sbatch"), 1, "submitted before its delay");
    tokio::time::advance(Duration::from_millis(1000)).await;
    assert!(s.resync().await);
    assert_eq!(s.slurm.count("sbatch"), 2);
    assert_eq!(s.slurm.job_names(), [A]);
    assert_eq!(s.job_id(A).as_deref(), Some("1"));
    assert!(s.resync().await);
    assert!(
        !s.controller
            .container(A)
            .runtime_status
            .contains_key(SCHEDULING_STATUS_KEY),
        "the failure still shows after the job was listed"
    );
}

#[tokio::test(start_paused = true)]
async fn burst_submitted_concurrently_one_job_each() {
    let mut s = Setup::new();
    s.slurm.state().sbatch_time = Duration::from_millis(100);
    let uuids: Vec<String> = (0..40).map(|i| format!("zzzzz-dz642-{i:015}")).collect();
    for uuid in &uuids {
        s.controller.add(queued_container(uuid, 1));
    }
    let start = tokio::time::Instant::now();
    assert!(s.resync().await);
    let elapsed = start.elapsed();

    assert_eq!(s.slurm.state().max_in_flight, 4, "max_concurrent is 4");
    // 40 submissions of 100 ms, 4 at a time, take 1 s of the paused
    // clock; one at a time would take 4 s.
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    let mut names = s.slurm.job_names();
    names.sort();
    assert_eq!(names, uuids, "one job per container");
    let jobs = s.slurm.state().jobs.clone();
    for uuid in &uuids {
        let id: u64 = s.job_id(uuid).unwrap().parse().unwrap();
        assert_eq!(jobs[&id].0, *uuid, "the recorded job is the container's");
    }
    assert!(s.resync().await);
    assert_eq!(s.slurm.count("sbatch"), 40, "a job was submitted twice");
}

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

#[tokio::test]
async fn metrics_follow_submissions_and_failures() {
    let mut s = Setup::new();
    let shutdown = CancellationToken::new();
    let (addr, server) = metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        Arc::clone(&s.metrics),
        None,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let url = format!("http://{addr}/metrics");
    let before = scrape(&url).await;
    assert!(
        before.contains("berth_dispatch_submissions_total 0\n"),
        "{before}"
    );

    s.controller.add(queued_container(A, 1));
    assert!(s.resync().await);
    let after_submit = scrape(&url).await;
    for line in [
        "berth_dispatch_submissions_total 1\n",
        "berth_dispatch_scheduler_call_duration_seconds_count{call=\"sbatch\"} 1\n",
        "berth_dispatch_scheduler_call_duration_seconds_count{call=\"squeue\"} 1\n",
        "berth_dispatch_containers{state=\"Locked\"} 1\n",
        "berth_dispatch_scheduler_backoff_seconds 0\n",
    ] {
        assert!(after_submit.contains(line), "{line}: {after_submit}");
    }

    s.slurm.state().sbatch_timeouts = 1;
    s.controller.add(queued_container(B, 1));
    assert!(s.resync().await);
    let after_failure = scrape(&url).await;
    for line in [
        "berth_dispatch_submissions_total 1\n",
        "berth_dispatch_submit_failures_total{class=\"transient\"} 1\n",
        "berth_dispatch_scheduler_call_failures_total{call=\"sbatch\",class=\"transient\"} 1\n",
        "berth_dispatch_submit_backoff_containers 1\n",
        "berth_dispatch_batch_jobs{state=\"pending\"} 1\n",
    ] {
        assert!(after_failure.contains(line), "{line}: {after_failure}");
    }
    assert!(
        !after_failure.contains("berth_dispatch_scheduler_backoff_seconds 0\n"),
        "{after_failure}"
    );
    assert!(!after_failure.contains("zzzzz-"), "a UUID is exposed");
    shutdown.cancel();
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn run_polls_when_the_backoff_ends() {
    let mut s = Setup::new();
    s.slurm.state().down = true;
    let options = crate::LoopOptions {
        poll_interval: Duration::from_secs(10),
        resync_interval: Duration::from_secs(300),
        watch: false,
        feed_wait: Duration::from_secs(25),
    };
    let slurm = s.slurm.clone();
    let controller = s.controller.clone();
    let shutdown = s.shutdown.clone();
    let running = tokio::spawn(async move {
        s.dispatcher.run(options, &s.shutdown).await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(slurm.count("squeue"), 1, "the first pass");

    // slurmctld is back before the backoff (at most 1 s) ends: the next
    // pass comes when it ends, not at the poll 10 s later.
    slurm.state().down = false;
    controller.add(queued_container(A, 1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(slurm.count("squeue"), 2, "no pass when the backoff ended");
    assert_eq!(slurm.count("sbatch"), 1);
    assert_eq!(controller.container(A).state, ContainerState::Locked);

    shutdown.cancel();
    running.await.unwrap();
}
