//! The HTTP API: the Arvados v1 routes Berth serves, under `/arvados/v1/`,
//! Berth's container change feed ([`changes`]) and dispatch leases
//! ([`leases`]), the discovery document clients build their methods from
//! ([`discovery`]), the block routes of Keep's protocol at the root
//! (`PUT /<md5>`, `GET /<locator>`, see [`blocks`]), and `GET /_health/ping`.
//!
//! [`app`] builds the router from an [`AppState`], so tests drive it with
//! `tower::ServiceExt::oneshot` and need no socket. Each handler
//! authenticates its caller (the [`Caller`](crate::auth::Caller)
//! extractor), checks what the caller may see and do, lets
//! [`lifecycle`](crate::lifecycle) build the change, and hands it to the
//! store. Errors are [`ApiError`]s, rendered as `{"errors": [...]}`, and
//! [`rejection`] gives the errors that arise outside the handlers (bad path
//! parameters, the request timeout, unknown routes) the same shape. Every
//! response carries the call's `X-Request-Id` ([`request_id`]).
//!
//! Visibility: administrators and the system token read every record. A
//! user reads their own requests and the containers of those requests, and
//! a container token reads only its own container. A record the caller may
//! not see is answered 404, as if it did not exist.
//!
//! Wake-ups: after every successful write to the request and container
//! routes, a route layer wakes the change feed's waiters
//! ([`Notifier::notify_changes`]). Handlers that change a container's
//! state or append to its logs also wake that container's log readers.

pub mod blocks;
pub mod changes;
pub mod collections;
pub mod connect;
pub mod containers;
pub mod discovery;
pub mod keep_services;
pub mod leases;
pub mod logs;
pub mod params;
pub mod rejection;
pub mod render;
pub mod request_id;
pub mod requests;
pub mod users;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, State};
use axum::http::{Method, Request, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::watch;
use tower_http::trace::TraceLayer;
use tracing::{Instrument, Span};

use crate::auth::{secret_digest, Caller};
use crate::blocks::signing::{BlobSigner, SigningKeyError};
use crate::blocks::{BlockStore, DirectoryBlockStore};
use crate::config::{ClusterSettings, Config};
use crate::error::{error_chain, ApiError};
use crate::gateway::{Gateway, GatewaySettings};
use crate::limits::RequestLimits;
use crate::notify::{ChangeListener, Notifier};
use crate::store::Store;

/// Attempts at a read-check-write before a conflict is reported to the
/// client. Each retry follows a write by someone else, so this bounds how
/// long one busy record can starve an update.
pub(crate) const MAX_WRITE_ATTEMPTS: usize = 8;

/// The state every handler shares. Cloning is cheap.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// Shows the cluster and the limits, never the system token's digest.
impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = &self.inner;
        f.debug_struct("AppState")
            .field("store", &inner.store)
            .field("blocks", &inner.blocks)
            .field("max_block_bytes", &inner.max_block_bytes)
            .field("cluster_id", &inner.cluster.cluster_id)
            .field("max_dispatch_attempts", &inner.max_dispatch_attempts)
            .field("max_log_chunk_bytes", &inner.max_log_chunk_bytes)
            .field("max_request_body_bytes", &inner.max_request_body_bytes)
            .field("request_timeout", &inner.request_timeout)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn Store>,
    blocks: Arc<dyn BlockStore>,
    signer: BlobSigner,
    max_block_bytes: usize,
    cluster: ClusterSettings,
    system_token_digest: [u8; 32],
    notifier: Arc<Notifier>,
    /// The store's listener for other controllers' writes, if it has one;
    /// taken by [`AppState::stop_change_listener`].
    change_listener: Mutex<Option<ChangeListener>>,
    shutdown: watch::Sender<bool>,
    max_dispatch_attempts: i64,
    max_log_chunk_bytes: usize,
    max_request_body_bytes: usize,
    request_timeout: Duration,
    external_url: Option<String>,
    serves_tls: bool,
    limits: Arc<RequestLimits>,
    gateway: Arc<Gateway>,
}

/// An error that stops the API's state from being built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    SigningKey(#[from] SigningKeyError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl AppState {
    /// Builds the state, and starts the store's listener for other
    /// controllers' writes when the store has one (PostgreSQL). The
    /// listener runs on the current Tokio runtime: outside one, the store
    /// logs a warning and runs without it. Fails when the blob signing key
    /// file or the `internal_ca_file` cannot be used.
    pub fn new(
        store: Arc<dyn Store>,
        cluster: ClusterSettings,
        config: &Config,
    ) -> Result<AppState, StateError> {
        let signer = BlobSigner::from_config(&config.blocks, &cluster.system_token)?;
        let blocks: Arc<dyn BlockStore> =
            Arc::new(DirectoryBlockStore::new(config.blocks.directory.clone()));
        let system_token_digest = secret_digest(cluster.system_token.expose());
        let (shutdown, _) = watch::channel(false);
        let notifier = Arc::new(Notifier::new());
        let change_listener = store.spawn_change_listener(notifier.clone());
        let gateway = Arc::new(Gateway::new(
            GatewaySettings {
                internal_url: config.effective_internal_url(),
                forward_tls: crate::tls::forward_client_config(config.internal_ca_file.as_deref())?,
                shell_access: config.shell_access,
                heartbeat: config.tunnel_heartbeat(),
                copy_buffer_bytes: config.shell_copy_buffer_bytes,
                grace_period: config.shutdown_grace_period(),
                session: berth_tunnel::SessionConfig::default(),
            },
            store.clone(),
        ));
        Ok(AppState {
            inner: Arc::new(Inner {
                store,
                blocks,
                signer,
                max_block_bytes: config.blocks.max_block_bytes,
                cluster,
                system_token_digest,
                notifier,
                change_listener: Mutex::new(change_listener),
                shutdown,
                max_dispatch_attempts: config.max_dispatch_attempts,
                max_log_chunk_bytes: config.max_log_chunk_bytes,
                max_request_body_bytes: config.max_request_body_bytes,
                request_timeout: config.request_timeout(),
                external_url: config.external_url.clone(),
                serves_tls: config.tls_files().is_some(),
                limits: Arc::new(RequestLimits::new(&config.limits)),
                gateway,
            }),
        })
    }

    pub fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    pub fn blocks(&self) -> &dyn BlockStore {
        self.inner.blocks.as_ref()
    }

    pub(crate) fn signer(&self) -> &BlobSigner {
        &self.inner.signer
    }

    pub(crate) fn max_block_bytes(&self) -> usize {
        self.inner.max_block_bytes
    }

    pub fn cluster(&self) -> &ClusterSettings {
        &self.inner.cluster
    }

    pub(crate) fn system_token_digest(&self) -> &[u8] {
        &self.inner.system_token_digest
    }

    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    pub fn max_dispatch_attempts(&self) -> i64 {
        self.inner.max_dispatch_attempts
    }

    pub(crate) fn max_log_chunk_bytes(&self) -> usize {
        self.inner.max_log_chunk_bytes
    }

    pub(crate) fn max_request_body_bytes(&self) -> usize {
        self.inner.max_request_body_bytes
    }

    pub(crate) fn external_url(&self) -> Option<&str> {
        self.inner.external_url.as_deref()
    }

    /// True when the configuration names a TLS certificate and key, so
    /// the API is served over HTTPS.
    pub(crate) fn serves_tls(&self) -> bool {
        self.inner.serves_tls
    }

    /// The request limits of every pool.
    pub fn limits(&self) -> &Arc<RequestLimits> {
        &self.inner.limits
    }

    /// The gateway: tunnels, shell sessions and their drain.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.inner.gateway
    }

    /// Ends every log wait now, so a draining server is not held up by
    /// long polls.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    pub(crate) fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Stops the store's listener for other controllers' writes and waits
    /// for its end. Dropping the last clone of the state also stops it.
    pub async fn stop_change_listener(&self) {
        let listener = self
            .inner
            .change_listener
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(listener) = listener {
            listener.stop().await;
        }
    }
}

/// Builds the controller's router.
pub fn app(state: AppState) -> Router {
    // A successful write through these routes may have changed containers:
    // committing a request creates one, every request change recomputes its
    // container's priority, and the container routes write containers.
    let container_writes = Router::new()
        .route(
            "/container_requests",
            get(requests::list).post(requests::create_or_list),
        )
        .route(
            "/container_requests/{uuid}",
            get(requests::get)
                .put(requests::update)
                .patch(requests::update)
                .delete(requests::delete),
        )
        .route(
            "/containers",
            get(containers::list).post(containers::post_list),
        )
        .route(
            "/containers/{uuid}",
            get(containers::get)
                .put(containers::update)
                .patch(containers::update),
        )
        .route("/containers/{uuid}/lock", post(containers::lock))
        .route("/containers/{uuid}/unlock", post(containers::unlock))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            wake_change_waiters,
        ));
    let v1 = Router::new()
        .route("/users/current", get(users::current_user))
        .route(
            "/api_client_authorizations/current",
            get(users::current_token),
        )
        .route(
            "/container_requests/{uuid}/container_status",
            get(requests::container_status),
        )
        // Static segments take precedence over `{uuid}`, so `changes` and
        // `current` are never read as a container's UUID.
        .route("/containers/changes", get(changes::changes))
        .route("/containers/current", get(containers::current))
        .route(
            "/containers/{uuid}/log/{stream}",
            get(logs::read).post(logs::append),
        )
        .route(
            "/containers/{uuid}/secret_mounts",
            get(containers::secret_mounts),
        )
        .route(
            "/containers/{uuid}/runtime_token",
            get(containers::runtime_token),
        )
        .route("/dispatch_leases/{name}/{call}", post(leases::call))
        .route(
            "/connect/{uuid}/gateway_tunnel",
            post(connect::gateway_tunnel),
        )
        .route("/connect/{uuid}/ssh", post(connect::ssh))
        .route(
            "/collections",
            get(collections::list).post(collections::create_or_list),
        )
        .route(
            "/collections/{uuid}",
            get(collections::get)
                .put(collections::update)
                .patch(collections::update)
                .delete(collections::delete),
        )
        .route("/keep_services/accessible", get(keep_services::accessible))
        .merge(container_writes);

    let timeout = state.inner.request_timeout;
    Router::new()
        .nest("/arvados/v1", v1)
        .route(
            "/discovery/v1/apis/arvados/v1/rest",
            get(discovery::document),
        )
        .route("/_health/ping", get(health))
        .route("/metrics", get(metrics))
        // Blocks, at the root as in Keep's protocol: `/<md5>[+<size>...]`.
        .route("/{locator}", get(blocks::get).put(blocks::put))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(run_to_completion))
        .layer(middleware::map_response(rejection::errors_as_json))
        .layer(middleware::from_fn_with_state(
            timeout,
            rejection::enforce_timeout,
        ))
        // Outside the timeout: a request's wait in the queue has its own
        // limit, `limits.queue_timeout_seconds`.
        .layer(middleware::from_fn_with_state(
            state.limits().clone(),
            crate::limits::admit,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Body>| {
                    // The matched route and the request id, never the URI or
                    // other headers: no token or query string reaches the log.
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map(MatchedPath::as_str)
                        .unwrap_or("unmatched");
                    let request_id = request
                        .headers()
                        .get(request_id::REQUEST_ID_HEADER)
                        .and_then(|id| id.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("http", method = %request.method(), route, request_id)
                })
                .on_request(())
                .on_response(|response: &Response, latency: Duration, _span: &Span| {
                    let status = response.status().as_u16();
                    let latency_ms = latency.as_millis() as u64;
                    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                        tracing::warn!(
                            status,
                            latency_ms,
                            "request failed with 503: it timed out or the database is unreachable"
                        );
                    } else {
                        tracing::debug!(status, latency_ms, "answered");
                    }
                })
                // ApiError logs server errors once, with their details.
                .on_failure(()),
        )
        .layer(middleware::from_fn(request_id::set_request_id))
        .with_state(state)
}

/// Wakes the change feed's waiters after a successful call that is not a
/// read. A `POST` that is a list (`X-Http-Method-Override: GET`) wakes
/// them for nothing, and they read the store once more.
async fn wake_change_waiters(
    State(state): State<AppState>,
    request: Request<Body>,
    next: Next,
) -> Response {
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    let response = next.run(request).await;
    if !reads && response.status().is_success() {
        state.notifier().notify_changes();
    }
    response
}

/// Largest request body [`run_to_completion`] reads before the handler:
/// a block of the largest size a block store accepts (64 MiB), with room
/// to spare. Each handler applies its own, smaller limit after it.
const MAX_REQUEST_BODY: usize = 65 << 20;

/// Reads the request body, then runs the rest of the request in a task of
/// its own. The request then finishes even when its caller goes away, since
/// a client that disconnects, or the request timeout, drops only the wait.
/// A handler dropped in the middle of a write transaction could otherwise
/// leave its SQLite connection inside that transaction, holding the write
/// lock, so that every later write failed. The body is read first, where
/// dropping is harmless, so a stalled upload still ends at the timeout.
async fn run_to_completion(request: Request<Body>, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
        Ok(bytes) => Body::from(bytes),
        // axum reports an oversized body as "length limit exceeded".
        Err(error) if error.to_string().contains("length limit") => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than {} MiB: send a smaller body",
                    MAX_REQUEST_BODY >> 20
                ),
            )
                .into_response();
        }
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("failed to read the request body: {error}"),
            )
                .into_response();
        }
    };
    let request = Request::from_parts(parts, body);
    let handler = tokio::spawn(next.run(request).instrument(Span::current()));
    match handler.await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(error = %error, "the request's task failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn health(State(state): State<AppState>) -> Response {
    match state.store().ping().await {
        Ok(()) => Json(serde_json::json!({"health": "OK"})).into_response(),
        Err(err) => {
            tracing::error!(error = %error_chain(&err), "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(
                    serde_json::json!({"health": "ERROR", "error": "failed to reach the database"}),
                ),
            )
                .into_response()
        }
    }
}

/// `GET /metrics`: the request limits and their use, and the gateway's
/// tunnels, streams, forwards and failures, in Prometheus's text
/// format, for the system token and administrators.
async fn metrics(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    if !caller.is_admin {
        return Err(ApiError::Forbidden(
            "metrics are for administrators and the system token".to_string(),
        ));
    }
    let mut text = String::new();
    state.limits().render_metrics(&mut text);
    let gateway = state.gateway();
    gateway.metrics().render(gateway.tunnel_count(), &mut text);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("Path not found: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("method {method} is not allowed on {}", uri.path()))
}
