//! The engine's Prometheus metrics: queue depth, running requests, token
//! counters and the throughput of the latest generation.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct EngineMetrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub running: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub embedded_inputs: AtomicU64,
    /// Requests whose client went away before the end.
    pub cancelled: AtomicU64,
    /// Sequences sent back to wait for key/value memory.
    pub preempted: AtomicU64,
    /// Prompt positions served from the prefix cache instead of computed.
    pub prefix_cached_tokens: AtomicU64,
    pub kv_blocks_capacity: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_cached: AtomicU64,
    prefill_micros: AtomicU64,
    decode_micros: AtomicU64,
    /// f64 bits of the decode tokens/s of the last generation.
    last_decode_tps: AtomicU64,
}

impl EngineMetrics {
    pub fn record_prefill(&self, tokens: usize, took: Duration) {
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.prefill_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn record_decode(&self, tokens: usize, took: Duration) {
        self.generated_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.decode_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if tokens > 0 && !took.is_zero() {
            let tps = tokens as f64 / took.as_secs_f64();
            self.last_decode_tps.store(tps.to_bits(), Ordering::Relaxed);
        }
    }

    pub fn record_embeddings(&self, inputs: usize, tokens: usize, took: Duration) {
        self.embedded_inputs
            .fetch_add(inputs as u64, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.prefill_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn render(&self, queue_depth: u64) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "atrium_engine_queue_depth",
            "gauge",
            "Requests waiting or running.",
            queue_depth.to_string(),
        );
        metric(
            "atrium_engine_running_requests",
            "gauge",
            "Requests being computed now.",
            get(&self.running).to_string(),
        );
        metric(
            "atrium_engine_requests_total",
            "counter",
            "Requests accepted.",
            get(&self.requests).to_string(),
        );
        metric(
            "atrium_engine_rejected_total",
            "counter",
            "Requests refused because the queue was full.",
            get(&self.rejected).to_string(),
        );
        metric(
            "atrium_engine_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            get(&self.prompt_tokens).to_string(),
        );
        metric(
            "atrium_engine_generated_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.generated_tokens).to_string(),
        );
        metric(
            "atrium_engine_embedded_inputs_total",
            "counter",
            "Inputs embedded.",
            get(&self.embedded_inputs).to_string(),
        );
        for (name, kind, help, value) in [
            (
                "atrium_engine_cancelled_total",
                "counter",
                "Requests whose client went away.",
                &self.cancelled,
            ),
            (
                "atrium_engine_preempted_total",
                "counter",
                "Sequences sent back to wait for key/value memory.",
                &self.preempted,
            ),
            (
                "atrium_engine_prefix_cached_tokens_total",
                "counter",
                "Prompt tokens reused from the prefix cache.",
                &self.prefix_cached_tokens,
            ),
            (
                "atrium_engine_kv_blocks_capacity",
                "gauge",
                "Key/value cache blocks this replica may use.",
                &self.kv_blocks_capacity,
            ),
            (
                "atrium_engine_kv_blocks_used",
                "gauge",
                "Key/value cache blocks held by running sequences.",
                &self.kv_blocks_used,
            ),
            (
                "atrium_engine_kv_blocks_cached",
                "gauge",
                "Idle key/value blocks kept for prefix reuse.",
                &self.kv_blocks_cached,
            ),
        ] {
            metric(name, kind, help, get(value).to_string());
        }
        metric(
            "atrium_engine_prefill_seconds_total",
            "counter",
            "Time spent on prompts.",
            format!("{}", get(&self.prefill_micros) as f64 / 1e6),
        );
        metric(
            "atrium_engine_decode_seconds_total",
            "counter",
            "Time spent generating.",
            format!("{}", get(&self.decode_micros) as f64 / 1e6),
        );
        metric(
            "atrium_engine_decode_tokens_per_second",
            "gauge",
            "Decode throughput of the latest generation.",
            format!("{}", f64::from_bits(get(&self.last_decode_tps))),
        );
        out
    }
}
