//! A control plane with one root agent, started for the workload and
//! volume tests: tenants, keys, images pushed with skopeo, the CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};

use super::{admin_call, admin_token, free_port, spawn_server_at, stop, BIN};

pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub host: String,
    pub admin: String,
    pub http: Client,
    pub server: Child,
    pub agent: Option<Child>,
    pub octet: u8,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(agent) = &mut self.agent {
            stop(agent);
        }
        stop(&mut self.server);
    }
}

impl Cloud {
    pub fn start(octet: u8) -> Cloud {
        Cloud::start_with(octet, &[])
    }

    /// A cloud whose control plane gets `extra` flags (`--tls-listen …`).
    pub fn start_with(octet: u8, extra: &[&str]) -> Cloud {
        Cloud::start_at("127.0.0.1", octet, extra)
    }

    /// A cloud whose control plane listens on `ip`.
    pub fn start_at(ip: &str, octet: u8, extra: &[&str]) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = spawn_server_at(ip, &dir.path().join("server"), port, extra);
        let url = format!("http://{ip}:{port}");
        let admin = admin_token(&dir.path().join("server"));
        let http = Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let cloud = Cloud {
            dir,
            url,
            host: format!("{ip}:{port}"),
            admin,
            http,
            server,
            agent: None,
            octet,
        };
        cloud.call(
            Method::POST,
            "/v1/sites",
            json!({"name": "local", "spec": {"kind": "edge", "jurisdiction": "LOCAL"}}),
        );
        cloud
    }

    pub fn call(&self, method: Method, path: &str, body: Value) -> Value {
        admin_call(&self.http, &self.url, &self.admin, method, path, body)
    }

    pub fn tenant(&self, name: &str) -> String {
        self.call(
            Method::POST,
            "/v1/tenants",
            json!({"name": name, "spec": {}}),
        );
        let key = self.call(
            Method::POST,
            "/v1/keys",
            json!({"name": "k", "tenant": name, "spec": {"scopes": ["admin"]}}),
        );
        key["secret"].as_str().unwrap().to_string()
    }

    pub fn start_agent(&mut self, gpus: &str) {
        let token = super::join_token(&self.url, &self.admin, "node", "n1");
        let agent = Command::new(BIN)
            .args(["agent", "--simulate-gpus", gpus, "--log", "warn"])
            .args(["--tenant-network", &format!("10.{}.0.0/16", self.octet)])
            .args(["--server", &self.url, "--join-token", &token])
            .arg("--data-dir")
            .arg(self.dir.path().join("agent"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.agent = Some(agent);
    }

    /// Runs the CLI with `key`; whether it succeeded, and what it printed.
    pub fn cli(&self, args: &[&str], key: &str) -> (bool, String) {
        // The connection flags go before `--`, after which come the
        // container's own arguments.
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let out = Command::new(BIN)
            .args(&args[..split])
            .args(["--server", &self.url, "--token", key])
            .args(&args[split..])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn workload(&self, tenant: &str, name: &str) -> Value {
        self.call(
            Method::GET,
            &format!("/v1/workloads/{name}?tenant={tenant}"),
            Value::Null,
        )
    }

    pub fn placements(&self, tenant: &str) -> Vec<Value> {
        let list = self.call(
            Method::GET,
            &format!("/v1/placements?tenant={tenant}"),
            Value::Null,
        );
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// The status a GET of `path` on the registry gets with the agent's
    /// own node credential.
    pub fn node_get(&self, path: &str) -> u16 {
        self.node_call(Method::GET, path)
    }

    pub fn node_call(&self, method: Method, path: &str) -> u16 {
        let file = self.dir.path().join("agent/node.credential");
        let credential: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        let token = credential["token"].as_str().unwrap();
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    }

    pub fn push(&self, layout: &Path, image: &str, key: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--dest-creds"])
            .arg(format!("anyone:{key}"))
            .arg(format!("oci:{}:1", layout.display()))
            .arg(format!("docker://{}/{image}", self.host))
            .output()
            .expect("skopeo (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn require_root_and_runc() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t0\t")),
        "workloads run under runc as root: run the tests as root"
    );
    let runc = Command::new("runc").arg("--version").output();
    assert!(
        runc.is_ok_and(|o| o.status.success()),
        "runc is not installed: scripts/test.sh installs it (apt-get install runc)"
    );
}

/// The processes in a replica's memory cgroup.
pub fn container_pids(octet: u8, placement: &str) -> Vec<u32> {
    let procs = PathBuf::from(format!(
        "/sys/fs/cgroup/memory/atrium-{octet}/{placement}/cgroup.procs"
    ));
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let resp = Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .get(format!("http://{addr}{path}"))
        .send()
        .ok()?;
    resp.status()
        .is_success()
        .then(|| resp.text().unwrap_or_default())
}

/// The status and body of an admin request (for the refusals).
pub fn admin_call_status(cloud: &Cloud, method: Method, path: &str, body: Value) -> (u16, String) {
    let resp = cloud
        .http
        .request(method, format!("{}{path}", cloud.url))
        .bearer_auth(&cloud.admin)
        .json(&body)
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.text().unwrap_or_default())
}
