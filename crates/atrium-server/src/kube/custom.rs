//! A tenant's own types in its cluster: which the cluster serves (its
//! `Catalog`, read as little as a request needs), a definition checked
//! and given its status when written, a custom object checked against its
//! version's schema (warnings back in `Warning` headers), and a
//! definition's objects deleted with it.

use atrium_kube::{crd, meta, Catalog, KubeError, ResourceType};
use atrium_store::{Object, StoreError};
use axum::http::{header, StatusCode};
use serde_json::Value;

use super::objects::{find, remove, store_error, system_audit, Scope};
use super::{KubeResponse, Request};
use crate::AppState;

/// The definitions of the cluster's own types.
pub(super) async fn definitions(
    state: &AppState,
    scope: &Scope,
) -> Result<Vec<Object>, StoreError> {
    let Some(crds) = atrium_kube::find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    else {
        return Ok(Vec::new());
    };
    state
        .store
        .list_all(&scope.kind(crds), &scope.filter())
        .await
}

/// Every type the cluster serves: the built-in ones and its definitions'.
pub(super) async fn catalog_of(state: &AppState, scope: &Scope) -> Result<Catalog, StoreError> {
    let crds = definitions(state, scope).await?;
    Ok(Catalog::new(crds.iter().map(|o| &o.body)))
}

/// Deletes every object of the types definition `crd` served, which is
/// gone: its objects go with it, as upstream's.
pub(super) async fn delete_custom_objects(
    state: &AppState,
    scope: &Scope,
    crd: &Value,
) -> Result<(), StoreError> {
    for r in crd::types_of(crd).iter().take(1) {
        for o in state
            .store
            .list_all(&scope.kind(r), &scope.filter())
            .await?
        {
            remove(
                state,
                &o,
                system_audit(&format!("kube.{}.delete", r.singular)),
            )
            .await?;
        }
    }
    Ok(())
}

/// The types a request for `rest` may name. A built-in group's request
/// reads no definition; a custom resource's reads only the one or two
/// its path can name (`<plural>.<group>`), so its cost does not grow with
/// the cluster's definitions; discovery reads them all.
pub(super) async fn catalog_for(
    state: &AppState,
    scope: &Scope,
    rest: &str,
) -> Result<Catalog, KubeError> {
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let candidates: Vec<&str> = match parts.as_slice() {
        ["version"] | ["api", ..] => return Ok(Catalog::default()),
        ["apis", group, _, _, ..] if atrium_kube::resource::builtin_group(group) => {
            return Ok(Catalog::default())
        }
        ["apis", _, _, "namespaces", _, plural, ..] => vec!["namespaces", plural],
        ["apis", _, _, plural, ..] => vec![plural],
        _ => return catalog_of(state, scope).await.map_err(store_error),
    };
    let (Some(group), Some(crds)) = (
        parts.get(1),
        atrium_kube::find("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
    ) else {
        return Ok(Catalog::default());
    };
    let mut bodies = Vec::new();
    for plural in candidates {
        let name = format!("{plural}.{group}");
        if let Some(o) = find(state, scope, crds, &name).await? {
            bodies.push(o.body);
        }
    }
    Ok(Catalog::new(bodies.iter()))
}

/// A tenant's own types: a definition checked (its kind not another's of
/// its group) and given its status; a custom object checked against its
/// version's schema. Returns the warnings for the client.
pub(super) async fn custom_types(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    obj: &mut Value,
    old: Option<&Value>,
    req: &Request,
) -> Result<Vec<String>, KubeError> {
    if r.builtin_kind() == "CustomResourceDefinition" {
        crd::prepare(obj, old)?;
        let others = definitions(state, scope).await.map_err(store_error)?;
        let bodies: Vec<&Value> = others.iter().map(|o| &o.body).collect();
        if let Some(why) = crd::kind_conflict(obj, &bodies) {
            let name = meta::name_of(obj).unwrap_or_default();
            return Err(KubeError::invalid(&r.kind, name, why));
        }
        return Ok(Vec::new());
    }
    let validation = crd::FieldValidation::parse(req.param("fieldValidation"))?;
    crd::admit(r, obj, validation)
}

/// A JSON answer, with a `Warning` header for each warning.
pub(super) fn warned(status: StatusCode, body: Value, warnings: &[String]) -> KubeResponse {
    if warnings.is_empty() {
        return KubeResponse::Json(status, body);
    }
    let mut response = axum::response::IntoResponse::into_response((status, axum::Json(body)));
    for w in warnings {
        let text = format!("299 - {:?}", w.replace(['\r', '\n'], " "));
        if let Ok(v) = header::HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, v);
        }
    }
    KubeResponse::Stream(response)
}
