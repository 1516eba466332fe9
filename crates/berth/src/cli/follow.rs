//! Reading and following a container's log streams.
//!
//! A *stream* is one of the logs the supervisor appends to: the container's
//! `stdout` and `stderr`, and the supervisor's own `supervisor` log. A
//! reader copies a stream's bytes, exactly as stored, to this process's
//! stdout or stderr. When *following*, each read requests that the server
//! hold it ([`LOG_WAIT`]) until there are new bytes or the container
//! changes state, so following needs no polling loop here. A follower
//! stops once the container is final and the stream has no more bytes,
//! because the supervisor flushes its logs before it sets the final state.
//! When the container will never run (it is back in the queue on hold),
//! the caller cancels a [`CancellationToken`] to stop the followers early.
//! Each one then reads the bytes left without waiting and returns.
//!
//! Each follower reports the container states it observes as [`Event`]s,
//! so that `berth run` can show state changes while the container waits.

use std::time::{Duration, Instant};

use anyhow::Context;
use berth_client::ClientError;
use berth_core::ContainerState;
use clap::ValueEnum;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::api::Api;

/// How long a read requests the server to wait for new bytes or a change of
/// state. The server caps the wait at 30 s; staying below the cap keeps
/// the request well within the client's timeout.
pub const LOG_WAIT: Duration = Duration::from_secs(25);

/// The first delay before another read after a transient failure (no
/// response, a timeout, or a 5xx); each further failure doubles it.
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(500);

/// The maximum delay between two attempts.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(8);

/// How long a follower keeps trying after the first of a run of transient
/// failures before it gives up.
const RETRY_GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// A container log stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Stream {
    Stdout,
    Stderr,
    Supervisor,
    /// The container's resource use, a line per sample.
    Crunchstat,
}

impl Stream {
    /// Returns the stream's name in the API path.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Supervisor => "supervisor",
            Stream::Crunchstat => "crunchstat",
        }
    }
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An observation a follower reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The container's state, reported when it differs from the last one
    /// this follower reported.
    State(ContainerState),
}

/// How to read a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read the bytes the stream contains now, then stop.
    Snapshot,
    /// Read on as bytes arrive until the container is final, or until the
    /// follower's stop token is cancelled.
    Follow,
}

/// Copies one stream of a container to `output`, from byte 0.
///
/// When `stop` is cancelled, a follower ends its current wait, reads the
/// bytes the stream has without waiting, and returns; a snapshot ignores it.
pub async fn copy_stream(
    api: &Api,
    container_uuid: &str,
    stream: Stream,
    mode: Mode,
    mut output: impl AsyncWrite + Unpin,
    events: Option<UnboundedSender<Event>>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut offset: u64 = 0;
    let mut last_state: Option<ContainerState> = None;
    let mut retry = Retry::default();
    loop {
        let stopping = mode == Mode::Follow && stop.is_cancelled();
        let final_seen = last_state.is_some_and(ContainerState::is_final);
        let wait = (mode == Mode::Follow && !final_seen && !stopping).then_some(LOG_WAIT);
        let read =
            api.client
                .read_log_since(container_uuid, stream.name(), offset, wait, last_state);
        let result = if wait.is_some() {
            tokio::select! {
                result = read => result,
                // Read again, this time without a wait.
                () = stop.cancelled() => continue,
            }
        } else {
            read.await
        };
        let chunk = match result {
            Ok(chunk) => {
                retry.reset();
                chunk
            }
            Err(err) if mode == Mode::Follow && err.is_transient() => {
                let delay = retry
                    .next_delay()
                    .ok_or_else(|| read_error(api, err, stream, container_uuid))?;
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(err) => return Err(read_error(api, err, stream, container_uuid)),
        };

        if !chunk.data.is_empty() {
            output
                .write_all(&chunk.data)
                .await
                .with_context(|| format!("failed to write the {stream} log"))?;
            output
                .flush()
                .await
                .with_context(|| format!("failed to write the {stream} log"))?;
            offset += chunk.data.len() as u64;
        }

        let state = match chunk.container_state {
            Some(state) => state,
            // The server always sends the state header; without it, ask.
            None => {
                api.client
                    .get_container(container_uuid)
                    .await
                    .map_err(|err| api.explain(err))
                    .with_context(|| format!("failed to get container {container_uuid}"))?
                    .state
            }
        };
        if last_state != Some(state) {
            last_state = Some(state);
            send(&events, Event::State(state));
        }

        let done =
            chunk.data.is_empty() && (mode == Mode::Snapshot || state.is_final() || stopping);
        if done {
            return Ok(());
        }
    }
}

fn send(events: &Option<UnboundedSender<Event>>, event: Event) {
    if let Some(events) = events {
        // A receiver that has gone no longer needs events.
        let _ = events.send(event);
    }
}

fn read_error(api: &Api, err: ClientError, stream: Stream, container_uuid: &str) -> anyhow::Error {
    api.explain(err).context(format!(
        "failed to read the {stream} log of container {container_uuid}"
    ))
}

/// Delays between attempts after transient failures: growing from
/// [`RETRY_FIRST_DELAY`] to [`RETRY_MAX_DELAY`], for at most
/// [`RETRY_GIVE_UP_AFTER`] after the first failure of a run.
#[derive(Debug, Default)]
struct Retry {
    first_failure: Option<Instant>,
    delay: Option<Duration>,
}

impl Retry {
    fn reset(&mut self) {
        *self = Retry::default();
    }

    /// Returns the delay before the next attempt, or `None` when it is time
    /// to give up.
    fn next_delay(&mut self) -> Option<Duration> {
        let first_failure = *self.first_failure.get_or_insert_with(Instant::now);
        if first_failure.elapsed() >= RETRY_GIVE_UP_AFTER {
            return None;
        }
        let delay = match self.delay {
            None => RETRY_FIRST_DELAY,
            Some(previous) => (previous * 2).min(RETRY_MAX_DELAY),
        };
        self.delay = Some(delay);
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_to_the_maximum() {
        let mut retry = Retry::default();
        let delays: Vec<Duration> = (0..7).filter_map(|_| retry.next_delay()).collect();
        assert_eq!(delays[0], RETRY_FIRST_DELAY);
        assert_eq!(delays[1], RETRY_FIRST_DELAY * 2);
        assert_eq!(*delays.last().unwrap(), RETRY_MAX_DELAY);
        assert!(delays.windows(2).all(|pair| pair[0] <= pair[1]));
    }

    #[test]
    fn retry_reset_starts_over() {
        let mut retry = Retry::default();
        retry.next_delay();
        retry.next_delay();
        retry.reset();
        assert_eq!(retry.next_delay(), Some(RETRY_FIRST_DELAY));
    }

    #[test]
    fn retry_gives_up_after_the_limit() {
        let mut retry = Retry {
            first_failure: Instant::now().checked_sub(RETRY_GIVE_UP_AFTER),
            delay: Some(RETRY_MAX_DELAY),
        };
        assert_eq!(retry.next_delay(), None);
    }
}
