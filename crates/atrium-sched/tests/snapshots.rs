#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Snapshot tests: the fleet scheduler's decisions on small hand-built
//! clusters, rendered one line per step and compared with the files in
//! `tests/snapshots/`. A change in any decision shows up as a diff to
//! review; `UPDATE_SNAPSHOTS=1 cargo test -p atrium-sched --test
//! snapshots` rewrites them after a deliberate change.

use std::collections::BTreeMap;
use std::fmt::Write;

use atrium_sched::fleet::{
    Amount, Binding, Fleet, GpuAsk, GpuDevice, Isolation, Node, Refusal, Request, Slot,
    TenantPolicy,
};

fn gpu_node(name: &str, jurisdiction: &str, leaf: &str, model: &str, gpus: usize) -> Node {
    let (memory, mig) = match model {
        "H100-80GB" => (81920, true),
        "H200-141GB" => (144384, true),
        _ => (24576, false),
    };
    Node {
        name: name.into(),
        site: format!("{}1", jurisdiction.to_lowercase()),
        jurisdiction: jurisdiction.into(),
        leaf: Some(leaf.into()),
        cpu_milli: 128_000,
        memory_mib: 1 << 20,
        gpus: (0..gpus)
            .map(|i| GpuDevice {
                model: model.into(),
                memory_mib: memory,
                nvlink: Some(format!("nv{}", i / 4)),
                mig_capable: mig,
            })
            .collect(),
    }
}

fn cpu_node(name: &str) -> Node {
    Node {
        name: name.into(),
        site: "eu1".into(),
        jurisdiction: "EU".into(),
        leaf: None,
        cpu_milli: 64_000,
        memory_mib: 1 << 18,
        gpus: vec![],
    }
}

fn req(id: &str, tenant: &str, gpu: &str) -> Request {
    let gpu = match gpu {
        "" => GpuAsk::None,
        g if g.contains("g.") => GpuAsk::Mig(g.parse().unwrap()),
        g if g.ends_with('m') => GpuAsk::Share(g.trim_end_matches('m').parse().unwrap()),
        g => GpuAsk::Whole(g.parse().unwrap()),
    };
    Request {
        id: id.into(),
        tenant: tenant.into(),
        priority: 0,
        cpu_milli: 8000,
        memory_mib: 32768,
        gpu,
        gpu_memory_mib: 0,
        models: vec![],
        sites: vec![],
        nodes: vec![],
    }
}

fn slots(b: &Binding) -> String {
    b.slots
        .iter()
        .map(|s| match s {
            Slot::Whole { gpu } => format!("gpu{gpu}"),
            Slot::Share { gpu, milli } => format!("gpu{gpu}:{milli}m"),
            Slot::Mig { gpu, start } => format!("gpu{gpu}@{start}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn line(out: &mut String, id: &str, r: &Result<Binding, Refusal>) {
    match r {
        Ok(b) => writeln!(
            out,
            "{id:10} -> {} [{}]{}",
            b.node,
            slots(b),
            if b.borrowed { " borrowed" } else { "" }
        ),
        Err(e) => writeln!(out, "{id:10} refused: {e}"),
    }
    .unwrap();
}

/// A gang's members, one line each, or one line for its refusal.
fn gang_lines(out: &mut String, gang: &str, result: Result<Vec<Binding>, Refusal>) {
    match result {
        Ok(bs) => bs
            .into_iter()
            .for_each(|b| line(out, &b.request.clone(), &Ok(b))),
        Err(e) => writeln!(out, "{gang:10} refused: {e}").unwrap(),
    }
}

fn assert_snapshot(name: &str, got: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    atrium_test_support::assert_snapshot(&dir, name, got);
}

fn shared(names: &[&str]) -> BTreeMap<String, TenantPolicy> {
    names
        .iter()
        .map(|n| (n.to_string(), TenantPolicy::shared()))
        .collect()
}

#[test]
fn resources_mig_and_nvlink() {
    let mut f = Fleet::new(
        vec![
            gpu_node("h100-a", "EU", "leaf1", "H100-80GB", 8),
            gpu_node("h200-a", "EU", "leaf1", "H200-141GB", 4),
            gpu_node("a10-a", "EU", "leaf2", "A10", 2),
            cpu_node("cpu-a"),
        ],
        shared(&["acme"]),
    );
    let mut out = String::new();
    let mut a10 = req("a10-half", "acme", "500m");
    a10.models = vec!["A10".into()];
    let steps = [
        req("whole-1", "acme", "1"),
        req("whole-4", "acme", "4"),
        req("half", "acme", "500m"),
        req("third", "acme", "300m"),
        a10,
        req("mig-3g-a", "acme", "3g.40gb"),
        req("mig-3g-b", "acme", "3g.40gb"),
        req("mig-4g", "acme", "4g.40gb"),
        req("mig-1g", "acme", "1g.10gb"),
        req("mig-h200", "acme", "3g.71gb"),
        req("cpu-only", "acme", ""),
        req("whole-8", "acme", "8"),
        req("bad-mig", "acme", "5g.50gb"),
    ];
    for r in &steps {
        line(&mut out, &r.id, &f.place(r));
    }
    assert_snapshot("resources_mig_and_nvlink", &out);
}

#[test]
fn tenancy_isolation_residency_quota() {
    let policy = |isolation, j: Option<&str>, gpus: u64| TenantPolicy {
        isolation,
        jurisdictions: j.map(|j| vec![j.to_string()]),
        guaranteed: Amount {
            gpu_milli: gpus * 1000,
            ..Amount::UNLIMITED
        },
        borrowable: Amount {
            gpu_milli: 1000,
            cpu_milli: 0,
            memory_mib: 0,
        },
        weight: 1,
    };
    let tenants = BTreeMap::from([
        (
            "bank".to_string(),
            policy(Isolation::DedicatedNode, Some("EU"), 4),
        ),
        (
            "clinic".to_string(),
            policy(Isolation::DedicatedGpu, Some("EU"), 2),
        ),
        ("startup".to_string(), policy(Isolation::Shared, None, 2)),
    ]);
    let mut f = Fleet::new(
        vec![
            gpu_node("eu-1", "EU", "l1", "A10", 4),
            gpu_node("eu-2", "EU", "l1", "A10", 4),
            gpu_node("us-1", "US", "l2", "A10", 4),
        ],
        tenants,
    );
    let mut out = String::new();
    for r in [
        req("bank-1", "bank", "1"),
        req("startup-1", "startup", "250m"),
        req("clinic-1", "clinic", "500m"),
        req("startup-2", "startup", "250m"),
        req("startup-3", "startup", "250m"),
        req("bank-2", "bank", "2"),
        req("bank-3", "bank", "2"),
        req("clinic-2", "clinic", "2"),
        req("startup-4", "startup", "2"),
        req("startup-5", "startup", "1"),
    ] {
        line(&mut out, &r.id, &f.place(&r));
    }
    assert_snapshot("tenancy_isolation_residency_quota", &out);
}

#[test]
fn preemption_and_gangs() {
    let policy = TenantPolicy {
        guaranteed: Amount {
            gpu_milli: 4000,
            ..Amount::UNLIMITED
        },
        borrowable: Amount {
            gpu_milli: 12000,
            cpu_milli: 0,
            memory_mib: 0,
        },
        ..TenantPolicy::shared()
    };
    let tenants = BTreeMap::from([
        ("batch".to_string(), policy.clone()),
        ("serve".to_string(), policy),
    ]);
    let mut f = Fleet::new(
        vec![
            gpu_node("a1", "EU", "leaf-a", "A10", 4),
            gpu_node("a2", "EU", "leaf-a", "A10", 4),
            gpu_node("b1", "EU", "leaf-b", "A10", 4),
            gpu_node("b2", "EU", "leaf-b", "A10", 4),
        ],
        tenants,
    );
    let mut out = String::new();
    // Batch fills most of the pool at low priority, borrowing beyond 4.
    for i in 0..6 {
        let mut r = req(&format!("batch-{i}"), "batch", "2");
        r.priority = if i < 2 { 1 } else { 0 };
        line(&mut out, &r.id, &f.place(&r));
    }
    // A gang of four 2-GPU workers in one leaf does not fit whole: nothing
    // of it stays.
    let gang: Vec<Request> = (0..4)
        .map(|i| req(&format!("gang-{i}"), "serve", "2"))
        .collect();
    gang_lines(&mut out, "gang", f.place_gang(&gang, true));
    // Serving at priority 5 preempts: fewest victims, borrowed and lowest first.
    for (id, gpus) in [("serve-4", "4"), ("serve-2", "2")] {
        let mut r = req(id, "serve", gpus);
        r.priority = 5;
        match f.place_preempting(&r) {
            Ok((b, evicted)) => {
                line(&mut out, id, &Ok(b));
                let names: Vec<String> = evicted
                    .iter()
                    .map(|v| {
                        format!(
                            "{} (p{}{})",
                            v.request,
                            v.priority,
                            if v.borrowed { ", borrowed" } else { "" }
                        )
                    })
                    .collect();
                let names = if names.is_empty() {
                    "nothing".to_string()
                } else {
                    names.join(", ")
                };
                writeln!(out, "{:10}    evicted {names}", "").unwrap();
            }
            Err(e) => line(&mut out, id, &Err(e)),
        }
    }
    // Batch finishes one job; a gang of two fits within that leaf.
    let released = f.release("batch-4").map(|b| b.node);
    writeln!(
        out,
        "batch-4    released from {}",
        released.unwrap_or_default()
    )
    .unwrap();
    let gang: Vec<Request> = (0..2)
        .map(|i| req(&format!("gang2-{i}"), "serve", "1"))
        .collect();
    gang_lines(&mut out, "gang2", f.place_gang(&gang, true));
    assert_snapshot("preemption_and_gangs", &out);
}
