//! Int8 matrix products for Q8_0 weights, many rows in one pass.
//!
//! candle's CPU kernel multiplies one input row at a time and streams the
//! whole weight matrix from memory for each, so a decode step of eight
//! sequences read every weight eight times. Here weight rows and input rows
//! meet in register tiles (4 x 2: each block loaded serves the whole tile),
//! and input rows come in panels that stay in cache while a task's weight
//! rows pass over them.
//!
//! Inputs are quantised to Q8_0 as ggml does (a scale per 32 values), and a
//! row's sums are always formed in the same order whatever the number of
//! rows beside it: a row's result never depends on the rest of its step,
//! which the batching invariant (see `llama.rs`) rests on.

use std::io::{self, Read, Seek, SeekFrom};

use half::f16;
use rayon::prelude::*;

/// Values per quantisation block, and bytes of one stored Q8_0 block.
const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 2 + BLOCK;

/// A tile's weight rows and input rows: 8 accumulators, with the blocks
/// in flight, fit AVX2's sixteen registers (4 x 3 spilled, and was no
/// faster).
const TILE_W: usize = 4;
const TILE_X: usize = 2;

/// Input rows kept in cache while a task's weight rows pass over them.
const PANEL_ROWS: usize = 48;

/// Output rows one parallel task computes.
const OUTPUTS_PER_TASK: usize = 16;

/// Blocks read from the file at a time.
const READ_BLOCKS: usize = 4096;

/// A Q8_0 weight matrix of `outputs` rows of `inputs` values.
pub struct Q8Matrix {
    outputs: usize,
    inputs: usize,
    quants: Vec<[i8; BLOCK]>,
    scales: Vec<f32>,
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
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        if !inputs.is_multiple_of(BLOCK) {
            return Err(bad(format!("{inputs} inputs are not whole Q8_0 blocks")));
        }
        let blocks = outputs
            .checked_mul(inputs / BLOCK)
            .ok_or_else(|| bad("tensor too large".into()))?;
        let bytes = (blocks as u64).saturating_mul(BLOCK_BYTES as u64);
        let len = file.seek(SeekFrom::End(0))?;
        if offset.checked_add(bytes).is_none_or(|end| end > len) {
            return Err(bad(format!(
                "a {outputs}x{inputs} Q8_0 tensor at byte {offset} runs past the file's {len} bytes"
            )));
        }
        file.seek(SeekFrom::Start(offset))?;
        let mut m = Q8Matrix {
            outputs,
            inputs,
            quants: Vec::with_capacity(blocks),
            scales: Vec::with_capacity(blocks),
        };
        let mut buf = vec![0u8; READ_BLOCKS * BLOCK_BYTES];
        let mut left = blocks;
        while left > 0 {
            let n = left.min(READ_BLOCKS);
            let chunk = &mut buf[..n * BLOCK_BYTES];
            file.read_exact(chunk)?;
            m.push_blocks(chunk);
            left -= n;
        }
        Ok(m)
    }

    fn push_blocks(&mut self, data: &[u8]) {
        for block in data.chunks_exact(BLOCK_BYTES) {
            self.scales
                .push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            self.quants
                .push(std::array::from_fn(|i| block[2 + i] as i8));
        }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Row `row` in f32 (as ggml dequantises: each value times its block's
    /// scale), appended to `out`; `false` past the last row.
    pub fn dequantize_row(&self, row: usize, out: &mut Vec<f32>) -> bool {
        let per_row = self.inputs / BLOCK;
        let Some(range) = row
            .checked_mul(per_row)
            .filter(|_| row < self.outputs)
            .map(|start| start..start + per_row)
        else {
            return false;
        };
        for (q, d) in self.quants[range.clone()].iter().zip(&self.scales[range]) {
            out.extend(q.iter().map(|v| f32::from(*v) * d));
        }
        true
    }

    /// The whole matrix in f32, transposed (`inputs` rows of `outputs`),
    /// written once into its final place.
    pub fn dense_transposed(&self) -> Vec<f32> {
        let mut dense = vec![0.0f32; self.inputs * self.outputs];
        let per_row = self.inputs / BLOCK;
        for o in 0..self.outputs {
            let row = o * per_row..(o + 1) * per_row;
            for (b, (q, d)) in self.quants[row.clone()]
                .iter()
                .zip(&self.scales[row])
                .enumerate()
            {
                for (j, v) in q.iter().enumerate() {
                    dense[(b * BLOCK + j) * self.outputs + o] = f32::from(*v) * d;
                }
            }
        }
        dense
    }

    /// `x` holds rows of `inputs` values; returns rows of `outputs`.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.inputs;
        let input = quantise(x, self.inputs);
        let blocks = self.inputs / BLOCK;
        // Output-major while computing, so each task owns a contiguous run.
        let mut by_output = vec![0.0f32; self.outputs * rows];
        by_output
            .par_chunks_mut(OUTPUTS_PER_TASK * rows)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * OUTPUTS_PER_TASK;
                let outputs = out.len() / rows;
                let weights = Operand {
                    quants: &self.quants[first * blocks..(first + outputs) * blocks],
                    scales: &self.scales[first * blocks..(first + outputs) * blocks],
                    blocks,
                };
                // A panel of input rows stays in cache while every weight
                // row of the task passes over it.
                for panel in (0..rows).step_by(PANEL_ROWS) {
                    let panel_rows = PANEL_ROWS.min(rows - panel);
                    let inputs = Operand {
                        quants: &input.quants[panel * blocks..(panel + panel_rows) * blocks],
                        scales: &input.scales[panel * blocks..(panel + panel_rows) * blocks],
                        blocks,
                    };
                    tiles(&weights, &inputs, |o, r, v| out[o * rows + panel + r] = v);
                }
            });
        let mut out = vec![0.0f32; rows * self.outputs];
        for (o, column) in by_output.chunks_exact(rows).enumerate() {
            for (r, v) in column.iter().enumerate() {
                out[r * self.outputs + o] = *v;
            }
        }
        out
    }
}

/// Rows of Q8_0 blocks, `blocks` to a row.
struct Operand<'a> {
    quants: &'a [[i8; BLOCK]],
    scales: &'a [f32],
    blocks: usize,
}

impl<'a> Operand<'a> {
    fn rows(&self) -> usize {
        self.scales.len() / self.blocks
    }

    fn row(&self, r: usize) -> Row<'a> {
        let range = r * self.blocks..(r + 1) * self.blocks;
        Row {
            quants: &self.quants[range.clone()],
            scales: &self.scales[range],
        }
    }
}

#[derive(Clone, Copy)]
struct Row<'a> {
    quants: &'a [[i8; BLOCK]],
    scales: &'a [f32],
}

/// Every weight row against every input row, `TILE_W` x `TILE_X` at a time:
/// each block loaded from memory serves a whole row or column of the tile
/// (a weight block `TILE_X` inputs, an input block `TILE_W` weights), and
/// the tile's sums are independent chains the core overlaps. `put(o, r, v)`
/// receives weight row `o` times input row `r`.
fn tiles(w: &Operand<'_>, x: &Operand<'_>, mut put: impl FnMut(usize, usize, f32)) {
    macro_rules! tile_of {
        ($o:expr, $r:expr, $m:literal, $n:literal) => {{
            let sums = tile::<$m, $n>(
                std::array::from_fn(|i| w.row($o + i)),
                std::array::from_fn(|j| x.row($r + j)),
            );
            for (i, row) in sums.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    put($o + i, $r + j, *v);
                }
            }
        }};
    }
    let (outputs, rows) = (w.rows(), x.rows());
    for o in (0..outputs).step_by(TILE_W) {
        for r in (0..rows).step_by(TILE_X) {
            match ((outputs - o).min(TILE_W), (rows - r).min(TILE_X)) {
                (4, 2) => tile_of!(o, r, 4, 2),
                (4, _) => tile_of!(o, r, 4, 1),
                (3, 2) => tile_of!(o, r, 3, 2),
                (3, _) => tile_of!(o, r, 3, 1),
                (2, 2) => tile_of!(o, r, 2, 2),
                (2, _) => tile_of!(o, r, 2, 1),
                (_, 2) => tile_of!(o, r, 1, 2),
                (_, _) => tile_of!(o, r, 1, 1),
            }
        }
    }
}

/// `M` weight rows against `N` input rows, as ggml's AVX2 kernel forms one
/// such product: per block, eight lanes of exact integer sums (four
/// neighbouring products each), scaled into eight float lanes by one fused
/// multiply-add; the lanes are added last, always in one order. Each pair
/// has its own accumulator and visits its blocks in order, so its bits do
/// not depend on `M`, `N` or the rows beside it.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline(always)]
fn tile<const M: usize, const N: usize>(w: [Row<'_>; M], x: [Row<'_>; N]) -> [[f32; N]; M] {
    use safe_arch::*;
    let blocks = w[0].quants.len();
    let ones = set_splat_i16_m256i(1);
    let mut acc = [[zeroed_m256(); N]; M];
    for b in 0..blocks {
        let xv: [m256i; N] = std::array::from_fn(|j| load_unaligned_m256i(&x[j].quants[b]));
        for i in 0..M {
            let wv = load_unaligned_m256i(&w[i].quants[b]);
            // vpmaddubsw multiplies unsigned by signed: move w's sign onto x.
            // Inputs never reach -128 (see `quantise`), so pairs cannot saturate.
            let magnitude = sign_apply_i8_m256i(wv, wv);
            for j in 0..N {
                let pairs = mul_u8i8_add_horizontal_saturating_m256i(
                    magnitude,
                    sign_apply_i8_m256i(xv[j], wv),
                );
                let lanes = mul_i16_horizontal_add_m256i(pairs, ones);
                acc[i][j] = fused_mul_add_m256(
                    set_splat_m256(w[i].scales[b] * x[j].scales[b]),
                    convert_to_m256_from_i32_m256i(lanes),
                    acc[i][j],
                );
            }
        }
    }
    acc.map(|row| row.map(|a| lanes_sum(a.into())))
}

/// The same sums in portable code, for builds without AVX2: bit for bit
/// the AVX2 kernel's (integer lanes are exact, and `mul_add` is fused).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn tile<const M: usize, const N: usize>(w: [Row<'_>; M], x: [Row<'_>; N]) -> [[f32; N]; M] {
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let mut acc = [0.0f32; 8];
            for b in 0..w[i].quants.len() {
                let (wb, xb) = (&w[i].quants[b], &x[j].quants[b]);
                let d = w[i].scales[b] * x[j].scales[b];
                for (lane, a) in acc.iter_mut().enumerate() {
                    let sum: i32 = (4 * lane..4 * lane + 4)
                        .map(|k| i32::from(wb[k]) * i32::from(xb[k]))
                        .sum();
                    *a = d.mul_add(sum as f32, *a);
                }
            }
            lanes_sum(acc)
        })
    })
}

/// ggml's `hsum_float_8`, in its order.
fn lanes_sum(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// ggml's `quantize_row_q8_0` (its AVX2 code): the scale is `max |v| / 127`
/// stored as f16, each value times `127 / max |v|` rounded half to even.
/// With the kernel's order of sums this follows llama.cpp's arithmetic step
/// by step (read from ggml's source; not compared with its output here).
fn quantise(x: &[f32], inputs: usize) -> QuantisedInput {
    let mut quants = Vec::with_capacity(x.len() / BLOCK);
    let mut scales = Vec::with_capacity(x.len() / BLOCK);
    debug_assert!(x.len().is_multiple_of(inputs));
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(f16::from_f32(amax / 127.0).to_f32());
        let inv = if amax == 0.0 { 0.0 } else { 127.0 / amax };
        // |v * inv| <= 127 up to rounding: -128 is never produced.
        quants.push(std::array::from_fn(|i| {
            (block[i] * inv).round_ties_even().clamp(-127.0, 127.0) as i8
        }));
    }
    QuantisedInput { quants, scales }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn noise(n: usize, seed: u32) -> Vec<f32> {
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
        let (outputs, inputs, rows) = (72, 1536, 5);
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
    fn dequantised_rows_and_the_dense_transpose_are_candles_bit_for_bit() {
        let (outputs, inputs) = (40, 96);
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
        let transposed = theirs.t().unwrap().contiguous().unwrap();
        let expected = transposed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dense = m.dense_transposed();
        assert!(dense
            .iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
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
        ] {
            assert!(
                Q8Matrix::read(&mut file, offset, outputs, inputs).is_err(),
                "{offset} {outputs}x{inputs}"
            );
        }
    }
}
