//! The stateful set controller: carries out `atrium_kube::statefulset`'s
//! plan for each set — its pods named `<set>-<ordinal>`, each with that
//! name as its host name, labelled with its name, index and template
//! revision, owned by the set — and writes the status `kubectl rollout
//! status` reads: ready, current and updated replicas and revisions.

use atrium_kube::statefulset::{ordinal_of, plan, policy, Member, Step};
use atrium_store::Object;
use serde_json::{json, Value};

use super::apps::{owner, owner_reference, pod_ready, template_hash, text, Types};
use super::controlled;
use super::objects::Scope;
use crate::AppState;

const REVISION: &str = "controller-revision-hash";

/// Pod `ordinal` of set `sts`, of the template at `revision`.
fn member_pod(sts: &Value, name: &str, ordinal: u32, revision: &str) -> Value {
    let template = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let pod_name = format!("{name}-{ordinal}");
    let mut labels = template
        .pointer("/metadata/labels")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or(json!({}));
    labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
    labels["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
    labels[REVISION] = json!(revision);
    let mut spec = template.get("spec").cloned().unwrap_or(json!({}));
    spec["hostname"] = json!(pod_name);
    if let Some(service) = sts.pointer("/spec/serviceName").and_then(Value::as_str) {
        spec["subdomain"] = json!(service);
    }
    json!({
        "metadata": {"name": pod_name, "labels": labels,
                     "ownerReferences": owner_reference("apps/v1", "StatefulSet", sts)},
        "spec": spec,
    })
}

pub(super) async fn stateful_set(
    state: &AppState,
    scope: &Scope,
    t: &Types,
    sts: &Object,
    pods: &[Object],
) {
    let body = &sts.body;
    let (name, ns, uid) = (
        text(body, "/metadata/name"),
        text(body, "/metadata/namespace"),
        text(body, "/metadata/uid"),
    );
    let Ok(policy) = policy(body) else {
        // Refused when written; an older object is left as it is.
        return;
    };
    let template = body.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let revision = format!("{name}-{}", template_hash(&template));
    let owned: Vec<(u32, &Object)> = pods
        .iter()
        .filter(|p| owner(&p.body) == Some(uid))
        .filter_map(|p| Some((ordinal_of(name, text(&p.body, "/metadata/name"))?, p)))
        .collect();
    let members: Vec<Member> = owned
        .iter()
        .map(|(ordinal, p)| Member {
            ordinal: *ordinal,
            ready: pod_ready(&p.body),
            updated: p.body.pointer(&format!("/metadata/labels/{REVISION}"))
                == Some(&json!(revision)),
        })
        .collect();
    for step in plan(&policy, &members) {
        match step {
            Step::Create(i) => {
                let pod = member_pod(body, name, i, &revision);
                if let Err(e) = controlled::create(state, scope, t.pod, ns, pod).await {
                    tracing::debug!(statefulset = name, ordinal = i, error = %e, "pod not created");
                    break;
                }
            }
            Step::Delete(i) => {
                if let Some((_, pod)) = owned.iter().find(|(o, _)| *o == i) {
                    controlled::delete(state, t.pod, pod).await;
                }
            }
        }
    }
    let count = |f: &dyn Fn(&Member) -> bool| members.iter().filter(|m| f(m)).count() as u64;
    let updated = count(&|m| m.updated);
    let total = members.len() as u64;
    let all_updated = updated == total && total == u64::from(policy.replicas);
    let current_revision = if all_updated {
        revision.clone()
    } else {
        body.pointer("/status/currentRevision")
            .and_then(Value::as_str)
            .unwrap_or(&revision)
            .to_string()
    };
    let status = json!({
        "observedGeneration": body.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": total,
        "readyReplicas": count(&|m| m.ready),
        "availableReplicas": count(&|m| m.ready),
        "currentReplicas": if all_updated { updated } else { total - updated },
        "updatedReplicas": updated,
        "currentRevision": current_revision,
        "updateRevision": revision,
    });
    if body.get("status") != Some(&status) {
        let mut new = body.clone();
        new["status"] = status;
        controlled::replace(state, t.stateful_set, sts, new).await;
    }
}
