//! Tenant clusters: a Kubernetes API of a tenant's own
//! (`/k8s/{cluster-id}/`), served by the control plane as a logical
//! cluster: no process and no memory of its own beyond its objects.

use serde::{Deserialize, Serialize};

/// Nothing to choose yet: a cluster is its API and its objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {}

/// Where its API is, relative to the control plane's URL.
pub fn api_path(cluster_id: &str) -> String {
    format!("/k8s/{cluster_id}")
}
