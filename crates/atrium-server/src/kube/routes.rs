//! Service routes: each service of a cluster that has an address, as its
//! tenant's network carries it (`atrium_core::service_route`): its ports
//! to the ready endpoints the endpoints controller listed, on every node
//! the cluster's pods run on, where that node's agent programs it. Kept in
//! the pod controller's passes, after the endpoints; a route goes with its
//! service, and with its cluster.
//!
//! Routes are the control plane's to write: a tenant reads its own, a
//! node the ones naming it.

use std::collections::{BTreeSet, HashMap, HashSet};

use atrium_core::service_route::ServiceRouteSpec;
use atrium_core::FieldErrors;
use atrium_store::{Object, StoreError, Write};
use serde_json::Value;

use super::objects::{system_audit, write, Scope};
use crate::kinds::{Kind, Resource, ServiceRoute};
use crate::stored;
use crate::AppState;

impl Kind for ServiceRoute {
    const TENANT_WRITABLE: bool = false;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &ServiceRouteSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }
}

/// A route's name: its cluster, namespace and service.
fn route_name(cluster: &str, service_key: &str) -> String {
    format!("{cluster}.{}", service_key.replace('/', "."))
}

/// The routes of `scope`'s cluster.
async fn routes_of(state: &AppState, scope: &Scope) -> Result<Vec<Object>, StoreError> {
    let all = state
        .store
        .list_all(ServiceRoute::KIND, &scope.filter())
        .await?;
    Ok(all
        .into_iter()
        .filter(|o| stored::spec::<ServiceRoute>(o).is_ok_and(|s| s.cluster == scope.id))
        .collect())
}

/// Makes the cluster's routes its services' and endpoints' as they are
/// now, on `nodes` (where its pods run).
pub(super) async fn reconcile(
    state: &AppState,
    scope: &Scope,
    nodes: &BTreeSet<String>,
) -> Result<(), StoreError> {
    let (Some(services_t), Some(endpoints_t)) = (
        atrium_kube::find("", "v1", "services"),
        atrium_kube::find("", "v1", "endpoints"),
    ) else {
        return Ok(());
    };
    let services = state
        .store
        .list_all(&scope.kind(services_t), &scope.filter())
        .await?;
    let existing = routes_of(state, scope).await?;
    if services.is_empty() && existing.is_empty() {
        return Ok(());
    }
    let endpoints: HashMap<String, Value> = state
        .store
        .list_all(&scope.kind(endpoints_t), &scope.filter())
        .await?
        .into_iter()
        .map(|o| (o.name, o.body))
        .collect();
    let mut existing: HashMap<String, Object> =
        existing.into_iter().map(|o| (o.name.clone(), o)).collect();
    for svc in &services {
        let ep = endpoints.get(&svc.name).unwrap_or(&Value::Null);
        let Some((address, ports)) = atrium_kube::service::route_of(&svc.body, ep) else {
            continue;
        };
        let spec = ServiceRouteSpec {
            cluster: scope.id.clone(),
            address,
            ports,
            nodes: nodes.iter().cloned().collect(),
        };
        let name = route_name(&scope.id, &svc.name);
        let body = match stored::body::<ServiceRoute>(&spec, None) {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(service = %svc.name, error = %e, "service route not made");
                continue;
            }
        };
        let w = match existing.remove(&name) {
            Some(o) if stored::spec::<ServiceRoute>(&o).ok().as_ref() == Some(&spec) => continue,
            Some(o) => Write::Update {
                kind: o.kind.clone(),
                id: o.id.clone(),
                body,
                if_revision: Some(o.revision),
            },
            None => Write::Create {
                kind: ServiceRoute::KIND.into(),
                id: crate::crud::new_id(ServiceRoute::ID_PREFIX),
                tenant: Some(scope.tenant.clone()),
                name,
                body,
            },
        };
        // A route changed meanwhile: the next pass writes it again.
        if let Err(e) = write(state, w, system_audit("kube.route.write")).await {
            tracing::warn!(service = %svc.name, error = %e, "service route not written");
        }
    }
    for gone in existing.values() {
        let _ = super::objects::remove(state, gone, system_audit("kube.route.delete")).await;
    }
    Ok(())
}

/// Deletes every route whose cluster is not in `live`. A cluster's
/// deletion removes its routes as it goes, but a pass that listed the
/// cluster's services just before may still write one after: this sweep,
/// at the end of every pass, removes what such a race left.
pub(super) async fn sweep(state: &AppState, live: &HashSet<&str>) -> Result<(), StoreError> {
    let all = state
        .store
        .list_all(ServiceRoute::KIND, &atrium_store::TenantFilter::All)
        .await?;
    for o in all {
        let orphan =
            stored::spec::<ServiceRoute>(&o).is_ok_and(|s| !live.contains(s.cluster.as_str()));
        if orphan {
            super::objects::remove(state, &o, system_audit("kube.route.delete")).await?;
        }
    }
    Ok(())
}

/// Deletes the routes of `scope`'s cluster (which is being deleted).
pub(super) async fn delete_all(state: &AppState, scope: &Scope) -> Result<(), StoreError> {
    for o in routes_of(state, scope).await? {
        super::objects::remove(state, &o, system_audit("kube.route.delete")).await?;
    }
    Ok(())
}
