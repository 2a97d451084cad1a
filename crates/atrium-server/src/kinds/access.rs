//! Who may touch a kind at all: each role's reach, and a plane
//! credential's — an agent its own node and that node's work (and every
//! node's record, for its peers' overlay endpoints), a gateway its site's
//! routing and its own record.

use atrium_core::plane::{CredentialSpec, Plane};
use atrium_store::Object;

use super::{
    Access, Deployment, Exec, Gateway, Key, Kind, Node, Placement, Resource, ServiceRoute, Site,
    Tenant, Volume,
};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::stored;

/// Whether `role` may perform `access` on kind `K` at all. Which objects it
/// may touch is decided by ownership (see `crud::visible`).
pub fn permits<K: Kind>(role: Role, access: Access) -> bool {
    match role {
        Role::ProviderAdmin => true,
        Role::TenantAdmin => match access {
            Access::Read => K::TENANT_READABLE,
            Access::Write => K::TENANT_WRITABLE,
        },
        Role::Viewer => access == Access::Read && K::TENANT_READABLE,
        Role::TenantMember => false,
        // Its own node (registration), and the placements on it.
        Role::Node => matches!(
            (K::KIND, access),
            (Node::KIND, _)
                | (
                    Placement::KIND | Volume::KIND | Exec::KIND | ServiceRoute::KIND,
                    Access::Read
                )
        ),
        // What routing needs: keys, deployments, tenants' limits, the
        // placements of its site, the sites and their gateways; and its
        // own gateway record.
        Role::Gateway => match access {
            Access::Read => matches!(
                K::KIND,
                Key::KIND
                    | Deployment::KIND
                    | Tenant::KIND
                    | Placement::KIND
                    | Site::KIND
                    | Gateway::KIND
            ),
            Access::Write => K::KIND == Gateway::KIND,
        },
    }
}

/// Whether a plane caller may know `object` (of kind `K`) exists: an
/// agent the nodes and its own node's placements; a gateway every key,
/// deployment and tenant, and its site's placements.
pub fn plane_sees<K: Kind>(plane: &CredentialSpec, object: &Object) -> bool {
    let placement = || stored::spec::<Placement>(object).ok();
    match (plane.plane, K::KIND) {
        // Every node: its peers' overlay endpoints (it writes only its own).
        (Plane::Node, Node::KIND) => true,
        (Plane::Node, Placement::KIND) => placement().is_some_and(|p| p.node == plane.name),
        // The volumes it holds: the agent scrubs what is no longer among them.
        // The commands to run in its containers.
        (Plane::Node, Exec::KIND) => {
            stored::spec::<Exec>(object).is_ok_and(|e| e.node == plane.name)
        }
        // The services of the tenant clusters whose pods it runs.
        (Plane::Node, ServiceRoute::KIND) => {
            stored::spec::<ServiceRoute>(object).is_ok_and(|r| r.nodes.contains(&plane.name))
        }
        (Plane::Node, Volume::KIND) => stored::status::<Volume>(object)
            .is_some_and(|v| v.node.as_deref() == Some(plane.name.as_str())),
        // Placements made before they recorded their site are every
        // gateway's.
        (Plane::Gateway, Placement::KIND) => {
            placement().is_some_and(|p| p.site.is_empty() || p.site == plane.site)
        }
        (
            Plane::Gateway,
            Key::KIND | Deployment::KIND | Tenant::KIND | Site::KIND | Gateway::KIND,
        ) => true,
        _ => false,
    }
}

/// Refuses a plane caller's write unless it is an agent registering its
/// own node, or a gateway its own record, in its own site.
pub fn plane_may_write<K: Kind>(
    caller: &Caller,
    name: &str,
    spec: &K::Spec,
) -> Result<(), ApiError> {
    let Some(plane) = &caller.plane else {
        return Ok(());
    };
    let own_kind = match plane.plane {
        Plane::Node => Node::KIND,
        Plane::Gateway => Gateway::KIND,
    };
    if K::KIND == own_kind && name == plane.name && K::node_site(spec) == Some(plane.site.as_str())
    {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "the {} credential of {:?} may write only its own {own_kind} {:?} in site {:?}",
        plane.plane.as_str(),
        plane.name,
        plane.name,
        plane.site
    )))
}
