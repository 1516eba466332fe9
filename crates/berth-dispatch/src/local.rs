//! The local backend: each container's supervisor runs as a child process
//! of the dispatcher, on the dispatcher's host.
//!
//! A job is one `berth supervise ...` process. Its job id is its process
//! id; its name is the container UUID. The process gets its own process
//! group, so a Ctrl-C in the dispatcher's terminal does not reach it, and
//! it keeps running when the dispatcher stops, as a Slurm job would. Its
//! stdout and stderr are appended to `<log dir>/<uuid>.log`. It starts in
//! `/`, as Slurm jobs do, so that it never depends on the dispatcher's
//! working directory.
//!
//! A pid file, `<state dir>/<uuid>.pid`, lets a restarted dispatcher find
//! its processes again: a process counts as the container's job while
//! `/proc/<pid>/cmdline` still has the container UUID among its arguments,
//! which also guards against a reused pid. Status is which of these
//! processes are alive; cancel sends TERM to the supervisor process alone,
//! as `scancel --batch --signal=TERM` does on Slurm.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::backend::{Backend, BackendError, BatchJob, JobId, JobRequest, JobState, Submission};
use crate::command::SECRET_ENV_VARS;
use crate::SupervisorCommand;

/// One supervisor process.
#[derive(Debug)]
struct LocalJob {
    pid: i32,
    /// The process handle, for processes this dispatcher started; `None`
    /// for one found through its pid file after a restart.
    child: Option<tokio::process::Child>,
}

/// Supervisors run as child processes.
#[derive(Debug)]
pub struct LocalBackend {
    supervisor: SupervisorCommand,
    state_dir: PathBuf,
    log_dir: PathBuf,
    /// Jobs by container UUID.
    jobs: BTreeMap<String, LocalJob>,
}

impl LocalBackend {
    /// Creates a backend that keeps pid files in `state_dir` and logs in
    /// `log_dir` (made if missing). It takes over the processes named by
    /// existing pid files.
    pub fn new(
        supervisor: SupervisorCommand,
        state_dir: &Path,
        log_dir: &Path,
    ) -> Result<LocalBackend, BackendError> {
        std::fs::create_dir_all(log_dir).map_err(|source| BackendError::Io {
            action: "create the log directory",
            path: log_dir.to_path_buf(),
            source,
        })?;
        let mut backend = LocalBackend {
            supervisor,
            state_dir: state_dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            jobs: BTreeMap::new(),
        };
        backend.adopt_pid_files()?;
        Ok(backend)
    }

    fn pid_file(&self, uuid: &str) -> PathBuf {
        self.state_dir.join(format!("{uuid}.pid"))
    }

    /// Returns the log file of one container's supervisor.
    pub fn log_file(&self, uuid: &str) -> PathBuf {
        self.log_dir.join(format!("{uuid}.log"))
    }

    fn adopt_pid_files(&mut self) -> Result<(), BackendError> {
        let list_error = |source| BackendError::Io {
            action: "list",
            path: self.state_dir.clone(),
            source,
        };
        let entries = std::fs::read_dir(&self.state_dir).map_err(list_error)?;
        for entry in entries {
            let path = entry.map_err(list_error)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pid") {
                continue;
            }
            let Some(uuid) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if !berth_core::uuid::is_uuid(uuid) {
                continue;
            }
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.trim().parse::<i32>().ok())
                .filter(|pid| *pid > 1);
            match pid {
                Some(pid) if process_runs(pid, uuid) => {
                    tracing::info!(container = %uuid, pid, "found a running supervisor from a previous dispatcher");
                    self.jobs
                        .insert(uuid.to_string(), LocalJob { pid, child: None });
                }
                _ => remove_file(&path),
            }
        }
        Ok(())
    }
}

/// True when process `pid` runs with `uuid` as one of its arguments.
fn process_runs(pid: i32, uuid: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline.split(|b| *b == 0).any(|arg| arg == uuid.as_bytes()),
        Err(_) => false,
    }
}

/// Removes a file, logging a failure other than its absence: a leftover
/// pid file is harmless, because its process is checked before use.
fn remove_file(path: &Path) {
    if let Err(err) = std::fs::remove_file(path) {
        if err.kind() != ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %err, "failed to remove a pid file");
        }
    }
}

/// Writes `text` to `path` under a temporary name, then renames it.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("pid.tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn submit(&mut self, request: &JobRequest) -> Result<Submission, BackendError> {
        // NOTE: `request.ram` and `request.vcpus` reserve nothing here; only
        // the supervisor's limits on the container itself apply.
        let uuid = &request.container_uuid;
        if let Some(job) = self.jobs.get(uuid) {
            // The dispatch loop never submits a container twice; a second
            // process would run the container twice.
            return Err(BackendError::Io {
                action: "start a second supervisor for",
                path: self.pid_file(uuid),
                source: std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("process {} already supervises container {uuid}", job.pid),
                ),
            });
        }
        let argv = self
            .supervisor
            .argv(&request.credentials_file, uuid)
            .map_err(|err| BackendError::InvalidRequest {
                container: uuid.clone(),
                reason: err.to_string(),
            })?;
        let log_path = self.log_file(uuid);
        let log_error = |source| BackendError::Io {
            action: "open the log file",
            path: log_path.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(log_error)?;
        let log_err = log.try_clone().map_err(log_error)?;

        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false);
        for name in SECRET_ENV_VARS {
            command.env_remove(name);
        }
        let child = command.spawn().map_err(|source| BackendError::Io {
            action: "start the supervisor",
            path: PathBuf::from(&argv[0]),
            source,
        })?;
        let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            return Err(BackendError::Io {
                action: "start the supervisor",
                path: PathBuf::from(&argv[0]),
                source: std::io::Error::other("the process ended before its id was read"),
            });
        };

        let pid_file = self.pid_file(uuid);
        if let Err(source) = write_atomically(&pid_file, &format!("{pid}\n")) {
            // Without its pid file a restarted dispatcher would not find the
            // process, so it must not run.
            let mut child = child;
            let kill_result = child.kill().await;
            if let Err(kill_error) = kill_result {
                tracing::error!(container = %uuid, pid, error = %kill_error, "failed to kill a supervisor whose pid file could not be written");
            }
            return Err(BackendError::Io {
                action: "write the pid file",
                path: pid_file,
                source,
            });
        }
        self.jobs.insert(
            uuid.clone(),
            LocalJob {
                pid,
                child: Some(child),
            },
        );
        Ok(Submission {
            job_id: JobId::new(pid.to_string()),
            command: argv.join(" "),
            script: None,
            stdout: String::new(),
            stderr: String::new(),
        })
    }

    async fn status(&mut self) -> Result<Vec<BatchJob>, BackendError> {
        let mut ended = Vec::new();
        for (uuid, job) in self.jobs.iter_mut() {
            let alive = match &mut job.child {
                Some(child) => match child.try_wait() {
                    Ok(None) => true,
                    Ok(Some(status)) => {
                        tracing::info!(container = %uuid, pid = job.pid, %status, "supervisor process ended");
                        false
                    }
                    Err(source) => {
                        return Err(BackendError::Io {
                            action: "check the supervisor process of",
                            path: PathBuf::from(uuid),
                            source,
                        })
                    }
                },
                None => process_runs(job.pid, uuid),
            };
            if !alive {
                ended.push(uuid.clone());
            }
        }
        for uuid in ended {
            self.jobs.remove(&uuid);
            remove_file(&self.pid_file(&uuid));
        }
        Ok(self
            .jobs
            .iter()
            .map(|(uuid, job)| BatchJob {
                id: JobId::new(job.pid.to_string()),
                name: uuid.clone(),
                state: JobState::Running,
                reason: String::new(),
            })
            .collect())
    }

    async fn cancel(&mut self, job: &BatchJob) -> Result<(), BackendError> {
        // Signal only a process this backend tracks under that id, never a
        // pid taken from elsewhere.
        let Some(known) = self
            .jobs
            .get(&job.name)
            .filter(|known| known.id_matches(&job.id))
        else {
            return Ok(());
        };
        match kill(Pid::from_raw(known.pid), Signal::SIGTERM) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(BackendError::Signal {
                action: "send TERM to",
                pid: known.pid,
                source,
            }),
        }
    }
}

impl LocalJob {
    fn id_matches(&self, id: &JobId) -> bool {
        id.as_str() == self.pid.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
    use crate::backend::GpuRequest;

    const UUID: &str = "zzzzz-dz642-000000000000001";

    /// Writes a stand-in for `berth` that prints its arguments, then waits
    /// for TERM.
    fn fake_berth(dir: &Path) -> SupervisorCommand {
        let program = dir.join("fake-berth");
        std::fs::write(
            &program,
            "#!/bin/sh\n\
             echo \"args: $*\"\n\
             echo \"cwd: $(pwd)\"\n\
             trap 'echo got TERM; kill $pid 2>/dev/null; exit 143' TERM\n\
             sleep 60 & pid=$!\n\
             wait $pid\n",
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        SupervisorCommand {
            program,
            config_file: None,
        }
    }

    fn request(dir: &Path) -> JobRequest {
        JobRequest {
            container_uuid: UUID.into(),
            ram: 1 << 20,
            vcpus: 1,
            partitions: vec![],
            max_run_time: 0,
            tmp: 0,
            gpu: GpuRequest::default(),
            priority: 1,
            credentials_file: dir.join(format!("{UUID}.json")),
        }
    }

    /// Waits until the child named in the container's pid file runs the
    /// supervisor command, whose command line names the container.
    async fn wait_until_execed(dir: &Path) {
        let pid = std::fs::read_to_string(dir.join(format!("{UUID}.pid"))).unwrap();
        let cmdline = format!("/proc/{}/cmdline", pid.trim());
        for _ in 0..100 {
            let text = std::fs::read(&cmdline).unwrap_or_default();
            if String::from_utf8_lossy(&text).contains(UUID) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the child in {cmdline} never ran the supervisor command");
    }

    async fn wait_until_gone(backend: &mut LocalBackend) {
        for _ in 0..100 {
            if backend.status().await.unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the supervisor process did not end");
    }

    async fn wait_for_log(path: &Path, text: &str) {
        for _ in 0..100 {
            if std::fs::read_to_string(path)
                .unwrap_or_default()
                .contains(text)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never contained {text:?}", path.display());
    }

    #[tokio::test]
    async fn submit_status_and_cancel_a_child() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend =
            LocalBackend::new(fake_berth(dir.path()), dir.path(), dir.path()).unwrap();
        let submission = backend.submit(&request(dir.path())).await.unwrap();
        assert!(submission.command.ends_with(&format!(
            "supervise --credentials {}/{UUID}.json {UUID}",
            dir.path().display()
        )));

        let jobs = backend.status().await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, submission.job_id);
        assert_eq!(jobs[0].name, UUID);
        assert_eq!(jobs[0].state, JobState::Running);
        let pid_text = std::fs::read_to_string(dir.path().join(format!("{UUID}.pid"))).unwrap();
        assert_eq!(pid_text.trim(), submission.job_id.as_str());

        let log = backend.log_file(UUID);
        wait_for_log(&log, "args: supervise --credentials").await;
        wait_for_log(&log, "cwd: /\n").await;
        backend.cancel(&jobs[0]).await.unwrap();
        wait_until_gone(&mut backend).await;
        wait_for_log(&log, "got TERM").await;
        assert!(!dir.path().join(format!("{UUID}.pid")).exists());
        // Cancelling again, once the process is gone, succeeds.
        backend.cancel(&jobs[0]).await.unwrap();
    }

    #[tokio::test]
    async fn second_submit_for_a_running_container_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend =
            LocalBackend::new(fake_berth(dir.path()), dir.path(), dir.path()).unwrap();
        let first = backend.submit(&request(dir.path())).await.unwrap();
        let err = backend.submit(&request(dir.path())).await.unwrap_err();
        assert!(err.to_string().contains(first.job_id.as_str()), "{err}");
        let jobs = backend.status().await.unwrap();
        backend.cancel(&jobs[0]).await.unwrap();
        wait_until_gone(&mut backend).await;
    }

    #[tokio::test]
    async fn restarted_backend_finds_its_process_by_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = LocalBackend::new(fake_berth(dir.path()), dir.path(), dir.path()).unwrap();
        let submission = first.submit(&request(dir.path())).await.unwrap();
        // A child that has not exec'd yet still shows the test's command
        // line, so the second backend could not recognise it.
        wait_until_execed(dir.path()).await;
        // A stale pid file, and one whose process has another command line.
        std::fs::write(
            dir.path().join("zzzzz-dz642-000000000000002.pid"),
            "999999999\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("zzzzz-dz642-000000000000003.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();

        let mut second = LocalBackend::new(fake_berth(dir.path()), dir.path(), dir.path()).unwrap();
        let jobs = second.status().await.unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(jobs[0].id, submission.job_id);
        assert!(!dir.path().join("zzzzz-dz642-000000000000002.pid").exists());
        assert!(!dir.path().join("zzzzz-dz642-000000000000003.pid").exists());

        second.cancel(&jobs[0]).await.unwrap();
        wait_until_gone(&mut second).await;
        // The first backend's child is the same process; reap it.
        wait_until_gone(&mut first).await;
    }

    #[tokio::test]
    async fn cancel_ignores_an_unknown_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend =
            LocalBackend::new(fake_berth(dir.path()), dir.path(), dir.path()).unwrap();
        let stranger = BatchJob {
            id: JobId::new(std::process::id().to_string()),
            name: UUID.into(),
            state: JobState::Running,
            reason: String::new(),
        };
        backend.cancel(&stranger).await.unwrap();
    }
}
