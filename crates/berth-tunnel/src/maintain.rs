//! The dial side's reconnect loop: [`maintain`] keeps one tunnel up for
//! a container until the controller rejects it because the container takes no tunnel.
//!
//! Each stream the controller opens goes to the handler in a task of its
//! own. When the controller asks the tunnel to move, the loop dials a new
//! tunnel first; only once that one is up does the old one stop taking
//! streams (GOAWAY), and its open streams get the grace period to finish.
//! Failures are logged once per change of kind, with the number of
//! repeats of the previous kind, so a controller that stays down for
//! hours does not fill the job's log.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn, Instrument};

use crate::backoff::{Backoff, FailureClass};
use crate::config::DialConfig;
use crate::dial::dial;
use crate::error::TunnelError;
use crate::server::{IncomingStream, TunnelServer};

/// Opens one tunnel; [`maintain_with`] calls it for each attempt.
pub trait Connector: Send + Sync {
    /// Opens a tunnel, or fails with the reason.
    fn connect(&self) -> impl Future<Output = Result<TunnelServer, TunnelError>> + Send;
}

/// Dials the controller that a [`DialConfig`] names.
#[derive(Debug, Clone)]
pub struct Dialer(pub DialConfig);

impl Connector for Dialer {
    fn connect(&self) -> impl Future<Output = Result<TunnelServer, TunnelError>> + Send {
        dial(&self.0)
    }
}

/// Keeps a tunnel up and passes each stream to `handler`. Returns the
/// final rejection (the container is not Locked or Running) or an
/// invalid setting. Dropping the future closes the tunnel and stops the
/// handlers' tasks.
#[instrument(skip_all, fields(container = %config.container_uuid, controller = %config.controller_url))]
pub async fn maintain<H, F>(config: DialConfig, handler: H) -> TunnelError
where
    H: Fn(IncomingStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    if let Err(error) = config.validate() {
        return error;
    }
    let backoff = Backoff::new(config.backoff);
    let grace = config.move_grace_period;
    maintain_with(Dialer(config), backoff, grace, handler).await
}

/// [`maintain`] with its connector and backoff given.
pub async fn maintain_with<C, H, F>(
    connector: C,
    mut backoff: Backoff,
    move_grace_period: Duration,
    handler: H,
) -> TunnelError
where
    C: Connector,
    H: Fn(IncomingStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    let reset_after = backoff.config().reset_after;
    let mut tasks = JoinSet::new();
    let mut failures = FailureLog::default();
    // Set while a moved tunnel drains: firing it ends the old tunnel's
    // wait for its successor.
    let mut moving: Option<oneshot::Sender<()>> = None;

    loop {
        let attempt = reap_while(&mut tasks, connector.connect()).await;
        let mut tunnel = match attempt {
            Ok(tunnel) => tunnel,
            Err(error) => {
                let class = FailureClass::of(&error);
                let Some(delay) = backoff.next_delay(class) else {
                    warn!(%error, "controller rejected the tunnel for good; stopping");
                    return error;
                };
                failures.record(&error, delay);
                reap_while(&mut tasks, tokio::time::sleep(delay)).await;
                continue;
            }
        };
        failures.recovered();
        info!("tunnel up");
        if let Some(successor_up) = moving.take() {
            let _ = successor_up.send(());
        }
        let up_since = Instant::now();

        match serve_until_move(&mut tunnel, &handler, &mut tasks).await {
            // NOTE: the new tunnel is dialled at the same URL, so a load
            // balancer could send it back to the controller that asked to
            // move. That controller must reject new tunnels (503 with
            // Retry-After) while it shuts down.
            Served::Moved(requested_grace) => {
                let grace = requested_grace.min(move_grace_period);
                info!(grace_period = ?grace, "controller asked the tunnel to move; dialling a new one");
                let (successor_up, wait) = oneshot::channel();
                moving = Some(successor_up);
                tasks.spawn(drain(tunnel, handler.clone(), wait, grace).in_current_span());
                backoff.reset();
                continue;
            }
            Served::Closed(result) => {
                if up_since.elapsed() >= reset_after {
                    backoff.reset();
                }
                let error = match result {
                    Ok(()) => TunnelError::Closed,
                    Err(error) => error,
                };
                let delay = backoff
                    .next_delay(FailureClass::Transient)
                    .unwrap_or(Duration::ZERO);
                failures.record(&error, delay);
                reap_while(&mut tasks, tokio::time::sleep(delay)).await;
            }
        }
    }
}

enum Served {
    Moved(Duration),
    Closed(Result<(), TunnelError>),
}

async fn serve_until_move<H, F>(
    tunnel: &mut TunnelServer,
    handler: &Arc<H>,
    tasks: &mut JoinSet<()>,
) -> Served
where
    H: Fn(IncomingStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut moves = tunnel.move_signal();
    let mut move_possible = true;
    loop {
        tokio::select! {
            accepted = tunnel.accept() => match accepted {
                Ok(Some(stream)) => {
                    debug!(kind = %stream.kind(), requested_by = stream.requested_by(), "tunnel stream opened");
                    tasks.spawn(handler(stream).in_current_span());
                }
                Ok(None) => return Served::Closed(Ok(())),
                Err(error) => return Served::Closed(Err(error)),
            },
            grace = moves.requested(), if move_possible => match grace {
                Some(grace) => return Served::Moved(grace),
                None => move_possible = false,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Serves a moved tunnel's remaining streams: once its successor is up
/// (or the loop has ended), it stops taking streams and closes after
/// `grace` at the latest.
async fn drain<H, F>(
    mut tunnel: TunnelServer,
    handler: Arc<H>,
    mut successor_up: oneshot::Receiver<()>,
    grace: Duration,
) where
    H: Fn(IncomingStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut streams = JoinSet::new();
    let mut shutting_down = false;
    loop {
        tokio::select! {
            accepted = tunnel.accept() => match accepted {
                Ok(Some(stream)) => {
                    streams.spawn(handler(stream).in_current_span());
                }
                Ok(None) => break,
                Err(error) => {
                    info!(%error, "the moved tunnel ended");
                    break;
                }
            },
            _ = &mut successor_up, if !shutting_down => {
                shutting_down = true;
                tunnel.graceful_shutdown(grace);
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    info!("the moved tunnel is closed");
    while streams.join_next().await.is_some() {}
}

/// Runs `future` while reaping finished tasks from `tasks`.
async fn reap_while<T>(tasks: &mut JoinSet<()>, future: impl Future<Output = T>) -> T {
    tokio::pin!(future);
    loop {
        tokio::select! {
            output = &mut future => return output,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Logs failures once per change of kind, counting repeats.
#[derive(Debug, Default)]
struct FailureLog {
    kind: Option<String>,
    repeats: u64,
}

impl FailureLog {
    fn record(&mut self, error: &TunnelError, delay: Duration) {
        let kind = failure_kind(error);
        if self.kind.as_deref() == Some(kind.as_str()) {
            self.repeats += 1;
            debug!(%error, retry_in = ?delay, repeats = self.repeats, "tunnel failed again");
            return;
        }
        self.flush_repeats();
        warn!(%error, retry_in = ?delay, "tunnel failed; further failures of this kind are counted, not logged");
        self.kind = Some(kind);
        self.repeats = 0;
    }

    fn recovered(&mut self) {
        self.flush_repeats();
        self.kind = None;
        self.repeats = 0;
    }

    fn flush_repeats(&mut self) {
        if let (Some(kind), repeats @ 1..) = (&self.kind, self.repeats) {
            info!(kind, repeats, "the previous tunnel failure repeated");
        }
    }
}

/// Names the kind of a failure: the variant, and the status of a
/// rejection.
fn failure_kind(error: &TunnelError) -> String {
    let name = match error {
        TunnelError::Rejected { status, .. } => return format!("HTTP {status}"),
        TunnelError::InvalidConfig { .. } => "invalid setting",
        TunnelError::Connect { .. } => "connect",
        TunnelError::ConnectTimeout { .. } => "connect timeout",
        TunnelError::Tls { .. } => "TLS",
        TunnelError::UpgradeRequest { .. } => "upgrade request",
        TunnelError::UpgradeTimeout { .. } => "upgrade timeout",
        TunnelError::BadUpgrade { .. } => "bad upgrade",
        TunnelError::Handshake(_) => "HTTP/2 handshake",
        TunnelError::HandshakeTimeout(_) => "HTTP/2 handshake timeout",
        TunnelError::KeepaliveTimeout(_) => "keepalive timeout",
        TunnelError::PeerSilent(_) => "silent peer",
        TunnelError::Connection(_) => "connection",
        TunnelError::Closed => "closed",
        TunnelError::Open { .. } | TunnelError::OpenRejected { .. } => "stream open",
        TunnelError::InvalidHeader { .. } => "invalid header",
        TunnelError::Control(_) => "control stream",
    };
    name.to_owned()
}

impl<C: Connector> Connector for &C {
    fn connect(&self) -> impl Future<Output = Result<TunnelServer, TunnelError>> + Send {
        (**self).connect()
    }
}
