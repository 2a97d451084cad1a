//! `atrium logs`: the logs of a deployment's or workload's replicas that
//! run on this machine, as its agent writes them
//! (`<data-dir>/logs/<placement>.log`; a container's stdout and stderr).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;

use anyhow::{bail, Result};
use atrium_api::{Deployment, Placement, Workload};
use atrium_client::Api;

use super::Ctx;

pub async fn run(ctx: &Ctx, deployment: &str, tenant: Option<&str>, follow: bool) -> Result<()> {
    // A deployment of that name, else a workload.
    let (id, owner) = match Api::<Deployment>::of_tenant(&ctx.cp, tenant)
        .get(deployment)
        .await
    {
        Ok(d) => (d.id, d.tenant),
        Err(e) if e.status() == Some(404) => {
            let w = Api::<Workload>::of_tenant(&ctx.cp, tenant)
                .get(deployment)
                .await?;
            (w.id, w.tenant)
        }
        Err(e) => return Err(e.into()),
    };
    let (placements, _) = Api::<Placement>::of_tenant(&ctx.cp, owner.as_deref())
        .list()
        .await?;
    let files: Vec<(String, PathBuf)> = placements
        .iter()
        .filter(|p| p.spec.deployment == id)
        .map(|p| {
            let log = ctx.data_dir.join("logs").join(format!("{}.log", p.id));
            (p.name.clone(), log)
        })
        .collect();
    if files.is_empty() {
        bail!("{deployment} has no replicas");
    }
    let mut offsets = vec![0u64; files.len()];
    loop {
        for ((name, file), offset) in files.iter().zip(offsets.iter_mut()) {
            let Ok(bytes) = std::fs::read(file) else {
                if *offset == 0 && !follow {
                    eprintln!("{name}: no log on this machine ({})", file.display());
                }
                continue;
            };
            let start = (*offset as usize).min(bytes.len());
            for line in String::from_utf8_lossy(&bytes[start..]).lines() {
                println!("[{name}] {line}");
            }
            *offset = bytes.len() as u64;
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
