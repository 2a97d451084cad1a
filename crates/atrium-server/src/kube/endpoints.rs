//! The endpoints controller: for each service of a cluster with a
//! selector, an `Endpoints` object of the same name listing the pods it
//! selects (`atrium_kube::service::endpoints_of`), rewritten when they
//! change; the ones it made are deleted with their service. Endpoints a
//! tenant writes for a service without a selector are left alone.
//!
//! It runs in the pod controller's passes, after the pods' statuses (their
//! addresses and readiness) were written back.

use std::collections::{HashMap, HashSet};

use atrium_kube::{find, service};
use atrium_store::StoreError;
use serde_json::{json, Value};

use super::controlled;
use super::objects::Scope;
use crate::AppState;

/// Marks the endpoints this controller made.
const MANAGED_BY: &str = "endpoints.atrium.dev/managed-by";

pub(super) async fn reconcile(state: &AppState, scope: &Scope) -> Result<(), StoreError> {
    let (Some(services_t), Some(endpoints_t), Some(pods_t)) = (
        find("", "v1", "services"),
        find("", "v1", "endpoints"),
        find("", "v1", "pods"),
    ) else {
        return Ok(());
    };
    let filter = scope.filter();
    let list = |t| {
        let kind = scope.kind(t);
        let filter = &filter;
        async move { state.store.list_all(&kind, filter).await }
    };
    let services = list(services_t).await?;
    let existing = list(endpoints_t).await?;
    if services.is_empty() && existing.is_empty() {
        return Ok(());
    }
    let mut pods: HashMap<String, Vec<Value>> = HashMap::new();
    for pod in list(pods_t).await? {
        let ns = pod.body["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        pods.entry(ns).or_default().push(pod.body);
    }
    let existing: HashMap<&str, &atrium_store::Object> =
        existing.iter().map(|o| (o.name.as_str(), o)).collect();
    let mut selecting = HashSet::new();
    for svc in services.iter().filter(|s| service::selects(&s.body)) {
        selecting.insert(svc.name.as_str());
        let ns = svc.body["metadata"]["namespace"].as_str().unwrap_or("");
        let mut want =
            service::endpoints_of(&svc.body, pods.get(ns).map_or(&[][..], Vec::as_slice));
        want["metadata"]["annotations"] = json!({MANAGED_BY: "endpoints-controller"});
        match existing.get(svc.name.as_str()) {
            None => {
                if let Err(e) = controlled::create(state, scope, endpoints_t, ns, want).await {
                    tracing::warn!(service = %svc.name, error = %e, "endpoints not made");
                }
            }
            Some(o)
                if o.body["subsets"] != want["subsets"]
                    || o.body["metadata"]["labels"] != want["metadata"]["labels"] =>
            {
                let mut new = o.body.clone();
                new["subsets"] = want["subsets"].take();
                new["metadata"]["labels"] = want["metadata"]["labels"].take();
                new["metadata"]["annotations"][MANAGED_BY] = json!("endpoints-controller");
                controlled::replace(state, endpoints_t, o, new).await;
            }
            Some(_) => {}
        }
    }
    for (name, o) in existing {
        let ours = o
            .body
            .pointer(&format!(
                "/metadata/annotations/{}",
                MANAGED_BY.replace('/', "~1")
            ))
            .is_some();
        if ours && !selecting.contains(name) {
            controlled::delete(state, endpoints_t, o).await;
        }
    }
    Ok(())
}
