//! The watch streams that keep the route table current.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use atrium_api::{Deployment, Key, Object, Placement, Site, Tenant};
use atrium_client::{Api, ControlPlane, Update};

use super::Routes;

/// Follows keys, deployments, tenants (their limits and residency),
/// sites (their jurisdictions) and placements. Key digests are not part of
/// the public key view, so they come from `/v1/keys/digests`, re-read on
/// every key change (a small, provider-only document).
pub fn follow(cp: ControlPlane, routes: Arc<RwLock<Routes>>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    {
        let (cp, routes) = (cp.clone(), routes.clone());
        tasks.push(tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Update<Object<Key>>>();
            let feed = Api::<Key>::all(&cp);
            let follow = feed.follow(move |u| {
                let _ = tx.send(u);
            });
            let apply = async move {
                while let Some(update) = rx.recv().await {
                    // A new key's digest must be known before its create event
                    // is applied, or the key would be refused for a moment.
                    let digests = loop {
                        match cp.request::<(), HashMap<String, String>>(reqwest::Method::GET, "/v1/keys/digests", None).await {
                            Ok(digests) => break digests,
                            Err(e) => {
                                tracing::debug!(error = %e, "gateway: cannot read key digests; retrying");
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            }
                        }
                    };
                    if let Ok(mut r) = routes.write() {
                        r.apply_key(update, &digests);
                        // Digests of keys changed by other events are refreshed too.
                        for (id, k) in r.keys.iter_mut() {
                            if let Some(d) = digests.get(id) {
                                k.digest = d.clone();
                            }
                        }
                    }
                }
            };
            // Both run in this task, so aborting the gateway ends both.
            tokio::join!(follow, apply);
        }));
    }
    tasks.push(applying::<Deployment>(
        &cp,
        &routes,
        Routes::apply_deployment,
    ));
    tasks.push(applying::<Tenant>(&cp, &routes, Routes::apply_tenant));
    tasks.push(applying::<Site>(&cp, &routes, Routes::apply_site));
    tasks.push(applying::<Placement>(&cp, &routes, Routes::apply_replica));
    tasks
}

/// Follows kind `K`, applying each change to the table with `apply`.
fn applying<K: atrium_api::Resource>(
    cp: &ControlPlane,
    routes: &Arc<RwLock<Routes>>,
    apply: fn(&mut Routes, Update<Object<K>>),
) -> tokio::task::JoinHandle<()> {
    let (cp, routes) = (cp.clone(), routes.clone());
    tokio::spawn(async move {
        Api::<K>::all(&cp)
            .follow(move |u| {
                if let Ok(mut r) = routes.write() {
                    apply(&mut r, u);
                }
            })
            .await
    })
}
