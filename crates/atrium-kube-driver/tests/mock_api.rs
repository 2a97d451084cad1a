//! The driver against a recording stand-in for the Kubernetes API server
//! (no kube-apiserver can run here): the exact requests kube-rs sends for
//! a pass — paths, methods, patch content type, field manager, label
//! selectors, watch parameters — and what it does with the answers
//! (`testing::FakeApi`).
#![allow(clippy::unwrap_used, clippy::panic)]

use atrium_kube_driver::plan::{self, Assigned, Images};
use atrium_kube_driver::testing::FakeApi;
use atrium_kube_driver::Cluster;
use serde_json::{json, Value};

/// A pod of the driver's for placement `id`, as made before.
fn listed_pod(id: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": plan::pod_name(id), "namespace": "atrium-acme",
            "labels": {"app.kubernetes.io/managed-by": "atrium", "atrium.dev/node": "k8s-1"},
            "annotations": {"atrium.dev/placement": id}},
        "spec": {"containers": [{"name": "replica", "ports": [{"containerPort": 8000}]}]},
        "status": {"phase": "Running", "podIP": "10.4.0.7",
            "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn assigned(id: &str, engine: &str) -> Assigned {
    Assigned {
        id: id.into(),
        tenant: "acme".into(),
        spec: serde_json::from_value(json!({"deployment": "dep_1", "deployment_name": "chat",
            "replica": 0, "node": "k8s-1", "engine": engine, "model": "m", "model_source": "",
            "model_task": "chat", "resources": {"cpu": "1", "memory": "1Gi", "gpu": "1"}}))
        .unwrap(),
    }
}

async fn cluster(url: &str) -> Cluster {
    let config = kube::Config::new(url.parse().unwrap());
    Cluster::new(
        kube::Client::try_from(config).unwrap(),
        "k8s-1",
        Images {
            atrium: "atrium:test".into(),
            registry: "registry.local:5000".into(),
        },
    )
}

const SELECTOR: &str =
    "labelSelector=app.kubernetes.io%2Fmanaged-by%3Datrium%2Catrium.dev%2Fnode%3Dk8s-1";

#[tokio::test]
async fn a_pass_applies_server_side_as_atrium_and_deletes_only_its_own_strays() {
    let api = FakeApi::start();
    api.seed_pod(listed_pod("pla_keep"));
    // Another node's pod in the same cluster: not the driver's to delete.
    let mut others = listed_pod("pla_other");
    others["metadata"]["labels"]["atrium.dev/node"] = json!("k8s-2");
    api.seed_pod(others);
    api.seed_pod(listed_pod("pla_gone"));
    let cluster = cluster(&api.url).await;
    let observed = cluster
        .reconcile(&[
            assigned("pla_keep", "simulated"),
            assigned("pla_vllm", "vllm"),
        ])
        .await
        .unwrap();
    let keep = plan::pod_name("pla_keep");
    let gone = plan::pod_name("pla_gone");
    let apply = "?&force=true&fieldManager=atrium";
    let seen = api.seen();
    let requests: Vec<(String, String)> = seen
        .iter()
        .map(|s| (s.method.clone(), s.target.clone()))
        .collect();
    assert_eq!(
        requests,
        [
            ("PATCH".into(), format!("/api/v1/namespaces/atrium-acme{apply}")),
            (
                "PATCH".into(),
                format!("/apis/networking.k8s.io/v1/namespaces/atrium-acme/networkpolicies/atrium-tenant{apply}")
            ),
            (
                "PATCH".into(),
                format!("/api/v1/namespaces/atrium-acme/resourcequotas/atrium-placed{apply}")
            ),
            ("PATCH".into(), format!("/api/v1/namespaces/atrium-acme/pods/{keep}{apply}")),
            ("GET".into(), format!("/api/v1/pods?&{SELECTOR}")),
            ("DELETE".into(), format!("/api/v1/namespaces/atrium-acme/pods/{gone}?")),
        ]
    );
    // Every apply is a server-side apply patch of the whole typed object.
    for s in seen.iter().filter(|s| s.method == "PATCH") {
        assert_eq!(
            s.content_type, "application/apply-patch+yaml",
            "{}",
            s.target
        );
        assert_eq!(
            s.body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "atrium"
        );
    }
    let pod = &seen[3].body;
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    let quota = &seen[2].body["spec"]["hard"];
    assert_eq!(
        quota["pods"], "2",
        "both placements count against the quota"
    );
    // vLLM has no pod here, and says why.
    assert!(observed["pla_keep"].is_ok());
    let why = observed["pla_vllm"].as_ref().unwrap_err();
    assert!(
        why.0.contains("does not run on the kubernetes driver"),
        "{why}"
    );
}

#[tokio::test]
async fn the_pod_watch_asks_for_the_drivers_own_pods_with_bookmarks() {
    let api = FakeApi::start();
    api.seed_pod(listed_pod("pla_keep"));
    api.seed_pod(listed_pod("pla_gone"));
    let cluster = cluster(&api.url).await;
    let mut changed = Vec::new();
    cluster
        .watch("0", |p| changed.push(plan::status_of(&p).endpoint))
        .await
        .unwrap();
    assert_eq!(changed, vec![Some("http://10.4.0.7:8000".to_string()); 2]);
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(
        seen[0].target,
        format!("/api/v1/pods?&watch=true&timeoutSeconds=290&{SELECTOR}&allowWatchBookmarks=true&resourceVersion=0")
    );
}

#[tokio::test]
async fn a_pod_the_cluster_refuses_fails_its_placement_only() {
    let api = FakeApi::start();
    let cluster = cluster(&api.url).await;
    let mut bad = assigned("pla_bad", "container");
    bad.spec.container =
        Some(serde_json::from_value(json!({"image": "acme/refused/app:1"})).unwrap());
    let observed = cluster
        .reconcile(&[bad, assigned("pla_good", "simulated")])
        .await
        .expect("one refused pod fails no pass");
    let why = observed["pla_bad"].as_ref().unwrap_err();
    assert!(
        why.0.contains("422") && why.0.contains("admission webhook denied"),
        "{why}"
    );
    assert!(observed["pla_good"].is_ok());
    let pods = api.state.lock().unwrap().pods.len();
    assert_eq!(pods, 1, "the good pod runs");
}
