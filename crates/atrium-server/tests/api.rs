//! The control plane's REST API against a real server and real databases:
//! quotas under concurrency, bad input, watch streams, the OpenAPI document.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use atrium_store::testing::{TestBackend, BOTH};
use common::{deployment_body, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

/// 200 concurrent creates against a quota that admits exactly 10.
async fn quota_race(backend: TestBackend) {
    let s = TestServer::start(backend).await;
    s.create_tenant("acme", json!({"quota": {"gpus": "10"}}))
        .await;
    s.create_model(None, "m").await;
    let key = s.create_key("acme", "ops", &["admin"]).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = s.http.clone();
        let url = format!("{}/v1/deployments", s.base);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .json(&deployment_body(&format!("d{i}"), None, "m", "1", 1))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => admitted += 1,
            409 => {
                assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
                assert_eq!(body["error"]["details"]["resource"], "gpus");
                assert_eq!(body["error"]["details"]["limit"], "10");
                assert_eq!(body["error"]["details"]["used"], "10");
                assert_eq!(body["error"]["details"]["requested"], "1");
            }
            other => panic!("{backend:?}: unexpected {other}: {body}"),
        }
    }
    assert_eq!(admitted, 10, "{backend:?}");
    let listed = s
        .admin(Method::GET, "/v1/deployments?tenant=acme", Value::Null)
        .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 10);
    let quota = s.admin(Method::GET, "/v1/quotas/acme", Value::Null).await;
    assert_eq!(quota["used"]["gpus"], "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_race_sqlite() {
    quota_race(TestBackend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_race_postgres() {
    quota_race(TestBackend::Postgres).await;
}

#[tokio::test]
async fn quota_counts_every_replica_and_updates() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({"quota": {"gpus": "4", "deployments": 2}}))
        .await;
    s.create_model(None, "m").await;
    // max replicas × per-replica GPUs: 2 × 1.5 would be fractional > 1, so use 0.5 × 4.
    s.admin(
        Method::POST,
        "/v1/deployments",
        deployment_body("a", Some("acme"), "m", "0.5", 4),
    )
    .await;
    let (status, v) = s
        .call(
            Method::POST,
            "/v1/deployments",
            Some(&s.admin),
            Some(&deployment_body("b", Some("acme"), "m", "1", 3)),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["details"]["used"], "2");
    // Growing an existing deployment is checked too, without counting it twice.
    let mut spec = deployment_body("a", None, "m", "1", 4)["spec"].clone();
    let (status, _) = s
        .call(
            Method::PUT,
            "/v1/deployments/a?tenant=acme",
            Some(&s.admin),
            Some(&json!({"spec": spec})),
        )
        .await;
    assert_eq!(status, 200);
    spec["replicas"]["max"] = json!(5);
    let (status, v) = s
        .call(
            Method::PUT,
            "/v1/deployments/a?tenant=acme",
            Some(&s.admin),
            Some(&json!({"spec": spec})),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    // The deployment count limit.
    s.admin(
        Method::PUT,
        "/v1/quotas/acme",
        json!({"quota": {"deployments": 1}}),
    )
    .await;
    let (status, v) = s
        .call(
            Method::POST,
            "/v1/deployments",
            Some(&s.admin),
            Some(&deployment_body("c", Some("acme"), "m", "0.1", 1)),
        )
        .await;
    assert_eq!(
        (status, v["error"]["details"]["resource"].as_str()),
        (409, Some("deployments"))
    );
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_field() {
    let s = TestServer::start_with_limit(TestBackend::Sqlite, 4096).await;
    s.create_tenant("acme", json!({})).await;
    s.create_model(None, "m").await;
    let post = |body: String, content_type: &'static str| {
        let req = s
            .http
            .post(format!("{}/v1/deployments", s.base))
            .bearer_auth(&s.admin)
            .header("content-type", content_type)
            .body(body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let good = deployment_body("d", Some("acme"), "m", "1", 1);
    let with = |pointer: &str, value: Value| {
        let mut b = good.clone();
        *b.pointer_mut(pointer).unwrap() = value;
        b.to_string()
    };
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "malformed JSON",
            "{\"name\": ".into(),
            400,
            "invalid_json",
            "EOF",
        ),
        (
            "trailing garbage",
            format!("{good} x"),
            400,
            "invalid_json",
            "trailing",
        ),
        (
            "not an object",
            "[1,2]".into(),
            400,
            "invalid_request",
            "body",
        ),
        (
            "unknown top-level field",
            {
                let mut b = good.clone();
                b["colour"] = json!("red");
                b.to_string()
            },
            400,
            "invalid_request",
            "colour",
        ),
        (
            "unknown spec field",
            {
                let mut b = good.clone();
                b["spec"]["replicaz"] = json!(3);
                b.to_string()
            },
            400,
            "invalid_request",
            "replicaz",
        ),
        (
            "bad CPU",
            with("/spec/resources/cpu", json!("2 cores")),
            400,
            "invalid_request",
            "spec.resources.cpu",
        ),
        (
            "bad memory",
            with("/spec/resources/memory", json!("12GB")),
            400,
            "invalid_request",
            "spec.resources.memory",
        ),
        (
            "bad GPU",
            with("/spec/resources/gpu", json!("1.5")),
            400,
            "invalid_request",
            "spec.resources.gpu",
        ),
        (
            "bad MIG",
            with("/spec/resources/gpu", json!("5g.10gb")),
            400,
            "invalid_request",
            "spec.resources.gpu",
        ),
        (
            "negative replicas",
            with("/spec/replicas/max", json!(-1)),
            400,
            "invalid_request",
            "spec.replicas.max",
        ),
        (
            "min above max",
            with("/spec/replicas/min", json!(5)),
            400,
            "invalid_request",
            "spec.replicas.min",
        ),
        (
            "bad engine",
            with("/spec/engine", json!("warp")),
            400,
            "invalid_request",
            "spec.engine",
        ),
        (
            "bad name",
            with("/name", json!("Not A Label")),
            400,
            "invalid_request",
            "name",
        ),
        (
            "missing model",
            with("/spec/model", json!("nope")),
            400,
            "invalid_request",
            "spec.model",
        ),
        (
            "wrong type",
            with("/spec/replicas", json!("three")),
            400,
            "invalid_request",
            "spec.replicas",
        ),
        (
            "oversize",
            format!("{{\"name\":\"{}\"}}", "a".repeat(5000)),
            413,
            "payload_too_large",
            "4096",
        ),
    ];
    for (label, body, status, code, mention) in cases {
        let (got, v) = post(body, "application/json").await;
        assert_eq!(got, status, "{label}: {v}");
        assert_eq!(v["error"]["code"], code, "{label}: {v}");
        assert!(
            v.to_string().contains(mention),
            "{label}: {v} should mention {mention}"
        );
    }
    let (got, v) = post(good.to_string(), "text/plain").await;
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    // Every error found at once.
    let mut b = good.clone();
    b["name"] = json!("BAD");
    b["spec"]["replicas"] = json!({"min": 3, "max": 0});
    let (got, v) = post(b.to_string(), "application/json").await;
    assert_eq!(got, 400);
    let fields: Vec<&str> = v["error"]["details"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["name", "spec.replicas.max", "spec.replicas.min"],
        "{v}"
    );
    // Bad query parameters, routes and methods.
    let refusals = [
        (Method::GET, "/v1/deployments?limit=0", 400, "invalid_query"),
        (
            Method::GET,
            "/v1/deployments?limit=abc",
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/deployments?frobnicate=1",
            400,
            "invalid_query",
        ),
        (Method::GET, "/v1/nothing", 404, "no_route"),
        (Method::PATCH, "/v1/deployments", 405, "method_not_allowed"),
    ];
    for (method, path, status, code) in refusals {
        let (got, v) = s.call(method, path, Some(&s.admin), None).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
    // Nothing was created by any of it, and the server still answers.
    let listed = s.admin(Method::GET, "/v1/deployments", Value::Null).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0);
    let (got, _) = s.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(got, 200);
}

#[tokio::test]
async fn residency_and_references_are_checked() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_site("eu-1", "EU").await;
    s.create_site("us-1", "US").await;
    s.create_tenant(
        "acme",
        json!({"residency": {"policy": "only", "jurisdictions": ["EU"]}}),
    )
    .await;
    s.create_model(None, "m").await;
    let mut body = deployment_body("d", Some("acme"), "m", "1", 1);
    body["spec"]["sites"] = json!(["eu-1", "us-1", "mars"]);
    let (status, v) = s
        .call(Method::POST, "/v1/deployments", Some(&s.admin), Some(&body))
        .await;
    assert_eq!(status, 400, "{v}");
    let fields = v["error"]["details"]["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 2, "{v}");
    assert_eq!(fields[0]["field"], "spec.sites[1]");
    assert!(fields[0]["message"]
        .as_str()
        .unwrap()
        .contains("jurisdiction US"));
    assert_eq!(fields[1]["field"], "spec.sites[2]");
    body["spec"]["sites"] = json!(["eu-1"]);
    s.admin(Method::POST, "/v1/deployments", body).await;
    // In-use objects cannot be deleted out from under their users.
    for path in ["/v1/models/m", "/v1/tenants/acme"] {
        let (status, v) = s.call(Method::DELETE, path, Some(&s.admin), None).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (409, Some("in_use")),
            "{path}: {v}"
        );
    }
}

#[tokio::test]
async fn keys_authenticate_until_revoked_or_expired() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let key = s.create_key("acme", "k", &["read"]).await;
    assert!(key.starts_with("atr_key"), "{key}");
    let (status, _) = s
        .call(Method::GET, "/v1/tenants/acme", Some(&key), None)
        .await;
    assert_eq!(status, 200);
    // Listing keys never shows a secret or a digest.
    let listed = s.admin(Method::GET, "/v1/keys", Value::Null).await;
    let text = listed.to_string();
    assert!(
        !text.contains("digest") && !text.contains(&key[20..]),
        "{text}"
    );
    // A tampered secret fails.
    let tampered = format!("{}x", &key[..key.len() - 1]);
    let (status, _) = s
        .call(Method::GET, "/v1/tenants/acme", Some(&tampered), None)
        .await;
    assert_eq!(status, 401);
    let id = listed["items"][0]["id"].as_str().unwrap();
    s.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), Value::Null)
        .await;
    let (status, _) = s
        .call(Method::GET, "/v1/tenants/acme", Some(&key), None)
        .await;
    assert_eq!(status, 401);
    // Expired keys fail too.
    let v = s
        .admin(Method::POST, "/v1/keys", json!({"name": "old", "tenant": "acme", "spec": {"scopes": ["read"], "expires_at": "2020-01-01T00:00:00Z"}}))
        .await;
    let (status, _) = s
        .call(
            Method::GET,
            "/v1/tenants/acme",
            Some(v["secret"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 401);
    // The audit trail names who did what, with the request id.
    let audit = s.admin(Method::GET, "/v1/audit", Value::Null).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["tenant.create", "key.create", "key.revoke", "key.create"]
    );
    assert!(audit["items"][2]["request_id"]
        .as_str()
        .unwrap()
        .starts_with("req_"));
}

#[tokio::test]
async fn request_ids_metrics_and_health() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    let resp = s
        .http
        .get(format!("{}/healthz", s.base))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-42");
    let resp = s
        .http
        .get(format!("{}/readyz", s.base))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    s.call(Method::GET, "/v1/tenants", Some(&s.admin), None)
        .await;
    let metrics = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "atrium_http_requests_total{method=\"GET\",route=\"/v1/tenants\",status=\"200\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("atrium_http_request_duration_seconds_count{route=\"/healthz\"} 1"),
        "{metrics}"
    );
}

async fn read_events(resp: &mut reqwest::Response, n: usize) -> Vec<Value> {
    let mut events = Vec::new();
    let mut buf = String::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("event in time")
            .unwrap()
            .expect("stream open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            if v["type"] != "BOOKMARK" {
                events.push(v);
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_in_order_from_a_revision() {
    for backend in BOTH {
        let s = TestServer::start(backend).await;
        s.create_site("eu-1", "EU").await;
        let listed = s.admin(Method::GET, "/v1/sites", Value::Null).await;
        let from = listed["revision"].as_i64().unwrap();
        let mut resp = s
            .http
            .get(format!("{}/v1/sites?watch=true&since={from}", s.base))
            .bearer_auth(&s.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        s.create_site("eu-2", "EU").await;
        s.admin(
            Method::PUT,
            "/v1/sites/eu-2",
            json!({"spec": {"kind": "edge", "jurisdiction": "DE"}}),
        )
        .await;
        s.create_tenant("not-a-site", json!({})).await;
        s.admin(Method::DELETE, "/v1/sites/eu-2", Value::Null).await;
        let events = read_events(&mut resp, 3).await;
        let seen: Vec<(&str, &str)> = events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap(),
                    e["object"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [("ADDED", "eu-2"), ("MODIFIED", "eu-2"), ("DELETED", "eu-2")],
            "{backend:?}"
        );
        let revisions: Vec<i64> = events
            .iter()
            .map(|e| e["revision"].as_i64().unwrap())
            .collect();
        assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
        // A watch from a revision the store has not reached is refused.
        let (status, _) = s
            .call(
                Method::GET,
                "/v1/sites?watch=true&since=999999",
                Some(&s.admin),
                None,
            )
            .await;
        assert_eq!(status, 400);
    }
}

#[tokio::test]
async fn openapi_document_is_valid_openapi_3() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    let (status, doc) = s.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/deployments",
        "/v1/deployments/{ident}",
        "/v1/keys/{ident}/revoke",
        "/v1/quotas/{tenant}",
        "/v1/audit",
    ] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
    for schema in ["WorkloadSpec", "JobSpec", "WorkloadKind", "Borrowing"] {
        let schemas = &doc["components"]["schemas"];
        assert!(schemas[schema].is_object(), "missing schema {schema}");
    }
    common::assert_valid_openapi(s._dir.path(), &doc, "detect");
}

/// A hostile tenant admin tries to outrank the tenant its provider set:
/// on create, on replace, and by turning a service into a job.
#[tokio::test]
async fn a_workload_never_outranks_its_tenant() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({"priority": 3})).await;
    let key = s.create_key("acme", "k", &["admin"]).await;
    let spec = |priority: Value| {
        json!({"image": "acme/x:1", "resources": {"cpu": "1", "memory": "64Mi"},
               "priority": priority})
    };
    let (status, v) = s
        .call(
            Method::POST,
            "/v1/workloads",
            Some(&key),
            Some(&json!({"name": "w", "spec": spec(json!(4))})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("spec.priority"), "{v}");
    let (status, v) = s
        .call(
            Method::POST,
            "/v1/workloads",
            Some(&key),
            Some(&json!({"name": "w", "spec": spec(json!(3))})),
        )
        .await;
    assert!(status < 300, "its tenant's own priority is allowed: {v}");
    for (attempt, field) in [
        (spec(json!(i32::MAX)), "spec.priority"),
        (spec(json!(-1)), ""),
    ] {
        let (status, v) = s
            .call(
                Method::PUT,
                "/v1/workloads/w",
                Some(&key),
                Some(&json!({"spec": attempt})),
            )
            .await;
        if field.is_empty() {
            assert!(status < 300, "a lower priority is allowed: {v}");
        } else {
            assert_eq!(status, 400, "{v}");
            assert!(v.to_string().contains(field), "{v}");
        }
    }
    let mut job = spec(json!(0));
    job["kind"] = json!("job");
    let (status, v) = s
        .call(
            Method::PUT,
            "/v1/workloads/w",
            Some(&key),
            Some(&json!({"spec": job})),
        )
        .await;
    assert_eq!(status, 400, "a service does not become a job: {v}");
}

#[tokio::test]
async fn volumes_count_against_storage_keep_their_size_and_stay_while_mounted() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({"quota": {"storage": "100Mi", "volumes": 2}}))
        .await;
    s.create_tenant("globex", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let globex = s.create_key("globex", "k", &["admin"]).await;
    let call = |method: Method, path: &'static str, key: &str, body: Value| {
        let key = key.to_string();
        let s = &s;
        async move { s.call(method, path, Some(&key), Some(&body)).await }
    };
    let volume = |name: &str, size: &str| json!({"name": name, "spec": {"size": size}});
    let (status, v) = call(Method::POST, "/v1/volumes", &acme, volume("tiny", "1Mi")).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("spec.size"), "{v}");
    let (status, v) = call(Method::POST, "/v1/volumes", &acme, volume("data", "64Mi")).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"]["node"], Value::Null, "bound by its first user");
    let (status, v) = call(Method::POST, "/v1/volumes", &acme, volume("more", "64Mi")).await;
    assert_eq!(status, 409, "{v}");
    assert!(v.to_string().contains("quota exceeded for storage"), "{v}");
    let (status, _) = call(Method::POST, "/v1/volumes", &acme, volume("more", "16Mi")).await;
    assert_eq!(status, 201);
    let (status, v) = call(Method::POST, "/v1/volumes", &acme, volume("third", "16Mi")).await;
    assert_eq!(status, 409, "{v}");
    assert!(v.to_string().contains("quota exceeded for volumes"), "{v}");
    let (_, q) = call(Method::GET, "/v1/quotas/acme", &acme, Value::Null).await;
    assert_eq!(q["used"]["storage"], "80Mi", "{q}");
    // A size never changes.
    let (status, v) = call(
        Method::PUT,
        "/v1/volumes/data",
        &acme,
        json!({"spec": {"size": "128Mi"}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("does not change"), "{v}");

    // Workloads mount their own tenant's volumes only.
    let workload = |volume: &str| {
        json!({"name": "w", "spec": {"image": "library/x", "resources": {"cpu": "1", "memory": "64Mi"},
               "volumes": [{"volume": volume, "path": "/data"}]}})
    };
    let (status, v) = call(Method::POST, "/v1/workloads", &globex, workload("data")).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("spec.volumes[0].volume"), "{v}");
    let (status, _) = call(Method::GET, "/v1/volumes/data", &globex, Value::Null).await;
    assert_eq!(
        status, 404,
        "another tenant's volume does not exist for globex"
    );
    let (status, v) = call(Method::POST, "/v1/workloads", &acme, workload("data")).await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = call(Method::DELETE, "/v1/volumes/data", &acme, Value::Null).await;
    assert_eq!(status, 409, "{v}");
    assert!(v.to_string().contains("in_use"), "{v}");
    let (status, _) = call(Method::DELETE, "/v1/workloads/w", &acme, Value::Null).await;
    assert_eq!(status, 200);
    let (status, v) = call(Method::DELETE, "/v1/volumes/data", &acme, Value::Null).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn an_exec_needs_a_running_replica_and_only_a_node_reports_one() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let workload = json!({"name": "w", "spec": {"image": "library/x",
        "resources": {"cpu": "1", "memory": "64Mi"}}});
    let (status, _) = s
        .call(Method::POST, "/v1/workloads", Some(&acme), Some(&workload))
        .await;
    assert_eq!(status, 201);
    let ask = |command: Value| json!({"command": command});
    let (status, v) = s
        .call(
            Method::POST,
            "/v1/workloads/w/exec",
            Some(&acme),
            Some(&ask(json!(["--user=0", "id"]))),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = s
        .call(
            Method::POST,
            "/v1/workloads/w/exec",
            Some(&acme),
            Some(&ask(json!(["/bin/id"]))),
        )
        .await;
    assert_eq!(status, 409, "nothing runs yet: {v}");
    assert!(v.to_string().contains("not_running"), "{v}");
    // Execs are made through their workload only, and reported by nodes.
    let (status, _) = s
        .call(Method::POST, "/v1/execs", Some(&acme), Some(&json!({})))
        .await;
    assert_eq!(status, 405);
    let (status, _) = s
        .call(
            Method::PUT,
            "/v1/execs/exe_0000000000000000/status",
            Some(&acme),
            Some(&json!({"state": "succeeded", "stdout": "forged"})),
        )
        .await;
    assert_eq!(status, 403);
}
