//! The OCI bundle configuration (`config.json`) of one container.
//!
//! [`bundle_config`] combines the [`ContainerSpec`] with the image config
//! as Docker does: the command runs after the image's `Entrypoint`, and
//! the image's `Cmd` only when the spec has no command. The environment
//! is the image's `Env` with the spec's entries replacing those of the
//! same name, plus `PATH` and `HOME` when neither sets them. The working
//! directory is the spec's, else the image's `WorkingDir`, else `/`. The
//! user comes from the image's `User`, looked up in the root filesystem's
//! `/etc/passwd` and `/etc/group` when it gives names.
//!
//! The container gets the mounts and namespaces of Docker's default
//! container: `/proc`, a tmpfs `/dev` with `/dev/pts`, `/dev/shm` and
//! `/dev/mqueue`, a read-only `/sys`, and new PID, IPC, UTS, mount and
//! cgroup namespaces. Without network it also gets a network namespace
//! of its own, which holds only the loopback interface. With network it
//! shares the host's, and the host's `/etc/resolv.conf` and `/etc/hosts`
//! are bound in read-only.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde_json::{json, Value};

use super::devices::DeviceFile;
use super::rootfs::ImageConfig;
use super::{ContainerSpec, Network};

/// The `PATH` a container gets when neither the image nor the spec sets
/// one, as Docker sets it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The CFS period the CPU quota is given in, in microseconds.
const CPU_PERIOD_MICROS: u64 = 100_000;

/// Docker's default capability set.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Paths hidden from the container, as in runc's default spec.
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// Paths made read-only in the container, as in runc's default spec.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the image's user {user:?} is not in the image's {file}; fix the image's USER")]
    UnknownUser { user: String, file: &'static str },
    #[error("the container has no command and its image has neither Entrypoint nor Cmd")]
    NoCommand,
}

/// The user a container's process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
}

/// The source of the container's root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootMode {
    /// A writable overlay on the cached image.
    Overlay,
    /// The cached image itself, read-only, with tmpfs on the usual
    /// writable directories.
    ReadOnly,
}

/// Directories that get a tmpfs when the root filesystem is read-only.
pub const READONLY_ROOT_TMPFS: &[&str] = &["/tmp", "/var/tmp", "/run"];

/// The container's root filesystem and the host's share in the container.
#[derive(Debug, Clone, Copy)]
pub struct BundleLayout<'a> {
    pub rootfs: &'a Path,
    pub root_mode: RootMode,
    /// The cgroup, relative to the cgroup root.
    pub cgroups_path: &'a str,
    /// Host device files created in the container, such as its GPUs.
    pub devices: &'a [DeviceFile],
}

/// Builds the bundle's `config.json`.
pub fn bundle_config(
    spec: &ContainerSpec,
    image: &ImageConfig,
    user: ProcessUser,
    home: &str,
    layout: BundleLayout<'_>,
) -> Result<Value, BundleError> {
    let BundleLayout {
        rootfs,
        root_mode,
        cgroups_path,
        devices,
    } = layout;
    let args = process_args(spec, image)?;
    let env = process_env(spec, image, home);
    let cwd = spec
        .working_dir
        .clone()
        .filter(|dir| !dir.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|dir| !dir.is_empty()))
        .unwrap_or_else(|| "/".to_string());

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    match &spec.network {
        Network::None => {
            namespaces.push(json!({"type": "network"}));
            mounts.push(
                json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                               "options": ["nosuid", "noexec", "nodev", "ro"]}),
            );
        }
        Network::Enabled { .. } => {
            // sysfs can be mounted only in a network namespace the mounter
            // owns, so the host's /sys is bound instead.
            mounts.push(
                json!({"destination": "/sys", "type": "bind", "source": "/sys",
                               "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
            );
            for file in ["/etc/resolv.conf", "/etc/hosts"] {
                if Path::new(file).exists() {
                    mounts.push(json!({"destination": file, "type": "bind", "source": file,
                                       "options": ["bind", "ro"]}));
                }
            }
        }
    }
    mounts.push(
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                       "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    );
    if root_mode == RootMode::ReadOnly {
        for dir in READONLY_ROOT_TMPFS {
            mounts.push(
                json!({"destination": dir, "type": "tmpfs", "source": "tmpfs",
                               "options": ["nosuid", "nodev", "mode=1777"]}),
            );
        }
    }
    for bind in &spec.binds {
        let mut options = vec!["rbind", "nosuid", "nodev"];
        options.push(if bind.read_only { "ro" } else { "rw" });
        mounts.push(json!({
            "destination": bind.container_path,
            "type": "bind",
            "source": bind.host_path,
            "options": options,
        }));
    }

    let mut device_rules = vec![json!({"allow": false, "access": "rwm"})];
    let mut linux_devices = Vec::new();
    for device in devices {
        linux_devices.push(json!({
            "path": device.path,
            "type": "c",
            "major": device.major,
            "minor": device.minor,
            "fileMode": device.mode,
            "uid": device.uid,
            "gid": device.gid,
        }));
        device_rules.push(json!({
            "allow": true,
            "type": "c",
            "major": device.major,
            "minor": device.minor,
            "access": "rwm",
        }));
    }
    let mut resources = json!({"devices": device_rules});
    if let Some(bytes) = spec.memory_bytes {
        // The OCI `swap` limit is memory plus swap, so the same value
        // allows no swap.
        resources["memory"] = json!({"limit": bytes, "swap": bytes});
    }
    if let Some(nano_cpus) = spec.nano_cpus {
        let quota = u64::try_from(nano_cpus)
            .unwrap_or(0)
            .saturating_mul(CPU_PERIOD_MICROS)
            / 1_000_000_000;
        resources["cpu"] = json!({"quota": quota.max(1000), "period": CPU_PERIOD_MICROS});
    }

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": user.uid, "gid": user.gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            "noNewPrivileges": false,
        },
        "root": {"path": rootfs, "readonly": root_mode == RootMode::ReadOnly},
        "hostname": hostname(&spec.name),
        "mounts": mounts,
        "annotations": spec.labels,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "devices": linux_devices,
            "namespaces": namespaces,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }))
}

/// Returns the process arguments: the image's entrypoint, then the spec's
/// command, or the image's `Cmd` when the spec has none.
fn process_args(spec: &ContainerSpec, image: &ImageConfig) -> Result<Vec<String>, BundleError> {
    let mut args = image.entrypoint.clone();
    if spec.command.is_empty() {
        args.extend(image.cmd.iter().cloned());
    } else {
        args.extend(spec.command.iter().cloned());
    }
    if args.is_empty() {
        return Err(BundleError::NoCommand);
    }
    Ok(args)
}

/// Returns the environment: the image's, overridden by the spec's, with
/// `PATH` and `HOME` defaults.
fn process_env(spec: &ContainerSpec, image: &ImageConfig, home: &str) -> Vec<String> {
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for entry in image.env.iter().chain(spec.env.iter()) {
        let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        if merged.insert(name.to_string(), value.to_string()).is_none() {
            order.push(name.to_string());
        }
    }
    for (name, default) in [("PATH", DEFAULT_PATH), ("HOME", home)] {
        if !merged.contains_key(name) {
            merged.insert(name.to_string(), default.to_string());
            order.push(name.to_string());
        }
    }
    order
        .into_iter()
        .map(|name| {
            let value = merged.get(&name).cloned().unwrap_or_default();
            format!("{name}={value}")
        })
        .collect()
}

/// Returns a host name of at most 63 characters, as the UTS namespace
/// requires.
fn hostname(name: &str) -> String {
    name.chars().take(63).collect()
}

/// Resolves the image's `User` to numeric ids and the home directory,
/// reading names from the root filesystem's `/etc/passwd` and
/// `/etc/group`. Those files are opened without following a symlink, so
/// an image cannot make the supervisor read a host file.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(ProcessUser, String), BundleError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (user, None),
    };
    let passwd = read_table(&rootfs.join("etc/passwd"));
    let unknown_user = |file| BundleError::UnknownUser {
        user: user.to_string(),
        file,
    };

    // passwd lines: name:password:uid:gid:gecos:home:shell
    let by_name = |name: &str| {
        passwd
            .iter()
            .find(|fields| fields.first().map(String::as_str) == Some(name))
    };
    let by_uid = |uid: u32| {
        passwd
            .iter()
            .find(|fields| fields.get(2).and_then(|f| f.parse().ok()) == Some(uid))
    };
    let (uid, entry) = if user_part.is_empty() {
        (0, by_uid(0))
    } else if let Ok(uid) = user_part.parse::<u32>() {
        (uid, by_uid(uid))
    } else {
        let entry = by_name(user_part).ok_or_else(|| unknown_user("/etc/passwd"))?;
        let uid = entry
            .get(2)
            .and_then(|field| field.parse().ok())
            .ok_or_else(|| unknown_user("/etc/passwd"))?;
        (uid, Some(entry))
    };
    let home = entry
        .and_then(|fields| fields.get(5))
        .filter(|home| !home.is_empty())
        .cloned()
        .unwrap_or_else(|| "/".to_string());
    let passwd_gid = entry
        .and_then(|fields| fields.get(3))
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);

    let gid = match group_part {
        None | Some("") => passwd_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                // group lines: name:password:gid:members
                let groups = read_table(&rootfs.join("etc/group"));
                groups
                    .iter()
                    .find(|fields| fields.first().map(String::as_str) == Some(group))
                    .and_then(|fields| fields.get(2))
                    .and_then(|field| field.parse().ok())
                    .ok_or_else(|| unknown_user("/etc/group"))?
            }
        },
    };
    Ok((ProcessUser { uid, gid }, home))
}

/// Reads a colon-separated table such as `/etc/passwd`; a missing or
/// unreadable file, or a symlink, reads as empty.
fn read_table(path: &Path) -> Vec<Vec<String>> {
    let Ok(file) = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return Vec::new();
    };
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Vec::new();
    }
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split(':').map(str::to_string).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::BindMount;
    use std::path::PathBuf;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "berth-zzzzz-dz642-0123456789abcde".into(),
            labels: BTreeMap::from([("org.berth.container-uuid".into(), "u".into())]),
            image: "sha256:abc".into(),
            command: vec!["echo".into(), "hi".into()],
            env: vec!["A=1".into(), "PATH=/custom".into()],
            working_dir: None,
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(1_500_000_000),
            network: Network::None,
            binds: vec![BindMount {
                host_path: PathBuf::from("/host/in"),
                container_path: "/in".into(),
                read_only: true,
            }],
            gpus: None,
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            env: vec!["PATH=/image/bin".into(), "LANG=C".into()],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            working_dir: "/work".into(),
            user: String::new(),
        }
    }

    fn config(spec: &ContainerSpec, image: &ImageConfig) -> Value {
        bundle_config(
            spec,
            image,
            ProcessUser { uid: 0, gid: 0 },
            "/root",
            BundleLayout {
                rootfs: Path::new("/bundle/rootfs"),
                root_mode: RootMode::Overlay,
                cgroups_path: "/berth/x",
                devices: &[],
            },
        )
        .unwrap()
    }

    #[test]
    fn command_follows_the_entrypoint() {
        let value = config(&spec(), &image());
        assert_eq!(value["process"]["args"], json!(["/entry", "echo", "hi"]));
        let mut no_command = spec();
        no_command.command.clear();
        let value = config(&no_command, &image());
        assert_eq!(value["process"]["args"], json!(["/entry", "default"]));
    }

    #[test]
    fn spec_env_overrides_the_image() {
        let value = config(&spec(), &image());
        assert_eq!(
            value["process"]["env"],
            json!(["PATH=/custom", "LANG=C", "A=1", "HOME=/root"])
        );
        let mut bare = image();
        bare.env.clear();
        let mut no_path = spec();
        no_path.env = vec!["A=1".into()];
        let value = config(&no_path, &bare);
        assert_eq!(
            value["process"]["env"],
            json!(["A=1", format!("PATH={DEFAULT_PATH}"), "HOME=/root"])
        );
    }

    #[test]
    fn working_dir_prefers_the_spec() {
        assert_eq!(config(&spec(), &image())["process"]["cwd"], "/work");
        let mut with_dir = spec();
        with_dir.working_dir = Some("/data".into());
        assert_eq!(config(&with_dir, &image())["process"]["cwd"], "/data");
        let mut bare = image();
        bare.working_dir.clear();
        assert_eq!(config(&spec(), &bare)["process"]["cwd"], "/");
    }

    #[test]
    fn limits_go_to_resources() {
        let value = config(&spec(), &image());
        let resources = &value["linux"]["resources"];
        assert_eq!(
            resources["memory"],
            json!({"limit": 64 << 20, "swap": 64 << 20})
        );
        assert_eq!(
            resources["cpu"],
            json!({"quota": 150_000, "period": 100_000})
        );
        assert_eq!(value["linux"]["cgroupsPath"], "/berth/x");
    }

    #[test]
    fn network_off_gets_its_own_namespace() {
        let value = config(&spec(), &image());
        let namespaces = value["linux"]["namespaces"].as_array().unwrap();
        assert!(namespaces.contains(&json!({"type": "network"})));
        let mut online = spec();
        online.network = Network::Enabled { mode: None };
        let value = config(&online, &image());
        let namespaces = value["linux"]["namespaces"].as_array().unwrap();
        assert!(!namespaces.contains(&json!({"type": "network"})));
    }

    #[test]
    fn binds_keep_their_mode() {
        let value = config(&spec(), &image());
        let mounts = value["mounts"].as_array().unwrap();
        let bind = mounts
            .iter()
            .find(|mount| mount["destination"] == "/in")
            .unwrap();
        assert_eq!(bind["source"], "/host/in");
        assert_eq!(bind["options"], json!(["rbind", "nosuid", "nodev", "ro"]));
        for destination in ["/proc", "/dev", "/dev/pts", "/dev/shm", "/sys"] {
            assert!(
                mounts
                    .iter()
                    .any(|mount| mount["destination"] == destination),
                "{destination}"
            );
        }
    }

    #[test]
    fn read_only_root_gets_tmpfs_dirs() {
        let value = bundle_config(
            &spec(),
            &image(),
            ProcessUser { uid: 0, gid: 0 },
            "/",
            BundleLayout {
                rootfs: Path::new("/cache/rootfs"),
                root_mode: RootMode::ReadOnly,
                cgroups_path: "/berth/x",
                devices: &[],
            },
        )
        .unwrap();
        assert_eq!(
            value["root"],
            json!({"path": "/cache/rootfs", "readonly": true})
        );
        let mounts = value["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|mount| mount["destination"] == "/tmp"));
    }

    #[test]
    fn devices_are_created_and_allowed() {
        let device = DeviceFile {
            path: "/dev/nvidia0".into(),
            major: 195,
            minor: 0,
            mode: 0o666,
            uid: 0,
            gid: 0,
        };
        let value = bundle_config(
            &spec(),
            &image(),
            ProcessUser { uid: 0, gid: 0 },
            "/",
            BundleLayout {
                rootfs: Path::new("/bundle/rootfs"),
                root_mode: RootMode::Overlay,
                cgroups_path: "/berth/x",
                devices: std::slice::from_ref(&device),
            },
        )
        .unwrap();
        assert_eq!(
            value["linux"]["devices"],
            json!([{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "fileMode": 0o666, "uid": 0, "gid": 0}])
        );
        assert_eq!(
            value["linux"]["resources"]["devices"],
            json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 195, "minor": 0, "access": "rwm"},
            ])
        );
    }

    #[test]
    fn users_resolve_from_the_image_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let resolve = |user: &str| resolve_user(root.path(), user);
        assert_eq!(
            resolve("").unwrap(),
            (ProcessUser { uid: 0, gid: 0 }, "/root".to_string())
        );
        assert_eq!(
            resolve("alice").unwrap(),
            (
                ProcessUser {
                    uid: 1000,
                    gid: 1001
                },
                "/home/alice".to_string()
            )
        );
        assert_eq!(
            resolve("alice:staff").unwrap().0,
            ProcessUser { uid: 1000, gid: 50 }
        );
        assert_eq!(
            resolve("2000:3000").unwrap(),
            (
                ProcessUser {
                    uid: 2000,
                    gid: 3000
                },
                "/".to_string()
            )
        );
        let error = resolve("bob").unwrap_err();
        assert!(error.to_string().contains("\"bob\""), "{error}");
        assert!(resolve("alice:nogroup").is_err());
    }

    #[test]
    fn passwd_symlink_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("etc/passwd")).unwrap();
        assert!(resolve_user(root.path(), "root").is_err());
    }
}
