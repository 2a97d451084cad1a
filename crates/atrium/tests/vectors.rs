//! Vector collections through `atrium up`'s control plane: a tenant's
//! collections and points, searched with and without payload filters;
//! invisible to other tenants by name and by id; bounded by quotas; bad
//! input refused by field with nothing written; and every acknowledged
//! point still there after `kill -9` during concurrent upserts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::up::{start, start_in, Up};

fn post(up: &Up, key: &str, path: &str, body: Value) -> (u16, Value) {
    up.api(key, reqwest::Method::POST, path, Some(body))
}

fn get(up: &Up, key: &str, path: &str) -> (u16, Value) {
    up.api(key, reqwest::Method::GET, path, None)
}

fn ids(v: &Value) -> Vec<Value> {
    v["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].clone())
        .collect()
}

#[test]
fn a_tenants_collections_search_filter_and_stay_its_own() {
    let (up, _dir) = start();
    let a = up.tenant_with_key("vec-a", json!({}));
    let b = up.tenant_with_key("vec-b", json!({}));

    let (s, made) = post(
        &up,
        &a,
        "/v1/collections",
        json!({"name": "docs", "dimension": 3, "metric": "cosine"}),
    );
    assert_eq!(s, 200, "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("vec_"), "{id}");
    let (s, again) = post(
        &up,
        &a,
        "/v1/collections",
        json!({"name": "docs", "dimension": 3, "metric": "cosine"}),
    );
    assert_eq!(s, 409, "{again}");
    let (s, bad) = post(
        &up,
        &a,
        "/v1/collections",
        json!({"name": "wide", "dimension": 5000, "metric": "cosine"}),
    );
    assert_eq!(s, 400, "{bad}");
    assert!(bad.to_string().contains("dimension"), "{bad}");

    let points = json!({"points": [
        {"id": 1, "vector": [1.0, 0.0, 0.0], "payload": {"lang": "de", "year": 2020}},
        {"id": 2, "vector": [0.9, 0.1, 0.0], "payload": {"lang": "fr", "year": 2021}},
        {"id": "three", "vector": [0.0, 1.0, 0.0], "payload": {"lang": "de", "year": 2022}},
        {"id": 4, "vector": [0.0, 0.0, 1.0], "payload": {"lang": "en"}}
    ]});
    let (s, w) = post(&up, &a, "/v1/collections/docs/points", points);
    assert_eq!((s, w["points"].clone()), (200, json!(4)), "{w}");

    let (s, r) = post(
        &up,
        &a,
        "/v1/collections/docs/points/search",
        json!({"vector": [1.0, 0.05, 0.0], "limit": 2}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(ids(&r), vec![json!(1), json!(2)]);
    assert_eq!(r["result"][0]["payload"]["lang"], "de");
    let de = json!({"must": [{"key": "lang", "match": {"value": "de"}}], "must_not": [{"key": "year", "range": {"lt": 2021}}]});
    let (_, r) = post(
        &up,
        &a,
        "/v1/collections/docs/points/search",
        json!({"vector": [1.0, 0.0, 0.0], "limit": 5, "filter": de}),
    );
    assert_eq!(ids(&r), vec![json!("three")], "{r}");
    let (_, c) = post(
        &up,
        &a,
        "/v1/collections/docs/points/count",
        json!({"filter": {"must": [{"key": "lang", "match": {"any": ["de", "fr"]}}]}}),
    );
    assert_eq!(c["count"], 3);
    let (_, page) = post(
        &up,
        &a,
        "/v1/collections/docs/points/scroll",
        json!({"limit": 2}),
    );
    assert_eq!(page["points"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_offset"], 2, "{page}");
    let (s, p) = get(&up, &a, "/v1/collections/docs/points/three");
    assert_eq!(
        (s, p["vector"].clone()),
        (200, json!([0.0, 1.0, 0.0])),
        "{p}"
    );

    // Bad input: refused by field, nothing written.
    let refused = [
        json!({"points": [{"id": 9, "vector": [1.0, 2.0]}]}),
        json!({"points": [{"id": 9, "vector": [1.0, 2.0, 3.0], "color": "red"}]}),
        json!({"points": []}),
        json!({"points": (0..1001).map(|i| json!({"id": i, "vector": [1.0, 0.0, 0.0]})).collect::<Vec<_>>()}),
        json!({"points": [{"id": "", "vector": [1.0, 0.0, 0.0]}]}),
        json!({"points": [{"id": 9, "vector": [1.0, 0.0, 0.0], "payload": {"big": "x".repeat(70_000)}}]}),
    ];
    for body in refused {
        let (s, e) = post(&up, &a, "/v1/collections/docs/points", body.clone());
        assert!(s == 400 || s == 413, "{s} {e}");
    }
    let too_many: Vec<Value> = (0..65)
        .map(|i| json!({"key": format!("k{i}"), "match": {"value": i}}))
        .collect();
    let searches = [
        json!({"vector": [1.0, 0.0]}),
        json!({"vector": [1.0, 0.0, 0.0], "limit": 0}),
        json!({"vector": [1.0, 0.0, 0.0], "limit": 101}),
        json!({"vector": [1.0, 0.0, 0.0], "ef": 100000}),
        json!({"vector": [1.0, 0.0, 0.0], "filter": {"must": too_many}}),
        json!({"vector": [1.0, 0.0, 0.0], "filter": {"must": [{"key": "a", "match": {"value": 1}, "range": {"lt": 1}}]}}),
    ];
    for body in searches {
        let (s, e) = post(&up, &a, "/v1/collections/docs/points/search", body.clone());
        assert_eq!(s, 400, "{body} -> {e}");
    }
    let (_, c) = post(&up, &a, "/v1/collections/docs/points/count", json!({}));
    assert_eq!(c["count"], 4, "nothing written by refused requests");

    // Tenant B: the same answers as for a collection that does not exist.
    for path in [
        "/v1/collections/docs",
        &format!("/v1/collections/{id}"),
        "/v1/collections/docs/points/1",
    ] {
        let (s, e) = get(&up, &b, path);
        assert_eq!(s, 404, "{path}: {e}");
    }
    for target in ["docs", id.as_str()] {
        let (s, _) = post(
            &up,
            &b,
            &format!("/v1/collections/{target}/points/search"),
            json!({"vector": [1.0, 0.0, 0.0]}),
        );
        assert_eq!(s, 404);
        let (s, _) = post(
            &up,
            &b,
            &format!("/v1/collections/{target}/points/count"),
            json!({}),
        );
        assert_eq!(s, 404);
        let (s, _) = post(
            &up,
            &b,
            &format!("/v1/collections/{target}/points"),
            json!({"points": [{"id": 1, "vector": [0.0, 0.0, 1.0]}]}),
        );
        assert_eq!(s, 404);
        let (s, _) = up.api(
            &b,
            reqwest::Method::DELETE,
            &format!("/v1/collections/{target}"),
            None,
        );
        assert_eq!(s, 404);
    }
    let (_, list) = get(&up, &b, "/v1/collections");
    assert_eq!(list["collections"], json!([]));
    let (s, _) = post(
        &up,
        &b,
        "/v1/collections",
        json!({"name": "docs", "dimension": 2, "metric": "l2"}),
    );
    assert_eq!(s, 200, "B's own collection may share the name");
    let (_, r) = post(
        &up,
        &a,
        "/v1/collections/docs/points/search",
        json!({"vector": [0.0, 0.0, 1.0], "limit": 1}),
    );
    assert_eq!(
        ids(&r),
        vec![json!(4)],
        "A's collection is untouched by B's"
    );

    // Through the gateway, with the same key: the same answers; only the
    // API's own shapes pass.
    let via = up
        .http
        .post(format!("{}/v1/collections/docs/points/search", up.gateway))
        .bearer_auth(&a)
        .json(&json!({"vector": [0.0, 0.0, 1.0], "limit": 1}))
        .send()
        .unwrap();
    assert_eq!(via.status().as_u16(), 200);
    assert_eq!(ids(&via.json().unwrap()), vec![json!(4)]);
    for path in [
        "/v1/collections/docs/points/a%2F..%2Fb",
        "/v1/collections/claim/points/x/y",
    ] {
        let r = up
            .http
            .get(format!("{}{path}", up.gateway))
            .bearer_auth(&a)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }

    // The provider's token is not a tenant here.
    let (s, _) = get(&up, &up.token, "/v1/collections");
    assert_eq!(s, 403);

    // Quotas: collections and points.
    let c = up.tenant_with_key(
        "vec-c",
        json!({"quota": {"collections": 1, "vector_points": 3, "vector_bytes": "64"}}),
    );
    let (s, _) = post(
        &up,
        &c,
        "/v1/collections",
        json!({"name": "one", "dimension": 2, "metric": "dot"}),
    );
    assert_eq!(s, 200);
    let (s, e) = post(
        &up,
        &c,
        "/v1/collections",
        json!({"name": "two", "dimension": 2, "metric": "dot"}),
    );
    assert_eq!(s, 409, "{e}");
    assert!(e.to_string().contains("collections"), "{e}");
    let three: Vec<Value> = (0..3)
        .map(|i| json!({"id": i, "vector": [i as f32, 1.0]}))
        .collect();
    assert_eq!(
        post(
            &up,
            &c,
            "/v1/collections/one/points",
            json!({"points": three})
        )
        .0,
        200
    );
    let (s, e) = post(
        &up,
        &c,
        "/v1/collections/one/points",
        json!({"points": [{"id": 7, "vector": [1.0, 1.0]}]}),
    );
    assert_eq!(s, 409, "{e}");
    assert!(e.to_string().contains("vector_points"), "{e}");
    // Bytes: 3 vectors of 2 floats hold 24; a 51-byte payload more is past 64.
    let big =
        json!({"points": [{"id": 1, "vector": [5.0, 1.0], "payload": {"note": "x".repeat(40)}}]});
    let (s, e) = post(&up, &c, "/v1/collections/one/points", big);
    assert_eq!(s, 409, "{e}");
    assert!(e.to_string().contains("vector_bytes"), "{e}");
    let (_, one) = get(&up, &c, "/v1/collections/one");
    assert_eq!(one["bytes"], 24, "{one}");
    let (s, _) = post(
        &up,
        &c,
        "/v1/collections/one/points",
        json!({"points": [{"id": 1, "vector": [5.0, 1.0]}]}),
    );
    assert_eq!(s, 200, "replacing a point adds none");

    // Delete: the collection and its points are gone.
    let (s, _) = up.api(&a, reqwest::Method::DELETE, "/v1/collections/docs", None);
    assert_eq!(s, 200);
    assert_eq!(get(&up, &a, "/v1/collections/docs").0, 404);
}

#[test]
fn acknowledged_points_survive_kill_9_during_concurrent_upserts() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = start_in(dir.path(), &[]);
    let key = up.tenant_with_key("vec-durable", json!({}));
    let (s, _) = post(
        &up,
        &key,
        "/v1/collections",
        json!({"name": "log", "dimension": 8, "metric": "l2"}),
    );
    assert_eq!(s, 200);
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streams: Vec<_> = (0..4u64)
        .map(|stream| {
            let (server, key, acked, stop) = (up.server.clone(), key.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
                for batch in 0u64.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let ids: Vec<u64> = (0..20).map(|i| stream * 1_000_000 + batch * 20 + i).collect();
                    let points: Vec<Value> = ids
                        .iter()
                        .map(|id| json!({"id": id, "vector": [*id as f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], "payload": {"stream": stream}}))
                        .collect();
                    let sent = http
                        .post(format!("{server}/v1/collections/log/points"))
                        .bearer_auth(&key)
                        .json(&json!({"points": points}))
                        .send();
                    match sent {
                        Ok(r) if r.status().is_success() => acked.lock().unwrap().extend(ids),
                        _ => break,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 400 {
        assert!(Instant::now() < deadline, "upserts too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    up.child.kill().unwrap(); // SIGKILL
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in streams {
        s.join().unwrap();
    }
    drop(up);
    let acked = acked.lock().unwrap().clone();
    let up = start_in(dir.path(), &[]);
    let (s, c) = post(&up, &key, "/v1/collections/log/points/count", json!({}));
    assert_eq!(s, 200, "{c}");
    assert!(
        c["count"].as_u64().unwrap() >= acked.len() as u64,
        "{c} < {}",
        acked.len()
    );
    for id in &acked {
        let (s, p) = get(&up, &key, &format!("/v1/collections/log/points/{id}"));
        assert_eq!(s, 200, "acknowledged point {id} lost: {p}");
    }
    let probe = acked[acked.len() / 2];
    let (_, r) = post(
        &up,
        &key,
        "/v1/collections/log/points/search",
        json!({"vector": [probe as f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], "limit": 1}),
    );
    assert_eq!(ids(&r), vec![json!(probe)], "searchable after restart");
}

/// `atrium collection` with a tenant key: create, upsert from a JSON-lines
/// file, search, count with a filter; a bad line is named and its batch
/// not sent.
#[test]
fn the_cli_makes_fills_and_searches_a_collection() {
    let (up, dir) = start();
    let key = up.tenant_with_key("vec-cli", json!({}));
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args(args)
            .args(["--server", &up.server, "--token", &key])
            .output()
            .unwrap();
        common::outcome(&out)
    };
    let (ok, said) = cli(&["collection", "create", "docs", "--dimension", "3"]);
    assert!(
        ok && said.contains("docs") && said.contains("cosine"),
        "{said}"
    );
    let points = dir.path().join("points.jsonl");
    let upsert = [
        "collection",
        "upsert",
        "docs",
        "-f",
        points.to_str().unwrap(),
    ];
    std::fs::write(
        &points,
        "{\"id\": 1, \"vector\": [1, 0, 0], \"payload\": {\"lang\": \"de\"}}\n\
         {\"id\": 2, \"vector\": [0.9, 0.1, 0], \"payload\": {\"lang\": \"de\"}}\n\n\
         {\"id\": 3, \"vector\": [0, 0, 1], \"payload\": {\"lang\": \"en\"}}\n",
    )
    .unwrap();
    let (ok, said) = cli(&upsert);
    assert!(ok && said.contains('3'), "{said}");
    let (ok, said) = cli(&[
        "collection",
        "search",
        "docs",
        "--vector",
        "[1, 0, 0]",
        "--limit",
        "2",
        "-o",
        "json",
    ]);
    assert!(ok, "{said}");
    let hits: Value = serde_json::from_str(&said).unwrap();
    let order: Vec<&Value> = hits["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["id"])
        .collect();
    assert_eq!(order, [&json!(1), &json!(2)], "{said}");
    let de = r#"{"must": [{"key": "lang", "match": {"value": "de"}}]}"#;
    let (ok, said) = cli(&["collection", "count", "docs", "--filter", de, "-o", "json"]);
    assert!(ok, "{said}");
    assert_eq!(serde_json::from_str::<Value>(&said).unwrap()["count"], 2);

    std::fs::write(&points, "{\"id\": 4, \"vector\": [0, 1, 0]}\nnot json\n").unwrap();
    let (ok, said) = cli(&upsert);
    assert!(!ok && said.contains("line 2"), "{said}");
    let (_, said) = cli(&["collection", "count", "docs", "-o", "json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&said).unwrap()["count"],
        3,
        "nothing sent"
    );
    let (ok, said) = cli(&["collection", "list"]);
    assert!(
        ok && said.contains("docs") && said.contains("POINTS"),
        "{said}"
    );
}
