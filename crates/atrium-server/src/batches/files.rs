//! `/v1/files`: a tenant's Batch API files. The object (name, purpose,
//! size, digest) is in the store; the bytes are on disk under
//! `<data-dir>/files/<id>`, written before the object and removed after
//! it, so a stored file always has its bytes. Paths are made from the
//! server's own ids only, checked again before use.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use atrium_api::{Batch, File, Resource};
use atrium_core::batch::{check_filename, FilePurpose, FileSpec, MAX_FILE_BYTES};
use atrium_core::quota::Counted;
use atrium_store::{Object, Write};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::openai::{self, ListParams};
use super::{tenant_caller, Access};
use crate::auth::Caller;
use crate::crud::{audit, new_id, write};
use crate::error::ApiError;
use crate::extract::Params;
use crate::kinds::one_more;
use crate::{stored, AppState, RequestId};

/// Where file bytes live.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn open(dir: PathBuf) -> std::io::Result<FileStore> {
        std::fs::create_dir_all(&dir)?;
        Ok(FileStore { dir })
    }

    /// The path of file `id`; only ever a server-made id, which is checked
    /// here too so no caller's text can reach a path.
    fn path(&self, id: &str) -> Result<PathBuf, ApiError> {
        let plain = id.starts_with(File::ID_PREFIX)
            && id.len() <= 64
            && id[File::ID_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric());
        if !plain {
            return Err(ApiError::not_found(File::KIND, id));
        }
        Ok(self.dir.join(id))
    }

    /// Writes the bytes of `id` durably (a temporary file, synced, renamed).
    fn put(&self, id: &str, bytes: &[u8]) -> Result<(), ApiError> {
        let path = self.path(id)?;
        let tmp = path.with_extension("part");
        let io = |e: std::io::Error| ApiError::Internal(format!("writing file {id}: {e}"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// The bytes of `object`, checked against the digest it was stored with.
    pub fn read(&self, object: &Object) -> Result<Vec<u8>, ApiError> {
        let spec = stored::spec::<File>(object)?;
        let bytes = std::fs::read(self.path(&object.id)?)
            .map_err(|e| ApiError::Internal(format!("reading file {}: {e}", object.id)))?;
        if hex::encode(Sha256::digest(&bytes)) != spec.sha256 {
            return Err(ApiError::Internal(format!(
                "file {} does not match its digest",
                object.id
            )));
        }
        Ok(bytes)
    }

    pub(super) fn remove(&self, id: &str) {
        if let Ok(path) = self.path(id) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = id, error = %e, "file bytes not removed");
            }
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Stores `bytes` as a new file of `tenant` and returns its object. With
/// `cap`, the tenant's file count is checked atomically with the write.
pub(super) async fn store_file(
    state: &AppState,
    tenant: &str,
    spec_of: (String, FilePurpose),
    bytes: Vec<u8>,
    capped: bool,
    audit_ctx: atrium_store::AuditContext,
) -> Result<Object, ApiError> {
    let (filename, purpose) = spec_of;
    let id = new_id(File::ID_PREFIX);
    let spec = FileSpec {
        filename,
        purpose,
        bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&bytes)),
    };
    let files = state.files.clone();
    let put_id = id.clone();
    tokio::task::spawn_blocking(move || files.put(&put_id, &bytes))
        .await
        .map_err(|e| ApiError::Internal(format!("file write: {e}")))??;
    let cap = capped.then(|| one_more(File::KIND, tenant, Counted::Files));
    let created = write(
        state,
        Write::Create {
            kind: File::KIND.into(),
            id: id.clone(),
            tenant: Some(tenant.to_string()),
            name: id.clone(),
            body: stored::body::<File>(&spec, None)?,
        },
        cap,
        audit_ctx,
    )
    .await;
    if created.is_err() {
        state.files.remove(&id);
    }
    created
}

/// `POST /v1/files` (multipart: `purpose`, `file`).
pub async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller(&caller, Access::Write)?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::field(
            "body",
            "send multipart/form-data with the fields `purpose` and `file`",
        )
    })?;
    let limits = multer::Constraints::new()
        .allowed_fields(vec!["purpose", "file"])
        .size_limit(
            multer::SizeLimit::new()
                .whole_stream(MAX_FILE_BYTES + (64 << 10))
                .per_field(MAX_FILE_BYTES),
        );
    let stream = body.into_data_stream();
    let mut form = multer::Multipart::with_constraints(stream, boundary, limits);
    let mut purpose: Option<String> = None;
    let mut file: Option<(String, Vec<u8>)> = None;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(multipart_error)?),
            _ => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let mut bytes = Vec::new();
                let mut chunks = field;
                while let Some(chunk) = chunks.next().await {
                    bytes.extend_from_slice(&chunk.map_err(multipart_error)?);
                }
                file = Some((name, bytes));
            }
        }
    }
    let purpose = match purpose.as_deref().map(str::trim) {
        Some("batch") => FilePurpose::Batch,
        Some(other) => {
            return Err(ApiError::field(
                "purpose",
                format!("{other:?} is not served: only \"batch\" files are kept here"),
            ))
        }
        None => return Err(ApiError::field("purpose", "required (\"batch\")")),
    };
    let (filename, bytes) = file.ok_or_else(|| ApiError::field("file", "required"))?;
    check_filename(&filename).map_err(|m| ApiError::field("file", format!("its name {m}")))?;
    check_storage(&state, &tenant, bytes.len() as u64).await?;
    let created = store_file(
        &state,
        &tenant,
        (filename, purpose),
        bytes,
        true,
        audit(&caller, &rid, "file.create".into()),
    )
    .await?;
    Ok(Json(openai::file(&created)?))
}

fn multipart_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ApiError::PayloadTooLarge {
                limit: usize::try_from(MAX_FILE_BYTES).unwrap_or(usize::MAX),
            }
        }
        multer::Error::UnknownField { field_name } => ApiError::field(
            "body",
            format!(
                "unknown field {:?}: send `purpose` and `file` only",
                field_name.unwrap_or_default()
            ),
        ),
        other => ApiError::field("body", format!("malformed multipart body: {other}")),
    }
}

/// Refuses a file that would take the tenant past its storage quota, with
/// its volumes, images and other files (checked before the write: two
/// uploads at once may each pass by at most one file).
async fn check_storage(state: &AppState, tenant: &str, adding: u64) -> Result<(), ApiError> {
    let Some(limit) = super::storage_limit(state, tenant).await? else {
        return Ok(());
    };
    let used = super::storage_used(state, tenant).await?;
    let total = used.saturating_add(adding);
    if total > limit {
        return Err(ApiError::QuotaExceeded(atrium_core::quota::QuotaExceeded {
            resource: "storage".into(),
            requested: adding.to_string(),
            used: used.to_string(),
            limit: limit.to_string(),
        }));
    }
    Ok(())
}

/// `GET /v1/files`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Params(params): Params<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller(&caller, Access::Read)?;
    let objects = super::all_of::<File>(&state, &tenant).await?;
    let wanted = params.purpose.clone();
    let mut data = Vec::with_capacity(objects.len());
    for o in &objects {
        let item = openai::file(o)?;
        if wanted.as_deref().is_none_or(|p| item["purpose"] == p) {
            data.push(item);
        }
    }
    Ok(Json(openai::page(data, &params)))
}

/// `GET /v1/files/{id}/content`: the tenant's own file, or the input of a
/// batch the calling gateway holds.
pub async fn content(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let object = match super::runner::gateway_name(&caller) {
        Some(gateway) => super::runner::held_input(&state, gateway, &id).await?,
        None => {
            let tenant = tenant_caller(&caller, Access::Read)?;
            super::owned::<File>(&state, &tenant, &id).await?
        }
    };
    let files = state.files.clone();
    let bytes = tokio::task::spawn_blocking(move || files.read(&object))
        .await
        .map_err(|e| ApiError::Internal(format!("file read: {e}")))??;
    Ok((
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`; refused while a batch not yet finished reads it.
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<RequestId>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_caller(&caller, Access::Write)?;
    let object = super::owned::<File>(&state, &tenant, &id).await?;
    let batches = super::all_of::<Batch>(&state, &tenant).await?;
    let reader = batches.iter().find(|b| {
        stored::spec::<Batch>(b).is_ok_and(|s| s.input_file_id == id)
            && stored::status::<Batch>(b).is_some_and(|s| !s.state.is_final())
    });
    if let Some(b) = reader {
        return Err(ApiError::Conflict {
            code: "file_in_use",
            message: format!(
                "batch {} reads this file and has not finished; cancel it or wait",
                b.id
            ),
            details: json!({"batch": b.id}),
        });
    }
    super::delete_found::<File>(&state, &object, audit(&caller, &rid, "file.delete".into()))
        .await?;
    state.files.remove(&object.id);
    Ok(Json(
        json!({"id": object.id, "object": "file", "deleted": true}),
    ))
}
