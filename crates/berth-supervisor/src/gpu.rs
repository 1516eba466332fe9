//! The GPUs a container gets: which devices the batch job was given, and
//! how the container runtime is asked to pass them in.
//!
//! The batch system names a job's GPUs in its environment. Slurm sets
//! `SLURM_JOB_GPUS` to the global indices of the job's GPUs (and
//! `CUDA_VISIBLE_DEVICES`, which may be renumbered from 0 when Slurm
//! constrains devices through cgroups). LSF sets `CUDA_VISIBLE_DEVICES`.
//! ROCm's counterpart is `ROCR_VISIBLE_DEVICES`. The container runtime's
//! daemon runs outside the job, so it needs the global indices:
//! [`assign_gpus`] takes `SLURM_JOB_GPUS` first, then the stack's own
//! variable. Without either, the runtime gets a request for the number of
//! devices (Docker's `--gpus N`) or for all of them (CDI's `=all`).
//!
//! [`GpuDevices`] chooses how the request reaches the runtime:
//!
//! - `docker` (the default): for CUDA, a `DeviceRequests` entry with the
//!   driver `nvidia` and the capability `gpu`, as `docker run --gpus`
//!   sends it (needs the NVIDIA Container Toolkit). For ROCm, the device
//!   files `/dev/kfd` and `/dev/dri`, as AMD's ROCm documentation runs
//!   Docker containers, with `ROCR_VISIBLE_DEVICES` set to the job's
//!   devices when they are known.
//! - `cdi`: a `DeviceRequests` entry with the driver `cdi` and CDI device
//!   names (`nvidia.com/gpu=0`, `amd.com/gpu=all`), as Docker Engine 25
//!   and later send `docker run --device NAME` for a CDI name.
//! - `podman_cdi`: the CDI names as `Devices` entries, the form of Podman's
//!   `podman run --device nvidia.com/gpu=all`.
//!
//! NOTE: no GPU node was available to run these forms; the tests check the
//! request bodies only. Whether Podman's Docker-compatible API honours
//! `DeviceRequests` or CDI names in `Devices` depends on its version.

use serde::Deserialize;

use berth_core::records::GpuConstraints;

/// The form of the container runtime's GPU request: the
/// `supervisor.gpu_devices` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuDevices {
    /// Docker's `--gpus` request for CUDA, AMD's device files for ROCm.
    #[default]
    Docker,
    /// A `DeviceRequests` entry with the driver `cdi` (Docker Engine 25+).
    Cdi,
    /// CDI names in `Devices` (Podman).
    PodmanCdi,
}

/// A GPU software stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuStack {
    Cuda,
    Rocm,
}

impl GpuDevices {
    /// Returns the value of `supervisor.gpu_devices` that selects this form.
    pub fn key(self) -> &'static str {
        match self {
            GpuDevices::Docker => "docker",
            GpuDevices::Cdi => "cdi",
            GpuDevices::PodmanCdi => "podman_cdi",
        }
    }
}

impl GpuStack {
    /// Returns the stack's name in `runtime_constraints.gpu.stack`.
    pub fn name(self) -> &'static str {
        match self {
            GpuStack::Cuda => "cuda",
            GpuStack::Rocm => "rocm",
        }
    }

    /// Returns the CDI vendor and class of the stack's GPUs.
    pub fn cdi_kind(self) -> &'static str {
        match self {
            GpuStack::Cuda => "nvidia.com/gpu",
            GpuStack::Rocm => "amd.com/gpu",
        }
    }

    /// Returns the variable that lists the stack's visible devices.
    pub fn visible_devices_variable(self) -> &'static str {
        match self {
            GpuStack::Cuda => "CUDA_VISIBLE_DEVICES",
            GpuStack::Rocm => "ROCR_VISIBLE_DEVICES",
        }
    }
}

/// The GPUs of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuAssignment {
    pub stack: GpuStack,
    /// The number of devices the container requests.
    pub count: u64,
    /// The job's devices by index, or empty when the batch system named
    /// none.
    pub device_ids: Vec<String>,
    pub devices: GpuDevices,
}

impl GpuAssignment {
    /// Returns the CDI names of the devices: one per index, or the stack's
    /// `=all` when the indices are unknown.
    pub fn cdi_names(&self) -> Vec<String> {
        let kind = self.stack.cdi_kind();
        if self.device_ids.is_empty() {
            return vec![format!("{kind}=all")];
        }
        self.device_ids
            .iter()
            .map(|id| format!("{kind}={id}"))
            .collect()
    }
}

/// A GPU request the job cannot satisfy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GpuError {
    #[error("invalid runtime_constraints.gpu.stack {stack:?}: expected \"cuda\" or \"rocm\"")]
    UnknownStack { stack: String },
    #[error("invalid runtime_constraints.gpu.device_count {count}: must not be negative")]
    NegativeCount { count: i64 },
    #[error("the container requests {requested} GPUs, but the batch job got {found} ({variable}={value:?}): check the dispatcher's GPU arguments (dispatch.slurm.gpu_args or dispatch.lsf.gpu_args)")]
    TooFew {
        requested: u64,
        found: usize,
        variable: &'static str,
        value: String,
    },
}

/// Works out the GPUs of a container from its constraints and the job's
/// environment (`env` looks a variable up). Returns `None` for a container
/// without GPUs.
pub fn assign_gpus(
    gpu: &GpuConstraints,
    devices: GpuDevices,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<GpuAssignment>, GpuError> {
    let count = u64::try_from(gpu.device_count).map_err(|_| GpuError::NegativeCount {
        count: gpu.device_count,
    })?;
    if count == 0 {
        return Ok(None);
    }
    let stack = match gpu.stack.as_str() {
        "cuda" => GpuStack::Cuda,
        "rocm" => GpuStack::Rocm,
        other => {
            return Err(GpuError::UnknownStack {
                stack: other.to_string(),
            })
        }
    };
    let mut device_ids = Vec::new();
    for variable in ["SLURM_JOB_GPUS", stack.visible_devices_variable()] {
        let Some(value) = env(variable).filter(|value| !value.trim().is_empty()) else {
            continue;
        };
        let ids: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .collect();
        if usize::try_from(count).map_or(true, |count| ids.len() < count) {
            return Err(GpuError::TooFew {
                requested: count,
                found: ids.len(),
                variable,
                value,
            });
        }
        device_ids = ids;
        break;
    }
    Ok(Some(GpuAssignment {
        stack,
        count,
        device_ids,
        devices,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn gpu(stack: &str, count: i64) -> GpuConstraints {
        GpuConstraints {
            stack: stack.into(),
            device_count: count,
            ..GpuConstraints::default()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn no_gpus_means_none() {
        let assigned = assign_gpus(&gpu("", 0), GpuDevices::Docker, env(&[])).unwrap();
        assert_eq!(assigned, None);
    }

    #[test]
    fn slurm_job_gpus_come_first() {
        let vars = env(&[("SLURM_JOB_GPUS", "2,3"), ("CUDA_VISIBLE_DEVICES", "0,1")]);
        let assigned = assign_gpus(&gpu("cuda", 2), GpuDevices::Cdi, vars)
            .unwrap()
            .unwrap();
        assert_eq!(assigned.stack, GpuStack::Cuda);
        assert_eq!(assigned.device_ids, ["2", "3"]);
        assert_eq!(
            assigned.cdi_names(),
            ["nvidia.com/gpu=2", "nvidia.com/gpu=3"]
        );
    }

    #[test]
    fn visible_devices_of_the_stack() {
        let vars = env(&[("CUDA_VISIBLE_DEVICES", "5"), ("ROCR_VISIBLE_DEVICES", "1")]);
        let assigned = assign_gpus(&gpu("rocm", 1), GpuDevices::PodmanCdi, vars)
            .unwrap()
            .unwrap();
        assert_eq!(assigned.device_ids, ["1"]);
        assert_eq!(assigned.cdi_names(), ["amd.com/gpu=1"]);
    }

    #[test]
    fn unknown_devices_mean_all() {
        let assigned = assign_gpus(&gpu("cuda", 3), GpuDevices::Docker, env(&[]))
            .unwrap()
            .unwrap();
        assert!(assigned.device_ids.is_empty());
        assert_eq!(assigned.count, 3);
        assert_eq!(assigned.cdi_names(), ["nvidia.com/gpu=all"]);
    }

    #[test]
    fn too_few_job_gpus_is_an_error() {
        let err = assign_gpus(
            &gpu("cuda", 2),
            GpuDevices::Docker,
            env(&[("SLURM_JOB_GPUS", "0")]),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                GpuError::TooFew {
                    requested: 2,
                    found: 1,
                    variable: "SLURM_JOB_GPUS",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("gpu_args"), "{err}");
    }

    #[test]
    fn bad_constraints_are_errors() {
        let err = assign_gpus(&gpu("opencl", 1), GpuDevices::Docker, env(&[])).unwrap_err();
        assert!(err.to_string().contains("opencl"), "{err}");
        let err = assign_gpus(&gpu("cuda", -1), GpuDevices::Docker, env(&[])).unwrap_err();
        assert_eq!(err, GpuError::NegativeCount { count: -1 });
    }
}
