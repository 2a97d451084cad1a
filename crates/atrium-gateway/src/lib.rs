//! Atrium's data plane: the OpenAI-compatible gateway tenants call.
//!
//! It holds, in memory, the digests of every tenant key, every deployment
//! and every replica, fed by the control plane's watch streams (so a revoked
//! key stops working as soon as the revocation is committed). A request is
//! authenticated against the digest cache, its `model` is resolved among the
//! caller's own deployments only (another tenant's deployment is
//! indistinguishable from a missing one: 404 `model_not_found`), sent to the
//! ready replica its tenant-salted prompt prefix prefers (unless busier
//! than the least loaded), admitted against the key's and tenant's limits,
//! streamed back without buffering, and metered through an on-disk spool
//! that is shipped to the control plane in idempotent batches. The gateway
//! never touches the store.

pub mod affinity;
mod batch_runner;
pub mod egress;
mod embed_text;
mod forward;
pub mod http1;
pub mod limits;
mod link;
mod load;
mod meter;
mod metrics;
pub mod outgoing;
mod peer_listener;
mod peers;
mod proxy;
mod refusal;
pub mod request;
mod routes;
mod server;
mod site_choice;
mod tenant_api;
mod upstream;
mod usage;
mod usage_rollup;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use atrium_client::ControlPlane;
use serde::Serialize;

use affinity::Salter;
use http1::Method;
use refusal::Refusal;
use server::{Request, Response};

pub use proxy::{token_estimate, DEFAULT_MAX_TOKENS_UNDER_LIMIT};
use routes::Caller;
pub use routes::Routes;

/// The paths proxied to a deployment's replicas (and forwarded to other
/// sites).
const PROXIED: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Largest request body accepted.
const BODY_LIMIT: usize = 8 << 20;

/// The body limit for `path`: a Batch API file upload may be as large as
/// a file may be (and its multipart framing).
fn body_limit(path: &str) -> usize {
    if path == "/v1/files" {
        usize::try_from(atrium_core::batch::MAX_FILE_BYTES + (64 << 10)).unwrap_or(BODY_LIMIT)
    } else {
        BODY_LIMIT
    }
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway's site credential (control plane, name, site), and the
    /// file it is kept in: it reaches its site's routing and usage only.
    /// Its site is the one named in response headers and usage.
    pub credential: atrium_client::CredentialFile,
    pub credential_path: PathBuf,
    pub listen: SocketAddr,
    /// Where the usage spool and the affinity secret live.
    pub data_dir: PathBuf,
    /// The secret tenant salts derive from; the gateways of a site share
    /// it (`ATRIUM_GATEWAY_SECRET`). Read from, or created in,
    /// `<data_dir>/gateway.secret` when absent.
    pub secret: Option<String>,
    /// Ranges external upstreams may be in although internal (see
    /// `egress`).
    pub external_allow: Vec<egress::Cidr>,
    /// The bearer token `/metrics` requires. Read from, or created in,
    /// `<data_dir>/metrics.token` when absent.
    pub metrics_token: Option<String>,
    /// Connection caps and the idle timeout.
    pub connections: ConnectionLimits,
    /// How long a request waits for a replica to start before it is
    /// refused with 503 and `Retry-After`.
    pub hold_timeout: Duration,
    /// Where other sites' gateways forward requests to (mutually
    /// authenticated TLS), and the address they are told to use; none:
    /// this gateway takes no forwarded requests (it still forwards).
    pub peer_listen: Option<SocketAddr>,
    pub peer_address: Option<SocketAddr>,
}

/// `GatewayConfig::hold_timeout` unless set: an embedded model starts in
/// seconds, a large one on a cold node can take a minute.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(60);

pub use server::ConnectionLimits;

struct Gateway {
    metrics: metrics::Metrics,
    /// SHA-256 of the `/metrics` bearer token.
    metrics_digest: [u8; 32],
    egress: egress::EgressPolicy,
    routes: Arc<RwLock<Routes>>,
    upstreams: Arc<upstream::Upstreams>,
    usage: Arc<usage::UsageLog>,
    limiter: Arc<limits::Limiter>,
    salter: Salter,
    site: String,
    /// How long a request waits for a replica to start.
    hold_timeout: Duration,
    /// Rung when a request is held: the load report goes at once.
    load_wake: Arc<tokio::sync::Notify>,
    /// The control plane, for the Batch API's files and batches.
    cp: ControlPlane,
    /// The other sites' gateways.
    peers: Arc<peers::Peers>,
}

/// A started gateway.
pub struct RunningGateway {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningGateway {
    pub fn abort(self) {
        self.task.abort();
        for t in self.background {
            t.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "the gateway runs with its site credential only (atrg_…), never the provider's admin \
         token or a tenant key: join with `atrium gateway join --join-token <token>`"
    )]
    NotAGatewayCredential,
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("the peer listener {0} has no address peers can use: give --peer-address")]
    PeerAddress(SocketAddr),
    #[error("gateway data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
}

/// The configured secret, or the one kept in the data directory (created
/// on first start, 0600).
fn load_secret(config: &GatewayConfig) -> Result<Vec<u8>, GatewayError> {
    if let Some(s) = &config.secret {
        return Ok(s.as_bytes().to_vec());
    }
    let secret = load_or_create(&config.data_dir.join("gateway.secret"), || {
        format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        )
    })?;
    Ok(secret.into_bytes())
}

/// The text of a small file in the data directory, created (0600) with
/// `make()` on first start.
fn load_or_create(
    path: &std::path::Path,
    make: impl FnOnce() -> String,
) -> Result<String, GatewayError> {
    let err = |e| GatewayError::DataDir(path.to_path_buf(), e);
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let value = make();
            atrium_client::write_private(path, value.as_bytes()).map_err(err)?;
            Ok(value)
        }
    }
}

/// Saves the route table (0600: it holds key digests) within a second of
/// any change, off the request thread.
async fn save_routes(routes: Arc<RwLock<Routes>>, path: PathBuf) {
    let mut saved_version = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let snapshot = match routes.read() {
            Ok(r) if r.version() != saved_version => {
                saved_version = r.version();
                serde_json::to_vec(&r.save())
            }
            _ => continue,
        };
        let Ok(bytes) = snapshot else { continue };
        let target = path.clone();
        let written =
            tokio::task::spawn_blocking(move || atrium_client::write_private(&target, &bytes))
                .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(path = %path.display(), "gateway: cannot save the route table");
            saved_version = 0;
        }
    }
}

/// How often a gateway reports its admissions to the site-wide counter and
/// learns the others' (see `limits.rs` for the overshoot this allows).
pub const LIMIT_SYNC: Duration = Duration::from_millis(200);

fn scope_name(scope: &(limits::ScopeKind, String)) -> String {
    format!("{}:{}", scope.0.word(), scope.1)
}

fn parse_scope(name: &str) -> Option<(limits::ScopeKind, String)> {
    let (kind, id) = name.split_once(':')?;
    let kind = match kind {
        "key" => limits::ScopeKind::Key,
        "tenant" => limits::ScopeKind::Tenant,
        _ => return None,
    };
    Some((kind, id.to_string()))
}

/// Reports admissions to the control plane's ledger and takes in the other
/// gateways' counts, forever. While the control plane is away, deltas
/// accumulate and go with the next report; the last known counts stand.
async fn sync_limits(
    cp: ControlPlane,
    limiter: Arc<limits::Limiter>,
    gateway: String,
    site: String,
) {
    loop {
        tokio::time::sleep(LIMIT_SYNC).await;
        let deltas = limiter.take_deltas();
        let report = atrium_api::LimitSync {
            gateway: gateway.clone(),
            site: site.clone(),
            scopes: deltas
                .iter()
                .map(|d| atrium_api::ScopeDelta {
                    scope: scope_name(&d.scope),
                    requests: d.requests,
                    tokens: d.tokens,
                })
                .collect(),
        };
        let answer = cp
            .request::<_, atrium_api::LimitSyncAnswer>(
                reqwest::Method::POST,
                "/v1/limits/sync",
                Some(&report),
            )
            .await;
        match answer {
            Ok(a) => {
                let remote = a
                    .scopes
                    .iter()
                    .filter_map(|s| {
                        Some((
                            parse_scope(&s.scope)?,
                            limits::Remote {
                                requests_minute: s.requests_minute,
                                tokens_minute: s.tokens_minute,
                                tokens_day: s.tokens_day,
                            },
                        ))
                    })
                    .collect();
                limiter.apply_sync(a.gateways, &remote, limits::system_now());
            }
            Err(e) => {
                tracing::debug!(error = %e, "gateway: cannot sync limits; retrying");
                limiter.restore_deltas(deltas);
            }
        }
    }
}

/// Binds, starts following the control plane and serving.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, GatewayError> {
    if atrium_core::plane::Plane::of_token(&config.credential.token)
        != Some(atrium_core::plane::Plane::Gateway)
    {
        return Err(GatewayError::NotAGatewayCredential);
    }
    let site = config.credential.site.clone();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| GatewayError::Listen(config.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| GatewayError::Listen(config.listen, e))?;
    let secret = load_secret(&config)?;
    let metrics_token = match &config.metrics_token {
        Some(t) => t.clone(),
        None => load_or_create(&config.data_dir.join("metrics.token"), || {
            format!("atrmet_{:032x}", rand::random::<u128>())
        })?,
    };
    let usage_log = Arc::new(
        usage::UsageLog::open(&config.data_dir)
            .map_err(|e| GatewayError::DataDir(config.data_dir.clone(), e))?,
    );
    let cp = ControlPlane::with_credential(&config.credential, &config.credential_path);
    let routes = Arc::new(RwLock::new(Routes::default()));
    // The table saved by the last run: served until the control plane
    // answers, so a restart during an outage keeps serving — with the
    // revocations it knew of.
    let saved_path = config.data_dir.join("routes.json");
    if let Some(saved) = std::fs::read(&saved_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<routes::SavedRoutes>(&b).ok())
    {
        if let Ok(mut r) = routes.write() {
            r.restore(saved);
            tracing::info!(
                "gateway: serving the saved route table until the control plane answers"
            );
        }
    }
    let mut background = routes::follow(cp.clone(), routes.clone());
    background.push(tokio::spawn(save_routes(routes.clone(), saved_path)));
    background.push(tokio::spawn(usage::ship(cp.clone(), usage_log.clone())));
    let limiter = Arc::new(limits::Limiter::default());
    let gateway_id = load_or_create(&config.data_dir.join("gateway.id"), || {
        format!("gw_{:024x}", rand::random::<u128>() >> 32)
    })?;
    background.push(tokio::spawn(sync_limits(
        cp.clone(),
        limiter.clone(),
        gateway_id.clone(),
        site.clone(),
    )));
    let load_wake = Arc::new(tokio::sync::Notify::new());
    background.push(tokio::spawn(load::report(
        cp.clone(),
        routes.clone(),
        load_wake.clone(),
        gateway_id,
        site.clone(),
    )));
    {
        let limiter = limiter.clone();
        background.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                limiter.sweep(limits::system_now());
            }
        }));
    }
    let peer_listener = match config.peer_listen {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| GatewayError::Listen(at, e))?;
            let bound = l.local_addr().map_err(|e| GatewayError::Listen(at, e))?;
            let advertised = config.peer_address.unwrap_or(bound);
            if advertised.ip().is_unspecified() || advertised.port() == 0 {
                return Err(GatewayError::PeerAddress(bound));
            }
            Some((l, advertised))
        }
        None => None,
    };
    let peers = Arc::new(peers::Peers::new(
        config.credential.name.clone(),
        site.clone(),
        peer_listener.as_ref().map(|(_, a)| *a),
    ));
    background.push(tokio::spawn(peers::follow(cp.clone(), peers.clone())));
    background.push(tokio::spawn(peers::certify(cp.clone(), peers.clone())));
    let upstreams = Arc::new(upstream::Upstreams::default());
    background.push(tokio::spawn(peers::probe(peers.clone(), upstreams.clone())));
    {
        let routes = routes.clone();
        background.push(tokio::spawn(peers::record(
            cp.clone(),
            peers.clone(),
            move || {
                routes
                    .read()
                    .map(|r| r.replica_states().iter().map(|(_, n, _)| n).sum())
                    .unwrap_or(0)
            },
        )));
    }
    {
        let upstreams = upstreams.clone();
        background.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                upstreams.sweep();
            }
        }));
    }
    let gateway = Arc::new(Gateway {
        metrics: metrics::Metrics::default(),
        metrics_digest: <sha2::Sha256 as sha2::Digest>::digest(metrics_token.as_bytes()).into(),
        egress: egress::EgressPolicy::new(config.external_allow.clone()),
        routes,
        upstreams,
        usage: usage_log,
        limiter,
        salter: Salter::new(&secret),
        site,
        hold_timeout: config.hold_timeout,
        load_wake,
        cp: cp.clone(),
        peers,
    });
    if let Some((listener, advertised)) = peer_listener {
        tracing::info!(%advertised, "gateway: taking forwarded requests from other sites");
        background.push(tokio::spawn(peer_listener::serve(
            listener,
            gateway.clone(),
        )));
    }
    background.push(tokio::spawn(batch_runner::run(gateway.clone(), cp)));
    let task = tokio::spawn(server::serve(
        listener,
        move |request| handle(gateway.clone(), request),
        body_limit,
        server::Timeouts {
            idle: config.connections.idle_timeout,
            ..server::Timeouts::default()
        },
        config.connections,
    ));
    tracing::info!(%addr, "gateway listening");
    Ok(RunningGateway {
        addr,
        task,
        background,
    })
}

/// The gateway's routes; every answer is counted by route and status, with
/// the time to the response head (streams continue after it).
async fn handle(g: Arc<Gateway>, request: Request) -> Response {
    const READ_ONLY: [&str; 4] = ["/v1/models", "/healthz", "/readyz", "/metrics"];
    let started = Instant::now();
    let path = request.head.path.as_str();
    let method = request.head.method;
    let authorization = request.head.authorization.as_deref();
    let (route, answer) = if let Some(route) = PROXIED.iter().copied().find(|r| *r == path) {
        let answer = if method == Method::Post {
            Ok(proxy::proxy(&g, route, request, proxy::Origin::Tenant).await)
        } else {
            Err(Refusal::MethodNotAllowed { allow: "POST" })
        };
        (route, answer)
    } else if let Some(route) = READ_ONLY.iter().copied().find(|r| *r == path) {
        let answer = if !matches!(method, Method::Get | Method::Head) {
            Err(Refusal::MethodNotAllowed { allow: "GET, HEAD" })
        } else {
            match route {
                "/v1/models" => models(&g, authorization),
                "/healthz" => Ok(Response::json(200, &Health { status: "ok" })),
                "/readyz" => readyz(&g),
                _ => metrics::token_matches(bearer(authorization), &g.metrics_digest)
                    .map(|()| g.metrics.render(g.routes.read().ok().as_deref())),
            }
        };
        (route, answer)
    } else if let Some(route) = tenant_api::route_of(path) {
        let mut request = request;
        let embedded = if embed_text::carries_text(route) && method == Method::Post {
            embed_text::embed(&g, route, &mut request).await
        } else {
            Ok(())
        };
        match embedded {
            Ok(()) => (route, tenant_api::forward(&g.cp, route, request).await),
            Err(response) => (route, Ok(response)),
        }
    } else if let Some(id) = path.strip_prefix("/v1/models/") {
        let answer = if matches!(method, Method::Get | Method::Head) {
            model(&g, authorization, id)
        } else {
            Err(Refusal::MethodNotAllowed { allow: "GET, HEAD" })
        };
        ("/v1/models/{id}", answer)
    } else {
        ("other", Err(Refusal::NoRoute))
    };
    let response = answer.unwrap_or_else(Refusal::into_response);
    g.metrics.count(route, response.status, started.elapsed());
    response
}

/// `/healthz` and `/readyz`.
#[derive(Serialize)]
struct Health {
    status: &'static str,
}

fn readyz(g: &Gateway) -> Result<Response, Refusal> {
    let ready = g.routes.read().map(|r| r.synced()).unwrap_or(false);
    if ready {
        Ok(Response::json(200, &Health { status: "ready" }))
    } else {
        Err(Refusal::NotReady)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn authenticate(g: &Gateway, authorization: Option<&str>) -> Result<Caller, Refusal> {
    let token = bearer(authorization).ok_or(Refusal::MissingKey)?;
    let routes = g
        .routes
        .read()
        .map_err(|_| Refusal::Internal("route table unavailable"))?;
    routes
        .authenticate(token)
        .map_err(|why| Refusal::InvalidKey(why.to_string()))
}

/// `/v1/models`: the caller's own deployments, as OpenAI lists models.
#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelEntry>,
}

#[derive(Serialize)]
struct ModelEntry {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
}

fn models(g: &Gateway, authorization: Option<&str>) -> Result<Response, Refusal> {
    let caller = authenticate(g, authorization)?;
    let names = g
        .routes
        .read()
        .map(|r| r.models_of(&caller.tenant))
        .unwrap_or_default();
    let data = names
        .into_iter()
        .map(|id| ModelEntry {
            id,
            object: "model",
            created: 0,
            owned_by: caller.tenant.clone(),
        })
        .collect();
    Ok(Response::json(
        200,
        &ModelList {
            object: "list",
            data,
        },
    ))
}

/// `GET /v1/models/{id}`: one of the caller's models. Another tenant's
/// deployment answers exactly as a missing one does.
fn model(g: &Gateway, authorization: Option<&str>, id: &str) -> Result<Response, Refusal> {
    let caller = authenticate(g, authorization)?;
    let known = g
        .routes
        .read()
        .map(|r| r.models_of(&caller.tenant))
        .unwrap_or_default();
    if !known.iter().any(|m| m == id) {
        return Err(Refusal::ModelNotFound(id.to_string()));
    }
    Ok(Response::json(
        200,
        &ModelEntry {
            id: id.to_string(),
            object: "model",
            created: 0,
            owned_by: caller.tenant,
        },
    ))
}

/// How long the usage shipper waits to fill a batch.
pub const USAGE_FLUSH: Duration = Duration::from_millis(200);
