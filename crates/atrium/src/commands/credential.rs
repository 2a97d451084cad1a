//! `atrium credential`: the nodes' and gateways' credentials (provider).

use anyhow::Result;
use atrium_api::Credential;
use atrium_client::Api;
use clap::Subcommand;

use super::{read, Ctx, ReadCmd};
use crate::planes::CREDENTIAL_COLUMNS;

#[derive(Subcommand)]
pub enum CredentialCmd {
    /// Cut a node or gateway off: its credential stops working at once
    Revoke { id: String },
    #[command(flatten)]
    Read(ReadCmd),
}

pub async fn run(ctx: &Ctx, cmd: CredentialCmd) -> Result<()> {
    match cmd {
        CredentialCmd::Revoke { id } => {
            let revoked = Api::<Credential>::all(&ctx.cp).act(&id, "revoke").await?;
            ctx.show(&revoked, CREDENTIAL_COLUMNS)
        }
        CredentialCmd::Read(c) => read::<Credential>(ctx, CREDENTIAL_COLUMNS, &c).await,
    }
}
