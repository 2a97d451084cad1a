//! Subresources beyond an object itself: `/scale` of deployments and
//! replica sets (`kubectl scale`), and `/log` of pods (`kubectl logs`,
//! read on the pod's node through the agent).

use atrium_kube::{patch, KubeError};
use axum::http::{header, Method, StatusCode};
use serde_json::{json, Value};

use super::objects::{body, content_type, existing, replace, store_error, Call, Scope};
use super::path::At;
use super::KubeResponse;
use crate::AppState;

/// The `Scale` of a deployment or replica set.
fn scale_of(obj: &Value) -> Value {
    let labels: Vec<String> = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
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
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": labels.join(","),
        },
    })
}

/// `GET`, `PUT` or `PATCH` of `…/{name}/scale`: the replicas of a
/// deployment or replica set, as `kubectl scale` reads and sets them.
pub(super) async fn scale(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let old = existing(state, scope, at, name).await?;
    let current = scope.shown(at.resource, &old)?;
    let mut wanted = scale_of(&current);
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
                at.resource.plural
            )))
        }
    }
    let replicas = wanted
        .pointer("/spec/replicas")
        .and_then(Value::as_u64)
        .filter(|n| *n <= 1000)
        .ok_or_else(|| KubeError::invalid("Scale", name, "spec.replicas: must be 0 to 1000"))?;
    let mut new = scope.plain(at.resource, &old.name, old.body.clone())?;
    new["spec"]["replicas"] = json!(replicas);
    let replaced = replace(state, scope, at, &old, new, old.revision, req).await?;
    match replaced {
        KubeResponse::Json(status, obj) => Ok(KubeResponse::Json(status, scale_of(&obj))),
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
