//! Nodes, as a tenant cluster shows them: the Atrium nodes its tenant's
//! pods may be placed on (a site its residency allows), read-only, built
//! from the fleet's own records at each read — never stored in the
//! cluster. What a tenant sees of a node is what it could ask a pod for:
//! its site and jurisdiction, its CPUs, memory and GPUs (by model), and
//! whether it takes work; nothing of other tenants' use of it.

use atrium_core::node::{NodeSpec, NodeState};
use serde_json::{json, Value};

/// The kubelet version a node reports (`kubectl get nodes`' VERSION).
fn version() -> String {
    let (major, minor) = crate::KUBERNETES_VERSION;
    format!("v{major}.{minor}.0-atrium")
}

/// Node `name` (Atrium id `id`, made at `created`) at `site`, in
/// `jurisdiction`.
pub fn node_object(
    name: &str,
    id: &str,
    created: &str,
    jurisdiction: &str,
    spec: &NodeSpec,
) -> Value {
    let gpu_model = spec.gpus.first().map_or("cpu", |g| g.model.as_str());
    let resources = json!({
        "cpu": format!("{}m", spec.capacity.cpu.0),
        "memory": format!("{}Ki", spec.capacity.memory.0 / 1024),
        "nvidia.com/gpu": spec.gpus.len().to_string(),
    });
    let ready = !matches!(spec.state, NodeState::Offline);
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": id,
            "creationTimestamp": created,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "topology.kubernetes.io/region": jurisdiction,
                "topology.kubernetes.io/zone": spec.site,
                "node.kubernetes.io/instance-type": gpu_model,
                "atrium.dev/site": spec.site,
            },
        },
        "spec": {},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{
                "type": "Ready",
                "status": if ready { "True" } else { "False" },
                "reason": if ready { "AtriumAgentReady" } else { "AtriumAgentOffline" },
                "message": format!("the node is {:?}", spec.state).to_lowercase(),
            }],
            "nodeInfo": {"kubeletVersion": version(), "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "runc"},
        },
    });
    if matches!(spec.state, NodeState::Cordoned | NodeState::Draining) {
        node["spec"]["unschedulable"] = json!(true);
    }
    node
}

/// `STATUS` as `kubectl get nodes` prints it.
pub fn status_word(node: &Value) -> String {
    let ready = node.pointer("/status/conditions/0/status") == Some(&json!("True"));
    let mut word = if ready { "Ready" } else { "NotReady" }.to_string();
    if node.pointer("/spec/unschedulable") == Some(&json!(true)) {
        word.push_str(",SchedulingDisabled");
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(state: &str) -> NodeSpec {
        serde_json::from_value(json!({"site": "fra", "state": state,
            "capacity": {"cpu": "64", "memory": "512Gi"},
            "gpus": [{"index": 0, "model": "H100-80GB", "memory": "80Gi"},
                     {"index": 1, "model": "H100-80GB", "memory": "80Gi"}]}))
        .unwrap()
    }

    #[test]
    fn a_node_shows_what_a_pod_could_ask_of_it() {
        let n = node_object("n1", "nod_1", "2026-01-01T00:00:00Z", "EU", &spec("ready"));
        assert_eq!(n["status"]["capacity"]["cpu"], "64000m");
        assert_eq!(n["status"]["capacity"]["nvidia.com/gpu"], "2");
        assert_eq!(
            n["status"]["capacity"]["memory"],
            format!("{}Ki", 512u64 << 20)
        );
        assert_eq!(
            n["metadata"]["labels"]["topology.kubernetes.io/region"],
            "EU"
        );
        assert_eq!(
            n["metadata"]["labels"]["node.kubernetes.io/instance-type"],
            "H100-80GB"
        );
        assert_eq!(status_word(&n), "Ready");
        let cordoned = node_object("n1", "nod_1", "", "EU", &spec("cordoned"));
        assert_eq!(status_word(&cordoned), "Ready,SchedulingDisabled");
        let offline = node_object("n1", "nod_1", "", "EU", &spec("offline"));
        assert_eq!(status_word(&offline), "NotReady");
    }
}
