//! Atrium's runtime plane: one agent per node. It registers the node's
//! inventory (CPU, memory, disk, GPUs from `nvidia-smi` when present, or
//! simulated ones for development), follows the placements the control
//! plane assigns to this node, and runs each replica as a supervised child
//! process (`atrium engine ...`): health-checked, restarted with backoff,
//! its state and endpoint reported back. It never decides placement.
//!
//! Each engine runs in a sandbox (`sandbox`): cgroup limits, its tenant's
//! network namespace behind a firewall, its tenant's uid. The agent keeps
//! its assignments and the engines it runs on disk (`state`), so it serves
//! on while the control plane is away and re-adopts its engines when it
//! restarts itself.

pub mod engines;
mod execs;
mod inventory;
mod janitor;
pub mod overlay;
mod relay;
mod routes;
pub mod runtime;
pub mod sandbox;
pub mod state;
mod supervisor;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use atrium_api::{Node, Object, Placement};
use atrium_client::{Api, ControlPlane, CredentialFile, Update};
use atrium_core::node::{NodeCapacity, NodeSpec, NodeState};

pub use inventory::{discover, parse_simulated_gpus, Inventory};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's credential (control plane, node name, site), and the
    /// file it is kept in: it reaches this node's work only.
    pub credential: CredentialFile,
    pub credential_path: PathBuf,
    /// Replica logs and scratch data live here.
    pub data_dir: PathBuf,
    pub model_cache: PathBuf,
    /// Third-party engines' installs (llama-cpp-python's venv, made on
    /// first use): root-owned and readable by tenants' uids.
    pub engine_cache: PathBuf,
    /// Directories `path:` model sources may resolve into, beside the
    /// model cache.
    pub model_roots: Vec<PathBuf>,
    /// The `atrium` binary to run engines with.
    pub engine_binary: PathBuf,
    /// e.g. `8xH100-80GB`: GPUs to report instead of discovering them.
    pub simulate_gpus: Option<String>,
    /// Milliseconds between the tokens of this node's simulated engines
    /// (load tests that need requests to last); 0 answers at once.
    pub simulated_itl_ms: u64,
    /// Second octet of the `10.X.0.0/16` block tenant networks come from;
    /// it also names this agent's namespaces, cgroups and firewall table.
    pub network_octet: u8,
    /// The provider's PostgreSQL (tenants' databases), relayed to tenants'
    /// workloads at the well-known database address; none: not reachable.
    pub databases_at: Option<std::net::SocketAddr>,
    /// Where this node joins its tenants' overlays to other nodes';
    /// none: its tenants' namespaces reach no other node.
    pub overlay: Option<overlay::OverlayConfig>,
}

impl AgentConfig {
    pub fn node_name(&self) -> &str {
        &self.credential.name
    }

    /// Where `path:` sources may resolve: the model roots and the cache.
    pub fn all_model_roots(&self) -> Vec<PathBuf> {
        let mut roots = self.model_roots.clone();
        roots.push(self.model_cache.clone());
        roots
    }

    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join("agent")
    }

    pub fn sandbox_config(&self) -> sandbox::SandboxConfig {
        sandbox::SandboxConfig::for_data_dir(&self.data_dir, self.network_octet)
    }
}

/// Parses `--tenant-network`: a `10.X.0.0/16` block, returning X.
pub fn parse_tenant_network(cidr: &str) -> Result<u8, String> {
    let octet = cidr
        .strip_prefix("10.")
        .and_then(|rest| rest.strip_suffix(".0.0/16"))
        .and_then(|x| x.parse::<u8>().ok());
    let octet =
        octet.ok_or_else(|| format!("--tenant-network {cidr:?} must be a 10.X.0.0/16 block"))?;
    // Tenant clusters' services have 10.96.0.0/16 in every tenant network.
    if octet == atrium_core::service_route::SERVICE_NETWORK.0.octets()[1] {
        return Err(format!(
            "--tenant-network {cidr:?} is the service network (10.96.0.0/16): choose another block"
        ));
    }
    Ok(octet)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the agent runs with its node's credential only (atrn_…), never the provider's admin \
         token or a tenant key: join with `atrium node join --join-token <token>`"
    )]
    NotANodeCredential,
    #[error("invalid --simulate-gpus: {0}")]
    SimulatedGpus(String),
    #[error("cannot register node: {0}")]
    Register(String),
    #[error("cannot open the agent's state in {0}: {1}")]
    State(PathBuf, std::io::Error),
    #[error("cannot listen for the database relay: {0}")]
    Relay(std::io::Error),
    #[error("tenant overlays: {0}")]
    Overlay(String),
    #[error(
        "another agent on this host uses tenant network 10.{0}.0.0/16 (its namespaces, cgroups \
         and firewall table would be torn down by each other's): give this one another \
         --tenant-network, or stop the other"
    )]
    NetworkInUse(u8),
}

/// Where root agents claim their tenant network block.
const CLAIMS_DIR: &str = "/run/atrium";

/// Claims tenant network `10.<octet>.0.0/16` on this host for as long as
/// the returned file stays open (an exclusive `flock`, released when the
/// process ends however it ends). Two agents — or two `atrium up` — on one
/// block would each replace the other's firewall table and remove its
/// namespaces; the second is refused instead. Only root makes those, so
/// only root claims; elsewhere there is nothing to collide on.
fn claim_tenant_network(octet: u8) -> Result<Option<std::fs::File>, AgentError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let path = Path::new(CLAIMS_DIR).join(format!("tenant-network-{octet}.lock"));
    let opened = std::fs::create_dir_all(CLAIMS_DIR).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    });
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "agent: cannot claim its tenant network");
            return Ok(None);
        }
    };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(AgentError::NetworkInUse(octet)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "agent: cannot claim its tenant network");
            Ok(None)
        }
    }
}

/// Registers this node, creating it or refreshing its inventory, with its
/// overlay endpoint when it has one; returns its overlay index.
pub async fn register(
    cp: &ControlPlane,
    config: &AgentConfig,
    inventory: &Inventory,
    identity: Option<&overlay::Identity>,
) -> Result<Option<u32>, AgentError> {
    let nodes = Api::<Node>::all(cp);
    let overlay = match (&config.overlay, identity) {
        (Some(at), Some(identity)) => {
            let listed = nodes
                .list()
                .await
                .map_err(|e| AgentError::Register(e.to_string()))?;
            let index = overlay::choose_index(
                listed
                    .0
                    .iter()
                    .map(|n| (n.name.as_str(), n.spec.overlay.as_ref().map(|o| o.index))),
                config.node_name(),
            );
            Some(overlay::endpoint(at, identity, index))
        }
        _ => None,
    };
    let index = overlay.as_ref().map(|o| o.index);
    let spec = NodeSpec {
        site: config.credential.site.clone(),
        capacity: NodeCapacity {
            cpu: inventory.cpu,
            memory: inventory.memory,
            disk: inventory.disk,
        },
        gpus: inventory.gpus.clone(),
        labels: [("atrium.dev/agent".to_string(), "process".to_string())].into(),
        state: NodeState::Ready,
        overlay,
    };
    nodes
        .create_or_update(config.node_name(), &spec)
        .await
        .map(|_| index)
        .map_err(|e| AgentError::Register(e.to_string()))
}

/// Runs the agent until `shutdown` resolves: resumes the workloads it ran
/// before (from its state, whether or not the control plane answers),
/// registers the node (retrying until the control plane answers), then
/// keeps the node's replicas as placed. On `shutdown` it stops them all.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    if atrium_core::plane::Plane::of_token(&config.credential.token)
        != Some(atrium_core::plane::Plane::Node)
    {
        return Err(AgentError::NotANodeCredential);
    }
    let _network = claim_tenant_network(config.network_octet)?;
    let inventory = discover(&config.data_dir, config.simulate_gpus.as_deref())?;
    let cp = ControlPlane::with_credential(&config.credential, &config.credential_path);
    let state = state::StateFile::open(&config.state_dir())
        .map_err(|e| AgentError::State(config.state_dir(), e))?;
    let mut sandbox = config.sandbox_config();
    let relay = match config.databases_at {
        Some(at) => Some(relay::start(at).await.map_err(AgentError::Relay)?),
        None => None,
    };
    sandbox.database_relay = relay.as_ref().map(|r| r.port);
    let mut host = sandbox::Host::detect(sandbox, &config.engine_binary);
    if let Err(why) = host.prepare() {
        tracing::error!(%why, "agent: cannot install the tenant firewall or cgroups");
        host.firewall = Err(why);
    }
    if let (Some(relay), Some(at)) = (relay, config.databases_at) {
        // Without the firewall the relay's port would be open to anyone
        // who can reach this host: it closes instead.
        if host.firewall.is_ok() {
            tracing::info!(%at, port = relay.port, "agent: tenants' workloads reach the provider's PostgreSQL");
        } else {
            relay.task.abort();
            host.config.database_relay = None;
            tracing::error!(
                "agent: no firewall, so no database relay: workloads reach no database"
            );
        }
    }
    let overlay_prepared = match &config.overlay {
        Some(at) => Some(overlay::prepare(&config, &host, at)?),
        None => None,
    };
    tracing::info!(isolation = %host.summary(), "agent: sandboxes");
    let containers = runtime::Runc::for_data_dir(&config.data_dir).summary();
    tracing::info!(%containers, "agent: workloads' containers");
    let shared = Arc::new(supervisor::Shared {
        cp: cp.clone(),
        config: config.clone(),
        host,
        state,
        gpus: inventory.gpus.clone(),
        volumes: runtime::VolumeStore::for_data_dir(&config.data_dir),
        shutting_down: Default::default(),
        overlay_index: Default::default(),
    });
    tracing::info!(volumes = %runtime::volume::summary(), "agent: tenants' volumes");
    let supervisor = Arc::new(supervisor::Supervisor::new(shared.clone()));
    let remembered: HashMap<String, state::Assignment> = shared
        .state
        .read(|s| s.assigned.clone().into_iter().collect());
    if !remembered.is_empty() {
        tracing::info!(
            replicas = remembered.len(),
            "agent: resuming the replicas it ran"
        );
        supervisor.reconcile(&remembered);
    }

    let overlay_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let work = {
        let overlay_task = overlay_task.clone();
        let (cp, config, supervisor, shared) = (
            cp.clone(),
            config.clone(),
            supervisor.clone(),
            shared.clone(),
        );
        async move {
            let mut backoff = std::time::Duration::from_millis(200);
            let index = loop {
                match register(
                    &cp,
                    &config,
                    &inventory,
                    overlay_prepared.as_ref().map(|p| &p.identity),
                )
                .await
                {
                    Ok(index) => break index,
                    Err(e) => {
                        tracing::warn!(error = %e, "agent: registration failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            };
            if let (Some(index), Some(at), Some(prepared)) =
                (index, config.overlay, overlay_prepared)
            {
                let _ = shared.overlay_index.set(index);
                let overlays = overlay::run(shared.clone(), at, prepared, index);
                // Runs beside the placements for as long as the agent does.
                overlay_task
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(tokio::spawn(overlays));
            }
            tracing::info!(node = %config.node_name(), cpu = %inventory.cpu, memory = %inventory.memory, gpus = inventory.gpus.len(), "agent: node registered");
            let node = config.node_name().to_string();
            let mut assigned = remembered;
            Api::<Placement>::all(&cp)
                .follow(move |update| {
                    // A finished job's replica stays placed (its record and
                    // log) but runs nothing.
                    let mine = |o: &Object<Placement>| -> Option<(String, state::Assignment)> {
                        o.spec.runs_on(&node, o.status.as_ref()).then(|| {
                            let tenant = o.tenant.clone().unwrap_or_default();
                            let spec = o.spec.clone();
                            (o.id.clone(), state::Assignment { tenant, spec })
                        })
                    };
                    match update {
                        Update::Snapshot(items) => {
                            assigned = items.iter().filter_map(mine).collect();
                        }
                        Update::Added(o) | Update::Modified(o) => match mine(&o) {
                            Some((id, a)) => {
                                assigned.insert(id, a);
                            }
                            None => {
                                assigned.remove(&o.id);
                            }
                        },
                        Update::Deleted(o) => {
                            assigned.remove(&o.id);
                        }
                    }
                    // Saved before acting on it: a restarted agent resumes
                    // exactly what it was last told to run. (Most events are
                    // status reports, which change no assignment: no write.)
                    let now: std::collections::BTreeMap<_, _> =
                        assigned.clone().into_iter().collect();
                    if shared.state.read(|s| s.assigned != now) {
                        shared.state.update(|s| s.assigned = now);
                    }
                    supervisor.reconcile(&assigned);
                })
                .await
        }
    };
    tokio::select! {
        _ = work => {}
        _ = janitor::run(shared.clone()) => {}
        _ = execs::run(shared.clone()) => {}
        _ = routes::run(shared.clone()) => {}
        _ = shutdown => {}
    }
    if let Some(task) = overlay_task
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        task.abort();
    }
    supervisor.stop_all().await;
    let volumes = shared.clone();
    let _ = tokio::task::spawn_blocking(move || volumes.volumes.unmount_all()).await;
    let still_running: Vec<String> = shared.state.read(|s| s.running.keys().cloned().collect());
    if still_running.is_empty() {
        shared.host.teardown();
    } else {
        tracing::warn!(workloads = ?still_running,
            "agent: stopped with workloads still recorded as running; their sandboxes stay for the next start to adopt");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second agent on the same block is refused while the first lives,
    /// and admitted once it is gone (as root, where agents make networks).
    #[test]
    fn one_agent_per_tenant_network_on_a_host() {
        assert!(
            rustix::process::geteuid().is_root(),
            "agents claim networks as root: run the tests as root, as CI does"
        );
        let first = claim_tenant_network(199).unwrap();
        assert!(first.is_some());
        let second = claim_tenant_network(199).unwrap_err().to_string();
        assert!(
            second.contains("10.199.0.0/16") && second.contains("--tenant-network"),
            "{second}"
        );
        assert!(
            claim_tenant_network(198).unwrap().is_some(),
            "another block is free"
        );
        drop(first);
        assert!(claim_tenant_network(199).unwrap().is_some());
    }

    #[test]
    fn a_tenant_network_is_a_10_x_block_other_than_the_service_network() {
        assert_eq!(parse_tenant_network("10.241.0.0/16"), Ok(241));
        for bad in [
            "10.96.0.0/16",
            "10.241.0.0/24",
            "192.168.0.0/16",
            "10.300.0.0/16",
        ] {
            assert!(parse_tenant_network(bad).is_err(), "{bad}");
        }
    }
}
