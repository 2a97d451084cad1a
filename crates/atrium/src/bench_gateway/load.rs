//! Load and what it measures: wrk runs and their parsed output, the
//! interleaved concurrency-1 latency rounds, throughput within the p99
//! bound, time to the first streamed byte, and the CPU a process used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bench::ChatRequest;
use anyhow::{bail, Context, Result};
use futures::StreamExt;

use super::peers::pinned;
use super::{Row, CONCURRENCY, LATENCY_ROUNDS, MODEL, P99_BOUND_US, TTFT_SAMPLES};

/// CPU time (user + system) a process has used, in µs.
pub(super) fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 1e6 / 100.0)
}

pub(super) struct WrkResult {
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    pub(super) rps: f64,
    pub(super) errors: u64,
}

/// `1.23ms` → 1230.0 (µs).
pub(super) fn wrk_duration_us(s: &str) -> Option<f64> {
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

pub(super) fn parse_wrk(text: &str) -> Result<WrkResult> {
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

pub(super) fn wrk(
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
pub(super) async fn overhead_histogram(
    base: &str,
    metrics_token: Option<&str>,
) -> Option<(f64, f64)> {
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

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Times to the first streamed byte, sequentially.
pub(super) async fn ttft(url: &str, key: &str) -> Result<(f64, f64, u64)> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let body = ChatRequest::user(MODEL, "Say something short.", 16, true);
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

pub(super) fn wrk_script(dir: &Path, name: &str, key: &str) -> Result<PathBuf> {
    let body = serde_json::to_string(&ChatRequest::user(
        MODEL,
        "Hello, how are you today?",
        4,
        false,
    ))?;
    let script = format!(
        "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\n"
    );
    let path = dir.join(format!("{name}.lua"));
    std::fs::write(&path, script)?;
    Ok(path)
}

/// What one row is measured against: where to send, with which key, and
/// which processes do the work.
pub(super) struct Target<'a> {
    pub(super) name: &'a str,
    pub(super) base: &'a str,
    pub(super) key: &'a str,
    /// What its `/metrics` requires, where it serves Atrium's.
    pub(super) metrics_token: Option<&'a str>,
    pub(super) processes: Vec<(&'static str, u32)>,
}

/// Concurrency-1 latency of one row: medians over the rounds.
#[derive(Debug, Clone)]
pub(super) struct Latency {
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    /// Every round's, in order: how noisy the machine was.
    pub(super) round_p50_us: Vec<f64>,
    pub(super) round_p99_us: Vec<f64>,
    pub(super) errors: u64,
    pub(super) self_reported_overhead_us: Option<f64>,
}

/// Rounds of concurrency-1 runs, every row once per round in turn, so a
/// noisy moment of the shared machine hits one round of every row rather
/// than all of one row; each row keeps the median of its rounds.
pub(super) async fn latency_rounds(
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

pub(super) async fn measure(
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
