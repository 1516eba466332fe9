//! The limit on the dispatcher's own calls to the batch system.
//!
//! Every command the Slurm and LSF backends run (`sbatch`, `squeue`,
//! `scancel`, `scontrol`, `sacct`, `bsub`, `bjobs`, `bkill`) goes through
//! one [`CallLimiter`], by way of [`LimitedRunner`]. The limiter enforces:
//!
//! - a maximum number of calls in flight at once;
//! - a maximum call rate, as a token bucket that refills at `max_rate`
//!   calls per second and contains at most `burst` calls;
//! - a global backoff. A call that fails transiently (it timed out, or the
//!   controller was unreachable or busy) or that took longer than
//!   `slow_call` starts a backoff, which doubles with each further such
//!   call up to `backoff_max`. While it lasts, calls fail at once with
//!   [`CommandError::BackingOff`] instead of reaching the batch system,
//!   and the dispatch loop neither locks nor submits. The first call after
//!   the delay probes the batch system: a success ends the backoff.
//!
//! Slurm's own RPC rate limit (`SlurmctldParameters=rl_enable`) gives each
//! user a bucket of 30 calls refilled at 2 per second by default
//! (slurm.conf(5)), so a site that enables it sets `max_rate: 2` and
//! `burst: 30` to stay below it.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::command::{CommandError, CommandOutput, CommandRunner, CommandSpec};
use crate::metrics::{FailureClass, Metrics};

/// Fragments of the batch systems' error output that mean the call may
/// pass later: the controller is down, unreachable or overloaded, or it
/// requests a retry. Matched without regard to case.
const TRANSIENT_ERRORS: &[&str] = &[
    // Slurm: slurmctld down or unreachable.
    "unable to contact slurm controller",
    "socket timed out",
    "connection refused",
    "connection timed out",
    "slurm_load_jobs error",
    // Slurm: slurmctld busy, or its RPC rate limit hit.
    "temporarily unable to accept job",
    "resource temporarily unavailable",
    "rpc rate limit",
    "try again",
    "busy",
    // LSF: mbatchd or LIM unreachable or busy.
    "batch system daemon not responding",
    "lsf daemon (lim) not responding",
    "lsf is processing your request",
    "cannot connect to lsf",
    "lsf is down",
];

/// The settings of a [`CallLimiter`], from `dispatch.scheduler_calls`.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSettings {
    /// Maximum calls in flight at once; at least 1.
    pub max_concurrent: usize,
    /// Calls per second the token bucket refills; above 0.
    pub max_rate: f64,
    /// Capacity of the bucket, so the largest burst; at least 1.
    pub burst: u32,
    /// A call that takes longer than this starts or extends the backoff,
    /// even when it succeeds.
    pub slow_call: Duration,
    /// First delay of the global backoff.
    pub backoff_first: Duration,
    /// Maximum delay of the global backoff.
    pub backoff_max: Duration,
}

impl LimiterSettings {
    /// Settings that never delay a call, for backends without a batch
    /// system to protect and for tests.
    pub fn unlimited() -> LimiterSettings {
        LimiterSettings {
            max_concurrent: Semaphore::MAX_PERMITS,
            max_rate: f64::INFINITY,
            burst: u32::MAX,
            slow_call: Duration::MAX,
            backoff_first: Duration::ZERO,
            backoff_max: Duration::ZERO,
        }
    }
}

/// The outcome of one call, as the limiter counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    Succeeded,
    /// Failed for a reason another try will not change soon, or one the
    /// limiter cannot judge.
    Failed,
    /// Failed in a way that shows the batch system is down or overloaded.
    Transient(String),
}

/// The global backoff in force.
#[derive(Debug, Clone)]
struct Backoff {
    /// The delay as last set, before jitter.
    delay: Duration,
    /// No call starts before this time.
    until: Instant,
}

#[derive(Debug)]
struct LimiterState {
    tokens: f64,
    refilled_at: Instant,
    backoff: Option<Backoff>,
}

/// The shared limit on calls to the batch system. See the module
/// documentation for what it enforces.
#[derive(Debug)]
pub struct CallLimiter {
    settings: LimiterSettings,
    permits: Arc<Semaphore>,
    state: Mutex<LimiterState>,
    metrics: Arc<Metrics>,
}

/// Permission for one call; the call's slot is freed when it is dropped.
#[derive(Debug)]
pub struct CallPermit {
    _permit: OwnedSemaphorePermit,
    started: Instant,
}

impl CallLimiter {
    pub fn new(settings: LimiterSettings, metrics: Arc<Metrics>) -> Arc<CallLimiter> {
        let permits = Arc::new(Semaphore::new(
            settings.max_concurrent.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let tokens = f64::from(settings.burst.max(1));
        Arc::new(CallLimiter {
            settings,
            permits,
            state: Mutex::new(LimiterState {
                tokens,
                refilled_at: Instant::now(),
                backoff: None,
            }),
            metrics,
        })
    }

    /// Creates a limiter that never delays a call.
    pub fn unlimited() -> Arc<CallLimiter> {
        CallLimiter::new(LimiterSettings::unlimited(), Metrics::new())
    }

    fn state(&self) -> MutexGuard<'_, LimiterState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the maximum number of calls in flight at once.
    pub fn max_concurrent(&self) -> usize {
        self.settings.max_concurrent.max(1)
    }

    /// Returns the time left of the global backoff, or `None` while calls
    /// may start.
    pub fn backoff_remaining(&self) -> Option<Duration> {
        let state = self.state();
        let backoff = state.backoff.as_ref()?;
        let now = Instant::now();
        (backoff.until > now).then(|| backoff.until - now)
    }

    /// Waits for a free slot and a token for one call of `call` (a
    /// program's name, for logs). Fails at once with the time left while
    /// the global backoff lasts, also when the backoff began during the
    /// wait.
    pub async fn admit(&self, call: &str) -> Result<CallPermit, Duration> {
        if let Some(remaining) = self.backoff_remaining() {
            return Err(remaining);
        }
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            // The semaphore is never closed; treat a closed one as a
            // backoff without end rather than panic.
            return Err(self.settings.backoff_max);
        };
        self.take_token().await;
        if let Some(remaining) = self.backoff_remaining() {
            tracing::debug!(call, "a call waited into a backoff and is not made");
            return Err(remaining);
        }
        Ok(CallPermit {
            _permit: permit,
            started: Instant::now(),
        })
    }

    /// Takes one token from the bucket, waiting for the refill when it is
    /// empty.
    async fn take_token(&self) {
        if self.settings.max_rate.is_infinite() {
            return;
        }
        loop {
            let wait = {
                let mut state = self.state();
                let now = Instant::now();
                let elapsed = now.duration_since(state.refilled_at).as_secs_f64();
                let capacity = f64::from(self.settings.burst.max(1));
                state.tokens = (state.tokens + elapsed * self.settings.max_rate).min(capacity);
                state.refilled_at = now;
                if state.tokens >= 1.0 {
                    state.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - state.tokens) / self.settings.max_rate)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Records how a call made under `permit` ended. A transient failure,
    /// or a call slower than `slow_call`, starts the global backoff, or
    /// doubles it if the previous delay has run out. A success that is not
    /// slow ends it.
    pub fn finish(&self, call: &str, permit: CallPermit, outcome: &CallOutcome) {
        let duration = permit.started.elapsed();
        drop(permit);
        let failure = match outcome {
            CallOutcome::Succeeded => None,
            CallOutcome::Failed => Some(FailureClass::Permanent),
            CallOutcome::Transient(_) => Some(FailureClass::Transient),
        };
        self.metrics.observe_call(call, duration, failure);

        let slow = duration > self.settings.slow_call;
        let trouble = match outcome {
            CallOutcome::Transient(message) => Some(message.clone()),
            _ if slow => Some(format!(
                "{call} took {:.1}s, more than the {:.1}s of dispatch.scheduler_calls.slow_call",
                duration.as_secs_f64(),
                self.settings.slow_call.as_secs_f64()
            )),
            _ => None,
        };
        match trouble {
            Some(reason) => self.back_off(call, &reason),
            None if *outcome == CallOutcome::Succeeded => self.recover(call),
            None => {}
        }
    }

    fn back_off(&self, call: &str, reason: &str) {
        let now = Instant::now();
        let mut state = self.state();
        let delay = match &state.backoff {
            // Calls started before the backoff keep failing for a while;
            // only a failure after the delay has run out doubles it.
            Some(backoff) if backoff.until > now => return,
            Some(backoff) => (backoff.delay * 2).min(self.settings.backoff_max),
            None => self.settings.backoff_first.min(self.settings.backoff_max),
        };
        let jittered = jitter(delay);
        state.backoff = Some(Backoff {
            delay,
            until: now + jittered,
        });
        drop(state);
        self.metrics.set_backoff(jittered);
        tracing::warn!(
            call,
            reason,
            "calls to the batch system fail or are slow; backing off for {}",
            format_delay(jittered)
        );
    }

    fn recover(&self, call: &str) {
        let mut state = self.state();
        if state.backoff.take().is_some() {
            drop(state);
            self.metrics.set_backoff(Duration::ZERO);
            tracing::info!(
                call,
                "a call to the batch system succeeded; the backoff has ended"
            );
        }
    }
}

/// Shortens `delay` by up to a fifth at random, so that waiters that began
/// together spread out.
pub fn jitter(delay: Duration) -> Duration {
    if delay.is_zero() {
        return delay;
    }
    let factor: f64 = rand::thread_rng().gen_range(0.8..=1.0);
    delay.mul_f64(factor)
}

/// Formats a delay in seconds for logs and statuses: `4s`, `3.6s`.
pub fn format_delay(delay: Duration) -> String {
    let tenths = (delay.as_secs_f64() * 10.0).ceil() / 10.0;
    format!("{tenths}s")
}

/// Returns the name a call is counted under: the program's file name,
/// such as `sbatch`.
pub fn call_name(program: &Path) -> String {
    program
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.display().to_string())
}

/// Classifies a command's result for the limiter.
pub fn classify(result: &Result<CommandOutput, CommandError>) -> CallOutcome {
    match result {
        Ok(output) if output.success() => CallOutcome::Succeeded,
        Ok(output) => {
            let text = format!("{} {}", output.stderr, output.stdout).to_lowercase();
            match TRANSIENT_ERRORS
                .iter()
                .find(|fragment| text.contains(*fragment))
            {
                Some(_) => CallOutcome::Transient(format!(
                    "failed with {}: {}",
                    output.status,
                    output.stderr.trim()
                )),
                None => CallOutcome::Failed,
            }
        }
        Err(err @ CommandError::TimedOut { .. }) => CallOutcome::Transient(err.to_string()),
        Err(_) => CallOutcome::Failed,
    }
}

/// A [`CommandRunner`] whose every command goes through a shared
/// [`CallLimiter`].
#[derive(Debug, Clone)]
pub struct LimitedRunner<R> {
    inner: R,
    limiter: Arc<CallLimiter>,
}

impl<R> LimitedRunner<R> {
    pub fn new(inner: R, limiter: Arc<CallLimiter>) -> LimitedRunner<R> {
        LimitedRunner { inner, limiter }
    }
}

#[async_trait]
impl<R: CommandRunner> CommandRunner for LimitedRunner<R> {
    async fn run(&self, spec: &CommandSpec) -> Result<CommandOutput, CommandError> {
        let call = call_name(&spec.program);
        let permit =
            self.limiter
                .admit(&call)
                .await
                .map_err(|remaining| CommandError::BackingOff {
                    command: spec.command_line(),
                    remaining,
                })?;
        let result = self.inner.run(spec).await;
        let outcome = classify(&result);
        self.limiter.finish(&call, permit, &outcome);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LimiterSettings {
        LimiterSettings {
            max_concurrent: 2,
            max_rate: 2.0,
            burst: 3,
            slow_call: Duration::from_secs(5),
            backoff_first: Duration::from_secs(2),
            backoff_max: Duration::from_secs(10),
        }
    }

    fn limiter() -> (Arc<CallLimiter>, Arc<Metrics>) {
        let metrics = Metrics::new();
        (CallLimiter::new(settings(), Arc::clone(&metrics)), metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_burst_then_rate() {
        let (limiter, _) = limiter();
        let start = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..7 {
            let permit = limiter.admit("squeue").await.unwrap();
            starts.push(start.elapsed());
            limiter.finish("squeue", permit, &CallOutcome::Succeeded);
        }
        // Three from the full bucket at once, then one per half second.
        assert_eq!(starts[2], Duration::ZERO);
        assert_eq!(starts[3], Duration::from_millis(500));
        assert_eq!(starts[6], Duration::from_millis(2000));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_capped_at_max() {
        let (limiter, _) = limiter();
        let first = limiter.admit("sbatch").await.unwrap();
        let _second = limiter.admit("sbatch").await.unwrap();
        let third = {
            let limiter = Arc::clone(&limiter);
            tokio::spawn(async move { limiter.admit("sbatch").await.is_ok() })
        };
        // Shorter than slow_call, so that finishing the first call starts
        // no backoff.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!third.is_finished(), "a third call started beside two");
        limiter.finish("sbatch", first, &CallOutcome::Succeeded);
        assert!(third.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_double_the_backoff() {
        let (limiter, metrics) = limiter();
        let permit = limiter.admit("squeue").await.unwrap();
        limiter.finish("squeue", permit, &CallOutcome::Transient("down".into()));
        let first = limiter.backoff_remaining().unwrap();
        assert!(first <= Duration::from_secs(2), "{first:?}");
        assert!(first >= Duration::from_millis(1600), "{first:?}");
        assert!(limiter.admit("squeue").await.is_err());
        assert!(metrics
            .render()
            .contains("berth_dispatch_scheduler_backoff_seconds 1."));

        tokio::time::sleep(first).await;
        let permit = limiter.admit("squeue").await.unwrap();
        limiter.finish("squeue", permit, &CallOutcome::Transient("down".into()));
        let second = limiter.backoff_remaining().unwrap();
        assert!(second >= Duration::from_millis(3200), "{second:?}");

        // The delay stops growing at backoff_max.
        for _ in 0..5 {
            tokio::time::sleep(limiter.backoff_remaining().unwrap()).await;
            let permit = limiter.admit("squeue").await.unwrap();
            limiter.finish("squeue", permit, &CallOutcome::Transient("down".into()));
        }
        let capped = limiter.backoff_remaining().unwrap();
        assert!(capped <= Duration::from_secs(10), "{capped:?}");
        assert!(capped >= Duration::from_secs(8), "{capped:?}");

        tokio::time::sleep(capped).await;
        let permit = limiter.admit("squeue").await.unwrap();
        limiter.finish("squeue", permit, &CallOutcome::Succeeded);
        assert_eq!(limiter.backoff_remaining(), None);
        assert!(metrics
            .render()
            .contains("berth_dispatch_scheduler_backoff_seconds 0\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_during_backoff_do_not_extend_it() {
        let (limiter, _) = limiter();
        let a = limiter.admit("sbatch").await.unwrap();
        let b = limiter.admit("sbatch").await.unwrap();
        limiter.finish("sbatch", a, &CallOutcome::Transient("down".into()));
        let before = limiter.backoff_remaining().unwrap();
        limiter.finish("sbatch", b, &CallOutcome::Transient("down".into()));
        assert_eq!(limiter.backoff_remaining().unwrap(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_success_backs_off() {
        let (limiter, _) = limiter();
        let permit = limiter.admit("squeue").await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        limiter.finish("squeue", permit, &CallOutcome::Succeeded);
        assert!(limiter.backoff_remaining().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn plain_failure_neither_backs_off_nor_recovers() {
        let (limiter, metrics) = limiter();
        let permit = limiter.admit("scancel").await.unwrap();
        limiter.finish("scancel", permit, &CallOutcome::Failed);
        assert_eq!(limiter.backoff_remaining(), None);
        assert!(metrics.render().contains(
            "berth_dispatch_scheduler_call_failures_total{call=\"scancel\",class=\"permanent\"} 1"
        ));
    }

    #[test]
    fn slurm_and_lsf_outages_are_transient() {
        for stderr in [
            "squeue: error: Unable to contact slurm controller (connect failure)",
            "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
            "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying",
            "LSF daemon (LIM) not responding ... still trying",
            "batch system daemon not responding ... still trying",
        ] {
            let result = Ok(CommandOutput::exited(1, "", stderr));
            assert!(
                matches!(classify(&result), CallOutcome::Transient(_)),
                "{stderr}"
            );
        }
        let rejected = Ok(CommandOutput::exited(
            1,
            "",
            "sbatch: error: Batch job submission failed: Invalid partition name specified",
        ));
        assert_eq!(classify(&rejected), CallOutcome::Failed);
        let timed_out = Err(CommandError::TimedOut {
            command: "squeue".into(),
            timeout: Duration::from_secs(60),
        });
        assert!(matches!(classify(&timed_out), CallOutcome::Transient(_)));
        assert_eq!(
            classify(&Ok(CommandOutput::ok("1\n"))),
            CallOutcome::Succeeded
        );
    }

    #[test]
    fn delays_formatted_in_seconds() {
        assert_eq!(format_delay(Duration::from_secs(4)), "4s");
        assert_eq!(format_delay(Duration::from_millis(3550)), "3.6s");
    }

    #[tokio::test(start_paused = true)]
    async fn limited_runner_fails_fast_while_backing_off() {
        let (limiter, _) = limiter();
        let runner = crate::command::recording::RecordingRunner::new();
        runner.answer(CommandOutput::exited(
            1,
            "",
            "squeue: error: Unable to contact slurm controller (connect failure)",
        ));
        let limited = LimitedRunner::new(runner.clone(), Arc::clone(&limiter));
        let spec = CommandSpec::new("/usr/bin/squeue", vec![]);
        let output = limited.run(&spec).await.unwrap();
        assert!(!output.success());
        let err = limited.run(&spec).await.unwrap_err();
        assert!(matches!(err, CommandError::BackingOff { .. }), "{err}");
        assert!(err.to_string().contains("backing off"), "{err}");
        assert_eq!(runner.calls().len(), 1, "the second call reached squeue");
    }
}
