//! Shipping usage to the control plane: records are gathered into batches
//! with a random id and retried until acknowledged; the control plane
//! records each batch id once, so a retry never double-counts.

use std::time::Duration;

use atrium_api::{UsageBatch, UsageRecordView};
use atrium_client::ControlPlane;
use tokio::sync::mpsc;

const MAX_BATCH: usize = 1000;

pub async fn ship(cp: ControlPlane, mut rx: mpsc::UnboundedReceiver<UsageRecordView>) {
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut records = vec![first];
        let deadline = tokio::time::Instant::now() + crate::USAGE_FLUSH;
        while records.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => records.push(r),
                Ok(None) | Err(_) => break,
            }
        }
        let batch = UsageBatch {
            batch_id: format!("ub_{:032x}", rand::random::<u128>()),
            records,
        };
        let body = serde_json::to_value(&batch).unwrap_or_default();
        let mut backoff = Duration::from_millis(100);
        loop {
            match cp
                .call(reqwest::Method::POST, "/v1/usage", Some(&body))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, records = batch.records.len(), "gateway: usage not acknowledged; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
