//! Join tokens of several uses, as a Kubernetes DaemonSet of agents needs
//! (each pod joins under its node's name): bounded, racing joins spend
//! exactly the uses there are, and a token that names no node can never
//! take over a node that has joined.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reqwest::blocking::Client;
use reqwest::Method as M;
use serde_json::{json, Value};

mod common;

use common::{admin_call, admin_token, free_port, spawn_server, Proc};

fn join(http: &Client, server: &str, token: &str, name: Option<&str>) -> (u16, Value) {
    let mut req = http.post(format!("{server}/v1/join")).bearer_auth(token);
    if let Some(n) = name {
        req = req.json(&json!({ "name": n }));
    }
    let resp = req.send().unwrap();
    (resp.status().as_u16(), resp.json().unwrap_or(Value::Null))
}

#[test]
fn a_token_of_several_uses_joins_new_names_only_and_no_more_than_its_uses() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Proc(spawn_server(dir.path(), port, &[]));
    let server = format!("http://127.0.0.1:{port}");
    let admin = admin_token(dir.path());
    let http = Client::new();
    admin_call(
        &http,
        &server,
        &admin,
        M::POST,
        "/v1/sites",
        json!({"name": "local", "spec": {"kind": "core", "jurisdiction": "EU"}}),
    );
    let token = |body: Value| {
        admin_call(&http, &server, &admin, M::POST, "/v1/join-tokens", body)["secret"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let many = token(json!({"plane": "node", "site": "local", "uses": 3}));

    // Unnamed tokens need the joiner's name, and a valid one.
    assert_eq!(join(&http, &server, &many, None).0, 400);
    assert_eq!(join(&http, &server, &many, Some("../etc")).0, 400);
    let (status, n1) = join(&http, &server, &many, Some("n1"));
    assert_eq!(status, 201, "{n1}");
    assert_eq!(n1["credential"]["spec"]["name"], "n1");
    // The same token cannot take n1 over, and n1's credential still works.
    let (status, refused) = join(&http, &server, &many, Some("n1"));
    assert_eq!(status, 409, "{refused}");
    let n1_secret = n1["secret"].as_str().unwrap();
    let own = http
        .get(format!("{server}/v1/nodes"))
        .bearer_auth(n1_secret)
        .send()
        .unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(join(&http, &server, &many, Some("n2")).0, 201);
    assert_eq!(join(&http, &server, &many, Some("n3")).0, 201);
    // Its uses are spent, refused attempts included in none of them.
    assert_eq!(join(&http, &server, &many, Some("n4")).0, 401);

    // A token naming its node joins once, as that node only.
    let resp = http
        .post(format!("{server}/v1/join-tokens"))
        .bearer_auth(&admin)
        .json(&json!({"plane": "node", "name": "n5", "site": "local", "uses": 2}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 400, "a named token of two uses");
    let named = token(json!({"plane": "node", "name": "n5", "site": "local"}));
    assert_eq!(join(&http, &server, &named, Some("n6")).0, 400);
    assert_eq!(join(&http, &server, &named, Some("n5")).0, 201);

    // Racing joins spend exactly the uses there are.
    let five = token(json!({"plane": "node", "site": "local", "uses": 5}));
    let joined: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let (http, server, five) = (http.clone(), server.clone(), five.clone());
                s.spawn(move || join(&http, &server, &five, Some(&format!("race-{i}"))).0 == 201)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum()
    });
    assert_eq!(joined, 5);
    let listed = admin_call(
        &http,
        &server,
        &admin,
        M::GET,
        "/v1/credentials",
        Value::Null,
    );
    let racers = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["spec"]["name"].as_str().unwrap().starts_with("race-"))
        .count();
    assert_eq!(racers, 5);
}
