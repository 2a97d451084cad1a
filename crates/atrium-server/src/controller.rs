//! The placement controller: turns each deployment into replica placements
//! on nodes with room, removes placements nobody wants, and rolls replica
//! states up into the deployment's status.
//!
//! It is a reconcile loop (kube-rs style): `reconcile` reads the whole
//! desired and observed state, computes the difference with pure functions,
//! writes only what changed, and returns an outcome saying what it did. It
//! runs after every store change and every few seconds. The policy that
//! picks a node is first-fit for now, behind `choose_node`; the scheduler
//! replaces the policy, not the controller.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use atrium_core::deployment::{DeploymentSpec, EngineKind};
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::model::ModelSpec;
use atrium_core::node::{NodeSpec, NodeState};
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use atrium_core::quantity::GpuRequest;
use atrium_core::site::SiteSpec;
use atrium_core::tenant::{IsolationTier, TenantSpec};
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

/// Free capacity of a node and who is on it.
#[derive(Debug, Clone)]
struct NodeRoom {
    name: String,
    spec: NodeSpec,
    jurisdiction: String,
    cpu_free: i128,
    memory_free: i128,
    gpu_milli_free: i128,
    tenants: Vec<String>,
    dedicated_tenant: Option<String>,
}

/// First-fit: the first ready node (in name order) that satisfies site,
/// residency, isolation, GPU model and capacity.
fn choose_node<'a>(
    rooms: &'a mut [NodeRoom],
    spec: &DeploymentSpec,
    tenant: &str,
    tenant_spec: &TenantSpec,
) -> Result<&'a mut NodeRoom, String> {
    let r = &spec.resources;
    let gpu_milli = r.gpu.map(|g| g.milli() as i128).unwrap_or(0);
    let mut reasons = Vec::new();
    for room in rooms.iter_mut() {
        let why_not = if room.spec.state != NodeState::Ready {
            Some("not ready")
        } else if !spec.sites.is_empty() && !spec.sites.contains(&room.spec.site) {
            Some("not in the deployment's sites")
        } else if !tenant_spec.residency.allows(&room.jurisdiction) {
            Some("outside the tenant's residency")
        } else if room
            .dedicated_tenant
            .as_deref()
            .is_some_and(|t| t != tenant)
        {
            Some("dedicated to another tenant")
        } else if tenant_spec.isolation == IsolationTier::DedicatedNode
            && room.tenants.iter().any(|t| t != tenant)
        {
            Some("shared with another tenant")
        } else if !r.gpu_models.is_empty()
            && !room
                .spec
                .gpus
                .iter()
                .any(|g| r.gpu_models.contains(&g.model))
        {
            Some("no GPU of the requested models")
        } else if matches!(r.gpu, Some(GpuRequest::Mig(_)))
            && !room.spec.gpus.iter().any(|g| g.mig_capable)
        {
            Some("no MIG-capable GPU")
        } else if room.cpu_free < r.cpu.0 as i128
            || room.memory_free < r.memory.0 as i128
            || room.gpu_milli_free < gpu_milli
        {
            Some("not enough free CPU, memory or GPU")
        } else {
            None
        };
        match why_not {
            None => {
                room.cpu_free -= r.cpu.0 as i128;
                room.memory_free -= r.memory.0 as i128;
                room.gpu_milli_free -= gpu_milli;
                room.tenants.push(tenant.to_string());
                if tenant_spec.isolation == IsolationTier::DedicatedNode {
                    room.dedicated_tenant = Some(tenant.to_string());
                }
                return Ok(room);
            }
            Some(reason) => reasons.push(format!("{}: {reason}", room.name)),
        }
    }
    if reasons.is_empty() {
        Err("no nodes are registered".into())
    } else {
        Err(format!("no node has room ({})", reasons.join("; ")))
    }
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

    let mut rooms: Vec<NodeRoom> = nodes
        .iter()
        .filter_map(|n| {
            let spec: NodeSpec = parse(n)?;
            let jurisdiction = sites.get(&spec.site)?.jurisdiction.clone();
            Some(NodeRoom {
                name: n.name.clone(),
                cpu_free: spec.capacity.cpu.0 as i128,
                memory_free: spec.capacity.memory.0 as i128,
                gpu_milli_free: spec.gpus.len() as i128 * 1000,
                spec,
                jurisdiction,
                tenants: Vec::new(),
                dedicated_tenant: None,
            })
        })
        .collect();
    rooms.sort_by(|a, b| a.name.cmp(&b.name));
    for (deployment_id, ps) in &by_deployment {
        for p in ps {
            let (Some(spec), Some(d)) =
                (parse::<PlacementSpec>(p), live.get(deployment_id.as_str()))
            else {
                continue;
            };
            let tenant = d.tenant.clone().unwrap_or_default();
            if let Some(room) = rooms.iter_mut().find(|r| r.name == spec.node) {
                room.cpu_free -= spec.resources.cpu.0 as i128;
                room.memory_free -= spec.resources.memory.0 as i128;
                room.gpu_milli_free -= spec.resources.gpu.map(|g| g.milli() as i128).unwrap_or(0);
                if tenants
                    .get(&tenant)
                    .is_some_and(|t| t.isolation == IsolationTier::DedicatedNode)
                {
                    room.dedicated_tenant = Some(tenant.clone());
                }
                room.tenants.push(tenant);
            }
        }
    }

    for d in &deployments {
        let Some(spec) = parse::<DeploymentSpec>(d) else {
            continue;
        };
        let tenant = d.tenant.clone().unwrap_or_default();
        let existing: Vec<&Object> = by_deployment.get(&d.id).cloned().unwrap_or_default();
        // No autoscaler yet: run the minimum, and at least one replica.
        let desired = if spec.engine == EngineKind::External {
            0
        } else {
            spec.replicas.min.max(1) as usize
        };
        let mut unplaced: Option<String> = None;

        let mut indices: Vec<u32> = existing
            .iter()
            .filter_map(|p| parse::<PlacementSpec>(p).map(|s| s.replica))
            .collect();
        indices.sort_unstable();
        // Too many: remove the highest replica numbers.
        for p in &existing {
            if let Some(s) = parse::<PlacementSpec>(p) {
                if s.replica as usize >= desired && remove_placement(store, &p.id).await {
                    outcome.removed += 1;
                }
            }
        }
        // Too few: place the missing replica numbers.
        let model = models
            .iter()
            .filter(|m| {
                m.name == spec.model
                    && (m.tenant.as_deref() == Some(tenant.as_str()) || m.tenant.is_none())
            })
            .max_by_key(|m| m.tenant.is_some());
        let tenant_spec = tenants.get(&tenant);
        for replica in 0..desired as u32 {
            if indices.contains(&replica) {
                continue;
            }
            let (Some(model), Some(tenant_spec)) = (model, tenant_spec) else {
                unplaced = Some("its model or tenant no longer exists".into());
                break;
            };
            let Some(model_spec) = parse::<ModelSpec>(model) else {
                continue;
            };
            match choose_node(&mut rooms, &spec, &tenant, tenant_spec) {
                Ok(room) => {
                    let placement = PlacementSpec {
                        deployment: d.id.clone(),
                        deployment_name: d.name.clone(),
                        replica,
                        node: room.name.clone(),
                        engine: spec.engine,
                        model: model.name.clone(),
                        model_source: model_spec.source.clone(),
                        model_task: model_spec.task,
                        resources: spec.resources.clone(),
                    };
                    let status = ReplicaStatus {
                        state: LifecycleState::Pending,
                        reason: "waiting for the node's agent".into(),
                        endpoint: None,
                        restarts: 0,
                    };
                    let w = Write::Create {
                        kind: PLACEMENT_KIND.into(),
                        id: new_id(Placement::ID_PREFIX),
                        tenant: Some(tenant.clone()),
                        name: format!("{}-{replica}", d.name),
                        body: json!({"spec": placement, "status": status}),
                    };
                    if write(store, w, "placement.create").await {
                        outcome.placed += 1;
                    }
                }
                Err(why) => {
                    outcome.unplaceable += 1;
                    unplaced = Some(why);
                    break;
                }
            }
        }

        let replicas: Vec<ReplicaStatus> = existing
            .iter()
            .filter(|p| parse::<PlacementSpec>(p).is_some_and(|s| (s.replica as usize) < desired))
            .filter_map(|p| serde_json::from_value(p.body["status"].clone()).ok())
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
