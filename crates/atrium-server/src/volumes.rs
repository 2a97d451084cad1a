//! What the control plane does particular to volumes: sizes count against
//! the tenant's storage quota (with its images and its replicas' scratch
//! space), a size never changes, and a volume in use is not deleted. The
//! node it lies on is the placement controller's to write.

use atrium_core::quantity::ByteSize;
use atrium_core::quota::{Counted, ResourceUsage};
use atrium_core::volume::{VolumeSpec, VolumeStatus};
use atrium_core::FieldErrors;
use atrium_store::{Object, Precondition, TenantFilter};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::kinds::{
    blocked_by, held_in, quota_read, tenant_reads, Kind, Placement, Resource, Volume, Workload,
    HOLDING,
};
use crate::stored;
use crate::AppState;

impl Kind for Volume {
    const TENANT_WRITABLE: bool = true;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &VolumeSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }

    fn initial_status(_spec: &VolumeSpec) -> Option<VolumeStatus> {
        Some(VolumeStatus::unbound())
    }

    async fn admit(
        state: &AppState,
        tenant: Option<&str>,
        spec: &VolumeSpec,
        replacing: Option<&str>,
    ) -> Result<Option<Precondition<ApiError>>, ApiError> {
        let tenant = tenant.ok_or_else(|| ApiError::field("tenant", "is required"))?;
        if replacing.is_some() {
            // Its size cannot change (`check_change`): nothing more is held.
            return Ok(None);
        }
        let images = image_bytes(state, tenant).await?;
        Ok(Some(disk_admitted(
            tenant,
            (Volume::KIND, Counted::Volumes),
            spec.size,
            images,
        )))
    }

    /// The image on the node was made at its size: a volume does not grow
    /// or shrink.
    fn check_change(
        _caller: &Caller,
        object: &Object,
        new: Option<&VolumeSpec>,
    ) -> Result<(), ApiError> {
        let old = stored::spec::<Volume>(object)?;
        match new {
            Some(new) if new.size != old.size => Err(ApiError::field(
                "spec.size",
                format!(
                    "volume {:?} is {}; a volume's size does not change: make a new one and \
                     copy the data over",
                    object.name, old.size
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A volume a workload mounts, or a replica still runs with, stays.
    async fn before_delete(state: &AppState, object: &Object) -> Result<(), ApiError> {
        let own = TenantFilter::Exactly(object.tenant.clone());
        let workloads = state.store.list_all(Workload::KIND, &own).await?;
        let users: Vec<&str> = workloads
            .iter()
            .filter(|w| {
                stored::spec::<Workload>(w)
                    .is_ok_and(|w| w.volumes.iter().any(|m| m.volume == object.name))
            })
            .map(|w| w.name.as_str())
            .collect();
        blocked_by("volume", &object.name, "workload", &users)?;
        let placements = state.store.list_all(Placement::KIND, &own).await?;
        let replicas: Vec<&str> = placements
            .iter()
            .filter(|p| {
                stored::spec::<Placement>(p)
                    .is_ok_and(|p| p.volumes.iter().any(|v| v.id == object.id))
            })
            .map(|p| p.name.as_str())
            .collect();
        blocked_by("volume", &object.name, "replica", &replicas)
    }
}

/// Bytes of `tenant`'s images in the registry.
pub async fn image_bytes(state: &AppState, tenant: &str) -> Result<u64, ApiError> {
    let (registry, name) = (state.registry.clone(), tenant.to_string());
    tokio::task::spawn_blocking(move || registry.namespace_bytes(&name))
        .await
        .map_err(|e| ApiError::Internal(format!("registry usage: {e}")))
}

/// Bytes the volumes among `objects` hold.
pub fn volume_bytes(objects: &[Object]) -> Result<u64, ApiError> {
    objects.iter().try_fold(0u64, |sum, v| {
        Ok(sum.saturating_add(stored::spec::<Volume>(v)?.size.0))
    })
}

/// Bytes the databases among `objects` hold (each its disk's size).
pub fn database_bytes(objects: &[Object]) -> Result<u64, ApiError> {
    objects.iter().try_fold(0u64, |sum, d| {
        Ok(sum.saturating_add(stored::spec::<atrium_api::Database>(d)?.size.0))
    })
}

/// The rule that one more disk of `size` — an object of `kind` (one of
/// [`HOLDING`]: a volume or a database), counted as `what` — fits
/// `tenant`'s count of those and its storage quota beside its other
/// disks, its replicas' scratch space and its `images` bytes (read just
/// before: pushes check the same sum), checked atomically with the create.
pub(crate) fn disk_admitted(
    tenant: &str,
    (kind, what): (&str, Counted),
    size: ByteSize,
    images: u64,
) -> Precondition<ApiError> {
    let check_tenant = tenant.to_string();
    // Where the precondition reads `kind`'s objects.
    let index = HOLDING.iter().position(|k| *k == kind);
    Precondition {
        reads: tenant_reads(tenant, &HOLDING),
        counts: Vec::new(),
        check: Box::new(move |read: &[Vec<Object>], _: &[u64]| {
            let quota = quota_read(read, &check_tenant)?;
            let held = index.and_then(|i| read.get(i)).map_or(0, Vec::len);
            quota
                .admit_one(what, held as u64)
                .map_err(ApiError::QuotaExceeded)?;
            let (mut used, _) = held_in(read, None)?;
            used.storage = ByteSize(used.storage.0.saturating_add(images));
            let requested = ResourceUsage {
                storage: size,
                ..ResourceUsage::default()
            };
            quota
                .admit(&used, &requested)
                .map_err(ApiError::QuotaExceeded)
        }),
    }
}
