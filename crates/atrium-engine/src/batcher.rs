//! Continuous batching: one thread owns the model and the key/value pool and
//! runs steps. Between steps it takes in new requests and drops those whose
//! client has gone; each step batches one row for every sequence that is
//! generating plus chunks of waiting prompts, up to a token budget, so a
//! long prompt never stalls the streams already running (chunked prefill).
//!
//! Memory is the key/value pool. A request is admitted when its prompt
//! fits beside a reserve of one block per running sequence; when a growing
//! sequence still finds the pool empty, the most recently admitted sequence
//! is preempted: its blocks go back and it waits at the head of the queue,
//! to be recomputed from its prompt and what it has generated so far (its
//! client sees only a pause). vLLM makes the same choice; swapping to host
//! memory buys nothing on a CPU engine.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::chat::{GenerationEvent, SamplingParams};
use crate::detokenize::Detokenizer;
use crate::kv::{KvPool, BLOCK_TOKENS};
use crate::llama::{Llama, Segment};
use crate::logprobs::{self, TokenLogprob};
use crate::metrics::EngineMetrics;
use crate::structured::Matcher;
use crate::vocab::Vocab;

/// Limits of one replica's batching.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Rows in one step: every generating sequence's row, then prompt chunks.
    pub step_tokens: usize,
    /// Sequences computed together.
    pub max_running: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            step_tokens: 256,
            max_running: 32,
        }
    }
}

/// Blocks that hold `tokens` positions.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub events: mpsc::Sender<GenerationEvent>,
}

struct Sequence {
    /// Prompt, then every generated token; the last may not be computed yet.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose keys and values are in `blocks`.
    computed: usize,
    blocks: Vec<usize>,
    /// Leading blocks that are in the prefix cache.
    shared: usize,
    /// False once a block of ours duplicated a cached one: the chain of
    /// cached blocks cannot continue from a private block.
    sharing: bool,
    params: SamplingParams,
    sampler: LogitsProcessor,
    /// Where the output stands against `params.grammar`, if it has one.
    matcher: Option<Matcher>,
    /// Scores of tokens not yet sent with a delta.
    scored: Vec<TokenLogprob>,
    /// How often each generated token appeared, kept as they come (only
    /// when penalties ask for it) rather than recounted every step.
    generated: HashMap<u32, u32>,
    detok: Detokenizer,
    events: mpsc::Sender<GenerationEvent>,
    completion: usize,
    arrived: Instant,
    first_token: Option<Instant>,
}

impl Sequence {
    fn penalised(&self) -> bool {
        self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0
    }

    /// Lowers the logits of tokens already generated, as OpenAI's presence
    /// and frequency penalties do (the prompt's tokens are not counted).
    fn penalise(&self, logits: &mut [f32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        for (&t, &n) in &self.generated {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= presence + frequency * n as f32;
            }
        }
    }

    fn new(job: Job) -> Sequence {
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
        Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            shared: 0,
            sharing: true,
            sampler: LogitsProcessor::from_sampling(params.seed, sampling),
            matcher: params.grammar.as_ref().map(|g| g.start()),
            scored: Vec::new(),
            generated: HashMap::new(),
            detok: Detokenizer::new(params.stop.clone()),
            params,
            events,
            completion: 0,
            arrived: Instant::now(),
            first_token: None,
        }
    }

    /// One generated row rather than a chunk of prompt (or of recompute).
    fn generating(&self) -> bool {
        self.tokens.len() - self.computed == 1 && self.computed >= self.prompt_len
    }
}

pub(crate) struct Batcher {
    pub model: Llama,
    pub kv: KvPool,
    pub tokenizer: Tokenizer,
    pub eos: Vec<u32>,
    pub vocab: Vocab,
    pub limits: BatchLimits,
    pub queued: Arc<AtomicU64>,
    pub metrics: Arc<EngineMetrics>,
}

struct State {
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

/// What became of a sequence after a sampled token.
enum Outcome {
    Continue,
    /// With whether the held-back text is still to be sent (not after a
    /// stop sequence, which cuts it).
    Finished(&'static str, bool),
    Gone,
}

impl Batcher {
    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        let mut state = State {
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        loop {
            if state.running.is_empty() && state.waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => state.waiting.push_back(Sequence::new(job)),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                state.waiting.push_back(Sequence::new(job));
            }
            self.drop_cancelled(&mut state);
            self.admit(&mut state);
            if let Err(e) = self.step(&mut state) {
                for seq in state.running.drain(..) {
                    let _ = seq.events.try_send(GenerationEvent::Failed(e.to_string()));
                    self.kv.release(&seq.blocks);
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                }
            }
            self.publish(&state);
        }
    }

    fn publish(&self, state: &State) {
        let usage = self.kv.usage();
        let m = &self.metrics;
        m.running
            .store(state.running.len() as u64, Ordering::Relaxed);
        m.kv_blocks_used
            .store(usage.used_blocks as u64, Ordering::Relaxed);
        m.kv_blocks_cached
            .store(usage.cached_blocks as u64, Ordering::Relaxed);
    }

    /// A client that went away stops costing compute and memory.
    fn drop_cancelled(&mut self, state: &mut State) {
        let before = state.running.len() + state.waiting.len();
        let kv = &mut self.kv;
        state.running.retain(|s| {
            let gone = s.events.is_closed();
            if gone {
                kv.release(&s.blocks);
            }
            !gone
        });
        state.waiting.retain(|s| {
            let gone = s.events.is_closed();
            if gone {
                kv.release(&s.blocks);
            }
            !gone
        });
        let dropped = before - state.running.len() - state.waiting.len();
        if dropped > 0 {
            self.queued.fetch_sub(dropped as u64, Ordering::SeqCst);
            self.metrics
                .cancelled
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    fn admit(&mut self, state: &mut State) {
        while state.running.len() < self.limits.max_running {
            let Some(seq) = state.waiting.front() else {
                return;
            };
            let need = blocks_for(seq.tokens.len() + 1).saturating_sub(seq.blocks.len());
            if self.kv.available() < need + state.running.len() && !state.running.is_empty() {
                return;
            }
            let Some(mut seq) = state.waiting.pop_front() else {
                return;
            };
            if seq.computed == 0 {
                // Reuse whole cached blocks, but always compute the last
                // token: its logits give the first sample.
                let most = (seq.tokens.len() - 1) / BLOCK_TOKENS;
                let salt = seq.params.cache_salt.clone();
                let found = self.kv.lookup(salt.as_deref(), &seq.tokens, most);
                seq.computed = found.len() * BLOCK_TOKENS;
                seq.shared = found.len();
                seq.blocks = found;
                self.metrics
                    .prefix_cached_tokens
                    .fetch_add(seq.computed as u64, Ordering::Relaxed);
            }
            state.running.push(seq);
        }
    }

    /// Sends the most recently admitted sequence back to wait, keeping what
    /// it generated; it will be recomputed when memory allows.
    fn preempt(&mut self, state: &mut State) {
        if let Some(mut seq) = state.running.pop() {
            self.kv.release(&seq.blocks);
            seq.blocks.clear();
            seq.computed = 0;
            seq.shared = 0;
            seq.sharing = true;
            self.metrics.preempted.fetch_add(1, Ordering::Relaxed);
            state.waiting.push_front(seq);
        }
    }

    /// Plans and runs one step.
    fn step(&mut self, state: &mut State) -> candle_core::Result<()> {
        let generating = state.running.iter().filter(|s| s.generating()).count();
        let mut prompt_budget = self.limits.step_tokens.saturating_sub(generating);
        let mut rows = Vec::with_capacity(state.running.len());
        let mut i = 0;
        while i < state.running.len() {
            let seq = &state.running[i];
            let len = if seq.generating() {
                1
            } else {
                (seq.tokens.len() - seq.computed).min(prompt_budget)
            };
            let end = seq.computed + len;
            while len > 0
                && state.running.len() > i
                && state.running[i].blocks.len() * BLOCK_TOKENS < end
            {
                match self.kv.allocate() {
                    Some(b) => state.running[i].blocks.push(b),
                    None => self.preempt(state),
                }
            }
            if i >= state.running.len() {
                break;
            }
            if !state.running[i].generating() {
                prompt_budget -= len;
            }
            rows.push(len);
            i += 1;
        }
        let order: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i] > 0 && state.running[i].generating())
            .chain((0..rows.len()).filter(|&i| rows[i] > 0 && !state.running[i].generating()))
            .collect();
        if order.is_empty() {
            return Ok(());
        }
        let segments: Vec<Segment<'_>> = order
            .iter()
            .map(|&i| {
                let s = &state.running[i];
                let end = s.computed + rows[i];
                Segment {
                    tokens: &s.tokens[s.computed..end],
                    start: s.computed,
                    blocks: &s.blocks,
                    prompt: !s.generating(),
                    logits: end == s.tokens.len(),
                }
            })
            .collect();
        let logits = self.model.forward(&segments, &mut self.kv)?;
        drop(segments);
        let mut logits = logits.into_iter();
        let mut finished = Vec::new();
        for &i in &order {
            let seq = &mut state.running[i];
            seq.computed += rows[i];
            self.share_prompt_blocks(seq);
            if seq.computed < seq.tokens.len() {
                continue;
            }
            let Some(mut row) = logits.next() else {
                candle_core::bail!("the model returned too few logits");
            };
            seq.penalise(&mut row);
            let Some(next) = self.sample(seq, &mut row)? else {
                finished.push((i, Some(("stop", true))));
                continue;
            };
            if let (Some(top), false) = (seq.params.logprobs, self.eos.contains(&next)) {
                let scored = logprobs::score(&row, next, top, |id| self.token_bytes(id));
                seq.scored.push(scored);
            }
            match self.accept(seq, next) {
                Outcome::Continue => {}
                Outcome::Finished(reason, flush) => finished.push((i, Some((reason, flush)))),
                Outcome::Gone => finished.push((i, None)),
            }
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let seq = state.running.remove(i);
            self.finish(seq, reason);
        }
        Ok(())
    }

    /// Offers the sequence's newly completed prompt blocks to the prefix cache.
    fn share_prompt_blocks(&mut self, seq: &mut Sequence) {
        let complete = seq.computed.min(seq.prompt_len) / BLOCK_TOKENS;
        while seq.sharing && seq.shared < complete {
            let n = seq.shared;
            let previous = n.checked_sub(1).map(|p| seq.blocks[p]);
            let tokens = &seq.tokens[n * BLOCK_TOKENS..(n + 1) * BLOCK_TOKENS];
            let salt = seq.params.cache_salt.as_deref();
            if self.kv.register(seq.blocks[n], previous, salt, tokens) {
                seq.shared += 1;
            } else {
                seq.sharing = false;
            }
        }
    }

    /// The next token, as the sampler picks it from `row` among those the
    /// sequence's grammar allows; `None` when the grammar allows none.
    ///
    /// The sampler picks from the whole row; a pick the grammar refuses is
    /// struck out and the sampler picks again, a few times, before every
    /// token the grammar allows is found and the rest masked out. Either
    /// way each allowed token gets its share of the allowed mass, as
    /// masking first would (exactly so without top_p, whose nucleus is
    /// taken from the row as it stands), and the vocabulary is walked only
    /// when the model keeps reaching outside the grammar.
    ///
    /// `row` is taken (left empty) when nothing reads it afterwards: no
    /// grammar and no logprobs, the common case, costs no copy of it.
    fn sample(&self, seq: &mut Sequence, row: &mut Vec<f32>) -> candle_core::Result<Option<u32>> {
        const STRIKES: usize = 8;
        let len = row.len();
        let Some((grammar, matcher)) = seq.params.grammar.clone().zip(seq.matcher.take()) else {
            let logits = match seq.params.logprobs {
                None => Tensor::from_vec(std::mem::take(row), len, &Device::Cpu)?,
                Some(_) => Tensor::from_slice(row, len, &Device::Cpu)?,
            };
            return seq.sampler.sample(&logits).map(Some);
        };
        let mut row = row.clone();
        let after = |token: u32| -> Option<Matcher> {
            if self.eos.contains(&token) {
                return matcher.can_end().then(|| matcher.clone());
            }
            matcher.feed(&grammar, self.vocab.bytes(token)?)
        };
        for _ in 0..STRIKES {
            let pick = seq
                .sampler
                .sample(&Tensor::from_vec(row.clone(), len, &Device::Cpu)?)?;
            if let Some(next) = after(pick) {
                seq.matcher = Some(next);
                return Ok(Some(pick));
            }
            if let Some(l) = row.get_mut(pick as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let mut allowed = self.vocab.allowed(&grammar, &matcher);
        if matcher.can_end() {
            allowed.extend_from_slice(&self.eos);
        }
        let mut masked = vec![f32::NEG_INFINITY; len];
        for &t in &allowed {
            if let (Some(m), Some(l)) = (masked.get_mut(t as usize), row.get(t as usize)) {
                *m = *l;
            }
        }
        if masked.iter().all(|l| l.is_infinite()) {
            return Ok(None);
        }
        let pick = seq
            .sampler
            .sample(&Tensor::from_vec(masked, len, &Device::Cpu)?)?;
        seq.matcher = after(pick);
        Ok(seq.matcher.is_some().then_some(pick))
    }

    /// What a token writes, for its logprobs: its bytes, or a control
    /// token's name.
    fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.vocab.bytes(id) {
            Some(b) => b.to_vec(),
            None => self
                .tokenizer
                .id_to_token(id)
                .unwrap_or_default()
                .into_bytes(),
        }
    }

    /// Sends the scores of the tokens so far, before the text they make.
    fn send_scores(seq: &mut Sequence) -> Result<(), ()> {
        if seq.scored.is_empty() {
            return Ok(());
        }
        let scored = std::mem::take(&mut seq.scored);
        seq.events
            .try_send(GenerationEvent::Logprobs(scored))
            .map_err(|_| ())
    }

    /// Applies a sampled token: end of text, stop sequence, length, or on.
    fn accept(&self, seq: &mut Sequence, next: u32) -> Outcome {
        let now = Instant::now();
        if seq.first_token.is_none() {
            seq.first_token = Some(now);
            self.metrics
                .record_prefill(seq.prompt_len, now.duration_since(seq.arrived));
        }
        if self.eos.contains(&next) {
            return Outcome::Finished("stop", true);
        }
        seq.completion += 1;
        let (delta, stopped) = seq.detok.push(&self.tokenizer, next);
        // The channel holds a delta and a logprobs event per token and a few
        // more (chat::generate), so it is never full.
        if !delta.is_empty()
            && (Self::send_scores(seq).is_err()
                || seq.events.try_send(GenerationEvent::Delta(delta)).is_err())
        {
            return Outcome::Gone;
        }
        if stopped {
            return Outcome::Finished("stop", false);
        }
        if seq.completion >= seq.params.max_tokens {
            return Outcome::Finished("length", true);
        }
        // A whole document that nothing may follow ends the output.
        if let (Some(g), Some(m)) = (&seq.params.grammar, &seq.matcher) {
            if m.must_end(g) {
                return Outcome::Finished("stop", true);
            }
        }
        seq.tokens.push(next);
        if seq.penalised() {
            *seq.generated.entry(next).or_default() += 1;
        }
        Outcome::Continue
    }

    fn finish(&mut self, mut seq: Sequence, reason: Option<(&'static str, bool)>) {
        self.kv.release(&seq.blocks);
        self.queued.fetch_sub(1, Ordering::SeqCst);
        let Some((finish_reason, flush)) = reason else {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let rest = if flush {
            seq.detok.flush(&self.tokenizer)
        } else {
            String::new()
        };
        let _ = Self::send_scores(&mut seq);
        if !rest.is_empty() {
            let _ = seq.events.try_send(GenerationEvent::Delta(rest));
        }
        if let Some(first) = seq.first_token {
            self.metrics.record_decode(seq.completion, first.elapsed());
        }
        let _ = seq.events.try_send(GenerationEvent::Done {
            finish_reason,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.completion,
        });
    }
}
