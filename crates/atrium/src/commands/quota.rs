//! `atrium quota`: what each tenant may hold, beside what it holds.

use anyhow::Result;
use atrium_api::{QuotaUpdate, QuotaView};
use clap::Subcommand;
use reqwest::Method;

use super::tenant::QuotaFlags;
use super::Ctx;
use crate::client::{encode, Columns};

#[derive(Subcommand)]
pub enum QuotaCmd {
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

pub async fn run(ctx: &Ctx, cmd: QuotaCmd) -> Result<()> {
    let cp = &ctx.cp;
    match cmd {
        QuotaCmd::List => {
            let list: atrium_api::ListResponse<QuotaView> =
                cp.request(Method::GET, "/v1/quotas", None::<&()>).await?;
            ctx.show(&list, QUOTA_COLUMNS)
        }
        QuotaCmd::Get { tenant } => {
            let path = format!("/v1/quotas/{}", encode(&tenant));
            let view: QuotaView = cp.request(Method::GET, &path, None::<&()>).await?;
            ctx.show(&view, QUOTA_COLUMNS)
        }
        QuotaCmd::Set { tenant, quota } => {
            let path = format!("/v1/quotas/{}", encode(&tenant));
            let body = QuotaUpdate {
                quota: quota.quota(),
            };
            let view: QuotaView = cp.request(Method::PUT, &path, Some(&body)).await?;
            ctx.show(&view, QUOTA_COLUMNS)
        }
    }
}
