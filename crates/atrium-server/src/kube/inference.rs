//! The inference service controller: each `InferenceService` of a
//! cluster is an Atrium deployment of its tenant
//! (`atrium_kube::inference`), made and replaced through the same
//! admission as the tenant's own — quota, model, residency — and its
//! status is written back from the deployment's. A deployment with a
//! dotted name (no tenant can give one) whose service is gone, or whose
//! cluster is, is deleted.
//!
//! It runs in the pod controller's passes.

use std::collections::{HashMap, HashSet};

use atrium_kube::inference::{deployment_name, deployment_of, status_of};
use atrium_store::{AuditContext, Object, StoreError, TenantFilter, Write, WriteError};

use super::objects::Scope;
use crate::kinds::{Deployment, Kind, Resource};
use crate::{stored, AppState};

fn audit(action: &str) -> AuditContext {
    AuditContext::system("inference-controller", action)
}

/// Makes or replaces deployment `name` of `tenant` to be `spec`; `Err`
/// says why it cannot be.
async fn ensure(
    state: &AppState,
    tenant: &str,
    name: &str,
    spec: &atrium_core::deployment::DeploymentSpec,
    existing: Option<&Object>,
) -> Result<(), String> {
    if let Some(o) = existing {
        if stored::spec::<Deployment>(o).is_ok_and(|s| s == *spec) {
            return Ok(());
        }
    }
    let replacing = existing.map(|o| o.id.as_str());
    let precondition = <Deployment as Kind>::admit(state, Some(tenant), spec, replacing)
        .await
        .map_err(|e| e.to_string())?;
    let write = match existing {
        None => Write::Create {
            kind: Deployment::KIND.into(),
            id: crate::crud::new_id(Deployment::ID_PREFIX),
            tenant: Some(tenant.to_string()),
            name: name.to_string(),
            body: stored::body::<Deployment>(spec, Deployment::initial_status(spec).as_ref())
                .map_err(|e| e.to_string())?,
        },
        Some(o) => Write::Update {
            kind: o.kind.clone(),
            id: o.id.clone(),
            body: stored::body::<Deployment>(spec, stored::status::<Deployment>(o).as_ref())
                .map_err(|e| e.to_string())?,
            if_revision: Some(o.revision),
        },
    };
    match state
        .store
        .write(
            write,
            precondition,
            audit("kube.inferenceservice.deployment"),
        )
        .await
    {
        Ok(_) | Err(WriteError::Store(StoreError::NameTaken { .. })) => Ok(()),
        // Changed meanwhile: the next pass sees it.
        Err(WriteError::Store(StoreError::RevisionMismatch { .. })) => Ok(()),
        Err(WriteError::Rejected(e)) => Err(e.to_string()),
        Err(WriteError::Store(e)) => Err(e.to_string()),
    }
}

/// One pass over `cluster`'s inference services; adds the deployments
/// they are to `wanted` (tenant, name).
pub(super) async fn reconcile(
    state: &AppState,
    scope: &Scope,
    cluster: &str,
    deployments: &HashMap<(String, String), Object>,
    wanted: &mut HashSet<(String, String)>,
) -> Result<(), StoreError> {
    let Some(kind) = atrium_kube::find("atrium.dev", "v1", "inferenceservices") else {
        return Ok(());
    };
    for isvc in state
        .store
        .list_all(&scope.kind(kind), &scope.filter())
        .await?
    {
        let meta = &isvc.body["metadata"];
        let name = deployment_name(
            meta["name"].as_str().unwrap_or_default(),
            meta["namespace"].as_str().unwrap_or_default(),
            cluster,
        );
        let key = (scope.tenant.clone(), name.clone());
        wanted.insert(key.clone());
        let existing = deployments.get(&key);
        let made = match deployment_of(&isvc.body) {
            Ok(spec) => ensure(state, &scope.tenant, &name, &spec, existing).await,
            Err(e) => Err(e.message),
        };
        let deployment_status = existing.and_then(stored::status::<Deployment>);
        let generation = meta["generation"].as_i64().unwrap_or(1);
        let status = match (&made, &deployment_status) {
            (Err(why), _) => status_of(Err(why), &name, generation),
            (Ok(()), Some(s)) => status_of(Ok(s), &name, generation),
            (Ok(()), None) => continue,
        };
        if isvc.body.get("status") != Some(&status) {
            let mut body = isvc.body.clone();
            body["status"] = status;
            let w = Write::Update {
                kind: isvc.kind.clone(),
                id: isvc.id.clone(),
                body,
                if_revision: Some(isvc.revision),
            };
            let _ = state
                .store
                .write::<()>(w, None, audit("kube.inferenceservice.status"))
                .await;
        }
    }
    Ok(())
}

/// Every tenant's deployments an inference service made: dotted names.
pub(super) async fn made_by_services(
    state: &AppState,
) -> Result<HashMap<(String, String), Object>, StoreError> {
    Ok(state
        .store
        .list_all(Deployment::KIND, &TenantFilter::All)
        .await?
        .into_iter()
        .filter(|d| d.name.contains('.'))
        .map(|d| ((d.tenant.clone().unwrap_or_default(), d.name.clone()), d))
        .collect())
}

/// Deletes the deployments no inference service wants any more.
pub(super) async fn sweep(
    state: &AppState,
    deployments: &HashMap<(String, String), Object>,
    wanted: &HashSet<(String, String)>,
) {
    for (key, d) in deployments {
        if !wanted.contains(key) {
            let gone = Write::Delete {
                kind: Deployment::KIND.into(),
                id: d.id.clone(),
            };
            let _ = state
                .store
                .write::<()>(gone, None, audit("kube.inferenceservice.deployment-delete"))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_it_makes_are_dotted_so_no_tenant_can_give_one() {
        let name = deployment_name("chat", "default", "dev");
        assert_eq!(name, "chat.default.dev");
        assert!(atrium_core::name::validate_name(&name).is_err());
    }
}
