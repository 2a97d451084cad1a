//! Preemption: placing a request by evicting the fewest, lowest-priority,
//! borrowed units first, and never a higher priority.

use std::collections::BTreeMap;

use super::fit::{on_its_nodes, static_allows, Choice};
use super::types::{Binding, Refusal, Request, TenantPolicy};
use super::Fleet;

impl Fleet {
    /// Places a request, evicting others if that is the only way: on the
    /// node where the fewest must go, taking borrowed units first, then the
    /// lowest priorities. Only units of lower priority may be evicted, or
    /// of equal priority that are borrowed by another tenant while the
    /// requester stays within its guarantee. Returns the binding and the
    /// evicted bindings (already released).
    pub fn place_preempting(&mut self, r: &Request) -> Result<(Binding, Vec<Binding>), Refusal> {
        let refusal = match self.place(r) {
            Ok(b) => return Ok((b, Vec::new())),
            Err(e @ Refusal::NoNode(_)) => e,
            Err(e) => return Err(e),
        };
        let (t, policy) = (
            self.tenant_index.get(&r.tenant).copied().unwrap_or(0),
            self.tenants
                .get(&r.tenant)
                .cloned()
                .ok_or_else(|| Refusal::UnknownTenant(r.tenant.clone()))?,
        );
        let within_guarantee = self
            .usage(&r.tenant)
            .plus(r.amount())
            .exceeds(&policy.guaranteed)
            .is_none();
        let evictable = |b: &Binding| {
            b.priority < r.priority
                || (b.priority == r.priority
                    && b.borrowed
                    && b.tenant != r.tenant
                    && within_guarantee)
        };
        let mut by_node: BTreeMap<usize, Vec<&Binding>> = BTreeMap::new();
        for b in self.bindings.values().filter(|b| evictable(b)) {
            by_node.entry(b.node_index).or_default().push(b);
        }
        // Per node: evict in preference order (borrowed first, lowest
        // priority, newest) and, separately, largest first, until it fits;
        // then keep back every victim that turns out unnecessary. The
        // node needing the fewest evictions wins; then fewer unborrowed,
        // then lower priorities.
        type Key = (usize, usize, i32, usize);
        let mut best: Option<(Key, Vec<String>, Choice)> = None;
        for (node, victims) in by_node {
            let mut preferred = victims.clone();
            preferred.sort_by(|a, b| {
                b.borrowed
                    .cmp(&a.borrowed)
                    .then(a.priority.cmp(&b.priority))
                    .then(b.request.cmp(&a.request))
            });
            let mut largest = preferred.clone();
            largest.sort_by(|a, b| {
                b.amount
                    .gpu_milli
                    .cmp(&a.amount.gpu_milli)
                    .then(b.amount.cpu_milli.cmp(&a.amount.cpu_milli))
            });
            for order in [preferred, largest] {
                let Some(prefix) = (1..=order.len()).find(|k| {
                    self.fits_without(node, &order[..*k], r, t, &policy)
                        .is_some()
                }) else {
                    continue;
                };
                let mut chosen: Vec<&Binding> = order[..prefix].to_vec();
                // Least preferred victims are the first to be kept back.
                for k in (0..chosen.len()).rev() {
                    let mut fewer = chosen.clone();
                    fewer.remove(k);
                    if self.fits_without(node, &fewer, r, t, &policy).is_some() {
                        chosen = fewer;
                    }
                }
                let Some(choice) = self.fits_without(node, &chosen, r, t, &policy) else {
                    continue;
                };
                let unborrowed = chosen.iter().filter(|b| !b.borrowed).count();
                let top = chosen.iter().map(|b| b.priority).max().unwrap_or(i32::MIN);
                let key = (chosen.len(), unborrowed, top, node);
                if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                    best = Some((
                        key,
                        chosen.iter().map(|b| b.request.clone()).collect(),
                        choice,
                    ));
                }
            }
        }
        let Some((_, victims, choice)) = best else {
            return Err(refusal);
        };
        let evicted: Vec<Binding> = victims.iter().filter_map(|id| self.release(id)).collect();
        let borrowed = self.check_quota(&r.tenant, &policy, r.amount())?;
        Ok((self.bind(r, t, borrowed, choice), evicted))
    }

    /// The choice for `r` on `node` were `victims` gone, if it would fit.
    pub(super) fn fits_without(
        &self,
        node: usize,
        victims: &[&Binding],
        r: &Request,
        t: u32,
        policy: &TenantPolicy,
    ) -> Option<Choice> {
        let mut u = self.used[node].clone();
        for v in victims {
            self.apply(&mut u, node, &self.held_by(v), &v.slots, false);
        }
        static_allows(&self.nodes[node], r, policy).ok()?;
        on_its_nodes(&self.nodes[node], r).ok()?;
        self.summary_of(node, &u)
            .tenancy_allows(t, policy.isolation)
            .ok()?;
        self.best_on(node, &u, r, t, policy, None).ok()
    }
}
