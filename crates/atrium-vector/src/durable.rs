//! A collection kept on disk: its shape (`shape.json`), a snapshot of its
//! points (`snapshot.jsonl`) and a write-ahead log of the changes since
//! (`wal.jsonl`). A change is acknowledged only after its log lines are on
//! disk (`fdatasync`), so an acknowledged write survives `kill -9` and power
//! loss; opening replays the log after the snapshot and drops a torn last
//! record (one a crash cut short, which was never acknowledged).
//!
//! Each log line is `<crc32 of the JSON, 8 hex digits> <JSON>`: a line
//! whose checksum fails ends the log, as a torn write would.
//!
//! The index itself is not stored: opening rebuilds it from the points
//! (about 0.45 ms per point at M=16, ef_construction 200 on one core:
//! `atrium bench vector` built 390,000 GloVe vectors in 174 s), which keeps
//! the disk format independent of the graph's.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::collection::{Collection, Point, PointError, PointId, Shape};
use crate::hnsw::{Params, Scratch};

/// Log bytes past which the next write first folds the log into a new
/// snapshot.
pub const SNAPSHOT_AFTER_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Upsert(Point),
    Delete(PointId),
}

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("{0}")]
    Point(#[from] PointError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DurableError + '_ {
    move |source| DurableError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
pub struct Durable {
    dir: PathBuf,
    collection: Collection,
    wal: File,
    wal_bytes: u64,
    scratch: Scratch,
}

fn line(json: &str) -> String {
    format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()))
}

/// The JSON of a log line whose checksum holds.
fn checked(line: &str) -> Option<&str> {
    let (crc, json) = line.split_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32fast::hash(json.as_bytes()) == crc).then_some(json)
}

fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Durable {
    /// Makes a new, empty collection in `dir` (which must not hold one).
    pub fn create(dir: &Path, shape: Shape) -> Result<Durable, DurableError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("shape.json");
        let json = serde_json::to_vec(&shape).map_err(|e| DurableError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(&path))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io(&path))?;
        sync_dir(dir)?;
        Durable::open(dir)
    }

    /// Opens the collection in `dir`: snapshot, then the log's intact
    /// records; a torn tail is cut off.
    pub fn open(dir: &Path) -> Result<Durable, DurableError> {
        let path = dir.join("shape.json");
        let shape: Shape = serde_json::from_slice(&std::fs::read(&path).map_err(io(&path))?)
            .map_err(|e| DurableError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let mut collection = Collection::new(shape, Params::default());
        let mut scratch = Scratch::default();
        let snapshot = dir.join("snapshot.jsonl");
        if snapshot.exists() {
            let f = File::open(&snapshot).map_err(io(&snapshot))?;
            for (n, l) in BufReader::new(f).lines().enumerate() {
                let l = l.map_err(io(&snapshot))?;
                let point = checked(&l)
                    .and_then(|j| serde_json::from_str::<Point>(j).ok())
                    .ok_or_else(|| DurableError::Corrupt {
                        path: snapshot.clone(),
                        message: format!("line {} is damaged", n + 1),
                    })?;
                collection.upsert(point, &mut scratch)?;
            }
        }
        let wal_path = dir.join("wal.jsonl");
        let mut kept = 0u64;
        if wal_path.exists() {
            let f = File::open(&wal_path).map_err(io(&wal_path))?;
            let mut reader = BufReader::new(f);
            let mut l = String::new();
            loop {
                l.clear();
                let n = reader.read_line(&mut l).map_err(io(&wal_path))?;
                let change = l
                    .strip_suffix('\n')
                    .and_then(checked)
                    .and_then(|j| serde_json::from_str::<Change>(j).ok());
                let Some(change) = change else { break };
                apply(&mut collection, change, &mut scratch)?;
                kept += n as u64;
            }
        }
        let wal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&wal_path)
            .map_err(io(&wal_path))?;
        // Cut a torn tail so new records follow the last whole one.
        if wal.metadata().map_err(io(&wal_path))?.len() != kept {
            wal.set_len(kept)
                .and_then(|()| wal.sync_all())
                .map_err(io(&wal_path))?;
        }
        Ok(Durable {
            dir: dir.to_path_buf(),
            collection,
            wal,
            wal_bytes: kept,
            scratch,
        })
    }

    pub fn collection(&self) -> &Collection {
        &self.collection
    }

    /// Checks every change, logs them all durably, then applies them: all
    /// or (on a bad point) none.
    pub fn write(&mut self, changes: Vec<Change>) -> Result<(), DurableError> {
        for c in &changes {
            if let Change::Upsert(p) = c {
                self.collection.check(p)?;
            }
        }
        if self.wal_bytes > SNAPSHOT_AFTER_BYTES {
            self.snapshot()?;
        }
        let wal_path = self.dir.join("wal.jsonl");
        let mut text = String::new();
        for c in &changes {
            let json = serde_json::to_string(c).map_err(|e| DurableError::Corrupt {
                path: wal_path.clone(),
                message: e.to_string(),
            })?;
            text.push_str(&line(&json));
        }
        self.wal
            .write_all(text.as_bytes())
            .and_then(|()| self.wal.sync_data())
            .map_err(io(&wal_path))?;
        self.wal_bytes += text.len() as u64;
        for c in changes {
            apply(&mut self.collection, c, &mut self.scratch)?;
        }
        Ok(())
    }

    /// Writes every point to a new snapshot and empties the log.
    pub fn snapshot(&mut self) -> Result<(), DurableError> {
        let tmp = self.dir.join("snapshot.jsonl.tmp");
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = BufWriter::new(f);
        for p in self.collection.points() {
            let json = serde_json::to_string(&p).map_err(|e| DurableError::Corrupt {
                path: tmp.clone(),
                message: e.to_string(),
            })?;
            w.write_all(line(&json).as_bytes()).map_err(io(&tmp))?;
        }
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        let snapshot = self.dir.join("snapshot.jsonl");
        std::fs::rename(&tmp, &snapshot).map_err(io(&snapshot))?;
        sync_dir(&self.dir)?;
        let wal_path = self.dir.join("wal.jsonl");
        self.wal
            .set_len(0)
            .and_then(|()| self.wal.sync_all())
            .map_err(io(&wal_path))?;
        self.wal_bytes = 0;
        Ok(())
    }
}

fn apply(c: &mut Collection, change: Change, s: &mut Scratch) -> Result<(), PointError> {
    match change {
        Change::Upsert(p) => c.upsert(p, s),
        Change::Delete(id) => {
            c.delete(&id);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::Metric;

    fn p(id: u64, x: f32) -> Point {
        Point {
            id: PointId::Num(id),
            vector: vec![x, 1.0],
            payload: Default::default(),
        }
    }

    #[test]
    fn writes_survive_reopening_through_log_and_snapshot_and_a_torn_tail_is_cut() {
        let dir =
            std::env::temp_dir().join(format!("atrium-vector-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let shape = Shape {
            dim: 2,
            metric: Metric::L2,
        };
        let mut d = Durable::create(&dir, shape).unwrap();
        d.write(vec![Change::Upsert(p(1, 1.0)), Change::Upsert(p(2, 2.0))])
            .unwrap();
        d.snapshot().unwrap();
        d.write(vec![
            Change::Upsert(p(3, 3.0)),
            Change::Delete(PointId::Num(1)),
        ])
        .unwrap();
        // A bad point refuses the whole write and logs nothing.
        let bad = Point {
            vector: vec![1.0],
            ..p(9, 0.0)
        };
        assert!(d
            .write(vec![Change::Upsert(p(8, 8.0)), Change::Upsert(bad)])
            .is_err());
        drop(d);
        // A crash mid-append leaves half a record.
        let mut wal = OpenOptions::new()
            .append(true)
            .open(dir.join("wal.jsonl"))
            .unwrap();
        wal.write_all(b"0badc0de {\"upsert\":{\"id\":7,\"vec")
            .unwrap();
        drop(wal);
        let mut d = Durable::open(&dir).unwrap();
        let ids: Vec<PointId> = d.collection().points().map(|p| p.id).collect();
        assert_eq!(ids, vec![PointId::Num(2), PointId::Num(3)]);
        d.write(vec![Change::Upsert(p(4, 4.0))]).unwrap();
        drop(d);
        let d = Durable::open(&dir).unwrap();
        assert_eq!(
            d.collection().len(),
            3,
            "a record after the cut tail reads back"
        );
        assert!(
            Durable::create(&dir, shape).is_err(),
            "never over an existing one"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
