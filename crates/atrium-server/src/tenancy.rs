//! Endpoints that are not plain resources: creating and revoking API keys,
//! reading and setting quotas, and reading the audit trail.

use atrium_api::{
    AuditEventView, CreateRequest, CreatedKey, KeyStatus, ListResponse, QuotaUpdate, QuotaView,
    UsageBatch,
};
use atrium_core::key::{KeySpec, KEY_PREFIX};
use atrium_core::quantity::ByteSize;
use atrium_core::quota::Counted;
use atrium_store::{Object, TenantFilter, UsageRecord, Write};
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
    one_more, tenant_resources_used, Access, Key, KeyRecord, Kind, Resource, Tenant,
};
use crate::stored;
use crate::{AppState, RequestId};

/// Refuses the node and gateway credentials: `what` is for people.
fn refuse_planes(caller: &Caller, what: &str) -> Result<(), ApiError> {
    match &caller.plane {
        Some(p) => Err(ApiError::Forbidden(format!(
            "a {} credential may not read {what}",
            p.plane.as_str()
        ))),
        None => Ok(()),
    }
}

/// Admits the gateways' endpoints: a gateway's site credential, or the
/// provider.
fn only_gateways(caller: &Caller, what: &str) -> Result<(), ApiError> {
    match caller.role {
        Role::ProviderAdmin | Role::Gateway => Ok(()),
        role => Err(ApiError::Forbidden(format!(
            "only gateways (and the provider) {what}; role {} may not",
            role.as_str()
        ))),
    }
}

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
        issuer: Some(caller.role.as_str().to_string()),
    };
    let cap = tenant
        .as_deref()
        .map(|t| one_more(Key::KIND, t, Counted::Keys));
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
        cap,
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
    let mut status = stored::status::<Key>(&object).unwrap_or(KeyStatus { revoked_at: None });
    status.revoked_at.get_or_insert_with(now_rfc3339);
    let body = stored::with_status::<Key>(&object.body, &status)?;
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
    let spec = stored::spec::<Tenant>(tenant)?;
    let mut used = tenant_resources_used(state, &tenant.name).await?;
    // Images count against the same storage quota (the registry refuses
    // pushes past it).
    let registry = state.registry.clone();
    let name = tenant.name.clone();
    let images = tokio::task::spawn_blocking(move || registry.namespace_bytes(&name))
        .await
        .map_err(|e| ApiError::Internal(format!("registry usage: {e}")))?;
    // And the Batch API's files.
    let files = crate::batches::file_bytes(state, &tenant.name).await?;
    used.storage = ByteSize(used.storage.0.saturating_add(images).saturating_add(files));
    Ok(QuotaView {
        tenant: tenant.name.clone(),
        quota: spec.quota,
        used,
    })
}

/// `GET /v1/quotas`: every tenant's quota and use (the provider), or the
/// caller's own.
pub async fn list_quotas(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<ListResponse<QuotaView>>, ApiError> {
    refuse_planes(&caller, "quotas")?;
    require::<Tenant>(&caller, Access::Read)?;
    let revision = state.store.head();
    let tenants = match &caller.tenant {
        None => {
            state
                .store
                .list_all(Tenant::KIND, &TenantFilter::All)
                .await?
        }
        Some(own) => state
            .store
            .get_by_name(Tenant::KIND, None, own)
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
    refuse_planes(&caller, "quotas")?;
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
    req.quota
        .validate()
        .map_err(|e| ApiError::InvalidFields(e.nest("quota")))?;
    let object = resolve::<Tenant>(&state, &caller, &tenant, None).await?;
    let mut spec = stored::spec::<Tenant>(&object)?;
    spec.quota = req.quota;
    let body = stored::with_spec::<Tenant>(&object.body, &spec)?;
    let updated = write(
        &state,
        Write::Update {
            kind: Tenant::KIND.into(),
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
            Some(t) if t != *own => return Err(ApiError::not_found(Tenant::KIND, &t)),
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

/// `PUT /v1/placements/{id}/status` and `PUT /v1/execs/{id}/status`: the
/// node's agent reports what it observed of a replica, or what came of an
/// exec. Only the node an object is on (others are not visible to it:
/// 404) and the provider write these; a tenant never writes its own.
pub async fn set_status<K: Kind>(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(ident): Path<String>,
    JsonBody(status): JsonBody<K::Status>,
) -> Result<Json<Value>, ApiError> {
    if !matches!(caller.role, Role::Node | Role::ProviderAdmin) {
        return Err(ApiError::Forbidden(format!(
            "only the node running it reports a {}'s status",
            K::KIND
        )));
    }
    let object = resolve::<K>(&state, &caller, &ident, None).await?;
    if stored::status::<K>(&object).as_ref() == Some(&status) {
        return Ok(Json(view(&object)));
    }
    let body = stored::with_status::<K>(&object.body, &status)?;
    let updated = write(
        &state,
        Write::Update {
            kind: K::KIND.into(),
            id: object.id,
            body,
            if_revision: None,
        },
        None,
        audit(&caller, &rid, format!("{}.status", K::KIND)),
    )
    .await?;
    Ok(Json(view(&updated)))
}

/// Whether `s` has the shape of a batch's id (`crud::new_id`'s).
fn is_batch_id(s: &str) -> bool {
    s.strip_prefix(atrium_api::Batch::ID_PREFIX)
        .is_some_and(|rest| rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Most records one usage batch may carry.
const MAX_USAGE_BATCH: usize = 10_000;
/// Most requests one record may sum: a gateway's minute of one replica
/// is far below it, and sums of a page of such records stay in range.
const MAX_REQUESTS_PER_RECORD: i64 = 1_000_000_000;

/// `POST /v1/usage`: a gateway ships a batch of usage records. Idempotent:
/// a batch id already recorded is acknowledged again and written nothing.
pub async fn record_usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(batch): JsonBody<UsageBatch>,
) -> Result<Json<Value>, ApiError> {
    only_gateways(&caller, "record usage")?;
    if batch.batch_id.is_empty() || batch.batch_id.len() > 128 {
        return Err(ApiError::field("batch_id", "must be 1 to 128 characters"));
    }
    if batch.records.len() > MAX_USAGE_BATCH {
        return Err(ApiError::field(
            "records",
            format!("at most {MAX_USAGE_BATCH} records per batch"),
        ));
    }
    // Usage is never negative: a record that says so would lower what a
    // tenant is billed. The whole batch is refused (the gateway then drops
    // what is not a record and sends the rest).
    let mut errors = atrium_core::FieldErrors::new();
    for (i, r) in batch.records.iter().enumerate() {
        for (field, value) in [
            ("prompt_tokens", r.prompt_tokens),
            ("completion_tokens", r.completion_tokens),
        ] {
            if value < 0 {
                errors.push(
                    format!("records[{i}].{field}"),
                    format!("{value} is negative"),
                );
            }
        }
        if !(1..=MAX_REQUESTS_PER_RECORD).contains(&r.requests) {
            errors.push(
                format!("records[{i}].requests"),
                format!("must be 1 to {MAX_REQUESTS_PER_RECORD}, got {}", r.requests),
            );
        } else if r.requests > 1 && !r.request_id.is_empty() {
            errors.push(
                format!("records[{i}].request_id"),
                "an aggregate of several requests names none",
            );
        }
        if !r.ingress_site.is_empty() {
            errors.check(
                &format!("records[{i}].ingress_site"),
                atrium_core::name::validate_name(&r.ingress_site),
            );
        }
        if r.batch.as_deref().is_some_and(|b| !is_batch_id(b)) {
            errors.push(
                format!("records[{i}].batch"),
                "must be a batch id (batch_…)",
            );
        }
    }
    errors.into_result().map_err(ApiError::InvalidFields)?;
    if let Some(site) = caller.gateway_site() {
        if let Some(r) = batch.records.iter().find(|r| r.site != site) {
            return Err(ApiError::Forbidden(format!(
                "a gateway of site {site:?} records its own site's usage only, not {:?}",
                r.site
            )));
        }
    }
    let records: Vec<UsageRecord> = batch
        .records
        .into_iter()
        .map(|r| UsageRecord {
            at: r.at,
            tenant: r.tenant,
            deployment: r.deployment,
            site: r.site,
            replica: r.replica,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            request_id: r.request_id,
            flag: r.flag,
            batch: r.batch,
            requests: r.requests,
            ingress_site: r.ingress_site,
        })
        .collect();
    let fresh = state.store.record_usage(&batch.batch_id, &records).await?;
    Ok(Json(
        serde_json::json!({"batch_id": batch.batch_id, "recorded": fresh, "records": records.len()}),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    pub after: Option<i64>,
    pub limit: Option<u32>,
    pub tenant: Option<String>,
}

/// `GET /v1/usage`: the provider sees every tenant's usage, a tenant its own.
pub async fn list_usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Params(params): Params<UsageParams>,
) -> Result<Json<Value>, ApiError> {
    refuse_planes(&caller, "usage")?;
    require::<Tenant>(&caller, Access::Read)?;
    let filter = match (&caller.tenant, params.tenant) {
        (None, Some(t)) => TenantFilter::Exactly(Some(t)),
        (None, None) => TenantFilter::All,
        (Some(own), Some(t)) if *own != t => return Err(ApiError::not_found(Tenant::KIND, &t)),
        (Some(own), _) => TenantFilter::Exactly(Some(own.clone())),
    };
    let limit = params.limit.unwrap_or(1000).clamp(1, MAX_PAGE);
    let mut rows = state
        .store
        .usage(&filter, params.after.unwrap_or(0), limit)
        .await?;
    // A full page may end inside a batch; keep whole batches only, so that
    // `after` = the last revision returned never skips a record.
    let mut next_page_token = None;
    if rows.len() == limit as usize {
        let last = rows.last().map(|(r, _)| *r).unwrap_or(0);
        if rows.iter().any(|(r, _)| *r != last) {
            rows.retain(|(r, _)| *r != last);
        }
        next_page_token = rows.last().map(|(r, _)| r.to_string());
    }
    // Sums of what the records carry; each is at most a batch's bound
    // times a page, far from i64's range, and saturates rather than wraps.
    let (mut prompt, mut completion, mut requests, mut batch_requests) = (0i64, 0i64, 0i64, 0i64);
    let items: Vec<Value> = rows
        .iter()
        .map(|(revision, r)| {
            prompt = prompt.saturating_add(r.prompt_tokens);
            completion = completion.saturating_add(r.completion_tokens);
            requests = requests.saturating_add(r.requests);
            if r.batch.is_some() {
                batch_requests = batch_requests.saturating_add(r.requests);
            }
            serde_json::json!({"revision": revision, "at": r.at, "tenant": r.tenant, "deployment": r.deployment,
                               "site": r.site, "replica": r.replica, "prompt_tokens": r.prompt_tokens,
                               "completion_tokens": r.completion_tokens, "request_id": r.request_id, "flag": r.flag,
                               "batch": r.batch, "requests": r.requests, "ingress_site": r.ingress_site})
        })
        .collect();
    Ok(Json(serde_json::json!({
        "items": items,
        "totals": {"requests": requests, "batch_requests": batch_requests,
                   "prompt_tokens": prompt, "completion_tokens": completion},
        "next_page_token": next_page_token,
    })))
}

/// `GET /v1/keys/digests`: key id → SHA-256 digest of every key, for
/// gateways' authentication caches. Provider only; digests never appear in
/// the ordinary key views.
pub async fn key_digests(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    only_gateways(&caller, "read key digests")?;
    let keys = state.store.list_all(Key::KIND, &TenantFilter::All).await?;
    let map: serde_json::Map<String, Value> = keys
        .iter()
        .filter_map(|k| Some((k.id.clone(), k.body.get("digest")?.clone())))
        .collect();
    Ok(Json(Value::Object(map)))
}

/// `POST /v1/limits/sync`: a gateway reports what it admitted per limited
/// scope since its last sync and learns what the site's other gateways
/// admitted. Provider (gateway) only.
pub async fn sync_limits(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(report): JsonBody<atrium_api::LimitSync>,
) -> Result<Json<atrium_api::LimitSyncAnswer>, ApiError> {
    only_gateways(&caller, "sync limits")?;
    if let Some(site) = caller.gateway_site() {
        if report.site != site {
            return Err(ApiError::Forbidden(format!(
                "a gateway of site {site:?} syncs its own site's limits only, not {:?}",
                report.site
            )));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let answer = state
        .ledger
        .lock()
        .map_err(|_| ApiError::Internal("limit ledger unavailable".into()))?
        .sync(report, now);
    Ok(Json(answer))
}
