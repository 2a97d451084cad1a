//! The control plane's vector store: each collection a directory
//! `<data-dir>/vectors/<collection id>` (`atrium_vector::durable`), opened
//! on first use and kept in memory while used; one idle past the page-out
//! age is dropped from memory (its files stay) and comes back on its next
//! use. At most `MAX_OPEN` are open at once, the least recently used idle
//! ones paged out first: memory and open files (one log each) stay bounded
//! however many tenants keep a collection. Paths come only from
//! server-made ids, checked again here, so no tenant's text reaches the
//! file system.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atrium_api::{Collection, Resource};
use atrium_vector::collection::Shape;
use atrium_vector::durable::Durable;
use atrium_vector::hnsw::Scratch;

use crate::error::ApiError;

/// One open collection: its data behind a lock (searches share it, writes
/// take it alone), spare search scratch, and when it was last used.
#[derive(Debug)]
pub struct Open {
    pub data: Arc<tokio::sync::RwLock<Durable>>,
    scratches: Mutex<Vec<Scratch>>,
    last_used: AtomicU64,
}

impl Open {
    pub fn scratch(&self) -> Scratch {
        self.scratches
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .unwrap_or_default()
    }

    pub fn give_back(&self, s: Scratch) {
        if let Ok(mut all) = self.scratches.lock() {
            // One per concurrent search is plenty.
            if all.len() < 8 {
                all.push(s);
            }
        }
    }
}

/// Collections open at once, at most (unless more are in use this moment).
pub const MAX_OPEN: usize = 1024;

#[derive(Debug)]
pub struct VectorStore {
    root: PathBuf,
    open: Mutex<HashMap<String, Arc<Open>>>,
    max_open: usize,
}

/// Milliseconds since the epoch: fine enough to order uses for paging out.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn internal(what: &str) -> impl FnOnce(atrium_vector::durable::DurableError) -> ApiError + '_ {
    move |e| ApiError::Internal(format!("vector store, {what}: {e}"))
}

impl VectorStore {
    pub fn open(root: PathBuf, max_open: usize) -> std::io::Result<VectorStore> {
        std::fs::create_dir_all(&root)?;
        Ok(VectorStore {
            root,
            open: Mutex::new(HashMap::new()),
            max_open,
        })
    }

    /// The directory of collection `id`, a server-made id only.
    fn dir(&self, id: &str) -> Result<PathBuf, ApiError> {
        if !crate::crud::made_by_new_id(Collection::ID_PREFIX, id) {
            return Err(ApiError::Internal(format!("not a collection id: {id:?}")));
        }
        Ok(self.root.join(id))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Open>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes collection `id`'s directory (blocking).
    pub fn create(&self, id: &str, shape: Shape) -> Result<(), ApiError> {
        let dir = self.dir(id)?;
        let durable = Durable::create(&dir, shape).map_err(internal("create"))?;
        let mut map = self.map();
        map.insert(id.to_string(), Arc::new(wrap(durable)));
        self.make_room(&mut map);
        Ok(())
    }

    /// Collection `id`, opened from disk if it is not in memory (blocking).
    pub fn get(&self, id: &str) -> Result<Arc<Open>, ApiError> {
        if let Some(o) = self.map().get(id) {
            o.last_used.store(now(), Ordering::Relaxed);
            return Ok(o.clone());
        }
        let dir = self.dir(id)?;
        let durable = Durable::open(&dir).map_err(internal("open"))?;
        let opened = Arc::new(wrap(durable));
        // Two first uses at once: the first one in wins, the other's copy
        // is dropped before anyone wrote through it.
        let mut map = self.map();
        let open = map.entry(id.to_string()).or_insert(opened).clone();
        self.make_room(&mut map);
        Ok(open)
    }

    /// Pages out the least recently used collections not in use until at
    /// most `max_open` remain (or every one left is in use).
    fn make_room(&self, map: &mut HashMap<String, Arc<Open>>) {
        let over = map.len().saturating_sub(self.max_open);
        if over == 0 {
            return;
        }
        let mut idle: Vec<(u64, String)> = map
            .iter()
            .filter(|(_, o)| Arc::strong_count(o) == 1)
            .map(|(id, o)| (o.last_used.load(Ordering::Relaxed), id.clone()))
            .collect();
        idle.sort_unstable();
        for (_, id) in idle.into_iter().take(over) {
            map.remove(&id);
        }
    }

    /// How many collections are in memory.
    pub fn open_count(&self) -> usize {
        self.map().len()
    }

    /// Drops collection `id` from memory and disk (blocking).
    pub fn remove(&self, id: &str) -> Result<(), ApiError> {
        let dir = self.dir(id)?;
        self.map().remove(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ApiError::Internal(format!(
                "removing {}: {e}",
                dir.display()
            ))),
        }
    }

    /// Drops from memory every collection unused for `idle` and not in use
    /// now; returns how many.
    pub fn page_out(&self, idle: Duration) -> usize {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now().saturating_sub(idle_ms);
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, o| o.last_used.load(Ordering::Relaxed) > cutoff || Arc::strong_count(o) > 1);
        before - map.len()
    }
}

fn wrap(durable: Durable) -> Open {
    Open {
        data: Arc::new(tokio::sync::RwLock::new(durable)),
        scratches: Mutex::new(Vec::new()),
        last_used: AtomicU64::new(now()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_vector::distance::Metric;

    #[test]
    fn the_least_recently_used_idle_collections_page_out_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = VectorStore::open(dir.path().join("v"), 2).unwrap();
        let shape = || Shape {
            dim: 2,
            metric: Metric::L2,
        };
        store.create("vec_000000000000000a", shape()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        store.create("vec_000000000000000b", shape()).unwrap();
        let held = store.get("vec_000000000000000a").unwrap(); // in use, and now the newest
        std::thread::sleep(Duration::from_millis(5));
        store.create("vec_000000000000000c", shape()).unwrap();
        assert_eq!(store.open_count(), 2);
        assert!(
            store.map().contains_key("vec_000000000000000a"),
            "in use: kept"
        );
        assert!(
            !store.map().contains_key("vec_000000000000000b"),
            "least recently used: out"
        );
        // Paged out, not lost: it comes back on its next use.
        drop(held);
        store.get("vec_000000000000000b").unwrap();
        assert_eq!(store.open_count(), 2);
    }
}
