//! Resource statistics of a running container, and out-of-memory kills.
//!
//! Once the container has started, a [`Sampler`] gets the container's
//! main process from the runtime, finds that process's cgroup
//! ([`crate::cgroup`]) and reads it every [`POLL_INTERVAL`]. [`RunStats`]
//! pairs it with its log stream. Every `supervisor.stats_interval` it writes
//! one line to the `crunchstat` log stream, which the log collection
//! keeps as `crunchstat.txt`. After the container exits it writes a
//! `final` line. The line is read then if the cgroup still exists, and
//! otherwise repeats the last reading, because the runtime may remove the
//! cgroup as soon as the container exits.
//!
//! A line is the time of the reading, `sample` or `final`, and
//! `key=value` fields in bytes and seconds, such as
//! `2026-12-05T04:30:00.123456789Z sample interval_seconds=10.000
//! cpu_seconds=1.2345 ... memory_bytes=1048576 memory_peak_bytes=2097152
//! memory_limit_bytes=67108864 ... io_read_bytes=0 io_write_bytes=4096`.
//! A counter that could not be read is left out.
//!
//! The frequent reads keep the peak memory and the cgroup's count of
//! out-of-memory kills up to date between lines, so a container that is
//! killed a moment after allocating still has its peak on record. Memory
//! use over 90, 95 and 99% of the RAM constraint is warned of once each in
//! the supervisor log.
//!
//! [`detect_out_of_memory`] decides after the exit whether the container
//! was killed for memory, and names the sign it went by. Besides the
//! runtime's record and the cgroup, it reads the kernel log
//! ([`crate::kernel_log`]), which keeps the kills of a container whose
//! cgroup was removed before any reading.
//!
//! `memory_bytes` includes the page cache, and `memory_anon_bytes` does
//! not. On cgroup v1 `io_write_bytes` misses buffered writes, because only
//! cgroup v2 charges writeback to the cgroup that dirtied the pages.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cgroup::{CgroupDirs, ControllerDir, Sample, Version};
use crate::kernel_log::{KernelLog, KernelOomReport};
use crate::logs::{LogInput, LogSummary, LogWriter, SupervisorLog};
use crate::runtime::{ContainerId, Runtime};

/// The live log stream of the statistics.
pub const STATS_STREAM: &str = "crunchstat";

/// The log collection's file of the statistics, named as in Arvados.
pub const STATS_FILE: &str = "crunchstat.txt";

/// How often the cgroup is read between lines, to keep the peak memory
/// and the out-of-memory kill count. A shorter `stats_interval` is used
/// instead when one is set.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Shares of the RAM constraint, in percent, whose crossing by the
/// container's memory use is warned of once each.
const MEMORY_WARNING_PERCENTS: [u64; 3] = [90, 95, 99];

/// Exit status of a process ended by SIGKILL, which the kernel's
/// out-of-memory killer sends.
const EXIT_SIGKILL: i64 = 128 + 9;

const MIB: f64 = 1024.0 * 1024.0;

/// The sampler's findings over the whole run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSummary {
    /// Whether the container's cgroup was found and read at least once.
    pub sampled: bool,
    /// The highest memory use seen: the kernel's peak where it keeps one,
    /// else the highest current use read.
    pub peak_memory: Option<u64>,
    /// The memory limit of the cgroup, as last read.
    pub memory_limit: Option<u64>,
    /// Processes the kernel's out-of-memory killer ended in the cgroup.
    pub oom_kills: u64,
    /// The last reading.
    pub last: Option<Sample>,
}

/// A running sampler; [`Sampler::finish`] ends it.
#[derive(Debug)]
pub struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<StatsSummary>,
}

impl Drop for Sampler {
    /// Stops the task when the sampler is dropped without
    /// [`Sampler::finish`].
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Sampler {
    /// Starts sampling the container `id`, writing lines to `output`
    /// every `interval` (which must not be zero). `ram_limit` is the RAM
    /// constraint in bytes, for the memory warnings.
    pub fn spawn(
        runtime: Arc<dyn Runtime>,
        id: ContainerId,
        output: LogInput,
        log: SupervisorLog,
        interval: Duration,
        ram_limit: Option<u64>,
    ) -> Sampler {
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            run_sampler(runtime, id, output, log, interval, ram_limit, stop.clone())
                .in_current_span(),
        );
        Sampler { stop, task }
    }

    /// Takes the last reading, writes the `final` line and returns what
    /// the sampler learned. Call it once the container has exited.
    pub async fn finish(mut self) -> StatsSummary {
        self.stop.cancel();
        match (&mut self.task).await {
            Ok(summary) => summary,
            Err(error) => {
                tracing::error!(error = %error, "the resource statistics task failed");
                StatsSummary::default()
            }
        }
    }
}

/// The statistics of one run: the sampler and its log stream.
#[derive(Debug)]
pub struct RunStats {
    sampler: Sampler,
    writer: LogWriter,
    log: SupervisorLog,
    ram_limit: Option<u64>,
    kernel_log: Option<KernelLog>,
}

impl RunStats {
    /// Starts sampling the started container `id` into `writer` every
    /// `interval` (not zero). `ram_limit` is the RAM constraint in bytes.
    /// `kernel_log`, opened before the container started, is read for its
    /// out-of-memory kills after it exits.
    pub fn start(
        runtime: Arc<dyn Runtime>,
        id: ContainerId,
        writer: LogWriter,
        log: SupervisorLog,
        interval: Duration,
        ram_limit: Option<u64>,
        kernel_log: Option<KernelLog>,
    ) -> RunStats {
        let sampler = Sampler::spawn(
            runtime,
            id,
            writer.input(),
            log.clone(),
            interval,
            ram_limit,
        );
        RunStats {
            sampler,
            writer,
            log,
            ram_limit,
            kernel_log,
        }
    }

    /// Ends the statistics of a container that did not exit (it was
    /// stopped, or the run failed) and closes their stream.
    pub async fn close(self) -> LogSummary {
        self.sampler.finish().await;
        self.writer.close().await
    }

    /// Ends the statistics of the container that exited with `code`, and
    /// decides from them, the runtime's record and the kernel log whether
    /// it ran out of memory. Returns that finding, warnings for
    /// `runtime_status.warning`, and the stream's summary.
    pub async fn finish_exited(
        self,
        runtime: &dyn Runtime,
        id: &ContainerId,
        code: i64,
    ) -> (Option<OutOfMemory>, Vec<String>, LogSummary) {
        let summary = self.sampler.finish().await;
        let stream = self.writer.close().await;
        let runtime_flag = match runtime.oom_killed(id).await {
            Ok(flag) => flag,
            Err(error) => {
                self.log.warn(format!(
                    "failed to ask the container runtime whether the container ran out of memory: {error}"
                ));
                false
            }
        };
        let kernel = match self.kernel_log {
            Some(kernel_log) => read_kernel_log(kernel_log, id, &self.log).await,
            None => KernelOomReport::default(),
        };
        let warnings: Vec<String> = oom_kill_warning(code, &summary, &kernel)
            .into_iter()
            .collect();
        let found = detect_out_of_memory(runtime_flag, code, &summary, &kernel, self.ram_limit);
        if let Some(found) = &found {
            self.log
                .error(format!("{}: {}", OutOfMemory::ERROR, found.detail()));
        }
        (found, warnings, stream)
    }
}

/// Reads the out-of-memory kills of the container `id` that the kernel
/// logged, off the async threads.
async fn read_kernel_log(
    mut kernel_log: KernelLog,
    id: &ContainerId,
    log: &SupervisorLog,
) -> KernelOomReport {
    let container = id.0.clone();
    let read = tokio::task::spawn_blocking(move || kernel_log.read_oom_kills(&container)).await;
    let report = match read {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => {
            log.warn(format!(
                "failed to read the kernel log for out-of-memory kills: {error}"
            ));
            return KernelOomReport::default();
        }
        Err(error) => {
            log.warn(format!("the kernel log task failed: {error}"));
            return KernelOomReport::default();
        }
    };
    if report.lost_records {
        log.warn(
            "the kernel log overwrote records before they were read, so out-of-memory kills may be missing from it",
        );
    }
    if report.kills > 0 {
        log.info(format!(
            "the kernel logged {} out-of-memory kill{} in the container's cgroup",
            report.kills,
            if report.kills == 1 { "" } else { "s" }
        ));
    }
    report
}

async fn run_sampler(
    runtime: Arc<dyn Runtime>,
    id: ContainerId,
    output: LogInput,
    log: SupervisorLog,
    interval: Duration,
    ram_limit: Option<u64>,
    stop: CancellationToken,
) -> StatsSummary {
    let mut tracker = Tracker::new(ram_limit);
    let dirs = tokio::select! {
        dirs = find_cgroup(runtime.as_ref(), &id) => dirs,
        () = stop.cancelled() => Err("the container exited before its cgroup was found".to_string()),
    };
    let dirs = match dirs {
        Ok(dirs) => Arc::new(dirs),
        Err(reason) => {
            log.warn(format!("no resource statistics: {reason}"));
            return tracker.summary;
        }
    };
    log.info(format!(
        "reading resource statistics every {}s from cgroup {}",
        interval.as_secs_f64(),
        describe_dirs(&dirs)
    ));

    let mut poll = tokio::time::interval(interval.min(POLL_INTERVAL));
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_line = Instant::now() + interval;
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            () = stop.cancelled() => break,
        }
        let Some(sample) = read_sample(&dirs).await else {
            continue;
        };
        for warning in tracker.observe(&sample) {
            log.warn(warning);
        }
        let now = Instant::now();
        if now >= next_line {
            // After a stall the lines resume at the interval, without a burst.
            next_line = (next_line + interval).max(now + interval / 2);
            output
                .send(tracker.line("sample", Utc::now(), &sample))
                .await;
        }
    }

    // The final reading: the cgroup may be gone already, and the process
    // too, so its PID may name another process by now.
    let mut final_dirs = CgroupDirs::clone(&dirs);
    final_dirs.pid = None;
    let (sample, time) = match read_sample(&Arc::new(final_dirs)).await {
        Some(mut sample) => {
            sample.net = tracker.summary.last.and_then(|last| last.net);
            for warning in tracker.observe(&sample) {
                log.warn(warning);
            }
            (Some(sample), Utc::now())
        }
        None => (tracker.summary.last, tracker.last_read),
    };
    match sample {
        Some(sample) => output.send(tracker.line("final", time, &sample)).await,
        None => log.warn("no resource statistics: the container's cgroup could not be read"),
    }
    log.info(tracker.describe_summary());
    tracker.summary
}

/// Finds the cgroup of the container's main process.
async fn find_cgroup(runtime: &dyn Runtime, id: &ContainerId) -> Result<CgroupDirs, String> {
    let pid = runtime
        .pid(id)
        .await
        .map_err(|error| format!("failed to find the container's process: {error}"))?
        .ok_or_else(|| {
            "the container runtime reports no process (the container exited, or this runtime does not report one)".to_string()
        })?;
    // NOTE: the PID is taken to be in the supervisor's PID namespace, as
    // it is for a Docker or Podman daemon on the same host.
    let dirs = tokio::task::spawn_blocking(move || CgroupDirs::locate_process(pid))
        .await
        .map_err(|error| format!("the cgroup search task failed: {error}"))?
        .map_err(|error| format!("failed to read the cgroup of process {pid}: {error}"))?;
    if dirs.is_empty() {
        return Err(format!(
            "no cgroup directory with CPU, memory or I/O statistics was found for process {pid}"
        ));
    }
    Ok(dirs)
}

/// Reads a sample off the async threads. Returns `None` when nothing
/// could be read.
async fn read_sample(dirs: &Arc<CgroupDirs>) -> Option<Sample> {
    let dirs = dirs.clone();
    let sample = tokio::task::spawn_blocking(move || dirs.read())
        .await
        .ok()?;
    (!sample.is_empty()).then_some(sample)
}

fn describe_dirs(dirs: &CgroupDirs) -> String {
    let describe = |name: &str, dir: &Option<ControllerDir>| match dir {
        Some(dir) => {
            let version = match dir.version {
                Version::V1 => "v1",
                Version::V2 => "v2",
            };
            format!("{name} {} ({version})", dir.path.display())
        }
        None => format!("{name} not found"),
    };
    [
        describe("cpu", &dirs.cpu),
        describe("memory", &dirs.memory),
        describe("io", &dirs.io),
    ]
    .join(", ")
}

/// The sampler's state: peaks, warnings given, and the last line's
/// counters for the per-interval figures.
#[derive(Debug)]
struct Tracker {
    ram_limit: Option<u64>,
    summary: StatsSummary,
    /// Thresholds of [`MEMORY_WARNING_PERCENTS`] already warned of.
    warned: usize,
    /// Time of the last reading.
    last_read: DateTime<Utc>,
    /// The sample and time of the last line written.
    last_line: Option<(Sample, DateTime<Utc>)>,
}

impl Tracker {
    fn new(ram_limit: Option<u64>) -> Tracker {
        Tracker {
            ram_limit: ram_limit.filter(|limit| *limit > 0),
            summary: StatsSummary::default(),
            warned: 0,
            last_read: Utc::now(),
            last_line: None,
        }
    }

    /// Records a reading. Returns the memory warnings it triggers.
    fn observe(&mut self, sample: &Sample) -> Vec<String> {
        self.summary.sampled = true;
        self.summary.last = Some(*sample);
        self.last_read = Utc::now();
        let Some(memory) = sample.memory else {
            return Vec::new();
        };
        let highest = memory.peak.unwrap_or(0).max(memory.current);
        self.summary.peak_memory = Some(self.summary.peak_memory.unwrap_or(0).max(highest));
        if memory.limit.is_some() {
            self.summary.memory_limit = memory.limit;
        }
        if let Some(kills) = memory.oom_kills {
            self.summary.oom_kills = self.summary.oom_kills.max(kills);
        }

        let Some(ram_limit) = self.ram_limit else {
            return Vec::new();
        };
        // Anonymous memory is what counts against the constraint: the page
        // cache shrinks when the limit is near.
        let used = memory.anon.unwrap_or(memory.current);
        let mut warnings = Vec::new();
        while let Some(percent) = MEMORY_WARNING_PERCENTS.get(self.warned) {
            if u128::from(used) * 100 <= u128::from(ram_limit) * u128::from(*percent) {
                break;
            }
            warnings.push(format!(
                "the container is using over {percent}% of its memory: {} of the {} that runtime_constraints.ram allows",
                mib(used),
                mib(ram_limit)
            ));
            self.warned += 1;
        }
        warnings
    }

    /// Formats the line of `sample`, taken at `time`, and makes it the
    /// start of the next interval.
    fn line(&mut self, kind: &str, time: DateTime<Utc>, sample: &Sample) -> Bytes {
        let mut fields = vec![berth_core::time::format(&time), kind.to_string()];
        let previous = self.last_line.replace((*sample, time));
        if let Some((_, previous_time)) = &previous {
            let seconds = (time - *previous_time).num_milliseconds().max(0) as f64 / 1000.0;
            fields.push(format!("interval_seconds={seconds:.3}"));
        }
        let previous = previous.map(|(sample, _)| sample);
        if let Some(cpu) = sample.cpu {
            fields.push(format!("cpu_seconds={}", seconds(cpu.total_usec)));
            if let Some(user) = cpu.user_usec {
                fields.push(format!("cpu_user_seconds={}", seconds(user)));
            }
            if let Some(system) = cpu.system_usec {
                fields.push(format!("cpu_system_seconds={}", seconds(system)));
            }
            let before = previous
                .and_then(|sample| sample.cpu)
                .map_or(0, |cpu| cpu.total_usec);
            fields.push(format!(
                "cpu_interval_seconds={}",
                seconds(cpu.total_usec.saturating_sub(before))
            ));
        }
        if let Some(memory) = sample.memory {
            fields.push(format!("memory_bytes={}", memory.current));
            if let Some(peak) = self.summary.peak_memory {
                fields.push(format!("memory_peak_bytes={peak}"));
            }
            if let Some(limit) = memory.limit {
                fields.push(format!("memory_limit_bytes={limit}"));
            }
            if let Some(anon) = memory.anon {
                fields.push(format!("memory_anon_bytes={anon}"));
            }
            if let Some(file) = memory.file {
                fields.push(format!("memory_file_bytes={file}"));
            }
            if let Some(kills) = memory.oom_kills {
                fields.push(format!("oom_kills={kills}"));
            }
        }
        if let Some(io) = sample.io {
            fields.push(format!("io_read_bytes={}", io.read_bytes));
            fields.push(format!("io_write_bytes={}", io.write_bytes));
        }
        if let Some(net) = sample.net {
            fields.push(format!("net_rx_bytes={}", net.rx_bytes));
            fields.push(format!("net_tx_bytes={}", net.tx_bytes));
        }
        let mut line = fields.join(" ");
        line.push('\n');
        Bytes::from(line)
    }

    /// Describes the run's totals for the supervisor log.
    fn describe_summary(&self) -> String {
        let Some(last) = self.summary.last else {
            return "resource use: no reading".to_string();
        };
        let mut parts = Vec::new();
        if let Some(cpu) = last.cpu {
            parts.push(format!("CPU {} s", seconds(cpu.total_usec)));
        }
        if let Some(peak) = self.summary.peak_memory {
            let limit = self
                .summary
                .memory_limit
                .map(|limit| format!(" (limit {})", mib(limit)))
                .unwrap_or_default();
            parts.push(format!("peak memory {}{limit}", mib(peak)));
        }
        if self.summary.oom_kills > 0 {
            parts.push(format!("{} out-of-memory kills", self.summary.oom_kills));
        }
        if let Some(io) = last.io {
            parts.push(format!(
                "{} read, {} written",
                mib(io.read_bytes),
                mib(io.write_bytes)
            ));
        }
        format!("resource use: {}", parts.join(", "))
    }
}

/// Formats microseconds as seconds with four decimals.
fn seconds(usec: u64) -> String {
    format!("{}.{:04}", usec / 1_000_000, usec % 1_000_000 / 100)
}

/// Formats bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

/// The sign that a container was killed for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomSign {
    /// The container runtime recorded an out-of-memory kill.
    RuntimeFlag,
    /// The cgroup's `oom_kill` counter rose to this count, and the
    /// container exited with a non-zero status.
    CgroupCounter(u64),
    /// The kernel logged this many out-of-memory kills in the container's
    /// cgroup, and the container exited with a non-zero status.
    KernelLog(u64),
    /// Exit status 137 (SIGKILL) with the peak memory at the limit. A
    /// weaker sign: a SIGKILL from elsewhere looks the same.
    KilledAtLimit,
}

/// A container killed for memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfMemory {
    pub sign: OomSign,
    pub peak_memory: Option<u64>,
    pub limit: Option<u64>,
}

impl OutOfMemory {
    /// The `runtime_status.error` of a container killed for memory.
    pub const ERROR: &'static str = "container ran out of memory";

    /// Returns the `runtime_status.errorDetail`: the peak memory, the
    /// limit and the sign.
    pub fn detail(&self) -> String {
        let peak = self
            .peak_memory
            .map_or_else(|| "unknown (no reading)".to_string(), mib);
        let limit = self.limit.map_or_else(|| "unknown".to_string(), mib);
        let sign = match self.sign {
            OomSign::RuntimeFlag => {
                "the container runtime reported an out-of-memory kill".to_string()
            }
            OomSign::CgroupCounter(kills) => format!(
                "the kernel's out-of-memory killer ended {kills} process{} in the container's cgroup",
                if kills == 1 { "" } else { "es" }
            ),
            OomSign::KernelLog(kills) => format!(
                "the kernel logged {kills} out-of-memory kill{} in the container's cgroup",
                if kills == 1 { "" } else { "s" }
            ),
            OomSign::KilledAtLimit => {
                "exit status 137 (SIGKILL) with memory use at the limit; a weaker sign, because a SIGKILL from elsewhere looks the same".to_string()
            }
        };
        format!("peak memory {peak}, limit {limit}; detected by: {sign}")
    }
}

/// Decides whether a container that exited with `exit_code` was killed
/// for memory, from the runtime's record (`runtime_flag`), the sampler's
/// `summary`, what the `kernel` logged, and the RAM constraint
/// `ram_limit` in bytes. The signs are tried from the strongest down. The
/// peak memory is the higher of the sampler's and the kernel's use at the
/// kill, which is the only one for a container killed before the
/// sampler's first reading.
// NOTE: without access to the kernel log (CAP_SYSLOG), a container killed
// before the sampler's first reading has only the runtime's flag, which
// Podman 4.3 on cgroup v1 leaves false.
pub fn detect_out_of_memory(
    runtime_flag: bool,
    exit_code: i64,
    summary: &StatsSummary,
    kernel: &KernelOomReport,
    ram_limit: Option<u64>,
) -> Option<OutOfMemory> {
    let limit = summary
        .memory_limit
        .or(kernel.limit)
        .or(ram_limit.filter(|limit| *limit > 0));
    let peak_memory = summary.peak_memory.max(kernel.usage);
    let sign = if runtime_flag {
        OomSign::RuntimeFlag
    } else if summary.oom_kills > 0 && exit_code != 0 {
        OomSign::CgroupCounter(summary.oom_kills)
    } else if kernel.kills > 0 && exit_code != 0 {
        OomSign::KernelLog(kernel.kills)
    } else if exit_code == EXIT_SIGKILL && at_limit(peak_memory, limit) {
        OomSign::KilledAtLimit
    } else {
        return None;
    };
    Some(OutOfMemory {
        sign,
        peak_memory,
        limit,
    })
}

/// Returns a warning for a container that exited with status 0 although
/// the out-of-memory killer ended some of its processes, by the cgroup's
/// count or the `kernel` log, whichever saw more.
pub fn oom_kill_warning(
    exit_code: i64,
    summary: &StatsSummary,
    kernel: &KernelOomReport,
) -> Option<String> {
    let kills = summary.oom_kills.max(kernel.kills);
    (exit_code == 0 && kills > 0).then(|| {
        format!(
            "the kernel's out-of-memory killer ended {kills} process{} in the container, which still exited with status 0; its results may be incomplete",
            if kills == 1 { "" } else { "es" }
        )
    })
}

/// Returns true when `peak` reached 99% of `limit`. A cgroup at its limit
/// reclaims memory first, so the kernel's peak may stop just short of it.
fn at_limit(peak: Option<u64>, limit: Option<u64>) -> bool {
    match (peak, limit) {
        (Some(peak), Some(limit)) => u128::from(peak) * 100 >= u128::from(limit) * 99,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{CpuUsage, IoUsage, MemoryUsage, NetUsage};

    const LIMIT: u64 = 64 << 20;

    const NO_KERNEL_LOG: KernelOomReport = KernelOomReport {
        kills: 0,
        usage: None,
        limit: None,
        lost_records: false,
    };

    fn memory_sample(current: u64, anon: u64, oom_kills: u64) -> Sample {
        Sample {
            memory: Some(MemoryUsage {
                current,
                peak: Some(current),
                limit: Some(LIMIT),
                anon: Some(anon),
                file: Some(current - anon),
                oom_kills: Some(oom_kills),
            }),
            ..Sample::default()
        }
    }

    #[test]
    fn memory_warnings_come_once_each() {
        let mut tracker = Tracker::new(Some(LIMIT));
        assert!(tracker
            .observe(&memory_sample(LIMIT / 2, LIMIT / 2, 0))
            .is_empty());
        let warnings = tracker.observe(&memory_sample(LIMIT * 96 / 100, LIMIT * 96 / 100, 0));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("over 90%"), "{}", warnings[0]);
        assert!(warnings[1].contains("over 95%"), "{}", warnings[1]);
        assert!(warnings[1].contains("of the 64.0 MiB"), "{}", warnings[1]);
        assert!(tracker
            .observe(&memory_sample(LIMIT * 96 / 100, LIMIT * 96 / 100, 0))
            .is_empty());
        let warnings = tracker.observe(&memory_sample(LIMIT, LIMIT, 0));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("over 99%"), "{}", warnings[0]);
        assert!(tracker.observe(&memory_sample(LIMIT, LIMIT, 0)).is_empty());
    }

    #[test]
    fn page_cache_does_not_trigger_warnings() {
        let mut tracker = Tracker::new(Some(LIMIT));
        assert!(tracker
            .observe(&memory_sample(LIMIT, LIMIT / 10, 0))
            .is_empty());
    }

    #[test]
    fn no_ram_constraint_no_warnings() {
        let mut tracker = Tracker::new(None);
        assert!(tracker.observe(&memory_sample(LIMIT, LIMIT, 0)).is_empty());
        let mut tracker = Tracker::new(Some(0));
        assert!(tracker.observe(&memory_sample(LIMIT, LIMIT, 0)).is_empty());
    }

    #[test]
    fn peak_and_kills_are_the_highest_seen() {
        let mut tracker = Tracker::new(Some(LIMIT));
        tracker.observe(&memory_sample(LIMIT, LIMIT, 1));
        tracker.observe(&memory_sample(1 << 20, 1 << 20, 1));
        assert_eq!(tracker.summary.peak_memory, Some(LIMIT));
        assert_eq!(tracker.summary.oom_kills, 1);
        assert_eq!(tracker.summary.memory_limit, Some(LIMIT));
        assert!(tracker.summary.sampled);
    }

    #[test]
    fn line_has_every_counter_and_the_interval() {
        let mut tracker = Tracker::new(Some(LIMIT));
        let first = Sample {
            cpu: Some(CpuUsage {
                total_usec: 1_500_000,
                user_usec: Some(1_000_000),
                system_usec: Some(500_000),
            }),
            memory: Some(MemoryUsage {
                current: 3 << 20,
                peak: Some(5 << 20),
                limit: Some(LIMIT),
                anon: Some(2 << 20),
                file: Some(1 << 20),
                oom_kills: Some(0),
            }),
            io: Some(IoUsage {
                read_bytes: 4096,
                write_bytes: 8192,
            }),
            net: Some(NetUsage {
                rx_bytes: 10,
                tx_bytes: 20,
            }),
        };
        tracker.observe(&first);

        let start = DateTime::parse_from_rfc3339("2026-12-05T04:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let line = tracker.line("sample", start, &first);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "2026-12-05T04:30:00.000000000Z sample cpu_seconds=1.5000 cpu_user_seconds=1.0000 \
             cpu_system_seconds=0.5000 cpu_interval_seconds=1.5000 memory_bytes=3145728 \
             memory_peak_bytes=5242880 memory_limit_bytes=67108864 memory_anon_bytes=2097152 \
             memory_file_bytes=1048576 oom_kills=0 io_read_bytes=4096 io_write_bytes=8192 \
             net_rx_bytes=10 net_tx_bytes=20\n"
        );

        let mut second = first;
        second.cpu = Some(CpuUsage {
            total_usec: 2_750_000,
            user_usec: None,
            system_usec: None,
        });
        second.io = None;
        second.net = None;
        let line = tracker.line(
            "final",
            start + chrono::Duration::milliseconds(2500),
            &second,
        );
        let line = std::str::from_utf8(&line).unwrap();
        assert!(line.starts_with("2026-12-05T04:30:02.500000000Z final interval_seconds=2.500 cpu_seconds=2.7500 cpu_interval_seconds=1.2500 memory_bytes="), "{line}");
        assert!(!line.contains("io_"), "{line}");
    }

    #[test]
    fn summary_names_cpu_peak_and_io() {
        let mut tracker = Tracker::new(None);
        assert_eq!(tracker.describe_summary(), "resource use: no reading");
        let mut sample = memory_sample(LIMIT, LIMIT, 2);
        sample.cpu = Some(CpuUsage {
            total_usec: 123_456,
            ..CpuUsage::default()
        });
        sample.io = Some(IoUsage {
            read_bytes: 1 << 20,
            write_bytes: 0,
        });
        tracker.observe(&sample);
        assert_eq!(
            tracker.describe_summary(),
            "resource use: CPU 0.1234 s, peak memory 64.0 MiB (limit 64.0 MiB), 2 out-of-memory kills, 1.0 MiB read, 0.0 MiB written"
        );
    }

    fn summary(peak: Option<u64>, oom_kills: u64) -> StatsSummary {
        StatsSummary {
            sampled: peak.is_some(),
            peak_memory: peak,
            memory_limit: peak.map(|_| LIMIT),
            oom_kills,
            last: None,
        }
    }

    #[test]
    fn runtime_flag_is_the_strongest_sign() {
        let found = detect_out_of_memory(true, 137, &summary(Some(LIMIT), 1), &NO_KERNEL_LOG, None)
            .unwrap();
        assert_eq!(found.sign, OomSign::RuntimeFlag);
        assert_eq!(found.peak_memory, Some(LIMIT));
        assert_eq!(found.limit, Some(LIMIT));
    }

    #[test]
    fn cgroup_counter_counts_with_nonzero_exit() {
        let found =
            detect_out_of_memory(false, 1, &summary(Some(LIMIT), 2), &NO_KERNEL_LOG, None).unwrap();
        assert_eq!(found.sign, OomSign::CgroupCounter(2));
        assert_eq!(
            found.detail(),
            "peak memory 64.0 MiB, limit 64.0 MiB; detected by: the kernel's out-of-memory killer ended 2 processes in the container's cgroup"
        );
        assert_eq!(
            detect_out_of_memory(false, 0, &summary(Some(LIMIT), 2), &NO_KERNEL_LOG, None),
            None
        );
    }

    #[test]
    fn sigkill_at_the_limit_is_a_weaker_sign() {
        let found = detect_out_of_memory(
            false,
            137,
            &summary(Some(LIMIT - 1024), 0),
            &NO_KERNEL_LOG,
            None,
        )
        .unwrap();
        assert_eq!(found.sign, OomSign::KilledAtLimit);
        assert!(found.detail().contains("weaker sign"), "{}", found.detail());
        // Far below the limit, a SIGKILL came from elsewhere.
        assert_eq!(
            detect_out_of_memory(
                false,
                137,
                &summary(Some(LIMIT / 2), 0),
                &NO_KERNEL_LOG,
                None
            ),
            None
        );
        // No reading: the limit alone proves nothing.
        assert_eq!(
            detect_out_of_memory(false, 137, &summary(None, 0), &NO_KERNEL_LOG, Some(LIMIT)),
            None
        );
    }

    #[test]
    fn runtime_flag_without_reading_uses_the_constraint() {
        let found = detect_out_of_memory(true, 137, &summary(None, 0), &NO_KERNEL_LOG, Some(LIMIT))
            .unwrap();
        assert_eq!(found.limit, Some(LIMIT));
        assert_eq!(
            found.detail(),
            "peak memory unknown (no reading), limit 64.0 MiB; detected by: the container runtime reported an out-of-memory kill"
        );
    }

    #[test]
    fn normal_exit_is_no_oom() {
        assert_eq!(
            detect_out_of_memory(false, 0, &summary(Some(LIMIT), 0), &NO_KERNEL_LOG, None),
            None
        );
        assert_eq!(
            detect_out_of_memory(false, 3, &summary(Some(LIMIT), 0), &NO_KERNEL_LOG, None),
            None
        );
    }

    #[test]
    fn detection_uses_kernel_log_kill() {
        let kernel = KernelOomReport {
            kills: 1,
            usage: Some(LIMIT),
            limit: Some(LIMIT),
            lost_records: false,
        };
        let found = detect_out_of_memory(false, 137, &summary(None, 0), &kernel, None).unwrap();
        assert_eq!(found.sign, OomSign::KernelLog(1));
        assert_eq!(
            found.detail(),
            "peak memory 64.0 MiB, limit 64.0 MiB; detected by: the kernel logged 1 out-of-memory kill in the container's cgroup"
        );
        // The cgroup's own counter, when read, is the stronger sign; the
        // kernel's use at the kill may raise the peak.
        let found =
            detect_out_of_memory(false, 137, &summary(Some(LIMIT / 2), 1), &kernel, None).unwrap();
        assert_eq!(found.sign, OomSign::CgroupCounter(1));
        assert_eq!(found.peak_memory, Some(LIMIT));
        // A process killed while the container went on to exit with 0 is
        // a warning, not a failure.
        assert_eq!(
            detect_out_of_memory(false, 0, &summary(None, 0), &kernel, None),
            None
        );
        let warning = oom_kill_warning(0, &summary(None, 0), &kernel).unwrap();
        assert!(warning.contains("ended 1 process"), "{warning}");
    }

    #[test]
    fn oom_kill_with_exit_zero_is_a_warning() {
        let warning = oom_kill_warning(0, &summary(Some(LIMIT), 1), &NO_KERNEL_LOG).unwrap();
        assert!(
            warning.contains("ended 1 process in the container"),
            "{warning}"
        );
        assert_eq!(
            oom_kill_warning(137, &summary(Some(LIMIT), 1), &NO_KERNEL_LOG),
            None
        );
        assert_eq!(
            oom_kill_warning(0, &summary(Some(LIMIT), 0), &NO_KERNEL_LOG),
            None
        );
    }

    /// A runtime whose container is this test process, so the sampler
    /// reads a real cgroup. Only `pid` is used.
    #[derive(Debug)]
    struct ThisProcess(Option<u32>);

    #[async_trait::async_trait]
    impl Runtime for ThisProcess {
        fn description(&self) -> String {
            "this test process".into()
        }
        async fn ensure_image(
            &self,
            _: &crate::runtime::ImageSource,
        ) -> Result<String, crate::runtime::RuntimeError> {
            unreachable!()
        }
        async fn create(
            &self,
            _: &crate::runtime::ContainerSpec,
        ) -> Result<ContainerId, crate::runtime::RuntimeError> {
            unreachable!()
        }
        async fn attach(
            &self,
            _: &ContainerId,
        ) -> Result<crate::runtime::OutputStream, crate::runtime::RuntimeError> {
            unreachable!()
        }
        async fn start(&self, _: &ContainerId) -> Result<(), crate::runtime::RuntimeError> {
            unreachable!()
        }
        async fn wait(&self, _: &ContainerId) -> Result<i64, crate::runtime::RuntimeError> {
            unreachable!()
        }
        async fn stop(
            &self,
            _: &ContainerId,
            _: Duration,
        ) -> Result<(), crate::runtime::RuntimeError> {
            unreachable!()
        }
        async fn remove(&self, _: &ContainerId) -> Result<(), crate::runtime::RuntimeError> {
            unreachable!()
        }
        async fn pid(&self, _: &ContainerId) -> Result<Option<u32>, crate::runtime::RuntimeError> {
            Ok(self.0)
        }
    }

    /// A sink that keeps each stream's bytes.
    #[derive(Default)]
    struct MemorySink(std::sync::Mutex<Vec<u8>>);

    #[async_trait::async_trait]
    impl crate::logs::LogSink for MemorySink {
        async fn append(
            &self,
            _stream: &str,
            _offset: u64,
            data: Bytes,
        ) -> Result<u64, berth_client::ClientError> {
            let mut stored = self.0.lock().unwrap();
            stored.extend_from_slice(&data);
            Ok(stored.len() as u64)
        }
    }

    async fn sample_for(pid: Option<u32>, running: Duration) -> (StatsSummary, String, String) {
        let sink = Arc::new(MemorySink::default());
        let settings = crate::logs::LogSettings {
            flush_bytes: 1,
            flush_interval: Duration::from_millis(10),
            retry_timeout: Duration::from_secs(1),
            backoff: crate::retry::API_BACKOFF,
        };
        let writer = crate::logs::LogWriter::spawn(sink.clone(), STATS_STREAM, settings);
        let log_sink = Arc::new(MemorySink::default());
        let log_writer = crate::logs::LogWriter::spawn(log_sink.clone(), "supervisor", settings);
        let log = SupervisorLog::new();
        let forward = log.attach(&log_writer);

        let sampler = Sampler::spawn(
            Arc::new(ThisProcess(pid)),
            ContainerId("test".into()),
            writer.input(),
            log.clone(),
            Duration::from_millis(100),
            Some(LIMIT),
        );
        tokio::time::sleep(running).await;
        let summary = sampler.finish().await;

        writer.close().await;
        log.detach();
        forward.await.unwrap();
        log_writer.close().await;
        let lines = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let log_text = String::from_utf8(log_sink.0.lock().unwrap().clone()).unwrap();
        (summary, lines, log_text)
    }

    #[tokio::test]
    async fn sampler_reads_this_process_cgroup() {
        let pid = std::process::id();
        let dirs = CgroupDirs::locate_process(pid).unwrap();
        if dirs.is_empty() {
            eprintln!("skipped: this host shows no cgroup with statistics for process {pid}");
            return;
        }
        let (summary, lines, log) = sample_for(Some(pid), Duration::from_millis(450)).await;
        assert!(summary.sampled, "{log}");
        let kinds: Vec<&str> = lines
            .lines()
            .map(|line| line.split(' ').nth(1).unwrap())
            .collect();
        assert!(kinds.len() >= 2, "a sample and the final line:\n{lines}");
        assert_eq!(kinds.last(), Some(&"final"), "{lines}");
        assert!(
            kinds[..kinds.len() - 1]
                .iter()
                .all(|kind| *kind == "sample"),
            "{lines}"
        );
        assert!(
            log.contains("reading resource statistics every 0.1s"),
            "{log}"
        );
        assert!(log.contains("resource use: "), "{log}");
    }

    #[tokio::test]
    async fn sampler_without_process_writes_nothing() {
        let (summary, lines, log) = sample_for(None, Duration::from_millis(50)).await;
        assert_eq!(summary, StatsSummary::default());
        assert_eq!(lines, "");
        assert!(
            log.contains("WARN no resource statistics: the container runtime reports no process"),
            "{log}"
        );
    }

    #[test]
    fn seconds_have_four_decimals() {
        assert_eq!(seconds(0), "0.0000");
        assert_eq!(seconds(1_234_567), "1.2345");
        assert_eq!(seconds(u64::MAX), "18446744073709.5516");
    }
}
