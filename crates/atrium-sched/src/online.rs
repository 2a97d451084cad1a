//! Online replay: tasks arrive at their creation times, run for their
//! trace duration once placed, and leave; a task that does not fit waits,
//! and waiting tasks are retried, in arrival order, whenever a task leaves
//! a node they could now use.
//!
//! The openb traces' own times offer the cluster very little: over the
//! 149 days of the default trace the tasks alive at once ask 0.23 % of the
//! GPUs on average and 1.06 % at the peak, so every policy places every
//! task on arrival. Two knobs make it a test: `inflate`, as the paper's
//! replay (tasks drawn again with replacement until the GPUs asked reach
//! that multiple of capacity; a copy arrives with its original), and
//! `time_scale`, which multiplies arrival times — never durations — so the
//! same tasks overlap more.
//!
//! Two schedulers replay: a FGD-paper policy on `policy::Cluster`, and
//! Atrium's fleet scheduler (`fleet::Fleet`), which also preempts (the
//! trace's QoS as priority: Guaranteed > LS > Burstable > BE) and places
//! gangs (tasks created in the same second with the same request and QoS,
//! all or none). An evicted task waits again and, once placed, runs its
//! whole duration anew.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::fleet::{Fleet, GpuAsk, GpuDevice, Node, Request, Slot, TenantPolicy};
use crate::policy::{Cluster, Decision, Policy};
use crate::sim::draw_until;
use crate::trace::{NodeSpec, TimedPod};

/// Which scheduler replays the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    Policy(Policy),
    /// Atrium's fleet scheduler, with preemption and gangs.
    Fleet,
}

impl Scheduler {
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Policy(p) => p.name(),
            Scheduler::Fleet => "fleet",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct OnlineConfig {
    /// Arrival times are multiplied by this (1: the trace's times).
    pub time_scale: f64,
    /// GPUs asked by all tasks, as a multiple of capacity, reached by
    /// drawing copies (never by dropping tasks).
    pub inflate: f64,
    /// Points in the reported timeline.
    pub samples: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WaitStats {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the first arrival (compressed time).
    pub t: f64,
    pub allocation_pct: f64,
    pub fragmentation_pct: f64,
    pub waiting: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct OnlineResult {
    pub scheduler: String,
    pub seed: u64,
    pub time_scale: f64,
    pub inflate: f64,
    /// GPU-milli × seconds asked within the arrival span, over span ×
    /// capacity: the mean allocation if everything fitted at once.
    pub offered_load: f64,
    /// Tasks replayed, copies included.
    pub tasks: usize,
    pub gangs: usize,
    /// Jobs (a gang counts once) placed as they arrived.
    pub placed_on_arrival: usize,
    /// Jobs placed after waiting (an evicted task waits again as a job).
    pub placed_after_waiting: usize,
    /// Tasks still waiting when the last placed task left: they never fit.
    pub never_placed: usize,
    pub preemptions: usize,
    /// GPU allocation, time-weighted over the arrival span.
    pub mean_allocation_pct: f64,
    pub peak_allocation_pct: f64,
    /// FGD's fragmentation share of idle GPU, mean over the timeline.
    pub mean_fragmentation_pct: f64,
    /// Seconds from arrival to placement, over placed jobs.
    pub wait_seconds: WaitStats,
    pub timeline: Vec<Sample>,
    pub decisions_per_sec: f64,
}

/// One unit of scheduling: a task, or a gang of tasks.
struct Job {
    tasks: Vec<usize>,
    /// Milliseconds since the first arrival.
    arrival: u64,
}

/// Placements as the replay's cluster model holds them: what the measures
/// read, and the cheap "could it fit here" test the waiting queue asks.
struct Mirror<'a> {
    cluster: Cluster,
    pods: &'a [TimedPod],
    placed: HashMap<usize, Decision>,
}

impl<'a> Mirror<'a> {
    fn new(cluster: Cluster, pods: &'a [TimedPod]) -> Mirror<'a> {
        Mirror {
            cluster,
            pods,
            placed: HashMap::new(),
        }
    }

    fn place(&mut self, task: usize, d: Decision) {
        self.cluster.place(&self.pods[task].pod, &d);
        self.placed.insert(task, d);
    }

    fn release(&mut self, task: usize) {
        if let Some(d) = self.placed.remove(&task) {
            self.cluster.release(&self.pods[task].pod, &d);
        }
    }

    /// The node a running task is on.
    fn node_of(&self, task: usize) -> Option<usize> {
        self.placed.get(&task).map(|d| d.node)
    }

    /// Whether the task could go on this node alone now.
    fn fits_on(&self, task: usize, node: usize) -> bool {
        self.cluster
            .fits(&self.cluster.nodes[node], &self.pods[task].pod)
    }
}

/// What the event loop needs of a scheduler.
trait Placer<'a> {
    /// Places a job now: the tasks it had to evict, or None if it waits.
    fn place(&mut self, job: &[usize]) -> Option<Vec<usize>>;
    fn release(&mut self, task: usize);
    fn mirror(&self) -> &Mirror<'a>;
    fn mirror_mut(&mut self) -> &mut Mirror<'a>;
}

struct PolicyPlacer<'a> {
    mirror: Mirror<'a>,
    policy: Policy,
    rng: StdRng,
}

impl<'a> Placer<'a> for PolicyPlacer<'a> {
    fn place(&mut self, job: &[usize]) -> Option<Vec<usize>> {
        // Policies place tasks one by one: a "job" here is one task.
        let task = *job.first()?;
        let m = &mut self.mirror;
        let d = m
            .cluster
            .choose(&m.pods[task].pod, self.policy, &mut self.rng)?;
        m.place(task, d);
        Some(Vec::new())
    }

    fn release(&mut self, task: usize) {
        self.mirror.release(task);
    }

    fn mirror(&self) -> &Mirror<'a> {
        &self.mirror
    }

    fn mirror_mut(&mut self) -> &mut Mirror<'a> {
        &mut self.mirror
    }
}

const TENANT: &str = "trace";

struct FleetPlacer<'a> {
    fleet: Fleet,
    mirror: Mirror<'a>,
    node_index: HashMap<String, usize>,
}

/// A task's request id in the fleet: its index, not its name — a pod
/// list may repeat a name, and the fleet refuses a second binding of one.
fn request_id(task: usize) -> String {
    format!("{task:08}")
}

fn priority(qos: &str) -> i32 {
    match qos {
        "Guaranteed" => 3,
        "LS" => 2,
        "Burstable" => 1,
        _ => 0,
    }
}

impl<'a> FleetPlacer<'a> {
    fn new(nodes: &[NodeSpec], cluster: Cluster, pods: &'a [TimedPod]) -> FleetPlacer<'a> {
        let fleet_nodes = nodes
            .iter()
            .map(|n| Node {
                name: n.name.clone(),
                site: "trace".into(),
                jurisdiction: "trace".into(),
                leaf: None,
                cpu_milli: u64::from(n.cpu_milli),
                memory_mib: u64::from(n.memory_mib),
                // The trace knows no NVLink: a node's GPUs are one domain,
                // so N whole GPUs fit wherever N are free, as in the paper.
                gpus: (0..n.gpus)
                    .map(|_| GpuDevice {
                        model: n.model.clone(),
                        memory_mib: 0,
                        nvlink: Some("node".into()),
                        mig_capable: false,
                    })
                    .collect(),
            })
            .collect();
        let tenants = BTreeMap::from([(TENANT.to_string(), TenantPolicy::shared())]);
        FleetPlacer {
            fleet: Fleet::new(fleet_nodes, tenants),
            mirror: Mirror::new(cluster, pods),
            node_index: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.name.clone(), i))
                .collect(),
        }
    }

    fn request(&self, task: usize) -> Request {
        let t = &self.mirror.pods[task];
        Request {
            id: request_id(task),
            tenant: TENANT.into(),
            priority: priority(&t.qos),
            cpu_milli: u64::from(t.pod.cpu_milli),
            memory_mib: u64::from(t.pod.memory_mib),
            gpu: if t.pod.num_gpu == 0 {
                GpuAsk::None
            } else if t.pod.is_share() {
                GpuAsk::Share(t.pod.gpu_milli)
            } else {
                GpuAsk::Whole(t.pod.num_gpu)
            },
            gpu_memory_mib: 0,
            models: t.pod.gpu_spec.clone(),
            sites: Vec::new(),
            nodes: Vec::new(),
        }
    }

    fn mirror_binding(&mut self, task: usize, node: &str, slots: &[Slot]) {
        if let Some(&node) = self.node_index.get(node) {
            let gpus = slots.iter().map(Slot::gpu).collect();
            self.mirror.place(task, Decision { node, gpus });
        }
    }
}

impl<'a> Placer<'a> for FleetPlacer<'a> {
    fn place(&mut self, job: &[usize]) -> Option<Vec<usize>> {
        if let [task] = job {
            let (b, evicted) = self.fleet.place_preempting(&self.request(*task)).ok()?;
            let evicted: Vec<usize> = evicted
                .iter()
                .filter_map(|e| e.request.parse().ok())
                .collect();
            for e in &evicted {
                self.mirror.release(*e);
            }
            self.mirror_binding(*task, &b.node, &b.slots);
            return Some(evicted);
        }
        let members: Vec<Request> = job.iter().map(|t| self.request(*t)).collect();
        let bindings = self.fleet.place_gang(&members, false).ok()?;
        for (task, b) in job.iter().zip(&bindings) {
            self.mirror_binding(*task, &b.node, &b.slots);
        }
        Some(Vec::new())
    }

    fn release(&mut self, task: usize) {
        self.fleet.release(&request_id(task));
        self.mirror.release(task);
    }

    fn mirror(&self) -> &Mirror<'a> {
        &self.mirror
    }

    fn mirror_mut(&mut self) -> &mut Mirror<'a> {
        &mut self.mirror
    }
}

/// Gangs: tasks created in the same second with the same request and QoS
/// that ask for GPUs (a job's workers, as the trace records them).
/// Copies (from `originals` on) are never members: they are the replay's.
fn jobs(pods: &[TimedPod], originals: usize, gangs: bool) -> Vec<Vec<usize>> {
    if !gangs {
        return (0..pods.len()).map(|i| vec![i]).collect();
    }
    let mut groups: BTreeMap<(u64, &crate::trace::Pod, &str), Vec<usize>> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        if p.pod.num_gpu == 0 || i >= originals {
            out.push(vec![i]);
        } else {
            groups
                .entry((p.created, &p.pod, p.qos.as_str()))
                .or_default()
                .push(i);
        }
    }
    out.extend(groups.into_values());
    out
}

/// What runs, and what starting it cost.
struct Runs<'a> {
    pods: &'a [TimedPod],
    /// (time, task, epoch); a task evicted and placed again has a new
    /// epoch, so its stale departure is ignored.
    departures: BinaryHeap<Reverse<(u64, usize, u32)>>,
    epoch: Vec<u32>,
    running: Vec<bool>,
    /// Evicted since the queue last took them back.
    evicted: Vec<usize>,
    preemptions: usize,
    /// Seconds from arrival to placement, per placed job.
    waits: Vec<f64>,
    decisions: usize,
    decision_time: f64,
}

impl<'a> Runs<'a> {
    fn new(pods: &'a [TimedPod]) -> Runs<'a> {
        Runs {
            pods,
            departures: BinaryHeap::new(),
            epoch: vec![0; pods.len()],
            running: vec![false; pods.len()],
            evicted: Vec::new(),
            preemptions: 0,
            waits: Vec::new(),
            decisions: 0,
            decision_time: 0.0,
        }
    }

    /// Tries to start a job at `t` (ms); whether it was placed.
    fn start(&mut self, job: &Job, t: u64, placer: &mut dyn Placer<'_>) -> bool {
        let began = Instant::now();
        let evicted = placer.place(&job.tasks);
        self.decision_time += began.elapsed().as_secs_f64();
        self.decisions += 1;
        let Some(evicted) = evicted else {
            return false;
        };
        for &e in &evicted {
            self.running[e] = false;
            self.epoch[e] = self.epoch[e].wrapping_add(1);
        }
        for &task in &job.tasks {
            self.running[task] = true;
            let leaves = t.saturating_add(self.pods[task].duration.saturating_mul(1000));
            self.departures
                .push(Reverse((leaves, task, self.epoch[task])));
        }
        self.preemptions += evicted.len();
        self.evicted.extend(evicted);
        self.waits.push((t - job.arrival) as f64 / 1000.0);
        true
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The trace and its copies (`sim::draw_until`), each copy named after
/// its original.
fn inflated(pods: &[TimedPod], capacity: u64, inflate: f64, rng: &mut StdRng) -> Vec<TimedPod> {
    let mut out = pods.to_vec();
    let originals = out.len();
    draw_until(
        &mut out,
        pods,
        |p| p.pod.gpu_request(),
        capacity,
        inflate,
        rng,
    );
    for (k, copy) in out[originals..].iter_mut().enumerate() {
        copy.name = format!("{}-copy{}", copy.name, k + 1);
    }
    out
}

/// Replays `pods` on `nodes` online with `scheduler`.
pub fn replay(
    nodes: &[NodeSpec],
    pods: &[TimedPod],
    scheduler: Scheduler,
    config: OnlineConfig,
    seed: u64,
) -> OnlineResult {
    let mut rng = StdRng::seed_from_u64(seed);
    // Typical pods come from the trace as given, as in the offline replay.
    let mut cluster = Cluster::new(nodes);
    let trace: Vec<_> = pods.iter().map(|p| p.pod.clone()).collect();
    cluster.set_workload(&trace);
    let capacity = cluster.gpu_capacity().max(1);
    let originals = pods.len();
    let pods = &inflated(pods, capacity, config.inflate, &mut rng)[..];
    let mut placer: Box<dyn Placer<'_> + '_> = match scheduler {
        Scheduler::Policy(policy) => {
            cluster.shuffle_tie_order(&mut rng);
            Box::new(PolicyPlacer {
                mirror: Mirror::new(cluster, pods),
                policy,
                rng: StdRng::seed_from_u64(seed),
            })
        }
        Scheduler::Fleet => Box::new(FleetPlacer::new(nodes, cluster, pods)),
    };
    let first = pods.iter().map(|p| p.created).min().unwrap_or(0);
    // A scale that is not a positive number means the trace's times.
    let scale = Some(config.time_scale)
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    let span = pods.iter().map(|p| p.created - first).max().unwrap_or(0) as f64 * scale;
    // What the tasks ask within the arrival span (a task running past its
    // end counts up to it): the pressure the span's allocation answers.
    let work: f64 = pods
        .iter()
        .map(|p| {
            let arrives = (p.created - first) as f64 * scale;
            p.pod.gpu_request() as f64 * (p.duration as f64).min(span - arrives).max(0.0)
        })
        .sum();
    let offered_load = work / (span.max(1.0) * capacity as f64);

    let mut all_jobs: Vec<Job> = jobs(pods, originals, scheduler == Scheduler::Fleet)
        .into_iter()
        .map(|tasks| Job {
            arrival: ((pods[tasks[0]].created - first) as f64 * scale * 1000.0).round() as u64,
            tasks,
        })
        .collect();
    all_jobs.sort_by_key(|j| (j.arrival, j.tasks[0]));
    let gangs = all_jobs.iter().filter(|j| j.tasks.len() > 1).count();
    let end_of_arrivals = all_jobs.last().map_or(0, |j| j.arrival).max(1);

    let mut runs = Runs::new(pods);
    let mut waiting: Vec<Job> = Vec::new();
    let (mut on_arrival, mut after_waiting) = (0usize, 0usize);
    let mut timeline = Vec::with_capacity(config.samples);
    let (mut area, mut peak, mut last_t) = (0.0f64, 0.0f64, 0u64);
    let mut next_sample = 0usize;
    let samples = config.samples.max(2);
    let mut next_job = 0usize;

    loop {
        let next_arrival = all_jobs.get(next_job).map(|j| j.arrival);
        let next_departure = runs.departures.peek().map(|d| d.0 .0);
        let t = match (next_arrival, next_departure) {
            (None, None) => break,
            (Some(a), None) => a,
            (None, Some(d)) => d,
            (Some(a), Some(d)) => a.min(d),
        };
        // The state held from last_t until t.
        let allocated = 100.0 * placer.mirror().cluster.gpu_allocated() as f64 / capacity as f64;
        if last_t < end_of_arrivals {
            area += allocated * (t.min(end_of_arrivals) - last_t) as f64;
        }
        peak = peak.max(allocated);
        while next_sample < samples {
            let at = end_of_arrivals * next_sample as u64 / (samples as u64 - 1);
            if at > t || (at == t && next_sample + 1 < samples) {
                break;
            }
            let view = &mut placer.mirror_mut().cluster;
            let idle = (capacity - view.gpu_allocated()) as f64;
            let frag = if idle > 0.0 {
                100.0 * view.fragmentation() / idle
            } else {
                0.0
            };
            timeline.push(Sample {
                t: at as f64 / 1000.0,
                allocation_pct: allocated,
                fragmentation_pct: frag,
                waiting: waiting.iter().map(|j| j.tasks.len()).sum(),
            });
            next_sample += 1;
        }
        last_t = t;

        let mut freed: Vec<usize> = Vec::new();
        while let Some(Reverse((at, task, e))) = runs.departures.peek().copied() {
            if at != t {
                break;
            }
            runs.departures.pop();
            if e == runs.epoch[task] && runs.running[task] {
                if let Some(n) = placer.mirror().node_of(task) {
                    freed.push(n);
                }
                placer.release(task);
                runs.running[task] = false;
            }
        }
        if !freed.is_empty() {
            freed.sort_unstable();
            freed.dedup();
            let mut still = Vec::with_capacity(waiting.len());
            for job in std::mem::take(&mut waiting) {
                // A job that did not fit before can fit now only if one of
                // its tasks fits a node that was freed.
                let could = job
                    .tasks
                    .iter()
                    .any(|task| freed.iter().any(|n| placer.mirror().fits_on(*task, *n)));
                if could && runs.start(&job, t, placer.as_mut()) {
                    after_waiting += 1;
                } else {
                    still.push(job);
                }
            }
            waiting = still;
        }
        while let Some(job) = all_jobs.get(next_job).filter(|j| j.arrival == t) {
            next_job += 1;
            if runs.start(job, t, placer.as_mut()) {
                on_arrival += 1;
            } else {
                waiting.push(Job {
                    tasks: job.tasks.clone(),
                    arrival: job.arrival,
                });
            }
        }
        // Evicted tasks wait again, from now, behind those already waiting.
        waiting.extend(runs.evicted.drain(..).map(|task| Job {
            tasks: vec![task],
            arrival: t,
        }));
    }

    let Runs {
        mut waits,
        preemptions,
        decisions,
        decision_time,
        ..
    } = runs;
    waits.sort_by(f64::total_cmp);
    let n = waits.len().max(1) as f64;
    let mean_frag =
        timeline.iter().map(|s| s.fragmentation_pct).sum::<f64>() / timeline.len().max(1) as f64;
    OnlineResult {
        scheduler: scheduler.name().to_string(),
        seed,
        time_scale: scale,
        inflate: config.inflate,
        offered_load,
        tasks: pods.len(),
        gangs,
        placed_on_arrival: on_arrival,
        placed_after_waiting: after_waiting,
        never_placed: waiting.iter().map(|j| j.tasks.len()).sum(),
        preemptions,
        mean_allocation_pct: area / end_of_arrivals as f64,
        peak_allocation_pct: peak,
        mean_fragmentation_pct: mean_frag,
        wait_seconds: WaitStats {
            mean: waits.iter().sum::<f64>() / n,
            p50: percentile(&waits, 0.5),
            p95: percentile(&waits, 0.95),
            p99: percentile(&waits, 0.99),
            max: waits.last().copied().unwrap_or(0.0),
        },
        timeline,
        decisions_per_sec: decisions as f64 / decision_time.max(1e-9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Pod;

    use crate::trace::t4_node as node;

    fn task(name: &str, gpus: u32, qos: &str, created: u64, duration: u64) -> TimedPod {
        TimedPod {
            name: name.into(),
            pod: Pod {
                cpu_milli: 1000,
                memory_mib: 1024,
                num_gpu: gpus,
                gpu_milli: if gpus == 0 { 0 } else { 1000 },
                gpu_spec: vec![],
            },
            qos: qos.into(),
            created,
            duration,
        }
    }

    fn config(time_scale: f64) -> OnlineConfig {
        OnlineConfig {
            time_scale,
            inflate: 0.0,
            samples: 11,
        }
    }

    #[test]
    fn a_task_that_does_not_fit_waits_for_one_to_leave() {
        let nodes = [node("n0", 1)];
        let pods = [task("a", 1, "LS", 1000, 100), task("b", 1, "LS", 1010, 50)];
        for scheduler in [
            Scheduler::Policy(Policy::Fgd),
            Scheduler::Policy(Policy::Atrium),
        ] {
            let r = replay(&nodes, &pods, scheduler, config(1.0), 42);
            assert_eq!((r.placed_on_arrival, r.placed_after_waiting), (1, 1));
            assert_eq!(r.never_placed, 0);
            // b waits from 1010 until a leaves at 1100.
            assert_eq!(r.wait_seconds.max, 90.0);
            assert_eq!(r.wait_seconds.mean, 45.0);
            // The one GPU is busy over the whole arrival span.
            assert_eq!(r.mean_allocation_pct, 100.0);
            assert_eq!(r.timeline.len(), 11);
            assert_eq!(r.timeline[5].waiting, 0, "b arrives at the span's end");
        }
        // Arrivals twice as close: b arrives at 5 s, waits 95 s.
        let r = replay(
            &nodes,
            &pods,
            Scheduler::Policy(Policy::Fgd),
            config(0.5),
            42,
        );
        assert_eq!(r.wait_seconds.max, 95.0);
        assert_eq!(r.time_scale, 0.5);
    }

    #[test]
    fn a_task_no_node_can_hold_is_reported_never_placed() {
        let nodes = [node("n0", 2)];
        let pods = [task("big", 4, "LS", 0, 10), task("ok", 2, "LS", 5, 10)];
        for scheduler in [Scheduler::Policy(Policy::Atrium), Scheduler::Fleet] {
            let r = replay(&nodes, &pods, scheduler, config(1.0), 1);
            assert_eq!(r.never_placed, 1, "{scheduler:?}");
            assert_eq!(r.placed_on_arrival, 1, "{scheduler:?}");
        }
    }

    #[test]
    fn the_fleet_preempts_lower_qos_and_reruns_the_evicted_task() {
        let nodes = [node("n0", 1)];
        let pods = [task("be", 1, "BE", 0, 100), task("ls", 1, "LS", 10, 30)];
        let r = replay(&nodes, &pods, Scheduler::Fleet, config(1.0), 1);
        assert_eq!(r.preemptions, 1);
        assert_eq!(r.placed_on_arrival, 2, "ls placed at once by evicting be");
        // be waits again from 10 until ls leaves at 40, then reruns.
        assert_eq!(r.placed_after_waiting, 1);
        assert_eq!(r.wait_seconds.max, 30.0);
        assert_eq!(r.never_placed, 0);
        // A policy replay never evicts: ls waits instead.
        let r = replay(
            &nodes,
            &pods,
            Scheduler::Policy(Policy::Fgd),
            config(1.0),
            1,
        );
        assert_eq!((r.preemptions, r.wait_seconds.max), (0, 90.0));
    }

    #[test]
    fn a_gang_is_placed_whole_or_waits_whole() {
        let nodes = [node("n0", 1), node("n1", 1)];
        // w1 and w2: the same request in the same second, a gang of two;
        // only one GPU is free when they arrive.
        let pods = [
            task("hold", 1, "LS", 0, 100),
            task("w1", 1, "BE", 10, 20),
            task("w2", 1, "BE", 10, 20),
        ];
        let r = replay(&nodes, &pods, Scheduler::Fleet, config(1.0), 1);
        assert_eq!(r.gangs, 1);
        assert_eq!(r.preemptions, 0, "BE may not evict LS");
        assert_eq!(r.placed_after_waiting, 1, "the gang, once, as one");
        assert_eq!(r.wait_seconds.max, 90.0);
        let last = r.timeline.last().map(|s| s.waiting);
        assert_eq!(last, Some(0), "sampled before the gang arrives");
        // Half the GPUs held over the span, never the gang's half alone.
        assert_eq!(r.mean_allocation_pct, 50.0);
    }

    #[test]
    fn tasks_sharing_a_name_are_still_two_tasks_to_the_fleet() {
        // A pod list may repeat a name (a sampled trace, a hand-made one):
        // the second "x" must not wait for the first as if it were it.
        let nodes = [node("n0", 2)];
        let mut second = task("x", 1, "LS", 1, 100);
        second.pod.cpu_milli = 2000;
        let pods = [
            task("x", 1, "LS", 0, 10),
            second,
            task("y", 2, "LS", 50, 10),
        ];
        let r = replay(&nodes, &pods, Scheduler::Fleet, config(1.0), 1);
        assert_eq!((r.placed_on_arrival, r.placed_after_waiting), (2, 1));
        // y waits from 50 until the second x leaves at 101.
        assert_eq!(r.wait_seconds.max, 51.0);
        assert_eq!(r.never_placed, 0);
    }

    #[test]
    fn inflation_adds_copies_until_the_gpus_asked_reach_the_multiple() {
        let pods = [task("a", 1, "LS", 0, 10), task("c", 0, "BE", 5, 10)];
        let mut rng = StdRng::seed_from_u64(7);
        let all = inflated(&pods, 4000, 2.0, &mut rng);
        assert_eq!(all[..2], pods[..], "the trace first, unchanged");
        let gpus: u64 = all.iter().map(|p| p.pod.gpu_request()).sum();
        assert_eq!(gpus, 8000);
        assert!(all[2..].iter().all(|p| p.name.contains("-copy")));
        let names: std::collections::BTreeSet<&str> = all.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), all.len(), "copies have their own names");
        // Already past the multiple: nothing added, nothing dropped.
        assert_eq!(inflated(&pods, 4000, 0.1, &mut rng).len(), 2);
        let r = replay(
            &[node("n0", 4)],
            &pods,
            Scheduler::Policy(Policy::Atrium),
            OnlineConfig {
                time_scale: 1.0,
                inflate: 2.0,
                samples: 3,
            },
            7,
        );
        assert_eq!(r.tasks, all.len(), "the replay draws the same copies");
        assert_eq!(r.placed_on_arrival + r.placed_after_waiting, r.tasks);
    }
}
