//! `collections`: create, get (by UUID or portable data hash), list,
//! update and delete.
//!
//! Owners and administrators reach a collection; a container token acts as
//! the user its container runs as. A manifest is validated, stored
//! normalised without permission signatures, and returned with every
//! locator signed for the caller's token, so the caller can read the
//! blocks. A create or update accepts a locator only when it is signed for
//! the caller (see [`crate::blocks::signing`]) and its block is stored, so
//! a collection never names a block its writer could not read or that does
//! not exist. The empty block (`d41d8cd98f00b204e9800998ecf8427e+0`) needs
//! neither.
//!
//! Differences from Arvados: names need not be unique, so
//! `ensure_unique_name` is accepted and changes nothing. A delete removes
//! the record at once, because there is no trash. A get by portable data
//! hash returns the caller's most recently modified collection with that
//! content, under its own UUID.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use berth_core::locator::{Locator, EMPTY_BLOCK_HASH};
use berth_core::manifest::{is_portable_data_hash, Manifest};
use berth_core::{Collection, ObjectType, Uuid};
use serde_json::{Map, Value};

use super::blocks::unix_now;
use super::params::{self, Params};
use super::rejection::PathParams;
use super::{render, AppState, MAX_WRITE_ATTEMPTS};
use crate::auth::{system_user_uuid, Caller};
use crate::error::ApiError;
use crate::store::{Versioned, Visibility, COLLECTION_COLUMNS};

pub const KIND: &str = "arvados#collection";
const LIST_KIND: &str = "arvados#collectionList";
const TABLE: &str = "collections";
const WRAPPER: &str = "collection";

/// Attributes an update may set. A create may also set `owner_uuid`.
const WRITABLE_ATTRIBUTES: &[&str] = &[
    "name",
    "description",
    "properties",
    "manifest_text",
    "portable_data_hash",
    "replication_desired",
    "storage_classes_desired",
];

/// Attributes of the records clients read back and send again; a create
/// or update ignores them when they are null or equal to the record's.
const SERVER_ATTRIBUTES: &[&str] = &[
    "uuid",
    "kind",
    "etag",
    "created_at",
    "modified_at",
    "modified_by_user_uuid",
    "file_count",
    "file_size_total",
];

fn visibility(caller: &Caller) -> Visibility {
    if caller.is_admin {
        Visibility::All
    } else {
        Visibility::User(caller.user_uuid.clone())
    }
}

/// Loads a collection the caller may read, by UUID or (when `by_pdh`) by
/// portable data hash; others are not found.
async fn load_visible(
    state: &AppState,
    caller: &Caller,
    id: &str,
    by_pdh: bool,
) -> Result<Versioned<Collection>, ApiError> {
    let found = if by_pdh && is_portable_data_hash(id) {
        state
            .store()
            .find_collection_by_pdh(id, &visibility(caller))
            .await
            .map_err(ApiError::store("find a collection"))?
    } else {
        state
            .store()
            .get_collection(id)
            .await
            .map_err(ApiError::store("read a collection"))?
            .filter(|stored| caller.is_admin || stored.record.owner_uuid == caller.user_uuid)
    };
    found.ok_or_else(|| ApiError::not_found("collection", id))
}

/// Returns a copy of a collection whose manifest's locators are signed
/// for the caller.
fn signed_for(
    state: &AppState,
    caller: &Caller,
    collection: &Collection,
) -> Result<Collection, ApiError> {
    let manifest = Manifest::parse(&collection.manifest_text).map_err(|err| {
        tracing::error!(collection = %collection.uuid, error = %err, "a stored manifest is invalid");
        ApiError::Internal(format!(
            "the stored manifest of collection {} is invalid",
            collection.uuid
        ))
    })?;
    let now = unix_now();
    let signed =
        manifest.map_locators(|locator| state.signer().sign(locator, &caller.token_uuid, now));
    let mut record = collection.clone();
    record.manifest_text = signed.to_text();
    Ok(record)
}

/// Renders a collection with its locators signed for the caller. The etag
/// is that of the stored record, so it does not change with each
/// signature.
fn render_signed(
    state: &AppState,
    caller: &Caller,
    collection: &Collection,
    select: Option<&[String]>,
) -> Result<Value, ApiError> {
    let mut rendered = render::record(KIND, collection, select)?;
    if let Some(text) = rendered.get_mut("manifest_text") {
        *text = Value::String(signed_for(state, caller, collection)?.manifest_text);
    }
    Ok(rendered)
}

/// Validates a manifest text and checks its locators for the caller:
/// each must carry an unexpired signature for the caller's token and
/// name a stored block. Returns the manifest without signatures.
async fn check_manifest(
    state: &AppState,
    caller: &Caller,
    text: &str,
) -> Result<Manifest, ApiError> {
    let manifest = Manifest::parse(text)
        .map_err(|err| ApiError::invalid(format!("invalid manifest_text: {err}")))?;
    let now = unix_now();
    let mut checked = std::collections::HashSet::new();
    for locator in manifest.locators() {
        if locator.hash() == EMPTY_BLOCK_HASH || !checked.insert(locator.bare()) {
            continue;
        }
        state
            .signer()
            .verify(locator, &caller.token_uuid, now)
            .map_err(|err| ApiError::invalid(format!("invalid manifest_text: {err}")))?;
        let stored = state.blocks().exists(locator.hash()).await.map_err(|err| {
            tracing::error!(block = %locator.bare(), error = %err, "failed to look up a block");
            ApiError::Internal("failed to look up a block".into())
        })?;
        if !stored {
            return Err(ApiError::invalid(format!(
                "invalid manifest_text: block {} is not stored: write it before the collection",
                locator.bare()
            )));
        }
    }
    Ok(manifest.map_locators(Locator::without_signature))
}

fn optional_text(key: &str, value: Value) -> Result<Option<String>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(text)),
        other => Err(ApiError::invalid(format!(
            "invalid {key}: expected a string or null, got {other}"
        ))),
    }
}

/// Applies create or update attributes to a record, except the manifest,
/// which the caller checks with [`check_manifest`]. Returns the new
/// manifest text and the portable data hash the client expects, if given.
fn apply_attributes(
    record: &mut Collection,
    attributes: Map<String, Value>,
    is_create: bool,
) -> Result<(Option<String>, Option<String>), ApiError> {
    let mut manifest_text = None;
    let mut expected_pdh = None;
    for (key, value) in attributes {
        if SERVER_ATTRIBUTES.contains(&key.as_str()) {
            let current = serde_json::to_value(&*record)
                .ok()
                .and_then(|fields| fields.get(&key).cloned());
            if value.is_null() || current.as_ref() == Some(&value) || key == "kind" || key == "etag"
            {
                continue;
            }
            return Err(ApiError::invalid(format!(
                "{key} cannot be set: the controller sets it"
            )));
        }
        let writable =
            WRITABLE_ATTRIBUTES.contains(&key.as_str()) || (is_create && key == "owner_uuid");
        if !writable {
            return Err(ApiError::invalid(format!(
                "unknown or read-only attribute {key:?} for a collection: expected one of {}{}",
                WRITABLE_ATTRIBUTES.join(", "),
                if is_create { ", owner_uuid" } else { "" }
            )));
        }
        match key.as_str() {
            "owner_uuid" => {
                record.owner_uuid = optional_text(&key, value)?
                    .ok_or_else(|| ApiError::invalid("invalid owner_uuid: it cannot be null"))?
            }
            "name" => record.name = optional_text(&key, value)?,
            "description" => record.description = optional_text(&key, value)?,
            "properties" => match value {
                Value::Object(properties) => record.properties = properties,
                Value::Null => record.properties = Map::new(),
                other => {
                    return Err(ApiError::invalid(format!(
                        "invalid properties: expected an object, got {other}"
                    )))
                }
            },
            "manifest_text" => {
                manifest_text = Some(optional_text(&key, value)?.unwrap_or_default());
            }
            "portable_data_hash" => expected_pdh = optional_text(&key, value)?,
            "replication_desired" => match value {
                Value::Null => record.replication_desired = None,
                Value::Number(number) if number.as_i64().is_some_and(|n| n >= 1) => {
                    record.replication_desired = number.as_i64()
                }
                other => {
                    return Err(ApiError::invalid(format!(
                        "invalid replication_desired: expected an integer of 1 or more, or null, got {other}"
                    )))
                }
            },
            "storage_classes_desired" => {
                let classes: Result<Vec<String>, _> = serde_json::from_value(value.clone());
                record.storage_classes_desired = match (value, classes) {
                    (Value::Null, _) => Vec::new(),
                    (_, Ok(classes)) => classes,
                    (other, Err(_)) => {
                        return Err(ApiError::invalid(format!(
                            "invalid storage_classes_desired: expected a list of strings, got {other}"
                        )))
                    }
                }
            }
            _ => {}
        }
    }
    Ok((manifest_text, expected_pdh))
}

/// Sets a record's manifest and the values derived from it, after
/// checking a portable data hash the client sent.
fn set_manifest(
    record: &mut Collection,
    manifest: &Manifest,
    expected_pdh: Option<&str>,
) -> Result<(), ApiError> {
    let pdh = manifest.portable_data_hash();
    if let Some(expected) = expected_pdh {
        if expected != pdh {
            return Err(ApiError::invalid(format!(
                "portable_data_hash {expected:?} does not match the manifest's {pdh}: leave it out, or send the manifest it was computed from"
            )));
        }
    }
    record.manifest_text = manifest.to_text();
    record.portable_data_hash = pdh;
    record.file_count = i64::try_from(manifest.files().len()).unwrap_or(i64::MAX);
    record.file_size_total =
        i64::try_from(manifest.files().iter().map(|file| file.size()).sum::<u64>())
            .unwrap_or(i64::MAX);
    Ok(())
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
    let query = params::list_query(COLLECTION_COLUMNS, TABLE, params, visibility(caller))?;
    let select = params::select(COLLECTION_COLUMNS, params)?;
    let page = state
        .store()
        .list_collections(&query)
        .await
        .map_err(ApiError::store("list collections"))?;
    let items = page
        .items
        .iter()
        .map(|item| render_signed(state, caller, &item.record, select.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let body = render::list_of(
        LIST_KIND,
        items,
        page.items_available,
        query.offset,
        query.limit,
    );
    Ok(Json(body))
}

/// `POST collections`: a create, or a list when the method is overridden
/// to GET.
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
    let attributes = params::attributes(&headers, &params, &body, WRAPPER, COLLECTION_COLUMNS)?;
    let select = params::select(COLLECTION_COLUMNS, &params)?;

    let cluster = &state.cluster().cluster_id;
    let now = chrono::Utc::now();
    let mut record = Collection {
        uuid: Uuid::generate(cluster, ObjectType::Collection).to_string(),
        owner_uuid: caller.user_uuid.clone(),
        created_at: now,
        modified_at: now,
        modified_by_user_uuid: Some(caller.user_uuid.clone()),
        name: None,
        description: None,
        properties: Map::new(),
        portable_data_hash: String::new(),
        manifest_text: String::new(),
        replication_desired: None,
        storage_classes_desired: Vec::new(),
        file_count: 0,
        file_size_total: 0,
    };
    let (manifest_text, expected_pdh) = apply_attributes(&mut record, attributes, true)?;
    check_owner(&state, &caller, &record.owner_uuid).await?;
    let manifest = check_manifest(&state, &caller, manifest_text.as_deref().unwrap_or("")).await?;
    set_manifest(&mut record, &manifest, expected_pdh.as_deref())?;

    let stored = state
        .store()
        .insert_collection(&record)
        .await
        .map_err(ApiError::store("store a collection"))?;
    tracing::info!(
        collection = %stored.record.uuid,
        portable_data_hash = %stored.record.portable_data_hash,
        owner = %stored.record.owner_uuid,
        "created a collection"
    );
    Ok(Json(render_signed(
        &state,
        &caller,
        &stored.record,
        select.as_deref(),
    )?))
}

/// Checks that a caller may give a collection to `owner`: themselves, or
/// any user of the cluster for an administrator.
async fn check_owner(state: &AppState, caller: &Caller, owner: &str) -> Result<(), ApiError> {
    if owner == caller.user_uuid {
        return Ok(());
    }
    if !caller.is_admin {
        return Err(ApiError::Forbidden(format!(
            "only an administrator may create a collection owned by another user ({owner})"
        )));
    }
    if owner == system_user_uuid(&state.cluster().cluster_id) {
        return Ok(());
    }
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
    Ok(())
}

/// `GET collections/{uuid or portable data hash}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(id): PathParams<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let params = Params::from_query(query.as_deref());
    let select = params::select(COLLECTION_COLUMNS, &params)?;
    let stored = load_visible(&state, &caller, &id, true).await?;
    Ok(Json(render_signed(
        &state,
        &caller,
        &stored.record,
        select.as_deref(),
    )?))
}

/// `PUT` and `PATCH collections/{uuid}`.
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
        COLLECTION_COLUMNS,
    )
    .await?;
    let manifest = match attributes.get("manifest_text") {
        Some(value) => {
            let text = optional_text("manifest_text", value.clone())?.unwrap_or_default();
            Some(check_manifest(&state, &caller, &text).await?)
        }
        None => None,
    };
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(&state, &caller, &uuid, false).await?;
        let mut record = current.record.clone();
        let (_, expected_pdh) = apply_attributes(&mut record, attributes.clone(), false)?;
        if let Some(manifest) = &manifest {
            set_manifest(&mut record, manifest, expected_pdh.as_deref())?;
        } else if let Some(expected) = expected_pdh {
            if expected != record.portable_data_hash {
                return Err(ApiError::invalid(format!(
                    "portable_data_hash {expected:?} does not match the collection's {}: send manifest_text to change the content",
                    record.portable_data_hash
                )));
            }
        }
        if record == current.record {
            return Ok(Json(render_signed(
                &state,
                &caller,
                &record,
                select.as_deref(),
            )?));
        }
        record.modified_at = chrono::Utc::now();
        record.modified_by_user_uuid = Some(caller.user_uuid.clone());
        match state
            .store()
            .update_collection(&record, current.version)
            .await
        {
            Ok(stored) => {
                tracing::info!(
                    collection = %uuid,
                    portable_data_hash = %stored.record.portable_data_hash,
                    "updated a collection"
                );
                return Ok(Json(render_signed(
                    &state,
                    &caller,
                    &stored.record,
                    select.as_deref(),
                )?));
            }
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("update a collection")(err)),
        }
    }
    Err(ApiError::Conflict(format!(
        "collection {uuid} kept changing while it was being updated: try again"
    )))
}

/// `DELETE collections/{uuid}`: removes the record and returns it. The
/// blocks stay in the block store.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    PathParams(uuid): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let current = load_visible(&state, &caller, &uuid, false).await?;
        match state
            .store()
            .delete_collection(&uuid, current.version)
            .await
        {
            Ok(()) => {
                tracing::info!(collection = %uuid, "deleted a collection");
                return Ok(Json(render_signed(&state, &caller, &current.record, None)?));
            }
            Err(err) if err.is_conflict() => continue,
            Err(err) => return Err(ApiError::store("delete a collection")(err)),
        }
    }
    Err(ApiError::Conflict(format!(
        "collection {uuid} kept changing while it was being deleted: try again"
    )))
}
