//! `berth dev`: a controller and a dispatcher in one process, for one host.
//!
//! Everything lives in a *data directory* (mode 0700), kept across runs:
//!
//! | file | contents |
//! | --- | --- |
//! | `system-token` | the system token, made on the first run (0600) |
//! | `user-token` | the token of the `dev` user, made on the first run (0600) |
//! | `berth.db` | the SQLite database |
//! | `tls-certificate.pem` | the API's self-signed certificate for 127.0.0.1, ::1 and localhost, made on the first run (0600) |
//! | `tls-key.pem` | its private key (0600) |
//! | `config.yml` | the configuration, rewritten at each start; jobs read its `supervisor` section |
//! | `credentials/` | the dispatcher's credentials files for its jobs |
//! | `logs/` | the supervisors' own output: `<container uuid>.log` (local backend), `slurm-<job id>.out` (Slurm) |
//! | `env` | the shell lines that point user commands at this controller (0600) |
//!
//! The cluster id is made on the first run and read back from `config.yml`
//! afterwards, so that the database's UUIDs keep their prefix.
//!
//! `env` is removed at start. Once the controller listens and the
//! dispatcher has started, it is written under a temporary name and
//! renamed, so a script may wait for it to appear. Shutdown removes it.
//! The same lines go to stdout, which carries nothing else.
//!
//! The API is served over HTTPS with the self-signed certificate, so the
//! `env` file sets `BERTH_API_HOST` to `host:port` (which means HTTPS) and
//! `BERTH_API_HOST_INSECURE=1`, and the same three settings under their
//! `ARVADOS_` names for Arvados's own clients. The dispatcher, and through
//! their credentials files the supervisors, skip the certificate check too.
//! `--plain-http` serves plain HTTP instead; the `env` file then gives an
//! `http://` URL and no `ARVADOS_` lines, since Arvados's clients speak
//! HTTPS only.
//!
//! The dispatcher uses Slurm when `sbatch --version` and
//! `squeue --noheader --user=$(id -un)` both succeed, and otherwise runs
//! each container as a child process (the local backend).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use berth_client::{Client, Settings, Token};
use berth_core::ClusterId;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::daemon::{dispatch_client, init_logging, shutdown_on_signal};
use super::data_dir::{read_token_file, remove_if_present, utf8, write_private_file, DataDir};
use crate::config::Config;

/// The data directory when `--data-dir` is not given.
const DEFAULT_DATA_DIR: &str = ".berth-dev";

/// The controller's address when `--listen` is not given.
const DEFAULT_LISTEN: &str = "127.0.0.1:8000";

/// Name of the user `berth dev` creates, whose token it prints.
const DEV_USER_NAME: &str = "dev";

/// How long each Slurm probe (`sbatch --version`, `squeue`) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the dispatcher may take to stop before it is abandoned and the
/// controller stops anyway.
const DISPATCHER_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Time between two polls of the batch system, much shorter than the
/// dispatcher's default. What only a poll notices (a job that left the
/// batch system, why a job is pending) then shows within seconds. While the
/// change feed cannot be read, each poll lists the queue, so a container
/// still starts within a second.
const DEV_POLL_INTERVAL: &str = "1s";

/// Time between two listings of the queue while the dispatcher follows the
/// change feed, shorter than the dispatcher's default of 5 min. One host
/// with one SQLite database affords it, and a change the feed missed is
/// then repaired within seconds.
const DEV_RESYNC_INTERVAL: &str = "10s";

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Directory for the database, tokens and configuration; made if
    /// missing.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address and port for the API; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Batch system: slurm, local (child processes), or auto (slurm when
    /// sbatch and squeue work here).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Docker Engine API socket for the containers, such as
    /// unix:///tmp/podman.sock; DOCKER_HOST when not given.
    #[arg(long, value_name = "URL")]
    docker_host: Option<String>,
    /// Serve the API over plain HTTP instead of HTTPS with the data
    /// directory's self-signed certificate.
    #[arg(long)]
    plain_http: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Auto,
    Slurm,
    Local,
}

/// A dispatcher backend, by its name in the `dispatch` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Slurm,
    Local,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Slurm => "slurm",
            Backend::Local => "local",
        }
    }
}

pub async fn execute(args: DevArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let shutdown = shutdown_on_signal()?;
    let dir = DataDir::open(&args.data_dir)?;
    remove_if_present(&dir.env_file())?;

    let system_token = dir.system_token()?;
    let cluster_id = dir.cluster_id()?;
    let backend = choose_backend(args.backend).await;
    let docker_host = args.docker_host.clone().or_else(|| {
        std::env::var("DOCKER_HOST")
            .ok()
            .filter(|value| !value.is_empty())
    });

    let cluster = berth_controller::ClusterSettings {
        cluster_id: cluster_id.clone(),
        system_token: system_token.clone(),
    };
    let mut controller_config = berth_controller::Config::new(args.listen, dir.database_url()?);
    controller_config.blocks.directory = dir.root.join("blocks");
    let tls = !args.plain_http;
    if tls {
        let (certificate, key) = dir.tls_pair()?;
        controller_config.tls_certificate = Some(certificate);
        controller_config.tls_key = Some(key);
    }
    let bound = berth_controller::bind(cluster.clone(), controller_config.clone())
        .await
        .with_context(|| format!("failed to start the controller on {}", args.listen))?;
    let local_addr = bound.local_addr();
    let endpoint = Endpoint::new(local_addr, tls);
    let api_url = endpoint.url();
    tracing::info!(address = %local_addr, url = %api_url, data_dir = %dir.root.display(), "controller listening");

    let config_text = config_yaml(&DevConfig {
        cluster_id: &cluster_id,
        dir: &dir,
        listen: local_addr,
        tls,
        backend,
        api_url: &api_url,
        docker_host: docker_host.as_deref(),
    })?;
    write_private_file(&dir.config_file(), config_text.as_bytes())?;
    let config = Config::load(&dir.config_file())?;

    let controller_stop = CancellationToken::new();
    let controller = tokio::spawn(bound.run(controller_stop.clone().cancelled_owned()));
    let mut services = Services {
        controller: Some(controller),
        controller_stop,
        dispatcher: None,
        dispatcher_stop: shutdown.clone(),
    };

    let started = start_dispatcher(
        &dir,
        &cluster,
        &controller_config,
        &config,
        &endpoint,
        shutdown.clone(),
    )
    .await;
    let result = match started {
        Ok((dispatcher, user_token)) => {
            services.dispatcher = Some(dispatcher);
            let env = EnvFile::publish(&dir.env_file(), &env_lines(&endpoint, &user_token))?;
            let result = services.wait(&shutdown).await;
            drop(env);
            result
        }
        Err(err) => Err(err),
    };
    let stopped = services.stop().await;
    match (result, stopped) {
        (Ok(()), Ok(())) => Ok(ExitCode::SUCCESS),
        (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
        (Err(err), Err(stop_err)) => {
            Err(err.context(format!("and then failed to stop: {stop_err:#}")))
        }
    }
}

/// Makes sure the dev user exists and starts the dispatcher. Returns the
/// dispatcher's task and the dev user's token.
async fn start_dispatcher(
    dir: &DataDir,
    cluster: &berth_controller::ClusterSettings,
    controller_config: &berth_controller::Config,
    config: &Config,
    endpoint: &Endpoint,
    shutdown: CancellationToken,
) -> anyhow::Result<(JoinHandle<anyhow::Result<()>>, String)> {
    let user_token = dev_user_token(dir, cluster, controller_config, endpoint).await?;
    let client = dispatch_client(config)?;
    let supervisor = berth_dispatch::SupervisorCommand {
        program: std::env::current_exe().context("failed to find the berth executable")?,
        config_file: Some(dir.config_file()),
    };
    let dispatch = config.dispatch()?.clone();
    let dispatcher = tokio::spawn(berth_dispatch::run(
        cluster.cluster_id.clone(),
        client,
        dispatch,
        supervisor,
        shutdown,
    ));
    Ok((dispatcher, user_token))
}

/// The controller's and the dispatcher's tasks, stopped in order: the
/// dispatcher first, because it calls the controller until it ends.
#[derive(Debug)]
struct Services {
    controller: Option<JoinHandle<anyhow::Result<()>>>,
    controller_stop: CancellationToken,
    dispatcher: Option<JoinHandle<anyhow::Result<()>>>,
    dispatcher_stop: CancellationToken,
}

impl Services {
    /// Waits for SIGTERM or SIGINT (`shutdown`), or for a task that ends
    /// on its own, which is an error.
    async fn wait(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let (Some(controller), Some(dispatcher)) = (&mut self.controller, &mut self.dispatcher)
        else {
            return Ok(());
        };
        tokio::select! {
            // The dispatcher ends by itself on the same signal, so check the
            // signal first, and accept a clean end that follows it.
            biased;
            _ = shutdown.cancelled() => Ok(()),
            result = controller => {
                self.controller = None;
                task_ended("the controller", result, shutdown)
            }
            result = dispatcher => {
                self.dispatcher = None;
                task_ended("the dispatcher", result, shutdown)
            }
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        self.dispatcher_stop.cancel();
        if let Some(dispatcher) = self.dispatcher.take() {
            let abort = dispatcher.abort_handle();
            match tokio::time::timeout(DISPATCHER_STOP_TIMEOUT, dispatcher).await {
                Ok(result) => {
                    if let Err(err) = flatten(result) {
                        errors.push(err.context("the dispatcher failed"));
                    }
                }
                Err(_) => {
                    abort.abort();
                    tracing::warn!(
                        timeout = ?DISPATCHER_STOP_TIMEOUT,
                        "the dispatcher did not stop in time; stopping the controller anyway"
                    );
                }
            }
        }
        self.controller_stop.cancel();
        if let Some(controller) = self.controller.take() {
            if let Err(err) = flatten(controller.await) {
                errors.push(err.context("the controller failed"));
            }
        }
        match errors.len() {
            0 => Ok(()),
            _ => Err(anyhow!(errors
                .iter()
                .map(|err| format!("{err:#}"))
                .collect::<Vec<_>>()
                .join("; "))),
        }
    }
}

fn flatten(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match result {
        Ok(result) => result,
        Err(err) => Err(anyhow!("the task panicked or was aborted: {err}")),
    }
}

/// Checks how a task ended while `berth dev` waited: a clean end is an
/// error unless a shutdown was under way.
fn task_ended(
    service: &str,
    result: Result<anyhow::Result<()>, tokio::task::JoinError>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    match flatten(result) {
        Ok(()) if shutdown.is_cancelled() => Ok(()),
        Ok(()) => Err(anyhow!("{service} stopped unexpectedly")),
        Err(err) => Err(err.context(format!("{service} failed"))),
    }
}

/// Returns the dev user's token: the one kept in `user-token` while the
/// controller accepts it, else the token of a newly created user.
async fn dev_user_token(
    dir: &DataDir,
    cluster: &berth_controller::ClusterSettings,
    controller_config: &berth_controller::Config,
    endpoint: &Endpoint,
) -> anyhow::Result<String> {
    let path = dir.user_token_file();
    if let Some(token) = read_token_file(&path)? {
        let client = Client::new(Settings {
            base_url: berth_client::parse_api_host(&endpoint.url())?,
            token: Token::new(token.clone()),
            insecure: endpoint.tls,
        })?;
        match client.current_user().await {
            Ok(_) => return Ok(token),
            Err(err) if err.status().is_some_and(|status| status.as_u16() == 401) => {
                tracing::warn!(
                    file = %path.display(),
                    "the controller rejects the kept user token (was the database replaced?); creating a new dev user"
                );
            }
            Err(err) => return Err(err).context("failed to check the dev user's token"),
        }
    }
    let token = berth_controller::create_user(cluster, controller_config, DEV_USER_NAME, false)
        .await
        .context("failed to create the dev user")?;
    write_private_file(&path, format!("{token}\n").as_bytes())?;
    tracing::info!(user = DEV_USER_NAME, file = %path.display(), "created the dev user");
    Ok(token)
}

/// Chooses the dispatcher's backend and logs which and why.
async fn choose_backend(choice: BackendChoice) -> Backend {
    let (backend, reason) = match choice {
        BackendChoice::Slurm => (Backend::Slurm, "chosen with --backend".to_string()),
        BackendChoice::Local => (Backend::Local, "chosen with --backend".to_string()),
        BackendChoice::Auto => match probe_slurm().await {
            Ok(reason) => (Backend::Slurm, reason),
            Err(reason) => (Backend::Local, reason),
        },
    };
    tracing::info!(backend = backend.name(), reason = %reason, "dispatcher backend chosen");
    backend
}

/// Checks that Slurm accepts commands from this user. Returns why Slurm is
/// usable, or why not.
async fn probe_slurm() -> Result<String, String> {
    let user = run_probe("id", &["-un"]).await?;
    let user = user.trim();
    run_probe("sbatch", &["--version"]).await?;
    let user_filter = format!("--user={user}");
    run_probe("squeue", &["--noheader", &user_filter]).await?;
    Ok(format!(
        "`sbatch --version` and `squeue --noheader {user_filter}` succeed"
    ))
}

/// Runs a probe command and returns its stdout, or a sentence saying how
/// it failed.
async fn run_probe(program: &str, args: &[&str]) -> Result<String, String> {
    let shown = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(PROBE_TIMEOUT, command.output()).await {
        Err(_) => return Err(format!("`{shown}` timed out after {PROBE_TIMEOUT:?}")),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{program} is not installed (not found on PATH)"))
        }
        Ok(Err(err)) => return Err(format!("failed to run `{shown}`: {err}")),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first_line = stderr.lines().next().unwrap_or("").trim();
        return Err(format!(
            "`{shown}` failed ({}): {first_line}",
            output.status
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The API's address for clients on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// The listener's address, with an unspecified one (`0.0.0.0`, `::`)
    /// replaced by loopback.
    address: SocketAddr,
    /// HTTPS with the self-signed certificate, which clients do not verify.
    tls: bool,
}

impl Endpoint {
    fn new(local_addr: SocketAddr, tls: bool) -> Endpoint {
        let ip = match local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Endpoint {
            address: SocketAddr::new(ip, local_addr.port()),
            tls,
        }
    }

    /// Returns the API's URL, such as `https://127.0.0.1:8000`.
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }

    /// Returns the value of `BERTH_API_HOST`: `host:port` for HTTPS, as
    /// Arvados clients expect it, or the `http://` URL.
    fn api_host(&self) -> String {
        if self.tls {
            self.address.to_string()
        } else {
            self.url()
        }
    }
}

/// The settings written to `config.yml`.
#[derive(Debug)]
struct DevConfig<'a> {
    cluster_id: &'a ClusterId,
    dir: &'a DataDir,
    listen: SocketAddr,
    /// Whether the API is served over HTTPS with the self-signed pair.
    tls: bool,
    backend: Backend,
    api_url: &'a str,
    docker_host: Option<&'a str>,
}

fn config_yaml(config: &DevConfig<'_>) -> anyhow::Result<String> {
    let mut supervisor = serde_json::Map::new();
    if let Some(docker_host) = config.docker_host {
        supervisor.insert("docker_host".into(), json!(docker_host));
    }
    let mut controller = json!({
        "listen": config.listen.to_string(),
        "database_url": config.dir.database_url()?,
    });
    if config.tls {
        controller["tls_certificate"] = json!(utf8(&config.dir.tls_certificate_file())?);
        controller["tls_key"] = json!(utf8(&config.dir.tls_key_file())?);
    }
    let value = json!({
        "cluster_id": config.cluster_id.as_str(),
        "system_token_file": utf8(&config.dir.system_token_file())?,
        "controller": controller,
        "dispatch": {
            "backend": config.backend.name(),
            "api_url": config.api_url,
            // The certificate is self-signed.
            "insecure": config.tls,
            "poll_interval": DEV_POLL_INTERVAL,
            "resync_interval": DEV_RESYNC_INTERVAL,
            "credentials_dir": utf8(&config.dir.credentials_dir())?,
            "local": { "log_dir": utf8(&config.dir.logs_dir())? },
            "slurm": { "output": format!("{}/slurm-%j.out", utf8(&config.dir.logs_dir())?) },
        },
        "supervisor": Value::Object(supervisor),
    });
    let body =
        serde_yaml::to_string(&value).context("failed to write the configuration as YAML")?;
    Ok(format!(
        "# Written by `berth dev` at each start: edits are lost. The cluster id\n\
         # is kept from one run to the next.\n{body}"
    ))
}

/// Formats the shell lines that point user commands at this controller:
/// Berth's variables, and over HTTPS Arvados's as well.
fn env_lines(endpoint: &Endpoint, user_token: &str) -> String {
    let host = shell_quote(&endpoint.api_host());
    let token = shell_quote(user_token);
    let mut lines = format!("export BERTH_API_HOST={host}\nexport BERTH_API_TOKEN={token}\n");
    if endpoint.tls {
        lines.push_str(&format!(
            "export BERTH_API_HOST_INSECURE=1\n\
             export ARVADOS_API_HOST={host}\n\
             export ARVADOS_API_TOKEN={token}\n\
             export ARVADOS_API_HOST_INSECURE=1\n"
        ));
    }
    lines
}

/// Quotes a word for a POSIX shell, leaving words of safe characters bare.
fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.:@%+=,-[]".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The `env` file while it exists: written once everything runs, removed
/// when dropped.
#[derive(Debug)]
struct EnvFile {
    path: PathBuf,
}

impl EnvFile {
    /// Prints `lines` on stdout and writes them to `path`.
    fn publish(path: &Path, lines: &str) -> anyhow::Result<EnvFile> {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(lines.as_bytes())
            .and_then(|()| stdout.flush())
            .context("failed to write to stdout")?;
        write_private_file(path, lines.as_bytes())?;
        tracing::info!(file = %path.display(), "ready; the env file contains the same export lines");
        Ok(EnvFile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        if let Err(err) = remove_if_present(&self.path) {
            tracing::warn!(error = %format!("{err:#}"), "failed to remove the env file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: DevArgs,
    }

    #[test]
    fn defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["dev"]).unwrap();
        assert_eq!(cli.args.data_dir, PathBuf::from(".berth-dev"));
        assert_eq!(
            cli.args.listen,
            "127.0.0.1:8000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(cli.args.backend, BackendChoice::Auto);
        assert_eq!(cli.args.docker_host, None);
        assert!(!cli.args.plain_http, "HTTPS unless asked otherwise");
    }

    #[test]
    fn listen_must_be_an_address_with_port() {
        let err = Cli::try_parse_from(["dev", "--listen", "localhost"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("localhost"), "{err}");
        let cli =
            Cli::try_parse_from(["dev", "--listen", "127.0.0.1:0", "--backend", "local"]).unwrap();
        assert_eq!(cli.args.listen.port(), 0);
        assert_eq!(cli.args.backend, BackendChoice::Local);
    }

    #[test]
    fn unspecified_listen_address_is_reached_through_loopback() {
        let url = |address: &str, tls| Endpoint::new(address.parse().unwrap(), tls).url();
        assert_eq!(url("0.0.0.0:8000", false), "http://127.0.0.1:8000");
        assert_eq!(url("[::]:9000", true), "https://[::1]:9000");
        assert_eq!(url("127.0.0.1:41234", true), "https://127.0.0.1:41234");
    }

    #[test]
    fn https_env_lines_set_berth_and_arvados_variables() {
        let token = "v2/x0dev-gj3su-0123456789abcde/secret";
        let endpoint = Endpoint::new("127.0.0.1:8000".parse().unwrap(), true);
        assert_eq!(
            env_lines(&endpoint, token),
            format!(
                "export BERTH_API_HOST=127.0.0.1:8000\n\
                 export BERTH_API_TOKEN={token}\n\
                 export BERTH_API_HOST_INSECURE=1\n\
                 export ARVADOS_API_HOST=127.0.0.1:8000\n\
                 export ARVADOS_API_TOKEN={token}\n\
                 export ARVADOS_API_HOST_INSECURE=1\n"
            )
        );
        let settings = berth_client::Settings::from_lookup(|name| match name {
            "BERTH_API_HOST" => Some("127.0.0.1:8000".into()),
            "BERTH_API_TOKEN" => Some(token.into()),
            "BERTH_API_HOST_INSECURE" => Some("1".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(settings.base_url.as_str(), "https://127.0.0.1:8000/");
        assert!(settings.insecure);
    }

    #[test]
    fn plain_http_env_lines_give_the_url_only() {
        let token = "v2/x0dev-gj3su-0123456789abcde/secret";
        let endpoint = Endpoint::new("[::1]:8000".parse().unwrap(), false);
        assert_eq!(
            env_lines(&endpoint, token),
            format!("export BERTH_API_HOST=http://[::1]:8000\nexport BERTH_API_TOKEN={token}\n")
        );
    }

    #[test]
    fn unsafe_words_are_single_quoted() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn env_file_is_private_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        std::fs::write(&path, "old content that is longer than the new\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

        let env = EnvFile::publish(&path, "export A=1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "export A=1\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["env"], "no temporary file is left behind");

        drop(env);
        assert!(!path.exists(), "the env file is removed on drop");
    }

    #[test]
    fn config_is_valid_and_keeps_its_cluster_id() {
        let parent = tempfile::tempdir().unwrap();
        let dir = DataDir::open(&parent.path().join("data")).unwrap();
        let cluster_id = dir.cluster_id().unwrap();
        let text = config_yaml(&DevConfig {
            cluster_id: &cluster_id,
            dir: &dir,
            listen: "127.0.0.1:41234".parse().unwrap(),
            tls: true,
            backend: Backend::Local,
            api_url: "https://127.0.0.1:41234",
            docker_host: Some("unix:///tmp/podman.sock"),
        })
        .unwrap();
        write_private_file(&dir.config_file(), text.as_bytes()).unwrap();

        let config = Config::load(&dir.config_file()).unwrap();
        assert_eq!(config.cluster_id, cluster_id);
        assert_eq!(config.system_token_file, Some(dir.system_token_file()));
        assert_eq!(
            config.supervisor.docker_host.as_deref(),
            Some("unix:///tmp/podman.sock")
        );
        let dispatch = config.dispatch().unwrap();
        assert_eq!(dispatch.backend, "local");
        assert_eq!(dispatch.api_url, "https://127.0.0.1:41234");
        assert!(dispatch.insecure, "the certificate is self-signed");
        assert_eq!(dispatch.poll_interval, Duration::from_secs(1));
        assert_eq!(dispatch.resync_interval, Duration::from_secs(10));
        assert!(dispatch.watch);
        dispatch.validate().unwrap();
        assert_eq!(dispatch.credentials_dir, dir.credentials_dir());
        assert_eq!(dispatch.local.log_dir, Some(dir.logs_dir()));
        assert_eq!(
            dispatch.slurm.output,
            format!("{}/slurm-%j.out", dir.logs_dir().display())
        );
        let controller = config.controller().unwrap();
        assert_eq!(
            controller.database_url,
            format!("sqlite://{}", dir.database_file().display())
        );
        assert_eq!(
            controller.tls_files(),
            Some((
                dir.tls_certificate_file().as_path(),
                dir.tls_key_file().as_path()
            ))
        );
        assert_eq!(
            dir.cluster_id().unwrap(),
            cluster_id,
            "read back from config.yml"
        );
    }

    #[tokio::test]
    async fn probe_says_why_a_command_failed() {
        let err = run_probe("berth-surely-not-installed", &[])
            .await
            .unwrap_err();
        assert!(err.contains("not installed"), "{err}");
        let err = run_probe("sh", &["-c", "echo broken >&2; exit 3"])
            .await
            .unwrap_err();
        assert!(err.contains("broken"), "{err}");
        assert!(err.contains("sh -c"), "{err}");
        assert_eq!(run_probe("echo", &["ok"]).await.unwrap(), "ok\n");
    }
}
