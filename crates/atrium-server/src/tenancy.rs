//! Endpoints that are not plain resources: creating and revoking API keys,
//! reading and setting quotas, and reading the audit trail.

use atrium_api::{
    AuditEventView, CreateRequest, CreatedKey, KeyStatus, ListResponse, QuotaUpdate, QuotaView,
};
use atrium_core::key::{KeySpec, KEY_PREFIX};
use atrium_core::tenant::TenantSpec;
use atrium_store::{Object, TenantFilter, Write};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{now_rfc3339, random_token, sha256_hex, Caller, Role};
use crate::crud::{
    audit, new_id, owner_for_create, require, resolve, validate_create, view, write, ObjectParams,
    MAX_PAGE,
};
use crate::error::ApiError;
use crate::extract::{JsonBody, Params};
use crate::kinds::{
    parse_spec, tenant_usage, Access, Key, KeyRecord, Kind, Tenant, DEPLOYMENT_KIND, TENANT_KIND,
};
use crate::{AppState, RequestId};

/// `POST /v1/keys`: the only response that ever carries the key's secret.
pub async fn create_key(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    JsonBody(req): JsonBody<CreateRequest<KeySpec>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require::<Key>(&caller, Access::Write)?;
    validate_create::<Key>(&req)?;
    let tenant = owner_for_create::<Key>(&state, &caller, req.tenant.clone()).await?;
    let id = new_id(Key::ID_PREFIX);
    let token = format!("{KEY_PREFIX}{id}_{}", random_token(40));
    let record = KeyRecord {
        spec: req.spec,
        status: KeyStatus { revoked_at: None },
        digest: sha256_hex(&token),
    };
    let body = serde_json::to_value(&record).map_err(|e| ApiError::Internal(e.to_string()))?;
    let created = write(
        &state,
        Write::Create {
            kind: Key::KIND.into(),
            id,
            tenant,
            name: req.name,
            body,
        },
        None,
        audit(&caller, &rid, "key.create".into()),
    )
    .await?;
    let key =
        serde_json::from_value(view(&created)).map_err(|e| ApiError::Internal(e.to_string()))?;
    let created = CreatedKey { key, secret: token };
    let body = serde_json::to_value(created).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(body)))
}

/// `POST /v1/keys/{key}/revoke`: the key stops authenticating at once.
pub async fn revoke_key(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(ident): Path<String>,
    Params(params): Params<ObjectParams>,
) -> Result<Json<Value>, ApiError> {
    require::<Key>(&caller, Access::Write)?;
    let object = resolve::<Key>(&state, &caller, &ident, params.tenant.as_deref()).await?;
    let mut body = object.body.clone();
    if body["status"]["revoked_at"].is_null() {
        body["status"]["revoked_at"] = Value::String(now_rfc3339());
    }
    let updated = write(
        &state,
        Write::Update {
            kind: Key::KIND.into(),
            id: object.id,
            body,
            if_revision: None,
        },
        None,
        audit(&caller, &rid, "key.revoke".into()),
    )
    .await?;
    Ok(Json(view(&updated)))
}

async fn quota_view(state: &AppState, tenant: &Object) -> Result<QuotaView, ApiError> {
    let spec: TenantSpec = parse_spec(tenant)?;
    let deployments = state
        .store
        .list_all(
            DEPLOYMENT_KIND,
            &TenantFilter::Exactly(Some(tenant.name.clone())),
        )
        .await?;
    Ok(QuotaView {
        tenant: tenant.name.clone(),
        quota: spec.quota,
        used: tenant_usage(&deployments, None)?,
    })
}

/// `GET /v1/quotas`: every tenant's quota and use (the provider), or the
/// caller's own.
pub async fn list_quotas(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<ListResponse<QuotaView>>, ApiError> {
    require::<Tenant>(&caller, Access::Read)?;
    let revision = state.store.head();
    let tenants = match &caller.tenant {
        None => {
            state
                .store
                .list_all(TENANT_KIND, &TenantFilter::All)
                .await?
        }
        Some(own) => state
            .store
            .get_by_name(TENANT_KIND, None, own)
            .await?
            .into_iter()
            .collect(),
    };
    let mut items = Vec::with_capacity(tenants.len());
    for t in &tenants {
        items.push(quota_view(&state, t).await?);
    }
    Ok(Json(ListResponse {
        items,
        revision,
        next_page_token: None,
    }))
}

pub async fn get_quota(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tenant): Path<String>,
) -> Result<Json<QuotaView>, ApiError> {
    require::<Tenant>(&caller, Access::Read)?;
    let object = resolve::<Tenant>(&state, &caller, &tenant, None).await?;
    Ok(Json(quota_view(&state, &object).await?))
}

/// `PUT /v1/quotas/{tenant}`: the provider sets a tenant's quota. Lowering it
/// below current use is allowed: what runs keeps running, and nothing more
/// is admitted until use falls under the new limit.
pub async fn set_quota(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(tenant): Path<String>,
    JsonBody(req): JsonBody<QuotaUpdate>,
) -> Result<Json<QuotaView>, ApiError> {
    require::<Tenant>(&caller, Access::Write)?;
    let object = resolve::<Tenant>(&state, &caller, &tenant, None).await?;
    let mut body = object.body.clone();
    body["spec"]["quota"] =
        serde_json::to_value(&req.quota).map_err(|e| ApiError::Internal(e.to_string()))?;
    let updated = write(
        &state,
        Write::Update {
            kind: TENANT_KIND.into(),
            id: object.id,
            body,
            if_revision: None,
        },
        None,
        audit(&caller, &rid, "quota.update".into()),
    )
    .await?;
    Ok(Json(quota_view(&state, &updated).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Events after this revision.
    pub after: Option<i64>,
    pub limit: Option<u32>,
    /// Provider admin only: one tenant's events.
    pub tenant: Option<String>,
}

/// `GET /v1/audit`: the provider sees everything; a tenant admin sees its
/// own tenant's events only.
pub async fn list_audit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Params(params): Params<AuditParams>,
) -> Result<Json<ListResponse<AuditEventView>>, ApiError> {
    let filter = match (caller.role, &caller.tenant) {
        (Role::ProviderAdmin, _) => match params.tenant {
            Some(t) => TenantFilter::Exactly(Some(t)),
            None => TenantFilter::All,
        },
        (Role::TenantAdmin, Some(own)) => match params.tenant {
            Some(t) if t != *own => return Err(ApiError::not_found(TENANT_KIND, &t)),
            _ => TenantFilter::Exactly(Some(own.clone())),
        },
        (role, _) => {
            return Err(ApiError::Forbidden(format!(
                "role {} may not read the audit trail",
                role.as_str()
            )))
        }
    };
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let after = params.after.unwrap_or(0);
    let events = state.store.audit(&filter, after, limit).await?;
    let next_page_token = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.revision.to_string()))
        .flatten();
    let items = events
        .into_iter()
        .map(|e| AuditEventView {
            revision: e.revision,
            at: e.at,
            actor: e.actor,
            role: e.role,
            tenant: e.tenant,
            action: e.action,
            kind: e.kind,
            object_id: e.object_id,
            object_name: e.object_name,
            request_id: e.request_id,
        })
        .collect();
    Ok(Json(ListResponse {
        items,
        revision: state.store.head(),
        next_page_token,
    }))
}
