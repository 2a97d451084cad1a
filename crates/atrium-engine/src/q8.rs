//! Int8 matrix products for Q8_0 weights, many rows in one pass.
//!
//! candle's CPU kernel multiplies one input row at a time and streams the
//! whole weight matrix from memory for each, so a decode step of eight
//! sequences read every weight eight times. Here each weight row is read
//! once per step and used against every input row while it sits in L1.
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

/// Independent accumulators per dot product (an FMA's latency over its
/// issue interval).
const CHAINS: usize = 4;

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
                for (i, out) in out.chunks_exact_mut(rows).enumerate() {
                    let o = first + i;
                    let w = &self.quants[o * blocks..(o + 1) * blocks];
                    let ws = &self.scales[o * blocks..(o + 1) * blocks];
                    for (r, y) in out.iter_mut().enumerate() {
                        let xq = &input.quants[r * blocks..(r + 1) * blocks];
                        let xs = &input.scales[r * blocks..(r + 1) * blocks];
                        *y = row_dot(w, ws, xq, xs);
                    }
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

/// One weight row against one input row, as ggml's AVX2 kernel does it:
/// per block, eight lanes of exact integer sums, scaled into eight float
/// lanes. Block `b` goes to accumulator `b % 4` so four chains of
/// multiply-adds overlap; the lanes are added last, always in one order.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn row_dot(w: &[[i8; BLOCK]], ws: &[f32], x: &[[i8; BLOCK]], xs: &[f32]) -> f32 {
    use safe_arch::*;
    #[inline(always)]
    fn block(w: &[i8; BLOCK], x: &[i8; BLOCK], d: f32, acc: m256) -> m256 {
        let wv = load_unaligned_m256i(w);
        let xv = load_unaligned_m256i(x);
        // vpmaddubsw multiplies unsigned by signed: move w's sign onto x.
        // Inputs never reach -128 (see `quantise`), so pairs cannot saturate.
        let pairs = mul_u8i8_add_horizontal_saturating_m256i(
            sign_apply_i8_m256i(wv, wv),
            sign_apply_i8_m256i(xv, wv),
        );
        let lanes = mul_i16_horizontal_add_m256i(pairs, set_splat_i16_m256i(1));
        fused_mul_add_m256(
            set_splat_m256(d),
            convert_to_m256_from_i32_m256i(lanes),
            acc,
        )
    }
    let (w4, w_rest) = w.as_chunks::<CHAINS>();
    let (x4, x_rest) = x.as_chunks::<CHAINS>();
    let (ws4, ws_rest) = ws.as_chunks::<CHAINS>();
    let (xs4, xs_rest) = xs.as_chunks::<CHAINS>();
    let mut acc = [zeroed_m256(); CHAINS];
    for (((wc, xc), wsc), xsc) in w4.iter().zip(x4).zip(ws4).zip(xs4) {
        acc[0] = block(&wc[0], &xc[0], wsc[0] * xsc[0], acc[0]);
        acc[1] = block(&wc[1], &xc[1], wsc[1] * xsc[1], acc[1]);
        acc[2] = block(&wc[2], &xc[2], wsc[2] * xsc[2], acc[2]);
        acc[3] = block(&wc[3], &xc[3], wsc[3] * xsc[3], acc[3]);
    }
    for (i, (((wb, xb), wd), xd)) in w_rest
        .iter()
        .zip(x_rest)
        .zip(ws_rest)
        .zip(xs_rest)
        .enumerate()
    {
        acc[i] = block(wb, xb, wd * xd, acc[i]);
    }
    let acc = add_m256(add_m256(acc[0], acc[2]), add_m256(acc[1], acc[3]));
    lanes_sum(<[f32; 8]>::from(acc))
}

/// The same sums in portable code, for builds without AVX2.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn row_dot(w: &[[i8; BLOCK]], ws: &[f32], x: &[[i8; BLOCK]], xs: &[f32]) -> f32 {
    let mut acc = [[0.0f32; 8]; CHAINS];
    for (b, (((wb, xb), wd), xd)) in w.iter().zip(x).zip(ws).zip(xs).enumerate() {
        let d = wd * xd;
        for (j, a) in acc[b % CHAINS].iter_mut().enumerate() {
            let p = |i: usize| i32::from(wb[i]) * i32::from(xb[i]);
            let lane = (p(2 * j) + p(2 * j + 1)) + (p(2 * j + 16) + p(2 * j + 17));
            *a = d.mul_add(lane as f32, *a);
        }
    }
    let acc: [f32; 8] = std::array::from_fn(|j| (acc[0][j] + acc[2][j]) + (acc[1][j] + acc[3][j]));
    lanes_sum(acc)
}

fn lanes_sum(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// ggml's `quantize_row_q8_0`, keeping the scale in f32.
fn quantise(x: &[f32], inputs: usize) -> QuantisedInput {
    let mut quants = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / BLOCK);
    debug_assert!(x.len().is_multiple_of(inputs));
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        scales.push(d);
        // |v * inv| <= 127 up to rounding: -128 is never produced.
        quants.push(std::array::from_fn(|i| {
            (block[i] * inv).round().clamp(-127.0, 127.0) as i8
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
            // candle rounds the input scales to f16; ours stay f32.
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
