//! A stand-in for the Kubernetes API server, for tests (feature
//! `testing`): no kube-apiserver can run on the machines the tests run
//! on. It records every request (method, target, content type, body) and
//! keeps the pods applied to it: an applied pod is at once `Running` and
//! `Ready` at a pod IP, as a kubelet would report it — unless its image
//! starts with `refused/`: that pod is refused (422), as an admission
//! would refuse it; lists filter by an
//! equality label selector; a watch sends each pod as `ADDED` and ends;
//! other applies are answered with what was applied. What it checks is
//! what the driver sends, not Kubernetes' own semantics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the API server got it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Debug, Default)]
pub struct State {
    pub seen: Vec<Seen>,
    /// (namespace, name) → pod.
    pub pods: BTreeMap<(String, String), Value>,
}

/// The fake API server, serving on its own thread until the process ends.
#[derive(Debug, Clone)]
pub struct FakeApi {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

/// The IP the fake kubelet gives every pod.
pub const POD_IP: &str = "10.4.0.7";

impl FakeApi {
    pub fn start() -> FakeApi {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| {
            #[allow(clippy::panic)]
            {
                panic!("fake Kubernetes API: cannot bind: {e}")
            }
        });
        let url = format!(
            "http://{}",
            std_listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(serve(std_listener, shared));
        });
        FakeApi { url, state }
    }

    /// A pod as if someone had made it before.
    pub fn seed_pod(&self, pod: Value) {
        let key = (
            pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        if let Ok(mut s) = self.state.lock() {
            s.pods.insert(key, pod);
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .lock()
            .map(|s| s.seen.clone())
            .unwrap_or_default()
    }

    /// A kubeconfig naming this server (no credentials: it asks none).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.url
        )
    }
}

fn running(mut pod: Value) -> Value {
    pod["status"] = json!({"phase": "Running", "podIP": POD_IP,
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "replica", "image": "", "imageID": "", "ready": true, "restartCount": 0}]});
    pod
}

/// Whether `pod`'s labels hold every `k=v` of `selector`.
fn selected(pod: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|pair| {
        pair.split_once('=')
            .is_some_and(|(k, v)| pod["metadata"]["labels"][k] == v)
    })
}

fn query_value(target: &str, key: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then(|| {
            v.replace("%2F", "/")
                .replace("%3D", "=")
                .replace("%2C", ",")
        })
    })
}

/// What the server answers to one request.
fn answer(state: &Mutex<State>, method: &str, target: &str, body: &Value) -> (u16, String) {
    let Ok(mut s) = state.lock() else {
        return (500, "{}".into());
    };
    let path = target.split('?').next().unwrap_or_default();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/namespaces/{ns}/pods/{name}
    let pod_key = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name] => Some((ns.to_string(), name.to_string())),
        _ => None,
    };
    match (method, pod_key) {
        ("PATCH", Some(_))
            if body["spec"]["containers"][0]["image"]
                .as_str()
                .is_some_and(|i| i.contains("/refused/")) =>
        {
            (
                422,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "code": 422, "reason": "Invalid", "message": "admission webhook denied the pod"})
                .to_string(),
            )
        }
        ("PATCH", Some(key)) => {
            let pod = running(body.clone());
            s.pods.insert(key, pod.clone());
            (200, pod.to_string())
        }
        ("DELETE", Some(key)) => (200, s.pods.remove(&key).unwrap_or(Value::Null).to_string()),
        ("GET", None) if path == "/api/v1/pods" => {
            let selector = query_value(target, "labelSelector").unwrap_or_default();
            let pods: Vec<&Value> = s.pods.values().filter(|p| selected(p, &selector)).collect();
            let text = if query_value(target, "watch").as_deref() == Some("true") {
                pods.iter()
                    .map(|p| format!("{}\n", json!({"type": "ADDED", "object": p})))
                    .collect()
            } else {
                json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": "7"}, "items": pods})
                .to_string()
            };
            (200, text)
        }
        _ => (200, body.to_string()),
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<Mutex<State>>) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    while let Ok((mut conn, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let head_end = loop {
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                let mut chunk = [0u8; 4096];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap_or_default()
            };
            let length: usize = header("content-length").parse().unwrap_or(0);
            while buf.len() < head_end + length {
                let mut chunk = [0u8; 65536];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let mut first = head.lines().next().unwrap_or_default().split(' ');
            let method = first.next().unwrap_or_default().to_string();
            let target = first.next().unwrap_or_default().to_string();
            let body: Value =
                serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
            let (code, text) = answer(&state, &method, &target, &body);
            if let Ok(mut s) = state.lock() {
                s.seen.push(Seen {
                    method,
                    target,
                    content_type: header("content-type"),
                    body,
                });
            }
            let response = format!(
                "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\nconnection: close\r\n\
                 content-length: {}\r\n\r\n{text}",
                text.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}
