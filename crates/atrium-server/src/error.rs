//! The one error type at the HTTP edge. Every failure a handler can meet is
//! a variant here, and one exhaustive match maps each to a status, a stable
//! code and the uniform body `{"error":{"code","message","details"}}`.

use atrium_api::{ErrorBody, ErrorDetail};
use atrium_core::quota::QuotaExceeded;
use atrium_core::FieldErrors;
use atrium_store::StoreError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials, or credentials that match nothing.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role may not do this at all. Never used for another
    /// tenant's resources: those are [`ApiError::NotFound`].
    #[error("{0}")]
    Forbidden(String),
    /// The resource does not exist, or the caller may not know it does.
    #[error("{kind} {ident:?} not found")]
    NotFound { kind: String, ident: String },
    /// The route does not exist.
    #[error("no route for {0}")]
    NoRoute(String),
    /// The method is not served on this route.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The body is not JSON, or not the JSON this endpoint takes.
    #[error("invalid JSON body: {0}")]
    MalformedJson(String),
    /// The body parsed but some fields are wrong.
    #[error("invalid request: {0}")]
    InvalidFields(FieldErrors),
    /// A query parameter is wrong.
    #[error("invalid query parameter {name}: {message}")]
    InvalidQuery { name: String, message: String },
    #[error("send the body as application/json (got {0:?})")]
    UnsupportedMediaType(String),
    #[error("body larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A name is taken, a revision moved on, or a dependency blocks this.
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        details: Value,
    },
    /// Admitting the request would take the tenant past its quota.
    #[error("{0}")]
    QuotaExceeded(QuotaExceeded),
    /// The tenant holds as many open streams as its quota allows; retry
    /// once one closes.
    #[error("{0}; close a stream first")]
    TooManyOpen(QuotaExceeded),
    /// A watch from a revision the change log no longer keeps.
    #[error("revision {requested} is older than the change log keeps (it starts after {oldest}): list again, then watch from the list's revision")]
    Expired { requested: i64, oldest: i64 },
    /// The store cannot be reached; the request may be retried.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A bug or corrupt data. Logged in full; the client gets the request id.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn not_found(kind: &str, ident: &str) -> Self {
        ApiError::NotFound {
            kind: kind.to_string(),
            ident: ident.to_string(),
        }
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let mut errors = FieldErrors::new();
        errors.push(field, message);
        ApiError::InvalidFields(errors)
    }

    fn parts(&self) -> (StatusCode, &'static str, Value) {
        match self {
            ApiError::Unauthenticated(_) => {
                (StatusCode::UNAUTHORIZED, "unauthenticated", Value::Null)
            }
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", Value::Null),
            ApiError::NotFound { kind, ident } => (
                StatusCode::NOT_FOUND,
                "not_found",
                json!({"kind": kind, "name": ident}),
            ),
            ApiError::NoRoute(_) => (StatusCode::NOT_FOUND, "no_route", Value::Null),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                Value::Null,
            ),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "invalid_json", Value::Null),
            ApiError::InvalidFields(errors) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                json!({"fields": errors.0}),
            ),
            ApiError::InvalidQuery { name, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_query",
                json!({"parameter": name}),
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                Value::Null,
            ),
            ApiError::PayloadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                json!({"limit_bytes": limit}),
            ),
            ApiError::Conflict { code, details, .. } => {
                (StatusCode::CONFLICT, code, details.clone())
            }
            ApiError::QuotaExceeded(q) => (
                StatusCode::CONFLICT,
                "quota_exceeded",
                json!({"resource": q.resource, "requested": q.requested, "used": q.used, "limit": q.limit}),
            ),
            ApiError::TooManyOpen(q) => (
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                json!({"resource": q.resource, "requested": q.requested, "used": q.used, "limit": q.limit}),
            ),
            ApiError::Expired { requested, oldest } => (
                StatusCode::GONE,
                "expired",
                json!({"requested": requested, "oldest": oldest}),
            ),
            ApiError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", Value::Null)
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", Value::Null),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, details) = self.parts();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
                details,
            },
        };
        (status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind, id } => ApiError::NotFound { kind, ident: id },
            StoreError::NameTaken { kind, name } => ApiError::Conflict {
                code: "already_exists",
                message: format!("a {kind} named {name:?} already exists; pick another name"),
                details: json!({"kind": kind, "name": name}),
            },
            StoreError::RevisionMismatch {
                kind,
                id,
                expected,
                actual,
            } => ApiError::Conflict {
                code: "revision_mismatch",
                message: format!(
                    "{kind} {id} changed: it is at revision {actual}, the update was based on \
                     {expected}; read it again and retry"
                ),
                details: json!({"expected": expected, "actual": actual}),
            },
            StoreError::Compacted { requested, oldest } => ApiError::Expired { requested, oldest },
            StoreError::Database(e) => ApiError::Unavailable(e.to_string()),
            // Only controllers write through a fenced store: a deposed
            // leader's write, refused, to be retried by the new leader.
            e @ StoreError::Fenced { .. } => ApiError::Unavailable(e.to_string()),
            // A failover under way: the next try finds the new primary.
            e @ StoreError::NoPrimary(_) => ApiError::Unavailable(e.to_string()),
            e
            @ (StoreError::UnsupportedUrl(_) | StoreError::BadUrl(_) | StoreError::Corrupt(_)) => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}
