//! `atrium exec WORKLOAD -- CMD…`: runs a command in a running container
//! of a workload, through the agent of the node it runs on, and prints its
//! output; exits with the command's exit code.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Duration;

use anyhow::{bail, Result};
use atrium_api::{Exec, Object};
use atrium_client::{encode, Api};
use atrium_core::exec::ExecRequest;
use reqwest::Method;

use super::Ctx;

/// Runs the exec and returns the command's exit code.
pub async fn run(
    ctx: &Ctx,
    workload: &str,
    tenant: Option<&str>,
    request: ExecRequest,
) -> Result<i32> {
    let mut path = format!("/v1/workloads/{}/exec", encode(workload));
    if let Some(t) = tenant {
        path.push_str(&format!("?tenant={}", encode(t)));
    }
    let wait = Duration::from_secs(u64::from(request.timeout_seconds) + 30);
    let exec: Object<Exec> = ctx.cp.request(Method::POST, &path, Some(&request)).await?;
    let api = Api::<Exec>::of_tenant(&ctx.cp, exec.tenant.as_deref());
    let started = std::time::Instant::now();
    let status = loop {
        let now = api.get(&exec.id).await?;
        match now.status {
            Some(s) if s.done() => break s,
            _ if started.elapsed() > wait => {
                let _ = api.delete(&exec.id).await;
                bail!("the node did not run the exec within {}s", wait.as_secs());
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Read: it holds a place in the tenant's count of execs.
    let _ = api.delete(&exec.id).await;
    print!("{}", status.stdout);
    eprint!("{}", status.stderr);
    if status.truncated {
        eprintln!("(output cut at 64 KiB per stream)");
    }
    match status.exit_code {
        Some(code) => Ok(code),
        None => bail!("{}", status.reason),
    }
}
