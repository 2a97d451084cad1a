//! `atrium site`: where nodes are, and under which jurisdiction.

use anyhow::{anyhow, Result};
use atrium_api::Site;
use atrium_core::site::SiteSpec;
use clap::Subcommand;

use super::{create, named, read, Ctx, FromFile, ReadCmd};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum SiteCmd {
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

pub const SITE_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("KIND", "/spec/kind"),
    ("JURISDICTION", "/spec/jurisdiction"),
    ("LOCATION", "/spec/location"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: SiteCmd) -> Result<()> {
    match cmd {
        SiteCmd::Create {
            name,
            kind,
            jurisdiction,
            location,
            from,
        } => {
            create::<Site>(ctx, SITE_COLUMNS, &from, name, None, || {
                Ok(SiteSpec {
                    kind: named("--kind", &kind)?,
                    jurisdiction: jurisdiction
                        .ok_or_else(|| anyhow!("--jurisdiction is required (e.g. EU)"))?,
                    location,
                })
            })
            .await
        }
        SiteCmd::Read(c) => read::<Site>(ctx, SITE_COLUMNS, &c).await,
    }
}
