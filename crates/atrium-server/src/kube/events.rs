//! Events the controllers emit (`atrium_kube::events`) — a pod's, a
//! deployment's scaling of its replica sets — recorded in the
//! involved object's namespace as the controllers' writes, one per object
//! and reason with its count raised on a repeat; each pass deletes the
//! events that last happened more than an hour ago.

use atrium_kube::events::{again, name_of, object, Event, TTL_SECONDS};
use atrium_kube::find;
use atrium_store::StoreError;
use serde_json::Value;

use super::controlled;
use super::objects::{find as find_object, now_unix, timestamp, Scope};
use crate::AppState;

/// Records `events` about `involved`, an object of `kind`
/// (`api_version`).
pub(super) async fn record(
    state: &AppState,
    scope: &Scope,
    involved: &Value,
    (kind, api_version): (&str, &str),
    events: &[Event],
) {
    let Some(events_t) = find("", "v1", "events") else {
        return;
    };
    let ns = involved["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    let now = timestamp();
    for e in events {
        let key = format!("{ns}/{}", name_of(involved, e.reason));
        match find_object(state, scope, events_t, &key).await {
            Ok(Some(existing)) => {
                let repeated = again(&existing.body, &e.message, &now);
                controlled::replace(state, events_t, &existing, repeated).await;
            }
            Ok(None) => {
                let made = object(involved, kind, api_version, e, &now);
                if let Err(err) = controlled::create(state, scope, events_t, ns, made).await {
                    tracing::debug!(reason = e.reason, error = %err, "event not recorded");
                }
            }
            Err(err) => tracing::debug!(error = %err, "event not recorded"),
        }
    }
}

/// Deletes the cluster's events that last happened over an hour ago.
pub(super) async fn sweep(state: &AppState, scope: &Scope) -> Result<(), StoreError> {
    let Some(events_t) = find("", "v1", "events") else {
        return Ok(());
    };
    let now = now_unix();
    let last = |e: &Value| {
        let at = e["lastTimestamp"]
            .as_str()
            .or(e["metadata"]["creationTimestamp"].as_str())?;
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp())
    };
    for e in state
        .store
        .list_all(&scope.kind(events_t), &scope.filter())
        .await?
    {
        if last(&e.body).is_some_and(|t| now.saturating_sub(t) > TTL_SECONDS) {
            controlled::delete(state, events_t, &e).await;
        }
    }
    Ok(())
}
