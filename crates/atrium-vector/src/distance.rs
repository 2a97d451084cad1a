//! Distances between vectors, smaller is closer for every metric so the
//! index compares one way. Vectors are stored padded with zeros to a
//! multiple of `LANES`, so the loops below run in whole chunks that the
//! compiler turns into AVX2 fused multiply-adds (the workspace builds for
//! AVX2, see `.cargo/config.toml`); zeros add nothing to any metric.

use serde::{Deserialize, Serialize};

/// Floats per chunk: one AVX2 register.
pub const LANES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// 1 − cosine similarity; vectors are normalised when stored.
    Cosine,
    /// The negated inner product.
    Dot,
    /// Squared Euclidean distance.
    L2,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Dot => "dot",
            Metric::L2 => "l2",
        }
    }

    /// The distance of two padded vectors.
    #[inline]
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::Cosine => 1.0 - dot(a, b),
            Metric::Dot => -dot(a, b),
            Metric::L2 => squared_l2(a, b),
        }
    }

    /// The similarity score a caller sees (higher is closer), from a
    /// distance: cosine similarity, the inner product, or the Euclidean
    /// distance itself for L2 (where lower is closer, as Qdrant reports it).
    pub fn score(self, distance: f32) -> f32 {
        match self {
            Metric::Cosine => 1.0 - distance,
            Metric::Dot => -distance,
            Metric::L2 => distance.max(0.0).sqrt(),
        }
    }
}

/// `dim` rounded up to whole chunks.
pub fn padded(dim: usize) -> usize {
    dim.div_ceil(LANES) * LANES
}

/// `v` padded with zeros to `padded(v.len())`, normalised to unit length
/// when `normalise` (a zero vector stays zero).
pub fn prepare(v: &[f32], normalise: bool) -> Vec<f32> {
    let mut out = vec![0.0; padded(v.len())];
    out[..v.len()].copy_from_slice(v);
    if normalise {
        let norm = dot(&out, &out).sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|x| *x /= norm);
        }
    }
    out
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for k in 0..LANES {
            acc[k] = ca[k].mul_add(cb[k], acc[k]);
        }
    }
    acc.iter().sum()
}

#[inline]
pub fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for k in 0..LANES {
            let d = ca[k] - cb[k];
            acc[k] = d.mul_add(d, acc[k]);
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_agree_with_their_definitions_on_unpadded_lengths() {
        let a = prepare(&[3.0, 4.0, 0.0, 1.0, 2.0], false);
        let b = prepare(&[1.0, 0.0, 2.0, 1.0, -1.0], false);
        assert_eq!(a.len(), 8);
        assert_eq!(dot(&a, &b), 3.0 + 1.0 - 2.0);
        assert_eq!(squared_l2(&a, &b), 4.0 + 16.0 + 4.0 + 0.0 + 9.0);
        let (na, nb) = (prepare(&[3.0, 4.0], true), prepare(&[4.0, 3.0], true));
        let cos = 24.0 / 25.0;
        assert!((Metric::Cosine.distance(&na, &nb) - (1.0 - cos)).abs() < 1e-6);
        assert!((Metric::Cosine.score(Metric::Cosine.distance(&na, &nb)) - cos).abs() < 1e-6);
        assert_eq!(prepare(&[0.0, 0.0], true), vec![0.0; 8]);
    }
}
