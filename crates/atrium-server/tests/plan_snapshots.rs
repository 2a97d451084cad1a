//! Snapshot tests of the placement controller's pure plan: hand-built
//! worlds, the actions planned for each, rendered one line per action and
//! compared with `tests/snapshots/plan_*.txt`. A change in any decision
//! shows up as a diff to review; `UPDATE_SNAPSHOTS=1 cargo test -p
//! atrium-server --test plan_snapshots` rewrites them after a deliberate
//! change.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write;

use atrium_api::{
    Deployment, Model, Node, Object, Placement, Resource, ResourceView, Volume, Workload,
};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::placement::ReplicaStatus;
use atrium_core::volume::VolumeStatus;
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
                json!({"site": site, "capacity": {"cpu": "4", "memory": "16Gi", "disk": "100Gi"}}),
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
                } else if let Some(j) = w.workloads.iter_mut().find(|j| j.id == deployment) {
                    j.status = Some(status);
                    j.updated_at = rfc3339(w.now);
                }
            }
            Action::Delete { kind, id } => {
                writeln!(out, "  delete {kind} {id}").unwrap();
                w.workloads.retain(|j| j.id != id);
            }
            Action::BindVolume { id, node, .. } => {
                writeln!(out, "  bind {id} to {node}").unwrap();
                let v = w.volumes.iter_mut().find(|v| v.id == id).unwrap();
                v.status = Some(VolumeStatus {
                    node: Some(node),
                    reason: String::new(),
                });
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
        overlay_address: None,
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

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A workload of `tenant` created now: `extra` is merged into its spec.
fn workload(w: &mut World, id: &str, tenant: &str, cpu: &str, extra: Value) {
    let mut spec = json!({"image": "library/x", "resources": {"cpu": cpu, "memory": "1Gi"}});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let mut o = object::<Workload>(id, &id.replace("wkl_", ""), Some(tenant), spec);
    o.created_at = rfc3339(w.now);
    o.updated_at = o.created_at.clone();
    w.workloads.push(o);
}

/// Sets the state of every live placement of `owner`, as its agent would.
fn report(w: &mut World, owner: &str, state: LifecycleState) {
    for p in w
        .placements
        .iter_mut()
        .filter(|p| p.spec.deployment == owner)
    {
        let done = p.status.as_ref().is_some_and(|s| p.spec.finished(s));
        if !done {
            p.status = Some(replica(state));
        }
    }
}

fn status_of(w: &World, id: &str) -> String {
    let s = w
        .workloads
        .iter()
        .find(|j| j.id == id)
        .unwrap()
        .status
        .clone()
        .unwrap();
    format!("{:?} {}", s.state, s.reason)
}

#[test]
fn a_job_runs_parallelism_at_a_time_finishes_and_expires() {
    let mut w = world(1);
    w.now = 1_800_000_000;
    workload(
        &mut w,
        "wkl_batch",
        "beta",
        "1",
        json!({"kind": "job",
        "job": {"completions": 3, "parallelism": 2, "ttl_seconds_after_finished": 60}}),
    );
    let mut out = String::new();
    pass(&mut w, &mut out);
    assert!(w.placements.iter().all(|p| p.spec.retries == Some(6)));
    report(&mut w, "wkl_batch", LifecycleState::Running);
    pass(&mut w, &mut out);
    // Two indexes succeed: the third starts; the finished hold no room.
    report(&mut w, "wkl_batch", LifecycleState::Succeeded);
    pass(&mut w, &mut out);
    assert_eq!(w.placements.len(), 3, "finished indexes keep their records");
    report(&mut w, "wkl_batch", LifecycleState::Succeeded);
    pass(&mut w, &mut out);
    assert_eq!(status_of(&w, "wkl_batch"), "Succeeded 3/3 completions");
    w.now += 59;
    pass(&mut w, &mut out);
    w.now += 1;
    pass(&mut w, &mut out);
    assert!(
        w.workloads.is_empty(),
        "deleted once its time to live ran out"
    );
    pass(&mut w, &mut out);
    assert!(w.placements.is_empty(), "its records go with it");
    assert_snapshot("plan_job", &out);
}

#[test]
fn a_job_fails_when_an_index_runs_out_of_retries_or_its_deadline_passes() {
    let mut w = world(1);
    w.now = 1_800_000_000;
    workload(
        &mut w,
        "wkl_flaky",
        "beta",
        "1",
        json!({"kind": "job",
        "job": {"completions": 2, "parallelism": 2, "backoff_limit": 1}}),
    );
    workload(
        &mut w,
        "wkl_slow",
        "beta",
        "1",
        json!({"kind": "job",
        "job": {"active_deadline_seconds": 30}}),
    );
    let mut out = String::new();
    pass(&mut w, &mut out);
    report(&mut w, "wkl_slow", LifecycleState::Running);
    let flaky = w
        .placements
        .iter_mut()
        .find(|p| p.spec.deployment == "wkl_flaky")
        .unwrap();
    flaky.status = Some(ReplicaStatus {
        restarts: 1,
        ..replica(LifecycleState::Failed)
    });
    pass(&mut w, &mut out);
    assert!(
        status_of(&w, "wkl_flaky").contains("1 failed and retrying"),
        "one retry is left"
    );
    let flaky = w
        .placements
        .iter_mut()
        .find(|p| p.spec.deployment == "wkl_flaky")
        .unwrap();
    flaky.status = Some(ReplicaStatus {
        restarts: 2,
        ..replica(LifecycleState::Failed)
    });
    w.now += 30;
    pass(&mut w, &mut out);
    assert!(status_of(&w, "wkl_flaky").starts_with("Failed"));
    assert!(status_of(&w, "wkl_slow").contains("deadline of 30s passed"));
    // What still ran is removed; the failed index's record stays.
    pass(&mut w, &mut out);
    assert_eq!(w.placements.len(), 1);
    assert_snapshot("plan_job_fails", &out);
}

#[test]
fn a_gang_starts_all_of_its_workers_or_none() {
    // Two nodes of 4 CPUs that beta may use; a gang of four 2-CPU workers
    // needs all 8.
    let mut w = world(1);
    deployment(&mut w, "dep_small", "beta", "1", 1);
    workload(
        &mut w,
        "wkl_train",
        "beta",
        "2",
        json!({"kind": "job",
        "job": {"completions": 4, "gang": true}}),
    );
    let mut out = String::new();
    pass(&mut w, &mut out);
    assert!(
        w.placements
            .iter()
            .all(|p| p.spec.deployment != "wkl_train"),
        "none started"
    );
    assert!(status_of(&w, "wkl_train").contains("all 4 workers"));
    w.deployments.clear();
    pass(&mut w, &mut out);
    let workers = w
        .placements
        .iter()
        .filter(|p| p.spec.deployment == "wkl_train")
        .count();
    assert_eq!(workers, 4, "all started at once");
    // One worker is gone (its node drained): the gang starts over, all
    // of it, in the same pass.
    report(&mut w, "wkl_train", LifecycleState::Running);
    let before: Vec<String> = w.placements.iter().map(|p| p.id.clone()).collect();
    w.placements.remove(0);
    pass(&mut w, &mut out);
    let workers: Vec<&str> = w.placements.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(workers.len(), 4);
    assert!(
        workers.iter().all(|id| !before.iter().any(|b| b == id)),
        "all four new"
    );
    assert_snapshot("plan_gang", &out);
}

#[test]
fn a_higher_priority_within_its_guarantee_preempts_a_borrower_and_never_the_reverse() {
    let mut w = world(1);
    // Tenant a is guaranteed 2 CPUs and may borrow 6; b is guaranteed 4
    // and runs at a higher priority.
    w.tenants.insert(
        "a".into(),
        serde_json::from_value(json!({
        "quota": {"cpu": "2", "borrowing": {"cpu": "6"}}}))
        .unwrap(),
    );
    w.tenants.insert(
        "b".into(),
        serde_json::from_value(json!({
        "quota": {"cpu": "4"}, "priority": 10}))
        .unwrap(),
    );
    workload(
        &mut w,
        "wkl_sweep",
        "a",
        "2",
        json!({"kind": "job",
        "job": {"completions": 4, "parallelism": 4}}),
    );
    let mut out = String::new();
    pass(&mut w, &mut out);
    report(&mut w, "wkl_sweep", LifecycleState::Running);
    pass(&mut w, &mut out);
    workload(
        &mut w,
        "wkl_urgent",
        "b",
        "4",
        json!({"kind": "job", "priority": 10}),
    );
    pass(&mut w, &mut out);
    assert!(status_of(&w, "wkl_sweep").starts_with("Pending preempted by b/urgent (priority 10)"));
    let sweep = w
        .placements
        .iter()
        .filter(|p| p.spec.deployment == "wkl_sweep")
        .count();
    assert_eq!(sweep, 2, "only the replicas on one node were evicted");
    // Requeued, it waits: it cannot take the room back from a higher priority.
    report(&mut w, "wkl_urgent", LifecycleState::Running);
    pass(&mut w, &mut out);
    assert!(status_of(&w, "wkl_sweep").contains("preempted by b/urgent"));
    assert!(w
        .placements
        .iter()
        .any(|p| p.spec.deployment == "wkl_urgent"));
    // b finishes: a's job runs its remaining indexes and completes.
    report(&mut w, "wkl_urgent", LifecycleState::Succeeded);
    pass(&mut w, &mut out);
    report(&mut w, "wkl_sweep", LifecycleState::Succeeded);
    pass(&mut w, &mut out);
    assert_eq!(status_of(&w, "wkl_sweep"), "Succeeded 4/4 completions");
    assert_snapshot("plan_preempt", &out);
}

#[test]
fn pending_jobs_of_one_priority_go_to_the_smallest_weighted_share_first() {
    let mut w = world(1);
    for t in ["x", "y"] {
        w.tenants
            .insert(t.into(), serde_json::from_value(json!({})).unwrap());
    }
    // x already holds one of the two 4-CPU nodes; y holds nothing.
    workload(&mut w, "wkl_x-big", "x", "4", json!({}));
    let mut out = String::new();
    pass(&mut w, &mut out);
    // Both ask for 3 of the last 4 CPUs; x's was created first.
    workload(&mut w, "wkl_x-more", "x", "3", json!({"kind": "job"}));
    workload(&mut w, "wkl_y-first", "y", "3", json!({"kind": "job"}));
    pass(&mut w, &mut out);
    assert!(w
        .placements
        .iter()
        .any(|p| p.spec.deployment == "wkl_y-first"));
    assert!(status_of(&w, "wkl_x-more").starts_with("Pending"));
    assert_snapshot("plan_fair_share", &out);
}

#[test]
fn a_volume_lies_on_its_first_users_node_and_every_later_user_follows() {
    let mut w = world(2);
    for (id, size) in [
        ("vol_data", "10Gi"),
        ("vol_big", "200Gi"),
        ("vol_other", "10Gi"),
    ] {
        let name = id.replace("vol_", "");
        w.volumes.push(object::<Volume>(
            id,
            &name,
            Some("beta"),
            json!({"size": size}),
        ));
    }
    let mount = |names: &[&str]| {
        let v: Vec<Value> = names.iter().map(|n| json!({"volume": n})).collect();
        json!({"volumes": v})
    };
    workload(&mut w, "wkl_first", "beta", "1", mount(&["data"]));
    let mut out = String::new();
    pass(&mut w, &mut out);
    let home = w.placements[0].spec.node.clone();
    let attached = &w.placements[0].spec.volumes;
    assert_eq!(attached.len(), 1);
    assert_eq!(
        (attached[0].id.as_str(), attached[0].path.as_str()),
        ("vol_data", "/volumes/data")
    );
    // A gang mounting it follows it, every worker; a 3-CPU job that fits
    // beside the first only on another node waits instead.
    let mut gang = mount(&["data"]);
    gang["kind"] = json!("job");
    gang["job"] = json!({"completions": 3, "gang": true});
    workload(&mut w, "wkl_gang", "beta", "1", gang);
    workload(&mut w, "wkl_wide", "beta", "3", mount(&["data"]));
    // Too big for any node; on two nodes at once; not there at all.
    workload(&mut w, "wkl_big", "beta", "1", mount(&["big"]));
    w.volumes[2].status = Some(VolumeStatus {
        node: Some(if home == "us1-n1" { "us1-n0" } else { "us1-n1" }.into()),
        reason: String::new(),
    });
    workload(&mut w, "wkl_split", "beta", "1", mount(&["data", "other"]));
    workload(&mut w, "wkl_ghost", "beta", "1", mount(&["ghost"]));
    pass(&mut w, &mut out);
    let on = |owner: &str| -> Vec<String> {
        w.placements
            .iter()
            .filter(|p| p.spec.deployment == owner)
            .map(|p| p.spec.node.clone())
            .collect()
    };
    assert_eq!(on("wkl_gang"), vec![home.clone(); 3]);
    assert!(on("wkl_wide").is_empty());
    assert!(status_of(&w, "wkl_wide").contains("not a node that holds"));
    assert!(status_of(&w, "wkl_big").contains("no node has 200Gi"));
    assert!(status_of(&w, "wkl_split").contains("different nodes"));
    assert!(status_of(&w, "wkl_ghost").contains("\"ghost\" does not exist"));
    assert_snapshot("plan_volumes", &out);
}
