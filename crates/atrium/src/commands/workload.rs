//! `atrium workload`: a tenant's own images run as containers.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use atrium_api::Workload;
use atrium_core::deployment::Resources;
use atrium_core::quantity::{ByteSize, CpuMillis, GpuRequest};
use atrium_core::volume::VolumeMount;
use atrium_core::workload::{ContainerSpec, JobSpec, WorkloadKind, WorkloadSpec};
use clap::{Args, Subcommand};

use super::volume::parse_mount;
use super::{create, read, Ctx, FromFile, ReadCmd};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum WorkloadCmd {
    /// Run an image from the control plane's registry as a service,
    /// `atrium workload run web --image acme/busybox:1 --port 8080 -- httpd -f -p 8080`,
    /// or as a job: `atrium workload run train --job --completions 4 --gang --gpu 1 …`
    Run {
        name: Option<String>,
        /// `<tenant>/<repository>[:tag|@sha256:…]`, or `library/…`
        #[arg(long)]
        image: Option<String>,
        /// Replaces the image's entrypoint (its args follow `--`)
        #[arg(long)]
        command: Option<String>,
        /// KEY=VALUE, repeatable
        #[arg(long = "env", value_parser = key_value)]
        env: Vec<(String, String)>,
        /// TCP port it listens on, repeatable; the first is health-checked
        #[arg(long = "port")]
        ports: Vec<u16>,
        #[arg(long, default_value = "1")]
        cpu: CpuMillis,
        #[arg(long, default_value = "256Mi")]
        memory: ByteSize,
        /// Whole GPUs, a fraction (0.5) or a MIG profile (3g.40gb)
        #[arg(long)]
        gpu: Option<GpuRequest>,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        #[command(flatten)]
        job: JobArgs,
        /// Placement priority, at most the tenant's (its default)
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// Sites the replicas may run in (comma-separated)
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// A volume of the tenant to mount, NAME[:/PATH][:ro] (at
        /// /volumes/NAME by default), repeatable
        #[arg(long = "volume", value_parser = parse_mount)]
        volumes: Vec<VolumeMount>,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        from: FromFile,
        /// Arguments: replace the image's `Cmd`
        #[arg(last = true)]
        args: Vec<String>,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

/// A job's settings; any of them makes the workload a job.
#[derive(Args)]
pub struct JobArgs {
    /// Run to completion instead of for good
    #[arg(long)]
    job: bool,
    /// Successful exits needed, one per index (default 1)
    #[arg(long)]
    completions: Option<u32>,
    /// Indexes run at once (default 1; all for a gang)
    #[arg(long)]
    parallelism: Option<u32>,
    /// Every index starts at once or none does
    #[arg(long)]
    gang: bool,
    /// Retries of one index before the job fails (default 6)
    #[arg(long)]
    backoff_limit: Option<u32>,
    /// Seconds after creation the job fails if not complete
    #[arg(long)]
    deadline: Option<u64>,
    /// Seconds after it finishes that the job is deleted
    #[arg(long)]
    ttl: Option<u64>,
}

impl JobArgs {
    fn spec(self) -> Option<JobSpec> {
        let any = self.job
            || self.gang
            || self.completions.is_some()
            || self.parallelism.is_some()
            || self.backoff_limit.is_some()
            || self.deadline.is_some()
            || self.ttl.is_some();
        let default = JobSpec::default();
        any.then(|| JobSpec {
            completions: self.completions.unwrap_or(default.completions),
            parallelism: self.parallelism,
            backoff_limit: self.backoff_limit.unwrap_or(default.backoff_limit),
            active_deadline_seconds: self.deadline,
            ttl_seconds_after_finished: self.ttl,
            gang: self.gang,
        })
    }
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub const WORKLOAD_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("IMAGE", "/spec/image"),
    ("KIND", "/spec/kind"),
    ("REPLICAS", "/spec/replicas"),
    ("STATE", "/status/state"),
    ("REASON", "/status/reason"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: WorkloadCmd) -> Result<()> {
    match cmd {
        WorkloadCmd::Run {
            name,
            image,
            command,
            env,
            ports,
            cpu,
            memory,
            gpu,
            replicas,
            job,
            priority,
            sites,
            volumes,
            tenant,
            from,
            args,
        } => {
            let job = job.spec();
            create::<Workload>(ctx, WORKLOAD_COLUMNS, &from, name, tenant, || {
                Ok(WorkloadSpec {
                    container: ContainerSpec {
                        image: image.ok_or_else(|| anyhow!("--image is required"))?,
                        command: command.into_iter().collect(),
                        args,
                        env: env.into_iter().collect::<BTreeMap<_, _>>(),
                        ports,
                        hostname: None,
                    },
                    resources: Resources {
                        cpu,
                        memory,
                        gpu,
                        gpu_memory: None,
                        gpu_models: Vec::new(),
                        storage: ByteSize::default(),
                    },
                    kind: if job.is_some() {
                        WorkloadKind::Job
                    } else {
                        WorkloadKind::Service
                    },
                    replicas,
                    job,
                    priority,
                    sites,
                    volumes,
                })
            })
            .await
        }
        WorkloadCmd::Read(c) => read::<Workload>(ctx, WORKLOAD_COLUMNS, &c).await,
    }
}
