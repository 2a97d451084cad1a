//! One deployment or workload in a pass: what it wants, whatever kind,
//! and how a service's (or deployment's) replicas are rolled to its spec.

use atrium_api::{Deployment, Model, Object, Placement, Resource, Workload};
use atrium_core::deployment::{EngineKind, Resources};
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::model::{ModelSpec, ModelTask};
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use atrium_core::tenant::TenantSpec;
use atrium_core::volume::VolumeAttachment;
use atrium_core::workload::{JobSpec, WorkloadSpec};
use atrium_sched::fleet;

use super::fleet_view::{fleet_request, from_slots};
use super::plan::{model_of, Action, Pass, World};
use super::volume::{volume_named, Mount};

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
    pub(super) fn rollup(&self, existing: &[&Object<Placement>], unplaced: Option<&str>) -> Status {
        let desired = self.desired;
        let replicas = &replica_statuses(existing, desired);
        if matches!(self.template, Template::External) {
            return Status::new(LifecycleState::Running, "routes to an external endpoint");
        }
        if desired == 0 && matches!(self.template, Template::Model(..)) {
            // Knative's reading: serving, with nothing running while idle.
            return Status::new(
                LifecycleState::Running,
                "scaled to zero while idle; the next request starts a replica",
            );
        }
        let count = |state| replicas.iter().filter(|r| r.state == state).count();
        let (running, failed) = (
            count(LifecycleState::Running),
            count(LifecycleState::Failed),
        );
        if let Some(why) = unplaced {
            if running == 0 {
                return Status::new(LifecycleState::Pending, self.waiting(why));
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

    /// Why it waits for placement. A replica preempted earlier keeps
    /// saying so while it waits to be placed again.
    pub(super) fn waiting(&self, why: &str) -> String {
        let preempted = self.status.and_then(|s| {
            s.reason
                .split("; ")
                .find(|r| r.starts_with("preempted by "))
        });
        match preempted {
            Some(p) => format!("{p}; waiting for placement: {why}"),
            None => format!("waiting for placement: {why}"),
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
pub(super) struct Owner<'a> {
    pub kind: &'static str,
    pub id: &'a str,
    pub name: &'a str,
    pub revision: i64,
    pub status: Option<&'a Status>,
    pub tenant: &'a str,
    tenant_spec: Option<&'a TenantSpec>,
    /// Its replicas' priority: the tenant's, or the workload's own (never
    /// above the tenant's).
    pub priority: i32,
    pub resources: &'a Resources,
    pub sites: &'a [String],
    /// Tried first; the rest of `sites` takes the overflow.
    pub preferred_sites: &'a [String],
    /// Replicas to run (a service's).
    desired: usize,
    template: Template<'a>,
    /// Set for a job.
    pub job: Option<JobSpec>,
    /// The volumes each replica mounts (a workload's).
    pub volumes: Vec<Mount<'a>>,
    pub created_at: &'a str,
    pub updated_at: &'a str,
}

impl<'a> Owner<'a> {
    pub(super) fn of_deployment(d: &'a Object<Deployment>, world: &'a World) -> Owner<'a> {
        let tenant = d.tenant.as_deref().unwrap_or_default();
        let external = d.spec.engine == EngineKind::External;
        let tenant_spec = world.tenants.get(tenant);
        Owner {
            kind: Deployment::KIND,
            id: &d.id,
            name: &d.name,
            revision: d.revision,
            status: d.status.as_ref(),
            tenant,
            tenant_spec,
            priority: tenant_spec.map_or(0, |t| t.priority),
            resources: &d.spec.resources,
            sites: &d.spec.sites,
            preferred_sites: &d.spec.preferred_sites,
            // The autoscaler's count (kept within the spec's bounds should
            // the spec have changed since), or the initial one.
            desired: if external {
                0
            } else {
                let r = &d.spec.replicas;
                d.status
                    .as_ref()
                    .and_then(|s| s.desired_replicas)
                    .map_or_else(|| r.initial(), |n| n.max(r.min).min(r.max))
                    as usize
            },
            template: if external {
                Template::External
            } else {
                Template::Model(
                    d.spec.engine,
                    model_of(&world.models, &d.spec.model, tenant),
                )
            },
            job: None,
            volumes: Vec::new(),
            created_at: &d.created_at,
            updated_at: &d.updated_at,
        }
    }

    pub(super) fn of_workload(w: &'a Object<Workload>, world: &'a World) -> Owner<'a> {
        let tenant = w.tenant.as_deref().unwrap_or_default();
        let tenant_spec = world.tenants.get(tenant);
        let tenant_priority = tenant_spec.map_or(0, |t| t.priority);
        Owner {
            kind: Workload::KIND,
            id: &w.id,
            name: &w.name,
            revision: w.revision,
            status: w.status.as_ref(),
            tenant,
            tenant_spec,
            priority: w
                .spec
                .priority
                .map_or(tenant_priority, |p| p.min(tenant_priority)),
            resources: &w.spec.resources,
            sites: &w.spec.sites,
            preferred_sites: &[],
            desired: w.spec.replicas as usize,
            template: Template::Container(&w.spec),
            job: w.spec.job(),
            volumes: w
                .spec
                .volumes
                .iter()
                .map(|m| (m, volume_named(&world.volumes, tenant, &m.volume)))
                .collect(),
            created_at: &w.created_at,
            updated_at: &w.updated_at,
        }
    }

    /// What replica `replica` of the current spec is placed as, where
    /// `binding` (on a node of `site`) puts it; `None` when what it would
    /// run is gone (its model was deleted).
    pub(super) fn placement(
        &self,
        replica: u32,
        binding: &fleet::Binding,
        site: String,
        volumes: Vec<VolumeAttachment>,
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
            retries: self.job.as_ref().map(|j| j.backoff_limit),
            volumes,
            overlay_vni: None,
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
            Template::Container(w) => {
                p.container.as_ref() == Some(&w.container)
                    && p.volumes.len() == w.volumes.len()
                    && p.volumes.iter().zip(&w.volumes).all(|(a, m)| {
                        a.name == m.volume && a.path == m.mount_path() && a.read_only == m.read_only
                    })
            }
        };
        runs_it && p.resources == *self.resources
    }

    /// Brings the deployment's placements to its spec: replicas past the
    /// desired count go; each missing or outdated replica gets a new
    /// placement first, and an outdated one is removed once its successor
    /// runs — or at once when the successor finds no room beside it (a
    /// tenant at its quota, a full fleet), so a change is never stuck.
    /// Returns why a replica could not be placed, if one could not.
    pub(super) fn roll(&self, existing: &[&Object<Placement>], pass: &mut Pass) -> Option<String> {
        let desired = self.desired;
        for p in existing {
            if p.spec.replica as usize >= desired {
                pass.remove(&p.id);
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
                        pass.remove(&old.id);
                    }
                }
                continue;
            }
            let gone = matches!(self.template, Template::Model(_, None));
            let (Some(_), false) = (self.tenant_spec, gone) else {
                return Some("its model or tenant no longer exists".to_string());
            };
            let request = match self.request(replica, pass) {
                Ok(r) => r,
                Err(why) => {
                    pass.plan.unplaceable += 1;
                    return Some(why);
                }
            };
            let mut placed = pass.place(&request, self);
            if placed.is_err() && !outdated.is_empty() {
                // No room beside the old replica: replace it in place.
                for old in &outdated {
                    pass.remove(&old.id);
                }
                placed = pass.place(&request, self);
            }
            let binding = match placed {
                Ok(b) => b,
                Err(why) => {
                    pass.plan.unplaceable += 1;
                    return Some(why.to_string());
                }
            };
            if let Err(why) = self.push_place(replica, &binding, existing, pass) {
                return Some(why);
            }
        }
        None
    }

    /// The scheduler's request for replica (or job index) `replica`, on
    /// the nodes its volumes allow; `Err` says why no node does.
    pub(super) fn request(&self, replica: u32, pass: &Pass) -> Result<fleet::Request, String> {
        let mut request = fleet_request(
            format!("{}/{replica}", self.id),
            self.tenant,
            self.priority,
            self.resources,
            self.sites,
        );
        request.nodes = pass.volumes.nodes_for(&self.volumes)?;
        Ok(request)
    }

    /// Plans the placement of `replica` where `binding` puts it. A
    /// replica's name is kept by its first placement; a successor's is
    /// marked taken.
    pub(super) fn push_place(
        &self,
        replica: u32,
        binding: &fleet::Binding,
        existing: &[&Object<Placement>],
        pass: &mut Pass,
    ) -> Result<(), String> {
        let site = pass
            .fleet
            .nodes()
            .get(binding.node_index())
            .map(|n| n.site.clone())
            .unwrap_or_default();
        let volumes = pass
            .volumes
            .attach(&self.volumes, &binding.node, &mut pass.plan);
        let Some(spec) = self.placement(replica, binding, site, volumes) else {
            return Err("its model no longer exists".to_string());
        };
        let name = format!("{}-{replica}", self.name);
        pass.plan.actions.push(Action::Place {
            tenant: self.tenant.to_string(),
            name_taken: existing.iter().any(|p| p.name == name),
            name,
            spec: Box::new(spec),
        });
        Ok(())
    }
}
