//! Deletes, and finalizers: an object whose `metadata.finalizers` is not
//! empty is only marked (`deletionTimestamp`) and stays, read and updated
//! as any other, until the last finalizer is removed — then the update
//! that removed it deletes it (`objects::replace`). A namespace takes its
//! objects with it.

use atrium_kube::{meta, KubeError, ResourceType, SERVED};
use axum::http::StatusCode;
use serde_json::json;

use super::objects::{
    dry_run, existing, remove, store_error, timestamp, uid_of, write, Scope, PROTECTED_NAMESPACES,
};
use super::path::At;
use super::{KubeResponse, Request};
use crate::AppState;

pub(super) async fn delete(
    state: &AppState,
    scope: &Scope,
    at: &At,
    name: &str,
    req: &Request,
) -> Result<KubeResponse, KubeError> {
    let r = at.resource;
    let old = existing(state, scope, at, name).await?;
    let current = scope.plain(r, &old.name, old.body.clone())?;
    if meta::has_finalizers(&current) {
        return mark(state, scope, r, &old, current, req).await;
    }
    if r.kind == "Namespace" {
        if PROTECTED_NAMESPACES.contains(&name) {
            return Err(KubeError {
                code: 403,
                reason: "Forbidden",
                message: format!(
                    "namespace {name:?} is forbidden: this namespace may not be deleted"
                ),
                name: Some(name.to_string()),
                kind: Some("namespaces".into()),
                causes: Vec::new(),
            });
        }
        if !dry_run(req) {
            empty_namespace(state, scope, name, req).await?;
        }
    }
    if !dry_run(req) {
        remove(
            state,
            &old,
            req.audit(format!("kube.{}.delete", r.singular)),
        )
        .await
        .map_err(store_error)?;
    }
    Ok(KubeResponse::Json(
        StatusCode::OK,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "kind": r.plural, "uid": uid_of(&old.body)},
        }),
    ))
}

/// Marks `old` (`current`, in clear) as being deleted: it stays until its
/// finalizers are gone.
async fn mark(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    old: &atrium_store::Object,
    mut current: serde_json::Value,
    req: &Request,
) -> Result<KubeResponse, KubeError> {
    let name = meta::name_of(&current).unwrap_or_default().to_string();
    if !meta::mark_deleting(&mut current, &timestamp()) || dry_run(req) {
        return Ok(KubeResponse::Json(
            StatusCode::OK,
            meta::with_resource_version(current, old.revision),
        ));
    }
    let w = atrium_store::Write::Update {
        kind: old.kind.clone(),
        id: old.id.clone(),
        body: scope.sealed(r, &old.name, current)?,
        if_revision: Some(old.revision),
    };
    match write(state, w, req.audit(format!("kube.{}.delete", r.singular))).await {
        Ok(o) => Ok(KubeResponse::Json(StatusCode::OK, scope.shown(r, &o)?)),
        Err(atrium_store::StoreError::RevisionMismatch { .. }) => {
            Err(KubeError::conflict(r.plural, &name))
        }
        Err(e) => Err(store_error(e)),
    }
}

/// Deletes everything in namespace `ns`.
async fn empty_namespace(
    state: &AppState,
    scope: &Scope,
    ns: &str,
    req: &Request,
) -> Result<(), KubeError> {
    let prefix = format!("{ns}/");
    for r in SERVED.iter().filter(|r| r.namespaced) {
        let objects = state
            .store
            .list_all(&scope.kind(r), &scope.filter())
            .await
            .map_err(store_error)?;
        for o in objects.iter().filter(|o| o.name.starts_with(&prefix)) {
            remove(state, o, req.audit(format!("kube.{}.delete", r.singular)))
                .await
                .map_err(store_error)?;
        }
    }
    Ok(())
}
