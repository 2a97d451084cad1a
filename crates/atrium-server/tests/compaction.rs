//! The change log keeps a window of the newest revisions: a watch from
//! before it is refused with 410 — `expired` on the Atrium API, upstream's
//! `Expired` Status in a tenant cluster — so its client lists again
//! rather than missing changes silently; a watch inside it goes on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use atrium_store::testing::TestBackend;
use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn a_watch_from_before_the_change_logs_window_gets_410_and_one_inside_it_goes_on() {
    let s = TestServer::start_compacting(TestBackend::Sqlite, 5).await;
    s.create_tenant("acme", json!({})).await;
    let acme = s.create_key("acme", "k", &["admin"]).await;
    let id = s.create_cluster(&acme, "dev").await;
    let configmaps = format!("/k8s/{id}/api/v1/namespaces/default/configmaps");
    let mut last = String::new();
    for i in 0..20 {
        let body = json!({"metadata": {"name": format!("c{i}")}, "data": {"k": "v"}});
        let (status, v) = s
            .call(Method::POST, &configmaps, Some(&acme), Some(&body))
            .await;
        assert_eq!(status, 201, "{v}");
        last = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
    }

    // A tenant cluster: upstream's Expired, on which clients relist (the
    // watch ends within a second while the window has not moved yet).
    let old = format!("{configmaps}?watch=true&resourceVersion=1&timeoutSeconds=1");
    let mut refused = (0, Value::Null);
    for _ in 0..50 {
        refused = s.call(Method::GET, &old, Some(&acme), None).await;
        if refused.0 == 410 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, v) = refused;
    assert_eq!(status, 410, "{v}");
    assert_eq!(
        (v["kind"].as_str(), v["reason"].as_str()),
        (Some("Status"), Some("Expired"))
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("too old resource version: 1 ("),
        "{v}"
    );

    // The Atrium API: 410 `expired`, saying from where to start again.
    let (status, v) = s
        .call(
            Method::GET,
            "/v1/keys?watch=true&since=1",
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 410, "{v}");
    assert_eq!(v["error"]["code"], "expired", "{v}");
    assert!(v["error"]["details"]["oldest"].as_i64().unwrap() > 1, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("list again"),
        "{v}"
    );

    // From the newest version, the watch is served (to its timeout).
    let (status, v) = s
        .call(
            Method::GET,
            &format!("{configmaps}?watch=true&resourceVersion={last}&timeoutSeconds=1"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    // And the objects are all there: compaction drops history, not state.
    let (_, list) = s.call(Method::GET, &configmaps, Some(&acme), None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 20);
}
