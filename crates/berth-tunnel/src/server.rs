//! The dial side's HTTP/2 server: [`TunnelServer`] takes the streams the
//! controller opens and hands them out as [`IncomingStream`]s.
//!
//! One task per tunnel (the driver) owns the HTTP/2 connection: it
//! accepts streams, sends the keepalive PINGs, reads the
//! control stream and carries out a graceful shutdown. The
//! [`TunnelServer`] handle talks to it through channels, and dropping
//! the handle stops the task and closes the connection.

use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn, Instrument};

use crate::config::SessionConfig;
use crate::error::TunnelError;
use crate::keepalive::Pinger;
use crate::protocol::{ControlMessage, StreamKind, CONTROL_PATH, REQUESTED_BY_HEADER};
use crate::stream::TunnelStream;

/// Maximum size of a control message, in bytes. A longer line ends the
/// control stream.
const MAX_CONTROL_LINE: usize = 4096;

/// A stream the controller opened, not yet accepted or rejected. Dropping
/// it resets the stream.
#[derive(Debug)]
pub struct IncomingStream {
    kind: StreamKind,
    requested_by: Option<String>,
    recv: RecvStream,
    respond: SendResponse<Bytes>,
}

impl IncomingStream {
    /// Returns what the stream is for.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Returns the user the controller opened the stream for, from the
    /// [`REQUESTED_BY_HEADER`] header.
    pub fn requested_by(&self) -> Option<&str> {
        self.requested_by.as_deref()
    }

    /// Accepts the stream: responds `200` and returns the byte stream.
    pub fn accept(mut self) -> Result<TunnelStream, TunnelError> {
        let send = self
            .respond
            .send_response(Response::new(()), false)
            .map_err(|source| TunnelError::Open {
                path: self.kind.path(),
                source,
            })?;
        Ok(TunnelStream::new(send, self.recv))
    }

    /// Rejects the stream with `status`, which the controller's
    /// [`open`](crate::TunnelClient::open) returns as
    /// [`TunnelError::OpenRejected`].
    pub fn reject(mut self, status: StatusCode) {
        respond_status(&mut self.respond, status);
    }
}

/// The dial side of an open tunnel.
#[derive(Debug)]
pub struct TunnelServer {
    incoming: mpsc::Receiver<IncomingStream>,
    moves: watch::Receiver<Option<Duration>>,
    shutdown: mpsc::UnboundedSender<Duration>,
    driver: Option<JoinHandle<Result<(), TunnelError>>>,
    _stop_on_drop: DropGuard,
}

/// Resolves when the controller requests that the tunnel move.
#[derive(Debug, Clone)]
pub struct MoveSignal(watch::Receiver<Option<Duration>>);

impl MoveSignal {
    /// Waits for a move request and returns the grace period the
    /// controller gave, or `None` when the tunnel closed without one.
    pub async fn requested(&mut self) -> Option<Duration> {
        loop {
            if let Some(grace) = *self.0.borrow_and_update() {
                return Some(grace);
            }
            self.0.changed().await.ok()?;
        }
    }
}

impl TunnelServer {
    /// Waits for the next stream. Returns `Ok(None)` once the tunnel has
    /// closed cleanly (after a graceful shutdown, or when the controller
    /// closed it), and otherwise the error that ended it. Later calls
    /// return `Ok(None)`.
    pub async fn accept(&mut self) -> Result<Option<IncomingStream>, TunnelError> {
        if let Some(stream) = self.incoming.recv().await {
            return Ok(Some(stream));
        }
        let Some(driver) = self.driver.take() else {
            return Ok(None);
        };
        match driver.await {
            Ok(result) => result.map(|()| None),
            Err(join_error) => Err(TunnelError::Control(format!(
                "the tunnel's task ended abnormally: {join_error}"
            ))),
        }
    }

    /// Returns a signal that resolves when the controller requests that
    /// this tunnel move.
    pub fn move_signal(&self) -> MoveSignal {
        MoveSignal(self.moves.clone())
    }

    /// Stops taking new streams (HTTP/2 GOAWAY) and lets the open ones
    /// finish; after `grace` the connection is closed with whatever is
    /// still open. [`accept`](Self::accept) returns `Ok(None)` at the end.
    pub fn graceful_shutdown(&self, grace: Duration) {
        // An error means the driver has ended already: nothing to shut.
        let _ = self.shutdown.send(grace);
    }
}

/// Runs the HTTP/2 server handshake on an upgraded connection and starts
/// the tunnel's task.
pub async fn serve<T>(io: T, config: &SessionConfig) -> Result<TunnelServer, TunnelError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let windows = config.windows;
    let handshake = h2::server::Builder::new()
        .initial_window_size(windows.stream_window)
        .initial_connection_window_size(windows.connection_window)
        .max_frame_size(windows.max_frame_size)
        .max_concurrent_streams(windows.max_concurrent_streams)
        .handshake::<T, Bytes>(io);
    let mut connection = tokio::time::timeout(config.handshake_timeout, handshake)
        .await
        .map_err(|_elapsed| TunnelError::HandshakeTimeout(config.handshake_timeout))?
        .map_err(TunnelError::Handshake)?;
    let pinger = connection.ping_pong().map(Pinger::new);

    let capacity = usize::try_from(windows.max_concurrent_streams)
        .unwrap_or(usize::MAX)
        .max(1);
    let (incoming_tx, incoming) = mpsc::channel(capacity);
    let (moves_tx, moves) = watch::channel(None);
    let (shutdown, shutdown_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let driver = Driver {
        incoming: incoming_tx,
        moves: moves_tx,
        control: None,
        stop: stop.clone(),
    };
    let task = driver
        .run(connection, pinger, *config, shutdown_rx)
        .instrument(tracing::Span::current());
    Ok(TunnelServer {
        incoming,
        moves,
        shutdown,
        driver: Some(tokio::spawn(task)),
        _stop_on_drop: stop.drop_guard(),
    })
}

struct Driver {
    incoming: mpsc::Sender<IncomingStream>,
    moves: watch::Sender<Option<Duration>>,
    /// Stops the control stream's reader, which resets the stream.
    control: Option<CancellationToken>,
    stop: CancellationToken,
}

impl Driver {
    async fn run<T>(
        mut self,
        mut connection: h2::server::Connection<T, Bytes>,
        pinger: Option<Pinger>,
        config: SessionConfig,
        mut shutdown: mpsc::UnboundedReceiver<Duration>,
    ) -> Result<(), TunnelError>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let keepalive = async move {
            match pinger {
                Some(pinger) => pinger.run(config.keepalive).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(keepalive);
        let grace_over = tokio::time::sleep(Duration::MAX);
        tokio::pin!(grace_over);
        let mut shutting_down = false;

        let result = loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break Ok(()),
                error = &mut keepalive => break Err(error),
                () = &mut grace_over, if shutting_down => {
                    info!("grace period over: closing the tunnel with its open streams");
                    break Ok(());
                }
                Some(grace) = shutdown.recv(), if !shutting_down => {
                    info!(grace_period = ?grace, "tunnel shutting down: no new streams (GOAWAY)");
                    shutting_down = true;
                    connection.graceful_shutdown();
                    if let Some(control) = self.control.take() {
                        control.cancel();
                    }
                    grace_over.as_mut().reset(tokio::time::Instant::now() + grace);
                }
                accepted = connection.accept() => match accepted {
                    Some(Ok((request, respond))) => self.route(request, respond),
                    Some(Err(error)) => break Err(TunnelError::Connection(error)),
                    None => break Ok(()),
                },
            }
        };
        if let Some(control) = self.control.take() {
            control.cancel();
        }
        result
    }

    /// Sends a stream to its place: the control stream to its reader, a
    /// stream of a known kind to [`TunnelServer::accept`], anything else
    /// back with an error status.
    fn route(&mut self, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        if request.method() != Method::POST {
            debug!(method = %request.method(), "rejected a tunnel stream: method is not POST");
            respond_status(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
            return;
        }
        let path = request.uri().path().to_owned();
        if path == CONTROL_PATH {
            self.start_control(request.into_body(), respond);
            return;
        }
        let Some(kind) = StreamKind::from_path(&path) else {
            debug!(%path, "rejected a tunnel stream: unknown path");
            respond_status(&mut respond, StatusCode::NOT_FOUND);
            return;
        };
        let requested_by = request
            .headers()
            .get(REQUESTED_BY_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let stream = IncomingStream {
            kind,
            requested_by,
            recv: request.into_body(),
            respond,
        };
        if let Err(error) = self.incoming.try_send(stream) {
            // Full only when more streams wait than HTTP/2 lets the peer
            // open; closed when the TunnelServer is gone.
            let mut stream = error.into_inner();
            warn!(kind = %stream.kind, "rejected a tunnel stream with 503: the stream queue is full or the TunnelServer was dropped");
            respond_status(&mut stream.respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    }

    fn start_control(&mut self, recv: RecvStream, mut respond: SendResponse<Bytes>) {
        if self.control.is_some() {
            warn!("rejected a second control stream on one tunnel");
            respond_status(&mut respond, StatusCode::CONFLICT);
            return;
        }
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(error) => {
                warn!(%error, "failed to accept the tunnel's control stream");
                return;
            }
        };
        let stop = self.stop.child_token();
        self.control = Some(stop.clone());
        let stream = TunnelStream::new(send, recv);
        tokio::spawn(read_control(stream, self.moves.clone(), stop).in_current_span());
    }
}

/// Reads control messages until the stream ends or `stop` is cancelled;
/// dropping the stream at the end resets it.
async fn read_control(
    stream: TunnelStream,
    moves: watch::Sender<Option<Duration>>,
    stop: CancellationToken,
) {
    // Control messages are short lines, so a small buffer serves.
    let mut lines = BufReader::with_capacity(512, stream);
    let mut line = String::new();
    loop {
        line.clear();
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = read_line_limited(&mut lines, &mut line) => read,
        };
        match read {
            Ok(0) => {
                debug!("the controller closed the control stream");
                return;
            }
            Ok(_) => match serde_json::from_str::<ControlMessage>(line.trim_end()) {
                Ok(message) => {
                    info!(?message, "control message from the controller");
                    let grace = message.grace_period();
                    moves.send_replace(Some(grace));
                }
                Err(error) => warn!(%error, "ignored an invalid control message"),
            },
            Err(error) => {
                debug!(%error, "the control stream failed");
                return;
            }
        }
    }
}

async fn read_line_limited(
    reader: &mut BufReader<TunnelStream>,
    line: &mut String,
) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let read = (&mut *reader)
        .take(MAX_CONTROL_LINE as u64)
        .read_line(line)
        .await?;
    if read == MAX_CONTROL_LINE && !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control message longer than {MAX_CONTROL_LINE} bytes"),
        ));
    }
    Ok(read)
}

fn respond_status(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(error) = respond.send_response(response, true) {
        debug!(%error, %status, "failed to send the response to a tunnel stream");
    }
}
