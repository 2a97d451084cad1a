//! The placement controller on a real server: residency, capacity,
//! isolation tiers, GPU slots (NVLink, MIG, dedicated GPUs), status
//! roll-up, scaling down and deletion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use atrium_store::testing::TestBackend;
use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

fn deployment(name: &str, tenant: &str, cpu: &str, min: u32) -> Value {
    json!({"name": name, "tenant": tenant, "spec": {
        "model": "m", "engine": "embedded", "resources": {"cpu": cpu, "memory": "1Gi"},
        "replicas": {"min": min, "max": min}}})
}

async fn node(s: &TestServer, name: &str, site: &str, cpu: &str) {
    s.admin(
        Method::POST,
        "/v1/nodes",
        json!({"name": name, "spec": {"site": site, "capacity": {"cpu": cpu, "memory": "64Gi"}}}),
    )
    .await;
}

/// Creates a deployment and waits until all its replicas are placed.
async fn deploy_placed(
    s: &TestServer,
    name: &str,
    tenant: &str,
    cpu: &str,
    min: u32,
) -> Vec<(String, String)> {
    s.admin(
        Method::POST,
        "/v1/deployments",
        deployment(name, tenant, cpu, min),
    )
    .await;
    eventually(&format!("{name} placed"), async || {
        let p = placements(s, name).await;
        (p.len() == min as usize).then_some(p)
    })
    .await
}

/// Placements of a deployment: (replica name, node).
async fn placements(s: &TestServer, deployment: &str) -> Vec<(String, String)> {
    gpu_slots(s, deployment)
        .await
        .into_iter()
        .map(|(name, node, _)| (name, node))
        .collect()
}

async fn eventually<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_within_residency_capacity_and_isolation() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("eu", "EU").await;
    s.create_site("us", "US").await;
    node(&s, "a-eu", "eu", "4").await;
    node(&s, "b-us", "us", "64").await;
    s.create_model(None, "m").await;
    s.create_tenant(
        "euro",
        json!({"residency": {"policy": "only", "jurisdictions": ["EU"]}}),
    )
    .await;

    // Two replicas of 2 CPUs fill the only EU node.
    let placed = deploy_placed(&s, "web", "euro", "2", 2).await;
    assert_eq!(
        placed,
        [
            ("web-0".to_string(), "a-eu".to_string()),
            ("web-1".to_string(), "a-eu".to_string())
        ]
    );

    // A third finds no room: the US node is outside the tenant's residency.
    s.admin(
        Method::POST,
        "/v1/deployments",
        deployment("more", "euro", "2", 1),
    )
    .await;
    let status = eventually("more pending with a reason", async || {
        let d = s
            .admin(Method::GET, "/v1/deployments/more?tenant=euro", Value::Null)
            .await;
        d["status"]["reason"]
            .as_str()
            .filter(|r| r.contains("no node fits"))
            .map(|_| d["status"].clone())
    })
    .await;
    assert_eq!(status["state"], "pending");
    let reason = status["reason"].as_str().unwrap();
    // One node per reason, as kube-scheduler counts them.
    assert!(
        reason.contains("1 × outside the tenant's residency"),
        "{reason}"
    );
    assert!(
        reason.contains("1 × not enough free CPU or memory"),
        "{reason}"
    );
    assert!(placements(&s, "more").await.is_empty());

    // Scaling web down to one frees room, and more is placed.
    let mut spec = deployment("web", "euro", "2", 1)["spec"].clone();
    spec["replicas"] = json!({"min": 1, "max": 2});
    s.admin(
        Method::PUT,
        "/v1/deployments/web?tenant=euro",
        json!({"spec": spec}),
    )
    .await;
    eventually("web scaled down and more placed", async || {
        let (web, more) = (placements(&s, "web").await, placements(&s, "more").await);
        (web.len() == 1 && more.len() == 1).then_some(())
    })
    .await;

    // The agent's report rolls up into the deployment's status.
    let v = s
        .admin(Method::GET, "/v1/placements?limit=1000", Value::Null)
        .await;
    let replica = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "more-0")
        .unwrap()
        .clone();
    s.admin(
        Method::PUT,
        &format!("/v1/placements/{}/status", replica["id"].as_str().unwrap()),
        json!({"state": "running", "reason": "serving", "endpoint": "http://127.0.0.1:1"}),
    )
    .await;
    eventually("more running", async || {
        let d = s
            .admin(Method::GET, "/v1/deployments/more?tenant=euro", Value::Null)
            .await;
        (d["status"]["state"] == "running" && d["status"]["reason"] == "1/1 replicas ready")
            .then_some(())
    })
    .await;

    // Deleting a deployment removes its replicas.
    s.admin(
        Method::DELETE,
        "/v1/deployments/more?tenant=euro",
        Value::Null,
    )
    .await;
    eventually("more's replicas removed", async || {
        placements(&s, "more").await.is_empty().then_some(())
    })
    .await;
}

/// A deployment's preferred site takes its replicas while it has room;
/// the overflow goes where else it may run, never outside its residency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_sites_are_filled_first_and_spill_over_only_where_allowed() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("core-eu", "EU").await;
    s.create_site("edge-de", "EU").await;
    s.create_site("us", "US").await;
    node(&s, "big-core", "core-eu", "64").await;
    node(&s, "small-edge", "edge-de", "4").await;
    node(&s, "big-us", "us", "64").await;
    s.create_model(None, "m").await;
    s.create_tenant(
        "euro",
        json!({"residency": {"policy": "only", "jurisdictions": ["EU"]}}),
    )
    .await;
    let mut body = deployment("web", "euro", "2", 3);
    body["spec"]["preferred_sites"] = json!(["edge-de"]);
    s.admin(Method::POST, "/v1/deployments", body).await;
    let mut placed = eventually("web placed", async || {
        let p = placements(&s, "web").await;
        (p.len() == 3).then_some(p)
    })
    .await;
    placed.sort();
    let nodes: Vec<&str> = placed.iter().map(|(_, n)| n.as_str()).collect();
    // Two fill the edge (4 CPUs); the third spills to the EU core, never
    // to the larger US node.
    assert_eq!(
        nodes.iter().filter(|n| **n == "small-edge").count(),
        2,
        "{placed:?}"
    );
    assert_eq!(
        nodes.iter().filter(|n| **n == "big-core").count(),
        1,
        "{placed:?}"
    );
}

/// A hostile tenant admin names as preferred a site its residency
/// excludes (allowed by validation when it names no `sites`): the
/// preference cannot move a replica out of its jurisdictions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preferred_site_outside_the_residency_places_nothing_there() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("eu", "EU").await;
    s.create_site("us", "US").await;
    node(&s, "small-eu", "eu", "4").await;
    node(&s, "big-us", "us", "64").await;
    s.create_model(None, "m").await;
    s.create_tenant(
        "euro",
        json!({"residency": {"policy": "only", "jurisdictions": ["EU"]}}),
    )
    .await;
    let mut body = deployment("web", "euro", "2", 3);
    body["spec"]["preferred_sites"] = json!(["us"]);
    s.admin(Method::POST, "/v1/deployments", body).await;
    let placed = eventually("two of web placed", async || {
        let p = placements(&s, "web").await;
        (p.len() == 2).then_some(p)
    })
    .await;
    assert!(placed.iter().all(|(_, n)| n == "small-eu"), "{placed:?}");
    // The third has no room in the EU and waits; it never goes to the US.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let placed = placements(&s, "web").await;
    assert!(placed.iter().all(|(_, n)| n == "small-eu"), "{placed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_node_tenants_never_share_a_node() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("eu", "EU").await;
    node(&s, "n1", "eu", "64").await;
    node(&s, "n2", "eu", "64").await;
    s.create_model(None, "m").await;
    s.create_tenant("solo", json!({"isolation": "dedicated-node"}))
        .await;
    s.create_tenant("crowd", json!({})).await;
    let alone = deploy_placed(&s, "alone", "solo", "1", 1).await;
    assert_eq!(alone[0].1, "n1");
    // The shared tenant skips n1 although it has room.
    let many = deploy_placed(&s, "many", "crowd", "1", 3).await;
    assert!(many.iter().all(|(_, node)| node == "n2"), "{many:?}");
    // And the dedicated tenant's next replica does not join the shared node.
    let second = deploy_placed(&s, "second", "solo", "1", 1).await;
    assert_eq!(second[0].1, "n1");
}

/// GPU slots of a deployment's placements: (replica, node, slots JSON).
async fn gpu_slots(s: &TestServer, deployment: &str) -> Vec<(String, String, Value)> {
    let v = s
        .admin(Method::GET, "/v1/placements?limit=1000", Value::Null)
        .await;
    let mut out: Vec<(String, String, Value)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["deployment_name"] == deployment)
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["spec"]["node"].as_str().unwrap().to_string(),
                p["spec"]["gpus"].clone(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_replicas_get_nvlink_mig_and_dedicated_slots() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("eu", "EU").await;
    // One 8×H100 node, two NVLink domains of four, MIG-capable.
    let gpus: Vec<Value> = (0..8)
        .map(|i| {
            json!({"index": i, "model": "H100-80GB", "memory": "80Gi",
            "mig_capable": true, "nvlink_domain": format!("nv{}", i / 4)})
        })
        .collect();
    s.admin(
        Method::POST,
        "/v1/nodes",
        json!({"name": "gpu-1", "spec": {"site": "eu",
            "capacity": {"cpu": "192", "memory": "1024Gi"}, "gpus": gpus}}),
    )
    .await;
    s.create_model(None, "m").await;
    s.create_tenant("lab", json!({})).await;
    s.create_tenant("vault", json!({"isolation": "dedicated-gpu"}))
        .await;
    let gpu_deployment = |name: &str, tenant: &str, gpu: &str| {
        json!({"name": name, "tenant": tenant, "spec": {
            "model": "m", "engine": "embedded",
            "resources": {"cpu": "4", "memory": "8Gi", "gpu": gpu},
            "replicas": {"min": 1, "max": 1}}})
    };
    let placed = async |name: &str| {
        eventually(name, async || {
            let p = gpu_slots(&s, name).await;
            (p.len() == 1).then(|| p[0].2.clone())
        })
        .await
    };
    // One GPU, then four: the four stay within one NVLink domain.
    s.admin(
        Method::POST,
        "/v1/deployments",
        gpu_deployment("one", "lab", "1"),
    )
    .await;
    let one = placed("one").await;
    s.admin(
        Method::POST,
        "/v1/deployments",
        gpu_deployment("four", "lab", "4"),
    )
    .await;
    let four = placed("four").await;
    let domain = |g: &Value| g["gpu"].as_u64().unwrap() / 4;
    let four_gpus = four.as_array().unwrap();
    assert_eq!(four_gpus.len(), 4, "{four}");
    assert!(
        four_gpus.iter().all(|g| domain(g) == domain(&four_gpus[0])),
        "across NVLink domains: {four}"
    );
    assert!(
        four_gpus.iter().all(|g| g["gpu"] != one[0]["gpu"]),
        "a GPU given twice: {one} {four}"
    );
    // A MIG instance lands at a valid start on a GPU of its own.
    s.admin(
        Method::POST,
        "/v1/deployments",
        gpu_deployment("mig", "lab", "3g.40gb"),
    )
    .await;
    let mig = placed("mig").await;
    assert!(
        [0, 4].contains(&mig[0]["mig_start"].as_u64().unwrap()),
        "3g only at 0 or 4: {mig}"
    );
    // Half a GPU for the shared tenant, then half for the dedicated-gpu
    // tenant: never on the same GPU.
    s.admin(
        Method::POST,
        "/v1/deployments",
        gpu_deployment("half", "lab", "0.5"),
    )
    .await;
    let half = placed("half").await;
    assert_eq!(half[0]["share_milli"], 500, "{half}");
    s.admin(
        Method::POST,
        "/v1/deployments",
        gpu_deployment("secret", "vault", "0.5"),
    )
    .await;
    let secret = placed("secret").await;
    assert_ne!(secret[0]["gpu"], half[0]["gpu"], "a dedicated GPU shared");
    assert_ne!(secret[0]["gpu"], mig[0]["gpu"], "a dedicated GPU shared");
    // Everything held survives the next passes unchanged (restored, not
    // re-placed).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gpu_slots(&s, "four").await[0].2, four);
    assert_eq!(gpu_slots(&s, "secret").await[0].2, secret);
}

/// Placements of a deployment with their ids and states, sorted by name.
async fn replicas(s: &TestServer, deployment: &str) -> Vec<Value> {
    let v = s
        .admin(Method::GET, "/v1/placements?limit=1000", Value::Null)
        .await;
    let mut out: Vec<Value> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["deployment_name"] == deployment)
        .cloned()
        .collect();
    out.sort_by_key(|p| p["name"].as_str().unwrap().to_string());
    out
}

async fn report_running(s: &TestServer, placement: &Value) {
    s.admin(
        Method::PUT,
        &format!(
            "/v1/placements/{}/status",
            placement["id"].as_str().unwrap()
        ),
        json!({"state": "running", "reason": "serving", "endpoint": "http://127.0.0.1:1"}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_spec_rolls_its_replicas_new_first() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("eu", "EU").await;
    let gpus: Vec<Value> = (0..2)
        .map(|i| json!({"index": i, "model": "H100-80GB", "memory": "80Gi"}))
        .collect();
    s.admin(
        Method::POST,
        "/v1/nodes",
        json!({"name": "g", "spec": {"site": "eu", "capacity": {"cpu": "64", "memory": "256Gi"}, "gpus": gpus}}),
    )
    .await;
    s.create_model(None, "m").await;
    s.create_tenant("roomy", json!({})).await;
    s.create_tenant("tight", json!({"quota": {"gpus": "1"}}))
        .await;
    let spec = |gpu: Option<&str>, memory: &str| {
        let mut r = json!({"cpu": "1", "memory": memory});
        if let Some(g) = gpu {
            r["gpu"] = json!(g);
        }
        json!({"model": "m", "engine": "embedded", "resources": r, "replicas": {"min": 1, "max": 1}})
    };

    // Room beside the old replica: the new one is placed first, and the
    // old goes only once the new one runs.
    s.admin(
        Method::POST,
        "/v1/deployments",
        json!({"name": "web", "tenant": "roomy", "spec": spec(Some("1"), "1Gi")}),
    )
    .await;
    let old = eventually("web placed", async || {
        let r = replicas(&s, "web").await;
        (r.len() == 1).then(|| r[0].clone())
    })
    .await;
    report_running(&s, &old).await;
    s.admin(
        Method::PUT,
        "/v1/deployments/web?tenant=roomy",
        json!({"spec": spec(None, "2Gi")}),
    )
    .await;
    let both = eventually("a successor placed beside the old replica", async || {
        let r = replicas(&s, "web").await;
        (r.len() == 2).then_some(r)
    })
    .await;
    let new = both.iter().find(|p| p["id"] != old["id"]).unwrap().clone();
    assert_eq!(new["spec"]["resources"]["memory"], "2Gi");
    assert!(new["spec"]["gpus"].is_null(), "{new}");
    assert!(new["name"].as_str().unwrap().starts_with("web-0-"), "{new}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(replicas(&s, "web").await.len(), 2, "the old one waits");
    report_running(&s, &new).await;
    eventually("the old replica removed", async || {
        let r = replicas(&s, "web").await;
        (r.len() == 1 && r[0]["id"] == new["id"]).then_some(())
    })
    .await;

    // A tenant at its quota has no room for a second GPU replica: the old
    // one is replaced in place rather than the change stuck.
    s.admin(
        Method::POST,
        "/v1/deployments",
        json!({"name": "gpu", "tenant": "tight", "spec": spec(Some("1"), "1Gi")}),
    )
    .await;
    let old = eventually("gpu placed", async || {
        let r = replicas(&s, "gpu").await;
        (r.len() == 1).then(|| r[0].clone())
    })
    .await;
    report_running(&s, &old).await;
    s.admin(
        Method::PUT,
        "/v1/deployments/gpu?tenant=tight",
        json!({"spec": spec(Some("1"), "2Gi")}),
    )
    .await;
    eventually("gpu replaced in place", async || {
        let r = replicas(&s, "gpu").await;
        (r.len() == 1 && r[0]["id"] != old["id"] && r[0]["spec"]["resources"]["memory"] == "2Gi")
            .then_some(())
    })
    .await;
}
