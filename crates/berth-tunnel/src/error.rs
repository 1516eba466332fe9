//! The tunnel's errors. Each names the controller URL or the HTTP status
//! involved and, where there is one, what to do.

use std::io;
use std::time::Duration;

/// A failure to open, run or use a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("invalid tunnel setting {key}: {message}")]
    InvalidConfig { key: &'static str, message: String },

    #[error("failed to connect to the controller at {url}: {source}; check that the URL is right and the controller is running")]
    Connect { url: String, source: io::Error },

    #[error("timed out after {timeout:?} connecting to the controller at {url}; check the network path from this node to the controller")]
    ConnectTimeout { url: String, timeout: Duration },

    #[error("failed the TLS handshake with the controller at {url}: {source}; check the controller's certificate and the trusted roots")]
    Tls { url: String, source: io::Error },

    #[error("failed the HTTP/1.1 upgrade request to {url}: {source}")]
    UpgradeRequest { url: String, source: hyper::Error },

    #[error(
        "timed out after {timeout:?} waiting for the controller at {url} to upgrade the connection"
    )]
    UpgradeTimeout { url: String, timeout: Duration },

    #[error("controller at {url} rejected the tunnel with HTTP status {status}: {message}{}", rejection_hint(*.status))]
    Rejected {
        url: String,
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },

    #[error("controller at {url} answered 101 but {detail}; is a proxy in between that does not pass HTTP upgrades?")]
    BadUpgrade { url: String, detail: String },

    #[error("failed the HTTP/2 handshake of the tunnel: {0}")]
    Handshake(#[source] h2::Error),

    #[error("timed out after {0:?} in the tunnel's HTTP/2 handshake")]
    HandshakeTimeout(Duration),

    #[error("the peer did not answer a keepalive PING within {0:?}; the tunnel is closed")]
    KeepaliveTimeout(Duration),

    #[error(
        "the supervisor sent nothing, not even a keepalive PING, for {0:?}; the tunnel is closed"
    )]
    PeerSilent(Duration),

    #[error("the tunnel's connection failed: {0}")]
    Connection(#[source] h2::Error),

    #[error("the tunnel is closed or shutting down; open the stream on a new tunnel")]
    Closed,

    #[error("failed to open a {path} stream through the tunnel: {source}")]
    Open { path: String, source: h2::Error },

    #[error("the supervisor refused the {path} stream with HTTP status {status}")]
    OpenRejected { path: String, status: u16 },

    #[error("invalid {name} header value {value:?}: it must be visible ASCII")]
    InvalidHeader { name: &'static str, value: String },

    #[error("failed on the tunnel's control stream: {0}")]
    Control(String),
}

/// Returns what to do about a rejection, by HTTP status.
fn rejection_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => "; check the gateway secret in the container's credentials file",
        404 => "; check the controller URL and the container UUID",
        409 | 410 | 422 => "; the container is not Locked or Running, so it takes no tunnel",
        503 => "; the controller is at its tunnel limit or shutting down, retry later",
        _ => "",
    }
}

impl TunnelError {
    /// Returns the HTTP status of a rejected upgrade, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            TunnelError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}
