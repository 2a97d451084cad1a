//! `atrium database`: a tenant's PostgreSQL databases (`/v1/databases`),
//! with a tenant key. The password is printed when the database is made
//! and at each rotation, never again.

use anyhow::Result;
use atrium_core::quantity::ByteSize;
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use super::{items, tenant_api, Ctx};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum DatabaseCmd {
    /// A database, e.g. `atrium database create app --size 1Gi`; prints
    /// its password and URLs this once
    Create {
        name: String,
        /// Connections at once [default: 10]
        #[arg(long)]
        connection_limit: Option<u32>,
        /// Statements running longer are cancelled [default: 30000]
        #[arg(long)]
        statement_timeout_ms: Option<u64>,
        /// Its hard size [default: 1Gi]
        #[arg(long)]
        size: Option<ByteSize>,
    },
    List,
    Get {
        name: String,
    },
    /// A new password (printed this once); sessions opened with the old one end
    Rotate {
        name: String,
    },
    /// Drops the database and its role, and zero-fills its disk
    Delete {
        name: String,
    },
}

const DATABASE_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("SIZE", "/size"),
    ("CONNECTIONS", "/connection_limit"),
    ("TIMEOUT_MS", "/statement_timeout_ms"),
    ("PHASE", "/phase"),
    ("DATABASE", "/database"),
    ("HOST", "/host"),
    ("PORT", "/port"),
];
/// What only a create or a rotation shows.
const CREDENTIAL_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("USER", "/user"),
    ("PASSWORD", "/password"),
    ("URL", "/url"),
    ("FROM_WORKLOADS", "/workload_url"),
];

pub async fn run(ctx: &Ctx, cmd: DatabaseCmd) -> Result<()> {
    let d = "databases";
    match cmd {
        DatabaseCmd::Create {
            name,
            connection_limit,
            statement_timeout_ms,
            size,
        } => {
            let mut body = json!({"name": name});
            if let Some(n) = connection_limit {
                body["connection_limit"] = json!(n);
            }
            if let Some(ms) = statement_timeout_ms {
                body["statement_timeout_ms"] = json!(ms);
            }
            if let Some(s) = size {
                body["size"] = json!(s.to_string());
            }
            let made = tenant_api(ctx, Method::POST, &[d], Some(body)).await?;
            ctx.show(&made, CREDENTIAL_COLUMNS)
        }
        DatabaseCmd::List => {
            let all = tenant_api(ctx, Method::GET, &[d], None).await?;
            ctx.show(&items(all, d), DATABASE_COLUMNS)
        }
        DatabaseCmd::Get { name } => {
            let one = tenant_api(ctx, Method::GET, &[d, &name], None).await?;
            ctx.show(&one, DATABASE_COLUMNS)
        }
        DatabaseCmd::Rotate { name } => {
            let rotated = tenant_api(ctx, Method::POST, &[d, &name, "rotate"], None).await?;
            ctx.show(&rotated, CREDENTIAL_COLUMNS)
        }
        DatabaseCmd::Delete { name } => {
            let gone = tenant_api(ctx, Method::DELETE, &[d, &name], None).await?;
            ctx.show(&gone, &[("NAME", "/name"), ("DELETED", "/deleted")])
        }
    }
}
