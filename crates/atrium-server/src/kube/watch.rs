//! Watches of a tenant cluster's objects: the store's change log for one
//! resource type of one cluster, filtered by namespace and selectors, as
//! the newline-delimited `{"type", "object"}` events clients read. From a
//! `resourceVersion`, changes after it; without one (or `0`), or as a
//! watch-list (`sendInitialEvents=true`), the current objects as `ADDED`
//! first — a watch-list's then closed by the `initial-events-end`
//! bookmark. Bookmarks when asked for; the stream ends at
//! `timeoutSeconds`, when the client goes, or when the server stops.
//!
//! From a `resourceVersion` the compacted change log no longer reaches,
//! 410 `Expired` — at once, or as an `ERROR` event when a slow stream
//! falls behind — on which clients list again, as with upstream.

use std::convert::Infallible;
use std::time::Duration;

use atrium_kube::table::{table, Include};
use atrium_kube::KubeError;
use atrium_store::ChangeOp;
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{json, Value};

use super::objects::{now_unix, Scope, Selection};
use super::path::At;
use super::{KubeResponse, Request};
use crate::AppState;

const BOOKMARK_EVERY: Duration = Duration::from_secs(10);
const BATCH: u32 = 500;
/// Longest a watch runs without `timeoutSeconds` (as upstream's default
/// range): clients reconnect from their last resourceVersion.
const LONGEST: Duration = Duration::from_secs(1800);

fn line(kind: &str, object: Value) -> Bytes {
    let mut out = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

pub(super) async fn serve(
    state: &AppState,
    scope: Scope,
    at: &At,
    req: &Request,
) -> Result<KubeResponse, KubeError> {
    // Owned: the stream outlives the request.
    let r = at.resource.clone().into_owned();
    let selection = Selection::of(at, req)?;
    let head = state.store.head();
    // A watch-list (`sendInitialEvents=true`) starts from the current
    // objects whatever version it names, and marks where they end.
    let watch_list = req.param("sendInitialEvents") == Some("true");
    let since = match req
        .param("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0" && !watch_list)
    {
        Some(v) => Some(v.parse::<i64>().map_err(|_| {
            KubeError::bad_request(format!("resourceVersion {v:?} is not one this server gave"))
        })?),
        None => None,
    };
    if since.is_some_and(|s| s > head) {
        return Err(KubeError::bad_request("resourceVersion is in the future"));
    }
    if let Some(s) = since {
        let oldest = state
            .store
            .compacted()
            .await
            .map_err(super::objects::store_error)?;
        if s < oldest {
            return Err(KubeError::expired(s, oldest));
        }
    }
    let bookmarks = req.param("allowWatchBookmarks") == Some("true");
    let until = req
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(LONGEST, |t| Duration::from_secs(t).min(LONGEST));
    // A cluster's watches count against its tenant's open streams.
    let slot = crate::crud::OpenWatches::open(state, &scope.tenant)
        .await
        .map_err(super::from_api)?;
    let kind = scope.kind(&r);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    // Without a version: what exists now, then what changes after.
    let mut initial = Vec::new();
    if since.is_none() {
        let mut objects = state
            .store
            .list_all(&kind, &scope.filter())
            .await
            .map_err(|e| super::from_api(e.into()))?;
        objects.sort_by(|a, b| a.name.cmp(&b.name));
        initial = objects
            .iter()
            .map(|o| Ok((scope.shown(&r, o)?, o.revision)))
            .collect::<Result<Vec<_>, KubeError>>()?
            .into_iter()
            .filter(|(o, _)| selection.matches(o))
            .collect();
    }
    // `kubectl get -w` asks for each event's object as a one-row Table.
    let as_table = req
        .wants_table()
        .then(|| Include::parse(req.param("includeObject")));
    let table_type = r.clone();
    let shape = move |obj: Value, revision: i64| match as_table {
        Some(include) => table(&table_type, &[obj], revision, None, include, now_unix()),
        None => obj,
    };
    let (state, api_version, type_kind) = (state.clone(), r.api_version(), r.kind.to_string());
    let mut heads = state.store.subscribe();
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let _slot = slot;
        for (obj, revision) in initial {
            if tx
                .send(Ok(line("ADDED", shape(obj, revision))))
                .await
                .is_err()
            {
                return;
            }
        }
        if watch_list {
            let end = json!({"kind": type_kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": head.to_string(),
                             "annotations": {"k8s.io/initial-events-end": "true"}}});
            if tx.send(Ok(line("BOOKMARK", end))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + until;
        let mut last = since.unwrap_or(head);
        loop {
            let now = *heads.borrow_and_update();
            while last < now {
                let batch = match state
                    .store
                    .changes(last, now, Some(&kind), &scope.filter(), BATCH)
                    .await
                {
                    Ok(b) => b,
                    Err(atrium_store::StoreError::Compacted { requested, oldest }) => {
                        let gone = KubeError::expired(requested, oldest).to_status();
                        let _ = tx.send(Ok(line("ERROR", gone))).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "kube watch: cannot read changes; closing");
                        return;
                    }
                };
                let full = batch.len() == BATCH as usize;
                for change in &batch {
                    let Ok(obj) = scope.shown_at(&r, &change.object, change.revision) else {
                        tracing::warn!(object = %change.object.id, "kube watch: a stored secret does not open");
                        continue;
                    };
                    if !selection.matches(&obj) {
                        continue;
                    }
                    let event = match change.op {
                        ChangeOp::Created => "ADDED",
                        ChangeOp::Updated => "MODIFIED",
                        ChangeOp::Deleted => "DELETED",
                    };
                    if tx
                        .send(Ok(line(event, shape(obj, change.revision))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                last = match batch.last() {
                    Some(c) if full => c.revision,
                    _ => now,
                };
            }
            tokio::select! {
                changed = heads.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(BOOKMARK_EVERY), if bookmarks => {
                    let mark = json!({"kind": type_kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": last.to_string()}});
                    if tx.send(Ok(line("BOOKMARK", mark))).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(KubeResponse::Stream(
        ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
    ))
}
