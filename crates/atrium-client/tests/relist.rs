//! A follower whose watch position the control plane no longer keeps (410
//! after the change log was compacted) lists again and follows on from
//! the new list, against a minimal HTTP control plane that answers
//! exactly so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_api::Site;
use atrium_client::{Api, ControlPlane, Update};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn site(name: &str) -> serde_json::Value {
    serde_json::json!({"id": format!("sit_{name}"), "name": name, "revision": 1,
        "created_at": "t", "updated_at": "t", "spec": {"kind": "core", "jurisdiction": "eu"}})
}

/// Answers lists (the first with `old`, then with `new`), a watch from
/// the first list's revision with 410, and any later watch by holding it
/// open.
async fn control_plane(lists: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let lists = lists.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let line = String::from_utf8_lossy(&request)
                    .lines()
                    .next()
                    .unwrap()
                    .to_string();
                let (status, body) = if !line.contains("watch=true") {
                    let n = lists.fetch_add(1, Ordering::SeqCst);
                    let (items, revision) = if n == 0 {
                        (vec![site("old")], 5)
                    } else {
                        (vec![site("new")], 9)
                    };
                    let list = serde_json::json!({"items": items, "revision": revision});
                    ("200 OK", list.to_string())
                } else if line.contains("since=5") {
                    let gone = serde_json::json!({"error": {"code": "expired",
                        "message": "compacted", "details": {"requested": 5, "oldest": 7}}});
                    ("410 Gone", gone.to_string())
                } else {
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                                transfer-encoding: chunked\r\n\r\n";
                    let _ = conn.write_all(head.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_follower_refused_with_410_lists_again_and_follows_on() {
    let lists = Arc::new(AtomicUsize::new(0));
    let url = control_plane(lists.clone()).await;
    let cp = ControlPlane::new(&url, "atr_test");
    let snapshots: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let seen = snapshots.clone();
    let follow = tokio::spawn(async move {
        Api::<Site>::all(&cp)
            .follow(move |u| {
                if let Update::Snapshot(items) = u {
                    let names = items.into_iter().map(|s| s.name).collect();
                    seen.lock().unwrap().push(names);
                }
            })
            .await
    });
    for _ in 0..100 {
        if snapshots.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follow.abort();
    let snapshots = snapshots.lock().unwrap().clone();
    assert_eq!(
        snapshots,
        [vec!["old".to_string()], vec!["new".to_string()]]
    );
    assert_eq!(
        lists.load(Ordering::SeqCst),
        2,
        "listed once more, then followed"
    );
}
