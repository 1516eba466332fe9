//! Settings of a tunnel: the HTTP/2 flow-control windows, the keepalive,
//! the reconnect backoff, and what the dial side needs to reach the
//! controller.
//!
//! Every default is a named constant here. Tests shorten the durations
//! through the same fields; no code path depends on a test value.

use std::sync::Arc;
use std::time::Duration;

use berth_core::{Secret, Uuid};
use url::Url;

use crate::error::TunnelError;

/// Default HTTP/2 stream window: 8 MiB. A stream moves at most one window
/// per round trip. With 4 ms of added round-trip time, 8 MiB gave
/// 590 MiB/s and 256 KiB gave 27 MiB/s (docs/BENCHMARKS.md, "Tunnel").
pub const DEFAULT_STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// Default HTTP/2 connection window: 32 MiB, four stream windows, so that
/// three streams whose readers stall still leave one stream window for
/// the others.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Default maximum HTTP/2 frame payload: 256 KiB, up from HTTP/2's
/// 16 KiB. On loopback one bulk stream moved at 0.42 of direct TCP with
/// 16 KiB frames, 0.62 with 64 KiB and 0.78 with 256 KiB, in one run of
/// `scripts/bench/run-tunnel.sh` (docs/BENCHMARKS.md, "Tunnel"). A
/// connection's read buffer grows to one frame only while such frames
/// arrive, so idle tunnels do not pay for it.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 256 * 1024;

/// Default maximum number of streams one tunnel carries at once.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// Default time between keepalive PINGs: 15 s, below the 60 s idle
/// timeout common in load balancers.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Default time a PING may go unanswered before the tunnel is closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Default limit on the HTTP/2 handshake (and on the dial side, the
/// HTTP/1.1 upgrade before it).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default limit on opening the TCP connection to the controller.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default first reconnect delay bound.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);

/// Default maximum reconnect delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Default time a tunnel must stay up before the backoff starts again
/// from [`DEFAULT_BACKOFF_INITIAL`].
pub const DEFAULT_BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Default longest `Retry-After` the dial side obeys; a larger value is
/// cut to this.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Default time the old tunnel's open streams may take to finish after a
/// move, before it is closed.
pub const DEFAULT_MOVE_GRACE_PERIOD: Duration = Duration::from_secs(300);

/// HTTP/2 settings that both ends advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Initial stream window in bytes: how much one stream may have in
    /// flight unread. Per-stream throughput is at most this divided by
    /// the round-trip time.
    pub stream_window: u32,
    /// Connection window in bytes, shared by all streams of a tunnel.
    /// Keep it several stream windows, because data that a stream's
    /// reader has not consumed also uses up connection window.
    pub connection_window: u32,
    /// Maximum DATA frame payload in bytes (16 KiB to 16 MiB - 1).
    pub max_frame_size: u32,
    /// Maximum number of streams the peer may have open at once.
    pub max_concurrent_streams: u32,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// HTTP/2 allows windows up to 2^31 - 1 bytes.
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// HTTP/2 frame payloads are 2^14 to 2^24 - 1 bytes.
const FRAME_SIZE_RANGE: std::ops::RangeInclusive<u32> = (1 << 14)..=((1 << 24) - 1);
/// The HTTP/2 default window; smaller windows only slow a tunnel down.
const MIN_WINDOW: u32 = 65_535;

impl WindowConfig {
    /// Checks each value against HTTP/2's limits.
    pub fn validate(&self) -> Result<(), TunnelError> {
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&self.stream_window) {
            return Err(invalid(
                "stream_window",
                format!(
                    "{} is outside {MIN_WINDOW}..={MAX_WINDOW} bytes",
                    self.stream_window
                ),
            ));
        }
        if !(self.stream_window..=MAX_WINDOW).contains(&self.connection_window) {
            return Err(invalid(
                "connection_window",
                format!(
                    "{} must be at least stream_window ({}) and at most {MAX_WINDOW} bytes",
                    self.connection_window, self.stream_window
                ),
            ));
        }
        if !FRAME_SIZE_RANGE.contains(&self.max_frame_size) {
            return Err(invalid(
                "max_frame_size",
                format!(
                    "{} is outside {FRAME_SIZE_RANGE:?} bytes",
                    self.max_frame_size
                ),
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(invalid(
                "max_concurrent_streams",
                "0 would admit no stream; give 1 or more".into(),
            ));
        }
        Ok(())
    }
}

/// The keepalive. The dial side sends an HTTP/2 PING every `interval`
/// and closes the tunnel when one goes unanswered for `timeout`. The
/// accept side closes a tunnel on which nothing arrived for `interval`
/// plus `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveConfig {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

impl KeepaliveConfig {
    fn validate(&self) -> Result<(), TunnelError> {
        if self.interval.is_zero() {
            return Err(invalid("keepalive.interval", "must be above 0".into()));
        }
        if self.timeout.is_zero() {
            return Err(invalid("keepalive.timeout", "must be above 0".into()));
        }
        Ok(())
    }
}

/// Settings both ends of a tunnel share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    pub windows: WindowConfig,
    pub keepalive: KeepaliveConfig,
    /// Limit on the HTTP/2 handshake, and on the accept side on opening
    /// the control stream after it.
    pub handshake_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            windows: WindowConfig::default(),
            keepalive: KeepaliveConfig::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl SessionConfig {
    /// Checks the windows and the keepalive.
    pub fn validate(&self) -> Result<(), TunnelError> {
        self.windows.validate()?;
        self.keepalive.validate()?;
        if self.handshake_timeout.is_zero() {
            return Err(invalid("handshake_timeout", "must be above 0".into()));
        }
        Ok(())
    }
}

/// Reconnect delays: exponential backoff with full jitter. The n-th retry
/// in a row waits a uniformly random time between 0 and
/// `min(max, initial * 2^n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
    /// A tunnel that stayed up this long starts the next backoff from
    /// `initial` again.
    pub reset_after: Duration,
    /// Longest `Retry-After` obeyed; a larger value is cut to this.
    pub max_retry_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: DEFAULT_BACKOFF_INITIAL,
            max: DEFAULT_BACKOFF_MAX,
            reset_after: DEFAULT_BACKOFF_RESET_AFTER,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
        }
    }
}

impl BackoffConfig {
    fn validate(&self) -> Result<(), TunnelError> {
        if self.initial.is_zero() {
            return Err(invalid("backoff.initial", "must be above 0".into()));
        }
        if self.max < self.initial {
            return Err(invalid(
                "backoff.max",
                format!(
                    "{:?} is below backoff.initial ({:?})",
                    self.max, self.initial
                ),
            ));
        }
        Ok(())
    }
}

/// Settings of the dial side (the supervisor) for opening a tunnel.
#[derive(Debug, Clone)]
pub struct DialConfig {
    /// The controller's base URL, `http://` or `https://`; the tunnel path
    /// is appended to its path.
    pub controller_url: Url,
    /// The container whose tunnel this is.
    pub container_uuid: Uuid,
    /// The container's gateway secret, sent in the
    /// [`SECRET_HEADER`](crate::SECRET_HEADER) header.
    pub gateway_secret: Secret,
    /// TLS settings for an `https://` URL. `None` trusts the Mozilla root
    /// certificates that the `webpki-roots` crate ships.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    pub session: SessionConfig,
    pub backoff: BackoffConfig,
    /// Time the old tunnel's open streams may take to finish after a move.
    pub move_grace_period: Duration,
    /// The id sent in [`SUPERVISOR_ID_HEADER`](crate::SUPERVISOR_ID_HEADER):
    /// [`process_supervisor_id`] unless a caller sets another.
    pub supervisor_id: String,
}

/// Returns this process's supervisor id: 128 random bits in hex, made at
/// the first call.
pub fn process_supervisor_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{:032x}", rand::random::<u128>()))
}

impl DialConfig {
    /// Makes a configuration with every default.
    pub fn new(controller_url: Url, container_uuid: Uuid, gateway_secret: Secret) -> DialConfig {
        DialConfig {
            controller_url,
            container_uuid,
            gateway_secret,
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            session: SessionConfig::default(),
            backoff: BackoffConfig::default(),
            move_grace_period: DEFAULT_MOVE_GRACE_PERIOD,
            supervisor_id: process_supervisor_id().to_owned(),
        }
    }

    /// Checks the URL's scheme and host and every setting.
    pub fn validate(&self) -> Result<(), TunnelError> {
        let url = &self.controller_url;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "controller_url",
                format!(
                    "{url} has scheme '{}'; use http:// or https://",
                    url.scheme()
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("controller_url", format!("{url} has no host")));
        }
        if self.gateway_secret.expose().is_empty() {
            return Err(invalid(
                "gateway_secret",
                "is empty; read it from the container's credentials file".into(),
            ));
        }
        let id_usable = !self.supervisor_id.is_empty()
            && self.supervisor_id.len() <= 128
            && self
                .supervisor_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !id_usable {
            return Err(invalid(
                "supervisor_id",
                format!(
                    "{:?} must be 1 to 128 ASCII letters, digits or '-'",
                    self.supervisor_id
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be above 0".into()));
        }
        self.session.validate()?;
        self.backoff.validate()
    }
}

fn invalid(key: &'static str, message: String) -> TunnelError {
    TunnelError::InvalidConfig { key, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DialConfig {
        DialConfig::new(
            Url::parse("http://127.0.0.1:8000/").unwrap(),
            "zzzzz-dz642-0123456789abcde".parse().unwrap(),
            Secret::new("the-gateway-secret"),
        )
    }

    #[test]
    fn supervisor_id_is_per_process() {
        let first = config();
        assert_eq!(first.supervisor_id.len(), 32);
        assert!(first.supervisor_id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(config().supervisor_id, first.supervisor_id);
        assert!(first.validate().is_ok());
    }

    #[test]
    fn invalid_supervisor_id_is_rejected() {
        for bad in ["", "has space", "semi;colon", &"x".repeat(129)] {
            let mut config = config();
            config.supervisor_id = bad.to_owned();
            let error = config.validate().unwrap_err();
            assert!(
                matches!(
                    error,
                    TunnelError::InvalidConfig {
                        key: "supervisor_id",
                        ..
                    }
                ),
                "{bad:?}: {error}"
            );
        }
    }
}
