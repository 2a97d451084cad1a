//! Atrium's control plane: the REST API under `/v1` where the provider
//! defines sites, nodes and tenants and tenants declare what they want,
//! with authentication, authorization, quotas and an audit trail, over the
//! store. Later controllers (placement, autoscaling) run here too.
//!
//! Code map: `kinds` (what each resource is and its rules) → `crud`
//! (generic handlers, authorization, watch) → `tenancy` (keys, quotas,
//! audit) → this file (router, middleware, start-up). `error` is the single
//! edge error type; `openapi` describes the same routes.

mod auth;
mod autoscale;
mod batches;
pub mod controller;
mod crud;
mod databases;
pub mod error;
mod exec;
mod extract;
mod gateway_records;
mod kinds;
mod kube;
mod leader;
mod limit_ledger;
mod metrics;
mod openapi;
mod planes;
mod registry;
mod stored;
mod tenancy;
mod tls;
mod vectors;
mod volumes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use atrium_store::Store;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

pub use auth::{Role, ADMIN_TOKEN_PREFIX};
pub use databases::DatabasesConfig;
use error::ApiError;
use kinds::{
    Cluster, Credential, Deployment, Exec, Gateway, JoinToken, Key, Kind, Model, Node, Placement,
    ServiceRoute, Site, Tenant, Volume, Workload,
};
use metrics::Metrics;
pub use vectors::MAX_OPEN as VECTOR_MAX_OPEN;

/// Default limit on request bodies.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Holds the SQLite database (by default) and `admin.token`.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; SQLite in `data_dir` when absent.
    pub database_url: Option<String>,
    pub body_limit: usize,
    /// A second listener, over TLS with the control plane's own CA, for
    /// clients that send credentials only over TLS (kubectl).
    pub tls_listen: Option<SocketAddr>,
    /// Names the TLS certificate carries besides `localhost` and the
    /// loopback addresses.
    pub tls_names: Vec<String>,
    /// How many of the newest revisions the change log keeps, and how
    /// often older ones are deleted: a watch from before them gets 410
    /// and lists again.
    pub changes_kept: i64,
    pub compact_every: std::time::Duration,
    /// The provider's PostgreSQL for tenants' databases; none: the
    /// database API answers 503.
    pub databases: Option<DatabasesConfig>,
}

/// The change log's window by default: a day of a busy control plane's
/// writes, minutes of a very busy one.
pub const DEFAULT_CHANGES_KEPT: i64 = 100_000;
pub const DEFAULT_COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl ServerConfig {
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| default_database_url(&self.data_dir))
    }
}

/// The embedded store of a control plane whose data dir is `data_dir`.
pub fn default_database_url(data_dir: &std::path::Path) -> String {
    format!("sqlite://{}", data_dir.join("atrium.db").display())
}

/// A vector collection unused this long is dropped from memory (its
/// files stay; the next use reads it back).
const VECTOR_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    store: Store,
    metrics: Arc<Metrics>,
    body_limit: usize,
    /// Turns true when the server shuts down, ending watch streams so the
    /// graceful shutdown does not wait on them forever.
    shutdown: watch::Receiver<bool>,
    /// Site-wide counts behind gateways' shared request limits.
    ledger: Arc<std::sync::Mutex<limit_ledger::Ledger>>,
    /// Watch streams open per tenant, against their quota's cap.
    watches: Arc<crud::OpenWatches>,
    /// Where tenant clusters' clients connect, and the CA they trust
    /// (none without a TLS listener).
    kube_endpoint: Option<Arc<kube::Endpoint>>,
    /// Seals tenant clusters' secrets at rest.
    sealer: Arc<kube::sealed::Sealer>,
    /// The image registry's content (`<data-dir>/registry`).
    registry: Arc<registry::Storage>,
    /// The gateways' latest load reports, for the autoscaler.
    load: Arc<autoscale::LoadBoard>,
    /// The Batch API's file bytes (`<data-dir>/files`).
    files: Arc<batches::FileStore>,
    /// Tenants' vector collections (`<data-dir>/vectors`).
    vectors: Arc<vectors::VectorStore>,
    /// The provider's PostgreSQL for tenants' databases, when offered.
    databases: Option<Arc<databases::Provider>>,
    /// The Atrium CA, for the sites' peer-link certificates.
    authority: Arc<tls::Authority>,
}

/// The id of the request being served, for logs, audit and the
/// `x-request-id` response header.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("cannot open the store: {0}")]
    Store(#[from] atrium_store::StoreError),
    #[error("cannot create the admin token: {0}")]
    AdminToken(String),
    #[error("cannot open the image registry's directory {0}: {1}")]
    Registry(PathBuf, std::io::Error),
    #[error("cannot open the vector store's directory {0}: {1}")]
    Vectors(PathBuf, std::io::Error),
    #[error("cannot open the Batch API's file directory {0}: {1}")]
    Files(PathBuf, std::io::Error),
    #[error("{0}")]
    Databases(String),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    SecretsKey(#[from] kube::sealed::KeyError),
}

/// A started control plane.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The TLS listener's address, when there is one.
    pub tls_addr: Option<SocketAddr>,
    /// Set when this start created the admin token: show it once.
    pub new_admin_token: Option<String>,
    pub admin_token_path: PathBuf,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Store,
}

impl RunningServer {
    /// Stops accepting, ends watch streams, waits for in-flight requests.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(true);
        let result = match self.task.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        self.store.close().await;
        result
    }

    /// Waits until the server stops by itself (it does not, unless it fails).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The file may predate us with wider permissions.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Lifts the soft limit on open files to the hard one (at most 2^20): a
/// control plane holds a socket per client and watch, a log per open
/// vector collection (up to `vectors::MAX_OPEN`), and the default soft
/// limit of 1,024 would run out first.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.map_or(1 << 20, |m| m.min(1 << 20));
    if limit.current.is_some_and(|c| c < want) {
        limit.current = Some(want);
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
    }
}

/// Opens the store, makes the admin token on first start, binds and serves.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    raise_open_files_limit();
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| StartError::DataDir(config.data_dir.clone(), e))?;
    let store = Store::open(&config.database_url()).await?;
    let new_admin_token = auth::bootstrap_admin_token(&store)
        .await
        .map_err(|e| StartError::AdminToken(e.to_string()))?;
    let admin_token_path = config.data_dir.join(ADMIN_TOKEN_FILE);
    if let Some(token) = &new_admin_token {
        write_token_file(&admin_token_path, token)
            .map_err(|e| StartError::AdminToken(format!("{}: {e}", admin_token_path.display())))?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| StartError::Listen(config.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Listen(config.listen, e))?;
    let registry_dir = config.data_dir.join("registry");
    let registry = Arc::new(
        registry::Storage::open(registry_dir.clone())
            .map_err(|e| StartError::Registry(registry_dir, e))?,
    );
    let files_dir = config.data_dir.join("files");
    let files = Arc::new(
        batches::FileStore::open(files_dir.clone()).map_err(|e| StartError::Files(files_dir, e))?,
    );
    let vectors_dir = config.data_dir.join("vectors");
    let vectors = Arc::new(
        vectors::VectorStore::open(vectors_dir.clone(), vectors::MAX_OPEN)
            .map_err(|e| StartError::Vectors(vectors_dir, e))?,
    );
    let databases = match &config.databases {
        Some(c) => Some(Arc::new(
            databases::Provider::connect(c)
                .await
                .map_err(StartError::Databases)?,
        )),
        None => None,
    };
    let tls = match config.tls_listen {
        Some(at) => {
            let material = tls::load(&config.data_dir.join("tls"), &config.tls_names)?;
            let tcp = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| StartError::Listen(at, e))?;
            let listener =
                tls::TlsListener::new(tcp, &material).map_err(|e| StartError::Listen(at, e))?;
            Some((listener, material.ca_pem))
        }
        None => None,
    };
    let tls_addr = tls
        .as_ref()
        .and_then(|(l, _)| axum::serve::Listener::local_addr(l).ok());
    let kube_endpoint = tls
        .as_ref()
        .zip(tls_addr)
        .map(|((_, ca), addr)| Arc::new(kube::Endpoint::new(addr, &config.tls_names, ca)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    tokio::spawn(registry::collect_garbage_periodically(
        registry.clone(),
        shutdown_rx.clone(),
    ));
    let state = AppState {
        store: store.clone(),
        metrics: Arc::new(Metrics::default()),
        body_limit: config.body_limit,
        shutdown: shutdown_rx.clone(),
        ledger: Arc::default(),
        watches: Arc::default(),
        kube_endpoint,
        sealer: Arc::new(kube::sealed::Sealer::load(
            &config.data_dir.join("kube-secrets.key"),
        )?),
        registry,
        load: Arc::default(),
        files,
        vectors: vectors.clone(),
        databases: databases.clone(),
        authority: Arc::new(tls::Authority::load(&config.data_dir.join("tls"))?),
    };
    if let Some(p) = databases {
        tokio::spawn(databases::run(state.clone(), p));
    }
    tokio::spawn(vectors::page_out_idle(vectors, VECTOR_IDLE));
    tokio::spawn(leader::run(
        state.clone(),
        leader::holder_name(&config.data_dir),
        (config.changes_kept, config.compact_every),
        shutdown_rx.clone(),
    ));
    let app = router(state);
    if let Some((listener, _)) = tls {
        let (app, mut stop) = (app.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "TLS listener stopped");
            }
        });
    }
    let mut stop = shutdown_rx;
    let task = tokio::spawn(async move {
        // Watch events are small writes: no waiting for delayed ACKs.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(%addr, tls = ?tls_addr, "control plane listening");
    Ok(RunningServer {
        addr,
        tls_addr,
        new_admin_token,
        admin_token_path,
        shutdown,
        task,
        store,
    })
}

fn resource_routes<K: Kind>(router: Router<AppState>) -> Router<AppState> {
    router
        .route(
            &format!("/v1/{}", K::PLURAL),
            get(crud::list::<K>).post(crud::create::<K>),
        )
        .route(
            &format!("/v1/{}/{{ident}}", K::PLURAL),
            get(crud::get::<K>)
                .put(crud::update::<K>)
                .delete(crud::delete::<K>),
        )
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let mut api = Router::new();
    api = resource_routes::<Site>(api);
    api = resource_routes::<Node>(api);
    api = resource_routes::<Gateway>(api);
    api = resource_routes::<Tenant>(api);
    api = resource_routes::<Model>(api);
    api = resource_routes::<Deployment>(api);
    api = resource_routes::<Workload>(api);
    api = resource_routes::<Volume>(api);
    api = resource_routes::<Cluster>(api);
    api = resource_routes::<Placement>(api);
    // Keys are created by their own handler: the response carries the secret.
    api = api
        .route("/v1/keys", get(crud::list::<Key>).post(tenancy::create_key))
        .route(
            "/v1/keys/{ident}",
            get(crud::get::<Key>)
                .put(crud::update::<Key>)
                .delete(crud::delete::<Key>),
        )
        .route("/v1/keys/{ident}/revoke", post(tenancy::revoke_key))
        .route("/v1/keys/digests", get(tenancy::key_digests))
        .route("/v1/limits/sync", post(tenancy::sync_limits))
        .route("/v1/load", post(autoscale::report_load))
        .route("/v1/site-certificates", post(planes::site_certificate))
        .route("/v1/quotas", get(tenancy::list_quotas))
        .route(
            "/v1/quotas/{tenant}",
            get(tenancy::get_quota).put(tenancy::set_quota),
        )
        .route("/v1/audit", get(tenancy::list_audit))
        .route("/v1/registry/gc", post(registry::collect_garbage))
        .route(
            "/v1/join-tokens",
            get(crud::list::<JoinToken>).post(planes::create_join_token),
        )
        .route(
            "/v1/join-tokens/{ident}",
            get(crud::get::<JoinToken>).delete(crud::delete::<JoinToken>),
        )
        .route("/v1/credentials", get(crud::list::<Credential>))
        .route(
            "/v1/credentials/{ident}",
            get(crud::get::<Credential>).delete(crud::delete::<Credential>),
        )
        .route(
            "/v1/credentials/{ident}/rotate",
            post(planes::rotate_credential),
        )
        .route(
            "/v1/credentials/{ident}/revoke",
            post(planes::revoke_credential),
        )
        .route(
            "/v1/placements/{ident}/status",
            axum::routing::put(tenancy::set_status::<Placement>),
        )
        .route("/v1/service-routes", get(crud::list::<ServiceRoute>))
        .route("/v1/service-routes/{ident}", get(crud::get::<ServiceRoute>))
        .route("/v1/execs", get(crud::list::<Exec>))
        .route(
            "/v1/execs/{ident}",
            get(crud::get::<Exec>).delete(crud::delete::<Exec>),
        )
        .route(
            "/v1/execs/{ident}/status",
            axum::routing::put(tenancy::set_status::<Exec>),
        )
        .route("/v1/workloads/{ident}/exec", post(exec::run))
        .route("/v1/kube/endpoint", get(kube::endpoint))
        .merge(batches::routes(Router::new()))
        .merge(vectors::routes(Router::new()))
        .merge(databases::routes(Router::new()))
        .route(
            "/v1/usage",
            get(tenancy::list_usage).post(tenancy::record_usage),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));

    let openapi = Arc::new(openapi::document());
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        // Authenticated by the join token it consumes.
        .route("/v1/join", post(planes::join))
        .route("/metrics", get(render_metrics))
        .route(
            "/v1/openapi.json",
            get(move || async move { Json(openapi.as_ref().clone()) }),
        )
        .merge(api)
        // Tenant clusters also take their service accounts' tokens.
        .merge(
            Router::new()
                .route("/k8s/{cluster}/{*rest}", axum::routing::any(kube::serve))
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    kube::authenticate,
                )),
        )
        .merge(registry::routes(Router::new()))
        .fallback(|req: Request| async move { ApiError::NoRoute(req.uri().path().to_string()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

impl AppState {
    /// This state with `store` in place of its own (the controllers' is
    /// fenced to their lease).
    fn with_store(&self, store: Store) -> AppState {
        AppState {
            store,
            ..self.clone()
        }
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => ApiError::Unavailable(e.to_string()).into_response(),
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    let mut body = state.metrics.render(state.store.head());
    body.push_str(
        "# HELP atrium_vector_collections_open Vector collections in memory (the rest are paged out).\n\
         # TYPE atrium_vector_collections_open gauge\n",
    );
    body.push_str(&format!(
        "atrium_vector_collections_open {}\n",
        state.vectors.open_count()
    ));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match auth::authenticate(&state.store, req.headers()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// A client-supplied request id is kept when it is short and plain, so
/// callers can correlate; anything else is replaced by our own.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("req_{}", auth::random_token(20)))
}

/// Request ids, metrics and access logs for every request.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(req).await;
    let status = response.status();
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let elapsed = started.elapsed();
    state
        .metrics
        .record(&method, &route, status.as_u16(), elapsed);
    if status.is_server_error() {
        tracing::warn!(request_id = %id, %method, %route, status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(request_id = %id, %method, %route, status = status.as_u16(), micros = elapsed.as_micros() as u64, "request");
    }
    if status == StatusCode::UNAUTHORIZED
        && !response
            .headers()
            .contains_key(axum::http::header::WWW_AUTHENTICATE)
    {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// Keeps the change log to its window until shutdown.
async fn compact_periodically(
    store: Store,
    (kept, every): (i64, std::time::Duration),
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        match store.compact(kept).await {
            Ok(up_to) => tracing::debug!(up_to, "store: change log compacted"),
            Err(e) => tracing::warn!(error = %e, "store: cannot compact the change log"),
        }
    }
}
