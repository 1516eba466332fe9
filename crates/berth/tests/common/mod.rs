//! A whole Berth cluster for end-to-end tests: a controller and a
//! dispatcher as separate `berth` processes, on real Slurm (or the local
//! backend, or the LSF stand-ins) and real Podman, with a SQLite database
//! in a temporary directory.
//!
//! LSF cannot be installed here. With the backend `lsf`, the cluster
//! installs the stand-in `bsub`, `bjobs`, `bkill` and `bmod` scripts of
//! `berth-dispatch/tests/lsf-stand-ins` in `DIR/lsf/bin`. They print LSF's
//! output formats and keep the jobs' state in `DIR/lsf/state`; a test
//! starts pending jobs with the stand-in scheduler `lsf-run-pending`.
//!
//! These tests run only when `BERTH_INTEGRATION=1`, which `scripts/test.sh`
//! sets after it has started Slurm and Podman; elsewhere they print
//! "skipped" and pass. Each cluster gets a random cluster id, so the
//! dispatchers of tests that run at the same time never take each other's
//! Slurm jobs for orphans.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

pub mod netns;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_client::{Client, Settings, Token};
use rand::Rng;

pub mod controllers;

/// How long a test waits for the controller to print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns true (after saying so) when the integration environment is
/// absent and the test should pass without running.
pub fn skip() -> bool {
    if std::env::var("BERTH_INTEGRATION").as_deref() == Ok("1") {
        return false;
    }
    eprintln!("skipped: set BERTH_INTEGRATION=1 (scripts/test.sh does) to run against real Slurm and Podman");
    true
}

pub fn test_image() -> String {
    std::env::var("BERTH_TEST_IMAGE").unwrap_or_else(|_| "localhost/busybox:latest".into())
}

pub fn berth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_berth")
}

/// The dispatcher's intervals, whether it follows the change feed, and
/// its lease timing.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub poll_interval: Duration,
    pub resync_interval: Duration,
    pub watch: bool,
    /// `lease_ttl` and `lease_renew_interval`; `None` keeps the
    /// dispatcher's defaults.
    pub lease: Option<(Duration, Duration)>,
}

impl Default for DispatchSettings {
    /// Short intervals, so that what only a poll notices (a vanished job)
    /// shows within seconds, and a short lease, so that a dispatcher
    /// restarted after a SIGKILL takes the lease back within seconds.
    fn default() -> DispatchSettings {
        DispatchSettings {
            poll_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(10),
            watch: true,
            lease: Some((Duration::from_secs(3), Duration::from_secs(1))),
        }
    }
}

/// A dispatcher process besides the cluster's own, killed with SIGKILL
/// when dropped.
pub struct DispatcherProcess {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
}

impl DispatcherProcess {
    /// Kills it with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("failed to kill a dispatcher");
            child.wait().expect("failed to reap a dispatcher");
        }
    }

    /// Stops it with SIGTERM and waits for its exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
                .expect("failed to send SIGTERM to a dispatcher");
            child.wait().expect("failed to reap a dispatcher");
        }
    }

    /// Returns its log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DispatcherProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a test cluster is set up.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    pub dispatch: DispatchSettings,
    /// Log every request the controller completes, with its method and
    /// route, for [`TestCluster::count_requests`].
    pub log_requests: bool,
    /// Extra keys of the `supervisor` section, one `key: value` per line.
    pub supervisor: Vec<String>,
    /// Extra keys of the `controller` section, one `key: value` per line.
    pub controller: Vec<String>,
    /// The controllers' database; `None` makes a SQLite file in the
    /// cluster's directory.
    pub database_url: Option<String>,
    /// The address the controller listens on, with port 0. `None` is
    /// 127.0.0.1. A compute node in a network namespace needs the address
    /// of its link to the root namespace.
    pub listen_address: Option<std::net::IpAddr>,
    /// Program and arguments that run the dispatcher's command line, such
    /// as `ip netns exec NAMESPACE`. Empty runs the dispatcher directly.
    pub dispatcher_prefix: Vec<String>,
}

/// A running controller and dispatcher.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub cluster_id: String,
    pub config: PathBuf,
    pub api_url: String,
    pub system_token: String,
    controller: Child,
    dispatcher: Option<Child>,
    dispatcher_prefix: Vec<String>,
    backend: String,
}

impl TestCluster {
    /// Starts a controller and a dispatcher with the given backend
    /// (`slurm`, `lsf` or `local`).
    pub fn start(backend: &str) -> TestCluster {
        TestCluster::start_with(backend, &ClusterOptions::default())
    }

    /// Starts a controller and a dispatcher with the given backend and
    /// options.
    pub fn start_with(backend: &str, options: &ClusterOptions) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir()
            .expect("failed to make a temporary directory");
        let cluster_id = random_cluster_id();
        let system_token: String = random_alnum(40);
        let token_file = dir.path().join("system-token");
        write_private(&token_file, &system_token);
        let config = dir.path().join("config.yml");
        if backend == "lsf" {
            install_lsf_stand_ins(&dir.path().join("lsf"));
        }
        write_config(&config, &cluster_id, &token_file, dir.path(), None, options);

        let mut command = Command::new(berth_bin());
        command.args(["controller", "--config"]).arg(&config);
        if options.log_requests {
            // The controller logs each completed request at debug level.
            command.env("RUST_LOG", "info,berth_controller::api=debug");
        }
        let mut controller = command
            .stdout(Stdio::piped())
            .stderr(log_file(dir.path(), "controller.log"))
            .spawn()
            .expect("failed to start berth controller");
        let stdout = controller.stdout.take().expect("controller stdout");
        let api_url = wait_for_address(stdout, dir.path());

        write_config(
            &config,
            &cluster_id,
            &token_file,
            dir.path(),
            Some((&api_url, backend)),
            options,
        );
        let mut cluster = TestCluster {
            dir,
            cluster_id,
            config,
            api_url,
            system_token,
            controller,
            dispatcher: None,
            dispatcher_prefix: options.dispatcher_prefix.clone(),
            backend: backend.to_string(),
        };
        cluster.start_dispatcher();
        cluster
    }

    pub fn start_dispatcher(&mut self) {
        assert!(
            self.dispatcher.is_none(),
            "the dispatcher is already running"
        );
        // Its own process group, so that kill_dispatcher_group reaches the
        // commands it runs. A prefix such as `ip netns exec` execs berth,
        // so the child's pid is the dispatcher's.
        let mut command = match self.dispatcher_prefix.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(berth_bin());
                command
            }
            None => Command::new(berth_bin()),
        };
        let child = command
            .args(["dispatch", "--config"])
            .arg(&self.config)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(append_log_file(self.dir.path(), "dispatch.log"))
            .spawn()
            .expect("failed to start berth dispatch");
        self.dispatcher = Some(child);
    }

    /// Starts one more dispatcher on the cluster's configuration, logging
    /// to `log_name` in the cluster's directory.
    pub fn spawn_dispatcher(&self, log_name: &str) -> DispatcherProcess {
        let child = Command::new(berth_bin())
            .args(["dispatch", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), log_name))
            .spawn()
            .expect("failed to start berth dispatch");
        DispatcherProcess {
            child: Some(child),
            log: self.dir.path().join(log_name),
        }
    }

    /// Returns the log of the cluster's own dispatcher (all its runs).
    pub fn dispatcher_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dispatch.log")).unwrap_or_default()
    }

    /// Kills the dispatcher with SIGKILL, as a crash would.
    pub fn kill_dispatcher(&mut self) {
        if let Some(mut child) = self.dispatcher.take() {
            child.kill().expect("failed to kill the dispatcher");
            child.wait().expect("failed to reap the dispatcher");
        }
    }

    /// Kills the dispatcher and the batch commands it runs (its process
    /// group) with SIGKILL, as a service manager does when the dispatcher
    /// dies.
    pub fn kill_dispatcher_group(&mut self) {
        if let Some(mut child) = self.dispatcher.take() {
            let group = format!("-{}", child.id());
            let status = Command::new("kill")
                .args(["-KILL", "--", &group])
                .status()
                .expect("failed to run kill");
            assert!(status.success(), "kill -KILL -- {group} failed: {status}");
            child.wait().expect("failed to reap the dispatcher");
        }
    }

    /// Stops the controller with SIGTERM and waits for its exit.
    pub fn stop_controller(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.controller.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .expect("failed to send SIGTERM to the controller");
        self.controller
            .wait()
            .expect("failed to reap the controller");
    }

    /// Starts the controller again on the port it had, with the same
    /// database and block directory, and waits until it listens.
    pub fn restart_controller(&mut self) {
        let address = self
            .api_url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .expect("the API URL has a host and port")
            .to_string();
        let text = std::fs::read_to_string(&self.config).expect("failed to read the configuration");
        let text: String = text
            .lines()
            .map(|line| match line.strip_prefix("  listen: ") {
                Some(_) => format!("  listen: {address}\n"),
                None => format!("{line}\n"),
            })
            .collect();
        std::fs::write(&self.config, text).expect("failed to write the configuration");
        let mut controller = Command::new(berth_bin())
            .args(["controller", "--config"])
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(append_log_file(self.dir.path(), "controller.log"))
            .spawn()
            .expect("failed to start berth controller");
        let stdout = controller.stdout.take().expect("controller stdout");
        let api_url = wait_for_address(stdout, self.dir.path());
        assert_eq!(
            api_url, self.api_url,
            "the restarted controller listens elsewhere"
        );
        self.controller = controller;
    }

    /// Returns the directory of the supervisors' final-state journal.
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.path().join("journal")
    }

    /// Returns a client that acts with the system token.
    pub fn system_client(&self) -> Client {
        client(&self.api_url, &self.system_token)
    }

    /// Creates a user with `berth admin create-user` and returns its token.
    pub fn create_user(&self, name: &str) -> String {
        create_user_with(&self.config, name)
    }

    /// Runs a user command of the CLI against this cluster.
    pub fn berth(&self, token: &str, args: &[&str]) -> Output {
        self.berth_command(token, args)
            .output()
            .expect("failed to run berth")
    }

    pub fn berth_command(&self, token: &str, args: &[&str]) -> Command {
        berth_command_at(&self.api_url, token, args)
    }

    /// Counts the requests with `method` to `route` (such as
    /// `/arvados/v1/containers`, a list) that the controller has completed.
    /// Needs [`ClusterOptions::log_requests`].
    pub fn count_requests(&self, method: &str, route: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("controller.log"))
            .expect("failed to read the controller's log");
        // The span may carry more fields after the route (the request id).
        let span = format!("http{{method={method} route=\"{route}\"");
        log.lines()
            .filter(|line| {
                line.contains(" answered ")
                    && line
                        .split(&span)
                        .nth(1)
                        .is_some_and(|rest| rest.starts_with('}') || rest.starts_with(' '))
            })
            .count()
    }

    /// Returns the last lines of the controller's and dispatcher's logs, for
    /// failure messages.
    pub fn logs(&self) -> String {
        log_tails(
            ["controller.log", "dispatch.log"]
                .map(|name| (name.to_string(), self.dir.path().join(name))),
        )
    }
}

/// A cluster whose logs a failing test prints.
pub trait ClusterLogs {
    /// Returns the last lines of the cluster's logs.
    fn logs(&self) -> String;
}

impl ClusterLogs for TestCluster {
    fn logs(&self) -> String {
        TestCluster::logs(self)
    }
}

/// Returns the last 40 lines of each named log file.
fn log_tails(files: impl IntoIterator<Item = (String, PathBuf)>) -> String {
    let mut text = String::new();
    for (name, path) in files {
        let content = std::fs::read_to_string(path).unwrap_or_default();
        let tail: Vec<&str> = content.lines().rev().take(40).collect();
        text.push_str(&format!("--- {name} (last lines) ---\n"));
        for line in tail.into_iter().rev() {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.kill_dispatcher();
        let _ = self.controller.kill();
        let _ = self.controller.wait();
        if self.backend == "lsf" {
            stop_lsf_jobs(&self.dir.path().join("lsf/state"));
        }
        if self.backend == "local" {
            stop_local_supervisors(&self.dir.path().join("credentials"), &self.cluster_id);
        }
        // Cancel whatever Slurm jobs this cluster left, by name prefix.
        if self.backend == "slurm" {
            if let Ok(output) = Command::new("squeue")
                .args(["--noheader", "--format=%i %j"])
                .output()
            {
                for line in String::from_utf8_lossy(&output.stdout).lines() {
                    let mut parts = line.split_whitespace();
                    if let (Some(id), Some(name)) = (parts.next(), parts.next()) {
                        if name.starts_with(&format!("{}-", self.cluster_id)) {
                            let _ = Command::new("scancel").arg(id).status();
                        }
                    }
                }
            }
        }
    }
}

/// Creates a user with `berth admin create-user` on the database of the
/// configuration file `config` and returns its token.
pub fn create_user_with(config: &Path, name: &str) -> String {
    let output = Command::new(berth_bin())
        .args(["admin", "create-user", name, "--config"])
        .arg(config)
        .output()
        .expect("failed to run berth admin create-user");
    assert!(
        output.status.success(),
        "berth admin create-user failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).expect("token is not UTF-8");
    token.trim().to_string()
}

/// Builds a user command of the CLI against the controller at `api_url`.
pub fn berth_command_at(api_url: &str, token: &str, args: &[&str]) -> Command {
    let mut command = Command::new(berth_bin());
    command
        .args(args)
        .env_remove("ARVADOS_API_HOST")
        .env_remove("ARVADOS_API_TOKEN")
        .env("BERTH_API_HOST", api_url)
        .env("BERTH_API_TOKEN", token);
    command
}

pub fn client(api_url: &str, token: &str) -> Client {
    Client::new(Settings {
        base_url: berth_client::parse_api_host(api_url).expect("bad API URL"),
        token: Token::new(token),
        insecure: false,
    })
    .expect("failed to build a client")
}

/// Writes a file that only its owner may read, as secrets must be.
fn write_private(path: &Path, content: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("failed to create a private file");
    file.write_all(content.as_bytes())
        .expect("failed to write a private file");
}

/// Opens a log file for appending, so that a restarted process keeps the
/// lines of the one before.
fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(name)).expect("failed to create a log file"))
}

/// Opens a log file for appending, so a restarted process keeps the
/// earlier runs' lines.
fn append_log_file(dir: &Path, name: &str) -> Stdio {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .expect("failed to open a log file");
    Stdio::from(file)
}

fn write_config(
    path: &Path,
    cluster_id: &str,
    token_file: &Path,
    dir: &Path,
    dispatch: Option<(&str, &str)>,
    options: &ClusterOptions,
) {
    let docker_host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///tmp/podman.sock".into());
    let listen = std::net::SocketAddr::new(
        options
            .listen_address
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        0,
    );
    let database_url = match &options.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", dir.join("berth.db").display()),
    };
    let mut text = format!(
        "cluster_id: {cluster_id}\n\
         system_token_file: {token}\n\
         controller:\n  listen: {listen}\n  database_url: \"{database_url}\"\n\
         \x20 blocks:\n    directory: {blocks}\n",
        token = token_file.display(),
        blocks = dir.join("blocks").display(),
    );
    for line in &options.controller {
        text.push_str(&format!("  {line}\n"));
    }
    text.push_str(&format!(
        "supervisor:\n  docker_host: {docker_host}\n  journal_dir: {journal}\n",
        journal = dir.join("journal").display(),
    ));
    for line in &options.supervisor {
        text.push_str(&format!("  {line}\n"));
    }
    if let Some((api_url, backend)) = dispatch {
        let settings = &options.dispatch;
        text.push_str(&format!(
            "dispatch:\n  backend: {backend}\n  api_url: {api_url}\n  poll_interval: {poll}ms\n  resync_interval: {resync}ms\n  watch: {watch}\n  credentials_dir: {creds}\n",
            poll = settings.poll_interval.as_millis(),
            resync = settings.resync_interval.as_millis(),
            watch = settings.watch,
            creds = dir.join("credentials").display(),
        ));
        if let Some((ttl, renew)) = settings.lease {
            text.push_str(&format!(
                "  lease_ttl: {}ms\n  lease_renew_interval: {}ms\n",
                ttl.as_millis(),
                renew.as_millis()
            ));
        }
        if backend == "slurm" {
            text.push_str(&format!(
                "  slurm:\n    output: {}/slurm-%j.out\n",
                dir.display()
            ));
        }
        if backend == "lsf" {
            let bin = dir.join("lsf/bin");
            text.push_str(&format!(
                "  lsf:\n    output: {dir}/lsf-%J.out\n    user_priority: true\n    max_user_priority: 100\n    bsub: {bin}/bsub\n    bjobs: {bin}/bjobs\n    bkill: {bin}/bkill\n    bmod: {bin}/bmod\n",
                dir = dir.display(),
                bin = bin.display(),
            ));
        }
    }
    std::fs::write(path, text).expect("failed to write the configuration");
}

/// Reads the controller's stdout until it prints its address.
fn wait_for_address(stdout: std::process::ChildStdout, dir: &Path) -> String {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            if let Some(url) = line.strip_prefix("berth controller listening on ") {
                let _ = sender.send(url.trim().to_string());
            }
        }
    });
    match receiver.recv_timeout(STARTUP_TIMEOUT) {
        Ok(url) => url,
        Err(_) => panic!(
            "the controller did not print its address within {STARTUP_TIMEOUT:?}; its log:\n{}",
            std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
        ),
    }
}

fn random_alnum(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Makes a random cluster id that starts with a letter, so it never looks like a
/// number to a shell or YAML.
fn random_cluster_id() -> String {
    let mut rng = rand::thread_rng();
    let first = (b'a' + rng.gen_range(0..26)) as char;
    format!("{first}{}", random_alnum(4))
}

/// Builds a committed request for `command` at `priority`, with small
/// resources.
pub fn request_body(command: &[&str], priority: i64) -> serde_json::Value {
    serde_json::json!({
        "state": "Committed",
        "priority": priority,
        "container_image": test_image(),
        "command": command,
        "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
    })
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after
/// `timeout` with `what` and the cluster's logs.
pub async fn wait_until<T, F, Fut>(
    cluster: &impl ClusterLogs,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until container `uuid` is Running and its gateway has published
/// its host key, which a shell needs.
pub async fn wait_for_host_key(cluster: &impl ClusterLogs, client: &Client, uuid: &str) {
    wait_until(
        cluster,
        Duration::from_secs(120),
        "the container to run with a published host key",
        || async {
            let container = client.get_container(uuid).await.ok()?;
            (container.state == berth_core::ContainerState::Running
                && container.gateway_host_key.is_some())
            .then_some(())
        },
    )
    .await;
}

/// Slurm job ids, in any state Slurm still remembers, whose name is `name`.
pub fn slurm_jobs_named(name: &str) -> Vec<String> {
    let output = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%i", "--name", name])
        .output()
        .expect("failed to run squeue");
    assert!(
        output.status.success(),
        "squeue failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Names of Podman containers (running or not) labelled with `uuid`.
pub fn podman_containers_for(uuid: &str) -> Vec<String> {
    let output = Command::new("podman")
        .args([
            "ps",
            "--all",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("label=org.berth.container-uuid={uuid}"),
        ])
        .output()
        .expect("failed to run podman ps");
    assert!(
        output.status.success(),
        "podman ps failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

/// The LSF stand-ins, by name.
const LSF_STAND_INS: &[(&str, &str)] = &[
    (
        "bsub",
        include_str!("../../../berth-dispatch/tests/lsf-stand-ins/bsub"),
    ),
    (
        "bjobs",
        include_str!("../../../berth-dispatch/tests/lsf-stand-ins/bjobs"),
    ),
    (
        "bkill",
        include_str!("../../../berth-dispatch/tests/lsf-stand-ins/bkill"),
    ),
    (
        "bmod",
        include_str!("../../../berth-dispatch/tests/lsf-stand-ins/bmod"),
    ),
    (
        "lsf-run-pending",
        include_str!("../../../berth-dispatch/tests/lsf-stand-ins/lsf-run-pending"),
    ),
];

/// Writes the LSF stand-ins into `dir/bin`, with an empty job state in
/// `dir/state`.
fn install_lsf_stand_ins(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;

    let bin = dir.join("bin");
    let state = dir.join("state");
    std::fs::create_dir_all(&bin).expect("failed to make the stand-ins' directory");
    std::fs::create_dir_all(&state).expect("failed to make the stand-ins' state directory");
    std::fs::write(state.join("next"), "101\n").expect("failed to write the next job id");
    for (name, text) in LSF_STAND_INS {
        let path = bin.join(name);
        std::fs::write(&path, text).expect("failed to write a stand-in");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("failed to make a stand-in executable");
    }
}

/// Kills the processes of the stand-in LSF jobs that still run.
/// Kills the process groups of the supervisors that the local backend
/// started (their pid files are in the credentials directory), and removes
/// the containers of `cluster_id` they leave. Without the controller a
/// supervisor would retry its final update for a day.
fn stop_local_supervisors(credentials: &Path, cluster_id: &str) {
    if let Ok(entries) = std::fs::read_dir(credentials) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pid") {
                continue;
            }
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|pid| *pid > 1) {
                // The local backend starts each supervisor in a process
                // group of its own, whose id is the supervisor's pid.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let listed = Command::new("podman")
        .args(["ps", "--all", "--quiet", "--filter"])
        .arg(format!("name=^berth-{cluster_id}-"))
        .output();
    if let Ok(output) = listed {
        let ids = String::from_utf8_lossy(&output.stdout).into_owned();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--time", "0"])
                .args(&ids)
                .output();
        }
    }
}

fn stop_lsf_jobs(state: &Path) {
    let Ok(entries) = std::fs::read_dir(state) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let job = path.with_extension("job");
        let running = std::fs::read_to_string(&job).is_ok_and(|text| text.starts_with("RUN "));
        if let (true, Ok(pid)) = (running, std::fs::read_to_string(&path)) {
            let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        }
    }
}
