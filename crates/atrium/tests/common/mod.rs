//! What the binary's end-to-end tests share.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cloud;
pub mod ha;
pub mod kubectl;
pub mod oci;
pub mod up;

/// The `atrium` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_atrium");

/// Whether the test runs as root (the sandboxing agents need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// A loopback port free right now (the process under test binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asks a process to stop as Ctrl-C would (SIGTERM), so it stops its own
/// children too.
pub fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// Calls the control plane's API as the provider admin; panics (naming the
/// call) unless it succeeds.
pub fn admin_call(
    http: &reqwest::blocking::Client,
    server: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let mut req = http
        .request(method.clone(), format!("{server}{path}"))
        .bearer_auth(token);
    if !body.is_null() {
        req = req.json(&body);
    }
    let resp = req.send().unwrap();
    let status = resp.status();
    let v: serde_json::Value = resp.json().unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {v}");
    v
}

/// The placements of `tenant`'s deployment `deployment` (provider view).
pub fn placements_of(
    http: &reqwest::blocking::Client,
    server: &str,
    token: &str,
    tenant: &str,
    deployment: &str,
) -> Vec<serde_json::Value> {
    let all = admin_call(
        http,
        server,
        token,
        reqwest::Method::GET,
        &format!("/v1/placements?tenant={tenant}"),
        serde_json::Value::Null,
    );
    all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["deployment_name"] == deployment)
        .cloned()
        .collect()
}

/// A one-time join token for a node or gateway (`plane`) named `name` in
/// site `local`, issued by the provider.
pub fn join_token(server: &str, admin_token: &str, plane: &str, name: &str) -> String {
    let http = reqwest::blocking::Client::new();
    let created = admin_call(
        &http,
        server,
        admin_token,
        reqwest::Method::POST,
        "/v1/join-tokens",
        serde_json::json!({"plane": plane, "name": name, "site": "local"}),
    );
    created["secret"].as_str().unwrap().to_string()
}

/// Starts `atrium gateway` on a free loopback port against the control
/// plane at `server`, joined with a join token the provider (`token`)
/// issues for it (a restart finds its credential in `data_dir`);
/// answers the process and the gateway's base URL.
pub fn spawn_gateway(
    server: &str,
    token: &str,
    data_dir: &std::path::Path,
    secret: &str,
) -> (std::process::Child, String) {
    spawn_gateway_with(server, token, data_dir, secret, &[])
}

/// `spawn_gateway` with extra environment.
pub fn spawn_gateway_with(
    server: &str,
    token: &str,
    data_dir: &std::path::Path,
    secret: &str,
    env: &[(&str, String)],
) -> (std::process::Child, String) {
    let port = free_port();
    // A restart (maybe while the control plane is down) finds its
    // credential in its data directory.
    let join = if data_dir.join("gateway/gateway.credential").exists() {
        Vec::new()
    } else {
        let t = join_token(server, token, "gateway", &format!("gw-{port}"));
        vec!["--join-token".to_string(), t]
    };
    let child = std::process::Command::new(BIN)
        .args([
            "gateway",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log",
            "warn",
        ])
        .args(["--server", server])
        .args(join)
        .env("ATRIUM_GATEWAY_SECRET", secret)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

/// The token a gateway with data directory `data_dir` (as given to
/// `--data-dir`) requires for `/metrics`. The gateway writes it as it
/// starts, which in `atrium up` may be after the agent has registered its
/// node: so this waits for the file.
pub fn metrics_token(data_dir: &std::path::Path) -> String {
    written(
        &data_dir.join("gateway/metrics.token"),
        "the gateway did not write its metrics token",
    )
}

/// The trimmed contents of `file` once a process has written it (non-empty
/// within 30 s, or the test fails saying `what`).
pub fn written(file: &std::path::Path, what: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match std::fs::read_to_string(file) {
            Ok(t) if !t.trim().is_empty() => return t.trim().to_string(),
            _ => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: {}",
                    file.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Reads one HTTP/1.1 request (head, then a `Content-Length` body) from a
/// test upstream's connection: the body, or `None` once the client is gone.
pub fn read_request(reader: &mut impl std::io::BufRead) -> Option<Vec<u8>> {
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

/// Waits up to `secs` for `ok`, failing the test with `what` after.
/// Whether a finished command succeeded, and what it printed (standard
/// output, then errors).
pub fn outcome(out: &std::process::Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `atrium server` on `port`, its data in `data_dir`, with `extra`
/// arguments; returned once `/healthz` answers (failing the test if the
/// process exits first).
pub fn spawn_server(data_dir: &std::path::Path, port: u16, extra: &[&str]) -> std::process::Child {
    spawn_server_at("127.0.0.1", data_dir, port, extra)
}

/// `spawn_server`, listening on `ip` (an address other namespaces reach).
pub fn spawn_server_at(
    ip: &str,
    data_dir: &std::path::Path,
    port: u16,
    extra: &[&str],
) -> std::process::Child {
    let mut child = std::process::Command::new(BIN)
        .args(["server", "--listen", &format!("{ip}:{port}")])
        .args(["--log", "warn"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&format!("http://{ip}:{port}/healthz"), &mut child);
    child
}

/// Waits up to 30 s for `url` to answer 2xx, failing the test if `child`
/// exits first.
pub fn wait_healthy(url: &str, child: &mut std::process::Child) {
    wait_for(url, 30, || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{url}: the process exited early: {status}");
        }
        reqwest::blocking::get(url).is_ok_and(|r| r.status().is_success())
    });
}

/// The provider's admin token a server wrote into `data_dir`.
pub fn admin_token(data_dir: &std::path::Path) -> String {
    std::fs::read_to_string(data_dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// Stops a process as an operator would: SIGTERM, up to 20 s to finish
/// (an agent stops its engines and removes their sandboxes), then SIGKILL.
pub fn stop(child: &mut std::process::Child) {
    terminate(child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    kill9(child);
}

/// SIGKILL, and reap.
pub fn kill9(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A process killed (SIGKILL) when the test ends, however it ends.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

/// `atrium node isolation -o json` on the node whose agent keeps its data
/// in `data_dir`, with tenant networks in `10.<octet>.0.0/16`.
pub fn isolation_report(data_dir: &std::path::Path, octet: u8) -> (bool, serde_json::Value) {
    let out = std::process::Command::new(BIN)
        .args(["node", "isolation", "-o", "json", "--tenant-network"])
        .arg(format!("10.{octet}.0.0/16"))
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), report)
}

/// Runs `python3 -c script args…`, which must succeed, and reads what it
/// printed as JSON.
pub fn python_json(script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
