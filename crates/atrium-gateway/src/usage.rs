//! Metering that loses nothing.
//!
//! (What is sent for the spooled lines is their roll-up: `usage_rollup`.)
//!
//! Each finished request's usage is appended to a spool segment in the
//! gateway's data directory in one `write`, before the gateway reads
//! anything more from that client's connection (a whole answer's right
//! after it was handed to the kernel; a stream's before its usage chunk
//! is passed on) — so a crash of the gateway process, `kill -9` included,
//! loses at most the requests still in flight; the page cache keeps what
//! was written. A shipper posts the spooled records to the control plane
//! in batches. Before a batch is sent, its id and extent are saved in a
//! cursor file; after a crash the same batch is resent with the same id,
//! and the control plane records each batch id once — so retries never
//! double-count. A segment that grows past `SEGMENT_BYTES` is closed and a
//! new one started; closed segments are deleted once acknowledged.
//!
//! The shipper shares the proxy's core, so its steady state is kept to a
//! few small steps on the gateway's own thread: appended lines are also
//! kept in memory (up to `MEMORY_BYTES`) and sent from there, and the
//! cursor is rewritten in place with one `pwrite`. Reading segments back
//! (after a restart, or when the control plane was away long enough for
//! the memory copy to be given up) runs on a blocking thread. Measured on
//! the 2-core bench: reading each batch back from disk and renaming a new
//! cursor file over the old one cost about a millisecond every 200 ms on
//! the proxy's core, and was most of the gateway's p99.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_client::ControlPlane;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::usage_rollup;

/// Most spool lines one batch carries: its roll-up has at most as many
/// records, within the control plane's 10,000.
const MAX_BATCH: usize = 5000;
/// Most spool bytes one batch carries (about 5,000 lines). The batch is
/// rolled up and its body made on a blocking thread, not the gateway's:
/// done on the gateway's thread, batches of 1,000 records (about 200 KiB)
/// held it for about half a millisecond each (`perf sched`), which the
/// request waiting behind it saw as p99.
const MAX_BATCH_BYTES: u64 = 1 << 20;
/// A segment is closed once it is this large.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Most unsent bytes also kept in memory. Past it (the control plane away
/// for a while) they are read back from the segment instead.
const MEMORY_BYTES: usize = 4 << 20;
/// The cursor file's fixed size: it is rewritten in place, in one `pwrite`
/// (which a crash of this process cannot tear), padded with spaces.
const CURSOR_BYTES: usize = 512;

/// One request's usage as spooled: the fields of `UsageRecordView` (what
/// the control plane reads), borrowed, so the request path copies nothing
/// to write it.
#[derive(Serialize)]
pub struct UsageLine<'a> {
    pub at: &'a str,
    pub tenant: &'a str,
    pub deployment: &'a str,
    pub site: &'a str,
    pub replica: &'a str,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flag: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<&'a str>,
    /// Shipped as its own record too (the tenant asked for them).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub itemised: bool,
    /// The site the request entered at (`site` served it).
    pub ingress_site: &'a str,
}

/// The append-only spool of usage records.
pub struct UsageLog {
    dir: PathBuf,
    current: Mutex<Current>,
    cursor_file: File,
    wake: Notify,
}

/// The segment being appended to.
struct Current {
    segment: u64,
    file: File,
    /// Bytes written to it.
    len: u64,
    /// When `in_memory`: a copy of the segment's bytes from `memory_start`
    /// to `len`, which the shipper sends instead of reading them back.
    memory: Vec<u8>,
    memory_start: u64,
    in_memory: bool,
}

impl Current {
    fn new(segment: u64, file: File, len: u64) -> Current {
        Current {
            segment,
            file,
            len,
            memory: Vec::new(),
            memory_start: len,
            in_memory: true,
        }
    }
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

/// Spooled records, each a line of JSON ending in `\n`, and the segment
/// offset past the last one.
#[derive(Debug)]
struct Batch {
    lines: Vec<u8>,
    count: usize,
    end: u64,
    /// Cut at `MAX_BATCH` or `MAX_BATCH_BYTES`: more records are waiting.
    full: bool,
}

/// Where the shipper's next batch comes from.
enum FromMemory {
    Batch(io::Result<Batch>),
    /// Everything appended has been sent.
    Idle,
    /// The records are only on disk (a pending batch after a restart, an
    /// older segment, or a copy given up).
    OnDisk,
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

/// The complete lines at the start of `bytes`: at most `MAX_BATCH` of
/// them and `MAX_BATCH_BYTES` (at least one line, however long) unless
/// `whole` — then every complete line. Returns (bytes, lines, whether a
/// limit cut it short).
///
/// This runs on the gateway's thread under the spool's lock, which every
/// request's `append` takes, over up to a megabyte: so it finds the cut
/// backwards from the byte bound and counts newlines in a loop the
/// compiler vectorises, rather than walking the batch line by line
/// (measured on 1 MiB of spooled lines: ~35 µs against ~360 µs).
fn complete_lines(bytes: &[u8], whole: bool) -> (usize, usize, bool) {
    let newline = |b: &u8| *b == b'\n';
    let limit = if whole {
        bytes.len()
    } else {
        bytes
            .len()
            .min(usize::try_from(MAX_BATCH_BYTES).unwrap_or(usize::MAX))
    };
    let mut taken = bytes[..limit]
        .iter()
        .rposition(newline)
        .map_or(0, |i| i + 1);
    if taken == 0 && !whole {
        // A first line longer than the byte bound goes alone.
        taken = bytes.iter().position(newline).map_or(0, |i| i + 1);
    }
    let mut count = newlines(&bytes[..taken]);
    if whole {
        return (taken, count, false);
    }
    if count > MAX_BATCH {
        taken = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| newline(b))
            .nth(MAX_BATCH - 1)
            .map_or(taken, |(i, _)| i + 1);
        count = MAX_BATCH;
        return (taken, count, true);
    }
    // Cut short when another complete line follows (found within a line).
    (taken, count, bytes[taken..].iter().any(newline))
}

/// How many `\n` are in `bytes`, counted in runs of 255 with a byte-wide
/// sum each (which vectorises).
fn newlines(bytes: &[u8]) -> usize {
    bytes
        .chunks(255)
        .map(|c| usize::from(c.iter().fold(0u8, |n, b| n + u8::from(*b == b'\n'))))
        .sum()
}

impl UsageLog {
    /// Opens the spool in `dir`, appending to its newest segment.
    pub fn open(dir: &Path) -> io::Result<UsageLog> {
        std::fs::create_dir_all(dir)?;
        let n = segments(dir)?.last().copied().unwrap_or(0);
        let file = open_segment(dir, n)?;
        let len = file.metadata()?.len();
        let cursor_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(dir.join("usage.cursor"))?;
        Ok(UsageLog {
            dir: dir.to_path_buf(),
            current: Mutex::new(Current::new(n, file, len)),
            cursor_file,
            wake: Notify::new(),
        })
    }

    /// Appends one record durably against a crash of this process.
    pub fn append(&self, record: &UsageLine<'_>) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        {
            let mut current = self
                .current
                .lock()
                .map_err(|_| io::Error::other("usage spool lock poisoned"))?;
            if current.len >= SEGMENT_BYTES {
                let next = current.segment + 1;
                *current = Current::new(next, open_segment(&self.dir, next)?, 0);
            }
            if let Err(e) = current.file.write_all(&line) {
                // Part of the line may be on disk: offsets are the file's
                // from now on, and the shipper reads them from there.
                current.len = current.file.metadata().map_or(current.len, |m| m.len());
                current.in_memory = false;
                current.memory = Vec::new();
                return Err(e);
            }
            current.len += line.len() as u64;
            if current.in_memory {
                if current.memory.len() + line.len() <= MEMORY_BYTES {
                    current.memory.extend_from_slice(&line);
                } else {
                    current.in_memory = false;
                    current.memory = Vec::new();
                }
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    fn load_cursor(&self) -> Cursor {
        let first = segments(&self.dir)
            .ok()
            .and_then(|s| s.first().copied())
            .unwrap_or(0);
        let mut bytes = vec![0u8; CURSOR_BYTES];
        let read = self.cursor_file.read_at(&mut bytes, 0).unwrap_or(0);
        let c: Cursor = serde_json::from_slice(&bytes[..read]).unwrap_or_default();
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
        let mut bytes = serde_json::to_vec(c).map_err(io::Error::other)?;
        if bytes.len() > CURSOR_BYTES {
            return Err(io::Error::other("usage cursor larger than its file"));
        }
        bytes.resize(CURSOR_BYTES, b' ');
        self.cursor_file.write_all_at(&bytes, 0)
    }

    fn newest_segment(&self) -> u64 {
        self.current.lock().map(|c| c.segment).unwrap_or(0)
    }

    /// Complete records of segment `n` from `from` (up to `to`, or at most
    /// one batch of them), as spooled; each line gets the cheap check of
    /// `looks_like_record` here, the full one in the roll-up.
    fn read_from(&self, n: u64, from: u64, to: Option<u64>) -> io::Result<Batch> {
        let (end, cut) = match to {
            Some(to) => (to, false),
            None => {
                let len = std::fs::metadata(segment_path(&self.dir, n)).map_or(from, |m| m.len());
                (
                    len.min(from + MAX_BATCH_BYTES),
                    len > from + MAX_BATCH_BYTES,
                )
            }
        };
        let mut buf = vec![0u8; end.saturating_sub(from) as usize];
        File::open(segment_path(&self.dir, n))?.read_exact_at(&mut buf, from)?;
        let (taken, _, capped) = complete_lines(&buf, to.is_some());
        buf.truncate(taken);
        let mut lines = Vec::with_capacity(buf.len());
        let mut count = 0;
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if looks_like_record(&line[..line.len() - 1]) {
                lines.extend_from_slice(line);
                count += 1;
            } else {
                tracing::warn!("gateway: unreadable usage record skipped");
            }
        }
        Ok(Batch {
            lines,
            count,
            end: from + taken as u64,
            full: cut || capped,
        })
    }

    /// Makes `lines` the pending batch: a new id, saved before it is sent.
    fn start_batch(&self, cursor: &mut Cursor, batch: Batch) -> io::Result<Batch> {
        cursor.pending = Some(Pending {
            batch_id: format!("ub_{:032x}", rand::random::<u128>()),
            end: batch.end,
        });
        if let Err(e) = self.save_cursor(cursor) {
            cursor.pending = None;
            return Err(e);
        }
        Ok(batch)
    }

    /// The next batch from the in-memory copy, if that is where it is. A
    /// few memory copies and one `pwrite`: cheap enough for the gateway's
    /// own thread.
    fn batch_in_memory(&self, cursor: &mut Cursor) -> FromMemory {
        if cursor.pending.is_some() {
            return FromMemory::OnDisk;
        }
        let batch = {
            let Ok(mut current) = self.current.lock() else {
                return FromMemory::OnDisk;
            };
            let current = &mut *current;
            if cursor.segment != current.segment {
                return FromMemory::OnDisk;
            }
            if !current.in_memory {
                // Keep a copy again once the disk has nearly caught up.
                if current.len.saturating_sub(cursor.acked) <= MAX_BATCH_BYTES {
                    current.in_memory = true;
                    current.memory_start = current.len;
                }
                return FromMemory::OnDisk;
            }
            if cursor.acked < current.memory_start || cursor.acked > current.len {
                return FromMemory::OnDisk;
            }
            // What is acknowledged is not needed any more.
            let sent = (cursor.acked - current.memory_start) as usize;
            current.memory.drain(..sent);
            current.memory_start = cursor.acked;
            let (taken, count, full) = complete_lines(&current.memory, false);
            if count == 0 {
                return FromMemory::Idle;
            }
            Batch {
                lines: current.memory[..taken].to_vec(),
                count,
                end: cursor.acked + taken as u64,
                full,
            }
        };
        FromMemory::Batch(self.start_batch(cursor, batch))
    }

    /// The shipper's next step from `cursor`, reading the segments (so on
    /// a blocking thread): the batch to send (resent as it was if one is
    /// pending), or `None` when everything is sent.
    fn next_batch(&self, cursor: &mut Cursor) -> io::Result<Option<Batch>> {
        loop {
            if let Some(p) = &cursor.pending {
                return self
                    .read_from(cursor.segment, cursor.acked, Some(p.end))
                    .map(Some);
            }
            // Asked before reading: once the appender has moved on, a read
            // of this segment sees everything it will ever hold.
            let closed = cursor.segment < self.newest_segment();
            let batch = self.read_from(cursor.segment, cursor.acked, None)?;
            if batch.end > cursor.acked {
                return self.start_batch(cursor, batch).map(Some);
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

/// Whether a spooled line can be a record at all: an object with no
/// control bytes. What `append` writes always passes; a line that passes
/// but is still not a record (a damaged disk) is dropped by the roll-up.
fn looks_like_record(line: &[u8]) -> bool {
    line.first() == Some(&b'{') && line.last() == Some(&b'}') && line.iter().all(|b| *b >= 0x20)
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
        let step = match log.batch_in_memory(&mut cursor) {
            FromMemory::Batch(batch) => batch.map(Some),
            FromMemory::Idle => Ok(None),
            FromMemory::OnDisk => off_thread(&log, &mut cursor, |l, c| l.next_batch(c)).await,
        };
        let batch = match step {
            Ok(Some(batch)) => batch,
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
        let (count, full) = (batch.count, batch.full);
        let id = pending.batch_id.clone();
        let body =
            match tokio::task::spawn_blocking(move || usage_rollup::batch_body(&id, &batch.lines))
                .await
            {
                // `Bytes`: a retry resends the same buffer rather than a copy.
                Ok(body) => bytes::Bytes::from(body),
                Err(e) => {
                    tracing::error!(error = %e, "gateway: cannot roll usage up; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
        let mut backoff = Duration::from_millis(100);
        loop {
            match cp
                .call_raw(reqwest::Method::POST, "/v1/usage", Some(body.clone()))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, lines = count, "gateway: usage not acknowledged; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        cursor.acked = pending.end;
        cursor.pending = None;
        if let Err(e) = log.save_cursor(&cursor) {
            tracing::error!(error = %e, "gateway: cannot save the usage cursor");
        }
        // A batch that was not full: let the next one fill for a moment, so
        // the control plane writes few large batches, not many small ones.
        if !full {
            tokio::time::sleep(crate::USAGE_FLUSH).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_api::{UsageBatch, UsageRecordView};

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
            flag: None,
            batch: None,
            requests: 1,
            ingress_site: "s".into(),
        }
    }

    fn line(r: &UsageRecordView) -> UsageLine<'_> {
        UsageLine {
            at: &r.at,
            tenant: &r.tenant,
            deployment: &r.deployment,
            site: &r.site,
            replica: &r.replica,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            request_id: &r.request_id,
            flag: r.flag.as_deref(),
            batch: r.batch.as_deref(),
            itemised: false,
            ingress_site: &r.ingress_site,
        }
    }

    /// The cut `complete_lines` makes is the one walking line by line
    /// makes, at every bound.
    #[test]
    fn the_batch_cut_is_the_line_by_line_one() {
        fn by_lines(bytes: &[u8], whole: bool) -> (usize, usize, bool) {
            let (mut taken, mut count) = (0usize, 0usize);
            while let Some(nl) = bytes[taken..].iter().position(|b| *b == b'\n') {
                let next = taken + nl + 1;
                if !whole && count > 0 && (count == MAX_BATCH || next as u64 > MAX_BATCH_BYTES) {
                    return (taken, count, true);
                }
                taken = next;
                count += 1;
            }
            (taken, count, false)
        }
        let line = |n: usize| {
            let mut l = vec![b'x'; n];
            l.push(b'\n');
            l
        };
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"no newline yet".to_vec(),
            [line(10), b"torn".to_vec()].concat(),
            // Past the line bound, past the byte bound, and one line past it.
            line(100).repeat(MAX_BATCH + 7),
            line(300).repeat(4000),
            [line(2 << 20), line(5)].concat(),
            line(MAX_BATCH_BYTES as usize - 1).repeat(2),
            [line(MAX_BATCH_BYTES as usize - 1), b"tail".to_vec()].concat(),
        ];
        for bytes in &cases {
            for whole in [false, true] {
                assert_eq!(
                    complete_lines(bytes, whole),
                    by_lines(bytes, whole),
                    "{} bytes, whole {whole}",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn a_spooled_line_reads_back_as_the_record() {
        for (request_id, flag, batch) in [
            ("req_1", None, None),
            ("", Some("replaced"), Some("batch_0123456789abcdef")),
        ] {
            let record = UsageRecordView {
                request_id: request_id.into(),
                flag: flag.map(str::to_string),
                batch: batch.map(str::to_string),
                ..record(5)
            };
            let text = serde_json::to_vec(&line(&record)).unwrap();
            let back: UsageRecordView = serde_json::from_slice(&text).unwrap();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&record).unwrap()
            );
        }
    }

    /// The spooled lines' `prompt_tokens`, in the batch's order.
    fn ids(batch: &Batch) -> Vec<i64> {
        batch
            .lines
            .split_inclusive(|b| *b == b'\n')
            .map(|l| {
                serde_json::from_slice::<UsageRecordView>(l)
                    .unwrap()
                    .prompt_tokens
            })
            .collect()
    }

    fn ack(log: &UsageLog, cursor: &mut Cursor) {
        cursor.acked = cursor.pending.take().unwrap().end;
        log.save_cursor(cursor).unwrap();
    }

    fn append_raw(dir: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(segment_path(dir, 0))
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn batches_survive_a_restart_with_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(dir.path()).unwrap();
        for i in 0..3 {
            log.append(&line(&record(i))).unwrap();
        }
        let mut cursor = log.load_cursor();
        let FromMemory::Batch(batch) = log.batch_in_memory(&mut cursor) else {
            panic!("appended records are sent from memory");
        };
        assert_eq!(ids(&batch.unwrap()), vec![0, 1, 2]);
        let id = cursor.pending.clone().unwrap().batch_id;
        drop(log);
        // "Crash" before the acknowledgement: the same batch, same id, now
        // read back from the segment.
        let log = UsageLog::open(dir.path()).unwrap();
        let mut cursor = log.load_cursor();
        assert_eq!(cursor.pending.as_ref().unwrap().batch_id, id);
        assert!(matches!(
            log.batch_in_memory(&mut cursor),
            FromMemory::OnDisk
        ));
        assert_eq!(
            ids(&log.next_batch(&mut cursor).unwrap().unwrap()),
            vec![0, 1, 2]
        );
        ack(&log, &mut cursor);
        assert!(log.next_batch(&mut cursor).unwrap().is_none());
        // Records appended after the restart come from memory again.
        log.append(&line(&record(3))).unwrap();
        let FromMemory::Batch(batch) = log.batch_in_memory(&mut cursor) else {
            panic!("new records are in memory");
        };
        assert_eq!(ids(&batch.unwrap()), vec![3]);
        ack(&log, &mut cursor);
        assert!(matches!(log.batch_in_memory(&mut cursor), FromMemory::Idle));
    }

    #[test]
    fn torn_and_damaged_lines_are_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(dir.path()).unwrap();
        log.append(&line(&record(0))).unwrap();
        // Not an object: skipped when read back. A torn tail (never
        // written by `append`, but a disk may hold one) is left for
        // later, not misread.
        append_raw(dir.path(), b"\0\0\0garbage\n{\"at\":");
        drop(log);
        let log = UsageLog::open(dir.path()).unwrap();
        let mut cursor = log.load_cursor();
        let batch = log.next_batch(&mut cursor).unwrap().unwrap();
        assert_eq!(ids(&batch), vec![0]);
        // An object that is not a record passes the cheap check; the
        // roll-up drops it, and a negative count (a spool from before
        // usage was checked) too, keeping the rest.
        append_raw(dir.path(), b"\"}\n{\"not\":\"a record\"}\n");
        ack(&log, &mut cursor);
        let batch = log.next_batch(&mut cursor).unwrap().unwrap();
        assert_eq!(
            batch.count, 2,
            "the torn tail completed, and the stray object"
        );
        ack(&log, &mut cursor);
        log.append(&line(&record(-3))).unwrap();
        log.append(&line(&record(4))).unwrap();
        let mut lines = batch.lines.clone();
        lines.extend_from_slice(&log.next_batch(&mut cursor).unwrap().unwrap().lines);
        let (records, dropped) = usage_rollup::rollup(&lines);
        assert_eq!(dropped, 3);
        assert_eq!(
            records
                .iter()
                .map(|r| (r.requests, r.prompt_tokens))
                .collect::<Vec<_>>(),
            [(1, 4)]
        );
    }

    #[test]
    fn full_segments_roll_over_and_are_deleted_once_sent() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(dir.path()).unwrap();
        log.append(&line(&record(0))).unwrap();
        // Pretend the segment is full: the next append starts another.
        log.current.lock().unwrap().len = SEGMENT_BYTES;
        log.append(&line(&record(1))).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![0, 1]);
        let mut cursor = log.load_cursor();
        // Both are read back from disk: leaving a closed segment (and
        // deleting it) is the disk path's step.
        assert!(matches!(
            log.batch_in_memory(&mut cursor),
            FromMemory::OnDisk
        ));
        assert_eq!(ids(&log.next_batch(&mut cursor).unwrap().unwrap()), vec![0]);
        ack(&log, &mut cursor);
        assert!(matches!(
            log.batch_in_memory(&mut cursor),
            FromMemory::OnDisk
        ));
        assert_eq!(ids(&log.next_batch(&mut cursor).unwrap().unwrap()), vec![1]);
        assert_eq!(
            segments(dir.path()).unwrap(),
            vec![1],
            "the sent segment is gone"
        );
        ack(&log, &mut cursor);
        assert!(log.next_batch(&mut cursor).unwrap().is_none());
    }

    #[test]
    fn a_long_backlog_is_read_back_from_disk_then_memory_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsageLog::open(dir.path()).unwrap();
        let mut cursor = log.load_cursor();
        // The control plane away: more unsent than memory keeps.
        let line_len = serde_json::to_vec(&record(0)).unwrap().len() + 1;
        let n = (MEMORY_BYTES / line_len + 10) as i64;
        for i in 0..n {
            log.append(&line(&record(i))).unwrap();
        }
        assert!(!log.current.lock().unwrap().in_memory);
        let (mut sent, mut appended) = (Vec::new(), n);
        loop {
            let batch = match log.batch_in_memory(&mut cursor) {
                FromMemory::Batch(b) => b.unwrap(),
                FromMemory::Idle => break,
                FromMemory::OnDisk => match log.next_batch(&mut cursor).unwrap() {
                    Some(b) => b,
                    None => break,
                },
            };
            assert!(batch.count <= MAX_BATCH);
            sent.extend(ids(&batch));
            ack(&log, &mut cursor);
            // Appends keep coming while the backlog drains.
            if (sent.len() as i64) < n {
                log.append(&line(&record(appended))).unwrap();
                appended += 1;
            }
        }
        assert_eq!(
            sent,
            (0..appended).collect::<Vec<_>>(),
            "all, in order, none twice"
        );
        assert!(
            log.current.lock().unwrap().in_memory,
            "memory took over again"
        );
    }

    /// Batches as a control plane saw them: their id, and their records
    /// as (requests, prompt tokens).
    type Seen = Arc<Mutex<Vec<(String, Vec<(i64, i64)>)>>>;

    /// A control plane that refuses the first try of every batch (a 503,
    /// as during a failover) and records the second.
    async fn flaky_control_plane() -> (String, Seen) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let tried = Arc::new(Mutex::new(std::collections::HashSet::new()));
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (log, tried) = (log.clone(), tried.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let head_end = loop {
                            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < head_end + length {
                            let mut chunk = [0u8; 65536];
                            let n = conn.read(&mut chunk).await.unwrap();
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
                        let batch: UsageBatch = serde_json::from_slice(&body).unwrap();
                        let status = if tried.lock().unwrap().insert(batch.batch_id.clone()) {
                            "503 Service Unavailable"
                        } else {
                            let records = batch
                                .records
                                .iter()
                                .map(|r| (r.requests, r.prompt_tokens))
                                .collect();
                            log.lock().unwrap().push((batch.batch_id, records));
                            "200 OK"
                        };
                        let answer = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
                        );
                        conn.write_all(answer.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (base, seen)
    }

    #[tokio::test]
    async fn the_shipper_sends_roll_ups_and_retries_a_batch_under_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(UsageLog::open(dir.path()).unwrap());
        for i in 0..5 {
            log.append(&line(&record(i))).unwrap();
        }
        let hundred = record(100);
        let mut own = line(&hundred);
        own.itemised = true;
        log.append(&own).unwrap();
        let (base, seen) = flaky_control_plane().await;
        let shipper = tokio::spawn(ship(ControlPlane::new(&base, "token"), log.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let sent = loop {
            let sent = seen.lock().unwrap().clone();
            if sent.iter().map(|(_, r)| r.len()).sum::<usize>() >= 2 {
                break sent;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not shipped: {sent:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        shipper.abort();
        // One batch, recorded on its second try: the itemised request on
        // its own, the other five as one aggregate of their sums.
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].1, vec![(1, 100), (5, 10)]);
    }
}
