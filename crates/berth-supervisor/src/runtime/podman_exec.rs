//! Execs without a terminal through Podman's command line, for a Docker
//! runtime whose engine is Podman on this node.
//!
//! Podman 4.3's exec API copies every byte through its service: a `cat`
//! of 512 MiB through it moved 260 to 300 MiB/s on an idle 2-CPU VM, and
//! through `podman exec` on the same node 550 MiB/s, without the service. It is Podman's own exec,
//! with the container's capabilities, seccomp profile and labels, so the
//! process is the one the API would have started.
//!
//! The command line is used only when these hold. The engine's socket is
//! a Unix socket, and the server names itself Podman. The command finds
//! the container under the same ID: a service with another storage root,
//! or another user's, would not. The container's root filesystem is
//! mounted in the supervisor's mount namespace. They are checked once per
//! container. Otherwise, and for every exec with a terminal (whose
//! resizing goes through the API), the API runs the exec.
//!
//! The environment goes in an `--env-file` of mode 0600, never in the
//! argv. That file cannot hold a value with a line break, so an exec
//! whose environment has one goes through the API. `podman` itself runs with
//! an empty environment besides the variables that locate its own
//! configuration, so nothing of the supervisor's environment reaches it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use tokio::process::Command;

use super::exec::{ExecProcess, ExecSpec};
use super::oci_exec::piped_exec;
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

/// Podman's command line, and which containers it was found to see.
#[derive(Debug)]
pub(super) struct PodmanCli {
    program: PathBuf,
    /// Container ID to whether `podman exec` can run in it.
    usable: Mutex<HashMap<String, bool>>,
}

impl PodmanCli {
    pub(super) fn new(program: PathBuf) -> PodmanCli {
        PodmanCli {
            program,
            usable: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn program(&self) -> &Path {
        &self.program
    }

    /// Returns whether `podman exec` can run in the container `id`,
    /// checking it the first time.
    pub(super) async fn usable_for(&self, id: &ContainerId) -> bool {
        if let Some(known) = self
            .usable
            .lock()
            .ok()
            .and_then(|usable| usable.get(&id.0).copied())
        {
            return known;
        }
        let usable = match self.check(id).await {
            Ok(()) => {
                tracing::debug!(container = %id.0, "execs without a terminal use podman exec");
                true
            }
            Err(reason) => {
                tracing::info!(container = %id.0, reason = %reason, "execs use Podman's exec API");
                false
            }
        };
        if let Ok(mut known) = self.usable.lock() {
            known.insert(id.0.clone(), usable);
        }
        usable
    }

    /// Checks that `podman` finds the container `id` under the same ID,
    /// and that its root filesystem is mounted where `podman` reads the
    /// exec user's entry in `/etc/passwd`. A supervisor in a mount
    /// namespace of its own (a batch job's private `/tmp`, `ip netns
    /// exec`) may not see that mount, and `podman exec --user NAME` then
    /// fails.
    async fn check(&self, id: &ContainerId) -> Result<(), String> {
        let output = self
            .command()
            .args([
                "container",
                "inspect",
                "--format",
                "{{.Id}} {{.GraphDriver.Data.MergedDir}}",
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
        let (found, root) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        if found != id.0 {
            return Err(format!(
                "podman names another container by this ID: {found}"
            ));
        }
        let mounted = !root.is_empty()
            && std::fs::read_dir(root).is_ok_and(|mut entries| entries.next().is_some());
        if !mounted {
            return Err(format!(
                "the container's root filesystem {root:?} is not mounted in this mount namespace"
            ));
        }
        Ok(())
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
    fn env_file_is_private() {
        use std::os::unix::fs::PermissionsExt;

        let file = write_env_file(&env(&["SECRET=x"])).unwrap().unwrap();
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "SECRET=x\n");
        assert!(write_env_file(&env(&["BAD=a\nb"])).unwrap().is_none());
    }
}
