//! Metering that loses nothing.
//!
//! Each finished request's usage is appended to a spool file in the
//! gateway's data directory *before* its last bytes go to the client, in
//! one `write` (so a crash of the gateway process — `kill -9` included —
//! loses at most the requests still in flight; the page cache keeps what
//! was written). A shipper reads the spool in order and posts batches to
//! the control plane. Before a batch is sent, its id and extent are saved
//! in a cursor file; after a crash the same batch is resent with the same
//! id, and the control plane records each batch id once — so retries never
//! double-count. Once everything is acknowledged the spool is truncated.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use atrium_api::UsageRecordView;
use atrium_client::ControlPlane;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Most records one batch carries (the control plane's limit).
const MAX_BATCH: usize = 1000;
/// Most spool bytes read for one batch.
const MAX_BATCH_BYTES: u64 = 1 << 20;
/// A fully acknowledged spool larger than this is truncated.
const TRUNCATE_AT: u64 = 16 << 20;

/// The append-only spool of usage records.
pub struct UsageLog {
    spool: PathBuf,
    cursor: PathBuf,
    file: Mutex<File>,
    wake: Notify,
}

/// How far the shipper has got: bytes acknowledged, and the batch in
/// flight (resent with the same id after a crash).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    acked: u64,
    pending: Option<Pending>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    batch_id: String,
    end: u64,
}

impl UsageLog {
    /// Opens (creating) the spool in `dir`.
    pub fn open(dir: &Path) -> io::Result<UsageLog> {
        std::fs::create_dir_all(dir)?;
        let spool = dir.join("usage.spool");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&spool)?;
        Ok(UsageLog {
            spool,
            cursor: dir.join("usage.cursor"),
            file: Mutex::new(file),
            wake: Notify::new(),
        })
    }

    /// Appends one record durably against a crash of this process.
    pub fn append(&self, record: &UsageRecordView) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        {
            let mut f = self
                .file
                .lock()
                .map_err(|_| io::Error::other("usage spool lock poisoned"))?;
            f.write_all(&line)?;
        }
        self.wake.notify_one();
        Ok(())
    }

    fn load_cursor(&self) -> Cursor {
        let mut c: Cursor = std::fs::read(&self.cursor)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let len = self.len();
        if c.acked > len || c.pending.as_ref().is_some_and(|p| p.end > len) {
            // The spool was truncated after everything was acknowledged.
            c = Cursor::default();
        }
        c
    }

    fn save_cursor(&self, c: &Cursor) -> io::Result<()> {
        let tmp = self.cursor.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(c).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, &self.cursor)
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.spool).map(|m| m.len()).unwrap_or(0)
    }

    /// Complete records from `from` (up to `to`, or at most `MAX_BATCH` of
    /// them), as the JSON text of each, and the offset past the last one.
    /// Records are checked to be JSON but not rebuilt: a batch is the
    /// spooled text itself.
    fn read_from(&self, from: u64, to: Option<u64>) -> io::Result<(Vec<Vec<u8>>, u64)> {
        let end = to.unwrap_or_else(|| self.len().min(from + MAX_BATCH_BYTES));
        let mut buf = vec![0u8; end.saturating_sub(from) as usize];
        File::open(&self.spool)?.read_exact_at(&mut buf, from)?;
        let mut records = Vec::new();
        let mut consumed = 0usize;
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if line.last() != Some(&b'\n') || (to.is_none() && records.len() == MAX_BATCH) {
                break;
            }
            consumed += line.len();
            let text = &line[..line.len() - 1];
            match serde_json::from_slice::<serde::de::IgnoredAny>(text) {
                Ok(_) => records.push(text.to_vec()),
                Err(e) => tracing::warn!(error = %e, "gateway: unreadable usage record skipped"),
            }
        }
        Ok((records, from + consumed as u64))
    }

    /// Truncates the spool if everything in it is acknowledged.
    fn truncate_if_done(&self, cursor: &mut Cursor) -> io::Result<()> {
        if cursor.acked < TRUNCATE_AT {
            return Ok(());
        }
        let f = self
            .file
            .lock()
            .map_err(|_| io::Error::other("usage spool lock poisoned"))?;
        if f.metadata()?.len() == cursor.acked {
            f.set_len(0)?;
            *cursor = Cursor::default();
            self.save_cursor(cursor)?;
        }
        Ok(())
    }
}

/// The body of `POST /v1/usage` for spooled records.
fn batch_body(batch_id: &str, records: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + records.iter().map(|r| r.len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"batch_id\":");
    body.extend_from_slice(&serde_json::to_vec(batch_id).unwrap_or_default());
    body.extend_from_slice(b",\"records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(r);
    }
    body.extend_from_slice(b"]}");
    body
}

/// Reads the spool off the request-serving thread(s).
async fn read_off_thread(
    log: &std::sync::Arc<UsageLog>,
    from: u64,
    to: Option<u64>,
) -> io::Result<(Vec<Vec<u8>>, u64)> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || log.read_from(from, to))
        .await
        .map_err(io::Error::other)?
}

/// Ships the spool to the control plane, forever.
pub async fn ship(cp: ControlPlane, log: std::sync::Arc<UsageLog>) {
    let mut cursor = log.load_cursor();
    loop {
        if cursor.pending.is_none() {
            if log.len() <= cursor.acked {
                // Wait for a record; the timeout covers a missed wake-up.
                let _ = tokio::time::timeout(Duration::from_secs(1), log.wake.notified()).await;
                continue;
            }
            // Let a batch fill a little under load.
            tokio::time::sleep(crate::USAGE_FLUSH).await;
            match read_off_thread(&log, cursor.acked, None).await {
                Ok((_, end)) if end == cursor.acked => continue,
                Ok((_, end)) => {
                    cursor.pending = Some(Pending {
                        batch_id: format!("ub_{:032x}", rand::random::<u128>()),
                        end,
                    });
                    if let Err(e) = log.save_cursor(&cursor) {
                        tracing::error!(error = %e, "gateway: cannot save the usage cursor");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "gateway: cannot read the usage spool");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(pending) = cursor.pending.clone() else {
            continue;
        };
        let records = match read_off_thread(&log, cursor.acked, Some(pending.end)).await {
            Ok((records, _)) => records,
            Err(e) => {
                tracing::error!(error = %e, "gateway: cannot read the usage spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let body = batch_body(&pending.batch_id, &records);
        let mut backoff = Duration::from_millis(100);
        loop {
            match cp
                .call_raw(reqwest::Method::POST, "/v1/usage", Some(body.clone()))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, records = records.len(), "gateway: usage not acknowledged; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        cursor = Cursor {
            acked: pending.end,
            pending: None,
        };
        if let Err(e) = log
            .save_cursor(&cursor)
            .and_then(|()| log.truncate_if_done(&mut cursor))
        {
            tracing::error!(error = %e, "gateway: cannot save the usage cursor");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_api::UsageBatch;

    fn record(i: i64) -> UsageRecordView {
        UsageRecordView {
            at: "2026-01-01T00:00:00Z".into(),
            tenant: "t".into(),
            deployment: "d".into(),
            site: "s".into(),
            replica: "r".into(),
            prompt_tokens: i,
            completion_tokens: 1,
            request_id: format!("req_{i}"),
        }
    }

    #[test]
    fn spool_reads_back_whole_records_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(dir.path()).unwrap();
        for i in 0..3 {
            log.append(&record(i)).unwrap();
        }
        // A torn tail (never written by `append`, but a disk may hold one)
        // is left for later, not misread.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("usage.spool"))
            .unwrap()
            .write_all(b"{\"at\":")
            .unwrap();
        let (records, end) = log.read_from(0, None).unwrap();
        let batch: UsageBatch = serde_json::from_slice(&batch_body("ub_1", &records)).unwrap();
        assert_eq!(batch.records, (0..3).map(record).collect::<Vec<_>>());
        let cursor = Cursor {
            acked: 0,
            pending: Some(Pending {
                batch_id: "ub_1".into(),
                end,
            }),
        };
        log.save_cursor(&cursor).unwrap();
        drop(log);
        let log = UsageLog::open(dir.path()).unwrap();
        let again = log.load_cursor();
        assert_eq!(
            again.pending.unwrap().batch_id,
            "ub_1",
            "the same batch id after a restart"
        );
        let (records, _) = log.read_from(0, Some(end)).unwrap();
        assert_eq!(records.len(), 3);
    }
}
