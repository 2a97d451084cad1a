//! Causal attention of a step's rows over the paged key/value cache.
//!
//! Queries that read the same keys are computed together: the heads of one
//! key/value group (grouped-query attention) for a run of rows of one
//! sequence. Each cache block (16 positions of one head, keys and values
//! each contiguous) is read once per tile and used by every query of the
//! tile while it sits in L1, where a query at a time read every position
//! of its context again for each of its heads and rows. Softmax is online
//! (as flash attention does it): a running maximum and sum per query,
//! rescaled once per block, so no query holds the scores of its context.
//!
//! A query's arithmetic is the same in any tile: it visits its positions in
//! order, a cache block at a time, with the same operations, so a row's
//! result does not depend on the rows beside it in its step (the batching
//! invariant of `llama.rs`).

use rayon::prelude::*;

use crate::fastmath;
use crate::kv::{KvPool, BLOCK_TOKENS};

/// Rows of one sequence a tile takes: with a group's three heads, 24
/// queries' sums and a block's keys and values fit in L1 together.
const TILE_ROWS: usize = 8;

/// The attention heads of a layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What every tile of a step reads (see `attend`).
#[derive(Clone, Copy)]
struct Step<'a> {
    kv: &'a KvPool,
    layer: usize,
    shape: Heads,
    rows: &'a [(usize, usize)],
    blocks: &'a [&'a [usize]],
    q: &'a [f32],
}

/// One tile: rows `rows` (all of one sequence) and the query heads of
/// key/value group `group`.
struct Tile {
    rows: std::ops::Range<usize>,
    group: usize,
}

/// Attention for every row: `rows[r]` is row r's sequence and position,
/// `blocks[s]` sequence s's cache blocks, `q` the rows' queries (`heads` x
/// `head_dim` each, rotated). Returns the rows' attended values in the same
/// layout. Every row's keys and values up to its position must be in `kv`.
pub fn attend(
    kv: &KvPool,
    layer: usize,
    shape: Heads,
    rows: &[(usize, usize)],
    blocks: &[&[usize]],
    q: &[f32],
) -> Vec<f32> {
    let step = Step {
        kv,
        layer,
        shape,
        rows,
        blocks,
        q,
    };
    let width = shape.heads * shape.head_dim;
    let per_group = shape.heads / shape.kv_heads;
    let mut tiles = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let sequence = rows[start].0;
        let mut end = start + 1;
        while end < rows.len() && end - start < TILE_ROWS && rows[end].0 == sequence {
            end += 1;
        }
        tiles.extend((0..shape.kv_heads).map(|group| Tile {
            rows: start..end,
            group,
        }));
        start = end;
    }
    let done: Vec<(Tile, Vec<f32>)> = tiles
        .into_par_iter()
        .map(|tile| {
            let out = attend_tile(&step, &tile);
            (tile, out)
        })
        .collect();
    let mut attended = vec![0.0f32; rows.len() * width];
    let group_width = per_group * shape.head_dim;
    for (tile, out) in done {
        for (r, values) in tile.rows.zip(out.chunks_exact(group_width)) {
            let at = r * width + tile.group * group_width;
            attended[at..at + group_width].copy_from_slice(values);
        }
    }
    attended
}

/// The tile's queries, row-major then head: returns their attended values.
fn attend_tile(step: &Step<'_>, tile: &Tile) -> Vec<f32> {
    let Step {
        kv,
        layer,
        shape,
        rows,
        blocks,
        q,
    } = *step;
    let hd = shape.head_dim;
    let per_group = shape.heads / shape.kv_heads;
    let width = shape.heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let sequence = blocks[rows[tile.rows.start].0];
    // Per query: its position, running maximum and sum, and weighted values.
    let queries: Vec<(usize, &[f32])> = tile
        .rows
        .clone()
        .flat_map(|r| {
            let pos = rows[r].1;
            (0..per_group).map(move |i| {
                let head = tile.group * per_group + i;
                (pos, &q[r * width + head * hd..r * width + (head + 1) * hd])
            })
        })
        .collect();
    let mut max = vec![f32::NEG_INFINITY; queries.len()];
    let mut sum = vec![0.0f32; queries.len()];
    let mut acc = vec![0.0f32; queries.len() * hd];
    let last = queries.iter().map(|(pos, _)| *pos).max().unwrap_or(0);
    let mut transposed = vec![0.0f32; hd * BLOCK_TOKENS];
    for (b, &block) in sequence.iter().enumerate().take(last / BLOCK_TOKENS + 1) {
        let first = b * BLOCK_TOKENS;
        let keys = kv.block_vectors(block, layer, tile.group, false);
        let values = kv.block_vectors(block, layer, tile.group, true);
        // Keys dimension-major, so a query's 16 scores are two vectors of
        // sums over its dimensions.
        for (t, key) in keys.chunks_exact(hd).enumerate() {
            for (d, k) in key.iter().enumerate() {
                transposed[d * BLOCK_TOKENS + t] = *k;
            }
        }
        for (i, &(pos, query)) in queries.iter().enumerate() {
            if pos < first {
                continue;
            }
            let n = (pos - first + 1).min(BLOCK_TOKENS);
            let mut scores = [0.0f32; BLOCK_TOKENS];
            for (qd, keys_d) in query.iter().zip(transposed.chunks_exact(BLOCK_TOKENS)) {
                for (s, k) in scores.iter_mut().zip(keys_d) {
                    *s = qd.mul_add(*k, *s);
                }
            }
            // Slots past the query's position hold other positions' keys.
            for s in &mut scores[n..] {
                *s = f32::NEG_INFINITY;
            }
            for s in &mut scores[..n] {
                *s *= scale;
            }
            let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let acc = &mut acc[i * hd..(i + 1) * hd];
            if block_max > max[i] {
                // exp(-inf) is 0: the first block scales the empty sums by 0.
                let shrink = (max[i] - block_max).exp();
                sum[i] *= shrink;
                for a in acc.iter_mut() {
                    *a *= shrink;
                }
                max[i] = block_max;
            }
            let weights = fastmath::exp16(scores.map(|s| s - max[i]));
            for (p, value) in weights[..n].iter().zip(values.chunks_exact(hd)) {
                sum[i] += p;
                for (a, v) in acc.iter_mut().zip(value) {
                    *a = p.mul_add(*v, *a);
                }
            }
        }
    }
    for (acc, sum) in acc.chunks_exact_mut(hd).zip(&sum) {
        let inverse = 1.0 / sum;
        for a in acc {
            *a *= inverse;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvShape;

    const SHAPE: Heads = Heads {
        heads: 6,
        kv_heads: 2,
        head_dim: 64,
    };

    fn noise(i: usize, salt: usize) -> f32 {
        let h = ((i ^ (salt << 20)) as u32).wrapping_mul(2_654_435_761);
        (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }

    /// One sequence of `len` positions in the cache, and every row's query.
    fn sequence(len: usize) -> (KvPool, Vec<usize>, Vec<f32>) {
        let shape = KvShape {
            layers: 1,
            kv_heads: SHAPE.kv_heads,
            head_dim: SHAPE.head_dim,
        };
        let mut kv = KvPool::new(shape, len.div_ceil(BLOCK_TOKENS));
        let blocks: Vec<usize> = (0..len.div_ceil(BLOCK_TOKENS))
            .filter_map(|_| kv.allocate())
            .collect();
        let hd = SHAPE.head_dim;
        for pos in 0..len {
            for g in 0..SHAPE.kv_heads {
                // Scaled so that some scores are far apart (softmax's max
                // matters) and some close.
                let k: Vec<f32> = (0..hd)
                    .map(|d| 4.0 * noise(pos * 977 + g * 64 + d, 1))
                    .collect();
                let v: Vec<f32> = (0..hd).map(|d| noise(pos * 977 + g * 64 + d, 2)).collect();
                kv.write(blocks[pos / BLOCK_TOKENS], pos % BLOCK_TOKENS, 0, g, &k, &v);
            }
        }
        let q = (0..len * SHAPE.heads * hd).map(|i| noise(i, 3)).collect();
        (kv, blocks, q)
    }

    /// The textbook computation: all scores, their maximum, weights, sum.
    fn reference(
        kv: &KvPool,
        blocks: &[usize],
        pos: usize,
        head: usize,
        query: &[f32],
    ) -> Vec<f32> {
        let group = head / (SHAPE.heads / SHAPE.kv_heads);
        let scale = 1.0 / (SHAPE.head_dim as f64).sqrt();
        let scores: Vec<f64> = (0..=pos)
            .map(|t| {
                let key = kv.vector(blocks[t / BLOCK_TOKENS], t % BLOCK_TOKENS, 0, group, false);
                query
                    .iter()
                    .zip(key)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        let mut out = vec![0.0f64; SHAPE.head_dim];
        for (t, w) in weights.iter().enumerate() {
            let value = kv.vector(blocks[t / BLOCK_TOKENS], t % BLOCK_TOKENS, 0, group, true);
            for (o, v) in out.iter_mut().zip(value) {
                *o += w / sum * f64::from(*v);
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn matches_the_textbook_softmax_and_a_row_is_the_same_alone_or_in_a_tile() {
        let len = 53; // three full blocks and a partial one
        let (kv, blocks, q) = sequence(len);
        let width = SHAPE.heads * SHAPE.head_dim;
        let rows: Vec<(usize, usize)> = (0..len).map(|pos| (0, pos)).collect();
        let together = attend(&kv, 0, SHAPE, &rows, &[&blocks], &q);
        for pos in 0..len {
            let row = &q[pos * width..(pos + 1) * width];
            let alone = attend(&kv, 0, SHAPE, &[(0, pos)], &[&blocks], row);
            let same = alone
                .iter()
                .zip(&together[pos * width..(pos + 1) * width])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "row {pos} differs alone vs among {len}");
            for head in 0..SHAPE.heads {
                let hd = SHAPE.head_dim;
                let want = reference(&kv, &blocks, pos, head, &row[head * hd..(head + 1) * hd]);
                for (a, b) in alone[head * hd..(head + 1) * hd].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "row {pos} head {head}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn rows_of_different_sequences_read_only_their_own_cache() {
        let (kv, blocks, q) = sequence(40);
        let width = SHAPE.heads * SHAPE.head_dim;
        // Sequence 1 is the first 16 positions' block only: a row of it at
        // position 5 must equal sequence 0's row at 5, whatever follows.
        let short = [blocks[0]];
        let rows = [(0, 30), (1, 5), (0, 31)];
        let mut queries = q[30 * width..32 * width].to_vec();
        queries.splice(width..width, q[5 * width..6 * width].iter().copied());
        let mixed = attend(&kv, 0, SHAPE, &rows, &[&blocks, &short], &queries);
        let own = attend(
            &kv,
            0,
            SHAPE,
            &[(0, 5)],
            &[&blocks],
            &q[5 * width..6 * width],
        );
        assert_eq!(&mixed[width..2 * width], &own[..]);
    }
}
