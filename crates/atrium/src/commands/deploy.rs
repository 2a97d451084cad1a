//! `atrium deploy`: a tenant's served models.

use anyhow::{anyhow, Result};
use atrium_api::Deployment;
use atrium_core::deployment::{DeploymentSpec, Replicas, Resources, SamplingDefaults};
use atrium_core::quantity::{ByteSize, CpuMillis, GpuRequest};
use clap::Subcommand;

use super::{create, named, read, Ctx, FromFile, ReadCmd};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum DeployCmd {
    Create {
        name: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// embedded | simulated | llama-cpp | vllm | sglang | external
        #[arg(long, default_value = "embedded")]
        engine: String,
        #[arg(long, default_value = "1")]
        cpu: CpuMillis,
        #[arg(long, default_value = "2Gi")]
        memory: ByteSize,
        /// Whole GPUs, a fraction (0.5) or a MIG profile (3g.40gb)
        #[arg(long)]
        gpu: Option<GpuRequest>,
        #[arg(long)]
        gpu_memory: Option<ByteSize>,
        #[arg(long, default_value_t = 1)]
        min: u32,
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// Requests in flight per replica the autoscaler aims at [default: 8]
        #[arg(long)]
        target_in_flight: Option<u32>,
        /// Seconds load must stay low before replicas are removed (to zero
        /// with --min 0) [default: 60]
        #[arg(long)]
        scale_down_delay: Option<u32>,
        /// Sites the replicas may run in (comma-separated)
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// Sites its replicas go to and its requests are served at first;
        /// other allowed sites only take the overflow (comma-separated)
        #[arg(long, value_delimiter = ',')]
        prefer_sites: Vec<String>,
        #[arg(long)]
        external_url: Option<String>,
        /// Temperature for requests that leave it out (0 to 2)
        #[arg(long)]
        temperature: Option<f64>,
        /// top_p for requests that leave it out (above 0, at most 1)
        #[arg(long)]
        top_p: Option<f64>,
        /// presence_penalty for requests that leave it out (-2 to 2)
        #[arg(long, allow_negative_numbers = true)]
        presence_penalty: Option<f64>,
        /// frequency_penalty for requests that leave it out (-2 to 2)
        #[arg(long, allow_negative_numbers = true)]
        frequency_penalty: Option<f64>,
        /// The most tokens an answer gets when its request sets no bound
        #[arg(long)]
        max_tokens: Option<u32>,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

pub const DEPLOY_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("MODEL", "/spec/model"),
    ("ENGINE", "/spec/engine"),
    ("MIN", "/spec/replicas/min"),
    ("MAX", "/spec/replicas/max"),
    ("SCALE", "/status/desired_replicas"),
    ("STATE", "/status/state"),
    ("REASON", "/status/reason"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: DeployCmd) -> Result<()> {
    match cmd {
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
            target_in_flight,
            scale_down_delay,
            sites,
            prefer_sites,
            external_url,
            temperature,
            top_p,
            presence_penalty,
            frequency_penalty,
            max_tokens,
            tenant,
            from,
        } => {
            create::<Deployment>(ctx, DEPLOY_COLUMNS, &from, name, tenant, || {
                Ok(DeploymentSpec {
                    model: model.ok_or_else(|| anyhow!("--model is required"))?,
                    engine: named("--engine", &engine)?,
                    resources: Resources {
                        cpu,
                        memory,
                        gpu,
                        gpu_memory,
                        gpu_models: Vec::new(),
                        storage: ByteSize::default(),
                    },
                    replicas: Replicas {
                        min,
                        max,
                        target_in_flight,
                        scale_down_delay_seconds: scale_down_delay,
                    },
                    sites,
                    preferred_sites: prefer_sites,
                    external_url,
                    sampling: SamplingDefaults {
                        temperature,
                        top_p,
                        presence_penalty,
                        frequency_penalty,
                        max_tokens,
                    },
                })
            })
            .await
        }
        DeployCmd::Read(c) => read::<Deployment>(ctx, DEPLOY_COLUMNS, &c).await,
    }
}
