//! `users/current` and `api_client_authorizations/current`: who the
//! caller's token acts as.
//!
//! A user record carries the fields Arvados clients read (`email`,
//! `first_name`, `last_name`, `prefs` among them), even those Berth does
//! not keep.

use axum::extract::State;
use axum::Json;
use berth_core::time;
use serde_json::{json, Value};

use super::render;
use super::AppState;
use crate::auth::{system_user_uuid, Caller};
use crate::error::ApiError;

/// `GET users/current`.
pub async fn current_user(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let cluster = &state.cluster().cluster_id;
    let system_uuid = system_user_uuid(cluster);
    let fields = if caller.user_uuid == system_uuid {
        json!({
            "uuid": system_uuid,
            "owner_uuid": system_uuid,
            "username": "root",
            "email": "",
            "full_name": "system user",
            "first_name": "system",
            "last_name": "user",
            "prefs": {},
            "is_admin": true,
            "is_active": true,
            "created_at": Value::Null,
            "modified_at": Value::Null,
        })
    } else {
        let user = state
            .store()
            .get_user(&caller.user_uuid)
            .await
            .map_err(ApiError::store("read a user"))?
            .ok_or_else(|| ApiError::Unauthorized("the token's user no longer exists".into()))?;
        json!({
            "uuid": user.uuid,
            "owner_uuid": system_uuid,
            "username": user.username,
            // Berth keeps no e-mail address or real name, so the
            // username is used as the name.
            "email": "",
            "full_name": user.username,
            "first_name": user.username,
            "last_name": "",
            "prefs": {},
            "is_admin": user.is_admin,
            "is_active": user.is_active,
            "created_at": time::format(&user.created_at),
            "modified_at": time::format(&user.modified_at),
        })
    };
    Ok(Json(render::record("arvados#user", &fields, None)?))
}

/// `GET api_client_authorizations/current`: the token's uuid, user and
/// scopes, never its secret.
pub async fn current_token(caller: Caller) -> Result<Json<Value>, ApiError> {
    let fields = json!({
        "uuid": caller.token_uuid,
        "owner_uuid": caller.user_uuid,
        "scopes": caller.scopes,
        "container_uuid": caller.container_uuid,
    });
    Ok(Json(render::record(
        "arvados#apiClientAuthorization",
        &fields,
        None,
    )?))
}
