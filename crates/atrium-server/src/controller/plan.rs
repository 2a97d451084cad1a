//! What one placement pass should do, computed from typed state alone: no
//! store, no clock, no randomness. `plan(&World)` is what the tests
//! snapshot; the executor in `mod.rs` only carries its actions out.
//!
//! The plan assumes each of its writes succeeds. One that does not (a
//! tenant deleted the deployment meanwhile) leaves the store as it was,
//! and the next pass, reading it again, plans from there.

use std::collections::{BTreeMap, HashMap};

use atrium_api::{Deployment, Model, Node, Object, Placement, Resource, Workload};
use atrium_core::deployment::{EngineKind, Resources};
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::model::{ModelSpec, ModelTask};
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use atrium_core::site::SiteSpec;
use atrium_core::tenant::TenantSpec;
use atrium_core::workload::WorkloadSpec;
use atrium_sched::fleet;

use super::fleet_view::{fleet_node, fleet_request, from_slots, tenant_policy, to_slots};

/// Everything a pass reads: the desired state (deployments, models,
/// tenants) and the observed one (placements and their replicas' status,
/// nodes, sites).
#[derive(Debug, Default)]
pub struct World {
    pub deployments: Vec<Object<Deployment>>,
    pub workloads: Vec<Object<Workload>>,
    pub placements: Vec<Object<Placement>>,
    pub nodes: Vec<Object<Node>>,
    pub models: Vec<Object<Model>>,
    pub sites: HashMap<String, SiteSpec>,
    pub tenants: HashMap<String, TenantSpec>,
}

/// One write the pass makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A placement nobody wants any more, or one replaced by a successor.
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
    }
}

/// One pass over every deployment. Where a replica goes is the fleet
/// scheduler's decision (the Atrium policy): the fleet is rebuilt from the
/// world — ready nodes, tenants' residency, isolation, quotas and
/// priorities — the placements already made are restored, then what is
/// missing is placed.
pub fn plan(world: &World) -> Plan {
    let mut plan = Plan::default();
    // Placements of deployments that are gone are removed first, freeing room.
    let owners: Vec<Owner> = world
        .deployments
        .iter()
        .map(|d| Owner::of_deployment(d, world))
        .chain(world.workloads.iter().map(|w| Owner::of_workload(w, world)))
        .collect();
    let live: HashMap<&str, &Owner> = owners.iter().map(|o| (o.id, o)).collect();
    let mut by_deployment: BTreeMap<&str, Vec<&Object<Placement>>> = BTreeMap::new();
    for p in &world.placements {
        if live.contains_key(p.spec.deployment.as_str()) {
            by_deployment
                .entry(p.spec.deployment.as_str())
                .or_default()
                .push(p);
        } else {
            plan.remove(&p.id);
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
    let priority = |tenant: &str| world.tenants.get(tenant).map_or(0, |t| t.priority);
    // What is already placed holds its room, exactly where it is, and
    // exactly what it holds: a deployment updated since keeps its old
    // replicas' amounts in the fleet until they are replaced.
    for (deployment, placements) in &by_deployment {
        let Some(owner) = live.get(deployment) else {
            continue;
        };
        for p in placements {
            let request = fleet_request(
                p.id.clone(),
                owner.tenant,
                priority(owner.tenant),
                &p.spec.resources,
                &[],
            );
            if let Err(e) = fleet.restore(&request, &p.spec.node, &to_slots(&p.spec.gpus)) {
                tracing::debug!(placement = %p.id, node = %p.spec.node, error = %e, "placement not restored into the scheduler");
            }
        }
    }

    for owner in &owners {
        let existing: &[&Object<Placement>] =
            by_deployment.get(owner.id).map_or(&[], |v| v.as_slice());
        let unplaced = owner.roll(existing, &mut fleet, &mut plan);
        let status = owner.rollup(
            &replica_statuses(existing, owner.desired),
            unplaced.as_deref(),
        );
        if owner.status != Some(&status) {
            plan.actions.push(Action::SetStatus {
                kind: owner.kind,
                deployment: owner.id.to_string(),
                revision: owner.revision,
                status,
            });
        }
    }
    plan
}

impl Plan {
    fn remove(&mut self, placement: &str) {
        self.actions.push(Action::Remove {
            placement: placement.to_string(),
        });
    }
}

/// The model a deployment of `tenant` names: its own, else the public one.
fn model_of<'a>(
    models: &'a [Object<Model>],
    name: &str,
    tenant: &str,
) -> Option<&'a Object<Model>> {
    models
        .iter()
        .filter(|m| m.name == name && (m.tenant.as_deref() == Some(tenant) || m.tenant.is_none()))
        .max_by_key(|m| m.tenant.is_some())
}

/// One status per replica number: a running copy (old or new) counts
/// before one still starting.
fn replica_statuses(existing: &[&Object<Placement>], desired: usize) -> Vec<ReplicaStatus> {
    (0..desired as u32)
        .filter_map(|r| {
            existing
                .iter()
                .filter(|p| p.spec.replica == r)
                .filter_map(|p| p.status.clone())
                .max_by_key(|s| s.state == LifecycleState::Running)
        })
        .collect()
}

impl Owner<'_> {
    /// The status that its replicas' states add up to.
    fn rollup(&self, replicas: &[ReplicaStatus], unplaced: Option<&str>) -> Status {
        let desired = self.desired;
        if matches!(self.template, Template::External) {
            return Status::new(LifecycleState::Running, "routes to an external endpoint");
        }
        let count = |state| replicas.iter().filter(|r| r.state == state).count();
        let (running, failed) = (
            count(LifecycleState::Running),
            count(LifecycleState::Failed),
        );
        if let Some(why) = unplaced {
            if running == 0 {
                return Status::new(
                    LifecycleState::Pending,
                    format!("waiting for placement: {why}"),
                );
            }
        }
        if running >= desired && desired > 0 {
            Status::new(
                LifecycleState::Running,
                format!("{running}/{desired} replicas ready"),
            )
        } else if failed > 0 {
            Status::new(
                LifecycleState::Degraded,
                format!("{running}/{desired} replicas ready, {failed} failed"),
            )
        } else {
            Status::new(
                LifecycleState::Provisioning,
                format!("{running}/{desired} replicas ready"),
            )
        }
    }
}

/// What a deployment's replicas run, or a workload's.
enum Template<'a> {
    /// A model served by an engine; `None` when the model is gone.
    Model(EngineKind, Option<&'a Object<Model>>),
    /// An external upstream: nothing to run.
    External,
    Container(&'a WorkloadSpec),
}

/// One deployment or workload in one pass: what it wants, whatever kind.
struct Owner<'a> {
    kind: &'static str,
    id: &'a str,
    name: &'a str,
    revision: i64,
    status: Option<&'a Status>,
    tenant: &'a str,
    tenant_spec: Option<&'a TenantSpec>,
    resources: &'a Resources,
    sites: &'a [String],
    /// Replicas to run.
    desired: usize,
    template: Template<'a>,
}

impl<'a> Owner<'a> {
    fn of_deployment(d: &'a Object<Deployment>, world: &'a World) -> Owner<'a> {
        let tenant = d.tenant.as_deref().unwrap_or_default();
        let external = d.spec.engine == EngineKind::External;
        Owner {
            kind: Deployment::KIND,
            id: &d.id,
            name: &d.name,
            revision: d.revision,
            status: d.status.as_ref(),
            tenant,
            tenant_spec: world.tenants.get(tenant),
            resources: &d.spec.resources,
            sites: &d.spec.sites,
            // No autoscaler yet: the minimum, at least one.
            desired: if external {
                0
            } else {
                d.spec.replicas.min.max(1) as usize
            },
            template: if external {
                Template::External
            } else {
                Template::Model(
                    d.spec.engine,
                    model_of(&world.models, &d.spec.model, tenant),
                )
            },
        }
    }

    fn of_workload(w: &'a Object<Workload>, world: &'a World) -> Owner<'a> {
        let tenant = w.tenant.as_deref().unwrap_or_default();
        Owner {
            kind: Workload::KIND,
            id: &w.id,
            name: &w.name,
            revision: w.revision,
            status: w.status.as_ref(),
            tenant,
            tenant_spec: world.tenants.get(tenant),
            resources: &w.spec.resources,
            sites: &w.spec.sites,
            desired: w.spec.replicas as usize,
            template: Template::Container(&w.spec),
        }
    }

    /// What replica `replica` of the current spec is placed as, where
    /// `binding` (on a node of `site`) puts it; `None` when what it would
    /// run is gone (its model was deleted).
    fn placement(
        &self,
        replica: u32,
        binding: &fleet::Binding,
        site: String,
    ) -> Option<PlacementSpec> {
        let (engine, model, model_source, model_task, container) = match &self.template {
            Template::Model(engine, model) => {
                let m = (*model)?;
                let spec: &ModelSpec = &m.spec;
                (
                    *engine,
                    m.name.clone(),
                    spec.source.clone(),
                    spec.task,
                    None,
                )
            }
            Template::External => return None,
            Template::Container(w) => (
                EngineKind::Container,
                w.container.image.clone(),
                String::new(),
                ModelTask::Chat,
                Some(w.container.clone()),
            ),
        };
        Some(PlacementSpec {
            deployment: self.id.to_string(),
            deployment_name: self.name.to_string(),
            container,
            replica,
            node: binding.node.clone(),
            site,
            engine,
            model,
            model_source,
            model_task,
            resources: self.resources.clone(),
            gpus: from_slots(&binding.slots),
        })
    }

    /// Whether a placement runs the current spec: the same engine, model
    /// (or container) and resources. Anything else is rolled: a placement
    /// never changes (its replica's sandbox was built from it), it is
    /// replaced.
    fn is_current(&self, p: &PlacementSpec) -> bool {
        let runs_it = match &self.template {
            Template::Model(engine, model) => {
                p.engine == *engine
                    && model.is_none_or(|m| {
                        p.model == m.name
                            && p.model_source == m.spec.source
                            && p.model_task == m.spec.task
                    })
            }
            Template::External => true,
            Template::Container(w) => p.container.as_ref() == Some(&w.container),
        };
        runs_it && p.resources == *self.resources
    }

    /// Brings the deployment's placements to its spec: replicas past the
    /// desired count go; each missing or outdated replica gets a new
    /// placement first, and an outdated one is removed once its successor
    /// runs — or at once when the successor finds no room beside it (a
    /// tenant at its quota, a full fleet), so a change is never stuck.
    /// Returns why a replica could not be placed, if one could not.
    fn roll(
        &self,
        existing: &[&Object<Placement>],
        fleet: &mut fleet::Fleet,
        plan: &mut Plan,
    ) -> Option<String> {
        let desired = self.desired;
        let remove = |p: &Object<Placement>, fleet: &mut fleet::Fleet, plan: &mut Plan| {
            plan.remove(&p.id);
            fleet.release(&p.id);
        };
        for p in existing {
            if p.spec.replica as usize >= desired {
                remove(p, fleet, plan);
            }
        }
        for replica in 0..desired as u32 {
            let of_replica = || existing.iter().filter(move |p| p.spec.replica == replica);
            let current = of_replica().find(|p| self.is_current(&p.spec));
            let outdated: Vec<&Object<Placement>> = of_replica()
                .filter(|p| !self.is_current(&p.spec))
                .copied()
                .collect();
            if let Some(p) = current {
                let running = p
                    .status
                    .as_ref()
                    .is_some_and(|s| s.state == LifecycleState::Running);
                if running {
                    for old in &outdated {
                        remove(old, fleet, plan);
                    }
                }
                continue;
            }
            let gone = matches!(self.template, Template::Model(_, None));
            let (Some(tenant_spec), false) = (self.tenant_spec, gone) else {
                return Some("its model or tenant no longer exists".to_string());
            };
            let request = fleet_request(
                format!("{}/{replica}", self.id),
                self.tenant,
                tenant_spec.priority,
                self.resources,
                self.sites,
            );
            let mut placed = fleet.place(&request);
            if placed.is_err() && !outdated.is_empty() {
                // No room beside the old replica: replace it in place.
                for old in &outdated {
                    remove(old, fleet, plan);
                }
                placed = fleet.place(&request);
            }
            let binding = match placed {
                Ok(b) => b,
                Err(why) => {
                    plan.unplaceable += 1;
                    return Some(why.to_string());
                }
            };
            let site = fleet
                .nodes()
                .get(binding.node_index())
                .map(|n| n.site.clone())
                .unwrap_or_default();
            // A replica's name is kept by its first placement.
            let Some(spec) = self.placement(replica, &binding, site) else {
                return Some("its model no longer exists".to_string());
            };
            let name = format!("{}-{replica}", self.name);
            plan.actions.push(Action::Place {
                tenant: self.tenant.to_string(),
                name_taken: existing.iter().any(|p| p.name == name),
                name,
                spec: Box::new(spec),
            });
        }
        None
    }
}
