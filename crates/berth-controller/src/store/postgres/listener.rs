//! The listener: one connection per controller that LISTENs on
//! [`CHANNEL`] and turns each notification into a wake-up of the
//! controller's [`Notifier`].
//!
//! The triggers of the migration `0002_changes` notify at every container
//! write (payload `container:UUID`) and every log append (`log:UUID`),
//! whichever controller made it, this one included. PostgreSQL delivers a
//! notification when its transaction commits, so a woken waiter reads the
//! change.
//!
//! A notification sent while the listener is not connected is lost. So
//! after each connection, the first included, the listener wakes every
//! waiter once, and each re-reads the store. A lost connection is
//! reopened at once after a stable period, or else after a delay that
//! grows from [`FIRST_RETRY_DELAY`] to [`MAX_RETRY_DELAY`].
//!
//! NOTE: payloads name no schema, so the writes of controllers that use
//! another schema of the same database wake these waiters for nothing:
//! each reads the store once more.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::error_chain;
use crate::notify::{ChangeListener, Notifier};

/// The channel the migration's triggers notify on.
pub const CHANNEL: &str = "berth_changes";

/// Delay before the first retry of a failed connection; it doubles with
/// each further failure.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Maximum delay between two connection attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// How long a connection must have lasted for its loss to be retried at
/// once, without a delay.
const STABLE_PERIOD: Duration = Duration::from_secs(30);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Spawns the listener on its own connection, outside the store's pool, so
/// that it never takes a connection the store needs.
pub(super) fn spawn(options: PgConnectOptions, notifier: Arc<Notifier>) -> Option<ChangeListener> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(CONNECT_TIMEOUT)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options);
    let listener = ChangeListener::spawn(move |stop| run(pool, notifier, stop));
    if listener.is_none() {
        tracing::warn!(
            "no Tokio runtime to run the listener on: waiters on this controller hear of other controllers' writes only when their wait ends"
        );
    }
    listener
}

/// Listens until `stop` resolves, reconnecting after failures.
async fn run(pool: PgPool, notifier: Arc<Notifier>, mut stop: oneshot::Receiver<()>) {
    let mut retry_delay = FIRST_RETRY_DELAY;
    let mut failures: u32 = 0;
    loop {
        let connected = tokio::select! {
            _ = &mut stop => break,
            connected = connect(&pool) => connected,
        };
        let wait = match connected {
            Ok(mut listener) => {
                tracing::info!(
                    channel = CHANNEL,
                    failed_attempts = failures,
                    "listening for container and log changes"
                );
                failures = 0;
                notifier.notify_all();
                let started = Instant::now();
                let lost = tokio::select! {
                    _ = &mut stop => break,
                    lost = receive(&mut listener, &notifier) => lost,
                };
                tracing::warn!(
                    error = %lost,
                    "lost the connection that listens for container and log changes: reconnecting"
                );
                if started.elapsed() >= STABLE_PERIOD {
                    retry_delay = FIRST_RETRY_DELAY;
                    continue;
                }
                retry_delay
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(
                    error = %error_chain(&err),
                    failures,
                    retry_in_ms = retry_delay.as_millis() as u64,
                    "failed to listen for container and log changes: waiters on this controller hear of other controllers' writes only when their wait ends"
                );
                retry_delay
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(wait) => {}
        }
        retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
    }
    pool.close().await;
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // A lost connection ends `receive`, and `run` reconnects.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Wakes waiters for each notification until the connection is lost;
/// returns why it was lost.
async fn receive(listener: &mut PgListener, notifier: &Notifier) -> String {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => wake(notifier, notification.payload()),
            Ok(None) => return "the connection closed".to_string(),
            Err(err) => return error_chain(&err),
        }
    }
}

/// Wakes the waiters a notification concerns. An unknown payload, from a
/// newer controller perhaps, wakes every waiter.
fn wake(notifier: &Notifier, payload: &str) {
    match payload.split_once(':') {
        Some(("container", uuid)) => {
            notifier.notify(uuid);
            notifier.notify_changes();
        }
        Some(("log", uuid)) => notifier.notify(uuid),
        _ => {
            tracing::debug!(payload, "unknown notification: waking every waiter");
            notifier.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_notification_wakes_container_and_change_waiters() {
        let notifier = Notifier::new();
        let changes = notifier.subscribe_changes();
        let container = notifier.subscribe("zzzzz-dz642-0123456789abcde");
        let other = notifier.subscribe("zzzzz-dz642-000000000000000");
        wake(&notifier, "container:zzzzz-dz642-0123456789abcde");
        assert!(changes.has_changed().unwrap());
        assert!(container.has_changed().unwrap());
        assert!(!other.has_changed().unwrap());
    }

    #[test]
    fn log_notification_wakes_container_waiters_only() {
        let notifier = Notifier::new();
        let changes = notifier.subscribe_changes();
        let container = notifier.subscribe("zzzzz-dz642-0123456789abcde");
        wake(&notifier, "log:zzzzz-dz642-0123456789abcde");
        assert!(!changes.has_changed().unwrap());
        assert!(container.has_changed().unwrap());
    }

    #[test]
    fn unknown_notification_wakes_every_waiter() {
        let notifier = Notifier::new();
        let changes = notifier.subscribe_changes();
        let container = notifier.subscribe("zzzzz-dz642-0123456789abcde");
        wake(&notifier, "something new");
        assert!(changes.has_changed().unwrap());
        assert!(container.has_changed().unwrap());
    }
}
