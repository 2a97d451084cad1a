//! The pod controller (and, before each of its passes over a cluster,
//! the deployment and replica set controllers of `apps`; after it, the
//! endpoints and inference service controllers): every pod of every tenant cluster runs as one
//! Atrium workload of the cluster's tenant, named `k8s.<hash>` of the
//! cluster, namespace and pod (a name no tenant can give: tenants' names
//! have no dots, so the controller never takes or deletes a workload of
//! theirs). Workloads are admitted as any other — the tenant's quota,
//! image namespace and priority — then placed and run by the fleet
//! scheduler and the agents. The pod's status is written back from the
//! workload's and its replica's; a workload whose pod is gone is deleted.
//!
//! A reconcile loop, as the placement controller: after every change to
//! pods, workloads or placements (debounced) and every 30 seconds.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use atrium_kube::pod::{status_of, workload_of};
use atrium_store::{AuditContext, Object, Store, StoreError, TenantFilter, Write, WriteError};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::objects::Scope;
use crate::error::ApiError;
use crate::kinds::{Cluster, Deployment, Kind, Placement, Resource, Workload};
use crate::{stored, AppState};

/// The workload a pod runs as, by its cluster and store name
/// (`<namespace>/<pod>`).
pub fn workload_name(cluster_id: &str, pod_key: &str) -> String {
    let digest = Sha256::digest(format!("{cluster_id}/{pod_key}").as_bytes());
    format!("k8s.{}", &hex::encode(digest)[..16])
}

fn audit(action: &str) -> AuditContext {
    AuditContext::system("pod-controller", action)
}

/// Makes the workload of `pod`; `Err` says why it cannot be.
async fn create_workload(
    state: &AppState,
    tenant: &str,
    name: &str,
    pod: &Value,
) -> Result<(), String> {
    let spec = workload_of(pod).map_err(|e| e.message)?;
    let precondition = <Workload as Kind>::admit(state, Some(tenant), &spec, None)
        .await
        .map_err(|e| e.to_string())?;
    let body = stored::body::<Workload>(&spec, Workload::initial_status(&spec).as_ref())
        .map_err(|e| e.to_string())?;
    let w = Write::Create {
        kind: Workload::KIND.into(),
        id: crate::crud::new_id(Workload::ID_PREFIX),
        tenant: Some(tenant.to_string()),
        name: name.to_string(),
        body,
    };
    match state
        .store
        .write(w, precondition, audit("kube.pod.workload"))
        .await
    {
        Ok(_) => Ok(()),
        Err(WriteError::Rejected(e)) => Err(e.to_string()),
        Err(WriteError::Store(StoreError::NameTaken { .. })) => Ok(()),
        Err(WriteError::Store(e)) => Err(ApiError::from(e).to_string()),
    }
}

/// One pass: workloads for pods that lack one, statuses for pods whose
/// changed, no workload without its pod.
pub async fn reconcile(state: &AppState) -> Result<(), StoreError> {
    let store: &Store = &state.store;
    let all = TenantFilter::All;
    let clusters = store.list_all(Cluster::KIND, &all).await?;
    let workloads: HashMap<(String, String), Object> = store
        .list_all(Workload::KIND, &all)
        .await?
        .into_iter()
        .filter(|w| w.name.starts_with("k8s."))
        .map(|w| ((w.tenant.clone().unwrap_or_default(), w.name.clone()), w))
        .collect();
    let served = super::inference::made_by_services(state).await?;
    if clusters.is_empty() && workloads.is_empty() && served.is_empty() {
        // No cluster: any route left is an orphan.
        return super::routes::sweep(state, &HashSet::new()).await;
    }
    let mut serving = HashSet::new();
    let mut replicas: HashMap<String, Object> = HashMap::new();
    for p in store.list_all(Placement::KIND, &all).await? {
        if let Ok(spec) = stored::spec::<Placement>(&p) {
            // The newest placement of a workload's one replica.
            let newer = replicas.get(&spec.deployment).is_none_or(|q| q.id < p.id);
            if newer {
                replicas.insert(spec.deployment, p);
            }
        }
    }
    let Some(pods_type) = atrium_kube::find("", "v1", "pods") else {
        return Ok(());
    };
    let mut wanted: HashSet<(String, String)> = HashSet::new();
    for cluster in &clusters {
        let scope = Scope::of(state, cluster);
        super::apps::reconcile(state, &scope).await?;
        // Where the cluster's pods run: where its services are routed.
        let mut nodes = std::collections::BTreeSet::new();
        for pod in store
            .list_all(&scope.kind(pods_type), &scope.filter())
            .await?
        {
            if pod.body.pointer("/metadata/deletionTimestamp").is_some() {
                // Being deleted (its finalizers hold it): it runs no more.
                continue;
            }
            let name = workload_name(&cluster.id, &pod.name);
            let key = (scope.tenant.clone(), name.clone());
            wanted.insert(key.clone());
            let started = pod
                .body
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let status = match workloads.get(&key) {
                None => match create_workload(state, &scope.tenant, &name, &pod.body).await {
                    Ok(()) => continue,
                    Err(why) => status_of(Err(&why), None, &started),
                },
                Some(w) => {
                    let workload_status = stored::status::<Workload>(w);
                    let placed = replicas.get(&w.id);
                    if let Some(p) = placed.and_then(|p| stored::spec::<Placement>(p).ok()) {
                        nodes.insert(p.node);
                    }
                    let replica = placed.and_then(stored::status::<Placement>);
                    status_of(Ok(workload_status.as_ref()), replica.as_ref(), &started)
                }
            };
            if pod.body.get("status") != Some(&status) {
                let happened = atrium_kube::events::of_pod(
                    pod.body["metadata"]["name"].as_str().unwrap_or_default(),
                    pod.body["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default(),
                    pod.body.get("status"),
                    &status,
                );
                super::events::record(state, &scope, &pod.body, ("Pod", "v1"), &happened).await;
                let mut body = pod.body.clone();
                body["status"] = status;
                let w = Write::Update {
                    kind: pod.kind.clone(),
                    id: pod.id.clone(),
                    body,
                    if_revision: Some(pod.revision),
                };
                // A pod changed meanwhile: the next pass sees it.
                let _ = store.write::<()>(w, None, audit("kube.pod.status")).await;
            }
        }
        super::endpoints::reconcile(state, &scope).await?;
        super::routes::reconcile(state, &scope, &nodes).await?;
        super::quotas::reconcile(state, &scope).await?;
        super::delete::finish_terminating(state, &scope).await?;
        super::events::sweep(state, &scope).await?;
        super::inference::reconcile(state, &scope, &cluster.name, &served, &mut serving).await?;
    }
    super::inference::sweep(state, &served, &serving).await;
    let live: HashSet<&str> = clusters.iter().map(|c| c.id.as_str()).collect();
    super::routes::sweep(state, &live).await?;
    for (key, w) in &workloads {
        if !wanted.contains(key) {
            let gone = Write::Delete {
                kind: Workload::KIND.into(),
                id: w.id.clone(),
            };
            let _ = store
                .write::<()>(gone, None, audit("kube.pod.workload-delete"))
                .await;
        }
    }
    Ok(())
}

/// Whether changes after `seen` touch pods, workloads or placements (a
/// flood of other objects — config maps — wakes no pass that would list
/// every cluster's pods).
async fn relevant(store: &Store, seen: i64, head: i64) -> bool {
    const LOOK: u32 = 1000;
    match store
        .changes(seen, head, None, &TenantFilter::All, LOOK)
        .await
    {
        Ok(changes) => {
            changes.len() == LOOK as usize
                || changes.iter().any(|c| {
                    let kind = c.object.kind.as_str();
                    kind == Workload::KIND
                        || kind == Placement::KIND
                        || kind == Deployment::KIND
                        || [
                            ":pods",
                            ":deployments.apps",
                            ":replicasets.apps",
                            ":statefulsets.apps",
                            ":jobs.batch",
                            ":services",
                            ":resourcequotas",
                            ":inferenceservices.atrium.dev",
                        ]
                        .iter()
                        .any(|k| kind.ends_with(k))
                        // A namespace wakes a pass only when it terminates:
                        // every new cluster makes four.
                        || kind.ends_with(":namespaces")
                            && c.object.body.pointer("/metadata/deletionTimestamp").is_some()
                })
        }
        Err(_) => true,
    }
}

/// Runs `reconcile` after relevant changes and every 30 seconds, until
/// the server stops.
pub async fn run(state: AppState) {
    let mut heads = state.store.subscribe();
    let mut stop = state.shutdown.clone();
    loop {
        let mut seen = *heads.borrow_and_update();
        if let Err(e) = reconcile(&state).await {
            tracing::warn!(error = %e, "pod controller pass failed; retrying");
        }
        let tick = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                changed = heads.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let head = *heads.borrow_and_update();
                    if relevant(&state.store, seen, head).await {
                        break;
                    }
                    seen = head;
                }
                _ = &mut tick => break,
                _ = stop.changed() => return,
            }
        }
    }
}
