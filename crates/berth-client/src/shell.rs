//! The shell connection to a running container's gateway.
//!
//! `POST /arvados/v1/connect/{uuid}/ssh` with `Connection: Upgrade` and
//! `Upgrade: ssh` asks the controller to join this connection to the
//! container's gateway. After `101 Switching Protocols` the connection
//! carries the SSH protocol between the client's `ssh` and the gateway,
//! through whichever controller holds the container's tunnel. Any other
//! status is an API error with the controller's message.

use std::time::Duration;

use reqwest::header::{CONNECTION, UPGRADE};
use reqwest::{Method, StatusCode};

use crate::{check_status, Client, ClientError, Result};

/// The `Upgrade` protocol of the shell connection.
pub const SSH_UPGRADE: &str = "ssh";

/// Time the controller may take to answer the upgrade; the connection has
/// no time limit after it.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

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
            Err(_) => {
                return Err(ClientError::Settings(format!(
                    "timed out after {} s waiting for the controller to open the shell connection at {url}",
                    UPGRADE_TIMEOUT.as_secs()
                )))
            }
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // A success other than 101 means something between the client
            // and the controller does not pass upgrades on.
            let status = response.status();
            let response = check_status(Method::POST, url.clone(), response).await?;
            drop(response);
            return Err(ClientError::Api {
                method: Method::POST,
                url: url.to_string(),
                status,
                message: format!(
                    "expected 101 Switching Protocols for the shell connection; a proxy between this client and the controller may not pass on `Upgrade: {SSH_UPGRADE}`"
                ),
                retry_after: None,
            });
        }
        response.upgrade().await.map_err(transport)
    }
}
