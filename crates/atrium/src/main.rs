//! `atrium`: the one binary. `atrium server` (and `atrium up`) run the
//! control plane; the other subcommands are its client.

// The CLI is where printing belongs (workspace lints forbid it elsewhere).
#![allow(clippy::print_stdout, clippy::print_stderr)]
// Parsed once per process: the size of a command enum does not matter.
#![allow(clippy::large_enum_variant)]

mod backup;
mod bench;
mod bench_chat;
mod bench_gateway;
mod bench_greedy;
mod bench_kube;
mod bench_registry;
mod bench_sched;
mod bench_sites;
mod bench_vector;
mod bench_workloads;
mod client;
mod commands;
mod config;
mod isolation;
mod local;
mod planes;
mod planes_run;
mod up;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use atrium_client::ControlPlane;
use clap::{Args, Parser, Subcommand};

use atrium_core::plane::Plane;
use client::Output;
use commands::credential::CredentialCmd;
use commands::deploy::DeployCmd;
use commands::key::KeyCmd;
use commands::model::ModelCmd;
use commands::node::NodeCmd;
use commands::quota::QuotaCmd;
use commands::site::SiteCmd;
use commands::tenant::TenantCmd;
use commands::Ctx;
use local::{EngineArgs, SampleTraceArgs, SimArgs};
use planes::PlaneCmd;

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
    Agent(planes_run::AgentArgs),
    /// Run an OpenAI-compatible gateway.
    Gateway(planes_run::GatewayArgs),
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
    /// A tenant's own images run as containers.
    #[command(subcommand)]
    Workload(commands::workload::WorkloadCmd),
    /// A tenant's own Kubernetes API (served by the control plane)
    #[command(subcommand)]
    Cluster(commands::cluster::ClusterCmd),
    /// A tenant's volumes: persistent disks of a hard size
    #[command(subcommand)]
    Volume(commands::volume::VolumeCmd),
    /// A tenant's vector collections: upsert points, search them
    #[command(subcommand)]
    Collection(commands::collection::CollectionCmd),
    /// A tenant's PostgreSQL databases on the provider's PostgreSQL
    #[command(subcommand)]
    Database(commands::database::DatabaseCmd),
    /// The images in the control plane's registry (push with any OCI
    /// client, a tenant key as the password).
    #[command(subcommand)]
    Image(commands::image::ImageCmd),
    /// Read and set quotas.
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// The nodes' and gateways' credentials (provider).
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Print the logs of a deployment's or workload's replicas that run on
    /// this machine.
    Logs {
        /// Deployment or workload, by id or name
        deployment: String,
        /// Tenant the name belongs to (provider admin)
        #[arg(long)]
        tenant: Option<String>,
        /// Keep printing new lines
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Run a command in a running container of a workload (through its
    /// node's agent) and print its output: `atrium exec web -- ls /scratch`.
    Exec {
        /// Workload, by id or name
        workload: String,
        /// The replica (job index) to run in; the first running one if absent
        #[arg(long)]
        replica: Option<u32>,
        /// Seconds before the command is stopped (at most 600)
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        /// Tenant the name belongs to (provider admin)
        #[arg(long)]
        tenant: Option<String>,
        /// The program and its arguments (no shell)
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Replay a GPU cluster trace under a placement policy (FGD's method).
    Sim(SimArgs),
    /// Make a trace variant: the CPU-only tasks redrawn to a share of all
    /// tasks, GPU tasks unchanged (how the FGD authors made theirs).
    SampleTrace(SampleTraceArgs),
    /// Measure this machine: prints a table and writes JSON.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Back up and restore the control plane's database.
    #[command(subcommand)]
    Admin(backup::AdminCmd),
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
    /// Also serve over TLS here, with the control plane's own CA (kubectl
    /// sends credentials to tenant clusters only over TLS), e.g.
    /// 127.0.0.1:7443
    #[arg(long, env = "ATRIUM_TLS_LISTEN")]
    tls_listen: Option<std::net::SocketAddr>,
    /// A name (or address) the TLS certificate carries besides localhost
    /// and loopback, repeatable
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// How many of the newest revisions the change log keeps; a watch
    /// from before them gets 410 and lists again [default: 100000]
    #[arg(long, env = "ATRIUM_CHANGES_KEPT", value_parser = clap::value_parser!(i64).range(1..))]
    changes_kept: Option<i64>,
    /// Offer tenants PostgreSQL databases (`/v1/databases`) on this
    /// PostgreSQL, reached as a superuser: postgres://USER:PASSWORD@HOST:PORT/DB.
    /// It must run on this host (each database's size is a disk mounted
    /// here) and ask TCP clients for passwords
    #[arg(long, env = "ATRIUM_DATABASES_URL", hide_env_values = true)]
    databases_url: Option<String>,
    /// Where tenants' databases' disks are made; PostgreSQL's user must be
    /// able to pass through every directory above it [default:
    /// <data-dir>/databases]
    #[arg(long, env = "ATRIUM_DATABASE_VOLUMES")]
    database_volumes: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace
    #[arg(long, env = "ATRIUM_LOG", default_value = "info")]
    log: tracing::Level,
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
    /// A workload's create → running latency beside bare runc, and image
    /// pull + unpack MB/s beside skopeo + umoci (root; runc, skopeo, umoci).
    Workloads {
        /// Workloads created, one at a time
        #[arg(long, default_value_t = 100)]
        workloads: u32,
        /// Size of the pulled image's (incompressible) layer
        #[arg(long, default_value_t = 50)]
        megabytes: u64,
        #[arg(long, default_value = "bench-workloads.json")]
        out: PathBuf,
    },
    /// Sites: a forwarded request's added latency over its link, nearest
    /// allowed site, failover and no_compliant_site when sites go dark
    /// (root; four sites of real agents and gateways on emulated links).
    Sites {
        /// Request pairs (forwarded, direct) for the latency measure
        #[arg(long, default_value_t = 200)]
        requests: u32,
        #[arg(long, default_value = "bench-sites.json")]
        out: PathBuf,
    },
    /// Tenant clusters: MiB per idle cluster, create → ready, list and
    /// watch latency with many clusters and objects.
    Kube {
        #[arg(long, default_value_t = 1000)]
        clusters: u32,
        /// Config maps created, spread over the clusters
        #[arg(long, default_value_t = 100_000)]
        objects: u32,
        #[arg(long, default_value = "bench-kube.json")]
        out: PathBuf,
    },
    /// Image push and pull MB/s through the control plane's registry
    /// beside Debian's docker-registry, skopeo as the client of both.
    Registry {
        /// Size of the image's one (incompressible) layer
        #[arg(long, default_value_t = 50)]
        megabytes: u64,
        /// Pushes and pulls per registry, alternating which goes first
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        #[arg(long, default_value = "bench-registry.json")]
        out: PathBuf,
    },
    /// Fleet scheduler placements/s at 1,000 and 10,000 nodes, and GPU
    /// allocation of every policy on the Alibaba traces, seeds 42–51.
    Sched {
        /// Directory with openb_node_list_gpu_node.csv and openb_pod_list_*.csv
        #[arg(long, default_value = "../shared/data/alibaba-gpu-v2023")]
        traces: PathBuf,
        /// Directory with more pod lists: the variants sampled here
        /// (data/traces/README.md)
        #[arg(long, default_value = "data/traces")]
        sampled: PathBuf,
        /// Seeds, first..=last
        #[arg(long, default_value = "42..=51")]
        seeds: String,
        /// Only the throughput part
        #[arg(long)]
        skip_traces: bool,
        #[arg(long, default_value = "bench-sched.json")]
        out: PathBuf,
    },
    /// Vector search recall@10 against queries/s on GloVe-6B-50d beside
    /// hnswlib and faiss-cpu (one core), and under a 1 % filter.
    Vector {
        #[arg(long, default_value = "bench-vector.json")]
        out: PathBuf,
    },
    /// Control-plane memory with many tenants of one small collection
    /// each, and search latency of collections in memory and paged out.
    VectorTenants(bench_vector::tenants::Args),
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
    /// Milliseconds between the tokens of simulated engines (load tests)
    #[arg(long, default_value_t = 0)]
    simulated_itl_ms: u64,
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
            planes_run::run_agent(args, &server, cli.global.token.clone(), data_dir).await
        }
        Command::Gateway(planes_run::GatewayArgs {
            command: Some(planes_run::GatewayCmd::Plane(cmd)),
            ..
        }) => plane_command(Plane::Gateway, cmd, &cli.global, &file, data_dir).await,
        Command::Node(NodeCmd::Plane(cmd)) => {
            plane_command(Plane::Node, cmd, &cli.global, &file, data_dir).await
        }
        Command::Gateway(args) => {
            let server = server_url(&cli.global, &file)?;
            let data_dir = data_dir.unwrap_or_else(config::default_data_dir);
            planes_run::run_gateway(args, &server, cli.global.token.clone(), data_dir).await
        }
        Command::Engine(args) => local::engine(args).await,
        Command::Bench(BenchCmd::Engine { out }) => bench::engine(out).await,
        Command::Bench(BenchCmd::Gateway {
            seconds,
            litellm,
            out,
        }) => {
            // Interrupted, the bench's future is dropped, and with it the
            // processes it started (engine, control plane, gateway, nginx,
            // LiteLLM): a signal's default action would leave them running.
            until_interrupted(bench_gateway::run(bench_gateway::Args {
                seconds,
                litellm,
                out,
                output: cli.global.output.unwrap_or(Output::Table),
            }))
            .await
        }
        Command::Bench(BenchCmd::Registry {
            megabytes,
            rounds,
            out,
        }) => {
            // As for the gateway bench: dropped on a signal, the bench's
            // future stops the registries it started.
            until_interrupted(bench_registry::run(bench_registry::Args {
                megabytes,
                rounds,
                out,
                output: cli.global.output.unwrap_or(Output::Table),
            }))
            .await
        }
        Command::Bench(BenchCmd::Workloads {
            workloads,
            megabytes,
            out,
        }) => {
            until_interrupted(bench_workloads::run(bench_workloads::Args {
                workloads,
                megabytes,
                out,
                output: cli.global.output.unwrap_or(Output::Table),
            }))
            .await
        }
        Command::Bench(BenchCmd::Sites { requests, out }) => {
            until_interrupted(bench_sites::run(bench_sites::Args {
                requests,
                out,
                output: cli.global.output.unwrap_or(Output::Table),
            }))
            .await
        }
        Command::Bench(BenchCmd::Kube {
            clusters,
            objects,
            out,
        }) => {
            until_interrupted(bench_kube::run(bench_kube::Args {
                clusters,
                objects,
                out,
                output: cli.global.output.unwrap_or(Output::Table),
            }))
            .await
        }
        Command::Bench(BenchCmd::Sched {
            traces,
            sampled,
            seeds,
            skip_traces,
            out,
        }) => {
            let seeds = local::parse_seeds(&seeds)?;
            tokio::task::spawn_blocking(move || {
                bench_sched::run(&traces, &sampled, &seeds, skip_traces, &out)
            })
            .await?
        }
        Command::Bench(BenchCmd::Vector { out }) => {
            tokio::task::spawn_blocking(move || bench_vector::run(&out)).await?
        }
        Command::Bench(BenchCmd::VectorTenants(args)) => {
            let output = cli.global.output.unwrap_or(Output::Table);
            until_interrupted(bench_vector::tenants::run(args, output)).await
        }
        Command::Sim(args) => local::sim(args, cli.global.output.unwrap_or(Output::Table)),
        Command::Admin(cmd) => {
            backup::run(cmd, &data_dir.unwrap_or_else(config::default_data_dir)).await
        }
        Command::SampleTrace(args) => local::sample_trace(args),
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
        }) => commands::model::pull(&name, !no_requantize, cache_dir),
        command => {
            let (cp, output) = connect(&cli.global, &file)?;
            let ctx = Ctx {
                cp,
                output,
                data_dir: data_dir.unwrap_or_else(config::default_data_dir),
            };
            client_command(&ctx, command).await
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

fn connect(global: &Global, file: &config::FileConfig) -> Result<(ControlPlane, Output)> {
    let (server, token, output) = client_settings(global, file)?;
    Ok((ControlPlane::new(&server, &token), output))
}

/// The commands that talk to the control plane, each its noun's.
async fn client_command(ctx: &Ctx, command: Command) -> Result<()> {
    match command {
        Command::Tenant(cmd) => commands::tenant::run(ctx, cmd).await,
        Command::Key(cmd) => commands::key::run(ctx, cmd).await,
        Command::Site(cmd) => commands::site::run(ctx, cmd).await,
        Command::Node(cmd) => commands::node::run(ctx, cmd).await,
        Command::Model(cmd) => commands::model::run(ctx, cmd).await,
        Command::Deploy(cmd) => commands::deploy::run(ctx, cmd).await,
        Command::Quota(cmd) => commands::quota::run(ctx, cmd).await,
        Command::Image(cmd) => commands::image::run(ctx, cmd).await,
        Command::Workload(cmd) => commands::workload::run(ctx, cmd).await,
        Command::Volume(cmd) => commands::volume::run(ctx, cmd).await,
        Command::Collection(cmd) => commands::collection::run(ctx, cmd).await,
        Command::Database(cmd) => commands::database::run(ctx, cmd).await,
        Command::Cluster(cmd) => commands::cluster::run(ctx, cmd).await,
        Command::Credential(cmd) => commands::credential::run(ctx, cmd).await,
        Command::Audit { tenant, after } => commands::audit::run(ctx, tenant, after).await,
        Command::Logs {
            deployment,
            tenant,
            follow,
        } => commands::logs::run(ctx, &deployment, tenant.as_deref(), follow).await,
        Command::Exec {
            workload,
            replica,
            timeout,
            tenant,
            command,
        } => {
            let request = atrium_core::exec::ExecRequest {
                command,
                replica,
                timeout_seconds: timeout,
            };
            let code = commands::exec::run(ctx, &workload, tenant.as_deref(), request).await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Server(_)
        | Command::Up(_)
        | Command::Engine(_)
        | Command::SandboxExec(_)
        | Command::SandboxProbe(_)
        | Command::Agent(_)
        | Command::Gateway(_)
        | Command::Sim(_)
        | Command::Admin(_)
        | Command::SampleTrace(_)
        | Command::Bench(_) => bail!("server commands are not client commands"),
    }
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
        PlaneCmd::Join { join_token, name } => {
            let server = server_url(global, file)?;
            planes::join_command(plane, &server, &join_token, name.as_deref(), &data_dir).await
        }
        PlaneCmd::RotateCredential => planes::rotate_command(plane, &data_dir).await,
        PlaneCmd::JoinToken {
            name,
            site,
            ttl_seconds,
            uses,
        } => {
            let (cp, output) = connect(global, file)?;
            let name = name.unwrap_or_default();
            planes::issue_join_token(&cp, output, plane, &name, &site, ttl_seconds, uses).await
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

async fn serve(
    args: ServerArgs,
    data_dir: Option<PathBuf>,
    file: &config::FileConfig,
) -> Result<()> {
    crate::init_logging(args.log);
    let mut config = config::server_config(
        args.listen,
        data_dir,
        args.database_url,
        args.body_limit,
        &file.server,
    )
    .map_err(|errors| anyhow!("invalid configuration:\n  {}", errors.join("\n  ")))?;
    config.tls_listen = args.tls_listen;
    config.tls_names = args.tls_names;
    config.changes_kept = args.changes_kept.unwrap_or(config.changes_kept);
    config.databases =
        config::databases_config(args.databases_url, args.database_volumes, &config.data_dir);
    let mut server = atrium_server::start(config.clone()).await?;
    let url = format!("http://{}", server.addr);
    let mut banner = format!(
        "Atrium control plane: {url}  (data: {})\n",
        config.data_dir.display()
    );
    if let Some(tls) = server.tls_addr {
        banner.push_str(&format!(
            "Over TLS (tenant clusters' kubectl): https://{tls}  (CA: {})\n",
            config.data_dir.join("tls/ca.pem").display()
        ));
    }
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

pub(crate) async fn shutdown_signal() {
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

/// Runs a bench until it ends or a signal comes; dropped on a signal, its
/// future stops what it started.
async fn until_interrupted(bench: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::select! {
        done = bench => done,
        _ = shutdown_signal() => Err(anyhow!("interrupted; the processes the bench started are stopped")),
    }
}
