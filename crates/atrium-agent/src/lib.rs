//! Atrium's runtime plane: one agent per node. It registers the node's
//! inventory (CPU, memory, disk, GPUs from `nvidia-smi` when present, or
//! simulated ones for development), follows the placements the control
//! plane assigns to this node, and runs each replica as a supervised child
//! process (`atrium engine ...`): health-checked, restarted with backoff,
//! its state and endpoint reported back. It never decides placement.

mod inventory;
mod supervisor;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use atrium_client::{ControlPlane, Update};
use atrium_core::placement::PlacementSpec;
use reqwest::Method;
use serde_json::{json, Value};

pub use inventory::{discover, parse_simulated_gpus, Inventory};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Control plane base URL and the credential to use there.
    pub server: String,
    pub token: String,
    pub node_name: String,
    pub site: String,
    /// Replica logs and scratch data live here.
    pub data_dir: PathBuf,
    pub model_cache: PathBuf,
    /// The `atrium` binary to run engines with.
    pub engine_binary: PathBuf,
    /// e.g. `8xH100-80GB`: GPUs to report instead of discovering them.
    pub simulate_gpus: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid --simulate-gpus: {0}")]
    SimulatedGpus(String),
    #[error("cannot register node: {0}")]
    Register(String),
}

/// Registers this node, creating it or refreshing its inventory.
pub async fn register(
    cp: &ControlPlane,
    config: &AgentConfig,
    inventory: &Inventory,
) -> Result<(), AgentError> {
    let spec = json!({
        "site": config.site,
        "capacity": {"cpu": inventory.cpu.to_string(), "memory": inventory.memory.to_string(), "disk": inventory.disk.to_string()},
        "gpus": inventory.gpus,
        "labels": {"atrium.dev/agent": "process"},
    });
    let path = format!("/v1/nodes/{}", config.node_name);
    match cp.call(Method::GET, &path, None).await {
        Ok(_) => cp
            .call(Method::PUT, &path, Some(&json!({"spec": spec})))
            .await
            .map(|_| ()),
        Err(e) if e.status() == Some(404) => cp
            .call(
                Method::POST,
                "/v1/nodes",
                Some(&json!({"name": config.node_name, "spec": spec})),
            )
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    }
    .map_err(|e| AgentError::Register(e.to_string()))
}

/// Runs the agent until `shutdown` resolves: registers (retrying until the
/// control plane answers), then keeps the node's replicas as placed.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let inventory = discover(&config.data_dir, config.simulate_gpus.as_deref())?;
    let cp = ControlPlane::new(&config.server, &config.token);
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match register(&cp, &config, &inventory).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "agent: registration failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
    tracing::info!(node = %config.node_name, cpu = %inventory.cpu, memory = %inventory.memory, gpus = inventory.gpus.len(), "agent: node registered");

    let supervisor = Arc::new(supervisor::Supervisor::new(cp.clone(), config.clone()));
    let assigned: Arc<Mutex<HashMap<String, PlacementSpec>>> = Arc::default();
    let node = config.node_name.clone();
    let follow = {
        let supervisor = supervisor.clone();
        cp.follow("placements", move |update| {
            let mine = |o: &Value| -> Option<(String, PlacementSpec)> {
                let spec: PlacementSpec = serde_json::from_value(o["spec"].clone()).ok()?;
                (spec.node == node)
                    .then(|| (o["id"].as_str().unwrap_or_default().to_string(), spec))
            };
            let Ok(mut assigned) = assigned.lock() else {
                return;
            };
            match update {
                Update::Snapshot(items) => {
                    *assigned = items.iter().filter_map(mine).collect();
                }
                Update::Added(o) | Update::Modified(o) => {
                    if let Some((id, spec)) = mine(&o) {
                        assigned.insert(id, spec);
                    }
                }
                Update::Deleted(o) => {
                    if let Some(id) = o["id"].as_str() {
                        assigned.remove(id);
                    }
                }
            }
            supervisor.reconcile(&assigned);
        })
    };
    tokio::select! {
        _ = follow => {}
        _ = shutdown => {}
    }
    supervisor.stop_all().await;
    Ok(())
}
