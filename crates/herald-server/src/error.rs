//! [`ApiError`]: every failure the HTTP API reports, rendered as the JSON error body with the
//! status of its `herald_core::ErrorCode`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::{ContinuityLost, ErrorCode, InvalidInput};
use herald_log::{AppendError, ReadError, StoreError};
use herald_protocol::ErrorBody;

use crate::auth::Denied;

#[derive(Debug)]
/// Boxed: error paths are rare and `Result<_, ApiError>` stays small on the happy path.
pub struct ApiError(pub Box<ErrorBody>);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorBody::new(code, message)))
    }

    pub fn code(&self) -> &str {
        &self.0.error.code
    }

    fn continuity_lost(lost: &ContinuityLost) -> Self {
        Self(Box::new(ErrorBody::continuity_lost(lost)))
    }
}

impl From<InvalidInput> for ApiError {
    fn from(invalid: InvalidInput) -> Self {
        Self::new(invalid.code, invalid.message)
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        Self::new(denied.code, denied.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let code = match &error {
            StoreError::Io { .. } | StoreError::Poisoned(_) => ErrorCode::StorageFailed,
            _ => ErrorCode::Internal,
        };
        tracing::error!(%error, "store error");
        Self::new(code, error.to_string())
    }
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::ContinuityLost(lost) => Self::continuity_lost(&lost),
            ReadError::Store(error) => error.into(),
        }
    }
}

impl From<AppendError> for ApiError {
    fn from(error: AppendError) -> Self {
        match error {
            AppendError::IdConflict { id, position } => {
                let mut body = ErrorBody::new(
                    ErrorCode::IdConflict,
                    format!(
                        "message id {id} was already published on this channel with different \
                         content (at {position}); nothing was stored"
                    ),
                );
                body.error.id = Some(id.to_string());
                body.error.position = Some(position.to_string());
                Self(Box::new(body))
            }
            AppendError::Invalid(invalid) => invalid.into(),
            AppendError::Poisoned(reason) => Self::new(
                ErrorCode::StorageFailed,
                format!(
                    "storage failed ({reason}); this publish was not acknowledged and no writes \
                     are accepted until the server restarts; retry then with the same ids"
                ),
            ),
            AppendError::Overloaded => Self::new(
                ErrorCode::Unavailable,
                "the log's commit queue is full; nothing was stored, retry with backoff",
            ),
            AppendError::Closed => Self::new(
                ErrorCode::Unavailable,
                "the store is shutting down; nothing was stored",
            ),
            other => Self::new(ErrorCode::Internal, other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = ErrorCode::ALL
            .iter()
            .find(|code| code.as_str() == self.0.error.code)
            .copied()
            .unwrap_or(ErrorCode::Internal);
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(*self.0)).into_response();
        // For the request counter (metrics): which stable code this response carries.
        response.extensions_mut().insert(code);
        response
    }
}
