//! The client commands, one module per noun, each with its subcommands and
//! its own `run`. They reach the control plane through the typed
//! `atrium_client::Api<R>`: request bodies are the specs of `atrium-core`,
//! built from flags or read from a file; only printing sees the wire format.

pub mod audit;
pub mod cluster;
pub mod collection;
pub mod credential;
pub mod database;
pub mod deploy;
pub mod exec;
pub mod image;
pub mod key;
pub mod logs;
pub mod model;
pub mod node;
pub mod quota;
pub mod site;
pub mod tenant;
pub mod volume;
pub mod workload;

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use atrium_api::{CreateRequest, ListResponse, Resource};
use atrium_client::{Api, ControlPlane};
use clap::{Args, Subcommand};
use serde::de::{DeserializeOwned, IntoDeserializer};
use serde::Serialize;

use crate::client::{self, Columns, Output};

/// What every client command runs with.
pub struct Ctx {
    pub cp: ControlPlane,
    pub output: Output,
    /// Where the local agent keeps replica logs (`atrium logs`).
    pub data_dir: PathBuf,
}

impl Ctx {
    /// Prints an answer as JSON, or as a table of `columns`.
    pub fn show(&self, answer: &impl Serialize, columns: Columns) -> Result<()> {
        let value = serde_json::to_value(answer).context("rendering the answer")?;
        client::print(&value, self.output, columns);
        Ok(())
    }
}

/// One object, by id or name.
#[derive(Args)]
pub struct Lookup {
    /// Id or name
    pub ident: String,
    /// Tenant a name belongs to (provider admin)
    #[arg(long)]
    pub tenant: Option<String>,
}

impl Lookup {
    pub fn api<R: Resource>(&self, cp: &ControlPlane) -> Api<R> {
        Api::of_tenant(cp, self.tenant.as_deref())
    }
}

#[derive(Args)]
pub struct ListArgs {
    /// Only this tenant's objects (provider admin)
    #[arg(long)]
    tenant: Option<String>,
    /// Stream changes instead of listing (newline-delimited JSON)
    #[arg(long)]
    watch: bool,
    /// With --watch: changes after this revision
    #[arg(long)]
    since: Option<i64>,
}

/// List, get and delete: the same for every resource.
#[derive(Subcommand)]
pub enum ReadCmd {
    List(ListArgs),
    Get(Lookup),
    Delete(Lookup),
}

#[derive(Args)]
pub struct FromFile {
    /// Create from a JSON file holding {"name", "tenant"?, "spec"} ("-": stdin)
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
}

/// `list`, `get` and `delete` of kind `R`.
pub async fn read<R: Resource>(ctx: &Ctx, columns: Columns, cmd: &ReadCmd) -> Result<()> {
    match cmd {
        ReadCmd::List(args) if args.watch => watch::<R>(ctx, args).await,
        ReadCmd::List(args) => {
            let (items, revision) = Api::<R>::of_tenant(&ctx.cp, args.tenant.as_deref())
                .list()
                .await?;
            let list = ListResponse {
                items,
                revision,
                next_page_token: None,
            };
            ctx.show(&list, columns)
        }
        ReadCmd::Get(l) => ctx.show(&l.api::<R>(&ctx.cp).get(&l.ident).await?, columns),
        ReadCmd::Delete(l) => ctx.show(&l.api::<R>(&ctx.cp).delete(&l.ident).await?, columns),
    }
}

/// Prints each change of kind `R` as the control plane streams it.
#[allow(clippy::print_stdout)]
async fn watch<R: Resource>(ctx: &Ctx, args: &ListArgs) -> Result<()> {
    let mut query = vec!["watch=true".to_string()];
    if let Some(t) = &args.tenant {
        query.push(format!("tenant={}", client::encode(t)));
    }
    if let Some(s) = args.since {
        query.push(format!("since={s}"));
    }
    let path = format!("/v1/{}?{}", R::PLURAL, query.join("&"));
    ctx.cp
        .stream_lines(&path, |line| println!("{}", String::from_utf8_lossy(line)))
        .await?;
    Ok(())
}

/// Creates an object of kind `R`: from `-f FILE`, or named `name` with the
/// spec `spec` builds from flags.
pub async fn create<R: Resource>(
    ctx: &Ctx,
    columns: Columns,
    from: &FromFile,
    name: Option<String>,
    tenant: Option<String>,
    spec: impl FnOnce() -> Result<R::Spec>,
) -> Result<()> {
    let request = match &from.file {
        Some(path) => read_request::<R>(path)?,
        None => CreateRequest {
            name: name.ok_or_else(|| anyhow!("give a NAME, or -f FILE"))?,
            tenant,
            spec: spec()?,
        },
    };
    let api = Api::<R>::of_tenant(&ctx.cp, request.tenant.as_deref());
    ctx.show(&api.create(&request.name, &request.spec).await?, columns)
}

/// A create request from a JSON file (`-`: stdin), checked against `R`'s
/// spec here, with the path of the field at fault.
fn read_request<R: Resource>(path: &std::path::Path) -> Result<CreateRequest<R::Spec>> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        anyhow!(
            "{}: not a {} to create: {} at {}",
            path.display(),
            R::KIND,
            e.inner(),
            e.path()
        )
    })
}

/// A call to one of the tenant APIs with shapes of their own
/// (`/v1/collections`, `/v1/databases`): `path` under `/v1/<api>`, each
/// segment encoded.
pub async fn tenant_api(
    ctx: &Ctx,
    method: reqwest::Method,
    segments: &[&str],
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let path: Vec<String> = segments.iter().map(|s| client::encode(s)).collect();
    let body = body
        .map(|b| serde_json::to_vec(&b).map(bytes::Bytes::from))
        .transpose()
        .context("encoding the request")?;
    Ok(ctx
        .cp
        .call_raw(method, &format!("/v1/{}", path.join("/")), body)
        .await?)
}

/// A list answer (`{"<field>": [...]}`) as the table printer takes it.
pub fn items(mut answer: serde_json::Value, field: &str) -> serde_json::Value {
    serde_json::json!({"items": answer[field].take()})
}

/// A flag naming one of an API enum's values, spelled as the API spells
/// it (`dedicated-gpu`, `safetensors`).
pub fn named<T: DeserializeOwned>(flag: &str, value: &str) -> Result<T> {
    T::deserialize(value.into_deserializer())
        .map_err(|e: serde::de::value::Error| anyhow!("{flag} {value:?}: {e}"))
}
