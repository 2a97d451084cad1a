//! FGD's fragmentation measure, as the authors' simulator computes it
//! (`NodeGpuShareFragAmountScore`): for each typical pod shape with
//! popularity p, the idle GPU-milli of a node that shape could not use
//! there, weighted by p, summed over shapes.
//!
//! A shape "cannot use" idle GPU capacity when the node cannot host it at
//! all (too little CPU, wrong GPU model, too few GPUs with enough free
//! share) — then all idle GPU-milli count — or, when it can, the GPUs whose
//! free share is below what the shape asks. CPU-only shapes count all idle
//! GPU-milli (they can never use it), exactly as the reference does.

use std::collections::HashMap;

use crate::trace::Pod;

/// A pod shape that stands for many pods, with its share of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub cpu_milli: u32,
    pub num_gpu: u32,
    pub gpu_milli: u32,
    /// Bit i set: GPU model i is acceptable (all set when unrestricted).
    pub models: u64,
    pub popularity: f64,
}

/// The typical shapes of a workload: shapes (CPU, GPU count, GPU share,
/// GPU models; memory is not part of a shape) sorted by frequency, taken
/// one at a time until they cover `threshold_pct` of the pods, popularities
/// renormalised to sum to 1 — the reference's `GetTypicalPods` as its
/// experiments configure it (CPU-only pods included, a 95% threshold,
/// `podIncreaseStep: 1`; the function's own default step of 10 is not what
/// the paper ran).
pub fn typical_shapes(
    pods: &[Pod],
    model_index: &dyn Fn(&str) -> Option<usize>,
    threshold_pct: f64,
) -> Vec<Shape> {
    let mut counts: HashMap<(u32, u32, u32, u64), f64> = HashMap::new();
    for p in pods {
        let models = if p.gpu_spec.is_empty() {
            u64::MAX
        } else {
            p.gpu_spec
                .iter()
                .filter_map(|m| model_index(m))
                .fold(0u64, |acc, i| acc | (1 << i))
        };
        *counts
            .entry((p.cpu_milli, p.num_gpu, p.gpu_milli, models))
            .or_default() += 1.0;
    }
    let total = pods.len() as f64;
    let mut sorted: Vec<((u32, u32, u32, u64), f64)> = counts.into_iter().collect();
    // Most frequent first; ties in a fixed order so runs are reproducible.
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let expected = threshold_pct / 100.0 * total;
    let mut taken = 0usize;
    let mut covered = 0.0;
    while covered < expected && taken < sorted.len() {
        covered += sorted[taken].1;
        taken += 1;
    }
    sorted[..taken]
        .iter()
        .map(|((cpu_milli, num_gpu, gpu_milli, models), n)| Shape {
            cpu_milli: *cpu_milli,
            num_gpu: *num_gpu,
            gpu_milli: *gpu_milli,
            models: *models,
            popularity: n / covered,
        })
        .collect()
}

/// The fragmentation (GPU-milli) of a node with `cpu_left` CPU, GPUs of
/// model `model` (None: CPU-only node) and `gpu_left` free milli per GPU.
pub fn node_fragmentation(
    cpu_left: u32,
    model: Option<usize>,
    gpu_left: &[u16],
    shapes: &[Shape],
) -> f64 {
    let total: u64 = gpu_left.iter().map(|g| u64::from(*g)).sum();
    if total == 0 {
        return 0.0;
    }
    let total = total as f64;
    let mut frag = 0.0;
    for s in shapes {
        if s.gpu_milli == 0 {
            frag += s.popularity * total;
            continue;
        }
        let accessible = model.is_some_and(|m| s.models & (1 << m) != 0);
        if !accessible {
            frag += s.popularity * total;
            continue;
        }
        let fitting = gpu_left
            .iter()
            .filter(|g| u32::from(**g) >= s.gpu_milli)
            .count() as u32;
        if fitting >= s.num_gpu && cpu_left >= s.cpu_milli {
            let unusable: u64 = gpu_left
                .iter()
                .filter(|g| u32::from(**g) < s.gpu_milli)
                .map(|g| u64::from(*g))
                .sum();
            frag += s.popularity * unusable as f64;
        } else {
            frag += s.popularity * total;
        }
    }
    frag
}

/// What the workload pairs with each GPU it asks for: CPU and memory per
/// GPU, over its GPU pods. A node whose idle GPUs lack this much CPU or
/// memory will likely strand them; FGD's shapes see that only as a cliff
/// (a shape fits or not), this sees it as a slope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pairing {
    pub cpu_milli_per_gpu: f64,
    pub memory_mib_per_gpu: f64,
}

impl Pairing {
    pub fn of(pods: &[Pod]) -> Pairing {
        let t = Totals::of(pods);
        Pairing::ratio(t.gpu_pods_cpu, t.gpu_pods_memory, t.gpus)
    }

    /// What a cluster offers beside each of its GPUs: its CPU and memory
    /// over its GPU count (all nodes', CPU-only ones included, since
    /// CPU-only work can go there).
    pub fn supply(cpu_milli: u64, memory_mib: u64, gpus: u64) -> Pairing {
        Pairing::ratio(cpu_milli as f64, memory_mib as f64, gpus as f64)
    }

    /// The GPU pods' pairing, except for a resource the whole workload
    /// (CPU-only pods included) asks more of per GPU than `supply` offers.
    /// That resource runs out before the GPUs do, so an idle GPU gets used
    /// only where its node keeps its share of all the work's demand, not
    /// just its GPU pods': for that resource the whole workload's rate is
    /// the one that strands. (On the FGD authors' cpu250 and cpu300, where
    /// the workload asks 17.7 and 19.6 cores per GPU of a cluster with
    /// 17.2, this is +1.0 and +0.5 points of allocation; on every other
    /// trace nothing is scarce and nothing changes.)
    pub fn binding(pods: &[Pod], supply: Pairing) -> Pairing {
        let t = Totals::of(pods);
        let mut pairing = Pairing::ratio(t.gpu_pods_cpu, t.gpu_pods_memory, t.gpus);
        let whole = Pairing::ratio(t.cpu, t.memory, t.gpus);
        if whole.cpu_milli_per_gpu > supply.cpu_milli_per_gpu {
            pairing.cpu_milli_per_gpu = whole.cpu_milli_per_gpu;
        }
        if whole.memory_mib_per_gpu > supply.memory_mib_per_gpu {
            pairing.memory_mib_per_gpu = whole.memory_mib_per_gpu;
        }
        pairing
    }

    /// `cpu` and `memory` per GPU of `gpus`; nothing where there is none.
    fn ratio(cpu: f64, memory: f64, gpus: f64) -> Pairing {
        if gpus == 0.0 {
            return Pairing {
                cpu_milli_per_gpu: 0.0,
                memory_mib_per_gpu: 0.0,
            };
        }
        Pairing {
            cpu_milli_per_gpu: cpu / gpus,
            memory_mib_per_gpu: memory / gpus,
        }
    }

    /// (what the workload pairs with one GPU, what is left) for CPU and
    /// for memory; a resource the workload does not pair with GPUs is left
    /// out.
    fn paired(&self, cpu_left: u32, mem_left: u32) -> impl Iterator<Item = (f64, f64)> {
        [
            (self.cpu_milli_per_gpu, cpu_left),
            (self.memory_mib_per_gpu, mem_left),
        ]
        .into_iter()
        .filter(|(per_gpu, _)| *per_gpu > 0.0)
        .map(|(per_gpu, left)| (per_gpu, f64::from(left)))
    }

    /// Idle GPU-milli on a node that lacks the CPU or memory to go with it
    /// (the larger of the two shortfalls, in GPU-milli).
    pub fn stranded(&self, cpu_left: u32, mem_left: u32, gpu_left: &[u16]) -> f64 {
        let idle_gpus = idle_gpus(gpu_left);
        self.paired(cpu_left, mem_left)
            .map(|(per_gpu, left)| (idle_gpus * per_gpu - left).max(0.0) / per_gpu * 1000.0)
            .fold(0.0, f64::max)
    }

    /// CPU and memory left beyond what the idle GPUs will want, each in
    /// GPUs' worth, summed: how much room a node keeps for work that asks
    /// no GPU. Negative where the idle GPUs are short of them.
    pub fn surplus(&self, cpu_left: u32, mem_left: u32, gpu_left: &[u16]) -> f64 {
        let idle_gpus = idle_gpus(gpu_left);
        self.paired(cpu_left, mem_left)
            .map(|(per_gpu, left)| left / per_gpu - idle_gpus)
            .sum()
    }
}

/// What a workload asks in all, in one pass: its GPUs, its GPU pods' CPU
/// and memory, and every pod's.
struct Totals {
    gpus: f64,
    gpu_pods_cpu: f64,
    gpu_pods_memory: f64,
    cpu: f64,
    memory: f64,
}

impl Totals {
    fn of(pods: &[Pod]) -> Totals {
        let mut t = Totals {
            gpus: 0.0,
            gpu_pods_cpu: 0.0,
            gpu_pods_memory: 0.0,
            cpu: 0.0,
            memory: 0.0,
        };
        for p in pods {
            let (cpu, memory) = (f64::from(p.cpu_milli), f64::from(p.memory_mib));
            t.cpu += cpu;
            t.memory += memory;
            if p.num_gpu > 0 {
                t.gpus += p.gpu_request() as f64 / 1000.0;
                t.gpu_pods_cpu += cpu;
                t.gpu_pods_memory += memory;
            }
        }
        t
    }
}

fn idle_gpus(gpu_left: &[u16]) -> f64 {
    gpu_left.iter().map(|g| f64::from(*g)).sum::<f64>() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(cpu: u32, n: u32, milli: u32, p: f64) -> Shape {
        Shape {
            cpu_milli: cpu,
            num_gpu: n,
            gpu_milli: milli,
            models: u64::MAX,
            popularity: p,
        }
    }

    #[test]
    fn matches_the_reference_cases() {
        // A half-used GPU is a fragment for a whole-GPU shape, not for a
        // quarter-GPU shape; a CPU shape counts all idle GPU.
        let shapes = [
            shape(1000, 1, 1000, 0.5),
            shape(1000, 1, 250, 0.25),
            shape(1000, 0, 0, 0.25),
        ];
        let f = node_fragmentation(8000, Some(0), &[1000, 500], &shapes);
        assert!(
            (f - (0.5 * 500.0 + 0.25 * 0.0 + 0.25 * 1500.0)).abs() < 1e-9,
            "{f}"
        );
        // Without CPU for the shapes, every idle GPU-milli is a fragment.
        let f = node_fragmentation(0, Some(0), &[1000, 500], &shapes);
        assert!((f - 1500.0).abs() < 1e-9, "{f}");
        // Nothing idle, nothing fragmented.
        assert_eq!(node_fragmentation(8000, Some(0), &[0, 0], &shapes), 0.0);
        // A shape restricted to another model cannot use this node at all.
        let other = [Shape {
            models: 0b10,
            ..shape(1000, 1, 500, 1.0)
        }];
        assert_eq!(node_fragmentation(8000, Some(0), &[1000], &other), 1000.0);
    }

    #[test]
    fn stranding_is_the_shortfall_of_cpu_or_memory_in_gpu_milli() {
        let pod = |cpu, mem, n, milli| Pod {
            cpu_milli: cpu,
            memory_mib: mem,
            num_gpu: n,
            gpu_milli: milli,
            gpu_spec: vec![],
        };
        // CPU pods do not count; 2 GPUs asked with 16 CPU and 64 GiB.
        let pairing = Pairing::of(&[
            pod(12000, 65536, 1, 1000),
            pod(2000, 0, 1, 500),
            pod(2000, 0, 1, 500),
            pod(50000, 1, 0, 0),
        ]);
        assert_eq!(pairing.cpu_milli_per_gpu, 8000.0);
        assert_eq!(pairing.memory_mib_per_gpu, 32768.0);
        // Two idle GPUs want 16 CPU: with 12 left, half a GPU is stranded.
        assert_eq!(pairing.stranded(12000, 1 << 20, &[1000, 1000]), 500.0);
        // Memory short by a whole GPU's worth dominates.
        assert_eq!(pairing.stranded(16000, 32768, &[1000, 1000]), 1000.0);
        assert_eq!(pairing.stranded(16000, 65536, &[1000, 1000]), 0.0);
        // 24 CPU and 64 GiB beside two idle GPUs: one GPU's worth of CPU
        // to spare, none of memory; one idle GPU less spares one more each.
        assert_eq!(pairing.surplus(24000, 65536, &[1000, 1000]), 1.0);
        assert_eq!(pairing.surplus(24000, 65536, &[1000, 0]), 3.0);
        assert_eq!(pairing.surplus(0, 0, &[1000]), -2.0);
    }

    #[test]
    fn a_resource_the_workload_asks_beyond_supply_pairs_at_the_whole_workloads_rate() {
        let pod = |cpu, mem, n| Pod {
            cpu_milli: cpu,
            memory_mib: mem,
            num_gpu: n,
            gpu_milli: if n > 0 { 1000 } else { 0 },
            gpu_spec: vec![],
        };
        // GPU pods ask 8 CPU and 32 GiB per GPU; with the CPU-only pod, the
        // whole workload asks 20 CPU and 33 GiB per GPU.
        let pods = [
            pod(8000, 32768, 1),
            pod(8000, 32768, 1),
            pod(24000, 2048, 0),
        ];
        let gpu_pods = Pairing::of(&pods);
        // A cluster with 24 CPU and 64 GiB per GPU has enough of both.
        let roomy = Pairing::supply(48_000, 131_072, 2);
        assert_eq!(Pairing::binding(&pods, roomy), gpu_pods);
        // With 16 CPU per GPU, CPU runs out first: it pairs at 20 per GPU;
        // memory, still enough, at the GPU pods' rate.
        let short = Pairing::supply(32_000, 131_072, 2);
        let binding = Pairing::binding(&pods, short);
        assert_eq!(binding.cpu_milli_per_gpu, 20_000.0);
        assert_eq!(binding.memory_mib_per_gpu, 32768.0);
        // No GPU at all: nothing to pair, nothing divides by zero.
        let cpu_only = [pod(1000, 1, 0)];
        assert_eq!(Pairing::binding(&cpu_only, short), Pairing::of(&[]));
        assert_eq!(Pairing::supply(1, 1, 0), Pairing::of(&[]));
    }

    #[test]
    fn typical_shapes_cover_the_threshold_and_sum_to_one() {
        let mut pods = Vec::new();
        for i in 0..30u32 {
            for _ in 0..(30 - i) {
                pods.push(Pod {
                    cpu_milli: 1000 * (i + 1),
                    memory_mib: 1,
                    num_gpu: 1,
                    gpu_milli: 1000,
                    gpu_spec: vec![],
                });
            }
        }
        // 30 shapes with 30, 29, ... 1 pods (465): the first nine hold 234,
        // the first ten 255, the first eleven 275.
        let shapes = typical_shapes(&pods, &|_| Some(0), 51.0);
        assert_eq!(shapes.len(), 10, "ten are the fewest that cover 51%");
        let shapes = typical_shapes(&pods, &|_| Some(0), 59.0);
        assert_eq!(shapes.len(), 11, "taken one at a time until 59% is covered");
        assert!((shapes.iter().map(|s| s.popularity).sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(shapes[0].cpu_milli, 1000, "most frequent first");
    }
}
