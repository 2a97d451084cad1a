#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Properties of the fleet scheduler under random fleets, tenants and
//! operations, checked after every operation by recomputing what the
//! bindings hold — independently of the scheduler's own bookkeeping.

use std::collections::{BTreeMap, HashMap};

use atrium_sched::fleet::{
    Amount, Binding, Fleet, GpuAsk, GpuDevice, Isolation, Node, Refusal, Request, Slot,
    TenantPolicy,
};
use atrium_sched::mig::{self, MigProfile};
use proptest::prelude::*;

const TENANTS: [&str; 4] = ["ta", "tb", "tc", "td"];

fn node() -> impl Strategy<Value = Node> {
    (
        0..2usize,
        0..2usize,
        16u64..128,
        prop_oneof![Just(0usize), Just(2), Just(4), Just(8)],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(site, leaf, cpus, gpus, h100, split_nvlink)| Node {
            name: String::new(),
            site: ["fra1", "iad1"][site].into(),
            jurisdiction: ["EU", "US"][site].into(),
            leaf: Some(format!("leaf{leaf}")),
            cpu_milli: cpus * 1000,
            memory_mib: cpus * 4096,
            gpus: (0..gpus)
                .map(|i| GpuDevice {
                    model: if h100 { "H100-80GB" } else { "A10" }.into(),
                    memory_mib: if h100 { 80 * 1024 } else { 24 * 1024 },
                    nvlink: if split_nvlink {
                        Some(format!("nv{}", i / 4))
                    } else {
                        None
                    },
                    mig_capable: h100,
                })
                .collect(),
        })
}

fn policy() -> impl Strategy<Value = TenantPolicy> {
    (0..3usize, 0..3usize, 0u64..9, 0u64..5, 1u32..4).prop_map(|(iso, res, g, b, weight)| {
        TenantPolicy {
            isolation: [
                Isolation::Shared,
                Isolation::DedicatedGpu,
                Isolation::DedicatedNode,
            ][iso],
            jurisdictions: [None, Some(vec!["EU".into()]), Some(vec!["US".into()])][res].clone(),
            guaranteed: Amount {
                gpu_milli: g * 1000,
                ..Amount::UNLIMITED
            },
            borrowable: Amount {
                gpu_milli: b * 1000,
                cpu_milli: 0,
                memory_mib: 0,
            },
            weight,
        }
    })
}

fn ask() -> impl Strategy<Value = GpuAsk> {
    prop_oneof![
        Just(GpuAsk::None),
        prop_oneof![Just(1u32), Just(2), Just(4)].prop_map(GpuAsk::Whole),
        (1u32..10).prop_map(|x| GpuAsk::Share(x * 100)),
        prop_oneof![
            Just("1g.10gb"),
            Just("1g.20gb"),
            Just("2g.20gb"),
            Just("3g.40gb"),
            Just("4g.40gb"),
            Just("7g.80gb")
        ]
        .prop_map(|p| GpuAsk::Mig(p.parse::<MigProfile>().unwrap())),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (0..4usize, -1i32..3, 0u64..16, ask(), 0u64..3, 0..3usize).prop_map(
        |(t, priority, cpus, gpu, gmem, site)| Request {
            id: String::new(),
            tenant: TENANTS[t].into(),
            priority,
            cpu_milli: cpus * 1000,
            memory_mib: cpus * 2048,
            gpu,
            gpu_memory_mib: if matches!(gpu, GpuAsk::Share(_)) {
                gmem * 8192
            } else {
                0
            },
            models: vec![],
            sites: match site {
                0 => vec![],
                1 => vec!["fra1".into()],
                _ => vec!["iad1".into()],
            },
            nodes: vec![],
        },
    )
}

#[derive(Debug, Clone)]
enum Op {
    Place(Request),
    Preempt(Request),
    Gang(Vec<Request>, bool),
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => request().prop_map(Op::Place),
        2 => request().prop_map(Op::Preempt),
        1 => (proptest::collection::vec(request(), 2..4), any::<bool>()).prop_map(|(mut rs, leaf)| {
            let tenant = rs[0].tenant.clone();
            for r in &mut rs { r.tenant = tenant.clone(); }
            Op::Gang(rs, leaf)
        }),
        2 => any::<usize>().prop_map(Op::Release),
    ]
}

/// What the bindings hold of one GPU: share milli, whole grants, MIG
/// instances (start, profile), tenants.
type GpuHeld<'a> = (u32, u32, Vec<(u8, MigProfile)>, Vec<&'a str>);

/// Every invariant, from the bindings alone.
fn check(fleet: &Fleet, asks: &HashMap<String, Request>) -> Result<(), TestCaseError> {
    let nodes: BTreeMap<&str, &Node> = fleet.nodes().iter().map(|n| (n.name.as_str(), n)).collect();
    let mut cpu: HashMap<&str, u64> = HashMap::new();
    let mut mem: HashMap<&str, u64> = HashMap::new();
    // Per (node, gpu): share milli, whole count, MIG instances, tenants.
    let mut gpus: HashMap<(&str, usize), GpuHeld> = HashMap::new();
    let mut on_node: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut usage: HashMap<&str, Amount> = HashMap::new();
    for b in fleet.bindings() {
        let r = &asks[&b.request];
        let node = nodes[b.node.as_str()];
        *cpu.entry(&b.node).or_default() += r.cpu_milli;
        *mem.entry(&b.node).or_default() += r.memory_mib;
        on_node.entry(&b.node).or_default().push(&b.tenant);
        let u = usage.entry(&b.tenant).or_default();
        u.gpu_milli += r.amount().gpu_milli;
        let policy = fleet.tenant(&b.tenant).unwrap();
        if let Some(js) = &policy.jurisdictions {
            prop_assert!(js.contains(&node.jurisdiction), "residency broken: {b:?}");
        }
        if !r.sites.is_empty() {
            prop_assert!(r.sites.contains(&node.site), "site constraint broken");
        }
        match r.gpu {
            GpuAsk::None => prop_assert!(b.slots.is_empty()),
            GpuAsk::Whole(n) => {
                prop_assert_eq!(b.slots.len(), n as usize);
                let domains: Vec<_> = b
                    .slots
                    .iter()
                    .map(|s| node.gpus[s.gpu()].nvlink.clone())
                    .collect();
                prop_assert!(
                    domains.windows(2).all(|w| w[0] == w[1]),
                    "multi-GPU replica across NVLink domains"
                );
            }
            GpuAsk::Share(_) | GpuAsk::Mig(_) => prop_assert_eq!(b.slots.len(), 1),
        }
        for s in &b.slots {
            let e = gpus.entry((&b.node, s.gpu())).or_default();
            e.3.push(&b.tenant);
            match (s, r.gpu) {
                (Slot::Whole { .. }, _) => e.1 += 1,
                (Slot::Share { milli, .. }, _) => e.0 += milli,
                (Slot::Mig { start, .. }, GpuAsk::Mig(p)) => e.2.push((*start, p)),
                _ => prop_assert!(false, "slot kind differs from the ask"),
            }
        }
    }
    for (name, used) in &cpu {
        prop_assert!(
            *used <= nodes[name].cpu_milli,
            "CPU over-allocated on {name}"
        );
        prop_assert!(
            mem[name] <= nodes[name].memory_mib,
            "memory over-allocated on {name}"
        );
    }
    for ((node, gi), (share, whole, migs, tenants)) in &gpus {
        let device = &nodes[node].gpus[*gi];
        let kinds = (*share > 0) as u8 + (*whole > 0) as u8 + (!migs.is_empty()) as u8;
        prop_assert!(kinds <= 1, "GPU {node}/{gi} used in two modes");
        prop_assert!(*whole <= 1, "GPU {node}/{gi} given whole twice");
        prop_assert!(*share <= 1000, "GPU {node}/{gi} shares over 1000m: {share}");
        if !migs.is_empty() {
            let geometry = mig::geometry(&device.model).unwrap();
            prop_assert!(device.mig_capable);
            prop_assert!(migs.len() <= 7, "more than seven MIG instances");
            let mut mask = 0u8;
            let mut compute = 0u8;
            for (start, p) in migs {
                let spec = geometry.iter().find(|s| s.profile == *p).unwrap();
                prop_assert!(spec.starts.contains(start), "{p} at invalid slice {start}");
                let m = mig::mask(spec, *start);
                prop_assert_eq!(mask & m, 0, "MIG slices overlap on {}/{}", node, gi);
                mask |= m;
                compute += p.compute;
            }
            prop_assert!(compute <= 7, "more than seven compute slices");
        }
        for t in tenants {
            if fleet.tenant(t).unwrap().isolation != Isolation::Shared {
                prop_assert!(
                    tenants.iter().all(|x| x == t),
                    "dedicated GPU shared: {node}/{gi} {tenants:?}"
                );
            }
        }
    }
    for (node, ts) in &on_node {
        for t in ts {
            if fleet.tenant(t).unwrap().isolation == Isolation::DedicatedNode {
                prop_assert!(
                    ts.iter().all(|x| x == t),
                    "dedicated node {node} shared: {ts:?}"
                );
            }
        }
    }
    for (t, u) in &usage {
        let p = fleet.tenant(t).unwrap();
        prop_assert!(
            u.gpu_milli <= p.guaranteed.gpu_milli + p.borrowable.gpu_milli,
            "quota exceeded by {t}"
        );
        prop_assert_eq!(
            fleet.usage(t).gpu_milli,
            u.gpu_milli,
            "usage bookkeeping drifted"
        );
    }
    Ok(())
}

fn bound_ids(f: &Fleet) -> Vec<String> {
    f.bindings().map(|b| b.request.clone()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_fleet_never_breaks_an_invariant(
        mut nodes in proptest::collection::vec(node(), 1..7),
        policies in proptest::collection::vec(policy(), 4),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        for (i, n) in nodes.iter_mut().enumerate() {
            n.name = format!("node-{i:02}");
        }
        let tenants = TENANTS.iter().zip(policies).map(|(t, p)| (t.to_string(), p)).collect();
        let mut fleet = Fleet::new(nodes, tenants);
        let mut asks: HashMap<String, Request> = HashMap::new();
        let mut next = 0;
        let mut id = |r: &mut Request| { next += 1; r.id = format!("r{next:03}"); };
        for op in ops {
            match op {
                Op::Place(mut r) => {
                    id(&mut r);
                    asks.insert(r.id.clone(), r.clone());
                    let before = bound_ids(&fleet);
                    if fleet.place(&r).is_err() {
                        prop_assert_eq!(bound_ids(&fleet), before, "a refusal changed nothing");
                    }
                }
                Op::Preempt(mut r) => {
                    id(&mut r);
                    asks.insert(r.id.clone(), r.clone());
                    if let Ok((_, evicted)) = fleet.place_preempting(&r) {
                        for v in &evicted {
                            prop_assert!(
                                v.priority < r.priority || (v.priority == r.priority && v.borrowed),
                                "evicted {} of priority {} for priority {}", v.request, v.priority, r.priority
                            );
                            prop_assert!(fleet.binding(&v.request).is_none());
                        }
                    }
                }
                Op::Gang(mut members, same_leaf) => {
                    for m in &mut members {
                        id(m);
                        asks.insert(m.id.clone(), m.clone());
                    }
                    let before = bound_ids(&fleet);
                    match fleet.place_gang(&members, same_leaf) {
                        Ok(bs) => {
                            prop_assert_eq!(bs.len(), members.len());
                            if same_leaf {
                                let leaves: Vec<_> = bs.iter().map(|b| fleet.nodes()[b.node_index()].leaf.clone()).collect();
                                prop_assert!(leaves.windows(2).all(|w| w[0] == w[1]), "gang split across leaves");
                            }
                        }
                        Err(_) => prop_assert_eq!(bound_ids(&fleet), before, "a failed gang left members bound"),
                    }
                }
                Op::Release(i) => {
                    let ids = bound_ids(&fleet);
                    if !ids.is_empty() {
                        let id = &ids[i % ids.len()];
                        prop_assert!(fleet.release(id).is_some());
                    }
                }
            }
            check(&fleet, &asks)?;
        }
    }

    #[test]
    fn preemption_never_evicts_a_higher_priority_and_evicts_the_fewest(
        fill in proptest::collection::vec((0..4usize, -2i32..3, 1u32..3), 4..16),
        attacks in proptest::collection::vec((0..4usize, -2i32..4, 1u32..5), 1..6),
    ) {
        // A full pool of two 4-GPU nodes, tenants guaranteed one GPU and
        // allowed to borrow three more, then requests that must preempt.
        let nodes: Vec<Node> = (0..2).map(|i| Node {
            name: format!("n{i}"), site: "fra1".into(), jurisdiction: "EU".into(), leaf: None,
            cpu_milli: 64_000, memory_mib: 1 << 18,
            gpus: (0..4).map(|_| GpuDevice { model: "A10".into(), memory_mib: 24_576, nvlink: None, mig_capable: false }).collect(),
        }).collect();
        let policy = TenantPolicy {
            guaranteed: Amount { gpu_milli: 1000, ..Amount::UNLIMITED },
            borrowable: Amount { gpu_milli: 3000, cpu_milli: 0, memory_mib: 0 },
            ..TenantPolicy::shared()
        };
        let tenants = TENANTS.iter().map(|t| (t.to_string(), policy.clone())).collect();
        let mut fleet = Fleet::new(nodes, tenants);
        let mut asks = HashMap::new();
        let mk = |id: String, t: usize, priority: i32, n: u32| Request {
            id, tenant: TENANTS[t].into(), priority, cpu_milli: 1000, memory_mib: 1024,
            gpu: GpuAsk::Whole(n), gpu_memory_mib: 0, models: vec![], sites: vec![], nodes: vec![],
        };
        for (k, (t, p, n)) in fill.into_iter().enumerate() {
            let r = mk(format!("f{k:02}"), t, p, n);
            asks.insert(r.id.clone(), r.clone());
            let _ = fleet.place(&r);
        }
        for (k, (t, p, n)) in attacks.into_iter().enumerate() {
            let r = mk(format!("p{k:02}"), t, p, n);
            asks.insert(r.id.clone(), r.clone());
            let before: Vec<Binding> = fleet.bindings().cloned().collect();
            let within_guarantee = fleet.usage(&r.tenant).gpu_milli + u64::from(n) * 1000 <= 1000;
            match fleet.place_preempting(&r) {
                Ok((b, evicted)) => {
                    for v in &evicted {
                        prop_assert!(v.priority < r.priority || (v.priority == r.priority && v.borrowed),
                            "evicted {} (priority {}) for priority {}", v.request, v.priority, r.priority);
                    }
                    // The fewest: no node could have taken it with fewer
                    // evictions of evictable units (GPUs are the only
                    // constraint here, so count free GPUs per node).
                    if !evicted.is_empty() {
                        for node in ["n0", "n1"] {
                            let used: u32 = before.iter().filter(|x| x.node == node).map(|x| x.slots.len() as u32).sum();
                            let mut evictable: Vec<&Binding> = before.iter().filter(|x| x.node == node
                                && (x.priority < r.priority || (x.priority == r.priority && x.borrowed && x.tenant != r.tenant && within_guarantee))).collect();
                            evictable.sort_by_key(|x| std::cmp::Reverse(x.slots.len()));
                            let mut free = 4 - used;
                            let mut needed = 0;
                            for x in evictable {
                                if free >= n { break; }
                                free += x.slots.len() as u32;
                                needed += 1;
                            }
                            if free >= n {
                                prop_assert!(evicted.len() <= needed.max(1) || b.node == node,
                                    "{} evicted {} on {} but {} needed {}", r.id, evicted.len(), b.node, node, needed);
                            }
                        }
                    }
                }
                Err(_) => {
                    let after: Vec<Binding> = fleet.bindings().cloned().collect();
                    prop_assert_eq!(after, before, "a refused preemption changed nothing");
                }
            }
            check(&fleet, &asks)?;
        }
    }

    #[test]
    fn refusals_are_real(
        mut nodes in proptest::collection::vec(node(), 1..5),
        reqs in proptest::collection::vec(request(), 1..30),
    ) {
        // With shared tenants and no quotas, a request is refused only when
        // no single node could take it in its current state: re-checked by
        // offering it to each node alone (a fleet of that node, holding
        // the same bindings).
        for (i, n) in nodes.iter_mut().enumerate() {
            n.name = format!("node-{i:02}");
        }
        let tenants: BTreeMap<String, TenantPolicy> =
            TENANTS.iter().map(|t| (t.to_string(), TenantPolicy::shared())).collect();
        let mut fleet = Fleet::new(nodes.clone(), tenants.clone());
        let mut placed: Vec<(Request, Binding)> = Vec::new();
        for (k, mut r) in reqs.into_iter().enumerate() {
            r.id = format!("r{k:03}");
            match fleet.place(&r) {
                Ok(b) => placed.push((r, b)),
                Err(Refusal::NoNode(_)) | Err(Refusal::UnknownMigProfile(_)) => {
                    for n in &nodes {
                        let mut alone = Fleet::new(vec![n.clone()], tenants.clone());
                        for (pr, pb) in placed.iter().filter(|(_, b)| b.node == n.name) {
                            alone.restore(pr, &pb.node, &pb.slots).unwrap();
                        }
                        prop_assert!(alone.place(&r).is_err(), "{} refused but fits {}", r.id, n.name);
                    }
                }
                Err(e) => prop_assert!(false, "unexpected refusal {e}"),
            }
        }
    }
}

#[test]
fn fair_share_follows_weights() {
    // Two tenants ask for far more than the pool; DRF with weights 2:1
    // splits the 16 GPUs 2:1 (to within one unit).
    let nodes: Vec<Node> = (0..2)
        .map(|i| Node {
            name: format!("n{i}"),
            site: "fra1".into(),
            jurisdiction: "EU".into(),
            leaf: None,
            cpu_milli: 256_000,
            memory_mib: 1 << 21,
            gpus: (0..8)
                .map(|_| GpuDevice {
                    model: "H100-80GB".into(),
                    memory_mib: 81920,
                    nvlink: Some("nv".into()),
                    mig_capable: false,
                })
                .collect(),
        })
        .collect();
    let heavy = TenantPolicy {
        weight: 2,
        ..TenantPolicy::shared()
    };
    let tenants = BTreeMap::from([
        ("light".to_string(), TenantPolicy::shared()),
        ("heavy".to_string(), heavy),
    ]);
    let mut fleet = Fleet::new(nodes, tenants);
    let mut pending = Vec::new();
    for t in ["light", "heavy"] {
        for i in 0..20 {
            pending.push(Request {
                id: format!("{t}-{i:02}"),
                tenant: t.into(),
                priority: 0,
                cpu_milli: 1000,
                memory_mib: 1024,
                gpu: GpuAsk::Whole(1),
                gpu_memory_mib: 0,
                models: vec![],
                sites: vec![],
                nodes: vec![],
            });
        }
    }
    let results = fleet.place_fairly(&pending);
    assert_eq!(results.len(), 40);
    let heavy = fleet.usage("heavy").gpu_milli / 1000;
    let light = fleet.usage("light").gpu_milli / 1000;
    assert_eq!(heavy + light, 16);
    assert!(
        (10..=11).contains(&heavy) && (5..=6).contains(&light),
        "heavy {heavy}, light {light}"
    );
}
