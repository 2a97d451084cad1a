//! Metering that loses nothing.
//!
//! Each finished request's usage is appended to a spool segment in the
//! gateway's data directory *before* its last bytes go to the client, in
//! one `write` (so a crash of the gateway process — `kill -9` included —
//! loses at most the requests still in flight; the page cache keeps what
//! was written). A shipper reads the segments in order and posts batches
//! to the control plane. Before a batch is sent, its id and extent are
//! saved in a cursor file; after a crash the same batch is resent with the
//! same id, and the control plane records each batch id once — so retries
//! never double-count. A segment that grows past `SEGMENT_BYTES` is closed
//! and a new one started; closed segments are deleted once acknowledged.
//! Nothing but the one `write` happens on the request path: reading,
//! cursor saves and deletions run on blocking threads and hold no lock an
//! append needs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_api::UsageRecordView;
use atrium_client::ControlPlane;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Most records one batch carries (the control plane's limit).
const MAX_BATCH: usize = 1000;
/// Most spool bytes read for one batch.
const MAX_BATCH_BYTES: u64 = 1 << 20;
/// A segment is closed once it is this large.
const SEGMENT_BYTES: u64 = 16 << 20;

/// The append-only spool of usage records.
pub struct UsageLog {
    dir: PathBuf,
    /// The segment being appended to: (number, file, bytes written).
    current: Mutex<(u64, File, u64)>,
    wake: Notify,
}

/// How far the shipper has got: bytes of `segment` acknowledged, and the
/// batch in flight (resent with the same id after a crash).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Cursor {
    segment: u64,
    acked: u64,
    pending: Option<Pending>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    batch_id: String,
    end: u64,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("usage-{n:010}.spool"))
}

fn open_segment(dir: &Path, n: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(segment_path(dir, n))
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let name = name.to_str()?;
            name.strip_prefix("usage-")?
                .strip_suffix(".spool")?
                .parse()
                .ok()
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

impl UsageLog {
    /// Opens the spool in `dir`, appending to its newest segment.
    pub fn open(dir: &Path) -> io::Result<UsageLog> {
        std::fs::create_dir_all(dir)?;
        let n = segments(dir)?.last().copied().unwrap_or(0);
        let file = open_segment(dir, n)?;
        let len = file.metadata()?.len();
        Ok(UsageLog {
            dir: dir.to_path_buf(),
            current: Mutex::new((n, file, len)),
            wake: Notify::new(),
        })
    }

    /// Appends one record durably against a crash of this process.
    pub fn append(&self, record: &UsageRecordView) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        {
            let mut current = self
                .current
                .lock()
                .map_err(|_| io::Error::other("usage spool lock poisoned"))?;
            if current.2 >= SEGMENT_BYTES {
                let next = current.0 + 1;
                *current = (next, open_segment(&self.dir, next)?, 0);
            }
            current.1.write_all(&line)?;
            current.2 += line.len() as u64;
        }
        self.wake.notify_one();
        Ok(())
    }

    fn cursor_path(&self) -> PathBuf {
        self.dir.join("usage.cursor")
    }

    fn load_cursor(&self) -> Cursor {
        let first = segments(&self.dir)
            .ok()
            .and_then(|s| s.first().copied())
            .unwrap_or(0);
        let c: Cursor = std::fs::read(self.cursor_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if c.segment < first {
            // Its segment was acknowledged and deleted: start at the oldest left.
            return Cursor {
                segment: first,
                ..Cursor::default()
            };
        }
        c
    }

    fn save_cursor(&self, c: &Cursor) -> io::Result<()> {
        let tmp = self.dir.join("usage.cursor.tmp");
        std::fs::write(&tmp, serde_json::to_vec(c).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, self.cursor_path())
    }

    fn segment_len(&self, n: u64) -> u64 {
        std::fs::metadata(segment_path(&self.dir, n))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    fn newest_segment(&self) -> u64 {
        self.current.lock().map(|c| c.0).unwrap_or(0)
    }

    /// Complete records of segment `n` from `from` (up to `to`, or at most
    /// `MAX_BATCH` of them), as the JSON text of each, and the offset past
    /// the last one. Records are checked to be JSON but not rebuilt: a
    /// batch is the spooled text itself.
    fn read_from(&self, n: u64, from: u64, to: Option<u64>) -> io::Result<(Vec<Vec<u8>>, u64)> {
        let end = to.unwrap_or_else(|| self.segment_len(n).min(from + MAX_BATCH_BYTES));
        let mut buf = vec![0u8; end.saturating_sub(from) as usize];
        File::open(segment_path(&self.dir, n))?.read_exact_at(&mut buf, from)?;
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

    /// The shipper's next step from `cursor`, done on a blocking thread:
    /// the records of the batch to send (choosing and saving a new batch
    /// if none is pending), or `None` when everything is sent.
    fn next_batch(&self, cursor: &mut Cursor) -> io::Result<Option<Vec<Vec<u8>>>> {
        loop {
            if let Some(p) = &cursor.pending {
                let (records, _) = self.read_from(cursor.segment, cursor.acked, Some(p.end))?;
                return Ok(Some(records));
            }
            // Asked before reading: once the appender has moved on, a read
            // of this segment sees everything it will ever hold.
            let closed = cursor.segment < self.newest_segment();
            let (_, end) = self.read_from(cursor.segment, cursor.acked, None)?;
            if end > cursor.acked {
                cursor.pending = Some(Pending {
                    batch_id: format!("ub_{:032x}", rand::random::<u128>()),
                    end,
                });
                self.save_cursor(cursor)?;
                continue;
            }
            if closed {
                let done = cursor.segment;
                *cursor = Cursor {
                    segment: done + 1,
                    ..Cursor::default()
                };
                self.save_cursor(cursor)?;
                std::fs::remove_file(segment_path(&self.dir, done))?;
                continue;
            }
            return Ok(None);
        }
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

/// Runs `f` on the spool and cursor on a blocking thread.
async fn off_thread<T: Send + 'static>(
    log: &Arc<UsageLog>,
    cursor: &mut Cursor,
    f: impl FnOnce(&UsageLog, &mut Cursor) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let (log, mut c) = (log.clone(), cursor.clone());
    let (result, c) = tokio::task::spawn_blocking(move || {
        let r = f(&log, &mut c);
        (r, c)
    })
    .await
    .map_err(io::Error::other)?;
    *cursor = c;
    result
}

/// Ships the spool to the control plane, forever.
pub async fn ship(cp: ControlPlane, log: Arc<UsageLog>) {
    let mut cursor = log.load_cursor();
    loop {
        let records = match off_thread(&log, &mut cursor, |l, c| l.next_batch(c)).await {
            Ok(Some(records)) => records,
            Ok(None) => {
                // Wait for a record (the timeout covers a missed wake-up),
                // then let a batch fill a little.
                let _ = tokio::time::timeout(Duration::from_secs(1), log.wake.notified()).await;
                tokio::time::sleep(crate::USAGE_FLUSH).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "gateway: cannot read the usage spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(pending) = cursor.pending.clone() else {
            continue;
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
        cursor.acked = pending.end;
        cursor.pending = None;
        if let Err(e) = off_thread(&log, &mut cursor, |l, c| l.save_cursor(c)).await {
            tracing::error!(error = %e, "gateway: cannot save the usage cursor");
        }
        // A batch that was not full: let the next one fill for a moment, so
        // the control plane writes few large batches, not many small ones.
        if records.len() < MAX_BATCH {
            tokio::time::sleep(crate::USAGE_FLUSH).await;
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

    fn ids(records: &[Vec<u8>]) -> Vec<i64> {
        let batch: UsageBatch = serde_json::from_slice(&batch_body("ub_1", records)).unwrap();
        batch.records.iter().map(|r| r.prompt_tokens).collect()
    }

    #[test]
    fn batches_survive_a_restart_with_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(dir.path()).unwrap();
        for i in 0..3 {
            log.append(&record(i)).unwrap();
        }
        // A torn tail (never written by `append`, but a disk may hold one)
        // is left for later, not misread.
        std::fs::OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), 0))
            .unwrap()
            .write_all(b"{\"at\":")
            .unwrap();
        let mut cursor = log.load_cursor();
        let records = log.next_batch(&mut cursor).unwrap().unwrap();
        assert_eq!(ids(&records), vec![0, 1, 2]);
        let id = cursor.pending.clone().unwrap().batch_id;
        drop(log);
        // "Crash" before the acknowledgement: the same batch, same id.
        let log = UsageLog::open(dir.path()).unwrap();
        let mut cursor = log.load_cursor();
        assert_eq!(cursor.pending.as_ref().unwrap().batch_id, id);
        assert_eq!(
            ids(&log.next_batch(&mut cursor).unwrap().unwrap()),
            vec![0, 1, 2]
        );
        cursor.acked = cursor.pending.take().unwrap().end;
        log.save_cursor(&cursor).unwrap();
        assert!(log.next_batch(&mut cursor).unwrap().is_none());
    }

    #[test]
    fn full_segments_roll_over_and_are_deleted_once_sent() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(dir.path()).unwrap();
        log.append(&record(0)).unwrap();
        // Pretend the segment is full: the next append starts another.
        log.current.lock().unwrap().2 = SEGMENT_BYTES;
        log.append(&record(1)).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![0, 1]);
        let mut cursor = log.load_cursor();
        for expected in [0, 1] {
            let records = log.next_batch(&mut cursor).unwrap().unwrap();
            assert_eq!(ids(&records), vec![expected]);
            cursor.acked = cursor.pending.take().unwrap().end;
            log.save_cursor(&cursor).unwrap();
        }
        assert!(log.next_batch(&mut cursor).unwrap().is_none());
        assert_eq!(
            segments(dir.path()).unwrap(),
            vec![1],
            "the sent segment is gone"
        );
    }
}
