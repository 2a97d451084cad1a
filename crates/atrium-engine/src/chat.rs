//! Text generation with a llama-architecture GGUF model on the CPU.
//!
//! The tokenizer is rebuilt from the GGUF metadata (`tokenizer.ggml.*`:
//! byte-level BPE vocabulary and merges), so a single `.gguf` file is the
//! whole model. Generation runs on one thread that owns the model and
//! batches every admitted request into each step (see `batcher`); requests
//! beyond the queue limit are refused with `Busy`, so overload is a clear 429
//! rather than a pile of slow requests.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};
use tokio::sync::mpsc;

use crate::batcher::{blocks_for, BatchLimits, Batcher, Job};
use crate::kv::{KvPool, BLOCK_TOKENS};
use crate::llama::{plan_memory, Llama};
use crate::logprobs::TokenLogprob;
use crate::metrics::EngineMetrics;
use crate::structured::Grammar;
use crate::template::ChatTemplate;
use crate::vocab::Vocab;
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
                        // Chat's parts, and the Responses API's.
                        ("text" | "input_text" | "output_text", Some(t)) => out.push_str(t),
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
    /// OpenAI's penalties (-2 to 2): each generated token's logit loses
    /// `presence` once it has appeared and `frequency` per appearance.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Requests share cached prompt blocks only under the same salt (the
    /// gateway sets one per tenant).
    pub cache_salt: Option<String>,
    /// `response_format`'s grammar: only tokens it allows are taken.
    pub grammar: Option<Arc<Grammar>>,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens`, nothing else asked: what
    /// benchmarks and equality checks run.
    pub fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_p: None,
            seed: 0,
            max_tokens,
            stop: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            cache_salt: None,
            grammar: None,
            logprobs: None,
        }
    }
}

/// What a generation job reports, in order: deltas, then one `Done`.
#[derive(Debug)]
pub enum GenerationEvent {
    /// The scores of the tokens of the delta that follows (or, last, of
    /// tokens whose text was cut or never shown).
    Logprobs(Vec<TokenLogprob>),
    Delta(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// A loaded chat model and its generation thread.
pub struct ChatModel {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    jobs: std::sync::mpsc::SyncSender<Job>,
    queued: Arc<AtomicU64>,
    queue_limit: u64,
    kv_blocks: usize,
    metrics: Arc<EngineMetrics>,
}

/// How much a chat replica may take on.
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    /// Requests running or waiting before more get 429.
    pub max_queue: usize,
    /// Memory for keys and values of every sequence, in MiB.
    pub kv_cache_mib: usize,
    /// The replica's memory limit, when it has one: the cache and the
    /// dense prefill copy are fitted under it.
    pub memory_mib: Option<usize>,
    pub batch: BatchLimits,
}

impl ChatLimits {
    pub fn new(max_queue: usize, kv_cache_mib: usize) -> ChatLimits {
        ChatLimits {
            max_queue,
            kv_cache_mib,
            memory_mib: None,
            batch: BatchLimits::default(),
        }
    }
}

/// The default key/value budget of a chat replica: SmolLM2-135M needs
/// 45 KiB per position, so this holds about 11,000 positions in flight.
pub const DEFAULT_KV_CACHE_MIB: usize = 512;

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
/// The tokenizer, the end-of-text tokens, and each token's bytes.
fn tokenizer_from_gguf(
    content: &gguf_file::Content,
) -> Result<(Tokenizer, Vec<u32>, Vocab), EngineError> {
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
    let vocab = Vocab::new(&tokens, &types);
    Ok((tokenizer, eos, vocab))
}

impl ChatModel {
    /// Loads a GGUF file and starts the batching thread.
    pub fn load(
        path: &Path,
        limits: ChatLimits,
        metrics: Arc<EngineMetrics>,
    ) -> Result<ChatModel, EngineError> {
        let started = std::time::Instant::now();
        let file = std::fs::File::open(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        // The metadata is a hundred thousand small strings (the vocabulary
        // and its merges): read unbuffered, each was two system calls, a
        // third of a replica's start.
        let mut metadata = std::io::BufReader::with_capacity(1 << 20, file);
        let content = gguf_file::Content::read(&mut metadata)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let mut file = metadata.into_inner();
        let arch = metadata_str(&content, "general.architecture").unwrap_or("");
        if arch != "llama" {
            return Err(EngineError::Load(format!(
                "architecture {arch:?} is not supported; only llama is"
            )));
        }
        let (tokenizer, eos, vocab) = tokenizer_from_gguf(&content)?;
        let token_text = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            metadata_str(&content, "tokenizer.chat_template"),
            &token_text("tokenizer.ggml.bos_token_id"),
            &token_text("tokenizer.ggml.eos_token_id"),
        )?;
        let (resident, dense) = Llama::footprint(&content);
        let plan = plan_memory(
            limits.memory_mib.map(|m| m.saturating_mul(1 << 20)),
            resident,
            dense,
            limits.kv_cache_mib.saturating_mul(1 << 20),
        );
        let model = Llama::load(content, &mut file, plan.dense)?;
        let shape = model.kv_shape();
        let kv_blocks = plan.kv_bytes / shape.block_bytes().max(1);
        if kv_blocks == 0 {
            return Err(EngineError::Load(format!(
                "a key/value cache of {} bytes holds no block of {} bytes",
                plan.kv_bytes,
                shape.block_bytes()
            )));
        }
        tracing::info!(
            dense_prefill = plan.dense,
            kv_cache_mib = plan.kv_bytes >> 20,
            kv_positions = kv_blocks * BLOCK_TOKENS,
            load_ms = started.elapsed().as_millis() as u64,
            "chat model loaded"
        );
        metrics
            .kv_blocks_capacity
            .store(kv_blocks as u64, Ordering::Relaxed);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(limits.max_queue.max(1));
        let queued = Arc::new(AtomicU64::new(0));
        let batcher = Batcher {
            model,
            kv: KvPool::new(shape, kv_blocks),
            tokenizer: tokenizer.clone(),
            eos,
            vocab,
            limits: limits.batch,
            queued: queued.clone(),
            metrics: metrics.clone(),
        };
        // The loop runs on a worker of its own pool, so each step's parallel
        // products start on the calling thread instead of waking another
        // and sleeping until it is done (hundreds of times per token).
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("atrium-generate-{i}"))
            .build()
            .map_err(|e| EngineError::Load(format!("cannot start the generation threads: {e}")))?;
        std::thread::Builder::new()
            .name("atrium-generate".into())
            .spawn(move || pool.install(move || batcher.run(rx)))
            .map_err(|e| EngineError::Load(format!("cannot start the generation thread: {e}")))?;
        Ok(ChatModel {
            tokenizer,
            template,
            jobs,
            queued,
            queue_limit: limits.max_queue as u64,
            kv_blocks,
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
        self.template.render(&turns)
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
        // A request the whole cache cannot hold would wait forever.
        let needed = blocks_for(prompt.len() + params.max_tokens);
        if needed > self.kv_blocks {
            return Err(EngineError::BadRequest(format!(
                "prompt ({} tokens) + max_tokens ({}) needs {} positions of key/value cache; \
                 this replica holds {}: lower max_tokens",
                prompt.len(),
                params.max_tokens,
                needed * BLOCK_TOKENS,
                self.kv_blocks * BLOCK_TOKENS
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
        // Room for every event a generation can send: the batcher never waits
        // on a slow client.
        // A delta per token at most, each after its logprobs when asked.
        let per_token = if params.logprobs.is_some() { 2 } else { 1 };
        let (tx, rx) = mpsc::channel(params.max_tokens * per_token + 4);
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
