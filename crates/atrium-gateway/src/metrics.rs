//! The gateway's `/metrics`: requests by route and status, the time spent
//! in the gateway itself, and each replica's load and breaker, in the
//! Prometheus text format. It names every tenant's replicas, so it answers
//! the provider's metrics token only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use atrium_core::histogram::Histogram;

use crate::refusal::Refusal;
use crate::routes::Routes;
use crate::server::Response;

/// Upper bounds (seconds) of the overhead histogram's buckets: 10 µs to
/// 100 ms.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

/// (route, status) → (requests, seconds to the response head).
type RequestCounts = BTreeMap<(&'static str, u16), (u64, f64)>;

pub struct Metrics {
    requests: Mutex<RequestCounts>,
    /// Time a request spent in the gateway, upstream time excluded.
    overhead: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: Mutex::default(),
            overhead: Histogram::new(OVERHEAD_BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts an answer of `route` with its time to the response head.
    pub fn count(&self, route: &'static str, status: u16, elapsed: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            let e = m.entry((route, status)).or_default();
            e.0 += 1;
            e.1 += elapsed.as_secs_f64();
        }
    }

    pub fn observe_overhead(&self, overhead: Duration) {
        self.overhead.observe(overhead);
    }

    /// The exposition; with `routes`, each replica's load and breaker too.
    pub fn render(&self, routes: Option<&Routes>) -> Response {
        let mut out = String::new();
        out.push_str("# HELP atrium_gateway_requests_total Requests by route and status.\n# TYPE atrium_gateway_requests_total counter\n");
        let mut secs = String::from("# HELP atrium_gateway_request_seconds_total Time to the response head.\n# TYPE atrium_gateway_request_seconds_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((route, status), (n, s)) in m.iter() {
                let _ = writeln!(
                    out,
                    "atrium_gateway_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
                let _ = writeln!(
                    secs,
                    "atrium_gateway_request_seconds_total{{route=\"{route}\",status=\"{status}\"}} {s}"
                );
            }
        }
        out.push_str(&secs);
        out.push_str("# HELP atrium_gateway_overhead_seconds Time a request spent in the gateway, upstream time excluded.\n# TYPE atrium_gateway_overhead_seconds histogram\n");
        self.overhead
            .render(&mut out, "atrium_gateway_overhead_seconds", "");
        if let Some(r) = routes {
            let states = r.replica_states();
            out.push_str("# HELP atrium_gateway_in_flight Requests in flight per replica.\n# TYPE atrium_gateway_in_flight gauge\n");
            for (replica, n, _) in &states {
                let _ = writeln!(out, "atrium_gateway_in_flight{{replica=\"{replica}\"}} {n}");
            }
            out.push_str("# HELP atrium_gateway_breaker_open Whether a replica's circuit breaker is open (skipped after connect failures).\n# TYPE atrium_gateway_breaker_open gauge\n");
            for (replica, _, open) in &states {
                let _ = writeln!(
                    out,
                    "atrium_gateway_breaker_open{{replica=\"{replica}\"}} {}",
                    u8::from(*open)
                );
            }
            let _ = writeln!(out, "# HELP atrium_gateway_synced Whether the route table has its first snapshot.\n# TYPE atrium_gateway_synced gauge\natrium_gateway_synced {}", u8::from(r.synced()));
        }
        Response::new(200, "text/plain; version=0.0.4", out)
    }
}

/// Whether `presented` is the metrics token whose SHA-256 is `digest`
/// (compared in constant time).
pub fn token_matches(presented: Option<&str>, digest: &[u8; 32]) -> Result<(), Refusal> {
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let presented = presented.map(|t| sha2::Sha256::digest(t.as_bytes()));
    if presented.is_some_and(|d| bool::from(d.as_slice().ct_eq(digest))) {
        Ok(())
    } else {
        Err(Refusal::MetricsToken)
    }
}
