//! The image registry through the real binary and a real OCI client:
//! skopeo pushes a busybox image with one tenant's key and pulls it back;
//! another tenant can neither pull nor list it; corrupted and over-quota
//! uploads are refused and leave nothing; deleted images are collected.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::oci::{busybox_layout, sha256};
use common::{admin_call, admin_token, spawn_server, Proc};
use reqwest::blocking::Client;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Makes skopeo available as the project's setup does, or fails saying so.
fn skopeo() -> &'static str {
    let ok = Command::new("skopeo").arg("--version").output();
    assert!(
        ok.is_ok_and(|o| o.status.success()),
        "skopeo is not installed: scripts/test.sh installs it (apt-get install skopeo)"
    );
    "skopeo"
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

struct Registry {
    url: String,
    host: String,
    admin: String,
    http: Client,
}

impl Registry {
    fn tenant(&self, name: &str, quota: Value) -> String {
        admin_call(
            &self.http,
            &self.url,
            &self.admin,
            Method::POST,
            "/v1/tenants",
            json!({"name": name, "spec": {"quota": quota}}),
        );
        let key = admin_call(
            &self.http,
            &self.url,
            &self.admin,
            Method::POST,
            "/v1/keys",
            json!({"name": "push", "tenant": name, "spec": {"scopes": ["admin"]}}),
        );
        key["secret"].as_str().unwrap().to_string()
    }

    /// The storage `tenant` uses, in bytes, as its quota shows it.
    fn storage_used(&self, tenant: &str) -> u64 {
        let view = admin_call(
            &self.http,
            &self.url,
            &self.admin,
            Method::GET,
            &format!("/v1/quotas/{tenant}"),
            Value::Null,
        );
        let shown = view["used"]["storage"].as_str().unwrap().to_string();
        shown
            .parse()
            .unwrap_or_else(|_| panic!("storage {shown:?}"))
    }

    fn catalog(&self, key: &str) -> Value {
        self.send(Method::GET, "/v2/_catalog", key).json().unwrap()
    }

    /// Collects the registry's garbage now, as the provider.
    fn collect_garbage(&self) -> Value {
        admin_call(
            &self.http,
            &self.url,
            &self.admin,
            Method::POST,
            "/v1/registry/gc?grace_seconds=0",
            Value::Null,
        )
    }

    /// Runs the CLI with `key`; whether it succeeded, and what it printed.
    fn cli(&self, args: &[&str], key: &str) -> (bool, String) {
        run(Command::new(common::BIN)
            .args(args)
            .args(["--server", &self.url, "--token", key]))
    }

    fn send(&self, method: Method, path: &str, key: &str) -> reqwest::blocking::Response {
        self.call(method, path, key).send().unwrap()
    }

    fn call(&self, method: Method, path: &str, key: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    fn push(&self, layout: &Path, image: &str, key: &str) -> (bool, String) {
        run(Command::new(skopeo())
            .args(["copy", "--dest-tls-verify=false", "--dest-creds"])
            .arg(format!("anyone:{key}"))
            .arg(format!("oci:{}:1", layout.display()))
            .arg(format!("docker://{}/{image}", self.host)))
    }

    fn inspect(&self, image: &str, key: &str) -> (bool, String) {
        run(Command::new(skopeo())
            .args(["inspect", "--tls-verify=false", "--creds"])
            .arg(format!("anyone:{key}"))
            .arg(format!("docker://{}/{image}", self.host)))
    }
}

#[test]
fn tenants_push_and_pull_with_real_clients_and_reach_only_their_own_images() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let data = dir.path().join("server");
    let _server = Proc(spawn_server(&data, port, &[]));
    let reg = Registry {
        url: format!("http://127.0.0.1:{port}"),
        host: format!("127.0.0.1:{port}"),
        admin: admin_token(&data),
        http: Client::new(),
    };
    let acme = reg.tenant("acme", json!({}));
    let globex = reg.tenant("globex", json!({"storage": "256Ki"}));
    let (layout_manifest, blobs) = busybox_layout(dir.path());
    let layout = dir.path().join("oci");

    // Without credentials: 401 and where to get a token.
    let resp = reg.http.get(format!("{}/v2/", reg.url)).send().unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with(&format!(
            "Bearer realm=\"http://{}/v1/registry/token\"",
            reg.host
        )),
        "{challenge}"
    );

    // acme pushes with its key; skopeo sees the digest it pushed.
    let (ok, out) = reg.push(&layout, "acme/busybox:1", &acme);
    assert!(ok, "push: {out}");
    let (ok, out) = reg.inspect("acme/busybox:1", &acme);
    assert!(ok, "inspect: {out}");
    let inspected: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspected["Layers"], json!([blobs[1]]), "{inspected:#}");
    // The registry serves the manifest pushed, under the digest it names.
    let served = reg.send(Method::GET, "/v2/acme/busybox/manifests/1", &acme);
    assert_eq!(served.status(), StatusCode::OK);
    let named = served.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    let manifest_digest = sha256(&served.bytes().unwrap());
    assert_eq!(named, manifest_digest);
    assert_eq!(inspected["Digest"], json!(manifest_digest), "{inspected:#}");
    assert_eq!(manifest_digest, layout_manifest);

    // `atrium image list` shows it to acme, with the digest skopeo saw.
    let (ok, out) = reg.cli(&["image", "list", "-o", "json"], &acme);
    assert!(ok, "{out}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let config_and_layer: u64 = blobs
        .iter()
        .map(|b| {
            std::fs::metadata(layout.join("blobs/sha256").join(&b[7..]))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(
        listed["items"],
        json!([{"repository": "acme/busybox", "tag": "1", "digest": manifest_digest,
                "size": config_and_layer}])
    );

    // A tenant holding images cannot be deleted: one made later under its
    // name would own them.
    let delete = reg.send(Method::DELETE, "/v1/tenants/acme", &reg.admin);
    assert_eq!(delete.status(), StatusCode::CONFLICT);
    let refusal: Value = delete.json().unwrap();
    assert_eq!(
        refusal["error"]["details"]["names"],
        json!(["acme/busybox"]),
        "{refusal}"
    );

    // Its bytes count against acme's storage quota.
    let layer_bytes = std::fs::metadata(layout.join("blobs/sha256").join(&blobs[1][7..]))
        .unwrap()
        .len();
    assert!(reg.storage_used("acme") > layer_bytes);

    // And pulls it back, byte for byte.
    let pulled = dir.path().join("pulled");
    let (ok, out) = run(Command::new(skopeo())
        .args(["copy", "--src-tls-verify=false", "--src-creds"])
        .arg(format!("anyone:{acme}"))
        .arg(format!("docker://{}/acme/busybox:1", reg.host))
        .arg(format!("oci:{}:1", pulled.display())));
    assert!(ok, "pull: {out}");
    for blob in &blobs {
        let hex = &blob[7..];
        assert_eq!(
            std::fs::read(pulled.join("blobs/sha256").join(hex)).unwrap(),
            std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
        );
    }

    // globex can neither pull nor list it, nor mount its layer, nor learn
    // that it exists.
    let (ok, out) = reg.inspect("acme/busybox:1", &globex);
    assert!(!ok, "globex inspected acme's image: {out}");
    assert!(
        out.contains("not found") || out.contains("unknown"),
        "{out}"
    );
    let tags = reg.send(Method::GET, "/v2/acme/busybox/tags/list", &globex);
    assert_eq!(tags.status(), StatusCode::NOT_FOUND);
    let missing = reg.send(Method::GET, "/v2/acme/nothing/tags/list", &globex);
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        tags.text().unwrap(),
        missing
            .text()
            .unwrap()
            .replace("acme/nothing", "acme/busybox")
    );
    let blob = reg.send(
        Method::GET,
        &format!("/v2/acme/busybox/blobs/{}", blobs[1]),
        &globex,
    );
    assert_eq!(blob.status(), StatusCode::NOT_FOUND);
    let catalog = reg.catalog(&globex);
    assert_eq!(catalog["repositories"], json!([]));
    let catalog = reg.catalog(&acme);
    assert_eq!(catalog["repositories"], json!(["acme/busybox"]));
    let mount = reg.send(
        Method::POST,
        &format!(
            "/v2/globex/stolen/blobs/uploads/?mount={}&from=acme/busybox",
            blobs[1]
        ),
        &globex,
    );
    assert_eq!(
        mount.status(),
        StatusCode::ACCEPTED,
        "a mount from another tenant must not happen"
    );
    let stolen = reg.send(
        Method::HEAD,
        &format!("/v2/globex/stolen/blobs/{}", blobs[1]),
        &globex,
    );
    assert_eq!(stolen.status(), StatusCode::NOT_FOUND);
    // Nor push into acme's namespace, or the provider's.
    let (ok, out) = reg.push(&layout, "acme/busybox:2", &globex);
    assert!(!ok, "globex pushed into acme: {out}");
    let (ok, out) = reg.push(&layout, "library/busybox:1", &acme);
    assert!(!ok, "a tenant pushed into library/: {out}");

    // A corrupted upload is refused and stores nothing.
    let good = b"the content the client meant".to_vec();
    let claimed = sha256(&good);
    let start = reg.send(Method::POST, "/v2/acme/busybox/blobs/uploads/", &acme);
    assert_eq!(start.status(), StatusCode::ACCEPTED);
    let location = start.headers()["location"].to_str().unwrap().to_string();
    let put = reg
        .call(Method::PUT, &format!("{location}?digest={claimed}"), &acme)
        .body(b"the content an attacker sent".to_vec())
        .send()
        .unwrap();
    assert_eq!(put.status(), StatusCode::BAD_REQUEST);
    let err: Value = put.json().unwrap();
    assert_eq!(err["errors"][0]["code"], "DIGEST_INVALID", "{err}");
    let head = reg.send(
        Method::HEAD,
        &format!("/v2/acme/busybox/blobs/{claimed}"),
        &acme,
    );
    assert_eq!(head.status(), StatusCode::NOT_FOUND);

    // A chunked upload: chunks must follow on, then the whole is verified.
    let start = reg.send(Method::POST, "/v2/acme/busybox/blobs/uploads/", &acme);
    let location = start.headers()["location"].to_str().unwrap().to_string();
    let first = reg
        .call(Method::PATCH, &location, &acme)
        .header("content-range", "0-3")
        .body(good[..4].to_vec())
        .send()
        .unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(first.headers()["range"], "0-3");
    let gap = reg
        .call(Method::PATCH, &location, &acme)
        .header("content-range", "10-12")
        .body(good[10..13].to_vec())
        .send()
        .unwrap();
    assert_eq!(gap.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let done = reg
        .call(Method::PUT, &format!("{location}?digest={claimed}"), &acme)
        .body(good[4..].to_vec())
        .send()
        .unwrap();
    assert_eq!(done.status(), StatusCode::CREATED);
    let fetched = reg.send(
        Method::GET,
        &format!("/v2/acme/busybox/blobs/{claimed}"),
        &acme,
    );
    assert_eq!(fetched.bytes().unwrap().to_vec(), good);

    // globex's 256 KiB storage quota does not hold busybox: refused, and
    // once garbage is collected nothing of it is left.
    let (ok, out) = reg.push(&layout, "globex/busybox:1", &globex);
    assert!(!ok, "an over-quota push succeeded: {out}");
    assert!(out.contains("quota"), "{out}");
    let gc = reg.collect_garbage();
    assert_eq!(reg.storage_used("globex"), 0);
    let tags = reg.send(Method::GET, "/v2/globex/busybox/tags/list", &globex);
    assert_eq!(tags.status(), StatusCode::NOT_FOUND, "gc: {gc}");

    // Deleted, the image's blobs are collected.
    let (ok, out) = reg.cli(&["image", "delete", "acme/busybox:1"], &acme);
    assert!(ok, "{out}");
    assert!(out.contains(&manifest_digest), "{out}");
    let (ok, out) = reg.cli(&["image", "delete", "acme/busybox:1"], &acme);
    assert!(
        !ok && out.contains("MANIFEST_UNKNOWN (404): manifest \"acme/busybox:1\" not found"),
        "{out}"
    );
    let (ok, _) = reg.inspect("acme/busybox:1", &acme);
    assert!(!ok, "the deleted tag still resolves");
    let gc = reg.collect_garbage();
    assert!(gc["blobs_removed"].as_u64().unwrap() >= 3, "{gc}");
    let blobs_dir = data.join("registry/blobs/sha256");
    for blob in blobs.iter().chain([&manifest_digest]) {
        assert!(
            !blobs_dir.join(&blob[7..]).exists(),
            "{blob} was not collected"
        );
    }
    assert_eq!(reg.storage_used("acme"), 0);
    let catalog = reg.catalog(&acme);
    assert_eq!(catalog["repositories"], json!([]));
    let refused = reg.send(Method::POST, "/v1/registry/gc", &acme);
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // The provider publishes to library/: every tenant reads it, none
    // changes it, and what a manifest uses survives garbage collection.
    let (ok, out) = reg.push(&layout, "library/busybox:1", &reg.admin);
    assert!(ok, "the provider's push: {out}");
    let (ok, out) = reg.inspect("library/busybox:1", &globex);
    assert!(ok, "a tenant reading library/: {out}");
    assert_eq!(
        reg.catalog(&acme)["repositories"],
        json!(["library/busybox"])
    );
    let (ok, out) = reg.cli(&["image", "delete", "library/busybox:1"], &globex);
    assert!(!ok && out.contains("DENIED (403)"), "{out}");
    reg.collect_garbage();
    for blob in blobs.iter().chain([&manifest_digest]) {
        assert!(blobs_dir.join(&blob[7..]).exists(), "{blob} was collected");
    }
    assert_eq!(reg.storage_used("globex"), 0);
}
