//! Forwarding a shell request to the controller that holds the tunnel: an
//! HTTP/1.1 upgrade of the same path at that controller's internal URL,
//! with the caller's own `Authorization` header, so the holder checks the
//! caller again. The request carries [`NO_FORWARD_HEADER`], and a request
//! that carries it is never forwarded again, so a stale lease cannot make
//! two controllers send a request back and forth.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use url::Url;

/// The header that marks a request a controller forwarded; its value is
/// `1`.
pub const NO_FORWARD_HEADER: &str = "x-berth-no-forward";

/// Largest error body of the holder that is passed on, in bytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The holder could not be reached or broke the exchange.
    #[error("failed to reach the controller at {url} that holds the tunnel: {message}")]
    Unreachable { url: String, message: String },
    /// The holder answered with another status than 101; its response is
    /// passed on to the client.
    #[error("the controller at {url} that holds the tunnel answered {status}")]
    Rejected {
        url: String,
        status: StatusCode,
        retry_after: Option<HeaderValue>,
        body: Bytes,
    },
}

/// Opens the upgrade of `path` (such as `/arvados/v1/connect/UUID/ssh`) at
/// the controller whose internal URL is `base_url`, with `upgrade` as the
/// `Upgrade` token and `authorization` as the caller's header. An
/// `https` URL is checked against the roots of `tls`.
pub async fn open_forward(
    base_url: &str,
    path: &str,
    upgrade: &'static str,
    authorization: &HeaderValue,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Upgraded, ForwardError> {
    let unreachable = |message: String| ForwardError::Unreachable {
        url: base_url.to_owned(),
        message,
    };
    let url = Url::parse(base_url).map_err(|error| unreachable(error.to_string()))?;
    let host = url
        .host_str()
        .ok_or_else(|| unreachable("the URL has no host".into()))?
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|error| unreachable(format!("connect failed: {error}")))?;
    let _ = tcp.set_nodelay(true);
    let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
    let mut full_path = url.path().trim_end_matches('/').to_owned();
    full_path.push_str(path);
    let request = Request::post(full_path)
        .header(header::HOST, authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, upgrade)
        .header(header::AUTHORIZATION, authorization.clone())
        .header(NO_FORWARD_HEADER, "1")
        .body(Empty::<Bytes>::new())
        .map_err(|error| unreachable(format!("invalid forward request: {error}")))?;
    match url.scheme() {
        "https" => {
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|error| unreachable(format!("invalid TLS server name: {error}")))?;
            let connector = tokio_rustls::TlsConnector::from(tls);
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|error| unreachable(format!("TLS handshake failed: {error}")))?;
            upgrade_on(tls, request, base_url, upgrade).await
        }
        _ => upgrade_on(tcp, request, base_url, upgrade).await,
    }
}

async fn upgrade_on<IO>(
    io: IO,
    request: Request<Empty<Bytes>>,
    base_url: &str,
    upgrade: &str,
) -> Result<Upgraded, ForwardError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let unreachable = |message: String| ForwardError::Unreachable {
        url: base_url.to_owned(),
        message,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|error| unreachable(format!("HTTP handshake failed: {error}")))?;
    let connection = tokio::spawn(connection.with_upgrades());
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| unreachable(format!("the upgrade request failed: {error}")));
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            connection.abort();
            return Err(error);
        }
    };
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
        let body = match Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        connection.abort();
        return Err(ForwardError::Rejected {
            url: base_url.to_owned(),
            status,
            retry_after,
            body,
        });
    }
    let upgraded_token = response
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case(upgrade));
    if !upgraded_token {
        connection.abort();
        return Err(unreachable(format!(
            "the response 101 has no 'Upgrade: {upgrade}' header"
        )));
    }
    hyper::upgrade::on(response)
        .await
        .map_err(|error| unreachable(format!("the upgrade failed: {error}")))
}
