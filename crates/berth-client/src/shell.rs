//! The shell connection to a running container's gateway.
//!
//! `POST /arvados/v1/connect/{uuid}/ssh` with `Connection: Upgrade` and
//! `Upgrade: ssh` asks the controller to join this connection to the
//! container's gateway. After `101 Switching Protocols` the connection
//! carries the SSH protocol between the client's `ssh` and the gateway,
//! through whichever controller holds the container's tunnel. Any other
//! status is an API error with the controller's message.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONNECTION, HOST, RETRY_AFTER, UPGRADE};
use reqwest::{Method, StatusCode};
use tokio::net::TcpStream;
use url::{Position, Url};

use crate::{api_error, check_status, Client, ClientError, Result};

/// The `Upgrade` protocol of the shell connection.
pub const SSH_UPGRADE: &str = "ssh";

/// Time the controller may take to answer the upgrade; the connection has
/// no time limit after it.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest error body of a rejected shell connection that is read, in
/// bytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

impl Client {
    /// Opens a shell connection to the gateway of the container
    /// `container_uuid`; the returned stream carries SSH.
    pub async fn connect_ssh(&self, container_uuid: &str) -> Result<reqwest::Upgraded> {
        let path = format!("arvados/v1/connect/{container_uuid}/ssh");
        let url = self.url(&path)?;
        let transport = |source| ClientError::Transport {
            method: Method::POST,
            url: url.to_string(),
            source,
        };
        let sending = self
            .http
            .post(url.clone())
            .bearer_auth(self.token.expose())
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, SSH_UPGRADE)
            .send();
        let response = match tokio::time::timeout(UPGRADE_TIMEOUT, sending).await {
            Ok(response) => response.map_err(transport)?,
            Err(_) => return Err(upgrade_timed_out(&url)),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let response = check_status(Method::POST, url.clone(), response).await?;
            drop(response);
            return Err(not_upgraded(&url, status));
        }
        response.upgrade().await.map_err(transport)
    }

    /// Opens the shell connection like [`Client::connect_ssh`], but on a
    /// TCP socket of its own, so that the caller may move its bytes with
    /// splice(2). Only an `http://` base URL has such a socket; for
    /// another URL this returns `Ok(None)`. It also returns `Ok(None)`
    /// when the connection or the HTTP exchange fails before a response:
    /// the caller then calls `connect_ssh`, whose error names the cause.
    /// A response other than `101` is the same error as `connect_ssh`
    /// returns.
    pub async fn connect_ssh_plain(
        &self,
        container_uuid: &str,
    ) -> Result<Option<PlainShellConnection>> {
        let url = self.url(&format!("arvados/v1/connect/{container_uuid}/ssh"))?;
        if url.scheme() != "http" {
            return Ok(None);
        }
        match tokio::time::timeout(UPGRADE_TIMEOUT, self.upgrade_plain(&url)).await {
            Ok(result) => result,
            Err(_) => Err(upgrade_timed_out(&url)),
        }
    }

    async fn upgrade_plain(&self, url: &Url) -> Result<Option<PlainShellConnection>> {
        let Some(host) = url.host_str() else {
            return Ok(None);
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let Ok(socket) = TcpStream::connect((host.trim_matches(['[', ']']), port)).await else {
            return Ok(None);
        };
        // Keystrokes go out at once, without waiting for earlier ACKs.
        let _ = socket.set_nodelay(true);
        let Ok(mut authorization) =
            HeaderValue::try_from(format!("Bearer {}", self.token.expose()))
        else {
            return Ok(None);
        };
        authorization.set_sensitive(true);
        let request = hyper::Request::post(&url[Position::BeforePath..])
            .header(HOST, &url[Position::BeforeHost..Position::AfterPort])
            .header(AUTHORIZATION, authorization)
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, SSH_UPGRADE)
            .body(Empty::<Bytes>::new());
        let Ok(request) = request else {
            return Ok(None);
        };
        let Ok((mut sender, connection)) =
            hyper::client::conn::http1::handshake(TokioIo::new(socket)).await
        else {
            return Ok(None);
        };
        let connection = tokio::spawn(connection.with_upgrades());
        let Ok(response) = sender.send_request(request).await else {
            connection.abort();
            return Ok(None);
        };

        let status = response.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let retry_after = response.headers().get(RETRY_AFTER).cloned();
            let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .unwrap_or_default();
            connection.abort();
            if status.is_success() {
                return Err(not_upgraded(url, status));
            }
            return Err(api_error(
                Method::POST,
                url.clone(),
                status,
                retry_after.as_ref(),
                &body,
            ));
        }
        let Ok(upgraded) = hyper::upgrade::on(response).await else {
            return Ok(None);
        };
        // hyper keeps the type the connection was made on, `TokioIo<TcpStream>`
        // above, so the downcast succeeds.
        Ok(upgraded
            .downcast::<TokioIo<TcpStream>>()
            .ok()
            .map(|parts| PlainShellConnection {
                socket: parts.io.into_inner(),
                unread: parts.read_buf,
            }))
    }
}

/// A shell connection on a plain TCP socket.
#[derive(Debug)]
pub struct PlainShellConnection {
    pub socket: TcpStream,
    /// Bytes of the SSH stream that the HTTP client read with the `101`
    /// response; they come before the socket's.
    pub unread: Bytes,
}

fn upgrade_timed_out(url: &Url) -> ClientError {
    ClientError::Settings(format!(
        "timed out after {} s waiting for the controller to open the shell connection at {url}",
        UPGRADE_TIMEOUT.as_secs()
    ))
}

/// Returns the error of a success status other than `101`, which means
/// that something between the client and the controller does not pass
/// upgrades on.
fn not_upgraded(url: &Url, status: StatusCode) -> ClientError {
    ClientError::Api {
        method: Method::POST,
        url: url.to_string(),
        status,
        message: format!(
            "expected 101 Switching Protocols for the shell connection; a proxy between this client and the controller may not pass on `Upgrade: {SSH_UPGRADE}`"
        ),
        retry_after: None,
    }
}
