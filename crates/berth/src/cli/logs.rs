//! `berth logs`: print a container's logs.
//!
//! The UUID names a container, or a container request, whose container is
//! shown. The container's stdout goes to stdout; its stderr and the
//! supervisor's log go to stderr, byte for byte as stored. With `--follow`
//! the command keeps printing new bytes until the container is final.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncWrite;

use super::api::{Api, Target};
use super::follow::{copy_stream, Mode, Stream};

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
    let container_uuid = container_of(&api, &target).await?;
    let mode = if args.follow {
        Mode::Follow
    } else {
        Mode::Snapshot
    };

    let copies = args.selected_streams().into_iter().map(|stream| {
        let api = &api;
        let container_uuid = container_uuid.as_str();
        async move {
            let output: Box<dyn AsyncWrite + Unpin + Send> = match stream {
                Stream::Stdout => Box::new(tokio::io::stdout()),
                Stream::Stderr | Stream::Supervisor => Box::new(tokio::io::stderr()),
            };
            copy_stream(api, container_uuid, stream, mode, output, None).await
        }
    });
    match mode {
        // Followed streams run side by side, so each shows its bytes as
        // they arrive.
        Mode::Follow => {
            futures::future::try_join_all(copies).await?;
        }
        Mode::Snapshot => {
            for copy in copies {
                copy.await?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
