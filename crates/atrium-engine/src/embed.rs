//! Sentence embeddings with a BERT model (safetensors + tokenizer.json) on
//! the CPU: mean pooling over real tokens, then L2 normalisation, computed
//! for a whole batch of inputs in one forward pass.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::metrics::EngineMetrics;
use crate::EngineError;

/// Longest input, in tokens; longer inputs are truncated (as sentence-
/// transformers does for this model family).
pub const MAX_TOKENS: usize = 256;
/// Most inputs one request may embed.
pub const MAX_BATCH: usize = 256;

pub struct EmbeddingModel {
    model: BertModel,
    tokenizer: Tokenizer,
    pub dimensions: usize,
    metrics: Arc<EngineMetrics>,
}

/// One embedded batch.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
}

impl EmbeddingModel {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path, metrics: Arc<EngineMetrics>) -> Result<EmbeddingModel, EngineError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| EngineError::Load(format!("{}: {e}", dir.join(name).display())))
        };
        let config: Config = serde_json::from_str(&read("config.json")?)
            .map_err(|e| EngineError::Load(format!("config.json: {e}")))?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| EngineError::Load(format!("tokenizer.json: {e}")))?;
        // The file pads every input to 128; batch to the longest instead and
        // allow up to MAX_TOKENS.
        let pad_id = tokenizer.get_padding().map(|p| p.pad_id).unwrap_or(0);
        let pad_token = tokenizer
            .get_padding()
            .map(|p| p.pad_token.clone())
            .unwrap_or_else(|| "[PAD]".into());
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| EngineError::Load(format!("truncation: {e}")))?;
        let device = Device::Cpu;
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &device)
            .map_err(|e| EngineError::Load(format!("model.safetensors: {e}")))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model =
            BertModel::load(vb, &config).map_err(|e| EngineError::Load(format!("BERT: {e}")))?;
        Ok(EmbeddingModel {
            model,
            tokenizer,
            dimensions: config.hidden_size,
            metrics,
        })
    }

    /// Embeds `inputs` as unit vectors, in order.
    pub fn embed(&self, inputs: &[String]) -> Result<Embedded, EngineError> {
        if inputs.is_empty() {
            return Err(EngineError::BadRequest("input must not be empty".into()));
        }
        if inputs.len() > MAX_BATCH {
            return Err(EngineError::BadRequest(format!(
                "at most {MAX_BATCH} inputs per request, got {}",
                inputs.len()
            )));
        }
        let started = Instant::now();
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|e| EngineError::BadRequest(format!("cannot tokenize the input: {e}")))?;
        let prompt_tokens: usize = encodings
            .iter()
            .map(|e| e.get_attention_mask().iter().filter(|m| **m == 1).count())
            .sum();
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let device = Device::Cpu;
            let rows =
                |f: &dyn Fn(&tokenizers::Encoding) -> Vec<u32>| -> candle_core::Result<Tensor> {
                    let rows: Vec<Tensor> = encodings
                        .iter()
                        .map(|e| Tensor::new(f(e).as_slice(), &device))
                        .collect::<candle_core::Result<_>>()?;
                    Tensor::stack(&rows, 0)
                };
            let ids = rows(&|e| e.get_ids().to_vec())?;
            let type_ids = rows(&|e| e.get_type_ids().to_vec())?;
            let mask = rows(&|e| e.get_attention_mask().to_vec())?;
            let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
            // Mean over real tokens only: padding must not pull the average.
            let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?;
            let counts = mask_f.sum(1)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        let vectors = run().map_err(|e| EngineError::Internal(format!("embedding failed: {e}")))?;
        self.metrics
            .record_embeddings(inputs.len(), prompt_tokens, started.elapsed());
        Ok(Embedded {
            vectors,
            prompt_tokens,
        })
    }
}
