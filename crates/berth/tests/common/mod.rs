//! A whole Berth cluster for end-to-end tests: a controller and a
//! dispatcher as separate `berth` processes, on real Slurm (or the local
//! backend) and real Podman, with a SQLite database in a temporary
//! directory.
//!
//! These tests run only when `BERTH_INTEGRATION=1`, which `scripts/test.sh`
//! sets after it has started Slurm and Podman; elsewhere they print
//! "skipped" and pass. Each cluster gets a random cluster id, so the
//! dispatchers of tests that run at the same time never take each other's
//! Slurm jobs for orphans.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_client::{Client, Settings, Token};
use rand::Rng;

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

/// The dispatcher's intervals and whether it follows the change feed.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub poll_interval: Duration,
    pub resync_interval: Duration,
    pub watch: bool,
}

impl Default for DispatchSettings {
    /// Short intervals, so that what only a poll notices (a vanished job)
    /// shows within seconds.
    fn default() -> DispatchSettings {
        DispatchSettings {
            poll_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(10),
            watch: true,
        }
    }
}

/// How a test cluster is set up.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    pub dispatch: DispatchSettings,
    /// Log every request the controller completes, with its method and
    /// route, for [`TestCluster::count_requests`].
    pub log_requests: bool,
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
    backend: String,
}

impl TestCluster {
    /// Starts a controller and a dispatcher with the given backend
    /// (`slurm` or `local`).
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
        write_config(&config, &cluster_id, &token_file, dir.path(), None, backend);

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
            Some((&api_url, &options.dispatch)),
            backend,
        );
        let mut cluster = TestCluster {
            dir,
            cluster_id,
            config,
            api_url,
            system_token,
            controller,
            dispatcher: None,
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
        let child = Command::new(berth_bin())
            .args(["dispatch", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), "dispatch.log"))
            .spawn()
            .expect("failed to start berth dispatch");
        self.dispatcher = Some(child);
    }

    /// Kills the dispatcher with SIGKILL, as a crash would.
    pub fn kill_dispatcher(&mut self) {
        if let Some(mut child) = self.dispatcher.take() {
            child.kill().expect("failed to kill the dispatcher");
            child.wait().expect("failed to reap the dispatcher");
        }
    }

    /// Returns a client that acts with the system token.
    pub fn system_client(&self) -> Client {
        client(&self.api_url, &self.system_token)
    }

    /// Creates a user with `berth admin create-user` and returns its token.
    pub fn create_user(&self, name: &str) -> String {
        let output = Command::new(berth_bin())
            .args(["admin", "create-user", name, "--config"])
            .arg(&self.config)
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

    /// Runs a user command of the CLI against this cluster.
    pub fn berth(&self, token: &str, args: &[&str]) -> Output {
        self.berth_command(token, args)
            .output()
            .expect("failed to run berth")
    }

    pub fn berth_command(&self, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(berth_bin());
        command
            .args(args)
            .env_remove("ARVADOS_API_HOST")
            .env_remove("ARVADOS_API_TOKEN")
            .env("BERTH_API_HOST", &self.api_url)
            .env("BERTH_API_TOKEN", token);
        command
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
        let mut text = String::new();
        for name in ["controller.log", "dispatch.log"] {
            let content = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let tail: Vec<&str> = content.lines().rev().take(40).collect();
            text.push_str(&format!("--- {name} (last lines) ---\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.kill_dispatcher();
        let _ = self.controller.kill();
        let _ = self.controller.wait();
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

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(name)).expect("failed to create a log file"))
}

fn write_config(
    path: &Path,
    cluster_id: &str,
    token_file: &Path,
    dir: &Path,
    dispatch: Option<(&str, &DispatchSettings)>,
    backend: &str,
) {
    let docker_host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///tmp/podman.sock".into());
    let mut text = format!(
        "cluster_id: {cluster_id}\n\
         system_token_file: {token}\n\
         controller:\n  listen: 127.0.0.1:0\n  database_url: sqlite://{db}\n\
         \x20 blocks:\n    directory: {blocks}\n\
         supervisor:\n  docker_host: {docker_host}\n",
        token = token_file.display(),
        db = dir.join("berth.db").display(),
        blocks = dir.join("blocks").display(),
    );
    if let Some((api_url, settings)) = dispatch {
        text.push_str(&format!(
            "dispatch:\n  backend: {backend}\n  api_url: {api_url}\n  poll_interval: {poll}ms\n  resync_interval: {resync}ms\n  watch: {watch}\n  credentials_dir: {creds}\n",
            poll = settings.poll_interval.as_millis(),
            resync = settings.resync_interval.as_millis(),
            watch = settings.watch,
            creds = dir.join("credentials").display(),
        ));
        if backend == "slurm" {
            text.push_str(&format!(
                "  slurm:\n    output: {}/slurm-%j.out\n",
                dir.display()
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
    cluster: &TestCluster,
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
