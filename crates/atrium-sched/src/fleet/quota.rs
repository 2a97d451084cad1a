//! Quotas (a guaranteed and a borrowable part) and weighted dominant-
//! resource fair share among tenants competing for the same pool.

use std::collections::BTreeMap;

use super::types::{Amount, Binding, Refusal, Request, TenantPolicy};
use super::Fleet;

impl Fleet {
    pub(super) fn check_quota(
        &self,
        tenant: &str,
        policy: &TenantPolicy,
        extra: Amount,
    ) -> Result<bool, Refusal> {
        let after = self.usage(tenant).plus(extra);
        let limit = policy.limit();
        if let Some(resource) = after.exceeds(&limit) {
            let (wanted, limit) = match resource {
                "gpu" => (after.gpu_milli, limit.gpu_milli),
                "cpu" => (after.cpu_milli, limit.cpu_milli),
                _ => (after.memory_mib, limit.memory_mib),
            };
            return Err(Refusal::OverQuota {
                resource,
                wanted,
                limit,
            });
        }
        Ok(after.exceeds(&policy.guaranteed).is_some())
    }

    /// A tenant's dominant share of the pool, divided by its weight.
    pub fn weighted_share(&self, tenant: &str) -> f64 {
        let u = self.usage(tenant);
        let share = |x: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                x as f64 / total as f64
            }
        };
        let dominant = share(u.cpu_milli, self.total.cpu_milli)
            .max(share(u.memory_mib, self.total.memory_mib))
            .max(share(u.gpu_milli, self.total.gpu_milli));
        dominant / f64::from(self.tenants.get(tenant).map_or(1, |p| p.weight.max(1)))
    }

    /// Places pending requests in weighted dominant-resource-fair order:
    /// higher priority first; among equals, the tenant with the smallest
    /// weighted dominant share goes next (ties by tenant name), each
    /// tenant's requests in the order given. Returns one result per
    /// request, in the order they were decided.
    pub fn place_fairly(&mut self, pending: &[Request]) -> Vec<(String, Result<Binding, Refusal>)> {
        let mut queues: BTreeMap<&str, std::collections::VecDeque<&Request>> = BTreeMap::new();
        for r in pending {
            queues.entry(r.tenant.as_str()).or_default().push_back(r);
        }
        let mut out = Vec::with_capacity(pending.len());
        loop {
            let heads = queues
                .iter()
                .filter_map(|(t, q)| q.front().map(|r| (*t, r.priority)));
            let Some(tenant) = self.fairest_next(heads) else {
                break;
            };
            let Some(r) = queues.get_mut(tenant).and_then(|q| q.pop_front()) else {
                break;
            };
            out.push((r.id.clone(), self.place(r)));
        }
        out
    }

    /// Which tenant's next request goes first, given each waiting
    /// tenant's next priority: the highest priority, then the smallest
    /// weighted dominant share, then the tenant's name.
    pub fn fairest_next<'a>(
        &self,
        heads: impl IntoIterator<Item = (&'a str, i32)>,
    ) -> Option<&'a str> {
        heads
            .into_iter()
            .min_by(|a, b| {
                b.1.cmp(&a.1)
                    .then(
                        self.weighted_share(a.0)
                            .total_cmp(&self.weighted_share(b.0)),
                    )
                    .then(a.0.cmp(b.0))
            })
            .map(|(tenant, _)| tenant)
    }
}
