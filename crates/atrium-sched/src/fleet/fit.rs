//! Whether and how a request fits a node, how good each way is, and
//! binding it: the options on one node, their score (the Atrium policy
//! over the learnt workload profile), the best node by class, and the
//! bookkeeping of a bind.

use std::collections::BTreeMap;

use super::classes::{GpuUse, NodeUse};
use super::types::{
    Amount, Binding, GpuAsk, GpuDevice, Isolation, NoFit, Node, Refusal, Request, Slot,
    TenantPolicy,
};
use super::Fleet;
use crate::frag::{node_fragmentation, Pairing};
use crate::mig::{self, MigSpec, MigUse};
use crate::policy::STRANDING_WEIGHT;
use crate::trace::Pod;

/// What one binding holds, as `apply` adds or removes it.
pub(super) struct Held {
    pub(super) tenant: u32,
    pub(super) amount: Amount,
    pub(super) ask: GpuAsk,
    pub(super) gpu_memory_per_slot: u64,
}

impl Held {
    pub(super) fn of(r: &Request, tenant: u32) -> Held {
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
pub(super) struct Choice {
    pub(super) node: usize,
    pub(super) slots: Vec<Slot>,
    pub(super) score: i64,
}

/// Most distinct candidate states scored per decision, taken in node-name
/// order. Scoring every state of a large, busy fleet costs milliseconds
/// (a 10,000-node fleet under a varied workload has thousands); like
/// kube-scheduler's `percentageOfNodesToScore`, a bounded sample keeps a
/// decision fast, and taking it in name order keeps the packing that ties
/// in name order give.
pub(super) const CANDIDATES: usize = 128;

/// Whether sites and residency let `r` onto `node`.
pub(super) fn static_allows(node: &Node, r: &Request, policy: &TenantPolicy) -> Result<(), NoFit> {
    if !r.sites.is_empty() && !r.sites.contains(&node.site) {
        return Err(NoFit::NotInSites);
    }
    if let Some(js) = &policy.jurisdictions {
        if !js.contains(&node.jurisdiction) {
            return Err(NoFit::OutsideResidency);
        }
    }
    Ok(())
}

/// Whether `node` is one `r` is restricted to, if it is restricted: a
/// node's own, not its class's, so never cached with the static verdict.
pub(super) fn on_its_nodes(node: &Node, r: &Request) -> Result<(), NoFit> {
    if r.nodes.is_empty() || r.nodes.contains(&node.name) {
        Ok(())
    } else {
        Err(NoFit::NotItsNodes)
    }
}

pub(super) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Fleet {
    /// Re-learns the workload profile as requests arrive: at first often,
    /// then every time the history has grown by an eighth.
    pub(super) fn learn(&mut self, r: &Request) {
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
            let t = self.total;
            self.pairing = Pairing::binding(
                &self.seen,
                Pairing::supply(t.cpu_milli, t.memory_mib, t.gpu_milli / 1000),
            );
            self.profiled_at = self.seen.len();
            self.recost_classes();
        }
    }

    /// Fragmentation plus weighted stranding of a node in a given use, by
    /// the GPU model of its first GPU (nodes carry one model, as in the
    /// traces; mixed nodes are scored by their first).
    pub(super) fn cost(
        &self,
        node: &Node,
        cpu_used: u64,
        memory_used: u64,
        gpu_left: &[u16],
    ) -> f64 {
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

    pub(super) fn gpu_shareable(&self, g: &GpuUse, t: u32, policy: &TenantPolicy) -> bool {
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
    pub(super) fn isolation_of(&self, t: u32) -> Option<Isolation> {
        let name = self.tenant_names.get(t as usize)?;
        self.tenants.get(name).map(|p| p.isolation)
    }

    /// The GPU slots `r` would take on node `i` in use `u`, per option (one
    /// per distinct outcome), or why none.
    pub(super) fn options(
        &self,
        i: usize,
        u: &NodeUse,
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
    ) -> Result<Vec<Vec<Slot>>, NoFit> {
        let node = &self.nodes[i];
        if node.cpu_milli.saturating_sub(u.cpu_milli) < r.cpu_milli
            || node.memory_mib.saturating_sub(u.memory_mib) < r.memory_mib
        {
            return Err(NoFit::CpuOrMemory);
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
                    .ok_or(NoFit::whole_gpus(n))?;
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
                    Err(NoFit::NoGpuShare)
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
                    Err(NoFit::NoMigPosition)
                } else {
                    Ok(out)
                }
            }
        }
    }

    pub(super) fn mig_spec(
        &self,
        node: usize,
        gpu: usize,
        ask: GpuAsk,
    ) -> Option<&'static MigSpec> {
        let GpuAsk::Mig(p) = ask else { return None };
        let g = self.nodes.get(node)?.gpus.get(gpu)?;
        mig::geometry(&g.model)?.iter().find(|s| s.profile == p)
    }

    /// Adds (or, with `add` false, removes) what `h` holds in `slots` to a
    /// node's use.
    pub(super) fn apply(&self, u: &mut NodeUse, node: usize, h: &Held, slots: &[Slot], add: bool) {
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

    pub(super) fn held_by(&self, b: &Binding) -> Held {
        Held {
            tenant: self.tenant_index.get(&b.tenant).copied().unwrap_or(0),
            amount: b.amount,
            ask: b.gpu,
            gpu_memory_per_slot: b.gpu_memory_per_slot,
        }
    }

    pub(super) fn gpu_memory_per_slot(r: &Request) -> u64 {
        match r.gpu {
            GpuAsk::Whole(n) => r.gpu_memory_mib.div_ceil(u64::from(n.max(1))),
            GpuAsk::Share(_) => r.gpu_memory_mib,
            _ => 0,
        }
    }

    /// The best choice on node `i` in use `u`, scored; `before` is the
    /// cost of `u` when the caller knows it (its class's).
    pub(super) fn best_on(
        &self,
        i: usize,
        u: &NodeUse,
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
        before: Option<f64>,
    ) -> Result<Choice, NoFit> {
        let options = self.options(i, u, r, t, policy)?;
        let node = &self.nodes[i];
        let base: Vec<u16> = u.gpus.iter().map(GpuUse::free_for_scoring).collect();
        let before = before.unwrap_or_else(|| self.cost(node, u.cpu_milli, u.memory_mib, &base));
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
        best.ok_or(NoFit::NoOption)
    }

    pub(super) fn prepare(&mut self, r: &Request) -> Result<(u32, TenantPolicy), Refusal> {
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
    pub(super) fn choose(
        &self,
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
        within: &dyn Fn(&Node) -> bool,
    ) -> Result<Choice, Refusal> {
        // Only nodes that may admit `r` (`room`): the same choice as
        // walking every node. When none fits, every node is walked to say
        // why each did not (at once, when no node has room at all).
        let every = |from: usize| (from < self.nodes.len()).then_some(from);
        if !self.room.anywhere(r) {
            return self.walk(r, t, policy, within, every);
        }
        self.walk(r, t, policy, within, |from| self.room.next(from, r))
            .or_else(|_| self.walk(r, t, policy, within, every))
    }

    /// The best choice over the nodes `next` yields in order (the first
    /// at or after an index), scoring at most `CANDIDATES` node states.
    pub(super) fn walk(
        &self,
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
        within: &dyn Fn(&Node) -> bool,
        next: impl Fn(usize) -> Option<usize>,
    ) -> Result<Choice, Refusal> {
        let mut best: Option<Choice> = None;
        let mut reasons: BTreeMap<NoFit, usize> = BTreeMap::new();
        let mut scored: std::collections::HashSet<u32> = std::collections::HashSet::new();
        // Sites and residency depend only on a node's static class.
        let mut statics: Vec<Option<Result<(), NoFit>>> = vec![None; self.static_count];
        let mut from = 0;
        while let Some(i) = next(from) {
            from = i + 1;
            if scored.len() >= CANDIDATES {
                break;
            }
            let node = &self.nodes[i];
            let verdict = statics
                .get_mut(self.static_class[i] as usize)
                .map(|v| {
                    *v.get_or_insert_with(|| {
                        if !within(node) {
                            Err(NoFit::OutsideLeaf)
                        } else {
                            static_allows(node, r, policy)
                        }
                    })
                })
                .unwrap_or(Err(NoFit::UnknownClass))
                .and_then(|()| on_its_nodes(node, r))
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
            let before = self.class_cost.get(self.class_of[i] as usize).copied();
            match self.best_on(i, &self.used[i], r, t, policy, before) {
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

    pub(super) fn bind(&mut self, r: &Request, t: u32, borrowed: bool, c: Choice) -> Binding {
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
}
