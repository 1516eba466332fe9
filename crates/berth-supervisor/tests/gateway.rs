//! The SSH gateway against the real OpenSSH client, with sessions in real
//! containers: Podman through its Docker-compatible socket, and crun.
//!
//! A loopback TCP listener on port 0 hands each connection to
//! `Gateway::serve_connection`, in the place of the supervisor's tunnel.
//! `ssh` checks the published host key strictly, from a known_hosts file
//! that lists it under the container's UUID (`HostKeyAlias`). The tests
//! run only with `BERTH_INTEGRATION=1`; the crun ones need root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use berth_supervisor::archive::ImageArchive;
use berth_supervisor::gateway::{
    Gateway, GatewaySettings, GatewayTarget, HostKey, SftpServerCommand,
};
use berth_supervisor::logs::SupervisorLog;
use berth_supervisor::runtime::docker::ExecRoute;
use berth_supervisor::runtime::oci::OciRuntime;
use berth_supervisor::runtime::{BindMount, ContainerId, ContainerSpec, ImageSource, Runtime};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use common::{new_uuid, skip, spec, test_image_archive, test_image_archive_dir, Cleanup};

/// A variable of the container record's environment.
const CONTAINER_VARIABLE: &str = "BERTH_CONTAINER_MARKER=from-the-record";

/// A variable of the test process, which runs the gateway: a session
/// must never see it.
const SUPERVISOR_VARIABLE: &str = "BERTH_SUPERVISOR_MARKER";

/// The `/etc/os-release` the container writes at its start, so the file
/// differs from the host's.
const CONTAINER_OS_RELEASE: &str = "ID=berth-gateway-test";

/// Returns the container's command, which starts a web server on its
/// loopback port 8080, writes its own `/etc/os-release` and then waits
/// for sessions.
fn container_command() -> Vec<&'static str> {
    vec![
        "sh",
        "-c",
        "mkdir -p /www && echo hello-forward > /www/index.html \
         && httpd -p 127.0.0.1:8080 -h /www \
         && echo ID=berth-gateway-test > /etc/os-release && exec sleep 600",
    ]
}

/// A running container, its gateway on a loopback port, and a known_hosts
/// file that lists the gateway's host key under the container's UUID.
struct Served {
    address: SocketAddr,
    alias: String,
    known_hosts: tempfile::NamedTempFile,
    host_key_line: String,
    log: SupervisorLog,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts a gateway into the container `id` and a loopback listener for
/// it.
async fn serve(runtime: Arc<dyn Runtime>, id: &ContainerId, alias: &str) -> Served {
    serve_with(runtime, id, alias, GatewaySettings::default()).await
}

async fn serve_with(
    runtime: Arc<dyn Runtime>,
    id: &ContainerId,
    alias: &str,
    settings: GatewaySettings,
) -> Served {
    // Set before any session starts; nothing else in this test binary
    // reads or writes this variable.
    std::env::set_var(SUPERVISOR_VARIABLE, "leaked");
    let host_key = HostKey::generate().unwrap();
    let host_key_line = host_key.public_line();
    let mut known_hosts = tempfile::NamedTempFile::new().unwrap();
    writeln!(known_hosts, "{alias} {}", host_key.public_line()).unwrap();
    known_hosts.flush().unwrap();

    let log = SupervisorLog::new();
    let target = GatewayTarget {
        runtime,
        container: id.clone(),
        env: vec![CONTAINER_VARIABLE.to_string()],
        working_dir: None,
        sftp_server: Some(SftpServerCommand {
            program: PathBuf::from(env!("CARGO_BIN_EXE_berth-sftp-server")),
            args: Vec::new(),
        }),
    };
    let gateway = Gateway::new(host_key, target, settings, log.clone(), None);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let gateway = gateway.clone();
            tokio::spawn(async move {
                if let Err(error) = gateway.serve_connection(stream).await {
                    eprintln!("gateway connection: {error}");
                }
            });
        }
    });
    Served {
        address,
        alias: alias.to_string(),
        known_hosts,
        host_key_line,
        log,
        server,
    }
}

impl Served {
    /// Returns the options that `ssh`, `scp` and `sftp` share: no
    /// configuration file, strict host key checking against
    /// `known_hosts` and no prompts. `port_flag` is `-p` for `ssh` and
    /// `-P` for `scp` and `sftp`.
    fn client_options(&self, port_flag: &str, known_hosts: &Path) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            port_flag,
            &self.address.port().to_string(),
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("HostKeyAlias={}", self.alias),
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "SetEnv=BERTH_CLIENT_MARKER=sent-by-the-client",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect()
    }

    /// Returns the `ssh` arguments for `user`, with strict host key
    /// checking against this gateway's known_hosts file.
    fn ssh_args(&self, user: &str, known_hosts: &Path) -> Vec<String> {
        let mut args = self.client_options("-p", known_hosts);
        args.push(format!("{user}@127.0.0.1"));
        args
    }

    /// Runs `ssh user@gateway -- command` with stdin from /dev/null.
    async fn ssh(&self, user: &str, command: &[&str]) -> Output {
        self.ssh_with_known_hosts(user, self.known_hosts.path(), command)
            .await
    }

    async fn ssh_with_known_hosts(
        &self,
        user: &str,
        known_hosts: &Path,
        command: &[&str],
    ) -> Output {
        let mut args = self.ssh_args(user, known_hosts);
        args.push("--".to_string());
        args.extend(command.iter().map(|arg| arg.to_string()));
        run_client("ssh", &args).await
    }

    /// Runs `ssh user@gateway -- command` with `input` as its stdin.
    async fn ssh_with_input(&self, user: &str, command: &[&str], input: Vec<u8>) -> Output {
        let mut args = self.ssh_args(user, self.known_hosts.path());
        args.push("--".to_string());
        args.extend(command.iter().map(|arg| arg.to_string()));
        run_client_with_input("ssh", &args, Some(input)).await
    }

    /// Runs `scp -s` (the SFTP protocol) from `source` to `destination`,
    /// where a remote path is written `:PATH` and stands for
    /// `user@gateway:PATH`.
    async fn scp(&self, user: &str, source: &str, destination: &str) -> Output {
        let remote = |path: &str| match path.strip_prefix(':') {
            Some(path) => format!("{user}@127.0.0.1:{path}"),
            None => path.to_string(),
        };
        let mut args = vec!["-s".to_string()];
        args.extend(self.client_options("-P", self.known_hosts.path()));
        args.push(remote(source));
        args.push(remote(destination));
        run_client("scp", &args).await
    }

    /// Runs `sftp -b BATCH` as `user`, where a failing command ends the
    /// batch with status 1. The batch starts with `lcd local_dir`, so
    /// `put` and `get` use that directory.
    async fn sftp_batch(&self, user: &str, local_dir: &Path, batch: &str) -> Output {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "lcd {}", local_dir.display()).unwrap();
        file.write_all(batch.as_bytes()).unwrap();
        file.flush().unwrap();
        let mut args = vec!["-b".to_string(), file.path().display().to_string()];
        args.extend(self.client_options("-P", self.known_hosts.path()));
        args.push(format!("{user}@127.0.0.1"));
        run_client("sftp", &args).await
    }

    /// Runs an interactive `ssh -tt` session on a terminal that `script`
    /// allocates, typing `input` into it. Returns the session's output
    /// and ssh's exit status.
    async fn interactive(&self, input: &str) -> (String, Option<i32>) {
        let args: Vec<String> = self
            .ssh_args("root", self.known_hosts.path())
            .into_iter()
            .map(|arg| shell_quote(&arg))
            .collect();
        // The terminal gets a known size first; the session reads it from
        // the client's pty-req.
        let command = format!(
            "stty cols 101 rows 31; TERM=vt220; export TERM; exec ssh -tt {}",
            args.join(" ")
        );
        let mut child = tokio::process::Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to run script");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_string();
        let typing = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Typed ahead; the terminal buffers it until the shell reads.
            stdin.write_all(input.as_bytes()).await.unwrap();
            // The session ends by the typed `exit`; stdin stays open until
            // then, because its end would hang up the terminal.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(stdin);
        });
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the interactive session did not end within 60 s")
            .unwrap();
        typing.abort();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        (text, output.status.code())
    }
}

/// Runs an OpenSSH client program with stdin from /dev/null, for at
/// most 60 s.
async fn run_client(program: &str, args: &[String]) -> Output {
    run_client_with_input(program, args, None).await
}

/// Runs an OpenSSH client program for at most 60 s, with `input` written
/// to its stdin and then closed, or with stdin from /dev/null for `None`.
async fn run_client_with_input(program: &str, args: &[String], input: Option<Vec<u8>>) -> Output {
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("failed to run {program}: {error}"));
    let writer = child.stdin.take().zip(input).map(|(mut stdin, input)| {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // A client that exits early closes the pipe; its status
            // reports why.
            let _ = stdin.write_all(&input).await;
        })
    });
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish within 60 s"))
        .unwrap_or_else(|error| panic!("failed to run {program}: {error}"));
    if let Some(writer) = writer {
        writer.abort();
    }
    output
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks what every runtime must do: a command's output and exit
/// status, the environment, another user, an unknown user, an interactive
/// terminal and the session log.
async fn check_sessions(served: &Served) {
    let output = served.ssh("root", &["cat", "/etc/os-release"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), CONTAINER_OS_RELEASE);
    let host = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    assert_ne!(text(&output.stdout), host);

    let output = served.ssh("root", &["sh", "-c", "'exit 7'"]).await;
    assert_eq!(output.status.code(), Some(7), "{}", text(&output.stderr));

    // A client may insist on any cipher OpenSSH offers by default.
    for cipher in [
        "chacha20-poly1305@openssh.com",
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "aes128-ctr",
    ] {
        let mut args = vec!["-o".to_string(), format!("Ciphers={cipher}")];
        args.extend(served.ssh_args("root", served.known_hosts.path()));
        args.extend(["--".to_string(), "echo".to_string(), cipher.to_string()]);
        let output = run_client("ssh", &args).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{cipher}: {}",
            text(&output.stderr)
        );
        assert_eq!(text(&output.stdout).trim(), cipher);
    }

    let output = served
        .ssh("root", &["echo out; echo err >&2; exit 3"])
        .await;
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(text(&output.stdout), "out\n");
    assert_eq!(text(&output.stderr), "err\n");

    let output = served.ssh("root", &["env"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let env = text(&output.stdout);
    assert!(env.lines().any(|line| line == CONTAINER_VARIABLE), "{env}");
    assert!(env.lines().any(|line| line == "USER=root"), "{env}");
    assert!(!env.contains(SUPERVISOR_VARIABLE), "{env}");
    assert!(!env.contains("BERTH_CLIENT_MARKER"), "{env}");

    let output = served.ssh("nobody", &["id", "-u"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "65534");

    let output = served.ssh("nosuchuser", &["true"]).await;
    assert_eq!(output.status.code(), Some(255));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("\"nosuchuser\""), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");

    let (session, status) = served
        .interactive("echo typed-$((6*7)); stty size; echo TERM=$TERM; exit 5\n")
        .await;
    assert_eq!(status, Some(5), "{session}");
    assert!(session.contains("typed-42"), "{session}");
    assert!(session.contains("31 101"), "{session}");
    assert!(session.contains("TERM=vt220"), "{session}");

    let log = served.log.pending_lines();
    assert!(
        log.iter()
            .any(|line| line.contains("ended with exit status 7")
                && line.contains("command \"sh\" (14 bytes)")),
        "{log:?}"
    );
    // The arguments of a command are never logged.
    assert!(!log.iter().any(|line| line.contains("exit 7")), "{log:?}");
    assert!(
        log.iter()
            .any(|line| line.contains("a shell") && line.contains("exit status 5")),
        "{log:?}"
    );
    assert!(!log.iter().any(|line| line.contains(CONTAINER_OS_RELEASE)));
}

/// Bytes of the bulk transfer check: many pipe buffers and many SSH
/// channel windows (OpenSSH's client grants 2 MiB), so reads, packets and
/// window adjustments all repeat.
const BULK_BYTES: usize = 24 << 20;

/// Checks that a session moves a large stream byte-exact both ways: the
/// client's data into the container through stdin, then the same bytes
/// back on stdout and stderr at once.
async fn check_bulk_transfer(served: &Served) {
    let mut data = vec![0u8; BULK_BYTES];
    rand::thread_rng().fill_bytes(&mut data);
    let digest = hex::encode(Sha256::digest(&data));

    let output = served
        .ssh_with_input(
            "root",
            &["cat > /tmp/bulk && sha256sum /tmp/bulk"],
            data.clone(),
        )
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert_eq!(
        stdout.split_whitespace().next(),
        Some(digest.as_str()),
        "{stdout}"
    );

    let output = served
        .ssh("root", &["cat /tmp/bulk & cat /tmp/bulk >&2; wait"])
        .await;
    assert_eq!(output.status.code(), Some(0));
    let digest_of = |bytes: &[u8]| hex::encode(Sha256::digest(bytes));
    assert_eq!(output.stdout.len(), BULK_BYTES);
    assert_eq!(digest_of(&output.stdout), digest);
    assert_eq!(output.stderr.len(), BULK_BYTES);
    assert_eq!(digest_of(&output.stderr), digest);
    let output = served.ssh("root", &["rm", "/tmp/bulk"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

/// Checks `ssh -L` to the web server on the container's loopback
/// interface, and that a host outside the container is rejected. The
/// local ends are Unix sockets in a directory of the test's own, so no
/// other process can take them between choosing and binding.
async fn check_forwarding(served: &Served) {
    let sockets = tempfile::tempdir().unwrap();
    let web = sockets.path().join("web.sock");
    let outside_socket = sockets.path().join("outside.sock");
    let mut args = served.ssh_args("root", served.known_hosts.path());
    args.splice(
        0..0,
        [
            "-N".to_string(),
            "-o".to_string(),
            "ExitOnForwardFailure=yes".to_string(),
            "-L".to_string(),
            format!("{}:localhost:8080", web.display()),
            "-L".to_string(),
            format!("{}:10.0.0.1:80", outside_socket.display()),
        ],
    );
    let mut ssh = tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut page = String::new();
    for _ in 0..200 {
        if let Ok(mut stream) = tokio::net::UnixStream::connect(&web).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                .await
                .unwrap();
            page.clear();
            let _ = stream.read_to_string(&mut page).await;
            if page.contains("hello-forward") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(page.contains("hello-forward"), "{page}");

    let mut outside = tokio::net::UnixStream::connect(&outside_socket)
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut outside, &mut reply).await;
    assert!(reply.is_empty());
    ssh.kill().await.unwrap();
    let log = served.log.pending_lines();
    assert!(
        log.iter()
            .any(|line| line.contains("rejected forwarding to 10.0.0.1:80")),
        "{log:?}"
    );
}

/// Checks that ssh rejects a gateway whose key differs from the known one.
async fn check_wrong_host_key(served: &Served) {
    let other = HostKey::generate().unwrap();
    let mut known_hosts = tempfile::NamedTempFile::new().unwrap();
    writeln!(known_hosts, "{} {}", served.alias, other.public_line()).unwrap();
    known_hosts.flush().unwrap();
    let output = served
        .ssh_with_known_hosts("root", known_hosts.path(), &["true"])
        .await;
    assert_eq!(output.status.code(), Some(255));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Host key verification failed"), "{stderr}");
}

/// Checks the `sftp` subsystem with OpenSSH's `scp` and `sftp`. A file
/// is copied into the container and back byte for byte, and another
/// into the bind mount at `/out`, whose host directory is `out`. Then
/// come a batch of directory operations and the confinement checks.
/// Last, another subsystem is rejected.
async fn check_sftp(served: &Served, out: &Path) {
    let local = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; 5 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    let upload = local.path().join("upload.bin");
    std::fs::write(&upload, &data).unwrap();
    let digest = hex::encode(Sha256::digest(&data));

    let output = served
        .scp("root", upload.to_str().unwrap(), ":/tmp/upload.bin")
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let output = served.ssh("root", &["sha256sum", "/tmp/upload.bin"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert_eq!(stdout.split_whitespace().next(), Some(digest.as_str()));

    let download = local.path().join("download.bin");
    let output = served
        .scp("root", ":/tmp/upload.bin", download.to_str().unwrap())
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let downloaded = std::fs::read(&download).unwrap();
    assert_eq!(downloaded.len(), data.len());
    assert!(
        downloaded == data,
        "the downloaded file differs from the uploaded one"
    );

    let output = served
        .scp("root", upload.to_str().unwrap(), ":/out/upload.bin")
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let mounted = std::fs::read(out.join("upload.bin")).unwrap();
    assert!(
        mounted == data,
        "the file in the bind mount differs from the uploaded one"
    );

    check_sftp_batch(served, local.path()).await;
    check_sftp_confinement(served, local.path()).await;

    let mut args = served.client_options("-p", served.known_hosts.path());
    args.extend([
        "-s".to_string(),
        "root@127.0.0.1".to_string(),
        "other".to_string(),
    ]);
    let output = run_client("ssh", &args).await;
    assert_ne!(output.status.code(), Some(0), "{}", text(&output.stdout));

    // The server exits before it is ready, so the request fails.
    let output = served.sftp_batch("nosuchuser", local.path(), "ls\n").await;
    assert_ne!(output.status.code(), Some(0), "{}", text(&output.stdout));

    let log = served.log.pending_lines();
    assert!(
        log.iter()
            .any(|line| line.contains("SFTP session started for user \"root\"")),
        "{log:?}"
    );
    assert!(
        log.iter().any(
            |line| line.contains("rejected the sftp subsystem for user \"nosuchuser\"")
                && line.contains("not found")
        ),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|line| line.contains("rejected the SSH subsystem \"other\"")),
        "{log:?}"
    );
}

/// Checks that a root login's SFTP server keeps only the capabilities of
/// the container's bounding set, with `no_new_privs`, while an `sftp`
/// session is open. `container_pid` is the container's main process.
async fn check_sftp_capabilities(served: &Served, container_pid: u32) {
    let mut args = vec!["-b".to_string(), "-".to_string()];
    args.extend(served.client_options("-P", served.known_hosts.path()));
    args.push("root@127.0.0.1".to_string());
    // The batch comes from stdin, so the session stays open until stdin
    // closes.
    let mut sftp = tokio::process::Command::new("sftp")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let marker = format!("--pid\0{container_pid}\0--user\0root\0");
    let mut server_status = None;
    for _ in 0..200 {
        server_status = find_process_status("berth-sftp-server", &marker);
        if server_status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server_status = server_status.expect("no berth-sftp-server process within 10 s");

    let container_status =
        std::fs::read_to_string(format!("/proc/{container_pid}/status")).unwrap();
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_string())
    };
    let bounding = field(&container_status, "CapBnd:");
    assert!(bounding.is_some(), "{container_status}");
    assert_eq!(
        field(&server_status, "CapEff:"),
        bounding,
        "{server_status}"
    );
    assert_eq!(
        field(&server_status, "CapPrm:"),
        bounding,
        "{server_status}"
    );
    assert_eq!(field(&server_status, "NoNewPrivs:").as_deref(), Some("1"));
    drop(sftp.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(30), sftp.wait()).await;
}

/// Returns `/proc/PID/status` of a process whose command line contains
/// `program` and `marker`.
fn find_process_status(program: &str, marker: &str) -> Option<String> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(program) && cmdline.contains(marker) {
            return std::fs::read_to_string(entry.path().join("status")).ok();
        }
    }
    None
}

/// Runs an `sftp -b` batch of directory operations and checks each step.
async fn check_sftp_batch(served: &Served, local: &Path) {
    std::fs::write(local.join("note.txt"), "note-content\n").unwrap();
    let batch = "mkdir /tmp/batch\n\
        cd /tmp/batch\n\
        put note.txt\n\
        ls -l\n\
        rename note.txt renamed.txt\n\
        symlink renamed.txt link.txt\n\
        ls -l\n\
        get link.txt fetched.txt\n\
        rm link.txt\n\
        rm renamed.txt\n\
        cd /tmp\n\
        rmdir batch\n\
        ls\n";
    let output = served.sftp_batch("root", local, batch).await;
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        text(&output.stderr)
    );
    let listed: Vec<&str> = stdout.lines().collect();
    assert!(
        listed.iter().any(|line| line.starts_with("-rw-r--r--")
            && line.contains(" root ")
            && line.contains(" 13 ")
            && line.ends_with(" note.txt")),
        "{stdout}"
    );
    assert!(
        listed
            .iter()
            .any(|line| line.starts_with("lrwxrwxrwx") && line.ends_with(" link.txt")),
        "{stdout}"
    );
    assert!(
        listed.iter().any(|line| line.ends_with(" renamed.txt")),
        "{stdout}"
    );
    let fetched = std::fs::read_to_string(local.join("fetched.txt")).unwrap();
    assert_eq!(fetched, "note-content\n");

    let output = served.ssh("root", &["test", "-e", "/tmp/batch"]).await;
    assert_eq!(output.status.code(), Some(1), "/tmp/batch was not removed");
}

/// Checks that `nobody` cannot write to /root, and that `..` and absolute
/// paths reach only the container's files.
async fn check_sftp_confinement(served: &Served, local: &Path) {
    let output = served
        .sftp_batch("nobody", local, "put note.txt /root/denied.txt\n")
        .await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    let output = served
        .ssh("root", &["test", "-e", "/root/denied.txt"])
        .await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "nobody wrote /root/denied.txt"
    );

    let batch = "get ../../../../etc/os-release os-release.txt\n";
    let output = served.sftp_batch("root", local, batch).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let fetched = std::fs::read_to_string(local.join("os-release.txt")).unwrap();
    assert_eq!(fetched.trim(), CONTAINER_OS_RELEASE);

    // A file only the host has, named by a path that climbs out of /root.
    let host_dir = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::write(host_dir.path().join("host-only.txt"), "host").unwrap();
    let batch = format!(
        "get ../../../..{}/host-only.txt escaped.txt\n",
        host_dir.path().display()
    );
    let output = served.sftp_batch("root", local, &batch).await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("not found"), "{stderr}");
    assert!(!local.join("escaped.txt").exists());
}

#[tokio::test]
async fn gateway_sessions_run_in_podman_container() {
    if skip("gateway_sessions_run_in_podman_container") {
        return;
    }
    let runtime = Arc::new(common::runtime().await);
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let mut container = spec(&uuid, &container_command());
    container.env = vec![CONTAINER_VARIABLE.to_string()];
    let id = start(runtime.as_ref(), &container).await;

    let served = serve(runtime.clone(), &id, &uuid).await;
    check_sessions(&served).await;
    check_bulk_transfer(&served).await;
    check_forwarding(&served).await;
    check_wrong_host_key(&served).await;
    runtime.remove(&id).await.unwrap();
}

/// With Podman's command line configured, a root supervisor runs the
/// execs of a Podman container through crun itself: sessions, a terminal
/// and its resizing, and bulk transfers all go that way.
#[tokio::test]
async fn gateway_sessions_run_through_podman_runtime() {
    if skip("gateway_sessions_run_through_podman_runtime") {
        return;
    }
    let api = common::runtime().await;
    if !api.server_version().await.unwrap().starts_with("Podman") {
        println!("gateway_sessions_run_through_podman_runtime: skipped (the engine is not Podman)");
        return;
    }
    let runtime = Arc::new(api.with_podman_command(Some(PathBuf::from("podman"))));
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let mut container = spec(&uuid, &container_command());
    container.env = vec![CONTAINER_VARIABLE.to_string()];
    let id = start(runtime.as_ref(), &container).await;
    assert_eq!(runtime.exec_route(&id).await, ExecRoute::OciRuntime);

    let served = serve(runtime.clone(), &id, &uuid).await;
    check_sessions(&served).await;
    check_resize(&served).await;
    check_bulk_transfer(&served).await;
    check_hang_up(&served, 6_114).await;
    runtime.remove(&id).await.unwrap();
}

#[tokio::test]
async fn gateway_sftp_serves_podman_container() {
    if skip("gateway_sftp_serves_podman_container") {
        return;
    }
    let runtime = Arc::new(common::runtime().await);
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let out = tempfile::tempdir().unwrap();
    let mut container = spec(&uuid, &container_command());
    container.binds = vec![out_mount(out.path())];
    let id = start(runtime.as_ref(), &container).await;
    let served = serve(runtime.clone(), &id, &uuid).await;
    check_sftp(&served, out.path()).await;
    let pid = runtime.root_pid(&id).await.unwrap();
    check_sftp_capabilities(&served, pid).await;
    runtime.remove(&id).await.unwrap();
}

#[tokio::test]
async fn gateway_sftp_serves_crun_container() {
    if skip("gateway_sftp_serves_crun_container") {
        return;
    }
    let uuid = new_uuid();
    let out = tempfile::tempdir().unwrap();
    let crun = CrunContainer::start(&uuid, Vec::new(), vec![out_mount(out.path())]).await;
    let served = serve(crun.runtime.clone(), &crun.id, &uuid).await;
    check_sftp(&served, out.path()).await;
    let pid = crun.runtime.root_pid(&crun.id).await.unwrap();
    check_sftp_capabilities(&served, pid).await;
    crun.runtime.remove(&crun.id).await.unwrap();
}

#[tokio::test]
async fn gateway_sessions_run_in_crun_container() {
    if skip("gateway_sessions_run_in_crun_container") {
        return;
    }
    let uuid = new_uuid();
    let env = vec![CONTAINER_VARIABLE.to_string()];
    let crun = CrunContainer::start(&uuid, env, Vec::new()).await;

    let served = serve(crun.runtime.clone(), &crun.id, &uuid).await;
    check_sessions(&served).await;
    check_bulk_transfer(&served).await;
    check_forwarding(&served).await;
    check_hang_up(&served, 6_113).await;
    crun.runtime.remove(&crun.id).await.unwrap();
}

#[tokio::test]
async fn gateway_connections_over_the_limit_are_closed() {
    if skip("gateway_connections_over_the_limit_are_closed") {
        return;
    }
    let runtime = Arc::new(common::runtime().await);
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let id = start(runtime.as_ref(), &spec(&uuid, &container_command())).await;
    let settings = GatewaySettings {
        max_connections: 1,
        max_channels_per_connection: 1,
    };
    let served = serve_with(runtime.clone(), &id, &uuid, settings).await;

    // A connection that never finishes its handshake takes the only slot.
    let mut holder = tokio::net::TcpStream::connect(served.address)
        .await
        .unwrap();
    let mut banner = [0u8; 8];
    tokio::io::AsyncReadExt::read_exact(&mut holder, &mut banner)
        .await
        .unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    let output = served.ssh("root", &["true"]).await;
    assert_eq!(output.status.code(), Some(255), "{}", text(&output.stderr));
    let log = served.log.pending_lines();
    assert!(
        log.iter()
            .any(|line| line.contains("supervisor.gateway_max_connections")),
        "{log:?}"
    );

    // Its slot is free again once it closes.
    drop(holder);
    let mut status = None;
    for _ in 0..100 {
        let output = served.ssh("root", &["exit 4"]).await;
        status = output.status.code();
        if status == Some(4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some(4));
    runtime.remove(&id).await.unwrap();
}

/// An SSH client for the cases OpenSSH's command line cannot drive: a
/// terminal resized mid-session and several channels on one connection.
/// It accepts only the gateway's published host key.
struct KeyCheck {
    expected: String,
}

impl russh::client::Handler for KeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        Ok(key.to_openssh().unwrap() == self.expected)
    }
}

async fn connect_client(served: &Served) -> russh::client::Handle<KeyCheck> {
    let handler = KeyCheck {
        expected: served.host_key_line.clone(),
    };
    let config = Arc::new(russh::client::Config::default());
    let mut handle = russh::client::connect(config, served.address, handler)
        .await
        .unwrap();
    let auth = handle.authenticate_none("root").await.unwrap();
    assert!(auth.success());
    handle
}

/// Reads the channel until its output contains `text`. Returns the output
/// so far and the exit status, if one arrived.
async fn read_until(
    channel: &mut russh::Channel<russh::client::Msg>,
    output: &mut String,
    text: &str,
) -> Option<u32> {
    let reading = async {
        while !output.contains(text) {
            match channel.wait().await {
                Some(russh::ChannelMsg::Data { data }) => {
                    output.push_str(&String::from_utf8_lossy(&data));
                }
                Some(russh::ChannelMsg::ExitStatus { exit_status }) => {
                    return Some(exit_status);
                }
                Some(_) => {}
                None => return None,
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .unwrap_or_else(|_| panic!("no {text:?} within 30 s in: {output}"))
}

/// Returns whether a process whose command line is `command` runs on
/// this host.
fn process_runs(command: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|line| {
                line.split(|byte| *byte == 0)
                    .filter(|arg| !arg.is_empty())
                    .collect::<Vec<_>>()
                    == command.split(' ').map(str::as_bytes).collect::<Vec<_>>()
            })
            .unwrap_or(false)
    })
}

/// Checks that a session's process gets SIGHUP when its client goes away
/// while it runs, with a terminal and without. `seconds` makes the
/// `sleep` command line unique to the caller.
async fn check_hang_up(served: &Served, seconds: u32) {
    for terminal in [false, true] {
        let command = format!("sleep {seconds}");
        let client = connect_client(served).await;
        let channel = client.channel_open_session().await.unwrap();
        if terminal {
            channel
                .request_pty(true, "xterm", 80, 24, 0, 0, &[])
                .await
                .unwrap();
        }
        channel.exec(true, command.as_str()).await.unwrap();
        let started = tokio::time::Instant::now();
        while !process_runs(&command) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{command} did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(channel);
        drop(client);
        let closed_at = tokio::time::Instant::now();
        while process_runs(&command) {
            assert!(
                closed_at.elapsed() < Duration::from_secs(30),
                "{command} (terminal {terminal}) still runs 30 s after its client went away"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks that a `window-change` resizes the session's terminal.
async fn check_resize(served: &Served) {
    let client = connect_client(served).await;
    let mut channel = client.channel_open_session().await.unwrap();
    channel
        .request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    channel.request_shell(true).await.unwrap();
    let mut output = String::new();
    channel.data(&b"stty size\n"[..]).await.unwrap();
    read_until(&mut channel, &mut output, "24 80").await;

    channel.window_change(132, 43, 0, 0).await.unwrap();
    channel.data(&b"stty size\n"[..]).await.unwrap();
    read_until(&mut channel, &mut output, "43 132").await;

    channel.data(&b"exit 6\n"[..]).await.unwrap();
    let mut status = None;
    let waiting = async {
        while let Some(message) = channel.wait().await {
            if let russh::ChannelMsg::ExitStatus { exit_status } = message {
                status = Some(exit_status);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the channel did not close within 30 s");
    assert_eq!(status, Some(6), "{output}");
}

#[tokio::test]
async fn gateway_resizes_podman_terminal() {
    if skip("gateway_resizes_podman_terminal") {
        return;
    }
    let runtime = Arc::new(common::runtime().await);
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let id = start(runtime.as_ref(), &spec(&uuid, &container_command())).await;
    let served = serve(runtime.clone(), &id, &uuid).await;
    check_resize(&served).await;
    runtime.remove(&id).await.unwrap();
}

#[tokio::test]
async fn gateway_resizes_crun_terminal() {
    if skip("gateway_resizes_crun_terminal") {
        return;
    }
    let uuid = new_uuid();
    let crun = CrunContainer::start(&uuid, Vec::new(), Vec::new()).await;
    let served = serve(crun.runtime.clone(), &crun.id, &uuid).await;
    check_resize(&served).await;
    crun.runtime.remove(&crun.id).await.unwrap();
}

#[tokio::test]
async fn gateway_channels_over_the_limit_are_rejected() {
    if skip("gateway_channels_over_the_limit_are_rejected") {
        return;
    }
    let runtime = Arc::new(common::runtime().await);
    let uuid = new_uuid();
    let _cleanup = Cleanup::new(&uuid);
    let id = start(runtime.as_ref(), &spec(&uuid, &container_command())).await;
    let settings = GatewaySettings {
        max_connections: 4,
        max_channels_per_connection: 2,
    };
    let served = serve_with(runtime.clone(), &id, &uuid, settings).await;
    let client = connect_client(&served).await;

    let first = client.channel_open_session().await.unwrap();
    let second = client.channel_open_session().await.unwrap();
    let third = client.channel_open_session().await;
    assert!(third.is_err(), "a third channel was accepted");
    let log = served.log.pending_lines();
    assert!(
        log.iter()
            .any(|line| line.contains("supervisor.gateway_max_channels_per_connection")),
        "{log:?}"
    );

    // A closed channel frees its place.
    first.close().await.unwrap();
    drop(first);
    let mut reopened = None;
    for _ in 0..100 {
        if let Ok(channel) = client.channel_open_session().await {
            reopened = Some(channel);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut channel = reopened.expect("no channel opened after one closed");
    channel.exec(true, "echo reopened; exit 2").await.unwrap();
    let mut output = String::new();
    read_until(&mut channel, &mut output, "reopened").await;
    drop(second);
    runtime.remove(&id).await.unwrap();
}

/// Returns a writable bind mount of `host_path` at `/out`.
fn out_mount(host_path: &Path) -> BindMount {
    BindMount {
        host_path: host_path.to_path_buf(),
        container_path: "/out".to_string(),
        read_only: false,
    }
}

/// A container of the test image run by crun, with its runtime's cache
/// and work directories, which live as long as it.
struct CrunContainer {
    runtime: Arc<OciRuntime>,
    id: ContainerId,
    _cache: tempfile::TempDir,
    _work: tempfile::TempDir,
}

impl CrunContainer {
    /// Starts [`container_command`] with the environment `env` and the
    /// bind mounts `binds`.
    async fn start(uuid: &str, env: Vec<String>, binds: Vec<BindMount>) -> CrunContainer {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let runtime = Arc::new(
            OciRuntime::new(Path::new("crun"), cache.path(), work.path())
                .await
                .unwrap_or_else(|error| panic!("{error}")),
        );
        let source = ImageSource::Archive(
            ImageArchive::open(&test_image_archive(), &[test_image_archive_dir()]).unwrap(),
        );
        let mut container = spec(uuid, &container_command());
        container.image = runtime.ensure_image(&source).await.unwrap();
        container.env = env;
        container.binds = binds;
        let id = start(runtime.as_ref(), &container).await;
        CrunContainer {
            runtime,
            id,
            _cache: cache,
            _work: work,
        }
    }
}

/// Creates and starts a container and waits until its command has
/// written `/etc/os-release`.
async fn start(runtime: &dyn Runtime, spec: &ContainerSpec) -> ContainerId {
    let id = runtime
        .create(spec)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    // The output is not read; the attach only keeps the runtime's order.
    let _output = runtime.attach(&id).await.unwrap();
    runtime.start(&id).await.unwrap();
    for _ in 0..200 {
        let written = runtime
            .read_file(&id, "/etc/os-release", 4096)
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        if written.as_deref().map(|bytes| bytes.starts_with(b"ID=")) == Some(true) {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the container did not write /etc/os-release within 10 s");
}
