//! `berth logs`: print a container's logs.
//!
//! The UUID names a container, or a container request, whose container is
//! shown. The container's stdout goes to stdout; its stderr and the
//! supervisor's log go to stderr, byte for byte as stored. With `--follow`
//! the command keeps printing new bytes until the container is final, or
//! until it is Queued with nothing to run it: the request named is Final,
//! or the container named has priority 0. A followed request whose
//! container was cancelled and retried is followed on into its new
//! container.

use std::process::ExitCode;

use anyhow::Context;
use berth_core::ContainerState;
use clap::Args;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::api::{Api, Target};
use super::follow::{copy_stream, Event, Mode, Stream};
use super::watch::ContainerWatch;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container is final.
    #[arg(short, long)]
    follow: bool,
    /// Streams to print (repeatable; default stdout and stderr).
    #[arg(long = "stream", value_name = "STREAM", value_enum)]
    streams: Vec<Stream>,
    /// A container request UUID (…-xvhdp-…) or container UUID (…-dz642-…).
    #[arg(value_name = "UUID")]
    uuid: String,
}

impl LogsArgs {
    /// Returns the streams to print, each once, in the order given.
    fn selected_streams(&self) -> Vec<Stream> {
        if self.streams.is_empty() {
            return vec![Stream::Stdout, Stream::Stderr];
        }
        let mut streams = Vec::new();
        for stream in &self.streams {
            if !streams.contains(stream) {
                streams.push(*stream);
            }
        }
        streams
    }
}

pub async fn execute(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let target = Target::parse(&args.uuid)?;
    let api = Api::from_env()?;
    let mut container_uuid = container_of(&api, &target).await?;
    let mode = if args.follow {
        Mode::Follow
    } else {
        Mode::Snapshot
    };
    loop {
        show_container(&api, &args, &target, &container_uuid, mode).await?;
        // A followed request whose container was cancelled and retried
        // goes on with its new container, as `berth run` does.
        let (Mode::Follow, Target::Request(request_uuid)) = (mode, &target) else {
            break;
        };
        let next = container_of(&api, &target).await?;
        if next == container_uuid {
            break;
        }
        eprintln!(
            "berth: container {container_uuid} ended; request {request_uuid} runs it again as container {next}"
        );
        container_uuid = next;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints (or follows) the selected streams of one container.
async fn show_container(
    api: &Api,
    args: &LogsArgs,
    target: &Target,
    container_uuid: &str,
    mode: Mode,
) -> anyhow::Result<()> {
    let (events_sender, events) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let copies = args.selected_streams().into_iter().map(|stream| {
        let events = (mode == Mode::Follow).then(|| events_sender.clone());
        let stop = &stop;
        async move {
            let output: Box<dyn AsyncWrite + Unpin + Send> = match stream {
                Stream::Stdout => Box::new(tokio::io::stdout()),
                Stream::Stderr | Stream::Supervisor | Stream::Crunchstat => {
                    Box::new(tokio::io::stderr())
                }
            };
            copy_stream(api, container_uuid, stream, mode, output, events, stop).await
        }
    });
    match mode {
        // Followed streams run side by side, so each shows its bytes as
        // they arrive.
        Mode::Follow => {
            let copies = futures::future::try_join_all(copies);
            drop(events_sender);
            follow_until_done(api, target, container_uuid, copies, events, &stop).await?;
        }
        Mode::Snapshot => {
            for copy in copies {
                copy.await?;
            }
        }
    }
    Ok(())
}

/// Drives the followers of a container's streams until they end, and
/// stops them when the container is Queued with nothing to run it.
async fn follow_until_done<T>(
    api: &Api,
    target: &Target,
    container_uuid: &str,
    copies: impl std::future::Future<Output = anyhow::Result<T>>,
    mut events: mpsc::UnboundedReceiver<Event>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    tokio::pin!(copies);
    let mut watch = ContainerWatch::new(container_uuid);
    let mut state: Option<ContainerState> = None;
    let mut check_failing = false;
    loop {
        // The followers report no state until their first long-poll ends,
        // which takes a whole wait on a held container, so the watch's
        // first call returns at once. Later it returns when the container
        // changes (its priority, for one) or the feed's wait ends.
        let check_due = state.is_none() || state == Some(ContainerState::Queued);
        let check = tokio::select! {
            result = &mut copies => {
                result?;
                return Ok(());
            }
            Some(Event::State(new_state)) = events.recv() => {
                state = Some(new_state);
                new_state == ContainerState::Queued
            }
            () = watch.changed(api), if check_due => true,
        };
        if !check || stop.is_cancelled() {
            continue;
        }

        // A failed check is shown once and tried again; the followers end
        // the command if the controller stays unreachable.
        match check_on_hold(api, target, container_uuid).await {
            Ok(HoldCheck {
                state: current,
                reason,
            }) => {
                check_failing = false;
                state = Some(current);
                if let Some(reason) = reason {
                    eprintln!("berth: {reason}; stopping");
                    stop.cancel();
                }
            }
            Err(err) => {
                if !check_failing {
                    eprintln!(
                        "berth: failed to check container {container_uuid} (trying again): {err:#}"
                    );
                }
                check_failing = true;
            }
        }
    }
}

/// The result of [`check_on_hold`].
#[derive(Debug)]
struct HoldCheck {
    /// The container's state at the check.
    state: ContainerState,
    /// The reason nothing will run the container, when nothing will.
    reason: Option<String>,
}

/// Checks whether the container is Queued with nothing to run it: the
/// request named is Final, or the container named has priority 0.
async fn check_on_hold(
    api: &Api,
    target: &Target,
    container_uuid: &str,
) -> anyhow::Result<HoldCheck> {
    let container = api
        .client
        .get_container(container_uuid)
        .await
        .map_err(|err| api.explain(err))
        .with_context(|| format!("failed to get container {container_uuid}"))?;
    let mut held = HoldCheck {
        state: container.state,
        reason: None,
    };
    if container.state != ContainerState::Queued {
        return Ok(held);
    }
    match target {
        Target::Container(_) => {
            if container.priority == 0 {
                held.reason = Some(format!(
                    "container {container_uuid} is Queued with priority 0, so nothing will run it"
                ));
            }
        }
        Target::Request(uuid) => {
            let request = api
                .client
                .get_container_request(uuid.as_str())
                .await
                .map_err(|err| api.explain(err))
                .with_context(|| format!("failed to get container request {uuid}"))?;
            if request.state == berth_core::RequestState::Final {
                held.reason = Some(format!(
                    "request {uuid} is Final and its container {container_uuid} is Queued, \
                     so it will not run for this request"
                ));
            }
        }
    }
    Ok(held)
}

/// Resolves a target to a container UUID: the container itself, or a
/// request's container.
async fn container_of(api: &Api, target: &Target) -> anyhow::Result<String> {
    match target {
        Target::Container(uuid) => Ok(uuid.to_string()),
        Target::Request(uuid) => {
            let request = api
                .client
                .get_container_request(uuid.as_str())
                .await
                .map_err(|err| api.explain(err))
                .with_context(|| format!("failed to get container request {uuid}"))?;
            request.container_uuid.with_context(|| {
                format!(
                    "container request {uuid} has no container (it is {}), so it has no logs",
                    request.state
                )
            })
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
        args: LogsArgs,
    }

    fn parse(args: &[&str]) -> Result<LogsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("logs").chain(args.iter().copied())).map(|cli| cli.args)
    }

    #[test]
    fn default_streams_are_stdout_and_stderr() {
        let args = parse(&["zzzzz-dz642-0123456789abcde"]).unwrap();
        assert!(!args.follow);
        assert_eq!(args.selected_streams(), [Stream::Stdout, Stream::Stderr]);
    }

    #[test]
    fn chosen_streams_are_kept_once_in_order() {
        let args = parse(&[
            "-f",
            "--stream",
            "supervisor",
            "--stream",
            "stdout",
            "--stream",
            "supervisor",
            "zzzzz-xvhdp-0123456789abcde",
        ])
        .unwrap();
        assert!(args.follow);
        assert_eq!(
            args.selected_streams(),
            [Stream::Supervisor, Stream::Stdout]
        );
    }

    #[test]
    fn unknown_stream_is_a_usage_error() {
        let err = parse(&["--stream", "stdin", "zzzzz-dz642-0123456789abcde"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("stdin"), "{err}");
    }

    #[tokio::test]
    async fn wrong_uuid_shape_is_named_before_any_call() {
        // No API settings are needed: the UUID check comes first.
        let args = parse(&["zzzzz-4zz18-0123456789abcde"]).unwrap();
        let err = execute(args).await.unwrap_err().to_string();
        assert!(err.contains("zzzzz-4zz18-0123456789abcde"), "{err}");
        let args = parse(&["abc"]).unwrap();
        let err = execute(args).await.unwrap_err().to_string();
        assert!(err.contains("\"abc\""), "{err}");
    }
}
