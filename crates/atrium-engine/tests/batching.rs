//! Continuous batching with real weights: concurrent requests are computed
//! together and answer exactly as they do alone; the key/value pool's
//! budget, preemption, cancellation and prefix cache behave as promised.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atrium_engine::chat::{
    ChatLimits, ChatModel, GenerationEvent, Message, MessageContent, SamplingParams,
};
use atrium_engine::metrics::EngineMetrics;
use atrium_engine::requantize::Q8_0;
use atrium_engine::EngineError;
use atrium_pull as pull;

fn load(kv_cache_mib: usize) -> (Arc<ChatModel>, Arc<EngineMetrics>) {
    load_with(ChatLimits::new(64, kv_cache_mib))
}

fn load_with(limits: ChatLimits) -> (Arc<ChatModel>, Arc<EngineMetrics>) {
    let entry = pull::lookup("smollm2-135m-instruct").unwrap();
    let model = pull::pull(&pull::default_cache_dir(), entry, Some(&Q8_0), |_| {}).unwrap();
    let metrics = Arc::new(EngineMetrics::default());
    let chat = ChatModel::load(&model.path, limits, metrics.clone()).unwrap();
    (Arc::new(chat), metrics)
}

fn greedy(max_tokens: usize, salt: Option<&str>) -> SamplingParams {
    SamplingParams {
        cache_salt: salt.map(str::to_string),
        ..SamplingParams::greedy(max_tokens)
    }
}

/// Sixteen chat prompts of different lengths.
fn prompts(chat: &ChatModel) -> Vec<Vec<u32>> {
    (0..16)
        .map(|i| {
            let question = format!(
                "Question {i}: name {} animals that live in {} and say one thing about each.",
                i % 5 + 2,
                ["forests", "the sea", "deserts", "cities"][i % 4]
            );
            let text = chat
                .render_chat(&[Message {
                    role: "user".into(),
                    content: MessageContent::Text(question.repeat(1 + i % 3)),
                }])
                .unwrap();
            chat.encode(&text).unwrap()
        })
        .collect()
}

/// The text and finish reason of one generation.
async fn run(chat: &ChatModel, prompt: Vec<u32>, params: SamplingParams) -> (String, String) {
    let mut rx = chat.generate(prompt, params).unwrap();
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Delta(d) => text.push_str(&d),
            GenerationEvent::Logprobs(_) => panic!("logprobs were not asked for"),
            GenerationEvent::Done { finish_reason, .. } => {
                return (text, finish_reason.to_string())
            }
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("the stream ended without Done")
}

async fn concurrently(
    chat: &Arc<ChatModel>,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<(String, String)> {
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (chat, p) = (chat.clone(), p.clone());
            tokio::spawn(async move { run(&chat, p, greedy(max_tokens, None)).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_generations_answer_as_they_do_one_at_a_time() {
    let (chat, metrics) = load(512);
    let prompts = prompts(&chat);
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(run(&chat, p.clone(), greedy(24, None)).await);
    }
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let (metrics, peak) = (metrics.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(metrics.running.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let together = concurrently(&chat, &prompts, 24).await;
    watcher.abort();
    assert!(
        peak.load(Ordering::Relaxed) >= 8,
        "sequences were not batched: peak {}",
        peak.load(Ordering::Relaxed)
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(!a.0.is_empty(), "prompt {i} generated nothing");
        assert_eq!(a, t, "prompt {i} answered differently when batched");
    }
    assert_eq!(metrics.preempted.load(Ordering::Relaxed), 0);
    wait_for("blocks to be released", || {
        metrics.kv_blocks_used.load(Ordering::Relaxed) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_preempts_and_recomputes_without_losing_a_stream() {
    // 8 MiB is eleven blocks of sixteen positions: far less than sixteen
    // sequences of ~60 positions need at once.
    let (chat, metrics) = load(8);
    let prompts: Vec<Vec<u32>> = prompts(&chat)
        .into_iter()
        .filter(|p| p.len() <= 90)
        .collect();
    assert!(prompts.len() >= 8);
    let results = concurrently(&chat, &prompts, 32).await;
    for (i, (text, reason)) in results.iter().enumerate() {
        assert!(!text.is_empty(), "prompt {i} generated nothing");
        assert!(reason == "length" || reason == "stop", "{reason}");
    }
    assert!(
        metrics.preempted.load(Ordering::Relaxed) > 0,
        "the cache never filled"
    );
    wait_for("blocks to be released", || {
        metrics.kv_blocks_used.load(Ordering::Relaxed) == 0
    })
    .await;
    // Recompute takes the kernel the rows first took (a Q8_0 model's rows
    // all take the int8 kernel), so a preempted stream answers as if it
    // had never been.
    let (roomy, roomy_metrics) = load(256);
    let unpreempted = concurrently(&roomy, &prompts, 32).await;
    assert_eq!(roomy_metrics.preempted.load(Ordering::Relaxed), 0);
    assert_eq!(results, unpreempted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_stops_its_generation_and_frees_its_blocks() {
    let (chat, metrics) = load(64);
    let prompt = prompts(&chat).remove(0);
    let mut rx = chat.generate(prompt, greedy(1000, None)).unwrap();
    for _ in 0..3 {
        assert!(matches!(rx.recv().await, Some(GenerationEvent::Delta(_))));
    }
    assert!(metrics.kv_blocks_used.load(Ordering::Relaxed) > 0);
    drop(rx);
    wait_for("the generation to stop", || {
        metrics.cancelled.load(Ordering::Relaxed) == 1
            && metrics.kv_blocks_used.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(metrics.generated_tokens.load(Ordering::Relaxed) < 1000);
    assert_eq!(chat.queue_depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_reuses_its_cached_blocks_only_under_the_same_salt() {
    let (chat, metrics) = load(64);
    let prompt = prompts(&chat).remove(2);
    assert!(prompt.len() > 48, "{}", prompt.len());
    let cached = || metrics.prefix_cached_tokens.load(Ordering::Relaxed);
    let first = run(&chat, prompt.clone(), greedy(16, Some("tenant-a"))).await;
    assert_eq!(cached(), 0);
    let again = run(&chat, prompt.clone(), greedy(16, Some("tenant-a"))).await;
    let reused = cached();
    assert!(
        reused >= 48 && reused % 16 == 0 && reused < prompt.len() as u64,
        "{reused}"
    );
    assert_eq!(first, again, "a cached prefix changed the answer");
    let other = run(&chat, prompt.clone(), greedy(16, Some("tenant-b"))).await;
    assert_eq!(
        cached(),
        reused,
        "another salt must not reuse tenant-a's blocks"
    );
    assert_eq!(first, other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_whole_cache_cannot_hold_is_refused_up_front() {
    // 1 MiB holds one block: sixteen positions.
    let (chat, _) = load(1);
    let prompt = prompts(&chat).remove(0);
    match chat.generate(prompt, greedy(10, None)) {
        Err(EngineError::BadRequest(m)) => assert!(m.contains("lower max_tokens"), "{m}"),
        other => panic!("expected a bad request, got {:?}", other.map(|_| ())),
    }
    assert_eq!(chat.queue_depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn how_a_prompt_is_chunked_does_not_change_its_answer() {
    // Steps of 7 rows cut each prompt into chunks of 7 and a remainder,
    // some of them a single row: every chunk must write and read the cache
    // at its own positions. (That a lone row gets the same bits from the
    // kernels is checked in llama.rs, where a one-bit difference shows.)
    let (whole, _) = load(64);
    let mut limits = ChatLimits::new(64, 64);
    limits.batch.step_tokens = 7;
    let (chunked, _) = load_with(limits);
    let prompts = prompts(&whole);
    assert!(
        prompts.iter().any(|p| p.len() % 7 == 1),
        "no prompt leaves a one-row chunk"
    );
    for (i, p) in prompts.iter().enumerate() {
        let a = run(&whole, p.clone(), greedy(24, None)).await;
        let b = run(&chunked, p.clone(), greedy(24, None)).await;
        assert_eq!(
            a,
            b,
            "prompt {i} ({} tokens) answered differently in chunks",
            p.len()
        );
    }
}
