//! The gateway's in-memory view of the control plane — key digests,
//! deployments, replicas — kept current by watch streams, and the pure
//! lookups every request makes against it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atrium_api::{Deployment, Key, Object, Placement, Site, Tenant};
use atrium_client::Update;
use atrium_core::deployment::{EngineKind, SamplingDefaults};
use atrium_core::key::{split_key_token, Scope};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::limits::RequestLimits;
use atrium_core::tenant::{Residency, UsageRecords};
use atrium_core::url::UpstreamUrl;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::egress::Resolved;
use crate::load::DeploymentLoad;
use crate::upstream;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyEntry {
    digest: String,
    tenant: String,
    scopes: Vec<Scope>,
    revoked: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    limits: RequestLimits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeploymentEntry {
    id: String,
    engine: EngineKind,
    external_url: Option<String>,
    /// The model name an external upstream knows (the deployment's model).
    model: String,
    state: String,
    #[serde(default)]
    sampling: SamplingDefaults,
    /// The sites it may run in (any allowed one when empty).
    #[serde(default)]
    sites: Vec<String>,
    /// Of those, the ones forwarded to first.
    #[serde(default)]
    preferred_sites: Vec<String>,
    /// Its state is `failed`: no replica is coming, so requests are not
    /// held for one.
    #[serde(default)]
    failed: bool,
    /// The autoscaler has it at zero replicas: a request must start one.
    #[serde(default)]
    scaled_to_zero: bool,
    /// `external_url` parsed, for an external deployment (derived, not
    /// saved).
    #[serde(skip)]
    external: Option<Arc<External>>,
    /// Its load counters (derived: the table's, by id, so they outlive
    /// updates of the deployment).
    #[serde(skip)]
    load: Arc<DeploymentLoad>,
}

/// An external deployment's upstream: its URL parsed once per change of
/// the deployment, the pool its connections live in, and the addresses
/// its host resolved to that the egress policy allowed.
#[derive(Debug)]
pub struct External {
    /// The URL, or why it cannot be used (a deployment stored before URLs
    /// were checked).
    pub url: Result<UpstreamUrl, String>,
    /// `host:port`, for the `Host` header.
    pub authority: String,
    /// `<tenant>/<deployment id>/<host:port>`: never shared across tenants
    /// or deployments.
    pub pool: String,
    /// The model name the upstream knows.
    pub model: String,
    pub resolved: Resolved,
}

impl External {
    fn new(tenant: &str, deployment: &str, url: &str, model: &str) -> External {
        let url = UpstreamUrl::parse(url)
            .map_err(|why| format!("the deployment's external_url {url:?} {why}"));
        let authority = url.as_ref().map(UpstreamUrl::authority).unwrap_or_default();
        External {
            pool: format!("{tenant}/{deployment}/{authority}"),
            authority,
            url,
            model: model.to_string(),
            resolved: Resolved::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReplicaEntry {
    deployment: String,
    name: String,
    endpoint: Option<String>,
    running: bool,
}

/// An authenticated tenant caller, with the limits of its key and tenant.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: String,
    pub tenant: String,
    pub may_infer: bool,
    pub key_limits: RequestLimits,
    pub tenant_limits: RequestLimits,
    /// The tenant asked for a usage record per request
    /// (`usage_records: per_request`), not only minute aggregates.
    pub itemised_usage: bool,
}

/// A replica's circuit breaker: after `TRIP_AFTER` consecutive connect
/// failures it is skipped for `OPEN_FOR`, then tried again (one failure
/// re-opens it at once; one success closes it).
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU64,
    open_until_ms: AtomicU64,
}

const TRIP_AFTER: u64 = 3;
const OPEN_FOR: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    crate::limits::system_now().as_millis() as u64
}

impl Breaker {
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    pub fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= TRIP_AFTER {
            self.open_until_ms
                .store(now_ms() + OPEN_FOR.as_millis() as u64, Ordering::Relaxed);
        }
    }

    pub fn is_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Relaxed) > now_ms()
    }
}

/// Where a request goes.
pub enum Target {
    Replica {
        replica: Arc<Serving>,
        /// vLLM/SGLang-style upstream that takes `cache_salt`.
        takes_cache_salt: bool,
        /// Whether it takes our `x-request-id` (llama-cpp-python's server
        /// refuses, with 400, any that is not a UUID).
        takes_request_id: bool,
        load: Arc<DeploymentLoad>,
    },
    /// An existing OpenAI-compatible server; its `model` replaces the
    /// request's (the tenant's deployment name means nothing there).
    External(Arc<External>),
    NoneReady {
        deployment: String,
        state: String,
        /// Whether a replica may yet come (the deployment has not failed):
        /// the request then waits for one.
        holds: bool,
        load: Arc<DeploymentLoad>,
    },
}

/// A deployment as the site choice sees it.
pub struct SiteFacts<'a> {
    pub deployment: &'a str,
    /// The sites it may run in (any allowed one when empty).
    pub sites: &'a [String],
    /// Of those, the ones forwarded to first.
    pub preferred: &'a [String],
    /// A replica of it serves at this site.
    pub ready_here: bool,
    /// It runs nowhere until a request starts a replica.
    pub scaled_to_zero: bool,
    /// No replica of it is coming.
    pub failed: bool,
    pub load: &'a Arc<DeploymentLoad>,
}

/// A running replica with an endpoint, as requests are routed to it:
/// shared by the routing index and the requests in flight, so picking one
/// copies nothing and looks nothing up.
#[derive(Debug)]
pub struct Serving {
    /// The placement id; also its connection pool's key (a replica is one
    /// tenant's, one deployment's, at one address).
    pub id: String,
    pub name: String,
    /// Its endpoint, split: `host:port` and the path prefix.
    pub address: upstream::Address,
    /// Requests in flight to it from this gateway.
    pub outstanding: Arc<AtomicU64>,
    pub breaker: Arc<Breaker>,
}

impl Serving {
    fn load(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// Which feeds have delivered their first snapshot.
#[derive(Debug, Default)]
struct Synced {
    keys: bool,
    deployments: bool,
    replicas: bool,
    tenants: bool,
    sites: bool,
}

impl Synced {
    fn all(&self) -> bool {
        self.keys && self.deployments && self.replicas && self.tenants && self.sites
    }
}

#[derive(Default)]
pub struct Routes {
    keys: HashMap<String, KeyEntry>,
    /// tenant → deployment name → deployment (looked up by `&str` on
    /// every request: no key is built).
    deployments: HashMap<String, HashMap<String, DeploymentEntry>>,
    /// placement id → replica.
    replicas: BTreeMap<String, ReplicaEntry>,
    /// deployment id → its running replicas with an endpoint, derived from
    /// `replicas` whenever they change: a request looks at its own
    /// deployment's replicas, not at every replica of every tenant.
    serving: HashMap<String, Vec<Arc<Serving>>>,
    /// placement id → requests in flight; outlives replica updates.
    outstanding: HashMap<String, Arc<AtomicU64>>,
    /// placement id → circuit breaker.
    breakers: HashMap<String, Arc<Breaker>>,
    /// tenant name → the limits of its quota.
    tenants: HashMap<String, RequestLimits>,
    /// Tenants that asked for a usage record per request.
    itemised_usage: HashSet<String>,
    /// tenant name → where it may be served.
    residency: HashMap<String, Residency>,
    /// site name → its jurisdiction.
    jurisdictions: HashMap<String, String>,
    /// Bumped whenever the set of deployments with a serving replica may
    /// have changed (peers re-read it then).
    ready_version: u64,
    /// deployment id → its load counters.
    load: HashMap<String, Arc<DeploymentLoad>>,
    /// Told whenever the serving replicas change: requests held for a
    /// replica wait on it.
    replica_changes: tokio::sync::watch::Sender<()>,
    synced: Synced,
    /// Bumped by every change, so the table is saved only when it changed.
    version: u64,
    /// Served from the saved table until the first snapshot arrives.
    restored: bool,
}

/// What the gateway saves of its table, to keep serving — revocations
/// included — when it restarts while the control plane is away.
#[derive(Serialize, Deserialize)]
pub struct SavedRoutes {
    keys: HashMap<String, KeyEntry>,
    deployments: Vec<((String, String), DeploymentEntry)>,
    replicas: BTreeMap<String, ReplicaEntry>,
    tenants: HashMap<String, RequestLimits>,
    #[serde(default)]
    itemised_usage: HashSet<String>,
    #[serde(default)]
    residency: HashMap<String, Residency>,
    #[serde(default)]
    jurisdictions: HashMap<String, String>,
}

/// A replica preferred by affinity keeps its requests while it has at most
/// this many more in flight than the least loaded replica.
pub const AFFINITY_SLACK: u64 = 2;

fn key_entry(o: &Object<Key>) -> Option<(String, KeyEntry)> {
    // The watch view carries no digest: the digest comes from the
    // dedicated feed (see `follow`); keep an existing one.
    Some((
        o.id.clone(),
        KeyEntry {
            digest: String::new(),
            tenant: o.tenant.clone()?,
            scopes: o.spec.scopes.clone(),
            revoked: o.status.as_ref().is_some_and(|s| s.revoked_at.is_some()),
            expires_at: o.spec.expires_at,
            limits: o.spec.limits(),
        },
    ))
}

impl DeploymentEntry {
    fn derive_external(&mut self, tenant: &str) {
        self.external = match (self.engine, &self.external_url) {
            (EngineKind::External, Some(url)) => {
                Some(Arc::new(External::new(tenant, &self.id, url, &self.model)))
            }
            _ => None,
        };
    }
}

impl Routes {
    /// True once every feed has delivered its first snapshot, or the saved
    /// table was restored.
    pub fn synced(&self) -> bool {
        self.restored || self.synced.all()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn save(&self) -> SavedRoutes {
        SavedRoutes {
            keys: self.keys.clone(),
            deployments: self
                .deployments
                .iter()
                .flat_map(|(tenant, names)| {
                    names
                        .iter()
                        .map(|(name, d)| ((tenant.clone(), name.clone()), d.clone()))
                })
                .collect(),
            replicas: self.replicas.clone(),
            tenants: self.tenants.clone(),
            itemised_usage: self.itemised_usage.clone(),
            residency: self.residency.clone(),
            jurisdictions: self.jurisdictions.clone(),
        }
    }

    /// Takes in a saved table (before any feed has delivered).
    pub fn restore(&mut self, saved: SavedRoutes) {
        self.keys = saved.keys;
        self.deployments.clear();
        for ((tenant, name), mut d) in saved.deployments {
            d.derive_external(&tenant);
            d.load = self.load.entry(d.id.clone()).or_default().clone();
            self.deployments.entry(tenant).or_default().insert(name, d);
        }
        self.replicas = saved.replicas;
        self.tenants = saved.tenants;
        self.itemised_usage = saved.itemised_usage;
        self.residency = saved.residency;
        self.jurisdictions = saved.jurisdictions;
        self.replicas_changed();
        self.restored = true;
    }

    /// Checks a presented key against the digest cache.
    pub fn authenticate(&self, token: &str) -> Result<Caller, &'static str> {
        const BAD: &str = "Incorrect API key provided.";
        let (id, _) = split_key_token(token).ok_or(BAD)?;
        let key = self.keys.get(id).ok_or(BAD)?;
        // The stored digest is hex; decoding it costs less than encoding
        // the computed one on every request.
        let mut expected = [0u8; 32];
        if hex::decode_to_slice(&key.digest, &mut expected).is_err()
            || !bool::from(expected.ct_eq(Sha256::digest(token.as_bytes()).as_slice()))
        {
            return Err(BAD);
        }
        self.caller_for_key(id)
    }

    /// The caller key `id` makes while it is valid: a batch runs as the
    /// key that made it, and stops when that key is revoked or expires.
    pub fn caller_for_key(&self, id: &str) -> Result<Caller, &'static str> {
        let key = self.keys.get(id).ok_or("This API key no longer exists.")?;
        if key.revoked {
            return Err("This API key has been revoked.");
        }
        if key
            .expires_at
            .is_some_and(|e| e <= OffsetDateTime::now_utc())
        {
            return Err("This API key has expired.");
        }
        let may_infer = key
            .scopes
            .iter()
            .any(|s| matches!(s, Scope::Inference | Scope::Admin));
        Ok(Caller {
            key: id.to_string(),
            tenant: key.tenant.clone(),
            may_infer,
            key_limits: key.limits,
            tenant_limits: self.tenants.get(&key.tenant).copied().unwrap_or_default(),
            itemised_usage: self.itemised_usage.contains(&key.tenant),
        })
    }

    /// A deployment's load counters and how many replicas are ready, for a
    /// batch deciding whether there is room to send one more request.
    pub fn batch_room(&self, tenant: &str, model: &str) -> Option<(Arc<DeploymentLoad>, usize)> {
        let d = self.deployments.get(tenant)?.get(model)?;
        let ready = self.serving.get(&d.id).map_or(0, Vec::len);
        Some((d.load.clone(), ready))
    }

    /// Per replica name: requests in flight, and whether its breaker is open.
    pub fn replica_states(&self) -> Vec<(String, u64, bool)> {
        self.replicas
            .iter()
            .map(|(id, r)| {
                (
                    r.name.clone(),
                    self.outstanding
                        .get(id)
                        .map(|c| c.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    self.breakers.get(id).is_some_and(|b| b.is_open()),
                )
            })
            .collect()
    }

    /// Every deployment's load counters, by id.
    pub fn loads(&self) -> Vec<(String, Arc<DeploymentLoad>)> {
        self.load
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect()
    }

    /// A receiver told of every change of the serving replicas.
    pub fn replica_changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.replica_changes.subscribe()
    }

    /// The caller's deployment names, sorted.
    pub fn models_of(&self, tenant: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .deployments
            .get(tenant)
            .map(|names| names.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Resolves `model` among `tenant`'s deployments only, to one of its
    /// ready replicas (not in `exclude`, breaker closed): the one the
    /// affinity key prefers (rendezvous hashing), unless it has more than
    /// `AFFINITY_SLACK` requests in flight beyond the least loaded, which
    /// then gets it. With it, the deployment's sampling defaults.
    pub fn target(
        &self,
        tenant: &str,
        model: &str,
        affinity: u64,
        exclude: &[String],
    ) -> Option<(Target, SamplingDefaults)> {
        let d = self.deployments.get(tenant)?.get(model)?;
        if d.engine == EngineKind::External {
            return d
                .external
                .clone()
                .map(|e| (Target::External(e), d.sampling));
        }
        let serving = self.serving.get(&d.id).map_or(&[][..], Vec::as_slice);
        let usable = |r: &&Arc<Serving>| !exclude.contains(&r.id);
        // Skip replicas whose breaker is open — unless all are: then trying
        // one beats refusing outright.
        let any_closed = serving.iter().filter(usable).any(|r| !r.breaker.is_open());
        let candidates = || {
            serving
                .iter()
                .filter(usable)
                .filter(move |r| !any_closed || !r.breaker.is_open())
        };
        let least = candidates().map(|r| r.load()).min();
        let best = candidates()
            .max_by_key(|r| crate::affinity::rendezvous_weight(affinity, &r.id))
            .filter(|r| least.is_some_and(|l| r.load() <= l + AFFINITY_SLACK))
            .or_else(|| candidates().min_by_key(|r| r.load()));
        let target = match best {
            Some(r) => Target::Replica {
                replica: r.clone(),
                // Engines that key their prefix cache by it; llama.cpp's
                // server has none to share (a replica is one tenant's).
                takes_cache_salt: matches!(
                    d.engine,
                    EngineKind::Embedded | EngineKind::Simulated | EngineKind::Vllm
                ),
                takes_request_id: d.engine != EngineKind::LlamaCpp,
                load: d.load.clone(),
            },
            None => Target::NoneReady {
                deployment: model.to_string(),
                state: d.state.clone(),
                holds: !d.failed,
                load: d.load.clone(),
            },
        };
        Some((target, d.sampling))
    }

    /// What choosing a site for `model` needs; `None` for a model the
    /// tenant has not (the local path refuses it) or one served by an
    /// external upstream (no site is involved).
    pub fn site_facts(&self, tenant: &str, model: &str) -> Option<SiteFacts<'_>> {
        let d = self.deployments.get(tenant)?.get(model)?;
        if d.engine == EngineKind::External {
            return None;
        }
        Some(SiteFacts {
            deployment: &d.id,
            sites: &d.sites,
            preferred: &d.preferred_sites,
            ready_here: self.serving.get(&d.id).is_some_and(|s| !s.is_empty()),
            scaled_to_zero: d.scaled_to_zero && !d.failed,
            failed: d.failed,
            load: &d.load,
        })
    }

    /// Where `tenant` may be served; nowhere for a tenant this gateway
    /// does not know.
    pub fn residency(&self, tenant: &str) -> Option<&Residency> {
        self.residency.get(tenant)
    }

    pub fn jurisdiction(&self, site: &str) -> Option<&str> {
        self.jurisdictions.get(site).map(String::as_str)
    }

    /// The deployments with a serving replica here, and the version of that
    /// set; `None` for the set when the caller knows this version.
    pub fn ready_deployments(&self, known: u64) -> (u64, Option<Vec<String>>) {
        let set = (known != self.ready_version).then(|| {
            self.serving
                .iter()
                .filter(|(_, s)| !s.is_empty())
                .map(|(id, _)| id.clone())
                .collect()
        });
        (self.ready_version, set)
    }

    fn apply_site(&mut self, update: Update<Object<Site>>) {
        self.version += 1;
        match update {
            Update::Snapshot(items) => {
                self.jurisdictions = items
                    .iter()
                    .map(|o| (o.name.clone(), o.spec.jurisdiction.clone()))
                    .collect();
                self.synced.sites = true;
            }
            Update::Added(o) | Update::Modified(o) => {
                self.jurisdictions.insert(o.name, o.spec.jurisdiction);
            }
            Update::Deleted(o) => {
                self.jurisdictions.remove(&o.name);
            }
        }
    }

    fn apply_key(&mut self, update: Update<Object<Key>>, digests: &HashMap<String, String>) {
        self.version += 1;
        let upsert = |routes: &mut Routes, o: &Object<Key>| {
            if let Some((id, mut entry)) = key_entry(o) {
                entry.digest = digests.get(&id).cloned().unwrap_or_default();
                routes.keys.insert(id, entry);
            }
        };
        match update {
            Update::Snapshot(items) => {
                self.keys.clear();
                for o in &items {
                    upsert(self, o);
                }
                self.synced.keys = true;
            }
            Update::Added(o) | Update::Modified(o) => upsert(self, &o),
            Update::Deleted(o) => {
                self.keys.remove(&o.id);
            }
        }
    }

    fn apply_deployment(&mut self, update: Update<Object<Deployment>>) {
        self.version += 1;
        let entry = |o: &Object<Deployment>| -> Option<((String, String), DeploymentEntry)> {
            let tenant = o.tenant.clone()?;
            let mut d = DeploymentEntry {
                id: o.id.clone(),
                engine: o.spec.engine,
                external_url: o.spec.external_url.clone(),
                model: o.spec.model.clone(),
                state: o
                    .status
                    .as_ref()
                    .map_or_else(|| "pending".to_string(), |s| s.reason.clone()),
                sampling: o.spec.sampling,
                sites: o.spec.sites.clone(),
                preferred_sites: o.spec.preferred_sites.clone(),
                failed: o
                    .status
                    .as_ref()
                    .is_some_and(|s| s.state == LifecycleState::Failed),
                scaled_to_zero: o
                    .status
                    .as_ref()
                    .and_then(|s| s.desired_replicas)
                    .unwrap_or_else(|| o.spec.replicas.initial())
                    == 0,
                external: None,
                load: Arc::default(),
            };
            d.derive_external(&tenant);
            Some(((tenant, o.name.clone()), d))
        };
        match update {
            Update::Snapshot(items) => {
                self.deployments.clear();
                for ((tenant, name), mut d) in items.iter().filter_map(entry) {
                    d.load = self.load.entry(d.id.clone()).or_default().clone();
                    self.deployments.entry(tenant).or_default().insert(name, d);
                }
                let live: std::collections::HashSet<&str> =
                    items.iter().map(|o| o.id.as_str()).collect();
                self.load.retain(|id, _| live.contains(id.as_str()));
                self.synced.deployments = true;
            }
            Update::Added(o) | Update::Modified(o) => {
                if let Some(((tenant, name), mut d)) = entry(&o) {
                    d.load = self.load.entry(d.id.clone()).or_default().clone();
                    self.deployments.entry(tenant).or_default().insert(name, d);
                }
            }
            Update::Deleted(o) => {
                self.load.remove(&o.id);
                if let Some(((tenant, name), _)) = entry(&o) {
                    if let Some(names) = self.deployments.get_mut(&tenant) {
                        names.remove(&name);
                        if names.is_empty() {
                            self.deployments.remove(&tenant);
                        }
                    }
                }
            }
        }
    }

    fn apply_replica(&mut self, update: Update<Object<Placement>>) {
        self.version += 1;
        let entry = |o: &Object<Placement>| -> Option<(String, ReplicaEntry)> {
            // A workload's container is no model server: not the gateway's.
            if o.spec.container.is_some() {
                return None;
            }
            let status = o.status.as_ref()?;
            Some((
                o.id.clone(),
                ReplicaEntry {
                    deployment: o.spec.deployment.clone(),
                    name: o.name.clone(),
                    endpoint: status.endpoint.clone(),
                    running: status.state == LifecycleState::Running,
                },
            ))
        };
        match update {
            Update::Snapshot(items) => {
                self.replicas = items.iter().filter_map(entry).collect();
                self.synced.replicas = true;
            }
            Update::Added(o) | Update::Modified(o) => {
                if let Some((k, v)) = entry(&o) {
                    self.replicas.insert(k, v);
                }
            }
            Update::Deleted(o) => {
                self.replicas.remove(&o.id);
                self.outstanding.remove(&o.id);
                self.breakers.remove(&o.id);
            }
        }
        self.replicas_changed();
    }

    /// Keeps what is derived from `replicas` current: every replica has an
    /// in-flight counter and a breaker, every deployment its serving list.
    fn replicas_changed(&mut self) {
        self.replica_changes.send_replace(());
        self.ready_version += 1;
        self.serving.clear();
        for (id, r) in &self.replicas {
            let outstanding = self.outstanding.entry(id.clone()).or_default().clone();
            let breaker = self.breakers.entry(id.clone()).or_default().clone();
            let Some(endpoint) = r.endpoint.as_ref().filter(|_| r.running) else {
                continue;
            };
            match upstream::address(endpoint) {
                Ok(address) => {
                    self.serving
                        .entry(r.deployment.clone())
                        .or_default()
                        .push(Arc::new(Serving {
                            id: id.clone(),
                            name: r.name.clone(),
                            address,
                            outstanding,
                            breaker,
                        }))
                }
                Err(e) => {
                    tracing::warn!(placement = %id, error = %e, "gateway: replica endpoint unusable")
                }
            }
        }
    }

    fn apply_tenant(&mut self, update: Update<Object<Tenant>>) {
        self.version += 1;
        let entry = |o: &Object<Tenant>| (o.name.clone(), o.spec.quota.request_limits());
        let residency = |o: &Object<Tenant>| (o.name.clone(), o.spec.residency.clone());
        let itemised = |o: &Object<Tenant>| o.spec.usage_records == UsageRecords::PerRequest;
        match update {
            Update::Snapshot(items) => {
                self.tenants = items.iter().map(entry).collect();
                self.residency = items.iter().map(residency).collect();
                self.itemised_usage = items
                    .iter()
                    .filter(|o| itemised(o))
                    .map(|o| o.name.clone())
                    .collect();
                self.synced.tenants = true;
            }
            Update::Added(o) | Update::Modified(o) => {
                let (k, v) = entry(&o);
                self.residency.insert(k.clone(), o.spec.residency.clone());
                if itemised(&o) {
                    self.itemised_usage.insert(k.clone());
                } else {
                    self.itemised_usage.remove(&k);
                }
                self.tenants.insert(k, v);
            }
            Update::Deleted(o) => {
                self.tenants.remove(&o.name);
                self.residency.remove(&o.name);
                self.itemised_usage.remove(&o.name);
            }
        }
    }
}

mod follow;
pub use follow::follow;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // As they come on the wire.
    fn deployment(id: &str, tenant: &str, name: &str) -> Object<Deployment> {
        serde_json::from_value(json!({"id": id, "tenant": tenant, "name": name,
            "revision": 1, "created_at": "", "updated_at": "",
            "spec": {"engine": "simulated", "model": "m", "resources": {"cpu": "1", "memory": "1Gi"},
                     "replicas": {"min": 1, "max": 1}},
            "status": {"state": "pending", "reason": "waiting"}}))
        .unwrap()
    }

    fn replica(id: &str, deployment: &str, state: &str) -> Object<Placement> {
        serde_json::from_value(
            json!({"id": id, "name": format!("{id}-name"), "tenant": "t",
            "revision": 1, "created_at": "", "updated_at": "",
            "spec": {"deployment": deployment, "deployment_name": "d", "replica": 0, "node": "n",
                     "engine": "simulated", "model": "m", "model_source": "s", "model_task": "chat",
                     "resources": {"cpu": "1", "memory": "1Gi"}},
            "status": {"state": state, "reason": "", "endpoint": format!("http://{id}")}}),
        )
        .unwrap()
    }

    /// The replica `target` picks, or `None` when none is ready.
    fn chosen(r: &Routes, tenant: &str, exclude: &[&str]) -> Option<String> {
        let exclude: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        match r.target(tenant, "chat", 7, &exclude).map(|(t, _)| t) {
            Some(Target::Replica { replica, .. }) => Some(replica.id.clone()),
            Some(Target::NoneReady { .. }) => None,
            other => panic!("unexpected target: {}", other.is_some()),
        }
    }

    #[test]
    fn a_request_sees_only_its_own_deployments_running_replicas() {
        let mut r = Routes::default();
        r.apply_deployment(Update::Snapshot(vec![
            deployment("d1", "t1", "chat"),
            deployment("d2", "t2", "chat"),
        ]));
        r.apply_replica(Update::Snapshot(vec![
            replica("p1", "d1", "running"),
            replica("p2", "d2", "running"),
            replica("p3", "d1", "provisioning"),
        ]));
        assert_eq!(chosen(&r, "t1", &[]).as_deref(), Some("p1"));
        assert_eq!(chosen(&r, "t2", &[]).as_deref(), Some("p2"));
        assert_eq!(chosen(&r, "t1", &["p1"]), None, "p3 is not running");
        assert!(
            r.target("t3", "chat", 7, &[]).is_none(),
            "no such deployment"
        );

        // A tenant's container workload is never a route, nor warned of.
        let mut container = replica("w1", "d1", "running");
        container.spec.container = serde_json::from_value(json!({"image": "t/x:1"})).ok();
        container.status.as_mut().unwrap().endpoint = Some("tcp://10.0.0.2:80".into());
        r.apply_replica(Update::Added(container));
        assert!(!r.replicas.contains_key("w1"));
        assert_eq!(chosen(&r, "t1", &["p1"]), None);

        r.apply_replica(Update::Modified(replica("p3", "d1", "running")));
        assert_eq!(chosen(&r, "t1", &["p1"]).as_deref(), Some("p3"));
        r.apply_replica(Update::Deleted(replica("p1", "d1", "running")));
        assert_eq!(chosen(&r, "t1", &[]).as_deref(), Some("p3"));
        assert_eq!(r.models_of("t1"), vec!["chat".to_string()]);

        // A saved table restores the same routing.
        let mut restored = Routes::default();
        restored.restore(r.save());
        assert_eq!(chosen(&restored, "t1", &[]).as_deref(), Some("p3"));
        assert_eq!(chosen(&restored, "t2", &[]).as_deref(), Some("p2"));

        r.apply_deployment(Update::Deleted(deployment("d1", "t1", "chat")));
        assert!(r.target("t1", "chat", 7, &[]).is_none());
        assert!(r.models_of("t1").is_empty());
        assert_eq!(chosen(&r, "t2", &[]).as_deref(), Some("p2"));
    }
}
