//! `atrium cluster`: a tenant's own Kubernetes API, and a kubeconfig for
//! it (`atrium cluster kubeconfig dev > kubeconfig; kubectl --kubeconfig
//! kubeconfig get ns`).

#![allow(clippy::print_stdout)]

use anyhow::Result;
use atrium_api::{Cluster, CreatedKey, Key, KubeEndpoint};
use atrium_client::Api;
use atrium_core::cluster::{api_path, ClusterSpec};
use atrium_core::key::{KeySpec, Scope};
use atrium_core::limits::RequestLimits;
use clap::Subcommand;

use super::{create, read, Ctx, FromFile, Lookup, ReadCmd};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// A Kubernetes API of the tenant's own, at /k8s/<id>
    Create {
        name: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        from: FromFile,
    },
    /// Print a kubeconfig for the cluster, with a new admin key of its
    /// tenant as the bearer token (revoke it with `atrium key revoke`)
    Kubeconfig(Lookup),
    #[command(flatten)]
    Read(ReadCmd),
}

pub const CLUSTER_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("ID", "/id"),
    ("CREATED", "/created_at"),
];

pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Create { name, tenant, from } => {
            create::<Cluster>(ctx, CLUSTER_COLUMNS, &from, name, tenant, || {
                Ok(ClusterSpec {})
            })
            .await
        }
        ClusterCmd::Kubeconfig(l) => {
            let cluster = l.api::<Cluster>(&ctx.cp).get(&l.ident).await?;
            let endpoint: KubeEndpoint = ctx
                .cp
                .request(reqwest::Method::GET, "/v1/kube/endpoint", None::<&()>)
                .await?;
            let key_name = format!("kube-{}", &cluster.id[cluster.id.len() - 8..]);
            let spec = KeySpec::new(vec![Scope::Admin], None, RequestLimits::default());
            let key: CreatedKey = Api::<Key>::of_tenant(&ctx.cp, cluster.tenant.as_deref())
                .create_as(&key_name, &spec)
                .await?;
            print!(
                "{}",
                kubeconfig(
                    &cluster.name,
                    &format!("{}{}", endpoint.server, api_path(&cluster.id)),
                    &endpoint.certificate_authority_data,
                    &key.secret
                )
            );
            Ok(())
        }
        ClusterCmd::Read(c) => read::<Cluster>(ctx, CLUSTER_COLUMNS, &c).await,
    }
}

/// A kubeconfig with one cluster, user and context, all named `name`;
/// `ca` is the base64 of the CA's PEM.
fn kubeconfig(name: &str, server: &str, ca: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n\
         \x20   certificate-authority-data: {ca}\n\
         users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    \
         cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\n"
    )
}
