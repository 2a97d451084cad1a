//! Controllers on exactly one server. Any number of `atrium server`
//! processes may share one database and serve the API; the controllers —
//! placement, autoscaler, tenant clusters' pods, change-log compaction,
//! batch retention —
//! run only on the server holding the `controllers` lease, renewed
//! often for a short time (`Timing`), and write through a store fenced to
//! the lease's term: once another server takes the lease over, anything the deposed
//! one still tries to write is refused by the database, not by its own
//! belief that it leads.
//!
//! A server's holder name is kept in the data directory under its host's
//! name, so a server that restarts on the same host (even after `kill -9`)
//! renews its own lease at once instead of waiting for it to lapse, while
//! servers on several hosts may share the directory; a stopping server
//! resigns the lease.

use std::path::Path;
use std::time::Duration;

use atrium_store::{Backend, Fence, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{autoscale, batches, compact_periodically, controller, kube, AppState};

const LEASE: &str = "controllers";
/// How long the lease lasts unless renewed (`ttl`), and how often the
/// leader renews it and the others ask for it (`renew`).
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttl: Duration,
    renew: Duration,
}

/// Several servers share a PostgreSQL database: a dead leader's
/// controllers resume elsewhere within ttl + renew, under 2 s. The leader
/// has six tries to renew before it lapses; one that still misses them
/// all (a stalled host) only loses the lease: the fence keeps two leaders
/// from acting in one term, so short is safe.
const SHARED: Timing = Timing {
    ttl: Duration::from_millis(1500),
    renew: Duration::from_millis(250),
};
/// A SQLite database has one server (its file is on one host): nobody
/// waits to take over, and each renewal is a synced commit on its disk.
const ALONE: Timing = Timing {
    ttl: Duration::from_secs(10),
    renew: Duration::from_secs(2),
};

/// This server's name as a lease holder, made once per host and data
/// directory: servers may share one data directory (the registry, the
/// Batch API's files and the tenant clusters' sealing key live there), so
/// the name is kept under the host's name, and each host's server holds
/// its own.
pub fn holder_name(data_dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(64)
        .collect();
    let path = data_dir.join(format!("server-{host}.id"));
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return id.to_string();
        }
    }
    let id = format!("{host}-{:016x}", rand::random::<u64>());
    if let Err(e) = std::fs::write(&path, &id) {
        tracing::warn!(error = %e, path = %path.display(), "cannot keep the server's lease name; a restart will wait for its old lease");
    }
    id
}

/// The controllers of one term, and how to stop them.
struct Leading {
    term: i64,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Leading {
    fn start(state: &AppState, holder: &str, term: i64, compaction: (i64, Duration)) -> Leading {
        let store = state.store.fenced(Fence {
            name: LEASE.into(),
            holder: holder.into(),
            term,
        });
        let (stop, stopped) = watch::channel(false);
        let fenced_state = state.with_store(store.clone());
        let tasks = vec![
            tokio::spawn(kube::pods::run(fenced_state)),
            tokio::spawn(autoscale::run(
                store.clone(),
                state.load.clone(),
                stopped.clone(),
            )),
            tokio::spawn(controller::run(store.clone(), stopped.clone())),
            tokio::spawn(batches::retention::run(
                store.clone(),
                state.files.clone(),
                stopped.clone(),
            )),
            tokio::spawn(crate::gateway_records::run(store.clone(), stopped.clone())),
            tokio::spawn(compact_periodically(store, compaction, stopped)),
        ];
        Leading { term, stop, tasks }
    }

    fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Holds or waits for the lease until `shutdown`, running the controllers
/// while it holds it.
pub async fn run(
    state: AppState,
    holder: String,
    compaction: (i64, Duration),
    mut shutdown: watch::Receiver<bool>,
) {
    let store: Store = state.store.clone();
    let Timing { ttl, renew } = match store.backend() {
        Backend::Postgres => SHARED,
        Backend::Sqlite => ALONE,
    };
    let mut leading: Option<Leading> = None;
    loop {
        let term = match store.lead(LEASE, &holder, ttl).await {
            Ok(t) => t,
            Err(e) => {
                // Unsure whether it still leads: it stops, and the fence
                // would refuse its writes anyway once another leads.
                tracing::warn!(error = %e, "cannot renew the controllers' lease");
                None
            }
        };
        match (term, leading.as_ref().map(|l| l.term)) {
            (Some(t), Some(held)) if t == held => {}
            (Some(t), _) => {
                if let Some(l) = leading.take() {
                    l.stop();
                }
                tracing::info!(term = t, %holder, "leading: this server runs the controllers");
                leading = Some(Leading::start(&state, &holder, t, compaction));
                state.metrics.set_leading(t);
            }
            (None, Some(_)) => {
                if let Some(l) = leading.take() {
                    l.stop();
                }
                tracing::warn!(%holder, "no longer leading: controllers stopped");
                state.metrics.set_leading(0);
            }
            (None, None) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(renew) => {}
            _ = shutdown.changed() => break,
        }
    }
    if let Some(l) = leading.take() {
        l.stop();
        if let Err(e) = store.resign(LEASE, &holder).await {
            tracing::warn!(error = %e, "cannot resign the controllers' lease; it expires in {ttl:?}");
        }
    }
}
