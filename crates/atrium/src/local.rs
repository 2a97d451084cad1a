//! The commands that run on this machine alone, with no control plane:
//! `atrium engine` (one model over the OpenAI API; the agent runs it per
//! replica) and `atrium sim` (a cluster trace replayed under a policy).

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use crate::client::Output;
use crate::shutdown_signal;

#[derive(Args)]
pub struct EngineArgs {
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

#[derive(Args)]
pub struct SimArgs {
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

pub async fn engine(args: EngineArgs) -> Result<()> {
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

pub fn sim(args: SimArgs, output: Output) -> Result<()> {
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
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
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
