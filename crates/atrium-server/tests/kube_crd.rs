//! A tenant's own resource types (CustomResourceDefinitions) against a
//! real server, as a hostile tenant would use them: a type that borrows a
//! built-in kind's name to get its powers, definitions that claim what is
//! not theirs or ask for what is not enforced, objects past the cluster's
//! quota, another tenant's types.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use atrium_store::testing::TestBackend;
use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

/// A definition of `kind` (`plural`) in `group`, namespaced, one version
/// `v1` whose schema keeps whatever it is given.
fn definition(group: &str, kind: &str, plural: &str) -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {"group": group, "scope": "Namespaced",
            "names": {"plural": plural, "kind": kind},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "x-kubernetes-preserve-unknown-fields": true}}}]}})
}

async fn define(s: &TestServer, key: &str, id: &str, crd: &Value) -> (u16, Value) {
    let path = format!("/k8s/{id}/apis/apiextensions.k8s.io/v1/customresourcedefinitions");
    s.call(Method::POST, &path, Some(key), Some(crd)).await
}

/// Defines `kind` (`plural`) in `group`, which must succeed.
async fn defined(
    s: &TestServer,
    key: &str,
    id: &str,
    (group, kind, plural): (&str, &str, &str),
) -> Value {
    let (status, v) = define(s, key, id, &definition(group, kind, plural)).await;
    assert_eq!(status, 201, "{v}");
    v
}

#[tokio::test]
async fn a_custom_type_that_borrows_a_built_in_kinds_name_gets_none_of_its_rules() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let v = defined(&s, &acme, &id, ("evil.example.com", "Pod", "pods")).await;
    assert_eq!(v["status"]["conditions"][1]["type"], "Established", "{v}");
    // A "pod" of its own group is an object, never a workload.
    let pods = format!("/k8s/{id}/apis/evil.example.com/v1/namespaces/default/pods");
    let body = json!({"apiVersion": "evil.example.com/v1", "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["sh"]}],
                 "replicas": 100000}});
    let (status, v) = s.call(Method::POST, &pods, Some(&acme), Some(&body)).await;
    assert_eq!(status, 201, "{v}");
    assert!(v.get("status").is_none(), "no pod status: {v}");
    let (status, v) = s
        .call(
            Method::PUT,
            &format!("{pods}/p"),
            Some(&acme),
            Some(&json!({
        "apiVersion": "evil.example.com/v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"changed": true}})),
        )
        .await;
    assert_eq!(status, 200, "its spec is its own to change: {v}");
    let (status, workloads) = s
        .call(Method::GET, "/v1/workloads", Some(&acme), None)
        .await;
    assert_eq!(status, 200, "{workloads}");
    assert_eq!(workloads["items"], json!([]), "{workloads}");
    let (_, builtin) = s
        .call(
            Method::GET,
            &format!("/k8s/{id}/api/v1/namespaces/default/pods"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(
        builtin["items"],
        json!([]),
        "the built-in pods are apart: {builtin}"
    );
}

#[tokio::test]
async fn a_definition_that_claims_what_is_not_its_own_or_cannot_be_enforced_is_refused() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let mut cel = definition("example.com", "Widget", "widgets");
    cel["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"] =
        json!([{"rule": "self.spec.size < 10"}]);
    for (crd, why) in [
        (definition("apps", "Deployment", "things"), "spec.group"),
        (
            definition("rbac.authorization.k8s.io", "Role", "things"),
            "reserved",
        ),
        (definition("k8s.io", "Thing", "things"), "reserved"),
        (
            definition("atrium.dev", "InferenceService", "things"),
            "reserved",
        ),
        (cel, "CEL validation rules are not supported"),
    ] {
        let (status, v) = define(&s, &acme, &id, &crd).await;
        assert_eq!(status, 422, "{v}");
        assert!(v["message"].as_str().unwrap().contains(why), "{why}: {v}");
    }
    // One kind per group: a second definition may not take it.
    defined(&s, &acme, &id, ("example.com", "Widget", "widgets")).await;
    let (status, v) = define(
        &s,
        &acme,
        &id,
        &definition("example.com", "Widget", "gadgets"),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("already in use"),
        "{v}"
    );
}

#[tokio::test]
async fn custom_objects_count_against_the_clusters_quota_and_stay_in_their_cluster() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({"quota": {"cluster_objects": 8}}))
        .await;
    s.create_tenant("globex", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let globex = s.create_key("globex", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    defined(&s, &acme, &id, ("example.com", "Widget", "widgets")).await;
    let widgets = format!("/k8s/{id}/apis/example.com/v1/namespaces/default/widgets");
    let mut made = 0;
    let (status, v) = loop {
        let body = json!({"metadata": {"name": format!("w{made}")}, "spec": {}});
        let (status, v) = s
            .call(Method::POST, &widgets, Some(&acme), Some(&body))
            .await;
        if status != 201 {
            break (status, v);
        }
        made += 1;
        assert!(made <= 8, "no cap: {made} widgets made");
    };
    assert_eq!(status, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("exceeded quota: cluster_objects"),
        "{v}"
    );
    // Four namespaces and the definition count too.
    assert_eq!(made, 3);

    // Another tenant finds neither the cluster nor, in its own cluster,
    // the type.
    let (status, _) = s.call(Method::GET, &widgets, Some(&globex), None).await;
    assert_eq!(status, 404);
    let theirs = s.create_cluster(&globex, "other").await;
    let (status, v) = s
        .call(
            Method::GET,
            &format!("/k8s/{theirs}/apis/example.com/v1/namespaces/default/widgets"),
            Some(&globex),
            None,
        )
        .await;
    assert_eq!(status, 404, "{v}");
    let (_, groups) = s
        .call(
            Method::GET,
            &format!("/k8s/{theirs}/apis"),
            Some(&globex),
            None,
        )
        .await;
    assert!(!groups.to_string().contains("example.com"), "{groups}");
    let (_, mine) = s
        .call(Method::GET, &format!("/k8s/{id}/apis"), Some(&acme), None)
        .await;
    assert!(mine.to_string().contains("example.com/v1"), "{mine}");

    // Deleting the definition deletes its objects: room again.
    let crd = format!(
        "/k8s/{id}/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com"
    );
    let (status, v) = s.call(Method::DELETE, &crd, Some(&acme), None).await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = s.call(Method::GET, &widgets, Some(&acme), None).await;
    assert_eq!(status, 404);
    defined(&s, &acme, &id, ("example.com", "Widget", "widgets")).await;
    let (status, list) = s.call(Method::GET, &widgets, Some(&acme), None).await;
    assert_eq!((status, list["items"].clone()), (200, json!([])), "{list}");
}

#[tokio::test]
async fn a_write_that_changes_nothing_makes_no_new_version_so_a_controller_does_not_wake_itself() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let mut crd = definition("example.com", "Widget", "widgets");
    crd["spec"]["versions"][0]["subresources"] = json!({"status": {}});
    let (status, v) = define(&s, &acme, &id, &crd).await;
    assert_eq!(status, 201, "{v}");
    let widgets = format!("/k8s/{id}/apis/example.com/v1/namespaces/default/widgets");
    let body = json!({"metadata": {"name": "w"}, "spec": {"size": 1}});
    let (status, made) = s
        .call(Method::POST, &widgets, Some(&acme), Some(&body))
        .await;
    assert_eq!(status, 201, "{made}");
    let status_path = format!("{widgets}/w/status");
    let patch = |size: i64| json!({"status": {"observed": size}});
    let write = |size: i64| {
        let (s, path, key) = (&s, status_path.clone(), acme.clone());
        async move {
            let (code, v) = s
                .call_with(
                    Method::PATCH,
                    &path,
                    Some(&key),
                    "application/merge-patch+json",
                    &patch(size),
                )
                .await;
            assert_eq!(code, 200, "{v}");
            v["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let first = write(1).await;
    assert_ne!(first, made["metadata"]["resourceVersion"].as_str().unwrap());
    assert_eq!(
        write(1).await,
        first,
        "the same status again is no new version"
    );
    let (_, w) = s
        .call(Method::GET, &format!("{widgets}/w"), Some(&acme), None)
        .await;
    assert_eq!(w["status"]["observed"], 1, "{w}");
    assert_eq!(w["metadata"]["generation"], 1, "{w}");
    assert_ne!(write(2).await, first);
}

#[tokio::test]
async fn a_custom_objects_scale_and_field_validation_take_only_what_they_can_hold() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let mut crd = definition("example.com", "Widget", "widgets");
    crd["spec"]["versions"][0]["subresources"] = json!({"scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}});
    let (status, v) = define(&s, &acme, &id, &crd).await;
    assert_eq!(status, 201, "{v}");
    let widgets = format!("/k8s/{id}/apis/example.com/v1/namespaces/default/widgets");
    let body = json!({"metadata": {"name": "w"}, "spec": {"replicas": 1}});
    let (status, v) = s
        .call(
            Method::POST,
            &format!("{widgets}?fieldValidation=Loose"),
            Some(&acme),
            Some(&body),
        )
        .await;
    assert_eq!(status, 400, "an unknown fieldValidation is refused: {v}");
    let (status, v) = s
        .call(Method::POST, &widgets, Some(&acme), Some(&body))
        .await;
    assert_eq!(status, 201, "{v}");
    // Replicas past an int32, or negative, are refused; the object keeps its own.
    for replicas in [json!(1u64 << 40), json!(-1), json!("3")] {
        let scale = json!({"spec": {"replicas": replicas}});
        let (status, v) = s
            .call(
                Method::PUT,
                &format!("{widgets}/w/scale"),
                Some(&acme),
                Some(&scale),
            )
            .await;
        assert_eq!(status, 422, "{replicas}: {v}");
    }
    let (status, v) = s
        .call(
            Method::PUT,
            &format!("{widgets}/w/scale"),
            Some(&acme),
            Some(&json!({"spec": {"replicas": 7}})),
        )
        .await;
    assert_eq!((status, &v["spec"]["replicas"]), (200, &json!(7)), "{v}");
    let (_, w) = s
        .call(Method::GET, &format!("{widgets}/w"), Some(&acme), None)
        .await;
    assert_eq!(w["spec"]["replicas"], 7, "{w}");
}

/// `/openapi/v2` is one Swagger 2.0 document, valid to the reference
/// validator, with a tenant's own types beside the built-in ones; what
/// 2.0 cannot say is left out of a schema, but a property that is merely
/// named like such a keyword stays. A client asking for protobuf only
/// (as client-go does) gets 406, on which it goes on without it.
#[tokio::test]
async fn openapi_v2_is_valid_swagger_with_the_clusters_own_types() {
    let s = TestServer::start(TestBackend::Sqlite).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let mut crd = definition("example.com", "Widget", "widgets");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = json!({"type": "object",
        "properties": {"spec": {"type": "object", "properties": {
            "not": {"type": "string", "nullable": true},
            "size": {"type": "integer", "oneOf": [{"minimum": 1}, {"maximum": -1}]}}}}});
    let (status, v) = define(&s, &acme, &id, &crd).await;
    assert_eq!(status, 201, "{v}");

    let (status, doc) = s
        .call(
            Method::GET,
            &format!("/k8s/{id}/openapi/v2"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["swagger"], "2.0");
    let spec = &doc["definitions"]["com.example.v1.Widget"]["properties"]["spec"]["properties"];
    assert_eq!(spec["not"], json!({"type": "string"}), "{spec}");
    assert_eq!(spec["size"], json!({"type": "integer"}), "{spec}");
    assert!(doc["paths"]["/apis/example.com/v1/namespaces/{namespace}/widgets"].is_object());
    assert!(doc["definitions"]["io.k8s.api.apps.v1.Deployment"].is_object());

    // The reference validator (scripts/test.sh installs it) on this
    // document and on the v3 one of the tenant's group beside it.
    let (_, v3) = s
        .call(
            Method::GET,
            &format!("/k8s/{id}/openapi/v3/apis/example.com/v1"),
            Some(&acme),
            None,
        )
        .await;
    common::assert_valid_openapi(s._dir.path(), &doc, "2.0");
    common::assert_valid_openapi(s._dir.path(), &v3, "3.0");

    let resp = s
        .http
        .get(format!("{}/k8s/{id}/openapi/v2", s.base))
        .bearer_auth(&acme)
        .header(
            "accept",
            "application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 406);
    // Another tenant's key finds no cluster to describe.
    let globex = {
        s.create_tenant("globex", json!({})).await;
        s.create_key("globex", "k", &["admin"]).await
    };
    let (status, _) = s
        .call(
            Method::GET,
            &format!("/k8s/{id}/openapi/v2"),
            Some(&globex),
            None,
        )
        .await;
    assert_eq!(status, 404);
}
