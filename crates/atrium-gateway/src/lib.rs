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
pub mod egress;
pub mod http1;
pub mod limits;
mod meter;
pub mod outgoing;
pub mod request;
mod routes;
mod server;
mod upstream;
mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use atrium_client::ControlPlane;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use affinity::Salter;
use http1::Method;
use meter::{usage_of, Meter, UsageBound};
use request::{Kind, ProxyRequest};
use server::{Request, Response, ResponseBody};

pub use routes::Routes;
use routes::{Caller, Target};

/// Largest request body accepted.
const BODY_LIMIT: usize = 8 << 20;

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
}

pub use server::ConnectionLimits;

/// Upper bounds (µs) of the overhead histogram's buckets.
const OVERHEAD_BUCKETS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000,
];

/// A Prometheus histogram of time spent in the gateway, upstream excluded.
#[derive(Default)]
struct OverheadHistogram {
    buckets: [AtomicU64; OVERHEAD_BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl OverheadHistogram {
    fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = OVERHEAD_BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# HELP atrium_gateway_overhead_seconds Time a request spent in the gateway, upstream time excluded.\n# TYPE atrium_gateway_overhead_seconds histogram\n");
        let mut cumulative = 0;
        for (b, n) in OVERHEAD_BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "atrium_gateway_overhead_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / 1e6
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "atrium_gateway_overhead_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "atrium_gateway_overhead_seconds_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "atrium_gateway_overhead_seconds_count {count}");
    }
}

/// (route, status) → (requests, seconds to the response head).
type RequestCounts = std::collections::BTreeMap<(&'static str, u16), (u64, f64)>;

/// Request counters by route and status, for `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: std::sync::Mutex<RequestCounts>,
    overhead: OverheadHistogram,
}

struct Gateway {
    metrics: Arc<Metrics>,
    /// SHA-256 of the `/metrics` bearer token.
    metrics_digest: [u8; 32],
    egress: egress::EgressPolicy,
    routes: Arc<RwLock<Routes>>,
    upstreams: Arc<upstream::Upstreams>,
    usage: Arc<usage::UsageLog>,
    limiter: Arc<limits::Limiter>,
    salter: Salter,
    site: String,
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
        let body = serde_json::to_value(&report).unwrap_or_default();
        let answer = cp
            .call(reqwest::Method::POST, "/v1/limits/sync", Some(&body))
            .await
            .map_err(|e| e.to_string())
            .and_then(|v| {
                serde_json::from_value::<atrium_api::LimitSyncAnswer>(v).map_err(|e| e.to_string())
            });
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
    let upstreams = Arc::new(upstream::Upstreams::default());
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
        metrics: Arc::default(),
        metrics_digest: <sha2::Sha256 as sha2::Digest>::digest(metrics_token.as_bytes()).into(),
        egress: egress::EgressPolicy::new(config.external_allow.clone()),
        routes,
        upstreams,
        usage: usage_log,
        limiter,
        salter: Salter::new(&secret),
        site,
    });
    let task = tokio::spawn(server::serve(
        listener,
        move |request| handle(gateway.clone(), request),
        BODY_LIMIT,
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
    const PROXIED: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
    const READ_ONLY: [&str; 4] = ["/v1/models", "/healthz", "/readyz", "/metrics"];
    let started = Instant::now();
    let path = request.head.path.as_str();
    let method = request.head.method;
    let (route, response) = if let Some(route) = PROXIED.iter().copied().find(|r| *r == path) {
        let response = if method == Method::Post {
            proxy(&g, route, request).await
        } else {
            method_not_allowed("POST")
        };
        (route, response)
    } else if let Some(route) = READ_ONLY.iter().copied().find(|r| *r == path) {
        let response = if !matches!(method, Method::Get | Method::Head) {
            method_not_allowed("GET, HEAD")
        } else {
            match route {
                "/v1/models" => models(&g, request.head.authorization.as_deref()),
                "/healthz" => Response::json(200, &json!({"status": "ok"})),
                "/readyz" => readyz(&g),
                _ => metrics(&g, request.head.authorization.as_deref()),
            }
        };
        (route, response)
    } else {
        (
            "other",
            Response::openai_error(404, "invalid_request_error", None, "no such route"),
        )
    };
    if let Ok(mut m) = g.metrics.requests.lock() {
        let e = m.entry((route, response.status)).or_default();
        e.0 += 1;
        e.1 += started.elapsed().as_secs_f64();
    }
    response
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = Response::openai_error(
        405,
        "invalid_request_error",
        None,
        &format!("method not allowed here: use {allow}"),
    );
    r.header("allow", allow);
    r
}

/// `/metrics` names every tenant's replicas and their load: the provider's
/// metrics token only (`Authorization: Bearer <token>`).
fn metrics(g: &Gateway, authorization: Option<&str>) -> Response {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    use subtle::ConstantTimeEq as _;
    let presented = bearer(authorization).map(|t| sha2::Sha256::digest(t.as_bytes()));
    if !presented.is_some_and(|d| bool::from(d.as_slice().ct_eq(&g.metrics_digest))) {
        let mut r = Response::openai_error(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "/metrics needs the provider's metrics token: `Authorization: Bearer <token>` \
             (in <data-dir>/gateway/metrics.token unless --metrics-token set it)",
        );
        r.header("www-authenticate", "Bearer");
        return r;
    }
    let mut out = String::new();
    out.push_str("# HELP atrium_gateway_requests_total Requests by route and status.\n# TYPE atrium_gateway_requests_total counter\n");
    let mut secs = String::from("# HELP atrium_gateway_request_seconds_total Time to the response head.\n# TYPE atrium_gateway_request_seconds_total counter\n");
    if let Ok(m) = g.metrics.requests.lock() {
        for ((route, status), (n, s)) in m.iter() {
            let _ = writeln!(
                out,
                "atrium_gateway_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
            let _ = writeln!(
                secs,
                "atrium_gateway_request_seconds_total{{route=\"{route}\",status=\"{status}\"}} {s}"
            );
        }
    }
    out.push_str(&secs);
    g.metrics.overhead.render(&mut out);
    if let Ok(r) = g.routes.read() {
        let states = r.replica_states();
        out.push_str("# HELP atrium_gateway_in_flight Requests in flight per replica.\n# TYPE atrium_gateway_in_flight gauge\n");
        for (replica, n, _) in &states {
            let _ = writeln!(out, "atrium_gateway_in_flight{{replica=\"{replica}\"}} {n}");
        }
        out.push_str("# HELP atrium_gateway_breaker_open Whether a replica's circuit breaker is open (skipped after connect failures).\n# TYPE atrium_gateway_breaker_open gauge\n");
        for (replica, _, open) in &states {
            let _ = writeln!(
                out,
                "atrium_gateway_breaker_open{{replica=\"{replica}\"}} {}",
                u8::from(*open)
            );
        }
        let _ = writeln!(out, "# HELP atrium_gateway_synced Whether the route table has its first snapshot.\n# TYPE atrium_gateway_synced gauge\natrium_gateway_synced {}", u8::from(r.synced()));
    }
    Response::new(200, "text/plain; version=0.0.4", out)
}

/// A refused request: the gateway's one error type, answered in OpenAI's
/// shape so SDKs raise their usual exceptions.
struct Refusal {
    status: u16,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl Refusal {
    fn into_response(self) -> Response {
        Response::openai_error(self.status, self.kind, self.code, &self.message)
    }
}

fn refusal(status: u16, kind: &'static str, code: Option<&'static str>, message: &str) -> Refusal {
    Refusal {
        status,
        kind,
        code,
        message: message.to_string(),
    }
}

fn model_not_found(model: &str) -> Response {
    Response::openai_error(
        404,
        "invalid_request_error",
        Some("model_not_found"),
        &format!("The model `{model}` does not exist or you do not have access to it."),
    )
}

fn readyz(g: &Gateway) -> Response {
    let ready = g.routes.read().map(|r| r.synced()).unwrap_or(false);
    if ready {
        Response::json(200, &json!({"status": "ready"}))
    } else {
        Response::openai_error(
            503,
            "server_error",
            None,
            "not yet synchronised with the control plane",
        )
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn authenticate(g: &Gateway, authorization: Option<&str>) -> Result<Caller, Refusal> {
    let token = bearer(authorization).ok_or_else(|| {
        refusal(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Missing API key: send `Authorization: Bearer <key>`.",
        )
    })?;
    let routes = g
        .routes
        .read()
        .map_err(|_| refusal(500, "server_error", None, "route table unavailable"))?;
    routes
        .authenticate(token)
        .map_err(|why| refusal(401, "invalid_request_error", Some("invalid_api_key"), why))
}

fn models(g: &Gateway, authorization: Option<&str>) -> Response {
    let caller = match authenticate(g, authorization) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let names = g
        .routes
        .read()
        .map(|r| r.models_of(&caller.tenant))
        .unwrap_or_default();
    let data: Vec<Value> = names
        .into_iter()
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": caller.tenant}))
        .collect();
    Response::json(200, &json!({"object": "list", "data": data}))
}

/// Where a request is being sent.
enum Dest {
    /// An external upstream, at the addresses the egress policy allowed.
    External(Arc<routes::External>, Vec<std::net::SocketAddr>),
    Replica(Arc<routes::Serving>, InFlight),
}

/// The addresses an external upstream may be reached at, or the refusal
/// to answer: its URL unusable, a scheme the gateway cannot speak, or an
/// address the egress policy refuses.
async fn egress_for(
    g: &Gateway,
    external: &routes::External,
) -> Result<Vec<std::net::SocketAddr>, Refusal> {
    let url = external
        .url
        .as_ref()
        .map_err(|why| refusal(502, "server_error", Some("upstream_unusable"), why))?;
    if url.scheme != atrium_core::url::Scheme::Http {
        return Err(refusal(
            502,
            "server_error",
            Some("upstream_unusable"),
            &format!("{url}: this gateway reaches upstreams over plain http:// only"),
        ));
    }
    external.resolved.get(&g.egress, url).await.map_err(|why| {
        refusal(
            403,
            "invalid_request_error",
            Some("upstream_not_allowed"),
            &why,
        )
    })
}

/// Decrements a replica's in-flight count when the request is over,
/// however it ends.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upstream attempts per request: the first replica and two others, each
/// only after a connect failure (nothing was sent, so nothing can repeat).
const ATTEMPTS: usize = 3;

/// A request without `max_tokens` under a token limit is capped at this
/// (or at the limit, if lower), so its budget can be reserved up front.
pub const DEFAULT_MAX_TOKENS_UNDER_LIMIT: u64 = 4096;

/// An upper bound of the tokens a request can use, and the completion
/// limit to enforce (set when the client gave none). Prompt tokens are
/// bounded by the prompt's bytes (byte-level BPE yields at most one token
/// per byte) plus a per-message template allowance.
pub fn token_estimate(body: &ProxyRequest<'_>, limits_cap: Option<u64>) -> (u64, Option<u64>) {
    const PER_MESSAGE: u64 = 8;
    let prompt = match body.prompt_bytes() {
        (bytes, Some(messages)) => bytes.saturating_add(messages.saturating_mul(PER_MESSAGE)),
        (bytes, None) => bytes,
    };
    let choices = body.get("n").and_then(request::as_u64).unwrap_or(1).max(1);
    let asked = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(request::as_u64);
    let is_embedding = body.kind() == Kind::Embedding;
    let (completion, set) = match (asked, is_embedding) {
        (_, true) => (0, None),
        (Some(m), false) => (m, None),
        (None, false) => {
            let cap = limits_cap
                .unwrap_or(DEFAULT_MAX_TOKENS_UNDER_LIMIT)
                .clamp(1, DEFAULT_MAX_TOKENS_UNDER_LIMIT);
            (cap, Some(cap))
        }
    };
    (
        prompt.saturating_add(completion.saturating_mul(choices)),
        set,
    )
}

fn rate_limited(e: &limits::Exceeded, who: &str) -> Response {
    let message = if e.never_fits() {
        format!(
            "Request too large for the {scope}'s {field} ({limit}): it may use up to {requested} tokens. Lower max_tokens or shorten the prompt.",
            scope = e.scope.word(),
            field = e.kind.field(),
            limit = e.limit,
            requested = e.requested,
        )
    } else {
        format!(
            "Rate limit reached for {scope} {who} on {field}: limit {limit}, used {used}, requested {requested}. Please try again in {secs}s.",
            scope = e.scope.word(),
            field = e.kind.field(),
            limit = e.limit,
            used = e.used,
            requested = e.requested,
            secs = e.retry_after_secs(),
        )
    };
    let body = json!({"error": {"message": message, "type": e.kind.openai_type(), "param": e.kind.field(), "code": "rate_limit_exceeded"}});
    let mut r = Response::json(429, &body);
    r.header("retry-after", e.retry_after_secs().to_string());
    r
}

async fn proxy(g: &Gateway, path: &str, request: Request) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let mut response = proxy_inner(g, path, request, started, &request_id).await;
    response.header("x-request-id", request_id);
    response.header("x-atrium-site", g.site.clone());
    response
}

/// `req_` and 96 random bits in hex, built without the formatting
/// machinery (it is on every request's path).
fn new_request_id() -> String {
    let mut hex = [0u8; 24];
    // 12 bytes into 24 hex digits: the lengths match, so this cannot fail.
    let _ = hex::encode_to_slice(rand::random::<[u8; 12]>(), &mut hex);
    let mut id = String::with_capacity(4 + hex.len());
    id.push_str("req_");
    id.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    id
}

/// The time a request spent in the gateway itself, its upstream excluded.
fn record_overhead(g: &Gateway, response: &mut Response, started: Instant, upstream: Duration) {
    let overhead = started.elapsed().saturating_sub(upstream);
    g.metrics.overhead.observe(overhead);
    response.header("x-atrium-overhead-us", overhead.as_micros().to_string());
}

async fn proxy_inner(
    g: &Gateway,
    path: &str,
    request: Request,
    started: Instant,
    request_id: &str,
) -> Response {
    let caller = match authenticate(g, request.head.authorization.as_deref()) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    if !caller.may_infer {
        return Response::openai_error(
            403,
            "invalid_request_error",
            Some("insufficient_scope"),
            "this key has no inference scope",
        );
    }
    let raw = request.body;
    let kind = match path {
        "/v1/embeddings" => Kind::Embedding,
        "/v1/completions" => Kind::Completion,
        _ => Kind::Chat,
    };
    let parsed = match ProxyRequest::parse(&raw, kind) {
        Ok(parsed) => parsed,
        Err(message) => {
            return Response::openai_error(400, "invalid_request_error", None, &message)
        }
    };
    let model = parsed.model().to_string();
    let mut body = outgoing::Outgoing::new(raw.clone(), parsed);
    let is_embedding = kind == Kind::Embedding;
    let streaming = body.request().streams();
    // Metering needs the token counts of streamed answers too.
    if streaming && !is_embedding {
        body.set("stream_options", &json!({"include_usage": true}));
    }

    // Limits: the key's and the tenant's, admitted together.
    let token_cap = [caller.key_limits, caller.tenant_limits]
        .iter()
        .flat_map(|l| [l.tokens_per_minute, l.tokens_per_day])
        .flatten()
        .min();
    let (estimate, set_max) = match token_cap {
        Some(_) => token_estimate(body.request(), token_cap),
        None => (0, None),
    };
    if let Some(m) = set_max {
        body.set("max_tokens", &m);
    }
    // What the upstream's usage is checked against before it is billed.
    let bound = UsageBound::of(raw.len(), body.request(), set_max);
    let scopes = [
        limits::Scoped {
            kind: limits::ScopeKind::Key,
            id: &caller.key,
            limits: caller.key_limits,
        },
        limits::Scoped {
            kind: limits::ScopeKind::Tenant,
            id: &caller.tenant,
            limits: caller.tenant_limits,
        },
    ];
    let mut ticket = match g.limiter.admit(&scopes, estimate, limits::system_now) {
        Ok(t) => t,
        Err(e) => {
            let who = match e.scope {
                limits::ScopeKind::Key => &caller.key,
                limits::ScopeKind::Tenant => &caller.tenant,
            };
            return rate_limited(&e, who);
        }
    };

    // Routing: tenant-salted prefix affinity over the ready replicas.
    let salt = g.salter.tenant(&caller.tenant);
    let affinity = salt.affinity_key(body.request().prompt_prefix());
    let mut tried: Vec<String> = Vec::new();
    let mut upstream_time = Duration::ZERO;
    let mut encoded: Option<Bytes> = None;
    let (upstream, replica_name, in_flight) = loop {
        let target = match g
            .routes
            .read()
            .map(|r| r.target(&caller.tenant, &model, affinity, &tried))
        {
            Ok(Some(t)) => t,
            Ok(None) => return model_not_found(&model),
            Err(_) => {
                return Response::openai_error(500, "server_error", None, "route table unavailable")
            }
        };
        let dest = match target {
            Target::External(external) => {
                let addrs = match egress_for(g, &external).await {
                    Ok(a) => a,
                    Err(refusal) => return refusal.into_response(),
                };
                body.set("model", &external.model);
                // A shared upstream's cache must not be steered by a client.
                body.remove("cache_salt");
                Dest::External(external, addrs)
            }
            Target::Replica {
                replica,
                takes_cache_salt,
            } => {
                if takes_cache_salt && !is_embedding {
                    body.set("cache_salt", &salt.hex);
                } else {
                    // Nothing upstream may read a salt the client chose.
                    body.remove("cache_salt");
                }
                replica.outstanding.fetch_add(1, Ordering::Relaxed);
                let in_flight = InFlight(replica.outstanding.clone());
                Dest::Replica(replica, in_flight)
            }
            Target::NoneReady { deployment, state } => {
                let message = if tried.is_empty() {
                    format!("deployment `{deployment}` has no ready replica yet ({state}); retry shortly")
                } else {
                    format!(
                        "no replica of `{deployment}` could be reached ({} tried)",
                        tried.len()
                    )
                };
                return Response::openai_error(
                    503,
                    "server_error",
                    Some("no_ready_replica"),
                    &message,
                );
            }
        };
        let text = encoded.get_or_insert_with(|| body.encode()).clone();
        let peer = match &dest {
            Dest::External(external, addrs) => upstream::Peer {
                pool: &external.pool,
                authority: &external.authority,
                prefix: external.url.as_ref().map_or("", |u| u.path.as_str()),
                addrs,
            },
            Dest::Replica(replica, _) => upstream::Peer {
                pool: &replica.id,
                authority: &replica.address.authority,
                prefix: &replica.address.prefix,
                addrs: &[],
            },
        };
        let sent = Instant::now();
        let result = g.upstreams.post(&peer, path, request_id, &text).await;
        upstream_time += sent.elapsed();
        let (replica_name, replica) = match dest {
            Dest::External(..) => ("external".to_string(), None),
            Dest::Replica(replica, in_flight) => (replica.name.clone(), Some((replica, in_flight))),
        };
        match (result, replica) {
            (Ok(r), Some((replica, in_flight))) => {
                replica.breaker.success();
                break (r, replica_name, Some(in_flight));
            }
            (Ok(r), None) => break (r, replica_name, None),
            (Err(e), Some((replica, _))) if e.is_connect() && tried.len() + 1 < ATTEMPTS => {
                replica.breaker.failure();
                tracing::warn!(replica = %replica_name, error = %e, "gateway: replica unreachable; trying another");
                tried.push(replica.id.clone());
            }
            (Err(e), replica) => {
                if let Some((replica, _)) = replica {
                    replica.breaker.failure();
                }
                return Response::openai_error(
                    502,
                    "server_error",
                    None,
                    &format!("replica {replica_name} unreachable: {e}"),
                );
            }
        }
    };
    let status = upstream.head.status;
    let content_type = upstream.head.content_type.clone();
    let mut upstream_body = upstream.body;
    let mut after_sent: Option<server::AfterSent> = None;
    let body = if streaming && (200..300).contains(&status) {
        let (tx, rx) = mpsc::channel::<Bytes>(32);
        let meter = Meter::new(
            g,
            caller.tenant.clone(),
            model.clone(),
            &replica_name,
            request_id,
            bound,
        );
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let mut ticket = ticket;
            let mut line = Vec::new();
            let mut metered = false;
            let mut client_gone = false;
            while let Some(chunk) = upstream_body.chunk().await {
                let Ok(chunk) = chunk else { break };
                // Look for the usage chunk while passing every byte on as is;
                // it is metered before it is passed on.
                for b in chunk.iter() {
                    if *b == b'\n' {
                        if let Some(data) = line.strip_prefix(b"data: ") {
                            if let Some(reported) = usage_of(data) {
                                if !metered {
                                    metered = true;
                                    meter.record(reported, &mut ticket);
                                }
                            }
                        }
                        line.clear();
                    } else {
                        line.push(*b);
                    }
                }
                // A client that hangs up mid-stream is still billed for
                // what the replica computes: keep reading to the usage
                // chunk (the replica finishes the sequence either way).
                if !client_gone && tx.send(chunk).await.is_err() {
                    client_gone = true;
                }
            }
        });
        ResponseBody::Stream(rx)
    } else {
        let sent = Instant::now();
        let bytes = upstream_body.collect().await;
        upstream_time += sent.elapsed();
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                return Response::openai_error(
                    502,
                    "server_error",
                    None,
                    &format!("replica {replica_name} failed: {e}"),
                )
            }
        };
        drop(in_flight);
        // Metered the moment the answer has been handed to the kernel,
        // before the next request on the connection is read (see
        // `Response::after_sent`): reading the usage, spooling the record
        // and settling the limits no longer delay the answer.
        let meter = Meter::new(g, caller.tenant, model, &replica_name, request_id, bound);
        let answer = bytes.clone();
        after_sent = Some(Box::new(move || {
            if (200..300).contains(&status) {
                if let Some(reported) = usage_of(&answer) {
                    meter.record(reported, &mut ticket);
                }
            }
            drop(ticket);
        }));
        ResponseBody::Full(bytes)
    };
    let mut response = Response {
        status,
        headers: Vec::with_capacity(8),
        body,
        after_sent,
    };
    if let Some(ct) = content_type {
        response.header("content-type", ct);
    }
    response.header("x-atrium-replica", replica_name);
    record_overhead(g, &mut response, started, upstream_time);
    response
}

/// How long the usage shipper waits to fill a batch.
pub const USAGE_FLUSH: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(body: Value, cap: Option<u64>) -> (u64, Option<u64>) {
        let text = body.to_string();
        let kind = if body.get("input").is_some() {
            Kind::Embedding
        } else if body.get("prompt").is_some() {
            Kind::Completion
        } else {
            Kind::Chat
        };
        token_estimate(&ProxyRequest::parse(text.as_bytes(), kind).unwrap(), cap)
    }

    #[test]
    fn estimates_bound_prompt_and_completion() {
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "n": 2});
        assert_eq!(estimate(chat, Some(100)), (5 + 8 + 20, None));
        let open = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(estimate(open.clone(), Some(50)), (2 + 8 + 50, Some(50)));
        assert_eq!(
            estimate(open, Some(1_000_000)),
            (
                10 + DEFAULT_MAX_TOKENS_UNDER_LIMIT,
                Some(DEFAULT_MAX_TOKENS_UNDER_LIMIT)
            )
        );
        let embed = json!({"model": "e", "input": ["abc", "de"]});
        assert_eq!(estimate(embed, Some(10)), (5, None));
        // Parts, multi-byte text (counted in bytes) and
        // `max_completion_tokens` before `max_tokens`.
        let parts = json!({"model": "m", "max_completion_tokens": 3, "max_tokens": 100,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "é"}, "ab"]}]});
        assert_eq!(estimate(parts, None), (2 + 2 + 8 + 3, None));
        // Text nested past any OpenAI shape still counts.
        let deep = json!({"model": "m", "max_tokens": 1, "prompt": [[[[["abcdef"]]]]]});
        assert_eq!(estimate(deep, None), (6 + 1, None));
    }
}
