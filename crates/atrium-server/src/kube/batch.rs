//! Jobs of a tenant cluster (batch/v1), as upstream's job controller runs
//! them: pods made from the template, `parallelism` at a time, until
//! `completions` of them succeed — then `Complete` — or more than
//! `backoffLimit` fail — then `Failed`, and what still runs is deleted.
//! Each pod is labelled with its job's name and owned by it.

use atrium_store::Object;
use serde_json::{json, Value};

use super::apps::{owner, owner_reference, text, Types};
use super::controlled;
use super::objects::Scope;
use crate::AppState;

fn phase(pod: &Value) -> &str {
    text(pod, "/status/phase")
}

fn now() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One step of job `job`, whose cluster's pods are `pods`.
pub(super) async fn job(state: &AppState, scope: &Scope, t: &Types, job: &Object, pods: &[Object]) {
    let body = &job.body;
    let (name, ns, uid) = (
        text(body, "/metadata/name"),
        text(body, "/metadata/namespace"),
        text(body, "/metadata/uid"),
    );
    let spec = |p: &str, default: u64| body.pointer(p).and_then(Value::as_u64).unwrap_or(default);
    let (completions, parallelism, backoff) = (
        spec("/spec/completions", 1),
        spec("/spec/parallelism", 1),
        spec("/spec/backoffLimit", 6),
    );
    let owned: Vec<&Object> = pods
        .iter()
        .filter(|p| owner(&p.body) == Some(uid))
        .collect();
    let of = |want: &str| owned.iter().filter(|p| phase(&p.body) == want).count() as u64;
    let (succeeded, failed) = (of("Succeeded"), of("Failed"));
    let active: Vec<&&Object> = owned
        .iter()
        .filter(|p| !matches!(phase(&p.body), "Succeeded" | "Failed"))
        .collect();
    let was = body.get("status").cloned().unwrap_or(json!({}));
    let finished = was
        .get("conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["status"] == "True"));
    let mut status = json!({
        "active": active.len(),
        "succeeded": succeeded,
        "failed": failed,
        "ready": active.iter().filter(|p| p.body.pointer("/status/containerStatuses/0/ready") == Some(&json!(true))).count(),
        "startTime": was.get("startTime").cloned().unwrap_or(json!(now())),
    });
    let ended = |kind: &str, reason: &str| json!([{"type": kind, "status": "True", "reason": reason, "lastTransitionTime": now()}]);
    if finished {
        status["conditions"] = was["conditions"].clone();
        if let Some(at) = was.get("completionTime") {
            status["completionTime"] = at.clone();
        }
    } else if succeeded >= completions {
        status["conditions"] = ended("Complete", "CompletionsReached");
        status["completionTime"] = json!(now());
    } else if failed > backoff {
        status["conditions"] = ended("Failed", "BackoffLimitExceeded");
        for pod in &active {
            controlled::delete(state, t.pod, pod).await;
        }
        status["active"] = json!(0);
    } else {
        let want = parallelism.min(completions.saturating_sub(succeeded));
        let template = body.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let mut labels = template
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        if !labels.is_object() {
            labels = json!({});
        }
        labels["job-name"] = json!(name);
        labels["batch.kubernetes.io/job-name"] = json!(name);
        let mut pod_spec = template.get("spec").cloned().unwrap_or(json!({}));
        if pod_spec.get("restartPolicy").is_none() {
            pod_spec["restartPolicy"] = json!("Never");
        }
        for _ in (active.len() as u64)..want {
            let pod = json!({
                "metadata": {"generateName": format!("{name}-"), "labels": labels,
                             "ownerReferences": owner_reference("batch/v1", "Job", body)},
                "spec": pod_spec,
            });
            if let Err(e) = controlled::create(state, scope, t.pod, ns, pod).await {
                status["conditions"] = json!([{"type": "Failed", "status": "True",
                    "reason": "PodInvalid", "message": e.message, "lastTransitionTime": now()}]);
                break;
            }
        }
    }
    if body.get("status") != Some(&status) {
        let mut new = body.clone();
        new["status"] = status;
        controlled::replace(state, t.job, job, new).await;
    }
}
