//! The Kubernetes API of a tenant cluster, as pure parts. Atrium serves
//! each tenant cluster as a logical cluster of one Kubernetes-compatible
//! API inside the control plane (`/k8s/{cluster}/…`): no process and no
//! memory per cluster beyond its objects. This crate knows what that API is
//! — the resources served (`resource`), tenants' own types (`crd`) and
//! their schemas (`schema`), discovery (`discovery`), OpenAPI v3
//! documents with upstream's schemas (`openapi`), the events controllers
//! emit (`events`), errors as `Status` objects (`status`), what the server
//! sets in an object's metadata (`meta`), namespaces' resource quotas
//! (`quota`), RBAC for service accounts (`rbac`), who set which field and
//! server-side apply (`managed`), label and field selectors (`selector`),
//! merge and JSON patches (`patch`), services' addresses and endpoints
//! (`service`), stateful sets' ordered steps (`statefulset`), how a pod
//! runs as an Atrium workload and reads its status back (`pod`), the
//! protobuf of the few requests kubectl sends only so (`protobuf`), the
//! fleet's nodes as a cluster shows them (`node`), an `InferenceService` as
//! an Atrium deployment (`inference`), what `kubectl exec` speaks
//! (`remotecommand`) and `Table` output (`table`) — and does no IO: the
//! control plane's `kube` module serves and stores.
//!
//! This is compatibility with what kubectl and client libraries send, not
//! upstream conformance.

pub mod crd;
pub mod discovery;
pub mod events;
pub mod inference;
pub mod managed;
pub mod meta;
pub mod node;
pub mod openapi;
pub mod patch;
pub mod pod;
pub mod protobuf;
pub mod quota;
pub mod rbac;
pub mod remotecommand;
pub mod resource;
pub mod schema;
pub mod selector;
pub mod service;
pub mod statefulset;
pub mod status;
pub mod table;

pub use resource::{find, Catalog, ResourceType, SERVED};
pub use status::KubeError;

/// The Kubernetes version the API reports (`/version`).
pub const KUBERNETES_VERSION: (&str, &str) = ("1", "37");

/// A Kubernetes quantity (`"250m"`, `2Gi`, `1`), as a string or a number,
/// read into an Atrium one.
pub(crate) fn parse_quantity<T: std::str::FromStr>(v: &serde_json::Value) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err("not a quantity".into()),
    };
    text.parse().map_err(|e: T::Err| e.to_string())
}
