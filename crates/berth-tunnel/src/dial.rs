//! The dial side's handshake: a TCP (or TLS) connection to the
//! controller, the HTTP/1.1 upgrade request, then the HTTP/2 server
//! handshake on the upgraded connection.
//!
//! hyper performs the upgrade, so bytes the controller sent right after
//! the `101` headers (its HTTP/2 preface, possibly in the same packet)
//! stay in the upgraded connection's read buffer instead of being lost.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, instrument};
use url::{Host, Url};

use crate::config::DialConfig;
use crate::error::TunnelError;
use crate::protocol::{
    header_has_token, tunnel_path, SECRET_HEADER, SUPERVISOR_ID_HEADER, UPGRADE_PROTOCOL,
};
use crate::server::{serve, TunnelServer};

/// Maximum size of a rejection body that is read, in bytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Opens a tunnel to the controller: connects, upgrades the connection
/// and runs the HTTP/2 server handshake.
#[instrument(skip_all, fields(container = %config.container_uuid, controller = %config.controller_url))]
pub async fn dial(config: &DialConfig) -> Result<TunnelServer, TunnelError> {
    config.validate()?;
    let url = tunnel_url(config);
    let timeout = config.session.handshake_timeout;
    let upgraded = tokio::time::timeout(timeout, connect_and_upgrade(config, &url))
        .await
        .map_err(|_elapsed| TunnelError::UpgradeTimeout {
            url: url.to_string(),
            timeout,
        })??;
    debug!("connection upgraded; starting HTTP/2");
    serve(TokioIo::new(upgraded), &config.session).await
}

/// Returns the controller URL with the tunnel path appended to its path.
fn tunnel_url(config: &DialConfig) -> Url {
    let mut url = config.controller_url.clone();
    let base = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!(
        "{base}{}",
        tunnel_path(config.container_uuid.as_str())
    ));
    url.set_query(None);
    url.set_fragment(None);
    url
}

async fn connect_and_upgrade(config: &DialConfig, url: &Url) -> Result<Upgraded, TunnelError> {
    let host = url.host().ok_or_else(|| TunnelError::InvalidConfig {
        key: "controller_url",
        message: format!("{url} has no host"),
    })?;
    let port = url.port_or_known_default().unwrap_or(80);
    let connect = match &host {
        Host::Domain(name) => TcpStream::connect((*name, port)).await,
        Host::Ipv4(address) => TcpStream::connect((*address, port)).await,
        Host::Ipv6(address) => TcpStream::connect((*address, port)).await,
    };
    let connect = tokio::time::timeout(config.connect_timeout, async { connect });
    let tcp = connect
        .await
        .map_err(|_elapsed| TunnelError::ConnectTimeout {
            url: url.to_string(),
            timeout: config.connect_timeout,
        })?
        .map_err(|source| TunnelError::Connect {
            url: url.to_string(),
            source,
        })?;
    // Small writes (keystrokes) go out at once.
    let _ = tcp.set_nodelay(true);

    if url.scheme() == "https" {
        let tls = match &config.tls {
            Some(tls) => tls.clone(),
            None => default_tls_config()?,
        };
        let server_name = match host {
            Host::Domain(name) => ServerName::try_from(name.to_owned()).map_err(|error| {
                TunnelError::InvalidConfig {
                    key: "controller_url",
                    message: format!("{url} has an invalid TLS server name: {error}"),
                }
            })?,
            Host::Ipv4(address) => ServerName::from(std::net::IpAddr::V4(address)),
            Host::Ipv6(address) => ServerName::from(std::net::IpAddr::V6(address)),
        };
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|source| TunnelError::Tls {
                url: url.to_string(),
                source,
            })?;
        upgrade(stream, config, url).await
    } else {
        upgrade(tcp, config, url).await
    }
}

/// Trusts the Mozilla root certificates that `webpki-roots` ships.
fn default_tls_config() -> Result<Arc<rustls::ClientConfig>, TunnelError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TunnelError::InvalidConfig {
            key: "tls",
            message: format!("failed to make the default TLS settings: {error}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends the upgrade request and waits for `101 Switching Protocols`.
async fn upgrade<IO>(io: IO, config: &DialConfig, url: &Url) -> Result<Upgraded, TunnelError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request_error = |source| TunnelError::UpgradeRequest {
        url: url.to_string(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(request_error)?;
    // The connection task ends by itself once the upgrade completes or
    // the sender is dropped. Aborting it on every other way out of this
    // function closes the socket.
    let connection = AbortOnDrop(tokio::spawn(connection.with_upgrades()));

    let mut secret = HeaderValue::from_str(config.gateway_secret.expose()).map_err(|_| {
        TunnelError::InvalidConfig {
            key: "gateway_secret",
            message: "contains characters an HTTP header cannot carry; check the credentials file"
                .into(),
        }
    })?;
    secret.set_sensitive(true);
    let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
    let request = Request::post(url.path())
        .header(header::HOST, authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .header(
            header::USER_AGENT,
            concat!("berth-tunnel/", env!("CARGO_PKG_VERSION")),
        )
        .header(SECRET_HEADER, secret)
        .header(SUPERVISOR_ID_HEADER, config.supervisor_id.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|error| TunnelError::InvalidConfig {
            key: "controller_url",
            message: format!("{url}: {error}"),
        })?;
    let response = sender.send_request(request).await.map_err(request_error)?;

    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(rejection(response, url).await);
    }
    if !header_has_token(response.headers(), header::UPGRADE, UPGRADE_PROTOCOL) {
        return Err(TunnelError::BadUpgrade {
            url: url.to_string(),
            detail: format!("without 'Upgrade: {UPGRADE_PROTOCOL}'"),
        });
    }
    let upgraded = hyper::upgrade::on(response).await.map_err(request_error)?;
    drop(connection);
    Ok(upgraded)
}

/// Turns a non-101 response into [`TunnelError::Rejected`], with the
/// message from an Arvados-style `{"errors": [...]}` body if there is one.
async fn rejection(response: http::Response<hyper::body::Incoming>, url: &Url) -> TunnelError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(berth_core::time::retry_after_now);
    let body = match Limited::new(response.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    TunnelError::Rejected {
        url: url.to_string(),
        status: status.as_u16(),
        retry_after,
        message: error_message(status, &body),
    }
}

fn error_message(status: StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<String>,
    }
    if let Ok(errors) = serde_json::from_slice::<Errors>(body) {
        if !errors.errors.is_empty() {
            return errors.errors.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("no message").to_owned();
    }
    text.chars().take(200).collect()
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
