//! Weight matrices and the kernels a row can take: our Q8_0 kernel
//! (`q8.rs`) for every row of a Q8_0 matrix; for other types, candle's
//! quantised kernel for generated rows and, where a dense f32 copy is kept,
//! candle's GEMM for prompt rows (candle's kernel streams the whole matrix
//! once per row; see `llama.rs`).
//!
//! Matrices that multiply the same input (a layer's q, k and v; its gate
//! and up) are stacked into one where our kernel reads them all: a step
//! then quantises that input once and makes one parallel pass instead of
//! three or two, which on two threads is a good part of a decode step.

use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::q8::Q8Matrix;
use crate::EngineError;

/// Fewest rows a dense product is computed with (see `Linear::apply`).
const MIN_DENSE_ROWS: usize = 4;

/// A weight matrix as read from the file: straight into our Q8_0 layout,
/// or a candle tensor for the other types.
pub(crate) enum Weight {
    Q8(Arc<Q8Matrix>),
    Other(QTensor),
}

impl Weight {
    /// The tensor `name` of `content`.
    pub(crate) fn read(
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        name: &str,
    ) -> Result<Weight, EngineError> {
        match q8_tensor(content, name)? {
            Some((offset, outputs, inputs)) => Q8Matrix::read(file, offset, outputs, inputs)
                .map(|m| Weight::Q8(Arc::new(m)))
                .map_err(|e| EngineError::Load(format!("{name}: {e}"))),
            None => content
                .tensor(file, name, &Device::Cpu)
                .map(Weight::Other)
                .map_err(load_err),
        }
    }
}

/// Where the tensor `name` lies in the file and its shape, if our kernel
/// reads it (a Q8_0 matrix of whole blocks); `None` for other types.
fn q8_tensor(
    content: &gguf_file::Content,
    name: &str,
) -> Result<Option<(u64, usize, usize)>, EngineError> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| EngineError::Load(format!("the model file has no tensor {name}")))?;
    match info.shape.dims2() {
        Ok((outputs, inputs))
            if info.ggml_dtype == GgmlDType::Q8_0 && inputs.is_multiple_of(32) =>
        {
            let offset = content
                .tensor_data_offset
                .checked_add(info.offset)
                .ok_or_else(|| EngineError::Load(format!("{name}: offset out of range")))?;
            Ok(Some((offset, outputs, inputs)))
        }
        _ => Ok(None),
    }
}

fn load_err(e: candle_core::Error) -> EngineError {
    EngineError::Load(e.to_string())
}

/// A quantised weight matrix's kernel: our own for Q8_0 (many rows per
/// pass over the weights), candle's for the other types.
pub(crate) enum Quantised {
    Q8(Arc<Q8Matrix>),
    Candle(QMatMul),
}

impl Quantised {
    pub(crate) fn new(w: Weight) -> candle_core::Result<Quantised> {
        Ok(match w {
            Weight::Q8(m) => Quantised::Q8(m),
            Weight::Other(q) => Quantised::Candle(QMatMul::from_qtensor(q)?),
        })
    }

    /// `x` holds rows of `inputs` values.
    pub(crate) fn forward(&self, x: &[f32], inputs: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            Quantised::Q8(m) => Ok(m.matmul(x)),
            Quantised::Candle(m) => {
                let t = Tensor::from_slice(x, (x.len() / inputs, inputs), &Device::Cpu)?;
                m.forward(&t)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }
}

/// A weight matrix: quantised, plus its dense transpose where kept.
pub(crate) struct Linear {
    quant: Quantised,
    dense: Option<Tensor>,
    inputs: usize,
}

impl Linear {
    pub(crate) fn new(w: Weight, dense: bool) -> candle_core::Result<Linear> {
        let inputs = match &w {
            Weight::Q8(m) => m.inputs(),
            Weight::Other(q) => q.shape().dims2()?.1,
        };
        // Our Q8_0 kernel outruns candle's GEMM on prompt rows too, so
        // those matrices keep no dense copy.
        let dense = match (&w, dense) {
            (Weight::Other(q), true) => Some(q.dequantize(&Device::Cpu)?.t()?.contiguous()?),
            _ => None,
        };
        Ok(Linear {
            quant: Quantised::new(w)?,
            dense,
            inputs,
        })
    }

    /// `x` holds rows of `inputs` values; the first `quant_rows` take the
    /// quantised kernel, the rest the dense one.
    pub(crate) fn apply(&self, x: &[f32], quant_rows: usize) -> candle_core::Result<Vec<f32>> {
        let Some(w) = &self.dense else {
            return self.quant.forward(x, self.inputs);
        };
        let rows = x.len() / self.inputs;
        let split = quant_rows.min(rows) * self.inputs;
        let mut out = Vec::new();
        if split > 0 {
            out = self.quant.forward(&x[..split], self.inputs)?;
        }
        if split < x.len() {
            let rest = &x[split..];
            let n = rest.len() / self.inputs;
            let y = if n < MIN_DENSE_ROWS {
                // The GEMM takes another path for a single row, whose
                // sums differ in the last bits: pad so a prompt row's
                // result never depends on how many rows share its step.
                let mut padded = rest.to_vec();
                padded.resize(MIN_DENSE_ROWS * self.inputs, 0.0);
                let t = Tensor::from_vec(padded, (MIN_DENSE_ROWS, self.inputs), &Device::Cpu)?;
                t.matmul(w)?.narrow(0, 0, n)?
            } else {
                Tensor::from_slice(rest, (n, self.inputs), &Device::Cpu)?.matmul(w)?
            };
            out.extend(y.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// Matrices that multiply the same input, in order.
pub(crate) enum Stack {
    /// All Q8_0: one matrix of their rows (every row takes our kernel), and
    /// each one's outputs.
    One {
        matrix: Q8Matrix,
        widths: Vec<usize>,
    },
    /// Types our kernel does not read, each on its own.
    Apart(Vec<Linear>),
}

impl Stack {
    /// The tensors `names` of `content`, which must share their inputs.
    pub(crate) fn read(
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        names: &[String],
        dense: bool,
    ) -> Result<Stack, EngineError> {
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            match q8_tensor(content, name)? {
                Some((offset, outputs, inputs)) => parts.push((offset, outputs, inputs)),
                None => break,
            }
        }
        let inputs = parts.first().map(|p| p.2);
        if parts.len() < names.len() || parts.iter().any(|p| Some(p.2) != inputs) {
            let mut apart = Vec::with_capacity(names.len());
            for name in names {
                let w = Weight::read(content, file, name)?;
                apart.push(Linear::new(w, dense).map_err(load_err)?);
            }
            return Ok(Stack::Apart(apart));
        }
        let at: Vec<(u64, usize)> = parts.iter().map(|&(o, rows, _)| (o, rows)).collect();
        let matrix = Q8Matrix::read_stacked(file, &at, inputs.unwrap_or(0))
            .map_err(|e| EngineError::Load(format!("{}: {e}", names.join(", "))))?;
        Ok(Stack::One {
            matrix,
            widths: parts.iter().map(|p| p.1).collect(),
        })
    }

    /// Each matrix's product with `x` (rows of their shared inputs; the
    /// first `quant_rows` take the quantised kernel), in order.
    pub(crate) fn apply(&self, x: &[f32], quant_rows: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        match self {
            Stack::Apart(linears) => linears.iter().map(|l| l.apply(x, quant_rows)).collect(),
            Stack::One { matrix, widths } => {
                let y = matrix.matmul(x);
                let total = matrix.outputs();
                let rows = x.len() / matrix.inputs();
                let mut out: Vec<Vec<f32>> = widths
                    .iter()
                    .map(|w| Vec::with_capacity(rows * w))
                    .collect();
                for row in y.chunks_exact(total.max(1)) {
                    let mut at = 0;
                    for (o, w) in out.iter_mut().zip(widths) {
                        o.extend_from_slice(&row[at..at + w]);
                        at += w;
                    }
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q8::tests::noise;

    /// Rows computed alone and among others, through both kernels.
    fn alone_and_together(linear: &Linear, x: &[f32], quant_rows: usize) -> (Vec<f32>, Vec<f32>) {
        let together = linear.apply(x, quant_rows).unwrap();
        let alone = x
            .chunks(linear.inputs)
            .flat_map(|row| linear.apply(row, quant_rows).unwrap())
            .collect();
        (alone, together)
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_as_in_a_step_of_many() {
        // The shape of SmolLM2's ffn_down, where candle's dense GEMM once
        // summed a lone row differently from the same row among others.
        let (outputs, inputs, rows) = (576, 1536, 5);
        let w =
            Tensor::from_vec(noise(outputs * inputs, 1), (outputs, inputs), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let mut file = std::io::Cursor::new(q8.data().unwrap().to_vec());
        let m = Q8Matrix::read(&mut file, 0, outputs, inputs).unwrap();
        let ours = Linear::new(Weight::Q8(Arc::new(m)), true).unwrap();
        assert!(ours.dense.is_none(), "a Q8_0 matrix keeps no dense copy");
        // Another type keeps one: its prompt rows take the GEMM.
        let q4 = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        let candles = Linear::new(Weight::Other(q4), true).unwrap();
        assert!(candles.dense.is_some());
        let x = noise(rows * inputs, 2);
        for (linear, quant_rows) in [(&ours, 0), (&candles, 0), (&candles, rows)] {
            let (alone, together) = alone_and_together(linear, &x, quant_rows);
            assert_eq!(alone.len(), rows * outputs);
            let same = alone
                .iter()
                .zip(&together)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "rows differ alone vs together (quantised rows: {quant_rows})"
            );
        }
    }

    #[test]
    fn a_stack_gives_what_its_matrices_give_apart() {
        let inputs = 96;
        let q8 = |outputs: usize, seed: u32| {
            let w = Tensor::from_vec(
                noise(outputs * inputs, seed),
                (outputs, inputs),
                &Device::Cpu,
            )
            .unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            q.data().unwrap().to_vec()
        };
        let (a, b) = (q8(24, 1), q8(13, 2));
        let stacked = {
            let mut file = std::io::Cursor::new([a.clone(), b.clone()].concat());
            let m = Q8Matrix::read_stacked(&mut file, &[(0, 24), (a.len() as u64, 13)], inputs);
            Stack::One {
                matrix: m.unwrap(),
                widths: vec![24, 13],
            }
        };
        let apart = |bytes: &[u8], outputs| {
            let m = Q8Matrix::read(&mut std::io::Cursor::new(bytes), 0, outputs, inputs).unwrap();
            Linear::new(Weight::Q8(Arc::new(m)), true).unwrap()
        };
        let apart = Stack::Apart(vec![apart(&a, 24), apart(&b, 13)]);
        let x = noise(6 * inputs, 3);
        let bits = |v: Vec<Vec<f32>>| -> Vec<Vec<u32>> {
            v.into_iter()
                .map(|m| m.iter().map(|f| f.to_bits()).collect())
                .collect()
        };
        let got = bits(stacked.apply(&x, 2).unwrap());
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            [6 * 24, 6 * 13]
        );
        assert_eq!(got, bits(apart.apply(&x, 2).unwrap()));
    }
}
