//! The keepalive: an HTTP/2 PING every interval from each end. A PING
//! that goes unanswered for the timeout ends the tunnel, so a peer that
//! vanished without closing the TCP connection is noticed.

use std::sync::Arc;
use std::time::Duration;

use h2::{Ping, PingPong};
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

    /// Pings every `config.interval` until a PING fails; returns why.
    pub(crate) async fn run(self, config: KeepaliveConfig) -> TunnelError {
        loop {
            tokio::time::sleep(config.interval).await;
            if let Err(error) = self.ping(config.timeout).await {
                return error;
            }
        }
    }
}
