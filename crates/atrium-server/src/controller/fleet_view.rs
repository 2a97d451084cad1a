//! The control plane's resources as the fleet scheduler sees them, and its
//! bindings back as placement slots. Pure conversions.

use std::collections::HashMap;

use atrium_core::deployment::Resources;
use atrium_core::node::{NodeSpec, NodeState};
use atrium_core::placement::GpuSlot;
use atrium_core::quantity::GpuRequest;
use atrium_core::site::SiteSpec;
use atrium_core::tenant::{IsolationTier, Residency, TenantSpec};
use atrium_sched::fleet;
use atrium_sched::mig::MigProfile;

/// The scheduler's view of a node; None if it cannot take work (not
/// ready, or its site is unknown).
pub fn fleet_node(
    name: &str,
    spec: &NodeSpec,
    sites: &HashMap<String, SiteSpec>,
) -> Option<fleet::Node> {
    if spec.state != NodeState::Ready {
        return None;
    }
    let site = sites.get(&spec.site)?;
    Some(fleet::Node {
        name: name.to_string(),
        site: spec.site.clone(),
        jurisdiction: site.jurisdiction.clone(),
        leaf: spec.labels.get(LEAF_LABEL).cloned(),
        cpu_milli: spec.capacity.cpu.0,
        memory_mib: spec.capacity.memory.0 / MIB,
        gpus: spec
            .gpus
            .iter()
            .map(|g| fleet::GpuDevice {
                model: g.model.clone(),
                memory_mib: g.memory.0 / MIB,
                nvlink: g.nvlink_domain.clone(),
                mig_capable: g.mig_capable,
            })
            .collect(),
    })
}

/// Node label naming its leaf switch / rail group.
pub const LEAF_LABEL: &str = "atrium.dev/leaf";
const MIB: u64 = 1 << 20;

pub fn tenant_policy(t: &TenantSpec) -> fleet::TenantPolicy {
    let limit = |v: Option<u64>| v.unwrap_or(u64::MAX);
    fleet::TenantPolicy {
        isolation: match t.isolation {
            IsolationTier::Shared => fleet::Isolation::Shared,
            IsolationTier::DedicatedGpu => fleet::Isolation::DedicatedGpu,
            IsolationTier::DedicatedNode => fleet::Isolation::DedicatedNode,
        },
        jurisdictions: match &t.residency {
            Residency::Any => None,
            Residency::Only { jurisdictions } => Some(jurisdictions.clone()),
        },
        // The quota is the guarantee; borrowing is usable beyond it.
        guaranteed: fleet::Amount {
            cpu_milli: limit(t.quota.cpu.map(|c| c.0)),
            memory_mib: limit(t.quota.memory.map(|m| m.0 / MIB)),
            gpu_milli: limit(t.quota.gpus.map(|g| g.0)),
        },
        borrowable: fleet::Amount {
            cpu_milli: t.quota.borrowing.cpu.map_or(0, |c| c.0),
            memory_mib: t.quota.borrowing.memory.map_or(0, |m| m.0 / MIB),
            gpu_milli: t.quota.borrowing.gpus.map_or(0, |g| g.0),
        },
        weight: t.quota.fair_share_weight.unwrap_or(1),
    }
}

/// The scheduler's request for one replica holding `r`, in `sites`.
pub fn fleet_request(
    id: String,
    tenant: &str,
    priority: i32,
    r: &Resources,
    sites: &[String],
) -> fleet::Request {
    fleet::Request {
        id,
        tenant: tenant.to_string(),
        priority,
        cpu_milli: r.cpu.0,
        memory_mib: r.memory.0.div_ceil(MIB),
        gpu: match r.gpu {
            None => fleet::GpuAsk::None,
            Some(GpuRequest::Milli(m)) if m < 1000 => fleet::GpuAsk::Share(m),
            Some(GpuRequest::Milli(m)) => fleet::GpuAsk::Whole(m / 1000),
            Some(GpuRequest::Mig(p)) => fleet::GpuAsk::Mig(MigProfile {
                compute: p.compute_slices,
                memory_gb: p.memory_gb,
            }),
        },
        gpu_memory_mib: r.gpu_memory.map(|m| m.0.div_ceil(MIB)).unwrap_or(0),
        models: r.gpu_models.clone(),
        sites: sites.to_vec(),
        nodes: Vec::new(),
    }
}

pub fn to_slots(slots: &[GpuSlot]) -> Vec<fleet::Slot> {
    slots
        .iter()
        .map(|s| {
            let gpu = s.gpu as usize;
            match (s.share_milli, s.mig_start) {
                (Some(milli), _) => fleet::Slot::Share { gpu, milli },
                (None, Some(start)) => fleet::Slot::Mig { gpu, start },
                (None, None) => fleet::Slot::Whole { gpu },
            }
        })
        .collect()
}

pub fn from_slots(slots: &[fleet::Slot]) -> Vec<GpuSlot> {
    slots
        .iter()
        .map(|s| {
            let gpu = s.gpu() as u32;
            match *s {
                fleet::Slot::Whole { .. } => GpuSlot {
                    gpu,
                    share_milli: None,
                    mig_start: None,
                },
                fleet::Slot::Share { milli, .. } => GpuSlot {
                    gpu,
                    share_milli: Some(milli),
                    mig_start: None,
                },
                fleet::Slot::Mig { start, .. } => GpuSlot {
                    gpu,
                    share_milli: None,
                    mig_start: Some(start),
                },
            }
        })
        .collect()
}
