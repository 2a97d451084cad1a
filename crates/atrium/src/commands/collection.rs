//! `atrium collection`: a tenant's vector collections (`/v1/collections`),
//! with a tenant key. Points and searches with `text` instead of a vector
//! are embedded by the gateway: give `--server` the gateway's URL for them.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use atrium_core::collection::MAX_POINTS_PER_WRITE;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

use super::{items, tenant_api, Ctx};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum CollectionCmd {
    /// A collection, e.g. `atrium collection create docs --dimension 384`
    Create {
        name: String,
        #[arg(long)]
        dimension: u32,
        /// cosine, dot or l2
        #[arg(long, default_value = "cosine")]
        metric: String,
        /// One of the tenant's embedding deployments: points and searches
        /// may then give text (through the gateway)
        #[arg(long)]
        embedding_model: Option<String>,
    },
    List,
    Get {
        name: String,
    },
    /// Deletes the collection and its points
    Delete {
        name: String,
    },
    /// Adds or replaces points from a JSON-lines file ("-": stdin), one
    /// `{"id", "vector" or "text", "payload"}` per line, sent 1,000 at a
    /// time, each batch acknowledged once on disk
    Upsert {
        name: String,
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// The nearest points to `--vector '[0.1, …]'` or `--text '…'`
    Search {
        name: String,
        #[arg(long, conflicts_with = "text")]
        vector: Option<String>,
        #[arg(long)]
        text: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// A Qdrant-shaped filter, as JSON: {"must": [{"key": …, "match": {"value": …}}]}
        #[arg(long)]
        filter: Option<String>,
        #[arg(long)]
        ef: Option<usize>,
    },
    /// How many points the collection holds (that `--filter` accepts)
    Count {
        name: String,
        #[arg(long)]
        filter: Option<String>,
    },
}

const COLLECTION_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("DIMENSION", "/dimension"),
    ("METRIC", "/metric"),
    ("POINTS", "/points"),
    ("EMBEDDING_MODEL", "/embedding_model"),
    ("ID", "/id"),
];
const HIT_COLUMNS: Columns = &[("ID", "/id"), ("SCORE", "/score"), ("PAYLOAD", "/payload")];

fn json_flag(flag: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| anyhow!("{flag}: not JSON: {e}"))
}

pub async fn run(ctx: &Ctx, cmd: CollectionCmd) -> Result<()> {
    let c = "collections";
    match cmd {
        CollectionCmd::Create {
            name,
            dimension,
            metric,
            embedding_model,
        } => {
            let mut body = json!({"name": name, "dimension": dimension, "metric": metric});
            if let Some(m) = embedding_model {
                body["embedding_model"] = json!(m);
            }
            let made = tenant_api(ctx, Method::POST, &[c], Some(body)).await?;
            ctx.show(&made, COLLECTION_COLUMNS)
        }
        CollectionCmd::List => {
            let all = tenant_api(ctx, Method::GET, &[c], None).await?;
            ctx.show(&items(all, c), COLLECTION_COLUMNS)
        }
        CollectionCmd::Get { name } => {
            let one = tenant_api(ctx, Method::GET, &[c, &name], None).await?;
            ctx.show(&one, COLLECTION_COLUMNS)
        }
        CollectionCmd::Delete { name } => {
            let gone = tenant_api(ctx, Method::DELETE, &[c, &name], None).await?;
            ctx.show(&gone, &[("NAME", "/name"), ("DELETED", "/deleted")])
        }
        CollectionCmd::Upsert { name, file } => upsert(ctx, &name, &file).await,
        CollectionCmd::Search {
            name,
            vector,
            text,
            limit,
            filter,
            ef,
        } => {
            let mut body = json!({"limit": limit, "with_payload": true});
            match (vector, text) {
                (Some(v), None) => body["vector"] = json_flag("--vector", &v)?,
                (None, Some(t)) => body["text"] = json!(t),
                _ => bail!("give --vector '[…]' or --text '…'"),
            }
            if let Some(f) = filter {
                body["filter"] = json_flag("--filter", &f)?;
            }
            if let Some(ef) = ef {
                body["ef"] = json!(ef);
            }
            let path = [c, name.as_str(), "points", "search"];
            let found = tenant_api(ctx, Method::POST, &path, Some(body)).await?;
            ctx.show(&items(found, "result"), HIT_COLUMNS)
        }
        CollectionCmd::Count { name, filter } => {
            let body = match filter {
                Some(f) => json!({"filter": json_flag("--filter", &f)?}),
                None => json!({}),
            };
            let path = [c, name.as_str(), "points", "count"];
            let n = tenant_api(ctx, Method::POST, &path, Some(body)).await?;
            ctx.show(&n, &[("COUNT", "/count")])
        }
    }
}

/// Sends the file's points in batches; a bad line stops it before that
/// line's batch is sent, saying which line.
async fn upsert(ctx: &Ctx, name: &str, file: &std::path::Path) -> Result<()> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let path = ["collections", name, "points"];
    let (mut batch, mut sent, mut last) = (Vec::new(), 0usize, Value::Null);
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let point: Value = serde_json::from_str(&line)
            .map_err(|e| anyhow!("{} line {}: not JSON: {e}", file.display(), i + 1))?;
        batch.push(point);
        if batch.len() == MAX_POINTS_PER_WRITE {
            let points = std::mem::take(&mut batch);
            sent += points.len();
            last = tenant_api(ctx, Method::POST, &path, Some(json!({"points": points}))).await?;
        }
    }
    if !batch.is_empty() {
        sent += batch.len();
        last = tenant_api(ctx, Method::POST, &path, Some(json!({"points": batch}))).await?;
    }
    if sent == 0 {
        bail!("{} holds no points", file.display());
    }
    let done = json!({"collection": name, "upserted": sent, "points": last["points"]});
    ctx.show(
        &done,
        &[
            ("COLLECTION", "/collection"),
            ("UPSERTED", "/upserted"),
            ("POINTS", "/points"),
        ],
    )
}
