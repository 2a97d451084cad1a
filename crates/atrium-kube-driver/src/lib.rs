//! Atrium's runtime plane on an existing Kubernetes cluster
//! (`atrium agent --driver kubernetes`): the cluster joins as one Atrium
//! node, and the placements the control plane assigns to that node run
//! as Pods in the tenants' namespaces instead of sandboxed processes.
//! The scheduler still decides what runs there; the cluster's own
//! scheduler picks the machine within it.
//!
//! Split as kube-rs controllers are: `plan` is what the cluster should
//! hold, a pure function of the placements; `apply` makes it so through
//! the API (server-side apply, field manager `atrium`); this module
//! follows the placements, runs a pass whenever they or the driver's pods
//! change (and every `RESYNC`), and reports each pod's state back as its
//! replica's status.

pub mod apply;
pub mod plan;
#[cfg(feature = "testing")]
pub mod testing;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_api::{Node, Object, Placement};
use atrium_client::{Api, ControlPlane, CredentialFile, Update};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::node::{NodeCapacity, NodeSpec, NodeState};
use atrium_core::placement::ReplicaStatus;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::Notify;

pub use apply::Cluster;
pub use plan::{Assigned, Images};

/// A pass at least this often, whatever the watches say.
const RESYNC: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub credential: CredentialFile,
    pub credential_path: PathBuf,
    /// The cluster's kubeconfig; the pod's own service account when none.
    pub kubeconfig: Option<PathBuf>,
    pub images: Images,
    /// What the node offers Atrium's scheduler: the share of the cluster
    /// the provider gives it (the cluster may run other work).
    pub capacity: NodeCapacity,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("the credential is not a node's: join with a node token")]
    NotANodeCredential,
    #[error("kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, String),
    #[error("cannot reach the cluster: {0}")]
    Cluster(String),
}

/// A client for the cluster `config` names.
pub async fn client(config: &DriverConfig) -> Result<kube::Client, DriverError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| DriverError::Kubeconfig(path.clone(), e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| DriverError::Kubeconfig(path.clone(), e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| DriverError::Cluster(e.to_string()))?,
    };
    kube::Client::try_from(kube_config).map_err(|e| DriverError::Cluster(e.to_string()))
}

async fn register(cp: &ControlPlane, config: &DriverConfig) -> Result<(), String> {
    let spec = NodeSpec {
        site: config.credential.site.clone(),
        capacity: config.capacity.clone(),
        gpus: Vec::new(),
        labels: [("atrium.dev/agent".to_string(), "kubernetes".to_string())].into(),
        state: NodeState::Ready,
        overlay: None,
    };
    Api::<Node>::all(cp)
        .create_or_update(&config.credential.name, &spec)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The status to report for a placement after a pass.
fn reported(pass: &Result<k8s_openapi::api::core::v1::Pod, plan::Unrunnable>) -> ReplicaStatus {
    match pass {
        Ok(pod) => plan::status_of(pod),
        Err(why) => ReplicaStatus {
            state: LifecycleState::Failed,
            reason: why.to_string(),
            endpoint: None,
            restarts: 0,
            isolation: None,
            pid: None,
            overlay_address: None,
        },
    }
}

/// Runs the driver until `shutdown` resolves. The pods stay when it
/// stops (as an agent's engines outlive a restart of the agent); they go
/// when their placements do.
pub async fn run(
    config: DriverConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DriverError> {
    if atrium_core::plane::Plane::of_token(&config.credential.token)
        != Some(atrium_core::plane::Plane::Node)
    {
        return Err(DriverError::NotANodeCredential);
    }
    let cluster = Cluster::new(
        client(&config).await?,
        &config.credential.name,
        config.images.clone(),
    );
    let cp = ControlPlane::with_credential(&config.credential, &config.credential_path);
    let mut backoff = Duration::from_millis(200);
    while let Err(e) = register(&cp, &config).await {
        tracing::warn!(error = %e, "kubernetes driver: registration failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    tracing::info!(node = %config.credential.name, "kubernetes driver: node registered");

    let assigned: Arc<Mutex<BTreeMap<String, Assigned>>> = Arc::default();
    let wake = Arc::new(Notify::new());
    let placements = Api::<Placement>::all(&cp);
    let follow = {
        let (assigned, wake, node) = (
            assigned.clone(),
            wake.clone(),
            config.credential.name.clone(),
        );
        placements.follow(move |update| {
            let mine = |o: &Object<Placement>| {
                o.spec.runs_on(&node, o.status.as_ref()).then(|| Assigned {
                    id: o.id.clone(),
                    tenant: o.tenant.clone().unwrap_or_default(),
                    spec: o.spec.clone(),
                })
            };
            let Ok(mut assigned) = assigned.lock() else {
                return;
            };
            match update {
                Update::Snapshot(items) => {
                    *assigned = items
                        .iter()
                        .filter_map(mine)
                        .map(|a| (a.id.clone(), a))
                        .collect();
                }
                Update::Added(o) | Update::Modified(o) => match mine(&o) {
                    Some(a) => {
                        assigned.insert(a.id.clone(), a);
                    }
                    None => {
                        assigned.remove(&o.id);
                    }
                },
                Update::Deleted(o) => {
                    assigned.remove(&o.id);
                }
            }
            wake.notify_one();
        })
    };
    let watch = {
        let (cluster, wake) = (cluster.clone(), wake.clone());
        async move {
            loop {
                // From "0": the pods as they are, then their changes.
                if let Err(e) = cluster.watch("0", |_| wake.notify_one()).await {
                    tracing::debug!(error = %e, "kubernetes driver: pod watch ended");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let passes = async {
        let mut last: BTreeMap<String, ReplicaStatus> = BTreeMap::new();
        loop {
            let _ = tokio::time::timeout(RESYNC, wake.notified()).await;
            let wanted: Vec<Assigned> = match assigned.lock() {
                Ok(a) => a.values().cloned().collect(),
                Err(_) => continue,
            };
            let observed = match cluster.reconcile(&wanted).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "kubernetes driver: pass failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // The pods as they are now (the apply's answer may be older).
            let pods = cluster.pods().await.unwrap_or_default();
            for a in &wanted {
                let id = &a.id;
                let Some(pass) = observed.get(id) else {
                    continue;
                };
                let mut status = match (pass, pods.get(id)) {
                    (Ok(_), Some(pod)) => plan::status_of(pod),
                    _ => reported(pass),
                };
                if let Some(r) = a.spec.retries {
                    status = plan::past_retries(status, r);
                }
                if last.get(id) == Some(&status) {
                    continue;
                }
                match Api::<Placement>::all(&cp).replace_status(id, &status).await {
                    Ok(_) => {
                        last.insert(id.clone(), status);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, placement = %id, "kubernetes driver: cannot report status");
                    }
                }
            }
            last.retain(|id, _| observed.contains_key(id));
        }
    };
    tokio::select! {
        _ = follow => {}
        _ = watch => {}
        _ = passes => {}
        _ = shutdown => {}
    }
    Ok(())
}
