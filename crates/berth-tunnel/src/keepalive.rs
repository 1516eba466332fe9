//! The keepalive. The dial side (the supervisor) sends an HTTP/2 PING
//! every interval, and a PING that goes unanswered for the timeout ends
//! the tunnel. The accept side (the controller) sends none: it ends a
//! tunnel on which nothing arrived for one interval plus the timeout,
//! which in a live tunnel the dial side's PINGs prevent. So a peer that
//! vanished without closing the TCP connection is noticed at both ends.
//!
//! A controller has thousands of tunnels open, and its own PINGs woke it
//! twice per tunnel and interval. With 10,000 tunnels they raised the
//! median latency of its API by about half, and watching for silence
//! costs one timer per tunnel that rarely fires.
//!
//! The first PING waits a random part of one interval. Tunnels that open
//! together, such as every tunnel of a controller that just restarted,
//! then ping at spread-out times instead of all at once every interval.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::KeepaliveConfig;
use crate::error::TunnelError;

/// A connection's PING sender, shared by the keepalive and by explicit
/// pings. HTTP/2 in the `h2` crate allows one PING in flight at a time,
/// which the lock enforces.
#[derive(Debug, Clone)]
pub(crate) struct Pinger {
    ping_pong: Arc<Mutex<PingPong>>,
}

impl Pinger {
    pub(crate) fn new(ping_pong: PingPong) -> Pinger {
        Pinger {
            ping_pong: Arc::new(Mutex::new(ping_pong)),
        }
    }

    /// Sends a PING and returns the round-trip time, or fails after
    /// `timeout` without a response.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<Duration, TunnelError> {
        let started = Instant::now();
        let mut ping_pong = self.ping_pong.lock().await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => Ok(started.elapsed()),
            Ok(Err(error)) => Err(TunnelError::Connection(error)),
            Err(_elapsed) => Err(TunnelError::KeepaliveTimeout(timeout)),
        }
    }

    /// Pings every `config.interval`, from a random start within the
    /// first interval, until a PING fails; returns why.
    pub(crate) async fn run(self, config: KeepaliveConfig) -> TunnelError {
        let phase = config.interval.mul_f64(rand::random::<f64>());
        tokio::time::sleep(phase).await;
        loop {
            if let Err(error) = self.ping(config.timeout).await {
                return error;
            }
            tokio::time::sleep(config.interval).await;
        }
    }
}

/// A connection that records when it last read a byte, for the accept
/// side's watch for silence.
#[derive(Debug)]
pub(crate) struct ReadClock<T> {
    io: T,
    clock: Arc<LastRead>,
}

/// The time of a connection's last read, in milliseconds since `base`.
#[derive(Debug)]
pub(crate) struct LastRead {
    base: Instant,
    millis: AtomicU64,
}

impl LastRead {
    fn new() -> LastRead {
        LastRead {
            base: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(millis, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.millis.load(Ordering::Relaxed))
    }

    /// Waits until nothing has been read for `limit`, and returns the
    /// error that ends the tunnel.
    pub(crate) async fn silence(&self, limit: Duration) -> TunnelError {
        loop {
            let deadline = self.last() + limit;
            if Instant::now() >= deadline {
                return TunnelError::PeerSilent(limit);
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl<T> ReadClock<T> {
    /// Wraps `io` and counts its opening as a read.
    pub(crate) fn new(io: T) -> (ReadClock<T>, Arc<LastRead>) {
        let clock = Arc::new(LastRead::new());
        let wrapped = ReadClock {
            io,
            clock: clock.clone(),
        };
        (wrapped, clock)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadClock<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadClock<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_waits_for_the_last_read() {
        let clock = LastRead::new();
        let limit = Duration::from_secs(35);
        let started = Instant::now();
        tokio::time::advance(Duration::from_secs(20)).await;
        clock.touch();
        let error = clock.silence(limit).await;
        assert!(matches!(error, TunnelError::PeerSilent(_)), "{error:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(55), "{waited:?}");
        assert!(waited < Duration::from_secs(56), "{waited:?}");
    }
}
