//! Live container logs: `containers/{uuid}/log/{stream}`.
//!
//! The supervisor appends each stream's raw bytes with `POST ...?offset=N`.
//! Bytes the store already has are skipped when they are the same, so a
//! retry after a lost response writes nothing twice. An offset past the end
//! is a gap and is rejected with 422. Sent bytes that differ from the
//! stored bytes at the same offsets are rejected with 409 Conflict, and
//! nothing is written: the message names the first differing byte, and
//! `X-Berth-Log-Size` gives the stream's size, where the writer can append
//! instead.
//!
//! Readers `GET ...?offset=N&wait=SECONDS[&state=STATE]`. With a wait, the
//! request is held until the stream has bytes past N, the container's state
//! differs from STATE (by default, its state when the request arrived),
//! the wait (at most [`MAX_WAIT`]) ends, or the server shuts down. Waiting
//! uses the in-process [`Notifier`](crate::notify::Notifier), not polling.
//!
//! Successful responses and the 409 response carry the stream's size in
//! `X-Berth-Log-Size`. Reads also carry the container's state in
//! `X-Berth-Container-State`.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_core::ContainerState;
use tokio::time::Instant;

use super::containers::load_visible;
use super::params::{self, Params};
use super::rejection::PathParams;
use super::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::{AppendOutcome, LogStream};

/// Maximum time a read may wait for new bytes.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Maximum bytes one read returns.
pub const MAX_READ_BYTES: u64 = 1 << 20;

/// Response header with the stream's size in bytes.
pub const LOG_SIZE_HEADER: &str = "x-berth-log-size";

/// Response header with the container's state.
pub const CONTAINER_STATE_HEADER: &str = "x-berth-container-state";

fn parse_stream(name: &str) -> Result<LogStream, ApiError> {
    LogStream::parse(name).ok_or_else(|| {
        ApiError::invalid(format!(
            "invalid log stream {name:?}: expected stdout, stderr, supervisor or crunchstat"
        ))
    })
}

fn size_header(size: u64) -> HeaderValue {
    HeaderValue::from(size)
}

/// `POST containers/{uuid}/log/{stream}?offset=N` with the raw bytes.
pub async fn append(
    State(state): State<AppState>,
    caller: Caller,
    PathParams((uuid, stream)): PathParams<(String, String)>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let stream = parse_stream(&stream)?;
    let params = Params::from_query(query.as_deref());
    load_visible(&state, &caller, &uuid).await?;
    if !caller.is_admin && caller.container_uuid.as_deref() != Some(uuid.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "only the token of container {uuid} and administrators may append to its logs"
        )));
    }
    let offset = params.u64("offset")?.ok_or_else(|| {
        ApiError::invalid(
            "offset is missing: give the byte offset the data starts at, as ?offset=N",
        )
    })?;
    let data =
        params::read_body(&headers, body, state.max_log_chunk_bytes(), "the log chunk").await?;

    let outcome = state
        .store()
        .append_log(&uuid, stream, offset, &data)
        .await
        .map_err(ApiError::store("append to a log"))?;
    let size = match outcome {
        AppendOutcome::Gap { size } => {
            return Err(ApiError::invalid(format!(
                "offset {offset} is past the end of the {} log of container {uuid}, which has {size} bytes: append from offset {size}",
                stream.as_str()
            )))
        }
        AppendOutcome::Mismatch { size, position } => {
            let mut response = ApiError::Conflict(format!(
                "the bytes sent for the {} log of container {uuid} at offset {offset} differ from the stored bytes, first at byte {position}: nothing was written; the log has {size} bytes, so append new bytes from offset {size}",
                stream.as_str()
            ))
            .into_response();
            response
                .headers_mut()
                .insert(LOG_SIZE_HEADER, size_header(size));
            return Ok(response);
        }
        AppendOutcome::Appended { size, added } => {
            if added > 0 {
                state.notifier().notify(&uuid);
            }
            size
        }
    };
    let mut response = Json(serde_json::json!({ "size": size })).into_response();
    response
        .headers_mut()
        .insert(LOG_SIZE_HEADER, size_header(size));
    Ok(response)
}

/// `GET containers/{uuid}/log/{stream}?offset=N&wait=SECONDS&state=STATE`.
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    PathParams((uuid, stream)): PathParams<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let stream = parse_stream(&stream)?;
    let params = Params::from_query(query.as_deref());
    let offset = params.u64("offset")?.unwrap_or(0);
    let wait = params
        .seconds("wait")?
        // Capped before the conversion, which panics on values too large
        // for a Duration.
        .map(|seconds| Duration::from_secs_f64(seconds.min(MAX_WAIT.as_secs_f64())))
        .unwrap_or(Duration::ZERO);

    // Subscribe before reading, so a change between the read and the wait
    // still wakes this request.
    let mut changes = state.notifier().subscribe(&uuid);
    let mut shutdown = state.shutdown_receiver();
    let container = load_visible(&state, &caller, &uuid).await?;
    // A reader that names the state it last saw is answered at once when
    // the container has left that state since, even if the change came
    // before this request subscribed.
    let first_state = match params.text("state") {
        Some(text) => text
            .parse::<ContainerState>()
            .map_err(|message| ApiError::invalid(format!("invalid state parameter: {message}")))?,
        None => container.record.state,
    };
    let mut container_state = container.record.state;
    let mut size = log_size(&state, &uuid, stream).await?;
    if offset > size {
        return Err(ApiError::invalid(format!(
            "offset {offset} is past the end of the {} log of container {uuid}, which has {size} bytes",
            stream.as_str()
        )));
    }

    let deadline = Instant::now() + wait;
    let may_wait = !wait.is_zero() && !container_state.is_final();
    while may_wait && size <= offset && container_state == first_state && !*shutdown.borrow() {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = shutdown.changed() => break,
        }
        size = log_size(&state, &uuid, stream).await?;
        container_state = current_state(&state, &uuid)
            .await?
            .unwrap_or(container_state);
    }

    let (data, size) = state
        .store()
        .read_log(&uuid, stream, offset, MAX_READ_BYTES)
        .await
        .map_err(ApiError::store("read a log"))?;
    let mut response = Response::new(Body::from(data));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(LOG_SIZE_HEADER, size_header(size));
    headers.insert(
        CONTAINER_STATE_HEADER,
        HeaderValue::from_static(container_state.as_str()),
    );
    Ok(response)
}

async fn log_size(state: &AppState, uuid: &str, stream: LogStream) -> Result<u64, ApiError> {
    state
        .store()
        .log_size(uuid, stream)
        .await
        .map_err(ApiError::store("read a log's size"))
}

async fn current_state(state: &AppState, uuid: &str) -> Result<Option<ContainerState>, ApiError> {
    Ok(state
        .store()
        .get_container(uuid)
        .await
        .map_err(ApiError::store("read a container"))?
        .map(|stored| stored.record.state))
}
