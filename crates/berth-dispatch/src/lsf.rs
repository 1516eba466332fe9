//! The LSF backend: `bsub` to submit, one `bjobs` per poll for status,
//! `bkill` to cancel.
//!
//! Like the Slurm adapter, this one only builds commands and parses their
//! output with pure functions; a [`CommandRunner`] runs the commands.
//!
//! - Submit: `bsub -J UUID -n N -R "rusage[mem=MiBMB:tmp=MiBMB]
//!   span[hosts=1]" -cwd / [-q "Q1 Q2"] [-W MIN] [-sp P] -o PATTERN
//!   EXTRA... [GPU...]` with the job script on stdin. Memory is the
//!   container's RAM plus the reserve, in MiB, with an explicit `MB` unit
//!   so that the site's `LSF_UNIT_FOR_LIMITS` does not change its meaning.
//!   `tmp` (left out when 0) is the `tmp` mounts plus the scratch reserve.
//!   Several queues go in one `-q` value, from which LSF picks one. `-W` is
//!   LSF's hard run limit, in whole minutes. `EXTRA` is `lsf.bsub_args` and
//!   `GPU` is `lsf.gpu_args` (by default `-gpu num=N`, only for a container
//!   with GPUs), both argument templates ([`crate::template`]). bsub
//!   prints `Job <ID> is submitted to queue <Q>.` (or `to default queue
//!   <Q>`), read by [`parse_bsub_output`].
//! - Status: `bjobs -json -o "jobid job_name stat pend_reason" -u USER`.
//!   `-json` keeps job names whole: the column output cuts a name longer
//!   than its width. Without `-a`, bjobs lists unfinished jobs only, so a
//!   job that ended leaves the list as it leaves Slurm's queue; `-a` would
//!   also make bjobs read every finished job kept for `CLEAN_PERIOD`. With
//!   no unfinished job, bjobs prints `No unfinished job found` on stderr
//!   (exit status 0, or 255 on some versions) and nothing on stdout: that
//!   exact output, and only it, is an empty queue. Any other failure, empty
//!   output or unreadable JSON is an error.
//!   NOTE: the stand-ins print that message for an empty queue; a version
//!   that prints an empty `RECORDS` array instead is read as empty too, but
//!   one that exits 255 with such JSON would be taken for a failure.
//! - States: `PEND` is pending; `PSUSP` (held before it started) is
//!   pending as well, so that cancelling it removes it; `RUN` is running;
//!   `USUSP` and `SSUSP` are suspended; `DONE` and `EXIT` have ended and are
//!   left out; `UNKWN` (mbatchd lost contact with the host) and `ZOMBI`
//!   (killed, not yet confirmed) stay listed under their own names, so that
//!   the dispatcher does not take them for gone.
//! - Pending reasons: LSF's `PEND_REASON` sentence, without its trailing
//!   `;`, reaches users through the dispatch loop.
//! - Cancel: a pending job with `bkill ID`; a running one with `bkill -s
//!   TERM ID`, so that its supervisor can stop the container and keep the
//!   logs; any other with `bkill ID`. `Job has already finished` and `No
//!   matching job found` count as cancelled. LSF sends the signal to every
//!   process of the job; the job's main process is the supervisor, which
//!   the job script starts with `exec`.
//! - Priorities, with `lsf.user_priority` only (LSF accepts `-sp` only
//!   where `lsb.params` sets `MAX_USER_PRIORITY`): after each status query
//!   the dispatcher hands over its pending jobs with their containers'
//!   priorities. [`plan_nice`] orders them as it orders Slurm's nice
//!   values, counted down from `lsf.max_user_priority` in steps of
//!   `lsf.priority_spread` and floored at 1, and each job whose value
//!   changes gets one `bmod -sp P ID`. A new job is submitted with `-sp`
//!   one step below the lowest known value, so it waits behind the others
//!   until a poll places it. The known values are the ones the dispatcher
//!   set; after a restart it sets each pending job's value once again.

use async_trait::async_trait;

use crate::backend::{Backend, BackendError, BatchJob, JobId, JobRequest, JobState, Submission};
use crate::command::{CommandError, CommandOutput, CommandRunner, CommandSpec};
use std::collections::HashMap;

use crate::arguments;
use crate::config::{ConfigError, LsfConfig};
use crate::script::exec_script;
use crate::slurm::{find_program, memory_mib, plan_nice, sort_by_priority, NiceJob};
use crate::template::{expand_all, ArgTemplate, TemplateValues};
use crate::SupervisorCommand;

/// `bjobs -o` fields: job id, name, state, pending reason.
pub const BJOBS_FIELDS: &str = "jobid job_name stat pend_reason";

/// The whole stderr of bjobs when the user has no unfinished job.
const NO_UNFINISHED_JOB: &str = "No unfinished job found";

/// Fragments of `bsub` errors that reject the job itself, so that another
/// try fails the same way (LSF's texts for a request over a queue's limits
/// and for a malformed resource requirement).
const REJECTIONS: &[&str] = &[
    "Cannot exceed queue's hard limit(s)",
    "Bad resource requirement syntax",
];

/// `bsub` errors about the queue. They are the container's fault only when
/// the container named its queues; the configured queue is the operator's.
const QUEUE_REJECTIONS: &[&str] = &["No such queue", "User cannot use the queue"];

/// Fragments of `bkill` and `bmod` output that mean the job has already
/// ended.
const ALREADY_GONE: &[&str] = &["Job has already finished", "No matching job found"];

/// Jobs submitted, listed and cancelled with LSF's commands.
#[derive(Debug)]
pub struct LsfBackend<R> {
    config: LsfConfig,
    supervisor: SupervisorCommand,
    runner: R,
    /// The `bjobs -u` value: the dispatcher's user name.
    user: String,
    /// The `-sp` value of each listed job that the dispatcher set, at
    /// submission or with `bmod`.
    priorities: HashMap<JobId, u32>,
    /// `bsub_args` and `gpu_args`, parsed; an error of a configuration
    /// that skipped [`crate::Config::validate`] fails each submission.
    templates: Result<(Vec<ArgTemplate>, Vec<ArgTemplate>), ConfigError>,
}

impl<R: CommandRunner> LsfBackend<R> {
    /// Creates a backend that lists the jobs of `user`, an LSF user name.
    pub fn new(
        config: LsfConfig,
        supervisor: SupervisorCommand,
        runner: R,
        user: String,
    ) -> LsfBackend<R> {
        let templates = parse_templates(&config);
        LsfBackend {
            config,
            supervisor,
            runner,
            user,
            priorities: HashMap::new(),
            templates,
        }
    }

    /// Builds the `bsub` command, with the job script on its stdin.
    pub fn bsub_command(&self, request: &JobRequest) -> Result<CommandSpec, BackendError> {
        let uuid = &request.container_uuid;
        let (extra, gpu_extra) = self.templates.as_ref().map_err(|err| err.clone())?;
        let too_large = |what: String| BackendError::InvalidRequest {
            container: uuid.clone(),
            reason: format!("{what} too large"),
        };
        let mem_mib = memory_mib(request.ram, self.config.reserve_ram).ok_or_else(|| {
            too_large(format!("runtime_constraints.ram {} bytes is", request.ram))
        })?;
        let tmp_mib = memory_mib(request.tmp, self.config.reserve_tmp)
            .ok_or_else(|| too_large(format!("the tmp mounts' {} bytes are", request.tmp)))?;
        let rusage = if tmp_mib > 0 {
            format!("rusage[mem={mem_mib}MB:tmp={tmp_mib}MB] span[hosts=1]")
        } else {
            format!("rusage[mem={mem_mib}MB] span[hosts=1]")
        };
        let mut args = vec![
            "-J".to_string(),
            uuid.clone(),
            "-n".to_string(),
            request.vcpus.to_string(),
            "-R".to_string(),
            rusage,
            "-cwd".to_string(),
            "/".to_string(),
        ];
        let queue = if request.partitions.is_empty() {
            self.config.queue.clone()
        } else {
            Some(request.partitions.join(" "))
        };
        if let Some(queue) = &queue {
            args.push("-q".to_string());
            args.push(queue.clone());
        }
        if request.max_run_time > 0 {
            // NOTE: LSF's run limit is in whole minutes, so a job may run up
            // to 59 s past max_run_time.
            args.push("-W".to_string());
            args.push(request.max_run_time.div_ceil(60).to_string());
        }
        if let Some(priority) = self.new_job_priority() {
            args.push("-sp".to_string());
            args.push(priority.to_string());
        }
        args.push("-o".to_string());
        args.push(self.config.output.clone());
        let values = TemplateValues::for_job(request, mem_mib, tmp_mib, queue.unwrap_or_default());
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
        Ok(CommandSpec::new(&self.config.bsub, args).with_stdin(script.into_bytes()))
    }

    /// Returns the `-sp` value of a new job: one step below the lowest
    /// known value, so that it waits behind the listed jobs until the next
    /// poll places it, or `None` when user priorities are off.
    fn new_job_priority(&self) -> Option<u32> {
        if !self.config.user_priority {
            return None;
        }
        let max = self.config.max_user_priority.max(1);
        let lowest = self.priorities.values().copied().min();
        let priority = lowest.map_or(max, |lowest| {
            lowest.saturating_sub(self.config.priority_spread)
        });
        Some(priority.clamp(1, max))
    }

    /// Builds the command that sets the user priority of one job.
    pub fn bmod_command(&self, priority: u32, job: &JobId) -> CommandSpec {
        CommandSpec::new(
            &self.config.bmod,
            vec!["-sp".to_string(), priority.to_string(), job.to_string()],
        )
    }

    /// Plans the user priorities of `jobs` (job ids with their containers'
    /// priorities): the jobs whose value changes, with the new value, in
    /// the order of the containers' priorities. Ties are ordered by job id.
    pub fn priority_plan(&self, jobs: &[(JobId, i64)]) -> Vec<(JobId, u32)> {
        if !self.config.user_priority {
            return Vec::new();
        }
        let max = self.config.max_user_priority.max(1);
        let sorted = sort_by_priority(jobs);
        // A higher -sp runs first, so -sp is counted down from the maximum
        // as Slurm's nice values are counted up from the base.
        let inputs: Vec<NiceJob> = sorted
            .iter()
            .map(|(id, priority)| NiceJob {
                priority: *priority,
                nice: self
                    .priorities
                    .get(id)
                    .map(|sp| i64::from(max) - i64::from(*sp)),
            })
            .collect();
        let planned = plan_nice(&inputs, 0, i64::from(self.config.priority_spread));
        let mut changes = Vec::new();
        for ((id, _), nice) in sorted.iter().zip(planned) {
            let sp = u32::try_from((i64::from(max) - nice).max(1)).unwrap_or(1);
            if self.priorities.get(id) != Some(&sp) {
                changes.push((id.clone(), sp));
            }
        }
        changes
    }

    /// Builds the one status query.
    pub fn bjobs_command(&self) -> CommandSpec {
        CommandSpec::new(
            &self.config.bjobs,
            vec![
                "-json".to_string(),
                "-o".to_string(),
                BJOBS_FIELDS.to_string(),
                "-u".to_string(),
                self.user.clone(),
            ],
        )
    }

    /// Builds the command that cancels `job` in its state.
    pub fn bkill_command(&self, job: &BatchJob) -> CommandSpec {
        let id = job.id.to_string();
        let args = match job.state {
            JobState::Running => vec!["-s".to_string(), "TERM".to_string(), id],
            _ => vec![id],
        };
        CommandSpec::new(&self.config.bkill, args)
    }

    /// Submits one job; takes `&self` so that submissions can overlap.
    /// Runs `bsub` for one container. Returns the submission and the user
    /// priority it was submitted with, if any.
    async fn submit_one(
        &self,
        request: &JobRequest,
    ) -> Result<(Submission, Option<u32>), BackendError> {
        let spec = self.bsub_command(request)?;
        let output = self.runner.run(&spec).await?;
        let output = output
            .check(&spec)
            .map_err(|err| self.submit_error(request, err))?;
        let job_id = parse_bsub_output(&output.stdout).map_err(|message| BackendError::Parse {
            command: spec.command_line(),
            message,
            output: output.stdout.clone(),
        })?;
        let script = spec
            .stdin
            .as_deref()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
        let priority = submitted_priority(&spec.args);
        let submission = Submission {
            job_id,
            command: spec.command_line(),
            script,
            stdout: output.stdout,
            stderr: output.stderr,
        };
        Ok((submission, priority))
    }

    /// Classifies a failed `bsub`. A rejection of the job itself is
    /// permanent. Anything else (LSF down, a busy mbatchd, a timeout) may
    /// pass on another try.
    fn submit_error(&self, request: &JobRequest, error: CommandError) -> BackendError {
        let stderr = error.stderr().unwrap_or_default();
        let queue_rejected = !request.partitions.is_empty()
            && QUEUE_REJECTIONS.iter().any(|text| stderr.contains(text));
        if queue_rejected || REJECTIONS.iter().any(|text| stderr.contains(text)) {
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
impl<R: CommandRunner> Backend for LsfBackend<R> {
    fn name(&self) -> &'static str {
        "lsf"
    }

    async fn submit(&mut self, request: &JobRequest) -> Result<Submission, BackendError> {
        let (submission, priority) = self.submit_one(request).await?;
        if let Some(priority) = priority {
            self.priorities.insert(submission.job_id.clone(), priority);
        }
        Ok(submission)
    }

    /// Runs the submissions concurrently; the command runner bounds how
    /// many processes run at once.
    async fn submit_many(
        &mut self,
        requests: &[JobRequest],
    ) -> Vec<Result<Submission, BackendError>> {
        let backend = &*self;
        let results =
            futures::future::join_all(requests.iter().map(|request| backend.submit_one(request)))
                .await;
        results
            .into_iter()
            .map(|result| {
                let (submission, priority) = result?;
                if let Some(priority) = priority {
                    self.priorities.insert(submission.job_id.clone(), priority);
                }
                Ok(submission)
            })
            .collect()
    }

    async fn status(&mut self) -> Result<Vec<BatchJob>, BackendError> {
        let spec = self.bjobs_command();
        let output = self.runner.run(&spec).await?;
        if is_no_unfinished_job(&output) {
            self.priorities.clear();
            return Ok(Vec::new());
        }
        let output = output.check(&spec)?;
        let jobs = parse_bjobs_json(&output.stdout).map_err(|message| BackendError::Parse {
            command: spec.command_line(),
            message,
            output: output.stdout.clone(),
        })?;
        self.priorities
            .retain(|id, _| jobs.iter().any(|job| &job.id == id));
        Ok(jobs)
    }

    async fn cancel(&mut self, job: &BatchJob) -> Result<(), BackendError> {
        let spec = self.bkill_command(job);
        let output = self.runner.run(&spec).await?;
        let gone = ALREADY_GONE
            .iter()
            .any(|text| output.stderr.contains(text) || output.stdout.contains(text));
        if output.success() || gone {
            return Ok(());
        }
        output.check(&spec)?;
        Ok(())
    }

    async fn reprioritise(&mut self, jobs: &[(JobId, i64)]) -> Result<(), BackendError> {
        let mut first_error = None;
        for (id, priority) in self.priority_plan(jobs) {
            let spec = self.bmod_command(priority, &id);
            let result = match self.runner.run(&spec).await {
                Ok(output) if output.success() => Ok(true),
                // A job that ended since the status query needs no order.
                Ok(output) if ALREADY_GONE.iter().any(|text| output.stderr.contains(text)) => {
                    Ok(false)
                }
                Ok(output) => output.check(&spec).map(|_| true),
                Err(err) => Err(err),
            };
            match result {
                Ok(true) => {
                    self.priorities.insert(id, priority);
                }
                Ok(false) => {
                    self.priorities.remove(&id);
                }
                Err(err) => {
                    tracing::debug!(job_id = %id, error = %err, "failed to set the job's user priority");
                    first_error.get_or_insert(BackendError::Command(err));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Returns the `-sp` value of a `bsub` command line.
fn submitted_priority(args: &[String]) -> Option<u32> {
    let index = args.iter().position(|arg| arg == "-sp")?;
    args.get(index + 1)?.parse().ok()
}

/// Parses the configured argument templates. The error names the key of
/// the bad entry, as [`crate::Config::validate`] does.
fn parse_templates(
    config: &LsfConfig,
) -> Result<(Vec<ArgTemplate>, Vec<ArgTemplate>), ConfigError> {
    let extra = arguments::bsub_templates(&config.bsub_args, false)
        .map_err(|(index, message)| ConfigError::new(format!("lsf.bsub_args[{index}]"), message))?;
    let gpu = arguments::bsub_templates(&config.gpu_args, true)
        .map_err(|(index, message)| ConfigError::new(format!("lsf.gpu_args[{index}]"), message))?;
    Ok((extra, gpu))
}

/// Returns true for the output of bjobs when the user has no unfinished job: nothing on
/// stdout, exactly `No unfinished job found` on stderr, exit status 0 or
/// 255.
pub fn is_no_unfinished_job(output: &CommandOutput) -> bool {
    matches!(output.code, Some(0 | 255))
        && output.stdout.trim().is_empty()
        && output.stderr.trim() == NO_UNFINISHED_JOB
}

/// Parses the output of bsub: a line `Job <ID> is submitted to queue <Q>.` or
/// `Job <ID> is submitted to default queue <Q>.`, among other lines
/// (bsub may print `<<Waiting for dispatch ...>>` and warnings).
pub fn parse_bsub_output(stdout: &str) -> Result<JobId, String> {
    let mut found = None;
    for line in stdout.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("Job <") else {
            continue;
        };
        let Some((id, tail)) = rest.split_once('>') else {
            continue;
        };
        if !tail.trim_start().starts_with("is submitted to") {
            continue;
        }
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{line:?} does not name a numeric job id"));
        }
        if found.is_some() {
            return Err("more than one job was submitted".to_string());
        }
        found = Some(JobId::new(id));
    }
    found.ok_or_else(|| "expected a line `Job <ID> is submitted to queue <Q>.`".to_string())
}

/// Parses `bjobs -json -o "`[`BJOBS_FIELDS`]`"` output. Jobs that have
/// ended (`DONE`, `EXIT`) are left out. A record LSF marks with `ERROR`, a
/// missing field or an unknown state is an error, so that garbage never
/// looks like a queue without the dispatcher's jobs.
pub fn parse_bjobs_json(stdout: &str) -> Result<Vec<BatchJob>, String> {
    let value: serde_json::Value =
        serde_json::from_str(stdout.trim()).map_err(|err| format!("not a JSON document: {err}"))?;
    let records = value
        .get("RECORDS")
        .and_then(serde_json::Value::as_array)
        .ok_or("no RECORDS array")?;
    if let Some(count) = value.get("JOBS").and_then(serde_json::Value::as_u64) {
        if usize::try_from(count).ok() != Some(records.len()) {
            return Err(format!(
                "JOBS says {count} but RECORDS holds {}",
                records.len()
            ));
        }
    }
    let mut jobs = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let field = |name: &str| record.get(name).and_then(serde_json::Value::as_str);
        if let Some(error) = field("ERROR") {
            return Err(format!("record {index}: LSF reports {error:?}"));
        }
        let (Some(id), Some(name), Some(stat)) = (field("JOBID"), field("JOB_NAME"), field("STAT"))
        else {
            return Err(format!(
                "record {index}: expected JOBID, JOB_NAME and STAT strings: {record}"
            ));
        };
        let id = id.trim();
        // Plain ids, and `ID[INDEX]` for array jobs of the same user.
        let id_chars = |b: u8| b.is_ascii_digit() || b"[]".contains(&b);
        if !id.starts_with(|c: char| c.is_ascii_digit()) || !id.bytes().all(id_chars) {
            return Err(format!("record {index}: {id:?} is not an LSF job id"));
        }
        let Some(state) =
            parse_state(stat.trim()).map_err(|message| format!("record {index}: {message}"))?
        else {
            continue;
        };
        let reason = field("PEND_REASON").unwrap_or_default().trim();
        let reason = reason.strip_suffix(';').unwrap_or(reason).trim();
        let reason = if state == JobState::Pending {
            reason
        } else {
            ""
        };
        jobs.push(BatchJob {
            id: JobId::new(id),
            name: name.to_string(),
            state,
            reason: reason.to_string(),
        });
    }
    Ok(jobs)
}

/// Maps LSF's job states; `None` for a job that has ended.
fn parse_state(stat: &str) -> Result<Option<JobState>, String> {
    let state = match stat {
        "PEND" | "PSUSP" => JobState::Pending,
        "RUN" => JobState::Running,
        "USUSP" | "SSUSP" => JobState::Suspended,
        "DONE" | "EXIT" => return Ok(None),
        "UNKWN" | "ZOMBI" => JobState::Other(stat.to_string()),
        other => return Err(format!("{other:?} is not an LSF job state")),
    };
    Ok(Some(state))
}

/// Checks that each LSF program exists. The error names the key of a
/// missing program.
pub fn check_programs(config: &LsfConfig) -> Result<(), ConfigError> {
    let bmod = config.user_priority.then_some(("lsf.bmod", &config.bmod));
    let programs = [
        ("lsf.bsub", &config.bsub),
        ("lsf.bjobs", &config.bjobs),
        ("lsf.bkill", &config.bkill),
    ];
    for (key, program) in programs.into_iter().chain(bmod) {
        if find_program(program).is_none() {
            return Err(ConfigError {
                key: key.to_string(),
                message: format!(
                    "{} is not an executable file{}: install LSF's client commands or give the program's full path",
                    program.display(),
                    if program.components().count() == 1 { " in PATH" } else { "" }
                ),
            });
        }
    }
    Ok(())
}

/// Returns the name of the user the dispatcher runs as, for `bjobs -u`.
pub fn current_user() -> Result<String, ConfigError> {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => Ok(user.name),
        Ok(None) => Err(ConfigError {
            key: "lsf.user".to_string(),
            message: format!("user id {uid} has no name: set the key to the LSF user name"),
        }),
        Err(err) => Err(ConfigError {
            key: "lsf.user".to_string(),
            message: format!(
                "failed to look up user id {uid}: {err}; set the key to the LSF user name"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::GpuRequest;
    use std::path::PathBuf;

    use crate::command::recording::RecordingRunner;

    const UUID: &str = "zzzzz-dz642-000000000000001";

    /// `bjobs -json -o "jobid job_name stat pend_reason"` in the layout of
    /// IBM's bjobs -json documentation (LSF 10.1): a `COMMAND`, the number
    /// of `JOBS` and one record per job, every value a string, pending
    /// reasons ending with `;`.
    const BJOBS_JSON: &str = r#"{
  "COMMAND":"bjobs",
  "JOBS":6,
  "RECORDS":[
    {
      "JOBID":"1201",
      "JOB_NAME":"zzzzz-dz642-bbbbbbbbbbbbbb4",
      "STAT":"PEND",
      "PEND_REASON":"New job is waiting for scheduling;"
    },
    {
      "JOBID":"1202",
      "JOB_NAME":"zzzzz-dz642-bbbbbbbbbbbbbb5",
      "STAT":"PSUSP",
      "PEND_REASON":"The job was suspended by the user while pending;"
    },
    {
      "JOBID":"1198",
      "JOB_NAME":"zzzzz-dz642-bbbbbbbbbbbbbb1",
      "STAT":"RUN",
      "PEND_REASON":""
    },
    {
      "JOBID":"1199",
      "JOB_NAME":"a name with spaces",
      "STAT":"SSUSP",
      "PEND_REASON":""
    },
    {
      "JOBID":"1190",
      "JOB_NAME":"zzzzz-dz642-bbbbbbbbbbbbbb0",
      "STAT":"DONE",
      "PEND_REASON":""
    },
    {
      "JOBID":"1195",
      "JOB_NAME":"lost",
      "STAT":"UNKWN",
      "PEND_REASON":""
    }
  ]
}
"#;

    fn supervisor() -> SupervisorCommand {
        SupervisorCommand {
            program: "/usr/local/bin/berth".into(),
            config_file: None,
        }
    }

    fn backend(config: LsfConfig) -> (LsfBackend<RecordingRunner>, RecordingRunner) {
        let runner = RecordingRunner::new();
        let backend = LsfBackend::new(config, supervisor(), runner.clone(), "berth".into());
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
            credentials_file: PathBuf::from(format!("/creds/{UUID}.json")),
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
    fn bsub_arguments_for_a_plain_container() {
        let (backend, _) = backend(LsfConfig::default());
        let spec = backend.bsub_command(&request(1 << 30, 2)).unwrap();
        assert_eq!(spec.program, PathBuf::from("bsub"));
        assert_eq!(
            spec.args,
            [
                "-J",
                UUID,
                "-n",
                "2",
                "-R",
                "rusage[mem=1280MB] span[hosts=1]",
                "-cwd",
                "/",
                "-o",
                "/tmp/berth-%J.out",
            ]
        );
        let script = String::from_utf8(spec.stdin.unwrap()).unwrap();
        assert!(script.starts_with("#!/bin/sh\nexec '/usr/local/bin/berth' 'supervise'"));
        assert!(script.contains(UUID));
    }

    #[test]
    fn bsub_queues_run_limit_and_extra_arguments() {
        let config = LsfConfig {
            queue: Some("normal".into()),
            bsub_args: vec!["-P".into(), "science".into()],
            ..LsfConfig::default()
        };
        let (backend, _) = backend(config);
        let default = backend.bsub_command(&request(1, 1)).unwrap();
        assert!(default.args.windows(2).any(|w| w == ["-q", "normal"]));

        let mut own = request(1, 1);
        own.partitions = vec!["short".into(), "long".into()];
        own.max_run_time = 61;
        let spec = backend.bsub_command(&own).unwrap();
        assert!(spec.args.windows(2).any(|w| w == ["-q", "short long"]));
        assert!(spec.args.windows(2).any(|w| w == ["-W", "2"]));
        assert_eq!(&spec.args[spec.args.len() - 2..], ["-P", "science"]);
    }

    #[test]
    fn bsub_output_gives_the_job_id() {
        assert_eq!(
            parse_bsub_output("Job <1234> is submitted to queue <normal>.\n"),
            Ok(JobId::new("1234"))
        );
        assert_eq!(
            parse_bsub_output(
                "Job <77> is submitted to default queue <normal>.\n<<Waiting for dispatch ...>>\n"
            ),
            Ok(JobId::new("77"))
        );
        for bad in [
            "",
            "Job <abc> is submitted to queue <normal>.\n",
            "Submitted batch job 12\n",
            "Job <1> is submitted to queue <a>.\nJob <2> is submitted to queue <a>.\n",
        ] {
            assert!(parse_bsub_output(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bjobs_json_maps_lsf_states() {
        let jobs = parse_bjobs_json(BJOBS_JSON).unwrap();
        assert_eq!(jobs.len(), 5, "{jobs:?}");
        assert_eq!(
            jobs[0],
            BatchJob {
                id: JobId::new("1201"),
                name: "zzzzz-dz642-bbbbbbbbbbbbbb4".into(),
                state: JobState::Pending,
                reason: "New job is waiting for scheduling".into(),
            }
        );
        assert_eq!(jobs[1].state, JobState::Pending);
        assert_eq!(
            jobs[1].reason,
            "The job was suspended by the user while pending"
        );
        assert_eq!(jobs[2].state, JobState::Running);
        assert_eq!(jobs[3].state, JobState::Suspended);
        assert_eq!(jobs[3].name, "a name with spaces");
        assert_eq!(jobs[4].state, JobState::Other("UNKWN".into()));
        assert!(jobs.iter().all(|job| job.id != JobId::new("1190")));
    }

    #[test]
    fn bjobs_garbage_is_an_error() {
        for bad in [
            "",
            "No unfinished job found\n",
            r#"{"COMMAND":"bjobs"}"#,
            r#"{"COMMAND":"bjobs","JOBS":1,"RECORDS":[]}"#,
            r#"{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"JOBID":"1","JOB_NAME":"x","STAT":"WEIRD"}]}"#,
            r#"{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"JOBID":"1","STAT":"RUN"}]}"#,
            r#"{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"JOBID":"x1","JOB_NAME":"x","STAT":"RUN"}]}"#,
            r#"{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"JOBID":"9","ERROR":"Job <9> is not found"}]}"#,
        ] {
            assert!(parse_bjobs_json(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse_bjobs_json(r#"{"COMMAND":"bjobs","JOBS":0,"RECORDS":[]}"#),
            Ok(vec![])
        );
    }

    #[tokio::test]
    async fn status_runs_one_user_filtered_bjobs() {
        let (mut backend, runner) = backend(LsfConfig::default());
        runner.answer(CommandOutput::ok(BJOBS_JSON));
        assert_eq!(backend.status().await.unwrap().len(), 5);
        let calls = runner.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].args,
            [
                "-json",
                "-o",
                "jobid job_name stat pend_reason",
                "-u",
                "berth"
            ]
        );
    }

    #[tokio::test]
    async fn no_unfinished_job_is_an_empty_queue() {
        let (mut backend, runner) = backend(LsfConfig::default());
        for code in [0, 255] {
            runner.answer(CommandOutput::exited(code, "", "No unfinished job found\n"));
            assert_eq!(backend.status().await.unwrap(), vec![]);
        }
    }

    #[tokio::test]
    async fn failed_bjobs_is_no_empty_queue() {
        let (mut backend, runner) = backend(LsfConfig::default());
        let answers = [
            CommandOutput::exited(255, "", "LSF is down. Please wait ...\n"),
            CommandOutput::exited(0, "", ""),
            CommandOutput::exited(0, "", "bjobs: something odd\n"),
            CommandOutput::exited(1, "", "No unfinished job found\n"),
            CommandOutput::exited(255, "", "No unfinished job found\nbut also trouble\n"),
        ];
        for answer in answers {
            runner.answer(answer.clone());
            assert!(backend.status().await.is_err(), "{answer:?} accepted");
        }
    }

    #[tokio::test]
    async fn submit_keeps_what_was_submitted() {
        let (mut backend, runner) = backend(LsfConfig::default());
        runner.answer(CommandOutput::ok(
            "Job <42> is submitted to queue <normal>.\n",
        ));
        let submission = backend.submit(&request(1 << 20, 1)).await.unwrap();
        assert_eq!(submission.job_id, JobId::new("42"));
        assert!(
            submission.command.starts_with("bsub -J "),
            "{}",
            submission.command
        );
        assert!(submission.script.is_some());
    }

    #[tokio::test]
    async fn bsub_failures_are_classified() {
        let (mut backend, runner) = backend(LsfConfig::default());
        runner.answer(CommandOutput::exited(
            255,
            "",
            "Cannot exceed queue's hard limit(s). Job not submitted.\n",
        ));
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(err.is_permanent(), "{err}");

        let queue_error = "nope: No such queue. Job not submitted.\n";
        runner.answer(CommandOutput::exited(255, "", queue_error));
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent(), "no queue of the container's: {err}");
        let mut own = request(1, 1);
        own.partitions = vec!["nope".into()];
        runner.answer(CommandOutput::exited(255, "", queue_error));
        let err = backend.submit(&own).await.unwrap_err();
        assert!(err.is_permanent(), "the container's queue: {err}");

        runner.answer(CommandOutput::exited(
            255,
            "",
            "LSF is down. Please wait ...\nBatch system not responding. Job not submitted.\n",
        ));
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent(), "{err}");
        runner.fail_to_start("No such file or directory");
        let err = backend.submit(&request(1, 1)).await.unwrap_err();
        assert!(!err.is_permanent(), "{err}");
    }

    #[test]
    fn bkill_signals_a_running_job_and_removes_others() {
        let (backend, _) = backend(LsfConfig::default());
        let args = |state| backend.bkill_command(&job("7", state)).args;
        assert_eq!(args(JobState::Pending), ["7"]);
        assert_eq!(args(JobState::Running), ["-s", "TERM", "7"]);
        assert_eq!(args(JobState::Suspended), ["7"]);
        assert_eq!(args(JobState::Other("UNKWN".into())), ["7"]);
    }

    #[tokio::test]
    async fn bkill_of_a_finished_job_succeeds() {
        let (mut backend, runner) = backend(LsfConfig::default());
        runner.answer(CommandOutput::exited(
            255,
            "",
            "Job <7>: Job has already finished\n",
        ));
        backend.cancel(&job("7", JobState::Running)).await.unwrap();
        runner.answer(CommandOutput::exited(
            255,
            "",
            "Job <7>: Permission denied\n",
        ));
        let err = backend
            .cancel(&job("7", JobState::Pending))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Permission denied"), "{err}");
    }

    #[test]
    fn bsub_scratch_gpus_and_templates() {
        let config = LsfConfig {
            reserve_tmp: 1 << 30,
            bsub_args: vec![
                "-R".into(),
                "select[tmp>={tmp_mib}]".into(),
                "-Jd".into(),
                "{uuid} at {priority}".into(),
                "-q2".into(),
                "{partitions}".into(),
            ],
            gpu_args: vec!["-gpu".into(), "num={gpus}:gmem={gpu_vram_mib}M".into()],
            ..LsfConfig::default()
        };
        let (backend, _) = backend(config);
        let mut own = request(1 << 30, 2);
        own.tmp = 2 << 30;
        own.gpu = GpuRequest {
            stack: "cuda".into(),
            count: 2,
            vram: 8 << 30,
            ..GpuRequest::default()
        };
        let spec = backend.bsub_command(&own).unwrap();
        assert!(
            spec.args
                .contains(&"rusage[mem=1280MB:tmp=3072MB] span[hosts=1]".to_string()),
            "{:?}",
            spec.args
        );
        let tail = &spec.args[spec.args.len() - 6..];
        assert_eq!(
            tail,
            [
                "-R",
                "select[tmp>=3072]",
                "-Jd",
                &format!("{UUID} at 1"),
                "-gpu",
                "num=2:gmem=8192M"
            ],
            "-q2 goes with its empty value"
        );

        let (backend, _) = self::backend(LsfConfig::default());
        let spec = backend.bsub_command(&own).unwrap();
        assert_eq!(&spec.args[spec.args.len() - 2..], ["-gpu", "num=2"]);
        let spec = backend.bsub_command(&request(1, 1)).unwrap();
        assert!(!spec.args.contains(&"-gpu".to_string()), "{:?}", spec.args);
        assert!(!spec.args.contains(&"-sp".to_string()), "{:?}", spec.args);
    }

    fn priority_config() -> LsfConfig {
        LsfConfig {
            user_priority: true,
            max_user_priority: 100,
            priority_spread: 2,
            ..LsfConfig::default()
        }
    }

    #[test]
    fn priority_plan_counts_down_from_the_maximum() {
        let (backend, _) = backend(priority_config());
        let jobs = [
            (JobId::new("11"), 5),
            (JobId::new("10"), 500),
            (JobId::new("12"), 5),
            (JobId::new("13"), 1),
        ];
        assert_eq!(
            backend.priority_plan(&jobs),
            [
                (JobId::new("10"), 100),
                (JobId::new("11"), 98),
                (JobId::new("12"), 98),
                (JobId::new("13"), 96),
            ]
        );
        let (backend, _) = self::backend(LsfConfig::default());
        assert!(backend.priority_plan(&jobs).is_empty(), "off by default");
    }

    #[test]
    fn priority_plan_floors_at_one() {
        let config = LsfConfig {
            max_user_priority: 3,
            priority_spread: 1,
            ..priority_config()
        };
        let (backend, _) = backend(config);
        let jobs: Vec<(JobId, i64)> = (0..5)
            .map(|i| (JobId::new(format!("{i}")), 10 - i))
            .collect();
        let planned: Vec<u32> = backend
            .priority_plan(&jobs)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(planned, [3, 2, 1, 1, 1]);
    }

    #[tokio::test]
    async fn bmod_runs_only_when_the_order_changes() {
        let (mut backend, runner) = backend(priority_config());
        let ok = || CommandOutput::ok("Parameters of job <N> are being changed\n");
        let jobs = vec![(JobId::new("10"), 500), (JobId::new("11"), 5)];
        runner.answer(ok());
        runner.answer(ok());
        backend.reprioritise(&jobs).await.unwrap();
        let calls = runner.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].program, PathBuf::from("bmod"));
        assert_eq!(calls[0].args, ["-sp", "100", "10"]);
        assert_eq!(calls[1].args, ["-sp", "98", "11"]);

        backend.reprioritise(&jobs).await.unwrap();
        assert_eq!(runner.calls().len(), 2, "same order, no bmod");

        // Job 11 overtakes job 10: only what no longer fits moves.
        let swapped = vec![(JobId::new("10"), 5), (JobId::new("11"), 500)];
        runner.answer(ok());
        backend.reprioritise(&swapped).await.unwrap();
        let calls = runner.calls();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert_eq!(calls[2].args, ["-sp", "96", "10"]);
    }

    #[tokio::test]
    async fn failed_bmod_is_retried_next_poll() {
        let (mut backend, runner) = backend(priority_config());
        let jobs = vec![(JobId::new("10"), 500)];
        runner.answer(CommandOutput::exited(
            255,
            "",
            "LSF is down. Please wait ...\n",
        ));
        let err = backend.reprioritise(&jobs).await.unwrap_err();
        assert!(err.to_string().contains("LSF is down"), "{err}");
        runner.answer(CommandOutput::ok(
            "Parameters of job <10> are being changed\n",
        ));
        backend.reprioritise(&jobs).await.unwrap();
        assert_eq!(runner.calls().len(), 2);

        runner.answer(CommandOutput::exited(
            255,
            "",
            "Job <11>: Job has already finished\n",
        ));
        backend
            .reprioritise(&[(JobId::new("11"), 1)])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn new_job_starts_below_the_known_jobs() {
        let (mut backend, runner) = backend(priority_config());
        let spec = backend.bsub_command(&request(1, 1)).unwrap();
        assert!(
            spec.args.windows(2).any(|w| w == ["-sp", "100"]),
            "{:?}",
            spec.args
        );

        runner.answer(CommandOutput::ok(
            "Job <42> is submitted to queue <normal>.\n",
        ));
        backend.submit(&request(1, 1)).await.unwrap();
        let spec = backend.bsub_command(&request(1, 1)).unwrap();
        assert!(
            spec.args.windows(2).any(|w| w == ["-sp", "98"]),
            "{:?}",
            spec.args
        );

        // A status query without job 42 drops its value.
        runner.answer(CommandOutput::exited(255, "", "No unfinished job found\n"));
        backend.status().await.unwrap();
        let spec = backend.bsub_command(&request(1, 1)).unwrap();
        assert!(
            spec.args.windows(2).any(|w| w == ["-sp", "100"]),
            "{:?}",
            spec.args
        );
    }
}
