//! Snapshot tests of the placement controller's pure plan: hand-built
//! worlds, the actions planned for each, rendered one line per action and
//! compared with `tests/snapshots/plan_*.txt`. A change in any decision
//! shows up as a diff to review; `UPDATE_SNAPSHOTS=1 cargo test -p
//! atrium-server --test plan_snapshots` rewrites them after a deliberate
//! change.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write;

use atrium_api::{Deployment, Model, Node, Object, Placement, Resource, ResourceView};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::placement::ReplicaStatus;
use atrium_server::controller::{plan, Action, World};
use serde_json::{json, Value};

fn object<R: Resource>(id: &str, name: &str, tenant: Option<&str>, spec: Value) -> Object<R> {
    ResourceView {
        id: id.into(),
        name: name.into(),
        tenant: tenant.map(str::to_string),
        revision: 1,
        created_at: String::new(),
        updated_at: String::new(),
        spec: serde_json::from_value(spec).unwrap(),
        status: None,
    }
}

/// Sites `eu1` (EU) and `us1` (US); `n` nodes of 4 CPUs per site; tenants
/// `acme` (EU only) and `beta` (anywhere); the public chat model `m`.
fn world(nodes_per_site: usize) -> World {
    let mut w = World::default();
    for (site, jurisdiction) in [("eu1", "EU"), ("us1", "US")] {
        w.sites.insert(
            site.into(),
            serde_json::from_value(json!({"kind": "core", "jurisdiction": jurisdiction})).unwrap(),
        );
        for i in 0..nodes_per_site {
            let name = format!("{site}-n{i}");
            w.nodes.push(object::<Node>(
                &format!("nod_{name}"),
                &name,
                None,
                json!({"site": site, "capacity": {"cpu": "4", "memory": "16Gi"}}),
            ));
        }
    }
    w.tenants.insert(
        "acme".into(),
        serde_json::from_value(json!({"residency": {"policy": "only", "jurisdictions": ["EU"]}}))
            .unwrap(),
    );
    w.tenants
        .insert("beta".into(), serde_json::from_value(json!({})).unwrap());
    w.models.push(object::<Model>(
        "mod_m",
        "m",
        None,
        json!({"source": "hf://m", "format": "gguf", "task": "chat"}),
    ));
    w
}

fn deployment(w: &mut World, id: &str, tenant: &str, cpu: &str, replicas: u32) {
    w.deployments.push(object::<Deployment>(
        id,
        &id.replace("dep_", ""),
        Some(tenant),
        json!({"model": "m", "engine": "embedded", "resources": {"cpu": cpu, "memory": "1Gi"},
               "replicas": {"min": replicas, "max": replicas}}),
    ));
}

/// Carries out `plan(w)`'s placements as the executor would (ids in
/// order), so a second pass sees them; returns the rendered actions.
fn pass(w: &mut World, out: &mut String) {
    let p = plan(w);
    writeln!(out, "pass (unplaceable {}):", p.unplaceable).unwrap();
    for action in p.actions {
        match action {
            Action::Remove { placement } => {
                writeln!(out, "  remove {placement}").unwrap();
                w.placements.retain(|p| p.id != placement);
            }
            Action::Place {
                tenant,
                name,
                name_taken,
                spec,
            } => {
                // Unique across passes: the line number of its action.
                let id = format!("rep_{}", out.lines().count());
                let taken = if name_taken { " (name taken)" } else { "" };
                writeln!(
                    out,
                    "  place {id} {tenant}/{name}{taken} replica {} on {} in {} cpu {}",
                    spec.replica, spec.node, spec.site, spec.resources.cpu
                )
                .unwrap();
                let mut p = object::<Placement>(
                    &id,
                    &name,
                    Some(&tenant),
                    serde_json::to_value(&spec).unwrap(),
                );
                p.status = Some(replica(LifecycleState::Pending));
                w.placements.push(p);
            }
            Action::SetStatus {
                deployment, status, ..
            } => {
                writeln!(
                    out,
                    "  status {deployment}: {:?} {}",
                    status.state, status.reason
                )
                .unwrap();
                if let Some(d) = w.deployments.iter_mut().find(|d| d.id == deployment) {
                    d.status = Some(status);
                }
            }
        }
    }
}

fn replica(state: LifecycleState) -> ReplicaStatus {
    ReplicaStatus {
        state,
        reason: String::new(),
        endpoint: None,
        restarts: 0,
        isolation: None,
        pid: None,
    }
}

fn run_all(w: &mut World, state: LifecycleState) {
    for p in &mut w.placements {
        p.status = Some(replica(state));
    }
}

fn assert_snapshot(name: &str, got: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    atrium_test_support::assert_snapshot(&dir, name, got);
}

#[test]
fn places_within_residency_and_rolls_up() {
    let mut w = world(2);
    deployment(&mut w, "dep_chat", "acme", "2", 3);
    deployment(&mut w, "dep_embed", "beta", "3", 2);
    let mut out = String::new();
    pass(&mut w, &mut out);
    run_all(&mut w, LifecycleState::Running);
    pass(&mut w, &mut out);
    // Settled: a third pass plans nothing.
    pass(&mut w, &mut out);
    assert_snapshot("plan_residency", &out);
}

#[test]
fn a_changed_spec_rolls_new_first_and_in_place_when_full() {
    let mut w = world(1);
    deployment(&mut w, "dep_chat", "acme", "1", 2);
    let mut out = String::new();
    pass(&mut w, &mut out);
    run_all(&mut w, LifecycleState::Running);
    pass(&mut w, &mut out);
    // 1 → 2 CPUs: both new replicas fit beside the old ones (4 CPUs).
    w.deployments[0].spec.resources.cpu = "2".parse().unwrap();
    pass(&mut w, &mut out);
    run_all(&mut w, LifecycleState::Running);
    pass(&mut w, &mut out);
    // 2 → 3 CPUs: no room beside the old replicas; replaced in place.
    w.deployments[0].spec.resources.cpu = "3".parse().unwrap();
    pass(&mut w, &mut out);
    pass(&mut w, &mut out);
    assert_snapshot("plan_roll", &out);
}

#[test]
fn removes_what_nobody_wants() {
    let mut w = world(1);
    deployment(&mut w, "dep_chat", "acme", "1", 3);
    deployment(&mut w, "dep_gone", "beta", "1", 1);
    let mut out = String::new();
    pass(&mut w, &mut out);
    run_all(&mut w, LifecycleState::Running);
    // Scaled down to one, and a deployment deleted.
    w.deployments[0].spec.replicas.min = 1;
    w.deployments[0].spec.replicas.max = 1;
    w.deployments.retain(|d| d.id != "dep_gone");
    pass(&mut w, &mut out);
    // A failed replica degrades; a model deleted stops new placements.
    run_all(&mut w, LifecycleState::Failed);
    w.models.clear();
    pass(&mut w, &mut out);
    assert_snapshot("plan_remove", &out);
}
