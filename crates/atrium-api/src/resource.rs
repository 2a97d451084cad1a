//! Every resource kind of the API, as a type that knows its names, who owns
//! its objects, and the types of its `spec` and `status` (after kube-rs's
//! `Resource`). The control plane's handlers, routes and OpenAPI document,
//! and the planes' typed client (`atrium_client::Api`), are generic over
//! [`Resource`]: a kind's names are written once, here.
//!
//! Behaviour particular to a kind (validation, references, who may change
//! what) is the control plane's and lives there, not here: this crate is
//! plain data that every plane links.

use std::fmt::Debug;

use atrium_core::batch::{BatchSpec, BatchStatus, FileSpec};
use atrium_core::cluster::ClusterSpec;
use atrium_core::collection::{CollectionSpec, CollectionStatus};
use atrium_core::database::{DatabaseSpec, DatabaseStatus};
use atrium_core::deployment::DeploymentSpec;
use atrium_core::exec::{ExecSpec, ExecStatus};
use atrium_core::gateway::GatewaySpec;
use atrium_core::key::KeySpec;
use atrium_core::lifecycle::Status;
use atrium_core::model::ModelSpec;
use atrium_core::node::NodeSpec;
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use atrium_core::plane::{CredentialSpec, JoinTokenSpec};
use atrium_core::service_route::ServiceRouteSpec;
use atrium_core::site::SiteSpec;
use atrium_core::tenant::TenantSpec;
use atrium_core::volume::{VolumeSpec, VolumeStatus};
use atrium_core::workload::WorkloadSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{CredentialStatus, JoinTokenStatus, KeyStatus, ResourceView};

/// Who owns objects of a kind, which decides who can see which objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Provider infrastructure (sites, nodes, plane credentials): no tenant.
    Provider,
    /// The tenants themselves: a tenant caller sees only its own.
    TenantSelf,
    /// Owned by exactly one tenant (deployments, keys, placements).
    Tenant,
    /// Public (no tenant) or private to one tenant (models).
    Catalog,
}

/// A kind of resource.
pub trait Resource: Send + Sync + 'static {
    /// Singular name, used in the store, in audit actions and in messages.
    const KIND: &'static str;
    /// Path segment under `/v1`.
    const PLURAL: &'static str;
    /// Prefix of generated ids; an identifier of this length with this
    /// prefix is looked up as an id, anything else as a name.
    const ID_PREFIX: &'static str;
    const OWNERSHIP: Ownership;
    /// What the client writes.
    type Spec: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync + 'static;
    /// What controllers observe; [`NoStatus`] for kinds that have none.
    type Status: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync + 'static;
}

/// An object of kind `R` as the API returns it.
pub type Object<R> = ResourceView<<R as Resource>::Spec, <R as Resource>::Status>;

/// The status of kinds that have none (nothing ever writes one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoStatus {}

macro_rules! resource {
    ($(#[$doc:meta])* $ty:ident, $kind:literal, $plural:literal, $prefix:literal, $owner:ident, $spec:ty, $status:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $ty;
        impl Resource for $ty {
            const KIND: &'static str = $kind;
            const PLURAL: &'static str = $plural;
            const ID_PREFIX: &'static str = $prefix;
            const OWNERSHIP: Ownership = Ownership::$owner;
            type Spec = $spec;
            type Status = $status;
        }
    };
}

resource!(
    /// A place with nodes, in one jurisdiction.
    Site, "site", "sites", "sit_", Provider, SiteSpec, NoStatus
);
resource!(
    /// A site's gateway, as it reports itself: its peer address and what it
    /// measured of the other sites' gateways.
    Gateway, "gateway", "gateways", "gtw_", Provider, GatewaySpec, NoStatus
);
resource!(
    /// A machine an agent runs on.
    Node, "node", "nodes", "nod_", Provider, NodeSpec, NoStatus
);
resource!(
    /// A customer of the provider.
    Tenant, "tenant", "tenants", "ten_", TenantSelf, TenantSpec, NoStatus
);
resource!(
    /// Weights a deployment serves: public, or one tenant's.
    Model, "model", "models", "mod_", Catalog, ModelSpec, NoStatus
);
resource!(
    /// A tenant's served model: replicas, resources, routing.
    Deployment, "deployment", "deployments", "dep_", Tenant, DeploymentSpec, Status
);
resource!(
    /// A tenant's own image run as containers: replicas, resources, ports.
    Workload, "workload", "workloads", "wkl_", Tenant, WorkloadSpec, Status
);
resource!(
    /// A tenant's persistent disk of a hard size, on the node of its first
    /// user, mounted into its workloads.
    Volume, "volume", "volumes", "vol_", Tenant, VolumeSpec, VolumeStatus
);
resource!(
    /// A command run in one of a workload's containers, and what came of it.
    Exec, "exec", "execs", "exe_", Tenant, ExecSpec, ExecStatus
);
resource!(
    /// A tenant's own Kubernetes API, served by the control plane.
    Cluster, "cluster", "clusters", "clu_", Tenant, ClusterSpec, NoStatus
);
resource!(
    /// A tenant cluster's service as its tenant's network carries it:
    /// written by the control plane, read by the nodes it names.
    ServiceRoute, "service_route", "service-routes", "srt_", Tenant, ServiceRouteSpec, NoStatus
);
resource!(
    /// A tenant's API key. Key ids are the `atr_<id>_…` token's middle part,
    /// so the prefix carries no underscore.
    Key, "key", "keys", "key", Tenant, KeySpec, KeyStatus
);
resource!(
    /// One replica of a deployment, bound to a node by the controller.
    Placement, "placement", "placements", "rep_", Tenant, PlacementSpec, ReplicaStatus
);
resource!(
    /// A one-use secret that lets a node or gateway join. Ids appear
    /// inside tokens (`atrj_<id>_<secret>`): no underscore.
    JoinToken, "join_token", "join-tokens", "jtk", Provider, JoinTokenSpec, JoinTokenStatus
);
resource!(
    /// A node's or gateway's credential, issued by a join. Ids appear
    /// inside tokens (`atrn_<id>_<secret>`): no underscore.
    Credential, "credential", "credentials", "crd", Provider, CredentialSpec, CredentialStatus
);

resource!(
    /// A tenant's file for the Batch API: a batch's input, or its results.
    /// Served in OpenAI's shape at `/v1/files`.
    File, "file", "files", "file-", Tenant, FileSpec, NoStatus
);
resource!(
    /// A batch of requests run from a file at low priority. Served in
    /// OpenAI's shape at `/v1/batches`.
    Batch, "batch", "batches", "batch_", Tenant, BatchSpec, BatchStatus
);
resource!(
    /// A tenant's vector collection; its points are in the control
    /// plane's vector store, under the object's id.
    Collection, "collection", "collections", "vec_", Tenant, CollectionSpec, CollectionStatus
);
resource!(
    /// A tenant's PostgreSQL database on the provider's PostgreSQL; the
    /// database, its role and its disk are named from the object's id.
    Database, "database", "databases", "db_", Tenant, DatabaseSpec, DatabaseStatus
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_without_a_status_reads_as_none_and_writes_none() {
        let wire = r#"{"id":"sit_1","name":"edge","revision":3,"created_at":"t","updated_at":"t","spec":{"kind":"core","jurisdiction":"eu"}}"#;
        let site: Object<Site> = serde_json::from_str(wire).unwrap();
        assert_eq!(site.status, None);
        assert_eq!(site.spec.jurisdiction, "eu");
        let back = serde_json::to_value(&site).unwrap();
        assert!(back.get("status").is_none());
    }

    #[test]
    fn a_typed_status_reads_from_the_wire() {
        let wire = r#"{"id":"dep_1","name":"chat","tenant":"acme","revision":3,"created_at":"t","updated_at":"t",
            "spec":{"model":"smollm2","engine":"simulated","replicas":{"min":1,"max":1},
            "resources":{"cpu":"1","memory":"1Gi"}},"status":{"state":"running","reason":"1/1 replicas ready"}}"#;
        let d: Object<Deployment> = serde_json::from_str(wire).unwrap();
        assert_eq!(
            d.status.map(|s| s.state),
            Some(atrium_core::lifecycle::LifecycleState::Running)
        );
    }
}
