//! Reading a container's resource use from its cgroup.
//!
//! The kernel accounts a container's CPU time, memory and block I/O in the
//! cgroup its processes run in. [`CgroupDirs::locate`] finds that cgroup
//! from `/proc/PID/cgroup` of the container's main process and the cgroup
//! mounts in `/proc/self/mountinfo`, for each of three controllers:
//!
//! - cgroup v2 (the unified hierarchy): `cpu.stat`, `memory.*` and
//!   `io.stat` in one directory;
//! - cgroup v1: `cpuacct.*`, `memory.*` and `blkio.*` in one hierarchy per
//!   controller. On a hybrid host a controller mounted as v1 is accounted
//!   there, so v1 wins over the v2 tree for the controllers it has.
//!
//! When the directory a process names has no statistics file (a cgroup
//! namespace can hide the upper part of the path), the search walks up
//! towards the mount point and uses the first directory that has one.
//!
//! [`CgroupDirs::read`] takes a [`Sample`]. The parsers are pure functions
//! on the files' text. A file that is missing or contains something
//! unexpected leaves its figure unknown (`None`) and never fails the
//! sample.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The kernel's `USER_HZ`: the unit of `cpuacct.stat`. It is 100 on every
/// architecture Linux exports to user space through that file.
const USER_HZ: u64 = 100;

/// A v1 `memory.limit_in_bytes` at or above this is "no limit": the kernel
/// reports its page counter's maximum (close to 2^63) rounded to pages.
const V1_UNLIMITED: u64 = 1 << 60;

/// The cgroup API version of one directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The directory that accounts one resource, and its cgroup version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerDir {
    pub version: Version,
    pub path: PathBuf,
}

/// The cgroup directories that account a process's CPU, memory and I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDirs {
    pub cpu: Option<ControllerDir>,
    pub memory: Option<ControllerDir>,
    pub io: Option<ControllerDir>,
    /// The process whose network counters are read, if any.
    pub pid: Option<u32>,
}

/// One line of `/proc/PID/cgroup`: `hierarchy-ID:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub hierarchy: u32,
    /// Empty for the v2 line (`0::/path`).
    pub controllers: Vec<String>,
    pub path: String,
}

/// A mounted cgroup hierarchy from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub version: Version,
    /// The cgroup path of the mount's root, `/` unless the mount shows a
    /// subtree only.
    pub root: String,
    pub mount_point: PathBuf,
    /// The v1 controllers of the hierarchy, from its mount options.
    pub controllers: Vec<String>,
}

/// CPU time, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuUsage {
    pub total_usec: u64,
    /// Time in user mode. On v1 the kernel splits user and system time
    /// by sampling at each tick, so the two may not add up to the total.
    pub user_usec: Option<u64>,
    pub system_usec: Option<u64>,
}

/// Memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUsage {
    /// Current use, page cache included.
    pub current: u64,
    /// The kernel's record of the highest use, where it keeps one
    /// (`memory.peak` from Linux 5.19, v1 `memory.max_usage_in_bytes`).
    pub peak: Option<u64>,
    /// The cgroup's limit, `None` when it has none.
    pub limit: Option<u64>,
    /// Anonymous memory (v2 `anon`, v1 `total_rss`): what the processes
    /// allocated, which the kernel cannot drop without swap.
    pub anon: Option<u64>,
    /// Page cache (v2 `file`, v1 `total_cache`).
    pub file: Option<u64>,
    /// Processes the kernel's out-of-memory killer ended in this cgroup
    /// (v2 `memory.events`, v1 `memory.oom_control` from Linux 4.13).
    pub oom_kills: Option<u64>,
}

/// Block I/O, in bytes, summed over devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoUsage {
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// Network traffic, in bytes, summed over interfaces other than `lo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetUsage {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One reading of every counter; `None` where the counter was unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    pub cpu: Option<CpuUsage>,
    pub memory: Option<MemoryUsage>,
    pub io: Option<IoUsage>,
    pub net: Option<NetUsage>,
}

impl Sample {
    /// Returns true when no counter could be read, as after the cgroup
    /// was removed.
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none() && self.io.is_none() && self.net.is_none()
    }
}

/// The three resources and the names they have in each version.
#[derive(Debug, Clone, Copy)]
enum Resource {
    Cpu,
    Memory,
    Io,
}

impl Resource {
    fn v1_controller(self) -> &'static str {
        match self {
            Resource::Cpu => "cpuacct",
            Resource::Memory => "memory",
            Resource::Io => "blkio",
        }
    }

    /// Returns the file whose presence shows that a directory accounts
    /// the resource.
    fn marker(self, version: Version) -> &'static str {
        match (self, version) {
            (Resource::Cpu, Version::V1) => "cpuacct.usage",
            (Resource::Memory, Version::V1) => "memory.usage_in_bytes",
            (Resource::Io, Version::V1) => "blkio.throttle.io_service_bytes",
            (Resource::Cpu, Version::V2) => "cpu.stat",
            (Resource::Memory, Version::V2) => "memory.current",
            (Resource::Io, Version::V2) => "io.stat",
        }
    }
}

impl CgroupDirs {
    /// Finds the cgroup directories of a process from the text of its
    /// `/proc/PID/cgroup` and of `/proc/self/mountinfo`. `exists` reports
    /// whether a file exists, so the search can be tested without a
    /// cgroup file system. Returns `None` for a resource no directory
    /// accounts.
    pub fn locate(
        proc_cgroup: &str,
        mountinfo: &str,
        exists: impl Fn(&Path) -> bool,
    ) -> CgroupDirs {
        let memberships = parse_proc_cgroup(proc_cgroup);
        let mounts = parse_mountinfo(mountinfo);
        let find = |resource| locate_resource(resource, &memberships, &mounts, &exists);
        CgroupDirs {
            cpu: find(Resource::Cpu),
            memory: find(Resource::Memory),
            io: find(Resource::Io),
            pid: None,
        }
    }

    /// Finds the cgroup directories of process `pid` on this host.
    pub fn locate_process(pid: u32) -> std::io::Result<CgroupDirs> {
        let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mut dirs = CgroupDirs::locate(&proc_cgroup, &mountinfo, |path| path.exists());
        dirs.pid = Some(pid);
        Ok(dirs)
    }

    /// Returns true when no resource has a directory.
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none() && self.io.is_none()
    }

    /// Reads every counter now. Blocking: file reads on the cgroup file
    /// system and `/proc`.
    pub fn read(&self) -> Sample {
        let read =
            |dir: &ControllerDir, name: &str| std::fs::read_to_string(dir.path.join(name)).ok();
        Sample {
            cpu: self.cpu.as_ref().and_then(|dir| {
                let file = |name: &str| read(dir, name);
                read_cpu(dir.version, &file)
            }),
            memory: self.memory.as_ref().and_then(|dir| {
                let file = |name: &str| read(dir, name);
                read_memory(dir.version, &file)
            }),
            io: self.io.as_ref().and_then(|dir| {
                let file = |name: &str| read(dir, name);
                read_io(dir.version, &file)
            }),
            net: self.pid.and_then(|pid| {
                let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
                parse_net_dev(&text)
            }),
        }
    }
}

fn locate_resource(
    resource: Resource,
    memberships: &[Membership],
    mounts: &[CgroupMount],
    exists: &impl Fn(&Path) -> bool,
) -> Option<ControllerDir> {
    let controller = resource.v1_controller();
    let v1 = memberships
        .iter()
        .find(|line| line.controllers.iter().any(|name| name == controller))
        .and_then(|line| {
            let mount = mounts.iter().find(|mount| {
                mount.version == Version::V1
                    && mount.controllers.iter().any(|name| name == controller)
            })?;
            find_with_marker(mount, &line.path, resource.marker(Version::V1), exists)
        })
        .map(|path| ControllerDir {
            version: Version::V1,
            path,
        });
    if v1.is_some() {
        return v1;
    }
    let line = memberships
        .iter()
        .find(|line| line.hierarchy == 0 && line.controllers.is_empty())?;
    let mount = mounts.iter().find(|mount| mount.version == Version::V2)?;
    let path = find_with_marker(mount, &line.path, resource.marker(Version::V2), exists)?;
    Some(ControllerDir {
        version: Version::V2,
        path,
    })
}

/// Returns the directory of cgroup `path` under `mount`, or the nearest
/// ancestor up to the mount point, that contains `marker`.
fn find_with_marker(
    mount: &CgroupMount,
    path: &str,
    marker: &str,
    exists: &impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    // A path outside the mount's root is shown relative to a cgroup
    // namespace; it is taken as relative to the mount point.
    let relative = match path.strip_prefix(root) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => path,
    };
    let mut dir = mount.mount_point.clone();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            part => dir.push(part),
        }
    }
    loop {
        if exists(&dir.join(marker)) {
            return Some(dir);
        }
        if dir == mount.mount_point || !dir.pop() {
            return None;
        }
    }
}

/// Parses `/proc/PID/cgroup`. Lines that do not have the three fields are
/// skipped.
pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let hierarchy = fields.next()?.parse().ok()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            Some(Membership {
                hierarchy,
                controllers: controllers
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// Parses the cgroup and cgroup2 mounts of `/proc/self/mountinfo`:
/// `ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [TAGS...] - TYPE SOURCE
/// SUPER-OPTIONS`. Other mounts and malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let before: Vec<&str> = before.split(' ').collect();
            let root = *before.get(3)?;
            let mount_point = *before.get(4)?;
            let mut after = after.split(' ');
            let fs_type = after.next()?;
            let _source = after.next()?;
            let options = after.next().unwrap_or("");
            let version = match fs_type {
                "cgroup2" => Version::V2,
                "cgroup" => Version::V1,
                _ => return None,
            };
            let controllers = match version {
                Version::V2 => Vec::new(),
                Version::V1 => options
                    .split(',')
                    .filter(|option| !matches!(*option, "rw" | "ro") && !option.contains('='))
                    .map(str::to_string)
                    .collect(),
            };
            Some(CgroupMount {
                version,
                root: unescape_mount_field(root),
                mount_point: PathBuf::from(unescape_mount_field(mount_point)),
                controllers,
            })
        })
        .collect()
}

/// Decodes the octal escapes (`\040` for a space) of a mountinfo field.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes.get(index + 1..index + 4).filter(|digits| {
            bytes[index] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match escape
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                decoded.push(byte);
                index += 4;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Parses a flat keyed file (`cpu.stat`, `memory.stat`, `memory.events`,
/// `cpuacct.stat`, `memory.oom_control`): one `key value` pair a line.
/// Lines whose value is not a number are skipped.
pub fn parse_keyed(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let key = fields.next()?;
            let value = fields.next()?.parse().ok()?;
            Some((key, value))
        })
        .collect()
}

/// Parses a file holding one number, such as `memory.current`.
pub fn parse_number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Parses a v2 limit file such as `memory.max`: a number, or `max` for no
/// limit. Returns `Some(None)` for no limit and `None` for odd text.
pub fn parse_v2_limit(text: &str) -> Option<Option<u64>> {
    match text.trim() {
        "max" => Some(None),
        other => other.parse().ok().map(Some),
    }
}

/// Parses v2 `io.stat` (`MAJOR:MINOR rbytes=N wbytes=N rios=N ...` a line)
/// and sums the bytes over devices.
pub fn parse_io_stat(text: &str) -> IoUsage {
    let mut usage = IoUsage::default();
    for line in text.lines() {
        for field in line.split_whitespace().skip(1) {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "rbytes" => usage.read_bytes = usage.read_bytes.saturating_add(value),
                "wbytes" => usage.write_bytes = usage.write_bytes.saturating_add(value),
                _ => {}
            }
        }
    }
    usage
}

/// Parses v1 `blkio.throttle.io_service_bytes` (`MAJOR:MINOR Read N`,
/// `MAJOR:MINOR Write N`, ..., then `Total N`) and sums the bytes over
/// devices.
pub fn parse_blkio_service_bytes(text: &str) -> IoUsage {
    let mut usage = IoUsage::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_device, operation, value] = fields.as_slice() else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match *operation {
            "Read" => usage.read_bytes = usage.read_bytes.saturating_add(value),
            "Write" => usage.write_bytes = usage.write_bytes.saturating_add(value),
            _ => {}
        }
    }
    usage
}

/// Parses `/proc/PID/net/dev` and sums received and sent bytes over the
/// interfaces other than `lo`. Returns `None` when no line parses.
pub fn parse_net_dev(text: &str) -> Option<NetUsage> {
    let mut usage = NetUsage::default();
    let mut found = false;
    for line in text.lines() {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let counters: Vec<u64> = counters
            .split_whitespace()
            .map_while(|value| value.parse().ok())
            .collect();
        // Receive has 8 columns (bytes first), then transmit (bytes first).
        let (Some(rx), Some(tx)) = (counters.first(), counters.get(8)) else {
            continue;
        };
        found = true;
        if name == "lo" {
            continue;
        }
        usage.rx_bytes = usage.rx_bytes.saturating_add(*rx);
        usage.tx_bytes = usage.tx_bytes.saturating_add(*tx);
    }
    found.then_some(usage)
}

fn read_cpu(version: Version, file: &impl Fn(&str) -> Option<String>) -> Option<CpuUsage> {
    match version {
        Version::V2 => {
            let text = file("cpu.stat")?;
            let stat = parse_keyed(&text);
            Some(CpuUsage {
                total_usec: *stat.get("usage_usec")?,
                user_usec: stat.get("user_usec").copied(),
                system_usec: stat.get("system_usec").copied(),
            })
        }
        Version::V1 => {
            let total_nsec = parse_number(&file("cpuacct.usage")?)?;
            let nsec = |name: &str| file(name).as_deref().and_then(parse_number);
            // cpuacct.usage_user and usage_sys (Linux 4.7 and later) are in
            // nanoseconds; cpuacct.stat is in USER_HZ ticks.
            let (user_usec, system_usec) =
                match (nsec("cpuacct.usage_user"), nsec("cpuacct.usage_sys")) {
                    (Some(user), Some(system)) => (Some(user / 1000), Some(system / 1000)),
                    _ => {
                        let text = file("cpuacct.stat").unwrap_or_default();
                        let stat = parse_keyed(&text);
                        let usec = |ticks: u64| ticks.saturating_mul(1_000_000 / USER_HZ);
                        (
                            stat.get("user").map(|t| usec(*t)),
                            stat.get("system").map(|t| usec(*t)),
                        )
                    }
                };
            Some(CpuUsage {
                total_usec: total_nsec / 1000,
                user_usec,
                system_usec,
            })
        }
    }
}

fn read_memory(version: Version, file: &impl Fn(&str) -> Option<String>) -> Option<MemoryUsage> {
    let stat_text = file("memory.stat").unwrap_or_default();
    let stat = parse_keyed(&stat_text);
    match version {
        Version::V2 => {
            let events = file("memory.events").unwrap_or_default();
            Some(MemoryUsage {
                current: parse_number(&file("memory.current")?)?,
                peak: file("memory.peak").as_deref().and_then(parse_number),
                limit: file("memory.max")
                    .as_deref()
                    .and_then(parse_v2_limit)
                    .flatten(),
                anon: stat.get("anon").copied(),
                file: stat.get("file").copied(),
                oom_kills: parse_keyed(&events).get("oom_kill").copied(),
            })
        }
        Version::V1 => {
            let oom_control = file("memory.oom_control").unwrap_or_default();
            Some(MemoryUsage {
                current: parse_number(&file("memory.usage_in_bytes")?)?,
                peak: file("memory.max_usage_in_bytes")
                    .as_deref()
                    .and_then(parse_number),
                limit: file("memory.limit_in_bytes")
                    .as_deref()
                    .and_then(parse_number)
                    .filter(|limit| *limit < V1_UNLIMITED),
                anon: stat.get("total_rss").copied(),
                file: stat.get("total_cache").copied(),
                oom_kills: parse_keyed(&oom_control).get("oom_kill").copied(),
            })
        }
    }
}

fn read_io(version: Version, file: &impl Fn(&str) -> Option<String>) -> Option<IoUsage> {
    match version {
        Version::V2 => Some(parse_io_stat(&file("io.stat")?)),
        Version::V1 => Some(parse_blkio_service_bytes(&file(
            "blkio.throttle.io_service_bytes",
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// `/proc/PID/cgroup` of a Podman container on a hybrid host (cgroup
    /// v1 controllers plus an empty v2 tree), as Podman 4 with crun and the
    /// cgroupfs manager creates it.
    const HYBRID_PROC_CGROUP: &str = "\
10:hugetlb:/libpod_parent/libpod-6491e3b6
9:name=systemd:/libpod_parent/libpod-6491e3b6
8:pids:/libpod_parent/libpod-6491e3b6
7:blkio:/libpod_parent/libpod-6491e3b6
6:freezer:/libpod_parent/libpod-6491e3b6
5:devices:/libpod_parent/libpod-6491e3b6
4:memory:/libpod_parent/libpod-6491e3b6
3:cpuset:/libpod_parent/libpod-6491e3b6
2:cpuacct:/libpod_parent/libpod-6491e3b6
1:cpu:/libpod_parent/libpod-6491e3b6
0::/libpod_parent/libpod-6491e3b6
";

    const HYBRID_MOUNTINFO: &str = "\
23 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd host with only cgroup v2, and a Docker container's scope.
    const UNIFIED_PROC_CGROUP: &str = "0::/system.slice/docker-4f1c2a.scope\n";
    const UNIFIED_MOUNTINFO: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn existing(paths: &[&str]) -> impl Fn(&Path) -> bool {
        let set: HashSet<PathBuf> = paths.iter().map(PathBuf::from).collect();
        move |path: &Path| set.contains(path)
    }

    #[test]
    fn hybrid_host_uses_v1_controllers() {
        let dir = "libpod_parent/libpod-6491e3b6";
        let exists = existing(&[
            &format!("/sys/fs/cgroup/cpuacct/{dir}/cpuacct.usage"),
            &format!("/sys/fs/cgroup/memory/{dir}/memory.usage_in_bytes"),
            &format!("/sys/fs/cgroup/blkio/{dir}/blkio.throttle.io_service_bytes"),
            // The v2 tree has cpu.stat even without the cpu controller.
            &format!("/sys/fs/cgroup/unified/{dir}/cpu.stat"),
        ]);
        let dirs = CgroupDirs::locate(HYBRID_PROC_CGROUP, HYBRID_MOUNTINFO, exists);
        let cpu = dirs.cpu.unwrap();
        assert_eq!(cpu.version, Version::V1);
        assert_eq!(
            cpu.path,
            PathBuf::from(format!("/sys/fs/cgroup/cpuacct/{dir}"))
        );
        let memory = dirs.memory.unwrap();
        assert_eq!(memory.version, Version::V1);
        assert_eq!(
            memory.path,
            PathBuf::from(format!("/sys/fs/cgroup/memory/{dir}"))
        );
        assert_eq!(
            dirs.io.unwrap().path,
            PathBuf::from(format!("/sys/fs/cgroup/blkio/{dir}"))
        );
    }

    #[test]
    fn unified_host_uses_v2() {
        let dir = "/sys/fs/cgroup/system.slice/docker-4f1c2a.scope";
        let exists = existing(&[
            &format!("{dir}/cpu.stat"),
            &format!("{dir}/memory.current"),
            &format!("{dir}/io.stat"),
        ]);
        let dirs = CgroupDirs::locate(UNIFIED_PROC_CGROUP, UNIFIED_MOUNTINFO, exists);
        for found in [dirs.cpu, dirs.memory, dirs.io] {
            let found = found.unwrap();
            assert_eq!(found.version, Version::V2);
            assert_eq!(found.path, PathBuf::from(dir));
        }
    }

    #[test]
    fn leaf_without_stats_walks_up() {
        // The memory controller is not enabled in the leaf, only above it.
        let exists = existing(&["/sys/fs/cgroup/system.slice/memory.current"]);
        let dirs = CgroupDirs::locate(UNIFIED_PROC_CGROUP, UNIFIED_MOUNTINFO, exists);
        assert_eq!(
            dirs.memory.unwrap().path,
            PathBuf::from("/sys/fs/cgroup/system.slice")
        );
        assert_eq!(dirs.cpu, None);
    }

    #[test]
    fn mount_of_a_subtree_strips_its_root() {
        let mountinfo = "40 31 0:37 /system.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let exists = existing(&["/sys/fs/cgroup/docker-4f1c2a.scope/memory.current"]);
        let dirs = CgroupDirs::locate(UNIFIED_PROC_CGROUP, mountinfo, exists);
        assert_eq!(
            dirs.memory.unwrap().path,
            PathBuf::from("/sys/fs/cgroup/docker-4f1c2a.scope")
        );
    }

    #[test]
    fn mount_root_matches_whole_components() {
        let mountinfo = "40 31 0:37 /system /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let exists = existing(&["/sys/fs/cgroup/system.slice/docker-4f1c2a.scope/memory.current"]);
        let dirs = CgroupDirs::locate(UNIFIED_PROC_CGROUP, mountinfo, exists);
        assert_eq!(
            dirs.memory.unwrap().path,
            PathBuf::from("/sys/fs/cgroup/system.slice/docker-4f1c2a.scope")
        );
    }

    #[test]
    fn parent_components_are_rejected() {
        let exists = |_: &Path| true;
        let dirs = CgroupDirs::locate("0::/../../etc\n", UNIFIED_MOUNTINFO, exists);
        assert!(dirs.is_empty(), "{dirs:?}");
    }

    #[test]
    fn no_cgroup_mounts_find_nothing() {
        let dirs = CgroupDirs::locate(UNIFIED_PROC_CGROUP, "", |_| true);
        assert!(dirs.is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let mounts = parse_mountinfo("40 31 0:37 / /mnt/cg\\040roups rw - cgroup2 cgroup2 rw\n");
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/cg roups"));
        assert_eq!(unescape_mount_field("a\\0"), "a\\0");
        assert_eq!(unescape_mount_field("\\134x"), "\\x");
    }

    #[test]
    fn mountinfo_v1_controllers_come_from_super_options() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[0].controllers, ["cpu"]);
        assert!(
            mounts[4].controllers.is_empty(),
            "name=systemd is no controller"
        );
        assert_eq!(mounts[5].version, Version::V2);
    }

    #[test]
    fn odd_proc_cgroup_lines_are_skipped() {
        let lines = parse_proc_cgroup("garbage\nx:memory:/a\n4:memory:/b:c\n\n");
        assert_eq!(
            lines,
            [Membership {
                hierarchy: 4,
                controllers: vec!["memory".into()],
                path: "/b:c".into()
            }]
        );
    }

    fn files(entries: &[(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<&str, &str> = entries.iter().copied().collect();
        move |name: &str| map.get(name).map(|text| text.to_string())
    }

    #[test]
    fn v2_files_give_cpu_memory_and_io() {
        let file = files(&[
            (
                "cpu.stat",
                "usage_usec 2489345\nuser_usec 1905436\nsystem_usec 583909\nnr_periods 0\n\
                 nr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n",
            ),
            ("memory.current", "52559872\n"),
            ("memory.peak", "67108864\n"),
            ("memory.max", "67108864\n"),
            (
                "memory.stat",
                "anon 50331648\nfile 1966080\nkernel 262144\nkernel_stack 32768\n\
                 pagetables 131072\nsock 0\nshmem 0\nfile_mapped 1052672\n",
            ),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 143\noom 2\noom_kill 1\noom_group_kill 0\n",
            ),
            (
                "io.stat",
                "259:0 rbytes=1048576 wbytes=4096 rios=16 wios=1 dbytes=0 dios=0\n\
                 253:0 rbytes=512 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
            ),
        ]);

        let cpu = read_cpu(Version::V2, &file).unwrap();
        assert_eq!(cpu.total_usec, 2_489_345);
        assert_eq!(cpu.user_usec, Some(1_905_436));
        assert_eq!(cpu.system_usec, Some(583_909));

        let memory = read_memory(Version::V2, &file).unwrap();
        assert_eq!(memory.current, 52_559_872);
        assert_eq!(memory.peak, Some(64 << 20));
        assert_eq!(memory.limit, Some(64 << 20));
        assert_eq!(memory.anon, Some(50_331_648));
        assert_eq!(memory.file, Some(1_966_080));
        assert_eq!(memory.oom_kills, Some(1));

        let io = read_io(Version::V2, &file).unwrap();
        assert_eq!(io.read_bytes, 1_049_088);
        assert_eq!(io.write_bytes, 12_288);
    }

    #[test]
    fn v2_without_limit_or_peak() {
        let file = files(&[("memory.current", "4096\n"), ("memory.max", "max\n")]);

        let memory = read_memory(Version::V2, &file).unwrap();
        assert_eq!(memory.limit, None);
        assert_eq!(memory.peak, None);
        assert_eq!(memory.oom_kills, None);
        assert_eq!(memory.anon, None);
    }

    /// Files of the Podman container of `HYBRID_PROC_CGROUP`, read on
    /// Linux 6.18 with a 32 MiB limit after one process was killed.
    #[test]
    fn v1_files_give_cpu_memory_and_io() {
        let file = files(&[
            ("cpuacct.usage", "4039824\n"),
            ("cpuacct.usage_user", "1000000\n"),
            ("cpuacct.usage_sys", "3000000\n"),
            ("cpuacct.stat", "user 0\nsystem 0\n"),
            ("memory.usage_in_bytes", "286720\n"),
            ("memory.max_usage_in_bytes", "33554432\n"),
            ("memory.limit_in_bytes", "33554432\n"),
            (
                "memory.stat",
                "cache 65536\nrss 53248\nrss_huge 0\nshmem 0\nmapped_file 28672\n\
                 hierarchical_memory_limit 33554432\ntotal_cache 65536\ntotal_rss 53248\n",
            ),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
            ),
            (
                "blkio.throttle.io_service_bytes",
                "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n\
                 8:0 Discard 0\n8:0 Total 12288\n8:16 Read 1\n8:16 Write 2\nTotal 12291\n",
            ),
        ]);

        let cpu = read_cpu(Version::V1, &file).unwrap();
        assert_eq!(cpu.total_usec, 4039);
        assert_eq!(cpu.user_usec, Some(1000));
        assert_eq!(cpu.system_usec, Some(3000));

        let memory = read_memory(Version::V1, &file).unwrap();
        assert_eq!(memory.current, 286_720);
        assert_eq!(memory.peak, Some(32 << 20));
        assert_eq!(memory.limit, Some(32 << 20));
        assert_eq!(memory.anon, Some(53_248));
        assert_eq!(memory.file, Some(65_536));
        assert_eq!(memory.oom_kills, Some(1));

        let io = read_io(Version::V1, &file).unwrap();
        assert_eq!(
            io,
            IoUsage {
                read_bytes: 4097,
                write_bytes: 8194
            }
        );
    }

    #[test]
    fn v1_ticks_and_unlimited_memory() {
        let file = files(&[
            ("cpuacct.usage", "2500000000\n"),
            ("cpuacct.stat", "user 180\nsystem 40\n"),
            ("memory.usage_in_bytes", "4096\n"),
            ("memory.limit_in_bytes", "9223372036854771712\n"),
        ]);

        let cpu = read_cpu(Version::V1, &file).unwrap();
        assert_eq!(cpu.total_usec, 2_500_000);
        assert_eq!(cpu.user_usec, Some(1_800_000));
        assert_eq!(cpu.system_usec, Some(400_000));

        let memory = read_memory(Version::V1, &file).unwrap();
        assert_eq!(memory.limit, None);
    }

    #[test]
    fn missing_or_odd_files_leave_figures_unknown() {
        let file = files(&[
            ("cpu.stat", "usage_usec lots\n"),
            ("memory.current", "\u{0}\u{1}"),
            ("memory.usage_in_bytes", "-5\n"),
        ]);
        assert_eq!(read_cpu(Version::V2, &file), None);
        assert_eq!(read_cpu(Version::V1, &file), None);
        assert_eq!(read_memory(Version::V2, &file), None);
        assert_eq!(read_memory(Version::V1, &file), None);
        assert_eq!(read_io(Version::V2, &file), None);
        assert_eq!(parse_io_stat("8:0 rbytes=x wbytes\n\n"), IoUsage::default());
        assert_eq!(
            parse_blkio_service_bytes("Total\n8:0 Read\n"),
            IoUsage::default()
        );
        assert_eq!(parse_v2_limit("12k"), None);
    }

    #[test]
    fn net_dev_sums_interfaces_but_lo() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     500       5    0    0    0     0          0         0      500       5    0    0    0     0       0          0
  eth0:    1220      14    0    0    0     0          0         0      516       6    0    0    0     0       0          0
  eth1:      80       1    0    0    0     0          0         0       4       1    0    0    0     0       0          0
";
        assert_eq!(
            parse_net_dev(text),
            Some(NetUsage {
                rx_bytes: 1300,
                tx_bytes: 520
            })
        );
        assert_eq!(parse_net_dev("Inter-|\n face |\n"), None);
        assert_eq!(parse_net_dev("eth0: 1 2 3\n"), None);
    }
}
