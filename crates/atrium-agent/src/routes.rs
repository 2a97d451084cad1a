//! Tenant clusters' services on this node: the agent follows the service
//! routes that name this node and keeps each tenant's network carrying
//! its tenant's (`sandbox::services`). A tenant's network is made with its
//! first workload here; its routes go in as soon as it exists (checked at
//! each change and every few seconds), and again after the agent
//! restarts, since the table is replaced whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_api::{Object, ServiceRoute};
use atrium_client::{Api, Update};
use atrium_core::service_route::ServiceRouteSpec;
use tokio::sync::Notify;

use crate::sandbox::services::ruleset;
use crate::supervisor::Shared;

/// How often tenants' networks are checked for routes to put in.
const EVERY: Duration = Duration::from_secs(2);

/// Routes by id: their tenant and spec.
type Routes = HashMap<String, (String, ServiceRouteSpec)>;

/// Follows this node's service routes and applies them, until dropped.
pub async fn run(shared: Arc<Shared>) {
    let routes: Arc<Mutex<Routes>> = Arc::default();
    let changed = Arc::new(Notify::new());
    let follow = {
        let (routes, changed, node) = (
            routes.clone(),
            changed.clone(),
            shared.config.node_name().to_string(),
        );
        let api = Api::<ServiceRoute>::all(&shared.cp);
        async move {
            api.follow(move |update| {
                let mut routes = routes.lock().unwrap_or_else(|p| p.into_inner());
                match update {
                    Update::Snapshot(items) => {
                        routes.clear();
                        for o in items {
                            keep(&mut routes, &node, o);
                        }
                    }
                    Update::Added(o) | Update::Modified(o) => keep(&mut routes, &node, o),
                    Update::Deleted(o) => {
                        routes.remove(&o.id);
                    }
                }
                changed.notify_one();
            })
            .await
        }
    };
    let apply = async move {
        // What each tenant's network carries now, as last applied.
        let mut applied: HashMap<String, String> = HashMap::new();
        loop {
            let wanted = by_tenant(&routes.lock().unwrap_or_else(|p| p.into_inner()));
            let tenants: Vec<String> = applied.keys().chain(wanted.keys()).cloned().collect();
            for tenant in tenants {
                let script = wanted.get(&tenant).map_or_else(
                    || ruleset(&[]),
                    |specs| ruleset(&specs.iter().collect::<Vec<_>>()),
                );
                if applied.get(&tenant) == Some(&script) {
                    continue;
                }
                if !shared.host.has_network(&tenant) {
                    applied.remove(&tenant);
                    continue;
                }
                let (host, t, s) = (shared.host.clone(), tenant.clone(), script.clone());
                match tokio::task::spawn_blocking(move || host.apply_services(&t, &s)).await {
                    Ok(Ok(())) => {
                        tracing::info!(%tenant, "agent: tenant's service routes applied");
                        if wanted.contains_key(&tenant) {
                            applied.insert(tenant, script);
                        } else {
                            applied.remove(&tenant);
                        }
                    }
                    Ok(Err(why)) => {
                        tracing::warn!(%tenant, %why, "agent: cannot apply service routes");
                    }
                    Err(e) => tracing::warn!(%tenant, error = %e, "agent: route task failed"),
                }
            }
            let _ = tokio::time::timeout(EVERY, changed.notified()).await;
        }
    };
    tokio::select! {
        _ = follow => {}
        _ = apply => {}
    }
}

/// Records `o` if it names this node (`node`), else forgets it.
fn keep(routes: &mut Routes, node: &str, o: Object<ServiceRoute>) {
    if o.spec.nodes.iter().any(|n| n == node) {
        routes.insert(o.id, (o.tenant.unwrap_or_default(), o.spec));
    } else {
        routes.remove(&o.id);
    }
}

/// Each tenant's routes, in a stable order.
fn by_tenant(routes: &Routes) -> BTreeMap<String, Vec<ServiceRouteSpec>> {
    let mut sorted: Vec<(&String, &(String, ServiceRouteSpec))> = routes.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out: BTreeMap<String, Vec<ServiceRouteSpec>> = BTreeMap::new();
    for (_, (tenant, spec)) in sorted {
        out.entry(tenant.clone()).or_default().push(spec.clone());
    }
    out
}
