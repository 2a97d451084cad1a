//! A simulated engine for load tests of everything above it: no model, only
//! the timing of one — a time to first token, a gap between tokens, a limit
//! on sequences computed at once and on requests waiting for one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use crate::chat::GenerationEvent;
use crate::metrics::EngineMetrics;
use crate::EngineError;

/// The context length the simulated engine pretends its model has.
pub const SIMULATED_CONTEXT: usize = 32_768;

#[derive(Debug, Clone)]
pub struct SimulatedConfig {
    pub time_to_first_token: Duration,
    pub inter_token_latency: Duration,
    pub max_concurrent: usize,
    pub max_queue: usize,
}

pub struct SimulatedEngine {
    config: SimulatedConfig,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicU64>,
    metrics: Arc<EngineMetrics>,
}

impl SimulatedEngine {
    pub fn new(config: SimulatedConfig, metrics: Arc<EngineMetrics>) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_concurrent.max(1)));
        SimulatedEngine {
            config,
            slots,
            waiting: Arc::new(AtomicU64::new(0)),
            metrics,
        }
    }

    /// Roughly one token per four bytes, as real tokenizers average on English.
    pub fn count_tokens(text: &str) -> usize {
        text.len().div_ceil(4).max(1)
    }

    pub fn queue_depth(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed) + self.metrics.running.load(Ordering::Relaxed)
    }

    /// Starts a simulated generation of `max_tokens` tokens.
    pub fn generate(
        &self,
        prompt_tokens: usize,
        max_tokens: usize,
    ) -> Result<mpsc::Receiver<GenerationEvent>, EngineError> {
        // A model's context bounds a generation; without one, a client's
        // max_tokens of 10^12 would keep a slot busy for good.
        if prompt_tokens.saturating_add(max_tokens) > SIMULATED_CONTEXT {
            return Err(EngineError::BadRequest(format!(
                "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the \
                 context length of {SIMULATED_CONTEXT}"
            )));
        }
        // Admission is decided here, synchronously, so concurrent callers
        // see exact limits: a free slot, else a place in the queue, else 429.
        let ready = self.slots.clone().try_acquire_owned().ok();
        if ready.is_none() {
            let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
            if waiting >= self.config.max_queue as u64 {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(EngineError::Busy(format!(
                    "{} requests are already queued",
                    self.config.max_queue
                )));
            }
        }
        let (tx, rx) = mpsc::channel(64);
        let (slots, waiting, metrics, config) = (
            self.slots.clone(),
            self.waiting.clone(),
            self.metrics.clone(),
            self.config.clone(),
        );
        tokio::spawn(async move {
            let _permit = match ready {
                Some(p) => p,
                None => {
                    let p = slots.acquire_owned().await;
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    match p {
                        Ok(p) => p,
                        Err(_) => return,
                    }
                }
            };
            metrics.running.fetch_add(1, Ordering::Relaxed);
            let started = tokio::time::Instant::now();
            // A zero sleep still waits for the timer's next 1 ms tick.
            if !config.time_to_first_token.is_zero() {
                tokio::time::sleep(config.time_to_first_token).await;
            }
            metrics.record_prefill(prompt_tokens, started.elapsed());
            let decode_started = tokio::time::Instant::now();
            let mut sent = 0;
            for i in 0..max_tokens {
                if i > 0 && !config.inter_token_latency.is_zero() {
                    tokio::time::sleep(config.inter_token_latency).await;
                }
                if tx
                    .send(GenerationEvent::Delta(format!("tok{i} ")))
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            metrics.record_decode(sent, decode_started.elapsed());
            metrics.running.fetch_sub(1, Ordering::Relaxed);
            let _ = tx
                .send(GenerationEvent::Done {
                    finish_reason: "length",
                    prompt_tokens,
                    completion_tokens: sent,
                })
                .await;
        });
        Ok(rx)
    }
}
