//! Execs in the containers of a Podman engine on this node, for a Docker
//! runtime whose engine is Podman, without Podman's exec API.
//!
//! Podman 4.3's exec API copies every byte through its service: a `cat`
//! of 512 MiB through it moved 260 to 300 MiB/s on an idle 2-CPU VM, and
//! through `podman exec` on the same node 550 MiB/s, without the service.
//! `podman exec` still relays every byte through conmon and its own
//! process. So each container gets the first of these routes that works,
//! checked once per container:
//!
//! 1. Podman's OCI runtime directly, for every exec (with a terminal or
//!    without), as the `oci` runtime runs its own containers: `crun exec
//!    --process` with the container's own `process` from its bundle's
//!    `config.json`. `podman exec` itself starts the same process through
//!    the runtime, so the process keeps the container's capabilities, seccomp
//!    profile, labels and limits. Conditions: the route is switched on
//!    (`supervisor.podman_runtime_exec`), the supervisor runs as root,
//!    Podman names crun as the container's runtime and `podman info`
//!    names its program, and `crun state` in `/run/crun` shows the
//!    container running with the PID that Podman reports. The state
//!    directory, the bundle and its `config.json` must belong to root,
//!    with write permission for root alone. A rootless Podman, or one with a
//!    state directory of its own, fails these checks. The container's
//!    `/etc/group` is read through `/proc/PID/root`, which works from any
//!    mount namespace. When crun cannot be started for an exec, that
//!    exec goes through the API.
//! 2. `podman exec --interactive`, for execs without a terminal. It needs
//!    a Unix socket for the engine and a server that names itself
//!    Podman. The command must find the container under the same ID,
//!    which a service with another storage root, or another user's,
//!    would not. The container's root filesystem must be mounted in the
//!    supervisor's mount namespace.
//! 3. The API, for everything else.
//!
//! The environment never reaches an argv: crun gets it in the process
//! file, and `podman exec` in an `--env-file`, each of mode 0600. That
//! env file cannot hold a value with a line break, so such an exec goes
//! through the API. The runtimes run with an empty environment besides,
//! for `podman`, the variables that locate its own configuration, so
//! nothing of the supervisor's environment reaches them.
//! NOTE: only crun 1.8 under a root Podman 4.3 ran these direct execs in
//! the tests. Containers of runc and other runtimes keep `podman exec`.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::process::Command;

use super::exec::{ExecProcess, ExecSpec};
use super::oci_exec::{piped_exec, RuntimeTarget};
use super::{ContainerId, RuntimeError};

/// The variables of the supervisor's own environment that `podman` gets,
/// because they locate its configuration and storage.
const PODMAN_ENV: [&str; 7] = [
    "HOME",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "CONTAINERS_CONF",
    "CONTAINERS_STORAGE_CONF",
    "TMPDIR",
];

/// The `PATH` `podman` runs with, for the helpers it starts.
const PODMAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The OCI runtime whose execs the supervisor runs itself.
const DIRECT_RUNTIME: &str = "crun";

/// The route of the execs in one container of a Podman engine.
#[derive(Debug, Clone)]
pub(super) enum PodmanRoute {
    /// Podman's OCI runtime, run by the supervisor, for every exec.
    Runtime(Arc<RuntimeTarget>),
    /// `podman exec`, for execs without a terminal.
    Command,
    /// Podman's exec API.
    Api,
}

/// Podman's command line, and the routes found for its containers.
#[derive(Debug)]
pub(super) struct PodmanCli {
    program: PathBuf,
    /// Whether the route through the OCI runtime may be used.
    runtime_exec: bool,
    /// Container ID to the route of its execs.
    routes: Mutex<HashMap<String, PodmanRoute>>,
    /// The program of Podman's default OCI runtime, from `podman info`.
    default_runtime: tokio::sync::OnceCell<Option<PathBuf>>,
}

/// The fields of `crun state` that the check compares.
#[derive(Debug, Deserialize)]
struct RuntimeState {
    id: String,
    pid: i64,
    status: String,
    bundle: PathBuf,
}

impl PodmanCli {
    pub(super) fn new(program: PathBuf, runtime_exec: bool) -> PodmanCli {
        PodmanCli {
            program,
            runtime_exec,
            routes: Mutex::new(HashMap::new()),
            default_runtime: tokio::sync::OnceCell::new(),
        }
    }

    /// Returns the program of Podman's default OCI runtime, asking
    /// `podman info` the first time; `None` when it cannot tell.
    async fn default_runtime(&self) -> Option<PathBuf> {
        self.default_runtime
            .get_or_init(|| async {
                let output = self
                    .command()
                    .args(["info", "--format", "{{.Host.OCIRuntime.Path}}"])
                    .stdin(Stdio::null())
                    .output()
                    .await;
                match output {
                    Ok(output) if output.status.success() => {
                        let text = String::from_utf8_lossy(&output.stdout);
                        let path = PathBuf::from(text.trim());
                        path.is_absolute().then_some(path)
                    }
                    Ok(output) => {
                        tracing::info!(status = %output.status, error = %String::from_utf8_lossy(&output.stderr).trim(), "podman info failed; execs do not use Podman's OCI runtime directly");
                        None
                    }
                    Err(error) => {
                        tracing::info!(%error, "failed to run podman info; execs do not use Podman's OCI runtime directly");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    pub(super) fn program(&self) -> &Path {
        &self.program
    }

    /// Returns the route of the execs in the container `id`, checking it
    /// the first time.
    pub(super) async fn route_for(&self, id: &ContainerId) -> PodmanRoute {
        if let Some(known) = self
            .routes
            .lock()
            .ok()
            .and_then(|routes| routes.get(&id.0).cloned())
        {
            return known;
        }
        let route = match self.check(id).await {
            Ok(PodmanRoute::Runtime(target)) => {
                tracing::debug!(container = %id.0, runtime = %target.program.display(), "execs run through Podman's OCI runtime");
                PodmanRoute::Runtime(target)
            }
            Ok(route) => {
                tracing::debug!(container = %id.0, "execs without a terminal use podman exec");
                route
            }
            Err(reason) => {
                tracing::info!(container = %id.0, reason = %reason, "execs use Podman's exec API");
                PodmanRoute::Api
            }
        };
        if let Ok(mut routes) = self.routes.lock() {
            routes.insert(id.0.clone(), route.clone());
        }
        route
    }

    /// Finds the route of the container `id`: checks that `podman` finds
    /// it under the same ID, then tries its OCI runtime, then checks that
    /// its root filesystem is mounted where `podman` reads the exec user's
    /// entry in `/etc/passwd`. A supervisor in a mount namespace of its
    /// own (a batch job's private `/tmp`, `ip netns exec`) may not see
    /// that mount, and `podman exec --user NAME` then fails.
    async fn check(&self, id: &ContainerId) -> Result<PodmanRoute, String> {
        let output = self
            .command()
            .args([
                "container",
                "inspect",
                "--format",
                "{{.Id}}\t{{.OCIRuntime}}\t{{.State.Pid}}\t{{.GraphDriver.Data.MergedDir}}",
                &id.0,
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|error| format!("failed to run {}: {error}", self.program.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} container inspect failed with {}: {}",
                self.program.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let mut fields = text.trim_end_matches('\n').splitn(4, '\t');
        let mut field = || fields.next().unwrap_or("");
        let (found, runtime, pid, root) = (field(), field(), field(), field());
        if found != id.0 {
            return Err(format!(
                "podman names another container by this ID: {found}"
            ));
        }
        if self.runtime_exec {
            let default_runtime = self.default_runtime().await;
            match runtime_target(id, runtime, pid, default_runtime.as_deref()).await {
                Ok(target) => return Ok(PodmanRoute::Runtime(Arc::new(target))),
                Err(reason) => {
                    tracing::info!(container = %id.0, reason = %reason, "execs do not use Podman's OCI runtime directly");
                }
            }
        }
        let mounted = !root.is_empty()
            && std::fs::read_dir(root).is_ok_and(|mut entries| entries.next().is_some());
        if !mounted {
            return Err(format!(
                "the container's root filesystem {root:?} is not mounted in this mount namespace"
            ));
        }
        Ok(PodmanRoute::Command)
    }

    /// Starts the exec `spec`, which has no terminal, in the container
    /// `id`. Returns `None` when its environment cannot go in an env file.
    pub(super) async fn exec(
        &self,
        id: &ContainerId,
        spec: &ExecSpec,
    ) -> Result<Option<ExecProcess>, RuntimeError> {
        let target = || format!("podman exec in container {}", id.0);
        let Some(env_file) = write_env_file(&spec.env).map_err(|error| RuntimeError::Request {
            action: "write the environment file of",
            target: target(),
            source: Box::new(error),
        })?
        else {
            return Ok(None);
        };
        let mut command = self.command();
        command
            .arg("exec")
            .arg("--interactive")
            .arg("--env-file")
            .arg(env_file.path())
            .arg("--user")
            .arg(spec.user.engine_user());
        if let Some(dir) = &spec.working_dir {
            command.arg("--workdir").arg(dir);
        }
        // Everything after the container is the process's argv.
        command
            .arg(&id.0)
            .args(&spec.argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_error = |error: io::Error| RuntimeError::Request {
            action: "run",
            target: target(),
            source: Box::new(error),
        };
        let child = command.spawn().map_err(spawn_error)?;
        piped_exec(child, env_file, id.0.clone())
            .map(Some)
            .map_err(spawn_error)
    }

    /// Makes a `podman` command with an empty environment besides
    /// [`PODMAN_ENV`].
    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .env_clear()
            .env("PATH", PODMAN_PATH)
            .kill_on_drop(false);
        for name in PODMAN_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command
    }
}

/// crun's state directory for root, which Podman leaves as it is.
const STATE_ROOT: &str = "/run/crun";

/// The directory of the console sockets of terminal execs. Podman's
/// bundle directories are too long a path for a Unix socket.
const CONSOLE_DIR: &str = "/run/berth/exec";

/// Returns the target for execs through Podman's OCI runtime `runtime` in
/// the container `id`, whose first process Podman reports as `pid`, or
/// why there is none. `default_runtime` is the program Podman's own
/// configuration names for its default runtime.
async fn runtime_target(
    id: &ContainerId,
    runtime: &str,
    pid: &str,
    default_runtime: Option<&Path>,
) -> Result<RuntimeTarget, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("the supervisor does not run as root".to_string());
    }
    let named = Path::new(runtime)
        .file_name()
        .and_then(|name| name.to_str());
    if named != Some(DIRECT_RUNTIME) {
        return Err(format!(
            "Podman's OCI runtime is {runtime:?}; only {DIRECT_RUNTIME} runs execs directly"
        ));
    }
    // The program Podman itself runs, not whichever crun comes first on
    // the supervisor's PATH.
    let program = default_runtime
        .filter(|program| program.file_name().and_then(|name| name.to_str()) == named)
        .ok_or_else(|| {
            format!("`podman info` names no {DIRECT_RUNTIME} program as Podman's runtime")
        })?
        .to_path_buf();
    let state_root = PathBuf::from(STATE_ROOT);
    let pid: u32 = pid
        .parse()
        .map_err(|_| format!("Podman reports no PID for the container: {pid:?}"))?;
    check_private(&state_root)?;
    check_private(&state_root.join(&id.0))?;

    let output = Command::new(&program)
        .arg("--root")
        .arg(&state_root)
        .arg("state")
        .arg(&id.0)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| format!("failed to run {}: {error}", program.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} --root {STATE_ROOT} state failed with {}: {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let state: RuntimeState = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("{} state printed no state: {error}", program.display()))?;
    let same = state.id == id.0 && state.status == "running" && state.pid == i64::from(pid);
    if !same {
        return Err(format!(
            "{} in {STATE_ROOT} shows {} {} with PID {}, and Podman PID {pid}",
            program.display(),
            state.id,
            state.status,
            state.pid
        ));
    }

    check_private(&state.bundle)?;
    check_private(&state.bundle.join("config.json"))?;
    let console_dir = private_dir(Path::new(CONSOLE_DIR))?;
    Ok(RuntimeTarget {
        program,
        state_root,
        name: id.0.clone(),
        bundle: state.bundle,
        console_dir,
        // The container's root, as its first process has it mounted, from
        // any mount namespace the supervisor is in.
        root: Some(PathBuf::from(format!("/proc/{pid}/root"))),
    })
}

/// Makes the directory `path` of mode 0700 if it is missing, and checks
/// that it belongs to root alone.
fn private_dir(path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;

    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|error| format!("failed to create {}: {error}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(format!("failed to create {}: {error}", path.display())),
    }
    check_private(path)?;
    Ok(path.to_path_buf())
}

/// Checks that `path`, not followed if it is a symbolic link, belongs to
/// root and that neither its group nor others can write it, so that the
/// state and bundle that the exec is built from are Podman's own.
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;

    let metadata = std::fs::symlink_metadata(path)
        .map_err(|error| format!("failed to read {}: {error}", path.display()))?;
    let writable_by_others = metadata.mode() & 0o022 != 0;
    if metadata.uid() != 0 || writable_by_others || metadata.file_type().is_symlink() {
        return Err(format!(
            "{} is not root's alone (owner {}, mode {:o})",
            path.display(),
            metadata.uid(),
            metadata.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Writes `env` (`NAME=value` entries) to a new file of mode 0600, in the
/// form of `podman exec --env-file`. Returns `None` when an entry has a
/// line break or no `=`, which that form cannot hold.
fn write_env_file(env: &[String]) -> io::Result<Option<tempfile::NamedTempFile>> {
    let Some(text) = env_file_text(env) else {
        return Ok(None);
    };
    let mut file = tempfile::Builder::new()
        .prefix("berth-exec-env-")
        .tempfile()?;
    file.write_all(text.as_bytes())?;
    file.flush()?;
    Ok(Some(file))
}

/// Returns the lines of an env file, or `None` when an entry cannot be
/// one: a line break anywhere, no `=`, or a name that Podman would read
/// differently (empty, with white space, starting with `#`, or with a `*`,
/// which imports the matching variables of `podman`'s own environment).
fn env_file_text(env: &[String]) -> Option<String> {
    let mut text = String::new();
    for entry in env {
        let (name, _) = entry.split_once('=')?;
        let readable = !name.is_empty()
            && !name.starts_with('#')
            && !name.contains(char::is_whitespace)
            && !name.contains('*')
            && !entry.contains(['\n', '\r']);
        if !readable {
            return None;
        }
        text.push_str(entry);
        text.push('\n');
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|entry| entry.to_string()).collect()
    }

    #[test]
    fn env_file_keeps_values_whole() {
        let text = env_file_text(&env(&["A=1", "SPACED= two words ", "EQ=a=b", "EMPTY="]));
        assert_eq!(
            text.as_deref(),
            Some("A=1\nSPACED= two words \nEQ=a=b\nEMPTY=\n")
        );
        assert_eq!(env_file_text(&[]).as_deref(), Some(""));
    }

    #[test]
    fn env_file_refuses_what_it_cannot_hold() {
        for bad in [
            "LINES=one\ntwo",
            "CR=one\rtwo",
            "NOVALUE",
            "=value",
            "#COMMENT=1",
            "HOST*=1",
            " LEADING=1",
        ] {
            assert_eq!(env_file_text(&env(&["A=1", bad])), None, "{bad:?}");
        }
    }

    #[test]
    fn check_private_wants_root_alone() {
        use std::os::unix::fs::PermissionsExt;

        if !rustix::process::geteuid().is_root() {
            println!("check_private_wants_root_alone: skipped (not root)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(check_private(&path), Ok(()));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o770)).unwrap();
        let error = check_private(&path).unwrap_err();
        assert!(error.contains("mode 770"), "{error}");

        let link = dir.path().join("link");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(check_private(&link).is_err());

        let nobody = dir.path().join("nobody");
        std::fs::create_dir(&nobody).unwrap();
        std::os::unix::fs::chown(&nobody, Some(65534), None).unwrap();
        let error = check_private(&nobody).unwrap_err();
        assert!(error.contains("owner 65534"), "{error}");
        assert!(check_private(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn env_file_is_private() {
        use std::os::unix::fs::PermissionsExt;

        let file = write_env_file(&env(&["SECRET=x"])).unwrap().unwrap();
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "SECRET=x\n");
        assert!(write_env_file(&env(&["BAD=a\nb"])).unwrap().is_none());
    }
}
