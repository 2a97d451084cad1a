//! ResourceQuotas: a create in a namespace is admitted against each of
//! its quotas (`atrium_kube::quota`), counting what the namespace's
//! objects of the same type (and, for pods, their compute) use; each
//! quota's status is kept in the pod controller's passes, for `kubectl
//! describe quota`.
//!
//! The count is read before the write, not in its transaction: creates
//! racing in one namespace can pass a quota by as many as race. The
//! tenant's Atrium quota, which bounds what it uses of the fleet, is
//! enforced in the transaction and is not passed.

use std::collections::{BTreeMap, BTreeSet};

use atrium_kube::quota::{add, admit as admit_one, hard, status, usage_of, Amounts};
use atrium_kube::{find, KubeError, ResourceType, SERVED};
use atrium_store::{Object, StoreError};
use serde_json::Value;

use super::controlled;
use super::objects::{store_error, Scope};
use crate::AppState;

fn quotas_type() -> Option<&'static ResourceType> {
    find("", "v1", "resourcequotas")
}

/// A finished pod uses nothing, as upstream counts.
fn counts(r: &ResourceType, obj: &Value) -> bool {
    r.builtin_kind() != "Pod"
        || !matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        )
}

async fn in_namespace(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    ns: &str,
) -> Result<Vec<Object>, StoreError> {
    let prefix = format!("{ns}/");
    Ok(state
        .store
        .list_all(&scope.kind(r), &scope.filter())
        .await?
        .into_iter()
        .filter(|o| o.name.starts_with(&prefix))
        .collect())
}

/// Admits `obj`, a new object of type `r` in `ns`, under the namespace's
/// quotas.
pub(super) async fn admit(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    ns: &str,
    obj: &Value,
) -> Result<(), KubeError> {
    let Some(quotas_t) = quotas_type() else {
        return Ok(());
    };
    let quotas = in_namespace(state, scope, quotas_t, ns)
        .await
        .map_err(store_error)?;
    if quotas.is_empty() || r.builtin_kind() == "ResourceQuota" {
        return Ok(());
    }
    let adding = usage_of(r, obj);
    let mut used = Amounts::new();
    for o in in_namespace(state, scope, r, ns)
        .await
        .map_err(store_error)?
    {
        if counts(r, &o.body) {
            add(&mut used, &usage_of(r, &o.body));
        }
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    for q in &quotas {
        let limits = hard(&q.body)?;
        let quota_name = q.body["metadata"]["name"].as_str().unwrap_or_default();
        admit_one(quota_name, &limits, &used, &adding)
            .map_err(|why| KubeError::exceeded_quota(&r.plural, name, &why))?;
    }
    Ok(())
}

/// The served type a quota resource name counts, if any.
fn counted_type(resource: &str) -> Option<&'static ResourceType> {
    let plural = match resource {
        "pods" | "services" | "configmaps" | "secrets" => return find("", "v1", resource),
        "cpu" | "memory" => return find("", "v1", "pods"),
        r if r.starts_with("requests.") || r.starts_with("limits.") => {
            return find("", "v1", "pods")
        }
        r => r.strip_prefix("count/")?,
    };
    let (plural, group) = plural.split_once('.').unwrap_or((plural, ""));
    SERVED
        .iter()
        .find(|t| t.plural == plural && t.group == group)
}

/// Keeps each quota's status: its hard amounts and what is used of them.
pub(super) async fn reconcile(state: &AppState, scope: &Scope) -> Result<(), StoreError> {
    let Some(quotas_t) = quotas_type() else {
        return Ok(());
    };
    let quotas = state
        .store
        .list_all(&scope.kind(quotas_t), &scope.filter())
        .await?;
    if quotas.is_empty() {
        return Ok(());
    }
    let mut limits = Vec::with_capacity(quotas.len());
    let mut wanted: BTreeSet<&'static str> = BTreeSet::new();
    for q in &quotas {
        let Ok(h) = hard(&q.body) else { continue };
        for key in h.keys() {
            if let Some(t) = counted_type(key) {
                wanted.insert(&t.plural);
            }
        }
        limits.push((q, h));
    }
    // Usage by namespace, over the types some quota counts.
    let mut used: BTreeMap<String, Amounts> = BTreeMap::new();
    for t in SERVED.iter().filter(|t| wanted.contains(t.plural.as_ref())) {
        for o in state
            .store
            .list_all(&scope.kind(t), &scope.filter())
            .await?
        {
            if counts(t, &o.body) {
                let ns = o.body["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                add(used.entry(ns).or_default(), &usage_of(t, &o.body));
            }
        }
    }
    for (q, h) in limits {
        let ns = q.body["metadata"]["namespace"].as_str().unwrap_or("");
        let now = status(&h, used.get(ns).unwrap_or(&Amounts::new()));
        if q.body.get("status") != Some(&now) {
            let mut new = q.body.clone();
            new["status"] = now;
            controlled::replace(state, quotas_t, q, new).await;
        }
    }
    Ok(())
}
