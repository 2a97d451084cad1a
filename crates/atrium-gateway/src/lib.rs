//! Atrium's data plane: the OpenAI-compatible gateway tenants call.
//!
//! It holds, in memory, the digests of every tenant key, every deployment
//! and every replica, fed by the control plane's watch streams (so a revoked
//! key stops working as soon as the revocation is committed). A request is
//! authenticated against the digest cache, its `model` is resolved among the
//! caller's own deployments only (another tenant's deployment is
//! indistinguishable from a missing one: 404 `model_not_found`), sent to the
//! ready replica with the fewest requests in flight, streamed back without
//! buffering, and metered; usage is shipped to the control plane in batches.
//! The gateway never touches the store.

mod routes;
mod usage;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use atrium_api::UsageRecordView;
use atrium_client::ControlPlane;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub use routes::Routes;
use routes::{Caller, Target};

/// Largest request body accepted.
const BODY_LIMIT: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub server: String,
    pub token: String,
    pub listen: SocketAddr,
    /// The site this gateway serves, named in response headers and usage.
    pub site: String,
}

/// Request counters by route and status, for `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: std::sync::Mutex<std::collections::BTreeMap<(String, u16), (u64, f64)>>,
}

#[derive(Clone)]
struct Gateway {
    metrics: Arc<Metrics>,
    routes: Arc<RwLock<Routes>>,
    http: reqwest::Client,
    usage: mpsc::UnboundedSender<UsageRecordView>,
    site: HeaderValue,
    site_name: String,
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
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// Binds, starts following the control plane and serving.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, GatewayError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| GatewayError::Listen(config.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| GatewayError::Listen(config.listen, e))?;
    let cp = ControlPlane::new(&config.server, &config.token);
    let routes = Arc::new(RwLock::new(Routes::default()));
    let mut background = routes::follow(cp.clone(), routes.clone());
    let (usage_tx, usage_rx) = mpsc::unbounded_channel();
    background.push(tokio::spawn(usage::ship(cp, usage_rx)));
    let gateway = Gateway {
        metrics: Arc::default(),
        routes,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new()),
        usage: usage_tx,
        site: HeaderValue::from_str(&config.site).unwrap_or(HeaderValue::from_static("unknown")),
        site_name: config.site.clone(),
    };
    let app = router(gateway);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "gateway stopped");
        }
    });
    tracing::info!(%addr, "gateway listening");
    Ok(RunningGateway {
        addr,
        task,
        background,
    })
}

fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/embeddings", post(proxy))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                "no such route",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            observe,
        ))
        .with_state(gateway)
}

/// Counts every request by route and status, with the time to the
/// response head (streams continue after it).
async fn observe(State(g): State<Gateway>, req: Request, next: axum::middleware::Next) -> Response {
    let route = req.uri().path().to_string();
    let route = if route.starts_with("/v1/") || route == "/healthz" || route == "/readyz" {
        route
    } else {
        "other".into()
    };
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    if let Ok(mut m) = g.metrics.requests.lock() {
        let e = m.entry((route, response.status().as_u16())).or_default();
        e.0 += 1;
        e.1 += started.elapsed().as_secs_f64();
    }
    response
}

async fn metrics(State(g): State<Gateway>) -> Response {
    use std::fmt::Write as _;
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
    if let Ok(r) = g.routes.read() {
        out.push_str("# HELP atrium_gateway_in_flight Requests in flight per replica.\n# TYPE atrium_gateway_in_flight gauge\n");
        for (replica, n) in r.in_flight() {
            let _ = writeln!(out, "atrium_gateway_in_flight{{replica=\"{replica}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP atrium_gateway_synced Whether the route table has its first snapshot.\n# TYPE atrium_gateway_synced gauge\natrium_gateway_synced {}", u8::from(r.synced()));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A refused request: the gateway's one error type, answered in OpenAI's
/// shape so SDKs raise their usual exceptions.
struct Refusal {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

fn refusal(
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: &str,
) -> Refusal {
    Refusal {
        status,
        kind,
        code,
        message: message.to_string(),
    }
}

fn openai_error(
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: &str,
) -> Response {
    refusal(status, kind, code, message).into_response()
}

fn model_not_found(model: &str) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("model_not_found"),
        &format!("The model `{model}` does not exist or you do not have access to it."),
    )
}

async fn readyz(State(g): State<Gateway>) -> Response {
    let ready = g.routes.read().map(|r| r.synced()).unwrap_or(false);
    if ready {
        Json(json!({"status": "ready"})).into_response()
    } else {
        openai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            None,
            "not yet synchronised with the control plane",
        )
    }
}

fn authenticate(g: &Gateway, headers: &HeaderMap) -> Result<Caller, Refusal> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            refusal(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Missing API key: send `Authorization: Bearer <key>`.",
            )
        })?;
    let routes = g.routes.read().map_err(|_| {
        refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "route table unavailable",
        )
    })?;
    routes.authenticate(token).map_err(|why| {
        refusal(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            why,
        )
    })
}

async fn models(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    let caller = match authenticate(&g, &headers) {
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
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Decrements a replica's in-flight count when the request is over,
/// however it ends.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn usage_of(v: &Value) -> Option<(i64, i64)> {
    let u = v.get("usage")?;
    Some((
        u["prompt_tokens"].as_i64().unwrap_or(0),
        u["completion_tokens"].as_i64().unwrap_or(0),
    ))
}

async fn proxy(State(g): State<Gateway>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let caller = match authenticate(&g, &headers) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    if !caller.may_infer {
        return openai_error(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            Some("insufficient_scope"),
            "this key has no inference scope",
        );
    }
    let bytes = match axum::body::to_bytes(req.into_body(), BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return openai_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                &format!("request body over {BODY_LIMIT} bytes"),
            )
        }
    };
    let mut body: Value = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Value::Object(m),
        Ok(_) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "the body must be a JSON object",
            )
        }
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                &format!("invalid JSON body: {e}"),
            )
        }
    };
    let Some(model) = body
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("missing_model"),
            "`model` is required: name one of your deployments",
        );
    };
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // Metering needs the token counts of streamed answers too.
    if streaming && path != "/v1/embeddings" {
        body["stream_options"] = json!({"include_usage": true});
    }
    let target = match g.routes.read().map(|r| r.target(&caller.tenant, &model)) {
        Ok(Some(t)) => t,
        Ok(None) => return model_not_found(&model),
        Err(_) => {
            return openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                "route table unavailable",
            )
        }
    };
    let (base, replica_name, in_flight) = match target {
        Target::External { url, model } => {
            body["model"] = Value::String(model);
            (url, "external".to_string(), None)
        }
        Target::Replica {
            endpoint,
            name,
            outstanding,
        } => {
            outstanding.fetch_add(1, Ordering::Relaxed);
            (endpoint, name, Some(InFlight(outstanding)))
        }
        Target::NoneReady { deployment, state } => {
            return openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("no_ready_replica"),
                &format!(
                    "deployment `{deployment}` has no ready replica yet ({state}); retry shortly"
                ),
            )
        }
    };
    let upstream = g
        .http
        .post(format!("{}{path}", base.trim_end_matches('/')))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await;
    let upstream = match upstream {
        Ok(r) => r,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_GATEWAY,
                "server_error",
                None,
                &format!("replica {replica_name} unreachable: {e}"),
            )
        }
    };
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let meter = Meter {
        usage: g.usage.clone(),
        tenant: caller.tenant.clone(),
        deployment: model.clone(),
        site: g.site_name.clone(),
        replica: replica_name.clone(),
    };
    let mut response = if streaming && status.is_success() {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
        let mut stream = upstream.bytes_stream();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let mut line = Vec::new();
            let mut counted = None;
            while let Some(chunk) = stream.next().await {
                let Ok(chunk) = chunk else { break };
                // Look for the usage chunk while passing every byte on as is.
                for b in chunk.iter() {
                    if *b == b'\n' {
                        if let Some(data) = line.strip_prefix(b"data: ") {
                            if let Ok(v) = serde_json::from_slice::<Value>(data) {
                                counted = usage_of(&v).or(counted);
                            }
                        }
                        line.clear();
                    } else {
                        line.push(*b);
                    }
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    break;
                }
            }
            if let Some((p, c)) = counted {
                meter.record(p, c);
            }
        });
        Response::new(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    } else {
        let bytes = match upstream.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return openai_error(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    None,
                    &format!("replica {replica_name} failed: {e}"),
                )
            }
        };
        drop(in_flight);
        if status.is_success() {
            if let Some((p, c)) = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .as_ref()
                .and_then(usage_of)
            {
                meter.record(p, c);
            }
        }
        Response::new(Body::from(bytes))
    };
    *response.status_mut() = status;
    let h = response.headers_mut();
    if let Some(ct) = content_type {
        h.insert(header::CONTENT_TYPE, ct);
    }
    h.insert("x-atrium-site", g.site.clone());
    if let Ok(v) = HeaderValue::from_str(&replica_name) {
        h.insert("x-atrium-replica", v);
    }
    response
}

struct Meter {
    usage: mpsc::UnboundedSender<UsageRecordView>,
    tenant: String,
    deployment: String,
    site: String,
    replica: String,
}

impl Meter {
    fn record(self, prompt_tokens: i64, completion_tokens: i64) {
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let _ = self.usage.send(UsageRecordView {
            at,
            tenant: self.tenant,
            deployment: self.deployment,
            site: self.site,
            replica: self.replica,
            prompt_tokens,
            completion_tokens,
        });
    }
}

/// How long the usage shipper waits to fill a batch.
pub const USAGE_FLUSH: Duration = Duration::from_millis(500);
