//! `containers`: get, list, update, lock, unlock, `containers/current`,
//! and the container's secrets.
//!
//! Users read the containers of their requests and never change them.
//! The dispatcher (an administrator, usually the system token) locks,
//! unlocks and cancels. The supervisor, with the container's own token,
//! reports Running, the exit code and the final state, and reads the
//! container's secret mounts (`containers/{uuid}/secret_mounts`) and, for a
//! container with API access, its runtime token
//! (`containers/{uuid}/runtime_token`). Only that token reads them, and
//! only while the container is Locked or Running; the store clears them
//! when the container reaches a final state.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_core::manifest::EMPTY_COLLECTION_PDH;
use berth_core::{Container, ContainerRequest, ContainerState, RequestState};
use serde_json::Value;

use super::params::{self, Params};
use super::rejection::PathParams;
use super::{render, AppState, MAX_WRITE_ATTEMPTS};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::lifecycle::{self, ContainerChange};
use crate::retry;
use crate::store::{
    find_column, ContainerWrite, Filter, FilterOp, LeaseFence, ListQuery, Operand, Scalar, Secrets,
    StoreError, Versioned, Visibility, CONTAINER_COLUMNS, REQUEST_COLUMNS,
};

pub const KIND: &str = "arvados#container";
const LIST_KIND: &str = "arvados#containerList";
const TABLE: &str = "containers";
const WRAPPER: &str = "container";

/// True if the caller may read the container: an administrator, its own
/// token, or the owner of one of its requests.
pub(crate) async fn may_read(
    state: &AppState,
    caller: &Caller,
    container_uuid: &str,
) -> Result<bool, ApiError> {
    if let Some(own) = &caller.container_uuid {
        return Ok(own == container_uuid);
    }
    if caller.is_admin {
        return Ok(true);
    }
    state
        .store()
        .container_requested_by(container_uuid, &caller.user_uuid)
        .await
        .map_err(ApiError::store("check who requested a container"))
}

/// Loads a container the caller may read; others are not found.
pub(crate) async fn load_visible(
    state: &AppState,
    caller: &Caller,
    uuid: &str,
) -> Result<Versioned<Container>, ApiError> {
    let not_found = || ApiError::not_found("container", uuid);
    if !may_read(state, caller, uuid).await? {
        return Err(not_found());
    }
    state
        .store()
        .get_container(uuid)
        .await
        .map_err(ApiError::store("read a container"))?
        .ok_or_else(not_found)
}

/// Rejects callers that may read the container but not change it.
fn check_may_update(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_admin || caller.is_container_token() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "users cannot update containers: change the container request instead (set its priority to 0 or its state to Final to cancel)".into(),
        ))
    }
}

fn check_may_dispatch(caller: &Caller, action: &str) -> Result<(), ApiError> {
    if caller.is_admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "only administrators and the system token may {action} containers"
        )))
    }
}

/// Returns the containers a caller may list: all for administrators, its
/// own for a container token, and those of their requests for a user.
pub(crate) fn visibility(caller: &Caller) -> Visibility {
    match (&caller.container_uuid, caller.is_admin) {
        (Some(own), _) => Visibility::Container(own.clone()),
        (None, true) => Visibility::All,
        (None, false) => Visibility::User(caller.user_uuid.clone()),
    }
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    list_with(&state, &caller, &Params::from_query(query.as_deref())).await
}

async fn list_with(
    state: &AppState,
    caller: &Caller,
    params: &Params,
) -> Result<Json<Value>, ApiError> {
    let query = params::list_query(CONTAINER_COLUMNS, TABLE, params, visibility(caller))?;
    let select = params::select(CONTAINER_COLUMNS, params)?;
    let page = state
        .store()
        .list_containers(&query)
        .await
        .map_err(ApiError::store("list containers"))?;
    let body = render::list(
        LIST_KIND,
        KIND,
        &page,
        query.offset,
        query.limit,
        select.as_deref(),
    )?;
    Ok(Json(body))
}

/// `POST containers`: only a list with the method overridden to GET.
/// Containers are created from committed requests, never directly.
pub async fn post_list(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = params::read_body(
        &headers,
        body,
        state.max_request_body_bytes(),
        "the request body",
    )
    .await?;
    let params = params::params_with_body(&headers, query.as_deref(), &body)?;
    if params::overrides_to_get(&headers, &params) {
        return list_with(&state, &caller, &params).await;
    }
    Err(ApiError::MethodNotAllowed(
        "containers cannot be created directly: create a container request with state Committed"
            .into(),
    ))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let select = params::select(CONTAINER_COLUMNS, &Params::from_query(query.as_deref()))?;
    let stored = load_visible(&state, &caller, &uuid).await?;
    Ok(Json(render::record(
        KIND,
        &stored.record,
        select.as_deref(),
    )?))
}

/// `GET containers/current`: the container of a container token.
pub async fn current(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let Some(uuid) = &caller.container_uuid else {
        return Err(ApiError::NotFound(
            "Token is not associated with a container.".into(),
        ));
    };
    let stored = load_visible(&state, &caller, uuid).await?;
    Ok(Json(render::record(KIND, &stored.record, None)?))
}

/// Page size when reading the requests of one container.
const REQUEST_PAGE: u64 = 1000;

/// Reads the Committed requests that point at a container.
async fn committed_requests(
    state: &AppState,
    container_uuid: &str,
) -> Result<Vec<Versioned<ContainerRequest>>, StoreError> {
    let column = |name| find_column(REQUEST_COLUMNS, name);
    let (Some(container_column), Some(state_column)) = (column("container_uuid"), column("state"))
    else {
        return Ok(Vec::new());
    };
    let mut query = ListQuery {
        visibility: Visibility::All,
        filters: vec![
            Filter {
                column: container_column,
                key: None,
                op: FilterOp::Eq,
                operand: Operand::One(Scalar::Text(container_uuid.to_string())),
            },
            Filter {
                column: state_column,
                key: None,
                op: FilterOp::Eq,
                operand: Operand::One(Scalar::Text(RequestState::Committed.to_string())),
            },
        ],
        order: Vec::new(),
        limit: REQUEST_PAGE,
        offset: 0,
        count: false,
    };
    let mut requests = Vec::new();
    loop {
        let page = state.store().list_requests(&query).await?;
        let full = page.items.len() as u64 == REQUEST_PAGE;
        requests.extend(page.items);
        if !full {
            return Ok(requests);
        }
        query.offset += REQUEST_PAGE;
    }
}

/// Stores a container change built from `current`; a conflict is returned
/// for the caller's retry loop. A container that becomes Cancelled gets
/// its retry planned here: the requests that may try again move to a new
/// container in the same transaction.
async fn store_change(
    state: &AppState,
    current: &Versioned<Container>,
    change: ContainerChange,
    lease_fence: Option<LeaseFence>,
) -> Result<Versioned<Container>, StoreError> {
    let retry = if change.finalize_requests && change.record.state == ContainerState::Cancelled {
        let requests = committed_requests(state, &change.record.uuid).await?;
        // Read only when a request is retried. A container whose secrets
        // change meanwhile reached a final state, so the write conflicts.
        let secrets = if requests.is_empty() {
            Secrets::default()
        } else {
            state
                .store()
                .get_container_secrets(&change.record.uuid)
                .await?
                .map(|stored| stored.record)
                .unwrap_or_default()
        };
        retry::plan_retry(
            &state.cluster().cluster_id,
            &change.record,
            &secrets,
            &requests,
            change.record.modified_at,
        )
    } else {
        None
    };
    let write = ContainerWrite {
        clear_secrets: change.record.state.is_final(),
        record: change.record,
        expected_version: current.version,
        credentials: change.credentials,
        finalize_requests: change.finalize_requests,
        retry,
        lease_fence,
    };
    let stored = state.store().update_container(&write).await?;
    if change.state_changed {
        tracing::info!(
            container = %stored.record.uuid,
            from = %current.record.state,
            to = %stored.record.state,
            exit_code = stored.record.exit_code,
            "container changed state"
        );
        state.notifier().notify(&stored.record.uuid);
    }
    if let Some(retry) = &write.retry {
        tracing::info!(
            container = %stored.record.uuid,
            retry = %retry.new_container.uuid,
            requests = retry.requests.len(),
            "queued a new container for the requests of a cancelled one"
        );
    }
    Ok(stored)
}

fn conflict(uuid: &str) -> ApiError {
    ApiError::Conflict(format!(
        "container {uuid} kept changing while it was being updated: try again"
    ))
}

/// `PUT` and `PATCH containers/{uuid}`.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let params::UpdateInput { attributes, select } = params::update_input(
        &headers,
        query.as_deref(),
        body,
        state.max_request_body_bytes(),
        WRAPPER,
        CONTAINER_COLUMNS,
    )
    .await?;

    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(&state, &caller, &uuid).await?;
        check_may_update(&caller)?;
        let change = lifecycle::update_container(
            &caller,
            &current.record,
            attributes.clone(),
            chrono::Utc::now(),
        )?;
        if !change.changed {
            return Ok(Json(render::record(
                KIND,
                &current.record,
                select.as_deref(),
            )?));
        }
        check_collections_readable(&state, &caller, &current.record, &change.record).await?;
        match store_change(&state, &current, change, None).await {
            Ok(stored) => {
                return Ok(Json(render::record(
                    KIND,
                    &stored.record,
                    select.as_deref(),
                )?))
            }
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("update a container")(err)),
        }
    }
    Err(conflict(&uuid))
}

/// Sets `interactive_session_started` on a container, as the system, when
/// a shell session starts. A container that left Running meanwhile is
/// left as it is.
pub(crate) async fn mark_interactive_session(state: &AppState, uuid: &str) -> Result<(), ApiError> {
    let cluster = &state.cluster().cluster_id;
    let system = Caller {
        user_uuid: crate::auth::system_user_uuid(cluster),
        token_uuid: crate::auth::system_token_uuid(cluster),
        is_admin: true,
        container_uuid: None,
        scopes: vec!["all".into()],
    };
    let mut attributes = serde_json::Map::new();
    attributes.insert("interactive_session_started".into(), Value::Bool(true));
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(state, &system, uuid).await?;
        if current.record.interactive_session_started
            || current.record.state != ContainerState::Running
        {
            return Ok(());
        }
        let change = lifecycle::update_container(
            &system,
            &current.record,
            attributes.clone(),
            chrono::Utc::now(),
        )?;
        match store_change(state, &current, change, None).await {
            Ok(_) => {
                tracing::info!(
                    container = uuid,
                    "first interactive session of the container"
                );
                state.notifier().notify_changes();
                return Ok(());
            }
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("mark an interactive session")(err)),
        }
    }
    Err(conflict(uuid))
}

/// Checks that a changed `output` or `log` names a collection the caller
/// may read, as the container's user or an administrator. The empty
/// collection needs no record.
async fn check_collections_readable(
    state: &AppState,
    caller: &Caller,
    current: &Container,
    updated: &Container,
) -> Result<(), ApiError> {
    let visibility = if caller.is_admin {
        Visibility::All
    } else {
        Visibility::User(caller.user_uuid.clone())
    };
    let fields = [
        ("output", &current.output, &updated.output),
        ("log", &current.log, &updated.log),
    ];
    for (field, before, after) in fields {
        let Some(pdh) = after.as_deref() else {
            continue;
        };
        if before.as_deref() == Some(pdh) || pdh == EMPTY_COLLECTION_PDH {
            continue;
        }
        let found = state
            .store()
            .find_collection_by_pdh(pdh, &visibility)
            .await
            .map_err(ApiError::store("find a collection"))?;
        if found.is_none() {
            return Err(ApiError::invalid(format!(
                "{field}: no collection with portable data hash {pdh} is readable by {}: create the collection first, as the container's user",
                caller.user_uuid
            )));
        }
    }
    Ok(())
}

/// `POST containers/{uuid}/lock`: the container plus, once only, its
/// credentials.
pub async fn lock(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let fence = super::leases::fence_params(&Params::from_query(query.as_deref()))?;
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(&state, &caller, &uuid).await?;
        check_may_dispatch(&caller, "lock")?;
        let lock = lifecycle::lock_container(
            &state.cluster().cluster_id,
            &caller,
            &current.record,
            chrono::Utc::now(),
        )?;
        let lease_fence = fence.as_ref().map(|(name, epoch)| LeaseFence {
            name: name.clone(),
            epoch: *epoch,
            now_ms: chrono::Utc::now().timestamp_millis(),
        });
        match store_change(&state, &current, lock.change, lease_fence).await {
            Ok(stored) => {
                let mut body = render::record(KIND, &stored.record, None)?;
                let credentials = serde_json::to_value(&lock.credentials).map_err(|err| {
                    ApiError::Internal(format!("failed to serialise credentials: {err}"))
                })?;
                if let Value::Object(fields) = &mut body {
                    fields.insert("credentials".into(), credentials);
                }
                return Ok(Json(body));
            }
            Err(err) if err.is_conflict() => continue,
            Err(err @ StoreError::StaleLease { .. }) => {
                tracing::warn!(container = %uuid, error = %err, "rejected a lock from a dispatcher that lost its lease");
                return Err(ApiError::Conflict(format!(
                    "cannot lock container {uuid}: {err}; another dispatcher is active, so this one must stop dispatching"
                )));
            }
            Err(err) => return Err(ApiError::store("lock a container")(err)),
        }
    }
    Err(conflict(&uuid))
}

/// `POST containers/{uuid}/unlock`.
pub async fn unlock(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(&state, &caller, &uuid).await?;
        check_may_dispatch(&caller, "unlock")?;
        let change = lifecycle::unlock_container(
            &caller,
            &current.record,
            state.max_dispatch_attempts(),
            chrono::Utc::now(),
        )?;
        match store_change(&state, &current, change, None).await {
            Ok(stored) => return Ok(Json(render::record(KIND, &stored.record, None)?)),
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("unlock a container")(err)),
        }
    }
    Err(conflict(&uuid))
}

/// Loads a container's secrets for its own token while it is Locked or
/// Running. Other callers who may read the container get 403, and the rest
/// 404.
async fn load_own_secrets(
    state: &AppState,
    caller: &Caller,
    uuid: &str,
    secret_name: &str,
) -> Result<(Container, Secrets), ApiError> {
    let container = load_visible(state, caller, uuid).await?.record;
    if caller.container_uuid.as_deref() != Some(uuid) {
        return Err(ApiError::Forbidden(format!(
            "only the token of container {uuid} may read its {secret_name}"
        )));
    }
    if !matches!(
        container.state,
        ContainerState::Locked | ContainerState::Running
    ) {
        return Err(ApiError::Forbidden(format!(
            "container {uuid} is {}: a container's secrets are given only while it is Locked or Running",
            container.state
        )));
    }
    let secrets = state
        .store()
        .get_container_secrets(uuid)
        .await
        .map_err(ApiError::store("read a container's secrets"))?
        .ok_or_else(|| ApiError::not_found("container", uuid))?
        .record;
    Ok((container, secrets))
}

/// Builds a JSON response that no cache may keep.
fn uncached(body: Value) -> Response {
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET containers/{uuid}/secret_mounts`: `{"secret_mounts": {...}}`, for
/// the container's own token while it is Locked or Running.
pub async fn secret_mounts(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
) -> Result<Response, ApiError> {
    let (_, secrets) = load_own_secrets(&state, &caller, &uuid, "secret mounts").await?;
    let body = serde_json::json!({ "secret_mounts": secrets.secret_mounts });
    tracing::info!(
        container = %uuid,
        secret_mounts = secrets.secret_mounts.len(),
        "gave a container its secret mounts"
    );
    Ok(uncached(body))
}

/// `GET containers/{uuid}/runtime_token`: `{"runtime_token": TOKEN}` (null
/// when the request gave none), for the container's own token while it is
/// Locked or Running, and only when the container has API access
/// (`runtime_constraints.API`): its processes then use this token instead
/// of the container's own. A Berth route.
pub async fn runtime_token(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
) -> Result<Response, ApiError> {
    let (container, secrets) = load_own_secrets(&state, &caller, &uuid, "runtime token").await?;
    if !container.runtime_constraints.api {
        return Err(ApiError::Forbidden(format!(
            "container {uuid} has no API access (runtime_constraints.API is false), so its runtime token is not given out"
        )));
    }
    let token = secrets
        .runtime_token
        .as_ref()
        .map(|token| token.expose().to_string());
    tracing::info!(
        container = %uuid,
        has_runtime_token = token.is_some(),
        "gave a container its runtime token"
    );
    Ok(uncached(serde_json::json!({ "runtime_token": token })))
}
