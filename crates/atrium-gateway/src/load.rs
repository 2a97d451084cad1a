//! What the autoscaler learns from this gateway: per deployment, the
//! requests in flight (sampled every `SAMPLE` and averaged), the requests
//! started, and the requests held for want of a ready replica — reported
//! to the control plane every `REPORT`, and at once when a request is
//! held, so a deployment scaled to zero starts a replica without waiting
//! for the next report.
//!
//! The counters are atomics bumped on the request path; the reporter
//! reads them off it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use atrium_client::ControlPlane;
use tokio::sync::Notify;

use crate::routes::Routes;

const SAMPLE: Duration = Duration::from_millis(100);
const REPORT: Duration = Duration::from_secs(1);

/// One deployment's counters at this gateway.
#[derive(Debug, Default)]
pub struct DeploymentLoad {
    in_flight: AtomicU64,
    started: AtomicU64,
    waiting: AtomicU64,
    /// Of `in_flight`, those a batch sent.
    batch: AtomicU64,
}

impl DeploymentLoad {
    /// Counts a request sent to one of its replicas until the guard drops.
    pub fn start(self: &Arc<Self>) -> Counted {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Counted {
            load: self.clone(),
            field: Field::InFlight,
        }
    }

    /// Counts a batch's request sent to one of its replicas until the
    /// guard drops: load like any other (a batch may start a replica),
    /// and apart, so batches can yield to the tenant's own requests.
    pub fn start_batch(self: &Arc<Self>) -> Counted {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.batch.fetch_add(1, Ordering::Relaxed);
        Counted {
            load: self.clone(),
            field: Field::Batch,
        }
    }

    /// Requests in flight or held that no batch sent.
    pub fn interactive(&self) -> u64 {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let batch = self.batch.load(Ordering::Relaxed);
        in_flight
            .saturating_sub(batch)
            .saturating_add(self.waiting.load(Ordering::Relaxed))
    }

    /// Counts a request held for a replica until the guard drops.
    pub fn hold(self: &Arc<Self>) -> Counted {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Counted {
            load: self.clone(),
            field: Field::Waiting,
        }
    }
}

#[derive(Debug)]
enum Field {
    InFlight,
    Waiting,
    Batch,
}

/// A request counted in its deployment's load while it lives.
#[derive(Debug)]
pub struct Counted {
    load: Arc<DeploymentLoad>,
    field: Field,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let counter = match self.field {
            Field::InFlight => &self.load.in_flight,
            Field::Waiting => &self.load.waiting,
            Field::Batch => {
                self.load.batch.fetch_sub(1, Ordering::Relaxed);
                &self.load.in_flight
            }
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sums of samples since the last report, per deployment id.
#[derive(Default)]
struct Window {
    samples: u32,
    in_flight: HashMap<String, u64>,
}

impl Window {
    fn sample(&mut self, loads: &[(String, Arc<DeploymentLoad>)]) {
        self.samples += 1;
        for (id, load) in loads {
            let n = load.in_flight.load(Ordering::Relaxed);
            if n > 0 {
                *self.in_flight.entry(id.clone()).or_default() += n;
            }
        }
    }

    /// The report of this window (emptied), naming only deployments that
    /// saw anything.
    fn take(&mut self, loads: &[(String, Arc<DeploymentLoad>)]) -> Vec<atrium_api::DeploymentLoad> {
        let samples = f64::from(self.samples.max(1));
        let report = loads
            .iter()
            .filter_map(|(id, load)| {
                let sum = self.in_flight.get(id).copied().unwrap_or(0);
                let d = atrium_api::DeploymentLoad {
                    deployment: id.clone(),
                    in_flight: sum as f64 / samples,
                    requests: load.started.swap(0, Ordering::Relaxed),
                    waiting: load.waiting.load(Ordering::Relaxed),
                };
                (sum > 0 || d.requests > 0 || d.waiting > 0).then_some(d)
            })
            .collect();
        *self = Window::default();
        report
    }
}

/// Reports load to the control plane, forever. A report that fails is
/// not retried: the next one says how things are then.
pub async fn report(
    cp: ControlPlane,
    routes: Arc<RwLock<Routes>>,
    wake: Arc<Notify>,
    gateway: String,
    site: String,
) {
    let mut window = Window::default();
    let mut next_report = tokio::time::Instant::now() + REPORT;
    loop {
        let woken = tokio::select! {
            _ = tokio::time::sleep(SAMPLE) => false,
            _ = wake.notified() => true,
        };
        let loads = match routes.read() {
            Ok(r) => r.loads(),
            Err(_) => continue,
        };
        window.sample(&loads);
        if !woken && tokio::time::Instant::now() < next_report {
            continue;
        }
        next_report = tokio::time::Instant::now() + REPORT;
        let report = atrium_api::LoadReport {
            gateway: gateway.clone(),
            site: site.clone(),
            deployments: window.take(&loads),
        };
        if let Err(e) = cp
            .request::<_, serde_json::Value>(reqwest::Method::POST, "/v1/load", Some(&report))
            .await
        {
            tracing::debug!(error = %e, "gateway: cannot report load");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_averages_in_flight_and_counts_starts_and_holds() {
        let a = Arc::new(DeploymentLoad::default());
        let idle = Arc::new(DeploymentLoad::default());
        let loads = vec![
            ("dep_a".to_string(), a.clone()),
            ("dep_idle".to_string(), idle),
        ];
        let mut w = Window::default();
        let first = a.start();
        w.sample(&loads);
        let second = a.start();
        w.sample(&loads);
        drop(first);
        w.sample(&loads);
        drop(second);
        w.sample(&loads);
        let held = a.hold();
        let report = w.take(&loads);
        assert_eq!(report.len(), 1, "an idle deployment is left out");
        assert_eq!(report[0].deployment, "dep_a");
        assert_eq!(report[0].in_flight, 1.0); // (1 + 2 + 1 + 0) / 4
        assert_eq!(report[0].requests, 2);
        assert_eq!(report[0].waiting, 1);
        drop(held);
        // Counted once: the next window starts from nothing.
        w.sample(&loads);
        assert!(w.take(&loads).is_empty());
    }
}
