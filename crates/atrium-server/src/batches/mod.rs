//! OpenAI's Batch API on the control plane: `/v1/files` (`files.rs`),
//! `/v1/batches` as tenants call them (`jobs.rs`, in OpenAI's shapes from
//! `openai.rs`), and the routes a gateway runs batches by (`runner.rs`:
//! claim one under a lease, read its input, report progress, hand in the
//! results). The control plane never sends a batch's requests itself:
//! those are tenant traffic, and go through a gateway's limits, routing
//! and metering like any other.

pub mod files;
mod jobs;
mod openai;
pub mod retention;
mod runner;

use atrium_api::{Batch, File, Resource, Tenant};
use atrium_core::quota::Counted;
use atrium_store::{AuditContext, Object, TenantFilter, Write};
use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post, put};
use axum::Router;
use axum::{Extension, Json};
use serde_json::Value;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::kinds::tenant_resources_used;
use crate::{stored, AppState};

pub use files::FileStore;
use openai::Shaped;

/// Adds the Batch API's routes.
pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/v1/files", get(files::list).post(files::upload))
        .route("/v1/files/{id}", get(one::<File>).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", get(jobs::list).post(jobs::create))
        .route("/v1/batches/claim", post(runner::claim))
        .route("/v1/batches/{id}", get(one::<Batch>))
        .route("/v1/batches/{id}/cancel", post(jobs::cancel))
        .route("/v1/batches/{id}/progress", put(runner::progress))
        .route("/v1/batches/{id}/results", post(runner::results))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

/// The tenant a Batch API caller acts for: see [`tenant_caller_for`].
fn tenant_caller(caller: &Caller, access: Access) -> Result<String, ApiError> {
    tenant_caller_for("the Batch API", caller, access)
}

/// The tenant a caller of a tenant's own API (`api`, for the message) acts
/// for: a tenant's key that may call its models (`inference` or `admin`
/// scope) may write, a `read` key may read. The provider and the planes
/// are not tenants here.
pub(crate) fn tenant_caller_for(
    api: &str,
    caller: &Caller,
    access: Access,
) -> Result<String, ApiError> {
    let allowed = caller.may_infer || (access == Access::Read && caller.role == Role::Viewer);
    match (&caller.tenant, allowed) {
        (Some(t), true) => Ok(t.clone()),
        _ => Err(ApiError::Forbidden(format!(
            "{api} is a tenant's: call it with one of the tenant's API keys with the \
             `inference` or `admin` scope{}; this caller ({}) may not",
            if access == Access::Read {
                " (or `read`, to read)"
            } else {
                ""
            },
            caller.role.as_str()
        ))),
    }
}

/// The tenant's object `id` of kind `R`, or 404: another tenant's answers
/// exactly as a missing one does.
async fn owned<R: Resource>(state: &AppState, tenant: &str, id: &str) -> Result<Object, ApiError> {
    match state.store.get(R::KIND, id).await? {
        Some(o) if o.tenant.as_deref() == Some(tenant) => Ok(o),
        _ => Err(ApiError::not_found(R::KIND, id)),
    }
}

/// The tenant's object of kind `R` called `name`, or whose id is `name`,
/// or 404 (another tenant's by either, as a missing one).
pub(crate) async fn named_or_owned<R: Resource>(
    state: &AppState,
    tenant: &str,
    name: &str,
) -> Result<Object, ApiError> {
    if let Some(o) = state.store.get_by_name(R::KIND, Some(tenant), name).await? {
        return Ok(o);
    }
    if name.starts_with(R::ID_PREFIX) {
        return owned::<R>(state, tenant, name).await;
    }
    Err(ApiError::not_found(R::KIND, name))
}

/// `GET /v1/files/{id}`, `GET /v1/batches/{id}`.
async fn one<R: Shaped>(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller(&caller, Access::Read)?;
    Ok(Json(R::shape(&owned::<R>(&state, &tenant, &id).await?)?))
}

/// Creates the tenant's object `id` of kind `R`, admitted only while the
/// tenant holds fewer than its quota's `counted` (checked with the write).
pub(crate) async fn create_counted<R: Resource>(
    state: &AppState,
    (id, tenant, name): (&str, &str, String),
    (spec, status): (&R::Spec, &R::Status),
    counted: Counted,
    audit: AuditContext,
) -> Result<Object, ApiError> {
    crate::crud::write(
        state,
        Write::Create {
            kind: R::KIND.into(),
            id: id.to_string(),
            tenant: Some(tenant.to_string()),
            name,
            body: stored::body::<R>(spec, Some(status))?,
        },
        Some(crate::kinds::one_more(R::KIND, tenant, counted)),
        audit,
    )
    .await
}

/// Deletes object `o` of kind `R` (found by one of the lookups above).
pub(crate) async fn delete_found<R: Resource>(
    state: &AppState,
    o: &Object,
    audit: AuditContext,
) -> Result<(), ApiError> {
    let delete = Write::Delete {
        kind: R::KIND.into(),
        id: o.id.clone(),
    };
    crate::crud::write(state, delete, None, audit)
        .await
        .map(|_| ())
}

/// Every object of kind `R` the tenant holds.
pub(crate) async fn all_of<R: Resource>(
    state: &AppState,
    tenant: &str,
) -> Result<Vec<Object>, ApiError> {
    Ok(state
        .store
        .list_all(R::KIND, &TenantFilter::Exactly(Some(tenant.to_string())))
        .await?)
}

/// The tenant's quota.
pub(crate) async fn tenant_quota(
    state: &AppState,
    tenant: &str,
) -> Result<atrium_core::quota::Quota, ApiError> {
    let object = state
        .store
        .get_by_name(Tenant::KIND, None, tenant)
        .await?
        .ok_or_else(|| ApiError::not_found(Tenant::KIND, tenant))?;
    Ok(stored::spec::<Tenant>(&object)?.quota)
}

/// The tenant's storage quota in bytes, when it sets one.
async fn storage_limit(state: &AppState, tenant: &str) -> Result<Option<u64>, ApiError> {
    Ok(tenant_quota(state, tenant).await?.storage.map(|s| s.0))
}

/// What the tenant stores: volumes, images and files.
async fn storage_used(state: &AppState, tenant: &str) -> Result<u64, ApiError> {
    let held = tenant_resources_used(state, tenant).await?.storage.0;
    let registry = state.registry.clone();
    let name = tenant.to_string();
    let images = tokio::task::spawn_blocking(move || registry.namespace_bytes(&name))
        .await
        .map_err(|e| ApiError::Internal(format!("registry usage: {e}")))?;
    let files = file_bytes(state, tenant).await?;
    Ok(held.saturating_add(images).saturating_add(files))
}

/// The bytes of the tenant's files, which count against its storage quota.
pub(crate) async fn file_bytes(state: &AppState, tenant: &str) -> Result<u64, ApiError> {
    Ok(all_of::<File>(state, tenant)
        .await?
        .iter()
        .filter_map(|o| stored::spec::<File>(o).ok())
        .fold(0u64, |sum, f| sum.saturating_add(f.bytes)))
}
