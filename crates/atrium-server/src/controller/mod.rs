//! The placement controller: turns each deployment and workload into
//! replica placements on nodes with room, removes placements nobody wants,
//! rolls replica states up into their owner's status, and runs jobs to
//! completion (see `job`).
//!
//! It is a reconcile loop (kube-rs style): `reconcile` reads the whole
//! desired and observed state into a typed [`World`], [`plan`] (pure: no
//! IO) computes the [`Action`]s that close the difference, and a thin
//! executor writes them and returns an outcome saying what it did. It
//! runs after every store change and every few seconds. Where a replica
//! goes is atrium-sched's fleet scheduler's decision (the Atrium policy):
//! each pass rebuilds the fleet from the store — ready nodes, tenants'
//! residency, isolation, quotas and priorities — restores the placements
//! already made, then places what is missing.

mod fleet_view;
mod job;
mod overlay_vni;
mod owner;
mod plan;
mod volume;

use std::collections::HashMap;
use std::time::Duration;

use atrium_core::volume::VolumeStatus;
use atrium_store::{AuditContext, Object, Store, TenantFilter, Write, WriteError};

pub use fleet_view::LEAF_LABEL;
pub use plan::{plan, Action, Plan, World};

use crate::crud::new_id;
use crate::kinds::{Deployment, Model, Node, Placement, Resource, Site, Tenant, Volume, Workload};
use crate::stored;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub placed: usize,
    pub removed: usize,
    pub statuses_updated: usize,
    /// Finished jobs deleted when their time to live ran out.
    pub deleted: usize,
    /// Volumes given a node.
    pub volumes_bound: usize,
    /// Replicas that found no node.
    pub unplaceable: usize,
}

/// Reads the world from the store: every object the plan needs, typed,
/// and the raw objects whose status a pass may write (owners, volumes).
/// Objects whose stored spec does not parse are left out (and logged).
async fn read_world(store: &Store) -> Result<(World, Vec<Object>), atrium_store::StoreError> {
    let all = TenantFilter::All;
    let deployments = store.list_all(Deployment::KIND, &all).await?;
    let workloads = store.list_all(Workload::KIND, &all).await?;
    let volumes = store.list_all(Volume::KIND, &all).await?;
    let world = World {
        deployments: stored::all::<Deployment>(&deployments),
        workloads: stored::all::<Workload>(&workloads),
        placements: stored::all::<Placement>(&store.list_all(Placement::KIND, &all).await?),
        nodes: stored::all::<Node>(&store.list_all(Node::KIND, &all).await?),
        models: stored::all::<Model>(&store.list_all(Model::KIND, &all).await?),
        sites: stored::specs_by_name::<Site>(&store.list_all(Site::KIND, &all).await?),
        tenants: stored::specs_by_name::<Tenant>(&store.list_all(Tenant::KIND, &all).await?),
        volumes: stored::all::<Volume>(&volumes),
        now: time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let written = deployments.into_iter().chain(workloads).chain(volumes);
    Ok((world, written.collect()))
}

/// One reconcile pass: read the world, plan, carry the plan out.
pub async fn reconcile(store: &Store) -> Result<Outcome, atrium_store::StoreError> {
    let (world, owners) = read_world(store).await?;
    let plan = plan(&world);
    let owners: HashMap<&str, &Object> = owners.iter().map(|d| (d.id.as_str(), d)).collect();
    // Read at the first placement made: most passes make none.
    let mut vnis: Option<overlay_vni::Vnis> = None;
    let mut outcome = Outcome {
        unplaceable: plan.unplaceable,
        ..Outcome::default()
    };
    for action in plan.actions {
        match action {
            Action::Remove { placement } => {
                let w = Write::Delete {
                    kind: Placement::KIND.into(),
                    id: placement,
                };
                outcome.removed += usize::from(write(store, w, "placement.delete").await);
            }
            Action::Place {
                tenant,
                name,
                name_taken,
                mut spec,
            } => {
                let vnis = match &mut vnis {
                    Some(v) => v,
                    None => vnis.insert(overlay_vni::Vnis::read(store).await?),
                };
                let Some(vni) = vnis.of(store, &tenant).await else {
                    continue;
                };
                spec.overlay_vni = Some(vni);
                let id = new_id(Placement::ID_PREFIX);
                let name = if name_taken {
                    format!("{name}-{}", &id[id.len() - 5..])
                } else {
                    name
                };
                let Ok(body) = stored::body::<Placement>(&*spec, Some(&plan::pending_replica()))
                else {
                    continue;
                };
                let w = Write::Create {
                    kind: Placement::KIND.into(),
                    id,
                    tenant: Some(tenant),
                    name,
                    body,
                };
                outcome.placed += usize::from(write(store, w, "placement.create").await);
            }
            Action::SetStatus {
                kind,
                deployment,
                revision,
                status,
            } => {
                let Some(d) = owners.get(deployment.as_str()) else {
                    continue;
                };
                // Deployments and workloads share the status type.
                let Ok(body) = stored::with_status::<Deployment>(&d.body, &status) else {
                    continue;
                };
                let w = Write::Update {
                    kind: kind.into(),
                    id: deployment,
                    body,
                    if_revision: Some(revision),
                };
                let action = format!("{kind}.status");
                outcome.statuses_updated += usize::from(write(store, w, &action).await);
            }
            Action::Delete { kind, id } => {
                let w = Write::Delete {
                    kind: kind.into(),
                    id,
                };
                let action = format!("{kind}.expire");
                outcome.deleted += usize::from(write(store, w, &action).await);
            }
            Action::BindVolume { id, revision, node } => {
                let Some(v) = owners.get(id.as_str()) else {
                    continue;
                };
                let status = VolumeStatus {
                    reason: format!("on node {node}"),
                    node: Some(node),
                };
                let Ok(body) = stored::with_status::<Volume>(&v.body, &status) else {
                    continue;
                };
                let w = Write::Update {
                    kind: Volume::KIND.into(),
                    id,
                    body,
                    if_revision: Some(revision),
                };
                outcome.volumes_bound += usize::from(write(store, w, "volume.bind").await);
            }
        }
    }
    Ok(outcome)
}

fn audit(action: &str) -> AuditContext {
    AuditContext::system("placement-controller", action)
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
