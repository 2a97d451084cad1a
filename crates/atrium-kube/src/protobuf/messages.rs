//! The protobuf messages of the objects kubectl's generators send (`kubectl
//! create configmap|secret|namespace|serviceaccount|deployment|job|service|
//! quota|role|rolebinding|clusterrole|clusterrolebinding`, `kubectl run`):
//! each field's number (from upstream's `generated.proto`, v1.37), its JSON
//! name and how its value reads.
//!
//! Every field of these messages is listed, because Go's encoder writes a
//! non-pointer field even when it is empty. Nested types that the
//! generators never fill (probes, volumes, security contexts, affinity…)
//! are `Opaque`: read only when empty, refused otherwise, so nothing a
//! client sent is dropped in silence — the client is told to send JSON.

/// How a field's value reads.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Str,
    Bool,
    Int32,
    Int64,
    Message(&'static [Field]),
    /// `map<string, string>`.
    MapStr,
    /// `map<string, bytes>`, its values shown as base64 as Go's JSON
    /// shows `[]byte`.
    MapBytes,
    /// `map<string, Quantity>`.
    MapQuantity,
    /// `meta.v1.Time`: seconds and nanos, shown as RFC 3339.
    Time,
    /// `util.intstr.IntOrString`.
    IntOrString,
    /// A message not read here: accepted only when empty.
    Opaque,
    /// An object's `status`: the server's to write, never a client's
    /// (Go writes it whole, zeros and all), so read past and left out.
    Discarded,
}

/// Whether a field repeats and, if not, whether its zero value is said
/// (a Go pointer: `replicas: 0` is not `replicas` left out).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Card {
    /// A Go value: empty or zero means absent, as Go's JSON omits it.
    Value,
    /// A Go pointer: written only when set, zero included.
    Pointer,
    Repeated,
}

#[derive(Clone, Copy)]
pub(crate) struct Field {
    pub number: u64,
    pub json: &'static str,
    pub kind: Kind,
    pub card: Card,
}

const fn v(number: u64, json: &'static str, kind: Kind) -> Field {
    Field {
        number,
        json,
        kind,
        card: Card::Value,
    }
}

const fn p(number: u64, json: &'static str, kind: Kind) -> Field {
    Field {
        number,
        json,
        kind,
        card: Card::Pointer,
    }
}

const fn r(number: u64, json: &'static str, kind: Kind) -> Field {
    Field {
        number,
        json,
        kind,
        card: Card::Repeated,
    }
}

use Kind::*;

const OWNER_REFERENCE: &[Field] = &[
    v(1, "kind", Str),
    v(3, "name", Str),
    v(4, "uid", Str),
    v(5, "apiVersion", Str),
    p(6, "controller", Bool),
    p(7, "blockOwnerDeletion", Bool),
];

const OBJECT_META: &[Field] = &[
    v(1, "name", Str),
    v(2, "generateName", Str),
    v(3, "namespace", Str),
    v(4, "selfLink", Str),
    v(5, "uid", Str),
    v(6, "resourceVersion", Str),
    v(7, "generation", Int64),
    v(8, "creationTimestamp", Time),
    p(9, "deletionTimestamp", Time),
    p(10, "deletionGracePeriodSeconds", Int64),
    v(11, "labels", MapStr),
    v(12, "annotations", MapStr),
    r(13, "ownerReferences", Message(OWNER_REFERENCE)),
    r(14, "finalizers", Str),
    r(17, "managedFields", Opaque),
];

const LABEL_SELECTOR_REQUIREMENT: &[Field] =
    &[v(1, "key", Str), v(2, "operator", Str), r(3, "values", Str)];

const LABEL_SELECTOR: &[Field] = &[
    v(1, "matchLabels", MapStr),
    r(2, "matchExpressions", Message(LABEL_SELECTOR_REQUIREMENT)),
];

const LOCAL_OBJECT_REFERENCE: &[Field] = &[v(1, "name", Str)];

const OBJECT_REFERENCE: &[Field] = &[
    v(1, "kind", Str),
    v(2, "namespace", Str),
    v(3, "name", Str),
    v(4, "uid", Str),
    v(5, "apiVersion", Str),
    v(6, "resourceVersion", Str),
    v(7, "fieldPath", Str),
];

const CONTAINER_PORT: &[Field] = &[
    v(1, "name", Str),
    v(2, "hostPort", Int32),
    v(3, "containerPort", Int32),
    v(4, "protocol", Str),
    v(5, "hostIP", Str),
];

const ENV_VAR: &[Field] = &[
    v(1, "name", Str),
    v(2, "value", Str),
    p(3, "valueFrom", Opaque),
];

const RESOURCE_REQUIREMENTS: &[Field] = &[
    v(1, "limits", MapQuantity),
    v(2, "requests", MapQuantity),
    r(3, "claims", Opaque),
];

const CONTAINER: &[Field] = &[
    v(1, "name", Str),
    v(2, "image", Str),
    r(3, "command", Str),
    r(4, "args", Str),
    v(5, "workingDir", Str),
    r(6, "ports", Message(CONTAINER_PORT)),
    r(7, "env", Message(ENV_VAR)),
    v(8, "resources", Message(RESOURCE_REQUIREMENTS)),
    r(9, "volumeMounts", Opaque),
    p(10, "livenessProbe", Opaque),
    p(11, "readinessProbe", Opaque),
    p(12, "lifecycle", Opaque),
    v(13, "terminationMessagePath", Str),
    v(14, "imagePullPolicy", Str),
    p(15, "securityContext", Opaque),
    v(16, "stdin", Bool),
    v(17, "stdinOnce", Bool),
    v(18, "tty", Bool),
    r(19, "envFrom", Opaque),
    v(20, "terminationMessagePolicy", Str),
    r(21, "volumeDevices", Opaque),
    p(22, "startupProbe", Opaque),
    r(23, "resizePolicy", Opaque),
    p(24, "restartPolicy", Str),
    r(25, "restartPolicyRules", Opaque),
];

const POD_SPEC: &[Field] = &[
    r(1, "volumes", Opaque),
    r(2, "containers", Message(CONTAINER)),
    v(3, "restartPolicy", Str),
    p(4, "terminationGracePeriodSeconds", Int64),
    p(5, "activeDeadlineSeconds", Int64),
    v(6, "dnsPolicy", Str),
    v(7, "nodeSelector", MapStr),
    v(8, "serviceAccountName", Str),
    v(9, "serviceAccount", Str),
    v(10, "nodeName", Str),
    v(11, "hostNetwork", Bool),
    v(12, "hostPID", Bool),
    v(13, "hostIPC", Bool),
    p(14, "securityContext", Opaque),
    r(15, "imagePullSecrets", Message(LOCAL_OBJECT_REFERENCE)),
    v(16, "hostname", Str),
    v(17, "subdomain", Str),
    p(18, "affinity", Opaque),
    v(19, "schedulerName", Str),
    r(20, "initContainers", Message(CONTAINER)),
    p(21, "automountServiceAccountToken", Bool),
    r(22, "tolerations", Opaque),
    r(23, "hostAliases", Opaque),
    v(24, "priorityClassName", Str),
    p(25, "priority", Int32),
    p(26, "dnsConfig", Opaque),
    p(27, "shareProcessNamespace", Bool),
    r(28, "readinessGates", Opaque),
    p(29, "runtimeClassName", Str),
    p(30, "enableServiceLinks", Bool),
    p(31, "preemptionPolicy", Str),
    v(32, "overhead", MapQuantity),
    r(33, "topologySpreadConstraints", Opaque),
    r(34, "ephemeralContainers", Opaque),
    p(35, "setHostnameAsFQDN", Bool),
    p(36, "os", Opaque),
    p(37, "hostUsers", Bool),
    r(38, "schedulingGates", Opaque),
    r(39, "resourceClaims", Opaque),
    p(40, "resources", Message(RESOURCE_REQUIREMENTS)),
    p(41, "hostnameOverride", Str),
    p(43, "schedulingGroup", Opaque),
    r(44, "evictionResponders", Opaque),
];

const POD_TEMPLATE_SPEC: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "spec", Message(POD_SPEC)),
];

const POD: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "spec", Message(POD_SPEC)),
    v(3, "status", Discarded),
];

const CONFIG_MAP: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "data", MapStr),
    v(3, "binaryData", MapBytes),
    p(4, "immutable", Bool),
];

const SECRET: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "data", MapBytes),
    v(3, "type", Str),
    v(4, "stringData", MapStr),
    p(5, "immutable", Bool),
];

const NAMESPACE_SPEC: &[Field] = &[r(1, "finalizers", Str)];

const NAMESPACE: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "spec", Message(NAMESPACE_SPEC)),
    v(3, "status", Discarded),
];

const SERVICE_ACCOUNT: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    r(2, "secrets", Message(OBJECT_REFERENCE)),
    r(3, "imagePullSecrets", Message(LOCAL_OBJECT_REFERENCE)),
    p(4, "automountServiceAccountToken", Bool),
];

const SERVICE_PORT: &[Field] = &[
    v(1, "name", Str),
    v(2, "protocol", Str),
    v(3, "port", Int32),
    v(4, "targetPort", IntOrString),
    v(5, "nodePort", Int32),
    p(6, "appProtocol", Str),
];

const SERVICE_SPEC: &[Field] = &[
    r(1, "ports", Message(SERVICE_PORT)),
    v(2, "selector", MapStr),
    v(3, "clusterIP", Str),
    v(4, "type", Str),
    r(5, "externalIPs", Str),
    v(7, "sessionAffinity", Str),
    v(8, "loadBalancerIP", Str),
    r(9, "loadBalancerSourceRanges", Str),
    v(10, "externalName", Str),
    v(11, "externalTrafficPolicy", Str),
    v(12, "healthCheckNodePort", Int32),
    v(13, "publishNotReadyAddresses", Bool),
    p(14, "sessionAffinityConfig", Opaque),
    p(17, "ipFamilyPolicy", Str),
    r(18, "clusterIPs", Str),
    r(19, "ipFamilies", Str),
    p(20, "allocateLoadBalancerNodePorts", Bool),
    p(21, "loadBalancerClass", Str),
    p(22, "internalTrafficPolicy", Str),
    p(23, "trafficDistribution", Str),
];

const SERVICE: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "spec", Message(SERVICE_SPEC)),
    v(3, "status", Discarded),
];

const RESOURCE_QUOTA_SPEC: &[Field] = &[
    v(1, "hard", MapQuantity),
    r(2, "scopes", Str),
    p(3, "scopeSelector", Opaque),
];

const RESOURCE_QUOTA: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "spec", Message(RESOURCE_QUOTA_SPEC)),
    v(3, "status", Discarded),
];

const ROLLING_UPDATE_DEPLOYMENT: &[Field] = &[
    p(1, "maxUnavailable", IntOrString),
    p(2, "maxSurge", IntOrString),
];

const DEPLOYMENT_STRATEGY: &[Field] = &[
    v(1, "type", Str),
    p(2, "rollingUpdate", Message(ROLLING_UPDATE_DEPLOYMENT)),
];

const DEPLOYMENT_SPEC: &[Field] = &[
    p(1, "replicas", Int32),
    p(2, "selector", Message(LABEL_SELECTOR)),
    v(3, "template", Message(POD_TEMPLATE_SPEC)),
    v(4, "strategy", Message(DEPLOYMENT_STRATEGY)),
    v(5, "minReadySeconds", Int32),
    p(6, "revisionHistoryLimit", Int32),
    v(7, "paused", Bool),
    p(9, "progressDeadlineSeconds", Int32),
];

const DEPLOYMENT: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "spec", Message(DEPLOYMENT_SPEC)),
    v(3, "status", Discarded),
];

const JOB_SPEC: &[Field] = &[
    p(1, "parallelism", Int32),
    p(2, "completions", Int32),
    p(3, "activeDeadlineSeconds", Int64),
    p(4, "selector", Message(LABEL_SELECTOR)),
    p(5, "manualSelector", Bool),
    v(6, "template", Message(POD_TEMPLATE_SPEC)),
    p(7, "backoffLimit", Int32),
    p(8, "ttlSecondsAfterFinished", Int32),
    p(9, "completionMode", Str),
    p(10, "suspend", Bool),
    p(11, "podFailurePolicy", Opaque),
    p(12, "backoffLimitPerIndex", Int32),
    p(13, "maxFailedIndexes", Int32),
    p(14, "podReplacementPolicy", Str),
    p(15, "managedBy", Str),
    p(16, "successPolicy", Opaque),
    p(17, "scheduling", Opaque),
];

const JOB: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    v(2, "spec", Message(JOB_SPEC)),
    v(3, "status", Discarded),
];

const POLICY_RULE: &[Field] = &[
    r(1, "verbs", Str),
    r(2, "apiGroups", Str),
    r(3, "resources", Str),
    r(4, "resourceNames", Str),
    r(5, "nonResourceURLs", Str),
];

const ROLE: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    r(2, "rules", Message(POLICY_RULE)),
];

const CLUSTER_ROLE: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    r(2, "rules", Message(POLICY_RULE)),
    p(3, "aggregationRule", Opaque),
];

const SUBJECT: &[Field] = &[
    v(1, "kind", Str),
    v(2, "apiGroup", Str),
    v(3, "name", Str),
    v(4, "namespace", Str),
];

const ROLE_REF: &[Field] = &[v(1, "apiGroup", Str), v(2, "kind", Str), v(3, "name", Str)];

const ROLE_BINDING: &[Field] = &[
    v(1, "metadata", Message(OBJECT_META)),
    r(2, "subjects", Message(SUBJECT)),
    v(3, "roleRef", Message(ROLE_REF)),
];

const RBAC: &str = "rbac.authorization.k8s.io/v1";

/// The message of an object of `api_version` and `kind`, if read here.
pub(crate) fn message_of(api_version: &str, kind: &str) -> Option<&'static [Field]> {
    Some(match (api_version, kind) {
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("v1", "Service") => SERVICE,
        ("v1", "Pod") => POD,
        ("v1", "ResourceQuota") => RESOURCE_QUOTA,
        ("apps/v1", "Deployment") => DEPLOYMENT,
        ("batch/v1", "Job") => JOB,
        (RBAC, "Role") => ROLE,
        (RBAC, "ClusterRole") => CLUSTER_ROLE,
        (RBAC, "RoleBinding" | "ClusterRoleBinding") => ROLE_BINDING,
        _ => return None,
    })
}
