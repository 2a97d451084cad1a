//! The registry's errors, in the shape OCI clients read
//! (`{"errors":[{"code","message","detail"}]}`) with the distribution
//! spec's codes. The rest of the API keeps its own shape; failures that
//! come from it (authentication, the store) are mapped here once.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::ApiError;

#[derive(Debug)]
pub struct RegistryError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// `WWW-Authenticate` for a 401: where to get a token.
    challenge: Option<String>,
}

impl RegistryError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            challenge: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>, challenge: String) -> Self {
        RegistryError {
            challenge: Some(challenge),
            ..Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
        }
    }
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "DENIED", message)
    }
    /// The repository does not exist, or the caller may not know it does.
    pub fn name_unknown(repo: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("repository {repo:?} not found"),
        )
    }
    pub fn name_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", message)
    }
    pub fn blob_unknown(digest: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {digest} is not in this repository"),
        )
    }
    pub fn upload_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", message)
    }
    pub fn upload_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID", message)
    }
    pub fn range_invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "BLOB_UPLOAD_INVALID",
            message,
        )
    }
    pub fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
    }
    pub fn manifest_unknown(reference: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest {reference:?} not found"),
        )
    }
    pub fn manifest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", message)
    }
    pub fn manifest_blob_unknown(digest: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!("the manifest references {digest}, which was not pushed to this repository"),
        )
    }
    pub fn size_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID", message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "registry: internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            "internal error; the request id is in the x-request-id header",
        )
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        RegistryError::internal(format!("registry storage: {e}"))
    }
}

impl From<ApiError> for RegistryError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Unavailable(m) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", m)
            }
            ApiError::Forbidden(m) => Self::denied(m),
            other => RegistryError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let body =
            json!({"errors": [{"code": self.code, "message": self.message, "detail": null}]});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(value) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, value);
        }
        response
    }
}
