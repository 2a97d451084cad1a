//! `atrium agent` and `atrium gateway`: their flags, joining with their
//! credential, and running the plane until a shutdown signal.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use atrium_core::plane::Plane;
use clap::{Args, Subcommand};

use crate::planes::{self, PlaneCmd};

#[derive(Args)]
pub struct AgentArgs {
    /// Join with this one-time token when the data directory holds no
    /// node credential yet (see `atrium node join`)
    #[arg(long, env = "ATRIUM_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// This node's name, for a join token that names none (in Kubernetes,
    /// the node's: `spec.nodeName`)
    #[arg(long, env = "ATRIUM_NODE_NAME")]
    name: Option<String>,
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// Milliseconds between the tokens of simulated engines (load tests)
    #[arg(long, default_value_t = 0)]
    simulated_itl_ms: u64,
    #[arg(long, env = "ATRIUM_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Where third-party engines are installed (llama-cpp-python on first
    /// use; vLLM and SGLang by the operator, in venvs `vllm`, `sglang`)
    /// [default: /var/cache/atrium/engines as root]
    #[arg(long, env = "ATRIUM_ENGINE_CACHE")]
    engine_cache: Option<PathBuf>,
    /// Directories `path:` model sources may resolve into (the model cache
    /// always may); anything else is refused
    #[arg(long = "model-root", env = "ATRIUM_MODEL_ROOTS", value_delimiter = ',')]
    model_roots: Vec<PathBuf>,
    /// Address block of tenant networks on this node (10.X.0.0/16; one /30
    /// per tenant); two agents on one host need different blocks (the
    /// second on a block in use is refused)
    #[arg(long, default_value = DEFAULT_TENANT_NETWORK)]
    tenant_network: String,
    /// The provider's PostgreSQL (HOST:PORT, as this node reaches it),
    /// relayed to tenants' workloads at 169.254.100.5:5432 for their
    /// databases; unset: workloads reach no database
    #[arg(long, env = "ATRIUM_DATABASES_AT")]
    databases_at: Option<std::net::SocketAddr>,
    /// This node's address on the network between nodes: its tenants'
    /// namespaces join their tenant's overlay (VXLAN, one VNI per tenant;
    /// sealed between sites) through it. Unset: they reach no other node
    #[arg(long, env = "ATRIUM_OVERLAY_ADDRESS")]
    overlay_address: Option<std::net::Ipv4Addr>,
    /// UDP port of the node's VXLAN endpoint (its site's peers send to it)
    #[arg(long, default_value_t = 4789)]
    overlay_port: u16,
    /// UDP port of the node's sealed endpoint (other sites' peers send to it)
    #[arg(long, default_value_t = 4790)]
    overlay_sealed_port: u16,
    /// process: replicas run here as sandboxed processes; kubernetes: the
    /// node is an existing cluster and its replicas run there as Pods
    #[arg(long, value_enum, default_value = "process")]
    driver: Driver,
    #[command(flatten)]
    kubernetes: KubernetesFlags,
    #[arg(long, env = "ATRIUM_LOG", default_value = "info")]
    log: tracing::Level,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Driver {
    Process,
    Kubernetes,
}

/// `--driver kubernetes`: the cluster, and what of it Atrium may use.
#[derive(Args)]
struct KubernetesFlags {
    /// The cluster's kubeconfig [default: the pod's service account]
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// An image with the `atrium` binary (runs simulated replicas)
    #[arg(long, default_value = "atrium:latest")]
    atrium_image: String,
    /// Atrium's registry as the cluster's nodes pull from it
    #[arg(long, default_value = "atrium-registry:5000")]
    registry_host: String,
    /// CPU the cluster offers Atrium's scheduler
    #[arg(long, default_value = "16")]
    cluster_cpu: String,
    /// Memory the cluster offers Atrium's scheduler
    #[arg(long, default_value = "64Gi")]
    cluster_memory: String,
}

pub(crate) const DEFAULT_TENANT_NETWORK: &str = "10.201.0.0/16";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GatewayArgs {
    #[command(subcommand)]
    pub command: Option<GatewayCmd>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Join with this one-time token when the data directory holds no
    /// gateway credential yet (see `atrium gateway join`); the credential
    /// names the site the gateway serves
    #[arg(long, env = "ATRIUM_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// This gateway's name, for a join token that names none (in
    /// Kubernetes, the pod's: `metadata.name`)
    #[arg(long, env = "ATRIUM_GATEWAY_NAME")]
    name: Option<String>,
    /// Secret the per-tenant affinity and cache salts derive from; give the
    /// gateways of one site the same [default: <data-dir>/gateway/gateway.secret]
    #[arg(long, env = "ATRIUM_GATEWAY_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[command(flatten)]
    flags: planes::GatewayFlags,
    #[arg(long, env = "ATRIUM_LOG", default_value = "info")]
    log: tracing::Level,
}

#[derive(Subcommand)]
pub enum GatewayCmd {
    #[command(flatten)]
    Plane(PlaneCmd),
}

pub async fn run_agent(
    args: AgentArgs,
    server: &str,
    token: Option<String>,
    data_dir: PathBuf,
) -> Result<()> {
    crate::init_logging(args.log);
    let (credential, credential_path) = planes::credential(
        Plane::Node,
        &data_dir,
        server,
        token,
        args.join_token.as_deref(),
        args.name.as_deref(),
    )
    .await?;
    if args.driver == Driver::Kubernetes {
        let k = args.kubernetes;
        let config = atrium_kube_driver::DriverConfig {
            credential,
            credential_path,
            kubeconfig: k.kubeconfig,
            images: atrium_kube_driver::Images {
                atrium: k.atrium_image,
                registry: k.registry_host,
            },
            capacity: atrium_core::node::NodeCapacity {
                cpu: k
                    .cluster_cpu
                    .parse()
                    .map_err(|e| anyhow!("--cluster-cpu: {e}"))?,
                memory: k
                    .cluster_memory
                    .parse()
                    .map_err(|e| anyhow!("--cluster-memory: {e}"))?,
                disk: atrium_core::quantity::ByteSize(0),
            },
        };
        atrium_kube_driver::run(config, crate::shutdown_signal()).await?;
        return Ok(());
    }
    let config = atrium_agent::AgentConfig {
        credential,
        credential_path,
        data_dir,
        model_cache: args
            .model_cache
            .unwrap_or_else(atrium_pull::default_cache_dir),
        engine_cache: args
            .engine_cache
            .unwrap_or_else(atrium_agent::engines::default_cache_dir),
        model_roots: args.model_roots,
        engine_binary: std::env::current_exe().context("cannot find the atrium binary")?,
        simulate_gpus: args.simulate_gpus,
        simulated_itl_ms: args.simulated_itl_ms,
        network_octet: atrium_agent::parse_tenant_network(&args.tenant_network)
            .map_err(|e| anyhow!(e))?,
        databases_at: args.databases_at,
        overlay: args
            .overlay_address
            .map(|address| atrium_agent::overlay::OverlayConfig {
                address,
                vxlan_port: args.overlay_port,
                sealed_port: args.overlay_sealed_port,
            }),
    };
    atrium_agent::run(config, crate::shutdown_signal()).await?;
    Ok(())
}

pub async fn run_gateway(
    args: GatewayArgs,
    server: &str,
    token: Option<String>,
    data_dir: PathBuf,
) -> Result<()> {
    crate::init_logging(args.log);
    let listen = args
        .listen
        .parse()
        .map_err(|_| anyhow!("--listen: {:?} is not an address", args.listen))?;
    let (credential, credential_path) = planes::credential(
        Plane::Gateway,
        &data_dir,
        server,
        token,
        args.join_token.as_deref(),
        args.name.as_deref(),
    )
    .await?;
    let gateway = atrium_gateway::start(args.flags.config(
        credential,
        credential_path,
        listen,
        data_dir.join("gateway"),
        args.secret,
    ))
    .await?;
    println!("Atrium gateway: http://{}", gateway.addr);
    crate::shutdown_signal().await;
    gateway.abort();
    Ok(())
}
