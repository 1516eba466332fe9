//! `dispatch_leases`: the leader lease that keeps one dispatcher active
//! per lease name, with the others waiting as standbys.
//!
//! - `POST dispatch_leases/{name}/acquire` with `holder` and `ttl`
//!   (seconds) takes the lease if it is free, expired or already the
//!   holder's;
//! - `POST dispatch_leases/{name}/renew` with `holder`, `epoch` and `ttl`
//!   extends it while the holder still holds it at that epoch;
//! - `POST dispatch_leases/{name}/release` with `holder` and `epoch` frees
//!   it at once.
//!
//! Parameters come in the query string, a form or a JSON object body.
//! Each call returns the lease as it is afterwards, with `held` telling
//! whether `holder` holds it, and `expires_in`, the seconds left by the
//! controller's clock, so a dispatcher can compute its own deadline
//! without comparing clocks. Only administrators and the system token, the
//! callers that may lock containers, may call these routes.
//!
//! `containers/{uuid}/lock` takes the optional parameters `lease` and
//! `lease_epoch`: the lock is then applied only while that lease is held,
//! unexpired, at that epoch, and is otherwise rejected with 409.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use super::params::{self, Params};
use super::rejection::PathParams;
use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::DispatchLease;

pub const KIND: &str = "berth#dispatchLease";

/// Minimum and maximum `ttl`, in seconds. A lease shorter than a second
/// expires between two renewals over a slow network. A lease longer than
/// five minutes keeps the standby of a dead dispatcher waiting too long.
const MIN_TTL_SECONDS: f64 = 1.0;
const MAX_TTL_SECONDS: f64 = 300.0;

/// Maximum length of a lease name and of a holder id.
const MAX_NAME_LEN: usize = 100;
const MAX_HOLDER_LEN: usize = 200;

/// The three lease calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseCall {
    Acquire,
    Renew,
    Release,
}

impl LeaseCall {
    fn parse(verb: &str) -> Option<LeaseCall> {
        match verb {
            "acquire" => Some(LeaseCall::Acquire),
            "renew" => Some(LeaseCall::Renew),
            "release" => Some(LeaseCall::Release),
            _ => None,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            LeaseCall::Acquire => "acquire",
            LeaseCall::Renew => "renew",
            LeaseCall::Release => "release",
        }
    }
}

/// `POST dispatch_leases/{name}/{acquire,renew,release}`.
pub async fn call(
    State(state): State<AppState>,
    caller: Caller,
    PathParams((name, verb)): PathParams<(String, String)>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let Some(call) = LeaseCall::parse(&verb) else {
        return Err(ApiError::NotFound(format!(
            "Path not found: POST /arvados/v1/dispatch_leases/{name}/{verb}: expected acquire, renew or release"
        )));
    };
    if !caller.is_admin {
        return Err(ApiError::Forbidden(format!(
            "only administrators and the system token may {} dispatch leases",
            call.verb()
        )));
    }
    check_name(&name)?;

    let body = params::read_body(
        &headers,
        body,
        state.max_request_body_bytes(),
        "the request body",
    )
    .await?;
    let params = params::params_with_body(&headers, query.as_deref(), &body)?;
    let holder = holder_param(&params)?;

    let now_ms = chrono::Utc::now().timestamp_millis();
    let store = state.store();
    let lease = match call {
        LeaseCall::Acquire => {
            let expires_at_ms = now_ms + ttl_param(&params)?;
            let lease = store
                .acquire_lease(&name, &holder, now_ms, expires_at_ms)
                .await
                .map_err(ApiError::store("acquire a dispatch lease"))?;
            Some(lease)
        }
        LeaseCall::Renew => {
            let epoch = epoch_param(&params)?;
            let expires_at_ms = now_ms + ttl_param(&params)?;
            store
                .renew_lease(&name, &holder, epoch, expires_at_ms)
                .await
                .map_err(ApiError::store("renew a dispatch lease"))?
        }
        LeaseCall::Release => {
            let epoch = epoch_param(&params)?;
            store
                .release_lease(&name, &holder, epoch)
                .await
                .map_err(ApiError::store("release a dispatch lease"))?
        }
    };

    let Some(lease) = lease else {
        return Err(ApiError::NotFound(format!(
            "dispatch lease {name:?} not found: acquire it first"
        )));
    };
    log_change(call, &lease, &holder, now_ms);
    Ok(Json(render(&lease, &holder, now_ms)))
}

/// Logs each change of holder, and each failed renewal, which means a
/// dispatcher lost its lease.
fn log_change(call: LeaseCall, lease: &DispatchLease, holder: &str, now_ms: i64) {
    let held = lease.is_held_by(holder, now_ms);
    match call {
        LeaseCall::Acquire if held => {
            tracing::debug!(lease = %lease.name, holder, epoch = lease.epoch, "dispatch lease held")
        }
        LeaseCall::Renew if !held => tracing::warn!(
            lease = %lease.name,
            holder,
            current_holder = lease.holder.as_deref().unwrap_or(""),
            epoch = lease.epoch,
            "a dispatcher failed to renew its lease: it lost it"
        ),
        LeaseCall::Release if lease.holder.is_none() => {
            tracing::info!(lease = %lease.name, holder, epoch = lease.epoch, "dispatch lease released")
        }
        _ => {}
    }
}

/// Renders a lease for the holder who called.
fn render(lease: &DispatchLease, holder: &str, now_ms: i64) -> Value {
    let expires_in_ms = (lease.expires_at_ms - now_ms).max(0);
    let expires_at = chrono::DateTime::from_timestamp_millis(lease.expires_at_ms)
        .map(|at| berth_core::time::format(&at));
    json!({
        "kind": KIND,
        "name": lease.name,
        "holder": lease.holder,
        "epoch": lease.epoch,
        "held": lease.is_held_by(holder, now_ms),
        "expires_at": expires_at,
        "expires_in": expires_in_ms as f64 / 1000.0,
    })
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(is_id_char) {
        return Err(ApiError::invalid(format!(
            "invalid dispatch lease name {name:?}: use 1 to {MAX_NAME_LEN} letters, digits, '.', '_', '-', ':' or '@'"
        )));
    }
    Ok(())
}

fn holder_param(params: &Params) -> Result<String, ApiError> {
    let Some(holder) = params.text("holder") else {
        return Err(ApiError::invalid(
            "missing holder parameter: give the id of the dispatcher process",
        ));
    };
    if holder.is_empty() || holder.len() > MAX_HOLDER_LEN || !holder.chars().all(is_id_char) {
        return Err(ApiError::invalid(format!(
            "invalid holder parameter {holder:?}: use 1 to {MAX_HOLDER_LEN} letters, digits, '.', '_', '-', ':' or '@'"
        )));
    }
    Ok(holder)
}

/// Reads `ttl` in seconds; returns it in milliseconds.
fn ttl_param(params: &Params) -> Result<i64, ApiError> {
    let Some(seconds) = params.seconds("ttl")? else {
        return Err(ApiError::invalid(
            "missing ttl parameter: give the lease's duration in seconds",
        ));
    };
    if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&seconds) {
        return Err(ApiError::invalid(format!(
            "invalid ttl parameter {seconds}: expected {MIN_TTL_SECONDS} to {MAX_TTL_SECONDS} seconds"
        )));
    }
    Ok((seconds * 1000.0).round() as i64)
}

fn epoch_param(params: &Params) -> Result<i64, ApiError> {
    let Some(epoch) = params.u64("epoch")? else {
        return Err(ApiError::invalid(
            "missing epoch parameter: give the epoch the acquire call returned",
        ));
    };
    i64::try_from(epoch)
        .map_err(|_| ApiError::invalid(format!("invalid epoch parameter {epoch}: too large")))
}

/// Reads the optional fence of a lock call: the `lease` name and
/// `lease_epoch`, both or neither.
pub(crate) fn fence_params(params: &Params) -> Result<Option<(String, i64)>, ApiError> {
    let name = params.text("lease");
    let epoch = params.u64("lease_epoch")?;
    match (name, epoch) {
        (None, None) => Ok(None),
        (Some(name), Some(epoch)) => {
            check_name(&name)?;
            let epoch = i64::try_from(epoch).map_err(|_| {
                ApiError::invalid(format!("invalid lease_epoch parameter {epoch}: too large"))
            })?;
            Ok(Some((name, epoch)))
        }
        _ => Err(ApiError::invalid(
            "the lease and lease_epoch parameters go together: give both or neither",
        )),
    }
}
