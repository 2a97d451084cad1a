//! The routes a gateway runs batches by. A gateway claims the oldest batch
//! nobody holds (or whose holder stopped renewing its lease), reads its
//! input, reports progress (which renews the lease and tells it of a
//! cancel), hands in the results files and reports it done. Only the
//! holder may do any of that; another gateway's writes are refused, and a
//! batch past its window expires here, whoever held it.

use atrium_api::{Batch, Deployment, File, Placement, Resource};
use atrium_core::batch::{
    BatchProgress, BatchState, BatchStatus, FilePurpose, LEASE_SECONDS, MAX_RESULTS_BYTES,
};
use atrium_core::plane::Plane;
use atrium_store::{Object, TenantFilter, Write};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::files::store_file;
use super::jobs::now;
use super::openai::{created_at, past_window};
use crate::auth::Caller;
use crate::crud::{audit, write};
use crate::error::ApiError;
use crate::extract::{JsonBody, Params};
use crate::{stored, AppState, RequestId};

/// The calling gateway's name, for a gateway credential.
pub fn gateway_name(caller: &Caller) -> Option<&str> {
    caller
        .plane
        .as_ref()
        .filter(|p| p.plane == Plane::Gateway)
        .map(|p| p.name.as_str())
}

/// Whether a gateway of `site` can serve `batch`: the deployment it names
/// may run there (its `sites`), and has a replica there unless it has
/// none anywhere (then the first request starts one). A deployment that
/// is gone is every gateway's to answer (each line a 404).
fn serves_here(batch: &Object, deployments: &[Object], placements: &[Object], site: &str) -> bool {
    let Ok(spec) = stored::spec::<Batch>(batch) else {
        return false;
    };
    let Some(deployment) = deployments
        .iter()
        .find(|d| d.tenant == batch.tenant && d.name == spec.model)
    else {
        return true;
    };
    let allowed = stored::spec::<Deployment>(deployment)
        .is_ok_and(|d| d.sites.is_empty() || d.sites.iter().any(|s| s == site));
    let sites: Vec<String> = placements
        .iter()
        .filter_map(|p| stored::spec::<Placement>(p).ok())
        .filter(|p| p.deployment == deployment.id)
        .map(|p| p.site)
        .collect();
    allowed && (sites.is_empty() || sites.iter().any(|s| s.is_empty() || s == site))
}

fn gateway_only(caller: &Caller) -> Result<&str, ApiError> {
    gateway_name(caller).ok_or_else(|| {
        ApiError::Forbidden(format!(
            "only gateways run batches; role {} may not",
            caller.role.as_str()
        ))
    })
}

/// The input file of a batch `gateway` holds, or 404.
pub async fn held_input(state: &AppState, gateway: &str, file: &str) -> Result<Object, ApiError> {
    let batches = state
        .store
        .list_all(Batch::KIND, &TenantFilter::All)
        .await?;
    let holds = batches.iter().any(|b| {
        held_by(b, gateway).is_some()
            && stored::spec::<Batch>(b).is_ok_and(|s| s.input_file_id == file)
    });
    match state.store.get(File::KIND, file).await? {
        Some(o) if holds => Ok(o),
        _ => Err(ApiError::not_found(File::KIND, file)),
    }
}

/// The status of `batch` when `gateway` holds it (and it is not finished).
fn held_by(batch: &Object, gateway: &str) -> Option<BatchStatus> {
    stored::status::<Batch>(batch)
        .filter(|s| !s.state.is_final() && s.runner.as_deref() == Some(gateway))
}

/// The batch `id` as its holder `gateway` sees it, or 409.
async fn holder_view(
    state: &AppState,
    gateway: &str,
    id: &str,
) -> Result<(Object, BatchStatus), ApiError> {
    let object = state
        .store
        .get(Batch::KIND, id)
        .await?
        .ok_or_else(|| ApiError::not_found(Batch::KIND, id))?;
    let status = held_by(&object, gateway).ok_or_else(|| ApiError::Conflict {
        code: "batch_not_held",
        message: format!("gateway {gateway:?} does not hold batch {id} (finished, or taken over)"),
        details: json!({"batch": id}),
    })?;
    Ok((object, status))
}

/// Writes `status` over `object` if nothing wrote it since it was read.
async fn put_status(
    state: &AppState,
    caller: &Caller,
    rid: &RequestId,
    object: &Object,
    status: &BatchStatus,
    action: &str,
) -> Result<Object, ApiError> {
    write(
        state,
        Write::Update {
            kind: Batch::KIND.into(),
            id: object.id.clone(),
            body: stored::with_status::<Batch>(&object.body, status)?,
            if_revision: Some(object.revision),
        },
        None,
        audit(caller, rid, format!("batch.{action}")),
    )
    .await
}

fn lost_race(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Conflict {
            code: "revision_mismatch",
            ..
        }
    )
}

/// `POST /v1/batches/claim`: the oldest runnable batch, now held by the
/// calling gateway (`200` with the batch), or `204` when there is none.
pub async fn claim(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
) -> Result<Response, ApiError> {
    let gateway = gateway_only(&caller)?.to_string();
    let site = caller.gateway_site().unwrap_or_default().to_string();
    let now = now();
    let mut batches = state
        .store
        .list_all(Batch::KIND, &TenantFilter::All)
        .await?;
    let deployments = state
        .store
        .list_all(Deployment::KIND, &TenantFilter::All)
        .await?;
    let placements = state
        .store
        .list_all(Placement::KIND, &TenantFilter::All)
        .await?;
    // Ids begin with their creation time: oldest first.
    batches.sort_by(|a, b| a.id.cmp(&b.id));
    for object in batches {
        let Some(mut status) = stored::status::<Batch>(&object) else {
            continue;
        };
        if status.state.is_final() {
            continue;
        }
        if past_window(created_at(&object), now, status.state) {
            status.state = BatchState::Expired;
            status.expired_at = Some(now);
            status.runner = None;
            status.lease_until = None;
            match put_status(&state, &caller, &rid, &object, &status, "expire").await {
                Ok(_) => {}
                Err(e) if lost_race(&e) => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        let free = status.state == BatchState::Validating
            || status.lease_until.is_none_or(|until| until < now);
        if !free || !serves_here(&object, &deployments, &placements, &site) {
            continue;
        }
        if status.state == BatchState::Validating {
            status.state = BatchState::InProgress;
        }
        status.in_progress_at.get_or_insert(now);
        // A batch taken over runs again from its first line: its holder's
        // answers died with it.
        status.request_counts.completed = 0;
        status.request_counts.failed = 0;
        status.runner = Some(gateway.clone());
        status.lease_until = Some(now.saturating_add(LEASE_SECONDS));
        match put_status(&state, &caller, &rid, &object, &status, "claim").await {
            Ok(held) => return Ok(Json(stored::view(&held)).into_response()),
            Err(e) if lost_race(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /v1/batches/{id}/progress`: the holder's counts; renews its lease,
/// or, with `done`, finishes the batch. The answer is the batch, so the
/// holder sees a cancel.
pub async fn progress(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(id): UrlPath<String>,
    JsonBody(report): JsonBody<BatchProgress>,
) -> Result<Json<Value>, ApiError> {
    let gateway = gateway_only(&caller)?.to_string();
    let counts = report.request_counts;
    // A cancel may land between the read and the write: read again.
    for _ in 0..3 {
        let (object, mut status) = holder_view(&state, &gateway, &id).await?;
        let answered = counts.completed.checked_add(counts.failed);
        if counts.total != status.request_counts.total || answered.is_none_or(|n| n > counts.total)
        {
            return Err(ApiError::field(
                "request_counts",
                format!(
                    "completed + failed must not pass total, and total is {}",
                    status.request_counts.total
                ),
            ));
        }
        let now = now();
        status.request_counts = counts;
        if report.done {
            status.runner = None;
            status.lease_until = None;
            if status.state == BatchState::Cancelling {
                status.state = BatchState::Cancelled;
                status.cancelled_at = Some(now);
            } else if past_window(created_at(&object), now, status.state) {
                status.state = BatchState::Expired;
                status.expired_at = Some(now);
            } else {
                status.state = BatchState::Completed;
                status.finalizing_at.get_or_insert(now);
                status.completed_at = Some(now);
            }
        } else {
            status.lease_until = Some(now.saturating_add(LEASE_SECONDS));
        }
        let action = if report.done { "finish" } else { "progress" };
        match put_status(&state, &caller, &rid, &object, &status, action).await {
            Ok(updated) => return Ok(Json(stored::view(&updated))),
            Err(e) if lost_race(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Unavailable(format!(
        "batch {id} is changing; report again"
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsParams {
    /// `output` (answers) or `error` (requests that failed).
    kind: String,
}

/// `POST /v1/batches/{id}/results?kind=output|error`: the holder hands in
/// a results file (JSONL); it becomes the tenant's file, replacing one
/// handed in before.
pub async fn results(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(id): UrlPath<String>,
    Params(params): Params<ResultsParams>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let gateway = gateway_only(&caller)?.to_string();
    let output = match params.kind.as_str() {
        "output" => true,
        "error" => false,
        other => {
            return Err(ApiError::InvalidQuery {
                name: "kind".into(),
                message: format!("{other:?}: `output` or `error`"),
            })
        }
    };
    let (object, _) = holder_view(&state, &gateway, &id).await?;
    let tenant = object
        .tenant
        .clone()
        .ok_or_else(|| ApiError::Internal(format!("batch {id} has no tenant")))?;
    let mut bytes = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::field("body", format!("unreadable: {e}")))?;
        if (bytes.len() + chunk.len()) as u64 > MAX_RESULTS_BYTES {
            return Err(ApiError::PayloadTooLarge {
                limit: usize::try_from(MAX_RESULTS_BYTES).unwrap_or(usize::MAX),
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    let name = format!("{id}_{}.jsonl", params.kind);
    let file = store_file(
        &state,
        &tenant,
        (name, FilePurpose::BatchOutput),
        bytes,
        false,
        audit(&caller, &rid, "file.create".into()),
    )
    .await?;
    for _ in 0..3 {
        let (object, mut status) = holder_view(&state, &gateway, &id).await?;
        let slot = if output {
            &mut status.output_file_id
        } else {
            &mut status.error_file_id
        };
        let replaced = slot.replace(file.id.clone());
        match put_status(&state, &caller, &rid, &object, &status, "results").await {
            Ok(updated) => {
                if let Some(old) = replaced {
                    remove_file(&state, &caller, &rid, &old).await;
                }
                return Ok(Json(stored::view(&updated)));
            }
            Err(e) if lost_race(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::Unavailable(format!(
        "batch {id} is changing; hand the results in again"
    )))
}

/// Removes a results file a later one replaced.
async fn remove_file(state: &AppState, caller: &Caller, rid: &RequestId, id: &str) {
    let deleted = write(
        state,
        Write::Delete {
            kind: File::KIND.into(),
            id: id.to_string(),
        },
        None,
        audit(caller, rid, "file.delete".into()),
    )
    .await;
    match deleted {
        Ok(_) | Err(ApiError::NotFound { .. }) => state.files.remove(id),
        Err(e) => tracing::warn!(file = id, error = %e, "replaced results file not removed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(kind: &str, id: &str, name: &str, body: Value) -> Object {
        Object {
            kind: kind.into(),
            id: id.into(),
            tenant: Some("t1".into()),
            name: name.into(),
            body,
            revision: 1,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    fn batch() -> Object {
        object(
            "batch",
            "batch_1",
            "batch_1",
            json!({"spec": {"input_file_id": "file-1",
            "endpoint": "/v1/chat/completions", "completion_window": "24h", "key": "k", "model": "chat"}}),
        )
    }

    fn deployment(sites: &[&str]) -> Object {
        object(
            "deployment",
            "dep_1",
            "chat",
            json!({"spec": {"model": "m", "engine": "simulated",
            "replicas": {"min": 0, "max": 1}, "resources": {"cpu": "1", "memory": "1Gi"}, "sites": sites}}),
        )
    }

    fn placement(site: &str) -> Object {
        object(
            "placement",
            "rep_1",
            "chat-0",
            json!({"spec": {"deployment": "dep_1", "deployment_name": "chat",
            "replica": 0, "node": "n", "site": site, "engine": "simulated", "model": "m", "model_source": "pypi:x",
            "model_task": "chat", "resources": {"cpu": "1", "memory": "1Gi"}}}),
        )
    }

    #[test]
    fn a_gateway_claims_only_batches_its_site_can_serve() {
        let b = batch();
        // Its replica is in eu-1: eu-1's gateways, not us-1's.
        let (d, p) = ([deployment(&[])], [placement("eu-1")]);
        assert!(serves_here(&b, &d, &p, "eu-1"));
        assert!(!serves_here(&b, &d, &p, "us-1"));
        // No replica anywhere: any site the deployment may run in.
        assert!(serves_here(&b, &d, &[], "us-1"));
        let only_eu = [deployment(&["eu-1"])];
        assert!(!serves_here(&b, &only_eu, &[], "us-1"));
        assert!(serves_here(&b, &only_eu, &[], "eu-1"));
        // The deployment is gone: anyone answers its lines with 404.
        assert!(serves_here(&b, &[], &[], "us-1"));
    }
}
