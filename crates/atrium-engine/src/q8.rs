//! Int8 matrix products for Q8_0 weights, many rows in one pass.
//!
//! candle's CPU kernel multiplies one input row at a time and streams the
//! whole weight matrix from memory for each, so a decode step of eight
//! sequences read every weight eight times. Here each weight block is read
//! once per step and used against up to four input rows at a time, and
//! input rows come in panels that stay in cache while a task's weights
//! pass over them.
//!
//! Weights are kept interleaved in strips of eight output rows: one 32-byte
//! vector holds four neighbouring inputs of each of the eight rows, so one
//! multiply-add instruction pair yields eight rows' partial sums at once,
//! a block's sums stay exact integers, and the block's scales are applied
//! once, as a vector, for all eight. (Row by row, ggml's way, each block of
//! each row paid a scalar scale product and a broadcast, which took about
//! as long as its integer products on AVX2.)
//!
//! Inputs are quantised to Q8_0 as ggml does (a scale per 32 values). A
//! row's result is, per block, its exact integer sum times the block's two
//! scales, accumulated in block order: the same bits whatever the rows
//! beside it, which the batching invariant (see `llama.rs`) rests on.

use std::io::{self, Read, Seek, SeekFrom};

use half::f16;
use rayon::prelude::*;

/// Values per quantisation block, and bytes of one stored Q8_0 block.
const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 2 + BLOCK;

/// Output rows interleaved in a strip, and neighbouring inputs per row in
/// each interleaved vector (one i32 lane of `vpmaddwd` sums four products).
const STRIP: usize = 8;
const GROUP: usize = 4;
const GROUPS: usize = BLOCK / GROUP;

/// Input rows multiplied against a strip at once.
const TILE_ROWS: usize = 4;

/// Input rows kept in cache while a task's strips pass over them.
const PANEL_ROWS: usize = 48;

/// Strips one parallel task computes.
const STRIPS_PER_TASK: usize = 2;

/// Blocks read from the file at a time.
const READ_BLOCKS: usize = 4096;

/// A Q8_0 weight matrix of `outputs` rows of `inputs` values.
pub struct Q8Matrix {
    outputs: usize,
    inputs: usize,
    /// Per strip, per block, per group: the group's 4 inputs of each of the
    /// strip's 8 rows (rows past `outputs` are 0).
    quants: Vec<[i8; BLOCK]>,
    /// Per strip, per block: each of the strip's rows' scale.
    scales: Vec<[f32; STRIP]>,
}

/// Input rows quantised to blocks of 32 with one scale each.
struct QuantisedInput {
    quants: Vec<[i8; BLOCK]>,
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Reads the Q8_0 matrix of `outputs` rows of `inputs` values stored at
    /// `offset` of `file` straight into this layout: no copy of the file's
    /// bytes is kept, so loading touches each weight's memory once (fresh
    /// pages are what a replica's start costs, more than any arithmetic).
    /// A shape larger than the file is an error before anything is
    /// allocated: a model file may come from a tenant.
    pub fn read<F: Read + Seek>(
        file: &mut F,
        offset: u64,
        outputs: usize,
        inputs: usize,
    ) -> io::Result<Q8Matrix> {
        Q8Matrix::read_stacked(file, &[(offset, outputs)], inputs)
    }

    /// Reads matrices of the same `inputs`, each given as its `(offset,
    /// outputs)`, as one matrix of their rows in order: matrices that
    /// multiply the same input then take one pass (one quantisation of the
    /// input, one parallel region) instead of one each.
    pub fn read_stacked<F: Read + Seek>(
        file: &mut F,
        parts: &[(u64, usize)],
        inputs: usize,
    ) -> io::Result<Q8Matrix> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        if inputs == 0 || !inputs.is_multiple_of(BLOCK) {
            return Err(bad(format!(
                "{inputs} inputs are not a positive number of whole Q8_0 blocks"
            )));
        }
        let per_row = inputs / BLOCK;
        let len = file.seek(SeekFrom::End(0))?;
        let mut outputs = 0usize;
        for &(offset, rows) in parts {
            let bytes = rows
                .checked_mul(per_row)
                .and_then(|blocks| (blocks as u64).checked_mul(BLOCK_BYTES as u64));
            if bytes
                .and_then(|b| offset.checked_add(b))
                .is_none_or(|end| end > len)
            {
                return Err(bad(format!(
                    "a {rows}x{inputs} Q8_0 tensor at byte {offset} runs past the file's {len} bytes"
                )));
            }
            outputs = outputs
                .checked_add(rows)
                .ok_or_else(|| bad("tensor too large".into()))?;
        }
        let strips = outputs.div_ceil(STRIP);
        let mut m = Q8Matrix {
            outputs,
            inputs,
            quants: vec![[0; BLOCK]; strips * per_row * GROUPS],
            scales: vec![[0.0; STRIP]; strips * per_row],
        };
        let mut buf = vec![0u8; READ_BLOCKS * BLOCK_BYTES];
        let mut first_row = 0;
        for &(offset, rows) in parts {
            file.seek(SeekFrom::Start(offset))?;
            let blocks = rows * per_row;
            let mut done = 0;
            while done < blocks {
                let n = (blocks - done).min(READ_BLOCKS);
                let chunk = &mut buf[..n * BLOCK_BYTES];
                file.read_exact(chunk)?;
                for (k, block) in chunk.chunks_exact(BLOCK_BYTES).enumerate() {
                    let row = first_row + (done + k) / per_row;
                    let b = (done + k) % per_row;
                    m.put_block(row, b, block);
                }
                done += n;
            }
            first_row += rows;
        }
        Ok(m)
    }

    /// Stores a file's block `b` of row `row` (an f16 scale, 32 values).
    fn put_block(&mut self, row: usize, b: usize, block: &[u8]) {
        let per_row = self.inputs / BLOCK;
        let (strip, lane) = (row / STRIP, row % STRIP);
        let at = strip * per_row + b;
        self.scales[at][lane] = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (g, values) in block[2..].chunks_exact(GROUP).enumerate() {
            let group = &mut self.quants[at * GROUPS + g];
            for (i, v) in values.iter().enumerate() {
                group[lane * GROUP + i] = *v as i8;
            }
        }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Each weight of strip row `lane` of block `at`, in f32 as ggml
    /// dequantises it (the value times its block's scale), in input order.
    fn block_values(&self, at: usize, lane: usize) -> impl Iterator<Item = f32> + '_ {
        let d = self.scales[at][lane];
        self.quants[at * GROUPS..(at + 1) * GROUPS]
            .iter()
            .flat_map(move |g| g[lane * GROUP..(lane + 1) * GROUP].iter())
            .map(move |q| f32::from(*q) * d)
    }

    /// Row `row` in f32 (as ggml dequantises: each value times its block's
    /// scale), appended to `out`; `false` past the last row.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) -> bool {
        if row >= self.outputs {
            return false;
        }
        let per_row = self.inputs / BLOCK;
        let first = (row / STRIP) * per_row;
        for at in first..first + per_row {
            out.extend(self.block_values(at, row % STRIP));
        }
        true
    }

    /// `x` holds rows of `inputs` values; returns rows of `outputs`.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.inputs;
        let input = quantise(x);
        let blocks = self.inputs / BLOCK;
        let strips = self.outputs.div_ceil(STRIP);
        // Strip-major while computing, so each task owns a contiguous run.
        let mut by_strip = vec![[0.0f32; STRIP]; strips * rows];
        by_strip
            .par_chunks_mut(STRIPS_PER_TASK * rows)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * STRIPS_PER_TASK;
                for (k, out) in out.chunks_exact_mut(rows).enumerate() {
                    let at = (first + k) * blocks;
                    let strip = Strip {
                        quants: &self.quants[at * GROUPS..(at + blocks) * GROUPS],
                        scales: &self.scales[at..at + blocks],
                    };
                    // A panel of input rows stays in cache while the task's
                    // strips pass over it.
                    for panel in (0..rows).step_by(PANEL_ROWS) {
                        let end = rows.min(panel + PANEL_ROWS);
                        for r in (panel..end).step_by(TILE_ROWS) {
                            let n = (end - r).min(TILE_ROWS);
                            let row = |j: usize| input.row(r + j, blocks);
                            let sums = &mut out[r..r + n];
                            match n {
                                4 => sums
                                    .copy_from_slice(&tile::<4>(&strip, std::array::from_fn(row))),
                                3 => sums
                                    .copy_from_slice(&tile::<3>(&strip, std::array::from_fn(row))),
                                2 => sums
                                    .copy_from_slice(&tile::<2>(&strip, std::array::from_fn(row))),
                                _ => sums
                                    .copy_from_slice(&tile::<1>(&strip, std::array::from_fn(row))),
                            }
                        }
                    }
                }
            });
        let mut out = vec![0.0f32; rows * self.outputs];
        for (strip, by_row) in by_strip.chunks_exact(rows).enumerate() {
            for (r, sums) in by_row.iter().enumerate() {
                let first = strip * STRIP;
                let n = STRIP.min(self.outputs - first);
                out[r * self.outputs + first..r * self.outputs + first + n]
                    .copy_from_slice(&sums[..n]);
            }
        }
        out
    }
}

/// One strip's blocks.
struct Strip<'a> {
    quants: &'a [[i8; BLOCK]],
    scales: &'a [[f32; STRIP]],
}

/// One quantised input row.
#[derive(Clone, Copy)]
struct InputRow<'a> {
    quants: &'a [[i8; BLOCK]],
    scales: &'a [f32],
}

impl QuantisedInput {
    fn row(&self, r: usize, blocks: usize) -> InputRow<'_> {
        let range = r * blocks..(r + 1) * blocks;
        InputRow {
            quants: &self.quants[range.clone()],
            scales: &self.scales[range],
        }
    }
}

/// The group `g` of a block as one i32 (four bytes), for broadcasting.
fn group_of(block: &[i8; BLOCK], g: usize) -> i32 {
    i32::from_le_bytes(std::array::from_fn(|i| block[g * GROUP + i] as u8))
}

/// A strip's eight rows against `N` input rows. Per block and input row,
/// the eight rows' integer sums are exact (`vpmaddubsw` pairs cannot
/// saturate: weights' magnitudes are at most 128 and inputs at most 127,
/// see `quantise`, so a pair is at most 32,512), then scaled by
/// the eight rows' scales times the input's and added in block order.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline(always)]
fn tile<const N: usize>(w: &Strip<'_>, x: [InputRow<'_>; N]) -> [[f32; STRIP]; N] {
    use safe_arch::*;
    let ones = set_splat_i16_m256i(1);
    let mut acc = [zeroed_m256(); N];
    for (b, (quants, scales)) in w.quants.chunks_exact(GROUPS).zip(w.scales).enumerate() {
        let mut sums = [zeroed_m256i(); N];
        for (g, group) in quants.iter().enumerate() {
            let wv = load_unaligned_m256i(group);
            // vpmaddubsw multiplies unsigned by signed: the weights'
            // magnitudes are the unsigned side and their signs move onto
            // x, as in ggml. (The other way round, a file's -128 could not
            // be negated: `vpsignb` leaves it -128.)
            let wm = abs_i8_m256i(wv);
            for j in 0..N {
                let xq = set_splat_i32_m256i(group_of(&x[j].quants[b], g));
                let pairs =
                    mul_u8i8_add_horizontal_saturating_m256i(wm, sign_apply_i8_m256i(xq, wv));
                sums[j] = add_i32_m256i(sums[j], mul_i16_horizontal_add_m256i(pairs, ones));
            }
        }
        let ws = m256::from(*scales);
        for j in 0..N {
            acc[j] = fused_mul_add_m256(
                mul_m256(ws, set_splat_m256(x[j].scales[b])),
                convert_to_m256_from_i32_m256i(sums[j]),
                acc[j],
            );
        }
    }
    acc.map(<[f32; STRIP]>::from)
}

/// The same sums in portable code, for builds without AVX2: bit for bit
/// the AVX2 kernel's (block sums are exact, and `mul_add` is fused).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn tile<const N: usize>(w: &Strip<'_>, x: [InputRow<'_>; N]) -> [[f32; STRIP]; N] {
    x.map(|x| {
        let mut acc = [0.0f32; STRIP];
        for (b, (quants, scales)) in w.quants.chunks_exact(GROUPS).zip(w.scales).enumerate() {
            for (lane, a) in acc.iter_mut().enumerate() {
                let sum: i32 = (0..BLOCK)
                    .map(|i| {
                        let wq = quants[i / GROUP][lane * GROUP + i % GROUP];
                        i32::from(wq) * i32::from(x.quants[b][i])
                    })
                    .sum();
                *a = (scales[lane] * x.scales[b]).mul_add(sum as f32, *a);
            }
        }
        acc
    })
}

/// ggml's `quantize_row_q8_0` (its AVX2 code): the scale is `max |v| / 127`
/// stored as f16, each value times `127 / max |v|` rounded half to even.
fn quantise(x: &[f32]) -> QuantisedInput {
    let blocks = x.len() / BLOCK;
    let mut quants = Vec::with_capacity(blocks);
    let mut scales = Vec::with_capacity(blocks);
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(f16::from_f32(amax / 127.0).to_f32());
        let inv = if amax == 0.0 { 0.0 } else { 127.0 / amax };
        // |v * inv| <= 127 up to rounding: -128 is never produced, so the
        // kernel's `vpsignb` can always negate an input.
        let q: [i8; BLOCK] =
            std::array::from_fn(|i| (block[i] * inv).round_ties_even().clamp(-127.0, 127.0) as i8);
        quants.push(q);
    }
    QuantisedInput { quants, scales }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Module, Tensor};

    pub(crate) fn noise(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn matrix(outputs: usize, inputs: usize) -> QTensor {
        let w =
            Tensor::from_vec(noise(outputs * inputs, 1), (outputs, inputs), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()
    }

    /// `q` as a file would hold it (after 7 bytes of something else), read.
    fn ours(q: &QTensor) -> Q8Matrix {
        let (outputs, inputs) = q.shape().dims2().unwrap();
        let mut file = vec![0xAAu8; 7];
        file.extend_from_slice(&q.data().unwrap());
        Q8Matrix::read(&mut io::Cursor::new(file), 7, outputs, inputs).unwrap()
    }

    #[test]
    fn agrees_with_candles_kernel_and_gives_each_row_the_same_bits_at_any_row_count() {
        // 75 rows: nine whole strips and a partial one; 5 rows: a tile of 4 and 1.
        let (outputs, inputs, rows) = (75, 1536, 5);
        let q = matrix(outputs, inputs);
        let ours = ours(&q);
        let x = noise(rows * inputs, 2);
        let together = ours.matmul(&x);
        let t = Tensor::from_slice(&x, (rows, inputs), &Device::Cpu).unwrap();
        let theirs = candle_core::quantized::QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in together.iter().zip(&theirs) {
            // candle rounds inputs half away from zero by 1 / scale; ggml (and
            // we) half to even by 127 / max.
            assert!(
                (a - b).abs() <= 1e-2 * b.abs().max(1.0),
                "{a} vs candle's {b}"
            );
        }
        for (r, row) in x.chunks(inputs).enumerate() {
            let alone = ours.matmul(row);
            let same = alone
                .iter()
                .zip(&together[r * outputs..(r + 1) * outputs])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "row {r} differs alone vs among {rows}");
        }
    }

    #[test]
    fn dequantised_rows_are_candles_bit_for_bit() {
        let (outputs, inputs) = (43, 96);
        let q = matrix(outputs, inputs);
        let m = ours(&q);
        let theirs = q.dequantize(&Device::Cpu).unwrap();
        let rows = theirs.to_vec2::<f32>().unwrap();
        for (o, expected) in rows.iter().enumerate() {
            let mut row = Vec::new();
            assert!(m.dequantize_row(o, &mut row));
            assert!(row
                .iter()
                .zip(expected)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        assert!(!m.dequantize_row(outputs, &mut Vec::new()));
    }

    #[test]
    fn a_weight_of_minus_128_multiplies_like_any_other() {
        // ggml never writes -128, but a model file may come from a tenant,
        // and `vpsignb` cannot negate it: the weight's magnitude must be
        // the unsigned side, as in ggml's own kernel.
        let (outputs, inputs) = (8, 64);
        let mut file = Vec::new();
        for block in 0..outputs * inputs / BLOCK {
            file.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
            file.extend((0..BLOCK).map(|i| if (i + block) % 3 == 0 { 0x80 } else { 5 }));
        }
        let m = Q8Matrix::read(&mut io::Cursor::new(file), 0, outputs, inputs).unwrap();
        // Negative inputs: every -128 weight meets an input to negate.
        let x: Vec<f32> = (0..inputs).map(|i| -((i % 127) as f32 + 1.0)).collect();
        let got = m.matmul(&x);
        let input = quantise(&x);
        for (o, got) in got.iter().enumerate() {
            let mut row = Vec::new();
            assert!(m.dequantize_row(o, &mut row));
            let expected: f32 = row
                .chunks_exact(BLOCK)
                .enumerate()
                .map(|(b, w)| {
                    let sum: f32 = (0..BLOCK)
                        .map(|i| w[i] / 0.5 * f32::from(input.quants[b][i]))
                        .sum();
                    sum * 0.5 * input.scales[b]
                })
                .sum();
            assert!(
                (got - expected).abs() <= 1e-3 * expected.abs(),
                "row {o}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn stacked_matrices_give_each_ones_rows_bit_for_bit() {
        // 13 + 8 + 20 rows: the parts straddle strips of eight.
        let inputs = 96;
        let parts: Vec<QTensor> = [13, 8, 20].map(|o| matrix(o, inputs)).into();
        let mut file = vec![0x55u8; 3];
        let mut at = Vec::new();
        for q in &parts {
            at.push((file.len() as u64, q.shape().dims2().unwrap().0));
            file.extend_from_slice(&q.data().unwrap());
        }
        let stacked = Q8Matrix::read_stacked(&mut io::Cursor::new(file), &at, inputs).unwrap();
        assert_eq!(stacked.outputs(), 41);
        let x = noise(3 * inputs, 9);
        let together = stacked.matmul(&x);
        let apart: Vec<Vec<f32>> = parts.iter().map(|q| ours(q).matmul(&x)).collect();
        for r in 0..3 {
            let expected: Vec<u32> = apart
                .iter()
                .zip(&at)
                .flat_map(|(y, &(_, o))| y[r * o..(r + 1) * o].iter().map(|v| v.to_bits()))
                .collect();
            let got: Vec<u32> = together[r * 41..(r + 1) * 41]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(got, expected, "row {r}");
        }
    }

    #[test]
    fn a_shape_past_the_files_end_is_refused_before_allocating() {
        let q = matrix(8, 64);
        let bytes = q.data().unwrap().to_vec();
        let mut file = io::Cursor::new(bytes);
        assert!(Q8Matrix::read(&mut file, 0, 8, 64).is_ok());
        for (offset, outputs, inputs) in [
            (0, 9, 64),
            (1, 8, 64),
            (0, 8, 63),
            (u64::MAX, 1, 32),
            (0, usize::MAX, 64),
            (0, 1 << 40, 1 << 20),
            (0, usize::MAX, 0),
        ] {
            assert!(
                Q8Matrix::read(&mut file, offset, outputs, inputs).is_err(),
                "{offset} {outputs}x{inputs}"
            );
        }
        // Each part is checked, not only the first.
        let stacked = Q8Matrix::read_stacked(&mut file, &[(0, 8), (0, 9)], 64);
        assert!(stacked.is_err());
        let part_overflows = Q8Matrix::read_stacked(&mut file, &[(0, 8), (0, usize::MAX)], 64);
        assert!(part_overflows.is_err());
    }
}
