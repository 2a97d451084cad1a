//! Volumes in a pass: which node each one lies on, what disk each node has
//! left for more, and so which nodes a replica that mounts volumes may go
//! to. A volume not yet on a node goes where the first replica mounting it
//! is placed (the plan then binds it there); every later replica follows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use atrium_api::{Object, Volume};
use atrium_core::quantity::ByteSize;
use atrium_core::volume::{VolumeAttachment, VolumeMount};

use super::plan::{Action, Plan, World};

/// Where the world's volumes lie, as bound so far in this pass.
pub(crate) struct VolumeMap {
    /// Volume id → its node.
    node_of: HashMap<String, String>,
    /// Node → bytes of disk not yet given to volumes.
    free: BTreeMap<String, u64>,
}

/// A workload's mount with the volume it names, if that exists.
pub(super) type Mount<'a> = (&'a VolumeMount, Option<&'a Object<Volume>>);

impl VolumeMap {
    /// The volumes' nodes as their statuses say. A volume a placement
    /// mounts whose status names no node (its binding write lost to a
    /// concurrent change) is bound again where that placement is.
    pub fn of(world: &World, plan: &mut Plan) -> VolumeMap {
        let mut node_of: HashMap<String, String> = world
            .volumes
            .iter()
            .filter_map(|v| {
                let node = v.status.as_ref()?.node.clone()?;
                Some((v.id.clone(), node))
            })
            .collect();
        for p in &world.placements {
            for a in &p.spec.volumes {
                if node_of.contains_key(&a.id) {
                    continue;
                }
                if let Some(v) = world.volumes.iter().find(|v| v.id == a.id) {
                    node_of.insert(a.id.clone(), p.spec.node.clone());
                    plan.actions.push(Action::BindVolume {
                        id: a.id.clone(),
                        revision: v.revision,
                        node: p.spec.node.clone(),
                    });
                }
            }
        }
        let mut free: BTreeMap<String, u64> = world
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.spec.capacity.disk.0))
            .collect();
        for v in &world.volumes {
            if let Some(room) = node_of.get(&v.id).and_then(|n| free.get_mut(n)) {
                *room = room.saturating_sub(v.spec.size.0);
            }
        }
        VolumeMap { node_of, free }
    }

    /// The nodes a replica mounting `mounts` may go to: any (empty) without
    /// volumes; the one holding them; or, while none is bound, every node
    /// with disk for them. `Err` says why there is none.
    pub fn nodes_for(&self, mounts: &[Mount]) -> Result<Vec<String>, String> {
        if mounts.is_empty() {
            return Ok(Vec::new());
        }
        let mut bound: BTreeSet<(&str, &str)> = BTreeSet::new();
        let mut unbound = 0u64;
        for (m, v) in mounts {
            let v = v.ok_or_else(|| format!("volume {:?} does not exist", m.volume))?;
            match self.node_of.get(&v.id) {
                Some(node) => {
                    bound.insert((node.as_str(), v.name.as_str()));
                }
                None => unbound = unbound.saturating_add(v.spec.size.0),
            }
        }
        let nodes: BTreeSet<&str> = bound.iter().map(|(n, _)| *n).collect();
        let fits = |node: &str| unbound == 0 || self.free.get(node).is_some_and(|f| *f >= unbound);
        match nodes.len() {
            0 => {
                let with_room: Vec<String> =
                    self.free.keys().filter(|n| fits(n)).cloned().collect();
                if with_room.is_empty() {
                    Err(format!(
                        "no node has {} of disk free for its volumes",
                        ByteSize(unbound)
                    ))
                } else {
                    Ok(with_room)
                }
            }
            1 => {
                let node = nodes.first().copied().unwrap_or_default();
                if fits(node) {
                    Ok(vec![node.to_string()])
                } else {
                    Err(format!(
                        "its volumes lie on node {node}, which has no {} of disk free for \
                         the rest of them",
                        ByteSize(unbound)
                    ))
                }
            }
            _ => {
                let lying: Vec<String> = bound
                    .iter()
                    .map(|(node, name)| format!("{name} on {node}"))
                    .collect();
                Err(format!(
                    "its volumes lie on different nodes ({}): a replica mounts volumes of \
                     one node only",
                    lying.join(", ")
                ))
            }
        }
    }

    /// Binds the still unbound volumes of `mounts` to `node`, where a
    /// replica mounting them was just placed, and returns the attachments
    /// that replica carries.
    pub fn attach(
        &mut self,
        mounts: &[Mount],
        node: &str,
        plan: &mut Plan,
    ) -> Vec<VolumeAttachment> {
        let mut attached = Vec::with_capacity(mounts.len());
        for (m, v) in mounts {
            let Some(v) = v else { continue };
            if !self.node_of.contains_key(&v.id) {
                self.node_of.insert(v.id.clone(), node.to_string());
                if let Some(room) = self.free.get_mut(node) {
                    *room = room.saturating_sub(v.spec.size.0);
                }
                plan.actions.push(Action::BindVolume {
                    id: v.id.clone(),
                    revision: v.revision,
                    node: node.to_string(),
                });
            }
            attached.push(VolumeAttachment {
                id: v.id.clone(),
                name: v.name.clone(),
                size: v.spec.size,
                path: m.mount_path(),
                read_only: m.read_only,
            });
        }
        attached
    }

    /// Whether any of `mounts` is still to be bound.
    pub fn any_unbound(&self, mounts: &[Mount]) -> bool {
        mounts
            .iter()
            .any(|(_, v)| v.is_some_and(|v| !self.node_of.contains_key(&v.id)))
    }
}

/// The volume of `tenant` named `name`.
pub(super) fn volume_named<'a>(
    volumes: &'a [Object<Volume>],
    tenant: &str,
    name: &str,
) -> Option<&'a Object<Volume>> {
    volumes
        .iter()
        .find(|v| v.name == name && v.tenant.as_deref() == Some(tenant))
}
