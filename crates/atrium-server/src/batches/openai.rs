//! Files and batches in the shapes OpenAI's clients read: times in Unix
//! seconds, `object` tags, cursor pages (`after`, `limit`, newest first).

use atrium_api::{Batch, File};
use atrium_core::batch::{BatchState, COMPLETION_WINDOW_SECONDS};
use atrium_store::Object;
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::stored;

/// Most items one page lists, and the default.
const MAX_LIMIT: usize = 100;
const DEFAULT_LIMIT: usize = 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub after: Option<String>,
    pub limit: Option<usize>,
    /// `desc` (newest first, the default) or `asc`.
    pub order: Option<String>,
    /// Files only.
    pub purpose: Option<String>,
}

/// When `object` was created, in Unix seconds.
pub fn created_at(object: &Object) -> i64 {
    OffsetDateTime::parse(&object.created_at, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp)
        .unwrap_or(0)
}

/// A kind the Batch API serves, and its shape for OpenAI's clients.
pub trait Shaped: atrium_api::Resource {
    fn shape(object: &Object) -> Result<Value, ApiError>;
}

impl Shaped for File {
    fn shape(object: &Object) -> Result<Value, ApiError> {
        file(object)
    }
}

impl Shaped for Batch {
    fn shape(object: &Object) -> Result<Value, ApiError> {
        batch(object)
    }
}

pub fn file(object: &Object) -> Result<Value, ApiError> {
    let spec = stored::spec::<File>(object)?;
    Ok(json!({
        "id": object.id,
        "object": "file",
        "bytes": spec.bytes,
        "created_at": created_at(object),
        "filename": spec.filename,
        "purpose": spec.purpose.as_str(),
        "status": "processed",
    }))
}

pub fn batch(object: &Object) -> Result<Value, ApiError> {
    let spec = stored::spec::<Batch>(object)?;
    let status = stored::status::<Batch>(object)
        .ok_or_else(|| ApiError::Internal(format!("batch {} has no status", object.id)))?;
    let created = created_at(object);
    let errors = (!status.errors.is_empty()).then(|| {
        json!({
            "object": "list",
            "data": status.errors.iter().map(|e| json!({
                "code": e.code, "message": e.message, "line": e.line, "param": null,
            })).collect::<Vec<_>>(),
        })
    });
    Ok(json!({
        "id": object.id,
        "object": "batch",
        "endpoint": spec.endpoint.path(),
        "model": spec.model,
        "errors": errors,
        "input_file_id": spec.input_file_id,
        "completion_window": spec.completion_window,
        "status": status.state.as_str(),
        "output_file_id": status.output_file_id,
        "error_file_id": status.error_file_id,
        "created_at": created,
        "in_progress_at": status.in_progress_at,
        "expires_at": created.saturating_add(COMPLETION_WINDOW_SECONDS),
        "finalizing_at": status.finalizing_at,
        "completed_at": status.completed_at,
        "failed_at": status.failed_at,
        "expired_at": status.expired_at,
        "cancelling_at": status.cancelling_at,
        "cancelled_at": status.cancelled_at,
        "request_counts": status.request_counts,
        "metadata": spec.metadata,
    }))
}

/// Whether a batch in `state` created at `created` has outlived its window.
pub fn past_window(created: i64, now: i64, state: BatchState) -> bool {
    !state.is_final() && now >= created.saturating_add(COMPLETION_WINDOW_SECONDS)
}

/// One page of `items` (each with `id` and `created_at`) by `params`.
pub fn page(mut items: Vec<Value>, params: &ListParams) -> Value {
    let key = |v: &Value| {
        (
            v["created_at"].as_i64().unwrap_or(0),
            v["id"].as_str().unwrap_or("").to_string(),
        )
    };
    items.sort_by_key(key);
    if params.order.as_deref() != Some("asc") {
        items.reverse();
    }
    if let Some(after) = &params.after {
        if let Some(at) = items.iter().position(|v| v["id"] == after.as_str()) {
            items.drain(..=at);
        }
    }
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let has_more = items.len() > limit;
    items.truncate(limit);
    json!({
        "object": "list",
        "first_id": items.first().map(|v| v["id"].clone()),
        "last_id": items.last().map(|v| v["id"].clone()),
        "has_more": has_more,
        "data": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_run_newest_first_from_after() {
        let items: Vec<Value> = (0..5)
            .map(|i| json!({"id": format!("f{i}"), "created_at": i}))
            .collect();
        let params = ListParams {
            limit: Some(2),
            ..ListParams::default()
        };
        let first = page(items.clone(), &params);
        assert_eq!(first["data"][0]["id"], "f4");
        assert_eq!(first["last_id"], "f3");
        assert_eq!(first["has_more"], true);
        let next = page(
            items,
            &ListParams {
                after: Some("f3".into()),
                limit: Some(10),
                ..ListParams::default()
            },
        );
        let ids: Vec<_> = next["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["id"].clone())
            .collect();
        assert_eq!(ids, [json!("f2"), json!("f1"), json!("f0")]);
        assert_eq!(next["has_more"], false);
    }
}
