//! `atrium site`: where nodes are, and under which jurisdiction.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use atrium_api::{Gateway, Placement, Site};
use atrium_client::Api;
use atrium_core::lifecycle::LifecycleState;
use atrium_core::site::SiteSpec;
use clap::Subcommand;
use serde_json::{json, Value};

use super::{create, named, read, Ctx, FromFile, ReadCmd};
use crate::client::{render_table, Columns, Output};

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
    /// Sites, their gateways, the round trips the gateways measured
    /// between sites, and where each tenant's replicas run
    Topology,
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
        SiteCmd::Topology => topology(ctx).await,
        SiteCmd::Read(c) => read::<Site>(ctx, SITE_COLUMNS, &c).await,
    }
}

const GATEWAY_COLUMNS: Columns = &[
    ("SITE", "/site"),
    ("JURISDICTION", "/jurisdiction"),
    ("GATEWAY", "/gateway"),
    ("PEER-ADDRESS", "/peer_address"),
    ("IN-FLIGHT", "/in_flight"),
    ("REPORTED", "/reported_at"),
];

const LINK_COLUMNS: Columns = &[
    ("FROM", "/from"),
    ("TO", "/to"),
    ("VIA", "/gateway"),
    ("RTT-MS", "/rtt_ms"),
    ("HEALTHY", "/healthy"),
    ("READY-DEPLOYMENTS", "/ready"),
];

const REPLICA_COLUMNS: Columns = &[
    ("TENANT", "/tenant"),
    ("DEPLOYMENT", "/deployment"),
    ("SITE", "/site"),
    ("JURISDICTION", "/jurisdiction"),
    ("RUNNING", "/running"),
    ("REPLICAS", "/replicas"),
];

/// The fleet's shape: one table of sites and gateways, one of measured
/// links, one of replicas per (tenant, deployment, site).
#[allow(clippy::print_stdout)]
async fn topology(ctx: &Ctx) -> Result<()> {
    let (sites, _) = Api::<Site>::all(&ctx.cp).list().await?;
    let (gateways, _) = Api::<Gateway>::all(&ctx.cp).list().await?;
    let (placements, _) = Api::<Placement>::all(&ctx.cp).list().await?;
    let jurisdiction: BTreeMap<&str, &str> = sites
        .iter()
        .map(|s| (s.name.as_str(), s.spec.jurisdiction.as_str()))
        .collect();
    let of = |site: &str| jurisdiction.get(site).copied().unwrap_or("?");
    let mut rows: Vec<Value> = gateways
        .iter()
        .map(|g| {
            json!({"site": g.spec.site, "jurisdiction": of(&g.spec.site), "gateway": g.name,
                   "peer_address": g.spec.peer_address, "in_flight": g.spec.in_flight,
                   "reported_at": g.spec.reported_at})
        })
        .collect();
    // A site no gateway serves yet is listed too: requests cannot enter
    // or be forwarded there.
    for s in &sites {
        if !gateways.iter().any(|g| g.spec.site == s.name) {
            rows.push(json!({"site": s.name, "jurisdiction": s.spec.jurisdiction}));
        }
    }
    let links: Vec<Value> = gateways
        .iter()
        .flat_map(|g| {
            g.spec.peers.iter().map(move |p| {
                json!({"from": g.spec.site, "to": p.site, "gateway": p.gateway,
                       "rtt_ms": format!("{:.2}", p.rtt_us as f64 / 1000.0),
                       "healthy": p.healthy, "ready": p.ready})
            })
        })
        .collect();
    let mut counts: BTreeMap<(String, String, String), (u64, u64)> = BTreeMap::new();
    for p in placements.iter().filter(|p| p.spec.container.is_none()) {
        let key = (
            p.tenant.clone().unwrap_or_default(),
            p.spec.deployment_name.clone(),
            p.spec.site.clone(),
        );
        let running = p
            .status
            .as_ref()
            .is_some_and(|s| s.state == LifecycleState::Running);
        let c = counts.entry(key).or_default();
        c.0 += u64::from(running);
        c.1 += 1;
    }
    let replicas: Vec<Value> = counts
        .into_iter()
        .map(|((tenant, deployment, site), (running, all))| {
            json!({"tenant": tenant, "deployment": deployment, "jurisdiction": of(&site),
                   "site": site, "running": running, "replicas": all})
        })
        .collect();
    match ctx.output {
        Output::Json => ctx.show(
            &json!({"sites": rows, "links": links, "replicas": replicas}),
            &[],
        ),
        Output::Table => {
            println!("{}\n", render_table(&rows, GATEWAY_COLUMNS));
            println!("{}\n", render_table(&links, LINK_COLUMNS));
            println!("{}", render_table(&replicas, REPLICA_COLUMNS));
            Ok(())
        }
    }
}
