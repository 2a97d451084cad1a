//! Tenant clusters' Kubernetes API against a real server: what a hostile
//! tenant might try through it — secrets on disk, watches, replica
//! counts, object floods — and what it gets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use atrium_store::testing::TestBackend;
use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

/// Every byte the control plane keeps on disk (the database, its WAL).
fn disk_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().is_file() {
            all.extend(std::fs::read(entry.path()).unwrap_or_default());
        }
    }
    all
}

#[tokio::test]
async fn a_clusters_secrets_never_reach_the_disk_in_clear() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let base = format!("/k8s/{id}/api/v1/namespaces/default");
    // "correct-horse-battery" in base64, and a config map's value in clear.
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
        "stringData": {"password": "correct-horse-battery"}});
    let (status, made) = s
        .call(
            Method::POST,
            &format!("{base}/secrets"),
            Some(&acme),
            Some(&secret),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
        "data": {"note": "plainly-visible-config"}});
    let (status, _) = s
        .call(
            Method::POST,
            &format!("{base}/configmaps"),
            Some(&acme),
            Some(&config),
        )
        .await;
    assert_eq!(status, 201);
    let (status, read) = s
        .call(
            Method::GET,
            &format!("{base}/secrets/db"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(read["data"]["password"], "Y29ycmVjdC1ob3JzZS1iYXR0ZXJ5");
    assert!(read.get("encryptedData").is_none());
    let disk = disk_bytes(s._dir.path());
    let holds = |needle: &[u8]| disk.windows(needle.len()).any(|w| w == needle);
    assert!(
        holds(b"plainly-visible-config"),
        "the search sees what is stored"
    );
    assert!(
        !holds(b"Y29ycmVjdC1ob3JzZS1iYXR0ZXJ5"),
        "a secret's value is on disk"
    );
    assert!(
        !holds(b"correct-horse-battery"),
        "a secret's value is on disk"
    );
}

#[tokio::test]
async fn a_clusters_watches_count_against_its_tenants_open_streams() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({"quota": {"watches": 1}}))
        .await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let url = format!("{}/k8s/{id}/api/v1/namespaces?watch=true", s.base);
    let open = s.http.get(&url).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(open.status(), 200);
    let refused = s.http.get(&url).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let status: Value = refused.json().await.unwrap();
    assert_eq!(status["reason"], "TooManyRequests", "{status}");
    drop(open);
}

#[tokio::test]
async fn a_hostile_replica_count_in_a_tenant_cluster_is_refused_not_run() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let template = json!({"metadata": {"labels": {"app": "x"}},
        "spec": {"containers": [{"name": "main", "image": "acme/x:1"}]}});
    let deployment = |replicas: Value| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "flood"},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "x"}},
                        "template": template}})
    };
    let job = |completions: Value| {
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "flood"},
               "spec": {"completions": completions, "parallelism": completions, "template": template}})
    };
    let deployments = format!("/k8s/{id}/apis/apps/v1/namespaces/default/deployments");
    let jobs = format!("/k8s/{id}/apis/batch/v1/namespaces/default/jobs");
    for (path, body) in [
        (&deployments, deployment(json!(1_000_000))),
        (&deployments, deployment(json!(-1))),
        (&deployments, deployment(json!("many"))),
        (&jobs, job(json!(1_000_000))),
    ] {
        let (status, v) = s.call(Method::POST, path, Some(&acme), Some(&body)).await;
        assert_eq!(status, 422, "{body}: {v}");
        assert_eq!(v["reason"], "Invalid", "{v}");
    }
    let (status, v) = s
        .call(
            Method::POST,
            &deployments,
            Some(&acme),
            Some(&deployment(json!(3))),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    // Nor can an update or a scale raise it past the bound.
    let scale = format!("{deployments}/flood/scale");
    let (status, v) = s
        .call(
            Method::PUT,
            &scale,
            Some(&acme),
            Some(&json!({"spec": {"replicas": 5000}})),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    let (status, v) = s
        .call(
            Method::PUT,
            &format!("{deployments}/flood"),
            Some(&acme),
            Some(&deployment(json!(5000))),
        )
        .await;
    assert_eq!(status, 422, "{v}");
}

#[tokio::test]
async fn a_flood_of_objects_stops_at_the_clusters_quota_and_leaves_room_after_deletes() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({"quota": {"cluster_objects": 12}}))
        .await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let configmaps = format!("/k8s/{id}/api/v1/namespaces/default/configmaps");
    let make = |i: usize| json!({"metadata": {"name": format!("flood-{i}")}, "data": {"k": "v"}});
    let mut made = 0;
    let refusal = loop {
        let (status, v) = s
            .call(Method::POST, &configmaps, Some(&acme), Some(&make(made)))
            .await;
        if status != 201 {
            break (status, v);
        }
        made += 1;
        assert!(made <= 12, "no cap: {made} config maps made");
    };
    let (status, v) = refusal;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["reason"], "Forbidden", "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("exceeded quota: cluster_objects") && message.contains("limited: 12"),
        "{message}"
    );
    // The cluster's own namespaces count too: fewer than 12 were made.
    assert!((1..12).contains(&made), "{made}");
    let (status, v) = s
        .call(
            Method::DELETE,
            &format!("{configmaps}/flood-0"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = s
        .call(Method::POST, &configmaps, Some(&acme), Some(&make(100)))
        .await;
    assert_eq!(status, 201, "a delete makes room again: {v}");
    // Another cluster of the tenant has its own count.
    let other = s.create_cluster(&acme, "other").await;
    let theirs = format!("/k8s/{other}/api/v1/namespaces/default/configmaps");
    let (status, v) = s
        .call(Method::POST, &theirs, Some(&acme), Some(&make(0)))
        .await;
    assert_eq!(status, 201, "{v}");
}

#[tokio::test]
async fn services_get_addresses_of_their_own_once_each_even_when_raced() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let services = format!("/k8s/{id}/api/v1/namespaces/default/services");
    let svc = |name: &str, spec: Value| json!({"metadata": {"name": name}, "spec": spec});
    let ports = json!([{"port": 80, "targetPort": "http"}]);
    let (status, web) = s
        .call(
            Method::POST,
            &services,
            Some(&acme),
            Some(&svc(
                "web",
                json!({"selector": {"app": "web"}, "ports": ports}),
            )),
        )
        .await;
    assert_eq!(status, 201, "{web}");
    assert_eq!(web["spec"]["clusterIP"], "10.96.0.1", "{web}");
    assert_eq!(web["spec"]["type"], "ClusterIP");
    // The same address asked for twice at once: one gets it.
    let wanted = json!({"clusterIP": "10.96.0.50", "ports": [{"port": 53, "protocol": "UDP"}]});
    let (body_a, body_b) = (svc("dns-a", wanted.clone()), svc("dns-b", wanted));
    let (a, b) = tokio::join!(
        s.call(Method::POST, &services, Some(&acme), Some(&body_a)),
        s.call(Method::POST, &services, Some(&acme), Some(&body_b))
    );
    let mut codes = [a.0, b.0];
    codes.sort_unstable();
    assert_eq!(codes, [201, 422], "{} / {}", a.1, b.1);
    let refused = if a.0 == 422 { &a.1 } else { &b.1 };
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("already allocated"),
        "{refused}"
    );
    // A tenant cluster opens no port on the provider's nodes; an address
    // stays its service's.
    let (status, v) = s
        .call(
            Method::POST,
            &services,
            Some(&acme),
            Some(&svc(
                "open",
                json!({"type": "NodePort", "ports": [{"port": 80}]}),
            )),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    let mut moved = web.clone();
    moved["spec"]["clusterIP"] = json!("10.96.0.99");
    let (status, v) = s
        .call(
            Method::PUT,
            &format!("{services}/web"),
            Some(&acme),
            Some(&moved),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("immutable"), "{v}");
    // Its endpoints object is the controller's, made for it (no pod yet).
    let endpoints = format!("/k8s/{id}/api/v1/namespaces/default/endpoints/web");
    let mut made = Value::Null;
    for _ in 0..100 {
        let (status, v) = s.call(Method::GET, &endpoints, Some(&acme), None).await;
        if status == 200 {
            made = v;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(made["subsets"], json!([]), "{made}");
    // And it goes with its service.
    let (status, _) = s
        .call(
            Method::DELETE,
            &format!("{services}/web"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let mut gone = false;
    for _ in 0..100 {
        if s.call(Method::GET, &endpoints, Some(&acme), None).await.0 == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(gone, "the endpoints outlived their service");
}

#[tokio::test]
async fn an_inference_service_is_refused_what_its_tenant_could_not_deploy() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({"quota": {"gpus": "1"}}))
        .await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    s.create_model(None, "m").await;
    let id = s.create_cluster(&acme, "dev").await;
    let isvcs = format!("/k8s/{id}/apis/atrium.dev/v1/namespaces/default/inferenceservices");
    let isvc = |name: &str, spec: Value| {
        json!({"apiVersion": "atrium.dev/v1", "kind": "InferenceService",
               "metadata": {"name": name}, "spec": spec})
    };
    // What could never be a deployment is refused at once.
    let (status, v) = s
        .call(
            Method::POST,
            &isvcs,
            Some(&acme),
            Some(&isvc("out", json!({"model": "m", "engine": "external"}))),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    // What admission refuses — past the quota, an unknown model — is
    // stored and says why in its status; no deployment is made.
    for (name, spec, why) in [
        (
            "big",
            json!({"model": "m", "resources": {"gpu": "4"}}),
            "quota",
        ),
        ("nope", json!({"model": "nope"}), "no model named"),
    ] {
        let (status, v) = s
            .call(Method::POST, &isvcs, Some(&acme), Some(&isvc(name, spec)))
            .await;
        assert_eq!(status, 201, "{v}");
        let mut said = Value::Null;
        for _ in 0..100 {
            let (_, v) = s
                .call(Method::GET, &format!("{isvcs}/{name}"), Some(&acme), None)
                .await;
            said = v["status"]["conditions"][0].clone();
            if said["status"] == "False" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let message = said["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{name}: {said}");
    }
    let (_, deployments) = s
        .call(Method::GET, "/v1/deployments", Some(&acme), None)
        .await;
    assert_eq!(deployments["items"], json!([]), "{deployments}");
}

#[tokio::test]
async fn a_finalizer_holds_a_delete_until_it_is_removed() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let cm = format!("/k8s/{id}/api/v1/namespaces/default/configmaps");
    let body = json!({"metadata": {"name": "held", "finalizers": ["example.com/hold"]},
                      "data": {"k": "v"}});
    let (status, _) = s.call(Method::POST, &cm, Some(&acme), Some(&body)).await;
    assert_eq!(status, 201);
    let one = format!("{cm}/held");
    let (status, marked) = s.call(Method::DELETE, &one, Some(&acme), None).await;
    assert_eq!(status, 200, "{marked}");
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    let (status, still) = s.call(Method::GET, &one, Some(&acme), None).await;
    assert_eq!(status, 200, "{still}");
    assert_eq!(
        still["metadata"]["deletionTimestamp"],
        marked["metadata"]["deletionTimestamp"]
    );
    // Nothing new may hold it once it is going, and the mark stays.
    let merge = |patch: Value| {
        let (s, one, acme) = (&s, one.clone(), acme.clone());
        async move {
            let media = "application/merge-patch+json";
            s.call_with(Method::PATCH, &one, Some(&acme), media, &patch)
                .await
        }
    };
    let (status, v) =
        merge(json!({"metadata": {"finalizers": ["example.com/hold", "x.io/more"]}})).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) =
        merge(json!({"metadata": {"deletionTimestamp": null}, "data": {"k": "w"}})).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["metadata"]["deletionTimestamp"].is_string(), "{v}");
    // Removing the last finalizer completes the delete.
    let (status, v) = merge(json!({"metadata": {"finalizers": null}})).await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = s.call(Method::GET, &one, Some(&acme), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_clusters_nodes_are_the_fleets_its_residency_allows_and_read_only() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("fra", "EU").await;
    s.create_site("nyc", "US").await;
    for (name, site) in [("eu-node", "fra"), ("us-node", "nyc")] {
        let body = json!({"name": name, "spec": {"site": site,
            "capacity": {"cpu": "8", "memory": "32Gi"},
            "gpus": [{"index": 0, "model": "H100-80GB", "memory": "80Gi"}]}});
        s.admin(Method::POST, "/v1/nodes", body).await;
    }
    s.create_tenant(
        "acme",
        json!({"residency": {"policy": "only", "jurisdictions": ["EU"]}}),
    )
    .await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let nodes = format!("/k8s/{id}/api/v1/nodes");
    let (status, list) = s.call(Method::GET, &nodes, Some(&acme), None).await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["eu-node"], "{list}");
    let eu = &list["items"][0];
    assert_eq!(eu["status"]["capacity"]["nvidia.com/gpu"], "1");
    assert_eq!(
        eu["metadata"]["labels"]["topology.kubernetes.io/region"],
        "EU"
    );
    let (status, _) = s
        .call(Method::GET, &format!("{nodes}/us-node"), Some(&acme), None)
        .await;
    assert_eq!(status, 404);
    for method in [Method::POST, Method::DELETE] {
        let path = if method == Method::POST {
            nodes.clone()
        } else {
            format!("{nodes}/eu-node")
        };
        let body = json!({"metadata": {"name": "mine"}});
        let (status, v) = s.call(method, &path, Some(&acme), Some(&body)).await;
        assert_eq!(status, 405, "{v}");
    }
}

#[tokio::test]
async fn a_service_account_token_opens_its_own_cluster_only_and_never_grants_rbac() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let other = s.create_cluster(&acme, "other").await;
    let core = format!("/k8s/{id}/api/v1/namespaces/default");
    let rbac = format!("/k8s/{id}/apis/rbac.authorization.k8s.io/v1");
    let post = |path: String, body: Value| {
        let (s, acme) = (&s, acme.clone());
        async move { s.call(Method::POST, &path, Some(&acme), Some(&body)).await }
    };
    post(
        format!("{core}/serviceaccounts"),
        json!({"metadata": {"name": "ops"}}),
    )
    .await;
    // Every verb on every resource, cluster-wide.
    post(
        format!("{rbac}/clusterroles"),
        json!({"metadata": {"name": "all"},
               "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
    )
    .await;
    let (status, v) = post(
        format!("{rbac}/clusterrolebindings"),
        json!({"metadata": {"name": "ops-all"},
               "subjects": [{"kind": "ServiceAccount", "name": "ops", "namespace": "default"}],
               "roleRef": {"kind": "ClusterRole", "name": "all", "apiGroup": "rbac.authorization.k8s.io"}}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = post(
        format!("{core}/serviceaccounts/ops/token"),
        json!({"spec": {"expirationSeconds": 60}}),
    )
    .await;
    assert_eq!(status, 422, "too short a life: {v}");
    let (status, v) = post(format!("{core}/serviceaccounts/ops/token"), json!({})).await;
    assert_eq!(status, 201, "{v}");
    let token = v["status"]["token"].as_str().unwrap().to_string();
    let as_ops = |method: Method, path: String, body: Option<Value>| {
        let (s, token) = (&s, token.clone());
        async move { s.call(method, &path, Some(&token), body.as_ref()).await }
    };
    let (status, v) = as_ops(
        Method::POST,
        format!("{core}/configmaps"),
        Some(json!({"metadata": {"name": "made-by-ops"}})),
    )
    .await;
    assert_eq!(status, 201, "its role lets it: {v}");
    // Granting is a tenant administrator's, whatever the account holds.
    let (status, v) = as_ops(
        Method::POST,
        format!("{rbac}/clusterrolebindings"),
        Some(json!({"metadata": {"name": "more"}, "subjects": [],
                    "roleRef": {"kind": "ClusterRole", "name": "all"}})),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    // Its cluster only; not the Atrium API; not forged.
    let (status, _) = as_ops(Method::GET, format!("/k8s/{other}/api/v1/namespaces"), None).await;
    assert_eq!(status, 401);
    let (status, _) = as_ops(Method::GET, "/v1/clusters".into(), None).await;
    assert_eq!(status, 401);
    // Its claims changed under the same signature.
    let forged = token.replacen("atrium-sa.e", "atrium-sa.f", 1);
    assert_ne!(forged, token);
    let (status, _) = s
        .call(
            Method::GET,
            &format!("{core}/configmaps"),
            Some(&forged),
            None,
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_namespaces_quota_holds_for_its_tenant_and_its_controllers() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let core = format!("/k8s/{id}/api/v1/namespaces/default");
    let post = |path: String, body: Value| {
        let (s, acme) = (&s, acme.clone());
        async move { s.call(Method::POST, &path, Some(&acme), Some(&body)).await }
    };
    let (status, v) = post(
        format!("{core}/resourcequotas"),
        json!({"metadata": {"name": "small"},
               "spec": {"hard": {"configmaps": "2", "pods": "1", "requests.cpu": "200m"}}}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    for i in 0..2 {
        let (status, v) = post(
            format!("{core}/configmaps"),
            json!({"metadata": {"name": format!("c{i}")}}),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = post(
        format!("{core}/configmaps"),
        json!({"metadata": {"name": "c2"}}),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(
        v["message"],
        "configmaps \"c2\" is forbidden: exceeded quota: small, requested: configmaps=1, used: configmaps=2, limited: configmaps=2"
    );
    // A pod asking for more CPU than is left is refused; so are the pods
    // a replica set would make past the count, in its status.
    let pod = |name: &str, cpu: &str| {
        json!({"metadata": {"name": name, "labels": {"app": "x"}}, "spec": {"containers": [
            {"name": "main", "image": "acme/x:1", "resources": {"requests": {"cpu": cpu}}}]}})
    };
    let (status, v) = post(format!("{core}/pods"), pod("big", "300m")).await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("requests.cpu=300m"),
        "{v}"
    );
    let (status, v) = post(format!("{core}/pods"), pod("one", "100m")).await;
    assert_eq!(status, 201, "{v}");
    let template = json!({"metadata": {"labels": {"app": "rs"}}, "spec": {"containers": [
        {"name": "main", "image": "acme/x:1", "resources": {"requests": {"cpu": "50m"}}}]}});
    let (status, v) = post(
        format!("/k8s/{id}/apis/apps/v1/namespaces/default/replicasets"),
        json!({"metadata": {"name": "rs"},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "rs"}}, "template": template}}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let rs = format!("/k8s/{id}/apis/apps/v1/namespaces/default/replicasets/rs");
    let mut said = Value::Null;
    for _ in 0..100 {
        let (_, v) = s.call(Method::GET, &rs, Some(&acme), None).await;
        said = v["status"]["conditions"][0].clone();
        if said["reason"] == "FailedCreate" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        said["message"]
            .as_str()
            .unwrap_or("")
            .contains("exceeded quota: small"),
        "{said}"
    );
    // The quota's status says what is used.
    let mut used = Value::Null;
    for _ in 0..100 {
        let (_, v) = s
            .call(
                Method::GET,
                &format!("{core}/resourcequotas/small"),
                Some(&acme),
                None,
            )
            .await;
        used = v["status"]["used"].clone();
        if used["pods"] == "1" && used["configmaps"] == "2" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        used,
        json!({"configmaps": "2", "pods": "1", "requests.cpu": "100m"}),
        "{used}"
    );
}

#[tokio::test]
async fn discovery_is_aggregated_for_a_client_that_asks_as_kubectl_does() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,\
                  application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,\
                  application/json";
    for (path, group) in [("api", ""), ("apis", "apps")] {
        let resp = s
            .http
            .get(format!("{}/k8s/{id}/{path}", s.base))
            .bearer_auth(&acme)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let media = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(
            media,
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
        );
        let doc: Value = resp.json().await.unwrap();
        assert!(
            doc["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["metadata"]["name"] == group),
            "{doc}"
        );
    }
    // A client that does not ask gets the legacy documents.
    let (status, legacy) = s
        .call(Method::GET, &format!("/k8s/{id}/api"), Some(&acme), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(legacy["kind"], "APIVersions");
}

#[tokio::test]
async fn deleting_an_owner_takes_its_dependents_of_any_kind_unless_they_are_orphaned() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let core = format!("/k8s/{id}/api/v1/namespaces/default");
    let make = |path: String, body: Value| {
        let (s, acme) = (&s, acme.clone());
        async move {
            let (status, v) = s.call(Method::POST, &path, Some(&acme), Some(&body)).await;
            assert_eq!(status, 201, "{v}");
            v["metadata"]["uid"].as_str().unwrap().to_string()
        }
    };
    let owned_by = |name: &str, uid: &str| {
        json!({"metadata": {"name": name, "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": uid}]}})
    };
    // owner ← child (config map) ← grandchild (secret); a bystander.
    let owner = make(
        format!("{core}/configmaps"),
        json!({"metadata": {"name": "owner"}}),
    )
    .await;
    let child = make(format!("{core}/configmaps"), owned_by("child", &owner)).await;
    make(format!("{core}/secrets"), owned_by("grandchild", &child)).await;
    make(
        format!("{core}/configmaps"),
        json!({"metadata": {"name": "bystander"}}),
    )
    .await;
    let (status, _) = s
        .call(
            Method::DELETE,
            &format!("{core}/configmaps/owner"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200);
    for gone in ["configmaps/child", "secrets/grandchild"] {
        let (status, _) = s
            .call(Method::GET, &format!("{core}/{gone}"), Some(&acme), None)
            .await;
        assert_eq!(status, 404, "{gone}");
    }
    let (status, _) = s
        .call(
            Method::GET,
            &format!("{core}/configmaps/bystander"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200);
    // Orphaned: the dependent stays, owned by no one.
    let keeper = make(
        format!("{core}/configmaps"),
        json!({"metadata": {"name": "keeper"}}),
    )
    .await;
    make(format!("{core}/configmaps"), owned_by("kept", &keeper)).await;
    let (status, _) = s
        .call(
            Method::DELETE,
            &format!("{core}/configmaps/keeper"),
            Some(&acme),
            Some(&json!({"propagationPolicy": "Orphan"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, kept) = s
        .call(
            Method::GET,
            &format!("{core}/configmaps/kept"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(kept["metadata"]["ownerReferences"], json!([]), "{kept}");
}
