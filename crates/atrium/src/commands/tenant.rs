//! `atrium tenant`: the provider's customers.

use anyhow::Result;
use atrium_api::Tenant;
use atrium_core::limits::RequestLimits;
use atrium_core::quantity::{ByteSize, CpuMillis, GpuMilli};
use atrium_core::quota::Quota;
use atrium_core::tenant::{Residency, TenantSpec};
use clap::{Args, Subcommand};

use super::{create, named, read, Ctx, FromFile, ReadCmd};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum TenantCmd {
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
        /// aggregated (per minute, the default) | per_request (also a record
        /// per request)
        #[arg(long)]
        usage_records: Option<String>,
        #[command(flatten)]
        quota: QuotaFlags,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

/// A tenant's quota, as flags (`tenant create`, `quota set`); unset
/// limits are unlimited.
#[derive(Args, Default)]
pub struct QuotaFlags {
    #[arg(long)]
    quota_gpus: Option<GpuMilli>,
    #[arg(long)]
    quota_gpu_memory: Option<ByteSize>,
    #[arg(long)]
    quota_cpu: Option<CpuMillis>,
    #[arg(long)]
    quota_memory: Option<ByteSize>,
    #[arg(long)]
    quota_storage: Option<ByteSize>,
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
    /// Volumes held at once [default: 100]
    #[arg(long)]
    quota_volumes: Option<u64>,
    /// Kubernetes clusters held at once [default: 10]
    #[arg(long)]
    quota_clusters: Option<u64>,
    /// Objects one Kubernetes cluster holds at once [default: 10000]
    #[arg(long)]
    quota_cluster_objects: Option<u64>,
    #[arg(long)]
    quota_requests_per_minute: Option<u64>,
    #[arg(long)]
    quota_tokens_per_minute: Option<u64>,
    #[arg(long)]
    quota_tokens_per_day: Option<u64>,
    #[arg(long)]
    quota_max_concurrent_requests: Option<u64>,
}

impl QuotaFlags {
    pub fn quota(&self) -> Quota {
        let mut quota = Quota {
            gpus: self.quota_gpus,
            gpu_memory: self.quota_gpu_memory,
            cpu: self.quota_cpu,
            memory: self.quota_memory,
            storage: self.quota_storage,
            deployments: self.quota_deployments,
            models: self.quota_models,
            keys: self.quota_keys,
            watches: self.quota_watches,
            volumes: self.quota_volumes,
            clusters: self.quota_clusters,
            cluster_objects: self.quota_cluster_objects,
            ..Quota::default()
        };
        quota.set_request_limits(RequestLimits {
            requests_per_minute: self.quota_requests_per_minute,
            tokens_per_minute: self.quota_tokens_per_minute,
            tokens_per_day: self.quota_tokens_per_day,
            max_concurrent_requests: self.quota_max_concurrent_requests,
        });
        quota
    }
}

pub const TENANT_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("ISOLATION", "/spec/isolation"),
    ("RESIDENCY", "/spec/residency/jurisdictions"),
    ("PRIORITY", "/spec/priority"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: TenantCmd) -> Result<()> {
    match cmd {
        TenantCmd::Create {
            name,
            display_name,
            residency,
            isolation,
            priority,
            usage_records,
            quota,
            from,
        } => {
            create::<Tenant>(ctx, TENANT_COLUMNS, &from, name, None, || {
                let mut spec = TenantSpec {
                    display_name: display_name.unwrap_or_default(),
                    quota: quota.quota(),
                    priority: priority.unwrap_or_default(),
                    ..TenantSpec::default()
                };
                if !residency.is_empty() {
                    spec.residency = Residency::Only {
                        jurisdictions: residency,
                    };
                }
                if let Some(i) = isolation {
                    spec.isolation = named("--isolation", &i)?;
                }
                if let Some(u) = usage_records {
                    spec.usage_records = named("--usage-records", &u)?;
                }
                Ok(spec)
            })
            .await
        }
        TenantCmd::Read(c) => read::<Tenant>(ctx, TENANT_COLUMNS, &c).await,
    }
}
