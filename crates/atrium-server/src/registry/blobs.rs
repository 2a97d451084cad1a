//! Blobs: reading them, and uploads (monolithic, chunked, mounted from
//! another of the caller's repositories), each streamed to disk against
//! the blob size bound and the tenant's storage quota, then verified.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::error::RegistryError;
use super::names::{Digest, Repo, PUBLIC_NAMESPACE};
use super::{authorize, blocking, digest_header, respond, MAX_BLOB_BYTES};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::kinds::{tenant_resources_used, Resource, Tenant};
use crate::{stored, AppState};

#[derive(Debug, Default, Deserialize)]
pub(super) struct UploadQuery {
    pub(super) digest: Option<String>,
    pub(super) mount: Option<String>,
    pub(super) from: Option<String>,
}

pub(super) async fn get_blob(
    state: &AppState,
    repo: Repo,
    digest: Digest,
    head: bool,
) -> Result<Response, RegistryError> {
    let shown = digest.to_string();
    let found = blocking(state, move |s| s.blob_in(&repo, &digest)).await?;
    let (path, size) = found.ok_or_else(|| RegistryError::blob_unknown(&shown))?;
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, size.to_string()),
        (digest_header(), shown),
    ];
    if head {
        return Ok(respond(StatusCode::OK, &headers, Body::empty()));
    }
    let file = tokio::fs::File::open(&path).await?;
    let chunks = futures::stream::unfold(Some(file), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut buf = vec![0u8; 1 << 16];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(respond(StatusCode::OK, &headers, Body::from_stream(chunks)))
}

pub(super) fn upload_accepted(repo: &Repo, id: &str, size: u64) -> Response {
    respond(
        StatusCode::ACCEPTED,
        &[
            (header::LOCATION, format!("/v2/{repo}/blobs/uploads/{id}")),
            // Inclusive: "0-0" for an empty upload, as clients expect.
            (header::RANGE, format!("0-{}", size.saturating_sub(1))),
            (
                header::HeaderName::from_static("docker-upload-uuid"),
                id.to_string(),
            ),
            (header::CONTENT_LENGTH, "0".into()),
        ],
        Body::empty(),
    )
}

fn blob_created(repo: &Repo, digest: &Digest) -> Response {
    respond(
        StatusCode::CREATED,
        &[
            (header::LOCATION, format!("/v2/{repo}/blobs/{digest}")),
            (digest_header(), digest.to_string()),
            (header::CONTENT_LENGTH, "0".into()),
        ],
        Body::empty(),
    )
}

/// `POST /v2/<name>/blobs/uploads/`: mounts a blob from another of the
/// caller's repositories, takes a whole blob at once (`?digest=`), or
/// opens an upload.
pub(super) async fn start_upload(
    state: &AppState,
    caller: &Caller,
    repo: Repo,
    query: UploadQuery,
    body: Body,
) -> Result<Response, RegistryError> {
    if let (Some(mount), Some(from)) = (&query.mount, &query.from) {
        let digest = Digest::parse(mount).map_err(RegistryError::digest_invalid)?;
        // Only from where the caller may read; otherwise an ordinary upload,
        // as the spec has it, and nothing is said about the other repository.
        if let Ok(from) = Repo::parse(from) {
            if authorize(caller, &from, false).is_ok() {
                let (r, d) = (repo.clone(), digest.clone());
                if blocking(state, move |s| s.mount(&r, &from, &d)).await?? {
                    return Ok(blob_created(&repo, &digest));
                }
            }
        }
    }
    let r = repo.clone();
    let id = blocking(state, move |s| s.start_upload(&r)).await??;
    if let Some(digest) = query.digest {
        let digest = Digest::parse(&digest).map_err(RegistryError::digest_invalid)?;
        append(state, &repo, &id, body, None).await?;
        return finish_upload(state, repo, id, digest).await;
    }
    Ok(upload_accepted(&repo, &id, 0))
}

pub(super) async fn finish_upload(
    state: &AppState,
    repo: Repo,
    id: String,
    digest: Digest,
) -> Result<Response, RegistryError> {
    let (r, d) = (repo.clone(), digest.clone());
    let size = blocking(state, move |s| s.commit_upload(&r, &id, &d)).await??;
    tracing::info!(%repo, %digest, size, "registry: blob pushed");
    Ok(blob_created(&repo, &digest))
}

/// Where a chunk says it starts (`Content-Range: <start>-<end>`).
pub(super) fn content_range_start(headers: &HeaderMap) -> Result<Option<u64>, RegistryError> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default();
    let start = text
        .trim_start_matches("bytes ")
        .split('-')
        .next()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            RegistryError::range_invalid(format!("Content-Range {text:?}: send <start>-<end>"))
        })?;
    Ok(Some(start))
}

/// Bytes the namespace of `repo` may still store; `None` when unlimited.
pub(super) async fn storage_left(
    state: &AppState,
    repo: &Repo,
) -> Result<Option<u64>, RegistryError> {
    let ns = repo.namespace().to_string();
    if ns == PUBLIC_NAMESPACE {
        return Ok(None);
    }
    let tenant = state
        .store
        .get_by_name(Tenant::KIND, None, &ns)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| RegistryError::name_unknown(repo.as_str()))?;
    let Some(limit) = stored::spec::<Tenant>(&tenant)?.quota.storage else {
        return Ok(None);
    };
    let scratch = tenant_resources_used(state, &ns).await?.storage.0;
    let images = blocking(state, move |s| s.namespace_bytes(&ns)).await?;
    Ok(Some(limit.0.saturating_sub(scratch).saturating_sub(images)))
}

/// Streams a request body onto upload `id`, refusing it past the blob size
/// bound or the tenant's storage quota (the upload is then discarded).
/// Returns the upload's size.
pub(super) async fn append(
    state: &AppState,
    repo: &Repo,
    id: &str,
    body: Body,
    start: Option<u64>,
) -> Result<u64, RegistryError> {
    let (r, i) = (repo.clone(), id.to_string());
    let size = blocking(state, move |s| s.upload_size(&r, &i)).await??;
    if let Some(start) = start {
        if start != size {
            return Err(RegistryError::range_invalid(format!(
                "the upload holds {size} bytes; send the chunk that starts there"
            )));
        }
    }
    let left = storage_left(state, repo).await?;
    let path = state.registry.upload_path(id);
    let mut file = tokio::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .await?;
    let mut hasher = state.registry.take_hash(id, size);
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| RegistryError::upload_invalid(format!("the upload was cut off: {e}")))?;
        written = written.saturating_add(chunk.len() as u64);
        let refusal = if size.saturating_add(written) > MAX_BLOB_BYTES {
            Some(RegistryError::size_invalid(format!(
                "blobs are at most {MAX_BLOB_BYTES} bytes"
            )))
        } else if left.is_some_and(|left| written > left) {
            Some(RegistryError::denied(format!(
                "storage quota exceeded: {} has {} bytes left of its storage quota; \
                 delete images or ask the provider for more",
                repo.namespace(),
                left.unwrap_or_default()
            )))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(file);
            let id = id.to_string();
            blocking(state, move |s| s.cancel_upload(&id)).await?;
            return Err(refusal);
        }
        file.write_all(&chunk).await?;
        if let Some(h) = hasher.as_mut() {
            sha2::Digest::update(h, &chunk);
        }
    }
    file.flush().await?;
    let size = size.saturating_add(written);
    if let Some(h) = hasher {
        state.registry.keep_hash(id, size, h);
    }
    Ok(size)
}
