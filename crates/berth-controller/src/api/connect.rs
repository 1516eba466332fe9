//! `connect/{uuid}/gateway_tunnel` and `connect/{uuid}/ssh`: the two
//! HTTP/1.1 upgrades of the container gateway.
//!
//! The supervisor dials the tunnel with the container's gateway secret
//! (compared, as a SHA-256 hash, in constant time with the hash the lock
//! stored) and its supervisor id. The tunnel is accepted only while the
//! container is Locked or Running. The container's lease must also be
//! free, stale or held by the same supervisor id, and the claim then names
//! this controller in it.
//!
//! A shell is for the owner of one of the container's requests or an
//! administrator, never for a container token, and only while the
//! container is Running. The controller that holds the tunnel opens an
//! `/ssh` stream through it; another controller forwards the request once
//! to the holder that the lease names ([`gateway::open_forward`]). Either
//! way the client's upgraded connection is spliced with the peer.
//!
//! Both routes take their slot from their own pool (`tunnel` or `shell`),
//! and the slot stays with the upgraded connection's task.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_core::secret::constant_time_eq;
use berth_core::ContainerState;
use berth_tunnel::{
    check_upgrade_request, header_has_token, switching_protocols_response, StreamKind,
    StreamRequest, UpgradeRequestError, SUPERVISOR_ID_HEADER,
};
use hyper::upgrade::OnUpgrade;
use serde_json::json;

use super::rejection::PathParams;
use super::{containers, AppState};
use crate::auth::{hash_secret, Caller};
use crate::error::ApiError;
use crate::gateway::{self, ForwardError, SessionPeer, NO_FORWARD_HEADER, OPEN_TIMEOUT};
use crate::limits::HeldSlot;

/// The `Upgrade` token of a shell connection.
pub const SSH_UPGRADE: &str = "ssh";

/// Seconds sent in `Retry-After` when the tunnel is not connected or this
/// controller is draining.
const RETRY_AFTER_SECONDS: u64 = 3;

/// Maximum length of a supervisor id, in bytes.
const MAX_SUPERVISOR_ID: usize = 128;

/// `POST connect/{uuid}/gateway_tunnel`: a supervisor's tunnel.
pub async fn gateway_tunnel(
    State(state): State<AppState>,
    PathParams(uuid): PathParams<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let gateway = state.gateway();
    let secret = match check_upgrade_request(&request) {
        Ok(secret) => secret.to_owned(),
        Err(UpgradeRequestError::Secret) => {
            gateway.metrics().count_failure("tunnel_auth");
            return Err(ApiError::Unauthorized(format!(
                "missing {} header: send the container's gateway secret",
                berth_tunnel::SECRET_HEADER
            )));
        }
        Err(other) => return Err(ApiError::invalid(other.to_string())),
    };
    let supervisor_id = supervisor_id(request.headers())?;
    if gateway.is_draining() {
        gateway.metrics().count_failure("tunnel_draining");
        return Ok(unavailable(
            "this controller is shutting down; dial the tunnel again to reach another controller",
        ));
    }

    // A missing container and a wrong secret get the same response, so
    // the endpoint does not reveal which containers exist.
    let stored = state
        .store()
        .get_gateway_secret_sha256(&uuid)
        .await
        .map_err(ApiError::store("read a gateway secret's hash"))?;
    let presented = hash_secret(&secret);
    let valid = stored
        .as_deref()
        .is_some_and(|stored| constant_time_eq(stored.as_bytes(), presented.as_bytes()));
    if !valid {
        gateway.metrics().count_failure("tunnel_auth");
        tracing::warn!(container = %uuid, "rejected a gateway tunnel: invalid gateway secret");
        return Err(ApiError::Unauthorized(format!(
            "invalid gateway secret for container {uuid}: check the gateway secret in the container's credentials file"
        )));
    }

    let container = state
        .store()
        .get_container(&uuid)
        .await
        .map_err(ApiError::store("read a container"))?
        .ok_or_else(|| ApiError::not_found("container", &uuid))?
        .record;
    if !matches!(
        container.state,
        ContainerState::Locked | ContainerState::Running
    ) {
        gateway.metrics().count_failure("tunnel_state");
        return Err(ApiError::Conflict(format!(
            "container {uuid} is {}: a gateway tunnel is accepted only while it is Locked or Running",
            container.state
        )));
    }

    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return Err(ApiError::invalid(
            "this connection cannot be upgraded: send the tunnel request over HTTP/1.1",
        ));
    };
    let (now, stale_before) = gateway.lease_clock();
    let lease = state
        .store()
        .claim_tunnel(
            &uuid,
            gateway.internal_url(),
            &supervisor_id,
            now,
            stale_before,
        )
        .await
        .map_err(ApiError::store("claim a tunnel lease"))?;
    if lease.controller_url != gateway.internal_url() || lease.supervisor_id != supervisor_id {
        gateway.metrics().count_failure("tunnel_conflict");
        tracing::warn!(
            container = %uuid,
            holder = %lease.controller_url,
            "rejected a gateway tunnel: another supervisor holds a live tunnel"
        );
        return Err(ApiError::Conflict(format!(
            "a tunnel for container {uuid} is held by another supervisor"
        )));
    }

    let slot = request.extensions_mut().remove::<HeldSlot>();
    tracing::info!(container = %uuid, epoch = lease.epoch, "accepted a gateway tunnel");
    gateway.spawn_tunnel(uuid, lease.epoch, on_upgrade, slot);
    Ok(switching_protocols_response::<Body>())
}

/// Reads the supervisor id header.
fn supervisor_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers
        .get(SUPERVISOR_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let usable = !value.is_empty()
        && value.len() <= MAX_SUPERVISOR_ID
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !usable {
        return Err(ApiError::invalid(format!(
            "missing or invalid {SUPERVISOR_ID_HEADER} header: send 1 to {MAX_SUPERVISOR_ID} ASCII letters, digits or '-'"
        )));
    }
    Ok(value.to_owned())
}

/// `POST connect/{uuid}/ssh`: a user's shell or port-forward connection.
pub async fn ssh(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let gateway = state.gateway().clone();
    check_ssh_upgrade(request.headers())?;
    if caller.is_container_token() {
        return Err(ApiError::Forbidden(
            "a container token cannot open a shell: use a user's token".into(),
        ));
    }
    if !gateway.shell_access() {
        gateway.metrics().count_failure("shell_disabled");
        return Err(ApiError::Forbidden(
            "shell access is turned off on this controller (controller.shell_access is false)"
                .into(),
        ));
    }
    let container = containers::load_visible(&state, &caller, &uuid)
        .await?
        .record;
    if container.state != ContainerState::Running {
        return Err(ApiError::Conflict(format!(
            "container {uuid} is {}: a shell needs a Running container",
            container.state
        )));
    }
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return Err(ApiError::invalid(
            "this connection cannot be upgraded: send the shell request over HTTP/1.1",
        ));
    };
    let forwarded = request
        .headers()
        .get(NO_FORWARD_HEADER)
        .is_some_and(|value| value.as_bytes() == b"1");

    let peer = if let Some(tunnel) = gateway.tunnel(&uuid) {
        let open = tunnel.open(StreamRequest::new(StreamKind::Ssh).requested_by(&caller.user_uuid));
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(stream)) => {
                gateway.metrics().count_stream();
                SessionPeer::Stream(stream)
            }
            Ok(Err(error)) => {
                gateway.metrics().count_failure("stream_open");
                tracing::warn!(container = %uuid, error = %error, "failed to open a shell stream through the tunnel");
                return Ok(unavailable(
                    "the container's gateway did not accept the shell stream; try again in a few seconds",
                ));
            }
            Err(_) => {
                gateway.metrics().count_failure("stream_open");
                tracing::warn!(container = %uuid, "timed out opening a shell stream through the tunnel");
                return Ok(unavailable(
                    "timed out waiting for the container's gateway; try again in a few seconds",
                ));
            }
        }
    } else {
        let lease = state
            .store()
            .get_tunnel(&uuid)
            .await
            .map_err(ApiError::store("read a tunnel lease"))?;
        let (_, stale_before) = gateway.lease_clock();
        let holder = lease.filter(|lease| {
            lease.is_live(stale_before) && lease.controller_url != gateway.internal_url()
        });
        match holder {
            Some(lease) if !forwarded => {
                match forward(&gateway, &lease.controller_url, &uuid, request.headers()).await {
                    Ok(peer) => peer,
                    Err(response) => return Ok(response),
                }
            }
            _ => {
                gateway.metrics().count_failure("no_tunnel");
                return Ok(unavailable(
                    "the container's gateway tunnel is not connected; try again in a few seconds",
                ));
            }
        }
    };

    // The holder of the tunnel marks the container, so a forwarded
    // session is marked once.
    if matches!(peer, SessionPeer::Stream(_)) && !container.interactive_session_started {
        containers::mark_interactive_session(&state, &uuid).await?;
    }
    let slot = request.extensions_mut().remove::<HeldSlot>();
    tracing::info!(container = %uuid, user = %caller.user_uuid, "shell session starting");
    gateway.spawn_session(uuid, caller.user_uuid, on_upgrade, peer, slot);

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(SSH_UPGRADE));
    Ok(response)
}

/// Forwards the shell request to `holder`; on failure returns the
/// response for the client.
async fn forward(
    gateway: &gateway::Gateway,
    holder: &str,
    uuid: &str,
    headers: &HeaderMap,
) -> Result<SessionPeer, Response> {
    let authorization = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("no Authorization header to forward".into()).into_response()
    })?;
    let path = format!("/arvados/v1/connect/{uuid}/ssh");
    let open = gateway::open_forward(
        holder,
        &path,
        SSH_UPGRADE,
        authorization,
        gateway.forward_tls(),
    );
    let outcome = tokio::time::timeout(OPEN_TIMEOUT, open).await;
    match outcome {
        Ok(Ok(upgraded)) => {
            gateway.metrics().count_forward();
            tracing::info!(container = %uuid, holder, "forwarded a shell request to the tunnel's controller");
            Ok(SessionPeer::Forward(upgraded))
        }
        Ok(Err(ForwardError::Rejected {
            status,
            retry_after,
            body,
            ..
        })) => {
            gateway.metrics().count_failure("forward_rejected");
            tracing::info!(container = %uuid, holder, %status, "the tunnel's controller rejected a forwarded shell request");
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(retry_after) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after);
            }
            Err(response)
        }
        Ok(Err(error)) => {
            gateway.metrics().count_failure("forward_unreachable");
            tracing::warn!(container = %uuid, error = %error, "failed to forward a shell request");
            Err(unavailable(&format!("{error}; try again in a few seconds")))
        }
        Err(_) => {
            gateway.metrics().count_failure("forward_unreachable");
            tracing::warn!(container = %uuid, holder, "timed out forwarding a shell request");
            Err(unavailable(
                "timed out waiting for the controller that holds the tunnel; try again in a few seconds",
            ))
        }
    }
}

/// Checks the `Upgrade: ssh` and `Connection: Upgrade` headers.
fn check_ssh_upgrade(headers: &HeaderMap) -> Result<(), ApiError> {
    if !header_has_token(headers, header::UPGRADE, SSH_UPGRADE) {
        return Err(ApiError::invalid(format!(
            "missing 'Upgrade: {SSH_UPGRADE}' header on the shell request"
        )));
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err(ApiError::invalid(
            "missing 'Connection: Upgrade' header on the shell request",
        ));
    }
    Ok(())
}

/// Builds a 503 response with `Retry-After` and `message` as an Arvados
/// error.
fn unavailable(message: &str) -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "errors": [message] })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    response
}
