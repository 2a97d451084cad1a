//! The resources a tenant cluster serves: their group, version, kind,
//! names and scope. Everything else about them (discovery, paths, tables)
//! is read from them: the built-in ones in one list here, a cluster's own
//! custom resources from its definitions (`crd`), together its `Catalog`.

use std::borrow::Cow;
use std::sync::Arc;

use crate::crd::Custom;

/// A name of a resource type: static for the built-in ones, owned for a
/// custom resource's.
pub type Text = Cow<'static, str>;

/// One resource type of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    /// `""` for the core group.
    pub group: Text,
    pub version: Text,
    pub kind: Text,
    pub plural: Text,
    pub singular: Text,
    pub namespaced: bool,
    short_names: &'static [&'static str],
    /// What its definition says, for a custom resource; `None` for the
    /// built-in types.
    pub custom: Option<Arc<Custom>>,
}

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

const fn builtin(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
) -> ResourceType {
    ResourceType {
        group: Cow::Borrowed(group),
        version: Cow::Borrowed(version),
        kind: Cow::Borrowed(kind),
        plural: Cow::Borrowed(plural),
        singular: Cow::Borrowed(singular),
        namespaced,
        short_names,
        custom: None,
    }
}

impl ResourceType {
    /// A custom resource's type, as its definition names it.
    pub fn custom(names: crate::crd::Names, version: String, custom: Custom) -> ResourceType {
        ResourceType {
            group: Cow::Owned(names.group),
            version: Cow::Owned(version),
            kind: Cow::Owned(names.kind),
            plural: Cow::Owned(names.plural),
            singular: Cow::Owned(names.singular),
            namespaced: names.namespaced,
            short_names: &[],
            custom: Some(Arc::new(custom)),
        }
    }

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
        if self.read_only() {
            &["get", "list"]
        } else {
            VERBS
        }
    }

    /// The kind of a built-in type, `""` for a custom one: what the
    /// server's own rules for a kind are keyed by, so a tenant's type
    /// that borrows a built-in kind's name gets none of them.
    pub fn builtin_kind(&self) -> &str {
        if self.custom.is_some() {
            ""
        } else {
            &self.kind
        }
    }

    /// Shown, never written: read from elsewhere (the fleet's nodes).
    pub fn read_only(&self) -> bool {
        READ_ONLY.contains(&self.builtin_kind())
    }

    pub fn short_names(&self) -> Vec<&str> {
        match &self.custom {
            Some(c) => c.short_names.iter().map(String::as_str).collect(),
            None => self.short_names.to_vec(),
        }
    }

    /// The categories it is listed under (`kubectl get all`).
    pub fn categories(&self) -> Vec<&str> {
        match &self.custom {
            Some(c) => c.categories.iter().map(String::as_str).collect(),
            None if ALL_CATEGORY.contains(&self.kind.as_ref()) => vec!["all"],
            None => Vec::new(),
        }
    }

    /// Whether its `status` is written only through `/status` (or by its
    /// controller): a write of the object itself keeps the status it had.
    pub fn status_is_separate(&self) -> bool {
        match &self.custom {
            Some(c) => c.status,
            None => CONTROLLED_STATUS.contains(&self.kind.as_ref()),
        }
    }

    /// Whether it has a `/scale` subresource.
    pub fn scalable(&self) -> bool {
        match &self.custom {
            Some(c) => c.scale.is_some(),
            None => SCALABLE.contains(&self.kind.as_ref()),
        }
    }
}

/// Every resource served, core group first.
pub const SERVED: &[ResourceType] = &[
    builtin(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        &["ns"],
    ),
    builtin("", "v1", "Node", "nodes", "node", false, &["no"]),
    builtin(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        true,
        &["cm"],
    ),
    builtin("", "v1", "Secret", "secrets", "secret", true, &[]),
    builtin("", "v1", "Pod", "pods", "pod", true, &["po"]),
    builtin("", "v1", "Event", "events", "event", true, &["ev"]),
    builtin(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        &["sa"],
    ),
    builtin(
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        "resourcequota",
        true,
        &["quota"],
    ),
    builtin("", "v1", "Service", "services", "service", true, &["svc"]),
    builtin(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        "endpoints",
        true,
        &["ep"],
    ),
    builtin(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        &["deploy"],
    ),
    builtin(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        &["rs"],
    ),
    builtin(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        true,
        &["sts"],
    ),
    builtin("batch", "v1", "Job", "jobs", "job", true, &[]),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        "role",
        true,
        &[],
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        "clusterrole",
        false,
        &[],
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        "rolebinding",
        true,
        &[],
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        false,
        &[],
    ),
    builtin(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        "customresourcedefinition",
        false,
        &["crd", "crds"],
    ),
    builtin(
        "atrium.dev",
        "v1",
        "InferenceService",
        "inferenceservices",
        "inferenceservice",
        true,
        &["isvc"],
    ),
];

/// Kinds in the `all` category (`kubectl get all`), as upstream's.
const ALL_CATEGORY: &[&str] = &[
    "Pod",
    "Service",
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "Job",
];

/// Kinds a cluster shows but does not store: read, never written.
const READ_ONLY: &[&str] = &["Node"];

/// Built-in kinds whose `status` is their controller's: a client's writes
/// keep it.
const CONTROLLED_STATUS: &[&str] = &[
    "Pod",
    "Deployment",
    "ReplicaSet",
    "Job",
    "InferenceService",
    "CustomResourceDefinition",
];

/// Built-in kinds with a `/scale` subresource.
const SCALABLE: &[&str] = &["Deployment", "ReplicaSet", "StatefulSet"];

/// The built-in resource `plural` of `group`/`version`, if it is served.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    SERVED
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Whether `group` is a built-in one: no definition may claim it.
pub fn builtin_group(group: &str) -> bool {
    SERVED.iter().any(|r| r.group == group)
}

/// The resource types of one cluster: the built-in ones, then those its
/// custom resource definitions serve.
#[derive(Debug, Default)]
pub struct Catalog {
    custom: Vec<ResourceType>,
}

impl Catalog {
    /// The built-in types and those of `definitions` (stored CRDs).
    pub fn new<'a>(definitions: impl IntoIterator<Item = &'a serde_json::Value>) -> Catalog {
        Catalog {
            custom: definitions
                .into_iter()
                .flat_map(crate::crd::types_of)
                .collect(),
        }
    }

    /// The resource `plural` of `group`/`version`, if the cluster serves it.
    pub fn find(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<Cow<'static, ResourceType>> {
        if let Some(r) = find(group, version, plural) {
            return Some(Cow::Borrowed(r));
        }
        self.custom
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .map(|r| Cow::Owned(r.clone()))
    }

    /// Every type served, built-in first.
    pub fn all(&self) -> impl Iterator<Item = &ResourceType> {
        SERVED.iter().chain(self.custom.iter())
    }

    /// One type per store kind: a definition's versions share theirs.
    pub fn stored(&self) -> impl Iterator<Item = &ResourceType> {
        let mut seen = std::collections::HashSet::new();
        self.all()
            .filter(move |r| seen.insert((r.group.clone(), r.plural.clone())))
    }

    /// The named groups (not core), each once with its versions, the
    /// preferred first, in the order served.
    pub fn groups(&self) -> Vec<(&str, Vec<&str>)> {
        let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
        for r in self.all().filter(|r| !r.group.is_empty()) {
            match out.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, versions)) if !versions.contains(&r.version.as_ref()) => {
                    versions.push(&r.version)
                }
                Some(_) => {}
                None => out.push((&r.group, vec![&r.version])),
            }
        }
        out
    }
}
