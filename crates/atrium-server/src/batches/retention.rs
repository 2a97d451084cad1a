//! Finished batches are kept `RETAIN_SECONDS` (30 days), then removed with
//! the results files Atrium wrote for them (objects and bytes); a tenant's
//! own input files stay until it deletes them. Run by the leader's
//! controllers, so the batch list the claims scan does not grow forever.

use std::time::Duration;

use atrium_api::{Batch, File, Resource};
use atrium_store::{AuditContext, Store, StoreError, TenantFilter, Write};
use tokio::sync::watch;

use super::files::FileStore;
use crate::stored;

const EVERY: Duration = Duration::from_secs(600);

/// Removes what is past retention at `now` (Unix seconds); how many
/// batches went.
pub async fn sweep(store: &Store, files: &FileStore, now: i64) -> Result<usize, StoreError> {
    let mut removed = 0;
    for batch in store.list_all(Batch::KIND, &TenantFilter::All).await? {
        let Some(status) = stored::status::<Batch>(&batch) else {
            continue;
        };
        if !status.past_retention(now) {
            continue;
        }
        for file in [&status.output_file_id, &status.error_file_id]
            .into_iter()
            .flatten()
        {
            match store
                .write::<()>(delete(File::KIND, file), None, audit("file.delete"))
                .await
            {
                Ok(_) | Err(atrium_store::WriteError::Store(StoreError::NotFound { .. })) => {
                    files.remove(file)
                }
                Err(e) => tracing::warn!(file = %file, error = %e, "retention: results file kept"),
            }
        }
        match store
            .write::<()>(delete(Batch::KIND, &batch.id), None, audit("batch.delete"))
            .await
        {
            Ok(_) => removed += 1,
            Err(e) => tracing::warn!(batch = %batch.id, error = %e, "retention: batch kept"),
        }
    }
    Ok(removed)
}

fn delete(kind: &str, id: &str) -> Write {
    Write::Delete {
        kind: kind.into(),
        id: id.into(),
    }
}

fn audit(action: &str) -> AuditContext {
    AuditContext::system("retention", action)
}

/// Sweeps every `EVERY` until `stop`.
pub async fn run(store: Store, files: std::sync::Arc<FileStore>, mut stop: watch::Receiver<bool>) {
    loop {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match sweep(&store, &files, now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(batches = n, "retention: finished batches removed"),
            Err(e) => tracing::warn!(error = %e, "retention: sweep failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_core::batch::{BatchState, BatchStatus, FilePurpose, FileSpec, RETAIN_SECONDS};
    use serde_json::json;

    async fn create(store: &Store, kind: &str, id: &str, body: serde_json::Value) {
        let w = Write::Create {
            kind: kind.into(),
            id: id.into(),
            tenant: Some("t1".into()),
            name: id.into(),
            body,
        };
        store.write::<()>(w, None, audit("test")).await.unwrap();
    }

    #[tokio::test]
    async fn a_batch_past_retention_goes_with_its_results_and_nothing_else() {
        use atrium_store::testing::{fresh_database_url, TestBackend};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&fresh_database_url(TestBackend::Sqlite, dir.path()).await)
            .await
            .unwrap();
        let files = FileStore::open(dir.path().join("files")).unwrap();
        let file = |purpose| json!({"spec": FileSpec {filename: "f".into(), purpose, bytes: 0, sha256: String::new()}});
        for (id, purpose) in [
            ("file-input0000000000", FilePurpose::Batch),
            ("file-output000000000", FilePurpose::BatchOutput),
            ("file-output111111111", FilePurpose::BatchOutput),
        ] {
            create(&store, File::KIND, id, file(purpose)).await;
            std::fs::write(dir.path().join("files").join(id), b"").unwrap();
        }
        let ok = atrium_core::batch::check_input(
            br#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}"#,
            atrium_core::batch::BatchEndpoint::Embeddings,
        );
        let spec = json!({"input_file_id": "file-input0000000000", "endpoint": "/v1/embeddings",
            "completion_window": "24h", "key": "k", "model": "m"});
        let mut done = BatchStatus::new(&ok, 0);
        done.state = BatchState::Completed;
        done.completed_at = Some(100);
        done.output_file_id = Some("file-output000000000".into());
        let mut running = BatchStatus::new(&ok, 0);
        running.state = BatchState::InProgress;
        running.output_file_id = Some("file-output111111111".into());
        create(
            &store,
            Batch::KIND,
            "batch_old",
            json!({"spec": spec, "status": done}),
        )
        .await;
        create(
            &store,
            Batch::KIND,
            "batch_run",
            json!({"spec": spec, "status": running}),
        )
        .await;

        assert_eq!(
            sweep(&store, &files, 100 + RETAIN_SECONDS).await.unwrap(),
            0,
            "not yet"
        );
        assert_eq!(
            sweep(&store, &files, 101 + RETAIN_SECONDS).await.unwrap(),
            1
        );
        assert!(store.get(Batch::KIND, "batch_old").await.unwrap().is_none());
        assert!(store
            .get(File::KIND, "file-output000000000")
            .await
            .unwrap()
            .is_none());
        assert!(!dir.path().join("files/file-output000000000").exists());
        // The tenant's input, and a running batch with its results, stay.
        for (kind, id) in [
            (File::KIND, "file-input0000000000"),
            (Batch::KIND, "batch_run"),
            (File::KIND, "file-output111111111"),
        ] {
            assert!(store.get(kind, id).await.unwrap().is_some(), "{id}");
        }
    }
}
