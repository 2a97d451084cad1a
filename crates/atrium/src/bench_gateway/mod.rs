//! `atrium bench gateway`: what a proxy hop costs, side by side in one run,
//! with one upstream (the simulated engine, zero latency), one load
//! generator (`wrk`) and one pinning for every row:
//!
//! - `direct`: the load generator against the upstream;
//! - `nginx`: a plain keep-alive reverse proxy, the floor for one hop;
//! - `atrium`: Atrium's gateway with authentication, limits (all four, set
//!   high so none refuses), tenant-salted routing and metering on, behind a
//!   real control plane;
//! - `litellm`: LiteLLM's proxy, offline (local cost map, no telemetry, a
//!   master key, no database).
//!
//! With two or more cores the proxies and the upstream run on core 0, the
//! load generator (and Atrium's control plane, as SCHED_IDLE, which receives
//! the usage batches) on core 1. Per row: latency p50/p99 at concurrency 1
//! (non-streaming, small bodies; the median of five runs, the rows taking
//! turns), the most requests/s at
//! any tried concurrency whose p99 stays within 10 ms, and the time to the
//! first streamed byte. The bench plays the node agent: it starts the
//! engine itself and reports it running, so nothing but the engine sits
//! behind the proxies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::client::Output;

mod load;
pub(crate) mod peers;

use load::{latency_rounds, measure, Target};
use peers::{
    atrium_tenant, find_litellm, free_port, litellm_config, nginx_config, pinned,
    start_control_plane, wait_http, wait_routed, Children, TempDir,
};

/// The p99 a throughput point must keep to count.
const P99_BOUND_US: f64 = 10_000.0;
/// Connections tried for throughput.
const CONCURRENCY: [u32; 5] = [1, 4, 16, 32, 64];
/// Concurrency-1 latency runs per row (interleaved; the median is kept).
const LATENCY_ROUNDS: usize = 5;
/// Streamed requests per row for the time to first byte.
const TTFT_SAMPLES: usize = 200;
const MODEL: &str = "bench";
const LITELLM_KEY: &str = "sk-atrium-bench";
/// The bench gateway's `/metrics` token.
const METRICS_TOKEN: &str = "atrium-bench-metrics";

pub struct Args {
    pub seconds: u64,
    pub litellm: Option<PathBuf>,
    pub out: PathBuf,
    pub output: Output,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    /// Concurrency 1, non-streaming: the median of five interleaved runs.
    p50_us: f64,
    p99_us: f64,
    /// The concurrency-1 rounds the medians come from.
    round_p50_us: Vec<f64>,
    round_p99_us: Vec<f64>,
    /// Most requests/s with p99 ≤ 10 ms (0 when no concurrency kept it).
    max_rps: f64,
    /// Concurrency that gave `max_rps`.
    max_rps_connections: u32,
    /// Best requests/s at any concurrency, bound or not.
    peak_rps: f64,
    ttft_p50_us: f64,
    ttft_p99_us: f64,
    /// Responses that were not 2xx, or socket errors, over all runs.
    errors: u64,
    /// Atrium only: the gateway's own mean of `x-atrium-overhead-us` (time
    /// in the gateway, upstream excluded) over the concurrency-1 run.
    #[serde(skip_serializing_if = "Option::is_none")]
    self_reported_overhead_us: Option<f64>,
    /// CPU time per request of each process behind this row, in the run
    /// that gave `peak_rps` (µs; the proxy and upstream share one core).
    cpu_us_per_request: BTreeMap<String, f64>,
}

/// `bench-gateway.json`: one entry per row (`null` for a peer that did not
/// run), and the summary.
#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    rows: BTreeMap<&'a str, &'a Option<Row>>,
    summary: Summary,
}

#[derive(Serialize)]
struct Summary {
    cores: usize,
    proxy_core: Option<usize>,
    load_core: Option<usize>,
    seconds_per_run: u64,
    p99_bound_us: f64,
    litellm_note: Option<String>,
    #[serde(flatten)]
    compared: Option<Compared>,
}

/// Atrium's and nginx's hops beside the direct row.
#[derive(Clone, Serialize)]
struct Compared {
    atrium_added_p50_us: f64,
    atrium_added_p99_us: f64,
    atrium_added_ttft_us: f64,
    nginx_added_p50_us: f64,
    atrium_rps_vs_nginx: f64,
}

pub async fn run(args: Args) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the atrium binary")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (proxy_core, load_core) = if cores >= 2 {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    let dir = TempDir(crate::bench::tempfile_dir()?.join("gateway"));
    std::fs::create_dir_all(dir.path())?;
    let mut children = Children(Vec::new());

    // The upstream: the simulated engine, no latency, no admission limits.
    let engine_port = free_port()?;
    let engine_url = format!("http://127.0.0.1:{engine_port}");
    let mut engine = pinned(proxy_core, &exe)
        .args([
            "engine",
            "--kind",
            "simulated",
            "--name",
            MODEL,
            "--log",
            "warn",
        ])
        .args(["--listen", &format!("127.0.0.1:{engine_port}")])
        .args(["--max-queue", "100000", "--sim-max-concurrent", "100000"])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the simulated engine")?;
    wait_http(
        &format!("{engine_url}/healthz"),
        &mut engine,
        "engine",
        Duration::from_secs(20),
    )
    .await?;
    let engine_pid = engine.id();
    children.0.push(engine);

    // Atrium: control plane and gateway.
    // The control plane is another machine's work in production: it runs
    // beside the load generator, off the proxy core, as SCHED_IDLE (it
    // only gets the CPU the load generator leaves, and gives it back the
    // moment the load generator wakes). At nice 10 its SQLite writes still
    // ran for up to 3 ms at a time while wrk waited to read an answer,
    // which showed up as atrium's p99. Its CPU per request is reported.
    let mut launcher = pinned(load_core, Path::new("chrt"));
    launcher.args(["--idle", "0"]).arg(&exe);
    let (server_url, server_pid, cp) =
        start_control_plane(launcher, &dir.path().join("server"), &mut children).await?;
    let key = atrium_tenant(&cp, &engine_url).await?;
    let gateway_port = free_port()?;
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    let join = crate::planes::join_token(
        &cp,
        atrium_core::plane::Plane::Gateway,
        "bench",
        "local",
        3600,
        1,
    )
    .await?;
    let mut gateway = pinned(proxy_core, &exe)
        .args([
            "gateway",
            "--log",
            "warn",
            "--listen",
            &format!("127.0.0.1:{gateway_port}"),
        ])
        .args(["--server", &server_url, "--metrics-token", METRICS_TOKEN])
        .args(["--join-token", &join.secret])
        .arg("--data-dir")
        .arg(dir.path().join("gateway"))
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the gateway")?;
    wait_http(
        &format!("{gateway_url}/readyz"),
        &mut gateway,
        "gateway",
        Duration::from_secs(20),
    )
    .await?;
    let gateway_pid = gateway.id();
    children.0.push(gateway);
    wait_routed(&gateway_url, &key).await?;

    // nginx.
    let nginx_port = free_port()?;
    let conf = nginx_config(dir.path(), nginx_port, &engine_url)?;
    let mut nginx = pinned(proxy_core, Path::new("nginx"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start nginx (apt-get install nginx)")?;
    let nginx_url = format!("http://127.0.0.1:{nginx_port}");
    wait_http(
        &format!("{nginx_url}/healthz"),
        &mut nginx,
        "nginx",
        Duration::from_secs(20),
    )
    .await?;
    let nginx_pid = nginx.id();
    children.0.push(nginx);

    // LiteLLM, if installed: started before anything is measured, so its
    // latency rounds interleave with the others'.
    let mut litellm_note = None;
    let mut litellm_url = None;
    let mut litellm_pid = 0;
    match find_litellm(args.litellm) {
        Some(bin) => {
            let port = free_port()?;
            let conf = litellm_config(dir.path(), &engine_url)?;
            let mut litellm = pinned(proxy_core, &bin)
                .arg("--config")
                .arg(&conf)
                .args([
                    "--port",
                    &port.to_string(),
                    "--host",
                    "127.0.0.1",
                    "--num_workers",
                    "1",
                ])
                .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                .env("LITELLM_TELEMETRY", "False")
                .env("LITELLM_LOG", "ERROR")
                .env("DISABLE_SCHEMA_UPDATE", "True")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("litellm.log"))?)
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            let url = format!("http://127.0.0.1:{port}");
            let started = wait_http(
                &format!("{url}/health/liveliness"),
                &mut litellm,
                "litellm",
                Duration::from_secs(180),
            )
            .await;
            litellm_pid = litellm.id();
            children.0.push(litellm);
            match started {
                Ok(()) => litellm_url = Some(url),
                Err(e) => {
                    let log =
                        std::fs::read_to_string(dir.path().join("litellm.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    litellm_note = Some(format!("litellm did not start: {e}; log tail: {tail:?}"));
                }
            }
        }
        None => {
            litellm_note = Some(
                "litellm not found: pip install 'litellm[proxy]==1.108.0' (or pass --litellm PATH)"
                    .into(),
            );
        }
    }

    let mut targets = vec![
        Target {
            name: "direct",
            base: &engine_url,
            key: "none",
            metrics_token: None,
            processes: vec![("engine", engine_pid)],
        },
        Target {
            name: "nginx",
            base: &nginx_url,
            key: "none",
            metrics_token: None,
            processes: vec![("nginx", nginx_pid), ("engine", engine_pid)],
        },
        Target {
            name: "atrium",
            base: &gateway_url,
            key: &key,
            metrics_token: Some(METRICS_TOKEN),
            processes: vec![
                ("gateway", gateway_pid),
                ("control_plane", server_pid),
                ("engine", engine_pid),
            ],
        },
    ];
    if let Some(url) = &litellm_url {
        targets.push(Target {
            name: "litellm",
            base: url,
            key: LITELLM_KEY,
            metrics_token: None,
            processes: vec![("litellm", litellm_pid), ("engine", engine_pid)],
        });
    }
    eprintln!("measuring (load generator and control plane (SCHED_IDLE) on core {load_core:?}, proxies and upstream on core {proxy_core:?}):");
    let latency = latency_rounds(&targets, dir.path(), load_core, args.seconds).await?;
    let mut rows: Vec<(&str, Option<Row>)> = Vec::new();
    for t in &targets {
        let l = latency
            .get(t.name)
            .cloned()
            .ok_or_else(|| anyhow!("no latency for {}", t.name))?;
        rows.push((
            t.name,
            Some(measure(t, l, dir.path(), load_core, args.seconds).await?),
        ));
    }
    if litellm_url.is_none() {
        rows.push(("litellm", None));
    }
    drop(children);

    let row = |name: &str| {
        rows.iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, r)| r.clone())
    };
    let (direct, nginx, atrium) = (row("direct"), row("nginx"), row("atrium"));
    let added = |r: &Row, d: &Row| {
        (
            r.p50_us - d.p50_us,
            r.p99_us - d.p99_us,
            r.ttft_p50_us - d.ttft_p50_us,
        )
    };
    let compared = match (&direct, &nginx, &atrium) {
        (Some(d), Some(n), Some(a)) => {
            let (p50, p99, ttft) = added(a, d);
            Some(Compared {
                atrium_added_p50_us: p50,
                atrium_added_p99_us: p99,
                atrium_added_ttft_us: ttft,
                nginx_added_p50_us: n.p50_us - d.p50_us,
                atrium_rps_vs_nginx: if n.max_rps > 0.0 {
                    a.max_rps / n.max_rps
                } else {
                    0.0
                },
            })
        }
        _ => None,
    };
    let doc = Report {
        rows: rows.iter().map(|(name, row)| (*name, row)).collect(),
        summary: Summary {
            cores,
            proxy_core,
            load_core,
            seconds_per_run: args.seconds,
            p99_bound_us: P99_BOUND_US,
            litellm_note: litellm_note.clone(),
            compared: compared.clone(),
        },
    };
    if crate::bench::write_results(&args.out, &doc, args.output)? {
        println!(
            "{:<8} {:>9} {:>9} {:>10} {:>10} {:>11} {:>11} {:>11} {:>7}",
            "row",
            "p50 µs",
            "p99 µs",
            "+p50 µs",
            "+p99 µs",
            "max rps",
            "(conns)",
            "ttft p50 µs",
            "errors"
        );
        for (name, row) in &rows {
            match row {
                Some(r) => {
                    let (a50, a99) = direct
                        .as_ref()
                        .map_or((0.0, 0.0), |d| (r.p50_us - d.p50_us, r.p99_us - d.p99_us));
                    println!(
                            "{name:<8} {:>9.0} {:>9.0} {a50:>10.0} {a99:>10.0} {:>11.0} {:>11} {:>11.0} {:>7}",
                            r.p50_us, r.p99_us, r.max_rps, r.max_rps_connections, r.ttft_p50_us, r.errors
                        );
                }
                None => println!("{name:<8} (not measured)"),
            }
        }
        // One line per measured row, under a title.
        let per_row = |title: &str, line: &dyn Fn(&Row) -> String| {
            println!("\n{title}:");
            for (name, row) in &rows {
                if let Some(r) = row {
                    println!("  {name:<8} {}", line(r));
                }
            }
        };
        per_row(
            "concurrency-1 rounds (the medians above come from these), p50 / p99 µs",
            &|r| {
                let rounds: Vec<String> = r
                    .round_p50_us
                    .iter()
                    .zip(&r.round_p99_us)
                    .map(|(a, b)| format!("{a:.0}/{b:.0}"))
                    .collect();
                rounds.join("  ")
            },
        );
        per_row(
            "CPU µs per request at peak throughput (one core shared)",
            &|r| {
                let parts: Vec<String> = r
                    .cpu_us_per_request
                    .iter()
                    .map(|(p, us)| format!("{p} {us:.1}"))
                    .collect();
                parts.join(", ")
            },
        );
        if let Some(us) = atrium.as_ref().and_then(|a| a.self_reported_overhead_us) {
            println!("atrium's own x-atrium-overhead-us at concurrency 1: mean {us:.1} µs");
        }
        if let Some(note) = &litellm_note {
            println!("note: {note}");
        }
        if let Some(c) = &compared {
            println!(
                    "atrium adds {:.0} µs at p50, {:.0} µs at p99, {:.0} µs to the first streamed byte; max throughput {:.0}% of nginx's",
                    c.atrium_added_p50_us,
                    c.atrium_added_p99_us,
                    c.atrium_added_ttft_us,
                    c.atrium_rps_vs_nginx * 100.0
                );
        }
        println!("\nwrote {}", args.out.display());
    }
    Ok(())
}
