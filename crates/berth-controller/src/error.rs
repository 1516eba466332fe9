//! The API's one error type, [`ApiError`]: each variant is an HTTP status
//! with messages for the client, rendered as `{"errors": [...]}`.
//!
//! A caller's mistake is a 4xx whose message says what was wrong and how to
//! fix it. A failure of the controller itself (the store) is a 500: the
//! client sees a short message, and the details are logged once, here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_core::state::TransitionError;
use berth_core::validate::FieldError;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: no token, or one that is not valid.
    #[error("Not logged in: {0}")]
    Unauthorized(String),
    /// 403: the caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such record, or one the caller may not read.
    #[error("{0}")]
    NotFound(String),
    /// 405: the path exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 408: the client did not send the whole request body in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// 409: the record kept changing while it was being updated, or a log
    /// append sent bytes that differ from the stored ones.
    #[error("{0}")]
    Conflict(String),
    /// 413: a body larger than the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 422: invalid input, a forbidden state transition, a failed lock.
    #[error("{}", .0.join("; "))]
    Unprocessable(Vec<String>),
    /// 500: the store failed.
    #[error("failed to {action}: {source}")]
    Store {
        action: &'static str,
        #[source]
        source: StoreError,
    },
    /// 500: a fault of the controller that is not the store's.
    #[error("internal error: {0}")]
    Internal(String),
    /// 503: the controller did not finish the request in time.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::Unprocessable(vec![message.into()])
    }

    pub fn not_found(kind: &str, uuid: &str) -> ApiError {
        ApiError::NotFound(format!("{kind} {uuid} not found"))
    }

    /// Wraps a store failure, naming what the controller was doing.
    pub fn store(action: &'static str) -> impl FnOnce(StoreError) -> ApiError {
        move |source| ApiError::Store { action, source }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_)
            | ApiError::Store {
                source: StoreError::NulCharacter { .. },
                ..
            } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Store { .. } | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Returns the messages sent to the client.
    fn messages(&self) -> Vec<String> {
        match self {
            ApiError::Unprocessable(messages) => messages.clone(),
            ApiError::Store {
                source: source @ StoreError::NulCharacter { .. },
                ..
            } => vec![source.to_string()],
            ApiError::Store { action, .. } => {
                vec![format!(
                    "internal error: failed to {action}; the controller's log has the details"
                )]
            }
            other => vec![other.to_string()],
        }
    }
}

impl From<TransitionError> for ApiError {
    fn from(err: TransitionError) -> ApiError {
        ApiError::invalid(err.to_string())
    }
}

impl From<Vec<FieldError>> for ApiError {
    fn from(errors: Vec<FieldError>) -> ApiError {
        ApiError::Unprocessable(errors.iter().map(FieldError::to_string).collect())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %error_chain(&self), "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request rejected");
        }
        let body = serde_json::json!({ "errors": self.messages() });
        (status, Json(body)).into_response()
    }
}

/// Formats an error and its sources, joined by ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
