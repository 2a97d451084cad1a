//! Pods as Atrium runs them: each pod of a tenant cluster is one Atrium
//! workload of that tenant (`pod-<hash>`), placed by the fleet scheduler
//! on the tenant's quota and run by the agents' container runtime; the
//! pod's status is read back from the workload's and its replica's. This
//! module is the translation both ways, and what a pod may not ask for.
//!
//! One container per pod; no host namespaces, privileged containers,
//! added capabilities or host paths — a pod is sandboxed exactly as any
//! workload is, whatever its spec says, and a spec asking for more is
//! refused rather than quietly run with less.

use std::collections::BTreeMap;

use atrium_core::deployment::Resources;
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::placement::ReplicaStatus;
use atrium_core::quantity::{ByteSize, CpuMillis, GpuRequest};
use atrium_core::workload::{ContainerSpec, JobSpec, WorkloadKind, WorkloadSpec};
use serde_json::{json, Value};

use crate::status::KubeError;

/// CPU and memory a container gets when it names none.
const DEFAULT_CPU: &str = "100m";
const DEFAULT_MEMORY: &str = "128Mi";

fn invalid(pod: &Value, why: impl Into<String>) -> KubeError {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    KubeError::invalid("Pod", name, why)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What the spec asks that no workload gets.
fn refuse_privileges(pod: &Value) -> Result<(), KubeError> {
    let spec = &pod["spec"];
    for host in ["hostNetwork", "hostPID", "hostIPC", "hostUsers"] {
        if spec[host] == json!(true) {
            return Err(invalid(
                pod,
                format!("spec.{host}: a tenant's pod shares nothing with its node"),
            ));
        }
    }
    if spec
        .get("volumes")
        .and_then(Value::as_array)
        .is_some_and(|v| !v.is_empty())
    {
        return Err(invalid(pod, "spec.volumes: pod volumes are not supported yet; use an Atrium volume through a workload"));
    }
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    if security["privileged"] == json!(true) || security["allowPrivilegeEscalation"] == json!(true)
    {
        return Err(invalid(pod, "spec.containers[0].securityContext: privileged containers and privilege escalation are not allowed"));
    }
    if security
        .pointer("/capabilities/add")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(invalid(pod, "spec.containers[0].securityContext.capabilities.add: containers run with no capabilities"));
    }
    Ok(())
}

fn quantity<T: std::str::FromStr>(pod: &Value, field: &str, v: &Value) -> Result<T, KubeError>
where
    T::Err: std::fmt::Display,
{
    crate::parse_quantity(v).map_err(|e| invalid(pod, format!("{field}: {e}")))
}

/// A pod's host name, as the kubelet gives it: `spec.hostname`, else
/// the pod's name cut to 63 bytes without a trailing '-' or '.'.
fn hostname_of(pod: &Value) -> String {
    let given = pod.pointer("/spec/hostname").and_then(Value::as_str);
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = given.unwrap_or(name);
    let cut: String = name.chars().take(63).collect();
    cut.trim_end_matches(['-', '.']).to_string()
}

/// The workload a pod runs as.
pub fn workload_of(pod: &Value) -> Result<WorkloadSpec, KubeError> {
    refuse_privileges(pod)?;
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(pod, "spec.containers: Required value"))?;
    if containers.len() != 1 {
        return Err(invalid(
            pod,
            "spec.containers: exactly one container per pod is supported",
        ));
    }
    if pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(invalid(pod, "spec.initContainers: not supported yet"));
    }
    let c = &containers[0];
    let image = c["image"]
        .as_str()
        .ok_or_else(|| invalid(pod, "spec.containers[0].image: Required value"))?
        .to_string();
    let mut env = BTreeMap::new();
    for (i, e) in c["env"].as_array().into_iter().flatten().enumerate() {
        let (Some(name), Some(value)) = (e["name"].as_str(), e.get("value")) else {
            return Err(invalid(
                pod,
                format!("spec.containers[0].env[{i}]: only name and value are supported"),
            ));
        };
        env.insert(
            name.to_string(),
            value.as_str().unwrap_or_default().to_string(),
        );
    }
    let ports = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            p["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| {
                    invalid(
                        pod,
                        "spec.containers[0].ports: containerPort must be 1-65535",
                    )
                })
        })
        .collect::<Result<Vec<u16>, _>>()?;
    // The limit when given, else the request, else a small default.
    let amount = |name: &str| {
        c.pointer(&format!("/resources/limits/{name}"))
            .or_else(|| c.pointer(&format!("/resources/requests/{name}")))
    };
    let field = |name: &str| format!("spec.containers[0].resources.{name}");
    let cpu: CpuMillis = quantity(
        pod,
        &field("cpu"),
        amount("cpu").unwrap_or(&json!(DEFAULT_CPU)),
    )?;
    let memory: ByteSize = quantity(
        pod,
        &field("memory"),
        amount("memory").unwrap_or(&json!(DEFAULT_MEMORY)),
    )?;
    let gpu: Option<GpuRequest> = amount("nvidia.com~1gpu")
        .map(|g| quantity(pod, &field("nvidia.com/gpu"), g))
        .transpose()?;
    let restart = pod
        .pointer("/spec/restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always");
    let (kind, job) = match restart {
        "Always" => (WorkloadKind::Service, None),
        "OnFailure" => (WorkloadKind::Job, Some(JobSpec::default())),
        "Never" => (
            WorkloadKind::Job,
            Some(JobSpec {
                backoff_limit: 0,
                ..JobSpec::default()
            }),
        ),
        other => {
            return Err(invalid(
                pod,
                format!("spec.restartPolicy: Unsupported value: {other:?}"),
            ))
        }
    };
    let spec = WorkloadSpec {
        kind,
        job,
        ..WorkloadSpec::service(
            ContainerSpec {
                image,
                command: strings(c.get("command")),
                args: strings(c.get("args")),
                env,
                ports,
                hostname: Some(hostname_of(pod)),
            },
            Resources {
                cpu,
                memory,
                gpu,
                gpu_memory: None,
                gpu_models: Vec::new(),
                storage: ByteSize::default(),
            },
        )
    };
    spec.validate().map_err(|e| invalid(pod, e.to_string()))?;
    Ok(spec)
}

/// The pod's `status`, from its workload's and its replica's. `Err`
/// means the workload could not even be made (quota, image refused).
pub fn status_of(
    workload: Result<Option<&Status>, &str>,
    replica: Option<&ReplicaStatus>,
    started: &str,
) -> Value {
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        json!({"type": kind, "status": if ok { "True" } else { "False" },
               "reason": reason, "message": message, "lastTransitionTime": started})
    };
    let workload = match workload {
        Err(why) => {
            return json!({"phase": "Pending", "reason": "Unschedulable", "message": why,
                "conditions": [condition("PodScheduled", false, "Unschedulable", why)]});
        }
        Ok(w) => w,
    };
    let Some(replica) = replica else {
        let why = workload.map_or("waiting for placement", |s| s.reason.as_str());
        return json!({"phase": "Pending",
            "conditions": [condition("PodScheduled", false, "Unschedulable", why)]});
    };
    // On its tenant's overlay, where the cluster's pods on every node (and
    // so its services' endpoints) reach it; else its node-local address.
    let ip = replica.overlay_address.map(|a| a.to_string()).or_else(|| {
        replica
            .endpoint
            .as_deref()
            .and_then(|e| e.split_once("://"))
            .map(|(_, addr)| addr.rsplit_once(':').map_or(addr, |(ip, _)| ip).to_string())
    });
    let (phase, ready, state) = match replica.state {
        LifecycleState::Running => ("Running", true, json!({"running": {"startedAt": started}})),
        LifecycleState::Succeeded => (
            "Succeeded",
            false,
            json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
        ),
        LifecycleState::Failed if workload.is_some_and(|w| w.state == LifecycleState::Failed) => (
            "Failed",
            false,
            json!({"terminated": {"exitCode": 1, "reason": "Error", "message": replica.reason}}),
        ),
        LifecycleState::Failed => {
            let reason = if replica.reason.contains("ErrImagePull") {
                "ErrImagePull"
            } else {
                "CrashLoopBackOff"
            };
            (
                "Pending",
                false,
                json!({"waiting": {"reason": reason, "message": replica.reason}}),
            )
        }
        _ => (
            "Pending",
            false,
            json!({"waiting": {"reason": "ContainerCreating", "message": replica.reason}}),
        ),
    };
    let mut status = json!({
        "phase": phase,
        "conditions": [
            condition("PodScheduled", true, "", ""),
            condition("Ready", ready, "", ""),
        ],
        "containerStatuses": [{
            "name": "main", "ready": ready, "restartCount": replica.restarts,
            "state": state, "image": "", "imageID": "",
        }],
        "startTime": started,
    });
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    status
}

/// What `kubectl get pods` prints in STATUS: a waiting container's
/// reason, else the phase.
pub fn status_word(pod: &Value) -> String {
    pod.pointer("/status/containerStatuses/0/state/waiting/reason")
        .or_else(|| pod.pointer("/status/containerStatuses/0/state/terminated/reason"))
        .or_else(|| pod.pointer("/status/phase"))
        .and_then(Value::as_str)
        .unwrap_or("Pending")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(container: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [container]}})
    }

    #[test]
    fn a_pod_becomes_a_workload_with_its_limits() {
        let spec = workload_of(&pod(json!({"name": "main", "image": "acme/busybox:1",
            "command": ["/bin/busybox"], "args": ["httpd", "-f"],
            "env": [{"name": "MODE", "value": "fast"}], "ports": [{"containerPort": 8080}],
            "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "500m"}}})))
        .unwrap();
        assert_eq!(spec.kind, WorkloadKind::Service);
        assert_eq!(spec.container.ports, vec![8080]);
        assert_eq!(spec.resources.cpu, CpuMillis(500));
        assert_eq!(spec.resources.memory, ByteSize(64 << 20));
        assert_eq!(spec.container.env["MODE"], "fast");
    }

    #[test]
    fn a_pod_asking_for_the_host_is_refused() {
        let base = json!({"name": "main", "image": "acme/x:1"});
        let mut host = pod(base.clone());
        host["spec"]["hostNetwork"] = json!(true);
        let mut privileged = pod(base.clone());
        privileged["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
        let mut caps = pod(base.clone());
        caps["spec"]["containers"][0]["securityContext"] =
            json!({"capabilities": {"add": ["SYS_ADMIN"]}});
        let mut path = pod(base.clone());
        path["spec"]["volumes"] = json!([{"name": "root", "hostPath": {"path": "/"}}]);
        let two = json!({"metadata": {"name": "p"}, "spec": {"containers": [base.clone(), base]}});
        for bad in [host, privileged, caps, path, two] {
            let e = workload_of(&bad).unwrap_err();
            assert_eq!(e.code, 422, "{bad}");
        }
    }

    #[test]
    fn a_running_replica_is_a_ready_pod_with_its_address() {
        let replica = ReplicaStatus {
            state: LifecycleState::Running,
            reason: String::new(),
            endpoint: Some("tcp://10.236.0.2:8080".into()),
            restarts: 2,
            isolation: None,
            pid: None,
            overlay_address: None,
        };
        let s = status_of(Ok(None), Some(&replica), "t");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "10.236.0.2");
        assert_eq!(s["containerStatuses"][0]["restartCount"], 2);
        // On a node carrying overlays, its overlay address: services'
        // endpoints on other nodes reach it there.
        let joined = ReplicaStatus {
            overlay_address: Some("100.64.0.3".parse().unwrap()),
            ..replica.clone()
        };
        let s = status_of(Ok(None), Some(&joined), "t");
        assert_eq!(s["podIP"], "100.64.0.3");
        let failed = ReplicaStatus {
            state: LifecycleState::Failed,
            reason: "ErrImagePull: acme/nope:1".into(),
            ..replica
        };
        let s = status_of(Ok(None), Some(&failed), "t");
        assert_eq!(status_word(&json!({"status": s})), "ErrImagePull");
    }
}
