//! Workloads through the real binary: an image pushed with skopeo runs as
//! a `service` under runc on a root agent — answering on its port through
//! the tenant's network, as the tenant's uid in the tenant's namespace and
//! cgroup, restarted when killed. Another tenant cannot run it; an image
//! that is not there says ErrImagePull; a deleted workload leaves nothing.
//! A gang `job` starts all its workers or none, each seeing only its GPU,
//! and completes; a job that keeps failing fails at its backoff limit.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::oci::busybox_layout;
use common::{admin_call, admin_token, free_port, spawn_server, stop, wait_for, BIN};
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};

/// The tests' tenant network blocks, apart from the isolation tests' and
/// each other's (they run side by side).
const SERVICE_OCTET: u8 = 236;
const JOB_OCTET: u8 = 237;

struct Cloud {
    dir: tempfile::TempDir,
    url: String,
    host: String,
    admin: String,
    http: Client,
    server: Child,
    agent: Option<Child>,
    octet: u8,
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
    fn start(octet: u8) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = spawn_server(&dir.path().join("server"), port, &[]);
        let url = format!("http://127.0.0.1:{port}");
        let admin = admin_token(&dir.path().join("server"));
        let http = Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let cloud = Cloud {
            dir,
            url,
            host: format!("127.0.0.1:{port}"),
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

    fn call(&self, method: Method, path: &str, body: Value) -> Value {
        admin_call(&self.http, &self.url, &self.admin, method, path, body)
    }

    fn tenant(&self, name: &str) -> String {
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

    fn start_agent(&mut self, gpus: &str) {
        let token = common::join_token(&self.url, &self.admin, "node", "n1");
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
    fn cli(&self, args: &[&str], key: &str) -> (bool, String) {
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

    fn workload(&self, tenant: &str, name: &str) -> Value {
        self.call(
            Method::GET,
            &format!("/v1/workloads/{name}?tenant={tenant}"),
            Value::Null,
        )
    }

    fn placements(&self, tenant: &str) -> Vec<Value> {
        let list = self.call(
            Method::GET,
            &format!("/v1/placements?tenant={tenant}"),
            Value::Null,
        );
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// The status a GET of `path` on the registry gets with the agent's
    /// own node credential.
    fn node_get(&self, path: &str) -> u16 {
        self.node_call(Method::GET, path)
    }

    fn node_call(&self, method: Method, path: &str) -> u16 {
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

    fn push(&self, layout: &Path, image: &str, key: &str) {
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

fn require_root_and_runc() {
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
fn container_pids(octet: u8, placement: &str) -> Vec<u32> {
    let procs = PathBuf::from(format!(
        "/sys/fs/cgroup/memory/atrium-{octet}/{placement}/cgroup.procs"
    ));
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn http_get(addr: &str, path: &str) -> Option<String> {
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

#[test]
fn a_service_runs_its_tenants_image_under_runc_in_the_tenants_sandbox() {
    require_root_and_runc();
    const OCTET: u8 = SERVICE_OCTET;
    let mut cloud = Cloud::start(OCTET);
    let acme = cloud.tenant("acme");
    let globex = cloud.tenant("globex");
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "acme/busybox:1", &acme);
    cloud.push(&build.path().join("oci"), "globex/private:1", &globex);
    cloud.start_agent("2xH100-80GB");
    wait_for("the agent's credential", 30, || {
        cloud.dir.path().join("agent/node.credential").exists()
    });
    // A node pulls only what is placed on it: nothing yet.
    let manifest = "/v2/acme/busybox/manifests/1";
    assert_eq!(
        cloud.node_get(manifest),
        403,
        "a node read an image nothing runs"
    );

    // Another tenant may not name acme's image at all.
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "steal",
            "--image",
            "acme/busybox:1",
            "--",
            "/bin/busybox",
            "true",
        ],
        &globex,
    );
    assert!(!ok && said.contains("spec.image"), "{said}");

    let script = "echo serving as $(/bin/busybox id -u) && \
                  echo hello-from-$(/bin/busybox id -u) > /scratch/index.html && \
                  exec /bin/busybox httpd -f -p 8080 -h /scratch";
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "web",
            "--image",
            "acme/busybox:1",
            "--port",
            "8080",
            "--memory",
            "64Mi",
            "--cpu",
            "0.5",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ],
        &acme,
    );
    assert!(ok, "{said}");
    let mut running = Value::Null;
    wait_for("the service to run", 60, || {
        running = cloud.workload("acme", "web");
        running["status"]["state"] == "running"
    });
    let placement = cloud.placements("acme").into_iter().next().unwrap();
    let status = &placement["status"];
    let isolation = status["isolation"].as_str().unwrap();
    assert!(
        isolation.contains("runtime=runc") && isolation.contains("netns="),
        "{isolation}"
    );
    let addr = status["endpoint"]
        .as_str()
        .unwrap()
        .strip_prefix("tcp://")
        .unwrap()
        .to_string();
    assert!(addr.starts_with(&format!("10.{OCTET}.")), "{addr}");

    // Now that a replica of it is placed there, the node may pull it; still
    // nothing else of any tenant's.
    assert_eq!(cloud.node_get(manifest), 200);
    assert_eq!(cloud.node_get("/v2/globex/private/manifests/1"), 403);
    assert_eq!(cloud.node_get("/v2/acme/busybox/tags/list"), 200);
    let push = cloud.node_call(Method::POST, "/v2/acme/busybox/blobs/uploads/");
    assert_eq!(push, 403, "a node may never push");

    // It answers through the tenant network, as the tenant's uid.
    let page = http_get(&addr, "/index.html").expect("the service answers on its port");
    let id = placement["id"].as_str().unwrap().to_string();
    let pids = container_pids(OCTET, &id);
    assert!(
        !pids.is_empty(),
        "the container runs in the replica's cgroup"
    );
    let uid = uid_of(pids[0]).unwrap();
    assert!(uid >= 2_000_000, "uid {uid} is not a tenant's");
    assert_eq!(page.trim(), format!("hello-from-{uid}"));
    let netns = std::fs::read_link(format!("/proc/{}/ns/net", pids[0])).unwrap();
    assert_ne!(
        netns,
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "not the host's network"
    );
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/atrium-{OCTET}/{id}/memory.limit_in_bytes"
    ))
    .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    // What it printed is in its log, by name.
    let agent_dir = cloud.dir.path().join("agent");
    let (ok, logs) = cloud.cli(
        &["logs", "web", "--data-dir", agent_dir.to_str().unwrap()],
        &acme,
    );
    assert!(ok && logs.contains(&format!("serving as {uid}")), "{logs}");

    // Killed, it is restarted, and answers again.
    for pid in &pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    wait_for("the service to be restarted", 60, || {
        let p = cloud.placements("acme").into_iter().next().unwrap();
        p["status"]["restarts"].as_u64().unwrap_or(0) >= 1
            && p["status"]["state"] == "running"
            && http_get(&addr, "/index.html").is_some()
    });

    // An image that is not there: the reason says so, and nothing hangs.
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "ghost",
            "--image",
            "acme/nothing:1",
            "--",
            "/bin/true",
        ],
        &acme,
    );
    assert!(ok, "{said}");
    wait_for("ErrImagePull", 60, || {
        cloud.placements("acme").iter().any(|p| {
            p["status"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("ErrImagePull"))
        })
    });

    // Deleted, it leaves no process and no cgroup.
    for name in ["web", "ghost"] {
        let (ok, said) = cloud.cli(&["workload", "delete", name], &acme);
        assert!(ok, "{said}");
    }
    wait_for("the replicas to go", 30, || {
        container_pids(OCTET, &id).is_empty()
            && !Path::new(&format!("/sys/fs/cgroup/memory/atrium-{OCTET}/{id}")).exists()
    });
    assert!(pids
        .iter()
        .all(|p| !Path::new(&format!("/proc/{p}")).exists()));

    // Stopped, the agent leaves no cgroup in any hierarchy, runc's included.
    stop(cloud.agent.as_mut().unwrap());
    cloud.agent = None;
    let left: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join(format!("atrium-{OCTET}")))
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

#[test]
fn a_gang_job_starts_all_its_workers_or_none_and_each_sees_only_its_gpu() {
    require_root_and_runc();
    let mut cloud = Cloud::start(JOB_OCTET);
    let acme = cloud.tenant("acme");
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "acme/busybox:1", &acme);
    cloud.start_agent("4xH100-80GB");
    let run = |args: &[&str]| {
        let mut all = vec!["workload", "run"];
        all.extend_from_slice(args);
        let (ok, said) = cloud.cli(&all, &acme);
        assert!(ok, "{said}");
    };
    // One GPU held by a service: three free, the gang of four must wait.
    run(&[
        "hold",
        "--image",
        "acme/busybox:1",
        "--gpu",
        "1",
        "--",
        "/bin/busybox",
        "sleep",
        "3600",
    ]);
    wait_for("the service to run", 60, || {
        cloud.workload("acme", "hold")["status"]["state"] == "running"
    });
    run(&[
        "train",
        "--image",
        "acme/busybox:1",
        "--gpu",
        "1",
        "--cpu",
        "0.25",
        "--job",
        "--completions",
        "4",
        "--gang",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "echo worker $JOB_COMPLETION_INDEX sees $CUDA_VISIBLE_DEVICES",
    ]);
    let mut train = Value::Null;
    wait_for("the gang to wait with a reason", 30, || {
        train = cloud.workload("acme", "train");
        train["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("gang"))
    });
    assert_eq!(train["status"]["state"], "pending", "{train}");
    let workers = |cloud: &Cloud| {
        cloud
            .placements("acme")
            .into_iter()
            .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("train-")))
            .count()
    };
    assert_eq!(workers(&cloud), 0, "no worker starts before all can");

    // The fourth GPU frees: all four start, and the job completes.
    let (ok, said) = cloud.cli(&["workload", "delete", "hold"], &acme);
    assert!(ok, "{said}");
    wait_for("the gang to complete", 90, || {
        train = cloud.workload("acme", "train");
        train["status"]["state"] == "succeeded"
    });
    assert_eq!(workers(&cloud), 4, "finished workers keep their records");
    assert_eq!(train["status"]["reason"], "4/4 completions");
    let agent_dir = cloud.dir.path().join("agent");
    let (ok, logs) = cloud.cli(
        &["logs", "train", "--data-dir", agent_dir.to_str().unwrap()],
        &acme,
    );
    assert!(ok, "{logs}");
    let mut seen: Vec<(String, String)> = logs
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("] worker ")?.1;
            let (index, gpu) = rest.split_once(" sees ")?;
            Some((index.to_string(), gpu.to_string()))
        })
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 4, "{logs}");
    for (i, (index, gpu)) in seen.iter().enumerate() {
        assert_eq!(index, &i.to_string(), "{logs}");
        assert!(
            gpu.starts_with("GPU-") && !gpu.contains(','),
            "one GPU each: {logs}"
        );
    }
    seen.dedup_by(|a, b| a.1 == b.1);
    assert_eq!(seen.len(), 4, "each worker sees its own GPU: {logs}");

    // A job that keeps failing fails at its backoff limit, and says why.
    run(&[
        "flaky",
        "--image",
        "acme/busybox:1",
        "--job",
        "--backoff-limit",
        "1",
        "--",
        "/bin/busybox",
        "false",
    ]);
    let mut flaky = Value::Null;
    wait_for("the job to fail", 60, || {
        flaky = cloud.workload("acme", "flaky");
        flaky["status"]["state"] == "failed"
    });
    let reason = flaky["status"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("0/1 completions") && reason.contains("backoff limit 1"),
        "{reason}"
    );

    // A workload may not outrank its tenant.
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "vip",
            "--image",
            "acme/busybox:1",
            "--priority",
            "5",
            "--",
            "/bin/busybox",
            "true",
        ],
        &acme,
    );
    assert!(!ok && said.contains("spec.priority"), "{said}");

    // A job's spec does not change once created.
    let mut spec = flaky["spec"].clone();
    spec["job"]["backoff_limit"] = json!(3);
    let (status, said) = admin_call_status(
        &cloud,
        Method::PUT,
        "/v1/workloads/flaky?tenant=acme",
        json!({"spec": spec}),
    );
    assert_eq!(status, 400, "{said}");
    assert!(said.contains("create it anew"), "{said}");
}

/// The status and body of an admin request (for the refusals).
fn admin_call_status(cloud: &Cloud, method: Method, path: &str, body: Value) -> (u16, String) {
    let resp = cloud
        .http
        .request(method, format!("{}{path}", cloud.url))
        .bearer_auth(&cloud.admin)
        .json(&body)
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.text().unwrap_or_default())
}
