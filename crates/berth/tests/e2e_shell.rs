//! `berth shell`, `berth ssh-config` with plain `ssh` and `scp`, and their
//! refusals, end to end with the compute node in a network namespace that
//! the controller cannot open connections to (see `common/netns.rs`).
//!
//! The controller runs in the root namespace on the namespace link's
//! address. The dispatcher runs in the node's namespace through `ip netns
//! exec`, so its local backend's `berth supervise`, and the supervisor's
//! gateway tunnel, start from the node. The container runs in Podman,
//! which the supervisor reaches over its Unix socket. The client side is
//! the real OpenSSH client with `berth ssh-proxy`, in the root namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::netns::NodeNamespace;
use common::{skip, test_image, wait_until, ClusterOptions, TestCluster};
use serde_json::json;

/// How long a cancelled container may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the gateway's tunnel may take to connect once the host key is
/// published, and a forwarded port to respond.
const SHELL_TIMEOUT: Duration = Duration::from_secs(60);

/// The port busybox httpd listens on inside the container, on loopback.
const HTTP_PORT: u16 = 8080;

/// Lines of `seq 1 N` that the container serves over HTTP.
const SERVED_NUMBERS: u32 = 20_000;

/// A running container on a compute node in a network namespace, with its
/// cluster and its owner's token. Fields drop in declaration order: the
/// Podman containers, then the cluster, then the namespace.
struct IsolatedShell {
    _podman_cleanup: RemovePodmanContainers,
    cluster: TestCluster,
    node: NodeNamespace,
    token: String,
    request_uuid: String,
    uuid: String,
    /// The content of the container's `/etc/os-release`.
    os_release: String,
}

impl IsolatedShell {
    /// Makes the namespace and the cluster, starts the container described
    /// at [`container_script`] for a new user, checks that its supervisor
    /// runs in the namespace and waits until a shell works.
    async fn start() -> IsolatedShell {
        let node = NodeNamespace::create();
        let cluster = start_isolated_cluster(&node);
        let token = cluster.create_user("shelly");
        let mark = format!("{:016x}", rand::random::<u64>());
        let os_release =
            format!("NAME=\"Berth shell test\"\nID=berth-shell-test\nBERTH_MARK={mark}\n");
        let (request_uuid, uuid) =
            start_container(&cluster, &token, &container_script(&os_release)).await;
        let shell = IsolatedShell {
            _podman_cleanup: RemovePodmanContainers(uuid.clone()),
            cluster,
            node,
            token,
            request_uuid,
            uuid,
            os_release,
        };
        shell.assert_supervisor_in_node();
        shell.wait_until_ready().await;
        shell
    }

    /// Runs `berth shell UUID -- COMMAND` as `token`, with no terminal.
    fn run(&self, token: &str, command: &str) -> Output {
        self.cluster
            .berth_command(token, &["shell", &self.uuid, "--", command])
            .stdin(Stdio::null())
            .output()
            .expect("failed to run berth shell")
    }

    /// Waits until a command through `berth shell` runs, which needs the
    /// gateway's tunnel to be connected.
    async fn wait_until_ready(&self) {
        wait_until(
            &self.cluster,
            SHELL_TIMEOUT,
            "a command to run through berth shell",
            || async {
                let mut command = self
                    .cluster
                    .berth_command(&self.token, &["shell", &self.uuid, "--", "exit 7"]);
                command.stdin(Stdio::null());
                let output = tokio::process::Command::from(command).output().await.ok()?;
                (output.status.code() == Some(7)).then_some(())
            },
        )
        .await;
    }

    /// Panics unless a process in the node's namespace runs `berth
    /// supervise` for the container.
    fn assert_supervisor_in_node(&self) {
        let command_lines = self.node.process_command_lines();
        assert!(
            command_lines
                .iter()
                .any(|line| line.contains("supervise") && line.contains(&self.uuid)),
            "no berth supervise for {} runs in {}: {command_lines:?}",
            self.uuid,
            self.node.name
        );
    }

    /// Writes the snippet of `berth ssh-config`, with its known_hosts file,
    /// into `dir` and returns the snippet's path.
    fn write_ssh_config(&self, dir: &Path) -> PathBuf {
        let known_hosts = dir.join("known_hosts");
        let snippet = self.cluster.berth(
            &self.token,
            &["ssh-config", "--known-hosts", known_hosts.to_str().unwrap()],
        );
        assert!(snippet.status.success(), "{}", stderr_of(&snippet));
        let ssh_config = dir.join("ssh_config");
        std::fs::write(&ssh_config, &snippet.stdout).unwrap();
        ssh_config
    }

    /// Returns `program` (ssh or scp) with `-F ssh_config` and the API
    /// host and token in its environment, which `berth ssh-proxy` reads.
    fn ssh_command(&self, program: &str, ssh_config: &Path) -> Command {
        let mut command = with_api_environment(&self.cluster, &self.token, program);
        command.arg("-F").arg(ssh_config).stdin(Stdio::null());
        command
    }

    /// Returns the host name of the container in the ssh-config snippet.
    fn host_name(&self) -> String {
        format!("{}.berth", self.uuid)
    }

    /// Cancels the request and waits until its container has stopped, so no
    /// supervisor or Podman container outlives the test.
    async fn stop(&self) {
        let client = common::client(&self.cluster.api_url, &self.token);
        client
            .update_container_request(&self.request_uuid, &json!({"priority": 0}))
            .await
            .expect("failed to cancel the container request");
        wait_until(
            &self.cluster,
            STOP_TIMEOUT,
            "the container to stop",
            || async {
                let container = client.get_container(&self.uuid).await.ok()?;
                container.state.is_final().then_some(())
            },
        )
        .await;
    }
}

/// Starts a cluster whose dispatcher, and so whose supervisors, run in
/// `node`, with the controller on the root side of the node's link.
fn start_isolated_cluster(node: &NodeNamespace) -> TestCluster {
    let options = ClusterOptions {
        listen_address: Some(node.host_address.into()),
        dispatcher_prefix: node.exec_prefix(),
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start_with("local", &options);

    // The isolation holds for the real controller's port too.
    node.assert_node_reaches(controller_address(&cluster));
    node.assert_host_cannot_reach_node();
    cluster
}

/// Returns the controller's listening address from its API URL.
fn controller_address(cluster: &TestCluster) -> SocketAddr {
    let url = url::Url::parse(&cluster.api_url).expect("the API URL is invalid");
    url.socket_addrs(|| None)
        .expect("the API URL has no address")
        .into_iter()
        .next()
        .expect("the API URL has no address")
}

/// Builds the container's shell script: write `os_release` to
/// `/etc/os-release` (the test image has none), serve `seq 1
/// SERVED_NUMBERS` as `/www/numbers` with busybox httpd on
/// 127.0.0.1:HTTP_PORT, then sleep.
fn container_script(os_release: &str) -> String {
    format!(
        "printf '%s' '{os_release}' > /etc/os-release && mkdir -p /www && \
         seq 1 {SERVED_NUMBERS} > /www/numbers && \
         httpd -p 127.0.0.1:{HTTP_PORT} -h /www && exec sleep 600"
    )
}

/// Starts a container running `script` for `token`'s user. Returns the
/// request's and the container's UUID once the container runs with a
/// published host key.
async fn start_container(cluster: &TestCluster, token: &str, script: &str) -> (String, String) {
    let client = common::client(&cluster.api_url, token);
    let request = client
        .create_container_request(&json!({
            "state": "Committed",
            "priority": 1,
            "container_image": test_image(),
            "command": ["sh", "-c", script],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
            "use_existing": false,
        }))
        .await
        .expect("failed to create the container request");
    let uuid = request
        .container_uuid
        .clone()
        .expect("the request has no container");
    common::wait_for_host_key(cluster, &client, &uuid).await;
    (request.uuid, uuid)
}

/// Returns `program` with the cluster's API host and `token` in its
/// environment, as `berth ssh-proxy` needs under plain `ssh`.
fn with_api_environment(cluster: &TestCluster, token: &str, program: &str) -> Command {
    let mut command = Command::new(program);
    command
        .env_remove("ARVADOS_API_HOST")
        .env_remove("ARVADOS_API_TOKEN")
        .env("BERTH_API_HOST", &cluster.api_url)
        .env("BERTH_API_TOKEN", token);
    command
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the Podman containers of a Berth container when dropped, so a
/// failed test leaves none running.
struct RemovePodmanContainers(String);

impl Drop for RemovePodmanContainers {
    fn drop(&mut self) {
        for name in common::podman_containers_for(&self.0) {
            let _ = Command::new("podman")
                .args(["rm", "--force", &name])
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// A tmux server on a socket of its own, killed when dropped.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    /// Starts a detached session running `shell_command`. The server, and
    /// so the session, get the environment of `command`, a tmux command.
    fn start(mut command: Command, socket: &Path, shell_command: &str) -> Tmux {
        let output = command
            .env_remove("TMUX")
            .arg("-S")
            .arg(socket)
            .args(["new-session", "-d", "-x", "120", "-y", "30", shell_command])
            .output()
            .expect("failed to run tmux: install tmux");
        assert!(
            output.status.success(),
            "tmux new-session failed: {}",
            stderr_of(&output)
        );
        Tmux {
            socket: socket.to_path_buf(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("failed to run tmux")
    }

    /// Returns the text on the session's screen.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p"]).stdout).into_owned()
    }

    /// Types `text` and then Enter.
    fn type_line(&self, text: &str) {
        let typed = self.run(&["send-keys", "-l", text]);
        assert!(
            typed.status.success(),
            "tmux send-keys failed: {}",
            stderr_of(&typed)
        );
        let entered = self.run(&["send-keys", "Enter"]);
        assert!(
            entered.status.success(),
            "tmux send-keys failed: {}",
            stderr_of(&entered)
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Fetches `path` over plain HTTP from 127.0.0.1:`port`, with no proxy.
async fn http_get(port: u16, path: &str) -> Option<Vec<u8>> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    Some(response.bytes().await.ok()?.to_vec())
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("failed to find a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_reaches_an_isolated_node() {
    if skip() {
        return;
    }
    let shell = IsolatedShell::start().await;
    let cluster = &shell.cluster;
    let uuid = &shell.uuid;
    let dir = tempfile::tempdir().unwrap();

    // A command's output is the container's file, not the host's.
    let output = shell.run(&shell.token, "cat /etc/os-release");
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        stderr_of(&output)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(printed, shell.os_release, "stderr: {}", stderr_of(&output));
    let host_os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    assert_ne!(printed, host_os_release);

    // An interactive session on a terminal: the typed command runs on a
    // pseudo-terminal, and the session's exit status is berth shell's.
    let status_file = dir.path().join("shell-status");
    let tmux = Tmux::start(
        with_api_environment(cluster, &shell.token, "tmux"),
        &dir.path().join("tmux.sock"),
        &format!(
            "{} shell {uuid}; echo $? > {}",
            common::berth_bin(),
            status_file.display()
        ),
    );
    wait_until(cluster, SHELL_TIMEOUT, "the shell's prompt", || async {
        let screen = tmux.screen();
        screen
            .lines()
            .any(|line| line.trim_end().ends_with('#'))
            .then_some(())
    })
    .await;
    tmux.type_line("echo typed-$((6 * 7)); tty");
    let screen = wait_until(
        cluster,
        SHELL_TIMEOUT,
        "the typed command's output",
        || async {
            let screen = tmux.screen();
            (screen.contains("typed-42")
                && screen
                    .lines()
                    .any(|line| line.starts_with("/dev/") || line.starts_with("not a tty")))
            .then_some(screen)
        },
    )
    .await;
    assert!(
        screen.lines().any(|line| line.starts_with("/dev/pts/")),
        "tty printed no /dev/pts device:\n{screen}"
    );
    tmux.type_line("exit 5");
    let status = wait_until(cluster, SHELL_TIMEOUT, "berth shell to exit", || async {
        let text = std::fs::read_to_string(&status_file).ok()?;
        text.ends_with('\n').then(|| text.trim().to_string())
    })
    .await;
    assert_eq!(status, "5", "screen:\n{}", tmux.screen());
    drop(tmux);

    // Plain ssh with the snippet of berth ssh-config.
    let ssh_config = shell.write_ssh_config(dir.path());
    let host = shell.host_name();
    let output = shell
        .ssh_command("ssh", &ssh_config)
        .args([&host, "cat /etc/os-release; exit 3"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(3),
        "stderr: {}",
        stderr_of(&output)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), shell.os_release);

    // ssh -L reaches busybox httpd on the container's loopback interface.
    let port = free_port();
    let forward = format!("127.0.0.1:{port}:127.0.0.1:{HTTP_PORT}");
    let forward_log = dir.path().join("ssh-forward.log");
    let mut tunnel = KillOnDrop(
        shell
            .ssh_command("ssh", &ssh_config)
            .args([
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                &forward,
                &host,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&forward_log).unwrap())
            .spawn()
            .expect("failed to run ssh -L"),
    );
    let fetched = wait_until(
        cluster,
        SHELL_TIMEOUT,
        "the forwarded port to respond",
        || {
            // ssh exits when it cannot set up the forward.
            let exited = tunnel.0.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    return Some(Err(status));
                }
                http_get(port, "/numbers").await.map(Ok)
            }
        },
    )
    .await;
    let body = fetched.unwrap_or_else(|status| {
        panic!(
            "ssh -L exited ({status}): {}",
            std::fs::read_to_string(&forward_log).unwrap_or_default()
        )
    });
    let expected: String = (1..=SERVED_NUMBERS).map(|n| format!("{n}\n")).collect();
    assert_eq!(body.len(), expected.len());
    assert!(body == expected.as_bytes(), "the forwarded file differs");
    drop(tunnel);

    // scp, over the gateway's sftp subsystem, copies a file in and out.
    check_scp(&shell, &ssh_config, dir.path());

    shell.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_refusals_on_an_isolated_node() {
    if skip() {
        return;
    }
    let mut shell = IsolatedShell::start().await;
    let uuid = shell.uuid.clone();

    // Another user's container is not found for that user.
    let mallory = shell.cluster.create_user("mallory");
    let rejected = shell.run(&mallory, "true");
    let stderr = stderr_of(&rejected);
    assert_ne!(rejected.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains(&uuid), "{stderr}");
    assert!(stderr.contains("404"), "{stderr}");

    // A host key on the record that the gateway does not have: ssh's strict
    // checking rejects the gateway. An administrator changes the record
    // through the API, as a tampered record would.
    let system = shell.cluster.system_client();
    let published = system
        .get_container(&uuid)
        .await
        .unwrap()
        .gateway_host_key
        .unwrap();
    let wrong_key = generate_public_key(&shell.cluster.dir.path().join("wrong_host_key"));
    assert_ne!(wrong_key, published);
    system
        .update_container(&uuid, &json!({"gateway_host_key": wrong_key}))
        .await
        .expect("failed to change the container's gateway_host_key");
    let rejected = shell.run(&shell.token, "true");
    let stderr = stderr_of(&rejected);
    assert_eq!(rejected.status.code(), Some(255), "stderr: {stderr}");
    assert!(stderr.contains("Host key verification failed"), "{stderr}");

    // With the published key back, the same shell works.
    system
        .update_container(&uuid, &json!({"gateway_host_key": published}))
        .await
        .expect("failed to restore the container's gateway_host_key");
    let output = shell.run(&shell.token, "true");
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        stderr_of(&output)
    );

    // A controller with shell access turned off rejects the shell.
    let cluster = &mut shell.cluster;
    cluster.stop_controller();
    let config = std::fs::read_to_string(&cluster.config).unwrap();
    let config = config.replacen("controller:\n", "controller:\n  shell_access: false\n", 1);
    std::fs::write(&cluster.config, config).unwrap();
    cluster.restart_controller();
    let rejected = shell.run(&shell.token, "true");
    let stderr = stderr_of(&rejected);
    assert_ne!(rejected.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains("shell access is turned off"), "{stderr}");

    shell.stop().await;
}

/// Copies a file of random bytes into the container with plain `scp` and
/// the snippet at `ssh_config`, checks its SHA-256 inside the container,
/// and copies it back out into `dir`, byte for byte.
fn check_scp(shell: &IsolatedShell, ssh_config: &Path, dir: &Path) {
    use sha2::{Digest, Sha256};

    let remote_file = format!("{}:/tmp/copied.bin", shell.host_name());
    let content: Vec<u8> = (0..(1 << 20)).map(|_| rand::random::<u8>()).collect();
    let upload = dir.join("upload.bin");
    std::fs::write(&upload, &content).unwrap();
    let output = shell
        .ssh_command("scp", ssh_config)
        .arg(&upload)
        .arg(&remote_file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scp into the container failed: {}",
        stderr_of(&output)
    );

    // The container's own checksum of the copy.
    let output = shell
        .ssh_command("ssh", ssh_config)
        .args([&shell.host_name(), "sha256sum /tmp/copied.bin"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let expected_digest = hex::encode(Sha256::digest(&content));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        printed.split_whitespace().next(),
        Some(expected_digest.as_str())
    );

    let download = dir.join("download.bin");
    let output = shell
        .ssh_command("scp", ssh_config)
        .arg(&remote_file)
        .arg(&download)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scp out of the container failed: {}",
        stderr_of(&output)
    );
    let downloaded = std::fs::read(&download).unwrap();
    assert_eq!(downloaded.len(), content.len());
    assert!(downloaded == content, "the downloaded file differs");
}

/// Makes an Ed25519 key pair with ssh-keygen at `path` and returns the
/// public key as `ALGORITHM BASE64`.
fn generate_public_key(path: &Path) -> String {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .status()
        .expect("failed to run ssh-keygen");
    assert!(status.success(), "ssh-keygen failed: {status}");
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let mut fields = public.split_whitespace();
    format!("{} {}", fields.next().unwrap(), fields.next().unwrap())
}
