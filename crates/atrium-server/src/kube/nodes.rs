//! `nodes` of a tenant cluster: the fleet's nodes at sites its tenant's
//! residency allows (`atrium_kube::node`), read at each request from the
//! fleet's own records; get and list only — a node is the provider's.

use std::collections::HashMap;

use atrium_kube::node::node_object;
use atrium_kube::selector::LabelSelector;
use atrium_kube::table::{table, Include};
use atrium_kube::KubeError;
use atrium_store::TenantFilter;
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use super::objects::{now_unix, store_error, Call};
use super::{from_api, KubeResponse};
use crate::kinds::{Node, Resource, Site, Tenant};
use crate::{stored, AppState};

/// The nodes `tenant` may use, as the cluster shows them.
async fn visible(state: &AppState, tenant: &str) -> Result<Vec<Value>, KubeError> {
    let store = &state.store;
    let tenant_obj = store
        .get_by_name(Tenant::KIND, None, tenant)
        .await
        .map_err(store_error)?
        .ok_or_else(|| KubeError::internal("the cluster's tenant is gone"))?;
    let residency = stored::spec::<Tenant>(&tenant_obj)
        .map_err(from_api)?
        .residency;
    let jurisdictions: HashMap<String, String> = store
        .list_all(Site::KIND, &TenantFilter::All)
        .await
        .map_err(store_error)?
        .iter()
        .filter_map(|s| Some((s.name.clone(), stored::spec::<Site>(s).ok()?.jurisdiction)))
        .collect();
    let mut nodes = Vec::new();
    for n in store
        .list_all(Node::KIND, &TenantFilter::All)
        .await
        .map_err(store_error)?
    {
        let Ok(spec) = stored::spec::<Node>(&n) else {
            continue;
        };
        let Some(jurisdiction) = jurisdictions.get(&spec.site) else {
            continue;
        };
        if residency.allows(jurisdiction) {
            nodes.push(node_object(
                &n.name,
                &n.id,
                &n.created_at,
                jurisdiction,
                &spec,
            ));
        }
    }
    Ok(nodes)
}

pub(super) async fn serve(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let r = &at.resource;
    if req.method != Method::GET || at.subresource.is_some() {
        return Err(KubeError::method_not_allowed(&format!(
            "{} of nodes: a tenant cluster's nodes are the provider's, read-only",
            req.method
        )));
    }
    if req.param("watch").is_some_and(|w| w == "true" || w == "1") {
        return Err(KubeError::method_not_allowed(
            "watch of nodes: list them instead",
        ));
    }
    let mut nodes = visible(state, &scope.tenant).await?;
    let head = state.store.head();
    if let Some(name) = at.name.as_deref() {
        let node = nodes
            .into_iter()
            .find(|n| n["metadata"]["name"] == name)
            .ok_or_else(|| KubeError::not_found("nodes", name))?;
        return Ok(KubeResponse::Json(StatusCode::OK, node));
    }
    let selector = LabelSelector::parse(req.param("labelSelector").unwrap_or(""))?;
    nodes.retain(|n| selector.matches(n));
    if req.wants_table() {
        let include = Include::parse(req.param("includeObject"));
        return Ok(KubeResponse::Json(
            StatusCode::OK,
            table(r, &nodes, head, None, include, now_unix()),
        ));
    }
    Ok(KubeResponse::Json(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "NodeList",
               "metadata": {"resourceVersion": head.to_string()}, "items": nodes}),
    ))
}
