//! The site-wide counter behind request limits when a site has several
//! gateways. Each gateway reports, every sync interval, what it admitted
//! per limited scope; the ledger answers with what the *other* gateways of
//! the site admitted in the last minute and today, and how many gateways
//! are active, so each can count the others in and take its share.
//! In memory: a control-plane restart forgets the last minute (documented
//! overshoot: up to one window's limit once).

use std::collections::{HashMap, VecDeque};

use atrium_api::{LimitSync, LimitSyncAnswer, ScopeTotals};

/// A gateway that has not synced for this long no longer counts as active.
const ACTIVE_SECS: u64 = 30;
const DAY_SECS: u64 = 86_400;

#[derive(Default)]
pub struct Ledger {
    sites: HashMap<String, SiteLedger>,
}

#[derive(Default)]
struct SiteLedger {
    /// gateway → last sync (seconds since the epoch).
    gateways: HashMap<String, u64>,
    scopes: HashMap<String, ScopeLedger>,
}

#[derive(Default)]
struct ScopeLedger {
    /// (second, gateway, requests, tokens), oldest first, the last minute.
    minute: VecDeque<(u64, String, u64, u64)>,
    /// (UTC day, gateway → tokens that day).
    day: (u64, HashMap<String, u64>),
}

impl ScopeLedger {
    fn expire(&mut self, now: u64) {
        while self.minute.front().is_some_and(|e| e.0 + 60 <= now) {
            self.minute.pop_front();
        }
        if self.day.0 != now / DAY_SECS {
            self.day = (now / DAY_SECS, HashMap::new());
        }
    }

    fn others(&self, gateway: &str) -> (u64, u64, u64) {
        let (mut requests, mut tokens) = (0, 0);
        for (_, g, r, t) in &self.minute {
            if g != gateway {
                requests = r.saturating_add(requests);
                tokens = t.saturating_add(tokens);
            }
        }
        let day = self
            .day
            .1
            .iter()
            .filter(|(g, _)| *g != gateway)
            .fold(0u64, |sum, (_, t)| sum.saturating_add(*t));
        (requests, tokens, day)
    }
}

impl Ledger {
    pub fn sync(&mut self, report: LimitSync, now: u64) -> LimitSyncAnswer {
        let site = self.sites.entry(report.site).or_default();
        site.gateways.insert(report.gateway.clone(), now);
        site.gateways.retain(|_, seen| *seen + ACTIVE_SECS > now);
        for d in report.scopes {
            let s = site.scopes.entry(d.scope).or_default();
            s.expire(now);
            if d.requests > 0 || d.tokens > 0 {
                s.minute
                    .push_back((now, report.gateway.clone(), d.requests, d.tokens));
                let day = s.day.1.entry(report.gateway.clone()).or_default();
                *day = day.saturating_add(d.tokens);
            }
        }
        let mut scopes = Vec::new();
        site.scopes.retain(|name, s| {
            s.expire(now);
            let (requests_minute, tokens_minute, tokens_day) = s.others(&report.gateway);
            if requests_minute > 0 || tokens_minute > 0 || tokens_day > 0 {
                scopes.push(ScopeTotals {
                    scope: name.clone(),
                    requests_minute,
                    tokens_minute,
                    tokens_day,
                });
            }
            !s.minute.is_empty() || !s.day.1.is_empty()
        });
        scopes.sort_by(|a, b| a.scope.cmp(&b.scope));
        LimitSyncAnswer {
            gateways: site.gateways.len() as u64,
            scopes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_api::ScopeDelta;

    fn report(gateway: &str, requests: u64) -> LimitSync {
        LimitSync {
            gateway: gateway.into(),
            site: "s".into(),
            scopes: vec![ScopeDelta {
                scope: "key:k".into(),
                requests,
                tokens: requests * 10,
            }],
        }
    }

    #[test]
    fn each_gateway_sees_the_others_for_a_minute() {
        let mut l = Ledger::default();
        let t = 1_000 * DAY_SECS;
        assert_eq!(l.sync(report("a", 5), t).gateways, 1);
        let b = l.sync(report("b", 3), t + 1);
        assert_eq!(b.gateways, 2);
        assert_eq!(
            (
                b.scopes[0].requests_minute,
                b.scopes[0].tokens_minute,
                b.scopes[0].tokens_day
            ),
            (5, 50, 50)
        );
        let a = l.sync(report("a", 0), t + 2);
        assert_eq!(a.scopes[0].requests_minute, 3);
        // A minute on, the requests have left the window; the day's tokens stay.
        // A minute on, the requests have left the window; the day's tokens
        // stay; and `b`, silent for a minute, is no longer an active gateway.
        let a = l.sync(report("a", 0), t + 61);
        assert_eq!(
            (a.scopes[0].requests_minute, a.scopes[0].tokens_day),
            (0, 30)
        );
        assert_eq!(a.gateways, 1);
        // A new day forgets the budget.
        assert!(l.sync(report("a", 0), t + DAY_SECS).scopes.is_empty());
    }
}
