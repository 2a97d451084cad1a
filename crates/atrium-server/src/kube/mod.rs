//! Tenant clusters: the Kubernetes API at `/k8s/{cluster}/…`, one logical
//! cluster per `Cluster` object, served from the control plane's store
//! (`objects`) with watches from its change log (`watch`). What the API
//! is — resources, discovery, metadata rules, selectors, patches, tables —
//! is `atrium-kube`'s; this module authenticates, finds the cluster,
//! routes, and stores.
//!
//! Who may do what (`access`): an Atrium key by its role over the
//! cluster's tenant — a tenant's admin key reads and writes its clusters,
//! a viewer key only reads, another tenant's key finds no cluster at all
//! (404), exactly as for every other kind — and a service account's token
//! (`tokens`) by the cluster's RBAC.

mod access;
mod apply;
mod apps;
mod batch;
mod body;
mod controlled;
mod custom;
mod delete;
mod endpoints;
mod events;
mod exec;
mod inference;
mod nodes;
mod objects;
mod path;
pub mod pods;
mod quotas;
mod routes;
pub mod sealed;
mod statefulsets;
mod subresources;
mod tokens;
mod watch;

use atrium_core::cluster::ClusterSpec;
use atrium_core::quota::Counted;
use atrium_core::FieldErrors;
use atrium_kube::{discovery, openapi};
use atrium_kube::{Catalog, KubeError};
use atrium_store::{Object, Precondition};
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::Value;

use crate::auth::Caller;
use crate::crud::require;
use crate::error::ApiError;
use crate::kinds::{one_more, Access, Cluster, Kind, Resource};
use crate::{AppState, RequestId};

pub use access::{authenticate, Who};
pub use objects::delete_cluster_objects;
pub(crate) use objects::system_audit;
use path::Target;

impl Kind for Cluster {
    const TENANT_WRITABLE: bool = true;
    const TENANT_READABLE: bool = true;

    fn validate(_spec: &ClusterSpec) -> Result<(), FieldErrors> {
        Ok(())
    }

    async fn admit(
        _state: &AppState,
        tenant: Option<&str>,
        _spec: &ClusterSpec,
        replacing: Option<&str>,
    ) -> Result<Option<Precondition<ApiError>>, ApiError> {
        let tenant = tenant.ok_or_else(|| ApiError::field("tenant", "is required"))?;
        Ok(replacing
            .is_none()
            .then(|| one_more(Cluster::KIND, tenant, Counted::Clusters)))
    }

    async fn after_create(state: &AppState, object: &Object) -> Result<(), ApiError> {
        objects::create_defaults(state, object).await
    }

    /// Deleting a cluster deletes everything in it.
    async fn before_delete(state: &AppState, object: &Object) -> Result<(), ApiError> {
        delete_cluster_objects(state, object).await
    }
}

/// A response in the Kubernetes API's shapes.
pub(crate) enum KubeResponse {
    Json(StatusCode, Value),
    Stream(Response),
}

impl IntoResponse for KubeResponse {
    fn into_response(self) -> Response {
        match self {
            KubeResponse::Json(status, body) => (status, axum::Json(body)).into_response(),
            KubeResponse::Stream(r) => r,
        }
    }
}

fn refusal(e: KubeError) -> Response {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.to_status())).into_response()
}

/// An Atrium refusal in the Kubernetes shape.
pub(crate) fn from_api(e: ApiError) -> KubeError {
    let response = e.into_response();
    let code = response.status().as_u16();
    let (reason, message) = match code {
        401 => ("Unauthorized", "Unauthorized".to_string()),
        403 => (
            "Forbidden",
            "your key's role may not do this in this cluster".to_string(),
        ),
        404 => ("NotFound", "the cluster does not exist".to_string()),
        409 => (
            "Conflict",
            "the request conflicts with the cluster's state".to_string(),
        ),
        429 => (
            "TooManyRequests",
            "the tenant holds as many open watch streams as its quota allows; close one first"
                .to_string(),
        ),
        _ => (
            "InternalError",
            format!("the control plane failed ({code})"),
        ),
    };
    KubeError {
        code,
        reason,
        message,
        name: None,
        kind: None,
        causes: Vec::new(),
    }
}

/// What one request asked for, besides its target.
pub(crate) struct Request {
    pub method: Method,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    caller: Caller,
    rid: RequestId,
    /// A WebSocket upgrade the client asked for (only `exec` takes it).
    upgrade: std::sync::Mutex<Option<WebSocketUpgrade>>,
}

impl Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Who did `action`, for the audit log.
    pub fn audit(&self, action: String) -> atrium_store::AuditContext {
        crate::crud::audit(&self.caller, &self.rid, action)
    }

    pub fn take_upgrade(&self) -> Option<WebSocketUpgrade> {
        self.upgrade.lock().ok()?.take()
    }

    /// Whether the client asked for aggregated discovery (v2), as kubectl
    /// does first.
    pub fn wants_aggregated_discovery(&self) -> bool {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"))
    }

    /// Whether the client takes JSON: it says so, takes anything, or
    /// says nothing.
    pub fn accepts_json(&self) -> bool {
        let Some(accept) = self.headers.get(header::ACCEPT) else {
            return true;
        };
        accept.to_str().is_ok_and(|a| {
            a.split(',').any(|m| {
                let media = m.split(';').next().unwrap_or("").trim();
                matches!(media, "application/json" | "application/*" | "*/*" | "")
            })
        })
    }

    /// Whether the client asked for a `Table` (as `kubectl get` does).
    pub fn wants_table(&self) -> bool {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=Table"))
    }
}

fn parse_query(raw: Option<&str>) -> Vec<(String, String)> {
    serde_urlencoded::from_str(raw.unwrap_or_default()).unwrap_or_default()
}

/// `ANY /k8s/{cluster}/{*rest}`.
pub async fn serve(
    State(state): State<AppState>,
    Extension(who): Extension<Who>,
    Extension(rid): Extension<RequestId>,
    Path((cluster, rest)): Path<(String, String)>,
    mut parts: axum::http::request::Parts,
    body: Bytes,
) -> Response {
    let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &state)
        .await
        .ok();
    let (method, headers) = (parts.method, parts.headers);
    let query = parse_query(parts.uri.query());
    let admitted = match access::admit(&state, who, &cluster, &rest, &method, &query).await {
        Ok(admitted) => admitted,
        Err(e) => return refusal(e),
    };
    let access::Admitted {
        cluster,
        caller,
        target,
        catalog,
    } = admitted;
    let request = Request {
        caller,
        rid,
        method,
        query,
        headers,
        body,
        upgrade: std::sync::Mutex::new(upgrade),
    };
    match route(&state, &cluster, (&rest, target, &catalog), &request).await {
        Ok(r) => r.into_response(),
        Err(e) => refusal(e),
    }
}

async fn route(
    state: &AppState,
    cluster: &Object,
    (rest, target, catalog): (&str, Target, &Catalog),
    req: &Request,
) -> Result<KubeResponse, KubeError> {
    let ok = |v: Value| Ok(KubeResponse::Json(StatusCode::OK, v));
    let discovery_only = !matches!(target, Target::Resource(_));
    if discovery_only && req.method != Method::GET {
        return Err(KubeError::method_not_allowed(&format!(
            "{} /{rest}",
            req.method
        )));
    }
    match target {
        Target::Version => ok(discovery::version()),
        Target::Api | Target::Apis if req.wants_aggregated_discovery() => {
            let doc = discovery::aggregated(catalog, target == Target::Api);
            let response = (
                [(header::CONTENT_TYPE, discovery::AGGREGATED)],
                axum::Json(doc),
            )
                .into_response();
            Ok(KubeResponse::Stream(response))
        }
        Target::Api => ok(discovery::api_versions()),
        Target::Apis => ok(discovery::api_group_list(catalog)),
        Target::Group(g) => {
            discovery::api_group(catalog, &g).map_or_else(|| Err(KubeError::no_route(rest)), ok)
        }
        Target::GroupVersion(g, v) => discovery::api_resource_list(catalog, &g, &v)
            .map_or_else(|| Err(KubeError::no_route(rest)), ok),
        // client-go asks for v2 as protobuf only, and on 406 goes on
        // without it; JSON is what is served.
        Target::OpenApiV2 if !req.accepts_json() => Err(KubeError::not_acceptable(
            "/openapi/v2 is served as application/json only",
        )),
        Target::OpenApiV2 => ok(openapi::swagger(catalog)),
        Target::OpenApi => ok(openapi::index(catalog)),
        Target::OpenApiDocument(gv) => openapi::document(catalog, &gv)
            .map_or_else(|| Err(KubeError::no_route(rest)), |d| ok(d.into_owned())),
        Target::Resource(at) => objects::serve(state, cluster, &at, req).await,
    }
}

/// Where tenant clusters' clients connect: the TLS listener, and the CA
/// that issued its certificate.
pub struct Endpoint {
    server: String,
    ca_pem: String,
}

impl Endpoint {
    pub fn new(addr: std::net::SocketAddr, names: &[String], ca_pem: &str) -> Endpoint {
        // A wildcard listener is reached by the first name it carries, or
        // on loopback.
        let host = if addr.ip().is_unspecified() {
            names.first().cloned().unwrap_or_else(|| "127.0.0.1".into())
        } else {
            addr.ip().to_string()
        };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        Endpoint {
            server: format!("https://{host}:{}", addr.port()),
            ca_pem: ca_pem.to_string(),
        }
    }
}

/// `GET /v1/kube/endpoint`: the URL and CA a kubeconfig needs.
pub async fn endpoint(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<axum::Json<atrium_api::KubeEndpoint>, ApiError> {
    require::<Cluster>(&caller, Access::Read)?;
    let Some(e) = &state.kube_endpoint else {
        return Err(ApiError::Conflict {
            code: "no_tls_listener",
            message: "this control plane has no TLS listener, and kubectl sends credentials \
                      only over TLS: start it with --tls-listen (e.g. 127.0.0.1:7443)"
                .into(),
            details: Value::Null,
        });
    };
    Ok(axum::Json(atrium_api::KubeEndpoint {
        server: e.server.clone(),
        certificate_authority_data: {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&e.ca_pem)
        },
    }))
}
