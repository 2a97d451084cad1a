//! How many replicas a deployment should run, from the requests in flight
//! its gateways report: pure (the caller says what time it is), so every
//! rule is tested without a clock or a cluster.
//!
//! Knative's concurrency rule with Kubernetes HPA's scale-down
//! stabilisation: each observation recommends `ceil(in_flight / target)`
//! replicas; the deployment runs the largest recommendation of the last
//! `scale_down_delay_seconds`. Scaling up therefore follows the newest
//! observation at once, while scaling down (to zero included) waits until
//! load has been low for the whole delay. A request the gateway holds for
//! want of a replica, or any request at all in the interval, recommends at
//! least one replica, so a deployment with traffic never idles to zero.

use std::collections::VecDeque;

use crate::deployment::Replicas;

/// What the gateways saw of one deployment over their last interval,
/// summed over gateways.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Observation {
    /// Mean requests in flight to its replicas.
    pub in_flight: f64,
    /// Requests that started in the interval.
    pub requests: u64,
    /// Requests held now because no replica is ready.
    pub waiting: u64,
}

impl Observation {
    /// Replicas this observation alone asks for, at `target` in flight
    /// each; never above `cap` (a nonsense report cannot ask for more).
    pub fn replicas(&self, target: u32, cap: u32) -> u32 {
        let load = if self.in_flight.is_finite() && self.in_flight > 0.0 {
            self.in_flight
        } else {
            0.0
        };
        let by_load = (load / f64::from(target.max(1))).ceil();
        // `as` saturates; `cap` bounds it anyway.
        let by_load = (by_load.min(f64::from(cap))) as u32;
        let active = self.requests > 0 || self.waiting > 0;
        by_load.max(u32::from(active)).min(cap)
    }
}

/// One deployment's recent recommendations.
#[derive(Debug, Clone)]
pub struct Recommender {
    /// (seconds, replicas) of each observation still inside the delay.
    recent: VecDeque<(f64, u32)>,
    /// When this recommender first observed the deployment.
    since: f64,
}

impl Recommender {
    pub fn new(now: f64) -> Recommender {
        Recommender {
            recent: VecDeque::new(),
            since: now,
        }
    }

    /// The replicas to run at `now` after `seen`, for a deployment that
    /// runs `current` (the last decision, kept in the store). Until a whole
    /// delay has been observed (a new deployment, a restarted server) it
    /// never goes below `current`: nothing is known of the time before.
    pub fn desired(
        &mut self,
        now: f64,
        seen: Observation,
        replicas: &Replicas,
        current: u32,
    ) -> u32 {
        let delay = f64::from(replicas.scale_down_delay_seconds());
        let wanted = seen.replicas(replicas.target_in_flight(), replicas.max);
        self.recent.push_back((now, wanted));
        while self.recent.front().is_some_and(|(t, _)| *t <= now - delay) {
            self.recent.pop_front();
        }
        let mut desired = self.recent.iter().map(|(_, r)| *r).max().unwrap_or(0);
        if now - self.since < delay {
            desired = desired.max(current);
        }
        // Not `clamp`: it panics should a stored spec have min > max.
        desired.max(replicas.min).min(replicas.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(min: u32, max: u32, target: u32, delay: u32) -> Replicas {
        Replicas {
            min,
            max,
            target_in_flight: Some(target),
            scale_down_delay_seconds: Some(delay),
        }
    }

    fn load(in_flight: f64) -> Observation {
        Observation {
            in_flight,
            requests: u64::from(in_flight > 0.0),
            waiting: 0,
        }
    }

    #[test]
    fn scales_up_at_once_and_down_only_after_the_delay() {
        let r = replicas(0, 10, 4, 10);
        let mut rec = Recommender::new(0.0);
        // A new deployment starts at one and waits out a delay first.
        assert_eq!(rec.desired(1.0, load(0.0), &r, 1), 1);
        // 9 in flight at 4 each: 3 replicas, at once.
        assert_eq!(rec.desired(2.0, load(9.0), &r, 1), 3);
        assert_eq!(rec.desired(3.0, load(16.5), &r, 3), 5);
        // Load falls: the last delay's peak holds...
        for t in 4..13 {
            assert_eq!(rec.desired(f64::from(t), load(1.0), &r, 5), 5, "at {t}");
        }
        // ...until it leaves the window.
        assert_eq!(rec.desired(13.5, load(1.0), &r, 5), 1);
        // Idle for a whole delay: zero.
        for t in 14..23 {
            assert_eq!(rec.desired(f64::from(t), load(0.0), &r, 1), 1, "at {t}");
        }
        assert_eq!(rec.desired(24.0, load(0.0), &r, 1), 0);
    }

    #[test]
    fn any_request_or_held_request_keeps_a_replica() {
        let r = replicas(0, 4, 8, 1);
        let mut rec = Recommender::new(0.0);
        assert_eq!(rec.desired(5.0, Observation::default(), &r, 0), 0);
        let held = Observation {
            waiting: 1,
            ..Observation::default()
        };
        assert_eq!(rec.desired(6.0, held, &r, 0), 1);
        // A short request seen only as started (its in-flight mean
        // rounded to nothing) still counts.
        let brief = Observation {
            in_flight: 0.0,
            requests: 3,
            waiting: 0,
        };
        assert_eq!(rec.desired(7.5, brief, &r, 1), 1);
    }

    #[test]
    fn bounds_hold_whatever_a_report_says() {
        let r = replicas(2, 5, 1, 60);
        let mut rec = Recommender::new(0.0);
        for in_flight in [f64::NAN, f64::INFINITY, -3.0, 1e300] {
            let d = rec.desired(100.0, load(in_flight), &r, 2);
            assert!((2..=5).contains(&d), "{in_flight}: {d}");
        }
        assert_eq!(load(1e300).replicas(1, 5), 5);
        assert_eq!(load(f64::NAN).replicas(1, 5), 0);
        // Never below the minimum, even idle.
        let mut rec = Recommender::new(0.0);
        assert_eq!(rec.desired(1000.0, load(0.0), &r, 2), 2);
    }

    #[test]
    fn a_restarted_recommender_holds_the_stored_scale_for_one_delay() {
        let r = replicas(0, 8, 2, 30);
        let mut rec = Recommender::new(100.0);
        assert_eq!(rec.desired(101.0, load(0.0), &r, 6), 6);
        assert_eq!(rec.desired(129.0, load(0.0), &r, 6), 6);
        assert_eq!(rec.desired(131.0, load(0.0), &r, 6), 0);
    }
}
