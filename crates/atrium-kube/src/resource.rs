//! The resources a tenant cluster serves: their group, version, kind,
//! names and scope. Everything else about them (discovery, paths, tables)
//! is read from this one list.

/// One resource type of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
}

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

impl ResourceType {
    /// `v1` or `apps/v1`, as `apiVersion` says it.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `configmaps` or `deployments.apps`: unique across groups.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn verbs(&self) -> &'static [&'static str] {
        if READ_ONLY.contains(&self.kind) {
            &["get", "list"]
        } else {
            VERBS
        }
    }
}

/// Every resource served, core group first.
pub const SERVED: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        short_names: &["ns"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        namespaced: false,
        short_names: &["no"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        namespaced: true,
        short_names: &["cm"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        namespaced: true,
        short_names: &[],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        short_names: &["po"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        short_names: &["ev"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        namespaced: true,
        short_names: &["sa"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "ResourceQuota",
        plural: "resourcequotas",
        singular: "resourcequota",
        namespaced: true,
        short_names: &["quota"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        namespaced: true,
        short_names: &["svc"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        namespaced: true,
        short_names: &["ep"],
    },
    ResourceType {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        singular: "deployment",
        namespaced: true,
        short_names: &["deploy"],
    },
    ResourceType {
        group: "apps",
        version: "v1",
        kind: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        namespaced: true,
        short_names: &["rs"],
    },
    ResourceType {
        group: "apps",
        version: "v1",
        kind: "StatefulSet",
        plural: "statefulsets",
        singular: "statefulset",
        namespaced: true,
        short_names: &["sts"],
    },
    ResourceType {
        group: "batch",
        version: "v1",
        kind: "Job",
        plural: "jobs",
        singular: "job",
        namespaced: true,
        short_names: &[],
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "Role",
        plural: "roles",
        singular: "role",
        namespaced: true,
        short_names: &[],
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRole",
        plural: "clusterroles",
        singular: "clusterrole",
        namespaced: false,
        short_names: &[],
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        singular: "rolebinding",
        namespaced: true,
        short_names: &[],
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        namespaced: false,
        short_names: &[],
    },
    ResourceType {
        group: "atrium.dev",
        version: "v1",
        kind: "InferenceService",
        plural: "inferenceservices",
        singular: "inferenceservice",
        namespaced: true,
        short_names: &["isvc"],
    },
];

/// Kinds in the `all` category (`kubectl get all`), as upstream's.
pub const ALL_CATEGORY: &[&str] = &[
    "Pod",
    "Service",
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "Job",
];

impl ResourceType {
    /// The categories it is listed under.
    pub fn categories(&self) -> &'static [&'static str] {
        if ALL_CATEGORY.contains(&self.kind) {
            &["all"]
        } else {
            &[]
        }
    }
}

/// Kinds a cluster shows but does not store: read, never written.
pub const READ_ONLY: &[&str] = &["Node"];

/// Kinds whose `status` is their controller's: a client's writes keep it.
pub const CONTROLLED_STATUS: &[&str] =
    &["Pod", "Deployment", "ReplicaSet", "Job", "InferenceService"];

/// Kinds with a `/scale` subresource.
pub const SCALABLE: &[&str] = &["Deployment", "ReplicaSet", "StatefulSet"];

/// The resource `plural` of `group`/`version`, if it is served.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    SERVED
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The groups other than core, each once, in the order served.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for r in SERVED.iter().filter(|r| !r.group.is_empty()) {
        if !seen.contains(&(r.group, r.version)) {
            seen.push((r.group, r.version));
        }
    }
    seen
}
