//! Properties every policy must keep, on random clusters and workloads:
//! no node, GPU, CPU or memory is ever over-allocated; GPU-model
//! constraints hold; what is allocated is exactly what placed pods asked;
//! the same seed gives the same placements.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use atrium_sched::policy::{Cluster, Policy};
use atrium_sched::trace::{NodeSpec, Pod};
use proptest::prelude::*;
use rand::SeedableRng;

const MODELS: [&str; 3] = ["T4", "P100", "V100M32"];

fn node() -> impl Strategy<Value = NodeSpec> {
    (1u32..=64, 1u32..=256, 0u32..=8, 0usize..3).prop_map(|(cpu, mem, gpus, m)| NodeSpec {
        name: String::new(),
        cpu_milli: cpu * 1000,
        memory_mib: mem * 1024,
        gpus,
        model: MODELS[m].to_string(),
    })
}

fn pod() -> impl Strategy<Value = Pod> {
    let gpu = prop_oneof![
        Just((0u32, 0u32)),
        (1u32..1000).prop_map(|m| (1, m)),
        (1u32..=8).prop_map(|n| (n, 1000)),
    ];
    (
        0u32..=32_000,
        0u32..=65_536,
        gpu,
        proptest::option::of(0usize..3),
    )
        .prop_map(|(cpu, mem, (n, milli), spec)| Pod {
            cpu_milli: cpu,
            memory_mib: mem,
            num_gpu: n,
            gpu_milli: milli,
            gpu_spec: spec
                .map(|m| vec![MODELS[m].to_string()])
                .unwrap_or_default(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn policies_never_overallocate(
        mut nodes in proptest::collection::vec(node(), 1..12),
        pods in proptest::collection::vec(pod(), 1..60),
        seed in any::<u64>(),
    ) {
        for (i, n) in nodes.iter_mut().enumerate() {
            n.name = format!("n{i:03}");
        }
        for policy in Policy::ALL {
            let mut cluster = Cluster::new(&nodes);
            cluster.set_workload(&pods);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut placed_gpu = 0u64;
            let mut decisions = Vec::new();
            for p in &pods {
                let decision = cluster.choose(p, policy, &mut rng);
                if let Some(d) = &decision {
                    let node = &cluster.nodes[d.node];
                    // The decision fits before it is applied.
                    prop_assert!(cluster.fits(node, p), "{policy:?} chose a node that does not fit");
                    prop_assert_eq!(d.gpus.len() as u32, p.num_gpu);
                    let mut seen = d.gpus.clone();
                    seen.sort_unstable();
                    seen.dedup();
                    prop_assert_eq!(seen.len(), d.gpus.len(), "a GPU chosen twice");
                    for g in &d.gpus {
                        prop_assert!(u32::from(node.gpu_left[*g]) >= p.gpu_milli, "GPU over-allocated");
                    }
                    // gpu_spec constrains which GPUs a pod takes; a CPU-only pod takes none.
                    if p.num_gpu > 0 && !p.gpu_spec.is_empty() {
                        let model = node.model.map(|m| cluster.models[m].clone());
                        prop_assert!(model.is_some_and(|m| p.gpu_spec.contains(&m)), "GPU model constraint broken");
                    }
                    cluster.place(p, d);
                    placed_gpu += p.gpu_request();
                } else {
                    // Refused only when nothing fits.
                    prop_assert!(cluster.nodes.iter().all(|n| !cluster.fits(n, p)), "{policy:?} refused a pod that fits");
                }
                decisions.push(decision);
            }
            prop_assert_eq!(cluster.gpu_allocated(), placed_gpu);
            // Deterministic for a seed.
            let mut again = Cluster::new(&nodes);
            again.set_workload(&pods);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for (p, d) in pods.iter().zip(&decisions) {
                let d2 = again.choose(p, policy, &mut rng);
                prop_assert_eq!(&d2, d);
                if let Some(d2) = d2 {
                    again.place(p, &d2);
                }
            }
        }
    }
}
