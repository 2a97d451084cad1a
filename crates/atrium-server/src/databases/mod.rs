//! `/v1/databases`: a tenant's PostgreSQL databases on the provider's
//! PostgreSQL (`provider`). The database is a typed object (`Database`,
//! quota `databases`); the credentials are shown once, when it is made and
//! at each rotation, and kept nowhere here. Another tenant's database
//! answers exactly as a missing one does (404), by id or by name.
//!
//! Offered only when the server is started with `--databases-url`; without
//! it every route answers 503 saying so.

mod provider;
mod secret;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use atrium_api::{Database, Resource};
use atrium_core::database::{
    DatabasePhase, DatabaseSpec, DatabaseStatus, WORKLOAD_HOST, WORKLOAD_PORT,
};
use atrium_core::quota::Counted;
use atrium_store::{AuditContext, Object, TenantFilter, Write};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::batches::{all_of, delete_found, named_or_owned, tenant_caller_for, Access};
use crate::crud::{audit, new_id, write};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::volumes::disk_admitted;
use crate::{stored, AppState, RequestId};

pub use provider::{DatabasesConfig, Provider};

const API: &str = "the database API";

/// How often the watchdog looks for statements past their timeout.
const WATCHDOG_EVERY: Duration = Duration::from_millis(500);

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/v1/databases", get(list).post(create))
        .route("/v1/databases/{name}", get(one).delete(remove))
        .route("/v1/databases/{name}/rotate", post(rotate))
}

fn provider(state: &AppState) -> Result<Arc<Provider>, ApiError> {
    state.databases.clone().ok_or_else(|| {
        ApiError::Unavailable(
            "this cloud offers no databases: the provider starts the server with \
             --databases-url (a PostgreSQL superuser's URL) to offer them"
                .into(),
        )
    })
}

fn unavailable(e: String) -> ApiError {
    ApiError::Unavailable(format!("the provider's PostgreSQL: {e}"))
}

fn shown(o: &Object, p: &Provider) -> Result<Value, ApiError> {
    let spec = stored::spec::<Database>(o)?;
    let status = stored::status::<Database>(o).unwrap_or_default();
    let name = provider::pg_name(&o.id).map_err(ApiError::Internal)?;
    Ok(json!({
        "id": o.id,
        "name": o.name,
        "connection_limit": spec.connection_limit,
        "statement_timeout_ms": spec.statement_timeout_ms,
        "size": spec.size.to_string(),
        "phase": status.phase,
        "host": p.host,
        "port": p.port,
        "workload_host": WORKLOAD_HOST.to_string(),
        "workload_port": WORKLOAD_PORT,
        "database": name,
        "user": name,
        "created_at": o.created_at,
    }))
}

/// `shown` with the password and URLs holding it (from the provider's
/// network, and from the tenant's workloads): only in the answer to the
/// request that made them.
fn with_credentials(mut v: Value, p: &Provider, c: &provider::Credentials) -> Value {
    v["password"] = json!(c.password);
    let url = |host: &str, port: u16| {
        format!(
            "postgres://{}:{}@{host}:{port}/{}",
            c.user, c.password, c.database
        )
    };
    v["url"] = json!(url(&p.host, p.port));
    v["workload_url"] = json!(url(&WORKLOAD_HOST.to_string(), WORKLOAD_PORT));
    v
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(flatten)]
    spec: DatabaseSpec,
}

/// Writes the database's phase (the same one again records an event in
/// the audit trail, as a rotation does).
async fn set_phase(
    state: &AppState,
    id: &str,
    phase: DatabasePhase,
    audit: AuditContext,
) -> Result<Object, ApiError> {
    let fresh = state
        .store
        .get(Database::KIND, id)
        .await?
        .ok_or_else(|| ApiError::not_found(Database::KIND, id))?;
    write(
        state,
        Write::Update {
            kind: Database::KIND.into(),
            id: id.to_string(),
            body: stored::with_status::<Database>(&fresh.body, &DatabaseStatus { phase })?,
            if_revision: None,
        },
        None,
        audit,
    )
    .await
}

async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Write)?;
    let p = provider(&state)?;
    atrium_core::name::validate_name(&body.name).map_err(|m| ApiError::field("name", m))?;
    body.spec.validate().map_err(ApiError::InvalidFields)?;
    let id = new_id(Database::ID_PREFIX);
    // Recorded first, its quota checked with the write: a crash midway
    // leaves an object the next start completes, never an orphan database.
    // Its disk counts against the tenant's storage, as a volume's does.
    let images = crate::volumes::image_bytes(&state, &tenant).await?;
    write(
        &state,
        Write::Create {
            kind: Database::KIND.into(),
            id: id.clone(),
            tenant: Some(tenant.clone()),
            name: body.name,
            body: stored::body::<Database>(&body.spec, Some(&DatabaseStatus::default()))?,
        },
        Some(disk_admitted(
            &tenant,
            (Database::KIND, Counted::Databases),
            body.spec.size,
            images,
        )),
        audit(&caller, &rid, "database.create".into()),
    )
    .await?;
    let password = secret::new_password();
    if let Err(e) = p.provision(&id, &body.spec, Some(&password)).await {
        tracing::warn!(database = %id, error = %e, "databases: provisioning failed; undoing");
        if let Err(undo) = p.remove(&id).await {
            tracing::error!(database = %id, error = %undo, "databases: undoing left parts behind");
        }
        let deleted = Write::Delete {
            kind: Database::KIND.into(),
            id: id.clone(),
        };
        write(
            &state,
            deleted,
            None,
            audit(&caller, &rid, "database.undo".into()),
        )
        .await?;
        return Err(unavailable(e));
    }
    let ready = set_phase(
        &state,
        &id,
        DatabasePhase::Ready,
        audit(&caller, &rid, "database.ready".into()),
    )
    .await?;
    let name = provider::pg_name(&id).map_err(ApiError::Internal)?;
    let credentials = provider::Credentials {
        user: name.clone(),
        password,
        database: name,
    };
    Ok((
        StatusCode::CREATED,
        Json(with_credentials(shown(&ready, &p)?, &p, &credentials)),
    ))
}

async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller_for(API, &caller, Access::Read)?;
    let p = provider(&state)?;
    let shown: Vec<Value> = all_of::<Database>(&state, &tenant)
        .await?
        .iter()
        .map(|o| shown(o, &p))
        .collect::<Result<_, _>>()?;
    Ok(Json(json!({"databases": shown})))
}

/// The service and the caller's database called (or with id) `name`.
async fn target(
    state: &AppState,
    caller: &Caller,
    name: &str,
    access: Access,
) -> Result<(Arc<Provider>, Object), ApiError> {
    let tenant = tenant_caller_for(API, caller, access)?;
    let p = provider(state)?;
    Ok((p, named_or_owned::<Database>(state, &tenant, name).await?))
}

async fn one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (p, o) = target(&state, &caller, &name, Access::Read).await?;
    Ok(Json(shown(&o, &p)?))
}

/// A new password; sessions opened with the old one end.
async fn rotate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (p, o) = target(&state, &caller, &name, Access::Write).await?;
    let credentials = p.rotate(&o.id).await.map_err(unavailable)?;
    let phase = stored::status::<Database>(&o).unwrap_or_default().phase;
    let rotated = audit(&caller, &rid, "database.rotate".into());
    set_phase(&state, &o.id, phase, rotated).await?;
    Ok(Json(with_credentials(shown(&o, &p)?, &p, &credentials)))
}

/// Drops the database, its role and its disk (zeroed), then the object.
async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (p, o) = target(&state, &caller, &name, Access::Write).await?;
    p.remove(&o.id).await.map_err(unavailable)?;
    delete_found::<Database>(&state, &o, audit(&caller, &rid, "database.delete".into())).await?;
    Ok(Json(json!({"id": o.id, "name": o.name, "deleted": true})))
}

/// At start: mounts every database's disk again and completes any a crash
/// left half-made; then, for as long as the server runs, cancels tenant
/// statements past their database's timeout.
pub async fn run(state: AppState, p: Arc<Provider>) {
    let mut resumed = false;
    let mut shutdown = state.shutdown.clone();
    loop {
        let all = state
            .store
            .list_all(Database::KIND, &TenantFilter::All)
            .await;
        match all {
            Ok(all) => {
                if !resumed {
                    resume(&state, &p, &all).await;
                    resumed = true;
                }
                let timeouts: HashMap<String, u64> = all
                    .iter()
                    .filter_map(|o| {
                        let spec = stored::spec::<Database>(o).ok()?;
                        Some((provider::pg_name(&o.id).ok()?, spec.statement_timeout_ms))
                    })
                    .collect();
                if let Err(e) = p.cancel_overrunning(&timeouts).await {
                    tracing::warn!(error = %e, "databases: watchdog");
                }
            }
            Err(e) => tracing::warn!(error = %e, "databases: listing"),
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCHDOG_EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn resume(state: &AppState, p: &Provider, all: &[Object]) {
    for o in all {
        let Ok(spec) = stored::spec::<Database>(o) else {
            continue;
        };
        if let Err(e) = p.provision(&o.id, &spec, None).await {
            tracing::error!(database = %o.id, error = %e, "databases: cannot bring back");
            continue;
        }
        let ready = stored::status::<Database>(o).is_some_and(|s| s.phase == DatabasePhase::Ready);
        if !ready {
            let resumed = AuditContext::system("databases", "database.ready");
            if let Err(e) = set_phase(state, &o.id, DatabasePhase::Ready, resumed).await {
                tracing::warn!(database = %o.id, error = %e, "databases: marking ready");
            }
        }
    }
}
