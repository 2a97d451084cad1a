//! `/v1/batches` as a tenant calls it: create over an uploaded file (its
//! every line checked at once; a bad file makes a `failed` batch that says
//! which lines, as OpenAI's does), read, list and cancel.

use std::collections::BTreeMap;

use atrium_api::{Batch, File, Resource};
use atrium_core::batch::{
    check_input, check_metadata, BatchEndpoint, BatchSpec, BatchState, BatchStatus, FilePurpose,
    COMPLETION_WINDOW,
};
use atrium_core::quota::Counted;
use atrium_store::{Precondition, Write};
use axum::extract::{Path as UrlPath, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::openai::{self, ListParams};
use super::{tenant_caller, Access};
use crate::auth::Caller;
use crate::crud::{audit, new_id, write};
use crate::error::ApiError;
use crate::extract::{JsonBody, Params};
use crate::kinds::{quota_read, tenant_reads};
use crate::{stored, AppState, RequestId};

/// `POST /v1/batches`'s body, as OpenAI's SDK sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// Unix seconds now.
pub(super) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `POST /v1/batches`.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    JsonBody(req): JsonBody<CreateBatch>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller(&caller, Access::Write)?;
    let endpoint = BatchEndpoint::parse(&req.endpoint).ok_or_else(|| {
        ApiError::field(
            "endpoint",
            format!(
                "{:?} is not served; one of {}",
                req.endpoint,
                BatchEndpoint::ALL.map(BatchEndpoint::path).join(", ")
            ),
        )
    })?;
    if req.completion_window != COMPLETION_WINDOW {
        return Err(ApiError::field(
            "completion_window",
            format!("must be {COMPLETION_WINDOW:?}"),
        ));
    }
    let metadata = req.metadata.unwrap_or_default();
    check_metadata(&metadata).map_err(ApiError::InvalidFields)?;
    let input = super::owned::<File>(&state, &tenant, &req.input_file_id).await?;
    if stored::spec::<File>(&input)?.purpose != FilePurpose::Batch {
        return Err(ApiError::field(
            "input_file_id",
            "must be a file uploaded with purpose \"batch\"",
        ));
    }
    let files = state.files.clone();
    let bytes = tokio::task::spawn_blocking(move || files.read(&input))
        .await
        .map_err(|e| ApiError::Internal(format!("file read: {e}")))??;
    let checked = tokio::task::spawn_blocking(move || check_input(&bytes, endpoint))
        .await
        .map_err(|e| ApiError::Internal(format!("batch check: {e}")))?;
    let spec = BatchSpec {
        input_file_id: req.input_file_id,
        endpoint,
        completion_window: req.completion_window,
        metadata,
        key: caller.actor.clone(),
        model: checked
            .as_ref()
            .map(|c| c.model.clone())
            .unwrap_or_default(),
    };
    let status = BatchStatus::new(&checked, now());
    let id = new_id(Batch::ID_PREFIX);
    let created = write(
        &state,
        Write::Create {
            kind: Batch::KIND.into(),
            id: id.clone(),
            tenant: Some(tenant.clone()),
            name: id,
            body: stored::body::<Batch>(&spec, Some(&status))?,
        },
        Some(one_more_unfinished(&tenant)),
        audit(&caller, &rid, "batch.create".into()),
    )
    .await?;
    Ok(Json(openai::batch(&created)?))
}

/// The rule that the tenant has fewer unfinished batches than its quota's
/// `batches`, checked atomically with the create.
fn one_more_unfinished(tenant: &str) -> Precondition<ApiError> {
    let owner = tenant.to_string();
    Precondition {
        reads: tenant_reads(tenant, &[Batch::KIND]),
        counts: Vec::new(),
        check: Box::new(move |read: &[Vec<atrium_store::Object>], _: &[u64]| {
            let unfinished = read.first().map_or(0, |batches| {
                batches
                    .iter()
                    .filter(|b| stored::status::<Batch>(b).is_some_and(|s| !s.state.is_final()))
                    .count()
            });
            quota_read(read, &owner)?
                .admit_one(Counted::Batches, unfinished as u64)
                .map_err(ApiError::QuotaExceeded)
        }),
    }
}

/// `GET /v1/batches`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Params(params): Params<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller(&caller, Access::Read)?;
    if params.purpose.is_some() {
        return Err(ApiError::InvalidQuery {
            name: "purpose".into(),
            message: "batches have no purpose; it filters files".into(),
        });
    }
    let objects = super::all_of::<Batch>(&state, &tenant).await?;
    let data = objects
        .iter()
        .map(openai::batch)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(openai::page(data, &params)))
}

/// `POST /v1/batches/{id}/cancel`: a batch nobody runs yet is cancelled at
/// once; a running one is `cancelling` until its gateway stops and hands
/// in what it has.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller(&caller, Access::Write)?;
    let object = super::owned::<Batch>(&state, &tenant, &id).await?;
    let mut status = stored::status::<Batch>(&object)
        .ok_or_else(|| ApiError::Internal(format!("batch {id} has no status")))?;
    let now = now();
    match status.state {
        BatchState::Validating => {
            status.state = BatchState::Cancelled;
            status.cancelling_at = Some(now);
            status.cancelled_at = Some(now);
        }
        BatchState::InProgress | BatchState::Finalizing => {
            status.state = BatchState::Cancelling;
            status.cancelling_at = Some(now);
        }
        BatchState::Cancelling => return Ok(Json(openai::batch(&object)?)),
        done => {
            return Err(ApiError::Conflict {
                code: "batch_finished",
                message: format!("batch {id} is already {}", done.as_str()),
                details: json!({"status": done.as_str()}),
            })
        }
    }
    let updated = write(
        &state,
        Write::Update {
            kind: Batch::KIND.into(),
            id: object.id.clone(),
            body: stored::with_status::<Batch>(&object.body, &status)?,
            if_revision: Some(object.revision),
        },
        None,
        audit(&caller, &rid, "batch.cancel".into()),
    )
    .await?;
    Ok(Json(openai::batch(&updated)?))
}
