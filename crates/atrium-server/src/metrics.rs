//! Prometheus metrics of the control plane, rendered in the text exposition
//! format at `/metrics`. A handful of series, kept in plain maps: enough for
//! request rates, error rates, latency histograms and watch streams.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_core::histogram::Histogram;

/// Upper bounds (seconds) of the request latency histogram.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    watch_streams: AtomicI64,
    /// The controllers' lease term this server holds; 0 when it does not.
    leading_term: AtomicI64,
}

/// Decrements the open-watch gauge when dropped.
pub struct WatchGauge(Arc<Metrics>);

impl Drop for WatchGauge {
    fn drop(&mut self) {
        self.0.watch_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn record(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((method.to_string(), route.to_string(), status))
                .or_default() += 1;
        }
        if let Ok(mut m) = self.latency.lock() {
            m.entry(route.to_string())
                .or_insert_with(|| Histogram::new(BUCKETS))
                .observe(elapsed);
        }
    }

    pub fn watch_started(self: &Arc<Self>) -> WatchGauge {
        self.watch_streams.fetch_add(1, Ordering::Relaxed);
        WatchGauge(self.clone())
    }

    /// Records the lease term held (0: not leading).
    pub fn set_leading(&self, term: i64) {
        self.leading_term.store(term, Ordering::Relaxed);
    }

    pub fn render(&self, store_revision: i64) -> String {
        let mut out = String::new();
        out.push_str("# HELP atrium_http_requests_total HTTP requests served, by method, route and status.\n");
        out.push_str("# TYPE atrium_http_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((method, route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "atrium_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str(
            "# HELP atrium_http_request_duration_seconds Time to the response head, by route.\n",
        );
        out.push_str("# TYPE atrium_http_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for (route, h) in m.iter() {
                let labels = format!("route=\"{route}\"");
                h.render(&mut out, "atrium_http_request_duration_seconds", &labels);
            }
        }
        out.push_str(
            "# HELP atrium_watch_streams Open watch streams.\n# TYPE atrium_watch_streams gauge\n",
        );
        let _ = writeln!(
            out,
            "atrium_watch_streams {}",
            self.watch_streams.load(Ordering::Relaxed)
        );
        out.push_str("# HELP atrium_store_revision Latest committed store revision.\n# TYPE atrium_store_revision gauge\n");
        let _ = writeln!(out, "atrium_store_revision {store_revision}");
        let term = self.leading_term.load(Ordering::Relaxed);
        out.push_str("# HELP atrium_controllers_leading Whether this server runs the controllers (holds their lease).
# TYPE atrium_controllers_leading gauge
");
        let _ = writeln!(out, "atrium_controllers_leading {}", i64::from(term > 0));
        out.push_str("# HELP atrium_controllers_term The controllers' lease term this server holds; 0 when it holds none.
# TYPE atrium_controllers_term gauge
");
        let _ = writeln!(out, "atrium_controllers_term {term}");
        out
    }
}
