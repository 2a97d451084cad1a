//! The resource kinds of the REST API and the rules particular to each: who
//! may read and write them, how they are validated, what they must refer to,
//! and what must hold before they change. The handlers in `crud` are
//! generic over [`Kind`]; everything kind-specific lives here.

use std::collections::HashMap;
use std::future::Future;

use atrium_api::KeyStatus;
use atrium_core::deployment::{DeploymentSpec, Resources};
use atrium_core::gateway::GatewaySpec;
use atrium_core::key::KeySpec;
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::model::ModelSpec;
use atrium_core::node::NodeSpec;
use atrium_core::plane::{CredentialSpec, JoinTokenSpec};
use atrium_core::quantity::ByteSize;
use atrium_core::quota::{Counted, Quota, ResourceUsage};
use atrium_core::site::SiteSpec;
use atrium_core::tenant::TenantSpec;
use atrium_core::workload::{job_finished, ImageRef, WorkloadSpec, PUBLIC_IMAGE_NAMESPACE};
use atrium_core::FieldErrors;
use atrium_store::{Object, Precondition, Selection, TenantFilter};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use atrium_api::{
    Cluster, Credential, Deployment, Exec, Gateway, JoinToken, Key, Model, Node, Ownership,
    Placement, Resource, ServiceRoute, Site, Tenant, Volume, Workload,
};

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::stored;
use crate::volumes::{database_bytes, volume_bytes};
use crate::AppState;

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// What the control plane does particular to a [`Resource`] kind.
pub trait Kind: Resource<Spec: utoipa::ToSchema> {
    /// Tenant admins may create, change and delete (their own) objects.
    const TENANT_WRITABLE: bool;
    /// Tenant admins and viewers may read (their own, or public) objects.
    const TENANT_READABLE: bool;

    fn validate(spec: &Self::Spec) -> Result<(), FieldErrors>;

    /// The status a new object starts with.
    fn initial_status(_spec: &Self::Spec) -> Option<Self::Status> {
        None
    }

    /// Checks references and returns the rule that must hold atomically
    /// with the write. `replacing` is the id of the object being updated.
    fn admit(
        _state: &AppState,
        _tenant: Option<&str>,
        _spec: &Self::Spec,
        _replacing: Option<&str>,
    ) -> impl Future<Output = Result<Option<Precondition<ApiError>>, ApiError>> + Send {
        async { Ok(None) }
    }

    /// The site a plane's own record (a node's, a gateway's) is in, for
    /// plane callers' writes.
    fn node_site(_spec: &Self::Spec) -> Option<&str> {
        None
    }

    /// Refuses a change (`new`: the replacing spec; `None`: a delete) that
    /// the caller's role allows in general but not to this object.
    fn check_change(
        _caller: &Caller,
        _object: &Object,
        _new: Option<&Self::Spec>,
    ) -> Result<(), ApiError> {
        Ok(())
    }

    /// What a new object brings with it (a cluster's default namespaces),
    /// once it is stored.
    fn after_create(
        _state: &AppState,
        _object: &Object,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        async { Ok(()) }
    }

    /// Refuses deletes that would leave dangling references.
    fn before_delete(
        _state: &AppState,
        _object: &Object,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        async { Ok(()) }
    }
}

mod access;
pub use access::{permits, plane_may_write, plane_sees};

impl Kind for Site {
    const TENANT_WRITABLE: bool = false;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &SiteSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    async fn before_delete(state: &AppState, object: &Object) -> Result<(), ApiError> {
        let nodes = state.store.list_all(Node::KIND, &TenantFilter::All).await?;
        let users: Vec<&str> = nodes
            .iter()
            .filter(|n| stored::spec::<Node>(n).is_ok_and(|n| n.site == object.name))
            .map(|n| n.name.as_str())
            .collect();
        blocked_by("site", &object.name, "node", &users)
    }
}

impl Kind for Gateway {
    const TENANT_WRITABLE: bool = false;
    const TENANT_READABLE: bool = false;

    fn validate(spec: &GatewaySpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    fn node_site(spec: &GatewaySpec) -> Option<&str> {
        Some(&spec.site)
    }

    async fn admit(
        state: &AppState,
        _tenant: Option<&str>,
        spec: &GatewaySpec,
        _replacing: Option<&str>,
    ) -> Result<Option<Precondition<ApiError>>, ApiError> {
        site_exists(state, "spec.site", &spec.site).await?;
        Ok(None)
    }
}

impl Kind for Node {
    const TENANT_WRITABLE: bool = false;
    const TENANT_READABLE: bool = false;

    fn validate(spec: &NodeSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    fn node_site(spec: &NodeSpec) -> Option<&str> {
        Some(&spec.site)
    }

    async fn admit(
        state: &AppState,
        _tenant: Option<&str>,
        spec: &NodeSpec,
        replacing: Option<&str>,
    ) -> Result<Option<Precondition<ApiError>>, ApiError> {
        site_exists(state, "spec.site", &spec.site).await?;
        Ok(spec
            .overlay
            .as_ref()
            .map(|o| overlay_index_unique(o.index, replacing)))
    }
}

/// The rule that no other node has overlay index `index` — checked with
/// the write, after writers are serialised: two nodes with one index would
/// each answer for the other's address on every tenant's overlay.
fn overlay_index_unique(index: u32, replacing: Option<&str>) -> Precondition<ApiError> {
    let replacing = replacing.map(str::to_string);
    Precondition {
        reads: vec![Selection {
            kind: Node::KIND.into(),
            tenant: TenantFilter::All,
            name: None,
        }],
        counts: Vec::new(),
        check: Box::new(move |read: &[Vec<Object>], _: &[u64]| {
            let holder = read.iter().flatten().find(|n| {
                Some(n.id.as_str()) != replacing.as_deref()
                    && stored::spec::<Node>(n)
                        .is_ok_and(|s| s.overlay.is_some_and(|o| o.index == index))
            });
            match holder {
                None => Ok(()),
                Some(n) => Err(ApiError::Conflict {
                    code: "overlay_index_taken",
                    message: format!(
                        "node {:?} has overlay index {index}; pick an index no node has",
                        n.name
                    ),
                    details: json!({"index": index, "node": n.name}),
                }),
            }
        }),
    }
}

impl Kind for Tenant {
    const TENANT_WRITABLE: bool = false;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &TenantSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    async fn before_delete(state: &AppState, object: &Object) -> Result<(), ApiError> {
        // A tenant made later under the same name would own these.
        let (registry, ns) = (state.registry.clone(), object.name.clone());
        let repositories =
            tokio::task::spawn_blocking(move || registry.namespace_repositories(&ns))
                .await
                .map_err(|e| ApiError::Internal(format!("registry: {e}")))?;
        let images: Vec<&str> = repositories.iter().map(|r| r.as_str()).collect();
        blocked_by("tenant", &object.name, "image repository", &images)?;
        let own = TenantFilter::Exactly(Some(object.name.clone()));
        for kind in [
            Deployment::KIND,
            Workload::KIND,
            Volume::KIND,
            Exec::KIND,
            Model::KIND,
            Key::KIND,
        ] {
            let held = state.store.list_all(kind, &own).await?;
            let names: Vec<&str> = held.iter().map(|o| o.name.as_str()).collect();
            blocked_by("tenant", &object.name, kind, &names)?;
        }
        Ok(())
    }
}

impl Kind for Model {
    const TENANT_WRITABLE: bool = true;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &ModelSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    async fn admit(
        _state: &AppState,
        tenant: Option<&str>,
        spec: &ModelSpec,
        replacing: Option<&str>,
    ) -> Result<Option<Precondition<ApiError>>, ApiError> {
        let Some(tenant) = tenant else {
            return Ok(None);
        };
        // A path names files on the provider's nodes, which the agents
        // read as root: only the provider may point a model at one.
        if let Some(path) = spec.host_path() {
            return Err(ApiError::field(
                "spec.source",
                format!(
                    "path:{path} names files on the provider's nodes; only the provider \
                     may create such models. Use a catalogue model or pypi:<package>"
                ),
            ));
        }
        Ok(replacing
            .is_none()
            .then(|| one_more(Model::KIND, tenant, Counted::Models)))
    }

    async fn before_delete(state: &AppState, object: &Object) -> Result<(), ApiError> {
        // A tenant's model can only be used by that tenant; a public one by
        // any tenant that has no private model of the same name.
        let filter = match &object.tenant {
            Some(t) => TenantFilter::Exactly(Some(t.clone())),
            None => TenantFilter::All,
        };
        let deployments = state.store.list_all(Deployment::KIND, &filter).await?;
        let users: Vec<&str> = deployments
            .iter()
            .filter(|d| stored::spec::<Deployment>(d).is_ok_and(|d| d.model == object.name))
            .map(|d| d.name.as_str())
            .collect();
        blocked_by("model", &object.name, "deployment", &users)
    }
}

impl Kind for Deployment {
    const TENANT_WRITABLE: bool = true;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &DeploymentSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    fn initial_status(_spec: &DeploymentSpec) -> Option<Status> {
        Some(Status::new(
            LifecycleState::Pending,
            "waiting for placement",
        ))
    }

    async fn admit(
        state: &AppState,
        tenant: Option<&str>,
        spec: &DeploymentSpec,
        replacing: Option<&str>,
    ) -> Result<Option<Precondition<ApiError>>, ApiError> {
        let tenant = tenant.ok_or_else(|| ApiError::field("tenant", "is required"))?;
        let store = &state.store;
        if store
            .get_by_name(Model::KIND, Some(tenant), &spec.model)
            .await?
            .is_none()
            && store
                .get_by_name(Model::KIND, None, &spec.model)
                .await?
                .is_none()
        {
            return Err(ApiError::field(
                "spec.model",
                format!(
                    "no model named {:?} in your tenant or the public catalogue",
                    spec.model
                ),
            ));
        }
        sites_allowed(state, tenant, &spec.sites).await?;
        let spec = spec.clone();
        Ok(Some(resources_admitted(
            tenant,
            replacing,
            move |holding| spec.quota_usage_holding(holding),
        )))
    }
}

impl Kind for Workload {
    const TENANT_WRITABLE: bool = true;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &WorkloadSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    fn initial_status(_spec: &WorkloadSpec) -> Option<Status> {
        Some(Status::new(
            LifecycleState::Pending,
            "waiting for placement",
        ))
    }

    async fn admit(
        state: &AppState,
        tenant: Option<&str>,
        spec: &WorkloadSpec,
        replacing: Option<&str>,
    ) -> Result<Option<Precondition<ApiError>>, ApiError> {
        let tenant = tenant.ok_or_else(|| ApiError::field("tenant", "is required"))?;
        // Whether the image exists is the pull's to find out (the workload
        // then says ErrImagePull); whose it may be is decided here.
        let image = ImageRef::parse(&spec.container.image)
            .map_err(|why| ApiError::field("spec.image", why))?;
        if image.namespace() != tenant && image.namespace() != PUBLIC_IMAGE_NAMESPACE {
            return Err(ApiError::field(
                "spec.image",
                format!(
                    "{:?} is in namespace {:?}: a workload runs images of its own tenant \
                     ({tenant}/…) or public ones ({PUBLIC_IMAGE_NAMESPACE}/…)",
                    spec.container.image,
                    image.namespace()
                ),
            ));
        }
        let tenant_spec = sites_allowed(state, tenant, &spec.sites).await?;
        if let Some(p) = spec.priority.filter(|p| *p > tenant_spec.priority) {
            return Err(ApiError::field(
                "spec.priority",
                format!(
                    "{p} is above tenant {tenant:?}'s priority {}: a workload may ask for \
                     its tenant's priority or less",
                    tenant_spec.priority
                ),
            ));
        }
        let mut missing = FieldErrors::new();
        for (i, m) in spec.volumes.iter().enumerate() {
            if state
                .store
                .get_by_name(Volume::KIND, Some(tenant), &m.volume)
                .await?
                .is_none()
            {
                missing.push(
                    format!("spec.volumes[{i}].volume"),
                    format!(
                        "tenant {tenant:?} has no volume named {:?}: create it first                          (POST /v1/volumes)",
                        m.volume
                    ),
                );
            }
        }
        missing.into_result().map_err(ApiError::InvalidFields)?;
        if let Some(id) = replacing {
            let old = state.store.get(Workload::KIND, id).await?;
            let old = old.map(|o| stored::spec::<Workload>(&o)).transpose()?;
            let was_job = old.as_ref().is_some_and(|o| o.job().is_some());
            if (was_job || spec.job().is_some()) && old.as_ref() != Some(spec) {
                return Err(ApiError::field(
                    "spec",
                    "a job's spec does not change once created (nor does a service become \
                     a job): delete it and create it anew",
                ));
            }
        }
        let spec = spec.clone();
        Ok(Some(resources_admitted(
            tenant,
            replacing,
            move |holding| spec.quota_usage_holding(holding),
        )))
    }
}

/// Refuses sites that do not exist or lie outside `tenant`'s residency;
/// returns the tenant's spec.
async fn sites_allowed(
    state: &AppState,
    tenant: &str,
    sites: &[String],
) -> Result<TenantSpec, ApiError> {
    let store = &state.store;
    let tenant_obj = store
        .get_by_name(Tenant::KIND, None, tenant)
        .await?
        .ok_or_else(|| ApiError::not_found(Tenant::KIND, tenant))?;
    let tenant_spec = stored::spec::<Tenant>(&tenant_obj)?;
    let mut errors = FieldErrors::new();
    for (i, site_name) in sites.iter().enumerate() {
        let field = format!("spec.sites[{i}]");
        match store.get_by_name(Site::KIND, None, site_name).await? {
            None => errors.push(field, format!("no site named {site_name:?}")),
            Some(site) => {
                let site = stored::spec::<Site>(&site)?;
                if !tenant_spec.residency.allows(&site.jurisdiction) {
                    errors.push(
                        field,
                        format!(
                            "site {site_name:?} is in jurisdiction {}, outside tenant \
                             {tenant:?}'s residency policy",
                            site.jurisdiction
                        ),
                    );
                }
            }
        }
    }
    errors.into_result().map_err(ApiError::InvalidFields)?;
    Ok(tenant_spec)
}

/// The kinds whose objects hold a tenant's resources, in the order
/// [`held_in`] takes them.
pub(crate) const HOLDING: [&str; 5] = [
    Deployment::KIND,
    Workload::KIND,
    Placement::KIND,
    Volume::KIND,
    atrium_api::Database::KIND,
];

/// What a precondition reads of `tenant`: its objects of each of `kinds`,
/// then the tenant itself (last, for [`quota_read`]).
pub(crate) fn tenant_reads(tenant: &str, kinds: &[&str]) -> Vec<Selection> {
    let mut reads: Vec<Selection> = kinds
        .iter()
        .map(|kind| Selection {
            kind: (*kind).into(),
            tenant: TenantFilter::Exactly(Some(tenant.to_string())),
            name: None,
        })
        .collect();
    reads.push(Selection {
        kind: Tenant::KIND.into(),
        tenant: TenantFilter::Exactly(None),
        name: Some(tenant.to_string()),
    });
    reads
}

/// The quota of `tenant`, read last by [`tenant_reads`].
pub(crate) fn quota_read(read: &[Vec<Object>], tenant: &str) -> Result<Quota, ApiError> {
    let tenant_obj = read
        .last()
        .and_then(|t| t.first())
        .ok_or_else(|| ApiError::not_found(Tenant::KIND, tenant))?;
    Ok(stored::spec::<Tenant>(tenant_obj)?.quota)
}

/// What a tenant's objects of the [`HOLDING`] kinds (`read`, in that
/// order) hold against its quota, leaving out the one with id `except`;
/// and what each owner's placements hold.
pub(crate) fn held_in(
    read: &[Vec<Object>],
    except: Option<&str>,
) -> Result<(ResourceUsage, HashMap<String, Vec<Resources>>), ApiError> {
    let [deployments, workloads, placements, volumes, databases, ..] = read else {
        return Err(ApiError::Internal("precondition read mismatch".into()));
    };
    let held = held_by_deployment(placements)?;
    let mut used = tenant_usage(deployments, workloads, &held, except)?;
    let disks = volume_bytes(volumes)?.saturating_add(database_bytes(databases)?);
    used.storage = ByteSize(used.storage.0.saturating_add(disks));
    Ok((used, held))
}

/// The rule that what `tenant`'s deployments, workloads and volumes hold,
/// with the object being written (`requested`, given what its placements
/// still hold) instead of the one it replaces, fits the tenant's quota —
/// checked atomically with the write.
fn resources_admitted(
    tenant: &str,
    replacing: Option<&str>,
    requested: impl Fn(&mut dyn Iterator<Item = &Resources>) -> ResourceUsage + Send + Sync + 'static,
) -> Precondition<ApiError> {
    let replacing = replacing.map(str::to_string);
    let check_tenant = tenant.to_string();
    Precondition {
        reads: tenant_reads(tenant, &HOLDING),
        counts: Vec::new(),
        check: Box::new(move |read: &[Vec<Object>], _: &[u64]| {
            let quota = quota_read(read, &check_tenant)?;
            let (used, held) = held_in(read, replacing.as_deref())?;
            // The replaced object's replicas hold what they hold until
            // they are gone, whatever the new spec asks.
            let holding = replacing.as_deref().and_then(|id| held.get(id));
            let requested = requested(&mut holding.into_iter().flatten());
            quota
                .admit(&used, &requested)
                .map_err(ApiError::QuotaExceeded)
        }),
    }
}

/// The resources each deployment's (or workload's) placements hold, by
/// its id.
pub fn held_by_deployment(
    placements: &[Object],
) -> Result<HashMap<String, Vec<Resources>>, ApiError> {
    let mut held: HashMap<String, Vec<Resources>> = HashMap::new();
    for p in placements {
        let spec = stored::spec::<Placement>(p)?;
        // A finished job's replica runs nothing and holds nothing.
        if stored::status::<Placement>(p).is_some_and(|s| spec.finished(&s)) {
            continue;
        }
        held.entry(spec.deployment)
            .or_default()
            .push(spec.resources);
    }
    Ok(held)
}

/// What a tenant's deployments and workloads hold against its quota,
/// leaving out the one with id `except` (the one being replaced): each
/// the larger of its spec's usage and what its placements still hold.
pub fn tenant_usage(
    deployments: &[Object],
    workloads: &[Object],
    held: &HashMap<String, Vec<Resources>>,
    except: Option<&str>,
) -> Result<ResourceUsage, ApiError> {
    let mut used = ResourceUsage::default();
    let counted = |o: &&Object| Some(o.id.as_str()) != except;
    for d in deployments.iter().filter(counted) {
        let spec = stored::spec::<Deployment>(d)?;
        let holding = held.get(&d.id).into_iter().flatten();
        used = used.saturating_add(spec.quota_usage_holding(holding));
    }
    for w in workloads.iter().filter(counted) {
        let spec = stored::spec::<Workload>(w)?;
        let finished = stored::status::<Workload>(w).is_some_and(|s| job_finished(&s));
        if spec.job().is_some() && finished {
            continue;
        }
        let holding = held.get(&w.id).into_iter().flatten();
        used = used.saturating_add(spec.quota_usage_holding(holding));
    }
    Ok(used)
}

/// What `tenant`'s deployments, workloads and volumes hold now, read
/// outside any write (for views and the registry's room).
pub async fn tenant_resources_used(
    state: &AppState,
    tenant: &str,
) -> Result<ResourceUsage, ApiError> {
    let own = TenantFilter::Exactly(Some(tenant.to_string()));
    let mut read = Vec::with_capacity(HOLDING.len());
    for kind in HOLDING {
        read.push(state.store.list_all(kind, &own).await?);
    }
    Ok(held_in(&read, None)?.0)
}

/// The rule that a tenant holds fewer `what` (objects of `kind`) than its
/// quota's cap, checked atomically with the create.
pub fn one_more(kind: &str, tenant: &str, what: Counted) -> Precondition<ApiError> {
    let check_tenant = tenant.to_string();
    Precondition {
        reads: tenant_reads(tenant, &[kind]),
        counts: Vec::new(),
        check: Box::new(move |read: &[Vec<Object>], _: &[u64]| {
            quota_read(read, &check_tenant)?
                .admit_one(what, read.first().map_or(0, Vec::len) as u64)
                .map_err(ApiError::QuotaExceeded)
        }),
    }
}

/// How a key is stored: its spec, status and the digest of its token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub spec: KeySpec,
    pub status: KeyStatus,
    pub digest: String,
    /// The role of whoever created the key (`Role::as_str`). Keys stored
    /// before issuers were recorded count as the provider's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

impl KeyRecord {
    pub fn issuer(&self) -> Role {
        self.issuer
            .as_deref()
            .and_then(Role::parse)
            .unwrap_or(Role::ProviderAdmin)
    }
}

impl Kind for Key {
    const TENANT_WRITABLE: bool = true;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &KeySpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    /// Only the issuer's role or a higher one may change or delete a key
    /// (a tenant admin cannot revive or widen a key the provider issued
    /// it; revoking stays open to it), and an update only ever narrows.
    fn check_change(
        caller: &Caller,
        object: &Object,
        new: Option<&KeySpec>,
    ) -> Result<(), ApiError> {
        let record: KeyRecord = serde_json::from_value(object.body.clone()).map_err(|e| {
            ApiError::Internal(format!("stored key {} does not parse: {e}", object.id))
        })?;
        let issuer = record.issuer();
        if !caller.role.at_least(issuer) {
            return Err(ApiError::Forbidden(format!(
                "key {:?} was issued by a {}; only that role or a higher one may change or \
                 delete it (you may revoke it: POST /v1/keys/{}/revoke)",
                object.name,
                issuer.as_str(),
                object.id
            )));
        }
        match new {
            Some(spec) => spec
                .narrows(&record.spec)
                .map_err(|e| ApiError::InvalidFields(e.nest("spec"))),
            None => Ok(()),
        }
    }
}

impl Kind for Placement {
    /// Written by the placement controller (and the provider), never by tenants.
    const TENANT_WRITABLE: bool = false;
    /// Tenants may see where their replicas run and in what state.
    const TENANT_READABLE: bool = true;

    fn validate(_spec: &Self::Spec) -> Result<(), FieldErrors> {
        Ok(())
    }
}

/// How a join token is stored: its spec, whether it was used, the digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub spec: JoinTokenSpec,
    #[serde(default)]
    pub status: atrium_api::JoinTokenStatus,
    pub digest: String,
}

impl Kind for JoinToken {
    const TENANT_WRITABLE: bool = false;
    const TENANT_READABLE: bool = false;

    fn validate(spec: &JoinTokenSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }
}

/// How a plane credential is stored: its spec, status and digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub spec: CredentialSpec,
    #[serde(default)]
    pub status: atrium_api::CredentialStatus,
    pub digest: String,
}

impl Kind for Credential {
    const TENANT_WRITABLE: bool = false;
    const TENANT_READABLE: bool = false;

    fn validate(spec: &CredentialSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }
}

/// Refuses `field` naming a site that does not exist.
pub async fn site_exists(state: &AppState, field: &str, site: &str) -> Result<(), ApiError> {
    match state.store.get_by_name(Site::KIND, None, site).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::field(field, format!("no site named {site:?}"))),
    }
}

pub(crate) fn blocked_by(
    kind: &str,
    name: &str,
    by_kind: &str,
    by: &[&str],
) -> Result<(), ApiError> {
    if by.is_empty() {
        return Ok(());
    }
    Err(ApiError::Conflict {
        code: "in_use",
        message: format!(
            "{kind} {name:?} is still used by {} {by_kind}(s): {}; delete those first",
            by.len(),
            by.join(", ")
        ),
        details: json!({"kind": by_kind, "names": by}),
    })
}
