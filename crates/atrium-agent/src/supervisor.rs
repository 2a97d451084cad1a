//! Supervision of replica processes: one task per placement that prepares
//! the model and the sandbox, starts `atrium engine` in it, waits for it to
//! be healthy, reports its endpoint, and restarts it with exponential
//! backoff when it exits. Each engine it starts is written to the agent's
//! state; a restarted agent re-adopts every engine still alive instead of
//! starting another.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_api::Placement;
use atrium_client::{Api, ControlPlane};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::node::Gpu;
use atrium_core::placement::{PlacementSpec, ReplicaStatus};
use tokio::sync::watch;

mod command;
mod container;
mod ports;

use crate::sandbox::{Host, TenantSlot};
use crate::state::{self, Assignment, RunningEngine, StateFile};
use crate::AgentConfig;
use command::engine_args;

/// Longest wait for a new engine to answer /healthz (model loading).
const START_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often an engine's liveness and cgroup events are looked at, and an
/// unsent status report is tried again.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a serving engine told to stop (its replica scaled away,
/// moved or deleted) may finish the requests it has: gateways stop sending
/// it new ones as soon as its placement is gone.
const DRAIN_FOR: Duration = Duration::from_secs(30);

struct Replica {
    assignment: Assignment,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What every replica task shares.
pub struct Shared {
    pub cp: ControlPlane,
    pub config: AgentConfig,
    pub host: Host,
    pub state: StateFile,
    pub gpus: Vec<Gpu>,
    /// The tenants' volumes on this node.
    pub volumes: crate::runtime::VolumeStore,
    /// Set while the agent stops every replica on its way out.
    pub shutting_down: AtomicBool,
    /// The node's overlay index, once registered with one.
    pub overlay_index: std::sync::OnceLock<u32>,
}

pub struct Supervisor {
    shared: Arc<Shared>,
    replicas: Mutex<HashMap<String, Replica>>,
}

impl Supervisor {
    pub fn new(shared: Arc<Shared>) -> Self {
        Supervisor {
            shared,
            replicas: Mutex::default(),
        }
    }

    /// Starts (or re-adopts) replicas newly assigned, stops those no longer
    /// assigned (or whose spec changed, which are then started anew).
    pub fn reconcile(&self, assigned: &HashMap<String, Assignment>) {
        let Ok(mut replicas) = self.replicas.lock() else {
            return;
        };
        replicas.retain(|id, r| {
            let keep = assigned.get(id) == Some(&r.assignment);
            if !keep {
                tracing::info!(placement = %id, "agent: stopping replica");
                let _ = r.stop.send(true);
            }
            keep
        });
        for (id, assignment) in assigned {
            if replicas.contains_key(id) {
                continue;
            }
            tracing::info!(placement = %id, deployment = %assignment.spec.deployment_name, tenant = %assignment.tenant, "agent: starting replica");
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(replica_loop(
                self.shared.clone(),
                id.clone(),
                assignment.clone(),
                stop_rx,
            ));
            replicas.insert(
                id.clone(),
                Replica {
                    assignment: assignment.clone(),
                    stop,
                    task,
                },
            );
        }
    }

    /// Stops every replica and waits for their processes to end.
    pub async fn stop_all(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
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
    /// A job's container exited 0: reported, released, never run again.
    Succeeded,
    /// It failed or exited; `healthy` says whether it had served first.
    Failed { reason: String, healthy: bool },
}

/// An engine process: one this agent spawned, or one a previous run of
/// the agent spawned and this one adopted.
enum Engine {
    Child(tokio::process::Child),
    Adopted,
}

/// Everything one replica task needs.
struct ReplicaCtx {
    shared: Arc<Shared>,
    id: String,
    assignment: Assignment,
    http: reqwest::Client,
    log_path: PathBuf,
    /// The last status, and whether the control plane has it.
    last: Mutex<(Option<ReplicaStatus>, bool)>,
}

impl ReplicaCtx {
    fn spec(&self) -> &PlacementSpec {
        &self.assignment.spec
    }

    /// A job's replica runs to completion, with at most this many retries.
    fn retries(&self) -> Option<u32> {
        self.spec().retries
    }

    /// What the replica runs, as its status names it.
    fn runs(&self) -> &'static str {
        if self.spec().container.is_some() {
            "container"
        } else {
            "engine"
        }
    }

    fn tenant(&self) -> TenantSlot {
        let tenant = self.assignment.tenant.clone();
        let slot = self.shared.state.update(|s| s.tenant_slot(&tenant));
        TenantSlot { tenant, slot }
    }

    async fn report(&self, mut status: ReplicaStatus) {
        if status.endpoint.is_some() && self.spec().overlay_vni.is_some() {
            status.overlay_address = self
                .shared
                .overlay_index
                .get()
                .and_then(|i| atrium_core::overlay::address_of(*i));
        }
        if let Ok(mut last) = self.last.lock() {
            *last = (Some(status), false);
        }
        self.flush().await;
    }

    /// Reports a job's replica's last status. It is forgotten first: a
    /// restarted agent must never run a finished index again.
    async fn finish(&self, status: ReplicaStatus) {
        self.shared.state.update(|s| s.assigned.remove(&self.id));
        self.report(status).await;
    }

    /// Sends the last status unless the control plane has it already. The
    /// control plane may be away; the replica keeps running regardless and
    /// the report is tried again at the next watch tick.
    async fn flush(&self) {
        let pending = match self.last.lock() {
            Ok(last) if !last.1 => last.0.clone(),
            _ => None,
        };
        let Some(status) = pending else {
            return;
        };
        let sent = Api::<Placement>::all(&self.shared.cp)
            .replace_status(&self.id, &status)
            .await;
        match sent {
            Ok(_) => {
                if let Ok(mut last) = self.last.lock() {
                    if last.0.as_ref() == Some(&status) {
                        last.1 = true;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, placement = %self.id, "agent: cannot report replica status");
            }
        }
    }

    fn status(
        state: LifecycleState,
        reason: impl Into<String>,
        restarts: u32,
        running: Option<&RunningEngine>,
    ) -> ReplicaStatus {
        ReplicaStatus {
            state,
            reason: reason.into(),
            endpoint: running.map(|r| r.endpoint.clone()),
            restarts,
            isolation: running.map(|r| r.isolation.clone()),
            pid: running.map(|r| r.pid),
            overlay_address: None,
        }
    }

    /// Waits until the GPUs of this placement that were released by an
    /// earlier holder have been sanitised.
    async fn sanitise_gpus(&self, stop: &mut watch::Receiver<bool>, restarts: u32) -> bool {
        loop {
            let pending: Vec<u32> = self.shared.state.read(|s| {
                self.spec()
                    .gpus
                    .iter()
                    .map(|g| g.gpu)
                    .filter(|g| s.gpus_to_sanitize.contains(g))
                    .collect()
            });
            if pending.is_empty() {
                return true;
            }
            for gpu in pending {
                match sanitise_gpu(&self.shared, gpu) {
                    Ok(()) => self.shared.state.update(|s| {
                        s.gpus_to_sanitize.remove(&gpu);
                    }),
                    Err(why) => {
                        self.report(Self::status(
                            LifecycleState::Provisioning,
                            format!("waiting for GPU {gpu} to be sanitised: {why}"),
                            restarts,
                            None,
                        ))
                        .await;
                    }
                }
            }
            if sleep_or_stop(stop, Duration::from_secs(2)).await {
                return false;
            }
        }
    }

    /// Prepares the model and sandbox and starts the engine, returning it
    /// and what was recorded of it.
    async fn start(&self, restarts: u32) -> Result<(Engine, RunningEngine), String> {
        if let Some(container) = self.spec().container.clone() {
            return self.start_container(&container, restarts).await;
        }
        self.report(Self::status(
            LifecycleState::Provisioning,
            "preparing the model",
            restarts,
            None,
        ))
        .await;
        let shared = self.shared.clone();
        let (id, spec, tenant) = (self.id.clone(), self.spec().clone(), self.tenant());
        let prepared = tokio::task::spawn_blocking(move || {
            let mut args = engine_args(&shared.config, &spec)?;
            let sandbox = shared
                .host
                .enter(&id, &tenant, &spec, &shared.gpus, &mut args)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((args, sandbox))
        })
        .await;
        let (args, sandbox) = match prepared {
            Ok(r) => r?,
            Err(e) => return Err(e.to_string()),
        };
        let mut running = self
            .reserve_port(&sandbox.listen_ip, &sandbox.isolation, restarts)
            .map_err(|e| format!("no free port: {e}"))?;
        let listen = running.endpoint.trim_start_matches("http://").to_string();
        let (out, err) = self.log_stdio();
        let binary = &self.shared.config.engine_binary;
        let mut cmd = tokio::process::Command::new(binary);
        if !sandbox.launcher.is_empty() {
            cmd.args(&sandbox.launcher)
                .arg(&self.shared.host.tenant_binary);
        }
        // The engine sees only its own environment: the agent's may hold
        // credentials for the control plane.
        cmd.args(&args)
            .args(["--listen", &listen])
            .env_clear()
            .envs(sandbox.env.iter().map(|(k, v)| (k, v)))
            .envs(
                ["ATRIUM_LOG", "RUST_LOG", "RUST_BACKTRACE"]
                    .into_iter()
                    .filter_map(|k| Some((k, std::env::var(k).ok()?))),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = self.started(cmd.spawn(), &mut running, "the engine")?;
        let pid = running.pid;
        tracing::info!(placement = %self.id, pid, isolation = %running.isolation, "agent: engine started");
        Ok((Engine::Child(child), running))
    }

    /// The replica's log file as stdout and stderr (appended to).
    fn log_stdio(&self) -> (Stdio, Stdio) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path);
        match log.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        }
    }

    /// Records a spawned process (`what`) in the state, or forgets the
    /// reservation made for it when it could not start.
    fn started(
        &self,
        spawned: std::io::Result<tokio::process::Child>,
        running: &mut RunningEngine,
        what: &str,
    ) -> Result<tokio::process::Child, String> {
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                self.shared.state.update(|s| s.running.remove(&self.id));
                return Err(format!("cannot start {what}: {e}"));
            }
        };
        let pid = child.id().unwrap_or_default();
        running.pid = pid;
        running.start_ticks = state::process_start_ticks(pid).unwrap_or_default();
        self.shared.state.update(|s| {
            s.running.insert(self.id.clone(), running.clone());
        });
        Ok(child)
    }

    async fn healthy(&self, endpoint: &str) -> bool {
        if self.spec().container.is_some() {
            return self.container_healthy(endpoint).await;
        }
        let path = crate::engines::health_path(self.spec().engine);
        let probe = self
            .http
            .get(format!("{endpoint}{path}"))
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        probe.is_ok_and(|r| r.status().is_success())
    }

    /// Whether the engine is still there.
    fn alive(engine: &mut Engine, running: &RunningEngine) -> bool {
        match engine {
            Engine::Child(c) => matches!(c.try_wait(), Ok(None)),
            Engine::Adopted => state::is_alive(running),
        }
    }

    /// Runs the replica's engine once: adopts the one recorded, if alive,
    /// else starts one; waits for health, reports it running, and watches
    /// it until it ends or the replica is told to stop.
    async fn run_once(&self, stop: &mut watch::Receiver<bool>, restarts: u32) -> Ended {
        let failed = |reason: String| Ended::Failed {
            reason,
            healthy: false,
        };
        let recorded = self
            .shared
            .state
            .read(|s| s.running.get(&self.id).cloned())
            .filter(state::is_alive);
        let (mut engine, running) = match recorded {
            Some(r) => {
                tracing::info!(placement = %self.id, pid = r.pid, "agent: re-adopted a running engine");
                (Engine::Adopted, r)
            }
            None => {
                if !self.sanitise_gpus(stop, restarts).await {
                    self.release(None, true);
                    return Ended::Stopped;
                }
                match self.start(restarts).await {
                    Ok(started) => started,
                    Err(why) => return failed(why),
                }
            }
        };
        let restarts = running.restarts;
        if matches!(engine, Engine::Child(_)) {
            self.report(Self::status(
                LifecycleState::Provisioning,
                format!("{} starting", self.runs()),
                restarts,
                Some(&running),
            ))
            .await;
        }
        // Healthy, or exited, or out of time, or told to stop. A job's
        // container runs from the start: it may finish before any port
        // would answer.
        let started = tokio::time::Instant::now();
        let mut healthy = self.retries().is_some();
        while !healthy && started.elapsed() < START_TIMEOUT && Self::alive(&mut engine, &running) {
            if self.healthy(&running.endpoint).await {
                healthy = true;
                break;
            }
            if sleep_or_stop(stop, Duration::from_millis(50)).await {
                end(&mut engine, &running).await;
                self.release(Some(running.pid), true);
                return Ended::Stopped;
            }
        }
        if !healthy {
            end(&mut engine, &running).await;
            self.release(Some(running.pid), false);
            return failed(format!(
                "{} did not become healthy; see {}",
                self.runs(),
                self.log_path.display()
            ));
        }
        let serving = |oom_kills: u64| {
            let reason = if oom_kills == 0 {
                "serving".to_string()
            } else {
                format!("serving; {oom_kills} process(es) of this replica were OOM-killed at its memory limit")
            };
            Self::status(LifecycleState::Running, reason, restarts, Some(&running))
        };
        let mut oom_kills = self.shared.host.stats(&self.id).oom_kills;
        self.report(serving(oom_kills)).await;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        let exit = loop {
            let exited = async {
                match &mut engine {
                    Engine::Child(c) => Some(c.wait().await),
                    Engine::Adopted => std::future::pending().await,
                }
            };
            tokio::select! {
                exit = exited => break exit,
                _ = stop.changed() => {
                    // A container's PID 1 may ignore SIGTERM: only an
                    // engine, which handles it, is drained.
                    if self.spec().container.is_none() {
                        drain(&mut engine, &running).await;
                    }
                    end(&mut engine, &running).await;
                    self.release(Some(running.pid), true);
                    return Ended::Stopped;
                }
                _ = tick.tick() => {
                    if !Self::alive(&mut engine, &running) {
                        // A child reaped by the liveness check keeps its
                        // exit status: a job's success must not be lost.
                        break match &mut engine {
                            Engine::Child(c) => Some(c.wait().await),
                            Engine::Adopted => None,
                        };
                    }
                    let now = self.shared.host.stats(&self.id).oom_kills;
                    if now != oom_kills {
                        oom_kills = now;
                        tracing::warn!(placement = %self.id, oom_kills, "agent: OOM kill in a replica's cgroup");
                        self.report(serving(oom_kills)).await;
                    } else {
                        self.flush().await;
                    }
                }
            }
        };
        end(&mut engine, &running).await;
        let succeeded =
            self.retries().is_some() && matches!(&exit, Some(Ok(status)) if status.success());
        self.release(Some(running.pid), succeeded);
        if succeeded {
            self.finish(Self::status(
                LifecycleState::Succeeded,
                "completed: the container exited 0",
                restarts,
                None,
            ))
            .await;
            return Ended::Succeeded;
        }
        let reason = match exit {
            Some(Ok(s)) => format!(
                "{} exited ({s}); see {}",
                self.runs(),
                self.log_path.display()
            ),
            Some(Err(e)) => format!("{} lost ({e})", self.runs()),
            None => format!("{} (pid {}) is gone", self.runs(), running.pid),
        };
        Ended::Failed {
            reason,
            healthy: true,
        }
    }

    /// Kills what is left of the engine and frees its sandbox. When the
    /// replica is stopping for good (`last`), the GPUs it held wait for
    /// sanitisation before anyone gets them, and the tenant's namespace and
    /// directory go with its last workload on this node.
    fn release(&self, pid: Option<u32>, last: bool) {
        let tenant = self.tenant();
        let shutting_down = self.shared.shutting_down.load(Ordering::SeqCst);
        let tenant_done = self.shared.state.update(|s| {
            s.running.remove(&self.id);
            if !last {
                return false;
            }
            s.gpus_to_sanitize
                .extend(self.spec().gpus.iter().map(|g| g.gpu));
            let tenant_of = |id: &String| s.assigned.get(id).map(|a| a.tenant.as_str());
            let runs_more = s
                .running
                .keys()
                .any(|id| tenant_of(id) == Some(tenant.tenant.as_str()));
            let has_more = s
                .assigned
                .iter()
                .any(|(id, a)| *id != self.id && a.tenant == tenant.tenant);
            !runs_more && (shutting_down || !has_more)
        });
        if self.spec().container.is_some() {
            // runc's own state, and the cgroups it made beside the agent's.
            self.runc().delete(&self.id);
            let bundle = self.shared.config.data_dir.join("bundles").join(&self.id);
            let _ = std::fs::remove_dir_all(bundle);
        }
        self.shared
            .host
            .release(&self.id, &tenant, pid, tenant_done);
        if tenant_done {
            self.shared.state.update(|s| {
                s.tenant_slots.remove(&tenant.tenant);
            });
        }
    }
}

/// Kills the engine and waits until it is gone: sockets closed, memory
/// freed. Its own child is reaped; an adopted one (another parent's) is
/// watched until the kernel no longer lists it as running.
async fn end(engine: &mut Engine, running: &RunningEngine) {
    match engine {
        Engine::Child(c) => {
            let _ = c.kill().await;
        }
        Engine::Adopted => {
            crate::sandbox::kill(running.pid);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while state::is_alive(running) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Asks a serving engine to end and waits, up to `DRAIN_FOR`, while it
/// finishes the requests in flight (its server shuts down gracefully on
/// SIGTERM); `end` then makes sure it is gone.
async fn drain(engine: &mut Engine, running: &RunningEngine) {
    match engine {
        Engine::Child(c) => {
            if let Some(pid) = c.id() {
                crate::sandbox::terminate(pid);
                let _ = tokio::time::timeout(DRAIN_FOR, c.wait()).await;
            }
        }
        Engine::Adopted => {
            // The recorded process, not another that took its pid.
            if state::is_alive(running) {
                crate::sandbox::terminate(running.pid);
            }
            let deadline = tokio::time::Instant::now() + DRAIN_FOR;
            while state::is_alive(running) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Clears a GPU for its next holder. Simulated GPUs hold nothing; a real
/// one is reset with the driver's tool once no workload on this node uses
/// it (a reset clears its memory).
fn sanitise_gpu(shared: &Shared, gpu: u32) -> Result<(), String> {
    let Some(device) = shared.gpus.iter().find(|g| g.index == gpu) else {
        return Ok(());
    };
    let uuid = device.uuid.clone().unwrap_or_default();
    if uuid.starts_with("GPU-simulated") {
        tracing::info!(gpu, "agent: simulated GPU sanitised (nothing to clear)");
        return Ok(());
    }
    let busy = shared.state.read(|s| {
        s.running
            .keys()
            .filter_map(|id| s.assigned.get(id))
            .any(|a| a.spec.gpus.iter().any(|g| g.gpu == gpu))
    });
    if busy {
        return Err("another workload still uses it".into());
    }
    let out = std::process::Command::new("nvidia-smi")
        .args(["--gpu-reset", "-i", &uuid])
        .output()
        .map_err(|e| format!("nvidia-smi: {e}"))?;
    if out.status.success() {
        tracing::info!(gpu, %uuid, "agent: GPU reset before reuse");
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Runs one replica until told to stop, restarting it with exponential
/// backoff (reset once it has been healthy) whenever it fails.
async fn replica_loop(
    shared: Arc<Shared>,
    id: String,
    assignment: Assignment,
    mut stop: watch::Receiver<bool>,
) {
    let log_dir = shared.config.data_dir.join("logs");
    let _ = std::fs::create_dir_all(&log_dir);
    // Named by placement id: deployment names repeat across tenants.
    let log_path = log_dir.join(format!("{id}.log"));
    let ctx = ReplicaCtx {
        shared,
        id,
        assignment,
        http: reqwest::Client::new(),
        log_path,
        last: Mutex::new((None, true)),
    };
    let mut restarts = ctx
        .shared
        .state
        .read(|s| s.running.get(&ctx.id).map(|r| r.restarts))
        .unwrap_or_default();
    let mut backoff = Duration::from_secs(1);
    loop {
        match ctx.run_once(&mut stop, restarts).await {
            Ended::Stopped | Ended::Succeeded => return,
            Ended::Failed { reason, healthy } => {
                if healthy && ctx.retries().is_none() {
                    backoff = Duration::from_secs(1);
                }
                restarts += 1;
                // A job's index with no retry left is done for good.
                let out_of_retries = ctx.retries().filter(|l| restarts > *l);
                let reason = match out_of_retries {
                    Some(limit) => format!(
                        "{reason}; failed {restarts} time(s), no retry left (backoff limit {limit})"
                    ),
                    None => format!("{reason}; retrying in {}s", backoff.as_secs()),
                };
                tracing::warn!(placement = %ctx.id, %reason, "agent: replica down");
                let status = ReplicaCtx::status(LifecycleState::Failed, reason, restarts, None);
                if out_of_retries.is_some() {
                    ctx.release(None, true);
                    ctx.finish(status).await;
                    return;
                }
                ctx.report(status).await;
                if sleep_or_stop(&mut stop, backoff).await {
                    ctx.release(None, true);
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
