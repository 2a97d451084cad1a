//! An OCI distribution registry under `/v2/`, one namespace per tenant:
//! `<tenant>/<repo>` is the tenant's, `library/<repo>` the provider's
//! public images. Pull and push as the distribution spec has them (blobs
//! by digest, chunked and monolithic uploads, cross-repository mounts,
//! manifests and indexes, tags, a catalog filtered to the caller), with
//! the bearer-token flow clients expect: `/v2/` answers 401 with a realm,
//! the client trades its tenant key there (Basic auth, the key as
//! password) for a token, and that token is the key itself — a key is
//! already a bearer credential, so no second kind of secret exists.
//!
//! Security: a tenant reaches only its own namespace and reads `library/`;
//! another tenant's repository is `NAME_UNKNOWN`, never `DENIED`, so names
//! do not leak. A blob is readable only through a repository that links
//! it. Every upload is hashed before it becomes a blob, and what a tenant
//! stores counts against its storage quota while it streams in.

mod blobs;
mod error;
mod manifest;
mod names;
mod storage;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::routing::{any, get};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use serde::Deserialize;

use atrium_core::plane::Plane;
use atrium_core::workload::ImageRef;
use atrium_store::TenantFilter;

use crate::auth::{self, Caller, Role};
use crate::error::ApiError;
use crate::extract::Params;
use crate::kinds::{Placement, Resource};
use crate::stored;
use crate::AppState;
use blobs::{
    append, content_range_start, finish_upload, get_blob, start_upload, storage_left,
    upload_accepted, UploadQuery,
};
pub use error::RegistryError;
use names::{check_upload_id, Digest, Reference, Repo, PUBLIC_NAMESPACE};
pub use storage::{GcReport, Storage};

/// Largest blob accepted, whatever the quota: a bound on what one upload
/// can make the control plane write.
const MAX_BLOB_BYTES: u64 = 64 << 30;
/// How long a blob or layer link no manifest uses is kept: a push uploads
/// layers first and names them in its manifest last.
pub const GC_GRACE: Duration = Duration::from_secs(3600);
/// How often the control plane collects garbage.
pub const GC_EVERY: Duration = Duration::from_secs(600);
/// What the token endpoint says a token lasts (a key lasts until revoked
/// or expired; clients ask again after this).
const TOKEN_SECONDS: u64 = 3600;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/v2", get(base))
        .route("/v2/", get(base))
        .route("/v2/_catalog", get(catalog))
        .route("/v2/{*path}", any(dispatch))
        .route("/v1/registry/token", get(token))
}

/// What a path under `/v2/` names.
#[derive(Debug, PartialEq)]
enum Route {
    Blob(Repo, Digest),
    Uploads(Repo),
    Upload(Repo, String),
    Manifest(Repo, Reference),
    Tags(Repo),
}

/// Matched from the end: repository names have slashes of their own.
fn route(path: &str) -> Result<Route, RegistryError> {
    let segments: Vec<&str> = path.split('/').collect();
    let n = segments.len();
    let repo = |suffix: usize| {
        Repo::parse(&segments[..n - suffix].join("/")).map_err(RegistryError::name_invalid)
    };
    let tail = |k: usize| (n > k).then(|| &segments[n - k..]);
    if let Some(["tags", "list"]) = tail(2) {
        return Ok(Route::Tags(repo(2)?));
    }
    if let Some(["blobs", "uploads", id]) = tail(3) {
        let repo = repo(3)?;
        if id.is_empty() {
            return Ok(Route::Uploads(repo));
        }
        check_upload_id(id).map_err(RegistryError::upload_unknown)?;
        return Ok(Route::Upload(repo, id.to_string()));
    }
    if let Some(["blobs", "uploads"]) = tail(2) {
        return Ok(Route::Uploads(repo(2)?));
    }
    if let Some(["blobs", digest]) = tail(2) {
        let digest = Digest::parse(digest).map_err(RegistryError::digest_invalid)?;
        return Ok(Route::Blob(repo(2)?, digest));
    }
    if let Some(["manifests", reference]) = tail(2) {
        let reference = Reference::parse(reference).map_err(RegistryError::manifest_invalid)?;
        return Ok(Route::Manifest(repo(2)?, reference));
    }
    Err(RegistryError::name_invalid(format!(
        "/v2/{path} names no registry endpoint"
    )))
}

/// The token a request carries: a bearer token, or the password of Basic
/// auth (how clients send a key they were given as a password).
fn credentials(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_string());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_string())
}

/// `WWW-Authenticate` pointing at this server's token endpoint. The Host
/// header is the client's: only a plain host[:port] is echoed back.
fn challenge(headers: &HeaderMap, scope: Option<(&Repo, bool)>) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            (1..=255).contains(&h.len())
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .unwrap_or("localhost");
    let mut value = format!("Bearer realm=\"http://{host}/v1/registry/token\",service=\"atrium\"");
    if let Some((repo, write)) = scope {
        let actions = if write { "pull,push" } else { "pull" };
        value.push_str(&format!(",scope=\"repository:{repo}:{actions}\""));
    }
    value
}

async fn caller(
    state: &AppState,
    headers: &HeaderMap,
    scope: Option<(&Repo, bool)>,
) -> Result<Caller, RegistryError> {
    let Some(token) = credentials(headers) else {
        return Err(RegistryError::unauthorized(
            "authenticate with a tenant API key (any user name, the key as password)",
            challenge(headers, scope),
        ));
    };
    auth::authenticate_token(&state.store, &token)
        .await
        .map_err(|e| match e {
            ApiError::Unauthenticated(m) => {
                RegistryError::unauthorized(m, challenge(headers, scope))
            }
            other => other.into(),
        })
}

/// Whether `caller` may read (or, with `write`, change) `repo`. Another
/// tenant's repository does not exist as far as the caller can tell.
fn authorize(caller: &Caller, repo: &Repo, write: bool) -> Result<(), RegistryError> {
    if caller.role == Role::ProviderAdmin {
        return Ok(());
    }
    let Some(tenant) = caller.tenant.as_deref() else {
        return Err(RegistryError::denied(
            "plane credentials do not reach the registry",
        ));
    };
    let ns = repo.namespace();
    if ns != tenant && ns != PUBLIC_NAMESPACE {
        return Err(RegistryError::name_unknown(repo.as_str()));
    }
    if write && ns == PUBLIC_NAMESPACE {
        return Err(RegistryError::denied(format!(
            "{PUBLIC_NAMESPACE}/ holds the provider's public images; push to {tenant}/…"
        )));
    }
    if write && !caller.role.at_least(Role::TenantAdmin) {
        return Err(RegistryError::denied(
            "pushing and deleting images needs a key with the admin scope",
        ));
    }
    if !caller.role.at_least(Role::Viewer) {
        return Err(RegistryError::denied(
            "pulling images needs a key with the read or admin scope",
        ));
    }
    Ok(())
}

/// Whether `caller` is a node's agent with a workload placed on it that
/// runs an image of `repo`: a node pulls exactly those, and nothing else
/// of any tenant's.
async fn node_runs_image_of(
    state: &AppState,
    caller: &Caller,
    repo: &Repo,
) -> Result<bool, RegistryError> {
    let Some(plane) = caller.plane.as_ref().filter(|p| p.plane == Plane::Node) else {
        return Ok(false);
    };
    let placements = state
        .store
        .list_all(Placement::KIND, &TenantFilter::All)
        .await
        .map_err(|e| RegistryError::internal(format!("placements: {e}")))?;
    Ok(placements.iter().any(|p| {
        stored::spec::<Placement>(p).is_ok_and(|spec| {
            spec.node == plane.name
                && spec.container.is_some_and(|c| {
                    ImageRef::parse(&c.image).is_ok_and(|i| i.repository == repo.as_str())
                })
        })
    }))
}

/// Runs storage work off the async threads.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&Storage) -> T + Send + 'static,
) -> Result<T, RegistryError> {
    let storage = state.registry.clone();
    tokio::task::spawn_blocking(move || work(&storage))
        .await
        .map_err(|e| RegistryError::internal(format!("registry task: {e}")))
}

fn respond(status: StatusCode, headers: &[(header::HeaderName, String)], body: Body) -> Response {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder.body(body).unwrap_or_else(|e| {
        axum::response::IntoResponse::into_response(RegistryError::internal(e.to_string()))
    })
}

fn digest_header() -> header::HeaderName {
    header::HeaderName::from_static("docker-content-digest")
}

/// `GET /v2/`: the API version check, and where clients learn to
/// authenticate.
async fn base(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, RegistryError> {
    caller(&state, &headers, None).await?;
    Ok(respond(
        StatusCode::OK,
        &[(
            header::HeaderName::from_static("docker-distribution-api-version"),
            "registry/2.0".into(),
        )],
        Body::from("{}"),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    n: Option<usize>,
    last: Option<String>,
}

fn page(mut items: Vec<String>, query: &PageQuery) -> Vec<String> {
    if let Some(last) = &query.last {
        items.retain(|i| i > last);
    }
    items.truncate(query.n.unwrap_or(usize::MAX));
    items
}

/// `GET /v2/_catalog`: the repositories the caller may read.
async fn catalog(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, RegistryError> {
    let caller = caller(&state, &headers, None).await?;
    let query: PageQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| RegistryError::name_invalid(format!("catalog query: {e}")))?;
    let all = blocking(&state, |s| s.repositories()).await?;
    let visible: Vec<String> = all
        .iter()
        .filter(|r| authorize(&caller, r, false).is_ok())
        .map(|r| r.to_string())
        .collect();
    Ok(Json(
        serde_json::json!({"repositories": page(visible, &query)}),
    ))
}

/// `GET /v1/registry/token`: a token for the key the client sends.
async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, RegistryError> {
    let caller = caller(&state, &headers, None).await?;
    if caller.plane.is_some() {
        return Err(RegistryError::denied(
            "plane credentials do not reach the registry",
        ));
    }
    let token = credentials(&headers).unwrap_or_default();
    Ok(Json(serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_SECONDS,
        "issued_at": auth::now_rfc3339(),
    })))
}

/// Everything under `/v2/<name>/…`.
async fn dispatch(
    State(state): State<AppState>,
    method: Method,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, RegistryError> {
    let route = route(&path)?;
    let write = !matches!(method, Method::GET | Method::HEAD);
    let repo = match &route {
        Route::Blob(r, _)
        | Route::Uploads(r)
        | Route::Upload(r, _)
        | Route::Manifest(r, _)
        | Route::Tags(r) => r.clone(),
    };
    let caller = caller(&state, &headers, Some((&repo, write))).await?;
    if write || !node_runs_image_of(&state, &caller, &repo).await? {
        authorize(&caller, &repo, write)?;
    }
    let query = query.unwrap_or_default();
    match (route, method) {
        (Route::Blob(repo, digest), m @ (Method::GET | Method::HEAD)) => {
            get_blob(&state, repo, digest, m == Method::HEAD).await
        }
        (Route::Blob(..), Method::DELETE) => Err(RegistryError::unsupported(
            "blobs go when no manifest uses them; delete the manifest",
        )),
        (Route::Uploads(repo), Method::POST) => {
            let q: UploadQuery = serde_urlencoded::from_str(&query)
                .map_err(|e| RegistryError::upload_invalid(format!("upload query: {e}")))?;
            start_upload(&state, &caller, repo, q, body).await
        }
        (Route::Upload(repo, id), Method::PATCH) => {
            let start = content_range_start(&headers)?;
            let size = append(&state, &repo, &id, body, start).await?;
            Ok(upload_accepted(&repo, &id, size))
        }
        (Route::Upload(repo, id), Method::PUT) => {
            let q: UploadQuery = serde_urlencoded::from_str(&query)
                .map_err(|e| RegistryError::upload_invalid(format!("upload query: {e}")))?;
            let digest = q.digest.ok_or_else(|| {
                RegistryError::digest_invalid("finish an upload with ?digest=sha256:…")
            })?;
            let digest = Digest::parse(&digest).map_err(RegistryError::digest_invalid)?;
            append(&state, &repo, &id, body, None).await?;
            finish_upload(&state, repo, id, digest).await
        }
        (Route::Upload(repo, id), Method::GET) => {
            let (r, i) = (repo.clone(), id.clone());
            let size = blocking(&state, move |s| s.upload_size(&r, &i)).await??;
            let mut r = upload_accepted(&repo, &id, size);
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        (Route::Upload(repo, id), Method::DELETE) => {
            blocking(&state, move |s| {
                s.upload_size(&repo, &id)?;
                s.cancel_upload(&id);
                Ok::<_, RegistryError>(())
            })
            .await??;
            Ok(respond(StatusCode::NO_CONTENT, &[], Body::empty()))
        }
        (Route::Manifest(repo, reference), m @ (Method::GET | Method::HEAD)) => {
            get_manifest(&state, repo, reference, m == Method::HEAD).await
        }
        (Route::Manifest(repo, reference), Method::PUT) => {
            put_manifest(&state, repo, reference, &headers, body).await
        }
        (Route::Manifest(repo, reference), Method::DELETE) => {
            let shown = repo.image(&reference);
            let deleted = blocking(&state, move |s| s.delete_manifest(&repo, &reference)).await??;
            if !deleted {
                return Err(RegistryError::manifest_unknown(&shown));
            }
            tracing::info!(image = %shown, actor = %caller.actor, "registry: manifest deleted");
            Ok(respond(StatusCode::ACCEPTED, &[], Body::empty()))
        }
        (Route::Tags(repo), Method::GET) => {
            let q: PageQuery = serde_urlencoded::from_str(&query)
                .map_err(|e| RegistryError::name_invalid(format!("tags query: {e}")))?;
            let name = repo.to_string();
            let (exists, tags) =
                blocking(&state, move |s| (s.repo_exists(&repo), s.tags(&repo))).await?;
            if !exists {
                return Err(RegistryError::name_unknown(&name));
            }
            let body = serde_json::json!({"name": name, "tags": page(tags, &q)});
            Ok(respond(
                StatusCode::OK,
                &[(header::CONTENT_TYPE, "application/json".into())],
                Body::from(body.to_string()),
            ))
        }
        (_, method) => Err(RegistryError::unsupported(format!(
            "{method} is not served on /v2/{path}"
        ))),
    }
}

async fn get_manifest(
    state: &AppState,
    repo: Repo,
    reference: Reference,
    head: bool,
) -> Result<Response, RegistryError> {
    let shown = repo.image(&reference);
    let found = blocking(state, move |s| s.get_manifest(&repo, &reference)).await?;
    let (media_type, digest, bytes) =
        found.ok_or_else(|| RegistryError::manifest_unknown(&shown))?;
    let headers = [
        (header::CONTENT_TYPE, media_type),
        (header::CONTENT_LENGTH, bytes.len().to_string()),
        (digest_header(), digest.to_string()),
    ];
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    Ok(respond(StatusCode::OK, &headers, body))
}

async fn put_manifest(
    state: &AppState,
    repo: Repo,
    reference: Reference,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, RegistryError> {
    let bytes = axum::body::to_bytes(body, manifest::MAX_MANIFEST_BYTES)
        .await
        .map_err(|_| {
            RegistryError::size_invalid(format!(
                "manifests are at most {} bytes",
                manifest::MAX_MANIFEST_BYTES
            ))
        })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let (media_type, references) =
        manifest::parse(content_type, &bytes).map_err(RegistryError::manifest_invalid)?;
    if storage_left(state, &repo)
        .await?
        .is_some_and(|left| (bytes.len() as u64) > left)
    {
        return Err(RegistryError::denied(format!(
            "storage quota exceeded: {} cannot store this manifest",
            repo.namespace()
        )));
    }
    let r = repo.clone();
    let digest = blocking(state, move |s| {
        s.put_manifest(&r, &reference, &media_type, &bytes, &references)
    })
    .await??;
    tracing::info!(%repo, %digest, "registry: manifest pushed");
    Ok(respond(
        StatusCode::CREATED,
        &[
            (header::LOCATION, format!("/v2/{repo}/manifests/{digest}")),
            (digest_header(), digest.to_string()),
            (header::CONTENT_LENGTH, "0".into()),
        ],
        Body::empty(),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcParams {
    /// Keep what is younger than this [default: 3600].
    grace_seconds: Option<u64>,
}

/// `POST /v1/registry/gc`: the provider collects the registry's garbage now.
pub async fn collect_garbage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Params(params): Params<GcParams>,
) -> Result<Json<GcReport>, ApiError> {
    if caller.role != Role::ProviderAdmin {
        return Err(ApiError::Forbidden(
            "only the provider collects the registry's garbage".into(),
        ));
    }
    let grace = params.grace_seconds.map_or(GC_GRACE, Duration::from_secs);
    let storage = state.registry.clone();
    let report = tokio::task::spawn_blocking(move || storage.collect_garbage(grace))
        .await
        .map_err(|e| ApiError::Internal(format!("registry gc: {e}")))?
        .map_err(|e| ApiError::Internal(format!("registry gc: {e}")))?;
    tracing::info!(?report, "registry: garbage collected");
    Ok(Json(report))
}

/// Collects garbage every [`GC_EVERY`] until the server stops.
pub async fn collect_garbage_periodically(
    storage: Arc<Storage>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(GC_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let s = storage.clone();
        match tokio::task::spawn_blocking(move || s.collect_garbage(GC_GRACE)).await {
            Ok(Ok(report)) if report != GcReport::default() => {
                tracing::info!(?report, "registry: garbage collected");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "registry: garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "registry: garbage collection failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_matched_from_the_end_and_names_checked() {
        let d = format!("sha256:{}", "0".repeat(64));
        let repo = |s: &str| Repo::parse(s).unwrap();
        assert_eq!(
            route("acme/x/tags/list").unwrap(),
            Route::Tags(repo("acme/x"))
        );
        assert_eq!(
            route("acme/blobs/blobs/uploads/").unwrap(),
            Route::Uploads(repo("acme/blobs"))
        );
        assert_eq!(
            route("acme/x/blobs/uploads").unwrap(),
            Route::Uploads(repo("acme/x"))
        );
        assert_eq!(
            route(&format!("acme/a/b/blobs/{d}")).unwrap(),
            Route::Blob(repo("acme/a/b"), Digest::parse(&d).unwrap())
        );
        assert_eq!(
            route("acme/manifests/manifests/latest").unwrap(),
            Route::Manifest(repo("acme/manifests"), Reference::Tag("latest".into()))
        );
        for bad in [
            "acme/../globex/x/tags/list",
            "x/tags/list",
            "acme/x/blobs/sha256:zz",
            "acme/x/blobs/uploads/../../etc",
            "acme/x/manifests/..",
            "acme/x/nothing",
            "tags/list",
        ] {
            assert!(route(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn basic_auth_carries_the_key_as_password_and_hosts_are_not_echoed_raw() {
        let mut h = HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:atr_key");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert_eq!(credentials(&h).as_deref(), Some("atr_key"));
        h.insert(header::AUTHORIZATION, "Bearer atr_k2".parse().unwrap());
        assert_eq!(credentials(&h).as_deref(), Some("atr_k2"));
        h.insert(header::HOST, "evil\"realm=x".parse().unwrap());
        assert!(challenge(&h, None).contains("realm=\"http://localhost/v1/registry/token\""));
        h.insert(header::HOST, "127.0.0.1:5000".parse().unwrap());
        let repo = Repo::parse("acme/x").unwrap();
        assert!(
            challenge(&h, Some((&repo, true))).ends_with("scope=\"repository:acme/x:pull,push\"")
        );
    }
}
