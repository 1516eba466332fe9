//! The Slurm backend: `sbatch` to submit, one `squeue` per poll for status,
//! `scancel` to cancel.
//!
//! The adapter only builds commands and parses their output; the parsers
//! are pure functions. Running the commands is the [`CommandRunner`]'s job.
//!
//! - Submit: `sbatch --parsable --job-name=UUID --comment=UUID --no-requeue
//!   --chdir=/ --mem=MiB --cpus-per-task=N [--partition=P] [--time=MIN]
//!   --output=PATTERN EXTRA...` with the job script on stdin. `--no-requeue`
//!   keeps Slurm from running a job again after a node failure, when its
//!   container may already be cancelled. `--chdir=/` starts the job in a
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
//!
//! TODO: map container priorities onto Slurm's (`scontrol update
//! JobId=... Nice=...`); jobs now keep the priority Slurm gives them.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::backend::{Backend, BackendError, BatchJob, JobId, JobRequest, JobState, Submission};
use crate::command::{CommandError, CommandRunner, CommandSpec};
use crate::config::{ConfigError, SlurmConfig};
use crate::script::exec_script;
use crate::SupervisorCommand;

/// `squeue`'s output format: job id, long state, reason, name.
pub const SQUEUE_FORMAT: &str = "%i|%T|%r|%j";

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

/// Fragments of `scancel` errors that mean the job has already ended.
const ALREADY_GONE: &[&str] = &[
    "Invalid job id specified",
    "Job/step already completing or completed",
];

/// Jobs submitted, listed and cancelled with Slurm's commands.
#[derive(Debug)]
pub struct SlurmBackend<R> {
    config: SlurmConfig,
    supervisor: SupervisorCommand,
    runner: R,
    /// The `squeue --user` value: the dispatcher's numeric user id.
    user: String,
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
        SlurmBackend {
            config,
            supervisor,
            runner,
            user,
        }
    }

    /// Builds the `sbatch` command, with the job script on its stdin.
    pub fn sbatch_command(&self, request: &JobRequest) -> Result<CommandSpec, BackendError> {
        let uuid = &request.container_uuid;
        let mem_mib = memory_mib(request.ram, self.config.reserve_ram).ok_or_else(|| {
            BackendError::InvalidRequest {
                container: uuid.clone(),
                reason: format!("runtime_constraints.ram {} bytes is too large", request.ram),
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
        let partition = if request.partitions.is_empty() {
            self.config.partition.clone()
        } else {
            Some(request.partitions.join(","))
        };
        if let Some(partition) = partition {
            args.push(format!("--partition={partition}"));
        }
        if request.max_run_time > 0 {
            // NOTE: Slurm's time limit is in whole minutes, so a job may run
            // up to 59 s past max_run_time (plus the cluster's OverTimeLimit).
            // Enforcing max_run_time to the second is left to the supervisor,
            // which does not do it yet.
            args.push(format!("--time={}", request.max_run_time.div_ceil(60)));
        }
        args.push(format!("--output={}", self.config.output));
        args.extend(self.config.sbatch_args.iter().cloned());

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

    /// Classifies a failed `sbatch`: a rejection of the job itself is
    /// permanent; anything else may pass on another try.
    fn submit_error(&self, request: &JobRequest, error: CommandError) -> BackendError {
        let stderr = error.stderr().unwrap_or_default();
        // An unknown partition is the container's fault only when the
        // container named it; the configured default is the operator's.
        let partition_rejected =
            stderr.contains(INVALID_PARTITION) && !request.partitions.is_empty();
        if partition_rejected || REJECTIONS.iter().any(|text| stderr.contains(text)) {
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
        parse_squeue_output(&output.stdout).map_err(|message| BackendError::Parse {
            command: spec.command_line(),
            message,
            output: output.stdout.clone(),
        })
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

    fn explain_reason(&self, reason: &str) -> Option<&'static str> {
        explain_pending_reason(reason)
    }

    fn cancel_pending_reasons(&self) -> &[String] {
        &self.config.cancel_pending_reasons
    }
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

/// Computes the job's `--mem` in MiB: the container's RAM plus the
/// reserve, rounded up. Returns `None` on overflow.
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

fn parse_squeue_line(line: &str) -> Result<BatchJob, &'static str> {
    let mut fields = line.splitn(4, '|');
    let (Some(id), Some(state), Some(reason), Some(name)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err("expected 4 fields separated by |");
    };
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
    Ok(BatchJob {
        id: JobId::new(id),
        name: name.to_string(),
        state: parse_state(state),
        reason: reason.to_string(),
    })
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
    use crate::command::recording::RecordingRunner;
    use crate::command::CommandOutput;

    const UUID: &str = "zzzzz-dz642-000000000000001";

    /// `squeue --noheader --user=0 --format='%i|%T|%r|%j'` on slurm-wlm
    /// 22.05.8 (one node, partition `debug` with OverSubscribe=FORCE:4),
    /// with jobs pending for resources, behind others, on hold and on an
    /// impossible CPU count, running (one named with spaces and a `|`) and
    /// suspended.
    const SQUEUE_REAL: &str = "\
9|PENDING|Resources|zzzzz-dz642-bbbbbbbbbbbbbb4
10|PENDING|Priority|zzzzz-dz642-bbbbbbbbbbbbbb5
11|PENDING|Priority|zzzzz-dz642-bbbbbbbbbbbbbb6
12|PENDING|Priority|zzzzz-dz642-bbbbbbbbbbbbbb7
14|PENDING|PartitionConfig|sbatch
5|PENDING|JobHeldUser|held
3|RUNNING|None|a name with spaces|and pipe
4|RUNNING|None|pend
6|RUNNING|None|zzzzz-dz642-bbbbbbbbbbbbbb1
7|RUNNING|None|zzzzz-dz642-bbbbbbbbbbbbbb2
8|RUNNING|None|zzzzz-dz642-bbbbbbbbbbbbbb3
2|SUSPENDED|None|zzzzz-dz642-aaaaaaaaaaaaaaa
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
                "--output=/tmp/berth-%j.out",
            ]
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
    fn extra_arguments_come_last() {
        let config = SlurmConfig {
            sbatch_args: vec!["--account=science".into(), "--mem=100".into()],
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
                "--mem=100"
            ]
        );
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
            "9|PENDING|Resources\n",
            "x9|PENDING|Resources|name\n",
            "9|pending|Resources|name\n",
            "9||Resources|name\n",
        ] {
            let text = format!("{}{bad}", "1|RUNNING|None|ok\n");
            let err = parse_squeue_output(&text).unwrap_err();
            assert!(err.starts_with("line 2:"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn squeue_array_and_other_states_parse() {
        let jobs = parse_squeue_output("12_[1-5%2]|PENDING|JobArrayTaskLimit|arr\n13+0|COMPLETING|None|het\n14|REQUEUE_HOLD|None|x\n").unwrap();
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
            ["--noheader", "--user=1001", "--format=%i|%T|%r|%j"]
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
}
