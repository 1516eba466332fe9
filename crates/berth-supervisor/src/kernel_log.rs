//! Out-of-memory kills read from the kernel log.
//!
//! The cgroup of a container may be gone by the time the supervisor looks
//! at it, because Podman removes it as soon as the container exits. So a
//! container killed in its first milliseconds leaves no reading of its
//! peak memory or of its out-of-memory kill count. Podman 4.3 on cgroup v1 does not
//! record the kill either (`State.OOMKilled` stays false). The kernel logs
//! every kill of its out-of-memory killer, though, with the memory cgroup
//! it happened in and that cgroup's use and limit:
//!
//! ```text
//! memory: usage 65536kB, limit 65536kB, failcnt 203
//! ...
//! oom-kill:constraint=CONSTRAINT_MEMCG,...,oom_memcg=/libpod_parent/libpod-ID,task_memcg=...,task=tail,pid=16271,uid=0
//! ```
//!
//! [`KernelLog::open`] opens `/dev/kmsg` at its end before the container
//! starts, and [`KernelLog::read_oom_kills`] reads what was logged since
//! then once it has exited. The kernel prints one out-of-memory report at
//! a time (under its `oom_lock` mutex), so a `memory:` line belongs to
//! the next `oom-kill:` line.
//! Reading `/dev/kmsg` needs `CAP_SYSLOG` where `kernel.dmesg_restrict` is
//! 1; without it the other signs of [`crate::stats`] remain.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

/// The kernel log device.
const KMSG: &str = "/dev/kmsg";

/// The largest record `/dev/kmsg` returns, with room to spare: the kernel
/// keeps a record's text under 1 KiB, plus its dictionary.
const RECORD_BUFFER: usize = 8192;

/// The out-of-memory kills the kernel logged in one container's memory
/// cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelOomReport {
    /// Processes killed.
    pub kills: u64,
    /// The cgroup's highest memory use at a kill, in bytes. A later kill
    /// in the same cgroup may come when most of its memory is freed.
    pub usage: Option<u64>,
    /// The cgroup's memory limit at the last kill, in bytes.
    pub limit: Option<u64>,
    /// Whether records were overwritten before they were read, so that
    /// kills may be missing.
    pub lost_records: bool,
}

/// The kernel log, read from the moment it was opened.
#[derive(Debug)]
pub struct KernelLog {
    file: File,
}

impl KernelLog {
    /// Opens the kernel log at its end, so that only records logged from
    /// now on are read.
    pub fn open() -> io::Result<KernelLog> {
        let mut file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(KMSG)?;
        file.seek(SeekFrom::End(0))?;
        Ok(KernelLog { file })
    }

    /// Reads the records logged since the last read and returns the kills
    /// in the memory cgroup whose path has a component that contains
    /// `container`, the runtime's ID of the container. Blocks only on the
    /// reads of the device, which do not wait.
    pub fn read_oom_kills(&mut self, container: &str) -> io::Result<KernelOomReport> {
        let mut scanner = OomScanner::new(container);
        let mut buffer = vec![0; RECORD_BUFFER];
        loop {
            match self.file.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => scanner.feed_record(&String::from_utf8_lossy(&buffer[..read])),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                // The ring buffer overwrote records before they were read;
                // the next read returns the oldest one left.
                Err(error) if error.raw_os_error() == Some(libc::EPIPE) => {
                    scanner.report.lost_records = true;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(scanner.report)
    }
}

/// Finds one container's out-of-memory kills in kernel log messages.
#[derive(Debug)]
struct OomScanner<'a> {
    container: &'a str,
    /// The use and limit of the last `memory:` line, in bytes.
    pending: Option<(u64, u64)>,
    report: KernelOomReport,
}

impl<'a> OomScanner<'a> {
    fn new(container: &'a str) -> OomScanner<'a> {
        OomScanner {
            container,
            pending: None,
            report: KernelOomReport::default(),
        }
    }

    /// Takes one `/dev/kmsg` record: `PRIORITY,SEQUENCE,TIME,FLAGS;TEXT`,
    /// then dictionary lines that start with a space.
    fn feed_record(&mut self, record: &str) {
        let first_line = record.lines().next().unwrap_or_default();
        if let Some((_, text)) = first_line.split_once(';') {
            self.feed_message(text);
        }
    }

    fn feed_message(&mut self, text: &str) {
        if let Some(rest) = text.strip_prefix("memory: usage ") {
            self.pending = parse_usage_line(rest);
        } else if let Some(fields) = text.strip_prefix("oom-kill:") {
            let pending = self.pending.take();
            let memcg = fields
                .split(',')
                .find_map(|field| field.strip_prefix("oom_memcg="));
            if memcg.is_some_and(|path| names_container(path, self.container)) {
                self.report.kills += 1;
                if let Some((usage, limit)) = pending {
                    self.report.usage = self.report.usage.max(Some(usage));
                    self.report.limit = Some(limit);
                }
            }
        }
    }
}

/// Parses `65536kB, limit 65536kB, failcnt 203` into bytes.
fn parse_usage_line(rest: &str) -> Option<(u64, u64)> {
    let (usage, rest) = rest.split_once(", limit ")?;
    let limit = rest.split(',').next()?;
    Some((parse_kib(usage)?, parse_kib(limit)?))
}

fn parse_kib(text: &str) -> Option<u64> {
    text.trim()
        .strip_suffix("kB")?
        .parse::<u64>()
        .ok()?
        .checked_mul(1024)
}

/// Returns true when a component of the cgroup `path` contains
/// `container`.
fn names_container(path: &str, container: &str) -> bool {
    !container.is_empty()
        && path
            .split('/')
            .any(|component| component.contains(container))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "bd1d5a14b9c301057798360a6fb6acc30481804e80b000bd0727fe8559139fba";

    fn kill_records(memcg: &str, usage_kib: u64) -> Vec<String> {
        vec![
            "4,2424,10907865485,-;head invoked oom-killer: gfp_mask=0x100cca(GFP_HIGHUSER_MOVABLE), order=0, oom_score_adj=0\n".to_string(),
            "4,2432,10907865577,-; mem_cgroup_out_of_memory+0xf1/0x140\n".to_string(),
            format!("6,2458,10907865656,-;memory: usage {usage_kib}kB, limit 65536kB, failcnt 203\n"),
            "6,2459,10907865658,-;memory+swap: usage 65536kB, limit 131072kB, failcnt 0\n".to_string(),
            format!("6,2461,10907865660,-;Memory cgroup stats for {memcg}:\n"),
            format!("6,2509,10907865755,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=x,mems_allowed=0,oom_memcg={memcg},task_memcg={memcg},task=tail,pid=16271,uid=0\n"),
            "3,2510,10907865787,-;Memory cgroup out of memory: Killed process 16271 (tail) total-vm:67064kB, anon-rss:64896kB\n SUBSYSTEM=memory\n".to_string(),
        ]
    }

    fn scan(records: &[String], container: &str) -> KernelOomReport {
        let mut scanner = OomScanner::new(container);
        for record in records {
            scanner.feed_record(record);
        }
        scanner.report
    }

    #[test]
    fn scanner_counts_container_kill_and_use() {
        let records = kill_records(&format!("/libpod_parent/libpod-{ID}"), 65536);
        let report = scan(&records, ID);
        assert_eq!(report.kills, 1);
        assert_eq!(report.usage, Some(64 << 20));
        assert_eq!(report.limit, Some(64 << 20));
        assert!(!report.lost_records);
    }

    #[test]
    fn systemd_scopes_and_cgroup_v2_paths_match() {
        let scope = format!("/machine.slice/libpod-{ID}.scope/container");
        assert_eq!(scan(&kill_records(&scope, 1024), ID).kills, 1);
        let docker = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(scan(&kill_records(&docker, 1024), ID).kills, 1);
        assert_eq!(scan(&kill_records("/berth/job-1", 1024), "job-1").kills, 1);
    }

    #[test]
    fn kills_in_other_cgroups_are_not_counted() {
        let mut records = kill_records("/libpod_parent/libpod-0123abcd", 2048);
        records.extend(kill_records(&format!("/libpod_parent/libpod-{ID}"), 4096));
        records.extend(kill_records("/user.slice", 8192));
        let report = scan(&records, ID);
        assert_eq!(report.kills, 1);
        // The use is the one reported with this container's kill.
        assert_eq!(report.usage, Some(4096 * 1024));
        // A second kill when little memory is left keeps the highest use.
        records.extend(kill_records(&format!("/libpod_parent/libpod-{ID}"), 640));
        let report = scan(&records, ID);
        assert_eq!(report.kills, 2);
        assert_eq!(report.usage, Some(4096 * 1024));
        assert_eq!(scan(&records, "").kills, 0);
    }

    #[test]
    fn scanner_counts_kill_without_usage() {
        let records = vec![format!(
            "6,1,1,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/docker/{ID},task=a,pid=1,uid=0"
        )];
        let report = scan(&records, ID);
        assert_eq!(report.kills, 1);
        assert_eq!(report.usage, None);
    }

    #[test]
    fn malformed_records_are_ignored() {
        let records = [
            "no separator".to_string(),
            "6,1,1,-;memory: usage lots, limit 1kB".to_string(),
            "6,1,1,-;memory: usage 99999999999999999999kB, limit 1kB".to_string(),
            "6,1,1,-;oom-kill:".to_string(),
            String::new(),
        ];
        assert_eq!(scan(&records, ID), KernelOomReport::default());
    }

    #[test]
    fn usage_lines_parse_to_bytes() {
        assert_eq!(
            parse_usage_line("65536kB, limit 131072kB, failcnt 0"),
            Some((64 << 20, 128 << 20))
        );
        assert_eq!(parse_usage_line("65536kB"), None);
        assert_eq!(parse_kib("18446744073709551615kB"), None);
    }
}
