//! The request to stop a run, and where it comes from.
//!
//! [`StopHandle`] is a cancellation token with a reason. `berth supervise`
//! connects it to SIGTERM (what `scancel` sends to the batch script) and
//! SIGINT with [`stop_on_signals`]; tests call [`StopHandle::stop`]
//! themselves, because a test cannot safely signal its own process.

use std::sync::{Arc, OnceLock};

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A request to stop the run, shared by everything that may make it and
/// everything that must react to it. The first reason given is kept.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    token: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

impl StopHandle {
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// Asks the run to stop. Later requests keep the first reason.
    pub fn stop(&self, reason: impl Into<String>) {
        let _ = self.reason.set(reason.into());
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once a stop has been requested.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// Returns the reason for the stop request, if there was one.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }
}

/// Requests a stop on the first SIGTERM or SIGINT. The handlers stay
/// installed afterwards, so a repeated signal is logged instead of ending
/// the process before the container is stopped and the state recorded.
/// Abort the returned task to stop listening.
pub fn stop_on_signals(handle: StopHandle) -> std::io::Result<JoinHandle<()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                Some(()) = terminate.recv() => "SIGTERM",
                Some(()) = interrupt.recv() => "SIGINT",
                else => return,
            };
            if handle.is_stopped() {
                tracing::warn!("received {name} while already stopping; still stopping");
            } else {
                tracing::info!("received {name}; stopping the container");
                handle.stop(format!("cancelled by signal {name}"));
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_reason_is_kept() {
        let handle = StopHandle::new();
        assert!(!handle.is_stopped());
        assert_eq!(handle.reason(), None);
        let clone = handle.clone();
        clone.stop("first");
        handle.stop("second");
        handle.stopped().await;
        assert!(clone.is_stopped());
        assert_eq!(handle.reason(), Some("first"));
    }
}
