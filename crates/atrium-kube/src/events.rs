//! Events the controllers emit, as `kubectl describe` lists them: what
//! changed in a pod's status between two passes (scheduled, started,
//! restarting, failing to pull, refused), as upstream's kubelet and
//! scheduler would say it. One event object per object and reason, its
//! `count` raised when it happens again — so a crash-looping pod has one
//! `BackOff` event, not one per restart — and each is kept an hour after
//! it last happened.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// How long an event is kept after it last happened, as upstream's
/// default `--event-ttl`.
pub const TTL_SECONDS: i64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

fn container(status: Option<&Value>) -> (&str, u64, &str) {
    let c = status.and_then(|s| s.pointer("/containerStatuses/0"));
    let state = c
        .and_then(|c| c["state"].as_object())
        .and_then(|m| m.keys().next())
        .map_or("", String::as_str);
    let waiting = c
        .and_then(|c| c.pointer("/state/waiting/reason"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let restarts = c.and_then(|c| c["restartCount"].as_u64()).unwrap_or(0);
    (state, restarts, waiting)
}

/// What happened to a pod between its `old` status and its `new` one.
pub fn of_pod(name: &str, namespace: &str, old: Option<&Value>, new: &Value) -> Vec<Event> {
    let mut out = Vec::new();
    let text = |s: Option<&Value>, p: &str| {
        s.and_then(|s| s.pointer(p))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let scheduled = |s: Option<&Value>| {
        s.and_then(|s| s["conditions"].as_array()).is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "PodScheduled" && c["status"] == "True")
        })
    };
    if new["reason"] == "Unschedulable" && text(old, "/message") != text(Some(new), "/message") {
        out.push(Event {
            warning: true,
            reason: "FailedScheduling",
            message: text(Some(new), "/message"),
        });
    }
    if scheduled(Some(new)) && !scheduled(old) {
        out.push(Event {
            warning: false,
            reason: "Scheduled",
            message: format!("Successfully assigned {namespace}/{name}"),
        });
    }
    let (was, was_restarts, was_waiting) = container(old);
    let (is, restarts, waiting) = container(Some(new));
    if is == "running" && (was != "running" || restarts > was_restarts) {
        out.push(Event {
            warning: false,
            reason: "Started",
            message: "Started container main".into(),
        });
    }
    let why = text(Some(new), "/containerStatuses/0/state/waiting/message");
    if waiting == "ErrImagePull" && was_waiting != "ErrImagePull" {
        out.push(Event {
            warning: true,
            reason: "Failed",
            message: format!("Failed to pull image: {why}"),
        });
    }
    if waiting == "CrashLoopBackOff"
        && (was_waiting != "CrashLoopBackOff" || restarts > was_restarts)
    {
        out.push(Event {
            warning: true,
            reason: "BackOff",
            message: format!("Back-off restarting failed container main: {why}"),
        });
    }
    out
}

/// The name of `involved`'s event for `reason`: one per object and reason.
pub fn name_of(involved: &Value, reason: &str) -> String {
    let uid = involved["metadata"]["uid"].as_str().unwrap_or("");
    let digest = Sha256::digest(format!("{uid}/{reason}").as_bytes());
    let name = involved["metadata"]["name"].as_str().unwrap_or("");
    format!("{name}.{}", &hex::encode(digest)[..16])
}

/// A new event object about `involved` (of `kind`, `apiVersion`).
pub fn object(involved: &Value, kind: &str, api_version: &str, e: &Event, now: &str) -> Value {
    let meta = &involved["metadata"];
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name_of(involved, e.reason), "namespace": meta["namespace"]},
        "involvedObject": {"kind": kind, "apiVersion": api_version, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta["uid"]},
        "reason": e.reason,
        "message": e.message,
        "type": if e.warning { "Warning" } else { "Normal" },
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": "atrium"},
        "reportingComponent": "atrium",
    })
}

/// `existing`, happened again at `now` with `message`.
pub fn again(existing: &Value, message: &str, now: &str) -> Value {
    let mut e = existing.clone();
    e["count"] = json!(existing["count"].as_u64().unwrap_or(1).saturating_add(1));
    e["lastTimestamp"] = json!(now);
    e["message"] = json!(message);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: Value, restarts: u64) -> Value {
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
               "containerStatuses": [{"name": "main", "restartCount": restarts, "state": state}]})
    }

    #[test]
    fn a_pods_life_reads_as_upstreams_events() {
        let creating = status(json!({"waiting": {"reason": "ContainerCreating"}}), 0);
        let first: Vec<&str> = of_pod("web", "default", None, &creating)
            .iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(first, ["Scheduled"]);
        let running = status(json!({"running": {}}), 0);
        let started = of_pod("web", "default", Some(&creating), &running);
        assert_eq!(started[0].reason, "Started");
        assert!(
            of_pod("web", "default", Some(&running), &running).is_empty(),
            "nothing new"
        );
        let crashed = status(
            json!({"waiting": {"reason": "CrashLoopBackOff", "message": "exit 1"}}),
            1,
        );
        let backoff = of_pod("web", "default", Some(&running), &crashed);
        assert_eq!(backoff[0].reason, "BackOff");
        assert!(backoff[0].warning && backoff[0].message.contains("exit 1"));
        let again_running = status(json!({"running": {}}), 1);
        assert_eq!(
            of_pod("web", "default", Some(&crashed), &again_running)[0].reason,
            "Started"
        );
        let refused = json!({"phase": "Pending", "reason": "Unschedulable", "message": "quota"});
        assert_eq!(
            of_pod("web", "default", None, &refused)[0].reason,
            "FailedScheduling"
        );
        assert!(of_pod("web", "default", Some(&refused), &refused).is_empty());
    }

    #[test]
    fn one_event_per_object_and_reason_counts_its_repeats() {
        let pod = json!({"metadata": {"name": "web", "namespace": "default", "uid": "u1"}});
        let e = Event {
            warning: true,
            reason: "BackOff",
            message: "m".into(),
        };
        let first = object(&pod, "Pod", "v1", &e, "2026-01-01T00:00:00Z");
        assert_eq!(first["metadata"]["name"], name_of(&pod, "BackOff"));
        assert_ne!(name_of(&pod, "BackOff"), name_of(&pod, "Started"));
        let second = again(&first, "m2", "2026-01-01T00:01:00Z");
        assert_eq!(second["count"], 2);
        assert_eq!(second["firstTimestamp"], "2026-01-01T00:00:00Z");
        assert_eq!(second["message"], "m2");
    }
}
