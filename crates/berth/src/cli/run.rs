//! `berth run`: submit a container, follow it, and exit with its exit code.
//!
//! The command creates a committed container request, prints the request
//! and container UUIDs on stderr, and then follows the container's stdout
//! and stderr at the same time, copying their bytes unchanged to its own
//! stdout and stderr as they arrive. The log reads are server long-polls
//! that also return when the container changes state, which is how the
//! command notices and shows `Queued`, `Locked` and `Running` while the
//! container waits.
//!
//! Exit status, as `docker run` gives it:
//! - the container's exit code when it completes;
//! - 130 (128 + SIGINT) when Ctrl-C cancelled it;
//! - 125 when it ends Cancelled otherwise, or when `berth run` itself fails;
//! - 2 for invalid arguments.
//!
//! The first Ctrl-C cancels the request (see `berth cancel`) and keeps
//! following until the container is final, or until it is back in the
//! queue on hold because its job was stopped before it started; the
//! command then sets the request Final. A second Ctrl-C exits at once.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Context};
use berth_core::priority::MAX_REQUEST_PRIORITY;
use berth_core::validate::is_clean_absolute_path;
use berth_core::{Container, ContainerState, RequestState};
use clap::Args;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::api::Api;
use super::cancel::{cancel_request, finalize_if_on_hold, CancelOutcome};
use super::follow::{copy_stream, Event, Mode, Stream};
use super::watch::ContainerWatch;

/// Memory a container gets when `--ram` is not given.
const DEFAULT_RAM: &str = "256M";

/// Capacity in bytes of the `/out` scratch mount, the request's output
/// directory: 1 GiB.
pub const OUTPUT_CAPACITY: i64 = 1 << 30;

/// The request's output directory inside the container.
const OUTPUT_PATH: &str = "/out";

/// Exit status for a container that ended Cancelled, and for failures of
/// `berth run` itself.
const RUN_FAILURE_EXIT_CODE: u8 = 125;

/// Exit status after Ctrl-C: 128 + SIGINT, as shells report it.
const INTERRUPTED_EXIT_CODE: u8 = 130;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Memory for the container, in bytes or with a binary unit: 512M, 2G.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_RAM, value_parser = parse_ram,
          allow_hyphen_values = true)]
    ram: i64,
    /// Number of CPUs for the container.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    vcpus: u32,
    /// A name for the request, shown by `berth ls`.
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable in the container (repeatable). A bare
    /// KEY copies KEY's value from this environment.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<EnvVar>,
    /// Scheduling priority, from 1 (lowest) to 1000.
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(i64).range(1..=MAX_REQUEST_PRIORITY))]
    priority: i64,
    /// Working directory inside the container (an absolute path).
    #[arg(long, value_name = "DIR", value_parser = parse_workdir)]
    workdir: Option<String>,
    /// Image to run, by name in the container runtime's image store.
    #[arg(value_name = "IMAGE", value_parser = parse_image)]
    image: String,
    /// The command to run and its arguments, after `--`.
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

/// One `--env` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EnvVar {
    key: String,
    value: String,
}

/// The largest `--ram` accepted, written with the largest unit: 2^63 bytes
/// less one TiB, the largest whole number of TiB below the maximum of an
/// i64 byte count.
const MAX_RAM_TEXT: &str = "8388607T";

fn parse_ram(text: &str) -> Result<i64, String> {
    berth_core::units::parse_size(text).map_err(|err| {
        if is_too_large(text) {
            format!("size {text:?} is too large: the maximum is {MAX_RAM_TEXT} (just under 8 EiB)")
        } else {
            err
        }
    })
}

/// Returns whether a size is a valid number and unit whose value is too
/// large for an i64 byte count.
fn is_too_large(text: &str) -> bool {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let Ok(number) = number.parse::<f64>() else {
        return false;
    };
    // The size of one unit, from the same parser, so that both agree on
    // the units.
    let Ok(unit_bytes) = berth_core::units::parse_size(&format!("1{unit}")) else {
        return false;
    };
    number * unit_bytes as f64 >= i64::MAX as f64
}

fn parse_env(text: &str) -> Result<EnvVar, String> {
    let (key, value) = match text.split_once('=') {
        Some((key, value)) => (key.to_string(), value.to_string()),
        None => {
            let value = std::env::var(text).map_err(|_| {
                format!(
                    "{text:?} has no '=' and no variable of that name is set here: write KEY=VALUE"
                )
            })?;
            (text.to_string(), value)
        }
    };
    if key.is_empty() {
        return Err(format!(
            "invalid environment setting {text:?}: the name before '=' is empty"
        ));
    }
    if key.contains('\0') || value.contains('\0') {
        return Err(format!(
            "invalid environment setting {text:?}: it contains a NUL byte"
        ));
    }
    Ok(EnvVar { key, value })
}

fn parse_workdir(text: &str) -> Result<String, String> {
    if is_clean_absolute_path(text) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "invalid working directory {text:?}: give an absolute path without '..'"
        ))
    }
}

fn parse_image(text: &str) -> Result<String, String> {
    if text.is_empty() || text.contains(char::is_whitespace) {
        Err(format!(
            "invalid image name {text:?}: give a name such as localhost/busybox:latest"
        ))
    } else {
        Ok(text.to_string())
    }
}

/// Builds the attributes of the container request that `args` describe.
fn request_body(args: &RunArgs) -> Value {
    let environment: BTreeMap<&str, &str> = args
        .env
        .iter()
        .map(|var| (var.key.as_str(), var.value.as_str()))
        .collect();

    let mut body = Map::new();
    body.insert("state".into(), json!("Committed"));
    body.insert("container_image".into(), json!(args.image));
    body.insert("command".into(), json!(args.command));
    body.insert("environment".into(), json!(environment));
    body.insert(
        "mounts".into(),
        json!({ OUTPUT_PATH: { "kind": "tmp", "capacity": OUTPUT_CAPACITY } }),
    );
    body.insert("output_path".into(), json!(OUTPUT_PATH));
    body.insert(
        "runtime_constraints".into(),
        json!({ "ram": args.ram, "vcpus": args.vcpus }),
    );
    body.insert("priority".into(), json!(args.priority));

    // Each `berth run` runs its command anew, as `docker run` does, rather
    // than reusing an earlier container with the same command.
    body.insert("use_existing".into(), json!(false));

    if let Some(name) = &args.name {
        body.insert("name".into(), json!(name));
    }
    if let Some(workdir) = &args.workdir {
        body.insert("cwd".into(), json!(workdir));
    }
    Value::Object(body)
}

pub async fn execute(args: RunArgs) -> anyhow::Result<ExitCode> {
    match run(args).await {
        Ok(code) => Ok(code),
        Err(err) => {
            eprintln!("berth: {err:#}");
            Ok(ExitCode::from(RUN_FAILURE_EXIT_CODE))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let api = Api::from_env()?;
    // Catch Ctrl-C before the request exists, so that an interrupt during
    // its creation still cancels it.
    let interrupt = catch_interrupts()?;
    let request = api
        .client
        .create_container_request(&request_body(&args))
        .await
        .map_err(|err| api.explain(err))
        .context("failed to create the container request")?;
    eprintln!("berth: request {}", request.uuid);
    let container_uuid = match request.container_uuid {
        Some(uuid) => uuid,
        None => bail!(
            "the controller assigned no container to request {}; see `berth ls --all`",
            request.uuid
        ),
    };

    let mut session = Session {
        api,
        request_uuid: request.uuid,
        interrupt,
        cancel_requested: false,
        check_failing: false,
        progress: Progress::default(),
    };
    let mut container_uuid = container_uuid;
    loop {
        eprintln!("berth: container {container_uuid}");
        let Some(container) = session.follow(&container_uuid).await? else {
            eprintln!(
                "berth: request {} was cancelled before its container started",
                session.request_uuid
            );
            return Ok(ExitCode::from(cancelled_exit_code(
                session.cancel_requested,
            )));
        };
        if container.state == ContainerState::Cancelled {
            if let Some(next) = session.retry_container(&container).await? {
                eprintln!(
                    "berth: container {container_uuid} was cancelled ({}); the request runs it again",
                    cancel_reason(&container, session.cancel_requested)
                );
                container_uuid = next;
                session.progress = Progress::default();
                continue;
            }
        }
        let end = RunEnd::of(&container, session.cancel_requested);
        if let Some(message) = &end.message {
            eprintln!("berth: {message}");
        }
        // On stderr, because stdout carries the container's own output.
        if let Some(output) = &container.output {
            eprintln!("berth: output {output} (fetch it with `berth get {output} DEST`)");
        }
        if let Some(log) = &container.log {
            eprintln!("berth: log {log}");
        }
        return Ok(ExitCode::from(end.code));
    }
}

/// Installs the Ctrl-C handler. The first SIGINT is delivered through the
/// returned receiver; the second ends the process at once.
fn catch_interrupts() -> anyhow::Result<oneshot::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupts = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let (first, receiver) = oneshot::channel();
    tokio::spawn(async move {
        if interrupts.recv().await.is_none() {
            // Keep the sender, so that the receiver never reads a closed
            // channel as an interrupt.
            let _first = first;
            return std::future::pending().await;
        }
        let _ = first.send(());
        if interrupts.recv().await.is_some() {
            eprintln!("berth: interrupted again; exiting without waiting for the container");
            std::process::exit(i32::from(INTERRUPTED_EXIT_CODE));
        }
    });
    Ok(receiver)
}

/// One `berth run` after its request exists.
#[derive(Debug)]
struct Session {
    api: Api,
    request_uuid: String,
    interrupt: oneshot::Receiver<()>,
    /// Whether this command has cancelled the request (first Ctrl-C).
    cancel_requested: bool,
    /// Whether the last check in [`Session::check_on_hold`] failed.
    check_failing: bool,
    progress: Progress,
}

impl Session {
    /// Follows a container until it is final and returns it, or returns
    /// `None` when the request became Final while its container was
    /// Queued, so that the container will never run for it. A request
    /// cancelled here or elsewhere whose container is back in the queue is
    /// set Final here.
    async fn follow(&mut self, container_uuid: &str) -> anyhow::Result<Option<Container>> {
        // The first long-poll returns only after a change, so show the
        // state the container starts from now.
        self.show_progress(container_uuid).await?;

        let (events_sender, mut events) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let api = self.api.clone();
        let streams = async {
            let stdout = copy_stream(
                &api,
                container_uuid,
                Stream::Stdout,
                Mode::Follow,
                tokio::io::stdout(),
                Some(events_sender.clone()),
                &stop,
            );
            let stderr = copy_stream(
                &api,
                container_uuid,
                Stream::Stderr,
                Mode::Follow,
                tokio::io::stderr(),
                Some(events_sender),
                &stop,
            );
            tokio::try_join!(stdout, stderr).map(|_| ())
        };
        tokio::pin!(streams);

        // A cancel from another shell (priority 0, or state Final) leaves
        // the container's state as it is, so the log followers do not see
        // it. It changes the container's priority, which the change feed
        // reports, so the request is checked again then.
        let mut watch = ContainerWatch::new(container_uuid);
        // Set once the request is Final and its container Queued: the
        // streams then read what is left and end.
        let mut on_hold = false;
        loop {
            let queued = self.progress.state == Some(ContainerState::Queued);
            tokio::select! {
                result = &mut streams => {
                    result?;
                    break;
                }
                Some(Event::State(_)) = events.recv() => {
                    self.show_progress(container_uuid).await?;
                    if !on_hold && self.progress.state == Some(ContainerState::Queued) {
                        on_hold = self.check_on_hold().await;
                    }
                }
                () = watch.changed(&api), if queued && !on_hold => {
                    on_hold = self.check_on_hold().await;
                }
                _ = &mut self.interrupt, if !self.cancel_requested => {
                    self.cancel_requested = true;
                    eprintln!(
                        "berth: cancelling request {} (press Ctrl-C again to exit at once)",
                        self.request_uuid
                    );
                    match cancel_request(&self.api, &self.request_uuid).await {
                        Ok(outcome @ (CancelOutcome::Finalized { .. } | CancelOutcome::OnHold { .. })) => {
                            eprintln!("berth: {outcome}");
                            on_hold = true;
                        }
                        Ok(outcome) => eprintln!("berth: {outcome}"),
                        Err(err) => eprintln!("berth: failed to cancel request {}: {err:#}; still following", self.request_uuid),
                    }
                }
            }
            if on_hold {
                stop.cancel();
            }
        }
        if on_hold {
            return Ok(None);
        }

        let container = self
            .api
            .client
            .get_container(container_uuid)
            .await
            .map_err(|err| self.api.explain(err))
            .with_context(|| format!("failed to get container {container_uuid}"))?;
        Ok(Some(container))
    }

    /// Returns whether the request is Final while its container is Queued,
    /// setting a cancelled request Final first. A failed check counts as
    /// no, because the next one may succeed, and the log followers end the
    /// run if the controller stays unreachable. Only the first of several
    /// failures in a row is shown.
    async fn check_on_hold(&mut self) -> bool {
        match finalize_if_on_hold(&self.api, &self.request_uuid).await {
            Ok(on_hold) => {
                self.check_failing = false;
                on_hold
            }
            Err(err) => {
                if !self.check_failing {
                    eprintln!(
                        "berth: failed to check request {} (trying again): {err:#}",
                        self.request_uuid
                    );
                }
                self.check_failing = true;
                false
            }
        }
    }

    /// Shows the container's state and runtime error when they change.
    /// A transient failure to look only skips this update.
    async fn show_progress(&mut self, container_uuid: &str) -> anyhow::Result<()> {
        let container = match self.api.client.get_container(container_uuid).await {
            Ok(container) => container,
            Err(err) if err.is_transient() => return Ok(()),
            Err(err) => {
                return Err(self.api.explain(err))
                    .with_context(|| format!("failed to get container {container_uuid}"))
            }
        };
        for line in self.progress.update(&container) {
            eprintln!("berth: {line}");
        }
        Ok(())
    }

    /// Returns the container that replaces a cancelled one, when the
    /// controller retried the request (`container_count_max`).
    async fn retry_container(&self, cancelled: &Container) -> anyhow::Result<Option<String>> {
        if self.cancel_requested {
            return Ok(None);
        }
        let request = self
            .api
            .client
            .get_container_request(&self.request_uuid)
            .await
            .map_err(|err| self.api.explain(err))
            .with_context(|| format!("failed to get request {}", self.request_uuid))?;
        Ok(match request.container_uuid {
            Some(next) if request.state == RequestState::Committed && next != cancelled.uuid => {
                Some(next)
            }
            _ => None,
        })
    }
}

/// The container state and runtime error that `berth run` has shown so
/// far.
#[derive(Debug, Default)]
struct Progress {
    state: Option<ContainerState>,
    error: Option<String>,
}

impl Progress {
    /// Records the container's state and returns the lines to show for
    /// what changed: a new non-final state, a new runtime error.
    fn update(&mut self, container: &Container) -> Vec<String> {
        let mut lines = Vec::new();
        if self.state != Some(container.state) {
            self.state = Some(container.state);
            if !container.state.is_final() {
                lines.push(container.state.to_string());
            }
        }
        // The closing message of a final container carries its error.
        let error = runtime_error(container).filter(|_| !container.state.is_final());
        if error.is_some() && error != self.error {
            if let Some(error) = &error {
                lines.push(format!("runtime error: {error}"));
            }
            self.error = error;
        }
        lines
    }
}

/// `runtime_status.error` of a container, with `errorDetail` when present.
fn runtime_error(container: &Container) -> Option<String> {
    let error = container.runtime_status.get("error")?.as_str()?;
    match container
        .runtime_status
        .get("errorDetail")
        .and_then(Value::as_str)
    {
        Some(detail) if !detail.is_empty() => Some(format!("{error} ({detail})")),
        _ => Some(error.to_string()),
    }
}

fn cancel_reason(container: &Container, cancel_requested: bool) -> String {
    match runtime_error(container) {
        Some(error) => error,
        None if cancel_requested => "cancelled at your request".to_string(),
        None => "no reason was recorded".to_string(),
    }
}

/// Returns the exit status for a container that was cancelled, or that
/// will never run: 130 when Ctrl-C cancelled it, else 125.
fn cancelled_exit_code(cancel_requested: bool) -> u8 {
    if cancel_requested {
        INTERRUPTED_EXIT_CODE
    } else {
        RUN_FAILURE_EXIT_CODE
    }
}

/// The exit status and closing message of `berth run` for a final
/// container.
#[derive(Debug, PartialEq, Eq)]
struct RunEnd {
    code: u8,
    message: Option<String>,
}

impl RunEnd {
    fn of(container: &Container, cancel_requested: bool) -> RunEnd {
        let uuid = &container.uuid;
        match (container.state, container.exit_code) {
            (ContainerState::Complete, Some(code)) => match u8::try_from(code) {
                Ok(code) => RunEnd {
                    code,
                    message: None,
                },
                Err(_) => RunEnd {
                    code: RUN_FAILURE_EXIT_CODE,
                    message: Some(format!(
                        "container {uuid} exited with code {code}, which is outside 0-255"
                    )),
                },
            },
            (ContainerState::Complete, None) => RunEnd {
                code: RUN_FAILURE_EXIT_CODE,
                message: Some(format!("container {uuid} is Complete but has no exit code")),
            },
            (state, _) => RunEnd {
                code: if state == ContainerState::Cancelled {
                    cancelled_exit_code(cancel_requested)
                } else {
                    RUN_FAILURE_EXIT_CODE
                },
                message: Some(format!(
                    "container {uuid} ended {state}: {}",
                    cancel_reason(container, cancel_requested)
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|cli| cli.args)
    }

    fn container(state: ContainerState, exit_code: Option<i32>) -> Container {
        let now = berth_core::time::format(&chrono::Utc::now());
        let mut container: Container = serde_json::from_value(json!({
            "uuid": "zzzzz-dz642-0123456789abcde",
            "owner_uuid": "zzzzz-tpzed-000000000000000",
            "created_at": now, "modified_at": now,
            "modified_by_user_uuid": null, "state": "Queued",
            "log": null, "cwd": "/", "output_path": "/out",
            "output": null, "container_image": "localhost/busybox:latest",
            "progress": null, "exit_code": null, "auth_uuid": null,
            "locked_by_uuid": null, "runtime_user_uuid": null,
            "gateway_address": null,
        }))
        .unwrap();
        container.state = state;
        container.exit_code = exit_code;
        container
    }

    #[test]
    fn defaults_build_a_committed_request() {
        let args = parse(&["localhost/busybox:latest", "--", "echo", "hi"]).unwrap();
        let body = request_body(&args);
        assert_eq!(body["state"], "Committed");
        assert_eq!(body["container_image"], "localhost/busybox:latest");
        assert_eq!(body["command"], json!(["echo", "hi"]));
        assert_eq!(
            body["runtime_constraints"],
            json!({"ram": 256 << 20, "vcpus": 1})
        );
        assert_eq!(body["priority"], 500);
        assert_eq!(body["output_path"], "/out");
        assert_eq!(
            body["mounts"],
            json!({"/out": {"kind": "tmp", "capacity": OUTPUT_CAPACITY}})
        );
        assert_eq!(body["environment"], json!({}));
        assert_eq!(body["use_existing"], false);
        assert!(body.get("name").is_none());
        assert!(body.get("cwd").is_none());
    }

    #[test]
    fn options_reach_the_request() {
        let args = parse(&[
            "--ram",
            "2G",
            "--vcpus",
            "4",
            "--name",
            "job one",
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "--priority",
            "1000",
            "--workdir",
            "/tmp",
            "img",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        let body = request_body(&args);
        assert_eq!(
            body["runtime_constraints"],
            json!({"ram": 2i64 << 30, "vcpus": 4})
        );
        assert_eq!(body["name"], "job one");
        assert_eq!(body["environment"], json!({"A": "1", "B": "x=y"}));
        assert_eq!(body["priority"], 1000);
        assert_eq!(body["cwd"], "/tmp");
        assert_eq!(body["command"], json!(["sh", "-c", "exit 3"]));
    }

    #[test]
    fn command_without_separator_keeps_its_flags() {
        let args = parse(&["img", "ls", "-l", "--all"]).unwrap();
        assert_eq!(args.image, "img");
        assert_eq!(args.command, ["ls", "-l", "--all"]);
    }

    #[test]
    fn separator_is_not_part_of_the_command() {
        let args = parse(&["img", "--", "echo", "--", "x"]).unwrap();
        assert_eq!(args.command, ["echo", "--", "x"]);
    }

    #[test]
    fn bad_ram_is_usage_error() {
        for bad in ["lots", "-5", "0", "12X"] {
            let err = parse(&["--ram", bad, "img", "--", "true"]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            let text = err.to_string();
            assert!(text.contains(&format!("{bad:?}")), "{text}");
            assert!(text.contains("--ram"), "{text}");
        }
    }

    #[test]
    fn ram_too_large_names_value_and_maximum() {
        for bad in ["99999999999999999999", "8388608T", "9999999999999G"] {
            let err = parse(&["--ram", bad, "img", "--", "true"]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            let text = err.to_string();
            assert!(text.contains(&format!("{bad:?}")), "{text}");
            assert!(text.contains("too large"), "{text}");
            assert!(text.contains(MAX_RAM_TEXT), "{text}");
        }
        let args = parse(&["--ram", MAX_RAM_TEXT, "img", "--", "true"]).unwrap();
        assert_eq!(args.ram, i64::MAX - (1 << 40) + 1);
    }

    #[test]
    fn zero_vcpus_is_a_usage_error() {
        let err = parse(&["--vcpus", "0", "img", "--", "true"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--vcpus"), "{err}");
    }

    #[test]
    fn priority_out_of_range_is_a_usage_error() {
        for bad in ["0", "1001", "-1"] {
            let err = parse(&["--priority", bad, "img", "--", "true"]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn missing_command_is_a_usage_error() {
        let err = parse(&["img"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["img", "--"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn relative_workdir_is_rejected() {
        let err = parse(&["--workdir", "data", "img", "--", "true"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("\"data\""), "{err}");
    }

    #[test]
    fn env_setting_parses_key_and_value() {
        assert_eq!(
            parse_env("K=v=w").unwrap(),
            EnvVar {
                key: "K".into(),
                value: "v=w".into()
            }
        );
        assert_eq!(parse_env("EMPTY=").unwrap().value, "");
        assert!(parse_env("=v").unwrap_err().contains("\"=v\""));
    }

    #[test]
    fn bare_env_name_copies_this_environment() {
        std::env::set_var("BERTH_RUN_TEST_COPIED", "copied value");
        assert_eq!(
            parse_env("BERTH_RUN_TEST_COPIED").unwrap().value,
            "copied value"
        );
        let err = parse_env("BERTH_RUN_TEST_SURELY_UNSET").unwrap_err();
        assert!(err.contains("BERTH_RUN_TEST_SURELY_UNSET"), "{err}");
    }

    #[test]
    fn complete_container_gives_its_exit_code() {
        let end = RunEnd::of(&container(ContainerState::Complete, Some(3)), false);
        assert_eq!(
            end,
            RunEnd {
                code: 3,
                message: None
            }
        );
    }

    #[test]
    fn cancelled_container_exits_125_with_reason() {
        let mut cancelled = container(ContainerState::Cancelled, None);
        cancelled
            .runtime_status
            .insert("error".into(), json!("the batch job vanished"));
        let end = RunEnd::of(&cancelled, false);
        assert_eq!(end.code, 125);
        let message = end.message.unwrap();
        assert!(message.contains("ended Cancelled"), "{message}");
        assert!(message.contains("the batch job vanished"), "{message}");
    }

    #[test]
    fn container_cancelled_by_ctrl_c_exits_130() {
        let end = RunEnd::of(&container(ContainerState::Cancelled, None), true);
        assert_eq!(end.code, 130);
        assert!(end.message.unwrap().contains("at your request"));
        assert_eq!(cancelled_exit_code(true), 130);
        assert_eq!(cancelled_exit_code(false), 125);
    }

    #[test]
    fn container_completed_despite_ctrl_c_keeps_its_exit_code() {
        let end = RunEnd::of(&container(ContainerState::Complete, Some(0)), true);
        assert_eq!(end.code, 0);
    }

    #[test]
    fn exit_code_outside_byte_range_exits_125() {
        let end = RunEnd::of(&container(ContainerState::Complete, Some(300)), false);
        assert_eq!(end.code, 125);
        let end = RunEnd::of(&container(ContainerState::Complete, None), false);
        assert_eq!(end.code, 125);
    }

    #[test]
    fn progress_shows_each_change_once() {
        let mut progress = Progress::default();
        assert_eq!(
            progress.update(&container(ContainerState::Queued, None)),
            ["Queued"]
        );
        assert!(progress
            .update(&container(ContainerState::Queued, None))
            .is_empty());
        assert_eq!(
            progress.update(&container(ContainerState::Locked, None)),
            ["Locked"]
        );
        let mut running = container(ContainerState::Running, None);
        running
            .runtime_status
            .insert("error".into(), json!("disk full"));
        assert_eq!(
            progress.update(&running),
            ["Running", "runtime error: disk full"]
        );
        assert!(progress.update(&running).is_empty());
        let mut cancelled = container(ContainerState::Cancelled, None);
        cancelled
            .runtime_status
            .insert("error".into(), json!("killed"));
        assert!(progress.update(&cancelled).is_empty());
    }
}
