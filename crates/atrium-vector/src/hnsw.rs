//! Hierarchical navigable small-world graphs (Malkov & Yashunin, 2016), as
//! hnswlib builds them: layer 0 holds every point with up to `2·M` links,
//! each upper layer a geometric sample with up to `M`; links are chosen by
//! the paper's heuristic (a candidate joins only if it is closer to the new
//! point than to every neighbour already chosen), which keeps the graph
//! navigable across clusters.
//!
//! Points are dense `u32` slots; deleting marks a slot dead (it still
//! routes searches, as in hnswlib, but is never returned). The caller maps
//! its own ids onto slots.
//!
//! A search takes a `Scratch` of its own (visited marks and heaps), so
//! searches share the index read-only; inserts need it exclusively.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::distance::{padded, Metric};

/// A distance that orders totally (NaN cannot arise from finite inputs,
/// and the callers refuse non-finite vectors).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dist(f32);

impl Eq for Dist {}

impl PartialOrd for Dist {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dist {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Links per point on the upper layers; `2·m` on layer 0.
    pub m: usize,
    pub ef_construction: usize,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            m: 16,
            ef_construction: 200,
            seed: 100,
        }
    }
}

/// Per-search working memory.
#[derive(Debug, Default)]
pub struct Scratch {
    visited: Vec<u32>,
    epoch: u32,
    candidates: BinaryHeap<Reverse<(Dist, u32)>>,
    results: BinaryHeap<(Dist, u32)>,
}

impl Scratch {
    fn start(&mut self, slots: usize) {
        if self.visited.len() < slots {
            self.visited.resize(slots, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.iter_mut().for_each(|v| *v = 0);
            self.epoch = 1;
        }
        self.candidates.clear();
        self.results.clear();
    }

    /// Marks `slot` visited; false if it already was.
    #[inline]
    fn visit(&mut self, slot: u32) -> bool {
        let v = &mut self.visited[slot as usize];
        if *v == self.epoch {
            false
        } else {
            *v = self.epoch;
            true
        }
    }
}

#[derive(Debug)]
pub struct Hnsw {
    metric: Metric,
    dim: usize,
    stride: usize,
    params: Params,
    vectors: Vec<f32>,
    /// Layer 0: per slot, a count then `2·m` link slots.
    base: Vec<u32>,
    /// Layers 1..=level of each slot: per layer a count then `m` slots.
    upper: Vec<Vec<u32>>,
    levels: Vec<u8>,
    dead: Vec<bool>,
    live: usize,
    entry: Option<u32>,
    top: u8,
    rng: StdRng,
    level_scale: f64,
}

impl Hnsw {
    pub fn new(metric: Metric, dim: usize, params: Params) -> Hnsw {
        let m = params.m.max(2);
        Hnsw {
            metric,
            dim,
            stride: padded(dim),
            params: Params { m, ..params },
            vectors: Vec::new(),
            base: Vec::new(),
            upper: Vec::new(),
            levels: Vec::new(),
            dead: Vec::new(),
            live: 0,
            entry: None,
            top: 0,
            rng: StdRng::seed_from_u64(params.seed),
            level_scale: 1.0 / (m as f64).ln(),
        }
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Slots ever used (dead included).
    pub fn slots(&self) -> usize {
        self.levels.len()
    }

    pub fn live(&self) -> usize {
        self.live
    }

    pub fn is_dead(&self, slot: u32) -> bool {
        self.dead.get(slot as usize).copied().unwrap_or(true)
    }

    /// The stored (padded, for cosine normalised) vector of a slot.
    pub fn vector(&self, slot: u32) -> &[f32] {
        let at = slot as usize * self.stride;
        &self.vectors[at..at + self.stride]
    }

    fn m0(&self) -> usize {
        2 * self.params.m
    }

    fn links(&self, slot: u32, layer: u8) -> &[u32] {
        if layer == 0 {
            let width = self.m0() + 1;
            let at = slot as usize * width;
            let n = self.base[at] as usize;
            &self.base[at + 1..at + 1 + n]
        } else {
            let width = self.params.m + 1;
            let at = (layer as usize - 1) * width;
            let u = &self.upper[slot as usize];
            let n = u[at] as usize;
            &u[at + 1..at + 1 + n]
        }
    }

    fn set_links(&mut self, slot: u32, layer: u8, links: &[u32]) {
        let m0 = self.m0();
        let (store, at, cap) = if layer == 0 {
            (&mut self.base, slot as usize * (m0 + 1), m0)
        } else {
            let width = self.params.m + 1;
            (
                &mut self.upper[slot as usize],
                (layer as usize - 1) * width,
                self.params.m,
            )
        };
        let n = links.len().min(cap);
        store[at] = n as u32;
        store[at + 1..at + 1 + n].copy_from_slice(&links[..n]);
    }

    #[inline]
    fn dist_to(&self, query: &[f32], slot: u32) -> f32 {
        self.metric.distance(query, self.vector(slot))
    }

    fn random_level(&mut self) -> u8 {
        let u: f64 = self.rng.gen_range(f64::MIN_POSITIVE..1.0);
        ((-u.ln() * self.level_scale) as usize).min(31) as u8
    }

    /// Adds a prepared vector (see `distance::prepare`) and returns its slot.
    pub fn insert(&mut self, vector: &[f32], scratch: &mut Scratch) -> u32 {
        let slot = self.levels.len() as u32;
        let level = self.random_level();
        self.vectors.extend_from_slice(&vector[..self.stride]);
        self.base.resize(self.base.len() + self.m0() + 1, 0);
        self.upper
            .push(vec![0; level as usize * (self.params.m + 1)]);
        self.levels.push(level);
        self.dead.push(false);
        self.live += 1;
        let Some(mut ep) = self.entry else {
            self.entry = Some(slot);
            self.top = level;
            return slot;
        };
        let query = self.vector(slot).to_vec();
        for layer in (level.saturating_add(1)..=self.top).rev() {
            ep = self.greedy(&query, ep, layer);
        }
        for layer in (0..=level.min(self.top)).rev() {
            let found = self.search_layer(
                &query,
                ep,
                self.params.ef_construction,
                layer,
                &|_| true,
                scratch,
            );
            let chosen = self.select(&found, self.params.m);
            self.set_links(slot, layer, &chosen);
            for &n in &chosen {
                self.link_back(n, slot, layer);
            }
            if let Some(&(_, closest)) = found.first() {
                ep = closest;
            }
        }
        if level > self.top {
            self.top = level;
            self.entry = Some(slot);
        }
        slot
    }

    /// Adds `new` to `n`'s links on `layer`, re-choosing them by the
    /// heuristic when full.
    fn link_back(&mut self, n: u32, new: u32, layer: u8) {
        let cap = if layer == 0 { self.m0() } else { self.params.m };
        let current = self.links(n, layer);
        if current.len() < cap {
            let mut grown = current.to_vec();
            grown.push(new);
            self.set_links(n, layer, &grown);
            return;
        }
        let base = self.vector(n);
        let mut candidates: Vec<(f32, u32)> = current
            .iter()
            .chain(std::iter::once(&new))
            .map(|&c| (self.metric.distance(base, self.vector(c)), c))
            .collect();
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
        let chosen = self.select(&candidates, cap);
        self.set_links(n, layer, &chosen);
    }

    /// The heuristic: of candidates sorted nearest first, keep one only if
    /// it is nearer to the point than to every one kept, up to `m`.
    fn select(&self, sorted: &[(f32, u32)], m: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for &(d, c) in sorted {
            if kept.len() >= m {
                break;
            }
            let v = self.vector(c);
            if kept
                .iter()
                .all(|&k| self.metric.distance(v, self.vector(k)) > d)
            {
                kept.push(c);
            }
        }
        kept
    }

    /// Walks `layer` from `ep` to the nearest point it can reach greedily.
    fn greedy(&self, query: &[f32], mut ep: u32, layer: u8) -> u32 {
        let mut best = self.dist_to(query, ep);
        loop {
            let mut moved = false;
            for &n in self.links(ep, layer) {
                let d = self.dist_to(query, n);
                if d < best {
                    best = d;
                    ep = n;
                    moved = true;
                }
            }
            if !moved {
                return ep;
            }
        }
    }

    /// The `ef` nearest points to `query` on `layer` that `keep` accepts
    /// (and are alive), nearest first. Rejected points still route.
    fn search_layer(
        &self,
        query: &[f32],
        ep: u32,
        ef: usize,
        layer: u8,
        keep: &dyn Fn(u32) -> bool,
        s: &mut Scratch,
    ) -> Vec<(f32, u32)> {
        s.start(self.slots());
        let d = Dist(self.dist_to(query, ep));
        s.visit(ep);
        s.candidates.push(Reverse((d, ep)));
        let accept = |slot: u32| !self.dead[slot as usize] && keep(slot);
        if accept(ep) {
            s.results.push((d, ep));
        }
        while let Some(Reverse((Dist(d), c))) = s.candidates.pop() {
            if s.results.len() >= ef && s.results.peek().is_some_and(|w| d > w.0 .0) {
                break;
            }
            for &n in self.links(c, layer) {
                if !s.visit(n) {
                    continue;
                }
                let dn = self.dist_to(query, n);
                let worst = s.results.peek().map_or(f32::INFINITY, |w| w.0 .0);
                if s.results.len() < ef || dn < worst {
                    s.candidates.push(Reverse((Dist(dn), n)));
                    if accept(n) {
                        s.results.push((Dist(dn), n));
                        if s.results.len() > ef {
                            s.results.pop();
                        }
                    }
                }
            }
        }
        let mut out: Vec<(f32, u32)> = s.results.drain().map(|(d, n)| (d.0, n)).collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        out
    }

    /// The `k` nearest live points `keep` accepts, nearest first, with
    /// their distances; `ef` (at least `k`) trades speed for recall.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        keep: &dyn Fn(u32) -> bool,
        scratch: &mut Scratch,
    ) -> Vec<(f32, u32)> {
        let Some(mut ep) = self.entry else {
            return Vec::new();
        };
        for layer in (1..=self.top).rev() {
            ep = self.greedy(query, ep, layer);
        }
        let mut found = self.search_layer(query, ep, ef.max(k), 0, keep, scratch);
        found.truncate(k);
        found
    }

    /// Marks a slot dead: never returned again, still routes.
    pub fn remove(&mut self, slot: u32) {
        if let Some(d) = self.dead.get_mut(slot as usize) {
            if !*d {
                *d = true;
                self.live -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::prepare;

    fn random_points(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect()
    }

    fn exact(points: &[Vec<f32>], q: &[f32], k: usize, metric: Metric) -> Vec<u32> {
        let mut all: Vec<(f32, u32)> = points
            .iter()
            .enumerate()
            .map(|(i, p)| (metric.distance(q, p), i as u32))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        all.iter().take(k).map(|x| x.1).collect()
    }

    fn recall_at_10(metric: Metric) -> f64 {
        let dim = 24;
        let raw = random_points(3000, dim, 1);
        let points: Vec<Vec<f32>> = raw
            .iter()
            .map(|p| prepare(p, metric == Metric::Cosine))
            .collect();
        let mut index = Hnsw::new(metric, dim, Params::default());
        let mut s = Scratch::default();
        for p in &points {
            index.insert(p, &mut s);
        }
        let queries = random_points(100, dim, 2);
        let mut hits = 0;
        for q in &queries {
            let q = prepare(q, metric == Metric::Cosine);
            let truth = exact(&points, &q, 10, metric);
            let got = index.search(&q, 10, 64, &|_| true, &mut s);
            hits += got.iter().filter(|(_, g)| truth.contains(g)).count();
        }
        hits as f64 / 1000.0
    }

    #[test]
    fn finds_nearly_all_true_neighbours_for_every_metric() {
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            let r = recall_at_10(metric);
            // Dot products are not a metric; HNSW is weaker there.
            let floor = if metric == Metric::Dot { 0.8 } else { 0.95 };
            assert!(r >= floor, "{metric:?}: recall@10 {r}");
        }
    }

    #[test]
    fn dead_points_and_rejected_points_are_never_returned() {
        let dim = 8;
        let points = random_points(500, dim, 3);
        let mut index = Hnsw::new(Metric::L2, dim, Params::default());
        let mut s = Scratch::default();
        for p in &points {
            index.insert(&prepare(p, false), &mut s);
        }
        let q = prepare(&points[7], false);
        assert_eq!(index.search(&q, 1, 32, &|_| true, &mut s)[0].1, 7);
        index.remove(7);
        assert_eq!(index.live(), 499);
        let got = index.search(&q, 10, 32, &|slot| slot % 2 == 0, &mut s);
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(|(_, slot)| *slot != 7 && slot % 2 == 0));
        let empty = Hnsw::new(Metric::L2, dim, Params::default());
        assert!(empty.search(&q, 5, 10, &|_| true, &mut s).is_empty());
    }
}
