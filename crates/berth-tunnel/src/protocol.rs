//! The tunnel's wire conventions: the HTTP/1.1 upgrade, the HTTP/2
//! requests that open streams, and the control stream's messages.
//!
//! The upgrade is `POST /arvados/v1/connect/{uuid}/gateway_tunnel` with
//! `Connection: Upgrade`, `Upgrade: berth-tunnel` and the container's
//! gateway secret in [`SECRET_HEADER`]. After `101 Switching Protocols`
//! the connection carries HTTP/2 with the roles reversed: the supervisor,
//! which dialled, is the HTTP/2 server, and the controller is the client.
//!
//! The controller opens each stream with a `POST` request whose path is
//! the stream's [`StreamKind`]; the supervisor responds `200` to accept it,
//! and from then on both directions carry the stream's bytes as DATA
//! frames. The first stream, `POST /control`, stays open for the tunnel's
//! life and carries [`ControlMessage`]s from the controller, one JSON
//! object a line.

use std::fmt;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

/// The `Upgrade` token of a tunnel request.
pub const UPGRADE_PROTOCOL: &str = "berth-tunnel";

/// The header that carries the container's gateway secret on the upgrade
/// request. A header, not the URL, so that access logs do not record it.
pub const SECRET_HEADER: &str = "x-berth-gateway-secret";

/// The header that carries the dialling supervisor's id on the upgrade
/// request: random, made once per process. The controller lets a tunnel
/// replace a live one only when both carry the same id.
pub const SUPERVISOR_ID_HEADER: &str = "x-berth-supervisor-id";

/// The header on a stream's request that names the user whose session the
/// stream carries (a user UUID), for the supervisor's logs and checks.
pub const REQUESTED_BY_HEADER: &str = "x-berth-requested-by";

/// The authority of the HTTP/2 requests inside a tunnel. HTTP/2 requires
/// one; the tunnel has a single peer, so its value carries no meaning.
pub(crate) const STREAM_AUTHORITY: &str = "berth-tunnel";

/// The path of the control stream's request.
pub(crate) const CONTROL_PATH: &str = "/control";

/// Returns the path of the upgrade request for a container.
pub fn tunnel_path(container_uuid: &str) -> String {
    format!("/arvados/v1/connect/{container_uuid}/gateway_tunnel")
}

/// The purpose of a stream, from its request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// `/ssh`: a connection to the container's SSH server.
    Ssh,
    /// `/tcp/{port}`: a connection to a TCP port inside the container.
    Tcp { port: u16 },
}

impl StreamKind {
    /// Returns the request path of this kind.
    pub fn path(&self) -> String {
        match self {
            StreamKind::Ssh => "/ssh".to_owned(),
            StreamKind::Tcp { port } => format!("/tcp/{port}"),
        }
    }

    /// Parses a request path; `None` for a path that names no stream kind,
    /// including port 0 and a port with a sign or leading zeros.
    pub fn from_path(path: &str) -> Option<StreamKind> {
        if path == "/ssh" {
            return Some(StreamKind::Ssh);
        }
        let port = path.strip_prefix("/tcp/")?;
        let canonical =
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0');
        if !canonical {
            return None;
        }
        port.parse().ok().map(|port| StreamKind::Tcp { port })
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

/// A message on the control stream, from the controller to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// The controller is shutting down: dial a new tunnel, then stop
    /// taking streams on this one (GOAWAY) and let its open streams end
    /// within `grace_period_ms`, after which the controller closes it.
    Move { grace_period_ms: u64 },
}

impl ControlMessage {
    pub(crate) fn grace_period(&self) -> Duration {
        match self {
            ControlMessage::Move { grace_period_ms } => Duration::from_millis(*grace_period_ms),
        }
    }
}

/// Reason an HTTP/1.1 request is not a tunnel upgrade.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRequestError {
    #[error("invalid method {0} for a tunnel upgrade; use POST")]
    Method(String),
    #[error("missing 'Upgrade: {UPGRADE_PROTOCOL}' header on the tunnel request")]
    UpgradeHeader,
    #[error("missing 'Connection: Upgrade' header on the tunnel request")]
    ConnectionHeader,
    #[error("missing {SECRET_HEADER} header on the tunnel request")]
    Secret,
}

/// Checks, on the accept side, that an HTTP/1.1 request is a tunnel
/// upgrade and carries a secret. Returns the secret to check.
pub fn check_upgrade_request<B>(request: &Request<B>) -> Result<&str, UpgradeRequestError> {
    if request.method() != Method::POST {
        return Err(UpgradeRequestError::Method(request.method().to_string()));
    }
    let headers = request.headers();
    if !header_has_token(headers, header::UPGRADE, UPGRADE_PROTOCOL) {
        return Err(UpgradeRequestError::UpgradeHeader);
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(UpgradeRequestError::ConnectionHeader);
    }
    headers
        .get(SECRET_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .ok_or(UpgradeRequestError::Secret)
}

/// Makes the accept side's `101 Switching Protocols` response.
pub fn switching_protocols_response<B: Default>() -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    response
}

/// Checks whether a comma-separated header contains `token`, ignoring
/// ASCII case.
pub fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_kind_paths_round_trip() {
        for kind in [
            StreamKind::Ssh,
            StreamKind::Tcp { port: 1 },
            StreamKind::Tcp { port: 65535 },
        ] {
            assert_eq!(StreamKind::from_path(&kind.path()), Some(kind));
        }
    }

    #[test]
    fn stream_kind_rejects_bad_paths() {
        for path in [
            "/",
            "/ssh/",
            "/tcp/",
            "/tcp/0",
            "/tcp/080",
            "/tcp/+80",
            "/tcp/65536",
            "/tcp/8a",
            "/control",
        ] {
            assert_eq!(StreamKind::from_path(path), None, "{path}");
        }
    }

    #[test]
    fn control_message_is_one_json_object() {
        let text = serde_json::to_string(&ControlMessage::Move {
            grace_period_ms: 1500,
        })
        .unwrap();
        assert_eq!(text, r#"{"type":"move","grace_period_ms":1500}"#);
    }

    #[test]
    fn upgrade_request_checks() {
        let good = || {
            Request::post("/x")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "Berth-Tunnel")
                .header(SECRET_HEADER, "s3cret")
        };
        assert_eq!(
            check_upgrade_request(&good().body(()).unwrap()),
            Ok("s3cret")
        );

        let get = Request::get("/x").body(()).unwrap();
        assert_eq!(
            check_upgrade_request(&get),
            Err(UpgradeRequestError::Method("GET".into()))
        );

        let no_upgrade = Request::post("/x")
            .header("connection", "upgrade")
            .body(())
            .unwrap();
        assert_eq!(
            check_upgrade_request(&no_upgrade),
            Err(UpgradeRequestError::UpgradeHeader)
        );

        let no_connection = Request::post("/x")
            .header("upgrade", UPGRADE_PROTOCOL)
            .body(())
            .unwrap();
        assert_eq!(
            check_upgrade_request(&no_connection),
            Err(UpgradeRequestError::ConnectionHeader)
        );

        let no_secret = Request::post("/x")
            .header("connection", "upgrade")
            .header("upgrade", UPGRADE_PROTOCOL)
            .body(())
            .unwrap();
        assert_eq!(
            check_upgrade_request(&no_secret),
            Err(UpgradeRequestError::Secret)
        );
    }
}
