//! `atrium key`: tenants' API keys.

#![allow(clippy::print_stdout)]

use anyhow::{anyhow, Result};
use atrium_api::{CreatedKey, Key};
use atrium_client::Api;
use atrium_core::key::{KeySpec, Scope};
use atrium_core::limits::RequestLimits;
use clap::{Args, Subcommand};
use time::OffsetDateTime;

use super::{named, read, Ctx, Lookup, ReadCmd};
use crate::client::{Columns, Output};

#[derive(Subcommand)]
pub enum KeyCmd {
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

/// Request limits of one key, enforced by the gateway.
#[derive(Args)]
pub struct KeyLimitFlags {
    #[arg(long)]
    requests_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_minute: Option<u64>,
    #[arg(long)]
    tokens_per_day: Option<u64>,
    #[arg(long)]
    max_concurrent_requests: Option<u64>,
}

impl KeyLimitFlags {
    fn limits(&self) -> RequestLimits {
        RequestLimits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent_requests: self.max_concurrent_requests,
        }
    }
}

pub const KEY_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("SCOPES", "/spec/scopes"),
    ("EXPIRES", "/spec/expires_at"),
    ("REVOKED", "/status/revoked_at"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: KeyCmd) -> Result<()> {
    match cmd {
        KeyCmd::Create {
            name,
            tenant,
            scopes,
            expires_at,
            limits,
        } => {
            let scopes = scopes
                .iter()
                .map(|s| named::<Scope>("--scopes", s))
                .collect::<Result<Vec<_>>>()?;
            let expires_at = expires_at
                .map(|e| {
                    OffsetDateTime::parse(&e, &time::format_description::well_known::Rfc3339)
                        .map_err(|err| anyhow!("--expires-at {e:?} is not RFC 3339: {err}"))
                })
                .transpose()?;
            let spec = KeySpec::new(scopes, expires_at, limits.limits());
            let created: CreatedKey = Api::<Key>::of_tenant(&ctx.cp, tenant.as_deref())
                .create_as(&name, &spec)
                .await?;
            match ctx.output {
                Output::Json => ctx.show(&created, KEY_COLUMNS),
                Output::Table => {
                    ctx.show(&created.key, KEY_COLUMNS)?;
                    println!("\nSecret (shown once, store it now):\n  {}", created.secret);
                    Ok(())
                }
            }
        }
        KeyCmd::Read(c) => read::<Key>(ctx, KEY_COLUMNS, &c).await,
        KeyCmd::Revoke(l) => ctx.show(
            &l.api::<Key>(&ctx.cp).act(&l.ident, "revoke").await?,
            KEY_COLUMNS,
        ),
    }
}
