//! The `dispatch` section of the configuration file.
//!
//! ```yaml
//! dispatch:
//!   backend: slurm                  # or lsf, or local
//!   api_url: https://ctl.example:8443
//!   poll_interval: 10s              # one squeue per poll
//!   resync_interval: 5m             # one listing of the queue per resync
//!   watch: true                     # follow the controller's change feed
//!   credentials_dir: /var/lib/berth/credentials
//!   lease: auto                     # one active dispatcher, standbys wait
//!   lease_ttl: 10s
//!   lease_renew_interval: 2s
//!   metrics_listen: 127.0.0.1:9464  # Prometheus metrics; unset: off
//!   scheduler_calls:                # one limit on every sbatch, squeue, ...
//!     max_concurrent: 8
//!     max_rate: 500                 # calls per second
//!   submit_retry:                   # one container's failed submissions
//!     first_delay: 2s
//!     max_delay: 5m
//!   slurm:
//!     reserve_ram: 256MiB
//!     partition: batch
//!     reserve_tmp: 1GiB             # added to the tmp mounts in --tmp
//!     sbatch_args: ["--account=science", "--extra=ram={ram_mib}"]
//!     gpu_args: ["--gres=gpu:{gpus}"] # only for containers with GPUs
//!     output: /tmp/berth-%j.out
//!     cancel_pending_reasons: [PartitionConfig]
//!     nice_base: 0                  # nice of the most important pending job
//!     priority_spread: 10           # nice step between jobs in Berth's order
//!   lsf:                            # with backend: lsf
//!     queue: normal
//!     bsub_args: ["-P", "science", "-R", "select[tmp>={tmp_mib}]"]
//!     gpu_args: ["-gpu", "num={gpus}"]
//!     user_priority: true           # only if lsb.params sets MAX_USER_PRIORITY
//!     max_user_priority: 100
//!     output: /tmp/berth-%J.out
//! ```
//!
//! Every default lives in [`defaults`]. [`Config::validate`] runs at
//! start-up and names the offending key in each error, so a bad file stops
//! the dispatcher before it locks anything.
//!
//! Two intervals set the dispatcher's periodic work. `poll_interval` is for
//! the batch system, which has no way to push its changes: each poll takes
//! one snapshot of it. `resync_interval` is for the controller, whose
//! changes come through the change feed: each resynchronisation lists the
//! queue again, as a safety net. While the feed is off or failing, every
//! poll lists the queue too.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::arguments;

/// Default values of the keys, in one place.
pub mod defaults {
    use std::time::Duration;

    /// How often the dispatcher takes a snapshot of the batch system.
    pub const POLL_INTERVAL: Duration = Duration::from_secs(10);
    /// How often the dispatcher lists the queue from the controller while
    /// it follows the change feed.
    pub const RESYNC_INTERVAL: Duration = Duration::from_secs(300);
    /// Whether the dispatcher follows the controller's change feed.
    pub const WATCH: bool = true;
    /// Directory of the credentials files.
    pub const CREDENTIALS_DIR: &str = "/var/lib/berth/credentials";
    /// Memory added to each container's RAM for the supervisor and the
    /// runtime: 256 MiB.
    pub const RESERVE_RAM: u64 = 256 << 20;
    /// Slurm's output file for each job; `%j` is the job id.
    pub const SLURM_OUTPUT: &str = "/tmp/berth-%j.out";
    /// How long one Slurm command may run before it is killed.
    pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
    /// `slurm.nice_base`: the nice value of the most important pending job.
    pub const NICE_BASE: i64 = 0;
    /// `slurm.priority_spread`: the step between the nice values of jobs
    /// next to each other in the order.
    pub const PRIORITY_SPREAD: i64 = 10;
    /// LSF's output file for each job; `%J` is the job id.
    pub const LSF_OUTPUT: &str = "/tmp/berth-%J.out";
    /// Scratch space added to each job's `tmp` mounts: none, because the
    /// supervisor keeps only small files (json and text mounts) besides
    /// the `tmp` mounts, and images live in the container runtime's store.
    pub const RESERVE_TMP: u64 = 0;
    /// `slurm.gpu_args`: one generic resource `gpu` per requested device.
    pub const SLURM_GPU_ARGS: &[&str] = &["--gres=gpu:{gpus}"];
    /// `lsf.gpu_args`: LSF's GPU requirement with the device count.
    pub const LSF_GPU_ARGS: &[&str] = &["-gpu", "num={gpus}"];
    /// `lsf.max_user_priority`: LSF's own example value of
    /// `MAX_USER_PRIORITY` in `lsb.params`.
    pub const LSF_MAX_USER_PRIORITY: u32 = 100;
    /// `lsf.priority_spread`: adjacent containers one priority apart.
    pub const LSF_PRIORITY_SPREAD: u32 = 1;
    /// How long a dispatch lease lasts after each renewal.
    pub const LEASE_TTL: Duration = Duration::from_secs(10);
    /// How often the active dispatcher renews its lease, and a standby
    /// tries to take it.
    pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(2);
    /// `scheduler_calls.max_concurrent`. Arvados's Slurm dispatcher runs at
    /// most 3 of its mutating commands at once. 8 lets a burst of `sbatch`
    /// processes overlap their start-up, so that slurmctld's own pace
    /// stays the limit (see docs/BENCHMARKS.md).
    pub const MAX_CONCURRENT_CALLS: usize = 8;
    /// `scheduler_calls.max_rate`, in calls per second: about the 500
    /// submissions per second that Slurm's high-throughput guide gives as
    /// what a tuned controller sustains. More calls than that gain
    /// nothing. The concurrency cap and the backoff on slow calls protect
    /// a smaller controller.
    pub const MAX_CALL_RATE: f64 = 500.0;
    /// `scheduler_calls.burst`, in calls: one second at `max_rate`.
    pub const CALL_BURST: u32 = 500;
    /// `scheduler_calls.slow_call`: a sixth of the command timeout.
    pub const SLOW_CALL: Duration = Duration::from_secs(10);
    /// `scheduler_calls.backoff_first`.
    pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
    /// `scheduler_calls.backoff_max`: at most a minute without a call once
    /// the batch system responds again.
    pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
    /// `submit_retry.first_delay`.
    pub const SUBMIT_RETRY_FIRST: Duration = Duration::from_secs(2);
    /// `submit_retry.max_delay`.
    pub const SUBMIT_RETRY_MAX: Duration = Duration::from_secs(300);
    /// `submit_retry.max_attempts`: with the default delays, up to about
    /// 13 minutes of attempts per lock.
    pub const SUBMIT_RETRY_ATTEMPTS: u32 = 10;
}

/// Largest `scheduler_calls.max_concurrent` accepted.
const MAX_CONCURRENT_CALLS_LIMIT: usize = 1000;

/// Shortest `poll_interval` and `resync_interval` accepted: more frequent
/// passes only load the controller and the batch system.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Shortest and longest `lease_ttl` accepted; the controller accepts the
/// same range.
const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);

/// A key whose value is invalid.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration key dispatch.{key}: {message}")]
pub struct ConfigError {
    /// The key below `dispatch`, such as `slurm.partition`.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The batch system that runs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// One Slurm job per container, through `sbatch`, `squeue` and `scancel`.
    Slurm,
    /// One LSF job per container, through `bsub`, `bjobs` and `bkill`.
    Lsf,
    /// One child process of the dispatcher per container, on its own host.
    Local,
}

impl BackendKind {
    /// Returns the name used in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Slurm => "slurm",
            BackendKind::Lsf => "lsf",
            BackendKind::Local => "local",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Compares with the name used in the configuration file.
impl PartialEq<&str> for BackendKind {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// The `dispatch` section of the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The batch system: `slurm`, `lsf` or `local`.
    pub backend: BackendKind,
    /// The controller's URL, as the dispatcher and the compute nodes reach
    /// it: `https://host:port` or `host:port` (which means HTTPS). Jobs get
    /// it in their credentials file.
    pub api_url: String,
    /// Accept a controller certificate that does not verify. Jobs inherit
    /// the setting through their credentials file.
    #[serde(default)]
    pub insecure: bool,
    /// Time between two polls of the batch system, such as `10s` or
    /// `500ms`. A poll takes one snapshot of the batch system (one `squeue`
    /// with Slurm) and lets each container the dispatcher has locked decide
    /// on it, with the container's latest record from the change feed. So
    /// this interval bounds how quickly the dispatcher notices what only
    /// the batch system shows. That is why a job is pending, a job that
    /// left the batch system (after two polls without it), and a job that
    /// will never start (after two polls). A failed submission is also
    /// tried again at a poll. While the feed is not followed (`watch:
    /// false`) or cannot be read, each poll also lists the queue from the
    /// controller, so this interval then also bounds how quickly a new
    /// container is locked.
    ///
    /// The default, 10 s, is the poll period of Arvados's Slurm dispatcher
    /// (`crunch-dispatch-slurm` uses 10 s for its `squeue` check when its
    /// `PollPeriod` is unset). A pending reason then shows within 10 s and
    /// a vanished job is acted on within 20 s, for one `squeue` call every
    /// 10 s: each call makes `slurmctld` list the jobs, so polling much
    /// faster loads it on a busy cluster for news that users rarely need
    /// sooner.
    #[serde(
        default = "default_poll_interval",
        deserialize_with = "deserialize_interval"
    )]
    pub poll_interval: Duration,
    /// Time between two full resynchronisations, such as `5m`; at least
    /// `poll_interval`. A resynchronisation lists from the controller the
    /// Queued containers with priority above 0 and those locked by this
    /// dispatcher, replaces the records the dispatcher keeps with the list,
    /// and then polls. It is the safety net of the change feed, which keeps
    /// those records current in between: a change the feed failed to
    /// report is noticed within this interval. Each costs two list calls,
    /// and one more per 100 locked containers that the lists did not
    /// return. The default, 5 min, keeps that load negligible and still
    /// repairs a missed change within minutes.
    #[serde(
        default = "default_resync_interval",
        deserialize_with = "deserialize_interval"
    )]
    pub resync_interval: Duration,
    /// Follow the controller's change feed (`GET containers/changes`), so
    /// that a new container is locked and submitted, and the job of a
    /// container whose priority dropped to 0 is cancelled, as soon as the
    /// controller commits the change. `false` makes every poll list the
    /// queue from the controller, for a controller without the feed.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// Directory of the credentials files, one `<container uuid>.json` per
    /// locked container (mode 0600), made with mode 0700 if missing. Jobs
    /// read their file at this same path, so with Slurm it must be on a file
    /// system the compute nodes mount at the same place, and the jobs run as
    /// the dispatcher's user. The local backend also keeps its pid files
    /// here.
    #[serde(default = "default_credentials_dir")]
    pub credentials_dir: PathBuf,
    /// Whether the dispatcher holds a leader lease in the controller's
    /// database, so that one dispatcher per lease name is active and the
    /// others wait as standbys: `auto` (the default), `true` or `false`.
    /// `auto` uses the lease with the Slurm and LSF backends when the
    /// controller serves the lease routes, and runs without it otherwise.
    /// `true` requires it. The local backend runs its jobs as child
    /// processes that a standby could not adopt, so it never uses the lease
    /// (`true` is an error there). Every dispatcher sharing a lease must use
    /// the same token (the system token), because a new leader adopts the
    /// containers locked by its own token, and the same `credentials_dir`
    /// on a shared file system.
    #[serde(default, deserialize_with = "deserialize_lease_mode")]
    pub lease: LeaseMode,
    /// The lease's name: dispatchers with the same name exclude each other.
    /// The backend's name (`slurm` or `lsf`) when unset.
    #[serde(default)]
    pub lease_name: Option<String>,
    /// How long the lease lasts after each renewal, such as `10s`. A
    /// standby takes over at most `lease_ttl` plus `lease_renew_interval`
    /// after the active dispatcher died. The active one stops dispatching
    /// when it could not renew before the lease's expiry minus a fifth of
    /// `lease_ttl`, so it stops before a standby can start.
    #[serde(
        default = "default_lease_ttl",
        deserialize_with = "deserialize_interval"
    )]
    pub lease_ttl: Duration,
    /// Time between two renewals of the lease by the active dispatcher,
    /// and between two attempts of a standby to take it, such as `2s`. At
    /// most half of the part of `lease_ttl` before its fencing margin (4 s
    /// with a `lease_ttl` of 10 s), so that a renewal can fail once and be
    /// tried again before the dispatcher must stop.
    #[serde(
        default = "default_lease_renew_interval",
        deserialize_with = "deserialize_interval"
    )]
    pub lease_renew_interval: Duration,
    /// Settings of the Slurm backend.
    #[serde(default)]
    pub slurm: SlurmConfig,
    /// Settings of the LSF backend.
    #[serde(default)]
    pub lsf: LsfConfig,
    /// Settings of the local backend.
    #[serde(default)]
    pub local: LocalConfig,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`), such
    /// as `127.0.0.1:9464`; port 0 picks a free port. Unset turns the
    /// endpoint off. It has no authentication unless `metrics_token_file`
    /// is set, so keep it on a loopback or private address. The metrics
    /// carry counts and durations, never container UUIDs or secrets.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// File whose first line is a bearer token that scrapers must send
    /// (`Authorization: Bearer <token>`); unset accepts every scrape.
    #[serde(default)]
    pub metrics_token_file: Option<PathBuf>,
    /// Limits on the dispatcher's own calls to the batch system.
    #[serde(default)]
    pub scheduler_calls: SchedulerCallsConfig,
    /// Retries of a container's submission after a transient failure.
    #[serde(default)]
    pub submit_retry: SubmitRetryConfig,
}

/// The `dispatch.scheduler_calls` section: one limit shared by every call
/// to the batch system's programs (`sbatch`, `squeue`, `scancel`,
/// `scontrol`, `sacct`, `bsub`, `bjobs`, `bkill`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerCallsConfig {
    /// Maximum calls in flight at once, from 1 to 1000. A burst of queued
    /// containers is also locked and submitted this many at a time.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Maximum sustained calls per second (a token bucket's refill rate).
    /// A site with Slurm's RPC rate limit (`SlurmctldParameters=rl_enable`,
    /// 2 calls per second per user by default) sets 2.
    #[serde(default = "default_max_rate")]
    pub max_rate: f64,
    /// Calls that may start at once after a quiet spell (the bucket's
    /// size), at least 1. With Slurm's RPC rate limit, 30 by default.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// A call slower than this, such as `10s`, counts as a sign of an
    /// overloaded controller and starts the global backoff.
    #[serde(default = "default_slow_call", with = "humantime_serde")]
    pub slow_call: Duration,
    /// First delay of the global backoff, which starts when a call fails
    /// transiently (a timeout, an unreachable or busy controller) or is
    /// slow, and doubles with each further such call. No call is made
    /// while it lasts; the first call after it ends it if it succeeds.
    #[serde(default = "default_backoff_first", with = "humantime_serde")]
    pub backoff_first: Duration,
    /// Maximum delay of the global backoff.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
}

/// The `dispatch.submit_retry` section: the backoff of one container
/// whose submission failed transiently. It lasts while the container stays
/// locked; a restarted dispatcher starts afresh.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRetryConfig {
    /// Delay before the second attempt, such as `2s`. It doubles with each
    /// further failure, less up to a fifth at random. An attempt is made at
    /// the first poll or change after its delay.
    #[serde(default = "default_retry_first", with = "humantime_serde")]
    pub first_delay: Duration,
    /// Maximum delay between two attempts, such as `5m`.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub max_delay: Duration,
    /// Failed attempts after which the container is unlocked, so that it
    /// returns to the queue and is locked again later (after 60 s), with
    /// its attempts counted afresh.
    #[serde(default = "default_retry_attempts")]
    pub max_attempts: u32,
}

/// The `dispatch.lease` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseMode {
    /// Use the lease when the backend and the controller support it.
    #[default]
    Auto,
    /// Require the lease.
    On,
    /// Never use the lease.
    Off,
}

/// The `dispatch.lsf` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LsfConfig {
    /// Memory added to the container's RAM in the job's
    /// `-R "rusage[mem=...]"`, as for `slurm.reserve_ram`: a number of bytes,
    /// or a size with a binary unit, such as `256MiB`.
    #[serde(
        default = "default_reserve_ram",
        deserialize_with = "deserialize_reserve_ram"
    )]
    pub reserve_ram: u64,
    /// Queue (`bsub -q`) for containers whose
    /// `scheduling_parameters.partitions` is empty; unset leaves the choice
    /// to LSF's default queue. A container's partitions are its queues.
    #[serde(default)]
    pub queue: Option<String>,
    /// Extra `bsub` arguments, placed after the dispatcher's own: argument
    /// templates, one argument each, whose placeholders (`{ram_mib}`,
    /// `{tmp_mib}`, `{partitions}`, ...) the module `template` lists. An
    /// argument with a placeholder that expands to nothing is left out,
    /// with the option name before it (`["-q", "{partitions}"]` goes as a
    /// pair). Options the dispatcher sets itself or that would break
    /// tracking (`-J`, `-o`, `-n`, `-q`, `-W`, `-cwd`, `-gpu`, `-sp`, `-K`,
    /// `-I...`, `-r`) are rejected at start-up. `-R` may repeat, because LSF
    /// combines several resource requirements.
    #[serde(default)]
    pub bsub_args: Vec<String>,
    /// Scratch space added to the container's `tmp` mounts in the job's
    /// `-R "rusage[tmp=...]"`, as for `slurm.reserve_tmp`.
    #[serde(
        default = "default_reserve_tmp",
        deserialize_with = "deserialize_reserve_ram"
    )]
    pub reserve_tmp: u64,
    /// `bsub` arguments for a container that requests GPUs, placed after
    /// `bsub_args`: templates as in `bsub_args`. The default,
    /// `["-gpu", "num={gpus}"]`, requests that many GPUs from LSF, and a site can add
    /// `:gmem={gpu_vram_mib}M` or a `gmodel`. Left out for a container
    /// without GPUs.
    #[serde(default = "default_lsf_gpu_args")]
    pub gpu_args: Vec<String>,
    /// Order pending jobs after their containers' priorities with `bsub
    /// -sp` and `bmod -sp`. Only for a site whose `lsb.params` sets
    /// `MAX_USER_PRIORITY`: without it LSF rejects `-sp`. Off by default.
    #[serde(default)]
    pub user_priority: bool,
    /// The site's `MAX_USER_PRIORITY`: the highest `-sp` value, given to
    /// the most important pending job. At least 1.
    #[serde(default = "default_lsf_max_user_priority")]
    pub max_user_priority: u32,
    /// The step between the `-sp` values of pending jobs next to each
    /// other in the order of their containers' priorities; at least 1. A
    /// job keeps its value while it stays within 10 steps below the job
    /// before it, so most changes of the queue modify few jobs. Jobs past
    /// the bottom of the range share the value 1.
    #[serde(default = "default_lsf_priority_spread")]
    pub priority_spread: u32,
    /// The `bmod` program: a path, or a name looked up in `PATH`. Needed
    /// only with `user_priority`.
    #[serde(default = "default_bmod")]
    pub bmod: PathBuf,
    /// The job's output file (`bsub -o`), where the supervisor's own log
    /// goes: an absolute path. LSF replaces `%J` with the job id. Nothing
    /// removes these files.
    #[serde(default = "default_lsf_output")]
    pub output: String,
    /// The LSF user whose jobs `bjobs -u` lists; the name of the user the
    /// dispatcher runs as when unset.
    #[serde(default)]
    pub user: Option<String>,
    /// The `bsub` program: a path, or a name looked up in `PATH`.
    #[serde(default = "default_bsub")]
    pub bsub: PathBuf,
    /// The `bjobs` program: a path, or a name looked up in `PATH`.
    #[serde(default = "default_bjobs")]
    pub bjobs: PathBuf,
    /// The `bkill` program: a path, or a name looked up in `PATH`.
    #[serde(default = "default_bkill")]
    pub bkill: PathBuf,
    /// How long one LSF command may run before it is killed and counted as
    /// failed, such as `60s`.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
}

/// The `dispatch.slurm` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// Memory added to the container's RAM in the job's `--mem`, for the
    /// supervisor and the container runtime: a number of bytes (0 or more),
    /// or a size with a binary unit K, M, G or T, such as `256MiB`.
    #[serde(
        default = "default_reserve_ram",
        deserialize_with = "deserialize_reserve_ram"
    )]
    pub reserve_ram: u64,
    /// Partition for containers whose `scheduling_parameters.partitions` is
    /// empty; unset leaves the choice to Slurm's default partition.
    #[serde(default)]
    pub partition: Option<String>,
    /// Extra `sbatch` arguments, placed after the dispatcher's own:
    /// argument templates, one argument each, such as
    /// `--extra=mem={ram_mib}` or `--account=science`. The placeholders
    /// (`{uuid}`, `{ram_mib}`, `{vcpus}`, `{tmp_mib}`, `{gpus}`,
    /// `{partitions}`, `{time_minutes}`, `{priority}` and the `gpu_*`
    /// details) are listed in the module `template`. `{{` and `}}` are
    /// literal braces. An argument with a placeholder that expands to
    /// nothing is left out. Options the dispatcher sets itself (`--mem`,
    /// `--cpus-per-task`, `--tmp`, `--partition`, `--time`, `--nice`,
    /// `--comment`, `--chdir`, `--no-requeue`) or that would break tracking
    /// (`--job-name`, `--output`, `--parsable`, `--requeue`, `--array`,
    /// `--wrap`) are rejected at start-up, and so are `--gres` and `--gpus`,
    /// which belong in `gpu_args`.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Scratch space added to the sum of the container's `tmp` mount
    /// capacities in the job's `--tmp`, the space the job requests in
    /// the node's `TmpFS`: a number of bytes or a size such as `1GiB`. The
    /// default, 0, fits a supervisor that keeps only small files besides
    /// the `tmp` mounts; raise it when the supervisor's `tmp_dir` also
    /// holds other data of the job.
    #[serde(
        default = "default_reserve_tmp",
        deserialize_with = "deserialize_reserve_ram"
    )]
    pub reserve_tmp: u64,
    /// `sbatch` arguments for a container that requests GPUs, placed after
    /// `sbatch_args`: templates as in `sbatch_args`. The default,
    /// `["--gres=gpu:{gpus}"]`, requests that many generic resources
    /// `gpu`, while `["--gpus={gpus}"]` uses Slurm's GPU option instead, and
    /// `["--gres=gpu:a100:{gpus}"]` names a GPU type. Left out for a
    /// container without GPUs.
    #[serde(default = "default_slurm_gpu_args")]
    pub gpu_args: Vec<String>,
    /// The job's output file (`sbatch --output`), where the supervisor's own
    /// log goes, on the compute node: an absolute path, because jobs start
    /// in `/`. Slurm replaces `%j` with the job id and `%x` with the job
    /// name, which is the container UUID. Nothing removes these files.
    #[serde(default = "default_slurm_output")]
    pub output: String,
    /// Slurm pending reasons (squeue's `%r`, such as `PartitionConfig`) for
    /// which the dispatcher cancels the job and sets its container Cancelled,
    /// with the reason in `runtime_status.errorDetail`. A job must be listed
    /// pending with such a reason in two status queries in a row. Empty by
    /// default: every pending job waits. With `EnforcePartLimits=NO` Slurm
    /// queues a job that no node of its partition can run (too many CPUs, for
    /// example) as pending with reason `PartitionConfig`, and a site may list
    /// `[PartitionConfig, BadConstraints, PartitionTimeLimit]` so that such
    /// containers end instead of waiting for good. Reasons such as
    /// `Resources`, `Priority` or `ReqNodeNotAvail` also occur while a job
    /// simply waits its turn, so they do not belong here.
    #[serde(default)]
    pub cancel_pending_reasons: Vec<String>,
    /// The `sbatch` program: a path, or a name looked up in `PATH`.
    #[serde(default = "default_sbatch")]
    pub sbatch: PathBuf,
    /// The `squeue` program: a path, or a name looked up in `PATH`.
    #[serde(default = "default_squeue")]
    pub squeue: PathBuf,
    /// The `scancel` program: a path, or a name looked up in `PATH`.
    #[serde(default = "default_scancel")]
    pub scancel: PathBuf,
    /// How long one Slurm command may run before it is killed and counted
    /// as failed, such as `60s`.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// The nice value of the dispatcher's most important pending job. Less
    /// important jobs get higher values, so that Slurm starts them later.
    /// Slurm lets only privileged users set a negative nice value, so a
    /// dispatcher that does not run as root or SlurmUser keeps this at 0
    /// or more. From -2147483645 to 2147483645.
    #[serde(default = "default_nice_base")]
    pub nice_base: i64,
    /// The step between the nice values of pending jobs next to each other
    /// in the order of their containers' priorities, so that Slurm's own
    /// factors (age, fair share) do not swap them; 0 leaves the nice values
    /// of jobs alone. A job keeps its nice value while it stays within 10
    /// steps after the job before it, so most changes of the queue renice
    /// few jobs. A larger step means fewer `scontrol` calls, a smaller one
    /// keeps the last jobs closer to other users' jobs.
    #[serde(default = "default_priority_spread")]
    pub priority_spread: i64,
    /// The `scontrol` program: a path, or a name looked up in `PATH`.
    #[serde(default = "default_scontrol")]
    pub scontrol: PathBuf,
    /// The `sacct` program: a path, or a name looked up in `PATH`. It is
    /// queried for why a job ended only when `scontrol` no longer keeps the job;
    /// without Slurm accounting it fails, and the reason is left out. Its
    /// absence is not an error.
    #[serde(default = "default_sacct")]
    pub sacct: PathBuf,
}

/// The `dispatch.local` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Directory of the supervisors' output, one `<container uuid>.log` per
    /// container (stdout and stderr, appended); the credentials directory
    /// when unset. Nothing removes these files.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
}

fn default_max_concurrent() -> usize {
    defaults::MAX_CONCURRENT_CALLS
}

fn default_max_rate() -> f64 {
    defaults::MAX_CALL_RATE
}

fn default_burst() -> u32 {
    defaults::CALL_BURST
}

fn default_slow_call() -> Duration {
    defaults::SLOW_CALL
}

fn default_backoff_first() -> Duration {
    defaults::BACKOFF_FIRST
}

fn default_backoff_max() -> Duration {
    defaults::BACKOFF_MAX
}

fn default_retry_first() -> Duration {
    defaults::SUBMIT_RETRY_FIRST
}

fn default_retry_max() -> Duration {
    defaults::SUBMIT_RETRY_MAX
}

fn default_retry_attempts() -> u32 {
    defaults::SUBMIT_RETRY_ATTEMPTS
}

impl Default for SchedulerCallsConfig {
    fn default() -> SchedulerCallsConfig {
        SchedulerCallsConfig {
            max_concurrent: default_max_concurrent(),
            max_rate: default_max_rate(),
            burst: default_burst(),
            slow_call: default_slow_call(),
            backoff_first: default_backoff_first(),
            backoff_max: default_backoff_max(),
        }
    }
}

impl SchedulerCallsConfig {
    /// Returns the limiter's settings.
    pub fn limiter_settings(&self) -> crate::limiter::LimiterSettings {
        crate::limiter::LimiterSettings {
            max_concurrent: self.max_concurrent,
            max_rate: self.max_rate,
            burst: self.burst,
            slow_call: self.slow_call,
            backoff_first: self.backoff_first,
            backoff_max: self.backoff_max,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_CONCURRENT_CALLS_LIMIT).contains(&self.max_concurrent) {
            return Err(ConfigError::new(
                "scheduler_calls.max_concurrent",
                format!(
                    "{} is out of range: give a number of calls from 1 to {MAX_CONCURRENT_CALLS_LIMIT}",
                    self.max_concurrent
                ),
            ));
        }
        if !(self.max_rate.is_finite() && self.max_rate > 0.0) {
            return Err(ConfigError::new(
                "scheduler_calls.max_rate",
                format!(
                    "{} is not a rate: give a number of calls per second above 0, such as 2 or 0.5",
                    self.max_rate
                ),
            ));
        }
        if self.burst == 0 {
            return Err(ConfigError::new(
                "scheduler_calls.burst",
                "0 allows no call: give a number of calls of at least 1",
            ));
        }
        for (key, delay) in [
            ("scheduler_calls.slow_call", self.slow_call),
            ("scheduler_calls.backoff_first", self.backoff_first),
        ] {
            if delay.is_zero() {
                return Err(ConfigError::new(
                    key,
                    "0s is too short: give a duration such as 1s",
                ));
            }
        }
        if self.backoff_max < self.backoff_first {
            return Err(ConfigError::new(
                "scheduler_calls.backoff_max",
                format!(
                    "{} is shorter than backoff_first ({}): set it to at least backoff_first",
                    format_duration(self.backoff_max),
                    format_duration(self.backoff_first)
                ),
            ));
        }
        Ok(())
    }
}

impl Default for SubmitRetryConfig {
    fn default() -> SubmitRetryConfig {
        SubmitRetryConfig {
            first_delay: default_retry_first(),
            max_delay: default_retry_max(),
            max_attempts: default_retry_attempts(),
        }
    }
}

impl SubmitRetryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.first_delay.is_zero() {
            return Err(ConfigError::new(
                "submit_retry.first_delay",
                "0s is too short: give a duration such as 2s",
            ));
        }
        if self.max_delay < self.first_delay {
            return Err(ConfigError::new(
                "submit_retry.max_delay",
                format!(
                    "{} is shorter than first_delay ({}): set it to at least first_delay",
                    format_duration(self.max_delay),
                    format_duration(self.first_delay)
                ),
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "submit_retry.max_attempts",
                "0 allows no submission: give a number of attempts of at least 1",
            ));
        }
        Ok(())
    }
}

fn default_poll_interval() -> Duration {
    defaults::POLL_INTERVAL
}

fn default_resync_interval() -> Duration {
    defaults::RESYNC_INTERVAL
}

fn default_watch() -> bool {
    defaults::WATCH
}

fn default_lease_ttl() -> Duration {
    defaults::LEASE_TTL
}

fn default_lease_renew_interval() -> Duration {
    defaults::LEASE_RENEW_INTERVAL
}

/// Reads `lease`: `true`, `false` or `auto`.
fn deserialize_lease_mode<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<LeaseMode, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Setting {
        Bool(bool),
        Word(String),
    }
    match Setting::deserialize(deserializer)? {
        Setting::Bool(true) => Ok(LeaseMode::On),
        Setting::Bool(false) => Ok(LeaseMode::Off),
        Setting::Word(word) if word == "auto" => Ok(LeaseMode::Auto),
        Setting::Word(word) => Err(serde::de::Error::custom(format!(
            "invalid lease setting {word:?}: expected true, false or auto"
        ))),
    }
}

fn default_credentials_dir() -> PathBuf {
    PathBuf::from(defaults::CREDENTIALS_DIR)
}

fn default_reserve_ram() -> u64 {
    defaults::RESERVE_RAM
}

fn default_slurm_output() -> String {
    defaults::SLURM_OUTPUT.to_string()
}

fn default_sbatch() -> PathBuf {
    PathBuf::from("sbatch")
}

fn default_squeue() -> PathBuf {
    PathBuf::from("squeue")
}

fn default_scancel() -> PathBuf {
    PathBuf::from("scancel")
}

fn default_nice_base() -> i64 {
    defaults::NICE_BASE
}

fn default_priority_spread() -> i64 {
    defaults::PRIORITY_SPREAD
}

fn default_scontrol() -> PathBuf {
    PathBuf::from("scontrol")
}

fn default_sacct() -> PathBuf {
    PathBuf::from("sacct")
}

fn default_lsf_output() -> String {
    defaults::LSF_OUTPUT.to_string()
}

fn default_bsub() -> PathBuf {
    PathBuf::from("bsub")
}

fn default_bjobs() -> PathBuf {
    PathBuf::from("bjobs")
}

fn default_bkill() -> PathBuf {
    PathBuf::from("bkill")
}

impl Default for LsfConfig {
    fn default() -> LsfConfig {
        LsfConfig {
            reserve_ram: default_reserve_ram(),
            queue: None,
            bsub_args: Vec::new(),
            reserve_tmp: default_reserve_tmp(),
            gpu_args: default_lsf_gpu_args(),
            user_priority: false,
            max_user_priority: default_lsf_max_user_priority(),
            priority_spread: default_lsf_priority_spread(),
            bmod: default_bmod(),
            output: default_lsf_output(),
            user: None,
            bsub: default_bsub(),
            bjobs: default_bjobs(),
            bkill: default_bkill(),
            command_timeout: default_command_timeout(),
        }
    }
}

fn default_command_timeout() -> Duration {
    defaults::COMMAND_TIMEOUT
}

fn default_reserve_tmp() -> u64 {
    defaults::RESERVE_TMP
}

fn default_slurm_gpu_args() -> Vec<String> {
    defaults::SLURM_GPU_ARGS
        .iter()
        .map(|arg| arg.to_string())
        .collect()
}

fn default_lsf_gpu_args() -> Vec<String> {
    defaults::LSF_GPU_ARGS
        .iter()
        .map(|arg| arg.to_string())
        .collect()
}

fn default_lsf_max_user_priority() -> u32 {
    defaults::LSF_MAX_USER_PRIORITY
}

fn default_lsf_priority_spread() -> u32 {
    defaults::LSF_PRIORITY_SPREAD
}

fn default_bmod() -> PathBuf {
    PathBuf::from("bmod")
}

impl Default for SlurmConfig {
    fn default() -> SlurmConfig {
        SlurmConfig {
            reserve_ram: default_reserve_ram(),
            partition: None,
            sbatch_args: Vec::new(),
            reserve_tmp: default_reserve_tmp(),
            gpu_args: default_slurm_gpu_args(),
            output: default_slurm_output(),
            cancel_pending_reasons: Vec::new(),
            sbatch: default_sbatch(),
            squeue: default_squeue(),
            scancel: default_scancel(),
            command_timeout: default_command_timeout(),
            nice_base: default_nice_base(),
            priority_spread: default_priority_spread(),
            scontrol: default_scontrol(),
            sacct: default_sacct(),
        }
    }
}

/// The forms `reserve_ram` accepts, for its error messages.
const RESERVE_RAM_FORMS: &str =
    "a number of bytes (0 or more) or a size with a unit K, M, G or T, such as 256MiB";

/// Reads `reserve_ram`: a number of bytes, or text such as `256MiB`. Every
/// error names the value and the accepted forms; serde_yaml puts the key's
/// path in front.
fn deserialize_reserve_ram<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct ReserveRam;

    fn invalid<E: serde::de::Error>(value: impl fmt::Display) -> E {
        E::custom(format!(
            "invalid size {value}: expected {RESERVE_RAM_FORMS}"
        ))
    }

    impl serde::de::Visitor<'_> for ReserveRam {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(RESERVE_RAM_FORMS)
        }

        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<u64, E> {
            Ok(bytes)
        }

        fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<u64, E> {
            u64::try_from(bytes).map_err(|_| invalid(bytes))
        }

        fn visit_u128<E: serde::de::Error>(self, bytes: u128) -> Result<u64, E> {
            u64::try_from(bytes).map_err(|_| invalid(bytes))
        }

        fn visit_i128<E: serde::de::Error>(self, bytes: i128) -> Result<u64, E> {
            u64::try_from(bytes).map_err(|_| invalid(bytes))
        }

        fn visit_f64<E: serde::de::Error>(self, number: f64) -> Result<u64, E> {
            Err(invalid(number))
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<u64, E> {
            if let Ok(bytes) = text.trim().parse::<u64>() {
                return Ok(bytes);
            }
            berth_core::units::parse_size(text)
                .ok()
                .and_then(|bytes| u64::try_from(bytes).ok())
                .ok_or_else(|| invalid(format!("{text:?}")))
        }
    }

    deserializer.deserialize_any(ReserveRam)
}

/// Reads `poll_interval` or `resync_interval`: text such as `10s`, `5m` or
/// `500ms`. Every error names the value and an example; serde_yaml puts the
/// key's path in front.
fn deserialize_interval<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct Interval;

    fn invalid<E: serde::de::Error>(value: impl fmt::Display, reason: &str) -> E {
        E::custom(format!(
            "invalid duration {value}: {reason} (give a number with a unit, such as 10s, 5m or 500ms)"
        ))
    }

    impl serde::de::Visitor<'_> for Interval {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, such as 10s")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime_serde::re::humantime::parse_duration(text)
                .map_err(|err| invalid(format!("{text:?}"), &err.to_string()))
        }

        fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<Duration, E> {
            Err(invalid(number, "the unit is missing"))
        }

        fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<Duration, E> {
            Err(invalid(number, "the unit is missing"))
        }

        fn visit_f64<E: serde::de::Error>(self, number: f64) -> Result<Duration, E> {
            Err(invalid(number, "the unit is missing"))
        }
    }

    deserializer.deserialize_any(Interval)
}

impl Config {
    /// Creates a configuration with every optional key at its default.
    pub fn new(backend: BackendKind, api_url: impl Into<String>) -> Config {
        Config {
            backend,
            api_url: api_url.into(),
            insecure: false,
            poll_interval: defaults::POLL_INTERVAL,
            resync_interval: defaults::RESYNC_INTERVAL,
            watch: defaults::WATCH,
            credentials_dir: default_credentials_dir(),
            lease: LeaseMode::Auto,
            lease_name: None,
            lease_ttl: defaults::LEASE_TTL,
            lease_renew_interval: defaults::LEASE_RENEW_INTERVAL,
            slurm: SlurmConfig::default(),
            lsf: LsfConfig::default(),
            local: LocalConfig::default(),
            metrics_listen: None,
            metrics_token_file: None,
            scheduler_calls: SchedulerCallsConfig::default(),
            submit_retry: SubmitRetryConfig::default(),
        }
    }

    /// Checks the values that parsing alone cannot. Touches no file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        berth_client::parse_api_host(&self.api_url)
            .map_err(|err| ConfigError::new("api_url", err.to_string()))?;
        for (key, interval) in [
            ("poll_interval", self.poll_interval),
            ("resync_interval", self.resync_interval),
        ] {
            if interval < MIN_INTERVAL {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "{} is too short: it must be at least {}",
                        format_duration(interval),
                        format_duration(MIN_INTERVAL)
                    ),
                ));
            }
        }
        if self.resync_interval < self.poll_interval {
            return Err(ConfigError::new(
                "resync_interval",
                format!(
                    "{} is shorter than poll_interval ({}): each resynchronisation also polls the batch system, so set resync_interval to at least poll_interval",
                    format_duration(self.resync_interval),
                    format_duration(self.poll_interval)
                ),
            ));
        }
        check_absolute_utf8("credentials_dir", &self.credentials_dir)?;
        self.validate_lease()?;
        if let Some(log_dir) = &self.local.log_dir {
            check_absolute_utf8("local.log_dir", log_dir)?;
        }
        if let Some(file) = &self.metrics_token_file {
            check_absolute_utf8("metrics_token_file", file)?;
        }
        self.scheduler_calls.validate()?;
        self.submit_retry.validate()?;
        self.slurm.validate()?;
        self.lsf.validate()
    }

    fn validate_lease(&self) -> Result<(), ConfigError> {
        if self.lease == LeaseMode::On && self.backend == BackendKind::Local {
            return Err(ConfigError::new(
                "lease",
                "the local backend runs its jobs as child processes, which a standby could not adopt: remove the key or set it to false",
            ));
        }
        if let Some(name) = &self.lease_name {
            let valid = !name.is_empty()
                && name.len() <= 100
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                return Err(ConfigError::new(
                    "lease_name",
                    format!("invalid lease name {name:?}: use 1 to 100 letters, digits, '.', '_' or '-'"),
                ));
            }
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.lease_ttl) {
            return Err(ConfigError::new(
                "lease_ttl",
                format!(
                    "{} is out of range: it must be from {} to {}",
                    format_duration(self.lease_ttl),
                    format_duration(MIN_LEASE_TTL),
                    format_duration(MAX_LEASE_TTL)
                ),
            ));
        }
        let longest = (self.lease_ttl - self.lease_fence_margin()) / 2;
        if self.lease_renew_interval < MIN_INTERVAL || self.lease_renew_interval > longest {
            return Err(ConfigError::new(
                "lease_renew_interval",
                format!(
                    "{} is out of range: with lease_ttl {} it must be from {} to {}, so that a failed renewal is tried again before the dispatcher must stop",
                    format_duration(self.lease_renew_interval),
                    format_duration(self.lease_ttl),
                    format_duration(MIN_INTERVAL),
                    format_duration(longest)
                ),
            ));
        }
        Ok(())
    }

    /// Returns the time before the lease's expiry at which a dispatcher
    /// that could not renew it stops dispatching: a fifth of `lease_ttl`.
    pub fn lease_fence_margin(&self) -> Duration {
        self.lease_ttl / 5
    }

    /// Returns the lease's name: `lease_name`, or the backend's name.
    pub fn lease_name(&self) -> String {
        self.lease_name
            .clone()
            .unwrap_or_else(|| self.backend.name().to_string())
    }

    /// Returns the directory of the local backend's log files.
    pub fn local_log_dir(&self) -> &Path {
        self.local
            .log_dir
            .as_deref()
            .unwrap_or(&self.credentials_dir)
    }
}

impl SlurmConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(partition) = &self.partition {
            if partition.is_empty() || partition.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    "slurm.partition",
                    format!("{partition:?} is not a partition name: give a name without spaces, or remove the key"),
                ));
            }
        }
        arguments::sbatch_templates(&self.sbatch_args, false).map_err(|(index, message)| {
            ConfigError::new(format!("slurm.sbatch_args[{index}]"), message)
        })?;
        arguments::sbatch_templates(&self.gpu_args, true).map_err(|(index, message)| {
            ConfigError::new(format!("slurm.gpu_args[{index}]"), message)
        })?;
        if self.output.trim().is_empty()
            || self.output.contains(['\n', '\0'])
            || !self.output.starts_with('/')
        {
            return Err(ConfigError::new(
                "slurm.output",
                format!(
                    "{:?} is not an absolute file name pattern such as {}",
                    self.output,
                    defaults::SLURM_OUTPUT
                ),
            ));
        }
        for (index, reason) in self.cancel_pending_reasons.iter().enumerate() {
            let is_word = !reason.is_empty()
                && reason
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !is_word {
                return Err(ConfigError::new(
                    format!("slurm.cancel_pending_reasons[{index}]"),
                    format!("{reason:?} is not a Slurm pending reason: give a reason as squeue prints it, such as PartitionConfig"),
                ));
            }
        }
        if !(-crate::slurm::MAX_NICE..=crate::slurm::MAX_NICE).contains(&self.nice_base) {
            return Err(ConfigError::new(
                "slurm.nice_base",
                format!(
                    "{} is outside Slurm's nice range: give a number from 0 to {} (negative values need a privileged user)",
                    self.nice_base,
                    crate::slurm::MAX_NICE
                ),
            ));
        }
        if !(0..=crate::slurm::MAX_NICE).contains(&self.priority_spread) {
            return Err(ConfigError::new(
                "slurm.priority_spread",
                format!(
                    "{} is not a step between nice values: give a number from 1 to {}, or 0 to leave nice values alone",
                    self.priority_spread,
                    crate::slurm::MAX_NICE
                ),
            ));
        }
        for (key, program) in [
            ("slurm.sbatch", &self.sbatch),
            ("slurm.squeue", &self.squeue),
            ("slurm.scancel", &self.scancel),
            ("slurm.scontrol", &self.scontrol),
            ("slurm.sacct", &self.sacct),
        ] {
            if program.as_os_str().is_empty() {
                return Err(ConfigError::new(
                    key,
                    "is empty: give a program name or path",
                ));
            }
        }
        if self.command_timeout.is_zero() {
            return Err(ConfigError::new(
                "slurm.command_timeout",
                "must be longer than 0s",
            ));
        }
        Ok(())
    }
}

impl LsfConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(queue) = &self.queue {
            if queue.is_empty() || queue.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    "lsf.queue",
                    format!("{queue:?} is not a queue name: give a name without spaces, or remove the key"),
                ));
            }
        }
        if let Some(user) = &self.user {
            if user.is_empty() || user.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    "lsf.user",
                    format!("{user:?} is not a user name: give a name without spaces, or remove the key"),
                ));
            }
        }
        arguments::bsub_templates(&self.bsub_args, false).map_err(|(index, message)| {
            ConfigError::new(format!("lsf.bsub_args[{index}]"), message)
        })?;
        arguments::bsub_templates(&self.gpu_args, true).map_err(|(index, message)| {
            ConfigError::new(format!("lsf.gpu_args[{index}]"), message)
        })?;
        if self.max_user_priority == 0 {
            return Err(ConfigError::new(
                "lsf.max_user_priority",
                "is 0: give the MAX_USER_PRIORITY of the site's lsb.params, at least 1",
            ));
        }
        if self.priority_spread == 0 {
            return Err(ConfigError::new(
                "lsf.priority_spread",
                "is 0: give a step of at least 1, or set lsf.user_priority to false",
            ));
        }
        if self.output.trim().is_empty()
            || self.output.contains(['\n', '\0'])
            || !self.output.starts_with('/')
        {
            return Err(ConfigError::new(
                "lsf.output",
                format!(
                    "{:?} is not an absolute file name pattern such as {}",
                    self.output,
                    defaults::LSF_OUTPUT
                ),
            ));
        }
        for (key, program) in [
            ("lsf.bsub", &self.bsub),
            ("lsf.bjobs", &self.bjobs),
            ("lsf.bkill", &self.bkill),
            ("lsf.bmod", &self.bmod),
        ] {
            if program.as_os_str().is_empty() {
                return Err(ConfigError::new(
                    key,
                    "is empty: give a program name or path",
                ));
            }
        }
        if self.command_timeout.is_zero() {
            return Err(ConfigError::new(
                "lsf.command_timeout",
                "must be longer than 0s",
            ));
        }
        Ok(())
    }
}

/// Formats a duration as the configuration file writes it, such as `1m 30s`.
fn format_duration(duration: Duration) -> humantime_serde::re::humantime::FormattedDuration {
    humantime_serde::re::humantime::format_duration(duration)
}

fn check_absolute_utf8(key: &str, path: &Path) -> Result<(), ConfigError> {
    if !path.is_absolute() {
        return Err(ConfigError::new(
            key,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    if path.to_str().is_none() {
        return Err(ConfigError::new(
            key,
            format!("{} is not valid UTF-8", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn minimal_section_gets_defaults() {
        let config = parse("backend: slurm\napi_url: https://ctl:8443\n").unwrap();
        assert_eq!(config.backend, BackendKind::Slurm);
        assert_eq!(config.backend, "slurm");
        assert_eq!(config.poll_interval, Duration::from_secs(10));
        assert_eq!(config.resync_interval, Duration::from_secs(300));
        assert!(config.watch);
        assert_eq!(
            config.credentials_dir,
            PathBuf::from("/var/lib/berth/credentials")
        );
        assert_eq!(config.slurm.reserve_ram, 256 << 20);
        assert_eq!(config.slurm.partition, None);
        assert!(config.slurm.sbatch_args.is_empty());
        assert_eq!(config.slurm.output, "/tmp/berth-%j.out");
        assert_eq!(config.slurm.sbatch, PathBuf::from("sbatch"));
        assert_eq!(config.slurm.command_timeout, Duration::from_secs(60));
        assert_eq!(
            config.local_log_dir(),
            Path::new("/var/lib/berth/credentials")
        );
        config.validate().unwrap();
    }

    #[test]
    fn limits_and_metrics_keys_parse() {
        let config = parse(
            "backend: slurm\napi_url: https://ctl:8443\nmetrics_listen: 127.0.0.1:0\n\
             metrics_token_file: /etc/berth/metrics-token\n\
             scheduler_calls: {max_concurrent: 3, max_rate: 2, burst: 30, slow_call: 5s, backoff_first: 2s, backoff_max: 1m}\n\
             submit_retry: {first_delay: 1s, max_delay: 30s, max_attempts: 4}\n",
        )
        .unwrap();
        assert_eq!(config.metrics_listen, Some("127.0.0.1:0".parse().unwrap()));
        let calls = &config.scheduler_calls;
        assert_eq!(calls.max_concurrent, 3);
        assert_eq!(calls.max_rate, 2.0);
        assert_eq!(calls.burst, 30);
        assert_eq!(calls.backoff_max, Duration::from_secs(60));
        assert_eq!(config.submit_retry.max_attempts, 4);
        config.validate().unwrap();

        let defaults = parse("backend: slurm\napi_url: https://ctl:8443\n").unwrap();
        assert_eq!(defaults.metrics_listen, None);
        assert_eq!(defaults.scheduler_calls, SchedulerCallsConfig::default());
        assert_eq!(defaults.submit_retry, SubmitRetryConfig::default());
    }

    #[test]
    fn limits_out_of_range_name_the_key() {
        let base = "backend: slurm\napi_url: https://ctl:8443\n";
        for (extra, key) in [
            (
                "scheduler_calls: {max_concurrent: 0}",
                "scheduler_calls.max_concurrent",
            ),
            ("scheduler_calls: {max_rate: 0}", "scheduler_calls.max_rate"),
            (
                "scheduler_calls: {max_rate: -1.5}",
                "scheduler_calls.max_rate",
            ),
            ("scheduler_calls: {burst: 0}", "scheduler_calls.burst"),
            (
                "scheduler_calls: {slow_call: 0s}",
                "scheduler_calls.slow_call",
            ),
            (
                "scheduler_calls: {backoff_first: 10s, backoff_max: 5s}",
                "scheduler_calls.backoff_max",
            ),
            (
                "submit_retry: {first_delay: 0s}",
                "submit_retry.first_delay",
            ),
            ("submit_retry: {max_delay: 1s}", "submit_retry.max_delay"),
            (
                "submit_retry: {max_attempts: 0}",
                "submit_retry.max_attempts",
            ),
            ("metrics_token_file: token", "metrics_token_file"),
        ] {
            let config = parse(&format!("{base}{extra}\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key, "{extra}: {err}");
        }
        let err = parse(&format!("{base}metrics_listen: localhost\n")).unwrap_err();
        assert!(err.to_string().contains("metrics_listen"), "{err}");
    }

    #[test]
    fn lsf_section_parses_with_defaults() {
        let config = parse("backend: lsf\napi_url: https://ctl:8443\n").unwrap();
        assert_eq!(config.backend, BackendKind::Lsf);
        assert_eq!(config.backend, "lsf");
        assert_eq!(config.lsf.reserve_ram, 256 << 20);
        assert_eq!(config.lsf.queue, None);
        assert_eq!(config.lsf.output, "/tmp/berth-%J.out");
        assert_eq!(config.lsf.bsub, PathBuf::from("bsub"));
        config.validate().unwrap();

        let config = parse(
            "backend: lsf\napi_url: https://ctl:8443\nlsf:\n  reserve_ram: 1GiB\n  queue: normal\n  bsub_args: [-P, science]\n  user: berth\n  bjobs: /opt/lsf/bin/bjobs\n  command_timeout: 30s\n",
        )
        .unwrap();
        assert_eq!(config.lsf.reserve_ram, 1 << 30);
        assert_eq!(config.lsf.queue.as_deref(), Some("normal"));
        assert_eq!(config.lsf.bsub_args, ["-P", "science"]);
        assert_eq!(config.lsf.user.as_deref(), Some("berth"));
        assert_eq!(config.lsf.bjobs, PathBuf::from("/opt/lsf/bin/bjobs"));
        assert_eq!(config.lsf.command_timeout, Duration::from_secs(30));
        config.validate().unwrap();
    }

    #[test]
    fn bad_lsf_values_name_their_key() {
        let base = "backend: lsf\napi_url: https://ctl:8443\nlsf:\n";
        for (entry, key) in [
            ("  queue: \"a b\"\n", "lsf.queue"),
            ("  user: \"\"\n", "lsf.user"),
            ("  bsub_args: [-P, x, -J, name]\n", "lsf.bsub_args[2]"),
            (
                "  bsub_args: [-R, \"select[mem>{ram}]\"]\n",
                "lsf.bsub_args[1]",
            ),
            ("  gpu_args: [-gpu, \"num={gpus\"]\n", "lsf.gpu_args[1]"),
            ("  max_user_priority: 0\n", "lsf.max_user_priority"),
            ("  priority_spread: 0\n", "lsf.priority_spread"),
            ("  bmod: \"\"\n", "lsf.bmod"),
            ("  output: relative-%J.out\n", "lsf.output"),
            ("  bkill: \"\"\n", "lsf.bkill"),
            ("  command_timeout: 0s\n", "lsf.command_timeout"),
        ] {
            let config = parse(&format!("{base}{entry}")).unwrap();
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key, "{entry}: {err}");
        }
        assert!(parse(&format!("{base}  partition: x\n")).is_err());
    }

    #[test]
    fn full_section_parses() {
        let config = parse(
            "backend: local\n\
             api_url: 127.0.0.1:8000\n\
             insecure: true\n\
             poll_interval: 500ms\n\
             resync_interval: 1m\n\
             watch: false\n\
             credentials_dir: /srv/berth/credentials\n\
             slurm:\n  reserve_ram: 1GiB\n  partition: batch\n  sbatch_args: [\"--account=x\"]\n  output: /scratch/%x.out\n  sbatch: /opt/slurm/bin/sbatch\n  command_timeout: 2m\n\
             local:\n  log_dir: /var/log/berth\n",
        )
        .unwrap();
        assert_eq!(config.backend, BackendKind::Local);
        assert!(config.insecure);
        assert_eq!(config.poll_interval, Duration::from_millis(500));
        assert_eq!(config.resync_interval, Duration::from_secs(60));
        assert!(!config.watch);
        assert_eq!(config.slurm.reserve_ram, 1 << 30);
        assert_eq!(config.slurm.partition.as_deref(), Some("batch"));
        assert_eq!(config.slurm.sbatch_args, vec!["--account=x".to_string()]);
        assert_eq!(config.slurm.command_timeout, Duration::from_secs(120));
        assert_eq!(config.local_log_dir(), Path::new("/var/log/berth"));
        config.validate().unwrap();
    }

    #[test]
    fn nice_keys_default_and_parse() {
        let config = parse("backend: slurm\napi_url: h:1\n").unwrap();
        assert_eq!(config.slurm.nice_base, 0);
        assert_eq!(config.slurm.priority_spread, 10);
        assert_eq!(config.slurm.scontrol, Path::new("scontrol"));
        let config = parse(
            "backend: slurm\napi_url: h:1\nslurm: {nice_base: 1000, priority_spread: 0, scontrol: /opt/slurm/bin/scontrol}\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.slurm.nice_base, 1000);
        assert_eq!(config.slurm.priority_spread, 0);
    }

    #[test]
    fn nice_keys_out_of_range_are_rejected() {
        for (yaml, key, value) in [
            ("{nice_base: 2147483646}", "slurm.nice_base", "2147483646"),
            ("{nice_base: -2147483646}", "slurm.nice_base", "-2147483646"),
            ("{priority_spread: -1}", "slurm.priority_spread", "-1"),
        ] {
            let config = parse(&format!("backend: slurm\napi_url: h:1\nslurm: {yaml}\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key, "{yaml}");
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn reserve_ram_accepts_plain_bytes() {
        let config =
            parse("backend: slurm\napi_url: h:1\nslurm: {reserve_ram: 1048576}\n").unwrap();
        assert_eq!(config.slurm.reserve_ram, 1 << 20);
    }

    #[test]
    fn reserve_ram_accepts_zero_and_units() {
        for (value, bytes) in [
            ("0", 0),
            ("\"0\"", 0),
            ("256MiB", 256 << 20),
            ("1G", 1 << 30),
        ] {
            let config = parse(&format!(
                "backend: slurm\napi_url: h:1\nslurm: {{reserve_ram: {value}}}\n"
            ))
            .unwrap();
            assert_eq!(config.slurm.reserve_ram, bytes, "{value}");
        }
    }

    #[test]
    fn bad_reserve_ram_names_key_value_and_forms() {
        for (value, shown) in [
            ("-5", "-5"),
            ("\"-5\"", "\"-5\""),
            ("-5MiB", "\"-5MiB\""),
            ("lots", "\"lots\""),
            ("1.5", "1.5"),
            ("99999999999999999999", "99999999999999999999"),
        ] {
            let err = parse(&format!(
                "backend: slurm\napi_url: h:1\nslurm: {{reserve_ram: {value}}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("slurm.reserve_ram: invalid size"),
                "{value}: {err}"
            );
            assert!(err.contains(shown), "{value}: {err}");
            assert!(err.contains("such as 256MiB"), "{value}: {err}");
            assert!(!err.contains("untagged"), "{value}: {err}");
        }
        let err = parse("backend: slurm\napi_url: h:1\nslurm: {reserve_ram: true}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("slurm.reserve_ram: "), "{err}");
        assert!(err.contains("expected a number of bytes"), "{err}");
    }

    #[test]
    fn cancel_pending_reasons_parse() {
        let config = parse(
            "backend: slurm\napi_url: h:1\nslurm: {cancel_pending_reasons: [PartitionConfig, BadConstraints]}\n",
        )
        .unwrap();
        assert_eq!(
            config.slurm.cancel_pending_reasons,
            ["PartitionConfig", "BadConstraints"]
        );
        config.validate().unwrap();
        let default = parse("backend: slurm\napi_url: h:1\n").unwrap();
        assert!(default.slurm.cancel_pending_reasons.is_empty());
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = parse("backend: slurm\napi_url: h:1\nresync_intervall: 2s\n").unwrap_err();
        assert!(err.to_string().contains("resync_intervall"), "{err}");
        let err = parse("backend: slurm\napi_url: h:1\nslurm: {partitions: a}\n").unwrap_err();
        assert!(err.to_string().contains("partitions"), "{err}");
    }

    #[test]
    fn intervals_accept_humantime_units() {
        let config =
            parse("backend: slurm\napi_url: h:1\npoll_interval: 1m 30s\nresync_interval: 1h\n")
                .unwrap();
        assert_eq!(config.poll_interval, Duration::from_secs(90));
        assert_eq!(config.resync_interval, Duration::from_secs(3600));
    }

    #[test]
    fn bad_interval_names_the_key_and_the_value() {
        for key in ["poll_interval", "resync_interval"] {
            for (value, shown) in [
                ("2", "invalid duration 2: the unit is missing"),
                ("2.5", "invalid duration 2.5: the unit is missing"),
                ("soon", "invalid duration \"soon\""),
                ("-1s", "invalid duration \"-1s\""),
                ("10 parsecs", "invalid duration \"10 parsecs\""),
            ] {
                let err = parse(&format!("backend: slurm\napi_url: h:1\n{key}: {value}\n"))
                    .unwrap_err()
                    .to_string();
                assert!(err.starts_with(&format!("{key}: ")), "{value}: {err}");
                assert!(err.contains(shown), "{value}: {err}");
                assert!(err.contains("such as 10s"), "{value}: {err}");
            }
            let err = parse(&format!("backend: slurm\napi_url: h:1\n{key}: [1]\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{err}");
            assert!(err.contains("such as 10s"), "{err}");
        }
    }

    #[test]
    fn resync_shorter_than_poll_is_rejected() {
        let config =
            parse("backend: slurm\napi_url: h:1\npoll_interval: 30s\nresync_interval: 10s\n")
                .unwrap();
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "resync_interval");
        let text = err.to_string();
        assert!(
            text.contains("10s is shorter than poll_interval (30s)"),
            "{text}"
        );
        assert!(
            text.contains("set resync_interval to at least poll_interval"),
            "{text}"
        );
        let equal =
            parse("backend: slurm\napi_url: h:1\npoll_interval: 30s\nresync_interval: 30s\n")
                .unwrap();
        equal.validate().unwrap();
    }

    #[test]
    fn unknown_backend_is_rejected() {
        let err = parse("backend: pbs\napi_url: h:1\n").unwrap_err();
        assert!(err.to_string().contains("pbs"), "{err}");
    }

    type Change = Box<dyn Fn(&mut Config)>;

    #[test]
    fn validation_names_the_key() {
        let cases: Vec<(&str, Change)> = vec![
            ("api_url", Box::new(|c| c.api_url = "ftp://x".into())),
            (
                "poll_interval",
                Box::new(|c| c.poll_interval = Duration::from_millis(1)),
            ),
            (
                "resync_interval",
                Box::new(|c| c.resync_interval = Duration::from_millis(1)),
            ),
            (
                "resync_interval",
                Box::new(|c| c.resync_interval = Duration::from_secs(5)),
            ),
            (
                "credentials_dir",
                Box::new(|c| c.credentials_dir = "relative/dir".into()),
            ),
            (
                "local.log_dir",
                Box::new(|c| c.local.log_dir = Some("logs".into())),
            ),
            (
                "slurm.partition",
                Box::new(|c| c.slurm.partition = Some("a b".into())),
            ),
            (
                "slurm.sbatch_args[1]",
                Box::new(|c| {
                    c.slurm.sbatch_args = vec!["--account=x".into(), "--job-name=y".into()]
                }),
            ),
            (
                "slurm.sbatch_args[0]",
                Box::new(|c| c.slurm.sbatch_args = vec!["--extra={ram_mb}".into()]),
            ),
            (
                "slurm.gpu_args[0]",
                Box::new(|c| c.slurm.gpu_args = vec!["--gres=gpu:{gpus".into()]),
            ),
            ("slurm.output", Box::new(|c| c.slurm.output = " ".into())),
            (
                "slurm.output",
                Box::new(|c| c.slurm.output = "berth-%j.out".into()),
            ),
            (
                "slurm.cancel_pending_reasons[1]",
                Box::new(|c| {
                    c.slurm.cancel_pending_reasons =
                        vec!["PartitionConfig".into(), "Bad Constraints".into()]
                }),
            ),
            (
                "slurm.squeue",
                Box::new(|c| c.slurm.squeue = PathBuf::new()),
            ),
            (
                "slurm.command_timeout",
                Box::new(|c| c.slurm.command_timeout = Duration::ZERO),
            ),
        ];
        for (key, change) in cases {
            let mut config = Config::new(BackendKind::Slurm, "http://127.0.0.1:8000");
            change(&mut config);
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key);
            assert!(
                err.to_string().contains(&format!("dispatch.{key}")),
                "{err}"
            );
        }
    }

    #[test]
    fn lease_defaults_and_settings() {
        let config = parse("backend: slurm\napi_url: h:1\n").unwrap();
        assert_eq!(config.lease, LeaseMode::Auto);
        assert_eq!(config.lease_ttl, defaults::LEASE_TTL);
        assert_eq!(config.lease_renew_interval, defaults::LEASE_RENEW_INTERVAL);
        assert_eq!(config.lease_name(), "slurm");
        assert_eq!(config.lease_fence_margin(), Duration::from_secs(2));
        config.validate().unwrap();
        for (value, mode) in [
            ("true", LeaseMode::On),
            ("false", LeaseMode::Off),
            ("auto", LeaseMode::Auto),
        ] {
            let config = parse(&format!("backend: lsf\napi_url: h:1\nlease: {value}\n")).unwrap();
            assert_eq!(config.lease, mode, "{value}");
        }
        let err = parse("backend: slurm\napi_url: h:1\nlease: sometimes\n").unwrap_err();
        assert!(
            err.to_string().contains("expected true, false or auto"),
            "{err}"
        );
    }

    #[test]
    fn bad_lease_settings_name_the_key() {
        for (extra, key) in [
            ("lease_ttl: 500ms", "lease_ttl"),
            ("lease_ttl: 10m", "lease_ttl"),
            ("lease_renew_interval: 5s", "lease_renew_interval"),
            ("lease_renew_interval: 50ms", "lease_renew_interval"),
            ("lease_name: 'a b'", "lease_name"),
        ] {
            let config = parse(&format!("backend: slurm\napi_url: h:1\n{extra}\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key, "{extra}: {err}");
        }
        let config = parse("backend: local\napi_url: h:1\nlease: true\n").unwrap();
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "lease", "{err}");
        let config = parse("backend: local\napi_url: h:1\n").unwrap();
        config.validate().unwrap();
    }
}
