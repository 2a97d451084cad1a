//! The placement controller: turns each deployment into replica placements
//! on nodes with room, removes placements nobody wants, and rolls replica
//! states up into the deployment's status.
//!
//! It is a reconcile loop (kube-rs style): `reconcile` reads the whole
//! desired and observed state, computes the difference with pure functions,
//! writes only what changed, and returns an outcome saying what it did. It
//! runs after every store change and every few seconds. Where a replica
//! goes is atrium-sched's fleet scheduler's decision (the Atrium policy):
//! each pass rebuilds the fleet from the store — ready nodes, tenants'
//! residency, isolation, quotas and priorities — restores the placements
//! already made, then places what is missing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use atrium_core::deployment::{DeploymentSpec, EngineKind, Resources};
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::model::ModelSpec;
use atrium_core::node::{NodeSpec, NodeState};
use atrium_core::placement::{GpuSlot, PlacementSpec, ReplicaStatus};
use atrium_core::quantity::GpuRequest;
use atrium_core::site::SiteSpec;
use atrium_core::tenant::{IsolationTier, Residency, TenantSpec};
use atrium_sched::fleet;
use atrium_sched::mig::MigProfile;
use atrium_store::{AuditContext, Object, Store, TenantFilter, Write, WriteError};
use serde_json::{json, Value};

use crate::crud::new_id;
use crate::kinds::{
    Kind, Placement, DEPLOYMENT_KIND, MODEL_KIND, NODE_KIND, PLACEMENT_KIND, SITE_KIND, TENANT_KIND,
};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub placed: usize,
    pub removed: usize,
    pub statuses_updated: usize,
    /// Replicas that found no node.
    pub unplaceable: usize,
}

fn audit(action: &str) -> AuditContext {
    AuditContext {
        actor: "placement-controller".into(),
        role: "system".into(),
        action: action.into(),
        request_id: String::new(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(o: &Object) -> Option<T> {
    serde_json::from_value(o.body["spec"].clone()).ok()
}

/// The scheduler's view of a node; None if it cannot take work (not
/// ready, or its site is unknown).
fn fleet_node(
    name: &str,
    spec: &NodeSpec,
    sites: &HashMap<String, SiteSpec>,
) -> Option<fleet::Node> {
    if spec.state != NodeState::Ready {
        return None;
    }
    let site = sites.get(&spec.site)?;
    Some(fleet::Node {
        name: name.to_string(),
        site: spec.site.clone(),
        jurisdiction: site.jurisdiction.clone(),
        leaf: spec.labels.get(LEAF_LABEL).cloned(),
        cpu_milli: spec.capacity.cpu.0,
        memory_mib: spec.capacity.memory.0 / MIB,
        gpus: spec
            .gpus
            .iter()
            .map(|g| fleet::GpuDevice {
                model: g.model.clone(),
                memory_mib: g.memory.0 / MIB,
                nvlink: g.nvlink_domain.clone(),
                mig_capable: g.mig_capable,
            })
            .collect(),
    })
}

/// Node label naming its leaf switch / rail group.
pub const LEAF_LABEL: &str = "atrium.dev/leaf";
const MIB: u64 = 1 << 20;

fn tenant_policy(t: &TenantSpec) -> fleet::TenantPolicy {
    let limit = |v: Option<u64>| v.unwrap_or(u64::MAX);
    fleet::TenantPolicy {
        isolation: match t.isolation {
            IsolationTier::Shared => fleet::Isolation::Shared,
            IsolationTier::DedicatedGpu => fleet::Isolation::DedicatedGpu,
            IsolationTier::DedicatedNode => fleet::Isolation::DedicatedNode,
        },
        jurisdictions: match &t.residency {
            Residency::Any => None,
            Residency::Only { jurisdictions } => Some(jurisdictions.clone()),
        },
        // Quotas are guarantees; borrowing beyond them is not offered yet.
        guaranteed: fleet::Amount {
            cpu_milli: limit(t.quota.cpu.map(|c| c.0)),
            memory_mib: limit(t.quota.memory.map(|m| m.0 / MIB)),
            gpu_milli: limit(t.quota.gpus.map(|g| g.0)),
        },
        borrowable: fleet::Amount::default(),
        weight: 1,
    }
}

/// The scheduler's request for one replica holding `r`, in `sites`.
fn fleet_request(
    id: String,
    tenant: &str,
    priority: i32,
    r: &Resources,
    sites: &[String],
) -> fleet::Request {
    fleet::Request {
        id,
        tenant: tenant.to_string(),
        priority,
        cpu_milli: r.cpu.0,
        memory_mib: r.memory.0.div_ceil(MIB),
        gpu: match r.gpu {
            None => fleet::GpuAsk::None,
            Some(GpuRequest::Milli(m)) if m < 1000 => fleet::GpuAsk::Share(m),
            Some(GpuRequest::Milli(m)) => fleet::GpuAsk::Whole(m / 1000),
            Some(GpuRequest::Mig(p)) => fleet::GpuAsk::Mig(MigProfile {
                compute: p.compute_slices,
                memory_gb: p.memory_gb,
            }),
        },
        gpu_memory_mib: r.gpu_memory.map(|m| m.0.div_ceil(MIB)).unwrap_or(0),
        models: r.gpu_models.clone(),
        sites: sites.to_vec(),
    }
}

fn to_slots(slots: &[GpuSlot]) -> Vec<fleet::Slot> {
    slots
        .iter()
        .map(|s| {
            let gpu = s.gpu as usize;
            match (s.share_milli, s.mig_start) {
                (Some(milli), _) => fleet::Slot::Share { gpu, milli },
                (None, Some(start)) => fleet::Slot::Mig { gpu, start },
                (None, None) => fleet::Slot::Whole { gpu },
            }
        })
        .collect()
}

fn from_slots(slots: &[fleet::Slot]) -> Vec<GpuSlot> {
    slots
        .iter()
        .map(|s| {
            let gpu = s.gpu() as u32;
            match *s {
                fleet::Slot::Whole { .. } => GpuSlot {
                    gpu,
                    share_milli: None,
                    mig_start: None,
                },
                fleet::Slot::Share { milli, .. } => GpuSlot {
                    gpu,
                    share_milli: Some(milli),
                    mig_start: None,
                },
                fleet::Slot::Mig { start, .. } => GpuSlot {
                    gpu,
                    share_milli: None,
                    mig_start: Some(start),
                },
            }
        })
        .collect()
}

/// The deployment status that its replicas' states add up to.
fn rollup(
    spec: &DeploymentSpec,
    desired: usize,
    replicas: &[ReplicaStatus],
    unplaced: Option<&str>,
) -> Status {
    if spec.engine == EngineKind::External {
        return Status::new(LifecycleState::Running, "routes to an external endpoint");
    }
    let running = replicas
        .iter()
        .filter(|r| r.state == LifecycleState::Running)
        .count();
    let failed = replicas
        .iter()
        .filter(|r| r.state == LifecycleState::Failed)
        .count();
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

async fn write(store: &Store, w: Write, action: &str) -> bool {
    match store.write::<()>(w, None, audit(action)).await {
        Ok(_) => true,
        // A concurrent change (a user deleted the deployment): the next
        // pass sees it.
        Err(WriteError::Store(e)) => {
            tracing::debug!(error = %e, action, "controller write skipped");
            false
        }
        Err(WriteError::Rejected(())) => false,
    }
}

async fn remove_placement(store: &Store, id: &str) -> bool {
    write(
        store,
        Write::Delete {
            kind: PLACEMENT_KIND.into(),
            id: id.to_string(),
        },
        "placement.delete",
    )
    .await
}

/// One reconcile pass over every deployment.
pub async fn reconcile(store: &Store) -> Result<Outcome, atrium_store::StoreError> {
    let all = TenantFilter::All;
    let deployments = store.list_all(DEPLOYMENT_KIND, &all).await?;
    let placements = store.list_all(PLACEMENT_KIND, &all).await?;
    let nodes = store.list_all(NODE_KIND, &all).await?;
    let sites: HashMap<String, SiteSpec> = store
        .list_all(SITE_KIND, &all)
        .await?
        .iter()
        .filter_map(|s| Some((s.name.clone(), parse(s)?)))
        .collect();
    let tenants: HashMap<String, TenantSpec> = store
        .list_all(TENANT_KIND, &all)
        .await?
        .iter()
        .filter_map(|t| Some((t.name.clone(), parse(t)?)))
        .collect();
    let models = store.list_all(MODEL_KIND, &all).await?;
    let mut outcome = Outcome::default();

    // Placements of deployments that are gone are removed first, freeing room.
    let live: HashMap<&str, &Object> = deployments.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut by_deployment: BTreeMap<String, Vec<&Object>> = BTreeMap::new();
    for p in &placements {
        let Some(spec) = parse::<PlacementSpec>(p) else {
            continue;
        };
        if live.contains_key(spec.deployment.as_str()) {
            by_deployment
                .entry(spec.deployment.clone())
                .or_default()
                .push(p);
        } else if remove_placement(store, &p.id).await {
            outcome.removed += 1;
        }
    }

    let fleet_nodes: Vec<fleet::Node> = nodes
        .iter()
        .filter_map(|n| fleet_node(&n.name, &parse::<NodeSpec>(n)?, &sites))
        .collect();
    let policies: BTreeMap<String, fleet::TenantPolicy> = tenants
        .iter()
        .map(|(name, t)| (name.clone(), tenant_policy(t)))
        .collect();
    let mut fleet = fleet::Fleet::new(fleet_nodes, policies);
    let priority = |tenant: &str| tenants.get(tenant).map_or(0, |t| t.priority);
    // What is already placed holds its room, exactly where it is, and
    // exactly what it holds: a deployment updated since keeps its old
    // replicas' amounts in the fleet until they are replaced.
    for (deployment_id, ps) in &by_deployment {
        let Some(d) = live.get(deployment_id.as_str()) else {
            continue;
        };
        let tenant = d.tenant.clone().unwrap_or_default();
        for p in ps {
            let Some(spec) = parse::<PlacementSpec>(p) else {
                continue;
            };
            let request = fleet_request(
                p.id.clone(),
                &tenant,
                priority(&tenant),
                &spec.resources,
                &[],
            );
            if let Err(e) = fleet.restore(&request, &spec.node, &to_slots(&spec.gpus)) {
                tracing::debug!(placement = %p.id, node = %spec.node, error = %e, "placement not restored into the scheduler");
            }
        }
    }

    for d in &deployments {
        let Some(spec) = parse::<DeploymentSpec>(d) else {
            continue;
        };
        let tenant = d.tenant.clone().unwrap_or_default();
        let existing: Vec<(&Object, PlacementSpec)> = by_deployment
            .get(&d.id)
            .into_iter()
            .flatten()
            .filter_map(|p| Some((*p, parse::<PlacementSpec>(p)?)))
            .collect();
        let model = models
            .iter()
            .filter(|m| {
                m.name == spec.model
                    && (m.tenant.as_deref() == Some(tenant.as_str()) || m.tenant.is_none())
            })
            .max_by_key(|m| m.tenant.is_some())
            .and_then(|m| Some((m.name.clone(), parse::<ModelSpec>(m)?)));
        let pass = DeploymentPass {
            store,
            deployment: d,
            spec: &spec,
            tenant: &tenant,
            tenant_spec: tenants.get(&tenant),
            model: model.as_ref(),
        };
        let unplaced = pass.roll(&existing, &mut fleet, &mut outcome).await;

        // Each replica number counts once: a running copy (old or new)
        // before one still starting.
        let desired = pass.desired();
        let replicas: Vec<ReplicaStatus> = (0..desired as u32)
            .filter_map(|r| {
                existing
                    .iter()
                    .filter(|(_, s)| s.replica == r)
                    .filter_map(|(p, _)| {
                        serde_json::from_value::<ReplicaStatus>(p.body["status"].clone()).ok()
                    })
                    .max_by_key(|s| s.state == LifecycleState::Running)
            })
            .collect();
        let status = rollup(&spec, desired, &replicas, unplaced.as_deref());
        let status_value = serde_json::to_value(&status).unwrap_or(Value::Null);
        if d.body.get("status") != Some(&status_value) {
            let mut body = d.body.clone();
            body["status"] = status_value;
            let w = Write::Update {
                kind: DEPLOYMENT_KIND.into(),
                id: d.id.clone(),
                body,
                if_revision: Some(d.revision),
            };
            if write(store, w, "deployment.status").await {
                outcome.statuses_updated += 1;
            }
        }
    }
    Ok(outcome)
}

/// One deployment in one reconcile pass.
struct DeploymentPass<'a> {
    store: &'a Store,
    deployment: &'a Object,
    spec: &'a DeploymentSpec,
    tenant: &'a str,
    tenant_spec: Option<&'a TenantSpec>,
    /// The model the deployment names (its tenant's, else the public one).
    model: Option<&'a (String, ModelSpec)>,
}

impl DeploymentPass<'_> {
    /// Replicas to run: no autoscaler yet, so the minimum, at least one.
    fn desired(&self) -> usize {
        if self.spec.engine == EngineKind::External {
            0
        } else {
            self.spec.replicas.min.max(1) as usize
        }
    }

    /// What a replica of the current spec is placed as, where `binding`
    /// (on a node of `site`) puts it.
    fn placement(
        &self,
        replica: u32,
        binding: &fleet::Binding,
        site: String,
    ) -> Option<PlacementSpec> {
        let (model, model_spec) = self.model?;
        Some(PlacementSpec {
            deployment: self.deployment.id.clone(),
            deployment_name: self.deployment.name.clone(),
            replica,
            node: binding.node.clone(),
            site,
            engine: self.spec.engine,
            model: model.clone(),
            model_source: model_spec.source.clone(),
            model_task: model_spec.task,
            resources: self.spec.resources.clone(),
            gpus: from_slots(&binding.slots),
        })
    }

    /// Whether a placement runs the current spec: the same engine, model
    /// and resources. Anything else is rolled: a placement never changes
    /// (its replica's sandbox was built from it), it is replaced.
    fn is_current(&self, p: &PlacementSpec) -> bool {
        self.model.is_none_or(|(model, m)| {
            p.model == *model && p.model_source == m.source && p.model_task == m.task
        }) && p.engine == self.spec.engine
            && p.resources == self.spec.resources
    }

    /// Brings the deployment's placements to its spec: replicas past the
    /// desired count go; each missing or outdated replica gets a new
    /// placement first, and an outdated one is removed once its successor
    /// runs — or at once when the successor finds no room beside it (a
    /// tenant at its quota, a full fleet), so a change is never stuck.
    /// Returns why a replica could not be placed, if one could not.
    async fn roll(
        &self,
        existing: &[(&Object, PlacementSpec)],
        fleet: &mut fleet::Fleet,
        outcome: &mut Outcome,
    ) -> Option<String> {
        let desired = self.desired();
        for (p, s) in existing {
            if s.replica as usize >= desired && remove_placement(self.store, &p.id).await {
                fleet.release(&p.id);
                outcome.removed += 1;
            }
        }
        for replica in 0..desired as u32 {
            let of_replica = || existing.iter().filter(move |(_, s)| s.replica == replica);
            let current = of_replica().find(|(_, s)| self.is_current(s));
            let outdated: Vec<&Object> = of_replica()
                .filter(|(_, s)| !self.is_current(s))
                .map(|(p, _)| *p)
                .collect();
            if let Some((p, _)) = current {
                let running = p.body["status"]["state"] == "running";
                if running {
                    for old in &outdated {
                        if remove_placement(self.store, &old.id).await {
                            fleet.release(&old.id);
                            outcome.removed += 1;
                        }
                    }
                }
                continue;
            }
            let (Some(tenant_spec), Some(_)) = (self.tenant_spec, self.model) else {
                return Some("its model or tenant no longer exists".to_string());
            };
            let request = fleet_request(
                format!("{}/{replica}", self.deployment.id),
                self.tenant,
                tenant_spec.priority,
                &self.spec.resources,
                &self.spec.sites,
            );
            let mut placed = fleet.place(&request);
            if placed.is_err() && !outdated.is_empty() {
                // No room beside the old replica: replace it in place.
                for old in &outdated {
                    if remove_placement(self.store, &old.id).await {
                        fleet.release(&old.id);
                        outcome.removed += 1;
                    }
                }
                placed = fleet.place(&request);
            }
            let binding = match placed {
                Ok(b) => b,
                Err(why) => {
                    outcome.unplaceable += 1;
                    return Some(why.to_string());
                }
            };
            let site = fleet
                .nodes()
                .get(binding.node_index())
                .map(|n| n.site.clone())
                .unwrap_or_default();
            let Some(placement) = self.placement(replica, &binding, site) else {
                continue;
            };
            let id = new_id(Placement::ID_PREFIX);
            // A replica's name is kept by its first placement; successors
            // carry a suffix of their id while the name is taken.
            let base = format!("{}-{replica}", self.deployment.name);
            let name = if existing.iter().any(|(p, _)| p.name == base) {
                format!("{base}-{}", &id[id.len() - 5..])
            } else {
                base
            };
            let status = ReplicaStatus {
                state: LifecycleState::Pending,
                reason: "waiting for the node's agent".into(),
                endpoint: None,
                restarts: 0,
                isolation: None,
                pid: None,
            };
            let w = Write::Create {
                kind: PLACEMENT_KIND.into(),
                id,
                tenant: Some(self.tenant.to_string()),
                name,
                body: json!({"spec": placement, "status": status}),
            };
            if write(self.store, w, "placement.create").await {
                outcome.placed += 1;
            }
        }
        None
    }
}

/// Runs `reconcile` after every change to the resources (debounced) and
/// every few seconds, until `stop` turns true. Revisions that carry no
/// resource change (usage batches from gateways) do not wake it: under
/// load they arrive several times a second and would re-run every pass.
pub async fn run(store: Store, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut heads = store.subscribe();
    loop {
        // Taken before reading, so writes during the pass wake the next one.
        let mut seen = *heads.borrow_and_update();
        match reconcile(&store).await {
            Ok(o) if o != Outcome::default() => tracing::info!(?o, "placement pass"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "placement pass failed; retrying"),
        }
        // Our own writes move the head too; the next pass then finds
        // nothing to do and the loop settles.
        let tick = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                changed = heads.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let head = *heads.borrow_and_update();
                    match store.changes(seen, head, None, &TenantFilter::All, 1).await {
                        Ok(c) if c.is_empty() => seen = head,
                        _ => break,
                    }
                }
                _ = &mut tick => break,
                _ = stop.changed() => return,
            }
        }
    }
}
