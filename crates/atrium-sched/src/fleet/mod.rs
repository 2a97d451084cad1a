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
//! by name stands for it, and at most `CANDIDATES` states are scored;
//! the walk to them jumps over runs of nodes with no room for the request
//! (`room`).
//!
//! Everything here is pure and deterministic: the same calls in the same
//! order give the same bindings.

mod classes;
mod fit;
mod gang;
mod preempt;
mod quota;
mod room;
mod types;

use std::collections::{BTreeMap, HashMap};

use crate::frag::{Pairing, Shape};
use crate::trace::Pod;
use classes::{ClassKey, GpuUse, NodeUse, Summary};
use fit::{static_allows, Choice, Held};

pub use types::{
    Amount, Binding, GpuAsk, GpuDevice, Isolation, NoFit, Node, Refusal, Request, Slot,
    TenantPolicy,
};

pub struct Fleet {
    nodes: Vec<Node>,
    static_class: Vec<u32>,
    static_count: usize,
    used: Vec<NodeUse>,
    /// Interned class of each node's state, and a summary of what it can
    /// still take, both updated on every bind and release.
    class_ids: HashMap<ClassKey, u32>,
    class_of: Vec<u32>,
    /// Each class's key and its cost (fragmentation plus stranding) under
    /// the current workload profile: a candidate's cost before a request
    /// is its class's, recomputed only when the profile is re-learnt.
    class_keys: Vec<ClassKey>,
    class_cost: Vec<f64>,
    /// A node of each static class, for what a class key leaves out.
    static_node: Vec<usize>,
    summary: Vec<Summary>,
    /// The summaries' maxima over runs of nodes, for the candidate walk.
    room: room::Room,
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
        let mut static_node: Vec<usize> = Vec::new();
        let static_class = nodes
            .iter()
            .enumerate()
            .map(|(at, n)| {
                let stripped = Node {
                    name: String::new(),
                    ..n.clone()
                };
                let i = statics
                    .iter()
                    .position(|s| *s == stripped)
                    .unwrap_or_else(|| {
                        statics.push(stripped);
                        static_node.push(at);
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
            class_keys: Vec::new(),
            class_cost: Vec::new(),
            static_node,
            summary: Vec::new(),
            room: room::Room::default(),
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
        fleet.room = room::Room::new(fleet.nodes.len());
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
            return Err(Refusal::NoNode(BTreeMap::from([(NoFit::NodeGone, 1)])));
        };
        // Recorded without slots (made before slots were kept): the best
        // slots on that node now.
        if slots.is_empty() && r.gpu != GpuAsk::None {
            let c = static_allows(&self.nodes[i], r, &policy)
                .and_then(|()| self.best_on(i, &self.used[i], r, t, &policy, None))
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
            return Err(Refusal::NoNode(BTreeMap::from([(NoFit::NoLongerFits, 1)])));
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
            nodes: vec![],
        }
    }

    fn tenants(list: &[(&str, TenantPolicy)]) -> BTreeMap<String, TenantPolicy> {
        list.iter()
            .map(|(n, p)| (n.to_string(), p.clone()))
            .collect()
    }

    /// The walk that skips nodes with no room (`room`) chooses exactly as
    /// the walk over every node, through a long random run of places and
    /// releases on a mixed fleet, and a refusal still names every node.
    #[test]
    fn skipping_full_nodes_changes_no_choice() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut nodes: Vec<Node> = (0..40)
            .map(|i| h100_node(&format!("g{i:02}"), if i % 2 == 0 { "l1" } else { "l2" }))
            .collect();
        nodes.extend((0..20).map(|i| Node {
            gpus: Vec::new(),
            cpu_milli: 64_000,
            memory_mib: 256 * 1024,
            ..h100_node(&format!("c{i:02}"), "l1")
        }));
        let count = nodes.len();
        let mut f = Fleet::new(nodes, tenants(&[("t", TenantPolicy::shared())]));
        let profiles = crate::mig::ALL_PROFILES;
        let mut live = Vec::new();
        let (mut placed, mut refused) = (0, 0);
        for n in 0..3000 {
            if !live.is_empty() && rng.gen_bool(0.3) {
                let id: String = live.swap_remove(rng.gen_range(0..live.len()));
                f.release(&id);
                continue;
            }
            let gpu = match rng.gen_range(0..5) {
                0 => GpuAsk::None,
                1 => GpuAsk::Whole([1, 2, 4, 8][rng.gen_range(0..4)]),
                2 => GpuAsk::Share(rng.gen_range(1..1000)),
                3 => GpuAsk::Mig(profiles[rng.gen_range(0..profiles.len())]),
                _ => GpuAsk::Whole(1),
            };
            let r = Request {
                cpu_milli: rng.gen_range(1..48) * 1000,
                memory_mib: rng.gen_range(1..256) * 1024,
                ..req(&format!("r{n}"), "t", gpu)
            };
            let Ok((t, policy)) = f.prepare(&r) else {
                continue;
            };
            let fast = f.choose(&r, t, &policy, &|_| true);
            let slow = f.walk(&r, t, &policy, &|_| true, |from| {
                (from < count).then_some(from)
            });
            match (&fast, &slow) {
                (Ok(a), Ok(b)) => assert_eq!((a.node, &a.slots), (b.node, &b.slots), "{n}"),
                (Err(a), Err(b)) => assert_eq!(a, b, "{n}"),
                _ => panic!("{n}: {fast:?} vs {slow:?}"),
            }
            if let Ok(c) = fast {
                f.bind(&r, t, false, c);
                live.push(r.id.clone());
                placed += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            placed > 500 && refused > 100,
            "{placed} placed, {refused} refused"
        );
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
