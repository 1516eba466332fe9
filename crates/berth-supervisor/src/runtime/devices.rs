//! The GPU device files the `oci` runtime gives a container.
//!
//! Without a container daemon and its GPU plug-ins, a container's GPUs are
//! the host's device files, created in the container and allowed in its
//! device cgroup. For CUDA these are NVIDIA's control files
//! (`/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools`,
//! `/dev/nvidia-modeset`, when present) and `/dev/nvidiaN` for each of the
//! job's devices, or all of them when the batch system named none. For
//! ROCm these are `/dev/kfd` and every device file under `/dev/dri`, as
//! the `docker` form binds them, and `ROCR_VISIBLE_DEVICES` then selects
//! the job's devices.
//!
//! NOTE: CUDA programs also need the host's driver libraries, which the
//! NVIDIA Container Toolkit adds for Docker and Podman. This runtime does
//! not add them, so only images that carry a matching driver library work.
//! No GPU node was available to run this path.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::gpu::{GpuAssignment, GpuStack};

/// NVIDIA's device files that every CUDA container needs, where present.
const NVIDIA_CONTROL_FILES: &[&str] = &[
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

/// A host character device file given to the container at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFile {
    pub path: String,
    pub major: u64,
    pub minor: u64,
    /// The permission bits of the host's file.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("GPU device file {path} is missing on this node or is not a character device; check that the GPU driver is loaded, or run the container on a GPU node")]
    Missing { path: PathBuf },
    #[error("no {stack} GPU device files were found under /dev on this node; check that the GPU driver is loaded")]
    NoneFound { stack: &'static str },
}

/// Returns the device files for the container's GPUs, reading them under
/// `dev` (normally `/dev`, with paths in the container as on the host).
pub fn gpu_device_files(gpus: &GpuAssignment, dev: &Path) -> Result<Vec<DeviceFile>, DeviceError> {
    let host = |path: &str| dev.join(path.trim_start_matches("/dev/"));
    let mut files = Vec::new();
    match gpus.stack {
        GpuStack::Cuda => {
            for path in NVIDIA_CONTROL_FILES {
                if let Some(file) = device_file(&host(path), path) {
                    files.push(file);
                }
            }
            if !files.iter().any(|file| file.path == "/dev/nvidiactl") {
                return Err(DeviceError::Missing {
                    path: host("/dev/nvidiactl"),
                });
            }
            if gpus.device_ids.is_empty() {
                let mut numbered = numbered_nvidia_devices(dev);
                if numbered.is_empty() {
                    return Err(DeviceError::NoneFound { stack: "cuda" });
                }
                files.append(&mut numbered);
            } else {
                for id in &gpus.device_ids {
                    let path = format!("/dev/nvidia{id}");
                    let file = device_file(&host(&path), &path)
                        .ok_or_else(|| DeviceError::Missing { path: host(&path) })?;
                    files.push(file);
                }
            }
        }
        GpuStack::Rocm => {
            let kfd =
                device_file(&host("/dev/kfd"), "/dev/kfd").ok_or_else(|| DeviceError::Missing {
                    path: host("/dev/kfd"),
                })?;
            files.push(kfd);
            let mut dri = Vec::new();
            if let Ok(entries) = std::fs::read_dir(dev.join("dri")) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if let Some(file) = device_file(&entry.path(), &format!("/dev/dri/{name}")) {
                        dri.push(file);
                    }
                }
            }
            if dri.is_empty() {
                return Err(DeviceError::NoneFound { stack: "rocm" });
            }
            dri.sort_by(|a, b| a.path.cmp(&b.path));
            files.append(&mut dri);
        }
    }
    Ok(files)
}

/// Returns `/dev/nvidia0`, `/dev/nvidia1`, ... as present under `dev`.
fn numbered_nvidia_devices(dev: &Path) -> Vec<DeviceFile> {
    let mut files: Vec<(u64, DeviceFile)> = std::fs::read_dir(dev)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let index: u64 = name.strip_prefix("nvidia")?.parse().ok()?;
                    let file = device_file(&entry.path(), &format!("/dev/{name}"))?;
                    Some((index, file))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort_by_key(|(index, _)| *index);
    files.into_iter().map(|(_, file)| file).collect()
}

/// Reads a character device file at `host`, following symlinks, to be
/// created at `path` in the container. Returns `None` for anything else.
fn device_file(host: &Path, path: &str) -> Option<DeviceFile> {
    let metadata = std::fs::metadata(host).ok()?;
    if !metadata.file_type().is_char_device() {
        return None;
    }
    let rdev = metadata.rdev();
    Some(DeviceFile {
        path: path.to_string(),
        major: nix::sys::stat::major(rdev),
        minor: nix::sys::stat::minor(rdev),
        mode: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuDevices;

    fn assignment(stack: GpuStack, ids: &[&str]) -> GpuAssignment {
        GpuAssignment {
            stack,
            count: 1,
            device_ids: ids.iter().map(|id| id.to_string()).collect(),
            devices: GpuDevices::Docker,
        }
    }

    /// Builds a fake /dev with symlinks to real character devices, which
    /// the reader follows.
    fn fake_dev(names: &[&str]) -> tempfile::TempDir {
        let dev = tempfile::tempdir().unwrap();
        for name in names {
            let path = dev.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink("/dev/null", &path).unwrap();
        }
        dev
    }

    #[test]
    fn cuda_takes_control_files_and_named_devices() {
        let dev = fake_dev(&["nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1", "nvidia2"]);
        let files = gpu_device_files(&assignment(GpuStack::Cuda, &["2"]), dev.path()).unwrap();
        let paths: Vec<&str> = files.iter().map(|file| file.path.as_str()).collect();
        assert_eq!(paths, ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia2"]);
        let null = std::fs::metadata("/dev/null").unwrap().rdev();
        assert_eq!(files[0].major, nix::sys::stat::major(null));
        assert_eq!(files[0].minor, nix::sys::stat::minor(null));
    }

    #[test]
    fn cuda_without_ids_takes_every_device() {
        let dev = fake_dev(&["nvidiactl", "nvidia10", "nvidia2", "nvidia-modeset"]);
        let files = gpu_device_files(&assignment(GpuStack::Cuda, &[]), dev.path()).unwrap();
        let paths: Vec<&str> = files.iter().map(|file| file.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/dev/nvidiactl",
                "/dev/nvidia-modeset",
                "/dev/nvidia2",
                "/dev/nvidia10"
            ]
        );
    }

    #[test]
    fn missing_cuda_device_is_named() {
        let dev = fake_dev(&["nvidiactl", "nvidia0"]);
        let error = gpu_device_files(&assignment(GpuStack::Cuda, &["3"]), dev.path()).unwrap_err();
        assert!(error.to_string().contains("nvidia3"), "{error}");
        let empty = fake_dev(&[]);
        let error = gpu_device_files(&assignment(GpuStack::Cuda, &[]), empty.path()).unwrap_err();
        assert!(error.to_string().contains("nvidiactl"), "{error}");
    }

    #[test]
    fn rocm_takes_kfd_and_dri() {
        let dev = fake_dev(&["kfd", "dri/renderD128", "dri/card0"]);
        std::fs::create_dir(dev.path().join("dri/by-path")).unwrap();
        let files = gpu_device_files(&assignment(GpuStack::Rocm, &[]), dev.path()).unwrap();
        let paths: Vec<&str> = files.iter().map(|file| file.path.as_str()).collect();
        assert_eq!(paths, ["/dev/kfd", "/dev/dri/card0", "/dev/dri/renderD128"]);
        let no_dri = fake_dev(&["kfd"]);
        let error = gpu_device_files(&assignment(GpuStack::Rocm, &[]), no_dri.path()).unwrap_err();
        assert!(error.to_string().contains("rocm"), "{error}");
    }
}
