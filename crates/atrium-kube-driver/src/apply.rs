//! The executor: makes the cluster hold what `plan` says, through the
//! Kubernetes API with kube-rs — server-side apply under the field
//! manager `atrium` (forced: the driver owns these fields), deletes of
//! pods no placement wants, and a watch of the driver's own pods.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, Client, ResourceExt};

use crate::plan::{self, Assigned, Images, Unrunnable};

/// One pass's outcome: what each placement's pod says, or why it has
/// none.
pub type Observed = BTreeMap<String, Result<Pod, Unrunnable>>;

/// The driver's handle on one cluster, for one Atrium node.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    node: String,
    images: Images,
}

/// Applies `object` server-side. A refusal of it by the API server (4xx:
/// invalid, forbidden by an admission or a quota) comes back as the
/// reason its placement cannot run, so one tenant's unacceptable pod
/// cannot stop the pass for every other tenant's; any other error (the
/// cluster unreachable) fails the pass, to be retried.
async fn apply<K>(api: Api<K>, object: &K) -> Result<Result<K, Unrunnable>, kube::Error>
where
    K: kube::Resource + Clone + std::fmt::Debug,
    K: k8s_openapi::serde::Serialize + k8s_openapi::serde::de::DeserializeOwned,
{
    let params = PatchParams::apply(plan::FIELD_MANAGER).force();
    match api
        .patch(&object.name_any(), &params, &Patch::Apply(object))
        .await
    {
        Ok(applied) => Ok(Ok(applied)),
        Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => Ok(Err(Unrunnable(format!(
            "the cluster refused it ({}): {}",
            s.code, s.message
        )))),
        Err(e) => Err(e),
    }
}

impl Cluster {
    pub fn new(client: Client, node: &str, images: Images) -> Cluster {
        Cluster {
            client,
            node: node.to_string(),
            images,
        }
    }

    /// The driver's pods, by placement id (from their annotation).
    pub async fn pods(&self) -> Result<BTreeMap<String, Pod>, kube::Error> {
        let list = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default().labels(&plan::selector(&self.node)))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|p| {
                let id = p.annotations().get(plan::PLACEMENT)?.clone();
                Some((id, p))
            })
            .collect())
    }

    /// Makes the cluster hold `assigned`: each tenant's namespace, policy
    /// and quota, each placement's pod; removes the driver's pods that no
    /// placement wants. Returns each placement's pod as the API answered
    /// the apply, or why it cannot run.
    pub async fn reconcile(&self, assigned: &[Assigned]) -> Result<Observed, kube::Error> {
        let mut by_tenant: BTreeMap<&str, Vec<&Assigned>> = BTreeMap::new();
        let mut observed = Observed::new();
        for a in assigned {
            by_tenant.entry(a.tenant.as_str()).or_default().push(a);
        }
        for (tenant, replicas) in &by_tenant {
            if let Err(e) = self.tenant(tenant, replicas).await? {
                for a in replicas {
                    observed.insert(a.id.clone(), Err(e.clone()));
                }
                continue;
            }
            for a in replicas {
                let pod = match plan::pod(&self.node, &self.images, a) {
                    Ok(p) => p,
                    Err(e) => {
                        observed.insert(a.id.clone(), Err(e));
                        continue;
                    }
                };
                let ns = pod.namespace().unwrap_or_default();
                let applied = apply(Api::namespaced(self.client.clone(), &ns), &pod).await?;
                observed.insert(a.id.clone(), applied);
            }
        }
        let wanted: BTreeSet<&str> = assigned.iter().map(|a| a.id.as_str()).collect();
        for (id, pod) in self.pods().await? {
            if !wanted.contains(id.as_str()) {
                let ns = pod.namespace().unwrap_or_default();
                Api::<Pod>::namespaced(self.client.clone(), &ns)
                    .delete(&pod.name_any(), &DeleteParams::default())
                    .await?;
            }
        }
        Ok(observed)
    }

    /// A tenant's namespace, network policy and quota.
    async fn tenant(
        &self,
        tenant: &str,
        replicas: &[&Assigned],
    ) -> Result<Result<(), Unrunnable>, kube::Error> {
        let planned = (|| {
            let specs: Vec<_> = replicas.iter().map(|a| &a.spec).collect();
            Ok::<_, Unrunnable>((
                plan::namespace(&self.node, tenant)?,
                plan::network_policy(&self.node, tenant)?,
                plan::resource_quota(&self.node, tenant, &specs)?,
            ))
        })();
        let (namespace, policy, quota) = match planned {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let ns = namespace.name_any();
        let c = &self.client;
        // No pod of the tenant's runs without its policy and quota: the
        // first refusal is every one of its placements' reason.
        if let Err(e) = apply(Api::<Namespace>::all(c.clone()), &namespace).await? {
            return Ok(Err(e));
        }
        if let Err(e) = apply(Api::namespaced(c.clone(), &ns), &policy).await? {
            return Ok(Err(e));
        }
        Ok(apply(Api::namespaced(c.clone(), &ns), &quota)
            .await?
            .map(|_| ()))
    }

    /// Calls `changed` with each of the driver's pods as it changes, until
    /// the watch ends (the API server closes watches after a while; the
    /// caller watches again, from "0": every pod, then their changes).
    pub async fn watch(
        &self,
        resource_version: &str,
        mut changed: impl FnMut(Pod),
    ) -> Result<(), kube::Error> {
        let params = WatchParams::default()
            .labels(&plan::selector(&self.node))
            .timeout(290);
        let mut events = Api::<Pod>::all(self.client.clone())
            .watch(&params, resource_version)
            .await?
            .boxed();
        while let Some(event) = events.try_next().await? {
            match event {
                WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p) => {
                    changed(p)
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => return Err(kube::Error::Api(e)),
            }
        }
        Ok(())
    }
}
