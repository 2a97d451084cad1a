//! `atrium up` with simulated engines and simulated GPUs, one at a time,
//! for the tests that go through its gateway.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, terminate, BIN};

/// One `atrium up` at a time: each names its tenant networks, cgroups and
/// firewall table after the same address block, as `atrium up` does.
static ONE_UP: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Up {
    pub child: std::process::Child,
    pub server: String,
    pub gateway: String,
    pub token: String,
    /// What the gateway's `/metrics` requires.
    pub metrics_token: String,
    pub http: reqwest::blocking::Client,
    /// Released after `drop` has stopped the process.
    _one_up: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Up {
    fn drop(&mut self) {
        terminate(self.child.id());
        let _ = self.child.wait();
    }
}

impl Up {
    pub fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        super::admin_call(&self.http, &self.server, &self.token, method, path, body)
    }

    /// A new tenant (with `spec`) and the secret of an inference key of it.
    pub fn tenant_with_key(&self, tenant: &str, spec: Value) -> String {
        let m = reqwest::Method::POST;
        self.admin(
            m.clone(),
            "/v1/tenants",
            serde_json::json!({"name": tenant, "spec": spec}),
        );
        let key = self.admin(
            m,
            "/v1/keys",
            serde_json::json!({"name": "k", "tenant": tenant, "spec": {"scopes": ["inference"]}}),
        );
        key["secret"].as_str().unwrap().to_string()
    }

    /// `method path` at `base` (the server or the gateway) with `key`:
    /// the status and the body, as JSON when it is.
    pub fn request(
        &self,
        base: &str,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{base}{path}"))
            .bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `request` at the control plane.
    pub fn api(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request(&self.server, key, method, path, body)
    }

    pub fn call(&self, key: &str, path: &str, body: Value) -> (u16, Value, Option<String>) {
        let resp = self
            .http
            .post(format!("{}{path}", self.gateway))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        let replica = resp
            .headers()
            .get("x-atrium-replica")
            .map(|v| v.to_str().unwrap().to_string());
        (status, resp.json().unwrap(), replica)
    }
}

pub fn start() -> (Up, tempfile::TempDir) {
    start_with(&[])
}

pub fn start_with(extra: &[&str]) -> (Up, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (start_in(dir.path(), extra), dir)
}

/// `atrium up` on an existing data directory (a restart keeps its state).
pub fn start_in(data_dir: &std::path::Path, extra: &[&str]) -> Up {
    let one_up = ONE_UP
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (sp, gp) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args([
            "up",
            "--log",
            "warn",
            "--node",
            "sim-node",
            "--simulate-gpus",
            "8xH100-80GB",
            // The external endpoint below is a replica in up's tenant
            // network: the provider opens that range to tenants' upstreams.
            "--external-allow",
            "10.201.0.0/16",
        ])
        .args(extra)
        .args([
            "--listen",
            &format!("127.0.0.1:{sp}"),
            "--gateway-listen",
            &format!("127.0.0.1:{gp}"),
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Up {
        child,
        server: format!("http://127.0.0.1:{sp}"),
        gateway: format!("http://127.0.0.1:{gp}"),
        token: super::written(&data_dir.join("admin.token"), "atrium up did not start"),
        metrics_token: String::new(),
        http: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        _one_up: one_up,
    };
    // The node appears once the agent has registered it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = up
            .http
            .get(format!("{}/v1/nodes/sim-node", up.server))
            .bearer_auth(&up.token)
            .send();
        if r.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not register its node"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    up.metrics_token = super::metrics_token(data_dir);
    up
}

pub fn wait_running(up: &Up, tenant: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = up.admin(
            reqwest::Method::GET,
            &format!("/v1/deployments/{name}?tenant={tenant}"),
            Value::Null,
        );
        if d["status"]["state"] == "running" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not running: {}",
            d["status"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
