//! Runs the Batch API's batches: claims one from the control plane (under
//! a lease), reads its input, sends its requests through the same
//! admission, routing and metering as a tenant's own — as the key that
//! made the batch, so its limits hold and its revocation stops the batch —
//! and hands in the results.
//!
//! Low priority: a batch has at most `CONCURRENCY` requests in flight, and
//! sends one only while the deployment's own (non-batch) requests in
//! flight are fewer than `YIELD_PER_REPLICA` per ready replica; with no
//! replica ready it sends anyway, so a deployment scaled to zero starts
//! one. A request refused for a limit or for want of a replica is tried
//! again later, not failed.

use std::sync::Arc;
use std::time::Duration;

use atrium_api::{Batch, Object};
use atrium_client::ControlPlane;
use atrium_core::batch::{
    answer_body, check_input, BatchLine, BatchProgress, BatchState, RequestCounts, ResultError,
    ResultLine, ResultResponse,
};
use bytes::Bytes;
use futures::stream::{self, StreamExt};

use crate::Gateway;

/// Requests of one batch in flight at once.
const CONCURRENCY: usize = 4;
/// A batch waits while its deployment has this many of the tenant's own
/// requests per ready replica.
const YIELD_PER_REPLICA: u64 = 4;
/// How often an idle runner asks for a batch.
const POLL: Duration = Duration::from_secs(1);
/// How often a running batch reports (renewing its lease, seeing cancels).
const REPORT: Duration = Duration::from_secs(5);
/// Tries of one request refused for a limit or a missing replica.
const TRIES: u32 = 20;

/// Claims and runs batches for as long as the gateway runs.
pub async fn run(g: Arc<Gateway>, cp: ControlPlane) {
    loop {
        match cp
            .post_bytes::<Object<Batch>>("/v1/batches/claim", "application/json", Bytes::new())
            .await
        {
            Ok(Some(batch)) => {
                let id = batch.id.clone();
                tracing::info!(batch = %id, tenant = ?batch.tenant, "gateway: running a batch");
                if let Err(e) = run_one(&g, &cp, batch).await {
                    tracing::warn!(batch = %id, error = %e, "gateway: batch stopped; its lease will lapse and it runs again");
                }
            }
            Ok(None) => tokio::time::sleep(POLL).await,
            Err(e) => {
                tracing::debug!(error = %e, "gateway: no batch claimed");
                tokio::time::sleep(POLL * 5).await;
            }
        }
    }
}

/// One answered line: its index, status (0: never sent), request id, body
/// or error.
struct Answered {
    index: usize,
    status: u16,
    request_id: String,
    body: Bytes,
}

async fn run_one(g: &Gateway, cp: &ControlPlane, batch: Object<Batch>) -> Result<(), String> {
    let id = batch.id.clone();
    let total = batch.status.as_ref().map_or(0, |s| s.request_counts.total);
    let input = cp
        .get_bytes(&format!("/v1/files/{}/content", batch.spec.input_file_id))
        .await
        .map_err(|e| format!("input: {e}"))?;
    let endpoint = batch.spec.endpoint;
    let lines = tokio::task::spawn_blocking(move || check_input(&input, endpoint))
        .await
        .map_err(|e| format!("input check: {e}"))?
        .map_err(|e| format!("input no longer checks out: {e:?}"))?;
    let lines = Arc::new(lines.lines);
    let tenant = batch.tenant.clone().unwrap_or_default();
    let mut counts = RequestCounts {
        total,
        completed: 0,
        failed: 0,
    };
    let mut answers: Vec<Answered> = Vec::with_capacity(lines.len());
    let mut cancelled = batch
        .status
        .as_ref()
        .is_some_and(|s| s.state == BatchState::Cancelling);
    let sends = stream::iter(0..lines.len())
        .map(|i| {
            let lines = lines.clone();
            let tenant = tenant.clone();
            let key = batch.spec.key.clone();
            let id = id.clone();
            async move { send_line(g, &tenant, &key, &id, endpoint.path(), i, &lines[i]).await }
        })
        .buffer_unordered(CONCURRENCY);
    tokio::pin!(sends);
    // Reports on a clock, not per answer: a slow request must not let the
    // lease lapse.
    let mut tick = tokio::time::interval(REPORT);
    tick.tick().await;
    while !cancelled {
        tokio::select! {
            next = sends.next() => {
                let Some(answered) = next else { break };
                if (200..300).contains(&answered.status) {
                    counts.completed = counts.completed.saturating_add(1);
                } else {
                    counts.failed = counts.failed.saturating_add(1);
                }
                answers.push(answered);
            }
            _ = tick.tick() => {
                cancelled = report(cp, &id, counts, false).await? == BatchState::Cancelling;
            }
        }
    }
    // A cancel stops new sends; what is in flight is not waited for, and
    // the answers so far are handed in.
    answers.sort_by_key(|a| a.index);
    let (output, errors) = results_files(&lines, &answers);
    if !output.is_empty() {
        hand_in(cp, &id, "output", output).await?;
    }
    if !errors.is_empty() {
        hand_in(cp, &id, "error", errors).await?;
    }
    report(cp, &id, counts, true).await?;
    tracing::info!(batch = %id, completed = counts.completed, failed = counts.failed, "gateway: batch handed in");
    Ok(())
}

/// Sends line `index`, waiting for room and trying again while it is
/// refused for a limit or a missing replica.
async fn send_line(
    g: &Gateway,
    tenant: &str,
    key: &str,
    batch: &str,
    route: &str,
    index: usize,
    line: &BatchLine,
) -> Answered {
    let model = line
        .body
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or_default();
    let raw = Bytes::from(serde_json::to_vec(&line.body).unwrap_or_default());
    let mut tries = 0;
    loop {
        wait_for_room(g, tenant, model).await;
        let caller = match g.routes.read().map(|r| r.caller_for_key(key)) {
            Ok(Ok(c)) => c,
            Ok(Err(why)) => return never_sent(index, "invalid_api_key", why),
            Err(_) => return never_sent(index, "internal_error", "route table unavailable"),
        };
        let (status, request_id, body) =
            crate::proxy::run_whole(g, route, caller, raw.clone(), Some(batch)).await;
        tries += 1;
        if matches!(status, 429 | 503) && tries < TRIES {
            tokio::time::sleep(Duration::from_millis(250 * u64::from(tries.min(8)))).await;
            continue;
        }
        return Answered {
            index,
            status,
            request_id,
            body,
        };
    }
}

fn never_sent(index: usize, code: &str, message: &str) -> Answered {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    Answered {
        index,
        status: 0,
        request_id: String::new(),
        body: Bytes::from(body.to_string()),
    }
}

/// Waits while the deployment's own requests fill its ready replicas.
async fn wait_for_room(g: &Gateway, tenant: &str, model: &str) {
    loop {
        let room = g
            .routes
            .read()
            .ok()
            .and_then(|r| r.batch_room(tenant, model));
        let Some((load, ready)) = room else { return };
        if ready == 0 || load.interactive() < YIELD_PER_REPLICA.saturating_mul(ready as u64) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The output file (answered with 2xx) and the error file (the rest), one
/// line per request in input order.
fn results_files(lines: &[BatchLine], answers: &[Answered]) -> (Vec<u8>, Vec<u8>) {
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    for a in answers {
        let Some(line) = lines.get(a.index) else {
            continue;
        };
        let result = if a.status == 0 {
            let body = answer_body(&a.body);
            ResultLine {
                id: format!("batch_req_{:06}", a.index),
                custom_id: &line.custom_id,
                response: None,
                error: Some(ResultError {
                    code: body["error"]["code"]
                        .as_str()
                        .unwrap_or("error")
                        .to_string(),
                    message: body["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                }),
            }
        } else {
            ResultLine {
                id: format!("batch_req_{:06}", a.index),
                custom_id: &line.custom_id,
                response: Some(ResultResponse {
                    status_code: a.status,
                    request_id: &a.request_id,
                    body: answer_body(&a.body),
                }),
                error: None,
            }
        };
        let out = if (200..300).contains(&a.status) {
            &mut output
        } else {
            &mut errors
        };
        if serde_json::to_writer(&mut *out, &result).is_ok() {
            out.push(b'\n');
        }
    }
    (output, errors)
}

async fn hand_in(cp: &ControlPlane, id: &str, kind: &str, bytes: Vec<u8>) -> Result<(), String> {
    cp.post_bytes::<serde_json::Value>(
        &format!("/v1/batches/{id}/results?kind={kind}"),
        "application/jsonl",
        Bytes::from(bytes),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("{kind} file: {e}"))
}

/// Reports progress (or the end); gives the batch's state after it.
async fn report(
    cp: &ControlPlane,
    id: &str,
    counts: RequestCounts,
    done: bool,
) -> Result<BatchState, String> {
    let body = BatchProgress {
        request_counts: counts,
        done,
    };
    let batch: Object<Batch> = cp
        .request(
            reqwest::Method::PUT,
            &format!("/v1/batches/{id}/progress"),
            Some(&body),
        )
        .await
        .map_err(|e| format!("progress: {e}"))?;
    Ok(batch.status.map_or(BatchState::InProgress, |s| s.state))
}
