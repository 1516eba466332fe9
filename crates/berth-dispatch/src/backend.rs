//! What the dispatch loop needs from a batch system, whatever it is.
//!
//! A backend has three verbs: [`Backend::submit`] one job for one container
//! (or several at once with [`Backend::submit_many`]),
//! [`Backend::status`] of all the dispatcher's jobs in one query, and
//! [`Backend::cancel`] one job. Each job is named after its container's
//! UUID, so a restarted dispatcher finds its jobs again by name. The
//! backend's own id for the job ([`JobId`]) is kept as well.
//!
//! A failed status query is an error, never an empty queue: the loop acts on
//! a job's absence only after successful queries. A backend that can tell
//! why a job ended implements [`Backend::end_reason`] as well.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use berth_core::records::GpuConstraints;
use berth_core::validate::GPU_STACKS;
use berth_core::Container;

use crate::command::CommandError;

/// The batch system's id of a job: a Slurm job id, or the process id of a
/// local job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    pub fn new(id: impl Into<String>) -> JobId {
        JobId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job's state in the batch system, as far as the dispatcher cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for resources; nothing runs yet.
    Pending,
    /// Resources allocated, nodes booting; nothing runs yet.
    Configuring,
    /// The job script (and so the supervisor) runs.
    Running,
    /// Stopped by the batch system; its processes are frozen.
    Suspended,
    /// Ended; the batch system is cleaning up.
    Completing,
    /// Any other state, by the batch system's name.
    Other(String),
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            JobState::Pending => "pending",
            JobState::Configuring => "configuring",
            JobState::Running => "running",
            JobState::Suspended => "suspended",
            JobState::Completing => "completing",
            JobState::Other(name) => name,
        };
        f.write_str(name)
    }
}

/// One job, as a status query saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchJob {
    pub id: JobId,
    /// The job's name: the container UUID for the dispatcher's own jobs.
    pub name: String,
    pub state: JobState,
    /// The reason for the job's state, in the batch system's words, such as
    /// Slurm's pending reason `Resources`. Empty when there is none.
    pub reason: String,
}

/// The job for one container: its supervisor, with resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    /// The container UUID, which is also the job's name.
    pub container_uuid: String,
    /// Memory for the container, in bytes.
    pub ram: u64,
    pub vcpus: u64,
    /// Partitions the job may run in; empty means the backend's default.
    pub partitions: Vec<String>,
    /// Maximum run time in seconds; 0 means no limit.
    pub max_run_time: u64,
    /// Scratch space the container's `tmp` mounts request: the sum of
    /// their `capacity`, in bytes. The backend adds its configured reserve.
    pub tmp: u64,
    /// The GPUs the container requests; `count` 0 means none.
    pub gpu: GpuRequest,
    /// The container's priority when the job was built: higher runs first.
    pub priority: i64,
    /// The credentials file the supervisor reads.
    pub credentials_file: PathBuf,
}

/// The GPUs of a job, from the container's `runtime_constraints.gpu` (the
/// controller has already turned the deprecated `cuda` form into it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuRequest {
    /// `cuda` or `rocm`; empty when no GPU is requested.
    pub stack: String,
    /// Number of devices.
    pub count: u64,
    /// Minimum driver version, such as `12.4`; empty for any.
    pub driver_version: String,
    /// Acceptable hardware targets: CUDA compute capabilities such as
    /// `8.6`, or ROCm targets such as `gfx1100`; empty for any.
    pub hardware_target: Vec<String>,
    /// Minimum memory per device, in bytes; 0 for any.
    pub vram: u64,
}

impl JobRequest {
    /// The request for a container, checking the numbers the controller
    /// should already have checked.
    pub fn for_container(
        container: &Container,
        credentials_file: PathBuf,
    ) -> Result<JobRequest, BackendError> {
        let invalid = |reason: String| BackendError::InvalidRequest {
            container: container.uuid.clone(),
            reason,
        };
        let constraints = &container.runtime_constraints;
        let ram = u64::try_from(constraints.ram)
            .ok()
            .filter(|ram| *ram > 0)
            .ok_or_else(|| {
                invalid(format!(
                    "runtime_constraints.ram is {}, not a positive number of bytes",
                    constraints.ram
                ))
            })?;
        let vcpus = u64::try_from(constraints.vcpus)
            .ok()
            .filter(|vcpus| *vcpus > 0)
            .ok_or_else(|| {
                invalid(format!(
                    "runtime_constraints.vcpus is {}, not a positive number",
                    constraints.vcpus
                ))
            })?;
        let scheduling = &container.scheduling_parameters;
        let max_run_time = u64::try_from(scheduling.max_run_time).map_err(|_| {
            invalid(format!(
                "scheduling_parameters.max_run_time is {}, not a number of seconds",
                scheduling.max_run_time
            ))
        })?;
        let partitions = scheduling
            .partitions
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        let tmp = tmp_capacity(container).map_err(invalid)?;
        let gpu = gpu_request(&constraints.gpu).map_err(invalid)?;
        Ok(JobRequest {
            container_uuid: container.uuid.clone(),
            ram,
            vcpus,
            partitions,
            max_run_time,
            tmp,
            gpu,
            priority: container.priority,
            credentials_file,
        })
    }
}

/// Sums the capacities of the container's `tmp` mounts, in bytes.
fn tmp_capacity(container: &Container) -> Result<u64, String> {
    let mut total: u64 = 0;
    for (target, mount) in &container.mounts {
        if mount.kind != "tmp" {
            continue;
        }
        let capacity = u64::try_from(mount.capacity).map_err(|_| {
            format!(
                "mounts.{target}.capacity is {}, not a number of bytes",
                mount.capacity
            )
        })?;
        total = total.checked_add(capacity).ok_or_else(|| {
            "the tmp mounts' capacities add up to more than 2^64 bytes".to_string()
        })?;
    }
    Ok(total)
}

/// Reads `runtime_constraints.gpu` into a [`GpuRequest`].
fn gpu_request(gpu: &GpuConstraints) -> Result<GpuRequest, String> {
    let count = u64::try_from(gpu.device_count).map_err(|_| {
        format!(
            "runtime_constraints.gpu.device_count is {}, not a number of devices",
            gpu.device_count
        )
    })?;
    if count == 0 {
        return Ok(GpuRequest::default());
    }
    let vram = u64::try_from(gpu.vram).map_err(|_| {
        format!(
            "runtime_constraints.gpu.vram is {}, not a number of bytes",
            gpu.vram
        )
    })?;
    if !GPU_STACKS.contains(&gpu.stack.as_str()) {
        return Err(format!(
            "runtime_constraints.gpu.stack is {:?}: expected {}",
            gpu.stack,
            GPU_STACKS.join(" or ")
        ));
    }
    Ok(GpuRequest {
        stack: gpu.stack.clone(),
        count,
        driver_version: gpu.driver_version.clone(),
        hardware_target: gpu.hardware_target.clone(),
        vram,
    })
}

/// A submitted job, with the submitted command and script and the batch
/// system's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub job_id: JobId,
    /// The submission command line.
    pub command: String,
    /// The job script, for backends that submit one.
    pub script: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The backend's configuration is invalid; the container waits until
    /// the operator fixes it.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The batch system refused the job for a reason another try will not
    /// change (an unknown partition, more memory than any node has).
    #[error("the batch system rejected the job of container {container}: {source}")]
    Rejected {
        container: String,
        #[source]
        source: CommandError,
    },
    /// The container's record requests something no job can provide.
    #[error("failed to make a job of container {container}: {reason}")]
    InvalidRequest { container: String, reason: String },
    /// A command succeeded but printed something the adapter cannot read.
    #[error("failed to parse the output of {command}: {message}; output: {output:?}")]
    Parse {
        command: String,
        message: String,
        output: String,
    },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {action} process {pid}: {source}")]
    Signal {
        action: &'static str,
        pid: i32,
        #[source]
        source: nix::Error,
    },
}

impl BackendError {
    /// True when submitting the same job again would fail the same way, so
    /// the container should not wait for another try.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            BackendError::Rejected { .. } | BackendError::InvalidRequest { .. }
        )
    }

    /// True when the command was not run because calls to the batch
    /// system are backing off, so that no attempt was made.
    pub fn is_backing_off(&self) -> bool {
        matches!(self, BackendError::Command(CommandError::BackingOff { .. }))
    }
}

/// A batch system, seen through its three verbs.
#[async_trait]
pub trait Backend: Send {
    /// Returns the backend's name for logs, such as `slurm` or `local`.
    fn name(&self) -> &'static str;

    /// Submits one job that runs the container's supervisor.
    async fn submit(&mut self, request: &JobRequest) -> Result<Submission, BackendError>;

    /// Submits one job per request and returns the results in the
    /// requests' order. The default submits one after the other. A backend
    /// whose submissions are independent processes runs them concurrently,
    /// as many at once as its command runner allows.
    async fn submit_many(
        &mut self,
        requests: &[JobRequest],
    ) -> Vec<Result<Submission, BackendError>> {
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            results.push(self.submit(request).await);
        }
        results
    }

    /// Lists the dispatcher's jobs that the batch system still has, in one
    /// query.
    async fn status(&mut self) -> Result<Vec<BatchJob>, BackendError>;

    /// Cancels a job as it was last seen: a job that has not started is
    /// removed, a running one gets TERM so that its supervisor can stop the
    /// container and report. A job that has already ended counts as
    /// cancelled.
    async fn cancel(&mut self, job: &BatchJob) -> Result<(), BackendError>;

    /// Orders the batch system's pending jobs after their containers'
    /// priorities, higher first. The loop calls it after each successful
    /// status query with the pending jobs it tracks and their containers'
    /// priorities. The default does nothing; a backend that can reorder
    /// jobs changes only the jobs whose place in the order needs it.
    async fn reprioritise(&mut self, _jobs: &[(JobId, i64)]) -> Result<(), BackendError> {
        Ok(())
    }

    /// Asks the batch system why `job`, which has left its queue, ended,
    /// and returns the cause as a sentence for users, or `None` when the
    /// batch system no longer keeps the job. The loop calls it only for a
    /// job whose container was still running; an error costs the sentence
    /// and nothing else. The default knows nothing.
    async fn end_reason(&mut self, _job: &JobId) -> Result<Option<String>, BackendError> {
        Ok(None)
    }

    /// Explains a [`BatchJob::reason`] to users in a few words, or returns
    /// `None` for a reason without an explanation.
    fn explain_reason(&self, _reason: &str) -> Option<&'static str> {
        None
    }

    /// Returns the pending reasons that mean a job will never start, so
    /// that the dispatcher cancels it together with its container.
    fn cancel_pending_reasons(&self) -> &[String] {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn container(ram: i64, vcpus: i64) -> Container {
        serde_json::from_value(serde_json::json!({
            "uuid": "zzzzz-dz642-000000000000001",
            "owner_uuid": "zzzzz-tpzed-000000000000001",
            "created_at": "2024-01-01T00:00:00Z",
            "modified_at": "2024-01-01T00:00:00Z",
            "modified_by_user_uuid": null,
            "state": "Locked",
            "log": null,
            "cwd": "/",
            "output_path": "/out",
            "output": null,
            "container_image": "busybox",
            "progress": null,
            "exit_code": null,
            "auth_uuid": null,
            "locked_by_uuid": null,
            "runtime_user_uuid": null,
            "gateway_address": null,
            "runtime_constraints": {"ram": ram, "vcpus": vcpus},
            "scheduling_parameters": {"partitions": [" a ", "", "b"], "max_run_time": 90},
        }))
        .unwrap()
    }

    #[test]
    fn job_request_takes_the_container_numbers() {
        let request = JobRequest::for_container(&container(1 << 30, 2), "/c.json".into()).unwrap();
        assert_eq!(request.ram, 1 << 30);
        assert_eq!(request.vcpus, 2);
        assert_eq!(request.partitions, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(request.max_run_time, 90);
        assert_eq!(request.credentials_file, PathBuf::from("/c.json"));
    }

    #[test]
    fn job_request_rejects_impossible_numbers() {
        for (ram, vcpus, field) in [(0, 1, "ram"), (-5, 1, "ram"), (1, 0, "vcpus")] {
            let err = JobRequest::for_container(&container(ram, vcpus), "/c".into()).unwrap_err();
            assert!(err.is_permanent());
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn job_request_sums_tmp_mounts() {
        let mut container = container(1 << 30, 1);
        let mount = |kind: &str, capacity: i64| berth_core::Mount {
            kind: kind.into(),
            capacity,
            ..berth_core::Mount::default()
        };
        container
            .mounts
            .insert("/tmp".into(), mount("tmp", 3 << 30));
        container
            .mounts
            .insert("/scratch".into(), mount("tmp", 1 << 20));
        container.mounts.insert("/in.json".into(), mount("json", 0));
        let request = JobRequest::for_container(&container, "/c".into()).unwrap();
        assert_eq!(request.tmp, (3 << 30) + (1 << 20));

        container.mounts.insert("/bad".into(), mount("tmp", -1));
        let err = JobRequest::for_container(&container, "/c".into()).unwrap_err();
        assert!(err.is_permanent());
        assert!(err.to_string().contains("mounts./bad.capacity"), "{err}");
    }

    #[test]
    fn job_request_takes_the_gpus() {
        let mut container = container(1 << 30, 1);
        container.priority = 77;
        container.runtime_constraints.gpu = GpuConstraints {
            stack: "rocm".into(),
            device_count: 2,
            driver_version: "6.1".into(),
            hardware_target: vec!["gfx1100".into()],
            vram: 16 << 30,
        };
        let request = JobRequest::for_container(&container, "/c".into()).unwrap();
        assert_eq!(
            request.gpu,
            GpuRequest {
                stack: "rocm".into(),
                count: 2,
                driver_version: "6.1".into(),
                hardware_target: vec!["gfx1100".into()],
                vram: 16 << 30,
            }
        );
        assert_eq!(request.priority, 77);

        container.runtime_constraints.gpu.stack = "opencl".into();
        let err = JobRequest::for_container(&container, "/c".into()).unwrap_err();
        assert!(err.to_string().contains("opencl"), "{err}");

        container.runtime_constraints.gpu.device_count = 0;
        let request = JobRequest::for_container(&container, "/c".into()).unwrap();
        assert_eq!(request.gpu, GpuRequest::default(), "no devices, no GPUs");
    }
}
