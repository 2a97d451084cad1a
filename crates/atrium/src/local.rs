//! The commands that run on this machine alone, with no control plane:
//! `atrium engine` (one model over the OpenAI API; the agent runs it per
//! replica), `atrium sim` (a cluster trace replayed under a policy) and
//! `atrium sample-trace` (a trace variant drawn from a trace).

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use crate::client::Output;
use crate::shutdown_signal;

#[derive(Args)]
pub struct EngineArgs {
    /// chat | embedding | simulated | llama-cpp | vllm | sglang
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
    /// Requests running or waiting before more get 429
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Chat: memory for the key/value cache of all sequences, MiB
    #[arg(long, default_value_t = atrium_engine::chat::DEFAULT_KV_CACHE_MIB)]
    kv_cache_mib: usize,
    /// Chat: the replica's memory limit, MiB; the cache and the prefill
    /// copy of the weights are fitted under it
    #[arg(long)]
    memory_mib: Option<usize>,
    /// Simulated: time to first token, ms
    #[arg(long, default_value_t = 0)]
    sim_ttft_ms: u64,
    /// Simulated: time between tokens, ms
    #[arg(long, default_value_t = 0)]
    sim_itl_ms: u64,
    /// Simulated: sequences computed at once
    #[arg(long, default_value_t = 64)]
    sim_max_concurrent: usize,
    /// llama-cpp, vllm, sglang: the engine's program (its venv's Python,
    /// or `vllm`), which this process becomes
    #[arg(long)]
    program: Option<PathBuf>,
    /// llama-cpp: CPU threads
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// llama-cpp, vllm, sglang: the replica's GPU request (`1`, `0.5`,
    /// `3g.40gb`)
    #[arg(long)]
    gpu: Option<String>,
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
    /// random, bestfit, packing, dotprod, fgd or atrium; with --online
    /// also fleet (Atrium's fleet scheduler: preemption and gangs)
    #[arg(long, default_value = "atrium")]
    policy: String,
    /// Workload size as a multiple of cluster GPU capacity
    #[arg(long, default_value_t = 1.3)]
    inflate: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Tasks arrive and leave at their creation and deletion times
    /// (the pod list's creation_time and deletion_time columns)
    #[arg(long)]
    online: bool,
    /// With --online: arrival times are multiplied by this (durations
    /// are kept), so the same tasks overlap more
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
}

#[derive(Args)]
pub struct SampleTraceArgs {
    /// Pod list CSV to draw from (the default trace)
    #[arg(long)]
    pods: PathBuf,
    /// Share of all tasks the CPU-only tasks should make up, in [0, 1)
    #[arg(long)]
    cpu_only_share: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the made pod list
    #[arg(long)]
    out: PathBuf,
}

pub fn sample_trace(args: SampleTraceArgs) -> Result<()> {
    let csv = std::fs::read_to_string(&args.pods)
        .with_context(|| format!("reading {}", args.pods.display()))?;
    let made = atrium_sched::sample::with_cpu_only_share(&csv, args.cpu_only_share, args.seed)
        .with_context(|| args.pods.display().to_string())?;
    std::fs::write(&args.out, made).with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

pub async fn engine(args: EngineArgs) -> Result<()> {
    crate::init_logging(args.log);
    if matches!(args.kind.as_str(), "llama-cpp" | "vllm" | "sglang") {
        return third_party(args);
    }
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
            limits: atrium_engine::chat::ChatLimits {
                memory_mib: args.memory_mib,
                ..atrium_engine::chat::ChatLimits::new(args.max_queue, args.kv_cache_mib)
            },
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

/// Becomes a third-party engine (`exec`): same process, same sandbox, its
/// address taken from `--listen`.
fn third_party(args: EngineArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let engine = match args.kind.as_str() {
        "llama-cpp" => atrium_core::deployment::EngineKind::LlamaCpp,
        "vllm" => atrium_core::deployment::EngineKind::Vllm,
        _ => atrium_core::deployment::EngineKind::Sglang,
    };
    let listen: std::net::SocketAddr = args
        .listen
        .parse()
        .map_err(|_| anyhow!("--listen: {:?} is not an address", args.listen))?;
    let gpu = args
        .gpu
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| anyhow!("--gpu: {e}"))?;
    let launch = atrium_agent::engines::Launch {
        engine,
        program: args
            .program
            .ok_or_else(|| anyhow!("--program is required for --kind {}", args.kind))?,
        model: args
            .model
            .ok_or_else(|| anyhow!("--model is required for --kind {}", args.kind))?,
        name: args.name,
        threads: args.threads.max(1),
        gpu,
    };
    let err = std::process::Command::new(&launch.program)
        .args(launch.args(&listen.ip().to_string(), listen.port()))
        .exec();
    Err(anyhow!("cannot run {}: {err}", launch.program.display()))
}

pub fn sim(args: SimArgs, output: Output) -> Result<()> {
    if !(args.inflate > 0.0 && args.inflate <= 10.0) {
        bail!("--inflate {} must be in (0, 10]", args.inflate);
    }
    if !(args.time_scale > 0.0 && args.time_scale <= 1.0e6) {
        bail!("--time-scale {} must be in (0, 1e6]", args.time_scale);
    }
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let nodes = atrium_sched::trace::parse_nodes(&read(&args.nodes)?)
        .with_context(|| args.nodes.display().to_string())?;
    if args.online {
        return sim_online(&args, &nodes, &read(&args.pods)?, output);
    }
    let policy: atrium_sched::policy::Policy = args.policy.parse().map_err(|e: String| {
        if args.policy == "fleet" {
            anyhow!("--policy fleet replays only --online")
        } else {
            anyhow!(e)
        }
    })?;
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

fn sim_online(
    args: &SimArgs,
    nodes: &[atrium_sched::trace::NodeSpec],
    csv: &str,
    output: Output,
) -> Result<()> {
    use atrium_sched::online::{replay, OnlineConfig, Scheduler};
    let scheduler = if args.policy == "fleet" {
        Scheduler::Fleet
    } else {
        Scheduler::Policy(
            args.policy
                .parse()
                .map_err(|e: String| anyhow!("{e} or fleet"))?,
        )
    };
    let pods = atrium_sched::trace::parse_timed_pods(csv)
        .with_context(|| args.pods.display().to_string())?;
    let config = OnlineConfig {
        time_scale: args.time_scale,
        inflate: args.inflate,
        samples: 101,
    };
    let r = replay(nodes, &pods, scheduler, config, args.seed);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Table => {
            println!(
                "{} online, seed {}, inflate {}, time scale {}: {} tasks ({} gangs), offered load {:.3}",
                r.scheduler, r.seed, r.inflate, r.time_scale, r.tasks, r.gangs, r.offered_load
            );
            println!(
                "placed on arrival {}, after waiting {}, never {}; {} preempted; {:.0} decisions/s",
                r.placed_on_arrival,
                r.placed_after_waiting,
                r.never_placed,
                r.preemptions,
                r.decisions_per_sec
            );
            let w = &r.wait_seconds;
            println!(
                "wait s: mean {:.1} p50 {:.1} p95 {:.1} p99 {:.1} max {:.1}",
                w.mean, w.p50, w.p95, w.p99, w.max
            );
            println!(
                "allocation %: mean {:.2} peak {:.2}; fragmentation % of idle: mean {:.2}",
                r.mean_allocation_pct, r.peak_allocation_pct, r.mean_fragmentation_pct
            );
            println!(
                "{:>10}  {:>12}  {:>16}  {:>8}",
                "time s", "allocation%", "fragmentation%", "waiting"
            );
            for s in r.timeline.iter().step_by(10) {
                println!(
                    "{:>10.0}  {:>12.2}  {:>16.2}  {:>8}",
                    s.t, s.allocation_pct, s.fragmentation_pct, s.waiting
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
