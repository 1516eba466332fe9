//! The block routes, in the Keep protocol that Arvados clients speak to a
//! Keep proxy: `PUT /<md5>` writes a block and returns its signed locator,
//! `GET /<locator>` (and `HEAD`) reads one. They sit at the root of the
//! server because clients join the locator to the service URL that
//! `keep_services/accessible` returns.
//!
//! Both need a token. A write checks the body's size against
//! `blocks.max_block_bytes` (413) and its MD5 against the path (422). A
//! read needs a locator signed for the caller's token (403 otherwise): the
//! one a write returned, or one from a collection the caller read.
//!
//! NOTE: `request_timeout_seconds` (60 s by default) also bounds a block
//! write, so a client must send a 64 MiB block at about 1.1 MB/s or more.

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_core::locator::{is_md5_hex, Locator, EMPTY_BLOCK_HASH};
use berth_core::manifest::hex_md5;

use super::params;
use super::rejection::PathParams;
use super::AppState;
use crate::auth::{self, Caller};
use crate::blocks::BlockError;
use crate::error::{error_chain, ApiError};

/// Seconds since the Unix epoch, the clock of permission signatures.
pub(crate) fn unix_now() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0)
}

/// Parses the path of a block route. A path that does not start with an
/// MD5 is not a block route at all, so it is not found.
fn parse_path(path: &str) -> Result<Locator, ApiError> {
    if path.len() < 32 || !is_md5_hex(&path[..32]) {
        return Err(ApiError::NotFound(format!("Path not found: /{path}")));
    }
    if path.len() == 32 {
        return Locator::new(path, 0).map_err(|err| ApiError::invalid(err.to_string()));
    }
    Locator::parse(path).map_err(|err| ApiError::invalid(err.to_string()))
}

fn block_error(action: &'static str, err: BlockError) -> ApiError {
    tracing::error!(error = %error_chain(&err), "failed to {action}");
    ApiError::Internal(format!("failed to {action}"))
}

/// Authenticates the caller of a block route. The path is checked first,
/// so that a path that is no block is not found, with or without a token.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let header = headers
        .get(AUTHORIZATION)
        .map(|value| {
            value
                .to_str()
                .map_err(|_| ApiError::Unauthorized("the Authorization header is not ASCII".into()))
        })
        .transpose()?;
    auth::authenticate(state, header).await
}

/// `PUT /<md5>` or `PUT /<md5>+<size>`: stores the body as a block.
pub async fn put(
    State(state): State<AppState>,
    PathParams(path): PathParams<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let named = parse_path(&path)?;
    let caller = authenticate(&state, &headers).await?;
    let limit = state.max_block_bytes();
    let data = params::read_body(&headers, body, limit, "the block").await?;

    let hash = named.hash();
    let actual = hex_md5(&data);
    if actual != hash {
        return Err(ApiError::invalid(format!(
            "the block's MD5 is {actual}, but the path names {hash}: send the block's bytes unchanged"
        )));
    }
    if path.len() > 32 && named.size() != data.len() as u64 {
        return Err(ApiError::invalid(format!(
            "invalid block size: the body has {} bytes, but the locator {} says {}",
            data.len(),
            named.bare(),
            named.size()
        )));
    }

    let size = data.len() as u64;
    state
        .blocks()
        .put(hash, data)
        .await
        .map_err(|err| block_error("store a block", err))?;
    let locator = Locator::new(hash, size).map_err(|err| ApiError::Internal(err.to_string()))?;
    let signed = state
        .signer()
        .sign(&locator, &caller.token_uuid, unix_now());
    tracing::debug!(block = %locator, user = %caller.user_uuid, "stored a block");

    let mut response = (StatusCode::OK, signed.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert("x-keep-replicas-stored", HeaderValue::from_static("1"));
    headers.insert(
        "x-keep-storage-classes-confirmed",
        HeaderValue::from_static("default=1"),
    );
    Ok(response)
}

/// `GET /<locator>` (and `HEAD`): returns a block's bytes.
pub async fn get(
    State(state): State<AppState>,
    PathParams(path): PathParams<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let locator = parse_path(&path)?;
    let caller = authenticate(&state, &headers).await?;
    state
        .signer()
        .verify(&locator, &caller.token_uuid, unix_now())
        .map_err(|err| ApiError::Forbidden(err.to_string()))?;
    let data = if locator.hash() == EMPTY_BLOCK_HASH {
        Some(bytes::Bytes::new())
    } else {
        state
            .blocks()
            .get(locator.hash())
            .await
            .map_err(|err| block_error("read a block", err))?
    };
    let data = data
        .filter(|data| data.len() as u64 == locator.size())
        .ok_or_else(|| ApiError::NotFound(format!("block {} not found", locator.bare())))?;
    let length = data.len();
    let mut response = (StatusCode::OK, data).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}
