//! What callers of the fleet scheduler give and get: nodes and their
//! GPUs, tenants' policies, requests, bindings, and why a request was
//! refused.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::mig::MigProfile;

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

    pub(super) fn plus(self, o: Amount) -> Amount {
        Amount {
            cpu_milli: self.cpu_milli.saturating_add(o.cpu_milli),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            gpu_milli: self.gpu_milli.saturating_add(o.gpu_milli),
        }
    }

    pub(super) fn minus(self, o: Amount) -> Amount {
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

    pub(super) fn limit(&self) -> Amount {
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
    pub(super) fn milli(&self) -> u64 {
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
    /// Acceptable nodes (those holding its volumes); any when empty.
    pub nodes: Vec<String>,
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
    pub(super) node_index: usize,
    #[serde(skip)]
    pub(super) gpu: GpuAsk,
    #[serde(skip)]
    pub(super) gpu_memory_per_slot: u64,
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
    NoNode(BTreeMap<NoFit, usize>),
    #[error("gang cannot be placed whole: {0}")]
    Gang(String),
}

/// `n × reason` per reason, in the reasons' alphabetical order.
fn summary(reasons: &BTreeMap<NoFit, usize>) -> String {
    if reasons.is_empty() {
        return "the fleet has no nodes".into();
    }
    let mut parts: Vec<(&str, usize)> = reasons.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    parts.sort_unstable();
    parts
        .iter()
        .map(|(r, n)| format!("{n} × {r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why one node cannot take a request. One definition for the quick
/// rule-outs (`Summary::admits`) and the full fit (`Fleet::options`), so
/// the two always give the same reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NoFit {
    CpuOrMemory,
    NoNvlinkDomain,
    NoFreeGpu,
    NoGpuShare,
    NoMigPosition,
    SharedNode,
    DedicatedToAnother,
    NotInSites,
    NotItsNodes,
    OutsideResidency,
    OutsideLeaf,
    UnknownClass,
    NoOption,
    NodeGone,
    NoLongerFits,
}

impl NoFit {
    /// No room for `n` whole GPUs.
    pub fn whole_gpus(n: u32) -> NoFit {
        if n > 1 {
            NoFit::NoNvlinkDomain
        } else {
            NoFit::NoFreeGpu
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NoFit::CpuOrMemory => "not enough free CPU or memory",
            NoFit::NoNvlinkDomain => "no NVLink domain with enough free GPUs of a fitting model",
            NoFit::NoFreeGpu => "no free GPU of a fitting model",
            NoFit::NoGpuShare => "no GPU with that much free share and memory",
            NoFit::NoMigPosition => "no MIG-capable GPU with a free position for that profile",
            NoFit::SharedNode => "shared with another tenant (tenant is dedicated-node)",
            NoFit::DedicatedToAnother => "dedicated to another tenant",
            NoFit::NotInSites => "not in the requested sites",
            NoFit::NotItsNodes => "not a node that holds (or has disk for) its volumes",
            NoFit::OutsideResidency => "outside the tenant's residency",
            NoFit::OutsideLeaf => "outside the gang's leaf group",
            NoFit::UnknownClass => "unknown node class",
            NoFit::NoOption => "no option",
            NoFit::NodeGone => "node no longer exists",
            NoFit::NoLongerFits => "no longer fits where it was",
        }
    }
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
