//! Three `atrium server` processes on a replicated PostgreSQL (Debian's
//! PostgreSQL 15, a primary and a synchronous standby under Patroni with
//! etcd, made by `scripts/patroni.sh`), under four clients creating
//! objects: the controllers move within 2 s of their server's kill -9;
//! the servers follow PostgreSQL's primary when Patroni promotes the
//! standby, without a restart, and every create they acknowledged is
//! there afterwards; a leader paused past its lease (SIGSTOP) and resumed
//! does not act again.
//!
//! Needs root: PostgreSQL runs as the `postgres` user.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method as M;
use serde_json::{json, Value};

mod common;

use common::ha::{deploy, leading, one_node_world, placed};
use common::{admin_call, admin_token, free_port, kill9, spawn_server, wait_for, Proc};

/// Ports of the test cluster (`scripts/patroni.sh`): PostgreSQL on
/// BASE+1/+2, Patroni's REST API on BASE+1001/+1002.
const BASE: u16 = 25440;

/// The Patroni cluster, stopped however the test ends.
struct Cluster {
    dir: PathBuf,
    url: String,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/patroni.sh");
        let out = std::process::Command::new(script)
            .arg("start")
            .env("ATRIUM_PATRONI_DIR", dir)
            .env("ATRIUM_PATRONI_PORT_BASE", BASE.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/patroni.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            dir: dir.to_path_buf(),
            url: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }

    /// The node (1 or 2) Patroni says is the primary now.
    fn primary(&self, http: &reqwest::blocking::Client) -> Option<u16> {
        (1..=2).find(|n| {
            http.get(format!("http://127.0.0.1:{}/primary", BASE + 1000 + n))
                .send()
                .is_ok_and(|r| r.status().is_success())
        })
    }

    /// Kills node `n` as a crashed machine would end: Patroni and its
    /// PostgreSQL, SIGKILL, no shutdown of either.
    fn kill_node(&self, n: u16) {
        let group = std::fs::read_to_string(self.dir.join(format!("node{n}.pid"))).unwrap();
        let postmaster =
            std::fs::read_to_string(self.dir.join(format!("node{n}/data/postmaster.pid"))).unwrap();
        let postmaster = postmaster.lines().next().unwrap().to_string();
        for target in [format!("-{}", group.trim()), postmaster] {
            let ok = std::process::Command::new("kill")
                .args(["-9", "--", &target])
                .status()
                .unwrap();
            assert!(ok.success(), "kill -9 {target}");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/patroni.sh");
        let _ = std::process::Command::new(script)
            .arg("stop")
            .env("ATRIUM_PATRONI_DIR", &self.dir)
            .env("ATRIUM_PATRONI_PORT_BASE", BASE.to_string())
            .status();
    }
}

struct Server {
    proc: Proc,
    url: String,
}

fn start_server(dir: &Path, db: &str) -> Server {
    let port = free_port();
    Server {
        proc: Proc(spawn_server(dir, port, &["--database-url", db])),
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// Four clients creating tenants through whichever server answers, each
/// name until it is acknowledged (201), or found made by an earlier try
/// whose answer was lost (409): every name in `acked` was acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    failed_tries: Arc<Mutex<u64>>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(servers: Vec<String>, token: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed_tries = Arc::new(Mutex::new(0));
        let clients = (0..4)
            .map(|c| {
                let (stop, acked, failed_tries) =
                    (stop.clone(), acked.clone(), failed_tries.clone());
                let (servers, token) = (servers.clone(), token.to_string());
                std::thread::spawn(move || {
                    let http = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(15))
                        .build()
                        .unwrap();
                    let mut next = c;
                    for i in 0.. {
                        let name = format!("load-{c}-{i}");
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            next += 1;
                            let server = &servers[next % servers.len()];
                            let status = http
                                .post(format!("{server}/v1/tenants"))
                                .bearer_auth(&token)
                                .json(&json!({"name": name, "spec": {}}))
                                .send()
                                .map(|r| r.status().as_u16());
                            match status {
                                Ok(201 | 409) => {
                                    acked.lock().unwrap().push(name);
                                    break;
                                }
                                _ => {
                                    *failed_tries.lock().unwrap() += 1;
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acked,
            failed_tries,
            clients,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn finish(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.join().unwrap();
        }
        let failed = *self.failed_tries.lock().unwrap();
        (
            Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap(),
            failed,
        )
    }
}

/// Every tenant's name, read page by page.
fn tenant_names(http: &reqwest::blocking::Client, base: &str, token: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let path = match &page {
            Some(p) => format!("/v1/tenants?limit=500&page_token={p}"),
            None => "/v1/tenants?limit=500".into(),
        };
        let list: Value = admin_call(http, base, token, M::GET, &path, Value::Null);
        for t in list["items"].as_array().unwrap() {
            names.push(t["name"].as_str().unwrap().to_string());
        }
        match list["next_page_token"].as_str() {
            Some(p) => page = Some(p.to_string()),
            None => return names,
        }
    }
}

/// Waits until one of `servers` (by index) leads; returns which and when.
fn wait_leader(http: &reqwest::blocking::Client, servers: &[&Server], secs: u64) -> usize {
    let mut found = None;
    wait_for("a leader", secs, || {
        found = servers.iter().position(|s| leading(http, &s.url));
        found.is_some()
    });
    found.unwrap()
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn servers_ride_out_a_leader_kill_a_postgres_failover_and_a_paused_leader() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "this test runs PostgreSQL under Patroni as the postgres user: run it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&dir.path().join("patroni"));
    assert!(cluster.url.contains(','), "{}", cluster.url);
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();

    let servers: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|n| start_server(&dir.path().join(n), &cluster.url))
        .collect();
    let token = admin_token(&dir.path().join("a"));
    one_node_world(&http, &servers[0].url, &token);
    let all: Vec<&Server> = servers.iter().collect();
    let leader = wait_leader(&http, &all, 10);
    let leaders = all.iter().filter(|s| leading(&http, &s.url)).count();
    assert_eq!(leaders, 1, "two servers lead at once");

    let load = Load::start(servers.iter().map(|s| s.url.clone()).collect(), &token);
    wait_for("the load to be acknowledged", 20, || load.acked() >= 40);

    // 1. The controllers' server dies: another leads within 2 s, and
    // places what is written after.
    let mut servers = servers;
    let mut dead = servers.remove(leader);
    kill9(&mut dead.proc.0);
    let killed = Instant::now();
    let live: Vec<&Server> = servers.iter().collect();
    wait_leader(&http, &live, 10);
    let took = killed.elapsed();
    eprintln!("controllers moved {took:?} after their server's kill -9");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    deploy(&http, &live[0].url, &token, "after-leader-kill");
    wait_for("placed after the leader's kill", 10, || {
        placed(&http, &live[0].url, &token, "after-leader-kill") == 1
    });

    // 2. PostgreSQL's primary dies (Patroni with it). Patroni promotes
    // the synchronous standby; the servers find it by themselves.
    let before = load.acked();
    let primary = cluster.primary(&http).expect("a PostgreSQL primary");
    cluster.kill_node(primary);
    let killed = Instant::now();
    wait_for("Patroni to promote the standby", 60, || {
        cluster.primary(&http).is_some_and(|p| p != primary)
    });
    let promoted = killed.elapsed();
    wait_for("the load to go on after the failover", 60, || {
        load.acked() >= before + 40
    });
    let writing = killed.elapsed();
    for s in &live {
        // Each server, not only one, writes again.
        admin_call(
            &http,
            &s.url,
            &token,
            M::POST,
            "/v1/sites",
            json!({"name": format!("after-failover-{}", s.url.rsplit(':').next().unwrap()),
                   "spec": {"kind": "core", "jurisdiction": "EU"}}),
        );
    }
    eprintln!("PostgreSQL failover: promoted {promoted:?}, writes again {writing:?} after kill -9 of the primary");
    // The admin tools take the cluster's URL too: pg_dump finds the new
    // primary among the hosts itself.
    let backup = dir.path().join("after-failover.dump");
    let out = std::process::Command::new(common::BIN)
        .args(["admin", "backup", "--database-url", &cluster.url, "--to"])
        .arg(&backup)
        .output()
        .unwrap();
    assert!(
        out.status.success() && backup.metadata().unwrap().len() > 0,
        "backup from the promoted primary: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = wait_leader(&http, &live, 10);
    deploy(&http, &live[leader].url, &token, "after-failover");
    wait_for("placed after the failover", 15, || {
        placed(&http, &live[0].url, &token, "after-failover") == 1
    });

    // Every acknowledged create is there.
    let (acked, failed_tries) = load.finish();
    let stored: std::collections::HashSet<String> = tenant_names(&http, &live[0].url, &token)
        .into_iter()
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    eprintln!(
        "{} creates acknowledged, {} tries failed while servers or the primary were down, {} lost",
        acked.len(),
        failed_tries,
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but gone: {lost:?}");

    // 3. A leader paused past its lease (a stalled host) and resumed does
    // not act in its old term: another has led meanwhile, and the
    // resumed one stands down at its next renewal.
    let paused = wait_leader(&http, &live, 10);
    let other = 1 - paused;
    signal(live[paused].proc.0.id(), "-STOP");
    // Within 2 s, unless the pause caught the leader inside a write
    // transaction: then PostgreSQL ends that session after 10 s idle
    // (the store sets idle_in_transaction_session_timeout), and only then
    // can the lease be taken.
    wait_for("the other server to lead", 20, || {
        leading(&http, &live[other].url)
    });
    deploy(&http, &live[other].url, &token, "while-paused");
    wait_for("placed while the leader is paused", 10, || {
        placed(&http, &live[other].url, &token, "while-paused") == 1
    });
    signal(live[paused].proc.0.id(), "-CONT");
    wait_for("the resumed server to stand down", 5, || {
        !leading(&http, &live[paused].url)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(leading(&http, &live[other].url));
    assert!(!leading(&http, &live[paused].url));
    for d in ["after-leader-kill", "after-failover", "while-paused"] {
        assert_eq!(
            placed(&http, &live[other].url, &token, d),
            1,
            "{d} placed once"
        );
    }
}
