//! The Slurm backend: `sbatch` to submit, one `squeue` per poll for status,
//! `scancel` to cancel.
//!
//! The adapter only builds commands and parses their output; the parsers
//! are pure functions. Running the commands is the [`CommandRunner`]'s job.
//!
//! - Submit: `sbatch --parsable --job-name=UUID --comment=UUID --no-requeue
//!   --chdir=/ --mem=MiB --cpus-per-task=N [--tmp=MiB] [--partition=P]
//!   [--time=MIN] [--nice=N] --output=PATTERN EXTRA... [GPU...]` with the
//!   job script on stdin. `--tmp` is the container's `tmp` mounts plus
//!   `slurm.reserve_tmp`, left out when 0. `EXTRA` is `slurm.sbatch_args`
//!   and `GPU` is `slurm.gpu_args` (only for a container with GPUs), both
//!   argument templates ([`crate::template`]).
//!   `--no-requeue` keeps Slurm from running a job again after a node
//!   failure, when its container may already be cancelled. `--chdir=/` starts the job in a
//!   directory every node has: by default Slurm starts it in the
//!   dispatcher's working directory, which a compute node may lack and
//!   which may be removed while the dispatcher runs. The job needs no
//!   other working directory, because every file it names (credentials,
//!   configuration, output) is given by an absolute path.
//! - Status: `squeue --noheader --user=UID --format=%i|%T|%r|%j` (job id,
//!   long state, reason, name). The name comes last, so a name containing
//!   `|` still parses. A non-zero exit or an unreadable line is an error;
//!   empty output from a successful run is an empty queue.
//! - Cancel: a pending job with `scancel --state=PENDING ID`, which does
//!   nothing if the job has started meanwhile (the next poll lists it as
//!   running and cancels it as such); a running job with `scancel --batch
//!   --signal=TERM ID`, which signals only the batch shell, that is the
//!   supervisor, so that it can stop its container and keep the logs; any
//!   other job (suspended, configuring) with `scancel ID`. Slurm 22.05
//!   refuses to signal a suspended job ("Job can not be altered now"), so a
//!   suspended job is cancelled outright.
//! - Pending reasons: squeue's reason of a pending job (`Priority`,
//!   `PartitionConfig`, ...) reaches users through the dispatch loop, with a
//!   short explanation from [`explain_pending_reason`]; the reasons in
//!   `cancel_pending_reasons` end the job and its container.
//! - End reasons: for a job that left the queue while its container was
//!   running, `scontrol show job -o ID` (one line of `Key=Value` fields)
//!   gives its `JobState` (`OUT_OF_MEMORY`, `TIMEOUT`, `NODE_FAIL`, ...),
//!   `Reason` and `ExitCode`, which [`describe_job_end`] turns into a
//!   sentence. Slurm keeps an ended job for `MinJobAge` seconds; after
//!   that, `sacct -j ID -n -P -o State,ExitCode,Reason` answers where
//!   accounting is on, and nothing answers where it is off.
//!
//! - Priorities: after each status query the dispatcher hands over its
//!   pending jobs with their containers' priorities. [`plan_nice`] maps
//!   that order onto nice values from `slurm.nice_base` upwards, about
//!   `slurm.priority_spread` apart, keeping each job's current nice value
//!   (squeue's `%y`) while it still fits its place. The jobs whose value
//!   changes are reniced with one `scontrol update JobId=A,B,... Nice=N` per
//!   new value. A failed `scontrol` is returned to the loop, which logs it;
//!   the next poll computes the changes again from what squeue then shows.
//!   A new job starts one spread above the highest listed nice value, so it
//!   waits behind the listed jobs until a poll places it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::arguments;
use crate::backend::{Backend, BackendError, BatchJob, JobId, JobRequest, JobState, Submission};
use crate::command::{CommandError, CommandRunner, CommandSpec};
use crate::config::{ConfigError, SlurmConfig};
use crate::script::exec_script;
use crate::template::{expand_all, ArgTemplate, TemplateValues};
use crate::SupervisorCommand;

/// `squeue`'s output format: job id, long state, nice, reason, name.
pub const SQUEUE_FORMAT: &str = "%i|%T|%y|%r|%j";

/// The largest nice value Slurm accepts; the smallest is its negative.
pub const MAX_NICE: i64 = 2_147_483_645;

/// How many spreads after the job before it a job's nice value may be and
/// still be kept: room for the order to change without renicing.
pub const KEEP_STEPS: i64 = 10;

/// Maximum number of job ids in one `scontrol update`, to keep its argument short.
const RENICE_BATCH: usize = 500;

/// Fragments of `sbatch` errors that reject the job itself, so that another
/// try fails the same way. Errors about the dispatcher's own arguments
/// (`unrecognized option`, an invalid account) are not here: they are
/// configuration faults, and the container waits for them to be fixed.
const REJECTIONS: &[&str] = &[
    "Requested node configuration is not available",
    "Memory specification can not be satisfied",
    "More processors requested than permitted",
    "Requested time limit is invalid",
];

/// The `sbatch` error of a partition Slurm does not know.
const INVALID_PARTITION: &str = "Invalid partition name specified";

/// The `sbatch` error of a generic resource (such as `gpu`) that no node
/// of the cluster has (slurm-wlm 22.05).
const INVALID_GRES: &str = "Invalid generic resource (gres) specification";

/// Fragments of `scancel` errors that mean the job has already ended.
const ALREADY_GONE: &[&str] = &[
    "Invalid job id specified",
    "Job/step already completing or completed",
];

/// The `scontrol` and `sacct` error of a job Slurm does not know.
const UNKNOWN_JOB: &str = "Invalid job id specified";

/// Jobs submitted, listed and cancelled with Slurm's commands.
#[derive(Debug)]
pub struct SlurmBackend<R> {
    config: SlurmConfig,
    supervisor: SupervisorCommand,
    runner: R,
    /// The `squeue --user` value: the dispatcher's numeric user id.
    user: String,
    /// Each listed job's nice value, from the latest status query and the
    /// `scontrol` calls that succeeded since.
    nices: HashMap<JobId, i64>,
    /// `sbatch_args` and `gpu_args`, parsed; an error of a configuration
    /// that skipped [`crate::Config::validate`] fails each submission.
    templates: Result<(Vec<ArgTemplate>, Vec<ArgTemplate>), ConfigError>,
}

impl<R: CommandRunner> SlurmBackend<R> {
    /// Creates a backend whose jobs belong to the user the dispatcher runs
    /// as.
    pub fn new(config: SlurmConfig, supervisor: SupervisorCommand, runner: R) -> SlurmBackend<R> {
        let user = nix::unistd::getuid().to_string();
        SlurmBackend::with_user(config, supervisor, runner, user)
    }

    /// Creates a backend that lists the jobs of `user` (a name or numeric
    /// id).
    pub fn with_user(
        config: SlurmConfig,
        supervisor: SupervisorCommand,
        runner: R,
        user: String,
    ) -> SlurmBackend<R> {
        let templates = parse_templates(&config);
        SlurmBackend {
            config,
            supervisor,
            runner,
            user,
            nices: HashMap::new(),
            templates,
        }
    }

    /// Builds the `sbatch` command, with the job script on its stdin.
    pub fn sbatch_command(&self, request: &JobRequest) -> Result<CommandSpec, BackendError> {
        let uuid = &request.container_uuid;
        let (extra, gpu_extra) = self.templates.as_ref().map_err(|err| err.clone())?;
        let mem_mib = memory_mib(request.ram, self.config.reserve_ram).ok_or_else(|| {
            BackendError::InvalidRequest {
                container: uuid.clone(),
                reason: format!("runtime_constraints.ram {} bytes is too large", request.ram),
            }
        })?;
        let tmp_mib = memory_mib(request.tmp, self.config.reserve_tmp).ok_or_else(|| {
            BackendError::InvalidRequest {
                container: uuid.clone(),
                reason: format!("the tmp mounts' {} bytes are too large", request.tmp),
            }
        })?;
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name={uuid}"),
            format!("--comment={uuid}"),
            "--no-requeue".to_string(),
            "--chdir=/".to_string(),
            format!("--mem={mem_mib}"),
            format!("--cpus-per-task={}", request.vcpus),
        ];
        if tmp_mib > 0 {
            args.push(format!("--tmp={tmp_mib}"));
        }
        let partition = if request.partitions.is_empty() {
            self.config.partition.clone()
        } else {
            Some(request.partitions.join(","))
        };
        if let Some(partition) = &partition {
            args.push(format!("--partition={partition}"));
        }
        if request.max_run_time > 0 {
            // NOTE: Slurm's time limit is in whole minutes, so a job may run
            // up to 59 s past max_run_time (plus the cluster's OverTimeLimit).
            // Enforcing max_run_time to the second is left to the supervisor,
            // which does not do it yet.
            args.push(format!("--time={}", request.max_run_time.div_ceil(60)));
        }
        if let Some(nice) = self.new_job_nice() {
            args.push(format!("--nice={nice}"));
        }
        args.push(format!("--output={}", self.config.output));
        let values =
            TemplateValues::for_job(request, mem_mib, tmp_mib, partition.unwrap_or_default());
        args.extend(expand_all(extra, &values));
        if request.gpu.count > 0 {
            args.extend(expand_all(gpu_extra, &values));
        }

        let argv = self
            .supervisor
            .argv(&request.credentials_file, uuid)
            .map_err(|err| BackendError::InvalidRequest {
                container: uuid.clone(),
                reason: err.to_string(),
            })?;
        let script = exec_script(&argv);
        Ok(CommandSpec::new(&self.config.sbatch, args).with_stdin(script.into_bytes()))
    }

    /// Returns the nice value of a new job: one spread above the highest
    /// value of the listed jobs, so that it waits behind them until the
    /// next poll places it, or `None` when renicing is off.
    fn new_job_nice(&self) -> Option<i64> {
        let spread = self.config.priority_spread;
        if spread <= 0 {
            return None;
        }
        let highest = self.nices.values().copied().max();
        let nice = highest.map_or(self.config.nice_base, |nice| nice.saturating_add(spread));
        Some(nice.clamp(self.config.nice_base.min(MAX_NICE), MAX_NICE))
    }

    /// Builds the one status query.
    pub fn squeue_command(&self) -> CommandSpec {
        CommandSpec::new(
            &self.config.squeue,
            vec![
                "--noheader".to_string(),
                format!("--user={}", self.user),
                format!("--format={SQUEUE_FORMAT}"),
            ],
        )
    }

    /// Builds the command that sets the nice value of the jobs `ids`.
    pub fn renice_command(&self, nice: i64, ids: &[JobId]) -> CommandSpec {
        let ids: Vec<&str> = ids.iter().map(JobId::as_str).collect();
        CommandSpec::new(
            &self.config.scontrol,
            vec![
                "update".to_string(),
                format!("JobId={}", ids.join(",")),
                format!("Nice={nice}"),
            ],
        )
    }

    /// Plans the renicing of `jobs` (job ids with their containers'
    /// priorities): the jobs to change, by their new nice value. Ties in
    /// priority are ordered by job id, so the plan does not depend on the
    /// order of `jobs`.
    pub fn renice_plan(&self, jobs: &[(JobId, i64)]) -> BTreeMap<i64, Vec<JobId>> {
        let mut changes: BTreeMap<i64, Vec<JobId>> = BTreeMap::new();
        if self.config.priority_spread <= 0 {
            return changes;
        }
        let sorted = sort_by_priority(jobs);
        let inputs: Vec<NiceJob> = sorted
            .iter()
            .map(|(id, priority)| NiceJob {
                priority: *priority,
                nice: self.nices.get(id).copied(),
            })
            .collect();
        let planned = plan_nice(&inputs, self.config.nice_base, self.config.priority_spread);
        for ((id, _), (input, nice)) in sorted.iter().zip(inputs.iter().zip(planned)) {
            if input.nice != Some(nice) {
                changes.entry(nice).or_default().push(id.clone());
            }
        }
        changes
    }

    /// Builds the command that cancels `job` in its state, or `None` for a
    /// job that is already completing.
    pub fn scancel_command(&self, job: &BatchJob) -> Option<CommandSpec> {
        let id = job.id.to_string();
        let args = match job.state {
            JobState::Completing => return None,
            JobState::Pending => vec!["--state=PENDING".to_string(), id],
            JobState::Running => vec!["--batch".to_string(), "--signal=TERM".to_string(), id],
            JobState::Configuring | JobState::Suspended | JobState::Other(_) => vec![id],
        };
        Some(CommandSpec::new(&self.config.scancel, args))
    }

    /// Builds the command that shows one job as one line of fields.
    pub fn show_job_command(&self, job: &JobId) -> CommandSpec {
        CommandSpec::new(
            &self.config.scontrol,
            vec![
                "show".to_string(),
                "job".to_string(),
                "-o".to_string(),
                job.to_string(),
            ],
        )
    }

    /// Builds the accounting query for one job that Slurm no longer keeps.
    pub fn sacct_command(&self, job: &JobId) -> CommandSpec {
        CommandSpec::new(
            &self.config.sacct,
            vec![
                "-j".to_string(),
                job.to_string(),
                "-n".to_string(),
                "-P".to_string(),
                "-o".to_string(),
                "State,ExitCode,Reason".to_string(),
            ],
        )
    }

    /// Asks accounting how a job ended; `None` when accounting is off,
    /// fails or has no record of the job.
    async fn accounted_end(&self, job: &JobId) -> Option<JobEnd> {
        let spec = self.sacct_command(job);
        let output = match self.runner.run(&spec).await {
            Ok(output) if output.success() => output,
            Ok(output) => {
                tracing::debug!(job_id = %job, stderr = %output.stderr.trim(), "sacct has no record of the job");
                return None;
            }
            Err(err) => {
                tracing::debug!(job_id = %job, error = %err, "failed to run sacct");
                return None;
            }
        };
        parse_sacct_end(&output.stdout)
    }

    /// Submits one job; takes `&self` so that submissions can overlap.
    async fn submit_one(&self, request: &JobRequest) -> Result<Submission, BackendError> {
        let spec = self.sbatch_command(request)?;
        let output = self.runner.run(&spec).await?;
        let output = output
            .check(&spec)
            .map_err(|err| self.submit_error(request, err))?;
        let job_id =
            parse_sbatch_output(&output.stdout).map_err(|message| BackendError::Parse {
                command: spec.command_line(),
                message,
                output: output.stdout.clone(),
            })?;
        let script = spec
            .stdin
            .as_deref()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
        Ok(Submission {
            job_id,
            command: spec.command_line(),
            script,
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }

    /// Classifies a failed `sbatch`: a rejection of the job itself is
    /// permanent; anything else may pass on another try.
    fn submit_error(&self, request: &JobRequest, error: CommandError) -> BackendError {
        let stderr = error.stderr().unwrap_or_default();
        // An unknown partition is the container's fault only when the
        // container named it; the configured default is the operator's.
        let partition_rejected =
            stderr.contains(INVALID_PARTITION) && !request.partitions.is_empty();
        // Only a container with GPUs gets `slurm.gpu_args`, so a gres
        // error is its request's fault; without GPUs it is the operator's.
        let gres_rejected = stderr.contains(INVALID_GRES) && request.gpu.count > 0;
        let rejected = partition_rejected || gres_rejected;
        if rejected || REJECTIONS.iter().any(|text| stderr.contains(text)) {
            BackendError::Rejected {
                container: request.container_uuid.clone(),
                source: error,
            }
        } else {
            BackendError::Command(error)
        }
    }
}

#[async_trait]
impl<R: CommandRunner> Backend for SlurmBackend<R> {
    fn name(&self) -> &'static str {
        "slurm"
    }

    async fn submit(&mut self, request: &JobRequest) -> Result<Submission, BackendError> {
        self.submit_one(request).await
    }

    /// Runs the submissions concurrently; the command runner bounds how
    /// many processes run at once.
    async fn submit_many(
        &mut self,
        requests: &[JobRequest],
    ) -> Vec<Result<Submission, BackendError>> {
        let backend = &*self;
        futures::future::join_all(requests.iter().map(|request| backend.submit_one(request))).await
    }

    async fn status(&mut self) -> Result<Vec<BatchJob>, BackendError> {
        let spec = self.squeue_command();
        let output = self.runner.run(&spec).await?.check(&spec)?;
        if output.stdout.trim().is_empty() && !output.stderr.trim().is_empty() {
            // An empty queue with complaints on stderr is not trusted to be
            // empty.
            return Err(BackendError::Parse {
                command: spec.command_line(),
                message: format!("no jobs listed, but stderr has {:?}", output.stderr.trim()),
                output: output.stdout,
            });
        }
        let listed =
            parse_squeue_listing(&output.stdout).map_err(|message| BackendError::Parse {
                command: spec.command_line(),
                message,
                output: output.stdout.clone(),
            })?;
        self.nices = listed
            .iter()
            .map(|(job, nice)| (job.id.clone(), *nice))
            .collect();
        Ok(listed.into_iter().map(|(job, _)| job).collect())
    }

    async fn cancel(&mut self, job: &BatchJob) -> Result<(), BackendError> {
        let Some(spec) = self.scancel_command(job) else {
            return Ok(());
        };
        let output = self.runner.run(&spec).await?;
        if output.success() || ALREADY_GONE.iter().any(|text| output.stderr.contains(text)) {
            return Ok(());
        }
        output.check(&spec)?;
        Ok(())
    }

    async fn reprioritise(&mut self, jobs: &[(JobId, i64)]) -> Result<(), BackendError> {
        let mut first_error = None;
        for (nice, ids) in self.renice_plan(jobs) {
            for chunk in ids.chunks(RENICE_BATCH) {
                let spec = self.renice_command(nice, chunk);
                let result = match self.runner.run(&spec).await {
                    // A job that ended since the status query makes
                    // scontrol fail after it has updated the others.
                    Ok(output) if !output.success() && renices_only_ended_jobs(&output.stderr) => {
                        Ok(())
                    }
                    Ok(output) => output.check(&spec).map(|_| ()),
                    Err(err) => Err(err),
                };
                match result {
                    Ok(()) => {
                        for id in chunk {
                            self.nices.insert(id.clone(), nice);
                        }
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "failed to renice jobs");
                        first_error.get_or_insert(BackendError::Command(err));
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn end_reason(&mut self, job: &JobId) -> Result<Option<String>, BackendError> {
        let spec = self.show_job_command(job);
        let output = self.runner.run(&spec).await?;
        if output.success() {
            let end =
                parse_show_job(job, &output.stdout).map_err(|message| BackendError::Parse {
                    command: spec.command_line(),
                    message,
                    output: output.stdout.clone(),
                })?;
            return Ok(Some(describe_job_end(job, &end)));
        }
        if !output.stderr.contains(UNKNOWN_JOB) {
            output.check(&spec)?;
            return Ok(None);
        }
        Ok(self
            .accounted_end(job)
            .await
            .map(|end| describe_job_end(job, &end)))
    }

    fn explain_reason(&self, reason: &str) -> Option<&'static str> {
        explain_pending_reason(reason)
    }

    fn cancel_pending_reasons(&self) -> &[String] {
        &self.config.cancel_pending_reasons
    }
}

/// The end of a job, as Slurm recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    /// Slurm's state name, such as `OUT_OF_MEMORY` or `CANCELLED`.
    pub state: String,
    /// The user id that cancelled the job, when Slurm names one
    /// (`CANCELLED by 1000`).
    pub cancelled_by: Option<String>,
    /// Slurm's reason, such as `NodeDown`; empty for `None`.
    pub reason: String,
    /// The exit code and signal, as `CODE:SIGNAL`; empty when unknown.
    pub exit_code: String,
}

/// Splits one line of `scontrol show job -o` into its fields. A word
/// without `=` belongs to the value before it, as in `JobState=CANCELLED
/// by 1000`; the first of two fields with the same key wins.
fn show_job_fields(line: &str) -> HashMap<&str, String> {
    let mut fields: HashMap<&str, String> = HashMap::new();
    let mut current: Option<&str> = None;
    for word in line.split_whitespace() {
        match word.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                if fields.contains_key(key) {
                    current = None;
                } else {
                    fields.insert(key, value.to_string());
                    current = Some(key);
                }
            }
            _ => {
                if let Some(value) = current.and_then(|key| fields.get_mut(key)) {
                    value.push(' ');
                    value.push_str(word);
                }
            }
        }
    }
    fields
}

/// Splits a state such as `CANCELLED by 1000` into the state and the user.
fn split_cancelled_by(state: &str) -> (String, Option<String>) {
    let mut words = state.split_whitespace();
    let name = words.next().unwrap_or_default().to_string();
    let by = match (words.next(), words.next()) {
        (Some("by"), Some(user)) => Some(user.to_string()),
        _ => None,
    };
    (name, by)
}

/// Returns a field's value, empty for Slurm's `None` and `(null)`.
fn none_as_empty(value: &str) -> String {
    let value = value.trim();
    if value == "None" || value == "(null)" {
        String::new()
    } else {
        value.to_string()
    }
}

/// Parses the output of `scontrol show job -o ID`: the line of job `id`
/// (the first line when none has its `JobId`), which must have a
/// `JobState`.
pub fn parse_show_job(id: &JobId, stdout: &str) -> Result<JobEnd, String> {
    let lines: Vec<HashMap<&str, String>> = stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(show_job_fields)
        .collect();
    let fields = lines
        .iter()
        .find(|fields| fields.get("JobId").map(String::as_str) == Some(id.as_str()))
        .or_else(|| lines.first())
        .ok_or_else(|| "no job listed".to_string())?;
    let state = fields
        .get("JobState")
        .filter(|state| !state.trim().is_empty())
        .ok_or_else(|| "no JobState field".to_string())?;
    let (state, cancelled_by) = split_cancelled_by(state);
    Ok(JobEnd {
        state,
        cancelled_by,
        reason: fields
            .get("Reason")
            .map(|r| none_as_empty(r))
            .unwrap_or_default(),
        exit_code: fields
            .get("ExitCode")
            .map(|c| none_as_empty(c))
            .unwrap_or_default(),
    })
}

/// Parses the output of `sacct -j ID -n -P -o State,ExitCode,Reason`: the
/// first line is the job itself, the others its steps. `None` when there
/// is no line or its state is empty.
pub fn parse_sacct_end(stdout: &str) -> Option<JobEnd> {
    let line = stdout.lines().find(|line| !line.trim().is_empty())?;
    let mut fields = line.split('|');
    let (state, cancelled_by) = split_cancelled_by(fields.next()?);
    if state.is_empty() {
        return None;
    }
    let exit_code = none_as_empty(fields.next().unwrap_or_default());
    let reason = none_as_empty(fields.next().unwrap_or_default());
    Some(JobEnd {
        state,
        cancelled_by,
        reason,
        exit_code,
    })
}

/// Explains an end state of a Slurm job in a few words, or returns `None`
/// for a state without an explanation.
pub fn explain_end_state(state: &str) -> Option<&'static str> {
    Some(match state {
        "OUT_OF_MEMORY" => "it ran out of memory",
        "TIMEOUT" => "it reached its time limit",
        "NODE_FAIL" => "its node failed",
        "PREEMPTED" => "a job of higher priority preempted it",
        "CANCELLED" => "it was cancelled",
        "FAILED" => "its script exited with an error",
        "COMPLETED" => "its script exited",
        "BOOT_FAIL" => "its node failed to boot",
        "DEADLINE" => "it reached its deadline",
        _ => return None,
    })
}

/// Describes how job `id` ended, for users: `slurm job 42 ended
/// OUT_OF_MEMORY: it ran out of memory (exit code 0:9)`.
pub fn describe_job_end(id: &JobId, end: &JobEnd) -> String {
    let mut text = format!("slurm job {id} ended {}", end.state);
    if let Some(user) = &end.cancelled_by {
        text.push_str(&format!(" by user {user}"));
    }
    if let Some(explanation) = explain_end_state(&end.state) {
        text.push_str(": ");
        text.push_str(explanation);
    }
    let mut details = Vec::new();
    if !end.reason.is_empty() {
        details.push(format!("reason {}", end.reason));
    }
    if !end.exit_code.is_empty() {
        details.push(format!("exit code {}", end.exit_code));
    }
    if !details.is_empty() {
        text.push_str(&format!(" ({})", details.join(", ")));
    }
    text
}

/// Explains common Slurm pending reasons (squeue's `%r`) in a few words,
/// after the reason codes of Slurm's squeue(1) manual (slurm-wlm 22.05).
/// That page omits `PartitionConfig`, which slurm-wlm 22.05 with
/// `EnforcePartLimits=NO` shows for a job that requests more CPUs than any
/// node of its partition has.
pub fn explain_pending_reason(reason: &str) -> Option<&'static str> {
    let text = match reason {
        "Priority" => "jobs of higher priority are ahead of it",
        "Resources" => "it waits for CPUs, memory or nodes to become free",
        "PartitionConfig" => {
            "its partition cannot satisfy the request, for example more CPUs or memory than the partition's nodes have"
        }
        "BadConstraints" => "no node satisfies its constraints",
        "PartitionTimeLimit" => "its time limit is longer than its partition allows",
        "PartitionNodeLimit" => {
            "it needs more nodes than its partition allows, or the nodes it needs are down or drained"
        }
        "PartitionDown" => "its partition is down",
        "PartitionInactive" => "its partition is inactive",
        "ReqNodeNotAvail" => {
            "a node it needs is unavailable: in use, reserved, down or drained"
        }
        "NodeDown" => "a node it needs is down",
        "JobHeldUser" => "it is held by its user",
        "JobHeldAdmin" => "it is held by an administrator",
        "BeginTime" => "its earliest start time has not come yet",
        "Dependency" => "it waits for another job",
        "Reservation" => "it waits for its advanced reservation",
        "Licenses" => "it waits for a license",
        other if other.starts_with("QOS") => "a limit of its quality of service (QOS) holds it back",
        other if other.starts_with("Assoc") => "a limit of its account holds it back",
        _ => return None,
    };
    Some(text)
}

/// Parses the configured argument templates. The error names the key of
/// the bad entry, as [`crate::Config::validate`] does.
fn parse_templates(
    config: &SlurmConfig,
) -> Result<(Vec<ArgTemplate>, Vec<ArgTemplate>), ConfigError> {
    let extra =
        arguments::sbatch_templates(&config.sbatch_args, false).map_err(|(index, message)| {
            ConfigError::new(format!("slurm.sbatch_args[{index}]"), message)
        })?;
    let gpu = arguments::sbatch_templates(&config.gpu_args, true).map_err(|(index, message)| {
        ConfigError::new(format!("slurm.gpu_args[{index}]"), message)
    })?;
    Ok((extra, gpu))
}

/// Computes a size in MiB from bytes plus a reserve, rounded up: the
/// job's `--mem` from the container's RAM, or its `--tmp` from the `tmp`
/// mounts. Returns `None` on overflow.
pub fn memory_mib(ram: u64, reserve: u64) -> Option<u64> {
    ram.checked_add(reserve)
        .map(|bytes| bytes.div_ceil(1 << 20))
}

/// Parses `sbatch --parsable` output: `JOBID` or `JOBID;CLUSTER`.
pub fn parse_sbatch_output(stdout: &str) -> Result<JobId, String> {
    let mut lines = stdout
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err("expected one line with the job id".to_string());
    };
    let id = line.split(';').next().unwrap_or_default();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{line:?} does not start with a job id"));
    }
    Ok(JobId::new(id))
}

/// Parses `squeue --noheader --format=`[`SQUEUE_FORMAT`] output. Blank
/// lines are skipped. Any other line that does not read as a job is an
/// error, so that garbage never looks like a queue without the dispatcher's
/// jobs.
// NOTE: a job name with a newline, on any job of the dispatcher's user,
// splits into an unreadable line, so every status query fails until that
// job ends.
pub fn parse_squeue_output(stdout: &str) -> Result<Vec<BatchJob>, String> {
    parse_squeue_listing(stdout).map(|jobs| jobs.into_iter().map(|(job, _)| job).collect())
}

/// Parses `squeue` output like [`parse_squeue_output`], with each job's
/// nice value.
pub fn parse_squeue_listing(stdout: &str) -> Result<Vec<(BatchJob, i64)>, String> {
    let mut jobs = Vec::new();
    for (index, line) in stdout.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let job = parse_squeue_line(line)
            .map_err(|message| format!("line {}: {message}: {line:?}", index + 1))?;
        jobs.push(job);
    }
    Ok(jobs)
}

fn parse_squeue_line(line: &str) -> Result<(BatchJob, i64), &'static str> {
    let mut fields = line.splitn(5, '|');
    let (Some(id), Some(state), Some(nice), Some(reason), Some(name)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err("expected 5 fields separated by |");
    };
    let nice: i64 = nice
        .trim()
        .parse()
        .map_err(|_| "the nice value is not a number")?;
    let id = id.trim();
    // Plain ids, and the forms of array (`12_3`, `12_[1-5%2]`) and
    // heterogeneous (`12+0`) jobs that other jobs of the same user may have.
    let id_chars = |b: u8| b.is_ascii_digit() || b"_+[]-,%".contains(&b);
    if !id.starts_with(|c: char| c.is_ascii_digit()) || !id.bytes().all(id_chars) {
        return Err("the job id is not a Slurm job id");
    }
    let state = state.trim();
    if state.is_empty() || !state.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        return Err("the state is not a Slurm job state");
    }
    let reason = match reason.trim() {
        "None" | "(null)" => "",
        other => other,
    };
    let job = BatchJob {
        id: JobId::new(id),
        name: name.to_string(),
        state: parse_state(state),
        reason: reason.to_string(),
    };
    Ok((job, nice))
}

/// Fragments of `scontrol update` errors about a job that has ended or
/// that Slurm no longer keeps (slurm-wlm 22.05: `Job has already finished
/// for job 196`, `Invalid job id specified for job 999`).
const RENICE_ENDED: &[&str] = &["Job has already finished", "Invalid job id specified"];

/// True when every line of a failed `scontrol update`'s stderr is about a
/// job that has ended: the other jobs of the call were updated.
fn renices_only_ended_jobs(stderr: &str) -> bool {
    let mut lines = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .peekable();
    lines.peek().is_some() && lines.all(|line| RENICE_ENDED.iter().any(|text| line.contains(text)))
}

/// Sorts jobs (job ids with their containers' priorities) highest
/// priority first. Ties go by job id (numerically for numeric ids), so the
/// result does not depend on the order of `jobs`.
pub(crate) fn sort_by_priority(jobs: &[(JobId, i64)]) -> Vec<&(JobId, i64)> {
    let mut sorted: Vec<&(JobId, i64)> = jobs.iter().collect();
    sorted.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then_with(|| a.0.as_str().len().cmp(&b.0.as_str().len()))
            .then_with(|| a.0.cmp(&b.0))
    });
    sorted
}

/// One pending job, as [`plan_nice`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NiceJob {
    /// The container's priority: higher runs first.
    pub priority: i64,
    /// The job's current nice value, if known.
    pub nice: Option<i64>,
}

/// Maps jobs in order of priority (highest first, as given) onto nice
/// values. A job of higher priority always gets a lower nice value than
/// one of lower priority, and jobs of equal priority fit between the jobs
/// before and after them. Returns one value per job, in the same order.
///
/// The first jobs get `base`; each later priority gets values above the
/// highest value of the priority before it. A job keeps its current value
/// while that is above the previous priority's highest value and at most
/// [`KEEP_STEPS`] spreads above it; otherwise it gets the previous value
/// plus `spread`. The first jobs keep theirs from `base` up to one spread
/// per job (at least [`KEEP_STEPS`] spreads) above it, so that jobs leaving
/// the head of the queue rarely move the others. The result is stable
/// (planning again on its own output changes nothing), and a job
/// moves only when the jobs around it no longer leave it room. Values are
/// capped at [`MAX_NICE`]; `spread` below 1 counts as 1.
pub fn plan_nice(jobs: &[NiceJob], base: i64, spread: i64) -> Vec<i64> {
    let spread = spread.max(1);
    let window = spread.saturating_mul(KEEP_STEPS);
    let base = base.clamp(-MAX_NICE, MAX_NICE);
    // The first jobs may drift up by a spread per queued job before they
    // go back to the base, so a draining queue is compacted (every job
    // reniced) only about once per queue length of started jobs.
    let head_room =
        spread.saturating_mul(KEEP_STEPS.max(i64::try_from(jobs.len()).unwrap_or(i64::MAX)));
    let mut planned = Vec::with_capacity(jobs.len());
    // The highest value given to the previous priority, then the current
    // priority and the highest value given to it so far.
    let mut previous: Option<i64> = None;
    let mut group_priority: Option<i64> = None;
    let mut group_max: Option<i64> = None;
    for job in jobs {
        if group_priority != Some(job.priority) {
            if group_max.is_some() {
                previous = group_max;
            }
            group_priority = Some(job.priority);
            group_max = None;
        }
        let (low, high, fresh) = match previous {
            None => (base, base.saturating_add(head_room), base),
            Some(before) => (
                before.saturating_add(1),
                before.saturating_add(window),
                before.saturating_add(spread),
            ),
        };
        let nice = match job.nice {
            Some(nice) if (low..=high).contains(&nice) => nice,
            _ => fresh,
        }
        .min(MAX_NICE);
        group_max = Some(group_max.map_or(nice, |max| max.max(nice)));
        planned.push(nice);
    }
    planned
}

/// Maps Slurm's long state names (`squeue %T`).
fn parse_state(state: &str) -> JobState {
    match state {
        "PENDING" => JobState::Pending,
        "CONFIGURING" => JobState::Configuring,
        "RUNNING" => JobState::Running,
        "SUSPENDED" => JobState::Suspended,
        "COMPLETING" => JobState::Completing,
        other => JobState::Other(other.to_string()),
    }
}

/// Checks that each Slurm program exists. The error names the key of a
/// missing program.
pub fn check_programs(config: &SlurmConfig) -> Result<(), ConfigError> {
    for (key, program) in [
        ("slurm.sbatch", &config.sbatch),
        ("slurm.squeue", &config.squeue),
        ("slurm.scancel", &config.scancel),
        ("slurm.scontrol", &config.scontrol),
    ] {
        if find_program(program).is_none() {
            return Err(ConfigError {
                key: key.to_string(),
                message: format!(
                    "{} is not an executable file{}: install Slurm's client commands or give the program's full path",
                    program.display(),
                    if program.components().count() == 1 { " in PATH" } else { "" }
                ),
            });
        }
    }
    Ok(())
}

/// Finds the executable that `program` names: itself if it has a
/// directory part, else the first match in `PATH`.
pub(crate) fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::GpuRequest;
    use crate::command::recording::RecordingRunner;
    use crate::command::CommandOutput;

    const UUID: &str = "zzzzz-dz642-000000000000001";

    /// `squeue --noheader --user=0 --format='%i|%T|%r|%j'` on slurm-wlm
    /// 22.05.8 (one node, partition `debug` with OverSubscribe=FORCE:4),
    /// with jobs pending for resources, behind others, on hold and on an
    /// impossible CPU count, running (one named with spaces and a `|`) and
    /// suspended. The nice column (`%y`) was added by hand in the form the
    /// same squeue prints it (`188|PENDING|5|JobHeldUser|nicetest`).
    const SQUEUE_REAL: &str = "\
9|PENDING|0|Resources|zzzzz-dz642-bbbbbbbbbbbbbb4
10|PENDING|10|Priority|zzzzz-dz642-bbbbbbbbbbbbbb5
11|PENDING|20|Priority|zzzzz-dz642-bbbbbbbbbbbbbb6
12|PENDING|20|Priority|zzzzz-dz642-bbbbbbbbbbbbbb7
14|PENDING|0|PartitionConfig|sbatch
5|PENDING|0|JobHeldUser|held
3|RUNNING|0|None|a name with spaces|and pipe
4|RUNNING|0|None|pend
6|RUNNING|0|None|zzzzz-dz642-bbbbbbbbbbbbbb1
7|RUNNING|0|None|zzzzz-dz642-bbbbbbbbbbbbbb2
8|RUNNING|0|None|zzzzz-dz642-bbbbbbbbbbbbbb3
2|SUSPENDED|0|None|zzzzz-dz642-aaaaaaaaaaaaaaa
";

    fn supervisor() -> SupervisorCommand {
        SupervisorCommand {
            program: "/usr/local/bin/berth".into(),
            config_file: Some("/etc/berth/berth.yml".into()),
        }
    }

    fn backend(config: SlurmConfig) -> (SlurmBackend<RecordingRunner>, RecordingRunner) {
        let runner = RecordingRunner::new();
        let backend = SlurmBackend::with_user(config, supervisor(), runner.clone(), "1001".into());
        (backend, runner)
    }

    fn request(ram: u64, vcpus: u64) -> JobRequest {
        JobRequest {
            container_uuid: UUID.to_string(),
            ram,
            vcpus,
            partitions: Vec::new(),
            max_run_time: 0,
            tmp: 0,
            gpu: GpuRequest::default(),
            priority: 1,
            credentials_file: PathBuf::from(format!("/var/lib/berth/credentials/{UUID}.json")),
        }
    }

    fn job(id: &str, state: JobState) -> BatchJob {
        BatchJob {
            id: JobId::new(id),
            name: UUID.to_string(),
            state,
            reason: String::new(),
        }
    }

    #[test]
    fn sbatch_arguments_for_a_plain_container() {
        let (backend, _) = backend(SlurmConfig::default());
        let spec = backend.sbatch_command(&request(1 << 30, 2)).unwrap();
        assert_eq!(spec.program, PathBuf::from("sbatch"));
        assert_eq!(
            spec.args,
            [
                "--parsable",
                "--job-name=zzzzz-dz642-000000000000001",
                "--comment=zzzzz-dz642-000000000000001",
                "--no-requeue",
                "--chdir=/",
                "--mem=1280",
                "--cpus-per-task=2",
                "--nice=0",
                "--output=/tmp/berth-%j.out",
            ]
        );
    }

    #[tokio::test]
    async fn new_job_waits_behind_listed_jobs() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::ok(
            "21|PENDING|0|Priority|a\n22|PENDING|70|Priority|b\n23|RUNNING|5|None|c\n",
        ));
        backend.status().await.unwrap();
        let spec = backend.sbatch_command(&request(1, 1)).unwrap();
        assert!(
            spec.args.contains(&"--nice=80".to_string()),
            "{:?}",
            spec.args
        );

        let config = SlurmConfig {
            priority_spread: 0,
            ..SlurmConfig::default()
        };
        let (backend, _) = self::backend(config);
        let spec = backend.sbatch_command(&request(1, 1)).unwrap();
        assert!(
            !spec.args.iter().any(|arg| arg.starts_with("--nice")),
            "{:?}",
            spec.args
        );
    }

    #[test]
    fn sbatch_script_execs_the_supervisor_without_secrets() {
        let (backend, _) = backend(SlurmConfig::default());
        let spec = backend.sbatch_command(&request(1 << 30, 2)).unwrap();
        let script = String::from_utf8(spec.stdin.unwrap()).unwrap();
        assert_eq!(
            script,
            "#!/bin/sh\n\
             exec '/usr/local/bin/berth' 'supervise' '--config' '/etc/berth/berth.yml' \
             '--credentials' '/var/lib/berth/credentials/zzzzz-dz642-000000000000001.json' \
             'zzzzz-dz642-000000000000001'\n"
        );
    }

    #[test]
    fn memory_is_rounded_up_to_whole_mebibytes() {
        let mib = 1u64 << 20;
        let cases = [
            // (ram, reserve, expected --mem)
            (1, 0, 1),
            (mib, 0, 1),
            (mib + 1, 0, 2),
            (12_000_000_000, 550 * mib, 11_995),
            (250_000_000, 550 * mib, 789),
            (1_000_000, 256 * mib, 257),
        ];
        for (ram, reserve, expected) in cases {
            let config = SlurmConfig {
                reserve_ram: reserve,
                ..SlurmConfig::default()
            };
            let (backend, _) = backend(config);
            let spec = backend.sbatch_command(&request(ram, 1)).unwrap();
            assert!(
                spec.args.contains(&format!("--mem={expected}")),
                "ram {ram} + reserve {reserve}: {:?}",
                spec.args
            );
        }
        assert_eq!(memory_mib(u64::MAX, 1), None);
    }

    #[test]
    fn container_partitions_win_over_the_configured_default() {
        let config = SlurmConfig {
            partition: Some("batch".into()),
            ..SlurmConfig::default()
        };
        let (backend, _) = backend(config);
        let default = backend.sbatch_command(&request(1, 1)).unwrap();
        assert!(
            default.args.contains(&"--partition=batch".to_string()),
            "{:?}",
            default.args
        );

        let mut own = request(1, 1);
        own.partitions = vec!["blurb".into(), "b2".into()];
        let spec = backend.sbatch_command(&own).unwrap();
        assert!(
            spec.args.contains(&"--partition=blurb,b2".to_string()),
            "{:?}",
            spec.args
        );
        assert!(!spec.args.contains(&"--partition=batch".to_string()));
    }

    #[test]
    fn no_partition_means_no_partition_argument() {
        let (backend, _) = backend(SlurmConfig::default());
        let spec = backend.sbatch_command(&request(1, 1)).unwrap();
        assert!(
            !spec.args.iter().any(|a| a.starts_with("--partition")),
            "{:?}",
            spec.args
        );
    }

    #[test]
    fn max_run_time_becomes_whole_minutes() {
        let (backend, _) = backend(SlurmConfig::default());
        for (seconds, expected) in [
            (1, Some(1)),
            (60, Some(1)),
            (61, Some(2)),
            (124, Some(3)),
            (0, None),
        ] {
            let mut request = request(1, 1);
            request.max_run_time = seconds;
            let spec = backend.sbatch_command(&request).unwrap();
            let time: Vec<&String> = spec
                .args
                .iter()
                .filter(|a| a.starts_with("--time"))
                .collect();
            match expected {
                Some(minutes) => assert_eq!(time, [&format!("--time={minutes}")], "{seconds} s"),
                None => assert!(time.is_empty(), "{seconds} s: {time:?}"),
            }
        }
    }

    #[test]
    fn extra_arguments_come_last_with_substitutions() {
        let config = SlurmConfig {
            sbatch_args: vec![
                "--account=science".into(),
                "--extra=mem={ram_mib},cpus={vcpus},tmp={tmp_mib},prio={priority}".into(),
                "--licenses=scratch:{time_minutes}".into(),
            ],
            output: "/scratch/%x-%j.out".into(),
            ..SlurmConfig::default()
        };
        let (backend, _) = backend(config);
        let spec = backend.sbatch_command(&request(1, 1)).unwrap();
        let tail = &spec.args[spec.args.len() - 3..];
        assert_eq!(
            tail,
            [
                "--output=/scratch/%x-%j.out",
                "--account=science",
                "--extra=mem=257,cpus=1,tmp=0,prio=1",
            ],
            "the argument with an empty {{time_minutes}} is left out"
        );
    }

    #[test]
    fn tmp_comes_from_tmp_mounts_and_reserve() {
        let config = SlurmConfig {
            reserve_tmp: 1 << 30,
            ..SlurmConfig::default()
        };
        let (backend, _) = backend(config);
        let mut with_mounts = request(1 << 30, 1);
        with_mounts.tmp = 3 * (1 << 30) + 1;
        let spec = backend.sbatch_command(&with_mounts).unwrap();
        assert!(
            spec.args.contains(&"--tmp=4097".to_string()),
            "{:?}",
            spec.args
        );

        let (backend, _) = self::backend(SlurmConfig::default());
        let spec = backend.sbatch_command(&request(1 << 30, 1)).unwrap();
        assert!(
            !spec.args.iter().any(|arg| arg.starts_with("--tmp")),
            "no scratch space asked: {:?}",
            spec.args
        );
        let mut huge = request(1, 1);
        huge.tmp = u64::MAX;
        let config = SlurmConfig {
            reserve_tmp: 1,
            ..SlurmConfig::default()
        };
        let (backend, _) = self::backend(config);
        let err = backend.sbatch_command(&huge).unwrap_err();
        assert!(err.is_permanent(), "{err}");
    }

    fn gpus(count: u64) -> GpuRequest {
        GpuRequest {
            stack: "cuda".into(),
            count,
            driver_version: "12.4".into(),
            hardware_target: vec!["8.6".into(), "9.0".into()],
            vram: 10_000_000_000,
        }
    }

    #[test]
    fn gpus_use_the_gpu_arguments() {
        let (backend, _) = backend(SlurmConfig::default());
        let mut with_gpus = request(1, 1);
        with_gpus.gpu = gpus(2);
        let spec = backend.sbatch_command(&with_gpus).unwrap();
        assert_eq!(spec.args.last().map(String::as_str), Some("--gres=gpu:2"));
        let spec = backend.sbatch_command(&request(1, 1)).unwrap();
        assert!(
            !spec.args.iter().any(|arg| arg.contains("gpu")),
            "{:?}",
            spec.args
        );

        let config = SlurmConfig {
            sbatch_args: vec!["--constraint=cc{gpu_hardware_target}".into()],
            gpu_args: vec![
                "--gpus={gpus}".into(),
                "--extra=stack={gpu_stack},driver={gpu_driver_version},vram={gpu_vram_mib}".into(),
            ],
            ..SlurmConfig::default()
        };
        let (backend, _) = self::backend(config);
        let spec = backend.sbatch_command(&with_gpus).unwrap();
        let tail = &spec.args[spec.args.len() - 3..];
        assert_eq!(
            tail,
            [
                "--constraint=cc8.6,9.0",
                "--gpus=2",
                "--extra=stack=cuda,driver=12.4,vram=9537"
            ]
        );
    }

    #[test]
    fn partitions_placeholder_has_the_partition_used() {
        let config = SlurmConfig {
            partition: Some("batch".into()),
            sbatch_args: vec!["--extra=part={partitions}".into()],
            ..SlurmConfig::default()
        };
        let (backend, _) = backend(config);
        let spec = backend.sbatch_command(&request(1, 1)).unwrap();
        assert_eq!(spec.args.last().unwrap(), "--extra=part=batch");
        let mut own = request(1, 1);
        own.partitions = vec!["a".into(), "b".into()];
        let spec = backend.sbatch_command(&own).unwrap();
        assert_eq!(spec.args.last().unwrap(), "--extra=part=a,b");
    }

    #[tokio::test]
    async fn unvalidated_bad_template_fails_submission_only() {
        let config = SlurmConfig {
            sbatch_args: vec!["--extra={nope}".into()],
            ..SlurmConfig::default()
        };
        let (mut backend, runner) = backend(config);
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent(), "the container waits for a fix: {err}");
        assert!(err.to_string().contains("slurm.sbatch_args[0]"), "{err}");
        assert!(runner.calls().is_empty());
    }

    #[test]
    fn quoted_paths_keep_their_quotes() {
        let supervisor = SupervisorCommand {
            program: "/opt/it's here/berth".into(),
            config_file: Some("/etc/o'brien.yml".into()),
        };
        let backend = SlurmBackend::with_user(
            SlurmConfig::default(),
            supervisor,
            RecordingRunner::new(),
            "0".into(),
        );
        let mut request = request(1, 1);
        request.credentials_file = "/creds/a b'c.json".into();
        let spec = backend.sbatch_command(&request).unwrap();
        let script = String::from_utf8(spec.stdin.unwrap()).unwrap();
        assert_eq!(
            script.lines().nth(1).unwrap(),
            "exec '/opt/it'\\''s here/berth' 'supervise' '--config' '/etc/o'\\''brien.yml' \
             '--credentials' '/creds/a b'\\''c.json' 'zzzzz-dz642-000000000000001'"
        );
    }

    #[test]
    fn sbatch_parsable_output() {
        assert_eq!(parse_sbatch_output("123\n"), Ok(JobId::new("123")));
        assert_eq!(
            parse_sbatch_output("4567;cluster1\n"),
            Ok(JobId::new("4567"))
        );
        assert_eq!(parse_sbatch_output("\n  89  \n\n"), Ok(JobId::new("89")));
        for bad in [
            "",
            "\n",
            "Submitted batch job 12\n",
            "12\n13\n",
            "abc;cluster",
            ";cluster",
        ] {
            assert!(parse_sbatch_output(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn squeue_real_output_parses() {
        let jobs = parse_squeue_output(SQUEUE_REAL).unwrap();
        assert_eq!(jobs.len(), 12);
        assert_eq!(
            jobs[0],
            BatchJob {
                id: JobId::new("9"),
                name: "zzzzz-dz642-bbbbbbbbbbbbbb4".into(),
                state: JobState::Pending,
                reason: "Resources".into(),
            }
        );
        assert_eq!(jobs[5].reason, "JobHeldUser");
        assert_eq!(jobs[6].name, "a name with spaces|and pipe");
        assert_eq!(jobs[6].state, JobState::Running);
        assert_eq!(jobs[6].reason, "");
        assert_eq!(jobs[11].id, JobId::new("2"));
        assert_eq!(jobs[11].state, JobState::Suspended);
    }

    #[test]
    fn squeue_empty_output_is_an_empty_queue() {
        assert_eq!(parse_squeue_output(""), Ok(vec![]));
        assert_eq!(parse_squeue_output("\n"), Ok(vec![]));
    }

    #[test]
    fn squeue_garbage_is_an_error() {
        for bad in [
            "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
            "9|PENDING|0|Resources\n",
            "9|PENDING|Resources|name\n",
            "x9|PENDING|0|Resources|name\n",
            "9|pending|0|Resources|name\n",
            "9||0|Resources|name\n",
            "9|PENDING|N/A|Resources|name\n",
        ] {
            let text = format!("{}{bad}", "1|RUNNING|0|None|ok\n");
            let err = parse_squeue_output(&text).unwrap_err();
            assert!(err.starts_with("line 2:"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn squeue_array_and_other_states_parse() {
        let jobs = parse_squeue_output("12_[1-5%2]|PENDING|0|JobArrayTaskLimit|arr\n13+0|COMPLETING|0|None|het\n14|REQUEUE_HOLD|-5|None|x\n").unwrap();
        assert_eq!(jobs[0].id, JobId::new("12_[1-5%2]"));
        assert_eq!(jobs[1].state, JobState::Completing);
        assert_eq!(jobs[2].state, JobState::Other("REQUEUE_HOLD".into()));
    }

    #[tokio::test]
    async fn status_runs_one_user_filtered_squeue() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::ok(SQUEUE_REAL));
        let jobs = backend.status().await.unwrap();
        assert_eq!(jobs.len(), 12);
        let calls = runner.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].program, PathBuf::from("squeue"));
        assert_eq!(
            calls[0].args,
            ["--noheader", "--user=1001", "--format=%i|%T|%y|%r|%j"]
        );
    }

    #[tokio::test]
    async fn squeue_failure_is_an_error() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            1,
            "",
            "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
        ));
        let err = backend.status().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("squeue --noheader"), "{text}");
        assert!(text.contains("exit status: 1"), "{text}");
        assert!(
            text.contains("Unable to contact slurm controller"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn squeue_empty_with_stderr_is_suspicious() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            0,
            "",
            "squeue: error: something odd\n",
        ));
        assert!(backend.status().await.is_err());
        runner.answer(CommandOutput::ok(""));
        assert_eq!(backend.status().await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn submit_keeps_what_was_submitted() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            0,
            "42\n",
            "sbatch: warning: something\n",
        ));
        let submission = backend.submit(&request(1 << 20, 1)).await.unwrap();
        assert_eq!(submission.job_id, JobId::new("42"));
        assert!(
            submission
                .command
                .starts_with("sbatch --parsable --job-name="),
            "{}",
            submission.command
        );
        assert!(submission.script.unwrap().starts_with("#!/bin/sh\nexec "));
        assert_eq!(submission.stderr, "sbatch: warning: something\n");
        assert_eq!(runner.calls().len(), 1);
    }

    #[tokio::test]
    async fn submit_rejection_is_permanent() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            1,
            "",
            "sbatch: error: Memory specification can not be satisfied\n\
             sbatch: error: Batch job submission failed: Requested node configuration is not available\n",
        ));
        let err = backend.submit(&request(100 << 30, 1)).await.unwrap_err();
        assert!(err.is_permanent(), "{err}");
        assert!(
            err.to_string().contains("Requested node configuration"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unknown_partition_permanent_if_requested() {
        let stderr = "sbatch: error: invalid partition specified: nope\n\
                      sbatch: error: Batch job submission failed: Invalid partition name specified\n";
        let config = SlurmConfig {
            partition: Some("nope".into()),
            ..SlurmConfig::default()
        };
        let (mut backend, runner) = backend(config);
        runner.answer(CommandOutput::exited(1, "", stderr));
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent(), "configured partition: {err}");

        let mut own = request(1, 1);
        own.partitions = vec!["nope".into()];
        runner.answer(CommandOutput::exited(1, "", stderr));
        let err = backend.submit(&own).await.unwrap_err();
        assert!(err.is_permanent(), "container's partition: {err}");
    }

    #[tokio::test]
    async fn transient_submit_failures_not_permanent() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            1,
            "",
            "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n",
        ));
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent(), "{err}");

        runner.fail_to_start("No such file or directory");
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent(), "{err}");

        runner.answer(CommandOutput::ok("Submitted batch job 5\n"));
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(matches!(err, BackendError::Parse { .. }), "{err}");
        assert!(!err.is_permanent());
    }

    #[test]
    fn cancel_command_depends_on_the_job_state() {
        let (backend, _) = backend(SlurmConfig::default());
        let args = |state| {
            backend
                .scancel_command(&job("7", state))
                .map(|spec| spec.args)
        };
        assert_eq!(args(JobState::Pending).unwrap(), ["--state=PENDING", "7"]);
        assert_eq!(
            args(JobState::Running).unwrap(),
            ["--batch", "--signal=TERM", "7"]
        );
        assert_eq!(args(JobState::Suspended).unwrap(), ["7"]);
        assert_eq!(args(JobState::Configuring).unwrap(), ["7"]);
        assert_eq!(args(JobState::Other("STOPPED".into())).unwrap(), ["7"]);
        assert_eq!(args(JobState::Completing), None);
    }

    #[tokio::test]
    async fn cancel_of_a_job_that_already_ended_succeeds() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            1,
            "",
            "scancel: error: Kill job error on job id 7: Invalid job id specified\n",
        ));
        backend.cancel(&job("7", JobState::Running)).await.unwrap();
    }

    #[tokio::test]
    async fn cancel_failure_carries_the_command_output() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            1,
            "",
            "scancel: error: Kill job error on job id 15: Job can not be altered now, try again later\n",
        ));
        let err = backend
            .cancel(&job("15", JobState::Running))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("scancel --batch --signal=TERM 15"), "{text}");
        assert!(text.contains("can not be altered"), "{text}");
    }

    #[tokio::test]
    async fn cancel_of_a_completing_job_runs_nothing() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        backend
            .cancel(&job("7", JobState::Completing))
            .await
            .unwrap();
        assert!(runner.calls().is_empty());
    }

    #[test]
    fn missing_programs_name_the_key() {
        let config = SlurmConfig {
            scancel: "/nonexistent/scancel".into(),
            sbatch: "sh".into(),
            squeue: "/bin/sh".into(),
            ..SlurmConfig::default()
        };
        let err = check_programs(&config).unwrap_err();
        assert_eq!(err.key, "slurm.scancel");
        let config = SlurmConfig {
            sbatch: "no-such-sbatch-program".into(),
            ..SlurmConfig::default()
        };
        let err = check_programs(&config).unwrap_err();
        assert_eq!(err.key, "slurm.sbatch");
        assert!(err.to_string().contains("in PATH"), "{err}");
    }

    fn nice_jobs(jobs: &[(i64, Option<i64>)]) -> Vec<NiceJob> {
        jobs.iter()
            .map(|&(priority, nice)| NiceJob { priority, nice })
            .collect()
    }

    #[test]
    fn plan_nice_of_no_jobs_is_empty() {
        assert_eq!(plan_nice(&[], 0, 10), Vec::<i64>::new());
    }

    #[test]
    fn plan_nice_puts_one_job_at_the_base() {
        assert_eq!(plan_nice(&nice_jobs(&[(5, None)]), 0, 10), [0]);
        assert_eq!(plan_nice(&nice_jobs(&[(5, Some(10_000))]), 0, 10), [0]);
        assert_eq!(plan_nice(&nice_jobs(&[(5, Some(-4))]), 0, 10), [0]);
        assert_eq!(plan_nice(&nice_jobs(&[(5, None)]), 100, 10), [100]);
        // Close enough to the base: left alone.
        assert_eq!(plan_nice(&nice_jobs(&[(5, Some(30))]), 0, 10), [30]);
    }

    #[test]
    fn plan_nice_spreads_new_jobs_in_priority_order() {
        let jobs = nice_jobs(&[(9, None), (7, None), (4, None), (1, None)]);
        assert_eq!(plan_nice(&jobs, 0, 10), [0, 10, 20, 30]);
        assert_eq!(plan_nice(&jobs, 0, 100), [0, 100, 200, 300]);
        // A spread below 1 counts as 1.
        assert_eq!(plan_nice(&jobs, 5, 0), [5, 6, 7, 8]);
    }

    #[test]
    fn plan_nice_gives_ties_room_between_their_neighbours() {
        let jobs = nice_jobs(&[(9, None), (5, None), (5, None), (1, None)]);
        assert_eq!(plan_nice(&jobs, 0, 10), [0, 10, 10, 20]);
        // Tied jobs may keep different values; the next priority goes
        // above the highest of them.
        let jobs = nice_jobs(&[(9, Some(0)), (5, Some(12)), (5, Some(40)), (1, Some(45))]);
        assert_eq!(plan_nice(&jobs, 0, 10), [0, 12, 40, 45]);
        let jobs = nice_jobs(&[(9, Some(0)), (5, Some(12)), (5, Some(40)), (1, Some(30))]);
        assert_eq!(plan_nice(&jobs, 0, 10), [0, 12, 40, 50]);
    }

    #[test]
    fn plan_nice_keeps_right_order() {
        for current in [vec![0, 10, 20, 30], vec![0, 1, 2, 99], vec![3, 50, 51, 140]] {
            let jobs: Vec<NiceJob> = current
                .iter()
                .enumerate()
                .map(|(rank, &nice)| NiceJob {
                    priority: 100 - rank as i64,
                    nice: Some(nice),
                })
                .collect();
            assert_eq!(plan_nice(&jobs, 0, 10), current);
        }
    }

    #[test]
    fn plan_nice_is_stable_on_its_own_output() {
        let cases: [&[(i64, Option<i64>)]; 4] = [
            &[(3, Some(20)), (2, Some(10)), (1, Some(0))],
            &[
                (5, None),
                (5, Some(7)),
                (4, Some(500)),
                (1, None),
                (1, Some(0)),
            ],
            &[(8, Some(1000)), (7, Some(-20)), (6, Some(999))],
            &[(1, Some(3)), (1, Some(2)), (1, Some(1))],
        ];
        for case in cases {
            let jobs = nice_jobs(case);
            let first = plan_nice(&jobs, 0, 10);
            let again: Vec<NiceJob> = jobs
                .iter()
                .zip(&first)
                .map(|(job, &nice)| NiceJob {
                    nice: Some(nice),
                    ..*job
                })
                .collect();
            assert_eq!(plan_nice(&again, 0, 10), first, "{case:?}");
            // Higher priority, lower nice value.
            for pair in jobs.iter().zip(&first).collect::<Vec<_>>().windows(2) {
                let ((a, a_nice), (b, b_nice)) = (pair[0], pair[1]);
                if a.priority > b.priority {
                    assert!(a_nice < b_nice, "{case:?} -> {first:?}");
                }
            }
        }
    }

    #[test]
    fn plan_nice_reorders_a_reversed_queue() {
        let jobs = nice_jobs(&[(3, Some(200)), (2, Some(100)), (1, Some(0))]);
        assert_eq!(plan_nice(&jobs, 0, 10), [0, 100, 110]);
        let jobs = nice_jobs(&[(3, Some(20)), (2, Some(10)), (1, Some(0))]);
        assert_eq!(plan_nice(&jobs, 0, 10), [20, 30, 40]);
    }

    #[test]
    fn plan_nice_stays_within_slurm_range() {
        let jobs = nice_jobs(&[(3, None), (2, None), (1, None)]);
        assert_eq!(
            plan_nice(&jobs, MAX_NICE - 10, 10),
            [MAX_NICE - 10, MAX_NICE, MAX_NICE]
        );
        assert_eq!(plan_nice(&jobs, -50, 10), [-50, -40, -30]);
        assert_eq!(plan_nice(&jobs, i64::MIN, 10)[0], -MAX_NICE);
    }

    #[test]
    fn plan_nice_draining_queue_renices_few() {
        // 1,000 pending jobs; each round the most important one starts and
        // the remaining ones are planned again.
        let count = 1000;
        let mut jobs: Vec<NiceJob> = (0..count)
            .map(|rank| NiceJob {
                priority: count - rank,
                nice: None,
            })
            .collect();
        let mut changes = 0;
        while !jobs.is_empty() {
            let planned = plan_nice(&jobs, 0, 10);
            for pair in planned.windows(2) {
                assert!(pair[0] < pair[1], "{planned:?}");
            }
            for (job, nice) in jobs.iter_mut().zip(planned) {
                if job.nice != Some(nice) {
                    changes += 1;
                    job.nice = Some(nice);
                }
            }
            jobs.remove(0);
        }
        // The first plan sets every job once; later rounds move about one
        // job each.
        assert!(changes <= 3 * count, "{changes} changes");
    }

    #[tokio::test]
    async fn reprioritise_batches_by_value() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::ok(
            "21|PENDING|0|Priority|a\n22|PENDING|0|Priority|b\n23|PENDING|0|Priority|c\n24|PENDING|0|Priority|d\n",
        ));
        backend.status().await.unwrap();
        let jobs = [
            (JobId::new("21"), 10),
            (JobId::new("22"), 30),
            (JobId::new("23"), 20),
            (JobId::new("24"), 20),
        ];
        runner.answer(CommandOutput::ok(""));
        runner.answer(CommandOutput::ok(""));
        backend.reprioritise(&jobs).await.unwrap();
        let calls = runner.calls();
        let renices: Vec<&Vec<String>> = calls[1..].iter().map(|c| &c.args).collect();
        // 22 stays at 0; 23 and 24 tie at 10; 21 goes to 20.
        assert_eq!(
            renices,
            [
                &vec!["update".to_string(), "JobId=23,24".into(), "Nice=10".into()],
                &vec!["update".to_string(), "JobId=21".into(), "Nice=20".into()],
            ]
        );
        assert_eq!(calls[1].program, PathBuf::from("scontrol"));

        // The same order again: nothing to change.
        backend.reprioritise(&jobs).await.unwrap();
        assert_eq!(runner.calls().len(), 3);
    }

    #[tokio::test]
    async fn reprioritise_does_nothing_with_spread_zero() {
        let config = SlurmConfig {
            priority_spread: 0,
            ..SlurmConfig::default()
        };
        let (mut backend, runner) = backend(config);
        runner.answer(CommandOutput::ok(
            "21|PENDING|7|Priority|a\n22|PENDING|3|Priority|b\n",
        ));
        backend.status().await.unwrap();
        backend
            .reprioritise(&[(JobId::new("21"), 2), (JobId::new("22"), 1)])
            .await
            .unwrap();
        assert_eq!(runner.calls().len(), 1);
    }

    #[tokio::test]
    async fn failed_renice_retried_next_poll() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        let listing = "21|PENDING|0|Priority|a\n22|PENDING|0|Priority|b\n";
        let jobs = [(JobId::new("21"), 2), (JobId::new("22"), 1)];
        runner.answer(CommandOutput::ok(listing));
        backend.status().await.unwrap();
        runner.answer(CommandOutput::exited(
            1,
            "",
            "slurm_update error: Unable to contact slurm controller (connect failure)\n",
        ));
        let err = backend.reprioritise(&jobs).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("scontrol update JobId=22 Nice=10"), "{text}");
        assert!(text.contains("Unable to contact"), "{text}");
        assert!(!err.is_permanent());

        // The next poll lists the job unchanged and the renice runs again.
        runner.answer(CommandOutput::ok(listing));
        backend.status().await.unwrap();
        runner.answer(CommandOutput::ok(""));
        backend.reprioritise(&jobs).await.unwrap();
        let calls = runner.calls();
        assert_eq!(calls.len(), 4);
        assert_eq!(calls[3].args, calls[1].args);
        assert!(calls.iter().all(|c| c.program != Path::new("scancel")));
    }

    #[tokio::test]
    async fn renice_ignores_ended_jobs() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::ok(
            "21|PENDING|0|Priority|a\n22|PENDING|0|Priority|b\n23|PENDING|0|Priority|c\n",
        ));
        backend.status().await.unwrap();
        runner.answer(CommandOutput::exited(
            1,
            "",
            "Invalid job id specified for job 23\n",
        ));
        backend
            .reprioritise(&[
                (JobId::new("21"), 3),
                (JobId::new("22"), 3),
                (JobId::new("23"), 1),
            ])
            .await
            .unwrap();
        assert!(renices_only_ended_jobs(
            "Invalid job id specified for job 23\n"
        ));
        assert!(!renices_only_ended_jobs(""));
        assert!(!renices_only_ended_jobs(
            "Invalid job id specified for job 23\nAccess/permission denied\n"
        ));
    }

    /// `scontrol show job -o 309` on slurm-wlm 22.05, for a `sleep 60` job
    /// cancelled with `scancel` a second after it started.
    const SHOW_JOB_CANCELLED: &str = "JobId=309 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901500 Nice=0 Account=(null) QOS=(null) JobState=CANCELLED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:00:01 TimeLimit=365-00:00:00 TimeMin=N/A SubmitTime=2026-12-05T00:48:03 EligibleTime=2026-12-05T00:48:03 AccrueTime=2026-12-05T00:48:03 StartTime=2026-12-05T00:48:04 EndTime=2026-12-05T00:48:05 Deadline=N/A SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-12-05T00:48:04 Scheduler=Backfill Partition=debug AllocNode:Sid=localhost:14304 ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=YES Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp StdErr=/tmp/slurm-309.out StdIn=/dev/null StdOut=/tmp/slurm-309.out Power= \n";

    /// The same command for a `sleep 1` job that ended by itself.
    const SHOW_JOB_COMPLETED: &str = "JobId=308 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901501 Nice=0 Account=(null) QOS=(null) JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:01 TimeLimit=365-00:00:00 TimeMin=N/A SubmitTime=2026-12-05T00:48:03 EligibleTime=2026-12-05T00:48:03 AccrueTime=2026-12-05T00:48:03 StartTime=2026-12-05T00:48:04 EndTime=2026-12-05T00:48:05 Deadline=N/A SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-12-05T00:48:04 Scheduler=Backfill Partition=debug AllocNode:Sid=localhost:14304 ReqNodeList=(null) ExcNodeList=(null) NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=YES Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/tmp StdErr=/tmp/slurm-308.out StdIn=/dev/null StdOut=/tmp/slurm-308.out Power= \n";

    #[test]
    fn show_job_of_a_cancelled_job_parses() {
        let end = parse_show_job(&JobId::new("309"), SHOW_JOB_CANCELLED).unwrap();
        assert_eq!(
            end,
            JobEnd {
                state: "CANCELLED".into(),
                cancelled_by: None,
                reason: String::new(),
                exit_code: "0:15".into(),
            }
        );
        assert_eq!(
            describe_job_end(&JobId::new("309"), &end),
            "slurm job 309 ended CANCELLED: it was cancelled (exit code 0:15)"
        );
    }

    #[test]
    fn show_job_of_a_completed_job_parses() {
        let end = parse_show_job(&JobId::new("308"), SHOW_JOB_COMPLETED).unwrap();
        assert_eq!(end.state, "COMPLETED");
        assert_eq!(
            describe_job_end(&JobId::new("308"), &end),
            "slurm job 308 ended COMPLETED: its script exited (exit code 0:0)"
        );
    }

    #[test]
    fn show_job_end_states() {
        // The real line with its state, reason and exit code edited, as
        // Slurm prints them for these ends.
        let edit =
            |fields: &str| SHOW_JOB_CANCELLED.replace("JobState=CANCELLED Reason=None", fields);
        let id = JobId::new("309");
        for (fields, expected) in [
            (
                "JobState=OUT_OF_MEMORY Reason=OutOfMemory",
                "slurm job 309 ended OUT_OF_MEMORY: it ran out of memory (reason OutOfMemory, exit code 0:15)",
            ),
            (
                "JobState=TIMEOUT Reason=TimeLimit",
                "slurm job 309 ended TIMEOUT: it reached its time limit (reason TimeLimit, exit code 0:15)",
            ),
            (
                "JobState=NODE_FAIL Reason=NodeDown",
                "slurm job 309 ended NODE_FAIL: its node failed (reason NodeDown, exit code 0:15)",
            ),
            (
                "JobState=PREEMPTED Reason=None",
                "slurm job 309 ended PREEMPTED: a job of higher priority preempted it (exit code 0:15)",
            ),
            (
                "JobState=CANCELLED by 1000 Reason=None",
                "slurm job 309 ended CANCELLED by user 1000: it was cancelled (exit code 0:15)",
            ),
            (
                "JobState=SPECIAL_EXIT Reason=None",
                "slurm job 309 ended SPECIAL_EXIT (exit code 0:15)",
            ),
        ] {
            let end = parse_show_job(&id, &edit(fields)).unwrap();
            assert_eq!(describe_job_end(&id, &end), expected);
        }
    }

    #[test]
    fn show_job_without_a_state_is_an_error() {
        let id = JobId::new("5");
        assert!(parse_show_job(&id, "").is_err());
        assert!(parse_show_job(&id, "JobId=5 JobName=x\n").is_err());
        assert!(parse_show_job(&id, "garbage\n").is_err());
    }

    #[test]
    fn sacct_first_line_is_the_job() {
        let end = parse_sacct_end("CANCELLED by 0|0:15|None\nCANCELLED|0:15|\n").unwrap();
        assert_eq!(end.state, "CANCELLED");
        assert_eq!(end.cancelled_by.as_deref(), Some("0"));
        assert_eq!(end.exit_code, "0:15");
        assert_eq!(end.reason, "");
        assert_eq!(parse_sacct_end(""), None);
        assert_eq!(parse_sacct_end("|0:0|None\n"), None);
    }

    #[tokio::test]
    async fn end_reason_asks_scontrol_for_one_job() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::ok(SHOW_JOB_CANCELLED));
        let reason = backend.end_reason(&JobId::new("309")).await.unwrap();
        assert_eq!(
            reason.as_deref(),
            Some("slurm job 309 ended CANCELLED: it was cancelled (exit code 0:15)")
        );
        let calls = runner.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].program, PathBuf::from("scontrol"));
        assert_eq!(calls[0].args, ["show", "job", "-o", "309"]);
    }

    #[tokio::test]
    async fn end_reason_falls_back_to_sacct() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        let unknown =
            || CommandOutput::exited(1, "", "slurm_load_jobs error: Invalid job id specified\n");
        runner.answer(unknown()).answer(CommandOutput::ok(
            "TIMEOUT|0:0|TimeLimit\nCANCELLED|0:15|\n",
        ));
        let reason = backend.end_reason(&JobId::new("7")).await.unwrap();
        assert_eq!(
            reason.as_deref(),
            Some("slurm job 7 ended TIMEOUT: it reached its time limit (reason TimeLimit, exit code 0:0)")
        );
        assert_eq!(
            runner.calls()[1].args,
            ["-j", "7", "-n", "-P", "-o", "State,ExitCode,Reason"]
        );

        // Without accounting, as on this machine, no reason is found.
        runner.answer(unknown()).answer(CommandOutput::exited(
            1,
            "",
            "Slurm accounting storage is disabled\n",
        ));
        assert_eq!(backend.end_reason(&JobId::new("7")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn end_reason_failure_is_an_error() {
        let (mut backend, runner) = backend(SlurmConfig::default());
        runner.answer(CommandOutput::exited(
            1,
            "",
            "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
        ));
        assert!(backend.end_reason(&JobId::new("7")).await.is_err());
        runner.answer(CommandOutput::ok("nonsense\n"));
        assert!(backend.end_reason(&JobId::new("7")).await.is_err());
        assert_eq!(
            runner.calls().len(),
            2,
            "sacct is only for a job Slurm forgot"
        );
    }
}
