//! What a cluster's controllers write: created, replaced or deleted as
//! the pod, replica set and deployment controllers, audited as such.

use atrium_kube::{managed, meta, KubeError, ResourceType};
use atrium_store::{AuditContext, Object, Write};
use serde_json::Value;

use super::objects::{insert, name_suffix, pending_pod, remove, timestamp, uid, write, Scope};
use crate::AppState;

pub(super) fn audit(r: &ResourceType, verb: &str) -> AuditContext {
    AuditContext::system("kube-controller", format!("kube.{}.{verb}", r.singular))
}

/// Creates `obj` of type `r` in namespace `ns`.
pub async fn create(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    ns: &str,
    mut obj: Value,
) -> Result<(), KubeError> {
    let name = meta::prepare_create(r, &mut obj, Some(ns), &uid(), &timestamp(), name_suffix)?;
    managed::record_update(None, &mut obj, "atrium-controller", &timestamp());
    // The namespace's quotas hold for what the controllers make too.
    super::quotas::admit(state, scope, r, ns, &obj).await?;
    pending_pod(r, &mut obj)?;
    insert(state, scope, r, (Some(ns), &name), obj, audit(r, "create"))
        .await
        .map(|_| ())
}

/// Writes `body` over `o`, unless `o` changed since it was read (the
/// next pass then sees the change).
pub async fn replace(state: &AppState, r: &ResourceType, o: &Object, body: Value) {
    let w = Write::Update {
        kind: o.kind.clone(),
        id: o.id.clone(),
        body,
        if_revision: Some(o.revision),
    };
    let _ = write(state, w, audit(r, "update")).await;
}

pub async fn delete(state: &AppState, r: &ResourceType, o: &Object) {
    let _ = remove(state, o, audit(r, "delete")).await;
}
