//! Errors as the Kubernetes API gives them: a `Status` object with the
//! HTTP code, a machine-readable reason and a message kubectl prints as
//! `Error from server (Reason): message`.

use serde_json::{json, Value};

/// One refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// The object it concerns: its name and the resource's plural.
    pub name: Option<String>,
    pub kind: Option<String>,
    /// Field-level causes beyond the message: (message, field).
    pub causes: Vec<(String, String)>,
}

impl KubeError {
    pub(crate) fn new(code: u16, reason: &'static str, message: String) -> KubeError {
        KubeError {
            code,
            reason,
            message,
            name: None,
            kind: None,
            causes: Vec::new(),
        }
    }

    fn about(mut self, plural: &str, name: &str) -> KubeError {
        self.kind = Some(plural.to_string());
        self.name = Some(name.to_string());
        self
    }

    pub fn not_found(plural: &str, name: &str) -> KubeError {
        KubeError::new(404, "NotFound", format!("{plural} {name:?} not found")).about(plural, name)
    }

    pub fn already_exists(plural: &str, name: &str) -> KubeError {
        KubeError::new(
            409,
            "AlreadyExists",
            format!("{plural} {name:?} already exists"),
        )
        .about(plural, name)
    }

    pub fn forbidden(plural: &str, name: &str, why: &str) -> KubeError {
        KubeError::new(
            403,
            "Forbidden",
            format!("{plural} {name:?} is forbidden: {why}"),
        )
        .about(plural, name)
    }

    /// A create past a quota, worded as upstream's quota admission words
    /// it (`exceeded quota: …`), then what to do.
    pub fn exceeded_quota(plural: &str, name: &str, why: &str) -> KubeError {
        KubeError::forbidden(plural, name, &format!("exceeded quota: {why}"))
    }

    /// A write against a resourceVersion that is no longer the object's.
    pub fn conflict(plural: &str, name: &str) -> KubeError {
        KubeError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {plural} {name:?}: the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        )
        .about(plural, name)
    }

    pub fn invalid(kind: &str, name: &str, why: impl Into<String>) -> KubeError {
        KubeError::new(
            422,
            "Invalid",
            format!("{kind} {name:?} is invalid: {}", why.into()),
        )
        .about(kind, name)
    }

    /// A watch from a `resourceVersion` the change log no longer keeps:
    /// the client lists again.
    pub fn expired(requested: i64, oldest: i64) -> KubeError {
        KubeError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    pub fn bad_request(why: impl Into<String>) -> KubeError {
        KubeError::new(400, "BadRequest", why.into())
    }

    pub fn no_route(path: &str) -> KubeError {
        KubeError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn method_not_allowed(what: &str) -> KubeError {
        KubeError::new(405, "MethodNotAllowed", format!("{what} is not supported"))
    }

    pub fn not_acceptable(why: &str) -> KubeError {
        KubeError::new(406, "NotAcceptable", why.into())
    }

    pub fn unsupported_media_type(content_type: &str) -> KubeError {
        KubeError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format ({content_type}): accepted media types are application/json, application/merge-patch+json, application/json-patch+json, application/strategic-merge-patch+json and application/apply-patch+yaml (and application/vnd.kubernetes.protobuf for the kinds kubectl's generators make)"),
        )
    }

    pub fn internal(why: impl Into<String>) -> KubeError {
        KubeError::new(500, "InternalError", why.into())
    }

    /// The `Status` object a client reads.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if self.name.is_some() || self.kind.is_some() {
            status["details"] = json!({"name": self.name, "kind": self.kind});
        }
        if !self.causes.is_empty() {
            let causes: Vec<Value> = self
                .causes
                .iter()
                .map(|(message, field)| {
                    json!({"type": "FieldManagerConflict", "message": message, "field": field})
                })
                .collect();
            status["details"]["causes"] = Value::Array(causes);
        }
        // kubectl prints an Invalid refusal's causes, `field: message`.
        if self.reason == "Invalid" {
            let why = self
                .message
                .split_once(" is invalid: ")
                .map_or("", |(_, w)| w);
            let (field, message) = why.split_once(": ").unwrap_or(("", why));
            status["details"]["causes"] =
                json!([{"reason": "FieldValueInvalid", "message": message, "field": field}]);
        }
        status
    }
}

impl std::fmt::Display for KubeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.reason, self.code, self.message)
    }
}

impl std::error::Error for KubeError {}
