//! Several `atrium server` processes on one PostgreSQL database: every one
//! serves the API, the controllers run on exactly one (the holder of their
//! lease), and when that one is killed another takes them over.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use atrium_store::testing::{fresh_database_url, TestBackend};

mod common;

use common::ha::{deploy, leading, one_node_world, placed};
use common::{admin_token, free_port, kill9, spawn_server, wait_for, Proc};

fn start(dir: &Path, url: &str) -> (Proc, String) {
    let port = free_port();
    let child = spawn_server(dir, port, &["--database-url", url]);
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

#[test]
fn controllers_run_on_one_server_and_move_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let url = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fresh_database_url(TestBackend::Postgres, dir.path()));
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let (mut a, a_url) = start(&a_dir, &url);
    let (_b, b_url) = start(&b_dir, &url);
    let token = admin_token(&a_dir);
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Exactly one leads: the first to start.
    wait_for("a leads", 10, || leading(&http, &a_url));
    assert!(!leading(&http, &b_url), "two servers lead at once");

    // Either serves the API; the leader's controller places what was
    // written through the other.
    one_node_world(&http, &b_url, &token);
    deploy(&http, &b_url, &token, "first");
    wait_for("first placed", 10, || {
        placed(&http, &b_url, &token, "first") == 1
    });

    // The leader dies without a word: the other takes the lease when it
    // lapses (1.5 s) and places what is written meanwhile.
    kill9(&mut a.0);
    let killed = Instant::now();
    deploy(&http, &b_url, &token, "second");
    wait_for("b leads", 20, || leading(&http, &b_url));
    wait_for("second placed", 10, || {
        placed(&http, &b_url, &token, "second") == 1
    });
    let took = killed.elapsed();
    eprintln!("controllers moved and placed in {took:?} after the leader's kill -9");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(
        placed(&http, &b_url, &token, "first"),
        1,
        "nothing placed twice"
    );

    // The killed server comes back as a follower: b keeps the lease.
    let (_a, a_url) = start(&a_dir, &url);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !leading(&http, &a_url),
        "the restarted server took the lease from a live leader"
    );
    assert!(leading(&http, &b_url));
    deploy(&http, &a_url, &token, "third");
    wait_for("third placed", 10, || {
        placed(&http, &a_url, &token, "third") == 1
    });
}
