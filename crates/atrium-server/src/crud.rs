//! Handlers for resources, generic over [`Kind`]: create, get, list (paged,
//! or as a watch stream), update, delete. Authorization happens here in two
//! steps, always in this order:
//!
//! 1. the role: may this role read/write this kind at all? If not, 403 —
//!    the same answer whatever the object, so it reveals nothing;
//! 2. the object: is it the caller's (or public)? If not, 404 — exactly as
//!    if it did not exist, so one tenant cannot probe for another's names.

use std::convert::Infallible;
use std::time::Duration;

use atrium_api::{CreateRequest, ListResponse, UpdateRequest, WatchEvent, WatchEventType};
use atrium_core::name::validate_name;
use atrium_core::FieldErrors;
use atrium_store::{AuditContext, ChangeOp, Object, Precondition, TenantFilter, Write, WriteError};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::extract::{JsonBody, Params};
use crate::kinds::{permits, Access, Kind, Ownership, Resource, Tenant};
use crate::stored;
pub use crate::stored::view;
use crate::{AppState, RequestId};

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;
/// How often an idle watch stream sends a bookmark (progress + keep-alive).
const BOOKMARK_EVERY: Duration = Duration::from_secs(10);
/// Changes read from the store per round trip when a watcher catches up.
const WATCH_BATCH: u32 = 500;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub limit: Option<u32>,
    pub page_token: Option<String>,
    /// Stream changes as newline-delimited JSON instead of listing.
    pub watch: Option<bool>,
    /// With `watch`: stream changes after this revision (from a list's
    /// `revision`, or the last event seen); from now when absent.
    pub since: Option<i64>,
    /// Provider admin only: restrict to one tenant's objects.
    pub tenant: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectParams {
    /// Provider admin: the tenant whose object a name refers to.
    pub tenant: Option<String>,
}

pub fn require<K: Kind>(caller: &Caller, access: Access) -> Result<(), ApiError> {
    if permits::<K>(caller.role, access) {
        return Ok(());
    }
    let verb = match access {
        Access::Read => "read",
        Access::Write => "change",
    };
    Err(ApiError::Forbidden(format!(
        "role {} may not {verb} {}",
        caller.role.as_str(),
        K::PLURAL
    )))
}

/// Whether the caller may know the object exists.
pub fn visible<K: Kind>(caller: &Caller, object: &Object) -> bool {
    if caller.role == Role::ProviderAdmin {
        return true;
    }
    if let Some(plane) = &caller.plane {
        return crate::kinds::plane_sees::<K>(plane, object);
    }
    match K::OWNERSHIP {
        Ownership::Provider => true,
        Ownership::TenantSelf => caller.tenant.as_deref() == Some(object.name.as_str()),
        Ownership::Tenant => object.tenant.is_some() && object.tenant == caller.tenant,
        Ownership::Catalog => object.tenant.is_none() || object.tenant == caller.tenant,
    }
}

/// Whether the caller may change a visible object: tenant callers only
/// their own, never public or provider objects.
fn check_writable<K: Kind>(caller: &Caller, object: &Object) -> Result<(), ApiError> {
    // A plane's writes are checked by `plane_may_write`.
    if caller.role == Role::ProviderAdmin
        || caller.plane.is_some()
        || (object.tenant.is_some() && object.tenant == caller.tenant)
    {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "{} {:?} belongs to the provider's public catalogue; only the provider may change it",
        K::KIND,
        object.name
    )))
}

/// What ids are made of after their prefix.
const ID_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// `prefix` + 16 lowercase base32 characters: 9 of time (milliseconds) then
/// 7 random, so ids sort by creation and never collide in practice.
pub fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = ID_ALPHABET;
    let millis = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let mut t = u64::try_from(millis).unwrap_or(0);
    let mut out = vec![0u8; 16];
    for slot in out[..9].iter_mut().rev() {
        *slot = ALPHABET[(t % 32) as usize];
        t /= 32;
    }
    let random: u64 = rand::random();
    for (i, slot) in out[9..].iter_mut().enumerate() {
        *slot = ALPHABET[((random >> (i * 5)) % 32) as usize];
    }
    format!("{prefix}{}", String::from_utf8_lossy(&out))
}

/// Whether `id` is exactly what [`new_id`] makes with `prefix`: the check
/// before a server-made id becomes a path, a file name or a PostgreSQL
/// name, so no caller's text ever does.
pub fn made_by_new_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .is_some_and(|rest| rest.len() == 16 && rest.bytes().all(|b| ID_ALPHABET.contains(&b)))
}

fn looks_like_id<K: Kind>(ident: &str) -> bool {
    ident.len() == K::ID_PREFIX.len() + 16 && ident.starts_with(K::ID_PREFIX)
}

pub fn audit(caller: &Caller, request_id: &RequestId, action: String) -> AuditContext {
    AuditContext {
        actor: caller.actor.clone(),
        role: caller.role.as_str().to_string(),
        action,
        request_id: request_id.0.clone(),
    }
}

pub async fn write(
    state: &AppState,
    write: Write,
    precondition: Option<Precondition<ApiError>>,
    audit: AuditContext,
) -> Result<Object, ApiError> {
    match state.store.write(write, precondition, audit).await {
        Ok(change) => Ok(change.object),
        Err(WriteError::Store(e)) => Err(e.into()),
        Err(WriteError::Rejected(e)) => Err(e),
    }
}

/// The tenant a new object belongs to.
pub async fn owner_for_create<K: Kind>(
    state: &AppState,
    caller: &Caller,
    requested: Option<String>,
) -> Result<Option<String>, ApiError> {
    match K::OWNERSHIP {
        Ownership::Provider | Ownership::TenantSelf => match requested {
            None => Ok(None),
            Some(_) => Err(ApiError::field(
                "tenant",
                format!("{} belong to no tenant", K::PLURAL),
            )),
        },
        Ownership::Tenant | Ownership::Catalog => match (&caller.tenant, requested) {
            (Some(own), None) => Ok(Some(own.clone())),
            (Some(own), Some(t)) if *own == t => Ok(Some(t)),
            // Another tenant's name: answer as if it did not exist.
            (Some(_), Some(t)) => Err(ApiError::not_found(Tenant::KIND, &t)),
            (None, None) if K::OWNERSHIP == Ownership::Catalog => Ok(None),
            (None, None) => Err(ApiError::field(
                "tenant",
                format!("name the tenant that owns the {}", K::KIND),
            )),
            (None, Some(t)) => {
                if state
                    .store
                    .get_by_name(Tenant::KIND, None, &t)
                    .await?
                    .is_none()
                {
                    return Err(ApiError::field("tenant", format!("no tenant named {t:?}")));
                }
                Ok(Some(t))
            }
        },
    }
}

/// The tenant whose names a tenant-owned lookup or list covers.
fn scope_tenant(caller: &Caller, requested: Option<&str>) -> Result<Option<String>, ApiError> {
    match (&caller.tenant, requested) {
        (Some(own), None) => Ok(Some(own.clone())),
        (Some(own), Some(t)) if own == t => Ok(Some(own.clone())),
        (Some(_), Some(t)) => Err(ApiError::not_found(Tenant::KIND, t)),
        (None, t) => Ok(t.map(str::to_string)),
    }
}

/// Finds the object `ident` (an id or a name) names for this caller, or
/// 404 if it does not exist or the caller may not see it.
pub async fn resolve<K: Kind>(
    state: &AppState,
    caller: &Caller,
    ident: &str,
    tenant: Option<&str>,
) -> Result<Object, ApiError> {
    let store = &state.store;
    let by_id = looks_like_id::<K>(ident);
    let mut found = if by_id {
        store.get(K::KIND, ident).await?
    } else {
        None
    };
    // Ids with an underscore can never be names (names have none): a
    // missing one is simply not found.
    if found.is_none() && by_id && K::ID_PREFIX.contains('_') {
        return Err(ApiError::not_found(K::KIND, ident));
    }
    if found.is_none() {
        found = match K::OWNERSHIP {
            Ownership::Provider | Ownership::TenantSelf => {
                store.get_by_name(K::KIND, None, ident).await?
            }
            Ownership::Tenant => match scope_tenant(caller, tenant)? {
                Some(t) => store.get_by_name(K::KIND, Some(&t), ident).await?,
                None => {
                    return Err(ApiError::InvalidQuery {
                        name: "tenant".into(),
                        message: format!(
                            "{} names are per tenant: add ?tenant=<name>, or use the id",
                            K::KIND
                        ),
                    })
                }
            },
            Ownership::Catalog => match scope_tenant(caller, tenant)? {
                Some(t) => match store.get_by_name(K::KIND, Some(&t), ident).await? {
                    Some(o) => Some(o),
                    None => store.get_by_name(K::KIND, None, ident).await?,
                },
                None => store.get_by_name(K::KIND, None, ident).await?,
            },
        };
    }
    match found {
        Some(o) if visible::<K>(caller, &o) => Ok(o),
        _ => Err(ApiError::not_found(K::KIND, ident)),
    }
}

pub fn validate_create<K: Kind>(req: &CreateRequest<K::Spec>) -> Result<(), ApiError> {
    let mut errors = FieldErrors::new();
    errors.check("name", validate_name(&req.name));
    if let Err(e) = K::validate(&req.spec) {
        errors.extend(e.nest("spec"));
    }
    errors.into_result().map_err(ApiError::InvalidFields)
}

pub async fn create<K: Kind>(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    JsonBody(req): JsonBody<CreateRequest<K::Spec>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require::<K>(&caller, Access::Write)?;
    validate_create::<K>(&req)?;
    crate::kinds::plane_may_write::<K>(&caller, &req.name, &req.spec)?;
    let tenant = owner_for_create::<K>(&state, &caller, req.tenant.clone()).await?;
    let precondition = K::admit(&state, tenant.as_deref(), &req.spec, None).await?;
    let body = stored::body::<K>(&req.spec, K::initial_status(&req.spec).as_ref())?;
    let created = write(
        &state,
        Write::Create {
            kind: K::KIND.into(),
            id: new_id(K::ID_PREFIX),
            tenant,
            name: req.name,
            body,
        },
        precondition,
        audit(&caller, &rid, format!("{}.create", K::KIND)),
    )
    .await?;
    K::after_create(&state, &created).await?;
    Ok((StatusCode::CREATED, Json(view(&created))))
}

pub async fn get<K: Kind>(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(ident): Path<String>,
    Params(params): Params<ObjectParams>,
) -> Result<Json<Value>, ApiError> {
    require::<K>(&caller, Access::Read)?;
    let object = resolve::<K>(&state, &caller, &ident, params.tenant.as_deref()).await?;
    Ok(Json(view(&object)))
}

pub async fn update<K: Kind>(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(ident): Path<String>,
    Params(params): Params<ObjectParams>,
    JsonBody(req): JsonBody<UpdateRequest<K::Spec>>,
) -> Result<Json<Value>, ApiError> {
    require::<K>(&caller, Access::Write)?;
    K::validate(&req.spec).map_err(|e| ApiError::InvalidFields(e.nest("spec")))?;
    let object = resolve::<K>(&state, &caller, &ident, params.tenant.as_deref()).await?;
    check_writable::<K>(&caller, &object)?;
    crate::kinds::plane_may_write::<K>(&caller, &object.name, &req.spec)?;
    K::check_change(&caller, &object, Some(&req.spec))?;
    let precondition = K::admit(
        &state,
        object.tenant.as_deref(),
        &req.spec,
        Some(&object.id),
    )
    .await?;
    let body = stored::with_spec::<K>(&object.body, &req.spec)?;
    let updated = write(
        &state,
        Write::Update {
            kind: K::KIND.into(),
            id: object.id,
            body,
            if_revision: req.revision,
        },
        precondition,
        audit(&caller, &rid, format!("{}.update", K::KIND)),
    )
    .await?;
    Ok(Json(view(&updated)))
}

pub async fn delete<K: Kind>(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(ident): Path<String>,
    Params(params): Params<ObjectParams>,
) -> Result<Json<Value>, ApiError> {
    require::<K>(&caller, Access::Write)?;
    let object = resolve::<K>(&state, &caller, &ident, params.tenant.as_deref()).await?;
    check_writable::<K>(&caller, &object)?;
    if caller.plane.is_some() {
        return Err(ApiError::Forbidden(format!(
            "a plane credential may not delete {}",
            K::PLURAL
        )));
    }
    K::check_change(&caller, &object, None)?;
    K::before_delete(&state, &object).await?;
    let deleted = write(
        &state,
        Write::Delete {
            kind: K::KIND.into(),
            id: object.id,
        },
        None,
        audit(&caller, &rid, format!("{}.delete", K::KIND)),
    )
    .await?;
    Ok(Json(view(&deleted)))
}

/// Which objects of kind `K` a list or watch by this caller covers: a store
/// filter, plus a name when the caller may see only one tenant object.
fn list_scope<K: Kind>(
    caller: &Caller,
    tenant: Option<&str>,
) -> Result<(TenantFilter, Option<String>), ApiError> {
    // A plane sees across tenants, object by object (`visible`).
    if caller.role == Role::ProviderAdmin || caller.plane.is_some() {
        let filter = match (K::OWNERSHIP, tenant) {
            (Ownership::Tenant | Ownership::Catalog, Some(t)) => {
                TenantFilter::Exactly(Some(t.into()))
            }
            _ => TenantFilter::All,
        };
        return Ok((filter, None));
    }
    let own = scope_tenant(caller, tenant)?.unwrap_or_default();
    Ok(match K::OWNERSHIP {
        Ownership::Provider => (TenantFilter::All, None),
        Ownership::TenantSelf => (TenantFilter::Exactly(None), Some(own)),
        Ownership::Tenant => (TenantFilter::Exactly(Some(own)), None),
        Ownership::Catalog => (TenantFilter::OwnAndPublic(own), None),
    })
}

pub async fn list<K: Kind>(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Params(params): Params<ListParams>,
) -> Result<Response, ApiError> {
    require::<K>(&caller, Access::Read)?;
    let (filter, only_name) = list_scope::<K>(&caller, params.tenant.as_deref())?;
    if params.watch == Some(true) {
        let slot = match &caller.tenant {
            Some(tenant) => Some(OpenWatches::open(&state, tenant).await?),
            None => None,
        };
        if let Some(since) = params.since {
            let oldest = state.store.compacted().await?;
            if since < oldest {
                return Err(ApiError::Expired {
                    requested: since,
                    oldest,
                });
            }
        }
        return watch::<K>(state, caller, filter, only_name, params.since, slot);
    }
    if params.since.is_some() {
        return Err(ApiError::InvalidQuery {
            name: "since".into(),
            message: "only with watch=true".into(),
        });
    }
    let limit = match params.limit {
        None => DEFAULT_PAGE,
        Some(n) if (1..=MAX_PAGE).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::InvalidQuery {
                name: "limit".into(),
                message: format!("{n} is outside 1..={MAX_PAGE}"),
            })
        }
    };
    let response = if let Some(name) = only_name {
        let revision = state.store.head();
        let items: Vec<Value> = state
            .store
            .get_by_name(K::KIND, None, &name)
            .await?
            .iter()
            .map(view)
            .collect();
        ListResponse {
            items,
            revision,
            next_page_token: None,
        }
    } else {
        let page = state
            .store
            .list(K::KIND, &filter, params.page_token.as_deref(), limit)
            .await?;
        ListResponse {
            items: page
                .objects
                .iter()
                .filter(|o| visible::<K>(&caller, o))
                .map(view)
                .collect(),
            revision: page.revision,
            next_page_token: page.next_after,
        }
    };
    Ok(Json(response).into_response())
}

/// Watch streams open per tenant: each holds a slot of its tenant's
/// `watches` cap for as long as it runs.
#[derive(Debug, Default)]
pub struct OpenWatches(std::sync::Mutex<std::collections::HashMap<String, u64>>);

/// One open stream's place; released when the stream ends.
pub struct WatchSlot {
    open: std::sync::Arc<OpenWatches>,
    tenant: String,
}

impl OpenWatches {
    pub(crate) async fn open(state: &AppState, tenant: &str) -> Result<WatchSlot, ApiError> {
        let quota = match state.store.get_by_name(Tenant::KIND, None, tenant).await? {
            Some(t) => stored::spec::<Tenant>(&t)?.quota,
            None => return Err(ApiError::not_found(Tenant::KIND, tenant)),
        };
        let mut open = state
            .watches
            .0
            .lock()
            .map_err(|_| ApiError::Internal("watch counts unavailable".into()))?;
        let held = open.entry(tenant.to_string()).or_default();
        quota
            .admit_one(atrium_core::quota::Counted::Watches, *held)
            .map_err(ApiError::TooManyOpen)?;
        *held += 1;
        Ok(WatchSlot {
            open: state.watches.clone(),
            tenant: tenant.to_string(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.0.lock() {
            if let Some(n) = open.get_mut(&self.tenant) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.tenant);
                }
            }
        }
    }
}

fn watch_line(event: &WatchEvent<Value>) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Streams every change to objects the caller may see, after `since`, in
/// revision order, as newline-delimited JSON, with periodic bookmarks. A
/// client that reconnects with `since` = the last revision it saw misses
/// nothing and sees nothing twice — or, when the change log was compacted
/// past it, gets 410 `expired` and lists again.
fn watch<K: Kind>(
    state: AppState,
    caller: Caller,
    filter: TenantFilter,
    only_name: Option<String>,
    since: Option<i64>,
    slot: Option<WatchSlot>,
) -> Result<Response, ApiError> {
    let head = state.store.head();
    let start = since.unwrap_or(head);
    if !(0..=head).contains(&start) {
        return Err(ApiError::InvalidQuery {
            name: "since".into(),
            message: format!("revision {start} is outside 0..={head} (the store's head)"),
        });
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let mut heads = state.store.subscribe();
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let _gauge = state.metrics.watch_started();
        let mut last = start;
        loop {
            let head = *heads.borrow_and_update();
            while last < head {
                let batch = match state
                    .store
                    .changes(last, head, Some(K::KIND), &filter, WATCH_BATCH)
                    .await
                {
                    Ok(b) => b,
                    // Compacted past this stream (a slow reader): its
                    // client reconnects, gets 410, and lists again.
                    Err(e) => {
                        tracing::warn!(error = %e, "watch: cannot read changes; closing stream");
                        return;
                    }
                };
                let full = batch.len() == WATCH_BATCH as usize;
                for change in &batch {
                    let object = &change.object;
                    if only_name.as_deref().is_some_and(|n| n != object.name)
                        || !visible::<K>(&caller, object)
                    {
                        continue;
                    }
                    let kind = match change.op {
                        ChangeOp::Created => WatchEventType::Added,
                        ChangeOp::Updated => WatchEventType::Modified,
                        ChangeOp::Deleted => WatchEventType::Deleted,
                    };
                    let event = WatchEvent {
                        kind,
                        revision: change.revision,
                        object: Some(view(object)),
                    };
                    if tx.send(Ok(watch_line(&event))).await.is_err() {
                        return;
                    }
                }
                last = match batch.last() {
                    Some(c) if full => c.revision,
                    _ => head,
                };
            }
            tokio::select! {
                changed = heads.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(BOOKMARK_EVERY) => {
                    let bookmark = WatchEvent { kind: WatchEventType::Bookmark, revision: last, object: None };
                    if tx.send(Ok(watch_line(&bookmark))).await.is_err() {
                        return;
                    }
                }
                // Only ever set to true: any change (or a dropped sender) means stop.
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
