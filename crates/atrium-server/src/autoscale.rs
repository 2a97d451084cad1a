//! The autoscaler: takes in the gateways' load reports (`POST /v1/load`)
//! and, every second — or at once when a gateway holds a request for want
//! of a replica — decides each deployment's replica count with
//! `atrium_core::autoscale` and writes it to the deployment's
//! `status.desired_replicas`, which the placement controller then brings
//! the placements to.
//!
//! Reports live in memory only: they describe the last few seconds and are
//! sent again every second. A gateway that stops reporting counts as no
//! load after `FRESH_FOR`. The decision itself is stored, so a restarted
//! server resumes at the same scale (and waits a whole delay before
//! scaling down from it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use atrium_api::{LoadReport, Resource as _};
use atrium_core::autoscale::{Observation, Recommender};
use atrium_core::deployment::EngineKind;
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_store::{AuditContext, Store, TenantFilter, Write, WriteError};
use axum::extract::State;
use axum::{Extension, Json};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::kinds::Deployment;
use crate::{stored, AppState};

/// How long a gateway's report counts.
const FRESH_FOR: Duration = Duration::from_secs(3);
/// How often the autoscaler decides when nothing wakes it sooner.
const EVERY: Duration = Duration::from_secs(1);
/// Most deployments one report may name, and the longest id in it.
const MAX_REPORTED: usize = 100_000;
const MAX_ID_LEN: usize = 128;
/// Most gateways reporting within `FRESH_FOR`: a gateway names itself, so
/// one stolen gateway credential inventing names must not grow the board
/// without bound.
const MAX_GATEWAYS: usize = 4096;

/// Load per deployment id.
type Seen = HashMap<String, Observation>;

/// The latest report of each gateway, and when it came.
#[derive(Default)]
pub struct LoadBoard {
    reports: Mutex<HashMap<String, (Instant, Seen)>>,
    /// Rung by a report that holds requests: a deployment at zero should
    /// not wait for the next tick to start a replica.
    wake: Notify,
}

impl LoadBoard {
    /// Takes in `report`, or says what is wrong with it.
    pub fn report(&self, report: LoadReport, now: Instant) -> Result<(), String> {
        if report.gateway.is_empty() || report.gateway.len() > MAX_ID_LEN {
            return Err(format!("gateway: 1 to {MAX_ID_LEN} characters"));
        }
        if report.deployments.len() > MAX_REPORTED {
            return Err(format!("deployments: at most {MAX_REPORTED}"));
        }
        let mut seen = Seen::with_capacity(report.deployments.len());
        let mut waiting = false;
        for (i, d) in report.deployments.into_iter().enumerate() {
            if d.deployment.len() > MAX_ID_LEN {
                return Err(format!("deployments[{i}].deployment: too long"));
            }
            if !(d.in_flight.is_finite() && d.in_flight >= 0.0) {
                return Err(format!(
                    "deployments[{i}].in_flight: a finite number, at least 0"
                ));
            }
            waiting |= d.waiting > 0;
            let o: &mut Observation = seen.entry(d.deployment).or_default();
            o.in_flight += d.in_flight;
            o.requests = o.requests.saturating_add(d.requests);
            o.waiting = o.waiting.saturating_add(d.waiting);
        }
        let mut reports = self
            .reports
            .lock()
            .map_err(|_| "the load board is unavailable".to_string())?;
        if !reports.contains_key(&report.gateway) && reports.len() >= MAX_GATEWAYS {
            reports.retain(|_, (at, _)| now.saturating_duration_since(*at) < FRESH_FOR);
            if reports.len() >= MAX_GATEWAYS {
                return Err(format!(
                    "{MAX_GATEWAYS} gateways already report load; gateway {:?} is one too many",
                    report.gateway
                ));
            }
        }
        reports.insert(report.gateway, (now, seen));
        drop(reports);
        if waiting {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Each deployment's load over the fresh reports, summed over gateways;
    /// stale reports are dropped.
    fn observations(&self, now: Instant) -> Seen {
        let mut sum = Seen::new();
        let Ok(mut reports) = self.reports.lock() else {
            return sum;
        };
        reports.retain(|_, (at, _)| now.saturating_duration_since(*at) < FRESH_FOR);
        for (_, seen) in reports.values() {
            for (id, o) in seen {
                let s = sum.entry(id.clone()).or_default();
                s.in_flight += o.in_flight;
                s.requests = s.requests.saturating_add(o.requests);
                s.waiting = s.waiting.saturating_add(o.waiting);
            }
        }
        sum
    }
}

/// `POST /v1/load`: a gateway's load report; answers how many
/// deployments it named.
pub async fn report_load(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(report): JsonBody<LoadReport>,
) -> Result<Json<Value>, ApiError> {
    if !matches!(caller.role, Role::ProviderAdmin | Role::Gateway) {
        return Err(ApiError::Forbidden(format!(
            "only gateways (and the provider) report load; role {} may not",
            caller.role.as_str()
        )));
    }
    if let Some(site) = caller.gateway_site() {
        if report.site != site {
            return Err(ApiError::Forbidden(format!(
                "a gateway of site {site:?} reports as its own site, not {:?}",
                report.site
            )));
        }
    }
    let named = report.deployments.len();
    state
        .load
        .report(report, Instant::now())
        .map_err(ApiError::MalformedJson)?;
    Ok(Json(json!({ "deployments": named })))
}

/// Decides scales until `stop` turns true.
pub async fn run(
    store: Store,
    board: std::sync::Arc<LoadBoard>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut recommenders: HashMap<String, Recommender> = HashMap::new();
    loop {
        let now = Instant::now();
        let again = match pass(&store, &board, &mut recommenders, started, now).await {
            Ok(true) => EVERY,
            // A write lost to a concurrent one: decide again soon.
            Ok(false) => Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, "autoscaler pass failed; retrying");
                EVERY
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(again) => {}
            _ = board.wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// One decision for every deployment; `Ok(false)` when a write was lost.
async fn pass(
    store: &Store,
    board: &LoadBoard,
    recommenders: &mut HashMap<String, Recommender>,
    started: Instant,
    now: Instant,
) -> Result<bool, atrium_store::StoreError> {
    let seen = board.observations(now);
    let raw = store.list_all(Deployment::KIND, &TenantFilter::All).await?;
    let at = now.duration_since(started).as_secs_f64();
    let mut all_written = true;
    let mut live = Vec::with_capacity(raw.len());
    for object in &raw {
        let Some(d) = stored::typed::<Deployment>(object) else {
            continue;
        };
        if d.spec.engine == EngineKind::External {
            continue;
        }
        live.push(d.id.clone());
        let replicas = &d.spec.replicas;
        let stored_scale = d.status.as_ref().and_then(|s| s.desired_replicas);
        let current = stored_scale.unwrap_or_else(|| replicas.initial());
        let desired = recommenders
            .entry(d.id.clone())
            .or_insert_with(|| Recommender::new(at))
            .desired(
                at,
                seen.get(&d.id).copied().unwrap_or_default(),
                replicas,
                current,
            );
        if stored_scale == Some(desired) || (stored_scale.is_none() && desired == current) {
            continue;
        }
        tracing::info!(deployment = %d.id, from = current, to = desired, "autoscaler: scaling");
        let mut status = d.status.clone().unwrap_or_else(|| {
            Status::new(
                LifecycleState::Provisioning,
                "scaling to its first replicas",
            )
        });
        status.desired_replicas = Some(desired);
        let Ok(body) = stored::with_status::<Deployment>(&object.body, &status) else {
            continue;
        };
        let write = Write::Update {
            kind: Deployment::KIND.into(),
            id: d.id.clone(),
            body,
            if_revision: Some(d.revision),
        };
        let audit = AuditContext {
            actor: "autoscaler".into(),
            role: "system".into(),
            action: format!("deployment.scale:{current}->{desired}"),
            request_id: String::new(),
        };
        match store.write::<()>(write, None, audit).await {
            Ok(_) => {}
            Err(WriteError::Store(e)) => {
                tracing::debug!(error = %e, "autoscaler write lost; deciding again");
                all_written = false;
            }
            Err(WriteError::Rejected(())) => all_written = false,
        }
    }
    recommenders.retain(|id, _| live.contains(id));
    Ok(all_written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_api::DeploymentLoad;

    fn report(gateway: &str, deployment: &str, in_flight: f64, waiting: u64) -> LoadReport {
        LoadReport {
            gateway: gateway.into(),
            site: "s".into(),
            deployments: vec![DeploymentLoad {
                deployment: deployment.into(),
                in_flight,
                requests: 1,
                waiting,
            }],
        }
    }

    #[test]
    fn gateways_add_up_and_a_silent_one_stops_counting() {
        let board = LoadBoard::default();
        let t0 = Instant::now();
        board.report(report("g1", "dep_a", 2.5, 0), t0).unwrap();
        board.report(report("g2", "dep_a", 1.0, 1), t0).unwrap();
        // A gateway's newer report replaces its older one.
        board.report(report("g2", "dep_a", 3.0, 0), t0).unwrap();
        let seen = board.observations(t0);
        assert_eq!(seen["dep_a"].in_flight, 5.5);
        assert_eq!(seen["dep_a"].requests, 2);
        assert_eq!(seen["dep_a"].waiting, 0);
        let later = t0 + FRESH_FOR + Duration::from_millis(1);
        board.report(report("g1", "dep_a", 1.0, 0), later).unwrap();
        assert_eq!(board.observations(later)["dep_a"].in_flight, 1.0);
    }

    #[test]
    fn nonsense_reports_are_refused_and_change_nothing() {
        let board = LoadBoard::default();
        let t0 = Instant::now();
        board.report(report("g1", "dep_a", 1.0, 0), t0).unwrap();
        for bad in [
            report("g1", "dep_a", f64::NAN, 0),
            report("g1", "dep_a", -1.0, 0),
            report("g1", "dep_a", f64::INFINITY, 0),
            report("", "dep_a", 1.0, 0),
            report("g1", &"x".repeat(MAX_ID_LEN + 1), 1.0, 0),
        ] {
            assert!(board.report(bad, t0).is_err());
        }
        assert_eq!(board.observations(t0)["dep_a"].in_flight, 1.0);
    }

    #[test]
    fn invented_gateway_names_cannot_grow_the_board_past_its_bound() {
        let board = LoadBoard::default();
        let t0 = Instant::now();
        for i in 0..MAX_GATEWAYS {
            board
                .report(report(&format!("g{i}"), "dep_a", 0.0, 0), t0)
                .unwrap();
        }
        assert!(board
            .report(report("one-more", "dep_a", 1.0, 0), t0)
            .is_err());
        // A known gateway still reports, and stale names make room.
        board.report(report("g0", "dep_a", 1.0, 0), t0).unwrap();
        let later = t0 + FRESH_FOR;
        board
            .report(report("one-more", "dep_a", 1.0, 0), later)
            .unwrap();
        assert_eq!(board.observations(later)["dep_a"].in_flight, 1.0);
    }
}
