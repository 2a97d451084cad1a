//! Scrubbing deleted volumes. The agent follows the volumes the control
//! plane says this node holds; a volume image here that is no longer
//! among them (deleted, while the agent ran or while it was away) and that
//! no replica assigned here mounts is scrubbed and removed
//! (`runtime::volume`). A volume must be missing for a while first: one
//! just bound to this node may reach a replica before its watch event
//! reaches the janitor.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atrium_api::{Object, Volume};
use atrium_client::{Api, Update};

use crate::supervisor::Shared;

/// How long a volume must be missing before it is scrubbed, and how often
/// the janitor looks.
const GRACE: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);

/// Follows this node's volumes and scrubs those deleted, until dropped.
pub async fn run(shared: Arc<Shared>) {
    // None until the first list: until then nothing is known to be gone.
    let known: Arc<Mutex<Option<BTreeSet<String>>>> = Arc::default();
    let follow = {
        let (known, node, cp) = (
            known.clone(),
            shared.config.node_name().to_string(),
            shared.cp.clone(),
        );
        async move {
            let mine = move |v: &Object<Volume>| {
                v.status.as_ref().and_then(|s| s.node.as_deref()) == Some(node.as_str())
            };
            Api::<Volume>::all(&cp)
                .follow(move |update| {
                    let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
                    let set = known.get_or_insert_with(BTreeSet::new);
                    match update {
                        Update::Snapshot(items) => {
                            *set = items
                                .iter()
                                .filter(|v| mine(v))
                                .map(|v| v.id.clone())
                                .collect();
                        }
                        Update::Added(v) | Update::Modified(v) if mine(&v) => {
                            set.insert(v.id);
                        }
                        Update::Added(v) | Update::Modified(v) | Update::Deleted(v) => {
                            set.remove(&v.id);
                        }
                    }
                })
                .await
        }
    };
    let sweep = async move {
        let mut missing_since: HashMap<String, Instant> = HashMap::new();
        loop {
            tokio::time::sleep(TICK).await;
            let Some(known) = known.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                continue;
            };
            let mounted: BTreeSet<String> = shared.state.read(|s| {
                s.assigned
                    .values()
                    .flat_map(|a| a.spec.volumes.iter().map(|v| v.id.clone()))
                    .collect()
            });
            let here = shared.volumes.ids();
            missing_since.retain(|id, _| here.contains(id));
            for id in here {
                if known.contains(&id) || mounted.contains(&id) {
                    missing_since.remove(&id);
                    continue;
                }
                let since = *missing_since.entry(id.clone()).or_insert_with(Instant::now);
                if since.elapsed() < GRACE {
                    continue;
                }
                let (s, volume) = (shared.clone(), id.clone());
                let scrubbed = tokio::task::spawn_blocking(move || s.volumes.scrub(&volume)).await;
                match scrubbed {
                    Ok(Ok(())) => {
                        tracing::info!(volume = %id, "agent: deleted volume scrubbed and removed")
                    }
                    Ok(Err(why)) => {
                        tracing::warn!(volume = %id, %why, "agent: volume not scrubbed yet")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %id, error = %e, "agent: volume scrub panicked")
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = follow => {}
        _ = sweep => {}
    }
}
