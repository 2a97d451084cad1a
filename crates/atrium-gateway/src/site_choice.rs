//! Where a request is served, decided from what this gateway knows now:
//! here, forwarded to a peer site's gateway, or nowhere — never at a site
//! the tenant's residency or the deployment's site list excludes. Pure, so
//! the rule is tested on its own against random topologies.
//!
//! The rule: this site when it is allowed and has a ready replica; else
//! the allowed peer sites that answer their probes and have a ready
//! replica — the deployment's preferred sites first —, nearest (by
//! measured round trip) first; else this site when it is allowed (the
//! request waits for a replica to start, as a deployment scaled to zero
//! does); else `no_compliant_site`. A ready replica here serves even when
//! it is not at a preferred site: replicas are there only as overflow,
//! and sending the request away would add a round trip for nothing.

use atrium_core::tenant::Residency;

/// One site as the choice sees it.
#[derive(Debug, Clone, Copy)]
pub struct SiteState<'a> {
    pub site: &'a str,
    /// `None` when this gateway has not learnt it (the site record is
    /// missing): such a site is allowed only to a tenant allowed anywhere.
    pub jurisdiction: Option<&'a str>,
    /// Has a ready replica of the deployment.
    pub ready: bool,
    /// Its gateway answers (always true for this site).
    pub healthy: bool,
    /// Measured round trip to its gateway; 0 for this site.
    pub rtt_us: u64,
}

/// Whether `site` may serve a tenant with `residency` a deployment that
/// names `sites` (any site when empty).
pub fn allowed(residency: &Residency, sites: &[String], site: &SiteState<'_>) -> bool {
    let by_residency = match (residency, site.jurisdiction) {
        (Residency::Any, _) => true,
        (_, Some(j)) => residency.allows(j),
        (_, None) => false,
    };
    by_residency && (sites.is_empty() || sites.iter().any(|s| s == site.site))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice<'a> {
    /// Served by this gateway's own replicas (or held for one to start).
    Here,
    /// Forwarded to these sites' gateways, tried in this order.
    Forward(Vec<&'a str>),
    /// No allowed site can serve it now.
    NoCompliantSite,
}

pub fn choose<'a>(
    residency: &Residency,
    sites: &[String],
    preferred: &[String],
    here: &SiteState<'a>,
    peers: &[SiteState<'a>],
) -> Choice<'a> {
    let here_allowed = allowed(residency, sites, here);
    if here_allowed && here.ready {
        return Choice::Here;
    }
    let mut ready: Vec<&SiteState<'a>> = peers
        .iter()
        .filter(|p| p.ready && p.healthy && p.site != here.site)
        .filter(|p| allowed(residency, sites, p))
        .collect();
    let rank = |s: &SiteState<'_>| !preferred.iter().any(|p| p == s.site);
    ready.sort_by(|a, b| (rank(a), a.rtt_us, a.site).cmp(&(rank(b), b.rtt_us, b.site)));
    // A site with several gateways is listed once, at its nearest.
    let mut seen: Vec<&str> = Vec::new();
    ready.retain(|p| {
        let first = !seen.contains(&p.site);
        seen.push(p.site);
        first
    });
    if !ready.is_empty() {
        Choice::Forward(ready.into_iter().map(|p| p.site).collect())
    } else if here_allowed {
        Choice::Here
    } else {
        Choice::NoCompliantSite
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn site<'a>(site: &'a str, j: &'a str, ready: bool, rtt_us: u64) -> SiteState<'a> {
        SiteState {
            site,
            jurisdiction: Some(j),
            ready,
            healthy: true,
            rtt_us,
        }
    }

    fn eu() -> Residency {
        Residency::Only {
            jurisdictions: vec!["EU".into()],
        }
    }

    #[test]
    fn an_eu_tenant_at_a_us_edge_goes_to_the_nearest_ready_eu_site_or_nowhere() {
        let here = site("edge-us", "US", true, 0);
        let mut peers = vec![
            site("core-eu-b", "EU", true, 30_000),
            site("core-eu-a", "EU", true, 20_000),
            site("core-us", "US", true, 1_000),
        ];
        assert_eq!(
            choose(&eu(), &[], &[], &here, &peers),
            Choice::Forward(vec!["core-eu-a", "core-eu-b"])
        );
        peers[1].healthy = false;
        assert_eq!(
            choose(&eu(), &[], &[], &here, &peers),
            Choice::Forward(vec!["core-eu-b"])
        );
        peers[0].ready = false;
        assert_eq!(
            choose(&eu(), &[], &[], &here, &peers),
            Choice::NoCompliantSite
        );
        // A global tenant is served where it arrived.
        assert_eq!(
            choose(&Residency::Any, &[], &[], &here, &peers),
            Choice::Here
        );
    }

    #[test]
    fn a_preferred_site_is_forwarded_to_before_a_nearer_one_but_a_ready_replica_here_serves() {
        let peers = [
            site("core-eu-a", "EU", true, 20_000),
            site("edge-de", "EU", true, 90_000),
        ];
        let preferred = ["edge-de".to_string()];
        let away = site("edge-us", "US", true, 0);
        assert_eq!(
            choose(&eu(), &[], &preferred, &away, &peers),
            Choice::Forward(vec!["edge-de", "core-eu-a"])
        );
        let here = site("core-eu-b", "EU", true, 0);
        assert_eq!(choose(&eu(), &[], &preferred, &here, &peers), Choice::Here);
    }

    #[test]
    fn here_waits_for_a_replica_only_when_no_allowed_peer_is_ready() {
        let here = site("core-eu-a", "EU", false, 0);
        let peers = [site("core-eu-b", "EU", true, 5_000)];
        assert_eq!(
            choose(&eu(), &[], &[], &here, &peers),
            Choice::Forward(vec!["core-eu-b"])
        );
        assert_eq!(choose(&eu(), &[], &[], &here, &[]), Choice::Here);
        // The deployment's own site list binds too.
        let only_b = ["core-eu-b".to_string()];
        let ready_here = site("core-eu-a", "EU", true, 0);
        assert_eq!(
            choose(&eu(), &only_b, &[], &ready_here, &peers),
            Choice::Forward(vec!["core-eu-b"])
        );
        // A site whose jurisdiction is unknown serves only tenants allowed
        // anywhere.
        let unknown = SiteState {
            jurisdiction: None,
            ..ready_here
        };
        assert_eq!(
            choose(&eu(), &[], &[], &unknown, &[]),
            Choice::NoCompliantSite
        );
        assert_eq!(
            choose(&Residency::Any, &[], &[], &unknown, &[]),
            Choice::Here
        );
    }

    const SITES: [&str; 6] = ["s0", "s1", "s2", "s3", "s4", "s5"];
    const CODES: [&str; 3] = ["EU", "US", "DE"];

    fn state() -> impl Strategy<Value = (usize, Option<usize>, bool, bool, u64)> {
        (
            0..SITES.len(),
            proptest::option::weighted(0.9, 0..CODES.len()),
            any::<bool>(),
            any::<bool>(),
            0u64..200_000,
        )
    }

    proptest! {
        /// For random topologies, policies, preferences, failures and
        /// readiness: no choice names a site outside the allowed set, a
        /// forward goes only to healthy ready sites, preferred ones first,
        /// nearest first within each, and `NoCompliantSite` comes only when
        /// no allowed site could take the request.
        #[test]
        fn no_choice_leaves_the_allowed_set(
            here in state(),
            peers in proptest::collection::vec(state(), 0..8),
            policy in proptest::option::of(proptest::collection::vec(0..CODES.len(), 0..3)),
            deployment_sites in proptest::collection::vec(0..SITES.len(), 0..3),
            preferred_sites in proptest::collection::vec(0..SITES.len(), 0..2),
        ) {
            let residency = match policy {
                None => Residency::Any,
                Some(codes) => Residency::Only {
                    jurisdictions: codes.into_iter().map(|c| CODES[c].to_string()).collect(),
                },
            };
            let sites: Vec<String> = deployment_sites.iter().map(|&s| SITES[s].to_string()).collect();
            let preferred: Vec<String> = preferred_sites.iter().map(|&s| SITES[s].to_string()).collect();
            let make = |(s, j, ready, healthy, rtt): (usize, Option<usize>, bool, bool, u64)| SiteState {
                site: SITES[s],
                jurisdiction: j.map(|j| CODES[j]),
                ready,
                healthy,
                rtt_us: rtt,
            };
            let here = SiteState { healthy: true, rtt_us: 0, ..make(here) };
            let peers: Vec<SiteState> = peers.into_iter().map(make).collect();
            match choose(&residency, &sites, &preferred, &here, &peers) {
                Choice::Here => prop_assert!(allowed(&residency, &sites, &here)),
                Choice::Forward(order) => {
                    prop_assert!(!order.is_empty());
                    let mut last = (false, 0);
                    for s in &order {
                        prop_assert!(*s != here.site);
                        // Some state of that site is allowed, healthy and
                        // ready; the order follows the best such rtt.
                        let best = peers.iter()
                            .filter(|p| p.site == *s && p.ready && p.healthy && allowed(&residency, &sites, p))
                            .map(|p| p.rtt_us)
                            .min();
                        prop_assert!(best.is_some());
                        let rank = (!preferred.iter().any(|p| p == s), best.unwrap_or_default());
                        prop_assert!(rank >= last, "{:?} after {:?}", rank, last);
                        last = rank;
                    }
                    prop_assert!(!(allowed(&residency, &sites, &here) && here.ready));
                }
                Choice::NoCompliantSite => {
                    prop_assert!(!allowed(&residency, &sites, &here));
                    prop_assert!(!peers.iter().any(|p| p.ready && p.healthy && p.site != here.site
                        && allowed(&residency, &sites, p)));
                }
            }
        }
    }
}
