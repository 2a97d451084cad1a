//! Deployments and replica sets of a tenant cluster, as upstream's
//! controllers run them: a deployment owns one replica set per pod
//! template (`<deployment>-<template hash>`), scales the current one to
//! its replicas and the older ones to zero once the current one is
//! ready (a rolling update, one step); a replica set keeps its number of
//! pods, each owned by it; what has lost its owner is deleted (garbage
//! collection by `ownerReferences`); stateful sets are `statefulsets`'.
//! Statuses are written back as
//! `kubectl rollout status` reads them: observed generation, replica
//! counts, conditions.

use std::collections::HashSet;

use atrium_kube::events::Event;
use atrium_kube::{find, ResourceType};
use atrium_store::{Object, StoreError};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::controlled;
use super::objects::Scope;
use crate::AppState;

/// The uid of the controller owning `obj`, if any.
pub(super) fn owner(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| r["controller"] == json!(true))?
        .get("uid")?
        .as_str()
}

pub(super) fn text<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn count(obj: &Value, pointer: &str) -> u64 {
    obj.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// The desired replicas (1 when unset, as upstream).
fn replicas(obj: &Value) -> u64 {
    obj.pointer("/spec/replicas")
        .and_then(Value::as_u64)
        .unwrap_or(1)
}

pub(super) fn owner_reference(api_version: &str, kind: &str, obj: &Value) -> Value {
    json!([{"apiVersion": api_version, "kind": kind, "name": text(obj, "/metadata/name"),
            "uid": text(obj, "/metadata/uid"), "controller": true, "blockOwnerDeletion": true}])
}

/// `labels` with `extra` added.
fn with_label(labels: Option<&Value>, key: &str, value: &str) -> Value {
    let mut labels = labels
        .cloned()
        .filter(Value::is_object)
        .unwrap_or(json!({}));
    labels[key] = json!(value);
    labels
}

pub(super) fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/containerStatuses/0/ready") == Some(&json!(true))
}

pub(super) struct Types {
    deployment: &'static ResourceType,
    replica_set: &'static ResourceType,
    pub stateful_set: &'static ResourceType,
    pub job: &'static ResourceType,
    pub pod: &'static ResourceType,
}

fn types() -> Option<Types> {
    Some(Types {
        deployment: find("apps", "v1", "deployments")?,
        replica_set: find("apps", "v1", "replicasets")?,
        stateful_set: find("apps", "v1", "statefulsets")?,
        job: find("batch", "v1", "jobs")?,
        pod: find("", "v1", "pods")?,
    })
}

async fn list(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
) -> Result<Vec<Object>, StoreError> {
    state.store.list_all(&scope.kind(r), &scope.filter()).await
}

/// One pass over one cluster's deployments, replica sets and jobs, and
/// their pods.
pub async fn reconcile(state: &AppState, scope: &Scope) -> Result<(), StoreError> {
    let Some(t) = types() else { return Ok(()) };
    let deployments = list(state, scope, t.deployment).await?;
    let sets = list(state, scope, t.replica_set).await?;
    let jobs = list(state, scope, t.job).await?;
    let stateful = list(state, scope, t.stateful_set).await?;
    let pods = list(state, scope, t.pod).await?;
    let uids = |objects: &[Object]| -> HashSet<String> {
        objects
            .iter()
            .map(|o| text(&o.body, "/metadata/uid").to_string())
            .collect()
    };
    let (deployment_uids, mut set_uids) = (uids(&deployments), uids(&sets));
    // Pods are owned by replica sets, jobs or stateful sets.
    set_uids.extend(uids(&jobs));
    set_uids.extend(uids(&stateful));
    // What lost its owner goes: a deleted deployment's replica sets, and
    // in the same pass their pods.
    for rs in &sets {
        if owner(&rs.body).is_some_and(|u| !deployment_uids.contains(u)) {
            controlled::delete(state, t.replica_set, rs).await;
            set_uids.remove(text(&rs.body, "/metadata/uid"));
        }
    }
    for pod in &pods {
        if owner(&pod.body).is_some_and(|u| !set_uids.contains(u)) {
            controlled::delete(state, t.pod, pod).await;
        }
    }
    for job in &jobs {
        super::batch::job(state, scope, &t, job, &pods).await;
    }
    for d in &deployments {
        deployment(state, scope, &t, d, &sets).await;
    }
    for sts in &stateful {
        super::statefulsets::stateful_set(state, scope, &t, sts, &pods).await;
    }
    for rs in &sets {
        if owner(&rs.body).is_none_or(|u| deployment_uids.contains(u)) {
            replica_set(state, scope, &t, rs, &pods).await;
        }
    }
    Ok(())
}

/// The template's hash: its replica set's name suffix.
pub(super) fn template_hash(template: &Value) -> String {
    let digest = Sha256::digest(template.to_string().as_bytes());
    hex::encode(digest)[..10].to_string()
}

async fn deployment(state: &AppState, scope: &Scope, t: &Types, d: &Object, sets: &[Object]) {
    let body = &d.body;
    let (name, ns, uid) = (
        text(body, "/metadata/name"),
        text(body, "/metadata/namespace"),
        text(body, "/metadata/uid"),
    );
    let desired = replicas(body);
    let template = body.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let hash = template_hash(&template);
    let current_name = format!("{name}-{hash}");
    let owned: Vec<&Object> = sets
        .iter()
        .filter(|s| owner(&s.body) == Some(uid))
        .collect();
    let current = owned
        .iter()
        .find(|s| text(&s.body, "/metadata/name") == current_name);
    match current {
        None => {
            let mut pod_template = template.clone();
            pod_template["metadata"]["labels"] = with_label(
                template.pointer("/metadata/labels"),
                "pod-template-hash",
                &hash,
            );
            let selector = with_label(
                body.pointer("/spec/selector/matchLabels"),
                "pod-template-hash",
                &hash,
            );
            let rs = json!({
                "metadata": {"name": current_name, "labels": pod_template["metadata"]["labels"],
                             "ownerReferences": owner_reference("apps/v1", "Deployment", body)},
                "spec": {"replicas": desired, "selector": {"matchLabels": selector}, "template": pod_template},
            });
            match controlled::create(state, scope, t.replica_set, ns, rs).await {
                Ok(()) => scaled(state, scope, body, &current_name, 0, desired).await,
                Err(e) => tracing::debug!(deployment = name, error = %e, "replica set not created"),
            }
        }
        Some(rs) if replicas(&rs.body) != desired => {
            let mut new = rs.body.clone();
            new["spec"]["replicas"] = json!(desired);
            controlled::replace(state, t.replica_set, rs, new).await;
            scaled(
                state,
                scope,
                body,
                &current_name,
                replicas(&rs.body),
                desired,
            )
            .await;
        }
        Some(_) => {}
    }
    let ready_now = current.map_or(0, |rs| count(&rs.body, "/status/readyReplicas"));
    // The older templates go once the current one is ready.
    if ready_now >= desired {
        for old in owned
            .iter()
            .filter(|s| text(&s.body, "/metadata/name") != current_name)
        {
            if replicas(&old.body) != 0 {
                let mut new = old.body.clone();
                new["spec"]["replicas"] = json!(0);
                controlled::replace(state, t.replica_set, old, new).await;
                let old_name = text(&old.body, "/metadata/name");
                scaled(state, scope, body, old_name, replicas(&old.body), 0).await;
            }
        }
    }
    let sum = |p: &str| owned.iter().map(|s| count(&s.body, p)).sum::<u64>();
    let (total, ready) = (sum("/status/replicas"), sum("/status/readyReplicas"));
    let updated = current.map_or(0, |rs| count(&rs.body, "/status/replicas"));
    let complete = updated >= desired && ready_now >= desired && total == desired;
    let status = json!({
        "observedGeneration": body.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": total.saturating_sub(ready),
        "conditions": [
            {"type": "Available", "status": if ready >= desired { "True" } else { "False" },
             "reason": if ready >= desired { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" }},
            {"type": "Progressing", "status": "True",
             "reason": if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
             "message": format!("ReplicaSet {current_name:?} {}", if complete { "has successfully progressed." } else { "is progressing." })},
        ],
    });
    if body.get("status") != Some(&status) {
        let mut new = body.clone();
        new["status"] = status;
        controlled::replace(state, t.deployment, d, new).await;
    }
}

/// Records deployment `d` scaling replica set `rs` from `from` to `to`,
/// as upstream words it.
async fn scaled(state: &AppState, scope: &Scope, d: &Value, rs: &str, from: u64, to: u64) {
    let way = if to > from { "up" } else { "down" };
    let event = Event {
        warning: false,
        reason: "ScalingReplicaSet",
        message: format!("Scaled {way} replica set {rs} from {from} to {to}"),
    };
    let kind = ("Deployment", "apps/v1");
    super::events::record(state, scope, d, kind, &[event]).await;
}

async fn replica_set(state: &AppState, scope: &Scope, t: &Types, rs: &Object, pods: &[Object]) {
    let body = &rs.body;
    let (name, ns, uid) = (
        text(body, "/metadata/name"),
        text(body, "/metadata/namespace"),
        text(body, "/metadata/uid"),
    );
    let desired = replicas(body);
    let mut owned: Vec<&Object> = pods
        .iter()
        .filter(|p| owner(&p.body) == Some(uid))
        .collect();
    let have = owned.len() as u64;
    let mut failure = None;
    for _ in have..desired {
        let template = body.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let pod = json!({
            "metadata": {"generateName": format!("{name}-"),
                         "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                         "ownerReferences": owner_reference("apps/v1", "ReplicaSet", body)},
            "spec": template.get("spec").cloned().unwrap_or(json!({})),
        });
        if let Err(e) = controlled::create(state, scope, t.pod, ns, pod).await {
            failure = Some(e);
            break;
        }
    }
    if have > desired {
        // Not-ready pods go first, then the newest.
        owned.sort_by_key(|p| (pod_ready(&p.body), std::cmp::Reverse(p.revision)));
        for pod in owned.iter().take((have - desired) as usize) {
            controlled::delete(state, t.pod, pod).await;
        }
    }
    let ready = owned.iter().filter(|p| pod_ready(&p.body)).count() as u64;
    let mut status = json!({
        "replicas": have,
        "readyReplicas": ready.min(desired),
        "availableReplicas": ready.min(desired),
        "fullyLabeledReplicas": have,
        "observedGeneration": body.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    if let Some(e) = failure {
        status["conditions"] = json!([{"type": "ReplicaFailure", "status": "True",
            "reason": "FailedCreate", "message": e.message}]);
    }
    if body.get("status") != Some(&status) {
        let mut new = body.clone();
        new["status"] = status;
        controlled::replace(state, t.replica_set, rs, new).await;
    }
}
