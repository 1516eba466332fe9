//! `berth shell`, `berth ssh-proxy` and `berth ssh-config`: the system
//! OpenSSH client, reaching a running container's gateway through the
//! controller.
//!
//! `berth ssh-proxy HOST` is the `ProxyCommand`: it asks the controller to
//! join its connection to the container's gateway (an HTTP upgrade of
//! `POST /arvados/v1/connect/{uuid}/ssh`) and then copies bytes between
//! its stdin and stdout and that connection. The controller checks that the
//! caller owns the container's request or is an administrator. When the
//! controller closes the connection while ssh still uses it (the controller
//! holding the container's tunnel shut down), `ssh-proxy` prints why on
//! stderr, since ssh reports only that the connection closed.
//!
//! Host keys are checked strictly. Each container's gateway publishes its
//! host key on the container record (`gateway_host_key`), which the client
//! reads over the authenticated API. `berth shell` writes it to a
//! temporary known_hosts file of its own. With `berth ssh-config`, plain
//! `ssh` reads a known_hosts file that `ssh-proxy --known-hosts` updates
//! before any byte of the SSH protocol passes, so the key is in place when
//! `ssh` checks it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use berth_client::ClientError;
use berth_core::{Container, ContainerState};
use clap::Args;
use nix::fcntl::{Flock, FlockArg};
use tokio::io::{AsyncWriteExt, BufReader};

use super::api::{Api, Target};

/// Bytes `berth ssh-proxy` reads at once in each direction. Tokio's
/// `copy` moves 8 KiB at a time, and each write to stdout is a hop to a
/// blocking thread, so a bulk transfer gains from larger pieces.
const PROXY_BUFFER_BYTES: usize = 256 * 1024;

/// The host name suffix `berth ssh-config` sets up: `UUID.berth`.
pub const DEFAULT_HOST_SUFFIX: &str = "berth";

/// How long `berth ssh-proxy` keeps waiting, for the time in the
/// controller's `Retry-After`, for a shell connection the controller cannot open
/// yet (a tunnel still connecting, a full shell pool).
const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// The ciphers `berth shell` and the `berth ssh-config` snippet offer, AES-GCM
/// first: on CPUs with AES instructions the gateway encrypts it faster
/// than OpenSSH's first choice, chacha20-poly1305 (see docs/BENCHMARKS.md).
/// Every one of them is in OpenSSH since 6.5.
const CIPHERS: &str = "aes256-gcm@openssh.com,aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr";

/// The user a shell logs in as unless one is given.
const DEFAULT_USER: &str = "root";

/// How long `ssh-proxy` waits, after the controller closed the connection,
/// for ssh to end its side before it reports the connection as cut.
const SSH_EXIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Container or container request UUID, as `[USER@]UUID`; the user in
    /// the container defaults to root.
    #[arg(value_name = "[USER@]UUID")]
    target: String,
    /// Forward a local port into the container, as ssh's `-L`
    /// (`8888:localhost:80`); repeat for more.
    #[arg(short = 'L', value_name = "SPEC")]
    forward: Vec<String>,
    /// Pass an option to ssh, as ssh's `-o` (`ServerAliveInterval=30`);
    /// repeat for more.
    #[arg(short = 'o', value_name = "OPTION")]
    ssh_options: Vec<String>,
    /// Allocate a terminal even for a command (ssh's `-t`).
    #[arg(short = 't', conflicts_with = "no_tty")]
    tty: bool,
    /// Allocate no terminal (ssh's `-T`).
    #[arg(short = 'T')]
    no_tty: bool,
    /// The command to run; without one, an interactive shell. As with
    /// ssh, its words are joined with spaces and run by the user's shell
    /// in the container, so quote it as for ssh: `-- sh -c "'exit 42'"`,
    /// or `-- 'ls | wc -l'`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SshProxyArgs {
    /// Add the container's published host key to this known_hosts file,
    /// for the host name as given, before connecting.
    #[arg(long, value_name = "FILE")]
    known_hosts: Option<PathBuf>,
    /// The host name ssh was given (`%n`): a container or container
    /// request UUID, optionally followed by a domain such as `.berth`.
    #[arg(value_name = "HOST")]
    host: String,
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// The domain of the host names, as in `UUID.berth`.
    #[arg(long, default_value = DEFAULT_HOST_SUFFIX, value_name = "DOMAIN")]
    suffix: String,
    /// The known_hosts file for the containers' host keys; default
    /// `$XDG_CONFIG_HOME/berth/known_hosts` or
    /// `~/.config/berth/known_hosts`.
    #[arg(long, value_name = "FILE")]
    known_hosts: Option<PathBuf>,
}

/// `berth shell`: runs `ssh` into the container and exits with its status.
pub async fn execute_shell(args: ShellArgs) -> anyhow::Result<ExitCode> {
    let (user, target) = split_user(&args.target);
    let api = Api::from_env()?;
    let container = running_container(&api, &Target::parse(target)?).await?;
    let host_key = published_host_key(&container)?;

    let dir = tempfile::Builder::new()
        .prefix("berth-shell-")
        .tempdir()
        .context("failed to create a temporary directory for the known_hosts file")?;
    let known_hosts = dir.path().join("known_hosts");
    write_private(
        &known_hosts,
        known_hosts_line(&container.uuid, host_key).as_bytes(),
    )?;

    let exe = std::env::current_exe().context("failed to find the path of the berth program")?;
    let mut ssh_args = ssh_arguments(
        &exe,
        &container.uuid,
        &known_hosts,
        user.unwrap_or(DEFAULT_USER),
    );
    for spec in &args.forward {
        ssh_args.push("-L".into());
        ssh_args.push(spec.clone());
    }
    for option in &args.ssh_options {
        ssh_args.push("-o".into());
        ssh_args.push(option.clone());
    }
    // After the caller's options, since ssh keeps the first value of each.
    ssh_args.push("-o".into());
    ssh_args.push(format!("Ciphers={CIPHERS}"));
    if args.tty {
        ssh_args.push("-t".into());
    }
    if args.no_tty {
        ssh_args.push("-T".into());
    }
    ssh_args.push(container.uuid.clone());
    if !args.command.is_empty() {
        ssh_args.push("--".into());
        ssh_args.extend(args.command.iter().cloned());
    }

    let status = tokio::process::Command::new("ssh")
        .args(&ssh_args)
        .status()
        .await
        .context("failed to run ssh: install the OpenSSH client (Debian: openssh-client)")?;
    drop(dir);
    Ok(exit_code(status))
}

/// `berth ssh-proxy`: joins stdin and stdout to the container's gateway.
pub async fn execute_proxy(args: SshProxyArgs) -> anyhow::Result<ExitCode> {
    let uuid = host_uuid(&args.host);
    let api = Api::from_env()?;
    let container = running_container(&api, &Target::parse(uuid)?).await?;
    if let Some(path) = &args.known_hosts {
        let host_key = published_host_key(&container)?;
        let host = args.host.rsplit('@').next().unwrap_or(&args.host);
        update_known_hosts(path, host, host_key)?;
    }

    let stdio_pipes = stdio_are_pipes();
    let connection = connect(&api, &container.uuid, stdio_pipes)
        .await
        .map_err(|err| api.explain(err))
        .with_context(|| {
            format!(
                "failed to open a shell connection to container {}",
                container.uuid
            )
        })?;
    let (ssh_done, downloaded) = match connection {
        Connection::Plain(plain) => splice_stdio(plain).await?,
        Connection::Upgraded(upgraded) => copy_stdio(upgraded).await,
    };
    if !ssh_done {
        eprintln!(
            "berth ssh-proxy: the shell connection to container {} closed before ssh ended it: \
             the controller that holds the container's tunnel shut down or lost the tunnel, or \
             the container's gateway ended the connection (see ssh's message and the \
             supervisor's log). Run the command again to reach the container through another \
             controller.",
            container.uuid
        );
    }
    downloaded.context("the shell connection to the container failed")?;
    Ok(ExitCode::SUCCESS)
}

/// The shell connection of `ssh-proxy`.
enum Connection {
    /// A plain TCP socket (an `http://` controller), whose bytes move to
    /// and from stdin and stdout with splice(2).
    Plain(berth_client::PlainShellConnection),
    /// Any other connection, copied through buffers.
    Upgraded(berth_client::Upgraded),
}

/// True when stdin and stdout are pipes, as ssh gives a `ProxyCommand`,
/// and stderr is not the pipe of stdout. The splice path puts stdin and
/// stdout in non-blocking mode, which a write to stderr through the same
/// pipe would not expect.
fn stdio_are_pipes() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    let metadata = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map(File::from)
            .and_then(|file| file.metadata())
            .ok()
    };
    let (Some(stdin), Some(stdout)) = (
        metadata(std::io::stdin().as_fd()),
        metadata(std::io::stdout().as_fd()),
    ) else {
        return false;
    };
    let stderr_shares_stdout = metadata(std::io::stderr().as_fd())
        .is_some_and(|stderr| (stderr.dev(), stderr.ino()) == (stdout.dev(), stdout.ino()));
    stdin.file_type().is_fifo() && stdout.file_type().is_fifo() && !stderr_shares_stdout
}

/// Moves the bytes between stdin and stdout and the socket with
/// splice(2) until the connection ends; see [`finish_stdio`] for the
/// result.
async fn splice_stdio(
    plain: berth_client::PlainShellConnection,
) -> anyhow::Result<(bool, std::io::Result<u64>)> {
    use berth_tunnel::splice::{splice_one_way, Sink, Source};
    use std::os::fd::AsFd;
    use tokio::net::unix::pipe;

    let duplicate = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
    let stdin = pipe::Receiver::from_owned_fd(duplicate(std::io::stdin().as_fd())?)
        .context("failed to use stdin as a pipe")?;
    let stdout = pipe::Sender::from_owned_fd(duplicate(std::io::stdout().as_fd())?)
        .context("failed to use stdout as a pipe")?;
    let socket = &plain.socket;
    let upload = splice_one_way(Source::Pipe(&stdin), Sink::Tcp(socket), b"");
    let download = splice_one_way(Source::Tcp(socket), Sink::Pipe(&stdout), &plain.unread);
    let result = finish_stdio(upload, download).await;
    // Back to blocking mode, which the rest of the process and ssh's
    // other users of these pipes expect.
    let _ = stdin.into_blocking_fd();
    let _ = stdout.into_blocking_fd();
    Ok(result)
}

/// Copies the bytes between stdin and stdout and the connection through
/// buffers until the connection ends; see [`finish_stdio`] for the result.
async fn copy_stdio(connection: berth_client::Upgraded) -> (bool, std::io::Result<u64>) {
    let (mut from_gateway, mut to_gateway) = tokio::io::split(connection);
    let upload = async move {
        let mut stdin = BufReader::with_capacity(PROXY_BUFFER_BYTES, tokio::io::stdin());
        let copied = tokio::io::copy_buf(&mut stdin, &mut to_gateway).await;
        // The end of stdin ends the stream towards the gateway; the
        // gateway's output still comes back.
        let _ = to_gateway.shutdown().await;
        copied
    };
    let download = async move {
        let mut stdout = tokio::io::stdout();
        let mut from_gateway = BufReader::with_capacity(PROXY_BUFFER_BYTES, &mut from_gateway);
        let copied = tokio::io::copy_buf(&mut from_gateway, &mut stdout).await;
        let _ = stdout.flush().await;
        copied
    };
    finish_stdio(upload, download).await
}

/// Runs the two directions of `ssh-proxy` until the download from the
/// gateway ends, and then gives the upload [`SSH_EXIT_WAIT`] to end.
/// Returns whether ssh ended the session, and the download's result.
///
/// When ssh ends a session, it closes this program's stdin (the upload
/// then ends without error) or ends it with SIGHUP. A connection that
/// the controller closes first was cut while ssh still used it, which
/// ssh reports only as a closed connection.
async fn finish_stdio(
    upload: impl std::future::Future<Output = std::io::Result<u64>>,
    download: impl std::future::Future<Output = std::io::Result<u64>>,
) -> (bool, std::io::Result<u64>) {
    tokio::pin!(upload, download);
    let mut uploaded = None;
    let downloaded = loop {
        tokio::select! {
            result = &mut download => break result,
            result = &mut upload, if uploaded.is_none() => uploaded = Some(result),
        }
    };
    if uploaded.is_none() {
        uploaded = tokio::time::timeout(SSH_EXIT_WAIT, &mut upload).await.ok();
    }
    (matches!(uploaded, Some(Ok(_))), downloaded)
}

/// Opens the shell connection, on a plain socket of its own when `plain`
/// and the controller's URL allow it. A busy controller, or a gateway
/// whose tunnel is not connected yet, responds with 503 and
/// `Retry-After`: that wait is honoured, with a note on stderr, for up to
/// [`CONNECT_PATIENCE`].
async fn connect(api: &Api, uuid: &str, plain: bool) -> Result<Connection, ClientError> {
    let started = std::time::Instant::now();
    loop {
        let attempt = async {
            if plain {
                if let Some(connection) = api.client.connect_ssh_plain(uuid).await? {
                    return Ok(Connection::Plain(connection));
                }
            }
            api.client.connect_ssh(uuid).await.map(Connection::Upgraded)
        };
        match attempt.await {
            Err(err) if err.status() == Some(berth_client::StatusCode::SERVICE_UNAVAILABLE) => {
                let Some(wait) = err.retry_after() else {
                    return Err(err);
                };
                if started.elapsed() + wait > CONNECT_PATIENCE {
                    return Err(err);
                }
                eprintln!(
                    "berth: the controller cannot open the shell yet ({err}); trying again in {} s",
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
            }
            result => return result,
        }
    }
}

/// `berth ssh-config`: prints an OpenSSH configuration snippet.
pub fn execute_config(args: SshConfigArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("failed to find the path of the berth program")?;
    let known_hosts = match args.known_hosts {
        Some(path) => path,
        None => default_known_hosts()?,
    };
    print!("{}", ssh_config(&exe, &args.suffix, &known_hosts)?);
    Ok(ExitCode::SUCCESS)
}

/// Splits `USER@UUID` into the user and the UUID.
fn split_user(target: &str) -> (Option<&str>, &str) {
    match target.split_once('@') {
        Some((user, uuid)) if !user.is_empty() => (Some(user), uuid),
        Some((_, uuid)) => (None, uuid),
        None => (None, target),
    }
}

/// Returns the UUID in a host name: what precedes the first dot, after an
/// optional `USER@`.
fn host_uuid(host: &str) -> &str {
    let host = host.rsplit('@').next().unwrap_or(host);
    host.split('.').next().unwrap_or(host)
}

/// Fetches the target's container and checks that it runs.
async fn running_container(api: &Api, target: &Target) -> anyhow::Result<Container> {
    let uuid = match target {
        Target::Container(uuid) => uuid.to_string(),
        Target::Request(uuid) => {
            let request = api
                .client
                .get_container_request(uuid.as_str())
                .await
                .map_err(|err| api.explain(err))
                .with_context(|| format!("failed to get container request {uuid}"))?;
            request.container_uuid.with_context(|| {
                format!(
                    "container request {uuid} has no container (it is {}), so there is nothing to open a shell in",
                    request.state
                )
            })?
        }
    };
    let container = api
        .client
        .get_container(&uuid)
        .await
        .map_err(|err| api.explain(err))
        .with_context(|| format!("failed to get container {uuid}"))?;
    if container.state != ContainerState::Running {
        bail!(
            "container {uuid} is {}: a shell needs a Running container",
            container.state
        );
    }
    Ok(container)
}

fn published_host_key(container: &Container) -> anyhow::Result<&str> {
    container.gateway_host_key.as_deref().ok_or_else(|| {
        anyhow!(
            "container {} has not published its gateway's host key yet; try again in a few seconds",
            container.uuid
        )
    })
}

fn known_hosts_line(host: &str, host_key: &str) -> String {
    format!("{host} {host_key}\n")
}

/// Builds the ssh arguments that every `berth shell` uses: the proxy
/// command, strict host key checking against `known_hosts` only, and no
/// connection sharing, since each container has its own gateway.
fn ssh_arguments(exe: &Path, uuid: &str, known_hosts: &Path, user: &str) -> Vec<String> {
    let proxy = format!("{} ssh-proxy %n", ssh_quote(&exe.to_string_lossy()));
    [
        "-o".to_string(),
        format!("ProxyCommand={proxy}"),
        "-o".to_string(),
        format!(
            "UserKnownHostsFile={}",
            ssh_quote(&known_hosts.to_string_lossy())
        ),
        "-o".to_string(),
        "GlobalKnownHostsFile=/dev/null".to_string(),
        "-o".to_string(),
        "StrictHostKeyChecking=yes".to_string(),
        "-o".to_string(),
        format!("HostKeyAlias={uuid}"),
        "-o".to_string(),
        "ControlMaster=no".to_string(),
        "-o".to_string(),
        "ControlPath=none".to_string(),
        "-l".to_string(),
        user.to_string(),
    ]
    .to_vec()
}

/// Builds the `berth ssh-config` snippet.
fn ssh_config(exe: &Path, suffix: &str, known_hosts: &Path) -> anyhow::Result<String> {
    if suffix.is_empty()
        || !suffix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        bail!("invalid --suffix {suffix:?}: expected a domain of letters, digits, '-' and '.', such as berth");
    }
    let known_hosts_text = known_hosts.to_string_lossy();
    let exe = ssh_quote(&exe.to_string_lossy());
    let known = ssh_quote(&known_hosts_text);
    Ok(format!(
        "# Berth: `ssh UUID.{suffix}`, `scp`, `sftp` and `ssh -L` reach running containers\n\
         # (UUID: a container or container request). The controller and token come\n\
         # from BERTH_API_HOST and BERTH_API_TOKEN in ssh's environment.\n\
         Host *.{suffix}\n\
         \x20   ProxyCommand {exe} ssh-proxy --known-hosts {known} %n\n\
         \x20   UserKnownHostsFile {known}\n\
         \x20   StrictHostKeyChecking yes\n\
         \x20   Ciphers {CIPHERS}\n\
         \x20   User root\n\
         \x20   ControlMaster no\n\
         \x20   ControlPath none\n"
    ))
}

/// Quotes a word for the shell that runs ssh's ProxyCommand, and escapes
/// `%`, which ssh expands in it.
fn ssh_quote(word: &str) -> String {
    let escaped = word.replace('%', "%%");
    if escaped
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:=,%".contains(c))
    {
        escaped
    } else {
        format!("'{}'", escaped.replace('\'', r"'\''"))
    }
}

fn default_known_hosts() -> anyhow::Result<PathBuf> {
    let config = match std::env::var_os("XDG_CONFIG_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .context("HOME is not set: give the file with --known-hosts")?;
            PathBuf::from(home).join(".config")
        }
    };
    Ok(config.join("berth").join("known_hosts"))
}

/// Replaces the entry of `host` in a known_hosts file, keeping the other
/// lines. The file is rewritten through a temporary file and a rename,
/// under a lock, so concurrent proxies never leave it half-written.
fn update_known_hosts(path: &Path, host: &str, host_key: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create the directory {}", dir.display()))?;
    let lock_path = path.with_extension("lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("failed to open {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("failed to lock {}: {errno}", lock_path.display()))?;

    let existing = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("failed to read {}", path.display()))
        }
    };
    let mut text: String = existing
        .lines()
        .filter(|line| line.split_whitespace().next() != Some(host))
        .map(|line| format!("{line}\n"))
        .collect();
    text.push_str(&known_hosts_line(host, host_key));

    let temporary = path.with_extension("tmp");
    write_private(&temporary, text.as_bytes())?;
    fs::rename(&temporary, path).with_context(|| {
        format!(
            "failed to replace {} with {}",
            path.display(),
            temporary.display()
        )
    })
}

/// Writes a file readable by its owner only, and syncs it.
fn write_private(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let mut file: File = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("failed to write {}", path.display()))
}

/// Returns ssh's exit status: its own 255 for its failures, the remote
/// command's status otherwise.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        None => ExitCode::from(255),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKf01Q1Af7I6Nsx4Es7W3tYPHCf0j12YKWsDt4C11+tA";

    #[test]
    fn split_user_reads_user_and_uuid() {
        assert_eq!(
            split_user("alice@zzzzz-dz642-000000000000001"),
            (Some("alice"), "zzzzz-dz642-000000000000001")
        );
        assert_eq!(
            split_user("zzzzz-dz642-000000000000001"),
            (None, "zzzzz-dz642-000000000000001")
        );
        assert_eq!(
            split_user("@zzzzz-dz642-000000000000001"),
            (None, "zzzzz-dz642-000000000000001")
        );
    }

    #[test]
    fn host_uuid_drops_user_and_domain() {
        for host in [
            "zzzzz-dz642-000000000000001",
            "zzzzz-dz642-000000000000001.berth",
            "root@zzzzz-dz642-000000000000001.cluster.berth",
        ] {
            assert_eq!(host_uuid(host), "zzzzz-dz642-000000000000001", "{host}");
        }
    }

    #[test]
    fn ssh_arguments_keep_strict_checking() {
        let args = ssh_arguments(
            Path::new("/opt/berth dir/berth"),
            "zzzzz-dz642-000000000000001",
            Path::new("/tmp/k/known_hosts"),
            "alice",
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("ProxyCommand='/opt/berth dir/berth' ssh-proxy %n"),
            "{joined}"
        );
        assert!(joined.contains("StrictHostKeyChecking=yes"), "{joined}");
        assert!(
            joined.contains("UserKnownHostsFile=/tmp/k/known_hosts"),
            "{joined}"
        );
        assert!(
            joined.contains("GlobalKnownHostsFile=/dev/null"),
            "{joined}"
        );
        assert!(
            joined.contains("HostKeyAlias=zzzzz-dz642-000000000000001"),
            "{joined}"
        );
        assert!(joined.ends_with("-l alice"), "{joined}");
    }

    #[test]
    fn ssh_quote_escapes_shell_and_percent() {
        assert_eq!(ssh_quote("/usr/bin/berth"), "/usr/bin/berth");
        assert_eq!(ssh_quote("/a b/berth"), "'/a b/berth'");
        assert_eq!(ssh_quote("/it's/berth"), r"'/it'\''s/berth'");
        assert_eq!(ssh_quote("/100%/berth"), "/100%%/berth");
    }

    #[test]
    fn ssh_config_names_proxy_and_known_hosts() {
        let text = ssh_config(
            Path::new("/usr/local/bin/berth"),
            "berth",
            Path::new("/home/a/.config/berth/known_hosts"),
        )
        .unwrap();
        assert!(text.contains("Host *.berth\n"), "{text}");
        assert!(
            text.contains(
                "    ProxyCommand /usr/local/bin/berth ssh-proxy --known-hosts /home/a/.config/berth/known_hosts %n\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("    UserKnownHostsFile /home/a/.config/berth/known_hosts\n"),
            "{text}"
        );
        assert!(text.contains("    StrictHostKeyChecking yes\n"), "{text}");
        assert!(
            text.contains("    Ciphers aes256-gcm@openssh.com,aes128-gcm@openssh.com,"),
            "{text}"
        );
    }

    #[test]
    fn ssh_config_rejects_a_bad_suffix() {
        let error = ssh_config(Path::new("/b"), "a b", Path::new("/k")).unwrap_err();
        assert!(error.to_string().contains("--suffix"), "{error}");
    }

    #[test]
    fn known_hosts_update_replaces_only_its_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth").join("known_hosts");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(
            &path,
            "other.berth ssh-ed25519 AAAAother\nzzzzz-dz642-000000000000001.berth ssh-ed25519 AAAAold\n",
        )
        .unwrap();

        update_known_hosts(&path, "zzzzz-dz642-000000000000001.berth", KEY).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("other.berth ssh-ed25519 AAAAother\n"),
            "{text}"
        );
        assert!(!text.contains("AAAAold"), "{text}");
        assert!(
            text.ends_with(&format!("zzzzz-dz642-000000000000001.berth {KEY}\n")),
            "{text}"
        );

        let mode = fs::metadata(&path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn known_hosts_update_creates_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new").join("known_hosts");
        update_known_hosts(&path, "h.berth", KEY).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("h.berth {KEY}\n")
        );
    }
}
