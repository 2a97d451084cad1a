//! Text generation with a llama-architecture GGUF model on the CPU.
//!
//! The tokenizer is rebuilt from the GGUF metadata (`tokenizer.ggml.*`:
//! byte-level BPE vocabulary and merges), so a single `.gguf` file is the
//! whole model. Generation runs on one dedicated thread that owns the model;
//! requests wait in a bounded queue and are refused with `Busy` when it is
//! full, so overload is a clear 429 rather than a pile of slow requests.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};
use tokio::sync::mpsc;

use crate::metrics::EngineMetrics;
use crate::EngineError;

/// Longest sequence (prompt + completion) the model code supports.
pub const MAX_CONTEXT: usize = 4096;

/// One turn of a conversation.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: MessageContent,
}

/// OpenAI allows a string or a list of typed parts; text parts are joined.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl MessageContent {
    pub fn text(&self) -> Result<String, EngineError> {
        match self {
            MessageContent::Text(t) => Ok(t.clone()),
            MessageContent::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(EngineError::BadRequest(format!(
                                "content part of type {kind:?} is not supported; send text"
                            )))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// How to choose tokens.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

/// What a generation job reports, in order: deltas, then one `Done`.
#[derive(Debug)]
pub enum GenerationEvent {
    Delta(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    events: mpsc::Sender<GenerationEvent>,
}

/// A loaded chat model and its generation thread.
pub struct ChatModel {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    jobs: std::sync::mpsc::SyncSender<Job>,
    queued: Arc<AtomicU64>,
    queue_limit: u64,
    metrics: Arc<EngineMetrics>,
}

/// The ChatML template SmolLM2 and many others use, with the default system
/// prompt taken from the model's own template.
#[derive(Debug, Clone)]
struct ChatTemplate {
    default_system: Option<String>,
}

impl ChatTemplate {
    fn from_gguf(template: Option<&str>) -> Result<Self, EngineError> {
        let Some(t) = template else {
            return Ok(ChatTemplate {
                default_system: None,
            });
        };
        if !t.contains("<|im_start|>") {
            return Err(EngineError::Load(
                "the model's chat template is not ChatML (<|im_start|>); only ChatML is supported"
                    .into(),
            ));
        }
        // `{{ '<|im_start|>system\n<default prompt><|im_end|>\n' }}`
        let marker = "'<|im_start|>system\n";
        let default_system = t.find(marker).and_then(|i| {
            let rest = &t[i + marker.len()..];
            rest.find("<|im_end|>").map(|j| rest[..j].to_string())
        });
        Ok(ChatTemplate { default_system })
    }

    fn render(&self, messages: &[(String, String)]) -> String {
        let mut out = String::new();
        if let (Some(system), Some((role, _))) = (&self.default_system, messages.first()) {
            if role != "system" {
                out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
            }
        }
        for (role, content) in messages {
            out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        out.push_str("<|im_start|>assistant\n");
        out
    }
}

fn metadata_str<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a str> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .map(|s| s.as_str())
}

fn metadata_strings(content: &gguf_file::Content, key: &str) -> Result<Vec<String>, EngineError> {
    let value = content
        .metadata
        .get(key)
        .ok_or_else(|| EngineError::Load(format!("GGUF metadata has no {key}")))?;
    let items = value
        .to_vec()
        .map_err(|e| EngineError::Load(format!("{key}: {e}")))?;
    items
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| EngineError::Load(format!("{key}: {e}")))
        })
        .collect()
}

/// Rebuilds the byte-level BPE tokenizer stored in GGUF metadata.
fn tokenizer_from_gguf(content: &gguf_file::Content) -> Result<(Tokenizer, Vec<u32>), EngineError> {
    let model = metadata_str(content, "tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(EngineError::Load(format!(
            "tokenizer model {model:?} is not supported; only byte-level BPE (gpt2) is"
        )));
    }
    let tokens = metadata_strings(content, "tokenizer.ggml.tokens")?;
    let merges = metadata_strings(content, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| EngineError::Load(e.to_string()))?
            .iter()
            .map(|t| t.to_i32().map(i64::from).unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| EngineError::Load(format!("BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    // As SmolLM2's own tokenizer: digits one by one, then GPT-2's byte-level split.
    let pre = match metadata_str(content, "tokenizer.ggml.pre") {
        Some("smollm") => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ]),
        _ => Sequence::new(vec![ByteLevel::new(false, true, true).into()]),
    };
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3) are matched whole and never split.
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == 3)
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    let mut eos = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id"] {
        if let Some(id) = content.metadata.get(key).and_then(|v| v.to_u32().ok()) {
            eos.push(id);
        }
    }
    for name in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tokens.iter().position(|t| t == name) {
            eos.push(id as u32);
        }
    }
    eos.sort_unstable();
    eos.dedup();
    Ok((tokenizer, eos))
}

impl ChatModel {
    /// Loads a GGUF file and starts the generation thread.
    pub fn load(
        path: &Path,
        queue_limit: usize,
        metrics: Arc<EngineMetrics>,
    ) -> Result<ChatModel, EngineError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let arch = metadata_str(&content, "general.architecture").unwrap_or("");
        if arch != "llama" {
            return Err(EngineError::Load(format!(
                "architecture {arch:?} is not supported; only llama is"
            )));
        }
        let (tokenizer, eos) = tokenizer_from_gguf(&content)?;
        let template = ChatTemplate::from_gguf(metadata_str(&content, "tokenizer.chat_template"))?;
        let device = Device::Cpu;
        let model = ModelWeights::from_gguf(content, &mut file, &device)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(queue_limit.max(1));
        let queued = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            eos,
            queued: queued.clone(),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("atrium-generate".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| EngineError::Load(format!("cannot start the generation thread: {e}")))?;
        Ok(ChatModel {
            tokenizer,
            template,
            jobs,
            queued,
            queue_limit: queue_limit as u64,
            metrics,
        })
    }

    pub fn render_chat(&self, messages: &[Message]) -> Result<String, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::BadRequest("messages must not be empty".into()));
        }
        let mut turns = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !["system", "user", "assistant", "developer"].contains(&m.role.as_str()) {
                return Err(EngineError::BadRequest(format!(
                    "messages[{i}].role {:?} is not one of system, developer, user, assistant",
                    m.role
                )));
            }
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role.clone()
            };
            turns.push((role, m.content.text()?));
        }
        Ok(self.template.render(&turns))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::BadRequest(format!("cannot tokenize the prompt: {e}")))
    }

    /// Queues a generation; events arrive on the returned receiver.
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<mpsc::Receiver<GenerationEvent>, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::BadRequest("the prompt is empty".into()));
        }
        // A client's max_tokens may be anything up to u64::MAX: no sum may wrap.
        if prompt.len().saturating_add(params.max_tokens) > MAX_CONTEXT {
            return Err(EngineError::BadRequest(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context length of {MAX_CONTEXT}",
                prompt.len(),
                params.max_tokens
            )));
        }
        // Counted before sending so the depth never under-reports.
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.queue_limit {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(EngineError::Busy(format!(
                "{} requests are already queued",
                self.queue_limit
            )));
        }
        let (tx, rx) = mpsc::channel(256);
        self.jobs
            .try_send(Job {
                prompt,
                params,
                events: tx,
            })
            .map_err(|_| {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                EngineError::Busy("the generation queue is full".into())
            })?;
        Ok(rx)
    }

    pub fn queue_depth(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

struct Worker {
    model: ModelWeights,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    queued: Arc<AtomicU64>,
    metrics: Arc<EngineMetrics>,
}

/// Turns a growing list of generated tokens into text deltas, holding back
/// bytes that do not yet form whole characters and text that could still
/// become a stop sequence.
struct Detokenizer {
    tokens: Vec<u32>,
    emitted: usize,
    stop: Vec<String>,
    hold_back: usize,
}

impl Detokenizer {
    fn new(stop: Vec<String>) -> Self {
        let hold_back = stop.iter().map(|s| s.len()).max().unwrap_or(0);
        Detokenizer {
            tokens: Vec::new(),
            emitted: 0,
            stop,
            hold_back,
        }
    }

    /// Adds a token; returns (delta to emit, whether a stop sequence ended
    /// the text).
    fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> (String, bool) {
        self.tokens.push(token);
        let text = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        if text.ends_with('\u{FFFD}') {
            return (String::new(), false);
        }
        if let Some(cut) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            let delta = text.get(self.emitted..cut).unwrap_or("").to_string();
            self.emitted = cut.max(self.emitted);
            return (delta, true);
        }
        let mut safe = text.len().saturating_sub(self.hold_back).max(self.emitted);
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        let delta = text.get(self.emitted..safe).unwrap_or("").to_string();
        self.emitted = safe.max(self.emitted);
        (delta, false)
    }

    /// The text still held back, at the end.
    fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        let text = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        let rest = text
            .get(self.emitted..)
            .unwrap_or("")
            .trim_end_matches('\u{FFFD}')
            .to_string();
        self.emitted = text.len();
        rest
    }
}

impl Worker {
    fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            self.metrics.running.fetch_add(1, Ordering::Relaxed);
            let events = job.events.clone();
            if let Err(e) = self.generate(job) {
                let _ = events.blocking_send(GenerationEvent::Failed(e.to_string()));
            }
            self.metrics.running.fetch_sub(1, Ordering::Relaxed);
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn generate(&mut self, job: Job) -> candle_core::Result<()> {
        let Job {
            prompt,
            params,
            events,
        } = job;
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match params.top_p {
                Some(p) if p > 0.0 && p < 1.0 => Sampling::TopP {
                    p,
                    temperature: params.temperature,
                },
                _ => Sampling::All {
                    temperature: params.temperature,
                },
            }
        };
        let mut logits_processor = LogitsProcessor::from_sampling(params.seed, sampling);
        let device = Device::Cpu;
        let started = Instant::now();
        let input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
        let logits = self.model.forward(&input, 0)?.squeeze(0)?;
        let mut next = logits_processor.sample(&logits)?;
        let prefill = started.elapsed();
        self.metrics.record_prefill(prompt.len(), prefill);
        let decode_started = Instant::now();
        let mut detok = Detokenizer::new(params.stop.clone());
        let mut completion = 0usize;
        let mut finish_reason = "length";
        let mut hit_stop_sequence = false;
        while completion < params.max_tokens {
            if self.eos.contains(&next) {
                finish_reason = "stop";
                break;
            }
            completion += 1;
            let (delta, stopped) = detok.push(&self.tokenizer, next);
            if !delta.is_empty() && events.blocking_send(GenerationEvent::Delta(delta)).is_err() {
                // The client went away: stop spending compute on it.
                return Ok(());
            }
            if stopped {
                finish_reason = "stop";
                hit_stop_sequence = true;
                break;
            }
            if completion == params.max_tokens {
                break;
            }
            let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            let logits = self
                .model
                .forward(&input, prompt.len() + completion - 1)?
                .squeeze(0)?;
            next = logits_processor.sample(&logits)?;
        }
        if !hit_stop_sequence {
            let rest = detok.flush(&self.tokenizer);
            if !rest.is_empty() {
                let _ = events.blocking_send(GenerationEvent::Delta(rest));
            }
        }
        self.metrics
            .record_decode(completion, decode_started.elapsed());
        let _ = events.blocking_send(GenerationEvent::Done {
            finish_reason,
            prompt_tokens: prompt.len(),
            completion_tokens: completion,
        });
        Ok(())
    }
}
