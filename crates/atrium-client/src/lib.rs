//! How the runtime and data planes talk to the control plane: plain HTTP
//! calls, and `follow`, which lists a kind and then watches it from the
//! list's revision, resuming from the last revision seen after any
//! disconnect — so a follower sees every change exactly once, in order, and
//! rides out control-plane restarts.
//!
//! A plane authenticates with its credential (`credential`); when the
//! control plane refuses it, the credential file is read again, so a
//! rotation made by another process is picked up without a restart.

mod api;
mod credential;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use api::{encode, Api};
pub use credential::{write_private, CredentialFile};

use atrium_api::{ErrorBody, ListResponse, WatchEvent, WatchEventType};
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// The API's refusal: `code (status): message`, then each field at
    /// fault on its own line.
    #[error("{}", refusal(*status, body))]
    Status { status: u16, body: String },
    #[error("bad answer from the control plane: {0}")]
    Decode(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code (`already_exists`, `quota_exceeded`, ...).
    pub fn code(&self) -> Option<String> {
        match self {
            ClientError::Status { body, .. } => serde_json::from_str::<ErrorBody>(body)
                .ok()
                .map(|b| b.error.code),
            _ => None,
        }
    }
}

/// One field at fault, as `details.fields` lists them.
#[derive(serde::Deserialize)]
struct FieldFault {
    field: String,
    message: String,
}

/// The image registry's refusal (`/v2/`), in the OCI shape.
#[derive(serde::Deserialize)]
struct RegistryErrors {
    errors: Vec<RegistryError>,
}

#[derive(serde::Deserialize)]
struct RegistryError {
    code: String,
    message: String,
}

fn refusal(status: u16, body: &str) -> String {
    if let Ok(RegistryErrors { errors }) = serde_json::from_str::<RegistryErrors>(body) {
        if let Some(first) = errors.first() {
            return format!("{} ({status}): {}", first.code, first.message);
        }
    }
    let Ok(ErrorBody { error }) = serde_json::from_str::<ErrorBody>(body) else {
        return format!("control plane answered {status}: {body}");
    };
    let mut message = format!("{} ({status}): {}", error.code, error.message);
    let fields: Vec<FieldFault> = error
        .details
        .get("fields")
        .cloned()
        .and_then(|f| serde_json::from_value(f).ok())
        .unwrap_or_default();
    for f in fields {
        message.push_str(&format!("\n  {}: {}", f.field, f.message));
    }
    message
}

#[derive(Clone)]
pub struct ControlPlane {
    http: reqwest::Client,
    base: String,
    token: Arc<RwLock<String>>,
    /// Where a plane's credential is kept, to read again when refused.
    credential_file: Option<Arc<PathBuf>>,
}

/// What a follower is told.
#[derive(Debug)]
pub enum Update<T = Value> {
    /// The complete current set (after a (re)list): replace what you hold.
    Snapshot(Vec<T>),
    Added(T),
    Modified(T),
    Deleted(T),
}

impl ControlPlane {
    pub fn new(base: &str, token: &str) -> ControlPlane {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        ControlPlane {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: Arc::new(RwLock::new(token.to_string())),
            credential_file: None,
        }
    }

    /// A plane's client: `credential`'s server and token, the token read
    /// again from `path` whenever the control plane refuses it.
    pub fn with_credential(credential: &CredentialFile, path: &Path) -> ControlPlane {
        ControlPlane {
            credential_file: Some(Arc::new(path.to_path_buf())),
            ..ControlPlane::new(&credential.server, &credential.token)
        }
    }

    /// The control plane's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn token(&self) -> String {
        self.token.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Reads the credential file again; true when it holds another token
    /// (rotated since this process read it).
    fn refresh(&self) -> bool {
        let Some(path) = &self.credential_file else {
            return false;
        };
        let Ok(Some(file)) = CredentialFile::load(path) else {
            return false;
        };
        match self.token.write() {
            Ok(mut token) if *token != file.token => {
                tracing::info!(path = %path.display(), "control plane: using the rotated credential");
                *token = file.token;
                true
            }
            _ => false,
        }
    }

    /// A call with a body that is already JSON text (large batches are
    /// assembled without building a document first). Sent again once with
    /// a rotated credential when the first is refused.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<Value, ClientError> {
        let resp = self.send_once_more_if_refused(method, path, body).await?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Status { status, body: text });
        }
        if text.is_empty() {
            // `202 Accepted` and `204 No Content` say all they have to say.
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A GET whose answer is kept as the bytes sent (a manifest is named by
    /// the digest of exactly those bytes).
    pub async fn get_bytes(&self, path: &str) -> Result<bytes::Bytes, ClientError> {
        let resp = self
            .send_once_more_if_refused(Method::GET, path, None)
            .await?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        if !(200..300).contains(&status) {
            let body = String::from_utf8_lossy(&bytes).into_owned();
            return Err(ClientError::Status { status, body });
        }
        Ok(bytes)
    }

    /// A GET that asks for `accept` and hands back the answer itself, to
    /// read as it streams (an image's layers): 2xx only, else the status
    /// and body as an error. Sent once more with a rotated credential when
    /// refused.
    pub async fn get_streamed(
        &self,
        path: &str,
        accept: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = self
            .with_token_once_more(|| {
                self.http
                    .get(format!("{}{path}", self.base))
                    .header(reqwest::header::ACCEPT, accept)
            })
            .await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.text().await.unwrap_or_default();
            return Err(ClientError::Status { status, body });
        }
        Ok(resp)
    }

    /// Sends what `request` builds with this client's token, and once more
    /// with a rotated credential when the first is refused.
    async fn with_token_once_more(
        &self,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let attempt = || request().bearer_auth(self.token()).send();
        let mut resp = attempt()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        if resp.status().as_u16() == 401 && self.refresh() {
            resp = attempt()
                .await
                .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        }
        Ok(resp)
    }

    /// Passes a tenant's own call on as it came (its `authorization`, not
    /// this client's token): the control plane decides what the caller may
    /// do. Gives back the status, content type and body, whatever they are.
    pub async fn forward(
        &self,
        method: Method,
        path_and_query: &str,
        authorization: &str,
        content_type: Option<&str>,
        body: bytes::Bytes,
    ) -> Result<(u16, Option<String>, bytes::Bytes), ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path_and_query}", self.base))
            .header(reqwest::header::AUTHORIZATION, authorization)
            .timeout(Duration::from_secs(120))
            .body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        Ok((status, content_type, bytes))
    }

    /// Posts `body` (any bytes, `content_type`) with this client's token and
    /// reads a JSON answer; `None` for `204 No Content`.
    pub async fn post_bytes<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: bytes::Bytes,
    ) -> Result<Option<T>, ClientError> {
        let resp = self
            .with_token_once_more(|| {
                self.http
                    .post(format!("{}{path}", self.base))
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .timeout(Duration::from_secs(120))
                    .body(body.clone())
            })
            .await?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Status { status, body: text });
        }
        if status == 204 || text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Sends a call (30 s at most), and once more with a rotated
    /// credential when the first is refused.
    async fn send_once_more_if_refused(
        &self,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<reqwest::Response, ClientError> {
        let limit = Some(Duration::from_secs(30));
        let resp = self.send(method.clone(), path, body.clone(), limit).await?;
        if resp.status().as_u16() == 401 && self.refresh() {
            return self.send(method, path, body, limit).await;
        }
        Ok(resp)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token());
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        req.send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))
    }

    /// Streams a `?watch=true` answer line by line to `on_line` until the
    /// control plane ends it (the CLI's `--watch` prints them as they are).
    pub async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let resp = self.send(Method::GET, path, None, None).await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.text().await.unwrap_or_default();
            return Err(ClientError::Status { status, body });
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(|e| ClientError::Unreachable(e.to_string()))?);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                on_line(&line[..line.len() - 1]);
            }
        }
        Ok(())
    }

    /// Every object of a list (`list`: its path and query, all pages)
    /// and the revision of the first page.
    async fn list_all(&self, list: &str) -> Result<(Vec<Value>, i64), ClientError> {
        let mut items = Vec::new();
        let mut revision = None;
        let mut token: Option<String> = None;
        loop {
            let path = match &token {
                Some(t) => format!("{list}&page_token={t}"),
                None => list.to_string(),
            };
            let page: ListResponse<Value> = self.request(Method::GET, &path, None::<&()>).await?;
            revision.get_or_insert(page.revision);
            items.extend(page.items);
            token = page.next_page_token;
            if token.is_none() {
                return Ok((items, revision.unwrap_or(0)));
            }
        }
    }

    /// Streams changes of a kind after `since` to `on_update` until the
    /// stream breaks; returns the last revision seen, or `None` when the
    /// control plane refuses `since` (its store was replaced): relist.
    async fn watch(
        &self,
        list: &str,
        plural: &str,
        since: i64,
        on_update: &mut (impl FnMut(Update) + Send),
    ) -> Option<i64> {
        let mut last = since;
        let url = format!("{}{list}&watch=true&since={since}", self.base);
        let resp = match self.http.get(url).bearer_auth(self.token()).send().await {
            Ok(r) if r.status().is_success() => r,
            // 410: the change log was compacted past `since`.
            Ok(r) if matches!(r.status().as_u16(), 400 | 410) => {
                tracing::warn!(plural, since, "watch position refused; relisting");
                return None;
            }
            Ok(r) => {
                tracing::warn!(status = r.status().as_u16(), plural, "watch refused");
                if r.status().as_u16() == 401 {
                    self.refresh();
                }
                return Some(last);
            }
            Err(e) => {
                tracing::debug!(error = %e, plural, "watch failed");
                return Some(last);
            }
        };
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        // Bookmarks arrive every 10 s; silence for much longer means a dead peer.
        while let Ok(Some(Ok(chunk))) =
            tokio::time::timeout(Duration::from_secs(35), stream.next()).await
        {
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let Ok(event) = serde_json::from_slice::<WatchEvent<Value>>(&line) else {
                    continue;
                };
                last = event.revision.max(last);
                match (event.kind, event.object) {
                    (WatchEventType::Added, Some(o)) => on_update(Update::Added(o)),
                    (WatchEventType::Modified, Some(o)) => on_update(Update::Modified(o)),
                    (WatchEventType::Deleted, Some(o)) => on_update(Update::Deleted(o)),
                    _ => {}
                }
            }
        }
        Some(last)
    }

    /// Lists (`list`: a list path with its query), then follows its
    /// changes forever, reconnecting with backoff. A follower that falls
    /// behind never misses a change: it resumes from the last revision it
    /// saw, and relists only when it has never listed. Typed callers use
    /// [`Api::follow`].
    pub(crate) async fn follow_raw(
        &self,
        list: &str,
        plural: &str,
        mut on_update: impl FnMut(Update) + Send,
    ) {
        let mut backoff = Duration::from_millis(200);
        let mut since: Option<i64> = None;
        loop {
            let from = match since {
                Some(s) => s,
                None => match self.list_all(list).await {
                    Ok((items, revision)) => {
                        on_update(Update::Snapshot(items));
                        revision
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, plural, "list failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let last = self.watch(list, plural, from, &mut on_update).await;
            if last.is_some_and(|l| l > from) {
                backoff = Duration::from_millis(200);
            }
            since = last;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
