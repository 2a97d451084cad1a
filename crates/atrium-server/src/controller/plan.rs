//! What one placement pass should do, computed from typed state alone: no
//! store, no clock (the world says what time it is), no randomness.
//! `plan(&World)` is what the tests snapshot; the executor in `mod.rs` only
//! carries its actions out.
//!
//! The plan assumes each of its writes succeeds. One that does not (a
//! tenant deleted the deployment meanwhile) leaves the store as it was,
//! and the next pass, reading it again, plans from there.

use std::collections::{BTreeMap, HashMap, VecDeque};

use atrium_api::{Deployment, Model, Node, Object, Placement, Volume, Workload};
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use atrium_core::site::SiteSpec;
use atrium_core::tenant::TenantSpec;
use atrium_sched::fleet;

use super::fleet_view::{fleet_node, fleet_request, tenant_policy, to_slots};
use super::owner::Owner;
use super::volume::VolumeMap;

/// Everything a pass reads: the desired state (deployments, workloads,
/// models, tenants), the observed one (placements and their replicas'
/// status, nodes, sites), and the time.
#[derive(Debug, Default)]
pub struct World {
    pub deployments: Vec<Object<Deployment>>,
    pub workloads: Vec<Object<Workload>>,
    pub placements: Vec<Object<Placement>>,
    pub nodes: Vec<Object<Node>>,
    pub models: Vec<Object<Model>>,
    pub sites: HashMap<String, SiteSpec>,
    pub tenants: HashMap<String, TenantSpec>,
    pub volumes: Vec<Object<Volume>>,
    /// Seconds since the Unix epoch: jobs' deadlines and times to live
    /// are measured against it.
    pub now: i64,
}

/// One write the pass makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A placement nobody wants any more, one replaced by a successor, or
    /// one evicted for a higher priority.
    Remove { placement: String },
    /// A new placement for replica `spec.replica`. Its id is the
    /// executor's to mint; `name` is taken by an existing placement when
    /// `name_taken` (a successor's name then carries a suffix of its id).
    Place {
        tenant: String,
        name: String,
        name_taken: bool,
        spec: Box<PlacementSpec>,
    },
    /// The status a deployment's (or workload's, by `kind`) replicas add
    /// up to, when it changed.
    SetStatus {
        kind: &'static str,
        deployment: String,
        revision: i64,
        status: Status,
    },
    /// A finished job whose time to live has run out.
    Delete { kind: &'static str, id: String },
    /// A volume made on `node`, where the first replica mounting it went.
    BindVolume {
        id: String,
        revision: i64,
        node: String,
    },
}

/// What a pass decided.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Replicas that found no node.
    pub unplaceable: usize,
}

/// The status every new placement starts in.
pub fn pending_replica() -> ReplicaStatus {
    ReplicaStatus {
        state: LifecycleState::Pending,
        reason: "waiting for the node's agent".into(),
        endpoint: None,
        restarts: 0,
        isolation: None,
        pid: None,
        overlay_address: None,
    }
}

/// Whether a placement's replica has finished (a job's index): it runs
/// nothing and holds no room.
pub(super) fn finished(p: &Object<Placement>) -> bool {
    p.status.as_ref().is_some_and(|s| p.spec.finished(s))
}

/// What one pass has decided so far: the fleet as placed, the plan, and
/// who lost a replica to whom.
pub(super) struct Pass<'w> {
    pub fleet: fleet::Fleet,
    pub plan: Plan,
    /// The owner of each placement in the world.
    owner_of: HashMap<&'w str, &'w str>,
    /// Owners that lost a replica to a higher priority in this pass, and
    /// to whom.
    preempted: HashMap<String, String>,
    pub volumes: VolumeMap,
}

impl Pass<'_> {
    pub fn remove(&mut self, placement: &str) {
        self.plan.actions.push(Action::Remove {
            placement: placement.to_string(),
        });
        self.fleet.release(placement);
    }

    /// Places `request` for `owner`, evicting replicas of lower priority
    /// (or borrowed ones, see `Fleet::place_preempting`) when that is the
    /// only way. Each evicted replica is removed, and its owner, requeued,
    /// says who preempted it.
    pub fn place(
        &mut self,
        request: &fleet::Request,
        owner: &Owner,
    ) -> Result<fleet::Binding, fleet::Refusal> {
        // Its preferred sites first, where it fits without evicting
        // anyone; then wherever it may run, as any replica.
        if !owner.preferred_sites.is_empty() {
            let preferred = fleet::Request {
                sites: owner.preferred_sites.to_vec(),
                ..request.clone()
            };
            if let Ok(binding) = self.fleet.place(&preferred) {
                return Ok(binding);
            }
        }
        let (binding, evicted) = self.fleet.place_preempting(request)?;
        for victim in evicted {
            let why = format!(
                "preempted by {}/{} (priority {})",
                owner.tenant, owner.name, request.priority
            );
            if let Some(victim_owner) = self.owner_of.get(victim.request.as_str()) {
                // Released by the fleet already: only the write remains.
                self.plan.actions.push(Action::Remove {
                    placement: victim.request.clone(),
                });
                self.preempted.insert(victim_owner.to_string(), why);
            } else if let Some((victim_owner, replica)) = victim.request.rsplit_once('/') {
                // Placed earlier in this pass: not placed after all.
                self.plan.actions.retain(|a| {
                    !matches!(a, Action::Place { spec, .. }
                        if spec.deployment == victim_owner && spec.replica.to_string() == replica)
                });
                self.preempted.insert(victim_owner.to_string(), why);
            }
        }
        Ok(binding)
    }
}

/// One pass over every deployment and workload. Where a replica goes is
/// the fleet scheduler's decision (the Atrium policy): the fleet is
/// rebuilt from the world — ready nodes, tenants' residency, isolation,
/// quotas and priorities — the placements already made are restored, then
/// what is missing is placed: higher priorities first, and among equal
/// ones the tenant with the smallest weighted dominant share next
/// (`Fleet::fairest_next`).
pub fn plan(world: &World) -> Plan {
    let mut plan = Plan::default();
    let owners: Vec<Owner> = world
        .deployments
        .iter()
        .map(|d| Owner::of_deployment(d, world))
        .chain(world.workloads.iter().map(|w| Owner::of_workload(w, world)))
        .collect();
    let live: HashMap<&str, &Owner> = owners.iter().map(|o| (o.id, o)).collect();
    // Placements of owners that are gone are removed first, freeing room.
    let mut by_owner: BTreeMap<&str, Vec<&Object<Placement>>> = BTreeMap::new();
    for p in &world.placements {
        if live.contains_key(p.spec.deployment.as_str()) {
            by_owner
                .entry(p.spec.deployment.as_str())
                .or_default()
                .push(p);
        } else {
            plan.actions.push(Action::Remove {
                placement: p.id.clone(),
            });
        }
    }

    let nodes: Vec<fleet::Node> = world
        .nodes
        .iter()
        .filter_map(|n| fleet_node(&n.name, &n.spec, &world.sites))
        .collect();
    let policies: BTreeMap<String, fleet::TenantPolicy> = world
        .tenants
        .iter()
        .map(|(name, t)| (name.clone(), tenant_policy(t)))
        .collect();
    let mut fleet = fleet::Fleet::new(nodes, policies);
    // What is already placed holds its room, exactly where it is, and
    // exactly what it holds: a deployment updated since keeps its old
    // replicas' amounts in the fleet until they are replaced. A finished
    // job's replica holds nothing.
    for (id, placements) in &by_owner {
        let Some(owner) = live.get(id) else {
            continue;
        };
        for p in placements.iter().filter(|p| !finished(p)) {
            let request = fleet_request(
                p.id.clone(),
                owner.tenant,
                owner.priority,
                &p.spec.resources,
                &[],
            );
            if let Err(e) = fleet.restore(&request, &p.spec.node, &to_slots(&p.spec.gpus)) {
                tracing::debug!(placement = %p.id, node = %p.spec.node, error = %e, "placement not restored into the scheduler");
            }
        }
    }
    let volumes = VolumeMap::of(world, &mut plan);
    let mut pass = Pass {
        fleet,
        plan,
        owner_of: world
            .placements
            .iter()
            .map(|p| (p.id.as_str(), p.spec.deployment.as_str()))
            .collect(),
        preempted: HashMap::new(),
        volumes,
    };

    // One queue per tenant, highest priority first; the fleet's fair
    // order (as `place_fairly`) picks whose owner goes next.
    let mut queues: BTreeMap<&str, VecDeque<&Owner>> = BTreeMap::new();
    for owner in &owners {
        queues.entry(owner.tenant).or_default().push_back(owner);
    }
    for queue in queues.values_mut() {
        queue
            .make_contiguous()
            .sort_by_key(|o| std::cmp::Reverse(o.priority));
    }
    let mut statuses: HashMap<&str, Status> = HashMap::new();
    loop {
        let heads = queues
            .iter()
            .filter_map(|(t, q)| q.front().map(|o| (*t, o.priority)));
        let Some(tenant) = pass.fleet.fairest_next(heads) else {
            break;
        };
        let Some(owner) = queues.get_mut(tenant).and_then(|q| q.pop_front()) else {
            break;
        };
        let existing: &[&Object<Placement>] = by_owner.get(owner.id).map_or(&[], |v| v.as_slice());
        let status = match &owner.job {
            Some(job) => owner.run_job(job, existing, &mut pass, world.now),
            None => {
                let unplaced = owner.roll(existing, &mut pass);
                owner.rollup(existing, unplaced.as_deref())
            }
        };
        statuses.insert(owner.id, status);
    }

    for owner in &owners {
        let Some(mut status) = statuses.remove(owner.id) else {
            continue;
        };
        if let Some(why) = pass.preempted.get(owner.id) {
            status = Status::new(LifecycleState::Pending, format!("{why}; requeued"));
        }
        // The autoscaler's to write; a pass keeps it.
        status.desired_replicas = owner.status.and_then(|s| s.desired_replicas);
        if owner.status != Some(&status) {
            pass.plan.actions.push(Action::SetStatus {
                kind: owner.kind,
                deployment: owner.id.to_string(),
                revision: owner.revision,
                status,
            });
        }
    }
    pass.plan
}

/// The model a deployment of `tenant` names: its own, else the public one.
pub(super) fn model_of<'a>(
    models: &'a [Object<Model>],
    name: &str,
    tenant: &str,
) -> Option<&'a Object<Model>> {
    models
        .iter()
        .filter(|m| m.name == name && (m.tenant.as_deref() == Some(tenant) || m.tenant.is_none()))
        .max_by_key(|m| m.tenant.is_some())
}

/// Seconds since the Unix epoch of an RFC 3339 time, if it is one.
pub(super) fn unix_seconds(rfc3339: &str) -> Option<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}
