//! Errors that arise outside the handlers' own checks, in the API's
//! `{"errors": [...]}` shape: path parameters axum cannot decode, the
//! request timeout, and any other plain-text error response.
//!
//! [`PathParams`] replaces axum's `Path` in the handlers. [`enforce_timeout`]
//! is the request timeout: it returns 408 when the client has not sent the
//! whole body in time and 503 when the controller itself was too slow.
//! [`errors_as_json`] is the last guard: it rewrites an error response
//! that is not JSON, such as a rejection of an axum extractor, into the
//! API's shape and keeps its status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest plain-text error body [`errors_as_json`] reads; a longer one is
/// replaced by the status's reason phrase.
const MAX_PLAIN_ERROR_BYTES: usize = 64 * 1024;

/// The path parameters of a route, as axum's `Path` extracts them, with
/// failures returned as [`ApiError`]s.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<T, S> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(params)) => Ok(PathParams(params)),
            Err(rejection) => Err(path_error(rejection)),
        }
    }
}

/// Converts a `Path` rejection. A parameter that is not UTF-8 cannot name
/// any record, so it is not found, like any other unknown uuid.
fn path_error(rejection: PathRejection) -> ApiError {
    match rejection {
        PathRejection::FailedToDeserializePathParams(err) => match err.kind() {
            ErrorKind::InvalidUtf8InPathParam { key } => ApiError::NotFound(format!(
                "Path not found: the {key} in the path is not valid UTF-8"
            )),
            ErrorKind::WrongNumberOfParameters { .. } | ErrorKind::UnsupportedType { .. } => {
                ApiError::Internal(format!("failed to read the path parameters: {err}"))
            }
            _ => ApiError::invalid(format!("invalid path parameter: {err}")),
        },
        other => ApiError::Internal(format!(
            "failed to read the path parameters: {}",
            other.body_text()
        )),
    }
}

/// Fails a request that takes longer than `timeout`. When the handler was
/// then waiting for more of the request body, the client is at fault and
/// gets 408; otherwise the controller was too slow and it is 503.
pub async fn enforce_timeout(
    State(timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    let waiting_for_body = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| watch_body(body, waiting_for_body.clone()));
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) if waiting_for_body.load(Ordering::Relaxed) => {
            ApiError::RequestTimeout(format!(
                "timed out after {} s waiting for the request body: send the whole body without pausing",
                timeout.as_secs()
            ))
            .into_response()
        }
        Err(_) => ApiError::Unavailable(format!(
            "the request timed out after {} s in the controller: try again later",
            timeout.as_secs()
        ))
        .into_response(),
    }
}

/// Wraps a request body so that `waiting` is true while a read of it is
/// pending, that is while the handler waits for the client's next bytes.
fn watch_body(body: Body, waiting: Arc<AtomicBool>) -> Body {
    let mut data = body.into_data_stream();
    Body::from_stream(futures::stream::poll_fn(move |cx| {
        let poll = data.poll_next_unpin(cx);
        waiting.store(poll.is_pending(), Ordering::Relaxed);
        poll
    }))
}

/// Rewrites an error response whose body is not JSON into
/// `{"errors": [body text]}`, keeping its status and other headers.
pub async fn errors_as_json(response: Response) -> Response {
    let status = response.status();
    if !status.is_client_error() && !status.is_server_error() {
        return response;
    }
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        return response;
    }

    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_PLAIN_ERROR_BYTES).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    tracing::debug!(status = status.as_u16(), error = %message, "request rejected");
    let body = serde_json::json!({ "errors": [message] }).to_string();
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn plain_error_becomes_json() {
        let plain = (StatusCode::BAD_REQUEST, "Invalid URL: something").into_response();
        let response = errors_as_json(plain).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            HeaderValue::from_static("application/json")
        );
        assert_eq!(
            body_json(response).await,
            serde_json::json!({"errors": ["Invalid URL: something"]})
        );
    }

    #[tokio::test]
    async fn empty_error_gets_reason_phrase() {
        let empty = StatusCode::SERVICE_UNAVAILABLE.into_response();
        let response = errors_as_json(empty).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body_json(response).await,
            serde_json::json!({"errors": ["Service Unavailable"]})
        );
    }

    #[tokio::test]
    async fn success_and_json_errors_pass_unchanged() {
        let ok = (StatusCode::OK, "raw log bytes").into_response();
        let response = errors_as_json(ok).await;
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"raw log bytes");

        let json = ApiError::invalid("bad").into_response();
        let response = errors_as_json(json).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body_json(response).await,
            serde_json::json!({"errors": ["bad"]})
        );
    }
}
