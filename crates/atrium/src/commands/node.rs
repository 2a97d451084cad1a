//! `atrium node`: machines, what runs on each, and (on the node itself)
//! joining and checking its sandboxes.

#![allow(clippy::print_stdout)]

use anyhow::{anyhow, Result};
use atrium_api::{Node, Object, Placement};
use atrium_client::Api;
use atrium_core::lifecycle::LifecycleState;
use atrium_core::node::{Gpu, NodeCapacity, NodeSpec, NodeState};
use atrium_core::quantity::{ByteSize, CpuMillis};
use clap::Subcommand;
use serde::Serialize;

use super::{create, read, Ctx, FromFile, Lookup, ReadCmd};
use crate::client::{self, Columns, Output};
use crate::planes::PlaneCmd;

#[derive(Subcommand)]
pub enum NodeCmd {
    Create {
        name: Option<String>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        cpu: Option<CpuMillis>,
        #[arg(long)]
        memory: Option<ByteSize>,
        #[arg(long)]
        disk: Option<ByteSize>,
        /// GPUs as COUNTxMODEL:MEMORY, e.g. 8xH100-80GB:80Gi
        #[arg(long)]
        gpus: Option<String>,
        /// NVLink domain shared by the GPUs
        #[arg(long)]
        nvlink_domain: Option<String>,
        /// The GPUs can be MIG-partitioned
        #[arg(long)]
        mig: bool,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Plane(PlaneCmd),
    /// Check this node's workload sandboxes: what the kernel reports of
    /// each engine, and attacks between tenants (run as root on the node)
    Isolation {
        /// The tenant network block of the node's agent
        #[arg(long, default_value = crate::planes_run::DEFAULT_TENANT_NETWORK)]
        tenant_network: String,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

pub const NODE_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("SITE", "/spec/site"),
    ("CPU", "/spec/capacity/cpu"),
    ("MEMORY", "/spec/capacity/memory"),
    ("STATE", "/spec/state"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::Create {
            name,
            site,
            cpu,
            memory,
            disk,
            gpus,
            nvlink_domain,
            mig,
            from,
        } => {
            create::<Node>(ctx, NODE_COLUMNS, &from, name, None, || {
                Ok(NodeSpec {
                    site: site.ok_or_else(|| anyhow!("--site is required"))?,
                    capacity: NodeCapacity {
                        cpu: cpu.ok_or_else(|| anyhow!("--cpu is required (e.g. 64)"))?,
                        memory: memory
                            .ok_or_else(|| anyhow!("--memory is required (e.g. 512Gi)"))?,
                        disk: disk.unwrap_or_default(),
                    },
                    gpus: match gpus {
                        Some(g) => parse_gpus(&g, nvlink_domain.as_deref(), mig)?,
                        None => Vec::new(),
                    },
                    labels: Default::default(),
                    state: NodeState::Ready,
                    overlay: None,
                })
            })
            .await
        }
        NodeCmd::Isolation { .. } | NodeCmd::Plane(_) => {
            Err(anyhow!("this node command runs without a control plane"))
        }
        NodeCmd::Read(ReadCmd::Get(l)) => get(ctx, &l).await,
        NodeCmd::Read(c) => read::<Node>(ctx, NODE_COLUMNS, &c).await,
    }
}

/// `COUNTxMODEL:MEMORY` as that many GPUs.
fn parse_gpus(spec: &str, nvlink_domain: Option<&str>, mig: bool) -> Result<Vec<Gpu>> {
    let usage = || anyhow!("--gpus: use COUNTxMODEL:MEMORY, e.g. 8xH100-80GB:80Gi");
    let (count, rest) = spec.split_once('x').ok_or_else(usage)?;
    let (model, memory) = rest.split_once(':').ok_or_else(usage)?;
    let count: u32 = count
        .parse()
        .map_err(|_| anyhow!("--gpus: {count:?} is not a count"))?;
    let memory: ByteSize = memory
        .parse()
        .map_err(|e| anyhow!("--gpus: memory {memory:?}: {e}"))?;
    Ok((0..count)
        .map(|index| Gpu {
            index,
            uuid: None,
            model: model.to_string(),
            memory,
            mig_capable: mig,
            nvlink_domain: nvlink_domain.map(str::to_string),
            rail: None,
        })
        .collect())
}

/// A replica on the node, as `node get` shows it.
#[derive(Serialize)]
struct Workload {
    placement: String,
    tenant: Option<String>,
    deployment: String,
    replica: u32,
    state: Option<LifecycleState>,
    pid: Option<u32>,
    endpoint: Option<String>,
    isolation: Option<String>,
}

impl Workload {
    fn of(p: &Object<Placement>) -> Workload {
        let status = p.status.as_ref();
        Workload {
            placement: p.id.clone(),
            tenant: p.tenant.clone(),
            deployment: p.spec.deployment_name.clone(),
            replica: p.spec.replica,
            state: status.map(|s| s.state),
            pid: status.and_then(|s| s.pid),
            endpoint: status.and_then(|s| s.endpoint.clone()),
            isolation: status.and_then(|s| s.isolation.clone()),
        }
    }
}

#[derive(Serialize)]
struct NodeView {
    #[serde(flatten)]
    node: Object<Node>,
    workloads: Vec<Workload>,
}

/// A node, with the workloads placed on it and the isolation its agent
/// reports for each.
async fn get(ctx: &Ctx, lookup: &Lookup) -> Result<()> {
    let node = lookup.api::<Node>(&ctx.cp).get(&lookup.ident).await?;
    let (placements, _) = Api::<Placement>::all(&ctx.cp).list().await?;
    let workloads: Vec<Workload> = placements
        .iter()
        .filter(|p| p.spec.node == node.name)
        .map(Workload::of)
        .collect();
    match ctx.output {
        Output::Json => ctx.show(&NodeView { node, workloads }, NODE_COLUMNS),
        Output::Table => {
            ctx.show(&node, NODE_COLUMNS)?;
            let rows = serde_json::to_value(&workloads)?;
            let rows = rows.as_array().cloned().unwrap_or_default();
            println!(
                "\nWORKLOADS\n{}",
                client::render_table(
                    &rows,
                    &[
                        ("PLACEMENT", "/placement"),
                        ("TENANT", "/tenant"),
                        ("DEPLOYMENT", "/deployment"),
                        ("STATE", "/state"),
                        ("PID", "/pid"),
                        ("ISOLATION", "/isolation"),
                    ],
                )
            );
            Ok(())
        }
    }
}
