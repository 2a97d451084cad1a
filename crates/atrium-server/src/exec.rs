//! Execs: `POST /v1/workloads/{ident}/exec` resolves one running replica
//! of the caller's workload and records the command for that replica's
//! node; the node's agent runs it in the container and writes the result
//! to the exec's status (`PUT /v1/execs/{ident}/status`, nodes only). A
//! tenant reads (`GET /v1/execs/{ident}`) and deletes its own execs; no
//! one else sees them.
//!
//! The control plane never reaches a node: the command travels the way
//! placements do, through the node's watch.

use atrium_core::exec::{ExecRequest, ExecSpec, ExecStatus};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::quota::Counted;
use atrium_core::FieldErrors;
use atrium_store::{TenantFilter, Write};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::Value;

use crate::auth::Caller;
use crate::crud::{audit, new_id, require, resolve, view, write, ObjectParams};
use crate::error::ApiError;
use crate::extract::{JsonBody, Params};
use crate::kinds::{one_more, Access, Exec, Kind, Placement, Resource, Workload};
use crate::stored;
use crate::{AppState, RequestId};

impl Kind for Exec {
    /// Created through its workload's `exec` route only; deleted by its
    /// tenant.
    const TENANT_WRITABLE: bool = true;
    const TENANT_READABLE: bool = true;

    fn validate(spec: &ExecSpec) -> Result<(), FieldErrors> {
        spec.validate()
    }
}

/// `POST /v1/workloads/{ident}/exec`: runs `command` in one running
/// replica of the workload; answers the exec (pending) at once.
pub async fn run(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    Path(ident): Path<String>,
    Params(params): Params<ObjectParams>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require::<Exec>(&caller, Access::Write)?;
    req.validate().map_err(ApiError::InvalidFields)?;
    let workload = resolve::<Workload>(&state, &caller, &ident, params.tenant.as_deref()).await?;
    let tenant = workload.tenant.clone().unwrap_or_default();
    let (placement, node) = running_replica(&state, &tenant, &workload, req.replica).await?;
    let spec = ExecSpec {
        workload: workload.id.clone(),
        placement,
        node,
        command: req.command,
        timeout_seconds: req.timeout_seconds,
        log: false,
    };
    let id = new_id(Exec::ID_PREFIX);
    let body = stored::body::<Exec>(&spec, Some(&ExecStatus::pending()))?;
    let created = write(
        &state,
        Write::Create {
            kind: Exec::KIND.into(),
            name: id.clone(),
            id,
            tenant: Some(tenant.clone()),
            body,
        },
        Some(one_more(Exec::KIND, &tenant, Counted::Execs)),
        audit(&caller, &rid, "exec.create".into()),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(view(&created))))
}

/// Most a log read waits for the node to answer.
const LOG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What to ask of one replica's node.
pub(crate) struct Ask<'a> {
    pub tenant: &'a str,
    pub workload: &'a atrium_store::Object,
    pub placement: &'a str,
    pub node: &'a str,
    /// Empty for a log read.
    pub command: Vec<String>,
    pub timeout_seconds: u32,
}

async fn tenant_placements(
    state: &AppState,
    tenant: &str,
) -> Result<Vec<atrium_store::Object>, ApiError> {
    let only = TenantFilter::Exactly(Some(tenant.to_string()));
    Ok(state.store.list_all(Placement::KIND, &only).await?)
}

/// The running replica of `workload` an exec goes to: `replica` if
/// given, else the lowest-numbered one running. Answers the placement's
/// id and node.
pub(crate) async fn running_replica(
    state: &AppState,
    tenant: &str,
    workload: &atrium_store::Object,
    replica: Option<u32>,
) -> Result<(String, String), ApiError> {
    let placements = tenant_placements(state, tenant).await?;
    let running = |p: &&atrium_store::Object| {
        stored::status::<Placement>(p).is_some_and(|s| s.state == LifecycleState::Running)
    };
    let mut replicas: Vec<(u32, String, String)> = placements
        .iter()
        .filter(running)
        .filter_map(|p| {
            let spec = stored::spec::<Placement>(p).ok()?;
            (spec.deployment == workload.id && spec.container.is_some())
                .then(|| (spec.replica, p.id.clone(), spec.node))
        })
        .filter(|(r, _, _)| replica.is_none_or(|want| want == *r))
        .collect();
    replicas.sort_by_key(|(r, _, _)| *r);
    let Some((_, placement, node)) = replicas.into_iter().next() else {
        let which = replica.map_or_else(
            || "no replica".to_string(),
            |r| format!("replica {r} is not"),
        );
        return Err(ApiError::Conflict {
            code: "not_running",
            message: format!(
                "{which} of workload {:?} is running: an exec runs in a running container",
                workload.name
            ),
            details: Value::Null,
        });
    };
    Ok((placement, node))
}

/// Runs `ask` on its node and waits for the answer (the command's
/// timeout, plus the log wait for the node to pick it up); the exec is
/// deleted after, answered or not.
pub(crate) async fn on_node(
    state: &AppState,
    ask: Ask<'_>,
    audit: atrium_store::AuditContext,
) -> Result<ExecStatus, ApiError> {
    let log = ask.command.is_empty();
    let spec = ExecSpec {
        workload: ask.workload.id.clone(),
        placement: ask.placement.to_string(),
        node: ask.node.to_string(),
        command: ask.command,
        timeout_seconds: ask.timeout_seconds,
        log,
    };
    // Whoever asked checked it; checked again where it becomes a node's work.
    spec.validate().map_err(ApiError::InvalidFields)?;
    let id = new_id(Exec::ID_PREFIX);
    let body = stored::body::<Exec>(&spec, Some(&ExecStatus::pending()))?;
    write(
        state,
        Write::Create {
            kind: Exec::KIND.into(),
            name: id.clone(),
            id: id.clone(),
            tenant: Some(ask.tenant.to_string()),
            body,
        },
        Some(one_more(Exec::KIND, ask.tenant, Counted::Execs)),
        audit,
    )
    .await?;
    // A command may run its whole timeout once the node has picked it up.
    let runs = if log { 0 } else { spec.timeout_seconds };
    let wait = LOG_WAIT + std::time::Duration::from_secs(u64::from(runs));
    let started = std::time::Instant::now();
    let answer = loop {
        let done = state
            .store
            .get(Exec::KIND, &id)
            .await?
            .and_then(|o| stored::status::<Exec>(&o))
            .filter(ExecStatus::done);
        if let Some(status) = done {
            break Ok(status);
        }
        if started.elapsed() > wait {
            break Err(ApiError::Unavailable(format!(
                "the node {} did not answer within {}s",
                spec.node,
                wait.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let gone = Write::Delete {
        kind: Exec::KIND.into(),
        id,
    };
    let _ = state
        .store
        .write::<()>(gone, None, crate::kube::system_audit("exec.delete"))
        .await;
    answer
}

/// The log of workload `workload`'s newest replica, read on its node
/// through an exec (the control plane never reaches a node directly).
pub(crate) async fn node_log(
    state: &AppState,
    tenant: &str,
    workload: &atrium_store::Object,
    audit: atrium_store::AuditContext,
) -> Result<String, ApiError> {
    let placements = tenant_placements(state, tenant).await?;
    let newest = placements
        .iter()
        .filter_map(|p| Some((p, stored::spec::<Placement>(p).ok()?)))
        .filter(|(_, spec)| spec.deployment == workload.id)
        .max_by(|a, b| a.0.id.cmp(&b.0.id));
    let Some((placement, spec)) = newest else {
        return Err(ApiError::Conflict {
            code: "not_running",
            message: format!("no replica of {:?} has been placed yet", workload.name),
            details: Value::Null,
        });
    };
    let ask = Ask {
        tenant,
        workload,
        placement: &placement.id,
        node: &spec.node,
        command: Vec::new(),
        timeout_seconds: LOG_WAIT.as_secs() as u32,
    };
    let status = on_node(state, ask, audit).await?;
    match status.state {
        LifecycleState::Succeeded => Ok(status.stdout),
        _ => Err(ApiError::Conflict {
            code: "no_log",
            message: status.reason,
            details: Value::Null,
        }),
    }
}
