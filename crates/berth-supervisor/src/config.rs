//! The `supervisor` section of the configuration file.
//!
//! Every key has a default, so an empty section (or none at all) is a
//! working configuration. Durations are written as a number of seconds
//! (`10`, `0.25`) or as a number with a unit (`250ms`, `10s`, `5m`, `1h`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::gpu::GpuDevices;

/// The Docker Engine API socket used when neither the configuration nor
/// `DOCKER_HOST` names one.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// The directory `image_archive_dirs` lists by default.
pub const DEFAULT_IMAGE_ARCHIVE_DIR: &str = "/var/lib/berth/images";

/// The directory `cache_dir` names by default.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/berth/cache";

/// The default of `cache_max_bytes`: 32 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 32 << 30;

/// The directory `image_cache_dir` names by default.
pub const DEFAULT_IMAGE_CACHE_DIR: &str = "/var/lib/berth/image-cache";

/// The container runtime the supervisor runs containers with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The Docker Engine API at `docker_host` (Docker, or Podman's
    /// Docker-compatible socket).
    #[default]
    Docker,
    /// An OCI runtime (`oci_runtime`, crun by default) on a bundle
    /// unpacked from a `docker save` archive.
    Oci,
    /// Singularity or Apptainer through its command line (`singularity`).
    Singularity,
    /// Docker if its socket replies to `/_ping`, else the OCI runtime if
    /// `oci_runtime` is found, else Singularity or Apptainer.
    Auto,
}

/// The directory `journal_dir` names by default.
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/berth/journal";

/// The `supervisor` section of the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The container runtime: `docker`, `oci`, `singularity` or `auto`.
    /// `auto` picks Docker if the `docker_host` socket replies to
    /// `/_ping`, else the OCI runtime if `oci_runtime` is found, else
    /// Singularity or Apptainer. The `oci` and `singularity` runtimes
    /// take images only as `docker save` archives. Default `docker`.
    pub runtime: RuntimeKind,
    /// The OCI runtime program of the `oci` runtime: a name looked up on
    /// `PATH`, such as `crun` or `runc`, or an absolute path. Default
    /// `crun`.
    pub oci_runtime: PathBuf,
    /// The program of the `singularity` runtime: a name looked up on
    /// `PATH` or an absolute path. When unset, `singularity` and then
    /// `apptainer` are looked up on `PATH`.
    pub singularity: Option<PathBuf>,
    /// Absolute path of the node's image cache: the root filesystems the
    /// `oci` runtime unpacks and the SIF files the `singularity` runtime
    /// builds, each kept under the image ID so that later containers of
    /// the same image reuse it. Its `rootfs` and `sif` subdirectories are
    /// made readable by the supervisor's user only. Nothing removes old
    /// entries. Default `/var/lib/berth/image-cache`.
    #[serde(deserialize_with = "absolute_dir::deserialize")]
    pub image_cache_dir: PathBuf,
    /// Docker Engine API endpoint, such as `unix:///run/podman/podman.sock`
    /// or `tcp://127.0.0.1:2375`. When unset, `DOCKER_HOST` is used, and
    /// then `unix:///var/run/docker.sock`.
    pub docker_host: Option<String>,
    /// Podman's command line, a name looked up on `PATH` or an absolute
    /// path, with which the gateway's execs (`berth shell UUID`, `ssh ...
    /// COMMAND`) go around Podman's slow exec API when the `docker`
    /// runtime's engine is Podman behind a Unix socket on this node. Once
    /// `podman container inspect` finds the container under the same ID,
    /// its execs run through Podman's OCI runtime directly (see
    /// `podman_runtime_exec`), or else, without a terminal, through
    /// `podman exec`. Podman 4.3's exec API moved 260 to 300 MiB/s in a
    /// test, and `podman exec` 550. `null` keeps every exec on the API.
    /// Default `podman`.
    pub podman_command: Option<PathBuf>,
    /// Whether the gateway's execs in a Podman container run through
    /// Podman's OCI runtime, with or without a terminal, as the `oci`
    /// runtime runs its own. That is `crun exec` with the container's own
    /// process settings, and neither Podman's service, nor conmon, nor
    /// `podman exec` is on the path. Used only by a supervisor that runs
    /// as root, with a root Podman that names crun as the container's
    /// runtime, when `crun state` in `/run/crun` shows the container
    /// running with Podman's PID and the state and bundle belong to root
    /// alone. An exec that crun fails to start goes through the API.
    /// Needs `podman_command`. Default true.
    pub podman_runtime_exec: bool,
    /// Grace period between the polite stop signal (the image's stop
    /// signal, normally SIGTERM) and SIGKILL when a container is stopped.
    /// Default 10 s.
    #[serde(deserialize_with = "duration::deserialize")]
    pub stop_timeout: Duration,
    /// Docker network mode for containers that may use the network
    /// (`runtime_constraints.API` is true), such as `bridge` or `host`.
    /// When unset the runtime's default network is used. Containers
    /// without `API` always get network mode `none`.
    pub network_mode: Option<String>,
    /// Absolute paths of the directories from which `docker save` archives
    /// may be loaded. A `container_image` that is an absolute path is used
    /// only if, with symlinks resolved, it is a regular file inside one of
    /// them. Any other path cancels the container. An empty list turns
    /// archives off. Default `["/var/lib/berth/images"]`.
    #[serde(deserialize_with = "absolute_dirs::deserialize")]
    pub image_archive_dirs: Vec<PathBuf>,
    /// Whether an image name that the runtime's image store does not hold
    /// is pulled from its registry. Pulling lets a container's owner make
    /// the node contact any registry host and port, so it is off by
    /// default, and images then come from the store or from an archive in
    /// `image_archive_dirs`. Default false.
    pub pull_images: bool,
    /// Directory under which the supervisor creates the host side of `tmp`
    /// mounts and the files of `json` and `text` mounts. When unset,
    /// `TMPDIR` is used, and then `/tmp`.
    pub temp_dir: Option<PathBuf>,
    /// How long ordinary API calls (fetching the container, setting
    /// `Running`) are retried after transient failures. Default 2 min.
    #[serde(deserialize_with = "duration::deserialize")]
    pub api_retry_timeout: Duration,
    /// How long the final phase keeps trying to deliver the final state
    /// (`Complete` or `Cancelled`) with its output and log collections
    /// while the controller cannot be reached. The batch job stays alive
    /// meanwhile, so this is meant to outlast any controller outage. When
    /// the batch system's time limit comes first, it ends the job, and the
    /// entry in `journal_dir` is delivered later. Default 24 h.
    #[serde(deserialize_with = "duration::deserialize")]
    pub final_update_timeout: Duration,
    /// Maximum delay between two attempts of the final phase. The cap of
    /// the delay starts at 1 s and doubles with each attempt up to this
    /// value. Each delay is drawn at random from zero to the cap (full
    /// jitter), so the supervisors of a cluster do not all retry at the
    /// same moments once the controller is back. Default 60 s.
    #[serde(deserialize_with = "duration::deserialize")]
    pub final_retry_max_delay: Duration,
    /// Absolute path of the directory of the final-state journal (created
    /// with mode 0700; a directory that other users may enter is
    /// rejected). Before the supervisor first tries to record a final
    /// state, it writes the state, exit code, `runtime_status` and the
    /// output and log there: their portable data hashes, or the files
    /// themselves when they could not be uploaded yet. The entry is
    /// removed once the controller recorded the final state. Entries left
    /// by a killed supervisor are delivered by the next `berth supervise`
    /// on the node, or by `berth supervise --deliver-journal`. An entry
    /// stores the path of the container's credentials file, never the
    /// token. `null` turns the journal off. Default
    /// `/var/lib/berth/journal`.
    #[serde(deserialize_with = "optional_absolute_dir::deserialize")]
    pub journal_dir: Option<PathBuf>,
    /// How often the supervisor reads its own container record while the
    /// container runs, to stop it when the controller cancelled it
    /// (`priority` 0 or state `Cancelled`) even when the batch system's
    /// signal never arrives. A failed read is logged and never stops the
    /// container. 0 turns the check off. Default 30 s.
    #[serde(deserialize_with = "duration::deserialize")]
    pub cancel_check_interval: Duration,
    /// A log stream's buffer is sent to the controller once it reaches
    /// this many bytes. Default 65536 (64 KiB).
    pub log_flush_bytes: usize,
    /// A log stream's buffer is sent to the controller at most this long
    /// after its first unsent byte arrived. Default 250 ms.
    #[serde(deserialize_with = "duration::deserialize")]
    pub log_flush_interval: Duration,
    /// How long one log append is retried after transient failures before
    /// the stream gives up. A stream that gave up counts and drops its
    /// remaining bytes, and the final state records a warning. Default
    /// 5 min.
    #[serde(deserialize_with = "duration::deserialize")]
    pub log_retry_timeout: Duration,
    /// How long to wait for the container's output streams to end after
    /// the container exited. Default 60 s.
    #[serde(deserialize_with = "duration::deserialize")]
    pub output_drain_timeout: Duration,
    /// The form of the container runtime's GPU request. `docker`, the
    /// default, sends Docker's `--gpus` request (NVIDIA Container Toolkit)
    /// for CUDA and binds the `/dev/kfd` and `/dev/dri` device files for
    /// ROCm. `cdi` sends CDI device names in a `DeviceRequests` entry
    /// (Docker Engine 25 and later). `podman_cdi` sends them as devices, as
    /// `podman run --device nvidia.com/gpu=all` does.
    pub gpu_devices: GpuDevices,
    /// Size in bytes of the blocks that the output and log collections
    /// are written in, from 1 to 67108864 (64 MiB, Keep's block size).
    /// Smaller blocks cost more requests. Default 67108864.
    #[serde(deserialize_with = "block_size::deserialize")]
    pub block_size: usize,
    /// How often the log collection is saved and the container's `log`
    /// field updated while the container runs, so a lost node keeps its
    /// logs up to then. The last save comes just before the final state.
    /// Default 60 s.
    #[serde(deserialize_with = "duration::deserialize")]
    pub log_checkpoint_interval: Duration,
    /// Largest total size in bytes of the files saved as the output. A
    /// larger output cancels the container with an error naming both
    /// sizes, before any block is written. 0 means no limit. Default 0.
    pub max_output_bytes: u64,
    /// Absolute path of the node's collection cache: the collections of
    /// `collection` and `file` mounts and of images stored in
    /// collections, kept by portable data hash and shared by the
    /// containers of the node. Created with mode 0700 if missing. Default
    /// `/var/lib/berth/cache`.
    #[serde(deserialize_with = "absolute_dir::deserialize")]
    pub cache_dir: PathBuf,
    /// Largest total size in bytes of the collections in `cache_dir`.
    /// Before a collection is fetched, the least recently used entries
    /// that no running container uses are removed until it fits. Entries
    /// in use stay, so the cache can exceed this while they run. A
    /// collection larger than this cancels its container. Default
    /// 34359738368 (32 GiB).
    pub cache_max_bytes: u64,
    /// How often a line of the container's resource use (CPU time,
    /// memory, block I/O, network) is written to its `crunchstat` log
    /// stream and `crunchstat.txt`, read from its cgroup. A last line
    /// follows its exit. 0 turns the statistics off, and with them the
    /// memory warnings and the cgroup's sign of an out-of-memory kill.
    /// Other values must be at least 100 ms. Default 10 s.
    #[serde(deserialize_with = "stats_interval::deserialize")]
    pub stats_interval: Duration,
    /// Maximum SSH connections the container's gateway serves at once;
    /// one more is closed before its SSH handshake. Must be at least 1.
    /// Default 32.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub gateway_max_connections: usize,
    /// Maximum session channels one SSH connection to the gateway may
    /// have open at once (such as shells multiplexed by OpenSSH's
    /// `ControlMaster`); one more is rejected. Must be at least 1.
    /// Default 10.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub gateway_max_channels_per_connection: usize,
    /// The SFTP server of the gateway's `sftp` subsystem. Not a key of
    /// the file: `berth supervise` sets it to its own `berth sftp-server`.
    /// `None` rejects the subsystem.
    #[serde(skip)]
    pub gateway_sftp_server: Option<crate::gateway::SftpServerCommand>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            runtime: RuntimeKind::default(),
            oci_runtime: PathBuf::from("crun"),
            singularity: None,
            image_cache_dir: PathBuf::from(DEFAULT_IMAGE_CACHE_DIR),
            docker_host: None,
            podman_command: Some(PathBuf::from("podman")),
            podman_runtime_exec: true,
            stop_timeout: Duration::from_secs(10),
            network_mode: None,
            image_archive_dirs: vec![PathBuf::from(DEFAULT_IMAGE_ARCHIVE_DIR)],
            pull_images: false,
            temp_dir: None,
            api_retry_timeout: Duration::from_secs(120),
            final_update_timeout: Duration::from_secs(24 * 3600),
            final_retry_max_delay: Duration::from_secs(60),
            journal_dir: Some(PathBuf::from(DEFAULT_JOURNAL_DIR)),
            cancel_check_interval: Duration::from_secs(30),
            log_flush_bytes: 64 * 1024,
            log_flush_interval: Duration::from_millis(250),
            log_retry_timeout: Duration::from_secs(300),
            output_drain_timeout: Duration::from_secs(60),
            gpu_devices: GpuDevices::default(),
            block_size: crate::output::MAX_BLOCK_SIZE,
            log_checkpoint_interval: Duration::from_secs(60),
            max_output_bytes: 0,
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            stats_interval: Duration::from_secs(10),
            gateway_max_connections: crate::gateway::DEFAULT_MAX_CONNECTIONS,
            gateway_max_channels_per_connection:
                crate::gateway::DEFAULT_MAX_CHANNELS_PER_CONNECTION,
            gateway_sftp_server: None,
        }
    }
}

impl Config {
    /// Returns the Docker Engine API endpoint: `docker_host`, else
    /// `DOCKER_HOST`, else [`DEFAULT_DOCKER_HOST`].
    pub fn resolve_docker_host(&self) -> String {
        resolve_docker_host(
            self.docker_host.as_deref(),
            std::env::var("DOCKER_HOST").ok(),
        )
    }

    /// Returns the directory for mount data: `temp_dir`, else the system's
    /// temporary directory.
    pub fn resolve_temp_dir(&self) -> PathBuf {
        self.temp_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

fn resolve_docker_host(configured: Option<&str>, environment: Option<String>) -> String {
    configured
        .filter(|host| !host.is_empty())
        .map(str::to_string)
        .or_else(|| environment.filter(|host| !host.is_empty()))
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string())
}

/// A statistics interval: 0 (off) or at least 100 ms.
mod stats_interval {
    use std::time::Duration;

    use serde::Deserializer;

    /// The shortest interval between statistics lines, so the log stream
    /// stays readable and the cgroup reads stay cheap.
    pub const MIN_STATS_INTERVAL: Duration = Duration::from_millis(100);

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let interval = super::duration::deserialize(deserializer)?;
        if !interval.is_zero() && interval < MIN_STATS_INTERVAL {
            return Err(serde::de::Error::custom(format!(
                "invalid stats_interval {interval:?}: expected 0 (off) or at least 100ms"
            )));
        }
        Ok(interval)
    }
}

/// A count that must be at least 1.
mod at_least_one {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
        let count = usize::deserialize(deserializer)?;
        if count == 0 {
            return Err(serde::de::Error::custom(
                "invalid limit 0: expected at least 1",
            ));
        }
        Ok(count)
    }
}

/// A block size from 1 byte to 64 MiB.
mod block_size {
    use serde::{Deserialize, Deserializer};

    use crate::output::MAX_BLOCK_SIZE;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
        let size = usize::deserialize(deserializer)?;
        if size == 0 || size > MAX_BLOCK_SIZE {
            return Err(serde::de::Error::custom(format!(
                "invalid block_size {size}: expected a number of bytes from 1 to {MAX_BLOCK_SIZE}"
            )));
        }
        Ok(size)
    }
}

/// A list of directories, each of which must be an absolute path.
mod absolute_dirs {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<PathBuf>, D::Error> {
        let dirs = Vec::<PathBuf>::deserialize(deserializer)?;
        if let Some(relative) = dirs.iter().find(|dir| !dir.is_absolute()) {
            return Err(serde::de::Error::custom(format!(
                "invalid directory {:?}: expected an absolute path such as /var/lib/berth/images",
                relative.display().to_string()
            )));
        }
        Ok(dirs)
    }
}

/// A directory that must be an absolute path.
mod absolute_dir {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
        let dir = PathBuf::deserialize(deserializer)?;
        if !dir.is_absolute() {
            return Err(serde::de::Error::custom(format!(
                "invalid directory {:?}: expected an absolute path such as /var/lib/berth/cache",
                dir.display().to_string()
            )));
        }
        Ok(dir)
    }
}

/// An optional directory, which must be an absolute path when given.
mod optional_absolute_dir {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        let dir = Option::<PathBuf>::deserialize(deserializer)?;
        if let Some(relative) = dir.as_ref().filter(|dir| !dir.is_absolute()) {
            return Err(serde::de::Error::custom(format!(
                "invalid directory {:?}: expected an absolute path such as /var/lib/berth/journal, or null",
                relative.display().to_string()
            )));
        }
        Ok(dir)
    }
}

/// Durations written as seconds or as a number with a unit.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Parses `250ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let invalid = || {
            format!("invalid duration {text:?}: expected a number with an optional unit ms, s, m or h, for example 10s")
        };
        let value: f64 = number.parse().map_err(|_| invalid())?;
        let seconds = match unit.trim() {
            "ms" => value / 1000.0,
            "" | "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(invalid()),
        };
        Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Seconds(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        match Written::deserialize(deserializer)? {
            Written::Seconds(seconds) => Duration::try_from_secs_f64(seconds).map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid duration {seconds}: expected a non-negative number of seconds"
                ))
            }),
            Written::Text(text) => parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_devices_parse() {
        for (text, expected) in [
            ("docker", GpuDevices::Docker),
            ("cdi", GpuDevices::Cdi),
            ("podman_cdi", GpuDevices::PodmanCdi),
        ] {
            let config: Config = serde_yaml::from_str(&format!("gpu_devices: {text}")).unwrap();
            assert_eq!(config.gpu_devices, expected);
        }
        let err = serde_yaml::from_str::<Config>("gpu_devices: nvidia").unwrap_err();
        assert!(err.to_string().contains("podman_cdi"), "{err}");
    }

    #[test]
    fn empty_section_gives_defaults() {
        let config: Config = serde_yaml::from_str("{}").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.stop_timeout, Duration::from_secs(10));
        assert_eq!(config.final_update_timeout, Duration::from_secs(24 * 3600));
        assert_eq!(config.log_flush_bytes, 65536);
        assert_eq!(
            config.image_archive_dirs,
            vec![PathBuf::from("/var/lib/berth/images")]
        );
        assert!(!config.pull_images);
    }

    #[test]
    fn image_archive_dirs_and_pulls_are_read() {
        let config: Config = serde_yaml::from_str(
            "image_archive_dirs: [/srv/images, /scratch/images]\npull_images: true\n",
        )
        .unwrap();
        assert_eq!(
            config.image_archive_dirs,
            vec![
                PathBuf::from("/srv/images"),
                PathBuf::from("/scratch/images")
            ]
        );
        assert!(config.pull_images);
        let none: Config = serde_yaml::from_str("image_archive_dirs: []\n").unwrap();
        assert!(none.image_archive_dirs.is_empty());
    }

    #[test]
    fn gateway_limits_are_read() {
        let config: Config = serde_yaml::from_str(
            "gateway_max_connections: 3\ngateway_max_channels_per_connection: 2\n",
        )
        .unwrap();
        assert_eq!(config.gateway_max_connections, 3);
        assert_eq!(config.gateway_max_channels_per_connection, 2);
    }

    #[test]
    fn zero_gateway_limit_is_rejected() {
        for key in [
            "gateway_max_connections",
            "gateway_max_channels_per_connection",
        ] {
            let error = serde_yaml::from_str::<Config>(&format!("{key}: 0\n")).unwrap_err();
            assert!(
                error.to_string().contains("invalid limit 0"),
                "{key}: {error}"
            );
        }
    }

    #[test]
    fn relative_image_archive_dir_is_rejected() {
        let err = serde_yaml::from_str::<Config>("image_archive_dirs: [images]\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("\"images\""), "{message}");
        assert!(message.contains("absolute path"), "{message}");
    }

    #[test]
    fn durations_accept_units_and_seconds() {
        let config: Config = serde_yaml::from_str(
            "stop_timeout: 2\nlog_flush_interval: 100ms\nfinal_update_timeout: 10m\napi_retry_timeout: 0.5\n",
        )
        .unwrap();
        assert_eq!(config.stop_timeout, Duration::from_secs(2));
        assert_eq!(config.log_flush_interval, Duration::from_millis(100));
        assert_eq!(config.final_update_timeout, Duration::from_secs(600));
        assert_eq!(config.api_retry_timeout, Duration::from_millis(500));
    }

    #[test]
    fn bad_duration_names_the_value() {
        let err = serde_yaml::from_str::<Config>("stop_timeout: 10 parsecs\n").unwrap_err();
        assert!(err.to_string().contains("10 parsecs"), "{err}");
        assert!(duration::parse("-1s").is_err());
        assert!(duration::parse("").is_err());
    }

    #[test]
    fn collection_keys_are_read() {
        let config: Config = serde_yaml::from_str(
            "block_size: 1024\nlog_checkpoint_interval: 5s\nmax_output_bytes: 1000000",
        )
        .unwrap();
        assert_eq!(config.block_size, 1024);
        assert_eq!(config.log_checkpoint_interval, Duration::from_secs(5));
        assert_eq!(config.max_output_bytes, 1_000_000);
        assert_eq!(Config::default().block_size, 64 << 20);
    }

    #[test]
    fn stats_interval_is_off_or_long_enough() {
        let read = |text: &str| serde_yaml::from_str::<Config>(text);
        assert_eq!(Config::default().stats_interval, Duration::from_secs(10));
        assert_eq!(
            read("stats_interval: 0").unwrap().stats_interval,
            Duration::ZERO
        );
        assert_eq!(
            read("stats_interval: 250ms").unwrap().stats_interval,
            Duration::from_millis(250)
        );
        let error = read("stats_interval: 10ms").unwrap_err().to_string();
        assert!(error.contains("invalid stats_interval 10ms"), "{error}");
        assert!(error.contains("at least 100ms"), "{error}");
    }

    #[test]
    fn block_size_out_of_range_is_rejected() {
        for bad in ["0", "67108865"] {
            let error = serde_yaml::from_str::<Config>(&format!("block_size: {bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("invalid block_size {bad}")),
                "{error}"
            );
        }
    }

    #[test]
    fn cache_keys_are_read() {
        let config: Config =
            serde_yaml::from_str("cache_dir: /scratch/berth-cache\ncache_max_bytes: 1000\n")
                .unwrap();
        assert_eq!(config.cache_dir, PathBuf::from("/scratch/berth-cache"));
        assert_eq!(config.cache_max_bytes, 1000);
        assert_eq!(
            Config::default().cache_dir,
            PathBuf::from("/var/lib/berth/cache")
        );
        let error = serde_yaml::from_str::<Config>("cache_dir: cache\n").unwrap_err();
        assert!(error.to_string().contains("absolute path"), "{error}");
    }

    #[test]
    fn runtime_keys_are_read() {
        let config: Config = serde_yaml::from_str(
            "runtime: oci\noci_runtime: /usr/bin/runc\nsingularity: apptainer\nimage_cache_dir: /scratch/cache\n",
        )
        .unwrap();
        assert_eq!(config.runtime, RuntimeKind::Oci);
        assert_eq!(config.oci_runtime, PathBuf::from("/usr/bin/runc"));
        assert_eq!(config.singularity, Some(PathBuf::from("apptainer")));
        assert_eq!(config.image_cache_dir, PathBuf::from("/scratch/cache"));
        for (text, kind) in [
            ("docker", RuntimeKind::Docker),
            ("singularity", RuntimeKind::Singularity),
            ("auto", RuntimeKind::Auto),
        ] {
            let config: Config = serde_yaml::from_str(&format!("runtime: {text}")).unwrap();
            assert_eq!(config.runtime, kind);
        }
        assert_eq!(Config::default().runtime, RuntimeKind::Docker);
        assert_eq!(Config::default().oci_runtime, PathBuf::from("crun"));
    }

    #[test]
    fn bad_runtime_keys_are_rejected() {
        let err = serde_yaml::from_str::<Config>("runtime: lxc\n").unwrap_err();
        assert!(err.to_string().contains("lxc"), "{err}");
        let err = serde_yaml::from_str::<Config>("image_cache_dir: cache\n").unwrap_err();
        assert!(err.to_string().contains("\"cache\""), "{err}");
    }

    #[test]
    fn journal_keys_are_read() {
        let config: Config = serde_yaml::from_str(
            "journal_dir: /srv/journal\nfinal_retry_max_delay: 5s\ncancel_check_interval: 2s\n",
        )
        .unwrap();
        assert_eq!(config.journal_dir, Some(PathBuf::from("/srv/journal")));
        assert_eq!(config.final_retry_max_delay, Duration::from_secs(5));
        assert_eq!(config.cancel_check_interval, Duration::from_secs(2));
        let defaults = Config::default();
        assert_eq!(
            defaults.journal_dir,
            Some(PathBuf::from(DEFAULT_JOURNAL_DIR))
        );
        let off: Config = serde_yaml::from_str("journal_dir: null\n").unwrap();
        assert_eq!(off.journal_dir, None);
    }

    #[test]
    fn relative_journal_dir_is_rejected() {
        let err = serde_yaml::from_str::<Config>("journal_dir: journal\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("\"journal\""), "{message}");
        assert!(message.contains("absolute path"), "{message}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = serde_yaml::from_str::<Config>("stop_timeot: 3\n").unwrap_err();
        assert!(err.to_string().contains("stop_timeot"), "{err}");
    }

    #[test]
    fn docker_host_prefers_config_then_environment() {
        assert_eq!(
            resolve_docker_host(Some("unix:///a.sock"), Some("unix:///b.sock".into())),
            "unix:///a.sock"
        );
        assert_eq!(
            resolve_docker_host(None, Some("unix:///b.sock".into())),
            "unix:///b.sock"
        );
        assert_eq!(resolve_docker_host(None, None), DEFAULT_DOCKER_HOST);
        assert_eq!(
            resolve_docker_host(Some(""), Some(String::new())),
            DEFAULT_DOCKER_HOST
        );
    }
}
