//! The accept side's HTTP/2 client: [`TunnelClient`] opens streams
//! through a tunnel that a supervisor dialled in.
//!
//! The controller hands the upgraded connection to
//! [`TunnelClient::handshake`], which runs the HTTP/2 client handshake,
//! opens the control stream and starts the tunnel's task. That task owns
//! the connection and the watch for silence (see `keepalive`); dropping
//! the [`TunnelClient`] stops it and closes the connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderValue, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, Instrument};

use crate::config::SessionConfig;
use crate::error::TunnelError;
use crate::keepalive::{LastRead, Pinger, ReadClock};
use crate::protocol::{
    ControlMessage, StreamKind, CONTROL_PATH, REQUESTED_BY_HEADER, STREAM_AUTHORITY,
};
use crate::stream::TunnelStream;

/// What a new stream is for and whom it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRequest {
    pub kind: StreamKind,
    /// The user the stream serves, sent in [`REQUESTED_BY_HEADER`].
    pub requested_by: Option<String>,
}

impl StreamRequest {
    pub fn new(kind: StreamKind) -> StreamRequest {
        StreamRequest {
            kind,
            requested_by: None,
        }
    }

    pub fn requested_by(mut self, user: impl Into<String>) -> StreamRequest {
        self.requested_by = Some(user.into());
        self
    }
}

/// Where a tunnel is in its life, as the accept side sees it.
#[derive(Debug, Clone)]
pub enum TunnelState {
    /// Streams may be opened.
    Open,
    /// No new streams: this side asked the supervisor to move, or the
    /// supervisor is shutting the tunnel down. Open streams go on.
    Draining,
    /// The connection has ended: cleanly, or with the error.
    Closed(Option<Arc<TunnelError>>),
}

/// The accept side of an open tunnel.
#[derive(Debug)]
pub struct TunnelClient {
    send_request: SendRequest<Bytes>,
    control: Mutex<WriteHalf<TunnelStream>>,
    pinger: Option<Pinger>,
    keepalive_timeout: Duration,
    state: watch::Sender<TunnelState>,
    _stop_on_drop: DropGuard,
}

impl TunnelClient {
    /// Runs the HTTP/2 client handshake on a connection that was upgraded
    /// from a tunnel request, opens the control stream and starts the
    /// tunnel's task.
    pub async fn handshake<T>(io: T, config: &SessionConfig) -> Result<TunnelClient, TunnelError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let windows = config.windows;
        let (io, last_read) = ReadClock::new(io);
        let handshake = h2::client::Builder::new()
            .initial_window_size(windows.stream_window)
            .initial_connection_window_size(windows.connection_window)
            .max_frame_size(windows.max_frame_size)
            .enable_push(false)
            .handshake::<ReadClock<T>, Bytes>(io);
        let (send_request, mut connection) =
            tokio::time::timeout(config.handshake_timeout, handshake)
                .await
                .map_err(|_elapsed| TunnelError::HandshakeTimeout(config.handshake_timeout))?
                .map_err(TunnelError::Handshake)?;
        let pinger = connection.ping_pong().map(Pinger::new);
        let (state, _) = watch::channel(TunnelState::Open);
        let stop = CancellationToken::new();

        let driver = drive(connection, last_read, *config, state.clone(), stop.clone());
        tokio::spawn(driver.in_current_span());

        let open_control = open_stream(send_request.clone(), CONTROL_PATH.to_owned(), None);
        let control = tokio::time::timeout(config.handshake_timeout, open_control)
            .await
            .map_err(|_elapsed| TunnelError::HandshakeTimeout(config.handshake_timeout))??;
        let (control_read, control_write) = tokio::io::split(control);
        tokio::spawn(watch_control(control_read, state.clone(), stop.clone()).in_current_span());

        Ok(TunnelClient {
            send_request,
            control: Mutex::new(control_write),
            pinger,
            keepalive_timeout: config.keepalive.timeout,
            state,
            _stop_on_drop: stop.drop_guard(),
        })
    }

    /// Opens a stream to the supervisor and waits for it to accept it.
    /// Fails with [`TunnelError::Closed`] once the tunnel is draining or
    /// closed, and with [`TunnelError::OpenRejected`] when the supervisor
    /// refuses the stream.
    ///
    /// NOTE: the wait for the supervisor's response has no time limit
    /// here; a caller that needs one wraps the call in a timeout.
    pub async fn open(&self, request: StreamRequest) -> Result<TunnelStream, TunnelError> {
        if !matches!(*self.state.borrow(), TunnelState::Open) {
            return Err(TunnelError::Closed);
        }
        let requested_by = match request.requested_by {
            Some(user) => {
                Some(
                    HeaderValue::from_str(&user).map_err(|_| TunnelError::InvalidHeader {
                        name: REQUESTED_BY_HEADER,
                        value: user.clone(),
                    })?,
                )
            }
            None => None,
        };
        open_stream(self.send_request.clone(), request.kind.path(), requested_by).await
    }

    /// Sends an HTTP/2 PING and returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, TunnelError> {
        match &self.pinger {
            Some(pinger) => pinger.ping(self.keepalive_timeout).await,
            None => Err(TunnelError::Closed),
        }
    }

    /// Asks the supervisor to move: it dials a new tunnel, then stops
    /// taking streams on this one and lets the open ones finish. From now
    /// on [`open`](Self::open) fails. The caller closes the tunnel after
    /// `grace` at the latest, e.g. with
    /// `tokio::time::timeout(grace, client.closed())` and a drop.
    pub async fn move_away(&self, grace: Duration) -> Result<(), TunnelError> {
        self.state.send_if_modified(|state| {
            let open = matches!(state, TunnelState::Open);
            if open {
                *state = TunnelState::Draining;
            }
            open
        });
        let grace_period_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let mut line =
            serde_json::to_vec(&ControlMessage::Move { grace_period_ms }).map_err(|error| {
                TunnelError::Control(format!("failed to encode the move message: {error}"))
            })?;
        line.push(b'\n');
        let mut control = self.control.lock().await;
        control.write_all(&line).await.map_err(|error| {
            TunnelError::Control(format!("failed to send the move message: {error}"))
        })?;
        info!(grace_period = ?grace, "asked the supervisor to move its tunnel");
        Ok(())
    }

    /// The tunnel's state now.
    pub fn state(&self) -> TunnelState {
        self.state.borrow().clone()
    }

    /// Waits until the tunnel no longer takes new streams.
    pub async fn draining(&self) {
        let mut state = self.state.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail here.
        let _ = state
            .wait_for(|state| !matches!(state, TunnelState::Open))
            .await;
    }

    /// Waits until the connection has ended; returns the error that ended
    /// it, if any.
    pub async fn closed(&self) -> Result<(), Arc<TunnelError>> {
        let mut state = self.state.subscribe();
        let Ok(state) = state
            .wait_for(|state| matches!(state, TunnelState::Closed(_)))
            .await
        else {
            return Ok(());
        };
        match &*state {
            TunnelState::Closed(Some(error)) => Err(error.clone()),
            _ => Ok(()),
        }
    }
}

async fn open_stream(
    send_request: SendRequest<Bytes>,
    path: String,
    requested_by: Option<HeaderValue>,
) -> Result<TunnelStream, TunnelError> {
    let open_error = |source: h2::Error| {
        if source.is_go_away() {
            TunnelError::Closed
        } else {
            TunnelError::Open {
                path: path.clone(),
                source,
            }
        }
    };
    let mut send_request = send_request.ready().await.map_err(open_error)?;
    let mut request = Request::post(format!("http://{STREAM_AUTHORITY}{path}"));
    if let Some(user) = requested_by {
        request = request.header(REQUESTED_BY_HEADER, user);
    }
    let request = request
        .body(())
        .map_err(|error| TunnelError::Control(format!("invalid stream request: {error}")))?;
    let (response, send) = send_request
        .send_request(request, false)
        .map_err(open_error)?;
    let response = response.await.map_err(open_error)?;
    if response.status() != StatusCode::OK {
        return Err(TunnelError::OpenRejected {
            path,
            status: response.status().as_u16(),
        });
    }
    Ok(TunnelStream::new(send, response.into_body()))
}

/// Drives the connection until it ends, the supervisor falls silent for
/// longer than its keepalive allows, or the handle is dropped, and
/// records the end in `state`.
async fn drive<T>(
    connection: h2::client::Connection<ReadClock<T>, Bytes>,
    last_read: Arc<LastRead>,
    config: SessionConfig,
    state: watch::Sender<TunnelState>,
    stop: CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let silence_limit = config.keepalive.interval + config.keepalive.timeout;
    // The connection comes before the watch for silence, so that a PING
    // already waiting in the socket is read before the deadline counts.
    let result = tokio::select! {
        biased;
        () = stop.cancelled() => Ok(()),
        result = connection => result.map_err(TunnelError::Connection),
        error = last_read.silence(silence_limit) => Err(error),
    };
    match &result {
        Ok(()) => info!("tunnel closed"),
        Err(error) => info!(%error, "tunnel closed"),
    }
    state.send_replace(TunnelState::Closed(result.err().map(Arc::new)));
}

/// Reads the control stream, on which the supervisor sends nothing, to
/// see it end: the supervisor resets it when it shuts the tunnel down.
async fn watch_control(
    mut control: ReadHalf<TunnelStream>,
    state: watch::Sender<TunnelState>,
    stop: CancellationToken,
) {
    let mut buffer = [0_u8; 64];
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = control.read(&mut buffer) => read,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => debug!(bytes = n, "ignored data on the control stream"),
        }
    }
    debug!("the supervisor ended the control stream: the tunnel is draining");
    state.send_if_modified(|state| {
        let open = matches!(state, TunnelState::Open);
        if open {
            *state = TunnelState::Draining;
        }
        open
    });
}
