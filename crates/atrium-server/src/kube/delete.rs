//! Deletes, and finalizers: an object whose `metadata.finalizers` is not
//! empty is only marked (`deletionTimestamp`) and stays, read and updated
//! as any other, until the last finalizer is removed — then the update
//! that removed it deletes it (`objects::replace`). A namespace is marked
//! terminating, and the controller's next pass deletes its objects, then
//! it (`finish_terminating`); any object takes its dependents (by owner reference,
//! of every kind) unless the delete orphans them.

use atrium_kube::{meta, KubeError, ResourceType};
use atrium_store::StoreError;
use axum::http::StatusCode;
use serde_json::json;

use super::body::dry_run;
use super::controlled;
use super::custom::{catalog_of, delete_custom_objects};
use super::objects::{
    existing, remove, store_error, timestamp, uid_of, write, Call, Scope, PROTECTED_NAMESPACES,
};
use super::{KubeResponse, Request};
use crate::AppState;

pub(super) async fn delete(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let r = &at.resource;
    let old = existing(state, scope, at, name).await?;
    let current = scope.plain(r, &old.name, old.body.clone())?;
    if meta::has_finalizers(&current) {
        return mark(state, scope, r, &old, current, req).await;
    }
    if r.builtin_kind() == "Namespace" {
        if PROTECTED_NAMESPACES.contains(&name) {
            return Err(KubeError::forbidden(
                "namespaces",
                name,
                "this namespace may not be deleted",
            ));
        }
        // Terminating: its content goes in the controller's next pass,
        // then the namespace, as upstream's namespace controller does.
        let mut terminating = current;
        terminating["status"]["phase"] = json!("Terminating");
        return mark(state, scope, r, &old, terminating, req).await;
    }
    if !dry_run(req) {
        let orphan = orphans(req);
        // Dependents let go before their owner goes, so no controller
        // collects them between the two.
        if orphan {
            cascade(state, scope, vec![uid_of(&old.body)], true, req).await?;
        }
        remove(
            state,
            &old,
            req.audit(format!("kube.{}.delete", r.singular)),
        )
        .await
        .map_err(store_error)?;
        if r.builtin_kind() == "CustomResourceDefinition" {
            delete_custom_objects(state, scope, &old.body)
                .await
                .map_err(store_error)?;
        }
        if !orphan {
            cascade(state, scope, vec![uid_of(&old.body)], false, req).await?;
        }
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

/// Whether the delete asks its object's dependents be kept, without it as
/// owner (`propagationPolicy: Orphan`, `kubectl delete --cascade=orphan`),
/// rather than deleted after it.
fn orphans(req: &Request) -> bool {
    let options = serde_json::from_slice::<serde_json::Value>(&req.body).unwrap_or_default();
    req.param("propagationPolicy") == Some("Orphan")
        || options["propagationPolicy"] == "Orphan"
        || options["orphanDependents"] == true
}

/// How many generations of dependents a delete follows.
const MAX_GENERATIONS: usize = 8;

/// Garbage collection by owner references, for every kind: deletes the
/// dependents of the objects whose uids are `gone` — those all of whose
/// owners are gone — then theirs; or, orphaning, drops `gone` from their
/// owner references.
async fn cascade(
    state: &AppState,
    scope: &Scope,
    mut gone: Vec<String>,
    orphan: bool,
    req: &Request,
) -> Result<(), KubeError> {
    let catalog = catalog_of(state, scope).await.map_err(store_error)?;
    for _ in 0..MAX_GENERATIONS {
        if gone.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for r in catalog.stored().filter(|r| !r.read_only()) {
            let objects = state
                .store
                .list_all(&scope.kind(r), &scope.filter())
                .await
                .map_err(store_error)?;
            for o in objects {
                let owners: Vec<String> = o.body["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["uid"].as_str().map(str::to_string))
                    .collect();
                if !owners.iter().any(|u| gone.contains(u)) {
                    continue;
                }
                if orphan {
                    let_go(state, scope, r, o, &gone, req).await?;
                } else if owners.iter().all(|u| gone.contains(u)) {
                    remove(state, &o, req.audit(format!("kube.{}.delete", r.singular)))
                        .await
                        .map_err(store_error)?;
                    next.push(uid_of(&o.body));
                }
            }
        }
        if orphan {
            break;
        }
        gone = next;
    }
    Ok(())
}

/// Drops the owner references to `gone` from `o`, read again and retried
/// when a controller wrote it meanwhile.
async fn let_go(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    mut o: atrium_store::Object,
    gone: &[String],
    req: &Request,
) -> Result<(), KubeError> {
    for _ in 0..5 {
        let mut kept = scope.plain(r, &o.name, o.body.clone())?;
        if let Some(refs) = kept["metadata"]["ownerReferences"].as_array_mut() {
            refs.retain(|x| {
                !x["uid"]
                    .as_str()
                    .is_some_and(|u| gone.iter().any(|g| g == u))
            });
        }
        let w = atrium_store::Write::Update {
            kind: o.kind.clone(),
            id: o.id.clone(),
            body: scope.sealed(r, &o.name, kept)?,
            if_revision: Some(o.revision),
        };
        match write(state, w, req.audit(format!("kube.{}.orphan", r.singular))).await {
            Err(atrium_store::StoreError::RevisionMismatch { .. }) => {
                match state.store.get(&o.kind, &o.id).await.map_err(store_error)? {
                    Some(now) => o = now,
                    None => return Ok(()),
                }
            }
            Ok(_) | Err(atrium_store::StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(store_error(e)),
        }
    }
    Err(KubeError::conflict(
        &r.plural,
        meta::name_of(&o.body).unwrap_or_default(),
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
            Err(KubeError::conflict(&r.plural, &name))
        }
        Err(e) => Err(store_error(e)),
    }
}

/// The namespace controller's part of a pass: each terminating
/// namespace's content is deleted, then the namespace (unless finalizers
/// of its own still hold it).
pub(super) async fn finish_terminating(state: &AppState, scope: &Scope) -> Result<(), StoreError> {
    let Some(namespaces) = atrium_kube::find("", "v1", "namespaces") else {
        return Ok(());
    };
    let all = state
        .store
        .list_all(&scope.kind(namespaces), &scope.filter())
        .await?;
    let audit = |r: &ResourceType| controlled::audit(r, "delete");
    let terminating: Vec<_> = all
        .iter()
        .filter(|n| n.body.pointer("/metadata/deletionTimestamp").is_some())
        .collect();
    if terminating.is_empty() {
        return Ok(());
    }
    let catalog = catalog_of(state, scope).await?;
    for ns in terminating {
        let prefix = format!("{}/", ns.name);
        for r in catalog.stored().filter(|r| r.namespaced) {
            for o in state
                .store
                .list_all(&scope.kind(r), &scope.filter())
                .await?
                .iter()
                .filter(|o| o.name.starts_with(&prefix))
            {
                remove(state, o, audit(r)).await?;
            }
        }
        if !meta::has_finalizers(&ns.body) {
            remove(state, ns, audit(namespaces)).await?;
        }
    }
    Ok(())
}
