//! The autoscaler: takes in the gateways' load reports (`POST /v1/load`)
//! and, every second — or at once when a gateway holds a request for want
//! of a replica — decides each deployment's replica count with
//! `atrium_core::autoscale` and writes it to the deployment's
//! `status.desired_replicas`, which the placement controller then brings
//! the placements to.
//!
//! Reports are kept in the database (`Store::put_load`, one row per
//! gateway, outside the change log), since a gateway may report to any
//! server and the autoscaler runs on the one that leads (`leader`). They
//! describe the last few seconds and are sent again every second; a
//! gateway that stops reporting counts as no load after `FRESH_FOR`. The
//! decision itself is stored, so a restarted or new leader resumes at the
//! same scale (and waits a whole delay before scaling down from it).

use std::collections::HashMap;
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

/// What wakes the autoscaler early: a report on this server that holds
/// requests (a deployment at zero should not wait for the next tick to
/// start a replica). Reports to other servers are seen at the next tick.
#[derive(Default)]
pub struct LoadBoard {
    wake: Notify,
}

/// Checks `report` and sums it per deployment: the gateway, its load, and
/// whether it holds requests.
fn check(report: LoadReport) -> Result<(String, Seen, bool), String> {
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
        let k: &mut Observation = seen.entry(d.deployment).or_default();
        k.in_flight += d.in_flight;
        k.requests = k.requests.saturating_add(d.requests);
        k.waiting = k.waiting.saturating_add(d.waiting);
    }
    Ok((report.gateway, seen, waiting))
}

/// Each deployment's load over the fresh reports of every gateway, summed.
async fn observations(store: &Store) -> Result<Seen, atrium_store::StoreError> {
    let mut sum = Seen::new();
    for (gateway, body) in store.fresh_loads(fresh_ms()).await? {
        let Ok(kept) = serde_json::from_str::<Seen>(&body) else {
            tracing::warn!(%gateway, "skipping an unreadable load report");
            continue;
        };
        for (id, k) in kept {
            let s = sum.entry(id).or_default();
            s.in_flight += k.in_flight;
            s.requests = s.requests.saturating_add(k.requests);
            s.waiting = s.waiting.saturating_add(k.waiting);
        }
    }
    Ok(sum)
}

fn fresh_ms() -> i64 {
    i64::try_from(FRESH_FOR.as_millis()).unwrap_or(i64::MAX)
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
    let (gateway, seen, waiting) = check(report).map_err(ApiError::MalformedJson)?;
    let body = serde_json::to_string(&seen).map_err(|e| ApiError::Internal(e.to_string()))?;
    let kept = state
        .store
        .put_load(&gateway, &body, fresh_ms(), MAX_GATEWAYS)
        .await?;
    if !kept {
        return Err(ApiError::MalformedJson(format!(
            "{MAX_GATEWAYS} gateways already report load; gateway {gateway:?} is one too many"
        )));
    }
    if waiting {
        state.load.wake.notify_one();
    }
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
        let again = match pass(&store, &mut recommenders, started, now).await {
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
    recommenders: &mut HashMap<String, Recommender>,
    started: Instant,
    now: Instant,
) -> Result<bool, atrium_store::StoreError> {
    let seen = observations(store).await?;
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
        let audit = AuditContext::system(
            "autoscaler",
            format!("deployment.scale:{current}->{desired}"),
        );
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

    async fn put(store: &Store, r: LoadReport) -> bool {
        let (gateway, seen, _) = check(r).unwrap();
        let body = serde_json::to_string(&seen).unwrap();
        store
            .put_load(&gateway, &body, fresh_ms(), MAX_GATEWAYS)
            .await
            .unwrap()
    }

    async fn store() -> (Store, tempfile::TempDir) {
        use atrium_store::testing::{fresh_database_url, TestBackend};
        let dir = tempfile::tempdir().unwrap();
        let url = fresh_database_url(TestBackend::Sqlite, dir.path()).await;
        (Store::open(&url).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn gateways_add_up_and_a_silent_one_stops_counting() {
        let (store, _dir) = store().await;
        put(&store, report("g1", "dep_a", 2.5, 0)).await;
        put(&store, report("g2", "dep_a", 1.0, 1)).await;
        // A gateway's newer report replaces its older one.
        put(&store, report("g2", "dep_a", 3.0, 0)).await;
        let seen = observations(&store).await.unwrap();
        assert_eq!(seen["dep_a"].in_flight, 5.5);
        assert_eq!(seen["dep_a"].requests, 2);
        assert_eq!(seen["dep_a"].waiting, 0);
        tokio::time::sleep(FRESH_FOR + Duration::from_millis(50)).await;
        put(&store, report("g1", "dep_a", 1.0, 0)).await;
        assert_eq!(observations(&store).await.unwrap()["dep_a"].in_flight, 1.0);
    }

    #[test]
    fn nonsense_reports_are_refused() {
        for bad in [
            report("g1", "dep_a", f64::NAN, 0),
            report("g1", "dep_a", -1.0, 0),
            report("g1", "dep_a", f64::INFINITY, 0),
            report("", "dep_a", 1.0, 0),
            report("g1", &"x".repeat(MAX_ID_LEN + 1), 1.0, 0),
        ] {
            assert!(check(bad).is_err());
        }
        let (_, seen, waiting) = check(report("g1", "dep_a", 1.0, 2)).unwrap();
        assert!(waiting && seen["dep_a"].waiting == 2);
    }

    #[tokio::test]
    async fn invented_gateway_names_cannot_grow_the_reports_past_their_bound() {
        let (store, _dir) = store().await;
        let body = serde_json::to_string(&Seen::new()).unwrap();
        let (minute, most) = (60_000, 8);
        for i in 0..most {
            assert!(store
                .put_load(&format!("g{i}"), &body, minute, most)
                .await
                .unwrap());
        }
        assert!(!store
            .put_load("one-more", &body, minute, most)
            .await
            .unwrap());
        // A known gateway still reports, and stale names make room.
        assert!(store.put_load("g0", &body, minute, most).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(store.put_load("one-more", &body, 10, most).await.unwrap());
        assert_eq!(
            store.fresh_loads(minute).await.unwrap().len(),
            1,
            "the stale ones are gone"
        );
    }
}
