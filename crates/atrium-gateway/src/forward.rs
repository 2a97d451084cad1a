//! Requests served at another site: which site (the choice in
//! `site_choice`, made from the route table and the peers' probes), and
//! the forward itself — the tenant's request as it came, over the peer
//! link to that site's gateway, which authenticates, admits, routes and
//! meters it as its own, and names this site as its ingress. Its answer
//! is passed back as it comes. A peer that cannot be reached is marked
//! down and the next allowed site is tried at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atrium_core::tenant::Residency;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::load::DeploymentLoad;
use crate::peers::{peer_target, PeerGateway};
use crate::refusal::Refusal;
use crate::routes::Routes;
use crate::server::{Response, ResponseBody};
use crate::site_choice::{allowed, choose, Choice, SiteState};
use crate::Gateway;

enum Decision {
    Here,
    /// These gateways, in order: the nearest allowed ready site's first.
    Forward(Vec<Arc<PeerGateway>>),
    /// Scaled to zero, and this site may not serve it: held (counted, so
    /// the autoscaler starts a replica at an allowed site) until a peer
    /// has one.
    Hold(Arc<DeploymentLoad>),
    NoCompliantSite(String),
}

fn refusal_text(model: &str, residency: Option<&Residency>) -> String {
    let rule = match residency {
        Some(Residency::Only { jurisdictions }) => {
            format!("the tenant's residency ({})", jurisdictions.join(", "))
        }
        Some(Residency::Any) => "the deployment's site list".to_string(),
        None => "the tenant's residency (unknown to this gateway)".to_string(),
    };
    format!(
        "no site that {rule} allows has a ready replica of `{model}` now, and it is not \
         served elsewhere; retry shortly"
    )
}

/// This gateway's own site, as the choice sees it.
fn this_site<'a>(g: &'a Gateway, routes: &'a Routes, ready: bool) -> SiteState<'a> {
    SiteState {
        site: &g.site,
        jurisdiction: routes.jurisdiction(&g.site),
        ready,
        healthy: true,
        rtt_us: 0,
    }
}

/// Where `tenant`'s request for `model` is served, as things stand;
/// `holding`: the request already waits for a replica to start (it keeps
/// waiting while one is coming, after the deployment left zero).
fn decide(g: &Gateway, tenant: &str, model: &str, holding: bool) -> Decision {
    let Ok(routes) = g.routes.read() else {
        return Decision::Here;
    };
    // A model it has not, or an external one: the local path answers.
    let Some(facts) = routes.site_facts(tenant, model) else {
        return Decision::Here;
    };
    let (deployment, sites, ready_here) = (facts.deployment, facts.sites, facts.ready_here);
    let Some(residency) = routes.residency(tenant) else {
        return Decision::NoCompliantSite(refusal_text(model, None));
    };
    let here = this_site(g, &routes, ready_here);
    // Most requests: served where they arrived, no peer looked at.
    if ready_here && allowed(residency, sites, &here) {
        return Decision::Here;
    }
    let views = g.peers.views(deployment);
    let states: Vec<SiteState<'_>> = views
        .iter()
        .map(|v| SiteState {
            site: &v.gateway.site,
            jurisdiction: routes.jurisdiction(&v.gateway.site),
            ready: v.ready,
            healthy: v.healthy,
            rtt_us: v.rtt_us,
        })
        .collect();
    match choose(residency, sites, facts.preferred, &here, &states) {
        Choice::Here => Decision::Here,
        // No replica anywhere yet: one will start where it may.
        Choice::NoCompliantSite if facts.scaled_to_zero || (holding && !facts.failed) => {
            Decision::Hold(facts.load.clone())
        }
        Choice::NoCompliantSite => Decision::NoCompliantSite(refusal_text(model, Some(residency))),
        Choice::Forward(order) => {
            let mut gateways = Vec::new();
            for site in order {
                let mut of_site: Vec<_> = views
                    .iter()
                    .filter(|v| v.gateway.site == site && v.ready && v.healthy)
                    .collect();
                of_site.sort_by_key(|v| v.rtt_us);
                gateways.extend(of_site.into_iter().map(|v| v.gateway.clone()));
            }
            Decision::Forward(gateways)
        }
    }
}

/// Where a request is served, once decided.
pub enum Site {
    Here,
    /// These gateways, in order.
    Peers(Vec<Arc<PeerGateway>>),
    /// Refused with `no_compliant_site`, for this reason.
    Nowhere(String),
}

/// Where `tenant`'s request for `model` is served: decided, and for a
/// deployment scaled to zero that only other sites may serve, held —
/// counted as waiting, so the autoscaler starts a replica now — until a
/// peer has a replica or `hold_timeout` passes. A request a peer
/// `forwarded` is served here or refused: it goes no further, and lands
/// only where it may.
pub async fn site_for(g: &Gateway, tenant: &str, model: &str, forwarded: bool) -> Site {
    if forwarded {
        return if allowed_here(g, tenant, model) {
            Site::Here
        } else {
            Site::Nowhere(format!(
                "site {} may not serve `{model}` for this tenant",
                g.site
            ))
        };
    }
    let load = match decide(g, tenant, model, false) {
        Decision::Here => return Site::Here,
        Decision::Forward(gateways) => return Site::Peers(gateways),
        Decision::NoCompliantSite(why) => return Site::Nowhere(why),
        Decision::Hold(load) => load,
    };
    let _held = load.hold();
    g.load_wake.notify_one();
    let deadline = Instant::now() + g.hold_timeout;
    while Instant::now() < deadline {
        // Peers' ready sets change with their probes' answers.
        tokio::time::sleep(crate::peers::PROBE).await;
        match decide(g, tenant, model, true) {
            Decision::Hold(_) => continue,
            Decision::Here => return Site::Here,
            Decision::Forward(gateways) => return Site::Peers(gateways),
            Decision::NoCompliantSite(why) => return Site::Nowhere(why),
        }
    }
    Site::Nowhere(format!(
        "no replica of `{model}` started at a site its tenant's residency allows within {}s; \
         retry shortly",
        g.hold_timeout.as_secs()
    ))
}

/// Whether this site may serve `tenant`'s `model` at all (a forwarded
/// request is checked again where it lands).
fn allowed_here(g: &Gateway, tenant: &str, model: &str) -> bool {
    let Ok(routes) = g.routes.read() else {
        return false;
    };
    let Some(facts) = routes.site_facts(tenant, model) else {
        return true;
    };
    let sites = facts.sites;
    let here = this_site(g, &routes, true);
    routes
        .residency(tenant)
        .is_some_and(|r| allowed(r, sites, &here))
}

/// Sends the request to the first of `gateways` that answers; returns its
/// response, the site that served it and the time spent upstream.
pub async fn forward(
    g: &Gateway,
    route: &str,
    raw: &Bytes,
    authorization: Option<&str>,
    request_id: &str,
    gateways: &[Arc<PeerGateway>],
    model: &str,
) -> Result<(Response, String, Duration), Refusal> {
    let Some(tls) = g.peers.tls() else {
        return Err(Refusal::NoCompliantSite(format!(
            "`{model}` is served at another site, and this gateway holds no peer-link \
             certificate yet; retry shortly"
        )));
    };
    let started = Instant::now();
    for peer in gateways {
        let target = peer_target(peer, &tls, &g.site, authorization);
        // A peer declared down while this waits for its answer's head (a
        // link gone dark) fails the request rather than holding it until
        // TCP gives up; it is not sent again elsewhere, as the peer may
        // have run it.
        let down = peer.went_down();
        let sent = tokio::select! {
            sent = g.upstreams.post(&target, route, Some(request_id), raw) => sent,
            () = down => {
                return Err(Refusal::Upstream(format!(
                    "site {} stopped answering while the request was in flight; retry it",
                    peer.site
                )))
            }
        };
        match sent {
            Ok(upstream) => {
                let upstream_time = started.elapsed();
                let status = upstream.head.status;
                let content_type = upstream.head.content_type.clone();
                let chunked = upstream.head.framing == crate::http1::Framing::Chunked;
                let mut body = upstream.body;
                let body = if chunked {
                    let (tx, rx) = mpsc::channel::<Bytes>(32);
                    tokio::spawn(async move {
                        while let Some(Ok(chunk)) = body.chunk().await {
                            if tx.send(chunk).await.is_err() {
                                break;
                            }
                        }
                    });
                    ResponseBody::Stream(rx)
                } else {
                    ResponseBody::Full(body.collect().await.map_err(|e| {
                        Refusal::Upstream(format!("site {} failed: {e}", peer.site))
                    })?)
                };
                let mut response = Response {
                    status,
                    headers: Vec::with_capacity(8),
                    body,
                    after_sent: None,
                };
                if let Some(ct) = content_type {
                    response.header("content-type", ct);
                }
                return Ok((response, peer.site.clone(), upstream_time));
            }
            Err(e) if e.is_connect() => {
                peer.unreachable(&g.upstreams);
                tracing::warn!(site = %peer.site, gateway = %peer.name, error = %e,
                    "gateway: peer site unreachable; trying the next allowed one");
            }
            Err(e) => return Err(Refusal::Upstream(format!("site {} failed: {e}", peer.site))),
        }
    }
    Err(Refusal::NoCompliantSite(format!(
        "no site allowed to serve `{model}` could be reached ({} tried); it is not served \
         elsewhere; retry shortly",
        gateways.len()
    )))
}
