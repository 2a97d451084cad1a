//! Node state as the scorer sees it: each node's use, the class of nodes
//! in an identical state (scored once for all), and a summary of what a
//! node can still take, to rule it out without scoring.

use std::collections::BTreeMap;

use super::types::{GpuAsk, Isolation, NoFit, Request};
use super::Fleet;
use crate::mig::{self, MigUse};

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct GpuUse {
    pub(super) milli: u16,
    pub(super) memory_mib: u64,
    pub(super) mig: MigUse,
    /// Tenant indices holding part of it (one entry per slot).
    pub(super) tenants: Vec<u32>,
}

impl GpuUse {
    /// Free capacity as the fragmentation measure sees it: a GPU in MIG
    /// mode only takes MIG requests, so count its free compute slices.
    pub(super) fn free_for_scoring(&self) -> u16 {
        free_share(self.milli, self.mig.compute, self.mig.instances)
    }
}

fn free_share(milli: u16, mig_compute: u8, mig_instances: u8) -> u16 {
    if mig_instances > 0 {
        (u16::from(mig::COMPUTE_SLICES.saturating_sub(mig_compute)) * 1000) / 7
    } else {
        1000u16.saturating_sub(milli)
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct NodeUse {
    pub(super) cpu_milli: u64,
    pub(super) memory_mib: u64,
    pub(super) gpus: Vec<GpuUse>,
    /// Tenant indices with a binding here (one entry per binding).
    pub(super) tenants: Vec<u32>,
}

/// One GPU's part of a [`ClassKey`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct GpuKey {
    milli: u16,
    memory_mib: u64,
    mig_mask: u8,
    mig_compute: u8,
    mig_instances: u8,
    /// Distinct tenant indices holding part of it, sorted.
    tenants: Vec<u32>,
}

impl GpuKey {
    /// As `GpuUse::free_for_scoring`, from the key's copy of the use.
    fn free_for_scoring(&self) -> u16 {
        free_share(self.milli, self.mig_compute, self.mig_instances)
    }
}

/// Everything a decision for a node depends on, so equal keys decide alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ClassKey {
    pub(super) static_class: u32,
    pub(super) cpu_milli: u64,
    pub(super) memory_mib: u64,
    pub(super) gpus: Vec<GpuKey>,
    pub(super) tenants: Vec<u32>,
}

/// What a node can still take, to rule it out without scoring.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Summary {
    pub(super) cpu_free: u64,
    pub(super) memory_free: u64,
    /// Most free whole GPUs in one NVLink domain.
    pub(super) whole_in_domain: u8,
    /// Largest free share of a GPU not in MIG mode.
    pub(super) share_max: u16,
    /// Bit k: `mig::ALL_PROFILES[k]` can start on some GPU.
    pub(super) mig_open: u16,
    /// The tenants here: none, exactly one, or several.
    pub(super) tenants: Tenants,
    /// A dedicated-node tenant holding the node.
    pub(super) dedicated_to: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Tenants {
    #[default]
    None,
    One(u32),
    Several,
}

impl Summary {
    /// Node isolation, as `Fleet::tenancy_allows` judges it on a full use.
    pub(super) fn tenancy_allows(&self, t: u32, isolation: Isolation) -> Result<(), NoFit> {
        let others = match self.tenants {
            Tenants::None => false,
            Tenants::One(x) => x != t,
            Tenants::Several => true,
        };
        if isolation == Isolation::DedicatedNode && others {
            return Err(NoFit::SharedNode);
        }
        if self.dedicated_to.is_some_and(|x| x != t) {
            return Err(NoFit::DedicatedToAnother);
        }
        Ok(())
    }

    /// Rules out what cannot fit; the reasons match `Fleet::options`.
    pub(super) fn admits(&self, r: &Request) -> Result<(), NoFit> {
        if self.cpu_free < r.cpu_milli || self.memory_free < r.memory_mib {
            return Err(NoFit::CpuOrMemory);
        }
        match r.gpu {
            GpuAsk::None => Ok(()),
            GpuAsk::Whole(n) if u32::from(self.whole_in_domain) < n => Err(NoFit::whole_gpus(n)),
            GpuAsk::Share(m) if u32::from(self.share_max) < m => Err(NoFit::NoGpuShare),
            GpuAsk::Mig(p) => {
                let open = mig::ALL_PROFILES
                    .iter()
                    .position(|x| *x == p)
                    .is_some_and(|k| self.mig_open & (1 << k) != 0);
                if open {
                    Ok(())
                } else {
                    Err(NoFit::NoMigPosition)
                }
            }
            _ => Ok(()),
        }
    }
}

impl Fleet {
    pub(super) fn key_of(&self, i: usize) -> ClassKey {
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
                    GpuKey {
                        milli: g.milli,
                        memory_mib: g.memory_mib,
                        mig_mask: g.mig.mask,
                        mig_compute: g.mig.compute,
                        mig_instances: g.mig.instances,
                        tenants: t,
                    }
                })
                .collect(),
            tenants,
        }
    }

    pub(super) fn rekey(&mut self, i: usize) {
        let key = self.key_of(i);
        self.class_of[i] = match self.class_ids.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.class_keys.len() as u32;
                self.class_cost.push(self.cost_of_class(&key));
                self.class_keys.push(key.clone());
                self.class_ids.insert(key, id);
                id
            }
        };
        self.summary[i] = self.summary_of(i, &self.used[i]);
        self.room.set(i, &self.summary[i]);
    }

    /// The cost of a node in the state `key` describes.
    pub(super) fn cost_of_class(&self, key: &ClassKey) -> f64 {
        let Some(node) = self
            .static_node
            .get(key.static_class as usize)
            .and_then(|i| self.nodes.get(*i))
        else {
            return 0.0;
        };
        let left: Vec<u16> = key.gpus.iter().map(GpuKey::free_for_scoring).collect();
        self.cost(node, key.cpu_milli, key.memory_mib, &left)
    }

    /// Every class's cost again, after the workload profile changed.
    pub(super) fn recost_classes(&mut self) {
        self.class_cost = self
            .class_keys
            .iter()
            .map(|k| self.cost_of_class(k))
            .collect();
    }

    pub(super) fn summary_of(&self, i: usize, u: &NodeUse) -> Summary {
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
                            .is_some_and(|s| s.starts.iter().any(|st| gu.mig.allows(s, *st)));
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
}
