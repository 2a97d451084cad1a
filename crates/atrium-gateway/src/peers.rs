//! The other sites' gateways: who they are (their records in the control
//! plane), whether they answer and how far away they are (a state probe
//! every `PROBE` over the peer link), and which deployments each can serve
//! now (its ready set, sent with a probe's answer when it changed). Also
//! this gateway's own record, and the certificates of the peer link.
//!
//! The peer link is TLS with certificates on both sides, issued by the
//! Atrium CA for `<site>.site.atrium` (see `peer_listener`): a gateway
//! forwards only to a peer proving the site it chose, and a peer believes
//! the ingress site a request names only when the sender proves it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use atrium_api::{Gateway, Object, SiteCertificate, SiteCertificateRequest};
use atrium_client::{Api, ControlPlane, Update};
use atrium_core::gateway::{site_server_name, GatewaySpec, PeerMeasurement};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};

use crate::upstream::{self, Upstreams};

/// How often each peer is probed. Probes overlap (up to
/// `PROBES_IN_FLIGHT` each): a far peer is still asked every tick.
pub const PROBE: Duration = Duration::from_millis(100);
const PROBES_IN_FLIGHT: usize = 4;
/// A probe still unanswered after this is given up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A peer whose last answer is older than three round trips, and at
/// least this, is not forwarded to (a refused connection marks it at
/// once): a dark link is noticed in about `3 × rtt` — under half a second
/// for peers within 100 ms.
const SILENT_FLOOR: Duration = Duration::from_millis(250);
/// How often this gateway's record is looked at; it is written when
/// something an operator would act on changed (see `material`), and at
/// least every `RECORD_AT_LEAST` — every write is an audited change.
const RECORD: Duration = Duration::from_secs(2);
const RECORD_AT_LEAST: Duration = Duration::from_secs(60);
/// The path of the state probe on the peer link.
pub const STATE_PATH: &str = "/peer/v1/state";

/// The TLS configurations of the peer link, from one certificate.
pub struct PeerTls {
    pub connector: tokio_rustls::TlsConnector,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

/// A probe's question: the version of the ready set the asker holds.
#[derive(Serialize, Deserialize)]
pub struct StateQuery {
    pub known: u64,
}

/// A probe's answer.
#[derive(Serialize, Deserialize)]
pub struct PeerState {
    pub site: String,
    pub in_flight: u64,
    pub version: u64,
    /// Deployment ids with a ready replica; absent when unchanged.
    #[serde(default)]
    pub ready: Option<Vec<String>>,
}

#[derive(Default)]
struct Probe {
    healthy: bool,
    /// When the last answer came.
    answered_at: Option<Instant>,
    /// Smoothed round trip (RFC 6298's 1/8 weight), microseconds.
    rtt_us: u64,
    in_flight: u64,
    version: u64,
    ready: HashSet<String>,
}

/// Another site's gateway.
pub struct PeerGateway {
    pub name: String,
    pub site: String,
    pub address: SocketAddr,
    /// `host:port`, for the `Host` header.
    pub authority: String,
    pub server_name: ServerName<'static>,
    /// Its connections' pool (its own: never a replica's).
    pub pool: String,
    probe: Mutex<Probe>,
    /// Counts the times it was marked down: a forward waiting on it gives
    /// up when this changes.
    downs: tokio::sync::watch::Sender<u64>,
}

/// What the site choice needs of a peer for one deployment.
pub struct PeerView {
    pub gateway: Arc<PeerGateway>,
    pub healthy: bool,
    pub rtt_us: u64,
    pub ready: bool,
}

impl PeerGateway {
    fn new(name: &str, spec: &GatewaySpec) -> Option<PeerGateway> {
        let address: SocketAddr = spec.peer_address.parse().ok()?;
        let server_name = ServerName::try_from(site_server_name(&spec.site)).ok()?;
        Some(PeerGateway {
            name: name.to_string(),
            site: spec.site.clone(),
            authority: address.to_string(),
            address,
            server_name,
            pool: format!("peer/{name}"),
            probe: Mutex::default(),
            downs: tokio::sync::watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Probe> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A forward to it could not connect: not tried again until a probe
    /// answers.
    pub fn unreachable(&self, upstreams: &Upstreams) {
        let mut p = self.lock();
        self.mark_down(&mut p, upstreams);
    }

    /// Not forwarded to any more; its idle connections closed, and the
    /// forwards waiting on it told.
    fn mark_down(&self, p: &mut Probe, upstreams: &Upstreams) {
        if p.healthy {
            p.healthy = false;
            upstreams.forget(&self.pool);
            self.downs.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Resolves when it is next marked down.
    pub fn went_down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut downs = self.downs.subscribe();
        async move {
            let _ = downs.changed().await;
        }
    }

    fn answered(&self, state: PeerState, rtt: Duration) {
        let mut p = self.lock();
        let sample = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        p.rtt_us = if p.rtt_us == 0 {
            sample
        } else {
            p.rtt_us - p.rtt_us / 8 + sample / 8
        };
        p.healthy = true;
        p.answered_at = Some(Instant::now());
        p.in_flight = state.in_flight;
        // Probes overlap: an older answer must not undo a newer one.
        if state.version >= p.version {
            if let Some(ready) = state.ready {
                p.ready = ready.into_iter().collect();
            }
            p.version = state.version;
        }
    }

    /// Marks it down if it has been silent for too long.
    fn check_silence(&self, upstreams: &Upstreams) {
        let mut p = self.lock();
        let limit = Duration::from_micros(p.rtt_us.saturating_mul(3)).max(SILENT_FLOOR);
        if p.healthy && p.answered_at.is_none_or(|at| at.elapsed() > limit) {
            self.mark_down(&mut p, upstreams);
        }
    }

    fn measurement(&self) -> PeerMeasurement {
        let p = self.lock();
        PeerMeasurement {
            gateway: self.name.clone(),
            site: self.site.clone(),
            rtt_us: p.rtt_us,
            healthy: p.healthy,
            in_flight: p.in_flight,
            ready: p.ready.len() as u64,
        }
    }
}

/// The peers of this gateway, and the peer link's TLS.
pub struct Peers {
    /// This gateway's record name (its credential's) and site.
    pub name: String,
    pub site: String,
    /// Where peers reach this gateway, when it takes forwarded requests.
    pub address: Option<SocketAddr>,
    tls: RwLock<Option<Arc<PeerTls>>>,
    gateways: RwLock<HashMap<String, Arc<PeerGateway>>>,
}

impl Peers {
    pub fn new(name: String, site: String, address: Option<SocketAddr>) -> Peers {
        Peers {
            name,
            site,
            address,
            tls: RwLock::default(),
            gateways: RwLock::default(),
        }
    }

    pub fn tls(&self) -> Option<Arc<PeerTls>> {
        self.tls.read().ok().and_then(|t| t.clone())
    }

    /// Every peer gateway's state for `deployment`.
    pub fn views(&self, deployment: &str) -> Vec<PeerView> {
        let Ok(gateways) = self.gateways.read() else {
            return Vec::new();
        };
        gateways
            .values()
            .map(|g| {
                let p = g.lock();
                PeerView {
                    gateway: g.clone(),
                    healthy: p.healthy,
                    rtt_us: p.rtt_us,
                    ready: p.ready.contains(deployment),
                }
            })
            .collect()
    }

    fn all(&self) -> Vec<Arc<PeerGateway>> {
        self.gateways
            .read()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Takes in a change of the gateway records: the other sites'
    /// gateways that take forwarded requests are peers (a record whose
    /// address or site changed is a new peer, probed afresh).
    fn apply(&self, update: Update<Object<Gateway>>) {
        let Ok(mut gateways) = self.gateways.write() else {
            return;
        };
        let put = |o: &Object<Gateway>, gateways: &mut HashMap<String, Arc<PeerGateway>>| {
            let same = gateways
                .get(&o.name)
                .is_some_and(|g| g.site == o.spec.site && g.authority == o.spec.peer_address);
            if same {
                return;
            }
            gateways.remove(&o.name);
            if o.spec.site != self.site && !o.spec.peer_address.is_empty() {
                if let Some(g) = PeerGateway::new(&o.name, &o.spec) {
                    gateways.insert(o.name.clone(), Arc::new(g));
                }
            }
        };
        match update {
            Update::Snapshot(items) => {
                let live: HashSet<&str> = items.iter().map(|o| o.name.as_str()).collect();
                gateways.retain(|name, _| live.contains(name.as_str()));
                for o in &items {
                    put(o, &mut gateways);
                }
            }
            Update::Added(o) | Update::Modified(o) => put(&o, &mut gateways),
            Update::Deleted(o) => {
                gateways.remove(&o.name);
            }
        }
    }
}

/// Follows the gateway records.
pub async fn follow(cp: ControlPlane, peers: Arc<Peers>) {
    Api::<Gateway>::all(&cp)
        .follow(move |u| peers.apply(u))
        .await
}

/// Probes every peer every `PROBE`, each probe on its own (a slow peer
/// delays no other's, nor its own next one), and marks down the peers
/// that have gone silent.
pub async fn probe(peers: Arc<Peers>, upstreams: Arc<Upstreams>) {
    let mut running: HashMap<String, Vec<tokio::task::JoinHandle<()>>> = HashMap::new();
    loop {
        tokio::time::sleep(PROBE).await;
        let Some(tls) = peers.tls() else { continue };
        let all = peers.all();
        running.retain(|name, _| all.iter().any(|g| g.name == *name));
        for g in all {
            g.check_silence(&upstreams);
            let probes = running.entry(g.name.clone()).or_default();
            probes.retain(|t| !t.is_finished());
            if probes.len() >= PROBES_IN_FLIGHT {
                continue;
            }
            let (tls, upstreams, site) = (tls.clone(), upstreams.clone(), peers.site.clone());
            probes.push(tokio::spawn(async move {
                probe_one(&g, &tls, &upstreams, &site).await
            }));
        }
    }
}

async fn probe_one(g: &PeerGateway, tls: &PeerTls, upstreams: &Arc<Upstreams>, site: &str) {
    let known = g.lock().version;
    let body = serde_json::to_vec(&StateQuery { known }).unwrap_or_default();
    let started = Instant::now();
    let asked = async {
        let response = upstreams
            .post(&peer_target(g, tls, site, None), STATE_PATH, None, &body)
            .await
            .ok()?;
        if response.head.status != 200 {
            return None;
        }
        let bytes = response.body.collect().await.ok()?;
        serde_json::from_slice::<PeerState>(&bytes).ok()
    };
    if let Ok(Some(state)) = tokio::time::timeout(PROBE_TIMEOUT, asked).await {
        if state.site == g.site {
            g.answered(state, started.elapsed());
        }
    }
}

/// Where a request to `g` goes: its address over the peer link, naming
/// this gateway's site, with the tenant's `authorization` if forwarded.
pub fn peer_target<'a>(
    g: &'a PeerGateway,
    tls: &'a PeerTls,
    site: &'a str,
    authorization: Option<&'a str>,
) -> upstream::Peer<'a> {
    upstream::Peer {
        pool: &g.pool,
        authority: &g.authority,
        prefix: "",
        addrs: std::slice::from_ref(&g.address),
        link: Some(upstream::PeerLink {
            connector: &tls.connector,
            server_name: &g.server_name,
            ingress_site: site,
            authorization,
        }),
    }
}

/// Writes this gateway's record every `RECORD`: its peer address, its
/// load and what it measured of its peers.
pub async fn record(cp: ControlPlane, peers: Arc<Peers>, in_flight: impl Fn() -> u64) {
    let api = Api::<Gateway>::all(&cp);
    let mut written: Option<(GatewaySpec, Instant)> = None;
    loop {
        let mut measured: Vec<PeerMeasurement> =
            peers.all().iter().map(|g| g.measurement()).collect();
        measured.sort_by(|a, b| a.site.cmp(&b.site).then(a.gateway.cmp(&b.gateway)));
        measured.truncate(atrium_core::gateway::MAX_PEERS);
        let spec = GatewaySpec {
            site: peers.site.clone(),
            peer_address: peers.address.map(|a| a.to_string()).unwrap_or_default(),
            in_flight: in_flight(),
            peers: measured,
            reported_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        };
        let due = written
            .as_ref()
            .is_none_or(|(last, at)| at.elapsed() >= RECORD_AT_LEAST || material(last, &spec));
        if due {
            match api.create_or_update(&peers.name, &spec).await {
                Ok(_) => written = Some((spec, Instant::now())),
                Err(e) => tracing::debug!(error = %e, "gateway: cannot write its record; retrying"),
            }
        }
        tokio::time::sleep(RECORD).await;
    }
}

/// Whether `now` says something `last` did not: another address or set
/// of peers, a peer up or down, its ready deployments, or its round trip
/// moved by more than a fifth (and a millisecond). Load alone is not.
fn material(last: &GatewaySpec, now: &GatewaySpec) -> bool {
    last.peer_address != now.peer_address
        || last.peers.len() != now.peers.len()
        || last.peers.iter().zip(&now.peers).any(|(a, b)| {
            let moved = a.rtt_us.abs_diff(b.rtt_us);
            a.gateway != b.gateway
                || a.healthy != b.healthy
                || a.ready != b.ready
                || (moved > 1_000 && moved > a.rtt_us / 5)
        })
}

/// Keeps a certificate for the peer link: a new key and certificate at
/// start and at half of each one's life, retried every 10 s while the
/// control plane does not answer.
pub async fn certify(cp: ControlPlane, peers: Arc<Peers>) {
    loop {
        let next = match renew(&cp).await {
            Ok((tls, valid_for)) => {
                if let Ok(mut slot) = peers.tls.write() {
                    *slot = Some(Arc::new(tls));
                }
                tracing::info!(site = %peers.site, "gateway: peer-link certificate issued");
                valid_for / 2
            }
            Err(e) => {
                tracing::warn!(error = %e, "gateway: no peer-link certificate yet; retrying");
                Duration::from_secs(10)
            }
        };
        tokio::time::sleep(next).await;
    }
}

async fn renew(cp: &ControlPlane) -> Result<(PeerTls, Duration), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let request = SiteCertificateRequest {
        public_key: hex::encode(key.public_key_raw()),
    };
    let issued: SiteCertificate = cp
        .request(
            reqwest::Method::POST,
            "/v1/site-certificates",
            Some(&request),
        )
        .await
        .map_err(|e| e.to_string())?;
    let tls = peer_tls(&issued, &key.serialize_der())?;
    Ok((tls, Duration::from_secs(issued.valid_for_s.max(60))))
}

/// The peer link's client and server configurations from an issued
/// certificate and its key (PKCS #8): only the Atrium CA is trusted, and
/// the server side requires a client certificate from it.
pub fn peer_tls(issued: &SiteCertificate, key_der: &[u8]) -> Result<PeerTls, String> {
    // ring, as the control plane's listener: aws-lc-rs builds a C library
    // with cmake, doubling the build.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![
        CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes())
            .map_err(|e| format!("certificate: {e}"))?,
    ];
    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()));
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(issued.ca_pem.as_bytes())
        .map_err(|e| format!("CA certificate: {e}"))?;
    roots.add(ca).map_err(|e| format!("CA certificate: {e}"))?;
    let roots = Arc::new(roots);
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key())
        .map_err(|e| e.to_string())?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key())
        .map_err(|e| e.to_string())?;
    Ok(PeerTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rtt_us: u64, healthy: bool, in_flight: u64) -> GatewaySpec {
        GatewaySpec {
            site: "edge".into(),
            peer_address: "127.0.0.1:9443".into(),
            in_flight,
            peers: vec![PeerMeasurement {
                gateway: "gw-core".into(),
                site: "core".into(),
                rtt_us,
                healthy,
                in_flight: 0,
                ready: 3,
            }],
            reported_at: String::new(),
        }
    }

    /// Every write of the record is an audited change: load and jitter
    /// alone do not make one.
    #[test]
    fn only_what_an_operator_acts_on_rewrites_the_record() {
        let last = spec(20_000, true, 5);
        assert!(!material(&last, &spec(20_900, true, 500)));
        assert!(!material(&last, &spec(23_000, true, 5)));
        assert!(material(&last, &spec(30_000, true, 5)));
        assert!(material(&last, &spec(20_000, false, 5)));
        let mut more = spec(20_000, true, 5);
        more.peers.push(more.peers[0].clone());
        assert!(material(&last, &more));
    }
}
