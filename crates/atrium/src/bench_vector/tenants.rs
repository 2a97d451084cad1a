//! `atrium bench vector-tenants`: many tenants, one small collection each,
//! in one control plane (its own process): its resident memory as they are
//! made and after every collection has been searched once (most of them
//! paged out by then, at most `MAX_OPEN` in memory), and search latency
//! for a collection in memory (warm) and one read back from disk (cold).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use atrium_api::{CreatedKey, Key, Tenant};
use atrium_client::{Api, ControlPlane};
use atrium_core::key::{KeySpec, Scope};
use atrium_core::limits::RequestLimits;
use atrium_core::tenant::TenantSpec;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::bench_gateway::peers::{start_control_plane, Children, TempDir};
use crate::bench_kube::rss_kib;
use crate::bench_workloads::percentile;
use crate::client::Output;

#[derive(clap::Args)]
pub struct Args {
    /// Tenants, each with one collection
    #[arg(long, default_value_t = 10_000)]
    tenants: u32,
    /// Points in each collection
    #[arg(long, default_value_t = 100)]
    points: u32,
    /// Their dimension (MiniLM's 384 by default)
    #[arg(long, default_value_t = 384)]
    dimension: u32,
    #[arg(long, default_value = "bench-vector-tenants.json")]
    out: PathBuf,
}

/// Requests in flight while loading and sweeping.
const IN_FLIGHT: usize = 8;

fn vectors(seed: u64, n: u32, dim: u32) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect()
}

async fn call(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    path: &str,
    body: Value,
) -> Result<Value> {
    let resp = http
        .post(format!("{url}{path}"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(anyhow!("{path}: {status} {answer}"));
    }
    Ok(answer)
}

/// Tenant `i`, its key, its collection and its points.
async fn tenant(
    cp: &ControlPlane,
    http: &reqwest::Client,
    url: &str,
    i: u32,
    a: &Args,
) -> Result<String> {
    let name = format!("t{i}");
    Api::<Tenant>::all(cp)
        .create(&name, &TenantSpec::default())
        .await?;
    let spec = KeySpec::new(vec![Scope::Inference], None, RequestLimits::default());
    let key: CreatedKey = Api::<Key>::of_tenant(cp, Some(&name))
        .create_as("k", &spec)
        .await?;
    let made = json!({"name": "docs", "dimension": a.dimension, "metric": "cosine"});
    call(http, url, &key.secret, "/v1/collections", made).await?;
    let points: Vec<Value> = vectors(u64::from(i), a.points, a.dimension)
        .into_iter()
        .enumerate()
        .map(|(j, v)| json!({"id": j, "vector": v, "payload": {"doc": j}}))
        .collect();
    call(
        http,
        url,
        &key.secret,
        "/v1/collections/docs/points",
        json!({"points": points}),
    )
    .await?;
    Ok(key.secret)
}

/// Searches each `(tenant, key)` once; the latencies, in seconds.
async fn sweep(
    http: &reqwest::Client,
    url: &str,
    keys: &[(u32, String)],
    dim: u32,
) -> Result<Vec<f64>> {
    let jobs = futures::stream::iter(keys.iter()).map(|(i, key)| async move {
        let query = vectors(u64::from(*i) + 1_000_000, 1, dim).remove(0);
        let started = Instant::now();
        let found = call(
            http,
            url,
            key,
            "/v1/collections/docs/points/search",
            json!({"vector": query, "limit": 10}),
        )
        .await?;
        if found["result"].as_array().map_or(0, Vec::len) != 10 {
            return Err(anyhow!("tenant t{i}: a search found {found}"));
        }
        Ok(started.elapsed().as_secs_f64())
    });
    jobs.buffer_unordered(IN_FLIGHT)
        .collect::<Vec<Result<f64>>>()
        .await
        .into_iter()
        .collect()
}

fn open_collections(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("atrium_vector_collections_open "))
        .and_then(|n| n.trim().parse().ok())
}

pub async fn run(a: Args, output: Output) -> Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("atrium-bench-vt-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;
    let mut children = Children(Vec::new());
    let exe = std::env::current_exe()?;
    let (url, pid, cp) = start_control_plane(
        Command::new(&exe),
        &dir.path().join("server"),
        &mut children,
    )
    .await?;
    let http = reqwest::Client::new();
    let base_kib = rss_kib(pid)?;
    let started = Instant::now();
    let (mut keys, mut peak_after_load) = (Vec::with_capacity(a.tenants as usize), 0u64);
    let made = futures::stream::iter(0..a.tenants)
        .map(|i| {
            let (cp, http, url, a) = (&cp, &http, url.as_str(), &a);
            async move { tenant(cp, http, url, i, a).await.map(|k| (i, k)) }
        })
        .buffer_unordered(IN_FLIGHT);
    futures::pin_mut!(made);
    while let Some(made) = made.next().await {
        keys.push(made?);
        if keys.len() % 1000 == 0 {
            peak_after_load = peak_after_load.max(rss_kib(pid)?);
            eprintln!(
                "{} tenants, {:.0} s",
                keys.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let load_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_load_kib = rss_kib(pid)?;
    let metrics = String::from_utf8_lossy(&cp.get_bytes("/metrics").await?).to_string();
    let open_after_load = open_collections(&metrics);
    keys.sort();
    // Cold: in tenant order, leaving out the last loaded (the ones still in
    // memory), every collection searched is read back from disk.
    let split = keys.len().saturating_sub(2_000).max(1);
    let cold = sweep(&http, &url, &keys[..split], a.dimension).await?;
    let after_sweep_kib = rss_kib(pid)?;
    // Warm: the last 500 searched are still in memory.
    let warm = sweep(
        &http,
        &url,
        &keys[split.saturating_sub(500)..split],
        a.dimension,
    )
    .await?;
    let metrics = String::from_utf8_lossy(&cp.get_bytes("/metrics").await?).to_string();
    let open_after_sweep = open_collections(&metrics);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mib = |k: u64| k as f64 / 1024.0;
    let ms = |x: f64| x * 1000.0;
    let doc = json!({
        "tenants": a.tenants, "points_each": a.points, "dimension": a.dimension,
        "max_open_collections": atrium_server::VECTOR_MAX_OPEN,
        "rss_mib": {"empty": mib(base_kib), "after_load": mib(after_load_kib),
            "after_search_sweep": mib(after_sweep_kib), "peak": mib(hwm_kib.max(peak_after_load))},
        "kib_per_tenant_after_sweep": (after_sweep_kib.saturating_sub(base_kib)) as f64 / f64::from(a.tenants.max(1)),
        "open_collections": {"after_load": open_after_load, "after_sweep": open_after_sweep},
        "load_s": load_s, "tenants_per_s": f64::from(a.tenants) / load_s,
        "search_ms": {"cold_p50": ms(percentile(&cold, 0.5)), "cold_p99": ms(percentile(&cold, 0.99)),
            "warm_p50": ms(percentile(&warm, 0.5)), "warm_p99": ms(percentile(&warm, 0.99))},
    });
    std::fs::write(&a.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Table => {
            println!(
                "{} tenants x {} points x {} dims, one control plane",
                a.tenants, a.points, a.dimension
            );
            println!("RSS MiB: empty {:.0}, after load {:.0}, after searching every collection {:.0}, peak {:.0}",
                mib(base_kib), mib(after_load_kib), mib(after_sweep_kib), mib(hwm_kib.max(peak_after_load)));
            println!("collections in memory: {open_after_load:?} after load, {open_after_sweep:?} after the sweep");
            println!(
                "load: {load_s:.0} s ({:.0} tenants/s)",
                f64::from(a.tenants) / load_s
            );
            println!(
                "search ms: cold p50 {:.2} p99 {:.2}; warm p50 {:.2} p99 {:.2}",
                ms(percentile(&cold, 0.5)),
                ms(percentile(&cold, 0.99)),
                ms(percentile(&warm, 0.5)),
                ms(percentile(&warm, 0.99))
            );
            println!("wrote {}", a.out.display());
        }
    }
    Ok(())
}
