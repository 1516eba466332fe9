//! The controller's side of the containers' gateways: the registry of the
//! tunnels that supervisors dialled into this controller, the leases that
//! tell other controllers where each tunnel is, shell sessions, and the
//! drain at shutdown.
//!
//! A tunnel lives in a task of its own ([`Gateway::spawn_tunnel`]), which
//! keeps the request's `tunnel` slot and registers the tunnel under its
//! container. At the tunnel's end the task removes the registration if it
//! is still its own, and releases the lease at the epoch it claimed. A newer tunnel of
//! the same container replaces the registration, and the older one is
//! asked to move. A heartbeat task refreshes this controller's leases.
//!
//! A shell session is a task ([`Gateway::spawn_session`]) that copies
//! bytes both ways between the client's upgraded connection and its peer:
//! a stream of a tunnel held here, or an upgraded connection to the
//! controller that holds the tunnel. Between two plain TCP sockets (a
//! forward without TLS) splice(2) moves the bytes inside the kernel.
//!
//! Drain ([`Gateway::drain`]): new tunnels get 503, every tunnel is asked
//! to move (the supervisor dials a new one, which lands on another
//! controller), and sessions get the grace period to end before they are
//! closed. Last, this controller's leases are released.

mod forward;
mod join;
mod metrics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use berth_tunnel::{SessionConfig, TunnelClient, TunnelState};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::error_chain;
use crate::limits::HeldSlot;
use crate::store::Store;

pub(crate) use forward::{open_forward, ForwardError, NO_FORWARD_HEADER};
pub use metrics::GatewayMetrics;

/// Heartbeat intervals after which a tunnel lease is stale.
pub const STALE_HEARTBEATS: u32 = 3;

/// Limit on opening a stream through a tunnel, and on a forwarded
/// upgrade's response.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Time left for sessions and tunnels to close after the grace period
/// has cut them.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of the gateway, from the controller's configuration.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// The URL other controllers reach this one at, as leases record it.
    pub internal_url: String,
    /// The TLS settings of forwards to other controllers.
    pub forward_tls: Arc<rustls::ClientConfig>,
    /// False when `controller.shell_access` turns shells off.
    pub shell_access: bool,
    pub heartbeat: Duration,
    /// Largest read from a shell's client on the holder, and the size of
    /// each direction's buffer when a forward is copied through buffers.
    pub copy_buffer_bytes: usize,
    /// The time open sessions and moved tunnels get at shutdown.
    pub grace_period: Duration,
    pub session: SessionConfig,
}

/// The tunnels and shell sessions of this controller.
pub struct Gateway {
    settings: GatewaySettings,
    store: Arc<dyn Store>,
    registry: Mutex<HashMap<String, Registration>>,
    next_registration: AtomicU64,
    draining: AtomicBool,
    /// Cancelled when the drain begins, so that each tunnel task sends its
    /// supervisor the move message.
    drain: CancellationToken,
    /// Cancelled when the grace period ends: sessions close.
    cut: CancellationToken,
    /// Cancelled after the drain: the heartbeat stops.
    stopped: CancellationToken,
    tunnels: TaskTracker,
    sessions: TaskTracker,
    metrics: GatewayMetrics,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("internal_url", &self.settings.internal_url)
            .field("tunnels", &self.lock().len())
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

/// One registered tunnel.
#[derive(Clone)]
struct Registration {
    id: u64,
    client: Arc<TunnelClient>,
    /// Cancelled when a newer tunnel of the same container replaces it.
    replaced: CancellationToken,
}

/// The other end of a shell session.
pub(crate) enum SessionPeer {
    /// A stream of a tunnel this controller holds.
    Stream(berth_tunnel::TunnelStream),
    /// An upgraded connection to the controller that holds the tunnel.
    Forward(hyper::upgrade::Upgraded),
}

impl Gateway {
    pub fn new(settings: GatewaySettings, store: Arc<dyn Store>) -> Gateway {
        Gateway {
            settings,
            store,
            registry: Mutex::new(HashMap::new()),
            next_registration: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            drain: CancellationToken::new(),
            cut: CancellationToken::new(),
            stopped: CancellationToken::new(),
            tunnels: TaskTracker::new(),
            sessions: TaskTracker::new(),
            metrics: GatewayMetrics::default(),
        }
    }

    pub fn internal_url(&self) -> &str {
        &self.settings.internal_url
    }

    /// Returns the TLS settings of forwards to other controllers.
    pub fn forward_tls(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.settings.forward_tls)
    }

    pub fn shell_access(&self) -> bool {
        self.settings.shell_access
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    /// True once the drain has begun: new tunnels are rejected.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Returns the time now and the stale limit of leases, in milliseconds
    /// since the Unix epoch: a heartbeat at or before the limit is stale.
    pub fn lease_clock(&self) -> (i64, i64) {
        let now = chrono::Utc::now().timestamp_millis();
        let stale_ms = i64::try_from((self.settings.heartbeat * STALE_HEARTBEATS).as_millis())
            .unwrap_or(i64::MAX);
        (now, now.saturating_sub(stale_ms))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Registration>> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the tunnel of a container when this controller holds one
    /// that takes new streams.
    pub fn tunnel(&self, container_uuid: &str) -> Option<Arc<TunnelClient>> {
        let registry = self.lock();
        let registration = registry.get(container_uuid)?;
        matches!(registration.client.state(), TunnelState::Open)
            .then(|| registration.client.clone())
    }

    /// Returns the number of registered tunnels.
    pub fn tunnel_count(&self) -> usize {
        self.lock().len()
    }

    fn register(&self, container_uuid: &str, client: Arc<TunnelClient>) -> Registration {
        let registration = Registration {
            id: self.next_registration.fetch_add(1, Ordering::Relaxed),
            client,
            replaced: CancellationToken::new(),
        };
        let old = self
            .lock()
            .insert(container_uuid.to_owned(), registration.clone());
        if let Some(old) = old {
            info!(
                container = container_uuid,
                "a new tunnel replaces the container's older tunnel"
            );
            self.metrics.count_replaced();
            old.replaced.cancel();
        }
        registration
    }

    fn unregister(&self, container_uuid: &str, id: u64) {
        let mut registry = self.lock();
        if registry
            .get(container_uuid)
            .is_some_and(|entry| entry.id == id)
        {
            registry.remove(container_uuid);
        }
    }

    /// Starts the task of a tunnel whose upgrade was accepted and whose
    /// lease this controller claimed at `epoch`. The task keeps `slot`
    /// for the tunnel's life.
    pub fn spawn_tunnel(
        self: &Arc<Self>,
        container_uuid: String,
        epoch: i64,
        on_upgrade: OnUpgrade,
        slot: Option<HeldSlot>,
    ) {
        let gateway = self.clone();
        self.tunnels.spawn(async move {
            let _slot = slot;
            gateway.run_tunnel(&container_uuid, epoch, on_upgrade).await;
            gateway.release_lease(&container_uuid, epoch).await;
        });
    }

    async fn run_tunnel(&self, container_uuid: &str, epoch: i64, on_upgrade: OnUpgrade) {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                warn!(container = container_uuid, error = %error, "the tunnel's upgrade failed");
                self.metrics.count_failure("tunnel_upgrade");
                return;
            }
        };
        let client = match TunnelClient::handshake(TokioIo::new(upgraded), &self.settings.session)
            .await
        {
            Ok(client) => Arc::new(client),
            Err(error) => {
                warn!(container = container_uuid, error = %error, "the tunnel's HTTP/2 handshake failed");
                self.metrics.count_failure("tunnel_handshake");
                return;
            }
        };
        let registration = self.register(container_uuid, client.clone());
        self.metrics.count_tunnel();
        info!(
            container = container_uuid,
            epoch, "gateway tunnel registered"
        );

        let moved = tokio::select! {
            closed = client.closed() => {
                match closed {
                    Ok(()) => info!(container = container_uuid, "gateway tunnel closed"),
                    Err(error) => info!(container = container_uuid, error = %error, "gateway tunnel ended"),
                }
                false
            }
            () = registration.replaced.cancelled() => true,
            () = self.drain.cancelled() => true,
        };
        if moved {
            let grace = self.settings.grace_period;
            if let Err(error) = client.move_away(grace).await {
                debug!(container = container_uuid, error = %error, "failed to ask the supervisor to move its tunnel");
            }
            // The supervisor closes the tunnel once its open streams
            // end; after the grace period this side closes it.
            let _ = tokio::time::timeout(grace, client.closed()).await;
            info!(container = container_uuid, "moved gateway tunnel closed");
        }
        self.unregister(container_uuid, registration.id);
    }

    async fn release_lease(&self, container_uuid: &str, epoch: i64) {
        match self.store.release_tunnel(container_uuid, epoch).await {
            Ok(released) => {
                debug!(
                    container = container_uuid,
                    epoch, released, "released the tunnel lease"
                )
            }
            Err(error) => warn!(
                container = container_uuid,
                epoch,
                error = %error_chain(&error),
                "failed to release a tunnel lease; it goes stale after three heartbeats"
            ),
        }
    }

    /// Starts a shell session: waits for the client's upgrade, then copies
    /// bytes both ways between the client and `peer` until both sides
    /// have ended, or the drain's grace period ends.
    pub(crate) fn spawn_session(
        self: &Arc<Self>,
        container_uuid: String,
        user_uuid: String,
        on_upgrade: OnUpgrade,
        peer: SessionPeer,
        slot: Option<HeldSlot>,
    ) {
        let gateway = self.clone();
        self.metrics.session_started();
        self.sessions.spawn(async move {
            let _slot = slot;
            let result = tokio::select! {
                result = gateway.run_session(on_upgrade, peer) => Some(result),
                () = gateway.cut.cancelled() => None,
            };
            match result {
                Some(Ok((to_container, from_container))) => info!(
                    container = %container_uuid,
                    user = %user_uuid,
                    bytes_to_container = to_container,
                    bytes_from_container = from_container,
                    "shell session ended"
                ),
                Some(Err(error)) => info!(
                    container = %container_uuid,
                    user = %user_uuid,
                    error = %error,
                    "shell session failed"
                ),
                // NOTE: the connection carries SSH from end to end, so the
                // controller cannot write a message into it; the client
                // sees the connection close.
                None => warn!(
                    container = %container_uuid,
                    user = %user_uuid,
                    "the controller's shutdown grace period ended: closed an open shell session"
                ),
            }
            gateway.metrics.session_ended();
        });
    }

    async fn run_session(
        &self,
        on_upgrade: OnUpgrade,
        peer: SessionPeer,
    ) -> std::io::Result<(u64, u64)> {
        let upgraded = on_upgrade.await.map_err(std::io::Error::other)?;
        let buffer = self.settings.copy_buffer_bytes;
        match peer {
            SessionPeer::Stream(mut stream) => {
                let mut client = TokioIo::new(upgraded);
                berth_tunnel::copy_bidirectional_stream(&mut client, &mut stream, buffer).await
            }
            SessionPeer::Forward(forward) => {
                join::join_upgraded(upgraded, forward, buffer, &self.metrics).await
            }
        }
    }

    /// Returns the number of shell sessions open now.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Drops the leases an earlier run of this controller left.
    pub async fn release_stale_leases(&self) {
        let url = self.internal_url();
        match self.store.release_controller_tunnels(url).await {
            Ok(0) => {}
            Ok(count) => info!(
                controller = url,
                count, "released tunnel leases left by an earlier run"
            ),
            Err(error) => warn!(
                controller = url,
                error = %error_chain(&error),
                "failed to release tunnel leases left by an earlier run"
            ),
        }
    }

    /// Starts the task that refreshes this controller's tunnel leases every
    /// heartbeat interval until the drain has ended.
    pub fn spawn_heartbeat(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gateway = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(gateway.settings.heartbeat);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failures: u64 = 0;
            loop {
                tokio::select! {
                    () = gateway.stopped.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let (now, _) = gateway.lease_clock();
                match gateway
                    .store
                    .heartbeat_tunnels(gateway.internal_url(), now)
                    .await
                {
                    Ok(_) if failures > 0 => {
                        info!(failures, "tunnel lease heartbeats work again");
                        failures = 0;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        failures += 1;
                        if failures == 1 {
                            warn!(
                                error = %error_chain(&error),
                                "failed to refresh the tunnel leases; later failures are counted until one succeeds"
                            );
                        }
                    }
                }
            }
        })
    }

    /// Drains the gateway: new tunnels are rejected, every tunnel is asked
    /// to move, and open sessions get `grace` to end before they are
    /// closed. Then this controller's leases are released and the
    /// heartbeat stops.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        let tunnels = self.tunnel_count();
        let sessions = self.session_count();
        info!(tunnels, sessions, grace_period = ?grace, "draining the gateway: asking tunnels to move");
        self.drain.cancel();
        self.tunnels.close();
        self.sessions.close();
        let ended = tokio::time::timeout(grace, async {
            self.sessions.wait().await;
            self.tunnels.wait().await;
        })
        .await;
        if ended.is_err() {
            warn!(
                sessions = self.session_count(),
                tunnels = self.tunnel_count(),
                "gateway grace period over: closing the remaining sessions and tunnels"
            );
            self.cut.cancel();
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                self.sessions.wait().await;
                self.tunnels.wait().await;
            })
            .await;
        }
        self.stopped.cancel();
        self.release_stale_leases().await;
    }
}

/// Copies bytes both ways until both directions have ended. An end of
/// file on one side shuts the other side's write half (a half-close), so
/// the other direction goes on. Each direction reads into a buffer of
/// `buffer_bytes`, so a write into a tunnel stream is at most that large.
/// Returns the bytes copied from `client` and from `peer`.
async fn copy_both_ways<A, B>(
    client: &mut A,
    peer: &mut B,
    buffer_bytes: usize,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(client, peer, buffer_bytes, buffer_bytes).await
}
