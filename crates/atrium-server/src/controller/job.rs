//! Jobs: a workload that runs `completions` indexes to a successful exit,
//! `parallelism` at a time — all at once, or none, for a gang. Each index
//! is one replica (placement). A finished replica (it succeeded, or failed
//! past its retries) stays as the record of its index and keeps its log,
//! holding no room, until the job is deleted: by its owner, or
//! `ttl_seconds_after_finished` after it finished.
//!
//! A job never rolls: its spec is refused once created (as Kubernetes'
//! pod template), so every placement of it runs the spec it has.

use std::collections::BTreeSet;

use atrium_api::{Object, Placement};
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::workload::{job_finished, JobSpec};

use super::owner::Owner;
use super::plan::{finished, unix_seconds, Action, Pass};

impl Owner<'_> {
    /// Brings a job one step on and returns its status: places the next
    /// indexes while it runs; once it has finished, removes what still
    /// runs, and deletes it when its time to live is up.
    pub(super) fn run_job(
        &self,
        job: &JobSpec,
        existing: &[&Object<Placement>],
        pass: &mut Pass,
        now: i64,
    ) -> Status {
        let state_of = |p: &&&Object<Placement>| p.status.as_ref().map(|s| s.state);
        let succeeded: BTreeSet<u32> = existing
            .iter()
            .filter(|p| state_of(p) == Some(LifecycleState::Succeeded))
            .map(|p| p.spec.replica)
            .collect();
        let active: Vec<&Object<Placement>> =
            existing.iter().filter(|p| !finished(p)).copied().collect();
        let progress = format!("{}/{} completions", succeeded.len(), job.completions);

        if let Some(status) = self.ended(job, existing, &succeeded, now) {
            for p in &active {
                pass.remove(&p.id);
            }
            // The status was written when it finished: its update time is
            // when the job finished.
            let finished_at = self
                .status
                .filter(|s| **s == status)
                .and_then(|_| unix_seconds(self.updated_at));
            let expired = job
                .ttl_seconds_after_finished
                .zip(finished_at)
                .is_some_and(|(ttl, at)| now.saturating_sub(at) >= ttl as i64);
            if expired {
                pass.plan.actions.push(Action::Delete {
                    kind: self.kind,
                    id: self.id.to_string(),
                });
            }
            return status;
        }

        let mut active = active;
        let running_indexes: BTreeSet<u32> = active.iter().map(|p| p.spec.replica).collect();
        let room = (job.parallelism() as usize).saturating_sub(active.len());
        let next: Vec<u32> = (0..job.completions)
            .filter(|i| !succeeded.contains(i) && !running_indexes.contains(i))
            .take(room)
            .collect();
        let unplaced = if next.is_empty() {
            None
        } else if job.gang {
            // A gang that lost a member (its node drained, it was
            // preempted) starts over: the others go, and all of it is
            // placed again.
            for p in active.drain(..) {
                pass.remove(&p.id);
            }
            self.place_gang(existing, &succeeded, job, pass)
        } else {
            self.place_each(&next, existing, pass)
        };

        let count = |state| {
            active
                .iter()
                .filter(|p| p.status.as_ref().is_some_and(|s| s.state == state))
                .count()
        };
        let (running, retrying) = (
            count(LifecycleState::Running),
            count(LifecycleState::Failed),
        );
        let retrying = if retrying > 0 {
            format!(", {retrying} failed and retrying")
        } else {
            String::new()
        };
        let waiting = unplaced
            .map(|why| format!("; {}", self.waiting(&why)))
            .unwrap_or_default();
        match running {
            0 if !waiting.is_empty() => {
                Status::new(LifecycleState::Pending, format!("{progress}{waiting}"))
            }
            1.. => Status::new(
                LifecycleState::Running,
                format!("{progress}, {running} running{retrying}{waiting}"),
            ),
            _ => Status::new(
                LifecycleState::Provisioning,
                format!("{progress}, starting{retrying}"),
            ),
        }
    }

    /// The job's final status, if it has one: the one already written, or
    /// success once every index succeeded, or failure when an index ran
    /// out of retries or the deadline passed.
    fn ended(
        &self,
        job: &JobSpec,
        existing: &[&Object<Placement>],
        succeeded: &BTreeSet<u32>,
        now: i64,
    ) -> Option<Status> {
        if let Some(s) = self.status.filter(|s| job_finished(s)) {
            return Some(s.clone());
        }
        let progress = format!("{}/{} completions", succeeded.len(), job.completions);
        if succeeded.len() >= job.completions as usize {
            return Some(Status::new(LifecycleState::Succeeded, progress));
        }
        let failed = existing.iter().find(|p| {
            finished(p)
                && p.status
                    .as_ref()
                    .is_some_and(|s| s.state == LifecycleState::Failed)
        });
        if let Some(p) = failed {
            let why = p.status.as_ref().map_or("", |s| s.reason.as_str());
            return Some(Status::new(
                LifecycleState::Failed,
                format!("{progress}; index {} failed: {why}", p.spec.replica),
            ));
        }
        let deadline = job.active_deadline_seconds?;
        let age = now.saturating_sub(unix_seconds(self.created_at)?);
        (age >= deadline as i64).then(|| {
            Status::new(
                LifecycleState::Failed,
                format!("{progress}; its active deadline of {deadline}s passed"),
            )
        })
    }

    /// Places every index not yet succeeded at once, or none.
    fn place_gang(
        &self,
        existing: &[&Object<Placement>],
        succeeded: &BTreeSet<u32>,
        job: &JobSpec,
        pass: &mut Pass,
    ) -> Option<String> {
        let members: Vec<u32> = (0..job.completions)
            .filter(|i| !succeeded.contains(i))
            .collect();
        let requests: Result<Vec<_>, String> =
            members.iter().map(|i| self.request(*i, pass)).collect();
        let requests = match requests {
            Ok(r) => r,
            Err(why) => {
                pass.plan.unplaceable += members.len();
                return Some(why);
            }
        };
        // Volumes not yet on a node take the gang to one node that holds
        // all of it, tried in name order.
        let choices: Vec<Vec<String>> = match requests.first() {
            Some(r) if pass.volumes.any_unbound(&self.volumes) => {
                r.nodes.iter().map(|n| vec![n.clone()]).collect()
            }
            Some(r) => vec![r.nodes.clone()],
            None => Vec::new(),
        };
        let mut placed = Err(atrium_sched::fleet::Refusal::Gang("no node to try".into()));
        for nodes in choices {
            let on: Vec<_> = requests
                .iter()
                .map(|r| atrium_sched::fleet::Request {
                    nodes: nodes.clone(),
                    ..r.clone()
                })
                .collect();
            placed = pass.fleet.place_gang(&on, false);
            if placed.is_ok() {
                break;
            }
        }
        match placed {
            Ok(bindings) => {
                for (index, binding) in members.iter().zip(&bindings) {
                    if let Err(why) = self.push_place(*index, binding, existing, pass) {
                        return Some(why);
                    }
                }
                None
            }
            Err(why) => {
                pass.plan.unplaceable += members.len();
                Some(format!(
                    "all {} workers of the gang start together or none does: {why}",
                    members.len()
                ))
            }
        }
    }

    /// Places the next indexes one by one, preempting lower priorities if
    /// it must; stops at the first that finds no room.
    fn place_each(
        &self,
        next: &[u32],
        existing: &[&Object<Placement>],
        pass: &mut Pass,
    ) -> Option<String> {
        for index in next {
            let request = match self.request(*index, pass) {
                Ok(r) => r,
                Err(why) => {
                    pass.plan.unplaceable += 1;
                    return Some(why);
                }
            };
            match pass.place(&request, self) {
                Ok(binding) => {
                    if let Err(why) = self.push_place(*index, &binding, existing, pass) {
                        return Some(why);
                    }
                }
                Err(why) => {
                    pass.plan.unplaceable += 1;
                    return Some(why.to_string());
                }
            }
        }
        None
    }
}
