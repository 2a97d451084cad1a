//! How an object's body is kept in the store: `{"spec": …, "status": …}`,
//! plus fields private to the server for some kinds (a key's digest) that
//! never leave it. This module is the only place that reads or writes a
//! body's fields by name; everything else works on typed specs and
//! statuses of a [`Resource`].

use std::collections::HashMap;

use atrium_api::{Object as Typed, Resource, ResourceView};
use atrium_store::Object;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// The spec of a stored object of kind `R`.
pub fn spec<R: Resource>(object: &Object) -> Result<R::Spec, ApiError> {
    parse(object, "spec")
}

/// The status of a stored object of kind `R`; `None` when it has none yet
/// (or one an older version wrote differently: controllers write it again).
pub fn status<R: Resource>(object: &Object) -> Option<R::Status> {
    let status = object.body.get("status").filter(|s| !s.is_null())?;
    serde_json::from_value(status.clone()).ok()
}

/// A stored object as its typed envelope; `None` when its spec does not
/// parse (logged: a stored object is the server's own writing).
pub fn typed<R: Resource>(object: &Object) -> Option<Typed<R>> {
    let spec = spec::<R>(object)
        .map_err(|e| tracing::warn!(error = %e, "skipping an unreadable stored object"))
        .ok()?;
    Some(envelope(object, spec, status::<R>(object)))
}

/// Every stored object of a list that parses, typed.
pub fn all<R: Resource>(objects: &[Object]) -> Vec<Typed<R>> {
    objects.iter().filter_map(typed::<R>).collect()
}

/// The specs of provider-level objects (unique names), by name.
pub fn specs_by_name<R: Resource>(objects: &[Object]) -> HashMap<String, R::Spec> {
    objects
        .iter()
        .filter_map(|o| Some((o.name.clone(), typed::<R>(o)?.spec)))
        .collect()
}

/// The body of a new object.
pub fn body<R: Resource>(spec: &R::Spec, status: Option<&R::Status>) -> Result<Value, ApiError> {
    let mut body = json!({ "spec": to_value(spec)? });
    if let Some(status) = status {
        body["status"] = to_value(status)?;
    }
    Ok(body)
}

/// `body` with `spec` in place of its spec (private fields kept).
pub fn with_spec<R: Resource>(body: &Value, spec: &R::Spec) -> Result<Value, ApiError> {
    with_field(body, "spec", spec)
}

/// `body` with `status` in place of its status.
pub fn with_status<R: Resource>(body: &Value, status: &R::Status) -> Result<Value, ApiError> {
    with_field(body, "status", status)
}

/// The API view of a stored object: identity, spec and status. Fields of
/// the body other than `spec` and `status` never leave the server.
pub fn view(object: &Object) -> Value {
    let spec = object.body.get("spec").cloned().unwrap_or(Value::Null);
    serde_json::to_value(envelope(object, spec, object.body.get("status").cloned()))
        .unwrap_or(Value::Null)
}

/// `object`'s identity around `spec` and `status`.
fn envelope<S, T>(object: &Object, spec: S, status: Option<T>) -> ResourceView<S, T> {
    ResourceView {
        id: object.id.clone(),
        name: object.name.clone(),
        tenant: object.tenant.clone(),
        revision: object.revision,
        created_at: object.created_at.clone(),
        updated_at: object.updated_at.clone(),
        spec,
        status,
    }
}

fn with_field(body: &Value, field: &str, value: &impl Serialize) -> Result<Value, ApiError> {
    let mut body = match body {
        Value::Object(_) => body.clone(),
        _ => json!({}),
    };
    body[field] = to_value(value)?;
    Ok(body)
}

fn to_value(value: &impl Serialize) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::Internal(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(object: &Object, field: &str) -> Result<T, ApiError> {
    let value = object.body.get(field).cloned().unwrap_or(Value::Null);
    serde_json::from_value(value).map_err(|e| {
        ApiError::Internal(format!(
            "stored {} {} does not parse: {e}",
            object.kind, object.id
        ))
    })
}
