//! Gateway records of gateways gone for good: a gateway rewrites its
//! record at least once a minute, so one silent for `STALE` is not coming
//! back under that name (a restarted one writes it again at once). Its
//! record is removed so other sites stop probing it and `atrium site
//! topology` stops listing it. Run by the leader's controllers.

use std::time::Duration;

use atrium_api::{Gateway, Resource};
use atrium_store::{AuditContext, Store, StoreError, TenantFilter, Write};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::stored;

/// Silent this long, a gateway is gone.
const STALE: Duration = Duration::from_secs(15 * 60);
const EVERY: Duration = Duration::from_secs(60);

/// Removes the records last written before `now - STALE`; how many went.
/// A record with no time it was written (made by hand) is left alone.
pub async fn sweep(store: &Store, now: OffsetDateTime) -> Result<usize, StoreError> {
    let mut removed = 0;
    for record in store.list_all(Gateway::KIND, &TenantFilter::All).await? {
        let Ok(spec) = stored::spec::<Gateway>(&record) else {
            continue;
        };
        let Ok(at) = OffsetDateTime::parse(&spec.reported_at, &Rfc3339) else {
            continue;
        };
        if now - at < STALE {
            continue;
        }
        let write = Write::Delete {
            kind: Gateway::KIND.into(),
            id: record.id.clone(),
        };
        let audit = AuditContext::system("gateway-records", "gateway.delete");
        match store.write::<()>(write, None, audit).await {
            Ok(_) => removed += 1,
            Err(e) => tracing::warn!(gateway = %record.name, error = %e, "gateway record kept"),
        }
    }
    Ok(removed)
}

/// Sweeps every `EVERY` until `stop`.
pub async fn run(store: Store, mut stop: watch::Receiver<bool>) {
    loop {
        match sweep(&store, OffsetDateTime::now_utc()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                gateways = n,
                "records of gateways silent for 15 minutes removed"
            ),
            Err(e) => tracing::warn!(error = %e, "gateway records: sweep failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn only_records_silent_past_the_limit_go() {
        use atrium_store::testing::{fresh_database_url, TestBackend};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&fresh_database_url(TestBackend::Sqlite, dir.path()).await)
            .await
            .unwrap();
        let now = OffsetDateTime::now_utc();
        let at = |ago: Duration| (now - ago).format(&Rfc3339).unwrap();
        for (id, reported_at) in [
            ("gtw_gone", at(STALE + Duration::from_secs(1))),
            ("gtw_quiet", at(STALE - Duration::from_secs(60))),
            ("gtw_manual", String::new()),
        ] {
            let body = json!({"spec": {"site": "eu", "peer_address": "10.0.0.2:8443",
                "reported_at": reported_at}});
            let w = Write::Create {
                kind: Gateway::KIND.into(),
                id: id.into(),
                tenant: None,
                name: id.trim_start_matches("gtw_").into(),
                body,
            };
            let audit = AuditContext::system("test", "gateway.create");
            store.write::<()>(w, None, audit).await.unwrap();
        }
        assert_eq!(sweep(&store, now).await.unwrap(), 1);
        assert!(store
            .get(Gateway::KIND, "gtw_gone")
            .await
            .unwrap()
            .is_none());
        for kept in ["gtw_quiet", "gtw_manual"] {
            assert!(
                store.get(Gateway::KIND, kept).await.unwrap().is_some(),
                "{kept}"
            );
        }
        assert_eq!(sweep(&store, now).await.unwrap(), 0);
    }
}
