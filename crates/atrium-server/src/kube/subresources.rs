//! Subresources beyond an object itself: `/scale` of deployments,
//! replica sets, stateful sets and scalable custom objects (`kubectl scale`), and `/log` of pods (`kubectl logs`,
//! read on the pod's node through the agent).

use atrium_kube::{crd, patch, KubeError, ResourceType};
use axum::http::{header, Method, StatusCode};
use serde_json::{json, Value};

use super::body::{body, content_type};
use super::objects::{existing, replace, store_error, Call, Scope};
use super::path::At;
use super::KubeResponse;
use crate::AppState;

/// Where a type keeps its replicas: `.spec.replicas` and
/// `.status.replicas` for the built-in ones, what a definition names for a
/// custom one (and its selector, as a string).
fn replica_paths(r: &ResourceType) -> (&str, &str, Option<&str>) {
    match r.custom.as_ref().and_then(|c| c.scale.as_ref()) {
        Some(s) => (
            &s.spec_replicas,
            &s.status_replicas,
            s.label_selector.as_deref(),
        ),
        None => (".spec.replicas", ".status.replicas", None),
    }
}

/// The `Scale` of an object of `r`.
fn scale_of(r: &ResourceType, obj: &Value) -> Value {
    let (spec, status, selector_path) = replica_paths(r);
    let selector = match selector_path {
        Some(p) => crd::at_path(obj, p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        None => obj
            .pointer("/spec/selector/matchLabels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
    };
    let default = if r.custom.is_some() { 0 } else { 1 };
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": obj.pointer("/metadata/name"),
            "namespace": obj.pointer("/metadata/namespace"),
            "uid": obj.pointer("/metadata/uid"),
            "resourceVersion": obj.pointer("/metadata/resourceVersion"),
            "creationTimestamp": obj.pointer("/metadata/creationTimestamp"),
        },
        "spec": {"replicas": crd::at_path(obj, spec).cloned().unwrap_or(json!(default))},
        "status": {
            "replicas": crd::at_path(obj, status).cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

/// `GET`, `PUT` or `PATCH` of `…/{name}/scale`: the replicas of a
/// deployment, replica set, stateful set or scalable custom object, as
/// `kubectl scale` reads and sets them.
pub(super) async fn scale(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let r = &at.resource;
    let name = call.name();
    let old = existing(state, scope, at, name).await?;
    let current = scope.shown(r, &old)?;
    let mut wanted = scale_of(r, &current);
    match req.method {
        Method::GET => return Ok(KubeResponse::Json(StatusCode::OK, wanted)),
        Method::PUT => wanted = body(req)?,
        Method::PATCH => match content_type(req).as_str() {
            "application/json-patch+json" => wanted = patch::json_patch(wanted, &body(req)?)?,
            _ => patch::merge(&mut wanted, &body(req)?),
        },
        ref m => {
            return Err(KubeError::method_not_allowed(&format!(
                "{m} of {}/scale",
                r.plural
            )))
        }
    }
    // A built-in type's replicas are workloads Atrium runs; a custom
    // type's are its controller's to read (an int32, as upstream's).
    let most = if r.custom.is_some() {
        i32::MAX as u64
    } else {
        1000
    };
    let replicas = wanted
        .pointer("/spec/replicas")
        .and_then(Value::as_u64)
        .filter(|n| *n <= most)
        .ok_or_else(|| {
            KubeError::invalid("Scale", name, format!("spec.replicas: must be 0 to {most}"))
        })?;
    let mut new = scope.plain(r, &old.name, old.body.clone())?;
    let spec_path = replica_paths(r).0;
    let slot = crd::at_path_mut(&mut new, spec_path)
        .ok_or_else(|| KubeError::internal(format!("{spec_path} cannot hold the replicas")))?;
    *slot = json!(replicas);
    let replaced = replace(state, scope, at, &old, new, old.revision, req).await?;
    match replaced {
        KubeResponse::Json(status, obj) => Ok(KubeResponse::Json(status, scale_of(r, &obj))),
        other => Ok(other),
    }
}

/// `GET …/pods/{name}/log`: the pod's container log, read on its node
/// (`kubectl logs`), as text.
pub(super) async fn pod_log(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let workload = pod_workload(state, scope, at, name).await?.1;
    let text = crate::exec::node_log(
        state,
        &scope.tenant,
        &workload,
        req.audit("kube.pod.log".into()),
    )
    .await
    .map_err(|e| KubeError::bad_request(format!("the log of pod {name:?}: {e}")))?;
    let response =
        axum::response::IntoResponse::into_response(([(header::CONTENT_TYPE, "text/plain")], text));
    Ok(KubeResponse::Stream(response))
}

/// Pod `name` and the Atrium workload that runs it.
pub(super) async fn pod_workload(
    state: &AppState,
    scope: &Scope,
    at: &At,
    name: &str,
) -> Result<(atrium_store::Object, atrium_store::Object), KubeError> {
    let pod = existing(state, scope, at, name).await?;
    let workload_name = super::pods::workload_name(&scope.id, &pod.name);
    let workload = state
        .store
        .get_by_name(
            <crate::kinds::Workload as crate::kinds::Resource>::KIND,
            Some(&scope.tenant),
            &workload_name,
        )
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            KubeError::bad_request(format!(
                "container \"main\" in pod {name:?} is waiting to start"
            ))
        })?;
    Ok((pod, workload))
}
