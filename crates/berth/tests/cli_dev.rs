//! `berth dev` as a user starts it: a controller (over HTTPS with a
//! self-signed certificate) and a local-backend dispatcher in one process,
//! ready once its env file appears, and the user commands working against it
//! with the settings from that file.
//!
//! Runs only when `BERTH_INTEGRATION=1` (real Podman for the container
//! run); elsewhere it prints "skipped" and passes.

// A test may panic on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long `berth dev` may take to write its env file.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `berth dev` may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// Interval between two checks for the env file and the process.
const FILE_POLL_INTERVAL: Duration = Duration::from_millis(50);

fn skip() -> bool {
    if std::env::var("BERTH_INTEGRATION").as_deref() == Ok("1") {
        return false;
    }
    eprintln!("skipped: set BERTH_INTEGRATION=1 (scripts/test.sh does) to run against real Podman");
    true
}

fn test_image() -> String {
    std::env::var("BERTH_TEST_IMAGE").unwrap_or_else(|_| "localhost/busybox:latest".into())
}

/// A running `berth dev`, killed when dropped.
struct Dev {
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
    /// The lines `berth dev` printed on stdout.
    stdout: std::sync::mpsc::Receiver<String>,
}

impl Dev {
    fn start(data_dir: &Path, log: &Path) -> Dev {
        let docker_host =
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///tmp/podman.sock".into());
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                "local",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(["--docker-host", &docker_host])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("failed to create the log file"))
            .spawn()
            .expect("failed to start berth dev");
        let stdout = child.stdout.take().expect("stdout of berth dev");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Dev {
            child,
            data_dir: data_dir.to_path_buf(),
            log: log.to_path_buf(),
            stdout: receiver,
        }
    }

    fn env_file(&self) -> PathBuf {
        self.data_dir.join("env")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the env file and returns its variables.
    fn wait_ready(&mut self) -> Env {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.env_file().exists() {
            if let Some(status) = self.child.try_wait().expect("failed to poll berth dev") {
                panic!(
                    "berth dev exited ({status}) before it was ready; its log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "berth dev wrote no env file within {READY_TIMEOUT:?}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(FILE_POLL_INTERVAL);
        }
        let text = std::fs::read_to_string(self.env_file()).expect("failed to read the env file");
        parse_env_file(&text)
    }

    /// Sends SIGTERM and waits for the process to end.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("failed to run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("failed to poll berth dev") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "berth dev did not stop within {STOP_TIMEOUT:?} of SIGTERM; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(FILE_POLL_INTERVAL);
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The variables of the env file, in the file's order.
struct Env {
    lines: Vec<String>,
    vars: Vec<(String, String)>,
}

impl Env {
    fn get(&self, name: &str) -> &str {
        self.vars
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("{name} is not in the env file: {:?}", self.lines))
    }

    fn host(&self) -> &str {
        self.get("BERTH_API_HOST")
    }

    fn token(&self) -> &str {
        self.get("BERTH_API_TOKEN")
    }
}

/// Reads `export NAME=VALUE` lines; every line must be one.
fn parse_env_file(text: &str) -> Env {
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let vars = lines
        .iter()
        .map(|line| {
            let assignment = line
                .strip_prefix("export ")
                .unwrap_or_else(|| panic!("not an export line in the env file: {line:?}"));
            let (name, value) = assignment
                .split_once('=')
                .unwrap_or_else(|| panic!("no value in the env file's line {line:?}"));
            (name.to_string(), value.to_string())
        })
        .collect();
    Env { lines, vars }
}

/// Runs berth with exactly the env file's API settings.
fn berth(env: &Env, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
    command.args(args);
    for prefix in ["BERTH", "ARVADOS"] {
        for suffix in ["API_HOST", "API_TOKEN", "API_HOST_INSECURE"] {
            command.env_remove(format!("{prefix}_{suffix}"));
        }
    }
    command
        .envs(env.vars.iter().map(|(name, value)| (name, value)))
        .output()
        .expect("failed to run berth")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("failed to stat {}: {err}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn dev_serves_user_commands_and_keeps_its_user() {
    if skip() {
        return;
    }
    let temp = tempfile::tempdir().expect("failed to make a temporary directory");
    let data_dir = temp.path().join("data");
    let mut dev = Dev::start(&data_dir, &temp.path().join("dev.log"));
    let env = dev.wait_ready();
    let (host, token) = (env.host().to_string(), env.token().to_string());

    // host:port, which means HTTPS, with the self-signed certificate.
    assert!(host.starts_with("127.0.0.1:"), "{host}");
    assert!(!host.ends_with(":0"), "the real port is printed: {host}");
    let names: Vec<&str> = env.vars.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "BERTH_API_HOST",
            "BERTH_API_TOKEN",
            "BERTH_API_HOST_INSECURE",
            "ARVADOS_API_HOST",
            "ARVADOS_API_TOKEN",
            "ARVADOS_API_HOST_INSECURE"
        ]
    );
    assert_eq!(env.get("BERTH_API_HOST_INSECURE"), "1");
    assert_eq!(env.get("ARVADOS_API_HOST"), host);
    assert_eq!(env.get("ARVADOS_API_TOKEN"), token);
    assert_eq!(env.get("ARVADOS_API_HOST_INSECURE"), "1");
    let printed: Vec<String> = (0..env.lines.len())
        .map(|_| {
            dev.stdout
                .recv_timeout(Duration::from_secs(5))
                .expect("berth dev printed its export lines on stdout")
        })
        .collect();
    assert_eq!(printed, env.lines, "stdout repeats the env file");
    assert_eq!(mode(&data_dir), 0o700);
    for file in [
        "env",
        "system-token",
        "user-token",
        "tls-certificate.pem",
        "tls-key.pem",
    ] {
        assert_eq!(mode(&data_dir.join(file)), 0o600, "{file}");
    }
    assert!(data_dir.join("berth.db").exists());
    let certificate = std::fs::read(data_dir.join("tls-certificate.pem")).unwrap();

    // Plain HTTP to the HTTPS port gets no answer.
    let plain = berth(
        &Env {
            lines: Vec::new(),
            vars: vec![
                ("BERTH_API_HOST".into(), format!("http://{host}")),
                ("BERTH_API_TOKEN".into(), token.clone()),
            ],
        },
        &["ls"],
    );
    assert!(
        !plain.status.success(),
        "berth ls over plain HTTP succeeded"
    );

    let ls = berth(&env, &["ls"]);
    assert!(
        ls.status.success(),
        "berth ls failed: {}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let table = String::from_utf8_lossy(&ls.stdout);
    assert!(table.starts_with("REQUEST"), "{table}");
    assert_eq!(table.lines().count(), 1, "no requests yet: {table}");

    let bad = berth(&env, &["run", "--ram", "lots", &test_image(), "--", "true"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "exit status of berth run with a bad --ram"
    );
    let message = String::from_utf8_lossy(&bad.stderr);
    assert!(message.contains("\"lots\""), "{message}");
    assert!(message.contains("--ram"), "{message}");

    let run = berth(
        &env,
        &["run", "--ram", "64M", &test_image(), "--", "echo", "hello"],
    );
    assert_eq!(
        run.status.code(),
        Some(0),
        "berth run: {}\nberth dev log:\n{}",
        String::from_utf8_lossy(&run.stderr),
        dev.log_text()
    );
    assert_eq!(run.stdout, b"hello\n");

    let ls = berth(&env, &["ls"]);
    let table = String::from_utf8_lossy(&ls.stdout);
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(table.contains("Final"), "{table}");
    assert!(table.contains("Complete"), "{table}");

    let status = dev.terminate();
    assert!(
        status.success(),
        "berth dev exit status {status}; log:\n{}",
        dev.log_text()
    );
    assert!(
        !dev.env_file().exists(),
        "the env file is removed on shutdown"
    );
    drop(dev);

    // A second start reuses the data directory: same user, same token, same
    // certificate.
    let mut again = Dev::start(&data_dir, &temp.path().join("dev-again.log"));
    let env_again = again.wait_ready();
    assert_eq!(env_again.token(), token);
    assert_eq!(
        std::fs::read(data_dir.join("tls-certificate.pem")).unwrap(),
        certificate
    );
    let ls = berth(&env_again, &["ls"]);
    let table = String::from_utf8_lossy(&ls.stdout);
    assert_eq!(
        table.lines().count(),
        2,
        "the earlier request is still listed: {table}"
    );
    assert!(again.terminate().success());
}

#[test]
fn second_dev_on_locked_dir_fails() {
    if skip() {
        return;
    }
    let temp = tempfile::tempdir().expect("failed to make a temporary directory");
    let data_dir = temp.path().join("data");
    let mut first = Dev::start(&data_dir, &temp.path().join("first.log"));
    let env = first.wait_ready();
    let host = env.host().to_string();
    let config_before =
        std::fs::read_to_string(data_dir.join("config.yml")).expect("failed to read config.yml");

    let started = Instant::now();
    let second = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "local",
            "--data-dir",
        ])
        .arg(&data_dir)
        .output()
        .expect("failed to run the second berth dev");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the second berth dev took {:?} to fail",
        started.elapsed()
    );
    assert!(!second.status.success(), "the second berth dev succeeded");
    assert!(
        second.stdout.is_empty(),
        "no export lines: {:?}",
        second.stdout
    );
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(
        message.contains("in use by another `berth dev`"),
        "{message}"
    );
    let root = std::fs::canonicalize(&data_dir).expect("failed to resolve the data directory");
    assert!(message.contains(&root.display().to_string()), "{message}");
    assert!(message.contains(&host), "names the running API: {message}");

    assert!(
        first.env_file().exists(),
        "the first one's env file is kept"
    );
    let config_after =
        std::fs::read_to_string(data_dir.join("config.yml")).expect("failed to read config.yml");
    assert_eq!(config_after, config_before, "config.yml is untouched");
    let ls = berth(&env, &["ls"]);
    assert!(
        ls.status.success(),
        "the first berth dev still serves: {}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(first.terminate().success());
}
