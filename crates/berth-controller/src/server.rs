//! Running the controller: open the store, bind the listener, serve until
//! a shutdown signal, then drain.
//!
//! The listener serves HTTPS when the configuration names a certificate
//! and key ([`crate::tls`]), and plain HTTP otherwise; shutdown and
//! draining are the same for both. Each connection has a task of its own,
//! served by hyper's HTTP/1.1 server. A connection that does not send a
//! request's whole header within `header_read_timeout_seconds`, counted
//! from its start or from the end of its previous response, is closed.
//!
//! Shutdown order: the signal stops accepting connections and ends every
//! log wait at once ([`AppState::begin_shutdown`]). In-flight requests then
//! get `shutdown_grace_period_seconds` to finish, and connections still open
//! after that are dropped. Then the store's listener for other controllers'
//! writes stops, and last, the store's connections close. In the same
//! grace period the gateway sends every tunnel the move message and lets shell
//! sessions end ([`crate::gateway::Gateway::drain`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_core::{ObjectType, Uuid};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::{app, AppState};
use crate::auth::{generate_secret, hash_secret};
use crate::config::{ClusterSettings, Config};
use crate::store::{self, ApiToken, Store, User};
use crate::tls::{self, TlsListener};

/// A controller whose listener is bound and whose store is open.
#[derive(Debug)]
pub struct BoundController {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The TLS settings when the API is served over HTTPS.
    tls: Option<Arc<rustls::ServerConfig>>,
    state: AppState,
    store: Arc<dyn Store>,
    grace_period: Duration,
    header_read_timeout: Duration,
}

/// Reads the TLS certificate and key (when configured), opens the store
/// (creating and migrating the database) and binds the listener.
pub async fn bind(cluster: ClusterSettings, config: Config) -> anyhow::Result<BoundController> {
    config.validate()?;
    let tls = match config.tls_files() {
        Some((certificate, key)) => Some(tls::load_server_config(certificate, key)?),
        None => None,
    };
    let store = store::open(&config.database_url, config.max_database_connections).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {} (controller.listen)", config.listen))?;
    let local_addr = listener
        .local_addr()
        .context("failed to read the listener's address")?;
    // With port 0, the internal URL derived from `listen` needs the port
    // the listener got.
    let mut config = config;
    config.listen = local_addr;
    if config.internal_url.is_none() && local_addr.ip().is_unspecified() {
        tracing::warn!(
            internal_url = %config.effective_internal_url(),
            "controller.internal_url is unset and the listener is on every address: \
             other controllers cannot reach this one at the derived loopback URL, \
             so set internal_url when controllers share a database"
        );
    }
    let state = AppState::new(store.clone(), cluster, &config)?;
    state.gateway().release_stale_leases().await;
    Ok(BoundController {
        listener,
        local_addr,
        tls,
        state,
        store,
        grace_period: config.shutdown_grace_period(),
        header_read_timeout: config.header_read_timeout(),
    })
}

impl BoundController {
    /// Returns the address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Returns `https` when the API is served over TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Returns the API's base URL on the bound address, such as
    /// `https://127.0.0.1:8000`. An unspecified address (`0.0.0.0`) is
    /// shown as it is.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.local_addr)
    }

    /// Returns the state the router runs on, for callers that also need the
    /// store or the log notifier.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests for
    /// at most the configured grace period.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let scheme = self.scheme();
        let BoundController {
            listener,
            local_addr,
            tls,
            state,
            store,
            grace_period,
            header_read_timeout,
        } = self;
        tracing::info!(
            address = %local_addr,
            scheme,
            internal_url = state.gateway().internal_url(),
            "controller started"
        );
        let heartbeat = state.gateway().spawn_heartbeat();
        let listener_state = state.clone();
        let result = match tls {
            Some(config) => match TlsListener::new(listener, config) {
                Ok(listener) => {
                    serve(listener, state, shutdown, grace_period, header_read_timeout).await
                }
                Err(err) => Err(err),
            },
            None => {
                // Keystrokes through a shell or a tunnel go out at once,
                // without waiting for the peer's ACK of earlier data.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                serve(listener, state, shutdown, grace_period, header_read_timeout).await
            }
        };
        heartbeat.abort();
        listener_state.stop_change_listener().await;
        store.close().await;
        result.with_context(|| format!("the controller on {local_addr} failed"))?;
        tracing::info!("controller stopped");
        Ok(())
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then drains
/// in-flight requests for at most `grace_period`. Each connection is
/// served by a task of its own with hyper's HTTP/1.1 server, which closes
/// a connection that has not sent a request's whole header within
/// `header_read_timeout`.
async fn serve<L>(
    mut listener: L,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace_period: Duration,
    header_read_timeout: Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let router = app(state.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // NOTE: hyper itself responds to a request line over 65,534 bytes (414)
    // and to a header over its buffer size or 100 fields (431) with an empty
    // body, not `{"errors": [...]}`, and has no hook to replace the body.
    let (draining, _) = watch::channel(false);
    let mut connections = JoinSet::new();

    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reaps finished connection tasks, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut shutdown => break,
        };
        // NOTE: there is no cap yet on connections or held reads per peer or
        // user; one client can use up the process's file descriptors.
        // With upgrades: the tunnel and shell routes take the connection
        // over, and the gateway owns it from then on.
        let connection = http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(router.clone()))
            .with_upgrades();
        let mut draining = draining.subscribe();
        connections.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = draining.changed() => {
                    // Ends the connection after its current response, or at
                    // once when it is idle.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(peer = ?peer, error = %err, "connection ended with an error");
            }
        });
    }

    // Closes the port.
    drop(listener);
    tracing::info!(
        grace_period_s = grace_period.as_secs(),
        "controller draining"
    );
    state.begin_shutdown();
    draining.send_replace(true);
    // Tunnels and shells left these connections when they upgraded; the
    // gateway drains them in the same grace period.
    let gateway = state.gateway().clone();
    let gateway_drain = tokio::spawn(async move { gateway.drain(grace_period).await });
    let drained = tokio::time::timeout(grace_period, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace_period_s = grace_period.as_secs(),
            connections = connections.len(),
            "requests still in flight at the end of the grace period: closing their connections"
        );
        connections.shutdown().await;
    }
    if let Err(error) = gateway_drain.await {
        tracing::error!(error = %error, "the gateway's drain failed");
    }
    Ok(())
}

/// Maximum length of a user name.
const MAX_USERNAME_LEN: usize = 64;

fn check_username(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        anyhow::bail!(
            "invalid user name {name:?}: use 1 to {MAX_USERNAME_LEN} letters, digits, '_', '.' or '-', starting with a letter"
        );
    }
    Ok(())
}

/// Creates a user in an open store and returns the user's new API token,
/// `v2/<token uuid>/<secret>`. Only the secret's hash is stored.
pub async fn create_user_in(
    store: &dyn Store,
    cluster: &ClusterSettings,
    name: &str,
    admin: bool,
) -> anyhow::Result<String> {
    check_username(name)?;
    let now = chrono::Utc::now();
    let user = User {
        uuid: Uuid::generate(&cluster.cluster_id, ObjectType::User).to_string(),
        username: name.to_string(),
        is_admin: admin,
        is_active: true,
        created_at: now,
        modified_at: now,
    };
    let secret = generate_secret();
    let token = ApiToken {
        uuid: Uuid::generate(&cluster.cluster_id, ObjectType::ApiClientAuthorization).to_string(),
        owner_uuid: user.uuid.clone(),
        secret_sha256: hash_secret(&secret),
        scopes: vec!["all".into()],
        container_uuid: None,
        created_at: now,
        expires_at: None,
        revoked_at: None,
    };
    store
        .insert_user(&user, &token)
        .await
        .with_context(|| format!("failed to create user {name:?}"))?;
    tracing::info!(user = %user.uuid, username = name, admin, "created a user");
    Ok(format!("v2/{}/{secret}", token.uuid))
}

/// Opens the configured store, creates a user and returns the user's new
/// API token.
pub async fn create_user(
    cluster: &ClusterSettings,
    config: &Config,
    name: &str,
    admin: bool,
) -> anyhow::Result<String> {
    config.validate()?;
    let store = store::open(&config.database_url, 1).await?;
    let result = create_user_in(store.as_ref(), cluster, name, admin).await;
    store.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_checked() {
        for good in ["alice", "Bob", "a.b-c_d9"] {
            assert!(check_username(good).is_ok(), "{good:?} rejected");
        }
        for bad in ["", "9lives", "a b", "a/b", &"x".repeat(65)] {
            let err = check_username(bad).unwrap_err();
            assert!(err.to_string().contains("invalid user name"), "{err}");
        }
    }
}
