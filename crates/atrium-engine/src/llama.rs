//! The llama architecture, written for continuous batching: one forward pass
//! takes rows from many sequences at once (each at its own position, with
//! its keys and values in the paged cache), so every weight is read once
//! per step rather than once per sequence.
//!
//! Every row's arithmetic is independent of the others in its step: the
//! matrix products (`linear.rs`) are row by row (our Q8_0 kernel, `q8.rs`,
//! sums each row in one fixed order; verified bitwise for candle's other
//! quantised kernels at any row count, and for its dense one from four rows
//! up: fewer rows are padded), and attention (`attention.rs`) visits each
//! row's own positions in one order whatever tile the row is in. A
//! request's output therefore does not depend on who else was being
//! served, which the batching tests check.
//!
//! Kernels are picked by what a row is, never by how full the step is. A
//! Q8_0 model's rows all take our int8 kernel: generated rows because one
//! row reads each weight once, so bytes, not flops, bound it; prompt rows
//! because, a step's rows sharing each weight block, its strips outrun
//! candle's f32 GEMM there too (end to end on two threads, with and
//! without the copy side by side: 38-token prompts 181-252 -> 285-498
//! tokens/s, 400-token 275-372 -> 300-394), with no dense copy to build or
//! hold. Other types keep candle's quantised
//! kernel for generated rows and, for prompt rows, a dense f32 copy (that
//! kernel reads the whole matrix once per row) where it fits
//! [`DENSE_LIMIT_BYTES`] and the replica's memory plan.

use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use crate::attention;
use crate::fastmath;
use crate::kv::{KvPool, KvShape, BLOCK_TOKENS};
use crate::linear::{Linear, Quantised, Stack, Weight};
use crate::q8::Q8Matrix;
use crate::EngineError;

/// Largest dense (f32) copy of the weights kept for prefill.
pub const DENSE_LIMIT_BYTES: usize = 2 << 30;

/// What a replica's memory goes to, decided before loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub dense: bool,
    pub kv_bytes: usize,
}

/// Memory for the process beyond weights and cache: tokenizer, runtime,
/// buffers of a step.
const OVERHEAD_BYTES: usize = 128 << 20;
/// The dense copy is worth keeping only if this much cache is left beside it.
const KV_FLOOR_BYTES: usize = 256 << 20;
const KV_MIN_BYTES: usize = 16 << 20;

/// Splits a memory limit (the replica's cgroup limit) between the dense
/// prefill copy and the key/value cache: the cache gets what was asked for
/// when it fits, and the dense copy only where the cache keeps
/// [`KV_FLOOR_BYTES`] beside it. Without a limit, the copy is kept up to
/// [`DENSE_LIMIT_BYTES`]. `dense` is 0 for a model with nothing to copy
/// (all Q8_0), which then plans no copy.
pub fn plan_memory(
    limit: Option<usize>,
    resident: usize,
    dense: usize,
    kv_requested: usize,
) -> MemoryPlan {
    let Some(limit) = limit else {
        return MemoryPlan {
            dense: dense > 0 && dense <= DENSE_LIMIT_BYTES,
            kv_bytes: kv_requested,
        };
    };
    let spare = limit.saturating_sub(resident.saturating_add(OVERHEAD_BYTES));
    let with_dense = spare.saturating_sub(dense);
    let dense =
        dense > 0 && dense <= DENSE_LIMIT_BYTES && with_dense >= KV_FLOOR_BYTES.min(kv_requested);
    let left = if dense { with_dense } else { spare };
    MemoryPlan {
        dense,
        kv_bytes: kv_requested.min(left).max(KV_MIN_BYTES),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
    pub eps: f32,
    pub vocab: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// q, k and v.
    qkv: Stack,
    o: Linear,
    /// gate and up.
    gate_up: Stack,
    down: Linear,
}

/// The token embedding table: kept quantised (a row is dequantised when a
/// token is looked up, exactly as a whole-table dequantisation would give
/// it), or in f32 for types our kernel does not read.
enum Embedding {
    Q8(Arc<Q8Matrix>),
    F32(Vec<f32>),
}

pub struct Llama {
    config: Config,
    embedding: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Quantised,
    /// `theta_i` of each rotary pair.
    inv_freq: Vec<f32>,
}

/// One sequence's rows in a step: `tokens` at positions `start..`, whose
/// keys and values go into `blocks` (already covering every position).
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [usize],
    /// Prompt rows (dense kernel) rather than one generated row.
    pub prompt: bool,
    /// Whether the last row's logits are wanted.
    pub logits: bool,
}

fn md<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, EngineError> {
    c.metadata
        .get(key)
        .ok_or_else(|| EngineError::Load(format!("GGUF metadata has no {key}")))
}

fn md_usize(c: &gguf_file::Content, key: &str) -> Result<usize, EngineError> {
    md(c, key)?
        .to_u32()
        .map(|v| v as usize)
        .map_err(|e| EngineError::Load(format!("{key}: {e}")))
}

fn load_err(e: candle_core::Error) -> EngineError {
    EngineError::Load(e.to_string())
}

impl Llama {
    /// Bytes of the quantised weights (and of an f32 embedding table), and of
    /// the dense copy of the layers' weights.
    pub fn footprint(content: &gguf_file::Content) -> (usize, usize) {
        let mut resident = 0usize;
        let mut dense = 0usize;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let blocks = elems / info.ggml_dtype.block_size();
            // Our Q8_0 kernel keeps each block's scale as f32, two bytes more.
            let bytes = if info.ggml_dtype == GgmlDType::Q8_0 {
                blocks * (info.ggml_dtype.type_size() + 2)
            } else {
                blocks * info.ggml_dtype.type_size()
            };
            resident = resident.saturating_add(bytes);
            // A Q8_0 table stays quantised; another is kept in f32.
            if name == "token_embd.weight" && info.ggml_dtype != GgmlDType::Q8_0 {
                resident = resident.saturating_add(elems * 4);
            } else if name.starts_with("blk.")
                && info.shape.dims().len() == 2
                && info.ggml_dtype != GgmlDType::Q8_0
            {
                // Only the types our kernel does not read get a dense copy.
                dense = dense.saturating_add(elems * 4);
            }
        }
        (resident, dense)
    }

    pub fn load(
        content: gguf_file::Content,
        file: &mut std::fs::File,
        dense: bool,
    ) -> Result<Llama, EngineError> {
        let heads = md_usize(&content, "llama.attention.head_count")?;
        let hidden = md_usize(&content, "llama.embedding_length")?;
        let config = Config {
            layers: md_usize(&content, "llama.block_count")?,
            hidden,
            heads,
            kv_heads: md_usize(&content, "llama.attention.head_count_kv")?,
            head_dim: hidden / heads.max(1),
            rope_dim: md_usize(&content, "llama.rope.dimension_count")?,
            rope_base: md(&content, "llama.rope.freq_base")
                .and_then(|v| v.to_f32().map_err(|e| EngineError::Load(e.to_string())))
                .unwrap_or(10_000.0),
            eps: md(&content, "llama.attention.layer_norm_rms_epsilon")?
                .to_f32()
                .map_err(|e| EngineError::Load(e.to_string()))?,
            vocab: 0,
        };
        if config.heads == 0
            || config.kv_heads == 0
            || !config.heads.is_multiple_of(config.kv_heads)
            || config.head_dim * config.heads != hidden
            || config.rope_dim > config.head_dim
            || !config.rope_dim.is_multiple_of(2)
        {
            return Err(EngineError::Load(format!(
                "unsupported attention shape {config:?}"
            )));
        }
        check_shapes(&content, &config)?;
        let dev = Device::Cpu;
        let vector = |q: QTensor| -> Result<Vec<f32>, EngineError> {
            q.dequantize(&dev)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(load_err)
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            let names = |ns: &[&str]| ns.iter().map(|n| name(n)).collect::<Vec<_>>();
            let mut linear = |n: &str| {
                Weight::read(&content, file, &name(n))
                    .and_then(|w| Linear::new(w, dense).map_err(load_err))
            };
            let (o, down) = (linear("attn_output")?, linear("ffn_down")?);
            let mut tensor = |n: &str| content.tensor(file, &name(n), &dev).map_err(load_err);
            let (attn_norm, ffn_norm) = (tensor("attn_norm")?, tensor("ffn_norm")?);
            layers.push(Layer {
                qkv: Stack::read(
                    &content,
                    file,
                    &names(&["attn_q", "attn_k", "attn_v"]),
                    dense,
                )?,
                o,
                gate_up: Stack::read(&content, file, &names(&["ffn_gate", "ffn_up"]), dense)?,
                down,
                attn_norm: vector(attn_norm)?,
                ffn_norm: vector(ffn_norm)?,
            });
        }
        let embedding_w = Weight::read(&content, file, "token_embd.weight")?;
        let (vocab, embd_width) = match &embedding_w {
            Weight::Q8(m) => (m.outputs(), m.inputs()),
            Weight::Other(q) => q.shape().dims2().map_err(load_err)?,
        };
        if embd_width != hidden {
            return Err(EngineError::Load(
                "token_embd width differs from the embedding length".into(),
            ));
        }
        // Tied embeddings (no output.weight) share the table's memory.
        let output = if content.tensor_infos.contains_key("output.weight") {
            Weight::read(&content, file, "output.weight")?
        } else {
            match &embedding_w {
                Weight::Q8(m) => Weight::Q8(m.clone()),
                Weight::Other(_) => Weight::read(&content, file, "token_embd.weight")?,
            }
        };
        let norm = content
            .tensor(file, "output_norm.weight", &dev)
            .map_err(load_err)?;
        let inv_freq = (0..config.rope_dim / 2)
            .map(|i| {
                1.0 / config
                    .rope_base
                    .powf((2 * i) as f32 / config.rope_dim as f32)
            })
            .collect();
        Ok(Llama {
            config: Config { vocab, ..config },
            embedding: match embedding_w {
                Weight::Q8(m) => Embedding::Q8(m),
                Weight::Other(q) => Embedding::F32(vector(q)?),
            },
            layers,
            norm: vector(norm)?,
            output: Quantised::new(output).map_err(load_err)?,
            inv_freq,
        })
    }

    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.config.layers,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one step. Generated rows must come before prompt rows. Returns
    /// the logits of each segment that asked for them, in segment order.
    pub fn forward(
        &self,
        segments: &[Segment<'_>],
        kv: &mut KvPool,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = self.config;
        let (h, hd) = (c.hidden, c.head_dim);
        // Per row: its segment and absolute position.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut quant_rows = 0;
        for (s, seg) in segments.iter().enumerate() {
            let end = seg.start + seg.tokens.len();
            if seg.tokens.is_empty() || end > seg.blocks.len() * BLOCK_TOKENS {
                candle_core::bail!("segment {s} is empty or outruns its blocks");
            }
            if !seg.prompt {
                if quant_rows != rows.len() {
                    candle_core::bail!("generated rows must precede prompt rows");
                }
                quant_rows += seg.tokens.len();
            }
            rows.extend((seg.start..end).map(|pos| (s, pos)));
        }
        let mut x = Vec::with_capacity(rows.len() * h);
        for seg in segments {
            for &t in seg.tokens {
                let t = t as usize;
                if t >= c.vocab {
                    candle_core::bail!("token {t} is outside the vocabulary");
                }
                match &self.embedding {
                    Embedding::Q8(m) => {
                        m.dequantize_row(t, &mut x);
                    }
                    Embedding::F32(table) => x.extend_from_slice(&table[t * h..(t + 1) * h]),
                }
            }
        }
        let heads = attention::Heads {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: hd,
        };
        let sequences: Vec<&[usize]> = segments.iter().map(|s| s.blocks).collect();
        // Each row's rotation angles, once for every layer and head.
        let half = self.inv_freq.len();
        let angles: Vec<(f32, f32)> = rows
            .iter()
            .flat_map(|&(_, pos)| {
                self.inv_freq
                    .iter()
                    .map(move |f| (pos as f32 * f).sin_cos())
            })
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&x, &layer.attn_norm, c.eps);
            let [mut q, mut k, v] = products(layer.qkv.apply(&normed, quant_rows)?)?;
            let kvw = c.kv_heads * hd;
            for (r, angles) in angles.chunks_exact(half.max(1)).enumerate() {
                self.rope(&mut q[r * h..(r + 1) * h], angles);
                self.rope(&mut k[r * kvw..(r + 1) * kvw], angles);
            }
            for (r, &(s, pos)) in rows.iter().enumerate() {
                let block = segments[s].blocks[pos / BLOCK_TOKENS];
                for g in 0..c.kv_heads {
                    let o = r * kvw + g * hd;
                    kv.write(
                        block,
                        pos % BLOCK_TOKENS,
                        l,
                        g,
                        &k[o..o + hd],
                        &v[o..o + hd],
                    );
                }
            }
            let attended = attention::attend(kv, l, heads, &rows, &sequences, &q);
            let o = layer.o.apply(&attended, quant_rows)?;
            add(&mut x, &o);
            let normed = rms_norm(&x, &layer.ffn_norm, c.eps);
            let [gate, up] = products(layer.gate_up.apply(&normed, quant_rows)?)?;
            let act = swiglu(&gate, &up);
            let down = layer.down.apply(&act, quant_rows)?;
            add(&mut x, &down);
        }
        // The last row of each segment that wants logits.
        let mut last_rows = Vec::new();
        let mut end = 0;
        for seg in segments {
            end += seg.tokens.len();
            if seg.logits {
                last_rows.extend_from_slice(&x[(end - 1) * h..end * h]);
            }
        }
        if last_rows.is_empty() {
            return Ok(Vec::new());
        }
        let normed = rms_norm(&last_rows, &self.norm, c.eps);
        let rows = normed.len() / h;
        let logits = self.output.forward(&normed, h)?;
        let width = logits.len() / rows;
        Ok(logits.chunks_exact(width).map(<[f32]>::to_vec).collect())
    }

    /// Rotates each head's interleaved pairs by its position's `angles`
    /// (sine and cosine per pair; GGUF stores llama's q/k weights permuted
    /// for this layout).
    fn rope(&self, x: &mut [f32], angles: &[(f32, f32)]) {
        let hd = self.config.head_dim;
        for head in x.chunks_exact_mut(hd) {
            for (i, &(sin, cos)) in angles.iter().enumerate() {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos - b * sin;
                head[2 * i + 1] = a * sin + b * cos;
            }
        }
    }
}

/// SiLU(gate) x up, the gate's `exp` eight lanes at a time (libm's, one
/// call per value, cost prefill a tenth of its time).
fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate.len());
    for (g, u) in gate.chunks(8).zip(up.chunks(8)) {
        let e = fastmath::exp8(std::array::from_fn(|i| g.get(i).map_or(0.0, |g| -g)));
        out.extend(g.iter().zip(u).zip(e).map(|((g, u), e)| g / (1.0 + e) * u));
    }
    out
}

/// Every layer matrix's shape (outputs, inputs) against what the header
/// implies. A model file may come from a tenant, and a step slices the
/// products by these widths (q, k and v come out of one stacked matrix):
/// a file that disagrees is refused at load, never sliced past in a step.
fn check_shapes(content: &gguf_file::Content, c: &Config) -> Result<(), EngineError> {
    let (h, kvw) = (c.hidden, c.kv_heads * c.head_dim);
    for i in 0..c.layers {
        let shape = |n: &str| -> Result<(String, Vec<usize>), EngineError> {
            let name = format!("blk.{i}.{n}.weight");
            match content.tensor_infos.get(&name) {
                Some(info) => Ok((name, info.shape.dims().to_vec())),
                None => Err(EngineError::Load(format!(
                    "the model file has no tensor {name}"
                ))),
            }
        };
        let (gate, gate_shape) = shape("ffn_gate")?;
        let ff = gate_shape.first().copied().unwrap_or(0);
        if ff == 0 {
            return Err(EngineError::Load(format!("{gate} has no outputs")));
        }
        for (n, want) in [
            ("attn_q", [h, h]),
            ("attn_k", [kvw, h]),
            ("attn_v", [kvw, h]),
            ("attn_output", [h, h]),
            ("ffn_gate", [ff, h]),
            ("ffn_up", [ff, h]),
            ("ffn_down", [h, ff]),
        ] {
            let (name, got) = shape(n)?;
            if got != want {
                return Err(EngineError::Load(format!(
                    "{name} is {got:?} where the header's sizes make it {want:?}"
                )));
            }
        }
    }
    Ok(())
}

/// A stack's products, as many as the caller's matrices.
fn products<const N: usize>(p: Vec<Vec<f32>>) -> candle_core::Result<[Vec<f32>; N]> {
    let n = p.len();
    p.try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{n} products where {N} were expected")))
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(weight.len()) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * scale * w));
    }
    out
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// A header and layer matrices shaped like SmolLM2's (two layers),
    /// with `bad` (a tensor name and shape) in place of the right one.
    fn content(bad: Option<(&str, (usize, usize))>) -> (gguf_file::Content, Config) {
        let config = Config {
            layers: 2,
            hidden: 576,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            rope_dim: 64,
            rope_base: 10_000.0,
            eps: 1e-5,
            vocab: 0,
        };
        let mut tensor_infos = std::collections::HashMap::new();
        for i in 0..config.layers {
            for (n, shape) in [
                ("attn_q", (576, 576)),
                ("attn_k", (192, 576)),
                ("attn_v", (192, 576)),
                ("attn_output", (576, 576)),
                ("ffn_gate", (1536, 576)),
                ("ffn_up", (1536, 576)),
                ("ffn_down", (576, 1536)),
            ] {
                let name = format!("blk.{i}.{n}.weight");
                let shape = match bad {
                    Some((b, s)) if b == name => s,
                    _ => shape,
                };
                let info = gguf_file::TensorInfo {
                    ggml_dtype: GgmlDType::Q8_0,
                    shape: shape.into(),
                    offset: 0,
                };
                tensor_infos.insert(name, info);
            }
        }
        let content = gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: Default::default(),
            tensor_infos,
            tensor_data_offset: 0,
        };
        (content, config)
    }

    #[test]
    fn a_model_files_matrices_must_have_the_shapes_its_header_implies() {
        // A tenant's file whose k is narrower than its header's heads
        // would have the step slice past it (q, k and v are read as one
        // stacked matrix and split by the file's shapes): refused at load.
        let (good, config) = content(None);
        assert!(check_shapes(&good, &config).is_ok());
        for (name, shape) in [
            ("blk.1.attn_k.weight", (128, 576)),
            ("blk.0.attn_q.weight", (576, 512)),
            ("blk.0.ffn_up.weight", (1024, 576)),
            ("blk.1.ffn_down.weight", (576, 1024)),
            ("blk.0.ffn_gate.weight", (0, 576)),
        ] {
            let (bad, config) = content(Some((name, shape)));
            match check_shapes(&bad, &config) {
                Err(EngineError::Load(m)) => assert!(m.contains(name), "{m}"),
                other => panic!("{name} {shape:?} was not refused: {other:?}"),
            }
        }
        let (mut missing, config) = content(None);
        missing.tensor_infos.remove("blk.1.attn_v.weight");
        assert!(check_shapes(&missing, &config).is_err());
    }

    #[test]
    fn memory_goes_to_the_cache_first_and_the_dense_copy_only_beside_enough_of_it() {
        // A model of ~260 MiB resident with a ~410 MiB dense copy.
        let (resident, dense) = (260 * MIB, 410 * MIB);
        let small = plan_memory(Some(1024 * MIB), resident, dense, 512 * MIB);
        assert_eq!(
            small,
            MemoryPlan {
                dense: false,
                kv_bytes: 512 * MIB
            }
        );
        let cramped = plan_memory(Some(700 * MIB), resident, dense, 512 * MIB);
        assert_eq!(
            cramped,
            MemoryPlan {
                dense: false,
                kv_bytes: (700 - 260 - 128) * MIB
            }
        );
        let roomy = plan_memory(Some(2048 * MIB), resident, dense, 512 * MIB);
        assert_eq!(
            roomy,
            MemoryPlan {
                dense: true,
                kv_bytes: 512 * MIB
            }
        );
        let tight = plan_memory(Some(300 * MIB), resident, dense, 512 * MIB);
        assert_eq!(
            tight,
            MemoryPlan {
                dense: false,
                kv_bytes: KV_MIN_BYTES
            }
        );
        let unlimited = plan_memory(None, resident, dense, 64 * MIB);
        assert_eq!(
            unlimited,
            MemoryPlan {
                dense: true,
                kv_bytes: 64 * MIB
            }
        );
        // A Q8_0 model has no dense copy to plan for.
        assert!(!plan_memory(None, resident, 0, 64 * MIB).dense);
        assert!(!plan_memory(Some(2048 * MIB), resident, 0, 512 * MIB).dense);
        let huge = plan_memory(Some(usize::MAX), usize::MAX, usize::MAX, usize::MAX);
        assert!(!huge.dense, "sums saturate, never wrap");
    }
}
