//! Tenant clusters' services as the tenant's network carries them: each
//! address unique across the tenant's clusters (its pods on a node share
//! one network), and a service route per service — the control plane's to
//! write, its tenant's to read, no other tenant's to see — gone with its
//! service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use atrium_store::testing::TestBackend;
use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

fn service(name: &str) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}})
}

async fn create_service(s: &TestServer, key: &str, cluster: &str, name: &str) -> Value {
    let path = format!("/k8s/{cluster}/api/v1/namespaces/default/services");
    let (status, v) = s
        .call(Method::POST, &path, Some(key), Some(&service(name)))
        .await;
    assert_eq!(status, 201, "{v}");
    v
}

/// The routes `key` sees, once `want` of them are there.
async fn routes(s: &TestServer, key: &str, want: usize) -> Vec<Value> {
    let mut items = Vec::new();
    for _ in 0..100 {
        let (status, v) = s
            .call(Method::GET, "/v1/service-routes", Some(key), None)
            .await;
        assert_eq!(status, 200, "{v}");
        items = v["items"].as_array().unwrap().clone();
        if items.len() == want {
            return items;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("wanted {want} routes, saw {items:?}");
}

#[tokio::test]
async fn services_are_routed_in_their_tenants_network_and_nowhere_else() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    s.create_tenant("globex", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let globex = s.create_key("globex", "k", &["admin"]).await;
    let (dev, prod) = (
        s.create_cluster(&acme, "dev").await,
        s.create_cluster(&acme, "prod").await,
    );
    let theirs = s.create_cluster(&globex, "dev").await;
    let a = create_service(&s, &acme, &dev, "web").await;
    let b = create_service(&s, &acme, &prod, "web").await;
    let c = create_service(&s, &globex, &theirs, "web").await;
    assert_eq!(a["spec"]["clusterIP"], "10.96.0.1");
    assert_eq!(
        b["spec"]["clusterIP"], "10.96.0.2",
        "one tenant's clusters share its network: {b}"
    );
    assert_eq!(
        c["spec"]["clusterIP"], "10.96.0.1",
        "another tenant's is apart"
    );

    // Each service is a route of its tenant's, to no endpoint yet.
    let mine = routes(&s, &acme, 2).await;
    let addresses: Vec<&str> = mine
        .iter()
        .map(|r| r["spec"]["address"].as_str().unwrap())
        .collect();
    assert!(addresses.contains(&"10.96.0.1") && addresses.contains(&"10.96.0.2"));
    let route = mine.iter().find(|r| r["spec"]["cluster"] == dev).unwrap();
    assert_eq!(
        route["spec"]["ports"],
        json!([{"protocol": "tcp", "port": 80, "backends": []}])
    );
    let theirs_seen = routes(&s, &globex, 1).await;
    assert_eq!(theirs_seen[0]["spec"]["cluster"], theirs);
    let (status, _) = s
        .call(
            Method::GET,
            &format!("/v1/service-routes/{}", route["id"].as_str().unwrap()),
            Some(&globex),
            None,
        )
        .await;
    assert_eq!(status, 404, "another tenant's route is not found");

    // Routes are the control plane's: a tenant cannot write one to
    // steer its own (or anyone's) traffic.
    let forged = json!({"name": "mine", "spec": {"cluster": dev, "address": "10.96.0.9",
        "ports": [], "nodes": ["n1"]}});
    let (status, v) = s
        .call(
            Method::POST,
            "/v1/service-routes",
            Some(&acme),
            Some(&forged),
        )
        .await;
    assert!(status == 403 || status == 405, "{status} {v}");

    // A route goes with its service, and with its cluster.
    let path = format!("/k8s/{dev}/api/v1/namespaces/default/services/web");
    let (status, _) = s.call(Method::DELETE, &path, Some(&acme), None).await;
    assert_eq!(status, 200);
    routes(&s, &acme, 1).await;
    let (status, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/clusters/{prod}"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200);
    routes(&s, &acme, 0).await;
}

/// A pass that listed a cluster's services just before the cluster was
/// deleted may write a route after the deletion removed its routes (the
/// race behind this file's flake): such a route, of a cluster that is no
/// more, is swept by the next pass. The stale write is made here straight
/// into the store, as the racing pass would have made it.
#[tokio::test]
async fn a_route_of_a_deleted_cluster_is_swept() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let dev = s.create_cluster(&acme, "dev").await;
    let (status, gone) = s
        .call(
            Method::POST,
            "/v1/clusters",
            Some(&acme),
            Some(&json!({"name": "gone", "spec": {}})),
        )
        .await;
    assert_eq!(status, 201, "{gone}");
    let gone = gone["id"].as_str().unwrap().to_string();
    let (status, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/clusters/{gone}"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let stale = json!({"name": format!("{gone}.default.web"), "tenant": "acme",
        "spec": {"cluster": gone, "address": "10.96.0.7",
                 "ports": [{"protocol": "tcp", "port": 80, "backends": []}], "nodes": ["n1"]}});
    let store = atrium_store::Store::open(&s.database_url).await.unwrap();
    let write = atrium_store::Write::Create {
        kind: "service_route".into(),
        id: "srt_stale00000000000".into(),
        tenant: Some("acme".into()),
        name: stale["name"].as_str().unwrap().into(),
        body: json!({"spec": stale["spec"]}),
    };
    let audit = atrium_store::AuditContext {
        actor: "racing pass".into(),
        role: "system".into(),
        action: "kube.route.write".into(),
        request_id: String::new(),
    };
    store.write::<()>(write, None, audit).await.unwrap();
    // Any pass now: a service elsewhere wakes one.
    create_service(&s, &acme, &dev, "web").await;
    let mut left = Vec::new();
    for _ in 0..100 {
        left = routes(&s, &acme, 1).await;
        if left[0]["spec"]["cluster"] == dev.as_str() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the deleted cluster's route stayed: {left:?}");
}
