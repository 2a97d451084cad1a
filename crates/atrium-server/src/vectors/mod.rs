//! `/v1/collections`: a tenant's vector collections and their points, in
//! Qdrant's vocabulary (upsert, search with a payload filter, scroll,
//! count). The collection is a typed object (`Collection`, quota
//! `collections`); its points live in `store::VectorStore`. Another
//! tenant's collection answers exactly as a missing one does (404), by id
//! or by name.
//!
//! Vectors only: text is embedded by the gateway, with the tenant's key and
//! its embedding deployment, before the request reaches this plane.

mod store;

use atrium_api::{Collection, Resource};
use atrium_core::collection::{
    CollectionSpec, CollectionStatus, VectorMetric, MAX_EF, MAX_PAYLOAD_BYTES,
    MAX_POINTS_PER_WRITE, MAX_SEARCH_LIMIT,
};
use atrium_core::quota::{Counted, QuotaExceeded};
use atrium_store::{Object, Write};
use atrium_vector::collection::{payload_bytes, Point, PointId, Shape};
use atrium_vector::distance::Metric;
use atrium_vector::durable::Change;
use atrium_vector::filter::Filter;
use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::batches::{
    all_of, create_counted, delete_found, named_or_owned, tenant_caller_for, tenant_quota, Access,
};
use crate::crud::{audit, new_id, write};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::{stored, AppState, RequestId};

pub use store::{VectorStore, MAX_OPEN};

const API: &str = "the vector API";

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/v1/collections", get(list).post(create))
        .route("/v1/collections/{name}", get(one).delete(remove))
        .route("/v1/collections/{name}/points", post(upsert))
        .route("/v1/collections/{name}/points/delete", post(delete_points))
        .route("/v1/collections/{name}/points/search", post(search))
        .route("/v1/collections/{name}/points/scroll", post(scroll))
        .route("/v1/collections/{name}/points/count", post(count))
        .route("/v1/collections/{name}/points/{id}", get(get_point))
}

fn metric(m: VectorMetric) -> Metric {
    match m {
        VectorMetric::Cosine => Metric::Cosine,
        VectorMetric::Dot => Metric::Dot,
        VectorMetric::L2 => Metric::L2,
    }
}

fn shown(o: &Object) -> Result<Value, ApiError> {
    let spec = stored::spec::<Collection>(o)?;
    let status = stored::status::<Collection>(o).unwrap_or_default();
    Ok(json!({
        "id": o.id,
        "name": o.name,
        "dimension": spec.dimension,
        "metric": spec.metric,
        "embedding_model": spec.embedding_model,
        "points": status.points,
        "bytes": status.bytes,
        "created_at": o.created_at,
    }))
}

/// The tenant's collection called `name` (or with id `name`), or 404.
async fn owned(state: &AppState, tenant: &str, name: &str) -> Result<Object, ApiError> {
    named_or_owned::<Collection>(state, tenant, name).await
}

/// The points of collection object `o`, opened if they are not in memory.
async fn points_of(state: &AppState, o: &Object) -> Result<std::sync::Arc<store::Open>, ApiError> {
    let vectors = state.vectors.clone();
    let id = o.id.clone();
    blocking(move || vectors.get(&id)).await
}

/// Checks a write's size: 1 to `MAX_POINTS_PER_WRITE` items.
fn write_size(field: &str, n: usize) -> Result<(), ApiError> {
    if n == 0 || n > MAX_POINTS_PER_WRITE {
        return Err(ApiError::field(
            field,
            format!("send 1 to {MAX_POINTS_PER_WRITE} per request"),
        ));
    }
    Ok(())
}

/// Writes `changes` durably under the collection's write lock, then
/// records the new point count in its object (still under the lock, so
/// counts land in order); the count before and after.
async fn write_points(
    state: &AppState,
    o: &Object,
    guard: tokio::sync::OwnedRwLockWriteGuard<atrium_vector::durable::Durable>,
    changes: Vec<Change>,
    (caller, rid): (&Caller, &RequestId),
) -> Result<(u64, u64), ApiError> {
    let before = guard.collection().len() as u64;
    let mut guard = guard;
    let (guard, result) = tokio::task::spawn_blocking(move || {
        let r = guard.write(changes);
        (guard, r)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("vector store task: {e}")))?;
    result.map_err(|e| match e {
        atrium_vector::durable::DurableError::Point(p) => ApiError::field("points", p.to_string()),
        other => ApiError::Internal(format!("vector store: {other}")),
    })?;
    let after = guard.collection().len() as u64;
    let held = CollectionStatus {
        points: after,
        bytes: guard.collection().bytes(),
    };
    if stored::status::<Collection>(o).as_ref() != Some(&held) {
        record_points(state, o, held, caller, rid).await?;
    }
    drop(guard);
    Ok((before, after))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("vector store task: {e}")))?
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(flatten)]
    spec: CollectionSpec,
}

async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Write)?;
    atrium_core::name::validate_name(&body.name).map_err(|m| ApiError::field("name", m))?;
    body.spec.validate().map_err(ApiError::InvalidFields)?;
    let id = new_id(Collection::ID_PREFIX);
    let shape = Shape {
        dim: body.spec.dimension as usize,
        metric: metric(body.spec.metric),
    };
    let vectors = state.vectors.clone();
    let made = id.clone();
    blocking(move || vectors.create(&made, shape)).await?;
    let created = create_counted::<Collection>(
        &state,
        (&id, &tenant, body.name),
        (&body.spec, &CollectionStatus::default()),
        Counted::Collections,
        audit(&caller, &rid, "collection.create".into()),
    )
    .await;
    if created.is_err() {
        let vectors = state.vectors.clone();
        blocking(move || vectors.remove(&id)).await?;
    }
    Ok(Json(shown(&created?)?))
}

async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Read)?;
    let all = all_of::<Collection>(&state, &tenant).await?;
    let shown: Vec<Value> = all.iter().map(shown).collect::<Result<_, _>>()?;
    Ok(Json(json!({"collections": shown})))
}

async fn one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Read)?;
    Ok(Json(shown(&owned(&state, &tenant, &name).await?)?))
}

async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Write)?;
    let o = owned(&state, &tenant, &name).await?;
    delete_found::<Collection>(&state, &o, audit(&caller, &rid, "collection.delete".into()))
        .await?;
    let vectors = state.vectors.clone();
    let id = o.id.clone();
    blocking(move || vectors.remove(&id)).await?;
    Ok(Json(json!({"id": o.id, "name": o.name, "deleted": true})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpsertBody {
    points: Vec<Point>,
}

/// Points and bytes the tenant holds in all its collections, as their
/// last writes recorded.
async fn tenant_held(state: &AppState, tenant: &str) -> Result<(u64, u64), ApiError> {
    Ok(all_of::<Collection>(state, tenant)
        .await?
        .iter()
        .filter_map(stored::status::<Collection>)
        .fold((0u64, 0u64), |(p, b), s| {
            (p.saturating_add(s.points), b.saturating_add(s.bytes))
        }))
}

/// Refuses `adding` more of `what` when the tenant holds `held` and may
/// hold `cap`.
fn within(what: Counted, held: u64, adding: u64, cap: u64) -> Result<(), ApiError> {
    if held.saturating_add(adding) > cap {
        return Err(ApiError::QuotaExceeded(QuotaExceeded {
            resource: what.field().into(),
            requested: adding.to_string(),
            used: held.to_string(),
            limit: cap.to_string(),
        }));
    }
    Ok(())
}

async fn upsert(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(name): UrlPath<String>,
    JsonBody(body): JsonBody<UpsertBody>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Write)?;
    write_size("points", body.points.len())?;
    // Each payload's JSON, measured once: for its bound and for the quota.
    let payloads: Vec<u64> = body
        .points
        .iter()
        .map(|p| payload_bytes(&p.payload))
        .collect();
    for (i, &bytes) in payloads.iter().enumerate() {
        if bytes > MAX_PAYLOAD_BYTES as u64 {
            return Err(ApiError::field(
                &format!("points[{i}].payload"),
                format!("{bytes} bytes; at most {MAX_PAYLOAD_BYTES}"),
            ));
        }
    }
    let o = owned(&state, &tenant, &name).await?;
    let quota = tenant_quota(&state, &tenant).await?;
    let (held_points, held_bytes) = tenant_held(&state, &tenant).await?;
    let open = points_of(&state, &o).await?;
    let guard = open.data.clone().write_owned().await;
    let (mut adding_points, mut adding_bytes) = (0u64, 0u64);
    let c = guard.collection();
    for (p, payload) in body.points.iter().zip(&payloads) {
        let new = c.vector_bytes().saturating_add(*payload);
        match c.bytes_of(&p.id) {
            None => {
                adding_points += 1;
                adding_bytes = adding_bytes.saturating_add(new);
            }
            Some(old) => adding_bytes = adding_bytes.saturating_add(new.saturating_sub(old)),
        }
    }
    within(
        Counted::VectorPoints,
        held_points,
        adding_points,
        quota.cap(Counted::VectorPoints),
    )?;
    within(
        Counted::VectorBytes,
        held_bytes,
        adding_bytes,
        quota.cap(Counted::VectorBytes),
    )?;
    let written = body.points.len();
    let changes: Vec<Change> = body.points.into_iter().map(Change::Upsert).collect();
    let (_, points) = write_points(&state, &o, guard, changes, (&caller, &rid)).await?;
    Ok(Json(
        json!({"status": "acknowledged", "upserted": written, "points": points}),
    ))
}

/// Records a collection's point count in its object (under the
/// collection's write lock, so counts land in order).
async fn record_points(
    state: &AppState,
    o: &Object,
    held: CollectionStatus,
    caller: &Caller,
    rid: &RequestId,
) -> Result<(), ApiError> {
    let fresh = state.store.get(Collection::KIND, &o.id).await?;
    let Some(fresh) = fresh else { return Ok(()) };
    write(
        state,
        Write::Update {
            kind: Collection::KIND.into(),
            id: o.id.clone(),
            body: stored::with_status::<Collection>(&fresh.body, &held)?,
            if_revision: None,
        },
        None,
        audit(caller, rid, "collection.points".into()),
    )
    .await
    .map(|_| ())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    ids: Vec<PointId>,
}

async fn delete_points(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(name): UrlPath<String>,
    JsonBody(body): JsonBody<DeleteBody>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Write)?;
    write_size("ids", body.ids.len())?;
    let o = owned(&state, &tenant, &name).await?;
    let open = points_of(&state, &o).await?;
    let guard = open.data.clone().write_owned().await;
    let changes: Vec<Change> = body.ids.into_iter().map(Change::Delete).collect();
    let (before, points) = write_points(&state, &o, guard, changes, (&caller, &rid)).await?;
    Ok(Json(
        json!({"status": "acknowledged", "deleted": before - points, "points": points}),
    ))
}

fn checked_filter(filter: Option<Filter>) -> Result<Option<Filter>, ApiError> {
    if let Some(f) = &filter {
        f.validate().map_err(|m| ApiError::field("filter", m))?;
    }
    Ok(filter)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    vector: Vec<f32>,
    #[serde(default = "ten")]
    limit: usize,
    #[serde(default)]
    ef: Option<usize>,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default = "yes")]
    with_payload: bool,
}

fn ten() -> usize {
    10
}

fn yes() -> bool {
    true
}

async fn search(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    JsonBody(body): JsonBody<SearchBody>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Read)?;
    if !(1..=MAX_SEARCH_LIMIT).contains(&body.limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {MAX_SEARCH_LIMIT}"),
        ));
    }
    let ef = body.ef.unwrap_or(128.max(body.limit));
    if !(1..=MAX_EF).contains(&ef) {
        return Err(ApiError::field("ef", format!("must be 1 to {MAX_EF}")));
    }
    let filter = checked_filter(body.filter)?;
    let o = owned(&state, &tenant, &name).await?;
    let open = points_of(&state, &o).await?;
    let guard = open.data.clone().read_owned().await;
    let mut scratch = open.scratch();
    let (scratch, found) = tokio::task::spawn_blocking(move || {
        let r =
            guard
                .collection()
                .search(&body.vector, body.limit, ef, filter.as_ref(), &mut scratch);
        (scratch, r)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("vector store task: {e}")))?;
    open.give_back(scratch);
    let (hits, plan) = found.map_err(|e| ApiError::field("vector", e.to_string()))?;
    let result: Vec<Value> = hits
        .into_iter()
        .map(|h| {
            let mut v = json!({"id": h.id, "score": h.score});
            if body.with_payload {
                v["payload"] = Value::Object(h.payload);
            }
            v
        })
        .collect();
    Ok(Json(json!({"result": result, "plan": plan})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScrollBody {
    #[serde(default = "ten")]
    limit: usize,
    /// Continue after this id (the previous page's `next_offset`).
    #[serde(default)]
    offset: Option<PointId>,
    #[serde(default)]
    filter: Option<Filter>,
}

async fn scroll(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    JsonBody(body): JsonBody<ScrollBody>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Read)?;
    if !(1..=MAX_POINTS_PER_WRITE).contains(&body.limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {MAX_POINTS_PER_WRITE}"),
        ));
    }
    let filter = checked_filter(body.filter)?;
    let o = owned(&state, &tenant, &name).await?;
    let open = points_of(&state, &o).await?;
    let guard = open.data.clone().read_owned().await;
    let (points, next) = tokio::task::spawn_blocking(move || {
        guard
            .collection()
            .scroll(body.offset.as_ref(), body.limit, filter.as_ref())
    })
    .await
    .map_err(|e| ApiError::Internal(format!("vector store task: {e}")))?;
    Ok(Json(json!({"points": points, "next_offset": next})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountBody {
    #[serde(default)]
    filter: Option<Filter>,
}

async fn count(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    JsonBody(body): JsonBody<CountBody>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Read)?;
    let filter = checked_filter(body.filter)?;
    let o = owned(&state, &tenant, &name).await?;
    let open = points_of(&state, &o).await?;
    let guard = open.data.clone().read_owned().await;
    let n = tokio::task::spawn_blocking(move || guard.collection().count(filter.as_ref()))
        .await
        .map_err(|e| ApiError::Internal(format!("vector store task: {e}")))?;
    Ok(Json(json!({"count": n})))
}

/// A point id as a path gives it: digits are a number, anything else a
/// string id.
fn path_id(s: &str) -> PointId {
    s.parse::<u64>()
        .map(PointId::Num)
        .unwrap_or_else(|_| PointId::Str(s.to_string()))
}

async fn get_point(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((name, point)): UrlPath<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Read)?;
    let o = owned(&state, &tenant, &name).await?;
    let open = points_of(&state, &o).await?;
    let guard = open.data.read().await;
    let found = guard.collection().get(&path_id(&point));
    drop(guard);
    found
        .map(|p| Json(json!(p)))
        .ok_or_else(|| ApiError::not_found("point", &point))
}

/// Drops collections idle for `idle` from memory, every minute.
pub async fn page_out_idle(vectors: std::sync::Arc<VectorStore>, idle: std::time::Duration) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        let v = vectors.clone();
        let dropped = tokio::task::spawn_blocking(move || v.page_out(idle))
            .await
            .unwrap_or(0);
        if dropped > 0 {
            tracing::info!(dropped, "vector collections paged out of memory");
        }
    }
}
