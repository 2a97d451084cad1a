//! Server-side apply (`kubectl apply --server-side`): a PATCH of
//! `application/apply-patch+yaml` with a `fieldManager`, creating the
//! object when it is absent. What the configuration owns and where it
//! conflicts is `atrium_kube::managed`'s; this reads the request, checks
//! the configuration names the object it is sent to, and writes.

use atrium_kube::{managed, KubeError};
use serde_json::Value;

use super::objects::{create_object, find, key, replace, timestamp, Call};
use super::KubeResponse;

pub(super) const MEDIA_TYPE: &str = "application/apply-patch+yaml";

pub(super) async fn serve(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let r = &at.resource;
    let manager = req.param("fieldManager").ok_or_else(|| {
        KubeError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch")
    })?;
    managed::check_manager(manager)?;
    let force = match req.param("force") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(KubeError::bad_request(format!(
                "force: {other:?} is not true or false"
            )))
        }
    };
    // kubectl and client libraries send the configuration as JSON, which
    // is YAML; YAML proper is not read.
    let mut applied: Value = serde_json::from_slice(&req.body).map_err(|e| {
        KubeError::bad_request(format!(
            "the apply configuration must be sent as JSON (YAML proper is not read): {e}"
        ))
    })?;
    if applied["apiVersion"] != r.api_version().as_str() || applied["kind"] != r.kind.as_ref() {
        return Err(KubeError::bad_request(format!(
            "the apply configuration must say apiVersion: {} and kind: {}",
            r.api_version(),
            r.kind
        )));
    }
    let given_name = applied.pointer("/metadata/name").and_then(Value::as_str);
    if given_name.is_some_and(|n| n != name) {
        return Err(KubeError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            given_name.unwrap_or_default()
        )));
    }
    if !applied["metadata"].is_object() {
        applied["metadata"] = serde_json::json!({});
    }
    applied["metadata"]["name"] = Value::String(name.to_string());
    let now = timestamp();
    let live = find(state, scope, r, &key(r, at.namespace.as_deref(), name)).await?;
    match live {
        None => {
            let made = managed::apply(None, &applied, manager, force, &now)?;
            create_object(state, scope, at, made, req).await
        }
        Some(old) => {
            let current = scope.plain(r, &old.name, old.body.clone())?;
            let merged = managed::apply(Some(&current), &applied, manager, force, &now)?;
            replace(state, scope, at, &old, merged, old.revision, req).await
        }
    }
}
