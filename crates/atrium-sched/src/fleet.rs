//! The scheduler of Atrium's own fleet: where each replica (or gang of
//! workers) of a tenant goes, honouring what a multi-tenant GPU cloud needs
//! and the trace experiments ignore.
//!
//! - Resources: CPU, memory, whole GPUs (a multi-GPU replica inside one
//!   NVLink domain), a fraction of one GPU with GPU memory, or a MIG
//!   instance at a valid position (see `mig`); GPU model constraints.
//! - Tenancy: residency (only nodes in the tenant's jurisdictions),
//!   isolation tiers (dedicated-gpu: no other tenant on the same physical
//!   GPU; dedicated-node: none on the node), quotas with a guaranteed and a
//!   borrowable part, weighted dominant-resource fair share among tenants
//!   competing for the same pool (`place_fairly`), priorities and
//!   preemption that evicts the fewest, lowest-priority, borrowed units
//!   first and never a higher priority.
//! - Topology: gangs (all members or none), optionally within one leaf
//!   (rail) group.
//! - Scoring: the Atrium policy of `policy` (fragmentation plus stranded
//!   GPUs, quantised, ties to the first node by name), over a workload
//!   profile learnt from the requests the fleet has seen.
//!
//! Speed: nodes in identical state (same static class and the same use)
//! score identically, so candidates are scored once per class of such
//! nodes, kept up to date as bindings change; the first node of the class
//! by name stands for it, and at most `CANDIDATES` states are scored.
//!
//! Everything here is pure and deterministic: the same calls in the same
//! order give the same bindings.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::frag::{node_fragmentation, Pairing, Shape};
use crate::mig::{self, MigProfile, MigSpec, MigUse};
use crate::policy::STRANDING_WEIGHT;
use crate::trace::Pod;

/// An amount of the pooled resources, for quotas and fair share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Amount {
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpu_milli: u64,
}

impl Amount {
    pub const UNLIMITED: Amount = Amount {
        cpu_milli: u64::MAX,
        memory_mib: u64::MAX,
        gpu_milli: u64::MAX,
    };

    fn plus(self, o: Amount) -> Amount {
        Amount {
            cpu_milli: self.cpu_milli.saturating_add(o.cpu_milli),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            gpu_milli: self.gpu_milli.saturating_add(o.gpu_milli),
        }
    }

    fn minus(self, o: Amount) -> Amount {
        Amount {
            cpu_milli: self.cpu_milli.saturating_sub(o.cpu_milli),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            gpu_milli: self.gpu_milli.saturating_sub(o.gpu_milli),
        }
    }

    /// The first resource in which `self` exceeds `limit`.
    pub fn exceeds(&self, limit: &Amount) -> Option<&'static str> {
        if self.gpu_milli > limit.gpu_milli {
            Some("gpu")
        } else if self.cpu_milli > limit.cpu_milli {
            Some("cpu")
        } else if self.memory_mib > limit.memory_mib {
            Some("memory")
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Isolation {
    Shared,
    DedicatedGpu,
    DedicatedNode,
}

/// What the scheduler must know of a tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPolicy {
    pub isolation: Isolation,
    /// Jurisdictions its workloads may run in; None: anywhere.
    pub jurisdictions: Option<Vec<String>>,
    /// Always available to it; preemption reclaims it from borrowers.
    pub guaranteed: Amount,
    /// Usable beyond the guarantee while others leave it idle; such units
    /// are "borrowed" and are evicted first.
    pub borrowable: Amount,
    /// Weight in the fair share (dominant share is divided by it); ≥ 1.
    pub weight: u32,
}

impl TenantPolicy {
    pub fn shared() -> TenantPolicy {
        TenantPolicy {
            isolation: Isolation::Shared,
            jurisdictions: None,
            guaranteed: Amount::UNLIMITED,
            borrowable: Amount::default(),
            weight: 1,
        }
    }

    fn limit(&self) -> Amount {
        self.guaranteed.plus(self.borrowable)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    pub model: String,
    pub memory_mib: u64,
    /// GPUs with the same domain are NVLink-connected; None: PCIe only.
    pub nvlink: Option<String>,
    /// Whether it can be partitioned into MIG instances (its model must
    /// have a known geometry). A GPU is in MIG mode while it holds an
    /// instance; then only MIG requests use it.
    pub mig_capable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub site: String,
    pub jurisdiction: String,
    /// Leaf switch / rail group, for gangs that must stay within one.
    pub leaf: Option<String>,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpus: Vec<GpuDevice>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GpuAsk {
    None,
    /// Whole GPUs, all in one NVLink domain.
    Whole(u32),
    /// A fraction of one GPU, in milli-GPU (1–999).
    Share(u32),
    Mig(#[serde(serialize_with = "as_string")] MigProfile),
}

fn as_string<S: serde::Serializer>(p: &MigProfile, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(p)
}

impl GpuAsk {
    fn milli(&self) -> u64 {
        match self {
            GpuAsk::None => 0,
            GpuAsk::Whole(n) => u64::from(*n) * 1000,
            GpuAsk::Share(m) => u64::from(*m),
            GpuAsk::Mig(p) => (u64::from(p.compute) * 1000).div_ceil(7),
        }
    }
}

/// One unit to place: a replica, or one member of a gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: String,
    pub tenant: String,
    pub priority: i32,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpu: GpuAsk,
    /// GPU memory it needs in all (split evenly over whole GPUs).
    pub gpu_memory_mib: u64,
    /// Acceptable GPU models; any when empty.
    pub models: Vec<String>,
    /// Acceptable sites; any when empty.
    pub sites: Vec<String>,
}

impl Request {
    pub fn amount(&self) -> Amount {
        Amount {
            cpu_milli: self.cpu_milli,
            memory_mib: self.memory_mib,
            gpu_milli: self.gpu.milli(),
        }
    }
}

/// A part of one GPU a binding holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Slot {
    Whole { gpu: usize },
    Share { gpu: usize, milli: u32 },
    Mig { gpu: usize, start: u8 },
}

impl Slot {
    pub fn gpu(&self) -> usize {
        match self {
            Slot::Whole { gpu } | Slot::Share { gpu, .. } | Slot::Mig { gpu, .. } => *gpu,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Binding {
    pub request: String,
    pub tenant: String,
    pub priority: i32,
    pub node: String,
    pub slots: Vec<Slot>,
    /// Placed beyond the tenant's guarantee: evicted first.
    pub borrowed: bool,
    #[serde(skip)]
    pub amount: Amount,
    #[serde(skip)]
    node_index: usize,
    #[serde(skip)]
    gpu: GpuAsk,
    #[serde(skip)]
    gpu_memory_per_slot: u64,
}

impl Binding {
    pub fn node_index(&self) -> usize {
        self.node_index
    }
}

/// Why a request was not placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("tenant {0:?} is not known to the scheduler")]
    UnknownTenant(String),
    #[error("request {0:?} is already placed")]
    Duplicate(String),
    #[error("over quota: {resource} would be {wanted}, the limit is {limit}")]
    OverQuota {
        resource: &'static str,
        wanted: u64,
        limit: u64,
    },
    #[error("MIG profile {0} is offered by no GPU in the fleet")]
    UnknownMigProfile(String),
    /// No node can take it; per reason, how many nodes gave it.
    #[error("no node fits: {}", summary(.0))]
    NoNode(BTreeMap<&'static str, usize>),
    #[error("gang cannot be placed whole: {0}")]
    Gang(String),
}

fn summary(reasons: &BTreeMap<&'static str, usize>) -> String {
    if reasons.is_empty() {
        return "the fleet has no nodes".into();
    }
    reasons
        .iter()
        .map(|(r, n)| format!("{n} × {r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct GpuUse {
    milli: u16,
    memory_mib: u64,
    mig: MigUse,
    /// Tenant indices holding part of it (one entry per slot).
    tenants: Vec<u32>,
}

impl GpuUse {
    /// Free capacity as the fragmentation measure sees it: a GPU in MIG
    /// mode only takes MIG requests, so count its free compute slices.
    fn free_for_scoring(&self) -> u16 {
        if self.mig.instances > 0 {
            (u16::from(mig::COMPUTE_SLICES.saturating_sub(self.mig.compute)) * 1000) / 7
        } else {
            1000u16.saturating_sub(self.milli)
        }
    }
}

#[derive(Debug, Clone, Default)]
struct NodeUse {
    cpu_milli: u64,
    memory_mib: u64,
    gpus: Vec<GpuUse>,
    /// Tenant indices with a binding here (one entry per binding).
    tenants: Vec<u32>,
}

/// Everything a decision for a node depends on, so equal keys decide alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ClassKey {
    static_class: u32,
    cpu_milli: u64,
    memory_mib: u64,
    gpus: Vec<(u16, u64, u8, u8, u8, Vec<u32>)>,
    tenants: Vec<u32>,
}

/// What one binding holds, as `apply` adds or removes it.
struct Held {
    tenant: u32,
    amount: Amount,
    ask: GpuAsk,
    gpu_memory_per_slot: u64,
}

impl Held {
    fn of(r: &Request, tenant: u32) -> Held {
        Held {
            tenant,
            amount: r.amount(),
            ask: r.gpu,
            gpu_memory_per_slot: Fleet::gpu_memory_per_slot(r),
        }
    }
}

/// A placement decision for one request on one node.
#[derive(Debug, Clone)]
struct Choice {
    node: usize,
    slots: Vec<Slot>,
    score: i64,
}

pub struct Fleet {
    nodes: Vec<Node>,
    static_class: Vec<u32>,
    static_count: usize,
    used: Vec<NodeUse>,
    /// Interned class of each node's state, and a summary of what it can
    /// still take, both updated on every bind and release.
    class_ids: HashMap<ClassKey, u32>,
    class_of: Vec<u32>,
    summary: Vec<Summary>,
    models: Vec<String>,
    tenants: BTreeMap<String, TenantPolicy>,
    tenant_index: HashMap<String, u32>,
    tenant_names: Vec<String>,
    usage: HashMap<String, Amount>,
    bindings: BTreeMap<String, Binding>,
    total: Amount,
    /// Request shapes seen, for the workload profile the score looks
    /// ahead to.
    seen: Vec<Pod>,
    shapes: Vec<Shape>,
    pairing: Pairing,
    profiled_at: usize,
}

/// Most distinct candidate states scored per decision, taken in node-name
/// order. Scoring every state of a large, busy fleet costs milliseconds
/// (a 10,000-node fleet under a varied workload has thousands); like
/// kube-scheduler's `percentageOfNodesToScore`, a bounded sample keeps a
/// decision fast, and taking it in name order keeps the packing that ties
/// in name order give.
const CANDIDATES: usize = 128;

/// What a node can still take, to rule it out without scoring.
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    cpu_free: u64,
    memory_free: u64,
    /// Most free whole GPUs in one NVLink domain.
    whole_in_domain: u8,
    /// Largest free share of a GPU not in MIG mode.
    share_max: u16,
    /// Bit k: `mig::ALL_PROFILES[k]` can start on some GPU.
    mig_open: u16,
    /// The tenants here: none, exactly one, or several.
    tenants: Tenants,
    /// A dedicated-node tenant holding the node.
    dedicated_to: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Tenants {
    #[default]
    None,
    One(u32),
    Several,
}

impl Summary {
    /// Node isolation, as `Fleet::tenancy_allows` judges it on a full use.
    fn tenancy_allows(&self, t: u32, isolation: Isolation) -> Result<(), &'static str> {
        let others = match self.tenants {
            Tenants::None => false,
            Tenants::One(x) => x != t,
            Tenants::Several => true,
        };
        if isolation == Isolation::DedicatedNode && others {
            return Err("shared with another tenant (tenant is dedicated-node)");
        }
        if self.dedicated_to.is_some_and(|x| x != t) {
            return Err("dedicated to another tenant");
        }
        Ok(())
    }

    /// Rules out what cannot fit; the reasons match `Fleet::options`.
    fn admits(&self, r: &Request) -> Result<(), &'static str> {
        if self.cpu_free < r.cpu_milli || self.memory_free < r.memory_mib {
            return Err("not enough free CPU or memory");
        }
        match r.gpu {
            GpuAsk::None => Ok(()),
            GpuAsk::Whole(n) if u32::from(self.whole_in_domain) < n => Err(if n > 1 {
                "no NVLink domain with enough free GPUs of a fitting model"
            } else {
                "no free GPU of a fitting model"
            }),
            GpuAsk::Share(m) if u32::from(self.share_max) < m => {
                Err("no GPU with that much free share and memory")
            }
            GpuAsk::Mig(p) => {
                let open = mig::ALL_PROFILES
                    .iter()
                    .position(|x| *x == p)
                    .is_some_and(|k| self.mig_open & (1 << k) != 0);
                if open {
                    Ok(())
                } else {
                    Err("no MIG-capable GPU with a free position for that profile")
                }
            }
            _ => Ok(()),
        }
    }
}

/// Whether sites and residency let `r` onto `node`.
fn static_allows(node: &Node, r: &Request, policy: &TenantPolicy) -> Result<(), &'static str> {
    if !r.sites.is_empty() && !r.sites.contains(&node.site) {
        return Err("not in the requested sites");
    }
    if let Some(js) = &policy.jurisdictions {
        if !js.contains(&node.jurisdiction) {
            return Err("outside the tenant's residency");
        }
    }
    Ok(())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Fleet {
    /// A fleet of `nodes` (any order; ties go to the first by name).
    pub fn new(mut nodes: Vec<Node>, tenants: BTreeMap<String, TenantPolicy>) -> Fleet {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut models: Vec<String> = nodes
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| g.model.clone()))
            .collect();
        models.sort();
        models.dedup();
        let mut statics: Vec<Node> = Vec::new();
        let static_class = nodes
            .iter()
            .map(|n| {
                let stripped = Node {
                    name: String::new(),
                    ..n.clone()
                };
                let i = statics
                    .iter()
                    .position(|s| *s == stripped)
                    .unwrap_or_else(|| {
                        statics.push(stripped);
                        statics.len() - 1
                    });
                i as u32
            })
            .collect();
        let used: Vec<NodeUse> = nodes
            .iter()
            .map(|n| NodeUse {
                gpus: vec![GpuUse::default(); n.gpus.len()],
                ..NodeUse::default()
            })
            .collect();
        let total = nodes.iter().fold(Amount::default(), |a, n| {
            a.plus(Amount {
                cpu_milli: n.cpu_milli,
                memory_mib: n.memory_mib,
                gpu_milli: n.gpus.len() as u64 * 1000,
            })
        });
        let mut fleet = Fleet {
            nodes,
            static_count: statics.len(),
            static_class,
            used,
            class_ids: HashMap::new(),
            class_of: Vec::new(),
            summary: Vec::new(),
            models,
            tenants: BTreeMap::new(),
            tenant_index: HashMap::new(),
            tenant_names: Vec::new(),
            usage: HashMap::new(),
            bindings: BTreeMap::new(),
            total,
            seen: Vec::new(),
            shapes: Vec::new(),
            pairing: Pairing::of(&[]),
            profiled_at: 0,
        };
        for (name, policy) in tenants {
            fleet.set_tenant(&name, policy);
        }
        fleet.class_of = vec![0; fleet.nodes.len()];
        fleet.summary = vec![Summary::default(); fleet.nodes.len()];
        for i in 0..fleet.nodes.len() {
            fleet.rekey(i);
        }
        fleet
    }

    /// Adds or changes a tenant. Its bindings stay; new limits apply to
    /// what it asks next.
    pub fn set_tenant(&mut self, name: &str, policy: TenantPolicy) {
        if !self.tenant_index.contains_key(name) {
            self.tenant_index
                .insert(name.to_string(), self.tenant_names.len() as u32);
            self.tenant_names.push(name.to_string());
        }
        let isolation_changed =
            self.tenants.get(name).map(|p| p.isolation) != Some(policy.isolation);
        self.tenants.insert(name.to_string(), policy);
        // Node summaries record dedicated-node holders.
        if isolation_changed {
            for i in 0..self.summary.len() {
                self.summary[i] = self.summary_of(i, &self.used[i]);
            }
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn bindings(&self) -> impl Iterator<Item = &Binding> {
        self.bindings.values()
    }

    pub fn binding(&self, request: &str) -> Option<&Binding> {
        self.bindings.get(request)
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantPolicy> {
        self.tenants.get(name)
    }

    /// What a tenant holds now.
    pub fn usage(&self, tenant: &str) -> Amount {
        self.usage.get(tenant).copied().unwrap_or_default()
    }

    /// The pool's capacity.
    pub fn total(&self) -> Amount {
        self.total
    }

    /// Distinct node states the scorer evaluates (for the benchmark).
    pub fn class_count(&self) -> usize {
        self.class_of
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    fn key_of(&self, i: usize) -> ClassKey {
        let u = &self.used[i];
        let mut tenants = u.tenants.clone();
        tenants.sort_unstable();
        tenants.dedup();
        ClassKey {
            static_class: self.static_class[i],
            cpu_milli: u.cpu_milli,
            memory_mib: u.memory_mib,
            gpus: u
                .gpus
                .iter()
                .map(|g| {
                    let mut t = g.tenants.clone();
                    t.sort_unstable();
                    t.dedup();
                    (
                        g.milli,
                        g.memory_mib,
                        g.mig.mask,
                        g.mig.compute,
                        g.mig.instances,
                        t,
                    )
                })
                .collect(),
            tenants,
        }
    }

    fn rekey(&mut self, i: usize) {
        let key = self.key_of(i);
        let next = self.class_ids.len() as u32;
        self.class_of[i] = *self.class_ids.entry(key).or_insert(next);
        self.summary[i] = self.summary_of(i, &self.used[i]);
    }

    fn summary_of(&self, i: usize, u: &NodeUse) -> Summary {
        let node = &self.nodes[i];
        let mut domains: BTreeMap<Option<&str>, u8> = BTreeMap::new();
        let mut share_max = 0u16;
        let mut mig_open = 0u16;
        for (g, gu) in node.gpus.iter().zip(&u.gpus) {
            if gu.mig.instances == 0 {
                share_max = share_max.max(1000u16.saturating_sub(gu.milli));
                if gu.milli == 0 && gu.tenants.is_empty() {
                    *domains.entry(g.nvlink.as_deref()).or_default() += 1;
                }
            }
            if g.mig_capable && gu.milli == 0 {
                if let Some(geometry) = mig::geometry(&g.model) {
                    for (k, spec) in mig::ALL_PROFILES.iter().enumerate() {
                        let open = geometry
                            .iter()
                            .find(|s| s.profile == *spec)
                            .is_some_and(|s| gu.mig.best_start(geometry, s).is_some());
                        if open {
                            mig_open |= 1 << k;
                        }
                    }
                }
            }
        }
        let mut distinct = u.tenants.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let tenants = match distinct.as_slice() {
            [] => Tenants::None,
            [one] => Tenants::One(*one),
            _ => Tenants::Several,
        };
        let dedicated_to = distinct
            .iter()
            .copied()
            .find(|x| self.isolation_of(*x) == Some(Isolation::DedicatedNode));
        Summary {
            tenants,
            dedicated_to,
            cpu_free: node.cpu_milli.saturating_sub(u.cpu_milli),
            memory_free: node.memory_mib.saturating_sub(u.memory_mib),
            whole_in_domain: domains.values().copied().max().unwrap_or(0),
            share_max,
            mig_open,
        }
    }

    /// Re-learns the workload profile as requests arrive: at first often,
    /// then every time the history has grown by an eighth.
    fn learn(&mut self, r: &Request) {
        let (num_gpu, gpu_milli) = match r.gpu {
            GpuAsk::None => (0, 0),
            GpuAsk::Whole(n) => (n, 1000),
            GpuAsk::Share(m) => (1, m),
            GpuAsk::Mig(_) => (1, u32::try_from(r.gpu.milli()).unwrap_or(1000)),
        };
        self.seen.push(Pod {
            cpu_milli: u32::try_from(r.cpu_milli).unwrap_or(u32::MAX),
            memory_mib: u32::try_from(r.memory_mib).unwrap_or(u32::MAX),
            num_gpu,
            gpu_milli,
            gpu_spec: r.models.clone(),
        });
        if self.seen.len() > self.profiled_at + self.profiled_at / 8 {
            let models = self.models.clone();
            self.shapes = crate::frag::typical_shapes(
                &self.seen,
                &|m| models.iter().position(|x| x == m),
                95.0,
            );
            self.pairing = Pairing::of(&self.seen);
            self.profiled_at = self.seen.len();
        }
    }

    /// Fragmentation plus weighted stranding of a node in a given use, by
    /// the GPU model of its first GPU (nodes carry one model, as in the
    /// traces; mixed nodes are scored by their first).
    fn cost(&self, node: &Node, cpu_used: u64, memory_used: u64, gpu_left: &[u16]) -> f64 {
        let cpu_left = node.cpu_milli.saturating_sub(cpu_used);
        let mem_left = node.memory_mib.saturating_sub(memory_used);
        let model = node
            .gpus
            .first()
            .and_then(|g| self.models.iter().position(|m| *m == g.model));
        let cpu = u32::try_from(cpu_left).unwrap_or(u32::MAX);
        let mem = u32::try_from(mem_left).unwrap_or(u32::MAX);
        node_fragmentation(cpu, model, gpu_left, &self.shapes)
            + STRANDING_WEIGHT * self.pairing.stranded(cpu, mem, gpu_left)
    }

    fn gpu_shareable(&self, g: &GpuUse, t: u32, policy: &TenantPolicy) -> bool {
        if g.tenants.iter().all(|x| *x == t) {
            return true;
        }
        if policy.isolation != Isolation::Shared {
            return false;
        }
        // Another tenant is here: is it one that wants the GPU to itself?
        !g.tenants.iter().any(|x| {
            *x != t
                && self
                    .isolation_of(*x)
                    .is_some_and(|i| i != Isolation::Shared)
        })
    }

    /// The isolation tier of the tenant with index `t`.
    fn isolation_of(&self, t: u32) -> Option<Isolation> {
        let name = self.tenant_names.get(t as usize)?;
        self.tenants.get(name).map(|p| p.isolation)
    }

    /// The GPU slots `r` would take on node `i` in use `u`, per option (one
    /// per distinct outcome), or why none.
    fn options(
        &self,
        i: usize,
        u: &NodeUse,
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
    ) -> Result<Vec<Vec<Slot>>, &'static str> {
        let node = &self.nodes[i];
        if node.cpu_milli.saturating_sub(u.cpu_milli) < r.cpu_milli
            || node.memory_mib.saturating_sub(u.memory_mib) < r.memory_mib
        {
            return Err("not enough free CPU or memory");
        }
        let model_ok = |g: &GpuDevice| r.models.is_empty() || r.models.contains(&g.model);
        match r.gpu {
            GpuAsk::None => Ok(vec![Vec::new()]),
            GpuAsk::Whole(n) => {
                let per = r.gpu_memory_mib.div_ceil(u64::from(n.max(1)));
                // Free whole GPUs, grouped by NVLink domain.
                let mut domains: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
                for (gi, (g, gu)) in node.gpus.iter().zip(&u.gpus).enumerate() {
                    if model_ok(g)
                        && g.memory_mib >= per
                        && gu.milli == 0
                        && gu.mig.instances == 0
                        && gu.tenants.is_empty()
                    {
                        domains.entry(g.nvlink.as_deref()).or_default().push(gi);
                    }
                }
                // The smallest domain that holds them all keeps big ones
                // whole for big replicas.
                let best = domains
                    .values()
                    .filter(|d| d.len() >= n as usize)
                    .min_by_key(|d| d.len())
                    .ok_or(if n > 1 {
                        "no NVLink domain with enough free GPUs of a fitting model"
                    } else {
                        "no free GPU of a fitting model"
                    })?;
                Ok(vec![best
                    .iter()
                    .take(n as usize)
                    .map(|gpu| Slot::Whole { gpu: *gpu })
                    .collect()])
            }
            GpuAsk::Share(milli) => {
                let mut seen: Vec<(u16, u64, &[u32])> = Vec::new();
                let mut out = Vec::new();
                for (gi, (g, gu)) in node.gpus.iter().zip(&u.gpus).enumerate() {
                    let fits = model_ok(g)
                        && gu.mig.instances == 0
                        && u32::from(1000 - gu.milli.min(1000)) >= milli
                        && g.memory_mib.saturating_sub(gu.memory_mib) >= r.gpu_memory_mib
                        && self.gpu_shareable(gu, t, policy);
                    let sig = (gu.milli, gu.memory_mib, gu.tenants.as_slice());
                    if fits && !seen.contains(&sig) {
                        seen.push(sig);
                        out.push(vec![Slot::Share { gpu: gi, milli }]);
                    }
                }
                if out.is_empty() {
                    Err("no GPU with that much free share and memory")
                } else {
                    Ok(out)
                }
            }
            GpuAsk::Mig(p) => {
                let mut out = Vec::new();
                let mut seen: Vec<MigUse> = Vec::new();
                for (gi, (g, gu)) in node.gpus.iter().zip(&u.gpus).enumerate() {
                    let Some(geometry) = g.mig_capable.then(|| mig::geometry(&g.model)).flatten()
                    else {
                        continue;
                    };
                    let Some(spec) = geometry.iter().find(|s| s.profile == p) else {
                        continue;
                    };
                    if !model_ok(g) || gu.milli > 0 || !self.gpu_shareable(gu, t, policy) {
                        continue;
                    }
                    if let Some(start) = gu.mig.best_start(geometry, spec) {
                        if !seen.contains(&gu.mig) {
                            seen.push(gu.mig);
                            out.push(vec![Slot::Mig { gpu: gi, start }]);
                        }
                    }
                }
                if out.is_empty() {
                    Err("no MIG-capable GPU with a free position for that profile")
                } else {
                    Ok(out)
                }
            }
        }
    }

    fn mig_spec(&self, node: usize, gpu: usize, ask: GpuAsk) -> Option<&'static MigSpec> {
        let GpuAsk::Mig(p) = ask else { return None };
        let g = self.nodes.get(node)?.gpus.get(gpu)?;
        mig::geometry(&g.model)?.iter().find(|s| s.profile == p)
    }

    /// Adds (or, with `add` false, removes) what `h` holds in `slots` to a
    /// node's use.
    fn apply(&self, u: &mut NodeUse, node: usize, h: &Held, slots: &[Slot], add: bool) {
        let (t, r_amount, ask, gpu_mem) = (h.tenant, h.amount, h.ask, h.gpu_memory_per_slot);
        if add {
            u.cpu_milli += r_amount.cpu_milli;
            u.memory_mib += r_amount.memory_mib;
            u.tenants.push(t);
        } else {
            u.cpu_milli = u.cpu_milli.saturating_sub(r_amount.cpu_milli);
            u.memory_mib = u.memory_mib.saturating_sub(r_amount.memory_mib);
            if let Some(p) = u.tenants.iter().position(|x| *x == t) {
                u.tenants.swap_remove(p);
            }
        }
        for s in slots {
            let Some(g) = u.gpus.get_mut(s.gpu()) else {
                continue;
            };
            let milli = match s {
                Slot::Whole { .. } => 1000,
                Slot::Share { milli, .. } => *milli as u16,
                Slot::Mig { .. } => 0,
            };
            if let Slot::Mig { gpu, start } = s {
                if let Some(spec) = self.mig_spec(node, *gpu, ask) {
                    g.mig = if add {
                        g.mig.with(spec, *start)
                    } else {
                        g.mig.without(spec, *start)
                    };
                }
            }
            if add {
                g.milli += milli;
                g.memory_mib += gpu_mem;
                g.tenants.push(t);
            } else {
                g.milli = g.milli.saturating_sub(milli);
                g.memory_mib = g.memory_mib.saturating_sub(gpu_mem);
                if let Some(p) = g.tenants.iter().position(|x| *x == t) {
                    g.tenants.swap_remove(p);
                }
            }
        }
    }

    fn held_by(&self, b: &Binding) -> Held {
        Held {
            tenant: self.tenant_index.get(&b.tenant).copied().unwrap_or(0),
            amount: b.amount,
            ask: b.gpu,
            gpu_memory_per_slot: b.gpu_memory_per_slot,
        }
    }

    fn gpu_memory_per_slot(r: &Request) -> u64 {
        match r.gpu {
            GpuAsk::Whole(n) => r.gpu_memory_mib.div_ceil(u64::from(n.max(1))),
            GpuAsk::Share(_) => r.gpu_memory_mib,
            _ => 0,
        }
    }

    /// The best choice on node `i` in use `u`, scored.
    fn best_on(
        &self,
        i: usize,
        u: &NodeUse,
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
    ) -> Result<Choice, &'static str> {
        let options = self.options(i, u, r, t, policy)?;
        let node = &self.nodes[i];
        let base: Vec<u16> = u.gpus.iter().map(GpuUse::free_for_scoring).collect();
        let before = self.cost(node, u.cpu_milli, u.memory_mib, &base);
        let (cpu_after, memory_after) = (u.cpu_milli + r.cpu_milli, u.memory_mib + r.memory_mib);
        let mut best: Option<Choice> = None;
        let mut left = base.clone();
        for slots in options {
            left.copy_from_slice(&base);
            for s in &slots {
                let g = s.gpu();
                match s {
                    Slot::Whole { .. } => left[g] = 0,
                    Slot::Share { milli, .. } => left[g] = left[g].saturating_sub(*milli as u16),
                    Slot::Mig { start, .. } => {
                        if let Some(spec) = self.mig_spec(i, g, r.gpu) {
                            let mut after = u.gpus[g].clone();
                            after.mig = after.mig.with(spec, *start);
                            left[g] = after.free_for_scoring();
                        }
                    }
                }
            }
            let after = self.cost(node, cpu_after, memory_after, &left);
            let score = (sigmoid((before - after) / 1000.0) * 100.0) as i64;
            if best.as_ref().is_none_or(|b| score > b.score) {
                best = Some(Choice {
                    node: i,
                    slots,
                    score,
                });
            }
        }
        best.ok_or("no option")
    }

    fn check_quota(
        &self,
        tenant: &str,
        policy: &TenantPolicy,
        extra: Amount,
    ) -> Result<bool, Refusal> {
        let after = self.usage(tenant).plus(extra);
        let limit = policy.limit();
        if let Some(resource) = after.exceeds(&limit) {
            let (wanted, limit) = match resource {
                "gpu" => (after.gpu_milli, limit.gpu_milli),
                "cpu" => (after.cpu_milli, limit.cpu_milli),
                _ => (after.memory_mib, limit.memory_mib),
            };
            return Err(Refusal::OverQuota {
                resource,
                wanted,
                limit,
            });
        }
        Ok(after.exceeds(&policy.guaranteed).is_some())
    }

    fn prepare(&mut self, r: &Request) -> Result<(u32, TenantPolicy), Refusal> {
        let policy = self
            .tenants
            .get(&r.tenant)
            .cloned()
            .ok_or_else(|| Refusal::UnknownTenant(r.tenant.clone()))?;
        if self.bindings.contains_key(&r.id) {
            return Err(Refusal::Duplicate(r.id.clone()));
        }
        if let GpuAsk::Mig(p) = r.gpu {
            let offered = self.nodes.iter().flat_map(|n| &n.gpus).any(|g| {
                g.mig_capable
                    && mig::geometry(&g.model).is_some_and(|geo| geo.iter().any(|s| s.profile == p))
            });
            if !offered {
                return Err(Refusal::UnknownMigProfile(p.to_string()));
            }
        }
        let t = self.tenant_index.get(&r.tenant).copied().unwrap_or(0);
        self.learn(r);
        Ok((t, policy))
    }

    /// The best node for `r` among nodes passing `within`, scored once per
    /// class of identical nodes.
    fn choose(
        &self,
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
        within: &dyn Fn(&Node) -> bool,
    ) -> Result<Choice, Refusal> {
        let mut best: Option<Choice> = None;
        let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut scored: std::collections::HashSet<u32> = std::collections::HashSet::new();
        // Sites and residency depend only on a node's static class.
        let mut statics: Vec<Option<Result<(), &'static str>>> = vec![None; self.static_count];
        for i in 0..self.nodes.len() {
            if scored.len() >= CANDIDATES {
                break;
            }
            let node = &self.nodes[i];
            let verdict = statics
                .get_mut(self.static_class[i] as usize)
                .map(|v| {
                    *v.get_or_insert_with(|| {
                        if !within(node) {
                            Err("outside the gang's leaf group")
                        } else {
                            static_allows(node, r, policy)
                        }
                    })
                })
                .unwrap_or(Err("unknown node class"))
                .and_then(|()| self.summary[i].admits(r))
                .and_then(|()| self.summary[i].tenancy_allows(t, policy.isolation));
            if let Err(why) = verdict {
                *reasons.entry(why).or_default() += 1;
                continue;
            }
            // Nodes in the same state as one already scored score alike;
            // the first by name stands for them.
            if !scored.insert(self.class_of[i]) {
                continue;
            }
            match self.best_on(i, &self.used[i], r, t, policy) {
                Ok(c) => {
                    if best.as_ref().is_none_or(|b| c.score > b.score) {
                        best = Some(c);
                    }
                }
                Err(why) => *reasons.entry(why).or_default() += 1,
            }
        }
        best.ok_or(Refusal::NoNode(reasons))
    }

    fn bind(&mut self, r: &Request, t: u32, borrowed: bool, c: Choice) -> Binding {
        let per = Self::gpu_memory_per_slot(r);
        let mut u = std::mem::take(&mut self.used[c.node]);
        self.apply(&mut u, c.node, &Held::of(r, t), &c.slots, true);
        self.used[c.node] = u;
        self.rekey(c.node);
        let entry = self.usage.entry(r.tenant.clone()).or_default();
        *entry = entry.plus(r.amount());
        let b = Binding {
            request: r.id.clone(),
            tenant: r.tenant.clone(),
            priority: r.priority,
            node: self.nodes[c.node].name.clone(),
            slots: c.slots,
            borrowed,
            amount: r.amount(),
            node_index: c.node,
            gpu: r.gpu,
            gpu_memory_per_slot: per,
        };
        self.bindings.insert(r.id.clone(), b.clone());
        b
    }

    /// Places one request, without evicting anything.
    pub fn place(&mut self, r: &Request) -> Result<Binding, Refusal> {
        let (t, policy) = self.prepare(r)?;
        let borrowed = self.check_quota(&r.tenant, &policy, r.amount())?;
        let c = self.choose(r, t, &policy, &|_| true)?;
        Ok(self.bind(r, t, borrowed, c))
    }

    /// Frees what a request holds; returns its binding.
    pub fn release(&mut self, request: &str) -> Option<Binding> {
        let b = self.bindings.remove(request)?;
        let mut u = std::mem::take(&mut self.used[b.node_index]);
        self.apply(&mut u, b.node_index, &self.held_by(&b), &b.slots, false);
        self.used[b.node_index] = u;
        self.rekey(b.node_index);
        if let Some(e) = self.usage.get_mut(&b.tenant) {
            *e = e.minus(b.amount);
        }
        Some(b)
    }

    /// Re-creates a binding made earlier (the controller restoring what
    /// the store holds), exactly where it was. Refused if it no longer fits.
    pub fn restore(&mut self, r: &Request, node: &str, slots: &[Slot]) -> Result<Binding, Refusal> {
        let (t, policy) = self.prepare(r)?;
        let borrowed = self
            .usage(&r.tenant)
            .plus(r.amount())
            .exceeds(&policy.guaranteed)
            .is_some();
        let Some(i) = self.nodes.iter().position(|n| n.name == node) else {
            return Err(Refusal::NoNode(BTreeMap::from([(
                "node no longer exists",
                1,
            )])));
        };
        // Recorded without slots (made before slots were kept): the best
        // slots on that node now.
        if slots.is_empty() && r.gpu != GpuAsk::None {
            let c = static_allows(&self.nodes[i], r, &policy)
                .and_then(|()| self.best_on(i, &self.used[i], r, t, &policy))
                .map_err(|why| Refusal::NoNode(BTreeMap::from([(why, 1)])))?;
            return Ok(self.bind(r, t, borrowed, c));
        }
        // It must still fit as it was: the same slots among the options,
        // or (for whole GPUs and MIG) free in the same places.
        let mut trial = self.used[i].clone();
        let ok = self.options(i, &trial, r, t, &policy).is_ok() && {
            let fits = slots.iter().all(|s| match (s, trial.gpus.get(s.gpu())) {
                (Slot::Whole { .. }, Some(g)) => g.milli == 0 && g.mig.instances == 0,
                (Slot::Share { milli, .. }, Some(g)) => {
                    g.mig.instances == 0 && u32::from(g.milli) + milli <= 1000
                }
                (Slot::Mig { gpu, start }, Some(g)) => {
                    g.milli == 0
                        && self
                            .mig_spec(i, *gpu, r.gpu)
                            .is_some_and(|spec| g.mig.allows(spec, *start))
                }
                _ => false,
            });
            self.apply(&mut trial, i, &Held::of(r, t), slots, true);
            fits
        };
        if !ok {
            return Err(Refusal::NoNode(BTreeMap::from([(
                "no longer fits where it was",
                1,
            )])));
        }
        Ok(self.bind(
            r,
            t,
            borrowed,
            Choice {
                node: i,
                slots: slots.to_vec(),
                score: 0,
            },
        ))
    }

    /// Places a request, evicting others if that is the only way: on the
    /// node where the fewest must go, taking borrowed units first, then the
    /// lowest priorities. Only units of lower priority may be evicted, or
    /// of equal priority that are borrowed by another tenant while the
    /// requester stays within its guarantee. Returns the binding and the
    /// evicted bindings (already released).
    pub fn place_preempting(&mut self, r: &Request) -> Result<(Binding, Vec<Binding>), Refusal> {
        let refusal = match self.place(r) {
            Ok(b) => return Ok((b, Vec::new())),
            Err(e @ Refusal::NoNode(_)) => e,
            Err(e) => return Err(e),
        };
        let (t, policy) = (
            self.tenant_index.get(&r.tenant).copied().unwrap_or(0),
            self.tenants
                .get(&r.tenant)
                .cloned()
                .ok_or_else(|| Refusal::UnknownTenant(r.tenant.clone()))?,
        );
        let within_guarantee = self
            .usage(&r.tenant)
            .plus(r.amount())
            .exceeds(&policy.guaranteed)
            .is_none();
        let evictable = |b: &Binding| {
            b.priority < r.priority
                || (b.priority == r.priority
                    && b.borrowed
                    && b.tenant != r.tenant
                    && within_guarantee)
        };
        let mut by_node: BTreeMap<usize, Vec<&Binding>> = BTreeMap::new();
        for b in self.bindings.values().filter(|b| evictable(b)) {
            by_node.entry(b.node_index).or_default().push(b);
        }
        // Per node: evict in preference order (borrowed first, lowest
        // priority, newest) and, separately, largest first, until it fits;
        // then keep back every victim that turns out unnecessary. The
        // node needing the fewest evictions wins; then fewer unborrowed,
        // then lower priorities.
        type Key = (usize, usize, i32, usize);
        let mut best: Option<(Key, Vec<String>, Choice)> = None;
        for (node, victims) in by_node {
            let mut preferred = victims.clone();
            preferred.sort_by(|a, b| {
                b.borrowed
                    .cmp(&a.borrowed)
                    .then(a.priority.cmp(&b.priority))
                    .then(b.request.cmp(&a.request))
            });
            let mut largest = preferred.clone();
            largest.sort_by(|a, b| {
                b.amount
                    .gpu_milli
                    .cmp(&a.amount.gpu_milli)
                    .then(b.amount.cpu_milli.cmp(&a.amount.cpu_milli))
            });
            for order in [preferred, largest] {
                let Some(prefix) = (1..=order.len()).find(|k| {
                    self.fits_without(node, &order[..*k], r, t, &policy)
                        .is_some()
                }) else {
                    continue;
                };
                let mut chosen: Vec<&Binding> = order[..prefix].to_vec();
                // Least preferred victims are the first to be kept back.
                for k in (0..chosen.len()).rev() {
                    let mut fewer = chosen.clone();
                    fewer.remove(k);
                    if self.fits_without(node, &fewer, r, t, &policy).is_some() {
                        chosen = fewer;
                    }
                }
                let Some(choice) = self.fits_without(node, &chosen, r, t, &policy) else {
                    continue;
                };
                let unborrowed = chosen.iter().filter(|b| !b.borrowed).count();
                let top = chosen.iter().map(|b| b.priority).max().unwrap_or(i32::MIN);
                let key = (chosen.len(), unborrowed, top, node);
                if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                    best = Some((
                        key,
                        chosen.iter().map(|b| b.request.clone()).collect(),
                        choice,
                    ));
                }
            }
        }
        let Some((_, victims, choice)) = best else {
            return Err(refusal);
        };
        let evicted: Vec<Binding> = victims.iter().filter_map(|id| self.release(id)).collect();
        let borrowed = self.check_quota(&r.tenant, &policy, r.amount())?;
        Ok((self.bind(r, t, borrowed, choice), evicted))
    }

    /// The choice for `r` on `node` were `victims` gone, if it would fit.
    fn fits_without(
        &self,
        node: usize,
        victims: &[&Binding],
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
    ) -> Option<Choice> {
        let mut u = self.used[node].clone();
        for v in victims {
            self.apply(&mut u, node, &self.held_by(v), &v.slots, false);
        }
        static_allows(&self.nodes[node], r, policy).ok()?;
        self.summary_of(node, &u)
            .tenancy_allows(t, policy.isolation)
            .ok()?;
        self.best_on(node, &u, r, t, policy).ok()
    }

    /// Places every member of a gang or none. With `leaf`, all members go
    /// to nodes of one leaf group (tried in name order).
    pub fn place_gang(
        &mut self,
        members: &[Request],
        same_leaf: bool,
    ) -> Result<Vec<Binding>, Refusal> {
        let Some(first) = members.first() else {
            return Ok(Vec::new());
        };
        if members.iter().any(|m| m.tenant != first.tenant) {
            return Err(Refusal::Gang(
                "all members must belong to one tenant".into(),
            ));
        }
        let policy = self
            .tenants
            .get(&first.tenant)
            .cloned()
            .ok_or_else(|| Refusal::UnknownTenant(first.tenant.clone()))?;
        let total = members
            .iter()
            .fold(Amount::default(), |a, m| a.plus(m.amount()));
        self.check_quota(&first.tenant, &policy, total)?;
        let leaves: Vec<Option<String>> = if same_leaf {
            let set: BTreeSet<Option<String>> = self
                .nodes
                .iter()
                .map(|n| n.leaf.clone())
                .filter(Option::is_some)
                .collect();
            set.into_iter().collect()
        } else {
            vec![None]
        };
        let mut last = String::from("no leaf group");
        for leaf in leaves {
            let within = |n: &Node| leaf.is_none() || n.leaf == leaf;
            let mut placed: Vec<Binding> = Vec::new();
            let mut failed = None;
            for m in members {
                let attempt = self.prepare(m).and_then(|(t, policy)| {
                    let borrowed = self.check_quota(&m.tenant, &policy, m.amount())?;
                    let c = self.choose(m, t, &policy, &within)?;
                    Ok(self.bind(m, t, borrowed, c))
                });
                match attempt {
                    Ok(b) => placed.push(b),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => return Ok(placed),
                Some(e) => {
                    // All or nothing: undo this attempt exactly.
                    for b in placed.iter().rev() {
                        self.release(&b.request);
                    }
                    last = match &leaf {
                        Some(l) => format!("leaf {l}: {e}"),
                        None => e.to_string(),
                    };
                }
            }
        }
        Err(Refusal::Gang(last))
    }

    /// A tenant's dominant share of the pool, divided by its weight.
    pub fn weighted_share(&self, tenant: &str) -> f64 {
        let u = self.usage(tenant);
        let share = |x: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                x as f64 / total as f64
            }
        };
        let dominant = share(u.cpu_milli, self.total.cpu_milli)
            .max(share(u.memory_mib, self.total.memory_mib))
            .max(share(u.gpu_milli, self.total.gpu_milli));
        dominant / f64::from(self.tenants.get(tenant).map_or(1, |p| p.weight.max(1)))
    }

    /// Places pending requests in weighted dominant-resource-fair order:
    /// higher priority first; among equals, the tenant with the smallest
    /// weighted dominant share goes next (ties by tenant name), each
    /// tenant's requests in the order given. Returns one result per
    /// request, in the order they were decided.
    pub fn place_fairly(&mut self, pending: &[Request]) -> Vec<(String, Result<Binding, Refusal>)> {
        let mut queues: BTreeMap<&str, std::collections::VecDeque<&Request>> = BTreeMap::new();
        for r in pending {
            queues.entry(r.tenant.as_str()).or_default().push_back(r);
        }
        let mut out = Vec::with_capacity(pending.len());
        loop {
            let next = queues
                .iter()
                .filter_map(|(t, q)| q.front().map(|r| (*t, r.priority)))
                .min_by(|a, b| {
                    b.1.cmp(&a.1)
                        .then(
                            self.weighted_share(a.0)
                                .total_cmp(&self.weighted_share(b.0)),
                        )
                        .then(a.0.cmp(b.0))
                });
            let Some((tenant, _)) = next else { break };
            let Some(r) = queues.get_mut(tenant).and_then(|q| q.pop_front()) else {
                break;
            };
            out.push((r.id.clone(), self.place(r)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn h100_node(name: &str, leaf: &str) -> Node {
        Node {
            name: name.into(),
            site: "fra1".into(),
            jurisdiction: "EU".into(),
            leaf: Some(leaf.into()),
            cpu_milli: 192_000,
            memory_mib: 2_048 * 1024,
            gpus: (0..8)
                .map(|i| GpuDevice {
                    model: "H100-80GB".into(),
                    memory_mib: 80 * 1024,
                    nvlink: Some(if i < 4 { "nv0".into() } else { "nv1".into() }),
                    mig_capable: true,
                })
                .collect(),
        }
    }

    fn req(id: &str, tenant: &str, gpu: GpuAsk) -> Request {
        Request {
            id: id.into(),
            tenant: tenant.into(),
            priority: 0,
            cpu_milli: 4000,
            memory_mib: 16 * 1024,
            gpu,
            gpu_memory_mib: 0,
            models: vec![],
            sites: vec![],
        }
    }

    fn tenants(list: &[(&str, TenantPolicy)]) -> BTreeMap<String, TenantPolicy> {
        list.iter()
            .map(|(n, p)| (n.to_string(), p.clone()))
            .collect()
    }

    #[test]
    fn multi_gpu_replicas_stay_in_one_nvlink_domain() {
        let mut f = Fleet::new(
            vec![h100_node("a", "l1")],
            tenants(&[("t", TenantPolicy::shared())]),
        );
        f.place(&req("one", "t", GpuAsk::Whole(1))).unwrap();
        // Three of nv0 are left; a 4-GPU replica must take all of nv1.
        let b = f.place(&req("four", "t", GpuAsk::Whole(4))).unwrap();
        let gpus: Vec<usize> = b.slots.iter().map(Slot::gpu).collect();
        assert!(gpus.iter().all(|g| *g >= 4), "{gpus:?}");
        // Now a 4-GPU replica has no whole domain left.
        let e = f.place(&req("four-b", "t", GpuAsk::Whole(4))).unwrap_err();
        assert!(e.to_string().contains("NVLink"), "{e}");
    }

    #[test]
    fn quota_splits_guaranteed_and_borrowed_and_release_undoes_all() {
        let policy = TenantPolicy {
            guaranteed: Amount {
                gpu_milli: 1000,
                ..Amount::UNLIMITED
            },
            borrowable: Amount {
                gpu_milli: 1000,
                cpu_milli: 0,
                memory_mib: 0,
            },
            ..TenantPolicy::shared()
        };
        let mut f = Fleet::new(vec![h100_node("a", "l1")], tenants(&[("t", policy)]));
        assert!(!f.place(&req("g", "t", GpuAsk::Whole(1))).unwrap().borrowed);
        assert!(f.place(&req("b", "t", GpuAsk::Whole(1))).unwrap().borrowed);
        let e = f.place(&req("over", "t", GpuAsk::Share(500))).unwrap_err();
        assert_eq!(
            e,
            Refusal::OverQuota {
                resource: "gpu",
                wanted: 2500,
                limit: 2000
            }
        );
        let classes = f.class_count();
        f.release("b");
        f.release("g");
        assert_eq!(f.usage("t"), Amount::default());
        assert_eq!(
            f.class_count(),
            1,
            "back to one class of empty nodes (was {classes})"
        );
    }
}
