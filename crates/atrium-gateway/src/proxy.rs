//! One proxied request (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`), in three phases: `admit` (the key, the body, the
//! key's and tenant's limits), `send` (the route, with retries on connect
//! failures to other replicas), and `respond` (the answer passed on as it
//! comes, metered). Each phase refuses with a [`Refusal`], rendered in one
//! place.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atrium_core::deployment::SamplingDefaults;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::affinity::TenantSalt;
use crate::forward;
use crate::limits;
use crate::load;
use crate::meter::{usage_of, Meter, UsageBound};
use crate::outgoing::Outgoing;
use crate::refusal::Refusal;
use crate::request::{self, Kind, ProxyRequest};
use crate::routes::{self, Caller, Target};
use crate::server::{self, Request, Response, ResponseBody};
use crate::upstream;
use crate::Gateway;

/// Where a request came from: a tenant at this gateway, or another
/// site's gateway forwarding one (its site checked by the peer link).
pub enum Origin {
    Tenant,
    Peer {
        ingress: String,
        request_id: Option<String>,
    },
}

/// `route` (a proxied path) for `request`, with its request id and the
/// sites involved: served here, or forwarded to the nearest site the
/// tenant's residency allows.
pub async fn proxy(g: &Gateway, route: &str, request: Request, origin: Origin) -> Response {
    let started = Instant::now();
    let (ingress, request_id) = match origin {
        Origin::Tenant => (None, new_request_id()),
        Origin::Peer {
            ingress,
            request_id,
        } => {
            let id = request_id
                .filter(|id| is_request_id(id))
                .unwrap_or_else(new_request_id);
            (Some(ingress), id)
        }
    };
    let raw = request.body;
    let authorization = request.head.authorization.as_deref();
    let admitted =
        crate::authenticate(g, authorization).and_then(|caller| admit(g, route, &raw, caller));
    let mut serving_site = g.site.clone();
    let mut response = match admitted {
        Ok(mut admitted) => {
            let at = forward::site_for(
                g,
                &admitted.caller.tenant,
                &admitted.model,
                ingress.is_some(),
            )
            .await;
            match at {
                forward::Site::Here => match send(g, route, &mut admitted, &request_id).await {
                    Ok(sent) => respond(g, admitted, sent, &request_id, ingress.as_deref()).await,
                    Err(refusal) => Err(refusal),
                },
                forward::Site::Nowhere(why) => Err(Refusal::NoCompliantSite(why)),
                forward::Site::Peers(gateways) => {
                    let model = std::mem::take(&mut admitted.model);
                    // Admitted again, and metered, where it is served.
                    drop(admitted);
                    forward::forward(
                        g,
                        route,
                        &raw,
                        authorization,
                        &request_id,
                        &gateways,
                        &model,
                    )
                    .await
                    .map(|(response, site, upstream)| {
                        serving_site = site;
                        (response, upstream)
                    })
                }
            }
        }
        Err(refusal) => Err(refusal),
    }
    .map_or_else(Refusal::into_response, |(mut response, upstream_time)| {
        record_overhead(g, &mut response, started, upstream_time);
        response
    });
    response.header("x-request-id", request_id);
    if let Some(j) = g
        .routes
        .read()
        .ok()
        .and_then(|r| r.jurisdiction(&serving_site).map(str::to_string))
    {
        response.header("x-atrium-jurisdiction", j);
    }
    response.header("x-atrium-site", serving_site);
    response.header(
        "x-atrium-ingress-site",
        ingress.unwrap_or_else(|| g.site.clone()),
    );
    response
}

/// An id this gateway could have made (`req_` and 24 hex digits): one a
/// peer passes on is used only in that shape.
fn is_request_id(id: &str) -> bool {
    id.strip_prefix("req_")
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_hexdigit()))
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

/// A request admitted: who asks, what, and the limits' ticket.
struct Admitted<'r> {
    caller: Caller,
    kind: Kind,
    model: String,
    body: Outgoing<'r>,
    streaming: bool,
    /// The output bound the gateway set under a token limit, when the
    /// client set none.
    set_max: Option<u64>,
    /// What the upstream's usage is checked against before it is billed.
    bound: UsageBound,
    ticket: Option<limits::Ticket>,
    /// The Batch API job it runs for, if any: metered as the batch's, and
    /// counted apart so the batch can yield to the tenant's own requests.
    batch: Option<String>,
}

/// Parses and admits `raw` for `caller` against the key's and the
/// tenant's limits (together).
fn admit<'r>(
    g: &Gateway,
    route: &str,
    raw: &'r Bytes,
    caller: Caller,
) -> Result<Admitted<'r>, Refusal> {
    if !caller.may_infer {
        return Err(Refusal::NoInferenceScope);
    }
    let kind = match route {
        "/v1/embeddings" => Kind::Embedding,
        "/v1/completions" => Kind::Completion,
        "/v1/responses" => Kind::Response,
        _ => Kind::Chat,
    };
    let parsed = ProxyRequest::parse(raw, kind).map_err(Refusal::BadRequest)?;
    let model = parsed.model().to_string();
    let mut body = Outgoing::new(raw.clone(), parsed);
    let streaming = body.request().streams();
    // Metering needs the token counts of streamed answers too (a
    // response's stream ends with them anyway).
    if streaming && matches!(kind, Kind::Chat | Kind::Completion) {
        body.set(
            "stream_options",
            &IncludeUsage {
                include_usage: true,
            },
        );
    }
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
        body.set(kind.max_output_field(), &m);
    }
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
    let ticket = g
        .limiter
        .admit(&scopes, estimate, limits::system_now)
        .map_err(|exceeded| {
            let who = match exceeded.scope {
                limits::ScopeKind::Key => caller.key.clone(),
                limits::ScopeKind::Tenant => caller.tenant.clone(),
            };
            Refusal::RateLimited { exceeded, who }
        })?;
    Ok(Admitted {
        caller,
        kind,
        model,
        body,
        streaming,
        set_max,
        bound,
        ticket,
        batch: None,
    })
}

/// A request the gateway makes for a caller (one line of a batch, run as
/// the key that made it; the embedding of a collection's text), answered
/// whole: its status, request id and body. Metered as the caller's (and
/// the batch's, when there is one); a refusal is its answer like any
/// client's.
pub async fn run_whole(
    g: &Gateway,
    route: &str,
    caller: Caller,
    raw: Bytes,
    batch: Option<&str>,
) -> (u16, String, Bytes) {
    let request_id = new_request_id();
    let answered = match admit(g, route, &raw, caller) {
        Ok(mut admitted) => {
            admitted.batch = batch.map(str::to_string);
            match send(g, route, &mut admitted, &request_id).await {
                Ok(sent) => respond(g, admitted, sent, &request_id, None)
                    .await
                    .map(|(r, _)| r),
                Err(refusal) => Err(refusal),
            }
        }
        Err(refusal) => Err(refusal),
    };
    let mut response = answered.unwrap_or_else(Refusal::into_response);
    let body = match std::mem::replace(&mut response.body, ResponseBody::Full(Bytes::new())) {
        ResponseBody::Full(b) => b,
        ResponseBody::Stream(mut rx) => {
            let mut all = Vec::new();
            while let Some(chunk) = rx.recv().await {
                all.extend_from_slice(&chunk);
            }
            Bytes::from(all)
        }
    };
    if let Some(meter) = response.after_sent.take() {
        meter();
    }
    (response.status, request_id, body)
}

/// `"stream_options": {"include_usage": true}`.
#[derive(serde::Serialize)]
struct IncludeUsage {
    include_usage: bool,
}

/// The upstream's answer (its head read), who gave it, and the time spent
/// waiting on upstreams so far.
struct Sent {
    upstream: upstream::Response,
    replica_name: String,
    in_flight: Option<InFlight>,
    upstream_time: Duration,
}

/// Routes the request (tenant-salted prefix affinity over the ready
/// replicas) and sends it; a connect failure, after which nothing was
/// sent, is retried on another replica.
async fn send(
    g: &Gateway,
    route: &str,
    a: &mut Admitted<'_>,
    request_id: &str,
) -> Result<Sent, Refusal> {
    let salt = g.salter.tenant(&a.caller.tenant);
    let affinity = salt.affinity_key(a.body.request().prompt_prefix());
    let mut tried: Vec<String> = Vec::new();
    let mut upstream_time = Duration::ZERO;
    let mut encoded: Option<Bytes> = None;
    let mut held: Option<(load::Counted, Instant)> = None;
    loop {
        let (target, sampling, changes) = {
            let routes = g
                .routes
                .read()
                .map_err(|_| Refusal::Internal("route table unavailable"))?;
            let (target, sampling) = routes
                .target(&a.caller.tenant, &a.model, affinity, &tried)
                .ok_or_else(|| Refusal::ModelNotFound(a.model.clone()))?;
            // Subscribed under the same lock the target was read under, so
            // no replica can come between the two unseen.
            let waits = matches!(target, Target::NoneReady { holds: true, .. }) && tried.is_empty();
            (target, sampling, waits.then(|| routes.replica_changes()))
        };
        if let (Target::NoneReady { load, .. }, Some(mut changes)) = (&target, changes) {
            // No replica yet (scaled to zero, or starting): wait for one,
            // counted as held so the autoscaler starts one now.
            let (_, deadline) = held.get_or_insert_with(|| {
                let counted = load.hold();
                g.load_wake.notify_one();
                (counted, Instant::now() + g.hold_timeout)
            });
            let deadline = *deadline;
            if Instant::now() < deadline {
                let _ = tokio::time::timeout_at(deadline.into(), changes.changed()).await;
                continue;
            }
        }
        held = None;
        // Once: a retry goes to another replica of the same deployment.
        if tried.is_empty() && a.kind != Kind::Embedding {
            fill_sampling(&mut a.body, sampling, a.set_max);
        }
        let request_id_header = match &target {
            Target::Replica {
                takes_request_id: false,
                ..
            } => None,
            _ => Some(request_id),
        };
        let dest = destination(g, a, &salt, target, &tried).await?;
        let text = encoded.get_or_insert_with(|| a.body.encode()).clone();
        let peer = match &dest {
            Dest::External(external, addrs) => upstream::Peer {
                pool: &external.pool,
                authority: &external.authority,
                prefix: external.url.as_ref().map_or("", |u| u.path.as_str()),
                addrs,
                link: None,
            },
            Dest::Replica(replica, _) => upstream::Peer {
                pool: &replica.id,
                authority: &replica.address.authority,
                prefix: &replica.address.prefix,
                addrs: &[],
                link: None,
            },
        };
        let started = Instant::now();
        let result = g
            .upstreams
            .post(&peer, route, request_id_header, &text)
            .await;
        upstream_time += started.elapsed();
        let (replica_name, replica) = match dest {
            Dest::External(..) => ("external".to_string(), None),
            Dest::Replica(replica, in_flight) => (replica.name.clone(), Some((replica, in_flight))),
        };
        let sent = |upstream, in_flight| Sent {
            upstream,
            replica_name: replica_name.clone(),
            in_flight,
            upstream_time,
        };
        match (result, replica) {
            (Ok(r), Some((replica, in_flight))) => {
                replica.breaker.success();
                return Ok(sent(r, Some(in_flight)));
            }
            (Ok(r), None) => return Ok(sent(r, None)),
            (Err(e), Some((replica, _))) if e.is_connect() && tried.len() + 1 < ATTEMPTS => {
                replica.breaker.failure();
                tracing::warn!(replica = %replica_name, error = %e, "gateway: replica unreachable; trying another");
                tried.push(replica.id.clone());
            }
            (Err(e), replica) => {
                if let Some((replica, _)) = replica {
                    replica.breaker.failure();
                }
                return Err(Refusal::Upstream(format!(
                    "replica {replica_name} unreachable: {e}"
                )));
            }
        }
    }
}

/// The deployment's sampling defaults for the fields the client left out
/// or sent as `null` (OpenAI's clients send `null` for "not given"). Its
/// output bound applies where the client set none, within the one the
/// gateway set (`set_max`) to reserve a token limit's budget.
fn fill_sampling(body: &mut Outgoing<'_>, sampling: SamplingDefaults, set_max: Option<u64>) {
    if let (Some(default), None) = (sampling.max_tokens, body.request().max_output()) {
        let bound = set_max.map_or(u64::from(default), |m| m.min(u64::from(default)));
        let field = body.request().kind().max_output_field();
        body.set(field, &bound);
    }
    // (field, default, whether the Responses API has it: it has no
    // penalties, and a stricter upstream would refuse them).
    let fields = [
        ("temperature", sampling.temperature, true),
        ("top_p", sampling.top_p, true),
        ("presence_penalty", sampling.presence_penalty, false),
        ("frequency_penalty", sampling.frequency_penalty, false),
    ];
    let response = body.request().kind() == Kind::Response;
    for (key, default, in_responses) in fields {
        let Some(value) = default.filter(|_| in_responses || !response) else {
            continue;
        };
        if body.request().get(key).is_none_or(|v| v.get() == "null") {
            body.set(key, &value);
        }
    }
}

/// Where `target` sends the request, with the body made right for it: the
/// external model's name, or this tenant's cache salt for a replica (and
/// never a salt the client chose).
async fn destination(
    g: &Gateway,
    a: &mut Admitted<'_>,
    salt: &TenantSalt,
    target: Target,
    tried: &[String],
) -> Result<Dest, Refusal> {
    match target {
        Target::External(external) => {
            let addrs = egress_for(g, &external).await?;
            a.body.set("model", &external.model);
            // A shared upstream's cache must not be steered by a client.
            a.body.remove("cache_salt");
            Ok(Dest::External(external, addrs))
        }
        Target::Replica {
            replica,
            takes_cache_salt,
            load,
            ..
        } => {
            if takes_cache_salt && a.kind != Kind::Embedding {
                a.body.set("cache_salt", &salt.hex);
            } else {
                a.body.remove("cache_salt");
            }
            replica.outstanding.fetch_add(1, Ordering::Relaxed);
            let in_flight = InFlight {
                replica: replica.outstanding.clone(),
                _deployment: if a.batch.is_some() {
                    load.start_batch()
                } else {
                    load.start()
                },
            };
            Ok(Dest::Replica(replica, in_flight))
        }
        Target::NoneReady {
            deployment,
            state,
            holds,
            ..
        } => Err(Refusal::NoReadyReplica(if tried.is_empty() {
            let waited = if holds {
                format!(" after waiting {}s", g.hold_timeout.as_secs())
            } else {
                String::new()
            };
            format!(
                "deployment `{deployment}` has no ready replica{waited} ({state}); retry shortly"
            )
        } else {
            format!(
                "no replica of `{deployment}` could be reached ({} tried)",
                tried.len()
            )
        })),
    }
}

/// Passes the upstream's answer on and meters it: a stream as it comes
/// (the usage chunk read on the way), a full answer once it is in the
/// kernel's hands. Returns the response and the upstream time in all.
async fn respond(
    g: &Gateway,
    a: Admitted<'_>,
    sent: Sent,
    request_id: &str,
    ingress: Option<&str>,
) -> Result<(Response, Duration), Refusal> {
    let Sent {
        upstream,
        replica_name,
        in_flight,
        mut upstream_time,
    } = sent;
    let status = upstream.head.status;
    let content_type = upstream.head.content_type.clone();
    let mut upstream_body = upstream.body;
    let itemised = a.caller.itemised_usage;
    let meter = Meter::new(
        g,
        a.caller.tenant,
        a.model,
        &replica_name,
        request_id,
        a.bound,
    )
    .for_batch(a.batch)
    .itemised(itemised)
    .entered_at(ingress);
    let mut ticket = a.ticket;
    let mut after_sent: Option<server::AfterSent> = None;
    let body = if a.streaming && (200..300).contains(&status) {
        let (tx, rx) = mpsc::channel::<Bytes>(32);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let mut line = Vec::new();
            let mut metered = false;
            let mut chunks = 0u64;
            let mut client_gone = false;
            while let Some(chunk) = upstream_body.chunk().await {
                let Ok(chunk) = chunk else { break };
                // Look for the usage chunk while passing every byte on as is;
                // it is metered before it is passed on.
                for b in chunk.iter() {
                    if *b == b'\n' {
                        if let Some(data) = line.strip_prefix(b"data: ") {
                            if data != b"[DONE]" {
                                chunks += 1;
                            }
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
            if !metered && chunks > 0 {
                meter.record_unreported(chunks, &mut ticket);
            }
        });
        ResponseBody::Stream(rx)
    } else {
        let started = Instant::now();
        let bytes = upstream_body.collect().await;
        upstream_time += started.elapsed();
        let bytes =
            bytes.map_err(|e| Refusal::Upstream(format!("replica {replica_name} failed: {e}")))?;
        drop(in_flight);
        // Metered the moment the answer has been handed to the kernel,
        // before the next request on the connection is read (see
        // `Response::after_sent`): reading the usage, spooling the record
        // and settling the limits no longer delay the answer.
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
    Ok((response, upstream_time))
}

/// The time a request spent in the gateway itself, its upstream excluded.
fn record_overhead(g: &Gateway, response: &mut Response, started: Instant, upstream: Duration) {
    let overhead = started.elapsed().saturating_sub(upstream);
    g.metrics.observe_overhead(overhead);
    response.header("x-atrium-overhead-us", overhead.as_micros().to_string());
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
        .map_err(|why| Refusal::UpstreamUnusable(why.clone()))?;
    if url.scheme != atrium_core::url::Scheme::Http {
        return Err(Refusal::UpstreamUnusable(format!(
            "{url}: this gateway reaches upstreams over plain http:// only"
        )));
    }
    external
        .resolved
        .get(&g.egress, url)
        .await
        .map_err(Refusal::UpstreamNotAllowed)
}

/// Decrements a replica's in-flight count when the request is over,
/// however it ends.
/// A request in flight to a replica: counted against the replica (for
/// routing) and its deployment (for the autoscaler) while it lives.
struct InFlight {
    replica: Arc<AtomicU64>,
    _deployment: load::Counted,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica.fetch_sub(1, Ordering::Relaxed);
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
    let asked = body.max_output();
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn filled(body: Value, set_max: Option<u64>) -> Value {
        let defaults = SamplingDefaults {
            max_tokens: Some(64),
            ..SamplingDefaults::default()
        };
        filled_with(body, set_max, defaults)
    }

    /// What goes upstream for `body` after the deployment's `defaults`,
    /// when the gateway bounded it at `set_max` under a token limit.
    fn filled_with(body: Value, set_max: Option<u64>, defaults: SamplingDefaults) -> Value {
        let kind = if body.get("input").is_some() {
            Kind::Response
        } else {
            Kind::Chat
        };
        let raw = Bytes::from(body.to_string());
        let request = ProxyRequest::parse(&raw, kind).unwrap();
        let mut out = Outgoing::new(raw.clone(), request);
        if let Some(m) = set_max {
            out.set(kind.max_output_field(), &m);
        }
        fill_sampling(&mut out, defaults, set_max);
        serde_json::from_slice(&out.encode()).unwrap()
    }

    /// A response gets the deployment's temperature but never a penalty:
    /// the Responses API has none.
    #[test]
    fn a_response_gets_no_penalty_defaults() {
        let defaults = SamplingDefaults {
            temperature: Some(0.2),
            presence_penalty: Some(1.0),
            ..SamplingDefaults::default()
        };
        let chat = filled_with(json!({"model": "m", "messages": []}), None, defaults);
        assert_eq!(
            (&chat["temperature"], &chat["presence_penalty"]),
            (&json!(0.2), &json!(1.0))
        );
        let response = filled_with(json!({"model": "m", "input": "hi"}), None, defaults);
        assert_eq!(response["temperature"], json!(0.2));
        assert!(response.get("presence_penalty").is_none(), "{response}");
    }

    #[test]
    fn a_deployments_output_bound_fills_only_unbounded_requests_within_the_gateways() {
        let chat = json!({"model": "m", "messages": []});
        assert_eq!(filled(chat.clone(), None)["max_tokens"], 64);
        // Under a token limit the gateway bounded it already: the smaller wins.
        assert_eq!(filled(chat.clone(), Some(4096))["max_tokens"], 64);
        assert_eq!(filled(chat, Some(10))["max_tokens"], 10);
        let asked = json!({"model": "m", "messages": [], "max_tokens": 500});
        assert_eq!(filled(asked, None)["max_tokens"], 500);
        let null = json!({"model": "m", "messages": [], "max_tokens": null});
        assert_eq!(filled(null, None)["max_tokens"], 64);
        let response = json!({"model": "m", "input": "hi"});
        let sent = filled(response, None);
        assert_eq!(sent["max_output_tokens"], 64);
        assert!(sent.get("max_tokens").is_none(), "{sent}");
    }

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
