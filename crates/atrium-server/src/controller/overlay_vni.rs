//! Tenants' overlay VNIs. A tenant gets one the first time a replica of
//! its is placed, recorded as an internal object (kind `tenant-overlay`,
//! named after the tenant, read by no API) and carried in each of its
//! placements, so its node's agent needs nothing else to join it.
//!
//! Two tenants sharing a VNI would share a network, so each new VNI is one
//! above the highest ever given and the write commits only if no record
//! holds it or names the tenant (checked after writers are serialised). A
//! VNI is never given again: a tenant deleted and made anew under its name
//! finds its record and keeps it, since no replica of the old one remains.

use std::collections::HashMap;

use atrium_core::overlay::MAX_VNI;
use atrium_store::{Object, Precondition, Selection, Store, TenantFilter, Write, WriteError};
use serde::{Deserialize, Serialize};

use crate::crud::new_id;

pub const KIND: &str = "tenant-overlay";
const ID_PREFIX: &str = "tov_";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    vni: u32,
}

/// The VNIs given so far, read at the start of a pass.
pub struct Vnis {
    by_tenant: HashMap<String, u32>,
    highest: u32,
}

impl Vnis {
    pub async fn read(store: &Store) -> Result<Vnis, atrium_store::StoreError> {
        let records = store.list_all(KIND, &TenantFilter::All).await?;
        let by_tenant: HashMap<String, u32> = records
            .iter()
            .filter_map(|o| Some((o.name.clone(), record_of(o)?.vni)))
            .collect();
        let highest = by_tenant.values().copied().max().unwrap_or(0);
        Ok(Vnis { by_tenant, highest })
    }

    /// `tenant`'s VNI, given now if it has none; `None` when the write did
    /// not commit (another writer, or the space is spent): its placement
    /// waits for the next pass.
    pub async fn of(&mut self, store: &Store, tenant: &str) -> Option<u32> {
        if let Some(vni) = self.by_tenant.get(tenant) {
            return Some(*vni);
        }
        let vni = self.highest.checked_add(1).filter(|v| *v <= MAX_VNI)?;
        let body = serde_json::to_value(Record { vni }).ok()?;
        let w = Write::Create {
            kind: KIND.into(),
            id: new_id(ID_PREFIX),
            tenant: None,
            name: tenant.to_string(),
            body,
        };
        let audit = atrium_store::AuditContext::system("placement-controller", "overlay.vni");
        match store.write(w, Some(unique(tenant, vni)), audit).await {
            Ok(_) => {
                self.highest = vni;
                self.by_tenant.insert(tenant.to_string(), vni);
                Some(vni)
            }
            Err(WriteError::Store(e)) => {
                tracing::warn!(error = %e, tenant, "overlay VNI not recorded; next pass retries");
                None
            }
            Err(WriteError::Rejected(why)) => {
                tracing::warn!(%why, tenant, "overlay VNI not recorded; next pass retries");
                None
            }
        }
    }
}

fn record_of(object: &Object) -> Option<Record> {
    serde_json::from_value(object.body.clone()).ok()
}

/// Commits only if no record names `tenant` or holds `vni`.
fn unique(tenant: &str, vni: u32) -> Precondition<String> {
    let tenant = tenant.to_string();
    Precondition {
        reads: vec![Selection {
            kind: KIND.into(),
            tenant: TenantFilter::All,
            name: None,
        }],
        counts: Vec::new(),
        check: Box::new(move |read: &[Vec<Object>], _: &[u64]| {
            for o in read.iter().flatten() {
                if o.name == tenant {
                    return Err(format!("tenant {tenant:?} has a VNI already"));
                }
                if record_of(o).is_some_and(|r| r.vni == vni) {
                    return Err(format!("VNI {vni} is {:?}'s", o.name));
                }
            }
            Ok(())
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn each_tenant_gets_its_own_vni_once_and_keeps_it() {
        use atrium_store::testing::{fresh_database_url, TestBackend};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&fresh_database_url(TestBackend::Sqlite, dir.path()).await)
            .await
            .unwrap();
        let mut vnis = Vnis::read(&store).await.unwrap();
        let acme = vnis.of(&store, "acme").await.unwrap();
        let globex = vnis.of(&store, "globex").await.unwrap();
        assert_ne!(acme, globex);
        assert_eq!(vnis.of(&store, "acme").await, Some(acme));

        // A second controller that read before these writes (a leader
        // change mid-pass) cannot give a taken VNI or a second one.
        let mut stale = Vnis {
            by_tenant: HashMap::new(),
            highest: 0,
        };
        assert_eq!(stale.of(&store, "acme").await, None);
        assert_eq!(stale.of(&store, "initech").await, None, "VNI 1 is acme's");

        // Read again, the records hold.
        let mut again = Vnis::read(&store).await.unwrap();
        assert_eq!(again.of(&store, "globex").await, Some(globex));
        let initech = again.of(&store, "initech").await.unwrap();
        assert!(initech > acme.max(globex));
    }
}
