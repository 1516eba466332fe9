//! `container_requests`: create, get, list, update, delete, and the status
//! of a request's container.
//!
//! Owners and administrators reach a request; container tokens reach none.
//! A commit takes an existing container that runs the same thing (when the
//! request allows reuse, see [`crate::reuse`]) or creates one, in the same
//! transaction, and every change recomputes that container's priority.
//!
//! `secret_mounts` and `runtime_token` are accepted on create and update
//! and never returned: responses render the record, which does not carry
//! them. A runtime token is checked with the store when it is set and when
//! the request commits, and the new container then runs as its user.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use berth_core::ContainerRequest;
use serde_json::{json, Value};

use super::params::{self, Params};
use super::rejection::PathParams;
use super::{render, AppState, MAX_WRITE_ATTEMPTS};
use crate::auth::{check_runtime_token, system_user_uuid, Caller};
use crate::error::ApiError;
use crate::lifecycle;
use crate::reuse::{self, reuse_key};
use crate::store::{RequestWrite, Secrets, Versioned, Visibility, REQUEST_COLUMNS};

pub const KIND: &str = "arvados#containerRequest";
const LIST_KIND: &str = "arvados#containerRequestList";
const TABLE: &str = "container_requests";
const WRAPPER: &str = "container_request";

fn reject_container_token(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_container_token() {
        return Err(ApiError::Forbidden(
            "a container token reaches only its own container, not container requests".into(),
        ));
    }
    Ok(())
}

/// Loads a request the caller may read; others are not found.
async fn load_visible(
    state: &AppState,
    caller: &Caller,
    uuid: &str,
) -> Result<Versioned<ContainerRequest>, ApiError> {
    reject_container_token(caller)?;
    let stored = state
        .store()
        .get_request(uuid)
        .await
        .map_err(ApiError::store("read a container request"))?
        .filter(|stored| caller.is_admin || stored.record.owner_uuid == caller.user_uuid);
    stored.ok_or_else(|| ApiError::not_found("container request", uuid))
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
    reject_container_token(caller)?;
    let visibility = if caller.is_admin {
        Visibility::All
    } else {
        Visibility::User(caller.user_uuid.clone())
    };
    let query = params::list_query(REQUEST_COLUMNS, TABLE, params, visibility)?;
    let select = params::select(REQUEST_COLUMNS, params)?;
    let page = state
        .store()
        .list_requests(&query)
        .await
        .map_err(ApiError::store("list container requests"))?;
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

/// `POST container_requests`: a create, or a list when the method is
/// overridden to GET.
pub async fn create_or_list(
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
    reject_container_token(&caller)?;
    let attributes = params::attributes(&headers, &params, &body, WRAPPER, REQUEST_COLUMNS)?;
    let select = params::select(REQUEST_COLUMNS, &params)?;
    let cluster = &state.cluster().cluster_id;
    let mut template = lifecycle::create_request(cluster, &caller, attributes, chrono::Utc::now())?;
    apply_runtime_token(&state, &caller, &mut template).await?;
    let owner = &template.record.owner_uuid;
    if *owner != caller.user_uuid && *owner != system_user_uuid(cluster) {
        let exists = state
            .store()
            .get_user(owner)
            .await
            .map_err(ApiError::store("look up a user"))?
            .is_some();
        if !exists {
            return Err(ApiError::invalid(format!(
                "owner_uuid {owner:?} is not a user of this cluster"
            )));
        }
    }
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let mut change = template.clone();
        reuse_if_possible(&state, &mut change).await?;
        let inserted = state
            .store()
            .insert_request(
                &change.record,
                &change.secrets,
                change.new_container.as_ref(),
                change.reused_container.as_ref(),
                change.passed_over.as_deref(),
            )
            .await;
        let stored = match inserted {
            Ok(stored) => stored,
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("store a container request")(err)),
        };
        tracing::info!(
            request = %stored.record.uuid,
            container = stored.record.container_uuid.as_deref().unwrap_or(""),
            reused = change.reused_container.is_some(),
            state = %stored.record.state,
            "created a container request"
        );
        return Ok(Json(render::record(
            KIND,
            &stored.record,
            select.as_deref(),
        )?));
    }
    Err(ApiError::Conflict(
        "the container this request would reuse kept changing: try again".into(),
    ))
}

/// Checks the runtime token of a change when it is set or the request
/// commits, and makes the new container run as the token's user with the
/// token's scopes.
async fn apply_runtime_token(
    state: &AppState,
    caller: &Caller,
    change: &mut lifecycle::RequestChange,
) -> Result<(), ApiError> {
    if !change.check_runtime_token {
        return Ok(());
    }
    let Some(token) = &change.secrets.runtime_token else {
        return Ok(());
    };
    let identity = check_runtime_token(state, caller, token).await?;
    if let Some(container) = &mut change.new_container {
        container.runtime_user_uuid = Some(identity.user_uuid);
        container.runtime_auth_scopes = identity.scopes;
    }
    Ok(())
}

/// Reads the secrets of a request at the version its record was read at.
/// Returns `None` when the request changed in between, so that the caller
/// reads both again.
async fn load_secrets(
    state: &AppState,
    current: &Versioned<ContainerRequest>,
) -> Result<Option<Secrets>, ApiError> {
    let uuid = &current.record.uuid;
    let stored = state
        .store()
        .get_request_secrets(uuid)
        .await
        .map_err(ApiError::store("read a container request's secrets"))?
        .ok_or_else(|| ApiError::not_found("container request", uuid))?;
    Ok((stored.version == current.version).then_some(stored.record))
}

/// Lets a committing request with `use_existing` take an existing
/// container that runs the same thing, instead of the new one built for
/// it.
async fn reuse_if_possible(
    state: &AppState,
    change: &mut lifecycle::RequestChange,
) -> Result<(), ApiError> {
    let Some(container) = &change.new_container else {
        return Ok(());
    };
    if !change.record.use_existing {
        return Ok(());
    }
    let candidates = state
        .store()
        .reusable_containers(&reuse_key(container, &change.secrets.secret_mounts))
        .await
        .map_err(ApiError::store("find a container to reuse"))?;
    match reuse::choose(&change.record, &candidates) {
        Some(existing) => lifecycle::take_existing(change, existing),
        None => {
            change.passed_over = Some(
                candidates
                    .iter()
                    .map(|candidate| candidate.record.uuid.clone())
                    .collect(),
            )
        }
    }
    Ok(())
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let params = Params::from_query(query.as_deref());
    let select = params::select(REQUEST_COLUMNS, &params)?;
    let stored = load_visible(&state, &caller, &uuid).await?;
    Ok(Json(render::record(
        KIND,
        &stored.record,
        select.as_deref(),
    )?))
}

/// `PUT` and `PATCH container_requests/{uuid}`.
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
        REQUEST_COLUMNS,
    )
    .await?;
    let cluster = &state.cluster().cluster_id;

    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(&state, &caller, &uuid).await?;
        let Some(secrets) = load_secrets(&state, &current).await? else {
            continue;
        };
        let mut change = lifecycle::update_request(
            cluster,
            &caller,
            &current.record,
            &secrets,
            attributes.clone(),
            chrono::Utc::now(),
        )?;
        apply_runtime_token(&state, &caller, &mut change).await?;
        reuse_if_possible(&state, &mut change).await?;
        if !change.changed {
            return Ok(Json(render::record(
                KIND,
                &current.record,
                select.as_deref(),
            )?));
        }
        let write = RequestWrite {
            record: change.record,
            expected_version: current.version,
            new_container: change.new_container,
            reused_container: change.reused_container,
            passed_over: change.passed_over,
            secrets: change.secrets,
        };
        match state.store().update_request(&write).await {
            Ok(stored) => {
                if stored.record.state != current.record.state {
                    tracing::info!(
                        request = %uuid,
                        container = stored.record.container_uuid.as_deref().unwrap_or(""),
                        from = %current.record.state,
                        to = %stored.record.state,
                        "container request changed state"
                    );
                }
                return Ok(Json(render::record(
                    KIND,
                    &stored.record,
                    select.as_deref(),
                )?));
            }
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("update a container request")(err)),
        }
    }
    Err(ApiError::Conflict(format!(
        "container request {uuid} kept changing while it was being updated: try again"
    )))
}

/// `DELETE container_requests/{uuid}`: sets the request's priority to 0
/// (so its container stops unless another request wants it), then deletes
/// it, in one transaction. Returns the request as it was last, with
/// priority 0.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(&state, &caller, &uuid).await?;
        match state.store().delete_request(&uuid, current.version).await {
            Ok(()) => {
                tracing::info!(
                    request = %uuid,
                    container = current.record.container_uuid.as_deref().unwrap_or(""),
                    "deleted a container request"
                );
                let mut record = current.record;
                record.priority = 0;
                return Ok(Json(render::record(KIND, &record, None)?));
            }
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("delete a container request")(err)),
        }
    }
    Err(ApiError::Conflict(format!(
        "container request {uuid} kept changing while it was being deleted: try again"
    )))
}

/// `GET container_requests/{uuid}/container_status`: the state and exit
/// code of the request's container.
pub async fn container_status(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    let request = load_visible(&state, &caller, &uuid).await?.record;
    let container = match &request.container_uuid {
        Some(container_uuid) => state
            .store()
            .get_container(container_uuid)
            .await
            .map_err(ApiError::store("read a container"))?,
        None => None,
    };
    let body = match container {
        Some(container) => {
            let container = container.record;
            json!({
                "uuid": container.uuid,
                "state": container.state,
                "container_state": container.state,
                "exit_code": container.exit_code,
                "scheduling_status": scheduling_status(&container),
            })
        }
        None => json!({
            "uuid": Value::Null,
            "state": Value::Null,
            "container_state": Value::Null,
            "exit_code": Value::Null,
            "scheduling_status": "No container is assigned.",
        }),
    };
    Ok(Json(body))
}

/// A sentence that says why a container is not running yet, in Arvados's
/// words where Arvados has them; empty once it runs or has ended.
fn scheduling_status(container: &berth_core::Container) -> String {
    use berth_core::records::SCHEDULING_STATUS_KEY;
    use berth_core::ContainerState;

    match container.state {
        ContainerState::Queued if container.priority > 0 => "Waiting in queue.".into(),
        ContainerState::Queued => "On hold: no request wants this container to run.".into(),
        ContainerState::Locked if container.priority == 0 => {
            "Being returned to the queue: no request wants this container to run any more.".into()
        }
        ContainerState::Locked => container
            .runtime_status
            .get(SCHEDULING_STATUS_KEY)
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| "Submitted to the batch system.".into()),
        ContainerState::Running | ContainerState::Complete | ContainerState::Cancelled => {
            String::new()
        }
    }
}
