//! `keep_services/accessible`: where Arvados clients write and read
//! blocks. Berth serves the block routes itself ([`super::blocks`]), so
//! the list holds one service of type `proxy`: the controller at the URL
//! the caller reached it by (or `external_url`). A proxy may store fewer
//! copies than a client asks for, and clients then accept what it
//! reports stored.

use axum::extract::{Request, State};
use axum::Json;
use berth_core::ObjectType;
use serde_json::{json, Value};

use super::discovery::root_url;
use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

const KIND: &str = "arvados#keepService";
const LIST_KIND: &str = "arvados#keepServiceList";

/// `GET keep_services/accessible`.
pub async fn accessible(
    State(state): State<AppState>,
    _caller: Caller,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let (parts, _) = request.into_parts();
    let root = root_url(&state, &parts)?;
    let url = url::Url::parse(&root)
        .map_err(|err| ApiError::Internal(format!("invalid controller URL {root:?}: {err}")))?;
    let host = url
        .host_str()
        .ok_or_else(|| ApiError::Internal(format!("the controller URL {root:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url
        .port_or_known_default()
        .ok_or_else(|| ApiError::Internal(format!("the controller URL {root:?} has no port")))?;
    let cluster = &state.cluster().cluster_id;
    let service = json!({
        "kind": KIND,
        "uuid": format!("{cluster}-{}-000000000000000", ObjectType::KeepService.code()),
        "service_host": host,
        "service_port": port,
        "service_ssl_flag": url.scheme() == "https",
        "service_type": "proxy",
        "read_only": false,
    });
    Ok(Json(json!({
        "kind": LIST_KIND,
        "etag": "",
        "self_link": "",
        "offset": 0,
        "limit": 1,
        "items": [service],
        "items_available": 1,
    })))
}
